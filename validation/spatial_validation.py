"""Disease mapping's validation studies (``car(...)`` terms), run and written to validation/spatial_validation.json.

    python -m validation.spatial_validation                  # every section, 200 replications each (~15 minutes)
    python -m validation.spatial_validation --reps 40        # smaller
    python -m validation.spatial_validation --only sbc_icar  # one section (the others kept in the JSON)

The design (:func:`grid_data`): a 5 x 4 grid of 20 areas with rook neighbours, one row per area, a standard normal
covariate and expected counts from 2 to 12; ``y ~ x + offset(log(expected)) + car(area, type=...)``, Poisson.
Priors that simulate and analyse (frozen): Normal(0, 1) on both fixed effects, HalfNormal(1) on the spatial sd,
Beta(1, 1) on BYM2's rho.  Each replication draws every parameter and the field from the prior
(:func:`hierpool.validate.spatial_sbc`), simulates the counts and ranks the truth among 49 thinned posterior draws
(fixed effects, sd, rho, and the effects of the first and last area).

Sections: ``sbc_icar`` (the intrinsic CAR: issue 19's check), ``sbc_bym2``, and ``sbc_icar_wrong_prior``: the ICAR
analysed under a HalfNormal(0.2) sd prior, a miscalibrated analysis the check must fail (it shows the check can).

Every number in the JSON is computed by the run that wrote it, with its settings beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpyro.distributions as dist
import pandas as pd

import hierpool as hp
from hierpool.spec.adjacency import lattice_edges

from . import studies

OUT = Path(__file__).resolve().parent / "spatial_validation.json"
SETTINGS = dict(n_draws=49, chains=2, draws_per_chain=250, tune=250, bins=5, seed=19)
PRIORS = {"Intercept": dist.Normal(0.0, 1.0), "b": dist.Normal(0.0, 1.0), "sd": dist.HalfNormal(1.0)}
WRONG = {**PRIORS, "sd": dist.HalfNormal(0.2)}


def grid_data(rows: int = 5, cols: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(data, edge list) of the SBC design (module docstring); the response column is replaced by each replication."""
    rng = np.random.default_rng(0)
    n = rows * cols
    labels = [f"r{i // cols}c{i % cols}" for i in range(n)]
    edges = lattice_edges(rows, cols, labels=lambda i: labels[i])
    expected = rng.uniform(2, 12, size=n)
    data = pd.DataFrame({"area": labels, "x": rng.normal(size=n), "expected": expected, "y": rng.poisson(expected)})
    return data, edges


def _section(type_: str, fit_priors: dict | None = None):
    def section(n_reps: int) -> dict:
        start = time.perf_counter()
        data, edges = grid_data()
        formula = f"y ~ x + offset(log(expected)) + car(area, type='{type_}')"
        result = hp.validate.spatial_sbc(formula, data, edges, family="poisson", priors=PRIORS, fit_priors=fit_priors,
                                         n_reps=n_reps, **SETTINGS)
        return {"formula": formula, "graph": "5 x 4 grid, rook neighbours (validation/spatial_validation.py: "
                "grid_data)", "priors": {k: repr(v) for k, v in PRIORS.items()},
                "fit_priors": None if fit_priors is None else {k: repr(v) for k, v in fit_priors.items()},
                "n_reps": n_reps, **SETTINGS, "passed": result.passed, "alpha": result.alpha,
                "tests": result.tests.reset_index().to_dict(orient="records"),
                "seconds": round(time.perf_counter() - start, 1)}

    return section


SECTIONS = {"sbc_icar": _section("icar"), "sbc_bym2": _section("bym2"),
            "sbc_icar_wrong_prior": _section("icar", WRONG)}


def main(argv=None) -> None:
    studies.run_sections(__doc__, OUT, SECTIONS, "validation/spatial_validation.py", argv)


if __name__ == "__main__":
    main()
