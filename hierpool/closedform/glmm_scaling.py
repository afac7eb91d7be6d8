"""A change of variables that makes the GLMM's (theta, beta) criterion well conditioned for a quasi-Newton search.

The Laplace deviance's curvature in beta scales with the fixed-effect columns (a quadratic in age
is ~10^3 times steeper along age^2 than along the intercept) and couples beta with theta, so
L-BFGS from lme4's start needs hundreds of evaluations on such a model (289 on mlmRev's
Contraception).  With an approximate Hessian H at the start, the variables

    y = L^T (x - x0),      H = L L^T  (Cholesky, the unbounded variables ordered first),

make the criterion's Hessian near the identity in y.  The bounded variables (the diagonal of each
T_j, lme4's lower bound 0) must stay separable for a box-constrained optimizer, so their own block
of L is replaced by its diagonal: with the unbounded variables F first and the scaled ones D last,

    L = [[L_FF, 0], [L_DF, diag(d)]],   y_F = L_FF^T dx_F + L_DF^T dx_D,   y_D = d * dx_D,

each x_D is a function of its own y_D (a bound x_D >= lo is y_D >= d (lo - x0_D)), and beta's
coupling with theta is still undone exactly (x_F depends on y_D).  The gradient in y is
L^-1 g_x.  See Nocedal & Wright (2006), sec. 2.2 ("scaling") and 6.1 on why BFGS depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Smallest eigenvalue kept in the start's Hessian, relative to its largest: the start (theta = 1) can
#: be far from the optimum, where the criterion need not be convex.
EIGENVALUE_FLOOR = 1e-3


@dataclass(frozen=True)
class BlockScaling:
    """y = L^T (x - origin) with L block lower-triangular (see the module docstring).

    Attributes
    ----------
    origin : numpy.ndarray
        x0, where y = 0.
    free, scaled : numpy.ndarray
        Indices of x: the unbounded variables (a full block of L) and the ones scaled one by one.
    chol_free : numpy.ndarray
        L_FF, lower triangular.
    cross : numpy.ndarray
        L_DF, shape (len(scaled), len(free)).
    diagonal : numpy.ndarray
        d, the scaled variables' factors (positive).
    """

    origin: np.ndarray
    free: np.ndarray
    scaled: np.ndarray
    chol_free: np.ndarray
    cross: np.ndarray
    diagonal: np.ndarray

    def to_x(self, y: np.ndarray) -> np.ndarray:
        """x from y."""
        y = np.asarray(y, dtype=float)
        x = self.origin.copy()
        dx_scaled = y[self.scaled] / self.diagonal
        x[self.scaled] += dx_scaled
        x[self.free] += _solve_upper(self.chol_free.T, y[self.free] - self.cross.T @ dx_scaled)
        return x

    def to_y(self, x: np.ndarray) -> np.ndarray:
        """y from x."""
        dx = np.asarray(x, dtype=float) - self.origin
        y = np.empty_like(dx)
        y[self.free] = self.chol_free.T @ dx[self.free] + self.cross.T @ dx[self.scaled]
        y[self.scaled] = self.diagonal * dx[self.scaled]
        return y

    def gradient_to_y(self, gradient: np.ndarray) -> np.ndarray:
        """dF/dy = L^-1 dF/dx."""
        g = np.asarray(gradient, dtype=float)
        out = np.empty_like(g)
        out[self.free] = _solve_lower(self.chol_free, g[self.free])
        out[self.scaled] = (g[self.scaled] - self.cross @ out[self.free]) / self.diagonal
        return out

    def lower_y(self, lower: np.ndarray) -> np.ndarray:
        """Lower bounds in y of lower bounds in x (-inf on the free variables, which must have none)."""
        lower = np.asarray(lower, dtype=float)
        if np.any(np.isfinite(lower[self.free])):
            raise ValueError("BlockScaling: a free (fully scaled) variable has a bound")
        out = np.full(lower.shape, -np.inf)
        out[self.scaled] = self.diagonal * (lower[self.scaled] - self.origin[self.scaled])
        return out


def block_scaling(hessian: np.ndarray, origin: np.ndarray, free, scaled) -> BlockScaling:
    """The :class:`BlockScaling` of an approximate Hessian at ``origin``.

    Parameters
    ----------
    hessian : numpy.ndarray
        Symmetric (n, n); its eigenvalues are floored at :data:`EIGENVALUE_FLOOR` times the largest
        (and at a tiny positive value), so that it factors.
    origin : numpy.ndarray
        Where y = 0.
    free, scaled : sequence of int
        A partition of range(n): the unbounded variables, and those scaled one by one.
    """
    free, scaled = np.asarray(free, dtype=int), np.asarray(scaled, dtype=int)
    order = np.concatenate([free, scaled])
    h = np.asarray(hessian, dtype=float)[np.ix_(order, order)]
    h = 0.5 * (h + h.T)
    values, vectors = np.linalg.eigh(h)
    top = max(float(values.max()), 1e-300)
    values = np.maximum(values, EIGENVALUE_FLOOR * top)
    chol = np.linalg.cholesky((vectors * values) @ vectors.T)
    nf = len(free)
    return BlockScaling(origin=np.asarray(origin, dtype=float).copy(), free=free, scaled=scaled,
                        chol_free=chol[:nf, :nf], cross=chol[nf:, :nf], diagonal=np.diagonal(chol)[nf:].copy())


def _solve_lower(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.solve(lower, b) if len(b) else b


def _solve_upper(upper: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.solve(upper, b) if len(b) else b
