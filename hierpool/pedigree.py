"""Pedigrees: the numerator relationship matrix A, inbreeding coefficients, and A's sparse inverse.

A pedigree lists each animal with its sire and dam (unknown: missing, 0, or "", "NA", "." ...: UNKNOWN_CODES;
ids and parents labelled as R's factor labels them, :mod:`hierpool.spec.labels`); A_ij is twice the
coefficient of coancestry of i and j, so that Cov(a_i, a_j) = A_ij sigma_A^2 for additive genetic
(breeding) values.  A parent listed only as a parent is added as a founder (both parents unknown).

* :func:`relationship_matrix`: A itself, dense and labelled, by the tabular method (Emik & Terrill 1949;
  Henderson 1976): A_ii = 1 + A_sd / 2, A_ij = (A_js + A_jd) / 2 for j older than i.  O(n^2) memory: for
  pedigrees of up to some thousands of animals (and for checking the others).
* :func:`inbreeding`: F_i = A_ii - 1 without forming A.  Generation by generation, F_i = A_sd / 2 with A's
  columns for the generation's sires (or dams) by two sparse triangular solves with T = L^-1 = I - P / 2
  (Colleau 2002's indirect method; timings in benchmarks/RESULTS.md).  Where a pedigree's
  generations have very many distinct parents (:data:`GENERATION_MAX_COLUMNS`), by Meuwissen & Luo (1992):
  A = L D L^T with L_ij = (L_sj + L_dj) / 2 (the expected share of j's Mendelian sampling in i) and D_i the
  variance of i's Mendelian sampling, 1/2 - (F_s + F_d) / 4 with both parents known (3/4 - F_p / 4 with one,
  1 with none);
  each animal's row of L is traced through its ancestors only.
* :func:`inverse_relationship_matrix`: A^-1 = (L^-1)^T D^-1 L^-1, sparse, by Henderson's (1976) rules with
  inbreeding (Quaas 1976): animal i adds 1 / D_i to (i, i), -1 / (2 D_i) to (i, p) and (p, i) for each known
  parent p, and 1 / (4 D_i) to (p, q) for each pair of known parents.  O(n) non-zeros: the form a
  mixed model's equations take (as MCMCglmm's ``ginverse``).

Checks (each a :class:`hierpool.DataError` naming the animals): a duplicated animal, an animal that is its
own ancestor (a loop), a missing column.  Animals are sorted so that parents come before offspring.

Used by :func:`hierpool.lmm`'s ``relmat=`` / ``relmat_inverse=`` (:mod:`hierpool.closedform.relmat`: Henderson's
mixed-model equations with A^-1, factored by SuperLU).

References: Colleau, J.-J. (2002), Genet. Sel. Evol. 34, 409-421; Henderson, C. R. (1976), Biometrics 32, 69-83;
Quaas, R. L. (1976), Biometrics 32, 949-953; Meuwissen, T. H. E. & Luo, Z. (1992), Genet. Sel. Evol. 24,
305-313; Mrode, R. A. (2014), "Linear Models for the Prediction of Animal Breeding Values", ch. 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import ArgumentError, DataError
from .spec.labels import level_label


@dataclass(frozen=True)
class Pedigree:
    """A checked pedigree, parents before offspring.

    Attributes
    ----------
    ids : numpy.ndarray
        The animals' labels (object), founders added.
    sire, dam : numpy.ndarray
        Each animal's parents as positions in ``ids`` (-1: unknown); a parent's position is below its
        offspring's.
    """

    ids: np.ndarray
    sire: np.ndarray
    dam: np.ndarray

    @property
    def n(self) -> int:
        return len(self.ids)


#: A parent's entry that codes "unknown" (beside missing values and 0): R's and SAS's spellings, and what
#: ``astype(str)`` makes of a missing value.
UNKNOWN_CODES = ("", "0", "0.0", "NA", "N/A", "na", "nan", "NaN", "<NA>", "None", "NULL", "null", ".", "-")


def _unknown(value) -> bool:
    """Whether a sire's or dam's entry says "unknown": missing (None, NaN, pandas' NA), 0, or a text of
    :data:`UNKNOWN_CODES` (pandas' NA was labelled "<NA>", one made-up founder that every animal without parents
    shared: founders related by 1, h^2 0.555 for 0.384)."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return True
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str) and value.strip() in UNKNOWN_CODES


