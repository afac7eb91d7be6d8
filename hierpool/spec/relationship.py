"""A known relationship matrix for one random-effect term: ``relmat=`` / ``relmat_inverse=`` of :func:`hierpool.lmm`.

The term's effects are b ~ N(0, sigma_A^2 A) over the labelled levels of A (animals of a pedigree, species of a
phylogeny): levels of A without data are predicted too.  The fit needs A^-1 (sparse for a pedigree: Henderson's
rules, :func:`hierpool.pedigree.inverse_relationship_matrix`) and log|A| (a constant of the likelihood).

Accepted forms of either argument, per grouping factor (``{"animal": A}``):

* a pandas DataFrame, its index the labels (its columns the same labels, in any order);
* a tuple ``(matrix, labels)`` with a NumPy array or a SciPy sparse matrix (what
  :func:`hierpool.pedigree.inverse_relationship_matrix` returns);
* a :class:`Relationship` already built (``hp.fit_batch`` and ``hp.bayes_batch`` build theirs once and hand it to
  every dataset's fit), used as it is; its group must be the key it is given under.

A given as ``relmat`` is inverted densely (a Cholesky factorization: up to :data:`DENSE_MAX_LEVELS` levels, a
phylogeny's or a small pedigree's size); larger relationships are given by their sparse inverse.
Checks, each a :class:`~hierpool.DataError` or :class:`~hierpool.ArgumentError` naming the culprit: labels
duplicated or not matching the columns, a matrix that is not square, not symmetric or not positive definite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg

from ..errors import ArgumentError, DataError
from .labels import column_labels

#: ``relmat=`` (A itself) is inverted densely up to this many levels; beyond, give ``relmat_inverse=``: a dense
#: A^-1 makes every factorization of the mixed-model equations dense too (benchmarks/RESULTS.md).
DENSE_MAX_LEVELS = 3_000
#: Relative asymmetry tolerated, max |M - M'| / max |M|.
SYMMETRY_TOL = 1e-10


@dataclass(frozen=True)
class Relationship:
    """A^-1 of one grouping factor's levels, with log|A|.

    Attributes
    ----------
    group : str
        The grouping factor (``animal`` in ``(1 | animal)``).
    labels : numpy.ndarray
        The levels of A, as strings (the design's level labels are strings too).
    inverse : scipy.sparse.csc_matrix
        A^-1, (q, q), rows and columns in ``labels``' order.
    log_det : float
        log|A|.
    """

    group: str
    labels: np.ndarray
    inverse: scipy.sparse.csc_matrix
    log_det: float

    def cholesky_factor(self, purpose: str) -> np.ndarray:
        """The lower Cholesky factor L_A of A (A = L_A L_A'), dense, from A^-1: for writing b = sd L_A z (NUTS on the
        plain model, simulation); up to :data:`DENSE_MAX_LEVELS` levels (``purpose`` names the caller in the error)."""
        if len(self.labels) > DENSE_MAX_LEVELS:
            raise ArgumentError(f"{purpose} writes A's Cholesky factor densely: up to {DENSE_MAX_LEVELS} levels, "
                                f"{self.group!r} has {len(self.labels)}")
        return np.linalg.cholesky(np.linalg.inv(self.inverse.toarray()))


def relationships(relmat: dict | None, relmat_inverse: dict | None) -> dict[str, Relationship]:
    """The :class:`Relationship` of each grouping factor named in ``relmat`` or ``relmat_inverse``."""
    out = {}
    for argument, given, inverted in (("relmat", relmat, False), ("relmat_inverse", relmat_inverse, True)):
        if given is None:
            continue
        if not isinstance(given, dict) or not given:
            raise ArgumentError(f"{argument} must be a dict keyed by grouping factor, e.g. {{'animal': A}}, "
                                f"got {type(given).__name__}")
        for group, value in given.items():
            if group in out:
                raise ArgumentError(f"{group!r} is given both a relmat and a relmat_inverse: give one")
            out[group] = _relationship(str(group), value, inverted, f"{argument}[{group!r}]")
    return out


def model_relationship(formula: str, relmat: dict | None, relmat_inverse: dict | None) -> Relationship:
    """The one :class:`Relationship` of a model (``hp.lmm`` and ``hp.bayes``), its group a grouping factor of
    ``formula``'s random-effect terms."""
    from .formula import parse_formula

    given = relationships(relmat, relmat_inverse)
    if len(given) != 1:
        raise ArgumentError(f"one relationship matrix per model for now, got {sorted(given)}")
    groups = [term.name for term in parse_formula(formula).random]
    unknown = [group for group in given if group not in groups]
    if unknown:
        raise ArgumentError(f"relationship matrix for {unknown[0]!r}, which is not a grouping factor of the "
                            f"formula's random-effect terms ({', '.join(groups) or 'none'})")
    return next(iter(given.values()))


def _relationship(group: str, value, inverted: bool, name: str) -> Relationship:
    if isinstance(value, Relationship):
        if value.group != group:
            raise ArgumentError(f"{name} is the relationship of {value.group!r}, given for {group!r}")
        return value
    matrix, labels = _matrix_and_labels(value, name)
    q = len(labels)
    if matrix.shape != (q, q):
        raise DataError(f"{name}: the matrix is {matrix.shape[0]} x {matrix.shape[1]} for {q} labels: it must be "
                        f"square, one row and column per label")
    sparse = scipy.sparse.issparse(matrix)
    values = abs(matrix).max() if sparse else np.max(np.abs(matrix))
    asymmetry = abs(matrix - matrix.T).max() if sparse else np.max(np.abs(matrix - matrix.T))
    if not np.isfinite(values) or asymmetry > SYMMETRY_TOL * max(values, 1e-300):
        raise DataError(f"{name}: the matrix is not symmetric (max |M - M'| = {asymmetry:.3g}) or not finite")
    if inverted:
        inverse = scipy.sparse.csc_matrix(matrix, dtype=float)
        log_det = -_sparse_log_det(inverse, name)
    else:
        if q > DENSE_MAX_LEVELS:
            raise ArgumentError(f"{name}: A has {q} levels; above {DENSE_MAX_LEVELS} give its sparse inverse as "
                                f"relmat_inverse= (hierpool.pedigree.inverse_relationship_matrix for a pedigree)")
        dense = matrix.toarray() if sparse else np.asarray(matrix, dtype=float)
        try:
            factor = np.linalg.cholesky(dense)
        except np.linalg.LinAlgError:
            raise DataError(f"{name}: the relationship matrix is not positive definite (duplicated or "
                            f"identical animals, clones, or a matrix that is not a covariance)") from None
        log_det = 2.0 * float(np.sum(np.log(np.diag(factor))))
        eye = np.eye(q)
        inverse_dense = scipy.linalg.cho_solve((factor, True), eye)
        inverse = scipy.sparse.csc_matrix((inverse_dense + inverse_dense.T) / 2)
    return Relationship(group=group, labels=np.asarray(labels, dtype=object), inverse=inverse, log_det=log_det)


def _unique(labels: list, name: str) -> list:
    if len(set(labels)) != len(labels):
        duplicated = pd.Index(labels)[pd.Index(labels).duplicated()].unique().tolist()
        raise DataError(f"{name}: duplicated labels {duplicated[:5]}")
    return labels


def _matrix_and_labels(value, name: str):
    if isinstance(value, pd.DataFrame):
        labels = _unique(list(column_labels(value.index)), name)
        columns = list(column_labels(value.columns))
        if sorted(columns) != sorted(labels):
            raise DataError(f"{name}: the DataFrame's columns are not its index's labels")
        order = pd.Index(columns).get_indexer(labels)
        return np.asarray(value.to_numpy(dtype=float)[:, order]), labels
    if isinstance(value, tuple) and len(value) == 2:
        matrix, labels = value
        labels = _unique(list(column_labels(labels)), name)
        if scipy.sparse.issparse(matrix):
            return scipy.sparse.csc_matrix(matrix, dtype=float), labels
        return np.asarray(matrix, dtype=float), labels
    raise ArgumentError(f"{name}: give a labelled pandas DataFrame or a (matrix, labels) tuple, got "
                        f"{type(value).__name__}")


def _sparse_log_det(matrix: scipy.sparse.csc_matrix, name: str) -> float:
    """log|M| of a symmetric positive definite sparse M by SuperLU with symmetric ordering and no pivoting (its U's
    diagonal is then the pivots of a symmetric elimination: all positive exactly when M is positive definite)."""
    try:
        lu = scipy.sparse.linalg.splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                      options=dict(SymmetricMode=True))
    except RuntimeError:
        raise DataError(f"{name}: the matrix is singular") from None
    pivots = lu.U.diagonal()
    # a zero pivot makes SuperLU swap rows even with diag_pivot_thresh=0: then the pivots no longer tell
    if not (np.array_equal(lu.perm_r, lu.perm_c) and np.all(pivots > 0)):
        raise DataError(f"{name}: the matrix is not positive definite")
    return float(np.sum(np.log(pivots)))


def with_relationship_levels(design, rel: Relationship):
    """The design with the relationship term's levels all of A's labels (those without records have no rows): the
    Bayesian engine's effects, summaries and predictions then cover every level of A (breeding values of ancestors)."""
    from dataclasses import replace

    terms = []
    for term in design.terms:
        if term.group == rel.group:
            position = pd.Index(rel.labels).get_indexer([str(level) for level in term.levels])
            term = replace(term, levels=np.asarray(rel.labels), index=position[term.index].astype(term.index.dtype))
        terms.append(term)
    return replace(design, terms=tuple(terms))
