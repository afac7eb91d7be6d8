"""Minimizing the profiled objective over theta, and checking the optimum.

The objective has an exact gradient (closed-form adjoints, on the host or in a
compiled program, :func:`runs_on_host`), so a bounded quasi-Newton method
(L-BFGS-B, Byrd et al. 1995) replaces lme4's derivative-free BOBYQA.  Boundary
fits (a variance component at zero) are legitimate optima: L-BFGS-B projects
onto the bound and stops there exactly, as lme4's optimizers do.

A small model on the host first tries NLopt's low-storage BFGS on unconstrained theta
(:func:`_interior_optimum`), which imports in milliseconds where ``scipy.optimize`` takes about
half a second, more than such a fit (benchmarks/RESULTS.md, "First fits"); its optimum is kept
only when it is certified interior (a strict local minimum away from every bound), and
L-BFGS-B decides every other fit as before.

Convergence and singularity checks are a stage of their own
(:func:`check_optimum`), mirroring lme4's ``checkConv`` and ``isSingular``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import nlopt
import numpy as np

from ..algebra import criterion, one_term
from ..algebra.checks import SINGULAR_TOL, lme4_gradient_measure, onto_boundary, singular_rows
from ..algebra.compiler_options import compile_pays
from ..algebra.criterion import host_objective_and_gradient, objective
from ..algebra.linalg import (
    OTHER_MINIMUM_MARGIN,
    boundary_axis_points,
    boundary_probes,
    canonical_theta,
    decade_unit,
    log_weights_unit,
    terms_theta_scales,
    theta_lower_bounds,
    theta_start,
    weights_unit,
)
from ..algebra.start import known_sds_size, moment_theta
from ..algebra.system import MixedModelSystem, evaluation_flops, location_shift, on_device
from ..algebra.system import on_host as to_host
from ..errors import ArgumentError, ConvergenceError, integer_argument, optional_boolean_argument, real_argument


@dataclass(frozen=True)
class Control:
    """Optimizer settings and check thresholds (lme4's ``lmerControl``).

    Attributes
    ----------
    max_iter : int
        Iteration limit of each L-BFGS-B run (:func:`search_past_unfactored` may run it again), and the
        evaluation limit of the NLopt run a small host fit tries first (:func:`_interior_optimum`).
    ftol, gtol : float
        L-BFGS-B's relative-reduction and projected-gradient tolerances.  ``ftol``
        stays well above the objective's rounding noise (~1e-14 relative): at
        1e-13 L-BFGS-B can spend a dozen line-search evaluations on noise.
    singular_tol : float
        A fit is singular when a diagonal element of some T_j is below this
        (lme4's ``isSingular`` tolerance, 1e-4); with known residual sds, of T_j over their unit
        (:func:`known_sds_unit`), as lme4's is relative to the residual sd.
    grad_tol : float
        Largest acceptable gradient at the optimum (lme4's ``check.conv.grad``
        tolerance, 2e-3): its projected components, and where one exceeds it,
        lme4's measure, min(|g|, |R^-1 g|) with H = R^T R off the bound
        (:func:`_scaled_gradient_max`).
    hessian_max_n : int
        Check the Hessian (finite differences of the gradient) only up to this
        many observations, as lme4 does (``calc.derivs`` for n < 1e4).
    theta_start : sequence of float or None
        Starting value; lme4's (identity factors) when None.
    max_restarts : int
        Rounds of restarts from a boundary optimum (see ``_restart_from_boundary``).
    compile : bool or None
        Run the criterion, its gradient and the solve as compiled XLA programs (True)
        or in NumPy on the host (False); None chooses by the model's size
        (:func:`hierpool.algebra.compiler_options.compile_pays`): small models are
        fitted on the host before a program would have compiled, and on a CPU models of
        200,000 rows or more are too, for their memory.  Both give the same
        numbers to rounding.
    """

    max_iter: int = 500
    ftol: float = 1e-12
    gtol: float = 1e-7
    singular_tol: float = SINGULAR_TOL
    grad_tol: float = 2e-3
    hessian_max_n: int = 10_000
    theta_start: tuple[float, ...] | None = field(default=None)
    max_restarts: int = 2
    compile: bool | None = None

    def __post_init__(self):
        """Each field checked by name (a string, a NaN or a negative tolerance reached scipy or NLopt as their own
        errors, or was accepted: grad_tol=-1 warned of a gradient of 3.7e-13 as too large)."""
        for name in ("max_iter", "hessian_max_n", "max_restarts"):
            integer_argument(f"Control.{name}", getattr(self, name), minimum=0)
        for name in ("ftol", "gtol", "singular_tol", "grad_tol"):
            real_argument(f"Control.{name}", getattr(self, name), at_least=0)
        optional_boolean_argument("Control.compile", self.compile)
        if self.theta_start is not None:
            try:
                start = np.asarray(self.theta_start, dtype=float)
            except (TypeError, ValueError):
                start = np.array([np.nan])
            if not start.size or not np.all(np.isfinite(start)):  # (its length and shape: the model's to check)
                raise ArgumentError(f"Control.theta_start must be a sequence of finite numbers, got "
                                    f"{self.theta_start!r}")


def control_argument(control) -> Control | None:
    """``control=`` as given, refused by name where it is not a :class:`Control` (or None)."""
    if control is not None and not isinstance(control, Control):
        raise ArgumentError(f"control must be an hp.Control(...), got {type(control).__name__}")
    return control


@dataclass(frozen=True)
class Optimum:
    """What the optimizer found and what the checks say about it."""

    theta: np.ndarray
    objective: float
    gradient: np.ndarray
    n_evaluations: int
    converged: bool
    is_singular: bool
    messages: tuple[str, ...]


def runs_on_host(system: MixedModelSystem, control: Control | None = None) -> bool:
    """Whether this model's closed form runs in NumPy on the host rather than as compiled programs."""
    forced = None if control is None else control.compile
    return not compile_pays(evaluation_flops(system), system.layout.n) if forced is None else not forced


def criterion_value(theta: np.ndarray, system: MixedModelSystem, reml: bool, on_host: bool) -> float:
    """The criterion alone (lme4's ``devfun``), on the host or compiled."""
    if on_host:
        return float(objective(np.asarray(theta, dtype=float), to_host(system), reml))
    return float(criterion.objective_jit(np.asarray(theta, dtype=float), on_device(system), reml=reml))


def value_and_gradient(system: MixedModelSystem, reml: bool, on_host: bool, statistics=None):
    """theta (NumPy) -> (criterion, gradient) as floats and a NumPy array, on the host or compiled.

    On the host, a model with one random-effect term whose sufficient statistics are given
    (:func:`hierpool.algebra.statistics.centred_statistics`, the fixed columns centred: the
    criterion is unchanged) is evaluated by the one-term
    specialisation of the criterion (:mod:`hierpool.algebra.one_term`: per-level k x k blocks,
    complex-step gradient), the general blocked algebra otherwise; both are the same criterion
    (tests/test_numerics.py checks them equal).
    """
    if on_host and statistics is not None:
        sigma_known = system.layout.sigma_known
        return lambda theta: one_term.value_and_gradient(theta, statistics, reml, sigma_known)
    if on_host:
        # prepared once per fit: what does not change with theta (the dense coupling, when it pays)
        return host_objective_and_gradient(to_host(system), reml)

    device_system = on_device(system)

    def compiled(theta):
        value, gradient = criterion.objective_and_grad(np.asarray(theta, dtype=float), device_system, reml=reml)
        return float(value), np.asarray(gradient, dtype=float)

    return compiled


def design_scales(design) -> np.ndarray:
    """theta's units of a design (:func:`hierpool.algebra.linalg.theta_scales`): its random-effect columns' mean
    squares over the rows."""
    return terms_theta_scales(design.terms, weights=design.weights)


def moment_start(design, scales: np.ndarray | None = None) -> np.ndarray:
    """A starting theta from moments of the least-squares residuals, term by term.

    For each random-effect term, each level's own regression of the residuals r on the
    term's columns, b_l = (Z_l^T Z_l)^-1 Z_l^T r, gives Sigma / sigma^2 by the method of
    moments (:func:`hierpool.algebra.start.moment_theta`: cov(b_l) less its sampling noise,
    over the within-level mean square; for a scalar random intercept this is one-way ANOVA,
    the estimator ``hp.fit_batch`` also starts from).  Each term is read on its own, the
    others ignored: a start, not an estimate.  With several terms only scalar random
    intercepts start there (a vector term's moment start, read with the other terms ignored,
    has led L-BFGS-B to a worse boundary optimum than lme4's identity start on a model with two
    crossed slope terms); fits with known residual sds start at lme4's identity in ``scales`` (their units then) times
    :func:`hierpool.algebra.start.known_sds_size`.  It saves
    L-BFGS-B evaluations (counts in benchmarks/RESULTS.md).  ``scales`` (:func:`design_scales`): lme4's identity
    is taken in the columns' units where no moment start is read, as the search runs in them (from theta = 1 a slope
    on a covariate of root-mean-square 900 started at u = 900, and the search fell to theta = 0, 0.56 above the
    optimum, reported converged: the forty-second session's review).
    """
    start = theta_start(tuple(t.k for t in design.terms))
    if scales is not None:  # lme4's identity in the columns' units, where no moment start is read
        start = start * scales
    if design.sigma_known:  # (in the known sds' units, as large as the residuals' spread beyond them says)
        residual, w = location_shift(design)[1], design.row_weights
        return start * float(known_sds_size(residual @ (w * residual), w.sum(), w @ w, design.n, design.p,
                                            weights_unit(w)))
    if design.p == 0:
        return start
    residual = location_shift(design)[1]  # weighted least-squares residuals of y - offset
    # the moments unweighted, theta then in the weights' units: var(e_i) = sigma^2 / w_i, so that weights times c
    # leave the model as it is with theta / sqrt(c).  Unscaled, weights of 1e7 started theta at 0.69 where the
    # optimum is 2e-4, and the search ended at theta = 0, 5.1 above it, "singular" (the forty-third session's probe).
    # By the weights' geometric mean in whole decades (algebra.linalg.weights_unit): weights spread about 1
    # (10^U(-2, 2)) start where they did; the weighted moments instead (the batch's start) lost a lower minimum in
    # 2 of 300 such datasets, and found none
    scale = weights_unit(design.row_weights)
    residual_ss = np.array([residual @ residual])
    offset = 0
    for term in design.terms:
        k, ell = term.k, term.n_levels
        size = k * (k + 1) // 2
        if len(design.terms) > 1 and term.coef_names != ("Intercept",):
            offset += size
            continue
        ztz = np.stack([np.bincount(term.index, weights=term.z[:, a] * term.z[:, b], minlength=ell)
                        for a in range(k) for b in range(k)], axis=-1).reshape(1, ell, k, k)
        cross = np.stack([np.bincount(term.index, weights=term.z[:, a] * residual, minlength=ell)
                          for a in range(k)], axis=-1)[None]
        start[offset : offset + size] = scale * moment_theta(ztz, cross, residual_ss, np.array([design.n]), 0,
                                                             1e-4)[0]
        offset += size
    return start


def _start(system: MixedModelSystem, control: Control, default: np.ndarray | None) -> np.ndarray:
    start = theta_start(system.layout.ks) if default is None else default
    if control.theta_start is None:
        return start
    given = np.asarray(control.theta_start, dtype=float)
    if given.shape != start.shape:
        raise ArgumentError(f"control.theta_start must be {start.size} values in a flat sequence, got "
                            f"{given.size} in shape {given.shape}")
    return given


def _projected_gradient(theta: np.ndarray, gradient: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Gradient with components that push into an active lower bound set to zero."""
    at_bound = (theta <= lower) & (gradient > 0)
    return np.where(at_bound, 0.0, gradient)


def _scaled_gradient_max(theta: np.ndarray, gradient: np.ndarray, lower: np.ndarray, hessian_at) -> float:
    """The largest of lme4's ``check.conv.grad`` measure over theta's components off the bound
    (:func:`hierpool.algebra.checks.lme4_gradient_measure`, the Hessian's block there); a component at its bound
    counts by its projected gradient, as before.

    The raw gradient alone warned of fits at their optimum: 12,000 rows of ``y ~ x + (x | g)`` with x in hundreds
    gave max|g| = 0.039 where x in units gave 5e-4, the same criterion (the forty-second session's review).  lme4
    does not check the gradient at all from 10,000 rows (``calc.derivs``); here the Hessian is computed where the
    raw gradient fails (:class:`_HessianCache`), whatever the rows."""
    at_bound = theta <= lower
    projected = np.abs(_projected_gradient(theta, gradient, lower))
    largest = float(np.max(projected[at_bound], initial=0.0))
    free = ~at_bound
    if not free.any():
        return largest
    measure = lme4_gradient_measure(hessian_at(theta)[np.ix_(free, free)], gradient[free])
    return max(largest, float(np.max(measure)))


def is_singular(theta: np.ndarray, ks: tuple[int, ...], tol: float = Control.singular_tol) -> bool:
    """lme4's ``isSingular``: some diagonal element of some T_j below ``tol`` (:func:`hierpool.algebra.checks.singular_rows`)."""
    return bool(singular_rows(theta, ks, tol))


#: Step of the finite-difference Hessian (central differences of the exact gradient).
HESSIAN_STEP = 1e-4


def hessian_from_gradients(gradients_at, theta: np.ndarray, lower: np.ndarray,
                           step: float = HESSIAN_STEP, gradient: np.ndarray | None = None,
                           directions: np.ndarray | None = None) -> np.ndarray:
    """The Hessian by differences of the analytic gradient.

    ``gradients_at`` maps points (m, n_theta) to their gradients (m, n_theta): the one-term
    specialisation evaluates them all at once.  By default central differences along the
    coordinates (one-sided at an active bound).  With ``gradient`` (the gradient at ``theta``) and
    ``directions`` (columns D_i, a basis in which the criterion is well scaled, none decreasing a
    bounded coordinate), forward differences along them at step and 2 step, extrapolated: G_i = H D_i, so
    H = G D^-1.  As many evaluations as the central differences, on one side of a bound; the error is
    relative to the curvature along each D_i, small when the D_i have unit curvature
    (:meth:`hierpool.closedform.glmm_scaling.BlockScaling.jacobian`).
    Along raw coordinates it is not: an uncentred covariate's coefficient made a forward difference
    of 1e-4 err by 4% in a standard error.
    """
    size = theta.size
    h = step * np.eye(size)
    if directions is not None:
        if gradient is None:
            raise ValueError("hessian_from_gradients: directions need the gradient at theta")
        # (size, size) rows i at theta + step D_i and theta + 2 step D_i: Richardson's extrapolation of the two forward
        # differences, 2 G(step) - G(2 step), cancels their O(step) error and stays on the bounds' side (a binomial
        # intercept's SE 3.5e-4 off the optimum's central differences from the first alone; now 1e-6)
        moved = gradients_at(np.concatenate([theta[None, :] + step * directions.T,
                                             theta[None, :] + 2.0 * step * directions.T]))
        near, far = (moved[:size] - gradient[None, :]) / step, (moved[size:] - gradient[None, :]) / (2.0 * step)
        hessian = np.linalg.solve(directions.T, 2.0 * near - far).T  # H D = G
        return 0.5 * (hessian + hessian.T)
    one_sided = theta - step < lower
    backward = np.where(one_sided[:, None], theta[None, :], theta[None, :] - h)
    gradients = gradients_at(np.concatenate([theta[None, :] + h, backward]))
    widths = np.where(one_sided, step, 2 * step)
    hessian = ((gradients[:size] - gradients[size:]) / widths[:, None]).T
    return 0.5 * (hessian + hessian.T)


#: A finite-difference Hessian (:data:`HESSIAN_STEP`) is reused at points this close (max |change of theta|): it is
#: the Hessian there to far better than the checks and the Newton steps need.
HESSIAN_REUSE_RADIUS = 1e-6


class _HessianCache:
    """The last finite-difference Hessian and where it was taken (:data:`HESSIAN_REUSE_RADIUS`).

    The Newton polish and the convergence check both want the Hessian at points a Newton step
    apart (~1e-8 near an optimum): each costs 2 n_theta gradients, the largest part of a small
    model's fit after the optimizer's own evaluations.
    """

    def __init__(self, gradients_at, lower: np.ndarray, step: float = HESSIAN_STEP, relative: bool = False):
        self.gradients_at, self.lower, self.unit_step, self.relative = gradients_at, lower, step, relative
        self.theta: np.ndarray | None = None
        self.hessian: np.ndarray | None = None

    def step(self, theta: np.ndarray):
        """The differences' step at ``theta``: the unit step, or with ``relative`` that times max(1, |theta_i|)."""
        return self.unit_step * np.maximum(1.0, np.abs(theta)) if self.relative else self.unit_step

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        step = self.step(theta)
        near = self.theta is not None and np.all(np.abs(theta - self.theta) <= HESSIAN_REUSE_RADIUS * (
            step / HESSIAN_STEP))
        # one-sided differences where the bound is within a step: reuse only with the same sides
        same_sides = near and np.array_equal(theta - step < self.lower, self.theta - self.step(self.theta) < self.lower)
        if not same_sides:
            self.theta = theta.copy()
            self.hessian = hessian_from_gradients(self.gradients_at, theta, self.lower, step=step)
        return self.hessian


def check_optimum(
    theta: np.ndarray, gradient: np.ndarray, optimizer_ok: bool, hessian_at, system: MixedModelSystem,
    control: Control,
) -> tuple[bool, bool, tuple[str, ...]]:
    """Convergence and singularity checks at the optimum (lme4's ``checkConv``): the projected gradient, and at an
    interior optimum of at most ``hessian_max_n`` rows the Hessian in theta (not positive definite; an eigenvalue
    ratio below :data:`UNIDENTIFIED_RATIO`, "nearly unidentifiable", which warns but does not fail the fit).

    ``hessian_at`` maps theta to the finite-difference Hessian (a :class:`_HessianCache`: the
    Newton polish's, when it was taken a step away).
    Returns (converged, is_singular, messages).
    """
    layout = system.layout
    lower = theta_lower_bounds(layout.ks)
    messages: list[str] = []
    singular = is_singular(theta, layout.ks, control.singular_tol)
    if singular:
        messages.append(SINGULAR_FIT)
    if not optimizer_ok:
        messages.append("the optimizer stopped before meeting its tolerance")
    max_grad = float(np.max(np.abs(_projected_gradient(theta, gradient, lower)))) if theta.size else 0.0
    if max_grad > control.grad_tol:  # the gradient in theta's units grows with n and with a covariate's scale
        max_grad = _scaled_gradient_max(theta, gradient, lower, hessian_at)
    if max_grad > control.grad_tol:
        messages.append(f"model failed to converge: max|scaled gradient| = {max_grad:.3g} > {control.grad_tol} "
                        "(lme4's check.conv.grad)")
    hessian = hessian_at(theta) if layout.n <= control.hessian_max_n and not singular else None
    if hessian is not None and not np.all(np.isfinite(hessian)):
        # (differences of gradients that overflow, as where the residual variance went to zero: NumPy's eigvalsh
        # raised LinAlgError on them)
        messages.append("Hessian is not finite at the optimum: the fit may not be a minimum")
    elif hessian is not None:
        eigenvalues = np.linalg.eigvalsh(hessian)
        # a negative eigenvalue within the ratio's reach of 0 is the flat direction's, by rounding (lme4's check.conv.hess
        # tests negative eigenvalues against a tolerance too): along a flat ridge the search's end point decides its sign
        if eigenvalues.min() <= -UNIDENTIFIED_RATIO * max(eigenvalues.max(), 0.0) or eigenvalues.max() <= 0:
            messages.append("Hessian is not positive definite at the optimum: the fit may not be a minimum")
        elif eigenvalues.min() < UNIDENTIFIED_RATIO * eigenvalues.max():
            # a direction in theta along which the criterion is flat: the fit's value is identified, its variance
            # components are not (lme4's "nearly unidentifiable: large eigenvalue ratio"; its check.conv.hess tol)
            messages.append(f"Model is nearly unidentifiable: large eigenvalue ratio of the Hessian in theta "
                            f"({eigenvalues.min() / eigenvalues.max():.2g}): some variance components trade against "
                            "each other (terms spanning the same columns?), or a slope's covariate is on a scale "
                            "far from the others' (rescale it)")
    converged = optimizer_ok and max_grad <= control.grad_tol and not any(m.startswith("Hessian") for m in messages)
    return converged, singular, tuple(messages)


#: Smallest accepted ratio of the Hessian's eigenvalues in theta at an interior optimum (lme4's check.conv.hess tol).
UNIDENTIFIED_RATIO = 1e-6

#: The message of a fit at the boundary (lme4's isSingular), as lme4 words it.
SINGULAR_FIT = "boundary (singular) fit: some variance component is (near) zero or a correlation is +/-1"


def _quietly(function):
    """``function`` under ``np.errstate`` that ignores division by zero, invalid values and overflow: a search's
    trial where the criterion is lost to rounding (a system near singular at a theta run off, as on noise-free data)
    is no criterion (its value not finite: searched past, or the fit refused), and NumPy's warnings of it, printed
    before the fit's own outcome, named nothing."""
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return function(*args, **kwargs)
    return quiet


@_quietly
def optimize_theta(
    system: MixedModelSystem,
    reml: bool,
    control: Control | None = None,
    start: np.ndarray | None = None,
    statistics=None,
    scales: np.ndarray | None = None,
    response_unit: float | None = None,
) -> Optimum:
    """Minimize the profiled REML criterion or deviance over theta with L-BFGS-B (:func:`_interior_optimum` first
    for a small model on the host).

    With known residual sds every stage runs on theta over :func:`known_sds_unit` (the start, the probes, the
    tolerances and the checks alike); the optimum is returned in theta.

    Parameters
    ----------
    system : MixedModelSystem
    reml : bool
    control : Control, optional
    start : numpy.ndarray, optional
        Starting theta when ``control.theta_start`` is not set (lme4's identity if None).
    statistics : BatchStatistics, optional
        A one-term model's sufficient statistics: on the host the criterion is then
        evaluated by the one-term specialisation (:func:`value_and_gradient`).
    scales : numpy.ndarray, optional
        theta's units (:func:`hierpool.algebra.linalg.theta_scales`): L-BFGS-B searches theta / scales, and the
        restarts' probes off the boundary are placed in them.  With a slope's covariate in 1/1000 of its units the
        search in theta stopped at lme4's start, 0.019 above the optimum (theta 148), unconverged (the forty-second
        session's review).
    response_unit : float, optional
        With known residual sds, the response's own unit (:func:`known_sds_response_unit`): the probes off a boundary
        go out in it too, where it is not the sds' (None: in the sds' units alone).

    Returns
    -------
    Optimum
    """
    control = control or Control()
    on_host = runs_on_host(system, control)
    # the search runs on t = theta / sd_unit: with known residual sds in their units, so that every tolerance in
    # theta (lme4's singular 1e-4, the boundary's snap, the Hessian's step, the gradient checks) is relative to them.
    sd_unit = known_sds_unit(system)
    in_theta = value_and_gradient(system, reml, on_host, statistics)

    def value_and_grad(t):
        value, gradient = in_theta(np.asarray(t, dtype=float) * sd_unit)
        return value, gradient * sd_unit

    lower = theta_lower_bounds(system.layout.ks)
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    count, unfactored = [0], [0]
    seen: dict[bytes, tuple[float, np.ndarray]] = {}

    def evaluate(theta):
        # scipy re-evaluates the start and we re-evaluate the optimum: memoize on theta
        theta = np.asarray(theta, dtype=float)
        key = theta.tobytes()
        if key not in seen:
            count[0] += 1
            try:
                seen[key] = value_and_grad(theta)
                if not np.all(np.isfinite(seen[key][1])):  # the criterion lost to rounding there (a gradient of
                    # 1e35 and NaN at theta 5e5 times the known sds: a value of -47,000 where the optimum is -2,536)
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:  # a step so long that the system lost definiteness to rounding (its
                # largest eigenvalue ~1e18): no criterion there (a start there is refused below; a search that
                # met one goes on from where it stopped: search_past_unfactored)
                unfactored[0] += 1
                seen[key] = (np.inf, np.zeros_like(theta))
        value, gradient = seen[key]
        return value, gradient.copy()

    start = _start(system, control, start) / sd_unit
    value, _ = evaluate(start)
    if not np.isfinite(value):
        raise ConvergenceError(f"the objective is not finite at the starting value theta = {start * sd_unit}")
    if statistics is not None and on_host:
        def gradients_at(points):
            gradients = one_term.value_and_gradient(points * sd_unit, statistics, reml, system.layout.sigma_known)[1]
            return gradients * sd_unit
    else:
        def gradients_at(points):
            return np.stack([evaluate(point)[1] for point in points])
    # the differences' step in theta's units, the weights' (theta over sqrt of their scale: algebra.linalg.weights_unit),
    # over t's: with weights of 1e7 a step of 1e-4 was half of theta, and the Hessian came out indefinite at the
    # optimum.  (Known sds: t is in theirs, and the step relative where |t| > 1: t is 36,000 with sds 30,000 times
    # below the response's noise, a criterion of 1e11, where a step of 1e-4 differenced rounding noise.)
    theta_unit = log_weights_unit(float(system.log_weights), system.layout.n)
    hessian_at = _HessianCache(gradients_at, lower, HESSIAN_STEP * theta_unit / sd_unit,
                               relative=system.layout.sigma_known)
    polish = system.layout.n <= control.hessian_max_n
    theta = _interior_optimum(evaluate, hessian_at, start, system, control) if on_host and polish else None
    optimizer_ok = True
    if theta is None:
        options = dict(maxiter=control.max_iter, ftol=control.ftol, gtol=control.gtol)
        unit = np.ones_like(lower) if scales is None else np.asarray(scales, dtype=float) / sd_unit  # (t's)

        def in_units(u):  # the criterion of t = u * unit: L-BFGS-B's steps the same whatever the covariates' units
            value, gradient = evaluate(u * unit)
            return value, gradient * unit

        def search(point):  # from and to t
            found = search_past_unfactored(in_units, np.asarray(point, dtype=float) / unit, bounds, options,
                                           unfactored)
            found.x = np.asarray(found.x, dtype=float) * unit
            return found

        # with known residual sds theta is an sd in the response's units, whose optimum may lie near the size of the
        # known sds (t near its units) or near the response's own spread: the probes off a boundary go out in both
        other = 1.0 if response_unit is None else response_unit / sd_unit
        probe_units = [unit] + ([unit * other] if other != 1.0 else [])
        result = _restart_from_boundary(search, search(start), control.max_restarts, system.layout.ks,
                                        control.singular_tol, probe_units, lambda t: evaluate(t)[0])
        if not np.isfinite(result.fun):
            raise ConvergenceError(f"the objective became non-finite during optimization: {result.message}")
        theta = np.maximum(np.asarray(result.x, dtype=float), lower)
        # L-BFGS-B also stops when a line search cannot improve at machine precision; the
        # gradient and Hessian checks below decide whether that is an optimum.
        optimizer_ok = bool(result.success) or result.nit < control.max_iter
        if polish:
            theta = newton_polish(evaluate, hessian_at, theta, lower)
    # a variance the search left at 1e-12 is lme4's 0 where the criterion allows (the batch's rule)
    theta = onto_boundary(theta[None], np.array([evaluate(theta)[0]]),
                          lambda points, _: np.array([evaluate(point)[0] for point in points]), system.layout.ks,
                          control.singular_tol)[0][0]
    value, gradient = evaluate(theta)
    converged, singular, messages = check_optimum(theta, gradient, optimizer_ok, hessian_at, system, control)
    return Optimum(theta * sd_unit, value, gradient / sd_unit, count[0], converged, singular, messages)


def known_sds_response_unit(design) -> float | None:
    """With known residual sds, the response's own unit: the root-mean-square of its least-squares residuals
    (unweighted), in the sds' rounding (:func:`hierpool.algebra.linalg.decade_unit`); None otherwise.

    The optimum of theta (an sd in the response's units there) lies near the sds' size when they are the response's
    noise, and may lie far below it when they are not: with sds of ~30 and noise of ~1, searched in the sds' units
    alone, y ~ x + (1 | g) + (0 + x | g) + (1 | h) ended at theta = 0, REML 1.64 above the optimum (the forty-third
    session's review).  A unit of the data, not theta = 1 in the response's units: those probes sat at 5e5 times
    sds of 1e-6, where the criterion is lost to rounding (the fifty-second session's review)."""
    if not design.sigma_known:
        return None
    residual = location_shift(design)[1]
    return float(decade_unit(-2.0 * np.log10(max(float(np.sqrt(np.mean(residual * residual))), 1e-300))))


def user_theta_singular(theta: np.ndarray, system: MixedModelSystem, ks: tuple[int, ...] | None = None,
                        tol: float = Control.singular_tol) -> bool:
    """lme4's ``isSingular`` (:func:`is_singular`) on a user's theta of ``system``'s model: with known residual sds
    theta over their unit (:func:`known_sds_unit`; 1 otherwise), the rule :func:`optimize_theta` applies to the t
    it searches.  ``ks``: the terms' widths of ``theta`` (default the system's; one term's, for that term alone).
    The one home of that rule for ``hp.lmm``'s conditioned fits, :attr:`~hierpool.closedform.results.LMMResult.is_singular`
    at a given theta and :func:`hierpool.ridge.ridge_view`."""
    return is_singular(np.asarray(theta, dtype=float) / known_sds_unit(system),
                       system.layout.ks if ks is None else ks, tol)


def known_sds_unit(system: MixedModelSystem) -> float:
    """theta's unit with known residual sds (``se=``): their geometric mean in whole decades
    (:func:`hierpool.algebra.linalg.log_weights_unit` of the weights 1 / se^2); 1 otherwise.

    With known sds sigma is 1 and theta an sd in the response's units, where lme4's tolerances are relative to the
    residual sd: :func:`optimize_theta` searches theta over this unit, so that its tolerances (lme4's singular
    1e-4, the boundary's snap, the Hessian's step, the gradient checks) are relative to the sds, and a fit scales
    with the response and its sds.  In theta itself, 119 of 120 meta-analyses with sds of ~1e-4 were flagged
    singular where the same data in units flagged 85, and the searches ended up to 0.44 apart (the fifty-second
    session's scan, benchmarks/RESULTS.md).  ``hp.fit_batch`` searches over the same unit (its conditioning)."""
    if not system.layout.sigma_known:
        return 1.0
    return float(log_weights_unit(float(system.log_weights), system.layout.n))


POLISH_GRADIENT = 1e-9

#: An optimum is certified interior when, after the Newton polish, its largest |gradient| is at most this
#: (the polish reaches ~1e-9 and below from a true interior optimum).
CERTIFIED_GRADIENT = 1e-6


def _interior_optimum(evaluate, hessian_at, start: np.ndarray, system: MixedModelSystem, control: Control):
    """NLopt's optimum, Newton-polished, where it is certified interior; None otherwise (L-BFGS-B decides).

    Certified: no diagonal element of any T_j below ``control.singular_tol`` (a boundary or
    near-boundary fit, where lme4's bound and the restarts of :func:`_restart_from_boundary`
    matter, is L-BFGS-B's), the gradient at most :data:`CERTIFIED_GRADIENT` after the polish, and
    the Hessian positive definite: a strict local minimum, the certificate L-BFGS-B's optima get
    from :func:`check_optimum`.  NLopt's L-BFGS with lme4's bounds was tried and kept only where
    certified too, but its bound handling stopped at a boundary point 2.9e-5 above the interior
    optimum of the biomarker study's correlated slopes; unconstrained (:func:`_minimize_nlopt`)
    it finds that optimum.
    """
    if control.max_iter <= 0:  # NLopt reads a limit of 0 as none: L-BFGS-B keeps lme4's meaning
        return None
    lower = theta_lower_bounds(system.layout.ks)
    found = _minimize_nlopt(evaluate, start, system.layout.ks, control)
    if found is None or not (found.within_limit and np.isfinite(found.value)) or is_singular(
            found.theta, system.layout.ks, control.singular_tol):
        return None
    theta = newton_polish(evaluate, hessian_at, found.theta, lower)
    if is_singular(theta, system.layout.ks, control.singular_tol):
        return None
    if np.max(np.abs(evaluate(theta)[1]), initial=0.0) > CERTIFIED_GRADIENT:
        return None
    return theta if np.linalg.eigvalsh(hessian_at(theta)).min() > 0 else None


@dataclass(frozen=True)
class Minimum:
    """The best point an optimizer run evaluated, and whether it stopped within ``Control.max_iter`` evaluations."""

    theta: np.ndarray
    value: float
    within_limit: bool


def _minimize_nlopt(evaluate, start: np.ndarray, ks: tuple[int, ...], control: Control) -> Minimum | None:
    """NLopt's ``LD_LBFGS`` over unconstrained theta (:func:`~hierpool.algebra.linalg.canonical_theta`).

    Negative diagonals of T_j describe the same model as positive ones, so the optimizer needs no
    bounds, and none is given: Luksan's code projects trial points onto a box, which near a bound
    turns its line searches into long zig-zags (sleepstudy's ``(Days || Subject)``: 36 evaluations
    against L-BFGS-B's 24).  Its first step is a full step along -g (L-BFGS-B scales it to unit
    length), which from a gradient of ~100 lands far from where theta lives (relative sds ~1):
    optimizing over s theta with s ~ sqrt(max|g_0|) makes that step ~1 in theta.  s is a power of
    two, so scaling is exact and the evaluations stay memoized on the user's theta.
    ``control.gtol`` is checked at each new best point (NLopt has no gradient test); the best point
    evaluated is returned, canonical.  None when a best point comes within ``control.singular_tol``
    of a boundary (the fit is L-BFGS-B's then: stopping early spares a boundary fit most of NLopt's
    evaluations).  NLopt's own failures (its line search giving up in rounding noise, a non-finite
    value) end the run like its rounding stop: the best point so far goes to the certificate.
    """
    _, first_gradient = evaluate(start)
    scale = 2.0 ** np.round(0.5 * np.log2(max(float(np.max(np.abs(first_gradient))), 1e-12)))
    optimizer = nlopt.opt(nlopt.LD_LBFGS, start.size)
    best = Minimum(start.copy(), np.inf, True)
    toward_boundary = False

    def objective_and_gradient(scaled_theta, gradient_out):
        nonlocal best, toward_boundary
        theta = np.asarray(scaled_theta, dtype=float) / scale
        value, gradient = evaluate(theta)
        if gradient_out.size:
            gradient_out[:] = gradient / scale
        if value < best.value:
            best = Minimum(theta.copy(), value, True)
            toward_boundary = is_singular(canonical_theta(theta, ks), ks, control.singular_tol)
            if toward_boundary or np.max(np.abs(gradient)) <= control.gtol:
                optimizer.force_stop()
        return value

    optimizer.set_min_objective(objective_and_gradient)
    optimizer.set_ftol_rel(control.ftol)
    optimizer.set_maxeval(control.max_iter)
    try:
        optimizer.optimize(start * scale)
        within_limit = optimizer.last_optimize_result() != nlopt.MAXEVAL_REACHED
    except Exception:  # NLopt's rounding stop, our force_stop, or its generic failure: the certificate decides
        within_limit = True
    if toward_boundary:
        return None
    return Minimum(canonical_theta(best.theta, ks), best.value, within_limit)


def newton_polish(evaluate, hessian_at, theta: np.ndarray, lower: np.ndarray, rounds: int = 2,
                  start: tuple | None = None, gradient_tol: float | None = None) -> np.ndarray:
    """Newton steps on the free coordinates while the projected gradient exceeds ``gradient_tol``
    (``POLISH_GRADIENT`` when None).

    ``evaluate(theta)`` is (criterion, gradient); ``start`` is that at ``theta`` when the caller has it.
    Used by the linear model's optimizer (a Newton step or two after L-BFGS-B) and by the GLMM's
    (:func:`hierpool.closedform.glmm_optimize._gradient_stage`, chord steps: ``hessian_at`` returning the
    one Hessian of the search's end).

    L-BFGS-B stops on its relative-reduction test (``ftol``) once steps change the criterion
    by ~1e-13 of itself, which can leave |gradient| ~1e-6 and theta ~1e-8 from the optimum:
    where it stops then depends on the path, so two codings of the same model (treatment and
    sum contrasts) end 1e-8 apart in fitted values.  A Newton step with the finite-difference
    Hessian of the exact gradient converges quadratically from there; it is kept only when
    it shrinks the gradient without raising the criterion beyond its rounding.  ``hessian_at``
    (a :class:`_HessianCache`) reuses the first round's Hessian in the second, a Newton step away.
    """
    value, gradient = evaluate(theta) if start is None else start
    gradient_tol = POLISH_GRADIENT if gradient_tol is None else gradient_tol
    for _ in range(rounds):
        free = ~((theta <= lower) & (gradient > 0))
        if not free.any() or np.max(np.abs(gradient[free])) <= gradient_tol:
            break
        hessian = hessian_at(theta)[np.ix_(free, free)]
        try:
            step = -np.linalg.solve(np.linalg.cholesky(hessian).T, np.linalg.solve(np.linalg.cholesky(hessian), gradient[free]))
        except np.linalg.LinAlgError:  # not positive definite: no Newton step
            break
        candidate = theta.copy()
        candidate[free] = np.maximum(theta[free] + step, lower[free])
        candidate_value, candidate_gradient = evaluate(candidate)
        # at this distance the criterion changes by less than its rounding: the gradient decides
        noise = 1e-13 * max(1.0, abs(value))
        shrunk = np.max(np.abs(_projected_gradient(candidate, candidate_gradient, lower))) < np.max(
            np.abs(_projected_gradient(theta, gradient, lower)))
        if candidate_value > value + noise or not shrunk:
            break
        theta, value, gradient = candidate, candidate_value, candidate_gradient
    return theta


#: Fresh L-BFGS-B runs at most after a search stopped where it met a theta whose system does not factor.
UNFACTORED_RESTARTS = 5


def search_past_unfactored(evaluate, start: np.ndarray, bounds, options: dict, unfactored: list):
    """L-BFGS-B from ``start`` on ``evaluate``; where its line search met a point whose system does not factor
    (``evaluate`` gives +inf there and counts it in ``unfactored[0]``), searched again, afresh, from where it stopped,
    while that lowers the criterion (at most :data:`UNFACTORED_RESTARTS` times).

    SciPy's L-BFGS-B does not step back from +inf: its run ends at the last finite point and reports convergence
    ("relative reduction of f"), 9.8 above the optimum on ``tests/test_lmm_boundary.py``'s case; a fresh run starts
    with a short step along the gradient, inside the region where the system factors.  Used by the linear model's
    search (:func:`optimize_theta`) and the GLMM's (:mod:`hierpool.closedform.glmm_optimize`).

    Parameters
    ----------
    evaluate : callable
        x -> (value, gradient), +inf (and any gradient) where the system does not factor.
    start : numpy.ndarray
    bounds : list of (lower, upper)
        SciPy's bounds.
    options : dict
        SciPy's L-BFGS-B options.
    unfactored : list of one int
        ``evaluate``'s count of points that did not factor (reset here).

    Returns
    -------
    scipy.optimize.OptimizeResult
        The last run's result (its ``fun`` the lowest reached).
    """
    import scipy.optimize  # half a second to import: only where the fit needs L-BFGS-B

    unfactored[0] = 0
    result = scipy.optimize.minimize(evaluate, start, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
    for _ in range(UNFACTORED_RESTARTS):
        if not unfactored[0]:
            break
        unfactored[0] = 0
        again = scipy.optimize.minimize(evaluate, result.x, jac=True, method="L-BFGS-B", bounds=bounds,
                                        options=options)
        if not again.fun < result.fun:
            break
        result = again
    return result


def _lowest_while_falling(points: np.ndarray, value_at, below: float) -> np.ndarray | None:
    """The lowest of ``points`` (a scan outward along one element at 0, :func:`~hierpool.algebra.linalg.
    boundary_axis_points`) read in order while the criterion falls: None where the first is not ``below`` (the
    boundary's criterion less the margin: the criterion rises off it there, the probes' side), else the last point
    before the criterion rises again.  A boundary that is a minimum along the element costs one evaluation."""
    lowest, lowest_value = None, below
    for point in points:
        value = value_at(point)
        if not value < lowest_value:
            break
        lowest, lowest_value = point, value
    return lowest


def _restart_from_boundary(search, result, max_rounds: int, ks: tuple[int, ...], near: float, units: list,
                           value_at):
    """Leave a boundary optimum when an interior one is better.

    When a diagonal element of some T_j ends at 0, the boundary point can be a
    local minimum (the objective depends on the last diagonal of T_j only
    through its square, so the gradient there is exactly 0 and a gradient
    method never looks past it), while a better optimum lies inside (lme4's
    derivative-free BOBYQA usually finds it).  Restart (``search``: point -> L-BFGS-B's result) from the optimum's
    :func:`~hierpool.algebra.linalg.boundary_probes` (small positive values of
    each such element, each such vector term's covariance made full rank), and keep the best optimum.  ``near``: an
    element at most this is taken as at 0 (L-BFGS-B stops short of the bound where the criterion is flat: (x | a)
    on 6 groups of 5 rows stopped at T_11 = 3.5e-5, 1.3e-4 above lme4's optimum at T_22 = 7e-6, a correlation of 1).
    ``units``: the probes' units (:func:`hierpool.algebra.linalg.theta_scales`), one or more, the probes of each in
    turn (a probe of two is searched from once).

    Known residual sds (``se=``) leave theta an sd in the response's units, and its optimum near either of two
    units, the sds' or the response's own spread (:func:`known_sds_response_unit`): probes in absolute units alone
    (0.05 and 0.5) missed a between-study sd of 0.034 beside known sds of 0.1-0.6, both searches going on to theta =
    0, 0.0079 above the optimum, reported converged (the fifty-first session's review); probes in the known sds'
    units alone missed an optimum 30 times below sds of ~30 (the forty-third session's, ``tests/test_known_se.py``).
    :func:`optimize_theta` gives both.

    ``value_at`` (a point -> its criterion): the criterion is also read along each element at 0
    (:func:`~hierpool.algebra.linalg.boundary_axis_points`, in each unit), and the lowest point of each element's
    scan searched from where it is below the optimum: a minimum nearer the boundary than the probes, which a search
    from a probe steps over.
    """
    for _ in range(max_rounds):
        x = np.asarray(result.x)
        probes = {probe.tobytes(): probe for unit in units for probe in boundary_probes(x, ks, near, unit)}
        below = result.fun - OTHER_MINIMUM_MARGIN * max(1.0, abs(result.fun))
        for unit in units:
            for points in boundary_axis_points(x, ks, near, unit):
                lowest = _lowest_while_falling(points, value_at, below)
                if lowest is not None:
                    probes.setdefault(lowest.tobytes(), lowest)
        probes = probes.values()
        if not probes:
            return result
        improved = False
        for probe in probes:
            candidate = search(probe)  # (one that met a theta ~1e9 whose system does not factor goes on past it)
            if candidate.fun < result.fun - OTHER_MINIMUM_MARGIN * max(1.0, abs(result.fun)):
                result, improved = candidate, True
        if not improved:
            return result
    return result


