"""Known residual sds (se=): against metafor's REML random-effects meta-analysis."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE

import hierpool as hp

CASES = json.loads(REFERENCE.read_text())["known_se"]


def frame(ref):
    data = pd.DataFrame({"y": ref["y"], "se": ref["se"], "trial": [f"s{i + 1}" for i in range(len(ref["y"]))]})
    if "ablat" in ref:
        data["ablat"] = ref["ablat"]
    return data


@pytest.mark.parametrize("ref", CASES, ids=[c["id"] for c in CASES])
def test_matches_metafor(ref):
    data = frame(ref)
    formula = ref.get("formula", "y ~ 1 + (1 | trial)")
    fit = hp.lmm(formula, data, se="se")
    tau = float(np.sqrt(fit.varcorr.vcov.iloc[0]))
    assert tau == pytest.approx(ref["tau"], rel=1e-3, abs=1e-6)
    beta = np.atleast_1d(ref.get("beta", ref.get("mu")))
    beta_se = np.atleast_1d(ref.get("beta_se", ref.get("mu_se")))
    np.testing.assert_allclose(fit.fixef.to_numpy(), beta, rtol=1e-5, atol=1e-5 * beta_se.max())
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), beta_se, rtol=2e-3)
    # metafor's blup(): fitted value + BLUP with an se that counts beta-hat's uncertainty
    pred = fit.predict(interval="confidence")
    np.testing.assert_allclose(pred.fit, ref["blup"], rtol=0, atol=1e-4 * np.std(ref["y"]))
    np.testing.assert_allclose(pred.se, ref["blup_se"], rtol=2e-3)
    # objective: metafor's restricted log-likelihood keeps +1/2 log|X^T X|, lme4's criterion does not
    X = fit.design.X
    assert fit.objective == pytest.approx(-2 * ref["loglik_reml"] + np.linalg.slogdet(X.T @ X)[1], rel=1e-6)
    assert "Residual" not in set(fit.varcorr.grp)


def test_eight_schools_allows_one_observation_per_group():
    ref = CASES[0]
    with pytest.warns(hp.ConvergenceWarning, match="singular"):
        fit = hp.lmm("y ~ 1 + (1 | trial)", frame(ref), se="se")
    assert fit.is_singular and fit.sigma == 1.0
