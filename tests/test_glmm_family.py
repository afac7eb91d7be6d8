"""GLMM response families: names and checks (spec.family) and their numerics (algebra.family),
against SciPy's distributions and the definitions R's family objects use."""

import numpy as np
import pytest
import scipy.stats

from hierpool.algebra.family import Link, family
from hierpool.errors import ArgumentError, DataError
from hierpool.spec.family import FamilySpec, check_response, family_spec


def test_family_names_aliases_and_links():
    assert family_spec("binomial") == FamilySpec("binomial", "logit")
    assert family_spec("Bernoulli", "probit") == FamilySpec("binomial", "probit", bernoulli=True)
    assert family_spec("nbinom2") == FamilySpec("negative_binomial", "log")
    assert family_spec("poisson").link == "log"
    with pytest.raises(ArgumentError, match="family 'gamma' is not supported"):
        family_spec("gamma")
    with pytest.raises(ArgumentError, match="link 'probit' is not available for family 'poisson'"):
        family_spec("poisson", "probit")
    with pytest.raises(ArgumentError, match="family must be a string"):
        family_spec(3)


@pytest.mark.parametrize("spec,y,trials,message", [
    (FamilySpec("binomial", "logit"), [0.0, 1.2], None, "must be 0/1 or a proportion"),
    (FamilySpec("binomial", "logit"), [0.0, 0.5], None, "proportions but no trials"),
    (FamilySpec("binomial", "logit"), [0.0, 0.5], [2.0, 3.0], "not a whole number of successes"),
    (FamilySpec("binomial", "logit"), [0.0, 0.5], [2.0, 2.5], "trials .* whole numbers"),
    (FamilySpec("binomial", "logit", bernoulli=True), [0.0, 0.5], [2.0, 2.0], "bernoulli model must be 0/1"),
    (FamilySpec("poisson", "log"), [0.0, -1.0], None, "non-negative whole counts; found -1.0"),
    (FamilySpec("negative_binomial", "log"), [0.0, 2.5], None, "non-negative whole counts; found 2.5"),
])
def test_a_response_that_does_not_fit_its_family_is_refused_by_name(spec, y, trials, message):
    with pytest.raises(DataError, match=message) as raised:
        check_response(spec, np.array(y), None if trials is None else np.array(trials), "y")
    assert "response 'y'" in str(raised.value)


def test_responses_that_fit_are_accepted():
    check_response(FamilySpec("binomial", "logit"), np.array([0.0, 0.5, 1.0]), np.array([3.0, 2.0, 1.0]), "y")
    check_response(FamilySpec("binomial", "logit", bernoulli=True), np.array([0.0, 1.0]), None, "y")
    check_response(FamilySpec("poisson", "log"), np.array([0.0, 3.0, 12.0]), None, "y")


@pytest.mark.parametrize("name", ["logit", "probit", "cloglog", "log"])
def test_each_link_inverts_and_differentiates(name):
    link = Link(name)
    eta = np.linspace(-4.0, 2.5, 27)
    np.testing.assert_allclose(link(link.inverse(eta)), eta, rtol=1e-9, atol=1e-9)
    step = 1e-6
    numeric = (link.inverse(eta + step) - link.inverse(eta - step)) / (2 * step)
    np.testing.assert_allclose(link.mu_eta(eta), numeric, rtol=1e-6)


def test_links_are_clamped_as_r_clamps_them():
    # make.link / family.c: mu stays inside (0, 1) and d mu / d eta >= eps far out
    eps = np.finfo(float).eps
    for name in ("logit", "probit", "cloglog"):
        mu = Link(name).inverse(np.array([-800.0, 800.0]))
        assert 0 < mu[0] < 1e-15 and 1 - 1e-15 < mu[1] < 1 or mu[1] == 1 - eps
        assert np.all(Link(name).mu_eta(np.array([-800.0, 800.0])) >= eps)
    assert Link("logit").inverse(np.array([-31.0]))[0] == pytest.approx(eps / (1 + eps), rel=1e-12)


def _rows(seed=0, n=40):
    rng = np.random.default_rng(seed)
    trials = rng.integers(1, 12, n).astype(float)
    successes = rng.binomial(trials.astype(int), 0.4)
    mu = rng.uniform(0.05, 0.95, n)
    counts = rng.poisson(3.0, n).astype(float)
    rates = rng.uniform(0.5, 6.0, n)
    return trials, successes / trials, mu, counts, rates


