"""hp.fit_batch against one hp.lmm fit per dataset; padding, buckets, failures, float32, sharding."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from concurrent.futures import Future

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE, assert_same_fits, host_and_compiled

import hierpool as hp

SLEEP = "Reaction ~ Days + (Days | Subject)"


def single_fits(formula, frames):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        return [hp.lmm(formula, frame) for frame in frames]


def assert_not_refitted(batch):
    # fit_batch refits a dataset its batched optimizer failed on with hp.lmm: a comparison with hp.lmm
    # would then compare hp.lmm with itself, so every comparison first asserts there was no refit
    assert not batch.refit.any(), batch.messages[batch.refit].to_dict()


def assert_matches(batch, fits, labels):
    assert_not_refitted(batch)
    for label, fit in zip(labels, fits):
        i = batch.datasets.get_loc(label)
        assert batch.objective.iloc[i] == pytest.approx(fit.objective, rel=1e-11)
        np.testing.assert_allclose(batch.fixef.iloc[i], fit.fixef, rtol=1e-6)
        np.testing.assert_allclose(batch.fixef_se.iloc[i], fit.fixef_se, rtol=1e-5)
        assert batch.sigma[i] == pytest.approx(fit.sigma, rel=1e-6)
        column = batch.datasets.name  # the tables name the datasets' column as by
        ranef = batch.ranef[batch.ranef[column] == label]
        scale = np.abs(fit.ranef.condval).max() + 1e-12
        np.testing.assert_array_equal(ranef.grp.to_numpy(), fit.ranef.grp.to_numpy())
        np.testing.assert_allclose(ranef.condval, fit.ranef.condval, atol=1e-5 * scale)
        np.testing.assert_allclose(ranef.condsd, fit.ranef.condsd, rtol=1e-5, atol=1e-7 * scale)
        varcorr = batch.varcorr[batch.varcorr[column] == label]
        sd_scale = fit.varcorr.sdcor.abs().max()
        np.testing.assert_allclose(varcorr.sdcor.to_numpy(), fit.varcorr.sdcor.to_numpy(), atol=1e-5 * sd_scale)
        assert bool(batch.is_singular.iloc[i]) == fit.is_singular


@pytest.fixture(scope="module")
def replicates():
    return hp.datasets.sleepstudy_replicates(60, seed=4)


@pytest.fixture(scope="module")
def batch(replicates):
    return hp.fit_batch(SLEEP, replicates, by="dataset")


def test_every_dataset_equals_its_own_lmm_fit(replicates, batch):
    labels = list(range(0, 60, 3))
    fits = single_fits(SLEEP, [replicates[replicates.dataset == i] for i in labels])
    assert_matches(batch, fits, labels)
    assert batch.converged.all()


def weighted(data, seed=0):
    """The data with prior weights ``w`` and an offset ``off`` (not aliased with X: it has noise)."""
    rng = np.random.default_rng(seed)
    return data.assign(w=rng.uniform(0.3, 3.0, len(data)), off=2.0 * data.Days + rng.normal(0, 3, len(data)))


@pytest.fixture(scope="module")
def weighted_batch(replicates):
    # the batch fixture's shapes: no program is compiled for it
    return hp.fit_batch(SLEEP, weighted(replicates), weights="w", offset="off")


def test_weights_and_an_offset_equal_lmm_per_dataset(replicates, weighted_batch):
    data = weighted(replicates)
    labels = [0, 1, 2, 31]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fits = [hp.lmm(SLEEP, data[data.dataset == i], weights="w", offset="off") for i in labels]
    assert_matches(weighted_batch, fits, labels)  # criterion 1e-11 relative, fixef 1e-6, sds, BLUPs
    # offset(...) in the formula and arrays of one value per row are the same model
    as_arrays = hp.fit_batch("Reaction ~ Days + offset(off) + (Days | Subject)", data, weights=data.w.to_numpy())
    np.testing.assert_allclose(as_arrays.objective, weighted_batch.objective, rtol=1e-12)
    np.testing.assert_allclose(as_arrays.beta, weighted_batch.beta, rtol=1e-9)


def test_offset_and_weights_act_as_lme4s(replicates, batch):
    # exact identities, independent of hp.lmm: an offset 2 Days moves the Days coefficient by 2 and
    # changes nothing else; weights all c describe the same model with sigma^2 c as the variance
    # of a weight-1 row: as lmer's, the criterion (whose -sum log w cancels the weighted residuals'
    # scale), the fixed effects and the random-effect covariance are unchanged, sigma is sqrt(c) sigma
    data = replicates.assign(off=2.0 * replicates.Days, w=4.0)
    result = hp.fit_batch(SLEEP, data, offset="off", weights="w")
    assert_not_refitted(result)
    np.testing.assert_allclose(result.objective, batch.objective, rtol=1e-11)
    np.testing.assert_allclose(result.fixef.Days, batch.fixef.Days - 2.0, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(result.fixef.Intercept, batch.fixef.Intercept, rtol=1e-8)
    np.testing.assert_allclose(result.sigma, 2.0 * batch.sigma, rtol=1e-7)
    np.testing.assert_allclose(result.theta, batch.theta / 2.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.covariance, batch.covariance, rtol=1e-5, atol=1e-9 * batch.covariance.max())


def test_a_large_location_of_y_costs_no_digits(replicates, weighted_batch):
    # y = 1e7 + signal: raw cross-products of y lose ~14 digits (the criterion moved by ~1e2); each
    # dataset's statistics are of y - offset - X beta0, so the fits are those of the signal
    data = weighted(replicates)
    shifted = hp.fit_batch(SLEEP, data.assign(Reaction=data.Reaction + 1e7), weights="w", offset="off")
    assert_not_refitted(shifted)
    np.testing.assert_allclose(shifted.objective, weighted_batch.objective, rtol=1e-10)
    np.testing.assert_allclose(shifted.fixef.Intercept - 1e7, weighted_batch.fixef.Intercept, atol=1e-6)
    np.testing.assert_allclose(shifted.fixef.Days, weighted_batch.fixef.Days, rtol=1e-7)
    np.testing.assert_allclose(shifted.sigma, weighted_batch.sigma, rtol=1e-7)
    # float32 keeps the shift in float64: the intercept to float32's precision of the signal, not of 1e7
    single = hp.fit_batch(SLEEP, data.assign(Reaction=data.Reaction + 1e7), weights="w", offset="off", dtype="float32")
    np.testing.assert_allclose(single.objective, weighted_batch.objective, rtol=1e-5)
    np.testing.assert_allclose(single.fixef.Intercept - 1e7, weighted_batch.fixef.Intercept, atol=1e-2)


def test_bad_weights_and_offsets_name_the_culprit(replicates):
    from hierpool.batch.plan import plan_batch

    data = weighted(replicates.query("dataset < 3"))
    before = data.copy()
    with pytest.raises(hp.DataError, match="'weight'"):
        hp.fit_batch(SLEEP, data, weights="weight")
    with pytest.raises(hp.DataError, match="'offs'"):
        hp.bayes_batch(SLEEP, data, offset="offs")
    with pytest.raises(hp.DataError, match="weights.*positive"):
        hp.fit_batch(SLEEP, data.assign(w=data.w - 1.0), weights="w")
    with pytest.raises(hp.ArgumentError, match="weights.*one value per row"):
        hp.fit_batch(SLEEP, data, weights=data.w.to_numpy()[:-1])
    with pytest.raises(hp.ArgumentError, match="offset given as an array"):
        hp.fit_batch(SLEEP, [frame.drop(columns="dataset") for _, frame in data.groupby("dataset")],
                     offset=data.off.to_numpy())
    # missing weights or offsets: those rows are dropped and counted, as hp.lmm's
    with pytest.warns(hp.HierpoolWarning, match="dropped 2 of 540 rows"):
        plan = plan_batch(SLEEP, data.assign(w=data.w.where(data.index != 5), off=data.off.where(data.index != 9)),
                          "dataset", "fit_batch", "hp.lmm", weights="w", offset="off")
    assert plan.design.n == 538 and plan.n_obs.tolist() == [178, 180, 180]
    pd.testing.assert_frame_equal(data, before)  # nothing the user passed is modified


def _fail_datasets_with_rows(monkeypatch, rows: int, moved: float = 1.0) -> None:
    """Make fit_batch's batched optimizer report every dataset of ``rows`` observations as not converged (its theta
    times ``moved``: where the search stopped)."""
    from hierpool.batch import fit as fit_module

    compiled = fit_module._programs

    def programs(stats, *args, **kwargs):
        optimize, solve = compiled(stats, *args, **kwargs)

        def optimize_failing(chunk, start):
            out = optimize.result()(chunk, start)
            failed = chunk.n == rows
            return {**out, "converged": out["converged"] & ~failed,
                    "theta": jax.numpy.where(failed[:, None], moved * out["theta"], out["theta"])}

        failing = Future()
        failing.set_result(optimize_failing)
        return failing, solve

    monkeypatch.setattr(fit_module, "_programs", programs)


def test_a_dataset_the_batched_optimizer_fails_on_is_refitted_and_marked(monkeypatch):
    data = weighted(hp.datasets.sleepstudy_replicates(4, seed=6))
    data = data.drop(index=data.index[data.dataset == 2][0])  # 179 rows: the only dataset with n = 179
    weights = data.w.to_numpy()  # the refit by hp.lmm gets its dataset's part of the array
    _fail_datasets_with_rows(monkeypatch, 179)  # dataset 2
    polished = hp.fit_batch(SLEEP, data, weights=weights, offset="off")
    unpolished = hp.fit_batch(SLEEP, data, polish=False, weights=weights, offset="off")
    monkeypatch.undo()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fits = [hp.lmm(SLEEP, data[data.dataset == i], weights="w", offset="off") for i in range(4)]
    assert polished.refit.tolist() == [False, False, True, False]
    assert polished.to_frame().refit.tolist() == [False, False, True, False]
    assert polished.converged.all()  # hp.lmm's converged: only refit tells the batched optimizer failed
    assert "stopped" in polished.messages.loc[2] and "refitted by hp.lmm" in polished.messages.loc[2]
    assert "1 refitted" in repr(polished)
    assert polished.objective.loc[2] == pytest.approx(fits[2].objective, rel=1e-12)
    with pytest.raises(AssertionError, match="refitted by hp.lmm"):  # the comparisons' guard catches it
        assert_matches(polished, fits, list(range(4)))
    # without polish nothing is refitted: the dataset stays not converged, with the batched numbers
    assert not unpolished.refit.any()
    assert unpolished.converged.tolist() == [True, True, False, True]
    assert "stopped" in unpolished.messages.loc[2] and "refitted" not in unpolished.messages.loc[2]
    assert_matches(unpolished, fits[:2], [0, 1])


def test_a_compiled_search_that_stopped_short_is_searched_again_on_the_host(monkeypatch):
    """The compiled path (forced here) hands the datasets its Newton's method left unconverged to the host search,
    from their start: dataset 2 is then the batch's own fit, equal to hp.lmm's, not refitted (before: an hp.lmm refit
    each, 12 of 100,000 sleepstudy-shaped datasets).  The stopped rows of every chunk are searched in one call, and
    solved on the host.  Where the host search stops short too, hp.lmm refits it."""
    from hierpool.batch import fit as fit_module

    data = weighted(hp.datasets.sleepstudy_replicates(4, seed=6))
    # 179 rows: the only datasets with n = 179, in two chunks of two
    data = data.drop(index=[data.index[data.dataset == 0][3], data.index[data.dataset == 2][0]])
    monkeypatch.setattr(fit_module, "_on_host", lambda *a: False)
    compiled = hp.fit_batch(SLEEP, data, weights="w", offset="off", chunk_size=2)  # the compiled path's own fits
    _fail_datasets_with_rows(monkeypatch, 179, moved=1.5)  # (the chunk's solve at a theta the host search moves)
    searched = []
    host_search = fit_module.search_statistics_on_host
    monkeypatch.setattr(fit_module, "search_statistics_on_host",
                        lambda stats, *a, **k: searched.append(np.asarray(stats.n)) or host_search(stats, *a, **k))
    again = hp.fit_batch(SLEEP, data, weights="w", offset="off", chunk_size=2)
    assert [n.tolist() for n in searched] == [[179.0, 179.0]]  # (datasets 0 and 2, in one search)
    assert not again.refit.any() and again.converged.all(), again.messages.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fits = [hp.lmm(SLEEP, data[data.dataset == d], weights="w", offset="off") for d in (0, 2)]
    for d, fit in zip((0, 2), fits):
        assert again.objective.loc[d] == pytest.approx(fit.objective, rel=1e-10)
        np.testing.assert_allclose(again.beta[d], fit.fixef.to_numpy(), rtol=1e-6)
        # solved on the host: the compiled solve's numbers at the same optimum
        for name in ("beta_se", "sigma", "b", "cond_sd", "covariance"):
            np.testing.assert_allclose(getattr(again, name)[d], getattr(compiled, name)[d], rtol=1e-6, err_msg=name)
    monkeypatch.setattr(fit_module, "search_statistics_on_host",
                        lambda *a, **k: {**host_search(*a, **k), "converged": np.array([False, True])})
    refitted = hp.fit_batch(SLEEP, data, weights="w", offset="off", chunk_size=2)
    assert refitted.refit.tolist() == [True, False, False, False]
    assert refitted.objective.loc[0] == pytest.approx(fits[0].objective, rel=1e-12)
    assert refitted.objective.loc[2] == pytest.approx(fits[1].objective, rel=1e-10)


META = "y ~ ablat + (1 | trial)"


@pytest.fixture(scope="module")
def meta():
    """Meta-analyses with known residual sds (se=): metafor's BCG data (13 trials, one estimate each) and variants.

    ``bcg9`` (9 trials) and the 13-trial sets share the bucket of 16 levels (one compiled program); ``flat``
    has a between-trial sd of zero (a singular fit); ``one`` has one trial, which cannot be fitted.
    """
    ref = next(case for case in json.loads(REFERENCE.read_text())["known_se"] if case["id"] == "bcg_ablat_reml")
    bcg = pd.DataFrame({"y": ref["y"], "se": ref["se"], "ablat": ref["ablat"],
                        "trial": [f"s{i + 1}" for i in range(len(ref["y"]))]})
    rng = np.random.default_rng(8)
    return ref, {
        "bcg": bcg,
        "bcg9": bcg.iloc[:9],
        "noisy": bcg.assign(y=bcg.y + rng.normal(0, 0.3, len(bcg)), se=bcg.se * rng.uniform(0.5, 2, len(bcg))),
        "flat": bcg.assign(y=0.3 - 0.03 * bcg.ablat + 0.2 * bcg.se * rng.normal(size=len(bcg))),
        "one": bcg.iloc[:1],
    }


@pytest.fixture(scope="module")
def meta_batch(meta):
    return hp.fit_batch(META, meta[1], se="se")


def test_known_residual_sds_equal_lmm_per_dataset(meta, meta_batch):
    # se=: weights 1 / se^2 in each dataset's statistics and sigma fixed at 1, hp.lmm's one-term criterion
    ref, frames = meta
    batch = meta_batch
    assert_not_refitted(batch)
    assert "has only one level" in batch.messages.loc["one"] and np.isnan(batch.objective.loc["one"])
    assert "Residual" not in set(batch.varcorr.grp)  # sigma is not estimated
    labels = ["bcg", "bcg9", "noisy", "flat"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.HierpoolWarning)
        fits = {label: hp.lmm(META, frames[label], se="se") for label in labels}
    for label, fit in fits.items():
        i = batch.datasets.get_loc(label)
        assert batch.converged.iloc[i] and batch.messages.iloc[i] == ""
        assert batch.objective.iloc[i] == pytest.approx(fit.objective, rel=1e-10)
        np.testing.assert_allclose(batch.fixef.iloc[i], fit.fixef, rtol=1e-6)
        np.testing.assert_allclose(batch.fixef_se.iloc[i], fit.fixef_se, rtol=1e-5)
        column = batch.datasets.name  # the tables name the datasets' column as by
        ranef = batch.ranef[batch.ranef[column] == label]
        scale = np.abs(fit.ranef.condval).max() + 1e-12
        condsd_atol = 1e-8
        if fit.is_singular:  # ``flat``: the batch's theta stops within rounding of zero, hp.lmm's on its bound, and
            # the BLUPs (all zero) and their sds are compared on the estimates' scale
            scale = np.std(frames[label].y)
            condsd_atol = 1e-5 * scale
        np.testing.assert_allclose(ranef.condval, fit.ranef.condval, atol=1e-5 * scale)
        np.testing.assert_allclose(ranef.condsd, fit.ranef.condsd, rtol=1e-5, atol=condsd_atol)
        varcorr = batch.varcorr.query("dataset == @label")
        assert varcorr.grp.tolist() == fit.varcorr.grp.tolist()
        np.testing.assert_allclose(varcorr.sdcor.to_numpy(), fit.varcorr.sdcor.to_numpy(), atol=1e-5)
        assert bool(batch.is_singular.iloc[i]) == fit.is_singular
    assert batch.is_singular.loc["flat"] and not batch.is_singular.loc["bcg"]
    # and metafor's REML estimates of the original data (validation/lme4_reference.json), independently of hp.lmm
    tau = batch.varcorr.query("dataset == 'bcg'").sdcor.iloc[0]
    assert tau == pytest.approx(ref["tau"], rel=1e-3)
    np.testing.assert_allclose(batch.fixef.loc["bcg"], ref["beta"], rtol=1e-5, atol=1e-5 * max(ref["beta_se"]))
    assert batch.to_frame().loc[0, "sd_trial_Intercept"] == pytest.approx(ref["tau"], rel=1e-3)


def test_known_residual_sds_have_no_sigma_in_the_tables(meta, meta_batch):
    # sigma is known (1), not estimated: hp.lmm's sigma and varcorr (no Residual row), and no sigma column
    batch = meta_batch
    fit = hp.lmm(META, meta[1]["bcg"], se="se")
    assert batch.sigma_known and fit.sigma == 1.0
    np.testing.assert_array_equal(batch.sigma, [1.0, 1.0, 1.0, 1.0, np.nan])  # NaN where the fit failed ("one")
    frame = batch.to_frame()
    assert frame.columns.tolist()[-5:] == ["Intercept", "se_Intercept", "ablat", "se_ablat", "sd_trial_Intercept"]
    assert "sigma" not in frame.columns and len(frame) == 5
    varcorr = batch.varcorr
    assert len(varcorr) == 5 and varcorr.grp.tolist() == ["trial"] * 5
    np.testing.assert_array_equal(frame.sd_trial_Intercept, varcorr.sdcor)
    # the covariance is tau^2 itself (sigma 1), hp.lmm's
    np.testing.assert_allclose(batch.covariance[0], fit.varcorr.vcov.to_numpy()[:, None], rtol=1e-5)


def test_known_residual_sds_reach_the_refit_by_lmm(meta, meta_batch, monkeypatch):
    _fail_datasets_with_rows(monkeypatch, 9)  # bcg9; the meta_batch fixture's programs: nothing compiles
    polished = hp.fit_batch(META, meta[1], se="se")
    monkeypatch.undo()
    assert polished.refit.tolist() == [False, True, False, False, False]
    # the refit is hp.lmm with se= (without it the criterion would differ, and sigma would be estimated)
    np.testing.assert_allclose(polished.objective, meta_batch.objective, rtol=1e-10)
    np.testing.assert_allclose(polished.theta, meta_batch.theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(polished.sigma, meta_batch.sigma)  # the refit's sigma is hp.lmm's, 1


def test_known_residual_sds_are_checked(meta):
    frames = meta[1]
    with pytest.raises(hp.ArgumentError, match="either se"):
        hp.fit_batch(META, frames, se="se", weights="se")
    with pytest.raises(hp.ArgumentError, match="se must be the name of the column"):
        hp.fit_batch(META, frames, se=np.ones(13))
    with pytest.raises(hp.DataError, match="'sd'"):
        hp.fit_batch(META, frames, se="sd")
    with pytest.raises(hp.DataError, match="se column 'se' must be positive"):
        hp.fit_batch(META, {label: frame.assign(se=-frame.se) for label, frame in frames.items()}, se="se")


def test_three_coefficient_term_equals_lmm():
    # the unrolled per-level algebra beyond k = 2 (objective.factor_blocks)
    data = hp.datasets.sleepstudy_replicates(4, seed=3)
    data["days2"] = (data.Days - 4.5) ** 2 / 10
    formula = "Reaction ~ Days + (Days + days2 | Subject)"
    result = hp.fit_batch(formula, data, by="dataset")
    assert_not_refitted(result)
    fits = single_fits(formula, [data[data.dataset == i] for i in range(4)])
    assert [fit.is_singular for fit in fits] == [True, True, True, False]  # 3 of 4 on the boundary
    for i, fit in enumerate(fits):
        # singular fits are flat along the boundary: theta agrees to ~1e-6, the conditional sds to ~1e-4
        assert result.objective.iloc[i] == pytest.approx(fit.objective, rel=1e-11)
        np.testing.assert_allclose(result.theta[i], fit.theta, atol=1e-5)
        np.testing.assert_allclose(result.fixef.iloc[i], fit.fixef, rtol=1e-6)
        ranef = result.ranef.query("dataset == @i")
        np.testing.assert_allclose(ranef.condval, fit.ranef.condval, atol=1e-4 * np.abs(fit.ranef.condval).max())
        np.testing.assert_allclose(ranef.condsd, fit.ranef.condsd, rtol=1e-4)


def test_datasets_of_different_sizes_and_levels_share_padded_buckets():
    # 5 and 7 levels share the bucket of 8, 11 and 16 that of 16, 18 is padded to 32; rows are sampled so
    # that every dataset has its own size.  Few datasets: each hp.lmm fit of a new size compiles (~3 s)
    rng = np.random.default_rng(0)
    base = hp.datasets.sleepstudy_replicates(5, seed=9)
    frames = {}
    for i, ((_, frame), count) in enumerate(zip(base.groupby("dataset"), (7, 16, 5, 18, 11))):
        frame = frame[frame.Subject.isin(frame.Subject.unique()[:count])]
        frames[f"site{i}"] = frame.sample(frac=rng.uniform(0.6, 1.0), random_state=i).drop(columns="dataset")
    result = hp.fit_batch(SLEEP, frames, by="site")
    assert list(result.datasets) == list(frames)
    # every table names the datasets' column as by, as fixef's index is named
    assert result.fixef.index.name == "site"
    for table in (result.ranef, result.varcorr, result.to_frame()):
        assert table.columns[0] == "site" and "dataset" not in table.columns
        assert list(pd.unique(table["site"])) == list(frames)
    assert [len(levels) for levels in result.levels] == [7, 16, 5, 18, 11]
    assert len({len(frame) for frame in frames.values()}) == 5
    assert_matches(result, single_fits(SLEEP, frames.values()), list(frames))


def test_random_intercept_and_categorical_fixed_effects():
    data = hp.datasets.sleepstudy_replicates(8, seed=2)
    data["phase"] = np.where(data.Days < 3, "early", np.where(data.Days < 7, "mid", "late"))
    formula = "Reaction ~ phase + (1 | Subject)"
    result = hp.fit_batch(formula, data)
    assert list(result.fixed_names) == list(hp.lmm(formula, data[data.dataset == 0]).fixef.index)
    assert_matches(result, single_fits(formula, [data[data.dataset == i] for i in range(8)]), list(range(8)))
    ml = hp.fit_batch(formula, data, reml=False)
    assert_not_refitted(ml)
    single = hp.lmm(formula, data[data.dataset == 3], reml=False)
    assert ml.objective.iloc[3] == pytest.approx(single.objective, rel=1e-11)


def test_a_failing_dataset_is_reported_in_its_row_and_spares_the_others():
    data = hp.datasets.sleepstudy_replicates(6, seed=5)
    one_subject = data[(data.dataset == 1) & (data.Subject == "S0")]
    data = pd.concat([data[data.dataset != 1], one_subject])
    data.loc[data.dataset == 2, "Days"] = 4.0  # Days is constant: aliased with the intercept in dataset 2
    result = hp.fit_batch(SLEEP, data)
    assert "has only one level" in result.messages.loc[1] and np.isnan(result.objective.loc[1])
    assert "rank 1" in result.messages.loc[2] and not result.converged.loc[2]
    assert result.fixef.loc[[1, 2]].isna().all().all()
    good = [0, 3, 4, 5]
    assert_matches(result, single_fits(SLEEP, [data[data.dataset == i] for i in good]), good)
    assert result.messages.loc[good].eq("").all()


def test_a_singular_dataset_is_flagged_with_a_zero_variance():
    rng = np.random.default_rng(1)
    frames = [pd.DataFrame({"y": rng.normal(size=30), "g": np.repeat(list("abcdef"), 5)}) for _ in range(3)]
    result = hp.fit_batch("y ~ 1 + (1 | g)", frames)
    assert_not_refitted(result)
    fits = single_fits("y ~ 1 + (1 | g)", frames)
    for i, fit in enumerate(fits):
        assert result.objective.iloc[i] == pytest.approx(fit.objective, rel=1e-10)
        assert bool(result.is_singular.iloc[i]) == fit.is_singular
        if fit.is_singular:
            assert result.varcorr.query("dataset == @i and grp == 'g'").sdcor.iloc[0] < 1e-4 * fit.sigma


def test_a_compiled_fit_snapped_onto_the_boundary_is_solved_there(monkeypatch):
    """The compiled one-term path stops a variance 1e-9 short of 0; snapped onto lme4's boundary after the chunks
    (with the stopped rows, all at once), each such dataset's estimates are solved again at theta = 0: its BLUPs
    exactly 0 and its numbers the single fit's, not those at where the search stopped."""
    from hierpool.batch import fit as fit_module

    rng = np.random.default_rng(3)
    frames = [pd.DataFrame({"y": rng.normal(size=30) + 0.4 * np.repeat(rng.normal(size=6), 5) * (i % 2),
                            "x": rng.normal(size=30), "g": np.repeat(list("abcdef"), 5)}) for i in range(8)]
    monkeypatch.setattr(fit_module, "_on_host", lambda *a: False)
    result = hp.fit_batch("y ~ x + (1 | g)", frames, chunk_size=3, progress=False)
    singular = np.flatnonzero(result.is_singular.to_numpy())
    assert singular.size >= 2 and not result.refit.any()
    for i in singular:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hp.HierpoolWarning)
            fit = hp.lmm("y ~ x + (1 | g)", frames[i])
        assert result.theta[i, 0] == 0.0 and fit.theta[0] == 0.0
        assert np.all(result.b[i] == 0.0) and np.all(result.cond_sd[i] == 0.0)
        assert result.objective.iloc[i] == pytest.approx(fit.objective, rel=1e-12)
        np.testing.assert_allclose(result.beta[i], fit.fixef.to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(result.beta_se[i], fit.fixef_se.to_numpy(), rtol=1e-8)
        assert result.sigma[i] == pytest.approx(fit.sigma, rel=1e-10)


def _host_and_compiled(monkeypatch, *args, **kwargs):
    """conftest.host_and_compiled on the one-term path."""
    from hierpool.batch import fit as fit_module

    return host_and_compiled(monkeypatch, fit_module, *args, **kwargs)


def test_the_rule_puts_small_float64_batches_on_the_host(replicates):
    from hierpool.batch import fit as fit_module
    from hierpool.batch.plan import plan_batch

    plan = plan_batch(SLEEP, replicates, "dataset", "fit_batch", "hp.lmm", one_term=False)
    if jax.default_backend() == "cpu":  # the host path is for a CPU
        assert fit_module._on_host(plan, np.float64, None, True)
    assert not fit_module._on_host(plan, np.float32, None, True)
    assert not fit_module._on_host(plan, np.float64, None, False)
    wide = hp.datasets.sleepstudy_replicates(2, seed=1).assign(d2=lambda f: (f.Days - 4.5) ** 2, d3=lambda f: f.Days**3)
    plan4 = plan_batch("Reaction ~ Days + (Days + d2 + d3 | Subject)", wide, "dataset", "fit_batch", "hp.lmm",
                       one_term=False)
    # any width: the host search's gradient is the written-out adjoint
    assert fit_module._on_host(plan4, np.float64, None, True) == (jax.default_backend() == "cpu")


def test_the_host_optimizer_equals_the_compiled_program(replicates, monkeypatch):
    assert_same_fits(*_host_and_compiled(monkeypatch, SLEEP, replicates, by="dataset"), same_steps=False)


def test_the_host_optimizer_equals_the_compiled_program_with_weights_offset_and_ml(replicates, monkeypatch):
    data = weighted(replicates[replicates.dataset < 20])
    assert_same_fits(*_host_and_compiled(monkeypatch, SLEEP, data, weights="w", offset="off", reml=False),
                     same_steps=False)


def test_the_host_optimizer_equals_the_compiled_program_with_three_coefficients(replicates, monkeypatch):
    # a term of three coefficients (six parameters), on the host by the several-term search
    data = replicates[replicates.dataset < 8].assign(d2=lambda f: (f.Days - 4.5) ** 2 / 10)
    assert_same_fits(*_host_and_compiled(monkeypatch, "Reaction ~ Days + (Days + d2 | Subject)", data),
                     same_steps=False)


def test_the_host_optimizer_equals_the_compiled_program_with_known_sds(meta, monkeypatch):
    host, compiled = _host_and_compiled(monkeypatch, META, {k: v for k, v in meta[1].items() if k != "one"},
                                        se="se")
    assert_same_fits(host, compiled, same_steps=False)


def test_canonical_theta_of_many_rows_equals_row_by_row():
    from hierpool.algebra.linalg import canonical_theta, tril_positions

    rng = np.random.default_rng(5)
    ks = (2, 1, 3)
    thetas = rng.normal(size=(7, 3, 10))  # terms of widths 2, 1, 3: 3 + 1 + 6 parameters
    many = canonical_theta(thetas, ks)
    offset = 0
    for k in ks:  # each term's factor: its diagonal made non-negative, Lambda Lambda^T unchanged
        rows, cols = tril_positions(k)
        factor_of = lambda t: np.zeros(t.shape[:-1] + (k, k)) + 0.0  # noqa: E731
        before, after = factor_of(thetas), factor_of(many)
        before[..., rows, cols] = thetas[..., offset : offset + len(rows)]
        after[..., rows, cols] = many[..., offset : offset + len(rows)]
        assert np.all(np.diagonal(after, axis1=-2, axis2=-1) >= 0)
        np.testing.assert_allclose(after @ np.swapaxes(after, -1, -2), before @ np.swapaxes(before, -1, -2),
                                   atol=1e-14)
        offset += len(rows)
    for index in np.ndindex(7, 3):
        np.testing.assert_array_equal(many[index], canonical_theta(thetas[index], ks))


def test_a_stack_of_cholesky_factors_gives_nan_for_its_indefinite_matrix_alone():
    from hierpool.algebra.linalg import cholesky

    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 9, 9))
    stack = a @ np.swapaxes(a, 1, 2) + np.eye(9)
    stack[1] -= 50 * np.eye(9)  # indefinite
    factors = cholesky(stack)
    assert np.isnan(factors[1]).any()
    for i in (0, 2, 3):
        np.testing.assert_allclose(factors[i], np.linalg.cholesky(stack[i]), rtol=1e-12)
    with pytest.raises(np.linalg.LinAlgError):  # one matrix: NumPy's refusal, as before
        cholesky(stack[1])
    # a singular neighbour (its last pivot exactly 0) fails alone too: the others keep LAPACK's own factors
    singular = np.stack([stack[0], np.diag([1.0] * 8 + [0.0]), stack[2]])
    factors = cholesky(singular)
    assert factors[1, -1, -1] == 0 and np.all(np.isfinite(factors[1]))  # its column-by-column factor, pivot 0
    for i in (0, 2):
        np.testing.assert_array_equal(factors[i], np.linalg.cholesky(singular[i]))


