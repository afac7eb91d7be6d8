"""The names a formula can call, and where they are looked up.

formulae evaluates each call in a formula (``log(x)``, ``np.log(x)``, ``my_fun(x)``)
in an environment.  hierpool's is, in order of precedence:

1. formulae's own transforms and encodings (``C``, ``center``, ``poly``,
   ``offset``...), which formulae always puts first;
2. the namespace of the code that called hierpool (its locals, then globals), so a
   user's own functions and modules (``np``) resolve as formulae and bambi resolve
   them;
3. the names an lme4 user types, with R's meaning (:data:`R_FUNCTIONS`): ``log``,
   ``exp``, ``sqrt``, ``abs``... and R's ``scale`` (:class:`RScale`).

formulae's ``scale`` divides by the n-denominator standard deviation; R's by the
n - 1 one, which moves lme4's REML criterion in the fourth significant digit of a
model such as ``Reaction ~ scale(Days) + (scale(Days) | Subject)``.  The formula
text therefore calls ``r_scale`` (see :func:`hierpool.spec.formula.to_formulae`),
a stateful transform like formulae's: new data are scaled with the fitted data's
mean and sd.
"""

from __future__ import annotations

import re
import sys

import numpy as np
from formulae.categorical import ENCODINGS, ContrastMatrix, Encoding
from formulae.environment import Environment
from formulae.transforms import TRANSFORMS

from .formula import POLY_CONTRAST_NAME, R_SCALE_NAME


class RScale:
    """R's ``scale(x)``: (x - mean) / sd with the n - 1 sd, remembering both for new data."""

    __stateful_transform__ = True  # formulae keeps one instance per call and reuses it on new data

    def __init__(self):
        self.mean = None
        self.sd = None

    def __call__(self, x):
        if self.mean is None:
            values = np.asarray(x, dtype=float)
            self.mean = float(np.mean(values))
            self.sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        return (x - self.mean) / self.sd


def polynomial_contrasts(n_levels: int) -> np.ndarray:
    """R's ``contr.poly(n)``: (n, n - 1) orthonormal polynomial contrasts of the scores 1..n (``make.poly``: the
    columns of Q diag(R) of the QR of the centred scores' powers, normalized; linear, quadratic, ... after the
    constant)."""
    scores = np.arange(1.0, n_levels + 1)
    powers = (scores - scores.mean())[:, None] ** np.arange(n_levels)[None, :]
    q, r = np.linalg.qr(powers)
    raw = q * np.diag(r)[None, :]  # the sign of R's: unique whatever the QR's sign convention
    return (raw / np.linalg.norm(raw, axis=0))[:, 1:]


def polynomial_labels(n_levels: int) -> list[str]:
    """R's names of ``contr.poly``'s columns: ``.L``, ``.Q``, ``.C``, then ``^4``, ``^5``..."""
    return [".L", ".Q", ".C", *(f"^{j}" for j in range(4, n_levels))][: n_levels - 1]


class ContrPoly(Encoding):
    """R's ``contr.poly`` as a formulae encoding (``C(f, contr_poly)``): the contrasts R gives an ordered factor.
    Without an intercept to span (``0 + f``) every level has its column, as R's model.matrix does."""

    def code_with_intercept(self, levels):
        return ContrastMatrix(np.eye(len(levels)), [str(level) for level in levels])

    def code_without_intercept(self, levels):
        return ContrastMatrix(polynomial_contrasts(len(levels)), polynomial_labels(len(levels)))


#: R functions by their R names (natural ``log``, as R), available in every formula.
R_FUNCTIONS = {
    "log": np.log,
    "log2": np.log2,
    "log10": np.log10,
    "log1p": np.log1p,
    "exp": np.exp,
    "expm1": np.expm1,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "pi": np.pi,
    R_SCALE_NAME: RScale,
    # R's factor(x): formulae's C(x), a categorical of the sorted values (numbers numerically, as R); R's logical
    # constants, as in poly(x, 2, raw = TRUE) (else read as a column named TRUE)
    "factor": TRANSFORMS["C"],
    "TRUE": True,
    "FALSE": False,
    POLY_CONTRAST_NAME: ContrPoly,
}


#: Names formulae itself defines in every formula (``C``, ``Sum``, ``center``, ``poly``...).
FORMULAE_NAMES = frozenset(TRANSFORMS) | frozenset(ENCODINGS) | {POLY_CONTRAST_NAME}


