"""The model R's ``model.matrix`` (and so lme4) builds from a fixed part's terms, fitted where formulae's differs.

formulae and R encode a categorical variable in an interaction by different rules, and where the rules differ
in what they *span* they are different models, fitted silently: ``y ~ (x + f):c`` (x numeric, f and c
factors) gets c's main effects from formulae, 9 columns where lme4 fits 7, and ``y ~ f:c:h`` alone spans 15
dimensions where R's spans all 18 cells.  Most formulas agree (main effects, ``f*c``, ``x*f``, ``f + f:c``, ...):
a term's coding matters only to its span where the term's margins are not in the model.

R's rule (``TermCode`` in R's ``model.c``; Chambers & Hastie 1992, sec. 2.4.1): the terms are sorted by their
order (main effects first, keeping the written order within one order); in a term T a factor v is coded by
contrasts where T without v is empty or contained in a term before T, else by indicators of all its levels; and
without an intercept the first factor of the first term holding one is coded by indicators.  A numeric variable
enters as its columns.  :func:`r_columns` builds that matrix (treatment contrasts: R's default, and
formulae's); :func:`r_coding` compares its column space with formulae's, then, where the spans agree, the columns
themselves: the same span by other columns is the same model in another parameterization (``y ~ f:c + h``, whose
coefficients were lme4's names on other numbers).  Where either differs the design fits R's columns
(:class:`RCodedPart`, which encodes new data the same way), so that the model and its coefficients are lme4's
(validation/formula_coding_reference.R: 62 formulas, deviance, fixed effects and their order, predictions).
Where formulae's columns are R's, :func:`r_order` puts them in R's order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import FormulaError


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
    largest = np.max(np.abs(both), axis=0, initial=0.0)
    if not np.all(np.isfinite(largest) & (largest < 1e150)):
        # (a column no design takes, refused by name after the coding: not finite, or its squares overflowing, which
        # made eigvalsh fail with NumPy's LinAlgError) ranked as its finite values scaled to at most 1
        both = np.where(np.isfinite(both), both, 0.0)
        largest = np.max(np.abs(both), axis=0, initial=0.0)
        both = both / np.where(largest > 0, largest, 1.0)
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
    ``frame`` (text, a Categorical, ordered or not, a logical), or a coding call on one (``C(f)``, ``C(f, Sum)``,
    ``C(f, contr_poly)``: :func:`_coding_call_column`); None for anything else, or a level not among the
    component's."""
    name = component.name if component.name in frame.columns else _coding_call_column(component, frame)
    if name is None:
        return None
    levels = [str(level) for level in component.levels]
    codes = pd.Index(levels).get_indexer(frame[name].astype(str))
    return None if np.any(codes < 0) else codes


def _first_position(text: str, name: str) -> int:
    """Where ``name`` (a column or a call) first stands in the formula ``text`` as a whole name, spaces ignored
    (formulae writes ``exp(a / 3)`` for the user's ``exp(a/3)``: its variable was put last in its term's name, the
    third review's finding); after the end where it does not stand."""
    compact, wanted = re.sub(r"\s+", "", text), re.escape(re.sub(r"\s+", "", name))
    found = re.search(rf"(?<![\w.]){wanted}(?![\w.])", compact)
    return found.start() if found else len(compact)


def _coding_call_column(component, frame: pd.DataFrame) -> str | None:
    """The column of ``frame`` a categorical coding call ``C(column[, coding])`` codes; None for anything else."""
    call = getattr(component, "call", None)
    arguments = [getattr(argument, "name", None) for argument in getattr(call, "args", ())]
    if getattr(call, "callee", None) != "C" or not arguments or arguments[0] not in frame.columns:
        return None
    return arguments[0]