def test_the_host_newton_decides_definiteness_matrix_by_matrix_as_the_compiled_one():
    from hierpool.algebra.search.newton import _definiteness, _positive_definite

    stack = np.array([[[2.0, 1.0], [1.0, 2.0]], [[1.0, 2.0], [2.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]],
                      [[np.nan, 0.0], [0.0, 1.0]], [[1e-300, 0.0], [0.0, 1.0]]])  # definite, indefinite, singular
    np.testing.assert_array_equal(_positive_definite(stack), [True, False, False, False, True])
    assert _positive_definite(stack[0]) and not _positive_definite(stack[1])  # one matrix too
    for matrix in stack[[0, 1, 2, 4]]:  # definiteness and the Gershgorin shift, alike on both paths
        traced, host = _definiteness(jax.numpy.asarray(matrix)), _definiteness(matrix[None])
        assert bool(traced[0]) == host[0][0] and float(traced[1]) == pytest.approx(host[1][0])
    definite, shift = _definiteness(stack[:3])
    np.testing.assert_array_equal(definite, [True, False, False])
    assert shift[0] == 0.0 and shift[1] > 0 and shift[2] >= 0
    # a stack that is all definite is decided at once; the Newton systems solved alike either way, NaN for the
    # matrices that are not definite (or whose right-hand side is not finite) alone
    from hierpool.algebra.search.newton import _solve_spd

    definite_stack = stack[[0, 4, 0]]
    assert _positive_definite(definite_stack).all()
    np.testing.assert_array_equal(_positive_definite(stack[[0, 3]]), [True, False])  # LAPACK factors NaN silently
    vectors = np.array([[1.0, 2.0], [3.0, -1.0], [np.nan, 1.0], [1.0, 1.0], [0.5, 0.5]])
    expected = np.linalg.solve(definite_stack, vectors[[0, 1, 4]][..., None])[..., 0]
    np.testing.assert_allclose(_solve_spd(definite_stack, vectors[[0, 1, 4]]), expected, rtol=1e-14)
    mixed = _solve_spd(stack, vectors)
    np.testing.assert_allclose(mixed[[0, 4]], np.linalg.solve(stack[[0, 4]], vectors[[0, 4]][..., None])[..., 0],
                               rtol=1e-14)
    assert np.isnan(mixed[[1, 2, 3]]).all()
    assert np.isnan(_solve_spd(definite_stack, vectors[[0, 2, 4]])[1]).all()
    nan_neighbour = _solve_spd(stack[[0, 3]], vectors[[0, 3]])
    np.testing.assert_allclose(nan_neighbour[0], expected[0], rtol=1e-14)
    assert np.isnan(nan_neighbour[1]).all()


