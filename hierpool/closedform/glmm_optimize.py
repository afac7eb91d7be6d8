"""Maximum (Laplace) likelihood of a GLMM: glmer's two optimization stages.

lme4's ``glmer`` fits in two stages (Bates et al. 2015, sec. 5.2; ``?glmerControl``):

1. theta alone, each value's criterion evaluated at the *joint* conditional mode of (beta, u)
   (:func:`hierpool.algebra.laplace.conditional_mode` with ``joint=True``): lme4's ``nAGQ = 0``;
2. (theta, beta) together from there, each value's criterion the Laplace approximation with u
   at its conditional mode given beta: lme4's ``nAGQ = 1``.

With the criterion's exact gradient (nAGQ = 1; :mod:`hierpool.algebra.laplace_gradient`) stage 1 is not
needed: stage 2 starts one EM step away from lme4's theta (:func:`hierpool.algebra.start.em_theta`), at the
joint mode there, and runs L-BFGS-B in variables scaled by
an approximate Hessian (:mod:`hierpool.closedform.glmm_scaling`), finished by Newton steps on the final
Hessian (:func:`_gradient_stage`).  Adaptive quadrature (nAGQ > 1) and nAGQ = 0 keep glmer's
derivative-free stages: NLopt's BOBYQA (Powell 2009), the algorithm of lme4's default ``bobyqa`` and of
its ``nloptwrap``, with the diagonal of each T_j bounded below by 0.  Each evaluation starts PIRLS from the
previous evaluation's mode, on the host or in a compiled program (:class:`ModeFinder`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..algebra.checks import onto_boundary
from ..algebra.compiler_options import COMPILE_MIN_FLOPS
from ..algebra.conditioning import Conditioning, condition_fixed, conditioned_coefficients, fixed_coefficients
from ..algebra.family import Family
from ..algebra.glm import irls_step, starting_eta
from ..algebra.host_blas import one_blas_thread
from ..algebra.laplace import (
    ConditionalMode,
    conditional_mode,
    deviance_gives_likelihood,
    fixed_effect_information,
    laplace_and_gradient_on_host,
    mode_solution,
    pirls_patterns,
    saturated_deviance,
)
from ..algebra.laplace_program import (
    compile_conditional_mode,
    compile_value_and_gradient,
    conditional_mode_in_program,
    laplace_and_gradient,
    program_data,
)
from ..algebra.linalg import full_rank_probes, theta_lower_bounds, theta_to_factors
from ..algebra.quadrature import quadrature_deviance
from ..algebra.start import em_theta
from ..algebra.system import pattern_evaluation_flops
from ..errors import ConvergenceError
from ..spec.design import Design
from .glmm_convergence import finite_differences
from .glmm_scaling import block_scaling
from .optimize import hessian_from_gradients, newton_polish, search_past_unfactored

#: BOBYQA's stopping rule on the criterion (absolute, in deviance units) and on the parameters (relative).
FTOL_ABS = 1e-10
XTOL_REL = 1e-9
#: Evaluations allowed to each stage.
MAX_EVALUATIONS = 10_000
#: First step of BOBYQA in theta (lme4 starts theta at 1 on the diagonal); beta's is relative to its size.
THETA_STEP = 0.25
BETA_STEP = 0.05
#: First step of a negative binomial's log shape.
SHAPE_STEP = 0.25
#: Step in a negative binomial's log shape of the central difference that gives its derivative.
SHAPE_DIFFERENCE = 1e-3
#: A negative binomial's shape from its searched log, at most this: counts without overdispersion send the search
#: toward the Poisson limit, where exp(log shape) overflowed and the deviance's (y + shape)(...) made inf * 0 (1,600
#: NumPy warnings in one fit); here the model is the Poisson one to the deviance's last digit.
MAX_SHAPE = 1e15


def shape_of(log_shape: float) -> float:
    """A negative binomial's shape from its searched log, at most :data:`MAX_SHAPE`."""
    return float(np.exp(min(log_shape, np.log(MAX_SHAPE))))
#: L-BFGS-B's stopping rules in the gradient stage: relative reduction of the deviance, and max |projected gradient|
#: in the scaled variables (:mod:`hierpool.closedform.glmm_scaling`, where the Hessian is near the identity, so
#: that 1e-3 is ~1e-6 of deviance from the optimum): loose, because Newton steps with the final Hessian follow.
LBFGS_FTOL = 1e-12
LBFGS_GTOL = 1e-3
#: Smallest eigenvalue of each relative covariance that the EM step of the start gives (:func:`_em_step`): a start
#: off theta's boundary, where the gradient search has room in every direction.
EM_FLOOR = 1e-2
#: Forward-difference step of the final Hessian, in the scaled variables (where the deviance's curvature is ~1).
HESSIAN_STEP_SCALED = 1e-4
#: Forward-difference step of the start's Hessian rows in theta (the scaling needs only its order of magnitude).
START_STEP = 1e-4
#: Newton steps, at most, with the Hessian of the search's end (:func:`hierpool.closedform.optimize.newton_polish`),
#: until the largest free |gradient| of the deviance is below POLISH_GRADIENT: a step from there would change
#: the deviance by ~1e-12 (PIRLS's own tolerance), so the linear model's 1e-9 would only spend evaluations.
POLISH_MAX_STEPS = 5
POLISH_GRADIENT = 1e-6
#: Where the chord steps leave a free |gradient| above REFRESH_GRADIENT, the Hessian is taken again where they
#: ended and the steps repeated, at most HESSIAN_REFRESHES times.  L-BFGS-B can stop far from the optimum (its
#: relative-reduction test after one tiny step: a crossed Poisson model 0.24 above it with |gradient| 4.7), where the
#: Hessian of its end makes the chord steps converge slowly (5 of them left |gradient| 0.016, the deviance 3e-6
#: above the optimum, reported converged).
HESSIAN_REFRESHES = 2
REFRESH_GRADIENT = 1e-4
#: ...and where they moved the point by more than this in the scaled variables (unit curvature): the standard errors
#: read the Hessian, which should be the optimum's.  Taken before chord steps that moved theta by 0.0027 (of 0.168), it
#: gave a binomial intercept's SE 5.5e-3 off the optimum's central differences (the batch's, from its end: 1e-5).
REFRESH_MOVE = 1e-3
#: Rows from which PIRLS runs in a compiled program (:mod:`hierpool.algebra.laplace_program`) rather than on
#: the host.  A fit evaluates the criterion 20-60 times (the scaled search), the host's cost grows with the
#: rows, and the program's compilation (seconds) pays only when the host's fit would take longer: on a
#: Bernoulli model with 100 rows a group the host won at 200,000 rows and lost at 1,000,000 (benchmarks/
#: RESULTS.md, "GLMMs on the host").
COMPILE_MIN_ROWS = 500_000
#: Factorizations of the working system per evaluation of the criterion and its gradient (PIRLS's steps, the
#: mode's and the gradient's), with which a fit's work per evaluation is compared with the linear model's
#: threshold for compiling (:data:`hierpool.algebra.compiler_options.COMPILE_MIN_FLOPS`): a large crossed
#: factor (a dense rest of a thousand columns) is compiled whatever the rows.
PIRLS_STEPS_PER_EVALUATION = 5


