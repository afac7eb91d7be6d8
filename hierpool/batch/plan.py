"""How a batch of datasets is laid out for compiled, vmapped work (shared by ``fit_batch`` and ``bayes_batch``).

* The formula is parsed and the data checked **once**, on the long frame
  (:func:`hierpool.spec.design.build_design`); each dataset's rows are then reduced
  to the sufficient statistics of :mod:`hierpool.algebra.statistics`, so a
  dataset's row count never enters a shape.
* A call whose value at a row reads the whole column (``scale(x)``, ``poly(x, 2)``, a user's ``demean(x)``) takes
  each dataset's own values: :mod:`hierpool.batch.dataset_transforms` puts them in the long design.
* **Buckets by shape**: datasets are grouped by their number of levels, padded
  up to the next power of two (all datasets in one bucket when they have the
  same count), so padding never more than doubles the work of any dataset.
* **Chunks**: a bucket runs in chunks of equal shape (the last one padded with
  copies of its first dataset), so each bucket compiles once.
* **Devices**: a chunk's leading axis is sharded over a ``Mesh`` of all devices
  (``jax.sharding.NamedSharding``), and the programs with loops (the optimizer,
  NUTS) are ``jax.shard_map``-ped, so that each device runs its own rows' loops:
  vmapped over a sharded axis, a while loop steps every device in lockstep, with a
  collective per iteration (between two processes on one host that made a 300-draw
  bayes_batch several times slower: benchmarks/RESULTS.md, "Measurements the code
  cites").  On a CPU with one device, chunks run in parallel threads instead (XLA
  releases the GIL), one per core.
* **Several hosts**: after ``jax.distributed.initialize()``, ``jax.devices()`` holds
  every process's devices, so the mesh spans them all.  Every process calls the
  batch function with the same data (SPMD); :func:`place` gives each process the
  rows of its own devices (``jax.make_array_from_callback``) and :func:`fetch`
  gathers the results back to every process
  (``jax.experimental.multihost_utils.process_allgather``).
* A dataset that cannot be fitted (one level, aliased fixed effects, too few
  observations) is never sent to the compiled program; its reason is kept.  Every
  dataset passed keeps its row (:func:`dataset_labels_of`), one with no rows left (an
  empty frame, a column it lacks, a response all missing) too; such a dataset, and one
  whose response is constant, which the single fit refuses, are refused in their rows
  with the reason (:func:`plan_refusals`).
* Prior weights and offsets (``weights=``, ``offset=`` and ``offset(...)`` terms)
  are read by :func:`hierpool.spec.design.build_design` on the long frame, which checks
  them and drops rows with missing values, and enter each dataset's statistics
  (:func:`hierpool.algebra.statistics.sufficient_statistics`); known residual sds
  (``se=``) enter them as the weights 1 / se^2, and sigma is then 1.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import itertools
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property, partial

import jax
import numpy as np
import pandas as pd
from jax.experimental import multihost_utils

from ..algebra.batched_systems import batched_systems
from ..algebra.checks import fit_magnitudes
from ..algebra.linalg import (
    distinct_block_columns,
    equal_sets,
    segment_extremes,
    segment_sum,
    shared_factor,
    terms_theta_scales,
    theta_start,
    weights_uneven,
    weights_unit,
)
from ..algebra.search import HOST_CHUNK_BYTES
from ..algebra.search.newton import MOMENT_FLOOR
from ..algebra.start import known_sds_size, moment_theta
from ..algebra.statistics import BatchStatistics, location_shifts, sufficient_statistics
from ..algebra.system import grouped_products
from ..errors import ArgumentError, DataError, HierpoolError, HierpoolWarning
from ..spec.design import (
    READABLE_KINDS,
    RESPONSE_SMALLEST,
    SMALLEST_VALUE,
    TERM_RANK_TOL,
    Design,
    RandomEffectTerm,
    aliased_within,
    aligned_by_labels,
    build_design,
    check_unique_columns,
    label_collision,
    missing_detail,
    numeric_row_values,
    residual_df_problem,
    sorted_levels,
    term_columns_message,
    term_count_problem,
    underflowing,
    unique_codes,
    value_kind,
    weights_beyond_scale,
    weights_decades,
    within_weights_spread,
)
from ..spec.formula import made_by, parse_formula, response_only_names
from ..spec.labels import column_labels, shown_label
from ..spec.transforms import stateful_calls, unvouched_calls
from .dataset_transforms import own_values
from .results import Pieces

# Up to this many values of a chunk shape's (padded) arrays, summed over buckets (5,000 sleepstudy-shaped
# datasets' sufficient statistics of ~200) the programs compile without LLVM's optimization (CPU): the
# compilation saved outweighs the slower run of that many datasets (measured in benchmarks/RESULTS.md,
# "Batch fitting, fifth session").  The linear models' batch paths (one term, several, AR(1)) use it; a GLMM's
# run costs more per value (PIRLS in every probe) and has its own rule (``fit_glmm.QUICK_COMPILE_MAX_ROWS``).
QUICK_COMPILE_MAX_VALUES = 1e6
#: Most datasets per call of a batch fitted on the host (one term: ``fit._on_host``; several:
#: ``fit_terms._on_host``) by default: enough to spread each NumPy call's cost over many datasets, few enough that a
#: call's arrays stay small.
HOST_CHUNK = 256


def host_fits(float_type, sharding) -> bool:
    """Whether a batch may be fitted on the host (NumPy, nothing compiled): on one CPU device, in float64.  Each
    path adds its own conditions (``fit._on_host``, ``fit_terms``)."""
    return sharding is None and jax.default_backend() == "cpu" and float_type == np.float64


def one_factor(plan) -> bool:
    """Whether every random-effect term of ``plan`` has the same level on every row (one grouping factor:
    ``(1 + x || g)``): a host search may then fit the terms as one term of their summed width whose factor is
    block-diagonal with theirs (:func:`hierpool.algebra.linalg.block_diagonal_positions`; the linear several-term,
    the GLMM and the AR(1) one-term host searches)."""
    return shared_factor([level for level, _, _ in plan.term_levels])


def merged_widths(plan) -> tuple | None:
    """The terms' widths where several terms share one grouping factor (:func:`one_factor`), for a host search that
    fits them as one (its ``term_ks``); None otherwise."""
    terms = plan.design.terms
    return tuple(term.k for term in terms) if len(terms) > 1 and one_factor(plan) else None


def merge_terms(terms) -> list:
    """Terms ``(level, z, width)`` on one grouping factor as one: their levels and width (the same for each), their
    columns side by side (:func:`merged_widths`)."""
    return [(terms[0][0], np.column_stack([z for _, z, _ in terms]), terms[0][2])]


def host_chunk(bytes_per_dataset: float, most: int = HOST_CHUNK, budget: float = HOST_CHUNK_BYTES) -> int:
    """Datasets per host call by default: ``most`` (:data:`HOST_CHUNK`), fewer where a call's temporaries would
    pass ``budget`` (:data:`hierpool.algebra.search.HOST_CHUNK_BYTES`; ``bytes_per_dataset``: what the path states
    for one dataset)."""
    return max(1, min(most, int(budget // max(bytes_per_dataset, 1))))


def host_chunk_length(count: int, most: int, workers: int) -> int:
    """Datasets per host call for ``count`` datasets: at most ``most``, the calls planned as a whole number of rounds
    of the ``workers`` threads and as near equal as a common length allows (the last may be shorter).
    (``min(most, ceil(count / workers))`` left the last round half idle: 1,000 datasets of a 600-row GLMM in
    calls of at most 223 made four of 223 and one of 108, and one thread ran three of the five.)"""
    if count <= 0:
        return 1
    workers = max(workers, 1)
    calls = math.ceil(count / max(most, 1))
    calls = math.ceil(calls / workers) * workers
    return max(1, math.ceil(count / calls))


@dataclass(frozen=True)
class KindVote:
    """How :func:`kind_conflicts` settled the columns stacked from values of several kinds: per column the kind kept
    (``usual``) and the datasets outvoted there (``outvoted``, labels in the data's order)."""

    usual: dict = field(default_factory=dict)
    outvoted: dict = field(default_factory=dict)


def _label_column(label, frame: pd.DataFrame):
    """``label`` as the ``by`` column of ``frame``'s rows: a tuple key (``dict(tuple(data.groupby(["site",
    "arm"])))``) as one object value per row, which pandas would read as a column of its items."""
    if isinstance(label, tuple):
        return pd.Series([label] * len(frame), index=frame.index, dtype=object)
    return label


def long_frame(data, by: str, columns=(), kept: dict | None = None,
               logical=None) -> tuple[pd.DataFrame, dict, KindVote]:
    """The datasets as one long frame with a ``by`` column (a list or dict of frames is stacked), the datasets
    set aside (label -> why: one lacking a column of ``columns`` that others have, :func:`absent_reason`) and the
    vote: where a column of ``columns``
    (:attr:`~hierpool.spec.formula.ModelSpec.values`) is stacked from values of several kinds, the datasets with
    Python objects in it or whose kind is not most datasets' (:func:`kind_conflicts`; ``kept``: column -> kind kept
    whatever the counts) are left out of the frame, to be refused in their rows.  A grouping column of text in some
    datasets and numbers in others is read per dataset as its labels' text, ordered as each dataset's single fit
    orders them (:func:`text_labels_across`), and a
    factor held as Categoricals of several level orders gets one order, the datasets ordering it otherwise set
    aside (:func:`category_orders`)."""
    if isinstance(data, pd.DataFrame):
        check_unique_columns(data, (by, *columns))
        if not isinstance(by, str) or by not in data.columns:
            raise DataError(f"by={by!r} is not a column of the data (columns: {list(data.columns)})")
        return text_labels_across(data, by, None, columns), {}, KindVote()
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, (list, tuple)):
        items = list(enumerate(data))
    else:
        raise ArgumentError(f"data must be a DataFrame, or a list or dict of DataFrames, got {type(data).__name__}")
    if not items:
        raise DataError("data is an empty collection of datasets")
    for label, frame in items:
        if not isinstance(frame, pd.DataFrame):
            raise ArgumentError(f"dataset {label!r} is a {type(frame).__name__}, not a DataFrame")
        check_unique_columns(frame, columns, f"dataset {label!r}")
        if by in frame.columns:
            raise ArgumentError(f"dataset {label!r} already has a column {by!r}; pass another by=")
        if not isinstance(label, tuple) and pd.isna(label):  # it would read as a row naming no dataset
            raise ArgumentError(f"a dataset's key is {label!r}: every dataset of a dict needs a label")
    # a column held as a Categorical in some datasets and not in others: pandas stacks a Categorical of numbers
    # beside numbers as numbers (a factor in its single fit, fitted as a covariate silently), so the kinds' vote is
    # taken before stacking, and the kept datasets' Categoricals meet text or categories alone (ordered below)
    split = [name for name in columns if len({isinstance(item[name].dtype, pd.CategoricalDtype) for _, item in items
                                             if name in item.columns and len(item)}) > 1]
    early, early_vote = kind_conflicts(items, split, kept) if split else ({}, KindVote())
    if len(early) == len(items):
        raise nothing_left(early)
    items = [(label, item) for label, item in items if label not in early]
    frame, set_aside, vote = _stacked(items, by, columns, kept, logical)
    return frame, {**early, **set_aside}, KindVote({**early_vote.usual, **vote.usual},
                                                   {**early_vote.outvoted, **vote.outvoted})


