"""Independence Metropolis-Hastings over a Gaussian model's variance parameters psi, the effects integrated out, with
exact draws of (beta, b) at every kept state: the sampler of the animal model (:mod:`hierpool.bayesian.relmat`) and
of a Gaussian spatial model (:mod:`hierpool.bayesian.spatial_exact`).

psi has a handful of coordinates, and log pi(psi) (the prior times the marginal likelihood, one sparse factorization
per evaluation) has no gradient at hand, so psi is sampled by independence Metropolis-Hastings (Tierney 1994):
proposals from a multivariate Student t around the posterior mode, scaled by the inverse Hessian there and adapted
once to importance-weighted moments of a pilot sample (population Monte Carlo, Cappe et al. 2004), accepted with
probability min(1, w' / w), w = pi / q.  The chain's law is the posterior whatever the proposal, so long as it
covers it; how fast it mixes depends on how close it is.  Given each kept psi, (beta, b) is drawn exactly from its
Gaussian conditional posterior.

A posterior is anything with ``n_fixed`` and ``n_effects`` (the sizes of beta and b), ``dimension`` (of psi),
``label`` (how errors name the call), ``log_prior(psi)`` (rows of psi at once), ``evaluate(psi, log_prior)`` (a
state with ``psi`` and ``log_pi``, or None where the density is 0), ``log_density(psi)`` and
``draw_effects(state, rng, count)``.

References: Tierney (1994), Ann. Statist. 22; Cappe, Guillin, Marin & Robert (2004), JCGS 13.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
from scipy import stats

from ..errors import ArgumentError, ConvergenceError
from .independence import importance_efficiency, metropolis_states
from .priors import host_log_prob
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


def scalar_log_density(prior, values: np.ndarray) -> np.ndarray:
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


def posterior_mode(posterior, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(psi at the posterior's maximum, the covariance -H^-1 there by central differences of log pi)."""
    found = scipy.optimize.minimize(lambda psi: -posterior.log_density(psi), start, method="Nelder-Mead",
                                    options=dict(xatol=1e-6, fatol=1e-9, maxiter=2000))
    # not converged (a flat ridge) is no error here: the mode only centres the proposal, the weights correct it
    mode = np.asarray(found.x, dtype=float)
    d, h = mode.size, HESSIAN_STEP
    center = posterior.log_density(mode)
    if not np.isfinite(center):
        raise ConvergenceError(f"{posterior.label}: the posterior of the variance parameters has no finite "
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


def sample_exact(posterior, start: np.ndarray, chains: int, draws: int, tune: int, seed: int,
                 thin: int | None = None) -> dict:
    """Independence Metropolis-Hastings over psi with exact (beta, b) draws at every kept state (module docstring).

    Returns a dict of ``psi`` (chains, draws, T + 1), ``beta`` (chains, draws, p), ``b`` (chains, draws, q),
    ``lp``, ``acceptance`` (each draw's mean acceptance probability over its steps), ``thin`` and the pilot's
    importance ``efficiency``.
    """
    if chains * draws * posterior.n_effects > EFFECT_DRAWS_MAX_VALUES:
        raise ArgumentError(
            f"{posterior.label} keeps every effect draw: {chains} chains x {draws} draws x {posterior.n_effects} "
            f"effects is more than {EFFECT_DRAWS_MAX_VALUES:.0e} numbers; ask for fewer draws (or use hp.lmm's "
            "closed form)")
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
        warnings.warn(f"{posterior.label}: the proposal's importance-sampling efficiency is {efficiency:.2f}; "
                      f"each draw takes {MAX_STEPS_PER_DRAW} steps at most and the chains may stick (check ESS and "
                      f"R-hat)", SamplingWarning, stacklevel=4)
    start_state = posterior.evaluate(mode)  # where every chain starts: a state of finite density
    start_w = start_state.log_pi - float(np.ravel(stats.multivariate_t(
        proposal.location, proposal.scale, df=DEGREES_OF_FREEDOM).logpdf(mode))[0])
    if thin is None:
        thin = int(np.clip(np.round(1.0 / max(efficiency, 1e-3)), 1, MAX_STEPS_PER_DRAW))
    burn_in = min(tune, BURN_IN)
    d = posterior.dimension
    out = {"psi": np.empty((chains, draws, d)), "beta": np.empty((chains, draws, posterior.n_fixed)),
           "b": np.empty((chains, draws, posterior.n_effects)), "lp": np.empty((chains, draws)),
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
