"""Animal model at scale: A^-1 from a pedigree and the REML fit of hp.lmm(..., relmat_inverse=).

    python benchmarks/relmat.py [--animals 100000] [--sires 100] [--dam-fraction 0.5]

A simulated pedigree of ``--animals`` animals in 10 generations (each generation's parents drawn from the one
before: ``--sires`` sires, ``--dam-fraction`` of its females as dams), breeding values simulated down the pedigree
(sigma_A^2 = 2, Mendelian sampling variance sigma_A^2 / 2), and one record on half the animals
(y = 1 + 0.5 x + a + e, sigma^2 = 3).  Prints the time of each step, the estimates, the correlation of the
breeding values with the simulated ones and the peak memory.  No anchor: lme4 with A's Cholesky factor in Z
cannot hold a dense factor of this size (benchmarks/RESULTS.md, "Relationship matrices").
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import pandas as pd

import hierpool as hp


def simulate(animals: int, sires: int, dam_fraction: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    generations, per = 10, animals // 10
    ids = np.array([f"a{i}" for i in range(animals)], dtype=object)
    sire, dam = np.full(animals, None, dtype=object), np.full(animals, None, dtype=object)
    for g in range(1, generations):
        low = (g - 1) * per
        born = np.arange(g * per, (g + 1) * per)
        males = rng.choice(np.arange(low, low + per // 2), sires, replace=False)
        females = rng.choice(np.arange(low + per // 2, low + per), int(dam_fraction * per // 2), replace=False)
        sire[born], dam[born] = ids[rng.choice(males, born.size)], ids[rng.choice(females, born.size)]
    position = {label: i for i, label in enumerate(ids)}
    value = np.zeros(animals)
    for i in range(animals):  # a = (a_sire + a_dam) / 2 + Mendelian sampling
        if sire[i] is None:
            value[i] = rng.normal(0, np.sqrt(2.0))
        else:
            value[i] = 0.5 * (value[position[sire[i]]] + value[position[dam[i]]]) + rng.normal(0, 1.0)
    pedigree = pd.DataFrame({"id": ids, "sire": sire, "dam": dam})
    recorded = rng.choice(animals, animals // 2, replace=False)
    pheno = pd.DataFrame({"animal": ids[recorded], "x": rng.normal(size=recorded.size)})
    pheno["y"] = 1 + 0.5 * pheno.x + value[recorded] + rng.normal(0, np.sqrt(3.0), recorded.size)
    return pedigree, pheno, pd.Series(value, index=ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--animals", type=int, default=100_000)
    parser.add_argument("--sires", type=int, default=100)
    parser.add_argument("--dam-fraction", type=float, default=0.5)
    args = parser.parse_args()
    pedigree, pheno, truth = simulate(args.animals, args.sires, args.dam_fraction)
    start = time.perf_counter()
    inverse = hp.pedigree.inverse_relationship_matrix(pedigree)
    built = time.perf_counter() - start
    start = time.perf_counter()
    fit = hp.lmm("y ~ x + (1 | animal)", pheno, relmat_inverse={"animal": inverse})
    fitted = time.perf_counter() - start
    start = time.perf_counter()
    h2 = fit.heritability()
    interval = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # condsd are not computed at this size: the BLUPs are
        bv = fit.ranef.set_index("grp").loc[truth.index, "condval"]
    print(f"animals {args.animals}, records {len(pheno)}: A^-1 {built:.1f} s, REML fit {fitted:.1f} s "
          f"({fit.evaluations} factorizations), heritability interval {interval:.1f} s; sigma_A^2 "
          f"{fit.sigma_a**2:.3f} (true 2), sigma^2 {fit.sigma**2:.3f} (true 3), h2 {h2.estimate.iloc[0]:.3f} "
          f"[{h2.lower.iloc[0]:.3f}, {h2.upper.iloc[0]:.3f}]; corr(BLUP, true) {np.corrcoef(bv, truth)[0, 1]:.3f}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