def _own_contrasts(component) -> bool:
    """Whether a categorical component is coded by contrasts the user chose (``C(f, Sum)``, ``C(f, contr_poly)``):
    R's columns built here take treatment contrasts, which span what such a coding spans but are other columns."""
    call = getattr(component, "call", None)
    return getattr(call, "callee", None) == "C" and len(getattr(call, "args", ())) > 1


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
        span differs).
    model : RColumns or None
        R's columns where formulae's differ (``span`` or ``columns`` set): the fixed part is fitted with these, so
        that the model and its coefficients are lme4's.
    """

    span: str = ""
    columns: str = ""
    model: RColumns | None = None


@dataclass(frozen=True)
class RColumns:
    """Columns of R's ``model.matrix`` (:func:`r_columns`): names in hierpool's style (``f[p]:c[x]`` for lme4's
    ``fp:cx``), values (n, p), and the interactions among them ("f:c")."""

    names: tuple[str, ...]
    values: np.ndarray
    interactions: tuple[str, ...]
    own_contrasts: bool = False  # a factor coded by the user's contrasts (C(f, Sum)), built here by treatment's


def _all_margins_present(terms) -> bool:
    """Whether every interaction's margins are terms of the model (main effects alone, f*c, a*f*c, (f + c + h)^2):
    both rules then code each factor by contrasts, and the columns are R's."""
    present = {frozenset(c.name for c in term.components) for term in terms}
    return all(frozenset(c.name for c in term.components) - {c.name} in present
               for term in terms if len(term.components) > 1 for c in term.components)


def _written_terms(text: str) -> tuple[list, bool]:
    """(the terms of the fixed part ``text`` that hold variables, whether it has an intercept), as written."""
    import formulae

    written = formulae.model_description(text).terms
    return ([term for term in written if hasattr(term, "components")],
            any(type(term).__name__ == "Intercept" for term in written))


def r_columns(text: str, matrix, frame: pd.DataFrame, new_data: bool = False) -> RColumns | None:
    """R's ``model.matrix`` of the fixed part ``text`` on ``frame`` (``matrix``: formulae's design matrix of it on the
    fitted data, whose components it reads; ``new_data``: ``frame`` is other rows, each numeric component evaluated
    on them as formulae evaluates new data, its stateful transforms' fitted parameters kept): the rule of the module
    docstring, treatment contrasts, the terms in R's order (by their order, stably), a term's columns with its first
    variable varying fastest (R's order; within a term the variables as they first appear in the formula), offsets
    left out (they are not columns of R's matrix).  A coding call's factor (``C(f)``, ``C(f, Sum)``) is read by its
    column, coded by treatment contrasts here (``own_contrasts`` marks the user's other contrasts); None where a
    term is one this does not read (another call), or a level is not among the fitted ones."""
    terms, intercept = _written_terms(text)
    built = {frozenset(c.name for c in term.components): term for term in matrix.terms.values()
             if hasattr(term, "components")}
    n = len(frame)
    ordered = sorted(terms, key=lambda term: len(term.components))  # stable: R's order of terms
    # within a term R orders the variables as they first appear in the formula's text (h + f:c:h: lme4's hu:fp:cx;
    # (a + f):c: fq:cx)
    first_seen = {component.name: _first_position(text, component.name) for term in terms
                  for component in term.components}
    previous: list[frozenset] = []
    columns, names = ([np.ones((n, 1))], ["Intercept"]) if intercept else ([], [])
    indicator_given = intercept  # R's adjustment without an intercept, made once
    interactions = []
    own_contrasts = False
    for term in ordered:
        if any(c.name.startswith("offset(") for c in term.components):
            continue
        variables = frozenset(c.name for c in term.components)
        evaluated = built.get(variables)
        if evaluated is None:
            return None
        block, labels = np.ones((n, 1)), [()]
        for component in sorted(evaluated.components, key=lambda c: first_seen.get(c.name, len(text))):
            numeric = None
            if component.kind != "categoric":
                numeric = np.asarray(component.eval_new_data(frame) if new_data else component.value)
            logical = _logical_codes(numeric) if numeric is not None else None
            if numeric is not None and logical is None:
                value = numeric.astype(float).reshape(n, -1)
                own = [str(label) for label in getattr(component, "labels", None) or [component.name]]
                if len(own) != value.shape[1]:
                    return None
            else:
                codes = logical if logical is not None else _categorical_codes(frame, component)
                if codes is None:
                    return None
                levels = [False, True] if logical is not None else list(component.levels)
                margin = variables - {component.name}
                contrasts = not margin or any(margin <= earlier for earlier in previous)
                if not indicator_given:  # R's adjustment without an intercept: this factor by indicators
                    contrasts, indicator_given = False, True
                value = np.eye(len(levels))[codes]
                own = [f"{component.name}[{level}]" for level in levels]
                own_contrasts |= contrasts and _own_contrasts(component)
                if contrasts:
                    value, own = value[:, 1:], own[1:]
                    if logical is not None:  # a logical by contrasts is its 0/1 column, as formulae names it
                        own = [component.name]
            block = _row_products(value, block)  # the earlier variables vary fastest, as in R's columns
            labels = [old + (new,) for new in own for old in labels]
        columns.append(block)
        names += [":".join(label) for label in labels]
        previous.append(variables)
        if len(variables) > 1:
            interactions.append(":".join(c.name for c in term.components))
    values = np.concatenate(columns, axis=1) if columns else np.zeros((n, 0))
    return RColumns(tuple(names), values, tuple(interactions), own_contrasts)


