"""hp.bayes_batch with several random-effect terms, or AR(1) residuals: a padded system's target is the dataset's
own, exactly, and each dataset's posterior is the one hp.bayes samples, in Monte Carlo units."""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import compare_posteriors

import hierpool as hp
from hierpool.algebra import marginal
from hierpool.algebra.system import build_system
from hierpool.batch.bayes_terms import term_chunks
from hierpool.batch.plan import plan_batch

# crossed, a correlated slope (k = 2, LKJ) on one term and a scalar on the other, prior weights
SLOPES = "diameter ~ x + (1 + x | plate) + (1 | sample)"
DRAWS = 200
Z_MAX = 4.0


@pytest.fixture(scope="module")
def frames():
    """Three Penicillin-shaped datasets with a plate-level slope in x: 0 whole, 1 without plate c (its plate
    levels padded, fewer rows), 2 a single sample (unfittable: it keeps its reason in its row)."""
    pen = hp.datasets.penicillin()
    rng = np.random.default_rng(4)
    sims = hp.simulate(hp.lmm("diameter ~ 1 + (1 | plate) + (1 | sample)", pen), 3, seed=7).to_numpy()
    plates = pen["plate"].astype(str).to_numpy()
    out = []
    for j in range(3):
        slope = dict(zip(np.unique(plates), rng.normal(0.0, 0.6, len(np.unique(plates)))))
        x = rng.normal(size=len(pen))
        frame = pen.assign(x=x, diameter=sims[:, j] + (0.5 + np.vectorize(slope.get)(plates)) * x,
                           w=rng.uniform(0.5, 2.0, len(pen)))
        if j == 1:
            frame = frame[frame["plate"] != "c"]
        if j == 2:
            frame = frame[frame["sample"] == "A"]
        out.append(frame.reset_index(drop=True))
    return out


@pytest.fixture(scope="module")
def posterior(frames):
    return hp.bayes_batch(SLOPES, frames, by="rep", draws=DRAWS, tune=DRAWS, seed=1, weights="w", keep_draws=True,
                          progress=False)


def test_padded_system_has_the_datasets_own_marginal_likelihood(frames):
    # dataset 1 lacks plate c: in the batch its plate levels are padded to dataset 0's count
    plan = plan_batch(SLOPES, frames, "rep", "test", "hp.bayes", weights="w", one_term=False)
    messages, parts = term_chunks(plan, lambda count: count, 1)
    assert messages[:2] == ["", ""] and "grouping factor 'plate' has 24 levels for 24 observations" in messages[2]
    (chunk, members, (systems, n)), = parts
    row = list(members).index(1)
    padded = jax.tree_util.tree_map(lambda a: jnp.asarray(a[row]), systems)
    assert padded.layout.n_levels[0] > 23  # padded beyond the dataset's 23 plates
    design = hp.bayesian.fit.build_design(SLOPES, frames[1], weights="w")
    own = build_system(design)
    assert [t.group for t in design.terms] == ["plate", "sample"]  # the batch's order: theta means the same
    rng = np.random.default_rng(2)
    loc, scale = jnp.asarray([20.0, 0.0]), jnp.asarray([5.0, np.inf])
    batched_at = jax.jit(lambda t, s, system, rows: marginal.log_marginal_likelihood(t, s, system, loc, scale, rows))
    own_at = jax.jit(lambda t, s, system: marginal.log_marginal_likelihood(t, s, system, loc, scale))
    for _ in range(3):
        theta, sigma = jnp.asarray(rng.uniform(0.1, 2.0, 4)), jnp.asarray(rng.uniform(0.5, 2.0))
        assert float(batched_at(theta, sigma, padded, n[row])) == pytest.approx(float(own_at(theta, sigma, own)),
                                                                              rel=1e-11)
    assert float(n[row]) == own.layout.n


def _mcse_sd(draws):
    return az.mcse(az.convert_to_dataset(draws), method="sd")["x"].values


