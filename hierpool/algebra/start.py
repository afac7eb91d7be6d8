"""Starting values of theta from moments: the one home of the ANOVA / per-level least-squares start.

Both engines start their optimizer from the method of moments on the residuals r
of a least-squares fit of the fixed effects, summed per level of a random-effect
term.  :func:`moment_theta` is the estimator (a k-coefficient term, vectorized over
datasets): ``hp.fit_batch``'s start (:func:`hierpool.algebra.search.newton.moment_start`, from the
statistics) and the closed form's, term by term (:func:`hierpool.closedform.optimize.moment_start`).
For a scalar random intercept it is one-way ANOVA.  :func:`em_theta` is the other start, for a
GLMM: one EM step from conditional modes and their conditional variances (``hp.glmm``'s Laplace fit,
:func:`hierpool.closedform.glmm_optimize.fit_laplace`).
Pure NumPy: a start is computed once per fit, never inside a compiled program.
"""

from __future__ import annotations

import numpy as np

from .linalg import identity_where_not, small_determinants, small_inverses, tril_positions

#: Largest relative variance Sigma / sigma^2 (eigenvalue) a start takes.
MAX_RELATIVE_VARIANCE = 1e4


def moment_theta(ztz, cross, residual_ss, n, p: int, floor: float, rms=None) -> np.ndarray:
    """Starting thetas (B, k(k+1)/2) of one k-coefficient term from per-level sums of residuals, one per dataset.

    Parameters
    ----------
    ztz : (B, ell, k, k)
        Z_l^T Z_l per level (zero for a padded level).
    cross : (B, ell, k)
        Z_l^T r per level, r the residuals of the fixed-effects fit.
    residual_ss : (B,)
        r^T r.
    n : (B,)
        Observations.
    p : int
        Fixed-effect coefficients the residuals were fitted with (degrees of freedom of sigma^2 spent;
        0 to count only the levels', as one-way ANOVA does).
    floor : float
        Smallest eigenvalue of Sigma / sigma^2 a start takes, in the units of Z's columns scaled to unit root-mean-
        square (the largest is :data:`MAX_RELATIVE_VARIANCE`): a share of an observation's variance, whatever
        the units of a slope's covariate.
    rms : (B, k), optional
        The columns' root-mean-squares that scale the floor; by default from ``ztz`` (weighted as it is).  A
        GLMM's start passes its columns' own, so that its working weights do not move the floor.

    Returns
    -------
    numpy.ndarray
        Each level's own regression b_l = (Z_l^T Z_l)^-1 Z_l^T r where Z_l^T Z_l is well
        conditioned ("usable"); sigma^2 = (r^T r - sum_l b_l^T Z_l^T r) / (n - p - k * usable levels);
        Sigma = cov(b_l) - sigma^2 mean_l (Z_l^T Z_l)^-1 (the sampling noise of b_l removed), the
        eigenvalues of S Sigma S / sigma^2 clipped to [floor, MAX_RELATIVE_VARIANCE] (S the diagonal of the
        columns' root-mean-squares, sqrt(sum_l diag(Z_l^T Z_l) / n), or ``rms``); theta =
        chol(Sigma / sigma^2) in lme4's order.  Datasets with fewer than k + 1 usable levels, no
        residuals (r^T r = 0) or a non-finite result get lme4's identity start.  For k = 1 and Z = 1
        this is one-way ANOVA: b_l the level means of r, sigma^2 the within-level mean square,
        Sigma = var(b_l) - sigma^2 mean(1 / n_l).
    """
    ztz, cross = np.asarray(ztz, dtype=float), np.asarray(cross, dtype=float)
    residual_ss, n = np.asarray(residual_ss, dtype=float), np.asarray(n, dtype=float)
    k, datasets = ztz.shape[-1], len(cross)
    # datasets that share one design (ztz and n the same array for each, repeated by a zero stride: a shared
    # design's statistics) have its per-level inverses and its counts once, not once a dataset
    shared = ztz.ndim and ztz.strides[0] == 0 and n.ndim and n.strides[0] == 0 and datasets > 1
    design = (lambda a: a[:1]) if shared else (lambda a: a)
    ztz, design_n = design(ztz), design(n)
    determinant = small_determinants(ztz)
    scale = np.maximum(np.einsum("blii->bl", ztz), 1e-300) ** k
    usable = determinant > 1e-8 * scale
    safe = identity_where_not(usable, ztz)
    inverse = small_inverses(safe)
    count = usable.sum(axis=1)
    weight = usable / np.maximum(count, 1)[:, None]
    noise = np.einsum("bl,blij->bij", weight, np.where(usable[..., None, None], inverse, 0.0))
    if shared:
        inverse, usable, count, weight = (np.broadcast_to(a[0], (datasets,) + a.shape[1:])
                                          for a in (inverse, usable, count, weight))
    b = np.einsum("blij,blj->bli", inverse, cross)
    fitted = np.where(usable, np.einsum("bli,bli->bl", b, cross), 0.0).sum(axis=1)
    within = np.maximum(residual_ss - fitted, 1e-12 * np.maximum(residual_ss, 1e-300))
    sigma2 = within / np.maximum(n - p - k * count, 1.0)
    mean_b = np.einsum("bl,bli->bi", weight, b)
    centred = np.where(usable[..., None], b - mean_b[:, None, :], 0.0)
    cov = np.einsum("bli,blj->bij", centred, centred) / np.maximum(count - 1, 1)[:, None, None]
    relative = (cov - sigma2[:, None, None] * noise) / sigma2[:, None, None]
    # clipped in the units of Z's columns scaled to unit root-mean-square: the floor is then a share of an
    # observation's variance whatever the covariates' units (days or years of a slope)
    if rms is None:
        rms = np.sqrt(np.einsum("blii->bi", ztz) / np.maximum(design_n, 1.0)[:, None])
    rms = np.maximum(np.asarray(rms, dtype=float), 1e-150)
    values, vectors = np.linalg.eigh(relative * rms[:, :, None] * rms[:, None, :])
    standard = np.einsum("bij,bj,bkj->bik", vectors, np.clip(values, floor, MAX_RELATIVE_VARIANCE), vectors)
    relative = standard / (rms[:, :, None] * rms[:, None, :])
    rows, cols = tril_positions(k)
    theta = np.linalg.cholesky(relative)[:, rows, cols]
    identity = (rows == cols).astype(float)
    good = (count > k) & (residual_ss > 0) & np.all(np.isfinite(theta), axis=1)
    return np.where(good[:, None], theta, identity)


