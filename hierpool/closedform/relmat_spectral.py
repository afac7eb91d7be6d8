"""The animal model for many responses on one design, by the eigenvectors of Z A Z' (EMMA, FaST-LMM): the
specialisation of :mod:`hierpool.closedform.relmat` that ``hp.fit_batch`` uses for many traits of the same animals.

With one relationship term, no prior weights, and the same rows (animals, covariates) for every response, the
marginal covariance is V = sigma^2 H(theta), H = I + theta^2 K, K = Z A Z' (n x n, z_i times A's entries of the
records' animals).  One eigendecomposition K = U diag(s) U' serves every response and every theta: with
y~ = U'(y - o), X~ = U'X and d_i = 1 + theta^2 s_i,

    log|H| = sum_i log d_i,   X'H^-1 X = X~' D^-1 X~,   beta^ = (X~' D^-1 X~)^-1 X~' D^-1 y~,
    pwrss = sum_i (y~ - X~ beta^)_i^2 / d_i,

which are lme4's log|L_theta|^2 (Sylvester: |I + Lambda'Z'Z Lambda| = |I + Z Lambda Lambda' Z'|), log|R_X|^2 and
penalized residual sum of squares, so :func:`hierpool.algebra.criterion.profiled_criterion` gives the same REML or ML
criterion as the sparse equations (:meth:`RelmatEquations.evaluate`; tested equal).  Each evaluation costs
O(n p^2) per response, on arrays of responses x thetas: the search over theta runs for all responses at once
(a grid over :data:`~hierpool.closedform.relmat.LOG_THETA_BOUNDS`, then golden sections around each response's
best point), where the sparse path factors K(theta) at every step of every response's Brent search.  The BLUPs of
every level of A are b = theta^2 A Z' H^-1 r = theta^2 N D^-1 U' r with N = A Z' U (q x n), and their prediction
error variances sigma^2 diag(C^-1)_bb = sigma^2 theta^2 [diag A - theta^2 (diag(N D^-1 N') - diag(Q S^-1 Q'))],
Q = N D^-1 X~, S = X~' D^-1 X~ (Henderson 1975: C^-1_bb = G - G Z' P Z G, G = theta^2 A, P the REML projection).

The search finds the profile's lowest point on its grid; where the profile has two local minima, the sparse path's
Brent search (from a bracket at h^2 0.12 and 0.5) may stop at the other: the criterion here is then the lower.

References: Kang et al. (2008), Genetics 178, 1709-1723 (EMMA); Lippert et al. (2011), Nat. Methods 8, 833-835
(FaST-LMM); Henderson (1975), Biometrics 31, 423-447.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..algebra.criterion import profiled_criterion
from ..algebra.linalg import inverse_diagonal
from ..spec.relationship import Relationship
from .relmat import LOG_THETA_BOUNDS, PEV_MAX_LEVELS, factor_spd

#: Records (n) up to which the n x n eigendecomposition is used (O(n^3) once, n^2 numbers held).
SPECTRAL_MAX_ROWS = 4_000
#: Levels of A times records (q n) up to which it is used: A Z' U is held dense (q x n; 160 MB at the limit).
SPECTRAL_MAX_ENTRIES = 20_000_000
#: Points of the grid over log theta (both bounds among them).
GRID_POINTS = 161
#: Golden-section steps around each response's best grid point: the bracket (two grid steps, 0.23 in log theta)
#: shrinks by 0.618 per step, to 1e-10.
GOLDEN_STEPS = 45
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class SpectralDesign:
    """One design's rotation (module docstring).

    Attributes
    ----------
    values : (n,) ndarray
        Eigenvalues s of K = Z A Z'.
    vectors : (n, n) ndarray
        Its eigenvectors U.
    x_rotated : (n, p) ndarray
        U'X.
    effects : (q, n) ndarray
        N = A Z' U, every level of A.
    a_diagonal : (q,) ndarray
        diag A.
    """

    values: np.ndarray
    vectors: np.ndarray
    x_rotated: np.ndarray
    effects: np.ndarray
    a_diagonal: np.ndarray

    @property
    def n(self) -> int:
        return self.values.size

    @property
    def p(self) -> int:
        return self.x_rotated.shape[1]

    @cached_property
    def x_outer(self) -> np.ndarray:
        """Each rotated row's x~ x~' (n, p^2): S(theta) = sum_i x~_i x~_i' / d_i at every theta from it."""
        return (self.x_rotated[:, :, None] * self.x_rotated[:, None, :]).reshape(self.n, self.p**2)


