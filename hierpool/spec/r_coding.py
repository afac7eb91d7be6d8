"""The model R's ``model.matrix`` (and so lme4) builds from a fixed part's terms, to check formulae's against it.

formulae and R encode a categorical variable in an interaction by different rules, and where the rules differ
in what they *span* they are different models, fitted silently: ``y ~ (x + f):c`` (x numeric, f and c
factors) gets c's main effects from formulae, 9 columns where lme4 fits 7, and ``y ~ f:c:h`` alone spans 15
dimensions where R's spans all 18 cells.  Most formulas agree (main effects, ``f*c``, ``x*f``, ``f + f:c``, ...):
a term's coding matters only to its span where the term's margins are not in the model.

R's rule (``TermCode`` in R's ``model.c``; Chambers & Hastie 1992, sec. 2.4.1): the terms are sorted by their
order (main effects first, keeping the written order within one order); in a term T a factor v is coded by
contrasts where T without v is empty or contained in a term before T, else by indicators of all its levels; and
without an intercept the first factor of the first term holding one is coded by indicators.  A numeric variable
enters as its columns.  :func:`r_coding` builds that matrix (treatment contrasts: R's default, and
formulae's) and compares its column space with formulae's, then, where the spans agree, the columns themselves: the
same span by other columns is the same model in another parameterization (``y ~ f:c + h``), which is fitted with a
warning that its coefficients are not lme4's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def _row_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's products of a's and b's columns (a row-wise Kronecker product): an interaction's columns."""
    return (a[:, :, None] * b[:, None, :]).reshape(len(a), -1)


#: Eigenvalues of a Gram matrix of unit-norm columns, relative to its largest: at most ZERO_GRAM is a dependence
#: (exact ones, as codings' indicator columns make, come out near 1e-16), at least CLEAR_GRAM a dimension; between
#: them the ranks are taken from a QR of the columns instead.
ZERO_GRAM, CLEAR_GRAM = 1e-13, 1e-8


def _ranks(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int, int]:
    """The ranks of ``ours``, ``theirs`` and both together (columns scaled to unit norm), from one Gram matrix where
    its eigenvalues are clearly zero or not (n p^2 flops, a fraction of a QR's time on a long frame), else from one QR
    (Q's columns are orthonormal, so a block of columns of R has the rank of the same columns of the matrix)."""
    both = np.concatenate([ours, theirs], axis=1)
    norms = np.linalg.norm(both, axis=0)
    both = both / np.where(norms > 0, norms, 1.0)
    p = ours.shape[1]
    gram = both.T @ both
    blocks = (gram[:p, :p], gram[p:, p:], gram)
    values = [np.linalg.eigvalsh(block) if block.size else np.zeros(0) for block in blocks]
    scale = max((v.max() for v in values if v.size), default=1.0)
    if all(np.all((v <= ZERO_GRAM * scale) | (v >= CLEAR_GRAM * scale)) for v in values):
        return tuple(int(np.sum(v >= CLEAR_GRAM * scale)) for v in values)
    r = np.linalg.qr(both, mode="r")

    def rank(block):
        if not block.size:
            return 0
        singular = np.linalg.svd(block, compute_uv=False)
        return int(np.sum(singular > singular[0] * max(both.shape) * 1e-12))

    return rank(r[:, :p]), rank(r[:, p:]), rank(r)


def _categorical_codes(frame: pd.DataFrame, component) -> np.ndarray | None:
    """Each row's level (0 .. L-1, in formulae's level order) of a categorical component that is a column of
    ``frame`` (text, a Categorical, ordered or not, a logical: hierpool codes each by treatment contrasts, and only
    the span matters); None for anything else (a call such as ``C(f, Sum)``, whose contrasts the user chose): its
    terms are not checked."""
    name = component.name
    if name not in frame.columns:
        return None
    levels = [str(level) for level in component.levels]
    codes = pd.Index(levels).get_indexer(frame[name].astype(str))
    return None if np.any(codes < 0) else codes


def _logical_codes(value) -> np.ndarray | None:
    """A numeric component whose values are True/False (``I(k > 3)``): R's model.matrix codes a logical as a factor
    of levels FALSE, TRUE, where formulae reads it as 0/1; its codes 0/1, else None."""
    value = np.asarray(value)
    if value.dtype == bool:
        return value.reshape(len(value), -1)[:, 0].astype(np.int64) if value.size else None
    return None


