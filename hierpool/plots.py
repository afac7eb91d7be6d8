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
