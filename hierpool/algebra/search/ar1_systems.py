"""``hp.fit_batch(..., correlation=)`` with several random-effect terms on the host: (theta, u) searched together over
a chunk of datasets, on the whitened systems, in NumPy.

The one-term search (:mod:`hierpool.algebra.search.ar1_moments`) reads per-level moments; with several terms a dataset's
criterion is the general blocked one (:func:`hierpool.algebra.criterion.objective`) of its system of whitened
cross-products.  Newton's method moves (theta, u) together (:func:`hierpool.algebra.search.newton.newton_on_host`,
saddle-free steps, the interpolated damping of the several-term linear search), its gradient in theta the host
adjoint (:func:`hierpool.algebra.criterion.host_objective_and_gradient`), and in u the same adjoint's derivative
along the systems' derivative in u (``along``), which is the imaginary part of the systems whitened at u + i h (the
complex step of the systems alone, below), and log |C|'s.

**The systems at phi.**  A row that follows another at lag L whitens to w = (d + (1 - c) v_-) / sqrt(1 - c^2),
c = phi^L, d = v - v_- (:func:`hierpool.algebra.ar1.lagged_moments`' algebra), and a series is within one level
of every term (:func:`hierpool.closedform.ar1.check_nested`), so its whitened row keeps its levels.  Each system is
bilinear in its rows, so the system at any phi is a combination of the systems of d, of d and v_- crossed (the
system of d + v_- less the other two) and of v_-, one each per lag class (numbered within each dataset,
:func:`hierpool.algebra.ar1.lag_classes`), and of the first rows' (:func:`hierpool.algebra.ar1.lag_class_weights`):
formed once per chunk (:func:`hierpool.algebra.batched_systems.batched_systems` 3 J + 1 times) where they pay
(:func:`lagged_systems_pay`: few lags, as corAR1's one), and then an evaluation combines them, at a complex phi too,
and whitens no rows.  Otherwise (many distinct lags in continuous time) each evaluation whitens the rows
(:func:`hierpool.algebra.ar1.whiten`) and builds their system; the complex system's imaginary part is then a product
of real rows, h (w t^T + t w^T) with w the whitened rows and t their derivative in u, taken as
(S(w + t) - S(w - t)) / 2 from three real builds S.  Both give the same systems (``tests/test_batch_ar1.py``).

It starts where ``hp.lmm`` starts: u at the lag-1 correlation of the residuals of a fit at phi = 0 (corAR1; u = -3 for
corCAR1), :func:`hierpool.algebra.ar1.lag_one_phis`, and theta at that fit's (the several-term host search,
:func:`hierpool.algebra.search.terms.search_on_host`, from the linear models' moment start), or at that start where
that fit is singular.  A dataset whose u stops at its range's edge is fitted in theta with u held at the range's end,
as the one-term search's (:func:`hierpool.algebra.search.ar1_moments.held_at_edge`).  Each result
carries the profiled criterion's curvature in u, as the one-term search's does
(:func:`hierpool.algebra.ar1.profile_curvature`).
"""

from __future__ import annotations

import numpy as np

from ..ar1 import (
    UNCONSTRAINED_LIMIT,
    at_edge,
    carried,
    constrained_phi,
    first_u,
    lag_class_weights,
    lag_classes,
    profile_curvature,
    weighted_sums,
    whiten,
)
from ..batched_systems import batched_systems, map_arrays, shared_grid, system_arrays, system_entries
from ..checks import SINGULAR_TOL, singular_rows
from ..criterion import host_objective_and_gradient
from ..henderson import solve
from ..linalg import canonical_theta, dataset_cells, distinct_columns
from ..one_term import COMPLEX_STEP
from .ar1_moments import HOST_MAX_THETA, ChunkRows, at_boundary, checked_on_profile, joint_newton
from .newton import DECREASE_TOL
from .terms import host_bytes as linear_host_bytes
from .terms import search_on_host as theta_search
from .terms import solved_entries


