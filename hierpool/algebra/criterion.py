"""Profiled REML / ML objective of a linear mixed model as a pure function of theta.

Model (Bates et al. 2015, "Fitting linear mixed-effects models using lme4",
J. Stat. Softw. 67(1), sections 3.1-3.4):

    y = X beta + Z b + e,   b = Lambda(theta) u,   u ~ N(0, sigma^2 I),   e ~ N(0, sigma^2 W^-1).

With ``y`` carried along as the last column (MixedModels.jl), one blocked
Cholesky factor L of

    [Lambda^T Z^T W Z Lambda + I   Lambda^T Z^T W X   Lambda^T Z^T W y]
    [           .                  X^T W X            X^T W y         ]
    [           .                     .               y^T W y         ]

gives log|L_Z|^2, log|R_X|^2 and the penalized residual sum of squares
r^2 = L[y, y]^2, and the profiled criteria are

    ML:    d(theta)  = log|L_Z|^2 + n (1 + log(2 pi r^2 / n))
    REML:  dR(theta) = log|L_Z|^2 + log|R_X|^2 + (n - p)(1 + log(2 pi r^2 / (n - p)))

(lme4's ``deviance`` and ``REMLcrit``; the prior-weight term -sum log w is added).
When residual sds are known (``se=``), sigma = 1 on the weighted scale is not
profiled out, theta holds absolute sds, and

    ML:    log|L_Z|^2 + r^2 + n log(2 pi) - sum log w
    REML:  log|L_Z|^2 + log|R_X|^2 + r^2 + (n - p) log(2 pi) - sum log w.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import term0_entries
from .jax_runtime import jax, jnp, pytree_dataclass
from .linalg import (
    HOST_SINGLE_THREAD_MAX_SIZE,
    UNROLL_MAX_SIZE,
    array_namespace,
    block_product,
    cholesky,
    distinct_columns,
    factor_gradients_to_theta,
    host_product,
    logdet_from_cholesky_diagonal,
    scale_columns,
    segment_sum,
    solve_triangular,
    spd_inverse_from_cholesky,
    spd_inverse_from_inverse_factor,
    theta_to_factors,
    tri_inverse,
)
from .system import MixedModelSystem, dense_coupling, dense_coupling_pays, grid_coupling

#: log(2 pi) as a Python float, which takes the dtype of what it meets (NumPy's float64 scalar promoted a float32
#: batch's criterion with known residual sds to float64).
LOG_2PI = math.log(2.0 * math.pi)

#: Term-0 blocks (levels x datasets) up to which the host forms T0^T A00_l T0 by two matrix products (k0 >= 2; the
#: criterion's blocks of at most term0_entries.MAX_K0 coefficients are written out entry by entry instead):
#: einsum's contraction-order search, paid on every call, costs more than the products of a few hundred k0 x k0
#: blocks, and a GLMM's PIRLS forms them a few thousand times for one dataset (a single fit, or a batch's last
#: searches); past about a thousand blocks the paired einsum is faster (benchmarks/RESULTS.md, "The GLMM class,
#: fifteenth session").  Scalar blocks (k0 = 1) take the plain einsum at any size, a loop faster than matmul's.
MATMUL_MAX_BLOCKS = 1024


def _term0_factors(t0: jax.Array, a00: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`term0_factor`'s (L0_l, L0_l^-1 T0^T) with L0_l^-1 between them."""
    xp = array_namespace(t0)
    if xp is np and t0.shape[-1] > 1 and a00[..., 0, 0].size <= MATMUL_MAX_BLOCKS:
        diag0 = np.swapaxes(t0, -1, -2)[..., None, :, :] @ a00 @ t0[..., None, :, :] + np.eye(t0.shape[-1])
    else:
        # NumPy's einsum of three operands is a naive loop unless it is told to pair them (far slower for k0 >= 2 on
        # a batch's stack: benchmarks/RESULTS.md, "The GLMM class on the host"); for scalar blocks the plain loop is
        # faster
        paired = {"optimize": True} if xp is np and t0.shape[-1] > 1 else {}
        diag0 = xp.einsum("...ji,...ljk,...km->...lim", t0, a00, t0, **paired) + xp.eye(t0.shape[-1])
    chol0 = cholesky(diag0)
    chol0_inv = tri_inverse(chol0)
    return chol0, chol0_inv, block_product(chol0_inv, xp.swapaxes(t0, -1, -2)[..., None, :, :])


