"""The Bayesian engine against analytic answers, in Monte-Carlo-error units (z = difference / MCSE)."""

import json
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import numpyro.distributions as dist
import pandas as pd
import pytest
from conftest import load, simulated

import hierpool as hp

Z_MAX = 4.0
EIGHT_SCHOOLS = json.loads(
    (Path(__file__).resolve().parents[1] / "validation" / "eight_schools_reference.json").read_text()
)


@pytest.mark.parametrize(
    "name,formula",
    [
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),  # correlated slopes
        ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),  # crossed
        ("Pastes", "strength ~ 1 + (1 | batch/cask)"),  # nested
        ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),  # uncorrelated
        ("Machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),  # categorical fixed effect
    ],
)
def test_exact_draws_equal_henderson(name, formula):
    # the fast variance=fit option draws (beta, b) from the closed form's own factorization, so this
    # checks the draw code (its noise back-solve gives sigma^2 C^-1), not the closed form: the
    # validation against an independent posterior is test_validate.py's exact mode
    data = load(name)
    fit = hp.lmm(formula, data)
    post = hp.bayes(formula, data, variance=fit, priors=hp.validate.flat_beta_priors(fit), seed=1)
    assert post.method == "exact"
    assert list(post.ranef.grp) == list(fit.ranef.grp)
    report = hp.validate.compare(fit, post)
    assert report.passed, report.summary()


def with_weights_and_offset(data, response, seed):
    """data with prior weights w (0.3 to 3) and an offset o (about one sd of the response, outside X's span) added to y."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0.0, data[response].std(), len(data))
    return data.assign(**{response: data[response] + offset, "w": rng.uniform(0.3, 3.0, len(data)), "o": offset})


# data set: (formula, offset argument, {coefficient: its data column, None for the intercept}); the offset
# in the formula (correlated slopes) and as the argument (crossed), each fitted with prior weights w
WEIGHTED_OFFSET_MODELS = {
    "sleepstudy": ("Reaction ~ Days + offset(o) + (Days | Subject)", None, {"Intercept": None, "Days": "Days"}),
    "Penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "o", {"Intercept": None}),
}


@pytest.fixture(scope="module")
def weighted_offset_exact():
    """Per model: (data, the REML fit, the exact-mode posterior), both with weights and the offset."""
    out = {}
    for name, (formula, offset, _) in WEIGHTED_OFFSET_MODELS.items():
        data = with_weights_and_offset(load(name), formula.split("~")[0].strip(), seed=len(name))
        fit = hp.lmm(formula, data, weights="w", offset=offset)
        post = hp.bayes(formula, data, weights="w", offset=offset, variance=fit,
                        priors=hp.validate.flat_beta_priors(fit), seed=2)
        out[name] = data, fit, post
    return out


def test_exact_draws_with_weights_and_offset_equal_henderson(weighted_offset_exact):
    # the exact draw's system is built on y - offset with the weights; a draw that dropped either
    # would centre on other BLUPs (the offset is ~1 sd of y per row) or scale C^-1 wrongly
    for name, (data, fit, post) in weighted_offset_exact.items():
        assert post.method == "exact" and post.design.has_offset
        np.testing.assert_array_equal(post.design.weights, data["w"].to_numpy())
        report = hp.validate.compare(fit, post)
        assert report.passed, (name, report.summary())


def _mean_from_tables(post, data, coefficients):
    """offset + x beta + z b of every row, per draw (chain 0), from the posterior's labelled variables."""
    posterior = post.idata.posterior.isel(chain=0)
    mu = data["o"].to_numpy() + sum(
        posterior["beta"].sel(fixef=coef).values[:, None] * (1.0 if col is None else data[col].to_numpy())
        for coef, col in coefficients.items()
    )
    for term in post.design.terms:
        b = posterior[f"b_{term.group}"]
        for coef in term.coef_names:
            levels = data[term.group].astype(str).to_numpy()
            column = coefficients[coef]
            mu = mu + b.sel({term.group: levels, f"{term.group}_coef": coef}).values * (
                1.0 if column is None else data[column].to_numpy())
    return mu


def test_pointwise_log_likelihood_and_predictions_carry_weights_and_offset(weighted_offset_exact):
    # log N(y_i | o_i + x_i beta + z_i b, sigma / sqrt(w_i)), computed here from the labelled draws
    import scipy.stats

    for name, (data, fit, post) in weighted_offset_exact.items():
        formula, _, coefficients = WEIGHTED_OFFSET_MODELS[name]
        y = data[formula.split("~")[0].strip()].to_numpy(float)
        mu = _mean_from_tables(post, data, coefficients)
        expected = scipy.stats.norm.logpdf(y, mu, fit.sigma / np.sqrt(data["w"].to_numpy()))
        stored = post.idata.log_likelihood[post.design.spec.response].values[0]
        np.testing.assert_allclose(stored, expected, rtol=1e-9)
        # predictions add the offset; predictive noise is sigma^2 / w of the new rows' weights
        new = data.iloc[:3].assign(o=[0.0, 10.0, -10.0], w=[0.25, 1.0, 4.0])
        mean = post.predict(new)
        predictive = post.predict(new, kind="predictive", seed=3)
        np.testing.assert_allclose(mean["mean"], _mean_from_tables(post, new, coefficients).mean(axis=0), atol=0.05 * mean["sd"].max())
        np.testing.assert_allclose(predictive["sd"] ** 2 - mean["sd"] ** 2, fit.sigma**2 / new["w"].to_numpy(), rtol=0.15)


