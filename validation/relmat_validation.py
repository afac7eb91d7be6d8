"""The animal model's validation studies (``relmat=``), run and written to validation/relmat_validation.json.

    python -m validation.relmat_validation                   # both sections, 200 replications each (~12 minutes)
    python -m validation.relmat_validation --reps 40         # smaller
    python -m validation.relmat_validation --only coverage   # one section (the other kept in the JSON)

Section ``sbc``: simulation-based calibration of ``hp.bayes(..., relmat_inverse=)`` (the collapsed sampler over
sd_animal and sigma by independence Metropolis-Hastings, exact draws of beta and b) on a small pedigree of 60
animals (12 founders, two generations of 24, parents drawn from the generation before), 54 with a record and a
covariate, default priors frozen from the data.  Each replication draws every parameter from the prior, the
breeding values as sd L_A z over all 60 animals, and ranks the truth among 49 thinned posterior draws
(hierpool.validate.sbc).

Section ``coverage``: :func:`hierpool.validate.relmat_coverage` (a 110-animal pedigree, 100 records, sigma_A^2 = 2,
sigma^2 = 3): the REML fit's heritability profile interval, the sex effect's Wald interval and every animal's
BLUP +/- 1.96 PEV sd, and the posterior's intervals of h^2 and of every breeding value.

Every number in the JSON is computed by the run that wrote it, with its settings beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

import hierpool as hp

from . import studies

OUT = Path(__file__).resolve().parent / "relmat_validation.json"
SETTINGS = dict(n_draws=49, chains=2, draws_per_chain=250, tune=250, bins=5, seed=3)
COVERAGE_SETTINGS = dict(level=0.95, sigma_a2=2.0, sigma2=3.0, bayes_fit=True, chains=2, draws=500, seed=0,
                         founders=20, generations=3, per_generation=30)


def sbc_data() -> tuple[pd.DataFrame, tuple]:
    """The SBC design: a 60-animal pedigree, 54 records with a standard normal covariate (response replaced)."""
    rng = np.random.default_rng(0)
    ped = hp.validate.simulate_pedigree(rng, founders=12, generations=2, per_generation=24)
    recorded = ped.id.to_numpy()[6:]
    data = pd.DataFrame({"animal": recorded, "x": rng.normal(size=recorded.size), "y": rng.normal(size=recorded.size)})
    return data, hp.pedigree.inverse_relationship_matrix(ped)


def sbc_section(n_reps: int) -> dict:
    start = time.perf_counter()
    data, inverse = sbc_data()
    result = hp.validate.sbc("y ~ x + (1 | animal)", data, n_reps=n_reps, relmat_inverse={"animal": inverse},
                             **SETTINGS)
    return {
        "formula": "y ~ x + (1 | animal)", "relationship": "60-animal simulated pedigree (validation/"
        "relmat_validation.py: sbc_data)", "n_reps": n_reps, **SETTINGS,
        "passed": result.passed, "alpha": result.alpha,
        "tests": result.tests.reset_index().to_dict(orient="records"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def coverage_section(n_reps: int) -> dict:
    return studies.coverage_section(hp.validate.relmat_coverage, n_reps, COVERAGE_SETTINGS)


SECTIONS = {"sbc": sbc_section, "coverage": coverage_section}


def main(argv=None) -> None:
    studies.run_sections(__doc__, OUT, SECTIONS, "validation/relmat_validation.py", argv)


if __name__ == "__main__":
    main()
