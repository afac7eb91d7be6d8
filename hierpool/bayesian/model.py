"""NumPyro models of a linear mixed model built from a Design.

    y_i ~ Normal(o_i + x_i beta + sum_j z_ij b_j[l_ij], sigma / sqrt(w_i))
    b_j[l] ~ Normal(0, Sigma_j),   Sigma_j = diag(sd_j) R_j R_j^T diag(sd_j),   R_j R_j^T ~ LKJ(cor)

* :func:`full_model`: every parameter sampled by NUTS, random effects
  non-centered (b_j = z_j (diag(sd_j) R_j)^T with z_j ~ N(0, I)), which avoids
  the funnel between the sds and the effects (Papaspiliopoulos et al. 2007).
* :func:`collapsed_model`: only the variance parameters; beta and b are
  integrated out (:mod:`hierpool.algebra.marginal`).

o_i is the offset (zeros without one) and w_i the prior weight (lmer's: residual
variance sigma^2 / w_i; 1 / se_i^2 with known residual sds, sigma then 1).

Sample sites are internal (``sd__0``, ``cor__0``, ``z__0``...); results are
renamed after grouping factors and coefficients when the posterior is assembled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ..algebra.ar1 import carried, log_det_correlation, whitened_system
from ..algebra.marginal import log_marginal_likelihood, theta_from_components
from ..algebra.one_term_marginal import log_marginal_likelihood as one_term_log_marginal_likelihood
from ..algebra.system import MixedModelSystem
from .priors import Priors


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ModelData:
    """The Design's arrays as JAX arrays (a pytree, so models can be jitted over it)."""

    y: jax.Array
    offset: jax.Array  # o_i, the known part of the linear predictor (zeros without an offset)
    X: jax.Array
    index: tuple  # per term, (n,) int32
    z: tuple  # per term, (n, k_j)
    noise_scale: jax.Array  # 1 / sqrt(w_i): prior weights or 1/se^2, else ones
    relationship: tuple = ()  # per term, None or the lower Cholesky factor of its relationship matrix A (ell, ell)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class HeldVariance:
    """Variance parameters held fixed (the validation's exact mode): per-term Cholesky factors of Sigma_j."""

    cov_factors: tuple  # lower-triangular (k_j, k_j), Sigma_j = F F^T
    sigma: float  # residual sd (1.0 with known residual sds, and in a GLMM, which has none)
    shape: float | None = None  # a negative binomial's shape (None for every other model)
    phi: float | None = None  # an AR(1) correlation's phi (None without one)


def model_data(design, relationship: tuple = ()) -> ModelData:
    """The design's arrays on the device; ``relationship``: per term None or the Cholesky factor of its A."""
    # device_put, not jnp.asarray: on a NumPy array jnp.asarray compiles a conversion program per shape
    noise = 1.0 / np.sqrt(design.row_weights)
    put = jax.device_put
    return ModelData(
        y=put(np.asarray(design.y, dtype=float)),
        offset=put(np.asarray(design.offset, dtype=float)),
        X=put(np.asarray(design.X, dtype=float)),
        index=tuple(put(np.asarray(t.index, dtype=np.int32)) for t in design.terms),
        z=tuple(put(np.asarray(t.z, dtype=float)) for t in design.terms),
        noise_scale=put(np.asarray(noise, dtype=float)),
        relationship=tuple(None if factor is None else put(np.asarray(factor, dtype=float)) for factor in relationship),
    )


class _DeferredFactor(dist.Distribution):
    """NumPyro's ``Unit`` distribution of :func:`numpyro.factor`, its log factor computed only when a log density asks."""

    support = constraints.real

    def __init__(self, log_factor: Callable[[], jax.Array]):
        self.log_factor = log_factor
        super().__init__(batch_shape=(), event_shape=(0,))

    def sample(self, key, sample_shape=()):
        return jnp.empty(tuple(sample_shape) + self.event_shape)

    def log_prob(self, value):
        return self.log_factor()


