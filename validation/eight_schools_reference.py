"""Reference posterior of eight schools by quadrature: writes eight_schools_reference.json.

    python validation/eight_schools_reference.py

Model (Rubin 1981; Gelman et al., BDA3 section 5.5), as issue 3 states it:
    y_j ~ Normal(theta_j, se_j),  theta_j = mu + b_j,  b_j ~ Normal(0, tau),
    mu ~ Normal(0, 5),  tau ~ HalfCauchy(5).

Given tau everything is Gaussian, so the posterior is one-dimensional in tau:
    p(tau | y) ∝ p(tau) N(y | 0, diag(se^2 + tau^2) + 25 11^T),
and E[mu | tau, y], E[theta_j | tau, y] and their variances are closed-form.  Integrating
over tau by adaptive quadrature gives the posterior means and sds to ~1e-9, more
precisely than a long MCMC run (the issue suggests 200k draws; this is the exact limit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.integrate
import scipy.stats

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SE = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
MU_SD = 5.0
TAU_SCALE = 5.0


def given_tau(tau: float) -> dict:
    """log p(y | tau) (up to a constant) and the conditional moments of mu and theta."""
    v = SE**2 + tau**2
    precision = 1 / MU_SD**2 + np.sum(1 / v)
    mu_mean = np.sum(Y / v) / precision
    mu_var = 1 / precision
    log_lik = -0.5 * (np.sum(np.log(v)) + np.log(precision) + np.sum(Y**2 / v) - precision * mu_mean**2)
    if tau == 0:
        weight = np.ones_like(Y)  # theta_j = mu exactly
        theta_var_given_mu = np.zeros_like(Y)
        theta_mean = mu_mean * np.ones_like(Y)
    else:
        weight = (1 / tau**2) / (1 / SE**2 + 1 / tau**2)  # how much theta_j leans on mu
        theta_var_given_mu = 1 / (1 / SE**2 + 1 / tau**2)
        theta_mean = (1 - weight) * Y + weight * mu_mean
    theta_var = theta_var_given_mu + weight**2 * mu_var
    return {"log_lik": log_lik, "mu_mean": mu_mean, "mu_var": mu_var, "theta_mean": theta_mean, "theta_var": theta_var}


def posterior_moments() -> dict:
    log_prior = lambda tau: scipy.stats.halfcauchy(scale=TAU_SCALE).logpdf(tau)  # noqa: E731
    shift = given_tau(1.0)["log_lik"]

    def density(tau):
        return np.exp(log_prior(tau) + given_tau(tau)["log_lik"] - shift)

    def integrate(fn):
        return scipy.integrate.quad(fn, 0, np.inf, epsabs=0, epsrel=1e-11, limit=500)[0]

    norm = integrate(density)
    expect = lambda fn: integrate(lambda t: density(t) * fn(given_tau(t), t)) / norm  # noqa: E731
    tau_mean = expect(lambda g, t: t)
    tau_sd = np.sqrt(expect(lambda g, t: t**2) - tau_mean**2)
    mu_mean = expect(lambda g, t: g["mu_mean"])
    mu_sd = np.sqrt(expect(lambda g, t: g["mu_var"] + g["mu_mean"] ** 2) - mu_mean**2)
    theta_mean = np.array([expect(lambda g, t, j=j: g["theta_mean"][j]) for j in range(8)])
    theta_second = np.array([expect(lambda g, t, j=j: g["theta_var"][j] + g["theta_mean"][j] ** 2) for j in range(8)])
    b_mean = theta_mean - mu_mean
    return {
        "description": "eight schools posterior by quadrature over tau (validation/eight_schools_reference.py)",
        "y": Y.tolist(),
        "se": SE.tolist(),
        "priors": {"Intercept": "Normal(0, 5)", "sd_school": "HalfCauchy(5)"},
        "mu": {"mean": mu_mean, "sd": float(mu_sd)},
        "tau": {"mean": tau_mean, "sd": float(tau_sd)},
        "theta": {"mean": theta_mean.tolist(), "sd": np.sqrt(theta_second - theta_mean**2).tolist()},
        "b": {"mean": b_mean.tolist()},
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("eight_schools_reference.json")
    out.write_text(json.dumps(posterior_moments(), indent=2) + "\n")
    print(out.read_text())