def relationship_parts(rel: Relationship) -> tuple:
    """What every design of one relationship shares: A^-1's sparse LU (``relmat.factor_spd``; A^-1 is positive
    definite, as :class:`Relationship` checks) and diag A for the prediction error variances
    (``algebra.linalg.inverse_diagonal``; NaN above ``relmat.PEV_MAX_LEVELS`` levels, where none are computed)."""
    q = len(rel.labels)
    factored = factor_spd(rel.inverse)[0]
    a_diagonal = inverse_diagonal(factored.solve, q) if q <= PEV_MAX_LEVELS else np.full(q, np.nan)
    return factored, a_diagonal


def spectral_design(animal: np.ndarray, z: np.ndarray, X: np.ndarray, parts: tuple) -> SpectralDesign:
    """The rotation of one design (module docstring): each record's ``animal`` (its position among A's labels),
    its value ``z`` of the term's coefficient (1 for an intercept), the fixed effects' ``X``; ``parts`` the
    relationship's (:func:`relationship_parts`).  A's columns of the records' animals from A^-1's LU."""
    factored, a_diagonal = parts
    q, n = a_diagonal.size, animal.size
    unit = np.zeros((q, n))
    unit[animal, np.arange(n)] = z
    a_z = factored.solve(unit)  # A Z' (q x n)
    values, vectors = np.linalg.eigh(z[:, None] * a_z[animal])  # K = Z A Z': K_ij = z_i z_j A[a_i, a_j]
    return SpectralDesign(values=np.maximum(values, 0.0),  # K is semi-definite: rounding below 0 is 0
                          vectors=vectors, x_rotated=vectors.T @ X, effects=a_z @ vectors, a_diagonal=a_diagonal)


def _parts(log_theta: np.ndarray, y_rotated: np.ndarray, sd: SpectralDesign):
    """(1 / d, S = X~'D^-1 X~, beta^, pwrss) at log theta (B, G) of responses y~ (B, n), leading axes (B, G).
    pwrss = y~'D^-1 y~ - beta^' X~'D^-1 y~ (the caller centres y on its least-squares fit first: no digits lost)."""
    p = sd.p
    inverse_d = 1.0 / (1.0 + np.exp(2.0 * log_theta)[..., None] * sd.values)  # (B, G, n)
    s = (inverse_d @ sd.x_outer).reshape(inverse_d.shape[:-1] + (p, p))
    weighted_y = inverse_d * y_rotated[:, None, :]
    rhs = weighted_y @ sd.x_rotated  # (B, G, p)
    beta = np.linalg.solve(s, rhs[..., None])[..., 0]
    pwrss = np.sum(weighted_y * y_rotated[:, None, :], axis=-1) - np.sum(beta * rhs, axis=-1)
    return inverse_d, s, beta, pwrss


def criterion(log_theta: np.ndarray, y_rotated: np.ndarray, sd: SpectralDesign, reml: bool) -> np.ndarray:
    """The profiled REML criterion or deviance at log theta (B, G) of responses y~ (B, n) (module docstring)."""
    inverse_d, s, _, pwrss = _parts(log_theta, y_rotated, sd)
    log_det_s = np.linalg.slogdet(s)[1]
    return profiled_criterion(-np.sum(np.log(inverse_d), axis=-1), log_det_s, pwrss, sd.n, sd.p, 0.0, reml,
                              sigma_known=False)


