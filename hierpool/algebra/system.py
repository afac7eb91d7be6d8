"""The theta-independent cross-products of the mixed-model equations.

Following MixedModels.jl, everything the profiled objective needs is
``A = [Z X y]^T W [Z X y]`` (W the prior weights), computed once; each
evaluation only rescales its blocks by Lambda(theta) and factors
``Lambda^T A Lambda + I``.

Layout.  The columns are split into the first random-effect term (term 0, the
one with most levels) and the *rest*: the other random-effect terms, then X,
then y, each a "column block" of ``ell`` levels of width ``k`` (X is one level
of width p, y one level of width 1).  Term 0's diagonal block is block
diagonal (``a00``, one k0 x k0 block per level), so it is eliminated by a Schur
complement; the rest is a small dense matrix (``rest``).  The coupling between
term 0 and each rest block is stored sparsely: one k0 x k_r block per
(term-0 level, rest level) pair that occurs in the data (``couplings``).
Eliminating term 0 adds, to rest block (r, s), the products of couplings that
share a term-0 level; those pairs are listed once here (``pairs``), so the
Schur complement is a gather, a batched product and a sorted segment-sum.

No dense Z is formed: every cross-product is a weighted ``bincount`` over rows.

Conditioning.  The y column is y - offset - X beta0, beta0 the weighted least-
squares fit of y - offset on X (``beta_shift``).  The difference lies in the
column space of X, so the profiled criterion is unchanged, while y^T W y no
longer carries the square of a large common location: with y = 10^7 + signal the
raw products lose about 14 of float64's 16 digits and move the REML criterion by
~90 units.  Estimates of beta are reported as beta0 + the solution's beta, so the
shift is invisible outside the algebra (see :func:`shift_beta`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .jax_runtime import jax, pytree_dataclass
from .linalg import array_namespace, host_product

if TYPE_CHECKING:  # annotations only: the host algebra imports without pandas (a worker's start)
    from ..spec.design import Design


@pytree_dataclass
@dataclass(frozen=True)
class Coupling:
    """Sparse block ``Z_0^T W B_r`` between term 0 and rest block r (COO of k0 x k_r blocks)."""

    level0: jax.Array  # (nnz,) int32, the term-0 level of each block
    level: jax.Array  # (nnz,) int32, the rest-block level of each block
    values: jax.Array  # (nnz, k0, k_r)


@pytree_dataclass
@dataclass(frozen=True)
class Pairs:
    """Pairs of couplings (a in block r, b in block s) that share a term-0 level l.

    ``products[p, i, j] = outer(V_r[a][i], V_s[b][j])`` (theta-independent), so the
    Schur update of rest block (r, s) is ``sum_p <M_l, products[p]>`` summed into
    cell ``target = level_r[a] * ell_s + level_s[b]`` (sorted) of the (ell_r, ell_s) grid.

    A diagonal block (r = s) is symmetric, so it lists each unordered pair once (a <= b, the
    upper triangle of its grid) with the products of a = b halved: the block is then the sum
    plus its transpose (:func:`hierpool.algebra.criterion._schur_update`).  On a large crossed
    factor this halves the pairs, which are most of the memory and the work of the update.
    """

    level0: jax.Array  # (n_pairs,) int32
    target: jax.Array  # (n_pairs,) int32, sorted
    products: jax.Array  # (n_pairs, k0, k0, k_r, k_s)


@dataclass(frozen=True)
class Layout:
    """Static shape information (hashable; a jit-compile key).

    ``n`` is None in a batch of systems (:func:`hierpool.algebra.batched_systems.batched_systems`), whose
    datasets differ in rows: the criterion then takes each dataset's n as data (``objective(..., n=)``).
    ``dense_only``: the system carries no coupling pairs (a batch's, whose datasets meet different cells), so
    the algebra uses the dense coupling (:func:`dense_coupling_pays`); its couplings then list every cell of the
    (term-0 level, rest level) grid, level-major, so the dense coupling is a reshape of their values
    (:func:`grid_coupling`).
    """

    n: int | None
    p: int
    ks: tuple[int, ...]  # width of each random-effect term, term 0 first
    n_levels: tuple[int, ...]  # levels of each random-effect term
    sigma_known: bool
    dense_only: bool = False

    @cached_property
    def rest_blocks(self) -> tuple[tuple[int, int], ...]:
        """(ell, k) of each rest column block: random terms 1.., then X (if p > 0), then y."""
        blocks = [(ell, k) for ell, k in zip(self.n_levels[1:], self.ks[1:])]
        if self.p:
            blocks.append((1, self.p))
        blocks.append((1, 1))
        return tuple(blocks)

    @property
    def n_random_rest(self) -> int:
        """Number of rest blocks that are random-effect terms."""
        return len(self.ks) - 1

    @property
    def q_rest(self) -> int:
        """Number of random-effect columns in the rest."""
        return sum(ell * k for ell, k in zip(self.n_levels[1:], self.ks[1:]))

    @property
    def n_theta(self) -> int:
        return sum(k * (k + 1) // 2 for k in self.ks)

    def pair_keys(self) -> tuple[tuple[int, int], ...]:
        """Ordered (r, s), r <= s, of the rest blocks whose Schur update is needed."""
        m = len(self.rest_blocks)
        return tuple((r, s) for r in range(m) for s in range(r, m))


@pytree_dataclass
@dataclass(frozen=True)
class MixedModelSystem:
    """Cross-products of one model on one data set: the input of every numerical kernel.

    A pytree: the arrays are leaves (so a batch of systems with equal layouts
    can be vmapped), the :class:`Layout` is static metadata.
    """

    a00: jax.Array  # (ell0, k0, k0)
    couplings: tuple[Coupling, ...]  # one per rest block
    pairs: tuple[Pairs, ...]  # one per Layout.pair_keys()
    rest: jax.Array  # (m, m) dense B^T W B over the rest columns
    log_weights: jax.Array  # sum of log prior weights (0 without weights, and in a GLMM's working systems)
    beta_shift: jax.Array  # (p,) beta0: the y column is y - offset - X beta0 (see the module docstring)
    layout: Layout = field(metadata=dict(static=True))


#: Rows from which :func:`grouped_products` sums keys that come in order run by run (``np.add.reduceat``) rather
#: than by ``np.bincount``: finding the runs costs about one bincount, and each product then costs less than one;
#: below it the runs cost more than they save (timed in benchmarks/RESULTS.md, twenty-second session).
SORTED_KEYS_MIN_ROWS = 50_000


def _key_runs(keys: np.ndarray):
    """(the first row of each run of equal keys, the run's key) where ``keys`` never decrease (a long frame's
    datasets; levels sorted within them), else None."""
    if keys[0] < 0 or (keys[1:] < keys[:-1]).any():  # (a difference would wrap for unsigned keys)
        return None
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return starts, keys[starts]


def grouped_products(keys, left, right, weights, size):
    """sum over rows with the same key of w * left[:, a] * right[:, b]; shape (size, ka, kb); ``weights`` None: w = 1
    (no product with a column of ones).

    With ``right`` the same array as ``left`` the products are symmetric: the k (k + 1) / 2 on and above the
    diagonal are summed and mirrored (a GLMM's PIRLS builds term 0's blocks at every step).  From
    :data:`SORTED_KEYS_MIN_ROWS` rows, keys in order are summed run by run."""
    if size == 1:  # one cell (the X and y blocks): one matrix product, not ka kb bincounts
        return host_product(left if weights is None else left * weights[:, None], right, transpose_a=True)[None]
    symmetric = right is left
    runs = _key_runs(keys) if len(keys) >= SORTED_KEYS_MIN_ROWS else None
    shape = (size, left.shape[1], right.shape[1])
    out = np.empty(shape) if runs is None else np.zeros(shape)  # (runs: a key with no rows is never written)
    for a in range(left.shape[1]):
        wl = left[:, a] if weights is None else weights * left[:, a]
        for b in range(a if symmetric else 0, right.shape[1]):
            if runs is None:
                out[:, a, b] = np.bincount(keys, weights=wl * right[:, b], minlength=size)
            else:
                out[runs[1], a, b] = np.add.reduceat(wl * right[:, b], runs[0])
            if symmetric:
                out[:, b, a] = out[:, a, b]
    return out


def location_shift(design: Design) -> tuple[np.ndarray, np.ndarray]:
    """(beta0, y - offset - X beta0): beta0 the weighted least-squares fit of y - offset on X.

    The residual is computed from the user's y directly, so no digit is lost to
    a large common location of y (or of the offset).
    """
    y = design.y_less_offset
    if not design.p:
        return np.zeros(0), y
    root_w = np.sqrt(design.row_weights)
    beta0 = np.linalg.lstsq(design.X * root_w[:, None], y * root_w, rcond=None)[0]
    residual = less_columns(y, design.X, beta0)
    # one refinement step: the residual of a large-location y is accurate only to its rounding
    correction = np.linalg.lstsq(design.X * root_w[:, None], residual * root_w, rcond=None)[0]
    return beta0 + correction, less_columns(residual, design.X, correction)


def less_columns(y: np.ndarray, X: np.ndarray, beta: np.ndarray, in_place: bool = False) -> np.ndarray:
    """y - X beta, one column at a time: a large common location cancels in y - beta_0 before the other columns'
    parts are taken, where X @ beta rounds its sum at the location's size first (1e10 + y, its residual 1e-5:
    ``hp.lmm``'s several-term criterion 2e-5 off that of y shifted exactly; the forty-eighth session's review).

    ``y`` (n,) with ``beta`` (p,), or many responses (n, D) with ``beta`` (p, D)
    (:func:`hierpool.algebra.statistics.shared_location_shifts`).  ``in_place``: ``y`` (float, writable) is updated
    and returned, with one temporary of its size.  (A long frame's datasets, each with its own beta, subtract per
    row: :func:`hierpool.algebra.statistics.location_shifts`.)"""
    residual = y if in_place else np.array(y, dtype=float)
    scratch = np.empty_like(residual)
    for j in range(X.shape[1]):
        column = X[:, j] if residual.ndim == 1 else X[:, j:j + 1]
        residual -= np.multiply(column, beta[j], out=scratch)
    return residual


def shift_beta(beta, system: "MixedModelSystem"):
    """The user's beta from the algebra's: beta0 + beta (any leading batch axes)."""
    return beta + system.beta_shift


def _rest_columns(design: Design, y_column: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(level index per row, row values (n, k), ell) of each rest block."""
    blocks = [(t.index.astype(np.int64), t.z, t.n_levels) for t in design.terms[1:]]
    zeros = np.zeros(design.n, dtype=np.int64)
    if design.p:
        blocks.append((zeros, design.X, 1))
    blocks.append((zeros, y_column[:, None], 1))
    return blocks


