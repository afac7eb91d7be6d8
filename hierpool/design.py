"""From a formula and a DataFrame to the arrays both engines read.

A :class:`Design` never holds a dense random-effects matrix Z.  Each
random-effect term keeps, per row, the integer index of its level and the few
columns of z (MixedModels.jl's ``ReMat``): row i of Z_j is ``z_j[i]`` placed in
the columns of level ``index_j[i]``.

All input checks live here, so that the numerical code can assume clean
arrays: missing columns, non-numeric or constant responses, infinite values,
grouping factors with one level, more random effects than observations, empty
data.  Rows with a missing value in any used column are dropped with a warning
that counts them, and aliased fixed-effect columns are dropped with a warning
that names them (lme4's ``check.rankX = "message+drop.cols"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import formulae
import numpy as np
import pandas as pd

from .errors import DataError, FormulaError, HierpoolWarning
from .formula import ModelSpec, RandomTermSpec, parse_formula

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
    z_matrix: object  # formulae CommonEffectsMatrix of the lhs, to encode new data the same way

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
        Per-row precision weights 1/se^2 when residual sds are known.
    rows : pandas.Index
        Labels of the data rows used (after dropping missing values).
    n_dropped : int
        Rows dropped for missing values.
    aliased : tuple of str
        Fixed-effect columns dropped as linearly dependent on earlier ones.
    """

    spec: ModelSpec
    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    terms: tuple[RandomEffectTerm, ...]
    weights: np.ndarray | None
    rows: pd.Index
    n_dropped: int
    aliased: tuple[str, ...]
    fixed_matrix: object  # formulae CommonEffectsMatrix, to encode new data the same way

    @property
    def n(self) -> int:
        return self.y.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def row_weights(self) -> np.ndarray:
        """Prior weight of each row: 1/se^2 with known residual sds, else ones."""
        return np.ones(self.n) if self.weights is None else self.weights

    @property
    def sigma_known(self) -> bool:
        """True when residual sds were given (``se=``): sigma is then fixed at 1 on the weighted scale."""
        return self.weights is not None


def _check_frame(data) -> None:
    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if data.shape[0] == 0:
        raise DataError("data is empty: it has no rows")


def _check_columns(data: pd.DataFrame, names, what: str) -> None:
    missing = [v for v in names if v not in data.columns]
    if missing:
        listed = ", ".join(repr(m) for m in missing)
        raise DataError(f"{what} uses column {listed}, which is not in the data (columns: {list(data.columns)})")


