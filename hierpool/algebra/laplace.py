"""The Laplace approximation of a GLMM: conditional modes by PIRLS on the shared blocked algebra.

With spherical effects u (b = Lambda(theta) u, u ~ N(0, I)), linear predictor
eta = offset + X beta + Z Lambda u and a family (:mod:`hierpool.algebra.family`), the
conditional mode u* minimizes the penalized deviance

    sum_i a_i d(y_i, mu_i) + |u|^2,      mu = g^-1(eta),

and the Laplace approximation of -2 log L(theta, beta) is

    -2 sum_i log p(y_i | mu_i*) + |u*|^2 + log |Lambda^T Z^T W* Z Lambda + I|

(lme4's ``glmResp::Laplace``: its deviance function at ``c(theta, beta)``; Bates et al. 2015,
sec. 5; Bates, "lme4: Mixed-effects modeling with R", ch. 6).  Penalized iteratively reweighted
least squares finds u*: at each step weights w and a working residual r (:func:`newton_working`: the
observed information and the score over it, so that the step is Newton's; lme4's PIRLS takes the
family's Fisher weights, :meth:`~hierpool.algebra.family.Family.working`, the same for a canonical
link) make the step one weighted Henderson solve

    (Lambda^T Z^T W Z Lambda + I) u_new = Lambda^T Z^T W (Z Lambda u + r),

the Gaussian mixed-model equations with response Z Lambda u + r, prior weights w and no fixed
effects (beta is held in the offset), solved by :func:`hierpool.algebra.henderson.point_estimates` on the
system of :func:`hierpool.algebra.system.build_system`: the same cross-products, blocked factor
and log-determinant as the linear mixed model, nothing written twice.  A step that raises the
penalized deviance is halved, as lme4's PIRLS does.  With ``joint=True`` beta is a working
coefficient too (X stays in the solve): the joint mode of (beta, u), lme4's ``nAGQ = 0`` stage.

This module is the host (NumPy) path: each step refills the design's system pattern with the new weights
(:func:`pirls_patterns`); :mod:`hierpool.algebra.laplace_program` runs the same steps as one compiled program.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .criterion import host_objective_and_gradient
from .family import Family
from .henderson import Solution, effects, fixed_effects_information, point_estimates, prediction_covariance, solve
from .laplace_gradient import canonical, laplace_gradient, leverages, rows_random_part, weight_derivatives
from .linalg import array_namespace, theta_to_factors
from .system import SystemPattern, build_system, system_pattern

if TYPE_CHECKING:  # annotations only: the host algebra imports without pandas (a worker's start)
    from ..spec.design import Design

#: Relative change of the penalized deviance at which PIRLS has converged (lme4's tolPwrss is 1e-7;
#: the references in validation/glmm_reference.json were made with 1e-10).  Not looser for Newton's quadratic
#: convergence (:func:`newton_working`): log |H| in the criterion, and so its gradient, moves at first order with
#: the mode's remaining error, so a skipped last step costs ~1e-11 relative (measured on Contraception).
PIRLS_TOL = 1e-12
#: PIRLS steps, and halvings of one step, before giving up.
PIRLS_MAX_STEPS = 50
PIRLS_MAX_HALVINGS = 30


@dataclass(frozen=True)
class ConditionalMode:
    """Where PIRLS ended, and the pieces of the Laplace approximation there.

    Attributes
    ----------
    u, b : tuple of numpy.ndarray
        Spherical effects and effects (b = T_j u per level) per term, shape (ell_j, k_j).
    beta : numpy.ndarray
        The fixed effects (given, or the joint mode with ``joint=True``).
    eta, mu : numpy.ndarray
        Linear predictor and mean at the mode.
    working_weights : numpy.ndarray
        W at the mode (the weights of the log-determinant).
    log_likelihood : float
        sum_i log p(y_i | mu_i).
    logdet : float
        log |Lambda^T Z^T W Z Lambda + I|.
    laplace : float
        -2 log_likelihood + |u|^2 + logdet: the Laplace approximation of -2 log L.
    steps : int
    converged : bool
    """

    u: tuple
    b: tuple
    beta: np.ndarray
    eta: np.ndarray
    mu: np.ndarray
    working_weights: np.ndarray
    log_likelihood: float
    logdet: float
    laplace: float
    steps: int
    converged: bool


def random_part(design: Design, b) -> np.ndarray:
    """Z b: each row's sum over terms of z_i . b[level of i]."""
    return rows_random_part(tuple((t.index, t.z) for t in design.terms), tuple(np.asarray(x) for x in b))


