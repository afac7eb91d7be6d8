"""Frequentist coverage of hierpool's intervals, by simulation.

Each replication draws a data set from a fixed truth (random-intercept model with a covariate;
half the groups have 1-2 observations, half have many), with fresh group effects
b_g ~ N(0, sd_b^2), fits it, and checks whether each interval covers its target:

* ``blup``: BLUP +/- z * joint sd (Henderson's prediction-error sd, which includes beta-hat's
  uncertainty) around the true b_g;
* ``confidence``: ``LMMResult.predict(interval="confidence")`` for a group's mean at x = 1
  around x beta + b_g;
* ``prediction``: ``predict(interval="prediction")`` around a new observation of that group;
* ``posterior``: the equal-tailed posterior interval of b_g from ``hp.bayes`` (default priors).

Coverage is reported separately for sparse and rich groups, with its Monte-Carlo standard error
taken over replications (sd of the per-replication coverage / sqrt(replications)): the groups of
one data set share its estimated variance parameters, so their hits are correlated and the
binomial sqrt(p (1 - p) / N) would understate the error.  Intervals treat the estimated variance components as known (closed form),
so with few groups they can fall a little short of nominal; the Bayesian intervals propagate
that uncertainty.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..bayesian import bayes
from ..closedform import lmm
from ..closedform.predict import normal_quantile
from ..errors import ArgumentError, boolean_argument, integer_argument, real_argument, seed_argument
from ..spec.arguments import MIN_DRAWS, probability_argument
from ._arguments import generator_argument


def group_label(index) -> str:
    """The simulated studies' label of group ``index`` (g00, g01, ..., g100): the order of the true effects."""
    return f"g{index:02d}"


def label_positions(labels, n_groups: int) -> np.ndarray:
    """Positions of groups g00, g01, ... in a table's ``labels`` (a fit's ranef rows): the true effects' order.
    By label, not by sorting the labels (from 101 groups on, "g100" sorts between "g10" and "g11")."""
    positions = pd.Index(np.asarray(labels).astype(str)).get_indexer([group_label(i) for i in range(n_groups)])
    if np.any(positions < 0):
        raise RuntimeError("a simulated group has no row in the fit's table")  # a bug, never a wrong coverage
    return positions


def simulate_study(rng, n_groups: int = 20, rich_size: int = 20, beta=(1.0, 0.5), sd_b: float = 1.0, sigma: float = 1.0):
    """One data set: groups 0..n/2-1 have 1-2 observations, the rest ``rich_size``; truth returned too.

    ``beta``: (intercept, slope); ``sd_b`` >= 0 and ``sigma`` > 0."""
    generator_argument(rng)
    n_groups = integer_argument("n_groups", n_groups)
    rich_size = integer_argument("rich_size", rich_size)
    if isinstance(beta, (str, bytes)) or not hasattr(beta, "__len__") or len(beta) != 2:
        raise ArgumentError(f"beta must be two numbers (intercept, slope), got {beta!r}")
    beta = tuple(real_argument(f"beta[{i}]", value) for i, value in enumerate(beta))
    sd_b = real_argument("sd_b", sd_b, at_least=0.0)
    sigma = real_argument("sigma", sigma, above=0.0)
    sizes = np.where(np.arange(n_groups) < n_groups // 2, rng.integers(1, 3, n_groups), rich_size)
    g = np.repeat(np.arange(n_groups), sizes)
    x = rng.normal(size=g.size)
    b = rng.normal(0, sd_b, n_groups)
    y = beta[0] + beta[1] * x + b[g] + rng.normal(0, sigma, g.size)
    data = pd.DataFrame({"y": y, "x": x, "g": [group_label(i) for i in g]})
    return data, b, sizes


def coverage(
    n_reps: int = 100,
    level: float = 0.95,
    with_bayes: bool = True,
    n_groups: int = 20,
    seed: int = 0,
    draws: int = 500,
) -> pd.DataFrame:
    """Coverage of closed-form and Bayesian intervals for sparse and rich groups.

    Returns
    -------
    pandas.DataFrame
        interval, groups ("sparse (1-2 obs)" / "rich"), n (intervals checked), coverage, mcse
        (over replications; see the module docstring).
    """
    n_reps = integer_argument("n_reps", n_reps)
    probability_argument("level", level)
    with_bayes = boolean_argument("with_bayes", with_bayes)
    n_groups = integer_argument("n_groups", n_groups, minimum=2)
    draws = integer_argument("draws", draws, minimum=MIN_DRAWS)
    rng = np.random.default_rng(seed_argument(seed))
    z = normal_quantile(level)
    beta, sd_b, sigma = (1.0, 0.5), 1.0, 1.0
    hits: dict[tuple[str, bool], list] = {}  # per replication: (intervals that covered, intervals)

    def record(name, sparse, covered):
        covered = np.asarray(covered, dtype=bool)
        for flag in (True, False):
            hits.setdefault((name, flag), []).append((int(covered[sparse == flag].sum()), int((sparse == flag).sum())))

    for rep in range(n_reps):
        data, b, sizes = simulate_study(rng, n_groups, beta=beta, sd_b=sd_b, sigma=sigma)
        sparse = sizes <= 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boundary fits in small samples are part of the study
            fit = lmm("y ~ x + (1 | g)", data)
        ranef = fit.ranef
        order = label_positions(ranef.grp, n_groups)
        blup, joint = ranef.condval.to_numpy()[order], fit.ranef_joint_sd()[order]
        record("blup", sparse, np.abs(blup - b) <= z * joint)
        groups = pd.DataFrame({"x": 1.0, "g": [group_label(i) for i in range(n_groups)]})
        conf = fit.predict(groups, interval="confidence", level=level)
        target = beta[0] + beta[1] + b
        record("confidence", sparse, (conf.lower <= target) & (target <= conf.upper))
        pred = fit.predict(groups, interval="prediction", level=level)
        new_y = target + rng.normal(0, sigma, n_groups)
        record("prediction", sparse, (pred.lower <= new_y) & (new_y <= pred.upper))
        if with_bayes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                post = bayes("y ~ x + (1 | g)", data, chains=2, draws=draws, tune=draws, seed=seed + rep, level=level)
            table = post.ranef
            order = label_positions(table.grp, n_groups)
            lower, upper = table.lower.to_numpy()[order], table.upper.to_numpy()[order]
            record("posterior", sparse, (lower <= b) & (b <= upper))
    return pd.DataFrame([{"interval": name, "groups": "sparse (1-2 obs)" if flag else "rich",
                          **coverage_of(per_rep)} for (name, flag), per_rep in hits.items()])


def coverage_of(per_rep) -> dict:
    """n, coverage and its Monte-Carlo se from (intervals that covered, intervals) per replication.

    The se is the ratio estimator's over replications: one data set's intervals share its estimates,
    so their hits are correlated (see the module docstring).
    """
    covered, counts = np.asarray(per_rep, dtype=float).T
    p = covered.sum() / counts.sum()
    spread = np.sum((covered - p * counts) ** 2) / (len(counts) * (len(counts) - 1)) if len(counts) > 1 else np.nan
    return {"n": int(counts.sum()), "coverage": p, "mcse": float(np.sqrt(spread) / counts.mean())}