def _drop_missing(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    missing = frame.isna().any(axis=1)
    n_missing = int(missing.sum())
    if n_missing == frame.shape[0]:
        raise DataError(f"every row has a missing value in one of the columns {list(frame.columns)}")
    if n_missing:
        counts = frame.isna().sum()
        detail = ", ".join(f"{c}: {int(k)}" for c, k in counts.items() if k)
        warnings.warn(
            f"dropped {n_missing} of {frame.shape[0]} rows with missing values ({detail})", HierpoolWarning, stacklevel=4
        )
        frame = frame.loc[~missing]
    return frame, n_missing


def _check_finite(frame: pd.DataFrame) -> None:
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            if np.isinf(values.to_numpy(dtype=float)).any():
                raise DataError(f"column {column!r} has infinite values")


def _response(frame: pd.DataFrame, spec: ModelSpec, evaluated) -> np.ndarray:
    name = spec.response
    if name in frame.columns:
        column = frame[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise DataError(f"response {name!r} must be numeric, got dtype {column.dtype}")
    y = np.asarray(np.asarray(evaluated), dtype=float).reshape(-1)
    if not np.all(np.isfinite(y)):
        raise DataError(f"response {name!r} has non-finite values after transformation")
    if np.ptp(y) == 0:
        raise DataError(f"response {name!r} is constant ({y[0]!r}): there is no variation to model")
    return y


def _design_matrices(text: str, frame: pd.DataFrame, what: str):
    try:
        return formulae.design_matrices(text, frame, na_action="error")
    except Exception as exc:  # formulae raises many exception types
        raise FormulaError(f"cannot evaluate {what} {text!r} on the data: {exc}") from None


def aliased_columns(X: np.ndarray, tol: float = RANK_TOL) -> np.ndarray:
    """Indices of columns of X that are linear combinations of the columns before them.

    Mirrors R's LINPACK ``qr`` (used by lme4's ``chkRank.drop.cols``): columns
    are taken left to right and a column whose residual norm, after projecting
    out the columns kept so far, is below ``tol`` times its own norm is aliased.
    """
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


def group_index(frame: pd.DataFrame, factor: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Level index and level labels of the interaction of the columns in ``factor``.

    Levels are ordered as R orders ``factor(a:b)`` with unused levels dropped:
    lexicographically by the levels of each column (categories order for a
    categorical column, sorted values otherwise), first column slowest.
    """
    codes = np.zeros(frame.shape[0], dtype=np.int64)
    label_parts: list[np.ndarray] = []
    for name in factor:
        column = frame[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            column = column.cat.remove_unused_categories()
            col_codes, uniques = column.cat.codes.to_numpy(), column.cat.categories.to_numpy()
        else:
            try:
                col_codes, uniques = pd.factorize(column, sort=True)
            except TypeError:  # mixed types that cannot be sorted
                col_codes, uniques = pd.factorize(column, sort=False)
        codes = codes * len(uniques) + col_codes
        label_parts.append(np.asarray([str(u) for u in uniques], dtype=object)[col_codes])
    uniq, inverse = np.unique(codes, return_inverse=True)
    first = np.zeros(len(uniq), dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(codes))[::-1]  # a row of each level, to read its labels
    labels = label_parts[0][first].astype(str)
    for part in label_parts[1:]:
        labels = np.char.add(np.char.add(labels, ":"), part[first].astype(str))
    return inverse.astype(np.int32), labels


def _random_term(frame: pd.DataFrame, spec: RandomTermSpec) -> RandomEffectTerm:
    dm = _design_matrices(spec.lhs, frame, f"random-effect term ({spec.lhs} | {spec.name})")
    z_frame = dm.common.as_dataframe()
    index, levels = group_index(frame, spec.factor)
    return RandomEffectTerm(
        group=spec.name,
        coef_names=tuple(str(c) for c in z_frame.columns),
        levels=levels,
        index=index,
        z=np.ascontiguousarray(z_frame.to_numpy(dtype=float)),
        spec=spec,
        z_matrix=dm.common,
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


def _check_identifiable(terms: list[RandomEffectTerm], n: int, sigma_known: bool) -> None:
    for term in terms:
        if term.n_levels < 2:
            raise DataError(
                f"grouping factor {term.group!r} has only one level ({term.levels[0]!r}); "
                "a random effect needs at least two groups"
            )
        if sigma_known:
            continue  # with known residual sds one observation per group is identifiable (meta-analysis)
        if term.n_levels >= n:
            raise DataError(
                f"grouping factor {term.group!r} has {term.n_levels} levels for {n} observations; "
                "it must have fewer levels than observations or the random-effect and residual "
                "variances cannot be told apart"
            )
        if term.n_levels * term.k >= n:
            raise DataError(
                f"random-effect term ({' + '.join(term.coef_names)} | {term.group}) has "
                f"{term.n_levels * term.k} random effects for {n} observations; "
                "there must be fewer random effects than observations"
            )


def _known_sd(frame: pd.DataFrame, se: str) -> np.ndarray:
    column = frame[se]
    if not pd.api.types.is_numeric_dtype(column):
        raise DataError(f"se column {se!r} must be numeric, got dtype {column.dtype}")
    values = column.to_numpy(dtype=float)
    if np.any(values <= 0):
        raise DataError(f"se column {se!r} must be positive; it has {int(np.sum(values <= 0))} values <= 0")
    return values


def build_design(formula: str, data: pd.DataFrame, se: str | None = None) -> Design:
    """Check the data against the formula and build the :class:`Design`.

    Parameters
    ----------
    formula : str
        lme4-style formula (see :mod:`hierpool.formula`).
    data : pandas.DataFrame
        Not modified.
    se : str, optional
        Column of known residual standard deviations, one per row.

    Returns
    -------
    Design
    """
    spec = parse_formula(formula)
    _check_frame(data)
    _check_columns(data, spec.variables, f"formula {formula!r}")
    used = list(spec.variables)
    if se is not None:
        if not isinstance(se, str):
            raise DataError(f"se must name a column of data, got {type(se).__name__}")
        _check_columns(data, [se], "argument se")
        if se not in used:
            used.append(se)
    frame = data.loc[:, used].copy()
    frame, n_dropped = _drop_missing(frame)
    _check_finite(frame)

    fixed = _design_matrices(spec.fixed, frame, "fixed-effect part")
    y = _response(frame, spec, fixed.response)
    fixed_frame = fixed.common.as_dataframe() if fixed.common is not None else pd.DataFrame(index=frame.index)
    X = fixed_frame.to_numpy(dtype=float)
    names = tuple(str(c) for c in fixed_frame.columns)
    dropped = aliased_columns(X) if X.shape[1] else np.zeros(0, dtype=int)
    aliased = tuple(names[j] for j in dropped)
    if aliased:
        warnings.warn(
            f"fixed-effect model matrix is rank deficient: dropping {len(aliased)} column(s) "
            f"aliased with earlier ones: {', '.join(aliased)}",
            HierpoolWarning,
            stacklevel=3,
        )
        keep = np.setdiff1d(np.arange(X.shape[1]), dropped)
        X, names = X[:, keep], tuple(names[j] for j in keep)

    terms = [_random_term(frame, t) for t in spec.random]
    terms = [terms[j] for j in lme4_term_order([t.n_levels for t in terms])]
    weights = None if se is None else 1.0 / _known_sd(frame, se) ** 2
    _check_identifiable(terms, len(y), sigma_known=weights is not None)
    return Design(
        spec=spec,
        y=y,
        X=np.ascontiguousarray(X),
        fixed_names=names,
        terms=tuple(terms),
        weights=weights,
        rows=frame.index,
        n_dropped=n_dropped,
        aliased=aliased,
        fixed_matrix=fixed.common,
    )
