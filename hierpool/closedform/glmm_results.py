"""A fitted GLMM's tables, as lme4's ``glmerMod`` methods give them.

Built from where :func:`hierpool.closedform.glmm_optimize.fit_laplace` ended: the conditional
mode (PIRLS), the optimum and the design.  No residual variance: the variance components are the
random effects' alone.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import numpy as np
import pandas as pd

from ..algebra.conditioning import fixed_coefficients, fixed_to_user
from ..algebra.family import Family
from ..algebra.henderson import solve
from ..algebra.laplace import mode_working, working_design
from ..algebra.linalg import theta_to_factors
from ..algebra.system import build_system
from ..algebra.varcorr import varcorr_table
from ..errors import ArgumentError
from ..spec.design import Design
from .glmm_convergence import ConvergenceReport
from .glmm_optimize import GLMMOptimum
from .optimize import is_singular
from .results import Likelihood, group_coefficients, prediction_error_blocks, user_coordinates


class GLMMResult(Likelihood):
    """A GLMM fitted by the Laplace approximation or adaptive quadrature (``hp.glmm``).

    Attributes
    ----------
    fixef, fixef_se : pandas.Series
        Fixed effects and their standard errors.  As lme4's default (``vcov(fit)``), the SEs come
        from the finite-difference Hessian of the deviance in (theta, beta) (nAGQ >= 1); at
        nAGQ = 0, from the fixed-effect block of the penalized system at the mode, theta taken
        as known (lme4's ``vcov(fit, use.hessian = FALSE)``, :attr:`fixef_se_known_theta`).
    theta : numpy.ndarray
        lme4's ``getME(fit, "theta")``.
    varcorr : pandas.DataFrame
        lme4's ``as.data.frame(VarCorr(fit))`` (no residual row).
    ranef : pandas.DataFrame
        Conditional modes with their conditional sds, lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``.
    loglik, aic, bic : float
        The approximate log-likelihood (normalizing constants included) and its criteria: glmer's at
        ``nAGQ`` 0 and 1; at ``nAGQ > 1`` glmer's ``logLik`` leaves out the saturated model's term (cbpp with 9
        nodes: -50.005 there, -91.983 here, the same deviance 73.373), so that its AIC is not comparable across
        ``nAGQ``; hierpool's is (-92.03 at ``nAGQ=1``).
    deviance : float
        lme4's ``deviance(fit)``: the sum of the family's unit deviances at the conditional modes.
    converged, is_singular : bool
        lme4's convergence checks (:mod:`hierpool.closedform.glmm_convergence`; the messages in
        ``convergence.messages``) and ``isSingular``.
    """

    def __init__(self, design: Design, family: Family, optimum: GLMMOptimum, nodes: int, stages: int,
                 convergence: ConvergenceReport | None = None):
        self.design = design
        self.convergence = convergence
        self.family = family
        self.optimum = optimum
        self.nodes = nodes
        self.stages = stages
        self.theta = optimum.theta

    @property
    def converged(self) -> bool:
        """False when lme4's checks failed at the optimum (gradient, Hessian) or PIRLS did not reach the mode;
        :attr:`convergence` holds the messages (each also warned when the fit was made)."""
        return True if self.convergence is None else self.convergence.converged

    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def shape(self) -> float | None:
        """A negative binomial's shape (NB2: variance mu + mu^2 / shape)."""
        return self.family.shape

    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self.optimum.beta, index=list(self.design.fixed_names), name="fixef")

    @property
    def objective(self) -> float:
        """-2 log L at the optimum, L the Laplace (or quadrature) likelihood: glmer's ``-2 * logLik(fit)``, the
        "deviance" of its summary table (:attr:`deviance` is the sum of the unit deviances, glmer's ``deviance()``)."""
        return self.optimum.deviance

    @property
    def n_params(self) -> int:
        """Parameters counted by AIC and BIC: theta, beta, and a negative binomial's shape."""
        return len(self.theta) + self.design.p + (self.family.shape is not None)

    @property
    def deviance(self) -> float:
        mode = self.optimum.mode
        return float(np.sum(self.family.unit_deviances(self.design.y, mode.mu, self.design.row_weights)))

    @property
    def fitted(self) -> np.ndarray:
        """The means g^-1(offset + X beta + Z b*) of the rows used in fitting, at the conditional modes (lme4's
        ``fitted``; a binomial's as proportions)."""
        return np.asarray(self.optimum.mode.mu, dtype=float)

    @property
    def residuals(self) -> np.ndarray:
        """Deviance residuals sign(y - mu) sqrt(a d(y, mu)), whose squares sum to :attr:`deviance` (lme4's
        ``residuals(fit)``, type "deviance"); :meth:`pearson_residuals` for (y - mu) sqrt(a / V(mu))."""
        return self.family.deviance_residuals(self.design.y, self.fitted, self.design.row_weights)

    @property
    def pearson_residuals(self) -> np.ndarray:
        """(y - mu) sqrt(a / V(mu)): lme4's ``residuals(fit, type = "pearson")`` (a the prior weights, trials)."""
        return self.family.pearson_residuals(self.design.y, self.fitted, self.design.row_weights)

    @property
    def coef(self) -> dict[str, pd.DataFrame]:
        """lme4's ``coef(fit)``: each grouping factor's levels' coefficients on the link scale, the fixed effects plus
        the conditional modes (:func:`~hierpool.closedform.results.group_coefficients`)."""
        return group_coefficients(self.fixef, self.ranef)

    @property
    def _searched_design(self) -> Design:
        """The design the fit searched: X A where X was conditioned (``GLMMOptimum.conditioning``), else the user's."""
        conditioning = self.optimum.conditioning
        return self.design if conditioning is None else conditioning.design

    @cached_property
    def system_at_mode(self):
        """The penalized system at the mode's working weights, X included (unit scale, theta known; on the
        searched X A where X was conditioned): the conditional variances of the effects, the theta-known vcov of
        beta and the prediction blocks."""
        response, weights = mode_working(self.optimum.mode, self._searched_design, self.family)
        return build_system(working_design(self._searched_design, response, weights, joint=True), host=True)

    @cached_property
    def _searched_solution(self):
        """Henderson's solution of :attr:`system_at_mode`, in its own coordinates (beta~ where X was conditioned)."""
        return solve(self.theta, self.system_at_mode)

    @cached_property
    def solution_at_mode(self):
        """Henderson's solution of the penalized system at the mode (:attr:`system_at_mode`, unit scale, theta
        known) on the user's columns: its ``factors`` (T_j), ``cond_var`` (lme4's conditional variances of b) and
        theta-known ``vcov_beta`` (A Cov(beta~) A^T where X was conditioned); the modes themselves are
        ``optimum.mode.b``."""
        conditioning = self.optimum.conditioning
        if conditioning is None:
            return self._searched_solution
        return conditioning.solution_to_user(self._searched_solution, self.theta)

    @property
    def fixef_se_known_theta(self) -> pd.Series:
        """SEs from the fixed-effect block at the mode, theta taken as known (lme4's ``use.hessian = FALSE``)."""
        vcov = np.asarray(self.solution_at_mode.vcov_beta)
        return pd.Series(np.sqrt(np.diag(vcov)), index=self.fixef.index, name="se")

    @property
    def _hessian(self) -> np.ndarray:
        """The finite-difference Hessian of the deviance in (theta, beta) at the optimum (lme4's deriv12), or in
        (theta, beta~) where X was conditioned (``GLMMOptimum.conditioning``)."""
        if self.optimum.hessian is None:
            raise ArgumentError("this fit has no Hessian (nAGQ = 0 computes none)")
        return self.optimum.hessian

    @cached_property
    def searched_vcov(self) -> np.ndarray:
        """Covariance of the fixed effects in the coordinates the fit searched: :attr:`vcov`'s, or Cov(beta~) where
        X was conditioned (``GLMMOptimum.conditioning``), in which predictions form x A Cov(beta~) (x A)^T."""
        if self.stages == 1:
            return np.asarray(self._searched_solution.vcov_beta)
        # the conditioned columns' Hessian where the fit has one (GLMMOptimum.beta_hessian): the same block
        hessian = self._hessian if self.optimum.beta_hessian is None else self.optimum.beta_hessian
        return np.linalg.inv(0.5 * hessian)[len(self.theta):, len(self.theta):]

    def parameter_covariance(self) -> np.ndarray:
        """The covariance of (theta, beta), the inverse of half the deviance's Hessian, on the user's beta: where X
        was conditioned, J Cov(theta, beta~) J^T with J = diag(I, A)."""
        covariance = np.linalg.inv(0.5 * self._hessian)
        conditioning = self.optimum.conditioning
        if conditioning is None:
            return covariance
        n_theta, factors = len(self.theta), conditioning.fixed
        out = covariance.copy()
        out[:n_theta, n_theta:] = fixed_coefficients(factors, covariance[:n_theta, n_theta:])
        out[n_theta:, :n_theta] = out[:n_theta, n_theta:].T
        out[n_theta:, n_theta:] = fixed_to_user(factors, np.zeros(self.design.p), covariance[n_theta:, n_theta:])[1]
        return out

    @property
    def vcov(self) -> pd.DataFrame:
        """Covariance of the fixed effects (lme4's ``vcov``; see :attr:`fixef_se`)."""
        matrix = self.searched_vcov
        if self.optimum.conditioning is not None:  # A Cov(beta~) A^T
            matrix = fixed_to_user(self.optimum.conditioning.fixed, np.zeros(len(matrix)), matrix)[1]
        names = list(self.fixef.index)
        return pd.DataFrame(matrix, index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index, name="se")

    def term_covariances(self) -> list[np.ndarray]:
        """Sigma_j = T_j T_j' of each random-effect term (on the link scale), as :meth:`LMMResult.term_covariances`."""
        factors = theta_to_factors(np.asarray(self.theta, dtype=float), tuple(t.k for t in self.design.terms))
        return [np.asarray(f) @ np.asarray(f).T for f in factors]

    @property
    def varcorr(self) -> pd.DataFrame:
        terms = [(t.group, list(t.coef_names), cov) for t, cov in zip(self.design.terms, self.term_covariances())]
        return varcorr_table(terms, None)

    @property
    def ranef(self) -> pd.DataFrame:
        """Conditional modes (``condval``) and conditional sds (``condsd``) of every effect, lme4's layout."""
        rows = []
        solution = self.solution_at_mode
        for term, b, cond_var in zip(self.design.terms, self.optimum.mode.b, solution.cond_var):
            b, cond_var = np.asarray(b), np.asarray(cond_var)
            for c, name in enumerate(term.coef_names):
                rows.append(pd.DataFrame({"grpvar": term.group, "term": name, "grp": term.levels,
                                          "condval": b[:, c], "condsd": np.sqrt(cond_var[:, c, c])}))
        return pd.concat(rows, ignore_index=True)

    def summary(self) -> str:
        """The text lme4's ``summary(fit)`` prints: fit criteria, variance components, z tests."""
        from .summary import format_glmm_summary

        return format_glmm_summary(self)

    def prediction_error_blocks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per term on the link scale: cov(b_jl - b*_jl) per level (ell, k, k) and its covariance with beta-hat
        (ell, k, p), from the penalized system at the mode, theta taken as known (the blocks
        ``predict(..., interval="confidence")`` reads: :func:`hierpool.closedform.results.prediction_error_blocks`)."""
        return prediction_error_blocks(self._link_scale)

    @cached_property
    def _link_scale(self) -> "_LinkScale":
        return _LinkScale(self)

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "link", re: bool = True,
                interval: str | None = None, level: float = 0.95):
        """Predictions on the link or the response scale (lme4's ``predict(fit, newdata, type, re.form)``).

        The linear predictor offset + x beta + z b (b: the conditional modes of known levels; 0 for a
        level never seen, or everywhere with ``re=False``).  ``interval="confidence"``: its normal
        interval on the link scale, from the penalized system at the mode with theta taken as known
        (known levels: the joint conditional covariance of (beta, b), Henderson 1975; new levels add
        the term's variance z Sigma z^T; ``re=False`` uses :attr:`vcov`), mapped through the inverse
        link with ``type="response"``, where ``se`` is the delta method's se * d mu / d eta.  There is
        no prediction interval: a new count or 0/1 outcome is not normal.
        """
        from .predict import check_interval, on_response_scale, predict

        if type not in ("link", "response"):
            raise ArgumentError(f"type must be 'link' or 'response', got {type!r}")
        check_interval(interval, (None, "confidence"),
                       " for a GLMM (a new count or 0/1 outcome has no normal prediction interval)")
        out = predict(self._link_scale, newdata=newdata, re=re, interval=interval, level=level)
        if type == "link":
            return out
        return on_response_scale(out, self.family.link)

    def marginal(self, newdata: pd.DataFrame | None = None, level: float = 0.95, method: str = "auto",
                 nodes: int | None = None, draws: int | None = None, seed: int = 0):
        """Population-average (marginal) coefficients and means: the random effects integrated out.

        The fit's beta is *subject-specific*: it moves the mean of one subject, g^-1(eta + z'b),
        eta = offset + x beta.  Averaged over subjects, b ~ N(0, Sigma), a row's mean is

            m(x) = E_b[g^-1(eta + z'b)] = E_t[g^-1(eta + sqrt(v) t)],   v = sum_j z_j' Sigma_j z_j,

        one-dimensional for any number of terms (z'b is one normal variable).  The
        *population-average* coefficients are the weighted least-squares projection of the
        marginal linear predictor on the fixed-effect columns over the fitted rows,

            beta_M = (X'AX)^-1 X'A (g(m) - offset),

        A the prior weights (a binomial row of n trials counts as its n 0/1 rows) (Hedeker et al.
        2018; GLMMadaptive's ``marginal_coefs``, unweighted on 0/1 rows).  Exact where g(m) - offset
        lies in X's span: probit, g(m) = eta / sqrt(1 + v), so beta_M = beta / sqrt(1 + sigma^2) for a
        random intercept; log, g(m) = eta + v / 2, the intercept plus sigma^2 / 2, slopes unchanged
        (Zeger, Liang & Albert 1988).  For the logit, Zeger et al.'s approximation is
        beta / sqrt(1 + c^2 sigma^2), c = 16 sqrt(3) / (15 pi).  An exchangeable GEE estimates beta_M
        directly (notebook ``06_binary_outcomes``).

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Rows whose population-average means to predict (the fitted rows when None).  Grouping
            levels are not read: a marginal mean averages over every group, seen or not.
        level : float
            Coverage of the intervals.
        method : {"auto", "quadrature", "qmc"}
            ``"auto"``: the closed form for the probit and the log link, Gauss-Hermite quadrature of
            the one-dimensional integral otherwise (every term, however many, enters through v);
            ``"quadrature"``: Gauss-Hermite for every link; ``"qmc"``: quasi-Monte Carlo over all
            terms' effects jointly, b_j = T_j u_j with u from a scrambled Sobol sequence (a check of
            the reduction, with error of order 1 / draws).
        nodes : int, optional
            Gauss-Hermite nodes (at most 256).  None doubles the rule from 16 until two rules agree to
            1e-10 relative, and warns (HierpoolWarning) if 256 nodes do not.
        draws : int, optional
            Sobol points for ``method="qmc"`` (a power of two; 4096 when None).
        seed : int
            The Sobol sequence's scrambling seed.

        Returns
        -------
        MarginalResult
            ``coef`` (subject-specific and population-average coefficients, the latter's se and
            interval), ``vcov``, ``predictions`` (``fit``, ``se``, ``lower``, ``upper``, ``link``,
            ``conditional`` (the mean at b = 0), ``re_sd``), ``method``, ``nodes``, ``draws``,
            ``error``, ``uncertainty``.

        Notes
        -----
        Intervals come from the delta method: beta_M and m are smooth functions of (theta, beta),
        whose derivatives the same integrals give, and the covariance of (theta, beta) is the inverse
        of half the Hessian of the deviance (the one behind :attr:`vcov`; nAGQ = 0 has none, and
        there theta is taken as known).  theta is included because the population-average
        quantities move with the random effects' variance as much as with beta (the intercept above
        all); it enters only through v.  The delta method rather than simulating (theta, beta)
        from their normal approximation (GLMMadaptive's choice): it is deterministic, costs one
        integration instead of one per draw, and on cbpp agrees with the
        simulation's sds within its Monte Carlo error (``tests/test_glmm_marginal.py``).  Each
        mean's interval is normal on the marginal link scale g(m) and mapped through g^-1, so it
        stays inside the response's range.

        References
        ----------
        Zeger, S. L., Liang, K.-Y. & Albert, P. S. (1988). Models for longitudinal data: a
        generalized estimating equation approach. Biometrics 44, 1049-1060.
        Hedeker, D., du Toit, S. H. C., Demirtas, H. & Gibbons, R. D. (2018). A note on
        marginalization of regression parameters from mixed models of binary outcomes.
        Biometrics 74, 354-361.
        """
        from .glmm_marginal import marginal

        def covariance():  # of (theta, beta), asked for once the arguments are checked
            if self.stages == 2:
                return self.parameter_covariance(), "theta and beta"
            n_theta = len(self.theta)
            known_theta = np.zeros((n_theta + self.design.p,) * 2)
            known_theta[n_theta:, n_theta:] = self.vcov.to_numpy()
            return known_theta, "beta"

        return marginal(self, covariance, newdata=newdata, level=level, method=method, nodes=nodes, draws=draws,
                        seed=seed)

    @property
    def is_singular(self) -> bool:
        """lme4's ``isSingular``: a T_j diagonal below 1e-4."""
        return is_singular(self.theta, tuple(t.k for t in self.design.terms))


class _LinkScale:
    """The fit as :func:`hierpool.closedform.predict.predict` reads an LMM's: the penalized system at the
    mode (unit scale: sigma = 1), the fit's beta and modes, and :attr:`GLMMResult.vcov` for beta."""

    sigma = 1.0

    def __init__(self, result: GLMMResult):
        from ..algebra.henderson import prediction_covariance

        at_mode = result.solution_at_mode
        self.design = result.design
        self.system = result.system_at_mode
        self.solution = replace(at_mode, beta=result.optimum.beta, b=result.optimum.mode.b,
                                vcov_beta=result.vcov.to_numpy())
        self.prediction_blocks = prediction_covariance(np.asarray(result.theta, dtype=float), self.system)
        self.conditioning, self.searched_vcov = result.optimum.conditioning, result.searched_vcov

    def term_covariances(self) -> list[np.ndarray]:
        return [np.asarray(t) @ np.asarray(t).T for t in self.solution.factors]

    def prediction_coordinates(self):
        """The user's columns (:func:`hierpool.closedform.results.user_coordinates`), or where X was conditioned
        (``GLMMOptimum.conditioning``) A's factors and Cov(beta~): the system's blocks are in beta~."""
        conditioning = self.conditioning
        if conditioning is None:
            return user_coordinates(self.solution)
        factors = [np.asarray(f) for f in self.solution.factors]
        return conditioning.fixed, [np.eye(f.shape[0]) for f in factors], factors, self.searched_vcov
