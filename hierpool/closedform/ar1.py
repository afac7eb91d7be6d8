"""``hp.lmm(..., correlation=hp.ar1(...))``: REML/ML with AR(1) residuals within each series, as nlme's lme.

For a given phi the model is whitened (:mod:`hierpool.algebra.ar1`) and fitted by the closed form's own
optimizer over theta; phi is the one-dimensional minimum of the profiled criterion

    d(phi) = min_theta [ -2 log L_whitened(theta; phi) ] + log |C(phi)|

on nlme's unconstrained scale u (log((1 + phi) / (1 - phi)) for corAR1, log(phi / (1 - phi)) for corCAR1).  It is
found by Newton's method in (theta, u) together (:func:`joint_search`: ``hp.fit_batch``'s host search,
:mod:`hierpool.algebra.search`, on this one dataset), from the lag-1 correlation of the residuals of a fit at
phi = 0; then the closed form's optimizer fits theta at phi-hat from the joint optimum's theta, with its
convergence checks.  A joint stop at the edge of u's range (held at its end) or on a stretch where the profile is too
flat to identify phi is taken where it lies at or below the profile at points across the range
(:func:`hierpool.algebra.search.ar1_moments.checked_on_profile`, ``hp.fit_batch``'s rule); its curvature is then
differences of polished fits.  Where the joint search does not apply (one term of more than
:data:`~hierpool.algebra.search.ar1_moments.HOST_MAX_THETA` parameters), did not converge or failed that check, Brent's
method minimizes d (:func:`search_phi`) in a window around that lag-1 correlation (the whole range when the
minimum lies on the window's edge), each evaluation's theta search starting from the moments (from the last one's
optimum, where theta was large, it stopped where it started); both reach the same fit (``tests/test_ar1.py``).
Where the criterion is nearly flat in theta (noise 1e-3 of the random effects, theta ~1e3) the searches of the
profile's points may still stop short of their minima, and the profile they give is rough (a review's two-term
dataset ended 0.026 above its profile's minimum: the fifty-ninth session's third review).
The search runs on the random-effect
columns centred and scaled (:func:`hierpool.algebra.conditioning.condition_terms`, always: whitened, a covariate
of large mean is nearly collinear with the intercept's column) and X's centred, and its optimum is mapped back to
the user's parametrization at phi-hat, where it is solved; the conditioned fit's convergence checks stand, and
lme4's singularity rule reads the user's theta.  The curvature for phi's interval is the joint search's Hessian's
(the profile's, :func:`hierpool.algebra.ar1.profile_curvature`), or on Brent's path differences of polished fits.
phi's interval is nlme's kind: a Wald interval on that scale, its variance the inverse curvature of d / 2 (the other
parameters profiled out), mapped back.  Fixed effects, their covariance, sigma, the random effects'
covariances and the BLUPs with their conditional variances are the whitened model's at phi-hat: exact,
since whitening is an invertible map of the data.  Fitted values and residuals are on the data's scale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd

from ..algebra.ar1 import (
    UNCONSTRAINED_LIMIT,
    Z_95,
    at_edge,
    carried,
    clearly_curved,
    constrained_phi,
    first_u,
    in_search_units,
    lag_classes,
    lag_one_phis,
    log_det_correlation,
    per_unit,
    sign_in_doubt,
    unconstrained_phi,
    whiten,
)
from ..algebra.batched_systems import MAX_DENSE_ENTRIES, dense_entries
from ..algebra.conditioning import condition_terms
from ..algebra.criterion import objective_and_gradient_on_host
from ..algebra.henderson import solve
from ..algebra.laplace import random_part
from ..algebra.linalg import shared_factor
from ..algebra.search import HOST_CHUNK_BYTES, ar1_moments, ar1_systems
from ..algebra.search.ar1_moments import ChunkData, OneDataset
from ..algebra.search.ar1_systems import TermsChunk, joint_search_kind, lagged_systems_pay
from ..algebra.search.newton import DECREASE_TOL, MAX_ITERATIONS
from ..algebra.statistics import centred_fixed_effects
from ..algebra.system import build_system
from ..errors import ArgumentError, ConvergenceWarning, DataError, HierpoolWarning, warn_at_caller
from ..spec.correlation import (
    AR1,
    Series,
    common_step,
    even_step_message,
    series_of,
    whole_steps,
)
from ..spec.design import Design, check_columns
from ..spec.labels import column_labels
from ..spec.newdata import model_rows
from .optimize import SINGULAR_FIT, Control, is_singular, moment_start, optimize_theta
from .results import ConditionedCoordinates, LMMResult
from .vanishing_residual import refuse_if_reproduced, solved_or_refused

#: Brent's tolerance on phi's unconstrained scale (phi to ~1e-6 near 0, far below its standard error).
PHI_XTOL = 1e-6
#: Half-width (unconstrained scale) of the first search window, around the residuals' lag-1 correlation.
SEARCH_WINDOW = 2.5
#: Central-difference step (unconstrained scale) of the curvature that gives phi's interval.
INTERVAL_STEP = 1e-3


def unconstrained(phi: float, continuous: bool) -> float:
    """nlme's unconstrained coefficient of phi: log((1 + phi) / (1 - phi)), or log(phi / (1 - phi)) for corCAR1."""
    return float(unconstrained_phi(phi, continuous))


