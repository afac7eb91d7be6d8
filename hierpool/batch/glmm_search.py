"""The search of a GLMM batch's fits (``hp.fit_batch(..., family=)``): its rules, shared by the compiled and the host
paths of :mod:`hierpool.batch.fit_glmm`, and the host path's search of one chunk of datasets
(:func:`fit_chunk_on_host`).

Neither this module nor its imports load JAX: a host worker process (:mod:`hierpool.batch.host_processes`)
imports it to fit chunks beside the main process, in a fraction of the time JAX's import takes.
"""

from __future__ import annotations

import numpy as np

from ..algebra.checks import onto_boundary
from ..algebra.family import Family
from ..algebra.laplace_batch import (
    GroupedRows,
    conditional_modes,
    fixed_effects_curvature,
    laplace_and_gradient,
    solution_at_mode,
)
from ..algebra.linalg import array_namespace, block_diagonal_positions, block_diagonal_theta, cholesky, term_results
from ..algebra.linalg import canonical_theta as canonical_rows
from ..algebra.search.newton import DECREASE_TOL, newton_on_host
from ..algebra.search.terms import point_work

#: The Hessian's forward-difference width in (theta, beta): PIRLS's mode is exact to ~1e-10, so its gradient
#: is too, and sqrt(eps) (1.5e-8) differences would be half rounding.
FD_WIDTH = 1e-6
#: The relative Newton step, taken or the last quadratic model's, at which the search stops: the criterion is then
#: within ~1e-12 of its minimum (the decrease tolerance, :data:`hierpool.algebra.search.newton.DECREASE_TOL`, usually stops
#: it first).
STEP_TOL = 1e-7
#: The Levenberg-Marquardt shift's growth after a rejected trial that gives no interpolation (a non-finite step, or
#: a slope >= 0); the others set it from the trial (``interpolated_damping``).  From theta = I the Laplace deviance
#: is far from quadratic and the first full Newton step often overshoots: rejected trials per dataset were 0.78 on
#: --glmm-slopes and 0.58 on --glmm with a fixed 100x growth, and are 0.33 and 0.22 with the interpolation
#: (benchmarks/RESULTS.md, "The GLMM class, fifteenth session").
DAMPING_GROWTH = 100.0
#: :func:`hierpool.algebra.search.terms.point_work` from which a search of several terms has a secant update for its
#: curvature (``newton_on_host``'s ``secant``) rather than forward differences in theta about each accepted point,
#: the beta block approximated: each difference is a PIRLS solve and its gradient, whose dense rest (the terms
#: after the first) a point's cost grows with.  Ten GLMMs were timed either way (benchmarks/RESULTS.md,
#: twenty-fifth session): from 26,000 a point the updates repaid their 1.3 to 1.7 times the passes; from 5,600 to
#: 19,000 they did not beyond the machine's spread; one term (no dense rest) was even or slower, and a cbpp-shaped
#: batch gained a refit.
SECANT_MIN_WORK = 20_000


def placeholder_where_not(usable, matrices):
    """``matrices`` (..., m, m) with the identity in place of those not ``usable`` (...): a stack's inverse is then
    taken of matrices that have one, and the placeholders' results are discarded by the caller."""
    xp = array_namespace(matrices)
    return xp.where(usable[..., None, None], matrices, xp.eye(matrices.shape[-1], dtype=matrices.dtype))


def invertible(matrices):
    """(...) whether each of ``matrices`` (..., m, m) has an LU factorization with no zero pivot: the matrices whose
    inverse NumPy gives.  NumPy's ``inv`` of a stack raises ``LinAlgError`` for the whole stack when one of its
    matrices is exactly singular (JAX's gives that one inf/NaN): a perfectly separated binomial dataset's Hessian is
    rounding noise about 0 whose last bits depend on the datasets its chunk is stacked with, exactly singular beside
    some of them, and then stopped the whole batch.  ``slogdet`` factors as ``inv`` does, and gives sign 0 there."""
    xp = array_namespace(matrices)
    sign, _ = xp.linalg.slogdet(matrices)
    return sign != 0