def test_full_model_with_held_variances_weights_and_offset_agrees_with_henderson():
    # the independent NUTS posterior (non-centered full model, mu = o + X beta + Z b, noise sigma / sqrt(w)):
    # an offset left out of mu or unweighted noise moves the BLUPs or the sds by many MCSEs
    data = with_weights_and_offset(simulated(seed=5, n_groups=8, per_group=5), "y", seed=1)
    report = hp.validate.blup_agreement("y ~ x + (1 | g)", data, weights="w", offset="o", chains=2, draws=500, tune=300,
                                        seed=3)
    assert report.posterior.method == "full"
    assert report.passed, report.summary()


def test_sampler_targets_carry_weights_and_offset():
    # the two samplers' densities at one parameter point against a dense computation: the collapsed
    # target is log N(y - o | X m, V + X S X^T), V = Z Sigma Z^T + sigma^2 W^-1 (beta ~ N(m, S) integrated
    # out); the full model's likelihood site is sum_i log N(y_i | o_i + x_i beta + z_i b, sigma / sqrt(w_i))
    import jax
    import scipy.stats
    from numpyro import handlers

    from hierpool.algebra.marginal import log_marginal_likelihood, theta_from_components
    from hierpool.algebra.system import build_system
    from hierpool.bayesian.model import HeldVariance, full_model, model_data
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    data = with_weights_and_offset(simulated(seed=6, n_groups=6, per_group=4), "y", seed=2)
    data["o"] += 1e3  # a large common offset: the system's shifted y column must not lose it
    design = build_design("y ~ x + offset(o) + (x | g) + (1 | h)", data, weights="w")
    sigma = 0.8
    sds = {"g": np.array([1.1, 0.4]), "h": np.array([0.7])}
    cors = {"g": np.array([[1.0, 0.0], [0.3, np.sqrt(1 - 0.09)]]), "h": None}
    factors = [sds[t.group][:, None] * (cors[t.group] if cors[t.group] is not None else 1.0) for t in design.terms]
    y_less = data["y"].to_numpy() - data["o"].to_numpy()
    V = np.diag(sigma**2 / data["w"].to_numpy())
    for term, factor in zip(design.terms, factors):
        Z = term.dense_columns()
        V += Z @ np.kron(np.eye(term.n_levels), factor @ factor.T) @ Z.T
    loc, scale = np.array([1.5, -0.5]), np.array([2.0, 3.0])
    expected = scipy.stats.multivariate_normal.logpdf(y_less, design.X @ loc, V + design.X @ np.diag(scale**2) @ design.X.T)
    theta = theta_from_components([sds[t.group] for t in design.terms], [cors[t.group] for t in design.terms], sigma)
    collapsed = jax.jit(log_marginal_likelihood)(theta, sigma, build_system(design), loc, scale)  # eager: 10x slower
    assert float(collapsed) == pytest.approx(expected, rel=1e-9)

    rng = np.random.default_rng(4)
    values = {"beta": np.array([2.0, 0.5])} | {f"z__{j}": rng.normal(size=(t.n_levels, t.k)) for j, t in enumerate(design.terms)}
    held = HeldVariance(cov_factors=tuple(factors), sigma=sigma)
    model = handlers.substitute(handlers.seed(full_model, 0), data=values)
    trace = handlers.trace(model).get_trace(model_data(design), resolve_priors(design, None), held,
                                            ks=tuple(t.k for t in design.terms),
                                            n_levels=tuple(t.n_levels for t in design.terms))
    mu = data["o"].to_numpy() + design.X @ values["beta"]
    for j, (term, factor) in enumerate(zip(design.terms, factors)):
        b = values[f"z__{j}"] @ factor.T
        mu = mu + np.sum(term.z * b[term.index], axis=1)
    site = trace["y"]
    full = float(site["fn"].log_prob(site["value"]).sum())
    assert full == pytest.approx(scipy.stats.norm.logpdf(data["y"], mu, sigma / np.sqrt(data["w"])).sum(), rel=1e-10)


def test_held_variances_of_other_weights_or_offset_are_refused(sleepstudy):
    # sigma held from an unweighted fit is another noise; a fit of another offset another model
    data = with_weights_and_offset(sleepstudy, "Reaction", seed=3)
    formula = "Reaction ~ Days + (1 | Subject)"
    plain = hp.lmm(formula, data)
    with pytest.raises(hp.HierpoolError, match="variance.*weights"):
        hp.bayes(formula, data, weights="w", variance=plain)
    with pytest.raises(hp.HierpoolError, match="variance.*offset"):
        hp.bayes(formula, data, offset="o", variance=plain)


