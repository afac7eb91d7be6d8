"""The exact gradient of a GLMM's Laplace criterion in (theta, beta).

The criterion (:mod:`hierpool.algebra.laplace`) is

    L(phi) = P(u*) + log |H| + const,   P(u) = sum_i a_i d(y_i, mu_i) + |u|^2,   H = I + Lambda' Z' W Z Lambda,

u* the conditional mode (dP/du = 0), W the Fisher weights at eta* = offset + X beta + Z Lambda u*,
phi = (theta, beta).  With s = W r the score (r the working residual; -1/2 dd/deta), the rows'
leverages h_i = z_i' Lambda H^-1 Lambda' z_i (:func:`hierpool.algebra.henderson.row_quadratic_forms`),
v_i = h_i dw_i/deta_i and g = H^-1 Lambda' Z' v (one Henderson solve), the envelope theorem (for P)
and the implicit function theorem on the mode's equation G(u, phi) = -Lambda' Z' s + u = 0 (for
log |H|, which depends on phi through W(eta*(phi))) give

    dL/dbeta    = X' e,                           e = v - 2 s - W (Z Lambda g),
    dL/dT_j     = sum_i z_ij (e_i u*_l(i) + s_i g_l(i))'       (row i's level l(i) of term j),
    dL/dtheta   = those entries of dL/dT_j that theta holds, + d log |H| / dtheta at fixed W,

the last being the linear mixed model's gradient of log |L_Z|^2 (:mod:`hierpool.algebra.criterion`).
For a canonical link (logit binomial, log Poisson) dG/du = H.  Otherwise (probit, cloglog, the
negative binomial's log) dG/du = H_o = I + Lambda' Z' W_o Z Lambda with the observed information
W_o = -ds/deta in place of the Fisher weights, and W_o replaces W in e and in the solve for g
(:func:`weight_derivatives`; H_o is positive definite at the mode, its rows' weights need not be).
The same function runs on NumPy arrays on the
host and on traced arrays in a compiled program (the GLMM's fit uses both; the tests check it
against central differences of the criterion).
"""

from __future__ import annotations

import numpy as np

from .family import Family
from .henderson import PredictionCovariance, effects, row_quadratic_forms
from .linalg import array_namespace, dataset_cells, factor_gradients_to_theta, theta_to_factors
from .system import grouped_products

#: The canonical (family, link) pairs, where the Fisher weights are the observed information.
CANONICAL = (("binomial", "logit"), ("poisson", "log"))


def canonical(family: Family) -> bool:
    """Whether ``family``'s link is its canonical one (the Fisher weights are then the observed information)."""
    return (family.name, family.link.name) in CANONICAL


def _link_derivatives(family: Family, eta, mu):
    """(d mu / d eta, d^2 mu / d eta^2) of the link, R's clamps aside."""
    xp = array_namespace(eta)
    name = family.link.name
    if name == "logit":
        first = mu * (1.0 - mu)
        return first, first * (1.0 - 2.0 * mu)
    if name == "probit":
        first = xp.exp(-0.5 * eta**2) / np.sqrt(2.0 * np.pi)
        return first, -eta * first
    if name == "cloglog":
        rate = xp.exp(xp.minimum(eta, 700.0))
        first = rate * xp.exp(-rate)
        return first, first * (1.0 - rate)
    return mu, mu  # log


def _variance_slope(family: Family, mu):
    """d V / d mu."""
    if family.name == "binomial":
        return 1.0 - 2.0 * mu
    if family.name == "poisson":
        return 1.0 + 0.0 * mu
    return 1.0 + 2.0 * mu / family.shape


def weight_derivatives(family: Family, y, eta, trials):
    """(d w / d eta, the observed information -d s / d eta) at eta.

    w = a mu'^2 / V is the Fisher weight and s = a mu' (y - mu) / V the score (-1/2 d d / d eta).  For
    a canonical link the observed information is w itself."""
    mu = family.link.inverse(eta)
    first, second = _link_derivatives(family, eta, mu)
    variance, slope = family.variance(mu), _variance_slope(family, mu)
    weight = trials * first**2 / variance
    weight_slope = trials * (2.0 * first * second / variance - first**3 * slope / variance**2)
    if canonical(family):
        return weight_slope, weight
    if family.name == "negative_binomial":
        # -d^2/deta^2 of y eta - (theta + y) log(theta + e^eta), in closed form: the general expression subtracts
        # two numbers of the shape's size (its relative error 1e-3 at mu / theta = 4e12)
        theta = family.shape
        return weight_slope, trials * (theta + y) * theta * mu / (theta + mu) ** 2
    observed = weight - trials * (y - mu) * (second / variance - first**2 * slope / variance**2)
    return weight_slope, observed


def rows_random_part(term_rows, b, group=None):
    """Z b from each term's (level per row, row values) and effects b_j (ell_j, k_j); ``group`` (NumPy): each row's
    dataset, with b_j (datasets, ell_j, k_j).  NumPy or traced."""
    xp = array_namespace(*b)
    out = 0.0
    for (index, z), effects_j in zip(term_rows, b):
        out = out + xp.einsum("nk,nk->n", z, _row_effects(effects_j, index, group))
    return out


