"""Known residual sds (se=): against metafor's REML random-effects meta-analysis."""

import json
import re
import warnings
from functools import partial

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from conftest import REFERENCE
from numpyro.infer.util import log_density

import hierpool as hp
from hierpool.algebra import one_term_marginal as one_term
from hierpool.algebra.henderson import conditional_draw, noise_size
from hierpool.algebra.marginal import beta_prior_block
from hierpool.algebra.statistics import one_dataset_statistics
from hierpool.algebra.system import build_system
from hierpool.bayesian import fit as bayes_fit
from hierpool.bayesian.model import collapsed_model, one_term_collapsed_model
from hierpool.bayesian.priors import resolve_priors
from hierpool.spec.design import build_design

CASES = json.loads(REFERENCE.read_text())["known_se"]


def frame(ref):
    data = pd.DataFrame({"y": ref["y"], "se": ref["se"], "trial": [f"s{i + 1}" for i in range(len(ref["y"]))]})
    if "ablat" in ref:
        data["ablat"] = ref["ablat"]
    return data


@pytest.mark.parametrize("ref", CASES, ids=[c["id"] for c in CASES])
def test_matches_metafor(ref):
    data = frame(ref)
    formula = ref.get("formula", "y ~ 1 + (1 | trial)")
    fit = hp.lmm(formula, data, se="se")
    tau = float(np.sqrt(fit.varcorr.vcov.iloc[0]))
    assert tau == pytest.approx(ref["tau"], rel=1e-3, abs=1e-6)
    beta = np.atleast_1d(ref.get("beta", ref.get("mu")))
    beta_se = np.atleast_1d(ref.get("beta_se", ref.get("mu_se")))
    np.testing.assert_allclose(fit.fixef.to_numpy(), beta, rtol=1e-5, atol=1e-5 * beta_se.max())
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), beta_se, rtol=2e-3)
    # metafor's blup(): fitted value + BLUP with an se that counts beta-hat's uncertainty
    pred = fit.predict(interval="confidence")
    np.testing.assert_allclose(pred.fit, ref["blup"], rtol=0, atol=1e-4 * np.std(ref["y"]))
    np.testing.assert_allclose(pred.se, ref["blup_se"], rtol=2e-3)
    # objective: metafor's restricted log-likelihood keeps +1/2 log|X^T X|, lme4's criterion does not
    X = fit.design.X
    assert fit.objective == pytest.approx(-2 * ref["loglik_reml"] + np.linalg.slogdet(X.T @ X)[1], rel=1e-6)
    assert "Residual" not in set(fit.varcorr.grp)


def test_eight_schools_allows_one_observation_per_group():
    ref = CASES[0]
    with pytest.warns(hp.ConvergenceWarning, match="singular"):
        fit = hp.lmm("y ~ 1 + (1 | trial)", frame(ref), se="se")
    assert fit.is_singular and fit.sigma == 1.0


# --- hp.bayes with se=: the one-term collapsed path (sufficient statistics, sigma fixed at 1) ---

BCG = next(c for c in CASES if c["id"] == "bcg_ablat_reml")
BCG_FORMULA = BCG["formula"]
Z_MAX = 4.0
DRAWS = 250


def test_one_term_collapsed_density_equals_the_general_path():
    # the NumPyro targets themselves (priors included: Normal on beta as pseudo-observations with sigma 1)
    design = build_design(BCG_FORMULA, frame(BCG), se="se")
    priors = resolve_priors(design, None)
    assert priors.sigma is None and all(prior is not None for prior in priors.beta)
    loc, scale = (jnp.asarray(a) for a in priors.beta_gaussian())
    stats, system = one_dataset_statistics(design), build_system(design)
    @jax.jit  # one program per path (eager, the general path's op-by-op dispatch takes seconds)
    def both(sds):
        def at(sd):
            params = {"sd__0": sd[None]}
            ours, _ = log_density(one_term_collapsed_model, (stats, loc, scale, priors), {"k": 1}, params)
            reference, _ = log_density(collapsed_model, (system, loc, scale, priors), {}, params)
            return ours, reference
        return jax.vmap(at)(sds)

    ours, reference = both(jnp.asarray([0.05, 0.3, 1.7]))
    np.testing.assert_allclose(ours, reference, rtol=1e-10)


def test_one_term_exact_draw_with_known_sds_is_the_general_engines():
    # sigma 1 and the weights 1 / se^2: the Gaussian law of (beta, b) given tau, as the general engine draws it
    design = build_design(BCG_FORMULA, frame(BCG), se="se")
    stats, system = one_dataset_statistics(design), build_system(design)
    theta, sigma = jnp.asarray([BCG["tau"]]), jnp.asarray(1.0)
    loc, scale = jnp.asarray([0.5, 0.0]), jnp.asarray([2.0, jnp.inf])
    ell, p = stats.zty.shape[0], design.p
    prior = beta_prior_block(loc, scale, sigma, system)

    def ours(noise):
        beta, b = one_term.conditional_draw(theta, sigma, stats, loc, scale, noise[:p], noise[p:].reshape(ell, 1))
        return jnp.concatenate([beta, b.ravel()])

    def reference(noise):
        beta, b = conditional_draw(theta, system, sigma, noise, prior)
        return jnp.concatenate([beta, b[0].ravel()])

    @partial(jax.jit, static_argnums=0)
    def law(draw, zeros):  # both are linear in the noise: mean and covariance J J^T are their Gaussian law
        jac = jax.jacfwd(draw)(zeros)
        return draw(zeros), jac @ jac.T

    mean_ours, cov_ours = law(ours, jnp.zeros(p + ell))
    mean_ref, cov_ref = law(reference, jnp.zeros(noise_size(system.layout)))
    np.testing.assert_allclose(mean_ours, mean_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov_ours, cov_ref, rtol=1e-9, atol=1e-12)


