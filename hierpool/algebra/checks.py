"""Checks of a fitted theta that every engine applies the same way.

:func:`singular_rows` is lme4's ``isSingular`` rule (some diagonal element of some
relative factor T_j below a tolerance), vectorized over leading (dataset) axes:
``hp.fit_batch`` applies it to every dataset of a batch at once, and the closed
form's single-fit check (:func:`hierpool.closedform.optimize.is_singular`) is its
case of one theta.
"""

from __future__ import annotations

import numpy as np

from .linalg import tril_positions

#: lme4's ``isSingular`` tolerance (its default ``tol = 1e-4``): ``hp.lmm``'s ``Control.singular_tol`` and the batch's.
SINGULAR_TOL = 1e-4


def diagonal_mask(ks: tuple[int, ...]) -> np.ndarray:
    """Which entries of theta (the terms' lower triangles, column-major, concatenated) are diagonals of a T_j."""
    return np.concatenate([rows == cols for rows, cols in (tril_positions(k) for k in ks)])


def singular_rows(theta, ks: tuple[int, ...], tol: float) -> np.ndarray:
    """lme4's ``isSingular`` for each row of ``theta`` (..., sum k_j(k_j+1)/2): some diagonal of some T_j below ``tol``.

    A theta of one fit (a vector) gives a 0-d boolean array; NaN thetas (no fit) are not singular.
    """
    theta = np.asarray(theta)
    return np.any(theta[..., diagonal_mask(ks)] < tol, axis=-1)


def fitted_singular(objective, theta, ks: tuple[int, ...], tol: float = SINGULAR_TOL) -> np.ndarray:
    """:func:`singular_rows` of the rows that were fitted (a finite ``objective``): a batch's ``is_singular``,
    ``hp.lmm``'s rule and tolerance on each dataset's canonical theta (diagonals >= 0); a row with no fit is not
    singular."""
    return np.isfinite(objective) & singular_rows(theta, ks, tol)
