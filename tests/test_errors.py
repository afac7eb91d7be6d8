"""Bad input gets a HierpoolError naming the culprit; nothing the user passed is modified."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import simulated

import hierpool as hp

FORMULA = "y ~ x + (1 | g)"


@pytest.fixture
def data():
    return simulated()


def test_missing_column(data):
    with pytest.raises(hp.DataError, match="'z'"):
        hp.lmm("y ~ z + (1 | g)", data)


def test_missing_grouping_column(data):
    with pytest.raises(hp.DataError, match="'school'"):
        hp.lmm("y ~ x + (1 | school)", data)


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g", "y ~ x +", "y x + (1|g)", "y ~ x + 1 | g", "y ~ x + (| g)"])
def test_formula_syntax_errors(data, formula):
    with pytest.raises(hp.FormulaError):
        hp.lmm(formula, data)


def test_no_random_effect_term(data):
    with pytest.raises(hp.FormulaError, match="no random-effect term"):
        hp.lmm("y ~ x", data)


def test_non_numeric_response(data):
    data = data.assign(y=data.g)
    with pytest.raises(hp.DataError, match="response 'y' must be numeric"):
        hp.lmm(FORMULA, data)


def test_constant_response(data):
    with pytest.raises(hp.DataError, match="response 'y' is constant"):
        hp.lmm(FORMULA, data.assign(y=3.0))


def test_infinite_values(data):
    data.loc[3, "x"] = np.inf
    with pytest.raises(hp.DataError, match="column 'x' has infinite values"):
        hp.lmm(FORMULA, data)


def test_a_transformed_column_that_is_not_finite_is_refused_by_name(data):
    # log(0), log(-1), exp() overflowing: a LinAlgError from the rank check's SVD, a SciPy linprog error from a
    # GLMM's separation check, NumPyro's invalid loc; a slope's "zero or a copy" (the wrong reason)
    bad = data.assign(x2=np.abs(data["x"]) + 1.0)
    bad.loc[bad.index[4], "x2"] = 0.0
    counts = bad.assign(count=(data["y"] > 0).astype(int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's own, from log(0) as formulae evaluates it
        with pytest.raises(hp.DataError, match=r"fixed-effect column 'log\(x2\)' is not finite in 1 row\(s\) \(rows \[4\]\)"):
            hp.lmm("y ~ log(x2) + (1 | g)", bad)
        with pytest.raises(hp.DataError, match=r"column 'log\(x2\)' is not finite"):
            hp.glmm("count ~ log(x2) + (1 | g)", counts, family="poisson")
        with pytest.raises(hp.DataError, match=r"random-effect term \(0 \+ log\(x2\) \| g\) column 'log\(x2\)'"):
            hp.lmm("y ~ x + (0 + log(x2) | g)", bad)
        batch = hp.fit_batch("y ~ log(x2) + (1 | g)", {"ok": data.assign(x2=bad["x2"] + 1.0), "bad": bad},
                             progress=False)
    assert np.isfinite(batch.objective["ok"]) and np.isnan(batch.objective["bad"])
    assert "'log(x2)' is not finite" in batch.messages["bad"]


def test_a_factor_of_one_level_whose_term_vanishes_is_warned(data):
    # treatment contrasts of one level are no column: the term was left out silently (R refuses the factor)
    with pytest.warns(hp.HierpoolWarning, match=r"factor\(s\) \['f'\] have one level in the data"):
        fit = hp.lmm("y ~ x + f + (1 | g)", data.assign(f="a"))
    assert list(fit.fixef.index) == ["Intercept", "x"]
    with pytest.warns(hp.HierpoolWarning, match=r"factor\(s\) \['f'\] have one level"):  # f.x is another column
        hp.lmm("y ~ x + f + f.x + (1 | g)", data.assign(f="a", **{"f.x": data["x"] ** 2}))


def test_a_date_column_is_refused_with_how_to_convert_it(data):
    # it was refused as "Python objects (Timestamp)", which a datetime64 column is not
    dated = data.assign(t=pd.Timestamp("2024-01-01") + pd.to_timedelta(np.abs(data["x"]) * 10, unit="D"))
    with pytest.raises(hp.DataError, match=r"column 't' holds dates or times \(datetime64\[ns\]\): convert it to a"):
        hp.lmm("y ~ t + (1 | g)", dated)


def test_a_nesting_operator_formulae_cannot_build_is_r_expanded_or_refused(data):
    # formulae's f/x gave labels that do not match its matrix: a reshape error, or a silently shorter X.  In the
    # fixed part R's columns of the same terms are fitted since the forty-third session (R's f + f:x); in a random
    # term it is refused
    grouped = data.assign(f=np.where(data["x"] > 0, "a", "b"))
    nested, expanded = hp.lmm("y ~ f/x + (1 | g)", grouped), hp.lmm("y ~ f + f:x + (1 | g)", grouped)
    assert nested.objective == pytest.approx(expanded.objective, rel=1e-12)
    np.testing.assert_allclose(nested.fixef.to_numpy(), expanded.fixef.to_numpy(), rtol=1e-10)
    with pytest.raises(hp.FormulaError, match="a term it cannot build"):
        hp.lmm("y ~ x + (f/x | g)", grouped)


def test_single_level_grouping_factor(data):
    with pytest.raises(hp.DataError, match="grouping factor 'g' has only one level"):
        hp.lmm(FORMULA, data.assign(g="a"))


def test_as_many_random_effects_as_observations(data):
    data = data.assign(obs=np.arange(len(data)))
    with pytest.raises(hp.DataError, match="'obs'"):
        hp.lmm("y ~ x + (1 | obs)", data)
    with pytest.raises(hp.DataError, match="random effects"):
        hp.lmm("y ~ x + (x | h2)", data.assign(h2=np.arange(len(data)) // 2))


def test_empty_data(data):
    with pytest.raises(hp.DataError, match="empty"):
        hp.lmm(FORMULA, data.iloc[:0])


def test_not_a_dataframe(data):
    with pytest.raises(hp.DataError, match="DataFrame"):
        hp.lmm(FORMULA, data.to_dict())


def test_prediction_data_missing_column(data):
    fit = hp.lmm(FORMULA, data)
    with pytest.raises(hp.DataError, match="'x'"):
        fit.predict(data.drop(columns="x"))
    with pytest.raises(hp.DataError, match="'g'"):
        fit.predict(data.drop(columns="g"))


def test_bad_interval_arguments(data):
    fit = hp.lmm(FORMULA, data)
    with pytest.raises(hp.ArgumentError, match="interval"):
        fit.predict(interval="credible")
    with pytest.raises(hp.ArgumentError, match="level"):
        fit.predict(interval="confidence", level=95)


def test_rows_with_missing_values_are_dropped_and_counted(data):
    full = hp.lmm(FORMULA, data.iloc[4:])
    data.loc[0, "y"] = np.nan
    data.loc[1, "x"] = np.nan
    data.loc[2, "g"] = None
    with pytest.warns(hp.HierpoolWarning, match="dropped 3 of 71 rows"):
        fit = hp.lmm(FORMULA, data.drop(index=3))
    assert fit.nobs == 68
    assert fit.objective == full.objective  # exactly rows 4.. remain: the three NaN rows went


def test_the_design_s_warnings_point_at_the_user_s_line_from_every_entry_point(data):
    """The dropped rows' and the aliased columns' warnings name the line that called hierpool, however deep the
    check sits: through hp.lmm's MixedModel they named hierpool/closedform/model.py."""
    data = data.assign(x2=2 * data["x"])
    data.loc[0, "y"] = np.nan
    binary = data.assign(y=(data["y"] > data["y"].median()).astype(float).where(data["y"].notna()))
    calls = [lambda: hp.lmm("y ~ x + x2 + (1 | g)", data), lambda: hp.MixedModel("y ~ x + x2 + (1 | g)", data),
             lambda: hp.glmm("y ~ x + x2 + (1 | g)", binary, family="binomial"),
             lambda: hp.lmm("y ~ x + x2 + (1 | g)", data, correlation=hp.ar1("g")),
             lambda: hp.fit_batch("y ~ x + x2 + (1 | g)", [data, data], progress=False)]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        design = [w for w in caught if re.match(r"dropped \d of", str(w.message)) or "rank deficient" in str(w.message)]
        assert len(design) == 2 and all(w.filename == __file__ for w in design), [(w.filename, w.lineno) for w in design]


