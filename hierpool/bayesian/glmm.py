"""The Bayesian generalized linear mixed model: a NumPyro model of a Design with a family, sampled by NUTS.

    eta_i = o_i + x_i beta + sum_j z_ij b_j[l_ij],    y_i ~ family(g^-1(eta_i); a_i, theta)
    b_j[l] ~ Normal(0, Sigma_j),    Sigma_j = F_j F_j^T,    F_j = diag(sd_j) R_j

with g the link, a_i the prior weight (the binomial's trials), o_i the offset, theta a negative
binomial's shape and R_j R_j^T ~ LKJ(cor).  The log-likelihood is
:func:`hierpool.algebra.family.log_likelihood_eta` (written on eta, without clamps, so that its
gradient is right everywhere).

Parameterisation, level by level.  Level l's effect is sampled partially non-centered (Papaspiliopoulos,
Roberts & Skold 2003, 2007): with sd the term's sds, R its correlation factor and a weight w in [0, 1]
per level and coefficient,

    v_l ~ Normal(0, diag(sd^w) R R^T diag(sd^w)),    b_l = sd^(1 - w) * v_l,

so w = 1 samples b itself (centered) and w = 0 its sd-standardized form (non-centered).  Which form mixes
depends on how much the data say about the level against its prior: with little information the centered
form ties b to its sd in a funnel that no single step size fits (Betancourt & Girolami 2015), with much the
data pin b down and the non-centered form ties v to the sd instead.  For a Gaussian likelihood with
information I about b and prior variance sd^2, w = I sd^2 / (1 + I sd^2) (one minus the shrinkage factor)
is the weight that leaves a partially non-centered effect a posteriori uncorrelated with its population
mean (Papaspiliopoulos et al. 2003); Gorinova, Moore & Hoffman (2020) give location and scale one weight,
as here, where each level and coefficient gets that w, with I and sd^2 from a pilot computed on the host
(:func:`centering_weights`): the working weights of a GLM fit without the random effects, and
DerSimonian & Laird's moment estimate of each coefficient's variance.  The pilot only chooses
coordinates: the posterior is the same whatever it says.
:data:`PARAMETERIZATION` forces w = 0 or 1 everywhere (for comparisons: benchmarks/glmm_bayes.py prints
each).  With the variance parameters held there is no funnel, and the effects are non-centered, b = F u.
The Laplace-marginalised alternative (NUTS on the variance parameters over the Laplace approximation)
samples an approximate posterior unless it is corrected, where this one is exact.  For a model with one scalar
term ``hp.bayes`` first tries :mod:`hierpool.bayesian.independence` (the Laplace approximation as the proposal of
independence Metropolis-Hastings, which corrects it exactly, with no compiled program); this model is its fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ..algebra.family import Family, Link, log_gamma_ratio, log_likelihood_eta, negative_binomial_mean_terms
from ..algebra.glm import irls_step, starting_eta
from ..algebra.linalg import theta_to_factors
from .model import HeldVariance, effect_draws, fixed_effects, variance_draws, variance_parameters
from .nuts import sample_nuts
from .posterior import linear_predictor_draws
from .priors import Priors

#: ``"auto"``: each level's centering weight w from :func:`centering_weights`; ``"centered"`` (w = 1) or
#: ``"non-centered"`` (w = 0): every level so (for comparisons: benchmarks/glmm_bayes.py; as
#: ``fit.ONE_TERM_STATISTICS``).
PARAMETERIZATION = "auto"
#: Iterations of the pilot's GLM fit (iteratively reweighted least squares).
PILOT_ITERATIONS = 25
#: A negative binomial's log Gamma(y + theta) - log Gamma(theta) is summed as logs, sum_{k < y} log(theta + k),
#: when the largest count is at most this many times the number of distinct counts: a log Gamma and its
#: derivative cost about as much as this many logs and reciprocals.
LOG_SUM_PER_GAMMA = 20
#: Adapt a dense mass matrix up to this many sampled coefficients (fixed effects, random effects, variance
#: parameters), a diagonal one beyond: the fixed effects are a-posteriori correlated (the intercept with each
#: factor level's contrast), which a diagonal mass cannot undo; its adaptation costs O(d^2) per draw.
DENSE_MASS_MAX_DIMENSION = 200


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GLMMData:
    """The Design's arrays as JAX arrays (a pytree, traced by the compiled sampler)."""

    y: jax.Array  # the response as the family reads it (proportions for the binomial)
    weights: jax.Array  # a_i: the binomial's trials times any prior weights; ones without
    offset: jax.Array
    X: jax.Array
    index: tuple  # per term, (n,) int32
    z: tuple  # per term, (n, k_j)
    centering: tuple  # per term, (ell_j, k_j) in [0, 1]: each level's and coefficient's centering weight w
    # a negative binomial's sum_i a_i [log Gamma(y_i + theta) - log Gamma(theta)] as sum_v A_v [...] over its
    # distinct responses v, or as sum_k C_k log(theta + k), k < max y; one of the two is empty (so are both
    # for the other families): see negative_binomial_target
    count_values: jax.Array  # v
    count_weights: jax.Array  # A_v = sum of a_i over the rows with y_i = v
    count_steps: jax.Array  # k = 0, 1, ..., max y - 1
    count_above: jax.Array  # C_k = sum of a_i over the rows with y_i > k


