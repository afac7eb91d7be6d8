"""The vectorized R-hat, bulk ESS and MCSE against ArviZ's one-quantity-at-a-time estimators."""

import arviz as az
import numpy as np
import pytest

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
