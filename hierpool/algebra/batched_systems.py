"""The cross-products of many datasets' mixed-model systems at once, padded to common shapes (host, NumPy).

:func:`hierpool.algebra.system.build_system` computes one dataset's ``A = [Z X y]^T W [Z X y]`` blocks; a batch
of datasets of one model (``hp.fit_batch``) needs the same blocks for each, stacked along a leading axis so that
one compiled program vmaps the criterion (:func:`hierpool.algebra.criterion.objective`) over them.  Building them
one by one sorts and ``unique``s each dataset's coupling pairs; here every block of every
dataset is one weighted ``bincount`` over the long frame's rows, its key prefixed by the dataset.

**Padding.**  Datasets differ in rows and in levels.  Rows never enter a shape (cross-products); each term's
levels are padded to a common width per batch (``widths``).  A padded level has no rows, so its blocks are zero:

* in term 0, D_l = T0^T 0 T0 + I = I adds log 1 = 0 and couples to nothing;
* in a rest term, the scaled rest gets a unit diagonal entry and zero off-diagonals: log 1 = 0 again,

so a padded system's criterion, estimates and BLUPs are the dataset's own (the padded BLUPs are zero), exactly.

**Couplings.**  A dataset meets its own (term-0 level, rest level) cells; the batch stores every cell of the
padded grid (zero where a dataset has no rows), so all datasets share one coupling pattern and no coupling pairs
are formed: the systems are ``Layout.dense_only``, and the algebra uses the dense coupling (ell0 x k0 x m, small
for the models batched: :data:`MAX_DENSE_ENTRIES`).

**Rows.**  ``Layout.n`` is None: each dataset's n is data (``objective(..., n=)``, ``solve(..., n=)``).

The y column is each dataset's y - offset - X beta0_d (:func:`hierpool.algebra.statistics.location_shifts`), as
:func:`~hierpool.algebra.system.build_system`'s one-dataset shift (unless ``shift=False``: y - offset).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .statistics import level_cells, location_shifts
from .system import Coupling, Layout, MixedModelSystem, grouped_products

#: Largest dense coupling (ell0 k0 m values) per dataset of a batch: beyond it a dataset is better fitted alone.
MAX_DENSE_ENTRIES = 2**18


def batched_systems(dataset: np.ndarray, n_datasets: int, terms, X: np.ndarray, y: np.ndarray,
                    weights: np.ndarray | None, offset: np.ndarray | None, sigma_known: bool = False,
                    shift: bool = True, shifts: tuple[np.ndarray, np.ndarray] | None = None,
                    prior_weights: bool = True):
    """Every dataset's system, stacked: (MixedModelSystem with a leading dataset axis, n per dataset).

    Parameters
    ----------
    dataset : (N,) int
        Dataset of each row, 0 .. n_datasets - 1.
    terms : list of (level (N,) int, z (N, k), width)
        Each random-effect term, term 0 first: the level of each row within its dataset, the term's
        row values and the padded number of levels (every dataset's level count at most ``width``).
    X : (N, p), y : (N,)
    weights : (N,), optional
        Prior weights (residual variance sigma^2 / w), or 1 / se^2 with known residual sds.
    offset : (N,), optional
    sigma_known : bool
        Residual sds known (``se=``): sigma is 1.
    shift : bool
        The y column about each dataset's least-squares fit on X (module notes); False: y - offset itself,
        beta_shift 0, for a caller that reads only the Z and X blocks (the fit's p x p solves saved).
    shifts : (beta_shift (n_datasets, p), y_column (N,)), optional
        :func:`hierpool.algebra.statistics.location_shifts` of these rows, already computed by the caller (who
        needed the residuals for a start): taken as they are, not computed again.
    prior_weights : bool
        False: ``weights`` are a GLMM's working weights (a PIRLS step's system), whose logs no criterion reads:
        ``log_weights`` is 0, not computed (a log of every row at every step).

    Returns
    -------
    (MixedModelSystem, (n_datasets,) float array)
        The systems' arrays have a leading axis of length ``n_datasets`` (vmap them); their layout has
        ``n=None`` and ``dense_only=True`` (module notes).
    """
    n_rows, p = X.shape
    w = np.ones(n_rows) if weights is None else np.asarray(weights, dtype=float)
    target = y if offset is None else y - offset
    if shifts is not None:
        beta_shift, y_column = shifts
    elif shift:
        beta_shift, y_column = location_shifts(dataset, X, target, w, n_datasets)
    else:
        beta_shift, y_column = np.zeros((n_datasets, p)), target
    dataset = dataset.astype(np.int64, copy=False)
    level0, z0, ell0 = terms[0]
    level0 = level0.astype(np.int64, copy=False)
    k0 = z0.shape[1]
    rest = [(level.astype(np.int64, copy=False), z, ell) for level, z, ell in terms[1:]]
    zeros = np.zeros(n_rows, dtype=np.int64)
    if p:
        rest.append((zeros, X, 1))
    rest.append((zeros, y_column[:, None], 1))

    a00 = grouped_products(dataset * ell0 + level0, z0, z0, w, n_datasets * ell0).reshape(n_datasets, ell0, k0, k0)
    couplings = []
    for level, values, ell in rest:
        cells = ell0 * ell  # every (term-0 level, rest level) cell of the padded grid
        products = grouped_products(dataset * cells + level0 * ell + level, z0, values, w, n_datasets * cells)
        grid_level0 = np.broadcast_to(np.repeat(np.arange(ell0, dtype=np.int32), ell), (n_datasets, cells))
        grid_level = np.broadcast_to(np.tile(np.arange(ell, dtype=np.int32), ell0), (n_datasets, cells))
        couplings.append(Coupling(grid_level0, grid_level, products.reshape(n_datasets, cells, k0, values.shape[1])))

    sizes = [ell * values.shape[1] for _, values, ell in rest]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    dense = np.zeros((n_datasets, offsets[-1], offsets[-1]))
    for r, (level_r, values_r, ell_r) in enumerate(rest):
        for s in range(r, len(rest)):
            level_s, values_s, ell_s = rest[s]
            keys = dataset * (ell_r * ell_s) + level_r * ell_s + level_s
            grid = grouped_products(keys, values_r, values_s, w, n_datasets * ell_r * ell_s)
            k_r, k_s = values_r.shape[1], values_s.shape[1]
            block = (grid.reshape(n_datasets, ell_r, ell_s, k_r, k_s).transpose(0, 1, 3, 2, 4)
                     .reshape(n_datasets, sizes[r], sizes[s]))
            dense[:, offsets[r] : offsets[r + 1], offsets[s] : offsets[s + 1]] = block
            dense[:, offsets[s] : offsets[s + 1], offsets[r] : offsets[r + 1]] = np.swapaxes(block, 1, 2)
    layout = Layout(n=None, p=p, ks=tuple(z.shape[1] for _, z, _ in terms),
                    n_levels=tuple(int(ell) for _, _, ell in terms), sigma_known=sigma_known, dense_only=True)
    system = MixedModelSystem(
        a00=a00,
        couplings=tuple(couplings),
        pairs=(),
        rest=dense,
        log_weights=(np.bincount(dataset, weights=np.log(w), minlength=n_datasets) if prior_weights
                     else np.zeros(n_datasets)),
        beta_shift=beta_shift,
        layout=layout,
    )
    return system, np.bincount(dataset, minlength=n_datasets).astype(float)


def shared_design_systems(terms, X: np.ndarray, shifts: tuple[np.ndarray, np.ndarray], weights: np.ndarray | None,
                          sigma_known: bool = False):
    """:func:`batched_systems` of datasets that share one design and differ only in their responses: the blocks
    without y are one dataset's, the same for each (read-only views), and the y column's products with each block,
    Z_j'W r_d, X'W r_d and r_d'W r_d, are matrix products of the design with R = [r_1 ... r_D]
    (:func:`hierpool.algebra.statistics.shared_design_statistics`, the one-term statistics).

    ``terms``: each term's (level (n,), z (n, k), width) on the design's rows; ``shifts``: (beta_shift (D, p),
    R (n, D)), :func:`~hierpool.algebra.statistics.shared_location_shifts` of the responses less the offset.
    Returns (systems with a leading axis of D datasets, n per dataset), equal to :func:`batched_systems` on the
    datasets stacked (to rounding: the sums run in another order).
    """
    beta_shift, residual = shifts
    n, n_datasets = residual.shape
    p = X.shape[1]
    one, _ = batched_systems(np.zeros(n, dtype=np.int64), 1, terms, X, np.zeros(n), weights, None, sigma_known,
                             shift=False)
    weighted = residual if weights is None else residual * np.asarray(weights, dtype=float)[:, None]

    def every(array: np.ndarray) -> np.ndarray:
        return np.broadcast_to(array[0], (n_datasets,) + array.shape[1:])

    (level0, z0, ell0), k0 = terms[0], terms[0][1].shape[1]
    y_coupling = (level_cells(level0, z0, ell0).T @ weighted).T.reshape(n_datasets, ell0, k0, 1)
    couplings = [dataclasses.replace(c, level0=every(c.level0), level=every(c.level), values=every(c.values))
                 for c in one.couplings[:-1]]
    last = one.couplings[-1]
    couplings.append(dataclasses.replace(last, level0=every(last.level0), level=every(last.level), values=y_coupling))
    # the rest's y column: each rest term's levels, then X's columns, then y'Wy
    y_column = [(level_cells(level, z, ell).T @ weighted).T for level, z, ell in terms[1:]]
    if p:
        y_column.append(weighted.T @ X)
    y_column.append(np.einsum("nd,nd->d", residual, weighted)[:, None])
    y_column = np.concatenate(y_column, axis=1)
    rest = np.repeat(one.rest, n_datasets, axis=0)
    rest[:, :, -1] = y_column
    rest[:, -1, :] = y_column
    systems = dataclasses.replace(one, a00=every(one.a00), couplings=tuple(couplings), rest=rest,
                                  log_weights=every(one.log_weights), beta_shift=beta_shift)
    return systems, np.full(n_datasets, float(n))


def statistics_systems(stats, sigma_known: bool = False) -> MixedModelSystem:
    """A one-term batch's sufficient statistics (:class:`~hierpool.algebra.statistics.BatchStatistics`) as the
    general path's systems, in :func:`shared_grid`'s form (the arrays keep the statistics' leading axes).

    The one-term system's blocks are the statistics themselves: A00 = Z_l^T W Z_l, the couplings Z_l^T W X and
    Z_l^T W y (every level meets the one X and y cell), and the rest [[X^T W X, X^T W y], [y^T W X, y^T W y]]
    (Bates et al. 2015, eq. 18), so the general criterion and its written-out adjoint
    (:func:`hierpool.algebra.criterion.host_objective_and_gradient`) evaluate the one-term model from them
    (``hp.fit_batch``'s one-term host search, :func:`hierpool.algebra.search.terms.search_statistics_on_host`).
    """
    ell, k = stats.ztz.shape[-3], stats.ztz.shape[-1]
    p = stats.xtx.shape[-1]
    levels, cell = np.arange(ell, dtype=np.int32), np.zeros(ell, dtype=np.int32)
    couplings = [Coupling(levels, cell, stats.zty[..., None])]
    if p:
        couplings.insert(0, Coupling(levels, cell, stats.ztx))
    yty = np.asarray(stats.yty)[..., None, None]
    xty = np.asarray(stats.xty)[..., :, None]
    rest = np.concatenate([np.concatenate([stats.xtx, xty], axis=-1),
                           np.concatenate([np.swapaxes(xty, -1, -2), yty], axis=-1)], axis=-2)
    layout = Layout(n=None, p=p, ks=(k,), n_levels=(ell,), sigma_known=sigma_known, dense_only=True)
    return MixedModelSystem(a00=stats.ztz, couplings=tuple(couplings), pairs=(), rest=rest,
                            log_weights=stats.log_weights, beta_shift=stats.beta_shift, layout=layout)


def _rest_columns(layout_widths, ks, p: int) -> int:
    """m, the rest's columns: sum_(j>0) ell_j k_j + p + 1."""
    return int(sum(ell * k for ell, k in zip(layout_widths[1:], ks[1:])) + p + 1)


def dense_entries(layout_widths, ks, p: int) -> int:
    """The dense coupling's values per dataset (ell0 k0 m) for term widths ``layout_widths`` and widths ``ks``."""
    return int(layout_widths[0] * ks[0] * _rest_columns(layout_widths, ks, p))


def system_entries(layout_widths, ks, p: int) -> int:
    """A dataset's system's values: A00's ell0 k0^2, the dense coupling's (:func:`dense_entries`) and the rest's
    m^2."""
    m = _rest_columns(layout_widths, ks, p)
    return int(layout_widths[0] * ks[0] * ks[0]) + dense_entries(layout_widths, ks, p) + m * m


def map_arrays(systems: MixedModelSystem, function, fixed=None) -> MixedModelSystem:
    """``function`` applied to each per-dataset array of a batch of systems (A00, the couplings' values, the rest,
    log_weights, beta_shift), the couplings' level grids kept: the one list of those fields for whoever maps them.
    ``fixed``: applied to log_weights and beta_shift in its place (the arrays that are not sums of the rows'
    products: a combination of systems' sums keeps them)."""
    fixed = function if fixed is None else fixed
    return dataclasses.replace(
        systems, a00=function(systems.a00), rest=function(systems.rest), log_weights=fixed(systems.log_weights),
        beta_shift=fixed(systems.beta_shift),
        couplings=tuple(dataclasses.replace(c, values=function(c.values)) for c in systems.couplings))


def system_arrays(systems: MixedModelSystem, sums_only: bool = False) -> list:
    """The per-dataset arrays of a batch of systems, in :func:`map_arrays`' order; ``sums_only``: the sums of the
    rows' products alone (A00, the rest, the couplings' values), not log_weights and beta_shift."""
    out = []
    map_arrays(systems, lambda a: out.append(a) or a, fixed=(lambda a: a) if sums_only else None)
    return out


def shared_grid(systems: MixedModelSystem, rows, points: bool = False) -> MixedModelSystem:
    """Datasets ``rows`` of a batch of systems in the form the host algebra takes with leading axes: each array
    has the datasets' axis first, and the couplings' level indices, the same grid for every dataset of a batch, are
    held once (1-D).  ``points``: an axis of length 1 follows the datasets', so that each dataset's system
    broadcasts over its own points (thetas (datasets, points, n_theta)).  ``rows``: an index array (copies of
    those datasets' arrays) or a slice (views).
    """
    def pick(a):
        a = np.asarray(a)[rows]
        return a[:, None] if points else a

    def grid(level):
        if level.ndim == 1:
            return level
        if not np.array_equal(level, np.broadcast_to(level[0], level.shape)):
            raise ValueError("shared_grid needs a batch whose datasets share one coupling grid (batched_systems')")
        return level[0]

    picked = map_arrays(systems, pick)
    return dataclasses.replace(picked, couplings=tuple(Coupling(grid(c.level0), grid(c.level), c.values)
                                                       for c in picked.couplings))
