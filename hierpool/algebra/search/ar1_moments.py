"""``hp.fit_batch(..., correlation=)`` with one random-effect term (or terms on one grouping factor) on the host:
(theta, phi) searched together over a chunk of datasets, from per-level moments, in NumPy.

Terms on one grouping factor (the same level on every row: ``(1 + x || g)``, ``(1 | g) + (0 + x | g)``) are one
term here, of their summed width, whose relative factor is block-diagonal with theirs
(:func:`hierpool.algebra.linalg.block_diagonal_positions`): the same model, the search in the terms' own thetas,
each term's results its block's.  The several-term search (:mod:`hierpool.algebra.search.ar1_systems`) would factor
the second term's levels as a dense block of the system.

Each dataset's criterion is ``hp.lmm``'s with ``correlation=`` (:mod:`hierpool.closedform.ar1`): the one-term
criterion of the data whitened at phi (:func:`hierpool.algebra.one_term.objective`) plus log |C(phi)|.  Its
statistics at any phi come from the rows' lagged moments, formed once (:func:`hierpool.algebra.ar1.lagged_moments`,
:func:`~hierpool.algebra.ar1.whitened_cross_products`): an evaluation costs per level and lag class, not per row.
Where the compiled batch (:mod:`hierpool.batch.fit_ar1`) and ``hp.lmm``'s fallback search phi in one dimension,
fitting theta at each point, this search (``hp.lmm``'s own first choice too) moves (theta, u) together, u nlme's unconstrained coefficient of phi: the batch's
Newton method on the host (:func:`hierpool.algebra.search.newton.newton_on_host`), its gradient the complex step in
theta and u at once (:func:`hierpool.algebra.one_term.complex_objective` on complex statistics).  Both reach the
profile's minimum; the joint search takes a few Newton steps where the profile takes a whole theta search per
point of phi.

It starts where ``hp.lmm`` starts: u at the lag-1 correlation of the residuals of a fit at phi = 0 (corAR1;
u = -3 for corCAR1), :func:`hierpool.algebra.ar1.lag_one_phis`, and theta at that fit's (or, where that fit
is singular, at the moments of the data whitened at u's start); with terms on one factor that fit is of their
block-diagonal term, as ``hp.lmm``'s is of the terms.  A search that leaves u's range (``hp.lmm``'s,
:data:`hierpool.algebra.ar1.UNCONSTRAINED_LIMIT`) sees NaN there, as outside any criterion's domain; a search
whose next step would leave it from near its end ends there (:func:`_heading_out`), and a dataset whose u stops at
the range's edge (independent noise: phi to 0), or so near it, is fitted again in theta with u held at the range's
end, where ``hp.lmm``'s bounded search ends (:func:`held_at_edge`), and reported ``edge``.  Each dataset's result
carries the criterion's curvature in u profiled over theta at the optimum, from the search's last Hessian
(:func:`hierpool.algebra.ar1.profile_curvature`): phi's interval in ``hp.lmm``, and in both the check that the
search did not stop on a flat stretch (:func:`hierpool.algebra.ar1.clearly_curved`).
"""

from __future__ import annotations

import numpy as np

from ..ar1 import (
    UNCONSTRAINED_LIMIT,
    at_edge,
    clearly_curved,
    constrained_phi,
    first_u,
    lag_one_phis,
    lagged_moments,
    profile_curvature,
    unconstrained_phi,
    whitened_cross_products,
    whitened_statistics,
)
from ..checks import SINGULAR_TOL, onto_boundary, singular_rows
from ..linalg import (
    block_diagonal_positions,
    block_diagonal_theta,
    canonical_theta,
    dataset_cells,
    distinct_columns,
    term_results,
)
from ..one_term import COMPLEX_STEP, complex_objective, solution
from ..statistics import location_shifts
from .newton import moment_start, newton_on_host
from .terms import negative_curvature, search_statistics_on_host

#: Most parameters (k(k+1)/2: up to three coefficients per level) of a one-term AR(1) batch searched on
#: the host (this module): its complex-step gradient in (theta, u) costs one evaluation per
#: parameter, where the compiled reverse mode costs a few whatever their number, so wider terms compile
#: (benchmarks/RESULTS.md, "Batch fitting for every model, tenth session").
HOST_MAX_THETA = 6