def host_bytes(ks, widths, p: int, lagged_classes: int | None) -> int:
    """A chunk's bytes per dataset (:func:`hierpool.batch.plan.host_chunk`): the several-term host search's
    (:func:`hierpool.algebra.search.terms.host_bytes`, u one parameter more) two and a half times, for the complex
    systems of the step in u (measured: benchmarks/RESULTS.md, nineteenth session), and the sums of
    ``lagged_classes`` lag classes where the chunk forms them (:func:`lagged_bytes`; None: it does not)."""
    search = 5 * linear_host_bytes(ks, widths, p, extra_parameters=1) // 2
    return search + (0 if lagged_classes is None else lagged_bytes(lagged_classes, ks, widths, p))


def lagged_bytes(classes: int, ks, widths, p: int) -> int:
    """The lag classes' sums of a dataset's system (:class:`TermsChunk`) in bytes: 3 J + 1 systems, twice (an
    evaluation of fewer than all the chunk's datasets gathers theirs)."""
    return 16 * (3 * classes + 1) * system_entries(widths, ks, p)


def joint_search_kind(ks, one_factor: bool) -> str | None:
    """Which host search moves (theta, u) together for random-effect terms of widths ``ks``: ``"moments"`` for one
    term, or terms on one grouping factor (``one_factor``, fitted as one block-diagonal term), of at most
    :data:`~hierpool.algebra.search.ar1_moments.HOST_MAX_THETA` parameters (:mod:`~hierpool.algebra.search.
    ar1_moments`: its complex step costs an evaluation per parameter); ``"systems"`` for other several-term models
    (this module); None for one wider term (``hp.lmm``'s Brent search, the batch's compiled golden sections).  The
    one rule of ``hp.lmm`` (:func:`hierpool.closedform.ar1.joint_search`, which adds its dense coupling's bound) and
    ``hp.fit_batch`` (:mod:`hierpool.batch.fit_ar1`, which adds its device and float type)."""
    k = sum(ks)
    if one_factor and k * (k + 1) // 2 <= HOST_MAX_THETA:
        return "moments"
    return "systems" if len(ks) > 1 else None


#: Values of the lag classes' sums combined (3 J + 1 systems' values) per product of a row's columns, (sum_j k_j + p +
#: 1)^2 a row, below which a chunk forms the sums (:func:`lagged_systems_pay`).
LAGGED_VALUES_PER_PRODUCT = 30


def lagged_systems_pay(classes: int, ks, widths, p: int, rows: float, budget: float) -> bool:
    """Whether a chunk of datasets of about ``rows`` rows each and ``classes`` lag classes forms their sums
    (:class:`TermsChunk`).  An evaluation then combines 3 J + 1 systems' values at each phi, where the rows'
    path whitens the rows and builds their systems three times; a combined value costs about a thirtieth of a row's
    product (:data:`LAGGED_VALUES_PER_PRODUCT`, timed per call on shapes from one lag to 64 classes:
    benchmarks/RESULTS.md, twenty-sixth session).  The sums' bytes count in the chunk's (:func:`host_bytes`); none
    is formed above a host call's ``budget`` (:data:`hierpool.algebra.search.HOST_CHUNK_BYTES`) a dataset."""
    products = rows * (sum(ks) + p + 1) ** 2
    return ((3 * classes + 1) * system_entries(widths, ks, p) <= LAGGED_VALUES_PER_PRODUCT * products
            and lagged_bytes(classes, ks, widths, p) <= budget)


