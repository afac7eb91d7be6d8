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
unchanged.  Prediction-interval blocks are still formed on the user's columns
(a relative error ~1e-7 in those variances).  A scalar term is only scaled.
Well-conditioned models (the usual case) are left alone, so their numbers and
cost do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..spec.design import Design
from .henderson import Solution
from .linalg import tril_positions

#: Condition a term when a non-intercept column's |mean| exceeds this many sds (with an intercept in the term)...
CENTRE_RATIO = 10.0
#: ...or a column's root mean square lies outside [1 / SCALE_RATIO, SCALE_RATIO].
SCALE_RATIO = 1e3


def _intercept_column(z: np.ndarray) -> int | None:
    constant = np.flatnonzero(np.all(z == z[:1], axis=0) & (z[0] != 0))
    return int(constant[0]) if constant.size else None


def term_transform(z: np.ndarray) -> np.ndarray:
    """M with z M centred (when z has a constant column) and scaled column by column; identity columns stay."""
    k = z.shape[1]
    transform = np.eye(k)
    intercept = _intercept_column(z) if k > 1 else None
    for c in range(k):
        if c == intercept:
            continue
        column = z[:, c]
        if intercept is not None:
            mean, sd = column.mean(), column.std()
            if sd > 0:
                transform[c, c] = 1.0 / sd
                transform[intercept, c] = -mean / (sd * z[0, intercept])
        else:
            rms = np.sqrt(np.mean(column**2))
            if rms > 0:
                transform[c, c] = 1.0 / rms
    return transform


def _needs_conditioning(z: np.ndarray) -> bool:
    intercept = _intercept_column(z) if z.shape[1] > 1 else None
    rms = np.sqrt(np.mean(z**2, axis=0))
    if np.any((rms > 0) & ((rms > SCALE_RATIO) | (rms < 1.0 / SCALE_RATIO))):
        return True
    if intercept is None:
        return False
    others = [c for c in range(z.shape[1]) if c != intercept]
    mean, sd = z[:, others].mean(axis=0), z[:, others].std(axis=0)
    return bool(np.any(np.abs(mean) > CENTRE_RATIO * np.maximum(sd, np.finfo(float).tiny)))


@dataclass(frozen=True)
class Conditioning:
    """The conditioned design and the per-term M_j that map its theta back to the user's."""

    design: Design
    transforms: tuple[np.ndarray, ...]

    def theta_to_user(self, theta: np.ndarray) -> np.ndarray:
        """lme4's theta on the user's columns from the conditioned one (same covariance, same criterion)."""
        out, offset = [], 0
        for transform in self.transforms:
            k = transform.shape[0]
            rows, cols = tril_positions(k)
            factor = np.zeros((k, k))
            factor[rows, cols] = theta[offset : offset + rows.size]
            # lower-triangular L with L L^T = (M T)(M T)^T: from the QR of (M T)^T, diagonal made >= 0
            r = np.linalg.qr((transform @ factor).T, mode="r")
            lower = r.T * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
            out.append(lower[rows, cols])
            offset += rows.size
        return np.concatenate(out)

    def solution_to_user(self, solution: Solution, theta: np.ndarray) -> Solution:
        """The conditioned problem's solution (host arrays) on the user's columns at the user's ``theta``."""
        from .linalg import theta_to_factors

        user_factors = [np.asarray(f) for f in theta_to_factors(np.asarray(theta), tuple(m.shape[0] for m in self.transforms))]
        b, cond_var, u = [], [], []
        for m, factor, tilde_factor, b_j, var_j, u_j in zip(
            self.transforms, user_factors, solution.factors, solution.b, solution.cond_var, solution.u
        ):
            b.append(np.asarray(b_j) @ m.T)
            cond_var.append(np.einsum("ij,ljk,mk->lim", m, np.asarray(var_j), m))
            # spherical effects: u = T^+ M T~ u~ (a rotation of u~ when T is not singular)
            u.append(np.asarray(u_j) @ (np.linalg.pinv(factor) @ m @ np.asarray(tilde_factor)).T)
        return replace(solution, theta=np.asarray(theta), factors=tuple(user_factors), b=tuple(b), cond_var=tuple(cond_var), u=tuple(u))


def condition_terms(design: Design, force: bool = False) -> Conditioning | None:
    """The design with its random-effect columns centred and scaled, or None when they are fine as they are
    (``force``: always; an AR(1) fit, whose whitening makes a covariate of moderate mean nearly collinear with the
    intercept's column, :func:`hierpool.closedform.ar1.fit_ar1`)."""
    if not force and not any(_needs_conditioning(t.z) for t in design.terms):
        return None
    transforms = tuple(term_transform(t.z) for t in design.terms)
    terms = tuple(replace(t, z=np.ascontiguousarray(t.z @ m)) for t, m in zip(design.terms, transforms))
    return Conditioning(design=replace(design, terms=terms), transforms=transforms)
