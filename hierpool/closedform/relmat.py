"""The animal model: a linear mixed model in which one random-effect term has a known relationship matrix A.

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
breaks.  The terms are scalar: intercepts (1 | g) or scalar slopes (0 + x | g), whose Z column holds x.  Other such
terms may stand beside the relationship term (a permanent environment: the repeatability model), each with an
identity block I / theta_j^2 in P(theta) (and q log theta^2 becomes
sum_j q_j log theta_j^2); theta is then found by L-BFGS-B.
Not yet: correlated (vector) terms, a family.  The Bayesian engine's ``relmat=`` (:mod:`hierpool.bayesian.relmat`)
factors the same K(theta) (:meth:`RelmatEquations.factor`, whose :class:`KFactor` also draws from N(0, K^-1)).

References: Henderson, C. R. (1976), Biometrics 32, 69-83; Meyer, K. (1989), Genet. Sel. Evol. 21, 317-340
(REML by the mixed-model equations); Bates, Maechler, Bolker & Walker (2015), J. Stat. Softw. 67(1);
Vazquez et al. (2010), pedigreemm, J. Dairy Sci. 93.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.optimize
import scipy.sparse
import scipy.sparse.linalg
from scipy import stats

from ..algebra.conditioning import condition_fixed, fixed_rows, fixed_to_user
from ..algebra.criterion import profiled_criterion
from ..algebra.linalg import inverse_diagonal, inverse_diagonal_at, solved_row_quadratic_forms
from ..algebra.varcorr import varcorr_table
from ..errors import ArgumentError, ConvergenceWarning, DataError, HierpoolWarning
from ..spec.arguments import probability_argument
from ..spec.design import Design
from ..spec.newdata import model_rows, new_row_weights, row_labels
from ..spec.relationship import Relationship, with_relationship_levels
from .predict import check_interval, check_re, interval_table
from .results import Likelihood, group_coefficients

#: log theta is searched in this interval (theta from 1e-4 to 1e4).
LOG_THETA_BOUNDS = (np.log(1e-4), np.log(1e4))
#: Brent's tolerance on log theta (relative; theta and sigma_A^2 to about 1e-7).
LOG_THETA_TOL = 1e-7
#: log theta within this of a bound (a factor 10) is a boundary fit: the criterion is flat there, and the search
#: stops wherever it lands (:func:`boundary_messages`, :func:`singular_theta`).
BOUNDARY_BAND = float(np.log(10.0))
#: A profiled criterion that changes by less than this over the whole theta interval is flat: not identifiable.
FLAT_PROFILE = 1e-3
#: share()'s profiles also start each other term at theta = at least this (see there).
PROFILE_LIFT = 0.3
#: Prediction error variances (condsd) are computed up to this many levels of A.
PEV_MAX_LEVELS = 5_000


@dataclass(frozen=True)
class KFactor:
    """K(theta) = Z'WZ + P(theta) factored (:meth:`RelmatEquations.factor`).

    Attributes
    ----------
    solve : callable
        v (q,) or (q, m) -> K^-1 v.
    log_det : float
        log|K|.
    draw : callable
        z (q,) or (q, m) standard normal -> draws from N(0, K^-1), one per column: the Gaussian part of the
        Bayesian engine's exact effect draws (Rue 2001), from the same factor.
    """

    solve: Callable
    log_det: float
    draw: Callable


def factor_spd(matrix: scipy.sparse.csc_matrix, order: tuple | None = None) -> tuple[KFactor | None, object]:
    """A sparse symmetric positive definite matrix K factored by SuperLU without pivoting (a symmetric elimination's
    pivots), as a :class:`KFactor` (None where K is not positive definite), with SuperLU's factor itself.

    ``order``: (ordering, its inverse) of a matrix already permuted by it (its pattern's minimum-degree ordering,
    found once); None: SuperLU finds one (``MMD_AT_PLUS_A``) and applies it itself.
    """
    options = dict(diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
    try:
        lu = scipy.sparse.linalg.splu(matrix, permc_spec="MMD_AT_PLUS_A" if order is None else "NATURAL", **options)
    except RuntimeError:  # SuperLU's "Factor is exactly singular": not positive definite
        return None, None
    pivots = lu.U.diagonal()
    if not (np.array_equal(lu.perm_r, lu.perm_c) and np.all(pivots > 0)):  # rows swapped: a zero pivot
        return None, None
    permutation, back = (None, None) if order is None else order

    def solve(v):
        if permutation is None:
            return lu.solve(np.ascontiguousarray(v))
        return lu.solve(np.ascontiguousarray(v[permutation]))[back]

    def draw(z):
        # with no pivoting, Pr K Pr' = L U = L D L' (U = D L'), so x = Pr' U^-1 D^(1/2) z ~ N(0, K^-1); SuperLU's
        # solve is Pr' U^-1 L^-1 Pr, hence x = lu.solve(Pr' L D^(1/2) z), Pr' v = v[perm_r] (SciPy's convention)
        scaled = np.sqrt(pivots).reshape((-1,) + (1,) * (np.ndim(z) - 1)) * z
        x = lu.solve(np.ascontiguousarray((lu.L @ scaled)[lu.perm_r]))
        return x if permutation is None else x[back]

    return KFactor(solve=solve, log_det=float(np.sum(np.log(pivots))), draw=draw), lu


class RelmatEquations:
    """The theta-free blocks of the mixed-model equations, and K(theta) = Z'WZ + P(theta) factored.

    Z = [Z_1 ... Z_T] holds one column block per random-effect term (the relationship term's columns are A's
    labels, the others' their levels), and P(theta) = blockdiag(A^-1 / theta_1^2, I / theta_2^2, ...).  X's
    block is eliminated by its Schur complement S = X'WX - X'WZ K^-1 Z'WX (p x p): SuperLU then factors K alone,
    whose pattern is the same at every theta, so its fill-reducing ordering (minimum degree on K + K') is found
    once and reused (the ordering is most of a factorization's cost); X's columns, each touching every animal
    with records, would be dense rows in that ordering.  |C| = |K| |S| and (C^-1)_beta beta = S^-1.
    """

    def __init__(self, *, XtX, ZtX, ZtWZ, Xty, Zty, yty, penalty, block, sizes, n, log_det_a, log_det_w,
                 conditioning=None):
        self.XtX, self.ZtX, self.ZtWZ, self.Xty, self.Zty, self.yty = XtX, ZtX, ZtWZ, Xty, Zty, yty
        self.penalty, self.block, self.sizes = penalty, block, np.asarray(sizes)  # block: each column's term
        self.n, self.p, self.q = n, XtX.shape[0], ZtWZ.shape[0]
        self.log_det_a, self.log_det_w = log_det_a, log_det_w
        self._order = self._back = None  # K's fill-reducing ordering (and its inverse), from the first factorization
        self._patterns = {}  # K's pattern in each ordering (:meth:`_k`)
        # X's conditioning where the equations are of X A (:func:`fit_relmat`): the criterion evaluated is then the
        # user's (REML's, on X A, less 2 log |det A|) and beta, beta_block are of beta~ (RelmatResult maps them)
        self.conditioning = conditioning

    def _k(self, theta, order=None) -> scipy.sparse.csc_matrix:
        # K's entries on the union of Z'WZ's and P's patterns, found once per ordering: each theta refills the values
        key = "natural" if order is None else "ordered"
        if key not in self._patterns:
            ZtWZ, penalty, block = (self.ZtWZ, self.penalty, self.block) if order is None else self._permuted
            parts = [scipy.sparse.csc_matrix(m, copy=True) for m in (ZtWZ, penalty)]
            for part in parts:
                part.sum_duplicates()  # sorted indices, no duplicate entries
            ones = [scipy.sparse.csc_matrix((np.ones(m.nnz), m.indices, m.indptr), shape=m.shape) for m in parts]
            union = scipy.sparse.csc_matrix(ones[0] + ones[1])  # positive entries: no cancellation drops one
            union.sort_indices()
            keys = np.repeat(np.arange(self.q, dtype=np.int64), np.diff(union.indptr)) * self.q + union.indices
            values = []
            for part in parts:  # each matrix's values on the union's entries (zero where it has none)
                part_keys = np.repeat(np.arange(self.q, dtype=np.int64), np.diff(part.indptr)) * self.q + part.indices
                on_union = np.zeros(union.nnz)
                on_union[np.searchsorted(keys, part_keys)] = part.data
                values.append(on_union)
            self._patterns[key] = (values[0], values[1], block[union.indices], union.indices, union.indptr)
        data, penalty, entry_block, indices, indptr = self._patterns[key]
        values = data + penalty / np.asarray(theta, dtype=float)[entry_block] ** 2
        return scipy.sparse.csc_matrix((values, indices, indptr), shape=(self.q, self.q))

    def factor(self, theta) -> KFactor | None:
        """K(theta) factored (:class:`KFactor`), or None where K is not positive definite."""
        if self._order is None:  # the first factorization finds the ordering, and serves this theta too
            factored, lu = factor_spd(self._k(theta))
            if lu is not None:
                order = self._order = np.argsort(lu.perm_c)  # the symmetric ordering SuperLU chose, as indices
                self._back = np.argsort(order)
                self._permuted = (scipy.sparse.csc_matrix(self.ZtWZ[order][:, order]),
                                  scipy.sparse.csc_matrix(self.penalty[order][:, order]), self.block[order])
            return factored
        return factor_spd(self._k(theta, self._order), (self._order, self._back))[0]

    def evaluate(self, theta, reml: bool) -> tuple[float, dict]:
        """The criterion at theta (one per term), and the pieces of the fit there."""
        theta = np.atleast_1d(np.asarray(theta, dtype=float))
        factored = self.factor(theta)
        if factored is None:
            return np.inf, {}
        solve, log_det_k = factored.solve, factored.log_det
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
        # lme4's log|L_Z|^2 = log|Lambda'Z'WZ Lambda + I| with Lambda = blockdiag(theta_j L_j), A = L_A L_A'
        log_det_lz = log_det_k + float(self.sizes @ np.log(theta**2)) + self.log_det_a
        value = profiled_criterion(log_det_lz, log_det_s, pwrss, self.n, self.p, self.log_det_w, reml,
                                   sigma_known=False)
        if self.conditioning is not None:
            value = self.conditioning.objective_to_user(value, reml)
        return float(value), dict(solve=solve, k_zx=k_zx, solution=np.concatenate([beta, b]), pwrss=pwrss,
                                  beta_block=beta_block)


def relationship_positions(term, rel: Relationship, strict: bool = True) -> np.ndarray:
    """Each of the relationship term's levels in the data, as a position among A's labels (the design's levels
    and A's labels are strings); a level that is not among them is refused, by name (``strict``), or -1."""
    position = pd.Index(rel.labels).get_indexer([str(level) for level in term.levels])
    if strict and np.any(position < 0):
        missing = [str(level) for level, at in zip(term.levels, position) if at < 0]
        raise DataError(f"{len(missing)} level(s) of {term.group!r} in the data are not labels of its "
                        f"relationship matrix: {missing[:5]}")
    return position


def relmat_equations(design: Design, rel: Relationship, conditioning=None):
    """(:class:`RelmatEquations` of the design, each term's column labels, which of A's labels have records);
    ``conditioning`` (:func:`~hierpool.algebra.conditioning.condition_fixed`'s, of ``design``): the equations of its
    X A, their criterion and beta mapped back (:attr:`RelmatEquations.conditioning`)."""
    if conditioning is not None:
        design = conditioning.design
    n, p = design.n, design.p
    w = np.ones(n) if design.weights is None else np.asarray(design.weights, dtype=float)
    y = np.asarray(design.y, dtype=float) - np.asarray(design.offset, dtype=float)
    X = np.asarray(design.X, dtype=float)
    columns, penalties, labels, sizes, start = [], [], [], [], 0
    recorded = None
    for term in design.terms:
        if term.group == rel.group:
            position = relationship_positions(term, rel)
            size, penalty, names = len(rel.labels), rel.inverse, rel.labels
            recorded = np.isin(np.arange(size), position)
        else:
            position = np.arange(term.n_levels)
            size, penalty, names = term.n_levels, scipy.sparse.identity(term.n_levels), np.asarray(term.levels)
        columns.append(start + position[term.index])
        penalties.append(penalty)
        labels.append(names)
        sizes.append(size)
        start += size
    q = start
    rows = np.repeat(np.arange(n), len(columns))
    # each row's value of each scalar term (1 for an intercept, x for (0 + x | g)) in the column of its level
    values = np.stack([np.asarray(term.z[:, 0], dtype=float) for term in design.terms], axis=1).ravel()
    Z = scipy.sparse.csr_matrix((values, (rows, np.stack(columns, axis=1).ravel())), shape=(n, q))
    ZtW = scipy.sparse.csr_matrix(Z.T.multiply(w[None, :]))
    block = np.repeat(np.arange(len(sizes)), sizes)
    equations = RelmatEquations(XtX=X.T @ (w[:, None] * X), ZtX=np.asarray(ZtW @ X) if p else np.zeros((q, 0)),
                           ZtWZ=scipy.sparse.csc_matrix(ZtW @ Z), Xty=X.T @ (w * y), Zty=np.asarray(ZtW @ y).ravel(),
                           yty=float(y @ (w * y)), penalty=scipy.sparse.block_diag(penalties, format="csc"),
                           block=block, sizes=sizes, n=n, log_det_a=rel.log_det, log_det_w=float(np.sum(np.log(w))),
                           conditioning=conditioning)
    return equations, labels, recorded


def check_design(design: Design, rel: Relationship) -> None:
    """One scalar random-effect term of ``rel.group`` (``(1 | g)``, or a scalar slope ``(0 + x | g)``), every other
    term scalar too; no known residual sds, no family."""
    if design.family is not None:
        raise ArgumentError("relmat= is not yet available with a family (a GLMM): a Gaussian response only")
    if design.sigma_known:
        raise ArgumentError("relmat= cannot be combined with se= (known residual sds)")
    labels = [term.label for term in design.terms]
    related = [term for term in design.terms if term.group == rel.group]
    vectors = [term.label for term in design.terms if term.k != 1]
    if len(related) != 1 or vectors:
        raise ArgumentError(
            f"relmat= for {rel.group!r} needs one scalar random-effect term of {rel.group!r} ((1 | {rel.group}) or "
            f"(0 + x | {rel.group})) and other scalar terms only ((1 | g): a permanent environment, say); got "
            f"{', '.join(labels) or 'none'}.  Correlated (vector) terms, with a relationship matrix or beside it, are "
            f"not supported yet")


def _minimize(equations: RelmatEquations, reml: bool, terms: int, group: str):
    """log theta at the criterion's minimum, and the number of criterion evaluations.

    One term: Brent's method from a bracket, and both ends of the interval checked (a boundary optimum that the
    descent missed; a flat profile).  Several: L-BFGS-B on log theta within the bounds, from theta = 1, with
    central-difference gradients."""
    count = [0]

    def criterion(log_theta):
        count[0] += 1
        return equations.evaluate(np.exp(np.asarray(log_theta, dtype=float)), reml)[0]

    if terms > 1:
        found = scipy.optimize.minimize(criterion, np.zeros(terms), method="L-BFGS-B", jac="3-point",
                                        bounds=[LOG_THETA_BOUNDS] * terms,
                                        options=dict(ftol=1e-15, gtol=1e-8, maxiter=500))
        return np.asarray(found.x, dtype=float), count[0], bool(found.success)

    def objective(log_theta: float) -> float:
        # outside the bounds, the bound's value plus a quadratic wall: Brent's bracketing stays finite
        clipped = float(np.clip(log_theta, *LOG_THETA_BOUNDS))
        return criterion([clipped]) + (log_theta - clipped) ** 2

    # Brent's method from a bracket at h^2 = 0.12 and 0.5: ~15 factorizations, where the bounded variant's golden
    # sections over the whole interval took ~45
    found = scipy.optimize.minimize_scalar(objective, bracket=(np.log(0.37), 0.0), method="brent",
                                           options=dict(xtol=LOG_THETA_TOL, maxiter=200))
    log_theta = float(np.clip(found.x, *LOG_THETA_BOUNDS))
    value = criterion([log_theta])
    ends = [criterion([bound]) for bound in LOG_THETA_BOUNDS]
    problem = flat_profile(value, ends, group)
    if problem:
        raise DataError(problem)
    return np.array([at_bound(log_theta, value, ends)]), count[0], bool(found.success)


def flat_profile(value: float, ends, group: str) -> str:
    """Why one term's profile cannot be fitted ("" when it can): the criterion at its minimum ``value`` within
    :data:`FLAT_PROFILE` of both ``ends`` (at :data:`LOG_THETA_BOUNDS`).  Unrelated animals with one record each
    (A = I and Z = I) make the model a sum of two variances: flat."""
    if not np.isfinite(value) or max(ends) - value >= FLAT_PROFILE:  # (not finite: the caller's error)
        return ""
    return (f"the data cannot tell the variance of {group!r} from the residual variance: the profiled criterion "
            f"changes by less than {FLAT_PROFILE} over theta from 1e-4 to 1e4 (are the animals with records "
            f"related?  With one record each and no relatives among them the two variances are not identifiable)")


def at_bound(log_theta: float, value: float, ends) -> float:
    """One term's log theta, or the bound whose criterion (``ends``) is lower than the descent's ``value`` (a
    boundary optimum that the descent missed)."""
    best = int(np.argmin(ends))
    return LOG_THETA_BOUNDS[best] if ends[best] < value - 1e-9 else log_theta


def boundary_messages(terms, log_theta: np.ndarray) -> list[str]:
    """The warnings of a fit whose log theta lies within a factor 10 of a bound (the criterion is flat there, and
    the search stops wherever it lands): a term's variance (near) zero, or the residual's against a term's."""
    out = [f"boundary (singular) fit: the variance of {term.group!r} is (near) zero (theta below 1e-3)"
           for term, value in zip(terms, log_theta) if value <= LOG_THETA_BOUNDS[0] + BOUNDARY_BAND]
    if np.any(log_theta >= LOG_THETA_BOUNDS[1] - BOUNDARY_BAND):
        out.append("boundary fit: the residual variance is (near) zero against a random effect's (theta above 1e3)")
    return out


def fit_relmat(design: Design, rel: Relationship, reml: bool = True) -> RelmatResult:
    """REML or ML fit of the animal model of the module docstring (with other intercept terms beside it)."""
    check_design(design, rel)
    if design.n <= design.p:
        raise DataError(f"{design.n} rows for {design.p} fixed effects: nothing is left to estimate the variances")
    # X's columns far from centred or unit scale (sleepstudy's Days + 1e7: 9.7 off the criterion; x + 3e6: 0.058): the
    # equations of X A (algebra.conditioning), the user's criterion and beta mapped back
    conditioning = condition_fixed(design)
    equations, labels, recorded = relmat_equations(design, rel, conditioning)
    log_theta, evaluations, converged = _minimize(equations, reml, len(design.terms), rel.group)
    value, pieces = equations.evaluate(np.exp(log_theta), reml)
    if not np.isfinite(value):
        raise DataError("the animal model's equations are not positive definite at the optimum: check the "
                        "relationship matrix and the fixed effects (do they fit the response exactly?)")
    for message in boundary_messages(design.terms, log_theta):
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return RelmatResult(design=design, relationship=rel, equations=equations, reml=reml, log_theta=log_theta,
                        objective=value, pieces=pieces, labels=labels, recorded=recorded, converged=converged,
                        evaluations=evaluations)


def pev_not_computed(q: int) -> str:
    """The warning of a fit whose q random effects are too many for their prediction error variances."""
    return f"conditional sds of the {q} random effects are not computed (above {PEV_MAX_LEVELS}); the BLUPs are"


def singular_theta(log_theta: np.ndarray) -> bool:
    """Some term's theta within a factor 10 of the lower bound (:func:`boundary_messages`'s first case)."""
    return bool(np.any(np.asarray(log_theta) <= LOG_THETA_BOUNDS[0] + BOUNDARY_BAND))


class RelmatResult(Likelihood):
    """A fitted animal model (:func:`fit_relmat`): lme4's accessors (``fixef``, ``fixef_se``, ``vcov``, ``varcorr``,
    ``sigma``, ``theta``, ``objective``, ``loglik``, ``aic``, ``bic``, ``ranef``, ``coef``, ``fitted``,
    ``residuals``, ``predict``), breeding values for every level of A (``ranef``; ``predict`` for animals with or
    without records), ``heritability()`` and ``variance_shares()``."""

    def __init__(self, *, design, relationship, equations, reml, log_theta, objective, pieces, labels, recorded,
                 converged, evaluations):
        self.design, self.relationship, self._equations = design, relationship, equations
        self.reml, self.objective, self._pieces = reml, objective, pieces
        self.theta = np.exp(np.asarray(log_theta, dtype=float))
        self._labels, self.recorded = labels, recorded
        self.converged, self.evaluations = converged, evaluations
        self._related = next(j for j, term in enumerate(design.terms) if term.group == relationship.group)

    @property
    def is_singular(self) -> bool:
        """A boundary fit: some theta within a factor 10 of its lower bound (:func:`singular_theta`)."""
        return singular_theta(np.log(self.theta))

    @property
    def blups(self) -> list[np.ndarray]:
        """Each term's BLUPs in ``design.terms``' order (the relationship term's over every level of A), without
        :attr:`ranef`'s prediction error variances."""
        values = self._pieces["solution"][self._equations.p:]
        return np.split(values, np.cumsum([len(labels) for labels in self._labels])[:-1])

    # --- variance components ------------------------------------------------------------
    @property
    def sigma(self) -> float:
        dof = self.design.n - self.design.p if self.reml else self.design.n
        return float(np.sqrt(self._pieces["pwrss"] / dof))

    @property
    def sigma_a(self) -> float:
        """sd of the relationship term's effects (sigma_A, the additive genetic sd for a pedigree)."""
        return float(self.theta[self._related] * self.sigma)

    @property
    def varcorr(self) -> pd.DataFrame:
        """lme4's ``as.data.frame(VarCorr(fit))``: each term's variance (sigma_A^2 for the relationship term),
        then the residual's."""
        return varcorr_table([(term.group, term.coef_names, cov)
                              for term, cov in zip(self.design.terms, self.term_covariances())], self.sigma)

    def term_covariances(self) -> list[np.ndarray]:
        """Each term's 1 x 1 covariance (theta_j sigma)^2, in ``design.terms``' order (``LMMResult``'s accessor):
        the relationship term's is sigma_A^2, its effects' covariance sigma_A^2 A."""
        return [np.array([[(t * self.sigma) ** 2]]) for t in self.theta]

    def variance_shares(self) -> pd.Series:
        """Each variance's share of the total (random effects' and the residual's): the relationship term's is
        h^2; with a permanent-environment term beside it, the two together are the repeatability."""
        variances = np.append(self.theta**2, 1.0) * self.sigma**2
        return pd.Series(variances / variances.sum(), index=[t.group for t in self.design.terms] + ["Residual"],
                         name="share")

    # --- likelihood (loglik, aic, bic: Likelihood) ----------------------------------------------
    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def n_params(self) -> int:
        return self.design.p + len(self.theta) + 1

    # --- fixed effects ----------------------------------------------------------------------------
    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self._fixed_to_user()[0], index=list(self.design.fixed_names), name="fixef")

    @property
    def vcov(self) -> pd.DataFrame:
        names = list(self.design.fixed_names)
        return pd.DataFrame(self.sigma**2 * self._fixed_to_user()[1], index=names, columns=names)

    def _fixed_to_user(self) -> tuple[np.ndarray, np.ndarray]:
        """(beta, S^-1) on the user's columns: the equations' own, or mapped from X A's
        (:func:`~hierpool.algebra.conditioning.fixed_to_user`)."""
        beta, block = self._pieces["solution"][: self.design.p], self._pieces["beta_block"]
        conditioning = self._equations.conditioning
        return (beta, block) if conditioning is None else fixed_to_user(conditioning.fixed, beta, block)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=list(self.design.fixed_names), name="se")

    # --- breeding values ------------------------------------------------------------------------
    @cached_property
    def ranef(self) -> pd.DataFrame:
        """The BLUPs of every term's levels: the relationship term's for every level of A (its breeding values,
        with ``recorded``: whether the level has records), with their conditional sds (prediction error sds,
        sigma * sqrt((C^-1)_ii); NaN above :data:`PEV_MAX_LEVELS` columns in all)."""
        eq = self._equations
        values = self._pieces["solution"][eq.p:]
        condsd = np.full(eq.q, np.nan)
        if eq.q <= PEV_MAX_LEVELS:
            # (C^-1)_bb = K^-1 + K^-1 Z'WX S^-1 X'WZ K^-1: diag(K^-1) column block by column block
            solve, k_zx = self._pieces["solve"], self._pieces["k_zx"]
            variance = np.einsum("ij,jk,ik->i", k_zx, self._pieces["beta_block"], k_zx)
            variance += inverse_diagonal(solve, eq.q)
            condsd = self.sigma * np.sqrt(np.maximum(variance, 0.0))
        else:
            warnings.warn(pev_not_computed(eq.q), HierpoolWarning, stacklevel=2)
        frames, start = [], 0
        for j, (term, labels) in enumerate(zip(self.design.terms, self._labels)):
            part = slice(start, start + len(labels))
            frames.append(pd.DataFrame({"grpvar": term.group, "term": term.coef_names[0], "grp": labels,
                                        "condval": values[part], "condsd": condsd[part],
                                        "recorded": self.recorded if j == self._related else True}))
            start += len(labels)
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def ranef_joint_sd(self) -> np.ndarray:
        """Each random effect's prediction error sd, in ``ranef``'s row order: its ``condsd``, which already counts
        the uncertainty of beta-hat (sigma^2 (C^-1)_bb of the whole equations, Henderson 1975): the posterior sd of
        b under a flat prior on beta with the variances held (:func:`hierpool.validate.blup_agreement`)."""
        return self.ranef.condsd.to_numpy()

    @property
    def coef(self) -> dict[str, pd.DataFrame]:
        """lme4's ``coef(fit)``: per grouping factor, each level's coefficients, the fixed effects plus its BLUP
        (the relationship term's over every level of A) (:func:`~hierpool.closedform.results.group_coefficients`)."""
        return group_coefficients(self.fixef, self.ranef)

    # --- fitted values and predictions -------------------------------------------------------------
    def _rows(self, newdata):
        """(X, [(z_j, level_j)], offset) of the rows to predict, level_j among the BLUPs of term j (the relationship
        term's: every level of A, recorded or not; -1 for a level of neither)."""
        return model_rows(self._every_level, newdata)

    @cached_property
    def _every_level(self) -> Design:
        """The design with the relationship term's levels every level of A (the Bayesian engine's, for its effects
        and predictions: :func:`~hierpool.spec.relationship.with_relationship_levels`)."""
        return with_relationship_levels(self.design, self.relationship)

    def _effects(self, terms, known) -> np.ndarray:
        """sum_j z_j b_j[level_j] over the terms whose level is known, per row."""
        total = np.zeros(len(terms[0][0]) if terms else 0)
        for (z, level), values, ok in zip(terms, self.blups, known):
            total += np.where(ok, z[:, 0] * values[np.maximum(level, 0)], 0.0)
        return total

    @property
    def fitted(self) -> np.ndarray:
        """offset + X beta + Z b for the rows used in fitting (lme4's ``fitted``; b the BLUPs)."""
        X, terms, offset = self._rows(None)
        return offset + X @ self.fixef.to_numpy() + self._effects(terms, [lvl >= 0 for _, lvl in terms])

    @property
    def residuals(self) -> np.ndarray:
        return self.design.y - self.fitted

    def predict(self, newdata: pd.DataFrame | None = None, re: bool = True, interval: str | None = None,
                level: float = 0.95):
        """Predictions offset + x beta-hat + sum_j z_j b-hat_j, with confidence or prediction intervals.

        As :meth:`hierpool.closedform.results.LMMResult.predict`: a row's level of the relationship term may be any
        level of A, an animal without records included (its BLUP, from its relatives'); a level of no term's
        (an animal outside A: unrelated, not inbred) takes b = 0 and the term's variance sigma_j^2; ``re=False``
        predicts x beta-hat.  The error variance of a prediction with the known levels' effects g (z_j at each
        one's column) is, from Henderson's C^-1 (module docstring) with K = Z'WZ + P(theta) and S = X'V0^-1 X,

            sigma^2 v' C^-1 v = sigma^2 [d' S^-1 d + g' K^-1 g],   d = x - (K^-1 Z'WX)' g,

        to which ``interval="prediction"`` adds, for the terms whose level is not known, sigma_j^2 z_j^2 a_jj
        (a_jj = A's diagonal for a level of A: 1 + its inbreeding), and the noise sigma^2 / w.  Normal quantiles,
        theta and sigma taken as known (lme4's ``predict``, ``merTools::predictInterval``).
        """
        check_interval(interval)
        check_re(re)
        probability_argument("level", level)
        X, terms, offset = self._rows(newdata)
        known = [(lvl >= 0) & bool(re) for _, lvl in terms]
        fit = offset + X @ self.fixef.to_numpy() + self._effects(terms, known)
        if interval is None:
            return fit
        variance = self.sigma**2 * self._error_quadratic(X, terms, known)
        for j, ((z, lvl), ok) in enumerate(zip(terms, known)):
            if re or interval == "prediction":  # a level whose effect is not known: its whole distribution
                a_jj = self._relationship_diagonal(lvl) if j == self._related else np.ones(len(lvl))
                variance += np.where(ok, 0.0, (self.theta[j] * self.sigma * z[:, 0]) ** 2 * a_jj)
        if interval == "prediction":
            weights = new_row_weights(self.design, newdata)
            variance += self.sigma**2 / (1.0 if weights is None else weights)
        return interval_table(fit, variance, level, row_labels(self.design, newdata))

    def _error_quadratic(self, X: np.ndarray, terms, known) -> np.ndarray:
        """v' C^-1 v per row (:meth:`predict`), in the equations' coordinates (X A where X was conditioned)."""
        eq, pieces = self._equations, self._pieces
        fixed = X if eq.conditioning is None else fixed_rows(X, eq.conditioning.fixed)
        starts = np.concatenate([[0], np.cumsum(eq.sizes)[:-1]])
        columns = [np.where(ok, start + np.maximum(lvl, 0), -1) for (_, lvl), ok, start in zip(terms, known, starts)]
        values = [np.where(ok, z[:, 0], 0.0) for (z, _), ok in zip(terms, known)]
        d = fixed.copy()
        for column, value in zip(columns, values):
            d -= value[:, None] * pieces["k_zx"][np.maximum(column, 0)]
        return np.einsum("na,ab,nb->n", d, pieces["beta_block"], d) + solved_row_quadratic_forms(
            pieces["solve"], eq.q, len(d), [np.maximum(c, 0)[:, None] for c in columns], [v[:, None] for v in values])

    def _relationship_diagonal(self, positions: np.ndarray) -> np.ndarray:
        """A_ll at each of ``positions`` among A's labels (1 at -1: an animal outside A, unrelated and not inbred),
        from A^-1 factored, one solve per distinct level."""
        out = np.ones(len(positions))
        wanted, where = np.unique(positions[positions >= 0], return_inverse=True)
        if wanted.size:
            out[positions >= 0] = inverse_diagonal_at(self._a_inverse_factor.solve, len(self.relationship.labels),
                                                      wanted)[where]
        return out

    @cached_property
    def _a_inverse_factor(self) -> KFactor:
        """A^-1 factored once per fit (:meth:`_relationship_diagonal` solves with it at each ``predict``)."""
        return factor_spd(scipy.sparse.csc_matrix(self.relationship.inverse))[0]

    # --- heritability -------------------------------------------------------------------------------
    def heritability(self, level: float = 0.95) -> pd.DataFrame:
        """h^2 = sigma_A^2 / (sum of the random effects' variances + sigma^2), with its profile-likelihood interval
        (:meth:`share`; with the relationship term alone, h^2 = theta^2 / (1 + theta^2)).  For a slope term
        (0 + x | g) sigma_A^2 is a variance per unit of x squared: the ratio is then the share at x = 1."""
        return self.share([self.relationship.group], level, name=self.relationship.group)

    def repeatability(self, level: float = 0.95) -> pd.DataFrame:
        """The share of every random effect's variance together (animal + permanent environment: the
        repeatability; with one term, h^2), with its profile-likelihood interval (:meth:`share`)."""
        return self.share([term.group for term in self.design.terms], level, name="repeatability")

    def share(self, groups, level: float = 0.95, name: str | None = None) -> pd.DataFrame:
        """s = sum_{j in groups} sigma_j^2 / (sum_j sigma_j^2 + sigma^2), with its profile-likelihood interval.

        With r_j = theta_j^2 (each variance over sigma^2), s = R_S / (1 + R_S + R_O), R_S the sum over the terms in
        ``groups``, R_O over the others.  The profile at s minimizes the criterion over the other terms' r_j and
        over how R_S = s (1 + R_O) / (1 - s) splits among the terms in ``groups`` (softmax weights); the interval is
        where that profile is within the chi-square(1) quantile of the minimum: exact for the profile likelihood,
        no delta method.
        """
        probability_argument("level", level)
        names = [term.group for term in self.design.terms]
        unknown = [g for g in groups if g not in names]
        if unknown or not groups:
            raise ArgumentError(f"share: groups must be among the model's terms {names}, got {list(groups)}")
        cut = self.objective + stats.chi2.ppf(level, 1)
        r = self.theta**2
        inside = np.array([names.index(g) for g in dict.fromkeys(groups)])
        outside = np.array([j for j in range(len(r)) if j not in inside], dtype=int)
        estimate = float(r[inside].sum() / (1 + r.sum()))
        weights = np.maximum(r[inside] / max(r[inside].sum(), 1e-300), 1e-12)
        start = np.concatenate([np.log(r[outside]) / 2, np.log(weights[1:] / weights[0])])

        def profile(s):
            def criterion(free):
                theta = np.empty(len(r))
                theta[outside] = np.exp(free[: outside.size])
                logits = np.concatenate([[0.0], free[outside.size:]])
                split = np.exp(logits - logits.max())
                total = s * (1 + np.sum(theta[outside] ** 2)) / (1 - s)
                theta[inside] = np.sqrt(np.maximum(total * split / split.sum(), 1e-300))
                return self._equations.evaluate(theta, self.reml)[0]

            if not start.size:
                return criterion(np.zeros(0))
            bounds = [LOG_THETA_BOUNDS] * outside.size + [(-30.0, 30.0)] * (inside.size - 1)
            # two starts: the estimate, and the outside terms lifted off their bound (a variance estimated at 0 sits
            # where the criterion is flat in log theta, so a descent from there never leaves it)
            lifted = start.copy()
            lifted[: outside.size] = np.maximum(lifted[: outside.size], np.log(PROFILE_LIFT))
            return min(scipy.optimize.minimize(criterion, np.clip(x0, *zip(*bounds)), method="L-BFGS-B",
                                               bounds=bounds, options=dict(ftol=1e-10)).fun
                       for x0 in ((start,) if np.array_equal(lifted, start) else (start, lifted)))

        low, high = 1e-8, 1 - 1e-8
        lower = 0.0 if profile(low) <= cut else scipy.optimize.brentq(lambda h: profile(h) - cut, low, estimate,
                                                                       xtol=1e-6)
        upper = 1.0 if profile(high) <= cut else scipy.optimize.brentq(lambda h: profile(h) - cut, estimate, high,
                                                                        xtol=1e-6)
        return pd.DataFrame({"estimate": [estimate], "lower": [lower], "upper": [upper], "level": [level]},
                            index=pd.Index([name or " + ".join(groups)], name="term"))

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
                 "Variance shares: " + ", ".join(f"{k} {v:.4f}" for k, v in self.variance_shares().items()),
                 f"Number of obs: {self.nobs}; levels of A: {len(self.relationship.labels)} "
                 f"({int(self.recorded.sum())} with records)",
                 "", "Fixed effects:",
                 pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.fixef_se}).to_string()]
        return "\n".join(lines)