class ModeFinder:
    """Conditional modes (and, where available, the criterion's gradient) for repeated calls on one design.

    ``finder(theta, beta, family, joint=, start_u=)`` is a :class:`ConditionalMode`: on the host
    (:func:`hierpool.algebra.laplace.conditional_mode`) with the system patterns found once, or in the
    compiled program (``compiled``; by default from :data:`COMPILE_MIN_ROWS` rows or a system of
    :data:`~hierpool.algebra.compiler_options.COMPILE_MIN_FLOPS` per evaluation, where the program's
    log-likelihood is exact, :func:`hierpool.algebra.laplace.deviance_gives_likelihood`).  There,
    :meth:`with_gradient` gives the Laplace criterion's exact gradient in (theta, beta) too
    (:mod:`hierpool.algebra.laplace_gradient`, on the host or in the program).  The programs start
    compiling here, in the background; until the gradient program is ready the host evaluates (the
    two agree to rounding), so a fresh process fits while it compiles.
    """

    def __init__(self, design: Design, family: Family, compiled: bool | None = None):
        self.design = design
        self.patterns = pirls_patterns(design)
        if compiled is None:
            # a PIRLS step factors the system as the linear model's criterion does, several steps an evaluation
            flops = PIRLS_STEPS_PER_EVALUATION * pattern_evaluation_flops(self.patterns[False])
            compiled = design.n >= COMPILE_MIN_ROWS or flops >= COMPILE_MIN_FLOPS
        # the criterion's mu-dependence is the deviance's (no rounding)
        exact = deviance_gives_likelihood(design, family)
        self.compiled = compiled and exact
        self.gradient_available = exact
        self._saturated: dict = {}
        if self.compiled:
            self.data = {joint: program_data(design, self.patterns[joint]) for joint in (True, False)}
            if self.gradient_available:
                self._gradient_program = compile_value_and_gradient(self.data[False], family)
            else:
                compile_conditional_mode(self.data[True], family, True)
                compile_conditional_mode(self.data[False], family, False)

    def _saturated_deviance(self, family: Family) -> float:
        if family.shape not in self._saturated:  # one value per negative binomial shape
            self._saturated[family.shape] = saturated_deviance(self.design, family)
        return self._saturated[family.shape]

    def _host_saturated(self, family: Family) -> float | None:
        # the host's PIRLS takes the log-likelihood from the deviance where it may (the program always does)
        return self._saturated_deviance(family) if self.gradient_available else None

    def __call__(self, theta, beta, family: Family, joint: bool = False, start_u=None) -> ConditionalMode:
        if not self.compiled:
            return conditional_mode(theta, beta, self.design, family, joint=joint, start_u=start_u,
                                    patterns=self.patterns, saturated=self._host_saturated(family))
        if not joint and self.gradient_available:  # the one program stage 2 compiled
            return self.with_gradient(theta, beta, family, start_u)[0]
        return conditional_mode_in_program(theta, beta, self.design, family, self.data[joint], joint=joint,
                                           start_u=start_u, saturated=self._saturated_deviance(family))

    def with_gradient(self, theta, beta, family: Family, start_u=None) -> tuple[ConditionalMode, np.ndarray]:
        # until its program has compiled (in the background), the host computes the same values
        if not self.compiled or not self._gradient_program.done():
            return laplace_and_gradient_on_host(theta, beta, self.design, family, start_u=start_u,
                                                patterns=self.patterns, saturated=self._host_saturated(family))
        return laplace_and_gradient(theta, beta, self.design, family, self.data[False], start_u=start_u,
                                    saturated=self._saturated_deviance(family))


