"""Centring and scaling the random-effect covariates for the optimizer; results on the user's scale.

A term ``(year | g)`` with year around 2000 puts the intercept variance at year 0,
two thousand units from the data: the intercept and slope are then correlated at
nearly -1 and lme4's relative factor T has one diagonal element ~1e-5, so the
optimizer creeps along a ridge and stops early (lme4 1.1-31 ends at REML 1113.31
on a model whose optimum is 1024.47, and warns of a singular fit).

The model does not depend on how z is parameterized: for any invertible M_j,
z b = (z M_j)(M_j^-1 b), and an unstructured k x k covariance of b is one of
M_j^-1 b.  So the optimizer works on z~ = z M_j, each non-intercept column
centred (when the term has an intercept) and scaled to unit sd, and its optimum
T~_j is mapped back: T_j is the lower-triangular factor of (M_j T~_j)(M_j T~_j)^T,
which gives the same criterion.  The mixed-model equations are solved on the
conditioned columns too (forming Lambda^T Z^T Z Lambda from z = [1, year] at such a
T cancels ~7 digits), and the solution is mapped back (:meth:`Conditioning.solution_to_user`):
b = M b~, Var(b | y) = M Var(b~ | y) M^T; beta, sigma and the criterion are
unchanged.  A scalar term is only scaled.

The fixed-effect columns, where they are far from centred or unit scale by the same rule
(:func:`fixed_transform`), are conditioned alike, then orthogonalised (:func:`fixed_conditioning`,
:func:`orthogonalised`): X~ = X A, so X beta = X~ beta~ with beta = A beta~ and
Cov(beta) = A Cov(beta~) A^T (:func:`fixed_to_user`).  ML's criterion is unchanged; REML's
log |X' V^-1 X| gains 2 log |det A| (:func:`fixed_logdet`), mapped back.  A column of
timestamps (~1.7e9 s, sd ~1e5 s) or a shifted covariate loses most of float64's digits in
X' V^-1 X otherwise: its Cholesky factor fails (x = Days + 1e7 on sleepstudy), or the search ends
off the optimum, below it by rounding; its interaction with a factor, or the covariate beside a
factor coded without an intercept, stays nearly collinear with the factor's columns after the
centring alone (SEs 0.3-9% off, reported converged), hence the orthogonalisation.

The blocks of the inverse mixed-model matrix that prediction intervals read are formed on the
conditioned system too, and a row's coefficients enter them on the conditioned columns:
z M_j T~_j for a term, x A for beta (:attr:`hierpool.closedform.results.LMMResult.conditioned`),
so x' Cov(beta) x at x ~ 1e7 is not formed from the user's huge, cancelling entries.
Well-conditioned models (the usual case) are left alone, so their numbers and cost do not change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from ..errors import HierpoolWarning
from ..spec.design import Design
from .henderson import Solution
from .linalg import distinct_block_columns, segment_sum, theta_to_factors, tril_positions

#: Condition a term when a non-intercept column's |mean| exceeds this many sds (with an intercept in the term)...
CENTRE_RATIO = 10.0
#: ...or a column's root mean square lies outside [1 / SCALE_RATIO, SCALE_RATIO].
SCALE_RATIO = 1e3


def column_moments(z: np.ndarray, group: np.ndarray, n_groups: int):
    """Per group of rows: (whether each column is constant and nonzero there, its mean, its sd, its root mean
    square), each (n_groups, k), and each group's first row's values (n_groups, k); the sd from deviations about
    the group's mean (as ``np.std``, no cancellation for a column of large mean).

    The columns are summed as the rows of z^T, each one contiguous reduction (timed against the (N, 3k) stack of
    the three quantities in benchmarks/RESULTS.md, thirty-fourth session)."""
    count = np.maximum(np.bincount(group, minlength=n_groups), 1)[:, None]
    first = np.zeros(n_groups, dtype=np.int64)
    first[group[::-1]] = np.arange(len(group))[::-1]  # each group's first row
    columns = np.ascontiguousarray(z.T)  # (k, N)

    def sums(values):  # (k, N) -> (n_groups, k)
        return segment_sum(values, group, n_groups, axis=1).T

    mean = sums(columns) / count
    deviation = columns - mean.T[:, group]  # the sd about each group's own mean
    sd, rms = np.sqrt(sums(deviation * deviation) / count), np.sqrt(sums(columns * columns) / count)
    differs = sums((columns != columns[:, first[group]]).astype(float))
    constant = (differs == 0) & (z[first] != 0)
    return constant, mean, sd, rms, z[first]


def blocks_moments(blocks, group: np.ndarray, n_groups: int) -> list[tuple]:
    """:func:`column_moments` of each of ``blocks`` (each (N, k_i), a batch's terms' z and its X) over the same
    groups, each distinct column summed once (:func:`~hierpool.algebra.linalg.distinct_block_columns`: sleepstudy's
    X is its z) and a column of ones not summed at all (its moments are known: constant, mean and root mean square 1, sd 0; 0 in a
    group without rows, as :func:`column_moments` gives them)."""
    columns, positions = distinct_block_columns(*blocks)
    c = columns.shape[1]
    ones = np.array([bool(np.all(columns[:, j] == 1.0)) for j in range(c)], dtype=bool)
    filled = np.bincount(group, minlength=n_groups)[:, None] > 0
    constant, first = np.ones((n_groups, c), dtype=bool), np.ones((n_groups, c))
    mean, sd = np.where(filled, 1.0, 0.0) * np.ones((1, c)), np.zeros((n_groups, c))
    rms = mean.copy()
    summed = np.flatnonzero(~ones)
    if summed.size:
        found = column_moments(columns[:, summed], group, n_groups)
        for whole, part in zip((constant, mean, sd, rms, first), found):
            whole[:, summed] = part
    return [tuple(whole[:, at] for whole in (constant, mean, sd, rms, first)) for at in positions]


def _intercept_columns(constant: np.ndarray) -> np.ndarray:
    """Each group's intercept column: its first constant nonzero column, -1 where none (or a term of one column)."""
    has = constant.any(axis=1) & (constant.shape[1] > 1)
    return np.where(has, np.argmax(constant, axis=1), -1)