def deferred_factor(name: str, log_factor: Callable[[], jax.Array]) -> None:
    """``numpyro.factor(name, log_factor())``, with ``log_factor()`` called only where the model's density is evaluated.

    Traces of the model that only read its latent sites (the chains' starting
    points, the constrained draws) then skip the marginal likelihood, the bulk of
    a collapsed model (the tracing saved on sleepstudy: benchmarks/RESULTS.md, "Bayesian
    engine, sixth session").
    """
    unit = _DeferredFactor(log_factor)
    numpyro.sample(name, unit, obs=unit.sample(None), infer={"is_auxiliary": True})


def variance_parameters(priors: Priors, ks: tuple[int, ...]):
    """Sample sigma, the sds and correlation factors; return (sigma, sds, cor_factors)."""
    sigma = numpyro.sample("sigma", priors.sigma) if priors.sigma is not None else jnp.asarray(1.0)
    sds, cors = [], []
    for j, k in enumerate(ks):
        sds.append(numpyro.sample(f"sd__{j}", priors.sd[j]))
        if k == 2:
            # LKJ(eta) for a 2 x 2 matrix is the law of its correlation rho = 2 u - 1, u ~ Beta(eta, eta)
            # (det R^(eta - 1) = (1 - rho^2)^(eta - 1)).  The same prior as LKJCholesky(2, eta); this
            # scalar site compiles in a fraction of the time (benchmarks/RESULTS.md, "Bayesian engine — 2026-11-21").
            u = numpyro.sample(f"cor_u__{j}", dist.Beta(priors.cor[j], priors.cor[j]))
            cors.append(numpyro.deterministic(f"cor__{j}", _two_by_two_factor(2 * u - 1)))
        else:
            cors.append(numpyro.sample(f"cor__{j}", dist.LKJCholesky(k, priors.cor[j])) if k > 1 else None)
    return sigma, sds, cors


def variance_draws(draws: dict, ks: tuple[int, ...], sigma_known: bool):
    """(sds, correlation factors, sigma) per term from the constrained draws of :func:`variance_parameters`' sites.

    sigma is ones with known residual sds, one per draw (the sds' leading axes: (draws,) or (chains, draws));
    a term with one coefficient has no correlation factor (None).
    """
    sds = [draws[f"sd__{j}"] for j in range(len(ks))]
    cors = [draws[f"cor__{j}"] if k > 1 else None for j, k in enumerate(ks)]
    sigma = np.ones(sds[0].shape[:-1]) if sigma_known else draws["sigma"]  # NumPy: no eager JAX call outside a program
    return sds, cors, sigma


def effect_draws(draws: dict, p: int, n_terms: int, chains: int, n_draws: int):
    """(beta (chains, draws, p), b per term) from the constrained draws of a full model's sites.

    beta is one vector site ``beta`` where every fixed-effect prior is normal (:func:`fixed_effects`),
    otherwise one site ``beta__i`` per column; b is ``b__j`` per term.
    """
    if "beta" in draws:
        beta = draws["beta"]
    elif p:
        beta = np.stack([draws[f"beta__{i}"] for i in range(p)], axis=-1)
    else:
        beta = np.zeros((chains, n_draws, 0))
    return beta, [np.asarray(draws[f"b__{j}"]) for j in range(n_terms)]


def _two_by_two_factor(rho: jax.Array) -> jax.Array:
    """Cholesky factor [[1, 0], [rho, sqrt(1 - rho^2)]] of the correlation matrix."""
    return jnp.stack([jnp.stack([jnp.ones_like(rho), jnp.zeros_like(rho)]), jnp.stack([rho, jnp.sqrt(1 - rho**2)])])


def fixed_effects(priors: Priors) -> jax.Array:
    """beta's sample sites: one vector ``beta`` when every prior is normal, else ``beta__i`` per column
    (flat where a prior is None)."""
    if priors.beta and priors.beta_all_normal():
        loc = jnp.stack([jnp.asarray(prior.loc) for prior in priors.beta])
        scale = jnp.stack([jnp.asarray(prior.scale) for prior in priors.beta])
        return numpyro.sample("beta", dist.Normal(loc, scale))
    flat = dist.ImproperUniform(constraints.real, (), ())
    draws = [numpyro.sample(f"beta__{i}", flat if prior is None else prior) for i, prior in enumerate(priors.beta)]
    return jnp.stack(draws) if draws else jnp.zeros(0)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SeriesData:
    """An AR(1) model's series as JAX arrays: each row's predecessor (-1: none), the lag, and y - offset."""

    previous: jax.Array  # (n,) int32
    lag: jax.Array  # (n,)
    y_less_offset: jax.Array  # (n,)


