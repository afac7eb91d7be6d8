"""``hp.fit_batch(formula, data, responses=Y)``: many responses on one design (lme4's ``refit(fit, newresp)``).

A simulation study of a design, a power analysis, a parametric bootstrap, or one model per gene measured on the
same samples fits one formula to D responses on the same rows: ``data`` holds the design (one dataset's rows), and
``responses`` the D responses, one column each (an array, or a DataFrame whose column labels name the datasets).
The long frame of D copies of ``data`` is then never built: the design is read, checked and refused once, and a
linear mixed model with independent residuals takes what depends on the responses as matrix products of the design
with them: one term's sufficient statistics (:func:`hierpool.algebra.statistics.shared_design_statistics`), several
terms' systems (:func:`hierpool.algebra.batched_systems.shared_design_systems`) and moments' start
(:meth:`SharedDesignPlan.term_moments`), each equal to those of the dataset's rows in the long frame.  The search,
the solutions, the refits and the result are the long frame's (:func:`hierpool.batch.fit.fit_batch`,
:func:`hierpool.batch.fit_terms.fit_terms`), on a :class:`SharedDesignPlan`: a
:class:`~hierpool.batch.plan.BatchPlan` whose datasets all have the design's rows.

Other models (AR(1) residuals, a GLMM, a relationship matrix or spatial terms, a design that reads the response
besides: :func:`response_read_elsewhere`) are fitted on the long frame, built here from the responses
(:func:`responses_long_frame`): the same results, without the shortcut.

The reverse holds too: a long frame whose datasets share one design (``hp.simulate``'s replicates stacked, a
simulation study's datasets; or those datasets as a list or dict of frames) is such a batch, found by
:func:`one_design_in_long_frame` and fitted by the same
matrix products (``hp.fit_batch``'s linear mixed models; the others keep the long frame).  Where every dataset is
fitted that gives the long frame's own rows, to rounding; a dataset the single fit refuses leaves the batch to the
long frame, whose refusals are worded per dataset.

The response must be a column name in the formula (a transformed one, ``log(y)``, would leave unclear whether the
responses hold y or log y).  On the shared path a missing response (at a row the design keeps) is refused for the
call: a dataset with rows of its own is a long frame's (``by=``); the long frame's models drop it for its dataset
alone.  A response ``hp.lmm`` refuses (infinite, beyond 1e150 or too small to square, one value) is refused in its
row, in ``hp.lmm``'s words.  Rows of ``data`` missing a value the design reads are dropped for every dataset
(counted in ``hp.lmm``'s warning).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from ..algebra.batched_systems import shared_design_systems
from ..algebra.checks import fit_magnitudes
from ..algebra.linalg import theta_start, weights_unit
from ..algebra.search.newton import MOMENT_FLOOR
from ..algebra.start import known_sds_size, moment_theta
from ..algebra.statistics import (
    level_cells,
    shared_design_statistics,
    shared_location_shifts,
)
from ..algebra.system import grouped_products
from ..errors import ArgumentError, DataError, HierpoolError
from ..spec.design import LARGEST_VALUE, RESPONSE_SMALLEST, underflowing
from ..spec.formula import parse_formula
from ..spec.transforms import unvouched_calls
from .conditioning import BatchConditioning, condition_batch
from .near_exact import near_exact_responses
from .plan import (
    BatchPlan,
    EveryDatasetRefused,
    bucket_width,
    dataset_labels_of,
    every_refused,
    free_name,
    merge_terms,
    plan_batch,
    single_fit_refusal,
)

#: The datasets' column of the one-dataset frame that the design is built from (a name no formula can read).
DESIGN_DATASET = "(design)"


@dataclass(frozen=True)
class Responses:
    """``responses=`` read: the values (rows of ``data``, datasets) as floats, the datasets' labels, and the response's
    column name in the formula."""

    values: np.ndarray
    labels: pd.Index
    column: str

    @property
    def n_datasets(self) -> int:
        return len(self.labels)


def response_read_elsewhere(formula: str, column: str, weights=None, offset=None, se=None) -> str:
    """Where the model reads its response ``column`` besides as the response ("" where nowhere): on the formula's
    right-hand side (``y ~ x + I(y > 1)``, ``offset(0.5 * y)``), or as the weights, offset or se column.  The
    shared design is built on a placeholder response: such a model is fitted on the long frame."""
    named = [name for name, value in (("weights", weights), ("offset", offset), ("se", se))
             if isinstance(value, str) and value == column]
    if named:
        return f"as {named[0]}="
    right = formula.split("~", 1)[1] if "~" in formula else ""
    if re.search(rf"(?<![\w.]){re.escape(column)}(?!\w)", _QUOTED.sub("''", right)):
        return "on the formula's right-hand side"
    return ""


#: Quoted text in a formula (a keyword's value, a level's label), which names no column.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def read_responses(formula: str, data, responses, by: str, binomial: bool = False, gaussian: bool = True) -> Responses:
    """Check ``responses=`` against ``data`` and the formula (module notes) and read it.

    Raises
    ------
    ArgumentError
        Where ``data`` is not one DataFrame, ``responses`` is not two-dimensional with one row per row of ``data``
        (a DataFrame's index must be ``data``'s), has no column, repeats a label or holds other than numbers; where
        the formula's response is not a column name, or ``by`` is given (the datasets are the responses' columns).
        Complex numbers are refused, and with ``gaussian`` (a linear mixed model's response) true/false values, as
        ``hp.lmm`` refuses them.
    """
    if not isinstance(data, pd.DataFrame):
        raise ArgumentError(f"responses= needs data as one DataFrame (the design's rows), got {type(data).__name__}")
    if by != "dataset":
        raise ArgumentError(f"by={by!r} with responses=: the datasets are the responses' columns, and data holds one "
                            "design's rows (no dataset column)")
    spec = parse_formula(formula, binomial_counts=binomial, random_optional=True)
    column = spec.response
    if not column.isidentifier() and column not in data.columns:
        raise ArgumentError(f"responses= holds the values of the formula's response, which must then be a column "
                            f"name, got {column!r}: compute it into each column of responses and name it in the "
                            "formula")
    if isinstance(responses, pd.DataFrame):
        if not responses.index.equals(data.index):
            raise ArgumentError("responses as a DataFrame must have data's index (its rows are data's rows)")
        labels = pd.Index(responses.columns, name=responses.columns.name or "dataset", tupleize_cols=False)
        kinds = [name for name, dtype in responses.dtypes.items() if not _numbers(dtype, gaussian)]
        if kinds:
            raise ArgumentError(f"responses column {kinds[0]!r} holds other than numbers ({responses[kinds[0]].dtype})")
        values = responses.to_numpy(dtype=float, na_value=np.nan)
    else:
        given = responses if isinstance(responses, np.ndarray) else np.asarray(responses)
        if given.dtype != object and not _numbers(given.dtype, gaussian):
            raise ArgumentError(f"responses holds other than numbers ({given.dtype})")
        try:
            values = np.asarray(given, dtype=float)
        except (TypeError, ValueError) as error:
            raise ArgumentError(f"responses must be numbers, one column per dataset: {error}") from None
        if values.ndim == 2:
            labels = pd.RangeIndex(values.shape[1], name="dataset")
    if values.ndim != 2 or values.shape[0] != len(data):
        raise ArgumentError(f"responses must be two-dimensional, one row per row of data ({len(data)}) and one column "
                            f"per dataset, got shape {values.shape}")
    if not values.shape[1]:
        raise ArgumentError("responses has no column: no dataset to fit")
    if labels.has_duplicates:
        raise ArgumentError(f"responses repeats the dataset label {labels[labels.duplicated()][0]!r}")
    return Responses(values, labels, column)


def responses_long_frame(data: pd.DataFrame, responses: Responses, weights, offset):
    """(the long frame, its ``by`` column, weights, offset): ``data``'s rows once per dataset, the response column
    each dataset's own, for the models that are fitted on a long frame (module notes).  Array weights and offsets
    are repeated with the rows."""
    n, n_datasets = len(data), responses.n_datasets
    by = free_name(responses.labels.name or "dataset", data.columns)  # (the labels' name, unless data has one)
    frame = data.iloc[np.tile(np.arange(n), n_datasets)].reset_index(drop=True)
    frame[responses.column] = responses.values.T.ravel()
    frame[by] = np.repeat(responses.labels.to_numpy(), n)

    def repeated(value):
        return value if value is None or isinstance(value, str) else np.tile(np.asarray(value), n_datasets)

    return frame, by, repeated(weights), repeated(offset)


def one_design_in_long_frame(formula: str, data, by: str, weights=None, offset=None,
                             se: str | None = None) -> tuple[pd.DataFrame, Responses] | None:
    """(the design, the responses) of a batch's datasets that all share one design, else None: the long frame of a
    simulation study or a bootstrap (or its datasets as a list or dict of frames), fitted by
    :func:`shared_design_plan`'s matrix products as ``responses=`` would fit it (``hp.fit_batch`` of a linear mixed
    model with independent residuals, module notes).

    Taken as one design only where that gives the long frame's own results: every dataset as many rows (a long
    frame's each a run of the ``by`` column, in the order of the labels' first appearance: the batch's row order),
    every column the formula reads besides the response (and the weights, offset and se columns named) the same in
    every dataset, row by row (of one dtype, floats bit for bit), with no value missing, and the response a column of
    finite numbers.  Anything else (row arrays of weights or offsets, a response read twice, a user's function, an
    unreadable kind) is left to the long frame, whose checks name it (a column held twice, values pandas cannot
    compare or hash, a formula it refuses).  The labels are the long frame's
    (:func:`~hierpool.batch.plan.dataset_labels_of`).
    """
    if not isinstance(by, str) or any(value is not None and not isinstance(value, str)
                                      for value in (weights, offset, se)):
        return None
    frames = [data] if isinstance(data, pd.DataFrame) else list(data.values()) if isinstance(data, dict) \
        else list(data) if isinstance(data, (list, tuple)) else None
    if not frames or not all(isinstance(frame, pd.DataFrame) and not isinstance(frame.columns, pd.MultiIndex)
                             and frame.columns.is_unique for frame in frames):
        return None
    try:
        spec = parse_formula(formula, random_optional=True)
        column = spec.response
        # a response read elsewhere in the model (the design is built on a placeholder response), or a user's
        # function (the long frame gives each dataset's rows its own values: batch.dataset_transforms)
        if response_read_elsewhere(formula, column, weights, offset, se) or unvouched_calls(formula) \
                or not column.isidentifier():
            return None
        read = list(dict.fromkeys([v for v in spec.variables if v != column]
                                  + [c for c in (weights, offset, se) if isinstance(c, str)]))
        if column in read or by in read + [column]:
            return None
        if isinstance(data, pd.DataFrame):
            return _one_design_of_frame(data, by, column, read)
        return _one_design_of_frames(frames, dataset_labels_of(data, by), by, column, read)
    except (HierpoolError, TypeError, ValueError):
        return None


def _one_design_of_frame(data: pd.DataFrame, by: str, column: str, read: list):
    """:func:`one_design_in_long_frame` of one long frame."""
    if by not in data.columns or column not in data.columns or any(name not in data.columns for name in read) \
            or len(data) < 2:
        return None
    labels = dataset_labels_of(data, by)
    n_datasets = len(labels)
    n = len(data) // n_datasets
    if n_datasets < 2 or n * n_datasets != len(data):
        return None
    response = data[column]
    if not _numbers(response.dtype):
        return None
    values = response.to_numpy(dtype=float, na_value=np.nan).reshape(n_datasets, n)
    if not np.isfinite(values).all():
        return None
    # no value missing in dataset 0's rows; one missing elsewhere then differs from them (or cannot be compared)
    if any(not _comparable_kind(data[name].dtype) or data[name].iloc[:n].isna().any() for name in read):
        return None
    # dataset 1 and the last against dataset 0 first: a long frame of datasets with designs of their own is told
    # apart without reading every row
    for block in (slice(n, 2 * n), slice(len(data) - n, len(data))):
        if not all(_runs_alike(data[name].iloc[block], 1, n, data[name].iloc[:n]) for name in read):
            return None
    if not np.array_equal(np.asarray(data[by].iloc[::n]), np.asarray(labels)):
        return None
    if not _runs_alike(data[by], n_datasets, n, each_constant=True) or \
            not all(_runs_alike(data[name], n_datasets, n) for name in read):
        return None
    design = data.iloc[:n][read + [column]].reset_index(drop=True)
    return design, Responses(np.ascontiguousarray(values.T), labels, column)


def _one_design_of_frames(frames: list, labels: pd.Index, by: str, column: str, read: list):
    """:func:`one_design_in_long_frame` of the datasets as frames (a list's or a dict's; a missing key, which the
    long frame refuses by name, left to it)."""
    first = frames[0]
    n = len(first)
    if len(frames) < 2 or not n or len(labels) != len(frames) or labels.isna().any():
        return None
    # the second and the last frame first: datasets of designs of their own are told apart at once
    for frame in (frames[1], frames[-1], *frames):
        if len(frame) != n or by in frame.columns or column not in frame.columns or \
                any(name not in frame.columns for name in read):
            return None
    if any(not _comparable_kind(first[name].dtype) or first[name].isna().any() for name in read):
        return None
    kinds = {name: first[name].dtype for name in read}
    reference = {name: _run_values(first[name]) for name in read}
    responses = []
    for frame in (frames[1], frames[-1]):
        if any(frame[name].dtype != kinds[name] or not np.array_equal(_run_values(frame[name]), reference[name])
               for name in read):
            return None
    for frame in frames:  # (each column taken once: a frame's column access is pandas' slowest step here)
        response = frame[column]
        if not _numbers(response.dtype):
            return None
        responses.append(response.to_numpy(dtype=float, na_value=np.nan))
        for name in read:  # (one dtype: a category's codes mean one thing in each, a float's bits compare alike)
            values = frame[name]
            if values.dtype != kinds[name] or not np.array_equal(_run_values(values), reference[name]):
                return None
    values = np.column_stack(responses)
    if not np.isfinite(values).all():
        return None
    design = first[read + [column]].reset_index(drop=True)
    return design, Responses(values, labels, column)


def _numbers(dtype, gaussian: bool = True) -> bool:
    """A response's kind the model reads as it is: numbers, not complex (NumPy would keep the real part, with a
    warning), and for a linear mixed model (``gaussian``) not true/false, which ``hp.lmm`` refuses."""
    return (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
            and not (gaussian and pd.api.types.is_bool_dtype(dtype)))


def _comparable_kind(dtype) -> bool:
    """Numbers, text or categories: kinds whose values (a category's code) ``==`` tells apart exactly; an object
    column (1, 1.0 and True alike) is left to the long frame."""
    return ((pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype))
            or isinstance(dtype, (pd.StringDtype, pd.CategoricalDtype)))


def _run_values(series: pd.Series) -> np.ndarray:
    """A column's values as NumPy compares them: a category's code (one per category over the column), else its
    values (text as objects, compared as strings)."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy()
    values = series.to_numpy()
    if values.dtype.kind == "f":  # bit for bit: -0.0 == 0.0, which a formula may tell apart (np.signbit(x), 1 / x)
        return values.view(f"i{values.dtype.itemsize}")
    return values


def _runs_alike(series: pd.Series, n_datasets: int, n: int, first: pd.Series | None = None,
                each_constant: bool = False) -> bool:
    """Whether every run of ``n`` rows of a column is its first run (or ``first``), row by row; ``each_constant``:
    whether each run holds one value (the ``by`` column's).  A value that cannot be compared (pandas' NA) is not
    alike."""
    runs = _run_values(series).reshape(n_datasets, n)
    reference = runs[:, :1] if each_constant else runs[:1] if first is None else _run_values(first)[None]
    try:
        if runs.dtype == object and reference.dtype == object:
            return _texts_alike(runs, reference)
        return bool(np.all(runs == reference))
    except (TypeError, ValueError):
        return False


def _texts_alike(runs: np.ndarray, reference: np.ndarray) -> bool:
    """``runs == reference`` everywhere (``reference`` broadcast against ``runs``), for a text column's objects:
    where a value is the very object of the reference (a long frame built by repeating one frame's column shares its
    strings: ``hp.simulate``'s, ``sleepstudy_replicates``') the two pointers compare, the others by ``==``.  (A
    string is equal to itself; the column's kinds are text, :func:`_comparable_kind`.)  Timed in
    benchmarks/RESULTS.md, forty-eighth session."""
    def pointers(values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values)  # (runs is; the reference a row or a column of it, small)
        return np.frombuffer(values, dtype=np.intp).reshape(values.shape)

    rows, columns = np.nonzero(pointers(runs) != pointers(reference))
    wide = np.broadcast_to(reference, runs.shape)
    return bool(np.all(runs[rows, columns] == wide[rows, columns]))


@dataclass(frozen=True)
class SharedDesignPlan(BatchPlan):
    """A batch whose datasets share one design (``data``'s rows) and differ in their responses: the one-dataset plan
    of the design (:attr:`single`), broadcast.  ``dataset`` is None (no row belongs to one dataset): a use of it
    fails, where a plan method not written for a shared design would otherwise read the wrong rows."""

    single: BatchPlan | None = None
    responses: Responses | None = None
    near_exact: tuple[tuple[int, str], ...] = ()  # (dataset, why): responses X fits to rounding (near_exact)

    @property
    def fitted_alone(self) -> dict:
        """The datasets ``hp.fit_batch`` fits alone by ``hp.lmm`` (their batched rows set aside): the responses X
        fits to rounding (:func:`near_exact_responses`)."""
        return dict(self.near_exact)

    @cached_property
    def design_responses(self) -> np.ndarray:
        """The responses at the design's rows (those ``data`` keeps), (n, datasets): taken once."""
        rows = np.asarray(self.single.design.rows)
        if rows.size == self.responses.values.shape[0] and np.array_equal(rows, np.arange(rows.size)):
            return self.responses.values
        return self.responses.values[rows]

    @property
    def fixed_aliased(self) -> dict:
        return {}  # (the design's, refused once: shared_design_plan)

    @property
    def term_copies(self) -> list[str]:
        return [""] * self.n_datasets

    @property
    def zero_columns(self) -> dict:
        return {}

    def probe_scales(self) -> np.ndarray:
        scales = self.single.probe_scales()
        return np.broadcast_to(scales[0], (self.n_datasets,) + scales.shape[1:])

    def uneven_weights(self) -> np.ndarray:
        return np.full(self.n_datasets, bool(self.single.uneven_weights()[0]))

    def buckets(self, dtype=np.float64, shifts=None):
        """One bucket, every dataset not refused (:attr:`refusals`), their statistics by matrix products
        (:func:`~hierpool.algebra.statistics.shared_design_statistics`, which shifts the responses' locations
        block by block: ``shifts`` is None here)."""
        assert shifts is None  # (fit_batch computes a long frame's shifts, not a shared design's)
        design, term = self.design, self.term
        bucket = int(bucket_width(self.n_levels[:1])[0])
        stats = shared_design_statistics(self.level, design.X, term.z, self.design_responses, bucket,
                                         weights=design.weights, offset=design.offset)
        messages = list(self.refusals)
        valid = np.flatnonzero([not message for message in messages])
        # (every dataset valid: the design's blocks stay views of one dataset's, copied a chunk at a time)
        chosen = stats if valid.size == self.n_datasets else stats.take(valid)
        out = [(bucket, valid, chosen.astype(dtype))] if valid.size else []
        return out, messages

    def _terms(self, merged: bool = False) -> list:
        """Each term's (level, z, padded width) on the design's rows (``merged``: terms on one grouping factor as one,
        :func:`~hierpool.batch.plan.merge_terms`)."""
        terms = [(level, term.z, int(bucket_width(counts[:1])[0]))
                 for (level, counts, _), term in zip(self.term_levels, self.design.terms)]
        return merge_terms(terms) if merged else terms

    def magnitude_squares(self, beta: np.ndarray) -> np.ndarray:
        """:meth:`BatchPlan.magnitude_squares` of a shared design: one per response (column)."""
        design = self.design
        with np.errstate(over="ignore", invalid="ignore"):
            size = fit_magnitudes(self.design_responses, design.X, beta)
            return np.einsum("n,nd,nd->d", design.row_weights, size, size)

    def left_by_x_squares(self, shifts=None) -> np.ndarray:
        """:meth:`BatchPlan.left_by_x_squares` of a shared design: one per response (column)."""
        residual = (self.location_shifts() if shifts is None else shifts)[1]
        with np.errstate(over="ignore", invalid="ignore"):
            return np.einsum("n,nd,nd->d", self.design.row_weights, residual, residual)

    def location_shifts(self) -> tuple[np.ndarray, np.ndarray]:
        """(beta0 (D, p), residual (n, D)): :meth:`BatchPlan.location_shifts` of a shared design, by
        :func:`~hierpool.algebra.statistics.shared_location_shifts`."""
        design = self.design
        target = self.design_responses
        if np.any(design.offset):
            target = target - design.offset[:, None]
        return shared_location_shifts(design.X, target, design.weights)

    def term_systems(self, datasets, shifts: tuple[np.ndarray, np.ndarray] | None = None,
                     merged: bool = False) -> list:
        """:meth:`BatchPlan.term_systems` of a shared design: one bucket, its systems by
        :func:`~hierpool.algebra.batched_systems.shared_design_systems`."""
        members = np.asarray(datasets, dtype=np.int64)
        if not members.size:
            return []
        beta_shift, residual = self.location_shifts() if shifts is None else shifts
        design = self.design
        systems, n = shared_design_systems(self._terms(merged), design.X, (beta_shift[members], residual[:, members]),
                                           design.weights, design.sigma_known)
        return [(members, systems, n)]

    def known_sds_sizes(self, residual: np.ndarray) -> np.ndarray:
        """:meth:`BatchPlan.known_sds_sizes` of a shared design (``residual`` (n, D)): one design's sds."""
        w = self.design.row_weights
        return known_sds_size(np.einsum("nd,n->d", residual * residual, w), w.sum(), w @ w, w.size, self.design.p,
                              self.weights_units())

    def weights_units(self) -> np.ndarray:
        """:meth:`BatchPlan.weights_units` of a shared design: its one design's, for every dataset."""
        unit = 1.0 if self.design.weights is None else weights_unit(self.design.weights)
        return np.full(self.n_datasets, unit)

    def term_moments(self, weights: np.ndarray, residual: np.ndarray, datasets, units=None) -> np.ndarray:
        """:meth:`BatchPlan.term_moments` of a shared design (``residual`` (n, D)): each term's per-level
        cross-products one dataset's, Z_l'W r_d by a matrix product."""
        design = self.design
        datasets = np.unique(np.asarray(datasets, dtype=np.int64))
        start = np.tile(theta_start(tuple(t.k for t in design.terms)), (self.n_datasets, 1))
        if not datasets.size:
            return start
        count, n = len(datasets), design.X.shape[0]
        residual = residual[:, datasets]
        weighted = residual * weights[:, None]
        rss = np.einsum("nd,nd->d", residual, weighted)
        n_obs = np.full(count, float(n))
        thetas = []
        with np.errstate(all="ignore"):  # a dataset moments cannot start gets the identity (moment_theta)
            for level, z, ell in self._terms():
                k = z.shape[1]
                ztz = grouped_products(level, z, z, weights, ell).reshape(1, ell, k, k)
                cross = (level_cells(level, z, ell).T @ weighted).T.reshape(count, ell, k)
                rms = np.broadcast_to(np.sqrt(np.einsum("nj,nj->j", z, z) / max(n, 1)), (count, k))
                if units is not None:
                    rms = rms / units[datasets][:, None]
                thetas.append(moment_theta(np.broadcast_to(ztz, (count, ell, k, k)), cross, rss, n_obs, p=design.p,
                                           floor=MOMENT_FLOOR, rms=rms))
        start[datasets] = np.concatenate(thetas, axis=1)
        return start

    def frame_rows(self, index: int) -> np.ndarray:
        return np.arange(len(self.frame))

    def dataset_frame(self, index: int) -> tuple[pd.DataFrame, dict]:
        frame, arguments = self.single.dataset_frame(0)
        return frame.assign(**{self.responses.column: self.responses.values[:, index]}), arguments


def shared_design_plan(formula: str, data: pd.DataFrame, responses: Responses, caller: str, single: str, problems,
                       weights=None, offset=None, se: str | None = None) -> SharedDesignPlan:
    """The plan of a linear mixed model (independent residuals; any random-effect terms) on ``responses`` sharing
    ``data``'s design.  ``problems(plan)``: each dataset's reason not to be fitted, the batch's checks
    (:func:`hierpool.batch.fit_terms.term_problems`), run on the design's one dataset.

    The design is built and checked once, on one dataset whose response is a placeholder.  What ``hp.lmm`` refuses
    in it (too few rows for the levels, aliased columns, a copied random-effect column, weights off scale) is
    refused for the batch; what it refuses in a response (one value, too small to square) in that dataset's row.

    Raises
    ------
    DataError
        Where the design is refused, or a response is missing at a row the design keeps.
    """
    # (a placeholder of many values: the single fit refuses a response of one value)
    frame = data.assign(**{responses.column: np.arange(len(data), dtype=float), DESIGN_DATASET: 0})
    refused = f"{caller}: every response shares data's design, which {single} refuses: "
    try:
        plan = plan_batch(formula, frame, DESIGN_DATASET, caller, single, weights=weights, offset=offset, se=se,
                          one_term=False)
    except EveryDatasetRefused as error:  # (worded for a long frame's datasets: "dataset 0: ...")
        raise DataError(refused + error.reason) from None
    message = problems(plan)[0]
    if message:
        raise DataError(refused + message)
    n_datasets = responses.n_datasets
    shared = SharedDesignPlan(
        **{field.name: getattr(plan, field.name) for field in dataclasses.fields(BatchPlan)}
        | {"dataset": None, "labels": responses.labels, "n_levels": np.full(n_datasets, plan.n_levels[0]),
           "n_obs": np.full(n_datasets, plan.n_obs[0]), "levels": [plan.levels[0]] * n_datasets,
           "term_levels": tuple((level, np.full(n_datasets, counts[0]), [labels[0]] * n_datasets)
                                for level, counts, labels in plan.term_levels),
           "refusals": ("",) * n_datasets},
        single=plan, responses=responses)
    values = shared.design_responses
    missing = np.isnan(values)
    if missing.any():
        bad = np.flatnonzero(missing.any(axis=0))
        count = int(missing[:, bad[0]].sum())
        others = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise DataError(f"responses column {responses.labels[bad[0]]!r}{others} has {count} missing "
                        f"value{'s' if count > 1 else ''} at rows data keeps: each response is fitted on the design's "
                        "rows (datasets with rows of their own: a long frame, by=)")
    # the single fit's refusals of a response: infinite, beyond its largest or too small to square, or one value
    # (its offset's less too)
    with np.errstate(invalid="ignore", over="ignore"):
        target = values if not np.any(plan.design.offset) else values - plan.design.offset[:, None]
        largest = np.maximum(values.max(axis=0), -values.min(axis=0))  # (|values| without an (n, D) copy)
        refused = ~np.isfinite(largest) | (largest > LARGEST_VALUE) | underflowing(largest, RESPONSE_SMALLEST)
        refused |= (np.ptp(values, axis=0) == 0) | (np.ptp(target, axis=0) == 0)
    shared = dataclasses.replace(shared, near_exact=near_exact_responses(plan.design, target, refused))
    if not refused.any():
        return shared
    refusals = list(shared.refusals)
    for index in np.flatnonzero(refused):
        frame, arguments = shared.dataset_frame(index)
        refusals[index] = single_fit_refusal(formula, frame, **arguments) or "refused"
    if refused.all():  # (as the long frame: no dataset left to fit)
        every_refused(responses.labels[0], refusals[0])
    # a refused response's column zero in the statistics' copy: its sums then stay finite and warn of nothing
    # (the responses the user passed are not written)
    kept = np.where(refused, 0.0, responses.values)
    return dataclasses.replace(shared, refusals=tuple(refusals),
                               responses=dataclasses.replace(responses, values=kept))


def condition_shared(plan: SharedDesignPlan, reml: bool = False, linear: bool = True) -> BatchConditioning | None:
    """:func:`~hierpool.batch.conditioning.condition_batch` of a shared design: its one dataset's columns
    conditioned (the rule and transforms read the design alone), every dataset's transforms that one's."""
    one = condition_batch(plan.single, reml=reml, linear=linear)
    if one is None:
        return None
    n_datasets = plan.n_datasets

    def every(per_dataset: np.ndarray) -> np.ndarray:
        return np.broadcast_to(per_dataset[0], (n_datasets,) + per_dataset.shape[1:])

    # (the single plan too: the searches' probe units are read from its conditioned columns, as the long frame's)
    fitted = dataclasses.replace(plan, design=one.plan.design, user_aliased={}, single=one.plan)
    return BatchConditioning(fitted, tuple(every(m) for m in one.transforms), every(one.conditioned),
                             None if one.fixed is None else tuple(every(f) for f in one.fixed), reml=reml,
                             sd_units=None if one.sd_units is None else every(one.sd_units))