class TermsChunk(ChunkRows):
    """A chunk's rows (:class:`~hierpool.algebra.search.ar1_moments.ChunkRows`) with each term's levels and values;
    ``widths`` the terms' padded level counts; ``lagged``: its systems from the lag classes' sums (the module
    notes; ``sums``, formed where first read), else from the rows whitened at each phi."""

    def __init__(self, plan, series, members: np.ndarray, widths, lagged: bool):
        super().__init__(plan, series, members)
        self.levels = [level[self.rows] for level, _, _ in plan.term_levels]
        self.zs = [term.z[self.rows] for term in plan.design.terms]
        self.widths = [int(w) for w in widths]
        self.ks = tuple(term.k for term in plan.design.terms)
        self.lagged, self.sums = lagged, None  # the sums formed where first read (a worker's chunk: there)
        if lagged:  # the rows that follow another by lag, numbered within their dataset: J classes, a dataset's most
            followed = np.flatnonzero(self.previous >= 0)
            D = len(self.n)
            J, self.lags, lag_class = lag_classes(self.dataset[followed], self.lag[followed], D)
            counts = np.bincount(lag_class, minlength=J)
            order = followed[np.argsort(lag_class, kind="stable")]
            self.classes = np.split(order, np.cumsum(counts)[:-1]) if J else []
            self.class_rows = np.bincount(self.dataset[followed] * J + lag_class, minlength=D * J).reshape(D, J)

    def _lagged_sums(self):
        """The lag classes' sums of the systems (the module notes), formed once: a system whose arrays have axes
        (D, 3 J + 1, ...), the classes' sums of d d^T, then of d v_-^T + v_- d^T (from the system of d + v_- less
        the other two), then of v_- v_-^T, each class in turn, and last the first rows' v v^T."""
        D = len(self.n)
        columns = [*self.zs, self.X, self.y]
        everyone = np.arange(D)

        def built(take, values):
            return self._build(take, self.dataset[take], everyone, values)

        steps, crosses, befores = [], [], []
        for take in self.classes:
            before = [v[self.previous[take]] for v in columns]
            step = [v[take] - b for v, b in zip(columns, before)]
            dd, vv = built(take, step), built(take, before)
            both = built(take, [a + b for a, b in zip(step, before)])
            crosses.append(_combined_sums(lambda b, d, v: b - d - v, both, dd, vv))
            steps.append(dd)
            befores.append(vv)
        firsts = np.flatnonzero(self.previous < 0)
        parts = [*steps, *crosses, *befores, built(firsts, [v[firsts] for v in columns])]
        return _points_systems(parts, slice(None))  # stacked, not copied again

    def systems_at(self, phi: np.ndarray, datasets: np.ndarray):
        """The systems of ``datasets`` whitened at each of ``phi`` (A, S) (complex for the step in u, its imaginary
        part of the size of :data:`~hierpool.algebra.one_term.COMPLEX_STEP`: the systems' derivative is read as
        Im / COMPLEX_STEP): the :func:`shared_grid` form with axes (A, S) before each array's own; and log |C(phi)|
        (A, S).  From the lag classes' sums where the chunk formed them, else from the rows whitened at each phi."""
        if not self.lagged:
            built = [self._whitened(phi[:, s], datasets) for s in range(phi.shape[1])]
            return _points_systems([b[0] for b in built], slice(None)), np.stack([b[1] for b in built], axis=1)
        if self.sums is None:
            self.sums = self._lagged_sums()
        c = phi[..., None] ** self.lags[datasets][:, None, :]  # (A, S, J)
        weights = lag_class_weights(c)  # (A, S, 3 J + 1)
        everyone = np.array_equal(datasets, np.arange(len(self.n)))  # (else a subset, each once, in any order)
        sums = self.sums if everyone else map_arrays(self.sums, lambda a: a[datasets])
        A, S = phi.shape

        def combined(a):
            return weighted_sums(weights, a.reshape(A, a.shape[1], -1)).reshape(A, S, *a.shape[2:])

        systems = map_arrays(sums, combined, fixed=lambda a: np.broadcast_to(a[:, :1], (A, S, *a.shape[2:])))
        return systems, np.einsum("aj,asj->as", self.class_rows[datasets], np.log1p(-c * c))

    def systems(self, phi: np.ndarray, datasets: np.ndarray):
        """The systems of ``datasets`` whitened at ``phi`` (A,) (:meth:`systems_at` of one phi each), the
        :func:`shared_grid` form with a leading dataset axis; and log |C(phi)| per dataset."""
        systems, log_det = self.systems_at(phi[:, None], datasets)
        return map_arrays(systems, lambda a: a[:, 0]), log_det[:, 0]

    def _whitened(self, phi: np.ndarray, datasets: np.ndarray):
        """:meth:`systems` from the rows whitened at ``phi`` (A,): one build of the rows (three where phi is
        complex: the systems' imaginary part is a product of real rows, h (w t^T + t w^T), w the whitened rows and
        t their derivative, taken as (S(w + t) - S(w - t)) / 2)."""
        take, local, previous = self._rows(datasets)
        c = carried(phi[local], previous, self.lag[take])
        columns = [whiten(z[take], previous, c) for z in self.zs] + [whiten(self.X[take], previous, c),
                                                                      whiten(self.y[take], previous, c)]
        logs = np.log1p(-c * c)  # each row's part of log |C| (hierpool.algebra.ar1.log_det_correlation), per dataset
        log_det = np.bincount(local, weights=logs.real, minlength=len(datasets))
        real = self._build(take, local, datasets, [v.real for v in columns])
        if not np.iscomplexobj(c):
            return real, log_det
        log_det = log_det + 1j * np.bincount(local, weights=logs.imag, minlength=len(datasets))
        steps = [v.imag / COMPLEX_STEP for v in columns]
        plus = self._build(take, local, datasets, [v.real + t for v, t in zip(columns, steps)])
        minus = self._build(take, local, datasets, [v.real - t for v, t in zip(columns, steps)])

        # S(w) + i h (w t^T + t w^T), (S(w + t) - S(w - t)) / 2 the latter
        return _combined_sums(lambda w, above, below: w + 0.5j * COMPLEX_STEP * (above - below), real, plus,
                              minus), log_det

    def _rows(self, datasets: np.ndarray):
        """The rows of ``datasets`` (increasing chunk positions, as the search's active datasets are), each row's
        dataset among those, and its predecessor among those rows."""
        assert np.all(np.diff(datasets) > 0), "datasets in increasing order"
        take = np.flatnonzero(np.isin(self.dataset, datasets))
        position = np.full(len(self.dataset), -1)
        position[take] = np.arange(len(take))
        before = self.previous[take]
        return take, np.searchsorted(datasets, self.dataset[take]), \
            np.where(before >= 0, position[np.maximum(before, 0)], -1)

    def _build(self, take, local, datasets, columns):
        """:func:`batched_systems` of rows ``take`` from their columns (each term's values, X, y)."""
        *zs, X, y = columns
        terms = [(level[take], z, width) for level, z, width in zip(self.levels, zs, self.widths)]
        systems, _ = batched_systems(local, len(datasets), terms, X, y, None, None,
                                     shifts=(self.beta_shift[datasets], y))
        return shared_grid(systems, slice(None))

    def residuals(self, solution) -> np.ndarray:
        """y - offset - X beta - sum_j Z_j b_j per row, from a chunk's solution (beta on the user's scale)."""
        beta = np.asarray(solution.beta)  # the systems' beta_shift added back by the solve
        out = self.y - np.einsum("np,np->n", self.X, (beta - self.beta_shift).take(self.dataset, axis=0))
        for level, z, b in zip(self.levels, self.zs, solution.b):
            out = out - np.einsum("nk,nk->n", z, dataset_cells(np.asarray(b), self.dataset, level))
        return out