#: How steeply (relative to the criterion, per unit of u) the criterion may fall from the edge of u's range into it
#: where a search held there is kept (:func:`held_at_edge`): the complex step's rounding.  At car1's edge fits of
#: independent noise it rose into the range by 3e-9 to 2e-7 (benchmarks/RESULTS.md, "car1 fits with phi at the edge
#: kept").
EDGE_SLOPE_TOL = 1e-12

#: How near the end of u's range (:data:`~hierpool.algebra.ar1.UNCONSTRAINED_LIMIT`) a joint search's stop on a flat
#: stretch is tried at the end (:func:`held_at_edge`): car1's flat stops in null simulations lay within 0.03 of it
#: (phi 6.3e-6 against the end's 6.1e-6; benchmarks/RESULTS.md, "car1 fits with phi at the edge kept").
NEAR_EDGE = 1.0

#: How much higher (relative) the fit at the end of u's range may be than a flat stop near it, and replace it
#: (:func:`held_at_edge`): rounding, far inside the batch's 1e-8 agreement with ``hp.lmm``.
HELD_TOL = 1e-10

#: The points of u at which a joint search's stop at u's edge or on a flat stretch is compared with the profile
#: (:func:`lowest_on_profile`): u's range in steps of 1.5 (corCAR1's phi 6.1e-6, 2.8e-5, ..., 0.99999).
PROFILE_GRID = np.linspace(-UNCONSTRAINED_LIMIT, UNCONSTRAINED_LIMIT, 17)

#: The grid's fits in theta take up to this many times the search's passes (:func:`lowest_on_profile`): far from the
#: stop (phi 0.5 where it stopped near 0) a fit near theta's boundary crawls, and one not converged sends its dataset
#: to ``hp.lmm``; in 200 null datasets 6 such refits at 1x, 1 at 4x (benchmarks/RESULTS.md, "car1 fits with
#: phi at the edge kept").
GRID_PASSES = 4

#: A grid fit of :func:`lowest_on_profile` ends once its criterion lies this far above the stop it is compared with
#: (in the criterion's units, -2 log L), and :data:`GRID_DECIDED_FACTOR` times the decrease its next step promises
#: (-g^T s) above that: the comparison is then decided, and the fit's last passes, crawling along theta's boundary in
#: null simulations (up to 239 passes of a grid point, its criterion falling by ~1e-3 in all, 17 or more above the
#: stop), would not change it (benchmarks/RESULTS.md, fifty-seventh session).
GRID_DECIDED_GAP = 1.0
GRID_DECIDED_FACTOR = 10.0

#: The one-term AR(1) host search's temporaries per dataset (:func:`host_bytes`): its complex-step probes hold about
#: this many arrays of (points x directions x ell) complex values.
HOST_PROBE_ARRAYS = 60


def host_bytes(k: int, p: int, ell: int, lag_classes: int, rows: int) -> int:
    """A chunk's bytes per dataset of ``ell`` levels and at most ``rows`` rows (:func:`hierpool.batch.plan.host_chunk`),
    k coefficients a level, p fixed effects and at most ``lag_classes`` lags a level: the rows it keeps (their
    columns and differences, about 8 r + 4 values a row), the lagged moments, (3 J + 1) ell r^2 values
    (r = k + p + 1); the whitened cross-products of an evaluation's phis (two a trial: its own and its step in u);
    and the complex-step probes of (theta, u), m + 1 points (a trial and its forward differences) by m directions,
    m = k(k+1)/2 + 1, each about :data:`HOST_PROBE_ARRAYS` per-level arrays and a direction's statistics.  The peaks
    measured with ``tracemalloc`` were 0.45-0.97 of it (p = 2 to 41, k = 1 and 2, up to 99 lag classes a level;
    benchmarks/RESULTS.md, "AR(1) batches on the host, nineteenth session")."""
    m, r = k * (k + 1) // 2 + 1, k + p + 1
    probes = (m + 1) * m
    return (16 * probes * (HOST_PROBE_ARRAYS * ell + ell * k * r + r * r) + 16 * 8 * ell * r * r
            + 16 * (3 * lag_classes + 1) * ell * (r * r + 10) + 8 * (8 * r + 4) * rows)


