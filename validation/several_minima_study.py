"""How often ``hp.lmm``, ``hp.fit_batch`` and lmer end in different minima of a small model's REML criterion.

    python -m validation.several_minima_study              # 200 datasets of each class (~10 minutes; needs R + lme4)
    python -m validation.several_minima_study --n 50       # smaller

Three classes, 6 groups x 6 rows each (8 x 6 for the four-coefficient slopes), one random-effect term:

* ``spline``: ``y ~ 1 + (0 + b0 + b1 + b2 + b3 | g)``, the b columns formulae's ``bs(x, df=4)`` of x ~ U(0, 1), each
  group's coefficients N(0, 1), residual sd 0.5;
* ``slopes3``: ``y ~ 1 + x1 + x2 + (1 + x1 + x2 | g)``, x ~ N(0, 1), each coefficient's sd U(0.1, 2), residual sd 1;
* ``slopes4``: the same with x1, x2, x3 on 8 groups.

For each class it counts the datasets where ``hp.lmm`` ends above lmer (``single > lmer``), the batch above lmer,
and the batch and ``hp.lmm`` apart (relative 1e-6 of max(1, |criterion|)); lower than lmer is counted too (lmer's
BOBYQA stops early on such flat criteria).  It prints a JSON report (not written anywhere: benchmarks/RESULTS.md
records the runs).  validation/several_minima_reference.R holds three of these datasets for the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from formulae import design_matrices

import hierpool as hp

FORMULAS = {"spline": "y ~ 1 + (0 + b0 + b1 + b2 + b3 | g)",
            "slopes3": "y ~ 1 + x1 + x2 + (1 + x1 + x2 | g)",
            "slopes4": "y ~ 1 + x1 + x2 + x3 + (1 + x1 + x2 + x3 | g)"}

LOOP_R = """
library(lme4)
d <- read.csv("CSV", colClasses = c(g = "character"))
crit <- sapply(split(d, d$dataset), function(x) suppressWarnings(suppressMessages(REMLcrit(lmer(FORMULA, x)))))
cat(jsonlite::toJSON(list(dataset = as.integer(names(crit)), crit = unname(crit)), digits = NA))
"""


def spline_data(seed: int) -> pd.DataFrame:
    """6 groups x 6 rows, a cubic B-spline basis of x per row, each group's own coefficients."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(6), 6)
    x = rng.uniform(0, 1, 36)
    basis = np.asarray(design_matrices("y ~ 0 + bs(x, df=4)", pd.DataFrame({"x": x, "y": x})).common)
    data = pd.DataFrame(basis, columns=["b0", "b1", "b2", "b3"])
    data["g"] = group.astype(str)
    data["y"] = 1 + (basis * rng.normal(size=(6, 4))[group]).sum(axis=1) + rng.normal(0, 0.5, 36)
    return data


def slopes_data(seed: int, k: int, groups: int) -> pd.DataFrame:
    """``groups`` groups x 6 rows, k - 1 standard normal covariates, independent random coefficients."""
    rng = np.random.default_rng(1000 + seed)
    group = np.repeat(np.arange(groups), 6)
    x = rng.normal(size=(groups * 6, k - 1))
    data = pd.DataFrame(x, columns=[f"x{j}" for j in range(1, k)])
    data["g"] = group.astype(str)
    z = np.column_stack([np.ones(len(x)), x])
    coefficients = rng.normal(size=(groups, k)) * rng.uniform(0.1, 2, k)
    data["y"] = 1 + 0.5 * x.sum(axis=1) + (z * coefficients[group]).sum(axis=1) + rng.normal(0, 1, len(x))
    return data


def datasets(kind: str, n: int) -> list[pd.DataFrame]:
    make = {"spline": spline_data, "slopes3": lambda s: slopes_data(s, 3, 6),
            "slopes4": lambda s: slopes_data(s, 4, 8)}[kind]
    return [make(seed) for seed in range(n)]


def lmer_criteria(kind: str, frames: list[pd.DataFrame]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "data.csv"
        pd.concat([f.assign(dataset=i) for i, f in enumerate(frames)]).to_csv(csv, index=False)
        script = LOOP_R.replace("CSV", str(csv)).replace("FORMULA", FORMULAS[kind])
        run = subprocess.run(["Rscript", "-"], input=script, capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    return np.asarray(out["crit"])[np.argsort(out["dataset"])]


def study(kind: str, n: int) -> dict:
    frames = datasets(kind, n)
    lmer = lmer_criteria(kind, frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        start = time.perf_counter()
        single = np.array([hp.lmm(FORMULAS[kind], f).objective for f in frames])
        single_s = time.perf_counter() - start
        start = time.perf_counter()
        batch = hp.fit_batch(FORMULAS[kind], frames, progress=False)
        batch_s = time.perf_counter() - start
    objective = batch.objective.to_numpy()

    def above(a, b):  # a above b beyond rounding and flat-ridge noise
        return int(np.sum(a - b > 1e-6 * np.maximum(1.0, np.abs(b))))

    return {"formula": FORMULAS[kind], "datasets": n, "single_above_lmer": above(single, lmer),
            "single_below_lmer": above(lmer, single), "batch_above_lmer": above(objective, lmer),
            "batch_above_single": above(objective, single), "batch_below_single": above(single, objective),
            "batch_refit": int(batch.refit.sum()), "hp_lmm_loop_s": round(single_s, 2),
            "fit_batch_s": round(batch_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="datasets of each class")
    arguments = parser.parse_args()
    print(json.dumps({kind: study(kind, arguments.n) for kind in FORMULAS}, indent=2))


if __name__ == "__main__":
    main()