def _stacked(items: list, by: str, columns, kept: dict | None, logical) -> tuple[pd.DataFrame, dict, KindVote]:
    """:func:`long_frame` of a list of datasets: stacked, then the datasets set aside and the vote."""
    frame = pd.concat([frame.assign(**{by: _label_column(label, frame)}) for label, frame in items],
                      ignore_index=True)
    # a dataset lacking a column others have: its rows are missing values there, which the design would drop and
    # count in its warning as if missing, though the dataset is refused for lacking the column (looked for only
    # where a column has missing values)
    lacking = {}
    if any(name in frame.columns and frame[name].hasnans for name in columns):
        lacking = {label: reason for label, item in items if len(item) and (reason := absent_reason(item, columns))}
        if len(lacking) == sum(len(item) > 0 for _, item in items):
            lacking = {}  # every dataset lacks it: the design's own error names the column
        frame = frame[~frame[by].isin(list(lacking))].reset_index(drop=True)
    # a grouping column of text in some datasets and numbers in others: stacked, 3 and "3" of two datasets met in one
    # column, refused there, though each dataset's single fit reads its own
    frame = text_labels_across(frame, by, dict(items), columns)
    # a factor whose datasets order its levels differently: one order for the batch, the datasets that disagree set
    # aside (their single fits code another baseline)
    ordered_aside, orders = category_orders([(label, item) for label, item in items if label not in lacking], columns)
    recoded = {name: order for name, order in orders.items()  # (stacked Categoricals of one order stay as they are)
               if not (isinstance(frame[name].dtype, pd.CategoricalDtype)
                       and [str(level) for level in frame[name].cat.categories] == order)}
    if recoded:
        frame = frame.assign(**{name: pd.Categorical(frame[name].astype(str).where(frame[name].notna()),
                                                     categories=order) for name, order in recoded.items()})
    if ordered_aside:
        lacking = {**lacking, **ordered_aside}
        if len(lacking) == len(items):
            raise nothing_left(lacking)
        frame = frame[~frame[by].isin(list(ordered_aside))].reset_index(drop=True)
    # two kinds stacked make an object column of mixed values: only then are the datasets looked at one by one
    # (not every dataset's columns on the common path: benchmarks/RESULTS.md, thirtieth session)
    mixed = [name for name in columns if name in frame.columns and frame[name].dtype == object
             and not pd.api.types.is_string_dtype(frame[name])]
    # pandas stacks true/false values with numbers as numbers (a factor in its single fit, a number here, silently):
    # told by the datasets' dtypes, not their values; not in ``logical``'s complement (a response's True/False are
    # its 1/0 either way)
    mixed += [name for name in (columns if logical is None else logical) if name in frame.columns and name not in mixed
              and len({pd.api.types.is_bool_dtype(item[name].dtype) for _, item in items
                       if name in item.columns and len(item)}) > 1]
    if not mixed:
        return frame, lacking, KindVote()
    set_aside, vote = kind_conflicts([(label, item) for label, item in items if label not in lacking], mixed, kept)
    set_aside = {**lacking, **set_aside}
    if len(set_aside) == len(items):  # each outvoted on some column: no dataset left to fit
        raise nothing_left(set_aside)
    frame = frame[~frame[by].isin(list(set_aside))].reset_index(drop=True)
    # the kept kind's dtype (numbers stacked with a dataset's all-missing object column are floats again)
    return frame.assign(**{name: frame[name].infer_objects() for name in mixed}), set_aside, vote


def nothing_left(reasons: dict) -> DataError:
    """The error of a batch whose every dataset is refused: the first few datasets' reasons (label -> why), in their
    single fits' words."""
    return DataError("no dataset is left to fit: " + "; ".join(f"dataset {shown_label(label)!r}: {why}"
                                                               for label, why in list(reasons.items())[:3]))


def text_labels_across(frame: pd.DataFrame, by: str, items: dict | None, columns) -> pd.DataFrame:
    """The long ``frame`` with each object column that is not one of ``columns`` (read as values: their kinds are
    :func:`kind_conflicts`' to judge) and mixes text with other values, as each dataset's labels' text as its single
    fit reads them (:func:`~hierpool.spec.labels.column_labels` of its own column: 3.0 of a float column is "3"), as
    a Categorical whose categories keep every dataset's own order of its levels (:func:`own_level_order`,
    :func:`merged_order`: numbers as numbers beside another dataset's text), or as plain text where the datasets'
    orders contradict each other, a dataset's values collide or rows belong to no dataset.
    ``items``: label -> the dataset's own frame (None: ``frame`` is the user's one frame, split by ``by``).  A dataset
    whose own values collide (3 and "3": :func:`~hierpool.spec.design.label_collision`) keeps its values: where the
    formula reads the column, the long design refuses them, and :func:`build_or_refuse` finds that dataset and
    refuses it in its row with its single fit's words.  Rows of no dataset (``by`` missing) are made text too, for
    the check that refuses them to see them."""
    # (pandas' type inference, in C: no Python loop over a text column's values on the common path)
    # (a name the frame holds twice is left to the design, which refuses it where the formula reads it)
    repeated = set(frame.columns[frame.columns.duplicated()])
    mixed = [name for name in frame.columns if name != by and name not in columns and name not in repeated
             and frame[name].dtype == object
             and pd.api.types.infer_dtype(frame[name], skipna=True) in ("mixed", "mixed-integer")]
    if not mixed:
        return frame
    rows = frame.groupby(by, sort=False).indices
    orphans = np.flatnonzero(frame[by].isna().to_numpy())  # (refused later, by name, as rows of no dataset)
    relabelled = {}
    for name in mixed:
        text = frame[name].to_numpy(dtype=object, copy=True)
        text[orphans] = [value if isinstance(value, str) or pd.isna(value) else str(value) for value in text[orphans]]
        orders, clean = [], True
        for label, positions in rows.items():
            own = frame.iloc[positions] if items is None else items[label]
            if name not in own.columns:  # (its rows hold no value there: refused later, by name)
                continue
            if label_collision(name, own[name].dropna().unique()):  # kept as it is, to be refused by name
                clean = False
                continue
            column = own[name]
            text[positions] = np.where(column.isna(), np.nan, column_labels(column).astype(object))
            orders.append(own_level_order(column))
        order = merged_order(orders) if clean and not orphans.size else None
        # as text, the levels sort as text (a dataset of numbers 0, 1, 10, 2): as a Categorical in an order that
        # is each dataset's own, each dataset's levels come in its single fit's order (its ranef rows)
        relabelled[name] = text if order is None else pd.Categorical(text, categories=order)
    return frame.assign(**relabelled)


def own_level_order(column: pd.Series) -> list[str]:
    """The labels of a grouping column's levels in the order its single fit gives them
    (:func:`~hierpool.spec.design.sorted_levels`, as :func:`~hierpool.spec.design.group_index` orders them)."""
    values = column.dropna()
    _, uniques = sorted_levels(values)
    return list(column_labels(pd.Series(uniques, dtype=values.dtype)))


def merged_order(orders: list[list[str]]) -> list[str] | None:
    """One order of every label of ``orders`` (each a list of distinct labels) that keeps each list's own order, the
    labels that none orders against each other in text order; None where the lists contradict each other (numbers
    2 and 10 in one dataset, the text "10" and "2" in another).  Kahn's topological sort of the lists' successive
    pairs."""
    successors: dict[str, set] = {}
    indegree: dict[str, int] = {}
    for order in orders:
        for label in order:
            successors.setdefault(label, set())
            indegree.setdefault(label, 0)
        for before, after in itertools.pairwise(order):
            if after not in successors[before]:
                successors[before].add(after)
                indegree[after] += 1
    ready = sorted(label for label, count in indegree.items() if count == 0)
    out = []
    while ready:
        label = ready.pop(0)
        out.append(label)
        for after in sorted(successors[label]):
            indegree[after] -= 1
            if indegree[after] == 0:
                bisect.insort(ready, after)
    return out if len(out) == len(indegree) else None