def _combined_sums(function, first, *others):
    """The systems whose sums of the rows' products (A00, the couplings' values, the rest) are ``function`` of the
    given systems' (each its arrays in turn); ``first``'s log_weights and beta_shift kept."""
    parts = [iter(system_arrays(other, sums_only=True)) for other in others]
    return map_arrays(first, lambda a: function(a, *(next(p) for p in parts)), fixed=lambda a: a)


def _points_systems(built, column):
    """S systems of the same datasets (each with a leading dataset axis) as one with axes (A, Q, ...): point q's is
    system ``column[q]``."""
    parts = [iter(system_arrays(s)) for s in built]
    return map_arrays(built[0], lambda _: np.stack([next(p) for p in parts], axis=1)[:, column])


def joint_criterion(data: TermsChunk, continuous: bool, reml: bool):
    """``value_and_grad(points, rows)`` for :func:`newton_on_host`: the criterion at (theta, u) points (A, Q, m + 1)
    of datasets ``rows``, its gradient in theta by the host adjoint, and in u the adjoint's derivative along the
    systems' derivative in u (the complex step of the systems alone: their imaginary part at u + i h, the module
    notes) with log |C|'s.  NaN outside u's range."""
    def value_and_grad(points, rows):
        theta, u = points[..., :-1], points[..., -1]
        distinct, column = distinct_columns(u)
        complex_systems, log_det = data.systems_at(constrained_phi(u[:, distinct] + 1j * COMPLEX_STEP, continuous),
                                                   rows)
        complex_systems, log_det = map_arrays(complex_systems, lambda a: a[:, column]), log_det[:, column]
        real_systems, stepped = map_arrays(complex_systems, np.real), map_arrays(complex_systems, np.imag)
        value, gradient, along = host_objective_and_gradient(real_systems, reml, n=data.n[rows][:, None],
                                                             along=stepped)(theta)
        in_u = (along + log_det.imag) / COMPLEX_STEP  # the systems' and log |C|'s step in u, h times their derivative
        value = np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value + log_det.real)
        return value, np.concatenate([gradient, in_u[..., None]], axis=-1)

    return value_and_grad


