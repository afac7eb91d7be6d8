"""lme4-style printed summary of a closed-form fit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..algebra.varcorr import coef_pairs


def _varcorr_block(result) -> list[str]:
    """lme4's printed "Random effects" block, a layout of ``result.varcorr`` (:func:`~hierpool.algebra.varcorr.varcorr_table`).

    Each term's k variance rows print with their sds and the correlations with the
    coefficients before them (row i: rho_i0 ... rho_i,i-1), read from the term's pair rows.
    """
    table = result.varcorr
    rows, start = [], 0
    for term in result.design.terms:
        k = term.k
        block = table.iloc[start : start + k + k * (k - 1) // 2]
        start += len(block)
        corr_of = {(a, c): value for (a, c), value in zip(coef_pairs(k), block.sdcor.to_numpy()[k:])}
        for i, name in enumerate(term.coef_names):
            corr = [f"{corr_of[j, i]:5.2f}" if not np.isnan(corr_of[j, i]) else "  NaN" for j in range(i)]
            variance, sd = block.vcov.iloc[i], block.sdcor.iloc[i]
            rows.append((term.group if i == 0 else "", name, f"{variance:.4g}", f"{sd:.4g}", " ".join(corr)))
    for residual in table.iloc[start:].itertuples():  # the Residual row, unless residual sds were known
        if residual.var1 == "phi":  # an AR(1) phi: printed with its structure below the table
            continue
        rows.append((residual.grp, "", f"{residual.vcov:.4g}", f"{residual.sdcor:.4g}", ""))
    frame = pd.DataFrame(rows, columns=["Groups", "Name", "Variance", "Std.Dev.", "Corr"])
    if not frame["Corr"].str.strip().any():
        frame = frame.drop(columns="Corr")
    return [" " + line for line in frame.to_string(index=False).splitlines()]


def _residuals_and_random_effects(result, scaled_residuals) -> list[str]:
    """The "Scaled residuals" quantiles, the "Random effects" block and the counts, as lme4 prints them."""
    quantiles = np.quantile(scaled_residuals, [0, 0.25, 0.5, 0.75, 1])
    groups = ", ".join(f"{t.group}, {t.n_levels}" for t in result.design.terms)
    return ["Scaled residuals:", "    Min      1Q  Median      3Q     Max", " ".join(f"{v:7.4f}" for v in quantiles),
            "", "Random effects:", *_varcorr_block(result), f"Number of obs: {result.design.n}, groups:  {groups}", ""]


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
    lines.extend(_residuals_and_random_effects(result, scaled))
    fixef = pd.DataFrame(
        {"Estimate": result.fixef, "Std. Error": result.fixef_se, "t value": result.fixef / result.fixef_se}
    )
    lines.append("Fixed effects:")
    lines.append(fixef.to_string(float_format=lambda v: f"{v:.4f}"))
    for message in result.messages:
        lines.append(f"\nNote: {message}")
    return "\n".join(lines)


def format_glmm_summary(result) -> str:
    """The text lme4's ``summary(glmer(...))`` prints, for a :class:`~hierpool.closedform.glmm_results.GLMMResult`.

    z tests of the fixed effects use the SEs of :attr:`~hierpool.closedform.glmm_results.GLMMResult.fixef_se`
    (normal p-values, as glmer's); "Scaled residuals" are Pearson residuals at the conditional modes.
    """
    from .predict import normal_two_sided_p

    design, family = result.design, result.family
    method = ("Laplace Approximation" if result.nodes == 1 and result.stages == 2 else
              f"Adaptive Gauss-Hermite Quadrature, nAGQ = {result.nodes}" if result.stages == 2 else
              "the joint mode of beta and u, nAGQ = 0")
    name = family.name if family.shape is None else f"Negative Binomial({family.shape:.4g})"
    lines = [f"Generalized linear mixed model fit by maximum likelihood ({method}) (hierpool)",
             f" Family: {name}  ( {family.link.name} )", f"Formula: {design.spec.formula}", ""]
    frame = pd.DataFrame({"AIC": [result.aic], "BIC": [result.bic], "logLik": [result.loglik],
                          "deviance": [-2.0 * result.loglik], "df.resid": [design.n - result.n_params]})
    lines.extend(frame.to_string(index=False, float_format=lambda v: f"{v:.1f}").splitlines())
    lines.append("")
    mu = result.optimum.mode.mu
    pearson = (design.y - mu) / np.sqrt(family.variance(mu) / design.row_weights)
    lines.extend(_residuals_and_random_effects(result, pearson))
    z = result.fixef / result.fixef_se
    fixef = pd.DataFrame({"Estimate": result.fixef, "Std. Error": result.fixef_se, "z value": z,
                          "Pr(>|z|)": [normal_two_sided_p(v) for v in z]})
    lines.append("Fixed effects:")
    lines.append(fixef.to_string(formatters={"Pr(>|z|)": lambda v: f"{v:.3g}"}, float_format=lambda v: f"{v:.4f}"))
    if result.is_singular:
        lines.append("\nNote: boundary (singular) fit: some variance component is (near) zero")
    return "\n".join(lines)