def sd_mcse(draws):
    """Monte Carlo standard errors of the posterior sds of (chain, draw, m) draws."""
    return az.mcse(az.convert_to_dataset({"x": draws}), method="sd")["x"].values


@pytest.fixture(scope="module")
def bcg_posteriors():
    """hp.bayes with se= through the one-term path and through the general path (other seeds)."""
    data = frame(BCG)
    kwargs = {"se": "se", "draws": DRAWS, "tune": DRAWS, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.SamplingWarning)  # ESS below 100 per chain: these are short chains
        statistics = hp.bayes(BCG_FORMULA, data, seed=1, **kwargs)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bayes_fit, "ONE_TERM_STATISTICS", False)
            general = hp.bayes(BCG_FORMULA, data, seed=2, **kwargs)
    return statistics, general


def test_bayes_one_term_path_with_known_sds_agrees_with_the_general_path(bcg_posteriors):
    statistics, general = bcg_posteriors
    assert "Residual" not in set(statistics.varcorr.grp)  # no sigma: the sds are known
    assert "sigma" not in statistics.idata.posterior
    for table in ("fixef", "varcorr", "ranef"):
        ours, theirs = getattr(statistics, table), getattr(general, table)
        z = (ours["mean"].to_numpy() - theirs["mean"].to_numpy()) / np.hypot(ours["mcse_mean"].to_numpy(),
                                                                               theirs["mcse_mean"].to_numpy())
        assert np.max(np.abs(z)) < Z_MAX, (table, z)
    # posterior sds of beta and b, in sd-MCSE units (the exact draws' spread, not only their centre)
    for ours, theirs in ((statistics.beta_draws, general.beta_draws), (statistics.ranef_draws(), general.ranef_draws())):
        spread = [x.reshape(-1, x.shape[-1]).std(axis=0, ddof=1) for x in (ours, theirs)]
        z = (spread[0] - spread[1]) / np.hypot(sd_mcse(ours), sd_mcse(theirs))
        assert np.max(np.abs(z)) < Z_MAX, z
    # the posterior sits near metafor's REML estimates (the weights 1 / se^2 ignored would move tau to ~0.6)
    tau = statistics.varcorr["mean"].iloc[0]
    assert abs(statistics.fixef.loc["ablat", "mean"] - BCG["beta"][1]) < 0.5 * statistics.fixef.loc["ablat", "sd"]
    assert 0.5 * BCG["tau"] < tau < 2 * BCG["tau"]


# --- hp.bayes_batch with se=: the same one-term target and exact draws, batched ---