def constrained(u: float, continuous: bool) -> float:
    """phi from :func:`unconstrained`'s coefficient (:func:`hierpool.algebra.ar1.constrained_phi`), a float."""
    return float(constrained_phi(np.asarray(float(u)), continuous))


def whitened_design(design: Design, series: Series, phi: float) -> tuple[Design, float]:
    """(the design with y - offset, X and every term's values whitened at ``phi``, log |C(phi)|)."""
    c = carried(float(phi), series.previous, series.lag)
    terms = tuple(replace(term, z=whiten(term.z, series.previous, c)) for term in design.terms)
    whitened = replace(design, y=whiten(design.y_less_offset, series.previous, c), offset=np.zeros(design.n),
                       X=whiten(design.X, series.previous, c) if design.p else design.X, terms=terms)
    return whitened, float(log_det_correlation(c))


def _moment_phi(design: Design, series: Series, at_zero, continuous: bool) -> float:
    """phi's starting value: the lag-1 correlation of the residuals of a fit with (nearly) independent residuals,
    kept inside (-0.9, 0.9) (above 0.05 in continuous time), per unit of lag (:func:`lag_one_phi`)."""
    whitened, system, optimum, _ = at_zero
    solution = solve(np.asarray(optimum.theta, dtype=float), system, reml=True)
    residual = design.y_less_offset - design.X @ np.asarray(solution.beta) - random_part(design, solution.b)
    return lag_one_phi(residual, series, continuous)


def lag_one_phi(residual: np.ndarray, series: Series, continuous: bool) -> float:
    """The lag-1 correlation of residuals within their series, kept inside (-0.9, 0.9) (above 0.05 in continuous
    time), per unit of lag (its root of the median lag): where the search for phi starts.  One dataset's
    :func:`~hierpool.algebra.ar1.lag_one_phis`."""
    return float(lag_one_phis(residual, series.previous, series.lag, np.zeros(len(residual), dtype=np.int64), 1,
                              continuous)[0])


def check_nested(design: Design, series: Series, correlation: AR1, rows: np.ndarray | None = None) -> None:
    """Each random-effect term must keep its level within a series (whitening mixes consecutive rows).

    ``rows``: the design rows ``series`` covers, in its order (default: every row; ``hp.fit_batch`` checks
    one dataset's rows at a time).
    """
    has_previous = series.previous >= 0
    for term in design.terms:
        index = term.index if rows is None else term.index[rows]
        if np.any(index[has_previous] != index[series.previous[has_previous]]):
            raise DataError(
                f"the random-effect term {term.label} changes level within a "
                f"series of the AR(1) group {correlation.group!r}: hp.ar1 needs every random-effect term to be "
                f"constant within each series (its grouping nested in, or equal to, {correlation.group!r})")


def checked_series(design: Design, correlation, data: pd.DataFrame) -> Series:
    """The :class:`~hierpool.spec.correlation.Series` of an AR(1) model, after the checks both engines make:
    an :class:`AR1` structure, no prior weights or known sds, every random-effect term nested in the series."""
    if not isinstance(correlation, AR1):
        raise ArgumentError(f"correlation must be hp.ar1(...) or hp.car1(...), got {type(correlation).__name__}")
    if design.weights is not None:
        raise ArgumentError("weights= and se= cannot be combined with an AR(1) correlation (not supported yet)")
    series = series_of(correlation, data, design.rows)
    check_nested(design, series, correlation)
    step = 1 if correlation.continuous else common_step(series)
    if step % 2 == 0:
        warnings.warn(even_step_message(correlation.time, step), HierpoolWarning, stacklevel=4)
    return series


