"""A vmappable optimizer for the one-term criterion: Newton's method with a modified Hessian.

The criterion has k(k+1)/2 parameters (3 for correlated slopes), so the exact
Hessian is cheap and Newton's method converges in a handful of steps.  Where the
Hessian is not positive definite the step uses H + mu I with mu from
Gershgorin's bound on its smallest eigenvalue (a Levenberg-Marquardt shift;
Nocedal & Wright 2006, sec. 3.4), so it always descends; the line search
evaluates a few step lengths at once and keeps the best (no data-dependent inner
loop: vmap runs every dataset in lockstep).  The Newton step's m x m systems
use JAX's (batched LAPACK) Cholesky: the unrolled kernels of :mod:`hierpool.algebra.linalg`
ran no faster here and cost more compilation (benchmarks/RESULTS.md, "Batch fitting,
fourth session"); the criterion itself keeps the unrolled kernels (LAPACK there ran
slower and changed its rounding).

theta is optimized without bounds: the criterion depends on Lambda only through
Lambda Lambda^T, which is unchanged when a column of Lambda changes sign, so a
boundary optimum (a zero variance) is an interior point in theta, where
Newton's method converges quadratically.  :func:`canonical_theta` then flips
columns so the diagonal is non-negative, lme4's convention.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..algebra.linalg import theta_to_factors, tril_positions
from ..algebra.one_term import objective
from ..algebra.start import moment_theta

STEP_LENGTHS = (1.0,)
GRADIENT_TOL = 1e-7


def _tolerances(dtype):
    """(forward-difference width, step tolerance, rounding step tolerance, convergence tolerances) for a dtype.

    float64: the Newton step (~ the distance to the optimum) to 1e-9 relative, or
    to 1e-6 where no step length lowers the criterion any more (it is flat to
    rounding there).  Converged when the final Newton step is below 1e-6, or when
    the decrease it predicts, g^T H^-1 g / 2, is below 1e-12 of the criterion:
    at a singular fit the criterion can be so flat along the boundary that rounding
    in the gradient leaves a Newton step of ~1e-6 that would lower it by ~1e-15
    relative (seen on 1 of 2,000 sleepstudy replicates).  float32 scales them
    with its machine epsilon.
    """
    eps = float(jnp.finfo(dtype).eps)
    converged = (max(1e-6, 100 * eps**0.5), max(1e-12, 100 * eps))
    return eps**0.5, max(1e-9, 10 * eps), max(1e-6, 30 * eps**0.5), converged
MAX_ITERATIONS = 60
#: Smallest Sigma / sigma^2 eigenvalue of a batch start (see :func:`moment_start`).
MOMENT_FLOOR = 1e-2


def start_theta(k: int, dtype=jnp.float64) -> jax.Array:
    """lme4's start: Lambda = I."""
    rows, cols = tril_positions(k)
    return jnp.asarray(rows == cols, dtype=dtype)


def moment_start(stats, sigma_known: bool = False) -> np.ndarray:
    """Starting thetas (B, k(k+1)/2) from per-level least squares, one per dataset of a batch (NumPy).

    The method of moments on the statistics alone (:func:`hierpool.algebra.start.moment_theta`,
    the closed form's ANOVA start for any k): beta from OLS, then each level's own
    regression on the residuals, the eigenvalues of Sigma / sigma^2 clipped to [1e-2, 1e4].
    Datasets with fewer than k + 1 usable levels start at lme4's identity.  Only a
    start: Newton's method takes it to the same optimum as from the identity, in fewer
    iterations (2,000 sleepstudy-shaped datasets: 3.2 on average instead of 11.1, at
    most 16 instead of 59).  The floor keeps the start off the boundary: from a
    near-singular Lambda (a floor of 1e-4, the closed form's) two of those datasets did
    not converge in 60 iterations.  With known residual sds (``sigma_known``) every dataset
    starts at the identity, as ``hp.lmm``'s fits with ``se=`` do
    (:func:`hierpool.closedform.optimize.moment_start`).
    """
    if sigma_known:
        rows, cols = tril_positions(stats.ztz.shape[-1])
        return np.tile((rows == cols).astype(float), (stats.n.shape[0], 1))
    ztz, ztx, zty = np.asarray(stats.ztz), np.asarray(stats.ztx), np.asarray(stats.zty)
    xtx, xty, yty = np.asarray(stats.xtx), np.asarray(stats.xty), np.asarray(stats.yty)
    beta = np.linalg.solve(xtx, xty[..., None])[..., 0]
    cross = zty - np.einsum("blkp,bp->blk", ztx, beta)  # Z_l^T (y - X beta)
    rss = yty - 2 * np.einsum("bp,bp->b", beta, xty) + np.einsum("bp,bpq,bq->b", beta, xtx, beta)
    return moment_theta(ztz, cross, rss, np.asarray(stats.n), p=xtx.shape[-1], floor=MOMENT_FLOOR)


