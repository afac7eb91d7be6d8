"""``hp.fit_batch``: one model fitted to many datasets as jit-compiled, vmapped calls (one random-effect
term here; several terms in :mod:`hierpool.batch.fit_terms`, GLMMs in :mod:`hierpool.batch.fit_glmm`, AR(1)
residuals in :mod:`hierpool.batch.fit_ar1`).

The layout of the work (one parse, sufficient statistics, buckets by level
count, equal-shape chunks compiled once, a device mesh or a thread per core,
failures kept in their row) is :mod:`hierpool.batch.plan`'s.  Device memory is
bounded by the chunk, whatever the number of datasets; per dataset, in bytes:

* one term: about ``40 * ell * k * (k + p + 1) * 8`` of working set (the statistics
  and the optimizer's probes); on the host (below), the several-term host search's (next item) with one term;
* several terms (:mod:`hierpool.batch.fit_terms`): its system, ``8 * (ell0 k0^2 +
  ell0 k0 m + m^2)`` with ``m = sum_(j>0) ell_j k_j + p + 1`` (the padded levels), held
  by each of the optimizer's ``n_theta + 1`` probes; on the host (below), about
  ``8 * (n_theta + 1) * (10 m^2 + 3 ell0 k0 m + 8 k0^2 ell0)`` (the temporaries of every probe, a call's
  default chunk bounded by ``plan.HOST_CHUNK_BYTES``; one call per core at a time, so
  about ``os.cpu_count()`` times that at the peak);
* a GLMM (:mod:`hierpool.batch.fit_glmm`): its padded rows, ``8 * n * (3 + p + sum k_j)``
  plus the working system's, per probe of (theta, beta); on the host (binomial and Poisson in float64 on one
  CPU), about ``8 * n * m * (20 + p + sum_j (k_j + 1))`` with ``m = n_theta + p`` (its rows copied for each
  forward-difference shift, ``fit_glmm.host_bytes``; a call's default chunk bounded by
  ``fit_glmm.HOST_CHUNK_BYTES``, one call per core at a time);
* AR(1) residuals (:mod:`hierpool.batch.fit_ar1`): its padded rows, ``8 * n * (4 + p + sum k_j)``,
  plus the whitened system's per probe of theta; on the host (one term, or terms on one factor,
  :mod:`hierpool.algebra.search.ar1_moments`),
  :func:`hierpool.algebra.search.ar1_moments.host_bytes` (its rows, lagged moments and the probes of theta and phi).

A dataset whose batched optimizer did not converge is refitted
alone by ``hp.lmm`` (``polish=True``); each is marked in ``refit`` and explained
in ``messages``, so a batched optimizer that fails is seen, not papered over.
On a CPU, linear-model batches of up to ``QUICK_COMPILE_MAX_VALUES`` statistics compile with
:mod:`hierpool.algebra.compiler_options`' quick options: their run is shorter than
LLVM's optimization of the programs.  One-term batches of that size compile nothing: the
several-term batches' host search runs on their statistics' systems
(:func:`hierpool.algebra.search.terms.search_statistics_on_host`: Newton's method in NumPy over the datasets still
searching, the criterion's gradient its written-out adjoint), in less time than XLA
would take to compile it ("compile only where compiling pays").  Several-term batches
in float64 on one CPU device compile nothing at any size: the same Newton's method on
the blocked criterion and its written-out gradient, a chunk's datasets at once
(:mod:`hierpool.batch.fit_terms`, "On the host"); so do binomial and Poisson GLMM batches
(:mod:`hierpool.batch.fit_glmm`, Laplace by :mod:`hierpool.algebra.laplace_batch`) and batches with AR(1) residuals
(theta and phi searched together: one term of at most ``algebra.search.ar1_moments.HOST_MAX_THETA`` parameters, or terms on one grouping
factor as one, from per-level lagged moments, :mod:`hierpool.algebra.search.ar1_moments`; other several-term models on their
whitened systems, :mod:`hierpool.algebra.search.ar1_systems`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import jax
import numpy as np
import pandas as pd

from ..algebra import one_term
from ..algebra.batched_systems import statistics_systems
from ..algebra.checks import fitted_singular, near_boundary
from ..algebra.compiler_options import ProgramCache, compile_in_background, shape_signature
from ..algebra.family import family as make_family
from ..algebra.host_allocator import raise_malloc_thresholds
from ..algebra.one_term import solution
from ..algebra.search.newton import MAX_ITERATIONS, canonical_theta, minimize_one, moment_start
from ..algebra.search.terms import (
    boundary_tolerance,
    host_bytes,
    search_statistics_on_host,
    systems_onto_boundary,
)
from ..closedform import glmm, lmm
from ..closedform.glmm import check_quadrature
from ..closedform.optimize import Control
from ..errors import (
    ArgumentError,
    ConvergenceWarning,
    HierpoolError,
    HierpoolWarning,
    boolean_argument,
    integer_argument,
    optional_boolean_argument,
)
from ..spec.design import error_contrast_problem
from ..spec.family import binary_outcome_per_level, family_spec, unidentified_term_message
from ..spec.transforms import caller_names
from . import host_processes
from . import plan as plan_module
from .conditioning import condition_batch
from .fit_ar1 import fit_ar1
from .fit_each import check_fixed_effects, fit_batch_each, fits_each, refuse_on_each
from .fit_glmm import fit_glmm, glmm_problems, separation_notes
from .fit_terms import empty_results, fit_terms, term_problems
from .near_exact import REASON as NEAR_EXACT_REASON
from .near_exact import VANISHED_REASON, near_exact_datasets, vanishing_residuals
from .other_minima import compiled_other_minima, stopped_rows_searched_on_host
from .plan import (
    QUICK_COMPILE_MAX_VALUES,
    chunks,
    fetch,
    host_chunk,
    host_fits,
    host_threads,
    mesh_sharding,
    place,
    plan_batch,
    progress_bar,
    thread_count,
)
from .results import BatchResult, BatchTerm, NanRows, Pieces, check_by_name, end_to_end
from .shared_design import (
    condition_shared,
    one_design_in_long_frame,
    read_responses,
    response_read_elsewhere,
    responses_long_frame,
    shared_design_plan,
)

CPU_CHUNK, ACCELERATOR_CHUNK = 128, 4096  # default datasets per compiled call
# a GLMM's datasets run PIRLS loops inside Newton's loop, in lockstep within a call: on a CPU small calls waste
# less (benchmarks/RESULTS.md, "Batch fitting for every model")
GLMM_CPU_CHUNK = 16


def _optimize_rows(stats, start, reml: bool, max_iterations: int, sigma_known: bool):
    """Minimize the criterion of every dataset of a chunk from its start (vmapped; pure)."""
    k = stats.ztz.shape[-1]

    def one(s, theta0):
        theta, value, newton_step, iterations, converged = minimize_one(
            s, theta0, reml=reml, max_iterations=max_iterations, sigma_known=sigma_known)
        return {"theta": canonical_theta(theta, k), "objective": value, "newton_step": newton_step,
                "iterations": iterations, "converged": converged}

    return jax.vmap(one)(stats, start)


def _optimize_chunk(reml: bool, max_iterations: int, sigma_known: bool, sharding):
    """The jitted optimizer of a chunk; over several devices, each runs the Newton loop of its own rows.

    Vmapped over a sharded axis, the while loop would step every device in lockstep
    (a collective per iteration, over the network between hosts) until the slowest
    dataset of the whole chunk converged.
    """
    function = partial(_optimize_rows, reml=reml, max_iterations=max_iterations, sigma_known=sigma_known)
    if sharding is not None:
        function = jax.shard_map(function, mesh=sharding.mesh, in_specs=(sharding.spec, sharding.spec),
                                 out_specs=sharding.spec, check_vma=False)
    return jax.jit(function)


@partial(jax.jit, static_argnames=("reml", "sigma_known"))
def _solve_chunk(theta, stats, reml: bool, sigma_known: bool):
    """Estimates, BLUPs and conditional variances of every dataset at its theta (vmapped; pure)."""
    return jax.vmap(partial(solution, reml=reml, sigma_known=sigma_known))(theta, stats)


#: (optimize, solve) program futures by chunk shape and settings (the last 8 used).
_COMPILED = ProgramCache()


def _programs(stats, reml: bool, max_iterations: int, sigma_known: bool, sharding, quick: bool = False,
              host: bool = False):
    """Futures of the (optimize, solve) programs for this chunk shape, kept in :data:`_COMPILED`.

    Two programs, not one: the solve program is traced while the optimizer
    compiles, and compiles while the first chunks are optimized.  ``quick``:
    compile without LLVM's optimization (:func:`hierpool.algebra.compiler_options.compiler_options`).
    ``host``: both run on the host (:func:`_optimize_on_host`, and :func:`hierpool.algebra.one_term.solution`
    over the chunk's leading axis), nothing is compiled, and the futures hold those functions.
    """
    if host:  # nothing to compile or to cache
        return (_done(partial(_optimize_on_host, reml=reml, max_iterations=max_iterations, sigma_known=sigma_known)),
                _done(partial(_solve_on_host, reml=reml, sigma_known=sigma_known)))

    def build():
        placed = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), stats)
        platform = jax.devices()[0].platform if sharding is None else sharding.mesh.devices.flat[0].platform
        k = stats.ztz.shape[-1]
        theta = jax.ShapeDtypeStruct((stats.n.shape[0], k * (k + 1) // 2), stats.ztz.dtype, sharding=sharding)
        optimize = compile_in_background(
            _optimize_chunk(reml, max_iterations, sigma_known, sharding).lower(placed, theta), platform, quick)
        solve = compile_in_background(_solve_chunk.lower(theta, placed, reml=reml, sigma_known=sigma_known), platform,
                                      quick)
        return optimize, solve

    return _COMPILED.get((shape_signature(stats), reml, max_iterations, sigma_known, sharding, quick), build)


def _optimize_on_host(stats, start: np.ndarray, *, reml: bool, max_iterations: int, sigma_known: bool,
                      other_minima: np.ndarray | None = None, scales: np.ndarray | None = None) -> dict:
    """:func:`_optimize_rows` on the host (:func:`hierpool.algebra.search.terms.search_statistics_on_host`;
    ``other_minima`` and ``scales`` its)."""
    return search_statistics_on_host(stats, start, reml, max_iterations, sigma_known, other_minima=other_minima,
                                     scales=scales)


def _solve_on_host(theta: np.ndarray, stats, *, reml: bool, sigma_known: bool):
    """:func:`_solve_chunk` on the host: the one-term solution of every dataset at once (its leading axis)."""
    with np.errstate(all="ignore"):  # a dataset whose theta is NaN gets NaN, as in the compiled program
        return solution(theta, stats, reml=reml, sigma_known=sigma_known)


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def _on_host(plan, float_type, sharding, quick: bool) -> bool:
    """Whether a one-term batch is optimized on the host rather than by a compiled program: on one CPU device, in
    float64, where its programs would compile quick (their run is short: a NumPy loop over the datasets still
    searching wastes nothing on those that have stopped, and compiles nothing: "compile only where compiling
    pays").  Any width: the host search's gradient is the written-out adjoint, whose cost does not grow with the
    parameters as the complex step's did (benchmarks/RESULTS.md, twentieth session)."""
    return host_fits(float_type, sharding) and quick


def _default_chunk(family) -> int:
    """Datasets per compiled call when ``chunk_size`` is not given (module notes)."""
    if jax.default_backend() != "cpu":
        return ACCELERATOR_CHUNK
    return GLMM_CPU_CHUNK if family is not None else CPU_CHUNK


def _diagonal_sd(covariances: np.ndarray) -> np.ndarray:
    """sqrt of the diagonals of a stack of covariance matrices (..., k, k) -> (..., k)."""
    return np.sqrt(np.maximum(np.diagonal(covariances, axis1=-2, axis2=-1), 0.0))


def _diagonal_sds(covariances: list, k: int) -> Pieces:
    """:func:`_diagonal_sd` of each of a list of stacks (ell_d, k, k), as one array's pieces."""
    flat, counts = end_to_end(covariances)
    return Pieces(_diagonal_sd(flat.reshape(-1, k, k)), np.concatenate([[0], np.cumsum(counts)]))


def fit_batch(
    formula: str,
    data,
    by: str = "dataset",
    *,
    family: str | None = None,
    link: str | None = None,
    correlation=None,
    reml: bool | None = None,
    dtype: str = "float64",
    chunk_size: int | None = None,
    polish: bool = True,
    progress: bool | None = None,
    max_iterations: int = MAX_ITERATIONS,
    weights=None,
    offset=None,
    se: str | None = None,
    nAGQ: int = 1,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
    adjacency=None,
    responses=None,
) -> BatchResult:
    """Fit one linear mixed model to many datasets at once.

    Parameters
    ----------
    formula : str
        An lme4-style formula, as ``hp.lmm`` takes it: one random-effect term
        (``"Reaction ~ Days + (Days | Subject)"``) or several, crossed or nested
        (``"diameter ~ 1 + (1 | plate) + (1 | sample)"``), of any width.
    data : DataFrame, or list or dict of DataFrames
        A long frame with a ``by`` column, or the datasets themselves (their
        list position or dict key becomes the ``by`` label; a tuple key, as
        ``dict(tuple(frame.groupby(["site", "arm"])))`` gives, labels its dataset
        as a tuple: select its row with ``result.objective.loc[[key]]``).  Datasets that share one design (a
        simulation study's or a bootstrap's: every dataset's rows the same but for the response, a long frame's
        each a run of rows) are fitted as ``responses=`` fits them, by matrix products with the design
        (:func:`~hierpool.batch.shared_design.one_design_in_long_frame` says when; the same rows, to rounding).
    by : str
        The column that names the dataset of each row.
    family : {None, "binomial", "bernoulli", "poisson", "negative_binomial"}
        None: the linear mixed model (``hp.lmm``).  Otherwise a GLMM fitted as ``hp.glmm`` fits it (the
        Laplace approximation, glmer's ``nAGQ = 1``; the response as ``hp.glmm`` reads it, e.g.
        ``cbind(successes, failures)``, with ``weights=`` the trials of proportions), per
        :mod:`hierpool.batch.fit_glmm`; ``objective`` is then -2 log L and ``sigma`` 1.  A negative
        binomial's shape is estimated with the rest (``result.shape``, a ``shape`` column of ``to_frame()``).
    link : str, optional
        The GLMM's link (``hp.glmm``'s ``link``).
    correlation : AR1, optional
        AR(1) residuals within each series, ``hp.ar1(group, time=None)`` or ``hp.car1(group, time)``, as
        ``hp.lmm``'s ``correlation=`` (each dataset's series its own; :mod:`hierpool.batch.fit_ar1`); the
        result's ``phi`` holds each dataset's estimate.  Not with ``family=``, ``weights=`` or ``se=``.
    reml : bool, optional
        REML (the default for a linear mixed model) or maximum likelihood; a GLMM is fitted by
        maximum likelihood (``reml=True`` is refused with a family, except with spatial terms:
        glmmTMB's REML, as ``hp.glmm``'s).
    dtype : {"float64", "float32"}
        float32 halves memory and is faster on GPUs; the criterion then agrees
        with float64 to about 1e-5 relative.  Linear mixed models with
        independent residuals only: a GLMM (``family=``) and AR(1) residuals
        (``correlation=``) are fitted in float64, and refuse float32 by name.
    chunk_size : int, optional
        Most datasets per compiled call, or per call of the host's optimizer (bounds
        memory; see the module notes).
        Default: 128 on a CPU (16 for a GLMM; 256 for a one-term or several-term batch
        fitted on the host, fewer where its datasets are large: module notes), 4096 on an
        accelerator.  The datasets of a compiled call iterate in lockstep until the
        slowest converges, so on a CPU, where a
        wide call buys no parallelism, small calls waste less (2,000 sleepstudy
        fits in calls of 125 and of 1,000: benchmarks/RESULTS.md, "Batch fitting,
        fourth session").
    polish : bool
        Refit, one by one with ``hp.lmm`` (``hp.glmm``), the datasets whose batched optimizer
        did not converge (rare: flat criteria near a zero variance).  Their rows
        then hold the single fit's results (``converged`` included) and have
        ``refit`` True, unless the single fit stopped at a higher criterion than the
        batch had reached: the row then keeps the batch's numbers, not converged, and
        its message says so.
    progress : bool, optional
        A progress bar over chunks (default: when stderr is a terminal).
    max_iterations : int
        Newton iterations per dataset (a host search of a vector term that stalls restarts once with as many more:
        :func:`hierpool.algebra.search.terms.search_on_host`).
    weights : str or array-like, optional
        Prior weights, as ``hp.lmm``'s (lmer's ``weights``: row i has residual
        variance sigma^2 / w_i, and the criterion includes -sum log w_i): a column
        name or, with ``data`` one DataFrame, one value per row of it.
    offset : str or array-like, optional
        A known term of the linear predictor, as ``hp.lmm``'s (lmer's ``offset``),
        added to any ``offset(expr)`` terms of the formula; a column name or one
        value per row.
    se : str, optional
        Column of known residual sds, as ``hp.lmm``'s (meta-analysis): row i has
        residual variance se_i^2, sigma is not estimated (1), and the random-effect
        sds are absolute.  Cannot be combined with ``weights``.  By REML a dataset with no more rows
        than fixed effects is refused in its row, as ``hp.lmm`` refuses it (no error contrast: the
        variances are not identified); by ML it is fitted.
    nAGQ : int
        A GLMM's quadrature, as ``hp.glmm``'s: 1 (the Laplace approximation) is batched; 0 (glmer's
        first stage alone) and adaptive Gauss-Hermite quadrature (> 1, one scalar term) fit each dataset
        with ``hp.glmm`` (their rows have ``refit`` True and say so).
    relmat, relmat_inverse : dict, optional
        A relationship matrix for one term's levels (the animal model), as ``hp.lmm``'s, shared by every
        dataset: built once, then each dataset fitted by ``hp.lmm`` on its sparse mixed-model equations
        (:mod:`hierpool.batch.fit_each`), or, for datasets that share their rows (traits of one herd), by the
        spectral specialisation (:mod:`hierpool.closedform.relmat_spectral`).  The relationship term's ``b``
        covers every level of A.  These
        fits (and spatial ones) are the single fits: ``chunk_size``, ``max_iterations``, ``dtype`` and
        ``correlation`` are refused with them, ``polish`` has nothing to do.
    adjacency : optional
        The neighbourhood graph(s) of the formula's ``car()`` spatial terms, as ``hp.lmm``'s and
        ``hp.glmm``'s, shared by every dataset: built once, then each dataset fitted by ``hp.lmm`` /
        ``hp.glmm`` (:mod:`hierpool.batch.fit_each`); the result's ``hyperparameters`` hold each fit's
        parameters, and a GLMM's ``reml=True`` is glmmTMB's REML, as ``hp.glmm``'s.
    responses : array-like (rows of ``data``, datasets) or DataFrame, optional
        Many responses on one design (lme4's ``refit(fit, newresp)``): ``data`` is then one dataset's rows, the
        design, and each column of ``responses`` one dataset's response (the formula's response, a column name);
        a DataFrame's column labels (with ``data``'s index) label the datasets, an array's positions do.  A linear
        mixed model with independent residuals (any random-effect terms) takes each dataset's statistics or systems
        as matrix products of the design with the responses, without the long frame of copies of ``data``; other
        models are fitted on that long frame (:mod:`hierpool.batch.shared_design`).  The design is checked once: one
        ``hp.lmm`` refuses is refused for the call, a response it refuses in that response's row.  Not with ``by``.
        A linear mixed model's missing responses (at rows the design keeps) are refused: a dataset with rows of its
        own is a long frame's; the models fitted on the long frame drop a response's missing rows for its dataset
        alone, as the long frame does.  A response X fits to rounding (noise-free data) is fitted alone by
        ``hp.lmm``, whose outcome is its row.  The datasets' labels are named as a DataFrame's columns are (or
        ``dataset``).

    Returns
    -------
    BatchResult
        ``fixef``, ``fixef_se``, ``varcorr``, ``ranef``, ``objective``,
        ``converged``, ``refit``, ``is_singular``, ``messages``, ``to_frame()``.

    Notes
    -----
    Each dataset's criterion is the profiled REML/ML criterion of
    Bates et al. (2015), computed from its sufficient statistics; results equal
    those of ``hp.lmm`` on each dataset (the tests assert the criterion to 1e-11
    relative and the fixed effects to 1e-6, with no dataset refitted), weights and
    offsets included.  Each dataset's algebra works on y - offset - X beta0, beta0
    its weighted least-squares fit (:mod:`hierpool.algebra.statistics`), so a large
    common location of y costs no digits.  Known residual sds enter the statistics as
    the weights 1 / se^2 with sigma fixed at 1 (``hp.lmm``'s one-term criterion with
    ``se=``); ``sigma`` is then 1, ``varcorr`` has no ``Residual`` rows, as ``hp.lmm``'s, and
    ``to_frame()`` no ``sigma`` column (``BatchResult.sigma_known``).
    A linear model's dataset whose response X fits to rounding (noise-free data, or a response varying at its
    rounding) has a criterion made of rounding noise, which the batch's sums round otherwise than the single fit's:
    it is fitted alone by ``hp.lmm``, whose outcome, a fit or its refusal, is its row
    (:mod:`hierpool.batch.near_exact`); so is one whose fit's residual sd is within 1e-5 of what X leaves of its
    response, or near the rounding of the terms it is computed from (noise-free data, which ``hp.lmm`` refuses: the
    fixed and random effects reproduce it).
    With several random-effect terms each dataset's criterion is the general blocked one
    (:mod:`hierpool.batch.fit_terms`), its systems built for the whole batch at once and padded per
    bucket of level counts; the tests assert it equal to ``hp.lmm``'s per dataset to 1e-8 relative.
    ``theta`` then lists the terms in the batch's order (``result.terms``: the long frame's, by level
    count), which may differ from ``hp.lmm``'s order on a dataset whose level counts rank otherwise.
    On glibc (Linux) the first call frees one unwritten block of just under 32 MiB, which raises the C
    allocator's mmap and trim thresholds process-wide by glibc's own dynamic rule, as freeing any such array would
    (:mod:`hierpool.algebra.host_allocator`): freed memory up to 64 MiB a heap is then kept for reuse.
    """
    if dtype not in ("float64", "float32"):
        raise ArgumentError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    check_by_name(by, "fit_batch")
    check_quadrature(nAGQ)
    if family is None and (nAGQ != 1 or link is not None):
        raise ArgumentError(f"{'link=' if link is not None else f'nAGQ={nAGQ}'} needs family= (a GLMM)")
    raise_malloc_thresholds()  # the host algebra's temporaries reused, not faulted in afresh (its module notes)
    progress = optional_boolean_argument("progress", progress)
    polish = boolean_argument("polish", polish)
    shared = None  # many responses on one design: its plan (one term, Gaussian), or their long frame
    if responses is not None:
        read = read_responses(formula, data, responses, by, gaussian=family is None,
                              binomial=family is not None and family_spec(family, link).name == "binomial")
        if family is None and correlation is None and not fits_each(formula, relmat, relmat_inverse, adjacency) \
                and not response_read_elsewhere(formula, read.column, weights, offset, se):
            shared = shared_design_plan(formula, data, read, "fit_batch", "hp.lmm", term_problems, weights=weights,
                                        offset=offset, se=se)
        else:
            data, by, weights, offset = responses_long_frame(data, read, weights, offset)
    elif family is None and correlation is None and not fits_each(formula, relmat, relmat_inverse, adjacency):
        shared = _shared_design_of_long_frame(formula, data, by, weights, offset, se)
    if fits_each(formula, relmat, relmat_inverse, adjacency):  # dataset by dataset (fit_each's module notes)
        refuse_on_each(correlation=(correlation, None), dtype=(dtype, "float64"), chunk_size=(chunk_size, None),
                       max_iterations=(max_iterations, MAX_ITERATIONS))
        return fit_batch_each(formula, data, by, family=family, link=link, reml=reml, nAGQ=nAGQ, weights=weights,
                              offset=offset, se=se, relmat=relmat, relmat_inverse=relmat_inverse,
                              adjacency=adjacency, progress=progress)
    if chunk_size is not None:
        chunk_size = integer_argument("chunk_size", chunk_size)
    max_iterations = integer_argument("max_iterations", max_iterations)
    reml = None if reml is None else boolean_argument("reml", reml)
    spec = None
    if family is not None:
        spec = family_spec(family, link)
        if reml:
            raise ArgumentError("reml=True with family=: a GLMM is fitted by maximum likelihood (glmer's Laplace)")
        if se is not None:
            raise ArgumentError("se= gives a Gaussian model's known residual sds: not with family=")
        if dtype != "float64":
            # the Hessian's differences of the exact gradient and PIRLS's 1e-12 tolerance need float64's digits
            raise ArgumentError(f"dtype={dtype!r} with family=: a GLMM batch is fitted in float64")
    if correlation is not None:
        if family is not None:
            raise ArgumentError("correlation= with family=: AR(1) residuals are for the linear mixed model")
        if dtype != "float64":
            raise ArgumentError(f"dtype={dtype!r} with correlation=: an AR(1) batch is fitted in float64")
    reml = family is None if reml is None else reml
    plan = shared or plan_batch(formula, data, by, "fit_batch", "hp.glmm" if spec else "hp.lmm", weights=weights,
                                offset=offset, se=se, one_term=False, family=spec)
    if spec is None and reml:
        plan = _refused_without_error_contrasts(plan)
    if spec is not None:
        _warn_if_unidentified(plan, spec.name)
    if spec is not None and nAGQ != 1:
        # nAGQ 0 and adaptive quadrature have no batched form: every dataset fitted alone by hp.glmm, into the
        # batch's rows (the refit of _result), after the model is checked once on the long frame
        check_quadrature(nAGQ, terms=plan.design.terms)
        messages = glmm_problems(plan)  # hp.glmm's checks, and separation: as the batched path's
        alone = {index: f"nAGQ={nAGQ}: fitted alone (no batched form)"
                 for index in range(plan.n_datasets) if not messages[index]}
        out = empty_results(plan, messages, alone) | {"is_singular": np.zeros(plan.n_datasets, bool)}
        if spec.name == "negative_binomial":
            out["shape"] = np.full(plan.n_datasets, np.nan)  # each refit's
        return _result(plan, out, formula, False, polish, partial(glmm, family=family, link=link, nAGQ=nAGQ),
                       progress=progress)
    # a dataset whose random-effect or fixed-effect columns are far from centred or unit scale is searched on its
    # columns centred and scaled (batch.conditioning: hp.lmm's rule and transform, which hp.lmm applies to the
    # random-effect columns); the results are mapped back to the user's below
    conditioning = (condition_shared(plan, reml=reml, linear=spec is None) if shared is not None
                    else condition_batch(plan, reml=spec is None and reml, linear=spec is None))
    fitted = plan if conditioning is None else conditioning.plan
    sharding = mesh_sharding()
    # compiled programs: Newton's m x m systems, one per dataset of a call, go to a batched LAPACK call, serial on a
    # CPU where it may split (plan.thread_count); several terms and AR(1) always run serially.  A path that runs on
    # the host sets its own threads (NumPy has no such split)
    newton_size = sum(t.k * (t.k + 1) // 2 for t in plan.design.terms) + (
        plan.design.p + (spec.name == "negative_binomial") if spec is not None else 0)
    workers = thread_count(sharding, serial=len(plan.design.terms) > 1 or correlation is not None,
                           newton_systems=(newton_size, chunk_size or _default_chunk(spec)))
    settings = dict(reml=reml, float_type=np.float64 if dtype == "float64" else np.float32, chunk_size=chunk_size,
                    progress=progress, max_iterations=max_iterations, sharding=sharding, workers=workers)
    if spec is not None or len(plan.design.terms) > 1 or correlation is not None:
        settings["default_chunk"] = _default_chunk(spec)  # the compiled programs' default; a host path picks its own
    # a response X fits to rounding is fitted alone (batch.near_exact): a shared design's are its plan's, a long
    # frame's linear models find theirs from each dataset's residual from X's fit, computed once, here, for the check
    # and for the path's statistics or start.  (Known residual sds leave no variance to estimate from that residual:
    # its rounding moves no criterion.)
    alone = plan.fitted_alone if shared is not None else {}
    if spec is None and shared is None:
        shifts = settings["shifts"] = fitted.location_shifts()
        if not fitted.design.sigma_known:
            near = near_exact_datasets(fitted.dataset, fitted.design.y_less_offset, shifts[1],
                                       fitted.design.weights, fitted.n_datasets)
            alone = dict.fromkeys(np.flatnonzero(near).tolist(), NEAR_EXACT_REASON)
    if spec is not None:
        settings.pop("reml")
        # a negative binomial's shape is estimated (the 1.0 only makes the family; the batch starts from moments)
        out = fit_glmm(fitted, make_family(spec, shape=1.0 if spec.name == "negative_binomial" else None), **settings)
        fitter = partial(glmm, family=family, link=link)
    elif correlation is not None:
        out = fit_ar1(fitted, correlation, **settings)
        fitter = partial(lmm, reml=reml, correlation=correlation)
    elif len(plan.design.terms) == 1:
        out = _fit_one_term(fitted, **settings)
        fitter = partial(lmm, reml=reml)
    else:
        out = fit_terms(fitted, **settings)
        fitter = partial(lmm, reml=reml)
    if conditioning is not None:
        out = conditioning.to_user(out)
    if spec is None and not plan.design.sigma_known:
        # a fit at the limit of a response the model reproduces exactly: hp.lmm's outcome, its refusal (near_exact)
        left = plan.left_by_x_squares(settings.get("shifts"))
        vanished = vanishing_residuals(out["sigma"], np.asarray(plan.n_obs), left, plan.magnitude_squares(out["beta"]))
        alone = alone | {int(index): VANISHED_REASON for index in np.flatnonzero(vanished) if index not in alone}
    for index, reason in alone.items():  # (the batch's row set aside: its numbers are no fit's)
        if out["messages"][index]:
            continue  # (refused: the batch's reason, or the single fit's)
        _blank(out, index)
        out["attempted"][index] = False
        out["alone"][index] = reason
    return _result(plan, out, formula, reml, polish, fitter)


def _refused_without_error_contrasts(plan):
    """``plan`` with the datasets that REML cannot fit with known residual sds refused in their rows, in hp.lmm's
    words (:func:`~hierpool.spec.design.error_contrast_problem`: no more rows than fixed effects leave no error
    contrast, and the criterion is flat in theta, where the batched search's stop was decided by rounding).  Their
    count checks find nothing (known sds need no residual rows: :func:`~hierpool.batch.plan.fixed_part_problems`,
    which ML fits), so the refusal is the plan's (:meth:`~hierpool.batch.plan.BatchPlan.refused`)."""
    n_obs = np.asarray(plan.n_obs)
    rows = np.flatnonzero(n_obs <= plan.design.p) if plan.design.sigma_known else ()
    if not len(rows):
        return plan
    refusals = list(plan.refusals or [""] * plan.n_datasets)
    for index in rows:  # (a refusal already there, an empty dataset's, stays)
        refusals[index] = refusals[index] or error_contrast_problem(plan.design.p, int(n_obs[index]), True, True)
    return dataclasses.replace(plan, refusals=tuple(refusals))


def _shared_design_of_long_frame(formula: str, data, by: str, weights, offset, se):
    """The :class:`~hierpool.batch.shared_design.SharedDesignPlan` of a long frame whose datasets share one design
    (:func:`~hierpool.batch.shared_design.one_design_in_long_frame`: a simulation study's or a bootstrap's), else
    None.  Taken only where every dataset is fitted: a design or a response the single fit refuses is left to the
    long frame, whose refusals (in each dataset's row, or of the call) are the batch's own.  A response X fits to
    rounding is fitted alone by ``hp.lmm``, as with ``responses=``
    (:func:`~hierpool.batch.near_exact.near_exact_responses`)."""
    found = one_design_in_long_frame(formula, data, by, weights, offset, se)
    if found is None:
        return None
    design, responses = found
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no row is missing: any warning is the long frame's to give)
            plan = shared_design_plan(formula, design, responses, "fit_batch", "hp.lmm", term_problems,
                                      weights=weights, offset=offset, se=se)
    except (HierpoolError, Warning):
        return None
    return None if any(plan.refusals) else plan


def _fit_one_term(plan, *, reml: bool, float_type, chunk_size: int | None, progress, max_iterations: int, sharding,
                  workers: int, shifts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The one-term specialisation: Newton's method on each dataset's sufficient statistics (module notes).
    ``shifts``: the plan's :meth:`~hierpool.batch.plan.BatchPlan.location_shifts`, where the caller has them.

    Returns :func:`hierpool.batch.fit_terms.fit_terms`'s per-dataset dict, for one term.
    """
    design, term, n_datasets, n_levels = plan.design, plan.term, plan.n_datasets, plan.n_levels
    p, k, sigma_known = design.p, term.k, design.sigma_known
    n_devices = 1 if sharding is None else len(jax.devices())

    # per-dataset results, NaN until a fit fills them (a dataset that cannot be fitted stays NaN)
    out = {name: np.full((n_datasets,) + shape, np.nan) for name, shape in
           (("theta", (k * (k + 1) // 2,)), ("objective", ()), ("beta", (p,)), ("vcov", (p, p)), ("sigma", ()),
            ("newton_step", ()))}
    out["converged"] = np.zeros(n_datasets, dtype=bool)
    # a small batch runs for less time than LLVM takes to optimize its programs
    members_by_bucket = plan.bucket_members()
    widths = np.zeros(n_datasets, dtype=np.int64)  # each dataset's bucket: a chunk's padded levels fit in its rows
    for bucket, members in members_by_bucket:
        widths[members] = bucket
    factor_rows = NanRows(np.full(n_datasets, k), (k,), dtype=float_type)
    b_rows, cond_var_rows = (NanRows(n_levels, shape, widths, dtype=float_type) for shape in ((k,), (k, k)))
    values = sum(math.prod(leaf.shape) for bucket, members in members_by_bucket
                 for leaf in jax.tree_util.tree_leaves(plan.statistics_shape(bucket, len(members))))
    quick = values <= QUICK_COMPILE_MAX_VALUES
    host = _on_host(plan, float_type, sharding, quick)
    if host:
        workers = thread_count(None)  # NumPy: no jaxlib LAPACK split to guard against (plan.thread_count)
        if chunk_size is None:  # the several-term host search's temporaries, for one term
            chunk_size = host_chunk(host_bytes((k,), (int(n_levels.max()),), p))
    chunk_size = chunk_size or _default_chunk(None)
    if not host and sharding is None and jax.default_backend() != "cpu":
        workers = plan_module.ACCELERATOR_THREADS  # chunks in flight on one accelerator (its notes)
    # chunk shapes follow from the level counts alone: start compiling (in the background) before
    # the statistics are computed, and before the threads start (they would each compile)
    # (this call holds its programs: the cache may drop them while it runs, but they are not compiled twice)
    sizes, programs = {}, {}
    for bucket, members in members_by_bucket:
        sizes[bucket] = min(chunk_size, math.ceil(len(members) / workers))
        rows = chunks(bucket, members[:1], sizes[bucket], n_devices)[0].index.size
        programs[bucket] = _programs(plan.statistics_shape(bucket, rows, float_type), reml, max_iterations,
                                     sigma_known, sharding, quick, host)
    buckets, messages = plan.buckets(float_type, shifts)
    jobs = []
    for bucket, usable, stats in buckets:
        for chunk in chunks(bucket, usable, sizes[bucket], n_devices):
            # a compiled program has one shape, so its chunks are padded; the host's are not (a padded row would be
            # a whole fit, wasted)
            chunk_stats = stats.take(chunk.index[:chunk.count] if host else chunk.index)
            jobs.append((chunk.members, chunk_stats, chunk.count, programs[bucket]))

    # prior weights (known sds) can give a scalar term's criterion two minima (_from_scan); the scan is not run
    # without them, where the sweep found none (120 unweighted datasets) and it would cost time on every batch
    # (benchmarks/RESULTS.md, thirtieth session)
    scan = k == 1 and design.weights is not None
    # uneven prior weights (known sds): a vector term's criterion can have a minimum inside and one on the boundary,
    # searched from both sides as hp.lmm does (algebra.search.terms.search_on_host's other_minima; compiled:
    # other_minima.compiled_other_minima)
    uneven = plan.uneven_weights() if k > 1 else None
    scales = plan.probe_scales() if uneven is not None and uneven.any() else None

    # after a compiled chunk, on the host: a variance at 1e-9 that is lme4's 0 (the host search ends there itself),
    # and a search that stopped short searched again by the host search (not with float32 statistics, or the scan's
    # two minima: hp.lmm's refits those); their rows gathered over the chunks and finished at once, so that the host
    # criterion's fixed cost per call is paid once, not per chunk (_finished_on_host)
    retried, unfinished = not host and float_type == np.float64 and not scan, []

    # known residual sds: each dataset starts at the identity in their units times its between-study spread's size
    sizes = plan.known_sds_sizes((plan.location_shifts() if shifts is None else shifts)[1]) if sigma_known else None

    def run(job):
        members, host_chunk_stats, count, (optimize, solve) = job
        # (the start here, in the chunk's thread: with chunks in flight it overlaps another chunk's programs)
        chunk_sizes = None if sizes is None else np.resize(sizes[members], host_chunk_stats.n.shape[0])  # (padded)
        start = host_start = moment_start(host_chunk_stats, sigma_known, chunk_sizes).astype(float_type)
        chunk, start = place((host_chunk_stats, start), sharding)  # on the host (no sharding) the arrays as they are
        rows = None
        if uneven is not None and uneven[members].any():
            rows = np.zeros(len(start), dtype=bool)  # a compiled chunk's padded rows (results cut below) are not
            rows[:count] = uneven[members]           # searched again
        units = None if rows is None else np.resize(scales[members], (len(start), scales.shape[1]))  # (padded)
        if rows is not None and host:
            optimized = optimize.result()(chunk, start, other_minima=rows, scales=units)
        else:
            optimized = optimize.result()(chunk, start)
        if rows is not None and not host:
            optimized = compiled_other_minima(optimized, lambda index: (host_chunk_stats.take(index),),
                                              optimize.result(), rows, (k,), float_type, sharding, units)
        if scan:  # a scalar term's criterion may have two minima in theta: the search again from the lower
            optimized = _from_scan(optimized, host_chunk_stats, optimize.result(), chunk, reml, sigma_known,
                                   float_type, sharding)
        if not host:
            found = fetch(optimized)
            later = near_boundary(found["theta"][:count], found["objective"][:count], (k,),
                                  boundary_tolerance(host_chunk_stats.log_weights[:count], host_chunk_stats.n[:count],
                                                     sigma_known))
            if retried:
                later |= ~np.asarray(found["converged"][:count], dtype=bool)
            later = np.flatnonzero(later)
            if later.size:
                unfinished.append((members[later], host_chunk_stats.take(later), host_start[later]))
        solved = solve.result()(optimized["theta"], chunk)  # a Solution per dataset (one term)
        result = {**optimized, "beta": solved.beta, "vcov": solved.vcov_beta, "sigma": solved.sigma,
                  "b": solved.b[0], "cond_var": solved.cond_var[0], "factor": solved.factors[0]}
        return jax.tree_util.tree_map(lambda a: a[:count], fetch(result))

    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(progress, n_datasets, "fit_batch") as bar:
        for job, result in zip(jobs, pool.map(run, jobs)):
            members = job[0]
            bar.update(len(members))
            for name in ("theta", "objective", "beta", "vcov", "sigma", "converged", "newton_step"):
                out[name][members] = result[name]
            # (each dataset's entries are views of these blocks: its own levels of its bucket's padded ones)
            factor_rows.write(members, result["factor"])
            b_rows.write(members, result["b"])
            cond_var_rows.write(members, result["cond_var"])
    for members, stats, start in _by_width(unfinished):
        _finished_on_host(out, members, stats, start, (factor_rows, b_rows, cond_var_rows), float_type=float_type,
                          retried=retried, reml=reml, max_iterations=max_iterations, sigma_known=sigma_known,
                          uneven=uneven, scales=scales)
    # hp.lmm's rule and tolerance (lme4's isSingular), on every dataset's (canonical, diagonal >= 0) theta
    out["is_singular"] = fitted_singular(out["objective"], out["theta"], (k,), Control.singular_tol)
    attempted = np.array([not message for message in messages])
    return out | {"factors": [factor_rows], "b": [b_rows], "cond_var": [cond_var_rows], "messages": messages, "alone": {},
                  "attempted": attempted}


def _by_width(parts: list) -> list:
    """``parts`` ((members, statistics, start) of chunks), those of one padded level count joined, in the datasets'
    order (the chunks' threads end in any order): one per width."""
    widths = {}
    for part in parts:
        widths.setdefault(part[1].ztz.shape[1], []).append(part)
    joined = []
    for group in widths.values():
        members = np.concatenate([p[0] for p in group])
        order = np.argsort(members)
        stats = jax.tree_util.tree_map(lambda *arrays, order=order: np.concatenate(arrays)[order], *[p[1] for p in group])
        joined.append((members[order], stats, np.concatenate([p[2] for p in group])[order]))
    return joined


def _finished_on_host(out: dict, members: np.ndarray, stats, start: np.ndarray, rows: tuple, *, float_type,
                      retried: bool, reml: bool, max_iterations: int, sigma_known: bool, uneven, scales) -> None:
    """The compiled searches of the datasets ``members`` (their ``stats`` and ``start``: host arrays) finished on the
    host, as the host search ends: onto lme4's boundary where a variance stopped within its tolerance of 0
    (:func:`~hierpool.algebra.search.terms.systems_onto_boundary`), then, where ``retried``, each that stopped short
    searched again from its start (:func:`~hierpool.batch.other_minima.stopped_rows_searched_on_host`).  The rows
    that moved are solved on the host at their new theta and written into ``out`` and ``rows`` (the factors',
    BLUPs' and conditional variances' :class:`NanRows`), over the compiled solve's at the point the search stopped."""
    before = {name: out[name][members] for name in ("theta", "objective", "newton_step", "converged")}
    found = {**before, "theta": before["theta"].astype(float_type), "objective": before["objective"].astype(float_type)}
    found = systems_onto_boundary(found, statistics_systems(stats, sigma_known), stats.n, reml)
    if retried:
        # (uneven prior weights: each dataset also searched from its other minima's starts, as in its chunk)
        extra = {} if scales is None else {"other_minima": uneven[members], "scales": scales[members]}
        found = stopped_rows_searched_on_host(found, len(members), lambda stopped: search_statistics_on_host(
            stats.take(stopped), start[stopped], reml, max_iterations, sigma_known,
            **{name: value[stopped] for name, value in extra.items()}))

    def differs(a, b):  # (NaN where it was NaN has not moved)
        return (a != b) & ~(np.isnan(a) & np.isnan(b))

    moved = np.flatnonzero(np.any(differs(found["theta"], before["theta"]), axis=1)
                           | differs(found["objective"], before["objective"]) | (found["converged"] != before["converged"]))
    if not moved.size:
        return
    solved = _solve_on_host(found["theta"][moved], stats.take(moved), reml=reml, sigma_known=sigma_known)
    chosen = members[moved]
    for name in ("theta", "objective", "newton_step", "converged"):
        out[name][chosen] = found[name][moved]
    for name, value in (("beta", solved.beta), ("vcov", solved.vcov_beta), ("sigma", solved.sigma)):
        out[name][chosen] = value
    for nan_rows, value in zip(rows, (solved.factors[0], solved.b[0], solved.cond_var[0])):
        nan_rows.write(chosen, np.asarray(value))


def _from_scan(optimized, stats, optimize, chunk, reml: bool, sigma_known: bool, float_type, sharding):
    """``optimized`` (a chunk's search), with the search run again from the lowest point of the scalar term's scan
    where that is lower than a dataset's optimum (:func:`~hierpool.algebra.one_term.scan_restarts`): the rows that
    then end lower.  (3 of 60 datasets with weights 10^U(-2, 2), 12 of 60 at 10^U(-4, 4), ML, ended 0.5-54 above
    ``hp.lmm``'s fit.)  The scan costs 32 evaluations of the one-term criterion per dataset, on the host."""
    found = fetch(optimized)
    objective = np.asarray(found["objective"], dtype=float)
    # in theta's units: the search's theta is over the prior weights' (known sds') unit already (batch.conditioning)
    restart, theta = one_term.scan_restarts(one_term.scan_values(stats, reml, sigma_known), objective)
    if not restart.any():
        return optimized
    start = np.where(restart[:, None], theta, found["theta"]).astype(float_type)
    again = fetch(optimize(chunk, place(start, sharding)))
    lower = np.asarray(again["objective"], dtype=float) < objective
    return {name: np.where(lower.reshape((-1,) + (1,) * (np.ndim(value) - 1)), again[name], value)
            for name, value in found.items()}


def _warn_if_unidentified(plan, family_name: str) -> None:
    """hp.glmm's warning (:func:`hierpool.spec.family.unidentified_term_message`), once per term, where in some
    datasets every level of the term holds one 0/1 outcome, those it fits counted (the fits go on, as hp.glmm's)."""
    fitted = np.array([not reason for reason in plan.refusals]) if plan.refusals else np.ones(plan.n_datasets, bool)
    for term in plan.design.terms:
        flagged = fitted & binary_outcome_per_level(family_name, plan.design.row_weights, term.index, term.z,
                                                    plan.dataset, plan.n_datasets)
        if flagged.any():
            warnings.warn(f"{unidentified_term_message(term.label, term.group)} (in {int(flagged.sum())} of "
                          f"{plan.n_datasets} datasets)", HierpoolWarning, stacklevel=3)


def _refit(plan, index: int, formula: str, fitter, out: dict, values=None) -> str:
    """Fit dataset ``index`` alone (``fitter``: ``hp.lmm`` or ``hp.glmm``) into ``out``'s rows; what to add to its
    message.  A dataset with columns zero in it (:attr:`~hierpool.batch.plan.BatchPlan.zero_columns`) is fitted
    without them, NaN in their places.  ``values``: :func:`refit_values`' outcome, where it was computed already
    (in a worker process)."""
    if values is None:
        values = refit_values(*_refit_arguments(plan, index, formula, fitter))
    if isinstance(values, str):
        return values
    for name, value in values.items():
        if name in ("factors", "b", "cond_var"):
            for t, term_value in enumerate(value):
                out[name][t][index] = term_value
        elif name in out:
            out[name][index] = value
    return f"refitted by {'hp.glmm' if fitter.func is glmm else 'hp.lmm'}"


def _refit_arguments(plan, index: int, formula: str, fitter) -> tuple:
    """:func:`refit_values`' arguments for dataset ``index``: taken here, where the plan is."""
    frame, arguments = plan.dataset_frame(index)
    dropped = plan.zero_columns.get(index, ())  # (such a dataset is refitted only for them: _result)
    terms = [(t.group, t.coef_names) for t in plan.design.terms]
    return fitter, formula, frame, arguments, tuple(plan.design.fixed_names), tuple(dropped), terms


def refit_values(fitter, formula: str, frame: pd.DataFrame, arguments: dict, fixed_names, dropped,
                 terms) -> dict | str:
    """One dataset's single fit (``fitter``: ``hp.lmm`` or ``hp.glmm``) as the batch's row values (its columns
    ``fixed_names`` by position, those ``dropped`` NaN; its terms in the batch's order ``terms``), or the note of its
    failure.  Pure in its arguments, so that a worker process can run it (:func:`_result`)."""
    name = "hp.glmm" if fitter.func is glmm else "hp.lmm"
    p = len(fixed_names)
    kept = [j for j in range(p) if j not in dropped]
    try:
        with warnings.catch_warnings():  # a singular refit is reported in is_singular
            warnings.simplefilter("ignore", HierpoolWarning)
            single = fitter(formula, frame, **arguments)
        # its row holds the batch's columns, by position, but those zero in the dataset (plan.zero_columns: NaN)
        check_fixed_effects(single, [fixed_names[j] for j in kept])
        # hp.lmm orders a dataset's terms by its own level counts: match them to the batch's
        position = {(t.group, t.coef_names): j for j, t in enumerate(single.design.terms)}
        order = [position[key] for key in terms]
    except Exception as exc:  # noqa: BLE001 - reported in the dataset's row, never raised for the batch
        return f"refit by {name} failed: {type(exc).__name__}: {exc}"
    ks = [t.k for t in single.design.terms]
    pieces = np.split(np.asarray(single.theta, dtype=float), np.cumsum([k * (k + 1) // 2 for k in ks])[:-1])
    if name == "hp.glmm":  # -2 log L, unit scale, the modes' b and the conditional variances at the mode
        solution, objective, sigma, b = single.solution_at_mode, single.optimum.deviance, 1.0, single.optimum.mode.b
    else:
        solution, objective, sigma = single.solution, single.objective, single.sigma
        b = solution.b
    beta, vcov = np.full(p, np.nan), np.full((p, p), np.nan)
    beta[kept], vcov[np.ix_(kept, kept)] = single.fixef.to_numpy(), single.vcov.to_numpy()
    values = {"theta": np.concatenate([pieces[j] for j in order]), "objective": objective,
              "converged": single.converged, "beta": beta, "vcov": vcov, "sigma": sigma,
              "is_singular": single.is_singular,
              "factors": [np.asarray(solution.factors[j]) for j in order], "b": [np.asarray(b[j]) for j in order],
              "cond_var": [np.asarray(solution.cond_var[j]) for j in order]}
    if getattr(single, "phi", None) is not None:
        values["phi"] = single.phi
    if getattr(single, "shape", None) is not None:
        values["shape"] = single.shape
    return values


_ROW_ARRAYS = ("theta", "objective", "converged", "beta", "vcov", "sigma", "is_singular", "phi", "shape")
_ROW_LISTS = ("factors", "b", "cond_var")


def _row(out: dict, index: int) -> dict:
    """Dataset ``index``'s results in ``out`` (copies), to restore with :func:`_restore`."""
    row = {name: np.copy(out[name][index]) for name in _ROW_ARRAYS if name in out}
    row.update({name: [np.copy(per_term[index]) for per_term in out[name]] for name in _ROW_LISTS})
    return row


def _restore(out: dict, index: int, row: dict) -> None:
    for name in _ROW_ARRAYS:
        if name in row:
            out[name][index] = row[name]
    for name in _ROW_LISTS:
        for per_term, value in zip(out[name], row[name]):
            per_term[index] = value


def _blank(out: dict, index: int) -> None:
    """Dataset ``index``'s results in ``out`` as a failed fit's: NaN, not converged, not singular."""
    for name in _ROW_ARRAYS:
        if name in out:
            out[name][index] = False if out[name].dtype == bool else np.nan
    for name in _ROW_LISTS:
        for per_term in out[name]:
            per_term[index] = np.full(np.shape(per_term[index]), np.nan)


def _polish(plan, index: int, formula: str, fitter, out: dict, messages: list, refitted: np.ndarray,
            values=None) -> None:
    """Refit dataset ``index`` alone into ``out`` (:func:`_refit`; ``values``: its outcome, computed already),
    unless that stops higher than the batch had got."""
    batch_row = _row(out, index)
    note = _refit(plan, index, formula, fitter, out, values)
    if (note.startswith("refitted") and np.isfinite(batch_row["objective"])
            and out["objective"][index] > batch_row["objective"] + 1e-8 * abs(batch_row["objective"])):
        # the lone fit stopped higher than where the batch had got to (a local optimum of its own): a lower
        # criterion is not replaced by a higher one; the row keeps the batch's numbers, not converged
        # (digits enough to show the difference, which may be in the sixth)
        note = (f"the refit stopped at a higher criterion ({float(out['objective'][index]):.10g} > "
                f"{float(batch_row['objective']):.10g}): the batch's estimates kept")
        _restore(out, index, batch_row)
    elif note.startswith("refit by") and not out["converged"][index]:
        # the batch's search stopped short and the single fit raises: the row holds no estimates, as the single fit
        # gives none (it kept the stopped search's numbers, which hp.bootstrap counted as a replicate; a Poisson
        # count of 1e20 kept an intercept of 6.7: the forty-third session's probe)
        _blank(out, index)
    refitted[index] = note.startswith("refitted")
    messages[index] += "; " + note


#: Datasets fitted alone (nAGQ 0 or adaptive quadrature, refits) from which they are fitted in worker processes too
#: (:mod:`hierpool.batch.host_processes`, a core each): a worker's start costs about a few datasets' fits.
REFIT_PROCESS_MIN = 8


def _result(plan, out: dict, formula: str, reml: bool, polish: bool, fitter, progress=False) -> BatchResult:
    """Polish what the batch could not fit, then the :class:`BatchResult` (``progress``: a bar over the datasets
    fitted alone)."""
    design, n_datasets = plan.design, plan.n_datasets
    messages = list(out["messages"])
    refitted = np.zeros(n_datasets, dtype=bool)  # rows whose numbers are hp.lmm's, not the batched optimizer's
    to_polish = []
    for index in np.flatnonzero(out["attempted"] & ~out["converged"]):
        messages[index] = out.get("reasons", {}).get(index) or \
            f"batched optimizer stopped with Newton step {float(out['newton_step'][index]):.1e}"
        to_polish.append(index)
    for index, reason in out["alone"].items():
        messages[index] = reason
    # a dataset refused for columns zero in it alone (a factor's level it lacks): its single fit, without them
    zero_alone = plan.alone_for_levels(messages)
    for index in zero_alone:
        messages[index] = plan.alone_note(index, "fitted")
    refits = list(out["alone"]) + zero_alone + (to_polish if polish else [])
    # a formula that reads the caller's names (np.sin, a user's function) is fitted here, in this thread
    outcomes = host_processes.whole_runs(
        refits, lambda index: (refit_values, _refit_arguments(plan, index, formula, fitter)),
        threads=host_threads(), minimum=REFIT_PROCESS_MIN, preload=(refit_values.__module__,),
        allowed=len(refits) >= REFIT_PROCESS_MIN and not caller_names(formula, plan.frame.columns))
    with progress_bar(progress if len(refits) > 1 else False, len(refits), "fit_batch") as bar:
        for index, values in zip(refits, outcomes):
            _polish(plan, index, formula, fitter, out, messages, refitted, values)
            bar.update(1)
    noted = {}  # a kept fit's warning (AR(1): phi at its edge), in its row, unless the row was fitted alone
    for index, note in out.get("notes", {}).items():
        if index not in out["alone"] and not refitted[index]:
            messages[index] = f"{messages[index]}; {note}" if messages[index] else note
            noted[note] = noted.get(note, 0) + 1
    for note, count in noted.items():  # the single fit warns of each; a batch once, counting them
        warnings.warn(f"{count} of {n_datasets} datasets: {note} (each one's message says so)", ConvergenceWarning,
                      stacklevel=3)
    if design.family is not None:  # hp.glmm's warning where X separates the outcomes, in the dataset's row
        notes = separation_notes(plan, out["beta"])
        for index, note in notes.items():
            messages[index] = f"{messages[index]}; {note}" if messages[index] else note
        if notes:
            warnings.warn(f"complete separation in {len(notes)} of {n_datasets} datasets: their fixed effects there "
                          "are where the optimizer stopped (each row's message names the columns)", HierpoolWarning,
                          stacklevel=3)
    sigma = out["sigma"]
    terms = []
    for t, term in enumerate(design.terms):
        factor = end_to_end(out["factors"][t])[0].reshape(-1, term.k, term.k)
        terms.append(BatchTerm(group=term.group, coef_names=term.coef_names,
                               covariance=sigma[:, None, None] ** 2 * factor @ np.swapaxes(factor, 1, 2),
                               levels=plan.term_levels[t][2], b=out["b"][t],
                               cond_sd=_diagonal_sds(out["cond_var"][t], term.k)))
    index = plan.labels
    return BatchResult(
        datasets=index,
        fixed_names=design.fixed_names,
        terms=tuple(terms),
        theta=out["theta"],
        objective=pd.Series(out["objective"], index=index, name="objective"),
        converged=pd.Series(out["converged"], index=index, name="converged"),
        refit=pd.Series(refitted, index=index, name="refit"),
        is_singular=pd.Series(np.asarray(out["is_singular"], dtype=bool), index=index, name="is_singular"),
        messages=pd.Series(messages, index=index, name="message"),
        beta=out["beta"],
        beta_se=_diagonal_sd(out["vcov"]),
        sigma=sigma,  # 1 with known residual sds or a GLMM (hp.lmm's, hp.glmm's), NaN where the fit failed
        reml=reml,
        sigma_known=design.sigma_known or design.family is not None,  # no Residual row in a GLMM's VarCorr
        phi=out.get("phi"),
        shape=out.get("shape"),
    )
