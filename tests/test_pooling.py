"""Pooling side by side, the shrinkage identity and the ridge view, against independent computations."""

import numpy as np
import pandas as pd
import pytest
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
    np.testing.assert_allclose(fitted["no_pooling"], data.o + (sums.wr / sums.w).loc[data.patient].to_numpy(), rtol=1e-12)
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
