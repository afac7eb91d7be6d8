"""The host path of several-term linear batches (``hp.fit_batch`` of a linear mixed model with several terms): one
chunk's search and solve, on :func:`hierpool.batch.fit_terms`' stacked systems.

From :data:`hierpool.batch.fit_terms.LINEAR_PROCESS_MIN_ROWS` rows, or
:data:`~hierpool.batch.fit_terms.LINEAR_PROCESS_MIN_WORK` of dense evaluation work, chunks beyond the first thread's
run in worker processes (:mod:`hierpool.batch.host_processes`), which import this module and no JAX (benchmarks/RESULTS.md,
"Worker processes for the linear several-term host path, twenty-first session"; the seventeenth session had
measured no gain there, before the host search's per-point work grew).
"""

from __future__ import annotations

import numpy as np

from ..batched_systems import map_arrays, shared_grid, statistics_systems
from ..checks import SINGULAR_TOL, onto_boundary, singular_rows
from ..criterion import host_objective_and_gradient
from ..henderson import solve
from ..linalg import (
    OTHER_MINIMUM_MARGIN,
    block_diagonal_positions,
    block_diagonal_theta,
    identity_where_not,
    log_weights_unit,
    other_minimum_starts,
    rank_reduced_theta,
    term_results,
    theta_start,
)
from .newton import DECREASE_TOL, optimize_on_host