@dataclass(frozen=True)
class GLMMOptimum:
    """Where the stages ended.

    Attributes
    ----------
    theta, beta : numpy.ndarray
    deviance : float
        The -2 log-likelihood at the optimum: Laplace, by quadrature with ``nodes > 1`` (normalizing
        constants included), or the joint-mode criterion with ``stages=1``.
    mode : ConditionalMode
        PIRLS at the optimum.
    evaluations : tuple of int
        Criterion evaluations of each stage.
    shape : float or None
        A negative binomial's shape (estimated with ``estimate_shape``).
    gradient, hessian : numpy.ndarray or None
        The deviance's derivatives in (theta, beta), the shape held (glmer's ``calc.derivs``), or in (theta, beta~)
        where X was conditioned (``conditioning``).  With the exact gradient (Laplace): the gradient at the
        optimum, and the Hessian by forward differences of it (two steps, extrapolated) along the scaled search's
        directions where the Newton steps that finish the search last took it (at most 1e-3 away in the scaled
        variables: :data:`REFRESH_MOVE`; ~1e-6 relative in the standard errors).  Otherwise (quadrature, nAGQ = 0's none) central differences of the deviance at the
        optimum (:func:`hierpool.closedform.glmm_convergence.finite_differences`).  None with ``stages=1`` or
        ``derivatives=False``.
    beta_hessian : numpy.ndarray or None
        Where set, the Hessian in (theta~, beta) (or (theta~, beta~)) of the same model with its random-effect
        columns conditioned, at the same optimum (:func:`hierpool.closedform.glmm._fit_conditioned`): the beta
        block of its inverse is the beta block of ``hessian``'s in exact arithmetic (theta~ is a reparametrization
        of theta, beta is unchanged), and better computed where the user's theta is ill-scaled.  ``vcov`` reads it.
    conditioned_fit : tuple or None
        Set with ``beta_hessian``: (its design, its optimum), the conditioned fit whose derivatives ``hp.glmm``'s
        convergence checks read (:func:`hierpool.closedform.glmm._convergence_report`).
    conditioning : Conditioning or None
        Where set, X's columns were far from centred or unit scale and the search ran on the conditioned design's
        X A (:func:`~hierpool.algebra.conditioning.condition_fixed`): ``beta`` is the user's, A beta~, but the
        derivatives are in beta~ (the user's, whose condition grows as (a covariate's mean / sd)^2, would have to
        be inverted for the SEs), and ``mode``'s eta is X A beta~ + Z b, the same.
    """

    theta: np.ndarray
    beta: np.ndarray
    deviance: float
    mode: ConditionalMode
    evaluations: tuple[int, ...]
    shape: float | None = None
    gradient: np.ndarray | None = None
    hessian: np.ndarray | None = None
    beta_hessian: np.ndarray | None = None
    conditioned_fit: tuple | None = None
    conditioning: Conditioning | None = None


def _minimize(criterion, start, lower, step):
    """BOBYQA from ``start``: (best point, evaluations).  The best point seen is kept, so that
    NLopt's "roundoff limited" end (no further progress possible) returns it too."""
    import nlopt  # the closed form's small-fit optimizer too (closedform.optimize)

    best = {"x": np.asarray(start, dtype=float), "value": np.inf, "count": 0}

    def objective(x, grad):
        value = criterion(x)
        best["count"] += 1
        if value < best["value"]:
            best["x"], best["value"] = np.array(x), value
        return value

    optimizer = nlopt.opt(nlopt.LN_BOBYQA, len(start))
    optimizer.set_lower_bounds(lower)
    optimizer.set_min_objective(objective)
    optimizer.set_ftol_abs(FTOL_ABS)
    optimizer.set_xtol_rel(XTOL_REL)
    optimizer.set_maxeval(MAX_EVALUATIONS)
    optimizer.set_initial_step(step)
    try:
        optimizer.optimize(np.asarray(start, dtype=float))
    except nlopt.RoundoffLimited:
        pass
    return best["x"], best["count"]


def fit_laplace(design: Design, family: Family, stages: int = 2, nodes: int = 1,
                estimate_shape: bool = False, compiled: bool | None = None, derivatives: bool = True,
                start: np.ndarray | None = None) -> GLMMOptimum:
    """Fit a GLMM by the Laplace approximation (``stages=2``, glmer's ``nAGQ = 1``), by adaptive
    quadrature (``nodes > 1``, glmer's ``nAGQ = nodes``), or at the joint mode (``stages=1``, ``nAGQ = 0``).

    Parameters
    ----------
    design : Design
        From :func:`hierpool.spec.design.build_design` with the family.
    family : Family
        From :func:`hierpool.algebra.family.family` (a negative binomial with its shape).
    stages : {1, 2}
    nodes : int
        Gauss-Hermite nodes of stage 2 (:func:`hierpool.algebra.quadrature.quadrature_deviance`;
        more than 1 only for one scalar random-effect term); 1 is the Laplace approximation.
    estimate_shape : bool
        A negative binomial's shape is a parameter of stage 2 too (on the log scale), from the
        family's shape as the start; stage 1 holds it there.  glmer.nb alternates a shape search
        with glmer fits; one joint stage maximizes the same Laplace likelihood.
    compiled : bool, optional
        PIRLS in a compiled program or on the host (:func:`mode_finder`; None decides by size).
    derivatives : bool
        Compute the gradient and Hessian at the optimum (stage 2 only), as glmer does for its
        convergence checks and its standard errors.  With the exact gradient the Hessian also finishes
        the search (Newton steps); without it the fit stops where L-BFGS-B did, within ~1e-6 of the
        optimum's deviance.
    start : numpy.ndarray, optional
        (theta, beta) where stage 2 starts in place of the EM step's point (the Laplace approximation with
        the exact gradient only): the optimum of the same model on conditioned columns, mapped to these
        (:func:`hierpool.closedform.glmm.glmm`).

    Returns
    -------
    GLMMOptimum
        Where X's columns are far from centred or unit scale (a covariate around 2,000 or 1e7, timestamps: the
        rule of :func:`~hierpool.algebra.conditioning.fixed_conditioning`), every stage searches on X A, beta =
        A beta~ (the same deviance at every point), and ``beta`` is mapped back (``GLMMOptimum.conditioning``).
        BOBYQA with x shifted by 2,000 stopped 7e-4 above the optimum (nAGQ = 5), and PIRLS's penalized system
        with a covariate ~1e7 beside its interaction with a factor was not positive definite in float64.
    """
    conditioning = condition_fixed(design)
    if conditioning is not None:
        design = conditioning.design
        if start is not None:  # the user's beta carried to beta~
            n_theta = len(start) - design.p
            start = np.concatenate([start[:n_theta], conditioned_coefficients(conditioning.fixed, start[n_theta:])])
    find_mode = ModeFinder(design, family, compiled)
    with one_blas_thread(sum(ell * k for ell, k in find_mode.patterns[True].layout.rest_blocks)):
        optimum = _fit(find_mode, family, stages, nodes, estimate_shape, derivatives, start)
    if conditioning is None:
        return optimum
    beta = fixed_coefficients(conditioning.fixed, optimum.beta)
    return replace(optimum, beta=beta, mode=replace(optimum.mode, beta=beta), conditioning=conditioning)