def canonical_theta(theta: jax.Array, ks) -> jax.Array:
    """Flip columns of each term's Lambda_j so that its diagonal is non-negative (the same Sigma_j).

    ``ks``: the terms' widths (an int for one term).  The traced counterpart of
    :func:`hierpool.algebra.linalg.canonical_theta`.
    """
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    out = []
    for k, lam in zip(ks, theta_to_factors(theta, ks)):
        lam = lam * jnp.where(jnp.diagonal(lam) < 0, -1.0, 1.0)[None, :]
        rows, cols = tril_positions(k)
        out.append(lam[rows, cols])
    return jnp.concatenate(out)


def _solve_spd(matrix, vector):
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(matrix), True), vector)


def _definite_shift(hessian):
    """0 where the Hessian is positive definite, else a shift that makes it so (Gershgorin)."""
    chol = jnp.linalg.cholesky(hessian)
    definite = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    gershgorin = jnp.min(2 * jnp.diagonal(hessian) - jnp.sum(jnp.abs(hessian), axis=1))
    return jnp.where(definite, 0.0, jnp.maximum(0.0, -gershgorin))


def _probe(value_and_grad, points, width):
    """Value, gradient and forward-difference Hessian of f at each point, in one vmapped gradient call.

    Differencing the exact gradient costs m extra gradients per point and, unlike
    ``jax.hessian``, adds no second derivative program to compile (which made the
    program much longer to compile: benchmarks/RESULTS.md, "Measurements the code cites").
    """
    m = points.shape[-1]
    steps = width * (1 + jnp.abs(points))  # (P, m)
    shifted = points[:, None, :] + jnp.eye(m, dtype=points.dtype)[None] * steps[:, None, :]
    every = jnp.concatenate([points[:, None, :], shifted], axis=1).reshape(-1, m)
    values, gradients = jax.vmap(value_and_grad)(every)
    values = values.reshape(-1, m + 1)[:, 0]
    gradients = gradients.reshape(-1, m + 1, m)
    hessians = (gradients[:, 1:, :] - gradients[:, :1, :]) / steps[:, :, None]
    return values, gradients[:, 0], 0.5 * (hessians + jnp.swapaxes(hessians, 1, 2))


def minimize_one(stats, theta0, reml: bool = True, max_iterations: int = MAX_ITERATIONS, sigma_known: bool = False):
    """Minimize the one-term criterion of one dataset (:func:`newton` on
    :func:`hierpool.algebra.one_term.objective`).  Pure, not jitted: the batch calls it inside its vmapped
    program (a nested jit would be traced to a jaxpr that vmap then batches again: more tracing, the same program).

    ``sigma_known``: the residual sds are known (``se=``), carried by the statistics' weights
    1 / se^2, and sigma is 1 (``hp.lmm``'s criterion).
    """
    return newton(partial(objective, stats=stats, reml=reml, sigma_known=sigma_known), theta0, max_iterations)


