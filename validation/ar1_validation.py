"""The AR(1) validation studies, run and written to validation/ar1_validation.json.

    python -m validation.ar1_validation                   # both sections, 200 replications each (~4 minutes)
    python -m validation.ar1_validation --reps 40         # smaller
    python -m validation.ar1_validation --only coverage   # one section (the other kept in the JSON)

Section ``sbc``: simulation-based calibration of ``hp.bayes(..., correlation=hp.ar1("g"))`` (the collapsed
sampler over sd, sigma and phi, exact draws of beta and b) on a small design: 6 groups x 8 steps, a
covariate, default priors frozen from the data.  Each replication draws every parameter (phi from its
Uniform(-1, 1) prior), simulates the residuals as an AR(1) chain in each group, and ranks the truth
among 49 thinned posterior draws (hierpool.validate.sbc).

Section ``coverage``: :func:`hierpool.validate.ar1_coverage` (20 series of 30 steps, phi 0.6, a covariate
in blocks of 5 steps): the fixed effect's Wald interval with and without the AR(1) correlation, phi's
interval, the BLUPs' and each series' next-step prediction interval.

Every number in the JSON is computed by the run that wrote it, with its settings beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

import hierpool as hp

from . import studies

OUT = Path(__file__).resolve().parent / "ar1_validation.json"
SETTINGS = dict(n_draws=49, chains=2, draws_per_chain=250, tune=250, bins=5, seed=3)
COVERAGE_SETTINGS = dict(level=0.95, n_groups=20, steps=30, phi=0.6, seed=0)


def sbc_data() -> pd.DataFrame:
    """The SBC design: 6 groups of 8 consecutive steps, a standard normal covariate (its response is replaced)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 8)
    return pd.DataFrame({"g": groups.astype(str), "x": rng.normal(size=48), "y": rng.normal(size=48)})


def sbc_section(n_reps: int) -> dict:
    start = time.perf_counter()
    result = hp.validate.sbc("y ~ x + (1 | g)", sbc_data(), n_reps=n_reps, correlation=hp.ar1("g"), **SETTINGS)
    return {
        "formula": "y ~ x + (1 | g)", "correlation": "hp.ar1('g')", "n_reps": n_reps, **SETTINGS,
        "passed": result.passed, "alpha": result.alpha,
        "tests": result.tests.reset_index().to_dict(orient="records"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def coverage_section(n_reps: int) -> dict:
    return studies.coverage_section(hp.validate.ar1_coverage, n_reps, COVERAGE_SETTINGS)


SECTIONS = {"sbc": sbc_section, "coverage": coverage_section}


def main(argv=None) -> None:
    studies.run_sections(__doc__, OUT, SECTIONS, "validation/ar1_validation.py", argv)


if __name__ == "__main__":
    main()