def _whole_number_text(text: str) -> str | None:
    """"100" for the text "100.0" (a whole number written as a float), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return level_label(value) if "." in text and np.isfinite(value) and value.is_integer() else None


def prepare(pedigree: pd.DataFrame, id: str = "id", sire: str = "sire", dam: str = "dam") -> Pedigree:
    """Check and sort a pedigree (see the module docstring).

    Parameters
    ----------
    pedigree : pandas.DataFrame
        One row per animal; not modified.
    id, sire, dam : str
        Its columns.

    Returns
    -------
    Pedigree
    """
    if isinstance(pedigree, Pedigree):
        return pedigree
    if not isinstance(pedigree, pd.DataFrame):
        raise ArgumentError(f"a pedigree must be a pandas DataFrame with id, sire and dam columns, got "
                            f"{type(pedigree).__name__}")
    missing = [c for c in (id, sire, dam) if c not in pedigree.columns]
    if missing:
        raise DataError(f"the pedigree has no column {', '.join(map(repr, missing))} (columns: "
                        f"{list(pedigree.columns)})")
    labels = [level_label(v) for v in pedigree[id]]
    if any(_unknown(v) for v in pedigree[id]):
        raise DataError(f"the pedigree's {id!r} column has a missing or zero animal label")
    duplicated = pd.Index(labels)[pd.Index(labels).duplicated()].unique()
    if len(duplicated):
        raise DataError(f"the pedigree lists animal(s) {', '.join(map(repr, list(duplicated)[:5]))} more than once")
    parents = {animal: tuple(None if _unknown(p) else level_label(p) for p in (s, d))
               for animal, s, d in zip(labels, pedigree[sire], pedigree[dam])}
    for animal, (s, d) in parents.items():
        if animal in (s, d):
            raise DataError(f"animal {animal!r} is listed as its own parent")
    founders = [p for pair in parents.values() for p in pair if p is not None and p not in parents]
    # ids as "100.0" (text) and parents as 100 (floats: "100"), or the other way round: none would be found
    ids_as_numbers = {_whole_number_text(a): a for a in parents if _whole_number_text(a) is not None}
    written_otherwise = {p: _whole_number_text(p) for p in dict.fromkeys(founders)}
    written_otherwise = {p: a for p, a in written_otherwise.items() if a in parents}
    written_otherwise |= {p: ids_as_numbers[p] for p in dict.fromkeys(founders) if p in ids_as_numbers}
    if written_otherwise:  # parents as "100.0" (a float column turned to text), ids as 100: none would be found
        shown = ", ".join(f"{p!r} ({a!r})" for p, a in list(written_otherwise.items())[:5])
        raise DataError(f"the pedigree's {sire!r}/{dam!r} columns write {len(written_otherwise)} parent(s) otherwise "
                        f"than its {id!r} column writes the animals: {shown}; each would be a made-up founder.  "
                        "Give the parents as the ids are given")
    for founder in dict.fromkeys(founders):
        parents[founder] = (None, None)
    order = _parents_first(parents)
    position = {animal: i for i, animal in enumerate(order)}
    sires = np.array([-1 if parents[a][0] is None else position[parents[a][0]] for a in order], dtype=np.int64)
    dams = np.array([-1 if parents[a][1] is None else position[parents[a][1]] for a in order], dtype=np.int64)
    return Pedigree(ids=np.array(order, dtype=object), sire=sires, dam=dams)


def _parents_first(parents: dict) -> list:
    """The animals with every parent before its offspring (a depth-first topological order); a loop is an error."""
    order, state = [], {}  # state: 1 while an animal's ancestors are being visited, 2 when placed
    for start in parents:
        if state.get(start) == 2:
            continue
        stack = [(start, iter(p for p in parents[start] if p is not None))]
        state[start] = 1
        while stack:
            animal, pending = stack[-1]
            parent = next(pending, None)
            if parent is None:
                stack.pop()
                state[animal] = 2
                order.append(animal)
            elif state.get(parent) == 1:
                cycle = [a for a, _ in stack]
                raise DataError(f"the pedigree has a loop: animal {parent!r} is its own ancestor (through "
                                f"{', '.join(map(repr, cycle[cycle.index(parent):]))})")
            elif state.get(parent) != 2:
                state[parent] = 1
                stack.append((parent, iter(p for p in parents[parent] if p is not None)))
    return order


def relationship_matrix(pedigree, id: str = "id", sire: str = "sire", dam: str = "dam") -> pd.DataFrame:
    """The numerator relationship matrix A by the tabular method, labelled by animal (parents first).

    Returns
    -------
    pandas.DataFrame
        (n, n), index and columns the animals' labels.
    """
    ped = prepare(pedigree, id, sire, dam)
    n = ped.n
    a = np.zeros((n, n))
    for i in range(n):
        s, d = ped.sire[i], ped.dam[i]
        if i:
            row = 0.5 * ((a[s, :i] if s >= 0 else 0.0) + (a[d, :i] if d >= 0 else 0.0))
            a[i, :i] = row
            a[:i, i] = row
        a[i, i] = 1.0 + (0.5 * a[s, d] if s >= 0 and d >= 0 else 0.0)
    return pd.DataFrame(a, index=pd.Index(ped.ids, name=id), columns=pd.Index(ped.ids, name=id))


def _mendelian_variances(ped: Pedigree, f: np.ndarray) -> np.ndarray:
    """D_i: 1/2 - (F_s + F_d)/4 with both parents known, 3/4 - F_p/4 with one, 1 with none."""
    known_s, known_d = ped.sire >= 0, ped.dam >= 0
    fs = np.where(known_s, f[np.maximum(ped.sire, 0)], 0.0)
    fd = np.where(known_d, f[np.maximum(ped.dam, 0)], 0.0)
    return np.where(known_s & known_d, 0.5 - 0.25 * (fs + fd),
                    np.where(known_s | known_d, 0.75 - 0.25 * np.where(known_s, fs, fd), 1.0))


def inbreeding(pedigree, id: str = "id", sire: str = "sire", dam: str = "dam") -> pd.Series:
    """Inbreeding coefficients F_i = A_ii - 1 by Meuwissen & Luo (1992), without forming A.

    Returns
    -------
    pandas.Series
        Indexed by animal (parents first).
    """
    ped = prepare(pedigree, id, sire, dam)
    return pd.Series(_inbreeding(ped), index=pd.Index(ped.ids, name=id), name="F")


#: The generation-wise method (:func:`_inbreeding_by_generations`) runs while the distinct sires (or dams, whichever
#: are fewer) summed over the generations stay below this many right-hand sides; beyond, Meuwissen & Luo's loop.
GENERATION_MAX_COLUMNS = 5_000


def _inbreeding(ped: Pedigree) -> np.ndarray:
    """F per animal: :func:`_inbreeding_by_generations` where its columns are few, else Meuwissen & Luo's loop."""
    known = (ped.sire >= 0) & (ped.dam >= 0)
    depth = _depths(ped)
    columns = sum(min(np.unique(ped.sire[known & (depth == g)]).size, np.unique(ped.dam[known & (depth == g)]).size)
                  for g in range(1, int(depth.max(initial=0)) + 1))
    if columns <= GENERATION_MAX_COLUMNS:
        return _inbreeding_by_generations(ped, depth)
    return _inbreeding_by_ancestors(ped)


