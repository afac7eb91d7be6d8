"""``hp.fit_batch(..., correlation=)`` with several random-effect terms on the host: (theta, u) searched together over
a chunk of datasets, on the whitened systems, in NumPy.

The one-term search (:mod:`hierpool.batch.ar1_search`) reads per-level moments; with several terms a dataset's
criterion is the general blocked one (:func:`hierpool.algebra.criterion.objective`) of its system of whitened
cross-products, which is built again for each phi: the rows whitened (:func:`hierpool.algebra.ar1.whiten`), then
:func:`hierpool.algebra.batched_systems.batched_systems`.  Newton's method moves (theta, u) together
(:func:`hierpool.batch.optimize.newton_on_host`, saddle-free steps, the interpolated damping of the several-term
linear search), its gradient in theta the host adjoint (:func:`hierpool.algebra.criterion.host_objective_and_gradient`)
and in u the complex step: the criterion of the system whitened at u + i h, analytic in the system
(:func:`hierpool.algebra.linalg.cholesky` is L L^T on complex stacks).  That system's imaginary part is a product of
real rows, h (w t^T + t w^T) with w the whitened rows and t their derivative in u, taken as
(S(w + t) - S(w - t)) / 2 from three real builds S.

It starts where ``hp.lmm`` starts: u at the lag-1 correlation of the residuals of a fit at phi = 0 (corAR1; u = -3 for
corCAR1), :func:`hierpool.closedform.ar1.lag_one_phis`, and theta at that fit's (the several-term host search,
:func:`hierpool.batch.terms_search.search_on_host`, from the linear models' moment start), or at that start where
that fit is singular.  A dataset whose phi ends at its range's edge is fitted alone by ``hp.lmm``.  Imports no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..algebra.ar1 import carried, constrained_phi, unconstrained_phi, whiten
from ..algebra.batched_systems import batched_systems, shared_grid
from ..algebra.checks import singular_rows
from ..algebra.criterion import host_objective_and_gradient, objective
from ..algebra.henderson import solve
from ..algebra.linalg import canonical_theta
from ..algebra.one_term import COMPLEX_STEP
from ..algebra.statistics import location_shifts
from ..closedform.ar1 import UNCONSTRAINED_LIMIT, lag_one_phis
from ..closedform.optimize import Control
from .ar1_search import CONTINUOUS_START, EDGE, distinct_columns
from .optimize import DECREASE_TOL, newton_on_host
from .terms_search import search_on_host as theta_search
from .terms_search import solved_entries


def host_bytes(ks, widths, p: int) -> int:
    """A chunk's bytes per dataset (:func:`hierpool.batch.plan.host_chunk`): the several-term host search's
    (``8 (n_theta + 1) (10 m^2 + 3 ell0 k0 m)``, m = sum_(j>0) ell_j k_j + p + 1), times six for the complex systems
    of the step in u and the three builds of each."""
    n_theta = sum(k * (k + 1) // 2 for k in ks) + 1
    m = sum(w * k for w, k in zip(widths[1:], ks[1:])) + p + 1
    return 6 * 8 * (n_theta + 1) * (10 * m * m + 3 * widths[0] * ks[0] * m)


class TermsChunk:
    """A chunk's rows for the search: each term's levels and values, X, y - offset - X beta0, each row's predecessor
    in its series and lag, the datasets' row counts; ``widths`` the terms' padded level counts."""

    def __init__(self, plan, series, members: np.ndarray, widths):
        design = plan.design
        own = plan.dataset_rows()
        rows = np.concatenate([own[d] for d in members])
        counts = np.array([len(own[d]) for d in members])
        position = np.full(design.n, -1)
        position[rows] = np.arange(len(rows))
        previous = series.previous[rows]
        self.previous = np.where(previous >= 0, position[np.maximum(previous, 0)], -1)
        self.lag = series.lag[rows]
        self.dataset = np.repeat(np.arange(len(members)), counts)
        self.levels = [level[rows] for level, _, _ in plan.term_levels]
        self.zs = [term.z[rows] for term in design.terms]
        self.widths = [int(w) for w in widths]
        self.ks = tuple(term.k for term in design.terms)
        self.X = design.X[rows]
        self.beta_shift, self.y = location_shifts(self.dataset, self.X, design.y_less_offset[rows], None, len(members))
        self.n = plan.n_obs[members].astype(float)

    def _rows(self, datasets: np.ndarray):
        """The rows of ``datasets`` (increasing chunk positions, as the search's active datasets are), each row's
        dataset among those, and its predecessor among those rows."""
        take = np.flatnonzero(np.isin(self.dataset, datasets))
        position = np.full(len(self.dataset), -1)
        position[take] = np.arange(len(take))
        before = self.previous[take]
        return take, np.searchsorted(datasets, self.dataset[take]), \
            np.where(before >= 0, position[np.maximum(before, 0)], -1)

    def systems(self, phi: np.ndarray, datasets: np.ndarray):
        """The systems of ``datasets`` whitened at ``phi`` (one per dataset; complex for the step in u): the
        :func:`shared_grid` form with a leading dataset axis; and log |C(phi)| per dataset."""
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

        def combined(w, above, below):  # S(w) + i h (w t^T + t w^T), (S(w + t) - S(w - t)) / 2 the latter
            return w + 0.5j * COMPLEX_STEP * (above - below)

        return dataclasses.replace(
            real, a00=combined(real.a00, plus.a00, minus.a00), rest=combined(real.rest, plus.rest, minus.rest),
            couplings=tuple(dataclasses.replace(r, values=combined(r.values, p.values, m.values))
                            for r, p, m in zip(real.couplings, plus.couplings, minus.couplings))), log_det

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
        out = self.y - np.einsum("np,np->n", self.X, beta[self.dataset] - self.beta_shift[self.dataset])
        for level, z, b in zip(self.levels, self.zs, solution.b):
            out = out - np.einsum("nk,nk->n", z, np.asarray(b)[self.dataset, level])
        return out


def _points_systems(systems, column):
    """Systems with a dataset axis (A, ...) as (A, Q, ...): point q's is column ``column[q]``'s of (A, S, ...)."""
    def pick(a):
        return np.asarray(a)[:, column]

    return dataclasses.replace(systems, a00=pick(systems.a00), rest=pick(systems.rest),
                               log_weights=pick(systems.log_weights), beta_shift=pick(systems.beta_shift),
                               couplings=tuple(dataclasses.replace(c, values=pick(c.values))
                                               for c in systems.couplings))


def _stack_systems(systems):
    """S systems of the same datasets, each with a leading dataset axis, as one with axes (A, S, ...)."""
    def stack(name):
        return np.stack([getattr(s, name) for s in systems], axis=1)

    first = systems[0]
    return dataclasses.replace(first, a00=stack("a00"), rest=stack("rest"), log_weights=stack("log_weights"),
                               beta_shift=stack("beta_shift"),
                               couplings=tuple(dataclasses.replace(c, values=np.stack(
                                   [s.couplings[j].values for s in systems], axis=1))
                                   for j, c in enumerate(first.couplings)))


def joint_criterion(data: TermsChunk, continuous: bool, reml: bool):
    """``value_and_grad(points, rows)`` for :func:`newton_on_host`: the criterion at (theta, u) points (A, Q, m + 1)
    of datasets ``rows``, its gradient in theta by the host adjoint and in u by the complex step (the module
    notes).  NaN outside u's range."""
    def value_and_grad(points, rows):
        theta, u = points[..., :-1], points[..., -1]
        distinct, column = distinct_columns(u)
        built = [data.systems(constrained_phi(u[:, s] + 1j * COMPLEX_STEP, continuous), rows) for s in distinct]
        complex_systems = _points_systems(_stack_systems([b[0] for b in built]), column)
        log_det = np.stack([b[1] for b in built], axis=1)[:, column]
        real_systems = dataclasses.replace(
            complex_systems, a00=complex_systems.a00.real, rest=complex_systems.rest.real,
            couplings=tuple(dataclasses.replace(c, values=c.values.real) for c in complex_systems.couplings))
        n = data.n[rows][:, None]
        value, gradient = host_objective_and_gradient(real_systems, reml, n=n)(theta)
        in_u = objective(theta.astype(complex), complex_systems, reml, n) + log_det
        value = np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value + log_det.real)
        return value, np.concatenate([gradient, (in_u.imag / COMPLEX_STEP)[..., None]], axis=-1)

    return value_and_grad