def test_dropped_rows_warn_that_a_stateful_transform_is_computed_on_the_rows_kept(data):
    # lme4 computes scale(x) and poly(x, 2) on every row before na.omit: with a response missing, its centre and
    # basis (and the REML criterion) differ from the fit on the rows kept, which the warning now says
    data.loc[3, "y"] = np.nan
    for formula, name in (("y ~ scale(x) + (1 | g)", "scale"), ("y ~ poly(x, 2) + (1 | g)", "poly")):
        with pytest.warns(hp.HierpoolWarning, match=rf"dropped 1 of 72 rows .*; {name}\(\) computed on the rows kept"):
            hp.lmm(formula, data)


def test_rank_deficient_fixed_effects_drop_named_columns(data):
    data = data.assign(x2=2 * data.x)
    with pytest.warns(hp.HierpoolWarning, match="x2"):
        fit = hp.lmm("y ~ x + x2 + (1 | g)", data)
    assert list(fit.fixef.index) == ["Intercept", "x"]
    reference = hp.lmm("y ~ x + (1 | g)", data)
    assert fit.objective == pytest.approx(reference.objective, rel=1e-12)


def test_input_frame_not_modified(data):
    before = data.copy(deep=True)
    data.loc[0, "y"] = np.nan
    before.loc[0, "y"] = np.nan
    with pytest.warns(hp.HierpoolWarning):
        hp.lmm(FORMULA, data).predict(data.dropna(), interval="prediction")
    pd.testing.assert_frame_equal(data, before)


