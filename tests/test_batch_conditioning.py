"""hp.fit_batch on random-effect columns far from centred or unit scale (hierpool.batch.conditioning): each dataset
that needs it is searched on its own columns centred and scaled, as hp.lmm's fit is, and mapped back."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import assert_term_effects_match, binomial_groups

import hierpool as hp
from hierpool.algebra.conditioning import term_transforms, thetas_to_user


def _groups(seed: int, shift: float = 0.0, scale: float = 1.0) -> pd.DataFrame:
    """y = 1 + 0.5 x + a's intercept and slope + b's intercept (nested in a) + noise, x then shifted and scaled."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(6):
        intercept, slope = rng.normal(0, 1.0), rng.normal(0, 0.4)
        for j in range(3):
            nested = rng.normal(0, 0.6)
            for t in range(5):
                x = rng.normal()
                rows.append((f"a{i}", f"b{j}", f"s{i}_{j}", t, shift + scale * x,
                             1 + 0.5 * x + intercept + slope * x + nested + rng.normal()))
    return pd.DataFrame(rows, columns=["a", "b", "s", "t", "x", "y"])


def _assert_rows_are_single_fits(batch, frames, formula, **kwargs):
    """Each row is hp.lmm's fit of its dataset: the criterion to 1e-9, the rest to 1e-4 (an intercept's BLUP at
    x = 0, 2000 units from the data, moves ten thousand times as much as theta's digits at the optimum)."""
    for d, frame in enumerate(frames):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = hp.lmm(formula, frame, **kwargs)
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-9), f"criterion of dataset {d}"
        assert batch.converged.iloc[d] and not batch.refit.iloc[d], batch.messages.iloc[d]
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-5, err_msg=f"beta of {d}")
        np.testing.assert_allclose(batch.theta[d], fit.theta, rtol=1e-4, atol=1e-6, err_msg=f"theta of {d}")
        assert bool(batch.is_singular.iloc[d]) == bool(fit.is_singular)
        assert_term_effects_match(batch, d, fit, 1e-4, cond_sd=True)


def test_a_slope_on_a_calendar_year_equals_its_single_fit():
    """(1 + x | a) with x around 2000 in one dataset, 1e-4 times smaller in another: the search from the moment
    start stopped on the intercept-slope ridge, 5 units of -2 log L above hp.lmm's fit, reported converged."""
    formula = "y ~ x + (1 + x | a)"
    frames = [_groups(1), _groups(1, shift=2000.0), _groups(2, scale=1e-4), _groups(3, shift=-500.0, scale=30.0)]
    batch = hp.fit_batch(formula, frames, progress=False)
    _assert_rows_are_single_fits(batch, frames, formula)
    # the model is the same in any parametrization of x: the shifted dataset's criterion is the unshifted one's
    assert batch.objective.iloc[1] == pytest.approx(batch.objective.iloc[0], rel=1e-9)


@pytest.mark.parametrize("model", ["several terms", "ar1"])
def test_several_terms_and_ar1_residuals_on_a_calendar_year(model):
    formula = {"several terms": "y ~ x + (1 + x | a) + (1 | a:b)", "ar1": "y ~ x + (1 + x | a)"}[model]
    kwargs = {"ar1": {"correlation": hp.ar1("s", time="t")}}.get(model, {})
    frames = [_groups(4), _groups(4, shift=2000.0)]
    batch = hp.fit_batch(formula, frames, progress=False, **kwargs)
    _assert_rows_are_single_fits(batch, frames, formula, **kwargs)
    assert batch.objective.iloc[1] == pytest.approx(batch.objective.iloc[0], rel=1e-9)


