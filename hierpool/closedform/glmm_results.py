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

from ..algebra.family import Family
from ..algebra.henderson import solve
from ..algebra.laplace import conditional_mode
from ..algebra.linalg import theta_to_factors
from ..algebra.quadrature import quadrature_deviance
from ..algebra.system import build_system
from ..algebra.varcorr import varcorr_table
from ..spec.design import Design
from .glmm_optimize import GLMMOptimum

#: Relative step of the finite-difference Hessian of the deviance in (theta, beta) (lme4's deriv12: 1e-4).
HESSIAN_STEP = 1e-4
#: A fit is singular when a diagonal element of some T_j is below this (lme4's isSingular tolerance).
SINGULAR_TOL = 1e-4


class GLMMResult:
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
        The approximate log-likelihood (normalizing constants included) and its criteria.
    deviance : float
        lme4's ``deviance(fit)``: the sum of the family's unit deviances at the conditional modes.
    """

    def __init__(self, design: Design, family: Family, optimum: GLMMOptimum, nodes: int, stages: int):
        self.design = design
        self.family = family
        self.optimum = optimum
        self.nodes = nodes
        self.stages = stages
        self.theta = optimum.theta

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
    def loglik(self) -> float:
        return -0.5 * self.optimum.deviance

    @property
    def n_parameters(self) -> int:
        """Parameters counted by AIC and BIC: theta, beta, and a negative binomial's shape."""
        return len(self.theta) + self.design.p + (self.family.shape is not None)

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_parameters

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + np.log(self.nobs) * self.n_parameters

    @property
    def deviance(self) -> float:
        mode = self.optimum.mode
        return float(np.sum(self.family.unit_deviances(self.design.y, mode.mu, self.design.row_weights)))

    @cached_property
    def _solution_at_mode(self):
        # the penalized system at the mode's working weights, X included: conditional variances of
        # the effects (sigma = 1) and theta-known vcov of beta
        mode = self.optimum.mode
        working = replace(self.design, y=mode.eta - self.design.offset, weights=mode.working_weights,
                          sigma_known=True, offset=np.zeros(self.design.n))
        return solve(self.theta, build_system(working, host=True))

    @property
    def fixef_se_known_theta(self) -> pd.Series:
        """SEs from the fixed-effect block at the mode, theta taken as known (lme4's ``use.hessian = FALSE``)."""
        vcov = np.asarray(self._solution_at_mode.vcov_beta)
        return pd.Series(np.sqrt(np.diag(vcov)), index=self.fixef.index, name="se")

    @cached_property
    def _hessian(self) -> np.ndarray:
        """Central finite differences of the deviance in (theta, beta) at the optimum (lme4's deriv12)."""
        point = np.concatenate([self.theta, self.optimum.beta])
        n_theta = len(self.theta)
        start = self.optimum.mode.u

        def deviance(x):
            mode = conditional_mode(x[:n_theta], x[n_theta:], self.design, self.family, start_u=start)
            if self.nodes > 1:
                return quadrature_deviance(x[:n_theta], x[n_theta:], self.design, self.family, self.nodes, mode)[0]
            return mode.laplace

        size = len(point)
        steps = HESSIAN_STEP * np.maximum(np.abs(point), 1.0)
        centre = deviance(point)
        hessian = np.empty((size, size))
        for i in range(size):
            ei = np.eye(size)[i] * steps[i]
            hessian[i, i] = (deviance(point + ei) - 2.0 * centre + deviance(point - ei)) / steps[i] ** 2
            for j in range(i):
                ej = np.eye(size)[j] * steps[j]
                hessian[i, j] = hessian[j, i] = (
                    deviance(point + ei + ej) - deviance(point + ei - ej) - deviance(point - ei + ej)
                    + deviance(point - ei - ej)) / (4.0 * steps[i] * steps[j])
        return hessian

    @property
    def vcov(self) -> pd.DataFrame:
        """Covariance of the fixed effects (lme4's ``vcov``; see :attr:`fixef_se`)."""
        if self.stages == 1:
            matrix = np.asarray(self._solution_at_mode.vcov_beta)
        else:
            n_theta = len(self.theta)
            matrix = np.linalg.inv(0.5 * self._hessian)[n_theta:, n_theta:]
        names = list(self.fixef.index)
        return pd.DataFrame(matrix, index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index, name="se")

    @property
    def varcorr(self) -> pd.DataFrame:
        factors = theta_to_factors(self.theta, tuple(t.k for t in self.design.terms))
        terms = [(t.group, list(t.coef_names), np.asarray(f) @ np.asarray(f).T)
                 for t, f in zip(self.design.terms, factors)]
        return varcorr_table(terms, None)

    @property
    def ranef(self) -> pd.DataFrame:
        """Conditional modes (``condval``) and conditional sds (``condsd``) of every effect, lme4's layout."""
        rows = []
        solution = self._solution_at_mode
        for term, b, cond_var in zip(self.design.terms, self.optimum.mode.b, solution.cond_var):
            b, cond_var = np.asarray(b), np.asarray(cond_var)
            for c, name in enumerate(term.coef_names):
                rows.append(pd.DataFrame({"grpvar": term.group, "term": name, "grp": term.levels,
                                          "condval": b[:, c], "condsd": np.sqrt(cond_var[:, c, c])}))
        return pd.concat(rows, ignore_index=True)

    @property
    def is_singular(self) -> bool:
        """A T_j diagonal at (or within 1e-4 of) zero, lme4's ``isSingular`` tolerance."""
        factors = theta_to_factors(self.theta, tuple(t.k for t in self.design.terms))
        return any(float(np.min(np.abs(np.diag(np.asarray(f))))) < SINGULAR_TOL for f in factors)
