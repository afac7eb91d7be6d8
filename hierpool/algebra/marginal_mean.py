"""Population-average means of a GLMM: the random effects integrated out of the inverse link.

A GLMM's coefficients are *subject-specific*: beta describes the mean of a subject whose random
effects are b, mu = g^-1(eta + z'b), eta = offset + x beta.  The *population-average* (marginal)
mean of a row averages over the subjects, b ~ N(0, Sigma) (Sigma block-diagonal over the terms,
Sigma_j = T_j T_j^T from theta):

    m(x) = E_b[ g^-1(eta + z'b) ].

For one row the random part z'b is one normal variable, z'b ~ N(0, v) with
v = sum_j z_j' Sigma_j z_j = sum_j |T_j^T z_j|^2, whatever the number of terms and their sizes, so m
is always the one-dimensional integral E_t[g^-1(eta + sqrt(v) t)], t ~ N(0, 1):

* **closed form** (exact): probit, m = Phi(eta / sqrt(1 + v)) (the normal cdf of a normal's
  convolution); log, m = exp(eta + v / 2) (the lognormal mean) (Zeger, Liang & Albert 1988, sec. 2);
* **Gauss-Hermite** (any link): m = pi^-1/2 sum_k a_k g^-1(eta + sqrt(2 v) x_k), with the number of
  nodes doubled from 16 until two rules agree to :data:`QUADRATURE_TOL` (relative), or as given;
* **quasi-Monte Carlo**: the whole effect vector of every term drawn jointly, b_j = T_j u_j with u the
  normal quantiles of a scrambled Sobol sequence (Owen 1998; SciPy's ``qmc.Sobol``), m the draws'
  mean.  It does not use the one-dimensional reduction: an independent check of it.

Each method also returns the partial derivatives the delta method needs: dm/deta (so dm/dbeta =
dm/deta x) and dm/dtheta, through v for the first two (dv/dT_j[a, b] = 2 z_a (T_j^T z)_b; for the
quadrature dm/dv = E[g^-1'(eta + s t) t] / (2 s), s = sqrt(v), by Stein's lemma the
E[g^-1''] / 2 that a second derivative would give) and directly for the draws
(dm/dT_j[a, b] = E[g^-1'(eta + z'b) z_a u_b]).

:func:`population_average` turns the means of the data's rows into population-average coefficients,
the weighted least-squares projection of the marginal linear predictor g(m) - offset on X
(Hedeker, du Toit, Demirtas & Gibbons 2018; GLMMadaptive's ``marginal_coefs``), with the Jacobian
that carries a covariance of (theta, beta) to them.

References
----------
Zeger, S. L., Liang, K.-Y. & Albert, P. S. (1988). Models for longitudinal data: a generalized
estimating equation approach. Biometrics 44, 1049-1060.
Owen, A. B. (1998). Scrambling Sobol' and Niederreiter-Xing points. J. Complexity 14, 466-489.
Hedeker, D., du Toit, S. H. C., Demirtas, H. & Gibbons, R. D. (2018). A note on marginalization of
regression parameters from mixed models of binary outcomes. Biometrics 74, 354-361.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .family import Link
from .linalg import tril_positions

#: Relative agreement of two Gauss-Hermite rules (n and 2n nodes) at which the doubling stops.
QUADRATURE_TOL = 1e-10
#: The first rule of the doubling, and the largest (NumPy's ``hermgauss`` overflows beyond about 300 nodes).
FIRST_NODES, MAX_NODES = 16, 256
#: Rows x draws evaluated at once by the quasi-Monte Carlo path (bounds its memory).
QMC_BLOCK = 1 << 22
#: Links whose marginal mean has a closed form.
CLOSED_FORM_LINKS = ("probit", "log")


@dataclass(frozen=True)
class MarginalMeans:
    """Population-average means of n rows and their partial derivatives.

    Attributes
    ----------
    mean : numpy.ndarray, shape (n,)
        m = E_b[g^-1(eta + z'b)].
    d_eta : numpy.ndarray, shape (n,)
        dm/deta (dm/dbeta = d_eta * x).
    d_theta : numpy.ndarray, shape (n, len(theta))
        dm/dtheta.
    variance : numpy.ndarray, shape (n,)
        v = Var(z'b), the variance of each row's random part.
    method : str
        ``"closed form"``, ``"gauss-hermite"`` or ``"quasi-monte carlo"``.
    nodes, draws : int or None
        The quadrature's nodes, the draws of the Sobol sequence.
    error : float
        Gauss-Hermite: the largest relative difference between the last two rules, or a fixed rule's from
        the rule of twice its nodes (:func:`quadrature_means`; 0 for a closed form; NaN for the draws, whose error
        this does not estimate).
    """

    mean: np.ndarray
    d_eta: np.ndarray
    d_theta: np.ndarray
    variance: np.ndarray
    method: str
    nodes: int | None = None
    draws: int | None = None
    error: float = 0.0


def random_part_variance(z_terms, factors) -> tuple[np.ndarray, np.ndarray]:
    """(v, dv/dtheta): v_i = sum_j |T_j^T z_ij|^2 for each row, and its gradient in theta (lme4's order).

    ``z_terms``: each term's (n, k_j) columns; ``factors``: the lower-triangular T_j (k_j x k_j).
    """
    n = z_terms[0].shape[0]
    variance = np.zeros(n)
    gradients = []
    for z, factor in zip(z_terms, factors):
        w = np.asarray(z, dtype=float) @ np.asarray(factor, dtype=float)  # (T_j^T z)^T per row
        variance += np.sum(w**2, axis=1)
        rows, cols = tril_positions(factor.shape[0])
        gradients.append(2.0 * z[:, rows] * w[:, cols])
    return variance, np.concatenate(gradients, axis=1)


def closed_form_means(eta, z_terms, factors, link: Link) -> MarginalMeans:
    """Exact means for the probit (Phi(eta / sqrt(1 + v))) and the log link (exp(eta + v / 2))."""
    eta = np.asarray(eta, dtype=float)
    variance, dv = random_part_variance(z_terms, factors)
    if link.name == "probit":
        scale = np.sqrt(1.0 + variance)
        shrunk = eta / scale
        mean = link.inverse(shrunk)
        density = link.mu_eta(shrunk)
        d_eta = density / scale
        d_v = -density * shrunk / (2.0 * (1.0 + variance))
    elif link.name == "log":
        mean = link.inverse(eta + variance / 2.0)
        d_eta = link.mu_eta(eta + variance / 2.0)
        d_v = d_eta / 2.0
    else:
        raise ValueError(f"the {link.name} link has no closed-form marginal mean")
    return MarginalMeans(mean, d_eta, d_v[:, None] * dv, variance, "closed form")


@lru_cache(maxsize=None)
def _hermite_rule(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal nodes and weights: t_k = sqrt(2) x_k, w_k = a_k / sqrt(pi)."""
    x, a = np.polynomial.hermite.hermgauss(nodes)
    t, w = np.sqrt(2.0) * x, a / np.sqrt(np.pi)
    t.setflags(write=False)
    w.setflags(write=False)
    return t, w


def _hermite(eta, sd, link: Link, nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, dm/deta, E[g^-1'(eta + sd t) t]) by the rule of ``nodes`` nodes."""
    t, w = _hermite_rule(nodes)
    points = eta[:, None] + sd[:, None] * t[None, :]
    slope = link.mu_eta(points)
    return link.inverse(points) @ w, slope @ w, slope @ (w * t)


def _relative_change(reference: np.ndarray, mean: np.ndarray) -> float:
    """The largest relative difference of two rules' means (0 for no rows)."""
    return float(np.max(np.abs(reference - mean) / np.abs(reference))) if len(mean) else 0.0


def quadrature_means(eta, z_terms, factors, link: Link, nodes: int | None = None) -> MarginalMeans:
    """Means by Gauss-Hermite quadrature of the one-dimensional integral over t = z'b / sqrt(v).

    ``nodes=None`` doubles the rule from :data:`FIRST_NODES` until two successive rules agree to
    :data:`QUADRATURE_TOL` relative (the integrand is analytic, so the rules converge geometrically;
    slowly for the logit when sqrt(v) is large, its poles at eta + sqrt(v) t = +-i pi then lying near
    the real t axis).  ``error`` is the last difference; for a fixed ``nodes``, the difference from the rule of
    twice as many (half as many at :data:`MAX_NODES`): one node evaluates the integrand at t = 0 alone, the
    subject-specific mean, and must not pass for the marginal one unremarked.
    """
    eta = np.asarray(eta, dtype=float)
    variance, dv = random_part_variance(z_terms, factors)
    sd = np.sqrt(variance)
    if nodes is not None:
        mean, d_eta, moment = _hermite(eta, sd, link, nodes)
        other = _hermite(eta, sd, link, 2 * nodes if 2 * nodes <= MAX_NODES else nodes // 2)[0]
        error = _relative_change(other, mean)
    else:
        nodes = FIRST_NODES
        mean, d_eta, moment = _hermite(eta, sd, link, nodes)
        error = float("inf")
        while nodes < MAX_NODES:
            nodes *= 2
            finer = _hermite(eta, sd, link, nodes)
            error = _relative_change(finer[0], mean)
            mean, d_eta, moment = finer
            if error <= QUADRATURE_TOL:
                break
    d_v = np.divide(moment, 2.0 * sd, out=np.zeros_like(moment), where=sd > 0)
    return MarginalMeans(mean, d_eta, d_v[:, None] * dv, variance, "gauss-hermite", nodes=nodes, error=error)


def sobol_normals(dimension: int, draws: int, seed: int) -> np.ndarray:
    """(draws, dimension) standard-normal quantiles of a scrambled Sobol sequence (``draws`` a power of two)."""
    from scipy.special import ndtri
    from scipy.stats import qmc

    points = qmc.Sobol(dimension, scramble=True, seed=seed).random_base2(int(np.log2(draws)))
    tiny = np.finfo(float).tiny
    return ndtri(np.clip(points, tiny, 1.0 - np.finfo(float).epsneg))


def qmc_means(eta, z_terms, factors, link: Link, draws: int, seed: int) -> MarginalMeans:
    """Means by quasi-Monte Carlo over every term's effects jointly: b_j = T_j u_j, u from scrambled Sobol points."""
    eta = np.asarray(eta, dtype=float)
    ks = [f.shape[0] for f in factors]
    u = sobol_normals(sum(ks), draws, seed)
    blocks = np.split(u, np.cumsum(ks)[:-1], axis=1)  # (draws, k_j) per term
    effects = [block @ np.asarray(f, dtype=float).T for block, f in zip(blocks, factors)]  # b_j = T_j u_j
    n = len(eta)
    mean, d_eta = np.empty(n), np.empty(n)
    d_theta = np.empty((n, sum(k * (k + 1) // 2 for k in ks)))
    step = max(1, QMC_BLOCK // draws)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        points = eta[rows, None] + sum(np.asarray(z[rows], dtype=float) @ b.T for z, b in zip(z_terms, effects))
        slope = link.mu_eta(points)
        mean[rows] = link.inverse(points).mean(axis=1)
        d_eta[rows] = slope.mean(axis=1)
        pieces = []
        for z, block, k in zip(z_terms, blocks, ks):
            moment = slope @ block / draws  # E[g^-1' u_b], (rows, k)
            r, c = tril_positions(k)
            pieces.append(np.asarray(z[rows], dtype=float)[:, r] * moment[:, c])
        d_theta[rows] = np.concatenate(pieces, axis=1)
    variance, _ = random_part_variance(z_terms, factors)
    return MarginalMeans(mean, d_eta, d_theta, variance, "quasi-monte carlo", draws=draws, error=float("nan"))


def marginal_means(eta, z_terms, factors, link: Link, method: str = "auto", nodes: int | None = None,
                   draws: int = 4096, seed: int = 0) -> MarginalMeans:
    """Population-average means by ``method``: ``"auto"`` (the closed form where there is one, else
    Gauss-Hermite), ``"quadrature"`` (Gauss-Hermite always) or ``"qmc"``."""
    if method == "qmc":
        return qmc_means(eta, z_terms, factors, link, draws, seed)
    if method == "auto" and link.name in CLOSED_FORM_LINKS:
        return closed_form_means(eta, z_terms, factors, link)
    return quadrature_means(eta, z_terms, factors, link, nodes)


def marginal_link_jacobian(means: MarginalMeans, X, link: Link) -> tuple[np.ndarray, np.ndarray]:
    """(eta_M, J): the marginal linear predictor eta_M = g(m) of each row and its Jacobian in (theta, beta),
    rows [dm/dtheta, dm/deta x] / g^-1'(eta_M)."""
    eta_m = link(means.mean)
    slope = link.mu_eta(eta_m)
    jacobian = np.concatenate([means.d_theta, means.d_eta[:, None] * np.asarray(X, dtype=float)], axis=1)
    return eta_m, jacobian / slope[:, None]


def population_average(means: MarginalMeans, X, offset, weights, link: Link) -> tuple[np.ndarray, np.ndarray]:
    """(beta_M, J): population-average coefficients and their Jacobian in (theta, beta).

    beta_M = (X'AX)^-1 X'A (g(m) - offset), A = diag(weights): the weighted least-squares projection
    of the rows' marginal linear predictor on the fixed-effect columns (Hedeker et al. 2018, with
    the rows weighted by their prior weights, so that a binomial row of n trials counts as its n
    Bernoulli rows).  Where g(m) - offset lies in the span of X it is exact (probit with a random
    intercept: beta / sqrt(1 + sigma^2); log: the intercept plus sigma^2 / 2).
    """
    X = np.asarray(X, dtype=float)
    eta_m, jacobian = marginal_link_jacobian(means, X, link)
    root = np.sqrt(np.asarray(weights, dtype=float))[:, None]
    q, r = np.linalg.qr(root * X)
    projector = np.linalg.solve(r, q.T) * root.T  # (X'AX)^-1 X'A
    return projector @ (eta_m - np.asarray(offset, dtype=float)), projector @ jacobian


def delta_covariance(jacobian, covariance) -> np.ndarray:
    """J C J^T: the delta method's covariance of a function with Jacobian J of parameters with covariance C."""
    jacobian = np.asarray(jacobian, dtype=float)
    return jacobian @ np.asarray(covariance, dtype=float) @ jacobian.T