@dataclass(frozen=True, eq=False)
class AR1Result(LMMResult):
    """A linear mixed model with AR(1) residuals (``hp.lmm(..., correlation=hp.ar1(...))``).

    As :class:`~hierpool.closedform.results.LMMResult`, with ``system`` and ``solution`` those of the
    whitened model at phi-hat, and:

    Attributes
    ----------
    structure : AR1
        The correlation structure asked for.
    phi : float
        Its estimate (nlme's ``coef(fit$modelStruct$corStruct, unconstrained = FALSE)``).
    phi_interval : tuple of float
        Approximate 95% interval (nlme's ``intervals(fit, which = "var-cov")$corStruct``).
    log_det_correlation : float
        log |C(phi-hat)|, the Jacobian term of the criterion.
    """

    structure: AR1 | None = None
    phi: float = float("nan")
    phi_interval: tuple[float, float] = (float("nan"), float("nan"))
    log_det_correlation: float = 0.0
    series_ends: pd.DataFrame | None = None  # per series label: its last fitted row and that row's time (or position)
    # each fitted row's predecessor in its series and the lag (hp.simulate draws along it)
    series: Series | None = field(default=None, repr=False)
    # the fitted rows' series (and time) columns: what a refit reads (hp.anova's by maximum likelihood)
    series_data: pd.DataFrame | None = field(default=None, repr=False)

    def predict(self, newdata: pd.DataFrame | None = None, re: bool = True, interval: str | None = None,
                level: float = 0.95):
        """Predictions (as :meth:`LMMResult.predict`); a new row of a fitted series, after its last fitted row,
        also carries that row's residual forward: + phi^lag (y_last - fitted_last), with its interval.

        ``lag`` is the time since the last fitted row (corCAR1, and corAR1 with a time column, in whole steps),
        or, for corAR1 without one, the new row's rank among the series' new rows in ``newdata``'s order.  Rows
        of new series, rows at or before a series' last fitted time, ``re=False`` and ``newdata=None`` carry
        nothing (:func:`carried_lags`).
        """
        from .predict import predict

        carry = (None if newdata is None or not re
                 else carry_of(self.structure, self.phi, self.series_ends, newdata, self.design, self.series_data))
        return predict(self, newdata=newdata, re=re, interval=interval, level=level, carry=carry)

    def shrinkage(self) -> pd.DataFrame:
        """Refused: its table reads each BLUP as w_g times the group's mean deviation, w_g from n_g independent
        residuals; an AR(1) fit's BLUPs weigh a series' rows by the residuals' inverse correlation (Ovary's mare 1:
        weight 0.944 where its 29 correlated rows count as about 8, weight times deviation 3.150 beside its BLUP
        2.981).  :func:`hierpool.ridge_view` refuses it for the same reason."""
        raise ArgumentError("shrinkage() takes the residuals as independent (w_g = n_g sigma_b^2 / (n_g sigma_b^2 + "
                            "sigma^2)); an AR(1) fit's BLUPs weigh a series' rows by their inverse correlation: "
                            "read fit.ranef instead")

    @property
    def objective(self) -> float:
        """-2 log L (REML or ML) of the data: the whitened model's criterion plus log |C(phi)|."""
        return super().objective + self.log_det_correlation

    @property
    def n_params(self) -> int:
        """As lme's: fixed effects, covariance parameters, sigma and phi."""
        return super().n_params + 1

    @cached_property
    def varcorr(self) -> pd.DataFrame:
        """lme4's VarCorr rows, and a last row for phi (grp "Residual", var1 "phi"; its value in sdcor)."""
        return self._varcorr(phi=self.phi)

    @property
    def correlation(self) -> pd.DataFrame:
        """phi with its approximate 95% interval, one row named by nlme's spelling of the structure."""
        lower, upper = self.phi_interval
        return pd.DataFrame({"estimate": [self.phi], "lower": [lower], "upper": [upper]},
                            index=pd.Index([self.structure.describe()], name="structure"))

    def summary(self) -> str:
        lower, upper = self.phi_interval
        return (super().summary() + f"\n\nCorrelation structure: {self.structure.describe()}\n"
                f"  phi = {self.phi:.6g}  (95% interval {lower:.4g} to {upper:.4g})")


def across_zero(profile, u_hat: float, value, series: Series, continuous: bool) -> float | None:
    """-u_hat (phi's opposite) where corAR1's sign is in doubt (:func:`~hierpool.algebra.ar1.sign_in_doubt`) and the
    criterion ``profile`` gives there lies below ``value()``, the one at ``u_hat`` (computed only then): where the
    search for phi should start again (on that side, :func:`half_range`).  None otherwise (and always in continuous
    time, where phi > 0).  A look at one point: the joint search (:func:`joint_search`) searches both sides itself,
    as the batch's does; Brent's path alone (:func:`search_phi`) relies on this look."""
    if continuous or not sign_in_doubt(series.previous, series.lag, np.zeros(len(series.lag), dtype=np.int64), 1)[0]:
        return None
    with warnings.catch_warnings():  # inner fits' messages: the search's final fit warns its own
        warnings.simplefilter("ignore", ConvergenceWarning)
        here, there = value(), profile(-u_hat)[0]
    return -u_hat if there < here - 1e-8 * abs(here) else None


def half_range(u: float) -> tuple[float, float]:
    """The half of u's range on ``u``'s side of phi = 0 (the positive one for 0): where the search for phi from
    across zero stays (:func:`search_phi`'s ``within``): from -u_hat (phi -0.35 turned), a window reaching over 0
    ended back in the minimum the look had left (an even-lag series, ML: benchmarks/RESULTS.md, fifty-seventh
    session)."""
    return (-UNCONSTRAINED_LIMIT, 0.0) if u < 0 else (0.0, UNCONSTRAINED_LIMIT)


