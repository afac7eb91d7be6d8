"""Formula parts that only name numeric columns, read without formulae.

Most mixed-model formulae name data columns and nothing else:
``Reaction ~ Days + (Days | Subject)``, ``y ~ x + (1 | g) + (1 | h)``.  The model
matrix of such a part is the named columns, after a column of ones unless ``0``
removes it: there is nothing to encode.  formulae, which reads every other part
(calls, interactions, categorical columns, names from the caller's namespace), costs
about half a second to import (it imports scipy.interpolate) and about two
milliseconds per matrix, which were most of a small fit's time in a fresh process and
in a warm one.  So a *plain* part is read here and formulae is imported only when a
formula needs it.

A part is plain when it is ``+``-separated names, ``1`` or ``0`` (not both, no name
twice), and it is read here only when every name is a column of the data with a
NumPy integer or float dtype (formulae's numeric columns; booleans and categoricals
go to formulae, which encodes them).  Its column names are formulae's:
``Intercept`` first, then the names in the order written.  tests/test_plain_formulae.py
checks that both readers give the same names, columns and new-data encoding.  Two
differences are lme4's behaviour, not formulae's: a left-hand side with ``1`` or ``0``
after a name (``(x + 1 | g)``) is read (formulae cannot parse it), and new data whose
column is no longer numeric is refused rather than coerced.
"""

from __future__ import annotations

import functools
import keyword
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

# a name starts with a letter, as R's and formulae's do (formulae refuses a leading "_")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_GROUP = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\s*:\s*[A-Za-z][A-Za-z0-9_]*)*\Z")
INTERCEPT = "Intercept"


def _is_name(text: str) -> bool:
    return bool(_NAME.match(text)) and not keyword.iskeyword(text) and text not in ("True", "False", "None")


@dataclass(frozen=True)
class PlainPart:
    """A formula part that is a column of ones (``intercept``) and numeric columns by name.

    Attributes
    ----------
    intercept : bool
        Whether the matrix starts with a column of ones (formulae's ``Intercept``).
    names : tuple of str
        The data columns, in the order written.
    """

    intercept: bool
    names: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        """formulae's names of the matrix columns: ``Intercept`` first, then the columns."""
        return [INTERCEPT] * self.intercept + list(self.names)

    def readable(self, frame: pd.DataFrame) -> bool:
        """True when every name is a column of ``frame`` with a NumPy integer or float dtype."""
        for name in self.names:
            if name not in frame.columns:
                return False
            dtype = frame[name].dtype
            if not isinstance(dtype, np.dtype) or dtype.kind not in "iuf":
                return False
        return True

    def matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """The model matrix on ``frame``, shape (rows, columns), float64."""
        out = np.empty((len(frame), self.intercept + len(self.names)))
        if self.intercept:
            out[:, 0] = 1.0
        for j, name in enumerate(self.names, start=int(self.intercept)):
            out[:, j] = frame[name].to_numpy(dtype=float)
        return out

    def new_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The model matrix of new rows as a frame with the column names (formulae's ``as_dataframe``)."""
        for name in self.names:
            column = frame[name]
            if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                raise ValueError(f"column {name!r} must be numeric as in the fitted data, got dtype {column.dtype}")
        return pd.DataFrame(self.matrix(frame), index=frame.index, columns=self.column_names)


@functools.lru_cache(maxsize=512)
def plain_part(text: str) -> PlainPart | None:
    """The :class:`PlainPart` that ``text`` (no ``~``, e.g. ``"1 + Days"``) writes, or None if it is not plain.

    A part without ``0`` has an intercept, as in R.  None also for a part with no column at
    all (``"0"``): formulae reports that.
    """
    pieces = [piece.strip() for piece in text.split("+")]
    if not all(piece == "0" or piece == "1" or _is_name(piece) for piece in pieces):
        return None
    names = tuple(piece for piece in pieces if piece not in ("0", "1"))
    if ("0" in pieces and "1" in pieces) or len(set(names)) != len(names) or INTERCEPT in names:
        return None
    part = PlainPart(intercept="0" not in pieces, names=names)
    return part if part.column_names else None


@functools.lru_cache(maxsize=512)
def plain_fixed(text: str) -> tuple[str, PlainPart] | None:
    """(response column, :class:`PlainPart`) of a plain ``"response ~ part"``, or None."""
    response, _, rhs = text.partition("~")
    response = response.strip()
    if not _is_name(response) or "~" in rhs:
        return None
    part = plain_part(rhs)
    return None if part is None else (response, part)


def plain_grouping(text: str) -> tuple[tuple[str, ...], ...] | None:
    """The grouping factors of a bar's right-hand side written with names only, or None.

    ``g`` and ``a:b`` are one factor; ``a/b/c`` (nesting) is lme4's ``expandSlash``:
    ``(c:b:a), (b:a), (a)``, the innermost factor first and each named inner-first.
    """
    text = text.strip()
    if "/" in text:
        names = tuple(name.strip() for name in text.split("/"))
        if not all(_is_name(name) for name in names) or len(set(names)) != len(names):
            return None
        return tuple(tuple(reversed(names[:depth])) for depth in range(len(names), 0, -1))
    if not _GROUP.match(text):
        return None
    factor = tuple(name.strip() for name in text.split(":"))
    return (factor,) if all(_is_name(name) for name in factor) and len(set(factor)) == len(factor) else None
