"""Likelihood-ratio tests between nested fits: lme4's ``anova(m0, m1, ...)``.

Each fit's maximized log-likelihood, its parameters (fixed effects, variance parameters, sigma, a correlation's
phi, a negative binomial's shape) and their AIC and BIC; between consecutive fits, ordered by their number of
parameters, the likelihood-ratio statistic 2 (log L_1 - log L_0) and its chi-square p-value on the difference in
parameters (Pinheiro & Bates 2000, sec. 2.4.1; a variance on its boundary makes that test conservative, Self & Liang
1987).  As lme4's ``anova`` (``refit = TRUE``), a model fitted by REML is refitted by maximum likelihood first: REML
criteria of models with other fixed effects are not comparable; ``refit=False`` compares REML fits of the same fixed
effects as they are, as nlme's ``anova`` does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ArgumentError, boolean_argument
from .ar1 import AR1Result, fit_ar1
from .glmm_results import GLMMResult
from .gls import GLSResult, fit_gls
from .model import MixedModel
from .results import LMMResult


def _maximum_likelihood(fit):
    """``fit``, or its refit by maximum likelihood where it was fitted by REML (lme4's ``refit = TRUE``), by the
    engine that fitted it, on its design (and series, relationship matrix, graph)."""
    if isinstance(fit, GLMMResult) or not getattr(fit, "reml", False):
        return fit
    if isinstance(fit, AR1Result):
        return fit_ar1(fit.design, fit.structure, fit.series_data, reml=False)
    if isinstance(fit, LMMResult):
        return MixedModel.of_design(fit.design).fit(reml=False)
    if isinstance(fit, GLSResult):
        return fit_gls(fit.design, fit.structure, fit.series_data, reml=False)
    if type(fit).__name__ == "RelmatResult":  # (SciPy's sparse modules: imported only for these models)
        from .relmat import fit_relmat

        return fit_relmat(fit.design, fit.relationship, reml=False)
    if type(fit).__name__ == "SpatialFit":
        from .spatial import fit_spatial

        return fit_spatial(fit.sdesign, reml=False, stages=fit.stages)
    raise ArgumentError(f"anova compares maximized likelihoods: fit the {type(fit).__name__} with reml=False (a "
                        "REML criterion is not comparable across fixed effects)")


def _as_fitted(fits, names):
    """The fits themselves (``refit=False``: nlme's comparison of REML fits): all fitted by REML or all by maximum
    likelihood, and REML fits only with the same fixed effects (their criteria integrate beta out: of other X, the
    criteria are of other data)."""
    reml = [bool(getattr(fit, "reml", False)) for fit in fits]
    if any(reml) and not all(reml):
        which = [name for name, r in zip(names, reml) if r]
        raise ArgumentError(f"refit=False compares the fits as fitted, but {which} were fitted by REML and the others "
                            "by maximum likelihood: refit=True (the default) refits them by maximum likelihood")
    if all(reml):
        first = fits[0].design
        for name, fit in zip(names[1:], fits[1:]):
            design = fit.design
            if list(design.fixed_names) != list(first.fixed_names) or not np.allclose(design.X, first.X):
                raise ArgumentError(f"refit=False compares REML criteria, which are not comparable across fixed "
                                    f"effects: {name}'s {list(design.fixed_names)} are not {names[0]}'s "
                                    f"{list(first.fixed_names)} (refit=True refits by maximum likelihood)")
    return list(fits)


def _data_difference(design, first) -> str:
    """What differs between two fits' data ("" where nothing does): their rows, their response (as the family reads
    it), their prior weights, or their response's distribution (a Gaussian model's density against a discrete
    family's probabilities; two discrete families, Poisson against negative binomial, and two links compare, as in
    lme4)."""
    if design.n != first.n:
        return f"{design.n} rows against {first.n}"
    if not design.rows.equals(first.rows):
        return "other rows (their labels differ)"
    family, first_family = (d.family.name if d.family is not None else "gaussian" for d in (design, first))
    if (family == "gaussian") != (first_family == "gaussian"):  # (two count families compare: Poisson against NB)
        return f"family {family} against {first_family}"
    if not np.array_equal(design.y, first.y):
        return "another response"
    if not np.array_equal(design.row_weights, first.row_weights):
        return "other weights"
    return ""


def anova(*fits, names=None, refit: bool = True) -> pd.DataFrame:
    """Likelihood-ratio tests of nested mixed models fitted to the same rows (lme4's ``anova(m0, m1)``).

    Parameters
    ----------
    *fits : LMMResult, GLMMResult or another fit with a log-likelihood
        Two or more fits of one response on the same rows.  A fit by REML (a linear mixed model, with AR(1)
        residuals or without random effects, with a relationship matrix, with spatial terms) is refitted by maximum
        likelihood by the engine that fitted it (lme4's ``refit = TRUE``).
    names : list of str, optional
        The rows' names (default ``"model 1"``, ``"model 2"``... in the order given).
    refit : bool
        False: compare the fits as fitted (lme4's ``refit = FALSE``; nlme's ``anova`` of REML fits, which compares
        variance structures): REML fits then need the same fixed effects, and are not mixed with ML fits.  A REML
        fit's BIC here takes log N where nlme's takes log(N - p).

    Returns
    -------
    pandas.DataFrame
        One row per fit, ordered by its number of parameters: npar, AIC, BIC, logLik, deviance (-2 logLik), and from
        the second row on Chisq = 2 max(0, logLik - the row above's), Df (the difference in npar) and Pr(>Chisq), its
        chi-square upper tail (NaN where Df is 0).  The test assumes each model nests the one above it; it does not
        check that.
    """
    from scipy.stats import chi2

    if len(fits) < 2:
        raise ArgumentError(f"anova compares two or more fits, got {len(fits)}")
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise ArgumentError(f"names must be a list of strings, one per fit, got {names!r}")  # ("ab": a and b)
    names = [f"model {i + 1}" for i in range(len(fits))] if names is None else list(names)
    if len(names) != len(fits):
        raise ArgumentError(f"names has {len(names)} entries for {len(fits)} fits")
    if len(set(names)) != len(names):
        raise ArgumentError(f"names must differ from one another, got {names}")
    for fit in fits:
        if not all(hasattr(fit, name) for name in ("loglik", "aic", "bic", "design")):
            raise ArgumentError(f"anova takes fitted models with a log-likelihood, got {type(fit).__name__}")
    first = fits[0].design
    for name, fit in zip(names[1:], fits[1:]):
        difference = _data_difference(fit.design, first)
        if difference:
            raise ArgumentError(f"{name} was not fitted to the same data as {names[0]}: {difference}; likelihoods of "
                                "other data, or of another family's distribution, are not comparable")
    ml = [_maximum_likelihood(fit) for fit in fits] if boolean_argument("refit", refit) else _as_fitted(fits, names)
    table = pd.DataFrame({"npar": [int(fit.n_params) for fit in ml],
                          "AIC": [float(fit.aic) for fit in ml], "BIC": [float(fit.bic) for fit in ml],
                          "logLik": [float(fit.loglik) for fit in ml]}, index=pd.Index(names, name="model"))
    table["deviance"] = -2.0 * table["logLik"]
    table = table.sort_values("npar", kind="stable")
    chisq = 2.0 * table["logLik"].diff()
    df = table["npar"].diff()
    table["Chisq"] = chisq.clip(lower=0.0)  # lme4's 2 pmax(0, diff(logLik)): a larger model fitting worse shows 0
    table["Df"] = df
    with np.errstate(invalid="ignore"):
        table["Pr(>Chisq)"] = np.where(df > 0, chi2.sf(chisq.clip(lower=0.0), df.where(df > 0, 1.0)), np.nan)
    return table
