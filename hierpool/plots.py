"""Figures (matplotlib): each function returns a Figure and does not show it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import ArgumentError


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
                # the band the test uses: each parameter's at 1 - alpha / (2 m), Bonferroni over the m parameters'
                # two tests, so that the whole check holds at 1 - alpha (validate.sbc._uniformity)
                title=f"ECDF difference, band of the {1 - result.alpha:.0%} check (Bonferroni)")
    return fig


# --- pooling and shrinkage -----------------------------------------------------------------
_BLUP_COLOR, _POST_COLOR, _RAW_COLOR = "C0", "C1", "0.45"


def _point_sizes(n: np.ndarray) -> np.ndarray:
    return 8 + 60 * np.sqrt(n / max(n.max(), 1))


def _partial(comparison) -> tuple[str, str]:
    """(the table's partial-pooling column, its label): the BLUP of an LMM, the conditional mode of a GLMM."""
    return getattr(comparison, "partial", "blup"), getattr(comparison, "partial_label", "BLUP")


def _on_scale(comparison, term: str) -> str:
    scale = getattr(comparison, "scale", None)
    return term if scale is None else f"{term} ({scale} scale)"


def _group_size(rows):
    """(sizes, what they count): a binomial GLMM's trials per group, else its rows."""
    if "trials" in rows:
        return rows["trials"].to_numpy(), "trials"
    return rows["n"].to_numpy(), "observations"


def _population_marks(ax, rows, positions, label=None) -> None:
    """The population line's value: one dashed line where every group shares it, else a mark at each group's own
    (group-level predictors: the table's ``population`` column varies)."""
    population = rows["population"].to_numpy()
    if np.all(population == population[0]):
        ax.axvline(population[0], color="C3", ls="--", lw=1, label=label)
    else:
        ax.scatter(population, positions, marker="|", s=80, color="C3", zorder=4,
                   label=None if label is None else f"{label} (each group's)")


def shrinkage_axes(ax, comparison, term: str) -> None:
    """No-pooling estimates (top) with arrows to the partial-pooling ones (bottom), sized by n (a binomial's trials).

    A GLMM's no-pooling estimates that carry the 0.5 correction (``no_pooling_status``) are open circles.
    """
    column, label = _partial(comparison)
    rows = comparison.table[comparison.table.term == term]
    n, counted = _group_size(rows)
    raw, blup = rows["no_pooling"].to_numpy(), rows[column].to_numpy()
    size = _point_sizes(n)
    has_raw = np.isfinite(raw)
    corrected = (rows["no_pooling_status"].to_numpy() == "corrected") if "no_pooling_status" in rows else \
        np.zeros(len(rows), dtype=bool)
    for x0, x1 in zip(raw[has_raw], blup[has_raw]):
        ax.annotate("", xy=(x1, 0.04), xytext=(x0, 0.96),
                    arrowprops=dict(arrowstyle="->", color="0.6", lw=0.7, shrinkA=2, shrinkB=2))
    plain = has_raw & ~corrected
    ax.scatter(raw[plain], np.ones(plain.sum()), s=size[plain], color=_RAW_COLOR, alpha=0.7, zorder=3)
    if corrected.any():
        ax.scatter(raw[corrected], np.ones(corrected.sum()), s=size[corrected], facecolors="none",
                   edgecolors=_RAW_COLOR, zorder=3, label="0.5-corrected (no events, or all)")
    ax.scatter(blup, np.zeros(len(blup)), s=size, color=_BLUP_COLOR, alpha=0.7, zorder=3)
    _population_marks(ax, rows, np.zeros(len(rows)), label="population estimate")
    ax.set_yticks([0, 1], [f"partial pooling\n({label})", "no pooling"])
    ax.set_ylim(-0.35, 1.35)
    size_note = "n" if counted == "observations" else counted
    ax.set(xlabel=f"{_on_scale(comparison, term)} (one estimate per {comparison.block.group})",
           title=f"Shrinkage toward the population (size: {size_note})")
    ax.legend(frameon=False, fontsize=8, loc="upper right")


def caterpillar_axes(ax, comparison, term: str) -> None:
    """Each group's BLUP and posterior interval, sorted by BLUP, with the truth when known."""
    from .closedform.predict import normal_quantile

    column, label = _partial(comparison)
    rows = comparison.table[comparison.table.term == term].sort_values(column)
    position = np.arange(len(rows))
    z = normal_quantile(comparison.level)
    offset = 0.18 if "post_mean" in rows else 0.0
    ax.errorbar(rows[column], position - offset, xerr=z * rows[f"{column}_sd"], fmt="o", ms=2.5, lw=0.8,
                color=_BLUP_COLOR, label=f"{label} ± {z:.2f} sd")
    if "post_mean" in rows:
        ax.errorbar(rows["post_mean"], position + offset,
                    xerr=[rows["post_mean"] - rows["post_lower"], rows["post_upper"] - rows["post_mean"]],
                    fmt="o", ms=2.5, lw=0.8, color=_POST_COLOR, label=f"posterior {comparison.level:.0%} interval")
    if "truth" in rows:
        ax.scatter(rows["truth"], position, marker="x", s=14, color="k", zorder=4, label="truth")
    _population_marks(ax, rows, position)
    ax.set_yticks(position, rows["grp"].astype(str), fontsize=max(4, min(8, 400 / max(len(rows), 1))))
    ax.set(xlabel=_on_scale(comparison, term), ylabel=comparison.block.group,
           title="Partial-pooling estimates with intervals")
    ax.legend(frameon=False, fontsize=8, loc="lower right")


def weight_axes(ax, comparison, term: str) -> None:
    """Shrinkage weight against group size; the curve n sigma_b^2 / (n sigma_b^2 + sigma^2) for a scalar term.

    A GLMM's weight counts PIRLS's working weights at the mode, not n: no curve, and a binomial's
    groups are placed by their trials.
    """
    rows = comparison.table[comparison.table.term == term]
    n, counted = _group_size(rows)
    ax.scatter(n, rows["weight"], s=14, color=_BLUP_COLOR, alpha=0.7, zorder=3, label="groups")
    fit, block = comparison.fit, comparison.block
    scalar = block.k == 1 and fit.design.weights is None and getattr(fit.design, "family", None) is None
    if scalar:
        var_b = fit.term_covariances()[block.indices[0]][0, 0]
        grid = np.geomspace(0.8, rows["n"].max() * 1.25, 200)
        ax.plot(grid, grid * var_b / (grid * var_b + fit.sigma**2), color="0.4", lw=1,
                label=r"$n\sigma_b^2/(n\sigma_b^2+\sigma^2)$")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set(xlabel=f"{counted} per {block.group}" + (" (n)" if counted == "observations" else ""),
           ylabel=f"weight on the group's own data ({term})",
           title="How much each group keeps of its own estimate")
    ax.legend(frameon=False, fontsize=8, loc="lower right")


def pooling_figure(comparison, kind: str, term: str):
    """The figure of :meth:`hierpool.pooling_comparison.PoolingComparison.plot`."""
    from matplotlib.figure import Figure

    draw = {"shrinkage": shrinkage_axes, "caterpillar": caterpillar_axes, "weight": weight_axes}
    kinds = list(draw) if kind == "all" else [kind]
    n_groups = len(comparison.block.levels)
    tall = max(4.2, 0.13 * n_groups) if "caterpillar" in kinds else 4.2
    fig = Figure(figsize=(5.0 * len(kinds), tall), layout="constrained")
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(kinds))), kinds):
        draw[name](ax, comparison, term)
    return fig


