"""Labels of levels, animals and areas, as R's ``factor`` writes them.

A grouping column, a pedigree's ids, a relationship matrix's or an adjacency graph's labels meet by their text.
pandas makes an integer column float wherever it holds a missing value, so one side's 308 meets the other's 308.0:
a whole-number float is written as the integer (up to 2^53, where a float still holds every integer; beyond, as
written: R writes 3.09e+22, not its 23 digits).  Without it, new data's group 308.0 matched no fitted level 308
(its rows predicted as a new group's, silently), and a parent 12.0 was not animal 12.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def shown_label(label):
    """A dataset's (or row's) label as the user wrote it, for messages (a NumPy scalar's repr reads np.int64(3))."""
    if isinstance(label, tuple):  # a dict's tuple key, each part as written
        return tuple(shown_label(part) for part in label)
    return label.item() if isinstance(label, np.generic) else label


def shown_rows(labels) -> str:
    """The first five of the row ``labels`` a refusal names, "[0, 3, 7, 9, 12] ..." where there are more."""
    labels = list(labels)
    return f"{[shown_label(label) for label in labels[:5]]}{' ...' if len(labels) > 5 else ''}"


def level_label(value) -> str:
    """One value's label: a whole-number float as the integer (module docstring), anything else as ``str``."""
    if (isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer()
            and abs(value) < 2.0**53):
        return str(int(value))
    return str(value)


def column_labels(values) -> np.ndarray:
    """The labels of a column's (or an index's) values: :func:`level_label` where they are floats, ``str`` where
    they are anything else (an object column holding 308.0 beside "308" keeps both apart); a categorical column's
    by its categories' kind (categories 1.0, 2.0 are "1", "2", as a float column's values are)."""
    values = pd.Series(values) if not isinstance(values, pd.Series) else values
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes, uniques = values.cat.codes.to_numpy(), values.cat.categories
    else:  # each distinct value labelled once (an area column of a million rows holds some hundred areas)
        codes, uniques = pd.factorize(values)
    label = level_label if pd.api.types.is_float_dtype(uniques) else str
    labels = np.asarray([label(v) for v in uniques] + ["nan"], dtype=object).astype(str)
    return labels[codes]  # (a missing value's code, -1, takes the last: "nan")
