"""hp.bayes_batch: its one-term maths against the general engine exactly, its posteriors against hp.bayes in MC units."""

import json
import os
import subprocess
import sys
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest

import hierpool as hp
from hierpool.algebra import marginal as general
from hierpool.algebra import one_term_marginal as one_term
from hierpool.algebra import statistics
from hierpool.algebra.henderson import conditional_draw, noise_size
from hierpool.algebra.system import build_system
from hierpool.batch.plan import plan_batch
from hierpool.bayesian.results import SamplingWarning

SLEEP = "Reaction ~ Days + (Days | Subject)"
Z_MAX = 4.0
# Every bayes_batch run of this process (but the sharded one) has these settings and 1 dataset x 4 chains
# per chunk in the bucket of 32 levels: one compiled program (~15 s) serves them all
DRAWS = 500
WEIGHTED = {"weights": "w", "offset": "off"}
LOCATION = 1e5  # added to the response of the weighted exact tests (and to the prior's location)


@pytest.fixture(scope="module")
def replicates():
    data = hp.datasets.sleepstudy_replicates(2, seed=11)
    subjects = data.Subject.unique()
    # dataset 0: fewer readings; dataset 1: one subject fewer; 18 and 17 levels share the bucket of 32 (padded)
    data = data[~((data.dataset == 0) & (data.Days > 6))]
    data = data[~((data.dataset == 1) & (data.Subject == subjects[0]))].reset_index(drop=True)
    rng = np.random.default_rng(11)
    return data.assign(w=rng.uniform(0.5, 3.0, len(data)), off=3.0 * data.Days + rng.normal(0, 5, len(data)))


@pytest.fixture(scope="module")
def posterior(replicates):
    return hp.bayes_batch(SLEEP, replicates, seed=3, draws=DRAWS, tune=DRAWS, keep_draws=True, progress=False,
                          **WEIGHTED)


@pytest.fixture(scope="module")
def singles(replicates):
    """hp.bayes per dataset (its one-term collapsed sampler), with the same weights and offset."""
    return {label: hp.bayes(SLEEP, frame.drop(columns="dataset"), seed=int(label) + 20, draws=DRAWS, tune=DRAWS,
                            progress=False, **WEIGHTED)
            for label, frame in replicates.groupby("dataset")}


def weighted_sleepstudy(sleepstudy):
    """sleepstudy with prior weights, an offset and a large location (the shift the statistics remove)."""
    rng = np.random.default_rng(5)
    return sleepstudy.assign(Reaction=sleepstudy.Reaction + LOCATION, w=rng.uniform(0.3, 3.0, len(sleepstudy)),
                             off=2.0 * sleepstudy.Days + rng.normal(0, 3, len(sleepstudy)))


def one_dataset_statistics(frame, formula, **kwargs):
    design = hp.bayesian.fit.build_design(formula, frame, **kwargs)
    return design, statistics.one_dataset_statistics(design)


@pytest.mark.parametrize("formula, weighted", [(SLEEP, False), (SLEEP, True), ("Reaction ~ Days + (1 | Subject)", True),
                                               ("Reaction ~ 1 + (Days | Subject)", False)])
