"""The Laplace approximation of many GLMM datasets at once on the host (NumPy): PIRLS, the criterion and its exact
gradient in (theta, beta), over a leading datasets axis.

The same steps as one dataset's host path (:func:`hierpool.algebra.laplace.laplace_and_gradient_on_host`): PIRLS's
Henderson solves, halvings and stopping rule (:mod:`hierpool.algebra.laplace`), log |H| and its theta-gradient at
the mode's weights (:func:`hierpool.algebra.criterion.host_objective_and_gradient`), the leverages and the
implicit-function gradient (:func:`hierpool.algebra.laplace_gradient.laplace_gradient`), each the shared function
called over leading axes.  What is batched here is only the bookkeeping: every dataset's working system is built at
once by weighted ``bincount``s keyed by dataset (:func:`hierpool.algebra.batched_systems.batched_systems`), each
dataset's levels padded to the batch's widths (a padded level has no rows: its effect is 0 and it adds log 1), and
a dataset leaves PIRLS when its own deviance has converged, so the slowest dataset costs only its own steps.

Nothing is compiled: a batch of small GLMMs (``hp.fit_batch(..., family=)`` on one CPU) spends its time in many
small solves, where a compiled program's tracing and compiling cost more than the NumPy run
(benchmarks/RESULTS.md, "The GLMM class on the host").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batched_systems import batched_systems, shared_grid
from .criterion import host_objective_and_gradient
from .family import Family
from .henderson import Solution, effects, fixed_effects_information, point_estimates, prediction_covariance, solve
from .laplace import (
    PIRLS_MAX_HALVINGS,
    PIRLS_MAX_STEPS,
    PIRLS_TOL,
    newton_working,
    penalized_deviance,
    pirls_converged,
    solve_failed,
    step_rises,
)
from .laplace_gradient import laplace_gradient, leverages, rows_random_part, weight_derivatives
from .linalg import theta_to_factors


@dataclass(frozen=True)
class GroupedRows:
    """The rows of many datasets of one GLMM, each row marked with its dataset.

    Attributes
    ----------
    group : (N,) int64
        Each row's dataset, 0 .. n_groups - 1.
    n_groups : int
    y, trials, offset : (N,)
        The response (binomial proportions), the prior weights (trials) and the offset.
    X : (N, p)
    terms : tuple of (level (N,) int64, z (N, k), width)
        Each random-effect term: the row's level within its dataset, its values, the batch's level count.
    """

    group: np.ndarray
    n_groups: int
    y: np.ndarray
    trials: np.ndarray
    offset: np.ndarray
    X: np.ndarray
    terms: tuple

    @property
    def ks(self) -> tuple:
        return tuple(z.shape[1] for _, z, _ in self.terms)

    def _rows(self, rows: np.ndarray, group: np.ndarray, n_groups: int) -> "GroupedRows":
        # take, not a fancy index: NumPy gathers a 2-d array's rows faster so (benchmarks/RESULTS.md, twenty-third
        # session)
        def pick(a):
            return a.take(rows, axis=0)

        return GroupedRows(group, n_groups, pick(self.y), pick(self.trials), pick(self.offset), pick(self.X),
                           tuple((pick(level), pick(z), width) for level, z, width in self.terms))

    def subset(self, groups: np.ndarray) -> tuple["GroupedRows", np.ndarray]:
        """(the rows of datasets ``groups`` (increasing), renumbered 0 .. len - 1; their indices here).  Every
        dataset: these rows themselves (no copy)."""
        if len(groups) == self.n_groups:
            return self, np.arange(len(self.group))
        keep = np.zeros(self.n_groups, bool)
        keep[groups] = True
        rows = np.flatnonzero(keep[self.group])
        renumber = np.cumsum(keep) - 1
        return self._rows(rows, renumber[self.group[rows]], len(groups)), rows

    def repeated(self, copies: int) -> "GroupedRows":
        """Each dataset ``copies`` times: dataset g's copy c is dataset g * copies + c (one per point of a probe).
        One copy: these rows themselves."""
        if copies == 1:
            return self
        rows = np.repeat(np.arange(len(self.group)), copies)
        copy = np.tile(np.arange(copies), len(self.group))
        return self._rows(rows, self.group[rows] * copies + copy, self.n_groups * copies)

    def term_rows(self) -> tuple:
        return tuple((level, z) for level, z, _ in self.terms)


def working_system(rows: GroupedRows, response, weights, fixed: bool = False):
    """Every dataset's working system (the Gaussian mixed-model equations of a PIRLS step: unit residual sd, no
    fixed effects), stacked (:func:`shared_grid`), and its row counts.  ``fixed``: with the rows' X, for its blocks
    alone (the response's column unshifted: :func:`batched_systems`' ``shift``)."""
    n = len(rows.group)
    systems, counts = batched_systems(rows.group, rows.n_groups, rows.terms, rows.X if fixed else np.zeros((n, 0)),
                                      response, weights, None, sigma_known=True, shift=not fixed, prior_weights=False)
    return shared_grid(systems, slice(None)), counts


def _fixed_part(rows: GroupedRows, beta):
    """offset + X beta per row, each dataset's beta (D, p)."""
    return rows.offset + np.einsum("np,np->n", rows.X, np.asarray(beta, dtype=float).take(rows.group, axis=0))


