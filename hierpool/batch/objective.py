"""The one-term profiled REML/ML criterion and its solution from sufficient statistics (pure JAX).

With Lambda the k x k lower-triangular relative factor (Sigma = sigma^2 Lambda Lambda^T):

    L_l L_l^T = Lambda^T Z_l^T Z_l Lambda + I,
    c_l = L_l^-1 Lambda^T Z_l^T y,   C_l = L_l^-1 Lambda^T Z_l^T X,
    L_X L_X^T = X^T X - sum_l C_l^T C_l,   r = L_X^-1 (X^T y - sum_l C_l^T c_l),
    pwrss = y^T y - sum_l |c_l|^2 - |r|^2,
    REML: 2 sum_l log|L_l| + 2 log|L_X| + (n - p) (1 + log(2 pi pwrss / (n - p))),
    ML:   2 sum_l log|L_l| + n (1 + log(2 pi pwrss / n)),

the blocked Cholesky factor of Bates et al. (2015, eqs. 18-34) for one term,
where the block of the random effects is block-diagonal.  Everything is a
function of one dataset's :class:`BatchStatistics`; vmap it over datasets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..linalg import cholesky, theta_to_factors, tri_inverse


def _factor(theta: jax.Array, k: int) -> jax.Array:
    return theta_to_factors(theta, (k,))[0]


def factor_blocks(theta, stats):
    """The blocked factorization at ``theta``: (Lambda, L_l^-1, c_l, C_l, L_X^-1, r, pwrss, log|L_Z|^2, log|L_X|^2)."""
    k = stats.ztz.shape[-1]
    lam = _factor(theta, k)
    lam_t = lam.T
    inner = lam_t @ stats.ztz @ lam + jnp.eye(k, dtype=theta.dtype)
    chol = cholesky(inner)
    chol_inv = tri_inverse(chol)
    cz = jnp.einsum("lij,jk,lk->li", chol_inv, lam_t, stats.zty)
    cx = jnp.einsum("lij,jk,lkp->lip", chol_inv, lam_t, stats.ztx)
    schur = stats.xtx - jnp.einsum("lip,liq->pq", cx, cx)
    chol_x = cholesky(schur)
    chol_x_inv = tri_inverse(chol_x)  # p is small: unrolled, no LAPACK call inside the vmapped loop
    rhs = stats.xty - jnp.einsum("lip,li->p", cx, cz)
    r = chol_x_inv @ rhs
    pwrss = stats.yty - jnp.sum(cz**2) - jnp.sum(r**2)
    logdet_z = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    logdet_x = 2 * jnp.sum(jnp.log(jnp.diagonal(chol_x)))
    return lam, chol_inv, cz, cx, chol_x_inv, r, pwrss, logdet_z, logdet_x


def objective(theta: jax.Array, stats, reml: bool = True) -> jax.Array:
    """lme4's REML criterion (or -2 log-likelihood with ``reml=False``) of one dataset."""
    *_, pwrss, logdet_z, logdet_x = factor_blocks(theta, stats)
    p = stats.xtx.shape[-1]
    dof = stats.n - p if reml else stats.n
    value = logdet_z + dof * (1 + jnp.log(2 * jnp.pi * pwrss / dof))
    return value + logdet_x if reml else value


def solution(theta: jax.Array, stats, reml: bool = True) -> dict:
    """beta-hat, its covariance, sigma, the BLUPs b and lme4's condVar at theta (one dataset)."""
    lam, chol_inv, cz, cx, chol_x_inv, r, pwrss, *_ = factor_blocks(theta, stats)
    p = stats.xtx.shape[-1]
    sigma2 = pwrss / (stats.n - p if reml else stats.n)
    beta = chol_x_inv.T @ r
    # u_l = L_l^-T (c_l - C_l beta), b_l = Lambda u_l
    u = jnp.einsum("lji,lj->li", chol_inv, cz - jnp.einsum("lip,p->li", cx, beta))
    b = u @ lam.T
    inner_inv = jnp.einsum("lki,lkj->lij", chol_inv, chol_inv)  # (L L^T)^-1
    cond_var = sigma2 * lam[None] @ inner_inv @ lam.T[None]
    return {
        "beta": beta,
        "vcov": sigma2 * chol_x_inv.T @ chol_x_inv,
        "sigma": jnp.sqrt(sigma2),
        "b": b,
        "cond_var": cond_var,
        "factor": lam,
    }
