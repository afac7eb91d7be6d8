"""Figures (matplotlib): each function returns a Figure and does not show it."""

from __future__ import annotations

import numpy as np


def _figure(ncols: int, width: float = 4.6, height: float = 4.2):
    # a bare Figure (no pyplot): no GUI backend needed, nothing kept alive by pyplot's registry;
    # Jupyter displays it, fig.savefig writes it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, ncols))


def _identity_line(ax, values) -> None:
    low, high = np.nanmin(values), np.nanmax(values)
    pad = 0.05 * (high - low if high > low else 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.6", lw=1, zorder=0)


def agreement_figure(report):
    """Posterior mean vs BLUP with 2-sd error bars; posterior sd vs joint sd (and lme4's condsd)."""
    table = report.table[report.table.effect == "ranef"]
    fig, (left, right) = _figure(2)
    left.errorbar(table.blup, table.post_mean, yerr=2 * table.post_sd, fmt="o", ms=3, lw=0.8, alpha=0.8)
    _identity_line(left, np.concatenate([table.blup, table.post_mean]))
    left.set(xlabel="BLUP (closed form)", ylabel="posterior mean (error bar: 2 posterior sd)",
             title=f"random effects, {report.mode} mode")
    right.scatter(table.joint_sd, table.post_sd, s=12, label="vs joint sd (C$^{-1}$, includes $\\hat\\beta$)")
    right.scatter(table.condsd, table.post_sd, s=12, marker="x", label="vs lme4 condsd ($\\beta$ fixed)")
    _identity_line(right, np.concatenate([table.joint_sd, table.condsd, table.post_sd]))
    right.set(xlabel="closed-form sd", ylabel="posterior sd", title="uncertainty")
    right.legend(frameon=False, fontsize=8)
    return fig


def sbc_figure(result, bins: int = 10):
    """Rank histograms (with a 99% binomial band per bin) and ECDF - uniform with the simultaneous band."""
    import scipy.stats

    names = list(result.ranks.columns)
    fig, axes = _figure(2, width=5.2)
    hist, ecdf_ax = axes
    n_reps, n_draws = len(result.ranks), result.n_draws
    low, high = scipy.stats.binom.ppf([0.005, 0.995], n_reps, 1 / bins)
    hist.axhspan(low, high, color="0.9", zorder=0, label="99% band per bin")
    grid = np.arange(1, n_draws + 2) / (n_draws + 1)
    for name in names:
        values = result.ranks[name].to_numpy()
        counts = np.bincount((values * bins) // (n_draws + 1), minlength=bins)
        hist.plot(np.arange(bins) + 0.5, counts, marker="o", ms=3, lw=1, label=name)
        ecdf = np.cumsum(np.bincount(values, minlength=n_draws + 1)) / n_reps
        ecdf_ax.step(grid, ecdf - grid, where="post", lw=1)
    band = float(result.tests.ecdf_band.iloc[0])
    ecdf_ax.fill_between([0, 1], -band, band, color="0.9", zorder=0)
    hist.set(xlabel="rank bin", ylabel="replications", title=f"SBC rank histograms ({n_reps} replications)")
    hist.legend(frameon=False, fontsize=7, ncol=2)
    ecdf_ax.set(xlabel="normalized rank", ylabel="ECDF - uniform",
                title=f"ECDF difference, {1 - result.alpha:.0%} simultaneous band")
    return fig
