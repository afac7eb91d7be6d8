"""The latent vector of a model with several random terms as one sparse Gaussian: blocks stacked.

x = (x_1, ..., x_T), one block per term: a spatial term's latent vector (:class:`hierpool.algebra.icar.CarPrior`)
or a ``(lhs | g)`` term's effects (:class:`GroupPrior`).  The blocks are independent a priori, so the precision is
block-diagonal, P = blockdiag(P_t), with log det_c P = sum_t log det_c P_t, and the constraints are too,
C = blockdiag(C_t).  Each data row touches one column of each block it has effects in: eta_i = ... +
sum_a v_ia x[c_ia] (:class:`RowStructure`), so Z'WZ has a fixed sparse pattern, and every sparse matrix the fits
factor is filled into a pattern found once (:class:`hierpool.closedform.spatial.SpatialLaplace`).

References: Rue & Held (2005), Gaussian Markov random fields, ch. 2; Bates et al. (2015), J. Stat. Softw. 67(1),
sec. 2 (the random-effects model matrix of several terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse


class GroupPrior:
    """The effects of a ``(lhs | g)`` term: ell levels, k coefficients each, u_l ~ N(0, Sigma) independently,
    stored level-major (x[l k + j] the j-th coefficient of level l, as :meth:`RandomEffectTerm.dense_columns`).

    Sigma = L L' with L lower triangular: the precision is blockdiag(Sigma^-1, ..., Sigma^-1) and
    log det P = -2 ell sum_j log |L_jj|.  No constraints.
    """

    def __init__(self, n_levels: int, k: int):
        self.n_levels, self.k = n_levels, k
        self.n_latent = n_levels * k
        level = np.repeat(np.arange(n_levels), k * k)
        within_row = np.tile(np.repeat(np.arange(k), k), n_levels)
        within_col = np.tile(np.tile(np.arange(k), k), n_levels)
        self.rows, self.cols = level * k + within_row, level * k + within_col

    @property
    def latent_constraints(self) -> scipy.sparse.csc_matrix:
        return scipy.sparse.csc_matrix((self.n_latent, 0))

    def precision_entries(self, factor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, values) of the precision for Sigma = factor factor' (the same rows and columns at
        every factor)."""
        inverse_factor = np.linalg.inv(factor)
        inverse = inverse_factor.T @ inverse_factor
        return self.rows, self.cols, np.tile(inverse.ravel(), self.n_levels)

    def log_det(self, factor: np.ndarray) -> float:
        return -2.0 * self.n_levels * float(np.sum(np.log(np.abs(np.diag(factor)))))

    def precision_root_draw(self, factor: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """A draw of N(0, precision) from ``normal`` (:meth:`root_size` standard normals): L^-T e per level
        (Sigma^-1 = L^-T L^-1)."""
        e = normal[: self.n_latent].reshape(self.n_levels, self.k)
        return np.linalg.solve(factor.T, e.T).T.ravel()

    def root_size(self) -> int:
        return self.n_latent


@dataclass(frozen=True)
class RowStructure:
    """The random part of each row's linear predictor: sum_a values[i, a] x[columns[i, a]] (K slots per row, one per
    term column: a spatial term's area, a ``(lhs | g)`` term's level times each coefficient)."""

    columns: np.ndarray  # (n, K) int64
    values: np.ndarray  # (n, K)
    n_latent: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Z x."""
        return np.sum(self.values * x[self.columns], axis=1)

    def transpose_apply(self, r: np.ndarray) -> np.ndarray:
        """Z' r."""
        return np.bincount(self.columns.ravel(), weights=(self.values * r[:, None]).ravel(),
                           minlength=self.n_latent)

    def dense(self) -> np.ndarray:
        """Z as a dense (n, m) matrix: for tests and teaching sizes only."""
        out = np.zeros((self.columns.shape[0], self.n_latent))
        np.add.at(out, (np.repeat(np.arange(self.columns.shape[0]), self.columns.shape[1]), self.columns.ravel()),
                  self.values.ravel())
        return out


def stack_rows(parts: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], n_latent: int) -> RowStructure:
    """One :class:`RowStructure` from each block's (columns (n, K_t), values (n, K_t)) within its block, the blocks
    starting at ``offsets`` of x."""
    columns = np.concatenate([c + offset for (c, _), offset in zip(parts, offsets)], axis=1)
    values = np.concatenate([v for _, v in parts], axis=1)
    return RowStructure(columns=columns.astype(np.int64), values=values.astype(float), n_latent=n_latent)


def stack_constraints(blocks: list[scipy.sparse.spmatrix]) -> scipy.sparse.csc_matrix:
    """blockdiag(C_t): each block's constraints on its own coordinates."""
    rows = sum(c.shape[0] for c in blocks)
    if sum(c.shape[1] for c in blocks) == 0:
        return scipy.sparse.csc_matrix((rows, 0))
    return scipy.sparse.block_diag(blocks, format="csc")
