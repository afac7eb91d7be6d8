"""Predictions from a closed-form fit, with confidence and prediction intervals.

For a row with fixed-effect vector x and random-effect vectors z_j (levels l_j):

* existing levels: prediction x beta-hat + sum_j z_j b-hat_j[l_j]; its error
  variance counts the fixed effects, the group deviations and their covariance
  (Henderson 1975): sigma^2 v^T C^-1 v, with C the mixed-model coefficient
  matrix and v = [Lambda^T z; x] in the spherical parameterization;
* a level never seen in fitting: b_j = 0 (population level) and the term's
  variance z_j Sigma_j z_j^T is added, since nothing is known of that group;
* ``interval="prediction"`` adds the new observation's noise sigma^2 (or se^2
  from the ``se`` column, new data's, when residual sds are known; sigma^2 / w with prior
  weights, w read from new data's weights column).

The offset (the formula's ``offset(...)`` terms, evaluated on the new rows, and
the ``offset=`` column) is part of every prediction, as in lme4's
``predict.merMod``.  Stateful transforms (``scale``, ``center``, ``poly``) apply
the fitted data's parameters to new data.

``re=False`` predicts at the population level: the confidence interval covers
x beta only, the prediction interval adds every term's variance and the noise.
Intervals use normal quantiles and treat theta and sigma as known (as lme4's
``predict`` and ``merTools::predictInterval`` do by default).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from ..algebra.conditioning import fixed_rows, transformed_columns
from ..algebra.henderson import row_quadratic_forms
from ..errors import ArgumentError
from ..spec.arguments import probability_argument
from ..spec.newdata import model_rows, new_known_variances, new_row_weights, row_labels


def normal_quantile(level: float) -> float:
    """Two-sided normal quantile z of an interval of the given level: P(|Z| <= z) = level.

    The standard library's ``NormalDist.inv_cdf`` (Wichura's AS 241, ~1e-16 relative) is
    ``scipy.stats.norm.ppf`` to rounding without importing SciPy, whose import costs more than a
    small fit (benchmarks/RESULTS.md, "First fits").
    """
    probability = 0.5 + level / 2
    return float("inf") if probability == 1.0 else NormalDist().inv_cdf(probability)  # ndtri(1) is inf


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z: a Wald z test's p-value."""
    return 2.0 * NormalDist().cdf(-abs(float(z)))


def _rows(result, newdata, interval, re: bool = True):
    """(X, [(z_j, level_j)], offset, noise variance per row) for the rows to predict; with ``re=False`` no row's
    level is read (lme4's ``re.form=NA``: new data need not carry the grouping columns)."""
    design = result.design
    X, terms, offset = model_rows(design, newdata, levels_read=re)
    if design.sigma_known:  # (newdata's se column read only where the noise is asked for)
        return X, terms, offset, (new_known_variances(design, newdata) if interval == "prediction"
                                  else np.ones(X.shape[0]))
    noise = np.full(X.shape[0], result.sigma**2)
    if interval == "prediction":
        weights = new_row_weights(design, newdata)
        if weights is not None:
            noise = noise / weights
    return X, terms, offset, noise


def _conditional_variance(result, X, terms, known):
    """sigma^-2 v^T C^-1 v for each row, v the spherical coefficients of the known levels and x."""
    cov = result.prediction_blocks
    layout = result.system.layout
    factors = result.prediction_coordinates()[2]  # X and terms in those coordinates already (predict)
    z0, level0 = terms[0]
    v0 = (z0 @ factors[0]) * known[0][:, None]
    safe0 = np.where(known[0], level0, 0)
    values, index = [], []
    offset = 0
    for (z, level), factor, ok, (ell, k) in zip(terms[1:], factors[1:], known[1:], zip(layout.n_levels[1:], layout.ks[1:])):
        values.append((z @ factor) * ok[:, None])
        index.append(offset + np.where(ok, level, 0)[:, None] * k + np.arange(k)[None, :])
        offset += ell * k
    values.append(X)
    index.append(np.broadcast_to(layout.q_rest + np.arange(layout.p)[None, :], X.shape))
    v = np.concatenate(values, axis=1)
    idx = np.concatenate(index, axis=1)
    return row_quadratic_forms(cov, v0, safe0, v, idx)


def interval_table(fit: np.ndarray, variance: np.ndarray, level: float, index) -> pd.DataFrame:
    """The prediction table every closed-form fit returns: fit, se = sqrt(variance), and the normal interval
    fit -/+ z_{(1+level)/2} se (a variance below 0 by rounding counts as 0)."""
    se = np.sqrt(np.maximum(variance, 0.0))
    half = normal_quantile(level) * se
    return pd.DataFrame({"fit": fit, "se": se, "lower": fit - half, "upper": fit + half}, index=index)