def newton(f, theta0, max_iterations: int = MAX_ITERATIONS, value_and_grad=None, fd_width=None,
           with_curvature: bool = False, step_tol=None, damping_growth: float = 10.0):
    """Minimize ``f`` (a pure, differentiable function of theta) from ``theta0``: one dataset's optimizer.

    Any criterion: the one-term specialisation (:func:`minimize_one`), the general blocked criterion of a
    batch of systems (:mod:`hierpool.batch.fit_terms`), or a GLMM's Laplace deviance in (theta, beta)
    (:mod:`hierpool.batch.fit_glmm`), whose exact gradient comes from its own program
    (``value_and_grad``, in place of ``jax.value_and_grad(f)``; ``f`` is then unused).  ``fd_width``:
    the Hessian's forward-difference width (default sqrt(eps)); ``step_tol``: the relative Newton step at
    which the search stops (default 1e-9, float64); ``damping_growth``: the Levenberg-Marquardt shift's factor
    after a rejected step.  Pure: vmap it over datasets.

    Returns
    -------
    (theta, value, newton_step, iterations, converged[, curvature])
        ``newton_step`` is max |H^-1 g| at the end, the distance to the optimum
        the last quadratic model predicts; ``converged`` when it is below 1e-6, or
        the decrease it predicts is below 1e-12 of the criterion (float64).  ``with_curvature``:
        the last forward-difference Hessian too.
    """
    if value_and_grad is None:
        value_and_grad = jax.value_and_grad(f)
    m = theta0.shape[0]
    eye = jnp.eye(m, dtype=theta0.dtype)
    width, step_tol_default, rounding_step_tol, (converged_step, converged_decrease) = _tolerances(theta0.dtype)
    fd_width = width if fd_width is None else fd_width
    step_tol = step_tol or step_tol_default
    step_lengths = jnp.asarray(STEP_LENGTHS, theta0.dtype)

    def body(state):
        theta, value, gradient, curvature, damping, iteration, _ = state
        scale = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(curvature))), 1.0)
        shift = damping + _definite_shift(curvature) + jnp.where(damping > 0, 0.0, 1e-12 * scale)
        step = -_solve_spd(curvature + shift * eye, gradient)
        trials = theta[None, :] + step_lengths[:, None] * step[None, :]
        values, gradients, hessians = _probe(value_and_grad, trials, fd_width)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        best = jnp.argmin(values)
        improved = values[best] < value
        keep = lambda new, old: jnp.where(improved, new, old)  # noqa: E731
        # Levenberg-Marquardt: trust the quadratic model more after a success, less after a failure
        new_damping = jnp.where(improved, jnp.where(damping > 1e-8 * scale, damping / 10, 0.0),
                                jnp.maximum(damping_growth * damping, 1e-4 * scale))
        step_size = jnp.max(jnp.abs(step)) / (1 + jnp.max(jnp.abs(theta)))
        # the quadratic model has nothing left to give, or what it promises is below rounding
        at_optimum = (iteration > 0) & ((step_size <= step_tol) | (~improved & (step_size <= rounding_step_tol)))
        new_gradient = keep(gradients[best], gradient)
        done = at_optimum | (jnp.max(jnp.abs(new_gradient)) < GRADIENT_TOL) | (~improved & (new_damping > 1e10 * scale))
        return (keep(trials[best], theta), keep(values[best], value), new_gradient, keep(hessians[best], curvature),
                new_damping, iteration + 1, done)

    def keep_going(state):
        *_, iteration, done = state
        return (~done) & (iteration < max_iterations)

    # the first pass has a zero step: it only probes theta0, so the loop holds the one gradient program.  Every
    # carry is computed from theta0, so that under vmap each is batched from the start (a constant carry is not,
    # and vmap batches the loop's body again for each carry it finds batched after a pass)
    zero = jnp.where(jnp.isfinite(theta0[0]), 0.0, 0.0).astype(theta0.dtype)  # 0, from theta0 (never NaN)
    initial = (theta0, zero + jnp.inf, jnp.zeros_like(theta0) + zero, eye + zero, zero, zero.astype(jnp.int32),
               zero != 0)
    theta, value, gradient, curvature, _, iterations, _ = jax.lax.while_loop(keep_going, body, initial)
    newton = _solve_spd(curvature + _definite_shift(curvature) * eye, gradient)
    newton_step = jnp.max(jnp.abs(newton))
    flat = 0.5 * gradient @ newton <= converged_decrease * (1 + jnp.abs(value))
    converged = jnp.isfinite(value) & ((newton_step < converged_step) | flat)
    if with_curvature:
        return theta, value, newton_step, iterations - 1, converged, curvature
    return theta, value, newton_step, iterations - 1, converged