def ridge_path_figure(view, term: str | None = None, group: str | None = None):
    """Each group's coefficient as the ridge penalty is scaled by t; the BLUPs sit at t = 1."""
    path = view.path
    group = path["grpvar"].iloc[0] if group is None else group
    if group not in set(path["grpvar"]):
        raise ArgumentError(f"group={group!r} is not a grouping factor of the fit: {list(pd.unique(path['grpvar']))}")
    part = path[path.grpvar == group]
    term = part["term"].iloc[0] if term is None else term
    if term not in set(part["term"]):
        raise ArgumentError(f"term={term!r} is not a coefficient of {group!r}'s terms: {list(pd.unique(part['term']))}")
    part = part[part.term == term]
    fig, (ax,) = _figure(1, width=6.4)
    for _, one in part.groupby("grp", sort=False):
        ax.plot(one["multiplier"], one["coefficient"], color="0.55", lw=0.7, alpha=0.8)
    at_one = part[part.multiplier == 1.0]
    ax.scatter(at_one["multiplier"], at_one["coefficient"], s=14, color=_BLUP_COLOR, zorder=3, label="BLUP (t = 1)")
    ax.axvline(1.0, color=_BLUP_COLOR, lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel=r"penalty multiplier t  (penalty $t\,\sigma^2\Sigma^{-1}$)", ylabel=f"{term} of each {group}",
           title="BLUPs on the ridge path: no pooling (t→0) to complete pooling (t→∞)")
    ax.legend(frameon=False, fontsize=8)
    return fig