def test_theta_of_wrong_length(data):
    with pytest.raises(hp.ArgumentError, match="theta must have 1 values"):
        hp.MixedModel(FORMULA, data).objective([1.0, 2.0])


def test_unused_columns_with_missing_values_drop_nothing(data):
    data.loc[3, "h"] = np.nan
    fit = hp.lmm(FORMULA, data)
    assert fit.nobs == len(data)


def test_a_grouping_factor_that_names_a_function_is_a_missing_column(data):
    # pi and log are defined in every formula (R's names), but a grouping factor must be a data column
    for name in ("pi", "log"):
        with pytest.raises(hp.DataError, match=f"grouping factor .* uses column '{name}'"):
            hp.lmm(f"y ~ x + (1 | {name})", data)


def test_nullable_numeric_columns_fit_as_float64_and_are_not_modified(data):
    nullable = data.assign(y=data.y.astype("Float64"), x=data.x.astype("Float64"))
    before = nullable.dtypes.copy()
    fit = hp.lmm("y ~ x + (1 | g)", nullable)
    assert fit.objective == pytest.approx(hp.lmm("y ~ x + (1 | g)", data).objective, rel=1e-12)
    assert nullable.dtypes.equals(before)


@pytest.mark.parametrize("value", ["no", "False", "ML", 0, None])
def test_reml_that_is_not_a_bool_is_refused_by_name(value):
    """reml="False" or "ML" is truthy: it fitted REML silently (hp.lmm, hp.fit_batch); a bool is asked for."""
    import hierpool as hp

    data = hp.datasets.sleepstudy()
    with pytest.raises(hp.ArgumentError, match="reml must be True or False"):
        hp.lmm("Reaction ~ Days + (1 | Subject)", data, reml=value)
    with pytest.raises(hp.ArgumentError, match="reml must be True or False"):
        hp.glmm("y ~ Days + (1 | Subject)", data.assign(y=data["Reaction"] > 300), reml=value)
    if value is not None:  # fit_batch's None: REML for a linear model, ML for a GLMM
        with pytest.raises(hp.ArgumentError, match="reml must be True or False"):
            hp.fit_batch("Reaction ~ Days + (1 | Subject)", [data], reml=value, progress=False)


