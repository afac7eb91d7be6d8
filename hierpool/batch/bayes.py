"""``hp.bayes_batch``: the collapsed sampler of ``hp.bayes``, vmapped over datasets and chains.

Each dataset gets what ``hp.bayes(formula, dataset)`` would give it: its own
default priors scaled to its own data (or the user's ``priors`` keys), NUTS on
its variance parameters with beta and b integrated out (dense mass matrix, as
``hp.bayes``'s collapsed sampler), then one exact draw of (beta, b) per variance
draw.  With one random-effect term the model is written on the dataset's sufficient statistics
(:mod:`hierpool.algebra.one_term_marginal`), so datasets of any size share one shape; with several it is
hp.bayes's general target on each dataset's padded system (:mod:`hierpool.batch.bayes_terms`).  The
layout (buckets, chunks, mesh or threads, failures in their row) is :mod:`hierpool.batch.plan`'s.

Memory: a chunk holds ``chunk_size x chains x draws x (ell k + p + k(k+1)/2 + 1)``
float64 draws on the device (several terms: :mod:`hierpool.batch.bayes_terms`' bytes per
dataset) and, while its summaries are computed, about five times that on the host; nothing
else grows with the number of datasets unless ``keep_draws=True``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from ..algebra.ar1 import per_unit
from ..algebra.compiler_options import ProgramCache, compile_lowered, shape_signature
from ..algebra.conditioning import SAMPLER_REASON, warn_far_fixed
from ..algebra.marginal import theta_from_components
from ..algebra.one_term_marginal import draw_effects
from ..algebra.varcorr import coef_pairs, varcorr_table
from ..bayesian import independence
from ..bayesian.model import one_term_collapsed_model, variance_draws
from ..bayesian.nuts import chain_function, quick_compile
from ..bayesian.priors import DataScales, Priors, check_resolved_priors, resolve_priors
from ..bayesian.results import SUMMARY_COLUMNS
from ..closedform.ar1 import draws_per_unit
from ..errors import ArgumentError, boolean_argument, integer_argument, optional_boolean_argument
from ..spec.arguments import sampler_arguments
from ..spec.family import family_spec
from ..spec.transforms import caller_names
from . import host_processes
from .bayes_ar1 import ar1_chunks, chain_and_draw_ar1
from .bayes_each import bayes_batch_each, sample_summary
from .bayes_glmm import chain_and_draw_glmm, glmm_chunks
from .bayes_results import DIAGNOSTICS_COLUMNS, SCALARS, BayesBatchResult, BayesBatchTerm, summarize_blocks
from .bayes_terms import chain_and_draw_terms, correlation_matrices, effect_key, term_chunks
from .fit_each import fits_each, refuse_on_each
from .fit_glmm import glmm_problems
from .plan import chunks, fetch, mesh_sharding, place, plan_batch, progress_bar, thread_count
from .results import check_by_name
from .shared_design import read_responses, responses_long_frame

#: Compiled chunk programs by settings, argument shapes and sharding (the last 8 used).
_PROGRAMS = ProgramCache()


#: ``bayes_batch``'s ``method`` values (a GLMM's sampler: hp.bayes's way, or NUTS on every dataset).
BATCH_METHODS = ("auto", "full")

#: ``bayes_batch``'s defaults (named: the dataset-by-dataset paths refuse any other value by name).
MAX_TREE_DEPTH = 10
CHUNK_SIZE = 256

def _chain_and_draw(k: int, sigma_known: bool, tune: int, draws: int, target_accept: float, max_tree_depth: int):
    """One (dataset, chain): NUTS on the variance parameters, then exact (beta, b) draws; vmapped over both.

    With known residual sds (``sigma_known``) sigma is 1 in every draw and not returned (the statistics
    carry the weights 1 / se^2), as in ``hp.bayes``'s one-term path.
    """
    bound = partial(one_term_collapsed_model, k=k)
    one_chain = chain_function(bound, tune=tune, draws=draws, target_accept=target_accept,
                               max_tree_depth=max_tree_depth, dense_mass=True)

    def run(seed, chain, args):
        stats, loc, scale, _ = args
        constrained, sample_stats = one_chain(seed, chain, args)
        (sd,), (cor,), sigma = variance_draws(constrained, (k,), sigma_known)
        thetas = theta_from_components([sd], [cor], sigma)
        noise = jax.random.normal(effect_key(seed, chain), (draws, loc.shape[-1] + stats.zty.size), dtype=thetas.dtype)
        # all of a chain's draws at once: the chunk already bounds memory
        beta, b = draw_effects(thetas, sigma, stats, loc, scale, noise, batch_size=draws)
        # correlation matrices from their Cholesky factors; one entry per term, as the several-term path's
        out = {"beta": beta, "b": [b], "sd": [sd], "diverging": sample_stats["diverging"],
               "cor": correlation_matrices([cor if k > 1 else None])}
        if not sigma_known:
            out["sigma"] = sigma
        return out

    return jax.vmap(run, in_axes=(None, 0, 0))


def _compiled(factory, settings: tuple, seed, chain_ids, args, sharding, quick: bool = False):
    """The compiled program of ``factory(*settings)`` (:func:`_chain_and_draw` or
    :func:`~hierpool.batch.bayes_terms.chain_and_draw_terms`) for a chunk of this shape, kept in :data:`_PROGRAMS`."""
    def build():
        platform = jax.devices()[0].platform
        ids, arrays = chain_ids, args
        if sharding is not None:
            ids, arrays = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), np.dtype(a.dtype), sharding=sharding), (ids, arrays))
        function = factory(*settings)
        if sharding is not None:
            # each device runs its own rows' loops: vmapped over a sharded axis, the NUTS while loops would
            # synchronize every device (a collective per tree-building step) until the slowest chain is done
            data = sharding.spec
            function = jax.shard_map(function, mesh=sharding.mesh, in_specs=(P(), data, data), out_specs=data,
                                     check_vma=False)
        return compile_lowered(jax.jit(function).lower(seed, ids, arrays), platform, quick)

    return _PROGRAMS.get((factory, settings, shape_signature(args), sharding, quick), build)


def _repeated_shapes(args, chains: int):
    """The shapes of ``args`` with each dataset's row repeated for its ``chains`` (what the program is called with)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((a.shape[0] * chains,) + a.shape[1:], a.dtype), args)


