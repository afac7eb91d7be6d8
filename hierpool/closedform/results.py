"""The fitted closed-form model: estimates, tables in lme4's shapes, derived quantities."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from ..algebra.conditioning import Conditioning, fixed_coefficients
from ..algebra.henderson import Solution, diagonal_blocks
from ..algebra.linalg import theta_to_factors
from ..algebra.system import MixedModelSystem
from ..algebra.varcorr import varcorr_table
from ..errors import HierpoolError
from ..spec.design import Design
from .optimize import Optimum


def term_rows(ranef: pd.DataFrame, group: str, coef: str) -> pd.DataFrame:
    """One term's rows of an lme4-style ``ranef`` table (``grpvar``, ``term``, ``grp``): two terms may share a
    grouping factor, ``(1 | g) + (0 + x | g)``, so the group alone does not pick them."""
    return ranef[(ranef["grpvar"] == group) & (ranef["term"] == coef)]


def group_coefficients(fixef: pd.Series, ranef: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """lme4's ``coef(fit)``: per grouping factor, one row per level and a column per fixed effect, beta_c + b_jc
    where coefficient c varies by the factor (its terms together: ``(1 | g) + (0 + x | g)``), beta_c elsewhere;
    a varying coefficient without a fixed effect (``(0 + x | g)`` without x) is a column of b_jc alone, before the
    fixed effects, as lme4 puts it."""
    out = {}
    for group, rows in ranef.groupby("grpvar", sort=False):
        effects = rows.pivot_table(index="grp", columns="term", values="condval", sort=False)
        effects = effects.reindex(index=pd.unique(rows["grp"]), columns=pd.unique(rows["term"]))
        table = pd.DataFrame(np.tile(fixef.to_numpy(), (len(effects), 1)), index=effects.index,
                             columns=list(fixef.index))
        only = [name for name in effects.columns if name not in table.columns]
        for name in effects.columns:
            table[name] = (table[name] if name in table.columns else 0.0) + effects[name].to_numpy()
        table = table[only + list(fixef.index)]
        table.index.name = group
        out[group] = table
    return out


class Likelihood:
    """``loglik``, ``aic`` and ``bic`` of a Gaussian fit from its ``objective`` (REML criterion or deviance),
    ``n_params`` and ``nobs``, as lme4's ``logLik``, ``AIC`` and ``BIC``."""

    @property
    def loglik(self) -> float:
        """Log-likelihood (restricted log-likelihood for a REML fit), ``-objective / 2``."""
        return -0.5 * self.objective

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + np.log(self.nobs) * self.n_params


def user_coordinates(solution: Solution):
    """:meth:`LMMResult.prediction_coordinates` of a fit on the user's columns: (None, identities, T_j, Cov(beta))."""
    factors = [np.asarray(f) for f in solution.factors]
    return None, [np.eye(f.shape[0]) for f in factors], factors, np.asarray(solution.vcov_beta)