@pytest.mark.parametrize("values", [lambda x: x.astype(object),  # numbers held as objects
                                    lambda x: x.astype(object).where(np.arange(x.size) % 2 == 0, x.astype(str))])
def test_a_column_of_numbers_held_as_objects_is_refused_by_name(data, values):
    # formulae refused it without naming the column ("Variable is of an unrecognized type")
    with pytest.raises(hp.DataError, match=r"column 'x' \(dtype object\) holds Python objects \((float|float, str)\)"):
        hp.lmm(FORMULA, data.assign(x=values(data["x"])))
    labels = data.assign(g=data["g"].astype(object).where(np.arange(len(data)) % 2 == 0, 7))
    assert np.isfinite(hp.lmm(FORMULA, labels).objective)  # a grouping factor's labels may be of any type


@pytest.mark.parametrize("seed", [-1, 1.5, "a", True, 2**63])
def test_a_seed_that_is_not_a_small_enough_integer_is_refused_by_name(data, seed):
    """NumPy's default_rng and JAX's PRNGKey raised their own ValueError, TypeError or OverflowError, naming nothing."""
    fit = hp.lmm(FORMULA, data)
    for call in (lambda: hp.simulate(fit, 2, seed=seed), lambda: hp.bootstrap(fit, 2, seed=seed),
                 lambda: hp.bayes(FORMULA, data, seed=seed)):
        with pytest.raises(hp.ArgumentError, match="seed must be an integer"):
            call()


@pytest.mark.parametrize("level", ["a", None, 95, float("nan")])
def test_a_level_that_is_not_a_probability_is_refused_by_name(data, level):
    """A string or None reached a comparison (Python's TypeError) or float() (ValueError) before the range check."""
    fit = hp.lmm(FORMULA, data)
    with pytest.raises(hp.ArgumentError, match="level must be between 0 and 1"):
        hp.bootstrap(fit, 2, level=level)
    with pytest.raises(hp.ArgumentError, match="level must be between 0 and 1"):
        fit.predict(interval="confidence", level=level)


@pytest.mark.parametrize("use_u", ["False", None, 1])
def test_use_u_that_is_not_a_bool_is_refused_by_name(data, use_u):
    """use_u="False" is truthy: it simulated conditionally on the BLUPs, silently."""
    with pytest.raises(hp.ArgumentError, match="use_u must be True or False"):
        hp.simulate(hp.lmm(FORMULA, data), 2, use_u=use_u)


def test_control_and_the_stage_methods_check_their_arguments_by_name(sleepstudy):
    """Control's fields reached scipy or NLopt as their own errors, or were accepted (grad_tol=-1 warned that a
    gradient of 3.7e-13 was too large); MixedModel.fit(reml="ML") and objective(theta, reml="ML") gave the REML
    fit and criterion (1773.68 where the deviance is 1784.64), read as true."""
    formula = "Reaction ~ Days + (Days | Subject)"
    for kwargs, match in [({"max_iter": "5"}, "Control.max_iter"), ({"ftol": float("nan")}, "Control.ftol"),
                          ({"grad_tol": -1}, "Control.grad_tol"), ({"theta_start": "abc"}, "Control.theta_start"),
                          ({"compile": "yes"}, "Control.compile")]:
        with pytest.raises(hp.ArgumentError, match=match):
            hp.Control(**kwargs)
    with pytest.raises(hp.ArgumentError, match="control must be an hp.Control"):
        hp.lmm(formula, sleepstudy, control={"max_iter": 5})
    model = hp.MixedModel(formula, sleepstudy)
    with pytest.raises(hp.ArgumentError, match="reml must be True or False"):
        model.fit(reml="ML")
    with pytest.raises(hp.ArgumentError, match="reml must be True or False"):
        model.objective([1, 0, 1], reml="ML")
    with pytest.raises(hp.ArgumentError, match="theta must be 3 numbers"):
        model.objective("x")
    with pytest.raises(hp.ArgumentError, match="theta must be finite"):
        model.at([np.nan, 0, 1])