def test_the_transforms_of_each_group_are_each_groups_own():
    """term_transforms over groups of rows is hp.lmm's transform of each group's rows, written out here: with a
    constant column (2) the others centred and scaled by their own mean and sd (a column constant in a group kept),
    without one each scaled by its root mean square; thetas_to_user gives each row the lower-triangular factor, its
    diagonal >= 0, of the same covariance (M T)(M T)^T."""
    rng = np.random.default_rng(0)
    z = np.column_stack([np.full(30, 2.0), 2000 + rng.normal(size=30), 1e-4 * rng.normal(size=30)])
    z[20:, 1] = 7.0
    group = np.repeat([0, 1, 2], 10)
    centred = term_transforms(z, group, 3)
    scaled = term_transforms(z[:, 1:], group, 3)
    for g in range(3):
        rows = z[group == g]
        expected, no_intercept = np.eye(3), np.diag(1.0 / np.sqrt(np.mean(rows[:, 1:] ** 2, axis=0)))
        for c in (1, 2):
            sd = rows[:, c].std()
            if sd > 0:
                expected[c, c], expected[0, c] = 1.0 / sd, -rows[:, c].mean() / (sd * 2.0)
        np.testing.assert_allclose(centred[g], expected, rtol=1e-12, atol=0)
        if g < 2:  # (in group 2 the column of 7s is a constant column: the other is centred on it)
            np.testing.assert_allclose(scaled[g], no_intercept, rtol=1e-12, atol=0)
    assert centred[2][1, 1] == 1.0 and centred[2][0, 1] == 0.0  # the column constant in group 2: kept
    thetas = rng.normal(size=(3, 6 + 3))
    transforms = (centred, scaled)
    users = thetas_to_user(thetas, transforms)
    for g in range(3):
        for t, (k, first, user_first) in enumerate(((3, 0, 0), (2, 6, 6))):
            rows, cols = np.tril_indices(k)
            order = np.lexsort((rows, cols))  # lme4's column-major order of the lower triangle
            factor, user = np.zeros((k, k)), np.zeros((k, k))
            factor[rows[order], cols[order]] = thetas[g, first:first + k * (k + 1) // 2]
            user[rows[order], cols[order]] = users[g, user_first:user_first + k * (k + 1) // 2]
            mapped = transforms[t][g] @ factor
            np.testing.assert_allclose(user @ user.T, mapped @ mapped.T, rtol=1e-10, atol=1e-12)
            assert np.all(np.diag(user) >= 0)

def test_a_glmm_slope_on_a_timestamp_is_converged_in_hp_glmm_as_in_its_batch_row():
    # Bernoulli, (t | g) with t a timestamp (~1.6e9, a range of 3e7): hp.glmm checked lme4's rules on the user's
    # columns, where the Hessian looked indefinite along the intercept ("failed to converge"), while the batch's row
    # (checked on the conditioned columns, as hp.lmm's conditioned fits) said converged at the same deviance, and the
    # model on t centred and scaled converges there in both.  Now hp.glmm checks the conditioned fit too
    rng = np.random.default_rng(310)
    group, t = np.repeat(np.arange(12), 6), 1.6e9 + rng.uniform(0, 3e7, 72)
    y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 + (t - 1.6e9) / 1e7 * 0.5 + rng.normal(0, 0.8, 12)[group]))))
    data = pd.DataFrame({"y": y, "t": t, "g": group})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm("y ~ t + (t | g)", data, family="binomial")
        scaled = hp.glmm("y ~ s + (s | g)", data.assign(s=(t - 1.6e9) / 1e7), family="binomial")
        batch = hp.fit_batch("y ~ t + (t | g)", [data], family="binomial", progress=False)
    assert fit.optimum.deviance == pytest.approx(scaled.optimum.deviance, rel=1e-8)
    assert fit.converged and scaled.converged and batch.converged.iloc[0]
    assert all(message.startswith("boundary (singular) fit") for message in fit.convergence.messages)


