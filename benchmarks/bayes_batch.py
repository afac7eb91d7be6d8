"""Batched posteriors: ``hp.bayes_batch`` against a loop of ``hp.bayes``, datasets per second.

    python benchmarks/bayes_batch.py [--datasets 100]   # writes benchmarks/out/bayes_batch.json

``sleepstudy_replicates(datasets, seed=2026)`` (18 subjects x 10 days,
``Reaction ~ Days + (Days | Subject)``), 4 chains x 1000 draws after 1000 warm-up
per dataset, target acceptance 0.8 on both sides.  Each contender runs in a fresh
process; the clock covers sampling every dataset and its summary tables,
compilation included (imports and data generation excluded).  Both sides sample
exactly the same datasets: the loop of ``hp.bayes`` is timed on all of them, not
on a subset scaled up (an earlier version did that, which counted the loop's
one-time compilation once per subset).  To shorten a run, lower ``--datasets``,
which shrinks both sides equally.  On an accelerator run it with
``--datasets 1000`` (the issue's GPU case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

from bayes import children_cpu_s, commit, machine_cpu_s  # benchmarks/bayes.py, beside this script

OUT = Path(__file__).resolve().parent / "out"

BATCH = textwrap.dedent(
    """
    import json, time, numpy as np, jax, hierpool as hp
    data = hp.datasets.sleepstudy_replicates(DATASETS, seed=2026)
    t0 = time.perf_counter()
    post = hp.bayes_batch("Reaction ~ Days + (Days | Subject)", data, seed=1, target_accept=0.8, progress=False)
    ranef, diagnostics = post.ranef, post.diagnostics
    wall = time.perf_counter() - t0
    min_ess = ranef.groupby("dataset").ess_bulk.min()
    print(json.dumps(dict(wall_s=wall, datasets=int(ranef.dataset.nunique()), device=str(jax.devices()[0]),
                          dataset_ids=sorted(map(int, ranef.dataset.unique())),
                          median_min_ess_bulk=float(min_ess.median()), min_ess_bulk=float(min_ess.min()),
                          max_r_hat=float(diagnostics.max_r_hat.max()),
                          divergences=int(diagnostics.divergences.sum()))))
    """
)

LOOP = textwrap.dedent(
    """
    import json, time, numpy as np, jax, hierpool as hp
    data = hp.datasets.sleepstudy_replicates(DATASETS, seed=2026)
    groups = list(data.groupby("dataset"))
    frames = [frame.drop(columns="dataset") for _, frame in groups]
    t0 = time.perf_counter()
    min_ess = []
    for i, frame in enumerate(frames):
        post = hp.bayes("Reaction ~ Days + (Days | Subject)", frame, seed=i, target_accept=0.8, progress=False)
        min_ess.append(post.ranef.ess_bulk.min())
    wall = time.perf_counter() - t0
    print(json.dumps(dict(wall_s=wall, datasets=len(frames), device=str(jax.devices()[0]),
                          dataset_ids=sorted(int(key) for key, _ in groups),
                          median_min_ess_bulk=float(np.median(min_ess)), min_ess_bulk=float(np.min(min_ess)))))
    """
)


def run_python(code: str) -> dict:
    """Run one contender in a fresh process; also records the CPU seconds other processes on the
    machine used meanwhile (``other_cpu_s``, Linux only: machine busy time minus this run's own)."""
    load, busy, ours = os.getloadavg()[0], machine_cpu_s(), children_cpu_s()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_1min_before"] = load
    result["process_cpu_s"] = children_cpu_s() - ours
    if busy is not None:
        result["other_cpu_s"] = machine_cpu_s() - busy - result["process_cpu_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=100)
    args = parser.parse_args()
    batch = run_python(BATCH.replace("DATASETS", str(args.datasets)))
    loop = run_python(LOOP.replace("DATASETS", str(args.datasets)))
    if batch.pop("dataset_ids") != loop.pop("dataset_ids"):
        raise SystemExit("the batch and the loop sampled different datasets")
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "commit": commit(),
        "load_1min_at_end": os.getloadavg()[0],
        "same_datasets": True,
        "bayes_batch": {**batch, "datasets_per_s": batch["datasets"] / batch["wall_s"]},
        "bayes_loop": {**loop, "datasets_per_s": loop["datasets"] / loop["wall_s"]},
        "ratio_batch_over_loop": loop["wall_s"] / batch["wall_s"],
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "bayes_batch.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