def test_what_the_fuzz_probe_found_is_refused_by_name(sleepstudy):
    """Each was a traceback, a NaN or inf, or a plausible wrong number: new data not finite (inf predicted, or the
    log of a negative NaN); an index repeating labels under AR(1) residuals (a false "repeats a time" error, or an
    IndexError); truthy strings for flags (bayes="no" ran the sampler); a complex response (its imaginary part
    dropped); a number as a grouping factor; anova's names as one string; ridge multipliers of text; a plot's
    grouping factor that is not the fit's."""
    formula = "Reaction ~ Days + (Days | Subject)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm(formula, sleepstudy)
        logged = hp.lmm("Reaction ~ log(Days + 1) + (1 | Subject)", sleepstudy)
    with pytest.raises(hp.DataError, match="column 'Days' is not finite in 1 row"):
        fit.predict(sleepstudy.iloc[:2].assign(Days=[np.inf, 1.0]))
    with pytest.raises(hp.DataError, match=r"column 'log\(Days \+ 1\)' is not finite"):
        logged.predict(sleepstudy.iloc[:2].assign(Days=-5.0))
    with pytest.raises(hp.DataError, match="index repeats 179 label"):
        hp.lmm("Reaction ~ Days + (1 | Subject)", sleepstudy.set_axis([0] * 180),
               correlation=hp.ar1("Subject", "Days"))
    with pytest.raises(hp.ArgumentError, match="bayes must be True or False"):
        hp.pooling(formula, sleepstudy, bayes="no")
    with pytest.raises(hp.ArgumentError, match="polish must be True or False"):
        hp.fit_batch("Reaction ~ Days + (1 | Subject)", [sleepstudy], by="rep", polish="no")
    with pytest.raises(hp.ArgumentError, match="keep_draws must be True or False"):
        hp.bayes_batch("Reaction ~ Days + (1 | Subject)", [sleepstudy], by="rep", keep_draws="yes")
    with pytest.raises(hp.DataError, match="complex numbers"):
        hp.lmm(formula, sleepstudy.assign(Reaction=sleepstudy["Reaction"].astype(complex)))
    numbered = sleepstudy.set_axis([0, 1, 2], axis=1)
    with pytest.raises(hp.FormulaError, match="must be a column name, got the number 2"):
        hp.lmm("0 ~ 1 + (1 | 2)", numbered)
    with pytest.raises(hp.DataError, match="named by numbers"):
        hp.lmm("`0` ~ 1 + (1 | `2`)", numbered)
    with pytest.raises(hp.ArgumentError, match="names must be a list of strings"):
        hp.anova(fit, fit, names="ab")
    with pytest.raises(hp.ArgumentError, match="names must differ"):
        hp.anova(fit, fit, names=["a", "a"])
    with pytest.raises(hp.DataError, match="column 'x' holds values up to 9e\\+160"):  # (dropped as aliased)
        hp.lmm("Reaction ~ x + (1 | Subject)", sleepstudy.assign(x=sleepstudy["Days"] * 1e160))
    with pytest.raises(hp.ArgumentError, match="multipliers"):
        hp.ridge_view(fit, multipliers="a")
    with pytest.raises(hp.ArgumentError, match="group='nope'"):
        hp.ridge_view(fit, multipliers=[0.5, 2.0]).plot(group="nope")


