"""AR(1) residuals by whitening: the linear mixed model with C = AR(1) correlation is an independent-residual one.

Within a series, residuals e_t with Var(e_t) = sigma^2 and Corr(e_t, e_s) = phi^|t - s| (corAR1 at
integer positions, corCAR1 at continuous times) are a Markov chain: given e_(t-1), e_t has mean
c_t e_(t-1) and variance sigma^2 (1 - c_t^2), c_t = phi^(lag_t).  So the rows

    w_1 = v_1,      w_t = (v_t - c_t v_(t-1)) / sqrt(1 - c_t^2)        (Prais & Winsten 1954)

of any column v (y, X's columns, Z's values) are the columns of the same model with independent
residuals of variance sigma^2: W C W^T = I for the bidiagonal W.  The cost is linear in the series'
length (never a dense n x n matrix), and the closed form's system, criterion and Henderson solution
then apply unchanged to the whitened columns.  The likelihood of the original data is that of the
whitened data times |W| (the Jacobian), so

    -2 log L(theta, phi) = -2 log L_whitened(theta) + log |C(phi)|,   log |C| = sum_t log(1 - c_t^2)

for ML and REML alike (REML's log |X^T V^-1 X| is the whitened X's).  A random-effect term keeps one
level per row only if its level does not change within a series (it is the series' group or coarser):
the caller checks that (:func:`hierpool.closedform.ar1.fit_ar1`).
"""

from __future__ import annotations

import numpy as np

from .linalg import array_namespace


def constrained_phi(u, continuous: bool):
    """phi from nlme's unconstrained coefficient u: tanh(u / 2) (the inverse of log((1 + phi) / (1 - phi)), corAR1),
    or 1 / (1 + exp(-u)) (of log(phi / (1 - phi)), corCAR1).  NumPy or JAX (traced in ``hp.fit_batch``'s search)."""
    xp = array_namespace(u)
    return 1.0 / (1.0 + xp.exp(-u)) if continuous else xp.tanh(u / 2.0)


def carried(phi, previous, lag):
    """c_t = phi^lag_t for rows with a predecessor in their series, 0 for first rows; shape (n,)."""
    xp = array_namespace(phi, lag)
    first = previous < 0
    return xp.where(first, 0.0, xp.power(phi, xp.where(first, 1.0, lag)))


def whiten(values, previous, c):
    """The rows w_t = (v_t - c_t v_(t-1)) / sqrt(1 - c_t^2) of ``values`` (n,) or (n, k)."""
    xp = array_namespace(values, c)
    before = values[xp.maximum(previous, 0)]
    scale = 1.0 / xp.sqrt(1.0 - c * c)
    if values.ndim == 1:
        return scale * (values - c * before)
    return scale[:, None] * (values - c[:, None] * before)


def unwhiten(innovations, previous, c, order):
    """The inverse of :func:`whiten` on a vector (host): e_t = c_t e_(t-1) + sqrt(1 - c_t^2) w_t, computed along
    ``order`` (each series in order, a row's predecessor first).  With standard normal ``innovations`` it draws
    unit-variance AR(1) chains (simulation studies)."""
    out = np.empty(len(innovations))
    scale = np.sqrt(1.0 - c * c)
    for row in order:
        before = previous[row]
        out[row] = innovations[row] if before < 0 else c[row] * out[before] + scale[row] * innovations[row]
    return out


def log_det_correlation(c):
    """log |C| = sum_t log(1 - c_t^2) (the first rows' c_t = 0 add nothing)."""
    xp = array_namespace(c)
    return xp.sum(xp.log1p(-c * c))


def whitened_system(pattern, previous, lag, y_less_offset, phi):
    """The mixed-model system of the data whitened at ``phi``, filled inside a traced program.

    ``pattern`` is :func:`hierpool.algebra.system.system_pattern` of the unwhitened design (its rows'
    levels and values; X is one of its rest blocks); whitening replaces the values (term 0's, the other
    terms' and X's) and the response, and :func:`hierpool.algebra.system.fill_in_program` forms the
    cross-products with unit weights.  The collapsed sampler's marginal likelihood and exact draws read it
    at every phi (:mod:`hierpool.bayesian.model`).
    """
    import dataclasses

    from .system import fill_in_program  # here: the closed form's whitening above runs without JAX

    xp = array_namespace(phi, y_less_offset)
    c = carried(phi, previous, lag)
    rows = tuple((index, whiten(values, previous, c)) for index, values in pattern.rest_rows)
    whitened = dataclasses.replace(pattern, z0=whiten(pattern.z0, previous, c), rest_rows=rows)
    return fill_in_program(whitened, xp.ones(y_less_offset.shape[0]), whiten(y_less_offset, previous, c))


def draw_effects_whitened(thetas, sigmas, phis, pattern, previous, lag, y_less_offset, loc, scale, key,
                          batch_size: int):
    """Exact draws of (beta, b) given each (theta, sigma, phi) draw: the conditional draw on the system
    whitened at that draw's phi (:func:`whitened_system`), ``batch_size`` draws at a time."""
    import jax  # (as in whitened_system: the host's whitening imports no JAX)

    from .henderson import conditional_draw, noise_size
    from .marginal import beta_prior_block, map_in_batches

    noise = jax.random.normal(key, (thetas.shape[0], noise_size(pattern.layout)), dtype=thetas.dtype)

    def one(theta, sigma, phi, e):
        system = whitened_system(pattern, previous, lag, y_less_offset, phi)
        return conditional_draw(theta, system, sigma, e, beta_prior_block(loc, scale, sigma, system))

    return map_in_batches(one, (thetas, sigmas, phis, noise), batch_size)
