"""The validation module: BLUP agreement (exact and full-Bayes modes)."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE, load

import hierpool as hp

REML_MODELS = sorted({(m["data"], m["formula"]) for m in json.loads(REFERENCE.read_text())["models"] if m["reml"]})


@pytest.mark.parametrize("name,formula", REML_MODELS, ids=[f"{d}:{f}" for d, f in REML_MODELS])
def test_exact_mode_passes_on_every_lme4_reference_model(name, formula):
    report = hp.validate.blup_agreement(formula, load(name), draws=1000, seed=11)
    assert report.passed, report.summary()
    assert len(report.table) == len(report.fit.fixef) + len(report.fit.ranef)
    assert list(report.table.columns[:4]) == ["effect", "grpvar", "term", "grp"]


def test_exact_mode_fails_when_the_posterior_is_wrong(sleepstudy):
    # the test has power: shift the posterior by a fraction of a posterior sd and it must fail
    report = hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleepstudy, seed=12)
    table = report.table.copy()
    table["z"] = (table.post_mean + 0.3 * table.post_sd - table.blup) / table.mcse
    assert np.abs(table.z).max() > report.threshold


def test_full_mode_reports_wider_posteriors_that_converge_with_more_data():
    def simulate(groups, rng):
        g = np.repeat(np.arange(groups), 5)
        y = 1.0 + rng.normal(0, 1.0, groups)[g] + rng.normal(0, 1.0, g.size)
        return "y ~ 1 + (1 | g)", pd.DataFrame({"y": y, "g": g})

    series = hp.validate.agreement_series(simulate, [6, 60], draws=500, tune=500)
    # variance uncertainty widens posteriors beyond C^-1, less so with 10x the groups
    assert series.mean_sd_ratio.iloc[0] > series.mean_sd_ratio.iloc[1] > 1.0
    # with 60 groups the posterior means are the BLUPs up to Monte Carlo error, whose mean absolute
    # size is ~0.018 posterior sds at these draws (seeds 0-3: 0.014-0.020); a shift of 0.05 sd fails.
    # The 6-group gap is not compared with it: it is of the same order (0.016-0.062 over seeds 0-3)
    assert series.mean_abs_diff_in_sd.iloc[1] < 0.05


def test_agreement_plot_and_summary(sleepstudy):
    report = hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleepstudy, draws=300, seed=13)
    fig = report.plot()
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel().startswith("BLUP")
    assert "PASSED" in report.summary() or "FAILED" in report.summary()


def test_bad_mode_is_a_named_error(sleepstudy):
    with pytest.raises(hp.HierpoolError, match="mode"):
        hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleepstudy, mode="approximate")


def _sbc_design():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(8), 5)
    return pd.DataFrame({"y": rng.normal(size=g.size), "x": np.tile(np.linspace(-1, 1, 5), 8), "g": g})


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g)", "y ~ x + (x | g)"])
def test_sbc_quick_mode_finds_uniform_ranks(formula):
    result = hp.validate.sbc(formula, _sbc_design(), n_reps=100, seed=1)
    assert result.passed, result.tests
    assert result.ranks.shape[0] == 100 and result.ranks.to_numpy().max() <= result.n_draws
    assert len(result.plot().axes) == 2


def test_sbc_tests_reject_miscalibrated_ranks():
    from hierpool.validate.sbc import _uniformity

    rng = np.random.default_rng(2)
    # an over-dispersed posterior puts the truth in the middle ranks; a biased one at one end
    ranks = pd.DataFrame({"too_wide": rng.binomial(99, 0.5, 100), "biased": rng.integers(0, 40, 100)})
    tests = _uniformity(ranks, n_draws=99, bins=10, alpha=0.01)
    assert not tests.uniform.any()
    assert (tests.chi2_p < 0.01).all() and (tests.ecdf_max_dev > tests.ecdf_band).all()


def test_ecdf_band_has_its_level():
    rng = np.random.default_rng(3)
    band = hp.validate.ecdf_band(100, 99, alpha=0.05, seed=4)
    grid = np.arange(1, 101) / 100
    deviations = [np.max(np.abs(np.cumsum(np.bincount(rng.integers(0, 100, 100), minlength=100)) / 100 - grid)) for _ in range(2000)]
    assert np.mean(np.array(deviations) > band) == pytest.approx(0.05, abs=0.015)


def test_coverage_quick_study_is_near_nominal():
    # quick mode: 40 replications x 40 groups; the validation/ study runs more and reports 93-97%
    table = hp.validate.coverage(n_reps=40, n_groups=40, seed=5, draws=300)
    assert set(table.interval) == {"blup", "confidence", "prediction", "posterior"}
    assert set(table.groups) == {"sparse (1-2 obs)", "rich"}
    # 95% intervals: a few MC errors (about 0.01 here) around the 93-97% band
    assert table.coverage.between(0.90, 0.99).all(), table
    assert (table.mcse < 0.015).all()
