"""Errors raised by hierpool.

Every problem with what a user passed is reported as a :class:`HierpoolError`
(or a subclass) whose message names the column, term or argument at fault.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import numpy as np


class HierpoolError(Exception):
    """Base class of every error hierpool raises on purpose."""


class FormulaError(HierpoolError, ValueError):
    """The model formula cannot be parsed or does not describe a mixed model."""


class DataError(HierpoolError, ValueError):
    """The data do not fit the formula: missing columns, bad values, too few levels."""


class ArgumentError(HierpoolError, ValueError):
    """A keyword argument has an invalid value."""


def integer_argument(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or an :class:`ArgumentError` naming ``name`` when it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def real_argument(name: str, value, above: float | None = None, below: float | None = None,
                  at_least: float | None = None, rule: str | None = None) -> float:
    """``value`` as a finite float, strictly above ``above`` and below ``below`` (or >= ``at_least``), else an
    :class:`ArgumentError` naming ``name`` and ``rule`` (a NaN or a string would pass on and come out as a NaN or a
    TypeError).  ``rule`` words the requirement where the default wording would not say what the number is."""
    if isinstance(value, np.ndarray) and value.ndim == 0:  # a NumPy scalar array, as a computed value may be
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    ok = ok and (at_least is None or value >= at_least)
    if not ok:
        if rule is None and above is not None and below is not None:
            rule = f"a number between {above:g} and {below:g}"
        elif rule is None and above is not None:
            rule = f"a finite number > {above:g}"
        elif rule is None and at_least is not None:
            rule = f"a finite number >= {at_least:g}"
        elif rule is None:
            rule = "a finite number"
        raise ArgumentError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def optional_boolean_argument(name: str, value) -> bool | None:
    """``value`` as None, True or False (``progress=``: None for "when stderr is a terminal"), or an
    :class:`ArgumentError` naming ``name`` (``"yes"`` or ``"no"`` would be truthy alike)."""
    return None if value is None else boolean_argument(name, value)


def boolean_argument(name: str, value) -> bool:
    """``value`` as a bool, or an :class:`ArgumentError` naming ``name`` when it is not True or False (a string
    such as ``"False"`` or ``"ML"`` would be truthy, and silently the other model)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be True or False, got {value!r}")
    return bool(value)


#: Seeds are integers below 2^62: JAX's ``PRNGKey`` takes a signed 64-bit one, and the batches add offsets to it
#: (``hp.bayes_batch``'s dataset d of a relationship or spatial model is sampled with seed + d).
SEED_LIMIT = 2**62


def seed_argument(value, optional: bool = False) -> int | None:
    """``value`` as a random seed (an int in [0, :data:`SEED_LIMIT`)), None where ``optional`` and it is None; else an
    :class:`ArgumentError` naming ``seed`` (NumPy's and JAX's own errors name neither the argument nor the rule)."""
    if value is None and optional:
        return None
    seed = integer_argument("seed", value, minimum=0)
    if seed >= SEED_LIMIT:
        raise ArgumentError(f"seed must be an integer below 2**62, got {value!r}")
    return seed


class ConvergenceError(HierpoolError, RuntimeError):
    """The optimizer could not produce a usable fit."""


class HierpoolWarning(UserWarning):
    """Base class of hierpool's warnings (dropped rows, aliased columns, convergence)."""


class ConvergenceWarning(HierpoolWarning):
    """The fit converged on a boundary or the convergence checks raised a concern."""


#: This package's directory: frames whose file lies in it are hierpool's own (:func:`warn_at_caller`).
_PACKAGE_DIRECTORY = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = HierpoolWarning) -> None:
    """``warnings.warn`` pointed at the line that called hierpool: the frame just outside the outermost hierpool frame
    on the stack, however deep the call (a fixed ``stacklevel`` points inside the package when the same check is
    reached through one more frame: ``hp.lmm`` through ``MixedModel``, say)."""
    frame, level, outermost = sys._getframe(1), 1, 1
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
            outermost = level
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=outermost + 2)