def _row_values(z, factor, group):
    """Each row's z_i' T (``group``: each row's dataset, ``factor`` then one T per dataset)."""
    return z @ factor if group is None else np.einsum("ni,nij->nj", z, factor.take(group, axis=0))


def _row_effects(effects, index, group):
    """Each row's level's effects (``group``: ``effects`` per dataset, leading axis)."""
    return effects[index] if group is None else dataset_cells(effects, group, index)


def _rows_of(term_rows, factors, n_levels, ks, xp, group=None):
    """Term 0's rows of Z Lambda with their levels, and the other terms' rows with their columns."""
    (index0, z0), rest = term_rows[0], term_rows[1:]
    values, columns, offset = [], [], 0
    for (index, z), factor, ell, k in zip(rest, factors[1:], n_levels[1:], ks[1:]):
        values.append(_row_values(z, factor, group))
        columns.append(offset + index[:, None] * k + xp.arange(k)[None, :])
        offset += ell * k
    n = z0.shape[0]
    v_rest = xp.concatenate(values, axis=1) if values else xp.zeros((n, 0))
    index_rest = xp.concatenate(columns, axis=1) if columns else xp.zeros((n, 0), dtype=index0.dtype)
    return _row_values(z0, factors[0], group), index0, v_rest, index_rest


def leverages(theta, term_rows, covariance: PredictionCovariance, n_levels, ks, group=None):
    """h_i = z_i' Lambda H^-1 Lambda' z_i for every row (``covariance``: the blocks of H^-1 on the working system).

    ``group`` (on the host): each row's dataset, for a batch's thetas (datasets, n_theta) and ``covariance``
    (leading datasets axis)."""
    xp = array_namespace(theta)
    factors = theta_to_factors(theta, ks)
    return row_quadratic_forms(covariance, *_rows_of(term_rows, factors, n_levels, ks, xp, group), group=group)


def _group_sums(values, left, group, n_groups):
    """sum_i left_i values_i' per dataset: (k_l, k_v), or (datasets, k_l, k_v) with ``group``."""
    if group is None:
        return array_namespace(values).einsum("ni,nj->ij", left, values)
    return grouped_products(group, left, values, np.ones(len(group)), n_groups)


def laplace_gradient(theta, family: Family, y, trials, X, term_rows, u, eta, leverage, solve, logdet_gradient,
                     group=None):
    """dL/d(theta, beta) at the conditional mode (see the module's docstring).

    Parameters
    ----------
    theta : array
    family : Family
    y, trials, X : arrays
        The response, the prior weights (binomial trials) and the fixed-effect columns.
    term_rows : tuple of (index, z)
        Each term's level per row and row values.
    u, eta : the conditional mode's spherical effects (per term) and linear predictor.
    leverage : array
        :func:`leverages` at the mode's weights.
    solve : callable
        ``solve(response, weights)``: the spherical solution u of the Henderson equations with these
        weights and response (so that ``solve(v / w_o, w_o)`` is H_o^-1 Lambda' Z' v, H_o = I + Lambda' Z'
        W_o Z Lambda with W_o the observed information: dG/du).
    logdet_gradient : array
        d log |H| / dtheta at the mode's weights held.
    group : array, optional
        On the host, many datasets at once: each row's dataset (0, ..., D - 1); theta (D, n_theta), each u_j
        (D, ell_j, k_j), ``logdet_gradient`` (D, n_theta), and ``solve`` gives each dataset's u.  Returns (D, n).
    """
    xp = array_namespace(eta)
    ks = tuple(z.shape[1] for _, z in term_rows)
    factors = theta_to_factors(theta, ks)
    n_groups = None if group is None else theta.shape[0]
    _, weights, residual = family.working(y, eta, trials)
    score = weights * residual
    weight_slope, observed = weight_derivatives(family, y, eta, trials)
    v = leverage * weight_slope
    # with every leverage zero (all of theta at 0: no random effect) the solve's response would be zero,
    # whose penalized system does not factor; its solution is zero (on the host; a compiled program's
    # NaN there makes the search step back, as from any non-finite evaluation)
    if xp is np:
        flat = ~np.any(v != 0) if group is None else np.bincount(group, weights=v != 0, minlength=n_groups) == 0
    if xp is np and np.all(flat):
        g = tuple(np.zeros_like(uj) for uj in u)
    else:
        # a row without information (w_o = 0: trials 0, as a batch's padded rows) adds nothing to H_o; its
        # response is then immaterial, and 0 / 0 would poison the cross-products
        g = tuple(solve(xp.where(observed != 0, v / xp.where(observed != 0, observed, 1.0), 0.0), observed))
        if xp is np and group is not None and np.any(flat):
            g = tuple(np.where(flat[:, None, None], 0.0, gj) for gj in g)
    lambda_g = rows_random_part(term_rows, effects(factors, g), group)  # Z Lambda g
    e = v - 2.0 * score - observed * lambda_g
    per_factor = [_group_sums(e[:, None] * _row_effects(uj, index, group)
                              + score[:, None] * _row_effects(gj, index, group), z, group, n_groups)
                  for (index, z), uj, gj in zip(term_rows, u, g)]
    return xp.concatenate([factor_gradients_to_theta(per_factor) + logdet_gradient,
                           _group_sums(e[:, None], X, group, n_groups)[..., 0]], axis=-1)