@pytest.fixture(scope="module")
def bcg_batch():
    """bcg and its first 9 trials (padded to the bucket of 16 levels: one compiled program), and a 1-trial set."""
    data = frame(BCG)
    datasets = {"bcg9": data.iloc[:9], "bcg": data, "one": data.iloc[:1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.SamplingWarning)
        return hp.bayes_batch(BCG_FORMULA, datasets, se="se", seed=3, draws=DRAWS, tune=DRAWS, keep_draws=True,
                              progress=False)


def test_bayes_batch_with_known_sds_samples_hp_bayes_posterior(bcg_batch, bcg_posteriors):
    single = bcg_posteriors[0]  # hp.bayes with se= (its one-term path), another seed
    batch = bcg_batch
    assert batch.sigma_known and "has only one level" in batch.diagnostics.loc["one", "message"]
    assert (batch.divergences[:2] == 0).all()
    # no sigma: hp.bayes's varcorr rows (no Residual row), and no sigma draws
    assert set(batch.draws["bcg"]) == {"beta", "b", "sd"}
    varcorr = batch.varcorr.query("dataset == 'bcg'")
    assert varcorr[["grp", "var1"]].to_numpy().tolist() == single.varcorr[["grp", "var1"]].to_numpy().tolist()
    assert len(batch.varcorr) == 3 and batch.varcorr.query("dataset == 'one'")["mean"].isna().all()
    tables = {"fixef": (batch.fixef.query("dataset == 'bcg'"), single.fixef), "varcorr": (varcorr, single.varcorr),
              "ranef": (batch.ranef.query("dataset == 'bcg'"), single.ranef)}
    assert tables["ranef"][0].grp.tolist() == single.ranef.grp.tolist()
    for table, (ours, theirs) in tables.items():
        z = (ours["mean"].to_numpy() - theirs["mean"].to_numpy()) / np.hypot(ours["mcse_mean"].to_numpy(),
                                                                               theirs["mcse_mean"].to_numpy())
        assert np.max(np.abs(z)) < Z_MAX, (table, z)
    # posterior sds of tau, beta and b, in sd-MCSE units
    draws = batch.draws["bcg"]
    pairs = ((draws["sd"], single.varcorr_draws()),
             (draws["beta"], single.beta_draws), (draws["b"][..., 0], single.ranef_draws()))
    for ours, theirs in pairs:
        spread = [x.reshape(-1, x.shape[-1]).std(axis=0, ddof=1) for x in (ours, theirs)]
        z = (spread[0] - spread[1]) / np.hypot(sd_mcse(ours), sd_mcse(theirs))
        assert np.max(np.abs(z)) < Z_MAX, z


def test_bayes_batch_known_sds_are_checked():
    data = {"a": frame(BCG), "b": frame(BCG).iloc[:9]}
    with pytest.raises(hp.ArgumentError, match="either se"):
        hp.bayes_batch(BCG_FORMULA, data, se="se", weights="se")
    with pytest.raises(hp.ArgumentError, match="prior 'sigma' given"):
        hp.bayes_batch(BCG_FORMULA, data, se="se", priors={"sigma": dist.HalfNormal(1.0)})


def test_predictive_draws_of_new_rows_read_their_se_column(bcg_posteriors):
    """brms's se() read from new data: predictive draws for rows given as newdata, with their se column, are the
    fitted rows' (the same seed draws the same noise); a column missing or not positive is refused by name (new rows
    were refused whatever they carried)."""
    post = bcg_posteriors[0]
    data = frame(BCG)
    np.testing.assert_allclose(post.predict(data, kind="predictive", seed=5).to_numpy(),
                               post.predict(kind="predictive", seed=5).to_numpy(), rtol=1e-12)
    # the predictive variance is the mean's plus se^2: tripling se adds 8 se^2 (a column read but not used, or used
    # as a variance, fails).  1000 draws: each row's sd to about 2.2%; the largest of 13 rows' errors reached 6% over
    # seeds 5-7
    mean_sd = post.predict(data, kind="mean")["sd"].to_numpy()
    for factor in (1.0, 3.0):
        se = data["se"].to_numpy() * factor
        got = post.predict(data.assign(se=se), kind="predictive", seed=5)["sd"].to_numpy()
        np.testing.assert_allclose(got, np.sqrt(mean_sd**2 + se**2), rtol=0.1)
    with pytest.raises(hp.HierpoolError, match="'se'"):
        post.predict(data.drop(columns="se"), kind="predictive")
    with pytest.raises(hp.HierpoolError, match="se column 'se' of the prediction data"):
        post.predict(data.assign(se=-1.0), kind="predictive")
    fit = hp.lmm(BCG_FORMULA, data, se="se")
    np.testing.assert_allclose(fit.predict(data, interval="prediction").to_numpy(),
                               fit.predict(interval="prediction").to_numpy(), rtol=1e-12)
    # the closed form reads newdata's se too: a prediction's variance is the confidence one plus se^2 (tripled se: 9x)
    confidence = fit.predict(data, interval="confidence")["se"].to_numpy()
    tripled = fit.predict(data.assign(se=3 * data["se"]), interval="prediction")["se"].to_numpy()
    np.testing.assert_allclose(tripled**2, confidence**2 + 9 * data["se"].to_numpy() ** 2, rtol=1e-10)


def test_a_batch_with_known_sds_fits_a_dataset_with_as_many_rows_as_fixed_effects_as_hp_lmm_does():
    # known residual sds leave no residual variance to estimate: hp.lmm(se=) fits 3 rows with 3 fixed effects by ML,
    # where the batch refused them ("3 observations for 3 fixed effects": review).  By REML no error contrast is
    # left: the criterion is flat in theta, and hp.lmm's converged flag and the batched search's stop were decided by
    # rounding (about a third of such datasets converged at theta's start, another third on another machine; the
    # batch's row converged after no step, or stopped on a NaN step and took hp.lmm's refit): now refused by name,
    # in hp.lmm and in the batch's row
    rng = np.random.default_rng(1)
    frames = [pd.DataFrame({"g": np.resize([f"g{i}" for i in range(groups)], n), "x": rng.normal(size=n),
                            "w": rng.normal(size=n), "y": rng.normal(size=n), "se": rng.uniform(0.5, 1.5, n)})
              for n, groups in ((20, 5), (3, 2))]
    words = r"REML with known residual sds \(se=\) and 3 observations for 3 fixed effects .* \(reml=False\)"
    with pytest.raises(hp.DataError, match=words):
        hp.lmm("y ~ x + w + (1 | g)", frames[1], se="se")
    batch = hp.fit_batch("y ~ x + w + (1 | g)", frames, se="se", progress=False)
    assert re.match(words, batch.messages.iloc[1]) and not batch.converged.iloc[1] and not batch.refit.iloc[1]
    assert np.isnan(batch.objective.iloc[1]) and np.isnan(batch.fixef.iloc[1]).all()
    assert batch.converged.iloc[0] and not batch.messages.iloc[0]
    single = hp.lmm("y ~ x + w + (1 | g)", frames[0], se="se")
    assert batch.objective.iloc[0] == pytest.approx(single.objective, rel=1e-8)
    # two terms, and a shared design's responses: the same refusal
    two = frames[1].assign(h=["a", "b", "a"])
    for call in (lambda: hp.fit_batch("y ~ x + w + (1 | g) + (1 | h)", [frames[0].assign(h="a"), two], se="se",
                                      progress=False).messages.iloc[1],
                 lambda: hp.fit_batch("y ~ x + w + (1 | g)", frames[1], responses=rng.normal(size=(3, 2)), se="se",
                                      progress=False).messages.iloc[0]):
        assert re.match(words, call())
    # by ML the criterion is not flat: fitted, batched
    ml = hp.fit_batch("y ~ x + w + (1 | g)", frames, se="se", reml=False, progress=False)
    single_ml = hp.lmm("y ~ x + w + (1 | g)", frames[1], se="se", reml=False)
    assert not ml.messages.iloc[1] and not ml.refit.iloc[1]
    assert ml.objective.iloc[1] == pytest.approx(single_ml.objective, rel=1e-8)
    np.testing.assert_allclose(ml.fixef.iloc[1], single_ml.fixef, rtol=1e-6)


def _review_dataset(index: int) -> pd.DataFrame:
    """Dataset ``index`` of the forty-third session's second review's generator: y ~ x + (1 | g) [+ (0 + x | g) +
    (1 | h)] data, groups and rows drawn, weights (or 1 / se^2) even or uneven at scales 1e-6 .. 1e9."""
    rng = np.random.default_rng(43)
    for i in range(index + 1):
        scale, uneven = [1e-6, 1e-3, 1.0, 1e3, 1e6, 1e9][i // 6], i % 2 == 1
        n_groups, per = int(rng.integers(8, 25)), int(rng.integers(4, 12))
        n = n_groups * per
        g, h, x = np.repeat(np.arange(n_groups), per), rng.integers(0, 6, n), rng.normal(size=n)
        w = (np.exp(rng.normal(scale=3, size=n)) if uneven else rng.uniform(0.5, 2, n)) * scale
        e = rng.normal(size=n) / np.sqrt(w / np.exp(np.mean(np.log(w))))
        y = (1 + 0.5 * x + rng.normal(size=n_groups)[g] * rng.choice([0.05, 0.5, 1])
             + rng.normal(size=n_groups)[g] * x * rng.choice([0, 0.3]) + rng.normal(size=6)[h] * 0.4 + e)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g], "h": [f"h{v}" for v in h], "se": 1 / np.sqrt(w)})