def test_newton_stops_on_the_pass_whose_quadratic_model_puts_the_optimum_within_the_tolerance():
    # a quadratic's forward-difference Hessian is exact to its width's rounding, so the first step lands within
    # ~1e-8 of its minimum (a gradient of ~1e-5 there: the gradient rule does not stop it), where the next step the
    # model predicts is within the 1e-6 tolerance: the search ends on that pass (one step), not on a pass that takes
    # that step (two).  With a decrease tolerance, the search ends once the decrease the model still promises
    # (g^T H^-1 g / 2) is below it, a pass or more sooner
    import jax.numpy as jnp

    from hierpool.algebra.search.newton import newton, newton_on_host

    matrix, centre = 1e3 * np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([0.7, -1.3])
    rng = np.random.default_rng(4)
    starts = rng.normal(size=(5, 2))

    def quadratic(points, rows):
        d = points - centre
        return 0.5 * np.einsum("...i,ij,...j->...", d, matrix, d), d @ matrix

    theta, value, step, iterations, converged = newton_on_host(quadratic, starts, step_tol=1e-6)
    np.testing.assert_allclose(theta, np.broadcast_to(centre, theta.shape), atol=1e-7)
    np.testing.assert_array_equal(iterations, 1)
    assert converged.all()
    # jitted: unjitted, each of the search's operations compiles alone (over a hundred small programs)
    compiled = jax.jit(jax.vmap(lambda x0: newton(lambda x: 0.5 * (x - centre) @ jnp.asarray(matrix) @ (x - centre),
                                                  x0, step_tol=1e-6)))(jnp.asarray(starts))
    np.testing.assert_array_equal(np.asarray(compiled[3]), 1)

    def smooth(points, rows):  # exp(a x) - a e x per coordinate, minimum at x = 1 / a
        a = np.array([1.2, 1.9])
        return np.sum(np.exp(a * points) - a * np.e * points, axis=-1), a * np.exp(a * points) - a * np.e

    exact = newton_on_host(smooth, starts)
    loose = newton_on_host(smooth, starts, decrease_tol=1e-4)
    assert exact[3].min() >= 3 and np.all(loose[3] < exact[3])
    np.testing.assert_allclose(exact[0], np.broadcast_to([1 / 1.2, 1 / 1.9], starts.shape), atol=1e-8)
    remaining = loose[1] - exact[1]
    assert np.all(remaining >= 0) and np.all(remaining <= 1e-4)  # what was left: the promised decrease, to 3rd order
    assert loose[4].all()  # a search that stopped on its model's decrease is converged
    rates = jnp.array([1.2, 1.9])
    traced = jax.value_and_grad(lambda x: jnp.sum(jnp.exp(rates * x) - rates * np.e * x))
    compiled = jax.jit(jax.vmap(lambda x0: newton(None, x0, value_and_grad=traced, decrease_tol=1e-4)))(
        jnp.asarray(starts))
    np.testing.assert_array_equal(np.asarray(compiled[3]), loose[3])

    # far to the left the first full steps overshoot: the damping set from each rejected trial takes the host and
    # the compiled searches along the same passes to the minimum, other passes than a fixed growth's
    far = np.array([[-3.0, -2.5], [-2.0, -3.5], [-4.0, 0.5]])
    with np.errstate(over="ignore", invalid="ignore"):
        grown = newton_on_host(smooth, far)
        interpolated = newton_on_host(smooth, far, interpolated_damping=True)
    assert interpolated[4].all() and np.any(interpolated[3] != grown[3])
    np.testing.assert_allclose(interpolated[0], np.broadcast_to([1 / 1.2, 1 / 1.9], far.shape), atol=1e-7)
    compiled = jax.vmap(lambda x0: newton(None, x0, value_and_grad=traced, interpolated_damping=True))(
        jnp.asarray(far))
    np.testing.assert_array_equal(np.asarray(compiled[3]), interpolated[3])
    np.testing.assert_allclose(np.asarray(compiled[0]), interpolated[0], atol=1e-10)


