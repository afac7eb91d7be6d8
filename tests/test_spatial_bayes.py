"""The Bayesian spatial model (hp.bayes(..., adjacency=)): the Poisson BYM2 posterior on nc_sids, and the two-term
BYM model car(county, type='icar') + (1 | county), against long Stan runs of brms in Monte-Carlo units, the
relative-risk tables, the calibration study, and the BLUP <-> posterior agreement of a Gaussian model."""

import json
import warnings
from pathlib import Path

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import hierpool as hp
from hierpool.bayesian.results import summarize_draws

VALIDATION = Path(__file__).resolve().parents[1] / "validation"
FORMULA = "sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type='bym2')"
#: the brms references' intercept prior (validation/nc_sids.R: hierpool's default until the default became the
#: centred predictors' intercept prior carried to x = 0, Normal(0, 4.5) here), so that both sides fit one model
BRMS_INTERCEPT = {"Intercept": dist.Normal(0.0, 2.5)}


@pytest.fixture(scope="module")
def nc():
    return hp.datasets.nc_sids()


@pytest.fixture(scope="module")
def post(nc):
    return hp.bayes(FORMULA, nc.data, family="poisson", adjacency=nc.adjacency, priors=BRMS_INTERCEPT, seed=3,
                    progress=False)


def z_against_brms(post, reference_file: str, hyper_names: dict[str, str], suffix: str):
    """(the reference, z of every quantity): the fixed effects, the hyperparameters (brms name -> hierpool's) and
    every county's log relative risk, (our mean - Stan's) / sqrt(our MCSE^2 + Stan's MCSE^2)."""
    reference = json.loads((VALIDATION / reference_file).read_text())
    fixef, hyper = post.fixef, post.hyperparameters()
    ours = {"b_Intercept": fixef.loc["Intercept"], "b_nwbir_rate": fixef.loc["nwbir_rate"]}
    ours |= {brms: hyper.loc[name] for brms, name in hyper_names.items()}
    z = {name: (ours[name]["mean"] - ref["mean"]) / np.hypot(ours[name]["mcse_mean"], ref["mcse"])
         for name, ref in reference["parameters"].items()}
    stats = summarize_draws(post.draws(f"log_relative_risk{suffix}"), 0.95)
    for i, county in enumerate(post.idata.posterior[f"area_with_data{suffix}"].values):
        ref = reference["log_relative_risk"][str(county)]
        z[county] = (stats["mean"][i] - ref["mean"]) / np.hypot(stats["mcse_mean"][i], ref["mcse"])
    return reference, z


def test_the_bym2_posterior_matches_brms_in_monte_carlo_units(post):
    """Fixed effects, sd, rho and every county's log relative risk x'beta + b: |z| < 4 with both runs' MCSEs
    (validation/spatial_brms_reference.R: 4 x 10,000 Stan draws; brms constrains sum(phi) softly, hierpool exactly)."""
    hyper = post.hyperparameters()
    reference, z = z_against_brms(post, "spatial_brms_reference.json", {"sdcar": "sd", "rhocar": "rho"}, "")
    assert len(z) == 104, "two fixed effects, sd, rho and 100 counties"
    worst = max(z, key=lambda k: abs(z[k]))
    assert abs(z[worst]) < 4, f"{worst}: z = {z[worst]:.2f}"
    for name in ("sd", "rho"):  # and the spread, loosely: a posterior sd within 10% of Stan's
        ref = reference["parameters"][{"sd": "sdcar", "rho": "rhocar"}[name]]
        assert hyper.loc[name, "sd"] == pytest.approx(ref["sd"], rel=0.1), f"posterior sd of {name}"
    assert post.divergences == 0, "no divergent transitions"


BYM = "sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type='icar') + (1 | county)"


@pytest.fixture(scope="module")
def bym_post(nc):
    return hp.bayes(BYM, nc.data, family="poisson", adjacency=nc.adjacency, priors=BRMS_INTERCEPT, seed=2,
                    progress=False)


