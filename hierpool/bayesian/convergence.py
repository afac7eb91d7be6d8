"""Rank-normalized R-hat, bulk and tail ESS and the MCSE of the mean, vectorized over many quantities at once.

The estimators are ArviZ's (``az.rhat``, ``az.ess(method="bulk")``,
``az.ess(method="tail")``, ``az.mcse(method="mean")``; Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021,
"Rank-normalization, folding, and localization: an improved R-hat for assessing
convergence of MCMC", Bayesian Analysis 16(2)), and the tests check they agree
with ArviZ to rounding.  ArviZ evaluates them one quantity at a time (timed in
benchmarks/RESULTS.md, "Bayesian engine, fourth session"), which is fine for one
model's few dozen quantities but not for ``hp.bayes_batch``'s thousands of models;
these take every quantity of an array in one pass of NumPy/SciPy array operations.

Arrays are shaped ``(m, chain, draw)``: one row per quantity.

ESS (Geyer 1992, as Stan and ArviZ compute it): with split chains, the
autocorrelations rho_t from the chains' FFT autocovariances and the variance
estimate var+, pair sums P_j = rho_2j + rho_2j+1 are summed up to the first
non-positive one (Geyer's initial positive sequence), made non-increasing
(initial monotone sequence), and tau = -1 + 2 sum_j P_j (+ the last even
autocorrelation when positive); ESS = chains x draws / max(tau, 1/log10(chains x draws)).
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft
from scipy import special, stats


def split_chains(x: np.ndarray) -> np.ndarray:
    """(m, c, n) -> (m, 2c, n // 2): each chain's first and last halves as separate chains."""
    half = x.shape[-1] // 2
    return np.concatenate([x[..., :half], x[..., -half:]], axis=1)


def _average_ranks(flat: np.ndarray) -> np.ndarray:
    """Ranks along axis 1, ties sharing their average rank (``scipy.stats.rankdata(method="average")``).

    One argsort for all rows; SciPy's rankdata (slower; benchmarks/RESULTS.md, "Measurements the
    code cites") only for rows with ties.
    """
    order = np.argsort(flat, axis=1)
    ranks = np.empty(flat.shape)
    np.put_along_axis(ranks, order, np.arange(1.0, flat.shape[1] + 1.0)[None, :], axis=1)
    tied = (np.diff(np.take_along_axis(flat, order, axis=1), axis=1) == 0).any(axis=1)
    if tied.any():
        ranks[tied] = stats.rankdata(flat[tied], method="average", axis=1)
    return ranks


def z_scale(x: np.ndarray) -> np.ndarray:
    """Rank-normalize each quantity over all its chains and draws (Blom's offset 3/8)."""
    flat = x.reshape(x.shape[0], -1)
    rank = _average_ranks(flat)
    return special.ndtri((rank - 3 / 8) / (flat.shape[1] - 2 * 3 / 8 + 1)).reshape(x.shape)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    size = sp_fft.next_fast_len(2 * n)
    centred = x - x.mean(axis=-1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=size, axis=-1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=size, axis=-1)[..., :n] / n


def ess(x: np.ndarray) -> np.ndarray:
    """Effective sample size of each quantity of (m, c, n) chains, as ArviZ's ``_ess`` (no splitting here)."""
    m, chains, n = x.shape
    total = chains * n
    acov = _autocovariance(x)
    mean_var = acov[:, :, 0].mean(axis=1) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus = var_plus + x.mean(axis=2).var(axis=1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = 1.0 - (mean_var[:, None] - acov.mean(axis=1)) / var_plus[:, None]
    rho[:, 0] = 1.0
    n_pairs = n // 2
    pairs = rho[:, : 2 * n_pairs].reshape(m, n_pairs, 2).sum(axis=2)  # P_j, j = 0 .. n_pairs - 1
    last_pair = int(np.ceil((n - 2) / 2)) - 1  # the loop's bound: pairs j with 2j - 1 < n - 3
    rows = np.arange(m)
    if last_pair >= 1:
        non_positive = pairs[:, 1 : last_pair + 1] <= 0
        first = np.where(non_positive.any(axis=1), np.argmax(non_positive, axis=1) + 1, last_pair)
    else:
        first = np.zeros(m, dtype=int)
    stop = np.where(pairs[:, 0] > 0, first, 0)  # j*: the last pair Geyer's loop computed
    # pairs 0 .. j*-1 enter made non-increasing (pair 0 is never changed)
    monotone = np.minimum.accumulate(pairs, axis=1)
    kept = np.cumsum(monotone, axis=1)
    summed = np.where(stop >= 1, kept[rows, np.maximum(stop - 1, 0)], 0.0)
    even = rho[rows, 2 * stop]
    last_even = np.where(stop == 0, 1.0, np.where((pairs[rows, stop] >= 0) | (even > 0), even, 0.0))
    tau = np.maximum(-1.0 + 2.0 * summed + last_even, 1 / np.log10(total))
    out = total / tau
    constant = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) < np.finfo(float).resolution
    out = np.where(constant, float(x[0].size), out)
    return np.where(np.isnan(x).any(axis=(1, 2)) | np.isnan(rho).any(axis=1) & ~constant, np.nan, out)


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """Bulk ESS: the ESS of the rank-normalized split chains."""
    return ess(z_scale(split_chains(x)))


def ess_mean(x: np.ndarray) -> np.ndarray:
    """ESS for the mean: the ESS of the split chains."""
    return ess(split_chains(x))


def ess_tail(x: np.ndarray, probabilities: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """Tail ESS: the smaller ESS of the indicators x <= q of the 5% and 95% quantiles q (R's type-7 quantiles)."""
    flat = x.reshape(x.shape[0], -1)
    values = [
        ess(split_chains((x <= np.quantile(flat, p, axis=1)[:, None, None]).astype(float))) for p in probabilities
    ]
    return np.minimum(*values)


def _rhat(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    between = n * x.mean(axis=2).var(axis=1, ddof=1)
    within = x.var(axis=2, ddof=1).mean(axis=1)
    return np.sqrt((between / within + n - 1) / n)


def _rhat_from(split: np.ndarray, z_split: np.ndarray) -> np.ndarray:
    folded = np.abs(split - np.median(split.reshape(split.shape[0], -1), axis=1)[:, None, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.maximum(_rhat(z_split), _rhat(z_scale(folded)))
    return value if split.shape[1] >= 4 and split.shape[2] >= 2 else np.full(split.shape[0], np.nan)


def rhat(x: np.ndarray) -> np.ndarray:
    """Rank-normalized split R-hat: the larger of the bulk and the folded (tail) R-hat (NaN for one chain)."""
    split = split_chains(x)
    return _rhat_from(split, z_scale(split))


def mcse_mean(x: np.ndarray) -> np.ndarray:
    """Monte Carlo standard error of the posterior mean: sd / sqrt(ESS_mean)."""
    sd = x.reshape(x.shape[0], -1).std(axis=1, ddof=1)
    return sd / np.sqrt(ess_mean(x))


def mcse_sd(x: np.ndarray) -> np.ndarray:
    """Monte Carlo standard error of the posterior sd (ArviZ's ``mcse(method="sd")``, vectorized).

    The delta method on the variance: with d = (x - mean)^2, Var(mean(d)) ~ Var(d) / ESS_mean(d)
    and sd = sqrt(mean(d)), so MCSE(sd) = sqrt(Var(d) / ESS_mean(d) / (4 mean(d))).  Not
    sd / sqrt(2 ESS_bulk): NUTS draws are often antithetic for means (bulk ESS above the draws)
    but not for second moments.  NaN for a constant column.
    """
    flat = x.reshape(x.shape[0], -1)
    squared = (x - flat.mean(axis=1)[:, None, None]) ** 2
    mean_squared = squared.reshape(x.shape[0], -1).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_of_mean = ((squared**2).reshape(x.shape[0], -1).mean(axis=1) - mean_squared**2) / ess_mean(squared)
        return np.sqrt(var_of_mean / mean_squared / 4)


def mcse_sd_by_column(draws: np.ndarray) -> np.ndarray:
    """:func:`mcse_sd` of each column of (chain, draw, m) draws, the layout of the posterior tables' draws."""
    return mcse_sd(np.moveaxis(draws, -1, 0))


def diagnose(x: np.ndarray) -> dict[str, np.ndarray]:
    """``mcse_mean``, ``ess_bulk`` and ``r_hat`` of (m, c, n) draws, sharing the rank normalization."""
    split = split_chains(x)
    z_split = z_scale(split)
    sd = x.reshape(x.shape[0], -1).std(axis=1, ddof=1)
    return {"mcse_mean": sd / np.sqrt(ess(split)), "ess_bulk": ess(z_split), "r_hat": _rhat_from(split, z_split)}