def glmm_data(design, centering: list[np.ndarray]) -> GLMMData:
    # device_put, not jnp.asarray: on a NumPy array jnp.asarray compiles a conversion program per shape
    put = jax.device_put
    values = weights = steps = above = np.zeros(0)
    if design.family.name == "negative_binomial":
        values, inverse = np.unique(design.y, return_inverse=True)
        weights = np.bincount(inverse.reshape(-1), weights=design.row_weights, minlength=values.size)
        top = int(round(values[-1]))
        if top <= LOG_SUM_PER_GAMMA * values.size:
            steps = np.arange(top, dtype=float)
            above = np.cumsum(weights[::-1])[::-1]  # sum of a_i over y_i >= values[m]
            above = above[np.searchsorted(values, steps, side="right")] if top else steps
            values = weights = np.zeros(0)
    return GLMMData(
        y=put(np.asarray(design.y, dtype=float)),
        weights=put(np.asarray(design.row_weights, dtype=float)),
        offset=put(np.asarray(design.offset, dtype=float)),
        X=put(np.asarray(design.X, dtype=float)),
        index=tuple(put(np.asarray(t.index, dtype=np.int32)) for t in design.terms),
        z=tuple(put(np.asarray(t.z, dtype=float)) for t in design.terms),
        centering=tuple(put(np.asarray(w, dtype=float)) for w in centering),
        count_values=put(np.asarray(values, dtype=float)),
        count_weights=put(np.asarray(weights, dtype=float)),
        count_steps=put(np.asarray(steps, dtype=float)),
        count_above=put(np.asarray(above, dtype=float)),
    )


def centering_weights(design, parameterization: str = "auto") -> list[np.ndarray]:
    """Per term, each level's and coefficient's centering weight w in [0, 1], shape (ell_j, k_j).

    The pilot of the module docstring: a GLM without the random effects is fitted by iteratively
    reweighted least squares (:func:`hierpool.algebra.glm.irls_step`, without step halving; a negative
    binomial as a Poisson); at its linear predictor, with working weights w_i and working residuals r_i,
    level l of coefficient c of term j has information
    I_l = sum_i w_i z_ic^2 and one-step estimate b_l = sum_i w_i z_ic r_i / I_l, and tau_c^2 is
    DerSimonian & Laird's (1986) moment estimate of the variance of the b_l given their sampling
    variances 1 / I_l.  Then w = I_l tau_c^2 / (1 + I_l tau_c^2).
    """
    if parameterization != "auto":
        return [np.full((t.n_levels, t.k), float(parameterization == "centered")) for t in design.terms]
    spec = design.family
    family = Family("poisson", Link("log")) if spec.name == "negative_binomial" else Family(spec.name, Link(spec.link))
    y, trials, X, offset = design.y, design.row_weights, design.X, design.offset
    eta = starting_eta(family, y, trials)
    with np.errstate(all="ignore"):
        for _ in range(PILOT_ITERATIONS):
            new = offset.copy()
            if design.p:
                try:
                    new += X @ irls_step(X, y, eta, trials, offset, family)
                except np.linalg.LinAlgError:  # a degenerate pilot: every level non-centered
                    return centering_weights(design, "non-centered")
            if not np.all(np.isfinite(new)):
                break
            done = np.max(np.abs(new - eta)) < 1e-8
            eta = new
            if done:
                break
        _, weights, residual = family.working(y, eta, trials)
        return [level_centering(term.index, term.z, term.n_levels, weights, residual) for term in design.terms]