def test_posteriors_equal_hp_bayes_per_dataset(frames, posterior):
    batch = posterior
    diagnostics = batch.diagnostics
    assert list(diagnostics.message[:2]) == ["", ""]
    assert "grouping factor 'plate' has 24 levels for 24 observations" in diagnostics.message.iloc[2]
    for table in ("fixef", "varcorr", "ranef"):
        assert getattr(batch, table).query("rep == 2")["mean"].isna().all()
    assert (diagnostics.divergences[:2] == 0).all() and (diagnostics.max_r_hat[:2] < 1.02).all()
    tables = (("fixef", ["term"]), ("varcorr", ["grp", "var1", "var2"]), ("ranef", ["grpvar", "term", "grp"]))
    for label in (1,):  # the padded dataset (dataset 0 runs in the same program, unpadded)
        single = hp.bayes(SLOPES, frames[label], draws=DRAWS, tune=DRAWS, seed=11 + label, weights="w",
                          progress=False)
        compare_posteriors(batch, single, label, tables)
        # the posterior sds of the plate slopes, in sd-MCSE units
        draws = batch.draws[label]["b"][0][..., 1]  # (chain, draw, ell): the plate term's x coefficient
        ours_sd = draws.reshape(-1, draws.shape[-1]).std(axis=0, ddof=1)
        theirs = single.ranef.query("grpvar == 'plate' and term == 'x'")
        z_sd = (ours_sd - theirs["sd"].to_numpy()) / np.hypot(_mcse_sd(draws), _mcse_sd(single.term_draws(0)[..., 1]))
        assert np.max(np.abs(z_sd)) < Z_MAX, (label, np.max(np.abs(z_sd)))


def test_results_name_every_term(frames, posterior):
    batch = posterior
    assert [(t.group, t.coef_names) for t in batch.terms] == [("plate", ("Intercept", "x")),
                                                               ("sample", ("Intercept",))]
    assert [len(levels) for levels in batch.terms[0].levels] == [24, 23, 24]
    assert "c" not in set(batch.ranef.query("rep == 1 and grpvar == 'plate'")["grp"])
    kept = batch.draws[1]
    assert kept["b"][0].shape == (4, DRAWS, 23, 2) and kept["b"][1].shape == (4, DRAWS, 6, 1)
    assert kept["cor"][1] is None and kept["cor"][0].shape == (4, DRAWS, 2, 2)
    varcorr = batch.varcorr.query("rep == 0")
    assert list(varcorr["grp"]) == ["plate", "plate", "plate", "sample", "Residual"]
    with pytest.raises(AttributeError, match="result.terms"):
        batch.group
    assert isinstance(batch.ranef, pd.DataFrame) and batch.ranef["rep"].is_monotonic_increasing


def test_ar1_residuals_sample_each_datasets_hp_bayes_posterior():
    # two noisy sleepstudy replicates, one without a subject (padded rows and levels), one whose series hp.lmm
    # refuses (a repeated day): each posterior, phi's included, is hp.bayes's in Monte Carlo units
    sleep = hp.datasets.sleepstudy()
    rng = np.random.default_rng(8)
    frames = [sleep.assign(Reaction=sleep["Reaction"] + rng.normal(0, 25, len(sleep))) for _ in range(3)]
    frames[1] = frames[1][frames[1]["Subject"] != frames[1]["Subject"].iloc[0]]
    frames[2] = frames[2].assign(Days=frames[2]["Days"].where(frames[2].index != 1, 0))
    formula, structure = "Reaction ~ Days + (1 | Subject)", hp.ar1("Subject", time="Days")
    batch = hp.bayes_batch(formula, frames, by="rep", draws=DRAWS, tune=DRAWS, seed=2, correlation=structure,
                           keep_draws=True, progress=False)
    assert "repeats the value" in batch.diagnostics.message.iloc[2] and np.isnan(batch.phi["mean"].iloc[2])
    assert batch.draws[1]["phi"].shape == (4, DRAWS) and batch.draws[1]["b"].shape == (4, DRAWS, 17, 1)
    single = hp.bayes(formula, frames[1], draws=DRAWS, tune=DRAWS, seed=5, correlation=structure, progress=False)
    # varcorr: the (Residual, phi) row too
    compare_posteriors(batch, single, 1, (("fixef", ["term"]), ("varcorr", ["grp", "var1"])))


