"""The one-term profiled REML/ML criterion and its solution from sufficient statistics (pure JAX).

With Lambda the k x k lower-triangular relative factor (Sigma = sigma^2 Lambda Lambda^T):

    L_l L_l^T = Lambda^T Z_l^T Z_l Lambda + I,
    c_l = L_l^-1 Lambda^T Z_l^T y,   C_l = L_l^-1 Lambda^T Z_l^T X,
    L_X L_X^T = X^T X - sum_l C_l^T C_l,   r = L_X^-1 (X^T y - sum_l C_l^T c_l),
    pwrss = y^T y - sum_l |c_l|^2 - |r|^2,
    REML: 2 sum_l log|L_l| + 2 log|L_X| + (n - p) (1 + log(2 pi pwrss / (n - p))) - sum_i log w_i,
    ML:   2 sum_l log|L_l| + n (1 + log(2 pi pwrss / n)) - sum_i log w_i,

the blocked Cholesky factor of Bates et al. (2015, eqs. 18-34) for one term,
where the block of the random effects is block-diagonal, with prior weights w
inside every cross-product (lme4's criterion with ``weights``).  Everything is a
function of one dataset's :class:`BatchStatistics`; vmap it over datasets.  Its
y is y - offset - X beta0 (:mod:`hierpool.algebra.statistics`), so the solution's
beta is beta0 + L_X^-T r.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .criterion import profiled_criterion
from .henderson import Solution
from .linalg import (
    UNROLL_MAX_SIZE,
    array_namespace,
    cholesky,
    cholesky_entries,
    forward_solve_entries,
    stack_entries,
    sum_of,
    tri_inverse,
    tri_inverse_entries,
    tril_positions,
)

if TYPE_CHECKING:
    import jax


def _factor_entries(theta: jax.Array, k: int) -> list[list]:
    """Lambda's entries as (...,) arrays of theta (``None`` above the diagonal: Lambda is lower triangular)."""
    entries: list[list] = [[None] * k for _ in range(k)]
    for position, (i, j) in enumerate(zip(*tril_positions(k))):
        entries[i][j] = theta[..., position]
    return entries


def _profiled(theta, stats):
    """The factorization's pieces as entry lists: (Lambda, L_l, c_l, C_l, L_X, r, pwrss, log|L_Z|^2, log|L_X|^2)."""
    xp = array_namespace(theta, stats.ztz)
    k = stats.ztz.shape[-1]
    lam = _factor_entries(theta, k)
    # against per-level (..., ell) and (..., ell, p) arrays
    lam_l = [[None if x is None else x[..., None] for x in row] for row in lam]
    lam_lp = [[None if x is None else x[..., None, None] for x in row] for row in lam]
    ztz = [[stats.ztz[..., a, b] for b in range(k)] for a in range(k)]
    # Lambda^T Z_l^T Z_l Lambda + I; Lambda[c][j] is zero for c < j
    ztz_lam = [[sum_of(ztz[a][c] * lam_l[c][j] for c in range(j, k)) for j in range(k)] for a in range(k)]
    inner = [[sum_of(lam_l[a][i] * ztz_lam[a][j] for a in range(i, k)) for j in range(k)] for i in range(k)]
    for i in range(k):
        inner[i][i] = inner[i][i] + 1.0
    chol = cholesky_entries(inner)
    # c_l = L_l^-1 Lambda^T Z_l^T y and C_l = L_l^-1 Lambda^T Z_l^T X, by forward substitution
    cz = forward_solve_entries(chol, [sum_of(lam_l[a][i] * stats.zty[..., a] for a in range(i, k)) for i in range(k)])
    cx = forward_solve_entries(chol, [sum_of(lam_lp[a][i] * stats.ztx[..., a, :] for a in range(i, k)) for i in range(k)])
    # sums over levels as matrix products, not einsum (timed on the host's stacks: benchmarks/RESULTS.md, "Batch
    # fitting for every model, tenth session")
    schur = stats.xtx - sum_of(xp.swapaxes(c, -1, -2) @ c for c in cx)
    chol_x = cholesky(schur)
    chol_x_inv = tri_inverse(chol_x)  # p is small: unrolled, no LAPACK call inside the vmapped loop
    rhs = stats.xty - sum_of((xp.swapaxes(c, -1, -2) @ z[..., None])[..., 0] for c, z in zip(cx, cz))
    r = xp.einsum("...pq,...q->...p", chol_x_inv, rhs)
    pwrss = stats.yty - sum_of(xp.sum(z**2, axis=-1) for z in cz) - xp.sum(r**2, axis=-1)
    logdet_z = 2 * sum_of(xp.sum(xp.log(chol[i][i]), axis=-1) for i in range(k))
    p = chol_x.shape[-1]
    if p <= UNROLL_MAX_SIZE:  # static slices: the gradient of a diagonal (a gather) is a scatter
        logdet_x = 2 * sum_of(xp.log(chol_x[..., i, i]) for i in range(p)) if p else xp.zeros(chol_x.shape[:-2], dtype=chol_x.dtype)
    else:
        logdet_x = 2 * xp.sum(xp.log(xp.diagonal(chol_x, axis1=-2, axis2=-1)), axis=-1)
    return lam, chol, cz, cx, chol_x_inv, r, pwrss, logdet_z, logdet_x