def assert_matches_eight_schools(post):
    """mu, tau and every school's theta = mu + b: posterior means and sds against the quadrature reference."""
    assert post.diagnostics(warn=False).attrs["divergences"] == 0
    tau_draws = np.sqrt(post.term_covariance_draws(0)[..., 0, 0])
    theta = post.beta_draws[..., :1] + post.term_draws(0)[..., 0]
    draws = np.concatenate([post.beta_draws[..., :1], tau_draws[..., None], theta], axis=-1)
    reference = EIGHT_SCHOOLS
    means = np.r_[reference["mu"]["mean"], reference["tau"]["mean"], reference["theta"]["mean"]]
    sds = np.r_[reference["mu"]["sd"], reference["tau"]["sd"], reference["theta"]["sd"]]
    flat = draws.reshape(-1, draws.shape[-1])
    dataset = az.convert_to_dataset(draws)
    z_mean = (flat.mean(axis=0) - means) / az.mcse(dataset, method="mean")["x"].values
    z_sd = (flat.std(axis=0, ddof=1) - sds) / az.mcse(dataset, method="sd")["x"].values
    assert np.max(np.abs(z_mean)) < Z_MAX, z_mean
    assert np.max(np.abs(z_sd)) < Z_MAX, z_sd


def test_known_residual_sds_full_model_matches_reference():
    # the non-centered full model with se= (no sigma site): a wrong noise scale or prior moves mu, tau or a theta
    data = pd.DataFrame({"y": EIGHT_SCHOOLS["y"], "se": EIGHT_SCHOOLS["se"], "school": list("ABCDEFGH")})
    priors = {"Intercept": dist.Normal(0, 5), "sd_school": dist.HalfCauchy(5)}
    post = hp.bayes("y ~ 1 + (1 | school)", data, se="se", priors=priors, method="full", target_accept=0.95, seed=7)
    assert "sigma" not in post.idata.posterior
    assert_matches_eight_schools(post)


@pytest.fixture(scope="module")
def sleepstudy_posteriors():
    data = load("sleepstudy")
    formula = "Reaction ~ Days + (Days | Subject)"
    return {method: hp.bayes(formula, data, method=method, seed=3) for method in ("collapsed", "full")}


def test_a_new_subjects_rows_share_its_effect_in_every_draw(sleepstudy_posteriors, monkeypatch):
    """Two rows of one new Subject take one draw of its effects per posterior draw (brms's
    sample_new_levels = "gaussian"): identical rows get identical summaries, and the difference of its rows at
    Days 9 and 0 varies by the slope alone (they were independent draws: its sd then counted both intercepts)."""
    from hierpool.bayesian import results as results_module

    post = sleepstudy_posteriors["collapsed"]
    new = pd.DataFrame({"Subject": ["new", "new", "new", "other"], "Days": [0, 0, 9, 0]})
    got = post.predict(new, seed=4)
    assert got.iloc[0].equals(got.iloc[1])
    assert not np.isclose(got["sd"].iloc[0], 0.0) and got["mean"].iloc[3] != got["mean"].iloc[0]
    # the draws themselves (the summaries' input): a fitted subject's row is x'beta_s + z'b_s of each draw exactly;
    # a new subject's effect, standardized by each draw's Sigma_s, is N(0, 1) at Days 0 and 9 and in their difference
    # (the slope's part alone).  4000 draws: each variance to about 2.2% (seeds 0-3: within 2.3%); a transposed
    # Cholesky factor moves them by 17-21%, dropping beta's draws breaks the fitted row
    captured = {}
    summarize = results_module.summary_table

    def capture(draws, level, index):
        captured["eta"] = draws
        return summarize(draws, level, index)

    monkeypatch.setattr(results_module, "summary_table", capture)
    post.predict(pd.DataFrame({"Subject": ["new", "new", "308"], "Days": [0, 9, 9]}), seed=4)
    eta = captured["eta"]
    beta = post.beta_draws.reshape(-1, 2)
    cov = post.term_covariance_draws(0).reshape(-1, 2, 2)
    b308 = post.term_draws(0).reshape(-1, 18, 2)[:, 0]  # (Subject 308: the first level)
    np.testing.assert_allclose(eta[:, 2], (beta + b308) @ [1.0, 9.0], rtol=1e-12)
    z9 = np.array([1.0, 9.0])
    standardized = [(eta[:, 0] - beta[:, 0]) / np.sqrt(cov[:, 0, 0]),
                    (eta[:, 1] - beta @ z9) / np.sqrt(np.einsum("i,sij,j->s", z9, cov, z9)),
                    (eta[:, 1] - eta[:, 0] - 9 * beta[:, 1]) / np.sqrt(81 * cov[:, 1, 1])]
    for w in standardized:
        assert w.var() == pytest.approx(1.0, abs=0.07)