def test_car1_residuals_sample_the_same_posterior_in_days_and_minutes_and_a_phi_beyond_a_float_keeps_its_reason():
    # each dataset's phi is sampled per its own median lag, as hp.bayes's: the same data timed in days and in minutes
    # have one posterior in Monte Carlo units (phi per minute^1440 = phi per day); timed in units 1e-7 of a day, where
    # a draw's phi per unit underflows, the dataset keeps hp.bayes's refusal in its row and its phi unreported
    from test_ar1_bayes import _irregular_series

    data = _irregular_series(per=4)  # short series: phi's posterior is much its prior's, which a unit would change
    repeated = data.assign(t=data["t"].where(data.index != 1, data["t"].iloc[0]))  # refused before sampling
    frames = [repeated, data, data.assign(t=data["t"] * 1440), data.assign(t=data["t"] * 1e-7)]
    batch = hp.bayes_batch("y ~ x + (1 | g)", frames, by="rep", draws=DRAWS, tune=DRAWS, seed=2,
                           correlation=hp.car1("g", "t"), keep_draws=True, progress=False)
    messages = batch.diagnostics.message
    assert "repeats the value" in messages.iloc[0] and list(messages.iloc[1:3]) == ["", ""]
    assert "beyond what a float holds" in messages.iloc[3]  # and no numbers, as the refused first
    assert batch.fixef.query("rep == 3")["mean"].isna().all() and np.isnan(batch.phi["mean"].iloc[3])
    assert set(batch.draws) == {1, 2}
    for table, names in (("fixef", ["term"]), ("varcorr", ["grp", "var1"])):
        rows = getattr(batch, table).fillna({n: "" for n in names})
        merged = rows.query("rep == 1").merge(rows.query("rep == 2"), on=names, suffixes=("", "_minutes"))
        merged = merged[merged["var1"] != "phi"] if "var1" in merged else merged
        z = (merged["mean"] - merged["mean_minutes"]) / np.hypot(merged["mcse_mean"], merged["mcse_mean_minutes"])
        assert len(merged) >= 2 and np.max(np.abs(z)) < Z_MAX, (table, z)
    per_day = [batch.draws[1]["phi"], batch.draws[2]["phi"] ** 1440]
    z = (per_day[0].mean() - per_day[1].mean()) / np.hypot(*(float(az.mcse(phi)) for phi in per_day))
    assert abs(z) < Z_MAX


def test_known_residual_sds_with_several_terms_sample_hp_bayes_posterior():
    # meta-analysis style: each row's residual sd known (se=), sigma not a parameter; one dataset padded
    pen = hp.datasets.penicillin()
    rng = np.random.default_rng(6)
    frames = [pen.assign(diameter=pen["diameter"] + rng.normal(0, 0.4, len(pen)), se=rng.uniform(0.3, 0.8, len(pen)))
              for _ in range(2)]
    frames[1] = frames[1][frames[1]["plate"] != "a"]
    formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    batch = hp.bayes_batch(formula, frames, by="rep", se="se", draws=DRAWS, tune=DRAWS, seed=2, progress=False)
    assert "Residual" not in set(batch.varcorr["grp"])
    single = hp.bayes(formula, frames[1], se="se", draws=DRAWS, tune=DRAWS, seed=7, progress=False)
    compare_posteriors(batch, single, 1, (("fixef", ["term"]), ("varcorr", ["grp", "var1"])))