def level_centering(index: np.ndarray, z: np.ndarray, n_levels: int, weights: np.ndarray,
                    residual: np.ndarray) -> np.ndarray:
    """One term's centering weights (n_levels, k) from the pilot's working weights and residuals at its rows
    (:func:`centering_weights`; ``hp.bayes_batch`` calls it dataset by dataset)."""
    w = np.zeros((n_levels, z.shape[1]))
    with np.errstate(all="ignore"):
        for c in range(z.shape[1]):
            info = np.bincount(index, weights=weights * z[:, c] ** 2, minlength=n_levels)
            score = np.bincount(index, weights=weights * z[:, c] * residual, minlength=n_levels)
            ratio = info * _moment_variance(info, score)
            w[:, c] = np.where(np.isfinite(ratio) & (ratio > 0), ratio / (1.0 + ratio), 0.0)
    return np.clip(w, 0.0, 1.0)


def _moment_variance(info: np.ndarray, score: np.ndarray) -> float:
    """DerSimonian & Laird's tau^2 of the estimates score / info with sampling variances 1 / info (0 if undefined)."""
    informative = np.isfinite(info) & (info > 0)
    weights, estimates = info[informative], score[informative] / info[informative]
    if weights.size < 2:
        return 0.0
    mean = np.sum(weights * estimates) / np.sum(weights)
    q = np.sum(weights * (estimates - mean) ** 2)
    scale = np.sum(weights) - np.sum(weights**2) / np.sum(weights)
    tau2 = (q - (weights.size - 1)) / scale if scale > 0 else 0.0
    return float(tau2) if np.isfinite(tau2) and tau2 > 0 else 0.0


def glmm_model(data: GLMMData, priors: Priors, held: HeldVariance | None, *, ks: tuple[int, ...],
               n_levels: tuple[int, ...], family: str, link: str):
    """The NumPyro model of the module docstring; with ``held`` the variance parameters (and shape) are fixed.

    Term j's site ``z__j`` holds the v_l of its levels, partially non-centered with the weights
    ``data.centering[j]``; with held variance parameters, the u of b = F u, u ~ N(0, I).
    """
    beta = fixed_effects(priors)
    if held is None:
        _, sds, cors = variance_parameters(priors, ks)  # no sigma: priors.sigma is None
        shape = numpyro.sample("shape", priors.shape) if family == "negative_binomial" else None
    else:
        sds = cors = None
        shape = None if held.shape is None else jnp.asarray(held.shape)
    eta = data.offset + data.X @ beta
    for j, (k, ell) in enumerate(zip(ks, n_levels)):
        if held is not None:
            u = numpyro.sample(f"z__{j}", dist.Normal(0.0, 1.0).expand((ell, k)).to_event(2))
            b = numpyro.deterministic(f"b__{j}", u @ jnp.asarray(held.cov_factors[j]).T)
        elif k == 1:
            sd, w = sds[j][0], data.centering[j]
            v = numpyro.sample(f"z__{j}", dist.Normal(0.0, sd**w).to_event(2))
            b = numpyro.deterministic(f"b__{j}", v * sd ** (1.0 - w))
        else:
            sd, w = sds[j], data.centering[j]
            tril = (sd**w)[:, :, None] * cors[j]  # diag(sd^w) R per level
            v = numpyro.sample(f"z__{j}", dist.MultivariateNormal(jnp.zeros(k), scale_tril=tril).to_event(1))
            b = numpyro.deterministic(f"b__{j}", v * sd ** (1.0 - w))
        eta = eta + jnp.sum(data.z[j] * b[data.index[j]], axis=1)
    if family == "negative_binomial":
        numpyro.factor("y", negative_binomial_target(data, eta, shape))
    else:  # the terms free of the parameters (binomial coefficients, log y!) are left out of the target
        numpyro.factor("y", jnp.sum(log_likelihood_eta(family, link, data.y, eta, data.weights, shape, constant=False)))