def test_the_symmetric_rank_one_update_meets_the_secant_condition_and_skips_where_it_is_ill_determined():
    from hierpool.algebra.search.newton import _sr1_update

    rng = np.random.default_rng(5)
    a = rng.normal(size=(4, 3, 3))
    curvature = a + np.swapaxes(a, -1, -2)
    step, change = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    residual = change[1] - curvature[1] @ step[1]
    change[2] = curvature[2] @ step[2] + np.cross(step[2], rng.normal(size=3))  # (y - H s) orthogonal to s
    change[3, 0] = np.nan
    updated = _sr1_update(curvature, step, change)
    np.testing.assert_allclose(np.einsum("kij,kj->ki", updated[:2], step[:2]), change[:2], rtol=1e-12)
    np.testing.assert_allclose(updated, np.swapaxes(updated, -1, -2), rtol=0, atol=0)
    np.testing.assert_allclose(updated[1] - curvature[1], np.outer(residual, residual) / (residual @ step[1]),
                               rtol=1e-12)
    np.testing.assert_array_equal(updated[2:], curvature[2:])  # skipped: a tiny denominator, a change not finite


def _smooth_coupled(points, rows):
    """exp(a x) - a e x per coordinate plus (x_0 - x_3)^2 and (x_1 x_2 - 0.3)^2: convex near its minimum, not a
    quadratic (its Hessian changes along the search), the rates a per dataset."""
    a = 1.0 + 0.2 * rows[:, None, None] + 0.3 * np.arange(4)
    x0, x1, x2, x3 = np.moveaxis(points, -1, 0)
    coupling, product = x0 - x3, x1 * x2 - 0.3
    value = np.sum(np.exp(a * points) - a * np.e * points, axis=-1) + coupling**2 + product**2
    gradient = a * np.exp(a * points) - a * np.e
    gradient = gradient + np.stack([2 * coupling, 2 * product * x2, 2 * product * x1, -2 * coupling], axis=-1)
    return value, gradient


