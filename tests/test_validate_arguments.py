"""hp.validate's public helpers refuse bad arguments by name (ArgumentError), before any fit or sampling."""

import importlib

import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.closedform.results import LMMResult
from hierpool.validate.glmm_agreement import simulate_binomial_groups
from hierpool.validate.glmm_coverage import simulate_glmm_study

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def no_fitting(monkeypatch):
    """Every refusal comes before a fit or a sampler runs: one that ran fails the test."""
    def fitted(*arguments, **options):
        raise AssertionError("a fit or sampler ran before the arguments were checked")

    # by module name: hp.validate's attributes coverage, sbc, ... are the functions, which hide their modules
    for name in ("agreement", "ar1_coverage", "coverage", "glmm_agreement", "glmm_coverage", "relmat_coverage",
                 "glmm_sbc", "samplers", "sbc", "spatial_sbc"):
        module = importlib.import_module(f"hierpool.validate.{name}")
        for name in ("lmm", "glmm", "bayes"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fitted)


def not_fitted_lmm():
    """An LMMResult that was never fitted: refused by type before any of its attributes is read."""
    return object.__new__(LMMResult)


@pytest.mark.parametrize("call, name", [
    (lambda: hp.validate.compare(not_fitted_lmm(), None), "posterior"),
    (lambda: hp.validate.compare(None, None), "fit"),
    (lambda: hp.validate.compare_spatial(None, None), "fit"),
    (lambda: hp.validate.compare_samplers(None, None), "collapsed"),
    (lambda: hp.validate.flat_beta_priors(None), "fit"),
    (lambda: hp.validate.mode_agreement(not_fitted_lmm()), "fit"),
])
def test_results_of_the_wrong_kind_are_refused_by_name(call, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must be"):
        call()


@pytest.mark.parametrize("tolerance", [-1, 0, float("nan"), float("inf"), "1e-6"])
def test_mode_agreement_refuses_a_bad_tolerance(tolerance, monkeypatch):
    from hierpool.closedform.glmm_results import GLMMResult

    fit = object.__new__(GLMMResult)
    with pytest.raises(hp.ArgumentError, match="tolerance must be a finite number > 0"):
        hp.validate.mode_agreement(fit, tolerance=tolerance)


@pytest.mark.parametrize("call, name", [
    (lambda: hp.validate.coverage(level=2), "level"),
    (lambda: hp.validate.coverage(n_reps=0), "n_reps"),
    (lambda: hp.validate.coverage(with_bayes="no"), "with_bayes"),
    (lambda: hp.validate.coverage(draws=0), "draws"),
    (lambda: hp.validate.ar1_coverage(steps=0), "steps"),
    (lambda: hp.validate.ar1_coverage(phi=1.5), "phi"),
    (lambda: hp.validate.ar1_coverage(level=0), "level"),
    (lambda: hp.validate.glmm_coverage(family="foo"), "family"),
    (lambda: hp.validate.glmm_coverage(n_reps="3"), "n_reps"),
    (lambda: hp.validate.glmm_coverage(rich_size=0), "rich_size"),
    (lambda: hp.validate.relmat_coverage(founders=1), "founders"),
    (lambda: hp.validate.relmat_coverage(sigma_a2=-1), "sigma_a2"),
    (lambda: hp.validate.relmat_coverage(level=float("nan")), "level"),
])
def test_coverage_studies_refuse_bad_settings(call, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must"):
        call()


@pytest.mark.parametrize("call, name", [
    (lambda: hp.validate.simulate_study(RNG, sd_b=-1), "sd_b"),
    (lambda: hp.validate.simulate_study(RNG, sigma=float("nan")), "sigma"),
    (lambda: hp.validate.simulate_study(1), "rng"),
    (lambda: hp.validate.simulate_study(RNG, n_groups=0), "n_groups"),
    (lambda: hp.validate.simulate_ar1_study(RNG, phi=-2), "phi"),
    (lambda: hp.validate.simulate_ar1_study(RNG, block=0), "block"),
    (lambda: hp.validate.simulate_ar1_study(RNG, steps=0), "steps"),
    (lambda: hp.validate.simulate_ar1_study(RNG, steps=1), "steps"),  # series of one row: phi not fitted
    (lambda: hp.validate.simulate_pedigree(RNG, founders=1), "founders"),
    (lambda: hp.validate.simulate_pedigree(RNG, per_generation=1), "per_generation"),
    (lambda: simulate_binomial_groups(0, RNG), "trials"),
    (lambda: simulate_binomial_groups(2, RNG, sd=-1), "sd"),
    (lambda: simulate_glmm_study(1), "rng"),
])
def test_simulators_refuse_bad_arguments(call, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must"):
        call()


@pytest.mark.parametrize("arguments, name", [
    ((0, 10, 0.01), "n_reps"),
    ((10, 0, 0.01), "n_draws"),
    ((10, 10, 1.5), "alpha"),
    ((10, 10, 0.01, 0), "n_sim"),
])
def test_ecdf_band_refuses_bad_arguments(arguments, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must"):
        hp.validate.ecdf_band(*arguments)


@pytest.mark.parametrize("n_tests, alpha, name", [
    (0, 0.01, "n_tests"), (-1, 0.01, "n_tests"), ("3", 0.01, "n_tests"), (3, float("nan"), "alpha"),
])
def test_bonferroni_threshold_refuses_bad_arguments(n_tests, alpha, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must"):
        hp.validate.bonferroni_threshold(n_tests, alpha)


@pytest.mark.parametrize("setting, name", [
    ({"bins": 0}, "bins"), ({"bins": 1}, "bins"), ({"n_draws": 0}, "n_draws"), ({"chains": 0}, "chains"),
    ({"tune": -1}, "tune"), ({"alpha": 0}, "alpha"), ({"draws_per_chain": 2}, "draws_per_chain"), ({"n_reps": "10"}, "n_reps"),
])
def test_sbc_refuses_bad_settings(setting, name):
    data = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0], "x": [0.0, 1.0, 0.0, 1.0], "g": list("aabb")})
    with pytest.raises(hp.ArgumentError, match=rf"^{name} must"):
        hp.validate.sbc("y ~ x + (1 | g)", data, **setting)


@pytest.mark.parametrize("call, name", [
    (lambda: hp.validate.blup_agreement("y ~ 1 + (1 | g)", None, chains="4"), "chains"),
    (lambda: hp.validate.blup_agreement("y ~ 1 + (1 | g)", None, r_hat_max=float("nan")), "r_hat_max"),
    (lambda: hp.validate.blup_agreement("y ~ 1 + (1 | g)", None, draws=0), "draws"),
    (lambda: hp.validate.sampler_agreement("y ~ 1 + (1 | g)", None, max_divergent_share=2), "max_divergent_share"),
    (lambda: hp.validate.mode_mean_gap("y ~ 1 + (1 | g)", None, target_accept=1), "target_accept"),
    (lambda: hp.validate.agreement_series(None, [6]), "simulate"),
    (lambda: hp.validate.mode_mean_gap_series(sizes=[0]), "sizes"),
])
def test_agreement_checks_refuse_bad_settings_before_fitting(call, name):
    with pytest.raises(hp.ArgumentError, match=rf"^{name}"):
        call()