# --- one PIRLS's pieces, shared by the host path here, the batch's (laplace_batch) and the compiled program's
# (with henderson.effects and laplace_gradient.rows_random_part) ----------------------------------------------------

def penalized_deviance(family: Family, y, trials, mu, u, group=None, n_groups: int = 1):
    """sum_i a_i d(y_i, mu_i) + |u|^2, PIRLS's objective: NumPy or traced; with ``group`` (NumPy only: each row's
    dataset) one per dataset, (n_groups,), u_j with a leading datasets axis."""
    xp = array_namespace(mu)
    rows = family.unit_deviances(y, mu, trials)
    if group is None:
        return xp.sum(rows) + sum(xp.sum(xp.square(x)) for x in u)
    return np.bincount(group, weights=rows, minlength=n_groups) + sum(np.sum(np.square(x), axis=(-2, -1)) for x in u)


def newton_working(family: Family, y, eta, trials):
    """(weights, working response's residual) of one PIRLS step at eta: Newton's method on the penalized deviance.

    The step solves the weighted Henderson equations with weights c and residual s / c, s = w r the score (w, r:
    :meth:`~hierpool.algebra.family.Family.working`'s Fisher weights and working residual).  lme4 takes c = w,
    Fisher scoring; here c is the observed information W_o = -ds/deta
    (:func:`~hierpool.algebra.laplace_gradient.weight_derivatives`), the penalized deviance's own curvature in
    eta, so that the step is Newton's.  For a canonical link (logit binomial, log Poisson) W_o = w and the two are
    the same step.  For the others (probit, cloglog, the negative binomial) Fisher scoring converges linearly --
    from u = 0, 8 steps on average to PIRLS's tolerance for a nested probit model -- and Newton's method
    quadratically.  Both stop at the same mode (s = 0 there; the criterion's log |H| still takes the Fisher
    weights at it, lme4's Laplace approximation).  A row whose W_o is not positive (the log-likelihood need not be
    concave in eta far from the mode) keeps its Fisher weight: the system stays positive definite, the step a
    descent direction, and a step that raises the deviance is halved as any other.  NumPy or traced.
    """
    _, weights, residual = family.working(y, eta, trials)
    if canonical(family):
        return weights, residual
    xp = array_namespace(eta)
    observed = weight_derivatives(family, y, eta, trials)[1]
    newton = observed > 0  # False where NaN
    safe = xp.where(newton, observed, 1.0)
    return xp.where(newton, observed, weights), xp.where(newton, weights * residual / safe, residual)


def step_rises(trial, current):
    """Whether a PIRLS step (or halving) from a penalized deviance ``current`` to ``trial`` is to be halved: it
    raises the deviance beyond rounding (lme4's ``pdev > oldpdev``), or the trial is not a number (an overflowed
    eta, which halving brings back; lme4 would keep it).  NumPy or traced."""
    xp = array_namespace(trial, current)
    return xp.isnan(trial) | (trial > current * (1 + 1e-14))


