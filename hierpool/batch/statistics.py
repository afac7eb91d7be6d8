"""Per-dataset sufficient statistics of a one-term linear mixed model, padded to common shapes.

For one random-effect term with k coefficients, the profiled REML/ML criterion,
the BLUPs and their conditional variances depend on the data only through

    Z_l^T Z_l, Z_l^T X_l, Z_l^T y_l   per level l,     X^T X, X^T y, y^T y, n,

(Bates et al. 2015, sec. 3; the blocks of MixedModels.jl's ``A = [Z X y]^T [Z X y]``).
Datasets of any size therefore share one shape once their level count is padded
to a common ``ell``: a padded level has zero cross-products and drops out of
every formula (its factor is the identity).  That is what lets thousands of
datasets run as one vmapped program.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


@jax.tree_util.register_dataclass
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
    """

    ztz: jax.Array
    ztx: jax.Array
    zty: jax.Array
    xtx: jax.Array
    xty: jax.Array
    yty: jax.Array
    n: jax.Array

    def astype(self, dtype) -> BatchStatistics:
        return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), self)

    def take(self, index) -> BatchStatistics:
        return jax.tree_util.tree_map(lambda a: a[index], self)


def sufficient_statistics(
    dataset: np.ndarray, level: np.ndarray, X: np.ndarray, z: np.ndarray, y: np.ndarray, n_datasets: int, ell: int
) -> BatchStatistics:
    """Cross-products per (dataset, level) from the rows of all datasets at once.

    Parameters
    ----------
    dataset : (N,) int, dataset of each row (0 .. n_datasets-1)
    level : (N,) int, level of each row within its dataset (0 .. ell-1)
    X : (N, p), z : (N, k), y : (N,)
    """
    p, k = X.shape[1], z.shape[1]
    cell = dataset * ell + level
    size = n_datasets * ell

    def sums(index: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
        # one bincount per column: several times faster than np.add.at
        flat = values.reshape(len(values), -1)
        return np.stack([np.bincount(index, weights=column, minlength=count) for column in flat.T], axis=1)

    def per_cell(values: np.ndarray) -> np.ndarray:
        return sums(cell, values, size)

    def per_dataset(values: np.ndarray) -> np.ndarray:
        return sums(dataset, values, n_datasets)

    return BatchStatistics(
        ztz=per_cell(z[:, :, None] * z[:, None, :]).reshape(n_datasets, ell, k, k),
        ztx=per_cell(z[:, :, None] * X[:, None, :]).reshape(n_datasets, ell, k, p),
        zty=per_cell(z * y[:, None]).reshape(n_datasets, ell, k),
        xtx=per_dataset(X[:, :, None] * X[:, None, :]).reshape(n_datasets, p, p),
        xty=per_dataset(X * y[:, None]).reshape(n_datasets, p),
        yty=per_dataset(y**2).reshape(n_datasets),
        n=np.bincount(dataset, minlength=n_datasets).astype(float),
    )


def one_dataset_statistics(design) -> BatchStatistics:
    """The statistics of one dataset's one-term design (no leading dataset axis)."""
    term = design.terms[0]
    stats = sufficient_statistics(np.zeros(design.n, dtype=np.int64), term.index, design.X, term.z, design.y, 1,
                                  term.n_levels)
    return stats.take(0)
