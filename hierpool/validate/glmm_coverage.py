"""Frequentist coverage of a GLMM's intervals, by simulation: conditional modes, the posterior, ``marginal()``.

Each replication draws a data set from a fixed truth, a random-intercept model with a covariate,

    eta_gi = beta_0 + beta_1 x_gi + b_g,   b_g ~ N(0, sd_b^2),
    binomial (logit): y_gi ~ Bernoulli(expit(eta_gi));   poisson (log): y_gi ~ Poisson(exp(eta_gi)),

on a fixed design (half the groups sparse, 2 or 3 rows, half rich), with fresh b_g and fresh
responses, fits it with ``hp.glmm`` (Laplace) and ``hp.bayes`` (default priors), and checks
whether each interval covers its target:

* ``conditional``: the conditional mode +/- z * condsd (lme4's ``ranef(condVar = TRUE)``) around the
  true b_g.  condsd is the sd of the Gaussian approximation of b_g given y at (theta-hat, beta-hat):
  it ignores the uncertainty of both, and the approximation's skewness, so it can fall short where
  groups are sparse;
* ``posterior``: the equal-tailed posterior interval of b_g from ``hp.bayes(..., family=...)``;
* ``marginal``: ``GLMMResult.marginal(newdata)``'s interval for the population-average mean at
  x in {-1, 0, 1} around the true m(x) = E_b[g^-1(beta_0 + beta_1 x + b)], computed by Gauss-Hermite
  quadrature (logit) or in closed form, exp(eta + sd_b^2 / 2) (log).

Coverage is reported per interval, for sparse and rich groups (``marginal``: "population"), with
its Monte-Carlo standard error over replications, as :func:`hierpool.validate.coverage` does (the
intervals of one data set share its estimates, so their hits are correlated).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import special

from ..bayesian import bayes
from ..closedform import glmm
from ..closedform.predict import normal_quantile
from ..errors import ArgumentError, HierpoolError, boolean_argument, integer_argument, seed_argument
from ..spec.arguments import MIN_DRAWS, probability_argument
from ._arguments import generator_argument, replications_argument

#: The study's truth: (beta_0, beta_1) and sd_b per family.
TRUTH = {"binomial": ((-0.5, 0.5), 1.0), "poisson": ((0.5, 0.3), 0.7)}
#: The covariate values whose population-average means ``marginal()`` predicts.
MARGINAL_X = (-1.0, 0.0, 1.0)


def group_sizes(n_groups: int, rich_size: int) -> np.ndarray:
    """The fixed design's rows per group: the first half 2 or 3 rows (alternately), the rest ``rich_size``
    (at least 4, more than a sparse group's)."""
    n_groups = integer_argument("n_groups", n_groups)
    rich_size = integer_argument("rich_size", rich_size, minimum=4)
    half = n_groups // 2
    return np.where(np.arange(n_groups) < half, 2 + np.arange(n_groups) % 2, rich_size)


def simulate_glmm_study(rng, family: str = "binomial", n_groups: int = 20, rich_size: int = 20):
    """One data set of the study: ``(data, b, sizes)``, b the true group effects in group order g000, g001, ..."""
    generator_argument(rng)
    _family_argument(family)
    (beta0, beta1), sd_b = TRUTH[family]
    sizes = group_sizes(n_groups, rich_size)
    g = np.repeat(np.arange(n_groups), sizes)
    x = rng.normal(size=g.size)
    b = rng.normal(0.0, sd_b, n_groups)
    eta = beta0 + beta1 * x + b[g]
    y = (rng.uniform(size=g.size) < special.expit(eta)).astype(float) if family == "binomial" else \
        rng.poisson(np.exp(eta)).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i:03d}" for i in g]}), b, sizes


def _family_argument(family) -> str:
    if not isinstance(family, str) or family not in TRUTH:
        raise ArgumentError(f"family must be one of {sorted(TRUTH)}, got {family!r}")
    return family


def population_mean(family: str, x, nodes: int = 64) -> np.ndarray:
    """The true population-average mean m(x) = E_b[g^-1(beta_0 + beta_1 x + b)] of the study's truth."""
    _family_argument(family)
    nodes = integer_argument("nodes", nodes)
    (beta0, beta1), sd_b = TRUTH[family]
    eta = beta0 + beta1 * np.asarray(x, dtype=float)
    if family == "poisson":
        return np.exp(eta + sd_b**2 / 2)
    t, w = np.polynomial.hermite_e.hermegauss(nodes)  # probabilists' Hermite: weight exp(-t^2 / 2)
    return special.expit(eta[:, None] + sd_b * t[None, :]) @ (w / w.sum())