def factor_blocks(theta, stats):
    """The blocked factorization at ``theta``: (Lambda, L_l^-1, c_l, C_l, L_X^-1, r, pwrss, log|L_Z|^2, log|L_X|^2).

    The per-level k x k algebra is unrolled over k into elementwise arithmetic on
    (ell,) arrays (:mod:`hierpool.algebra.linalg`'s entry lists), which XLA fuses into a
    few loops (fewer, larger kernels than the same algebra written with (ell, k, k)
    matrix products; benchmarks/RESULTS.md).  The trace grows as k^3, which is small
    for random-effect terms (k <= ~6).

    Leading axes of ``theta`` (and of ``stats.xtx``, ``xty``, ``yty``) are batch axes,
    and NumPy arrays are factored with NumPy (:func:`hierpool.algebra.linalg.array_namespace`):
    many draws of one dataset at once on the host, as ``hp.bayes``' exact draws do.
    """
    lam, chol, cz, cx, chol_x_inv, r, pwrss, logdet_z, logdet_x = _profiled(theta, stats)
    xp = array_namespace(theta, stats.ztz)
    chol_inv = stack_entries(tri_inverse_entries(chol), xp.zeros_like(chol[0][0]))
    cz_stacked, cx_stacked = xp.stack(cz, axis=-1), xp.stack(cx, axis=-2)
    lam_matrix = stack_entries(lam, xp.zeros_like(lam[0][0]))
    return lam_matrix, chol_inv, cz_stacked, cx_stacked, chol_x_inv, r, pwrss, logdet_z, logdet_x


def objective(theta: jax.Array, stats, reml: bool = True, sigma_known: bool = False) -> jax.Array:
    """lme4's REML criterion (or -2 log-likelihood with ``reml=False``) of one dataset.

    ``sigma_known``: the residual sds are known (``se=``) and carried by the statistics'
    weights 1 / se_i^2, so sigma is 1, not profiled out.  Leading axes of ``theta`` are
    evaluated at once; in NumPy (``theta`` and ``stats`` NumPy arrays) it runs on the host,
    complex ``theta`` included (:func:`value_and_gradient`).  The final formula is the general
    path's (:func:`hierpool.algebra.criterion.profiled_criterion`).
    """
    *_, pwrss, logdet_z, logdet_x = _profiled(theta, stats)
    p = stats.xtx.shape[-1]
    return profiled_criterion(logdet_z, logdet_x, pwrss, stats.n, p, stats.log_weights, reml, sigma_known)


COMPLEX_STEP = 1e-30


