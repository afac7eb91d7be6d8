"""BLUPs as ridge regression: the penalized-least-squares view of partial pooling.

Henderson's mixed-model equations are the normal equations of

    minimize_{beta, b}  sum_i w_i (y_i - x_i beta - z_i b)^2 + sum_j sum_g b_jg^T P_j b_jg,
    P_j = sigma^2 Sigma_j^-1,

a ridge regression whose penalty is lambda_j = sigma^2 / sigma_bj^2 for a scalar
term and the matrix sigma^2 Sigma_j^-1 for correlated slopes (Robinson 1991,
sec. 5; Hastie, Tibshirani & Friedman 2009, sec. 3.4.1).  :func:`ridge_view`
solves that problem densely, independently of the closed-form engine's blocked
factorization, shows that its solution at the REML penalty is the BLUP, and
traces the ridge path as the penalty is scaled by t: t -> 0 gives no pooling,
t -> infinity complete pooling, t = 1 the BLUP.

Written with lme4's relative factors Lambda_j (Sigma_j = sigma^2 Lambda_j
Lambda_j^T, b = Lambda u) the penalty is t ||u||^2, which also covers singular
fits, where Sigma_j has no inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg

from .algebra.conditioning import fixed_coefficients, fixed_rows, transformed_columns
from .closedform.ar1 import AR1Result
from .closedform.optimize import user_theta_singular
from .closedform.results import LMMResult
from .errors import ArgumentError

DENSE_LIMIT = 4000  # random-effect columns: the view is a teaching tool, built densely


def _dense_relative_z(fit: LMMResult) -> np.ndarray:
    """Z Lambda, shape (n, q), columns ordered by term, level, coefficient: in the coordinates of the fit's algebra
    (:meth:`~hierpool.closedform.results.LMMResult.prediction_coordinates`), (z M) T~ for a fit on conditioned
    columns, the same model (its u spherical) without the user's cancelling entries (a slope on Days + 1e7)."""
    _, term_maps, factors, _ = fit.prediction_coordinates()
    return np.hstack([term.dense_columns(transformed_columns(term.z, m) @ f)
                      for term, m, f in zip(fit.design.terms, term_maps, factors)])


def _unstack(fit: LMMResult, u: np.ndarray) -> list[np.ndarray]:
    """Split the u vector per term and map to b = M T u (:func:`_dense_relative_z`'s coordinates), shape (levels,
    k) per term."""
    _, term_maps, factors, _ = fit.prediction_coordinates()
    out, offset = [], 0
    for term, m, factor in zip(fit.design.terms, term_maps, factors):
        size = term.n_levels * term.k
        out.append((u[..., offset : offset + size].reshape(u.shape[:-1] + (term.n_levels, term.k)) @ factor.T) @ m.T)
        offset += size
    return out


