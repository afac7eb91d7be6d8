"""A vmappable optimizer for the one-term criterion: Newton's method with a modified Hessian (and its host twin,
:func:`newton_on_host`, the same rules in NumPy over a batch of datasets).

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

import numpy as np

from ..jax_runtime import jax, jnp  # imported on first use: the host search runs without JAX
from ..linalg import canonical_theta as canonical_rows
from ..linalg import cholesky, identity_where_not, theta_to_factors, tril_positions
from ..one_term import objective
from ..start import moment_theta
from ..varying import varying_zero

STEP_LENGTHS = (1.0,)
GRADIENT_TOL = 1e-7


#: :func:`newton_on_host` with an approximate trailing block: the largest decrease promised (relative to the
#: criterion) at which a step's actual decrease is compared with its model's, and the relative disagreement past
#: which the search differences every coordinate from then on (:func:`_model_failed`).
MODEL_NEAR = 1e-3
MODEL_AGREEMENT = 0.5
#: The accepted steps a dataset's search takes on an approximate trailing block before it differences every
#: coordinate: a GLMM's search takes 4 to 6; one that has not ended in 10 is where the block's error is large (far
#: from the optimum, where the test on the model's decrease does not apply).
APPROXIMATE_PASSES = 10


def _tolerances(dtype):
    """(forward-difference width, step tolerance, rounding step tolerance, convergence tolerances) for a dtype.

    float64: the Newton step (~ the distance to the optimum) to 1e-9 relative, or
    to 1e-6 where no step length lowers the criterion any more (it is flat to
    rounding there).  Converged when the final Newton step is below 1e-6, or when
    the decrease it predicts, g^T H^-1 g / 2, is below 1e-12 of the criterion:
    at a singular fit the criterion can be so flat along the boundary that rounding
    in the gradient leaves a Newton step of ~1e-6 that would lower it by ~1e-15
    relative (seen on 1 of 2,000 sleepstudy replicates; not where the curvature bends down along an axis,
    :func:`_final_step`).  float32 scales them
    with its machine epsilon.
    """
    eps = float(np.finfo(dtype).eps)
    converged = (max(1e-6, 100 * eps**0.5), max(1e-12, 100 * eps), 100 * eps)
    return eps**0.5, max(1e-9, 10 * eps), max(1e-6, 30 * eps**0.5), converged


#: :func:`_final_step`'s look along an axis whose curvature bends down: within this share of the parameter (1 + its
#: size) ...
FLAT_REACH = 1e-3
#: ... a decrease of -2 log L above this (1e-3 standard errors' squared distance) leaves the search unconverged.
FLAT_DECREASE = 1e-6
MAX_ITERATIONS = 60
#: Levenberg-Marquardt's damping falls this many-fold after an accepted pass (:func:`_damping_after`) ...
DAMPING_FALL = 10.0
#: ... and this many-fold after an accepted pass that followed a rejected one.  (Both are read when a program is
#: traced: a compiled search already cached keeps the values it was compiled with.)
DAMPING_FALL_AFTER_REJECTION = 3.0
#: The decrease of -2 log L the last quadratic model must still promise for a batch's search to go on (GLMMs, linear
#: models of one or several terms, on the host and compiled)
#: (:func:`newton`'s ``decrease_tol``): below it that model's optimum is within 1e-5 standard errors of the
#: estimates; a pass more changes the criterion and the estimates by no more than rounding and the optimizer's
#: tolerance (measured on GLMMs in benchmarks/RESULTS.md, "The GLMM class, fifteenth session", and on several-term
#: linear models in "The several-term linear class, eighteenth session").
DECREASE_TOL = 1e-10
#: Smallest eigenvalue of S Sigma S / sigma^2 of a batch start, S the Z columns' root-mean-squares (see
#: :func:`moment_start`, :func:`hierpool.algebra.start.moment_theta`).
MOMENT_FLOOR = 1e-2


def moment_start(stats, sigma_known: bool = False, known_sds_sizes=None) -> np.ndarray:
    """Starting thetas (B, k(k+1)/2) from per-level least squares, one per dataset of a batch (NumPy).

    The method of moments on the statistics alone (:func:`hierpool.algebra.start.moment_theta`,
    the closed form's ANOVA start for any k): beta from OLS, then each level's own
    regression on the residuals, the eigenvalues of S Sigma S / sigma^2 clipped to [1e-2, 1e4] (S the Z
    columns' root-mean-squares: the floor a share of an observation's variance, whatever a slope's units).
    Datasets with fewer than k + 1 usable levels start at lme4's identity.  Only a
    start: Newton's method takes it to the same optimum as from the identity, in fewer
    iterations (2,000 sleepstudy-shaped datasets: 3.2 on average instead of 11.1, at
    most 16 instead of 59, with the floor then in the covariates' units).  The floor keeps the start off the
    boundary: from a near-singular Lambda (a floor of 1e-4, the closed form's) two of those datasets did
    not converge in 60 iterations.  With known residual sds (``sigma_known``) every dataset starts at lme4's
    identity in their units (``hp.fit_batch`` searches theta over their unit, :mod:`hierpool.batch.conditioning`,
    as ``hp.lmm`` does, :func:`hierpool.closedform.optimize.known_sds_unit`) times its ``known_sds_sizes``
    (:func:`hierpool.algebra.start.known_sds_size`, one per dataset; 1 when None); ``hp.lmm``'s start is that in
    the columns' units too.
    """
    if sigma_known:
        rows, cols = tril_positions(stats.ztz.shape[-1])
        sizes = np.ones(stats.n.shape[0]) if known_sds_sizes is None else np.asarray(known_sds_sizes, dtype=float)
        return (rows == cols).astype(float)[None, :] * sizes[:, None]
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
    """matrix^-1 vector for symmetric positive definite matrices: JAX's Cholesky, or NumPy's solve on the host
    (leading axes: datasets).  A matrix that is not positive definite gives NaN, as the Cholesky factor does, for
    its own dataset alone (NumPy's solve would raise for the whole stack)."""
    if isinstance(matrix, np.ndarray):
        definite = _positive_definite(matrix) & np.all(np.isfinite(vector), axis=-1)
        if definite.all():  # the common stack, without the masks
            return np.linalg.solve(matrix, vector[..., None])[..., 0]
        safe = identity_where_not(definite, matrix)
        solved = np.linalg.solve(safe, np.where(definite[..., None], vector, 0.0)[..., None])[..., 0]
        return np.where(definite[..., None], solved, np.nan)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(matrix), True), vector)


def _positive_definite(matrices: np.ndarray) -> np.ndarray:
    """Whether each of a stack of symmetric matrices (NumPy) is finite and positive definite: its Cholesky factor
    exists, the compiled path's test (:func:`_definiteness`), so both paths decide alike.  A stack that is all finite
    is first factored by one LAPACK call, which refuses the whole stack where one is not positive definite (a NaN
    matrix it factors into NaN without refusing: hence the finite test before it), so that the usual stack, all
    definite, is decided without the per-matrix masks."""
    finite = np.all(np.isfinite(matrices), axis=(-2, -1))
    if finite.all():
        try:
            np.linalg.cholesky(matrices)
            return finite
        except np.linalg.LinAlgError:
            pass
    safe = identity_where_not(finite, matrices)
    with np.errstate(invalid="ignore", divide="ignore"):  # linalg.cholesky: NaN for each indefinite one of a stack
        pivots = np.diagonal(cholesky(safe[None] if safe.ndim == 2 else safe), axis1=-2, axis2=-1)
    return finite & np.all(pivots.reshape(finite.shape + pivots.shape[-1:]) > 0, axis=-1)


def _definiteness(hessian):
    """(whether the Hessian is finite and positive definite: its Cholesky factor exists; 0 where it is, else a shift
    that makes it so (Gershgorin)).  JAX (one Hessian) or NumPy (a stack of them, on the host)."""
    if isinstance(hessian, np.ndarray):
        xp, definite = np, _positive_definite(hessian)
    else:
        chol = jnp.linalg.cholesky(hessian)
        xp, definite = jnp, jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    diagonal = xp.diagonal(hessian, axis1=-2, axis2=-1)
    gershgorin = xp.min(2 * diagonal - xp.sum(xp.abs(hessian), axis=-1), axis=-1)
    return definite, xp.where(definite, 0.0, xp.maximum(0.0, -gershgorin))


def _curvature_scale(curvature, xp):
    """The curvature's scale: its largest diagonal, at least 1."""
    return xp.maximum(xp.max(xp.abs(xp.diagonal(curvature, axis1=-2, axis2=-1)), axis=-1), 1.0)


def _damping_after(improved, damping, scale, growth: float, xp, after_rejection, rejected=None):
    """Levenberg-Marquardt: trust the quadratic model more after a success, less after a failure.

    After a success the damping falls :data:`DAMPING_FALL`-fold (to 0 below 1e-8 of the curvature's scale), or
    :data:`DAMPING_FALL_AFTER_REJECTION`-fold where the pass before was rejected (``after_rejection``): the damping
    that rejection set bounds the step the model can be trusted with, and the full fall would return to the damping
    just rejected, so that a search along a narrow curved valley alternates rejected and accepted passes (an AR(1)
    model's phi against its intercept's variance near phi = 1: 60 passes without converging, where the gentler fall
    after a rejection converged in 39; benchmarks/RESULTS.md, twenty-fourth session).  After a failure it grows
    ``growth``-fold (to at least 1e-4 of the scale), or, given the ``rejected`` trial (its step s, the slope
    g^T s at the point and the change f(x + s) - f(x)), it is set from that trial.  The quadratic through the
    criterion's value and slope at the point and its value at the trial has its minimum at alpha s,
    alpha = -slope / (2 (change - slope)), kept within [0.1, 0.5] (+inf or NaN at the trial: 0.1), the
    safeguarded interpolation of a backtracking line search (Nocedal & Wright 2006, sec. 3.5).  The damping that
    shortens the step about alpha-fold along it follows from the step's own curvature, c = s^T (H + shift) s /
    s^T s = -slope / |s|^2 (as (H + shift) s = -g): adding mu to the shift scales the step's length by about
    c / (c + mu), so mu = c (1 / alpha - 1).  Where no step was taken (a start off the criterion's domain) it
    grows as without the trial.
    """
    grown = growth * damping
    if rejected is not None:
        grown = _interpolated_damping(damping, grown, *rejected, xp)
    fallen = damping / xp.where(after_rejection, DAMPING_FALL_AFTER_REJECTION, DAMPING_FALL)
    return xp.where(improved, xp.where(damping > 1e-8 * scale, fallen, 0.0), xp.maximum(grown, 1e-4 * scale))


def _interpolated_damping(damping, grown, step, slope, change, xp):
    """:func:`_damping_after`'s damping after the rejected trial (step, slope, change); ``grown`` where no step."""
    length2 = xp.sum(step * step, axis=-1)
    moved = length2 > 0
    curve = change - slope
    alpha = xp.where(xp.isfinite(change) & (curve > 0), -slope / (2 * xp.where(curve > 0, curve, 1.0)), 0.1)
    along = -slope / xp.where(moved, length2, 1.0)  # the step's curvature, c
    interpolated = damping + along * (1 / xp.clip(alpha, 0.1, 0.5) - 1)
    return xp.where(moved & (along > 0), interpolated, grown)


def _finite_difference_hessians(gradients, steps, xp):
    """Symmetrized forward differences of the gradients (..., m + 1, m) (the point's first, then its m shifts by
    ``steps`` (..., m))."""
    return _symmetrized(_gradient_differences(gradients[..., :1, :], gradients[..., 1:, :], steps), xp)


def _gradient_differences(at_point, shifted, steps):
    """The Hessian's columns (..., s, m) by forward differences: the gradients at s shifts (..., s, m) by ``steps``
    (..., s) less the point's (..., 1, m)."""
    return (shifted - at_point) / steps[..., :, None]


def _differenced_hessians(shift_gradients, every, steps, rows, aux, gradient):
    """The forward-difference Hessians (K, m, m) at points of datasets ``rows`` from their probes ``every``
    (K, m + 1, m) and ``steps`` (K, m) (:func:`_probe_points`), their states ``aux`` and gradients (K, m): the
    lazy searches' ``shift_gradients`` at the m shifts."""
    shifted = shift_gradients(every[:, 1:], rows, aux)
    return _symmetrized(_gradient_differences(gradient[:, None, :], shifted, steps), np)


def _symmetrized(columns, xp):
    """(H + H^T) / 2 from H's m columns (..., m, m)."""
    return 0.5 * (columns + xp.swapaxes(columns, -1, -2))


def _with_trailing_block(columns, block):
    """The Hessian from its first s columns (..., s, m), by forward differences, and its trailing block (..., r, r),
    r = m - s: the leading block symmetrized, the cross block from the columns (d grad_r / d x_s)."""
    s = columns.shape[-2]
    full = np.zeros(columns.shape[:-2] + (columns.shape[-1],) * 2)
    full[..., :s, :s] = _symmetrized(columns[..., :s], np)
    full[..., :s, s:] = columns[..., s:]
    full[..., s:, :s] = np.swapaxes(columns[..., s:], -1, -2)
    full[..., s:, s:] = block
    return full


def _model_failed(taken, step, gradient, curvature, value, new_value):
    """Where an accepted step's decrease strayed from its quadratic model's by more than half, near the optimum.

    The model promises -(g^T s + s^T H s / 2).  Along a step computed from a curvature that is (1 + e) times too
    small (the step (1 + e) times Newton's) the actual decrease is (1 - e) times that (to second order), and the
    error after the step is -e times the error before: the search converges linearly at rate |e| (an e near 1
    oscillates about the optimum).  The test is made where the model promises at most
    :data:`MODEL_NEAR` of the criterion: farther off the criterion's own departure from a quadratic moves the ratio
    as much.  Over the steps there whose curvature had the approximate beta block, on the datasets of five GLMMs,
    the ratio's 1% and 99% quantiles were 0.37 and 1.21 at the worst; it was 0.02 on a Bernoulli dataset with
    three rows a group whose search oscillated for 200 passes (benchmarks/RESULTS.md, "The GLMM class, sixteenth
    session")."""
    promised = -(np.sum(gradient * step, axis=-1) + 0.5 * np.einsum("ai,aij,aj->a", step, curvature, step))
    near = taken & (promised > 0) & (promised <= MODEL_NEAR * (1 + np.abs(value)))
    ratio = (value - new_value) / np.where(near, promised, 1.0)
    return near & (np.abs(ratio - 1) > MODEL_AGREEMENT)


class _ShiftedCurvature:
    """:func:`newton_on_host`'s lazy forward-difference Hessians at accepted points, with or without an approximate
    trailing block (its ``shift_gradients`` and ``trailing_curvature``).

    With the block, each dataset's search shifts only the first s coordinates, and its differences and state at its
    point are kept so that the last m - s columns can be differenced there later (:meth:`complete`).  ``approximate``:
    whether a dataset's curvature has the block; ``differenced``: whether it differences every coordinate from now
    on (the block could not be trusted, or :data:`APPROXIMATE_PASSES` passes had it).
    """

    def __init__(self, shift_gradients, trailing_curvature, n: int, m: int, width: float):
        self.shift_gradients, self.trailing_curvature = shift_gradients, trailing_curvature
        self.m, self.width = m, width
        self.columns, self.state = np.zeros((n, 0, m)), None  # sized at the first block
        self.approximate, self.differenced = np.zeros(n, bool), np.full(n, trailing_curvature is None)
        self.passes = np.zeros(n, dtype=np.int64)

    def at(self, points, rows, aux, gradient, previous=None):
        """The Hessians (K, m, m) at accepted ``points`` (K, m) of datasets ``rows``: their states ``aux`` (arrays
        (K, ...)) and gradients (K, m) (``previous``, the search's point, gradient and Hessian before the step, is
        :class:`_SecantCurvature`'s)."""
        self.differenced[rows[self.passes[rows] >= APPROXIMATE_PASSES]] = True
        out = np.empty((len(rows), self.m, self.m))
        every, steps = _probe_points(points, self.width, np)  # (K, m + 1, m)
        cheap = np.flatnonzero(~self.differenced[rows])
        if cheap.size:
            block = self.trailing_curvature(points[cheap], rows[cheap], [a[cheap] for a in aux])
            finite = np.all(np.isfinite(block), axis=(-2, -1))
            self.differenced[rows[cheap[~finite]]] = True  # no approximation there: the differences, at once
            cheap, block = cheap[finite], block[finite]
        full = np.flatnonzero(self.differenced[rows])
        if full.size:
            out[full] = _differenced_hessians(self.shift_gradients, every[full], steps[full], rows[full],
                                              [a[full] for a in aux], gradient[full])
        if cheap.size:
            at, part_aux = rows[cheap], [a[cheap] for a in aux]
            if self.state is None:
                self.columns = np.zeros((len(self.columns), self.m - block.shape[-1], self.m))
                self.state = [np.zeros((len(self.columns),) + a.shape[1:], dtype=a.dtype) for a in part_aux]
            s = self.columns.shape[1]
            shifted = self.shift_gradients(every[cheap, 1 : 1 + s], at, part_aux)
            self.columns[at] = _gradient_differences(gradient[cheap, None, :], shifted, steps[cheap, :s])
            for a, new_a in zip(self.state, part_aux):
                a[at] = new_a
            out[cheap] = _with_trailing_block(self.columns[at], block)
            self.passes[at] += 1
        self.approximate[rows] = ~self.differenced[rows]
        return out

    def complete(self, rows, points, gradient):
        """The full forward-difference Hessians (K, m, m) at the points (K, m) of datasets ``rows`` whose curvature
        has the block, from their kept differences and states and their gradients (K, m)."""
        s = self.columns.shape[1]
        every, steps = _probe_points(points, self.width, np)
        shifted = self.shift_gradients(every[:, 1 + s :], rows, [a[rows] for a in self.state])
        rest = _gradient_differences(gradient[:, None, :], shifted, steps[:, s:])
        self.approximate[rows] = False
        return _symmetrized(np.concatenate([self.columns[rows], rest], axis=-2), np)


#: The share of ``decrease_tol`` at which a secant search stops (:func:`newton_on_host`'s ``secant``).  Newton's
#: quadratic steps usually land far below the tolerance, a secant search's superlinear ones just below it, which
#: left estimates up to the tolerance's 1e-5 standard errors from the optimum (a zero variance's theta at 1e-6, where
#: Newton's search reaches 0 to rounding); a hundredth costs 5-10% more passes, of one point each
#: (benchmarks/RESULTS.md, twenty-fifth session).
SECANT_DECREASE_SHARE = 1e-2
#: :func:`_sr1_update` skips an update whose denominator |s^T (y - H s)| is below this fraction of |s| |y - H s|
#: (Nocedal & Wright 2006, eq. 6.26): the update would be large and ill-determined.
SR1_SKIP = 1e-8


def _sr1_update(curvature, step, change):
    """The symmetric rank-one update of Hessians (K, m, m) by steps s (K, m) and gradient changes y (K, m):
    H + r r^T / (r^T s), r = y - H s, the Hessian that maps s to y (the secant condition) nearest H in rank one;
    unlike BFGS it may stay indefinite, as the criterion is away from its optimum, and its Hessians converge to the
    true one along steps that span the space (Nocedal & Wright 2006, sec. 6.2).  Skipped (H kept) where the
    denominator is small (:data:`SR1_SKIP`), or not finite (a change not finite: its comparisons are false)."""
    residual = change - np.einsum("kij,kj->ki", curvature, step)
    denominator = np.sum(residual * step, axis=-1)
    scale = np.linalg.norm(step, axis=-1) * np.linalg.norm(residual, axis=-1)
    update = (np.abs(denominator) > SR1_SKIP * scale) & (scale > 0)
    outer = residual[:, :, None] * residual[:, None, :] / np.where(update, denominator, 1.0)[:, None, None]
    return np.where(update[:, None, None], curvature + outer, curvature)


class _SecantCurvature:
    """:func:`newton_on_host`'s curvature by secant updates (its ``secant``), the interface of
    :class:`_ShiftedCurvature`: each accepted point's Hessian is the last one's updated by the step between them and
    the change of the gradient along it (:func:`_sr1_update`), at no evaluation; the first point's, and where the
    search distrusts the update, are forward differences of the gradient (m more points).

    The update reads the search's own point, gradient and Hessian before the step (``at``'s ``previous``): no copy
    of them is kept here.  ``approximate``: whether a dataset's curvature is an update; ``differenced``: whether the
    next accepted point's is differenced instead (set by the search where a step's decrease strayed from its
    model's, or a stop on an update was not confirmed), after which the updates go on from that Hessian.  After
    :data:`APPROXIMATE_PASSES`
    updates a dataset's search differences every accepted point, as one on an approximate trailing block does: a
    search that has not ended by then is where the updates serve badly (a crawl along a near-singular covariance: on
    updates alone, 6 of 200 Poisson datasets with three correlated coefficients stopped unconverged, 5 of them at the
    pass cap; benchmarks/RESULTS.md, twenty-fifth session).
    """

    def __init__(self, shift_gradients, n: int, m: int, width: float):
        self.shift_gradients, self.m, self.width = shift_gradients, m, width
        self.state = None  # each dataset's state at its point (for complete), sized at the first point
        self.approximate, self.differenced = np.zeros(n, bool), np.zeros(n, bool)
        self.started, self.updates = np.zeros(n, bool), np.zeros(n, dtype=np.int64)

    def at(self, points, rows, aux, gradient, previous):
        """The Hessians (K, m, m) at accepted ``points`` (K, m) of datasets ``rows``: their states ``aux`` (arrays
        (K, ...)) and gradients (K, m); ``previous``, the search's (points, gradients, Hessians) before the step."""
        out = np.empty((len(rows), self.m, self.m))
        full = ~self.started[rows] | self.differenced[rows] | (self.updates[rows] >= APPROXIMATE_PASSES)
        if np.any(full):
            out[full] = self._differenced(points[full], rows[full], [a[full] for a in aux], gradient[full])
        if not np.all(full):
            at = rows[~full]
            before, before_gradient, before_curvature = (x[~full] for x in previous)
            out[~full] = _sr1_update(before_curvature, points[~full] - before, gradient[~full] - before_gradient)
            # no shifts: the caller keeps its state at the point all the same (newton_on_host's shift_gradients)
            self.shift_gradients(np.empty((len(at), 0, self.m)), at, [a[~full] for a in aux])
            self.updates[at] += 1
        self.approximate[rows], self.differenced[rows], self.started[rows] = ~full, False, True
        if self.state is None:
            self.state = [np.zeros((len(self.started),) + a.shape[1:], dtype=a.dtype) for a in aux]
        for kept, new in zip(self.state, aux):
            kept[rows] = new
        return out

    def complete(self, rows, points, gradient):
        """The forward-difference Hessians (K, m, m) at the points (K, m) of datasets ``rows``, their gradients
        (K, m), from the states kept there."""
        self.approximate[rows] = False
        return self._differenced(points, rows, [a[rows] for a in self.state], gradient)

    def _differenced(self, points, rows, aux, gradient):
        every, steps = _probe_points(points, self.width, np)
        return _differenced_hessians(self.shift_gradients, every, steps, rows, aux, gradient)


def _next_step(curvature, gradient, damping, xp, saddle_free: bool = False):
    """(the next pass's step, -(H + shift I)^-1 g, its Levenberg-Marquardt shift the damping, what makes H positive
    definite (:func:`_definiteness`) and a 1e-12 ridge (of H's scale, :func:`_curvature_scale`) when undamped; the
    quadratic model's own minimizer, -(H + ridge I)^-1 g, undamped; whether H is positive definite, so that it is
    one).  ``saddle_free``: where H is not positive definite, :func:`_saddle_free_step` instead."""
    definite, definite_shift = _definiteness(curvature)
    ridge = 1e-12 * _curvature_scale(curvature, xp)
    shift = damping + definite_shift + xp.where(damping > 0, 0.0, ridge)
    eye = xp.eye(gradient.shape[-1], dtype=gradient.dtype)
    model = -_solve_spd(curvature + ridge[..., None, None] * eye, gradient)
    step = xp.where((shift <= ridge)[..., None], model, -_solve_spd(curvature + shift[..., None, None] * eye, gradient))
    if saddle_free:
        if xp is np:  # the indefinite ones alone
            indefinite = np.flatnonzero(~definite & np.all(np.isfinite(curvature), axis=(-2, -1)))
            step[indefinite] = _saddle_free_step(curvature[indefinite], gradient[indefinite], damping[indefinite], np)
        else:
            step = xp.where(definite, step, _saddle_free_step(curvature, gradient, damping, xp))
    return step, model, definite


#: :func:`_saddle_free_step`'s floor on |H|'s eigenvalues, relative to H's largest (at least 1).
SADDLE_FREE_FLOOR = 1e-8


def _saddle_free_step(curvature, gradient, damping, xp):
    """-(|H| + damping I)^-1 g, |H| = V |Lambda| V^T from H = V Lambda V^T, each |lambda| at least
    :data:`SADDLE_FREE_FLOOR` of the largest (at least 1) (Dauphin et al. 2014, "Identifying and attacking the
    saddle point problem in high-dimensional non-convex optimization", NeurIPS; Nocedal & Wright 2006, sec. 3.4,
    the modified Newton step by eigenvalues).

    Where H is indefinite, the Levenberg-Marquardt shift of :func:`_next_step` adds |lambda_min| to every
    eigenvalue: along a direction of negative curvature (a variance at 0, a stationary point by symmetry, or a
    near-singular term's crawl) the step is then short and lengthens only by the damping's falls, one pass
    each.  The absolute eigenvalues keep each direction's own scale and turn the negative-curvature ones into
    descent at their own length.  Leading axes: a stack of them."""
    values, vectors = xp.linalg.eigh(curvature)
    scale = xp.maximum(xp.max(xp.abs(values), axis=-1, keepdims=True), 1.0)
    magnitudes = xp.maximum(xp.abs(values), SADDLE_FREE_FLOOR * scale) + damping[..., None]
    along = xp.einsum("...ji,...j->...i", vectors, gradient)
    return -xp.einsum("...ij,...j->...i", vectors, along / magnitudes)


def _relative_size(step, theta, xp):
    return xp.max(xp.abs(step), axis=-1) / (1 + xp.max(xp.abs(theta), axis=-1))


def _stops(first, step, theta, improved, new_gradient, new_damping, scale, tolerances, xp, new_theta, model_step,
           definite):
    """Whether the search ends after this pass: the quadratic model has nothing left to give, or what it promises
    is below rounding; the gradient vanishes; or the damping has grown past any use.

    ``tolerances``: (step, rounding step, decrease or None) (:func:`_tolerances`, ``decrease_tol``).

    The model has nothing left to give when the step just taken was below the step tolerance (relative), or when
    the new point's own quadratic model, positive definite (``definite``), puts its minimum within it
    (``model_step``, the undamped Newton step: damping is distrust of a long step, not of where the model's
    minimum is).  The optimum is then within the tolerance of the point (Newton's method converges quadratically
    there, so the step it would take is the distance to the optimum to second order), and its pass, a probe and
    its m shifts, would only confirm it.  Nor has the model anything to give when the decrease it promises,
    g^T H^-1 g / 2 (half the squared Newton decrement), is below the decrease tolerance: for a criterion that is
    -2 log L, whose estimates' covariance is 2 H^-1, that decrease is the squared distance of the model's optimum
    in standard errors, (H^-1 g)^T (2 H^-1)^-1 (H^-1 g) (Boyd & Vandenberghe 2004, sec. 9.5.1, stop on the
    decrement; Nocedal & Wright 2006, sec. 3.3).
    """
    step_tol, rounding_step_tol, _ = tolerances
    step_size = _relative_size(step, theta, xp)
    at_optimum = ~first & ((step_size <= step_tol) | (~improved & (step_size <= rounding_step_tol)))
    return (at_optimum | _model_at_optimum(new_theta, new_gradient, model_step, definite, tolerances, xp)
            | (xp.max(xp.abs(new_gradient), axis=-1) < GRADIENT_TOL) | (~improved & (new_damping > 1e10 * scale)))


def _model_at_optimum(theta, gradient, model_step, definite, tolerances, xp):
    """:func:`_stops`'s rule on the point's own quadratic model: positive definite (``definite``), its minimizer
    ``model_step`` away within the step tolerance, or the decrease it promises below the decrease tolerance."""
    step_tol, _, decrease_tol = tolerances
    predicted = _relative_size(model_step, theta, xp) <= step_tol
    if decrease_tol is not None:
        predicted = predicted | (-0.5 * xp.sum(gradient * model_step, axis=-1) <= decrease_tol)
    return definite & predicted


def _final_step(theta, value, gradient, curvature, tolerances, converged_step, converged_decrease, rounding, xp):
    """(max |H^-1 g|, converged) at the end of the search (:func:`newton`'s Returns): converged where the
    stopping rule on the point's own model holds (:func:`_model_at_optimum`) too, so that a search is not reported
    unconverged where it stopped on that rule.  The step is the search's own, undamped (:func:`_next_step`).

    The decrease the model predicts says nothing where the curvature bends down along some parameter's own axis
    (a negative diagonal) and that axis still has a decrease to give within :data:`FLAT_REACH` of the parameter
    (|g_i| s_i + |H_ii| s_i^2 / 2 above :data:`FLAT_DECREASE` and the criterion's rounding, ``rounding`` of it: in
    float32 a decrease of 1e-6 is below rounding): the point is then no minimum along it, and the
    model's shifted step predicts a decrease of the shifted model, which can be small far from the optimum
    (Poisson counts of 1e12, whose forward-difference curvature is the gradient's rounding over the difference
    width: the intercept's diagonal -1.4e5 at a gradient of 13, and a theta three times too small was called
    converged).  A flat direction whose diagonal is at rounding's negative side still counts (a negative
    binomial at its Poisson limit, log shape ~20: diagonal -3e-6 of a scale of 600 at a gradient of 1e-7)."""
    step, model_step, definite = _next_step(curvature, gradient, xp.zeros_like(value), xp)
    newton_step = xp.max(xp.abs(step), axis=-1)
    diagonal = xp.diagonal(curvature, axis1=-2, axis2=-1)
    reach = FLAT_REACH * (1 + xp.abs(theta))
    along = xp.abs(gradient) * reach - 0.5 * diagonal * reach**2  # what an axis that bends down gives within reach
    bends_down = xp.any((diagonal < 0) & (along > xp.maximum(FLAT_DECREASE, rounding * (1 + xp.abs(value)))[..., None]),
                        axis=-1)
    flat = ~bends_down & (-0.5 * xp.sum(gradient * step, axis=-1) <= converged_decrease * (1 + xp.abs(value)))
    model = _model_at_optimum(theta, gradient, model_step, definite, tolerances, xp)
    return newton_step, xp.isfinite(value) & ((newton_step < converged_step) | flat | model)


def _probe_points(points, width, xp):
    """Each point (..., m), then its m forward-difference shifts: (..., m + 1, m), and the steps (..., m)."""
    steps = width * (1 + xp.abs(points))
    shifted = points[..., None, :] + xp.eye(points.shape[-1], dtype=points.dtype) * steps[..., None, :]
    return xp.concatenate([points[..., None, :], shifted], axis=-2), steps


def _probe(value_and_grad, points, width, has_aux: bool = False):
    """Value, gradient and forward-difference Hessian of f at each point, in one vmapped gradient call (and,
    ``has_aux``, the auxiliary output at each point: ``value_and_grad`` then returns (value, gradient, aux)).

    Differencing the exact gradient costs m extra gradients per point and, unlike
    ``jax.hessian``, adds no second derivative program to compile (which made the
    program much longer to compile: benchmarks/RESULTS.md, "Measurements the code cites").
    """
    m = points.shape[-1]
    every, steps = _probe_points(points, width, jnp)
    values, gradients, *aux = jax.vmap(value_and_grad)(every.reshape(-1, m))
    values = values.reshape(-1, m + 1)[:, 0]
    gradients = gradients.reshape(-1, m + 1, m)
    out = (values, gradients[:, 0], _finite_difference_hessians(gradients, steps, jnp))
    if has_aux:  # at the points themselves, not their shifts
        out += (jax.tree_util.tree_map(lambda a: a.reshape((-1, m + 1) + a.shape[1:])[:, 0], aux[0]),)
    return out


def minimize_one(stats, theta0, reml: bool = True, max_iterations: int = MAX_ITERATIONS, sigma_known: bool = False):
    """Minimize the one-term criterion of one dataset (:func:`newton` on
    :func:`hierpool.algebra.one_term.objective`).  Pure, not jitted: the batch calls it inside its vmapped
    program (a nested jit would be traced to a jaxpr that vmap then batches again: more tracing, the same program).

    ``sigma_known``: the residual sds are known (``se=``), carried by the statistics' weights
    1 / se^2, and sigma is 1 (``hp.lmm``'s criterion).
    """
    # the host search's stop on the decrease the model promises too (DECREASE_TOL, as the several-term programs),
    # so that both paths stop by the same rules
    return newton(partial(objective, stats=stats, reml=reml, sigma_known=sigma_known), theta0, max_iterations,
                  decrease_tol=DECREASE_TOL)


def newton(f, theta0, max_iterations: int = MAX_ITERATIONS, value_and_grad=None, fd_width=None,
           with_curvature: bool = False, step_tol=None, damping_growth: float = 10.0, aux0=None, decrease_tol=None,
           interpolated_damping: bool = False, saddle_free: bool = False):
    """Minimize ``f`` (a pure, differentiable function of theta) from ``theta0``: one dataset's optimizer.

    Any criterion: the one-term specialisation (:func:`minimize_one`), the general blocked criterion of a
    batch of systems (:mod:`hierpool.batch.fit_terms`), or a GLMM's Laplace deviance in (theta, beta)
    (:mod:`hierpool.batch.fit_glmm`), whose exact gradient comes from its own program
    (``value_and_grad``, in place of ``jax.value_and_grad(f)``; ``f`` is then unused).  ``fd_width``:
    the Hessian's forward-difference width (default sqrt(eps)); ``step_tol``: the relative Newton step at
    which the search stops (default 1e-9, float64); ``damping_growth``: the Levenberg-Marquardt shift's factor
    after a rejected step; ``decrease_tol``: the search stops where the decrease the quadratic model still
    promises is below it (:func:`_stops`; None: never on that rule); ``interpolated_damping``: after a rejected
    step, the damping that shortens it to the interpolated minimum along it (:func:`_damping_after`), for a
    criterion far from quadratic (a GLMM's Laplace deviance), in place of ``damping_growth``; ``saddle_free``: where
    the curvature is not positive definite, the step by its absolute eigenvalues (:func:`_saddle_free_step`) in
    place of the shifted Newton step.  ``aux0`` (a pytree
    of arrays, the shapes of an auxiliary output): ``value_and_grad`` returns (value, gradient, aux), and the aux
    at the returned theta comes back last (a GLMM's mode there, without tracing its program again; ``aux0`` where
    no step improved on +inf).
    Pure: vmap it over datasets.

    Returns
    -------
    (theta, value, newton_step, iterations, converged[, curvature][, aux])
        ``newton_step`` is max |H^-1 g| at the end, the distance to the optimum
        the last quadratic model predicts; ``converged`` when it is below 1e-6, or
        the decrease it predicts is below 1e-12 of the criterion (float64; not where the curvature has a negative
        diagonal, :func:`_final_step`), or the search stopped on that
        model (:func:`_model_at_optimum`).  ``with_curvature``:
        the last forward-difference Hessian too.
    """
    if value_and_grad is None:
        value_and_grad = jax.value_and_grad(f)
    m = theta0.shape[0]
    eye = jnp.eye(m, dtype=theta0.dtype)
    width, step_tol_default, rounding_step_tol, converged_tolerances = _tolerances(theta0.dtype)
    converged_step, converged_decrease, rounding = converged_tolerances
    fd_width = width if fd_width is None else fd_width
    tolerances = (step_tol or step_tol_default, rounding_step_tol, decrease_tol)
    step_lengths = jnp.asarray(STEP_LENGTHS, theta0.dtype)
    has_aux = aux0 is not None

    def body(state):
        theta, value, gradient, curvature, damping, iteration, _, aux, step, last_rejected = state
        scale = _curvature_scale(curvature, jnp)
        trials = theta[None, :] + step_lengths[:, None] * step[None, :]
        values, gradients, hessians, *trial_aux = _probe(value_and_grad, trials, fd_width, has_aux)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        best = jnp.argmin(values)
        improved = values[best] < value
        keep = lambda new, old: jnp.where(improved, new, old)  # noqa: E731
        rejected = (step, jnp.dot(gradient, step), values[best] - value) if interpolated_damping else None
        new_damping = _damping_after(improved, damping, scale, damping_growth, jnp, last_rejected, rejected)
        new_theta, new_value = keep(trials[best], theta), keep(values[best], value)
        new_gradient = keep(gradients[best], gradient)
        new_curvature = keep(hessians[best], curvature)
        # the next pass's step, here, so that the stopping rule can read it
        next_step, model_step, definite = _next_step(new_curvature, new_gradient, new_damping, jnp, saddle_free)
        done = _stops(iteration == 0, step, theta, improved, new_gradient, new_damping, scale, tolerances, jnp,
                      new_theta, model_step, definite)
        if has_aux:
            aux = jax.tree_util.tree_map(lambda new, old: keep(new[best], old), trial_aux[0], aux)
        return (new_theta, new_value, new_gradient, new_curvature, new_damping, iteration + 1, done, aux, next_step,
                ~improved)

    def keep_going(state):
        *_, iteration, done, _, _, _ = state
        return (~done) & (iteration < max_iterations)

    # the first pass has a zero step: it only probes theta0, so the loop holds the one gradient program.  Every
    # carry is computed from theta0, so that under vmap each varies from the start (the varying module)
    zero = varying_zero(theta0[0], theta0.dtype)
    aux = None if aux0 is None else jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), aux0)
    initial = (theta0, zero + jnp.inf, jnp.zeros_like(theta0) + zero, eye + zero, zero, zero.astype(jnp.int32),
               zero != 0, aux, jnp.zeros_like(theta0) + zero, zero != 0)
    theta, value, gradient, curvature, _, iterations, _, aux, _, _ = jax.lax.while_loop(keep_going, body, initial)
    newton_step, converged = _final_step(theta, value, gradient, curvature, tolerances, converged_step,
                                         converged_decrease, rounding, jnp)
    out = (theta, value, newton_step, iterations - 1, converged)
    return out + (curvature,) * with_curvature + (aux,) * has_aux


def optimize_on_host(value_and_grad, theta0: np.ndarray, max_iterations: int, ks, *,
                     interpolated_damping: bool = False, saddle_free: bool = False, decrease_tol=None,
                     with_curvature: bool = False, secant: bool = False) -> dict:
    """A host chunk's optimization (:func:`newton_on_host`), as the compiled programs return it: canonical thetas
    (``ks``: the terms' widths), criterion, last Newton step, iterations, converged (and, ``with_curvature``, the
    last forward-difference Hessian, in the search's own theta).  A probe off the criterion's domain, or a system
    that is not positive definite there, is NaN, so +inf: not a step (NumPy's warnings off).
    ``interpolated_damping``, ``saddle_free`` and ``decrease_tol`` as :func:`newton`'s; ``secant`` as
    :func:`newton_on_host`'s, each trial then evaluated alone and the shifts where differenced (``value_and_grad``
    carries no state between points)."""
    search, lazy = value_and_grad, {}
    if secant:
        def search(points, rows):  # the trials, with no state to carry
            return (*value_and_grad(points, rows), [])

        def shift_gradients(points, rows, aux):
            return value_and_grad(points, rows)[1] if points.shape[1] else np.zeros(points.shape)

        lazy = {"shift_gradients": shift_gradients, "secant": True}
    with np.errstate(all="ignore"):
        theta, value, newton_step, iterations, converged, *curvature = newton_on_host(
            search, theta0, max_iterations, interpolated_damping=interpolated_damping, saddle_free=saddle_free,
            decrease_tol=decrease_tol, with_curvature=with_curvature, **lazy)
    return {"theta": canonical_rows(theta, tuple(ks)), "objective": value, "newton_step": newton_step,
            "iterations": iterations, "converged": converged} | ({"curvature": curvature[0]} if curvature else {})


def newton_on_host(value_and_grad, theta0: np.ndarray, max_iterations: int = MAX_ITERATIONS,
                   damping_growth: float = 10.0, fd_width=None, step_tol=None, with_curvature: bool = False,
                   shift_gradients=None, decrease_tol=None, interpolated_damping: bool = False,
                   trailing_curvature=None, saddle_free: bool = False, secant: bool = False, settled=None):
    """:func:`newton` for a batch of datasets at once on the host (NumPy): the same steps, shift, damping and
    stopping rules (one home each, above), with each dataset leaving the batch when its search stops.  Its
    options the compiled search lacks (the lazy shifts, an approximate trailing block, secant updates, which also
    stop at a share of ``decrease_tol``) are the host's alone.

    Where :func:`newton` runs every dataset of a vmapped call until the slowest stops, this one evaluates only
    those still searching.  Positive definiteness is decided by the Cholesky factor, as in the compiled program
    (:func:`_positive_definite`), and the Newton systems of the definite ones are solved by LU (:func:`_solve_spd`).

    Parameters
    ----------
    value_and_grad : callable
        ``value_and_grad(points, rows)``: the criterion's values (A, Q) and gradients (A, Q, m) of datasets
        ``rows`` (A,) at ``points`` (A, Q, m).  With ``shift_gradients``: at the trials alone, returning a state
        per point too (a list of arrays (A, Q, ...)).
    theta0 : ndarray
        (B, m) starts.
    max_iterations : int
        Passes per dataset (the first probes ``theta0``), as :func:`newton`'s.
    damping_growth, fd_width, step_tol, with_curvature, decrease_tol, interpolated_damping, saddle_free
        As :func:`newton`'s.
    shift_gradients : callable, optional
        ``shift_gradients(points, rows, aux)``: the gradients (K, s, m) at s forward-difference shifts (K, s, m)
        of an accepted trial of datasets ``rows`` (s = m, or fewer with ``trailing_curvature``), ``aux`` its state
        (a list of arrays (K, ...)).  The
        shifts are then evaluated only around accepted trials, whose Hessians alone are kept (a rejected trial's
        shifts are wasted work: a GLMM's Laplace deviance, far from quadratic at the start, rejects several), and
        they can start from the trial's state (a GLMM's mode there).  It is called at every accepted point (and
        again at a point whose last columns are differenced later, with the state kept there), so that a caller can
        keep each dataset's state at its current point (a GLMM's next trials start from that mode); with ``secant``
        at a point whose curvature is an update, with no shifts (K, 0, m), for that alone.
    trailing_curvature : callable, optional
        With ``shift_gradients``: ``trailing_curvature(points, rows, aux)``, the Hessian's trailing r x r block
        (K, r, r) at accepted points (K, m) of datasets ``rows``, ``aux`` their states: an approximation of the
        block that costs less than its r forward differences (a GLMM's curvature in beta,
        :func:`hierpool.algebra.laplace_batch.fixed_effects_curvature`).  The search then shifts only the first
        m - r coordinates, whose differences give the Hessian's other blocks, and takes the block from it.  Where
        it would stop, the last r columns are differenced too, and the stopping rule is read again on the full
        forward-difference Hessian: where that does not confirm the stop, the search goes on from its step and
        differences every coordinate from then on, as it does after a step whose decrease strayed from its model's
        (:func:`_model_failed`) or after :data:`APPROXIMATE_PASSES` passes.  The curvature returned, and the
        convergence reported, are the full forward-difference Hessian's.
    secant : bool
        With ``shift_gradients`` (and no ``trailing_curvature``): each accepted point's Hessian is the last one's
        secant update (:class:`_SecantCurvature`), its forward differences taken at the first point and where the
        update is distrusted: where an accepted step's decrease strayed from its model's (:func:`_model_failed`),
        where a stop on an update is not confirmed, and at every point after :data:`APPROXIMATE_PASSES` updates.
        A stop on an update is read again on the forward-difference Hessian there, as a stop on an approximate
        trailing block is, and the decrease stop is at :data:`SECANT_DECREASE_SHARE` of ``decrease_tol``.  A pass
        then costs one point, not m + 1, for 1.3 to 1.7 times the passes (benchmarks/RESULTS.md, twenty-fifth
        session).
    settled : callable, optional
        ``settled(rows, theta, value, gradient, step, definite)``: after each pass, whether the searches of datasets
        ``rows`` (A,) may end now, their question answered before the optimum is reached (A,) bool, from each one's
        point (A, m), criterion (A,), gradient (A, m), next step (A, m) and whether its curvature is positive
        definite (A,) (the step a Newton step, not a saddle-free one).  Such a search ends where it stands; its
        ``converged`` is still the stopping rules' verdict on that point, so the caller keeps its own record of what
        it settled (a profile's point already far above the value it is compared with; a search whose model points
        beyond its parameter's range).

    Returns
    -------
    (theta, value, newton_step, iterations, converged[, curvature])
        Each (B, ...), as :func:`newton`'s.
    """
    theta = np.array(theta0, dtype=float)
    n, m = theta.shape
    width, step_tol_default, rounding_step_tol, converged_tolerances = _tolerances(theta.dtype)
    converged_step, converged_decrease, rounding = converged_tolerances
    width = width if fd_width is None else fd_width
    if secant and decrease_tol is not None:
        decrease_tol = SECANT_DECREASE_SHARE * decrease_tol
    tolerances = (step_tol or step_tol_default, rounding_step_tol, decrease_tol)
    lengths = np.asarray(STEP_LENGTHS, dtype=float)
    value, gradient = np.full(n, np.inf), np.zeros((n, m))
    curvature, damping = np.tile(np.eye(m), (n, 1, 1)), np.zeros(n)
    next_step = np.zeros((n, m))  # the first pass only probes theta0 (a zero step), as newton's
    passes = np.zeros(n, dtype=np.int64)
    lazy = shift_gradients is not None
    if secant and (not lazy or trailing_curvature is not None):
        raise ValueError("secant takes shift_gradients and no trailing_curvature")
    if secant:
        shifted = _SecantCurvature(shift_gradients, n, m, width)
    else:
        shifted = _ShiftedCurvature(shift_gradients, trailing_curvature, n, m, width) if lazy else None
    active = np.arange(n)
    last_rejected = np.zeros(n, dtype=bool)  # whether a dataset's last pass was rejected (_damping_after)
    for iteration in range(max_iterations):
        if not active.size:
            break
        th, v, g, d, step = theta[active], value[active], gradient[active], damping[active], next_step[active]
        scale = _curvature_scale(curvature[active], np)
        trials = th[:, None, :] + lengths[None, :, None] * step[:, None, :]  # (A, P, m)
        if lazy:
            values, gradients, trial_aux = value_and_grad(trials, active)
            gradients = gradients[:, :, None, :]  # (A, P, 1, m): the shifts come after the choice
        else:
            every, steps = _probe_points(trials, width, np)  # (A, P, m + 1, m): each trial, then its shifts
            values, gradients = value_and_grad(every.reshape(len(active), -1, m), active)
            values = values.reshape(len(active), -1, m + 1)[..., 0]
            gradients = gradients.reshape(len(active), -1, m + 1, m)
        values = np.where(np.isfinite(values), values, np.inf)
        best = np.argmin(values, axis=1)
        rows = np.arange(len(active))
        improved = values[rows, best] < v
        rejected = (step, np.sum(g * step, axis=-1), values[rows, best] - v) if interpolated_damping else None
        new_damping = _damping_after(improved, d, scale, damping_growth, np, last_rejected[active], rejected)
        last_rejected[active] = ~improved
        new_gradient = np.where(improved[:, None], gradients[rows, best, 0], g)
        kept = active[improved]
        if trailing_curvature is not None or secant:  # an approximate curvature: is its model still trusted?
            taken = trials[rows, best] - th
            shifted.differenced[active[_model_failed(improved & shifted.approximate[active], taken, g,
                                                     curvature[active], v, values[rows, best])]] = True
        theta[kept], value[kept] = trials[rows, best][improved], values[rows, best][improved]
        gradient[active], damping[active] = new_gradient, new_damping
        if not lazy:
            curvature[kept] = _finite_difference_hessians(gradients[rows, best], steps[rows, best], np)[improved]
        elif kept.size:
            curvature[kept] = shifted.at(theta[kept], kept, [a[rows, best][improved] for a in trial_aux],
                                         gradients[rows, best, 0][improved],
                                         previous=(th[improved], g[improved], curvature[kept]))
        # the next pass's step, here, so that the stopping rule can read it
        next_step[active], model_step, definite = _next_step(curvature[active], new_gradient, new_damping, np,
                                                             saddle_free)
        # each active dataset's, for settled (the check below reads a subset into ``definite``)
        definite_now = np.array(definite) if settled is not None else None
        done = _stops(np.bool_(iteration == 0), step, th, improved, new_gradient, new_damping, scale, tolerances, np,
                      theta[active], model_step, definite)
        # a stop on an approximate curvature: the stopping rule is read again on the full forward-difference
        # Hessian there (its rules on the model's step and decrease; the one on the step just taken reads no
        # curvature); where it does not stop, the search goes on from that Hessian's step, differencing every
        # coordinate from then on (with an approximate trailing block) or at the next accepted point (secant)
        check = np.flatnonzero(done & shifted.approximate[active]) if lazy else np.zeros(0, np.int64)
        if check.size:
            at = active[check]
            curvature[at] = shifted.complete(at, theta[at], gradient[at])
            next_step[at], model_step, definite = _next_step(curvature[at], new_gradient[check],
                                                             new_damping[check], np, saddle_free)
            done[check] = _stops(np.bool_(iteration == 0), step[check], th[check], improved[check],
                                 new_gradient[check], new_damping[check], scale[check], tolerances, np, theta[at],
                                 model_step, definite)
            if settled is not None:
                definite_now[check] = definite
            shifted.differenced[at[~done[check]]] = True
        if settled is not None:
            done |= settled(active, theta[active], value[active], gradient[active], next_step[active], definite_now)
        passes[active] += 1
        active = active[~done]
    last = np.flatnonzero(shifted.approximate) if lazy else np.zeros(0, np.int64)
    if last.size:  # out of passes on an approximate curvature: the full one, for the vcov
        curvature[last] = shifted.complete(last, theta[last], gradient[last])
    newton_step, converged = _final_step(theta, value, gradient, curvature, tolerances, converged_step,
                                         converged_decrease, rounding, np)
    return (theta, value, newton_step, passes - 1, converged) + (curvature,) * with_curvature