def working_start(design, family: Family) -> np.ndarray:
    """beta of glm.fit's first IRLS step: the weighted least-squares fit of the working response at the family's
    starting means (R's ``mustart``, lme4's start of eta), without random effects."""
    eta = starting_eta(family, design.y, design.row_weights)
    return irls_step(design.X, design.y, eta, design.row_weights, design.offset, family)


#: The joint mode from glm.fit's first step replaces the one from beta = 0 where its criterion is lower by more than
#: FIRST_MODE_GAIN (relative): the joint mode is unique, so both starts end at it but for PIRLS's tolerance, unless
#: one stalled.  It is sought only where that step's linear predictor X beta is FIRST_STEP_FAR or more from beta = 0's
#: somewhere (the offset far from the response's link scale): a PIRLS more on every fit costs more than it saves
#: (benchmarks/RESULTS.md, forty-fourth session).
FIRST_MODE_GAIN = 1e-8
FIRST_STEP_FAR = 10.0


def _first_joint_mode(find_mode: ModeFinder, family: Family, theta: np.ndarray, state: dict):
    """The joint conditional mode at lme4's start, from beta = 0 and from glm.fit's first step
    (:func:`working_start`, kept in ``state`` where its mode is taken): the one from beta = 0 unless it fails
    (PIRLS's system has no factor, or no finite mode is found) or, where glm.fit's step is far from beta = 0
    (:data:`FIRST_STEP_FAR`), the other's criterion is lower by more than :data:`FIRST_MODE_GAIN`.  An offset far
    from the response's scale (a constant log exposure of 50: mu = 5e21 at every row; of -50: mu = 2e-22) failed
    from beta = 0; a Bernoulli's constant offset of 30 (mu = 1 to double precision at every row, the working
    weights 0) stalled there at beta ~ 1e14, -2 log L 2829 where the mode's is 142, and the fit ended there, not
    converged.  Where both fail, the first attempt's outcome stands (its error,
    or its mode, which the gradient stage refuses with its reason)."""
    design = find_mode.design
    try:
        mode, error = conditional_mode(theta, state["beta"], design, family, joint=True,
                                       patterns=find_mode.patterns), None
    except np.linalg.LinAlgError as failed:
        mode, error = None, failed
    found = mode is not None and np.isfinite(mode.laplace)
    try:  # (its least squares on non-finite working values fail: then beta = 0's outcome stands)
        with np.errstate(all="ignore"):
            beta = working_start(design, family)
            far = not np.all(np.abs(design.X @ beta) < FIRST_STEP_FAR)
        if not found or far:
            with np.errstate(all="ignore"):
                again = conditional_mode(theta, beta, design, family, joint=True, patterns=find_mode.patterns)
            if np.isfinite(again.laplace) and (
                    not found or again.laplace < mode.laplace - FIRST_MODE_GAIN * max(1.0, abs(mode.laplace))):
                state["beta"] = beta
                return again
    except np.linalg.LinAlgError:
        pass
    if found or error is None:
        return mode
    raise error


def _fit(find_mode: ModeFinder, family: Family, stages: int, nodes: int, estimate_shape: bool,
         derivatives: bool, start: np.ndarray | None = None) -> GLMMOptimum:
    """:func:`fit_laplace`'s stages with the mode finder made."""
    design = find_mode.design
    ks = tuple(t.k for t in design.terms)
    lower = theta_lower_bounds(ks)
    state = {"u": None, "beta": np.zeros(design.p)}
    if start is not None:
        if not (stages == 2 and nodes == 1 and find_mode.gradient_available):
            raise ValueError("start= is for the Laplace approximation with the exact gradient")
        optimum = _gradient_stage(find_mode, family, np.asarray(start, dtype=float), lower, 0, None, derivatives,
                                  estimate_shape)
        return _on_lme4s_zero(find_mode, family, _off_the_boundary(find_mode, family, optimum, lower, derivatives,
                                                                   estimate_shape))

    def joint(theta):
        mode = find_mode(theta, state["beta"], family, joint=True, start_u=state["u"])
        state["u"], state["beta"] = mode.u, mode.beta
        return mode.laplace

    theta = np.where(np.isfinite(lower), 1.0, 0.0)  # lme4's start: each T_j the identity
    if stages == 2 and nodes == 1 and find_mode.gradient_available:
        # with the exact gradient, stage 2 starts from one EM step away from lme4's theta, at the joint mode
        # there: stage 1's search only found a start for a derivative-free stage 2 (glmer's reason for it)
        mode = _first_joint_mode(find_mode, family, theta, state)
        theta, mode = _em_step(find_mode, family, theta, mode)
        optimum = _gradient_stage(find_mode, family, np.concatenate([theta, mode.beta]), lower, 1, mode.u,
                                  derivatives, estimate_shape)
        return _on_lme4s_zero(find_mode, family, _off_the_boundary(find_mode, family, optimum, lower, derivatives,
                                                                   estimate_shape))
    if stages == 1 and estimate_shape:
        # glmer.nb at nAGQ = 0: the shape too is chosen on the joint mode's deviance (it stayed at its start, 1, with
        # the fixed effects and the sd that shape gives: epil's 1.0 for glmer.nb's 7.40, logLik 49 lower)
        n_theta = len(theta)

        def joint_with_shape(parameters):
            nonlocal family
            family = replace(family, shape=shape_of(parameters[n_theta]))
            return joint(parameters[:n_theta])

        parameters, first = _minimize(joint_with_shape, np.append(theta, np.log(family.shape)), np.append(lower, -np.inf),
                                      np.append(np.full(len(lower), THETA_STEP), SHAPE_STEP))
        theta, family = parameters[:n_theta], replace(family, shape=shape_of(parameters[n_theta]))
    else:
        theta, first = _minimize(joint, theta, lower, np.full(len(lower), THETA_STEP))
    mode = find_mode(theta, state["beta"], family, joint=True)
    if stages == 1:
        return GLMMOptimum(theta, mode.beta, mode.laplace, mode, (first,), family.shape)
    state["u"] = mode.u
    n_theta = len(theta)
    # BOBYQA moves beta with theta (on X A where X's columns are far from centred or unit scale: fit_laplace)

    def laplace(parameters):
        beta = parameters[n_theta:]
        at = find_mode(parameters[:n_theta], beta, family, start_u=state["u"])
        state["u"] = at.u
        if nodes > 1:
            return quadrature_deviance(parameters[:n_theta], beta, design, family, nodes, at)[0]
        return at.laplace

    start = np.concatenate([theta, mode.beta])
    step = np.concatenate([np.full(n_theta, BETA_STEP), BETA_STEP * np.maximum(np.abs(mode.beta), 1.0)])
    bounds = np.concatenate([lower, np.full(design.p, -np.inf)])
    criterion = laplace
    if estimate_shape:
        if family.shape is None:
            raise ValueError("estimate_shape needs a negative binomial family with a starting shape")
        end = n_theta + design.p

        def criterion(parameters):
            nonlocal family
            family = replace(family, shape=shape_of(parameters[end]))
            return laplace(parameters[:end])

        start, step = np.append(start, np.log(family.shape)), np.append(step, SHAPE_STEP)
        bounds = np.append(bounds, -np.inf)
    parameters, second = _minimize(criterion, start, bounds, step)
    theta, beta = parameters[:n_theta], parameters[n_theta : n_theta + design.p]
    if estimate_shape:
        family = replace(family, shape=shape_of(parameters[-1]))
    mode = find_mode(theta, beta, family)
    deviance = quadrature_deviance(theta, beta, design, family, nodes, mode)[0] if nodes > 1 else mode.laplace
    gradient = hessian = None
    if derivatives:
        def deviance_at(point):
            at = find_mode(point[:n_theta], point[n_theta:], family, start_u=mode.u)
            return quadrature_deviance(point[:n_theta], point[n_theta:], design, family, nodes, at)[0] if nodes > 1 \
                else at.laplace

        gradient, hessian = finite_differences(deviance_at, np.concatenate([theta, beta]))
    return GLMMOptimum(theta, beta, deviance, mode, (first, second), family.shape, gradient, hessian)