def test_narrow_numeric_columns_are_read_as_float64_in_fitting_and_prediction():
    """A uint8 t read in its own dtype wrapped in formula arithmetic (I(t - 50) is t + 206 below 50) and NumPy ran
    log() of an int8 in float16: other fits and predictions, silently.  Every number is now read as float64, as R
    holds it; a nullable (Float64) offset column in new data is read too (it raised an AttributeError)."""
    rng = np.random.default_rng(0)
    wide = pd.DataFrame({"t": rng.integers(1, 100, 120), "c": rng.integers(1, 100, 120),
                         "e": rng.integers(1, 5, 120), "g": np.repeat(list("abcdefgh"), 15)})
    wide["y"] = 0.01 * wide["t"] + np.log(wide["c"]) + rng.normal(size=120)
    narrow = wide.astype({"t": np.uint8, "c": np.int8, "e": np.uint8})
    for formula in ("y ~ I(t - 50) + (1 | g)", "y ~ log(c) + I(t * t) + offset(log(e)) + (1 | g)"):
        expected = hp.lmm(formula, wide)
        got = hp.lmm(formula, narrow)
        assert got.objective == pytest.approx(expected.objective, rel=1e-12)
        np.testing.assert_allclose(got.fixef, expected.fixef, rtol=1e-10)
        np.testing.assert_allclose(expected.predict(narrow.iloc[:5]), expected.predict(wide.iloc[:5]), rtol=1e-12)
        np.testing.assert_allclose(expected.predict(wide.iloc[:5].astype({"e": "Float64"})),
                                   expected.predict(wide.iloc[:5]), rtol=1e-12)
    # int64 epoch milliseconds: I(t * t) overflowed in int64; a binomial cbind's arithmetic ran in uint8
    epoch = wide.assign(t=1_700_000_000_000 + rng.integers(0, 10**9, 120))
    np.testing.assert_allclose(hp.lmm("y ~ I(t * t) + (1 | g)", epoch).fixef,
                               hp.lmm("y ~ I(t * t) + (1 | g)", epoch.astype({"t": float})).fixef, rtol=1e-10)
    counts = wide.assign(s=rng.integers(0, 100, 120), n=100)
    formula = "cbind(s, 2 * n - s) ~ 1 + (1 | g)"
    assert hp.glmm(formula, counts.astype({"s": np.uint8, "n": np.uint8}), family="binomial").objective == \
        pytest.approx(hp.glmm(formula, counts, family="binomial").objective, rel=1e-12)


def test_columns_too_small_to_square_and_infinite_new_offsets_are_refused_by_name():
    """A covariate of 1e-200 underflowed in its squares: LinAlgError from hp.lmm and fit_batch, and a posterior of
    the prior from hp.bayes, silently; it is refused by name, as one beyond 1e150 is, while a new row's value may be
    that small.  An infinite offset in new data (log of a zero exposure) predicted -inf; it is refused, as in
    fitting."""
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"x": rng.normal(size=60), "e": rng.integers(1, 5, 60).astype(float),
                         "g": np.repeat(list("abcdef"), 10)})
    data["y"] = data["x"] + rng.normal(size=60)
    with pytest.raises(hp.DataError, match="fixed-effect column 'x' holds values no larger than .* rescale it"):
        hp.lmm("y ~ x + (1 | g)", data.assign(x=data["x"] * 1e-200))
    with pytest.raises(hp.DataError, match="term \\(x \\| g\\) column 'x' holds values no larger than"):
        hp.lmm("y ~ 1 + (x | g)", data.assign(x=data["x"] * 1e-200))
    # a product of two small covariates (units of 1e-80: a:b near 5e-160) fits as at its own scale
    small = data.assign(a=data["x"] * 1e-80, b=(data["x"] + 1) * 1e-80)
    np.testing.assert_allclose(hp.lmm("y ~ a:b + (1 | g)", small, reml=False).objective,
                               hp.lmm("y ~ a:b + (1 | g)", small.assign(a=small["a"] * 1e80, b=small["b"] * 1e80),
                                      reml=False).objective, rtol=1e-10)
    fit = hp.lmm("y ~ x + offset(log(e)) + (1 | g)", data)
    assert np.isfinite(fit.predict(data.iloc[:2].assign(x=1e-200))).all()
    with pytest.raises(hp.DataError, match="the offset' is not finite in 1 row"):
        fit.predict(data.iloc[:2].assign(e=[0.0, 1.0]))


