"""The response of a GLMM as glmer reads it: 0/1, a two-level factor, counts, proportions with
their trials, or ``cbind(successes, failures)``.

A binomial response becomes proportions y = s / (s + f) with the trials s + f as prior weights
(R's ``binomial()$initialize``); a two-level factor or a logical is 1 for its second level (R: the
first level is failure).  Counts and 0/1 columns are read as the Gaussian response is.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import DataError, FormulaError, warn_at_caller
from .labels import shown_rows

#: The column the evaluated response is read from when the formula's left side is rewritten (an identifier:
#: formulae reads it as a name).
RESPONSE_COLUMN = "hierpool_response"
_CBIND = re.compile(r"^cbind\s*\((.*)\)\s*$", re.S)


def cbind_arguments(response: str) -> tuple[str, str] | None:
    """(successes, failures) expressions of a ``cbind(a, b)`` response; None for any other response."""
    match = _CBIND.match(response.strip())
    if match is None:
        return None
    depth, pieces, start = 0, [], 0
    text = match.group(1)
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    if len(pieces) != 2 or not all(p.strip() for p in pieces):
        raise FormulaError(f"response {response!r} must be cbind(successes, failures), two expressions")
    return pieces[0].strip(), pieces[1].strip()


def _evaluate(frame: pd.DataFrame, expression: str, response: str) -> np.ndarray:
    if expression in frame.columns:
        values = frame[expression]
    else:
        try:  # arithmetic on columns, as in cbind(incidence, size - incidence)
            values = frame.eval(expression, engine="python")
        except Exception as exc:  # pandas raises many types
            raise FormulaError(f"cannot evaluate {expression!r} of response {response!r}: {exc}") from None
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise FormulaError(f"{expression!r} of response {response!r} must be numeric counts")
    return np.asarray(values, dtype=float).reshape(-1)


def binomial_counts(frame: pd.DataFrame, response: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(proportions, trials) of a ``cbind(successes, failures)`` response; None for another response.

    Rows of zero trials give proportion 0 (they carry no information; their weight is 0).
    """
    arguments = cbind_arguments(response)
    if arguments is None:
        return None
    successes, failures = (_evaluate(frame, a, response) for a in arguments)
    for expression, counts in zip(arguments, (successes, failures)):
        # a negative failure count made a proportion above 1, refused as '2 successes of 1 trials', naming neither
        negative = np.flatnonzero(counts < 0)
        if negative.size:
            raise DataError(f"{expression!r} of response {response!r} is negative in {negative.size} row(s) (rows "
                            f"{shown_rows(frame.index[negative])}): counts of successes and failures cannot be "
                            "negative")
    trials = successes + failures
    return np.divide(successes, trials, out=np.zeros_like(trials), where=trials > 0), trials


def two_level_indicator(frame: pd.DataFrame, response: str) -> np.ndarray | None:
    """1 for the second level of a two-level factor, logical or string response column; None otherwise.

    A categorical column's levels are in its category order, a string column's sorted (as
    hierpool orders string factors); a logical's are False, True.
    """
    if response not in frame.columns:
        return None
    column = frame[response]
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=float)
    if pd.api.types.is_numeric_dtype(column):
        return None
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        levels = list(column.cat.categories[np.unique(codes[codes >= 0])])
    else:
        column = column.astype(str)
        levels = sorted(pd.unique(column))
    if len(levels) != 2:
        raise FormulaError(f"response {response!r} has {len(levels)} levels; a binomial factor response needs two "
                           "(the first is failure)")
    # (R's collation in most locales: case aside, then lowercase first: "yes" < "Yes")
    if not isinstance(column.dtype, pd.CategoricalDtype) and levels != sorted(levels,
                                                                               key=lambda s: (s.casefold(), s.swapcase())):
        # text sorts by code point (uppercase first), R's factor() by its locale's collation (in most, case aside):
        # 'Dead' < 'alive' here, 'alive' < 'Dead' for glmer there, and every coefficient's sign flips
        warn_at_caller(f"response {response!r}: the levels {levels[0]!r} < {levels[1]!r} are sorted by code point, "
                       f"so that {levels[1]!r} is success; R's factor() in most locales sorts them the other way "
                       "round.  Give a 0/1 column or a pandas Categorical to fix the order")
    return (column == levels[1]).to_numpy(dtype=float)