def host_bytes(ks, widths, p: int, extra_parameters: int = 0) -> int:
    """A host call's temporaries per dataset (:func:`hierpool.batch.plan.host_chunk`) for terms of widths ``ks`` and
    padded level counts ``widths``: about ten (m x m) matrices and three (ell0 k0 x m) products per probe (m the
    rest's columns, m = sum_(j>0) ell_j k_j + p + 1), and term 0's entry lists
    (:mod:`hierpool.algebra.term0_entries`, about 8 k0^2 arrays of its levels), n_theta + 1 probes per dataset (a
    point and its forward differences); ``extra_parameters`` searched beside theta add a probe each (an AR(1)'s u)."""
    n_theta = sum(k * (k + 1) // 2 for k in ks) + extra_parameters
    m = sum(w * k for w, k in zip(widths[1:], ks[1:])) + p + 1
    ell0, k0 = widths[0], ks[0]
    return 8 * (n_theta + 1) * (10 * m * m + 3 * ell0 * k0 * m + 8 * k0 * k0 * ell0)


def point_work(ks, widths, p: int):
    """The host evaluation's dense work at one point of a dataset whose terms of widths ``ks`` have (padded) level
    counts ``widths`` (..., n_terms): ell0 k0 m^2 + m^3, the Schur update's (and its adjoint's) products with the
    dense coupling and the rest's factorization and inverse, m = sum_(j>0) ell_j k_j + p + 1 the rest's columns
    (:func:`hierpool.algebra.batched_systems.dense_entries`)."""
    widths = np.asarray(widths, dtype=np.int64)
    m = widths[..., 1:] @ np.asarray(ks[1:], dtype=np.int64) + p + 1
    return widths[..., 0] * ks[0] * m**2 + m**3


def solved_entries(solution) -> dict:
    """The batch's entries of a :class:`~hierpool.algebra.henderson.Solution` (one dataset's, or a chunk's)."""
    return {"beta": solution.beta, "vcov": solution.vcov_beta, "sigma": solution.sigma, "b": solution.b,
            "cond_var": solution.cond_var, "factors": solution.factors}


#: Passes after which a search of a model with a vector term that has not converged is looked at again
#: (:func:`search_on_host`): past the passes that converging searches take, while a crawl towards a near-singular
#: term's boundary would run to the cap (the passes counted in benchmarks/RESULTS.md, "The several-term linear class,
#: eighteenth session").
RESTART_PASSES = 12
#: The criterion at the lowest of a stalled search's :func:`restart_candidates`, relative to where the search is, up to
#: which the search restarts there rather than going on (:func:`search_on_host`).
RESTART_TOLERANCE = 1e-6
#: :func:`point_work` from which a search of several terms has a secant update for its curvature
#: (:func:`newton_on_host`'s ``secant``) rather than each trial's forward differences: a pass then evaluates one
#: point, not n_theta + 1, for 1.4 to 1.7 times the passes, each a call whose fixed cost a cheap criterion does not
#: repay.  Eleven models were timed either way (benchmarks/RESULTS.md, twenty-fifth session): the updates paid
#: from 91,000 a point up; from 2,000 to 63,000 they did not (nested slopes ran slower), but for crossed slopes at
#: 44,000.
SECANT_MIN_WORK = 75_000
#: :data:`RESTART_PASSES` of a secant search, which takes more passes to converge (the three-term model's 200 took
#: up to 23 on updates alone; 20 restarted one search a pass before it converged, and its refit followed).
SECANT_RESTART_PASSES = 24


#: The width of a vector term from which a search that ends on the boundary (lme4's ``isSingular``) is searched again
#: from lme4's identity start (:func:`lowest_from_identity`).
IDENTITY_START_MIN_K = 3


def lowest_from_identity(result: dict, search, ks) -> dict:
    """``result`` (a chunk's searches, as :func:`lowest_of_other_minima`'s), each converged dataset whose optimum is
    on the boundary (some diagonal of a T_j below :data:`~hierpool.algebra.checks.SINGULAR_TOL`) searched again from
    lme4's start, T_j = I, and the optimum replaced where that ends converged and lower by
    :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN` (relative).  As the searches from other minima's starts
    (:func:`lowest_of_other_minima`), each runs :data:`OTHER_MINIMUM_FIRST_PASSES` passes (``search(starts, rows,
    passes)``: Newton's method), and only those then below the optimum go on, up to :data:`OTHER_MINIMUM_PASSES`
    (:func:`_lowest_of_starts`, the two's rule).

    With three or more coefficients in a term and few levels, the criterion has several boundary minima, and a
    search from the method of moments can end on a higher face than lme4's from the identity: of 200 datasets of 6
    groups x 6 rows with a four-coefficient term (spline columns), one ended 2.8 above lmer, in the batch and in
    ``hp.lmm`` (benchmarks/RESULTS.md, sixty-first session).  ``hp.lmm`` takes this search's optimum where it is
    lower than its own (:meth:`hierpool.closedform.model.MixedModel._lowest_of_batch_search`), so that the two agree.
    Terms of two coefficients were apart on 1 of 300 such datasets, with or without it, and are not searched again."""
    rows = np.flatnonzero(result["converged"] & np.isfinite(result["objective"])
                          & singular_rows(result["theta"], ks, SINGULAR_TOL))
    if not rows.size:
        return result
    return _lowest_of_starts(result, search, np.tile(theta_start(ks), (rows.size, 1)), rows)


def search_on_host(systems, n, start: np.ndarray, reml: bool, max_iterations: int, term_ks=None,
                   other_minima: np.ndarray | None = None, scales: np.ndarray | None = None) -> dict:
    """:func:`hierpool.batch.fit_terms`' compiled search (``_optimize_rows``) on the host: Newton's method of every
    dataset of a chunk (:func:`hierpool.algebra.search.newton.newton_on_host`) on the blocked criterion and its
    written-out gradient, evaluated for the datasets still searching at once (``systems``:
    :func:`hierpool.algebra.batched_systems.shared_grid`'s), each trial with its shifts (evaluating the shifts
    only around accepted trials, as a GLMM's search does, was slower here: a second call a pass for a criterion
    that costs little a point) or, with several terms and from :data:`SECANT_MIN_WORK` of work a point
    (:func:`point_work`), each trial alone, the curvature a secant update (``newton_on_host``'s ``secant``, which
    stops at a hundredth of the decrease tolerance; its restart after :data:`SECANT_RESTART_PASSES`), the damping
    interpolated after a rejected trial, saddle-free steps where the
    curvature is indefinite (:func:`hierpool.algebra.search.newton._saddle_free_step`), and a stop where the last quadratic
    model promises less than :data:`hierpool.algebra.search.newton.DECREASE_TOL` (a GLMM search's rule, and the compiled
    search's).

    ``other_minima``: (datasets,) bool, those whose prior weights (or known residual sds) are uneven
    (:func:`~hierpool.algebra.linalg.weights_uneven`), whose criterion can have an interior minimum and one on the
    boundary: each of their converged searches is followed by searches from its optimum's
    :func:`~hierpool.algebra.linalg.other_minimum_starts`, and the lowest optimum kept
    (:func:`lowest_of_other_minima`), as ``hp.lmm`` does with its own optimizer.  Different searches from the
    same starts can still end in different minima (benchmarks/RESULTS.md, fortieth session).  ``scales``: (datasets,
    n_theta) the probes' units there (:func:`hierpool.algebra.linalg.theta_scales`, in the search's thetas: the
    terms', with ``term_ks``); None: theta's own.  Every search ends :func:`hierpool.algebra.checks.onto_boundary`.

    In a model with a term of several coefficients, a search that has not converged after
    :data:`RESTART_PASSES` (a secant search :data:`SECANT_RESTART_PASSES`) passes is looked at: the criterion at
    its :func:`restart_candidates` (its theta with a
    vector term's covariance, or every vector term's, less its smallest eigenvalue's part: the boundary a
    near-singular term's search crawls towards, reached in one move) is evaluated, and the search restarts at the
    lowest where it is no more than :data:`RESTART_TOLERANCE` (relative) above where the search is, and otherwise
    goes on from where it is; either
    way with up to ``max_iterations`` passes more (``iterations`` counts both runs').  A second run that stops where
    its forward-difference Hessian has a negative direction (:func:`negative_curvature`: a saddle, next to which a
    restart starts) is not converged.  The lower criterion of the two runs is kept (or the second's, where it
    converged to the same, to rounding); one left unconverged is refitted by ``hp.lmm``.  The restart saves the
    passes of those crawls at the same criteria (benchmarks/RESULTS.md, "The several-term linear class, eighteenth
    session").

    ``term_ks``: the systems' one term stands for terms of these widths on one grouping factor (``(1 + x || g)``,
    :func:`hierpool.batch.plan.one_factor`), its factor block-diagonal with theirs
    (:func:`hierpool.algebra.linalg.block_diagonal_positions`): the search runs in the terms' thetas (``start``
    theirs; their canonical form, singular rule and restart), the criterion at the one term's.  With the terms
    apart, the second term's levels would be a dense block of the system.

    The compiled search (accelerators, float32) shares the decrease stop of the searches that difference each
    trial (in float32 rounding reaches it first) but has none of the interpolated damping, the saddle-free steps,
    the secant updates, the restart, the search from lme4's identity (:func:`lowest_from_identity`) and the searches
    from other starts (a compiled batch runs the last by its own
    program, :func:`hierpool.batch.other_minima.compiled_other_minima`): a dataset it does not converge on is
    refitted by ``hp.lmm``, as before."""
    ks = systems.layout.ks if term_ks is None else tuple(term_ks)  # the search's terms (module notes: term_ks)
    merged = ks != systems.layout.ks
    positions = block_diagonal_positions(ks) if merged else None

    def value_and_grad(points, rows):
        # (A, Q) points of datasets ``rows``: each dataset's system broadcast over its points
        chunk = shared_grid(systems, rows, points=True)
        evaluate = host_objective_and_gradient(chunk, reml, n=n[rows][:, None])
        if not merged:
            return evaluate(points)
        value, gradient = evaluate(block_diagonal_theta(points, ks))
        return value, gradient[..., positions]

    layout = systems.layout
    # one term has no dense rest: its point costs little whatever point_work's Schur term says
    secant = len(layout.ks) > 1 and point_work(layout.ks, layout.n_levels, layout.p) >= SECANT_MIN_WORK

    def search(start, datasets, passes, with_curvature=False):
        return optimize_on_host(lambda points, rows: value_and_grad(points, datasets[rows]), start, passes,
                                ks, interpolated_damping=True, saddle_free=True, decrease_tol=DECREASE_TOL,
                                with_curvature=with_curvature, secant=secant)

    vector_terms = max(ks) > 1
    restart_passes = SECANT_RESTART_PASSES if secant else RESTART_PASSES

    def searched(start, rows):  # rows: the chunk's datasets searched, one a start
        result = search(start, rows, min(restart_passes, max_iterations) if vector_terms else max_iterations)
        stalled = np.flatnonzero(~result["converged"] & np.isfinite(result["objective"])
                                 & np.all(np.isfinite(result["theta"]), axis=1))
        if stalled.size and vector_terms:
            at, before = result["theta"][stalled], result["objective"][stalled]
            candidates = restart_candidates(at, ks)
            with np.errstate(all="ignore"):
                values = value_and_grad(candidates, rows[stalled])[0]
            # the lowest candidate (NaN: none), where the criterion is no higher than where the search is (NaN
            # there: go on)
            best = np.argmin(np.where(np.isnan(values), np.inf, values), axis=1)
            reduced, there = candidates[np.arange(len(stalled)), best], values[np.arange(len(stalled)), best]
            restart = there <= before + RESTART_TOLERANCE * np.abs(before)
            again = search(np.where(restart[:, None], reduced, at), rows[stalled], max_iterations,
                           with_curvature=True)
            # a run that stopped where the curvature has a negative direction stopped at a saddle, not a minimum (a
            # restart sits next to the stationary points of T_kk = 0): not converged, so that hp.lmm refits it
            again["converged"] &= ~negative_curvature(again.pop("curvature"))
            # the lower criterion, or the second run where it converged to the same one (to rounding)
            better = (again["objective"] < before) | (again["converged"]
                                                      & (again["objective"] <= before + 1e-12 * np.abs(before)))
            result["iterations"][stalled] += again.pop("iterations")  # both runs' passes: up to restart_passes more
            for name, values in again.items():
                result[name][stalled[better]] = values[better]
        return result

    result = searched(start, np.arange(len(start)))
    if max(ks) >= IDENTITY_START_MIN_K:
        result = lowest_from_identity(result, search, ks)
    if other_minima is not None and np.any(other_minima):
        result = lowest_of_other_minima(result, search, ks, np.asarray(other_minima, dtype=bool), scales)
    result["theta"], result["objective"] = onto_boundary(
        result["theta"], result["objective"], lambda points, rows: value_and_grad(points[:, None, :], rows)[0][:, 0],
        ks, boundary_tolerance(systems.log_weights, n, layout.sigma_known))
    return result


def boundary_tolerance(log_weights, n, sigma_known: bool):
    """lme4's singular tolerance (:data:`~hierpool.algebra.checks.SINGULAR_TOL`) in the batch's searched theta,
    per dataset (``log_weights``, ``n``: its systems' or statistics'), for its snap onto the boundary
    (:func:`~hierpool.algebra.checks.onto_boundary`).  A linear model's prior weights put the search's theta over
    their unit (:mod:`hierpool.batch.conditioning`), while lme4's rule and ``hp.lmm``'s snap read the user's theta:
    the tolerance over the unit.  Snapped in the searches' units, a variance of 1.2e-4 with weights of ~1e-6 (unit
    1e3) went to 0 and was flagged singular where ``hp.lmm`` kept it (the criteria equal to 1e-10; the fifty-fifth
    session's review).  With known sds the searches' own (both engines read lme4's rule relative to the sds)."""
    if sigma_known:
        return SINGULAR_TOL
    return SINGULAR_TOL / log_weights_unit(np.asarray(log_weights, dtype=float), np.asarray(n, dtype=float))


def systems_onto_boundary(found: dict, systems, n, reml: bool) -> dict:
    """A compiled chunk's searches (``found``: host arrays, ``theta`` canonical and ``objective``) ended on lme4's
    boundary as the host search's are (:func:`hierpool.algebra.checks.onto_boundary`), the criterion evaluated here
    in float64 on the chunk's ``systems`` and ``n`` (host arrays, leading axis the chunk's rows; a float32 chunk's
    too).  Returns ``found`` with those two arrays replaced (theta in its own precision)."""
    systems = map_arrays(systems, lambda a: np.asarray(a, dtype=np.float64))
    n = np.asarray(n, dtype=np.float64)

    def evaluate(points, rows):
        return host_objective_and_gradient(shared_grid(systems, rows, points=True), reml,
                                           n=n[rows][:, None])(points[:, None, :])[0][:, 0]

    theta, objective = onto_boundary(found["theta"], found["objective"], evaluate, systems.layout.ks,
                                     boundary_tolerance(systems.log_weights, n, systems.layout.sigma_known))
    dtype = np.asarray(found["theta"]).dtype
    return {**found, "theta": theta.astype(dtype), "objective": objective.astype(np.asarray(found["objective"]).dtype)}


#: Passes of a search from one of :func:`~hierpool.algebra.linalg.other_minimum_starts`
#: (:func:`lowest_of_other_minima`), after which one still searching goes on only where it is already below its
#: dataset's optimum (a descent: it ends lower), up to :data:`OTHER_MINIMUM_PASSES` in all.  A search from a
#: rank-reduced start that finds no lower minimum crawls along the boundary, half of them past 12 passes and some to
#: 59, while most that found one took at most 15, and one 23, below the optimum after 8 (benchmarks/RESULTS.md,
#: fortieth session).
OTHER_MINIMUM_FIRST_PASSES = 8
OTHER_MINIMUM_PASSES = 48


def lowest_of_other_minima(result: dict, search, ks, datasets: np.ndarray, scales=None) -> dict:
    """``result`` (a chunk's searches: writable arrays ``theta``, ``objective``, ``newton_step``, ``iterations``,
    ``converged``; ``search(starts, owners, passes)`` its search from each start, ``owners`` each start's row of the
    chunk (repeated where a dataset has several), which may take its own passes: a compiled program,
    :func:`hierpool.batch.other_minima.compiled_other_minima`), the optimum of each converged
    dataset among ``datasets`` (a mask) replaced by the lowest of the searches from its
    :func:`~hierpool.algebra.linalg.other_minimum_starts` (:data:`OTHER_MINIMUM_FIRST_PASSES` each, and
    :data:`OTHER_MINIMUM_PASSES` for those below the optimum by then) where that ends
    converged and lower by :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN` (relative; in float32 by 100 of its
    rounding units, where the margin is below them and rounding alone would swap optima): ``hp.lmm``'s rule for uneven
    prior weights (:meth:`hierpool.closedform.model.MixedModel._lowest_of_restarts`: the same starts and margin,
    searched by its own optimizer), whose criterion can have an interior minimum and one on the boundary.  On the host
    all the starts of the chunk are searched at once.  ``scales``: each dataset's probe units (B, n_theta),
    :func:`hierpool.algebra.linalg.theta_scales`, as ``hp.lmm``'s."""
    done = np.flatnonzero(datasets & result["converged"] & np.isfinite(result["objective"]))
    starts, owners = [], []
    for row in done:
        found = other_minimum_starts(result["theta"][row], ks, SINGULAR_TOL, None if scales is None else scales[row])
        starts += found
        owners += [row] * len(found)
    if not starts:
        return result
    return _lowest_of_starts(result, search, np.stack(starts), np.asarray(owners))


def _lowest_of_starts(result: dict, search, starts: np.ndarray, owners: np.ndarray) -> dict:
    """The rule :func:`lowest_of_other_minima` and :func:`lowest_from_identity` share: each of ``starts`` searched
    (``search(starts, owners, passes)``, ``owners`` each start's row of ``result``) for
    :data:`OTHER_MINIMUM_FIRST_PASSES`, those then below their row's optimum on to :data:`OTHER_MINIMUM_PASSES`, and
    each row's optimum replaced by the lowest of its starts' where that converged and is lower by
    :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN` (relative; in float32 by 100 of its rounding units)."""
    current = result["objective"][owners]
    margin = max(OTHER_MINIMUM_MARGIN, 100 * float(np.finfo(np.result_type(current, np.float32)).eps))
    threshold = current - margin * np.maximum(1.0, np.abs(current))
    again = search(starts, owners, OTHER_MINIMUM_FIRST_PASSES)
    going = np.flatnonzero(~again["converged"] & (again["objective"] < threshold))
    if going.size:  # already below the optimum: on to its own minimum
        more = search(again["theta"][going], owners[going], OTHER_MINIMUM_PASSES - OTHER_MINIMUM_FIRST_PASSES)
        again["iterations"][going] += more.pop("iterations")
        for name, values in more.items():
            again[name][going] = values
    usable = again["converged"] & np.isfinite(again["objective"])
    values = np.where(usable, again["objective"], np.inf)
    order = np.lexsort((values, owners))  # each dataset's starts, lowest first
    first = order[np.r_[True, owners[order][1:] != owners[order][:-1]]]  # each dataset's lowest
    rows = owners[first]
    lower = values[first] < threshold[first]
    result["iterations"][rows] += np.bincount(np.searchsorted(rows, owners), weights=again["iterations"],
                                              minlength=len(rows)).astype(result["iterations"].dtype)
    for name in ("theta", "objective", "newton_step", "converged"):
        result[name][rows[lower]] = again[name][first[lower]]
    return result


def restart_candidates(theta: np.ndarray, ks) -> np.ndarray:
    """(A, C, n_theta) the points a stalled search (A, n_theta) may restart from (:func:`search_on_host`): its theta
    with each vector term rank-reduced alone (:func:`hierpool.algebra.linalg.rank_reduced_theta`), and, with several
    vector terms, with all of them at once.  A term alone: the search crawls towards one term's boundary while the
    others are well determined, and reducing those too would raise the criterion, so that no restart were taken
    (``y ~ x + (1 + x | a) + (1 + x | a:b)``: benchmarks/RESULTS.md, twenty-second session)."""
    vector = [j for j, k in enumerate(ks) if k > 1]
    sets = [(j,) for j in vector] + ([tuple(vector)] if len(vector) > 1 else [])
    return np.stack([rank_reduced_theta(theta, ks, terms=terms) for terms in sets], axis=1)


#: The smallest eigenvalue of a stopped search's forward-difference Hessian, relative to its largest (at least 1),
#: below which :func:`search_on_host` takes the stop for a saddle (the differences' own error is ~1e-8 relative).
NEGATIVE_CURVATURE = 1e-6


def negative_curvature(curvature: np.ndarray) -> np.ndarray:
    """Whether each of a stack of Hessians (K, m, m) has a negative eigenvalue beyond :data:`NEGATIVE_CURVATURE` of its
    scale (False where it is not finite: that search is not converged anyway)."""
    finite = np.all(np.isfinite(curvature), axis=(-2, -1))
    values = np.linalg.eigvalsh(identity_where_not(finite, curvature))
    scale = np.maximum(np.max(np.abs(values), axis=-1), 1.0)
    return finite & (values[:, 0] < -NEGATIVE_CURVATURE * scale)


def search_statistics_on_host(stats, start: np.ndarray, reml: bool, max_iterations: int,
                              sigma_known: bool = False, term_ks=None, other_minima: np.ndarray | None = None,
                              scales: np.ndarray | None = None) -> dict:
    """:func:`search_on_host` for a one-term chunk given by its sufficient statistics (a leading dataset axis):
    the same search on the same criterion, of the statistics' systems
    (:func:`hierpool.algebra.batched_systems.statistics_systems`).  ``hp.fit_batch``'s one-term path on the host and
    the AR(1) host search's start.

    The one-term specialisation's complex-step gradient (:func:`hierpool.algebra.one_term.value_and_gradient`) costs
    one complex evaluation per parameter, the written-out adjoint a few real passes whatever their number; with
    term 0's small blocks written out entry by entry (:mod:`hierpool.algebra.term0_entries`) the general path is the
    faster one on the host from two coefficients a level up, and as fast with one (benchmarks/RESULTS.md, twentieth
    session).

    ``term_ks``: the statistics' one term stands for terms of these widths on one grouping factor, as
    :func:`search_on_host`'s (``start`` and the thetas returned theirs); ``other_minima`` and ``scales`` as its.

    It is the several-term search in every rule, unlike the compiled one-term program (Newton's method with the
    same decrease stop): saddle-free steps, the interpolated damping, and for a vector term the restart at the
    lowest of its :func:`restart_candidates` after :data:`RESTART_PASSES` passes (so up to that many passes more
    than ``max_iterations``), whose stop at a negative curvature is not converged (``hp.lmm`` refits that dataset).
    Its one term makes no secant search.
    """
    return search_on_host(statistics_systems(stats, sigma_known), np.asarray(stats.n), start, reml, max_iterations,
                          term_ks, other_minima, scales)


def fit_on_host(systems, n, start: np.ndarray, reml: bool, max_iterations: int, term_ks=None,
                other_minima: np.ndarray | None = None, scales: np.ndarray | None = None) -> dict:
    """A host chunk's fits: :func:`search_on_host`, then :func:`hierpool.algebra.henderson.solve` at each optimum over
    the chunk's leading axis (what the compiled optimize and solve programs return).  ``term_ks``: the systems' one
    term stands for terms of these widths on one grouping factor, as :func:`search_on_host`'s; each term's results
    are then its block's; ``other_minima`` and ``scales`` as its."""
    optimized = search_on_host(systems, n, start, reml, max_iterations, term_ks, other_minima, scales)
    merged = term_ks is not None and tuple(term_ks) != systems.layout.ks
    theta = block_diagonal_theta(optimized["theta"], tuple(term_ks)) if merged else optimized["theta"]
    with np.errstate(all="ignore"):  # a dataset whose theta is NaN gets NaN, as in the compiled program
        solved = solved_entries(solve(theta, systems, reml=reml, n=n))
    if merged:
        solved["b"], solved["cond_var"], solved["factors"] = term_results(solved["b"][0], solved["cond_var"][0],
                                                                          solved["factors"][0], term_ks)
    return {**optimized, **solved}
