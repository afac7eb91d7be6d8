"""``hp.lmm(formula, data, correlation=hp.ar1(...))`` without random-effect terms: generalized least squares with
AR(1) residuals, nlme's ``gls(..., correlation = corAR1())`` / ``corCAR1()``.

    y = X beta + e,   e ~ N(0, sigma^2 C(phi)),   C(phi) block diagonal by series, C_st = phi^|t_s - t_t|.

For a given phi the data are whitened (:func:`hierpool.closedform.ar1.whitened_design`: each row minus c_t times
the one before it, over sqrt(1 - c_t^2)), after which the model is ordinary least squares: beta-hat = (X~'X~)^-1
X~'y~, r^2 = |y~ - X~ beta-hat|^2, and the profiled criteria are

    REML: (n - p) [1 + log(2 pi r^2 / (n - p))] + log|X~'X~| + log|C(phi)|,
    ML:   n [1 + log(2 pi r^2 / n)] + log|C(phi)|,

the linear mixed model's (Bates et al. 2015, eqs. 34 and 41) with no random effects, plus the whitening's
Jacobian.  phi is found, with its interval, by the mixed model's own search
(:func:`hierpool.closedform.ar1.search_phi`); sigma^2 = r^2 / (n - p) (REML) or r^2 / n (ML) and
vcov(beta) = r^2 / (n - p) (X~'X~)^-1 at phi-hat, by either method (as nlme's gls: its ML standard errors are
those of the unbiased residual variance).

Reference: Pinheiro & Bates (2000), Mixed-Effects Models in S and S-PLUS, sec. 5.1 (gls).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd

from ..algebra.conditioning import condition_fixed, fixed_to_user
from ..algebra.criterion import profiled_criterion
from ..errors import DataError, boolean_argument
from ..spec.correlation import AR1
from ..spec.design import Design
from .ar1 import (
    carry_of,
    checked_series,
    constrained,
    in_search_unit,
    lag_one_phi,
    phi_per_unit,
    search_phi,
    series_data,
    series_ends,
    unconstrained,
    whitened_design,
)
from .results import Likelihood


@dataclass(frozen=True, eq=False)
class GLSResult(Likelihood):
    """A generalized least-squares fit with AR(1) residuals (:func:`fit_gls`).

    Attributes
    ----------
    design : Design
        The model (no random-effect terms).
    structure : AR1
    reml : bool
    phi : float
    phi_interval : tuple of float
        nlme's approximate 95% interval.
    objective : float
        -2 log L (REML or ML) at the estimates.
    beta : numpy.ndarray
    unscaled_vcov : numpy.ndarray
        (X~'X~)^-1 at phi-hat.
    pwrss : float
        r^2, the whitened residual sum of squares.
    log_det_correlation : float
        log |C(phi-hat)|.
    series_ends : pandas.DataFrame
        Per series label: its last fitted row and that row's time (or position): what :meth:`predict` carries.
    series_data : pandas.DataFrame
        The fitted rows' series (and time) columns, which a refit reads (:func:`hierpool.anova`'s).
    conditioned : tuple or None
        Where X was conditioned for the fit (:func:`~hierpool.algebra.conditioning.condition_fixed`): its map A's
        factors and (X~'X~)^-1 of X A, in which predictions take x' Cov(beta) x (at x ~ 1e7 the user's columns
        cancel most digits); None otherwise.
    """

    design: Design
    structure: AR1
    reml: bool
    phi: float
    phi_interval: tuple[float, float]
    objective: float
    beta: np.ndarray
    unscaled_vcov: np.ndarray
    pwrss: float
    log_det_correlation: float
    series_ends: pd.DataFrame | None = field(default=None, repr=False)
    series_data: pd.DataFrame | None = field(default=None, repr=False)  # the fitted rows' series columns (a refit's)
    conditioned: tuple | None = field(default=None, repr=False)

    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def n_params(self) -> int:
        """As gls's: fixed effects, phi and sigma."""
        return self.design.p + 2

    @property
    def sigma(self) -> float:
        dof = self.design.n - self.design.p if self.reml else self.design.n
        return float(np.sqrt(self.pwrss / dof))

    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self.beta, index=list(self.design.fixed_names), name="fixef")

    @property
    def beta_scale(self) -> float:
        """The residual variance that scales Cov(beta-hat): r^2 / (n - p) by REML and by ML alike, as nlme's ``gls``
        (its ``varBeta`` takes sigma sqrt((N - REML p) / (N - p))); an ML fit's :attr:`sigma` is r^2 / n."""
        return float(self.pwrss / (self.design.n - self.design.p))

    @property
    def vcov(self) -> pd.DataFrame:
        """Cov(beta-hat) = :attr:`beta_scale` (X~'X~)^-1 at phi-hat (nlme's ``vcov(gls_fit)``)."""
        names = list(self.design.fixed_names)
        return pd.DataFrame(self.beta_scale * self.unscaled_vcov, index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=list(self.design.fixed_names), name="se")

    @property
    def fitted(self) -> np.ndarray:
        """offset + X beta-hat, on the data's scale."""
        return self.design.offset + self.design.X @ self.beta

    @property
    def residuals(self) -> np.ndarray:
        """y - fitted (correlated within series; the whitened ones are the independent ones)."""
        return self.design.y - self.fitted

    def predict(self, newdata: pd.DataFrame | None = None, interval: str | None = None, level: float = 0.95,
                carry: bool = True):
        """Predictions offset + x beta-hat (nlme's ``predict(fit, newdata)``), optionally with intervals; a new row of
        a fitted series, after its last fitted row, also carries that row's residual forward: + phi^lag
        (y_last - fitted_last), the conditional mean given the data (nlme's ``predict.gls`` does not carry it:
        ``carry=False`` gives its numbers).

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Rows to predict, with the formula's columns and the series (and time) columns; the fitted rows when None
            (which carry nothing: :attr:`fitted`).
        interval : {None, "confidence", "prediction"}
            "confidence": for the mean, from x' Cov(beta-hat) x; "prediction": for a new observation, adding
            sigma^2, or sigma^2 (1 - c^2) for a row carrying c = phi^lag times a residual.
        level : float
        carry : bool
            Carry the series' last residual (see above).

        The lag is as :meth:`hierpool.closedform.ar1.AR1Result.predict` reads it (its time since the series' last
        fitted row, or without a time column its rank among the series' new rows in ``newdata``'s order); the
        variances are :func:`hierpool.closedform.predict.predict`'s with no random effects: the whitened row's
        (x - c x_last)' Cov(beta-hat) (x - c x_last), as the error of beta-hat enters through both rows.
        """
        from .predict import predict

        use = (None if newdata is None or not boolean_argument("carry", carry)
               else carry_of(self.structure, self.phi, self.series_ends, newdata, self.design, self.series_data))
        return predict(_FixedOnly(self), newdata=newdata, re=False, interval=interval, level=level, carry=use)

    @property
    def correlation(self) -> pd.DataFrame:
        """phi with its approximate 95% interval, one row named by nlme's spelling of the structure."""
        lower, upper = self.phi_interval
        return pd.DataFrame({"estimate": [self.phi], "lower": [lower], "upper": [upper]},
                            index=pd.Index([self.structure.describe()], name="structure"))

    @property
    def varcorr(self) -> pd.DataFrame:
        """The residual's variance and sd, and phi (grp "Residual", var1 "phi"; its value in sdcor)."""
        return pd.DataFrame({"grp": ["Residual", "Residual"], "var1": [None, "phi"], "var2": [None, None],
                             "vcov": [self.sigma**2, np.nan], "sdcor": [self.sigma, self.phi]})

    def summary(self) -> str:
        lower, upper = self.phi_interval
        table = pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.fixef_se})
        return "\n".join([
            f"Generalized least squares fit by {'REML' if self.reml else 'maximum likelihood'}",
            f"Formula: {self.design.spec.formula}",
            f"{'REML criterion' if self.reml else 'Deviance'}: {self.objective:.4f}   logLik: {self.loglik:.4f}   "
            f"AIC: {self.aic:.2f}   BIC: {self.bic:.2f}",
            "", f"Correlation structure: {self.structure.describe()}",
            f"  phi = {self.phi:.6g}  (95% interval {lower:.4g} to {upper:.4g})",
            f"Residual standard error: {self.sigma:.6g}   Number of obs: {self.nobs}",
            "", "Coefficients:", table.to_string()])


