"""The ``hierpool`` command: ``hierpool demo`` and ``hierpool fit DATA.csv FORMULA [--family NAME]``.

Errors the user can fix (a missing file, a bad formula, a missing column) are one
line on stderr and exit status 2; warnings are one line each.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import HierpoolError

DEMO_FORMULA = "biomarker ~ 1 + (1 | patient)"
EXIT_USAGE = 2


class _UserError(Exception):
    """A problem with the command's input, reported as one line."""


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"hierpool: warning: {message}", file=sys.stderr)


def _write_table(frame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _markdown(frame, floatfmt=".3f") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt)


# --- hierpool demo -------------------------------------------------------------------------
def _demo(args) -> int:
    from .datasets import biomarker
    from .pooling_comparison import pooling

    start = time.perf_counter()
    data = biomarker(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"Embedded biomarker study (seed {args.seed}): {data.patient.nunique()} patients, {len(data)} readings; "
          "each patient's true level is known.")
    print(f"Model: {DEMO_FORMULA}\n")
    comparison = pooling(DEMO_FORMULA, data, bayes=not args.no_bayes, seed=args.seed, progress=None)
    fit = comparison.fit
    print(fit.summary())
    errors = comparison.errors().drop(columns="term")
    print("\nRoot-mean-square error against each patient's true level")
    print(errors.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    written = [
        _save(comparison.plot("shrinkage"), out / "shrinkage.png"),
        _save(comparison.plot("caterpillar"), out / "caterpillar.png"),
        _save(comparison.plot("weight"), out / "weights.png"),
        _write_table(comparison.table, out / "pooling.csv"),
    ]
    report = out / "REPORT.md"
    report.write_text(_demo_report(comparison, errors, args.seed))
    written.append(report)
    print(f"\nWrote {', '.join(p.name for p in written)} to {out}/ ({time.perf_counter() - start:.1f} s)")
    return 0


def _demo_report(comparison, errors, seed: int) -> str:
    fit = comparison.fit
    table = comparison.table
    var_b = fit.term_covariances()[0][0, 0]
    sparse, rich = table[table.n <= 2], table[table.n >= 20]
    return f"""# hierpool demo: complete, no and partial pooling

The embedded biomarker study (`hp.datasets.biomarker(seed={seed})`): {len(table)} patients with 1 to 20
readings each, and each patient's true level known.  Model `{DEMO_FORMULA}`, fitted by REML
(`hp.lmm`){" and by NUTS (`hp.bayes`, collapsed sampler)" if comparison.posterior is not None else ""}.

REML estimates: population mean {fit.fixef['Intercept']:.2f}, between-patient sd {var_b ** 0.5:.2f},
measurement sd {fit.sigma:.2f}.

## Error against the truth (root-mean-square)

{_markdown(errors, ".2f")}

Partial pooling pulls each patient's own mean toward the population mean by the weight
w = n σb² / (n σb² + σ²): patients with 1–2 readings keep about {sparse.weight.mean():.0%} of their own
mean, patients with 20 readings about {rich.weight.mean():.0%}.

## Figures

![shrinkage](shrinkage.png)

![caterpillar](caterpillar.png)

![weights](weights.png)

`pooling.csv` has one row per patient: n, the no-pooling, complete-pooling, BLUP and posterior
estimates with their sds, the shrinkage weight and the truth.
"""


# --- hierpool fit --------------------------------------------------------------------------
def _read_csv(path: str):
    import pandas as pd

    file = Path(path)
    if not file.exists():
        raise _UserError(f"no such file: {path}")
    if file.is_dir():
        raise _UserError(f"{path} is a directory, not a CSV file")
    try:
        return pd.read_csv(file)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise _UserError(f"cannot read {path} as CSV: {str(exc).splitlines()[0]}") from None


def _ranef_with_intervals(fit, level: float):
    from .closedform.predict import normal_quantile
    from .pooling_comparison import ranef_joint_sd

    ranef = fit.ranef.copy()
    ranef["joint_sd"] = ranef_joint_sd(fit)
    z = normal_quantile(level)
    ranef["lower"] = ranef["condval"] - z * ranef["joint_sd"]
    ranef["upper"] = ranef["condval"] + z * ranef["joint_sd"]
    return ranef


def _check_family_options(args) -> None:
    """Options that only a GLMM (--family) takes, and those it cannot take, named."""
    if args.family is None:
        for option, value in (("--link", args.link), ("--nagq", args.nagq)):
            if value is not None:
                raise _UserError(f"{option} needs --family (e.g. --family binomial): without it the model is a "
                                 "linear mixed model, whose link is the identity")
        return
    if args.bayes:
        raise _UserError(f"--bayes: hp.bayes does not fit --family {args.family} yet (closed form only)")
    if args.se is not None:
        raise _UserError(f"--se gives known residual sds of a linear mixed model; --family {args.family} has none")


def _glmm_fitted(comparison):
    """fitted.csv of a GLMM: each method's mean (response scale, lme4's fitted) and its linear predictor (*_link)."""
    response = comparison.fitted("response")
    link = comparison.fitted("link").drop(columns="offset").add_suffix("_link")
    return response.join(link)


def _correlation(option: str):
    """hp.ar1 from ``--ar1 GROUP[:TIME]``."""
    from .spec.correlation import ar1

    group, _, time = option.partition(":")
    if not group:
        raise _UserError(f"--ar1 takes GROUP or GROUP:TIME (columns), got {option!r}")
    return ar1(group, time or None)


def _fit_ar1(args, data, out: Path) -> int:
    """``hierpool fit --ar1``: the AR(1) fit's tables (no pooling comparison: its no-pooling fits and shrinkage
    weights take the residuals as independent)."""
    from . import bayes, lmm

    if args.family is not None:
        raise _UserError("--ar1 is for a linear mixed model (AR(1) residuals); it cannot be combined with --family")
    if args.plots:
        raise _UserError("--plots draws the pooling comparison, which --ar1 does not make")
    correlation = _correlation(args.ar1)
    if args.bayes:
        from .spec.formula import parse_formula

        if not parse_formula(args.formula, random_optional=True).random:  # refused before anything is written
            raise _UserError("--bayes needs a random-effect term: hp.bayes does not fit generalized least squares")
    fit = lmm(args.formula, data, se=args.se, weights=args.weights, offset=args.offset, correlation=correlation)
    out.mkdir(parents=True, exist_ok=True)
    print(fit.summary())
    fitted = data.loc[fit.design.rows].assign(fitted=fit.fitted, residual=fit.residuals)
    written = [
        *_fixef_and_varcorr(fit, out),
        _write_table(fit.correlation.reset_index(), out / "correlation.csv"),
        _write_table(fitted.rename_axis("row").reset_index(), out / "fitted.csv"),
    ]
    if fit.design.terms:  # generalized least squares (no random-effect term) has no ranef
        written.append(_write_table(_ranef_with_intervals(fit, args.level), out / "ranef.csv"))
    if args.bayes:
        posterior = bayes(args.formula, data, chains=args.chains, draws=args.draws, tune=args.tune, seed=args.seed,
                          level=args.level, correlation=correlation, se=args.se, weights=args.weights,
                          offset=args.offset, progress=None)
        written += _posterior_tables(posterior, out, correlation=posterior.correlation.reset_index())
    print(f"\nWrote {', '.join(p.name for p in written)} to {out}/")
    return 0


def _posterior_tables(posterior, out: Path, **extra) -> list[Path]:
    """Print the posterior's summary; write posterior_fixef.csv, posterior_varcorr.csv, posterior_<name>.csv for
    each ``extra`` table (an AR(1) model's correlation, an animal model's heritability), posterior_ranef.csv and the
    draws as posterior.nc (every model's: --ar1's and --relmat's wrote none, as --help says it does)."""
    print("\nPosterior (hp.bayes)")
    print(posterior.summary())
    netcdf = out / "posterior.nc"
    posterior.idata.to_netcdf(str(netcdf))
    return [
        _write_table(posterior.fixef.rename_axis("term").reset_index(), out / "posterior_fixef.csv"),
        _write_table(posterior.varcorr, out / "posterior_varcorr.csv"),
        *(_write_table(table, out / f"posterior_{name}.csv") for name, table in extra.items()),
        _write_table(posterior.ranef, out / "posterior_ranef.csv"),
        netcdf,
    ]


def _fixef_and_varcorr(fit, out: Path) -> list[Path]:
    """fixef.csv (estimates and SEs) and varcorr.csv of a closed-form fit."""
    fixef = fit.fixef.rename("estimate").to_frame()
    fixef["se"] = fit.fixef_se
    return [_write_table(fixef.rename_axis("term").reset_index(), out / "fixef.csv"),
            _write_table(fit.varcorr, out / "varcorr.csv")]


def _relationship(option: str, formula: str) -> tuple[str, dict]:
    """(``relmat`` or ``relmat_inverse``, its dict) from ``--relmat [GROUP=]FILE.csv``: a pedigree (columns id, sire,
    dam: A^-1 by Henderson's rules) or a square labelled matrix (first column the labels, header the same)."""
    from . import pedigree
    from .spec.formula import parse_formula

    group, path = option.split("=", 1) if "=" in option and not Path(option).exists() else ("", option)
    if not group:
        terms = parse_formula(formula).random
        if len(terms) != 1:
            raise _UserError(f"--relmat FILE needs one random-effect term in the formula (or --relmat GROUP=FILE), "
                             f"got {len(terms)}")
        group = terms[0].name
    table = _read_csv(path)
    if sorted(str(c).lower() for c in table.columns) == ["dam", "id", "sire"]:
        # (a parent column with blanks is read as floats: hp.pedigree reads 12.0 as animal 12)
        table = table.rename(columns=str.lower)
        return "relmat_inverse", {group: pedigree.inverse_relationship_matrix(table)}
    matrix = table.set_index(table.columns[0])
    return "relmat", {group: matrix.set_axis([str(c) for c in matrix.columns], axis=1)
                      .set_axis([str(i) for i in matrix.index], axis=0)}


def _fit_relmat(args, data, out: Path) -> int:
    """``hierpool fit --relmat``: the animal model's tables (breeding values of every level of A, heritability)."""
    from . import bayes, lmm

    for option, given in (("--family", args.family is not None), ("--plots", args.plots),
                          ("--ar1", args.ar1 is not None), ("--se", args.se is not None)):
        if given:
            raise _UserError(f"--relmat cannot be combined with {option} yet")
    argument, given = _relationship(args.relmat, args.formula)
    fit = lmm(args.formula, data, weights=args.weights, offset=args.offset, **{argument: given})
    out.mkdir(parents=True, exist_ok=True)
    print(fit.summary())
    written = [
        *_fixef_and_varcorr(fit, out),
        _write_table(fit.heritability(level=args.level).reset_index(), out / "heritability.csv"),
        _write_table(fit.ranef, out / "ranef.csv"),
    ]
    if args.bayes:  # the animal model's posterior: h^2 and every breeding value with their intervals
        posterior = bayes(args.formula, data, chains=args.chains, draws=args.draws, tune=args.tune, seed=args.seed,
                          level=args.level, weights=args.weights, offset=args.offset, progress=None,
                          **{argument: given})
        written += _posterior_tables(posterior, out, heritability=posterior.heritability.reset_index())
    print(f"\nWrote {', '.join(p.name for p in written)} to {out}/")
    return 0


def _fit(args) -> int:
    from .pooling_comparison import pooling

    _check_family_options(args)
    data = _read_csv(args.data)
    out = Path(args.out) if args.out else Path(f"{Path(args.data).stem}-hierpool")
    if args.relmat is not None:
        return _fit_relmat(args, data, out)
    if args.ar1 is not None:
        return _fit_ar1(args, data, out)
    # one call fits every engine the command runs (hp.lmm or hp.glmm, and hp.bayes with --bayes): each gets se,
    # weights, offset
    comparison = pooling(args.formula, data, family=args.family, link=args.link, nAGQ=args.nagq or 1,
                         bayes=args.bayes, chains=args.chains, draws=args.draws, tune=args.tune,
                         seed=args.seed, se=args.se, weights=args.weights, offset=args.offset, level=args.level,
                         progress=None)
    fit = comparison.fit
    out.mkdir(parents=True, exist_ok=True)
    print(fit.summary())
    written = [
        *_fixef_and_varcorr(fit, out),
        _write_table(_ranef_with_intervals(fit, args.level), out / "ranef.csv"),
        _write_table(comparison.table, out / "pooling.csv"),
        _write_table((_glmm_fitted(comparison) if comparison.is_glmm else comparison.fitted())
                     .rename_axis("row").reset_index(), out / "fitted.csv"),
    ]
    if args.plots:  # asked for: matplotlib and two PNGs would be most of a small fit's wall time
        written += [
            _save(comparison.plot("shrinkage"), out / "shrinkage.png"),
            _save(comparison.plot("caterpillar"), out / "caterpillar.png"),
        ]
    posterior = comparison.posterior
    if posterior is not None:
        written += _posterior_tables(posterior, out)
    print(f"\nWrote {', '.join(p.name for p in written)} to {out}/")
    return 0


# --- entry point ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierpool",
        description="Hierarchical (mixed-effects) models: closed-form BLUPs in JAX, posteriors in NumPyro.",
    )
    parser.add_argument("--version", action="version", version=f"hierpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="complete, no and partial pooling on the embedded biomarker study, against the truth",
        description="Fit the embedded biomarker study by complete, no and partial pooling (BLUP and posterior), "
                    "print each method's error against the known truth, and write plots and a Markdown report.")
    demo.add_argument("--out", default="hierpool-demo", help="folder for the report and plots (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=2024, help="seed of the simulated study and the sampler")
    demo.add_argument("--no-bayes", action="store_true", help="skip the Bayesian fit")

    fit = commands.add_parser(
        "fit", help="fit a model to a CSV file",
        description="Fit an lme4-style formula to a CSV file (a linear mixed model, or with --family a GLMM); "
                    "print the summary and write the fixed effects, variance components, random effects (with "
                    "intervals), complete, no and partial pooling side by side (pooling.csv; a GLMM's on the link "
                    "scale) and each pooling method's fitted values (offset included) as CSV; with --plots, the "
                    "shrinkage and caterpillar plots.")
    fit.add_argument("data", help="CSV file with a header row")
    fit.add_argument("formula", help='lme4-style formula, e.g. "y ~ x + (x | g)"')
    fit.add_argument("--family", metavar="NAME",
                     help="fit a GLMM (hp.glmm) of this family: binomial (0/1, or cbind(successes, failures)), "
                          "bernoulli, poisson, negative_binomial")
    fit.add_argument("--link", metavar="L",
                     help="the GLMM's link (with --family; default: the canonical one); the binomial also takes "
                          "probit and cloglog")
    fit.add_argument("--nagq", type=int, metavar="N",
                     help="with --family: 1 Laplace (default), 0 the joint mode, 2-25 adaptive Gauss-Hermite "
                          "quadrature (one scalar random-effect term), as glmer's nAGQ")
    fit.add_argument("--bayes", action="store_true",
                     help="also sample the posterior (hp.bayes; not with --family); writes posterior.nc")
    fit.add_argument("--out", help="output folder (default: <DATA stem>-hierpool)")
    fit.add_argument("--se", help="column of known residual standard errors (meta-analysis)")
    fit.add_argument("--weights", metavar="COL",
                     help="column of prior weights, as lmer's weights: row i has residual variance sigma^2 / w_i "
                          "(with --family, glmer's: a binomial proportion's trials)")
    fit.add_argument("--offset", metavar="COL",
                     help="column of a known offset added to the linear predictor, as lmer's offset "
                          "(offset(expr) terms in the formula work too)")
    fit.add_argument("--ar1", metavar="GROUP[:TIME]",
                     help="AR(1) residuals within each GROUP's series, by TIME in whole steps (or one step a row "
                          "in the rows' order), as nlme's corAR1 (hp.ar1); writes correlation.csv (phi) instead of "
                          "the pooling comparison")
    fit.add_argument("--relmat", metavar="[GROUP=]FILE.csv",
                     help="a known relationship matrix for the term (1 | GROUP): a pedigree CSV (id, sire, dam) or a "
                          "square labelled matrix CSV; writes heritability.csv and every level's breeding value")
    fit.add_argument("--level", type=float, default=0.95, help="interval level (default: %(default)s)")
    plots = fit.add_mutually_exclusive_group()
    plots.add_argument("--plots", action="store_true", dest="plots",
                       help="also draw the shrinkage and caterpillar plots (PNGs, with matplotlib)")
    plots.add_argument("--no-plots", action="store_false", dest="plots", help="tables only (the default)")
    fit.add_argument("--chains", type=int, default=4)
    fit.add_argument("--draws", type=int, default=1000)
    fit.add_argument("--tune", type=int, default=1000)
    fit.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return {"demo": _demo, "fit": _fit}[args.command](args)
    except (HierpoolError, _UserError, OSError) as exc:  # OSError: an output folder that cannot be written
        print(f"hierpool: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
