"""The collapsed sampler: beta and b integrated out analytically, NUTS on the variance parameters only.

Given the variance parameters phi = (sd_j, correlation factors R_j, sigma), the
model is Gaussian in (beta, b), so

    p(phi | y)  ∝  p(phi) p(y | phi),     p(y | phi) = ∫ p(y | beta, b, sigma) p(b | phi) p(beta) db dbeta

in closed form, from the same blocked factorization the closed-form engine uses
(:func:`hierpool.algebra.criterion.reduced_rest`, ``dense_parts``): with
T_j = diag(sd_j) R_j / sigma (lme4's relative factor) and a Normal(m, s^2) prior
on each beta_i written as a pseudo-observation m_i = beta_i + e_i with weight
w_i = sigma^2 / s_i^2 (flat priors have no pseudo-observation),

    -2 log p(y | phi) = log|L_Z|^2 + log|R_X|^2 + (n + k - p) log(2 pi sigma^2) + r^2 / sigma^2
                        - sum log w_rows - sum_i log w_i,

k the number of Normal-prior coefficients (with all priors flat this is lme4's
REML criterion before sigma is profiled out).  After NUTS, each draw of phi gets
an exact draw of (beta, b) from N(Henderson solution, sigma^2 C^-1)
(:func:`hierpool.algebra.henderson.conditional_draw`), so the random effects
come with nearly independent draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .criterion import dense_parts, reduced_rest, row_count
from .henderson import conditional_draw, noise_size
from .linalg import array_namespace, factors_to_theta
from .system import Layout, MixedModelSystem


def theta_from_components(sds, cor_factors, sigma) -> jax.Array:
    """lme4's theta from per-term sds and correlation Cholesky factors: T_j = diag(sd_j) R_j / sigma.

    Leading axes (of sds (..., k_j), factors (..., k_j, k_j) and sigma (...)) are batch axes; NumPy in, NumPy out.
    """
    xp = array_namespace(sigma, *sds)
    scale = xp.asarray(sigma)[..., None, None]
    return factors_to_theta(
        [sd[..., :, None] * (cor if cor is not None else xp.eye(sd.shape[-1])) / scale for sd, cor in zip(sds, cor_factors)]
    )


def beta_prior_weights(scale, sigma) -> tuple:
    """(finite, w): which Normal priors on beta are proper, and their pseudo-observation weights sigma^2 / s^2.

    ``scale`` (..., p), ``sigma`` (...) or scalar; w is 0 where the scale is infinite (a flat prior).
    NumPy in, NumPy out (the one-term engine's host draws); JAX arrays and tracers otherwise.
    """
    xp = array_namespace(scale, sigma)
    finite = xp.isfinite(scale)
    safe = xp.where(finite, scale, 1.0)
    return finite, xp.where(finite, xp.asarray(sigma)[..., None] ** 2 / safe**2, 0.0)


def beta_prior_pseudo_data(loc, scale, sigma, beta_shift) -> tuple:
    """(w, w m, sum w m^2): a Normal(loc, scale^2) prior on beta as pseudo-observations m = loc - beta_shift.

    Added to X^T W X's diagonal, X^T W y and y^T W y of a system whose y is y - X beta_shift
    (the rest matrix of :func:`beta_prior_block`, the one-term statistics of
    :func:`hierpool.algebra.one_term_marginal.with_beta_prior`).  Leading axes of ``sigma`` are batch axes.
    """
    xp = array_namespace(loc, scale, sigma)
    _, weight = beta_prior_weights(scale, sigma)
    loc = loc - beta_shift
    return weight, weight * loc, xp.sum(weight * loc**2, axis=-1)


def collapsed_log_likelihood(logdet, pwrss, sigma, n, p: int, scale, log_weights):
    """log p(y | theta, sigma) from a factorization: the module docstring's formula, shared by both engines.

    ``logdet``: log|L_Z|^2 + log|R_X|^2 of the system with the prior's pseudo-observations;
    ``pwrss``: its penalized weighted residual sum of squares; ``n`` rows, ``p`` fixed effects,
    ``scale`` the prior sds of beta (infinite: flat, no pseudo-observation); ``log_weights`` sum log w_rows.
    """
    xp = array_namespace(logdet, pwrss, sigma, scale)
    finite = xp.isfinite(scale)
    log_prior_weights = xp.sum(xp.where(finite, xp.log(sigma**2) - 2 * xp.log(xp.where(finite, scale, 1.0)), 0.0))
    dof = n + xp.sum(finite) - p
    minus_two = logdet + dof * xp.log(2 * np.pi * sigma**2) + pwrss / sigma**2 - log_weights - log_prior_weights
    return -0.5 * minus_two


def beta_prior_block(loc: jax.Array, scale: jax.Array, sigma: jax.Array, system: MixedModelSystem) -> jax.Array:
    """The pseudo-observations of a Normal(loc, scale^2) prior on beta, added to the reduced rest matrix.

    In the rest matrix [Z_rest, X, y]: X^T W X += diag(w), X^T W y += w m, y^T W y += sum w m^2,
    w = sigma^2 / scale^2 (0 where the scale is infinite: a flat prior), m = loc - beta_shift
    because the system's y column is y - X beta_shift (see :mod:`hierpool.algebra.system`);
    :func:`beta_prior_pseudo_data`.
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    weight, weighted_loc, weighted_ss = beta_prior_pseudo_data(loc, scale, sigma, system.beta_shift)
    size = q + p + 1
    block = jnp.zeros((size, size), dtype=weighted_loc.dtype)
    x = jnp.arange(q, q + p)
    block = block.at[x, x].add(weight)
    block = block.at[x, size - 1].add(weighted_loc)
    block = block.at[size - 1, x].add(weighted_loc)
    return block.at[size - 1, size - 1].add(weighted_ss)


def log_marginal_likelihood(
    theta: jax.Array, sigma: jax.Array, system: MixedModelSystem, loc: jax.Array, scale: jax.Array, n=None
) -> jax.Array:
    """log p(y | theta, sigma) with beta and b integrated out (see the module docstring).

    Pure and differentiable in (theta, sigma) through the closed-form engine's
    custom adjoints; ``sigma`` is 1 for known residual sds.  ``n``: the row count of a batch's system
    (``Layout.n`` None; :func:`hierpool.algebra.criterion.row_count`), else the layout's.
    """
    layout = system.layout
    rest, _, logdet0 = reduced_rest(theta, system)
    rest = rest + beta_prior_block(loc, scale, sigma, system)
    logdet_rest, logdet_rx, pwrss = dense_parts(rest, layout.q_rest, layout.p)
    return collapsed_log_likelihood(logdet0 + logdet_rest + logdet_rx, pwrss, sigma, row_count(system, n), layout.p,
                                    scale, system.log_weights)


def draw_effects(
    thetas: jax.Array, sigmas: jax.Array, system: MixedModelSystem, loc, scale, key: jax.Array, batch_size: int
) -> tuple[jax.Array, tuple]:
    """Exact draws of (beta, b) given each (theta, sigma) draw, ``batch_size`` draws at a time.

    Memory is bounded by the batch (each draw factors the rest matrix once).  The
    draws are padded to whole batches so that only one batch shape is compiled.
    """
    noise = jax.random.normal(key, (thetas.shape[0], noise_size(system.layout)), dtype=thetas.dtype)

    def one(theta, sigma, e):
        prior = beta_prior_block(loc, scale, sigma, system)
        return conditional_draw(theta, system, sigma, e, prior)

    return map_in_batches(one, (thetas, sigmas, noise), batch_size)


def map_in_batches(one, arrays: tuple, batch_size: int):
    """``jax.vmap(one)(*arrays)``, ``batch_size`` rows at a time (memory is bounded by the batch).

    The rows are padded to whole batches so that only one batch shape is compiled.
    """
    count = arrays[0].shape[0]
    if count <= batch_size:
        return jax.vmap(one)(*arrays)
    n_batches = -(-count // batch_size)
    pad = n_batches * batch_size - count

    def batched(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape((n_batches, batch_size) + x.shape[1:])

    out = jax.lax.map(lambda args: jax.vmap(one)(*args), tuple(batched(x) for x in arrays))
    return jax.tree_util.tree_map(lambda x: x.reshape((n_batches * batch_size,) + x.shape[2:])[:count], out)


def draw_batch_size(layout: Layout, budget_bytes: float = 2e8) -> int:
    """How many conditional draws to vectorize at once: the rest matrix is (q + p + 1)^2 per draw."""
    size = layout.q_rest + layout.p + 1
    per_draw = 8.0 * (3 * size * size + 4 * layout.n_levels[0] * layout.ks[0] ** 2 + 1)
    return int(np.clip(budget_bytes // per_draw, 1, 1024))
