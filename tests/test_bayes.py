"""The Bayesian engine against analytic answers, in Monte-Carlo-error units (z = difference / MCSE)."""

import json
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from conftest import load, simulated

import hierpool as hp

Z_MAX = 4.0
EIGHT_SCHOOLS = json.loads(
    (Path(__file__).resolve().parents[1] / "validation" / "eight_schools_reference.json").read_text()
)


@pytest.mark.parametrize(
    "name,formula",
    [
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),  # correlated slopes
        ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),  # crossed
        ("Pastes", "strength ~ 1 + (1 | batch/cask)"),  # nested
        ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),  # uncorrelated
        ("Machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),  # categorical fixed effect
    ],
)
def test_exact_draws_equal_henderson(name, formula):
    # the fast variance=fit option draws (beta, b) from the closed form's own factorization, so this
    # checks the draw code (its noise back-solve gives sigma^2 C^-1), not the closed form: the
    # validation against an independent posterior is test_validate.py's exact mode
    data = load(name)
    fit = hp.lmm(formula, data)
    post = hp.bayes(formula, data, variance=fit, priors=hp.validate.flat_beta_priors(fit), seed=1)
    assert post.method == "exact"
    assert list(post.ranef.grp) == list(fit.ranef.grp)
    report = hp.validate.compare(fit, post)
    assert report.passed, report.summary()


def assert_matches_eight_schools(post):
    """mu, tau and every school's theta = mu + b: posterior means and sds against the quadrature reference."""
    assert post.diagnostics(warn=False).attrs["divergences"] == 0
    tau_draws = np.sqrt(post.term_covariance_draws(0)[..., 0, 0])
    theta = post.beta_draws[..., :1] + post.term_draws(0)[..., 0]
    draws = np.concatenate([post.beta_draws[..., :1], tau_draws[..., None], theta], axis=-1)
    reference = EIGHT_SCHOOLS
    means = np.r_[reference["mu"]["mean"], reference["tau"]["mean"], reference["theta"]["mean"]]
    sds = np.r_[reference["mu"]["sd"], reference["tau"]["sd"], reference["theta"]["sd"]]
    flat = draws.reshape(-1, draws.shape[-1])
    dataset = az.convert_to_dataset(draws)
    z_mean = (flat.mean(axis=0) - means) / az.mcse(dataset, method="mean")["x"].values
    z_sd = (flat.std(axis=0, ddof=1) - sds) / az.mcse(dataset, method="sd")["x"].values
    assert np.max(np.abs(z_mean)) < Z_MAX, z_mean
    assert np.max(np.abs(z_sd)) < Z_MAX, z_sd


def test_known_residual_sds_full_model_matches_reference():
    # the non-centered full model with se= (no sigma site): a wrong noise scale or prior moves mu, tau or a theta
    data = pd.DataFrame({"y": EIGHT_SCHOOLS["y"], "se": EIGHT_SCHOOLS["se"], "school": list("ABCDEFGH")})
    priors = {"Intercept": dist.Normal(0, 5), "sd_school": dist.HalfCauchy(5)}
    post = hp.bayes("y ~ 1 + (1 | school)", data, se="se", priors=priors, method="full", target_accept=0.95, seed=7)
    assert "sigma" not in post.idata.posterior
    assert_matches_eight_schools(post)


@pytest.fixture(scope="module")
def sleepstudy_posteriors():
    data = load("sleepstudy")
    formula = "Reaction ~ Days + (Days | Subject)"
    return {method: hp.bayes(formula, data, method=method, seed=3) for method in ("collapsed", "full")}


def test_collapsed_and_full_samplers_agree(sleepstudy_posteriors):
    # means and sds of every fixed effect, random effect and variance parameter, in Monte-Carlo units
    # (the crossed and nested models are compared in test_validate.py)
    report = hp.validate.compare_samplers(sleepstudy_posteriors["collapsed"], sleepstudy_posteriors["full"])
    assert report.passed, report.summary()
    assert len(report.table) == 2 + 36 + 4


def test_sampler_comparison_fails_when_one_posterior_is_off(sleepstudy_posteriors):
    # one subject's slope draws moved by 0.2 posterior sd (a conditional draw with a wrong mean)
    from dataclasses import replace

    full = sleepstudy_posteriors["full"]
    idata = full.idata.copy()
    b = idata.posterior["b_Subject"]
    idata.posterior["b_Subject"] = b + 0.2 * float(b[..., 3, 1].std()) * ((b.Subject == b.Subject[3]) & (b.Subject_coef == "Days"))
    report = hp.validate.compare_samplers(sleepstudy_posteriors["collapsed"], replace(full, idata=idata))
    assert not report.passed
    assert report.table.loc[np.abs(report.table.z_mean).idxmax(), "name"] == "Subject:Days:" + str(b.Subject.values[3])


def test_collapsed_sampler_mixes_random_effects_better(sleepstudy_posteriors):
    collapsed, full = sleepstudy_posteriors["collapsed"], sleepstudy_posteriors["full"]
    assert collapsed.ranef["ess_bulk"].min() > 1.2 * full.ranef["ess_bulk"].min()
    assert collapsed.ranef["ess_bulk"].min() > 2500  # of 4000 draws: nearly independent


