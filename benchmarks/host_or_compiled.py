"""Where compiling the closed form pays: the same fit on the host (NumPy) and compiled (XLA).

    python benchmarks/host_or_compiled.py        # prints a table, writes benchmarks/out/host_or_compiled.json

Each model is fitted in a fresh process twice, with ``Control(compile=False)`` and
``Control(compile=True)``; the time is of the first ``hp.lmm`` call (design, optimizer with
compilation where there is one, solve), engine imports excluded.  The work per evaluation
(``hierpool.algebra.system.evaluation_flops``) is printed beside it, with the choice hierpool's
default makes (``hierpool.algebra.compiler_options.COMPILE_MIN_FLOPS``).
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

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, pandas as pd
    import hierpool as hp
    from hierpool.algebra.compiler_options import compile_pays
    from hierpool.algebra.system import evaluation_flops
    source, formula, compile_ = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    if source == "sleepstudy":
        data = hp.datasets.sleepstudy()
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
    flops = evaluation_flops(hp.MixedModel(formula, data).system)
    print(json.dumps(dict(seconds=seconds, objective=fit.objective, flops=flops, default_compiles=compile_pays(flops))))
    """
)


def run(source: str, formula: str, compile_: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, source, formula, "1" if compile_ else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for label, (source, formula) in MODELS.items():
        host, compiled = run(source, formula, False), run(source, formula, True)
        rows.append(dict(model=label, flops=host["flops"], default="compiled" if host["default_compiles"] else "host",
                         host_s=host["seconds"], compiled_s=compiled["seconds"],
                         objective_difference=abs(host["objective"] - compiled["objective"])))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| model | flops / evaluation | default | host (s) | compiled (s) | |criterion difference| |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['flops']:.2g} | {r['default']} | {r['host_s']:.2f} | {r['compiled_s']:.2f} | "
              f"{r['objective_difference']:.1e} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "host_or_compiled.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