def test_the_two_term_bym_posterior_matches_brms_in_monte_carlo_units(bym_post, nc):
    """Besag, York & Mollie's model, an ICAR term and an unstructured county term, each with its sd: fixed effects,
    both sds and every county's log relative risk x'beta + phi + u, |z| < 4 with both runs' MCSEs
    (validation/spatial_bym_brms_reference.R: 4 x 10,000 Stan draws)."""
    post = bym_post
    assert list(post.hyperparameters().index) == ["sd_car_county", "sd_county"], "each term's sd, named by term"
    reference, z = z_against_brms(post, "spatial_bym_brms_reference.json",
                                  {"sdcar": "sd_car_county", "sd_county__Intercept": "sd_county"}, "_car_county")
    assert len(z) == 104, "two fixed effects, two sds and 100 counties"
    worst = max(z, key=lambda k: abs(z[k]))
    assert abs(z[worst]) < 4, f"{worst}: z = {z[worst]:.2f}"
    assert post.divergences == 0 and reference["divergences"] == 0
    tables = post.ranef
    assert list(tables) == ["car(county, type='icar')", "(1 | county)"], "ranef: a table per term"
    risk = post.relative_risk(term="county")
    counties = nc.data.set_index("county").loc[risk.index]
    np.testing.assert_allclose(risk["sir"], counties.sid74 / counties.expected, err_msg="the raw SIR from the data")
    # smoothing: the smoothed risks follow the raw ratios but spread less (a zero count's log SIR at half a death)
    raw, smoothed = np.log(risk.sir + 0.5 / risk.expected), np.log(risk.relative_risk)
    assert np.corrcoef(raw, smoothed)[0, 1] > 0.6 and smoothed.std() < 0.8 * raw.std(), "shrinkage of the raw SIRs"
    assert post.summary().startswith("Bayesian spatial model (car(county, type='icar'), (1 | county); poisson")


def test_relative_risks_exceedance_and_the_parts_of_each_effect(post, nc):
    risk = post.relative_risk()
    assert len(risk) == 100 and set(risk.columns) >= {"sir", "relative_risk", "lower", "upper", "exceedance"}
    log_rr = post.draws("log_relative_risk").reshape(-1, 100)
    np.testing.assert_allclose(risk["exceedance"], (log_rr > 0).mean(axis=0), err_msg="P(RR > 1) from the draws")
    np.testing.assert_allclose(post.relative_risk(threshold=1.5)["exceedance"], (log_rr > np.log(1.5)).mean(axis=0))
    assert risk.loc["Anson", "exceedance"] > 0.99 and risk.loc["Alleghany", "exceedance"] < 0.1, \
        "Anson (15 deaths, 3.2 expected) is a high-risk county, Alleghany (0 of 1.0) not"
    np.testing.assert_allclose(risk["sir"], nc.data.set_index("county").loc[risk.index, "sir"], err_msg="raw SIR")
    b, spatial, unstructured = (post.draws(name) for name in ("b", "spatial", "unstructured"))
    np.testing.assert_allclose(spatial + unstructured, b, atol=1e-12, err_msg="BYM2's parts add up")
    np.testing.assert_allclose(spatial.sum(axis=-1), 0, atol=1e-10, err_msg="the spatial part sums to zero exactly")
    ranef = post.ranef
    assert list(ranef.columns[:7]) == ["mean", "sd", "lower", "upper", "mcse_mean", "ess_bulk", "r_hat"]
    assert (ranef["rows"] == 1).all() and ranef["exceedance"].between(0, 1).all()
    assert "Bayesian spatial model (car(county, type='bym2')" in post.summary()
    with pytest.raises(hp.HierpoolError, match="threshold must be a positive"):
        post.relative_risk(threshold=0)