def search_phi(profile, u_start: float, correlation: AR1, unit: float = 1.0, series: Series | None = None,
               within: tuple[float, float] | None = None):
    """phi's estimate on nlme's unconstrained scale by Brent's method, with its interval: (u_hat, interval,
    the profiled criterion there, the pieces ``profile`` returned there).

    ``profile(u, checked=False)`` is (-2 log L profiled over the other parameters at phi = constrained(u), pieces).
    The search runs in a window around ``u_start`` (the residuals' lag-1 correlation), over the whole range if it
    ends at the window's edge, and again around phi's opposite where ``series`` (corAR1's) leaves the sign in doubt
    and the criterion is lower there (:func:`across_zero`); :func:`polished_curvature` then polishes the fit at
    u_hat, and :func:`phi_interval` gives the interval.  One home for generalized least squares
    (:func:`hierpool.closedform.gls.fit_gls`), and for the mixed model where the joint search of (theta, u) does not
    apply, did not converge or stopped on the wrong side of 0 (:func:`fit_ar1`).
    ``unit``: the profile's phi is per that unit of the user's time (:func:`phi_interval`); u_hat is the search's.
    ``within``: the part of u's range searched (default all of it): a start from across zero stays on its side
    (:func:`half_range`), where a window around it reaching over 0 ended in the minimum the look across left.
    """
    import scipy.optimize

    def search(low: float, high: float) -> tuple[float, float]:
        found = scipy.optimize.minimize_scalar(lambda u: profile(u)[0], bounds=(low, high), method="bounded",
                                               options=dict(xatol=PHI_XTOL))
        return float(found.x), float(found.fun)

    def around(start: float, bottom: float, top: float) -> tuple[float, float]:
        start = min(max(start, bottom), top)  # a window inside the range
        low, high = max(start - SEARCH_WINDOW, bottom), min(start + SEARCH_WINDOW, top)
        u, value = search(low, high)
        return search(bottom, top) if min(u - low, high - u) < 1e-3 else (u, value)

    with warnings.catch_warnings():  # the search's inner fits; the final one's messages are the caller's to warn
        warnings.simplefilter("ignore", ConvergenceWarning)
        u_hat, value = around(u_start, *(within or (-UNCONSTRAINED_LIMIT, UNCONSTRAINED_LIMIT)))
        mirrored = None if series is None else across_zero(profile, u_hat, lambda: value, series,
                                                           correlation.continuous)
        if mirrored is not None:
            u_hat = around(mirrored, *half_range(mirrored))[0]
    curvature, value, pieces = polished_curvature(profile, u_hat)
    # warned at the user's line: phi_interval, here, fit_ar1 or fit_gls, hp.lmm, the user
    return u_hat, phi_interval(u_hat, curvature, correlation, stacklevel=5, unit=unit), value, pieces


def polished_curvature(profile, u_hat: float):
    """The fit at phi's estimate ``u_hat`` (nlme's unconstrained scale) and the profiled criterion's curvature there:
    (curvature, the criterion at u_hat, the pieces ``profile`` returned there).

    Central differences at u_hat +- :data:`INTERVAL_STEP` of fits with ``checked=True`` (polished: their values to
    ~1e-12), the last one at u_hat (its messages are kept)."""
    with warnings.catch_warnings():  # the interval's inner fits; the final one's messages are the caller's to warn
        warnings.simplefilter("ignore", ConvergenceWarning)
        sides = [profile(u_hat + h, checked=True)[0] for h in (INTERVAL_STEP, -INTERVAL_STEP)]
        value, pieces = profile(u_hat, checked=True)
    return (sides[0] - 2.0 * value + sides[1]) / INTERVAL_STEP**2, value, pieces  # of -2 log L in u


def phi_interval(u_hat: float, curvature: float, correlation: AR1, stacklevel: int,
                 unit: float = 1.0) -> tuple[float, float]:
    """phi's 95% interval, nlme's: Wald on the unconstrained scale of phi per unit of the user's time, its variance
    the inverse ``curvature`` of the profiled criterion (-2 log L) / 2, mapped back.  Warns (``stacklevel`` for
    :func:`warnings.warn`) where the criterion is not convex there (no interval) or u_hat is at the edge of its
    range.

    ``unit``: the search's phi (``u_hat``, ``curvature``) is per that many units of the user's time
    (:func:`hierpool.algebra.ar1.search_units`), psi = phi^unit.  The user's u = logit(phi) moves the search's
    v = logit(psi) by dv/du = unit (1 - phi) / (1 - psi), so at the estimate (the gradient zero) the curvature in u
    is the search's times (dv/du)^2: the interval is the one a search in the user's unit would give."""
    continuous = correlation.continuous
    edge, psi = at_edge(u_hat), constrained(u_hat, continuous)
    phi = psi ** (1.0 / unit)
    if unit != 1.0:
        curvature = curvature * (unit * (1.0 - phi) / (1.0 - psi)) ** 2
        u_hat = unconstrained(phi, continuous) if 0.0 < phi < 1.0 else u_hat  # (a phi per unit beyond floats)
    if curvature > 0:
        half = Z_95 * np.sqrt(2.0 / curvature)
        with np.errstate(over="ignore"):  # a flat profile's half-width: its ends at the range's, 0 and 1
            interval = (constrained(u_hat - half, continuous), constrained(u_hat + half, continuous))
    else:
        interval = (float("nan"), float("nan"))
        warnings.warn(f"{correlation.describe()}: the criterion is not convex in phi at its estimate; no interval",
                      ConvergenceWarning, stacklevel=stacklevel)
    if edge:
        warnings.warn(f"{correlation.describe()}: phi = {phi:.6g} is at the edge of its range (a unit-root or "
                      "vanishing correlation): the fit is not reliable", ConvergenceWarning, stacklevel=stacklevel)
    return interval