def category_orders(items, columns) -> tuple[dict, dict]:
    """(label -> why a dataset is set aside, column -> the batch's level order) for the columns of ``columns`` that
    some dataset holds as a pandas Categorical.  A single fit codes such a factor in its categories' order (its first
    used level the baseline), text in sorted order; stacked, Categoricals of other categories became text, sorted,
    and a dataset ordering its levels otherwise was fitted with another baseline than its single fit, silently.  The
    batch's order is, among the datasets' own (each Categorical's categories, and text's sorted order; then any
    level it lacks, sorted), the one with which most datasets' used levels agree, the first seen among equals (the
    first Categorical's set the other datasets aside where it was the odd one); a dataset whose levels come in
    another order (its single fit's) is set aside, in its row."""
    reasons, orders = {}, {}
    for name in columns:
        holders = [(label, item[name]) for label, item in items if name in item.columns]
        if not any(isinstance(column.dtype, pd.CategoricalDtype) for _, column in holders):
            continue
        if any(value_kind(column) != "text or categories" for _, column in holders):
            continue  # numbers beside categories: the kinds' vote (kind_conflicts) sets the odd ones aside
        every = sorted({str(v) for _, column in holders for v in column.dropna().unique()})
        used, candidates = {}, []
        for label, column in holders:
            if isinstance(column.dtype, pd.CategoricalDtype):
                used[label] = tuple(str(level) for level in column.cat.remove_unused_categories().cat.categories)
                candidate = tuple(str(level) for level in column.cat.categories)
            else:
                used[label] = tuple(sorted(str(v) for v in column.dropna().unique()))
                candidate = tuple(every)
            if candidate not in candidates:
                candidates.append(candidate)
        counts = collections.Counter(used.values())

        def completed(candidate, every=every):  # then the levels it lacks, sorted
            return list(candidate) + [level for level in every if level not in set(candidate)]

        def agrees(order, levels) -> bool:
            position = {level: i for i, level in enumerate(order)}
            return [position[level] for level in levels] == sorted(position[level] for level in levels)

        order = completed(max(candidates, key=lambda c: sum(n for levels, n in counts.items()
                                                             if agrees(completed(c), levels))))
        for label, _ in holders:
            if not agrees(order, used[label]):
                reasons.setdefault(label, f"its factor {name!r} orders its levels {list(used[label])} (its single "
                                          f"fit's baseline {used[label][0]!r}), where the batch orders them {order}: "
                                          "give every dataset one category order")
        orders[name] = order
    return reasons, orders


def column_kind(column: pd.Series) -> str | None:
    """How the formula reads ``column``'s values (:func:`~hierpool.spec.design.value_kind`); None where no value is
    there to tell (all missing).  Two kinds stacked are an ``object`` column that the formula cannot read."""
    column = column.dropna()
    return value_kind(column) if len(column) else None


def kind_conflicts(items: list[tuple], columns, kept: dict | None = None) -> tuple[dict, KindVote]:
    """(per dataset label, why it is set aside; the :class:`KindVote`): a column of ``columns`` holds Python objects
    in it, which its single fit refuses (:func:`~hierpool.spec.design.check_value_types`), or another kind of value
    (:func:`column_kind`) than in most of the other datasets (where two kinds are as common, the first in
    :data:`~hierpool.spec.design.READABLE_KINDS` is kept: never the order of the datasets; ``kept``: column -> kind
    kept where present, whatever the counts).  Stacked, the kinds made one column that the whole batch's formula
    refused, naming neither the column nor the dataset."""
    reasons, vote = {}, KindVote()
    kept = kept or {}
    for name in columns:
        kinds = {label: column_kind(frame[name]) for label, frame in items if name in frame.columns}
        kinds = {label: kind for label, kind in kinds.items() if kind is not None}
        for label, kind in kinds.items():
            if kind not in READABLE_KINDS and label not in reasons:
                reasons[label] = (f"column {name!r} holds {kind} in this dataset, which the formula cannot read: "
                                  "convert it (pd.to_numeric, or .astype(str) for a factor)")
        counts = collections.Counter(kind for kind in kinds.values() if kind in READABLE_KINDS)
        if len(counts) < 2:
            continue
        usual = kept[name] if kept.get(name) in counts else max(
            counts, key=lambda kind: (counts[kind], -READABLE_KINDS.index(kind)))
        vote.usual[name], vote.outvoted[name] = usual, []
        n_usual = counts[usual]
        for label, kind in kinds.items():
            if kind != usual and kind in READABLE_KINDS:
                vote.outvoted[name].append(label)
                if label not in reasons:
                    others = f"{n_usual} other dataset" + ("s" if n_usual > 1 else "")
                    reasons[label] = (f"column {name!r} holds {kind} in this dataset but {usual} in {others}: one "
                                      "model is fitted to every dataset; convert the column")
    return reasons, vote


def bucket_width(n_levels: np.ndarray) -> np.ndarray:
    """Padded level count per dataset: the common count, or the next power of two."""
    if n_levels.min() == n_levels.max():
        return n_levels.copy()
    return 2 ** np.ceil(np.log2(np.maximum(n_levels, 1))).astype(int)


def padded_widths(plan: BatchPlan) -> np.ndarray:
    """(datasets, terms) padded level counts: each term's as the one-term path pads its only term."""
    return np.stack([bucket_width(n_levels) for _, n_levels, _ in plan.term_levels], axis=1)


def aliased_message(p: int, names) -> str:
    """Why a dataset whose fixed-effect columns ``names`` are aliased in it is not fitted in the batch.  (A dataset
    whose aliased columns are all zero, a level it lacks, is fitted alone instead, unless a random-effect term's
    columns are zero there too: :meth:`BatchPlan.alone_for_levels` tells it by this message.)  Its single fit drops
    such columns, or recodes a factor whose baseline level it lacks (another baseline: the message said only "does
    without them", a review)."""
    return (f"the {p} fixed-effect columns have rank {p - len(names)} in this dataset: {', '.join(names)} zero or "
            "aliased with earlier columns here, and a batch fits the same columns to every dataset: fit it alone "
            "(its single fit drops such columns, or recodes a factor whose baseline level the dataset lacks)")


def dataset_problems(n_obs, n_levels, aliased, p: int, coef_names, group: str, sigma_known: bool = False,
                     levels=None) -> list[str]:
    """Why each dataset cannot be fitted ("" when it can), from its counts: its term's (:func:`term_count_problems`)
    then its fixed part's (:func:`fixed_part_problems`), as a single fit checks them."""
    return [term or fixed for term, fixed in zip(term_count_problems(n_obs, n_levels, coef_names, group, sigma_known,
                                                                     levels),
                                                 fixed_part_problems(n_obs, aliased, p, sigma_known))]


def term_count_problems(n_obs, n_levels, coef_names, group: str, sigma_known: bool, levels=None) -> list[str]:
    """Per dataset, why a random-effect term of its ``n_levels`` levels of ``group`` cannot be fitted to its ``n_obs``
    rows ("" where it can), in its single fit's words (:func:`~hierpool.spec.design.term_count_problem`: fewer than
    two levels, or as many levels or random effects as observations; ``levels``: each dataset's level labels, its
    only one named).  With known residual sds (``sigma_known``) one observation per level is identifiable (a
    meta-analysis), as ``hp.lmm``'s check allows."""
    n_obs, n_levels = np.asarray(n_obs), np.asarray(n_levels)
    problems = [""] * len(n_obs)
    # (only the datasets whose counts can hold a problem are asked: a batch's are nearly all fine)
    asked = (n_levels < 2) | (n_obs == 0) | ((not sigma_known) & (n_levels * len(coef_names) >= n_obs))
    for d in np.flatnonzero(asked):
        n, ell = n_obs[d], n_levels[d]
        if n == 0:  # why none is left is the plan's to say (BatchPlan.refusals): the counts alone cannot
            problems[d] = "no rows to fit"
            continue
        first = None if levels is None or not len(levels[d]) else str(levels[d][0])
        problems[d] = term_count_problem(group, coef_names, int(ell), int(n), sigma_known, first)
    return problems


def fixed_part_problems(n_obs, aliased, p: int, sigma_known: bool, glmm: bool = False) -> list[str]:
    """Per dataset, why its fixed part cannot be fitted ("" where it can): X's rank (``aliased``: the names of its
    aliased fixed-effect columns, :meth:`BatchPlan.aliased_names`; the batch's X is common, so a rank-deficient
    dataset is refused, where its single fit would drop the columns or recode a factor: :func:`aliased_message`),
    and, for a linear model with a residual
    variance, as many observations as columns, in its single fit's words
    (:func:`~hierpool.spec.design.residual_df_problem`).  With known residual sds (``sigma_known``: ``se=``) that
    many rows are fitted, as ``hp.lmm(se=)`` fits them (the batch refused them); a GLMM's (``glmm``) are refused, as
    ``hp.glmm`` refuses them (its PIRLS fits every row)."""
    n_obs = np.asarray(n_obs)
    problems = [""] * len(n_obs)
    # (only the datasets with aliased columns or no more rows than columns are asked)
    asked = np.array([bool(names) for names in aliased], dtype=bool) | (n_obs <= p)
    for d in np.flatnonzero(asked):
        n, names = n_obs[d], aliased[d]
        if names:
            problems[d] = aliased_message(p, names)
        elif glmm:  # (hp.glmm's own refusal comes from its PIRLS, where the fixed effects fit every row)
            problems[d] = f"{n} observations for {p} fixed effects" if n <= p else ""
        else:  # with known residual sds (se=) no residual variance needs rows of its own, as in hp.lmm
            problems[d] = "" if sigma_known else residual_df_problem(p, int(n))
    return problems


