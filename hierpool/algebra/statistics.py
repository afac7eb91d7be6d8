"""Per-dataset sufficient statistics of a one-term linear mixed model, padded to common shapes.

For one random-effect term with k coefficients, the profiled REML/ML criterion,
the BLUPs and their conditional variances depend on the data only through

    Z_l^T Z_l, Z_l^T X_l, Z_l^T y_l   per level l,     X^T X, X^T y, y^T y, n,

(Bates et al. 2015, sec. 3; the blocks of MixedModels.jl's ``A = [Z X y]^T [Z X y]``).
Datasets of any size therefore share one shape once their level count is padded
to a common ``ell``: a padded level has zero cross-products and drops out of
every formula (its factor is the identity).  That is what lets thousands of
datasets run as one vmapped program.

Prior weights w (residual variance sigma^2 / w_i, lmer's ``weights``) enter every
cross-product (Z^T W Z, ..., y^T W y) and the criterion through -sum log w_i
(``log_weights``).  The y of the statistics is each dataset's

    y - offset - X beta0,    beta0 its weighted least-squares fit of y - offset on X

(``beta_shift``), as the closed form's system (:func:`hierpool.algebra.system.location_shift`):
the difference lies in the column space of X, so the profiled criterion is
unchanged, while y^T W y no longer carries the square of a large common location
(y = 10^7 + signal loses ~14 of float64's 16 digits in raw cross-products).
Estimates and draws of beta add ``beta_shift`` back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .jax_runtime import pytree_dataclass
from .linalg import distinct_block_columns
from .system import grouped_products, less_columns

if TYPE_CHECKING:
    import jax


@pytree_dataclass
@dataclass(frozen=True)
class BatchStatistics:
    """Stacked sufficient statistics of a batch of datasets (leading axis: dataset).

    Attributes
    ----------
    ztz : (B, ell, k, k)
    ztx : (B, ell, k, p)
    zty : (B, ell, k)
    xtx : (B, p, p)
    xty : (B, p)
    yty : (B,)
    n : (B,) number of observations (float)
    log_weights : (B,) sum of log prior weights (0 without weights)
    beta_shift : (B, p) beta0: the statistics' y is y - offset - X beta0 (see the module docstring).
        Always float64 (:meth:`astype` keeps it): a float32 fit adds it back in float64,
        so a large location of y does not cost the fixed effects float32's digits.
    """

    ztz: jax.Array
    ztx: jax.Array
    zty: jax.Array
    xtx: jax.Array
    xty: jax.Array
    yty: jax.Array
    n: jax.Array
    log_weights: jax.Array
    beta_shift: jax.Array

    def astype(self, dtype) -> BatchStatistics:
        cast = self.map_arrays(lambda a: np.asarray(a, dtype=dtype))
        return dataclasses.replace(cast, beta_shift=np.asarray(self.beta_shift, dtype=np.float64))

    def take(self, index) -> BatchStatistics:
        """The datasets ``index``; an array repeated over them by a zero stride (a shared design's block) stays so,
        not copied once a dataset."""
        def rows(a):
            if isinstance(a, np.ndarray) and a.ndim and a.shape[0] and a.strides[0] == 0:
                picked = np.arange(a.shape[0])[index]
                if np.ndim(picked):
                    return np.broadcast_to(a[0], picked.shape + a.shape[1:])
            return a[index]

        return self.map_arrays(rows)

    def map_arrays(self, function) -> BatchStatistics:
        """``function`` applied to every array (JAX's tree_map without importing JAX)."""
        return BatchStatistics(**{f.name: function(getattr(self, f.name)) for f in dataclasses.fields(self)})


def location_shifts(dataset: np.ndarray, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None, n_datasets: int,
                    xtx: np.ndarray | None = None):
    """(beta0 (D, p), residual (N,)): each dataset's weighted least-squares fit of y on X, and y - X beta0.

    The batched counterpart of :func:`hierpool.algebra.system.location_shift`:
    normal equations per dataset (a pseudo-inverse, so a rank-deficient dataset,
    which is refused later, does no harm), then one refinement step on the
    residual, which is computed from the user's y directly.  Only the size of the
    residual depends on beta0's accuracy, never the criterion.  ``weights`` None: unweighted; ``xtx``: each
    dataset's X'WX (D, p, p), where the caller has summed it.
    """
    p = X.shape[1]
    if not p:
        return np.zeros((n_datasets, 0)), y.copy()
    # grouped_products: a sum per (a <= b) column pair, with no (N, p, p) temporary
    xtx = grouped_products(dataset, X, X, weights, n_datasets) if xtx is None else xtx
    inverse = np.linalg.pinv(xtx, hermitian=True)
    beta0 = np.zeros((n_datasets, p))
    residual = y
    for _ in range(2):  # the fit, then one refinement step
        xtr = grouped_products(dataset, X, residual[:, None], weights, n_datasets)[..., 0]
        step = np.einsum("dpq,dq->dp", inverse, xtr)
        beta0 = beta0 + step
        # column by column, each step gathered as one vector: NumPy's einsum over p here is a slow loop
        for j in range(p):
            residual = residual - X[:, j] * step[:, j][dataset]
    return beta0, residual


def sufficient_statistics(
    dataset: np.ndarray,
    level: np.ndarray,
    X: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    n_datasets: int,
    ell: int,
    weights: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    shifts: tuple[np.ndarray, np.ndarray] | None = None,
) -> BatchStatistics:
    """Cross-products per (dataset, level) from the rows of all datasets at once.

    Parameters
    ----------
    dataset : (N,) int, dataset of each row (0 .. n_datasets-1)
    level : (N,) int, level of each row within its dataset (0 .. ell-1)
    X : (N, p), z : (N, k), y : (N,)
    weights : (N,), optional
        Prior weights (positive): every cross-product is weighted by them.
    offset : (N,), optional
        Known part of the linear predictor, subtracted from y.
    shifts : (beta0 (n_datasets, p), residual (N,)), optional
        :func:`location_shifts` of these rows, where the caller has computed them.
    """
    cell = dataset * ell + level
    size = n_datasets * ell
    target = y if offset is None else y - offset
    # the weighted cross-products per (dataset, level) cell: grouped_products, the systems' own sums, over the
    # distinct columns of [z X] once (a slope on a fixed covariate, an intercept in both: sleepstudy's z is X); a
    # dataset's sums are its cells' (padded cells hold zeros)
    columns, (z_at, x_at) = distinct_block_columns(z, X)
    cells = grouped_products(cell, columns, columns, weights, size).reshape(n_datasets, ell, *columns.shape[1:] * 2)
    xtx = cells.sum(axis=1)[:, x_at][:, :, x_at]
    beta_shift, y = location_shifts(dataset, X, target, weights, n_datasets, xtx=xtx) if shifts is None else shifts
    log_weights = (np.zeros(n_datasets) if weights is None
                   else np.bincount(dataset, weights=np.log(weights), minlength=n_datasets))
    y_column = y[:, None]
    cross = grouped_products(cell, columns, y_column, weights, size).reshape(n_datasets, ell, -1)
    return BatchStatistics(
        ztz=cells[:, :, z_at][:, :, :, z_at],
        ztx=cells[:, :, z_at][:, :, :, x_at],
        zty=cross[:, :, z_at],
        xtx=xtx,
        xty=cross.sum(axis=1)[:, x_at],
        yty=grouped_products(dataset, y_column, y_column, weights, n_datasets).reshape(n_datasets),
        n=np.bincount(dataset, minlength=n_datasets).astype(float),
        log_weights=log_weights,
        beta_shift=beta_shift,
    )


#: Values of the responses' temporaries (y - offset, its residual, the weighted residual) per block of datasets in
#: :func:`shared_design_statistics`: about 8 MiB each in float64, whatever the number of datasets.  Each block is read
#: and written several times over (the shifts' products and column updates, then the cross-products); blocks of this
#: size stay nearer the processor than 32 MiB ones.  The statistics are equal to rounding whatever the blocks (a
#: block of one response goes to other BLAS kernels: 1e-16 apart); timed in benchmarks/RESULTS.md, "Fifty-first
#: session".
SHARED_BLOCK_VALUES = 1 << 20


def level_cells(level: np.ndarray, z: np.ndarray, ell: int):
    """The sparse (n, ell k) matrix whose row i holds z_i in the columns of its level (``level_i * k + j``):
    ``cells.T @ (W R)`` is Z_l'W r per level and column of R, each level's k values together (level-major), as the
    systems order a term's effects."""
    import scipy.sparse  # (here: a small fit imports no SciPy, tests/test_imports.py)

    n, k = z.shape
    columns = (np.asarray(level, dtype=np.int64)[:, None] * k + np.arange(k)).ravel()
    return scipy.sparse.csr_matrix((np.asarray(z, dtype=float).ravel(), (np.repeat(np.arange(n), k), columns)),
                                   shape=(n, ell * k))


def shared_location_shifts(X: np.ndarray, Y: np.ndarray, weights: np.ndarray | None,
                           xtx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(beta0 (D, p), residual (n, D)): :func:`location_shifts` for datasets that share X and the weights and differ
    in their responses, the columns of Y (n, D): the same normal equations (the pseudo-inverse of X'WX: ``xtx``
    where the caller has summed it) and refinement step, each a matrix product over the datasets at once."""
    p = X.shape[1]
    if not p:
        return np.zeros((Y.shape[1], 0)), Y.copy()
    weighted_x = X if weights is None else X * weights[:, None]
    inverse = np.linalg.pinv(weighted_x.T @ X if xtx is None else xtx, hermitian=True)
    beta0 = np.zeros((p, Y.shape[1]))
    residual = np.array(Y, dtype=float, order="C")  # (a copy updated in place: no fresh (n, D) array per update)
    for _ in range(2):  # the fit, then one refinement step
        step = inverse @ (weighted_x.T @ residual)
        beta0 = beta0 + step
        # column by column: X @ step would round the fitted values at the size of a large common location before
        # they are subtracted (1e8 + y lost digits of the criterion beyond 1e-10)
        less_columns(residual, X, step, in_place=True)
    return beta0.T, residual


def shared_design_statistics(
    level: np.ndarray,
    X: np.ndarray,
    z: np.ndarray,
    Y: np.ndarray,
    ell: int,
    weights: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> BatchStatistics:
    """:func:`sufficient_statistics` of datasets that share one design and differ only in their responses.

    A simulation study, a parametric bootstrap or one model per gene on the same samples fits D responses on the
    same rows: the design's cross-products (Z_l'WZ_l, Z_l'WX, X'WX, n, sum log w) are one dataset's, and only

        Z_l'W r_d,  X'W r_d,  r_d'W r_d,   r_d = y_d - offset - X beta0_d

    differ, which are matrix products of the design with R = [r_1 ... r_D] (lme4's ``refit(fit, newresp)``,
    MixedModels.jl's ``refit!``, fitted for every response at once).  No row is repeated per dataset.

    Parameters
    ----------
    level : (n,) int, each row's level (0 .. ell-1)
    X : (n, p), z : (n, k)
    Y : (n, D), one response per column
    ell : int, the padded level count
    weights : (n,), optional
        Prior weights, every dataset's.
    offset : (n,), optional
        Known part of the linear predictor, every dataset's.

    Returns
    -------
    BatchStatistics
        D datasets' statistics, equal to :func:`sufficient_statistics` on the datasets stacked (to rounding: the
        sums run in another order); the design's blocks are read-only views of one dataset's, repeated.
    """
    n, n_datasets = Y.shape
    k = z.shape[1]
    design = sufficient_statistics(np.zeros(n, dtype=np.int64), level, X, z, np.zeros(n), 1, ell, weights=weights)
    cells = level_cells(level, z, ell)
    zty, xty, yty, beta_shift = (np.empty((n_datasets, ell, k)), np.empty((n_datasets, X.shape[1])),
                                 np.empty(n_datasets), np.empty((n_datasets, X.shape[1])))
    width = max(1, SHARED_BLOCK_VALUES // max(n, 1))
    for start in range(0, n_datasets, width):
        block = slice(start, start + width)
        target = Y[:, block] if offset is None else Y[:, block] - offset[:, None]
        beta_shift[block], residual = shared_location_shifts(X, target, weights, design.xtx[0])
        weighted = residual if weights is None else residual * weights[:, None]
        zty[block] = (cells.T @ weighted).T.reshape(-1, ell, k)
        xty[block] = weighted.T @ X
        yty[block] = np.einsum("nd,nd->d", residual, weighted)

    def every(one: np.ndarray) -> np.ndarray:
        return np.broadcast_to(one[0], (n_datasets,) + one.shape[1:])

    return BatchStatistics(ztz=every(design.ztz), ztx=every(design.ztx), zty=zty, xtx=every(design.xtx), xty=xty,
                           yty=yty, n=every(design.n), log_weights=every(design.log_weights), beta_shift=beta_shift)


def one_dataset_statistics(design) -> BatchStatistics:
    """The statistics of one dataset's one-term design (no leading dataset axis), its weights and offset included."""
    term = design.terms[0]
    stats = sufficient_statistics(np.zeros(design.n, dtype=np.int64), term.index, design.X, term.z, design.y, 1,
                                  term.n_levels, weights=design.weights, offset=design.offset)
    return stats.take(0)


def centred_statistics(design) -> tuple[BatchStatistics, np.ndarray]:
    """One dataset's statistics with the fixed-effect columns centred, and the map back to the user's beta.

    With an intercept column, X = X_c T where X_c has every other column centred at its weighted
    mean c_j and T = I + e_int c^T (unit triangular).  The profiled criterion is unchanged
    (the column space is the same and log|R_X|^2 gains log det(T)^2 = 0), while X^T W X no longer
    carries the squares of large column means (a calendar year or a timestamp as a covariate
    loses most of float64's digits in its raw cross-products).  Estimates map back by
    beta = T^-1 beta_c and Cov(beta) = T^-1 Cov(beta_c) T^-T; the returned matrix is T^-1 (the
    identity without an intercept column).
    """
    centred, fixed_map = centred_fixed_effects(design)
    return one_dataset_statistics(centred), fixed_map


def centred_fixed_effects(design):
    """(the design with X's columns other than the intercept centred at their weighted means, T^-1): see
    :func:`centred_statistics`; the design itself and the identity without an intercept column."""
    X = design.X
    fixed_map = np.eye(design.p)
    ones = np.flatnonzero(np.all(X == 1.0, axis=0)) if design.p else np.zeros(0, dtype=int)
    if design.p < 2 or not ones.size:
        return design, fixed_map
    weights = design.row_weights
    centres = weights @ X / weights.sum()
    centres[ones[0]] = 0.0
    fixed_map[ones[0]] -= centres  # T^-1 = I - e_int c^T
    return dataclasses.replace(design, X=X - centres), fixed_map