def term_transforms(z: np.ndarray, group: np.ndarray, n_groups: int, moments=None) -> np.ndarray:
    """M (n_groups, k, k) per group of rows of one term's columns ``z`` (``group`` each row's, as
    ``hp.fit_batch``'s datasets): z M centred (when z has a constant column there) and scaled column by column;
    identity columns stay.  One group is :func:`term_transform`.  ``moments``: :func:`column_moments` of the same
    arguments, where the caller has them (``hp.fit_batch``'s conditioning: the rule first, the transforms only
    where some group needs them)."""
    constant, mean, sd, rms, first = column_moments(z, group, n_groups) if moments is None else moments
    intercept = _intercept_columns(constant)
    k = z.shape[1]
    transform = np.tile(np.eye(k), (n_groups, 1, 1))
    intercept_value = np.where(intercept >= 0, first[np.arange(n_groups), np.maximum(intercept, 0)], 1.0)
    for c in range(k):
        centred = (intercept >= 0) & (intercept != c) & (sd[:, c] > 0)
        scaled = (intercept < 0) & (rms[:, c] > 0)
        safe_sd, safe_rms = np.where(centred, sd[:, c], 1.0), np.where(scaled, rms[:, c], 1.0)
        transform[:, c, c] = np.where(centred, 1.0 / safe_sd, np.where(scaled, 1.0 / safe_rms, 1.0))
        at = np.flatnonzero(centred)
        transform[at, intercept[at], c] = -mean[at, c] / (safe_sd[at] * intercept_value[at])
    return transform


