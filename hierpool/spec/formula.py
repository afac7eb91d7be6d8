"""lme4-style model formulas.

``formulae`` parses everything except the one piece of lme4 syntax it does not
know: the random-effect *bar groups* ``(lhs | g)`` and ``(lhs || g)`` as units
that carry a covariance block.  formulae splits ``(x | g)`` into independent
terms ``1|g`` and ``x|g`` and rejects ``||``.  This module therefore only finds
the top-level bar groups in the right-hand side; each piece (the fixed part,
each group's left-hand side, each grouping expression) is still parsed and
evaluated by formulae, except a part that only names columns, which
:mod:`hierpool.spec.columns` reads without importing formulae.

Semantics follow lme4 (Bates et al. 2015, section 2.1):

* ``(x | g)``   one term, intercept and slope correlated;
* ``(x || g)``  one term per left-hand-side term, mutually uncorrelated;
* ``(0 + x | g)`` slope only;
* ``(1 | a/b)`` nested, ``= (1 | b:a) + (1 | a)`` with lme4's names;
* ``(1 | a:b)`` interaction of grouping factors;
* any number of crossed terms.

R's arithmetic inside a formula is translated for formulae (:func:`to_formulae`):
``^`` is a power inside ``I()`` and crosses terms outside it (formulae's ``**``),
and ``scale(x)`` divides by R's n - 1 standard deviation.  ``offset(expr)``
terms of the fixed part are kept apart from X by :mod:`hierpool.spec.design`.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

from ..errors import FormulaError
from .columns import plain_fixed, plain_grouping, plain_part

#: formulae's ``scale`` divides by the n-denominator sd; R's ``scale`` by the n - 1 one.
#: The formula text calls this stateful transform instead (see :func:`to_formulae`).
R_SCALE_NAME = "r_scale"
#: The name of R's ``contr.poly`` encoding in a formula (:class:`hierpool.spec.transforms.ContrPoly`):
#: ``C(f, contr_poly)``, R's coding of an ordered factor.
POLY_CONTRAST_NAME = "contr_poly"
_POLY_COLUMN = re.compile(rf"C\(([^(),]+), {POLY_CONTRAST_NAME}\)\[([^\]]*)\]")
_FACTOR_COLUMN = re.compile(r"(?<![\w.])C\(([^(),]+)\)\[")
_CODING_CALL = re.compile(rf"C\(([^(),]+)(?:, {POLY_CONTRAST_NAME})?\)")
_SCALE_CALL = re.compile(r"(?<![\w.])scale(?=\s*\()")
_R_SCALE_CALL = re.compile(rf"(?<![\w.]){R_SCALE_NAME}(?=\()")

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}


@dataclass(frozen=True)
class RandomTermSpec:
    """One random-effect term: a block of coefficients varying by one grouping factor.

    Attributes
    ----------
    lhs : str
        Formula text (no ``~``) whose model matrix gives the columns of z,
        e.g. ``"1 + Days"`` or ``"0 + Days"``.
    factor : tuple of str
        Data columns whose interaction is the grouping factor, in the order
        used for the level labels (lme4's order, e.g. ``("cask", "batch")``).
    name : str
        Name of the grouping factor as lme4 prints it, e.g. ``"cask:batch"``.
    """

    lhs: str
    factor: tuple[str, ...]
    name: str


#: The spatial terms ``car(area, type=...)`` (:mod:`hierpool.spec.spatial`): intrinsic CAR, proper CAR, BYM2.
CAR_TYPES = ("icar", "proper", "bym2")
#: What an ICAR term does with an area that has no neighbours: refuse it, or give it an independent effect.
CAR_ISLANDS = ("error", "independent")
_CAR_CALL = re.compile(r"^car\s*\(")


@dataclass(frozen=True)
class SpatialTermSpec:
    """A spatial random effect ``car(area, type=..., islands=...)``: one effect per area of a neighbourhood graph.

    Attributes
    ----------
    factor : str
        The data column of area labels.
    type : str
        ``"icar"``, ``"proper"`` or ``"bym2"`` (:data:`CAR_TYPES`).
    islands : str
        ``"error"`` or ``"independent"``: an ICAR's treatment of areas without neighbours (:data:`CAR_ISLANDS`).
    """

    factor: str
    type: str = "bym2"
    islands: str = "error"

    @property
    def label(self) -> str:
        return f"car({self.factor}, type='{self.type}')"

    @property
    def mix_name(self) -> str | None:
        """The name of the type's second parameter: BYM2's ``rho``, the proper CAR's ``alpha`` (ICAR: None)."""
        return {"bym2": "rho", "proper": "alpha"}.get(self.type)


def _car_term(text: str, full: str) -> SpatialTermSpec:
    """``car(county, type='bym2')`` -> SpatialTermSpec; every other argument is refused by name."""
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise FormulaError(f"cannot read the spatial term {text!r} of {full!r}") from None
    if not isinstance(call, ast.Call) or len(call.args) != 1 or not isinstance(call.args[0], ast.Name):
        raise FormulaError(f"the spatial term {text!r} of {full!r} takes one column of area labels first: "
                           "car(area, type='bym2')")
    options = {"type": "bym2", "islands": "error"}
    for keyword in call.keywords:
        if keyword.arg not in options:
            raise FormulaError(f"the spatial term {text!r} of {full!r} has an unknown argument {keyword.arg!r}; "
                               f"it takes {sorted(options)}")
        if not (isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, str)):
            raise FormulaError(f"argument {keyword.arg!r} of {text!r} must be a quoted string")
        options[keyword.arg] = keyword.value.value
    if options["type"] not in CAR_TYPES:
        raise FormulaError(f"type {options['type']!r} of {text!r} is not one of {CAR_TYPES}")
    if options["islands"] not in CAR_ISLANDS:
        raise FormulaError(f"islands {options['islands']!r} of {text!r} is not one of {CAR_ISLANDS}")
    return SpatialTermSpec(factor=call.args[0].id, type=options["type"], islands=options["islands"])