#: Where the gradient stage starts again off a saddle at the boundary: the lowest of these along the saddle's
#: elements (:func:`_saddle_restart`).
SADDLE_STEPS = np.geomspace(1e-3, 1.0, 13)
#: A diagonal element of a T_j at most this far above its bound (0) is at the boundary (:func:`_off_the_saddle`).
#: (At 1e-3, a crossed Poisson fit that stopped at t = 0.0010035 with negative curvature there, 4.4e-4 above the
#: optimum at t = 0.027, was not restarted: tests/test_glmm_laplace.py.)
BOUNDARY_NEAR = 1e-2


def _off_the_saddle(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum, lower, derivatives: bool,
                    estimate_shape: bool) -> GLMMOptimum:
    """The gradient stage again from off a saddle at the boundary, where it stopped at one; the lower of the two.

    A diagonal element t of a T_j enters the criterion through T_j T_j^T, which is even in t where t is its column's
    only element (the last column): at t = 0 the criterion's slope in t is 0 whether t = 0 is its minimum along t (a
    zero variance: lme4's singular fit) or its maximum (a saddle).  L-BFGS-B, bounded at t >= 0 and stopping on a
    small projected gradient, can stop next to such a saddle (Bernoulli ``(1 | subj) + (1 + x | item)``, 30 x 20:
    6 of 40 datasets stopped with the slope's t near 2e-5, their deviance up to 0.40 above glmer's optimum, and the
    fit reported singular; benchmarks/RESULTS.md, twenty-fifth session).  Where the final Hessian's curvature in
    such a t (at most :data:`BOUNDARY_NEAR`) is negative, t is set to the lowest point along it
    (:func:`_saddle_restart`) and the stage run again from there (:func:`_restart_stage`); a true zero variance has
    positive curvature there and is left as it is.
    """
    if optimum.hessian is None:
        return optimum
    n_theta = len(lower)
    curvature = np.diagonal(optimum.hessian)[:n_theta]
    saddle = np.isfinite(lower) & (optimum.theta - lower <= BOUNDARY_NEAR) & (curvature < 0)
    if not saddle.any():
        return optimum
    at_shape = replace(family, shape=optimum.shape) if estimate_shape else family
    theta = _saddle_restart(find_mode, at_shape, optimum, saddle)
    return _restart_stage(find_mode, family, optimum, lower, derivatives, estimate_shape, [theta])


def _off_the_boundary(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum, lower, derivatives: bool,
                      estimate_shape: bool) -> GLMMOptimum:
    """The gradient stage's optimum after its restarts off the boundary: off a saddle (:func:`_off_the_saddle`),
    then off a face of a vector term other than its last diagonal (:func:`_off_the_face`)."""
    optimum = _off_the_saddle(find_mode, family, optimum, lower, derivatives, estimate_shape)
    return _off_the_face(find_mode, family, optimum, lower, derivatives, estimate_shape)


def _on_lme4s_zero(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum) -> GLMMOptimum:
    """``optimum`` with each diagonal of a T_j below SINGULAR_TOL at 0 where the Laplace deviance there (beta held)
    rises by no more than rounding (:func:`hierpool.algebra.checks.onto_boundary`, the batch's rule), and its mode
    there: the gradient stage left 1e-15 to 3e-10 where glmer's bounded search ends at 0 (12 of 17 singular
    cbpp-shaped fits; the forty-second session)."""
    family = family if optimum.shape is None else replace(family, shape=optimum.shape)

    def deviance_at(points, _):
        return np.array([find_mode(point, optimum.beta, family, start_u=optimum.mode.u).laplace for point in points])

    theta, _ = onto_boundary(optimum.theta[None], np.array([optimum.deviance]), deviance_at,
                             tuple(t.k for t in find_mode.design.terms))
    if np.array_equal(theta[0], optimum.theta):
        return optimum
    mode = find_mode(theta[0], optimum.beta, family, start_u=optimum.mode.u)
    return replace(optimum, theta=theta[0], deviance=mode.laplace, mode=mode)