def test_priors_flatten_in_an_order_no_process_moves(sleepstudy, monkeypatch):
    """NumPyro flattens a distribution's fields in the order of a set of their names, which string hashing orders
    per process: hp.bayes' chain program, taking the priors as arguments, was lowered with its arguments in another
    order in each process (3 processes, PYTHONHASHSEED 1-3: two modules), and a persistent compilation cache missed.
    The priors' pytree takes each distribution's fields in the order of their names (priors.SortedFields): the
    leaves are the same whatever order NumPyro's set gives, and the priors come back as they were."""
    import jax
    from numpyro.distributions import Distribution

    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    priors = resolve_priors(build_design("Reaction ~ Days + (Days | Subject)", sleepstudy),
                            {"b": dist.StudentT(3.0, 0.5, 2.0), "sigma": dist.HalfCauchy(5.0)})
    leaves, structure = jax.tree_util.tree_flatten(priors)
    gather = Distribution.gather_pytree_data_fields.__func__
    monkeypatch.setattr(Distribution, "gather_pytree_data_fields",
                        classmethod(lambda cls: tuple(reversed(gather(cls)))))  # another process's set order
    reordered = jax.tree_util.tree_leaves(priors)
    assert len(leaves) == len(reordered) > 6
    for first, second in zip(leaves, reordered):
        np.testing.assert_array_equal(first, second)
    back = jax.tree_util.tree_unflatten(structure, leaves)
    assert type(back.sigma) is dist.HalfCauchy and float(back.sigma.scale) == 5.0
    assert [type(b) for b in back.beta] == [type(b) for b in priors.beta]
    for before, after in zip(priors.beta + priors.sd, back.beta + back.sd):
        np.testing.assert_allclose(after.log_prob(0.7), before.log_prob(0.7))