def test_log_likelihoods_are_scipys_distributions():
    trials, y, mu, counts, rates = _rows()
    binomial = family(FamilySpec("binomial", "logit"))
    np.testing.assert_allclose(binomial.log_likelihood(y, mu, trials),
                               scipy.stats.binom.logpmf(np.round(y * trials), trials, mu), rtol=1e-12)
    poisson = family(FamilySpec("poisson", "log"))
    np.testing.assert_allclose(poisson.log_likelihood(counts, rates, np.ones_like(counts)),
                               scipy.stats.poisson.logpmf(counts, rates), rtol=1e-12)
    theta = 2.7
    negbin = family(FamilySpec("negative_binomial", "log"), shape=theta)
    np.testing.assert_allclose(negbin.log_likelihood(counts, rates, np.ones_like(counts)),
                               scipy.stats.nbinom.logpmf(counts, theta, theta / (theta + rates)), rtol=1e-11)
    np.testing.assert_allclose(negbin.variance(rates), scipy.stats.nbinom.var(theta, theta / (theta + rates)))


def test_unit_deviances_are_twice_the_log_likelihood_lost_to_the_saturated_model():
    trials, y, mu, counts, rates = _rows(1)
    for fam, response, mean, weights in [
        (family(FamilySpec("binomial", "logit")), y, mu, trials),
        (family(FamilySpec("poisson", "log")), counts, rates, np.ones_like(counts)),
        (family(FamilySpec("negative_binomial", "log"), shape=1.9), counts, rates, np.ones_like(counts)),
    ]:
        with np.errstate(divide="ignore", invalid="ignore"):  # mu = y exactly, at 0 and 1 too: 0 log 0 = 0
            saturated = fam.log_likelihood(response, np.clip(response, 1e-300, None), weights)
        np.testing.assert_allclose(fam.unit_deviances(response, mean, weights),
                                   2.0 * (saturated - fam.log_likelihood(response, mean, weights)), rtol=1e-9,
                                   atol=1e-10)


def test_y_log_y_is_r_s_to_the_bit_and_an_overflowed_mean_s_deviance_is_infinite():
    rng = np.random.default_rng(3)
    mu = rng.uniform(1e-12, 1 - 1e-12, 500)
    binomial, poisson = family(FamilySpec("binomial", "logit")), family(FamilySpec("poisson", "log"))
    for y in (rng.integers(0, 2, 500).astype(float), rng.integers(0, 8, 500) / 7.0):  # Bernoulli, proportions
        with np.errstate(divide="ignore"):  # R's y_log_y: a select, 0 at y = 0
            r = [np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / m), 0.0) for a, m in ((y, mu), (1 - y, 1 - mu))]
        np.testing.assert_array_equal(binomial.unit_deviances(y, mu, np.full(500, 2.0)), 2.0 * 2.0 * (r[0] + r[1]))
        single = binomial.unit_deviances(*(np.asarray(a, np.float32) for a in (y, np.clip(mu, 1e-6, 1 - 1e-6), 1.0)))
        assert single.dtype == np.float32 and np.all(np.isfinite(single))  # the floor is float32's (0 at y = 0)
    counts = rng.poisson(2.0, 500).astype(float)
    with np.errstate(divide="ignore"):
        r = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0) / (mu * 4)), 0.0)
    np.testing.assert_array_equal(poisson.unit_deviances(counts, mu * 4, np.ones(500)), 2.0 * (r - (counts - mu * 4)))
    integers = counts.astype(int)  # integer counts and means: the floor is a float type's
    np.testing.assert_array_equal(poisson.unit_deviances(integers, integers + 1, np.ones(500)),
                                  poisson.unit_deviances(counts, counts + 1.0, np.ones(500)))
    with np.errstate(over="ignore"):  # a log link's mean overflowed (a PIRLS step too far): +inf, not NaN
        assert np.all(poisson.unit_deviances(np.array([0.0, 3.0]), np.exp([800.0, 800.0]), np.ones(2)) == np.inf)


