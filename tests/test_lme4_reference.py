"""Closed-form results against lme4 (validation/lme4_reference.json, from validation/lme4_reference.R).

Tolerances are the issue's: objective 1e-6 relative, fixef 1e-5, sdcor 1e-3, condval 1e-3 sigma,
condsd 2e-3 relative, fitted values 1e-4 sd(y).  The objective at a fixed theta is checked to
near machine precision, independently of either optimizer.
"""

import json

import numpy as np
import pytest
from conftest import REFERENCE, lme4_group, lme4_name, load

import hierpool as hp

MODELS = json.loads(REFERENCE.read_text())["models"]


@pytest.fixture(scope="module")
def fits():
    cache = {}

    def get(ref):
        if ref["id"] not in cache:
            data = load(ref["data"])
            cache[ref["id"]] = (data, hp.lmm(ref["formula"], data, reml=ref["reml"]))
        return cache[ref["id"]]

    return get


@pytest.mark.parametrize("ref", MODELS, ids=[m["id"] for m in MODELS])
def test_objective_at_fixed_theta(ref):
    model = hp.MixedModel(ref["formula"], load(ref["data"]))
    assert model.design.n == ref["nobs"]
    assert model.design.y.sum() == pytest.approx(ref["sum_response"], rel=1e-12)
    value = model.objective(ref["theta_probe"], reml=ref["reml"])
    assert value == pytest.approx(ref["objective_at_probe"], rel=1e-10)


@pytest.mark.parametrize("ref", MODELS, ids=[m["id"] for m in MODELS])
def test_fit_matches_lme4(ref, fits):
    data, fit = fits(ref)
    assert fit.objective == pytest.approx(ref["objective"], rel=1e-6)
    assert fit.objective <= ref["objective"] + 1e-6 * abs(ref["objective"])
    assert fit.is_singular == ref["is_singular"]
    assert fit.loglik == pytest.approx(ref["loglik"], rel=1e-6)
    assert fit.aic == pytest.approx(ref["aic"], rel=1e-6)
    assert fit.bic == pytest.approx(ref["bic"], rel=1e-6)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-3)

    fixef = {lme4_name(k): v for k, v in fit.fixef.items()}
    fixef_se = {lme4_name(k): v for k, v in fit.fixef_se.items()}
    assert set(fixef) == set(ref["fixef"])
    for name, value in ref["fixef"].items():
        assert fixef[name] == pytest.approx(value, rel=1e-5, abs=1e-5 * ref["fixef_se"][name])
        assert fixef_se[name] == pytest.approx(ref["fixef_se"][name], rel=2e-3)
    np.testing.assert_allclose(fit.vcov.to_numpy(), np.array(ref["vcov"]), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("ref", MODELS, ids=[m["id"] for m in MODELS])
def test_varcorr_matches_lme4(ref, fits):
    _, fit = fits(ref)
    ours = {
        (row.grp, lme4_name(row.var1) if isinstance(row.var1, str) else "", lme4_name(row.var2) if isinstance(row.var2, str) else ""): row
        for row in fit.varcorr.itertuples()
    }
    vc = ref["varcorr"]
    assert len(ours) == len(vc["grp"])
    for grp, var1, var2, sdcor in zip(vc["grp"], vc["var1"], vc["var2"], vc["sdcor"]):
        row = ours[(lme4_group(grp), var1, var2)]
        if var2:  # a correlation
            assert row.sdcor == pytest.approx(sdcor, abs=1e-3)
        elif sdcor == 0:
            assert row.sdcor == 0.0  # singular fits: exactly on the boundary, as lme4
        else:
            assert row.sdcor == pytest.approx(sdcor, rel=1e-3)


@pytest.mark.parametrize("ref", MODELS, ids=[m["id"] for m in MODELS])
def test_ranef_matches_lme4(ref, fits):
    _, fit = fits(ref)
    ours = {(r.grpvar, lme4_name(r.term), str(r.grp)): r for r in fit.ranef.itertuples()}
    re = ref["ranef"]
    assert len(ours) == len(re["grp"])
    for grpvar, term, grp, condval, condsd in zip(re["grpvar"], re["term"], re["grp"], re["condval"], re["condsd"]):
        row = ours[(lme4_group(grpvar), term, grp)]
        assert row.condval == pytest.approx(condval, abs=1e-3 * ref["sigma"])
        assert row.condsd == pytest.approx(condsd, rel=2e-3, abs=1e-8)


@pytest.mark.parametrize("ref", MODELS, ids=[m["id"] for m in MODELS])
def test_fitted_values_match_lme4(ref, fits):
    data, fit = fits(ref)
    scale = 1e-4 * np.std(fit.design.y, ddof=1)
    np.testing.assert_allclose(fit.predict(), ref["fitted"], atol=scale, rtol=0)
    np.testing.assert_allclose(fit.predict(re=False), ref["fitted_population"], atol=scale, rtol=0)
    # newdata path gives the same numbers as the fitted rows
    np.testing.assert_allclose(fit.predict(data), ref["fitted"], atol=scale, rtol=0)


def test_singular_fit_is_exactly_on_the_boundary(fits):
    ref = next(m for m in MODELS if m["id"] == "dyestuff2_reml")
    with pytest.warns(hp.ConvergenceWarning, match="singular"):
        fit = hp.lmm(ref["formula"], load(ref["data"]))
    assert fit.is_singular
    assert fit.theta[0] == 0.0
    assert fit.varcorr.loc[fit.varcorr.grp == "Batch", "sdcor"].item() == 0.0
    assert np.all(fit.ranef.condval == 0.0)