def test_priors_that_cover_nothing_and_a_family_with_correlation_are_refused(sleepstudy):
    """brms refuses a prior that matches no parameter; these read as applied and were not: an LKJ prior without a
    correlated term, a slopes' prior without slopes, an sd prior without random terms; correlation= with a family
    was dropped, silently (the GLMM sampler has no AR(1) residuals)."""
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    scalar = build_design("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", sleepstudy)
    with pytest.raises(hp.ArgumentError, match="prior 'cor'"):
        resolve_priors(scalar, {"cor": 2.0})
    with pytest.raises(hp.ArgumentError, match="prior 'b'"):
        resolve_priors(build_design("Reaction ~ 1 + (1 | Subject)", sleepstudy), {"b": dist.Normal(0, 1)})
    with pytest.raises(hp.ArgumentError, match="prior 'sd'"):
        resolve_priors(build_design("Reaction ~ Days", sleepstudy, random_optional=True), {"sd": dist.HalfNormal(1)})
    resolve_priors(build_design("Reaction ~ Days + (Days | Subject)", sleepstudy), {"cor": 2.0})  # a correlated term
    counts = sleepstudy.assign(y=(sleepstudy["Reaction"] // 50).astype(int))
    with pytest.raises(hp.ArgumentError, match="correlation="):
        hp.bayes("y ~ Days + (1 | Subject)", counts, family="poisson", correlation=hp.ar1("Subject"))


def test_collapsed_and_full_samplers_agree(sleepstudy_posteriors):
    # means and sds of every fixed effect, random effect and variance parameter, in Monte-Carlo units
    # (the crossed and nested models are compared in test_validate.py)
    report = hp.validate.compare_samplers(sleepstudy_posteriors["collapsed"], sleepstudy_posteriors["full"])
    assert report.passed, report.summary()
    assert len(report.table) == 2 + 36 + 4


def test_sampler_comparison_fails_when_one_posterior_is_off(sleepstudy_posteriors):
    # one subject's slope draws moved by 0.2 posterior sd (a conditional draw with a wrong mean)
    from dataclasses import replace

    full = sleepstudy_posteriors["full"]
    idata = full.idata.copy()
    b = idata.posterior["b_Subject"]
    idata.posterior["b_Subject"] = b + 0.2 * float(b[..., 3, 1].std()) * ((b.Subject == b.Subject[3]) & (b.Subject_coef == "Days"))
    report = hp.validate.compare_samplers(sleepstudy_posteriors["collapsed"], replace(full, idata=idata))
    assert not report.passed
    assert report.table.loc[np.abs(report.table.z_mean).idxmax(), "name"] == "Subject:Days:" + str(b.Subject.values[3])


def test_collapsed_sampler_mixes_random_effects_better(sleepstudy_posteriors):
    collapsed, full = sleepstudy_posteriors["collapsed"], sleepstudy_posteriors["full"]
    assert collapsed.ranef["ess_bulk"].min() > 1.2 * full.ranef["ess_bulk"].min()
    assert collapsed.ranef["ess_bulk"].min() > 2500  # of 4000 draws: nearly independent


def test_inference_data_follows_arviz_conventions(sleepstudy_posteriors):
    idata = sleepstudy_posteriors["collapsed"].idata
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    posterior = idata.posterior
    assert set(posterior.data_vars) == {"beta", "b_Subject", "sd_Subject", "cor_Subject", "sigma"}
    assert posterior["b_Subject"].dims == ("chain", "draw", "Subject", "Subject_coef")
    assert list(posterior["b_Subject"].coords["Subject_coef"].values) == ["Intercept", "Days"]
    assert "308" in posterior["b_Subject"].coords["Subject"].values
    assert list(posterior["beta"].coords["fixef"].values) == ["Intercept", "Days"]
    names = list(posterior.data_vars) + list(posterior.dims)
    assert not any(ch in name for name in names for ch in "|[]: ")
    assert idata.log_likelihood["Reaction"].shape == (4, 1000, 180)
    assert int(idata.sample_stats["diverging"].sum()) == 0
    # the log-likelihood is usable by ArviZ's model comparison
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_diagnostics_table_equals_arviz(sleepstudy_posteriors):
    for post in sleepstudy_posteriors.values():
        posterior = post.idata.posterior
        table = post.diagnostics(warn=False)
        assert list(table.index) == list(posterior.data_vars)
        with warnings.catch_warnings():  # the correlation matrix's constant diagonal
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = {
                "max_r_hat": (az.rhat(posterior), np.nanmax),
                "min_ess_bulk": (az.ess(posterior, method="bulk"), np.nanmin),
                "min_ess_tail": (az.ess(posterior, method="tail"), np.nanmin),
            }
        for column, (values, reduce) in reference.items():
            expected = [reduce(values[name].values) for name in posterior.data_vars]
            assert np.allclose(table[column], expected, rtol=1e-10, atol=0), column


def test_summary_tables_have_the_documented_columns(sleepstudy_posteriors):
    post = sleepstudy_posteriors["collapsed"]
    columns = ["mean", "sd", "lower", "upper", "mcse_mean", "ess_bulk", "r_hat"]
    assert list(post.fixef.columns) == columns
    assert list(post.ranef.columns) == ["grpvar", "term", "grp"] + columns
    assert list(post.varcorr.columns) == ["grp", "var1", "var2"] + columns
    assert list(post.varcorr.grp) == ["Subject", "Subject", "Subject", "Residual"]
    assert "Fixed effects" in post.summary()


def test_predictions_new_levels_and_predictive_are_wider(sleepstudy_posteriors, sleepstudy):
    post = sleepstudy_posteriors["collapsed"]
    new = pd.DataFrame({"Days": [5.0, 5.0], "Subject": ["308", "new subject"]})
    mean = post.predict(new, kind="mean")
    predictive = post.predict(new, kind="predictive")
    assert mean.loc[1, "sd"] > 2 * mean.loc[0, "sd"]  # a new subject: drawn from the population
    assert np.all(predictive["sd"] > mean["sd"])
    # the fitted subject's mean prediction is its posterior mean line
    draws = (
        post.beta_draws[..., 0]
        + 5 * post.beta_draws[..., 1]
        + post.term_draws(0)[..., 0, 0]
        + 5 * post.term_draws(0)[..., 0, 1]
    )
    assert mean.loc[0, "mean"] == pytest.approx(draws.mean(), rel=1e-10)
    # the table keeps newdata's row labels (it had 0..n-1: a column assigned from it landed on other rows)
    labelled = post.predict(new.set_axis([7, 3]), kind="mean")
    assert list(labelled.index) == [7, 3] and np.allclose(labelled["mean"], mean["mean"])


def test_eight_schools_matches_the_reference_posterior():
    data = pd.DataFrame({"y": EIGHT_SCHOOLS["y"], "se": EIGHT_SCHOOLS["se"], "school": list("ABCDEFGH")})
    priors = {"Intercept": dist.Normal(0, 5), "sd_school": dist.HalfCauchy(5)}
    post = hp.bayes("y ~ 1 + (1 | school)", data, se="se", priors=priors, seed=4)
    assert post.method == "collapsed"
    assert_matches_eight_schools(post)


def test_prior_overrides_take_effect():
    data = simulated(seed=1)
    post = hp.bayes("y ~ x + (1 | g)", data, priors={"Intercept": dist.Normal(10.0, 0.01)}, draws=300, tune=300, seed=5)
    assert post.fixef.loc["Intercept", "mean"] == pytest.approx(10.0, abs=0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"priors": {"Intercpt": dist.Normal(0, 1)}}, "Intercpt"),
        ({"priors": {"sd_Subjet": dist.HalfNormal(1)}}, "sd_Subjet"),
        ({"priors": {"Days": 3.0}}, "Days"),
        ({"priors": {"sd": dist.Normal(0, 1)}}, "positive support"),
        ({"priors": {"b": dist.Normal(np.zeros(2), 1.0)}}, "scalar"),
        ({"priors": {"cor": -1}}, "cor"),
        ({"priors": {"cor": float("inf")}}, "prior 'cor' \\(the LKJ concentration\\) must be a positive number"),
        ({"chains": 0}, "chains"),
        ({"draws": 0}, "draws"),
        ({"tune": -1}, "tune"),
        ({"method": "gibbs"}, "method"),
        ({"method": "collapsed", "priors": {"Days": dist.StudentT(3, 0, 10)}}, "collapsed"),
        ({"variance": "REML"}, "variance"),
        ({"weights": "wt"}, "'wt'"),
        ({"offset": "off"}, "'off'"),
        ({"weights": "Days"}, "weights column 'Days' must be positive"),
        ({"weights": [1.0, 2.0]}, "weights"),
        ({"offset": np.ones((180, 2))}, "offset"),
        ({"se": "Days", "weights": "Reaction"}, "weights"),
        ({"priors": [1]}, "priors must be a dict"),
        ({"progress": "no"}, "progress must be True or False"),
    ],
)
def test_bad_arguments_raise_a_named_error(sleepstudy, kwargs, match):
    with pytest.raises(hp.HierpoolError, match=match):
        hp.bayes("Reaction ~ Days + (Days | Subject)", sleepstudy, **kwargs)