def _off_the_face(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum, lower, derivatives: bool,
                  estimate_shape: bool) -> GLMMOptimum:
    """The gradient stage again from inside, where ``optimum`` ends with a vector term's T_j singular off its last
    diagonal (:func:`~hierpool.algebra.linalg.full_rank_probes`, beta held); the lowest kept.  On the intercept's
    face (T_11 = 0) a random slope's search stopped 0.03-0.11 above the optimum on the face of a correlation of
    +-1 that ``hp.fit_batch`` found (the reviewer's sweep: Poisson and binomial ``(1 + x | g)``, ``(1 + x + x2 |
    g)``), reported converged."""
    probes = full_rank_probes(optimum.theta, tuple(t.k for t in find_mode.design.terms))
    return _restart_stage(find_mode, family, optimum, lower, derivatives, estimate_shape, probes)


#: A restart of the gradient stage is kept where its deviance is this much (relative) below the optimum's: not for
#: a rounding's gain (:func:`_restart_stage`).
RESTART_GAIN = 1e-10


def _restart_stage(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum, lower, derivatives: bool,
                   estimate_shape: bool, starts) -> GLMMOptimum:
    """The gradient stage run again from each theta of ``starts`` (``optimum``'s beta, conditional modes and shape
    held as its start), the lowest deviance kept (a restart only :data:`RESTART_GAIN` below or more), the
    evaluations of every run counted.  A start where PIRLS fails is passed over: the others remain."""
    if not len(starts):
        return optimum
    at_shape = replace(family, shape=optimum.shape) if estimate_shape else family
    best, evaluations = optimum, optimum.evaluations[-1]
    for theta in starts:
        try:
            again = _gradient_stage(find_mode, at_shape, np.concatenate([theta, optimum.beta]), lower,
                                    optimum.evaluations[0], optimum.mode.u, derivatives, estimate_shape)
        except (np.linalg.LinAlgError, ConvergenceError):
            continue
        evaluations += again.evaluations[-1]
        if again.deviance < best.deviance - RESTART_GAIN * abs(best.deviance):
            best = again
    return replace(best, evaluations=(optimum.evaluations[0], evaluations))


def _saddle_restart(find_mode: ModeFinder, family: Family, optimum: GLMMOptimum, saddle: np.ndarray) -> np.ndarray:
    """theta to run the gradient stage again from, off a saddle at the boundary (:func:`_off_the_saddle`): the
    ``saddle`` elements set to the lowest point of the criterion along them among :data:`SADDLE_STEPS` (the other
    parameters held), :data:`THETA_STEP` where none is finite.  From THETA_STEP itself, a crossed Poisson model's
    search stepped over the well at 0.056 back to the saddle (-2 log L 0.053 above the optimum, where ``hp.fit_batch``
    found it)."""
    best, best_value = THETA_STEP, np.inf
    for step in SADDLE_STEPS:
        try:
            value = find_mode(np.where(saddle, step, optimum.theta), optimum.beta, family,
                              start_u=optimum.mode.u).laplace
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(value) and value < best_value:
            best, best_value = step, value
    return np.where(saddle, best, optimum.theta)


def _em_step(find_mode: ModeFinder, family: Family, theta, mode: ConditionalMode) -> tuple[np.ndarray, ConditionalMode]:
    """(theta, the joint mode there) one EM step from ``theta`` (:func:`hierpool.algebra.start.em_theta`, with
    lme4's conditional variances at the joint ``mode``), or ``theta`` and ``mode`` themselves where the step
    does not give a finite mode.  On the Laplace fits of the reference models it saves the gradient search
    up to a third of its evaluations (VerbAgg 26 -> 18, epil 26 -> 16; benchmarks/RESULTS.md)."""
    design = find_mode.design
    ks = tuple(t.k for t in design.terms)
    if not np.isfinite(mode.laplace):  # no mode to step from (the stage after says so); LAPACK is not fed NaN
        return theta, mode
    try:
        solution = mode_solution(theta, mode, design, family, find_mode.patterns[True])
        moved = em_theta(mode.b, solution.cond_var, EM_FLOOR)
        if not np.all(np.isfinite(moved)):
            return theta, mode
        # PIRLS starts from the same effects b, in the new theta's spherical units u = T^-1 b
        start_u = tuple(np.linalg.solve(t, np.asarray(b).T).T for t, b in zip(theta_to_factors(moved, ks), mode.b))
        at = conditional_mode(moved, mode.beta, design, family, joint=True, start_u=start_u,
                              patterns=find_mode.patterns)
    except np.linalg.LinAlgError:  # a system that does not factor: lme4's start as it is
        return theta, mode
    # EM on the Laplace approximation need not lower it: the step is kept only where it does (the joint-mode
    # criterion, lme4's nAGQ = 0, at both thetas)
    if not (at.converged and np.isfinite(at.laplace) and at.laplace <= mode.laplace):
        return theta, mode
    return moved, at


