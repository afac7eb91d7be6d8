"""Term 0's per-level factorization and its adjoint written out entry by entry, for stacks of small blocks on the
host (NumPy).

For each level l of term 0 (blocks k0 x k0), with T0 the term's relative factor and A_l = Z_l^T W Z_l,

    D_l = T0^T A_l T0 + I = L_l L_l^T,   left_l = L_l^-1 T0^T,   M_l = left_l^T left_l = T0 D_l^-1 T0^T,
    P_l = left_l^T L_l^-1 = T0 D_l^-1,   log |D| = 2 sum_l sum_i log (L_l)_ii,

and the gradient in T0 of c log |D| + sum_l <G_l, M_l> is 2 sum_l (c A_l + G_l - A_l M_l G_l) P_l
(:func:`hierpool.algebra.criterion._term0_adjoint`, whose maths this is).  A batch's host search evaluates these for
thousands of (dataset, point, level) blocks at once.  Stacked matrix products and NumPy's batched Cholesky loop
over the blocks one by one; here each entry of a k0 x k0 result is an elementwise sum of products of whole
(dataset, point, level) arrays, k0^3 operations on long arrays, as :mod:`hierpool.algebra.one_term` writes its
blocks.  The same numbers as the stacked forms to rounding (``tests/test_shared_pieces.py``); the arithmetic is
analytic (L L^T, no conjugation), so complex steps pass through it, and elementwise, so a block that is not
positive definite gives NaN in its own entries only (its dataset's criterion NaN, as the stacked forms' fallback).

Leading axes: ``t0`` (..., k0, k0) against ``a00`` (..., ell, k0, k0); the results carry the broadcast leading axes,
levels before the blocks' axes, as the stacked forms do.  T0 is lower triangular: its upper triangle is not read.
"""

from __future__ import annotations

import numpy as np

from .linalg import cholesky_entries, stack_entries, sum_of, tri_inverse_entries

#: Widest term 0 (k0) written out entry by entry on the host: the entry lists grow as k0^3, and at five
#: coefficients the stacked forms are as fast (timed in benchmarks/RESULTS.md, twentieth session).
MAX_K0 = 4


def applies(t0, a00) -> bool:
    """Whether term 0's host algebra is written out entry by entry here (NumPy arrays, 2 <= k0 <= :data:`MAX_K0`;
    a scalar term's stacked forms are already elementwise)."""
    return isinstance(t0, np.ndarray) and isinstance(a00, np.ndarray) and 2 <= t0.shape[-1] <= MAX_K0


def _entries(a: np.ndarray) -> list[list[np.ndarray]]:
    k = a.shape[-1]
    return [[a[..., i, j] for j in range(k)] for i in range(k)]


