"""The vectorized R-hat, bulk ESS and MCSE against ArviZ's one-quantity-at-a-time estimators; the SamplingWarning."""

import warnings

import arviz as az
import numpy as np
import pytest

import hierpool as hp
from hierpool.bayesian import convergence


def autoregressive_chains(phi, chains, draws, rng):
    noise = rng.normal(size=(chains, draws))
    x = np.zeros((chains, draws))
    x[:, 0] = noise[:, 0]
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x + 0.3 * rng.normal(size=(chains, 1))  # chains that disagree a little: R-hat above 1


def arviz_values(x):
    data = az.convert_to_dataset(x[:, :, None])
    return {
        "ess_bulk": az.ess(data, method="bulk")["x"].values[0],
        "ess_mean": az.ess(data, method="mean")["x"].values[0],
        "ess_tail": az.ess(data, method="tail")["x"].values[0],
        "mcse_mean": az.mcse(data, method="mean")["x"].values[0],
        "mcse_sd": az.mcse(data, method="sd")["x"].values[0],
        "r_hat": az.rhat(data)["x"].values[0],
    }


@pytest.mark.parametrize("chains,draws", [(4, 1000), (2, 7), (4, 11), (3, 5)])
def test_equal_to_arviz(chains, draws):
    # antithetic to highly autocorrelated chains: Geyer's sequence stops at every kind of lag
    rng = np.random.default_rng(chains * draws)
    columns = [autoregressive_chains(phi, chains, draws, rng) for phi in (-0.6, -0.3, 0.0, 0.3, 0.7, 0.95, 0.99)]
    columns += [np.ones((chains, draws)), np.tile(np.round(rng.normal(size=draws), 1), (chains, 1))]  # constant; ties
    stacked = np.stack(columns)
    ours = {**convergence.diagnose(stacked), "ess_mean": convergence.ess_mean(stacked),
            "ess_tail": convergence.ess_tail(stacked), "mcse_sd": convergence.mcse_sd(stacked)}
    assert np.allclose(ours["r_hat"], convergence.rhat(stacked), equal_nan=True)
    for i, column in enumerate(columns):
        reference = arviz_values(column)
        for name, value in reference.items():
            assert np.isclose(ours[name][i], value, rtol=1e-10, atol=0, equal_nan=True), (i, name, ours[name][i], value)


def test_one_chain_has_no_r_hat():
    x = autoregressive_chains(0.5, 1, 200, np.random.default_rng(0))[None]
    assert np.isnan(convergence.rhat(x)).all()
    assert np.isclose(convergence.ess_bulk(x)[0], az.ess(az.convert_to_dataset(x[0][:, :, None]), method="bulk")["x"].values[0])


# --- BayesResult.diagnostics(): the SamplingWarning the README promises ("warns when they are bad") ---------
def hand_made_posterior(draws, diverging=None):
    """A BayesResult holding the given (chain, draw, 3) draws as variables mu, tau[2] and a constant cor.

    ``diagnostics()`` reads only ``idata``, so hand-made chains exercise exactly the code a sampled
    posterior goes through, in milliseconds and with known faults.
    """
    from hierpool.bayesian.results import BayesResult

    posterior = {"mu": draws[..., 0], "tau": draws[..., 1:], "cor": np.ones(draws.shape[:2] + (2,))}
    stats = {} if diverging is None else {"sample_stats": {"diverging": diverging}}
    return BayesResult(idata=az.from_dict(posterior=posterior, **stats), design=None, priors=None, method="full",
                       level=0.95)


def independent_draws(chains, draws, seed=1):
    return np.random.default_rng(seed).normal(size=(chains, draws, 3))


def test_good_chains_raise_no_sampling_warning():
    posterior = hand_made_posterior(independent_draws(4, 1000), np.zeros((4, 1000), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.SamplingWarning)
        diagnostics = posterior.diagnostics()
    assert diagnostics.max_r_hat.max() < 1.01 and diagnostics.min_ess_bulk.min() > 3000
    assert diagnostics.attrs["divergences"] == 0


def test_chains_that_disagree_warn_with_their_r_hat():
    draws = independent_draws(4, 1000)
    draws[0, :, 1] += 0.5  # one chain off by half a posterior sd: R-hat ~1.03, under the old 1.1 rule
    posterior = hand_made_posterior(draws)
    with pytest.warns(hp.SamplingWarning, match=r"R-hat up to 1\.0[2-4]\d \(> 1\.01\)"):
        diagnostics = posterior.diagnostics()
    assert 1.01 < diagnostics.loc["tau", "max_r_hat"] < 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.SamplingWarning)
        posterior.diagnostics(warn=False)


def test_too_few_effective_draws_warn_with_the_ess():
    # 4 chains of 60 independent draws: ESS ~200, above 100 in all but under 100 per chain
    with pytest.warns(hp.SamplingWarning, match=r"ESS as low as \d+ \(< 400: 100 per chain\)"):
        diagnostics = hand_made_posterior(independent_draws(4, 60)).diagnostics()
    assert 100 < diagnostics.min_ess_bulk.min() < 400


def test_divergent_transitions_warn():
    diverging = np.zeros((4, 1000), bool)
    diverging[2, [5, 50, 500]] = True
    with pytest.warns(hp.SamplingWarning, match="sampling diagnostics: 3 divergent transitions$"):
        hand_made_posterior(independent_draws(4, 1000), diverging).diagnostics()