def joint_search(design: Design, series: Series, continuous: bool, reml: bool):
    """(theta, u, curvature, checked) at the criterion's minimum, searched together by ``hp.fit_batch``'s host search on this
    one dataset (:class:`~hierpool.algebra.search.ar1_moments.OneDataset`): for terms on one grouping factor of at
    most :data:`~hierpool.algebra.search.ar1_moments.HOST_MAX_THETA` parameters from the per-level lagged moments
    (:mod:`hierpool.algebra.search.ar1_moments`), for several terms on the whitened systems
    (:mod:`hierpool.algebra.search.ar1_systems`, from ``hp.lmm``'s moment start) where their dense coupling is one
    a batch would take (:data:`~hierpool.algebra.batched_systems.MAX_DENSE_ENTRIES`: its systems are dense, where
    the closed form's own are sparse).  ``curvature``: the criterion's curvature in u profiled over theta, from the
    search's Hessian at its optimum (:func:`hierpool.algebra.ar1.profile_curvature`; NaN where that is not positive
    definite), for phi's interval and :func:`hierpool.algebra.ar1.clearly_curved`.  ``checked``: a stop at u's edge
    (u at the range's end, no curvature) or on a flat stretch that lies at or below the profile across the range
    (:func:`hierpool.algebra.search.ar1_moments.checked_on_profile`, the batch's rule).  None for one wider term or a
    larger coupling, and where the search did not converge or an edge stop failed that check.  Then Brent's method
    profiles phi (:func:`search_phi`).

    Both start where Brent's search does, at the lag-1 correlation of a fit's residuals at phi = 0, and reach the
    profile's minimum in a few Newton steps in (theta, u), where the profile fits theta anew at each of its points.
    corAR1 series whose phi's sign is in doubt are searched again from the optimum's u turned, the lower kept
    (:func:`~hierpool.algebra.search.ar1_moments.joint_newton`, as the batch's): the look at the one point -u_hat
    after it (:func:`across_zero`) missed an even-lag series' minimum on the other side (ML: phi -0.350 at 252.556
    where phi +0.385 gives 252.025; benchmarks/RESULTS.md, fifty-seventh session).
    """
    followed = series.previous >= 0  # some row is (series_of refuses series of one row each)
    source, members = OneDataset(design), np.array([0])
    ks, widths = tuple(term.k for term in design.terms), [term.n_levels for term in design.terms]
    settings = {"continuous": continuous, "reml": reml, "max_iterations": MAX_ITERATIONS}
    with np.errstate(all="ignore"):
        kind = joint_search_kind(ks, shared_factor([term.index for term in design.terms]))
        # corAR1 with the sign in doubt: searched from both sides of phi = 0, the lower kept (the batch's rule)
        doubt = None if continuous else sign_in_doubt(series.previous, series.lag, np.zeros(len(series.lag),
                                                                                          dtype=np.int64), 1)
        if kind == "moments":
            search, data = ar1_moments, ChunkData(source, series, members)
            found = search.search_on_host(data, decrease_tol=DECREASE_TOL, across_zero=doubt, **settings)
        elif kind == "systems" and dense_entries(widths, ks, design.p) <= MAX_DENSE_ENTRIES:
            classes = lag_classes(np.zeros(int(followed.sum()), dtype=np.int64), series.lag[followed])[0]
            lagged = lagged_systems_pay(classes, ks, widths, design.p, float(design.n), HOST_CHUNK_BYTES)
            search, data = ar1_systems, TermsChunk(source, series, members, widths, lagged)
            found = search.search_on_host(data, moment_start(design)[None], across_zero=doubt, **settings)
        else:
            return None
        # (the tests check the batch's and these fits against Brent's search alone: tests/test_batch_ar1.py _single)
        if not (found["converged"][0] and np.all(np.isfinite(found["theta"][0]))):
            return None
        theta, edge = np.asarray(found["theta"][0], dtype=float), bool(found["edge"][0])
        # at the edge u is the range's end itself (its phi may round back to a u a hair inside it)
        u = float(np.sign(unconstrained(float(found["phi"][0]), continuous)) * UNCONSTRAINED_LIMIT) if edge else \
            unconstrained(float(found["phi"][0]), continuous)
    return theta, u, float(found["curvature"][0]), edge or bool(found["flat_lowest"][0])