def value_and_gradient(theta: np.ndarray, stats, reml: bool = True, sigma_known: bool = False):
    """The criterion and its gradient on the host, in one NumPy evaluation.

    The gradient is the complex step (Squire & Trapp 1998; Martins et al. 2003):
    the criterion is real-analytic in theta, so

        f(theta + i h e_j) = f(theta) + i h df/dtheta_j + O(h^2),

    and Im f(theta + i h e_j) / h is df/dtheta_j to rounding for any tiny h (no
    difference is taken, so nothing cancels), while Re f is f itself.  All
    directions are one batched evaluation with theta of shape (n_theta, n_theta).
    Every step is analytic (no abs, no conjugation: the Cholesky factors are
    L L^T, :func:`hierpool.algebra.linalg.cholesky`), which the test against the
    general path's adjoint gradient checks.

    ``theta`` of shape (n_theta,) gives (float, (n_theta,) array); leading axes
    (..., n_theta) give values (...) and gradients (..., n_theta), all in one evaluation.
    """
    theta = np.asarray(theta, dtype=float)
    size = theta.shape[-1]
    directions = theta[..., None, :] + 1j * COMPLEX_STEP * np.eye(size)  # (..., n_theta, n_theta)
    if not size:
        directions = theta[..., None, :].astype(complex)
    values = complex_objective(directions, stats, reml, sigma_known)
    value = values[..., 0].real
    gradient = values.imag / COMPLEX_STEP if size else np.zeros(theta.shape)
    if theta.ndim == 1:
        return float(value), gradient
    return value, gradient


def complex_objective(theta: np.ndarray, stats, reml: bool = True, sigma_known: bool = False,
                      domain_checked: bool = False) -> np.ndarray:
    """:func:`objective` at complex points on the host (the complex step's evaluations, :func:`value_and_gradient`):
    ``theta`` and the statistics may both be complex (a step in a parameter the statistics depend on, an AR(1)
    correlation's: :mod:`hierpool.algebra.search.ar1_moments`), their leading axes broadcast.  ``domain_checked``: NaN where
    the real criterion is undefined (a penalized residual sum of squares or a pivot of X's block not positive, by
    rounding at a degenerate theta), where the complex logarithm and square root would still give a finite real
    part (the AR(1) host search, which must reject such a step as the compiled program's NaN does)."""
    if not domain_checked:
        return objective(theta, stats, reml, sigma_known)
    *_, chol_x_inv, _, pwrss, logdet_z, logdet_x = _profiled(theta, stats)
    p = stats.xtx.shape[-1]
    values = profiled_criterion(logdet_z, logdet_x, pwrss, stats.n, p, stats.log_weights, reml, sigma_known)
    pivots = np.diagonal(chol_x_inv, axis1=-2, axis2=-1).real  # 1 / L_X's pivots: the same signs
    outside = (pwrss.real <= 0) | np.any(~(pivots > 0), axis=-1)
    return np.where(outside, np.nan, values)


def solution(theta: jax.Array, stats, reml: bool = True, sigma_known: bool = False, fixed_map=None) -> Solution:
    """Henderson's solution at ``theta`` from the statistics: the general path's :class:`Solution`, one term.

    beta-hat (beta0 added back: the user's scale), its covariance sigma^2 (R_X^T R_X)^-1, sigma
    (1 with known residual sds), the spherical effects u_l = L_l^-T (c_l - C_l beta), the BLUPs
    b_l = Lambda u_l and lme4's condVar sigma^2 Lambda (L_l L_l^T)^-1 Lambda^T, as
    :func:`hierpool.algebra.henderson.solve` gives them for the same model (tested equal).
    ``fixed_map`` (p x p) maps the statistics' beta to the user's, beta = M beta_s and
    Cov = M Cov_s M^T (statistics of centred columns, :func:`hierpool.algebra.statistics.centred_statistics`).
    Leading axes of ``theta`` and the statistics are datasets (a batch on the host, ``hp.fit_batch``).
    """
    lam, chol_inv, cz, cx, chol_x_inv, r, pwrss, logdet_z, logdet_x = factor_blocks(theta, stats)
    xp = array_namespace(theta, stats.ztz)
    p = stats.xtx.shape[-1]
    sigma2 = xp.ones_like(pwrss) if sigma_known else pwrss / (stats.n - p if reml else stats.n)
    beta = xp.einsum("...qp,...q->...p", chol_x_inv, r)
    u = xp.einsum("...lji,...lj->...li", chol_inv, cz - xp.einsum("...lip,...p->...li", cx, beta))
    inner_inv = xp.einsum("...lki,...lkj->...lij", chol_inv, chol_inv)  # (L L^T)^-1
    vcov = sigma2[..., None, None] * xp.einsum("...qp,...qr->...pr", chol_x_inv, chol_x_inv)
    beta = beta + stats.beta_shift
    if fixed_map is not None:
        beta, vcov = xp.einsum("pq,...q->...p", fixed_map, beta), fixed_map @ vcov @ fixed_map.T
    return Solution(
        theta=theta,
        factors=(lam,),
        beta=beta,
        u=(u,),
        b=(xp.einsum("...li,...ji->...lj", u, lam),),
        cond_var=(sigma2[..., None, None, None] * xp.einsum("...ia,...lab,...jb->...lij", lam, inner_inv, lam),),
        vcov_beta=vcov,
        sigma=xp.sqrt(sigma2),
        pwrss=pwrss,
        logdet_lz=logdet_z,
        logdet_rx=logdet_x,
    )