def _depths(ped: Pedigree) -> np.ndarray:
    """Each animal's generation: 0 for founders, else 1 + its deeper parent's (parents come first)."""
    depth = np.zeros(ped.n, dtype=np.int64)
    sire, dam = ped.sire.tolist(), ped.dam.tolist()
    values = depth.tolist()
    for i in range(ped.n):
        s, d = sire[i], dam[i]
        if s >= 0 or d >= 0:
            values[i] = 1 + max(values[s] if s >= 0 else -1, values[d] if d >= 0 else -1)
    return np.asarray(values, dtype=np.int64)


def _inbreeding_by_generations(ped: Pedigree, depth: np.ndarray) -> np.ndarray:
    """F_i = A_sd / 2, generation by generation, A's needed columns by two sparse triangular solves (Colleau 2002):
    A = T^-1 D T^-T with T = I - P / 2 (P: each animal's row holds 1 at its known parents) and D the Mendelian
    sampling variances, known for every earlier generation.  For generation g, with S its distinct sires (or dams,
    if fewer), A[:, S] = T^-1 (D (T^-T E_S)): A_sd only involves the ancestors of s and d, all of earlier
    generations, so the later animals' entries of D (not yet known) do not enter."""
    import scipy.sparse
    import scipy.sparse.linalg

    n = ped.n
    rows, cols = [np.arange(n)], [np.arange(n)]
    values = [np.ones(n)]
    for parent in (ped.sire, ped.dam):
        known = parent >= 0
        rows.append(np.arange(n)[known])
        cols.append(parent[known])
        values.append(np.full(known.sum(), -0.5))
    T = scipy.sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    T.sum_duplicates()  # an animal whose sire is its dam (selfing) has -1 there
    Tt = T.T.tocsr()
    f = np.zeros(n)
    both = (ped.sire >= 0) & (ped.dam >= 0)
    for g in range(1, int(depth.max(initial=0)) + 1):
        mated = np.flatnonzero(both & (depth == g))
        if not mated.size:
            continue
        variance = _mendelian_variances(ped, f)  # exact for every earlier generation, which is all A_sd reads
        first, second = ped.sire[mated], ped.dam[mated]
        if np.unique(second).size < np.unique(first).size:
            first, second = second, first
        columns, where = np.unique(first, return_inverse=True)
        unit = np.zeros((n, columns.size))
        unit[columns, np.arange(columns.size)] = 1.0
        upper = scipy.sparse.linalg.spsolve_triangular(Tt, unit, lower=False)
        a_columns = scipy.sparse.linalg.spsolve_triangular(T, variance[:, None] * upper, lower=True)
        f[mated] = 0.5 * a_columns[second, where]
    return f