def beta_covariance(curvature, value, n_theta: int, p: int):
    """beta's covariance from the last forward-difference Hessian H in the parameters (theta, beta[, log shape]):
    the beta block of (H_(theta, beta) / 2)^-1, the shape held (``hp.glmm``'s, lme4's ``vcov`` with
    ``use.hessian``).  NaN where the criterion is not finite (no step was ever taken: H is the search's
    placeholder), H is exactly singular, or that block is not positive definite (lme4 then falls back to R_X; here
    no number is given).  One dataset traced, or a stack (NumPy) on the host."""
    xp = array_namespace(curvature)
    stop = n_theta + p
    information = 0.5 * curvature[..., :stop, :stop]
    usable = xp.all(xp.isfinite(information), axis=(-2, -1)) & xp.isfinite(value)
    candidates = placeholder_where_not(usable, information)
    try:  # JAX gives an exactly singular matrix's inverse inf/NaN (not definite below); NumPy raises for the stack
        inverse = xp.linalg.inv(candidates)
    except np.linalg.LinAlgError:  # only then the stack is factored twice, to find which
        usable = usable & invertible(candidates)
        inverse = xp.linalg.inv(placeholder_where_not(usable, information))
    block = inverse[..., n_theta:stop, n_theta:stop]
    chol = cholesky(block)
    definite = (usable & xp.all(xp.isfinite(chol), axis=(-2, -1))
                & xp.all(xp.diagonal(chol, axis1=-2, axis2=-1) > 0, axis=-1))
    return xp.where(definite[..., None, None], block, xp.nan)