class _FixedOnly:
    """A GLS fit as :func:`hierpool.closedform.predict.predict` reads a mixed model's: no random-effect terms, beta
    and Cov(beta-hat) on the user's columns."""

    def __init__(self, result: GLSResult):
        self.design, self.sigma, self.residuals = result.design, result.sigma, result.residuals
        self.solution = SimpleNamespace(beta=result.beta, b=[])
        fixed, unscaled = (None, result.unscaled_vcov) if result.conditioned is None else result.conditioned
        self._coordinates = fixed, [], [], result.beta_scale * unscaled

    def prediction_coordinates(self):
        """(A's factors or None, no terms, no factors, Cov(beta) in those coordinates)."""
        return self._coordinates


def fit_gls(design: Design, correlation: AR1, data: pd.DataFrame, reml: bool = True) -> GLSResult:
    """Fit ``design`` (no random-effect terms) with AR(1) residuals in the series of ``correlation``.

    Parameters
    ----------
    design : Design
        From :func:`hierpool.spec.design.build_design` with ``random_optional=True``.
    correlation : AR1
    data : pandas.DataFrame
        The data the design was built from (the group and time columns are read from it).
    reml : bool

    Returns
    -------
    GLSResult
    """
    # the search in its own unit of time, as the mixed model's
    series, unit = in_search_unit(checked_series(design, correlation, data), correlation.continuous)
    n, p = design.n, design.p
    if n <= p + 1:
        raise DataError(f"{n} rows for {p} fixed effects and phi: nothing is left to estimate the residual variance")

    # on X's columns conditioned where they are far from centred or unit scale (at x + 1e7 phi and the SEs came out
    # 2e-6 to 6e-6 off), beta, its covariance and REML's criterion mapped back (algebra.conditioning)
    conditioning = condition_fixed(design)
    working = design if conditioning is None else conditioning.design

    def profile(u: float, checked: bool = False):
        whitened, logdet = whitened_design(working, series, constrained(u, correlation.continuous))
        X, y = whitened.X, whitened.y
        q, r = np.linalg.qr(X)
        beta = np.linalg.solve(r, q.T @ y)
        pwrss = float(np.sum((y - X @ beta) ** 2))
        log_det_xtx = 2.0 * float(np.sum(np.log(np.abs(np.diag(r)))))
        value = profiled_criterion(0.0, log_det_xtx, pwrss, n, p, 0.0, reml, sigma_known=False) + logdet
        return float(value), (beta, r, pwrss, logdet)

    ordinary = np.linalg.lstsq(working.X, working.y_less_offset, rcond=None)[0]
    u_start = unconstrained(lag_one_phi(working.y_less_offset - working.X @ ordinary, series, correlation.continuous),
                            correlation.continuous)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log 0 of a zero residual at phi's edge: the search moves on
        u_hat, interval, value, (beta, r, pwrss, logdet) = search_phi(profile, u_start, correlation, unit,
                                                                      series=series)
    r_inverse = np.linalg.inv(r)
    unscaled_vcov = r_inverse @ r_inverse.T
    conditioned = None if conditioning is None else (conditioning.fixed, unscaled_vcov)
    if conditioning is not None:
        beta, unscaled_vcov = fixed_to_user(conditioning.fixed, beta, unscaled_vcov)
        value = conditioning.objective_to_user(value, reml)
    return GLSResult(design=design, structure=correlation, reml=reml, phi=phi_per_unit(u_hat, unit, correlation),
                     phi_interval=interval, objective=value, beta=beta, unscaled_vcov=unscaled_vcov,
                     pwrss=pwrss, log_det_correlation=logdet,
                     series_ends=series_ends(correlation, data, design, series),
                     series_data=series_data(correlation, data, design), conditioned=conditioned)