@dataclass(frozen=True)
class RCoding:
    """How formulae's fixed-effect columns stand to R's ``model.matrix`` of the same terms (:func:`r_coding`).

    Attributes
    ----------
    span : str
        Where they span another model: the terms at fault and both ranks ("" where the model is R's).
    columns : str
        Where they span the same model by other columns (``y ~ f:c + h``: formulae codes c by contrasts within f's
        indicators, R f by indicators within c's): the interactions so coded ("" where the columns are R's, or the
        span differs).  The fit is the same model, but its coefficients are another parameterization than lme4's,
        some named alike (``f[b]:c[u]`` and lme4's ``fb:cu``).
    """

    span: str = ""
    columns: str = ""


def r_coding(text: str, matrix, frame: pd.DataFrame) -> RCoding:
    """formulae's columns for the fixed part ``text`` (``matrix``: its design matrix on ``frame``) against R's
    ``model.matrix`` of the same terms: :class:`RCoding`, empty where they agree or where the formula holds a term
    this check does not read (module docstring)."""
    import formulae

    written = formulae.model_description(text).terms
    terms = [term for term in written if hasattr(term, "components")]
    present = {frozenset(c.name for c in term.components) for term in terms}
    # where every interaction's margins are terms of the model (main effects alone, f*c, a*f*c, (f + c + h)^2), both
    # rules code each factor by contrasts: nothing to compare (and no cost on a long frame)
    if all(frozenset(c.name for c in term.components) - {c.name} in present
           for term in terms if len(term.components) > 1 for c in term.components):
        return RCoding()
    built = {frozenset(c.name for c in term.components): term for term in matrix.terms.values()
             if hasattr(term, "components")}
    intercept = any(type(term).__name__ == "Intercept" for term in written)
    n = len(frame)
    ordered = sorted(terms, key=lambda term: len(term.components))  # stable: R's order of terms
    previous: list[frozenset] = []
    columns = [np.ones((n, 1))] if intercept else []
    indicator_given = intercept  # R's adjustment without an intercept, made once
    interactions = []
    for term in ordered:
        names = frozenset(c.name for c in term.components)
        evaluated = built.get(names)
        if evaluated is None or any(c.name.startswith("offset(") for c in term.components):
            return RCoding()
        block = np.ones((n, 1))
        for component in evaluated.components:
            logical = _logical_codes(component.value) if component.kind != "categoric" else None
            if component.kind != "categoric" and logical is None:
                value = np.asarray(component.value, dtype=float)
                block = _row_products(block, value.reshape(n, -1))
                continue
            codes = logical if logical is not None else _categorical_codes(frame, component)
            if codes is None:
                return RCoding()
            n_levels = 2 if logical is not None else len(component.levels)
            margin = names - {component.name}
            contrasts = not margin or any(margin <= earlier for earlier in previous)
            if not indicator_given:  # R's adjustment without an intercept: this factor by indicators
                contrasts, indicator_given = False, True
            indicators = np.eye(n_levels)[codes]
            block = _row_products(block, indicators[:, 1:] if contrasts else indicators)
        columns.append(block)
        previous.append(names)
        if len(names) > 1:
            interactions.append(":".join(c.name for c in term.components))
    r_matrix = np.concatenate(columns, axis=1)
    ours = np.asarray(matrix.design_matrix, dtype=float).reshape(n, -1)
    rank_ours, rank_r, rank_both = _ranks(ours, r_matrix)
    named = ", ".join(interactions)
    if not rank_r == rank_ours == rank_both:
        return RCoding(span=f"formulae codes the interaction(s) {named} as another model than R's model.matrix "
                            f"(lme4's): its columns span {rank_ours} dimensions, R's {rank_r}, together {rank_both}")
    return RCoding() if _same_columns(ours, r_matrix) else RCoding(columns=named)


def _same_columns(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether the two matrices hold the same columns, in any order: each column's inner product with one fixed
    random vector (equal columns give equal values; unequal ones, almost surely not), matched after sorting."""
    if ours.shape != theirs.shape:
        return False
    weights = np.random.default_rng(0).standard_normal(ours.shape[0])
    a, b = np.sort(weights @ ours), np.sort(weights @ theirs)
    return bool(np.allclose(a, b, rtol=1e-10, atol=1e-10 * max(1.0, float(np.max(np.abs(a), initial=0.0)))))