def ridge_solve(fit: LMMResult, multipliers: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dense ridge solutions for penalties t * sigma^2 Sigma^-1, one per multiplier t.

    beta is profiled out once, leaving S u = r with S = U'WU - U'WX (X'WX)^-1 X'WU
    (U = Z Lambda); one eigendecomposition S = V diag(s) V' then gives every
    point of the path, u(t) = V diag(1 / (s + t)) V' r, at O(q^2) each instead
    of a new O(q^3) solve.

    Returns (beta, b): beta shaped (len(t), p); b per term shaped (len(t), levels, k).
    """
    fixed = fit.prediction_coordinates()[0]  # X as x A for a fit on conditioned columns, beta mapped back below
    # y less the offset: the fit's own working response (an offset shifts the rows' means, not the penalty)
    X, y = (fit.design.X if fixed is None else fixed_rows(fit.design.X, fixed)), fit.design.y_less_offset
    w = fit.design.row_weights
    U = _dense_relative_z(fit)
    xtx_inv_xt = scipy.linalg.solve(X.T @ (w[:, None] * X), (w[:, None] * X).T, assume_a="pos")  # (X'WX)^-1 X'W
    residual_maker = U - X @ (xtx_inv_xt @ U)  # U with its projection on X removed
    schur = U.T @ (w[:, None] * residual_maker)
    reduced_rhs = residual_maker.T @ (w * y)
    values, vectors = np.linalg.eigh(0.5 * (schur + schur.T))
    projected = vectors.T @ reduced_rhs
    t = np.asarray(multipliers, dtype=float)
    u = (projected[None, :] / (values[None, :] + t[:, None])) @ vectors.T  # (len(t), q)
    beta = (xtx_inv_xt @ (y[:, None] - U @ u.T)).T
    return (beta if fixed is None else fixed_coefficients(fixed, beta)), _unstack(fit, u)  # beta = A beta~


@dataclass(frozen=True)
class RidgeView:
    """A fit's BLUPs next to the dense ridge solution, and the ridge path.

    Attributes
    ----------
    penalties : dict
        Per term (``"(time | patient)"``-style label): the penalty matrix sigma^2 Sigma_j^-1
        (lambda = sigma^2 / sigma_b^2 for a scalar term); NaN entries for a singular Sigma_j.
    table : pandas.DataFrame
        grpvar, grp, term, blup, ridge (at t = 1), difference.
    max_abs_difference : float
        Largest |BLUP - ridge| over all random effects.
    path : pandas.DataFrame
        multiplier t, grpvar, grp, term, coefficient (beta_c(t) + b_jc(t), the group's coefficient).
    fit : LMMResult
    """

    penalties: dict
    table: pd.DataFrame
    max_abs_difference: float
    path: pd.DataFrame
    fit: LMMResult

    def plot(self, term: str | None = None, group: str | None = None):
        """Each group's coefficient along the ridge path, the BLUPs marked at t = 1."""
        from .plots import ridge_path_figure

        return ridge_path_figure(self, term=term, group=group)


def _term_label(term) -> str:
    return f"({' + '.join(term.coef_names)} | {term.group})"


def ridge_view(fit: LMMResult, multipliers=None) -> RidgeView:
    """Show numerically that the BLUPs are a ridge solution, and trace the ridge path.

    Parameters
    ----------
    fit : LMMResult
        A closed-form fit (``hp.lmm``).
    multipliers : array-like, optional
        Scale factors t of the REML penalty along the path (default: 41 values
        from 1e-3 to 1e3, log-spaced, and 1).

    Returns
    -------
    RidgeView
    """
    if not isinstance(fit, LMMResult):
        raise ArgumentError(f"ridge_view needs a closed-form fit (hp.lmm), got {type(fit).__name__}")
    if isinstance(fit, AR1Result):  # its BLUPs solve a problem weighted by the residuals' inverse correlation
        raise ArgumentError("ridge_view shows the ridge problem of independent residuals; an AR(1) fit's BLUPs solve "
                            "the correlated residuals' (generalized) one, which it does not build")
    q = sum(t.n_levels * t.k for t in fit.design.terms)
    if q > DENSE_LIMIT:
        raise ArgumentError(f"ridge_view builds Z densely; this model has {q} random effects (limit {DENSE_LIMIT})")
    try:
        grid = np.logspace(-3, 3, 41) if multipliers is None else np.asarray(multipliers, dtype=float)
    except (TypeError, ValueError):
        grid = np.array([np.nan])
    if grid.ndim != 1 or np.any(~np.isfinite(grid)) or np.any(grid < 0):
        raise ArgumentError("multipliers must be a 1-d array of finite, non-negative numbers")
    grid = np.union1d(grid, [1.0])
    beta_path, b_path = ridge_solve(fit, grid)
    at_one = int(np.flatnonzero(grid == 1.0)[0])

    rows, path_frames, penalties = [], [], {}
    fixed = list(fit.design.fixed_names)
    ks = tuple(t.k for t in fit.design.terms)
    thetas = np.split(np.asarray(fit.theta, dtype=float), np.cumsum([k * (k + 1) // 2 for k in ks])[:-1])
    for j, (term, cov) in enumerate(zip(fit.design.terms, fit.term_covariances())):
        with np.errstate(divide="ignore", invalid="ignore"):
            # lme4's singular rule on the term's theta, in the known sds' units where given (a diagonal of T_j within
            # singular_tol of 0; a matrix rank called a 1 x 1 variance of 1e-18 full rank)
            singular = user_theta_singular(thetas[j], fit.system, (term.k,))
            penalties[_term_label(term)] = np.full_like(cov, np.nan) if singular else fit.sigma**2 * np.linalg.inv(cov)
        blups = np.asarray(fit.solution.b[j])
        for i, coef in enumerate(term.coef_names):
            rows.append(pd.DataFrame({"grpvar": term.group, "grp": term.levels, "term": coef,
                                      "blup": blups[:, i], "ridge": b_path[j][at_one][:, i]}))
            population = beta_path[:, fixed.index(coef)] if coef in fixed else np.zeros(len(grid))
            values = population[:, None] + b_path[j][:, :, i]
            path_frames.append(pd.DataFrame({
                "multiplier": np.repeat(grid, term.n_levels),
                "grpvar": term.group,
                "grp": np.tile(term.levels, len(grid)),
                "term": coef,
                "coefficient": values.ravel(),
            }))
    table = pd.concat(rows, ignore_index=True)
    table["difference"] = table["blup"] - table["ridge"]
    return RidgeView(
        penalties=penalties,
        table=table,
        max_abs_difference=float(np.abs(table["difference"]).max()),
        path=pd.concat(path_frames, ignore_index=True),
        fit=fit,
    )