def mesh_sharding():
    """A sharding of the leading (dataset) axis over all devices; None with one device."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def place(tree, sharding):
    """Host arrays -> device arrays sharded along their leading axis (each process supplies its own shards)."""
    if sharding is None:
        return tree
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda index: np.asarray(a)[index]), tree)


def fetch(tree):
    """Device results -> host NumPy arrays; results spread over several processes are gathered first."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


class _NoBar(contextlib.nullcontext):
    """A progress bar not shown: tqdm is not imported for it (its import pulls in asyncio; timed in
    benchmarks/RESULTS.md, "Batch fitting for every model, eleventh session")."""

    def __enter__(self):
        return self

    def update(self, n: int = 1) -> None:
        pass


def progress_bar(progress: bool | None, total: int, name: str):
    """A tqdm bar over datasets; ``progress=None``: shown when stderr is a terminal (a bar not shown does nothing)."""
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="datasets", file=sys.stderr)


#: Batched LAPACK calls (Cholesky, a triangular solve of one right-hand side) that two threads of jaxlib 0.10.2
#: programs ran on this project's CPU, as (size, batch): 16 x 16 systems 128 at a time, 6 x 6 1,024 at a time.
#: 20 x 20 x 128 and 24 x 24 x 64 were split and hung (:func:`thread_count`; benchmarks/RESULTS.md, "Batch
#: fitting for every model, tenth session").  jaxlib's own rule is not known, so a call is taken as safe only
#: within both bounds: its size^3 x batch and its size^2 x batch.
LAPACK_UNSPLIT = ((16, 128), (6, 1024))


def lapack_may_split(size: int, batch: int) -> bool:
    """Whether jaxlib may split a batched LAPACK call of ``batch`` ``size`` x ``size`` systems over XLA's CPU pool
    (then two threads running such programs can hang: :func:`thread_count`)."""
    return any(size**power * batch > max(s**power * b for s, b in LAPACK_UNSPLIT) for power in (2, 3))


#: Chunk threads of a one-term batch's compiled programs on one accelerator (no mesh; ``hp.fit_batch``'s one-term
#: path alone, where :func:`thread_count` gives 1).  1 runs the chunks one after another, the device idle while the
#: host starts a chunk (its moments' start), snaps its variances onto the boundary and reads its results; 2 keeps a
#: chunk on the device while the host works on another.  Not yet measured on a GPU: ``benchmarks/gpu.py``'s
#: shared-design check times both (``float64_two_threads``), for the next GPU run to decide.
ACCELERATOR_THREADS = 1


def thread_count(sharding, serial: bool = False, newton_systems: tuple[int, int] | None = None) -> int:
    """Parallel chunk threads: one per core on a single CPU device, else 1 (the mesh parallelizes).

    ``serial``: the chunks run one after another.  For programs with several random-effect terms: two
    threads each running one (the general blocked criterion under vmap inside Newton's while loop)
    deadlocked XLA on this project's 2-core CPU, e.g. 40 crossed datasets (16 subjects x 16 items) in two
    chunks, which ran one chunk at a time (benchmarks/RESULTS.md, "Batch fitting for every model").  The
    cause (tenth session): jaxlib's batched LAPACK kernels (here the triangular solves of the dense systems)
    split a large batch into tasks on XLA's CPU pool and block for them, and with asynchronous dispatch the
    executions themselves run on that pool: two executions inside such calls hold every pool thread and wait
    for tasks nothing can run.  Whether a call splits depends on its batch and system sizes (measured:
    :data:`LAPACK_UNSPLIT`), and a several-term program's dense systems grow with the levels, so every
    several-term program runs serially.  A one-term or GLMM program's LAPACK calls are on its Newton systems
    (its parameters square, one per dataset of a call; a term's k x k blocks are unrolled arithmetic): it runs
    in threads unless those may split: ``newton_systems`` (size, systems per call), :func:`lapack_may_split`.
    """
    if serial or sharding is not None or jax.default_backend() != "cpu":
        return 1
    if newton_systems is not None and lapack_may_split(*newton_systems):
        return 1
    return host_threads()