def fit_chunk_on_host(rows: GroupedRows, saturated: np.ndarray, start: np.ndarray, family: Family,
                      max_iterations: int, term_ks: tuple | None = None) -> dict:
    """A chunk's fits on the host: :func:`hierpool.algebra.search.newton.newton_on_host` (the compiled path's rules, width
    and tolerances; the beta block from :func:`hierpool.algebra.laplace_batch.fixed_effects_curvature` during the
    search, or, with several terms whose point costs :data:`SECANT_MIN_WORK` or more, secant updates of the
    curvature) on :func:`hierpool.algebra.laplace_batch.laplace_and_gradient`, every point of every dataset
    still searching evaluated at once; then each dataset's mode, conditional variances and vcov at its optimum, as
    :func:`hierpool.batch.fit_glmm`'s compiled program returns them.

    ``term_ks``: the rows' one term stands for terms of these widths on one grouping factor, its factor
    block-diagonal with theirs (:func:`hierpool.algebra.linalg.block_diagonal_positions`): the search runs in the
    terms' thetas (``start`` theirs), and each term's results are its block's."""
    p = rows.X.shape[1]
    ks = rows.ks if term_ks is None else tuple(term_ks)  # the search's terms
    n_theta = sum(k * (k + 1) // 2 for k in ks)
    merged = rows.ks != ks
    positions = block_diagonal_positions(ks) if merged else None

    def rows_theta(theta):  # the rows' terms' theta of the search's
        return block_diagonal_theta(theta, ks) if merged else theta

    def evaluate(points, active, start_u=None):
        count, copies, m = points.shape
        flat = points.reshape(count * copies, m)
        sub, _ = rows.subset(active)
        if start_u is not None:
            start_u = [np.repeat(x, copies, axis=0) for x in start_u]
        value, gradient, mode = laplace_and_gradient(rows_theta(flat[:, :n_theta]), flat[:, n_theta:],
                                                     sub.repeated(copies), family, np.repeat(saturated[active], copies),
                                                     start_u)
        if merged:  # the gradient in the terms' thetas: the one term's at their positions
            gradient = np.concatenate([gradient[:, positions], gradient[:, gradient.shape[1] - p:]], axis=1)
        return (value.reshape(count, copies), gradient.reshape(count, copies, m),
                [x.reshape((count, copies) + x.shape[1:]) for x in mode.u])

    # each dataset's mode at its current point: shift_gradients is called at every accepted point with its mode
    current_u = [np.zeros((len(start), width, k)) for (_, _, width), k in zip(rows.terms, rows.ks)]

    def trial_values(points, active):
        return evaluate(points, active, [u[active] for u in current_u])

    def shift_gradients(points, active, trial_u):
        for kept, u in zip(current_u, trial_u):
            kept[active] = u
        return evaluate(points, active, trial_u)[1] if points.shape[1] else np.zeros(points.shape)

    def beta_curvature(points, active, u):
        return fixed_effects_curvature(rows_theta(points[:, :n_theta]), points[:, n_theta:], rows.subset(active)[0],
                                       family, u)

    # PIRLS starts at a trial from the mode at the dataset's current point (u = 0 at the first), and at a shift (1e-6
    # away) from its trial's mode: PIRLS is Newton's method (algebra.laplace.newton_working), quadratic near the
    # mode, so that where it stops the mode is exact to rounding whatever its start.  On 300 datasets each of eight
    # GLMMs, trials from the current mode took 19-24% fewer PIRLS steps than from u = 0 (the compiled path's start),
    # and every criterion came within 2.5e-11 of theirs (benchmarks/RESULTS.md, "The GLMM class, sixteenth
    # session").  With Fisher scoring's linear convergence (lme4's PIRLS for a non-canonical link, and this path's
    # before the fourteenth session) a stopped mode kept part of its start's error: trials from the current mode
    # then made the criterion depend on the path to it, and searches stalled short of their optimum ("The GLMM
    # class on the host"), and polished shifts moved beta's standard errors by 1.6% ("fourteenth session")
    widths = [width for _, _, width in rows.terms]
    secant = len(rows.ks) > 1 and point_work(rows.ks, widths, p) >= SECANT_MIN_WORK
    with np.errstate(all="ignore"):
        params, value, newton_step, iterations, converged, curvature = newton_on_host(
            trial_values, start, max_iterations, damping_growth=DAMPING_GROWTH, fd_width=FD_WIDTH, step_tol=STEP_TOL,
            with_curvature=True, shift_gradients=shift_gradients, decrease_tol=DECREASE_TOL,
            interpolated_damping=True, trailing_curvature=beta_curvature if p and not secant else None, secant=secant)
    theta = canonical_rows(params[:, :n_theta], ks)
    beta = params[:, n_theta:]

    def deviance_at(points, active):  # at the datasets' own beta
        with np.errstate(all="ignore"):
            return evaluate(np.concatenate([points, beta[active]], axis=1)[:, None, :], active)[0][:, 0]

    theta, value = onto_boundary(theta, value, deviance_at, ks)  # a variance 1e-9 short of lme4's 0
    finite = np.isfinite(value)
    safe_theta = rows_theta(np.where(finite[:, None], theta, 1.0))
    mode = conditional_modes(safe_theta, np.where(finite[:, None], beta, 0.0), rows, family)
    with np.errstate(all="ignore"):
        solved = solution_at_mode(safe_theta, rows, mode)
        covariance = beta_covariance(curvature, value, n_theta, p)
    nan = lambda a: np.where(finite.reshape((-1,) + (1,) * (np.ndim(a) - 1)), a, np.nan)  # noqa: E731
    b, cond_var, factors = mode.b, [np.asarray(x) for x in solved.cond_var], [np.asarray(x) for x in solved.factors]
    if merged:  # each term's block of the one term's
        b, cond_var, factors = term_results(b[0], cond_var[0], factors[0], ks)
    return {"theta": nan(theta), "beta": nan(beta), "objective": np.where(finite, value, np.nan),
            "newton_step": newton_step, "iterations": iterations, "converged": converged & mode.converged & finite,
            "vcov": covariance, "b": [nan(x) for x in b], "cond_var": [nan(x) for x in cond_var],
            "factors": [nan(x) for x in factors]}