def test_the_calibration_study_passes_and_can_fail():
    """validation/spatial_validation.py: SBC of the ICAR and BYM2 Poisson models on a 20-area grid passes; the
    ICAR analysed under a wrong sd prior fails (the check can fail)."""
    study = json.loads((VALIDATION / "spatial_validation.json").read_text())
    for section in ("sbc_icar", "sbc_bym2"):
        assert study[section]["passed"] and study[section]["n_reps"] >= 200, f"{section} passes"
    assert not study["sbc_icar_wrong_prior"]["passed"], "a miscalibrated analysis is caught"


def test_blup_agreement_of_a_gaussian_car_model():
    """hp.validate.blup_agreement(..., adjacency=) on a Gaussian model with an ICAR term and a (1 | site) term: with
    the REML fit's variance parameters held and flat priors on beta, the NUTS posterior of (beta, b, u) reproduces
    every BLUP and joint sd in Monte-Carlo units; the joint sds (beta's uncertainty included, from the sparse
    bordered factor) equal the dense GLS ones; and a posterior held at another sd fails the comparison."""
    import pandas as pd

    from hierpool.spec.adjacency import lattice_edges
    from hierpool.validate import compare_spatial

    rng = np.random.default_rng(4)
    rows, cols = 6, 5
    n = rows * cols
    labels = [f"a{i}" for i in range(n)]
    edges = lattice_edges(rows, cols)
    area = np.repeat(np.arange(n), 2)[: 2 * n - 6]
    site = rng.integers(0, 4, size=area.size)
    data = pd.DataFrame({"area": np.array(labels)[area], "x": rng.normal(size=area.size), "site": site})
    data["y"] = (1 + 0.5 * data.x + rng.normal(size=n)[area] + rng.normal(size=4)[site]
                 + rng.normal(scale=0.5, size=area.size))
    formula = "y ~ x + car(area, type='icar') + (1 | site)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = hp.validate.blup_agreement(formula, data, adjacency=edges, seed=2)
    assert report.passed, report.summary()
    assert set(report.table.grpvar) == {"", "area", "site"} and len(report.table) == 2 + n + 4, "every effect compared"
    fit = report.fit
    # the joint sds against dense GLS: Cov(b - b^) with beta integrated out
    g = fit.sdesign.graph
    Z = np.zeros((len(data), n))
    Z[np.arange(len(data)), fit.sdesign.area] = 1
    C = fit.sd**2 * np.linalg.pinv(np.diag(g.degree) - g.adjacency_matrix().toarray(), hermitian=True)
    site_sd = fit.hyperparameters()["sd_site"]
    S = (site[:, None] == site[None, :]) * site_sd**2
    Vi = np.linalg.inv(fit.sigma**2 * np.eye(len(data)) + Z @ C @ Z.T + S)
    X = fit.design.X
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    np.testing.assert_allclose(fit.ranef_joint_sd(), np.sqrt(np.diag(C - C @ Z.T @ P @ Z @ C)), rtol=1e-8,
                               err_msg="joint sds differ from dense GLS")
    assert report.posterior.hyperparameters().empty, "nothing but beta and the effects was sampled"
    # the check can fail: the same comparison against a posterior held at twice the spatial sd
    import dataclasses

    wrong_fit = hp.lmm(formula, data, adjacency=edges)
    wrong_fit.psi = wrong_fit.psi + np.r_[np.log(2.0), np.zeros(wrong_fit.psi.size - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = hp.bayes(formula, data, adjacency=edges, variance=wrong_fit, seed=2, progress=False,
                         priors={"Intercept": "flat", "b": "flat"})
    wrong = dataclasses.replace(wrong, held=report.posterior.held)  # as if held at fit's
    assert not compare_spatial(fit, wrong).passed, "a posterior at another sd must fail"


def test_predictions_are_the_draws_linear_predictor_in_any_area(post, nc):
    """predict summarizes each draw's offset + x beta + b[area] (checked against the draws themselves), on the
    response scale exp of it; a county given without rows of its own (a copy of a row moved to another county)
    takes that county's effect; a county outside the graph is refused by name; predictive draws are counts of mean
    mu (their mean within Monte-Carlo error of mu's)."""
    beta = post.draws("beta").reshape(-1, 2)
    b = post.draws("b").reshape(-1, 100)
    labels = list(post.ranef.index)
    new = nc.data.iloc[[0, 5]].assign(county=[labels[7], labels[60]])
    x = np.column_stack([np.ones(2), new["nwbir_rate"]])
    eta = np.log(new["expected"].to_numpy()) + beta @ x.T + b[:, [7, 60]]
    link = post.predict(new)
    np.testing.assert_allclose(link["mean"], eta.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(link["sd"], eta.std(axis=0, ddof=1), rtol=1e-10)
    response = post.predict(new, type="response")
    np.testing.assert_allclose(response["mean"], np.exp(eta).mean(axis=0), rtol=1e-10)
    assert list(response.index) == list(new.index)
    fitted = post.predict(type="response")
    assert len(fitted) == len(nc.data)
    predictive = post.predict(new, kind="predictive", seed=1)
    mc = np.sqrt(np.exp(eta).var(axis=0) + np.exp(eta).mean(axis=0)) / np.sqrt(eta.shape[0])
    assert np.all(np.abs(predictive["mean"] - response["mean"]) < 5 * mc)
    # counts, not means: Var(y) = Var(mu) + E(mu), where mu's own sd alone falls short by E(mu)
    law = np.sqrt(np.exp(eta).var(axis=0) + np.exp(eta).mean(axis=0))
    np.testing.assert_allclose(predictive["sd"], law, rtol=0.1)
    with pytest.raises(hp.HierpoolError, match="'county' of the prediction data"):
        post.predict(new.assign(county=["Atlantis", labels[0]]))


def test_a_held_gaussian_models_predictions_are_the_closed_forms(nc):
    """With the variances held at the closed-form fit's (variance=), a Gaussian CAR model with a (1 | clinic) term
    predicts as the fit does: means and the predictive sd of the fit's prediction interval, within Monte-Carlo error
    (sigma is the fit's: it was not in the posterior, and predictive draws failed); two rows of one new clinic share
    its draws."""
    from hierpool.spec.adjacency import graph as make_graph

    rng = np.random.default_rng(1)
    labels = make_graph(nc.adjacency).labels
    data = pd.DataFrame({"county": rng.choice(labels, 200), "clinic": [f"c{i}" for i in rng.integers(0, 8, 200)],
                         "x": rng.normal(size=200)})
    data["y"] = 1 + 0.5 * data.x + rng.normal(size=8)[data.clinic.str[1:].astype(int)] + rng.normal(0, 2.5, 200)
    formula = "y ~ x + car(county, type='icar') + (1 | clinic)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm(formula, data, adjacency=nc.adjacency)
        post = hp.bayes(formula, data, adjacency=nc.adjacency, variance=fit, chains=2, draws=500, seed=1,
                        progress=False)
    new = pd.DataFrame({"county": [labels[3], labels[3], labels[50], labels[3]], "clinic": ["c1", "new", "new", "new"],
                        "x": [0.0, 0.0, 1.0, 0.0]})
    mean = post.predict(new)
    predictive = post.predict(new, kind="predictive", seed=2)
    want = fit.predict(new, interval="prediction")
    draws = 1000
    assert np.all(np.abs(mean["mean"] - want["fit"]) < 5 * mean["sd"] / np.sqrt(draws / 4))
    np.testing.assert_allclose(predictive["sd"], want["se"], rtol=0.07)  # (sigma 2.5: a sigma of 1 is 40% off)
    assert mean.iloc[1].equals(mean.iloc[3])  # one new clinic's draws, shared by its rows