def solve_failed(u, beta=None):
    """Whether a PIRLS step's solution is not finite, per dataset (``u`` per term with a leading datasets axis, or
    one dataset's): its working system did not factor at an extreme point (a search's overshooting trial).  Halving
    the step keeps the NaN, so that such a step is not halved and PIRLS stops there, not converged (its deviance
    NaN), where it had run its halvings in every one of its steps (benchmarks/RESULTS.md, twenty-third session).
    ``beta``: the fixed effects, where PIRLS solves for them too (u's leading axes, then p).  NumPy or traced."""
    xp = array_namespace(*u) if beta is None else array_namespace(*u, beta)
    lead = u[0].shape[:-2]
    parts = list(u)
    if beta is not None:
        beta = xp.asarray(beta)
        if beta.shape[:-1] != lead:
            raise ValueError(f"beta's leading axes {beta.shape[:-1]} are not u's {lead}")
        parts.append(beta)
    return ~xp.all(xp.stack([xp.isfinite(x).reshape(lead + (-1,)).all(axis=-1) for x in parts]), axis=0)


def pirls_converged(previous, deviance, tol: float):
    """PIRLS has converged: the penalized deviance changed by at most ``tol`` relative in the last step."""
    xp = array_namespace(previous, deviance)
    return xp.abs(previous - deviance) <= tol * xp.maximum(xp.abs(deviance), 1.0)


def working_design(design: Design, response: np.ndarray, weights: np.ndarray, joint: bool) -> Design:
    """The Gaussian mixed-model equations of one PIRLS step (and of the penalized system at the mode)."""
    # the Gaussian mixed-model equations of one PIRLS step: known unit residual sd (no sigma profiled),
    # the working response and weights; without joint, no fixed effects (beta sits in the offset)
    n = design.n
    return dataclasses.replace(
        design, y=response, weights=weights, sigma_known=True, offset=np.zeros(n),
        **({} if joint else dict(X=np.zeros((n, 0)), fixed_names=())),
    )


def saturated_deviance(design: Design, family: Family) -> float:
    """-2 log p(y | mu) - sum_i a_i d(y_i, mu_i), the same at every mu (the deviance's definition): -2 log p(y | y).

    Computed at the family's starting means, where both sides are finite.  With it, PIRLS's log-likelihood at
    each mode is -(deviance + saturated) / 2, without the log Gamma terms (where
    :func:`deviance_gives_likelihood` holds).
    """
    return float(np.sum(saturated_rows(family, design.y, design.row_weights)))


def saturated_rows(family: Family, y, weights):
    """Each row's -2 log p(y_i | mu_i) - a_i d(y_i, mu_i) at the family's starting mean (NumPy or traced: the batch's
    negative binomial computes it at each shape in its program); zero-weight rows give 0."""
    mu = family.starting_mean(y, weights)
    return -2.0 * family.log_likelihood(y, mu, weights) - family.unit_deviances(y, mu, weights)


def deviance_gives_likelihood(design: Design, family: Family) -> bool:
    """Whether the log-likelihood is -(deviance + :func:`saturated_deviance`) / 2 at every mu for this data.

    Not for binomial rows with a non-integer number of successes: R's log-likelihood rounds them,
    and the deviance does not, so their difference depends on mu there.
    """
    if family.name != "binomial":
        return True
    successes = design.y * design.row_weights
    return bool(np.all(np.abs(successes - np.round(successes)) <= 1e-8 * np.maximum(1.0, successes)))


def pirls_patterns(design: Design) -> dict[bool, SystemPattern]:
    """The system patterns of PIRLS's working designs (keyed by ``joint``): found once per design, refilled
    with new working weights and response at every step (:func:`hierpool.algebra.system.build_system`)."""
    ones = np.ones(design.n)
    return {joint: system_pattern(working_design(design, ones, ones, joint)) for joint in (False, True)}


def _working_system(design: Design, response, weights, joint: bool, patterns: dict):
    """The host system of a working design (:func:`working_design`), refilled from its pattern; used by the
    host algebra only, so the pair products it would not read are not formed."""
    return build_system(working_design(design, response, weights, joint), host=True, host_only=True,
                        pattern=patterns[joint])


