"""Frequentist coverage of the animal model's intervals (``relmat=``), by simulation.

One pedigree (the design) is drawn once: ``founders`` unrelated animals, then ``generations`` generations of
``per_generation`` animals, each with a sire and a dam drawn from the generation before (so relatives and some
inbreeding).  Every animal but the first half of the founders has one record.  Each replication draws the
breeding values a ~ N(0, sigma_A^2 A) (through A's Cholesky factor) and the records
y = 10 + 1 [sex = M] + a + e, e ~ N(0, sigma^2), fits ``hp.lmm(..., relmat_inverse=)`` (REML) and, with
``bayes=True``, ``hp.bayes(..., relmat_inverse=)`` (the collapsed sampler, default priors), and checks whether each
interval covers its target:

* ``heritability (profile)``: :meth:`~hierpool.closedform.relmat.RelmatResult.heritability`'s profile-likelihood
  interval around h^2 = sigma_A^2 / (sigma_A^2 + sigma^2);
* ``fixed effect sex``: the Wald interval around 1;
* ``breeding value (BLUP)``: BLUP +/- z PEV sd around each animal's a, with a record or without;
* ``heritability (posterior)`` and ``breeding value (posterior)``: the posterior's equal-tailed intervals.

Coverage and its Monte-Carlo se as :func:`hierpool.validate.coverage.coverage` reports them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import pedigree as pedigrees
from ..bayesian import bayes
from ..closedform import lmm
from ..closedform.predict import normal_quantile
from ..errors import boolean_argument, integer_argument, real_argument, seed_argument
from ..spec.arguments import MIN_DRAWS, probability_argument
from ._arguments import generator_argument
from .coverage import coverage_of

INTERCEPT, SEX_EFFECT = 10.0, 1.0
FORMULA = "y ~ sex + (1 | animal)"


def simulate_pedigree(rng, founders: int = 20, generations: int = 3, per_generation: int = 30) -> pd.DataFrame:
    """A pedigree (id, sire, dam; unknown parents NaN), parents before offspring.

    Each animal's two parents are drawn from the generation before: at least 2 founders, and at least 2 animals
    per generation."""
    generator_argument(rng)
    founders = integer_argument("founders", founders, minimum=2)
    generations = integer_argument("generations", generations, minimum=0)
    per_generation = integer_argument("per_generation", per_generation, minimum=2)
    rows, previous = [], []
    for i in range(founders):
        rows.append((f"f{i:03d}", np.nan, np.nan))
        previous.append(f"f{i:03d}")
    for g in range(generations):
        current = []
        for i in range(per_generation):
            sire, dam = rng.choice(previous, size=2, replace=False)
            rows.append((f"g{g}_{i:03d}", sire, dam))
            current.append(f"g{g}_{i:03d}")
        previous = current
    return pd.DataFrame(rows, columns=["id", "sire", "dam"])


def relmat_coverage(n_reps: int = 100, level: float = 0.95, sigma_a2: float = 2.0, sigma2: float = 3.0,
                    bayes_fit: bool = False, chains: int = 2, draws: int = 500, seed: int = 0,
                    founders: int = 20, generations: int = 3, per_generation: int = 30) -> pd.DataFrame:
    """Coverage of the animal model's intervals (see the module docstring).

    Returns
    -------
    pandas.DataFrame
        interval, n (intervals checked), coverage, mcse.
    """
    n_reps = integer_argument("n_reps", n_reps)
    probability_argument("level", level)
    sigma_a2 = real_argument("sigma_a2", sigma_a2, above=0.0)
    sigma2 = real_argument("sigma2", sigma2, above=0.0)
    bayes_fit = boolean_argument("bayes_fit", bayes_fit)
    chains = integer_argument("chains", chains)
    draws = integer_argument("draws", draws, minimum=MIN_DRAWS)
    founders = integer_argument("founders", founders, minimum=2)
    generations = integer_argument("generations", generations, minimum=0)
    per_generation = integer_argument("per_generation", per_generation, minimum=2)
    rng = np.random.default_rng(seed_argument(seed))
    ped = simulate_pedigree(rng, founders, generations, per_generation)
    inverse = pedigrees.inverse_relationship_matrix(ped)
    labels = list(inverse[1])
    factor = np.linalg.cholesky(pedigrees.relationship_matrix(ped).loc[labels, labels].to_numpy())
    recorded = [label for label in labels if not (label.startswith("f") and int(label[1:]) < founders // 2)]
    sex = rng.choice(["F", "M"], size=len(recorded))
    position = pd.Index(labels).get_indexer(recorded)
    h2 = sigma_a2 / (sigma_a2 + sigma2)
    z = normal_quantile(level)
    hits: dict[str, list] = {}

    def record(name, covered):
        covered = np.atleast_1d(np.asarray(covered, dtype=bool))
        hits.setdefault(name, []).append((int(covered.sum()), covered.size))

    for rep in range(n_reps):
        a = np.sqrt(sigma_a2) * factor @ rng.normal(size=len(labels))
        y = INTERCEPT + SEX_EFFECT * (sex == "M") + a[position] + rng.normal(0.0, np.sqrt(sigma2), len(recorded))
        data = pd.DataFrame({"animal": recorded, "sex": sex, "y": y})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boundary fits of small samples are part of the study
            fit = lmm(FORMULA, data, relmat_inverse={"animal": inverse})
            interval = fit.heritability(level)
            record("heritability (profile)", interval.lower.iloc[0] <= h2 <= interval.upper.iloc[0])
            record("fixed effect sex", abs(fit.fixef["sex[M]"] - SEX_EFFECT) <= z * fit.fixef_se["sex[M]"])
            ranef = fit.ranef.set_index("grp").loc[labels]
            record("breeding value (BLUP)", np.abs(ranef.condval.to_numpy() - a) <= z * ranef.condsd.to_numpy())
            if bayes_fit:
                post = bayes(FORMULA, data, relmat_inverse={"animal": inverse}, chains=chains, draws=draws,
                             seed=seed + rep, level=level)
                h2_draws = post.idata.posterior["heritability"].values.ravel()
                low, high = np.quantile(h2_draws, [(1 - level) / 2, (1 + level) / 2])
                record("heritability (posterior)", low <= h2 <= high)
                summary = post.ranef.set_index("grp").loc[labels]
                record("breeding value (posterior)", (summary.lower.to_numpy() <= a) & (a <= summary.upper.to_numpy()))
    return pd.DataFrame([{"interval": name, **coverage_of(per_rep)} for name, per_rep in hits.items()])