@dataclass(frozen=True)
class ModelSpec:
    """A parsed mixed-model formula; no data involved.

    Attributes
    ----------
    formula : str
        The formula as the user wrote it.
    response : str
        Left-hand side of ``~``.
    fixed : str
        ``"response ~ fixed part"`` for formulae.
    random : tuple of RandomTermSpec
        Random-effect terms in the order lme4 creates them (before lme4
        reorders them by number of levels, which :mod:`hierpool.spec.design` does).
    variables : tuple of str
        Every data column the formula uses.
    spatial : tuple of SpatialTermSpec
        The ``car(...)`` terms (:mod:`hierpool.spec.spatial` builds their design; the other model paths refuse them).
    values : tuple of str
        The columns read as values (the response's, the fixed part's and the random terms' left-hand sides'), which
        must be numbers, or text or categories for a factor; a grouping factor's labels may be of any type.
    """

    formula: str
    response: str
    fixed: str
    random: tuple[RandomTermSpec, ...]
    variables: tuple[str, ...]
    spatial: tuple[SpatialTermSpec, ...] = ()
    values: tuple[str, ...] = ()


def _scan_top_level(text: str):
    """Yield (index, char, depth) for each character, tracking bracket depth and quotes."""
    depth = 0
    quote = None
    stack: list[str] = []
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            yield i, ch, -1
            continue
        if ch in "'\"`":
            quote = ch
            yield i, ch, -1
            continue
        if ch in _OPENERS:
            yield i, ch, depth
            stack.append(ch)
            depth += 1
            continue
        if ch in _CLOSERS:
            if not stack or stack[-1] != _CLOSERS[ch]:
                raise FormulaError(f"unbalanced '{ch}' at position {i} in formula {text!r}")
            stack.pop()
            depth -= 1
            yield i, ch, depth
            continue
        yield i, ch, depth
    if stack or quote:
        raise FormulaError(f"unbalanced brackets or quotes in formula {text!r}")