def _stack(trees: list):
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x, dtype=float) for x in leaves]), *trees)


def bayes_batch(
    formula: str,
    data,
    by: str = "dataset",
    *,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    priors: dict | Priors | None = None,
    level: float = 0.95,
    target_accept: float = 0.8,
    max_tree_depth: int = MAX_TREE_DEPTH,
    chunk_size: int = CHUNK_SIZE,
    keep_draws: bool = False,
    progress: bool | None = None,
    weights=None,
    offset=None,
    se: str | None = None,
    correlation=None,
    family: str | None = None,
    link: str | None = None,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
    adjacency=None,
    method: str = "auto",
    responses=None,
) -> BayesBatchResult:
    """Posteriors of one Bayesian linear mixed model fitted to many datasets at once.

    Parameters
    ----------
    formula : str
        An lme4-style formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``; several random-effect
        terms (crossed, nested) are sampled on the general algebra (:mod:`hierpool.batch.bayes_terms`).
    data : DataFrame, or list or dict of DataFrames
        A long frame with a ``by`` column, or the datasets themselves.
    by : str
        The column that names the dataset of each row.
    chains, draws, tune : int
        Chains per dataset, kept draws per chain, warm-up iterations per chain.
    seed : int
        Dataset ``d`` (in order of first appearance), chain ``c`` uses the key
        ``fold_in(PRNGKey(seed), d * chains + c)``: results do not depend on the chunking.
    priors : dict or Priors, optional
        Keys as in :func:`hierpool.bayes` (``Intercept``, a fixed-effect name, ``b``,
        ``sd``, ``sd_<group>``, ``sigma``, ``cor``); every dataset's other priors are
        its own data-scaled defaults.  Fixed-effect priors must be Normal or ``"flat"``
        (the collapsed sampler integrates beta out).  A resolved ``Priors`` is used for
        every dataset as it is.
    level : float
        Coverage of the equal-tailed intervals.
    target_accept : float
    max_tree_depth : int
    chunk_size : int
        Most datasets per compiled call (bounds memory; see the module notes).
    keep_draws : bool
        Keep every dataset's draws in ``result.draws`` (memory grows with the batch): ``beta``
        (chain, draw, p), ``b`` (chain, draw, ell, k), ``sd``, ``cor`` (k > 1) and ``sigma``; with several
        terms ``b``, ``sd`` and ``cor`` are lists, one entry per term of ``result.terms`` (``cor`` None where k = 1);
        with ``correlation=`` ``phi`` (chain, draw) too.  A dataset sampled alone by ``hp.bayes`` because it
        lacks a factor's level (its row's message says so) has its own draws there, on the batch's columns (NaN
        for the one it lacks) and its own levels.
    progress : bool, optional
        A progress bar over chunks (default: when stderr is a terminal).
    weights : str or array-like, optional
        Prior weights, as ``hp.bayes``'s (residual variance sigma^2 / w_i): a column
        name or, with ``data`` one DataFrame, one value per row of it.
    offset : str or array-like, optional
        A known term of the linear predictor, as ``hp.bayes``'s, added to any
        ``offset(expr)`` terms of the formula; a column name or one value per row.
    se : str, optional
        Column of known residual sds, as ``hp.bayes``'s (meta-analysis): row i has
        residual variance se_i^2 and sigma is not a parameter (1).  Cannot be combined
        with ``weights``.
    correlation : AR1, optional
        AR(1) residuals within each series, ``hp.ar1(group, time=None)`` or ``hp.car1(group, time)``, as
        ``hp.bayes``'s ``correlation=`` (each dataset's series its own; :mod:`hierpool.batch.bayes_ar1`): phi is
        sampled with the variance parameters, Uniform on its interval (``hp.car1``: on the correlation at the
        dataset's median lag, as ``hp.bayes``), and summarized in ``result.phi``, per unit of the time column.
        Not with ``weights=`` or ``se=``.
    family : {None, "binomial", "bernoulli", "poisson", "negative_binomial"}
        A GLMM, sampled as ``hp.bayes`` samples it with ``family=``: a binomial or Poisson model with one scalar
        term dataset by dataset by its independence sampler where that takes the dataset (the same draws as
        ``hp.bayes(..., seed=seed + d)``, dataset ``d`` in order; :func:`hierpool.bayesian.fit.bayes_independence`),
        every other dataset and model by NUTS on every parameter, vmapped over the datasets (each level's effect
        partially non-centered; :mod:`hierpool.batch.bayes_glmm`).  ``result.diagnostics``' ``method`` says which.
        Its priors on the fixed effects may be any.  ``varcorr`` then has no ``Residual`` rows; a negative
        binomial's shape is in ``result.shape``.
    link : str, optional
        The GLMM's link (``hp.bayes``'s ``link``).
    relmat, relmat_inverse : dict, optional
        A relationship matrix for one term's levels (the animal model), as ``hp.bayes``'s, shared by every
        dataset; ``adjacency``: the graph(s) of the formula's ``car()`` spatial terms, as ``hp.bayes``'s.  Built
        once, then each dataset sampled by ``hp.bayes(..., seed=seed + d)`` itself (dataset ``d`` in order;
        :mod:`hierpool.batch.bayes_each`): ``result.heritability`` holds an animal model's h^2, and a spatial
        batch's parameters are ``result.hyperparameters`` (it has no ``varcorr``).  Not with ``keep_draws``,
        ``correlation=``, another ``max_tree_depth`` or ``chunk_size`` (hp.bayes's samplers for these models take
        none; one dataset's posterior is held at a time).
    method : {"auto", "full"}
        A GLMM's sampler: ``"auto"`` as ``hp.bayes``'s (its independence sampler first where it applies, above),
        ``"full"`` NUTS on every parameter for every dataset (all in compiled batches: on an accelerator the
        faster, on a CPU the independence sampler is; its chains diverge more often on small datasets, whose rows
        are then not ``ok``: benchmarks/RESULTS.md, forty-second session).  A Gaussian model takes ``"auto"``
        only (its collapsed sampler).
    responses : array-like (rows of ``data``, datasets) or DataFrame, optional
        Many responses on one design, as :func:`hierpool.fit_batch`'s ``responses=``: ``data`` is one dataset's
        rows and each column one dataset's response (the formula's response, a column name).  The datasets are
        sampled on the long frame built from them (:func:`hierpool.batch.shared_design.responses_long_frame`).

    Returns
    -------
    BayesBatchResult
        ``fixef``, ``ranef``, ``varcorr`` (long tables with a ``by`` column and
        hp.bayes's summary columns), ``diagnostics``, ``messages``, ``terms`` (one
        :class:`~hierpool.batch.bayes_results.BayesBatchTerm` per random-effect term) and, with
        ``correlation=``, ``phi``; with ``se=``
        ``varcorr`` has no ``Residual`` rows and the kept draws no ``sigma``, as ``hp.bayes``'s.
        ``to_frame()``: one row per dataset, its diagnostics and each parameter's mean and interval ends.

    Notes
    -----
    The target of each dataset is hp.bayes's collapsed target (Normal priors on
    beta as pseudo-observations; LKJ(eta) on a 2 x 2 correlation as
    rho = 2u - 1, u ~ Beta(eta, eta)), so each dataset's posterior is the one
    ``hp.bayes`` samples; the tests compare the two in Monte Carlo error units.
    Known residual sds enter each dataset's statistics as the weights 1 / se^2 with
    sigma fixed at 1: the target and exact draws of ``hp.bayes``'s one-term path with
    ``se=``.  With several terms the target is hp.bayes's general collapsed target on each dataset's
    system of cross-products, padded as ``hp.fit_batch``'s (a padded level changes no number).
    """
    chains, draws, tune, seed = sampler_arguments(chains, draws, tune, seed, level, target_accept, min_tune=1)
    max_tree_depth = integer_argument("max_tree_depth", max_tree_depth, minimum=1)
    progress = optional_boolean_argument("progress", progress)
    keep_draws = boolean_argument("keep_draws", keep_draws)
    if responses is not None:  # many responses on one design: their long frame (the sampler reads rows)
        read = read_responses(formula, data, responses, by, gaussian=family is None,
                              binomial=family is not None and family_spec(family, link).name == "binomial")
        data, by, weights, offset = responses_long_frame(data, read, weights, offset)
    check_by_name(by, "bayes_batch", (*SUMMARY_COLUMNS, *DIAGNOSTICS_COLUMNS))
    if method not in BATCH_METHODS:
        raise ArgumentError(f"method must be one of {BATCH_METHODS}, got {method!r}")
    if fits_each(formula, relmat, relmat_inverse, adjacency):  # dataset by dataset (bayes_each's module notes)
        refuse_on_each(keep_draws=(keep_draws, False), correlation=(correlation, None),
                       max_tree_depth=(max_tree_depth, MAX_TREE_DEPTH), chunk_size=(chunk_size, CHUNK_SIZE),
                       method=(method, "auto"))
        return bayes_batch_each(formula, data, by, chains=chains, draws=draws, tune=tune, seed=seed, priors=priors,
                                level=level, target_accept=target_accept, progress=progress, weights=weights,
                                offset=offset, se=se, family=family, link=link, relmat=relmat,
                                relmat_inverse=relmat_inverse, adjacency=adjacency).warn_diagnostics()
    chunk_size = integer_argument("chunk_size", chunk_size)
    spec = None
    if family is not None:
        spec = family_spec(family, link)
        if correlation is not None or se is not None:
            raise ArgumentError(f"family= with {'correlation=' if correlation is not None else 'se='}: "
                                f"{'AR(1) residuals' if correlation is not None else 'known residual sds'} are for "
                                "the linear mixed model")
    elif link is not None:
        raise ArgumentError("link= needs family= (a GLMM)")
    elif method != "auto":
        raise ArgumentError(f"method={method!r} chooses a GLMM's sampler (family=); a Gaussian model is sampled by "
                            "its collapsed sampler (method='auto')")
    plan = plan_batch(formula, data, by, "bayes_batch", "hp.bayes", weights=weights, offset=offset, se=se,
                      one_term=False, family=spec)
    design = plan.design
    p, ks = design.p, tuple(t.k for t in design.terms)
    sigma_known = design.sigma_known or spec is not None  # no residual sd: known, or a GLMM's
    if spec is None:  # as hp.bayes: a column too far from zero for the collapsed sampler's cross-products
        warn_far_fixed(design.X, design.fixed_names, SAMPLER_REASON, 2, plan.dataset, plan.n_datasets)

    if isinstance(priors, Priors):  # by position: one sd prior per term of result.terms (the long frame's order)
        resolved = [check_resolved_priors(priors, design, glmm=spec is not None,
                                          shape=spec is not None and spec.name == "negative_binomial")] * plan.n_datasets
    else:
        scales = DataScales.per_group(design, plan.dataset, plan.n_datasets)
        resolved = [resolve_priors(design, priors, each) for each in scales]
    gaussian = [r.beta_gaussian() for r in resolved]
    if spec is None and any(g is None for g in gaussian):
        raise ArgumentError("priors: bayes_batch runs the collapsed sampler, which integrates the fixed effects "
                            "out and needs Normal or 'flat' priors on them")

    sharding = mesh_sharding()
    n_devices = 1 if sharding is None else len(jax.devices())
    several = len(ks) > 1
    # several terms or AR(1) residuals: the chunks run one after another, as fit_batch's (plan.thread_count: two
    # threads running general-algebra programs have deadlocked XLA on a CPU)
    workers = thread_count(sharding, serial=several or correlation is not None or spec is not None)

    def size_of(count: int) -> int:
        return min(chunk_size, math.ceil(count / workers))

    units = None  # an AR(1) batch's: each dataset's unit of time for phi's draws
    independent = {}  # dataset -> its summaries by hp.bayes's independence sampler
    if spec is not None:
        messages = glmm_problems(plan)
        if method == "auto" and independence.applicable(design, None, resolved[0]):  # (each dataset's priors alike)
            independent = _independence_pass(plan, messages, formula, seed, progress, keep_draws, {
                "chains": chains, "draws": draws, "tune": tune, "priors": priors, "level": level, "family": family,
                "link": link})
        parts = glmm_chunks(plan, size_of, n_devices, messages, sampled=independent)
        factory = chain_and_draw_glmm
    elif correlation is not None:
        messages, parts, units = ar1_chunks(plan, correlation, size_of, n_devices)
        factory = chain_and_draw_ar1
    elif several:
        messages, parts = term_chunks(plan, size_of, n_devices)
        factory = chain_and_draw_terms
    else:
        buckets, messages = plan.buckets(np.float64)
        parts = [(chunk, usable[chunk.index], (stats.take(chunk.index),)) for bucket, usable, stats in buckets
                 for chunk in chunks(bucket, usable, size_of(len(usable)), n_devices)]
        factory = _chain_and_draw
    jobs = []
    for chunk, members, data in parts:  # members: the chunk's datasets, padded with copies of the first
        priors_of = _stack([resolved[d] for d in members])
        args = (*data, priors_of) if spec is not None else (
            *data, np.stack([gaussian[d][0] for d in members]), np.stack([gaussian[d][1] for d in members]), priors_of)
        # repeated for the chains only when the chunk runs (run below): the jobs of a large batch hold one copy
        args = jax.tree_util.tree_map(np.asarray, args)
        chain_ids = (members[:, None] * chains + np.arange(chains)).ravel().astype(np.uint32)
        jobs.append((chunk, args, chain_ids))

    if spec is not None:
        settings = (ks, spec.name, spec.link, p, tune, draws, float(target_accept), max_tree_depth)
    else:
        shape = ks if several or correlation is not None else ks[0]
        second = correlation.bounds if correlation is not None else sigma_known  # phi's interval, or sigma known
        settings = (shape, second, tune, draws, float(target_accept), max_tree_depth)
    key_seed = np.uint32(seed % 2**32)
    # a small batch's chains run for less time than LLVM takes to optimize their program: compile it without
    # (hp.bayes' rule, over every chain of the batch).  Up to 4 sleepstudy-sized datasets x 4 chains x 1000
    # draws (the most this rule takes) the compile time saved outweighs the slower unoptimized chains; the
    # timings are in benchmarks/RESULTS.md, "Measurements the code cites"
    quick = quick_compile([args for _, args, _ in jobs], chains=chains, iterations=tune + draws)
    # compile each chunk shape once, before the threads start (they would each compile it); each job holds its
    # program, so the cache dropping one while this call runs never compiles it twice
    # the general paths' exact draws share a memory budget over the (dataset, chain) pairs of a device (under
    # shard_map each device runs its own share of the chunk's)
    per_job = ((lambda ids: (len(ids) // n_devices,)) if factory in (chain_and_draw_terms, chain_and_draw_ar1)
               else (lambda ids: ()))
    jobs = [(chunk, args, chain_ids,
             _compiled(factory, settings + per_job(chain_ids), key_seed, chain_ids, _repeated_shapes(args, chains),
                       sharding, quick))
            for chunk, args, chain_ids in jobs]

    def run(job):
        chunk, args, chain_ids, program = job
        args = jax.tree_util.tree_map(lambda a: np.repeat(a, chains, axis=0), args)  # one row per (dataset, chain)
        chain_ids, args = place((chain_ids, args), sharding)
        out = fetch(program(key_seed, chain_ids, args))
        out = jax.tree_util.tree_map(
            lambda value: value[: chunk.count * chains].reshape((chunk.count, chains) + value.shape[1:]), out)
        beyond = {}  # dataset -> why its phi per unit of time is not reported (hp.bayes refuses it by name)
        if correlation is not None:  # drawn per each dataset's median lag: phi per the user's unit (NaN: beyond)
            psi = np.array(out["phi"], dtype=float)
            shape = (-1,) + (1,) * (psi.ndim - 1)
            out["phi"] = per_unit(psi, units[chunk.members].reshape(shape))  # the whole chunk at once
            for row in np.flatnonzero(~np.all(np.isfinite(out["phi"]), axis=tuple(range(1, psi.ndim)))):
                d = chunk.members[row]  # only a dataset with a draw beyond a float: its reason, by name
                beyond[d] = draws_per_unit(psi[row], units[d], correlation, what="a posterior draw of phi")[1]
        return chunk, out, summarize_blocks(out, ks, level), {d: why for d, why in beyond.items() if why}

    n_varcorr = sum(k + len(coef_pairs(k)) for k in ks) + (0 if sigma_known else 1)
    fixef = np.full((plan.n_datasets, p, len(SUMMARY_COLUMNS)), np.nan)
    varcorr = np.full((plan.n_datasets, n_varcorr, len(SUMMARY_COLUMNS)), np.nan)
    ranef = [[np.full((k, ell, len(SUMMARY_COLUMNS)), np.nan) for ell in n_levels]
             for k, (_, n_levels, _) in zip(ks, plan.term_levels)]
    divergences = np.zeros(plan.n_datasets, dtype=int)
    # the model's further scalar parameters (NaN rows until a chunk fills them, as every summary)
    names = ["phi"] * (correlation is not None) + ["shape"] * (spec is not None and spec.name == "negative_binomial")
    scalars = {name: np.full((plan.n_datasets, len(SUMMARY_COLUMNS)), np.nan) for name in names}
    kept = {} if keep_draws else None
    methods = [""] * plan.n_datasets if spec is not None else None  # a GLMM's sampler per dataset
    sampled = sum(chunk.count for chunk, _, _, _ in jobs)  # the datasets the compiled chunks sample (the bar's)
    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(progress, sampled, "bayes_batch") as bar:
        for chunk, out, summary, beyond in pool.map(run, jobs):
            members = chunk.members
            fixef[members], varcorr[members] = summary["fixef"], summary["varcorr"]
            divergences[members] = out["diverging"].sum(axis=(1, 2))
            if methods is not None:
                for index in members:
                    methods[index] = "full"
            for name in scalars:
                scalars[name][members] = summary[name]
            for row, index in enumerate(members):
                ells = [n_levels[index] for _, n_levels, _ in plan.term_levels]
                for t, ell in enumerate(ells):
                    ranef[t][index] = summary["ranef"][t][row][:, :ell]
                if kept is not None:
                    kept[plan.labels[index]] = _kept_draws(out, row, ells, several)
            for index, message in beyond.items():  # as a dataset refused before sampling: its reason, no numbers
                messages[index], divergences[index] = message, 0
                fixef[index], varcorr[index] = np.nan, np.nan
                for table in scalars.values():
                    table[index] = np.nan
                for term in ranef:
                    term[index] = np.full_like(term[index], np.nan)
                if kept is not None:
                    del kept[plan.labels[index]]
            bar.update(len(members))

    def fill(index: int, summary: dict) -> None:  # a dataset sampled by hp.bayes's code alone
        if kept is not None:  # its own draws, on the batch's columns and levels
            kept[plan.labels[index]] = _kept_form(summary["draws"], several)
        fixef[index], varcorr[index] = summary["fixef"], summary["varcorr"]
        divergences[index] = summary["divergences"]
        for t, values in enumerate(summary["terms"]):
            ranef[t][index] = values
        for name, values in summary["scalars"].items():
            scalars[name][index] = values
        if methods is not None:
            methods[index] = summary["method"]

    # a dataset that lacks a factor's level (not its baseline): hp.bayes's posterior of it alone, NaN in that column,
    # as fit_batch fits it alone (a resolved Priors is the batch's columns': such a dataset stays refused)
    if not isinstance(priors, Priors):
        settings = {"chains": chains, "draws": draws, "tune": tune, "priors": priors, "level": level,
                    "target_accept": target_accept, "family": family, "link": link, "correlation": correlation,
                    "method": method}
        for index in plan.alone_for_levels(messages):
            summary, why = _sample_alone(plan, index, formula, settings, seed, list(scalars), level, sigma_known,
                                         keep_draws)
            if summary is None:
                messages[index] += f"; sampling it alone failed: {why}"
                continue
            fill(index, summary)
            messages[index] = plan.alone_note(index, "sampled")
    for index, summary in independent.items():
        fill(index, summary)
    terms = tuple(BayesBatchTerm(group=term.group, coef_names=term.coef_names, levels=labels, ranef_summary=summary)
                  for term, (_, _, labels), summary in zip(design.terms, plan.term_levels, ranef))
    return BayesBatchResult(
        datasets=plan.labels,
        fixed_names=design.fixed_names,
        terms=terms,
        fixef_summary=fixef,
        varcorr_summary=varcorr,
        divergences=divergences,
        messages=messages,
        chains=chains,
        draws_per_chain=draws,
        level=level,
        draws=kept,
        sigma_known=sigma_known,
        scalars=scalars,
        methods=None if methods is None else tuple(methods),
    ).warn_diagnostics()


#: Datasets from which the independence pass samples in worker processes too (:mod:`hierpool.batch.host_processes`,
#: a core each): a worker's start (Python, NumPy, JAX and the sampler's modules) costs about as much as a few
#: datasets' sampling (benchmarks/RESULTS.md, forty-fourth session).
INDEPENDENCE_PROCESS_MIN = 8


def _independence_pass(plan, messages: list[str], formula: str, seed: int, progress, keep_draws: bool,
                       settings: dict) -> dict:
    """dataset -> its summaries, for each dataset without a message that ``hp.bayes``'s independence sampler takes
    (:func:`hierpool.bayesian.fit.bayes_independence`: one scalar term, a good proposal), sampled on the host
    dataset by dataset (seed + index, as ``hp.bayes(..., seed=seed + index)``), from
    :data:`INDEPENDENCE_PROCESS_MIN` datasets in worker processes too, one a core (each dataset's draws are its
    seed's wherever it runs).  A dataset it declines is left to the batched NUTS, as hp.bayes goes on to NUTS; one
    whose attempt raises gets the error in its row of ``messages`` (updated here), as hp.bayes raises it."""
    from ..bayesian.fit import bayes_independence

    usable = [d for d, message in enumerate(messages) if not message]

    def job(index):  # (the function, its arguments): here, or in an idle worker process
        return sample_summary, _alone_arguments(plan, index, formula, settings, seed, [], settings["level"], True,
                                                keep_draws, bayes_independence)

    # a formula that reads the caller's names (np.sin, a user's function) is sampled here, in this thread
    outcomes = host_processes.whole_runs(usable, job, threads=thread_count(None), minimum=INDEPENDENCE_PROCESS_MIN,
                                         preload=(sample_summary.__module__, bayes_independence.__module__),
                                         allowed=not caller_names(formula, plan.frame.columns))
    out = {}
    with progress_bar(progress, len(usable), "bayes_batch (independence sampler)") as bar:
        for index, (summary, why) in zip(usable, outcomes):
            if summary is not None:
                out[index] = summary
            elif why:
                messages[index] = why
            bar.update(1)
    return out


def _sample_alone(plan, index: int, formula: str, settings: dict, seed: int, scalars: list, level: float,
                  sigma_known: bool, keep_draws: bool = False, sampler=None):
    """(dataset ``index``'s summaries as the batch's arrays, None) from ``hp.bayes`` (or ``sampler``, taking its
    arguments) on its rows alone (seed + index, as the dataset-by-dataset path seeds it), or (None, why) where it
    raised: kept in its row, never raised; (None, "") where ``sampler`` returned None (declined)."""
    return sample_summary(*_alone_arguments(plan, index, formula, settings, seed, scalars, level, sigma_known,
                                            keep_draws, sampler))


def _alone_arguments(plan, index: int, formula: str, settings: dict, seed: int, scalars: list, level: float,
                     sigma_known: bool, keep_draws: bool, sampler) -> tuple:
    """:func:`~hierpool.batch.bayes_each.sample_summary`'s arguments for dataset ``index`` (its rows, its
    arguments, the batch's names and levels): taken here, where the plan is, so that the sampling itself can run
    in a worker process."""
    from ..bayesian.fit import bayes

    sampler = partial(bayes, progress=False) if sampler is None else sampler
    design = plan.design
    frame, arguments = plan.dataset_frame(index)
    priors = settings.get("priors")
    if isinstance(priors, dict):  # a prior of a column the dataset lacks: its single fit has no such column
        lacking = {design.fixed_names[j] for j in plan.zero_columns.get(index, ())}
        settings = {**settings, "priors": {key: value for key, value in priors.items() if key not in lacking}}
    template = varcorr_table([(t.group, t.coef_names, np.full((t.k, t.k), np.nan)) for t in design.terms],
                             None if sigma_known else np.nan)
    terms = [(t.group, t.coef_names) for t in design.terms]
    levels = [labels[index] for _, _, labels in plan.term_levels]
    return (sampler, formula, frame, arguments, settings, seed + index, design.fixed_names, terms, levels, template,
            scalars, level, keep_draws)


def _kept_draws(out: dict, row: int, ells: list, several: bool) -> dict:
    """One dataset's draws (``keep_draws=True``): each term's ``b`` cut to its own levels; with one term ``b``,
    ``sd`` and ``cor`` are that term's arrays (``cor`` only where k > 1), with several a list per term."""
    one = {"beta": out["beta"][row], "b": [value[row][..., :ell, :] for value, ell in zip(out["b"], ells)],
           "sd": [value[row] for value in out["sd"]],
           "cor": [None if value is None else value[row] for value in out["cor"]]}
    return _kept_form(one | {name: out[name][row] for name in ("sigma", *SCALARS) if name in out}, several)


def _kept_form(draws: dict, several: bool) -> dict:
    """A dataset's draws (lists per term of ``b``, ``sd``, ``cor``) as ``keep_draws`` gives them: with one term its
    arrays bare (``cor`` only where k > 1), with several the lists."""
    kept = {"beta": draws["beta"]}
    if several:
        kept.update(b=draws["b"], sd=draws["sd"], cor=draws["cor"])
    else:
        kept.update(b=draws["b"][0], sd=draws["sd"][0])
        if draws["cor"][0] is not None:
            kept["cor"] = draws["cor"][0]
    for name in ("sigma", *SCALARS):
        if name in draws:
            kept[name] = draws[name]
    return kept
