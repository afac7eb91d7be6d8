"""The rows to predict, encoded as the fitted design encodes its own: the fixed-effect matrix,
each random-effect term's columns and levels, the offset, and the prior weights.

New data must carry every column the formula reads (the offset's too).  The fitted
formulae matrices encode them, so stateful transforms (``scale``, ``center``,
``poly``) apply the fitted data's parameters and contrasts are the fitted ones; a
level never seen in fitting gets index -1.  Shared by the closed-form and the
Bayesian predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ArgumentError, DataError
from .columns import PlainPart
from .design import check_columns, check_finite_columns, float64_values, group_index, known_sd, quiet_arithmetic
from .formula import display_name, response_only_names, without_coding_calls
from .r_coding import RCodedPart


def _encode_frame(matrix, frame: pd.DataFrame, what: str) -> pd.DataFrame:
    try:
        if isinstance(matrix, (PlainPart, RCodedPart)):  # read without formulae (spec.columns), or R's columns
            return matrix.new_rows(frame)
        with quiet_arithmetic():  # (a non-finite value is refused by name after)
            encoded = matrix.evaluate_new_data(frame).as_dataframe()
    except Exception as exc:  # formulae raises several exception types for unseen categories
        raise DataError(f"cannot encode {what} for the new data: {without_coding_calls(str(exc))}") from None
    encoded.index = frame.index
    return encoded


def _encode(matrix, frame: pd.DataFrame, what: str) -> np.ndarray:
    return _encode_frame(matrix, frame, what).to_numpy(dtype=float)


def _fixed_part(design, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(X, offset) of new rows: the fitted X's columns (aliased ones stay dropped) and the offset."""
    if design.fixed_matrix is None:
        return np.zeros((len(frame), 0)), np.zeros(len(frame))
    encoded = _encode_frame(design.fixed_matrix, frame, "the fixed effects")
    offset = encoded.loc[:, list(design.offset_terms)].to_numpy(dtype=float).sum(axis=1)
    if design.offset_column is not None:
        offset = offset + frame[design.offset_column].to_numpy(dtype=float)
    encoded.columns = [display_name(str(c)) for c in encoded.columns]
    return encoded.loc[:, list(design.fixed_names)].to_numpy(dtype=float), offset


def _levels_in_fit(term, frame: pd.DataFrame) -> np.ndarray:
    """Index of each new row's level in the fitted levels; -1 for a level never seen."""
    codes, labels = group_index(frame, term.spec.factor)
    lookup = {label: i for i, label in enumerate(term.levels)}
    return np.asarray([lookup.get(label, -1) for label in labels[codes]], dtype=np.int64)


def _response_only_columns(design) -> set[str]:
    """Columns the formula reads in its response only (``y``; ``incidence`` and ``size`` of
    ``cbind(incidence, size - incidence)``): new data need not carry them."""
    return response_only_names(design.spec) | {design.spec.response}


def _grouping_only_columns(design) -> set[str]:
    """Columns the formula reads only as grouping factors (``Subject`` of ``(Days | Subject)``)."""
    spec = design.spec
    return {name for t in spec.random for name in t.factor} - set(spec.values)


def _as_fitted_logicals(design, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the columns that were logical in fitting as NumPy bools: True/False, nullable booleans, or
    the numbers 0 and 1 (read as False and True; another number is refused by name).  A logical fitted as a factor
    (levels False, True) took 0 and 1 for labels that match no level, so that every row got True's coefficient."""
    fitted = design.frame  # (a grouping factor's labels are matched by their text: not read here)
    logical = [c for c in frame.columns if c in fitted.columns and c in design.spec.values
               and pd.api.types.is_bool_dtype(fitted[c].dtype)]
    converted = {}
    for name in logical:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column.dtype) or (
                column.dtype == object and all(isinstance(value, (bool, np.bool_)) for value in column)):
            converted[name] = column.to_numpy(dtype=bool)
            continue
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float) if column.dtype != object else None
        if values is None or not np.all(np.isin(values, (0.0, 1.0))):
            raise DataError(f"prediction data column {name!r} was true/false in fitting: give True/False (or 0/1) "
                            f"there, got {column.dtype} values such as {column.iloc[0]!r}")
        converted[name] = values == 1.0
    return frame.assign(**converted) if converted else frame