def test_student_t_prior_is_sampled_by_the_full_sampler_and_acts():
    # Student-t(1000) is a Normal for all practical purposes: the full sampler under it must give the
    # collapsed sampler's posterior under the matching Normal prior, placed 2 se off the estimate so
    # that it pulls x about one se away from it.  An ignored or mis-scaled non-Normal prior fails.
    data = simulated(seed=2)
    fit = hp.lmm("y ~ x + (1 | g)", data)
    loc, scale = fit.fixef["x"] + 2 * fit.fixef_se["x"], fit.fixef_se["x"]
    settings = dict(draws=1000, tune=500, chains=2, seed=6)
    student = hp.bayes("y ~ x + (1 | g)", data, priors={"x": dist.StudentT(1000.0, loc, scale)}, **settings)
    normal = hp.bayes("y ~ x + (1 | g)", data, priors={"x": dist.Normal(loc, scale)}, **settings)
    assert student.method == "full" and normal.method == "collapsed"
    a, b = student.fixef.loc["x"], normal.fixef.loc["x"]
    assert abs(a["mean"] - b["mean"]) < Z_MAX * np.hypot(a["mcse_mean"], b["mcse_mean"]), (a, b)
    assert b["mean"] - fit.fixef["x"] > 0.5 * scale  # the prior moved the posterior
    from hierpool.bayesian.convergence import mcse_sd

    sd_errors = [mcse_sd(np.moveaxis(post.beta_draws, -1, 0))[1] for post in (student, normal)]
    assert abs(a["sd"] - b["sd"]) < Z_MAX * np.hypot(*sd_errors)


def test_two_by_two_correlation_prior_is_lkj():
    # the model's k = 2 shortcut (rho = 2u - 1, u ~ Beta(eta, eta)) against NumPyro's LKJCholesky draws:
    # prior draws of the model code itself (hierpool.bayesian.model.variance_parameters)
    import jax
    import scipy.stats
    from numpyro.infer import Predictive

    from hierpool.bayesian.model import variance_parameters
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    eta = 3.0
    priors = resolve_priors(build_design("y ~ x + (x | g)", simulated(seed=0)), {"cor": eta})
    # jitted: unjitted, each of the samplers' operations compiles alone (over forty small programs)
    draws = jax.jit(Predictive(lambda: variance_parameters(priors, (2,)), num_samples=20000))(jax.random.PRNGKey(1))
    model_rho = np.asarray(draws["cor__0"])[:, 1, 0]
    lkj_rho = jax.jit(lambda key, concentration: dist.LKJCholesky(2, concentration).sample(key, (20000,))[:, 1, 0])
    lkj = np.asarray(lkj_rho(jax.random.PRNGKey(0), eta))
    assert scipy.stats.ks_2samp(lkj, model_rho).pvalue > 0.001
    # and the test has power: the eta = 1 (uniform) prior is rejected
    uniform = np.asarray(lkj_rho(jax.random.PRNGKey(2), 1.0))
    assert scipy.stats.ks_2samp(uniform, model_rho).pvalue < 1e-6


def test_a_second_fit_of_the_same_shape_reuses_the_compiled_sampler(monkeypatch):
    from hierpool.bayesian import nuts

    first, second = simulated(seed=3), simulated(seed=4)  # same shape, other values (and default prior scales)
    hp.bayes("y ~ x + (1 | g)", first, draws=200, tune=200, seed=8)
    monkeypatch.setattr(nuts, "_build_programs", lambda *a, **k: pytest.fail("recompiled"))
    post = hp.bayes("y ~ x + (1 | g)", second, draws=200, tune=200, seed=8)
    assert np.isfinite(post.fixef["mean"]).all()