def conditional_mode(
    theta, beta, design: Design, family: Family, *, joint: bool = False, start_u=None, tol: float = PIRLS_TOL,
    patterns: dict[bool, SystemPattern] | None = None, saturated: float | None = None,
) -> ConditionalMode:
    """u* (and beta with ``joint``) by PIRLS at ``theta`` and ``beta``, with the Laplace approximation there.

    Parameters
    ----------
    theta : array-like
        Relative covariance factors, lme4's ``getME(fit, "theta")`` order (no residual scale).
    beta : array-like, shape (p,)
        Fixed effects; with ``joint=True`` only where PIRLS starts.
    design : Design
        The GLMM's design: ``y`` the response (proportions for the binomial), ``weights`` the
        prior weights a_i (binomial trials), ``offset`` the known part of eta.
    family : Family
    joint : bool
        Find the joint mode of (beta, u) (lme4's ``nAGQ = 0``) instead of u at the given beta.
    start_u : tuple of arrays, optional
        Where PIRLS starts (zeros when None).
    tol : float
        Relative change of the penalized deviance that ends the iteration.
    patterns : dict, optional
        :func:`pirls_patterns` of ``design`` (found here when None): pass them when calling
        repeatedly on one design.
    saturated : float, optional
        :func:`saturated_deviance` of ``design``, where :func:`deviance_gives_likelihood` holds: the
        log-likelihood is then the deviance's, without evaluating the family's (log Gamma) constants again.

    Returns
    -------
    ConditionalMode
    """
    # a step off the domain overflows exp or divides 0 by 0: its deviance is NaN, and the step is halved (as the
    # batch's PIRLS, laplace_batch): NumPy's RuntimeWarnings named no column (a Poisson count of 1e20)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _conditional_mode_on_host(theta, beta, design, family, joint, start_u, tol, patterns, saturated)


def _conditional_mode_on_host(theta, beta, design: Design, family: Family, joint: bool, start_u, tol: float,
                               patterns, saturated) -> ConditionalMode:
    if patterns is None:
        patterns = pirls_patterns(design)
    mode = _pirls(theta, beta, design, family, joint, start_u, tol, patterns, saturated)
    if not _finite(mode.working_weights):  # (NaN at a failed mode: _finite)
        return _with_logdet(mode, np.nan)
    # the log-determinant with the weights at the mode: one more factorization, of Z only
    at_mode = _working_system(design, np.ones(design.n), mode.working_weights, False, patterns)
    return _with_logdet(mode, float(point_estimates(np.asarray(theta, dtype=float), at_mode)[3]))


def _finite(*arrays) -> bool:
    """Whether PIRLS's working weights (and response) are finite: where a mean overflowed (a log link's offset of
    800) or a solve failed they are not, and handed to LAPACK they printed "On entry to DLASCL parameter number 4
    had an illegal value" to stderr, once a routine, on the way to the same failed mode."""
    return all(bool(np.all(np.isfinite(a))) for a in arrays)


def _with_logdet(mode: ConditionalMode, logdet: float) -> ConditionalMode:
    """The mode with log |H| at its weights, and so its Laplace criterion."""
    squared_u = sum(float(np.sum(np.square(x))) for x in mode.u)
    return dataclasses.replace(mode, logdet=logdet, laplace=-2.0 * mode.log_likelihood + squared_u + logdet)