class OneDataset:
    """One dataset as the source of a chunk (what :class:`ChunkRows` reads of a batch's plan,
    :class:`hierpool.batch.plan.BatchPlan`): the design's rows, the dataset ``0``.  ``hp.lmm(..., correlation=)``
    searches its one dataset with it (:mod:`hierpool.closedform.ar1`)."""

    def __init__(self, design):
        self.design = design
        self.n_obs = np.array([design.n])
        self.term_levels = tuple((term.index, np.array([term.n_levels]), None) for term in design.terms)

    def dataset_rows(self) -> list[np.ndarray]:
        return [np.arange(self.design.n)]


class ChunkRows:
    """A chunk's design rows (``rows``), each one's dataset among ``members``, predecessor in its series among the
    rows and lag, X, y - offset - X beta0 (``beta_shift`` beta0) and the datasets' row counts: what both AR(1) host
    searches read (this one and :mod:`hierpool.algebra.search.ar1_systems`).  ``plan``: a batch's plan, or
    :class:`OneDataset`."""

    def __init__(self, plan, series, members: np.ndarray):
        design = plan.design
        own = plan.dataset_rows()
        self.rows = rows = np.concatenate([own[d] for d in members])
        position = np.full(design.n, -1)
        position[rows] = np.arange(len(rows))
        previous = series.previous[rows]
        # a series lies within its dataset (batch_series keys them by dataset): its predecessor is in the chunk
        self.previous = np.where(previous >= 0, position[np.maximum(previous, 0)], -1)
        self.lag = series.lag[rows]
        self.dataset = np.repeat(np.arange(len(members)), [len(own[d]) for d in members])
        self.X = design.X[rows]
        self.beta_shift, self.y = location_shifts(self.dataset, self.X, design.y_less_offset[rows], None, len(members))
        self.n = plan.n_obs[members].astype(float)

    def start_u(self, residual: np.ndarray, continuous: bool) -> np.ndarray:
        """Each dataset's u where ``hp.lmm``'s search starts: its residuals' lag-1 correlation
        (:func:`hierpool.algebra.ar1.lag_one_phis`) on the unconstrained scale; where that is not finite (a first
        fit that failed), the first fit's own u."""
        phi = lag_one_phis(residual, self.previous, self.lag, self.dataset, len(self.n), continuous)
        u = unconstrained_phi(phi, continuous)
        return np.where(np.isfinite(u), u, first_u(continuous))


class ChunkData(ChunkRows):
    """A chunk's rows (:class:`ChunkRows`) and the lagged moments of [z, X, y - offset - X beta0] per (dataset,
    level); z the terms' columns side by side where they share their factor (:func:`hierpool.algebra.linalg.shared_factor`),
    ``ks`` their widths and ``k`` their sum."""

    def __init__(self, plan, series, members: np.ndarray):
        super().__init__(plan, series, members)
        level_of, n_levels, _ = plan.term_levels[0]
        self.level = level_of[self.rows]
        self.ell = int(n_levels[members].max())
        self.ks = tuple(term.k for term in plan.design.terms)
        self.k = sum(self.ks)
        self.positions = block_diagonal_positions(self.ks)  # the terms' thetas in the one term's
        self.z = np.column_stack([term.z[self.rows] for term in plan.design.terms])
        self.moments = lagged_moments(self.dataset, self.level, np.column_stack([self.z, self.X, self.y]),
                                      self.previous, self.lag, len(members), self.ell)

    def merged_theta(self, theta: np.ndarray) -> np.ndarray:
        """The one term's theta of the terms' thetas (:func:`hierpool.algebra.linalg.block_diagonal_theta`)."""
        return block_diagonal_theta(theta, self.ks)

    def statistics(self, phi: np.ndarray, rows=slice(None)):
        """The one-term statistics of datasets ``rows`` whitened at ``phi`` (A, S): leading axes (A, S); and
        log |C(phi)| (A, S)."""
        cross, log_det = whitened_cross_products(self.moments.take(rows), phi)
        return whitened_statistics(cross, self.k, self.n[rows][:, None], self.beta_shift[rows][:, None]), log_det

    def residuals(self, beta: np.ndarray, b: np.ndarray) -> np.ndarray:
        """y - offset - X beta - z b per row, from each dataset's beta (the user's scale) and level effects b."""
        fixed = np.einsum("np,np->n", self.X, (beta - self.beta_shift).take(self.dataset, axis=0))
        return self.y - fixed - np.einsum("nk,nk->n", self.z, dataset_cells(b, self.dataset, self.level))