#: theta at which a scalar term's criterion is evaluated after a search (:func:`scan_restarts`): 0, and from 1e-3 to
#: 100 (sd_b / sigma) in equal ratios, in theta's units: with prior weights (or known sds) times their unit
#: (:func:`~.linalg.log_weights_unit`).  In absolute theta the scan missed a minimum at 5.8e-7 with weights of ~1e9
#: (unit 3.2e-5), hp.lmm's search ending at 0, REML 0.18 above it (the fifty-second session's scan).
SCALAR_SCAN = np.concatenate([[0.0], np.geomspace(1e-3, 1e2, 31)])


def scan_values(stats, reml: bool, sigma_known: bool = False, unit=1.0) -> np.ndarray:
    """The one-term criterion (:func:`objective`) at every point of :data:`SCALAR_SCAN` times ``unit`` (a float, or
    one per row) at once, (points, rows) in float64 on the host: ``stats`` one dataset's statistics (one row) or a
    stack's (leading axis datasets).  Non-finite values are kept (:func:`scan_restarts` ignores them)."""
    rows = np.shape(stats.n)
    units = np.broadcast_to(np.asarray(unit, dtype=float), rows)[..., None]
    grid = SCALAR_SCAN.reshape((-1,) + (1,) * len(rows) + (1,)) * units[None]
    with np.errstate(all="ignore"):  # every point at once (leading axes of theta)
        values = np.asarray(objective(grid, stats, reml, sigma_known), dtype=float)
    return values.reshape(SCALAR_SCAN.size, -1)


def scan_restarts(values: np.ndarray, found: np.ndarray, unit=1.0) -> tuple[np.ndarray, np.ndarray]:
    """(which rows, their theta (rows, 1)) to search again from: where a point of :data:`SCALAR_SCAN` (times
    ``unit``, as :func:`scan_values`') is lower than a row's optimum ``found`` (rows,) by more than 1e-6 relative, the
    lowest point.  ``values``: the criterion at the scan's points (points, rows), non-finite ones ignored.

    With prior weights the ML criterion of ``y ~ x + (1 | g)`` can have two minima in theta (one at 0, one inside):
    a search keeps the one it reaches (``hp.fit_batch`` 0.5-54 above the other, ``hp.lmm`` 0.043 above, both
    converged, in the reviewer's sweeps).  ``hp.lmm`` and the one-term batch both scan a scalar term's criterion
    with prior weights and search again from here."""
    values = np.where(np.isfinite(values), values, np.inf)
    best = np.argmin(values, axis=0)
    lowest = values[best, np.arange(values.shape[1])]
    found = np.asarray(found, dtype=float)
    return lowest < found - 1e-6 * np.maximum(1.0, np.abs(found)), (SCALAR_SCAN[best] * unit)[:, None]