def test_a_secant_search_reaches_the_differencing_search_s_optimum_with_fewer_gradients(monkeypatch):
    # newton_on_host's secant passes evaluate each trial alone and update the curvature from the gradients' change
    # (optimize_on_host's secant): the same optimum and criteria as each trial's forward differences, fewer points,
    # and where it stops the curvature returned is the forward-difference Hessian there (the stop was confirmed on
    # it), so that a saddle test and a covariance read differences, not an update
    from hierpool.algebra.search.newton import _finite_difference_hessians, _probe_points, optimize_on_host

    starts = np.random.default_rng(8).uniform(-0.5, 1.0, size=(6, 4))
    counted = {}

    def counting(label):
        def value_and_grad(points, rows):
            counted[label] = counted.get(label, 0) + points.shape[0] * points.shape[1]
            return _smooth_coupled(points, rows)
        return value_and_grad

    plain = optimize_on_host(counting("plain"), starts, 60, (1, 1, 1, 1), with_curvature=True, saddle_free=True,
                             interpolated_damping=True)
    secant = optimize_on_host(counting("secant"), starts, 60, (1, 1, 1, 1), with_curvature=True, saddle_free=True,
                              interpolated_damping=True, secant=True)
    assert plain["converged"].all() and secant["converged"].all()
    np.testing.assert_allclose(secant["theta"], plain["theta"], atol=1e-7)
    np.testing.assert_allclose(secant["objective"], plain["objective"], rtol=1e-13)
    assert np.all(secant["iterations"] > plain["iterations"]) and counted["secant"] < 0.7 * counted["plain"]
    every, steps = _probe_points(secant["theta"], np.sqrt(np.finfo(float).eps), np)
    np.testing.assert_allclose(secant["curvature"], _finite_difference_hessians(
        _smooth_coupled(every, np.arange(6))[1], steps, np), rtol=1e-12)
    # an update that overstates the curvature a hundredfold promises too little decrease and stops early: the stop,
    # read again on the forward differences, is not confirmed, and the search goes on to the optimum (the test on
    # the steps' decrease against their model's, which would also catch it, off)
    from hierpool.algebra.search import newton as optimize_module

    monkeypatch.setattr(optimize_module, "_sr1_update", lambda curvature, step, change: 100 * curvature)
    monkeypatch.setattr(optimize_module, "MODEL_AGREEMENT", np.inf)
    overstated = optimize_on_host(_smooth_coupled, starts, 60, (1, 1, 1, 1), saddle_free=True,
                                  interpolated_damping=True, secant=True, decrease_tol=1e-10)
    assert overstated["converged"].all()
    assert np.all(overstated["objective"] - plain["objective"] <= 1e-10)  # what the decrease tolerance leaves