def _inbreeding_by_ancestors(ped: Pedigree) -> np.ndarray:
    import heapq

    n = ped.n
    f = np.zeros(n)
    variance = np.ones(n)  # D_j, the Mendelian sampling variance of each animal done so far
    for i in range(n):
        s, d = ped.sire[i], ped.dam[i]
        if s < 0 or d < 0:  # a parent unknown: no common ancestor, F_i = 0
            known = s if s >= 0 else d
            variance[i] = 1.0 if known < 0 else 0.75 - 0.25 * f[known]
            continue
        # row i of L (i's expected share of each ancestor's Mendelian sampling), traced from the youngest
        # ancestor down, so that each one's share is complete before it passes half to its parents
        share = {s: 0.5}
        share[d] = share.get(d, 0.0) + 0.5
        heap = [-s] if s == d else [-s, -d]
        heapq.heapify(heap)
        ancestors = 0.0
        while heap:
            j = -heapq.heappop(heap)
            x = share.pop(j)
            ancestors += x * x * variance[j]
            for parent in (ped.sire[j], ped.dam[j]):
                if parent >= 0:
                    if parent not in share:
                        share[parent] = 0.0
                        heapq.heappush(heap, -parent)
                    share[parent] += 0.5 * x
        variance[i] = 0.5 - 0.25 * (f[s] + f[d])
        f[i] = ancestors + variance[i] - 1.0  # A_ii = sum_j L_ij^2 D_j, L_ii = 1
    return f


def inverse_relationship_matrix(pedigree, id: str = "id", sire: str = "sire", dam: str = "dam"):
    """A^-1 by Henderson's rules with inbreeding (Quaas 1976): sparse, labelled.

    Returns
    -------
    (scipy.sparse.csr_matrix, numpy.ndarray)
        A^-1 (n, n) and the animals' labels in its row order (parents first).
    """
    import scipy.sparse

    ped = prepare(pedigree, id, sire, dam)
    n = ped.n
    weight = 1.0 / _mendelian_variances(ped, _inbreeding(ped))
    rows, cols, values = [np.arange(n)], [np.arange(n)], [weight]
    for parent in (ped.sire, ped.dam):
        known = parent >= 0
        i, p, w = np.arange(n)[known], parent[known], weight[known]
        rows += [i, p]
        cols += [p, i]
        values += [-0.5 * w, -0.5 * w]
    for first in (ped.sire, ped.dam):
        for second in (ped.sire, ped.dam):
            known = (first >= 0) & (second >= 0)
            rows.append(first[known])
            cols.append(second[known])
            values.append(0.25 * weight[known])
    matrix = scipy.sparse.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                     shape=(n, n)).tocsr()
    matrix.sum_duplicates()
    return matrix, ped.ids