def _at_one_phi(pair):
    """The statistics of a (statistics, log |C|) pair evaluated at one phi per dataset (S = 1), that axis dropped."""
    return pair[0].map_arrays(lambda a: a[:, 0] if np.ndim(a) > 1 else a)


def start(data: ChunkData, continuous: bool, reml: bool, max_iterations: int) -> np.ndarray:
    """Each dataset's start (theta, u) (D, m + 1), where ``hp.lmm``'s search starts (the module notes)."""
    D = len(data.n)
    u_first = np.full((D, 1), first_u(continuous))
    stats = _at_one_phi(data.statistics(constrained_phi(u_first, continuous)))
    # terms on one factor: the fit of their block-diagonal term (hp.lmm's of the terms), from the moments' blocks
    theta = search_statistics_on_host(stats, moment_start(stats)[:, data.positions], reml, max_iterations,
                                      term_ks=data.ks)["theta"]
    solved = solution(data.merged_theta(theta), stats, reml=True)  # hp.lmm's residuals are the REML solution's
    u = data.start_u(data.residuals(np.asarray(solved.beta), np.asarray(solved.b[0])), continuous)
    # theta from that fit, as hp.lmm's next fit starts from the last one's, unless it is singular (lme4's rule;
    # hp.lmm's own is a diagonal below 0.05, too coarse for a slope in small units): a vanishing direction's
    # gradient is zero there, and the search would not leave it.  Then the moments at phi's start
    singular = singular_rows(theta, data.ks, SINGULAR_TOL)
    if singular.any():
        at_start = _at_one_phi(data.statistics(constrained_phi(u[singular, None], continuous), singular))
        theta[singular] = moment_start(at_start)[:, data.positions]
    return np.column_stack([theta, u])


def joint_criterion(data: ChunkData, continuous: bool, reml: bool):
    """``value_and_grad(points, rows)`` for :func:`newton_on_host`: the criterion at (theta, u) points (A, Q, m + 1)
    of datasets ``rows``, and its gradient by the complex step, every direction in one evaluation: the m steps in
    theta on the real statistics, the step in u on the statistics whitened at complex phi.  NaN outside u's range."""
    def value_and_grad(points, rows):
        A, Q, size = points.shape
        theta, u = points[..., :-1], points[..., -1]
        # a forward-difference shift in theta keeps its trial's u exactly: each distinct column of u whitened once
        distinct, column = distinct_columns(u)
        stats, log_det = data.statistics(constrained_phi(u[:, distinct] + 1j * COMPLEX_STEP, continuous), rows)
        if len(distinct) > 1:  # (n and beta0 have an axis of 1 there, broadcast as a single column's are)
            stats = stats.map_arrays(lambda a: a[:, column] if np.shape(a)[1:2] == (len(distinct),) else a)
        log_det = log_det[:, column]

        def per_direction(a):  # (A, Q, ...) -> (A, Q, m + 1, ...): the real part m times, then the complex array
            a = np.broadcast_to(a, (A, Q) + np.shape(a)[2:]).astype(complex)
            real = np.broadcast_to(a.real[:, :, None], (A, Q, size - 1) + a.shape[2:])
            return np.concatenate([real, a[:, :, None]], axis=2)

        directions = theta[..., None, :] + 1j * COMPLEX_STEP * np.eye(size)[:, :-1]  # the last: theta itself
        values = complex_objective(data.merged_theta(directions), stats.map_arrays(per_direction), reml=reml,
                                   domain_checked=True)
        values = values + per_direction(log_det[..., None])[..., 0]
        value = np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, values[..., 0].real)
        return value, values.imag / COMPLEX_STEP

    return value_and_grad