def _split_top_level(text: str, seps: str) -> list[tuple[str, str]]:
    """Split at top-level characters in ``seps``; return (separator before, piece) pairs."""
    pieces: list[tuple[str, str]] = []
    start, sep = 0, "+"
    for i, ch, depth in _scan_top_level(text):
        if depth == 0 and ch in seps:
            # '**' and unary signs inside a summand do not split it
            if text[start:i].strip() == "" and ch == "-":
                continue
            pieces.append((sep, text[start:i]))
            start, sep = i + 1, ch
    pieces.append((sep, text[start:]))
    return pieces


def _split_bar(inner: str):
    """Return (lhs, op, rhs) when ``inner`` has a top-level ``|`` or ``||``, else None."""
    for i, ch, depth in _scan_top_level(inner):
        if depth == 0 and ch == "|":
            if inner[i + 1 : i + 2] == "|":
                return inner[:i].strip(), "||", inner[i + 2 :].strip()
            return inner[:i].strip(), "|", inner[i + 1 :].strip()
    return None


def to_formulae(text: str) -> str:
    """Formula text in formulae's dialect: R's ``^`` -> ``**``, ``scale(`` -> R's n - 1 scale.

    Quoted strings are left as they are.
    """
    if not isinstance(text, str):  # (the batch functions' first look at a formula comes here)
        raise FormulaError(f"formula must be a string, got {type(text).__name__}")
    out = []
    for _, ch, depth in _scan_top_level(text):
        out.append("**" if ch == "^" and depth >= 0 else ch)
    # the scale rename only touches unquoted text: quotes cannot hold '(' after a bare name here
    return _SCALE_CALL.sub(R_SCALE_NAME, "".join(out))


def display_name(name: str) -> str:
    """A formulae column name as the user wrote it (``r_scale(x)`` -> ``scale(x)``), an ordered factor's
    polynomial contrast as R names it (``C(f, contr_poly)[.L]`` -> ``f.L``; a level's own column ``f[lo]``)."""
    name = _POLY_COLUMN.sub(lambda m: m[1] + (m[2] if m[2][:1] in ".^" else f"[{m[2]}]"), name)
    name = _FACTOR_COLUMN.sub(lambda m: f"{m[1]}[", name)
    return _R_SCALE_CALL.sub("scale", name)


def _term_names(text: str):
    """(start, end, name, in_call) of each name ``text`` reads: a plain or backticked name (its backticks in the
    span), not a called function's, and whether it sits within a call's brackets (``I(xb * 1)``, ``C(f, Sum)``)
    rather than as a term (also within grouping brackets, ``(xb + x)^2``).  String literals are skipped."""
    stack, i = [], 0  # stack: for each open bracket, whether it is a call's
    while i < len(text):
        ch = text[i]
        if ch in "`'\"":
            end = text.find(ch, i + 1)
            end = len(text) - 1 if end < 0 else end
            if ch == "`":
                yield i, end + 1, text[i + 1 : end], any(stack)
            i = end + 1
            continue
        if ch == "(":
            stack.append(bool(re.search(r"[\w.]\s*$", text[:i])))  # a name before the bracket: a call
        elif ch == ")" and stack:
            stack.pop()
        match = re.match(r"[A-Za-z_.][\w.]*", text[i:]) if (ch.isalpha() or ch in "_.") else None
        if match and not (i and (text[i - 1].isalnum() or text[i - 1] in "_.")):
            name = match.group(0)
            if not text[i + len(name):].lstrip().startswith("("):  # not a function's name
                yield i, i + len(name), name, any(stack)
            i += len(name)
            continue
        i += 1