def minimize(y_rotated: np.ndarray, sd: SpectralDesign, reml: bool):
    """Each response's log theta at its criterion's minimum: (log theta (B,), criterion there (B,), the criterion
    at both bounds (B, 2)).  A grid, then golden sections between the best point's neighbours."""
    grid = np.linspace(*LOG_THETA_BOUNDS, GRID_POINTS)
    values = criterion(np.broadcast_to(grid, (y_rotated.shape[0], grid.size)), y_rotated, sd, reml)
    values = np.where(np.isfinite(values), values, np.inf)
    best = np.argmin(values, axis=1)
    low, high = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, grid.size - 1)]

    def at(x):
        value = criterion(x[:, None], y_rotated, sd, reml)[:, 0]
        return np.where(np.isfinite(value), value, np.inf)  # (a constant response's: its caller refuses it)

    c, d = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fc, fd = at(c), at(d)
    for _ in range(GOLDEN_STEPS):  # in lockstep: each response keeps the side with the lower point
        left = fc < fd
        high, low = np.where(left, d, high), np.where(left, low, c)
        c_next, d_next = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
        moved = np.where(left, c_next, d_next)
        f_moved = at(moved)
        c, d, fc, fd = (np.where(left, c_next, d), np.where(left, c, d_next), np.where(left, f_moved, fd),
                        np.where(left, fc, f_moved))
    log_theta = np.where(fc < fd, c, d)
    found = np.minimum(fc, fd)
    # the grid's best point where the sections could not beat it (a bound)
    grid_best = values[np.arange(best.size), best]
    log_theta, found = np.where(grid_best < found, grid[best], log_theta), np.minimum(grid_best, found)
    return log_theta, found, values[:, [0, -1]]


def solution(log_theta: np.ndarray, y_rotated: np.ndarray, sd: SpectralDesign, reml: bool) -> dict:
    """Each response's estimates at its log theta (B,): ``beta`` (B, p), ``sigma`` (B,), ``vcov`` (B, p, p),
    ``b`` (B, q) every level of A's BLUP, ``condsd`` (B, q) their prediction error sds (NaN above
    :data:`~hierpool.closedform.relmat.PEV_MAX_LEVELS` levels, as the sparse path's)."""
    inverse_d, s, beta, pwrss = (a[:, 0] for a in _parts(log_theta[:, None], y_rotated, sd))
    sigma = np.sqrt(pwrss / (sd.n - sd.p if reml else sd.n))
    s_inverse = np.linalg.inv(s)
    theta2 = np.exp(2.0 * log_theta)
    residual = y_rotated - beta @ sd.x_rotated.T  # U'r
    b = theta2[:, None] * ((residual * inverse_d) @ sd.effects.T)
    condsd = np.full(b.shape, np.nan)
    if np.isfinite(sd.a_diagonal).all():  # (none above PEV_MAX_LEVELS levels, as the sparse path)
        # PEV / sigma^2 = theta^2 diag A - theta^4 [diag(N D^-1 N') - diag(Q S^-1 Q')], Q = N D^-1 X~
        nn = inverse_d @ (sd.effects**2).T  # (B, q)
        q_rows = (sd.effects[None] * inverse_d[:, None, :]) @ sd.x_rotated  # (B, q, p)
        qsq = np.sum((q_rows @ s_inverse) * q_rows, axis=-1)
        pev = theta2[:, None] * sd.a_diagonal - theta2[:, None] ** 2 * (nn - qsq)
        condsd = sigma[:, None] * np.sqrt(np.maximum(pev, 0.0))
    return {"beta": beta, "sigma": sigma, "vcov": sigma[:, None, None] ** 2 * s_inverse, "b": b, "condsd": condsd}
