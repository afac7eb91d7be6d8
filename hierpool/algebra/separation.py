"""Separation: columns along which a GLM's likelihood rises without end (Albert & Anderson 1984).

A direction d != 0 *separates* the rows of columns Z when z_i d <= 0 on every row without events,
z_i d >= 0 on every binomial row with only successes, z_i d = 0 on every other row, and z_i d != 0
on some row: moving the coefficients along d raises the likelihood for ever, so the maximum-likelihood
estimate is infinite (complete or quasi-complete separation).  Found by a linear programme (Konis
2007; scipy's HiGHS), or directly for one column.  Used for each group's own coefficients by
``hp.pooling``'s no-pooling fits and for the fixed-effect columns of ``hp.glmm``.
"""

from __future__ import annotations

import numpy as np

#: How far from 0 a separating direction must move a row's linear predictor (columns scaled to max |z| = 1).
SEPARATION_TOL = 1e-9


def _row_kinds(y: np.ndarray, family_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows with no events, binomial rows with only successes)."""
    low = y <= 0
    high = (y >= 1) if family_name == "binomial" else np.zeros_like(low)
    return low, high


def separating_direction(z: np.ndarray, y: np.ndarray, family_name: str, fixed_zero=()) -> np.ndarray | None:
    """A direction d (in ``z``'s units, max |d_j| scaled = 1) that separates the rows, or None.

    Parameters
    ----------
    z : numpy.ndarray, shape (m, k)
        The columns, on the rows with positive prior weight.
    y : numpy.ndarray, shape (m,)
        The response as the family reads it (proportions for the binomial).
    family_name : str
        ``"binomial"`` or a count family (only rows without events bound d there).
    fixed_zero : iterable of int
        Columns held out of the direction (d_j = 0).
    """
    scale = np.max(np.abs(z), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = z / scale
    low, high = _row_kinds(y, family_name)
    mixed = ~(low | high)
    sign = np.where(high, 1.0, -1.0)
    fixed_zero = set(fixed_zero)
    if z.shape[1] == 1 and not fixed_zero:
        for d in (1.0, -1.0):
            moved = z[:, 0] * d
            if (np.all(sign[~mixed] * moved[~mixed] >= -SEPARATION_TOL)
                    and np.all(np.abs(moved[mixed]) <= SEPARATION_TOL) and np.any(np.abs(moved) > SEPARATION_TOL)):
                return np.array([d]) / scale
        return None
    from scipy.optimize import linprog

    bounded = ~mixed
    result = linprog(-(sign[bounded] @ z[bounded]), A_ub=-(sign[bounded, None] * z[bounded]) if bounded.any() else None,
                     b_ub=np.zeros(bounded.sum()) if bounded.any() else None,
                     A_eq=z[mixed] if mixed.any() else None, b_eq=np.zeros(mixed.sum()) if mixed.any() else None,
                     bounds=[(0.0, 0.0) if j in fixed_zero else (-1.0, 1.0) for j in range(z.shape[1])],
                     method="highs")
    if result.status == 0 and -result.fun > SEPARATION_TOL:
        return np.asarray(result.x) / scale
    return None


def separating_columns(z: np.ndarray, y: np.ndarray, family_name: str) -> list[int]:
    """A smallest-by-elimination set of columns that separate the rows (empty when none do).

    Starting from :func:`separating_direction`'s columns, each is held at zero in turn and left out
    for good if the others still separate: what remains are the columns a warning should name.
    """
    direction = separating_direction(z, y, family_name)
    if direction is None:
        return []
    involved = [j for j in range(z.shape[1]) if direction[j] != 0]
    held = {j for j in range(z.shape[1]) if direction[j] == 0}
    for j in list(involved):
        if len(involved) > 1 and separating_direction(z, y, family_name, held | {j}) is not None:
            held.add(j)
            involved.remove(j)
    return involved


def distinct_rows(a: np.ndarray) -> np.ndarray:
    """The distinct rows of a 2-d array, sorted lexicographically: ``np.unique(a, axis=0)`` by a lexsort of the
    columns rather than numpy's sort of a structured view of the rows, which costs many times more.

    Parameters
    ----------
    a : numpy.ndarray
        Shape (m, k).

    Returns
    -------
    numpy.ndarray
        Shape (distinct rows, k).
    """
    if a.shape[0] == 0:
        return a
    ordered = a[np.lexsort(a.T[::-1])]
    keep = np.concatenate([[True], np.any(ordered[1:] != ordered[:-1], axis=1)])
    return ordered[keep]


def is_separated(z: np.ndarray, y: np.ndarray, family_name: str) -> bool:
    """Whether some direction of the columns ``z`` separates the rows (:func:`separating_direction`)."""
    return separating_direction(z, y, family_name) is not None
