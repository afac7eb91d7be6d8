"""Pure JAX kernels shared by the closed-form and the Bayesian engines.

Everything here is a function of arrays with static shape information only,
so it can be jit-compiled, differentiated and vmapped.

Relative covariance factors follow lme4 (Bates et al. 2015, eq. 4): the
random effects of term j are b = (I_ell (x) T_j) u with T_j lower triangular,
and theta holds the lower triangles of all T_j, each in column-major order.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)  # the closed-form engine works in float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def tril_positions(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the k(k+1)/2 entries of a lower triangle in column-major order (lme4's)."""
    cols, rows = np.triu_indices(k)
    return rows, cols


def theta_lower_bounds(ks: tuple[int, ...]) -> np.ndarray:
    """Lower bounds of theta: 0 for the diagonal of each T_j, -inf elsewhere."""
    bounds = []
    for k in ks:
        rows, cols = tril_positions(k)
        bounds.append(np.where(rows == cols, 0.0, -np.inf))
    return np.concatenate(bounds)


def theta_start(ks: tuple[int, ...]) -> np.ndarray:
    """lme4's starting value: T_j = I for every term."""
    starts = []
    for k in ks:
        rows, cols = tril_positions(k)
        starts.append((rows == cols).astype(float))
    return np.concatenate(starts)


def theta_to_factors(theta: jax.Array, ks: tuple[int, ...]) -> list[jax.Array]:
    """Split theta into the lower-triangular k_j x k_j factors T_j."""
    factors = []
    offset = 0
    for k in ks:
        rows, cols = tril_positions(k)
        size = len(rows)
        factors.append(jnp.zeros((k, k), theta.dtype).at[rows, cols].set(theta[offset : offset + size]))
        offset += size
    return factors


def factors_to_theta(factors: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`theta_to_factors`."""
    parts = []
    for factor in factors:
        rows, cols = tril_positions(factor.shape[0])
        parts.append(np.asarray(factor)[rows, cols])
    return np.concatenate(parts)


def cholesky_small(a: jax.Array) -> jax.Array:
    """Cholesky factors of a batch of small SPD matrices, shape (..., k, k).

    The scalar case is a square root: XLA's batched Cholesky loops over the
    batch, which is slow for thousands of 1 x 1 blocks.
    """
    if a.shape[-1] == 1:
        return jnp.sqrt(a)
    return jnp.linalg.cholesky(a)


def tri_inverse_small(lower: jax.Array) -> jax.Array:
    """Inverses of a batch of small lower-triangular matrices, shape (..., k, k)."""
    k = lower.shape[-1]
    if k == 1:
        return 1.0 / lower
    eye = jnp.broadcast_to(jnp.eye(k, dtype=lower.dtype), lower.shape)
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)


def scale_columns(matrix: jax.Array, blocks, transpose: bool = False) -> jax.Array:
    """``matrix @ blockdiag(I_ell (x) F)`` without forming it, F = T (or T^T with ``transpose``).

    ``blocks`` lists (ell, k, T) for consecutive column blocks; T None means identity.
    """
    pieces = []
    offset = 0
    rows = matrix.shape[0]
    for ell, k, factor in blocks:
        piece = matrix[:, offset : offset + ell * k]
        if factor is not None and k == 1:
            piece = piece * factor[0, 0]
        elif factor is not None:
            right = factor.T if transpose else factor
            piece = (piece.reshape(rows, ell, k) @ right).reshape(rows, ell * k)
        pieces.append(piece)
        offset += ell * k
    return jnp.concatenate(pieces, axis=1)


def logdet_from_cholesky_diagonal(diagonal: jax.Array) -> jax.Array:
    """log det(L L^T) from the diagonal of L."""
    return 2.0 * jnp.sum(jnp.log(diagonal))