def joint_newton(value_and_grad, points: np.ndarray, max_iterations: int, across_zero=None, **options) -> tuple:
    """:func:`~hierpool.algebra.search.newton.newton_on_host`'s search of (theta, u) from ``points`` (D, m + 1),
    with ``with_curvature``; where ``across_zero`` (D,) bool is set (corAR1 series mostly an even number of steps
    apart, :func:`~hierpool.algebra.ar1.sign_in_doubt`), a second search from the first one's optimum with u's
    sign turned (``hp.lmm``'s rule, :func:`hierpool.closedform.ar1.across_zero`, which searches again where the
    criterion there is lower; a second search from the start's opposite began at u 0.007 on the same side), and
    per dataset the lower of the two (a failed search's criterion is inf): such a criterion may have a minimum on
    each side of phi = 0, and a search keeps the side it starts on.  A dataset whose u stopped at its range's edge
    is then fitted in theta with u held at the range's end (:func:`held_at_edge`).  ``options``: newton_on_host's, other than its
    per-dataset callbacks (``shift_gradients``, ``trailing_curvature``), which the second search could not map to
    its datasets."""
    if {"shift_gradients", "trailing_curvature"} & set(options):
        raise TypeError("joint_newton maps value_and_grad's rows alone: no shift_gradients or trailing_curvature")
    joint = {**options, "settled": _heading_out}  # (the searches in (theta, u); held_at_edge's in theta take options)
    searched = newton_on_host(value_and_grad, points, max_iterations, with_curvature=True, **joint)
    found = held_at_edge(value_and_grad, searched, max_iterations, **options)
    doubt = np.flatnonzero(np.zeros(len(points), bool) if across_zero is None else across_zero)
    if not doubt.size:
        return found
    flipped = np.where(np.isfinite(searched[0][doubt]), searched[0][doubt], points[doubt])
    flipped[:, -1] = -flipped[:, -1]

    def mirrored(trial, rows):
        return value_and_grad(trial, doubt[rows])

    # each side fitted at the end where it stopped near it (held_at_edge) before the two are compared: a search
    # ended heading out of the range stands where it ended, above its value at the end
    other = held_at_edge(mirrored, newton_on_host(mirrored, flipped, max_iterations, with_curvature=True, **joint),
                         max_iterations, **options)
    lower = other[1] < found[1][doubt]
    out = [np.array(a, copy=True) for a in found]
    for a, b in zip(out, other):
        a[doubt[lower]] = b[lower]
    return tuple(out)


def _heading_out(rows, points, value, gradient, step, definite) -> np.ndarray:
    """:func:`joint_newton`'s ``settled`` (:func:`~hierpool.algebra.search.newton.newton_on_host`): a search whose u
    is within :data:`NEAR_EDGE` of its range's end and whose next step would take it beyond that end ends there,
    and :func:`held_at_edge` fits it at the end.  Past the end the criterion is NaN, so such a search would
    otherwise crawl to the end over rejected steps and their damping: ~50 passes where ~10 reached u -11.3 in null
    simulations (benchmarks/RESULTS.md, fifty-seventh session)."""
    u, reach = points[:, -1], points[:, -1] + step[:, -1]
    return _near_edge(u) & (np.abs(reach) > UNCONSTRAINED_LIMIT) & (u * reach > 0)


def _near_edge(u: np.ndarray) -> np.ndarray:
    """Whether u lies within :data:`NEAR_EDGE` of an end of its range: where :func:`held_at_edge` tries a stop at
    the end, and from where :func:`_heading_out` ends a search."""
    return np.abs(u) >= UNCONSTRAINED_LIMIT - NEAR_EDGE


