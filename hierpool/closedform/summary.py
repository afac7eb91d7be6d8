"""lme4-style printed summary of a closed-form fit."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _varcorr_block(result) -> list[str]:
    rows = []
    for term, cov in zip(result.design.terms, result.term_covariances()):
        sd = np.sqrt(np.diag(cov))
        for i, name in enumerate(term.coef_names):
            corr = []
            for j in range(i):
                denom = sd[i] * sd[j]
                corr.append(f"{cov[i, j] / denom:5.2f}" if denom > 0 else "  NaN")
            rows.append((term.group if i == 0 else "", name, f"{cov[i, i]:.4g}", f"{sd[i]:.4g}", " ".join(corr)))
    if not result.design.sigma_known:
        rows.append(("Residual", "", f"{result.sigma**2:.4g}", f"{result.sigma:.4g}", ""))
    frame = pd.DataFrame(rows, columns=["Groups", "Name", "Variance", "Std.Dev.", "Corr"])
    if not frame["Corr"].str.strip().any():
        frame = frame.drop(columns="Corr")
    return [" " + line for line in frame.to_string(index=False).splitlines()]


def format_summary(result) -> str:
    """The text lme4's ``summary(fit)`` prints, for a hierpool fit."""
    design = result.design
    method = "REML" if result.reml else "maximum likelihood"
    lines = [f"Linear mixed model fit by {method} (hierpool)", f"Formula: {design.spec.formula}", ""]
    label = "REML criterion" if result.reml else "deviance"
    lines.append(f"{label} at convergence: {result.objective:.4f}")
    lines.append(f"AIC {result.aic:.2f}  BIC {result.bic:.2f}  logLik {result.loglik:.2f}")
    lines.append("")
    scaled = result.residuals / result.sigma
    if design.weights is not None:
        scaled = scaled * np.sqrt(design.weights)
    quantiles = np.quantile(scaled, [0, 0.25, 0.5, 0.75, 1])
    lines.append("Scaled residuals:")
    lines.append("    Min      1Q  Median      3Q     Max")
    lines.append(" ".join(f"{v:7.4f}" for v in quantiles))
    lines.append("")
    lines.append("Random effects:")
    lines.extend(_varcorr_block(result))
    groups = ", ".join(f"{t.group}, {t.n_levels}" for t in design.terms)
    lines.append(f"Number of obs: {design.n}, groups:  {groups}")
    lines.append("")
    fixef = pd.DataFrame(
        {"Estimate": result.fixef, "Std. Error": result.fixef_se, "t value": result.fixef / result.fixef_se}
    )
    lines.append("Fixed effects:")
    lines.append(fixef.to_string(float_format=lambda v: f"{v:.4f}"))
    for message in result.messages:
        lines.append(f"\nNote: {message}")
    return "\n".join(lines)