def _linear_predictor(rows: GroupedRows, factors, fixed, u):
    """(b, eta) at each dataset's u (``fixed``: offset + X beta per row)."""
    b = effects(factors, u)
    return b, fixed + rows_random_part(rows.term_rows(), b, rows.group)


def _at(rows: GroupedRows, family: Family, factors, fixed, u):
    """(b, eta, penalized deviance per dataset) at each dataset's u (``fixed``: offset + X beta per row)."""
    b, eta = _linear_predictor(rows, factors, fixed, u)
    return b, eta, penalized_deviance(family, rows.y, rows.trials, family.link.inverse(eta), u, rows.group,
                                      rows.n_groups)


@dataclass(frozen=True)
class BatchMode:
    """PIRLS's modes of a batch of datasets (:func:`conditional_modes`): per dataset u, b (D, ell_j, k_j), the
    penalized deviance, steps and convergence; per row eta and the working weights at the mode."""

    u: list
    b: list
    eta: np.ndarray
    working_weights: np.ndarray
    penalized_deviance: np.ndarray
    steps: np.ndarray
    converged: np.ndarray


def conditional_modes(theta, beta, rows: GroupedRows, family: Family, tol: float = PIRLS_TOL,
                      start_u=None) -> BatchMode:
    """u* of every dataset by PIRLS at its own (theta, beta) ((D, n_theta), (D, p)) from ``start_u`` (per term
    (D, ell_j, k_j); zeros when None): the steps and rules of :func:`hierpool.algebra.laplace.conditional_mode`
    (``joint=False``; :func:`~hierpool.algebra.laplace.step_rises`, :func:`~hierpool.algebra.laplace.solve_failed`,
    :func:`~hierpool.algebra.laplace.pirls_converged`), each dataset stopping on its own."""
    with np.errstate(all="ignore"):  # a step off the domain is NaN, and is halved
        return _pirls(np.asarray(theta, dtype=float), np.asarray(beta, dtype=float), rows, family, tol, start_u)


def _pirls(theta, beta, rows: GroupedRows, family: Family, tol: float, start_u) -> BatchMode:
    n_groups = rows.n_groups
    factors = theta_to_factors(theta, rows.ks)
    fixed = _fixed_part(rows, beta)
    if start_u is None:
        u = [np.zeros((n_groups, width, k)) for (_, _, width), k in zip(rows.terms, rows.ks)]
    else:
        u = [np.array(x, dtype=float) for x in start_u]
    b, eta, deviance = _at(rows, family, factors, fixed, u)
    b = list(b)
    steps = np.zeros(n_groups, dtype=np.int64)
    converged = np.zeros(n_groups, bool)
    active = np.arange(n_groups)
    for _ in range(PIRLS_MAX_STEPS):
        if not active.size:
            break
        sub, taken = rows.subset(active)
        sub_factors = [t[active] for t in factors]
        sub_eta, sub_fixed = eta[taken], fixed[taken]
        weights, residual = newton_working(family, sub.y, sub_eta, sub.trials)
        system, _ = working_system(sub, sub_eta - sub_fixed + residual, weights)
        old_u, old_deviance = [uj[active] for uj in u], deviance[active]
        new_u = [np.asarray(x) for x in point_estimates(theta[active], system)[1]]
        trial_b, trial_eta, trial_deviance = _at(sub, family, sub_factors, sub_fixed, new_u)
        trial_b = list(trial_b)
        failed = solve_failed(new_u)  # not halved, and out of PIRLS (solve_failed)
        # halve the step while it raises the penalized deviance (lme4's PIRLS), each halving evaluated; only the
        # rising datasets' rows, narrowed as they stop rising: near the mode rounding alone can raise the deviance
        # by 1e-14, and those few datasets then halve many times
        which = np.flatnonzero(step_rises(trial_deviance, old_deviance) & ~failed)
        if which.size:
            part, part_rows = sub.subset(which)
        for _ in range(PIRLS_MAX_HALVINGS):
            if not which.size:
                break
            halved = [0.5 * (a[which] + c[which]) for a, c in zip(old_u, new_u)]
            part_b, part_eta, part_deviance = _at(part, family, [t[which] for t in sub_factors],
                                                  sub_fixed[part_rows], halved)
            for j in range(len(new_u)):
                new_u[j][which], trial_b[j][which] = halved[j], part_b[j]
            trial_eta[part_rows], trial_deviance[which] = part_eta, part_deviance
            still = step_rises(part_deviance, old_deviance[which])
            if not still.all():
                part, kept_rows = part.subset(np.flatnonzero(still))
                which, part_rows = which[still], part_rows[kept_rows]
        done = pirls_converged(old_deviance, trial_deviance, tol)
        for j in range(len(u)):
            u[j][active], b[j][active] = new_u[j], trial_b[j]
        eta[taken], deviance[active] = trial_eta, trial_deviance
        steps[active] += 1
        converged[active] = done
        active = active[~(done | failed)]
    _, weights, _ = family.working(rows.y, eta, rows.trials)
    return BatchMode(u=u, b=b, eta=eta, working_weights=weights, penalized_deviance=deviance, steps=steps,
                     converged=converged)


