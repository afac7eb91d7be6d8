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
coupling with theta is still undone exactly (x_F depends on y_D).  d_i is the square root of theta_i's
curvature once beta follows it (the Schur complement's diagonal), so the Hessian in y has a unit diagonal.
The same directions (the columns of dx/dy) carry the (extrapolated) forward differences of the final Hessian
(:func:`hierpool.closedform.optimize.hessian_from_gradients`), whose error is then small on each.  The gradient in y is
L^-1 g_x.  See Nocedal & Wright (2006), sec. 2.2 ("scaling") and 6.1 on why BFGS depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Smallest curvature kept for the free block's eigenvalues, relative to its largest, and for a scaled
#: variable's, relative to its own diagonal entry: the start (theta = 1) can be far from the optimum, where
#: the criterion need not be convex.  Floors are per block and per variable, so that a fixed-effect
#: column of large scale (an uncentred covariate) does not floor theta's curvature.
CURVATURE_FLOOR = 1e-3

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
        """x = origin + L^-T y, from y (n,): the scaled variables first, then the free ones given them."""
        y = np.asarray(y, dtype=float)
        x = self.origin.copy()
        dx_scaled = y[self.scaled] / self.diagonal
        x[self.scaled] += dx_scaled
        x[self.free] += _solve_upper(self.chol_free.T, y[self.free] - self.cross.T @ dx_scaled)
        return x

    def to_y(self, x: np.ndarray) -> np.ndarray:
        """y = L^T (x - origin), from x (n,); the inverse of :meth:`to_x`."""
        dx = np.asarray(x, dtype=float) - self.origin
        y = np.empty_like(dx)
        y[self.free] = self.chol_free.T @ dx[self.free] + self.cross.T @ dx[self.scaled]
        y[self.scaled] = self.diagonal * dx[self.scaled]
        return y

    def gradient_to_y(self, gradient: np.ndarray) -> np.ndarray:
        """dF/dy = L^-1 dF/dx, from the gradient in x (n,) (the chain rule through :meth:`to_x`)."""
        g = np.asarray(gradient, dtype=float)
        out = np.empty_like(g)
        out[self.free] = _solve_lower(self.chol_free, g[self.free])
        out[self.scaled] = (g[self.scaled] - self.cross @ out[self.free]) / self.diagonal
        return out

    def jacobian(self) -> np.ndarray:
        """dx/dy, (n, n): column i is the step in x of a unit step in y_i (x is affine in y)."""
        return np.stack([self.to_x(e) - self.origin for e in np.eye(len(self.origin))], axis=1)

    def lower_y(self, lower: np.ndarray) -> np.ndarray:
        """Lower bounds in y of lower bounds in x (n,): d (lo - x0) on the scaled variables, -inf on the free
        ones, which must have none (a ValueError otherwise)."""
        lower = np.asarray(lower, dtype=float)
        if np.any(np.isfinite(lower[self.free])):
            raise ValueError("BlockScaling: a free (fully scaled) variable has a bound")
        out = np.full(lower.shape, -np.inf)
        out[self.scaled] = self.diagonal * (lower[self.scaled] - self.origin[self.scaled])
        return out


def block_scaling(hessian: np.ndarray, origin: np.ndarray, free, scaled) -> BlockScaling:
    """The :class:`BlockScaling` of an approximate Hessian at ``origin``.

    L_FF is the Cholesky factor of the free block H_FF (its eigenvalues floored at
    :data:`CURVATURE_FLOOR` times the largest), L_DF = H_DF L_FF^-T undoes the coupling, and each scaled
    variable's factor is the square root of its diagonal entry of the Schur complement
    S = H_DD - L_DF L_DF^T (its curvature once the free variables follow it), so that the criterion's
    Hessian in y has a unit diagonal.

    Parameters
    ----------
    hessian : numpy.ndarray
        Symmetric (n, n), in x.
    origin : numpy.ndarray
        Where y = 0.
    free, scaled : sequence of int
        A partition of range(n): the unbounded variables, and those scaled one by one.

    Returns
    -------
    BlockScaling
    """
    free, scaled = np.asarray(free, dtype=int), np.asarray(scaled, dtype=int)
    h = np.asarray(hessian, dtype=float)
    h = 0.5 * (h + h.T)
    chol_free = _floored_cholesky(h[np.ix_(free, free)])
    cross = _solve_lower(chol_free, h[np.ix_(free, scaled)]).T if len(free) else np.zeros((len(scaled), 0))
    schur = np.diagonal(h[np.ix_(scaled, scaled)]) - np.sum(cross**2, axis=1)
    own = np.abs(np.diagonal(h[np.ix_(scaled, scaled)]))
    diagonal = np.sqrt(np.maximum(np.abs(schur), CURVATURE_FLOOR * own))
    diagonal = np.where(diagonal > 0, diagonal, 1.0)  # no curvature at all: unscaled
    return BlockScaling(origin=np.asarray(origin, dtype=float).copy(), free=free, scaled=scaled,
                        chol_free=chol_free, cross=cross, diagonal=diagonal)


def _floored_cholesky(h: np.ndarray) -> np.ndarray:
    """Cholesky factor of h; where h is not positive definite, of h with its eigenvalues floored at
    :data:`CURVATURE_FLOOR` times the largest (a positive definite h, however ill-conditioned by the
    columns' scales, is factored as it is: that conditioning is what the scaling undoes)."""
    if h.shape[0] == 0:
        return np.zeros((0, 0))
    try:
        return np.linalg.cholesky(h)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(h)
        values = np.maximum(values, CURVATURE_FLOOR * max(float(np.max(np.abs(values))), 1e-300))
        return np.linalg.cholesky((vectors * values) @ vectors.T)


def _solve_lower(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.solve(lower, b) if len(b) else b


def _solve_upper(upper: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.solve(upper, b) if len(b) else b
