"""Henderson's mixed-model equations at a given theta: BLUEs, BLUPs and their covariances.

At fixed theta the mixed-model equations (Henderson 1950; Bates et al. 2015, eq. 9)

    [Lambda^T Z^T W Z Lambda + I   Lambda^T Z^T W X] [u]   [Lambda^T Z^T W y]
    [X^T W Z Lambda                X^T W X         ] [beta] = [X^T W y        ]

are solved by back-substitution through the same blocked Cholesky factor the
objective uses; b = Lambda u.  Covariances (Henderson 1975):

* ``cond_var`` is lme4's ``condVar``: Var(b | y) with beta at its estimate,
  sigma^2 T (L_Z L_Z^T)^-1 T^T, per level (diagonal blocks only);
* :func:`prediction_covariance` gives the pieces of the joint covariance of
  (beta-hat - beta, b-hat - b), sigma^2 times the inverse of the whole
  coefficient matrix, used for prediction intervals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .criterion import host_reduced_rest, level_contractions, reduced_rest, row_count, term0_factor
from .jax_runtime import jax, jnp, pytree_dataclass
from .linalg import (
    array_namespace,
    block_product,
    cholesky,
    dataset_cells,
    logdet_from_cholesky_diagonal,
    scale_columns,
    segment_sum,
    solve_triangular,
    spd_inverse_from_cholesky,
    tri_inverse,
)
from .system import MixedModelSystem, grid_coupling, shift_beta


@pytree_dataclass
@dataclass(frozen=True)
class Solution:
    """Everything determined by theta: estimates, predictions and their variances.

    Attributes
    ----------
    theta : jax.Array
    factors : tuple of jax.Array
        T_j, the relative covariance factors.
    beta : jax.Array, shape (p,)
    u : tuple of jax.Array
        Spherical random effects per term, shape (ell_j, k_j).
    b : tuple of jax.Array
        BLUPs per term, shape (ell_j, k_j): b_l = T_j u_l.
    cond_var : tuple of jax.Array
        Var(b_l | y) per term and level, shape (ell_j, k_j, k_j) (lme4's condVar).
    vcov_beta : jax.Array, shape (p, p)
        sigma^2 (R_X^T R_X)^-1 (lme4's ``vcov``).
    sigma : jax.Array
        Residual sd (1 when residual sds are known).
    pwrss, logdet_lz, logdet_rx : jax.Array
        Pieces of the objective.
    """

    theta: jax.Array
    factors: tuple
    beta: jax.Array
    u: tuple
    b: tuple
    cond_var: tuple
    vcov_beta: jax.Array
    sigma: jax.Array
    pwrss: jax.Array
    logdet_lz: jax.Array
    logdet_rx: jax.Array


def _blocked_factor(theta, system: MixedModelSystem, rest_prior=None, leading: int | None = None):
    """The blocked Cholesky factor at ``theta``: (factors T_j, L0 per term-0 level, L0^-1 T0^T, the rest's factor).

    ``rest_prior`` (pseudo-observations of a prior on beta) is added to the reduced rest before it is factored.
    ``leading``: only the reduced rest's leading block of that size is factored (the y column left out, where the
    response is immaterial and could make it singular).
    """
    if array_namespace(theta) is np:  # term 0 factored once
        rest, factors, chol0, left = host_reduced_rest(theta, system)
    else:
        rest, factors, _ = reduced_rest(theta, system)
        chol0, left = term0_factor(factors[0], system.a00)  # not differentiated here: recomputed, ell0 k0^3
    if rest_prior is not None:
        rest = rest + rest_prior
    if leading is not None:
        rest = rest[..., :leading, :leading]
    return factors, chol0, left, cholesky(rest)


def _couplings(system: MixedModelSystem, factors, left) -> list[jax.Array]:
    """C_r = L0^-1 T0^T V_r T_r for every rest block (T_r = I for X and y)."""
    rest_factors = list(factors[1:]) + [None] * (len(system.layout.rest_blocks) - len(factors) + 1)
    out = []
    for coupling, factor in zip(system.couplings, rest_factors):
        block = block_product(left.take(coupling.level0, axis=-3), coupling.values)  # (take: a faster gather)
        out.append(block if factor is None else block_product(block, factor[..., None, :, :]))
    return out


def _grid_couplings(system: MixedModelSystem, factors, left) -> jax.Array:
    """:func:`_couplings` of a ``Layout.dense_only`` system (a batch's: every cell of the grid stored) as one dense
    (..., ell0, k0, m) array over the rest's columns, y last: L0^-1 T0^T per level times the dense coupling
    (:func:`hierpool.algebra.system.grid_coupling`, a reshape), its columns scaled by the rest terms' factors.  A
    product per level and one per term, where the cells' form takes a tiny one per cell, and the scatter back to
    the dense form (:func:`prediction_covariance`) is not needed."""
    layout = system.layout
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    product = block_product(left, grid_coupling(system))  # (..., ell0, k0, m)
    lead, m = product.shape[:-3], product.shape[-1]
    rest_factors = list(factors[1:]) + [None] * (len(layout.rest_blocks) - len(factors) + 1)
    blocks = [(ell, k, factor) for (ell, k), factor in zip(layout.rest_blocks, rest_factors)]
    # the levels and their coefficients as one axis of rows, so that each dataset's factors broadcast over them
    return scale_columns(product.reshape(lead + (ell0 * k0, m)), blocks).reshape(lead + (ell0, k0, m))


def diagonal_blocks(matrix: jax.Array, offset: int, ell: int, k: int) -> jax.Array:
    """The ell diagonal k x k blocks of ``matrix`` starting at row/column ``offset``."""
    idx = offset + np.arange(ell)[:, None] * k + np.arange(k)[None, :]
    return matrix[..., idx[:, :, None], idx[:, None, :]]


def _scaled_inverse(inverse: jax.Array, system: MixedModelSystem, factors, n_blocks: int) -> jax.Array:
    """Lambda S^-1 Lambda^T over the first ``n_blocks`` rest blocks (X unscaled)."""
    blocks = system.layout.rest_blocks[:n_blocks]
    rest_factors = list(factors[1:]) + [None] * n_blocks
    scale = [(ell, k, f) for (ell, k), f in zip(blocks, rest_factors)]
    swap = array_namespace(inverse).swapaxes
    return scale_columns(swap(scale_columns(inverse, scale, transpose=True), -1, -2), scale, transpose=True)


def _term0_inverse_blocks(chol0_inv, left, correction):
    """Diagonal blocks of the inverse for term 0: L0^-T (I + left Q left^T) L0^-1."""
    xp = array_namespace(chol0_inv)
    middle = xp.eye(chol0_inv.shape[-1]) + left @ correction @ xp.swapaxes(left, -1, -2)
    return xp.swapaxes(chol0_inv, -1, -2) @ middle @ chol0_inv


def _back_substitute(system: MixedModelSystem, factors, chol0, left, chol_rest, noise=None):
    """Solve L^T x = c (+ noise) through the blocked factor: the mode, or an exact Gaussian draw.

    With L the blocked Cholesky factor of the mixed-model matrix C (term 0's
    block-diagonal factor L0, the couplings, the dense factor of the rest) and c
    the y-row of the augmented factor, x = L^-T c is the solution of the
    mixed-model equations.  With ``noise = (e0, e_rest)`` added to c, where e ~
    N(0, s^2 I), x = L^-T (c + e) ~ N(solution, s^2 C^-1): the conditional
    posterior of (u, beta) when s = sigma (Rue 2001, "Fast sampling of Gaussian
    Markov random fields").

    Returns (u, beta): u per term with shape (ell_j, k_j).  A batch of systems on the host (leading axes, their
    couplings' level indices shared: :func:`solve`) gives leading axes to both.
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    size = q + p
    rhs_rest = chol_rest[..., size, :size]
    if noise is not None:
        rhs_rest = rhs_rest + noise[1]
    xp = array_namespace(chol_rest)
    x_rest = solve_triangular(chol_rest[..., :size, :size], rhs_rest, lower=True, trans="T")
    lead = x_rest.shape[:-1]
    chol0_inv = tri_inverse(chol0)
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    if layout.dense_only:  # rhs0 = C_y - C x_rest, C over every rest column (_grid_couplings)
        grid = _grid_couplings(system, factors, left)
        rows = grid.reshape(lead + (ell0 * k0, grid.shape[-1]))  # one product per dataset, not per level
        rhs0 = grid[..., size] - (rows[..., :size] @ x_rest[..., :, None]).reshape(lead + (ell0, k0))
    else:
        couplings = _couplings(system, factors, left)
        rhs0 = segment_sum(couplings[-1][..., 0], system.couplings[-1].level0, ell0, axis=-2)
        offset = 0
        for (ell, k), coupling, block in zip(layout.rest_blocks[:-1], system.couplings[:-1], couplings[:-1]):
            x_block = x_rest[..., offset : offset + ell * k].reshape(lead + (ell, k))
            # (block_product: NumPy's einsum and matmul loop once per cell)
            contribution = block_product(block, x_block[..., coupling.level, :, None])[..., 0]
            rhs0 = rhs0 - segment_sum(contribution, coupling.level0, ell0, axis=-2)
            offset += ell * k
    if noise is not None:
        rhs0 = rhs0 + noise[0]
    u = [block_product(xp.swapaxes(chol0_inv, -1, -2), rhs0[..., None])[..., 0]]
    offset = 0
    for ell, k in zip(layout.n_levels[1:], layout.ks[1:]):
        u.append(x_rest[..., offset : offset + ell * k].reshape(lead + (ell, k)))
        offset += ell * k
    return u, x_rest[..., q:size]


def conditional_draw(
    theta: jax.Array, system: MixedModelSystem, sigma: jax.Array, noise: jax.Array, rest_prior: jax.Array | None = None
) -> tuple[jax.Array, tuple]:
    """One exact draw of (beta, b) from their Gaussian conditional given theta and sigma.

    Parameters
    ----------
    theta, system
        As in :func:`solve`.
    sigma : jax.Array
        Residual sd (1 with known residual sds).
    noise : jax.Array, shape (ell_0 k_0 + q_rest + p,)
        Standard normal variates (the caller draws them, so that a batch of draws
        needs one random-number call).
    rest_prior : jax.Array, optional
        Added to the reduced rest matrix before it is factored: a Gaussian prior
        on beta written as pseudo-observations about beta - beta_shift (see
        :func:`hierpool.algebra.marginal.beta_prior_block`).  Without it the
        prior on beta is flat.

    Returns
    -------
    (beta, b)
        beta (p,) and b per term (ell_j, k_j), distributed as
        N(Henderson solution, sigma^2 C^-1) with C the mixed-model matrix.
    """
    layout = system.layout
    factors, chol0, left, chol_rest = _blocked_factor(theta, system, rest_prior)
    size0 = layout.n_levels[0] * layout.ks[0]
    scaled = sigma * noise
    u, beta = _back_substitute(
        system, factors, chol0, left, chol_rest, (scaled[:size0].reshape(layout.n_levels[0], layout.ks[0]), scaled[size0:])
    )
    return shift_beta(beta, system), tuple(uj @ t.T for uj, t in zip(u, factors))


def noise_size(layout) -> int:
    """Number of standard normal variates one :func:`conditional_draw` takes."""
    return layout.n_levels[0] * layout.ks[0] + layout.q_rest + layout.p


def _logdet_lz(chol0, chol_rest, q: int):
    """log |L_Z|^2 from term 0's blocks and the rest factor's first q diagonal entries."""
    xp = array_namespace(chol0, chol_rest)
    return (logdet_from_cholesky_diagonal(xp.diagonal(chol0, axis1=-2, axis2=-1), axis=(-2, -1))
            + logdet_from_cholesky_diagonal(xp.diagonal(chol_rest, axis1=-2, axis2=-1)[..., :q], axis=-1))


def effects(factors, u) -> tuple:
    """b_j = u_j T_j^T per term (u_j (..., ell_j, k_j), T_j (..., k_j, k_j): leading axes, a batch's datasets)."""
    return tuple(uj @ array_namespace(t).swapaxes(t, -1, -2) for uj, t in zip(u, factors))


def point_estimates(theta: jax.Array, system: MixedModelSystem) -> tuple:
    """(beta, u, b, log |L_Z|^2) at ``theta``: :func:`solve`'s estimates without their variances.

    One blocked factorization and its back-substitution, the step of a GLMM's PIRLS
    (:mod:`hierpool.algebra.laplace`), where the variances are needed only at the end.
    """
    factors, chol0, left, chol_rest = _blocked_factor(theta, system)
    u, beta = _back_substitute(system, factors, chol0, left, chol_rest)
    return shift_beta(beta, system), tuple(u), effects(factors, u), _logdet_lz(chol0, chol_rest, system.layout.q_rest)


def fixed_effects_information(theta: jax.Array, system: MixedModelSystem) -> jax.Array:
    """R_X^T R_X = X^T W X - X^T W Z Lambda (Lambda^T Z^T W Z Lambda + I)^-1 Lambda^T Z^T W X at ``theta``.

    The Schur complement of the random effects' block in the mixed-model matrix (X^T V^-1 X with sigma^2 = 1): the
    precision of beta-hat in units of sigma^2 (:func:`solve`'s ``vcov_beta`` is sigma^2 times its inverse), and the
    curvature in beta of the penalized residual sum of squares minimized over u (Bates et al. 2015, eq. 15-18).
    From the blocked factor's fixed-effect block (lower: R_X^T), the y column left out (the response does not enter);
    a batch of systems on the host gives a leading axis.
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    r_x_t = _blocked_factor(theta, system, leading=q + p)[3][..., q:, q:]
    return r_x_t @ array_namespace(r_x_t).swapaxes(r_x_t, -1, -2)


def solve(theta: jax.Array, system: MixedModelSystem, reml: bool = True, n=None) -> Solution:
    """Solve the mixed-model equations at ``theta``.

    Parameters
    ----------
    theta : jax.Array
        As in :func:`hierpool.algebra.criterion.objective`.
    system : MixedModelSystem
    reml : bool
        Only changes sigma: r^2 / (n - p) for REML, r^2 / n for ML (lme4).
    n : int or jax.Array, optional
        The number of rows where the layout does not hold it (a batch of systems:
        :func:`hierpool.algebra.criterion.row_count`).  On the host a batch is solved at once: thetas
        (datasets, n_theta) and a system with a leading datasets axis whose couplings share one level grid
        (:func:`hierpool.algebra.batched_systems.shared_grid`) give a Solution with that leading axis.

    Returns
    -------
    Solution
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    size = q + p
    xp = array_namespace(theta)
    factors, chol0, left, chol_rest = _blocked_factor(theta, system)
    chol0_inv = tri_inverse(chol0)
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    u, beta = _back_substitute(system, factors, chol0, left, chol_rest)
    swap = functools.partial(xp.swapaxes, axis1=-1, axis2=-2)
    b = [uj @ swap(t) for uj, t in zip(u, factors)]

    pwrss = chol_rest[..., size, size] ** 2
    if layout.sigma_known:
        sigma = xp.ones_like(pwrss)
    else:
        n = row_count(system, n)
        sigma = xp.sqrt(pwrss / (n - p if reml else n))
    variance = (sigma**2)[..., None, None]

    # lme4's condVar: Var(u | y) = sigma^2 (L_Z L_Z^T)^-1, diagonal blocks.
    if q:
        s_zz_inv = spd_inverse_from_cholesky(chol_rest[..., :q, :q])
        correction = level_contractions(
            system, _scaled_inverse(s_zz_inv, system, factors, layout.n_random_rest), layout.n_random_rest
        )
    else:
        s_zz_inv = xp.zeros((0, 0))
        correction = xp.zeros((ell0, k0, k0))
    var_u = [_term0_inverse_blocks(chol0_inv, left, correction)]
    offset = 0
    for ell, k in zip(layout.n_levels[1:], layout.ks[1:]):
        var_u.append(diagonal_blocks(s_zz_inv, offset, ell, k))
        offset += ell * k
    cond_var = [variance[..., None] * (t[..., None, :, :] @ v @ swap(t)[..., None, :, :])
                for v, t in zip(var_u, factors)]

    if chol_rest.ndim > 2:  # a batch of systems on the host
        r_x_inv = tri_inverse(chol_rest[..., q:size, q:size])
    else:
        r_x_inv = solve_triangular(chol_rest[q:size, q:size], xp.eye(p), lower=True)
    vcov_beta = variance * (swap(r_x_inv) @ r_x_inv)
    diag_rest = xp.diagonal(chol_rest, axis1=-2, axis2=-1)
    logdet_lz = _logdet_lz(chol0, chol_rest, q)
    logdet_rx = logdet_from_cholesky_diagonal(diag_rest[..., q:size], axis=-1)
    return Solution(
        theta=theta,
        factors=tuple(factors),
        beta=shift_beta(beta, system),
        u=tuple(u),
        b=tuple(b),
        cond_var=tuple(cond_var),
        vcov_beta=vcov_beta,
        sigma=sigma,
        pwrss=pwrss,
        logdet_lz=logdet_lz,
        logdet_rx=logdet_rx,
    )




@pytree_dataclass
@dataclass(frozen=True)
class PredictionCovariance:
    """Blocks of sigma^-2 Cov([u-hat - u; beta-hat - beta]), the inverse of the MME matrix.

    Attributes
    ----------
    term0 : (ell0, k0, k0)  diagonal blocks for term 0's levels
    cross : (ell0, k0, q + p)  covariance of term 0's levels with the rest (Z_1.., X)
    rest : (q + p, q + p)  dense block over the rest
    """

    term0: jax.Array
    cross: jax.Array
    rest: jax.Array


def prediction_covariance(theta: jax.Array, system: MixedModelSystem) -> PredictionCovariance:
    """Inverse of the mixed-model coefficient matrix in the blocks predictions need.

    Memory ell0 * k0 * (q + p) for the cross block; computed only when
    prediction intervals are asked for.  On the host a batch of systems (leading axes, their couplings' level
    indices shared: :func:`hierpool.algebra.batched_systems.shared_grid`) gives blocks with those leading axes
    (a GLMM batch's leverages: :mod:`hierpool.algebra.laplace_batch`).
    """
    layout = system.layout
    q, p = layout.q_rest, layout.p
    size = q + p
    xp = array_namespace(theta)
    factors, chol0, left, chol_rest = _blocked_factor(theta, system)
    lead = chol0.shape[:-3]
    s_a_inv = spd_inverse_from_cholesky(chol_rest[..., :size, :size])
    chol0_inv = tri_inverse(chol0)
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    if layout.dense_only:  # the couplings as one dense array already (_grid_couplings)
        dense = xp.swapaxes(_grid_couplings(system, factors, left)[..., :size], -2, -1)
        blocks = []
    else:
        couplings = _couplings(system, factors, left)
        dense = xp.zeros(lead + (ell0, size, k0))
        blocks = zip(layout.rest_blocks[:-1], system.couplings[:-1], couplings[:-1])
    offset = 0
    for (ell, k), coupling, block in blocks:
        cols = offset + coupling.level[:, None] * k + xp.arange(k)[None, :]
        at = (*(slice(None),) * len(lead), coupling.level0[:, None], cols)  # a batch's leading axes kept
        if xp is np:
            np.add.at(dense, at, np.swapaxes(block, -2, -1))
        else:
            dense = dense.at[at].add(jnp.swapaxes(block, -2, -1))
        offset += ell * k
    # C S_A^-1 per level, as one matrix product: NumPy's einsum here is a naive loop, not BLAS (benchmarks/RESULTS.md,
    # "GLMMs: one EM step before the gradient search")
    projected = (xp.swapaxes(dense, -2, -1).reshape(lead + (ell0 * k0, size)) @ s_a_inv).reshape(
        lead + (ell0, k0, size))
    term0 = _term0_inverse_blocks(chol0_inv, xp.eye(k0)[None], projected @ dense)
    cross = -(xp.swapaxes(chol0_inv, -2, -1) @ projected)
    return PredictionCovariance(term0=term0, cross=cross, rest=s_a_inv)


def row_quadratic_forms(covariance: PredictionCovariance, v0: jax.Array, level0: jax.Array, v_rest: jax.Array,
                        index_rest: jax.Array, group=None) -> jax.Array:
    """v_i^T C^-1 v_i for each row i, v_i a sparse coefficient row of the mixed-model matrix C.

    Row i has ``v0[i]`` (k0) at term 0's level ``level0[i]`` and ``v_rest[i]`` at the rest columns
    ``index_rest[i]`` (its levels of the other terms and X's columns), so the form reads only the
    blocks :func:`prediction_covariance` keeps: term 0's diagonal block of its level, that level's
    cross block at the row's rest columns, and the rest block at them.  With v the rows of Z Lambda
    (and X) this is each row's conditional (prediction) variance over sigma^2, and on a GLMM's
    working system its leverage in the Laplace approximation's log-determinant.  ``group`` (on the host): each
    row's dataset, the leading axis of a batch's ``covariance``.
    """
    xp = array_namespace(v0, v_rest)
    if group is None:
        rest_rows = covariance.rest[index_rest[:, :, None], index_rest[:, None, :]]
        cross_rows = xp.swapaxes(covariance.cross[level0[:, None], :, index_rest], 1, 2)  # (n, k0, m)
        own_rows = covariance.term0[level0]
    else:  # a row's own dataset's blocks, each read as one take of the flattened blocks (as linalg.dataset_cells;
        # the flat positions in the platform's index type: dataset x size^2 passes int32's range on large batches)
        group, level0, index_rest = (np.asarray(a, dtype=np.intp) for a in (group, level0, index_rest))
        size, (ell0, k0) = covariance.rest.shape[-1], covariance.term0.shape[1:3]
        rest_at = (group * size)[:, None, None] + index_rest[:, :, None]
        rest_rows = covariance.rest.reshape(-1).take(rest_at * size + index_rest[:, None, :])
        cells = ((group * ell0 + level0)[:, None] * k0 + np.arange(k0)[None, :])  # (n, k0)
        cross_rows = covariance.cross.reshape(-1).take(cells[:, :, None] * size + index_rest[:, None, :])
        own_rows = dataset_cells(covariance.term0, group, level0)
    return (_row_forms(v0, own_rows, v0) + 2.0 * _row_forms(v0, cross_rows, v_rest)
            + _row_forms(v_rest, rest_rows, v_rest))


def _row_forms(left, matrices, right):
    """left_i' M_i right_i per row.  As two products where the blocks are wider than 1 (NumPy's three-operand einsum
    is a naive loop there)."""
    xp = array_namespace(left, matrices, right)
    if left.shape[-1] == 1 or right.shape[-1] == 1:
        return xp.einsum("ni,nij,nj->n", left, matrices, right)
    return xp.einsum("nj,nj->n", xp.einsum("ni,nij->nj", left, matrices), right)


@functools.cache
def _compiled() -> dict:
    return {
        "solve_jit": jax.jit(solve, static_argnames="reml"),
        "prediction_covariance_jit": jax.jit(prediction_covariance),
    }


def __getattr__(name: str):
    # solve_jit and prediction_covariance_jit: compiled programs created on first use (PEP 562),
    # so that importing this module imports no JAX
    if name in ("solve_jit", "prediction_covariance_jit"):
        return _compiled()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_numpy(tree):
    """Bring a pytree of JAX arrays to the host as numpy arrays."""
    return jax.tree_util.tree_map(np.asarray, tree)