def start(data: TermsChunk, theta0: np.ndarray, continuous: bool, reml: bool, max_iterations: int) -> np.ndarray:
    """Each dataset's start (theta, u) (D, n_theta + 1), where ``hp.lmm``'s search starts (the module notes);
    ``theta0`` the linear models' moment start."""
    D = len(data.n)
    everyone = np.arange(D)
    u_first = np.full(D, first_u(continuous))
    systems, _ = data.systems(constrained_phi(u_first, continuous), everyone)
    fitted = theta_search(systems, data.n, theta0, reml, max_iterations)
    theta = fitted["theta"]
    with np.errstate(all="ignore"):
        solved = solve(theta, systems, reml=True, n=data.n)  # hp.lmm's residuals are the REML solution's
    u = data.start_u(data.residuals(solved), continuous)
    # from that fit's theta unless it is singular (a vanishing direction's gradient is zero there): the moments'
    singular = singular_rows(theta, data.ks, SINGULAR_TOL) | ~np.all(np.isfinite(theta), axis=1)
    theta = np.where(singular[:, None], theta0, theta)
    return np.column_stack([theta, u])


def search_on_host(data: TermsChunk, theta0: np.ndarray, across_zero=None, *, continuous: bool, reml: bool,
                   max_iterations: int) -> dict:
    """Fit a chunk's datasets (``data``; ``theta0`` their moment starts): a chunk's results as
    :func:`hierpool.batch.fit_ar1.fit_ar1`'s compiled programs return them.  ``across_zero``: the datasets
    searched on both sides of phi = 0 too (:func:`~hierpool.algebra.search.ar1_moments.joint_newton`).
    Edge and flat stops checked on the profile (:func:`~hierpool.algebra.search.ar1_moments.checked_on_profile`).
    Imports no JAX: a worker process runs it (:mod:`hierpool.batch.host_processes`), and forms the lag classes' sums
    there."""
    value_and_grad = joint_criterion(data, continuous, reml)
    options = {"decrease_tol": DECREASE_TOL, "saddle_free": True, "interpolated_damping": True}
    with np.errstate(all="ignore"):
        found = joint_newton(value_and_grad, start(data, theta0, continuous, reml, max_iterations), max_iterations,
                             across_zero, **options)
        found, flat_lowest = checked_on_profile(value_and_grad, found, max_iterations, **options)
    point, value, newton_step, iterations, converged, hessian = found
    theta, u = canonical_theta(point[:, :-1], data.ks), point[:, -1]
    theta, value = at_boundary(value_and_grad, theta, u, value, data.ks)
    phi = constrained_phi(u, continuous)
    systems, _ = data.systems(phi, np.arange(len(data.n)))
    with np.errstate(all="ignore"):
        solved = solved_entries(solve(theta, systems, reml=reml, n=data.n))
    # at the edge: converged with u held at the range's end (ar1_moments.held_at_edge)
    edge = at_edge(u)
    return {"theta": theta, "objective": value, "phi": phi, "converged": converged, "edge": edge,
            "curvature": profile_curvature(hessian), "flat_lowest": flat_lowest,
            "newton_step": newton_step, "iterations": iterations, **solved}
