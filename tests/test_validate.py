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
    assert series.mean_abs_diff_in_sd.iloc[0] > series.mean_abs_diff_in_sd.iloc[1]


def test_agreement_plot_and_summary(sleepstudy):
    report = hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleepstudy, draws=300, seed=13)
    fig = report.plot()
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel().startswith("BLUP")
    assert "PASSED" in report.summary() or "FAILED" in report.summary()


def test_bad_mode_is_a_named_error(sleepstudy):
    with pytest.raises(hp.HierpoolError, match="mode"):
        hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleepstudy, mode="approximate")