def test_only_short_runs_of_small_models_compile_without_llvm_optimization(sleepstudy):
    from hierpool.algebra.statistics import one_dataset_statistics
    from hierpool.bayesian import nuts
    from hierpool.bayesian.model import model_data
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    design = build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)
    priors = resolve_priors(design, None)
    loc, scale = priors.beta_gaussian()
    one_term = (one_dataset_statistics(design), loc, scale, priors)
    assert nuts.quick_compile(one_term, chains=4, iterations=2000)
    assert not nuts.quick_compile(one_term, chains=4, iterations=200_000)  # long runs keep LLVM's optimization
    assert not nuts.quick_compile((model_data(design), priors, None), chains=4, iterations=2000)  # the full model


def test_progress_bar_only_when_asked_or_on_a_terminal(sleepstudy, capsys):
    formula = "Reaction ~ Days + (1 | Subject)"
    hp.bayes(formula, sleepstudy, chains=2, draws=50, tune=50, seed=1)  # stderr is not a terminal here
    assert "sampling" not in capsys.readouterr().err
    hp.bayes(formula, sleepstudy, chains=2, draws=50, tune=50, seed=1, progress=True)
    assert "sampling 2 chain(s)" in capsys.readouterr().err


def test_a_groups_dimension_never_takes_a_variables_name():
    """(1 | a/b) with columns a and b: term b:a's levels were the dimension b_a, the name of term a's effects, and
    xarray took that variable for the dimension's coordinate (term a's draws lost, ranef a raw ValueError)."""
    from hierpool.bayesian.posterior import build_inference_data
    from hierpool.spec.design import build_design

    rng = np.random.default_rng(4)
    a, b = np.repeat(np.arange(6), 8), np.tile(np.repeat(np.arange(4), 2), 6)
    frame = pd.DataFrame({"a": [f"a{i}" for i in a], "b": [f"b{i}" for i in b], "y": rng.normal(size=a.size)})
    design = build_design("y ~ 1 + (1 | a/b)", frame)
    draws = [rng.normal(size=(2, 3, t.n_levels, t.k)) for t in design.terms]
    idata = build_inference_data(design, np.zeros((2, 3, 1)), draws, [np.ones((2, 3, t.k)) for t in design.terms],
                                 [None] * 2, np.ones((2, 3)), None, None)
    by_group = {t.group: j for j, t in enumerate(design.terms)}
    assert set(by_group) == {"a", "b:a"}
    np.testing.assert_array_equal(idata.posterior["b_a"].values, draws[by_group["a"]])
    np.testing.assert_array_equal(idata.posterior["b_b_a"].values, draws[by_group["b:a"]])
    assert idata.posterior["b_b_a"].dims[2] == "b_a_level" and idata.posterior["b_a"].dims[2] == "a"


def test_the_default_intercept_prior_does_not_depend_on_where_a_covariate_is_centred(sleepstudy):
    # the default intercept prior is the centred predictors' (rstanarm's, brms's) carried to x = 0: Days counted
    # from 2000 gives the same slope and the intercept moved by 2000 slopes.  On the intercept itself, Normal(mean(y),
    # 2.5 sd(y)) held it near mean(y) at x = 0, two thousand days from the data: the slope came out 0.04, not 10.5
    settings = {"draws": 1000, "tune": 500, "chains": 2, "seed": 4, "progress": False}
    plain = hp.bayes("Reaction ~ Days + (1 | Subject)", sleepstudy, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hp.HierpoolWarning)  # 700 sds from zero: no column to centre (below)
        moved = hp.bayes("Reaction ~ Days + (1 | Subject)", sleepstudy.assign(Days=sleepstudy["Days"] + 2000),
                         **settings)
    a, b = plain.fixef.loc["Days"], moved.fixef.loc["Days"]
    assert abs(a["mean"] - b["mean"]) < Z_MAX * np.hypot(a["mcse_mean"], b["mcse_mean"]), (a, b)
    assert b["sd"] == pytest.approx(a["sd"], rel=0.1)
    at_zero = moved.beta_draws[..., 0] + 2000 * moved.beta_draws[..., 1]  # the moved model's intercept at Days = 0
    assert abs(at_zero.mean() - plain.fixef.loc["Intercept", "mean"]) < 0.1 * plain.fixef.loc["Intercept", "sd"]


def test_a_fixed_effect_column_too_far_from_zero_for_the_samplers_digits_is_named(sleepstudy):
    # Days + 1e7 (3.5e6 sds from zero): the collapsed sampler, which integrates beta out on X's own columns, moved
    # the slope's posterior mean by 0.45 sd without a sign (hp.lmm conditions such a column; the sampler cannot, its
    # priors being on the user's coefficients); hp.bayes and bayes_batch now name the column, and the datasets
    frames = [sleepstudy.assign(Days=sleepstudy["Days"] + 1e7), sleepstudy]
    settings = {"draws": 20, "tune": 20, "chains": 1, "seed": 1, "progress": False}
    with pytest.warns(hp.HierpoolWarning, match=r"column 'Days' lies 3.5e\+06 of its sds from zero: .*I\(Days - 10000004.5\)"):
        hp.bayes("Reaction ~ Days + (1 | Subject)", frames[0], **settings)
    with pytest.warns(hp.HierpoolWarning, match=r"'Days' lies 3.5e\+06 of its sds from zero in 1 of 2 datasets"):
        hp.bayes_batch("Reaction ~ Days + (1 | Subject)", frames, **settings)
    # the exact draws at a held variance failed in float64 there: NaN posteriors, now refused
    held = hp.lmm("Reaction ~ Days + (Days | Subject)", frames[0])
    with pytest.warns(hp.HierpoolWarning, match="sds from zero"), pytest.raises(hp.HierpoolError, match="not finite"):
        hp.bayes("Reaction ~ Days + (Days | Subject)", frames[0], variance=held, **settings)


