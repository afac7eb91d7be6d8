"""Checks of the validation helpers' arguments: each refuses a bad value with an :class:`ArgumentError` naming it."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import ArgumentError, integer_argument


def real_argument(name: str, value, above: float | None = None, below: float | None = None,
                  at_least: float | None = None) -> float:
    """``value`` as a finite float, strictly above ``above`` and below ``below`` (or >= ``at_least``), else an
    :class:`ArgumentError` naming ``name`` (a NaN or a string would pass on and come out as a NaN or a TypeError)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    ok = ok and (at_least is None or value >= at_least)
    if not ok:
        if above is not None and below is not None:
            rule = f"a number between {above:g} and {below:g}"
        elif above is not None:
            rule = f"a finite number > {above:g}"
        elif at_least is not None:
            rule = f"a finite number >= {at_least:g}"
        else:
            rule = "a finite number"
        raise ArgumentError(f"{name} must be {rule}, got {value!r}")
    return float(value)


def generator_argument(value, name: str = "rng") -> np.random.Generator:
    """``value`` when it is a NumPy Generator, else an :class:`ArgumentError` naming ``name``."""
    if not isinstance(value, np.random.Generator):
        raise ArgumentError(f"{name} must be a numpy.random.Generator (np.random.default_rng(seed)), "
                            f"got {type(value).__name__}")
    return value


def instance_argument(name: str, value, types, what: str):
    """``value`` when it is an instance of ``types``, else an :class:`ArgumentError` naming ``name`` and ``what``."""
    if not isinstance(value, types):
        raise ArgumentError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def callable_argument(name: str, value):
    """``value`` when it is callable, else an :class:`ArgumentError` naming ``name``."""
    if not callable(value):
        raise ArgumentError(f"{name} must be a callable, got {type(value).__name__}")
    return value


def sizes_argument(name: str, value, minimum: int = 1) -> list[int]:
    """``value`` as a non-empty list of integers >= ``minimum``, else an :class:`ArgumentError` naming ``name``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ArgumentError(f"{name} must be a sequence of integers >= {minimum}, got {value!r}")
    sizes = list(value)
    if not sizes:
        raise ArgumentError(f"{name} must hold at least one size, got {value!r}")
    return [integer_argument(f"{name}[{i}]", size, minimum=minimum) for i, size in enumerate(sizes)]


def replications_argument(n_reps) -> int:
    """``n_reps`` of a coverage study: an integer >= 2 (the Monte-Carlo error compares replications)."""
    n_reps = integer_argument("n_reps", n_reps)
    if n_reps < 2:
        raise ArgumentError(f"n_reps must be at least 2 (the Monte-Carlo error compares replications), got {n_reps!r}")
    return n_reps


def chains_argument(chains) -> int:
    """``chains`` of an agreement check: an integer >= 2 (R-hat compares chains)."""
    chains = integer_argument("chains", chains)
    if chains < 2:
        raise ArgumentError(f"chains must be at least 2 (R-hat compares chains), got {chains!r}")
    return chains