def _pairs(level0_r, level_r, level0_s, level_s, ell_s, ell0, diagonal: bool = False):
    """All (a, b) with level0_r[a] == level0_s[b] (``diagonal``: r = s, and only a <= b); level0 arrays are sorted.

    Built in int32 (the stored width) and without int64 temporaries of the pairs' length:
    with millions of pairs those temporaries were the peak memory of a large fit.
    """
    counts_s = np.bincount(level0_s, minlength=ell0)
    starts_s = np.concatenate([[0], np.cumsum(counts_s)[:-1]])
    # each a's partners are a run of b: its term-0 level's couplings, from a itself when diagonal
    first_b = np.arange(len(level0_r)) if diagonal else starts_s[level0_r]
    reps = starts_s[level0_r] + counts_s[level0_r] - first_b
    before = np.cumsum(reps) - reps
    a = np.repeat(np.arange(len(level0_r), dtype=np.int32), reps)
    # b = first_b[a] + (position of the pair within its a's run)
    b = np.repeat((first_b - before).astype(np.int32), reps)
    b += np.arange(b.size, dtype=np.int32)
    target = level_r.astype(np.int32)[a] * np.int32(ell_s)
    target += level_s.astype(np.int32)[b]
    order = _stable_argsort(target)
    return a[order], b[order], target[order]


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer keys below 2**32 by two 16-bit radix passes.

    numpy radix-sorts only 16-bit keys; on millions of coupling pairs (InstEval: 3.2 M)
    two such passes are faster than its merge sort of int64 keys (benchmarks/RESULTS.md,
    "Measurements the code cites").
    """
    if keys.size == 0 or keys.max() < 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable").astype(np.int32)
    return order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]


def _pair_products(values_r, values_s, a, b, chunk: int = 1 << 20) -> np.ndarray:
    """outer(V_r[a], V_s[b]) per pair, (n_pairs, k0, k0, k_r, k_s), in chunks of pairs: no full-length temporaries."""
    k0, k_r, k_s = values_r.shape[1], values_r.shape[2], values_s.shape[2]
    out = np.empty((len(a), k0, k0, k_r, k_s))
    for start in range(0, len(a), chunk):
        rows = slice(start, start + chunk)
        np.multiply(values_r[a[rows]][:, :, None, :, None], values_s[b[rows]][:, None, :, None, :], out=out[rows])
    return out


def _dense_rest(blocks, weights) -> np.ndarray:
    sizes = [ell * values.shape[1] for _, values, ell in blocks]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rest = np.zeros((offsets[-1], offsets[-1]))
    for r, (index_r, values_r, ell_r) in enumerate(blocks):
        for s in range(r, len(blocks)):
            index_s, values_s, ell_s = blocks[s]
            keys = index_r * ell_s + index_s
            grid = grouped_products(keys, values_r, values_s, weights, ell_r * ell_s)
            k_r, k_s = values_r.shape[1], values_s.shape[1]
            block = grid.reshape(ell_r, ell_s, k_r, k_s).transpose(0, 2, 1, 3).reshape(ell_r * k_r, ell_s * k_s)
            rest[offsets[r] : offsets[r + 1], offsets[s] : offsets[s + 1]] = block
            rest[offsets[s] : offsets[s + 1], offsets[r] : offsets[r + 1]] = block.T
    return rest


@pytree_dataclass
@dataclass(frozen=True)
class SystemPattern:
    """Where each row's cross-products go: the part of a system that prior weights and response do not change.

    Built once per design (:func:`system_pattern`); :func:`build_system` fills it with a design's
    weights and response on the host, :func:`fill_in_program` inside a compiled program.  A GLMM's
    PIRLS refills one pattern at every step with new working weights and response, so the coupling
    cells and pairs (sorting and ``unique``) are found once.  A pytree (the layout static).
    """

    index0: jax.Array  # (n,) term-0 level of each row
    z0: jax.Array  # (n, k0) term 0's row values
    rest_rows: tuple  # per rest block except y: (level index per row, row values (n, k))
    coupling_cells: tuple  # per rest block: (coupling cell of each row, level0 of each cell, level of each cell)
    pair_indices: tuple  # per Layout.pair_keys(): (a, b, target, level0): the couplings paired, their grid cell and level
    layout: Layout = field(metadata=dict(static=True))


def system_pattern(design: Design) -> SystemPattern:
    """The :class:`SystemPattern` of ``design``: its rows' levels and values, with the coupling cells and pairs."""
    term0 = design.terms[0]
    index0, ell0 = term0.index.astype(np.int64), term0.n_levels
    layout = Layout(
        n=design.n,
        p=design.p,
        ks=tuple(t.k for t in design.terms),
        n_levels=tuple(t.n_levels for t in design.terms),
        sigma_known=design.sigma_known,
    )
    rows = _rest_columns(design, np.zeros(design.n))
    cells = []
    for index_r, _, ell_r in rows:
        unique, inverse = np.unique(index0 * ell_r + index_r, return_inverse=True)
        # the cells' levels in int32, the stored width (build_system then converts nothing per fill)
        cells.append((inverse.reshape(-1), (unique // ell_r).astype(np.int32), (unique % ell_r).astype(np.int32)))
    pairs = []
    for r, s in layout.pair_keys():
        (_, level0_r, level_r), (_, level0_s, level_s) = cells[r], cells[s]
        a, b, target = _pairs(level0_r, level_r, level0_s, level_s, rows[s][2], ell0, diagonal=r == s)
        pairs.append((a, b, target, level0_r.astype(np.int32)[a]))
    rest_rows = tuple((index, values) for index, values, _ in rows[:-1])
    return SystemPattern(index0, term0.z, rest_rows, tuple(cells), tuple(pairs), layout)


def build_system(design: Design, host: bool = False, pattern: SystemPattern | None = None,
                 host_only: bool = False) -> MixedModelSystem:
    """Compute the cross-products and the coupling pattern of ``design`` (host side, once).

    Cost O(n k^2) for the cross-products plus the number of coupling pairs,
    sum over term-0 levels of (rest blocks touching that level)^2.  The arrays are
    JAX arrays for compiled programs, or NumPy arrays with ``host=True`` (the
    uncompiled algebra's input; :func:`on_device` converts them later if needed).
    ``pattern`` is :func:`system_pattern` of a design with the same terms, levels and X
    (only the response and the prior weights may differ); it is computed when None.
    ``host_only``: the system is used by the host algebra only (a PIRLS step's), which reads the pair
    products only where the dense coupling does not pay; where it does, they are not formed.
    """
    if pattern is None:
        pattern = system_pattern(design)
    layout = pattern.layout
    if (layout.n, layout.p, layout.sigma_known) != (design.n, design.p, design.sigma_known):
        raise ValueError("build_system: the pattern is of another design (rows, fixed effects or residual scale)")
    weights = design.row_weights
    index0, z0, ell0 = pattern.index0, pattern.z0, layout.n_levels[0]
    beta_shift, y_column = location_shift(design)
    blocks = [(index, values, ell) for (index, values), (ell, _) in zip(pattern.rest_rows, layout.rest_blocks)]
    blocks.append((np.zeros(design.n, dtype=np.int64), y_column[:, None], 1))
    a00 = grouped_products(index0, z0, z0, weights, ell0)
    couplings = [
        (level0, level, grouped_products(inverse, z0, values, weights, len(level0)))
        for (inverse, level0, level), (_, values, _) in zip(pattern.coupling_cells, blocks)
    ]
    pairs = []
    # the host algebra uses the dense coupling where it pays (criterion._schur_update, level_contractions)
    # and then never reads the pair products: unformed, they stand as NaN views of their shape (no memory),
    # which decide dense_coupling_pays as the real ones would (and would poison any use)
    unread = host and host_only and _dense_pays(layout, _pattern_pair_elements(pattern))
    for (r, s), (a, b, target, level0) in zip(layout.pair_keys(), pattern.pair_indices):
        if unread:
            k0, k_r, k_s = couplings[r][2].shape[1], couplings[r][2].shape[2], couplings[s][2].shape[2]
            products = np.broadcast_to(np.float64(np.nan), (len(a), k0, k0, k_r, k_s))
        else:
            products = _pair_products(couplings[r][2], couplings[s][2], a, b)
            if r == s:
                products[a == b] *= 0.5  # a diagonal block is the sum of its pairs plus its transpose
        pairs.append((level0, target, products))
    as_jax = np.asarray if host else _to_device
    return MixedModelSystem(
        a00=as_jax(a00),
        couplings=tuple(
            Coupling(as_jax(l0.astype(np.int32, copy=False)), as_jax(lr.astype(np.int32, copy=False)), as_jax(v))
            for l0, lr, v in couplings
        ),
        pairs=tuple(Pairs(as_jax(l0.astype(np.int32, copy=False)), as_jax(t.astype(np.int32, copy=False)), as_jax(v))
                    for l0, t, v in pairs),
        rest=as_jax(_dense_rest(blocks, weights)),
        log_weights=as_jax(np.sum(np.log(weights))),
        beta_shift=as_jax(beta_shift),
        layout=layout,
    )


def _products_in_program(keys, left, right, weights, size):
    """:func:`grouped_products` in a compiled program: a segment-sum of the rows' weighted outer products."""
    import jax.numpy as jnp

    rows = weights[:, None, None] * left[:, :, None] * right[:, None, :]
    return jax.ops.segment_sum(rows, keys, num_segments=size) if size > 1 else jnp.sum(rows, axis=0, keepdims=True)


def fill_in_program(pattern: SystemPattern, weights: jax.Array, y_column: jax.Array) -> MixedModelSystem:
    """:func:`build_system`'s cross-products inside a compiled program, from the pattern, weights and y column.

    For PIRLS's working designs, whose responses carry no large common location: the y column is
    used as it is (``beta_shift`` zero, no :func:`location_shift`).
    """
    import jax.numpy as jnp

    layout = pattern.layout
    zeros = jnp.zeros(layout.n, dtype=pattern.index0.dtype)
    blocks = [(index, values, ell) for (index, values), (ell, _) in zip(pattern.rest_rows, layout.rest_blocks)]
    blocks.append((zeros, y_column[:, None], 1))
    a00 = _products_in_program(pattern.index0, pattern.z0, pattern.z0, weights, layout.n_levels[0])
    values = [_products_in_program(inverse, pattern.z0, rows, weights, len(level0))
              for (inverse, level0, _), (_, rows, _) in zip(pattern.coupling_cells, blocks)]
    couplings = tuple(Coupling(level0.astype(jnp.int32), level.astype(jnp.int32), v)
                      for (_, level0, level), v in zip(pattern.coupling_cells, values))
    pairs = []
    for (r, s), (a, b, target, level0) in zip(layout.pair_keys(), pattern.pair_indices):
        products = values[r][a][:, :, None, :, None] * values[s][b][:, None, :, None, :]
        if r == s:  # a diagonal block is the sum of its pairs plus its transpose
            products = jnp.where((a == b)[:, None, None, None, None], 0.5 * products, products)
        pairs.append(Pairs(level0, target.astype(jnp.int32), products))
    sizes = [ell * rows.shape[1] for _, rows, ell in blocks]
    grid = [[None] * len(blocks) for _ in blocks]
    for r, (index_r, rows_r, ell_r) in enumerate(blocks):
        for s in range(r, len(blocks)):
            index_s, rows_s, ell_s = blocks[s]
            cells = _products_in_program(index_r * ell_s + index_s, rows_r, rows_s, weights, ell_r * ell_s)
            k_r, k_s = rows_r.shape[1], rows_s.shape[1]
            block = cells.reshape(ell_r, ell_s, k_r, k_s).transpose(0, 2, 1, 3).reshape(sizes[r], sizes[s])
            grid[r][s], grid[s][r] = block, block.T
    return MixedModelSystem(
        a00=a00, couplings=couplings, pairs=tuple(pairs), rest=jnp.block(grid),
        # a zero weight (a batch's padded row: no information) adds log 1, not log 0: the sum of the others
        log_weights=jnp.sum(jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), 0.0)),
        beta_shift=jnp.zeros(layout.p), layout=layout,
    )


def dense_coupling(system: MixedModelSystem) -> np.ndarray:
    """Term 0's coupling with every rest column as one dense (ell0, k0, m) array (host arrays).

    ``C[l, :, columns of rest level j of block r] = V_r[l, j]`` (zero where the pair does not
    occur), so the Schur update is ``sum_l C_l^T M_l C_l`` and its adjoint ``C_l H C_l^T``: two
    BLAS products over the whole rest instead of a gather and a segment-sum per coupling pair
    (:func:`dense_coupling_pays` says when that is cheaper).
    """
    layout = system.layout
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    if layout.dense_only:
        return grid_coupling(system)
    out = np.zeros((ell0, k0, sum(ell * k for ell, k in layout.rest_blocks)))
    offset = 0
    for (ell, k), coupling in zip(layout.rest_blocks, system.couplings):
        level0, level = np.asarray(coupling.level0), np.asarray(coupling.level)
        cols = offset + level[:, None] * k + np.arange(k)[None, :]  # (nnz, k)
        out[level0[:, None, None], np.arange(k0)[None, :, None], cols[:, None, :]] = np.asarray(coupling.values)
        offset += ell * k
    return out


def grid_coupling(system: MixedModelSystem):
    """:func:`dense_coupling` of a ``Layout.dense_only`` system, whose couplings hold every cell of the (term-0
    level, rest level) grid in order, level-major (:mod:`hierpool.algebra.batched_systems`): a reshape, no scatter.

    NumPy or traced arrays; leading axes of the values (a batch of systems) give (..., ell0, k0, m).
    """
    layout = system.layout
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    xp = array_namespace(system.a00)
    pieces = []
    for (ell, k), coupling in zip(layout.rest_blocks, system.couplings):
        values = coupling.values
        grid = xp.swapaxes(values.reshape(values.shape[:-3] + (ell0, ell, k0, k)), -3, -2)
        pieces.append(grid.reshape(values.shape[:-3] + (ell0, k0, ell * k)))
    return xp.concatenate(pieces, axis=-1)


#: Largest dense coupling (ell0 * k0 * m entries, 8 bytes each) the algebra forms (on the host, or in a program).
DENSE_COUPLING_MAX_ENTRIES = 2**21
#: BLAS multiply-adds (single-threaded) that cost as much as one pair-product element's gather, multiply and
#: segment-sum: the break-even measured on crossed and slope models (benchmarks/RESULTS.md, 2026-12-01, "Host multi-term fits").
DENSE_COUPLING_FLOPS_PER_PAIR_ELEMENT = 100.0


def dense_coupling_pays(system: MixedModelSystem) -> bool:
    """Whether the algebra should use :func:`dense_coupling` rather than the coupling pairs.

    Decided on the host's costs (single-threaded BLAS against gathers and segment-sums) and used by
    compiled programs too (:func:`hierpool.algebra.criterion.coupling_in_program`), where the dense
    form is also the smaller program.

    The dense products cost ~1.5 ell0 k0 m^2 multiply-adds per evaluation (the update, a
    symmetric product, and its adjoint) whatever the sparsity; the pairs cost their elements
    twice (update and adjoint), each a gather, a multiply and a scatter, about a hundred BLAS
    multiply-adds' time.  So the dense form wins when few rest columns exist (a crossed factor
    of tens of levels, a vector term's coupling with X) or every term-0 level meets most of
    them, the pairs when a large crossed factor meets each term-0 level in a few columns.
    """
    if system.layout.dense_only:
        return True
    return _dense_pays(system.layout, sum(float(np.prod(pairs.products.shape)) for pairs in system.pairs))


def _dense_pays(layout: Layout, pair_elements: float) -> bool:
    """:func:`dense_coupling_pays` from the layout and the pair products' element count."""
    ell0, k0 = layout.n_levels[0], layout.ks[0]
    m = sum(ell * k for ell, k in layout.rest_blocks)
    if ell0 * k0 * m > DENSE_COUPLING_MAX_ENTRIES:
        return False
    return 1.5 * ell0 * k0 * m**2 <= DENSE_COUPLING_FLOPS_PER_PAIR_ELEMENT * 2.0 * pair_elements


def _pattern_pair_elements(pattern: SystemPattern) -> float:
    """The pair products' element count of systems filled from ``pattern`` (k0^2 k_r k_s per pair)."""
    ks = [k for _, k in pattern.layout.rest_blocks]
    k0 = pattern.layout.ks[0]
    return sum(float(len(a)) * k0 * k0 * ks[r] * ks[s]
               for (r, s), (a, _, _, _) in zip(pattern.layout.pair_keys(), pattern.pair_indices))


def program_values(system: MixedModelSystem) -> int:
    """How many values a compiled criterion of this system reads: its arrays, with the dense coupling
    (:func:`hierpool.algebra.criterion.coupling_in_program`) in place of the pairs where that form is used.

    A proxy for a program's run time per evaluation (not its flops), for deciding whether LLVM's
    optimization of it pays (``hierpool.bayesian.nuts.quick_compile``).
    """
    arrays = [system.a00, system.rest, *(a for c in system.couplings for a in (c.level0, c.level, c.values))]
    if dense_coupling_pays(system):
        layout = system.layout
        coupling = layout.n_levels[0] * layout.ks[0] * sum(ell * k for ell, k in layout.rest_blocks)
    else:
        coupling = sum(int(np.size(a)) for p in system.pairs for a in (p.level0, p.target, p.products))
    return coupling + sum(int(np.size(a)) for a in arrays)


def map_arrays(function, system: MixedModelSystem) -> MixedModelSystem:
    """``function`` applied to every array of the system (JAX's tree_map, without importing JAX)."""
    return MixedModelSystem(
        a00=function(system.a00),
        couplings=tuple(Coupling(function(c.level0), function(c.level), function(c.values)) for c in system.couplings),
        pairs=tuple(Pairs(function(p.level0), function(p.target), function(p.products)) for p in system.pairs),
        rest=function(system.rest),
        log_weights=function(system.log_weights),
        beta_shift=function(system.beta_shift),
        layout=system.layout,
    )


def on_host(system: MixedModelSystem) -> MixedModelSystem:
    """The same system with NumPy arrays (no copy on CPU): the input of the uncompiled algebra."""
    return map_arrays(np.asarray, system)


def _to_device(array) -> jax.Array:
    # device_put, not jnp.asarray: on a NumPy array jnp.asarray compiles a small conversion program
    # per shape (tens of ms each, two dozen arrays for a three-term model), device_put copies
    return array if isinstance(array, jax.Array) else jax.device_put(np.asarray(array))


def on_device(system: MixedModelSystem) -> MixedModelSystem:
    """The same system with JAX arrays: the input of compiled programs (copied once, not at every call)."""
    return map_arrays(_to_device, system)


def evaluation_flops(system: MixedModelSystem) -> float:
    """Rough floating-point operations of one criterion-and-gradient evaluation.

    The dense rest matrix (m = q_rest + p + 1) is factored and inverted (~1.5 m^3),
    the Schur update and its adjoint touch every coupling pair's products twice, and
    term 0's blocks cost ell0 k0^3 a few times over.  Used to choose between the
    host and a compiled program (:func:`hierpool.algebra.compiler_options.compile_pays`).
    """
    return _evaluation_flops(system.layout, sum(float(np.prod(pairs.products.shape)) for pairs in system.pairs))


def pattern_evaluation_flops(pattern: SystemPattern) -> float:
    """:func:`evaluation_flops` of the systems :func:`build_system` fills from ``pattern`` (none is built)."""
    return _evaluation_flops(pattern.layout, _pattern_pair_elements(pattern))


def _evaluation_flops(layout: Layout, pair_elements: float) -> float:
    m = layout.q_rest + layout.p + 1
    return 1.5 * m**3 + 4.0 * pair_elements + 10.0 * layout.n_levels[0] * layout.ks[0] ** 3
