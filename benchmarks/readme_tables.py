"""The README's pooling table, from the README's own code: one run, printed as the README shows it.

    python benchmarks/readme_tables.py            # prints the Markdown table
    python benchmarks/readme_tables.py --check    # exit status 1 when README.md's table differs

The README's "A short tour" runs ``hp.pooling("biomarker ~ 1 + (1 | patient)",
hp.datasets.biomarker(), seed=1)`` (the study's default seed, 2024; the sampler's
seed 1, hp.bayes' default 4 chains x 1,000 draws after 1,000 tuning steps) and
shows ``cmp.errors()``.  The complete-, no- and BLUP rows are deterministic; the
posterior-mean row is one MCMC run: with the same seed it repeats on one machine
and JAX version, and may move in the last digit on another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FORMULA = "biomarker ~ 1 + (1 | patient)"
SEED = 1


def pooling_table() -> str:
    """``cmp.errors()`` of the README's comparison as a Markdown table (two decimals)."""
    import hierpool as hp

    comparison = hp.pooling(FORMULA, hp.datasets.biomarker(), seed=SEED, progress=False)
    errors = comparison.errors()
    lines = ["| method | all | n ≤ 2 | n > 2 |", "|---|---:|---:|---:|"]
    for row in errors.itertuples(index=False):
        cells = [getattr(row, "all"), row[errors.columns.get_loc("n <= 2")], row[errors.columns.get_loc("n > 2")]]
        lines.append(f"| {row.method} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md's table instead of printing")
    args = parser.parse_args()
    sys.path.insert(0, str(README.parent))
    table = pooling_table()
    if not args.check:
        print(table)
        return 0
    if table in README.read_text():
        print("README.md's pooling table matches this run")
        return 0
    print(f"README.md's pooling table differs from this run's:\n{table}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