def held_at_edge(value_and_grad, found: tuple, max_iterations: int, **options) -> tuple:
    """``found`` (:func:`joint_newton`'s search) with each dataset whose u stopped at its range's edge
    (|u| >= UNCONSTRAINED_LIMIT - EDGE) fitted again in theta alone, u held at the range's end, +-
    :data:`~hierpool.algebra.ar1.UNCONSTRAINED_LIMIT`: ``hp.lmm``'s bounded search over that range ends there too.

    The criterion is flat in u there (every c = phi^lag within ~1e-5 of 0 or 1), so the joint Newton steps stop
    wherever the range's NaN rejects them, with theta where the joint step left it, or short of the edge where the
    profile is too flat to tell (:func:`hierpool.algebra.ar1.clearly_curved`, whose stops ``hp.fit_batch`` would fit
    alone), or :func:`joint_newton` ends them heading out of the range (:func:`_heading_out`).  A few steps in theta
    at the end reach the profile's value there (equal to ``hp.lmm``'s to ~1e-13 relative in the null simulations of
    benchmarks/RESULTS.md, "car1 fits with phi at the edge kept").  A flat or unconverged stop within
    :data:`NEAR_EDGE` of the end is replaced by the fit at the end where that is not higher (by :data:`HELD_TOL` of
    the criterion); a stop at the edge always is.  Such a dataset is reported converged only
    where the search in theta converged and the end is the profile's minimum as far as its slope tells: the
    criterion's derivative in u there (the profile's, theta being optimal) does not fall into the range by more than
    :data:`EDGE_SLOPE_TOL` of the criterion; otherwise (a minimum inside that the joint search missed) it is not,
    and ``hp.fit_batch`` fits it alone.  Its curvature is NaN (phi has no interval at the edge; ``hp.lmm`` warns)."""
    point, value, hessian = found[0], found[1], found[5]
    u = point[:, -1]
    with np.errstate(invalid="ignore"):
        edge = at_edge(u)
        # (a search ended heading out of the range is unconverged where it stands)
        near = _near_edge(u) & (~clearly_curved(profile_curvature(hessian)) | (~found[4] & np.isfinite(value)))
    rows = np.flatnonzero(edge | near)
    if not rows.size:
        return found
    end = np.sign(u[rows]) * UNCONSTRAINED_LIMIT
    theta, held_value, newton_step, iterations, converged, slope = theta_at(
        value_and_grad, rows, end, point[rows, :-1], max_iterations, with_slope=True, saddle_check=True, **options)
    # the slope into the range (u decreasing from +12, increasing from -12): a descent there is a missed minimum
    with np.errstate(invalid="ignore"):  # (a NaN slope is no evidence: not kept)
        falling = ~(np.sign(end) * slope <= EDGE_SLOPE_TOL * np.abs(held_value))
    with np.errstate(invalid="ignore"):
        kept = edge[rows] | (held_value <= value[rows] + HELD_TOL * np.abs(value[rows]))
    rows, theta, end = rows[kept], theta[kept], end[kept]
    out = [np.array(a, copy=True) for a in found]
    out[0][rows] = np.column_stack([theta, end])
    out[1][rows], out[2][rows], out[3][rows] = held_value[kept], newton_step[kept], out[3][rows] + iterations[kept]
    out[4][rows] = converged[kept] & ~falling[kept]
    out[5][rows] = np.nan
    return tuple(out)


def checked_on_profile(value_and_grad, found: tuple, max_iterations: int, **options) -> tuple:
    """``found`` (:func:`joint_newton`'s) checked by :func:`lowest_on_profile`, and ``flat_lowest`` per dataset: an
    edge stop not at or below the profile is no longer converged (``hp.fit_batch`` fits it alone, ``hp.lmm`` runs
    Brent's search), a flat stop inside the range that is is ``flat_lowest`` (kept; else the same)."""
    lowest = lowest_on_profile(value_and_grad, found, max_iterations, **options)
    with np.errstate(invalid="ignore"):
        edge = at_edge(found[0][:, -1])
    out = list(found)
    out[4] = found[4] & (lowest | ~edge)
    return tuple(out), lowest & ~edge