def glmm_coverage(
    n_reps: int = 100,
    level: float = 0.95,
    family: str = "binomial",
    with_bayes: bool = True,
    n_groups: int = 20,
    rich_size: int = 20,
    seed: int = 0,
    draws: int = 500,
) -> pd.DataFrame:
    """Coverage of conditional-mode, posterior and population-average intervals of a GLMM.

    Parameters
    ----------
    n_reps : int
        Replications (data sets).
    level : float
        Nominal coverage of every interval.
    family : {"binomial", "poisson"}
    with_bayes : bool
        Also sample ``hp.bayes`` (2 chains of ``draws`` draws after ``draws`` tuning steps).
    n_groups, rich_size
        The design (:func:`group_sizes`): at least 2 groups, and rich groups of at least 4 rows.
    seed : int

    Returns
    -------
    pandas.DataFrame
        interval (``conditional``, ``posterior``, ``marginal``), groups (``sparse (2-3 obs)``,
        ``rich``, ``population``), n (intervals checked), coverage, mcse (over replications), and
        failures (replications whose fit raised, left out).
    """
    n_reps = replications_argument(n_reps)
    probability_argument("level", level)
    family = _family_argument(family)
    with_bayes = boolean_argument("with_bayes", with_bayes)
    n_groups = integer_argument("n_groups", n_groups, minimum=2)
    rich_size = integer_argument("rich_size", rich_size, minimum=4)
    draws = integer_argument("draws", draws, minimum=MIN_DRAWS)
    rng = np.random.default_rng(seed_argument(seed))
    z = normal_quantile(level)
    hits: dict[tuple[str, str], list] = {}
    names = [f"g{i:03d}" for i in range(n_groups)]
    newdata = pd.DataFrame({"x": MARGINAL_X, "g": names[0]})
    truth_m = population_mean(family, MARGINAL_X)
    failures = 0

    def record(name, sparse, covered):
        covered = np.asarray(covered, dtype=bool)
        if sparse is None:
            hits.setdefault((name, "population"), []).append((int(covered.sum()), covered.size))
            return
        for flag, label in ((True, "sparse (2-3 obs)"), (False, "rich")):
            hits.setdefault((name, label), []).append((int(covered[sparse == flag].sum()), int((sparse == flag).sum())))

    for rep in range(n_reps):
        data, b, sizes = simulate_glmm_study(rng, family, n_groups, rich_size)
        sparse = sizes < rich_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boundary fits in small samples are part of the study
            try:
                fit = glmm("y ~ x + (1 | g)", data, family=family)
                marginal = fit.marginal(newdata, level=level).predictions
            except HierpoolError:  # a failed fit is counted, not hidden
                failures += 1
                continue
        ranef = fit.ranef.assign(grp=fit.ranef.grp.astype(str)).set_index("grp").loc[names]
        mode, condsd = ranef.condval.to_numpy(), ranef.condsd.to_numpy()
        record("conditional", sparse, np.abs(mode - b) <= z * condsd)
        record("marginal", None, (marginal.lower.to_numpy() <= truth_m) & (truth_m <= marginal.upper.to_numpy()))
        if with_bayes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                post = bayes("y ~ x + (1 | g)", data, family=family, chains=2, draws=draws, tune=draws,
                             seed=seed + rep, level=level)
            table = post.ranef.assign(grp=post.ranef.grp.astype(str)).set_index("grp").loc[names]
            record("posterior", sparse, (table.lower.to_numpy() <= b) & (b <= table.upper.to_numpy()))
    rows = []
    for (name, label), per_rep in hits.items():
        covered, counts = np.asarray(per_rep, dtype=float).T
        p = covered.sum() / counts.sum()
        # ratio estimator's standard error over replications (clustered hits)
        spread = np.sum((covered - p * counts) ** 2) / (len(counts) * (len(counts) - 1)) if len(counts) > 1 else np.nan
        rows.append({"interval": name, "groups": label, "n": int(counts.sum()), "coverage": p,
                     "mcse": float(np.sqrt(spread) / counts.mean()), "failures": failures})
    return pd.DataFrame(rows)