def fit_ar1(design: Design, correlation: AR1, data: pd.DataFrame, reml: bool = True,
            control: Control | None = None) -> AR1Result:
    """Fit ``design`` with AR(1) residuals in the series of ``correlation`` (see the module docstring).

    Parameters
    ----------
    design : Design
        The model without the correlation (:func:`hierpool.spec.design.build_design`).
    correlation : AR1
        From :func:`hierpool.spec.correlation.ar1` or :func:`~hierpool.spec.correlation.car1`.
    data : pandas.DataFrame
        The data the design was built from (the group and time columns are read from it).
    reml : bool
    control : Control, optional

    Returns
    -------
    AR1Result
    """
    series = checked_series(design, correlation, data)
    continuous = correlation.continuous
    # the search in its own unit of time (the median lag in continuous time): u's range then bounds the correlation
    # at the lags observed, whatever the user's unit (algebra.ar1.search_units); phi per the user's unit at the end
    user_series, (series, unit) = series, in_search_unit(series, continuous)
    # the search on the random-effect columns centred and scaled (algebra.conditioning, always: whitened, a covariate
    # of large mean is nearly collinear with the intercept's non-constant column) and X's centred; results on the user's
    # (X's conditioned by hp.lmm's rule where it is far from centred or unit scale: then solved there too, below)
    original, conditioning = design, condition_terms(design, force=True, fixed=True)
    design = centred_fixed_effects(conditioning.design)[0]
    # on the host: each phi is a new system (its whitened cross-products), fitted in a few evaluations
    control = replace(control or Control(), compile=False)

    # the search's fits skip the Hessian checks (finite differences of the gradient); the final fit makes them
    search_control = replace(control, hessian_max_n=0)

    def profile(u: float, checked: bool = False, start=None):
        whitened, logdet = whitened_design(design, series, constrained(u, continuous))
        system = build_system(whitened, host=True)
        # each phi's fit from the moments (or the caller's start): from the last phi's theta, where theta was large
        # (noise 1e-4 of the group sd: theta ~1.7e4), the search in theta stopped where it started (its gradient
        # there below the tolerance), the profile took those stale values, and the fit ended at phi 0.38, 0.13 above
        # the profile's minimum at 0.33 (reported converged; the fifty-ninth session's review)
        optimum = optimize_theta(system, reml, control if checked else search_control,
                                 start=moment_start(whitened) if start is None else start)
        return optimum.objective + logdet, (whitened, system, optimum, logdet)

    joint = joint_search(design, series, continuous, reml)
    # a clearly curved optimum, or a stop at the edge or on a flat stretch checked on the profile across the range
    curved = joint is not None and (joint[3] or clearly_curved(joint[2]))
    mirrored, looked = None, {}

    def look() -> float:  # the criterion at the joint optimum, for across_zero; its theta starts the checked fit
        value, pieces = profile(joint[1], start=joint[0])
        looked["theta"] = pieces[2].theta
        return value

    if curved:  # a second minimum across phi = 0 (even lags): Brent's there
        mirrored = across_zero(profile, joint[1], look, series, continuous)
    if curved and mirrored is None:  # else a flat stretch not checked: Brent's method
        theta_hat, u_hat, curvature, checked = joint
        if checked:  # the curvature by differences of polished fits, as after Brent's (no Hessian's at the edge)
            curvature, _, (whitened, system, optimum, logdet) = polished_curvature(profile, u_hat)
        else:
            with warnings.catch_warnings():  # the fit's messages are warned below
                warnings.simplefilter("ignore", ConvergenceWarning)
                whitened, system, optimum, logdet = profile(u_hat, checked=True,  # polished, checked
                                                            start=looked.get("theta", theta_hat))[1]
        interval = phi_interval(u_hat, curvature, correlation, stacklevel=4, unit=unit)  # here, hp.lmm, the user
    else:
        if mirrored is None:  # the start from the residuals of a fit at phi near 0
            with warnings.catch_warnings():  # the search's inner fits; the final one's messages are warned below
                warnings.simplefilter("ignore", ConvergenceWarning)
                nearly_independent = profile(first_u(continuous))[1]
            u_start = unconstrained(_moment_phi(design, series, nearly_independent, continuous), continuous)
        else:
            u_start = mirrored
        # (from the mirror the look across 0 is made already: the joint optimum's side was the higher)
        u_hat, interval, _, (whitened, system, optimum, logdet) = search_phi(
            profile, u_start, correlation, unit, series=series if mirrored is None else None,
            within=None if mirrored is None else half_range(mirrored))
    phi = phi_per_unit(u_hat, unit, correlation)
    # the user's parametrization at phi-hat: the conditioned optimum mapped back, solved on the user's columns; the
    # conditioned fit's checks stand (in the user's parametrization a covariate of large mean makes the Hessian look
    # indefinite), and lme4's singularity rule reads the user's theta
    # whitened per the search's unit (phi per the user's may be a float's 0 or 1 at the range's edge)
    whitened, logdet = whitened_design(original, series, constrained(u_hat, continuous))
    system = build_system(whitened, host=True)
    tilde_theta = np.asarray(optimum.theta, dtype=float)
    theta = conditioning.theta_to_user(tilde_theta)
    singular = is_singular(theta, tuple(t.k for t in original.terms), control.singular_tol)
    messages = tuple(m for m in optimum.messages if m != SINGULAR_FIT) + (SINGULAR_FIT,) * singular
    coordinates = gradient = None

    def final_solution():  # (its gradient and coordinates kept aside; solved_or_refused reads the solution)
        nonlocal coordinates, gradient
        if conditioning.fixed is None:
            gradient = objective_and_gradient_on_host(theta, system, reml)[1]
            return solve(theta, system, reml=reml)  # the host's Henderson solve
        # X far from centred or unit scale: its X' V^-1 X would lose most digits; solved conditioned, mapped back
        tilde_system = build_system(whitened_design(conditioning.design, series, constrained(u_hat, continuous))[0],
                                    host=True)
        gradient = objective_and_gradient_on_host(tilde_theta, tilde_system, reml)[1]
        tilde = solve(tilde_theta, tilde_system, reml=reml)
        coordinates = ConditionedCoordinates(conditioning, tilde_system, tilde_theta, np.asarray(tilde.vcov_beta))
        return conditioning.solution_to_user(tilde, theta)

    # (a search run off on noise-free data: the user's columns' system may not factor there, as hp.lmm's)
    solution = solved_or_refused(final_solution, theta)
    optimum = replace(optimum, theta=theta, gradient=np.asarray(gradient), is_singular=singular, messages=messages,
                      objective=conditioning.objective_to_user(optimum.objective, reml))
    design = original
    refuse_if_reproduced(design, solution, theta)  # (noise-free data: no optimum, as without the correlation)
    for message in optimum.messages:
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return AR1Result(design, system, solution, optimum, reml, True, conditioned=coordinates, structure=correlation,
                     phi=phi, phi_interval=interval, log_det_correlation=logdet,
                     series_ends=series_ends(correlation, data, design, user_series), series=user_series,
                     series_data=series_data(correlation, data, design))


