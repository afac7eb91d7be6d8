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
(:func:`hierpool.bayesian.psi_sampler.sample_exact`: a Student t proposal around the posterior mode, adapted once
to a pilot sample's importance weights).  Each evaluation is one sparse factorization of K; the draw of (beta, b)
given each kept psi is exact from that factorization:

    beta - m ~ N(delta^, sigma^2 S^-1),   b | beta ~ N(b^ - K^-1 Z'WX (beta - m - delta^), sigma^2 K^-1),

the second by :attr:`~hierpool.closedform.relmat.KFactor.draw` (Rue 2001).  No gradient and no compilation: the
cost is one factorization of K per Metropolis-Hastings step.

References: Tierney (1994), Ann. Statist. 22; Cappe, Guillin, Marin & Robert (2004), JCGS 13; Rue (2001), JRSS B 63;
Sorensen & Gianola (2002), Likelihood, Bayesian and MCMC methods in quantitative genetics, ch. 13.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..closedform.relmat import KFactor, RelmatEquations
from ..errors import ArgumentError
from .priors import Priors
from .psi_sampler import scalar_log_density

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
        self.n_fixed, self.n_effects = eq.p, eq.q
        self.label = "hp.bayes with relmat="
        # log|diag(s^2)| of the Normal priors: with it, -2 log p(y | psi) is the marginal likelihood itself
        self.log_det_prior = float(np.sum(np.log(np.asarray(scale, dtype=float)[np.isfinite(scale)] ** 2)))

    def log_prior(self, psi: np.ndarray) -> np.ndarray:
        """log p(psi) of each row of psi (..., T + 1): the sds' and sigma's priors with the Jacobian of sd = e^psi."""
        psi = np.asarray(psi, dtype=float)
        sds = np.exp(psi)
        parts = [scalar_log_density(prior, sds[..., j]) for j, prior in enumerate(self.priors.sd)]
        parts.append(scalar_log_density(self.priors.sigma, sds[..., -1]))
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