def test_the_word_none_in_a_formula_is_refused_by_name(data):
    """formulae reads None as Python's None, and sorting the formula's names with it raised a TypeError."""
    for formula in ("y ~ x + None + (1 | g)", "y ~ x + (x + None | g)", "None ~ x + (1 | g)"):
        with pytest.raises(hp.FormulaError, match="names None, which is not a column"):
            hp.lmm(formula, data.assign(**{"None": data["x"]}))


def test_a_grouping_column_whose_values_read_as_one_level_is_refused(data):
    """An object column holding 3 and "3" made two groups both labelled "3" (another fit, ranef rows alike), and 3.0
    beside "3" two groups "3.0" and "3", where R's factor() reads one level "3"; refused by name.  Labels of other
    types that do not meet (7 beside text labels) are read as before."""
    mixed = data.assign(g=data["g"].astype(object))
    mixed.loc[mixed.index[:5], "g"] = 3
    mixed.loc[mixed.index[5:10], "g"] = "3"
    with pytest.raises(hp.DataError, match="grouping column 'g' holds values of types int, str that all read as the "
                                           "level '3'"):
        hp.lmm(FORMULA, mixed)
    fit = hp.lmm(FORMULA, data)
    with pytest.raises(hp.DataError, match="types float, str that all read as the level '1'"):
        fit.predict(data.iloc[:3].assign(g=pd.Series([1.0, "1", "b"], index=data.index[:3], dtype=object)))
    mixed.loc[mixed.index[5:10], "g"] = "three"
    assert np.isfinite(hp.lmm(FORMULA, mixed).objective)


def test_a_response_beyond_a_floats_squares_and_a_factor_of_a_level_per_row_are_refused_by_name(data):
    """These ended in 'objective is not finite at the starting value' with NumPy's warnings, naming nothing."""
    with pytest.raises(hp.DataError, match="response column 'y' holds values up to .*beyond 1e\\+150"):
        hp.lmm(FORMULA, data.assign(y=data["y"] * 1e300))
    with pytest.raises(hp.DataError, match="response column 'y' holds values no larger than"):
        hp.lmm(FORMULA, data.assign(y=data["y"] * 1e-300))
    small = hp.lmm(FORMULA, data.assign(y=data["y"] * 1e-120))
    np.testing.assert_allclose(small.fixef * 1e120, hp.lmm(FORMULA, data).fixef, rtol=1e-8)
    with pytest.raises(hp.DataError, match="the fixed part has 72 independent columns for 72 observations"):
        hp.lmm(FORMULA, data.assign(x=data["x"].astype(str)))


def test_a_prediction_interval_of_a_weighted_model_names_where_new_weights_come_from(data):
    """Weights given as an array cannot weight new rows (the message read "a column 'named by weights='"); weights
    from a column are read from newdata's column of that name."""
    weighted = data.assign(w=1.0 + np.arange(len(data)) % 3)
    by_array = hp.lmm(FORMULA, weighted, weights=weighted["w"].to_numpy())
    with pytest.raises(hp.ArgumentError, match="weights were given as an array, which new rows cannot carry"):
        by_array.predict(weighted.head(2), interval="prediction")
    by_column = hp.lmm(FORMULA, weighted, weights="w")
    with pytest.raises(hp.ArgumentError, match="in a column 'w' of newdata"):
        by_column.predict(weighted.head(2).drop(columns="w"), interval="prediction")
    wide = by_column.predict(weighted.head(2).assign(w=0.5), interval="prediction")
    narrow = by_column.predict(weighted.head(2).assign(w=2.0), interval="prediction")
    assert np.all(wide["se"] > narrow["se"])
