"""Every GPU check of the project in one run (under 5 minutes on one GPU): writes benchmarks/out/gpu.json.

    python benchmarks/gpu.py --fetch-wheels      # once, on a machine with internet: wheels into .whl/
    python benchmarks/gpu.py                     # on the machine with an NVIDIA GPU (offline is fine)
    python benchmarks/gpu.py --small             # the same checks, 100x smaller: a dry run on a CPU
    python benchmarks/gpu.py --budget 290        # the checks' seconds together (the default): a check still
                                                 # running then is stopped and says so; the rest are not started

Where the environment names an ``OUT`` folder (a device machine's folder of files that come back), gpu.json is
written there too.

GPU machines are often offline images with JAX (CUDA), NumPyro, NumPy, pandas and SciPy but not the rest of
hierpool's dependencies: ``--fetch-wheels`` downloads those (:data:`WHEELS`, pure-Python or manylinux x86-64 for
``--python-version``, default 3.12) into ``.whl/`` at the repository's root (git-ignored); a run then installs them
with ``pip --no-index --no-deps --target`` into a folder of its own and puts that and the repository on the checks'
``PYTHONPATH`` (nothing is installed into the machine's Python, and nothing is fetched there).  It stops at once,
naming them, where modules are still missing, and reports ``backend`` (JAX's default backend) in the JSON: a run
on a machine whose JAX has no GPU backend measures the CPU, and says so.  Checks, each in a fresh process,
compilation included, the clock around the fit and its tables (data generation outside):

1. ``hp.fit_batch`` on 100,000 sleepstudy-shaped datasets (``Reaction ~ Days + (Days | Subject)``), a long frame
   whose datasets share sleepstudy's design (fitted as responses on it: :mod:`hierpool.batch.shared_design`): fits
   per second, float64 and float32 (the issue's target: 50,000 fits/s on one GPU), then float64 again on other
   data of the same shape in the same process (``float64_warm``: programs compiled, workers started), with the
   seconds spent in each of ``fit_batch``'s host stages (``host_stages_s``), and on a fifth of those datasets with
   each one's rows in an order of its own (``float64_own_designs``: the long frame's own path);
2. ``hp.fit_batch(formula, data, responses=Y)`` on 100,000 responses of the same shape on one design (a
   simulation study's: sleepstudy's rows once, the responses a matrix): fits per second in float64 after an untimed
   warm-up (``float64_warm``, with its host stages' seconds), then with two chunks in flight
   (``float64_two_threads``: ``plan.ACCELERATOR_THREADS``);
3. ``hp.fit_batch`` on 10,000 Penicillin-shaped crossed datasets (``diameter ~ 1 + (1 | plate) + (1 | sample)``),
   as a long frame and as responses on Penicillin's design (``shared_design_*``);
4. ``hp.fit_batch(..., family="binomial")`` on 10,000 cbpp-shaped datasets;
5. ``hp.bayes_batch`` on 1,000 sleepstudy-shaped datasets x 4 chains (1000 warm-up + 1000 draws).

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

    def staged(call):
        # (call()'s value, seconds spent in each of fit_batch's host stages during it): where the time goes
        import functools
        from hierpool.batch import fit as F, plan as P, shared_design as S
        spent, saved = {}, []
        def timed(owner, name):
            function = getattr(owner, name)
            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            saved.append((owner, name, function))
            setattr(owner, name, wrapper)
        for owner, name in ((F, "plan_batch"), (P, "build_design"), (F, "condition_batch"), (P.BatchPlan, "buckets"),
                            (P, "sufficient_statistics"), (F, "moment_start"), (F, "_programs"), (F, "_result"),
                            (F, "refit_values"), (F, "shared_design_plan"), (S.SharedDesignPlan, "buckets"),
                            (F, "one_design_in_long_frame"), (S, "near_exact_responses"), (P.BatchPlan, "location_shifts"),
                            (F, "near_exact_datasets"), (F, "stopped_rows_searched_on_host"),
                            (F, "NanRows"), (F, "systems_onto_boundary")):
            timed(owner, name)
        try:
            return call(), {name: round(value, 3) for name, value in spent.items()}
        finally:
            for owner, name, function in saved:
                setattr(owner, name, function)

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
        # again in this process, on other data of the same shape: the programs compiled and any worker processes
        # started (the throughput of a session's later batches), with the time of each host stage
        again = hp.datasets.sleepstudy_replicates(N, seed=2027)
        t0 = time.perf_counter()
        res_again, stages = staged(lambda: hp.fit_batch("Reaction ~ Days + (Days | Subject)", again, progress=False))
        res_again.fixef, res_again.varcorr
        wall = time.perf_counter() - t0
        out["float64_warm"] = dict(wall_s=wall, fits_per_s=N / wall, converged=int(res_again.converged.sum()),
                                   refitted=int(res_again.refit.sum()), host_stages_s=stages)
        # the long frame's own path (each dataset's statistics from its rows): a fifth of the datasets, each one's
        # rows in an order of its own, so that they share no design (the frames above share one: fitted as
        # responses on it, hierpool.batch.shared_design)
        own = again[again.dataset < N // 5]
        order = np.lexsort((np.random.default_rng(1).random(len(own)), own.dataset.to_numpy()))
        own = own.iloc[order].reset_index(drop=True)
        t0 = time.perf_counter()
        res_own, stages = staged(lambda: hp.fit_batch("Reaction ~ Days + (Days | Subject)", own, progress=False))
        res_own.fixef, res_own.varcorr
        wall = time.perf_counter() - t0
        out["float64_own_designs"] = dict(datasets=N // 5, wall_s=wall, fits_per_s=N // 5 / wall,
                                          converged=int(res_own.converged.sum()), refitted=int(res_own.refit.sum()),
                                          host_stages_s=stages)
        frames = [f for _, f in data[data.dataset < 20].groupby("dataset")]
        out["max_rel_criterion_vs_hp_lmm"] = agreement(
            res, frames, lambda f: hp.lmm("Reaction ~ Days + (Days | Subject)", f))  # float32's, the looser
        print(json.dumps(out))
        """
    ),
    "sleepstudy_shared_design": textwrap.dedent(
        """
        formula = "Reaction ~ Days + (Days | Subject)"

        def responses(seed):  # (rows, datasets): sleepstudy_replicates' Reaction, without its long frame
            return hp.datasets.sleepstudy_responses(N, seed=seed)[1]

        design = hp.datasets.sleepstudy_responses(1)[0]

        from hierpool.batch import plan as chunk_threads
        out = {}
        # float64_two_threads: two chunks in flight (plan.ACCELERATOR_THREADS = 2), the host's work on one beside
        # the device's on the other, against float64_warm's one
        # (float64 cold: the first check's, whose long frame is fitted on this path).  Untimed, the programs of a
        # 100,000's chunks compiled (the accelerator's 4096 a chunk, and the remainder's)
        warm_up = hp.datasets.sleepstudy_responses(min(N, 4096 + N % 4096), seed=2025)[1]
        hp.fit_batch(formula, design, responses=warm_up, progress=False)
        for name, dtype, seed in (("float64_warm", "float64", 2027), ("float64_two_threads", "float64", 2029)):
            chunk_threads.ACCELERATOR_THREADS = 2 if name == "float64_two_threads" else 1
            Y = responses(seed)
            t0 = time.perf_counter()
            res, stages = staged(lambda: hp.fit_batch(formula, design, responses=Y, dtype=dtype, progress=False))
            res.fixef, res.varcorr
            wall = time.perf_counter() - t0
            out[name] = dict(wall_s=wall, fits_per_s=N / wall, converged=int(res.converged.sum()),
                             refitted=int(res.refit.sum()), host_stages_s=stages)
            if name == "float64_warm":
                frames = [design.assign(Reaction=Y[:, j]) for j in range(20)]
                out["max_rel_criterion_vs_hp_lmm"] = agreement(res, frames, lambda f: hp.lmm(formula, f))
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
        # the same datasets as responses on Penicillin's one design (fit_batch responses=: its systems by products)
        t0 = time.perf_counter()
        shared = hp.fit_batch(formula, pen, responses=sims, progress=False)
        shared.fixef, shared.varcorr, shared.ranef
        shared_wall = time.perf_counter() - t0
        frames = [pen.assign(diameter=sims[:, j]) for j in range(20)]
        print(json.dumps(dict(wall_s=wall, fits_per_s=N / wall, converged=int(res.converged.sum()),
                              refitted=int(res.refit.sum()),
                              max_rel_criterion_vs_hp_lmm=agreement(res, frames, lambda f: hp.lmm(formula, f)),
                              shared_design_wall_s=shared_wall, shared_design_fits_per_s=N / shared_wall,
                              shared_max_rel_criterion_vs_long=float(np.max(np.abs(
                                  shared.objective.to_numpy() / res.objective.to_numpy() - 1))))))
        """
    ),
    "cbpp_fit_batch": textwrap.dedent(
        """
        cbpp = hp.datasets.cbpp()
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

#: Seconds for all the checks of a run (``--budget``): the issue asks for every GPU check in under 5 minutes, and a
#: device machine's time is scarce, so a check that runs long is stopped rather than left to use it up.
BUDGET_S = 290.0

SIZES = {"sleepstudy_fit_batch": 100_000, "sleepstudy_shared_design": 100_000, "penicillin_fit_batch": 10_000,
         "cbpp_fit_batch": 10_000, "sleepstudy_bayes_batch": 1_000}


#: hierpool's dependencies that a GPU image with JAX, NumPyro, NumPy, pandas, SciPy, xarray, h5py and matplotlib
#: may lack, with theirs (arviz's h5netcdf, xarray-einstats, platformdirs), at the versions this project is tested
#: with (installed only where a module of :data:`MODULES` is missing).
WHEELS = ("formulae==0.9.0", "arviz==0.23.4", "h5netcdf==1.8.3", "xarray-einstats==0.9.1", "platformdirs==4.14.9",
          "nlopt==2.11.0", "threadpoolctl==3.8.0", "tabulate==0.10.0")
#: The modules the checks import: the package's dependencies, those it imports lazily too (threadpoolctl on the
#: GLMM's host path: ``import hierpool`` succeeds without it, ``hp.glmm`` does not).
MODULES = ("jax", "numpyro", "numpy", "pandas", "scipy", "formulae", "arviz", "nlopt", "threadpoolctl", "tabulate")
WHEEL_DIR = ROOT / ".whl"


def fetch_wheels(python_version: str) -> None:
    """Download :data:`WHEELS` into :data:`WHEEL_DIR` for CPython ``python_version`` on manylinux x86-64."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                              "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"--python-version={python_version}", "--implementation=cp", *platforms,
                    f"--dest={WHEEL_DIR}", *WHEELS], check=True)