def _gradient_stage(find_mode: ModeFinder, family: Family, start, lower, first: int, start_u,
                    derivatives: bool, estimate_shape: bool = False) -> GLMMOptimum:
    """Stage 2 with the criterion's exact gradient: L-BFGS-B in (theta, beta) from ``start``, in variables
    scaled by the start's approximate Hessian (:mod:`hierpool.closedform.glmm_scaling`), then the Hessian at
    its end by differences of the gradient and Newton steps with it
    (:func:`~hierpool.closedform.optimize.newton_polish`): the Hessian glmer computes for its checks and
    standard errors also finishes the search, which can therefore stop early.

    ``estimate_shape``: a negative binomial's log shape is a parameter too, its derivative by central
    differences of the criterion (two more conditional modes); the Hessian is then in (theta, beta) at
    the estimated shape, as glmer.nb's final glmer fit has it.
    """
    n_theta, n_fixed = len(lower), len(start) - len(lower)
    state, unfactored = {"u": start_u, "count": 0}, [0]
    if estimate_shape:
        start = np.append(start, np.log(family.shape))

    def family_at(x):
        return replace(family, shape=shape_of(x[-1])) if estimate_shape else family

    def value_and_gradient(x):
        if state.get("x") is not None and np.array_equal(x, state["x"]):  # L-BFGS-B starts where the scaling was made
            return state["value"], state["gradient"]
        state["count"] += 1
        theta, beta, fam = x[:n_theta], x[n_theta : n_theta + n_fixed], family_at(x)
        # a trial point far out overflows exp(eta): a non-finite criterion, read below, not NumPy's RuntimeWarning
        # (an error under ``-W error``, which stopped the fit)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                at, gradient = find_mode.with_gradient(theta, beta, fam, start_u=state["u"])
            except np.linalg.LinAlgError:  # a system that does not factor there: the search goes on from before it
                unfactored[0] += 1
                return np.inf, np.zeros_like(x)
            if estimate_shape and np.isfinite(at.laplace):
                gradient = np.append(gradient, _shape_slope(find_mode, fam, x[: n_theta + n_fixed], n_theta, at,
                                                            log_shape=x[-1]))
        if not np.isfinite(at.laplace) or not np.all(np.isfinite(gradient)):
            unfactored[0] += 1
            return np.inf, np.zeros_like(x)
        state.update(u=at.u, mode=at, x=np.array(x), value=at.laplace, gradient=gradient)
        return at.laplace, gradient

    scaling = _start_scaling(find_mode, family, start, n_theta, n_fixed, value_and_gradient, state)
    lower_x = np.concatenate([lower, np.full(len(start) - n_theta, -np.inf)])
    bounds = [(lo if np.isfinite(lo) else None, None) for lo in scaling.lower_y(lower_x)]

    def in_scaled_variables(y):
        value, gradient = value_and_gradient(scaling.to_x(y))
        return value, scaling.gradient_to_y(gradient)

    result = search_past_unfactored(in_scaled_variables, np.zeros(len(start)), bounds,
                                    dict(maxiter=MAX_EVALUATIONS, ftol=LBFGS_FTOL, gtol=LBFGS_GTOL), unfactored)
    end = np.maximum(scaling.to_x(result.x), lower_x)  # rounding in to_x must not cross a bound
    family = family_at(end)
    x = end[: n_theta + n_fixed]
    if state.get("x") is not None and np.array_equal(end, state["x"]):  # where the search evaluated last
        mode, gradient = state["mode"], state["gradient"][: n_theta + n_fixed]
    else:
        mode, gradient = find_mode.with_gradient(x[:n_theta], x[n_theta:], family, start_u=state["u"])
    hessian = None
    if derivatives:
        lower_all = lower_x[: n_theta + n_fixed]

        def gradients_at(points):
            return np.stack([find_mode.with_gradient(p[:n_theta], p[n_theta:], family, start_u=mode.u)[1]
                             for p in points])

        # forward differences from the gradient in hand (two steps, extrapolated), along the scaled variables'
        # directions (unit curvature at the start, so that the differences' error is small on every one): the
        # Hessian of glmer's standard errors and checks, and of the polish
        directions = scaling.jacobian()[: len(x), : len(x)]  # at a fixed NB shape: its row and column left out
        modes = {x.tobytes(): (mode, gradient)}

        def evaluate(point):
            state["count"] += 1
            at, point_gradient = find_mode.with_gradient(point[:n_theta], point[n_theta:], family, start_u=mode.u)
            modes[point.tobytes()] = (at, point_gradient)
            return at.laplace, point_gradient

        for _ in range(1 + HESSIAN_REFRESHES):
            hessian = hessian_from_gradients(gradients_at, x, lower_all, step=HESSIAN_STEP_SCALED, gradient=gradient,
                                             directions=directions)
            state["count"] += len(x)
            # Newton steps with this one Hessian (a chord method) finish the search, which stopped early
            taken_at = x
            x = newton_polish(evaluate, lambda _, held=hessian: held, x, lower_all, rounds=POLISH_MAX_STEPS,
                              start=(mode.laplace, gradient), gradient_tol=POLISH_GRADIENT)
            mode, gradient = modes[x.tobytes()]
            free = ~((x <= lower_all) & (gradient > 0))
            moved = np.max(np.abs(np.linalg.solve(directions, x - taken_at)), initial=0.0)
            if (not free.any() or np.max(np.abs(gradient[free])) <= REFRESH_GRADIENT) and moved <= REFRESH_MOVE:
                break
        if estimate_shape:
            polished = _polish_shape(find_mode, family, x, mode, gradient, hessian, lower_all, n_theta, state)
            moved = abs(np.log(polished[3].shape / family.shape))
            x, mode, gradient, family = polished
            if moved > REFRESH_MOVE:  # the standard errors' Hessian at the shape the fit ends at
                try:  # (where a system there does not factor, the last shape's Hessian stands)
                    hessian = hessian_from_gradients(gradients_at, x, lower_all, step=HESSIAN_STEP_SCALED,
                                                     gradient=gradient, directions=directions)
                except np.linalg.LinAlgError:
                    pass
                state["count"] += len(x)
    return GLMMOptimum(x[:n_theta], x[n_theta:], mode.laplace, mode, (first, state["count"]), family.shape,
                       gradient if derivatives else None, hessian)


#: A negative binomial fit's log shape is polished (:func:`_polish_shape`) until the profiled deviance's slope in it is
#: at most SHAPE_SLOPE_TOL, by at most SHAPE_POLISH_STEPS secant steps, the first SHAPE_SECANT_STEP long and none
#: longer than SHAPE_MAX_STEP.
SHAPE_SLOPE_TOL = 1e-6
SHAPE_POLISH_STEPS = 8
SHAPE_SECANT_STEP = 0.1
SHAPE_MAX_STEP = 2.0


