"""Checks of the validation helpers' arguments: each refuses a bad value with an :class:`ArgumentError` naming it."""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError, integer_argument


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