def prediction_error_blocks(result) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per term: cov(b_jl - b-hat_jl) per level (ell, k, k) and its covariance with beta-hat (ell, k, p).

    Both from sigma^2 Lambda C^-1 Lambda^T (Henderson 1975): term 0's blocks are ``prediction_blocks.term0`` and
    ``.cross``; the other terms' sit in ``.rest``, whose last p rows and columns belong to beta.  For a fit on
    conditioned columns the blocks are the conditioned system's, Lambda is M T~ and beta's rows map by A
    (``prediction_coordinates()``).  ``result``: an :class:`LMMResult`, or a GLMM's penalized system at the mode
    read as one (unit scale: :meth:`hierpool.closedform.glmm_results.GLMMResult.prediction_error_blocks`).
    """
    blocks = result.prediction_blocks
    layout = result.system.layout
    q = layout.q_rest
    rest = np.asarray(blocks.rest)
    fixed, term_maps, factors, _ = result.prediction_coordinates()
    out, offset = [], 0
    for j, (m, factor) in enumerate(zip(term_maps, factors)):
        factor = m @ factor  # b = M T u in the blocks' coordinates u
        if j == 0:
            var_u, cov_u_beta = np.asarray(blocks.term0), np.asarray(blocks.cross)[:, :, q:]
        else:
            ell, k = layout.n_levels[j], layout.ks[j]
            var_u = np.asarray(diagonal_blocks(rest, offset, ell, k))
            cov_u_beta = rest[offset : offset + ell * k, q:].reshape(ell, k, -1)
            offset += ell * k
        if fixed is not None:  # beta = A beta~: cov(u, beta) = cov(u, beta~) A^T
            cov_u_beta = fixed_coefficients(fixed, cov_u_beta)
        out.append((result.sigma**2 * (factor @ var_u @ factor.T), result.sigma**2 * (factor @ cov_u_beta)))
    return out


@dataclass(frozen=True)
class ConditionedCoordinates:
    """A fit on conditioned columns (:mod:`hierpool.algebra.conditioning`): its system, theta~ and Cov(beta~), in
    which a row's prediction variance is formed from x A and z_j M_j.  On the user's columns x' Cov(beta) x at
    x ~ 1e7 sums huge entries that cancel (4 digits left on sleepstudy with Days + 1e7), and the user's X' X may
    not even factor."""

    conditioning: Conditioning
    system: MixedModelSystem
    theta: np.ndarray
    vcov_beta: np.ndarray


@dataclass(frozen=True, eq=False)
class LMMResult(Likelihood):
    """A linear mixed model fitted by REML or ML (or evaluated at a given theta).

    Attributes mirror lme4: ``fixef``, ``fixef_se``, ``vcov``, ``varcorr``,
    ``ranef``, ``sigma``, ``theta``, ``objective``, ``loglik``, ``aic``, ``bic``,
    ``nobs``, ``is_singular``, ``converged``.  Tables use lme4's column names.
    """

    design: Design
    system: MixedModelSystem
    solution: Solution  # host (numpy) arrays
    optimum: Optimum | None  # None when evaluated at a given theta
    reml: bool
    on_host: bool | None = None  # where the fit's algebra ran (Control.compile); None: chosen by size
    # a fit on conditioned columns (hierpool.algebra.conditioning), in whose coordinates prediction variances are
    # formed (prediction_coordinates); None: the user's
    conditioned: ConditionedCoordinates | None = None

    # --- scalars -------------------------------------------------------------------------
    @property
    def theta(self) -> np.ndarray:
        """Relative covariance factors' lower triangles, lme4's ``getME(fit, "theta")``."""
        return np.asarray(self.solution.theta)

    @property
    def sigma(self) -> float:
        """Residual standard deviation (1.0 when residual sds were given with ``se=``)."""
        return float(self.solution.sigma)

    @property
    def objective(self) -> float:
        """REML criterion (``reml=True``) or deviance (``reml=False``), as lme4 reports them."""
        from ..algebra.criterion import ObjectiveParts, criterion

        parts = ObjectiveParts(self.solution.logdet_lz, self.solution.logdet_rx, self.solution.pwrss)
        return float(criterion(parts, self.system, self.reml))

    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def n_params(self) -> int:
        """Fixed effects + covariance parameters (+ sigma unless known), as lme4's ``df`` of logLik."""
        return self.design.p + self.theta.size + (0 if self.design.sigma_known else 1)

    @property
    def is_singular(self) -> bool:
        """lme4's ``isSingular``: the optimizer's check (with ``Control.singular_tol``), or at a given theta lme4's 1e-4
        (with known residual sds, in their units: :func:`~hierpool.closedform.optimize.known_sds_unit`)."""
        if self.optimum is not None:
            return self.optimum.is_singular
        from .optimize import user_theta_singular

        return user_theta_singular(self.theta, self.system)

    @property
    def converged(self) -> bool:
        """True when the optimizer met its tolerances and the checks passed (True at a given theta)."""
        return True if self.optimum is None else self.optimum.converged

    @property
    def messages(self) -> tuple[str, ...]:
        """What the convergence and singularity checks said."""
        return () if self.optimum is None else self.optimum.messages

    # --- fixed effects -------------------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        return pd.Series(np.asarray(self.solution.beta), index=list(self.design.fixed_names), name="fixef")

    @property
    def vcov(self) -> pd.DataFrame:
        names = list(self.design.fixed_names)
        return pd.DataFrame(np.asarray(self.solution.vcov_beta), index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(np.asarray(self.solution.vcov_beta))), index=list(self.design.fixed_names), name="se")

    # --- variance components -------------------------------------------------------------
    def term_covariances(self) -> list[np.ndarray]:
        """Sigma_j = sigma^2 T_j T_j^T of each random-effect term (in data units)."""
        scale = self.sigma**2
        return [scale * (np.asarray(t) @ np.asarray(t).T) for t in self.solution.factors]

    @cached_property
    def varcorr(self) -> pd.DataFrame:
        """Variance components as lme4's ``as.data.frame(VarCorr(fit))``: grp, var1, var2, vcov, sdcor.

        Per term: the variances, then the covariances (sdcor holds correlations),
        then a ``Residual`` row (absent when residual sds were given with ``se=``);
        built by :func:`hierpool.algebra.varcorr.varcorr_table`.
        """
        return self._varcorr()

    def _varcorr(self, phi=None) -> pd.DataFrame:
        """:attr:`varcorr` (``phi``: an AR(1) fit's last row, :func:`~hierpool.algebra.varcorr.varcorr_table`)."""
        terms = [(term.group, term.coef_names, cov) for term, cov in zip(self.design.terms, self.term_covariances())]
        return varcorr_table(terms, None if self.design.sigma_known else self.sigma, phi=phi)

    # --- random effects ------------------------------------------------------------------
    @cached_property
    def ranef(self) -> pd.DataFrame:
        """BLUPs and conditional sds as lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``."""
        frames = []
        for term, b, var in zip(self.design.terms, self.solution.b, self.solution.cond_var):
            b, var = np.asarray(b), np.asarray(var)
            for i, name in enumerate(term.coef_names):
                frames.append(
                    pd.DataFrame(
                        {
                            "grpvar": term.group,
                            "term": name,
                            "grp": term.levels,
                            "condval": b[:, i],
                            "condsd": np.sqrt(np.maximum(var[:, i, i], 0.0)),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    @property
    def coef(self) -> dict[str, pd.DataFrame]:
        """lme4's ``coef(fit)``: each grouping factor's levels' coefficients, fixed plus random
        (:func:`group_coefficients`)."""
        return group_coefficients(self.fixef, self.ranef)

    def ranef_joint_sd(self) -> np.ndarray:
        """Sd of each random effect from the whole inverse mixed-model matrix, in ``ranef``'s row order.

        ``condsd`` (lme4's condVar) holds beta at its estimate; this one also
        counts the uncertainty of beta-hat and its covariance with b:
        sqrt(diag(sigma^2 Lambda C^-1 Lambda^T)), Henderson's (1975) prediction
        error variance.  It is the posterior sd of b under a flat prior on beta
        with the variance parameters held at their estimates.
        """
        columns = []
        for cov_b, _ in self.prediction_error_blocks():
            columns.extend(np.sqrt(np.maximum(cov_b[:, i, i], 0.0)) for i in range(cov_b.shape[-1]))
        return np.concatenate(columns)

    def prediction_error_blocks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per term: cov(b_jl - b-hat_jl) per level (ell, k, k) and its covariance with beta-hat (ell, k, p):
        :func:`prediction_error_blocks`."""
        return prediction_error_blocks(self)

    def prediction_coordinates(self):
        """(A's factors, [M_j], [T_j], Cov(beta)) of the coordinates in which :attr:`prediction_blocks` are formed:
        a row's x enters as x A (:func:`~hierpool.algebra.conditioning.fixed_rows`) and its z_j as (z_j M_j) T_j.
        The user's (None, identities, T_j, Cov(beta)), or a conditioned fit's (A's factors or None, M_j, T~_j,
        Cov(beta~)): :class:`ConditionedCoordinates`."""
        if self.conditioned is None:
            return user_coordinates(self.solution)
        conditioning = self.conditioned.conditioning
        tilde = theta_to_factors(self.conditioned.theta, tuple(m.shape[0] for m in conditioning.transforms))
        return (conditioning.fixed, list(conditioning.transforms), [np.asarray(f) for f in tilde],
                self.conditioned.vcov_beta)

    # --- fitted values -------------------------------------------------------------------
    def random_contribution(self, term_index: int) -> np.ndarray:
        """z_j b_j[level] for each row of the fitted data."""
        term = self.design.terms[term_index]
        return np.einsum("nk,nk->n", term.z, np.asarray(self.solution.b[term_index])[term.index])

    @property
    def fitted(self) -> np.ndarray:
        """offset + X beta + Z b for the rows used in fitting (lme4's ``fitted``)."""
        total = self.design.offset + self.design.X @ np.asarray(self.solution.beta)
        for j in range(len(self.design.terms)):
            total = total + self.random_contribution(j)
        return total

    @property
    def residuals(self) -> np.ndarray:
        return self.design.y - self.fitted

    @cached_property
    def prediction_blocks(self):
        """Blocks of the inverse mixed-model matrix that prediction intervals need, computed once per fit."""
        from ..algebra import henderson
        from ..algebra.system import on_device, on_host
        from .optimize import runs_on_host

        if self.conditioned is not None:  # in the conditioned coordinates (prediction_coordinates)
            return henderson.prediction_covariance(self.conditioned.theta, on_host(self.conditioned.system))
        host = runs_on_host(self.system) if self.on_host is None else self.on_host
        if host:
            return henderson.prediction_covariance(np.asarray(self.theta, dtype=float), on_host(self.system))
        return henderson.as_numpy(henderson.prediction_covariance_jit(np.asarray(self.theta, dtype=float), on_device(self.system)))

    def predict(self, newdata: pd.DataFrame | None = None, re: bool = True, interval: str | None = None, level: float = 0.95):
        """Predictions, optionally with confidence or prediction intervals.

        See :func:`hierpool.closedform.predict.predict` for the variance decomposition.
        """
        from .predict import predict

        return predict(self, newdata=newdata, re=re, interval=interval, level=level)

    # --- teaching quantities -------------------------------------------------------------
    def shrinkage(self) -> pd.DataFrame:
        """Shrinkage of each group of each scalar random-intercept term ``(1 | g)``.

        For group g with n_g observations (precision-weighted sum W_g = sum w_i
        with known residual sds), the BLUP is exactly

            b_g = w_g * raw_dev_g,   w_g = W_g sigma_b^2 / (W_g sigma_b^2 + sigma^2),

        where raw_dev_g is the (weighted) mean of y - offset - X beta-hat - (other
        random-effect terms' fitted contributions) over the group: the
        no-pooling deviation, pulled toward 0 by the weight w_g (Gelman & Hill
        2007, eq. 12.1; Henderson's equations for one level).

        Returns
        -------
        pandas.DataFrame
            grpvar, grp, n, raw_mean (mean of y), raw_dev, weight, blup.
        """
        scalar = [j for j, t in enumerate(self.design.terms) if t.coef_names == ("Intercept",)]
        if not scalar:
            raise HierpoolError(
                "shrinkage() describes scalar random-intercept terms (1 | g); this model has none. "
                "Use ranef for the BLUPs of vector-valued terms."
            )
        weights = self.design.row_weights
        fixed_part = self.design.X @ np.asarray(self.solution.beta)
        contributions = [self.random_contribution(j) for j in range(len(self.design.terms))]
        covariances = self.term_covariances()
        frames = []
        for j in scalar:
            term = self.design.terms[j]
            others = sum((c for i, c in enumerate(contributions) if i != j), np.zeros(self.nobs))
            partial = self.design.y_less_offset - fixed_part - others
            count = np.bincount(term.index, minlength=term.n_levels)
            weight_sum = np.bincount(term.index, weights=weights, minlength=term.n_levels)
            raw_dev = np.bincount(term.index, weights=weights * partial, minlength=term.n_levels) / weight_sum
            raw_mean = np.bincount(term.index, weights=self.design.y, minlength=term.n_levels) / count
            var_b = covariances[j][0, 0]
            shrink = weight_sum * var_b / (weight_sum * var_b + self.sigma**2)
            frames.append(
                pd.DataFrame(
                    {
                        "grpvar": term.group,
                        "grp": term.levels,
                        "n": count,
                        "raw_mean": raw_mean,
                        "raw_dev": raw_dev,
                        "weight": shrink,
                        "blup": np.asarray(self.solution.b[j])[:, 0],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def icc(self) -> pd.Series:
        """Intraclass correlation of each grouping factor with a random intercept.

        ICC_g = sigma_g^2 / (sum_h sigma_h^2 + sigma^2), with sigma_h^2 the
        random-intercept variances of all terms (the correlation of two
        observations sharing level g of factor g only, at covariates 0).
        """
        if self.design.sigma_known:
            raise HierpoolError("icc() needs a residual variance; with known residual sds (se=) there is none")
        intercepts = {}
        for term, cov in zip(self.design.terms, self.term_covariances()):
            if "Intercept" in term.coef_names:
                i = term.coef_names.index("Intercept")
                intercepts[term.group] = intercepts.get(term.group, 0.0) + cov[i, i]
        if not intercepts:
            raise HierpoolError("icc() needs a random intercept; this model has only random slopes")
        total = sum(intercepts.values()) + self.sigma**2
        return pd.Series({g: v / total for g, v in intercepts.items()}, name="icc")

    def summary(self) -> str:
        """An lme4-like printed summary."""
        from .summary import format_summary

        return format_summary(self)

    def __repr__(self) -> str:
        return self.summary()