def test_known_sds_keep_theta_in_the_responses_units():
    """With known residual sds sigma is 1 and theta an sd in the response's units, whose optimum may lie far from the
    sds' size: with sds of ~30 (weights of ~1e-3) and noise of ~1, searched in the sds' units alone (start and
    probes), y ~ x + (1 | g) + (0 + x | g) + (1 | h) ended at theta = 0, REML 1.64 above the optimum, reported
    converged (the forty-third session's second review, its dataset 11); hp.lmm's probes off the boundary go out in
    the response's units too."""
    data = _review_dataset(11)
    formula = "y ~ x + (1 | g) + (0 + x | g) + (1 | h)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.lmm(formula, data, se="se")
    batch = hp.fit_batch(formula, [data], se="se", progress=False)
    assert single.objective == pytest.approx(1190.8021172, rel=1e-9)
    assert single.objective == pytest.approx(batch.objective.iloc[0], rel=1e-9)


def test_known_sds_search_off_the_boundary_in_their_units_too():
    """...and an optimum near the known sds' size is found too: a meta-analysis of 10 studies in 3 regions, known sds
    0.1-0.6, between-study sd 0.034.  hp.lmm's probes off theta = 0 in the columns' units alone (0.05 and 0.5) both
    went on to theta = 0 and stopped there, 0.0079 above the optimum, reported converged (the fifty-first session's
    review); the batch's search found it, and so does the model without the region term it reduces to."""
    rng = np.random.default_rng(60)
    rows = []
    for study in range(10):
        effect = rng.normal(0, 0.3)
        for _ in range(rng.integers(1, 4)):
            se, x = rng.uniform(0.1, 0.6), rng.normal()
            rows.append({"study": f"S{study}", "region": f"R{study % 3}", "x": x, "se": se,
                         "y": 0.5 + 0.2 * x + effect + rng.normal(0, se)})
    data = pd.DataFrame(rows)
    formula = "y ~ x + (1 | study) + (1 | region)"
    with pytest.warns(hp.ConvergenceWarning, match="boundary"):  # the region's sd is 0 (lme4's singular fit)
        single = hp.lmm(formula, data, se="se")
    batch = hp.fit_batch(formula, [data], se="se", progress=False)
    one_term = hp.lmm("y ~ x + (1 | study)", data, se="se")
    assert single.objective == pytest.approx(one_term.objective, rel=1e-10)
    assert single.objective == pytest.approx(batch.objective.iloc[0], rel=1e-9)
    assert single.theta[0] == pytest.approx(0.0345, abs=5e-4) and single.theta[1] == 0.0