def known_sds_size(weighted_rss, weight_sum, weight_square_sum, n, p: int, unit):
    """With known residual sds, the size of lme4's identity start in their units (one per dataset): the larger of 1
    and tau / ``unit``, tau^2 = (Q - (n - p)) / (sum w - sum w^2 / sum w) DerSimonian and Laird's moment estimate of
    the between-study variance (DerSimonian & Laird 1986; Q = sum w_i r_i^2 the weighted least-squares residuals'
    sum of squares, w_i = 1 / se_i^2, Cochran's Q; the denominator the intercept-only model's, also with
    covariates: a start), ``unit`` the sds' (:func:`hierpool.algebra.linalg.weights_unit`).

    The searches run on theta over the known sds' unit (:func:`hierpool.closedform.optimize.known_sds_unit`), where
    the optimum is near 1 when the sds are the response's noise, but 36,000 with sds 30,000 times below it (the
    forty-third session's review datasets 30-35): from 1 ``hp.lmm``'s search took 550 evaluations there, and from
    the equal-sds estimate sqrt(Q / (n - p) - 1) it ended 38 above the optimum, unconverged, where the sds were
    uneven.  A start, not an estimate: every term starts at this size."""
    weight_sum = np.asarray(weight_sum, dtype=float)
    with np.errstate(all="ignore"):
        excess = np.asarray(weighted_rss, dtype=float) - np.maximum(np.asarray(n, dtype=float) - p, 0.0)
        tau2 = excess / (weight_sum - np.asarray(weight_square_sum, dtype=float) / weight_sum)
        size = np.sqrt(tau2) / np.asarray(unit, dtype=float)
    return np.where(np.isfinite(size) & (size > 1.0), size, 1.0)


def em_theta(modes, cond_vars, floor: float) -> np.ndarray:
    """theta after one EM step from conditional modes: Sigma_j = mean over levels of (b_l b_l^T + Var(b_l | y)).

    Parameters
    ----------
    modes : sequence of (ell_j, k_j) arrays
        Each term's conditional modes b (on the scale of the effects; unit residual scale).
    cond_vars : sequence of (ell_j, k_j, k_j) arrays
        Their conditional covariances (lme4's ``condVar``).
    floor : float
        Smallest eigenvalue of each Sigma_j the step returns (the largest is :data:`MAX_RELATIVE_VARIANCE`).

    Returns
    -------
    numpy.ndarray
        theta, each term's chol(Sigma_j) in lme4's order, concatenated over terms.

    Notes
    -----
    With b ~ N(0, Sigma) and q(b) the Gaussian approximation of b's conditional distribution at the
    current theta (the mode and the inverse Hessian of the penalized deviance: the Laplace
    approximation), the M-step of EM maximizes E_q log p(b | Sigma), whose maximizer is
    mean_l E_q[b_l b_l^T] (Dempster, Laird & Rubin 1977; Laird & Ware 1982 for the linear mixed model).
    One step from lme4's start theta = 1 moves theta most of the way to the Laplace optimum in the
    directions where the start was far, which the gradient search then does not have to travel.
    """
    thetas = []
    for b, cond_var in zip(modes, cond_vars):
        b, cond_var = np.asarray(b, dtype=float), np.asarray(cond_var, dtype=float)
        k = b.shape[1]
        sigma = (np.einsum("li,lj->ij", b, b) + cond_var.sum(axis=0)) / max(b.shape[0], 1)
        values, vectors = np.linalg.eigh(sigma)
        sigma = (vectors * np.clip(values, floor, MAX_RELATIVE_VARIANCE)) @ vectors.T
        rows, cols = tril_positions(k)
        thetas.append(np.linalg.cholesky(sigma)[rows, cols])
    return np.concatenate(thetas) if thetas else np.zeros(0)