def in_search_unit(series: Series, continuous: bool) -> tuple[Series, float]:
    """(``series`` with its lags in the search's unit of time, that unit in the user's): one dataset's
    :func:`hierpool.algebra.ar1.search_units`, the median lag in continuous time (1 in steps)."""
    scaled, units = in_search_units(series, np.zeros(len(series.lag), dtype=np.int64), 1, continuous)
    return scaled, float(units[0])


def phi_per_unit(u_hat: float, unit: float, correlation: AR1) -> float:
    """phi per unit of the user's time at the search's estimate ``u_hat`` (per ``unit``,
    :func:`hierpool.algebra.ar1.per_unit`).  Where a float cannot hold it, refused by name (predictions and
    simulations read it), unless u_hat is at its range's edge, where the edge warning stands and the float's 0 or 1
    is as good as any."""
    psi = constrained(u_hat, correlation.continuous)
    phi = float(per_unit(psi, unit))
    if np.isfinite(phi):
        return phi
    if not at_edge(u_hat):
        raise DataError(unrepresentable_phi(correlation, psi, unit))
    return psi ** (1.0 / unit)


def draws_per_unit(psi, unit: float, correlation: AR1, what: str) -> tuple[np.ndarray, str]:
    """(phi per unit of the user's time, the reason it is not reported or ""): draws of phi per ``unit`` (a
    sampler's, SBC's prior draw) converted by :func:`hierpool.algebra.ar1.per_unit`; where a float cannot hold any
    of them, the reason names the first such draw (``what``) and the time column (:func:`unrepresentable_phi`)."""
    psi = np.asarray(psi, dtype=float)
    phi = per_unit(psi, unit)
    beyond = ~np.isfinite(phi)
    return phi, unrepresentable_phi(correlation, float(psi[beyond].flat[0]), unit, what) if beyond.any() else ""


def unrepresentable_phi(correlation: AR1, psi: float, unit: float, what: str = "phi") -> str:
    """The message of a fit whose phi per unit of the time column a float cannot hold (:func:`per_unit`);
    ``what``: the phi it names (a posterior's draw, say)."""
    return (f"{correlation.describe()}: {what} is {psi:.4g} per {unit:.4g} units of {correlation.time!r} (its median "
            f"lag), so per unit it is {psi:.4g}^(1/{unit:.4g}), beyond what a float holds for predictions and "
            f"simulations: give {correlation.time!r} in units nearer the spacing of its readings")


def carry_of(structure: AR1, phi: float, series_ends: pd.DataFrame, newdata: pd.DataFrame, design: Design,
             series_data: pd.DataFrame):
    """(c, last) of each new row, the ``carry`` of :func:`hierpool.closedform.predict.predict`: the fitted row whose
    residual it carries (-1: none) and c = phi^lag (:func:`carried_lags`), for the mixed model's and the GLS fit's
    predictions (``design``, ``series_data``: the fit's, for :func:`warn_fitted_rows_carried`)."""
    lag, last = carried_lags(structure, series_ends, newdata)
    warn_fitted_rows_carried(structure, design, column_labels(series_data[structure.group]), newdata, last)
    return np.asarray(carried(float(phi), last, np.asarray(lag, dtype=float))), last


def warn_fitted_rows_carried(structure: AR1, design: Design, fitted_series: np.ndarray, newdata: pd.DataFrame,
                             last: np.ndarray) -> None:
    """Warn where, without a time column, ``newdata`` holds fitted rows themselves (a row's label, its series, its
    model row and its response all a fitted row's): most likely the fitted data given back, whose rows are each read
    as a step after their series' end (:func:`carried_lags`) and carry phi^step times its residual, not the fitted
    values nlme's ``predict`` gives there.  (With a time column a fitted time carries nothing.)  New steps carry no
    response, and so never warn, whatever their labels; fitted rows relabelled (``reset_index``) are not recognised.
    ``fitted_series``: each fitted row's series label (:func:`hierpool.spec.labels.column_labels`); ``last``: each
    new row's series' last fitted row, -1 for none."""
    response = design.spec.response
    if (structure.time is not None or not np.any(last >= 0) or design.frame is None
            or response not in newdata.columns or response not in design.frame.columns):
        return
    own = design.rows.get_indexer(newdata.index)  # each new row's label among the fitted rows', -1 for none
    same = (own >= 0) & (last >= 0)
    same[same] = fitted_series[own[same]] == column_labels(newdata[structure.group])[same]
    if same.any():
        given = pd.to_numeric(newdata[response].iloc[np.flatnonzero(same)], errors="coerce").to_numpy(dtype=float)
        fitted = design.frame[response].to_numpy(dtype=float)[own[same]]
        same[same] = np.isclose(given, fitted, rtol=1e-12, atol=0.0)
    if same.any():
        X = model_rows(design, newdata.iloc[np.flatnonzero(same)])[0]
        same[same] = np.all(np.isclose(X, design.X[own[same]], rtol=1e-12, atol=0.0), axis=1)
    if same.any():
        label = newdata.index[np.flatnonzero(same)[0]]
        warn_at_caller(f"newdata holds {int(same.sum())} fitted row(s) (first: row {label!r}, with its response): "
                       f"{structure.describe()} has no time column, so every new row of a fitted series is read as "
                       f"a step after that series' last fitted row and carries phi^step times its residual.  For the "
                       f"fitted rows' own predictions call predict() without newdata (or read fitted); for new "
                       f"times give the correlation a time column", HierpoolWarning)