def theta_at(value_and_grad, rows: np.ndarray, u: np.ndarray, theta0: np.ndarray, max_iterations: int,
             with_slope: bool = False, saddle_check: bool = False, **options) -> tuple:
    """The criterion profiled over theta at fixed u: :func:`~hierpool.algebra.search.newton.newton_on_host`'s search
    in theta alone of datasets ``rows`` (B,) (increasing, each once: the several-term systems' rule), search b's u
    held at ``u[b]``, from ``theta0`` (B, m).
    ``value_and_grad``: :func:`joint_criterion`'s (or the several-term search's).  Returns (theta, value, newton_step,
    iterations, converged, slope): newton_on_host's, with ``saddle_check`` a search that stopped where its curvature
    has a negative direction not converged (a variance at 0 whose criterion falls off it: its gradient vanishes there
    by symmetry, and a search started next to it stays; :func:`~hierpool.algebra.search.terms.negative_curvature`),
    and with ``with_slope`` the criterion's derivative in u at the optimum (the profile's, theta being optimal
    there; one more evaluation), else None.  :func:`held_at_edge` checks (its fit is the dataset's result);
    :func:`lowest_on_profile`'s grid fits do not: in null car1 fits with a slope's variance at 0, 5-16% of datasets
    had a grid point on such a saddle, 0.18-11 above the stop, and were fitted alone for nothing
    (benchmarks/RESULTS.md, fifty-seventh session)."""
    def with_u(theta, searches):  # points (A, Q, m) in theta -> (A, Q, m + 1), u that of ``searches``
        return np.concatenate([theta, np.broadcast_to(u[searches][:, None, None], theta.shape[:-1] + (1,))], axis=-1)

    def theta_alone(trial, searches):
        value, gradient = value_and_grad(with_u(trial, searches), rows[searches])
        return value, gradient[..., :-1]

    theta, value, newton_step, iterations, converged, curvature = newton_on_host(
        theta_alone, theta0, max_iterations, with_curvature=True, **options)
    if saddle_check:
        converged = converged & ~negative_curvature(curvature)
    if not with_slope:
        return theta, value, newton_step, iterations, converged, None
    gradient = value_and_grad(with_u(theta[:, None, :], np.arange(len(rows))), rows)[1]
    return theta, value, newton_step, iterations, converged, gradient[:, 0, -1]


def lowest_on_profile(value_and_grad, found: tuple, max_iterations: int, **options) -> np.ndarray:
    """Per dataset, whether a joint search's stop that ``hp.fit_batch`` would otherwise fit alone by ``hp.lmm`` (a
    converged stop at u's edge, :func:`held_at_edge`'s; or one inside the range where the profile is nearly flat,
    :func:`hierpool.algebra.ar1.clearly_curved` false: phi barely identified, as in data without autocorrelation)
    lies at or below (by :data:`HELD_TOL`) the criterion profiled over theta (:func:`theta_at`, from the stop's
    theta) at every point of :data:`PROFILE_GRID`, each of those fits converged or ended already far above the stop
    (:data:`GRID_DECIDED_GAP`: the profile there lies above it, whatever the fit's last passes would have taken off).
    ``hp.lmm``'s Brent search over
    u's range assumes the profile has one minimum there; this checks the stop against the profile at those points
    (a lower point, or a grid fit that did not converge, and the dataset is fitted alone).  False for every other
    dataset (curved or failed stops).  One grid point at a time over the stops, each dataset once a search: the
    several-term systems take each dataset once, and the chunk's temporaries stay those of its search
    (:func:`host_bytes`)."""
    point, value, converged, hessian = found[0], found[1], found[4], found[5]
    with np.errstate(invalid="ignore"):
        edge = at_edge(point[:, -1])
        flat = ~edge & ~clearly_curved(profile_curvature(hessian))
    lowest = np.zeros(len(point), bool)
    stops = np.flatnonzero(converged & np.all(np.isfinite(point), axis=1) & (edge | flat))
    if not stops.size:
        return lowest
    # each stop's grid points from the nearest outward, each fit from its neighbour's nearer the stop (theta moves
    # with u smoothly: a far point's fit from the stop's own theta took ~2x the steps), until one lies lower
    n_grid = len(PROFILE_GRID)
    nearest = np.argmin(np.abs(point[stops, -1][:, None] - PROFILE_GRID), axis=1)
    order = np.argsort(np.abs(np.arange(n_grid) - nearest[:, None]) * n_grid + np.arange(n_grid), axis=1, kind="stable")
    thetas = np.repeat(point[stops, None, :-1], n_grid, axis=1)  # (S, grid, m): each fit's, once made
    below = np.ones(len(stops), bool)
    for k in range(n_grid):
        active = np.flatnonzero(below)
        if not active.size:
            break
        at = order[active, k]
        parent = np.clip(at + np.sign(nearest[active] - at), 0, n_grid - 1)  # the neighbour nearer the stop
        start = np.where((at == nearest[active])[:, None], point[stops[active], :-1], thetas[active, parent])
        compared = value[stops[active]]
        decided = np.zeros(len(active), bool)

        def settled(rows, theta, grid_value, gradient, step, definite, compared=compared, decided=decided):
            # far above the stop: decided (GRID_DECIDED_GAP), where the step is Newton's on a positive definite
            # curvature (a saddle-free step's promise says nothing of a descent along negative curvature, as from a
            # variance at 0 that is a maximum) and the criterion finite
            promised = np.maximum(-np.sum(gradient * step, axis=-1), 0.0)
            with np.errstate(invalid="ignore"):
                done = (definite & np.isfinite(grid_value)
                        & (grid_value - compared[rows] > GRID_DECIDED_GAP + GRID_DECIDED_FACTOR * promised))
            decided[rows[done]] = True
            return done

        theta, grid_value, _, _, grid_converged, _ = theta_at(value_and_grad, stops[active], PROFILE_GRID[at],
                                                              start, GRID_PASSES * max_iterations,
                                                              **{**options, "settled": settled})
        thetas[active, at] = theta
        with np.errstate(invalid="ignore"):
            below[active] = (grid_converged | decided) & (compared <= grid_value + HELD_TOL * np.abs(compared))
    lowest[stops] = below
    return lowest


