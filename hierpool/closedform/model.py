"""lme4's stages as public functions: formula + data -> objective -> optimum -> fitted model.

``MixedModel`` is lme4's ``lFormula`` + ``mkLmerDevfun``: the checked design and its
cross-products.  Its ``objective`` is lme4's ``devfun``; ``at(theta)`` gives the BLUPs
and every table at a fixed theta (no optimization); ``fit`` optimizes.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import cached_property

import numpy as np
import pandas as pd

from ..algebra import henderson, jax_runtime, one_term
from ..algebra.batched_systems import MAX_DENSE_ENTRIES, batched_systems, dense_entries
from ..algebra.conditioning import (
    CENTRE_RATIO,
    SPATIAL_REASON,
    Conditioning,
    condition_fixed,
    condition_terms,
    thetas_to_user,
    warn_far_fixed,
)
from ..algebra.henderson import as_numpy, solve
from ..algebra.host_blas import one_blas_thread
from ..algebra.linalg import (
    OTHER_MINIMUM_MARGIN,
    boundary_axis_points,
    boundary_probes,
    log_weights_unit,
    other_face_starts,
    other_minimum_starts,
    weights_uneven,
)
from ..algebra.search.newton import MAX_ITERATIONS
from ..algebra.search.terms import IDENTITY_START_MIN_K, search_on_host
from ..algebra.statistics import centred_statistics
from ..algebra.system import MixedModelSystem, build_system, on_device, on_host
from ..errors import ArgumentError, ConvergenceError, ConvergenceWarning, DataError, boolean_argument
from ..spec.design import Design, build_design, check_residual_df, error_contrast_problem
from ..spec.formula import has_spatial_term
from .ar1 import fit_ar1
from .optimize import (
    SINGULAR_FIT,
    Control,
    control_argument,
    criterion_value,
    design_scales,
    known_sds_response_unit,
    known_sds_unit,
    moment_start,
    optimize_theta,
    runs_on_host,
    user_theta_singular,
    value_and_gradient,
)
from .results import ConditionedCoordinates, LMMResult
from .vanishing_residual import refuse_if_reproduced, solved_or_refused


def solve_at(theta: np.ndarray, system: MixedModelSystem, reml: bool, host: bool, statistics=None):
    """Henderson's solution at ``theta`` as NumPy arrays: in NumPy on the host, or compiled.

    The compiled solve runs only on an accelerator: on CPU, one solve on the host costs less than
    compiling it, for a model whose criterion is compiled too (the two are tested equal to 1e-10).

    With a one-term model's sufficient statistics and the map of their fixed effects to the
    user's (:func:`_one_term_statistics`) it is the one-term specialisation's solution
    (:func:`hierpool.algebra.one_term.solution`, tested equal).
    """
    if statistics is not None:
        stats, fixed_map = statistics
        return one_term.solution(np.asarray(theta, dtype=float), stats, reml, system.layout.sigma_known, fixed_map)
    theta = np.asarray(theta, dtype=float)
    if host or jax_runtime.jax.default_backend() == "cpu":
        # on CPU the host solve of a model large enough to compile its criterion takes a fraction
        # of compiling the solve program (benchmarks/RESULTS.md, "Closed form on the host or compiled,
        # with InstEval and 500,000 rows")
        return solve(theta, on_host(system), reml=reml)
    return as_numpy(henderson.solve_jit(theta, on_device(system), reml=reml))


def _one_term_statistics(design: Design, host: bool):
    """The sufficient statistics that specialise a one-term model's criterion on the host (None otherwise).

    One random-effect term with fixed effects is the shape the statistics cover
    (:mod:`hierpool.algebra.one_term`; known residual sds ``se=`` enter as weights 1 / se^2);
    several terms, or none but random effects, take the general blocked algebra.  Returns
    (statistics of the centred fixed-effect columns, the map of their beta to the user's):
    :func:`hierpool.algebra.statistics.centred_statistics`.
    """
    if not host or len(design.terms) != 1 or design.p == 0:
        return None
    return centred_statistics(design)


def _start_on_conditioned_columns(control: Control, conditioned: Conditioning, n_theta: int) -> Control:
    """``control`` with its ``theta_start`` (the user's parametrization) carried to the conditioned columns' (the
    same covariances: T~ T~^T = M^-1 T T^T M^-T, :func:`~hierpool.algebra.conditioning.thetas_to_user` with the
    inverse maps).  Started on the user's columns, a slope on Days + 1e5 made the search's Newton polish fail with
    NumPy's LinAlgError.  A start of the wrong length is left to the optimizer's refusal."""
    given = np.asarray(control.theta_start, dtype=float)
    if given.shape != (n_theta,) or not conditioned.terms_conditioned:  # (the optimizer refuses a wrong shape)
        return control
    inverses = [np.linalg.inv(m) for m in conditioned.transforms]
    return replace(control, theta_start=tuple(float(t) for t in thetas_to_user(given, inverses)))


class MixedModel:
    """A linear mixed model on one data set, before fitting.

    Parameters
    ----------
    formula : str
        lme4-style formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas.DataFrame
        Not modified.
    se : str, optional
        Column of known residual standard deviations (meta-analysis); only the
        random-effect variances are then estimated.
    weights : str or array-like, optional
        Prior weights (column name or one value per row): residual variance sigma^2 / w_i.
    offset : str or array-like, optional
        Known term added to the linear predictor (column name or one value per row).
    control : Control, optional
        Only its ``compile`` is read here: where the cross-products are kept (NumPy on the
        host, or JAX arrays for compiled programs); by the model's size when None.

    Attributes
    ----------
    design : Design
    system : MixedModelSystem
        The pytree the pure functions :func:`~hierpool.algebra.criterion.objective`
        and :func:`~hierpool.algebra.henderson.solve` take (jit, grad and vmap them).
    """

    def __init__(
        self, formula: str, data: pd.DataFrame, se: str | None = None, weights=None, offset=None,
        control: Control | None = None,
    ):
        self._with_design(build_design(formula, data, se=se, weights=weights, offset=offset), control_argument(control))

    def _with_design(self, design: Design, control: Control | None) -> None:
        check_residual_df(design)
        self.design: Design = design
        system = build_system(design, host=True)
        # one copy of the cross-products, where the model's algebra will run (``control.compile``, else
        # by size): NumPy for the host path, JAX arrays for a compiled one (the host copy is released)
        self.system: MixedModelSystem = system if runs_on_host(system, control) else on_device(system)

    @classmethod
    def of_design(cls, design: Design, control: Control | None = None) -> MixedModel:
        """The model of a :class:`~hierpool.spec.design.Design` already built (a fit's, to fit it again otherwise:
        by maximum likelihood for ``hp.anova``)."""
        model = cls.__new__(cls)
        model._with_design(design, control)
        return model

    @property
    def n_theta(self) -> int:
        return self.system.layout.n_theta

    def _theta(self, theta) -> np.ndarray:
        try:
            theta = np.asarray(theta, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise ArgumentError(f"theta must be {self.n_theta} numbers for this model, got {theta!r}") from None
        if theta.size != self.n_theta:
            raise ArgumentError(f"theta must have {self.n_theta} values for this model, got {theta.size}")
        if not np.all(np.isfinite(theta)):
            raise ArgumentError(f"theta must be finite, got {theta}")
        return theta

    @cached_property
    def _fixed_conditioned(self) -> tuple[Conditioning, MixedModelSystem] | None:
        """(X's conditioning alone, its system) where X's columns are far from centred or unit scale
        (:func:`~hierpool.algebra.conditioning.condition_fixed`), else None.  Evaluations at a given theta run
        there, the criterion and beta mapped back: on the user's X' X, Days + 1e7 on sleepstudy moved the REML
        criterion by 6.4, or its Cholesky factor failed.  theta is the user's on both (Z is not touched)."""
        conditioning = condition_fixed(self.design)
        if conditioning is None:
            return None
        system = build_system(conditioning.design, host=True)
        return conditioning, (system if isinstance(self.system.rest, np.ndarray) else on_device(system))

    @cached_property
    def _response_unit(self) -> float | None:
        """With known residual sds, the response's own unit, where the searches probe too
        (:func:`~hierpool.closedform.optimize.known_sds_response_unit`); None otherwise."""
        return known_sds_response_unit(self.design)

    def _evaluated(self) -> tuple[Conditioning | None, MixedModelSystem]:
        """The system evaluations at a given theta run on: :attr:`_fixed_conditioned`'s, else :attr:`system`."""
        return self._fixed_conditioned or (None, self.system)

    def objective(self, theta, reml: bool = True, control: Control | None = None) -> float:
        """Profiled REML criterion (or deviance) at ``theta``: lme4's ``devfun(theta)``."""
        reml, control = boolean_argument("reml", reml), control_argument(control)
        conditioning, system = self._evaluated()
        value = criterion_value(self._theta(theta), system, reml, runs_on_host(system, control))
        return value if conditioning is None else conditioning.objective_to_user(value, reml)

    def objective_and_gradient(self, theta, reml: bool = True, control: Control | None = None) -> tuple[float, np.ndarray]:
        """The objective and its exact gradient (closed-form adjoints; ``control.compile`` as in :meth:`fit`)."""
        reml, control = boolean_argument("reml", reml), control_argument(control)
        conditioning, system = self._evaluated()
        value, gradient = value_and_gradient(system, reml, runs_on_host(system, control))(self._theta(theta))
        # REML's criterion on X A is the user's plus a constant (2 log |det A|): the same gradient
        return (value if conditioning is None else conditioning.objective_to_user(value, reml)), gradient

    def at(self, theta, reml: bool = True, control: Control | None = None) -> LMMResult:
        """BLUPs, fixed effects and every table at a fixed ``theta`` (no optimization)."""
        reml, control = boolean_argument("reml", reml), control_argument(control)
        conditioning, system = self._evaluated()
        theta = self._theta(theta)
        host = runs_on_host(system, control)
        solution = solve_at(theta, system, reml, host)
        if conditioning is None:
            return LMMResult(self.design, self.system, solution, None, reml, host)
        coordinates = ConditionedCoordinates(conditioning, on_host(system), theta, np.asarray(solution.vcov_beta))
        return LMMResult(self.design, self.system, conditioning.solution_to_user(solution, theta), None, reml, host,
                         conditioned=coordinates)

    def fit(self, reml: bool = True, control: Control | None = None) -> LMMResult:
        """Optimize theta (L-BFGS-B on the exact gradient) and return the fitted model.

        When a random-effect term's columns are far from centred or unit scale
        (a calendar year as a random slope), or the fixed effects' (a timestamp
        as a covariate), the optimizer works on centred and scaled columns and
        its optimum is mapped back to the user's theta, beta and criterion
        (:mod:`hierpool.algebra.conditioning`); the convergence checks are
        those of the conditioned problem.
        """
        reml, control = boolean_argument("reml", reml), control_argument(control)
        problem = error_contrast_problem(self.design.p, self.design.n, reml, self.design.sigma_known)
        if problem:
            raise DataError(problem)
        conditioned = condition_terms(self.design, fixed=True)
        if conditioned is not None and control is not None and control.theta_start is not None:
            control = _start_on_conditioned_columns(control, conditioned, self.n_theta)
        host = runs_on_host(self.system, control)
        if conditioned is None:
            one_term_inputs = _one_term_statistics(self.design, host)
            statistics = None if one_term_inputs is None else one_term_inputs[0]
            scales = design_scales(self.design)
            optimum = optimize_theta(self.system, reml, control, start=moment_start(self.design, scales),
                                     statistics=statistics, scales=scales, response_unit=self._response_unit)
            optimum = self._lowest_of_restarts(optimum, self.system, reml, control, host, statistics, scales)
            optimum = self._lowest_of_batch_search(optimum, self.design, self.system, reml, control, host,
                                                     statistics, scales)
            solution = solved_or_refused(lambda: solve_at(optimum.theta, self.system, reml, host, one_term_inputs),
                                          optimum.theta)
        else:
            system = build_system(conditioned.design, host=True)
            # far-from-centred columns (why we condition) also sit in X, and the general path's
            # criterion keeps ~10x less rounding noise there than the one-term statistics' X^T X
            scales = design_scales(conditioned.design)
            inner = optimize_theta(system, reml, control, start=moment_start(conditioned.design, scales), scales=scales,
                                   response_unit=self._response_unit)
            # on the conditioned columns too
            inner = self._lowest_of_restarts(inner, system, reml, control, True, None, scales)
            inner = self._lowest_of_batch_search(inner, conditioned.design, system, reml, control, True, None,
                                                   scales)
            theta = conditioned.theta_to_user(inner.theta)
            # lme4's singular rule on the user's theta, as fit_batch's conditioned rows (the conditioned theta of a
            # slope on x ~ 3000 is 3000 times the user's: 0.006 beside known sds of 100 was singular in the batch,
            # not here; the fifty-second session's review)
            singular = user_theta_singular(theta, system, tol=(control or Control()).singular_tol)
            messages = tuple(m for m in inner.messages if m != SINGULAR_FIT) + (SINGULAR_FIT,) * singular
            optimum = replace(inner, theta=theta, objective=conditioned.objective_to_user(inner.objective, reml),
                              is_singular=singular, messages=messages)
            tilde = solved_or_refused(lambda: solve_at(inner.theta, system, reml, host), theta)
            solution = conditioned.solution_to_user(tilde, theta)
            # prediction variances in the conditioned coordinates too (the user's X' X may not even factor)
            coordinates = ConditionedCoordinates(conditioned, system, np.asarray(inner.theta, dtype=float),
                                                 np.asarray(tilde.vcov_beta))
        # (what X leaves, r_X'W r_X: the user's system's last cross-product, its y column's, not X's fit again)
        refuse_if_reproduced(self.design, solution, optimum.theta, float(np.asarray(self.system.rest)[-1, -1]))
        for message in optimum.messages:
            warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return LMMResult(self.design, self.system, solution, optimum, reml, host,
                         conditioned=None if conditioned is None else coordinates)

    def _lowest_of_batch_search(self, optimum, design, system, reml: bool, control, host: bool, statistics,
                                scales):
        """``optimum``, or where a term has :data:`~hierpool.algebra.search.terms.IDENTITY_START_MIN_K` or more
        coefficients, the optimum of ``hp.fit_batch``'s host search of this model
        (:func:`hierpool.algebra.search.terms.search_on_host`: Newton's method from the same start, and from lme4's
        identity where it ends on the boundary) where that is lower by
        :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN`, L-BFGS-B's search from there certifying it.

        The criterion of such a term on few levels can have several minima, and L-BFGS-B and Newton's method from one
        start ended in different ones on 1 to 3 in 100 small datasets, the batch's the lower on all but one of them,
        and lmer's from its identity start below both on some (benchmarks/RESULTS.md, sixty-first session).  Small
        models on the host only (at most ``control.hessian_max_n`` rows, as the polish; its cost there:
        benchmarks/RESULTS.md); not where the batch would fit the dataset alone (its dense coupling beyond
        :data:`~hierpool.algebra.batched_systems.MAX_DENSE_ENTRIES`)."""
        control = replace(control or Control(), theta_start=None)
        ks = tuple(term.k for term in design.terms)
        widths = tuple(term.n_levels for term in design.terms)
        if (max(ks) < IDENTITY_START_MIN_K or not host or design.n > control.hessian_max_n
                or dense_entries(widths, ks, design.p) > MAX_DENSE_ENTRIES):  # (the batch's own limit)
            return optimum
        terms = [(term.index, term.z, term.n_levels) for term in design.terms]
        systems, n = batched_systems(np.zeros(design.n, dtype=np.int64), 1, terms, design.X, design.y, design.weights,
                                     design.offset, design.sigma_known)
        with np.errstate(all="ignore"):
            found = search_on_host(systems, n, moment_start(design, scales)[None], reml, MAX_ITERATIONS)
        margin = OTHER_MINIMUM_MARGIN * max(1.0, abs(optimum.objective))
        if not (found["converged"][0] and found["objective"][0] < optimum.objective - margin):
            return optimum
        try:
            again = optimize_theta(system, reml, replace(control, max_restarts=0), start=found["theta"][0],
                                   statistics=statistics, scales=scales, response_unit=self._response_unit)
        except ConvergenceError:  # (a search that ran off to a non-finite criterion: the optimum in hand stands)
            return optimum
        return again if again.converged and again.objective < optimum.objective - margin else optimum

    @staticmethod
    def _axis_minima(theta, ks, units, value: float, value_at, at_most: float) -> list:
        """The lowest point of each whole scan along an element of theta at 0
        (:func:`~hierpool.algebra.linalg.boundary_axis_points`), where it is below ``value`` (the optimum's criterion)
        by :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN`.  :func:`~hierpool.closedform.optimize.optimize_theta`
        reads each scan only while the criterion falls off the boundary; with uneven known sds the criterion can
        rise off it and fall again: ``y ~ x + (1 | g) + (1 | h)`` by ML (9 studies, sds 0.001 to 10) rose from
        theta_g = 0 to 0.02 and fell to a minimum at 0.083, 0.22 below the boundary point (0, 0) where the search
        ended (the fifty-sixth session)."""
        starts = []
        below = value - OTHER_MINIMUM_MARGIN * max(1.0, abs(value))
        for points in boundary_axis_points(theta, ks, at_most, units):
            values = np.array([value_at(point) for point in points])
            lowest = int(np.argmin(np.where(np.isfinite(values), values, np.inf)))
            if values[lowest] < below:
                starts.append(points[lowest])
        return starts

    def _lowest_of_restarts(self, optimum, system, reml: bool, control, host: bool, statistics, scales=None):
        """``optimum``, or with prior weights (or known residual sds) the lowest of it and the searches from where
        another minimum may be reached, on ``system`` (the user's or the conditioned columns'; a scaled term's search
        stopped 0.043 above too):

        * one scalar term: the search again from the lowest point of the criterion's scan where that is lower
          (:func:`hierpool.algebra.one_term.scan_restarts`: its ML criterion can have two minima, and the search
          stopped at the higher, 0.043 above, converged);
        * otherwise, where the weights are uneven (:func:`hierpool.algebra.linalg.weights_uneven`), at an interior
          optimum, the searches from its boundary
          (:func:`hierpool.algebra.linalg.other_minimum_starts`: each term alone moved onto it), which reach a
          boundary minimum below an interior one where there is one; the lowest converged optimum is kept (lower by
          :data:`~hierpool.algebra.linalg.OTHER_MINIMUM_MARGIN`).  A boundary optimum was already searched again from
          inside (:func:`~hierpool.closedform.optimize.optimize_theta`'s restarts); with uneven weights it is also
          searched from the other face (:func:`~hierpool.algebra.linalg.other_face_starts`: the terms off the
          boundary onto it, those on it inside) and from the lowest point of each whole scan along an element at 0
          (:meth:`_axis_minima`), each search without restarts of its own (their cost: benchmarks/RESULTS.md,
          fifty-sixth session).  ``hp.fit_batch``'s host search starts from the same points (but the scans) with its
          own Newton search, so that the two reach the same minimum more often, not always (benchmarks/RESULTS.md,
          fortieth and fifty-sixth sessions).

        The searches start where this says, whatever ``control.theta_start`` is; ``scales``: the probes' units
        (:func:`~hierpool.closedform.optimize.design_scales`)."""
        terms = self.design.terms
        if self.design.weights is None:  # prior weights or known sds
            return optimum
        control = replace(control or Control(), theta_start=None)
        scalar = len(terms) == 1 and terms[0].k == 1
        if not scalar and not weights_uneven(self.design.weights)[0]:
            return optimum
        if scalar:  # the scan in theta's units: the weights' (prior weights or known sds)
            unit = log_weights_unit(float(system.log_weights), system.layout.n)
            if statistics is not None and host:  # the one-term criterion at every point at once, as the batch's scan
                values = one_term.scan_values(statistics, reml, system.layout.sigma_known, unit)
            else:
                values = np.array([[criterion_value(np.array([t * unit]), system, reml, host)]
                                   for t in one_term.SCALAR_SCAN])
            restart, theta = one_term.scan_restarts(values, np.array([optimum.objective]), unit)
            if not restart[0]:
                return optimum
            again = optimize_theta(system, reml, control, start=theta[0], statistics=statistics, scales=scales,
                                   response_unit=self._response_unit)
            return again if again.objective < optimum.objective else optimum
        ks = tuple(term.k for term in terms)
        sd_unit = known_sds_unit(system)  # (1 unless the residual sds are known)
        theta = np.asarray(optimum.theta, dtype=float) / sd_unit  # in the search's units (optimize_theta)
        units = None if scales is None else scales / sd_unit
        search_control = control
        if boundary_probes(theta, ks, control.singular_tol):
            starts = other_face_starts(theta, ks, control.singular_tol, units) + self._axis_minima(
                theta, ks, units, optimum.objective, lambda t: criterion_value(t * sd_unit, system, reml, host),
                control.singular_tol)
            search_control = replace(control, max_restarts=0)
        else:
            starts = other_minimum_starts(theta, ks, control.singular_tol, units)
        best = optimum
        for start in starts:
            try:
                again = optimize_theta(system, reml, search_control, start=start * sd_unit, statistics=statistics,
                                       scales=scales, response_unit=self._response_unit)
            except ConvergenceError:  # a search that ran off to a non-finite criterion: the optimum in hand stands
                continue
            margin = OTHER_MINIMUM_MARGIN * max(1.0, abs(best.objective))
            if again.converged and again.objective < best.objective - margin:
                best = again
        return best


def lmm(
    formula: str,
    data: pd.DataFrame,
    reml: bool = True,
    se: str | None = None,
    control: Control | None = None,
    weights=None,
    offset=None,
    correlation=None,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
    adjacency=None,
):
    """Fit a linear mixed model by REML (default) or maximum likelihood, as ``lme4::lmer``.

    Parameters
    ----------
    formula : str
        lme4 syntax: ``y ~ x + (x | g)`` correlated, ``(x || g)`` uncorrelated,
        ``(0 + x | g)``, nested ``(1 | a/b)``, ``(1 | a:b)``, crossed terms.
    data : pandas.DataFrame
        Rows with missing values in used columns are dropped (with a warning).
    reml : bool
        REML (True) or maximum likelihood (False).
    se : str, optional
        Column of known residual standard deviations; sigma is then fixed and
        only the random-effect (co)variances are estimated.
    control : Control, optional
        Optimizer settings and check thresholds.
    weights : str or array-like, optional
        Prior weights w_i, a column name or one value per row of ``data``, as
        lmer's ``weights``: row i has residual variance sigma^2 / w_i, and the
        criterion, logLik, AIC and sigma are lme4's (the criterion includes
        -sum log w_i).  Cannot be combined with ``se``.
    offset : str or array-like, optional
        A known term of the linear predictor, a column name or one value per
        row, as lmer's ``offset``; added to any ``offset(expr)`` terms of the
        formula: y = offset + X beta + Z b + e.
    correlation : AR1, optional
        A residual correlation within series, ``hp.ar1(group, time=None)`` (nlme's corAR1) or
        ``hp.car1(group, time)`` (corCAR1), as nlme's ``lme(..., correlation=)``: phi is estimated
        with the rest (:mod:`hierpool.closedform.ar1`; the result's ``correlation`` and ``phi``).
        Every random-effect term must be constant within a series.  With a correlation the formula may
        have no random-effect term: generalized least squares, nlme's ``gls``
        (:mod:`hierpool.closedform.gls`).
    relmat, relmat_inverse : dict, optional
        A known relationship matrix A, or its inverse, for a scalar term (``(1 | g)`` or ``(0 + x | g)``):
        ``{"g": A}``, A a labelled
        pandas DataFrame or a ``(matrix, labels)`` tuple (sparse for an inverse from a pedigree:
        :func:`hierpool.pedigree.inverse_relationship_matrix`).  The term's effects are then
        b ~ N(0, sigma_A^2 A) over every label of A, with or without records (breeding values), fitted
        by the sparse mixed-model equations of :mod:`hierpool.closedform.relmat`; the result's
        ``heritability()`` is sigma_A^2 over the sum of all variances (sigma_A^2 + sigma^2 for the animal term
        alone) with a profile interval.  Other terms beside
        the relationship term must be scalar too (``(1 | h)``: a permanent environment).
    adjacency : optional
        The neighbourhood graph of a spatial term ``car(area, type='icar' | 'proper' | 'bym2')``: an edge list
        (two columns of area labels), a labelled 0/1 matrix, polygons, or a dict keyed by the area column (needed
        when the formula has several ``car()`` terms, one graph each; ``(lhs | g)`` terms may stand beside them)
        (:mod:`hierpool.spec.spatial`).  Fitted exactly on the sparse precision (:mod:`hierpool.closedform.spatial`;
        a :class:`~hierpool.closedform.spatial.SpatialFit`).

    Returns
    -------
    LMMResult
        An :class:`~hierpool.closedform.ar1.AR1Result` with a ``correlation`` (a
        :class:`~hierpool.closedform.gls.GLSResult` without random-effect terms); a
        :class:`~hierpool.closedform.relmat.RelmatResult` with a relationship matrix.

    Notes
    -----
    Profiled objective and mixed-model equations as in Bates, Maechler, Bolker &
    Walker (2015), "Fitting linear mixed-effects models using lme4", J. Stat.
    Softw. 67(1); blocked factorization as in MixedModels.jl.
    """
    reml, control = boolean_argument("reml", reml), control_argument(control)
    if adjacency is not None or has_spatial_term(formula):
        return _spatial_lmm(formula, data, reml, se, control, weights, offset, correlation, relmat, relmat_inverse,
                            adjacency)
    if relmat is not None or relmat_inverse is not None:
        from ..spec.relationship import model_relationship  # SciPy's sparse LU: loaded only for this model
        from .relmat import fit_relmat

        if correlation is not None:
            raise ArgumentError("relmat= with correlation= is not supported yet: give one of them")
        if control is not None:
            raise ArgumentError("control= is not used by the relationship-matrix fit (Brent's method on theta)")
        rel = model_relationship(formula, relmat, relmat_inverse)
        design = build_design(formula, data, se=se, weights=weights, offset=offset, related=(rel.group,))
        check_residual_df(design)
        return fit_relmat(design, rel, reml=reml)
    if correlation is not None:
        design = build_design(formula, data, se=se, weights=weights, offset=offset, random_optional=True)
        check_residual_df(design)
        if not design.terms:  # no random effect: generalized least squares, nlme's gls
            from .gls import fit_gls

            if control is not None:
                raise ArgumentError("control= is not used by a model without random effects (Brent's method on phi)")
            with one_blas_thread(design.n):  # (a block adds no frame: warnings still point at the user's line)
                return fit_gls(design, correlation, data, reml=reml)
        # a system at every phi tried, each small, factored many times: OpenBLAS's threads would spin between them
        # (on a busy machine several times the fit's own time)
        with one_blas_thread(design.n):
            return fit_ar1(design, correlation, data, reml=reml, control=control)
    return MixedModel(formula, data, se=se, weights=weights, offset=offset, control=control).fit(
        reml=reml, control=control
    )


def _spatial_lmm(formula, data, reml, se, control, weights, offset, correlation, relmat, relmat_inverse, adjacency):
    """``hp.lmm(..., adjacency=)``: a Gaussian model with a spatial term (:mod:`hierpool.closedform.spatial`)."""
    from ..spec.spatial import spatial_design  # SciPy's sparse LU: loaded only for this model
    from .spatial import fit_spatial

    given = {"se": se, "control": control, "correlation": correlation, "relmat": relmat,
             "relmat_inverse": relmat_inverse}
    for name, value in given.items():
        if value is not None:
            raise ArgumentError(f"{name}= is not supported with a spatial term (adjacency=) yet")
    sdesign = spatial_design(formula, data, adjacency, weights=weights, offset=offset)
    check_residual_df(sdesign.design)
    # X unconditioned: a covariate far from zero is named
    warn_far_fixed(sdesign.design.X, sdesign.design.fixed_names, SPATIAL_REASON, stacklevel=3, limit=CENTRE_RATIO)
    return fit_spatial(sdesign, reml=reml)