def test_a_batch_with_known_sds_starts_in_their_units():
    """fit_batch started known-sd searches at lme4's identity, theta = 1 in the response's units: a meta-analysis
    with sds of ~1e-4 and a slope, `(1 + x | study)`, stopped near it, reported converged, REML -63.6 where hp.lmm's
    is -330.8 (the fifty-first session's review; 7 of 20 such datasets).  Started at the identity in the sds' units
    (their geometric mean, in whole decades), it reaches hp.lmm's optimum."""
    rng = np.random.default_rng(2003)
    tau = 10 ** rng.uniform(-2, 0.3)
    tau_region = 10 ** rng.uniform(-2, 0.0) * (rng.random() < 0.5)
    tau_x = 10 ** rng.uniform(-2, 0.0)
    region = rng.normal(0, tau_region, 3)
    rows = []
    for study in range(int(rng.integers(6, 14))):
        effect, slope = rng.normal(0, tau), rng.normal(0, tau_x)
        for _ in range(int(rng.integers(1, 5))):
            se, x = 10 ** rng.uniform(-1.0, -0.2), rng.normal()
            rows.append({"study": f"S{study}", "x": x, "se": se * 1e-3,
                         "y": 1e-3 * (0.5 + (0.2 + slope) * x + effect + region[study % 3] + rng.normal(0, se))})
    data = pd.DataFrame(rows)
    formula = "y ~ x + (1 + x | study)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        single = hp.lmm(formula, data, se="se")
    batch = hp.fit_batch(formula, [data, data.assign(y=data["y"] * 2)], se="se", progress=False)
    assert single.objective == pytest.approx(-330.78018, abs=1e-4)
    assert batch.objective.iloc[0] == pytest.approx(single.objective, rel=1e-9) and batch.converged.iloc[0]


