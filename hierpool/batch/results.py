"""Results of a batch fit: one row per dataset, long tables with a column of the dataset labels, named as ``by``."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..algebra.varcorr import coef_pairs, varcorr_table
from ..errors import ArgumentError


def term_parameter_names(group: str, coef_names) -> tuple[list[str], list[str]]:
    """A term's parameter columns in :meth:`BatchResult.to_frame` (and ``hp.bootstrap``): ``sd_<group>_<coef>`` per
    coefficient, ``cor_<group>_<a>_<b>`` per pair in R's ``lower.tri`` order (:func:`coef_pairs`)."""
    sds = [f"sd_{group}_{name}" for name in coef_names]
    cors = [f"cor_{group}_{coef_names[i]}_{coef_names[j]}" for i, j in coef_pairs(len(coef_names))]
    return sds, cors


#: The columns of :meth:`BatchResult.to_frame` that are not a fixed effect's or a term's parameter (the first, the
#: dataset labels', is named as ``by``: :func:`dataset_column`).
TABLE_COLUMNS = ("dataset", "objective", "converged", "refit", "is_singular", "message", "sigma", "phi", "shape")


#: The key columns of a batch's long tables beside the dataset labels' (ranef's, varcorr's, hyperparameters').
KEY_COLUMNS = ("grpvar", "term", "grp", "var1", "var2", "vcov", "sdcor", "condval", "condsd", "parameter")


def check_by_name(by, caller: str, summary_columns=()) -> None:
    """Refuse a ``by`` that names a column of the batch's tables besides the labels' own (:data:`TABLE_COLUMNS`,
    :data:`KEY_COLUMNS`; bayes_batch's ``summary_columns``): the labels' column is named as ``by``, and a table with
    two columns of one name would give the labels for the criterion or the term (or the reverse)."""
    reserved = set(TABLE_COLUMNS[1:]) | set(KEY_COLUMNS) | set(summary_columns)
    if isinstance(by, str) and by in reserved:
        raise ArgumentError(f"{caller}: by={by!r} names a column of the batch's result tables, which name the "
                            f"datasets' column as by; rename that column of the data (reserved: {sorted(reserved)})")


def dataset_column(datasets: pd.Index) -> str:
    """The name of the dataset labels' column in a batch's long tables and ``to_frame()``: the ``by`` the batch was
    given (the name of its index of datasets, as ``fixef``'s index is named), ``"dataset"`` where it has none."""
    return "dataset" if datasets.name is None else str(datasets.name)


def check_table_names(fixed_names, caller: str) -> None:
    """Refuse fixed effects named as a column of :meth:`BatchResult.to_frame` (``sigma``, ``message``, ...): one
    column per name, a fixed effect would be overwritten by a status column or a parameter (``hp.bootstrap``'s
    estimates too, whose residual sigma replaced a covariate named sigma)."""
    clash = [name for name in fixed_names if name in TABLE_COLUMNS or f"se_{name}" in TABLE_COLUMNS]
    if clash:
        raise ArgumentError(f"{caller}: the fixed effect(s) {clash} share a name with a column of the batch's table "
                            f"({sorted(TABLE_COLUMNS)}); rename the data's column")


def named_columns(pairs, caller: str) -> dict:
    """{name: values} of a table's (name, values) pairs, refusing a name given twice by name: a fixed effect named as
    another column (``se_x`` beside x's standard error ``se_x``, ``sd_g_Intercept`` beside the term's sd, a ``by``
    column named ``Intercept``) overwrote one of the two silently."""
    columns: dict = {}
    twice = []
    for name, values in pairs:
        if name in columns:
            twice.append(name)
        columns[name] = values
    if twice:
        raise ArgumentError(f"{caller}: two of the table's columns would be named {sorted(set(twice))} (a fixed "
                            "effect, or the by= column, named as another column: se_<name> is a fixed effect's "
                            "standard error, sd_<group>_<coef> and cor_<group>_<a>_<b> a term's parameters); rename "
                            "the data's column")
    return columns


