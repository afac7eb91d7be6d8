"""Residual correlation structures: AR(1) within each group's series (nlme's ``corAR1`` and ``corCAR1``).

``hp.ar1(group="Mare")`` orders each mare's rows as they stand in the data and correlates residuals s
rows apart by phi^s, nlme's ``corAR1(form = ~ 1 | Mare)``; with ``time="t"``, an integer time, residuals
t_i - t_j steps apart by phi^(t_i - t_j), gaps included, nlme's ``corAR1(form = ~ t | Mare)``;
``hp.car1(group="Rat", time="Time")`` correlates residuals t apart in continuous time by phi^t
(irregular spacing), nlme's ``corCAR1(form = ~ Time | Rat)``.  This module reads the columns and
finds each row's predecessor in its series; :mod:`hierpool.algebra.ar1` holds the maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ArgumentError, DataError
from .design import check_unique_index


@dataclass(frozen=True)
class AR1:
    """An AR(1) correlation of the residuals within each level of ``group``.

    Attributes
    ----------
    group : str
        The column whose levels are the series (each level its own; series are independent).
    time : str or None
        The column that orders and spaces each series (its differences are the lags: whole steps for corAR1);
        None: the rows' order in the data, one step a row.
    continuous : bool
        False: lag = steps between rows of a series (corAR1, -1 < phi < 1): one a row without ``time``, the
        difference of ``time`` (whole steps) with it; True: lag = difference of ``time`` (corCAR1, 0 < phi < 1).
    """

    group: str
    time: str | None = None
    continuous: bool = False

    @property
    def bounds(self) -> tuple[float, float]:
        """The open interval of phi."""
        return (0.0, 1.0) if self.continuous else (-1.0, 1.0)

    def describe(self) -> str:
        """nlme's spelling of the structure."""
        if self.continuous:
            return f"corCAR1(form = ~ {self.time} | {self.group})"
        return f"corAR1(form = ~ {self.time or 1} | {self.group})"


def ar1(group: str, time: str | None = None) -> AR1:
    """AR(1) residuals in each ``group``'s series, ordered by ``time`` (or the data's row order): corAR1.

    Residuals s steps apart in one series have correlation phi^s (-1 < phi < 1); residuals of different
    groups are independent.  Use with ``hp.lmm(..., correlation=hp.ar1("Subject"))``.

    Parameters
    ----------
    group : str
        Column of the series' labels.
    time : str, optional
        Column of each row's time in whole steps (integer values, distinct within a series), as nlme's
        ``corAR1(form = ~ time | group)``: it orders the series, and two rows s = t_i - t_j steps apart
        correlate by phi^s, so a missing reading (or a row dropped for a missing value) leaves a gap of two
        steps, phi^2.  A fractional step is refused (continuous time is :func:`car1`'s).  None: the data's row
        order, one step a row (``corAR1(form = ~ 1 | group)``; to step by rows in a time's order, sort by it).

    Returns
    -------
    AR1
    """
    return AR1(_name(group, "group"), None if time is None else _name(time, "time"), continuous=False)


def car1(group: str, time: str) -> AR1:
    """Continuous-time AR(1) residuals in each ``group``'s series: corr = phi^|t_i - t_j| (0 < phi < 1): corCAR1.

    Parameters
    ----------
    group : str
        Column of the series' labels.
    time : str
        Column of the times (numeric; distinct within a series; any spacing).

    Returns
    -------
    AR1
    """
    return AR1(_name(group, "group"), _name(time, "time"), continuous=True)


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"the AR(1) {what} must be a column name, got {value!r}")
    return value


@dataclass(frozen=True)
class Series:
    """Each row's place in its series.

    Attributes
    ----------
    previous : numpy.ndarray
        (n,) int: the row before it in its series, -1 for a series' first row.
    lag : numpy.ndarray
        (n,) float: steps (or time) since that row; 0 for a first row.
    group_codes : numpy.ndarray
        (n,) int: each row's series.
    order : numpy.ndarray
        (n,) int: the rows series by series, each series in order, so that a row's predecessor comes first.
    """

    previous: np.ndarray
    lag: np.ndarray
    group_codes: np.ndarray
    order: np.ndarray  # (n,) the rows series by series, each in its time (or row) order: predecessors first

    @property
    def first(self) -> np.ndarray:
        return self.previous < 0