def test_marginal_likelihood_equals_general_engine(sleepstudy, formula, weighted):
    # weighted: prior weights, an offset and y + 1e5 (the two engines shift y by their own beta0)
    frame = weighted_sleepstudy(sleepstudy) if weighted else sleepstudy
    design, stats = one_dataset_statistics(frame, formula, **(WEIGHTED if weighted else {}))
    system = build_system(design)
    p = design.p
    loc = jnp.asarray(np.linspace(200, 5, p) + (LOCATION if weighted else 0.0) * (np.arange(p) == 0))
    scale = jnp.asarray([50.0] + [np.inf] * (p - 1))  # one Normal prior, the rest flat
    rng = np.random.default_rng(0)
    k = design.terms[0].k
    # compiled once each, not run op by op (which dispatches, and compiles, every operation on its own)
    ours_at, reference_at = jax.jit(one_term.log_marginal_likelihood), jax.jit(general.log_marginal_likelihood)
    for _ in range(5):
        theta = jnp.asarray(rng.uniform(0.05, 1.5, size=k * (k + 1) // 2))
        sigma = jnp.asarray(rng.uniform(10, 40))
        ours = ours_at(theta, sigma, stats, loc, scale)
        reference = reference_at(theta, sigma, system, loc, scale)
        assert float(ours) == pytest.approx(float(reference), rel=1e-11)


@pytest.mark.parametrize("formula, weighted", [(SLEEP, True), ("Reaction ~ Days + (1 | Subject)", False)])
def test_host_draws_equal_compiled_draws(sleepstudy, formula, weighted):
    # one implementation, two backends: hp.bayes draws one-term effects in NumPy on the host (many draws
    # at once, in batches), hp.bayes_batch in its compiled program (vmapped); the same noise gives the same draws
    frame = weighted_sleepstudy(sleepstudy) if weighted else sleepstudy
    design, stats = one_dataset_statistics(frame, formula, **(WEIGHTED if weighted else {}))
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
    # with prior weights, an offset and y + 1e5: beta comes back on the user's scale in both engines
    design, stats = one_dataset_statistics(weighted_sleepstudy(sleepstudy), SLEEP, **WEIGHTED)
    system = build_system(design)
    loc, scale = jnp.asarray([250.0 + LOCATION, 0.0]), jnp.asarray([40.0, 10.0])
    theta, sigma = jnp.asarray([0.9, 0.05, 0.2]), jnp.asarray(25.0)
    ell, k, p = stats.zty.shape[0], 2, design.p
    prior = general.beta_prior_block(loc, scale, sigma, system)

    def ours(noise):
        beta, b = one_term.conditional_draw(theta, sigma, stats, loc, scale, noise[:p], noise[p:].reshape(ell, k))
        return jnp.concatenate([beta, b.ravel()])

    def reference(noise):
        beta, b = conditional_draw(theta, system, sigma, noise, prior)
        return jnp.concatenate([beta, b[0].ravel()])

    mean_ours = jax.jit(ours)(jnp.zeros(p + ell * k))
    mean_ref = jax.jit(reference)(jnp.zeros(noise_size(system.layout)))
    assert abs(float(mean_ours[0]) - LOCATION) < 1e3  # the user's scale
    np.testing.assert_allclose(mean_ours, mean_ref, rtol=1e-10, atol=1e-8)
    # both are linear in the noise: equal covariances J J^T mean equal Gaussian laws
    jac_ours = jax.jit(jax.jacfwd(ours))(jnp.zeros(p + ell * k))
    jac_ref = jax.jit(jax.jacfwd(reference))(jnp.zeros(noise_size(system.layout)))
    np.testing.assert_allclose(jac_ours @ jac_ours.T, jac_ref @ jac_ref.T, rtol=1e-9, atol=1e-9)


def sd_mcse(draws):
    return az.mcse(az.convert_to_dataset(draws), method="sd")["x"].values


def test_posteriors_equal_hp_bayes_per_dataset(replicates, posterior, singles):
    # with prior weights and an offset: each dataset's posterior is the one hp.bayes samples
    batch = posterior
    assert list(batch.diagnostics.message) == ["", ""]
    assert (batch.diagnostics.divergences == 0).all()
    assert (batch.diagnostics.max_r_hat < 1.01).all()
    for label, single in singles.items():
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
        ours_sd = np.concatenate([draws[..., i].reshape(4, DRAWS, -1).std(axis=(0, 1), ddof=1) for i in range(2)])
        ours_mcse = np.concatenate([sd_mcse(draws[..., i]) for i in range(2)])
        theirs_mcse = np.concatenate([sd_mcse(single.term_draws(0)[..., i]) for i in range(2)])
        z_sd = (ours_sd - single.ranef["sd"].to_numpy()) / np.hypot(ours_mcse, theirs_mcse)
        assert np.max(np.abs(z_sd)) < Z_MAX, (label, np.max(np.abs(z_sd)))


def test_one_term_path_with_weights_and_offset_agrees_with_the_closed_form(replicates, singles):
    frame = replicates[replicates.dataset == 0].drop(columns="dataset")
    fit = hp.lmm(SLEEP, frame, **WEIGHTED)
    # the one-term conditional draw at the fit's variance parameters, flat priors on beta: mean (fixef,
    # BLUPs) and covariance of beta (vcov) are the closed form's, exactly
    design, stats = one_dataset_statistics(frame, SLEEP, **WEIGHTED)
    theta, sigma = jnp.asarray(fit.theta), jnp.asarray(fit.sigma)
    loc, scale = jnp.zeros(2), jnp.full(2, jnp.inf)
    ell = stats.zty.shape[0]

    def draw(noise):
        beta, b = one_term.conditional_draw(theta, sigma, stats, loc, scale, noise[:2], noise[2:].reshape(ell, 2))
        return jnp.concatenate([beta, b.T.ravel()])  # b in lme4's order: intercepts, then slopes

    mean = jax.jit(draw)(jnp.zeros(2 + 2 * ell))
    np.testing.assert_allclose(mean[:2], fit.fixef, rtol=1e-8)
    np.testing.assert_allclose(mean[2:], fit.ranef.condval, atol=1e-6 * np.abs(fit.ranef.condval).max())
    jac = jax.jit(jax.jacfwd(draw))(jnp.zeros(2 + 2 * ell))[:2]
    np.testing.assert_allclose(jac @ jac.T, fit.vcov, rtol=1e-6)
    # hp.bayes exact mode (variance held at the fit, general engine) against the BLUPs and BLUE, in MC units
    exact = hp.bayes(SLEEP, frame, variance=fit, priors=hp.validate.flat_beta_priors(fit), draws=250, seed=4,
                     progress=False, **WEIGHTED)
    report = hp.validate.compare(fit, exact)
    assert report.passed, report.summary()
    # the collapsed sampler (the one-term path, variances free): near the REML fit (0.05 sd, sigma 3%); the
    # weights ignored would move sigma by 17% and the intercept by 0.4 sd, the offset ignored the Days slope
    # by 3 (1.9 sd)
    single = singles[0]
    distance = (single.fixef["mean"] - fit.fixef).abs() / single.fixef["sd"]
    assert distance.max() < 0.25, distance
    residual = single.varcorr.query("grp == 'Residual'")["mean"].iloc[0]
    assert residual == pytest.approx(fit.sigma, rel=0.1)


def test_each_dataset_gets_its_own_default_priors(replicates):
    from hierpool.bayesian.priors import DataScales, resolve_priors

    plan = plan_batch(SLEEP, replicates, "dataset", "test", "hp.bayes")
    per_dataset = DataScales.per_group(plan.design, plan.dataset, plan.n_datasets)
    for scales, (label, frame) in zip(per_dataset, replicates.groupby("dataset", sort=False)):
        single = hp.bayesian.fit.build_design(SLEEP, frame)
        ours, theirs = resolve_priors(plan.design, None, scales), resolve_priors(single, None)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_unusable_dataset_stays_in_its_row(replicates, posterior):
    lonely = replicates[replicates.dataset == 0].query("Subject == Subject.iloc[0]").assign(dataset=9)
    data = hp.datasets.sleepstudy_replicates(2, seed=5)
    # the posterior fixture's program: 18 levels padded to 32 (the lonely dataset's 1 level makes the counts unequal)
    batch = hp.bayes_batch(SLEEP, pd.concat([data, lonely], ignore_index=True), draws=DRAWS, tune=DRAWS, progress=False)
    diagnostics = batch.diagnostics
    assert "has only one level" in diagnostics.loc[9, "message"]
    assert batch.fixef.query("dataset == 9")["mean"].isna().all()
    assert batch.fixef.query("dataset != 9")["mean"].notna().all()


def test_to_frame_holds_each_datasets_means_and_interval_ends_of_every_parameter(posterior):
    table = posterior.to_frame()
    fixef, varcorr, diagnostics = posterior.fixef, posterior.varcorr, posterior.diagnostics
    assert list(table["dataset"]) == list(posterior.datasets) and len(table) == 2
    assert table["ok"].tolist() == diagnostics["ok"].tolist()
    for d, row in table.iterrows():
        own = fixef[fixef.dataset == posterior.datasets[d]].set_index("term")
        for name in posterior.fixed_names:
            ends = own.loc[name, ["mean", "lower", "upper"]].tolist()
            assert [row[name], row[f"{name}_lower"], row[f"{name}_upper"]] == ends
        parts = varcorr[varcorr.dataset == posterior.datasets[d]]
        slope_sd = parts[(parts.grp == "Subject") & (parts.var1 == "Days") & parts.var2.isna()]
        cor = parts[(parts.grp == "Subject") & (parts.var2 == "Days")]
        assert row["sd_Subject_Days_upper"] == slope_sd["upper"].iloc[0]
        assert row["cor_Subject_Intercept_Days"] == cor["mean"].iloc[0]
        assert row["sigma_lower"] == parts[parts.grp == "Residual"]["lower"].iloc[0]
    assert table.columns[-1] == "sigma_upper" and table.shape[1] == 6 + 3 * 6


def test_bad_arguments_name_themselves(replicates):
    with pytest.raises(hp.ArgumentError, match="needs the areas' neighbourhood graph"):
        hp.bayes_batch("Reaction ~ Days + car(Subject)", replicates)
    with pytest.raises(hp.ArgumentError, match="chains"):
        hp.bayes_batch(SLEEP, replicates, chains=0)
    with pytest.raises(hp.ArgumentError, match="Normal or 'flat'"):
        hp.bayes_batch(SLEEP, replicates, priors={"Intercept": dist.StudentT(3, 250, 50)})
    with pytest.raises(hp.ArgumentError, match="unknown prior"):
        hp.bayes_batch(SLEEP, replicates, priors={"slope": dist.Normal(0, 1)})
    with pytest.raises(hp.DataError, match="'study'"):
        hp.bayes_batch(SLEEP, replicates, by="study")


SHARDED = """
import json, sys, hierpool as hp, jax, pandas as pd
data = pd.read_pickle(sys.argv[1])
draws = int(sys.argv[2])
result = hp.bayes_batch("Reaction ~ Days + (Days | Subject)", data, draws=draws, tune=draws, seed=5, weights="w",
                        offset="off", progress=False)
print(json.dumps({"devices": jax.device_count(), "divergences": result.divergences.tolist(),
                  "fixef": result.fixef[["mean", "mcse_mean"]].to_numpy().tolist(),
                  "varcorr": result.varcorr[["mean", "mcse_mean"]].to_numpy().tolist()}))
"""


def test_sharded_over_four_host_devices_samples_the_same_posterior(replicates, posterior, tmp_path):
    # the posterior fixture's data and settings, another seed and half the draws (each device runs its chunk
    # row's chains in full, the padding's too), sampled over 4 devices (2 datasets: one real chunk row per
    # device, the rest padding), against the fixture in Monte Carlo units (the MCSEs of both runs)
    replicates.to_pickle(tmp_path / "data.pkl")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "data.pkl"), str(DRAWS // 2)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["divergences"] == [0, 0]
    for table in ("fixef", "varcorr"):
        sharded, single = np.asarray(out[table]), getattr(posterior, table)[["mean", "mcse_mean"]].to_numpy()
        z = (sharded[:, 0] - single[:, 0]) / np.hypot(sharded[:, 1], single[:, 1])
        assert np.max(np.abs(z)) < Z_MAX, (table, z)


def test_diagnostics_judge_one_chain_without_r_hat_and_warn_as_hp_bayes_does(monkeypatch):
    """With one chain every dataset was not ok (R-hat is NaN there; NumPy's All-NaN warning leaked), and a batch
    whose datasets were not ok said nothing, where hp.bayes warns (SamplingWarning)."""
    from hierpool.batch.bayes_results import BayesBatchResult

    data = hp.datasets.sleepstudy_replicates(2, seed=4)
    with pytest.warns(SamplingWarning, match="2 of 2 sampled datasets are not ok") as record:
        short = hp.bayes_batch("Reaction ~ Days + (1 | Subject)", data, by="dataset", chains=1, draws=20, tune=20,
                               seed=1, progress=False)
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]
    table = short.diagnostics
    assert table["max_r_hat"].isna().all() and not table["ok"].any()  # (its ESS is low: 20 draws)
    monkeypatch.setattr("hierpool.batch.bayes_results.ESS_MIN_PER_CHAIN", 1)
    assert BayesBatchResult.diagnostics.fget(short)["ok"].all()  # one chain: judged on divergences and ESS alone


def test_a_dataset_lacking_a_level_is_sampled_alone_by_hp_bayes():
    # it was refused ("the 4 fixed-effect columns have rank 3"), where fit_batch fits it alone: now its row is
    # hp.bayes's posterior of it alone (seed + its position, as the dataset-by-dataset path seeds it), NaN for f[r]
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(3):
        g, f, x = np.repeat(np.arange(8), 6), np.array(["p", "q", "r"])[np.arange(48) % 3], rng.normal(size=48)
        y = 1 + 0.5 * x + (f == "q") * 0.3 + (f == "r") * 0.6 + rng.normal(size=8)[g] + rng.normal(size=48)
        frames.append(pd.DataFrame({"y": y, "x": x, "f": f, "g": g}))
    frames[1] = frames[1][frames[1]["f"] != "r"]
    settings = {"draws": 60, "tune": 60, "chains": 2}
    batch = hp.bayes_batch("y ~ x + f + (1 | g)", frames, seed=5, progress=False, keep_draws=True, **settings)
    assert batch.messages[1].startswith("f[r] zero in this dataset (a level it lacks): sampled alone")
    assert batch.messages[0] == batch.messages[2] == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = hp.bayes("y ~ x + f + (1 | g)", frames[1], seed=6, progress=False, **settings)
    mine = batch.fixef[batch.fixef["dataset"] == 1].set_index("term")
    np.testing.assert_allclose(mine.loc[["Intercept", "x", "f[q]"], "mean"], alone.fixef["mean"], rtol=1e-12)
    assert mine.loc["f[r]", ["mean", "sd", "lower", "upper"]].isna().all()
    np.testing.assert_allclose(batch.varcorr[batch.varcorr["dataset"] == 1]["mean"], alone.varcorr["mean"], rtol=1e-12)
    np.testing.assert_allclose(batch.ranef[batch.ranef["dataset"] == 1]["mean"], alone.ranef["mean"], rtol=1e-12)
    # keep_draws keeps its own draws (they were left out): beta on the batch's columns, NaN for f[r], its levels
    kept = batch.draws[1]
    np.testing.assert_array_equal(kept["beta"][..., :3], alone.beta_draws)
    assert np.isnan(kept["beta"][..., 3]).all() and kept["beta"].shape == batch.draws[0]["beta"].shape
    np.testing.assert_array_equal(kept["b"], alone.term_draws(0))
    np.testing.assert_allclose(kept["sd"][..., 0], alone.idata.posterior["sd_g"].values[..., 0], rtol=1e-12)
    np.testing.assert_array_equal(kept["sigma"], alone.sigma_draws)


def test_a_chains_start_varies_with_the_chain_where_its_iterations_do_and_keeps_its_values():
    # the batch's chains start from a state whose leaves vary over the vmapped chains where an iteration makes them
    # vary (floats, flags, keys), so that the scan is traced once; the counters (iteration, adaptation window) stay
    # shared, else the warm-up's branches on them would run both branches.  Adding the chain's zero keeps each value
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import ParamInfo

    from hierpool.bayesian.nuts import _varying_with

    kernel_init, _ = hmc(potential_fn=lambda z: jnp.sum(z ** 2), algo="NUTS")
    state = kernel_init(ParamInfo(jnp.asarray([1.0, -0.5]), 1.25, jnp.asarray([2.0, -1.0])), num_warmup=10,
                        rng_key=jax.random.PRNGKey(0), dense_mass=True)
    leaves, tree = jax.tree_util.tree_flatten(state)
    counter = [jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.signedinteger) for leaf in leaves]
    assert sum(counter) == 5 and not all(counter)  # i, num_steps, the dual averaging's t, Welford's n, the window
    chains = jnp.arange(3, dtype=jnp.uint32)
    # out_axes None: vmap refuses a leaf that varies over the chains
    out_axes = jax.tree_util.tree_unflatten(tree, [None if c else 0 for c in counter])
    varied = jax.tree_util.tree_leaves(jax.vmap(lambda c: _varying_with(c, state), out_axes=out_axes)(chains))
    for j, (before, after) in enumerate(zip(leaves, varied)):
        expected = np.asarray(before) if counter[j] else np.broadcast_to(before, (3, *np.shape(before)))
        assert after.dtype == jnp.asarray(before).dtype and np.array_equal(after, expected), j
        if not counter[j]:
            with pytest.raises(ValueError, match="out_axes"):
                jax.vmap(lambda c, j=j: jax.tree_util.tree_leaves(_varying_with(c, state))[j], out_axes=None)(chains)