# --- maps of areas (disease mapping) ------------------------------------------------------------


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _area_patches(shapes: list):
    """One matplotlib path per area (its polygons, holes cut out), from each area's polygons.

    matplotlib fills by the non-zero winding rule, so every outer ring is drawn counter-clockwise and every hole
    clockwise, whatever their order in the data (GeoJSON asks for that winding, shapely and older files do not
    enforce it); an open ring is closed (its first point appended).
    """
    from matplotlib.path import Path

    from .spec.adjacency import shape_polygons

    paths = []
    for shape in shapes:
        vertices, codes = [], []
        for polygon in shape_polygons(shape):
            for k, ring in enumerate(polygon):
                if not np.array_equal(ring[0], ring[-1]):
                    ring = np.vstack([ring, ring[:1]])
                outer = k == 0
                if (_signed_area(ring) > 0) != outer:  # outer rings counter-clockwise, holes clockwise
                    ring = ring[::-1]
                vertices.append(ring)
                codes.append(np.r_[Path.MOVETO, np.full(len(ring) - 2, Path.LINETO), Path.CLOSEPOLY])
        paths.append(Path(np.concatenate(vertices), np.concatenate(codes).astype(np.uint8)))
    return paths


def area_map_axes(ax, geometry: dict, values, norm=None, cmap: str = "RdBu_r", label: str | None = None):
    """Fill each area's polygons on ``ax`` by its value (a pandas Series indexed by area label); returns the
    collection (for a colour bar).  Areas of ``geometry`` without a value are drawn empty; a value of an area
    without a polygon is refused by name.  Rings are closed (their last point repeats the first, as GeoJSON's)."""
    import pandas as pd
    from matplotlib.collections import PathCollection

    values = pd.Series(values)
    shapes = {str(area): shape for area, shape in geometry.items()}  # labels as strings, as the data's
    labels = list(shapes)
    given = pd.Series(values.to_numpy(dtype=float), index=[str(i) for i in values.index])
    missing = given.index.difference(labels)
    if len(missing):
        from .errors import DataError

        raise DataError(f"areas {list(missing[:5])} have values but no polygon in the geometry")
    shown = given.reindex(labels)
    collection = PathCollection(_area_patches(list(shapes.values())), cmap=cmap, norm=norm, edgecolor="0.3",
                                linewidth=0.3)
    collection.set_array(np.ma.masked_invalid(shown.to_numpy()))
    ax.add_collection(collection)
    ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_axis_off()
    if label:
        ax.set_title(label)
    return collection


def _risk_table(result, term: str | None = None):
    """A spatial fit's per-area relative-risk table (``relative_risk(term=term)``: ``term`` the spatial term's area
    column where the model has several), or None for anything else."""
    table = getattr(result, "relative_risk", None)
    return table(term=term) if callable(table) else None


def risk_map(smoothed, geometry: dict, raw=None, label: str = "relative risk", term: str | None = None):
    """The smoothed relative risk of each area beside its raw standardised incidence ratio, one colour scale.

    ``smoothed``: a spatial fit (``hp.bayes`` or ``hp.glmm`` with ``adjacency=``: its ``relative_risk()`` table's
    posterior mean or mode, with its raw SIR beside it), or a pandas Series of ratios (1 = the expected risk) indexed
    by area label, with ``raw`` the raw ratios (optional).  The scale is
    logarithmic and centred at 1, from the smallest to the largest positive value of both maps (a zero SIR, an area
    with no cases, is drawn at the scale's low end), so that the raw map's extremes, small areas' noise, show
    against the smoothed map's shrinkage.  ``term``: the spatial term's area column, where a fit has several.
    """
    import pandas as pd
    from matplotlib.colors import LogNorm

    table = _risk_table(smoothed, term)
    if table is not None:
        smoothed, raw = table["relative_risk"], table["sir"] if raw is None else raw
    panels = [("smoothed " + label, pd.Series(smoothed))]
    if raw is not None:
        panels.insert(0, ("raw SIR (observed / expected)", pd.Series(raw)))
    positive = np.concatenate([p[1].to_numpy(dtype=float)[p[1].to_numpy(dtype=float) > 0] for p in panels])
    spread = max(np.max(np.abs(np.log(positive))), 1e-3) if positive.size else 1.0
    norm = LogNorm(vmin=np.exp(-spread), vmax=np.exp(spread))
    fig, axes = _figure(len(panels), width=5.0, height=3.2)
    for ax, (title, values) in zip(axes, panels):
        collection = area_map_axes(ax, geometry, values.clip(lower=np.exp(-spread)), norm=norm, label=title)
    bar = fig.colorbar(collection, ax=list(axes), shrink=0.8, label=label)
    _plain_log_ticks(bar.ax.yaxis)
    return fig