def term0_factor(t0: jax.Array, a00: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cholesky factors L0_l of D_l = T0^T A00_l T0 + I and the products L0_l^-1 T0^T, per term-0 level.

    Leading axes of t0 (..., k0, k0) and a00 (..., ell0, k0, k0) broadcast (a batch of systems on the host).
    """
    chol0, _, left = _term0_factors(t0, a00)
    return chol0, left


def _term0_forward(t0, a00):
    """(sum_l log|D_l|, M_l = T0 D_l^-1 T0^T, L0_l, L0_l^-1, L0_l^-1 T0^T): term 0's value and its factors (small
    blocks on the host entry by entry, :mod:`hierpool.algebra.term0_entries`)."""
    if term0_entries.applies(t0, a00):
        return term0_entries.forward(t0, a00)
    chol0, chol0_inv, left = _term0_factors(t0, a00)
    xp = array_namespace(left)
    logdet0 = logdet_from_cholesky_diagonal(xp.diagonal(chol0, axis1=-2, axis2=-1), axis=(-2, -1))
    # M_l = left_l' left_l: a product over the stack (NumPy's einsum here is a naive loop)
    return logdet0, block_product(xp.swapaxes(left, -1, -2), left), chol0, chol0_inv, left


def _term0_values(t0, a00):
    """((sum_l log|D_l|, M_l), residuals): :func:`term0_parts` and what its adjoint takes, (A00_l, M_l,
    P_l = T0 D_l^-1 = left_l' L0_l^-1)."""
    if term0_entries.applies(t0, a00):
        return term0_entries.values(t0, a00)
    logdet0, m_levels, _, chol0_inv, left = _term0_forward(t0, a00)
    p_levels = block_product(array_namespace(left).swapaxes(left, -1, -2), chol0_inv)
    return (logdet0, m_levels), (a00, m_levels, p_levels)


def _term0_value(t0, a00):
    if term0_entries.applies(t0, a00):
        return term0_entries.value(t0, a00)
    return _term0_forward(t0, a00)[:2]


def _term0_bwd(residuals, cotangents):
    a00, m_levels, p_levels = residuals
    c_logdet, grad_m = cotangents
    xp = array_namespace(a00)
    return _term0_adjoint(a00, m_levels, p_levels, c_logdet, grad_m), xp.zeros_like(a00)


def term0_parts(t0: jax.Array, a00: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum_l log|D_l|, M_l = T0 D_l^-1 T0^T per level) of term 0, D_l = T0^T A00_l T0 + I.

    NumPy on the host; traced, a ``jax.custom_vjp`` whose adjoint is :func:`_term0_adjoint`, the
    one the host path chains by hand, so both paths differentiate term 0 the same way.
    A00 is data: its cotangent is zero.
    """
    if array_namespace(t0) is np:
        return _term0_value(t0, a00)
    return _traced_primitives()[2](t0, a00)


def _contract(products: jax.Array, weights: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """Contract pair products (p, k0, k0, kr, ks) with per-pair weights over two of their axes.

    ``axes=(1, 2)``: weights (p, k0, k0) -> (p, kr, ks); ``axes=(3, 4)``: weights (p, kr, ks) -> (p, k0, k0).
    Written as a broadcast product, not an einsum, because XLA turns a batched
    einsum of 1 x 1 blocks into millions of tiny matrix products.
    """
    xp = array_namespace(weights)
    if xp is np and products.shape[1:] == (1, 1, 1, 1):  # scalar blocks on the host: no 5-d temporaries
        return (weights.reshape(-1) * products.reshape(-1)).reshape(-1, 1, 1)
    if axes == (1, 2):
        return xp.sum(weights[:, :, :, None, None] * products, axis=axes)
    return xp.sum(weights[:, None, None, :, :] * products, axis=axes)


def level_contractions(system: MixedModelSystem, matrix: jax.Array, n_blocks: int) -> jax.Array:
    """Per term-0 level l, sum over coupling pairs in l of V_r[a] H_rs[cell] V_s[b]^T (k0 x k0).

    ``matrix`` is a symmetric (m, m) matrix H over the rest columns; only the
    first ``n_blocks`` rest blocks are used.  This is the adjoint of the Schur
    update (its gradient with respect to M_l) and, with H = Lambda S^-1
    Lambda^T, the correction that turns term 0's block-diagonal inverse into
    the diagonal blocks of the full inverse.
    """
    layout = system.layout
    k0 = layout.ks[0]
    offsets = np.concatenate([[0], np.cumsum([ell * k for ell, k in layout.rest_blocks])])
    if dense_coupling_pays(system):  # on the host the dense coupling is formed per call, as in _schur_update
        width = int(offsets[n_blocks])
        coupling = dense_coupling(system) if array_namespace(matrix) is np else coupling_in_program(system)
        return _level_contractions_dense(coupling[..., :width], matrix[..., :width, :width])
    total = array_namespace(matrix).zeros((layout.n_levels[0], k0, k0), matrix.dtype)
    for (r, s), pairs in zip(layout.pair_keys(), system.pairs):
        if s >= n_blocks:
            continue
        (ell_r, k_r), (ell_s, k_s) = layout.rest_blocks[r], layout.rest_blocks[s]
        block = matrix[offsets[r] : offsets[r + 1], offsets[s] : offsets[s + 1]]
        cells = block.reshape(ell_r, k_r, ell_s, k_s).transpose(0, 2, 1, 3).reshape(ell_r * ell_s, k_r, k_s)
        # one cell (X and y blocks): broadcast it rather than gather it per pair
        weights = cells if ell_r * ell_s == 1 else cells[pairs.target]
        per_level = segment_sum(_contract(pairs.products, weights, axes=(3, 4)), pairs.level0, layout.n_levels[0])
        # the pair (b, a) contributes the transpose of (a, b)'s: r != s lists (a, b) only, r = s
        # lists a <= b with a = b halved (system.Pairs)
        total = total + per_level + per_level.transpose(0, 2, 1)
    return total


def _schur_update(system: MixedModelSystem, m_levels: jax.Array) -> jax.Array:
    """sum over term-0 levels l of V_l^T M_l V_l as a dense unscaled (m, m) matrix.

    The pair products are theta-independent (precomputed in the system), so this is a
    gather of the small M_l, a multiply and a sorted segment-sum per pair of rest blocks.
    """
    xp = array_namespace(m_levels)
    if dense_coupling_pays(system):  # on the host the dense coupling is formed per call (a system used once)
        return _schur_update_dense(dense_coupling(system) if xp is np else coupling_in_program(system), m_levels)
    blocks = system.layout.rest_blocks
    grid = [[None] * len(blocks) for _ in blocks]
    for (r, s), pairs in zip(system.layout.pair_keys(), system.pairs):
        (ell_r, k_r), (ell_s, k_s) = blocks[r], blocks[s]
        contributions = _contract(pairs.products, m_levels[pairs.level0], axes=(1, 2))
        if ell_r * ell_s == 1:  # X and y blocks: every pair lands in the one cell, a plain sum (no scatter)
            summed = xp.sum(contributions, axis=0, keepdims=True)
        else:
            summed = segment_sum(contributions, pairs.target, ell_r * ell_s, sorted_segments=True)
        block = summed.reshape(ell_r, ell_s, k_r, k_s).transpose(0, 2, 1, 3).reshape(ell_r * k_r, ell_s * k_s)
        if r == s:  # a <= b only, a = b halved (system.Pairs)
            block = block + block.T
        grid[r][s] = block
        if r != s:
            grid[s][r] = block.T
    return xp.block(grid)


def _scaling_blocks(system: MixedModelSystem, rest_factors) -> list:
    return [(ell, k, f) for (ell, k), f in zip(system.layout.rest_blocks, rest_factors)]


def _reduce(rest_factors: tuple, m_levels: jax.Array, system: MixedModelSystem) -> jax.Array:
    """S = Lambda_r^T (A_rest - U(M)) Lambda_r + diag(I_q, 0): NumPy on the host, else with its written-out adjoint."""
    if array_namespace(m_levels) is np:
        return _reduce_fwd(rest_factors, m_levels, system)[0]
    return _traced_primitives()[0](rest_factors, m_levels, system)


def _reduce_value(rest_factors: tuple, m_levels: jax.Array, system: MixedModelSystem) -> jax.Array:
    """S = Lambda_r^T (A_rest - U(M)) Lambda_r + diag(I_q, 0), U(M) = sum_l V_l^T M_l V_l."""
    return _reduce_fwd(rest_factors, m_levels, system)[0]


def _reduce_fwd(rest_factors, m_levels, system):
    return _scale_reduced(rest_factors, system.rest - _schur_update(system, m_levels), system)


def _scale_reduced(rest_factors, reduced, system):
    """(S, residuals) from K = A_rest - U(M): S = Lambda_r^T K Lambda_r + diag(I_q, 0)."""
    layout = system.layout
    padded = tuple(rest_factors) + (None,) * (len(layout.rest_blocks) - len(rest_factors))
    scale = _scaling_blocks(system, padded)
    xp = array_namespace(reduced)
    rest = scale_columns(xp.swapaxes(scale_columns(reduced, scale), -1, -2), scale)
    identity = xp.concatenate([xp.ones(layout.q_rest), xp.zeros(rest.shape[-1] - layout.q_rest)])
    return rest + xp.diag(identity), (rest_factors, reduced, system)


def _reduce_bwd(residuals, cotangent):
    rest_factors, reduced, system = residuals
    contractions = functools.partial(level_contractions, system, n_blocks=len(system.layout.rest_blocks))
    factor_grads, grad_m, _ = _reduce_adjoint(rest_factors, reduced, system, cotangent, contractions)
    return factor_grads, grad_m, None  # the system is data


def _reduce_adjoint(rest_factors, reduced, system, cotangent, contractions):
    # With S = Lambda^T K Lambda + D and G the (symmetric) cotangent of S:
    #   d/dT_j  <G, S> = 2 sum_l (K Lambda G)[(l, .), (l, .)]       (one pass over a column block)
    #   d/dM_l  <G, S> = - sum_{pairs in l} <(Lambda G Lambda^T)[target], P_pair>
    # Both are far cheaper than reverse-mode through the scaling and the segment-sum.
    # ``contractions(H)`` is level_contractions over all rest blocks (pairs or dense coupling).
    layout = system.layout
    padded = tuple(rest_factors) + (None,) * (len(layout.rest_blocks) - len(rest_factors))
    scale = _scaling_blocks(system, padded)
    xp = array_namespace(cotangent)
    lam_g = xp.swapaxes(scale_columns(cotangent, scale, transpose=True), -1, -2)  # Lambda G (G symmetric)
    lam_g_lam = scale_columns(lam_g, scale, transpose=True)  # Lambda G Lambda^T
    # materialize both once: otherwise XLA re-fuses the scaling into every consumer below
    if xp is not np:
        lam_g, lam_g_lam = jax.lax.optimization_barrier((lam_g, lam_g_lam))
    size = reduced.shape[-1]
    factor_grads = []
    offset = 0
    for (ell, k), factor in zip(layout.rest_blocks[: len(rest_factors)], rest_factors):
        cols = slice(offset, offset + ell * k)
        # sum over rows b and levels l of K[b, (l, c)] (Lambda G)[b, (l, d)]: one matmul over the rows and levels at
        # once (NumPy's einsum here is a naive loop)
        left = reduced[..., cols].reshape(reduced.shape[:-2] + (size * ell, k))
        right = lam_g[..., cols].reshape(lam_g.shape[:-2] + (size * ell, k))
        factor_grads.append(2.0 * (xp.swapaxes(left, -1, -2) @ right))
        offset += ell * k
    grad_m = -contractions(lam_g_lam)
    return tuple(factor_grads), grad_m, lam_g_lam  # the last: the cotangent of A_rest (and, negated, of U(M))


def reduced_rest(theta: jax.Array, system: MixedModelSystem):
    """The rest of the augmented matrix after eliminating term 0, and term 0's log-determinant.

    Returns ``(rest, factors, logdet0)`` where
    ``rest = Lambda_r^T (A_rest - sum_l V_l^T M_l V_l) Lambda_r + diag(I_q, 0)``,
    ``M_l = T0 D_l^-1 T0^T`` and ``logdet0 = sum_l log|D_l|`` (:func:`term0_parts`); the
    Cholesky factor of ``rest`` completes the factor of the whole augmented matrix.
    Differentiable through the written-out adjoints of term 0, the Schur update and the
    dense parts (the host path chains the same adjoints by hand).
    """
    factors = theta_to_factors(theta, system.layout.ks)
    logdet0, m_levels = term0_parts(factors[0], system.a00)
    return _reduce(tuple(factors[1:]), m_levels, system), factors, logdet0


def host_reduced_rest(theta: np.ndarray, system: MixedModelSystem):
    """:func:`reduced_rest` on the host for a solution, not a criterion: ``(rest, factors, chol0, left)``, term 0's
    factors (:func:`term0_factor`) from the same factorization that reduced the rest (nothing to differentiate
    there, so term 0 is factored once, where the traced solution factors it again beside its adjoint)."""
    factors = theta_to_factors(theta, system.layout.ks)
    _, m_levels, chol0, _, left = _term0_forward(factors[0], system.a00)
    return _reduce(tuple(factors[1:]), m_levels, system), factors, chol0, left


@pytree_dataclass
@dataclass(frozen=True)
class ObjectiveParts:
    """The pieces of the profiled objective at one theta."""

    logdet_lz: jax.Array  # log |L_Z|^2
    logdet_rx: jax.Array  # log |R_X|^2
    pwrss: jax.Array  # penalized weighted residual sum of squares r^2


def dense_parts(rest: jax.Array, q: int, p: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log|L_Zr|^2, log|R_X|^2, r^2) of the reduced rest matrix S = [[S_A, s], [s^T, s_yy]].

    With S_A the leading (q + p) block: log|L_Zr|^2 = log det S_ZZ (leading q block),
    log|R_X|^2 = log det S_A - log det S_ZZ, r^2 = s_yy - s^T S_A^-1 s.

    The gradient is written out (Murray 2016, "Differentiation of the Cholesky
    decomposition"): d log det S_A / dS_A = S_A^-1 and dr^2/dS = [[w w^T, -w], [-w^T, 1]],
    w = S_A^-1 s, which costs one triangular inverse and one product instead of
    reverse-mode through the factorization.  NumPy arrays are computed on the host
    (no adjoint attached: :func:`objective_and_gradient_on_host` chains it by hand).
    """
    if array_namespace(rest) is np:
        return _dense_parts_forward(rest, q, p)[0]
    return _traced_primitives()[1](rest, q, p)


def _dense_parts_value(rest: jax.Array, q: int, p: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _dense_parts_forward(rest, q, p)[0]


def _dense_parts_forward(rest, q, p):
    chol = cholesky(rest)
    diag = array_namespace(chol).diagonal(chol, axis1=-2, axis2=-1)
    parts = (
        logdet_from_cholesky_diagonal(diag[..., :q], axis=-1),
        logdet_from_cholesky_diagonal(diag[..., q : q + p], axis=-1),
        diag[..., -1] ** 2,
    )
    return parts, chol


def _dense_parts_fwd(rest, q, p):
    parts, chol = _dense_parts_forward(rest, q, p)
    return parts, chol


def _dense_parts_bwd(q, p, chol, cotangent):
    # With S^-1 the full inverse, v = S^-1 e_y = [-w, 1] / r^2 and R the rows q.. of L^-1:
    #   S_A^-1 (padded) = S^-1 - r^2 v v^T,   d r^2 / dS = r^4 v v^T,
    #   S_ZZ^-1 = (S^-1)_ZZ - R_Z^T R_Z,
    # so the cotangent is c_rx S^-1 + (c_r2 r^4 - c_rx r^2) v v^T + (c_lz - c_rx) pad(S_ZZ^-1 - (S^-1)_ZZ + ...).
    c_lz, c_rx, c_r2 = cotangent
    xp = array_namespace(chol)
    size = chol.shape[-1]
    if xp is np and (UNROLL_MAX_SIZE < size <= HOST_SINGLE_THREAD_MAX_SIZE or chol.ndim > 2):
        # on the host L^-1 (LAPACK trtri) gives both S^-1 and the tail, without potri or trtrs
        # (which wake OpenBLAS's threads: linalg.host_product); a stack of them (a batch) as linalg.tri_inverse does
        inverse_factor = tri_inverse(chol)
        s_inv = spd_inverse_from_inverse_factor(inverse_factor)
        tail = inverse_factor[..., q:, :]
    elif size <= UNROLL_MAX_SIZE:
        s_inv = spd_inverse_from_cholesky(chol)
        tail = tri_inverse(chol)[..., q:, :]
    else:
        s_inv = spd_inverse_from_cholesky(chol)
        # rows q.. of L^-1 are columns q.. of L^-T: one solve with p + 1 right-hand sides
        unit_tail = xp.eye(size, dtype=chol.dtype)[:, q:]
        tail = solve_triangular(chol, unit_tail, lower=True, trans="T").T
    r2 = chol[..., -1, -1] ** 2
    v = s_inv[..., :, -1]
    # the host's REML criterion weighs log|L_Z|^2 and log|R_X|^2 alike (c_lz = c_rx, numbers): no R_Z term
    alike = xp is np and np.ndim(c_lz) == 0 and np.ndim(c_rx) == 0 and c_lz == c_rx
    in_z = xp.arange(size) < q
    # the cotangents are scalars, or per system of a batch (leading axes)
    c_lz, c_rx, c_r2 = (xp.asarray(c)[..., None, None] for c in (c_lz, c_rx, c_r2))
    grad = c_rx * s_inv if alike else xp.where(in_z[:, None] & in_z[None, :], c_lz, c_rx) * s_inv
    grad = grad + (c_r2 * r2[..., None, None] ** 2 - c_rx * r2[..., None, None]) * (v[..., :, None] * v[..., None, :])
    if not alike:
        tail = xp.where(in_z[None, :], tail, 0.0)  # R_Z padded with zeros
        grad = grad - (c_lz - c_rx) * (xp.swapaxes(tail, -1, -2) @ tail)
    return (grad,)



@functools.cache
def _traced_primitives():
    """The adjoint-carrying primitives as ``jax.custom_vjp`` functions, built when first traced.

    Built on first use, not at import: defining them imports JAX, which the host path never needs.
    """
    reduce_traced = jax.custom_vjp(_reduce_value)
    reduce_traced.defvjp(_reduce_fwd, _reduce_bwd)
    dense_parts_traced = jax.custom_vjp(_dense_parts_value, nondiff_argnums=(1, 2))
    dense_parts_traced.defvjp(_dense_parts_fwd, _dense_parts_bwd)
    term0_traced = jax.custom_vjp(_term0_value)
    term0_traced.defvjp(_term0_values, _term0_bwd)
    return reduce_traced, dense_parts_traced, term0_traced


def objective_parts(theta: jax.Array, system: MixedModelSystem) -> ObjectiveParts:
    """log-determinants and penalized RSS at ``theta``."""
    layout = system.layout
    rest, _, logdet0 = reduced_rest(theta, system)
    logdet_rest, logdet_rx, pwrss = dense_parts(rest, layout.q_rest, layout.p)
    return ObjectiveParts(logdet0 + logdet_rest, logdet_rx, pwrss)


def profiled_criterion(logdet_lz, logdet_rx, pwrss, n, p: int, log_weights, reml: bool, sigma_known: bool):
    """REML criterion (``reml=True``) or deviance (-2 log-likelihood) from the factorization's parts.

    With d = n - p (REML) or n (ML), sigma profiled out (sigma^2 = pwrss / d):

        log|L_Z|^2 [+ log|R_X|^2] + d (1 + log(2 pi pwrss / d)) - sum_i log w_i,

    and with sigma = 1 (known residual sds, carried by the weights):

        log|L_Z|^2 [+ log|R_X|^2] + pwrss + d log(2 pi) - sum_i log w_i

    (Bates et al. 2015, eqs. 34 and 41).  The one home of the formula: the general
    blocked path (:func:`criterion`) and the one-term specialisation
    (:func:`hierpool.algebra.one_term.objective`) both end here.  Any leading axes broadcast.
    """
    dof = n - p if reml else n
    logdet = logdet_lz + logdet_rx if reml else logdet_lz
    if sigma_known:
        return logdet + pwrss + dof * LOG_2PI - log_weights
    xp = array_namespace(pwrss)
    return logdet + dof * (1.0 + xp.log(2 * np.pi * pwrss / dof)) - log_weights


def row_count(system: MixedModelSystem, n=None):
    """The system's number of rows: ``n`` when given (a batch's per-dataset count, data), else the layout's."""
    if n is None:
        n = system.layout.n
    if n is None:
        raise ValueError("a batch of systems (Layout.n None) needs each dataset's row count n")
    return n


def criterion(parts: ObjectiveParts, system: MixedModelSystem, reml: bool, n=None) -> jax.Array:
    """REML criterion (``reml=True``) or deviance (-2 log-likelihood) from the parts (``n``: :func:`row_count`)."""
    layout = system.layout
    return profiled_criterion(parts.logdet_lz, parts.logdet_rx, parts.pwrss, row_count(system, n), layout.p,
                              system.log_weights, reml, layout.sigma_known)


def objective(theta: jax.Array, system: MixedModelSystem, reml: bool = True, n=None) -> jax.Array:
    """Profiled REML criterion or deviance at ``theta``: the function the optimizer minimizes.

    Parameters
    ----------
    theta : jax.Array
        Lower triangles of the relative covariance factors T_j, column-major,
        term by term in the order of ``system.layout.ks`` (lme4's ``getME(fm, "theta")``).
    system : MixedModelSystem
        From :func:`hierpool.algebra.system.build_system`.
    reml : bool
        REML criterion if True, else deviance.
    n : int or jax.Array, optional
        The number of rows, where the layout does not hold it (a batch of systems, in which each
        dataset's n is data: :mod:`hierpool.algebra.batched_systems`).

    Returns
    -------
    jax.Array
        Scalar, equal to lme4's ``devfun(theta)``.
    """
    return criterion(objective_parts(theta, system), system, reml, n)


@functools.cache
def _compiled() -> dict:
    return {
        "objective_jit": jax.jit(objective, static_argnames="reml"),
        "objective_and_grad": jax.jit(jax.value_and_grad(objective), static_argnames="reml"),
    }


def __getattr__(name: str):
    # objective_jit (lme4's devfun) and objective_and_grad (with its gradient) as compiled
    # programs: created on first use (PEP 562), so that importing this module imports no JAX
    if name in ("objective_jit", "objective_and_grad"):
        return _compiled()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _term0_adjoint(a00, m_levels, p_levels, c_logdet, grad_m):
    """Gradient with respect to T0 of c_logdet * log|D| + sum_l <G_l, M_l>, from A00_l, M_l = T0 D_l^-1 T0^T and
    P_l = T0 D_l^-1 (:func:`_term0_values`' residuals).

    With D_l = T0^T A_l T0 + I: d log|D_l| = 2 <A_l T0 D_l^-1, dT0> = 2 <A_l P_l, dT0> and, for symmetric G_l and
    H_l = D_l^-1 T0^T G_l T0 D_l^-1 = P_l^T G_l P_l, d <G_l, M_l> = 2 <G_l P_l - A_l T0 H_l, dT0>; as
    T0 P_l^T = M_l, the sum is 2 sum_l (c_logdet A_l + G_l - A_l M_l G_l) P_l, three products per level.
    """
    if term0_entries.applies(m_levels, a00):
        return term0_entries.adjoint(a00, m_levels, p_levels, c_logdet, grad_m)
    xp = array_namespace(m_levels)
    g = 0.5 * (grad_m + xp.swapaxes(grad_m, -1, -2))
    inner = c_logdet * a00 + g - block_product(block_product(a00, m_levels), g)
    return 2.0 * xp.sum(block_product(inner, p_levels), axis=-3)


def coupling_in_program(system: MixedModelSystem) -> jax.Array:
    """:func:`hierpool.algebra.system.dense_coupling` inside a traced program: one scatter per rest block.

    Built from the system's arrays (not stored beside them), so batches of systems vmap it too.  A batch's
    systems (``Layout.dense_only``) store every cell of the (term-0 level, rest level) grid in order
    (:mod:`hierpool.algebra.batched_systems`), so their dense coupling is a reshape of the values.
    """
    layout = system.layout
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    if layout.dense_only:  # couplings on the full (term-0 level, level) grid, level-major: a reshape, no scatter
        return grid_coupling(system)
    out = jnp.zeros((ell0, k0, sum(ell * k for ell, k in layout.rest_blocks)), system.a00.dtype)
    offset = 0
    for (ell, k), coupling in zip(layout.rest_blocks, system.couplings):
        cols = offset + coupling.level[:, None] * k + jnp.arange(k)[None, :]  # (nnz, k)
        out = out.at[coupling.level0[:, None, None], jnp.arange(k0)[None, :, None], cols[:, None, :]].add(coupling.values)
        offset += ell * k
    return out


def _product(a, b, transpose_a: bool = False):
    # the host keeps its products on the calling thread (linalg.host_product); XLA chooses its own
    if array_namespace(a) is np:
        return host_product(a, b, transpose_a=transpose_a)
    return (a.T if transpose_a else a) @ b


def _schur_update_dense(coupling: jax.Array, m_levels: jax.Array) -> jax.Array:
    """:func:`_schur_update` with the dense coupling C (ell0, k0, m) of :func:`hierpool.algebra.system.dense_coupling`.

    sum_l C_l^T M_l C_l = (M C)^T C over all levels at once: one matrix product in place of a
    gather and a segment-sum per coupling pair.  Symmetrized: the two triangles round differently.
    Leading axes of C and of M (..., ell0, k0, k0) broadcast (a batch of systems on the host).
    """
    xp = array_namespace(coupling, m_levels)
    ell0, k0, m = coupling.shape[-3:]
    if k0 == 1:
        weighted = coupling[..., :, 0, :] * m_levels[..., :, 0, 0][..., None]
    else:
        weighted = xp.matmul(m_levels, coupling)
        weighted = weighted.reshape(weighted.shape[:-3] + (ell0 * k0, m))
    flat = coupling.reshape(coupling.shape[:-3] + (ell0 * k0, m))
    if weighted.ndim > 2:
        update = xp.swapaxes(weighted, -1, -2) @ flat
        return 0.5 * (update + xp.swapaxes(update, -1, -2))
    update = _product(weighted, flat, transpose_a=True)
    return 0.5 * (update + update.T)


def _coupling_products(coupling: jax.Array, matrix: jax.Array) -> jax.Array:
    """C_l H per term-0 level (..., ell0, k0, m), the dense coupling C times a symmetric H over the rest columns."""
    ell0, k0, m = coupling.shape[-3:]
    flat = coupling.reshape(coupling.shape[:-3] + (ell0 * k0, m))
    product = flat @ matrix if flat.ndim > 2 or matrix.ndim > 2 else _product(flat, matrix)
    return product.reshape(product.shape[:-2] + (ell0, k0, m))


def _level_contractions_dense(coupling: jax.Array, matrix: jax.Array, ch: jax.Array | None = None) -> jax.Array:
    """:func:`level_contractions` over all rest blocks with the dense coupling: C_l H C_l^T per level (leading axes
    of C and H broadcast, as :func:`_schur_update_dense`'s); ``ch`` the products C_l H where the caller has them
    (:func:`_coupling_products`)."""
    xp = array_namespace(coupling, matrix)
    k0 = coupling.shape[-2]
    ch = _coupling_products(coupling, matrix) if ch is None else ch
    if k0 == 1:
        return xp.einsum("...lm,...lm->...l", ch[..., :, 0, :], coupling[..., :, 0, :])[..., None, None]
    # a stacked matmul: NumPy's einsum of two operands with a batch axis is a naive loop (benchmarks/RESULTS.md,
    # "The several-term linear class, eighteenth session")
    return ch @ xp.swapaxes(coupling, -1, -2)


def _derivative_along(along: MixedModelSystem, m_levels, grad_m, rest_cotangent, ch):
    """The criterion's derivative along a change ``along`` of the system's sums (its A00, couplings and rest; the
    dense coupling C), given the adjoint's pieces at theta: M_l (``m_levels``), the cotangents of M_l (``grad_m``)
    and of A_rest (``rest_cotangent``, H = Lambda G Lambda^T), and the products C_l H the cotangent of M_l was
    contracted from (``ch``, :func:`_coupling_products`).  With K = A_rest - sum_l C_l^T M_l C_l and
    M_l = T0 D_l^-1 T0^T, D_l = T0^T A00_l T0 + I (so d log|D_l| / dA00_l = M_l, dM_l = -M_l dA00_l M_l):

        d = <H, dA_rest> - 2 sum_l <M_l C_l H, dC_l> + sum_l <M_l - M_l (dcrit/dM_l) M_l, dA00_l>.

    Leading axes broadcast, as the criterion's."""
    along_coupling = grid_coupling(along)
    a00_cotangent = m_levels - m_levels @ grad_m @ m_levels
    return (np.sum(rest_cotangent * along.rest, axis=(-2, -1))
            - 2.0 * np.sum((m_levels @ ch) * along_coupling, axis=(-3, -2, -1))
            + np.sum(a00_cotangent * along.a00, axis=(-3, -2, -1)))


def host_objective_and_gradient(system: MixedModelSystem, reml: bool = True, dense: bool | None = None,
                                logdet_only: bool = False, n=None, along: MixedModelSystem | None = None):
    """theta -> (:func:`objective`, its gradient) in NumPy, with no compilation.

    The same forward functions as the compiled objective, and the same written-out
    adjoints (:func:`dense_parts`' and the Schur update's), chained by hand; term 0's
    adjoint is :func:`_term0_adjoint`.  For small models, where compiling the
    objective costs seconds and evaluating it microseconds.  ``system`` holds NumPy
    arrays (:func:`hierpool.algebra.system.on_host`).

    What does not depend on theta is prepared once here: when the dense coupling is the
    cheaper form (:func:`hierpool.algebra.system.dense_coupling_pays`; ``dense`` forces the
    choice), the Schur update and its adjoint are BLAS products with it, otherwise the pair
    products' gathers and segment-sums.  ``logdet_only``: the function and gradient of log |L_Z|^2
    alone (a GLMM's Laplace log-determinant at fixed weights).

    A batch of ``Layout.dense_only`` systems (:mod:`hierpool.algebra.batched_systems`) whose arrays carry leading
    axes, with ``n`` their row counts (:func:`row_count`), is evaluated at once: thetas (..., n_theta) whose
    leading axes broadcast against the systems' give values (...) and gradients (..., n_theta)
    (``hp.fit_batch``'s several-term path on the host).  Where the systems broadcast over the thetas' last leading
    axis (points: a trial and its forward differences, :func:`hierpool.algebra.batched_systems.shared_grid`'s
    ``points``), term 0's values and the Schur update are computed once for the points that share term 0's theta
    (the probes in the other terms' parameters), and taken for the others.

    ``along``: a change of the systems' sums (A00, the couplings' values and the rest; a batch of
    ``Layout.dense_only`` systems, the same shapes), and each call returns the criterion's derivative along it
    too, from the adjoint's pieces (:func:`_derivative_along`): (value, gradient, derivative).  An AR(1) batch's
    derivative in u (:mod:`hierpool.algebra.search.ar1_systems`), where the systems are combinations of sums in u.
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    n = row_count(system, n)
    dof = n - p if reml else n
    c_rx = 1.0 if reml else 0.0
    if dense is None:
        dense = dense_coupling_pays(system)
    if along is not None and not (dense and layout.dense_only and along.layout.dense_only):
        raise ValueError("a derivative along a change of the systems takes a batch's dense systems")
    coupling = dense_coupling(system) if dense else None
    if coupling is not None:
        contractions = functools.partial(_level_contractions_dense, coupling)
    else:
        contractions = functools.partial(level_contractions, system, n_blocks=len(layout.rest_blocks))

    lead = system.a00.ndim - 3  # the systems' leading axes (none for one system)
    # points (..., Q, n_theta) of systems that broadcast over Q: those with term 0's theta in common (a forward
    # difference's probes in another term's) share term 0's values and the Schur update, computed once for them
    shared_points = (lead >= 2 and system.a00.shape[lead - 1] == 1
                     and (coupling is None or coupling.shape[lead - 1] == 1))

    def term0_and_update(t0):
        (logdet0, m_levels), (_, _, p_levels) = _term0_values(t0, system.a00)
        update = _schur_update(system, m_levels) if coupling is None else _schur_update_dense(coupling, m_levels)
        return (logdet0, m_levels, p_levels), update

    def term0_and_update_per_distinct_point(t0):  # t0: term 0's factors (..., Q, k0, k0), evaluate's thetas'
        if not shared_points or t0.shape[-3] == 1:
            return term0_and_update(t0)
        first, column = distinct_columns(t0.reshape((-1,) + t0.shape[-3:]))  # the points' axis second
        if len(first) == t0.shape[-3]:
            return term0_and_update(t0)
        (logdet0, m_levels, p_levels), update = term0_and_update(t0[..., first, :, :])
        return ((logdet0[..., column], m_levels[..., column, :, :, :], p_levels[..., column, :, :, :]),
                update[..., column, :, :])

    def evaluate(theta):
        theta = np.asarray(theta, dtype=float)
        if theta.ndim - 1 != lead:  # thetas broadcast against the systems from the right: a misaligned axis would
            raise ValueError(f"thetas with {theta.ndim - 1} leading axes for systems with {lead}")  # mix datasets
        factors = theta_to_factors(theta, layout.ks)
        (logdet0, m_levels, p_levels), update = term0_and_update_per_distinct_point(factors[0])
        rest, (_, reduced, _) = _scale_reduced(tuple(factors[1:]), system.rest - update, system)
        (logdet_rest, logdet_rx, pwrss), chol = _dense_parts_forward(rest, q, p)
        parts = ObjectiveParts(logdet0 + logdet_rest, logdet_rx, pwrss)
        value = parts.logdet_lz if logdet_only else criterion(parts, system, reml, n)
        c_r2 = 1.0 if layout.sigma_known else dof / pwrss
        (grad_rest,) = _dense_parts_bwd(q, p, chol, (1.0, 0.0, 0.0) if logdet_only else (1.0, c_rx, c_r2))
        kept = {}

        def contracted(matrix):  # with ``along``, the products C_l H kept for its derivative
            kept["ch"] = _coupling_products(coupling, matrix)
            return _level_contractions_dense(coupling, matrix, kept["ch"])

        rest_factor_grads, grad_m, rest_cotangent = _reduce_adjoint(
            tuple(factors[1:]), reduced, system, grad_rest, contractions if along is None else contracted)
        grad_t0 = _term0_adjoint(system.a00, m_levels, p_levels, 1.0, grad_m)
        gradient = factor_gradients_to_theta([grad_t0, *rest_factor_grads])
        value = float(value) if np.ndim(value) == 0 else value
        if along is None:
            return value, gradient
        return value, gradient, _derivative_along(along, m_levels, grad_m, rest_cotangent, kept["ch"])

    return evaluate


def objective_and_gradient_on_host(theta: np.ndarray, system: MixedModelSystem, reml: bool = True):
    """:func:`objective` and its gradient in NumPy at one theta (:func:`host_objective_and_gradient`)."""
    return host_objective_and_gradient(system, reml)(theta)