def at_boundary(value_and_grad, theta: np.ndarray, u: np.ndarray, value: np.ndarray, ks) -> tuple:
    """(theta, criterion) of a chunk's joint searches (``theta`` canonical, ``u`` each one's) ended on lme4's
    boundary as the other searches end (:func:`hierpool.algebra.checks.onto_boundary`), at each dataset's u
    (``value_and_grad``: :func:`joint_criterion`'s).  The joint Newton search left a variance that ``hp.lmm``'s
    AR(1) fit puts at 0 at an sd of 3e-8 to 1.8e-5, flagged singular both ways, the criteria equal to 1e-13 (the
    fifty-ninth session's probe)."""
    def evaluate(thetas, rows):
        points = np.concatenate([thetas, u[rows][:, None]], axis=1)[:, None, :]
        return value_and_grad(points, rows)[0][:, 0]

    return onto_boundary(theta, value, evaluate, ks)


def search_on_host(data: ChunkData, *, continuous: bool, reml: bool, max_iterations: int, decrease_tol=None,
                   across_zero=None) -> dict:
    """Fit a chunk's datasets (``data``: their rows and lagged moments): a chunk's results as
    :func:`hierpool.batch.fit_ar1.fit_ar1`'s compiled programs return them (per-term lists of factors, b and
    conditional variances padded to the chunk's levels, ``phi`` and ``edge``).  ``across_zero``: the datasets
    searched on both sides of phi = 0 too (:func:`joint_newton`); edge and flat stops checked on the profile
    (:func:`checked_on_profile`: ``flat_lowest``).  Its module
    imports no JAX, as a worker process's search must (:mod:`hierpool.batch.host_processes`), though its chunks run
    on threads (:mod:`hierpool.batch.fit_ar1`)."""
    value_and_grad = joint_criterion(data, continuous, reml)
    options = {"decrease_tol": decrease_tol, "saddle_free": True}
    with np.errstate(all="ignore"):
        found = joint_newton(value_and_grad, start(data, continuous, reml, max_iterations), max_iterations,
                             across_zero, **options)
        found, flat_lowest = checked_on_profile(value_and_grad, found, max_iterations, **options)
    point, value, newton_step, iterations, converged, hessian = found
    theta, u = canonical_theta(point[:, :-1], data.ks), point[:, -1]
    theta, value = at_boundary(value_and_grad, theta, u, value, data.ks)
    phi = constrained_phi(u, continuous)
    stats = _at_one_phi(data.statistics(phi[:, None]))
    with np.errstate(all="ignore"):
        solved = solution(data.merged_theta(theta), stats, reml=reml)
    b, cond_var, factors = term_results(solved.b[0], solved.cond_var[0], solved.factors[0], data.ks)
    # at the edge: converged with u held at the range's end (held_at_edge)
    edge = at_edge(u)
    return {"theta": theta, "objective": value, "phi": phi, "converged": converged, "edge": edge,
            "curvature": profile_curvature(hessian), "flat_lowest": flat_lowest,
            "newton_step": newton_step, "iterations": iterations, "beta": np.asarray(solved.beta),
            "vcov": np.asarray(solved.vcov_beta), "sigma": np.asarray(solved.sigma),
            "b": b, "cond_var": cond_var, "factors": factors}
