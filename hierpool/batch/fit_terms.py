"""``hp.fit_batch`` for models with several random-effect terms (crossed, nested): the general blocked criterion,
vmapped over datasets.

The one-term path (:mod:`hierpool.batch.fit`) works on per-level sufficient statistics; with several terms the
levels of one term meet those of another, so each dataset's algebra is the general one
(:func:`hierpool.algebra.criterion.objective`, :func:`hierpool.algebra.henderson.solve`), run on its system of
cross-products.  The systems of a whole batch are built at once on the host, padded to common level counts per
bucket (:func:`hierpool.algebra.batched_systems.batched_systems`: a padded level changes no number), and one
compiled program per bucket shape vmaps Newton's method (:func:`hierpool.algebra.search.newton.newton`) over them, the
solve in a second program.  Every dataset starts from the method of moments of each term (:func:`linear_start`).

**On the host.**  On one CPU device in float64 nothing is compiled ("compile only where compiling pays"):
Newton's method runs in NumPy (:func:`hierpool.algebra.search.newton.newton_on_host`) on the same criterion
and gradient, evaluated for a whole chunk of datasets at once
(:func:`hierpool.algebra.criterion.host_objective_and_gradient` over leading axes), and the solution is
:func:`hierpool.algebra.henderson.solve` over the chunk (:func:`_on_host` says why;
:mod:`hierpool.algebra.search.terms`: the damping interpolated after a rejected trial, saddle-free steps where the
curvature is indefinite, secant updates of the curvature where a point costs much, and a search still unconverged
after 12 passes (24 secant ones) restarted from its theta with a vector term rank-reduced, or every one, where the
criterion there is no higher, which the compiled one does not do).
Accelerators, float32 and sharded batches keep the compiled programs.

Buckets: each term's level count is padded as the one-term path pads it (:func:`hierpool.batch.plan.bucket_width`),
so datasets whose counts differ share a few shapes.  A dataset whose dense coupling would be too large
(:data:`hierpool.algebra.batched_systems.MAX_DENSE_ENTRIES`: hundreds of levels on two terms) is fitted alone by
``hp.lmm`` (``refit`` True, its reason in ``messages``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import numpy as np

from ..algebra.batched_systems import MAX_DENSE_ENTRIES, dense_entries, shared_grid
from ..algebra.checks import fitted_singular
from ..algebra.compiler_options import ProgramCache, compile_in_background, shape_signature
from ..algebra.criterion import objective
from ..algebra.henderson import solve
from ..algebra.host_blas import one_blas_thread
from ..algebra.linalg import theta_start
from ..algebra.search.newton import DECREASE_TOL, canonical_theta, newton
from ..algebra.search.terms import (
    fit_on_host,
    host_bytes,
    point_work,
    search_on_host,
    solved_entries,
    systems_onto_boundary,
)
from ..closedform.optimize import Control
from ..spec.design import lme4_term_order
from . import host_processes
from .other_minima import compiled_other_minima, stopped_rows_searched_on_host
from .plan import (
    QUICK_COMPILE_MAX_VALUES,
    BatchPlan,
    bucket_width,
    chunks,
    fetch,
    fixed_part_problems,
    host_chunk,
    host_chunk_length,
    host_fits,
    merged_widths,
    padded_widths,
    place,
    progress_bar,
    term_count_problems,
    thread_count,
)
from .results import NanRows


def term_problems(plan: BatchPlan, sigma_known: bool | None = None, refusals: bool = True) -> list[str]:
    """Why each dataset cannot be fitted ("" when it can): hp.lmm's checks, term by term, and X's rank, and with
    ``refusals`` what the single fit refuses in the dataset's data (:meth:`~hierpool.batch.plan.BatchPlan.refused`:
    no rows left, a constant response).

    ``sigma_known`` (default: the design's): no residual variance to tell the effects from (known residual
    sds, or a GLMM), so a term may have as many levels as the dataset has rows.  A GLMM's checks
    (:func:`hierpool.batch.fit_glmm.glmm_problems`) add their own reasons before the refusals (``refusals=False``
    here): a binomial dataset without successes says so, not that its response is constant.
    """
    design = plan.design
    sigma_known = design.sigma_known if sigma_known is None else sigma_known
    aliased = plan.aliased_names()
    # every term's counts (the single fit checks them before X), then X, then a term's copied columns (a dataset
    # lacking a level of a factor in the fixed part and a term: X's message says which)
    found = [term_count_problems(plan.n_obs, n_levels, term.coef_names, term.group, sigma_known, levels)
             for term, (_, n_levels, levels) in zip(design.terms, plan.term_levels)]
    messages = []
    for d in range(plan.n_datasets):
        said = [t for t in range(len(found)) if found[t][d]]
        if len(said) > 1:  # (the order looked up only where two terms are refused)
            said = [t for t in dataset_term_order(plan, d) if found[t][d]]
        messages.append(found[said[0]][d] if said else "")
    fixed = fixed_part_problems(plan.n_obs, aliased, design.p, sigma_known, glmm=design.family is not None)
    messages = [old or new for old, new in zip(messages, fixed)]
    messages = [old or copies for old, copies in zip(messages, plan.term_copies)]
    return plan.with_refusals(messages) if refusals else messages


def dataset_term_order(plan: BatchPlan, d: int) -> list[int]:
    """The batch's terms (``plan.design.terms``, in the long frame's order) in the order dataset ``d``'s single fit
    gives them: lme4's (:func:`~hierpool.spec.design.lme4_term_order`) of the formula's terms by the dataset's own
    level counts, so that a batch row names the term its single fit names first (a dataset whose second factor has
    more levels than its first checks it first)."""
    design = plan.design
    position = [design.spec.random.index(term.spec) for term in design.terms]  # each term's place in the formula
    by_formula = sorted(range(len(design.terms)), key=position.__getitem__)
    counts = [int(plan.term_levels[t][1][d]) for t in by_formula]
    return [by_formula[j] for j in lme4_term_order(counts)]


def row_buckets(plan: BatchPlan, datasets) -> dict:
    """``datasets`` grouped by their padded level counts (:func:`~hierpool.batch.plan.padded_widths`) and padded row
    count (the key's last entry), each group an array: the buckets of the paths whose programs hold every row (GLMM, AR(1))."""
    widths, row_widths = padded_widths(plan), bucket_width(plan.n_obs)
    buckets = {}
    for d in datasets:
        buckets.setdefault((*widths[d], row_widths[d]), []).append(d)
    return {key: np.asarray(members) for key, members in buckets.items()}


def too_large(plan: BatchPlan, messages: list[str], p: int | None = None, merged: bool = False) -> dict:
    """dataset -> why it is not batched, for the usable datasets (no message) whose dense coupling grid
    (``Layout.dense_only``) would exceed :data:`~hierpool.algebra.batched_systems.MAX_DENSE_ENTRIES`.  ``p``: the
    system's fixed-effect columns (default the design's; a GLMM's working system has none).  ``merged``: the terms,
    on one grouping factor, are searched as one term (:func:`hierpool.batch.plan.one_factor`), whose system has no
    other term to couple."""
    ks, widths = tuple(t.k for t in plan.design.terms), padded_widths(plan)
    if merged:
        ks, widths = (sum(ks),), widths[:, :1]
    p = plan.design.p if p is None else p
    return {d: "too large to batch (its dense coupling)" for d in range(plan.n_datasets)
            if not messages[d] and dense_entries(widths[d], ks, p) > MAX_DENSE_ENTRIES}


def linear_start(plan: BatchPlan, datasets, residual: np.ndarray) -> np.ndarray:
    """(D, n_theta) a several-term linear mixed model's starting theta for datasets ``datasets``:
    :meth:`~hierpool.batch.plan.BatchPlan.term_moments` on each dataset's (weighted) least-squares residuals
    (``residual``: :meth:`~hierpool.batch.plan.BatchPlan.location_shifts`'), every term's own moments.
    ``hp.lmm`` starts a vector term of a several-term model at lme4's identity instead (L-BFGS-B from its moments
    once reached a worse boundary optimum, :func:`hierpool.closedform.optimize.moment_start`); the batch's Newton
    search restarts a stalled search from the boundary where the criterion there is no higher
    (:func:`hierpool.algebra.search.terms.search_on_host`), and from this start its criteria are below lmer's or
    within 1e-10 of them on every dataset of --lmm-slopes-nested and --lmm-crossed-slopes (benchmarks/RESULTS.md,
    "The several-term linear class, eighteenth session").
    With known residual sds (``se=``) lme4's identity in their units (the search runs in them,
    :mod:`hierpool.batch.conditioning`) times :func:`hierpool.algebra.start.known_sds_size`, as the one-term path's
    (:func:`hierpool.algebra.search.newton.moment_start`)."""
    design = plan.design
    if design.sigma_known:
        sizes = plan.known_sds_sizes(residual)
        return np.tile(theta_start(tuple(t.k for t in design.terms)), (plan.n_datasets, 1)) * sizes[:, None]
    # (prior weights: the columns are z times their unit, batch.conditioning, and so is the floor's scale)
    return plan.term_moments(design.row_weights, residual, datasets,
                             units=plan.weights_units() if design.weights is not None else None)


def take(tree, index):
    """Rows ``index`` of every array of a batch's tree (a chunk's, contiguous for the device)."""
    return jax.tree_util.tree_map(lambda a: np.ascontiguousarray(np.asarray(a)[index]), tree)


def empty_results(plan: BatchPlan, messages: list[str], alone: dict) -> dict:
    """Per-dataset results, NaN until a fit fills them: the dict :func:`fit_terms` and
    :func:`hierpool.batch.fit_glmm.fit_glmm` return.  ``alone``: dataset -> why it is fitted by itself."""
    design, n_datasets = plan.design, plan.n_datasets
    ks, p = tuple(t.k for t in design.terms), design.p
    n_theta = sum(k * (k + 1) // 2 for k in ks)
    usable = np.array([not m for m in messages])
    usable[list(alone)] = False
    return {"theta": np.full((n_datasets, n_theta), np.nan), "objective": np.full(n_datasets, np.nan),
            "beta": np.full((n_datasets, p), np.nan), "vcov": np.full((n_datasets, p, p), np.nan),
            "sigma": np.full(n_datasets, np.nan), "converged": np.zeros(n_datasets, bool),
            "newton_step": np.full(n_datasets, np.nan), "attempted": usable,
            "factors": [NanRows(np.full(n_datasets, k), (k,)) for k in ks],
            "b": [NanRows(n_levels, (k,)) for k, (_, n_levels, _) in zip(ks, plan.term_levels)],
            "cond_var": [NanRows(n_levels, (k, k)) for k, (_, n_levels, _) in zip(ks, plan.term_levels)],
            "messages": messages, "alone": alone}


#: Rows of a linear several-term host batch from which its chunks run in worker processes too
#: (:mod:`hierpool.batch.host_processes`): below them a first call ran as fast or faster on threads alone, a worker's
#: start costing what it gains (benchmarks/RESULTS.md, "Worker processes for the linear several-term host path,
#: twenty-first session").
LINEAR_PROCESS_MIN_ROWS = 100_000
#: Dense evaluation work (:func:`evaluation_work`, summed over the batch) from which a linear several-term host batch
#: runs in worker processes at any row count: a few hundred datasets of large dense systems (three terms, two of them
#: vector terms, 300 rows each) gained there from 200 datasets on, and were even at 100 (benchmarks/RESULTS.md,
#: twenty-second session).
LINEAR_PROCESS_MIN_WORK = 100_000_000


def evaluation_work(plan: BatchPlan, datasets: np.ndarray, term_ks=None) -> int:
    """The host evaluation's dense work summed over ``datasets``: per dataset ell0 k0 m^2 + m^3, the Schur update's
    (and its adjoint's) products with the dense coupling and the rest's factorization and inverse, m the rest's
    columns (:func:`hierpool.algebra.batched_systems.dense_entries`), at each point (the update is computed once
    for the points that share term 0's theta, :func:`hierpool.algebra.criterion.host_objective_and_gradient`: the
    threshold was measured so).  ``term_ks``: the terms searched as one (:func:`hierpool.batch.plan.merged_widths`),
    which leaves no rest term."""
    ks = tuple(t.k for t in plan.design.terms)
    widths = padded_widths(plan)[datasets]
    if term_ks is not None:
        ks, widths = (sum(ks),), widths[:, :1]
    return int(np.sum(point_work(ks, widths, plan.design.p)))


def start_processes(plan: BatchPlan, attempted: np.ndarray, min_rows: int, search) -> bool:
    """Whether a host batch's chunks run in worker processes besides this one, the workers started if so.

    Parameters
    ----------
    plan : BatchPlan
        The batch.
    attempted : ndarray of bool
        The datasets it fits.
    min_rows : int
        Rows to fit at least: below them a worker's start costs more than it gains on a first call.
    search : callable
        The chunk function the workers will run: its module is imported by a new worker before its first chunk.

    Returns
    -------
    bool
        Whether the batch is large enough for workers: a core for one
        (:func:`hierpool.batch.host_processes.worker_count`) and ``min_rows`` rows to fit.  The workers then start
        now (:func:`hierpool.batch.host_processes.start`), their imports running while the caller prepares the
        chunks; where workers are off (``HIERPOOL_HOST_PROCESSES=0``) none starts and
        :func:`hierpool.batch.host_processes.call` runs every chunk here, its BLAS as a worker's.
    """
    count = host_processes.worker_count(thread_count(None))
    if count == 0 or plan.n_obs[attempted].sum() < min_rows:
        return False
    host_processes.start(count, preload=(search.__module__,))
    return True


def run_jobs(jobs, run, out: dict, plan: BatchPlan, *, workers: int, progress) -> dict:
    """Run the chunks (``run(job)`` -> a chunk's results; ``job[0]`` its datasets) and store each dataset's results
    in ``out``, each term's effects cut to the dataset's own levels; then ``is_singular`` (lme4's rule)."""
    names = ("theta", "objective", "beta", "vcov", "sigma", "converged", "newton_step", "shape")
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(progress, plan.n_datasets, "fit_batch") as bar:
        for job, result in zip(jobs, pool.map(run, jobs)):
            members = np.asarray(job[0])
            bar.update(len(members))
            for name in names:
                if name in result:
                    out[name][members] = result[name]
            for t, (_, n_levels, _) in enumerate(plan.term_levels):  # (NanRows: each level count's rows at once)
                out["factors"][t].write(members, np.asarray(result["factors"][t]))
                ells = n_levels[members]
                for ell in np.unique(ells):
                    rows = np.flatnonzero(ells == ell)
                    out["b"][t].write(members[rows], result["b"][t][rows, :ell])
                    out["cond_var"][t].write(members[rows], result["cond_var"][t][rows, :ell])
    ks = tuple(t.k for t in plan.design.terms)
    out["is_singular"] = fitted_singular(out["objective"], out["theta"], ks, Control.singular_tol)
    return out


def _optimize_rows(systems, n, start, reml: bool, max_iterations: int):
    ks = systems.layout.ks

    def one(system, rows, theta0):
        gradient = jax.value_and_grad(partial(objective, system=system, reml=reml, n=rows))

        def value_and_grad(theta):  # in theta's dtype: some of the algebra's constants are float64 (float32 batches)
            value, grad = gradient(theta)
            return value.astype(theta.dtype), grad.astype(theta.dtype)

        # the host search's stop on the decrease the model promises too (optimize.DECREASE_TOL), so that both paths
        # stop by the same rules
        theta, value, newton_step, iterations, converged = newton(None, theta0, max_iterations,
                                                                  value_and_grad=value_and_grad,
                                                                  decrease_tol=DECREASE_TOL)
        return {"theta": canonical_theta(theta, ks), "objective": value, "newton_step": newton_step,
                "iterations": iterations, "converged": converged}

    return jax.vmap(one)(systems, n, start)


def _solve_rows(theta, systems, n, reml: bool):
    return jax.vmap(lambda t, system, rows: solved_entries(solve(t, system, reml=reml, n=rows)))(theta, systems, n)


#: (optimize, solve) program futures by chunk shape and settings (the last 8 used).
_COMPILED = ProgramCache()


def _programs(systems, n, reml: bool, max_iterations: int, sharding, quick: bool):
    """Futures of the (optimize, solve) programs for one chunk shape (compiled in the background, cached)."""
    def build():
        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        placed, rows = jax.tree_util.tree_map(spec, systems), spec(n)
        theta = jax.ShapeDtypeStruct((n.shape[0], systems.layout.n_theta), systems.rest.dtype, sharding=sharding)
        platform = jax.devices()[0].platform if sharding is None else sharding.mesh.devices.flat[0].platform
        optimize = partial(_optimize_rows, reml=reml, max_iterations=max_iterations)
        if sharding is not None:  # each device runs its own rows' Newton loop (hierpool.batch.fit._optimize_chunk)
            optimize = jax.shard_map(optimize, mesh=sharding.mesh, in_specs=(sharding.spec,) * 3,
                                     out_specs=sharding.spec, check_vma=False)
        optimizer = compile_in_background(jax.jit(optimize).lower(placed, rows, theta), platform, quick)
        solver = compile_in_background(jax.jit(partial(_solve_rows, reml=reml)).lower(theta, placed, rows),
                                       platform, quick)
        return optimizer, solver

    return _COMPILED.get((shape_signature((systems, n)), reml, max_iterations, sharding, quick), build)


def _on_host(float_type, sharding) -> bool:
    """Whether a batch is fitted on the host rather than by compiled programs: on one CPU device, in float64
    (:func:`hierpool.batch.plan.host_fits`), at any size.

    Measured faster there at every size tried, from Penicillin's 24 x 6 levels to 200 x 100 (benchmarks/RESULTS.md,
    "Batch fitting for every model, eleventh session"): the programs' tracing and compiling cost more than a small
    batch's whole NumPy run, and a large batch's run goes to a thread per core on the host, where the compiled
    several-term programs run serially (:func:`hierpool.batch.plan.thread_count`).
    """
    return host_fits(float_type, sharding)


def fit_terms(plan: BatchPlan, *, reml: bool, float_type, chunk_size: int | None, progress, max_iterations: int,
              sharding, workers: int, default_chunk: int, shifts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Fit every dataset of ``plan`` (several random-effect terms); per-dataset results as :func:`fit_batch` needs.

    Returns a dict of per-dataset arrays (``theta``, ``objective``, ``beta``, ``vcov``, ``sigma``,
    ``converged``, ``newton_step``, ``attempted``: sent to a compiled program or fitted on the host), per-term
    lists (``factors``, ``b``, ``cond_var``: one array per dataset, sliced to its own levels), ``messages`` and
    ``alone`` (dataset -> why it is fitted by itself instead).  ``chunk_size`` None: :func:`host_chunk` on the host,
    else ``default_chunk``.  ``shifts``: the plan's :meth:`~hierpool.batch.plan.BatchPlan.location_shifts`, where
    the caller has them.
    """
    design = plan.design
    p = design.p
    host = _on_host(float_type, sharding)
    n_devices = 1 if sharding is None else len(jax.devices())
    # on the host, terms on one grouping factor (``(1 + x || g)``) are searched as one block-diagonal term (the
    # terms apart, the second's levels would be a dense block of the system; benchmarks/RESULTS.md, twentieth session)
    term_ks = merged_widths(plan) if host else None
    merged = term_ks is not None
    messages = term_problems(plan)
    out = empty_results(plan, messages, too_large(plan, messages, merged=merged))
    attempted = np.flatnonzero(out["attempted"])
    heavy = host and evaluation_work(plan, attempted, term_ks) >= LINEAR_PROCESS_MIN_WORK
    processes = host and start_processes(plan, out["attempted"], 0 if heavy else LINEAR_PROCESS_MIN_ROWS, fit_on_host)
    shifts = plan.location_shifts() if shifts is None else shifts
    start0 = linear_start(plan, attempted, shifts[1])
    jobs = []
    for members, systems, n in plan.term_systems(attempted, shifts, merged):
        # beta0 stays float64 and is added on the host: in float32 a large common location of y would lose digits
        shift, systems = systems.beta_shift, dataclasses.replace(systems, beta_shift=np.zeros((len(members), p)))
        if host:  # unpadded chunks, threads (NumPy), nothing compiled
            most = chunk_size or host_chunk(host_bytes(systems.layout.ks, systems.layout.n_levels, p))
            size = host_chunk_length(len(members), most, thread_count(None))
            systems = shared_grid(systems, slice(None))  # the grid checked and held once per bucket (views)
            for chunk in chunks(0, np.arange(len(members)), size, 1):
                rows = chunk.index[:chunk.count]
                jobs.append((members[chunk.members], (shared_grid(systems, rows), n[rows], start0[members[rows]]),
                             chunk.count, None, shift[chunk.members]))
            continue
        systems = jax.tree_util.tree_map(
            lambda a: a.astype(float_type) if np.issubdtype(a.dtype, np.floating) else a, systems)
        n = n.astype(float_type)
        per_dataset = sum(a.size for a in jax.tree_util.tree_leaves(systems)) / len(members)
        size = min(chunk_size or default_chunk, math.ceil(len(members) / workers))
        bucket_chunks = chunks(0, np.arange(len(members)), size, n_devices)
        shape = take((systems, n), bucket_chunks[0].index)
        programs = _programs(*shape, reml, max_iterations, sharding, per_dataset * bucket_chunks[0].index.size
                             <= QUICK_COMPILE_MAX_VALUES)
        start = start0[members].astype(float_type)
        for chunk in bucket_chunks:
            jobs.append((members[chunk.members], take((systems, n, start), chunk.index), chunk.count, programs,
                         shift[chunk.members]))

    # uneven prior weights (known sds): minima inside and on the boundary, searched from both sides as hp.lmm does
    # (algebra.search.terms.search_on_host's other_minima; compiled: other_minima.compiled_other_minima)
    uneven = plan.uneven_weights()
    scales = plan.probe_scales() if uneven.any() else None

    def run(job):
        members, (systems, n, start), count, programs, shift = job
        if programs is None:  # on the host: a chunk a thread, each beyond the first in a worker process (NumPy holds
            # the GIL between its many small operations, so that a second thread gains far less than a second process:
            # benchmarks/RESULTS.md, twenty-first session)
            other_minima = uneven[members] if uneven[members].any() else None
            units = None if other_minima is None else scales[members]
            arguments = (systems, n, start, reml, max_iterations, term_ks, other_minima, units)
            result = host_processes.call(fit_on_host, *arguments) if processes else fit_on_host(*arguments)
        else:
            optimize, solver = programs
            chunk, host_start = (systems, n), start  # the host arrays, for the searches from other starts
            systems, n, start = place((systems, n, start), sharding)
            optimized = optimize.result()(systems, n, start)
            minima = {}
            if uneven[members].any():
                rows = np.zeros(len(start), dtype=bool)  # a padded row (results cut below) is not searched again
                rows[:count] = uneven[members]
                units = np.resize(scales[members], (len(start), scales.shape[1]))  # (a padded row repeats)
                optimized = compiled_other_minima(optimized, lambda index: take(chunk, index), optimize.result(), rows,
                                                  chunk[0].layout.ks, float_type, sharding, units)
                minima = {"other_minima": rows, "scales": units}
            # a variance left at 1e-9 is lme4's 0 where the criterion allows, as the host search's
            found = systems_onto_boundary(fetch(optimized), *chunk, reml)
            if float_type == np.float64:  # (float32 systems: the single fit refits the stops)
                found = stopped_rows_searched_on_host(found, count, lambda stopped: search_on_host(
                    shared_grid(chunk[0], stopped), chunk[1][stopped], host_start[stopped], reml, max_iterations,
                    **{name: value[stopped] for name, value in minima.items()}))
            optimized = place(found, sharding)
            solved = solver.result()(optimized["theta"], systems, n)
            result = jax.tree_util.tree_map(lambda a: a[:count], fetch({**optimized, **solved}))
        result["beta"] = result["beta"] + shift
        return result

    # the compiled several-term programs run serially (plan.thread_count); the host's chunks in threads, and with
    # workers BLAS on one thread here as in them, so that a chunk's numbers do not depend on where it ran
    with one_blas_thread() if processes else contextlib.nullcontext():
        return run_jobs(jobs, run, out, plan, workers=thread_count(None) if host else workers, progress=progress)
