"""The collapsed sampler's target and exact effect draws for one-term models, from sufficient statistics.

The same model as :mod:`hierpool.algebra.marginal`, written on the batch
engine's per-dataset statistics so that datasets of any size share one shape
(``hp.bayes_batch`` vmaps it).  With T = diag(sd) R / sigma (lme4's relative
factor) and a Normal(m_i, s_i^2) prior on beta_i added as the pseudo-observation
m_i = beta_i + e_i with weight w_i = sigma^2 / s_i^2 (flat priors have none):

    X^T X += diag(w),   X^T y += w m',   y^T y += sum w m'^2,   m' = m - beta0,

beta0 the statistics' ``beta_shift`` (their y is y - offset - X beta0, see
:mod:`hierpool.algebra.statistics`), and with the factorization of
:func:`hierpool.algebra.one_term.factor_blocks`,

    -2 log p(y | T, sigma) = log|L_Z|^2 + log|L_X|^2 + (n + k_N - p) log(2 pi sigma^2)
                             + pwrss / sigma^2 - sum_i log w_i - sum_rows log v_j,

k_N the number of Normal priors, v_j the rows' prior weights (residual variance
sigma^2 / v_j; the statistics' ``log_weights``).  With known residual sds (``se=``) the
statistics' weights are v_j = 1 / se_j^2 and sigma is 1, as in the closed form's
:func:`hierpool.algebra.one_term.objective` with ``sigma_known``: the same formula at sigma = 1
(T is then diag(sd) R itself).  Given (T, sigma), (beta, b) is Gaussian:

    beta = beta0 + L_X^-T (r + sigma e_beta),   u_l = L_l^-T (c_l - C_l (beta - beta0) + sigma e_l),   b_l = Lambda u_l,

an exact joint draw (beta from its marginal, then u given beta).  The general
engine's :func:`hierpool.algebra.marginal.log_marginal_likelihood` and
:func:`hierpool.algebra.henderson.conditional_draw` compute the same
quantities for any model; tests check the two agree.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from .linalg import array_namespace
from .marginal import beta_prior_pseudo_data, collapsed_log_likelihood, map_in_batches
from .one_term import factor_blocks
from .statistics import BatchStatistics


def with_beta_prior(stats: BatchStatistics, loc, scale, sigma) -> BatchStatistics:
    """One dataset's statistics with the Normal(loc, scale^2) prior's pseudo-observations added.

    The pseudo-observations (:func:`hierpool.algebra.marginal.beta_prior_pseudo_data`) are about
    beta - beta_shift, the statistics' frame.  A batch of sigmas (...,) gives X^T X, X^T y and
    y^T y with those leading axes.
    """
    xp = array_namespace(loc, scale, sigma)
    weight, weighted_loc, weighted_ss = beta_prior_pseudo_data(loc, scale, sigma, stats.beta_shift)
    return dataclasses.replace(
        stats,
        xtx=stats.xtx + weight[..., :, None] * xp.eye(weight.shape[-1]),
        xty=stats.xty + weighted_loc,
        yty=stats.yty + weighted_ss,
    )


def log_marginal_likelihood(theta, sigma, stats: BatchStatistics, loc, scale) -> jax.Array:
    """log p(y | theta, sigma) of one dataset with beta and b integrated out (see the module docstring).

    The general engine's formula (:func:`hierpool.algebra.marginal.collapsed_log_likelihood`) on the
    one-term factorization of the statistics.
    """
    *_, pwrss, logdet_z, logdet_x = factor_blocks(theta, with_beta_prior(stats, loc, scale, sigma))
    return collapsed_log_likelihood(logdet_z + logdet_x, pwrss, sigma, stats.n, stats.xtx.shape[-1], scale,
                                    stats.log_weights)


def conditional_draw(theta, sigma, stats: BatchStatistics, loc, scale, noise_beta, noise_u):
    """An exact draw of (beta, b) given (theta, sigma): ``noise_beta`` (..., p), ``noise_u`` (..., ell, k) standard normal.

    beta on the user's scale (beta_shift added back).  Leading axes are draws: NumPy
    inputs draw many at once on the host, JAX inputs vmap or batch.
    """
    xp = array_namespace(theta, sigma)
    sigma = xp.asarray(sigma)
    lam, chol_inv, cz, cx, chol_x_inv, r, *_ = factor_blocks(theta, with_beta_prior(stats, loc, scale, sigma))
    beta = xp.einsum("...qp,...q->...p", chol_x_inv, r + sigma[..., None] * noise_beta)
    u = xp.einsum("...lji,...lj->...li", chol_inv, cz - xp.einsum("...lip,...p->...li", cx, beta)
                  + sigma[..., None, None] * noise_u)
    return beta + stats.beta_shift, xp.einsum("...lj,...ij->...li", u, lam)  # b_l = Lambda u_l


def draw_effects(thetas, sigmas, stats: BatchStatistics, loc, scale, noise, batch_size: int):
    """One exact (beta, b) draw per (theta, sigma) row: beta (count, p) and b (count, ell, k).

    ``noise``: (count, p + ell k) standard normal variates.  NumPy inputs are drawn on
    the host, ``batch_size`` rows at a time; JAX inputs in the compiled program
    (:func:`hierpool.algebra.marginal.map_in_batches`).  The one-term counterpart of
    :func:`hierpool.algebra.marginal.draw_effects`.
    """
    p = loc.shape[0]

    def some(theta, sigma, e):
        return conditional_draw(theta, sigma, stats, loc, scale, e[..., :p], e[..., p:].reshape(e.shape[:-1] + stats.zty.shape))

    if array_namespace(thetas, sigmas, noise, loc, scale) is np:
        parts = [some(*(a[start : start + batch_size] for a in (thetas, sigmas, noise)))
                 for start in range(0, thetas.shape[0], batch_size)]
        return tuple(np.concatenate(piece) for piece in zip(*parts))
    return map_in_batches(some, (thetas, sigmas, noise), batch_size)


def draw_batch_size(stats: BatchStatistics, budget_bytes: float = 2e8) -> int:
    """How many conditional draws to vectorize at once: each holds the per-level factors (ell, k, k + p + 2)."""
    ell, k = stats.zty.shape
    p = stats.xty.shape[-1]
    per_draw = 8.0 * (ell * k * (k + p + 2) + p * p)
    return int(np.clip(budget_bytes // per_draw, 1, 1024))