def _pirls(theta, beta, design: Design, family: Family, joint: bool, start_u, tol: float,
           patterns: dict[bool, SystemPattern], saturated: float | None = None) -> ConditionalMode:
    """PIRLS's iterations: the mode, its weights and log-likelihood (logdet and laplace NaN)."""
    theta = np.asarray(theta, dtype=float)
    beta = np.asarray(beta, dtype=float).reshape(-1)
    trials = design.row_weights
    fixed = design.offset + design.X @ beta
    factors = theta_to_factors(theta, tuple(t.k for t in design.terms))
    if start_u is None:
        u = tuple(np.zeros((t.n_levels, t.k)) for t in design.terms)
    else:
        u = tuple(np.asarray(x, dtype=float) for x in start_u)
    b = effects(factors, u)
    eta = fixed + random_part(design, b)
    mu = family.link.inverse(eta)
    deviance = float(penalized_deviance(family, design.y, trials, mu, u))
    converged = False
    steps = 0

    def at(new_u, new_beta):
        new_b = effects(factors, new_u)
        new_fixed = design.offset + design.X @ new_beta
        new_eta = new_fixed + random_part(design, new_b)
        new_mu = family.link.inverse(new_eta)
        return new_b, new_fixed, new_eta, new_mu, float(penalized_deviance(family, design.y, trials, new_mu, new_u))

    while steps < PIRLS_MAX_STEPS and not converged:
        steps += 1
        weights, residual = newton_working(family, design.y, eta, trials)
        # the working response of the solved part: X beta + Z b (joint) or Z b, plus the working residual
        response = (eta - design.offset if joint else eta - fixed) + residual
        if _finite(weights, response):
            system = _working_system(design, response, weights, joint, patterns)
            solved_beta, solved_u, _, _ = point_estimates(theta, system)
            new_u = tuple(np.asarray(x) for x in solved_u)
            new_beta = np.asarray(solved_beta) if joint else beta
        else:  # a failed solve (solve_failed), never handed to LAPACK (_finite)
            new_u = tuple(np.full(x.shape, np.nan) for x in u)
            new_beta = np.full(beta.shape, np.nan) if joint else beta
        trial = at(new_u, new_beta)
        failed = bool(solve_failed(new_u, new_beta if joint else None))
        # halve the step while it raises the penalized deviance (lme4's PIRLS), each halving evaluated; a failed
        # solve is not halved, and ends PIRLS (solve_failed)
        for _ in range(0 if failed else PIRLS_MAX_HALVINGS):
            if not step_rises(trial[-1], deviance):
                break
            new_u = tuple(0.5 * (a + c) for a, c in zip(u, new_u))
            new_beta = 0.5 * (beta + new_beta)
            trial = at(new_u, new_beta)
        trial_b, trial_fixed, trial_eta, trial_mu, trial_deviance = trial
        converged = bool(pirls_converged(deviance, trial_deviance, tol))
        u, b, beta, fixed = new_u, trial_b, new_beta, trial_fixed
        eta, mu, deviance = trial_eta, trial_mu, trial_deviance
        if failed:
            break
    _, weights, _ = family.working(design.y, eta, trials)
    if saturated is None:
        log_likelihood = float(np.sum(family.log_likelihood(design.y, mu, trials)))
    else:  # -2 log p(y | mu) = the deviance (|u|^2 taken out) + -2 log p(y | y)
        log_likelihood = -0.5 * (deviance - sum(float(np.sum(np.square(x))) for x in u) + saturated)
    return ConditionalMode(u=u, b=b, beta=beta, eta=eta, mu=mu, working_weights=weights,
                           log_likelihood=log_likelihood, logdet=np.nan, laplace=np.nan, steps=steps,
                           converged=converged)


def laplace_deviance(theta, beta, design: Design, family: Family) -> float:
    """The Laplace approximation of -2 log L(theta, beta): lme4's glmer deviance function at c(theta, beta)."""
    return conditional_mode(theta, beta, design, family).laplace


def laplace_and_gradient_on_host(theta, beta, design: Design, family: Family, *, start_u=None,
                                 patterns: dict[bool, SystemPattern] | None = None, saturated: float | None = None):
    """(:func:`conditional_mode` at (theta, beta), the gradient of its Laplace criterion in (theta, beta)).

    :func:`hierpool.algebra.laplace_gradient.laplace_gradient` in NumPy, with log |H|'s gradient in
    theta at fixed weights from the linear mixed model's host gradient.  ``patterns`` and ``saturated`` as in
    :func:`conditional_mode`.
    """
    if patterns is None:
        patterns = pirls_patterns(design)
    theta = np.asarray(theta, dtype=float)
    mode = _pirls(theta, beta, design, family, False, start_u, PIRLS_TOL, patterns, saturated)
    weights = mode.working_weights

    def system_with(response, weights=weights):
        return _working_system(design, response, weights, False, patterns)

    # the cross-products at the mode's weights; the response is any non-zero one (log |H| and H^-1 do not
    # read it, and a zero one would make the penalized RSS, whose cotangent is 0, 0 / 0 in the adjoint)
    system = system_with(np.ones(design.n))
    layout = system.layout
    rows = tuple((t.index.astype(np.int64), t.z) for t in design.terms)
    leverage = leverages(theta, rows, prediction_covariance(theta, system), layout.n_levels, layout.ks)
    # log |H| and its gradient in theta at the mode's weights, from one factorization
    logdet, logdet_gradient = host_objective_and_gradient(system, reml=False, logdet_only=True)(theta)
    mode = _with_logdet(mode, float(logdet))

    def solve(response, weights):
        return [np.asarray(x) for x in point_estimates(theta, system_with(response, weights))[1]]

    gradient = laplace_gradient(theta, family, design.y, design.row_weights, design.X, rows, mode.u, mode.eta,
                                leverage, solve, logdet_gradient)
    return mode, np.asarray(gradient)


