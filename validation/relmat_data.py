"""Simulated pedigree and phenotypes for the animal-model reference (validation/relmat_reference.R).

    python validation/relmat_data.py

Writes (deterministic, fixed seed):
  validation/relmat_pedigree.csv    id, sire, dam          (unknown parent = empty field)
  validation/relmat_phenotypes.csv  animal, sex, y         (one row per record)

Pedigree: 400 animals in 5 generations.  Generation 1 is 40 founders (20 sires, 20 dams, parents
unknown); generations 2-5 have 90 animals each (45 male, 45 female).  Each animal of a later generation
gets a sire and a dam from the males and females of earlier generations, drawn with weights favouring
the most recent generation and from a small set of sires per generation, so relatives mate (half- and
full-sib matings happen) and later generations are inbred.  Parents always appear before their offspring.

Phenotypes: 300 of the 400 animals have a record (the 100 without include founders and non-founders);
30 of the 300 have a second record (repeated records), 330 rows in all.  True model
    y = 10 + 1.5 [sex == M] + a + e,   a ~ N(0, 2.0 A),   e ~ N(0, 3.0),
with the breeding values a simulated along the pedigree: founders a ~ N(0, sigma_A^2), later animals
a = (a_sire + a_dam) / 2 + m,  m ~ N(0, (1 - (F_sire + F_dam) / 2) / 2 * sigma_A^2),
F the inbreeding coefficients from the numerator relationship matrix A (Henderson's tabular method).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240611
N_FOUNDER_SIRES = 20
N_FOUNDER_DAMS = 20
N_GENERATIONS = 5
N_PER_GENERATION = 90  # generations 2..5, half male, half female
SIRES_PER_GENERATION = 8  # sires used per generation: few sires -> many half-sibs -> inbreeding later
DAMS_PER_GENERATION = 20  # dams used per generation (each has several offspring)
RECENT_WEIGHT = 4.0  # parents from the previous generation are this much likelier than older ones
N_UNRECORDED = 100
N_UNRECORDED_FOUNDERS = 10
N_REPEATED = 30
MU, SEX_EFFECT, SIGMA2_A, SIGMA2_E = 10.0, 1.5, 2.0, 3.0

HERE = Path(__file__).resolve().parent


def tabular_A(sire: np.ndarray, dam: np.ndarray) -> np.ndarray:
    """Numerator relationship matrix by Henderson's tabular method; parents are indices (-1 = unknown)."""
    n = len(sire)
    A = np.zeros((n, n))
    for i in range(n):
        s, d = sire[i], dam[i]
        for j in range(i):
            a_js = A[j, s] if s >= 0 else 0.0
            a_jd = A[j, d] if d >= 0 else 0.0
            A[i, j] = A[j, i] = 0.5 * (a_js + a_jd)
        A[i, i] = 1.0 + (0.5 * A[s, d] if s >= 0 and d >= 0 else 0.0)
    return A


def pick(rng: np.random.Generator, pool: list[int], gens: np.ndarray, current: int, size: int,
         replace: bool) -> np.ndarray:
    """Draw from pool (animal indices) with weights favouring the generation just before `current`."""
    w = np.where(gens[pool] == current - 1, RECENT_WEIGHT, 1.0)
    return rng.choice(pool, size=size, replace=replace, p=w / w.sum())


def main() -> None:
    rng = np.random.default_rng(SEED)

    # --- pedigree --------------------------------------------------------------------------------
    n_founders = N_FOUNDER_SIRES + N_FOUNDER_DAMS
    n = n_founders + (N_GENERATIONS - 1) * N_PER_GENERATION
    sire = np.full(n, -1)
    dam = np.full(n, -1)
    sex = np.array(["M"] * N_FOUNDER_SIRES + ["F"] * N_FOUNDER_DAMS + [""] * (n - n_founders), dtype=object)
    gen = np.zeros(n, dtype=int)
    gen[:n_founders] = 1
    k = n_founders
    for g in range(2, N_GENERATIONS + 1):
        males = [i for i in range(k) if sex[i] == "M"]
        females = [i for i in range(k) if sex[i] == "F"]
        sires_g = pick(rng, males, gen, g, SIRES_PER_GENERATION, replace=False)
        dams_g = pick(rng, females, gen, g, DAMS_PER_GENERATION, replace=False)
        sexes_g = rng.permutation(["M", "F"] * (N_PER_GENERATION // 2))
        for j in range(N_PER_GENERATION):
            i = k + j
            gen[i] = g
            sex[i] = sexes_g[j]
            sire[i] = rng.choice(sires_g)
            dam[i] = rng.choice(dams_g)  # dams may have several offspring (full sibs when sires repeat)
        k += N_PER_GENERATION
    assert all(sex[s] == "M" for s in sire[sire >= 0]) and all(sex[d] == "F" for d in dam[dam >= 0])

    A = tabular_A(sire, dam)
    F = np.diag(A) - 1.0

    # --- breeding values along the pedigree --------------------------------------------------------
    a = np.zeros(n)
    for i in range(n):
        s, d = sire[i], dam[i]
        if s < 0 and d < 0:
            a[i] = rng.normal(0.0, np.sqrt(SIGMA2_A))
        else:  # every non-founder here has both parents known
            ms_var = 0.5 * (1.0 - 0.5 * (F[s] + F[d])) * SIGMA2_A
            a[i] = 0.5 * (a[s] + a[d]) + rng.normal(0.0, np.sqrt(ms_var))

    ids = np.array([f"a{i + 1:03d}" for i in range(n)], dtype=object)
    ped = pd.DataFrame({
        "id": ids,
        "sire": [ids[s] if s >= 0 else None for s in sire],
        "dam": [ids[d] if d >= 0 else None for d in dam],
    })

    # --- records -----------------------------------------------------------------------------------
    founders = np.arange(n_founders)
    others = np.arange(n_founders, n)
    unrecorded = np.concatenate([
        rng.choice(founders, N_UNRECORDED_FOUNDERS, replace=False),
        rng.choice(others, N_UNRECORDED - N_UNRECORDED_FOUNDERS, replace=False),
    ])
    recorded = np.setdiff1d(np.arange(n), unrecorded)
    repeated = np.sort(rng.choice(recorded, N_REPEATED, replace=False))
    rows = np.sort(np.concatenate([recorded, repeated]))
    e = rng.normal(0.0, np.sqrt(SIGMA2_E), size=len(rows))
    y = MU + SEX_EFFECT * (sex[rows] == "M") + a[rows] + e
    phen = pd.DataFrame({"animal": ids[rows], "sex": sex[rows], "y": np.round(y, 6)})

    ped.to_csv(HERE / "relmat_pedigree.csv", index=False)
    phen.to_csv(HERE / "relmat_phenotypes.csv", index=False)

    print(f"animals {n}, founders {n_founders}, recorded {len(recorded)}, unrecorded {len(unrecorded)} "
          f"({N_UNRECORDED_FOUNDERS} founders), records {len(rows)}, repeated {N_REPEATED}")
    print(f"inbred animals {np.sum(F > 0)}, max F {F.max():.6f}, mean F (gen 5) {F[gen == 5].mean():.6f}")
    print(f"true a: var {a.var():.3f}; y mean {y.mean():.3f}, var {y.var():.3f}")


if __name__ == "__main__":
    main()