def needs_conditioning(z: np.ndarray, group: np.ndarray, n_groups: int, moments=None) -> np.ndarray:
    """Whether each group's rows of one term's columns ``z`` are far from centred or unit scale (n_groups,): a
    column's root mean square outside [1 / :data:`SCALE_RATIO`, :data:`SCALE_RATIO`], or, with an intercept
    column, another column's |mean| above :data:`CENTRE_RATIO` sds.  ``moments`` as :func:`term_transforms`'."""
    constant, mean, sd, rms, _ = column_moments(z, group, n_groups) if moments is None else moments
    intercept = _intercept_columns(constant)
    scale = np.any((rms > 0) & ((rms > SCALE_RATIO) | (rms < 1.0 / SCALE_RATIO)), axis=1)
    others = np.arange(z.shape[1])[None, :] != intercept[:, None]
    far = np.abs(mean) > CENTRE_RATIO * np.maximum(sd, np.finfo(float).tiny)
    return scale | ((intercept >= 0) & np.any(others & far, axis=1))


def term_transform(z: np.ndarray) -> np.ndarray:
    """M with z M centred (when z has a constant column) and scaled column by column; identity columns stay."""
    return term_transforms(z, np.zeros(len(z), dtype=np.int64), 1)[0]


def transformed_columns(z: np.ndarray, transform: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """z M for a transform of :func:`term_transforms`' form (its diagonal, the scales, and the intercept's row off it,
    the centring): M one (k, k), or one per group of rows (n_groups, k, k) with ``group`` each row's.

    Each column's centring is subtracted before its scaling, z M = (z R) D, D = diag(M) and R = M D^-1 (ones on its
    diagonal, -mean / intercept value in the intercept's row): x - mean, exact where x is near its mean, then scaled.
    The product z M itself rounds each row at |x| / sd: for x = 1e7 + Days, 4e-10 in a column of unit scale, noise
    that moves the column space, and a fit on it differed from the same model on Days by 3e-6 of its criterion
    (the forty-eighth session's review)."""
    scale = np.diagonal(transform, axis1=-2, axis2=-1)
    centring = transform / scale[..., None, :]
    if group is None:
        return (z @ centring) * scale
    return np.einsum("ri,rij->rj", z, centring[group]) * scale[group]


#: A fixed-effect column further than this many of its sds from zero, beside an intercept column, leaves the Bayesian
#: collapsed sampler's cross-products of X too few digits (it integrates beta out on the user's columns, its priors
#: being theirs): on sleepstudy Days + 1e7 (3.4e6 sds) moved the slope's posterior mean by 0.45 sd, 15 Monte-Carlo
#: errors, where Days + 4e6 (1.4e6 sds) gave the unshifted model's (:func:`far_fixed_columns`).
FAR_FIXED_RATIO = 1e6


def far_fixed_columns(X: np.ndarray, group: np.ndarray | None = None, n_groups: int = 1,
                      limit: float = FAR_FIXED_RATIO):
    """(per column of X, the groups of rows (a batch's datasets; one where ``group`` is None) in which it lies
    further than ``limit`` (:data:`FAR_FIXED_RATIO`) of its sds from zero while X's columns span a constant (an intercept, or a
    factor's every level, ``0 + g + x``), so that its mean is a direction the columns repeat; the largest such
    |mean| / sd; a mean of the column there), each (p,): the columns to centre before sampling."""
    p = X.shape[1]
    if not p or not len(X):
        return np.zeros(p, dtype=np.int64), np.zeros(p), np.zeros(p)
    group = np.zeros(len(X), dtype=np.int64) if group is None else group
    _, mean, sd, _, _ = column_moments(X, group, n_groups)
    ratio = np.abs(mean) / np.where(sd > 0, sd, np.inf)
    far = ratio > limit
    suspects = np.flatnonzero(far.any(axis=1))
    if suspects.size:  # rare: whether those groups' columns span a constant, by a QR of their rows
        order, bounds = group_rows(group, n_groups)
        for g in suspects:
            rows = X[order[bounds[g]:bounds[g + 1]]]
            q = np.linalg.qr(rows)[0]
            ones = np.ones(len(rows))
            far[g] &= np.linalg.norm(ones - q @ (q.T @ ones)) <= 1e-10 * np.sqrt(len(rows))  # (x ~ 1e7 alone: 1e-7)
    at = np.argmax(np.where(far, ratio, -1.0), axis=0)
    return far.sum(axis=0), np.where(far, ratio, 0.0).max(axis=0), mean[at, np.arange(p)]


#: Why a far column's digits matter, by the fit that meets it (:func:`warn_far_fixed`).
SAMPLER_REASON = ("the sampler integrates the fixed effects out on X's own columns, whose cross-products then keep too "
                  "few digits, and its posterior can be off")
# (the spatial fits: a Poisson ICAR slope came out 3% off at 50 sds from zero, silently, hence CENTRE_RATIO there)
SPATIAL_REASON = ("the spatial fit searches the fixed effects on X's own columns, along a ridge where it can stop "
                  "early, and its estimates can be off")


def far_fixed_message(name: str, ratio: float, mean: float, reason: str = SAMPLER_REASON, datasets: str = "") -> str:
    """The warning of a column :func:`far_fixed_columns` finds (``datasets``: "in 3 of 10 datasets" or "")."""
    return (f"the fixed-effect column {name!r} lies {ratio:.1e} of its sds from zero{datasets}: {reason}; centre the "
            f"column (as I({name} - {_positional(mean)}) in the formula)")


def warn_far_fixed(X: np.ndarray, names, reason: str, stacklevel: int, group: np.ndarray | None = None,
                   n_groups: int = 1, limit: float = FAR_FIXED_RATIO) -> None:
    """Warn, naming each column of :func:`far_fixed_columns` (and its datasets, with ``group``), for a fit that
    works on X's own columns (``reason``: :data:`SAMPLER_REASON`, :data:`SPATIAL_REASON`, whose fits go wrong
    from ``limit`` = :data:`CENTRE_RATIO`); ``stacklevel`` as the caller's own ``warnings.warn`` would take it."""
    count, ratio, mean = far_fixed_columns(X, group, n_groups, limit)
    for j in np.flatnonzero(count):
        datasets = "" if group is None else f" in {count[j]} of {n_groups} datasets"
        warnings.warn(far_fixed_message(names[j], ratio[j], mean[j], reason, datasets), HierpoolWarning,
                      stacklevel=stacklevel + 1)


def _positional(value: float) -> str:
    """``value`` as the formula's parser reads it: digits, no exponent (``1e+07`` does not parse), 10 significant."""
    return np.format_float_positional(float(f"{value:.10g}"), trim="-")


def _needs_conditioning(z: np.ndarray) -> bool:
    return bool(needs_conditioning(z, np.zeros(len(z), dtype=np.int64), 1)[0])


def fixed_transform(X: np.ndarray) -> np.ndarray | None:
    """A (p, p) with X A centred (where X has an intercept) and scaled column by column, where X's columns are
    far from it by the random-effect columns' rule (:func:`needs_conditioning`), else None: a search that moves beta
    (``hp.glmm``'s) searches beta~ = A^-1 beta, on which X A beta~ = X beta.  The one-group case of
    :func:`term_transforms`, which ``hp.fit_batch`` applies per dataset."""
    return term_transform(X) if X.shape[1] and _needs_conditioning(X) else None


def fixed_coefficients(factors, beta: np.ndarray) -> np.ndarray:
    """A beta~ along beta~'s last axis, A the product of ``factors`` (A_1 A_2 ..., leading axes broadcast with
    beta~'s), applied one factor at a time: their entries cancel in the product (:func:`orthogonalised`)."""
    for factor in reversed(factors):
        beta = np.einsum("...ij,...j->...i", factor, beta)
    return beta


def conditioned_coefficients(factors, beta: np.ndarray) -> np.ndarray:
    """beta~ = A^-1 beta (the inverse of :func:`fixed_coefficients`), A^-1 = A_2^-1 A_1^-1 solved one factor at a
    time: a start given on the user's columns carried to the conditioned ones."""
    for factor in factors:
        beta = np.linalg.solve(factor, beta)
    return beta


def fixed_to_user(factors, beta: np.ndarray, vcov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """beta = A beta~ and Cov(beta) = A Cov(beta~) A^T from a fit on X~ = X A (:func:`fixed_coefficients`)."""
    for factor in reversed(factors):
        vcov = factor @ vcov @ np.swapaxes(factor, -1, -2)
    return fixed_coefficients(factors, beta), vcov


def fixed_rows(X: np.ndarray, factors) -> np.ndarray:
    """Rows x of the user's X as x A on the conditioned columns, one factor of A at a time
    (:func:`fixed_to_user`), the first (:func:`fixed_transform`'s centring and scaling) by
    :func:`transformed_columns`."""
    for index, factor in enumerate(factors):
        X = transformed_columns(X, factor) if index == 0 else X @ factor
    return X


def fixed_logdet(factors) -> np.ndarray:
    """log |det A| of A = A_1 A_2 (:func:`fixed_conditioning`'s factors, any leading axes), each factor's from its
    diagonal: :func:`term_transforms`' A_1 is the diagonal plus the intercept's row off it (det(D + e_i v^T) = det D
    where v_i = 0), :func:`orthogonalised`'s A_2 = R^-1 sqrt(n) is triangular.  Summed from the factors, not taken
    from the product, whose entries cancel."""
    return sum(np.sum(np.log(np.abs(np.diagonal(f, axis1=-2, axis2=-1))), axis=-1) for f in factors)


def orthogonalised(columns: np.ndarray):
    """(Q sqrt(n), R^-1 sqrt(n)) from the QR factorization of ``columns`` (..., n, p; leading axes: a stack of
    datasets of n rows each), where they are of full rank, else (``columns``, I): columns orthogonal and of unit root
    mean square, and the map to them (``columns`` R^-1 sqrt(n), upper triangular: :func:`fixed_logdet`).

    Why: centring and scaling each column against the intercept leaves an interaction with a shifted covariate,
    (x + 1e7) * g, nearly collinear with g (cond(X A) 1e7), and a covariate beside a factor coded without an
    intercept (0 + g + x) far from its levels' columns (1e13).  Q is formed by Householder reflections from the
    columns themselves, so it spans them to rounding (its backward error, not cond(X A) times it, as X A R^-1
    formed as a product would be); the map R^-1 carries beta back."""
    n, p = columns.shape[-2:]
    lead = columns.shape[:-2]
    identity = np.broadcast_to(np.eye(p), lead + (p, p))
    if not p or n < p:
        return columns, identity.copy()
    q, r = np.linalg.qr(columns)
    # an intercept (a constant first column) stays exactly constant: Q's first column is it, normalized, to rounding
    # row by row, and a large common location of y (1e12 + y) then did not cancel against it in the location shift
    # (the criterion 1.7e-6 off with x + 2000 conditioned; the forty-eighth session's second review)
    constant = np.all(columns[..., :, :1] == columns[..., :1, :1], axis=(-2, -1))[..., None]
    q[..., :, 0] = np.where(constant, q[..., :1, 0], q[..., :, 0])
    diagonal = np.abs(np.diagonal(r, axis1=-2, axis2=-1))
    full = diagonal.min(axis=-1) > 1e-12 * diagonal.max(axis=-1)  # (aliased columns are refused before: a guard)
    root_n = np.sqrt(n)
    where = full[..., None, None]
    r_inverse = np.where(where, np.linalg.inv(np.where(where, r, identity)) * root_n, identity)
    return np.where(where, q * root_n, columns), r_inverse


def group_rows(group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows in group order, each group's first position in it and one past the last, (n_groups + 1,)): group g's
    rows are ``order[bounds[g]:bounds[g + 1]]``."""
    order = np.argsort(group, kind="stable")
    return order, np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n_groups))])


def thetas_to_user(theta: np.ndarray, transforms) -> np.ndarray:
    """lme4's thetas (..., n_theta) on the user's columns from conditioned ones, ``transforms`` one M (..., k, k)
    per term: each term's lower-triangular L with L L^T = (M T)(M T)^T (the same covariance, the same criterion),
    from the QR factor of (M T)^T, its diagonal made >= 0."""
    theta = np.asarray(theta, dtype=float)
    out, offset = [], 0
    for transform in transforms:
        k = transform.shape[-1]
        rows, cols = tril_positions(k)
        factor = np.zeros(theta.shape[:-1] + (k, k))
        factor[..., rows, cols] = theta[..., offset : offset + rows.size]
        r = np.linalg.qr(np.swapaxes(transform @ factor, -1, -2), mode="r")
        diagonal = np.diagonal(r, axis1=-2, axis2=-1)
        lower = np.swapaxes(r, -1, -2) * np.where(diagonal < 0, -1.0, 1.0)[..., None, :]
        out.append(lower[..., rows, cols])
        offset += rows.size
    return np.concatenate(out, axis=-1)


def effects_to_user(transform: np.ndarray, b, cond_var) -> tuple[np.ndarray, np.ndarray]:
    """One term's BLUPs (..., ell, k) and conditional variances (..., ell, k, k) on the user's columns from the
    conditioned ones: b = M b~, Var(b | y) = M Var(b~ | y) M^T (``transform``: the term's M, (..., k, k); the
    leading axes, a batch's datasets, broadcast)."""
    transform = np.asarray(transform)
    # (optimize: the three operands contracted pairwise; without it NumPy loops over every index at once)
    return (np.asarray(b) @ np.swapaxes(transform, -1, -2),
            np.einsum("...ij,...ljk,...mk->...lim", transform, np.asarray(cond_var), transform, optimize=True))


@dataclass(frozen=True)
class Conditioning:
    """The conditioned design, the per-term M_j that map its theta back to the user's, and the fixed-effect
    columns' A where those are conditioned too (None: X as the user's)."""

    design: Design
    transforms: tuple[np.ndarray, ...]
    fixed: tuple[np.ndarray, ...] | None = None  # A's factors, A = A_1 A_2 (:func:`fixed_conditioning`)

    def theta_to_user(self, theta: np.ndarray) -> np.ndarray:
        """lme4's theta on the user's columns from the conditioned one (same covariance, same criterion)."""
        return thetas_to_user(theta, self.transforms)

    def objective_to_user(self, objective: float, reml: bool) -> float:
        """The user's criterion from the conditioned fit's: REML's, on X A, is the user's plus 2 log |det A|
        (log |A' X' V^-1 X A| = log |X' V^-1 X| + 2 log |det A|); ML's does not move."""
        return objective - 2.0 * float(fixed_logdet(self.fixed)) if reml and self.fixed is not None else objective

    @property
    def terms_conditioned(self) -> bool:
        """Whether some term's M is other than the identity (else X alone is conditioned: :func:`condition_fixed`)."""
        return any(not np.array_equal(m, np.eye(m.shape[0])) for m in self.transforms)

    def solution_to_user(self, solution: Solution, theta: np.ndarray) -> Solution:
        """The conditioned problem's solution (host arrays) on the user's columns at the user's ``theta``."""
        fixed = {}
        if self.fixed is not None:
            beta, vcov = fixed_to_user(self.fixed, np.asarray(solution.beta), np.asarray(solution.vcov_beta))
            fixed = {"beta": beta, "vcov_beta": vcov,  # and log |R_X|^2, which moves as REML's criterion
                     "logdet_rx": np.asarray(solution.logdet_rx) - 2.0 * fixed_logdet(self.fixed)}
        if not self.terms_conditioned:  # the terms' numbers are the user's as they are (u too, where T is singular)
            return replace(solution, **fixed)
        user_factors = [np.asarray(f) for f in theta_to_factors(np.asarray(theta), tuple(m.shape[0] for m in self.transforms))]
        b, cond_var, u = [], [], []
        for m, user, tilde, b_j, var_j, u_j in zip(self.transforms, user_factors, solution.factors, solution.b,
                                                   solution.cond_var, solution.u):
            b_user, var_user = effects_to_user(m, b_j, var_j)
            b.append(b_user)
            cond_var.append(var_user)
            # spherical effects: u = T^+ M T~ u~ (a rotation of u~ where T is not singular; where it is, z T u, the
            # only way u enters the model, is still exact: T T^+ projects on T's columns, which M T~ spans)
            u.append(np.asarray(u_j) @ (np.linalg.pinv(user) @ m @ np.asarray(tilde)).T)
        return replace(solution, theta=np.asarray(theta), factors=tuple(user_factors), b=tuple(b),
                       cond_var=tuple(cond_var), u=tuple(u), **fixed)


def fixed_conditioning(X: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray] | None:
    """((A_1, A_2), X A), A = A_1 A_2, where X's columns are far from centred or unit scale
    (:func:`fixed_transform`'s rule), else None: X centred and scaled column by column (A_1,
    :func:`fixed_transform`), then orthogonalised (A_2, :func:`orthogonalised`), X A formed in those two steps."""
    a = fixed_transform(X)
    if a is None:
        return None
    columns, r_inverse = orthogonalised(transformed_columns(X, a))
    return (a, r_inverse), np.ascontiguousarray(columns)


def least_squares(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of ``y`` on ``columns`` (of full column rank): NumPy's lstsq, or where the columns
    are far from centred or unit scale (:func:`fixed_conditioning`) lstsq on the conditioned columns, the
    coefficients mapped back one factor at a time.  lstsq's SVD cuts singular values below eps max(n, p) of the
    largest: a covariate ~1e7 beside the intercept (cond 1e13) lost its slope entirely (hp.pooling's complete and
    no pooling, 3.5e-5 for 23.5)."""
    fixed = fixed_conditioning(columns)
    if fixed is None:
        return np.linalg.lstsq(columns, y, rcond=None)[0]
    factors, conditioned = fixed
    return fixed_coefficients(factors, np.linalg.lstsq(conditioned, y, rcond=None)[0])


def condition_fixed(design: Design) -> Conditioning | None:
    """The design with X's columns alone conditioned where they are far from centred or unit scale
    (:func:`fixed_conditioning`), else None: the terms keep their columns (M = I), so that theta is the user's
    (``hp.MixedModel``'s evaluations at a given theta, ``hp.lmm`` from ``Control.theta_start``)."""
    fixed = fixed_conditioning(design.X)
    if fixed is None:
        return None
    factors, columns = fixed
    return Conditioning(design=replace(design, X=columns), transforms=tuple(np.eye(t.k) for t in design.terms),
                        fixed=factors)


def condition_terms(design: Design, force: bool = False, fixed: bool = False) -> Conditioning | None:
    """The design with its random-effect columns centred and scaled, or None when they are fine as they are
    (``force``: always; an AR(1) fit, whose whitening makes a covariate of moderate mean nearly collinear with the
    intercept's column, :func:`hierpool.closedform.ar1.fit_ar1`).  ``fixed``: X's columns too, where they are far
    from centred or unit scale (:func:`fixed_transform`; ``hp.lmm``; ``hp.glmm`` conditions X in
    :func:`hierpool.closedform.glmm_optimize.fit_laplace` itself, by :func:`condition_fixed`)."""
    if not force and not any(_needs_conditioning(t.z) for t in design.terms):
        return condition_fixed(design) if fixed else None
    transforms = tuple(term_transform(t.z) for t in design.terms)
    terms = tuple(replace(t, z=np.ascontiguousarray(transformed_columns(t.z, m)))
                  for t, m in zip(design.terms, transforms))
    conditioned = condition_fixed(design) if fixed else None
    if conditioned is None:
        return Conditioning(design=replace(design, terms=terms), transforms=transforms)
    return replace(conditioned, design=replace(conditioned.design, terms=terms), transforms=transforms)