def laplace_and_gradient(theta, beta, rows: GroupedRows, family: Family, saturated, start_u=None) -> tuple:
    """(Laplace -2 log L (D,), its gradient in (theta, beta) (D, n_theta + p), the modes) of every dataset at its
    own (theta, beta): :func:`hierpool.algebra.laplace.laplace_and_gradient_on_host` over a batch.

    ``saturated`` (D,): each dataset's -2 log p(y | y) (:func:`hierpool.algebra.laplace.saturated_deviance`);
    ``start_u``: where each PIRLS starts (zeros when None).  A dataset whose system does not factor at its point
    gets NaN (no step goes there).
    """
    theta = np.asarray(theta, dtype=float)
    with np.errstate(all="ignore"):
        mode = conditional_modes(theta, beta, rows, family, start_u=start_u)
        weights = mode.working_weights
        # the cross-products at the mode's weights; the response is any non-zero one (log |H| and H^-1 do not
        # read it, and a zero one would make the penalized RSS, whose cotangent is 0, 0 / 0 in the adjoint)
        system, counts = working_system(rows, np.ones(len(rows.group)), weights)
        layout = system.layout
        term_rows = rows.term_rows()
        leverage = leverages(theta, term_rows, prediction_covariance(theta, system), layout.n_levels, layout.ks,
                             group=rows.group)
        logdet, logdet_gradient = host_objective_and_gradient(system, reml=False, logdet_only=True, n=counts)(theta)

        def solve_u(response, weights):
            return [np.asarray(x) for x in point_estimates(theta, working_system(rows, response, weights)[0])[1]]

        gradient = laplace_gradient(theta, family, rows.y, rows.trials, rows.X, term_rows, mode.u, mode.eta,
                                    leverage, solve_u, logdet_gradient, group=rows.group)
    value = mode.penalized_deviance + np.asarray(saturated) + logdet
    return value, gradient, mode


def fixed_effects_curvature(theta, beta, rows: GroupedRows, family: Family, u) -> np.ndarray:
    """The curvature in beta (D, p, p) of every dataset's penalized deviance minimized over u, at its mode ``u``
    (per term (D, ell_j, k_j)) for its own (theta, beta):

        d^2/dbeta^2 min_u P(u, beta) = 2 (X' W_o X - X' W_o Z Lambda H_o^-1 Lambda' Z' W_o X),

    the Schur complement of u's block in P's Hessian (:func:`hierpool.algebra.henderson.fixed_effects_information`
    on the working system with the observed information W_o as weights:
    :func:`hierpool.algebra.laplace_gradient.weight_derivatives`).  It is the Laplace criterion's curvature in beta
    but for log |H|'s, which the weights' change with eta carries (third and fourth derivatives of the
    log-likelihood): the Gauss-Newton part, of the order of the rows' information, where log |H|'s is of the order
    of the levels'.
    """
    theta = np.asarray(theta, dtype=float)
    with np.errstate(all="ignore"):
        eta = _linear_predictor(rows, theta_to_factors(theta, rows.ks), _fixed_part(rows, beta), u)[1]
        observed = weight_derivatives(family, rows.y, eta, rows.trials)[1]
        # the response is immaterial (the information does not read it): ones
        system, _ = working_system(rows, np.ones(len(rows.group)), observed, fixed=True)
        return 2.0 * fixed_effects_information(theta, system)


def solution_at_mode(theta, rows: GroupedRows, mode: BatchMode) -> Solution:
    """The Henderson solution of every dataset's working system at its mode's weights (its ``cond_var``: lme4's
    ``condVar`` of the GLMM, as ``hp.glmm``'s ``ranef``)."""
    system, counts = working_system(rows, np.ones(len(rows.group)), mode.working_weights)
    with np.errstate(all="ignore"):
        return solve(np.asarray(theta, dtype=float), system, n=counts)