def test_known_sd_fits_scale_with_the_response():
    """y and se both times c leave the model as it is with theta, beta and the BLUPs times c and -2 log L up by
    2 n log c (ML): the known sds' fits are searched and judged in their units.  At c = 1e-4 a (1 + x | study)
    meta-analysis ended in hp.lmm 0.44 above its own fit at c = 1 (a boundary optimum), and lme4's singular
    tolerance 1e-4, taken in the response's units, called the batch's fit singular there (between-study sds of
    ~3e-5 beside known sds of ~3e-5); 99 of 480 flags moved with the scale in the fifty-second session's scan."""
    rng = np.random.default_rng(18)
    rows, tau, tau_x = [], rng.choice([0.02, 0.1, 0.3, 1.0]), rng.choice([0.0, 0.05, 0.3])
    for study in range(int(rng.integers(6, 14))):
        effect, slope = rng.normal(0, tau), rng.normal(0, tau_x + 1e-300)
        for _ in range(int(rng.integers(1, 4))):
            se, x = rng.uniform(0.1, 0.6), rng.normal()
            rows.append({"study": f"S{study}", "x": x, "se": se,
                         "y": 0.5 + (0.2 + slope) * x + effect + rng.normal(0, se)})
    data = pd.DataFrame(rows)
    formula, c = "y ~ x + (1 + x | study)", 1e-4
    small = data.assign(y=data["y"] * c, se=data["se"] * c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = [hp.lmm(formula, frame, se="se", reml=False) for frame in (data, small)]
    batch = hp.fit_batch(formula, [data, small], se="se", reml=False, progress=False)
    assert fits[1].objective == pytest.approx(fits[0].objective + 2 * len(data) * np.log(c), rel=1e-9)
    np.testing.assert_allclose(fits[1].theta / c, fits[0].theta, rtol=1e-6)
    np.testing.assert_allclose(fits[1].fixef / c, fits[0].fixef, rtol=1e-6)
    assert not fits[0].is_singular and not fits[1].is_singular and fits[1].converged
    np.testing.assert_allclose(batch.objective, [fit.objective for fit in fits], rtol=1e-9)
    np.testing.assert_allclose(batch.theta[1] / c, fits[0].theta, rtol=1e-6)
    assert not batch.is_singular.any()


def test_a_scalar_terms_scan_runs_in_the_prior_weights_units():
    """hp.lmm scans a scalar term's criterion after its search (one_term.SCALAR_SCAN, for a second minimum); with
    prior weights of ~1e9 (theta's unit 3.2e-5) the scan's 1e-3 .. 100 in absolute theta missed a minimum at
    theta 5.8e-7, and the search ended at theta = 0, REML 0.18 above it, reported converged (the fifty-second
    session's scan of the review datasets); fit_batch's Newton search reached it."""
    data = _review_dataset(31).assign(w=lambda frame: 1 / frame["se"] ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (theta below lme4's singular tolerance)
        single = hp.lmm("y ~ x + (1 | g)", data, weights="w")
    batch = hp.fit_batch("y ~ x + (1 | g)", [data], weights="w", progress=False)
    assert single.objective == pytest.approx(270.4512020, abs=1e-6)
    assert single.objective == pytest.approx(batch.objective[0], rel=1e-9)
    assert single.theta[0] == pytest.approx(5.83e-7, rel=1e-3)


def test_prior_weights_times_c_move_the_boundary_probes_with_the_optimum():
    """y ~ x + (1 + x | g) by ML with weights of ~1e6 (the review's dataset 31 times 1e-3): hp.lmm's search ended on the
    face T_11 = 0, 0.0053 above the optimum on the face of correlation -1 it reached with the same weights times 10
    or 1e3, reported converged: its full-rank probes off that face had a floor in theta's own units (at 70 of the
    weights' units), and escaped by chance at other scales.  Now in the units, with the rank-reduced ones of
    correlation +-0.9 (linalg.full_rank_probes): the same optimum at every scale, as fit_batch's (the fifty-fifth
    session)."""
    data = _review_dataset(31).assign(w=lambda frame: 1 / frame["se"] ** 2)
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        for c in (1e-3, 1e-2):
            fits.append(hp.lmm("y ~ x + (1 + x | g)", data.assign(w=data["w"] * c), reml=False, weights="w"))
    batch = hp.fit_batch("y ~ x + (1 + x | g)", [data.assign(w=data["w"] * 1e-3)], reml=False, weights="w",
                         progress=False)
    assert fits[0].objective == pytest.approx(257.7850691255, abs=1e-6)
    assert fits[0].objective == pytest.approx(fits[1].objective, rel=1e-12)
    assert fits[0].objective == pytest.approx(batch.objective[0], rel=1e-12)
    np.testing.assert_allclose(fits[0].theta * np.sqrt(1e-3), fits[1].theta * np.sqrt(1e-2), rtol=1e-4, atol=1e-9)


def test_a_batch_searches_a_linear_models_theta_over_its_prior_weights_unit():
    """fit_batch searched a weighted linear model's theta in absolute units: with weights of ~1e9 (theta's unit
    3.2e-5) y ~ x + (1 + x | g) + (1 | h) (the review's dataset 32), batched beside dataset 13 (weights ~1, uneven),
    ended on the criterion's far plateau (theta over the unit up to 21,000), REML 145 above hp.lmm's fit, reported
    converged; alone its search stopped short and hp.lmm refitted it.  Searched over the weights' unit
    (batch.conditioning, as with known sds), it ends at hp.lmm's fit with no refit, and dataset 31's (1 + x | g) by ML
    at its optimum, not 7.6e-4 above it (the fifty-fifth session)."""
    frames = [_review_dataset(i).assign(w=lambda frame: 1 / frame["se"] ** 2) for i in (32, 13)]
    formula = "y ~ x + (1 + x | g) + (1 | h)"
    batch = hp.fit_batch(formula, frames, weights="w", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        singles = [hp.lmm(formula, frame, weights="w") for frame in frames]
    np.testing.assert_allclose(batch.objective, [fit.objective for fit in singles], rtol=1e-9)
    assert not batch.refit.any() and batch.converged.all()
    assert batch.objective[0] == pytest.approx(219.5157321517, abs=1e-6)
    np.testing.assert_allclose(batch.theta[0], singles[0].theta, rtol=1e-5)
    assert list(batch.is_singular) == [fit.is_singular for fit in singles]
    slopes = _review_dataset(31).assign(w=lambda frame: 1 / frame["se"] ** 2)
    one_term = hp.fit_batch("y ~ x + (1 + x | g)", [slopes], reml=False, weights="w", progress=False)
    assert one_term.objective[0] == pytest.approx(257.7850691255, abs=1e-6)


def _weighted_slopes_dataset(seed: int, scale: float) -> pd.DataFrame:
    """The fifty-fifth session's review's generator: 6-15 groups of 4-8 rows in 5 crossed levels, uneven prior
    weights exp(N(0, 2)) times ``scale`` (the same data at every scale)."""
    rng = np.random.default_rng(seed)
    n_groups, per = int(rng.integers(6, 16)), int(rng.integers(4, 9))
    n = n_groups * per
    g, h, x = np.repeat(np.arange(n_groups), per), rng.integers(0, 5, n), rng.normal(size=n)
    w = np.exp(rng.normal(scale=2, size=n)) * scale
    e = rng.normal(size=n) / np.sqrt(w / np.exp(np.mean(np.log(w))))
    y = (1 + 0.5 * x + rng.normal(size=n_groups)[g] * rng.choice([0.02, 0.1, 0.5])
         + rng.normal(size=n_groups)[g] * x * rng.choice([0, 0.05, 0.3]) + rng.normal(size=5)[h] * rng.choice([0.02, 0.4])
         + e)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v:02d}" for v in g], "h": [f"h{v}" for v in h], "w": w})


def test_a_batchs_several_term_start_moves_with_the_prior_weights_unit():
    """The several-term start's floor (plan.term_moments) was scaled by the columns' own root-mean-square, which a
    dataset searched over its weights' unit has times that unit: the start over the unit moved with the weights
    (1e-4 at weights times 1e-6, 1e3 at times 1e8), and y ~ x + (1 + x | g) + (1 | h) by ML ended 0.064 above
    hp.lmm's fit at weights times 1e-6 and 1e-2, on the boundary, "singular", reported converged (the fifty-fifth
    session's review).  Now the same start, and fit, at every scale."""
    formula = "y ~ x + (1 + x | g) + (1 | h)"
    frames = [_weighted_slopes_dataset(2003, scale) for scale in (1e-6, 1e-2, 1.0, 1e8)]
    batch = hp.fit_batch(formula, frames, weights="w", reml=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.lmm(formula, frames[2], weights="w", reml=False)
    np.testing.assert_allclose(batch.objective, single.objective, rtol=1e-10)
    # (lme4's rule reads the user's theta: at weights times 1e8 theta is 1e-4 times smaller, and singular by it)
    assert not batch.refit.any() and not batch.is_singular[:3].any() and not single.is_singular


def _uneven_sds_dataset(index: int, seed: int = 0) -> pd.DataFrame:
    """Dataset ``index`` of the fifty-fifth session's scan: 6-13 studies of 1-3 rows in 4 regions, known sds
    10^U(-3, 1) (4 decades), between-study and between-region sds 10^U(-3.5, 0) (or none between regions)."""
    rng = np.random.default_rng(seed)
    for _ in range(index + 1):
        n_g, per = int(rng.integers(6, 14)), int(rng.integers(1, 4))
        n = n_g * per
        g, h = np.repeat(np.arange(n_g), per), rng.integers(0, 4, n)
        se, x = 10 ** rng.uniform(-3, 1, n), rng.normal(size=n)
        tau_g, tau_h = 10 ** rng.uniform(-3.5, 0), rng.choice([0, 10 ** rng.uniform(-3.5, 0)])
        y = 0.2 + 0.3 * x + rng.normal(size=n_g)[g] * tau_g + rng.normal(size=4)[h] * tau_h + rng.normal(size=n) * se
    return pd.DataFrame({"y": y, "x": x, "se": se, "g": [f"g{v}" for v in g], "h": [f"h{v}" for v in h]})


def test_a_minimum_nearer_the_boundary_than_the_probes_is_searched_from_below_the_boundary():
    """Known sds of 1e-3 to 10 put y ~ x + (1 | g) + (1 | h)'s REML minimum at theta_h = 0.0025 (0.025 of the sds'
    unit); hp.lmm's search went from its start onto theta = (0, 0), and from each probe off it (0.05 and 0.5 of
    the units, above the boundary's criterion) stepped over the minimum back onto it: REML 0.38 above fit_batch's,
    reported converged (in 9 of 720 fits of the fifty-fifth session's scan, 0.0003 to 2.9 above).  The criterion
    read along each element at 0 (linalg.boundary_axis_points) starts a search below the boundary's criterion."""
    data = _uneven_sds_dataset(26)
    formula = "y ~ x + (1 | g) + (1 | h)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        single = hp.lmm(formula, data, se="se")
    batch = hp.fit_batch(formula, [data], se="se", progress=False)
    assert single.objective == pytest.approx(-28.315052279, abs=1e-6)
    assert single.objective == pytest.approx(batch.objective[0], rel=1e-9)
    assert single.theta[0] == 0.0 and single.theta[1] == pytest.approx(0.0024983, rel=1e-3)


@pytest.mark.parametrize("seed, index, objective, theta", [(2, 26, 3.2209653714, (0.0, 0.548488)),
                                                            (3, 10, 12.2189506883, (0.0833642, 0.0))])
def test_minima_on_two_faces_are_both_searched(seed, index, objective, theta):
    """Known sds of 1e-3 to 10 gave y ~ x + (1 | g) + (1 | h) by ML minima on two faces, the criterion rising off
    each: (seed 2) hp.fit_batch ended at (theta_g, theta_h) = (0.14, 0), 5.6 above hp.lmm's (0, 0.55), and no probe
    of its face left it: linalg.other_face_starts; (seed 3) hp.lmm ended at (0, 0), 0.22 above fit_batch's (0.083,
    0), its scan along theta_g stopped where the criterion first rose off 0 (it falls again further out): the whole
    scans (MixedModel._axis_minima).  2 and 1 of 1,680 fits of the fifty-fifth session's scan (seeds 0-6)."""
    data = _uneven_sds_dataset(index, seed)
    formula = "y ~ x + (1 | g) + (1 | h)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        single = hp.lmm(formula, data, se="se", reml=False)
    batch = hp.fit_batch(formula, [data], se="se", reml=False, progress=False)
    assert single.objective == pytest.approx(objective, abs=1e-8)
    assert batch.objective[0] == pytest.approx(single.objective, rel=1e-9)
    np.testing.assert_allclose(single.theta, theta, rtol=1e-5, atol=1e-12)


def test_known_sds_far_below_the_noise_start_at_the_between_study_spread():
    """Searched over the known sds' unit, sds 30,000 times below the response's noise put the optimum at theta over
    it of ~36,000: from 1, hp.lmm's search took 550 evaluations; from sqrt(Q / (n - p) - 1) (equal sds) it ended 38
    above, unconverged (the review's dataset 33, sds uneven).  DerSimonian and Laird's estimate starts both engines
    near it (algebra.start.known_sds_size)."""
    data = _review_dataset(33)
    single = hp.lmm("y ~ x + (1 | g)", data, se="se")
    batch = hp.fit_batch("y ~ x + (1 | g)", [data], se="se", progress=False)
    assert single.converged and batch.converged[0]
    assert single.objective == pytest.approx(192815492295.7252, abs=0.01)
    # (a criterion of 1.9e11: the two within 2.2e-3 with OpenBLAS's Haswell kernels, 1e-14 relative; the failure
    # was 38 above)
    assert batch.objective[0] == pytest.approx(single.objective, rel=1e-12)


def test_a_shared_design_with_known_sds_fits_several_terms():
    """responses= with se= and several terms: the start read each dataset's rows of a long frame
    (``plan.dataset``), which a shared design has not, and raised a TypeError (the fifty-first session's code)."""
    rng = np.random.default_rng(3)
    n = 40
    data = pd.DataFrame({"g": rng.integers(0, 8, n).astype(str), "h": rng.integers(0, 5, n).astype(str),
                         "x": rng.normal(size=n), "se": rng.uniform(0.1, 0.5, n) * 1e-3})
    responses = np.stack([1e-3 * (rng.normal(size=8)[data["g"].astype(int)] * 0.3 + data["x"] + rng.normal(size=n))
                          for _ in range(3)], axis=1)
    formula = "y ~ x + (1 | g) + (1 | h)"
    batch = hp.fit_batch(formula, data.assign(y=responses[:, 0]), responses=responses, se="se", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (boundary fits)
        singles = [hp.lmm(formula, data.assign(y=responses[:, j]), se="se") for j in range(3)]
    np.testing.assert_allclose(batch.objective, [fit.objective for fit in singles], rtol=1e-9)
    assert list(batch.is_singular) == [fit.is_singular for fit in singles]


def test_known_sds_of_1e_9_to_1e_5_probe_in_the_responses_own_spread():
    """The second unit of hp.lmm's probes off the boundary (beside the sds') was theta = 1 in the response's units:
    with y and se in 1e-6 of theirs (sds 1e-9 .. 9e-6, uneven) those probes sat at 5e5 times the sds, where the
    criterion is lost to rounding (-47,000 with a NaN gradient), and the search kept it: REML 1013 above fit_batch's,
    reported converged (the fifty-second session's review).  The unit is now the residuals' spread, and a point
    whose gradient is not finite is no criterion."""
    rng = np.random.default_rng(2)
    g, _ = np.repeat(np.arange(30), 3), rng.integers(0, 5, 90)
    x, se = rng.normal(size=90), np.exp(rng.uniform(np.log(1e-3), np.log(10), 90))
    _ = rng.normal(size=30), rng.normal(size=30), rng.normal(size=5)  # (the review generator's effects, all 0 here)
    y = 0.5 + 0.2 * x + rng.normal(size=90) * se
    data = pd.DataFrame({"y": y * 1e-6, "x": x, "se": se * 1e-6, "g": [f"g{i}" for i in g]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        single = hp.lmm("y ~ x + (1 + x | g)", data, se="se")
    batch = hp.fit_batch("y ~ x + (1 + x | g)", [data], se="se", progress=False)
    assert single.objective == pytest.approx(batch.objective[0], rel=1e-9)
    unscaled = hp.fit_batch("y ~ x + (1 + x | g)", [data.assign(y=y, se=se)], se="se", progress=False)
    assert single.objective == pytest.approx(unscaled.objective[0] + 2 * 88 * np.log(1e-6), rel=1e-9)


def test_both_engines_take_the_same_unit_and_rule_for_a_conditioned_slope():
    """sds all 10^1.75 put the weights' mean log10 at -3.5, which hp.lmm's sum and the batch's rounded to different
    decades (units 31.6 and 100); and a slope on x ~ 3000 is searched on its column scaled (hp.lmm's conditioning),
    whose theta hp.lmm's singular rule read, where the batch reads the user's: a slope sd of 0.0061 was singular in
    the batch and not in hp.lmm (the fifty-second session's review).  Both now read the user's theta over one unit."""
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(40), 6)
    x, se = rng.normal(size=240) * 3000, np.full(240, 10**1.75)
    y = 1 + 0.01 * x + rng.normal(0, 0.0065, 40)[g] * x + rng.normal(size=240) * se
    data = pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "se": se})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a boundary fit)
        single = hp.lmm("y ~ x + (0 + x | g)", data, se="se")
    batch = hp.fit_batch("y ~ x + (0 + x | g)", [data], se="se", progress=False)
    assert single.objective == pytest.approx(batch.objective[0], rel=1e-9)
    assert single.theta[0] == pytest.approx(0.00608, rel=1e-3)
    assert single.is_singular and batch.is_singular[0]  # 0.0061 / 100 below lme4's 1e-4
