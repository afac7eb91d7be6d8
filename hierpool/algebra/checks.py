"""Checks of a fitted theta that every engine applies the same way.

:func:`singular_rows` is lme4's ``isSingular`` rule (some diagonal element of some
relative factor T_j below a tolerance), vectorized over leading (dataset) axes:
``hp.fit_batch`` applies it to every dataset of a batch at once, and the closed
form's single-fit check (:func:`hierpool.closedform.optimize.is_singular`) is its
case of one theta.  :func:`onto_boundary` sets such elements to 0 where the criterion allows, for the batch's
searches and ``hp.lmm``'s alike.  :func:`reproduced_to_rounding` and :func:`fits_to_rounding` say where a fit's
response is reproduced to rounding (by the fixed and random effects at the fit, or by X alone), so that its criterion
is made of rounding noise.
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


#: :func:`onto_boundary`'s allowance: how far above the criterion where a search stopped (relative, at least 1) its
#: value on lme4's boundary may be for the boundary to be taken.  The batch's searches stop where the decrease still
#: promised is below 1e-10 (``search.newton.DECREASE_TOL``); at a boundary optimum the step left is ~1e-6 in theta,
#: whose criterion differs from the boundary's by ~1e-12, while a variance truly inside (above SINGULAR_TOL) rises
#: far more.
BOUNDARY_RISE = 1e-11


def near_boundary(theta: np.ndarray, objective: np.ndarray, ks, tol: float = SINGULAR_TOL) -> np.ndarray:
    """(B,) bool: the fits :func:`onto_boundary` evaluates, those with a finite ``objective`` and a diagonal of some
    T_j in (0, ``tol``) (``theta`` (B, n_theta), canonical)."""
    theta = np.asarray(theta)
    diagonal = theta[:, diagonal_mask(tuple(ks))]
    return ((diagonal > 0) & (diagonal < _per_row(tol))).any(axis=1) & np.isfinite(objective)


def _per_row(tol):
    """A tolerance (a float, or one per fit (B,)) against a (B, diagonals) array."""
    tol = np.asarray(tol, dtype=float)
    return tol[:, None] if tol.ndim else tol


def onto_boundary(theta: np.ndarray, objective: np.ndarray, evaluate, ks, tol: float = SINGULAR_TOL):
    """(theta, objective) of fits with each one's diagonals of T_j below ``tol`` (lme4's ``isSingular`` tolerance)
    set to 0, where the criterion there is at most :data:`BOUNDARY_RISE` (relative) above where the search stopped;
    the criterion moves by the difference.

    The batch's Newton searches run on unbounded theta (a zero variance is an inner point,
    :mod:`hierpool.algebra.search.newton`) and stop within their tolerance of it: a diagonal of 1e-6 or 1e-9 where
    lme4's bobyqa ends at exactly 0, the same criterion to 1e-10 (Dyestuff2's bootstrap replicates: 98 of 200
    singular, none of them exactly 0; the forty-second session's probe); ``hp.lmm``'s L-BFGS-B and Newton polish
    left 1e-12 to 1e-10 on some.  Both engines end here (hp.lmm, hp.glmm's Laplace fits, the batch's host
    searches, AR(1)'s among them (:func:`hierpool.algebra.search.ar1_moments.at_boundary`), its compiled linear
    programs and, on the host after them, its compiled GLMM programs
    (``batch.fit_glmm.compiled_onto_boundary``)), so that a variance at the boundary is 0 in each; not yet the
    compiled AR(1) programs, whose modes and BLUPs are computed inside the program at the point its search ends.
    ``theta`` (B, n_theta) is canonical (diagonals >= 0); ``evaluate(thetas (A, n_theta), rows (A,))`` the
    criterion of fits ``rows`` (both points are evaluated by it, so that a compiled search's criterion, in its
    own precision, moves by the host's difference); ``tol`` a float or one per fit (B,).  Returns new arrays."""
    theta, objective = np.array(theta, dtype=float), np.array(objective, dtype=float)
    diagonal = diagonal_mask(tuple(ks))
    small = (theta[:, diagonal] > 0) & (theta[:, diagonal] < _per_row(tol))
    rows = np.flatnonzero(near_boundary(theta, objective, ks, tol))
    if not rows.size:
        return theta, objective
    snapped = theta[rows]
    snapped[:, diagonal] = np.where(small[rows], 0.0, snapped[:, diagonal])
    with np.errstate(all="ignore"):
        there = np.asarray(evaluate(snapped, rows), dtype=float)
        here = np.asarray(evaluate(theta[rows], rows), dtype=float)
    rise = there - here
    take = np.isfinite(rise) & (rise <= BOUNDARY_RISE * np.maximum(1.0, np.abs(here)))
    theta[rows[take]] = snapped[take]
    objective[rows[take]] += rise[take]
    return theta, objective


def lme4_gradient_measure(hessian: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """lme4's ``check.conv.grad`` measure of each component of a gradient at an optimum: min(|g_i|, |(R^-1 g)_i|),
    H = R^T R the Hessian's Cholesky factor (lme4's ``solve(chol(Hessian), gradient)``: the gradient in the units of
    the criterion's curvature, unchanged by a covariate's scale); |g| where H has no Cholesky factor (lme4: "unable
    to evaluate scaled gradient").  ``hp.lmm``'s and ``hp.glmm``'s convergence checks; the components at a bound are
    the caller's to leave out, as lme4 does."""
    g = np.asarray(gradient, dtype=float)
    hessian = np.asarray(hessian, dtype=float)
    if not np.all(np.isfinite(hessian)):  # (NumPy's Cholesky does not refuse NaN: its NaN measure passed the check)
        return np.abs(g)
    try:
        lower = np.linalg.cholesky(hessian)  # H = L L^T: lme4's chol(H) is L^T
    except np.linalg.LinAlgError:
        return np.abs(g)
    return np.minimum(np.abs(g), np.abs(np.linalg.solve(lower.T, g)))


#: The size of a response's weighted residual, relative to the response's weighted spread about its mean, up to which
#: X fits it to rounding: above it the shared path's criterion agreed with hp.lmm's to 4e-11 or better, below it
#: drifted to 1e-8 (the forty-seventh session's second review; :mod:`hierpool.batch.near_exact`).  The same bound,
#: relative to the variation X leaves (its residual from X's fit), says where the fixed and random effects together
#: reproduce a response (:func:`reproduced_to_rounding`).
NEAR_EXACT = 1e-8
#: The same, relative to the response's size: a response whose variation is at its rounding (1 and 1 + 1e-15).
AT_ROUNDING = 1e-14
#: A fit's residual (rms, unweighted) relative to the size of the terms it was computed from (rms of
#: max(|y_i|, sum_j |x_ij beta_j|), :func:`fit_magnitudes`), up to which it is their rounding: a noise-free response
#: beside a slope on a timestamp (|beta t| ~1.6e6) came back at sigma 2.5e-10 (0.7 eps of it), where 1e-8 of what X
#: leaves was 1e-10; beside a slope of 1e6, 0.16 eps; around 1e13, 0.25 eps (the fifty-ninth session's second
#: review).  Noise of ten units in the last place is fitted (the third review: the first bound, ten eps of |y| +
#: sum |x beta| weighted by the prior weights, refused 30 ulps, and 1000 ulps where weights spread 1e-4..1e4; the
#: fourth: at four eps, 10 ulps near the top of a binade, where an ulp is eps/2 of y, in groups of two rows, whose
#: effects take part of the noise, left 3.8 eps and were refused in 3 of 6 seeds).
FIT_ROUNDING = 2 * float(np.finfo(float).eps)
#: The most of what X leaves (its rms) that such a residual may be: a response whose whole variation is at its
#: rounding (1 and 1 + 1e-15), which the random effects do not reduce, is data of its own (fitted), not one they
#: reproduce.
ROUNDING_SHARE = 1e-2


def fits_to_rounding(residual_squares: np.ndarray, spread_squares: np.ndarray, size_squares: np.ndarray) -> np.ndarray:
    """Whether X fits each response to rounding, from its weighted sums of squares: r'Wr of its residual from X's
    fit, (y - ybar)'W(y - ybar) of its spread about its (weighted) mean, y'Wy of its size (y less any offset).

    .. math:: r'Wr \\le \\epsilon_1^2 (y - \\bar y)'W(y - \\bar y) \\quad\\text{or}\\quad r'Wr \\le \\epsilon_2^2 y'Wy,

    :math:`\\epsilon_1` = :data:`NEAR_EXACT`, :math:`\\epsilon_2` = :data:`AT_ROUNDING`.  Sums beyond a float
    (weights of 1e300) say nothing: such a response is not flagged (its fit's own checks speak for it).
    """
    finite = np.isfinite(residual_squares) & np.isfinite(spread_squares) & np.isfinite(size_squares)
    return finite & ((residual_squares <= NEAR_EXACT ** 2 * spread_squares)
                     | (residual_squares <= AT_ROUNDING ** 2 * size_squares))


def reproduced_to_rounding(residual_squares, left_by_x_squares, plain_residual_squares=np.inf,
                           magnitude_squares=0.0) -> np.ndarray:
    """Whether the fixed and random effects at a fit reproduce a response to rounding: r'Wr, the residual at the
    fit, within :data:`NEAR_EXACT` of the variation X leaves (``left_by_x_squares``, the weighted squares of the
    residual from X's least-squares fit; a spread about the mean would count what X explains, and refused a slope
    of 1e6 beside group effects of sd 1e-2 and noise of 1e-3: the fifty-ninth session's review), or within
    :data:`FIT_ROUNDING` of the terms it was computed from (``plain_residual_squares`` r'r against
    ``magnitude_squares``, both unweighted: each row's rounding is its own, whatever its weight), below which it is
    their rounding (a noise-free response around 1e13 left its storage rounding, sigma 5.6e-4; one beside a slope on
    a timestamp, X beta's, sigma 2.5e-10), where it is also at most :data:`ROUNDING_SHARE` of what X leaves.  Sums
    beyond a float say nothing (False)."""
    residual_squares = np.asarray(residual_squares)
    left_by_x_squares, magnitude_squares = np.asarray(left_by_x_squares), np.asarray(magnitude_squares)
    plain_residual_squares = np.asarray(plain_residual_squares)
    finite = np.isfinite(residual_squares) & np.isfinite(left_by_x_squares)
    at_rounding = (np.isfinite(magnitude_squares) & np.isfinite(plain_residual_squares)
                   & (plain_residual_squares <= FIT_ROUNDING ** 2 * magnitude_squares))
    return finite & ((residual_squares <= NEAR_EXACT ** 2 * left_by_x_squares)
                     | (at_rounding & (residual_squares <= ROUNDING_SHARE ** 2 * left_by_x_squares)))


def fit_magnitudes(y: np.ndarray, X: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Each row's max(|y_i|, sum_j |x_ij beta_j|): the size of the terms a fit's residual y - X beta - Z b is computed
    from, whose rounding it cannot go below (:func:`reproduced_to_rounding`; the larger, not the sum: y and X beta
    cancel, and the sum counted the response twice).  ``beta`` (p,) with ``X`` (n, p), or per row (n, p) (a long
    frame's datasets' own); with ``y`` (n, D), D responses on one X (a shared design's), (D, p), and the result
    (n, D)."""
    beta, y = np.asarray(beta, dtype=float), np.asarray(y)
    if y.ndim == 2:
        products = np.abs(X) @ np.abs(beta).T
    elif beta.ndim == 1:
        products = np.abs(X) @ np.abs(beta)
    else:
        products = np.einsum("np,np->n", np.abs(X), np.abs(beta))
    return np.maximum(np.abs(y), products)
