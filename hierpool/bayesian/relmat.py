"""The animal model's posterior (``hp.bayes(..., relmat=)``): exact draws, the effects integrated out.

The model is :mod:`hierpool.closedform.relmat`'s,

    y = X beta + Z b + e,   b_j ~ N(0, sigma_j^2 A_j),   e ~ N(0, sigma^2 W^-1),   beta ~ N(m, diag(s^2)) or flat,

A_j the relationship matrix for the relationship term and I for the others (a permanent environment), with the
priors of :mod:`hierpool.bayesian.priors` on the sds.  In psi = (log sigma_1, ..., log sigma_T, log sigma) the
marginal posterior, beta and b integrated out, is (theta_j = sigma_j / sigma, K = Z'WZ + blockdiag(A_j^-1 /
theta_j^2) the sparse matrix :class:`~hierpool.closedform.relmat.RelmatEquations` factors)

    -2 log p(y | psi) = (n - p) log sigma^2 + sum_j q_j log theta_j^2 + log|A| + log|K| + log|S| + r^2 / sigma^2
                        - log|W| + n log 2 pi + sum_c log s_c^2,

with S = X'WX + sigma^2 diag(1 / s^2) - X'WZ K^-1 Z'WX the fixed effects' Schur complement (1 / s^2 = 0 for a
flat prior) and r^2 the penalized residual sum of squares of the equations with the prior as pseudo-data, of
y - X m (the sum over the Normal priors' coefficients c).  With a Normal prior on every coefficient this is the
density of y itself; each flat coefficient leaves it -log(2 pi) / 2 (in log p) above the restricted likelihood's
usual constant, which no sampler sees.  With flat priors on beta this is, up to a constant, the REML likelihood,
whose maximum is the closed form's fit.

psi has T + 1 coordinates (2 for the animal model), so it is sampled by independence Metropolis-Hastings
(Tierney 1994): proposals from a multivariate Student t around the posterior mode, scaled by the inverse
Hessian there and adapted once to importance-weighted moments of a pilot sample (population Monte Carlo,
Cappe et al. 2004), accepted with probability min(1, w' / w), w = pi / q.  Each evaluation is one sparse
factorization of K; the draw of (beta, b) given each kept psi is exact from that factorization:

    beta - m ~ N(delta^, sigma^2 S^-1),   b | beta ~ N(b^ - K^-1 Z'WX (beta - m - delta^), sigma^2 K^-1),

the second by :attr:`~hierpool.closedform.relmat.KFactor.draw` (Rue 2001).  No gradient and no compilation: the
cost is one factorization of K per Metropolis-Hastings step.

References: Tierney (1994), Ann. Statist. 22; Cappe, Guillin, Marin & Robert (2004), JCGS 13; Rue (2001), JRSS B 63;
Sorensen & Gianola (2002), Likelihood, Bayesian and MCMC methods in quantitative genetics, ch. 13.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
from scipy import stats

from ..closedform.relmat import KFactor, RelmatEquations
from ..errors import ArgumentError, ConvergenceError
from .independence import importance_efficiency, metropolis_states
from .priors import Priors, host_log_prob
from .results import SamplingWarning

#: Degrees of freedom of the Student t proposal.
DEGREES_OF_FREEDOM = 7.0
#: The proposal's scale over the posterior's (inverse Hessian at the mode, or the pilot's weighted covariance).
SCALE_INFLATION = 1.2
#: Proposals of the pilot whose importance weights adapt the proposal and set the steps per draw.
PILOT_DRAWS = 300
#: Steps each chain discards (it starts at a proposal, a draw from about the posterior).
BURN_IN = 20
#: Metropolis-Hastings steps per kept draw: about 1 / efficiency, at most this many.
MAX_STEPS_PER_DRAW = 10
#: Below this importance-sampling efficiency of the proposal a SamplingWarning says the chains may stick.
LOW_EFFICIENCY = 0.1
#: Central-difference step in psi of the mode's Hessian.
HESSIAN_STEP = 1e-2
#: Effect draws kept in memory at most (chains x draws x levels of all terms).
EFFECT_DRAWS_MAX_VALUES = 5e7
#: The pilot's importance-sampling effective size below which the proposal is not adapted (its weighted
#: moments would rest on a handful of draws and could collapse the proposal).
ADAPTATION_MIN_ESS = 50.0
#: Exact draws with the variances held are made in chunks of this many.
DRAW_CHUNK = 500


@dataclass
class _State:
    """The posterior at one psi: its log density and what the exact effect draws there need."""

    psi: np.ndarray
    log_pi: float
    factor: KFactor
    k_zx: np.ndarray  # K^-1 Z'WX (q, p)
    s_chol: np.ndarray  # lower Cholesky factor of S (p, p)
    delta: np.ndarray  # E[beta - m | y, psi]
    b_hat: np.ndarray  # E[b | y, psi]
    sigma: float


class AnimalPosterior:
    """log pi(psi) of the module docstring, and exact (beta, b) draws given psi."""

    def __init__(self, equations: RelmatEquations, priors: Priors):
        gaussian = priors.beta_gaussian()
        if gaussian is None:
            raise ArgumentError("hp.bayes with relmat= integrates the fixed effects out: their priors must be Normal "
                                "or 'flat'")
        self.eq, self.priors = equations, priors
        loc, scale = gaussian
        self.loc = np.asarray(loc, dtype=float)
        self.precision = np.where(np.isfinite(scale), 1.0 / np.asarray(scale, dtype=float) ** 2, 0.0)
        eq, m = equations, self.loc
        # the equations of y - X m: beta - m has prior mean 0 (the prior's pseudo-data have response 0)
        self.xty = eq.Xty - eq.XtX @ m
        self.zty = eq.Zty - eq.ZtX @ m
        self.yty = float(eq.yty - 2.0 * m @ eq.Xty + m @ eq.XtX @ m)
        self.dimension = len(eq.sizes) + 1
        # log|diag(s^2)| of the Normal priors: with it, -2 log p(y | psi) is the marginal likelihood itself
        self.log_det_prior = float(np.sum(np.log(np.asarray(scale, dtype=float)[np.isfinite(scale)] ** 2)))

    def log_prior(self, psi: np.ndarray) -> np.ndarray:
        """log p(psi) of each row of psi (..., T + 1): the sds' and sigma's priors with the Jacobian of sd = e^psi."""
        psi = np.asarray(psi, dtype=float)
        sds = np.exp(psi)
        parts = [_log_density(prior, sds[..., j]) for j, prior in enumerate(self.priors.sd)]
        parts.append(_log_density(self.priors.sigma, sds[..., -1]))
        return np.sum(parts, axis=0) + np.sum(psi, axis=-1)

    def evaluate(self, psi, log_prior: float | None = None) -> _State | None:
        """The state at psi, or None where the density is 0 or K does not factor (``log_prior``: psi's, if known)."""
        psi = np.asarray(psi, dtype=float)
        log_prior = float(self.log_prior(psi)) if log_prior is None else log_prior
        if not np.isfinite(log_prior):
            return None
        sigma = float(np.exp(psi[-1]))
        theta = np.exp(psi[:-1] - psi[-1])
        eq = self.eq
        factor = eq.factor(theta)
        if factor is None:
            return None
        k_zy = factor.solve(self.zty)
        k_zx = factor.solve(eq.ZtX) if eq.p else np.zeros((eq.q, 0))
        schur = eq.XtX + sigma**2 * np.diag(self.precision) - eq.ZtX.T @ k_zx
        try:
            s_chol = np.linalg.cholesky((schur + schur.T) / 2) if eq.p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            return None
        delta = scipy.linalg.cho_solve((s_chol, True), self.xty - eq.ZtX.T @ k_zy) if eq.p else np.zeros(0)
        b_hat = k_zy - k_zx @ delta
        pwrss = self.yty - delta @ self.xty - b_hat @ self.zty
        minus_two = ((eq.n - eq.p) * np.log(sigma**2) + float(eq.sizes @ np.log(theta**2)) + eq.log_det_a
                     + factor.log_det + 2.0 * float(np.sum(np.log(np.diag(s_chol)))) + pwrss / sigma**2
                     - eq.log_det_w + eq.n * np.log(2.0 * np.pi) + self.log_det_prior)
        log_pi = -0.5 * minus_two + log_prior
        if not np.isfinite(log_pi):
            return None
        return _State(psi, float(log_pi), factor, k_zx, s_chol, delta, b_hat, sigma)

    def log_density(self, psi) -> float:
        state = self.evaluate(psi)
        return -np.inf if state is None else state.log_pi

    def draw_effects(self, state: _State, rng: np.random.Generator, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``count`` exact draws of (beta (count, p), b (count, q)) given the state's psi."""
        eq = self.eq
        z_beta = rng.standard_normal((eq.p, count))
        z_b = rng.standard_normal((eq.q, count))
        # Cov(beta) = sigma^2 S^-1 = sigma^2 L^-T L^-1: beta - m = delta + sigma L^-T z
        shift = (state.sigma * scipy.linalg.solve_triangular(state.s_chol, z_beta, lower=True, trans="T")
                 if eq.p else np.zeros((0, count)))
        b = state.b_hat[:, None] - state.k_zx @ shift + state.sigma * state.factor.draw(z_b).reshape(eq.q, count)
        return (self.loc[:, None] + state.delta[:, None] + shift).T, b.T


def _log_density(prior, values: np.ndarray) -> np.ndarray:
    """A scalar prior's log density at each value: SciPy's where :func:`host_log_prob` knows the kind, else NumPyro's
    (an sd prior has batch shape (1,): its one component)."""
    values = np.asarray(values, dtype=float)
    host = host_log_prob(prior, values)
    if host is not None:
        return np.asarray(host, dtype=float)
    return np.asarray(prior.log_prob(values[..., None] if prior.batch_shape == (1,) else values),
                      dtype=float).reshape(values.shape)


@dataclass(frozen=True)
class _Proposal:
    """Multivariate Student t on psi."""

    location: np.ndarray
    scale: np.ndarray  # the t's scale matrix

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        t = stats.multivariate_t(self.location, self.scale, df=DEGREES_OF_FREEDOM)
        psi = np.atleast_2d(t.rvs(size=count, random_state=rng)).reshape(count, -1)
        return psi, np.atleast_1d(t.logpdf(psi)).reshape(count)


def posterior_mode(posterior: AnimalPosterior, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(psi at the posterior's maximum, the covariance -H^-1 there by central differences of log pi)."""
    found = scipy.optimize.minimize(lambda psi: -posterior.log_density(psi), start, method="Nelder-Mead",
                                    options=dict(xatol=1e-6, fatol=1e-9, maxiter=2000))
    # not converged (a flat ridge) is no error here: the mode only centres the proposal, the weights correct it
    mode = np.asarray(found.x, dtype=float)
    d, h = mode.size, HESSIAN_STEP
    center = posterior.log_density(mode)
    if not np.isfinite(center):
        raise ConvergenceError("hp.bayes with relmat=: the posterior of the variance parameters has no finite "
                               "maximum (check the priors of the sds and sigma)")
    hessian = np.zeros((d, d))
    unit = np.eye(d) * h
    at = posterior.log_density
    for i in range(d):
        for j in range(i, d):
            if i == j:
                value = (at(mode + unit[i]) - 2 * center + at(mode - unit[i])) / h**2
            else:
                value = (at(mode + unit[i] + unit[j]) - at(mode + unit[i] - unit[j]) - at(mode - unit[i] + unit[j])
                         + at(mode - unit[i] - unit[j])) / (4 * h**2)
            hessian[i, j] = hessian[j, i] = value
    try:
        if not np.all(np.isfinite(hessian)):  # a neighbour of the mode with zero density
            raise np.linalg.LinAlgError
        covariance = np.linalg.inv(-hessian)
        np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:  # a mode on a flat ridge: a broad proposal, the weights correct it
        covariance = np.eye(d)
    return mode, covariance


def _adapted(proposal: _Proposal, psi: np.ndarray, log_w: np.ndarray) -> _Proposal:
    """The proposal moved to the importance-weighted mean and covariance of the pilot, where the weights' effective
    size is at least :data:`ADAPTATION_MIN_ESS` (else the proposal as it is)."""
    finite = np.isfinite(log_w)
    if finite.sum() < 2 * psi.shape[1] + 10:
        return proposal
    w = np.where(finite, np.exp(log_w - np.max(log_w[finite])), 0.0)
    if w.sum() ** 2 / np.sum(w**2) < ADAPTATION_MIN_ESS:
        return proposal
    w = w / w.sum()
    mean = w @ psi
    centred = psi - mean
    covariance = (centred * w[:, None]).T @ centred
    try:
        np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        return proposal
    # Student t's scale matrix for that covariance: covariance (df - 2) / df
    return _Proposal(mean, SCALE_INFLATION**2 * covariance * (DEGREES_OF_FREEDOM - 2) / DEGREES_OF_FREEDOM)


def sample_animal_model(posterior: AnimalPosterior, start: np.ndarray, chains: int, draws: int, tune: int,
                        seed: int, thin: int | None = None) -> dict:
    """Independence Metropolis-Hastings over psi with exact (beta, b) draws at every kept state (module docstring).

    Returns a dict of ``psi`` (chains, draws, T + 1), ``beta`` (chains, draws, p), ``b`` (chains, draws, q),
    ``lp``, ``acceptance`` (each draw's mean acceptance probability over its steps), ``thin`` and the pilot's
    importance ``efficiency``.
    """
    eq = posterior.eq
    if chains * draws * eq.q > EFFECT_DRAWS_MAX_VALUES:
        raise ArgumentError(
            f"hp.bayes with relmat= keeps every effect draw: {chains} chains x {draws} draws x {eq.q} levels is more "
            f"than {EFFECT_DRAWS_MAX_VALUES:.0e} numbers; ask for fewer draws (or use hp.lmm's closed form)")
    mode, covariance = posterior_mode(posterior, start)
    proposal = _Proposal(mode, SCALE_INFLATION**2 * covariance)
    pilot, log_q = proposal.draw(np.random.default_rng([seed, 1]), PILOT_DRAWS)
    log_w = np.array([posterior.log_density(psi) for psi in pilot]) - log_q  # (300 evaluations)
    adapted = _adapted(proposal, pilot, log_w)
    if adapted is not proposal:  # the efficiency, and so the steps per draw, of the proposal the chains use
        proposal = adapted
        pilot, log_q = proposal.draw(np.random.default_rng([seed, 5]), PILOT_DRAWS)
        log_w = np.array([posterior.log_density(psi) for psi in pilot]) - log_q
    efficiency = importance_efficiency(log_w)
    if efficiency < LOW_EFFICIENCY:
        warnings.warn(f"hp.bayes with relmat=: the proposal's importance-sampling efficiency is {efficiency:.2f}; "
                      f"each draw takes {MAX_STEPS_PER_DRAW} steps at most and the chains may stick (check ESS and "
                      f"R-hat)", SamplingWarning, stacklevel=4)
    start_state = posterior.evaluate(mode)  # where every chain starts: a state of finite density
    start_w = start_state.log_pi - float(np.ravel(stats.multivariate_t(
        proposal.location, proposal.scale, df=DEGREES_OF_FREEDOM).logpdf(mode))[0])
    if thin is None:
        thin = int(np.clip(np.round(1.0 / max(efficiency, 1e-3)), 1, MAX_STEPS_PER_DRAW))
    burn_in = min(tune, BURN_IN)
    d = posterior.dimension
    out = {"psi": np.empty((chains, draws, d)), "beta": np.empty((chains, draws, eq.p)),
           "b": np.empty((chains, draws, eq.q)), "lp": np.empty((chains, draws)),
           "acceptance": np.empty((chains, draws))}
    effects_rng = np.random.default_rng([seed, 3])
    for chain in range(chains):
        steps = (burn_in + draws) * thin
        psi, log_q = proposal.draw(np.random.default_rng([seed, 2, chain]), steps)
        log_prior = posterior.log_prior(psi)  # at once: SciPy's per-call overhead, paid once per chain
        log_u = np.log(np.random.default_rng([seed, 4, chain]).uniform(size=steps))
        current, current_w = start_state, start_w
        probabilities = np.empty(steps)
        for t in range(steps):
            candidate = posterior.evaluate(psi[t], float(log_prior[t])) if np.isfinite(log_prior[t]) else None
            candidate_w = -np.inf if candidate is None else candidate.log_pi - log_q[t]
            # one step of the shared kernel: the state after it (0: the candidate, -1: still the current one)
            moved, probability = metropolis_states(np.array([candidate_w]), log_u[t:t + 1], current_w)
            probabilities[t] = probability[0]
            if moved[0] == 0 and candidate is not None:
                current, current_w = candidate, candidate_w
            kept = t - burn_in * thin
            if kept >= 0 and kept % thin == thin - 1:
                slot = kept // thin
                beta, b = posterior.draw_effects(current, effects_rng)
                out["psi"][chain, slot], out["beta"][chain, slot], out["b"][chain, slot] = current.psi, beta[0], b[0]
                out["lp"][chain, slot] = current.log_pi
                out["acceptance"][chain, slot] = probabilities[t - thin + 1:t + 1].mean()
    out["thin"], out["efficiency"] = thin, efficiency
    return out