def model_rows(design, newdata, levels_read: bool = True):
    """(X, [(z_j, level_j)], offset) of the rows to predict: the fitted rows when ``newdata`` is None.

    ``level_j`` is each row's index among term j's fitted levels, -1 for a level
    never seen in fitting.  Shared by the closed-form and the Bayesian predictions.
    ``levels_read=False``: the rows' levels are not read (a population-average mean integrates over every group),
    so that ``newdata`` need not carry the columns read only as grouping factors; every ``level_j`` is -1.
    """
    if newdata is None:
        return design.X, [(t.z, t.index.astype(np.int64)) for t in design.terms], design.offset
    if not isinstance(newdata, pd.DataFrame):
        raise DataError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
    if design.offset_argument == "array":
        raise ArgumentError(
            "the model's offset was given as an array, which new data cannot carry; "
            "fit with offset=<column name> (or offset(...) in the formula) to predict new rows"
        )
    unread = _response_only_columns(design) | (set() if levels_read else _grouping_only_columns(design))
    needed = [v for v in design.columns if v not in unread]
    if design.offset_column is not None and design.offset_column not in needed:
        needed.append(design.offset_column)
    check_columns(newdata, needed, "prediction data (newdata)")
    frame = float64_values(newdata.loc[:, needed])  # as in fitting: no formula arithmetic in a narrow dtype
    missing = frame.isna().any(axis=1)
    if missing.any():
        raise DataError(f"prediction data has missing values in {int(missing.sum())} rows; drop or fill them first")
    # a Categorical's unused categories dropped, as in fitting: formulae's C() (an ordered factor's contrasts) takes
    # a column's categories for its levels and refuses those without rows; the fitted levels encode the rows
    categorical = [c for c, dtype in frame.dtypes.items() if isinstance(dtype, pd.CategoricalDtype)]
    if categorical:
        frame = frame.assign(**{c: frame[c].cat.remove_unused_categories() for c in categorical})
    frame = _as_fitted_logicals(design, frame)
    X, offset = _fixed_part(design, frame)
    # a value not finite in new data (inf, or log of 0) predicted inf, NaN or a clamped probability: the fit refuses it
    what = "prediction data (newdata)"
    # (a new row's value may be as small as it is: a column's scale is the fit's concern, smallest=0)
    check_finite_columns(X, design.fixed_names, newdata.index, what, smallest=0.0)
    check_finite_columns(offset[:, None], ["the offset"], newdata.index, what, largest=np.inf, smallest=0.0)
    terms = [
        (_encode(t.z_matrix, frame, f"term ({display_name(t.spec.lhs)} | {t.group})"),
         _levels_in_fit(t, frame) if levels_read else np.full(len(frame), -1, dtype=np.int64))
        for t in design.terms
    ]
    for (z, _), t in zip(terms, design.terms):
        check_finite_columns(z, [f"{name} of ({display_name(t.spec.lhs)} | {t.group})" for name in t.coef_names],
                             newdata.index, what, smallest=0.0)
    return X, terms, offset


def unseen_levels(design, newdata, terms) -> list[np.ndarray]:
    """Per term, each row's index among the levels fitting never saw (-1 for a fitted level), the rows of one such
    level sharing it: a new group's effect is one draw for all its rows.  ``terms``: :func:`model_rows`' of
    ``newdata``."""
    out = []
    for term, (_, level) in zip(design.terms, terms):
        unseen = np.full(len(level), -1, dtype=np.int64)
        if newdata is not None and np.any(level < 0):
            codes, labels = group_index(newdata, term.spec.factor)
            unseen[level < 0] = pd.factorize(labels[codes][level < 0])[0]
        out.append(unseen)
    return out


def row_labels(design, newdata) -> pd.Index:
    """The labels of the rows :func:`model_rows` encodes: ``newdata``'s index, or the fitted rows' (the data's labels
    of the rows kept), so that a table of predictions aligns with the user's frame as pandas aligns it (lme4's
    predictions are named by newdata's row names)."""
    return design.rows if newdata is None else newdata.index


def new_known_variances(design, newdata) -> np.ndarray:
    """The known residual variances se^2 of the rows to predict, for a model fitted with ``se=``: the fitted rows'
    when ``newdata`` is None, else from newdata's column of that name (brms's ``se()`` read from new data)."""
    if newdata is None:
        return 1.0 / design.weights
    check_columns(newdata, [design.se_column], "a prediction of new observations with known residual sds (se=)")
    return known_sd(newdata, design.se_column, " of the prediction data (newdata)") ** 2


def new_row_weights(design, newdata) -> np.ndarray | None:
    """Prior weights of the rows to predict (None: weight 1); the fitted rows' when ``newdata`` is None.

    With prior weights from a column, new rows take theirs from that column; a model
    whose weights were an array cannot weight new rows, and its noise is refused.
    """
    if design.weights is None or design.sigma_known:
        return None
    if newdata is None:
        return design.weights
    if design.weights_column is None:
        raise ArgumentError("the model's prior weights were given as an array, which new rows cannot carry: a "
                            "prediction interval for them needs their weights; fit with weights=<column name>")
    if design.weights_column not in newdata.columns:
        raise ArgumentError("the model has prior weights: a prediction interval for new rows needs their weights, "
                            f"in a column {design.weights_column!r} of newdata")
    weights = newdata[design.weights_column].to_numpy(dtype=float)
    if not np.all(weights > 0):
        raise DataError(f"weights column {design.weights_column!r} of newdata must be positive")
    return weights