def test_a_rejected_step_is_shortened_to_the_interpolated_minimum_along_it_and_a_success_lengthens_the_next():
    # in one dimension the damped step -g / (h + shift) is exact: after a rejection the next step is alpha times the
    # rejected one, alpha the minimum of the quadratic through f(0), f'(0) and f(s) (at most 0.5, as f(s) >= f(0);
    # at least 0.1; 0.1 where f(s) is not finite)
    import jax.numpy as jnp

    from hierpool.algebra.search.newton import _damping_after

    h, g, damping, scale = 4.0, -2.0, 0.5, 4.0
    step = np.array([-g / (h + damping)])
    slope = g * step[0]
    for change, alpha in [(0.5, -slope / (2 * (0.5 - slope))), (50.0, 0.1), (np.inf, 0.1), (0.0, 0.5)]:
        new = _damping_after(np.array(False), np.array(damping), np.array(scale), 10.0, np, np.array(False),
                             (step[None], np.array(slope), np.array(change)))
        assert 0.1 <= alpha <= 0.5
        assert -g / (h + new) == pytest.approx(alpha * step[0], rel=1e-12), change
        traced = _damping_after(jnp.asarray(False), jnp.asarray(damping), jnp.asarray(scale), 10.0, jnp,
                                jnp.asarray(False), (jnp.asarray(step), jnp.asarray(slope), jnp.asarray(change)))
        assert float(traced) == pytest.approx(new.item(), rel=1e-12)
    # after a success tenfold, threefold where the pass before was rejected (the damping it set is not undone)
    for after_rejection, fall in ((False, 10.0), (True, 3.0)):
        assert _damping_after(np.array(True), np.array(damping), np.array(scale), 10.0, np, np.array(after_rejection),
                              (step[None], np.array(slope), np.array(-1.0))) == pytest.approx(damping / fall)
        assert float(_damping_after(jnp.asarray(True), jnp.asarray(damping), jnp.asarray(scale), 10.0, jnp,
                                    jnp.asarray(after_rejection))) == pytest.approx(damping / fall)
    # without the trial (and where no step was taken) the damping grows by its factor
    assert _damping_after(np.array(False), np.array(damping), np.array(scale), 10.0, np,
                          np.array(False)) == pytest.approx(10 * damping)
    assert _damping_after(np.array(False), np.array(damping), np.array(scale), 10.0, np, np.array(False),
                          (np.zeros((1, 1)), np.array(0.0), np.array(np.inf))) == pytest.approx(10 * damping)