def host_threads() -> int:
    """Threads for whole single fits run on the host (``hp.fit_batch``'s refits of the datasets its batched search
    left unconverged): one per core whatever JAX's device, their worker processes running JAX on the CPU
    (:mod:`hierpool.batch.host_processes`).  On a GPU's machine :func:`thread_count` is 1 (the device runs the
    batch), and the refits ran one after another beside idle cores (benchmarks/RESULTS.md, "The first GPU run")."""
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Chunk:
    """Equal-shape work: ``members`` (dataset indices), their statistics padded to ``len(index)`` rows."""

    members: np.ndarray
    index: np.ndarray  # positions in the bucket's usable datasets, padded with the first
    bucket: int  # padded level count

    @property
    def count(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class BatchPlan:
    """One model over many datasets: the design of the long frame and each dataset's rows and levels."""

    frame: pd.DataFrame
    design: Design
    by: str
    dataset: np.ndarray  # dataset code of each design row
    labels: pd.Index  # dataset labels, in code order
    level: np.ndarray  # level of each design row within its dataset
    n_levels: np.ndarray
    n_obs: np.ndarray
    levels: list  # each dataset's level labels, in hp.lmm's order
    term_levels: tuple = ()  # per term: (level of each row, levels per dataset, level labels per dataset)
    weights: object = None  # the weights= argument as given: a column name, or an array aligned with frame's rows
    offset: object = None  # the offset= argument, likewise
    se: str | None = None  # the se= argument: the column of known residual sds
    refusals: tuple = ()  # per dataset: why its single fit refuses its data ("" when it does not), plan_refusals
    user_aliased: dict | None = None  # fixed_aliased of the user's X where design.X is a conditioned copy of it
    # datasets whose own design their single fit refuses (batch.dataset_transforms): that refusal, not the counts'
    design_refused: frozenset = frozenset()
    # fixed-effect columns of whole-column calls, each dataset's own design's (batch.dataset_transforms)
    own_columns: frozenset = frozenset()

    @property
    def term(self) -> RandomEffectTerm:
        return self.design.terms[0]

    @property
    def n_datasets(self) -> int:
        return len(self.labels)

    @cached_property
    def fixed_aliased(self) -> dict:
        """dataset -> its fixed-effect columns (indices) that ``hp.lmm`` would drop as aliased with earlier ones
        (:func:`~hierpool.spec.design.aliased_within`), for the datasets with some; the user's X's
        (:attr:`user_aliased`) where the design's is conditioned (:mod:`hierpool.batch.conditioning`: centred, a
        column of 20,000 + 1e-5 z is no longer aliased with the intercept, which hp.glmm drops)."""
        if self.user_aliased is not None:
            return self.user_aliased
        return aliased_within(self.design.X, self.dataset, self.n_datasets, gram=self._gram(0))

    @cached_property
    def term_copies(self) -> list[str]:
        """Per dataset, why the single fit refuses a random-effect term whose columns there are zero or copies of
        its earlier ones (:func:`~hierpool.spec.design.copied_columns`: a slope on a covariate constant in the
        dataset), "" where none is: the batch left such a term's theta where it started, converged."""
        messages = [""] * self.n_datasets
        for t, term in enumerate(self.design.terms):  # (the single fit's rule: spec.design.copied_columns, by dataset)
            for d, copies in aliased_within(term.z, self.dataset, self.n_datasets, gram=self._gram(t + 1),
                                            tol=TERM_RANK_TOL).items():
                messages[d] = messages[d] or term_columns_message(term.label, [term.coef_names[j] for j in copies])
        return messages

    @cached_property
    def _grams(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(the positions of X's columns and of each term's among the distinct columns of [X z_1 ...], their Gram
        matrix per dataset (D, c, c), unweighted): summed once for the rank checks of X and of the terms' columns
        (sleepstudy's z is its X)."""
        columns, positions = distinct_block_columns(self.design.X, *(t.z for t in self.design.terms))
        return positions, grouped_products(self.dataset, columns, columns, None, self.n_datasets)

    def _gram(self, block: int) -> np.ndarray:
        """Each dataset's Gram matrix of X's columns (``block`` 0) or of term ``block - 1``'s (:attr:`_grams`)."""
        positions, gram = self._grams
        return gram[:, positions[block]][:, :, positions[block]]

    @cached_property
    def zero_columns(self) -> dict:
        """dataset -> its aliased fixed-effect columns (:attr:`fixed_aliased`), for the datasets in whose rows every
        one of them is zero: a factor's level the dataset lacks (not its baseline).  Its single fit does without
        them and its other columns mean what the batch's do (the intercept the same baseline's), so fit_batch fits it
        alone, NaN in their places (:func:`hierpool.batch.fit._result`); where an aliased column is not zero (a
        baseline level it lacks) the others' meaning changes, and the dataset is refused."""
        aliased = self.fixed_aliased
        if not aliased:
            return {}
        squares = np.diagonal(self._gram(0), axis1=1, axis2=2)  # (zero in the conditioned X too)
        return {d: tuple(columns) for d, columns in aliased.items() if np.all(squares[d, list(columns)] == 0)}

    def alone_for_levels(self, messages) -> list[int]:
        """The datasets refused (``messages``: the batch's reasons) only for fixed-effect columns zero in them
        (:attr:`zero_columns`: a factor's level they lack, not the baseline), whose single fit does without those
        columns, the others meaning what the batch's do: fit_batch fits them alone, bayes_batch samples them alone.
        Not where a random-effect term's column is zero or a copy there too (:attr:`term_copies`, ``(1 + f | g)``:
        its single fit's term has other columns)."""
        names, p = self.design.fixed_names, self.design.p
        return [d for d, columns in self.zero_columns.items()
                if messages[d] == aliased_message(p, [names[j] for j in columns]) and not self.term_copies[d]]

    def alone_note(self, index: int, how: str) -> str:
        """The message of a dataset of :meth:`alone_for_levels` (``how``: "fitted", "sampled")."""
        names = [self.design.fixed_names[j] for j in self.zero_columns[index]]
        # (a whole-column call's column its own design drops, zero in the batch's: center(x) of a constant x)
        made = [name for name in names if name in self.own_columns]
        levels = [name for name in names if name not in self.own_columns]
        why = ([f"{', '.join(levels)} zero in this dataset (a level it lacks)"] if levels else []) + \
            ([f"{', '.join(made)} not in its own design (zero or aliased in it)"] if made else [])
        return f"{', '.join(why)}: {how} alone without them, NaN in their places"

    def probe_scales(self) -> np.ndarray:
        """(datasets, n_theta) each dataset's theta units for the searches off the boundary, from its own
        random-effect columns (:func:`hierpool.algebra.linalg.terms_theta_scales`), as its single fit's
        (:func:`hierpool.closedform.optimize.design_scales`).  On a conditioned plan's columns (z times the
        weights' unit s, :mod:`hierpool.batch.conditioning`) 1 / (s rms) times s: the units of theta over s, which the
        searches run on."""
        return terms_theta_scales(self.design.terms, self.dataset, self.n_datasets, self.design.weights)

    def uneven_weights(self) -> np.ndarray:
        """(datasets,) bool: whether each dataset's prior weights (or known residual sds) are uneven
        (:func:`hierpool.algebra.linalg.weights_uneven`); all False without weights."""
        if self.design.weights is None:
            return np.zeros(self.n_datasets, dtype=bool)
        return weights_uneven(self.design.weights, self.dataset, self.n_datasets)

    def aliased_names(self, members=None, aliased: dict | None = None) -> list[tuple]:
        """The names of the aliased fixed-effect columns of each dataset of ``members`` (all by default):
        ``aliased`` (dataset -> column indices; default :attr:`fixed_aliased`)."""
        names = self.design.fixed_names
        members = range(self.n_datasets) if members is None else members
        aliased = self.fixed_aliased if aliased is None else aliased
        return [tuple(names[j] for j in aliased.get(int(d), ())) for d in members]

    def refused(self, index: int, found: str) -> str:
        """Dataset ``index``'s reason not to be fitted: its refusal by the single fit (:attr:`refusals`) where the
        checks on its counts (``found``, "" when none) found nothing or found it has no rows (they cannot say why);
        else ``found``.  A dataset whose own design is refused (:attr:`design_refused`) keeps that refusal: the
        single fit builds its design before it counts anything."""
        refusal = self.refusals[index] if self.refusals else ""
        return refusal if refusal and (not found or self.n_obs[index] == 0 or index in self.design_refused) \
            else found

    def with_refusals(self, messages: list[str]) -> list[str]:
        """Every dataset's reason not to be fitted (:meth:`refused`), from ``messages``, its count checks'."""
        return [self.refused(index, found) for index, found in enumerate(messages)]

    def bucket_members(self) -> list[tuple[int, np.ndarray]]:
        """(padded level count, datasets in that bucket), known before any statistics are computed."""
        width = bucket_width(self.n_levels)
        return [(int(bucket), np.flatnonzero(width == bucket)) for bucket in np.unique(width)]

    def statistics_shape(self, bucket: int, rows: int, dtype=np.float64) -> BatchStatistics:
        """The shapes of ``rows`` datasets' statistics in a bucket (to compile before computing them)."""
        p, k = self.design.p, self.term.k
        shapes = BatchStatistics(ztz=(rows, bucket, k, k), ztx=(rows, bucket, k, p), zty=(rows, bucket, k),
                                 xtx=(rows, p, p), xty=(rows, p), yty=(rows,), n=(rows,), log_weights=(rows,),
                                 beta_shift=(rows, p))
        out = jax.tree_util.tree_map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), shapes,
                                     is_leaf=lambda x: isinstance(x, tuple))
        # the shift stays float64 (BatchStatistics.astype)
        return dataclasses.replace(out, beta_shift=jax.ShapeDtypeStruct((rows, p), np.float64))

    def buckets(self, dtype=np.float64, shifts: tuple[np.ndarray, np.ndarray] | None = None):
        """Per padded level count: (members that can be fitted, their statistics); problems in ``messages``.
        ``shifts``: every dataset's :meth:`location_shifts`, where the caller has them."""
        term, design = self.term, self.design
        messages = [""] * self.n_datasets
        out = []
        for bucket, members in self.bucket_members():
            if len(members) == self.n_datasets:  # every dataset (members in order): no copy of the rows
                rows, local = slice(None), self.dataset
            else:
                rows = np.isin(self.dataset, members)
                local = np.searchsorted(members, self.dataset[rows])
            weights = None if design.weights is None else design.weights[rows]
            stats = sufficient_statistics(local, self.level[rows], design.X[rows], term.z[rows], design.y[rows],
                                          len(members), int(bucket), weights=weights, offset=design.offset[rows],
                                          shifts=None if shifts is None else (shifts[0][members], shifts[1][rows]))
            # X's rank as hp.lmm judges it (plan.fixed_aliased, from the plan's Gram matrices)
            problems = dataset_problems(self.n_obs[members], self.n_levels[members], self.aliased_names(members),
                                        design.p, term.coef_names, term.group, design.sigma_known,
                                        self.levels if len(members) == self.n_datasets else
                                        [self.levels[d] for d in members])
            problems = [self.refused(index, problem or self.term_copies[index])
                        for index, problem in zip(members, problems)]
            for index, problem in zip(members, problems):
                messages[index] = problem
            valid = np.array([not problem for problem in problems])
            if valid.any():
                out.append((bucket, members[valid], stats.take(np.flatnonzero(valid)).astype(dtype)))
        return out, messages

    def magnitude_squares(self, beta: np.ndarray) -> np.ndarray:
        """(D,) each dataset's weighted squares of :func:`hierpool.algebra.checks.fit_magnitudes` at its ``beta``
        (D, p), for :func:`hierpool.batch.near_exact.vanishing_residuals` (NaN where a dataset has no fit)."""
        design = self.design
        with np.errstate(over="ignore", invalid="ignore"):
            size = fit_magnitudes(design.y, design.X, np.asarray(beta, dtype=float)[self.dataset])
            return np.bincount(self.dataset, weights=design.row_weights * size * size, minlength=self.n_datasets)

    def left_by_x_squares(self, shifts: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """(D,) r_X'W r_X: each dataset's weighted squares of its residual from X's least-squares fit (``shifts``:
        :meth:`location_shifts`, where the caller has them), for
        :func:`hierpool.batch.near_exact.vanishing_residuals`."""
        residual = (self.location_shifts() if shifts is None else shifts)[1]
        with np.errstate(over="ignore", invalid="ignore"):
            return np.bincount(self.dataset, weights=self.design.row_weights * residual * residual,
                               minlength=self.n_datasets)

    def location_shifts(self) -> tuple[np.ndarray, np.ndarray]:
        """(beta0 (D, p), residual (N,)): each dataset's (weighted) least-squares fit of y - offset on X and its
        residuals (:func:`hierpool.algebra.statistics.location_shifts`), computed once by the several-term paths for
        the start (:meth:`term_moments`) and the systems' y column (:meth:`term_systems`)."""
        design = self.design
        return location_shifts(self.dataset, design.X, design.y_less_offset, design.row_weights, self.n_datasets)

    def term_systems(self, datasets, shifts: tuple[np.ndarray, np.ndarray] | None = None,
                     merged: bool = False) -> list:
        """``datasets`` bucketed by padded level counts (:func:`padded_widths`): per bucket ``(members, systems, n)``,
        the members' systems built at once (:func:`hierpool.algebra.batched_systems.batched_systems`) and their row
        counts.  ``hp.fit_batch``'s and ``hp.bayes_batch``'s several-term paths.  ``shifts``: every dataset's
        :meth:`location_shifts`, where the caller has them.  ``merged``: the terms, on one grouping factor, as one
        (:func:`merge_terms`; :func:`hierpool.algebra.search.terms.search_on_host`'s ``term_ks``)."""
        design, widths = self.design, padded_widths(self)
        buckets = {}
        for d in datasets:
            buckets.setdefault(tuple(widths[d]), []).append(d)
        weights = design.weights
        out = []
        for key, members in buckets.items():
            members = np.asarray(members)
            if np.array_equal(members, np.arange(self.n_datasets)):  # one bucket of every dataset: no row mask, copies
                rows, local = slice(None), self.dataset
            else:
                rows = np.isin(self.dataset, members)
                local = np.searchsorted(members, self.dataset[rows])
            terms = [(level[rows], term.z[rows], int(width))
                     for (level, _, _), term, width in zip(self.term_levels, design.terms, key)]
            if merged:
                terms = merge_terms(terms)
            systems, n = batched_systems(local, len(members), terms, design.X[rows], design.y[rows],
                                         None if weights is None else weights[rows], design.offset[rows],
                                         design.sigma_known,
                                         shifts=None if shifts is None else (shifts[0][members], shifts[1][rows]))
            out.append((members, systems, n))
        return out

    def known_sds_sizes(self, residual: np.ndarray) -> np.ndarray:
        """(datasets,) with known residual sds, the size of each dataset's start in their units
        (:func:`hierpool.algebra.start.known_sds_size`) from its rows' least-squares residuals ``residual`` (N,)
        (:meth:`location_shifts`')."""
        w = self.design.row_weights
        sums = [segment_sum(values, self.dataset, self.n_datasets) for values in (w * residual**2, w, w * w)]
        return known_sds_size(*sums, self.n_obs, self.design.p, self.weights_units())

    def weights_units(self) -> np.ndarray:
        """(datasets,) theta's unit of each dataset's prior weights (or known sds'),
        :func:`hierpool.algebra.linalg.weights_unit`; 1 without weights."""
        if self.design.weights is None:
            return np.ones(self.n_datasets)
        return weights_unit(self.design.weights, self.dataset, self.n_datasets)

    def term_moments(self, weights: np.ndarray, residual: np.ndarray, datasets, units=None) -> np.ndarray:
        """(D, n_theta) the starting theta of datasets ``datasets`` (the others: lme4's identity): the method of
        moments (:func:`hierpool.algebra.start.moment_theta`) of every term on the rows' residuals from a fit of the
        fixed effects alone, weighted by ``weights`` (N,), each term's own moments on the same residuals (the other
        terms' variation left in them: a start only).  A dataset moments cannot start (fewer than k + 1 usable
        levels) starts at the identity too.  The linear models' several-term start
        (:func:`hierpool.batch.fit_terms.linear_start`) and a GLMM's (its GLM's working residuals and weights).  The
        arrays are padded to the largest level count of ``datasets`` alone (a dataset refused for its size would set
        it).  ``units`` (datasets,): each dataset's columns are z times its unit (a linear model's prior weights',
        :mod:`hierpool.batch.conditioning`), and the floor's scale is their root-mean-square over it, so that weights
        times c move the start by 1 / sqrt(c), as the optimum (from the columns' own, the start over the unit moved
        with the weights from 1e-4 to 1e3, and a fit ended 0.064 above ``hp.lmm``'s at two scales: the fifty-fifth
        session's review)."""
        design = self.design
        datasets = np.unique(np.asarray(datasets, dtype=np.int64))  # sorted: rows are located by searchsorted
        start = np.tile(theta_start(tuple(t.k for t in design.terms)), (self.n_datasets, 1))
        if not datasets.size:
            return start
        rows = np.flatnonzero(np.isin(self.dataset, datasets))
        local, count = np.searchsorted(datasets, self.dataset[rows]), len(datasets)
        w, r = weights[rows], residual[rows]
        rss = np.bincount(local, weights=w * r**2, minlength=count)
        thetas = []
        with np.errstate(all="ignore"):  # a dataset moments cannot start gets the identity (moment_theta)
            for term, (level, n_levels, _) in zip(design.terms, self.term_levels):
                ell, k, z = int(n_levels[datasets].max()), term.k, term.z[rows]
                cell = local * ell + level[rows]
                ztz = grouped_products(cell, z, z, w, count * ell).reshape(count, ell, k, k)
                cross = grouped_products(cell, z, r[:, None], w, count * ell).reshape(count, ell, k)
                # the floor's scale: the columns' own root-mean-squares (a GLMM's working weights left out)
                rms = np.sqrt(grouped_products(local, z, z, np.ones(len(rows)), count)[:, np.arange(k), np.arange(k)]
                              / np.maximum(self.n_obs[datasets], 1)[:, None])
                if units is not None:
                    rms = rms / units[datasets][:, None]
                thetas.append(moment_theta(ztz, cross, rss, self.n_obs[datasets].astype(float), p=design.p,
                                           floor=MOMENT_FLOOR, rms=rms))
        start[datasets] = np.concatenate(thetas, axis=1)
        return start

    def dataset_rows(self) -> list[np.ndarray]:
        """Each dataset's design rows (positions, in order)."""
        return rows_by_code(self.dataset, self.n_datasets)

    @cached_property
    def _frame_rows(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """(label -> its code, the frame's rows sorted by code, where each code's rows start), found once: a
        dataset's rows are then a slice (a batch of 100,000 datasets refits a dozen: every dataset's rows are not
        split out for them)."""
        codes, labels = pd.factorize(self.frame[self.by], sort=False)  # a row without a label (-1): in no dataset
        labelled = np.flatnonzero(codes >= 0)
        order, starts = code_order(codes[labelled], len(labels))
        return {label: code for code, label in enumerate(labels)}, labelled[order], starts

    def dataset_frame(self, index: int) -> tuple[pd.DataFrame, dict]:
        """(rows, weights/offset/se keyword arguments) to fit dataset ``index`` alone, as the user would.

        All of the dataset's rows, those ``build_design`` dropped for missing values
        included (a fit of the dataset drops them again); array arguments are cut to them.
        """
        rows = self.frame_rows(index)
        return self.frame.iloc[rows], dataset_arguments(rows, self.weights, self.offset, self.se)

    def frame_rows(self, index: int) -> np.ndarray:
        """Dataset ``index``'s positions in :attr:`frame`, those dropped for missing values included (none: an
        empty dataset)."""
        code_of, order, starts = self._frame_rows
        code = code_of.get(self.labels[index])
        return np.zeros(0, np.int64) if code is None else order[starts[code]:starts[code + 1]]


def free_name(name: str, columns) -> str:
    """``name``, with '_' added until no column of ``columns`` has it (a column made for a batch beside the user's)."""
    while name in columns:
        name += "_"
    return name


def rows_by_code(codes: np.ndarray, n: int) -> list[np.ndarray]:
    """Each of ``n`` codes' positions in ``codes`` (in order), found with one sort, not a scan per code."""
    order, starts = code_order(codes, n)
    return np.split(order, starts[1:-1])


def code_order(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the positions of ``codes`` sorted by code, stably; where each of the ``n`` codes' positions start, n + 1 of
    them): code c's positions are ``order[starts[c]:starts[c + 1]]``, in order."""
    order = np.argsort(codes, kind="stable")
    return order, np.searchsorted(codes[order], np.arange(n + 1))


def dataset_arguments(rows: np.ndarray, weights, offset, se: str | None = None) -> dict:
    """The weights/offset/se keyword arguments of one dataset's single fit (its frame's ``rows`` of the long frame):
    a column name as given, an array argument cut to the rows."""
    kwargs = {}
    for name, value in (("weights", weights), ("offset", offset)):
        if value is not None:
            kwargs[name] = value if isinstance(value, str) else value[rows]
    if se is not None:
        kwargs["se"] = se
    return kwargs


def check_labelled(labels: pd.Series, by: str) -> None:
    """Refuse rows of the ``by`` column (``labels``) that name no dataset."""
    if labels.isna().any():
        raise DataError(f"column {by!r} has missing values: every row must name its dataset")


def dataset_labels_of(data, by: str) -> pd.Index:
    """Every dataset's label, in order: a list's positions or a dict's keys, or (``data`` one DataFrame) the ``by``
    column's values in order of first appearance over all its rows.

    Not the labels of the rows a design keeps: a dataset with none left (an empty frame, a column it lacks, a
    response all missing, one refused) then vanished from the result, and the datasets after it moved up a row.
    """
    if isinstance(data, pd.DataFrame):
        return pd.Index(pd.unique(data[by].dropna()), name=by)  # a missing label is refused where its row is kept
    return pd.Index(list(data.keys()) if isinstance(data, dict) else list(range(len(data))), name=by,
                    tupleize_cols=False)


def label_codes(labels: pd.Index, values: pd.Series, by: str) -> np.ndarray:
    """Each row's dataset code: the position of its ``by`` value (``values``) among ``labels``
    (:func:`dataset_labels_of`)."""
    check_labelled(values, by)
    return labels.get_indexer(values).astype(np.int64)


def missing_counts(frame: pd.DataFrame, rows: np.ndarray, columns, arrays: dict) -> str:
    """"column: count" of the missing values among ``rows`` of ``frame``'s ``columns`` (those it has) and of the
    ``arrays`` (name -> values aligned with the frame), as ``build_design``'s warning counts them; "" where none."""
    used = frame.iloc[rows][[column for column in columns if column in frame.columns]]
    cut = {name: np.asarray(values, dtype=float)[rows] for name, values in arrays.items()}
    return missing_detail(used.assign(**cut))


#: The reason of a dataset passed as an empty frame.
EMPTY_DATASET = "the dataset is empty: it has no rows"


def absent_reason(item: pd.DataFrame, columns) -> str:
    """Why a dataset (its own frame ``item``) that lacks a column of ``columns`` the model uses is refused; ""."""
    absent = [column for column in columns if column not in item.columns]
    if not absent:
        return ""
    listed = ", ".join(repr(column) for column in absent)
    return f"the model uses column {listed}, which is not in this dataset (its columns: {list(item.columns)})"


def empty_reason(item, rows: np.ndarray, frame: pd.DataFrame, columns, arrays: dict) -> str:
    """Why a dataset has no rows left to fit: its own frame ``item`` (None for a dataset of one DataFrame) is empty
    or lacks a column the model uses; else the missing values that dropped its ``rows`` of the long ``frame``."""
    if item is not None and len(item) == 0:
        return EMPTY_DATASET
    absent = absent_reason(item, columns) if item is not None else ""
    if absent:
        return absent
    detail = missing_counts(frame, rows, columns, arrays)
    if detail:
        return f"no rows left after dropping missing values ({detail})"
    return f"none of its {len(rows)} rows is left to fit"  # e.g. binomial rows with no trials, dropped


def single_fit_refusal(formula: str, frame: pd.DataFrame, **arguments) -> str:
    """What the single fit (``hp.lmm``, ``hp.glmm``) refuses in one dataset's rows ``frame`` ("" when nothing): the
    message of the :class:`~hierpool.errors.HierpoolError` its design (:func:`build_design`) raises there."""
    return design_refusal(lambda rows, extra: build_design(formula, rows, **arguments, **extra), frame, {})


def constant_within(values: np.ndarray, dataset: np.ndarray, n_datasets: int) -> np.ndarray:
    """(D,) whether each dataset's ``values`` (one per row, ``dataset`` its code) are one value (False with none)."""
    low, high = segment_extremes(values, dataset, n_datasets)
    return low == high


def plan_refusals(plan: BatchPlan, data, formula: str, family, set_aside: dict | None = None) -> tuple[str, ...]:
    """Per dataset, why its single fit would refuse its data though the long frame's design accepts them ("" where
    it would not): no rows left (:func:`empty_reason`), a response of one value, which ``hp.lmm`` and
    ``hp.glmm`` refuse (:func:`single_fit_refusal` gives their words; a fit of it reported a criterion of -9,000
    and a residual sd of 1e-32 as converged), or a response or model column too small to square in this dataset
    (the long frame's check sees every dataset's largest values together); or set aside from the long frame
    (``set_aside``: label -> why, :func:`long_frame`)."""
    design = plan.design
    columns = list(design.columns) + [c for c in (design.weights_column, design.offset_column, plan.se)
                                      if c is not None and c not in design.columns]
    arrays = {name: value for name, value in (("weights", plan.weights), ("offset", plan.offset))
              if value is not None and not isinstance(value, str)}
    items = None if isinstance(data, pd.DataFrame) else data
    refusals = [""] * plan.n_datasets
    set_aside = set_aside or {}
    for index in np.flatnonzero(plan.n_obs == 0):
        label = plan.labels[index]
        if label in set_aside:
            refusals[index] = set_aside[label]
            continue
        item = None if items is None else items[label]
        refusals[index] = empty_reason(item, plan.frame_rows(index), plan.frame, columns, arrays)
    # a response of one value, or a response or model column of one dataset too small to square (the long frame's
    # largest values pass its check): the single fit's refusal, in the dataset's row
    # (each distinct column once: sleepstudy's z is its X)
    columns_of = [design.y] + [block[:, j] for block in [design.X] + [t.z for t in design.terms]
                               for j in range(block.shape[1])]
    first, _ = equal_sets(columns_of)
    tiny = np.zeros(plan.n_datasets, dtype=bool)
    for j in first:
        values, smallest = columns_of[j], RESPONSE_SMALLEST if j == 0 else SMALLEST_VALUE
        magnitude = np.abs(values)
        if not np.any(underflowing(magnitude, smallest)):  # (one pass: no dataset can have one)
            continue
        largest = np.zeros(plan.n_datasets)
        np.maximum.at(largest, plan.dataset, magnitude)
        tiny |= underflowing(largest, smallest)
    constant = constant_within(design.y, plan.dataset, plan.n_datasets)
    if design.family is None and np.any(design.offset):  # (a linear model's response less its offset too)
        constant |= constant_within(design.y_less_offset, plan.dataset, plan.n_datasets)
    if design.family is None and design.weights is not None and not design.sigma_known:
        # (and its weights' scale: check_weights_scale's rule, per dataset)
        decades = weights_decades(design.weights, plan.dataset, plan.n_datasets)
        constant |= (plan.n_obs > 0) & weights_beyond_scale(decades)
    if design.family is None and design.weights is not None:  # (their spread: weights_spread_problem's, per dataset)
        low, high = segment_extremes(design.weights, plan.dataset, plan.n_datasets)
        constant |= (plan.n_obs > 0) & ~within_weights_spread(low, high)
    for index in np.flatnonzero(constant | tiny):
        frame, arguments = plan.dataset_frame(index)
        refusals[index] = single_fit_refusal(formula, frame, family=family, **arguments)
    return tuple(refusals)


def chunks(bucket: int, usable: np.ndarray, size: int, n_devices: int) -> list[Chunk]:
    """Split a bucket's usable datasets into chunks of ``size`` (rounded up to the device count)."""
    size = math.ceil(size / n_devices) * n_devices
    out = []
    for start in range(0, len(usable), size):
        chosen = np.arange(start, min(start + size, len(usable)))
        padded = np.concatenate([chosen, np.full(size - len(chosen), chosen[0])])
        out.append(Chunk(members=usable[chosen], index=padded, bucket=bucket))
    return out


def row_argument(value, name: str, data, frame: pd.DataFrame):
    """``weights=`` / ``offset=`` as build_design takes it: a column name, or a float array with one value per row."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(data, pd.DataFrame):
        raise ArgumentError(f"{name} given as an array needs data as one DataFrame (one value per row); with a list "
                            f"or dict of datasets give {name} as the name of a column of every dataset")
    values = numeric_row_values(aligned_by_labels(value, data, name), name)
    if values.ndim != 1 or values.shape[0] != len(frame):
        raise ArgumentError(f"{name} must be a column name or an array with one value per row of data "
                            f"({len(frame)}), got shape {values.shape}")
    return values


def _local_levels(dataset: np.ndarray, n_datasets: int, term: RandomEffectTerm):
    """(level of each row within its dataset, levels per dataset, each dataset's level labels) of one term.

    A dataset's levels are the global level order restricted to it: hp.lmm's order on that dataset.
    """
    cell, cell_of_row = unique_codes(dataset.astype(np.int64) * term.n_levels + term.index,
                                     n_datasets * term.n_levels)
    cell_dataset = cell // term.n_levels
    first_cell = np.searchsorted(cell_dataset, np.arange(n_datasets))
    return (cell_of_row.reshape(-1) - first_cell[dataset], np.bincount(cell_dataset, minlength=n_datasets),
            Pieces(np.asarray(term.levels)[cell % term.n_levels], np.append(first_cell, len(cell))))


#: :func:`refused_datasets` gives up (the first dataset's error is then raised) when this many datasets in a row,
#: from the first, are each refused: a mistake common to every dataset is one error, not a row each.
REFUSED_IN_A_ROW = 20


def design_refusal(build, frame: pd.DataFrame, arguments: dict) -> str:
    """The message of the :class:`~hierpool.errors.HierpoolError` ``build(frame, arguments)`` (a single fit's design
    of those rows) raises ("" where it raises none), its warnings silenced (the long frame's design gave them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HierpoolWarning)
            build(frame, arguments)
    except HierpoolError as exc:
        return str(exc)
    return ""


def refused_datasets(build, frame: pd.DataFrame, by: str, weights, offset, row_labels=None) -> dict:
    """label -> its single fit's refusal, for the datasets of the long ``frame`` whose own rows the single fit's
    design (``build(frame, arguments)``: :func:`design_refusal`) refuses, where the long frame's design raised: one
    dataset's negative or infinite count refused the whole batch, naming the value but not the dataset.  Empty
    where none is (the long frame's error is then raised); where every dataset is (or the first
    :data:`REFUSED_IN_A_ROW` are), the first one's reason is raised (:func:`every_refused`).

    The datasets are halved while a half's rows raise (one design per half): a dataset in 100,000 is found in ~34
    designs, not 100,000 (benchmarks/RESULTS.md, thirtieth session).  ``row_labels`` (label -> the dataset's rows'
    labels in the user's data, :func:`user_row_labels`) relabels a dataset's own rows, so that its reason names
    rows as its single fit's does (the long frame's positions are no row of the user's)."""
    groups = frame.groupby(by, sort=False).indices
    labels = list(groups)
    if not labels:  # no rows at all: the long frame's own error
        return {}

    def refusal(members) -> str:
        rows = np.concatenate([groups[label] for label in members])
        rows_frame = frame.iloc[rows]
        own = row_labels(members[0]) if row_labels is not None and len(members) == 1 else None
        if own is not None and len(own) == len(rows):
            rows_frame = rows_frame.set_axis(own, axis=0)
        return design_refusal(build, rows_frame, dataset_arguments(rows, weights, offset))

    first = labels[:REFUSED_IN_A_ROW]
    if len(first) == REFUSED_IN_A_ROW and all(refusal([label]) for label in first):
        every_refused(labels[0], refusal([labels[0]]), len(first))  # a mistake common to every dataset: one error
    refused = {}
    half = len(labels) // 2  # the whole frame's design raised already: its halves first (one label: its reason)
    pending = [labels[half:], labels[:half]] if half else [labels]
    while pending:
        members = pending.pop()
        reason = refusal(members)
        if not reason:
            continue
        if len(members) == 1:
            refused[members[0]] = reason
        else:
            pending += [members[len(members) // 2:], members[: len(members) // 2]]
    if len(refused) == len(labels):
        every_refused(labels[0], refused[labels[0]])
    return refused


class EveryDatasetRefused(DataError):
    """A batch whose datasets are each refused (``tried``: how many were, from the first; None: all of them),
    worded as the first one's single fit words it; ``stacked``: the long frame's error (:func:`build_or_refuse`
    sets it), which :func:`stacked_design`'s vote on the columns' kinds reads."""

    def __init__(self, label, reason: str, tried: int | None = None):
        others = "as is every dataset" if tried is None else f"as are the {tried - 1} datasets after it"
        super().__init__(f"{nothing_left({label: reason})} ({others})")
        self.reason = reason  # the first dataset's, as its single fit words it
        self.stacked: DataError | None = None


def every_refused(label, reason: str, tried: int | None = None):
    """Raise :class:`EveryDatasetRefused` with the first refused dataset's own reason, which its single fit gives
    (the long frame's error counted every dataset's rows and levels together: "70 levels for 70 observations" of
    two datasets of 30 and 40)."""
    raise EveryDatasetRefused(label, reason, tried) from None


def user_row_labels(data, by: str):
    """label -> the labels of that dataset's rows in the user's ``data`` (a dict or list: its frame's index; one
    DataFrame: the index of its rows with that ``by`` value, in order, as the long frame holds them), or None."""
    def labels(label):
        if isinstance(data, pd.DataFrame):
            return data.index[(data[by] == label).to_numpy()]
        try:
            return data[label].index
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return labels


def build_or_refuse(build, frame: pd.DataFrame, by: str, weights, offset, row_labels=None):
    """(``build(frame, arguments)``, the frame, weights and offset it was built on, the datasets refused: label ->
    why).  Where the long frame's design raises a :class:`~hierpool.errors.DataError`, the datasets whose own
    rows raise (:func:`refused_datasets`) are left out and the rest built; the error is raised as it is where
    none or every one does."""
    arguments = {"weights": weights, "offset": offset}
    try:
        return build(frame, arguments), frame, weights, offset, {}
    except DataError as error:
        try:
            refused = refused_datasets(build, frame, by, weights, offset, row_labels)
        except EveryDatasetRefused as every:
            every.stacked = error
            raise
        if not refused:
            raise
    kept = ~frame[by].isin(list(refused)).to_numpy()
    weights, offset = (value[kept] if value is not None and not isinstance(value, str) else value
                       for value in (weights, offset))
    frame = frame[kept].set_axis(pd.RangeIndex(int(kept.sum())), axis=0)
    return build(frame, {"weights": weights, "offset": offset}), frame, weights, offset, refused


def stacked_design(data, by: str, columns, build, weights, offset, kept: dict | None = None, logical=None):
    """(``build(frame, arguments)`` on the datasets stacked, the long frame, weights and offset it was built on, the
    datasets set aside: label -> why): :func:`long_frame` (``columns`` the values whose kinds must agree, ``kept``
    its kinds kept), then :func:`build_or_refuse`.

    Where most datasets hold in a column a kind other than numbers that the single fit cannot read there (text in
    a Gaussian response, weights or counts), the kept datasets' design raises naming that column: the datasets
    outvoted on it are then stacked and built alone (the other columns' kinds kept as voted), and the others
    refused with that error, which is each one's single fit's (a dataset of numbers among text responses refused
    the whole batch before).  Any other error is raised as it is: the vote is overturned only where the kind kept
    is the error."""
    frame, set_aside, vote = long_frame(data, by, columns, kept, logical)
    weights, offset = row_argument(weights, "weights", data, frame), row_argument(offset, "offset", data, frame)
    frame = frame.set_axis(pd.RangeIndex(len(frame)), axis=0)  # positions as labels: the user's frame untouched
    try:
        built, frame, weights, offset, refused = build_or_refuse(build, frame, by, weights, offset,
                                                                 user_row_labels(data, by))
    except DataError as error:
        # (numbers are readable wherever the formula reads values: only another kind kept can be the error)
        # (a batch whose every dataset is refused: the long frame's error names the column, and is each kept
        # dataset's reason, where the first dataset's own may name another: its rows missing, say)
        stacked = str(error.stacked if isinstance(error, EveryDatasetRefused) and error.stacked else error)
        unreadable = [name for name, usual in vote.usual.items() if usual != "numbers" and repr(name) in stacked]
        if not unreadable:
            raise
        name = unreadable[0]
        retry = vote.outvoted[name]  # in the data's order
        kinds = {**(kept or {}), **{column: usual for column, usual in vote.usual.items() if column != name}}
        try:  # (weights and offset are column names here: arrays need one DataFrame, which has no kinds to vote)
            built, retried, weights, offset, rest = stacked_design({label: data[label] for label in retry}, by,
                                                                   columns, build, weights, offset, kinds, logical)
        except DataError:
            raise error from None
        refused = {label: stacked for label in pd.unique(frame[by])}  # the kept datasets with rows
        others = {label: reason for label, reason in set_aside.items() if label not in retry}
        return built, retried, weights, offset, {**refused, **others, **rest}
    return built, frame, weights, offset, {**set_aside, **refused}


def value_columns(formula: str, family, weights, offset, se, by: str | None = None,
                  caller: str = "fit_batch") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The columns a batch reads as values, whose kind must agree across datasets (:func:`kind_conflicts`): the
    formula's (:attr:`~hierpool.spec.formula.ModelSpec.values`) and the weights, offset and se columns named; and of
    those, the ones read outside the response alone (:func:`~hierpool.spec.formula.response_only_names`), where one
    dataset's true/false values among the others' numbers are refused (a response's True/False are its 1/0 in
    either).

    Raises an :class:`~hierpool.errors.ArgumentError` where ``by`` is a column the model reads (the formula's, or
    the weights', offset's or se's): within each dataset it would be one value (a fixed effect aliased with the
    intercept, a grouping factor of one level), and its table's column would be named twice."""
    spec = parse_formula(formula, binomial_counts=family is not None and family.name == "binomial",
                         random_optional=True)
    named = [c for c in (weights, offset, se) if isinstance(c, str)]
    if isinstance(by, str) and by in set(spec.variables) | set(named):
        raise ArgumentError(f"{caller}: by={by!r} is a column the model reads ({formula!r}): within each dataset it "
                            "would be one value; name the datasets by a column of their own")
    values = tuple(dict.fromkeys(spec.values + tuple(named)))
    response = response_only_names(spec)
    return values, tuple(name for name in values if name not in response)


def _several_datasets(data, by: str) -> bool:
    """Whether ``data`` holds more than one dataset (a list's or dict's items, one frame's ``by`` values); a frame
    whose ``by`` column cannot be read counts as several (the long frame then refuses it by name)."""
    if isinstance(data, pd.DataFrame):
        try:  # (a column held twice, MultiIndex columns: the long frame refuses them by name)
            column = data[by]
            return not isinstance(column, pd.Series) or column.nunique(dropna=True) > 1
        except (KeyError, TypeError, ValueError):
            return True
    return not hasattr(data, "__len__") or len(data) > 1


def plan_batch(formula: str, data, by: str, caller: str, single: str, weights=None, offset=None,
               se: str | None = None, one_term: bool = True, family=None) -> BatchPlan:
    """Parse ``formula`` on the long frame and locate every dataset's rows and levels.

    ``weights`` and ``offset`` are column names, or (with ``data`` one DataFrame)
    arrays with one value per row of it; ``se`` names the column of known residual sds
    (their weights 1 / se^2 enter the statistics as prior weights do, and sigma is 1).  ``family``: a
    GLMM's :class:`~hierpool.spec.family.FamilySpec` (the design's response and trials as ``hp.glmm`` reads them).
    Every dataset of ``data`` is in the plan, one with no rows left too; what the single fit would refuse in a
    dataset's data is in :attr:`BatchPlan.refusals`, for the batch to report in its row.

    Raises
    ------
    ArgumentError
        With ``one_term``, for a formula with other than one random-effect term (naming ``caller``
        and the one-dataset function ``single`` to loop over instead), for weights
        combined with known sds, for ``se`` not a column name, or for a weights or offset
        array of the wrong length.
    DataError
        For a missing ``by``, weights, offset or se column, missing dataset labels,
        or weights or sds that are not positive.
    """
    # (a formula with spatial terms, or a relationship matrix, is fitted dataset by dataset: fit_each, not here)
    if se is not None and not isinstance(se, str):
        raise ArgumentError(f"se must be the name of the column of known residual sds, got {type(se).__name__}")
    # one dataset's data the single fit refuses (a negative count) is refused in its row, not the batch
    def build(rows, arguments, own_calls=()):
        return build_design(formula, rows, se=se, family=family, datasets=by, own_calls=own_calls, **arguments)

    # scale(x), poly(x, 2), a user's demean(x): each dataset's own values, as its single fit computes them (their
    # columns on the long frame, which pool the datasets, are not checked there: batch.dataset_transforms)
    # (one dataset, a shared design's: the long frame is its rows, checked as its single fit checks them)
    calls = tuple(sorted(set(stateful_calls(formula)) | set(unvouched_calls(formula)))) \
        if _several_datasets(data, by) else ()
    columns, terms = value_columns(formula, family, weights, offset, se, by, caller)
    design, frame, weights, offset, set_aside = stacked_design(data, by, columns, partial(build, own_calls=calls),
                                                               weights, offset, logical=terms)
    dataset_labels = dataset_labels_of(data, by)  # every dataset's, one refused too
    # the long frame's model frame would be held for the whole batch run: the plan keeps the frame itself
    design = replace(design, frame=None)
    if one_term and len(design.terms) != 1:
        terms = [f"({' + '.join(t.coef_names)} | {t.group})" for t in design.terms]
        raise ArgumentError(f"{caller} fits models with one random-effect term; this formula has {len(terms)}: "
                            f"{', '.join(terms)}.  Fit it per dataset with {single}.")
    dataset = label_codes(dataset_labels, frame.loc[design.rows, by], by)
    n_datasets = len(dataset_labels)
    design, own_refusals = own_values(design, frame, by, rows_by_code(dataset, n_datasets), dataset_labels, build,
                                      lambda rows: dataset_arguments(rows, weights, offset), calls,
                                      user_row_labels(data, by))
    local = tuple(_local_levels(dataset, n_datasets, term) for term in design.terms)
    level, n_levels, levels = local[0]
    plan = BatchPlan(
        frame=frame,
        design=design,
        by=by,
        dataset=dataset,
        labels=dataset_labels,
        level=level,
        n_levels=n_levels,
        n_obs=np.bincount(dataset, minlength=n_datasets),
        levels=levels,
        term_levels=local,
        weights=weights,
        offset=offset,
        se=se,
    )
    refusals = plan_refusals(plan, data, formula, family, set_aside)
    # (its own design's refusal first: a single fit builds its design before it fits)
    return replace(plan, refusals=tuple(own_refusals.get(index) or refusal for index, refusal in enumerate(refusals)),
                   design_refused=frozenset(own_refusals),
                   own_columns=frozenset(name for name in design.fixed_names if made_by(name, calls)))