def fixed_effect_information(theta, mode: ConditionalMode, design: Design, family: Family,
                             joint_pattern: SystemPattern | None = None) -> np.ndarray:
    """2 R_X^T R_X: the fixed effects' block of the penalized system at a mode, in deviance units.

    R_X is the fixed-effect block of the Cholesky factor of the joint (beta, u) penalized weighted
    least-squares system at the mode's working weights (lme4's ``RX``;
    :func:`hierpool.algebra.henderson.fixed_effects_information`, as a batch's search takes it with the
    observed information: :func:`hierpool.algebra.laplace_batch.fixed_effects_curvature`); 2 R_X^T R_X approximates the
    Hessian of the Laplace deviance in beta (exact for a linear mixed model; for a GLMM it omits the
    weights' dependence on beta through log |H|).

    Parameters
    ----------
    theta : array-like
        Relative covariance factors (lme4's order).
    mode : ConditionalMode
        The conditional mode at ``theta`` (its linear predictor gives the working weights).
    design : Design
    family : Family
    joint_pattern : SystemPattern, optional
        :func:`pirls_patterns`' ``True`` pattern of ``design`` (found here when None).

    Returns
    -------
    numpy.ndarray
        (p, p), symmetric positive definite.
    """
    system = _mode_system(mode, design, family, joint_pattern)
    return 2.0 * np.asarray(fixed_effects_information(np.asarray(theta, dtype=float), system))


def mode_working(mode: ConditionalMode, design: Design, family: Family):
    """(PIRLS's working response eta - o + (y - mu) / (d mu / d eta), its working weights) at a mode: the joint
    penalized system there.  Its factors, conditional variances and vcov_beta do not read the response, but a
    response in the span of [X, Z] (eta - o alone: a zero residual) would not factor: its last pivot is 0, and
    rounding makes it negative."""
    _, weights, residual = family.working(design.y, mode.eta, design.row_weights)
    return mode.eta - design.offset + residual, weights


def mode_solution(theta, mode: ConditionalMode, design: Design, family: Family,
                  joint_pattern: SystemPattern | None = None) -> Solution:
    """The Henderson solution of the joint (beta, u) penalized system at a mode's working weights.

    Its ``vcov_beta`` is (R_X^T R_X)^-1 and its ``cond_var`` lme4's ``condVar`` of the GLMM at ``theta``
    (the Laplace approximation's conditional covariances of b, beta estimated with them); its estimates
    are those of the step PIRLS would take from the mode (the mode itself, where PIRLS converged).
    ``joint_pattern`` as in :func:`fixed_effect_information`.
    """
    return solve(np.asarray(theta, dtype=float), _mode_system(mode, design, family, joint_pattern))


def _mode_system(mode: ConditionalMode, design: Design, family: Family, joint_pattern: SystemPattern | None):
    """The joint (beta, u) penalized system at a mode's working weights (:func:`mode_working`)."""
    if joint_pattern is None:
        joint_pattern = pirls_patterns(design)[True]
    response, weights = mode_working(mode, design, family)
    return _working_system(design, response, weights, True, {True: joint_pattern})