def _standard_normal():  # (a module-level model: chain_function's programs are keyed by it)
    import numpyro

    numpyro.sample("x", dist.Normal(0.0, 1.0))


def test_a_chain_starts_from_the_kernels_state_made_to_vary_with_its_chain(monkeypatch):
    # chain_function hands the NUTS kernel's starting state to _varying_with, with the chain, and runs the chain from
    # what it returns (without the call the values are the same and only the batch's tracing is longer: nothing else
    # would notice it gone).  Traced unbatched, a short chain of a one-parameter model
    from hierpool.bayesian import nuts

    seen = []

    def recorded(chain, state):  # the chain then starts from x = 123.25 (a value that marks the returned state)
        seen.append((chain, state))
        return state._replace(z={"x": jnp.asarray(123.25, dtype=state.z["x"].dtype)})

    monkeypatch.setattr(nuts, "_varying_with", recorded)
    one_chain = nuts.chain_function(_standard_normal, tune=2, draws=2, target_accept=0.8, max_tree_depth=2,
                                    dense_mass=False)
    program = jax.make_jaxpr(lambda seed, chain: one_chain(seed, chain, ()))(jnp.uint32(0), jnp.int32(3))
    (chain, state), = seen
    assert isinstance(chain, jax.core.Tracer) and type(state).__name__ == "HMCState"
    assert "123.25" in str(program)  # what it returned is what the chain runs from