def test_a_dataset_whose_slope_column_is_zero_is_refused_alone_on_the_host_and_compiled(monkeypatch):
    # x is 0 throughout dataset 2: its criterion does not depend on the slope's theta (its Newton systems singular),
    # which both paths ran into, ending at lme4's start, not converged; the single fit refuses such a term now (its
    # variance is not identified), and so does the batch, in that dataset's row alone.  (A singular Newton system in
    # a host stack: test_batch_refusals.test_an_exactly_singular_hessian_in_a_stack_gives_nan_for_its_dataset_alone)
    rng = np.random.default_rng(3)
    frames = []
    for d in range(6):
        x = np.zeros(40) if d == 2 else rng.normal(size=40)
        g = np.repeat(np.arange(8), 5)
        frames.append(pd.DataFrame({"dataset": d, "g": g.astype(str), "x": x,
                                    "y": x * rng.normal(0, 1, 8)[g] + rng.normal(size=40)}))
    data = pd.concat(frames, ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host, compiled = _host_and_compiled(monkeypatch, "y ~ 1 + (0 + x | g)", data, polish=False)
    assert host.converged.drop(index=2).all() and compiled.converged.drop(index=2).all()
    np.testing.assert_allclose(host.objective.drop(index=2), compiled.objective.drop(index=2), rtol=1e-12)
    for batch in (host, compiled):
        assert np.isnan(batch.objective.iloc[2]) and not batch.converged.iloc[2]
        assert batch.messages.iloc[2].startswith("random-effect term (x | g) has column(s) x zero or a copy")
    with pytest.raises(hp.DataError, match=r"random-effect term \(x \| g\) has column\(s\) x zero"):
        hp.lmm("y ~ 1 + (0 + x | g)", frames[2])


def test_float32_agrees_with_float64(replicates, batch):
    single = hp.fit_batch(SLEEP, replicates, dtype="float32")
    assert_not_refitted(single)
    np.testing.assert_allclose(single.objective, batch.objective, rtol=1e-5)
    np.testing.assert_allclose(single.fixef, batch.fixef, rtol=1e-4)


def test_tables(replicates, batch):
    frame = batch.to_frame()
    assert len(frame) == 60 and {"Intercept", "se_Days", "sd_Subject_Days", "cor_Subject_Intercept_Days",
                                 "sigma", "converged", "refit", "is_singular", "message"} <= set(frame.columns)
    fit = hp.lmm(SLEEP, replicates[replicates.dataset == 7])
    np.testing.assert_allclose(frame.loc[7, ["sd_Subject_Intercept", "sd_Subject_Days", "cor_Subject_Intercept_Days",
                                             "sigma"]].to_numpy(float), fit.varcorr.sdcor.to_numpy(), rtol=1e-5)
    assert len(batch.ranef) == 60 * 18 * 2 and len(batch.varcorr) == 60 * 4


SHARDED = """
import json, hierpool as hp, jax
data = hp.datasets.sleepstudy_replicates(60, seed=4)
result = hp.fit_batch("Reaction ~ Days + (Days | Subject)", data, chunk_size=8)
print(json.dumps({"devices": jax.device_count(), "objective": result.objective.tolist(),
                  "beta": result.beta.tolist(), "refitted": int(result.refit.sum())}))
"""


def test_sharded_over_four_host_devices_gives_the_same_fits(replicates, batch):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["refitted"] == 0  # the sharded optimizer converged by itself
    np.testing.assert_allclose(out["objective"], batch.objective, rtol=1e-11)
    np.testing.assert_allclose(out["beta"], batch.beta, rtol=1e-8)


MULTI_PROCESS = """
import json, sys, jax
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
import hierpool as hp
data = hp.datasets.sleepstudy_replicates(60, seed=4)
result = hp.fit_batch("Reaction ~ Days + (Days | Subject)", data[data.dataset < 16], chunk_size=4)
posterior = hp.bayes_batch("Reaction ~ Days + (1 | Subject)", data[data.dataset < 2], draws=300, tune=300, seed=2,
                           progress=False)
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(),
                  "objective": result.objective.tolist(), "beta": result.beta.tolist(),
                  "refitted": int(result.refit.sum()),
                  "posterior": posterior.fixef[["mean", "sd"]].to_numpy().tolist()}))
"""


def test_two_processes_through_jax_distributed_give_the_same_fits(replicates, batch):
    # two hosts simulated on this one: jax.distributed over localhost, 2 CPU devices each, gloo collectives
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS, str(rank), port], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    for out in results:
        assert (out["devices"], out["local"]) == (4, 2) and out["refitted"] == 0
        np.testing.assert_allclose(out["objective"], batch.objective[:16], rtol=1e-11)
        np.testing.assert_allclose(out["beta"], batch.beta[:16], rtol=1e-8)
    # every process holds every dataset's posterior (gathered), the same on both
    assert results[0]["posterior"] == results[1]["posterior"]
    # and it is each dataset's own: on these balanced datasets the posterior mean of beta is the REML
    # estimate up to the weak prior's pull and Monte Carlo error (0.07 sd at most); the other dataset's
    # estimates lie 1.4 to 2.4 sd away.  (A random-intercept model: its sampler compiles in less time than
    # the correlated slope's, which the single-process tests sample.)
    reml = [hp.lmm("Reaction ~ Days + (1 | Subject)", replicates[replicates.dataset == i]).fixef for i in (0, 1)]
    mean, sd = np.asarray(results[0]["posterior"]).T
    distance = np.abs(mean - np.concatenate(reml)) / sd
    assert np.max(distance) < 0.2, distance


def test_bad_input_names_the_culprit(replicates):
    with pytest.raises(hp.DataError, match="'study'"):
        hp.fit_batch(SLEEP, replicates, by="study")
    with pytest.raises(hp.ArgumentError, match="a GLMM batch is fitted in float64"):
        hp.fit_batch("Reaction ~ Days + (1 | Subject)", replicates, family="poisson", dtype="float32")
    with pytest.raises(hp.ArgumentError, match="not with family="):
        hp.fit_batch("Reaction ~ Days + (1 | Subject)", replicates, family="poisson", se="Days")
    with pytest.raises(hp.ArgumentError, match="already has a column 'dataset'"):
        hp.fit_batch(SLEEP, [replicates])
    # the tables name the datasets' column as by: one named as another column of theirs is refused
    for name, caller in (("grp", hp.fit_batch), ("objective", hp.fit_batch), ("mean", hp.bayes_batch)):
        with pytest.raises(hp.ArgumentError, match=f"by='{name}' names a column"):
            caller(SLEEP, replicates.rename(columns={"dataset": name}), by=name)
    with pytest.raises(hp.ArgumentError, match="dtype"):
        hp.fit_batch(SLEEP, replicates, dtype="float16")
    with pytest.raises(hp.DataError, match="'Reactions'"):
        hp.fit_batch("Reactions ~ Days + (Days | Subject)", replicates)


def test_moment_start_is_near_the_optimum_and_falls_back_to_the_identity(replicates, batch):
    from hierpool.algebra.search.newton import moment_start
    from hierpool.batch.plan import plan_batch

    plan = plan_batch(SLEEP, replicates, "dataset", "test", "hp.lmm")
    (_, members, stats), = plan.buckets()[0]
    start = moment_start(stats)
    # Sigma / sigma^2 implied by the start against the REML fit's, per dataset: same order of magnitude
    fitted = batch.theta[members]
    implied = lambda t: np.stack([t[:, 0] ** 2, t[:, 1] ** 2 + t[:, 2] ** 2], axis=1)  # diag of Lambda Lambda^T
    ratio = implied(start) / np.maximum(implied(fitted), 1e-8)
    assert np.median(np.abs(np.log(ratio))) < np.log(2)
    # two levels for a 2-coefficient term: no covariance estimate, lme4's identity start
    few = stats.take(np.arange(3))
    few = dataclasses.replace(few, ztz=few.ztz[:, :2], ztx=few.ztx[:, :2], zty=few.zty[:, :2])
    np.testing.assert_array_equal(moment_start(few), np.tile([1.0, 0.0, 1.0], (3, 1)))


def test_to_frame_refuses_a_fixed_effect_named_like_one_of_its_columns():
    # a fixed effect called "sigma" would be overwritten by the residual sd's column: refused, by name
    data = hp.datasets.sleepstudy_replicates(2, seed=3).rename(columns={"Days": "sigma"})
    batch = hp.fit_batch("Reaction ~ sigma + (1 | Subject)", data, progress=False)
    with pytest.raises(hp.ArgumentError, match=r"fixed effect\(s\) \['sigma'\]"):
        batch.to_frame()