def test_working_weights_and_residuals_are_the_fisher_scoring_ones():
    trials, y, mu, counts, rates = _rows(2)
    fam = family(FamilySpec("binomial", "probit"))
    eta = fam.link(mu)
    mean, w, residual = fam.working(y, eta, trials)
    np.testing.assert_allclose(mean, mu, rtol=1e-12)
    d = fam.link.mu_eta(eta)
    np.testing.assert_allclose(w, trials * d**2 / (mu * (1 - mu)), rtol=1e-12)
    np.testing.assert_allclose(residual * d, y - mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fam.starting_mean(y, trials), (trials * y + 0.5) / (trials + 1.0))


def test_the_same_numbers_in_a_compiled_program():
    import jax

    trials, y, mu, counts, rates = _rows(3)
    fam = family(FamilySpec("binomial", "cloglog"))
    eta = fam.link(mu)
    host = (fam.log_likelihood(y, mu, trials), *fam.working(y, eta, trials), fam.unit_deviances(y, mu, trials))
    compiled = jax.jit(lambda y, mu, eta, a: (fam.log_likelihood(y, mu, a), *fam.working(y, eta, a),
                                              fam.unit_deviances(y, mu, a)))(y, mu, eta, trials)
    for a, b in zip(host, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_a_negative_binomial_needs_its_shape():
    with pytest.raises(ValueError, match="needs its shape"):
        family(FamilySpec("negative_binomial", "log"))


def test_a_negative_binomial_s_log_likelihood_holds_its_digits_at_any_shape():
    # log Gamma(y + theta) - log Gamma(theta) kept no digit near theta = 1e25 (the Poisson limit, where a fit's
    # shape can run): Stirling's series from STIRLING_FROM on, continuous there, and the Poisson's in the limit
    from hierpool.algebra.family import STIRLING_FROM, log_likelihood_eta

    counts = np.array([0.0, 1.0, 3.0, 7.0, 20.0, 150.0])
    rates = np.array([0.5, 2.0, 3.3, 5.0, 18.0, 140.0])
    ones = np.ones_like(counts)

    def negbin(theta):
        return family(FamilySpec("negative_binomial", "log"), shape=theta)

    below, above = (negbin(STIRLING_FROM * (1 + s)).log_likelihood(counts, rates, ones) for s in (-1e-12, 1e-12))
    np.testing.assert_allclose(below, above, rtol=1e-12, atol=1e-12)
    for theta in (30.0, 3e4):  # either side: scipy's
        np.testing.assert_allclose(negbin(theta).log_likelihood(counts, rates, ones),
                                   scipy.stats.nbinom.logpmf(counts, theta, theta / (theta + rates)), rtol=1e-10)
    poisson = scipy.stats.poisson.logpmf(counts, rates)
    for theta in (1e12, 1e20, 4.5e25):  # NB2 - Poisson ~ (y - mu)^2 / (2 theta): nothing left at these shapes
        np.testing.assert_allclose(negbin(theta).log_likelihood(counts, rates, ones), poisson, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(log_likelihood_eta("negative_binomial", "log", counts, np.log(rates), ones,
                                                      shape=theta), poisson, rtol=1e-9, atol=1e-9)
    # a mean far above y + theta (a PIRLS trial far out): the deviance keeps mu's digits, and stays finite
    means = np.array([1e8, 1e15, 2.35e17])
    np.testing.assert_allclose(negbin(2.5).unit_deviances(np.zeros(3), means, np.ones(3)),
                               2 * 2.5 * np.log1p(means / 2.5), rtol=1e-14)
    for theta in (1e12, 1e20, 4.5e25):
        # the unit deviances too (the ratio (y + theta) / (mu + theta) rounds to 1 there)
        np.testing.assert_allclose(negbin(theta).unit_deviances(counts, rates, ones),
                                   family(FamilySpec("poisson", "log")).unit_deviances(counts, rates, ones),
                                   rtol=1e-8, atol=1e-10)
    # traced, its derivative in the shape (a sampler's): finite everywhere, the difference quotient's, 0 in the limit
    import jax

    def total(log_shape):
        return jax.numpy.sum(log_likelihood_eta("negative_binomial", "log", counts, np.log(rates), ones,
                                                shape=jax.numpy.exp(log_shape)))

    slope = jax.grad(total)
    for theta in (3.7, 2e3):
        h = 1e-4
        central = (float(total(np.log(theta) + h)) - float(total(np.log(theta) - h))) / (2 * h)
        assert float(slope(np.log(theta))) == pytest.approx(central, rel=1e-6)
    assert abs(float(slope(np.log(1e200)))) < 1e-10