def group_effects(mu, index: tuple, z: tuple, cov_factors, ks: tuple[int, ...], n_levels: tuple[int, ...],
                  relationship: tuple = ()):
    """mu plus the ``(lhs | g)`` terms' contributions z_ij' b_j[level], non-centered: sites ``z__j`` ~ N(0, I)
    (ell_j, k_j) and b_j = z_j L_j' (``b__j``, deterministic), L_j the term's covariance factor; with a relationship
    factor L_A (``relationship[j]``), b_j = L_A z_j L_j' (b ~ N(0, sd^2 A))."""
    for j, (k, ell, factor) in enumerate(zip(ks, n_levels, cov_factors)):
        u = numpyro.sample(f"z__{j}", dist.Normal(0.0, 1.0).expand((ell, k)).to_event(2))
        if relationship and relationship[j] is not None:
            u = relationship[j] @ u
        b = numpyro.deterministic(f"b__{j}", u @ factor.T)
        mu = mu + jnp.sum(z[j] * b[index[j]], axis=1)
    return mu


def cov_factors_of(sds, cors) -> list:
    """Each term's covariance factor diag(sd) R (R the correlation's Cholesky factor; diag(sd) for k = 1)."""
    return [sd[:, None] * cor if cor is not None else jnp.diag(sd) for sd, cor in zip(sds, cors)]


def full_model(data: ModelData, priors: Priors, held: HeldVariance | None, series: SeriesData | None = None, *,
               ks: tuple[int, ...], n_levels: tuple[int, ...], phi_bounds: tuple[float, float] | None = None):
    """The non-centered NumPyro model; with ``held`` the variance parameters are fixed at its values.

    A term with a relationship matrix (``data.relationship[j]``, the Cholesky factor L_A of A) has b_j = sd_j L_A z_j:
    b_j ~ N(0, sd_j^2 A), written independently of the sparse mixed-model equations (the animal model's check).

    With ``series`` the residuals are AR(1) within series: each row's residual given the one before it is
    Normal(c_t r_(t-1), sigma^2 (1 - c_t^2)), c_t = phi^lag_t (phi held, or Uniform on ``phi_bounds``; phi per
    the unit of ``series.lag``, which hp.bayes makes the median lag in continuous time); the likelihood is
    written on the residuals directly, independently of the whitened mixed-model equations.
    """
    beta = fixed_effects(priors)
    if held is None:
        sigma, sds, cors = variance_parameters(priors, ks)
        cov_factors = cov_factors_of(sds, cors)
    else:
        sigma, cov_factors = jnp.asarray(held.sigma), [jnp.asarray(f) for f in held.cov_factors]
    mu = group_effects(data.offset + data.X @ beta, data.index, data.z, cov_factors, ks, n_levels, data.relationship)
    if series is None:
        numpyro.sample("y", dist.Normal(mu, sigma * data.noise_scale), obs=data.y)
        return
    phi = numpyro.sample("phi", dist.Uniform(*phi_bounds)) if held is None else jnp.asarray(held.phi)
    residual = data.y - mu
    c = carried(phi, series.previous, series.lag)
    before = residual[jnp.maximum(series.previous, 0)]
    numpyro.factor("y", jnp.sum(dist.Normal(c * before, sigma * jnp.sqrt(1.0 - c * c)).log_prob(residual)))


def collapsed_model(system: MixedModelSystem, loc: jax.Array, scale: jax.Array, priors: Priors, n=None):
    """NUTS target over the variance parameters only: prior times the marginal likelihood (``n``: a batch's row
    count, :func:`hierpool.algebra.marginal.log_marginal_likelihood`)."""
    ks = system.layout.ks
    sigma, sds, cors = variance_parameters(priors, ks)
    deferred_factor(
        "marginal_likelihood",
        lambda: log_marginal_likelihood(theta_from_components(sds, cors, sigma), sigma, system, loc, scale, n),
    )