def r_order(text: str, matrix) -> tuple[np.ndarray, list[str]] | None:
    """(the permutation of formulae's columns of the fixed part ``text`` into R's ``model.matrix`` order, the columns'
    names in that order) where formulae's columns are R's (:func:`r_coding` empty; ``matrix``: formulae's design
    matrix): terms by their order, stably, and within a term the variables as they first appear in the formula,
    the first varying fastest (formulae varies the last fastest: ``f*c``'s ``f[p]:c[y], f[p]:c[z], f[q]:c[y]``
    where lme4 has ``fp:cy, fq:cy, fp:cz``).  The names stay formulae's (new data are encoded by them): a name's
    parts may stand in another order than lme4's (``c + a:c``'s ``a:c[x]``, lme4's ``cx:a``).  None where a term's
    columns do not factor by its components (then formulae's order is kept)."""
    terms = list(matrix.terms.values())
    names = _labels(matrix)
    blocks, start = [], 0
    for term in terms:
        width = len(term.labels)
        components = list(getattr(term, "components", ()))
        sizes = [int(np.prod(np.shape(c.value)[1:])) if np.ndim(c.value) > 1 else 1 for c in components]
        if components and int(np.prod(sizes)) != width:
            return None
        index = np.arange(start, start + width)
        if len(components) > 1:  # formulae's grid (last component fastest) read in R's order
            grid = index.reshape(sizes)
            order = sorted(range(len(components)), key=lambda j: _first_position(text, components[j].name))
            index = np.transpose(grid, order).reshape(-1, order="F")
        degree = len(components) if components else (0 if type(term).__name__ == "Intercept" else np.inf)
        if any(c.name.startswith("offset(") for c in components):
            degree = np.inf  # (split off by name after)
        blocks.append((degree, index))
        start += width
    if not blocks:
        return None
    permutation = np.concatenate([index for _, index in sorted(blocks, key=lambda block: block[0])])
    return permutation, [names[j] for j in permutation]


