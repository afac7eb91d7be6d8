"""``hp.fit_batch(..., correlation=hp.ar1(...) | hp.car1(...))``: linear mixed models with AR(1) residuals over many
datasets, vmapped.

Each dataset's criterion is ``hp.lmm``'s with ``correlation=`` (:mod:`hierpool.closedform.ar1`): the data whitened
at phi (:func:`hierpool.algebra.ar1.whitened_system`, in the program) give an independent-residual model, whose
profiled criterion plus log |C(phi)| is -2 log L (or the REML criterion).  As ``hp.lmm``'s fallback does, phi is
found by a one-dimensional search of that criterion profiled over theta, on nlme's unconstrained scale u: here a
golden-section
search of fixed length (every dataset in lockstep; the bracket ends below 1e-7 in u), each of its points the
batch's Newton method in theta (:func:`hierpool.algebra.search.newton.newton`) from lme4's start (a neighbour's theta
would be a worse one: a singular theta has a zero gradient in its vanishing direction).
The search covers u in [-UNCONSTRAINED_LIMIT, UNCONSTRAINED_LIMIT] (hp.lmm's whole range); like hp.lmm's Brent
search it assumes the profile has one minimum there.

**On the host.**  On one CPU device in float64 nothing is compiled: (theta, u) are searched together, as ``hp.lmm``
searches its one dataset, for one term of at most three coefficients
(:data:`hierpool.algebra.search.ar1_moments.HOST_MAX_THETA` parameters), or terms on one grouping factor of at most
three together (one block-diagonal term), from per-level lagged moments (:mod:`hierpool.algebra.search.ar1_moments`),
for other several-term models on the whitened systems (:mod:`hierpool.algebra.search.ar1_systems`); either's chunks
on threads, and in worker processes too from :data:`AR1_PROCESS_MIN_ROWS` rows.  A dataset whose joint search stopped
where the profile is nearly flat in u (:func:`hierpool.algebra.ar1.clearly_curved`, ``hp.lmm``'s rule for taking its
joint estimate) keeps that stop where it lies at or below the profile at 17 points of u's range
(:func:`hierpool.algebra.search.ar1_moments.lowest_on_profile`), and is fitted alone by ``hp.lmm``, whose Brent search
covers that range, where it does not.  corAR1 datasets whose pairs
are mostly an even number of steps apart (phi's sign in doubt) are searched again from the optimum's u turned
(:func:`hierpool.algebra.search.ar1_moments.joint_newton`, ``hp.lmm``'s look across 0), the lower kept; the
golden sections below fit them alone by ``hp.lmm``.  A dataset whose phi ends at the edge of its range (independent
noise in a simulation: phi to 0) keeps its fit at the range's end, where ``hp.lmm``'s bounded search ends, with
``hp.lmm``'s warning in its row (:data:`EDGE_NOTE`; the host searches fit theta there with u held,
:func:`hierpool.algebra.search.ar1_moments.held_at_edge`, and check it against the profile at those points as a
flat stop; the golden sections, which search the whole range in lockstep, keep theirs unchecked).  A wider single term, accelerators
and sharded batches run the golden-section program below.  A dataset whose inner fit in theta did not converge at
some point of that search is not reported converged (its message says so), and is refitted by ``hp.lmm``.

Series are each dataset's own: the long frame's series are keyed by (dataset, group).  Datasets are padded as a
GLMM batch's (:class:`hierpool.batch.fit_glmm.BucketRows`): a padded row is the first of its own series with zero
values, so it whitens to zeros and adds nothing.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..algebra.ar1 import (
    UNCONSTRAINED_LIMIT,
    at_edge,
    carried,
    clearly_curved,
    constrained_phi,
    in_search_units,
    lag_classes,
    log_det_correlation,
    per_unit,
    sign_in_doubt,
    whitened_system,
)
from ..algebra.compiler_options import ProgramCache, compile_in_background, shape_signature
from ..algebra.criterion import objective
from ..algebra.henderson import solve
from ..algebra.linalg import theta_start
from ..algebra.search import HOST_CHUNK_BYTES
from ..algebra.search.ar1_moments import ChunkData, host_bytes, search_on_host
from ..algebra.search.ar1_systems import TermsChunk, joint_search_kind, lagged_systems_pay
from ..algebra.search.ar1_systems import host_bytes as terms_host_bytes
from ..algebra.search.ar1_systems import search_on_host as terms_search_on_host
from ..algebra.search.newton import DECREASE_TOL, canonical_theta, newton
from ..closedform.ar1 import check_nested
from ..errors import ArgumentError, DataError, HierpoolWarning
from ..spec.correlation import AR1, common_steps, even_step_message, series_of
from . import host_processes
from .fit_glmm import BucketRows, bucket_pattern
from .fit_terms import (
    empty_results,
    linear_start,
    row_buckets,
    run_jobs,
    start_processes,
    take,
    term_problems,
    too_large,
)
from .plan import (
    QUICK_COMPILE_MAX_VALUES,
    BatchPlan,
    chunks,
    fetch,
    host_chunk,
    host_chunk_length,
    host_fits,
    nothing_left,
    one_factor,
    padded_widths,
    place,
    thread_count,
)

#: Golden-section steps of the search in u: the bracket shrinks to 2 UNCONSTRAINED_LIMIT 0.618^steps (< 1e-7).
GOLDEN_STEPS = 45
#: The series column added to the long frame: (dataset, group).
SERIES_COLUMN = "(series)"
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def batch_series(plan: BatchPlan, structure: AR1):
    """Each design row's series (previous row, lag) with series keyed by (dataset, group): no series spans datasets.

    Returns ``(series, problems)``: ``problems`` maps a dataset whose series ``hp.lmm`` would refuse (a missing
    group or time, a time repeated within a series, no series of two rows, a random-effect term not nested in the
    series) to
    ``hp.lmm``'s message; that dataset keeps it in its row, and its rows are each their own series here (they
    are not fitted).  Only a column that is missing, or a time column that is not numeric, stops the batch.
    """
    if not isinstance(structure, AR1):
        raise ArgumentError(f"correlation must be hp.ar1(...) or hp.car1(...), got {type(structure).__name__}")
    if plan.design.weights is not None:
        raise ArgumentError("weights= and se= cannot be combined with an AR(1) correlation (not supported yet)")
    frame, rows = plan.frame, plan.design.rows
    for column in (structure.group, structure.time):
        if column is not None and column not in frame.columns:
            raise DataError(f"the AR(1) correlation uses column {column!r}, which is not in the data "
                            f"(columns: {list(frame.columns)})")
    if structure.time is not None and not pd.api.types.is_numeric_dtype(frame[structure.time]):
        raise DataError(f"the AR(1) time column {structure.time!r} must be numeric")
    # one code per (dataset, group); a missing group stays missing, for series_of to refuse as hp.lmm does
    codes = frame.groupby([plan.by, structure.group], sort=False, dropna=False).ngroup()
    keyed = frame.assign(**{SERIES_COLUMN: codes.where(frame[structure.group].notna())})
    combined = dataclasses.replace(structure, group=SERIES_COLUMN)
    try:
        series = series_of(combined, keyed, rows)
        check_nested(plan.design, series, combined)
        # a dataset whose every row is its own series: hp.lmm refuses it (phi not identified), the long frame not
        paired = np.bincount(plan.dataset[series.previous >= 0], minlength=plan.n_datasets) > 0
        if np.all(paired | (np.bincount(plan.dataset, minlength=plan.n_datasets) == 0)):  # (no rows: refused apart)
            return series, {}
        refused = None
    except DataError as error:
        refused = error
    # some dataset's series would be refused: find each one, with hp.lmm's message (its own data, its own names)
    problems = {}
    for d, positions in enumerate(plan.dataset_rows()):
        try:
            check_nested(plan.design, series_of(structure, frame, rows[positions]), structure, positions)
        except DataError as error:
            problems[d] = str(error)
    if not problems:  # the long frame's series failed where no dataset's does: a bug of this function, not the data
        raise RuntimeError("fit_batch: the batch's AR(1) series were refused, but no dataset's own") from refused
    if len(problems) == plan.n_datasets:  # every dataset's own series refused: its words, not the long frame's
        raise nothing_left({plan.labels[d]: why for d, why in problems.items()})
    # their rows each their own series, at time 0: the whole batch's series are then well formed
    at = keyed.index.get_indexer(rows[np.isin(plan.dataset, list(problems))])
    labels = keyed[SERIES_COLUMN].to_numpy(dtype=float, copy=True)
    labels[at] = codes.max() + 1 + np.arange(len(at))
    isolated = {SERIES_COLUMN: labels}
    if structure.time is not None:
        times = keyed[structure.time].to_numpy(dtype=float, copy=True)
        times[at] = 0.0
        isolated[structure.time] = times
    return series_of(combined, keyed.assign(**isolated), rows), problems


def warn_even_steps(plan: BatchPlan, series, structure: AR1, messages: list[str]) -> None:
    """One warning for the datasets to be fitted (no message in ``messages``) whose corAR1 lags are all multiples
    of an even step (phi's sign not identified: ``hp.lmm`` and ``hp.bayes`` warn of it per fit, a batch once,
    counting them; the step named is the first one's)."""
    if structure.continuous:
        return
    steps = common_steps(series, plan.dataset, plan.n_datasets)
    even = np.flatnonzero((steps % 2 == 0) & np.array([not message for message in messages], dtype=bool))
    if even.size:
        labels = plan.labels[even[:3]].tolist()  # Python's scalars: their repr is the user's label
        named = ", ".join(map(repr, labels)) + (", ..." if even.size > 3 else "")
        warnings.warn(f"{even.size} dataset(s) ({named}): {even_step_message(structure.time, int(steps[even[0]]))}",
                      HierpoolWarning, stacklevel=5)


def series_buckets(plan: BatchPlan, series, datasets: np.ndarray):
    """``datasets`` bucketed by padded level counts and rows: per bucket ``(members, (pattern, previous, lag,
    y - offset, n))``, each array with a leading dataset axis (the padding of :class:`BucketRows`; a padded
    row is the first of its own series, with zero values).  ``hp.fit_batch``'s and ``hp.bayes_batch``'s."""
    design = plan.design
    position_of = np.full(design.n, -1)
    out = []
    for key, members in row_buckets(plan, datasets).items():
        layout_rows = BucketRows.of(plan, members, int(key[-1]))
        _, pattern = bucket_pattern(plan, layout_rows, key[:-1], fixed=True, sigma_known=False)
        position_of[layout_rows.rows] = layout_rows.position
        previous = np.where(series.previous >= 0, position_of[np.maximum(series.previous, 0)], -1)
        out.append((members, (pattern, layout_rows.pad(previous.astype(np.int32), fill=-1),
                              layout_rows.pad(series.lag, 1.0), layout_rows.pad(design.y - design.offset),
                              plan.n_obs[members].astype(float))))
    return out


def _ar1_rows(pattern, previous, lag, y, n, start, reml: bool, continuous: bool, max_iterations: int):
    ks = pattern.layout.ks

    def one(pat, prev, lg, yy, rows, theta0):
        def profile(u, theta_start_, with_step=False):
            phi = constrained_phi(u, continuous)
            system = whitened_system(pat, prev, lg, yy, phi)
            theta, value, step, _, converged = newton(partial(objective, system=system, reml=reml, n=rows),
                                                      theta_start_, max_iterations)
            value = value + log_det_correlation(carried(phi, prev, lg))
            return (value, theta, converged, step) if with_step else (value, theta, converged)

        low, high = -UNCONSTRAINED_LIMIT, UNCONSTRAINED_LIMIT
        c = high - GOLDEN * (high - low)
        d = low + GOLDEN * (high - low)
        fc, theta_c, ok_c = profile(jnp.asarray(c, yy.dtype), theta0)
        fd, theta_d, ok_d = profile(jnp.asarray(d, yy.dtype), theta0)

        def step(_, state):
            low, high, c, d, fc, fd, theta_c, theta_d, inner_ok = state
            left = fc < fd  # the minimum lies in [low, d]
            new_low, new_high = jnp.where(left, low, c), jnp.where(left, d, high)
            # the kept point becomes the new inner point on its side; one new point is evaluated
            point = jnp.where(left, new_high - GOLDEN * (new_high - new_low), new_low + GOLDEN * (new_high - new_low))
            # every inner fit starts at lme4's identity: from a neighbour's singular theta (0 on a diagonal, where
            # the criterion's gradient vanishes by symmetry) Newton's method would stay on the boundary
            value, theta, converged = profile(point, theta0)
            new_c = jnp.where(left, point, d)
            new_d = jnp.where(left, c, point)
            new_fc, new_fd = jnp.where(left, value, fd), jnp.where(left, fc, value)
            new_theta_c = jnp.where(left, theta, theta_d)
            new_theta_d = jnp.where(left, theta_c, theta)
            # an inner fit that did not converge gives the comparisons a value above the profile's: the bracket
            # may then leave the minimum (benchmarks/RESULTS.md, nineteenth session)
            return new_low, new_high, new_c, new_d, new_fc, new_fd, new_theta_c, new_theta_d, inner_ok & converged

        state = (jnp.asarray(low, yy.dtype), jnp.asarray(high, yy.dtype), jnp.asarray(c, yy.dtype),
                 jnp.asarray(d, yy.dtype), fc, fd, theta_c, theta_d, ok_c & ok_d)
        low, high, c, d, fc, fd, theta_c, theta_d, inner_ok = jax.lax.fori_loop(0, GOLDEN_STEPS, step, state)
        u = jnp.where(fc < fd, c, d)
        value, theta, converged, newton_step = profile(u, theta0, with_step=True)
        theta = canonical_theta(theta, ks)
        phi = constrained_phi(u, continuous)
        solved = solve(theta, whitened_system(pat, prev, lg, yy, phi), reml, rows)
        # converged: every inner fit of the search (at the range's edge too: the sections' end is hp.lmm's bounded
        # search's, which warns there, as _store does)
        edge = at_edge(u)
        return {"theta": theta, "objective": value, "phi": phi, "converged": converged & inner_ok,
                "edge": edge, "inner_converged": inner_ok,
                "newton_step": newton_step, "beta": solved.beta, "vcov": solved.vcov_beta,
                "sigma": solved.sigma, "b": solved.b, "cond_var": solved.cond_var, "factors": solved.factors}

    return jax.vmap(one)(pattern, previous, lag, y, n, start)


_COMPILED = ProgramCache()


def _program(arguments, reml: bool, continuous: bool, max_iterations: int, sharding, quick: bool):
    def build():
        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        shapes = jax.tree_util.tree_map(spec, arguments)
        platform = jax.devices()[0].platform if sharding is None else sharding.mesh.devices.flat[0].platform
        function = partial(_ar1_rows, reml=reml, continuous=continuous, max_iterations=max_iterations)
        if sharding is not None:
            function = jax.shard_map(function, mesh=sharding.mesh, in_specs=(sharding.spec,) * 6,
                                     out_specs=sharding.spec, check_vma=False)
        return compile_in_background(jax.jit(function).lower(*shapes), platform, quick)

    return _COMPILED.get((shape_signature(arguments), reml, continuous, max_iterations, sharding, quick), build)


#: Rows of an AR(1) host batch (either search) from which its chunks run in worker processes too
#: (:mod:`hierpool.batch.host_processes`; NumPy holds the GIL between its many small operations, so that a second
#: thread gains little): below them a first call gained little or nothing, a worker's start costing about what it
#: gains (benchmarks/RESULTS.md, twenty-sixth session, several terms; fifty-seventh, one term).
AR1_PROCESS_MIN_ROWS = 10_000


def fit_ar1(plan: BatchPlan, structure: AR1, *, reml: bool, float_type, chunk_size: int | None, progress,
            max_iterations: int, sharding, workers: int, default_chunk: int,
            shifts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Fit every dataset of ``plan`` with AR(1) residuals: :func:`hierpool.batch.fit_terms.fit_terms`'s dict of
    per-dataset results, with ``phi``.  ``chunk_size`` None: :func:`host_chunk` on the host, else
    ``default_chunk``.  ``shifts``: the plan's :meth:`~hierpool.batch.plan.BatchPlan.location_shifts`, where the
    caller has them."""
    design = plan.design
    series, series_problems = batch_series(plan, structure)
    # each dataset's search per its median lag (hp.lmm's); _store reports phi per the user's unit
    series, units = in_search_units(series, plan.dataset, plan.n_datasets, structure.continuous)
    ks = tuple(t.k for t in design.terms)
    n_devices = 1 if sharding is None else len(jax.devices())
    messages = [message or series_problems.get(d, "") for d, message in enumerate(term_problems(plan))]
    warn_even_steps(plan, series, structure, messages)
    moments, systems = _on_host(plan, float_type, sharding), _terms_on_host(plan, float_type, sharding)
    out = empty_results(plan, messages, too_large(plan, messages, merged=moments))
    out["phi"] = np.full(plan.n_datasets, np.nan)
    out["reasons"] = {}  # dataset -> why it is not converged, where the last Newton step does not say
    # phi is not identified where no row follows another in its series: fitted alone, as hp.lmm, which warns
    has = series.previous >= 0
    followed = np.bincount(plan.dataset[has], minlength=plan.n_datasets) > 0
    for d in np.flatnonzero(out["attempted"] & ~followed):
        out["alone"][d] = "no row follows another in its series: phi is not identified"
        out["attempted"][d] = False
    # corAR1 whose pairs are mostly an even number of steps apart: phi's criterion may have a second minimum across 0,
    # which hp.lmm looks for (closedform.ar1.across_zero); the host searches such a dataset from both sides of 0
    # (ar1_moments.joint_newton), the compiled golden sections cannot: there it is fitted alone, by hp.lmm
    doubt = np.zeros(plan.n_datasets, bool) if structure.continuous else sign_in_doubt(
        series.previous, series.lag, plan.dataset, plan.n_datasets)
    if not (moments or systems):
        for d in np.flatnonzero(out["attempted"] & doubt):
            out["alone"][d] = ("its series are mostly an even number of steps apart: phi's sign is searched on both "
                               "sides")
            out["attempted"][d] = False
    if moments:  # nothing compiled: the joint search in NumPy, chunks in threads
        jobs = []
        # per bucket of level counts (a chunk's levels are padded to its largest), chunks bounded in bytes
        usable = np.flatnonzero(out["attempted"])
        widths = padded_widths(plan)[usable, 0]
        # each dataset's most lag classes in one level (the moments' J, as lagged_moments counts them)
        level_of, n_levels, _ = plan.term_levels[0]
        row_class = lag_classes(plan.dataset[has] * int(n_levels.max()) + level_of[has], series.lag[has])[2]
        classes_per_level = np.zeros(plan.n_datasets, dtype=np.int64)
        np.maximum.at(classes_per_level, plan.dataset[has], row_class + 1)
        for width in np.unique(widths):
            members = usable[widths == width]
            classes = int(classes_per_level[members].max())
            most = chunk_size or host_chunk(host_bytes(sum(ks), design.p, int(width), classes,
                                                       int(plan.n_obs[members].max())))
            size = host_chunk_length(len(members), most, thread_count(None))
            jobs += [(members[chunk.members], None, chunk.count, None)
                     for chunk in chunks(0, np.arange(len(members)), size, 1)]
        processes = start_processes(plan, out["attempted"], AR1_PROCESS_MIN_ROWS, search_on_host)
        search = partial(search_on_host, continuous=structure.continuous, reml=reml, max_iterations=max_iterations,
                         decrease_tol=DECREASE_TOL)

        def run_moments(job):  # the chunk's moments here, its search here or in a worker process
            members = job[0]
            chunk_search = partial(search, across_zero=doubt[members])
            data = ChunkData(plan, series, members)
            return host_processes.call(chunk_search, data) if processes else chunk_search(data)

        return _store(jobs, run_moments, out, plan, units, workers=thread_count(None), progress=progress)
    if systems:  # several terms: the joint search on the whitened systems
        usable = np.flatnonzero(out["attempted"])
        theta0 = linear_start(plan, usable, (plan.location_shifts() if shifts is None else shifts)[1])
        widths = padded_widths(plan)
        jobs = []
        for key in sorted({tuple(widths[d]) for d in usable}):
            members = usable[np.all(widths[usable] == key, axis=1)]
            # the most lag classes a dataset of the bucket has (a chunk's J): whether its chunks form their sums
            followed_here = has & np.isin(plan.dataset, members)
            classes = lag_classes(plan.dataset[followed_here], series.lag[followed_here])[0]
            lagged = lagged_systems_pay(classes, ks, key, design.p, float(plan.n_obs[members].mean()),
                                        HOST_CHUNK_BYTES)
            most = chunk_size or host_chunk(terms_host_bytes(ks, key, design.p, classes if lagged else None))
            size = host_chunk_length(len(members), most, thread_count(None))
            jobs += [(members[chunk.members], (key, lagged), chunk.count, None)
                     for chunk in chunks(0, np.arange(len(members)), size, 1)]

        processes = start_processes(plan, out["attempted"], AR1_PROCESS_MIN_ROWS, terms_search_on_host)
        search = partial(terms_search_on_host, continuous=structure.continuous, reml=reml,
                         max_iterations=max_iterations)

        def run_terms(job):  # the chunk's rows here, its sums and search here or in a worker process
            members, (key, lagged) = job[0], job[1]
            data = TermsChunk(plan, series, members, key, lagged)
            arguments = (data, theta0[members], doubt[members])
            return host_processes.call(search, *arguments) if processes else search(*arguments)

        return _store(jobs, run_terms, out, plan, units, workers=thread_count(None), progress=progress)
    chunk_size = chunk_size or default_chunk
    jobs = []
    for members, data in series_buckets(plan, series, np.flatnonzero(out["attempted"])):
        arguments = (*data, np.tile(theta_start(ks), (len(members), 1)))
        size = min(chunk_size, math.ceil(len(members) / workers))
        bucket_chunks = chunks(0, np.arange(len(members)), size, n_devices)
        first = take(arguments, bucket_chunks[0].index)
        values = sum(a.size for a in jax.tree_util.tree_leaves(first))
        program = _program(first, reml, structure.continuous, max_iterations, sharding,
                           values <= QUICK_COMPILE_MAX_VALUES)
        for chunk in bucket_chunks:
            jobs.append((members[chunk.members], take(arguments, chunk.index), chunk.count, program))

    def run(job):
        members, arguments, count, program = job
        result = jax.tree_util.tree_map(lambda a: a[:count], fetch(program.result()(*place(arguments, sharding))))
        for d in members[~result.pop("inner_converged")]:
            out["reasons"][d] = "an inner fit in theta of the search in phi did not converge"
        return result

    return _store(jobs, run, out, plan, units, workers=workers, progress=progress)


def _on_host(plan: BatchPlan, float_type, sharding) -> bool:
    """Whether the batch is searched on the host (:mod:`hierpool.algebra.search.ar1_moments`): one random-effect
    term (its per-level moments), or terms on one grouping factor fitted as one
    (:func:`hierpool.batch.plan.one_factor`), of at most :data:`hierpool.algebra.search.ar1_moments.HOST_MAX_THETA`
    parameters as one term (its complex step in (theta, u) costs an evaluation per parameter), on one CPU device in
    float64.  Other several-term batches go to :func:`_terms_on_host`; a wider term, accelerators and sharded batches
    compile the golden-section search."""
    ks = tuple(term.k for term in plan.design.terms)
    return joint_search_kind(ks, one_factor(plan)) == "moments" and host_fits(float_type, sharding)


def _terms_on_host(plan: BatchPlan, float_type, sharding) -> bool:
    """Whether a batch of several terms that :func:`_on_host` does not take is searched on the host
    (:mod:`hierpool.algebra.search.ar1_systems`, :func:`~hierpool.algebra.search.ar1_systems.joint_search_kind`'s
    ``"systems"``; it fits terms on one factor too): on one CPU device in float64 (the complex step), as the
    several-term linear path (:mod:`hierpool.batch.fit_terms`)."""
    return len(plan.design.terms) > 1 and host_fits(float_type, sharding)


#: A dataset's message where its phi ends at the edge of its range (``hp.lmm``'s warning there).
EDGE_NOTE = "phi at the edge of its range (a unit-root or vanishing correlation): the fit is not reliable"


def _store(jobs, run, out: dict, plan: BatchPlan, units: np.ndarray, *, workers: int, progress) -> dict:
    """:func:`run_jobs`, with each chunk's phi.  A dataset whose phi ends at its range's edge keeps its fit there
    with ``hp.lmm``'s warning in its row (:data:`EDGE_NOTE` in ``out["notes"]``, which
    :func:`hierpool.batch.fit._result` adds to the messages of rows it does not fit alone, and warns of once), and
    phi per the user's unit there the float's 0 or 1 where that is beyond a float (``hp.lmm``'s), or is fitted alone
    where
    that fit is not converged; a dataset whose phi is beyond a float per the user's unit, or whose joint search
    stopped where the profile is nearly flat (:func:`hierpool.algebra.ar1.clearly_curved`) unless that stop is the
    profile's lowest at the points of u's range it is compared with (the host searches' ``flat_lowest``), is fitted
    alone."""
    out["notes"] = {}

    def run_and_mark(job):
        members, result = job[0], run(job)
        phi = per_unit(result["phi"], units[members])  # per the user's unit of time
        # at the edge a phi per unit beyond a float is the float's 0 or 1, as hp.lmm reports it (phi_per_unit)
        out["phi"][members] = np.where(result["edge"] & ~np.isfinite(phi), result["phi"] ** (1.0 / units[members]),
                                       phi)
        for d in members[result["edge"] & ~result["converged"]]:  # hp.lmm's own fit, with its message
            out["alone"][d] = ("phi at the edge of its range (a unit-root or vanishing correlation), the batch's fit "
                               "there not confirmed (its search in theta, the slope into the range or the profile "
                               "across it)")
        for d in members[result["edge"] & result["converged"]]:  # the fit at the range's end: hp.lmm's there
            out["notes"][d] = EDGE_NOTE  # (messages are refusals: batch.fit reads them so; _result warns)
        beyond = ~result["edge"] & ~np.isfinite(out["phi"][members])
        for d in members[beyond]:  # hp.lmm refuses it, by name, in the row's message
            out["alone"][d] = "phi per unit of time beyond a float"
        result["converged"] = result["converged"] & ~beyond
        # a joint search's stop where the profile is too flat to identify phi: kept where it lies at or below the
        # profile across u's range (flat_lowest), else hp.lmm's search over that range decides (the golden sections
        # of the compiled path search it already)
        flat = (~result["edge"] & ~beyond & ~clearly_curved(result.get("curvature", np.inf))
                & ~np.asarray(result.get("flat_lowest", False), dtype=bool))
        for d in members[flat]:
            out["alone"][d] = "the criterion profiled over theta is nearly flat in phi where the joint search stopped"
        return result

    out = run_jobs(jobs, run_and_mark, out, plan, workers=workers, progress=progress)
    out["attempted"][list(out["alone"])] = False  # fitted alone instead (fit_batch's refit)
    return out