def names_in_calls(*texts) -> set[str]:
    """The names the formula parts ``texts`` read within a call's brackets (:func:`_term_names`)."""
    return {name for text in texts for _, _, name, in_call in _term_names(text) if in_call}


def with_logical_factors(text: str, logical) -> str:
    """``text`` (a formula's right side, or a random term's left side) with each use of a column of ``logical`` as a
    term (not within a call's brackets: :func:`_term_names`) written ``C(name)``, a factor of levels False, True, as
    R's model.matrix reads a logical (:func:`hierpool.spec.design.build_design` writes so a logical that a call also
    reads, ``offset(xb)``, whose values the call keeps)."""
    if not logical:
        return text
    out, last = [], 0
    for start, end, name, in_call in _term_names(text):
        if name in logical and not in_call:
            out += [text[last:start], f"C({text[start:end]})"]
            last = end
    return "".join(out) + text[last:]


def without_coding_calls(text: str) -> str:
    """A message of formulae's with a column's coding call (``C(xb)``, ``C(f, contr_poly)``) written as the column."""
    return _CODING_CALL.sub(lambda m: m[1], text)


def _parse_with_formulae(text: str, what: str):
    """formulae's model description of ``text``, refused where formulae's parser would not read all of it.

    formulae's parser stops at the first token its grammar has no rule for and returns what it read before: R's
    ``%in%``, ``%%``, a comparison, a comma or two names side by side (``x + z w``) would drop the rest of the fixed
    part without a word (``y ~ x %in% f + z`` was fitted as ``y ~ x``)."""
    # half a second to import formulae: only formulae that are not plain names need it
    from formulae.parser import Parser
    from formulae.resolver import Resolver
    from formulae.scanner import Scanner
    from formulae.terms import Model

    try:
        parser = Parser(Scanner(text).scan())
        expression = parser.parse()
        if not parser.at_end():
            rest = " ".join(str(token.lexeme) for token in parser.tokens[parser.current:-1])
            rest = re.sub(r"%\s*(in|/)?\s*%", lambda m: f"%{m[1] or ''}%", rest)  # the scanner splits %in%
            raise FormulaError(
                f"cannot parse {what} {text!r}: it stops at {rest!r} (R's x %in% f is written x:f here; %%, %/%, "
                "comparisons and commas are not formula operators)")
        description = Resolver(expression).resolve()
    except FormulaError:
        raise
    except Exception as exc:  # formulae raises several unrelated exception types
        raise FormulaError(f"cannot parse {what} {text!r}: {exc}") from None
    # formulae.model_description's last step (a formula of one term resolves to that term)
    return description if isinstance(description, Model) else Model(description)


def _expr_lhs_text(expr) -> str:
    """Formula text for a single left-hand-side term on its own (for ``||``)."""
    if type(expr).__name__ == "Intercept":
        return "1"
    return f"0 + {expr.name}"