def test_a_glmm_slope_on_a_calendar_year_is_the_same_fit_in_hp_glmm_and_the_batch():
    """cbind(k, f) ~ x + (1 + x | g) with the slope's column, the fixed effect's or both shifted by 2000 is the
    same model: hp.glmm stopped 0.14 above its deviance with the random slope shifted (reported converged; now
    searched on conditioned columns, closedform.glmm._fit_conditioned), the batch 2.8e-4 above it with the fixed
    effect shifted (its search moves beta too: conditioned per dataset, batch.conditioning)."""
    data = binomial_groups(1)
    shifted = data.assign(xs=data["x"] + 2000.0)
    models = [(data, "cbind(k, f) ~ x + (1 + x | g)"), (shifted, "cbind(k, f) ~ x + (1 + xs | g)"),
              (shifted, "cbind(k, f) ~ xs + (1 + x | g)"), (shifted, "cbind(k, f) ~ xs + (1 + xs | g)")]
    well_scaled = hp.glmm(models[0][1], data, family="binomial")
    reference = well_scaled.optimum.deviance
    # per fixed part, the SEs of the unshifted fit (a well-scaled Hessian); with xs = x + 2000 the intercept is
    # beta_0 - 2000 beta_x: its covariance is A V A^T
    shift = np.array([[1.0, -2000.0], [0.0, 1.0]])
    se_reference = {"cbind(k, f) ~ x ": np.sqrt(np.diag(well_scaled.vcov)),
                    "cbind(k, f) ~ xs ": np.sqrt(np.diag(shift @ np.asarray(well_scaled.vcov) @ shift.T))}
    for frame, formula in models:
        with warnings.catch_warnings():  # glmer's too: "rescale that variable"
            warnings.simplefilter("ignore")
            fit = hp.glmm(formula, frame, family="binomial")
        se = se_reference[formula.split("+ (")[0]]
        assert fit.optimum.deviance == pytest.approx(reference, rel=1e-9), formula
        batch = hp.fit_batch(formula, [frame, data.assign(xs=data["x"])], family="binomial", progress=False)
        assert batch.objective.iloc[0] == pytest.approx(reference, rel=1e-9), formula
        assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
        assert fit.converged, (formula, fit.convergence.messages)  # (checked on the conditioned fit, as the batch)
        np.testing.assert_allclose(batch.beta[0], fit.fixef.to_numpy(), rtol=1e-4, err_msg=formula)
        np.testing.assert_allclose(batch.theta[0], fit.theta, rtol=1e-4, atol=1e-6, err_msg=formula)
        # beta's SEs do not depend on theta's parametrization: the batch's and hp.glmm's (both from the Hessian on
        # conditioned columns) equal the well-scaled fit's; hp.glmm's from finite differences in the user's theta
        # (the slope's column at 2000: intercept and slope correlated near -1) were 1.7e-4 off under NumPy 2.4 and
        # 1.1e-3 under 2.5, 7.7e-6 from the conditioned fit's Hessian (GLMMOptimum.beta_hessian) under both
        np.testing.assert_allclose(batch.beta_se[0], se, rtol=1e-4, err_msg=formula)
        np.testing.assert_allclose(np.sqrt(np.diag(fit.vcov)), se, rtol=1e-4, err_msg=formula)


def test_a_column_aliased_on_the_users_scale_is_refused_though_conditioning_would_separate_it():
    # centred, x = 20,000 + 1e-5 z is a column like any other; hp.glmm drops it (aliased with the intercept at
    # lme4's tolerance), and the GLMM batch, judging X's rank on its conditioned columns, fitted it: beta -9e8, 5e4
    data = binomial_groups(1)
    frames = [data.assign(x=20000.0 + 1e-5 * data["x"]), data]
    formula = "cbind(k, f) ~ x + (1 | g)"
    with pytest.warns(hp.HierpoolWarning, match="aliased with earlier ones: x"):
        hp.glmm(formula, frames[0], family="binomial")
    batch = hp.fit_batch(formula, frames, family="binomial", progress=False)
    assert np.isnan(batch.objective.iloc[0]) and np.isnan(batch.beta[0]).all()
    assert batch.messages.iloc[0].startswith("the 2 fixed-effect columns have rank 1 in this dataset: x zero or aliased")
    assert batch.converged.iloc[1] and not batch.messages.iloc[1]