def series_of(correlation: AR1, data: pd.DataFrame, rows: pd.Index) -> Series:
    """The :class:`Series` of the model's rows (``rows``: the data's labels of the rows fitted, in order).

    Raises
    ------
    DataError
        A column missing, a missing value in a used row, a non-numeric or non-finite time, a time
        repeated within a series, or no series with two rows (phi not identified).
    """
    for column in (correlation.group, correlation.time):
        if column is not None and column not in data.columns:
            raise DataError(f"the AR(1) correlation uses column {column!r}, which is not in the data "
                            f"(columns: {list(data.columns)})")
    check_unique_index(data, f"an AR(1) correlation ({correlation.describe()})")
    used = data.loc[rows]
    group = used[correlation.group]
    if group.isna().any():
        raise DataError(f"the AR(1) group column {correlation.group!r} has {int(group.isna().sum())} missing "
                        "values in the rows fitted")
    codes = pd.factorize(group, sort=False)[0]
    n = len(codes)
    if correlation.time is None:
        key = np.arange(n, dtype=float)
    else:
        time = used[correlation.time]
        if not pd.api.types.is_numeric_dtype(time) or not np.all(np.isfinite(time.to_numpy(dtype=float))):
            raise DataError(f"the AR(1) time column {correlation.time!r} must be numeric and finite in the rows fitted")
        key = time.to_numpy(dtype=float)
    order = np.lexsort((key, codes))  # by series, then by time (or row position)
    same = codes[order][1:] == codes[order][:-1]
    if correlation.time is not None and np.any(same & (key[order][1:] == key[order][:-1])):
        at = int(np.flatnonzero(same & (key[order][1:] == key[order][:-1]))[0])
        raise DataError(f"the AR(1) time column {correlation.time!r} repeats the value {float(key[order][at + 1])!r} "
                        f"within the series {str(group.iloc[order[at]])!r} of {correlation.group!r}: "
                        "times must be distinct within a series")
    if n and not np.any(same):  # the likelihood is then free of phi: any value "fits" (nlme reports its start, 0)
        raise DataError(f"no series of the AR(1) group column {correlation.group!r} has two rows in the rows fitted "
                        f"({n} rows, each its own series): the correlation phi is not identified; fit without "
                        "correlation=")
    previous = np.full(n, -1, dtype=np.int64)
    lag = np.zeros(n)
    previous[order[1:][same]] = order[:-1][same]
    if correlation.time is None:  # corAR1(form = ~ 1 | g): each row one step after the one before it
        lag[order[1:][same]] = 1.0
    else:
        lag[order[1:][same]] = key[order][1:][same] - key[order][:-1][same]
        if not correlation.continuous:
            followed = order[1:][same]
            lag[followed] = whole_steps(lag[followed], lambda at: (
                f"the AR(1) time column {correlation.time!r} steps by {float(lag[followed][at])!r} within the series "
                f"{str(group.iloc[followed[at]])!r} of {correlation.group!r}"))
    return Series(previous=previous, lag=lag, group_codes=codes, order=order)


#: What a fractional step of :func:`ar1`'s time column is told (series_of, and new rows' lags in predictions).
WHOLE_STEPS = ("hp.ar1 counts time in whole steps, as nlme's corAR1 (integer times; a gap of two steps correlates by "
               "phi^2): for continuous time use hp.car1, for one step per row sort the rows by it and leave time out")


#: Relative distance from a whole number within which a lag of corAR1's time counts as whole (times t + 0.1 step by
#: 0.9999999999999996, which nlme fits as t).
WHOLE_STEP_TOL = 1e-9


def fractional_step(lag: np.ndarray) -> int | None:
    """The position of the first of ``lag`` that is not a whole number of steps (to :data:`WHOLE_STEP_TOL`), None
    where all are: corAR1's lags from a time column (nlme's corAR1 takes an integer time covariate; a gap of two
    steps correlates by phi^2, and a negative phi has no power of a fractional lag).  Callers use the lags rounded."""
    fractional = np.flatnonzero(np.abs(lag - np.round(lag)) > WHOLE_STEP_TOL * np.maximum(np.abs(lag), 1.0))
    return int(fractional[0]) if fractional.size else None


def common_step(series: Series) -> int:
    """The greatest common divisor of a corAR1 series' lags (whole steps; 1 where no row has a predecessor).  Where
    it is k > 1 the data tell phi^k only: phi's sign is not identified for an even k (nlme's fit then reports the
    sign its start lies on)."""
    return int(common_steps(series, np.zeros(len(series.lag), dtype=np.int64), 1)[0])


def common_steps(series: Series, dataset: np.ndarray, n_datasets: int) -> np.ndarray:
    """:func:`common_step` of each dataset's rows (``dataset``: each row's code; a batch's series are each within
    one dataset), (n_datasets,) integers."""
    has = series.previous >= 0
    steps = np.zeros(n_datasets, dtype=np.int64)
    np.gcd.at(steps, dataset[has], series.lag[has].astype(np.int64))  # whole already (series_of)
    return np.where(steps > 0, steps, 1)


def even_step_message(time: str | None, step: int) -> str:
    """Why phi's sign is not identified where every lag of the time column ``time`` is a multiple of ``step``
    (even): the warning of ``hp.lmm``, ``hp.bayes`` and the batches."""
    return (f"the AR(1) time column {time!r} steps by multiples of {step} only: the data tell phi^{step}, not phi's "
            f"sign (phi and -phi fit alike); time counted in units of {step} is the same model with an identified phi")


def whole_steps(lag: np.ndarray, where) -> np.ndarray:
    """corAR1's lags rounded to whole steps (:func:`fractional_step`), or a :class:`DataError` that says
    ``where(i)`` the first fractional one, the i-th, is (the fit's series, or the prediction data's rows)."""
    at = fractional_step(lag)
    if at is not None:
        raise DataError(f"{where(at)}: {WHOLE_STEPS}")
    return np.round(lag)