class SharedNamespace(dict):
    """A formula namespace that a copy of a term shares, not copies: formulae deep-copies the terms of an interaction
    without its main effects (``C(f, contr_poly):g``, ``s:C(xb)``), namespaces and all, which failed on the caller's
    modules ("cannot pickle 'module' object").  The namespaces are only read."""

    def __deepcopy__(self, memo):
        return self


def caller_environment() -> Environment:
    """The formula environment of the first calling frame outside the hierpool package (a snapshot of its names)."""
    frame = sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "hierpool":
        frame = frame.f_back
    namespaces = [] if frame is None else [frame.f_locals, frame.f_globals]
    return Environment([SharedNamespace(namespace) for namespace in (*namespaces, R_FUNCTIONS)])


#: Transforms whose result depends on the whole column they are fitted on (a mean, an sd, a basis).
STATEFUL_NAMES = frozenset(k for k, v in TRANSFORMS.items() if getattr(v, "__stateful_transform__", False)) | {
    R_SCALE_NAME
}


#: Calls hierpool vouches compute a row's value from that row alone: R's functions (not R's scale), formulae's
#: transforms that are not stateful (``C``, ``I``, ``offset``...), and R's spellings a formula may use.
ROWWISE_NAMES = (frozenset(R_FUNCTIONS) | frozenset(TRANSFORMS) | frozenset(ENCODINGS) | {"cbind", "factor"}) \
    - STATEFUL_NAMES
#: NumPy's functions of each element alone that are not ufuncs (``np.where``, ``np.clip``...).
NUMPY_ELEMENTWISE = frozenset({"where", "clip", "round", "around", "isin", "nan_to_num", "real", "imag"})

_CALL = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)\s*\(")


def unvouched_calls(formula: str) -> list[str]:
    """The calls of ``formula`` hierpool cannot vouch compute a row from that row alone (:data:`ROWWISE_NAMES`, or
    NumPy's ufuncs as ``np.log1p``): a user's function (``demean(x)``: x - mean(x) over the column it is given), a
    method (``x.mean()``), another module's function.  Stateful transforms are :func:`stateful_calls`'."""
    from .formula import to_formulae

    out = set()
    for name in _CALL.findall(to_formulae(formula)):
        module, _, last = name.rpartition(".")
        numpy = module in ("np", "numpy") and (isinstance(getattr(np, last, None), np.ufunc) or last in NUMPY_ELEMENTWISE)
        vouched = name in ROWWISE_NAMES or numpy
        if not vouched and name not in STATEFUL_NAMES:
            out.add(name)
    return sorted(out)


_NAME = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)(?![\w.])(?!\s*=(?!=))")  # an identifier, not a keyword (type=)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: Names a formula may use that are hierpool's own or formulae's, not the caller's: R's functions, formulae's
#: transforms and encodings, hierpool's spatial term and R's ``cbind``.
OWN_NAMES = frozenset(R_FUNCTIONS) | FORMULAE_NAMES | {"car", "cbind", "True", "False", "None"}


def caller_names(formula: str, columns) -> list[str]:
    """The names ``formula`` reads from the code that called hierpool (:func:`caller_environment`): those that are
    neither a column of ``columns`` nor hierpool's or formulae's own (:data:`OWN_NAMES`), a module's first part
    (``np`` of ``np.sin``) included.  A fit that runs where that code's frame is not on the stack (a worker process,
    a pool's thread) cannot resolve them: the batch paths that send fits there run them here where this is not
    empty.  Keywords (``type='bym2'``) and quoted text are not names."""
    from .formula import to_formulae

    known = OWN_NAMES | {str(column) for column in columns}
    names = _NAME.findall(_QUOTED.sub("''", to_formulae(formula)))
    return sorted({name for name in names if name not in known and name.split(".")[0] not in known})


def stateful_calls(formula: str) -> list[str]:
    """Names of the stateful transforms (``scale``, ``center``, ``poly``, splines...) a formula calls, and
    ``binary`` where a call of it names no ``success`` (formulae's binary(f) then takes the first of the sorted
    values of the whole column it is given: a batch's datasets stacked chose another level than a dataset's own)."""
    from .formula import call_arguments, display_name, to_formulae

    text = to_formulae(formula)
    found = [name for name in sorted(STATEFUL_NAMES) if re.search(rf"(?<![\w.]){name}\s*\(", text)]
    if any(len(arguments) == 1 for arguments in call_arguments(text, "binary")):  # (no success, by name or place)
        found.append("binary")
    return sorted({display_name(f"{name}(").rstrip("(") for name in found})