def test_the_default_intercept_prior_reads_the_slopes_priors_and_stays_proper(sleepstudy):
    # beta_0 = alpha - xbar beta: its mean moves with a slope prior's mean; a slope prior without a finite variance
    # (Cauchy, Student-t of 2 degrees, flat, an improper uniform) counts as the default slope prior, so that the
    # intercept's prior stays proper (a flat one beside a Cauchy slope left a separated binomial's posterior improper)
    from hierpool.bayesian.priors import resolve_priors
    from hierpool.spec.design import build_design

    moved = sleepstudy.assign(Days=sleepstudy["Days"] + 2000)
    design = build_design("Reaction ~ Days + (1 | Subject)", moved)
    xbar, s_y, s_x = moved["Days"].mean(), moved["Reaction"].std(ddof=0), moved["Days"].std(ddof=0)
    default = resolve_priors(design, None).beta[0]
    assert float(default.loc) == pytest.approx(moved["Reaction"].mean())
    assert float(default.scale) == pytest.approx(np.hypot(2.5 * s_y, xbar * 2.5 * s_y / s_x))
    shifted = resolve_priors(design, {"b": dist.Normal(10.0, 1.0)}).beta[0]
    assert float(shifted.loc) == pytest.approx(moved["Reaction"].mean() - xbar * 10.0)
    assert float(shifted.scale) == pytest.approx(np.hypot(2.5 * s_y, xbar))
    for heavy in (dist.Cauchy(0.0, 2.5), dist.StudentT(2.0, 0.0, 1.0), "flat",
                  dist.ImproperUniform(dist.constraints.real, (), ())):
        intercept = resolve_priors(design, {"Days": heavy}).beta[0]
        assert isinstance(intercept, dist.Normal) and float(intercept.scale) == pytest.approx(float(default.scale))


def test_arguments_that_passed_and_then_failed_inside_the_sampler_are_refused_by_name():
    """A probe's findings: an AR(1) fit held by variance= without correlation= sampled independent residuals at the
    AR(1) model's theta and sigma (fixed-effect sds 5.38 for 6.74), its varcorr still showing phi; a resolved Priors
    of another model raised JAX's shape errors (or a Poisson model took a Gaussian's silently); draws of 1 to 3
    crashed in the split-chain diagnostics; bayes_batch's max_tree_depth=0 raised an IndexError; and a Uniform(0, 100)
    sd prior was refused as if its support were not positive."""
    from hierpool.bayesian.priors import resolve_priors

    sleep = hp.datasets.sleepstudy()
    formula = "Reaction ~ Days + (Days | Subject)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ar1 = hp.lmm(formula, sleep, correlation=hp.ar1("Subject", time="Days"))
    with pytest.raises(hp.ArgumentError, match="variance: the lmm fit has AR\\(1\\) residuals"):
        hp.bayes(formula, sleep, variance=ar1)
    other = resolve_priors(hp.MixedModel("Reaction ~ Days * I(Days > 4) + (1 | Subject)", sleep).design, None)
    with pytest.raises(hp.ArgumentError, match="priors: this resolved Priors is not this model's: 4 fixed-effect"):
        hp.bayes(formula, sleep, priors=other)
    own = resolve_priors(hp.MixedModel(formula, sleep).design, None)
    with pytest.raises(hp.ArgumentError, match="a residual sd's prior for a model without one"):
        hp.bayes("y ~ Days + (Days | Subject)", sleep.assign(y=(sleep["Reaction"] // 50).astype(int)),
                 family="poisson", priors=own)
    with pytest.raises(hp.ArgumentError, match="draws"):
        hp.bayes(formula, sleep, draws=3)
    with pytest.raises(hp.ArgumentError, match="max_tree_depth"):
        hp.bayes_batch(formula, [sleep, sleep], max_tree_depth=0, progress=False)
    design = hp.MixedModel(formula, sleep).design
    uniform = resolve_priors(design, {"sd": dist.Uniform(0.0, 100.0)})  # refused before: "must have positive support"
    assert float(uniform.sd[0].log_prob(np.array([50.0, 1.0])).sum()) == pytest.approx(2 * np.log(0.01))
    for wrong in (dist.Uniform(-1.0, 100.0), dist.Poisson(30.0)):  # below zero; discrete (NUTS cannot move it)
        with pytest.raises(hp.ArgumentError, match="prior 'sd' must have positive support"):
            resolve_priors(design, {"sd": wrong})