def _plain_log_ticks(axis) -> None:
    """Ratios on a log axis as plain numbers (0.5, 1, 2), not powers of ten, and no minor-tick labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def exceedance_map(probabilities, geometry: dict, threshold: float = 1.0, term: str | None = None):
    """Each area's posterior probability that its relative risk exceeds ``threshold`` (P(RR > 1) by default), on a
    fixed 0-1 scale: areas near 1 are confidently above the expected risk, near 0 confidently below, and the
    middle is where the data do not tell.  ``probabilities``: a Bayesian spatial fit (its ``relative_risk(threshold)``
    table's exceedance; ``term`` its spatial term's area column where it has several) or a pandas Series indexed by
    area label."""
    import pandas as pd
    from matplotlib.colors import Normalize

    if callable(getattr(probabilities, "relative_risk", None)):
        if not hasattr(probabilities, "idata"):
            from .errors import ArgumentError

            raise ArgumentError("exceedance probabilities are a posterior's: give an hp.bayes fit")
        probabilities = probabilities.relative_risk(threshold=threshold, term=term)["exceedance"]
    probabilities = pd.Series(probabilities)
    values = probabilities.to_numpy(dtype=float)
    if np.any((values < 0) | (values > 1)):
        from .errors import DataError

        raise DataError("exceedance probabilities must lie between 0 and 1")
    fig, (ax,) = _figure(1, width=5.0, height=3.2)
    collection = area_map_axes(ax, geometry, probabilities, norm=Normalize(0.0, 1.0), cmap="PuOr_r",
                               label=f"P(relative risk > {threshold:g})")
    fig.colorbar(collection, ax=ax, shrink=0.8, label="posterior probability")
    return fig


def shrinkage_map(result, geometry: dict, term: str | None = None):
    """The teaching picture of disease mapping: how far each area's estimate moved from its raw SIR.

    Left, the map of the move log(smoothed RR) - log(raw SIR) (blue: pulled down, red: pulled up; a zero count's
    log SIR taken at half a case); right, raw SIR against smoothed relative risk, each area a point sized by its
    expected count, on log axes with the identity line: the small counties (small points) are pulled far towards
    their neighbours and the state, the large ones stay near their own ratio.  ``result``: a spatial fit
    (``hp.bayes`` or ``hp.glmm`` with ``adjacency=``) of counts with an offset of log expected counts; ``term`` its
    spatial term's area column where it has several.
    """
    from matplotlib.colors import TwoSlopeNorm

    table = _risk_table(result, term)
    if table is None:
        from .errors import ArgumentError

        raise ArgumentError("shrinkage_map draws a spatial fit's relative_risk() table: give hp.bayes or hp.glmm's "
                            "result with adjacency=")
    raw = np.log(np.maximum(table["sir"], 0.5 / table["expected"]))
    move = np.log(table["relative_risk"]) - raw
    fig, (left, right) = _figure(2, width=5.0, height=3.4)
    spread = max(float(np.max(np.abs(move))), 1e-3)
    collection = area_map_axes(left, geometry, move, norm=TwoSlopeNorm(0.0, -spread, spread), cmap="RdBu_r",
                               label="log(smoothed RR) - log(raw SIR)")
    fig.colorbar(collection, ax=left, shrink=0.7)
    right.scatter(np.exp(raw), table["relative_risk"], s=_point_sizes(table["expected"].to_numpy()), alpha=0.6,
                  edgecolor="0.2", linewidth=0.4)
    right.set_xscale("log")
    right.set_yscale("log")
    _plain_log_ticks(right.xaxis)
    _plain_log_ticks(right.yaxis)
    _identity_line(right, np.r_[np.exp(raw), table["relative_risk"]])
    right.axhline(1.0, color="0.6", linewidth=0.6)
    right.set_xlabel("raw SIR (a zero count at half a case)")
    right.set_ylabel("smoothed relative risk")
    right.set_title("shrinkage: point size ~ expected count")
    return fig
