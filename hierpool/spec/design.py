"""From a formula and a DataFrame to the arrays both engines read.

A :class:`Design` never holds a dense random-effects matrix Z.  Each
random-effect term keeps, per row, the integer index of its level and the few
columns of z (MixedModels.jl's ``ReMat``): row i of Z_j is ``z_j[i]`` placed in
the columns of level ``index_j[i]``.

All input checks live here, so that the numerical code can assume clean
arrays: missing columns, non-numeric or constant responses, infinite values,
grouping factors with one level, more random effects than observations, empty
data.  Rows with a missing value in any used column (including the weights and
offset) are dropped with a warning that counts them, and aliased fixed-effect
columns are dropped with a warning that names them (lme4's
``check.rankX = "message+drop.cols"``).

Offsets (``offset(expr)`` terms of the fixed part, any number, summed, and the
``offset=`` argument) are kept apart from X: the model is y = offset + X beta +
Z b + e, as lme4's.  Prior weights (``weights=``) give row i the residual
variance sigma^2 / w_i, as lmer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import ArgumentError, DataError, FormulaError, warn_at_caller
from .columns import PlainPart, plain_fixed, plain_part
from .family import FamilySpec, check_response
from .formula import (
    ModelSpec,
    RandomTermSpec,
    display_name,
    made_by,
    names_in_calls,
    parse_formula,
    with_logical_factors,
)
from .labels import column_labels, level_label, shown_label, shown_rows
from .r_coding import RCodedPart, r_coding, r_columns, r_order
from .response import RESPONSE_COLUMN, binomial_counts, two_level_indicator

#: Column names of the weights and offset arguments in the model frame (lme4's names).
WEIGHTS_COLUMN = "(weights)"
OFFSET_COLUMN = "(offset)"

#: Tolerance of the rank check on X, as lme4's ``chkRank.drop.cols`` (qr tol).
RANK_TOL = 1e-7


@dataclass(frozen=True)
class RandomEffectTerm:
    """One random-effect term ``(lhs | g)`` evaluated on the data.

    Attributes
    ----------
    group : str
        Grouping-factor name as lme4 prints it (``"Subject"``, ``"cask:batch"``).
    coef_names : tuple of str
        Names of the k varying coefficients (``("Intercept", "Days")``).
    levels : numpy.ndarray of str
        The ell level labels, in index order.
    index : numpy.ndarray of int32, shape (n,)
        Level of each row.
    z : numpy.ndarray of float64, shape (n, k)
        The term's model-matrix columns for each row.
    spec : RandomTermSpec
        What the formula said, used to evaluate new data.
    """

    group: str
    coef_names: tuple[str, ...]
    levels: np.ndarray
    index: np.ndarray
    z: np.ndarray
    spec: RandomTermSpec
    z_matrix: object  # formulae CommonEffectsMatrix (or a plain PlainPart) of the lhs, to encode new data alike

    def dense_columns(self, values: np.ndarray | None = None) -> np.ndarray:
        """The term's dense model-matrix block Z_j, shape (n, ell * k), columns by level then coefficient.

        ``values`` (n, k) replaces z (e.g. z @ Lambda^T).  For the small, teaching-size
        uses (ridge view, no-pooling fits) only: the engines never form Z.
        """
        values = self.z if values is None else values
        dense = np.zeros((len(self.index), self.n_levels * self.k))
        np.put_along_axis(dense, self.index[:, None] * self.k + np.arange(self.k)[None, :], values, axis=1)
        return dense

    @property
    def k(self) -> int:
        return self.z.shape[1]

    @property
    def label(self) -> str:
        """The term as a formula writes it: ``(1 + x | g)``."""
        names = ["1" if name == "Intercept" else name for name in self.coef_names]
        return f"({' + '.join(names)} | {self.group})"

    @property
    def n_levels(self) -> int:
        return len(self.levels)


@dataclass(frozen=True)
class Design:
    """Response, fixed-effect matrix and random-effect terms of one model on one data set.

    Attributes
    ----------
    spec : ModelSpec
    y : numpy.ndarray, shape (n,)
    X : numpy.ndarray, shape (n, p)
    fixed_names : tuple of str
        Column names of X (``"Intercept"``, ``"Days"``, ``"Sex[Male]"``...).
    terms : tuple of RandomEffectTerm
        In lme4's order: by decreasing number of levels.
    weights : numpy.ndarray or None
        Per-row precision weights: prior weights w (residual variance sigma^2 / w),
        or 1/se^2 when residual sds are known; None when neither was given.
    sigma_known : bool
        True when residual sds were given (``se=``): sigma is then fixed at 1 on the
        weighted scale.
    offset : numpy.ndarray, shape (n,)
        Known part of the linear predictor (zeros without an offset).
    columns : tuple of str
        The data columns the formula reads (new data must carry them).
    offset_terms : tuple of str
        The ``offset(...)`` terms of the formula, evaluated again on new data.
    offset_column : str or None
        Column named by the ``offset=`` argument (None when absent or given as an array).
    weights_column : str or None
        Column named by the ``weights=`` argument (None when absent or given as an array).
    offset_argument : {"column", "array", None}
        How the ``offset=`` argument was given.
    rows : pandas.Index
        Labels of the data rows used (after dropping missing values).
    n_dropped : int
        Rows dropped for missing values.
    aliased : tuple of str
        Fixed-effect columns dropped as linearly dependent on earlier ones.
    family : FamilySpec or None
        A GLMM's family (None: the Gaussian linear mixed model).  Then ``y`` is the response
        as the family reads it (proportions for the binomial) and ``weights`` its prior weights
        (the binomial's trials times any ``weights=``); there is no residual variance.
    frame : pandas.DataFrame or None
        The model frame (lme4's ``model.frame``): the formula's columns (and the weights', offset's, se's) of the
        fitted rows, as the data gave them, with ``(weights)`` / ``(offset)`` columns for arguments given as arrays
        and a binomial's proportions in ``(response)``; an internal copy, never the caller's frame.
    """

    spec: ModelSpec
    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    terms: tuple[RandomEffectTerm, ...]
    weights: np.ndarray | None
    sigma_known: bool
    offset: np.ndarray
    columns: tuple[str, ...]
    offset_terms: tuple[str, ...]
    offset_column: str | None
    offset_argument: str | None
    weights_column: str | None
    rows: pd.Index
    n_dropped: int
    aliased: tuple[str, ...]
    fixed_matrix: object  # formulae CommonEffectsMatrix (or a PlainPart), to encode new data the same way
    family: FamilySpec | None = None
    frame: pd.DataFrame | None = field(default=None, compare=False, repr=False)  # the used columns of the fitted rows
    se_column: str | None = None  # the known residual sds' column (se=): new rows' are read from it

    @property
    def n(self) -> int:
        return self.y.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def row_weights(self) -> np.ndarray:
        """Precision weight of each row: prior weights, 1/se^2 with known residual sds, else ones."""
        return np.ones(self.n) if self.weights is None else self.weights

    @property
    def has_offset(self) -> bool:
        return bool(self.offset_terms) or self.offset_argument is not None

    @property
    def y_less_offset(self) -> np.ndarray:
        """y - offset: the part of the response that X beta + Z b models."""
        return self.y - self.offset


def model_differences(fitted: Design, design: Design) -> list[str]:
    """What differs between two designs that should be one model of one data set (``variance=`` holds a fit's
    variances for another call): among ``terms`` (groups, coefficients, levels), ``family`` (and link),
    ``fixed effects``, ``data`` (rows and response), ``weights`` (prior weights, trials or known sds) and
    ``offset``; empty when they are the same."""
    def family(d):
        return None if d.family is None else (d.family.name, d.family.link)

    checks = [
        ("terms", [(t.group, t.coef_names, t.n_levels) for t in fitted.terms]
         == [(t.group, t.coef_names, t.n_levels) for t in design.terms]),
        ("family", family(fitted) == family(design)),
        ("fixed effects", list(fitted.fixed_names) == list(design.fixed_names)
         and fitted.X.shape == design.X.shape and np.array_equal(fitted.X, design.X)),
        ("data", fitted.n == design.n and np.array_equal(fitted.y, design.y)),
        ("weights", fitted.sigma_known == design.sigma_known and fitted.n == design.n
         and np.array_equal(fitted.row_weights, design.row_weights)),
        ("offset", fitted.n == design.n and np.array_equal(fitted.offset, design.offset)),
    ]
    return [name for name, same in checks if not same]


def _check_frame(data) -> None:
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if data.shape[0] == 0:
        raise DataError("data is empty: it has no rows")
    check_unique_columns(data, ())


def check_unique_columns(data: pd.DataFrame, names, where: str = "data") -> None:
    """Refuse columns a formula cannot name (a MultiIndex), and a column of ``names`` that ``data`` holds twice, by
    name: read, such a column was a frame, and pandas' or NumPy's traceback followed (the forty-third session's
    probe: a duplicated weights or ``by`` column)."""
    if isinstance(data.columns, pd.MultiIndex):
        raise DataError(f"{where} has MultiIndex columns ({list(data.columns[:3])}...), which a formula cannot name: "
                        "flatten them (data.columns = ['_'.join(map(str, c)) for c in data.columns])")
    if data.columns.is_unique:  # (cached by pandas: the names are counted only where some repeat)
        return
    for name in dict.fromkeys(names):
        count = int(np.sum(data.columns == name))
        if count > 1:
            raise DataError(f"column {name!r} appears {count} times in {where}; the formula cannot tell them apart")


def check_columns(data: pd.DataFrame, names, what: str) -> None:
    missing = [v for v in names if v not in data.columns]
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        # a formula names columns by text: a frame whose columns are numbers has none it can name
        hint = ("; the data's columns are named by numbers, which a formula reads as text: name them by text "
                "(data.columns = data.columns.astype(str))") if any(
            not isinstance(c, str) and str(c) in map(str, missing) for c in data.columns) else ""
        raise DataError(f"{what} uses column {listed}, which is not in the data (columns: {list(data.columns)}){hint}")


def check_unique_index(data: pd.DataFrame, why: str) -> None:
    """Refuse, by name, a data frame whose index repeats labels where its rows are read back by label (``why``):
    ``data.loc[rows]`` then returns every row of a repeated label (an AR(1) series read a time twice)."""
    if not data.index.is_unique:
        repeated = int(data.index.duplicated().sum())
        raise DataError(f"the data's index repeats {repeated} label(s) ({data.index[data.index.duplicated()][0]}, "
                        f"...), and {why} reads its rows by label: give unique labels (data.reset_index(drop=True))")


def missing_detail(frame: pd.DataFrame) -> str:
    """"column: count" of each of ``frame``'s columns with missing values, as the dropped rows' warning names them
    ("" where none)."""
    return ", ".join(f"{c}: {int(k)}" for c, k in frame.isna().sum().items() if k)


def _drop_missing(frame: pd.DataFrame, formula: str = "",
                  datasets: pd.Series | None = None) -> tuple[pd.DataFrame, int]:
    """The rows without a missing value, and how many were dropped (warned, column by column; ``datasets``: each
    row's dataset in a batch's long frame, the warning then counting them per dataset too).  Where ``formula``
    calls a stateful transform (``scale``, ``poly``...), the warning says that it is computed on the rows kept: R's
    model frame computes it on every row before ``na.omit`` (``scale(x)``'s centre and sd from the rows dropped for
    a missing response too), so that the coefficients, and a REML criterion, then differ from lme4's."""
    missing = frame.isna().any(axis=1)
    n_missing = int(missing.sum())
    if n_missing == frame.shape[0]:
        raise DataError(f"every row has a missing value in one of the columns {list(frame.columns)}")
    if n_missing:
        detail = missing_detail(frame)
        from .transforms import stateful_calls  # (imports formulae: only where rows were dropped)

        stateful = stateful_calls(formula) if formula else []
        note = (f"; {', '.join(f'{name}()' for name in stateful)} computed on the rows kept (lme4 computes "
                "it before dropping them: drop those rows from the data for both to agree)") if stateful else ""
        warn_at_caller(f"dropped {n_missing} of {frame.shape[0]} rows with missing values ({detail})"
                       f"{_per_dataset(datasets, missing)}{note}")
        frame = frame.loc[~missing]
    return frame, n_missing


def _per_dataset(datasets: pd.Series | None, dropped: pd.Series) -> str:
    """", in 2 datasets ('a': 4, 'c': 2)": which datasets the ``dropped`` rows were in, and how many of each ("" outside
    a batch)."""
    if datasets is None:
        return ""
    counts = datasets[dropped.to_numpy()].value_counts(sort=False)
    shown = ", ".join(f"{shown_label(label)!r}: {int(n)}" for label, n in list(counts.items())[:5])
    many = "s" if len(counts) > 1 else ""
    return f", in {len(counts)} dataset{many} ({shown}{', ...' if len(counts) > 5 else ''})"


#: The kinds of :func:`value_kind` the formula reads, in the order a batch keeps them where two are as common.
READABLE_KINDS = ("numbers", "true/false values", "text or categories")


def value_kind(column: pd.Series) -> str:
    """How the formula reads ``column``'s values: "true/false values", "numbers", "text or categories", or for
    anything else (an ``object`` column of numbers, or of numbers and text mixed) "Python objects (their types)",
    which formulae cannot read (:func:`check_value_types` refuses it; ``hp.fit_batch`` compares the kinds of its
    datasets' columns with it)."""
    types = pd.api.types
    if types.is_bool_dtype(column):
        return "true/false values"
    if types.is_complex_dtype(column):  # (numeric to pandas; a fit kept the real part, with NumPy's warning alone)
        return f"complex numbers ({column.dtype})"
    if types.is_numeric_dtype(column):
        return "numbers"
    if types.is_string_dtype(column) or isinstance(column.dtype, pd.CategoricalDtype):
        return "text or categories"
    if types.is_datetime64_any_dtype(column) or types.is_timedelta64_dtype(column):
        return f"dates or times ({column.dtype})"
    return f"Python objects ({', '.join(sorted({type(value).__name__ for value in column}))})"


def check_value_types(frame: pd.DataFrame, names) -> None:
    """Refuse a column of ``names`` (:attr:`ModelSpec.values`: read as values, not as a factor's labels) that holds
    neither numbers nor text or categories (:func:`value_kind`): an ``object`` column of numbers, or of numbers and
    text mixed (a column of one dataset of a batch stored as text, stacked on the others' numbers), which formulae
    refused without naming it."""
    for name in names:
        column = frame[name]
        kind = value_kind(column)
        if kind.startswith("dates or times"):  # a number in which unit, from which origin, is the user's choice
            raise DataError(f"column {name!r} holds {kind}: convert it to a number in the unit you mean, e.g. "
                            f"(d[{name!r}] - d[{name!r}].min()).dt.days (R reads a date as days since 1970, a "
                            "time as seconds)")
        if kind not in READABLE_KINDS:
            raise DataError(f"column {name!r} (dtype {column.dtype}) holds {kind}: a column the formula reads must "
                            "be numbers, or text or categories for a factor; convert it (pd.to_numeric, or "
                            ".astype(str))")


#: Integers below this are exact in a float64 (2^53): an integer column within it is read as float64.
EXACT_INTEGER = 2**53


def float64_values(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its numeric columns as float64, as R holds every number (a copy where any changes): floats
    narrower than float64 (float16, float32, nullable Float64), and integer columns of any width, nullable or not,
    whose values lie within 2^53 (exact in a float64).  Read in their own dtype, formulae's arithmetic wrapped
    (``I(t - 50)`` of a uint8 t is t + 206 below 50; ``I(t * t)`` of int64 epoch milliseconds overflowed) and
    NumPy's functions ran in low precision (``log`` of an int8 in float16): other fits, silently.  An integer
    column reaching 2^53 stays as it is (labels beyond it stay distinct); a nullable one's missing values are NaN."""
    types = pd.api.types

    def converted(column: pd.Series) -> bool:
        dtype = column.dtype
        if types.is_bool_dtype(dtype) or not types.is_numeric_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
            return False
        if types.is_integer_dtype(dtype):
            extreme = column.abs().max() if len(column) else 0
            return bool(pd.isna(extreme) or extreme < EXACT_INTEGER)
        return not (isinstance(dtype, np.dtype) and dtype.itemsize >= 8)  # (float64 as it is; complex: refused)

    wide = {c: frame[c].to_numpy(dtype=float, na_value=np.nan) for c in frame.columns if converted(frame[c])}
    return frame.assign(**wide) if wide else frame


def _plain_numeric(frame: pd.DataFrame, as_values=()) -> pd.DataFrame:
    """``frame`` (hierpool's own copy, its numbers float64 already: :func:`float64_values`) with its logical columns
    as factors of levels False, True (R's model.matrix reads a logical so: read as 0/1, ``y ~ 0 + xb``,
    ``xb:x`` and ``(0 + xb | g)`` were other models, REML 1050.8 for lme4's 1026.4 on the first), but those of
    ``as_values`` (the response; one a call reads, ``offset(xb)``: NumPy bools), and its unordered categorical
    columns marked ordered, their unused categories dropped.

    The nullable columns' missing values were dropped already; NumPy (and formulae) read the float64 copy, where
    a nullable response failed to convert.  formulae sorts an unordered categorical's levels, where R's factor keeps
    the user's order (its first level the baseline: categories ['3+', '2', '1', '0'] gave lme4's intercept -0.344
    and hierpool's -1.690, baseline '0'); it keeps an ordered one's (with treatment contrasts: R's polynomial ones are
    ``C(f, contr_poly)``).  Unused categories are dropped as lme4's model frame drops unused levels.
    """
    types = pd.api.types
    categorical = [c for c, dtype in frame.dtypes.items() if isinstance(dtype, pd.CategoricalDtype)]
    logical = [c for c, dtype in frame.dtypes.items() if types.is_bool_dtype(dtype)]
    if not categorical and not logical:
        return frame
    return frame.assign(**{c: frame[c].cat.remove_unused_categories().cat.as_ordered() for c in categorical},
                        **{c: frame[c].to_numpy(dtype=bool) if c in as_values or frame[c].nunique() < 2 else
                           pd.Categorical(frame[c].to_numpy(dtype=bool), categories=[False, True], ordered=True)
                           for c in logical})


def logical_factors(frame: pd.DataFrame, columns, in_calls, responses=()) -> tuple[str, ...]:
    """The logical columns of ``columns`` (not ``responses``) that a call reads too (``in_calls``: ``offset(xb)``,
    ``I(xb * 1)``, its values), with both values: their uses as terms are written ``C(name)``, a factor of levels
    False, True (:func:`~hierpool.spec.formula.with_logical_factors`), as R's model.matrix reads a logical.  A logical
    that no call reads is a factor in the frame itself (:func:`_plain_numeric`), the formula as written (formulae
    codes a call's factor otherwise in an interaction without its main effects, ``s:C(xb)``)."""
    return tuple(c for c in columns if c in frame.columns and c not in responses and c in in_calls
                 and pd.api.types.is_bool_dtype(frame[c].dtype) and frame[c].nunique() == 2)


def _warn_vanished_factors(frame: pd.DataFrame, spec: ModelSpec, fixed_names, terms) -> None:
    """Warn of a factor with one level in the data whose terms got no column (treatment contrasts of one level are
    none): silently, the model lost a term it was written with, where R refuses it ("contrasts can be applied only
    to factors with 2 or more levels")."""
    columns = list(fixed_names) + [name for term in terms for name in term.coef_names]
    vanished = [c for c in spec.values if c in frame.columns and c != spec.response
                and value_kind(frame[c]) == "text or categories" and frame[c].nunique() == 1
                and not any(re.search(rf"(?<![\w.]){re.escape(c)}(\[|\.[LQC]$|\^\d)", name) for name in columns)]
    if vanished:
        warn_at_caller(f"factor(s) {vanished} have one level in the data: their terms have no column and are left out "
                       "(R refuses a factor of one level)")


def _check_finite(frame: pd.DataFrame) -> None:
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            if np.isinf(values.to_numpy(dtype=float)).any():
                raise DataError(f"column {column!r} has infinite values")


def _response(frame: pd.DataFrame, spec: ModelSpec, evaluated, shown: str | None = None,
              checked: bool = True) -> np.ndarray:
    """y, checked (unless not ``checked``: a batch's long frame whose response each dataset's own design checks,
    :func:`build_design`'s ``own_calls``); ``shown``: the response as the user wrote it, where ``spec`` reads a
    column made from it (a binomial's cbind(s, f) as proportions)."""
    column_name, name = spec.response, shown or spec.response
    if column_name in frame.columns:
        column = frame[column_name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"response {name!r} must be numeric, got dtype {column.dtype}")
    y = np.asarray(np.asarray(evaluated), dtype=float).reshape(-1)
    if not checked:
        return y
    if not np.all(np.isfinite(y)):
        raise DataError(f"response {name!r} has non-finite values after transformation")
    if np.ptp(y) == 0:
        raise DataError(f"response {name!r} is constant ({float(y[0])!r}): there is no variation to model")
    return y


def quiet_arithmetic():
    """NumPy's error state while formulae evaluates a formula's calls on data (the fit's, or new data's): log(0) or
    1/0 gave RuntimeWarnings that named no column, where every non-finite value the calls make is refused by name
    after (:func:`check_finite_columns`, :func:`_response`, :func:`_split_offsets`)."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _design_matrices(text: str, frame: pd.DataFrame, what: str):
    import formulae  # half a second to import: plain parts (spec.columns) never get here

    from .transforms import caller_environment  # the namespace of the first frame outside hierpool

    try:
        with quiet_arithmetic():
            return formulae.design_matrices(text, frame, na_action="error", env=caller_environment())
    except KeyError as exc:  # a name neither a column, formulae's, the caller's nor R's
        raise FormulaError(
            f"cannot evaluate {what} {display_name(text)!r}: unknown function or name {exc.args[0]!r} "
            "(not a data column, not defined where hierpool was called, not one of R's log, exp, sqrt, abs...)"
        ) from None
    except IndexError as exc:  # formulae's own failure, seen where an interaction precedes a factor's main effect
        raise FormulaError(f"cannot evaluate {what} {display_name(text)!r} on the data ({exc}): formulae fails on an "
                           "interaction of factors written before one factor's main effect; write the main effects "
                           "first (f + f:c, not f:c + f), as R orders them") from None
    except Exception as exc:  # formulae raises many exception types
        raise FormulaError(f"cannot evaluate {what} {display_name(text)!r} on the data: {exc}") from None


def _fixed_part(spec: ModelSpec, frame: pd.DataFrame, shown: str | None = None, checked: bool = True):
    """(y, (column names, values), matrix that encodes new data or None) of the fixed part ``y ~ ...``; ``shown``:
    the response as the user wrote it, ``checked`` whether it is checked (:func:`_response`)."""
    plain = plain_fixed(spec.fixed)
    if plain is not None and PlainPart(False, (plain[0],)).readable(frame) and plain[1].readable(frame):
        response, part = plain
        y = _response(frame, spec, frame[response].to_numpy(dtype=float), shown, checked)
        return y, (part.column_names, part.matrix(frame)), part
    fixed = _design_matrices(spec.fixed, frame, "fixed-effect part")
    y = _response(frame, spec, fixed.response, shown, checked)
    if fixed.common is None:  # y ~ 0: no fixed effects
        return y, ([], np.zeros((len(frame), 0))), None
    try:
        columns = matrix_columns(fixed.common)
    except FormulaError:
        # formulae's matrix does not match its terms' labels (R's nesting f/c, 0 + f*c*h): R's columns of the
        # same terms where they can be built (their span and coefficients lme4's), else the refusal
        model = r_columns(spec.fixed, fixed.common, frame)
        if model is None:
            raise
        if model.own_contrasts:  # (R's columns are built with treatment contrasts here)
            raise FormulaError(f"fixed-effect part {display_name(spec.fixed)!r}: formulae cannot build its terms' "
                               "columns, and R's are built here with the default (treatment) contrasts only, where a "
                               "factor in it is coded by the user's contrasts (C(f, Sum)): code that factor by the "
                               "default contrasts, or build the columns in the data") from None
        return y, RCodedPart.columns(model, fixed.common), RCodedPart(spec.fixed, fixed.common)
    coding = r_coding(spec.fixed, fixed.common, frame)
    if coding.model is not None:
        # formulae's columns are another model than lme4's (y ~ (a + f):c), or lme4's model by other columns, whose
        # coefficients mean something else under names alike (y ~ f:c + h): R's columns are fitted instead
        return y, RCodedPart.columns(coding.model, fixed.common), RCodedPart(spec.fixed, fixed.common)
    # R's columns not built: a factor in such an interaction coded by the user's contrasts (C(f, Sum))
    if coding.span:  # another model than lme4's, which would be fitted silently
        raise FormulaError(f"fixed-effect part {display_name(spec.fixed)!r}: {coding.span}, and a factor there is "
                           "coded by contrasts hierpool does not build R's columns for.  Write the model with each "
                           "interaction's lower-order terms (f*c*h for f:c:h), or code the factor by the default "
                           "contrasts")
    if coding.columns:  # lme4's model, but coefficients that mean something else under names alike
        warn_at_caller(f"fixed-effect part {display_name(spec.fixed)!r}: formulae codes the interaction(s) "
                       f"{coding.columns} by other columns than R's model.matrix: the same model as lme4's (the same "
                       "criterion and fitted values), but its fixed-effect coefficients are another parameterization "
                       "than lme4's, though named alike.  For lme4's coefficients write each interaction's "
                       "lower-order terms (f*c for f:c)")
        return y, columns, fixed.common
    ordered = r_order(spec.fixed, fixed.common)  # formulae's columns are R's: in R's order (names formulae's)
    if ordered is not None and len(ordered[0]) == len(columns[0]):
        columns = (ordered[1], columns[1][:, ordered[0]])
    return y, columns, fixed.common


def _is_offset_call(name: str) -> bool:
    """True for a column that is one ``offset(...)`` call and nothing else (not ``offset(a):x``)."""
    if not name.startswith("offset("):
        return False
    depth = 0
    for i, ch in enumerate(name):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch == ")":
            return i == len(name) - 1
    return False


def matrix_columns(matrix) -> tuple[list[str], np.ndarray]:
    """(column names, float array) of a formulae design matrix: its ``as_dataframe()`` without the frame.

    A matrix whose columns do not match its terms' labels is refused: formulae builds R's nesting operator
    ``f/x`` (``f + f:x`` in R) with labels that do not match its matrix, which read by the labels' count made a
    matrix of other rows (a traceback, or a silently shorter X)."""
    names = [str(label) for term in matrix.terms.values() for label in term.labels]
    values = np.asarray(matrix.design_matrix, dtype=float)
    values = values.reshape(-1, 1) if values.ndim == 1 else values
    if values.ndim != 2 or values.shape[1] != len(names):
        raise FormulaError(f"formulae built {values.shape[-1]} column(s) for the {len(names)} it names "
                           f"({', '.join(names)}): a term it cannot build (a nesting a/b, or (a + b):c with a "
                           "factor); write it as R expands it (a + a:b; a:c + b:c)")
    return names, values


#: The largest magnitude a model column may hold: its square, and a sum of a few thousand of them, stay finite.
LARGEST_VALUE = 1e150
#: The smallest largest magnitude a model column that is not zero may hold: a column of largest value 2.7e-160 fits
#: as at its own scale (ML deviance to 1e-13), one of 2.7e-165 does not (NumPy's LinAlgError in the fixed part, a
#: deviance 25.8 too high as a random slope, silently; at 1e-200 hp.bayes gave a posterior of the prior).
SMALLEST_VALUE = 1e-162
#: The smallest largest magnitude of a response that is not zero: at 1e-150 a fit's search stopped unconverged (its
#: residuals' squares near the smallest float), at 1e-140 it equals the fit of y at its scale.
RESPONSE_SMALLEST = 1e-140


def underflowing(largest: np.ndarray, smallest: float = SMALLEST_VALUE) -> np.ndarray:
    """Whether a column whose largest absolute value is ``largest`` is too small to fit: not zero, and below
    ``smallest`` (:data:`SMALLEST_VALUE`, :data:`RESPONSE_SMALLEST`), where its squares underflow a float.  The rule
    of :func:`check_finite_columns`, and of a batch's per-dataset check (whose long frame holds every dataset's
    largest values together).  Elementwise: a value that is not underflowing cannot make a column so."""
    return (largest > 0) & (largest < smallest)


def largest_magnitudes(values: np.ndarray) -> np.ndarray:
    """max |value| of each column of ``values`` (n, k), NaN where the column holds one: the larger of its maximum and
    minus its minimum, each a reduction of one strided column, not ``np.max(np.abs(X), axis=0)``: an (n, k)
    temporary reduced across rows, several times slower on a long frame (benchmarks/RESULTS.md, forty-fifth session)."""
    return np.array([np.maximum(np.max(values[:, j]), -np.min(values[:, j])) for j in range(values.shape[1])],
                    dtype=float)


def check_finite_columns(values: np.ndarray, names, rows: pd.Index, what: str,
                         largest: float = LARGEST_VALUE, smallest: float = SMALLEST_VALUE) -> None:
    """Refuse a model column that is not finite (``log(x)`` of a zero or a negative, ``exp`` overflowing) by name,
    with the rows' labels: read on, it broke the rank check's SVD, a GLMM's separation check or the sampler with a
    traceback.  R drops a row whose transformed covariate is NaN (``na.omit`` of the model frame) and refuses an
    infinite one; here both are refused, the rows named for the user to drop.  A column whose values reach beyond
    ``largest`` (:data:`LARGEST_VALUE`), or that is not zero but whose largest value is below ``smallest``
    (:data:`SMALLEST_VALUE`; 0 for new data, whose rows may be as small as they are), is refused too: its squares
    overflow or underflow a float."""
    if not values.size:
        return
    magnitude = largest_magnitudes(values)  # (NaN and inf fail the test below: one pass for all)
    if np.all((magnitude <= largest) & np.isfinite(magnitude) & ~underflowing(magnitude, smallest)):
        return
    bad = ~np.isfinite(values)
    # beyond ~1e154 a value's square overflows: the rank check, X'X and Cholesky broke on them (an aliased column
    # dropped, or NumPy's LinAlgError); refused where their squares would not hold
    huge = np.isfinite(values) & (np.abs(values) > largest)
    for j in np.flatnonzero(huge.any(axis=0)):
        raise DataError(f"{what} column {display_name(names[j])!r} holds values up to "
                        f"{np.max(np.abs(values[:, j][huge[:, j]])):.3g}, beyond {largest:.0e}, where sums of their "
                        "squares overflow a float: rescale it (its units)")
    tiny = np.isfinite(magnitude) & underflowing(magnitude, smallest)
    for j in np.flatnonzero(tiny):
        raise DataError(f"{what} column {display_name(names[j])!r} holds values no larger than {magnitude[j]:.3g}, "
                        f"below {smallest:.0e}, where their squares underflow a float: rescale it (its units)")
    for j in np.flatnonzero(bad.any(axis=0)):
        raise DataError(f"{what} column {display_name(names[j])!r} is not finite in {int(bad[:, j].sum())} row(s) "
                        f"(rows {shown_rows(rows[bad[:, j]])}): drop those rows or transform the covariate otherwise")


def _split_offsets(names: list[str], values: np.ndarray, formula: str, own_calls: tuple[str, ...] = ()):
    """(X columns, their names, summed offset, offset term names) of the fixed-part matrix (``own_calls``:
    :func:`build_design`'s, whose offset terms are not checked here)."""
    offsets = [j for j, n in enumerate(names) if _is_offset_call(n)]
    for name in names:
        if "offset(" in name and not _is_offset_call(name):
            raise FormulaError(f"offset term {name!r} in {formula!r} cannot interact with other terms")
    for j in (j for j in offsets if not made_by(names[j], own_calls)):
        # log(expected) of a zero or negative count: -inf or NaN, never a silent fit
        bad = np.flatnonzero(~np.isfinite(values[:, j]))
        if bad.size:
            hint = " (the log of a zero or negative value: expected counts and exposures must be positive)" \
                if "log(" in names[j] else ""
            raise DataError(f"offset term {names[j]!r} in {formula!r} is not finite in {bad.size} row(s), "
                            f"the first at position {bad[0]}{hint}")
    if not offsets:  # the matrix itself: a column gather would copy a long frame's rows for nothing
        return values, list(names), np.zeros(values.shape[0]), ()
    keep = [j for j in range(len(names)) if j not in offsets]
    return values[:, keep], [names[j] for j in keep], values[:, offsets].sum(axis=1), tuple(names[j] for j in offsets)


def aligned_by_labels(value, data: pd.DataFrame, name: str):
    """``value`` (``weights=``, ``offset=``) as given, or where it is a pandas Series whose index is not data's,
    reindexed to data's row labels, as pandas aligns a Series (read by position, a Series in another order was a
    silently wrong fit).  A Series that does not hold each of data's labels once is refused, naming ``name``."""
    if not isinstance(value, pd.Series) or value.index.equals(data.index):
        return value
    if not (value.index.is_unique and data.index.is_unique and len(value) == len(data)
            and value.index.isin(data.index).all()):
        raise ArgumentError(f"{name} is a pandas Series whose index does not hold data's row labels once each: "
                            "give it data's index, or pass a column name or an array in data's row order")
    return value.reindex(data.index)


def numeric_row_values(value, name: str) -> np.ndarray:
    """``weights=`` / ``offset=`` given as values (an array, a Series, a list) as floats, refused by name where they
    are not numbers: text ("2", "0.5") or a Categorical of text was read as numbers where the same text as a
    column is refused, and true/false values as 0/1 (the forty-third session's probe)."""
    kind = getattr(value, "dtype", None)
    if isinstance(kind, pd.CategoricalDtype):  # (refused as a column too: its values are labels)
        raise ArgumentError(f"{name} must be numbers, got a Categorical (of {list(kind.categories[:3])}...)")
    if kind is None:
        kind = np.asarray(value).dtype
    if kind is not None and (pd.api.types.is_bool_dtype(kind) or not (pd.api.types.is_numeric_dtype(kind)
                                                                       or kind == object)):
        raise ArgumentError(f"{name} must be numbers, got values of dtype {kind}")
    try:
        values = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a column name or a numeric array, got {type(value).__name__}") from None
    if kind == object and any(isinstance(v, (str, bytes, bool, np.bool_)) for v in np.asarray(value).ravel()):
        raise ArgumentError(f"{name} must be numbers, got text or true/false values among them")
    return values


def _row_argument(data: pd.DataFrame, value, name: str):
    """(column label in data or None, values aligned with data's rows or None) of weights= / offset=."""
    if value is None:
        return None, None
    if isinstance(value, str):
        check_columns(data, [value], f"argument {name}")
        check_unique_columns(data, [value])
        column = data[value]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"{name} column {value!r} must be numeric, got dtype {column.dtype}")
        return value, None
    values = numeric_row_values(aligned_by_labels(value, data, name), name)
    if values.ndim != 1 or values.shape[0] != data.shape[0]:
        raise ArgumentError(
            f"{name} must be a column name or an array with one value per row of data "
            f"({data.shape[0]}), got shape {values.shape}"
        )
    return None, pd.Series(values, index=data.index)


def aliased_columns(X: np.ndarray, tol: float = RANK_TOL) -> np.ndarray:
    """Indices of columns of X that are linear combinations of the columns before them.

    Mirrors R's LINPACK ``qr`` (used by lme4's ``chkRank.drop.cols``): columns
    are taken left to right and a column whose residual norm, after projecting
    out the columns kept so far, is below ``tol`` times its own norm is aliased.

    From :data:`GRAM_SCREEN_MIN_ROWS` rows, X'X is screened first (:func:`gram_clear`): where it clears every
    column, none is aliased.  Where no column is aliased (nearly always), Householder QR's |R_jj| is that residual
    norm of every column at once: one LAPACK call in place of the column-by-column projections (benchmarks/RESULTS.md, twenty-second
    session).  Otherwise the columns after the first aliased one are projected on the kept ones only, column by column.
    """
    if X.shape[0] >= GRAM_SCREEN_MIN_ROWS and X.shape[1] and tol <= GRAM_SCREEN:
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflowed Gram is not clear: QR decides)
            gram = X.T @ X
        if gram_clear(gram[None])[0]:
            return np.zeros(0, dtype=int)
    if X.shape[0] >= X.shape[1]:
        R = np.linalg.qr(X, mode="r")
        norms = np.linalg.norm(R, axis=0)  # ||X_j|| = ||Q R_j|| = ||R_j||
        if not np.all(np.isfinite(norms)) and np.all(np.isfinite(X)):  # values near 1e160 overflowed a norm (reported
            # aliased, leaving an intercept-only fit): each column on
            scale = largest_magnitudes(X)  # its own scale, the test being scale-free per column
            return aliased_columns(X / np.where(scale > 0, scale, 1.0), tol)
        if np.all(np.abs(np.diagonal(R)) > tol * norms):  # (a zero column fails: 0 > 0)
            return np.zeros(0, dtype=int)
    kept: list[int] = []
    aliased: list[int] = []
    basis = np.zeros((X.shape[0], 0))
    for j in range(X.shape[1]):
        column = X[:, j]
        norm = np.linalg.norm(column)
        residual = column - basis @ (basis.T @ column) if basis.shape[1] else column
        if norm == 0 or np.linalg.norm(residual) <= tol * norm:
            aliased.append(j)
            continue
        kept.append(j)
        residual = residual - basis @ (basis.T @ residual) if basis.shape[1] else residual  # re-orthogonalize
        basis = np.column_stack([basis, residual / np.linalg.norm(residual)])
    return np.asarray(aliased, dtype=int)


#: Rows from which :func:`aliased_columns` screens X's Gram matrix first (:func:`aliased_within` with one group), the
#: QR only where the screen is unclear: on a long frame X'X costs a fraction of the QR (benchmarks/RESULTS.md,
#: forty-fifth session).
GRAM_SCREEN_MIN_ROWS = 100_000


def unique_codes(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(codes, return_inverse=True)`` for integer codes below ``size``: where ``size`` is at most a few
    times the codes' count and no code is negative, by marking the codes present and counting them (linear time,
    where ``np.unique`` sorts: most of a large batch's grouping time), else by ``np.unique`` itself."""
    codes = np.asarray(codes, dtype=np.int64)
    if size > 4 * codes.size + 1024 or (codes.size and codes.min() < 0):  # a negative code would mark the last slot
        return np.unique(codes, return_inverse=True)
    present = np.zeros(size, dtype=bool)
    present[codes] = True
    rank = np.cumsum(present) - 1
    return np.flatnonzero(present), rank[codes]


def label_collision(name: str, uniques) -> str:
    """Why a grouping column whose distinct values ``uniques`` read as one level in R (``as.character``; a
    whole-number float as the integer) is refused ("" where none do): 3 and "3" were two groups both labelled "3"
    (ranef rows alike, new data matched to one), 3.0 beside "3" two groups "3.0" and "3".  Labels of other types
    that do not meet (7 beside "g1") are read as before."""
    labels = [level_label(value) for value in uniques]
    if len(set(labels)) == len(labels):
        return ""
    label = pd.Series(labels)[pd.Series(labels).duplicated()].iloc[0]
    kinds = sorted({type(value).__name__ for value, text in zip(uniques, labels) if text == label})
    return (f"grouping column {name!r} holds values of types {', '.join(kinds)} that all read as the level {label!r}: "
            "they would be different groups; give the column one type (.astype(str))")


def sorted_levels(column: pd.Series):
    """(codes, uniques) of a grouping column that is not a Categorical, in R's order: sorted values (numbers as
    numbers, text as text), or the order of appearance where its values cannot be sorted together (mixed types)."""
    if isinstance(column.dtype, pd.StringDtype):  # its Python strings as one object array: the hash table's input
        column = column.to_numpy(dtype=object)    # without the extension array's detour (RESULTS.md, 45th session)
    try:
        return pd.factorize(column, sort=True)
    except TypeError:  # mixed types that cannot be sorted
        return pd.factorize(column, sort=False)


def group_index(frame: pd.DataFrame, factor: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Level index and level labels of the interaction of the columns in ``factor``.

    Levels are ordered as R orders ``factor(a:b)`` with unused levels dropped:
    lexicographically by the levels of each column (categories order for a
    categorical column, sorted values otherwise), first column slowest.
    """
    codes = np.zeros(frame.shape[0], dtype=np.int64)
    size = 1
    columns: list[tuple[np.ndarray, np.ndarray]] = []  # each column's codes and level labels
    for name in factor:
        column = frame[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            column = column.cat.remove_unused_categories()
            col_codes, uniques = column.cat.codes.to_numpy(), column.cat.categories.to_numpy()
        else:
            col_codes, uniques = sorted_levels(column)
            if column.dtype == object and (collision := label_collision(name, uniques)):
                raise DataError(collision)
        codes = codes * len(uniques) + col_codes
        size *= len(uniques)
        columns.append((col_codes, np.asarray(column_labels(uniques), dtype=object)))  # (R's labels: spec.labels)
    uniq, inverse = unique_codes(codes, size)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(codes))[::-1]  # a row of each level, to read its labels
    labels = columns[0][1][columns[0][0][first]].astype(str)
    for col_codes, names in columns[1:]:
        labels = np.char.add(np.char.add(labels, ":"), names[col_codes[first]].astype(str))
    return inverse.astype(np.int32), labels


def _random_term(frame: pd.DataFrame, spec: RandomTermSpec, logical=(), own_calls: tuple[str, ...] = ()
                 ) -> RandomEffectTerm:
    """Term ``spec``'s columns and levels; ``logical``: the logical columns whose uses as terms its left side writes
    as factors (:func:`logical_factors`, :func:`~hierpool.spec.formula.with_logical_factors`)."""
    what = f"random-effect term ({display_name(spec.lhs)} | {spec.name})"
    lhs = with_logical_factors(spec.lhs, logical)
    plain = plain_part(lhs)
    if plain is not None and plain.readable(frame):
        z_names, z, z_matrix = plain.column_names, plain.matrix(frame), plain
    else:
        dm = _design_matrices(lhs, frame, what)
        if dm.common is None:  # (1 + 0 | g): formulae's matrix of no columns is None (an AttributeError followed)
            raise FormulaError(f"{what} has no columns (its intercept removed and nothing else): a random-effect "
                               "term needs at least one, (1 | g) or (0 + x | g)")
        (z_names, z), z_matrix = matrix_columns(dm.common), dm.common
    if any("offset(" in c for c in z_names):
        raise FormulaError(f"{what} has an offset; an offset belongs to the fixed part of the formula")
    values = np.asarray(z, dtype=float).reshape(len(frame), -1)
    checked = [j for j, name in enumerate(z_names) if not made_by(display_name(name), own_calls)]  # (build_design's)
    check_finite_columns(values[:, checked], [z_names[j] for j in checked], frame.index, what)
    index, levels = group_index(frame, spec.factor)
    return RandomEffectTerm(
        group=spec.name,
        coef_names=tuple(display_name(c) for c in z_names),
        levels=levels,
        index=index,
        z=np.ascontiguousarray(z),
        spec=spec,
        z_matrix=z_matrix,
    )


def lme4_term_order(n_levels: list[int]) -> list[int]:
    """Order lme4 gives random-effect terms: by decreasing number of levels.

    lme4's ``mkReTrms`` applies ``rev(order(nl))`` only when some later term has
    more levels than an earlier one, so ties keep a reversed order then.
    """
    n_levels_arr = np.asarray(n_levels)
    if np.any(np.diff(n_levels_arr) > 0):
        return list(np.argsort(n_levels_arr, kind="stable")[::-1])
    return list(range(len(n_levels)))


#: Where the Gram matrix's screen gives every column a residual ratio above this, no column is aliased at
#: :data:`RANK_TOL` (the Gram's rounding, ~n eps in the squared ratio, is far below its square); below it, a group's
#: rows are checked by :func:`aliased_columns` itself.
GRAM_SCREEN = 1e-4


#: A random-effect term's column whose residual after the term's earlier columns is below this fraction of its norm
#: (zero, or a copy of them: a slope on a constant) leaves its variance unidentified: refused
#: (:func:`term_columns_message`).  Far stricter than :data:`RANK_TOL`: a slope on a covariate far from zero
#: (x + 1e7, timestamps), nearly a copy of the intercept, is identified and fitted on conditioned columns.
TERM_RANK_TOL = 1e-12


def term_columns_message(label: str, names) -> str:
    """Why a random-effect term whose columns ``names`` are zero or copies of its earlier ones is refused."""
    return (f"random-effect term {label} has column(s) {', '.join(names)} zero or a copy of its earlier columns: "
            "their variances are not identified; drop them from the term")


def copied_columns(term) -> list[str]:
    """The names of a random-effect term's columns that are zero or copies of its earlier ones
    (:data:`TERM_RANK_TOL`: ``(1 + z | g)`` with z constant, ``(0 + z | g)`` with z zero): the term's covariance is
    then not identified.  Within a term only: terms on one factor whose columns are dependent may still be
    identified by their separate variances (compound symmetry beside per-level variances, which lme4 fits)."""
    return [term.coef_names[j] for j in aliased_columns(term.z, TERM_RANK_TOL)]


def aliased_within(X: np.ndarray, group: np.ndarray, n_groups: int, gram: np.ndarray | None = None,
                   tol: float = RANK_TOL) -> dict:
    """group -> the columns (indices) :func:`aliased_columns` drops among that group's rows of X, for the groups with
    some (``group`` each row's; ``hp.fit_batch``'s datasets; a group with no rows has all p), without a QR per
    group where none is near aliased.  ``gram``: each group's X'X (n_groups, p, p) where the caller has it (the
    one-term batch's statistics without prior weights).  ``tol``: :func:`aliased_columns`'.

    Each group's Gram matrix of X's columns scaled to unit norm is factored (Cholesky, column by column, vectorized
    over groups): its j-th pivot is the squared residual ratio of column j after the columns before it, the
    quantity :func:`aliased_columns` compares with :data:`RANK_TOL`.  Groups whose every ratio clears
    :data:`GRAM_SCREEN` have none aliased; the others are checked by :func:`aliased_columns` on their rows.  (The
    batch's rank from the eigenvalues of X'X said 1 of 2 for a column 20,000 +- 10, which the single fit keeps:
    the eigenvalues of X'X resolve the ratio only to sqrt(eps) of its largest one.)
    """
    p = X.shape[1]
    if p == 0:
        return {}
    if gram is None:
        gram = np.zeros((n_groups, p, p))
        for a in range(p):
            for b in range(a + 1):
                gram[:, a, b] = gram[:, b, a] = np.bincount(group, weights=X[:, a] * X[:, b], minlength=n_groups)
    clear = gram_clear(gram)
    aliased = {}
    unclear = np.flatnonzero(~clear)
    if unclear.size:
        order = np.argsort(group, kind="stable")
        starts = np.searchsorted(group[order], np.arange(n_groups + 1))
        for g in unclear:
            rows = order[starts[g]:starts[g + 1]]
            columns = np.arange(p) if not rows.size else aliased_columns(X[rows], tol)
            if columns.size:
                aliased[int(g)] = columns
    return aliased


def gram_clear(gram: np.ndarray) -> np.ndarray:
    """Whether each group's Gram matrix ``gram`` (n_groups, p, p) of X's columns shows none of them aliased
    (:func:`aliased_within`'s screen): every squared residual ratio of a column after those before it, the pivots
    of the Cholesky factor of the columns scaled to unit norm, above :data:`GRAM_SCREEN` squared.  A group whose
    Gram overflowed (values near 1e160) or has a zero column is not clear."""
    p = gram.shape[1]
    norms = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
    clear = np.all(norms > 0, axis=1)
    scale = np.where(norms > 0, norms, 1.0)
    with np.errstate(all="ignore"):  # a group with a near-zero pivot or an overflowed Gram is not clear
        unit = gram / scale[:, :, None] / scale[:, None, :]
        lower = np.zeros_like(unit)
        for j in range(p):
            pivot = unit[:, j, j] - np.sum(lower[:, j, :j] ** 2, axis=1)
            clear &= pivot > GRAM_SCREEN**2
            root = np.sqrt(np.where(pivot > 0, pivot, 1.0))
            lower[:, j, j] = root
            below = unit[:, j + 1:, j] - np.einsum("gik,gk->gi", lower[:, j + 1:, :j], lower[:, j, :j])
            lower[:, j + 1:, j] = below / root[:, None]
    return clear


def _check_identifiable(terms: list[RandomEffectTerm], n: int, sigma_known: bool, related: tuple = (),
                        own_calls: tuple[str, ...] = ()) -> None:
    for term in terms:
        # (columns each dataset's own design makes, build_design's own_calls, are its to check)
        copies = [name for name in copied_columns(term) if not made_by(name, own_calls)]
        if copies:  # (a zero slope column gave a theta left at its start; a constant one a correlation of -1)
            raise DataError(term_columns_message(term.label, copies))
    for term in terms:
        # with known residual sds one observation per group is identifiable (meta-analysis), and so it is with a
        # relationship matrix (the animal model: relatives' records tell sigma_A^2 from sigma^2)
        problem = term_count_problem(term.group, term.coef_names, term.n_levels, n,
                                     sigma_known or term.group in related, str(term.levels[0]))
        if problem:
            raise DataError(problem)


def term_count_problem(group: str, coef_names, n_levels: int, n: int, sigma_known: bool,
                       first_level: str | None = None) -> str:
    """Why a random-effect term of ``n_levels`` levels of ``group`` (coefficients ``coef_names``) cannot be fitted
    to ``n`` observations ("" where it can): fewer than two levels, or, unless the residual variance is known
    (``sigma_known``), as many levels or random effects as observations, whose variance the residual's cannot be
    told from.  ``first_level``: the only level's label, named in the message.  The single fit's rule and words
    (:func:`build_design`), which a batch gives in a dataset's row."""
    if n_levels < 2:
        level = "" if first_level is None else f" ({first_level!r})"
        return f"grouping factor {group!r} has only one level{level}; a random effect needs at least two groups"
    if sigma_known:
        return ""
    if n_levels >= n:
        return (f"grouping factor {group!r} has {n_levels} levels for {n} observations; it must have fewer levels "
                "than observations or the random-effect and residual variances cannot be told apart")
    if n_levels * len(coef_names) >= n:
        return (f"random-effect term ({' + '.join(coef_names)} | {group}) has {n_levels * len(coef_names)} random "
                f"effects for {n} observations; there must be fewer random effects than observations")
    return ""


def residual_df_problem(p: int, n: int) -> str:
    """Why a fixed part of ``p`` independent columns leaves nothing of ``n`` observations for the residual variance
    ("" where it does not): :func:`check_residual_df`'s words, which a batch gives in a dataset's row."""
    if p < n:
        return ""
    return (f"the fixed part has {p} independent columns for {n} observations: nothing is left for the residual "
            "variance (a column of numbers stored as text is a factor, a level per row)")


def error_contrast_problem(p: int, n: int, reml: bool, sigma_known: bool) -> str:
    """Why REML cannot fit known residual sds (``se=``) to ``n`` observations of ``p`` independent fixed-effect
    columns ("" where it can): its criterion is the likelihood of the n - p error contrasts, and with none left it
    is flat in theta, whose fit stopped wherever rounding left it (reported unconverged on one machine, converged
    at its start on another).  ML is defined there; without known sds :func:`residual_df_problem` refuses such data
    already.  A batch gives these words in the dataset's row."""
    if not (reml and sigma_known) or n > p:
        return ""
    return (f"REML with known residual sds (se=) and {n} observations for {p} fixed effects leaves no error "
            "contrast: the variance components are not identified; fit by ML (reml=False), or give more observations")


def check_residual_df(design: Design) -> None:
    """Refuse a linear mixed model whose fixed part has as many independent columns as rows (a text column of numbers
    read as a factor, a level per row; ``poly(x, n)``): nothing is left for the residual variance, and the fit
    ended in "objective is not finite at the starting value", naming nothing.  Known residual sds (``se=``) need
    none; a GLMM's and a posterior's (proper priors) own checks apply there."""
    problem = "" if design.sigma_known else residual_df_problem(design.p, design.n)
    if problem:
        raise DataError(problem)


def known_sd(frame: pd.DataFrame, se: str, what: str = "") -> np.ndarray:
    """The known residual sds of column ``se`` of ``frame`` (``what``: the data it is in, for the messages),
    refused by name where not numeric, positive and finite."""
    column = frame[se]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise DataError(f"se column {se!r}{what} must be numeric, got dtype {column.dtype}")
    values = column.to_numpy(dtype=float)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = int(np.sum(~np.isfinite(values) | (values <= 0)))
        raise DataError(f"se column {se!r}{what} must be positive and finite; it has {bad} values that are not")
    return values


def formula_columns(spec: ModelSpec, data: pd.DataFrame) -> tuple[str, ...]:
    """The data columns a formula reads: its names less those the environment defines (``Sum``, ``np``).

    A name that is neither a column of ``data`` nor defined is reported as a missing column.
    """
    grouping = [v for term in spec.random for v in term.factor if v not in data.columns]
    check_columns(data, grouping, f"grouping factor of formula {spec.formula!r}")  # never a function or constant
    missing = [v for v in spec.variables if v not in data.columns]
    if missing:  # names the caller's namespace or formulae define are not columns
        from .transforms import FORMULAE_NAMES, caller_environment

        defined = caller_environment().namespace
        missing = [v for v in missing if v not in defined and v not in FORMULAE_NAMES]
        codings = [v for v in missing if re.search(rf"\bC\([^(),]+,\s*{re.escape(v)}\s*[,)]", spec.formula)]
        if codings:  # C(f, contr.sum): R's name of a coding, read as a column
            raise FormulaError(f"formula {spec.formula!r} codes a factor by {codings[0]!r}, which is not a coding "
                               "hierpool knows: C(f, Treatment) and C(f, Sum) are R's contr.treatment and contr.sum, "
                               "C(f, contr_poly) R's contr.poly; another coding can be built as columns in the data")
    check_columns(data, missing, f"formula {spec.formula!r}")
    used = tuple(v for v in spec.variables if v in data.columns)
    check_unique_columns(data, used)
    if "Intercept" in used:  # formulae names the column of ones so: a column of that name would replace it
        raise DataError("a data column named 'Intercept' clashes with the name of the intercept; rename the column")
    return used


def _positive_weights(frame: pd.DataFrame, column: str, what: str) -> np.ndarray:
    values = frame[column].to_numpy(dtype=float)
    bad = int(np.sum(values <= 0))
    if bad:
        raise DataError(f"{what} must be positive; it has {bad} values <= 0 (drop those rows first)")
    return values


#: The largest geometric mean of a linear model's prior weights, and its inverse the smallest: weights times c leave
#: the model as it is (sigma^2 times c, theta over sqrt(c)), but from c = 1e13 hp.fit_batch stopped above the optimum
#: (1.6e-5 at 1e13, 0.037 at 1e16) and hp.lmm from 1e14 (0.0034), some reported converged (the forty-third session's
#: probe); 1e10 either way fits to rounding.
WEIGHTS_SCALE = 1e10


def weights_decades(weights, groups=None, n_groups: int = 1):
    """The mean log10 of prior weights (of each group's rows, ``groups`` (N,) codes below ``n_groups``): the decade
    of their geometric mean, their scale.  The one home of that scale: the refusal beyond :data:`WEIGHTS_SCALE`
    (:func:`check_weights_scale`, and a batch's per dataset) and theta's units in the weights' units
    (:func:`hierpool.algebra.linalg.weights_unit`)."""
    logs = np.log10(np.asarray(weights, dtype=float))
    if groups is None:
        return float(np.mean(logs))
    return np.bincount(groups, weights=logs, minlength=n_groups) / np.maximum(np.bincount(groups,
                                                                                          minlength=n_groups), 1)


def weights_beyond_scale(decades):
    """Whether weights of mean log10 ``decades`` (:func:`weights_decades`) are beyond :data:`WEIGHTS_SCALE`."""
    return np.abs(decades) > np.log10(WEIGHTS_SCALE)


#: Widest spread (largest over smallest) of a linear model's row weights, prior weights or known sds' 1 / se^2, that
#: its fit holds to its digits: the normal equations' sums keep the other rows to about eps times the spread.  One
#: row's prior weight 1e10 times the others' left the REML criterion 2e-8 of itself from its limit, 1e12 times 2e-6
#: and 1e14 times 2e-5 (the batch's fit then 2e-3 from hp.lmm's); a known sd 1e-7 of the others' (1e14) moved it by
#: 0.3, a wrong fit reported converged, and below 1e-154 (1 / se^2 beyond a float) NumPy's LinAlgError escaped
#: (the fifty-eighth session's probe and its review).
WEIGHTS_SPREAD = 1e10


def within_weights_spread(smallest, largest):
    """Whether row weights from ``smallest`` to ``largest`` (arrays: a batch's datasets) are finite, positive and
    within :data:`WEIGHTS_SPREAD` of each other (:func:`weights_spread_problem`'s test)."""
    return np.isfinite(largest) & (smallest > 0) & (largest <= WEIGHTS_SPREAD * smallest)


def weights_spread_problem(weights: np.ndarray, what: str, known_sds: bool = False) -> str:
    """Why a linear model's row ``weights`` (``known_sds``: 1 / se^2) cannot be fitted ("" where they can): their
    spread beyond :data:`WEIGHTS_SPREAD`, in the units the user gave (sds, or weights).  A batch gives these words in
    a dataset's row."""
    weights = np.asarray(weights, dtype=float)
    if weights.size == 0 or within_weights_spread(weights.min(), weights.max()):
        return ""
    if not known_sds:  # (prior weights not finite and positive are refused before: _positive_weights)
        return (f"{what}: its largest weight is more than {WEIGHTS_SPREAD:.0e} times its smallest, where the fit "
                "loses its digits: are the weights in different units?")
    if not (np.isfinite(weights.max()) and weights.min() > 0):
        return (f"{what}: its sds must lie within 1e-154 .. 1e154, where 1 / se^2 is a float (the fit's weights): "
                "are they in the response's units?")
    return (f"{what}: its largest sd is more than {np.sqrt(WEIGHTS_SPREAD):.0e} times its smallest (weights 1 / se^2 "
            f"more than {WEIGHTS_SPREAD:.0e} apart), where the fit loses its digits: is a row known that precisely "
            "(it would pin the fit through it), or are the sds in different units?")


def check_weights_scale(weights: np.ndarray, what: str) -> None:
    """Refuse a linear model's prior weights whose geometric mean is beyond :data:`WEIGHTS_SCALE` either way, by
    name, with what to do (divide them by a constant: only sigma changes)."""
    decades = weights_decades(weights)
    if weights_beyond_scale(decades):
        scale = 10.0**decades
        raise DataError(f"{what}: the weights' geometric mean is {scale:.3g}, beyond {1 / WEIGHTS_SCALE:.0e} .. "
                        f"{WEIGHTS_SCALE:.0e}, where the fit loses digits: divide them by a constant (the model is "
                        "the same: only sigma, in the weights' units, changes)")


def build_design(
    formula: str,
    data: pd.DataFrame,
    se: str | None = None,
    weights=None,
    offset=None,
    family: FamilySpec | None = None,
    related: tuple[str, ...] = (),
    random_optional: bool = False,
    spatial: bool = False,
    datasets: str | None = None,
    own_calls: tuple[str, ...] = (),
) -> Design:
    """Check the data against the formula and build the :class:`Design`.

    Parameters
    ----------
    formula : str
        lme4-style formula (see :mod:`hierpool.spec.formula`); its calls are looked up as
        :mod:`hierpool.spec.transforms` describes.
    data : pandas.DataFrame
        Not modified.
    se : str, optional
        Column of known residual standard deviations, one per row.
    weights : str or array-like, optional
        Prior weights w_i (a column name or one value per row of data): row i has
        residual variance sigma^2 / w_i, as lmer's ``weights``.
    offset : str or array-like, optional
        A known term added to the linear predictor, as lmer's ``offset``; added to
        any ``offset(...)`` terms of the formula.
    family : FamilySpec, optional
        A GLMM's family (:func:`hierpool.spec.family.family_spec`): the response may then be
        ``cbind(successes, failures)`` or a two-level factor (binomial), is checked against the
        family, and a term may have one level per observation (no residual to confound it with).
    related : tuple of str
        Grouping factors with a known relationship matrix (``relmat=``): they may have one level per
        observation too.
    random_optional : bool
        Accept a formula without random-effect terms (``terms`` is then empty): a generalized
        least-squares model with correlated residuals (:mod:`hierpool.closedform.gls`).
    spatial : bool
        Accept ``car(...)`` terms (:mod:`hierpool.spec.spatial` builds them; here their area columns are only read,
        so that rows missing an area are dropped with the rest).  Without it a ``car(...)`` term is refused.
    datasets : str, optional
        The column naming each row's dataset, where ``data`` is a batch's long frame: the dropped rows' warning
        says which datasets they were in, and the weights' spread (:func:`weights_spread_problem`) is left to the
        batch, which judges each dataset's own.
    own_calls : tuple of str
        Where ``data`` is a batch's long frame: calls whose columns each dataset takes from its own design
        (:mod:`hierpool.batch.dataset_transforms`: ``scale(x)``, a user's ``demean(x)``).  Their fixed-effect
        columns here pool every dataset's values, so they are neither checked (finite, in range) nor dropped as
        aliased, nor are such random-effect columns, offset terms or response checked: each dataset's own design
        checks its own.

    Returns
    -------
    Design
    """
    counts_response = isinstance(formula, str) and re.match(r"\s*cbind\s*\(", formula)
    if family is not None and family.name != "binomial" and counts_response:
        raise FormulaError(f"the response of {formula!r} is cbind(successes, failures), a binomial count; "
                           f"family {family.name!r} takes counts (use family='binomial')")
    spec = parse_formula(formula, binomial_counts=family is not None and family.name == "binomial",
                         random_optional=random_optional)
    if spec.spatial and not spatial:
        raise FormulaError(f"{spec.spatial[0].label} in {formula!r} is a spatial term: give the areas' neighbourhood "
                           "graph as adjacency= (hp.lmm, hp.glmm and hp.bayes take it)")
    _check_frame(data)
    columns = formula_columns(spec, data)
    if family is not None and se is not None:
        raise ArgumentError("se (known residual sds) is for Gaussian models; a GLMM has no residual variance")
    if se is not None and weights is not None:
        raise ArgumentError(
            "give either se (known residual sds) or weights (prior weights, sigma estimated), not both"
        )
    used = list(columns)
    if se is not None:
        if not isinstance(se, str):
            raise DataError(f"se must name a column of data, got {type(se).__name__}")
        check_columns(data, [se], "argument se")
        if se not in used:
            used.append(se)
    weights_column, weights_values = _row_argument(data, weights, "weights")
    offset_column, offset_values = _row_argument(data, offset, "offset")
    for column in (weights_column, offset_column):
        if column is not None and column not in used:
            used.append(column)
    check_unique_columns(data, used)  # (the weights, offset and se columns too)
    frame = data.loc[:, used].copy()
    if weights_values is not None:
        frame[WEIGHTS_COLUMN] = weights_values
    if offset_values is not None:
        frame[OFFSET_COLUMN] = offset_values
    frame, n_dropped = _drop_missing(frame, spec.formula, None if datasets is None else data[datasets])
    frame = float64_values(frame)  # before any arithmetic: cbind(s, 2 * n - s), I(t - 50), log(c)
    check_value_types(frame, [name for name in spec.values if name in columns])  # not Sum, np, log...
    trials = None
    fixed_spec = spec
    if family is not None and family.name == "binomial":
        # cbind(s, f) and two-level factors are read here; the fixed part then reads the proportions
        counts = binomial_counts(frame, spec.response)
        indicator = None if counts is not None else two_level_indicator(frame, spec.response)
        if counts is not None or indicator is not None:
            proportions, trials = counts if counts is not None else (indicator, None)
            if trials is not None and np.any(trials == 0):  # no trials, no information (glmer gives them weight 0)
                keep = trials > 0
                if not keep.any():  # (NumPy's error of an empty response followed)
                    raise DataError(f"response {spec.response!r} has 0 trials in every row: there is nothing to fit")
                warn_at_caller(f"dropped {int(np.sum(~keep))} row(s) with no trials in response {spec.response!r}")
                frame, proportions, trials = frame.loc[keep].copy(), proportions[keep], trials[keep]
            frame[RESPONSE_COLUMN] = proportions
            rhs = spec.fixed.split("~", 1)[1]
            fixed_spec = replace(spec, response=RESPONSE_COLUMN, fixed=f"{RESPONSE_COLUMN} ~{rhs}")
    model_frame = frame  # lme4's model.frame: the used columns of the fitted rows (hp.bootstrap refits from it)
    # a logical a term reads: a factor of levels False, True, as lme4 codes it (in the frame, or where a call reads
    # its values too, by the term: logical_factors)
    in_calls = names_in_calls(spec.fixed.split("~", 1)[1], *(term.lhs for term in spec.random))
    logical = logical_factors(frame, columns, in_calls, (spec.response, fixed_spec.response))
    if logical:
        response_part, rhs = fixed_spec.fixed.split("~", 1)
        fixed_spec = replace(fixed_spec, fixed=f"{response_part}~{with_logical_factors(rhs, logical)}")
    # read as values: what a call reads, the response, the weights, offset and se columns
    frame = _plain_numeric(frame, as_values=in_calls | {spec.response, fixed_spec.response, se, weights_column,
                                                        offset_column})
    _check_finite(frame)

    own_response = made_by(spec.response, own_calls)  # (a batch's response each dataset's own design checks)
    y, (fixed_names, fixed_values), fixed_matrix = _fixed_part(fixed_spec, frame, spec.response, not own_response)
    X, names, offset_sum, offset_terms = _split_offsets(fixed_names, fixed_values, formula, own_calls)
    names = tuple(display_name(c) for c in names)
    checked = np.array([j for j, name in enumerate(names) if not made_by(name, own_calls)], dtype=int)
    check_finite_columns(X[:, checked], [names[j] for j in checked], frame.index, "fixed-effect")
    dropped = checked[aliased_columns(X[:, checked])] if checked.size else np.zeros(0, dtype=int)
    aliased = tuple(names[j] for j in dropped)
    if aliased:
        warn_at_caller(f"fixed-effect model matrix is rank deficient: dropping {len(aliased)} column(s) "
                       f"aliased with earlier ones: {', '.join(aliased)}")
        keep = np.setdiff1d(np.arange(X.shape[1]), dropped)
        X, names = X[:, keep], tuple(names[j] for j in keep)
    offset_argument = None if offset is None else ("column" if offset_column is not None else "array")
    if offset is not None:
        offset_sum = offset_sum + frame[offset_column or OFFSET_COLUMN].to_numpy(dtype=float)

    terms = [_random_term(frame, t, logical, own_calls) for t in spec.random]
    terms = [terms[j] for j in lme4_term_order([t.n_levels for t in terms])]
    if se is not None:
        row_weights = 1.0 / known_sd(frame, se) ** 2
        what, sds = f"se column {se!r}", True
    elif weights is not None:
        what, sds = "weights" + (f" column {weights_column!r}" if weights_column else ""), False
        row_weights = _positive_weights(frame, weights_column or WEIGHTS_COLUMN, what)
        if family is None:
            check_weights_scale(row_weights, what)
    else:
        row_weights = None
    # a batch's long frame (datasets): each dataset's spread is its own, checked by the batch's plan
    problem = "" if row_weights is None or family is not None or datasets is not None else \
        weights_spread_problem(row_weights, what, known_sds=sds)
    if problem:
        raise DataError(problem)
    if family is not None:
        if trials is not None:  # cbind's trials, times any prior weights
            row_weights = trials if row_weights is None else trials * row_weights
        # a binomial's trials are its prior weights (proportions with weights=, or cbind)
        if not own_response:
            check_response(family, y, row_weights, spec.response)
    _check_identifiable(terms, len(y), sigma_known=se is not None or family is not None, related=related,
                        own_calls=own_calls)
    # the response's magnitude, as a model column's: beyond 1e150 or below 1e-140 the criterion overflowed or
    # underflowed at the start, an error that named nothing; its residuals, some digits smaller, need more room below
    if not own_response:
        check_finite_columns(y[:, None], [spec.response], frame.index, "response", smallest=RESPONSE_SMALLEST)
    if family is None and np.ptp(y - offset_sum) == 0:  # (offset = y: the search found no finite criterion)
        raise DataError(f"response {spec.response!r} less the offset is constant ({float(y[0] - offset_sum[0])!r}): "
                        "there is no variation to model")
    _warn_vanished_factors(frame, spec, names, terms)
    return Design(
        spec=spec,
        y=y,
        X=np.ascontiguousarray(X),
        fixed_names=names,
        terms=tuple(terms),
        weights=row_weights,
        sigma_known=se is not None,
        offset=offset_sum,
        columns=columns,
        offset_terms=offset_terms,
        offset_column=offset_column,
        offset_argument=offset_argument,
        weights_column=weights_column,
        rows=frame.index,
        n_dropped=n_dropped,
        aliased=aliased,
        fixed_matrix=fixed_matrix,
        family=family,
        frame=model_frame,
        se_column=se,
    )