def held_variance(fit) -> HeldVariance:
    """The variance parameters of an ``hp.glmm`` fit as ``hp.bayes(variance=fit)`` holds them: F_j = T_j(theta-hat)
    per term (lme4's relative covariance factor; a GLMM's scale is 1), and a negative binomial's shape."""
    factors = theta_to_factors(np.asarray(fit.theta, dtype=float), tuple(t.k for t in fit.design.terms))
    return HeldVariance(cov_factors=tuple(np.asarray(f, dtype=float) for f in factors), sigma=1.0, shape=fit.shape)


def negative_binomial_target(data: GLMMData, eta, shape):
    """sum_i of :func:`~hierpool.algebra.family.log_likelihood_eta` of a negative binomial, less the terms in y alone.

    Its log Gamma(y_i + theta) - log Gamma(theta) - y_i log theta terms
    (:func:`~hierpool.algebra.family.log_gamma_ratio`), most of a row's cost with their derivative, are
    taken once per distinct count v (weighted by the sum A_v of its rows' weights), or, with counts small
    against their number of distinct values (:data:`LOG_SUM_PER_GAMMA`), as
    sum_k C_k log(1 + k / theta) over k < max y, C_k the weights of the rows with y_i > k
    (log Gamma(y + theta) - log Gamma(theta) - y log theta = sum_{k < y} log(1 + k / theta) for whole y).
    """
    # family.negative_binomial_log_density's two parts, the log Gamma one per distinct count (or as sums of logs)
    return (jnp.sum(data.weights * negative_binomial_mean_terms(data.y, eta, shape))
            + jnp.sum(data.count_weights * log_gamma_ratio(shape, data.count_values))
            + jnp.sum(data.count_above * jnp.log1p(data.count_steps / shape)))


def sample_glmm(design, priors: Priors, held: HeldVariance | None, chains, draws, tune, seed, target_accept, progress):
    """NUTS draws of a GLMM: (beta, b per term, sds, correlation factors, shape, sampler statistics).

    Draws shaped (chain, draw, ...); sds, correlation factors and shape are None when held
    (shape also for families without one).
    """
    ks = tuple(t.k for t in design.terms)
    n_levels = tuple(t.n_levels for t in design.terms)
    family = design.family
    dimension = design.p + sum(k * ell for k, ell in zip(ks, n_levels)) + (0 if held else sum(
        k * (k + 1) // 2 for k in ks))
    centering = centering_weights(design, PARAMETERIZATION if held is None else "non-centered")
    out, stats = sample_nuts(
        glmm_model,
        (glmm_data(design, centering), priors, held),
        static=(("ks", ks), ("n_levels", n_levels), ("family", family.name), ("link", family.link)),
        chains=chains,
        tune=tune,
        draws=draws,
        seed=seed,
        target_accept=target_accept,
        dense_mass=dimension <= DENSE_MASS_MAX_DIMENSION,
        progress=progress,
        mass_dimension=dimension,
    )
    beta, b = effect_draws(out, design.p, len(ks), chains, draws)
    if held is not None:
        return beta, b, None, None, None, stats
    sds, cors, _ = variance_draws(out, ks, True)
    return beta, b, sds, cors, out.get("shape"), stats


def pointwise_log_likelihood(design, beta: np.ndarray, b: list[np.ndarray], shape: np.ndarray | None) -> np.ndarray:
    """log p(y_i | beta, b, theta) per draw and row, shape (chain, draw, n), normalizing constants included.

    The binomial's is of the successes a_i y_i out of a_i trials (rstanarm's ``log_lik`` of a
    ``cbind`` response), so that LOO compares models on the likelihood they were fitted with.
    """
    eta = linear_predictor_draws(design, beta, b)
    family = design.family
    theta = None if shape is None else np.asarray(shape, dtype=float)[..., None]
    return log_likelihood_eta(family.name, family.link, design.y, eta, design.row_weights, theta)
