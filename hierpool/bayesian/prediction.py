"""Posterior predictions from draws: the pieces every Bayesian result's ``predict`` shares.

Per posterior draw s and row i: eta_si = o_i + x_i' beta_s + (each term's effects of the row's levels at draw s),
a level never seen in fitting taking one draw from N(0, Sigma_s) for all of its rows (brms's
``sample_new_levels = "gaussian"``); ``kind="mean"`` summarizes eta (or g^-1(eta)), ``kind="predictive"`` a new
response drawn per draw: the family's at mu_s (a binomial's as the proportion of its trials), or a Gaussian
model's eta_s plus N(0, sigma_s^2 / w_i) noise (se_i^2 with known residual sds).  The results that share them:
:class:`hierpool.bayesian.results.BayesResult` and :class:`hierpool.bayesian.spatial.SpatialBayesResult`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..algebra.family import Link, draw_responses
from ..errors import ArgumentError, DataError
from ..spec.arguments import probability_argument
from ..spec.newdata import new_known_variances, new_row_weights


def check_arguments(design, kind: str, type: str | None, trials, level: float) -> None:
    """``predict``'s arguments, refused by name: the kind, the scale, trials of a binomial only."""
    if kind not in ("mean", "predictive"):
        raise ArgumentError(f"kind must be 'mean' or 'predictive', got {kind!r}")
    if type not in (None, "link", "response"):
        raise ArgumentError(f"type must be 'link' or 'response', got {type!r}")
    family = design.family
    if family is not None and kind == "predictive" and type == "link":
        raise ArgumentError("kind='predictive' draws new responses, which are on the response scale: "
                            "use type='response' (or kind='mean' for the linear predictor)")
    if trials is not None and (family is None or family.name != "binomial"):
        raise ArgumentError("trials= is for a binomial model's predictive draws")
    probability_argument("level", level)


def term_effect_draws(terms, unseen, effect_draws, covariance_draws, rng: np.random.Generator) -> np.ndarray:
    """sum_j z_ij' b_j[level] per draw and row (draws, rows) of the ``(lhs | g)`` terms: ``terms`` model_rows' (z_j,
    level_j), ``unseen`` each row's index among term j's new levels (:func:`hierpool.spec.newdata.unseen_levels`),
    ``effect_draws(j)`` (draws, ell_j, k_j) and ``covariance_draws(j)`` Sigma_j per draw (draws, k_j, k_j), asked
    for only where a level is new."""
    out = 0.0
    for j, (z, level) in enumerate(terms):
        b = effect_draws(j)
        known = level >= 0
        contribution = np.einsum("nk,snk->sn", z, b[:, np.where(known, level, 0), :])
        if not known.all():  # one draw per new group and posterior draw, shared by the group's rows
            cov = covariance_draws(j)
            chol = np.linalg.cholesky(cov + 1e-12 * np.eye(z.shape[1]))
            new = np.einsum("skl,sgl->sgk", chol,
                            rng.standard_normal((cov.shape[0], int(unseen[j].max()) + 1, z.shape[1])))
            contribution = np.where(known, contribution,
                                    np.einsum("nk,snk->sn", z, new[:, np.maximum(unseen[j], 0), :]))
        out = out + contribution
    return out


def trials_column(design) -> str | None:
    """The column of a binomial's trials where they are its prior weights alone (``weights=`` a column, a
    proportion response): not a ``cbind`` response's, whose trials are the response's columns."""
    if design.weights_column is None or design.spec.response.replace(" ", "").startswith("cbind("):
        return None
    return design.weights_column


def trial_counts(values, rows: int, name: str = "trials") -> np.ndarray:
    """Binomial trials for ``rows`` rows to predict: one number for all, or one per row, whole and at least 1."""
    try:
        count = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be whole numbers of at least 1, got {values!r}") from None
    if count.size == 1:
        count = np.full(rows, count[0])
    if count.shape != (rows,):
        raise ArgumentError(f"{name} has {count.size} values for {rows} rows to predict")
    if not np.all(count >= 1) or not np.all(count == np.round(count)):
        raise DataError(f"{name} must be whole numbers of at least 1")
    return count


def family_draws(design, eta: np.ndarray, newdata, trials, rng: np.random.Generator,
                 shape_draws: np.ndarray | None) -> np.ndarray:
    """A new response per draw and row (draws, rows) from the family at the linear predictor ``eta``: a binomial's
    proportion of the row's trials (``trials=``, the fitted rows', newdata's trials column, or one), a negative
    binomial's at each draw's shape (``shape_draws``, (draws,))."""
    family = design.family
    mu = Link(family.link).inverse(eta)
    if family.name == "binomial":
        column = trials_column(design)
        if trials is not None:
            count = trial_counts(trials, eta.shape[1])
        elif newdata is None:
            count = np.maximum(np.round(design.row_weights), 1.0)
        elif design.weights is None:
            count = np.ones(eta.shape[1])
        elif column is not None and column in newdata.columns:  # brms's trials() read from new data
            count = trial_counts(newdata[column].to_numpy(), eta.shape[1], column)
        else:
            raise ArgumentError("the model was fitted with trials (cbind or weights=): predictive draws for newdata "
                                "need each row's trials, as trials="
                                + ("" if column is None else f" or newdata's column {column!r}"))
        return draw_responses("binomial", mu, rng, trials=count)
    shape = shape_draws.reshape(-1)[:, None] if family.name == "negative_binomial" else None
    return draw_responses(family.name, mu, rng, shape=shape)


def noise_scale(design, newdata, sigma_draws: np.ndarray | None, rows: int) -> np.ndarray:
    """The sd of a Gaussian model's new observation per draw and row: sigma_s / sqrt(w_i), or se_i (known sds)."""
    if design.sigma_known:
        return np.sqrt(new_known_variances(design, newdata))
    weights = new_row_weights(design, newdata)
    scale = np.ones(rows) if weights is None else 1.0 / np.sqrt(weights)
    return sigma_draws.reshape(-1)[:, None] * scale


def on_scale(design, eta: np.ndarray, kind: str, type: str | None, newdata, trials, rng, shape_draws,
             sigma_draws, noise_factor=None) -> np.ndarray:
    """The draws ``predict`` summarizes: eta (or g^-1(eta), ``type="response"``) for ``kind="mean"``, else new
    responses (``noise_factor``: what is left of a Gaussian row's noise sd, per draw and row, e.g. given an AR(1)
    carried residual)."""
    family = design.family
    if family is not None:
        if kind == "predictive":
            return family_draws(design, eta, newdata, trials, rng, shape_draws)
        return Link(family.link).inverse(eta) if type == "response" else eta
    if kind == "predictive":
        scale = noise_scale(design, newdata, sigma_draws, eta.shape[1])
        if noise_factor is not None:
            scale = scale * noise_factor
        return eta + rng.standard_normal(eta.shape) * scale
    return eta


def draw_moments(draws: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """mean, sd and the equal-tailed interval of ``level`` of each column of ``draws`` (draws, m): the summaries of
    a posterior's parameters (:func:`~hierpool.bayesian.results.summarize_draws`) and of its predictions."""
    tail = (1 - level) / 2
    return {"mean": draws.mean(axis=0), "sd": draws.std(axis=0, ddof=1),
            "lower": np.quantile(draws, tail, axis=0), "upper": np.quantile(draws, 1 - tail, axis=0)}


def summary_table(draws: np.ndarray, level: float, index: pd.Index) -> pd.DataFrame:
    """:func:`draw_moments` of each column (row to predict) of ``draws``, as a frame on ``index``."""
    return pd.DataFrame(draw_moments(draws, level), index=index)
