"""What every validation study script shares: its command line (``--reps``, ``--only``) and how its sections'
results are written to its JSON (sections not run are kept), and the coverage section of a coverage study."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import hierpool as hp


def coverage_section(study, n_reps: int, settings: dict) -> dict:
    """``study(n_reps=..., **settings)`` (a ``hp.validate`` coverage function) run and timed, with its settings."""
    start = time.perf_counter()
    table = study(n_reps=n_reps, **settings)
    return {"n_reps": n_reps, **settings, "table": table.to_dict(orient="records"),
            "seconds": round(time.perf_counter() - start, 1)}


def run_sections(doc: str, out: Path, sections: dict, generated_by: str, argv=None) -> None:
    """Parse ``--reps`` and ``--only``, run the sections chosen (each ``section(n_reps) -> dict``), print them and
    write them into ``out``, keeping the sections already there."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--only", nargs="+", choices=sorted(sections), default=sorted(sections))
    args = parser.parse_args(argv)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({"generated_by": generated_by, "hierpool": hp.__version__,
                    "python": platform.python_version(), "machine": platform.machine()})
    for name in args.only:
        results[name] = sections[name](args.reps)
        print(name, json.dumps(results[name], indent=1, default=float))
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
