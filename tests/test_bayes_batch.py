"""hp.bayes_batch: its one-term maths against the general engine exactly, its posteriors against hp.bayes in MC units."""

import json
import os
import subprocess
import sys

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import hierpool as hp
from hierpool.batch import collapsed as one_term
from hierpool.batch import statistics
from hierpool.batch.plan import plan_batch
from hierpool.bayesian import collapsed as general
from hierpool.closedform.henderson import conditional_draw, noise_size
from hierpool.closedform.system import build_system

SLEEP = "Reaction ~ Days + (Days | Subject)"
Z_MAX = 4.0


@pytest.fixture(scope="module")
def replicates():
    data = hp.datasets.sleepstudy_replicates(3, seed=11)
    subjects = data.Subject.unique()
    # dataset 1: fewer readings; dataset 2: fewer subjects (another bucket, so padded levels)
    data = data[~((data.dataset == 1) & (data.Days > 6))]
    return data[~((data.dataset == 2) & data.Subject.isin(subjects[:7]))].reset_index(drop=True)


def one_dataset_statistics(frame, formula):
    design = hp.bayesian.fit.build_design(formula, frame)
    return design, statistics.one_dataset_statistics(design)


@pytest.mark.parametrize("formula", [SLEEP, "Reaction ~ Days + (1 | Subject)", "Reaction ~ 1 + (Days | Subject)"])
def test_marginal_likelihood_equals_general_engine(sleepstudy, formula):
    design, stats = one_dataset_statistics(sleepstudy, formula)
    system = build_system(design)
    p = design.p
    loc = jnp.asarray(np.linspace(200, 5, p))
    scale = jnp.asarray([50.0] + [np.inf] * (p - 1))  # one Normal prior, the rest flat
    rng = np.random.default_rng(0)
    k = design.terms[0].k
    for _ in range(5):
        theta = jnp.asarray(rng.uniform(0.05, 1.5, size=k * (k + 1) // 2))
        sigma = jnp.asarray(rng.uniform(10, 40))
        ours = one_term.log_marginal_likelihood(theta, sigma, stats, loc, scale)
        reference = general.log_marginal_likelihood(theta, sigma, system, loc, scale)
        assert float(ours) == pytest.approx(float(reference), rel=1e-11)


@pytest.mark.parametrize("formula", [SLEEP, "Reaction ~ Days + (1 | Subject)"])
def test_host_draws_equal_compiled_draws(sleepstudy, formula):
    # one implementation, two backends: hp.bayes draws one-term effects in NumPy on the host (many draws
    # at once, in batches), hp.bayes_batch in its compiled program (vmapped); the same noise gives the same draws
    design, stats = one_dataset_statistics(sleepstudy, formula)
    k, p, ell = design.terms[0].k, design.p, stats.zty.shape[0]
    rng = np.random.default_rng(3)
    count = 7
    sds, sigma = rng.uniform(5, 40, size=(count, k)), rng.uniform(10, 40, size=count)
    cors = None
    if k == 2:
        rho = rng.uniform(-0.9, 0.9, size=count)
        cors = np.stack([np.stack([np.ones(count), np.zeros(count)], -1), np.stack([rho, np.sqrt(1 - rho**2)], -1)], -2)
    loc, scale = np.linspace(200, 5, p), np.array([50.0] + [np.inf] * (p - 1))
    noise = rng.standard_normal((count, p + ell * k))
    thetas = general.theta_from_components([sds], [cors], sigma)
    assert isinstance(thetas, np.ndarray)
    thetas_jax = jax.vmap(lambda s, c, g: general.theta_from_components([s], [c], g))(
        jnp.asarray(sds), None if cors is None else jnp.asarray(cors), jnp.asarray(sigma))
    np.testing.assert_allclose(thetas, thetas_jax, rtol=1e-14)
    host = one_term.draw_effects(thetas, sigma, stats, loc, scale, noise, batch_size=3)  # 3 batches, the last short
    assert isinstance(host[0], np.ndarray)
    compiled = jax.jit(one_term.draw_effects, static_argnames="batch_size")(
        jnp.asarray(thetas), jnp.asarray(sigma), stats, jnp.asarray(loc), jnp.asarray(scale), jnp.asarray(noise),
        batch_size=3)
    assert host[1].shape == (count, ell, k)
    for ours, reference in zip(host, compiled):
        np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_conditional_draw_has_henderson_mean_and_covariance(sleepstudy):
    design, stats = one_dataset_statistics(sleepstudy, SLEEP)
    system = build_system(design)
    loc, scale = jnp.asarray([250.0, 0.0]), jnp.asarray([40.0, 10.0])
    theta, sigma = jnp.asarray([0.9, 0.05, 0.2]), jnp.asarray(25.0)
    ell, k, p = stats.zty.shape[0], 2, design.p
    prior = general.beta_prior_block(loc, scale, sigma, system.layout)

    def ours(noise):
        beta, b = one_term.conditional_draw(theta, sigma, stats, loc, scale, noise[:p], noise[p:].reshape(ell, k))
        return jnp.concatenate([beta, b.ravel()])

    def reference(noise):
        beta, b = conditional_draw(theta, system, sigma, noise, prior)
        return jnp.concatenate([beta, b[0].ravel()])

    mean_ours, mean_ref = ours(jnp.zeros(p + ell * k)), reference(jnp.zeros(noise_size(system.layout)))
    np.testing.assert_allclose(mean_ours, mean_ref, rtol=1e-10, atol=1e-10)
    # both are linear in the noise: equal covariances J J^T mean equal Gaussian laws
    jac_ours = jax.jacfwd(ours)(jnp.zeros(p + ell * k))
    jac_ref = jax.jacfwd(reference)(jnp.zeros(noise_size(system.layout)))
    np.testing.assert_allclose(jac_ours @ jac_ours.T, jac_ref @ jac_ref.T, rtol=1e-9, atol=1e-9)


def sd_mcse(draws):
    return az.mcse(az.convert_to_dataset(draws), method="sd")["x"].values


def test_posteriors_equal_hp_bayes_per_dataset(replicates):
    batch = hp.bayes_batch(SLEEP, replicates, seed=3, keep_draws=True, progress=False)
    assert list(batch.diagnostics.message) == ["", "", ""]
    assert (batch.diagnostics.divergences == 0).all()
    assert (batch.diagnostics.max_r_hat < 1.01).all()
    for label, frame in replicates.groupby("dataset"):
        single = hp.bayes(SLEEP, frame.drop(columns="dataset"), seed=int(label) + 20)
        for table, keys in (("fixef", ["term"]), ("varcorr", ["grp", "var1", "var2"]), ("ranef", ["term", "grp"])):
            ours = getattr(batch, table).query("dataset == @label")
            theirs = getattr(single, table)
            theirs = theirs.reset_index() if table == "fixef" else theirs
            np.testing.assert_array_equal(ours[keys].fillna("").to_numpy(), theirs[keys].fillna("").to_numpy())
            z = (ours["mean"].to_numpy() - theirs["mean"].to_numpy()) / np.hypot(
                ours["mcse_mean"].to_numpy(), theirs["mcse_mean"].to_numpy())
            assert np.max(np.abs(z)) < Z_MAX, (label, table, np.max(np.abs(z)))
        # posterior sds of the random effects, in sd-MCSE units
        draws = batch.draws[label]["b"]  # (chain, draw, ell, k)
        ours_sd = np.concatenate([draws[..., i].reshape(4, 1000, -1).std(axis=(0, 1), ddof=1) for i in range(2)])
        ours_mcse = np.concatenate([sd_mcse(draws[..., i]) for i in range(2)])
        theirs_mcse = np.concatenate([sd_mcse(single.term_draws(0)[..., i]) for i in range(2)])
        z_sd = (ours_sd - single.ranef["sd"].to_numpy()) / np.hypot(ours_mcse, theirs_mcse)
        assert np.max(np.abs(z_sd)) < Z_MAX, (label, np.max(np.abs(z_sd)))


def test_each_dataset_gets_its_own_default_priors(replicates):
    from hierpool.bayesian.priors import DataScales, resolve_priors

    plan = plan_batch(SLEEP, replicates, "dataset", "test", "hp.bayes")
    per_dataset = DataScales.per_group(plan.design, plan.dataset, plan.n_datasets)
    for scales, (label, frame) in zip(per_dataset, replicates.groupby("dataset", sort=False)):
        single = hp.bayesian.fit.build_design(SLEEP, frame)
        ours, theirs = resolve_priors(plan.design, None, scales), resolve_priors(single, None)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_unusable_dataset_stays_in_its_row(replicates):
    lonely = replicates[replicates.dataset == 0].query("Subject == Subject.iloc[0]").assign(dataset=9)
    data = hp.datasets.sleepstudy_replicates(2, seed=5)
    batch = hp.bayes_batch(SLEEP, pd.concat([data, lonely], ignore_index=True), draws=200, tune=200, progress=False)
    diagnostics = batch.diagnostics
    assert "only 1 level" in diagnostics.loc[9, "message"]
    assert batch.fixef.query("dataset == 9")["mean"].isna().all()
    assert batch.fixef.query("dataset != 9")["mean"].notna().all()


def test_bad_arguments_name_themselves(replicates):
    with pytest.raises(hp.ArgumentError, match="one random-effect term"):
        hp.bayes_batch("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", replicates)
    with pytest.raises(hp.ArgumentError, match="chains"):
        hp.bayes_batch(SLEEP, replicates, chains=0)
    with pytest.raises(hp.ArgumentError, match="Normal or 'flat'"):
        hp.bayes_batch(SLEEP, replicates, priors={"Intercept": dist.StudentT(3, 250, 50)})
    with pytest.raises(hp.ArgumentError, match="unknown prior"):
        hp.bayes_batch(SLEEP, replicates, priors={"slope": dist.Normal(0, 1)})
    with pytest.raises(hp.DataError, match="'study'"):
        hp.bayes_batch(SLEEP, replicates, by="study")


SHARDED = """
import json, hierpool as hp, jax
data = hp.datasets.sleepstudy_replicates(3, seed=11)
result = hp.bayes_batch("Reaction ~ Days + (Days | Subject)", data, draws=500, tune=500, seed=2, progress=False)
print(json.dumps({"devices": jax.device_count(), "fixef": result.fixef[["mean", "mcse_mean"]].to_numpy().tolist(),
                  "divergences": result.divergences.tolist()}))
"""


def test_sharded_over_four_host_devices_samples_the_same_posterior():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["divergences"] == [0, 0, 0]
    sharded = np.asarray(out["fixef"])
    single = hp.bayes_batch(SLEEP, hp.datasets.sleepstudy_replicates(3, seed=11), draws=500, tune=500, seed=5,
                            progress=False).fixef[["mean", "mcse_mean"]].to_numpy()
    z = (sharded[:, 0] - single[:, 0]) / np.hypot(sharded[:, 1], single[:, 1])
    assert np.max(np.abs(z)) < Z_MAX, z