def missing_modules(env: dict) -> list[str]:
    """The modules of :data:`MODULES` that ``env``'s Python cannot import, and hierpool where it does not."""
    probe = (f"import importlib.util as u; print(' '.join(m for m in {MODULES!r} if u.find_spec(m) is None) or '-'); "
             "import hierpool")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=False)
    missing = [m for m in run.stdout.split() if m != "-"]
    return missing + (["hierpool"] if run.returncode != 0 and not missing else [])


def prepared_environment() -> dict:
    """The environment the checks run in: the repository and the wheels' folder on ``PYTHONPATH``, the wheels of
    :data:`WHEEL_DIR` installed there (offline) where modules are missing.  Exits naming what is still missing."""
    env = dict(os.environ)
    site = Path(os.environ.get("TMPDIR", "/tmp")) / "hierpool-gpu-site"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), env.get("PYTHONPATH", "")) if p)
    missing = missing_modules(env)
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if missing and wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", f"--target={site}", *map(str, wheels)], check=True)
        missing = missing_modules(env)
    if missing:
        sys.exit(f"benchmarks/gpu.py: cannot import {', '.join(missing)}: run `python benchmarks/gpu.py "
                 "--fetch-wheels` on a machine with internet and bring .whl/ along")
    return env


def _which(name: str) -> bool:
    return any((Path(p) / name).exists() for p in os.environ.get("PATH", "").split(os.pathsep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="every check 100x smaller (a dry run)")
    parser.add_argument("--only", nargs="*", default=list(CHECKS), help="checks to run (default: all)")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the wheels an offline GPU machine "
                        "needs into .whl/ and stop")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --fetch-wheels")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all the checks together "
                        f"(default {BUDGET_S:.0f}): a check still running when they are spent is stopped and its row "
                        "says so, and the checks after it are not started")
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels(args.python_version)
        return
    env = prepared_environment()
    OUT.mkdir(exist_ok=True)
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip() \
        if _which("nvidia-smi") else "none"
    backend = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend(), jax.__version__)"],
                             capture_output=True, text=True, env=env, check=False).stdout.strip()
    results = {"gpu": gpu, "backend": backend, "small": args.small, "checks": {}}
    print("gpu:", gpu, "| jax backend, version:", backend, flush=True)
    start = time.perf_counter()
    for name in args.only:
        n = max(20, SIZES[name] // 100) if args.small else SIZES[name]
        left = args.budget - (time.perf_counter() - start)
        results["checks"][name] = _check(name, n, env, left) if left >= 1 else \
            {"datasets": n, "error": f"not started: the run's {args.budget:.0f} s (--budget) were spent"}
        print(name, json.dumps(results["checks"][name]), flush=True)
    results["total_s"] = time.perf_counter() - start
    text = json.dumps(results, indent=2)
    print(text)
    (OUT / "gpu.json").write_text(text)
    if os.environ.get("OUT"):  # a device machine's folder of files that come back (/work/.library/device's $OUT)
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "gpu.json").write_text(text)


def _check(name: str, n: int, env: dict, seconds: float) -> dict:
    """One check in a fresh process, stopped after ``seconds``: its JSON, or its error."""
    try:
        run = subprocess.run([sys.executable, "-", str(n)], input=COMMON + CHECKS[name], capture_output=True,
                             text=True, cwd=ROOT, env=env, check=False, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"datasets": n, "error": f"stopped after {seconds:.0f} s, the rest of the run's budget (--budget)"}
    if run.returncode != 0:
        return {"datasets": n, "error": run.stderr[-2000:]}
    return {"datasets": n, **json.loads(run.stdout.strip().splitlines()[-1])}


if __name__ == "__main__":
    main()