def _shape_slope(find_mode: ModeFinder, family: Family, x, n_theta: int, mode, log_shape: float | None = None
                 ) -> float:
    """d deviance / d log shape at (theta, beta) = ``x``, by central differences of :data:`SHAPE_DIFFERENCE` about
    ``log_shape`` (the searched coordinate; by default the family's shape's log); NaN where a side's system does not
    factor (the gradient stage then reads the point as one that does not factor, the polish stops where it is)."""
    log_shape = np.log(family.shape) if log_shape is None else log_shape
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            sides = [find_mode(x[:n_theta], x[n_theta:], replace(family, shape=shape_of(log_shape + h)),
                               start_u=mode.u).laplace for h in (SHAPE_DIFFERENCE, -SHAPE_DIFFERENCE)]
    except np.linalg.LinAlgError:
        return float("nan")
    return float((sides[0] - sides[1]) / (2.0 * SHAPE_DIFFERENCE))


def _polish_shape(find_mode: ModeFinder, family: Family, x, mode, gradient, hessian, lower, n_theta: int,
                  state: dict):
    """(x, mode, gradient, family) at the negative binomial's profiled optimum in its log shape s: secant steps on
    the profile's slope dP/ds = dD/ds at (theta, beta)'s optimum for that shape (the envelope theorem), each
    shape's (theta, beta) by chord Newton steps with the search's Hessian ``hessian``
    (:func:`~hierpool.closedform.optimize.newton_polish`).  The lowest deviance met is kept.

    The gradient stage's L-BFGS-B runs in variables scaled by the start's curvature, where the shape's is that of
    the start's shape: at a shape in the hundreds the profile is so flat in s that the search stopped with the
    shape 222 where its optimum is 274 (-2 log L 3.7e-4 above it, reported converged; ``hp.fit_batch``, whose Newton
    steps take the shape along, found it), and the Newton steps after it hold the shape."""
    slope = _shape_slope(find_mode, family, x, n_theta, mode)
    best = (x, mode, gradient, family)
    if not np.isfinite(slope) or abs(slope) <= SHAPE_SLOPE_TOL:
        return best
    here = np.log(family.shape)
    there = here - np.sign(slope) * SHAPE_SECANT_STEP
    for _ in range(SHAPE_POLISH_STEPS):
        at_family = replace(family, shape=shape_of(there))
        modes = {}

        def evaluate(point, at_family=at_family, modes=modes, start_u=best[1].u):
            state["count"] += 1
            at, point_gradient = find_mode.with_gradient(point[:n_theta], point[n_theta:], at_family,
                                                         start_u=start_u)
            modes[point.tobytes()] = (at, point_gradient)
            return at.laplace, point_gradient

        try:
            start = evaluate(best[0])
            point = newton_polish(evaluate, lambda _: hessian, best[0], lower, rounds=POLISH_MAX_STEPS, start=start,
                                  gradient_tol=POLISH_GRADIENT)
        except np.linalg.LinAlgError:
            break
        at, point_gradient = modes[point.tobytes()]
        if not np.isfinite(at.laplace):
            break
        if at.laplace < best[1].laplace:
            best = (point, at, point_gradient, at_family)
        new_slope = _shape_slope(find_mode, at_family, point, n_theta, at)
        if not np.isfinite(new_slope) or abs(new_slope) <= SHAPE_SLOPE_TOL:
            break
        curvature = (new_slope - slope) / (there - here)
        # not convex between the two shapes (no secant step), or what a step would gain is below rounding
        if not curvature > 0 or new_slope**2 / (2.0 * curvature) <= RESTART_GAIN * abs(at.laplace):
            break
        here, slope = there, new_slope
        there = here + float(np.clip(-slope / curvature, -SHAPE_MAX_STEP, SHAPE_MAX_STEP))
    return best


def _start_scaling(find_mode: ModeFinder, family: Family, start, n_theta: int, n_fixed: int, value_and_gradient,
                   state: dict):
    """The :class:`~hierpool.closedform.glmm_scaling.BlockScaling` of the criterion's Hessian at ``start``,
    approximated: beta's block from the fixed effects' information at the mode
    (:func:`hierpool.algebra.laplace.fixed_effect_information`), the rows of theta (and of a negative
    binomial's log shape) by forward differences of the gradient, one evaluation each."""
    n = len(start)
    scaled = np.r_[np.arange(n_theta), np.arange(n_theta + n_fixed, n)]
    free = np.arange(n_theta, n_theta + n_fixed)
    value, gradient = value_and_gradient(start)
    if not np.isfinite(value):
        raise ConvergenceError(
            "the Laplace approximation is not finite at lme4's start (each T_j the identity, the fixed effects at "
            "the joint conditional mode): PIRLS found no finite mode there; look for extreme responses or "
            "covariates (rescale them) or a fixed effect that separates the outcomes")
    at_start = dict(state)  # restored below: the search starts here, from this mode and with this value cached
    at_family = replace(family, shape=shape_of(start[-1])) if n > n_theta + n_fixed else family
    hessian = np.zeros((n, n))
    hessian[np.ix_(free, free)] = fixed_effect_information(start[:n_theta], at_start["mode"], find_mode.design,
                                                           at_family, find_mode.patterns[True])
    for i in scaled:
        moved = start.copy()
        moved[i] += START_STEP
        moved_value, moved_gradient = value_and_gradient(moved)
        # a step off the finite region leaves this variable unscaled (unit curvature, no coupling)
        row = (moved_gradient - gradient) / START_STEP if np.isfinite(moved_value) else np.eye(n)[i]
        hessian[i, :] = row
        hessian[:, i] = row
    state.update({key: at_start[key] for key in ("u", "mode", "x", "value", "gradient")})
    return block_scaling(hessian, start, free, scaled)
