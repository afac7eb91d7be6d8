"""Disease-mapping benchmark: min bulk ESS of the county effects per second, hierpool against brms, and a large map.

    python benchmarks/spatial.py [--skip-brms] [--large 3000] [--gaussian]     # writes benchmarks/out/spatial.json

Model: North Carolina's SIDS deaths 1974-78 (``hp.datasets.nc_sids()``, 100 counties),
``sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type = "bym2")``, Poisson, the same priors on both sides
(validation/spatial_brms_reference.R's: Normal(0, 2.5) intercept, Normal(0, 2.5 / sd(nwbir_rate)) slope,
HalfNormal(2.5) sd, Beta(1, 1) rho: hierpool's defaults but for the intercept's, which hierpool's side sets, since
its default became on 2026-12-05 the centred predictors' prior carried to x = 0, Normal(0, 4.5) here). 4 chains x
1000 draws after 1000 warm-up on both sides (brms's defaults), seed 1, target acceptance 0.8; brms with ``cores = 2``
(this machine's cores; its default is one chain after another). The clock covers the fitting call only, compilation
included (brms's Stan model is compiled inside ``brm``; hierpool's NUTS program inside ``hp.bayes``); imports and
data loading are outside it on both sides. Each fit runs in a fresh process. ESS is the rank-normalized bulk ESS
(Vehtari et al. 2021) of each county's effect (brms ``rcar``, hierpool ``b``); the minimum over the 100 counties.

``--large N``: a synthetic map of N areas on a grid (rook neighbours, one row per area, Poisson counts with a BYM2
field), fitted by the Laplace approximation (``hp.glmm``) and sampled (``hp.bayes``, 4 chains x 500 draws after
500 warm-up; ``--large-draws``), in one process each: the seconds of each, the sampler's min bulk ESS of the area
effects.

``--gaussian``: a Gaussian response on the same counties (two rows each, ``y ~ x + car(county, type='bym2')``,
data written to benchmarks/out/spatial_gaussian.csv for both sides), hierpool's default exact sampler
(``method="auto"``: independence Metropolis-Hastings on the variance parameters, the effects drawn exactly) against
its NUTS (``method="full"``) and brms, hierpool's default priors on every side but the intercept's, set on
hierpool's side to its default until 2026-12-05 (Normal(mean y, 2.5 sd y)) as brms's side has it, 4 x 1000 draws, min bulk ESS of the county effects per second.
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
from bayes import commit, r_packages_missing, run_fit  # noqa: E402  (the contention record and the commit, as in the other benchmarks)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
FORMULA = "sid74 ~ nwbir_rate + offset(log(expected)) + car(county, type='bym2')"

HIERPOOL = textwrap.dedent(
    """
    import json, time, numpy as np
    import numpyro.distributions as dist
    import hierpool as hp
    hp.bayes  # the Bayesian engine's imports (loaded on first use), outside the clock as library(brms) is
    nc = hp.datasets.nc_sids()
    intercept = {"Intercept": dist.Normal(0.0, 2.5)}  # the reference's (validation/nc_sids.R), not hierpool's default
    t0 = time.perf_counter()
    post = hp.bayes(FORMULA, nc.data, family="poisson", adjacency=nc.adjacency, chains=4, draws=1000, tune=1000,
                    seed=1, progress=False, priors=intercept)
    wall = time.perf_counter() - t0
    table = post.diagnostics(warn=False)
    ranef = post.ranef
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ranef.ess_bulk.min()), max_r_hat=float(table.max_r_hat.max()),
                          divergences=post.divergences, steps_per_draw=float(post.idata.sample_stats.n_steps.mean()),
                          n_effects=len(ranef))))
    """
)

BRMS = textwrap.dedent(
    """
    suppressMessages(library(posterior))
    source("validation/nc_sids.R")  # nc, W, s_x, priors, formula: the reference run's
    t0 <- proc.time()[["elapsed"]]
    fit <- brm(formula, data = nc, data2 = list(W = W), family = poisson(), prior = priors, chains = 4,
               iter = 2000, warmup = 1000, cores = 2, seed = 1, refresh = 0, silent = 2)
    wall <- proc.time()[["elapsed"]] - t0
    draws <- as_draws_array(fit)
    rcar <- subset_draws(draws, variable = sprintf("rcar[%d]", seq_len(nrow(nc))))
    ess <- summarise_draws(rcar, ess_bulk)$ess_bulk
    rhat <- summarise_draws(draws, rhat)$rhat
    sampler <- nuts_params(fit)
    cat(toJSON(list(wall_s = wall, min_ess_bulk = min(ess), max_r_hat = max(rhat, na.rm = TRUE),
                    divergences = sum(subset(sampler, Parameter == "divergent__")$Value),
                    steps_per_draw = mean(subset(sampler, Parameter == "n_leapfrog__")$Value),
                    n_effects = length(ess), version = as.character(packageVersion("brms"))),
               auto_unbox = TRUE, digits = NA), "\\n")
    """
)

LARGE = textwrap.dedent(
    """
    import json, time, warnings, numpy as np, pandas as pd
    import hierpool as hp
    hp.bayes
    side = int(np.ceil(np.sqrt(AREAS)))
    labels = [f"a{i}" for i in range(AREAS)]
    pairs = [(i, i + 1) for i in range(AREAS - 1) if (i + 1) % side] + [(i, i + side) for i in range(AREAS - side)]
    edges = pd.DataFrame({"a": [labels[i] for i, _ in pairs], "b": [labels[j] for _, j in pairs]})
    rng = np.random.default_rng(1)
    # a smooth field (a random walk along both grid axes) and noise: BYM2-like, rho about 0.5
    rows, cols = np.arange(AREAS) // side, np.arange(AREAS) % side
    smooth = np.cumsum(rng.normal(size=side))[rows] * 0.1 + np.cumsum(rng.normal(size=side))[cols] * 0.1
    effect = 0.3 * (smooth - smooth.mean()) / smooth.std() + 0.2 * rng.normal(size=AREAS)
    expected = rng.uniform(2, 20, size=AREAS)
    x = rng.normal(size=AREAS)
    data = pd.DataFrame({"area": labels, "x": x, "expected": expected,
                         "y": rng.poisson(expected * np.exp(-0.1 + 0.2 * x + effect))})
    formula = "y ~ x + offset(log(expected)) + car(area, type='bym2')"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm(formula, data, family="poisson", adjacency=edges)
    laplace = time.perf_counter() - t0
    ranef = fit.ranef
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = hp.bayes(formula, data, family="poisson", adjacency=edges, chains=4, draws=DRAWS, tune=DRAWS, seed=1,
                        progress=False)
    sampling = time.perf_counter() - t0
    print(json.dumps(dict(areas=AREAS, edges=len(edges), draws=DRAWS, laplace_s=laplace, laplace_sd=fit.sd,
                          laplace_rho=fit.mix,
                          sampling_s=sampling, min_ess_bulk=float(post.ranef.ess_bulk.min()),
                          max_r_hat=float(post.diagnostics(warn=False).max_r_hat.max()),
                          divergences=post.divergences, posterior_sd=float(post.hyperparameters().loc["sd", "mean"]),
                          posterior_rho=float(post.hyperparameters().loc["rho", "mean"]),
                          wall_s=sampling)))
    """
)

GAUSSIAN_FORMULA = "y ~ x + car(county, type='bym2')"
GAUSSIAN_DATA = OUT / "spatial_gaussian.csv"

GAUSSIAN = textwrap.dedent(
    """
    import json, time, warnings, numpy as np, pandas as pd
    import numpyro.distributions as dist
    import hierpool as hp
    hp.bayes
    nc = hp.datasets.nc_sids()
    data = pd.read_csv(DATA)
    # brms's side's intercept prior (hierpool's default until 2026-12-05); population sd, as priors.py's
    intercept = {"Intercept": dist.Normal(data.y.mean(), 2.5 * data.y.std(ddof=0))}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = hp.bayes(FORMULA, data, adjacency=nc.adjacency, chains=4, draws=1000, tune=1000, seed=1,
                        progress=False, method=METHOD, priors=intercept)
    wall = time.perf_counter() - t0
    ranef = post.ranef
    print(json.dumps(dict(method=post.method, wall_s=wall, min_ess_bulk=float(ranef.ess_bulk.min()),
                          max_r_hat=float(post.diagnostics(warn=False).max_r_hat.max()), divergences=post.divergences,
                          hyperparameters=post.hyperparameters()["mean"].to_dict())))
    """
)

GAUSSIAN_BRMS = textwrap.dedent(
    """
    suppressMessages({library(brms); library(posterior); library(jsonlite)})
    source("validation/nc_sids.R")  # W, the counties' adjacency
    data <- read.csv(DATA)
    sd_n <- function(v) sqrt(mean((v - mean(v))^2))
    s_y <- sd_n(data$y)
    # hierpool's defaults for a Gaussian model (priors.py), the intercept's as it was until 2026-12-05, for brms
    priors <- c(prior_string(sprintf("normal(%.17g, %.17g)", mean(data$y), 2.5 * s_y), class = "b", coef = "Intercept"),
                prior_string(sprintf("normal(0, %.17g)", 2.5 * s_y / sd_n(data$x)), class = "b", coef = "x"),
                prior_string(sprintf("normal(0, %.17g)", 2.5 * s_y), class = "sdcar"),
                prior(beta(1, 1), class = rhocar),
                prior_string(sprintf("exponential(%.17g)", 1 / s_y), class = "sigma"))
    t0 <- proc.time()[["elapsed"]]
    fit <- brm(y ~ 0 + Intercept + x + car(W, gr = county, type = "bym2"), data = data, data2 = list(W = W),
               prior = priors, chains = 4, iter = 2000, warmup = 1000, cores = 2, seed = 1, refresh = 0, silent = 2)
    wall <- proc.time()[["elapsed"]] - t0
    draws <- as_draws_array(fit)
    rcar <- subset_draws(draws, variable = sprintf("rcar[%d]", seq_len(nrow(W))))
    ess <- summarise_draws(rcar, ess_bulk)$ess_bulk
    sampler <- nuts_params(fit)
    cat(toJSON(list(wall_s = wall, min_ess_bulk = min(ess), max_r_hat = max(summarise_draws(draws, rhat)$rhat,
                                                                            na.rm = TRUE),
                    divergences = sum(subset(sampler, Parameter == "divergent__")$Value)),
               auto_unbox = TRUE, digits = NA), "\\n")
    """
)


def gaussian_data() -> None:
    """A Gaussian response on North Carolina's counties (two rows each; a BYM2-like field), written for both sides."""
    import numpy as np
    import pandas as pd

    import hierpool as hp

    nc = hp.datasets.nc_sids()
    rng = np.random.default_rng(19)
    counties = nc.data.county.to_numpy()
    smooth = nc.data.nwbir_rate.to_numpy()  # a spatially smooth covariate's pattern as the structured part
    field = 0.8 * (smooth - smooth.mean()) / smooth.std() + 0.5 * rng.normal(size=counties.size)
    rows = np.repeat(np.arange(counties.size), 2)
    x = rng.normal(size=rows.size)
    y = 1.0 + 0.5 * x + field[rows] + rng.normal(scale=0.7, size=rows.size)
    OUT.mkdir(exist_ok=True)
    pd.DataFrame({"county": counties[rows], "x": x, "y": y}).to_csv(GAUSSIAN_DATA, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-brms", action="store_true")
    parser.add_argument("--skip-nc", action="store_true", help="only the large map")
    parser.add_argument("--large", type=int, default=0, help="areas of the synthetic map (0: none)")
    parser.add_argument("--large-draws", type=int, default=500, help="draws (and warm-up) per chain on that map")
    parser.add_argument("--gaussian", action="store_true",
                        help="a Gaussian BYM2 model on the NC counties: the exact sampler against NUTS and brms")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    os.chdir(ROOT)  # the fits run from the repository root, with this checkout first on the path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": commit(), "load_1min_at_start": os.getloadavg()[0], "formula": FORMULA,
        "protocol": "4 chains x 1000 draws after 1000 warm-up, seed 1, the same priors, target acceptance 0.8; min "
                    "bulk ESS of the 100 county effects per second of the fitting call (compilation included, imports "
                    "and data loading excluded), each fit in a fresh process; brms with cores = 2",
    }
    if not args.skip_nc:
        print("hierpool", file=sys.stderr, flush=True)
        results["hierpool"] = run_fit([sys.executable, "-"], HIERPOOL.replace("FORMULA", repr(FORMULA)))
        missing = "skipped (--skip-brms)" if args.skip_brms else r_packages_missing("brms", "posterior", "jsonlite")
        if missing is None:
            print("brms", file=sys.stderr, flush=True)
            results["brms"] = run_fit(["Rscript", "-"], BRMS)
        else:
            results["brms"] = f"skipped: {missing}"
        ours, theirs = results["hierpool"], results["brms"]
        if isinstance(theirs, dict) and "ess_per_s" in theirs and "ess_per_s" in ours:
            results["ratio_ess_per_s"] = ours["ess_per_s"] / theirs["ess_per_s"]
    if args.gaussian:
        gaussian_data()
        section = results["gaussian"] = {"formula": GAUSSIAN_FORMULA, "data": str(GAUSSIAN_DATA.relative_to(ROOT))}
        for method in ("auto", "full"):
            print(f"gaussian, hierpool method={method}", file=sys.stderr, flush=True)
            source = (GAUSSIAN.replace("FORMULA", repr(GAUSSIAN_FORMULA)).replace("METHOD", repr(method))
                      .replace("DATA", repr(str(GAUSSIAN_DATA))))
            section[f"hierpool_{method}"] = run_fit([sys.executable, "-"], source)
        missing = "skipped (--skip-brms)" if args.skip_brms else r_packages_missing("brms", "posterior", "jsonlite")
        if missing is None:
            print("gaussian, brms", file=sys.stderr, flush=True)
            section["brms"] = run_fit(["Rscript", "-"], GAUSSIAN_BRMS.replace("DATA", repr(str(GAUSSIAN_DATA))))
        else:
            section["brms"] = f"skipped: {missing}"
    if args.large:
        print(f"large map ({args.large} areas)", file=sys.stderr, flush=True)
        source = LARGE.replace("DRAWS", str(args.large_draws)).replace("AREAS", str(args.large))
        results["large"] = run_fit([sys.executable, "-"], source)
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / "spatial.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