def start(data: TermsChunk, theta0: np.ndarray, continuous: bool, reml: bool, max_iterations: int) -> np.ndarray:
    """Each dataset's start (theta, u) (D, n_theta + 1), where ``hp.lmm``'s search starts (the module notes);
    ``theta0`` the linear models' moment start."""
    D = len(data.n)
    everyone = np.arange(D)
    u_first = np.full(D, CONTINUOUS_START if continuous else 0.0)
    systems, _ = data.systems(constrained_phi(u_first, continuous), everyone)
    fitted = theta_search(systems, data.n, theta0, reml, max_iterations)
    theta = fitted["theta"]
    with np.errstate(all="ignore"):
        solved = solve(theta, systems, reml=True, n=data.n)  # hp.lmm's residuals are the REML solution's
    residual = data.residuals(solved)
    u = unconstrained_phi(lag_one_phis(residual, data.previous, data.lag, data.dataset, D, continuous), continuous)
    # from that fit's theta unless it is singular (a vanishing direction's gradient is zero there): the moments'
    singular = singular_rows(theta, data.ks, Control.singular_tol) | ~np.all(np.isfinite(theta), axis=1)
    theta = np.where(singular[:, None], theta0, theta)
    return np.column_stack([theta, u])


def search_on_host(plan, series, members: np.ndarray, widths, theta0: np.ndarray, *, continuous: bool, reml: bool,
                   max_iterations: int) -> dict:
    """Fit datasets ``members`` (one bucket of padded level counts ``widths``; their AR(1) series ``series``,
    design-row indexed; ``theta0`` their moment starts): a chunk's results as
    :func:`hierpool.batch.fit_ar1.fit_ar1`'s compiled programs return them."""
    data = TermsChunk(plan, series, members, widths)
    value_and_grad = joint_criterion(data, continuous, reml)
    with np.errstate(all="ignore"):
        point, value, newton_step, iterations, converged = newton_on_host(
            value_and_grad, start(data, theta0, continuous, reml, max_iterations), max_iterations,
            decrease_tol=DECREASE_TOL, saddle_free=True, interpolated_damping=True)
    theta, u = canonical_theta(point[:, :-1], data.ks), point[:, -1]
    phi = constrained_phi(u, continuous)
    systems, _ = data.systems(phi, np.arange(len(members)))
    with np.errstate(all="ignore"):
        solved = solved_entries(solve(theta, systems, reml=reml, n=data.n))
    inside = np.abs(u) < UNCONSTRAINED_LIMIT - EDGE
    return {"theta": theta, "objective": value, "phi": phi, "converged": converged & inside, "edge": ~inside,
            "newton_step": newton_step, "iterations": iterations, **solved}