def carried_lags(structure: AR1, series_ends: pd.DataFrame, newdata: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(lag, last) of each new row: the fitted row whose residual it carries (-1: none) and its lag after it.

    ``lag`` is the time since the last fitted row (corCAR1, and corAR1 with a time column, whose steps must then be
    whole: nlme's integer times), or, for corAR1 without a time column, the new row's step after it: its rank
    among the series' new rows in ``newdata``'s order.  Rows of new series and rows at or
    before a series' last fitted time carry nothing (last -1, lag 1).  The carried residual is then
    phi^lag (y_last - fitted_last), for the closed form's phi-hat or each posterior draw's phi.
    """
    if not isinstance(newdata, pd.DataFrame):
        raise DataError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
    check_columns(newdata, [structure.group] + ([structure.time] if structure.time else []),
                  "prediction data (newdata) of an AR(1) model")
    if newdata[structure.group].isna().any():  # read as a new series, it carried nothing, silently
        raise DataError(f"the AR(1) group column {structure.group!r} of the prediction data (newdata) is missing in "
                        f"{int(newdata[structure.group].isna().sum())} row(s): a row's series says what it carries")
    # series met by their labels' text, as the random effects' levels are (a series 1 given as "1", or 1.0, carried
    # nothing before: the row lost phi^lag times its series' last residual, silently)
    labels = column_labels(newdata[structure.group])
    found = pd.Index(series_ends.index).get_indexer(labels)
    last = np.where(found >= 0, series_ends["row"].to_numpy()[np.maximum(found, 0)], -1)
    end_key = np.where(found >= 0, series_ends["key"].to_numpy()[np.maximum(found, 0)], np.inf)
    if structure.time:
        time = newdata[structure.time]
        if not (pd.api.types.is_numeric_dtype(time) or time.isna().all()) or pd.api.types.is_bool_dtype(time):
            raise DataError(f"the AR(1) time column {structure.time!r} of the prediction data (newdata) must be "
                            f"numeric, as in fitting; got {time.dtype}")
        key = time.to_numpy(dtype=float)
        if np.isnan(key).any():  # read as "not after the series' end", it carried nothing, silently
            raise DataError(f"the AR(1) time column {structure.time!r} of the prediction data (newdata) is missing in "
                            f"{int(np.isnan(key).sum())} row(s): a row's time says what it carries")
        after = (found >= 0) & (key > end_key)
    else:  # without a time every new row of a fitted series follows it, in newdata's order
        key = np.arange(len(newdata), dtype=float)
        after = found >= 0
    if structure.time:
        lag = np.where(after, key - end_key, 1.0)
        if not structure.continuous:
            lag = whole_steps(lag, lambda at: (
                f"the AR(1) time column {structure.time!r} of the prediction data (newdata) is {float(lag[at])!r} "
                f"after its series' last fitted time, in row {at}"))
    else:  # steps: the row's rank among its series' new rows, in newdata's order
        frame = pd.DataFrame({"series": labels, "key": np.where(after, key, np.nan)})
        lag = frame.groupby("series")["key"].rank(method="dense").to_numpy()
    return np.where(after, lag, 1.0), np.where(after, last, -1)


def series_data(correlation: AR1, data: pd.DataFrame, design: Design) -> pd.DataFrame:
    """The series (and time) columns of the fitted rows, a copy: the data a refit of the design reads
    (:func:`fit_ar1`, :func:`hierpool.closedform.gls.fit_gls`)."""
    columns = [correlation.group] + ([correlation.time] if correlation.time else [])
    return data.loc[design.rows, columns].copy()


def series_ends(correlation: AR1, data: pd.DataFrame, design: Design, series: Series) -> pd.DataFrame:
    """Per series label: its last fitted row (index into the design's rows) and that row's time (or position).

    A series' last row is the one that no row follows (``series``: each row's predecessor; times are distinct
    within a series, :func:`hierpool.spec.correlation.series_of`)."""
    ends = np.setdiff1d(np.arange(design.n), series.previous[series.previous >= 0])
    key = (data[correlation.time].loc[design.rows].to_numpy(dtype=float)[ends] if correlation.time
           else ends.astype(float))
    labels = column_labels(data[correlation.group].loc[design.rows])[ends]  # (their text: carried_lags)
    return pd.DataFrame({"row": ends, "key": key}, index=pd.Index(labels, name="label"))
