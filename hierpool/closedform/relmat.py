"""The animal model: a linear mixed model whose one random-effect term has a known relationship matrix A.

    y = X beta + Z b + e,    b ~ N(0, sigma_A^2 A),    e ~ N(0, sigma^2 W^-1),

b over every level of A (animals with records or not; Z's columns of the others are zero).  With
theta^2 = sigma_A^2 / sigma^2 (lme4's theta) Henderson's mixed-model equations are

    C(theta) [beta; b] = [X'Wy; Z'Wy],    C(theta) = [[X'WX, X'WZ], [Z'WX, Z'WZ + A^-1 / theta^2]],

sparse when A^-1 is (a pedigree's: Henderson 1976; Quaas 1976), and factored by SuperLU
(:func:`scipy.sparse.linalg.splu`, symmetric minimum-degree ordering, no pivoting: the pivots of a symmetric
elimination of a positive definite matrix).  With V0 = W^-1 + theta^2 Z A Z' and
log|V0| = log|Z'WZ + A^-1 / theta^2| + q log theta^2 + log|A| - log|W|, the profiled criteria are lme4's
(Bates et al. 2015, eqs. 34 and 41, with Z* = Z L, A = L L', the pedigreemm / lme4qtl construction):

    REML: (n - p) [1 + log(2 pi r^2 / (n - p))] + log|C| + q log theta^2 + log|A| - log|W|
    ML:   n [1 + log(2 pi r^2 / n)] + log|C_bb| + q log theta^2 + log|A| - log|W|

where r^2 = y'Wy - [beta; b]' [X'Wy; Z'Wy] is the penalized residual sum of squares, |C| = |C_bb| |X'V0^-1 X|,
and (C^-1)_beta beta = (X'V0^-1 X)^-1.  theta is found by Brent's method on log theta; sigma^2 = r^2 / (n - p)
(REML) or r^2 / n (ML); vcov(beta) = sigma^2 (C^-1)_beta beta; the breeding values' prediction error
variances are sigma^2 diag((C^-1)_bb), computed by solving for C^-1's columns (up to :data:`PEV_MAX_LEVELS`
levels: beyond, selected inversion would be needed, and the conditional sds are not given).

This is the one place hierpool solves mixed-model equations by a general sparse factorization: the blocked
factorization of :mod:`hierpool.algebra.criterion` has one level per row and term (Lambda = I (x) T), which A
breaks.  Not yet: other random-effect terms beside the relationship term, random slopes with a relationship
matrix, a family, the Bayesian engine's ``relmat=``.

References: Henderson, C. R. (1976), Biometrics 32, 69-83; Meyer, K. (1989), Genet. Sel. Evol. 21, 317-340
(REML by the mixed-model equations); Bates, Maechler, Bolker & Walker (2015), J. Stat. Softw. 67(1);
Vazquez et al. (2010), pedigreemm, J. Dairy Sci. 93.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.optimize
import scipy.sparse
import scipy.sparse.linalg
from scipy import stats

from ..algebra.varcorr import varcorr_table
from ..errors import ArgumentError, ConvergenceWarning, DataError, HierpoolWarning
from ..spec.design import Design
from ..spec.relationship import Relationship
from .results import Likelihood

#: log theta is searched in this interval (theta from 1e-4 to 1e4).
LOG_THETA_BOUNDS = (np.log(1e-4), np.log(1e4))
#: Brent's tolerance on log theta (relative; theta and sigma_A^2 to about 1e-7).
LOG_THETA_TOL = 1e-7
#: A profiled criterion that changes by less than this over the whole theta interval is flat: not identifiable.
FLAT_PROFILE = 1e-3
#: Prediction error variances (condsd) are computed up to this many levels of A.
PEV_MAX_LEVELS = 5_000
#: Columns of C^-1 solved for at once (memory: (p + q) x this many numbers).
PEV_CHUNK = 256


class _Equations:
    """The theta-free blocks of the mixed-model equations, and K(theta) = Z'WZ + A^-1 / theta^2 factored.

    X's block is eliminated by its Schur complement S = X'WX - X'WZ K^-1 Z'WX (p x p): SuperLU then factors
    K alone, whose pattern (A^-1's plus a diagonal) is the same at every theta, so its fill-reducing ordering
    (minimum degree on K + K') is found once and reused (about 70% of a factorization's time otherwise);
    X's columns, each touching every animal with records, would be dense rows in that ordering.
    |C| = |K| |S| and (C^-1)_beta beta = S^-1.
    """

    def __init__(self, *, XtX, ZtX, ZtZ, Xty, Zty, yty, inverse, n, log_det_a, log_det_w):
        self.XtX, self.ZtX, self.ZtZ, self.Xty, self.Zty, self.yty = XtX, ZtX, ZtZ, Xty, Zty, yty
        self.inverse, self.n, self.p, self.q = inverse, n, XtX.shape[0], inverse.shape[0]
        self.log_det_a, self.log_det_w = log_det_a, log_det_w
        self._order = None  # K's fill-reducing ordering, from the first factorization

    def factor(self, theta: float):
        """(a solve v -> K^-1 v, log|K|), or None where K is not positive definite."""
        options = dict(diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
        if self._order is None:
            K = scipy.sparse.csc_matrix(scipy.sparse.diags(self.ZtZ) + self.inverse / theta**2)
            lu = scipy.sparse.linalg.splu(K, permc_spec="MMD_AT_PLUS_A", **options)
            self._order = np.argsort(lu.perm_c)  # the symmetric ordering SuperLU chose, as row/column indices
            self._permuted = (self.ZtZ[self._order],
                              scipy.sparse.csc_matrix(self.inverse[self._order][:, self._order]))
        diagonal, inverse = self._permuted
        K = scipy.sparse.csc_matrix(scipy.sparse.diags(diagonal) + inverse / theta**2)
        lu = scipy.sparse.linalg.splu(K, permc_spec="NATURAL", **options)
        pivots = lu.U.diagonal()
        if not (np.array_equal(lu.perm_r, lu.perm_c) and np.all(pivots > 0)):  # rows swapped: a zero pivot
            return None
        order, back = self._order, np.argsort(self._order)

        def solve(v):
            return lu.solve(np.ascontiguousarray(v[order]))[back]

        return solve, float(np.sum(np.log(pivots)))

    def evaluate(self, theta: float, reml: bool) -> tuple[float, dict]:
        """The criterion at theta, and the pieces of the fit there."""
        factored = self.factor(theta)
        if factored is None:
            return np.inf, {}
        solve, log_det_k = factored
        k_zy = solve(self.Zty)
        k_zx = solve(self.ZtX) if self.p else np.zeros((self.q, 0))
        schur = self.XtX - self.ZtX.T @ k_zx
        schur = (schur + schur.T) / 2
        try:
            factor = np.linalg.cholesky(schur) if self.p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            return np.inf, {}
        beta = scipy.linalg.cho_solve((factor, True), self.Xty - self.ZtX.T @ k_zy) if self.p else np.zeros(0)
        b = k_zy - k_zx @ beta
        pwrss = float(self.yty - beta @ self.Xty - b @ self.Zty)
        beta_block = scipy.linalg.cho_solve((factor, True), np.eye(self.p)) if self.p else np.zeros((0, 0))
        log_det_s = 2.0 * float(np.sum(np.log(np.diag(factor))))
        constant = self.q * np.log(theta**2) + self.log_det_a - self.log_det_w
        if reml:
            dof = self.n - self.p
            value = dof * (1.0 + np.log(2.0 * np.pi * pwrss / dof)) + log_det_k + log_det_s + constant
        else:
            value = self.n * (1.0 + np.log(2.0 * np.pi * pwrss / self.n)) + log_det_k + constant
        return float(value), dict(solve=solve, k_zx=k_zx, solution=np.concatenate([beta, b]), pwrss=pwrss,
                                  beta_block=beta_block)


def _equations(design: Design, rel: Relationship) -> tuple[_Equations, np.ndarray]:
    """The blocks of the equations, and each design level's position among A's labels."""
    term = design.terms[0]
    position = pd.Index(rel.labels).get_indexer([str(level) for level in term.levels])
    if np.any(position < 0):
        missing = [str(level) for level, at in zip(term.levels, position) if at < 0]
        raise DataError(f"{len(missing)} level(s) of {term.group!r} in the data are not labels of its relationship "
                        f"matrix: {missing[:5]}")
    n, p, q = design.n, design.p, len(rel.labels)
    w = np.ones(n) if design.weights is None else np.asarray(design.weights, dtype=float)
    column = position[term.index]
    y = np.asarray(design.y, dtype=float) - np.asarray(design.offset, dtype=float)
    X = np.asarray(design.X, dtype=float)
    ZtX = np.stack([np.bincount(column, w * X[:, c], q) for c in range(p)], axis=1) if p else np.zeros((q, 0))
    equations = _Equations(XtX=X.T @ (w[:, None] * X), ZtX=ZtX, ZtZ=np.bincount(column, w, q),
                           Xty=X.T @ (w * y), Zty=np.bincount(column, w * y, q), yty=float(y @ (w * y)),
                           inverse=rel.inverse, n=n, log_det_a=rel.log_det, log_det_w=float(np.sum(np.log(w))))
    return equations, position


def check_design(design: Design, rel: Relationship) -> None:
    """One random-effect term, an intercept on ``rel.group``; no known residual sds, no family."""
    if design.family is not None:
        raise ArgumentError("relmat= is not yet available with a family (a GLMM): a Gaussian response only")
    if design.sigma_known:
        raise ArgumentError("relmat= cannot be combined with se= (known residual sds)")
    labels = [term.label for term in design.terms]
    term = design.terms[0] if len(design.terms) == 1 else None
    if term is None or term.group != rel.group or tuple(term.coef_names) != ("Intercept",):
        raise ArgumentError(
            f"relmat= for {rel.group!r} needs the formula's only random-effect term to be (1 | {rel.group}); got "
            f"{', '.join(labels) or 'none'}.  Other terms beside a relationship term (a permanent environment "
            f"(1 | id2), say) and random slopes with a relationship matrix are not supported yet")


def fit_relmat(design: Design, rel: Relationship, reml: bool = True) -> RelmatResult:
    """REML or ML fit of the animal model of the module docstring."""
    check_design(design, rel)
    if design.n <= design.p:
        raise DataError(f"{design.n} rows for {design.p} fixed effects: nothing is left to estimate the variances")
    equations, position = _equations(design, rel)

    def objective(log_theta: float) -> float:
        # outside the bounds, the bound's value plus a quadratic wall: Brent's bracketing stays finite
        clipped = float(np.clip(log_theta, *LOG_THETA_BOUNDS))
        return equations.evaluate(float(np.exp(clipped)), reml)[0] + (log_theta - clipped) ** 2

    # Brent's method from a bracket at h^2 = 0.12 and 0.5: ~15 factorizations, where the bounded variant's golden
    # sections over the whole interval took ~45
    found = scipy.optimize.minimize_scalar(objective, bracket=(np.log(0.37), 0.0), method="brent",
                                           options=dict(xtol=LOG_THETA_TOL, maxiter=200))
    log_theta = float(np.clip(found.x, *LOG_THETA_BOUNDS))
    value, pieces = equations.evaluate(float(np.exp(log_theta)), reml)
    # the two ends of the interval: an optimum at a bound that the descent from the bracket missed (a second,
    # interior minimum), and a profile too flat to tell sigma_A^2 from sigma^2 (unrelated animals with one
    # record each: A = I and Z = I make the model a sum of two variances)
    ends = [equations.evaluate(float(np.exp(bound)), reml)[0] for bound in LOG_THETA_BOUNDS]
    if max(ends) - value < FLAT_PROFILE:
        raise DataError(
            f"the data cannot tell the variance of {rel.group!r} from the residual variance: the profiled criterion "
            f"changes by less than {FLAT_PROFILE} over theta from 1e-4 to 1e4 (are the animals with records "
            f"related?  With one record each and no relatives among them the two variances are not identifiable)")
    best = int(np.argmin(ends))
    if ends[best] < value - 1e-9:
        log_theta = LOG_THETA_BOUNDS[best]
        value, pieces = equations.evaluate(float(np.exp(log_theta)), reml)
    if not np.isfinite(value):
        raise DataError("the animal model's equations are not positive definite at the optimum: check the "
                        "relationship matrix and the fixed effects")
    singular = log_theta <= LOG_THETA_BOUNDS[0] + 1e-3
    if singular:
        warnings.warn(f"boundary (singular) fit: the variance of {rel.group!r} is (near) zero (theta below 1e-4)",
                      ConvergenceWarning, stacklevel=3)
    if log_theta >= LOG_THETA_BOUNDS[1] - 1e-3:
        warnings.warn(f"boundary fit: the residual variance is (near) zero against that of {rel.group!r} (theta "
                      f"above 1e4)", ConvergenceWarning, stacklevel=3)
    return RelmatResult(design=design, relationship=rel, equations=equations, reml=reml, log_theta=log_theta,
                        objective=value, pieces=pieces, recorded=np.isin(np.arange(len(rel.labels)), position),
                        converged=bool(found.success), evaluations=int(found.nfev), is_singular=singular)


class RelmatResult(Likelihood):
    """A fitted animal model (:func:`fit_relmat`): lme4's accessors, breeding values for every level of A, h^2."""

    def __init__(self, *, design, relationship, equations, reml, log_theta, objective, pieces, recorded, converged,
                 evaluations, is_singular):
        self.design, self.relationship, self._equations = design, relationship, equations
        self.reml, self.objective, self._pieces = reml, objective, pieces
        self.theta = np.array([np.exp(log_theta)])
        self.recorded, self.converged, self.evaluations, self.is_singular = recorded, converged, evaluations, \
            is_singular

    # --- variance components ------------------------------------------------------------
    @property
    def sigma(self) -> float:
        dof = self.design.n - self.design.p if self.reml else self.design.n
        return float(np.sqrt(self._pieces["pwrss"] / dof))

    @property
    def sigma_a(self) -> float:
        """sd of the term's effects (sigma_A, the additive genetic sd for a pedigree)."""
        return float(self.theta[0] * self.sigma)

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: the term's variance sigma_A^2, then the residual's."""
        term = self.design.terms[0]
        return varcorr_table([(term.group, term.coef_names, np.array([[self.sigma_a**2]]))], self.sigma)

    # --- likelihood (loglik, aic, bic: Likelihood) ----------------------------------------------
    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def n_params(self) -> int:
        return self.design.p + 2

    # --- fixed effects ----------------------------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self._pieces["solution"][: self.design.p], index=list(self.design.fixed_names), name="fixef")

    @property
    def vcov(self) -> pd.DataFrame:
        names = list(self.design.fixed_names)
        return pd.DataFrame(self.sigma**2 * self._pieces["beta_block"], index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=list(self.design.fixed_names), name="se")

    # --- breeding values ------------------------------------------------------------------------
    @cached_property
    def ranef(self) -> pd.DataFrame:
        """The BLUPs (breeding values) of every level of A, with their conditional sds (prediction error sds,
        sigma * sqrt((C^-1)_ii); NaN above :data:`PEV_MAX_LEVELS` levels) and whether the level has records."""
        eq, term = self._equations, self.design.terms[0]
        values = self._pieces["solution"][eq.p:]
        condsd = np.full(eq.q, np.nan)
        if eq.q <= PEV_MAX_LEVELS:
            # (C^-1)_bb = K^-1 + K^-1 Z'WX S^-1 X'WZ K^-1: diag(K^-1) column block by column block
            solve, k_zx = self._pieces["solve"], self._pieces["k_zx"]
            variance = np.einsum("ij,jk,ik->i", k_zx, self._pieces["beta_block"], k_zx)
            for start in range(0, eq.q, PEV_CHUNK):
                columns = np.arange(start, min(start + PEV_CHUNK, eq.q))
                unit = np.zeros((eq.q, columns.size))
                unit[columns, np.arange(columns.size)] = 1.0
                variance[columns] += solve(unit)[columns, np.arange(columns.size)]
            condsd = self.sigma * np.sqrt(np.maximum(variance, 0.0))
        else:
            warnings.warn(f"conditional sds of the {eq.q} levels of {term.group!r} are not computed (above "
                          f"{PEV_MAX_LEVELS} levels); the BLUPs are", HierpoolWarning, stacklevel=2)
        return pd.DataFrame({"grpvar": term.group, "term": "(Intercept)", "grp": self.relationship.labels,
                             "condval": values, "condsd": condsd, "recorded": self.recorded})

    # --- heritability -------------------------------------------------------------------------------
    def heritability(self, level: float = 0.95) -> pd.DataFrame:
        """h^2 = sigma_A^2 / (sigma_A^2 + sigma^2) (the intra-class correlation of the term), with its
        profile-likelihood interval: h^2 = theta^2 / (1 + theta^2) is monotone in theta, so the interval is the
        theta where the profiled criterion is within the chi-square(1) quantile of its minimum (exact for the
        profile likelihood, no delta method)."""
        if not 0 < level < 1:
            raise ArgumentError(f"level must be in (0, 1), got {level!r}")
        cut = self.objective + stats.chi2.ppf(level, 1)
        log_theta = float(np.log(self.theta[0]))

        def excess(t):
            return self._equations.evaluate(float(np.exp(t)), self.reml)[0] - cut

        low, high = LOG_THETA_BOUNDS
        lower = low if excess(low) <= 0 else scipy.optimize.brentq(excess, low, log_theta, xtol=1e-8)
        upper = high if excess(high) <= 0 else scipy.optimize.brentq(excess, log_theta, high, xtol=1e-8)

        def h2(t):
            return float(np.exp(2 * t) / (1 + np.exp(2 * t)))

        return pd.DataFrame({"estimate": [h2(log_theta)], "lower": [0.0 if lower == low else h2(lower)],
                             "upper": [1.0 if upper == high else h2(upper)], "level": [level]},
                            index=pd.Index([self.design.terms[0].group], name="term"))

    def summary(self) -> str:
        """A text summary: criterion, variance components with h^2, fixed effects."""
        h2 = self.heritability()
        method = "REML" if self.reml else "maximum likelihood"
        lines = [f"Linear mixed model with a relationship matrix fit by {method}",
                 f"Formula: {self.design.spec.formula}",
                 f"{'REML criterion' if self.reml else 'Deviance'}: {self.objective:.4f}   logLik: {self.loglik:.4f}"
                 f"   AIC: {self.aic:.2f}   BIC: {self.bic:.2f}",
                 "", "Random effects:", self.varcorr.to_string(index=False),
                 f"Heritability h^2 = {h2.estimate.iloc[0]:.4f}, {h2.level.iloc[0]:.0%} profile interval "
                 f"[{h2.lower.iloc[0]:.4f}, {h2.upper.iloc[0]:.4f}]",
                 f"Number of obs: {self.nobs}; levels of A: {len(self.relationship.labels)} "
                 f"({int(self.recorded.sum())} with records)",
                 "", "Fixed effects:",
                 pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.fixef_se}).to_string()]
        return "\n".join(lines)
