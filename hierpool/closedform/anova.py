"""Likelihood-ratio tests between nested fits: lme4's ``anova(m0, m1, ...)``.

Each fit's maximized log-likelihood, its parameters (fixed effects, variance parameters, sigma, a correlation's
phi, a negative binomial's shape) and their AIC and BIC; between consecutive fits, ordered by their number of
parameters, the likelihood-ratio statistic 2 (log L_1 - log L_0) and its chi-square p-value on the difference in
parameters (Pinheiro & Bates 2000, sec. 2.4.1; a variance on its boundary makes that test conservative, Self & Liang
1987).  As lme4's ``anova`` (``refit = TRUE``), a linear mixed model fitted by REML is refitted by maximum
likelihood first: REML criteria of models with other fixed effects are not comparable.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ArgumentError
from .ar1 import AR1Result
from .glmm_results import GLMMResult
from .model import MixedModel
from .results import LMMResult


def _maximum_likelihood(fit):
    """``fit``, or its refit by maximum likelihood where it is a linear mixed model fitted by REML."""
    if isinstance(fit, GLMMResult) or not getattr(fit, "reml", False):
        return fit
    if isinstance(fit, LMMResult) and not isinstance(fit, AR1Result):
        return MixedModel.of_design(fit.design).fit(reml=False)
    raise ArgumentError(f"anova compares maximized likelihoods: fit the {type(fit).__name__} with reml=False (a "
                        "REML criterion is not comparable across fixed effects)")


def _parameters(fit) -> int:
    count = getattr(fit, "n_params", None)
    return int(fit.n_parameters if count is None else count)


def anova(*fits, names=None) -> pd.DataFrame:
    """Likelihood-ratio tests of nested mixed models fitted to the same rows (lme4's ``anova(m0, m1)``).

    Parameters
    ----------
    *fits : LMMResult, GLMMResult or another fit with a log-likelihood
        Two or more fits of one response on the same rows.  A linear mixed model fitted by REML is refitted by
        maximum likelihood (lme4's ``refit = TRUE``); another REML fit (AR(1) residuals, a relationship matrix,
        spatial terms) is refused: fit it with ``reml=False``.
    names : list of str, optional
        The rows' names (default ``"model 1"``, ``"model 2"``... in the order given).

    Returns
    -------
    pandas.DataFrame
        One row per fit, ordered by its number of parameters: npar, AIC, BIC, logLik, deviance (-2 logLik), and from
        the second row on Chisq = 2 (logLik - the row above's), Df (the difference in npar) and Pr(>Chisq), its
        chi-square upper tail.  The test assumes each model nests the one above it; it does not check that.
    """
    from scipy.stats import chi2

    if len(fits) < 2:
        raise ArgumentError(f"anova compares two or more fits, got {len(fits)}")
    names = [f"model {i + 1}" for i in range(len(fits))] if names is None else [str(n) for n in names]
    if len(names) != len(fits):
        raise ArgumentError(f"names has {len(names)} entries for {len(fits)} fits")
    for fit in fits:
        if not all(hasattr(fit, name) for name in ("loglik", "aic", "bic", "design")):
            raise ArgumentError(f"anova takes fitted models with a log-likelihood, got {type(fit).__name__}")
    first = fits[0].design
    for name, fit in zip(names[1:], fits[1:]):
        design = fit.design
        if (design.n != first.n or not design.rows.equals(first.rows) or not np.array_equal(design.y, first.y)
                or not np.array_equal(design.row_weights, first.row_weights)):
            raise ArgumentError(f"{name} was not fitted to the same rows, response and weights as {names[0]} "
                                f"({design.n} rows against {first.n}): likelihoods of other data are not comparable")
    ml = [_maximum_likelihood(fit) for fit in fits]
    table = pd.DataFrame({"npar": [_parameters(fit) for fit in ml],
                          "AIC": [float(fit.aic) for fit in ml], "BIC": [float(fit.bic) for fit in ml],
                          "logLik": [float(fit.loglik) for fit in ml]}, index=pd.Index(names, name="model"))
    table["deviance"] = -2.0 * table["logLik"]
    table = table.sort_values("npar", kind="stable")
    chisq = 2.0 * table["logLik"].diff()
    df = table["npar"].diff()
    table["Chisq"] = chisq
    table["Df"] = df
    with np.errstate(invalid="ignore"):
        table["Pr(>Chisq)"] = np.where(df > 0, chi2.sf(chisq.clip(lower=0.0), df.where(df > 0, 1.0)), np.nan)
    return table
