"""What lme4 and bambi users type: offsets, prior weights, functions in formulas, and bad input.

The numbers against lme4 for these features are in test_lme4_features.py; here are the
properties that need no reference (equal ways of saying the same model, invariances) and the
errors.  Data are small so that each model compiles once and fits in a blink.
"""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.spec.formula import parse_formula


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(12), 8)
    x = np.tile(np.arange(8.0), 12)
    b0, b1 = rng.normal(0, 2, 12), rng.normal(0, 0.5, 12)
    y = 10 + 1.5 * x + b0[groups] + b1[groups] * x + rng.normal(0, 1, groups.size)
    return pd.DataFrame(
        {
            "y": y,
            "x": x,
            "g": [f"g{i:02d}" for i in groups],
            "exposure": rng.uniform(0.5, 2.0, groups.size),
            "w": 0.5 + (np.arange(groups.size) % 4) / 2,
            "f": np.array(["a", "b", "c"])[np.arange(groups.size) % 3],
        }
    )


# --- offsets -------------------------------------------------------------------------------


def test_offset_in_formula_is_not_a_covariate(data):
    """An offset aliased with x: lme4's answer is the slope less the offset's, never a dropped column."""
    frame = data.assign(off=2 * data.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "aliased column dropped" warning
        with_offset = hp.lmm("y ~ x + offset(off) + (1 | g)", frame)
    plain = hp.lmm("y ~ x + (1 | g)", frame)
    assert list(with_offset.fixef.index) == ["Intercept", "x"]
    assert with_offset.fixef["x"] == pytest.approx(plain.fixef["x"] - 2, abs=1e-8)
    assert with_offset.objective == pytest.approx(plain.objective, rel=1e-10)
    np.testing.assert_allclose(with_offset.fitted, plain.fitted, atol=1e-8)


def test_offset_argument_column_array_and_formula_agree(data):
    off = np.log(data.exposure)
    in_formula = hp.lmm("y ~ x + offset(np.log(exposure)) + (1 | g)", data)
    as_r_log = hp.lmm("y ~ x + offset(log(exposure)) + (1 | g)", data)
    as_column = hp.lmm("y ~ x + (1 | g)", data.assign(off=off), offset="off")
    as_array = hp.lmm("y ~ x + (1 | g)", data, offset=off.to_numpy())
    for other in (as_r_log, as_column, as_array):
        assert other.objective == pytest.approx(in_formula.objective, rel=1e-12)
        np.testing.assert_allclose(other.fixef, in_formula.fixef, rtol=1e-10)
    shifted = hp.lmm("y ~ x + (1 | g)", data.assign(y=data.y - off))
    np.testing.assert_allclose(in_formula.fixef, shifted.fixef, rtol=1e-9)
    np.testing.assert_allclose(in_formula.fitted, shifted.fitted + off, rtol=1e-10)


def test_several_offsets_are_summed(data):
    frame = data.assign(a=data.exposure, b=0.3 * data.x**2)
    two = hp.lmm("y ~ x + offset(a) + offset(b) + (1 | g)", frame)
    one = hp.lmm("y ~ x + (1 | g)", frame, offset=frame.a + frame.b)
    np.testing.assert_allclose(two.fixef, one.fixef, rtol=1e-10)


def test_offset_is_part_of_every_prediction(data):
    fit = hp.lmm("y ~ x + offset(log(exposure)) + (1 | g)", data)
    np.testing.assert_allclose(fit.predict(data), fit.fitted, rtol=1e-10)
    new = data.iloc[:5].assign(exposure=[1.0, 2.0, 3.0, 4.0, 5.0])
    base = hp.lmm("y ~ x + offset(log(exposure)) + (1 | g)", data).predict(new.assign(exposure=1.0))
    np.testing.assert_allclose(fit.predict(new) - base, np.log(new.exposure), rtol=1e-10)
    interval = fit.predict(new, interval="prediction", re=False)
    np.testing.assert_allclose(interval["fit"], fit.predict(new, re=False), rtol=1e-12)
    with pytest.raises(hp.HierpoolError, match="exposure"):
        fit.predict(new.drop(columns="exposure"))


def test_offset_given_as_array_cannot_predict_new_rows(data):
    fit = hp.lmm("y ~ x + (1 | g)", data, offset=np.log(data.exposure).to_numpy())
    with pytest.raises(hp.HierpoolError, match="offset was given as an array"):
        fit.predict(data.iloc[:3])


def test_offset_must_stay_in_the_fixed_part(data):
    with pytest.raises(hp.FormulaError, match="offset"):
        hp.lmm("y ~ x + (offset(exposure) | g)", data)
    with pytest.raises(hp.FormulaError, match="cannot interact"):
        hp.lmm("y ~ x + offset(exposure):x + (1 | g)", data)


# --- prior weights -------------------------------------------------------------------------


def test_weights_column_and_array_agree_and_scale_as_lme4(data):
    by_name = hp.lmm("y ~ x + (x | g)", data, weights="w")
    by_array = hp.lmm("y ~ x + (x | g)", data, weights=data.w.to_numpy())
    assert by_array.objective == pytest.approx(by_name.objective, rel=1e-12)
    # w -> 4 w: sigma^2 / w is unchanged, so sigma doubles; the REML criterion does not move:
    # (n - p) log 4 (pwrss) + p log 4 (log|R_X|^2) - n log 4 (lme4's -sum log w) = 0, as lme4's
    doubled = hp.lmm("y ~ x + (x | g)", data, weights=4 * data.w)
    assert doubled.sigma == pytest.approx(2 * by_name.sigma, rel=1e-6)
    np.testing.assert_allclose(doubled.fixef, by_name.fixef, rtol=1e-6)
    assert doubled.objective == pytest.approx(by_name.objective, rel=1e-9)
    unweighted = hp.lmm("y ~ x + (x | g)", data)
    assert abs(unweighted.fixef["x"] - by_name.fixef["x"]) > 1e-6  # the weights matter


def test_weights_and_offsets_as_series_are_read_by_their_labels(data):
    """A Series in another row order than data was read by position (a silently wrong fit); it is aligned by its
    index, as pandas aligns it, in hp.lmm, hp.glmm and fit_batch; one whose labels are not data's is refused."""
    shuffled = data.sample(frac=1.0, random_state=3)
    by_name = hp.lmm("y ~ x + (x | g)", shuffled, weights="w", offset="exposure")
    by_series = hp.lmm("y ~ x + (x | g)", shuffled, weights=data["w"], offset=data["exposure"])
    assert by_series.objective == pytest.approx(by_name.objective, rel=1e-12)
    counts = shuffled.assign(k=np.round(shuffled["exposure"] * 3))
    poisson = hp.glmm("k ~ x + (1 | g)", counts, family="poisson", offset=np.log(data["exposure"]))
    assert poisson.loglik == pytest.approx(
        hp.glmm("k ~ x + (1 | g)", counts.assign(o=np.log(counts["exposure"])), family="poisson", offset="o").loglik,
        rel=1e-12)
    two = pd.concat([shuffled.assign(d=1), shuffled.assign(d=2)], ignore_index=True)
    batch = hp.fit_batch("y ~ x + (x | g)", two, by="d", weights=two["w"].sample(frac=1.0, random_state=4),
                         progress=False)
    assert batch.objective.iloc[0] == pytest.approx(hp.lmm("y ~ x + (x | g)", shuffled, weights="w").objective,
                                                    rel=1e-8)
    with pytest.raises(hp.ArgumentError, match="weights is a pandas Series whose index"):
        hp.lmm("y ~ x + (x | g)", data, weights=data["w"].set_axis(data.index + 1000))


def test_whole_number_levels_held_as_floats_are_the_same_levels(data):
    """pandas makes an integer column float wherever it holds a missing value: new data's group 3.0 matched no
    fitted level 3 and was predicted as a new group's, silently.  Levels are written as R's factor writes them."""
    coded = data.assign(g=data["g"].str[1:].astype(int))
    fit = hp.lmm("y ~ x + (x | g)", coded)
    assert list(fit.ranef["grp"].iloc[:3]) == ["0", "1", "2"]
    new = coded.iloc[:16]
    np.testing.assert_allclose(fit.predict(new.assign(g=new["g"].astype(float))), fit.predict(new), rtol=1e-14)
    assert not np.allclose(fit.predict(new), fit.predict(new, re=False))
    as_floats = hp.lmm("y ~ x + (x | g)", coded.assign(g=coded["g"].astype(float)))
    assert list(as_floats.ranef["grp"]) == list(fit.ranef["grp"])


def test_a_categorical_factors_first_category_is_its_baseline_as_rs_first_level(data):
    """formulae sorts an unordered categorical's levels: categories ['r2', 'r0', 'r1'] gave baseline 'r0', where R's
    factor (lme4's fit) keeps the user's order, its first level the baseline.  The same model, coded from 'r2'."""
    levels = np.array(["r0", "r1", "r2"])[np.arange(len(data)) % 3]
    coded = data.assign(f=pd.Categorical(levels, categories=["r2", "r0", "r1", "unused"]))
    as_text = hp.lmm("y ~ x + f + (1 | g)", data.assign(f=levels), reml=False)
    fit = hp.lmm("y ~ x + f + (1 | g)", coded, reml=False)
    assert list(fit.fixef.index) == ["Intercept", "x", "f[r0]", "f[r1]"]  # (no column of the unused category)
    assert fit.objective == pytest.approx(as_text.objective, rel=1e-10)
    assert fit.fixef["Intercept"] == pytest.approx(as_text.fixef["Intercept"] + as_text.fixef["f[r2]"], rel=1e-8)
    assert fit.fixef["f[r0]"] == pytest.approx(-as_text.fixef["f[r2]"], rel=1e-8)
    new = data.iloc[:6].assign(f=levels[:6])  # new data as text: read by the fitted categories
    np.testing.assert_allclose(fit.predict(new), as_text.predict(new), rtol=1e-9)


def test_weighted_prediction_interval_reads_new_weights(data):
    fit = hp.lmm("y ~ x + (1 | g)", data, weights="w")
    new = data.iloc[:4]
    narrow = fit.predict(new.assign(w=100.0), interval="prediction")
    wide = fit.predict(new.assign(w=0.01), interval="prediction")
    assert np.all(wide["se"] > narrow["se"])
    with pytest.raises(hp.HierpoolError, match="weights"):
        fit.predict(new.drop(columns="w"), interval="prediction")


# --- functions in formulas -----------------------------------------------------------------


def cube(v):
    return v**3


def test_functions_resolve_in_the_callers_namespace_and_as_r(data):
    def local_square(v):
        return v**2

    fit = hp.MixedModel("y ~ local_square(x) + cube(x) + np.log1p(x) + sqrt(x) + exp(x / 8) + abs(x - 3) + (1 | g)", data)
    X = fit.design.X
    np.testing.assert_allclose(X[:, 1:], np.column_stack([
        data.x**2, data.x**3, np.log1p(data.x), np.sqrt(data.x), np.exp(data.x / 8), np.abs(data.x - 3)
    ]))
    with pytest.raises(hp.FormulaError, match="'no_such_function'"):
        hp.lmm("y ~ no_such_function(x) + (1 | g)", data)


def test_caret_is_a_power_inside_I_and_crosses_terms_outside(data):
    design = hp.MixedModel("y ~ x + I(x^2) + (1 | g)", data).design
    np.testing.assert_allclose(design.X[:, 2], data.x**2)
    crossed = hp.MixedModel("y ~ (x + exposure)^2 + (1 | g)", data).design
    product = hp.MixedModel("y ~ x * exposure + (1 | g)", data).design
    np.testing.assert_allclose(crossed.X, product.X)


def test_scale_is_rs_and_new_data_use_the_fitted_parameters(data):
    fit = hp.lmm("y ~ scale(x) + (scale(x) | g)", data)
    centred = (data.x - data.x.mean()) / data.x.std(ddof=1)
    np.testing.assert_allclose(fit.design.X[:, 1], centred)
    np.testing.assert_allclose(fit.design.terms[0].z[:, 1], centred)
    assert list(fit.fixef.index) == ["Intercept", "scale(x)"]
    new = data.iloc[:3].assign(x=[100.0, 200.0, 300.0])
    expected_column = (new.x - data.x.mean()) / data.x.std(ddof=1)
    b = fit.ranef.pivot(index="grp", columns="term", values="condval").loc[new.g]
    expected = fit.fixef["Intercept"] + b["Intercept"].to_numpy() + expected_column * (fit.fixef["scale(x)"] + b["scale(x)"].to_numpy())
    np.testing.assert_allclose(fit.predict(new), expected, rtol=1e-10)


def test_sum_contrasts_in_fit_and_predict(data):
    fit = hp.lmm("y ~ C(f, Sum) + (1 | g)", data, reml=False)
    treatment = hp.lmm("y ~ f + (1 | g)", data, reml=False)
    # the same model in another coding: the same deviance (REML's log|X^T V^-1 X| depends on the coding)
    assert fit.objective == pytest.approx(treatment.objective, rel=1e-10)
    np.testing.assert_allclose(fit.fitted, treatment.fitted, rtol=1e-9)
    np.testing.assert_allclose(fit.predict(data.iloc[:6]), treatment.predict(data.iloc[:6]), rtol=1e-9)
    means = fit.fixef["Intercept"] + np.array([fit.fixef.iloc[1], fit.fixef.iloc[2], -fit.fixef.iloc[1] - fit.fixef.iloc[2]])
    assert means.mean() == pytest.approx(fit.fixef["Intercept"])
    # R's name of the coding was read as a missing column ("uses column 'contr.sum', which is not in the data")
    with pytest.raises(hp.FormulaError, match="'contr.sum', which is not a coding hierpool knows.*C\\(f, Sum\\)"):
        hp.lmm("y ~ C(f, contr.sum) + (1 | g)", data)


def test_contrasts_transforms_and_offsets_mean_the_same_in_the_bayesian_engine(data):
    # the Bayesian engine reads the same Design: exact mode (variance held at the fit) must agree with
    # Henderson in Monte-Carlo units, and its predictions on new rows must use the same coding,
    # the fitted data's scale() and the new rows' offset
    formula = "y ~ C(f, Sum) + scale(x) + offset(log(exposure)) + (1 | g)"
    fit = hp.lmm(formula, data)
    post = hp.bayes(formula, data, variance=fit, priors=hp.validate.flat_beta_priors(fit), seed=3)
    assert list(post.fixef.index) == list(fit.fixef.index)
    report = hp.validate.compare(fit, post)
    assert report.passed, report.summary()
    new = data.iloc[:6].assign(x=[0.0, 10.0, 20.0, 3.0, 4.0, 5.0], exposure=[1.0, 2.0, 4.0, 1.0, 1.0, 1.0])
    predicted = post.predict(new)
    mcse = predicted["sd"] / np.sqrt(post.beta_draws.shape[0] * post.beta_draws.shape[1])  # exact draws: independent
    np.testing.assert_array_less(np.abs(predicted["mean"] - fit.predict(new)), 5 * mcse)


def test_arithmetic_on_the_left_of_the_tilde_is_the_response_as_r_evaluates_it(data):
    """R evaluates a formula's left side whole; formulae read it as terms: ``y - 100`` dropped the term 100 and
    fitted y, ``y - x`` fitted y too, and ``k / n`` (glmer's proportions with their trials as weights) was refused."""
    plain = hp.lmm("y ~ x + (1 | g)", data)
    for formula, intercept, slope in [("y - 100 ~ x + (1 | g)", -100.0, 0.0), ("-y ~ x + (1 | g)", None, None),
                                      ("y - x ~ x + (1 | g)", 0.0, -1.0), ("y ^ 2 ~ x + (1 | g)", None, None)]:
        fit = hp.lmm(formula, data)
        computed = hp.lmm(f"I({formula.split('~')[0].strip()}) ~ x + (1 | g)", data)
        np.testing.assert_allclose(fit.fixef, computed.fixef, rtol=1e-12)
        if intercept is not None:  # a shifted response: the same fit, its coefficients moved by the shift
            np.testing.assert_allclose(fit.fixef, plain.fixef + [intercept, slope], rtol=1e-9)
    counts = data.assign(k=np.round(data["exposure"] * 3), n=np.round(data["exposure"] * 3) + 4)
    proportions = hp.glmm("k / n ~ x + (1 | g)", counts, family="binomial", weights="n")
    successes = hp.glmm("cbind(k, n - k) ~ x + (1 | g)", counts, family="binomial")
    assert proportions.loglik == pytest.approx(successes.loglik, rel=1e-10)
    # the bootstrap simulates the computed response into its own column: the shifted model's replicates are the
    # plain model's, shifted
    shifted = hp.bootstrap(hp.lmm("y - 100 ~ x + (1 | g)", data), 20, seed=2, progress=False).replicates
    replicates = hp.bootstrap(plain, 20, seed=2, progress=False).replicates
    np.testing.assert_allclose(shifted["Intercept"], replicates["Intercept"] - 100.0, rtol=1e-8)
    np.testing.assert_allclose(shifted["x"], replicates["x"], rtol=1e-8)


def test_cbind_response_points_to_glmm(data):
    with pytest.raises(hp.FormulaError, match="hp.glmm"):
        hp.lmm("cbind(y, x) ~ 1 + (1 | g)", data)


# --- numerical robustness ------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_fit(data):
    return hp.lmm("y ~ x + (x | g)", data)


@pytest.mark.parametrize("shift", [1e4, 1e7])
def test_a_large_location_of_y_changes_nothing_but_the_intercept(data, reference_fit, shift):
    fit = hp.lmm("y ~ x + (x | g)", data.assign(y=data.y + shift))
    assert fit.objective == pytest.approx(reference_fit.objective, rel=1e-9)
    assert fit.fixef["Intercept"] - shift == pytest.approx(reference_fit.fixef["Intercept"], abs=1e-6)
    assert fit.fixef["x"] == pytest.approx(reference_fit.fixef["x"], rel=1e-7)
    np.testing.assert_allclose(fit.theta, reference_fit.theta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_scaling_y_scales_the_estimates(data, reference_fit, scale):
    fit = hp.lmm("y ~ x + (x | g)", data.assign(y=data.y * scale))
    dof = data.shape[0] - 2  # REML: the criterion moves by (n - p) log scale^2
    assert fit.objective == pytest.approx(reference_fit.objective + dof * np.log(scale**2), rel=1e-9)
    np.testing.assert_allclose(fit.fixef / scale, reference_fit.fixef, rtol=1e-7)
    assert fit.sigma / scale == pytest.approx(reference_fit.sigma, rel=1e-7)


def test_a_calendar_year_random_slope_reaches_the_centred_optimum(data):
    """(year | g) with year ~ 2000 is the model (I(year - 2000) | g): the same criterion at the optimum."""
    frame = data.assign(year=2000 + data.x)
    raw = hp.lmm("y ~ year + (year | g)", frame)
    centred = hp.lmm("y ~ I(year - 2000) + (I(year - 2000) | g)", frame)
    assert raw.objective == pytest.approx(centred.objective, rel=1e-9)
    assert raw.fixef["year"] == pytest.approx(centred.fixef["I(year - 2000)"], rel=1e-6)
    np.testing.assert_allclose(raw.fitted, centred.fitted, rtol=1e-7)
    assert not raw.is_singular
    # the reported theta is the user's: the objective at it is the optimum, to the rounding that
    # forming Lambda^T Z^T Z Lambda from z = [1, year] at theta ~ [1063, -0.53, 6e-4] keeps (~1e-5
    # relative: the fit itself solves on centred columns); the conditioned theta, reported by
    # mistake, would be off by far more
    user = hp.MixedModel("y ~ year + (year | g)", frame)
    assert user.objective(raw.theta) == pytest.approx(raw.objective, rel=1e-4)
    assert abs(user.objective(centred.theta) - raw.objective) > 1.0


# --- bad input -----------------------------------------------------------------------------


def test_bad_weights_and_offsets_are_refused_by_name(data):
    with pytest.raises(hp.HierpoolError, match="argument weights.*'nope'"):
        hp.lmm("y ~ x + (1 | g)", data, weights="nope")
    with pytest.raises(hp.HierpoolError, match="argument offset.*'nope'"):
        hp.lmm("y ~ x + (1 | g)", data, offset="nope")
    with pytest.raises(hp.HierpoolError, match="weights.*positive"):
        hp.lmm("y ~ x + (1 | g)", data.assign(w=data.w - 1.0), weights="w")
    with pytest.raises(hp.HierpoolError, match="weights.*one value per row"):
        hp.lmm("y ~ x + (1 | g)", data, weights=np.ones(5))
    with pytest.raises(hp.HierpoolError, match="offset.*one value per row"):
        hp.lmm("y ~ x + (1 | g)", data, offset=np.ones((data.shape[0], 2)))
    with pytest.raises(hp.HierpoolError, match="weights column 'f' must be numeric"):
        hp.lmm("y ~ x + (1 | g)", data, weights="f")
    with pytest.raises(hp.HierpoolError, match="either se .* or weights"):
        hp.lmm("y ~ x + (1 | g)", data.assign(se=1.0), se="se", weights="w")
    with pytest.raises(hp.HierpoolError, match="'w' has infinite values"):
        hp.lmm("y ~ x + (1 | g)", data.assign(w=np.where(data.x == 3, np.inf, data.w)), weights="w")
    with pytest.raises(hp.HierpoolError, match="infinite"):
        hp.lmm("y ~ x + (1 | g)", data, offset=np.where(data.x == 3, -np.inf, 0.0))


def test_missing_weights_and_offsets_drop_rows_and_count_them(data):
    frame = data.assign(w=np.where(np.arange(data.shape[0]) < 3, np.nan, data.w))
    offset = np.where(np.arange(data.shape[0]) >= data.shape[0] - 2, np.nan, 0.0)
    before = frame.copy()
    offset_before = offset.copy()
    with pytest.warns(hp.HierpoolWarning, match=r"dropped 5 of 96 rows.*w: 3.*\(offset\): 2"):
        fit = hp.lmm("y ~ x + (1 | g)", frame, weights="w", offset=offset)
    assert fit.nobs == data.shape[0] - 5
    pd.testing.assert_frame_equal(frame, before)  # nothing the user passed is modified
    np.testing.assert_array_equal(offset, offset_before)


def test_aliased_columns_by_qr_equal_the_column_by_column_projections(monkeypatch):
    # the QR shortcut (no column aliased) and the column-by-column projections (some aliased) decide alike: columns
    # aliased exactly, nearly (1e-9 of their norm off the span) and not quite (1e-5 off it), and after an aliased one;
    # and so does a long frame's screen of X'X first (spec.design.GRAM_SCREEN_MIN_ROWS, here from every size)
    from hierpool.spec import design
    from hierpool.spec.design import RANK_TOL, aliased_columns

    rng = np.random.default_rng(3)
    one, x, z = np.ones(50), rng.normal(size=50), rng.normal(size=50)
    noise = rng.normal(size=50)
    noise -= np.column_stack([one, x]) @ np.linalg.lstsq(np.column_stack([one, x]), noise, rcond=None)[0]
    noise /= np.linalg.norm(noise)
    near = 2 * x + 1

    def off(scale):  # near, moved scale times its norm off span(1, x)
        return near + scale * np.linalg.norm(near) * noise

    cases = {
        "none": ([one, x, z], []),
        "exact": ([one, x, near, z], [2]),
        "within the tolerance": ([one, x, off(1e-2 * RANK_TOL), z], [2]),
        "beyond the tolerance": ([one, x, off(1e2 * RANK_TOL), z], []),
        "two, the second after the first": ([one, x, near, z, x - 3 * z], [2, 4]),
        "a zero column": ([one, np.zeros(50), x], [1]),
    }
    for name, (columns, expected) in cases.items():
        assert aliased_columns(np.column_stack(columns)).tolist() == expected, name
    cleared = []
    monkeypatch.setattr(design, "GRAM_SCREEN_MIN_ROWS", 0)
    screen = design.gram_clear

    def recorded(gram):
        clear = screen(gram)
        cleared.append(bool(clear[0]))
        return clear

    monkeypatch.setattr(design, "gram_clear", recorded)
    for name, (columns, expected) in cases.items():
        assert aliased_columns(np.column_stack(columns)).tolist() == expected, name
    assert cleared == [True] + [False] * 5  # (the screen cannot clear a column 1e-5 off the span: QR decides it)


def test_largest_magnitudes_are_the_columns_largest_absolute_values_nan_kept():
    from hierpool.spec.design import largest_magnitudes

    values = np.array([[1.0, -5.0, 0.0], [-3.0, 2.0, np.nan], [2.0, 4.0, 1.0]])
    np.testing.assert_array_equal(largest_magnitudes(values), [3.0, 5.0, np.nan])
    assert largest_magnitudes(np.array([[-np.inf, 1.0]])).tolist() == [np.inf, 1.0]


def test_r_factor_and_logical_constants_read_as_in_r():
    # factor(h) and poly(x, 2, raw = TRUE) were refused (an unknown name factor; a column named 'TRUE')
    from conftest import simulated

    data = simulated()
    by_call = hp.lmm("y ~ factor(h) + (1 | g)", data)
    by_text = hp.lmm("y ~ hs + (1 | g)", data.assign(hs=data["h"].astype(str)))
    assert by_call.objective == pytest.approx(by_text.objective, rel=1e-12)
    np.testing.assert_allclose(by_call.fixef.to_numpy(), by_text.fixef.to_numpy(), rtol=1e-10)
    new = data.head(4)
    np.testing.assert_allclose(by_call.predict(new), by_text.predict(new.assign(hs=new["h"].astype(str))), rtol=1e-12)
    raw = hp.lmm("y ~ poly(x, 2, raw = TRUE) + (1 | g)", data)
    assert raw.objective == pytest.approx(hp.lmm("y ~ poly(x, 2, raw=True) + (1 | g)", data).objective, rel=1e-12)


def test_an_intercept_removed_inside_a_random_term_reads_as_zero_plus():
    # lme4's (Days - 1 | Subject) was refused (formulae cannot parse x - 1 inside a term), and (x + I(x - 1) + 0 || g)
    # got an intercept term of its own that lme4 does not have
    from conftest import simulated

    data = simulated()
    # (the last of 1, + 0 and - 1 decides, as in R, and an intercept comes first: (1 + x - 1 | g) had got one)
    for written, meant in (("(x - 1 | g)", "(0 + x | g)"), ("(1 | g) + (x - 1 | g)", "(1 | g) + (0 + x | g)"),
                           ("(x + I(x - 1) + 0 || g)", "(0 + x + I(x - 1) || g)"),
                           ("(x + I(x - 1) - 1 | g)", "(0 + x + I(x - 1) | g)"), ("(1 + x - 1 | g)", "(0 + x | g)"),
                           ("(1 + x + 0 | g)", "(0 + x | g)"), ("(1 + x - 1 || g)", "(0 + x | g)"),
                           ("(0 + x + 1 | g)", "(1 + x | g)"), ("(x - 1 + 1 | g)", "(1 + x | g)"),
                           ("(x - 1.0 | g)", "(0 + x | g)")):
        mine, theirs = hp.lmm(f"y ~ x + {written}", data), hp.lmm(f"y ~ x + {meant}", data)
        assert mine.objective == pytest.approx(theirs.objective, rel=1e-12), written
        assert list(mine.varcorr["var1"].dropna()) == list(theirs.varcorr["var1"].dropna()), written
    # a number other than 0 or 1 as a term: R's "invalid model formula" (formulae dropped - 10 silently, or raised
    # a TypeError)
    for formula in ("y ~ x + (x - 10 | g)", "y ~ x + (x + 0.5 | g)", "y ~ 0.5 + x + (1 | g)", "y ~ x - 10 + (1 | g)"):
        with pytest.raises(hp.FormulaError, match="as a term: only 1"):
            hp.lmm(formula, data)


ORDERED_REFERENCE = Path(__file__).parent.parent / "validation" / "ordered_factor_reference.json"


def _ordered_sleepstudy():
    levels = ["early", "mid", "late", "last"]
    sleep = hp.datasets.sleepstudy()
    phase = np.array(levels)[np.searchsorted([0, 3, 6, 8], sleep["Days"], side="right") - 1]
    return sleep.assign(phase=pd.Categorical(phase, categories=levels, ordered=True),
                        half=pd.Categorical(np.where(sleep["Days"] < 5, "first", "second"), ordered=True)), levels


def test_r_polynomial_contrasts_by_contr_poly():
    """C(f, contr_poly) codes a factor with R's contr.poly (f.L, f.Q, f.C), R's coding of an ordered factor: lmer's fixed
    effects, REML criterion (which the coding shifts by a constant), variance components and predictions on new rows
    (validation/ordered_factor_reference.R, whose factors are ordered), in main effects, their interactions with the
    main effects present, without an intercept (a column per level, as R) and as a random slope; glmer's on cbpp.
    (An ordered Categorical written bare keeps treatment contrasts: formulae codes a call's factor otherwise than R
    in an interaction without its main effects, phase:g3.)"""
    reference = json.loads(ORDERED_REFERENCE.read_text())
    sleep, levels = _ordered_sleepstudy()
    new = pd.DataFrame({"Days": [1.0, 4, 9], "Subject": ["308", "309", "new"],
                        "phase": pd.Categorical(["early", "late", "last"], categories=levels, ordered=True),
                        "half": pd.Categorical(["first", "first", "second"], categories=["first", "second"],
                                               ordered=True)})
    for key, r in reference["lmm"].items():
        response, rhs = r["formula"].split("~")
        coded = re.sub(r"\b(phase|half)\b", r"C(\1, contr_poly)", rhs)
        fit = hp.lmm(f"{response}~{coded}", sleep)
        assert fit.objective == pytest.approx(r["reml_criterion"], rel=1e-10), key
        names = [name.replace("phase[", "phase").replace("]", "").replace("Intercept", "(Intercept)")
                 for name in fit.fixef.index]
        assert names == list(r["fixef"]), key
        np.testing.assert_allclose(fit.fixef.to_numpy(), list(r["fixef"].values()), rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(fit.varcorr["sdcor"], r["sdcor"], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(fit.predict(new), r["predict"], rtol=1e-7, err_msg=key)
    slopes = hp.lmm("Reaction ~ Days + (C(half, contr_poly) | Subject)", sleep)
    assert list(slopes.varcorr["var1"].iloc[:2]) == ["Intercept", "half.L"]
    cbpp = hp.datasets.cbpp()
    glmm = hp.glmm("cbind(incidence, size - incidence) ~ C(period, contr_poly) + (1 | herd)", cbpp, family="binomial")
    assert glmm.optimum.deviance == pytest.approx(reference["glmm"]["minus_2_loglik"], rel=1e-8)
    np.testing.assert_allclose(glmm.fixef.to_numpy(), list(reference["glmm"]["fixef"].values()), rtol=1e-5)


@pytest.mark.parametrize("fixed, rest", [("x %in% f + exposure", "%in% f + exposure"), ("x + exposure > 1", "> 1"),
                                         ("x + exposure w", "w"), ("x %% 2 + exposure", "%% 2 + exposure"),
                                         ("x + exposure, w", ", w")])
def test_a_fixed_part_that_formulae_does_not_read_to_its_end_is_refused(data, fixed, rest):
    # formulae's parser stops at a token it has no rule for and returns what it read: y ~ x %in% f + z was fitted as
    # y ~ x, without a word (the forty-second session's probe; lme4 fits f:x + z there)
    with pytest.raises(hp.FormulaError, match=f"stops at {re.escape(repr(rest))}"):
        hp.lmm(f"y ~ {fixed} + (1 | g)", data)
    # after a random term: it was left out too
    with pytest.raises(hp.FormulaError, match=re.escape("is part of the term '(1 | f) exposure'")):
        hp.lmm("y ~ x + (1 | g) + (1 | f) exposure", data)


def test_brackets_r_drops_around_a_term_are_dropped(data):
    # lme4 fits y ~ x + ((1 | g)); it was refused as a formula with no random-effect term
    plain = hp.lmm("y ~ x + (1 | g)", data)
    for formula in ("y ~ x + ((1 | g))", "y ~ ((x)) + (((1 | g)))"):
        fit = hp.lmm(formula, data)
        assert fit.objective == plain.objective and list(fit.fixef.index) == list(plain.fixef.index), formula
    # a term that opens and closes with brackets of its own parts: (x)*(exposure) was refused as unbalanced
    crossed = hp.lmm("y ~ x * exposure + (1 | g)", data)
    for formula in ("y ~ (x)*(exposure) + (1 | g)", "y ~ ((x))*((exposure)) + (1 | g)"):
        fit = hp.lmm(formula, data)
        assert fit.objective == crossed.objective and list(fit.fixef.index) == list(crossed.fixef.index), formula


def test_a_bracketed_sum_of_random_terms_is_its_summands(data):
    # lme4's findbars and nobars look through '(' and '+': these were refused as formulas without a random term
    both = hp.lmm("y ~ x + (1 | g) + (1 | f)", data)
    for formula in ("y ~ x + ((1 | g) + (1 | f))", "y ~ (x + (1 | g)) + ((1 | f))", "y ~ ((x + ((1 | g) + (1 | f))))"):
        fit = hp.lmm(formula, data)
        assert fit.objective == both.objective and list(fit.fixef.index) == list(both.fixef.index), formula
    # a random term multiplied, subtracted or passed to a call is refused by name (lme4 reads (1 | g):x as
    # (1 | g) + x); a bar inside a call's arguments is the fixed part's
    for formula, term in (("y ~ x + (1 | g):exposure + (1 | f)", "(1 | g):exposure"),
                          ("y ~ x - ((1 | g) + (1 | f))", "((1 | g) + (1 | f))"),
                          ("y ~ x + ((1 | g) + exposure)*x + (1 | f)", "((1 | g) + exposure)*x")):
        with pytest.raises(hp.FormulaError, match=rf"\(1 \| g\) of .* is part of the term {re.escape(repr(term))}"):
            hp.lmm(formula, data)
    assert parse_formula("y ~ (x + ((car(area))))").spatial == parse_formula("y ~ x + car(area)").spatial
    with pytest.raises(hp.FormulaError, match="cannot parse formula part") as refused:
        hp.lmm("y ~ x + I((x > 0) | (exposure > 0)) + (1 | g)", data)
    assert "part of the term" not in str(refused.value)


def test_interactions_of_calls_without_their_main_effects_are_built():
    # formulae deep-copies such a term with its namespaces, which failed on the caller's modules ("cannot pickle
    # 'module' object"); the batch reads contr_poly as the single fit does
    sleep, _ = _ordered_sleepstudy()
    sleep = sleep.assign(g=np.where(sleep["Days"] % 3 == 0, "a", "b"))
    # an interaction without main effects spans the cells whatever their coding: the same ML deviance as the
    # plain factors' (REML's would differ by the coding's constant)
    for formula, plain in (("Reaction ~ C(phase, Sum):g + (1 | Subject)", "Reaction ~ phase:g + (1 | Subject)"),
                           ("Reaction ~ g:C(half, contr_poly) + (1 | Subject)", "Reaction ~ g:half + (1 | Subject)")):
        mine, theirs = hp.lmm(formula, sleep, reml=False), hp.lmm(plain, sleep, reml=False)
        assert mine.objective == pytest.approx(theirs.objective, rel=1e-10), formula
        np.testing.assert_allclose(mine.fitted, theirs.fitted, rtol=1e-8)
    two = pd.concat([sleep.assign(rep=0), sleep.assign(rep=1, Reaction=sleep["Reaction"][::-1].to_numpy())])
    batch = hp.fit_batch("Reaction ~ C(phase, contr_poly) + (1 | Subject)", two, by="rep", progress=False)
    single = hp.lmm("Reaction ~ C(phase, contr_poly) + (1 | Subject)", sleep)
    assert list(batch.fixed_names) == list(single.fixef.index)
    np.testing.assert_allclose(batch.fixef.loc[0].to_numpy(), single.fixef.to_numpy(), rtol=1e-8)


def _lme4_name(name: str, ordered: bool = False) -> str:
    """A fixed effect's name as lme4 writes it (``f[q]:c[y]`` -> ``fq:cy``, ``poly(a, 2)[0]`` -> ``poly(a, 2)1``),
    its factors sorted (``c:f`` and ``f:c`` are one term) unless ``ordered``."""
    name = "(Intercept)" if name == "Intercept" else name.replace("**", "^").replace(" ", "")
    name = name.replace("[True]", "TRUE").replace("[False]", "FALSE")  # a logical coded as a factor
    name = re.sub(r"(poly\([^)]*\))\[(\d+)\]", lambda m: f"{m[1]}{int(m[2]) + 1}", name)
    parts = re.sub(r"\[([^\]]*)\]", r"\1", name).split(":")
    return ":".join(parts if ordered else sorted(parts))


def test_interactions_are_lme4s_model_and_coefficients(monkeypatch):
    """formulae and R's model.matrix code a factor in an interaction by different rules: where formulae's columns
    span another model ((a + f):c: 9 columns against lme4's 7; f:c:h alone: 15 dimensions against R's 18) it was
    refused, and where they span lme4's model by other columns (y ~ f:c + h: formulae codes c by contrasts within
    f's indicators, R f by indicators within c's) its coefficients were another parameterization under names alike
    (f[b]:c[u] 0.568 against lme4's fb:cu 0.579, the forty-second session's probe), with a warning.  R's columns
    are now fitted there (spec.r_coding): every formula of validation/formula_coding_reference.R gives lme4's
    deviance, fixed effects by name, and population-level predictions of new rows; with formulae's columns the
    spans that differ are indeed other models (the rule guards a real difference)."""
    from hierpool.spec import design as design_module
    from hierpool.spec.r_coding import RCodedPart, RCoding

    root = Path(__file__).resolve().parent.parent / "validation"
    reference = json.loads((root / "formula_coding_reference.json").read_text())
    data = pd.read_csv(root / "formula_coding_data.csv", dtype={"g": str})
    categorical = data.astype({"f": "category", "c": "category", "h": "category"})
    assert sum(model["formulae_differs"] for model in reference["models"]) == 6
    r_coded = 0
    for frame in (data, categorical):  # (pandas Categoricals, which the frame marks ordered, were once skipped)
        for model in reference["models"]:
            formula = f"{model['formula']} + (1 | g)"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", hp.HierpoolWarning)  # rank-deficient codings drop columns, as lme4's
                fit = hp.lmm(formula, frame, reml=False)
            assert not [w for w in caught if "parameterization" in str(w.message)], formula
            assert fit.objective == pytest.approx(model["deviance"], rel=1e-7), formula
            ours = {_lme4_name(name): value for name, value in fit.fixef.items()}
            theirs = {_lme4_name(name): value for name, value in model["fixef"].items()}
            assert list(ours) == list(theirs), (formula, list(ours), list(theirs))  # lme4's order of columns
            for name, value in theirs.items():
                assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-4), (formula, name)
            if isinstance(fit.design.fixed_matrix, RCodedPart):  # R's columns: lme4's names in lme4's order too
                assert [_lme4_name(name, ordered=True) for name in fit.fixef.index] == [
                    name.replace(" ", "") for name in model["fixef"]], formula
                r_coded += 1
            predicted = fit.predict(frame.iloc[:12], re=False)
            np.testing.assert_allclose(predicted, model["predict_fixed"], rtol=1e-4, atol=1e-4, err_msg=formula)
    assert r_coded >= 2 * 27
    monkeypatch.setattr(design_module, "r_coding", lambda *args: RCoding())
    for model in reference["models"]:
        if model["formulae_differs"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hp.HierpoolWarning)
                unguarded = hp.lmm(f"{model['formula']} + (1 | g)", data, reml=False)
            assert abs(unguarded.objective - model["deviance"]) > 1.0, model["formula"]


def test_a_random_term_given_twice_is_refused(data):
    # hp.lmm warned "nearly unidentifiable"; the batch said nothing, and its table held one sd column for the two
    # (the forty-third session's probe)
    for formula in ("y ~ x + (1 | g) + (1|g)", "y ~ x + (x || g) + (1 | g)"):
        with pytest.raises(hp.FormulaError, match=re.escape("the random-effect term (1 | g) twice")):
            hp.lmm(formula, data)
    # the same columns written otherwise, the same grouping in another order (the review: fitted, the batch's table
    # then refused or held two columns of one variance)
    for formula in ("y ~ x + (x | g) + (1 + x | g)", "y ~ x + (1 | g:f) + (1 | f:g)"):
        with pytest.raises(hp.FormulaError, match="twice"):
            hp.lmm(formula, data)
    with pytest.raises(hp.FormulaError, match="twice"):
        hp.fit_batch("y ~ x + (1 | g) + (1 | g)", [data, data], progress=False)


def test_a_coding_call_in_an_interaction_without_its_margins_is_lmes_model_or_refused():
    """C(f) in (a + C(f)):c, and a logical column a call also reads (written C(lg) for formulae): R's columns were not
    built for such a factor, and formulae's (another model: 9 columns against lme4's 7) were fitted silently (the
    forty-third session's review).  C(f) is now read as f; the user's contrasts (C(f, Sum)) there are refused where
    formulae's span is another model."""
    root = Path(__file__).resolve().parent.parent / "validation"
    reference = {model["formula"]: model for model in json.loads(
        (root / "formula_coding_reference.json").read_text())["models"]}
    data = pd.read_csv(root / "formula_coding_data.csv", dtype={"g": str})
    for formula in ("y ~ (a + f):c", "y ~ f:c:h", "y ~ f:c + h"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.HierpoolWarning)
            fit = hp.lmm(formula.replace("f", "C(f)") + " + (1 | g)", data, reml=False)
        assert fit.objective == pytest.approx(reference[formula]["deviance"], rel=1e-7), formula
        ours = {_lme4_name(name.replace("C(f)", "f")): value for name, value in fit.fixef.items()}
        theirs = {_lme4_name(name): value for name, value in reference[formula]["fixef"].items()}
        assert set(ours) == set(theirs) and all(ours[k] == pytest.approx(theirs[k], abs=1e-4) for k in ours), formula
    with pytest.raises(hp.FormulaError, match="coded by contrasts hierpool does not build"):
        hp.lmm("y ~ (a + C(f, Sum)):c + (1 | g)", data, reml=False)
    with pytest.raises(hp.FormulaError, match=r"the user's contrasts \(C\(f, Sum\)\)"):  # (a nesting of one)
        hp.lmm("y ~ C(f, Sum)/c + (1 | g)", data, reml=False)
    # a logical column a call reads too is a factor of levels False, True: lme4's x:lgTRUE, not formulae's coding
    logical = data.assign(lg=data["a"] > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        called = hp.lmm("y ~ lg:c + I(lg * b) + (1 | g)", logical, reml=False)
        plain = hp.lmm("y ~ lg:c + lgb + (1 | g)", logical.assign(lgb=logical["lg"] * logical["b"]), reml=False)
    assert called.objective == pytest.approx(plain.objective, rel=1e-10)
    cells = [name for name in plain.fixef.index if name.startswith("lg[")]
    assert cells[:2] == ["lg[False]:c[x]", "lg[True]:c[x]"]
    np.testing.assert_allclose(called.fixef.loc[cells], plain.fixef.loc[cells], rtol=1e-7)


def test_a_random_term_of_no_columns_is_refused_by_name(data):
    # (1 + 0 | g): formulae's matrix of no columns is None, and an AttributeError followed (the forty-third
    # session's review)
    for formula in ("y ~ x + (1 | g) + (1 + 0 | f)", "y ~ x + (1 - 1 | g)"):
        with pytest.raises(hp.FormulaError, match=r"random-effect term \(1 (\+ 0|- 1) \| (f|g)\) has no columns"):
            hp.lmm(formula, data)


def test_a_calls_place_in_a_terms_name_does_not_depend_on_its_spacing():
    # formulae writes exp(a / 3) for exp(a/3): found by its text, it was put last in its term's R-coded name
    # (f[q]:exp(a / 3) where lme4 names exp(a/3):fq; the third review)
    data = pd.read_csv(Path(__file__).resolve().parent.parent / "validation" / "formula_coding_data.csv",
                       dtype={"g": str})
    tight, spaced = (hp.lmm(f"y ~ {call}/f/c + (1 | g)", data, reml=False) for call in ("exp(a/3)", "exp(a / 3)"))
    assert list(tight.fixef.index) == list(spaced.fixef.index)
    assert list(tight.fixef.index)[2:4] == ["exp(a / 3):f[q]", "exp(a / 3):f[p]:c[y]"]


def test_binary_without_a_success_level_is_a_whole_column_call():
    """formulae's binary(f) with no success level takes the first sorted value of the column it is given: a batch
    takes each dataset's own (batch.dataset_transforms); with the level named, by keyword or place, it is a
    function of each row.  Its arguments are read at the top level (a comma inside C(f, Sum) is not a second)."""
    from hierpool.spec.transforms import stateful_calls

    assert stateful_calls("y ~ x + I(z + binary(f)) + (1 | g)") == ["binary"]
    assert stateful_calls("y ~ binary(C(f, Sum)) + scale(x)") == ["binary", "scale"]
    assert stateful_calls("y ~ binary(f, success='b')") == stateful_calls("y ~ binary(f, 'b')") == []