def r_coding(text: str, matrix, frame: pd.DataFrame) -> RCoding:
    """formulae's columns for the fixed part ``text`` (``matrix``: its design matrix on ``frame``) against R's
    ``model.matrix`` of the same terms: :class:`RCoding`, empty where they agree or where the formula holds a term
    this check does not read (module docstring)."""
    terms, _ = _written_terms(text)
    if _all_margins_present(terms):  # nothing to compare (and no cost on a long frame)
        return RCoding()
    model = r_columns(text, matrix, frame)
    if model is None:
        return RCoding()
    n = len(frame)
    ours = np.asarray(matrix.design_matrix, dtype=float).reshape(n, -1)
    ours = ours[:, [j for j, name in enumerate(_labels(matrix)) if not name.startswith("offset(")]]
    rank_ours, rank_r, rank_both = _ranks(ours, model.values)
    named = ", ".join(model.interactions)
    # with the user's own contrasts in a factor R codes by contrasts, the columns built here (treatment's) span
    # lme4's model but are not its columns: where formulae's span differs the model is refused, where it agrees
    # formulae's are fitted with a warning (the design's); otherwise R's columns are fitted
    fitted = None if model.own_contrasts else model
    if not rank_r == rank_ours == rank_both:
        return RCoding(span=f"formulae codes the interaction(s) {named} as another model than R's model.matrix "
                            f"(lme4's): its columns span {rank_ours} dimensions, R's {rank_r}, together {rank_both}",
                       model=fitted)
    return RCoding() if _same_columns(ours, model.values) else RCoding(columns=named, model=fitted)


def _labels(matrix) -> list[str]:
    """The column names of a formulae design matrix, term by term."""
    return [str(label) for term in matrix.terms.values() for label in term.labels]


def _same_columns(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether the two matrices hold the same columns, in any order: each column's inner product with one fixed
    random vector (equal columns give equal values; unequal ones, almost surely not), matched after sorting."""
    if ours.shape != theirs.shape:
        return False
    weights = np.random.default_rng(0).standard_normal(ours.shape[0])
    a, b = np.sort(weights @ ours), np.sort(weights @ theirs)
    return bool(np.allclose(a, b, rtol=1e-10, atol=1e-10 * max(1.0, float(np.max(np.abs(a), initial=0.0)))))


@dataclass(frozen=True)
class RCodedPart:
    """A fixed part fitted by R's columns (:attr:`RCoding.model`), to encode new data the same way: formulae's
    fitted matrix evaluates the new rows (its stateful transforms, its levels), then R's columns are built from
    the evaluated components (:func:`r_columns`), with the offsets formulae names."""

    text: str
    matrix: object  # formulae's CommonEffectsMatrix of the fitted data

    @staticmethod
    def columns(model: RColumns, evaluated) -> tuple[list[str], np.ndarray]:
        """(names, values) of R's columns ``model`` and then the offsets of formulae's matrix ``evaluated`` (of the
        same rows), as the fixed part's columns are read (the offsets split off by name after)."""
        labels, values = _labels(evaluated), _matrix_columns(evaluated)
        if any(label.startswith("offset(") for label in labels) and len(labels) != len(values):
            # (formulae's matrix of a nesting f/c has other columns than its labels: which is the offset's?)
            raise FormulaError("an offset() beside a term whose columns formulae cannot build (a nesting f/c): give "
                               "the offset as offset= instead, or the term as R expands it (f + f:c)")
        offsets = [(label, column) for label, column in zip(labels, values) if label.startswith("offset(")]
        names = list(model.names) + [label for label, _ in offsets]
        return names, np.concatenate([model.values] + [column[:, None] for _, column in offsets], axis=1)

    def new_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        # (formulae first: its error names a level the fit did not see, and its column)
        evaluated = self.matrix.evaluate_new_data(frame)
        model = r_columns(self.text, self.matrix, frame, new_data=True)
        if model is None:  # (the fit read every term: on new data, a level it did not see)
            raise ValueError("a factor holds a level that was not in the fitted data")
        names, values = self.columns(model, evaluated)
        return pd.DataFrame(values, columns=names, index=frame.index)


def _matrix_columns(matrix) -> np.ndarray:
    """A formulae design matrix's columns, (p, n): one row per column, to pair with its labels."""
    values = np.asarray(matrix.design_matrix, dtype=float)
    return values.reshape(len(values), -1).T if values.ndim == 2 else values.reshape(1, -1)