def test_inference_data_follows_arviz_conventions(sleepstudy_posteriors):
    idata = sleepstudy_posteriors["collapsed"].idata
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    posterior = idata.posterior
    assert set(posterior.data_vars) == {"beta", "b_Subject", "sd_Subject", "cor_Subject", "sigma"}
    assert posterior["b_Subject"].dims == ("chain", "draw", "Subject", "Subject_coef")
    assert list(posterior["b_Subject"].coords["Subject_coef"].values) == ["Intercept", "Days"]
    assert "308" in posterior["b_Subject"].coords["Subject"].values
    assert list(posterior["beta"].coords["fixef"].values) == ["Intercept", "Days"]
    names = list(posterior.data_vars) + list(posterior.dims)
    assert not any(ch in name for name in names for ch in "|[]: ")
    assert idata.log_likelihood["Reaction"].shape == (4, 1000, 180)
    assert int(idata.sample_stats["diverging"].sum()) == 0
    # the log-likelihood is usable by ArviZ's model comparison
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_diagnostics_table_equals_arviz(sleepstudy_posteriors):
    for post in sleepstudy_posteriors.values():
        posterior = post.idata.posterior
        table = post.diagnostics(warn=False)
        assert list(table.index) == list(posterior.data_vars)
        with warnings.catch_warnings():  # the correlation matrix's constant diagonal
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = {
                "max_r_hat": (az.rhat(posterior), np.nanmax),
                "min_ess_bulk": (az.ess(posterior, method="bulk"), np.nanmin),
                "min_ess_tail": (az.ess(posterior, method="tail"), np.nanmin),
            }
        for column, (values, reduce) in reference.items():
            expected = [reduce(values[name].values) for name in posterior.data_vars]
            assert np.allclose(table[column], expected, rtol=1e-10, atol=0), column


def test_summary_tables_have_the_documented_columns(sleepstudy_posteriors):
    post = sleepstudy_posteriors["collapsed"]
    columns = ["mean", "sd", "lower", "upper", "mcse_mean", "ess_bulk", "r_hat"]
    assert list(post.fixef.columns) == columns
    assert list(post.ranef.columns) == ["grpvar", "term", "grp"] + columns
    assert list(post.varcorr.columns) == ["grp", "var1", "var2"] + columns
    assert list(post.varcorr.grp) == ["Subject", "Subject", "Subject", "Residual"]
    assert "Fixed effects" in post.summary()


def test_predictions_new_levels_and_predictive_are_wider(sleepstudy_posteriors, sleepstudy):
    post = sleepstudy_posteriors["collapsed"]
    new = pd.DataFrame({"Days": [5.0, 5.0], "Subject": ["308", "new subject"]})
    mean = post.predict(new, kind="mean")
    predictive = post.predict(new, kind="predictive")
    assert mean.loc[1, "sd"] > 2 * mean.loc[0, "sd"]  # a new subject: drawn from the population
    assert np.all(predictive["sd"] > mean["sd"])
    # the fitted subject's mean prediction is its posterior mean line
    draws = (
        post.beta_draws[..., 0]
        + 5 * post.beta_draws[..., 1]
        + post.term_draws(0)[..., 0, 0]
        + 5 * post.term_draws(0)[..., 0, 1]
    )
    assert mean.loc[0, "mean"] == pytest.approx(draws.mean(), rel=1e-10)


def test_eight_schools_matches_the_reference_posterior():
    data = pd.DataFrame({"y": EIGHT_SCHOOLS["y"], "se": EIGHT_SCHOOLS["se"], "school": list("ABCDEFGH")})
    priors = {"Intercept": dist.Normal(0, 5), "sd_school": dist.HalfCauchy(5)}
    post = hp.bayes("y ~ 1 + (1 | school)", data, se="se", priors=priors, seed=4)
    assert post.method == "collapsed"
    assert_matches_eight_schools(post)


def test_prior_overrides_take_effect():
    data = simulated(seed=1)
    post = hp.bayes("y ~ x + (1 | g)", data, priors={"Intercept": dist.Normal(10.0, 0.01)}, draws=300, tune=300, seed=5)
    assert post.fixef.loc["Intercept", "mean"] == pytest.approx(10.0, abs=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"priors": {"Intercpt": dist.Normal(0, 1)}}, "Intercpt"),
        ({"priors": {"sd_Subjet": dist.HalfNormal(1)}}, "sd_Subjet"),
        ({"priors": {"Days": 3.0}}, "Days"),
        ({"priors": {"sd": dist.Normal(0, 1)}}, "positive support"),
        ({"priors": {"b": dist.Normal(np.zeros(2), 1.0)}}, "scalar"),
        ({"priors": {"cor": -1}}, "cor"),
        ({"chains": 0}, "chains"),
        ({"draws": 0}, "draws"),
        ({"tune": -1}, "tune"),
        ({"method": "gibbs"}, "method"),
        ({"method": "collapsed", "priors": {"Days": dist.StudentT(3, 0, 10)}}, "collapsed"),
        ({"variance": "REML"}, "variance"),
    ],
)
def test_bad_arguments_raise_a_named_error(sleepstudy, kwargs, match):
    with pytest.raises(hp.HierpoolError, match=match):
        hp.bayes("Reaction ~ Days + (Days | Subject)", sleepstudy, **kwargs)


