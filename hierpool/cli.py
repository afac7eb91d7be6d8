"""The ``hierpool`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import HierpoolError


def _demo(args) -> int:
    import numpy as np

    from .closedform import lmm
    from .datasets import biomarker

    data = biomarker(seed=args.seed)
    fit = lmm("biomarker ~ 1 + (1 | patient)", data)
    print(fit.summary())
    table = fit.shrinkage().merge(
        data.groupby("patient", as_index=False)["true_level"].first(), left_on="grp", right_on="patient"
    )
    mu = float(fit.fixef["Intercept"])
    estimates = {
        "complete pooling": np.full(len(table), mu),
        "no pooling": table["raw_mean"].to_numpy(),
        "partial pooling (BLUP)": mu + table["blup"].to_numpy(),
    }
    truth = table["true_level"].to_numpy()
    sparse = table["n"].to_numpy() <= 2
    print("\nRoot-mean-square error against each patient's true level")
    print(f"{'method':<24}{'all':>8}{'n <= 2':>9}{'n > 2':>8}")
    for name, est in estimates.items():
        err = est - truth
        cells = [np.sqrt(np.mean(err[m] ** 2)) for m in (np.ones_like(sparse), sparse, ~sparse)]
        print(f"{name:<24}" + "".join(f"{c:8.2f}" for c in cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hierpool", description="Hierarchical models: BLUPs and posteriors.")
    parser.add_argument("--version", action="version", version=f"hierpool {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="fit the embedded biomarker study and compare pooling methods")
    demo.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _demo(args)
    except HierpoolError as exc:
        print(f"hierpool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