def test_chunks_run_serially_where_their_newton_systems_lapack_call_may_split(monkeypatch):
    # jaxlib 0.10.2 splits a large batched LAPACK call over XLA's CPU pool, which hangs two threads running such
    # programs (plan.thread_count, on a CPU): a GLMM with 40 fixed effects (41 x 41 Newton systems, 16 per call on a
    # CPU) may split, one with 4 may not.  The sizes fit_batch hands thread_count are read before anything is fitted
    from hierpool.batch import fit as fit_module
    from hierpool.batch.plan import lapack_may_split

    class Decided(Exception):
        pass

    def spy(sharding, serial=False, newton_systems=None):
        raise Decided(lapack_may_split(*newton_systems))

    monkeypatch.setattr(fit_module, "thread_count", spy)
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.normal(size=(60, 40)), columns=[f"x{i}" for i in range(40)])
    frame = frame.assign(y=rng.integers(0, 2, 60), g=np.repeat(np.arange(6), 10).astype(str), dataset=0)
    for p, serial in ((40, True), (4, False)):
        formula = "y ~ " + " + ".join(f"x{i}" for i in range(p)) + " + (1 | g)"
        with pytest.raises(Decided) as decided:
            hp.fit_batch(formula, frame, family="bernoulli", chunk_size=16)
        assert decided.value.args[0] is serial
    monkeypatch.undo()
    if jax.default_backend() == "cpu":  # and thread_count acts on it: one thread where the call may split
        from hierpool.batch.plan import thread_count

        assert thread_count(None, newton_systems=(41, 16)) == 1
        assert thread_count(None, newton_systems=(5, 16)) == thread_count(None)


def test_host_calls_are_whole_rounds_of_the_threads_of_equal_lengths():
    from hierpool.batch.plan import host_chunk_length

    # 1,000 datasets in calls of at most 223 on two threads: six of 167, not four of 223 and one of 108
    assert host_chunk_length(1000, 223, 2) == 167
    assert host_chunk_length(1000, 512, 2) == 500  # a call per thread at least
    assert host_chunk_length(3, 512, 2) == 2 and host_chunk_length(1, 512, 2) == 1
    assert host_chunk_length(1000, 300, 1) == 250  # one thread: the fewest calls, equal


def test_a_float32_batch_without_fixed_effects_fits():
    # its criterion came out float64 (the statistics' float64 parts) in a float32 Newton loop: a raw JAX error
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(6), 5)
    frames = [pd.DataFrame({"g": g, "y": rng.normal(size=30) + rng.normal(size=6)[g]}) for _ in range(3)]
    single = hp.fit_batch("y ~ 0 + (1 | g)", frames, progress=False)
    half = hp.fit_batch("y ~ 0 + (1 | g)", frames, dtype="float32", progress=False)
    np.testing.assert_allclose(half.objective, single.objective, rtol=1e-5)
    # known residual sds too; and the one-term criterion itself keeps float32 (a float64 zero log|R_X| and NumPy's
    # float64 log(2 pi) promoted it; the Newton loop's casts hid that)
    known = [frame.assign(s=0.8) for frame in frames]
    known_32 = hp.fit_batch("y ~ 0 + (1 | g)", known, se="s", dtype="float32", progress=False)
    known_64 = hp.fit_batch("y ~ 0 + (1 | g)", known, se="s", progress=False)
    np.testing.assert_allclose(known_32.objective, known_64.objective, rtol=1e-5)
    from hierpool.algebra import one_term
    from hierpool.algebra.statistics import BatchStatistics

    f32 = np.float32
    for p in (0, 1):
        stats = BatchStatistics(ztz=np.ones((2, 4, 1, 1), f32), ztx=np.ones((2, 4, 1, p), f32),
                                zty=np.ones((2, 4, 1), f32), xtx=np.tile(5 * np.eye(p, dtype=f32), (2, 1, 1)),
                                xty=np.ones((2, p), f32), yty=np.full(2, 20, f32), n=np.full(2, 10, f32),
                                log_weights=np.zeros(2, f32), beta_shift=np.zeros((2, p)))
        for reml in (True, False):
            for sigma_known in (False, True):
                value = one_term.objective(np.ones((2, 1), f32), stats, reml, sigma_known)
                assert value.dtype == f32, (p, reml, sigma_known)


def test_a_search_is_not_called_flat_where_its_last_curvature_bends_down_along_an_axis():
    # the end of a batch's search on a Poisson model with counts x 1e12 (y ~ x + (1 | a), 24 rows): the
    # forward-difference curvature is the gradient's rounding over the difference width (theta's entry 1.8e7
    # where the criterion's own is ~1e4, the intercept's negative), so that its shifted step promised a decrease
    # of 0.003 (below 1e-12 of the criterion) where 25 was left at a theta of 0.21 (the optimum's 0.657).  The
    # same gradient and a small decrease with a positive definite curvature is converged, and so with an
    # indefinite one whose diagonal is not negative, on either path
    import jax.numpy as jnp

    from hierpool.algebra.search.newton import _final_step, _tolerances

    theta = np.array([0.21247115, 27.84503776, 0.68483165])
    value = np.array(1.97815016e13)
    gradient = np.array([-346.42009522, 12.84863281, 364.8046875])
    bent = np.array([[1.80302131e07, -1.34347187e06, 4.68457519e06],
                     [-1.34347187e06, -1.44791409e05, -1.30056734e06],
                     [4.68457519e06, -1.30056734e06, 3.87327296e13]])
    _, _, _, converged_tolerances = _tolerances(np.dtype(float))
    tolerances = (1e-9, 1e-6, None)
    definite = np.diag(gradient**2 / 0.006)  # a small decrease, g^T H^-1 g / 2 = 0.009
    flat_direction = definite.copy()
    flat_direction[0, 1] = flat_direction[1, 0] = 1.01 * np.sqrt(definite[0, 0] * definite[1, 1])  # indefinite
    assert np.linalg.eigvalsh(flat_direction)[0] < 0
    # a negative binomial at its Poisson limit (log shape 16): the shape's diagonal at rounding's negative side,
    # nothing left to give along it
    limit = (np.array([-0.659, 1.279, 0.519, 16.017]), np.array(292.5), np.array([1.4e-7, -3e-8, 5e-8, 1e-10]),
             np.diag([80.9, 42.0, 861.0, -3.34e-6]))
    cases = [(theta, value, gradient, bent, False), (theta, value, gradient, definite, True),
             (theta, value, gradient, flat_direction, True), (*limit, True)]
    for at, criterion, slope, curvature, expected in cases:
        # the host's stack of searches, and the compiled search's one search (unbatched)
        host = _final_step(at[None], criterion[None], slope[None], curvature[None], tolerances,
                           *converged_tolerances, np)
        compiled = _final_step(jnp.asarray(at), jnp.asarray(criterion), jnp.asarray(slope), jnp.asarray(curvature),
                               tolerances, *converged_tolerances, jnp)
        for _, converged in (host, compiled):
            assert bool(np.ravel(converged)[0]) is expected, (curvature, expected)
    assert float(_final_step(theta[None], value[None], gradient[None], bent[None], tolerances,
                             *converged_tolerances, np)[0][0]) > 1e-6  # not converged on the Newton step's rule


def test_an_accelerator_runs_its_one_term_chunks_in_as_many_threads_as_set(replicates, monkeypatch):
    """One accelerator: a one-term batch's compiled chunks run in plan.ACCELERATOR_THREADS threads (two keep a chunk
    on the device while the host works on another; benchmarks/gpu.py times both), with the same rows; every other
    path's threads stay plan.thread_count's 1 there."""
    from hierpool.batch import fit as fit_module
    from hierpool.batch import plan as plan_module

    data = replicates[replicates.dataset < 12]
    monkeypatch.setattr(fit_module, "_on_host", lambda *a: False)
    before = hp.fit_batch(SLEEP, data, progress=False)
    pools, executor = [], fit_module.ThreadPoolExecutor
    monkeypatch.setattr(fit_module, "ThreadPoolExecutor", lambda max_workers: pools.append(max_workers)
                        or executor(max_workers=max_workers))
    monkeypatch.setattr(plan_module.jax, "default_backend", lambda: "gpu")  # (the programs still run on the CPU)
    for threads in (1, 2):
        monkeypatch.setattr(plan_module, "ACCELERATOR_THREADS", threads)
        assert plan_module.thread_count(None) == 1
        pools.clear()
        again = hp.fit_batch(SLEEP, data, progress=False, chunk_size=4)
        assert pools == [threads]
        np.testing.assert_array_equal(again.objective, before.objective)
