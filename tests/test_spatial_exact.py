"""The exact sampler of a Gaussian spatial model (hierpool.bayesian.spatial_exact): its target is the dense marginal
likelihood times the priors, its draws of (beta, effects) given psi have the dense posterior's mean and covariance,
each prior's precision root has the prior's precision, and hp.bayes uses it by default for a Gaussian response."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse
from scipy import stats

import hierpool as hp
from hierpool.algebra.icar import CarPrior
from hierpool.algebra.latent_blocks import GroupPrior
from hierpool.bayesian.priors import resolve_priors
from hierpool.bayesian.spatial import car_priors
from hierpool.bayesian.spatial_exact import SpatialPosterior
from hierpool.spec.adjacency import graph, lattice_edges
from hierpool.spec.spatial import spatial_design


@pytest.fixture(scope="module")
def model():
    """A 5 x 4 grid, 34 rows (two areas without rows), a BYM2 term and a (1 | site) term, prior weights."""
    rng = np.random.default_rng(8)
    area = np.r_[np.repeat(np.arange(18), 2)[:34]]
    site = rng.integers(0, 4, size=area.size)
    data = pd.DataFrame({"area": [f"a{i}" for i in area], "site": site, "x": rng.normal(size=area.size),
                         "w": rng.uniform(0.5, 2.0, size=area.size)})
    data["y"] = 1 + 0.5 * data.x + rng.normal(size=20)[area] + rng.normal(size=4)[site] + rng.normal(size=area.size)
    sdesign = spatial_design("y ~ x + car(area, type='bym2') + (1 | site)", data, lattice_edges(5, 4), weights="w")
    others, cars = car_priors(sdesign, None)
    return sdesign, SpatialPosterior(sdesign, resolve_priors(sdesign.design, others), cars)


def dense_cov(sdesign, psi, laplace):
    """Cov(Z x) of every term at psi, dense, from the definitions (BYM2 through the Laplacian's pseudo-inverse)."""
    n = sdesign.design.n
    area_term = sdesign.areas[0]
    g = area_term.graph
    sd, rho = np.exp(psi[0]), 1 / (1 + np.exp(-psi[1]))
    q = np.diag(g.degree) - g.adjacency_matrix().toarray()
    structured = np.linalg.pinv(q, hermitian=True)
    scaling = np.exp(np.mean(np.log(np.diag(structured))))
    cov_b = sd**2 * ((1 - rho) * np.eye(g.n) + rho * structured / scaling)
    Z = np.zeros((n, g.n))
    Z[np.arange(n), area_term.area] = 1
    term = sdesign.design.terms[0]
    site = np.exp(psi[2]) ** 2 * term.dense_columns() @ term.dense_columns().T
    return Z @ cov_b @ Z.T + site, Z, cov_b


def test_the_target_is_the_dense_marginal_likelihood_times_the_priors(model):
    sdesign, posterior = model
    design, priors = sdesign.design, posterior.priors
    loc, scale = priors.beta_gaussian()
    for psi in (np.array([0.1, 0.4, -0.5, -0.2]), np.array([-0.7, -1.5, 0.3, 0.1])):
        state = posterior.evaluate(psi)
        cov, _, _ = dense_cov(sdesign, psi, posterior.laplace)
        V = np.exp(psi[3]) ** 2 * np.diag(1 / design.row_weights) + cov + design.X @ np.diag(scale**2) @ design.X.T
        marginal = stats.multivariate_normal(design.X @ loc, V).logpdf(design.y)
        sd, rho, site, sigma = np.exp(psi[0]), 1 / (1 + np.exp(-psi[1])), np.exp(psi[2]), np.exp(psi[3])
        car, (site_prior,) = posterior.cars[0], priors.sd
        log_prior = (float(car.sd.log_prob(sd)) + psi[0] + float(car.mix.log_prob(rho)) + np.log(rho * (1 - rho))
                     + float(site_prior.log_prob(np.array([site]))[0]) + psi[2] + float(priors.sigma.log_prob(sigma))
                     + psi[3])
        assert state.log_pi == pytest.approx(marginal + log_prior, rel=1e-10), "log pi(psi) is not the dense one"


def test_the_target_with_a_proper_car_and_a_flat_intercept_is_the_restricted_likelihood():
    """A flat coefficient is integrated out as REML does: (2 pi)^(p_flat / 2) |X_f' V^-1 X_f|^(-1/2) times the rest;
    the Normal one's prior is in V; the proper CAR's alpha has a Uniform(0, 1) prior on its logit's scale."""
    rng = np.random.default_rng(5)
    area = np.repeat(np.arange(20), 2)
    data = pd.DataFrame({"area": [f"a{i}" for i in area], "x": rng.normal(size=40)})
    data["y"] = 0.5 * data.x + rng.normal(size=20)[area] + rng.normal(size=40)
    sdesign = spatial_design("y ~ x + car(area, type='proper')", data, lattice_edges(5, 4))
    others, cars = car_priors(sdesign, {"Intercept": "flat"})
    priors = resolve_priors(sdesign.design, others)
    posterior = SpatialPosterior(sdesign, priors, cars)
    design, g = sdesign.design, sdesign.graph
    psi = np.array([0.2, 0.8, -0.3])
    sd, alpha, sigma = np.exp(psi[0]), 1 / (1 + np.exp(-psi[1])), np.exp(psi[2])
    Z = np.zeros((40, 20))
    Z[np.arange(40), sdesign.area] = 1
    cov = sd**2 * np.linalg.inv(np.diag(g.degree) - alpha * g.adjacency_matrix().toarray())
    x_scale = priors.beta[1].scale
    V = sigma**2 * np.eye(40) + Z @ cov @ Z.T + x_scale**2 * np.outer(design.X[:, 1], design.X[:, 1])
    Vi, one = np.linalg.inv(V), design.X[:, :1]
    mean = float(np.sum(Vi @ one * design.y[:, None]) / (one.T @ Vi @ one)[0, 0])
    r = design.y - mean
    minus_two = (39 * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + np.log((one.T @ Vi @ one)[0, 0]) + r @ Vi @ r)
    log_prior = (float(cars[0].sd.log_prob(sd)) + psi[0] + np.log(alpha * (1 - alpha))
                 + float(priors.sigma.log_prob(sigma)) + psi[2])
    assert posterior.evaluate(psi).log_pi == pytest.approx(-0.5 * minus_two + log_prior, rel=1e-10), \
        "log pi(psi) is not the restricted dense one"


def test_the_draws_given_psi_have_the_dense_posterior_mean_and_covariance(model):
    sdesign, posterior = model
    design = sdesign.design
    psi = np.array([0.1, 0.4, -0.5, -0.2])
    state = posterior.evaluate(psi)
    beta, x = posterior.draw_effects(state, np.random.default_rng(3), 4000)
    # dense: (beta, b, u) jointly Gaussian a priori; condition on y
    loc, scale = posterior.priors.beta_gaussian()
    cov, Z, cov_b = dense_cov(sdesign, psi, posterior.laplace)
    term = design.terms[0]
    Zs = term.dense_columns()
    cov_u = np.exp(psi[2]) ** 2 * np.eye(term.n_levels)
    prior_cov = scipy.linalg.block_diag(np.diag(scale**2), cov_b, cov_u)
    A = np.hstack([design.X, Z, Zs])  # y = A (beta, b, u) + e
    V = A @ prior_cov @ A.T + np.exp(psi[3]) ** 2 * np.diag(1 / design.row_weights)
    gain = prior_cov @ A.T @ np.linalg.inv(V)
    mean = np.r_[loc, np.zeros(cov_b.shape[0] + term.n_levels)] + gain @ (design.y - design.X @ loc)
    post_cov = prior_cov - gain @ A @ prior_cov
    n = cov_b.shape[0]
    drawn = np.hstack([beta, x[:, :n], x[:, 2 * n:]])  # x = (b, v of BYM2, u)
    se = np.sqrt(np.diag(post_cov) / drawn.shape[0])
    z = (drawn.mean(axis=0) - mean) / se
    assert np.max(np.abs(z)) < 4.5, f"posterior means differ: max |z| {np.max(np.abs(z)):.2f}"
    sd_ratio = drawn.std(axis=0) / np.sqrt(np.diag(post_cov))
    # an sd's relative Monte-Carlo error is about 1 / sqrt(2 N): 4.5 of them over some 60 coordinates
    assert np.max(np.abs(sd_ratio - 1)) < 4.5 / np.sqrt(2 * drawn.shape[0]), "posterior sds differ"
    corr = np.corrcoef(drawn[:, [0, 2, 3]].T)[0, 1:]
    dense_corr = post_cov[0, [2, 3]] / np.sqrt(post_cov[0, 0] * np.diag(post_cov)[[2, 3]])
    np.testing.assert_allclose(corr, dense_corr, atol=0.07, err_msg="beta's correlation with the effects")
    assert np.allclose(np.sum(x[:, n:2 * n], axis=1), 0, atol=1e-8), "the ICAR part sums to zero in every draw"


def test_each_priors_precision_root_has_its_precision():
    """R' R = P for every type (a unit vector's image is a column of R'), and for a (1 + x | g) term's blocks."""
    edges = pd.DataFrame({"a": list("abcefe"), "b": list("bcdfgg")})
    labels = list("abcdefgh")
    matrix = pd.DataFrame(0, index=labels, columns=labels)
    for a, b in zip(edges.a, edges.b):
        matrix.loc[a, b] = matrix.loc[b, a] = 1
    for g, type_ in ((graph(matrix), "icar"), (graph(matrix), "bym2"), (graph(edges), "proper")):
        prior = CarPrior(g, type_)
        columns = np.stack([prior.precision_root_draw(0.7, 0.3, e) for e in np.eye(prior.root_size())])
        np.testing.assert_allclose(columns.T @ columns, prior.latent(0.7, 0.3)[0].toarray(), atol=1e-13,
                                   err_msg=f"{type_}: R'R is not the precision")
    group = GroupPrior(3, 2)
    factor = np.array([[0.8, 0.0], [0.3, 0.5]])
    columns = np.stack([group.precision_root_draw(factor, e) for e in np.eye(group.root_size())])
    precision = scipy.sparse.csc_matrix((group.precision_entries(factor)[2], (group.rows, group.cols))).toarray()
    np.testing.assert_allclose(columns.T @ columns, precision, atol=1e-13, err_msg="(1 + x | g): R'R")


def test_hp_bayes_samples_a_gaussian_spatial_model_exactly_by_default():
    rng = np.random.default_rng(2)
    area = np.repeat(np.arange(20), 2)
    data = pd.DataFrame({"area": [f"a{i}" for i in area], "x": rng.normal(size=40)})
    data["y"] = 0.5 * data.x + rng.normal(size=20)[area] + rng.normal(scale=0.5, size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = hp.bayes("y ~ x + car(area, type='icar')", data, adjacency=lattice_edges(5, 4), seed=1, progress=False)
        fit = hp.lmm("y ~ x + car(area, type='icar')", data, adjacency=lattice_edges(5, 4))
    assert post.method == "collapsed" and post.divergences == 0, "the exact sampler, without divergences"
    hyper = post.hyperparameters()
    assert list(hyper.index) == ["sd", "sigma"] and hyper["r_hat"].max() < 1.01, "converged"
    assert hyper["ess_bulk"].min() > 1000, "independence Metropolis-Hastings mixes well here"
    # the posterior median of the sd lies near the REML estimate (flat-ish priors, 20 areas)
    assert abs(np.log(np.median(post.draws("sd")) / fit.sd)) < 0.3, "the sd's posterior sits near REML's"
    # a (1 + x | g) term beside: NUTS (the exact sampler takes scalar terms), its parameters named as the closed form's
    data["site"] = np.repeat(np.arange(4), 10)
    two = "y ~ x + car(area, type='icar') + (1 + x | site)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nuts = hp.bayes(two, data, adjacency=lattice_edges(5, 4), seed=1, progress=False, chains=2, draws=100, tune=100)
        closed = hp.lmm(two, data, adjacency=lattice_edges(5, 4))
    assert nuts.method == "nuts", "NUTS samples a term with several coefficients"
    names = ["sd_car_area", "sd_site_Intercept", "sd_site_x", "cor_site_Intercept_x", "sigma"]
    assert list(nuts.hyperparameters().index) == names == list(closed.hyperparameters().index), "both engines' names"
    for ranef in (nuts.ranef["(1 + x | site)"], closed.ranef["(1 + x | site)"]):
        assert ranef.index.names == ["site", "term"] and list(ranef.index[:2]) == [("0", "Intercept"), ("0", "x")], \
            "a (1 + x | g) term's effects by (level, coefficient)"
    with pytest.raises(hp.HierpoolError, match="method='collapsed': the exact sampler is for a Gaussian"):
        hp.bayes("y ~ car(area, type='icar')", data.assign(y=rng.poisson(3, 40)), family="poisson",
                 adjacency=lattice_edges(5, 4), method="collapsed")