def test_student_t_prior_is_sampled_by_the_full_sampler_and_acts():
    # Student-t(1000) is a Normal for all practical purposes: the full sampler under it must give the
    # collapsed sampler's posterior under the matching Normal prior, placed 2 se off the estimate so
    # that it pulls x about one se away from it.  An ignored or mis-scaled non-Normal prior fails.
    data = simulated(seed=2)
    fit = hp.lmm("y ~ x + (1 | g)", data)
    loc, scale = fit.fixef["x"] + 2 * fit.fixef_se["x"], fit.fixef_se["x"]
    settings = dict(draws=1000, tune=500, chains=2, seed=6)
    student = hp.bayes("y ~ x + (1 | g)", data, priors={"x": dist.StudentT(1000.0, loc, scale)}, **settings)
    normal = hp.bayes("y ~ x + (1 | g)", data, priors={"x": dist.Normal(loc, scale)}, **settings)
    assert student.method == "full" and normal.method == "collapsed"
    a, b = student.fixef.loc["x"], normal.fixef.loc["x"]
    assert abs(a["mean"] - b["mean"]) < Z_MAX * np.hypot(a["mcse_mean"], b["mcse_mean"]), (a, b)
    assert b["mean"] - fit.fixef["x"] > 0.5 * scale  # the prior moved the posterior
    from hierpool.bayesian.convergence import mcse_sd

    sd_errors = [mcse_sd(np.moveaxis(post.beta_draws, -1, 0))[1] for post in (student, normal)]
    assert abs(a["sd"] - b["sd"]) < Z_MAX * np.hypot(*sd_errors)


def test_two_by_two_correlation_prior_is_lkj():
    # the model's k = 2 shortcut (rho = 2u - 1, u ~ Beta(eta, eta)) against NumPyro's LKJCholesky draws:
    # prior draws of the model code itself (hierpool.bayesian.model.variance_parameters)
    import jax
    import scipy.stats
    from numpyro.infer import Predictive

    from hierpool.bayesian.model import variance_parameters
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.design import build_design

    eta = 3.0
    priors = resolve_priors(build_design("y ~ x + (x | g)", simulated(seed=0)), {"cor": eta})
    draws = Predictive(lambda: variance_parameters(priors, (2,)), num_samples=20000)(jax.random.PRNGKey(1))
    model_rho = np.asarray(draws["cor__0"])[:, 1, 0]
    lkj = np.asarray(dist.LKJCholesky(2, eta).sample(jax.random.PRNGKey(0), (20000,))[:, 1, 0])
    assert scipy.stats.ks_2samp(lkj, model_rho).pvalue > 0.001
    # and the test has power: the eta = 1 (uniform) prior is rejected
    uniform = np.asarray(dist.LKJCholesky(2, 1.0).sample(jax.random.PRNGKey(2), (20000,))[:, 1, 0])
    assert scipy.stats.ks_2samp(uniform, model_rho).pvalue < 1e-6


def test_a_second_fit_of_the_same_shape_reuses_the_compiled_sampler(monkeypatch):
    from hierpool.bayesian import nuts

    first, second = simulated(seed=3), simulated(seed=4)  # same shape, other values (and default prior scales)
    hp.bayes("y ~ x + (1 | g)", first, draws=200, tune=200, seed=8)
    monkeypatch.setattr(nuts, "_build_programs", lambda *a, **k: pytest.fail("recompiled"))
    post = hp.bayes("y ~ x + (1 | g)", second, draws=200, tune=200, seed=8)
    assert np.isfinite(post.fixef["mean"]).all()


def test_only_short_runs_of_small_models_compile_without_llvm_optimization(sleepstudy):
    from hierpool.bayesian import nuts
    from hierpool.bayesian.model import model_data
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.batch.statistics import one_dataset_statistics
    from hierpool.design import build_design

    design = build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)
    priors = resolve_priors(design, None)
    loc, scale = priors.beta_gaussian()
    one_term = (one_dataset_statistics(design), loc, scale, priors)
    assert nuts.quick_compile(one_term, chains=4, iterations=2000)
    assert not nuts.quick_compile(one_term, chains=4, iterations=200_000)  # long runs keep LLVM's optimization
    assert not nuts.quick_compile((model_data(design), priors, None), chains=4, iterations=2000)  # the full model


def test_progress_bar_only_when_asked_or_on_a_terminal(sleepstudy, capsys):
    formula = "Reaction ~ Days + (1 | Subject)"
    hp.bayes(formula, sleepstudy, chains=2, draws=50, tune=50, seed=1)  # stderr is not a terminal here
    assert "sampling" not in capsys.readouterr().err
    hp.bayes(formula, sleepstudy, chains=2, draws=50, tune=50, seed=1, progress=True)
    assert "sampling 2 chain(s)" in capsys.readouterr().err