class Pieces(Sequence):
    """The consecutive pieces ``values[starts[i]:starts[i + 1]]`` of one array, read as a list of them (each a view,
    made when read): a batch's per-dataset level labels or conditional sds without 100,000 arrays split out at once
    (benchmarks/RESULTS.md, forty-fifth session)."""

    def __init__(self, values: np.ndarray, starts: np.ndarray):
        self.values, self.starts = values, np.asarray(starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = _item_index(index, len(self))
        return self.values[self.starts[i]:self.starts[i + 1]]


def _item_index(index, length: int) -> int:
    """A sequence's item ``index`` (an integer, negative from the end) as a position in 0 .. length - 1."""
    i = operator.index(index)
    i += length if i < 0 else 0
    if not 0 <= i < length:
        raise IndexError(f"item {index} of {length}")
    return i


class NanRows(Sequence):
    """Per-dataset arrays of a batch (BLUPs, conditional variances, relative factors), NaN until a fit fills them,
    read as a list of them: dataset d's is the first ``n_levels[d]`` rows of a block shared by the datasets of its
    width (``widths[d]`` >= ``n_levels[d]``: its bucket's padded level count, or by default its own count, no padding),
    each block allocated once and filled a chunk at a time by :meth:`write`, not allocated and assigned dataset by
    dataset (benchmarks/RESULTS.md, forty-fifth session).

    Item d is a view of its block, made when read, as :class:`Pieces`' are: no list of 100,000 views is built, and
    :func:`end_to_end` reads the blocks whole (benchmarks/RESULTS.md, forty-ninth session).  Assigning item d (a
    refit's values, a failed fit's NaN) writes them into its block; values of another shape or dtype (a float32
    batch's row refitted in float64) are kept as they are, beside the blocks."""

    def __init__(self, n_levels, shape: tuple, widths=None, dtype=np.float64):
        self.n_levels = np.asarray(n_levels, dtype=np.int64)
        self.widths = self.n_levels if widths is None else np.asarray(widths, dtype=np.int64)
        self.shape = tuple(shape)
        self.position = np.zeros(len(self.n_levels), dtype=np.int64)
        self.blocks: dict[int, np.ndarray] = {}
        self.members: dict[int, np.ndarray] = {}  # each width's datasets, in order (its block's rows)
        self.kept: dict[int, np.ndarray] = {}  # items assigned with another shape or dtype than their block's
        order = np.argsort(self.widths, kind="stable")  # each width's datasets a run of one sort, not a scan a width
        found, first = np.unique(self.widths[order], return_index=True)
        for width, members in zip(found, np.split(order, first[1:])):
            self.blocks[int(width)] = np.full((len(members), int(width)) + self.shape, np.nan, dtype=dtype)
            self.members[int(width)] = members
            self.position[members] = np.arange(len(members))

    def __len__(self) -> int:
        return len(self.n_levels)

    def _view(self, d: int) -> np.ndarray:
        return self.blocks[int(self.widths[d])][self.position[d], :self.n_levels[d]]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        d = _item_index(index, len(self))
        return self.kept[d] if d in self.kept else self._view(d)

    def __setitem__(self, index, value) -> None:
        d = _item_index(index, len(self))
        view, value = self._view(d), np.asarray(value)
        if value.shape == view.shape and value.dtype == view.dtype:
            view[...] = value
            self.kept.pop(d, None)
        else:
            self.kept[d] = value

    def write(self, members: np.ndarray, values: np.ndarray) -> None:
        """``values`` (len(members), w, ...) into the datasets ``members``' rows: all of one width, w at most it (a
        chunk's padded levels beyond a dataset's own count land outside its view)."""
        block = self.blocks[int(self.widths[members[0]])]
        block[self.position[members], :values.shape[1]] = values
        if self.kept:
            for d in self.kept.keys() & set(np.asarray(members).tolist()):
                del self.kept[d]

    def laid_out(self) -> np.ndarray:
        """Every dataset's rows end to end, in the datasets' order (:func:`end_to_end`): one block without padding
        is itself (a view), the others gathered a block at a time."""
        if len(self.blocks) == 1 and not self.kept:
            (width, block), = self.blocks.items()
            if np.all(self.n_levels == width):
                return block.reshape((-1,) + self.shape)
        if self.kept:  # (rare: a float32 batch's refitted rows) item by item, as a list's
            return np.concatenate([np.asarray(self[d]) for d in range(len(self))]) if len(self) else \
                np.zeros((0,) + self.shape)
        starts = np.cumsum(self.n_levels) - self.n_levels
        out = np.empty((int(self.n_levels.sum()),) + self.shape,
                       dtype=np.result_type(*self.blocks.values()) if self.blocks else np.float64)
        for width, block in self.blocks.items():
            members = self.members[width]
            counts = self.n_levels[members]
            own = np.arange(width)[None, :] < counts[:, None]  # each row's own levels, not its padding
            into = np.arange(int(counts.sum())) + np.repeat(starts[members] - (np.cumsum(counts) - counts), counts)
            out[into] = block[own]
        return out


@dataclass(frozen=True)
class BatchTerm:
    """One random-effect term's results over a batch.

    Attributes
    ----------
    group : str
        The grouping factor.
    coef_names : tuple of str
    covariance : (B, k, k) ndarray
        The random-effect covariance Sigma per dataset (NaN where the fit failed).
    levels : sequence of ndarray (a list, or :class:`Pieces` of one array)
        Each dataset's level labels.
    b, cond_sd : sequences of (ell_d, k) ndarrays (lists, :class:`NanRows` or :class:`Pieces` of one array: read
        by index, slice or iteration; ``list(b)`` for a list's methods)
        BLUPs and lme4's conditional sds per dataset.
    """

    group: str
    coef_names: tuple[str, ...]
    covariance: np.ndarray
    levels: Sequence
    b: Sequence
    cond_sd: Sequence

    @property
    def k(self) -> int:
        return len(self.coef_names)

    def ranef(self, datasets: pd.Index) -> pd.DataFrame:
        """This term's rows of :attr:`BatchResult.ranef`, the labels ``datasets`` in a column named as they are.

        Per dataset, the levels of coefficient 0, then of coefficient 1, ... (hp.lmm's order).  Every column is one
        gather from the datasets' values laid end to end (:func:`end_to_end`), not a piece per dataset (a loop over
        100,000 datasets' pieces: benchmarks/RESULTS.md, forty-seventh session)."""
        k = self.k
        levels, counts = end_to_end(self.levels, dtype=object)
        b, sd = end_to_end(self.b)[0].reshape(-1, k), end_to_end(self.cond_sd)[0].reshape(-1, k)
        first = np.cumsum(counts) - counts  # each dataset's first row in the laid-out values
        sizes = counts * k  # each dataset's rows of the table
        dataset = np.repeat(np.arange(len(counts)), sizes)
        position = np.arange(int(sizes.sum())) - np.repeat(first * k, sizes)  # a table row's place in its dataset's
        coef = position // np.maximum(counts[dataset], 1)
        row = first[dataset] + position - coef * counts[dataset]
        return pd.DataFrame({
            dataset_column(datasets): np.asarray(datasets)[dataset],
            "grpvar": self.group,
            "term": np.asarray(self.coef_names, dtype=object)[coef],
            "grp": levels[row],
            "condval": b[row, coef],
            "condsd": sd[row, coef],
        })


def end_to_end(pieces, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(the pieces laid end to end, each piece's length): a :class:`Pieces`' own array, read without splitting it, a
    :class:`NanRows`' blocks read whole, or a list's arrays concatenated.  ``dtype=object`` converts each list item
    before they meet, so that one dataset's integer labels and another's strings stay as they are (NumPy would make
    both strings); arrays of one dtype are concatenated first and converted once."""
    if isinstance(pieces, Pieces):
        values = pieces.values[pieces.starts[0]:pieces.starts[-1]]
        return (values if dtype is None else np.asarray(values, dtype=dtype)), np.diff(pieces.starts)
    if isinstance(pieces, NanRows):
        values = pieces.laid_out()
        # (an item kept beside its block may hold another count of rows than its dataset's levels)
        counts = pieces.n_levels.copy()
        for d, item in pieces.kept.items():
            counts[d] = len(item)
        return (values if dtype is None else values.astype(dtype)), counts
    counts = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    if not len(pieces):
        return np.zeros(0, dtype=dtype or float), counts
    if len({getattr(piece, "dtype", None) for piece in pieces} - {None}) == 1 and \
            all(isinstance(piece, np.ndarray) for piece in pieces):
        values = np.concatenate(pieces)
        return (values if dtype is None else values.astype(dtype)), counts
    return np.concatenate([np.asarray(piece, dtype=dtype) for piece in pieces]), counts


@dataclass(frozen=True)
class BatchResult:
    """Per-dataset fits of one model (``hp.fit_batch``).

    Attributes
    ----------
    datasets : pandas.Index
        The dataset labels, in result order: every dataset passed, one with no rows left to fit too (its numbers NaN,
        its reason in ``messages``).
    fixed_names : tuple of str
    terms : tuple of BatchTerm
        Per random-effect term, in the batch's order (the long frame's, lme4's by level count):
        grouping factor, coefficients, covariances, levels, BLUPs and conditional sds per dataset.
        With one term, ``group``, ``coef_names``, ``covariance``, ``levels``, ``b`` and ``cond_sd``
        are its.
    theta : (B, m) ndarray
        lme4's theta per dataset, term by term in the order of ``terms`` (NaN where the fit failed).
    objective : pandas.Series
        REML criterion (or -2 log-likelihood) per dataset.
    converged : pandas.Series of bool
        Whether the dataset's optimizer converged: the batched one's, or, where
        ``refit`` is True, ``hp.lmm``'s.
    refit : pandas.Series of bool
        True where the batched optimizer did not converge (or, with several terms, a dataset was too
        large to batch) and the row holds a refit by ``hp.lmm`` (``polish=True``) instead of the batched
        results.  ``refit.any()`` says the batched optimizer failed somewhere even when ``converged.all()``.
    is_singular : pandas.Series of bool
    messages : pandas.Series of str
        Why a dataset failed or was refitted, or the single fit's warning on a fit kept (phi at the edge of its
        range with AR(1) residuals; complete separation in a GLMM); empty when all went well.
    beta, beta_se : (B, p) ndarrays
    sigma : (B,) ndarray
        The residual sd per dataset (NaN where the fit failed).  With known residual sds (``sigma_known``)
        it is not estimated: 1 for every fitted dataset, as ``hp.lmm(..., se=)``'s ``sigma``.
    reml : bool
    sigma_known : bool
        The residual sds are known (``se=``): ``varcorr`` has no ``Residual`` rows and
        ``to_frame()`` no ``sigma`` column, as ``hp.lmm``'s ``varcorr`` has no ``Residual`` row.
    phi : (B,) ndarray or None
        Each dataset's AR(1) correlation (``correlation=``; a ``phi`` column of ``to_frame()``), else None.
    shape : (B,) ndarray or None
        Each dataset's negative binomial shape (``family="negative_binomial"``; a ``shape`` column of
        ``to_frame()``), else None.
    hyperparameters : pandas.DataFrame or None
        A spatial batch's parameters (``car()`` terms), one row per dataset: each fit's
        ``hyperparameters()`` (the spatial terms' sd and mixing parameter, the ``(lhs | g)`` terms' sds and
        correlations, sigma for a Gaussian response), which ``to_frame()`` gives in place of the sds and
        correlations; else None.  ``theta`` then holds each fit's psi, ``terms`` the spatial terms (their
        areas' effects, covariance sd^2) before the ``(lhs | g)`` terms, and there is no ``varcorr`` (as
        the single spatial fit has none).
    """

    datasets: pd.Index
    fixed_names: tuple[str, ...]
    terms: tuple[BatchTerm, ...]
    theta: np.ndarray
    objective: pd.Series
    converged: pd.Series
    refit: pd.Series
    is_singular: pd.Series
    messages: pd.Series
    beta: np.ndarray
    beta_se: np.ndarray
    sigma: np.ndarray
    reml: bool
    sigma_known: bool = False
    phi: np.ndarray | None = None
    shape: np.ndarray | None = None
    hyperparameters: pd.DataFrame | None = None

    def _only_term(self) -> BatchTerm:
        if len(self.terms) != 1:
            from ..errors import ArgumentError

            raise ArgumentError(f"this batch has {len(self.terms)} random-effect terms "
                                f"({', '.join(t.group for t in self.terms)}): use result.terms[j]")
        return self.terms[0]

    group = property(lambda self: self._only_term().group, doc="The grouping factor (one-term batches).")
    coef_names = property(lambda self: self._only_term().coef_names, doc="The term's coefficients (one term).")
    covariance = property(lambda self: self._only_term().covariance, doc="(B, k, k) Sigma per dataset (one term).")
    levels = property(lambda self: self._only_term().levels, doc="Each dataset's level labels (one term).")
    b = property(lambda self: self._only_term().b, doc="BLUPs per dataset (one term).")
    cond_sd = property(lambda self: self._only_term().cond_sd, doc="Conditional sds per dataset (one term).")

    @property
    def fixef(self) -> pd.DataFrame:
        """Fixed effects, one row per dataset."""
        return pd.DataFrame(self.beta, index=self.datasets, columns=list(self.fixed_names))

    @property
    def fixef_se(self) -> pd.DataFrame:
        """Standard errors of the fixed effects, one row per dataset."""
        return pd.DataFrame(self.beta_se, index=self.datasets, columns=list(self.fixed_names))

    @property
    def varcorr(self) -> pd.DataFrame:
        """``as.data.frame(VarCorr(fit))`` of every dataset, with a column of the dataset labels named as ``by``.

        ``hp.lmm``'s table (:func:`~hierpool.algebra.varcorr.varcorr_table`) per dataset, one after
        another, every term's rows in the order of ``terms``; ``var1`` and ``var2`` are object columns
        holding None where empty.  No ``Residual`` rows with known residual sds (``sigma_known``).
        """
        if self.hyperparameters is not None:
            raise ArgumentError("a spatial batch (car() terms) has no VarCorr table, as hp.lmm's spatial fit has "
                                "none: its parameters are result.hyperparameters (and columns of to_frame())")
        sigma = None if self.sigma_known else self.sigma
        return varcorr_table([(t.group, t.coef_names, t.covariance) for t in self.terms], sigma,
                             by=(dataset_column(self.datasets), self.datasets), object_keys=True, phi=self.phi)

    @property
    def ranef(self) -> pd.DataFrame:
        """BLUPs and conditional sds, as ``LMMResult.ranef``, with a column of the dataset labels named as ``by``
        (term by term)."""
        return pd.concat([t.ranef(self.datasets) for t in self.terms], ignore_index=True)

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per dataset: its label (a column named as ``by``), status, criterion, fixed effects and their
        ses, sds, correlations, sigma.

        The sds and correlations of every term are named by :func:`term_parameter_names`.  No ``sigma``
        column with known residual sds (``sigma_known``): sigma is not a parameter then.
        """
        check_table_names(self.fixed_names, "to_frame")
        pairs = [(dataset_column(self.datasets), self.datasets), ("objective", self.objective.to_numpy()),
                 ("converged", self.converged.to_numpy()), ("refit", self.refit.to_numpy()),
                 ("is_singular", self.is_singular.to_numpy()), ("message", self.messages.to_numpy())]
        for j, name in enumerate(self.fixed_names):
            pairs += [(name, self.beta[:, j]), (f"se_{name}", self.beta_se[:, j])]
        if self.hyperparameters is not None:  # a spatial batch: the single fits' named parameters
            pairs += [(name, self.hyperparameters[name].to_numpy()) for name in self.hyperparameters.columns]
            return pd.DataFrame(named_columns(pairs, "to_frame"))
        # sds, correlations of each term in turn[, sigma], as varcorr's rows
        sdcor = self.varcorr["sdcor"].to_numpy().reshape(len(self.datasets), -1)
        names = [name for term in self.terms for part in term_parameter_names(term.group, term.coef_names)
                 for name in part]
        pairs += [(name, sdcor[:, column]) for column, name in enumerate(names)]
        if not self.sigma_known:
            pairs.append(("sigma", self.sigma))
        if self.phi is not None:
            pairs.append(("phi", self.phi))
        if self.shape is not None:
            pairs.append(("shape", self.shape))
        return pd.DataFrame(named_columns(pairs, "to_frame"))

    def __repr__(self) -> str:
        failed = int((~self.converged).sum())
        return (f"BatchResult: {len(self.datasets)} datasets, {'REML' if self.reml else 'ML'}; "
                f"{failed} not converged, {int(self.refit.sum())} refitted alone, "
                f"{int(self.is_singular.sum())} singular")
