"""Fits whose residual variance went to zero, refused by name.

A response that the fixed and random effects reproduce exactly (noise-free data) has no optimum: the profiled
criterion falls without end as theta grows and sigma goes to zero.  Where a search stops on it is decided by
rounding, so such a fit is refused (a :class:`~hierpool.errors.ConvergenceError` that says so), whichever way it
shows: a system that no longer factors at the search's end (:func:`solved_or_refused`), or a solution that
reproduces the response to rounding (:func:`refuse_if_reproduced`, the deterministic check; ``hp.lmm``'s fits with
independent and with AR(1) residuals).
"""

from __future__ import annotations

import numpy as np

from ..algebra.checks import NEAR_EXACT, fit_magnitudes, reproduced_to_rounding
from ..algebra.laplace import random_part
from ..algebra.system import location_shift
from ..errors import ConvergenceError
from ..spec.design import Design


def residual_vanished(theta, how: str) -> ConvergenceError:
    """The refusal of a fit whose residual variance went to zero at ``theta`` (the user's, for the message),
    ``how`` saying how that showed."""
    shown = np.array2string(np.asarray(theta, dtype=float), precision=3)
    return ConvergenceError(
        f"the residual variance went to zero at theta = {shown} (the random effects' covariance factors relative to "
        f"the residual sd): {how}.  Does the formula reproduce the response exactly (no residual noise left)?")


def solved_or_refused(solve, theta):
    """``solve()``, the solution at the optimum, or a :class:`~hierpool.errors.ConvergenceError` where its system
    does not factor (NumPy's LinAlgError escaped) or its sigma or beta come out not finite (a factor holding NaN,
    which LAPACK did not refuse): a search run off to a huge ``theta`` (the user's, for the
    message), the residual sd near zero, as for a response the fixed and random effects reproduce exactly."""
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # (not finite: refused below)
            solution = solve()
        # (a factor that holds NaN where LAPACK did not refuse it is the same failure: never a NaN sigma returned;
        # not the covariance of beta, which overflows on its own where y is near 1e149 and two columns nearly alias)
        if not all(np.all(np.isfinite(np.asarray(value, dtype=float))) for value in (solution.sigma, solution.beta)):
            raise np.linalg.LinAlgError
        if not np.all(np.asarray(solution.sigma, dtype=float) > 0):
            # (its penalized residual sum of squares rounded to 0: sigma 0 and a criterion of -inf were returned,
            # REML, 10 ulps of noise beside group effects 1e8 times larger; the fourth review)
            raise np.linalg.LinAlgError
        return solution
    except np.linalg.LinAlgError:
        raise residual_vanished(theta, "the search ran off to where its system no longer factors") from None


def refuse_if_reproduced(design: Design, solution, theta, left_by_x: float | None = None) -> None:
    """Refuse (:func:`residual_vanished`) a fit whose fixed and random effects reproduce the response to rounding
    (:func:`~hierpool.algebra.checks.reproduced_to_rounding`: r'Wr <= (1e-8)^2 r_X'W r_X, r the residual
    y - offset - X beta - Z b at the fit and r_X the residual from X's least-squares fit; or r, unweighted, within
    two eps of the terms it is computed from, :func:`~hierpool.algebra.checks.fit_magnitudes`, and at most 1e-2 of
    r_X).  Such a response
    (noise-free data) has no minimum: the criterion falls without end as theta grows and the residual variance goes
    to zero.  Where the search stopped on it was decided by rounding: its system failed to factor there (refused),
    or factored, and the fit came back at sigma ~1e-8, converged or not, by the sums' last digits
    (``y ~ x + (1 | g)``, 50 noise-free rows, seeds 1-11: 9 refused, the rest fitted at sigma 4e-9 to 1.7e-8,
    before this rule).  Noise of more than 1e-8 of what X leaves, and above a few units in the last place of those
    terms, is fitted.  Not with known residual sds (sigma is not estimated: a small residual is no limit).
    ``left_by_x``: r_X'W r_X where the caller has it (a design's system holds it as its last cross-product,
    :func:`hierpool.algebra.system.build_system`'s y column); else X's least-squares fit is computed here."""
    if design.sigma_known:
        return
    weights = design.row_weights
    target = design.y_less_offset
    beta = np.asarray(solution.beta, dtype=float)
    residual = target - design.X @ beta - random_part(design, solution.b)
    with np.errstate(over="ignore", invalid="ignore"):
        here = float(np.sum(weights * residual * residual))
        if left_by_x is None:
            shifted = location_shift(design)[1]
            left_by_x = float(np.sum(weights * shifted * shifted))
        plain, magnitude = (float(np.sum(values * values)) for values in (
            residual, fit_magnitudes(design.y, design.X, beta)))
    if not reproduced_to_rounding(here, left_by_x, plain, magnitude):
        return
    if here <= NEAR_EXACT ** 2 * left_by_x:
        how = f"{np.sqrt(here / left_by_x) if left_by_x > 0 else 0.0:.1g} of the variation the fixed effects leave"
    else:
        how = "the rounding of the terms it is computed from"
    raise residual_vanished(theta, f"the fixed and random effects reproduce the response to {how}")