def on_response_scale(out, link):
    """A link-scale prediction (an array, or :func:`interval_table`'s frame) mapped to the response scale by
    ``link``'s inverse g^-1: the interval's ends are mapped (g^-1 is monotone), and se by the delta method,
    se * d mu / d eta (as glmer's ``predict(se.fit=TRUE, type="response")`` through its family's mu.eta)."""
    if not isinstance(out, pd.DataFrame):
        return link.inverse(out)
    eta = out["fit"].to_numpy()
    return pd.DataFrame({"fit": link.inverse(eta), "se": out["se"].to_numpy() * link.mu_eta(eta),
                         "lower": link.inverse(out["lower"].to_numpy()),
                         "upper": link.inverse(out["upper"].to_numpy())}, index=out.index)


#: The intervals a Gaussian fit's predictions take.
INTERVALS = (None, "confidence", "prediction")


def check_interval(interval, allowed=INTERVALS, why: str = "") -> None:
    """Refuse an ``interval=`` not among ``allowed``, by name (``why``: what a fit lacking some says of them)."""
    if interval not in allowed:
        raise ArgumentError(f"interval must be one of {list(allowed)}{why}, got {interval!r}")


def check_re(re) -> None:
    """Refuse an ``re=`` that is not True or False by name: lme4's ``re.form=NULL`` (every random effect) is
    ``re=True`` here, and None, read as falsy, gave population-level predictions, the opposite."""
    if not isinstance(re, (bool, np.bool_)):
        raise ArgumentError(f"re must be True (the random effects of known levels: lme4's re.form=NULL) or False "
                            f"(population level: re.form=NA), got {re!r}")


def predict(result, newdata=None, re: bool = True, interval: str | None = None, level: float = 0.95,
            carry=None):
    """Predict from a fitted :class:`~hierpool.closedform.results.LMMResult`.

    Parameters
    ----------
    result : LMMResult
    newdata : pandas.DataFrame, optional
        Rows to predict; the fitted rows when None.
    re : bool
        Include random effects (BLUPs of known levels); population level when False.
    interval : {None, "confidence", "prediction"}
    level : float
        Coverage of the interval.
    carry : tuple of numpy.ndarray, optional
        AR(1) residuals (:meth:`hierpool.closedform.ar1.AR1Result.predict`): (c, last), per new row the
        fitted row ``last`` it follows in its series (-1: none) and c = phi^lag.  The row then predicts
        x'beta + z'b + c (y_last - x_last'beta - z_last'b), the conditional mean given the series' last
        residual, and its error variance is that of the whitened row (x - c x_last, z - c z_last) plus
        sigma^2 (1 - c^2) (Markov property: e_new - c e_last is independent of the data).

    Returns
    -------
    numpy.ndarray or pandas.DataFrame
        The predictions, or a frame with columns fit, se, lower, upper.
    """
    check_interval(interval)
    check_re(re)
    probability_argument("level", level)
    X, terms, offset, noise = _rows(result, newdata, interval, re)
    fit = offset + X @ np.asarray(result.solution.beta)
    known = [lvl >= 0 for _, lvl in terms] if re else [np.zeros(len(fit), dtype=bool) for _ in terms]
    for (z, lvl), b, ok in zip(terms, result.solution.b, known):
        fit = fit + np.where(ok, np.einsum("nk,nk->n", z, np.asarray(b)[np.where(ok, lvl, 0)]), 0.0)
    if carry is not None:
        c, last = carry
        c = np.where(last >= 0, c, 0.0)
        fit = fit + c * result.residuals[np.maximum(last, 0)]
        # the errors of beta-hat and b-hat enter through the whitened row (the levels are the series')
        design = result.design
        X = X - c[:, None] * design.X[np.maximum(last, 0)]
        terms = [(z - c[:, None] * term.z[np.maximum(last, 0)], lvl) for (z, lvl), term in zip(terms, design.terms)]
        noise = noise * (1.0 - c**2)
    if interval is None:
        return fit
    sigma2 = result.sigma**2
    # the variances in the coordinates of the fit's algebra: a conditioned fit's x A and z_j M_j (the user's
    # x' Cov(beta) x at x ~ 1e7 cancels most digits), else the user's columns
    fixed, term_maps, factors, vcov = result.prediction_coordinates()
    X = X if fixed is None else fixed_rows(X, fixed)
    terms = [(transformed_columns(z, m), lvl) for (z, lvl), m in zip(terms, term_maps)]
    if re:
        variance = sigma2 * _conditional_variance(result, X, terms, known)
    else:
        variance = np.einsum("na,ab,nb->n", X, vcov, X)
    covariances = [sigma2 * (f @ f.T) for f in factors]  # Sigma_j = sigma^2 T_j T_j^T (result.term_covariances)
    for (z, _), ok, cov in zip(terms, known, covariances):
        # unknown group deviations: their whole distribution, for new levels (or re=False prediction)
        if re or interval == "prediction":
            variance = variance + np.where(ok, 0.0, np.einsum("nk,kl,nl->n", z, cov, z))
    if interval == "prediction":
        variance = variance + noise
    return interval_table(fit, variance, level, row_labels(result.design, newdata))