_NUMBER = re.compile(r"\s*-?\s*(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
_NUMBER_ONE_OR_ZERO = {1.0: "1", 0.0: "0", -1.0: "-1"}


def _number(text: str) -> float | None:
    """The value of a term written as a number (``1``, ``0``, ``1.0``, ``-1``), None for any other term."""
    return float(text.replace(" ", "")) if _NUMBER.fullmatch(text) else None


def _check_number_terms(pieces, where: str) -> None:
    """Refuse a term that is a number other than 1, 0 or -1 (``x - 10``, ``x + 0.5``): R's model formula refuses it;
    formulae dropped ``- 10`` silently, or raised a TypeError."""
    for _, text in pieces:
        value = _number(text)
        if value is not None and value not in _NUMBER_ONE_OR_ZERO:
            raise FormulaError(f"{where} has the number {text.strip()!r} as a term: only 1 (an intercept) and 0 or -1 "
                               "(none) are; a shifted covariate is written I(x - 10)")


def _without_intercept_removal(lhs: str) -> str:
    """A random term's left side with its intercept written as R reads it: the last of ``1``, ``+ 0`` and ``- 1``
    decides (``1 + x - 1`` has none, ``0 + x + 1`` has one), and the intercept, if any, comes first (lme4's order
    of the term's coefficients).  formulae cannot parse ``x - 1`` inside a term (lme4's ``(Days - 1 |
    Subject)``), read ``(x + I(x - 1) + 0 || g)`` with an intercept term, and ``0 + x + 1`` with its intercept
    last."""
    pieces = _split_top_level(lhs, "+-")

    def switch(sep: str, text: str):  # True: intercept on, False: off, None: not an intercept piece
        text = text.strip()
        if text in ("0", "1") and sep in "+-":
            return (text == "1") == (sep == "+")
        if text == "-1" and sep == "+":  # a leading unary minus (_split_top_level keeps it in the piece)
            return False
        return None

    _check_number_terms(pieces, f"random-effect term's left side {lhs!r}")
    pieces = [(sep, _NUMBER_ONE_OR_ZERO.get(_number(text), text)) for sep, text in pieces]  # 1.0 is 1, as in R
    switches = [switch(sep, text) for sep, text in pieces]
    if all(value is None for value in switches):
        return lhs
    intercept = [value for value in switches if value is not None][-1]
    kept = [text.strip() for (sep, text), value in zip(pieces, switches) if value is None]
    signs = [sep for (sep, _), value in zip(pieces, switches) if value is None]
    body = "".join(f" {sep} {text}" for sep, text in zip(signs, kept)).strip()
    body = body[1:].strip() if body.startswith("+") else body
    if not body:
        return "1" if intercept else lhs  # (0 | g): no coefficient, refused as formulae refuses it
    return f"{'1' if intercept else '0'} + {body}" if not body.startswith("-") else f"{'1' if intercept else '0'} {body}"


def _random_terms_of_bar(lhs: str, op: str, rhs: str, full: str) -> list[RandomTermSpec]:
    lhs = _without_intercept_removal(lhs)
    if not lhs:
        raise FormulaError(f"random-effect term ({lhs} {op} {rhs}) in {full!r} has nothing before '{op}'")
    if not rhs:
        raise FormulaError(f"random-effect term ({lhs} {op} {rhs}) in {full!r} has no grouping factor")
    part, factors = plain_part(lhs), plain_grouping(rhs)
    if part is not None and factors is not None:  # names only: what formulae would find, without it
        pieces = [lhs] if op == "|" else ["1"] * part.intercept + [f"0 + {column}" for column in part.names]
        return [RandomTermSpec(lhs=piece, factor=factor, name=":".join(factor)) for factor in factors for piece in pieces]
    desc = _parse_with_formulae(f"({lhs} | {rhs})", "random-effect term")
    group_terms = [t for t in desc.terms if type(t).__name__ == "GroupSpecificTerm"]
    if not group_terms:
        raise FormulaError(f"random-effect term ({lhs} {op} {rhs}) in {full!r} has no varying coefficient")
    nested = "/" in rhs
    by_factor: dict[tuple[str, ...], list] = {}
    for term in group_terms:
        factor = tuple(v.name for v in term.factor.components)
        numbers = [name for name in factor if not isinstance(name, str)]
        if numbers:  # formulae reads (1 | 2) as a literal; ":".join raised a TypeError on it
            raise FormulaError(f"{full!r}: the grouping factor of a random term must be a column name, got the number "
                               f"{numbers[0]!r} (a column named by a number is written in backticks: `2`)")
        by_factor.setdefault(factor, []).append(term.expr)
    factors = list(by_factor)
    if nested:
        # lme4's expandSlash: a/b -> (b:a), (a); inner factor named first.
        factors = [tuple(reversed(f)) for f in reversed(factors)]
        by_factor = {tuple(reversed(k)): v for k, v in by_factor.items()}
    specs = []
    for factor in factors:
        name = ":".join(factor)
        if op == "|":
            specs.append(RandomTermSpec(lhs=lhs, factor=factor, name=name))
        else:
            # lme4's expandDoubleVerts puts the intercept's term first, wherever the formula wrote the 1
            exprs = sorted(by_factor[factor], key=lambda expr: type(expr).__name__ != "Intercept")
            specs.extend(RandomTermSpec(lhs=_expr_lhs_text(expr), factor=factor, name=name) for expr in exprs)
    return specs


def _variable_names(text: str) -> set[str]:
    """The names a formula part (``"y ~ x"`` or a left-hand side ``"1 + x"``) reads."""
    fixed = plain_fixed(text) if "~" in text else None
    if fixed is not None:
        return {fixed[0], *fixed[1].names}
    part = None if "~" in text else plain_part(text)
    if part is not None:
        return set(part.names)
    names = set(_parse_with_formulae(text, "formula part").var_names)
    constants = [name for name in names if not isinstance(name, str)]  # formulae reads the word None as None
    if constants:
        raise FormulaError(f"formula part {text!r} names {constants[0]!r}, which is not a column (a column named "
                           f"{constants[0]!r} cannot be read by a formula: rename it)")
    return names


#: A name as the formula's parts read it (a column or a function: the caller keeps the columns).
_NAME = r"[A-Za-z_.][A-Za-z0-9_.]*"


def response_only_names(spec: ModelSpec) -> set[str]:
    """The names the formula reads in its response and nowhere else (``y``; ``incidence`` and ``size`` of
    ``cbind(incidence, size - incidence)``, unless the fixed part or a random term reads them too): new data need not
    carry them, and a response's True/False are its 1/0."""
    names = set(re.findall(_NAME, spec.response))
    rest = spec.fixed.split("~", 1)[1] + " " + " ".join(f"{t.lhs} {' '.join(t.factor)}" for t in spec.random)
    return names - set(re.findall(_NAME, rest))


def _wrapped(text: str) -> bool:
    """Whether ``text`` is one bracketed expression: its first '(' closes at its last character."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i == len(text) - 1
    return False


def _without_extra_brackets(text: str) -> str:
    """A term with the brackets R drops taken off: ``((1 | g))`` is lme4's ``(1 | g)``, ``((x))`` is ``(x)``."""
    while _wrapped(text) and _wrapped(text[1:-1].strip()):
        text = text[1:-1].strip()
    return text


def _summands(sign: str, piece: str) -> list[tuple[str, str]]:
    """(sign, term) pairs of one summand of a formula's right-hand side, R's dropped brackets taken off: a bracketed
    sum holding random-effect or spatial terms is its summands (lme4 reads ``y ~ x + ((1 | g) + (1 | h))`` and
    ``y ~ (x + (1 | g))`` so: its ``findbars`` and ``nobars`` look through ``(`` and ``+``), and ``((car(g, W)))``
    is ``car(g, W)``.  Other bracketed sums (``(a + b)``) are left whole to the fixed part's parser."""
    text = _without_extra_brackets(piece.strip())
    if _wrapped(text):
        inner = text[1:-1].strip()
        if _CAR_CALL.match(inner):
            return [(sign, inner)]
        parts = _split_top_level(inner, "+-")
        if sign == "+" and len(parts) > 1 and any(_bar_inside(part) or _spatial(part) for _, part in parts):
            return [pair for inner_sign, part in parts for pair in _summands(inner_sign, part)]
    return [(sign, text)]


def _spatial(piece: str) -> bool:
    """Whether ``piece`` is a ``car(...)`` term, in brackets or not."""
    text = _without_extra_brackets(piece.strip())
    return bool(_CAR_CALL.match(text[1:-1].strip() if _wrapped(text) else text))


def _bar_inside(text: str) -> str | None:
    """The first random-effect term (``1 | g``) in a bracket of ``text`` that is not a call's argument list: in
    ``(1 | g):z`` or ``(x + (1 | g))``, not in ``I((x > 0) | (z > 0))``; None where there is none."""
    opened: list[tuple[int, bool]] = []  # (position after '(', whether it opens a call's arguments)
    for i, ch, depth in _scan_top_level(text):
        if depth < 0:
            continue
        if ch == "(":
            before = text[:i].rstrip()
            opened.append((i + 1, bool(before) and (before[-1].isalnum() or before[-1] in "._")))
        elif ch == ")":
            start, call = opened.pop()
            if not call and _split_bar(text[start:i]) is not None:
                return text[start:i].strip()
    return None


def parse_formula(formula: str, binomial_counts: bool = False, random_optional: bool = False) -> ModelSpec:
    """Parse an lme4-style mixed-model formula.

    Parameters
    ----------
    formula : str
        E.g. ``"Reaction ~ Days + (Days | Subject)"``.
    binomial_counts : bool
        Accept a ``cbind(successes, failures)`` response (a binomial GLMM's).
    random_optional : bool
        Accept a formula without random-effect terms (a generalized least-squares model with correlated
        residuals, nlme's ``gls``); its ``random`` is then empty.

    Returns
    -------
    ModelSpec

    Raises
    ------
    FormulaError
        On a syntax error, a missing ``~``, or a formula with no random-effect term (unless ``random_optional``).
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string, got {type(formula).__name__}")
    return _parse(formula, binomial_counts, random_optional)


@functools.lru_cache(maxsize=256)  # a ModelSpec is immutable: refitting a formula need not re-parse it
def _parse(formula: str, binomial_counts: bool = False, random_optional: bool = False) -> ModelSpec:
    parts = _split_top_level(to_formulae(formula), "~")
    if len(parts) != 2:
        raise FormulaError(f"formula {formula!r} must have exactly one '~' with the response on its left")
    response, rhs = _evaluated_response(parts[0][1].strip()), parts[1][1].strip()
    if not response:
        raise FormulaError(f"formula {formula!r} has no response on the left of '~'")
    if not rhs:
        raise FormulaError(f"formula {formula!r} has nothing on the right of '~'")
    if re.match(r"cbind\s*\(", response) and not binomial_counts:
        raise FormulaError(
            f"the response {parts[0][1].strip()!r} of {formula!r} is a binomial count (successes, failures): "
            "fit it with hp.glmm(formula, data, family='binomial')"
        )

    fixed_pieces: list[str] = []
    random: list[RandomTermSpec] = []
    spatial: list[SpatialTermSpec] = []
    _check_number_terms(_split_top_level(rhs, "+-"), f"formula {formula!r}")
    summands = [pair for outer, piece in _split_top_level(rhs, "+-") for pair in _summands(outer, piece)]
    for sign, text in summands:
        if not text:
            raise FormulaError(f"formula {formula!r} has an empty term (a dangling '{sign}')")
        if _CAR_CALL.match(text):
            if sign != "+":
                raise FormulaError(f"spatial term {text!r} in {formula!r} cannot be subtracted")
            spatial.append(_car_term(text, formula))
            continue
        bar = None
        if _wrapped(text):  # (not (a)*(b): its first bracket closes before its last)
            bar = _split_bar(text[1:-1])
        if bar is None:
            if _split_bar(text) is not None:
                raise FormulaError(f"random-effect term {text!r} in {formula!r} must be wrapped in parentheses")
            nested = _bar_inside(text)
            if nested is not None:  # lme4 would take (1 | g):z as (1 | g) + z; formulae failed on it
                raise FormulaError(
                    f"random-effect term ({nested}) of {formula!r} is part of the term {text!r}: a random-effect "
                    f"term must be a summand of its own, added ('+ ({nested})'), not multiplied, subtracted or "
                    "passed to a function")
            fixed_pieces.append(text if not fixed_pieces and sign == "+" else f"{sign} {text}")
            continue
        if sign != "+":
            raise FormulaError(f"random-effect term {text!r} in {formula!r} cannot be subtracted")
        random.extend(_random_terms_of_bar(*bar, full=formula))

    seen: dict = {}
    for term in random:  # the same columns by the same factor twice: their variances trade against each other
        plain = plain_part(term.lhs)  # ((x | g) and (1 + x | g) are one term, (1 | g:h) and (1 | h:g) too)
        columns = (plain.intercept, frozenset(plain.names)) if plain is not None else re.sub(r"\s+", "", term.lhs)
        key = (columns, frozenset(term.factor))
        if key in seen:
            raise FormulaError(f"formula {formula!r} has the random-effect term ({term.lhs} | {term.name}) twice: "
                               "its variance cannot be split between the two (lme4 fits them, unidentifiable)")
        seen[key] = term
    if not random and not spatial and not random_optional:
        raise FormulaError(
            f"formula {formula!r} has no random-effect term such as (1 | group); "
            "for a model without random effects use an ordinary regression"
        )
    fixed_rhs = " ".join(fixed_pieces) if fixed_pieces else "1"
    if fixed_rhs.startswith("- "):
        fixed_rhs = "1 " + fixed_rhs
    fixed = f"{response} ~ {fixed_rhs}"
    variables: list[str] = []
    for desc_text in [fixed] + [t.lhs for t in random]:
        for v in sorted(_variable_names(desc_text)):
            if v and v not in variables:
                variables.append(v)
    values = tuple(variables)
    for v in [v for term in random for v in term.factor] + [term.factor for term in spatial]:
        if v not in variables:
            variables.append(v)
    return ModelSpec(formula=formula, response=response, fixed=fixed, random=tuple(random), variables=tuple(variables),
                     spatial=tuple(spatial), values=values)


def _evaluated_response(response: str) -> str:
    """The response as R reads it, an expression evaluated whole (``Reaction - 100``, ``incidence / size``, ``-y``,
    ``y^2``): wrapped in ``I(...)`` where an operator stands outside any call.  formulae reads a left side as terms,
    as a right side: ``Reaction - 100`` dropped the term 100 and fitted Reaction, ``Reaction - Days`` fitted
    Reaction too, and ``incidence / size`` was refused."""
    if any(depth == 0 and ch in "+-*/%:" for _, ch, depth in _scan_top_level(response)):
        return f"I({response})"
    return response


def has_spatial_term(formula) -> bool:
    """Whether ``formula`` has a ``car(...)`` term (False for anything the formula parser refuses: the caller's own
    path then reports it)."""
    if not isinstance(formula, str) or "car" not in formula:
        return False
    try:
        return bool(parse_formula(formula, binomial_counts=True, random_optional=True).spatial)
    except FormulaError:
        return False


def call_arguments(text: str, name: str) -> list[list[str]]:
    """Each call of ``name`` in formula ``text`` (formulae's dialect): its top-level arguments' texts (brackets and
    quotes balanced, :func:`_scan_top_level`)."""
    out = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(name)}\s*\(", text):
        rest = text[match.end() - 1:]
        end = next((i for i, ch, depth in _scan_top_level(rest) if ch == ")" and depth == 0), len(rest))
        out.append([piece.strip() for _, piece in _split_top_level(rest[1:end], ",")])
    return out


def made_by(name: str, calls) -> bool:
    """Whether a design's column (or term, response, offset) ``name`` holds a call of ``calls`` (the names of
    :func:`~hierpool.spec.transforms.stateful_calls` or :func:`~hierpool.spec.transforms.unvouched_calls`):
    ``scale(x)``, ``scale(x):f[b]``, ``r_scale(x)`` of a random term's formulae text.  (A name that merely
    contains another, ``rescale(x)`` for ``scale``, is taken too: a batch then takes a column's values from each
    dataset's own design where it need not.)"""
    return any(f"{call}(" in name for call in calls)
