"""Each dataset's own values of the formula's calls that read a whole column.

The batch builds the formula once, on the datasets stacked (:func:`hierpool.batch.plan.plan_batch`).  A call whose
value at a row depends on the rest of the column it is given takes every dataset's values together there, where the
single fit of one dataset takes its own:

* formulae's stateful transforms, :func:`~hierpool.spec.transforms.stateful_calls` (``scale``, ``center``,
  ``standardize``: a mean and an sd; ``poly``, ``bs``, ``cr``: a basis);
* a call hierpool cannot vouch computes a row from that row alone, :func:`~hierpool.spec.transforms.unvouched_calls`
  (a user's ``demean(x)`` = x - mean(x), NumPy's ``np.max(x)``).

On a long frame of datasets whose ``x`` differ, ``demean(x)`` gave an intercept 54.8 where each single fit gives
75.3.  So each dataset's own design is built (the ``build`` its single fit uses, on its rows), and what the calls
make, the response, the offset, the fixed-effect columns and the random-effect values whose names hold one of the
calls, replaces that dataset's rows of the long design: the numbers the single fit reads, which the rest of the
batch then fits as it fits any other column.  Datasets whose columns read by the formula agree at the rows kept (a
bootstrap's replicates, a simulation's datasets of one design: only the response differs) share one build.

**One column's transform.**  Where every column the calls make is ``scale(x)``, ``center(x)``, ``standardize(x)``,
``poly(x, k)`` or a spline (``bs(x, df=4)``) of one numeric column with literal arguments (:data:`COLUMN_TRANSFORMS`),
each dataset's values are that transform itself applied to its x at its rows kept, as its design applies it
(:func:`column_transform_values`), not a whole design a dataset (their costs: benchmarks/RESULTS.md, sixtieth
session).  The first such dataset is built both ways, and the batch keeps the whole designs unless the two agree to
the bit.

A dataset whose own design is refused (``scale()`` of a column constant in it), keeps other rows than the long
frame kept, or has a made column the batch's design has not (a level only it has) is refused in its row with the
single fit's reason.  Each dataset's aliased columns are found on its own values by the single fit's rule
(:func:`_aliased_columns`): a column aliased in every dataset is dropped, as each single fit drops it; a made column
one dataset's own design has not (``poly(x, 3)`` of an x with three values, ``center(x)`` of a constant x) is zero
in its rows, and that dataset fitted alone, as its single fit.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
from formulae.transforms import TRANSFORMS

from ..errors import HierpoolError, warn_at_caller
from ..spec.design import LARGEST_VALUE, SMALLEST_VALUE, Design, aliased_within, float64_values, underflowing
from ..spec.formula import made_by, response_only_names
from ..spec.transforms import RScale

#: The stateful transforms of one column, by the name a design's column shows (R's ``scale``:
#: :class:`~hierpool.spec.transforms.RScale`; formulae's ``center``, ``standardize``, ``poly`` and its splines
#: ``bs``, ``cr``, ``cc``): :func:`column_transform_values` applies them to each dataset's column.
COLUMN_TRANSFORMS = {"scale": RScale, **{name: TRANSFORMS[name] for name in
                                         ("center", "standardize", "poly", "bs", "cr", "cc")}}
_MATRIX_COLUMN = re.compile(r"(.*)\[([0-9]+)\]")


def own_values(design: Design, frame: pd.DataFrame, by: str, rows_of: list, labels: pd.Index, build,
               arguments_of, calls: list[str], row_labels=None) -> tuple[Design, dict[int, str]]:
    """The long ``design`` with each dataset's rows of what ``calls`` make taken from the dataset's own design.

    Parameters
    ----------
    design : Design
        Built by ``build`` on ``frame`` (the datasets stacked, positions as row labels); its ``rows`` are the frame's
        rows kept, ``rows_of[d]`` dataset d's rows of it.
    by : str
        The frame's column naming each row's dataset; ``labels`` the datasets' labels, in code order.
    build : callable
        ``build(rows, arguments)``: the single fit's design of a frame's rows (``arguments`` its weights/offset
        keyword arguments, ``arguments_of(positions)`` for the frame's rows at ``positions``).
    calls : list of str
        The formula's calls that read a whole column (module notes).
    row_labels : callable, optional
        Dataset label -> the labels of its rows in the user's data (None where unknown): a refusal names the
        user's rows, as the dataset's single fit does.

    Returns
    -------
    (Design, dict)
        The design with the calls' values each dataset's own, and dataset -> why its single fit refuses it (its own
        design's error, or what differs between its design and the batch's) for the datasets that cannot be fitted
        with the batch's columns.
    """
    def made(name: str) -> bool:
        return made_by(name, calls)

    fixed = [name for name in design.fixed_names if made(name)]
    terms = [i for i, term in enumerate(design.terms) if made(term.spec.lhs)]
    make_y = made(design.spec.response)
    make_offset = any(made(name) for name in design.offset_terms)
    if not (fixed or terms or make_y or make_offset) or len(labels) < 2:
        return design, {}  # (one dataset: the long frame is its own rows)
    X, y, offset = design.X.copy(), design.y.copy(), design.offset.copy()
    zs = {i: design.terms[i].z.copy() for i in terms}
    kept = np.asarray(design.rows)
    key_columns = _key_columns(design, make_y, make_offset)
    positions = frame.groupby(by, sort=False).indices
    shared: dict[bytes, list] = {}  # key -> [(the kept rows' values read, outcome)]
    refusals = {}
    made_terms = [design.terms[i] for i in terms]
    made_columns = [design.fixed_names.index(name) for name in fixed]
    # scale(x), center(x): the transform itself on each dataset's x (module notes), checked on the first dataset
    calls_of = None if make_y or make_offset else column_calls(fixed, made_terms, frame)
    columns = None if calls_of is None else column_values(frame, kept, calls_of)
    checked = False

    def whole_design(index, label, rows):  # (its own design, shared by datasets whose columns read agree)
        arguments = arguments_of(positions[label])
        read = frame.iloc[kept[rows]][key_columns].reset_index(drop=True)
        key = pd.util.hash_pandas_object(read, index=False).to_numpy().tobytes()
        if make_offset and not isinstance(arguments.get("offset", ""), str):  # (an offset= array: its own design's)
            key += np.asarray(arguments["offset"], dtype=float).tobytes()
        outcome = next((out for values, out in shared.get(key, []) if values.equals(read)), None)
        if outcome is None:
            outcome = _own_made(build, _users_rows(frame.iloc[positions[label]], row_labels, label), arguments,
                                rows.size, design.fixed_names, calls, fixed, made_terms, make_y, make_offset)
            shared.setdefault(key, []).append((read, outcome))
        return outcome

    for index, label in enumerate(labels):
        rows = rows_of[index]
        if not rows.size or label not in positions:  # (no rows kept: the plan's refusal)
            continue
        outcome = None if calls_of is None else column_transform_values(calls_of, columns, rows, fixed, made_terms)
        if outcome is None or not checked:
            whole = whole_design(index, label, rows)
            if outcome is not None:  # the first: both ways, which must agree to the bit
                checked = True
                if not _same_values(outcome, whole):
                    calls_of = None
            outcome = whole
        if isinstance(outcome, str):
            refusals[index] = outcome
            # (the long frame's pooled values, which may not be finite, never reach a refused dataset's checks)
            X[np.ix_(rows, made_columns)] = 0.0
            for i in terms:
                zs[i][rows] = 0.0
            if make_y:
                y[rows] = 0.0
            if make_offset:
                offset[rows] = 0.0
            continue
        for name, values in outcome["X"].items():
            X[rows, design.fixed_names.index(name)] = values
        for i, values in zip(terms, outcome["z"]):
            zs[i][rows] = values
        if make_y:
            y[rows] = outcome["y"]
        if make_offset:
            offset[rows] = outcome["offset"]
    every = _aliased_columns(X, rows_of, [index for index, label in enumerate(labels)
                                          if rows_of[index].size and label in positions and index not in refusals],
                             made_columns)
    new_terms = tuple(replace(term, z=zs[i]) if i in zs else term for i, term in enumerate(design.terms))
    design = replace(design, X=X, y=y, offset=offset, terms=new_terms)
    return _without_columns(design, [design.fixed_names[j] for j in every]) if every else design, refusals


def _aliased_columns(X: np.ndarray, rows_of: list, fitted: list[int], made_columns: list[int]) -> list[int]:
    """The columns of ``X`` (each dataset's own values) aliased in every ``fitted`` dataset's rows, as each single
    fit finds them (:func:`~hierpool.spec.design.aliased_within`, its rule: x after ``poly(x, 2)``), which the batch
    then drops.  A made column aliased in some of them only is set to zero in their rows (in place), as their own
    designs have it not: each such dataset is fitted alone, as one lacking a level
    (:meth:`~hierpool.batch.plan.BatchPlan.alone_for_levels`); another column so aliased is the batch's rank
    check's to refuse."""
    if not fitted or not X.shape[1]:
        return []
    codes = np.full(X.shape[0], len(rows_of), dtype=np.int64)  # (rows of datasets not fitted: a group of their own)
    for index in fitted:
        codes[rows_of[index]] = index
    with np.errstate(all="ignore"):
        dropped = aliased_within(X, codes, len(rows_of) + 1)
    columns = {index: {int(j) for j in dropped.get(index, ())} for index in fitted}
    every = set.intersection(*columns.values())
    for index in fitted:
        for j in columns[index] - every:
            if j in made_columns:
                X[rows_of[index], j] = 0.0
    return sorted(every)


def _without_columns(design: Design, names: list[str]) -> Design:
    """``design`` less its fixed-effect columns ``names`` (aliased in every dataset), warned as a single fit warns."""
    warn_at_caller(f"fixed-effect model matrix is rank deficient in every dataset: dropping {len(names)} column(s) "
                   f"aliased with earlier ones: {', '.join(names)}")
    keep = [j for j, name in enumerate(design.fixed_names) if name not in names]
    return replace(design, X=design.X[:, keep], fixed_names=tuple(design.fixed_names[j] for j in keep),
                   aliased=design.aliased + tuple(names))


def column_calls(fixed: list[str], terms: list, frame: pd.DataFrame) -> dict | None:
    """Made column name -> (the frame's column it reads, (its :data:`COLUMN_TRANSFORMS` name, its arguments after
    the column), the transform's column it is), where every column the calls make (``fixed``, and the made
    ``terms``' coefficients other than the intercept) is one of :data:`COLUMN_TRANSFORMS` of one numeric column x
    of ``frame`` with literal arguments (:func:`_one_column_call`); else None (an interaction ``scale(x):f``, a
    user's function: whole designs)."""
    names = fixed + [name for term in terms for name in term.coef_names if name != "Intercept"]
    out = {}
    for name in names:
        call = _one_column_call(name, frame)
        if call is None:
            return None
        out[name] = call
    return out


def _one_column_call(name: str, frame: pd.DataFrame):
    """(column, (transform, its other arguments, its keyword arguments), the result's column) of a design column
    named ``fn(x, literal arguments...)`` or ``fn(x, ...)[j]``, fn one of :data:`COLUMN_TRANSFORMS` and x a numeric
    column of ``frame``; else None."""
    matrix = _MATRIX_COLUMN.fullmatch(name)
    text, j = (matrix[1], int(matrix[2])) if matrix else (name, 0)
    try:
        call = ast.parse(text, mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in COLUMN_TRANSFORMS
                and call.args and isinstance(call.args[0], ast.Name)):
            return None
        arguments = tuple(ast.literal_eval(argument) for argument in call.args[1:])
        keywords = tuple((keyword.arg, ast.literal_eval(keyword.value)) for keyword in call.keywords)
    except (SyntaxError, ValueError, TypeError):
        return None
    column = call.args[0].id
    if None in (key for key, _ in keywords) or column not in frame.columns or \
            not pd.api.types.is_numeric_dtype(frame[column].dtype) or pd.api.types.is_bool_dtype(frame[column].dtype):
        return None
    return column, (call.func.id, arguments, keywords), j


def column_values(frame: pd.DataFrame, kept: np.ndarray, calls_of: dict) -> dict[str, np.ndarray]:
    """The columns ``calls_of`` reads at the design's rows ``kept``, as a design reads them (float64,
    :func:`~hierpool.spec.design.float64_values`)."""
    names = sorted({column for column, _, _ in calls_of.values()})
    values = float64_values(frame.loc[:, names])
    return {name: values[name].to_numpy(dtype=float)[kept] for name in names}


def column_transform_values(calls_of: dict, columns: dict, rows: np.ndarray, fixed: list[str],
                            terms: list) -> dict | None:
    """One dataset's made columns (its design ``rows``), each its transform applied to its column there, as its
    own design computes them: :func:`_own_made`'s outcome of the ``fixed`` columns and made ``terms``; None where
    one is not finite or outside what a design takes, or the transform raises (``scale()`` of a constant x, ``cr()``
    of too few values: its single fit's refusal, which its whole design gives)."""
    evaluated = {}  # (column, call) -> the transform's columns, once a dataset
    made = {}
    with np.errstate(all="ignore"):  # (a constant x: not finite, the whole design's refusal below)
        for name, (column, call, j) in calls_of.items():
            if (column, call) not in evaluated:
                transform, arguments, keywords = call
                try:
                    values = COLUMN_TRANSFORMS[transform]()(columns[column][rows], *arguments, **dict(keywords))
                except Exception:  # noqa: BLE001 - formulae's own (cr of too few values): the whole design words it
                    return None
                evaluated[column, call] = np.asarray(values, dtype=float).reshape(rows.size, -1)
            made[name] = evaluated[column, call][:, j]
    for values in made.values():
        largest = np.max(np.abs(values))
        if not np.isfinite(largest) or largest > LARGEST_VALUE or (largest and underflowing(largest, SMALLEST_VALUE)):
            return None
    z = []
    for term in terms:
        block = term.z[rows].copy()
        for j, name in enumerate(term.coef_names):
            if name in made:
                block[:, j] = made[name]
        z.append(block)
    return {"X": {name: made[name] for name in fixed}, "z": z, "y": None, "offset": None}


def _same_values(one: dict, other) -> bool:
    """Whether two outcomes (:func:`column_transform_values`, :func:`_own_made`) hold the same values, bit for bit."""
    return (isinstance(other, dict) and one["X"].keys() == other["X"].keys()
            and all(np.array_equal(one["X"][name], other["X"][name]) for name in one["X"])
            and all(np.array_equal(a, b) for a, b in zip(one["z"], other["z"])))


def _users_rows(rows: pd.DataFrame, row_labels, label) -> pd.DataFrame:
    """A dataset's ``rows`` of the long frame, labelled as in the user's data where ``row_labels`` knows them."""
    labels = None if row_labels is None else row_labels(label)
    return rows if labels is None or len(labels) != len(rows) else rows.set_axis(labels, axis=0)


def _key_columns(design: Design, make_y: bool, make_offset: bool) -> list[str]:
    """The frame's columns whose values at a dataset's rows kept decide what the calls make there: those the
    formula reads, less those only its response reads where no call makes the response (only the response of a
    simulation's datasets differs), and the ``offset=`` column where a call makes an offset term (a design's offset
    is their sum)."""
    response_only = set() if make_y else response_only_names(design.spec)
    offset = [design.offset_column] if make_offset and design.offset_column not in (None, *design.columns) else []
    return [name for name in design.columns if name not in response_only] + offset


def _own_made(build, rows: pd.DataFrame, arguments: dict, n_kept: int, batch_names: tuple, calls, fixed: list[str],
              terms: list, make_y: bool, make_offset: bool):
    """What the calls make in one dataset's own design (``build`` on its ``rows``): {"X": name -> column, "z": the
    made terms' values, "y", "offset"}, or why its single fit cannot be put beside the batch's (a str).

    A made column of the batch's (``fixed``, of ``batch_names``) that the dataset's own design has not is zero
    there (a level it lacks, ``scale(x):f[c]``, or aliased in it: :func:`_aliased_columns` decides).  A made column
    of its own that the batch's has not (a level only it has) refuses it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the long frame's design gave them, for every dataset)
            own = build(rows, arguments)
    except HierpoolError as error:
        return str(error)
    if own.n != n_kept:
        return (f"this dataset's own design keeps {own.n} rows where the batch's kept {n_kept}: fit it alone")
    extra = [name for name in own.fixed_names if made_by(name, calls) and name not in batch_names]
    if extra:
        return (f"this dataset's own design has {', '.join(extra)}, which the batch's design has not (a level or "
                f"value the other datasets lack): fit it alone; its single fit has the fixed effects "
                f"{list(own.fixed_names)}")
    own_terms = {(t.group, t.coef_names): t for t in own.terms}
    lacking = [f"({' + '.join(t.coef_names)} | {t.group})" for t in terms if (t.group, t.coef_names) not in own_terms]
    if lacking:
        return (f"this dataset's own design lacks {', '.join(lacking)} (aliased or constant in it), which the batch "
                f"fits to every dataset; its single fit has the fixed effects {list(own.fixed_names)}")
    zero = np.zeros(own.n)
    return {"X": {name: own.X[:, own.fixed_names.index(name)] if name in own.fixed_names else zero for name in fixed},
            "z": [own_terms[(t.group, t.coef_names)].z for t in terms],
            "y": own.y if make_y else None, "offset": own.offset if make_offset else None}