@pytest.mark.parametrize("model", ["one term", "two terms", "ar1"])
def test_a_fixed_effect_far_from_centred_is_fitted_on_its_centred_column(model):
    """x = 200,000 + z is the model of z: REML's criterion too (X = [1, z] B, B = [[1, 2e5], [0, 1]] of determinant
    1; the batch's conditioning transform also scales the column, which the criterion maps back).  The linear batch
    paths lost digits in X'X there (a search stopped short and every such dataset was refitted alone, the AR(1)
    path's refit 5e-8 off); they now condition X as a GLMM batch does, REML's log |X' V^-1 X| mapped back by
    2 log |det A| (checked by the second dataset's column, scaled by 0.1), and the covariance of beta by A."""
    formula, kwargs = {"one term": ("y ~ x + (1 | a)", {}), "two terms": ("y ~ x + (1 | a) + (1 | t)", {}),
                       "ar1": ("y ~ x + (1 | a)", {"correlation": hp.ar1("s", "t")})}[model]
    data = _groups(4)
    frames = [data.assign(x=200000.0 + data["x"]), data.assign(x=2e4 + 0.1 * data["x"])]
    batch = hp.fit_batch(formula, frames, progress=False, **kwargs)
    assert not batch.refit.any() and not batch.messages.any(), batch.messages.tolist()
    centred = hp.lmm(formula, data, **kwargs)
    for d, scale in enumerate((1.0, 0.1)):
        # REML: X = X_centred B with det B = scale, so log |X' V^-1 X| moves by 2 log scale
        assert batch.objective.iloc[d] == pytest.approx(centred.objective + 2.0 * np.log(scale), rel=1e-10)
        assert batch.beta[d][1] == pytest.approx(centred.fixef["x"] / scale, rel=1e-7)
        assert batch.beta_se[d][1] == pytest.approx(centred.fixef_se["x"] / scale, rel=1e-6)


@pytest.mark.parametrize("formula", ["Reaction ~ x + (1 | Subject)", "Reaction ~ x + (1 | Subject) + (0 + Days | Subject)"])
def test_a_column_far_from_centred_is_centred_before_it_is_scaled(formula):
    """x = 1e7 + Days with a response X nearly fits (residual 1e-6 of its spread): the product x M rounded each row
    at 1e7 / sd (4e-10), noise in the conditioned column that moved the fit by 3e-6 of its criterion, in the batch
    (both paths) and in hp.lmm alike (the forty-eighth session's review); the centring is now subtracted first
    (algebra.conditioning.transformed_columns), and every fit is the model of Days's."""
    sleep = hp.datasets.sleepstudy()
    rng = np.random.default_rng(8)
    subject = pd.factorize(sleep.Subject)[0]
    reaction = 250 + 10 * sleep.Days + rng.normal(0, 1e-5, 18)[subject] + rng.normal(0, 1e-5, len(sleep))
    on_days = hp.lmm(formula.replace("~ x", "~ Days"), sleep.assign(Reaction=reaction))
    far = sleep.assign(Reaction=reaction, x=1e7 + sleep.Days)
    shared = hp.fit_batch(formula, far, responses=np.c_[reaction, sleep.Reaction], progress=False)
    own = hp.fit_batch(formula, [far, far.iloc[1:]], progress=False)
    single = hp.lmm(formula, far)
    for objective in (shared.objective.iloc[0], own.objective.iloc[0], single.objective):
        assert objective == pytest.approx(on_days.objective, rel=1e-10)


def test_effects_map_back_for_a_batch_as_for_each_dataset():
    """effects_to_user over a batch's leading axis (every dataset's M at once) equals it dataset by dataset: b M^T and
    M V M^T."""
    from hierpool.algebra.conditioning import effects_to_user

    rng = np.random.default_rng(3)
    transforms, b, cond_var = rng.normal(size=(4, 3, 3)), rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5, 3, 3))
    batch_b, batch_var = effects_to_user(transforms, b, cond_var)
    for d in range(4):
        one_b, one_var = effects_to_user(transforms[d], b[d], cond_var[d])
        np.testing.assert_allclose(batch_b[d], one_b, rtol=1e-14)
        np.testing.assert_allclose(batch_var[d], one_var, rtol=1e-13)
        np.testing.assert_allclose(one_b, b[d] @ transforms[d].T, rtol=1e-14)
        np.testing.assert_allclose(one_var, [transforms[d] @ v @ transforms[d].T for v in cond_var[d]], rtol=1e-12)