def ar1_collapsed_model(pattern, series: SeriesData, loc: jax.Array, scale: jax.Array, priors: Priors, n=None, *,
                        phi_bounds: tuple[float, float]):
    """NUTS target over the variance parameters and an AR(1) correlation's phi (Uniform on its interval, brms's
    default for ``ar``; phi per the unit of ``series.lag``, which hp.bayes makes the median lag in continuous time,
    so that the prior is on the correlation at that lag whatever the time column's unit): prior times the marginal
    likelihood of the data whitened at phi (:func:`hierpool.algebra.ar1.whitened_system`), times the whitening's
    Jacobian |C(phi)|^-1/2.  ``n``: a batch's row count (``hp.bayes_batch``), else the pattern's."""
    ks = pattern.layout.ks
    phi = numpyro.sample("phi", dist.Uniform(*phi_bounds))
    sigma, sds, cors = variance_parameters(priors, ks)

    deferred_factor("marginal_likelihood", lambda: ar1_log_marginal_likelihood(
        phi, theta_from_components(sds, cors, sigma), sigma, pattern, series, loc, scale, n))


#: Central-difference step in phi of :func:`ar1_log_marginal_likelihood`'s derivative.
PHI_DIFFERENCE = 1e-5


def _ar1_value(phi, theta, sigma, pattern, series, loc, scale, n=None):
    system = whitened_system(pattern, series.previous, series.lag, series.y_less_offset, phi)
    jacobian = -0.5 * log_det_correlation(carried(phi, series.previous, series.lag))
    return log_marginal_likelihood(theta, sigma, system, loc, scale, n) + jacobian


@jax.custom_jvp
def ar1_log_marginal_likelihood(phi, theta, sigma, pattern, series: SeriesData, loc, scale, n=None):
    """log p(y | theta, sigma, phi) of an AR(1) model, beta and b integrated out: the whitened data's marginal
    likelihood (:func:`hierpool.algebra.marginal.log_marginal_likelihood`) plus the Jacobian -log |C(phi)| / 2.

    Differentiable in (phi, theta, sigma): in (theta, sigma) by the closed form's adjoints, which hold the
    system (the data's cross-products) fixed; phi enters through the system, so its derivative is a central
    difference (:data:`PHI_DIFFERENCE`; two more evaluations, ~1e-6 relative error at these magnitudes,
    far below what NUTS's energy error notices).  ``n``: a batch's row count (the pattern's by default).
    """
    return _ar1_value(phi, theta, sigma, pattern, series, loc, scale, n)


@ar1_log_marginal_likelihood.defjvp
def _ar1_log_marginal_likelihood_jvp(primals, tangents):
    phi, theta, sigma, pattern, series, loc, scale, n = primals
    d_phi, d_theta, d_sigma = tangents[:3]  # the data's tangents are zero: they are not sampled
    value, (g_theta, g_sigma) = jax.value_and_grad(_ar1_value, argnums=(1, 2))(
        phi, theta, sigma, pattern, series, loc, scale, n)
    sides = [_ar1_value(phi + h, theta, sigma, pattern, series, loc, scale, n)
             for h in (PHI_DIFFERENCE, -PHI_DIFFERENCE)]
    g_phi = (sides[0] - sides[1]) / (2.0 * PHI_DIFFERENCE)
    return value, g_phi * d_phi + jnp.sum(g_theta * d_theta) + g_sigma * d_sigma


def one_term_collapsed_model(stats, loc, scale, priors, *, k: int):
    """NumPyro target over one dataset's variance parameters: prior times the marginal likelihood."""
    sigma, sds, cors = variance_parameters(priors, (k,))
    deferred_factor(
        "marginal_likelihood",
        lambda: one_term_log_marginal_likelihood(theta_from_components(sds, cors, sigma), sigma, stats, loc, scale),
    )