def factor_entries(t0: np.ndarray, a00: np.ndarray):
    """(T0, A, L, L^-1, left) as entry lists: T0's entries with a trailing axis (against the levels), None above its
    diagonal; the others (..., ell).  A block that is not positive definite is NaN, silently (the caller reads it)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _factor_entries(t0, a00)


def _factor_entries(t0: np.ndarray, a00: np.ndarray):
    k = t0.shape[-1]
    t = [[t0[..., i, j][..., None] if j <= i else None for j in range(k)] for i in range(k)]
    a = _entries(a00)
    # (A T0)[i][j] = sum_(b >= j) A[i][b] T0[b][j]; D's lower triangle (all the Cholesky factor reads)
    at = [[sum_of(a[i][b] * t[b][j] for b in range(j, k)) for j in range(k)] for i in range(k)]
    d = [[sum_of(t[c][i] * at[c][j] for c in range(i, k)) if j <= i else None for j in range(k)] for i in range(k)]
    for i in range(k):
        d[i][i] = d[i][i] + 1.0
    chol = cholesky_entries(d)
    chol_inv = tri_inverse_entries(chol)
    # left = L^-1 T0^T: left[i][j] = sum_(m <= min(i, j)) L^-1[i][m] T0[j][m]
    left = [[sum_of(chol_inv[i][m] * t[j][m] for m in range(min(i, j) + 1)) for j in range(k)] for i in range(k)]
    return t, a, chol, chol_inv, left


def _log_det(chol) -> np.ndarray:
    """log |D| = 2 sum_l sum_i log L_ii, summed over the levels (the last axis)."""
    return 2.0 * np.sum(sum_of(np.log(chol[i][i]) for i in range(len(chol))), axis=-1)


def _m_entries(left):
    k = len(left)
    upper = {(i, j): sum_of(left[c][i] * left[c][j] for c in range(k)) for i in range(k) for j in range(i, k)}
    return [[upper[(min(i, j), max(i, j))] for j in range(k)] for i in range(k)]


def _stacked(entries) -> np.ndarray:
    zero = np.zeros_like(next(x for row in entries for x in row if x is not None))
    return stack_entries(entries, zero)


def value(t0: np.ndarray, a00: np.ndarray):
    """(log |D|, M_l), stacked: :func:`hierpool.algebra.criterion._term0_value`'s (the criterion alone)."""
    _, _, chol, _, left = factor_entries(t0, a00)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _log_det(chol), _stacked(_m_entries(left))


def forward(t0: np.ndarray, a00: np.ndarray):
    """(log |D|, M_l, L_l, L_l^-1, left_l), stacked: :func:`hierpool.algebra.criterion._term0_forward`'s."""
    _, _, chol, chol_inv, left = factor_entries(t0, a00)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_det = _log_det(chol)
    return log_det, _stacked(_m_entries(left)), _stacked(chol), _stacked(chol_inv), _stacked(left)


def values(t0: np.ndarray, a00: np.ndarray):
    """((log |D|, M_l), (A_l, M_l, P_l)): :func:`hierpool.algebra.criterion._term0_values`' (the value and what the
    adjoint takes), P_l = left_l^T L_l^-1."""
    _, _, chol, chol_inv, left = factor_entries(t0, a00)
    k = len(left)
    m_levels = _stacked(_m_entries(left))
    # P[i][j] = sum_(c >= j) left[c][i] L^-1[c][j]
    p_levels = _stacked([[sum_of(left[c][i] * chol_inv[c][j] for c in range(j, k)) for j in range(k)]
                         for i in range(k)])
    with np.errstate(invalid="ignore", divide="ignore"):
        log_det = _log_det(chol)
    return (log_det, m_levels), (a00, m_levels, p_levels)


def adjoint(a00: np.ndarray, m_levels: np.ndarray, p_levels: np.ndarray, c_logdet, grad_m: np.ndarray) -> np.ndarray:
    """The gradient in T0 (..., k0, k0) of c_logdet log |D| + sum_l <G_l, M_l>:
    2 sum_l (c A_l + G_l - A_l M_l G_l) P_l, G_l the symmetric part of ``grad_m``
    (:func:`hierpool.algebra.criterion._term0_adjoint`'s); its lower triangle, all that theta reads
    (:func:`hierpool.algebra.linalg.factor_gradients_to_theta`), with zeros above."""
    k = a00.shape[-1]
    a, m, p = _entries(a00), _entries(m_levels), _entries(p_levels)
    g = [[0.5 * (grad_m[..., i, j] + grad_m[..., j, i]) for j in range(k)] for i in range(k)]
    am = [[sum_of(a[i][c] * m[c][j] for c in range(k)) for j in range(k)] for i in range(k)]
    inner = [[c_logdet * a[i][j] + g[i][j] - sum_of(am[i][c] * g[c][j] for c in range(k)) for j in range(k)]
             for i in range(k)]
    return 2.0 * _stacked([[np.sum(sum_of(inner[i][c] * p[c][j] for c in range(k)), axis=-1) if j <= i else None
                            for j in range(k)] for i in range(k)])
