"""Response families of generalized linear mixed models: links, variances, deviances and log-likelihoods.

The algebra's *family* seam (:mod:`hierpool.algebra`).  Given the linear predictor eta, a family
gives the mean mu = g^-1(eta), the variance function V(mu), the Fisher weights and working response

    w_i = a_i (d mu_i / d eta_i)^2 / V(mu_i),     z_i = eta_i + (y_i - mu_i) / (d mu_i / d eta_i)

(a_i the prior weights: binomial trials, or weights=), with which a penalized iteratively reweighted
least-squares step is one weighted Henderson solve (McCullagh & Nelder 1989, sec. 2.5; Bates et al.
2015, sec. 5 on lme4's PIRLS; hierpool's PIRLS takes Newton's weights instead for a non-canonical
link, :func:`hierpool.algebra.laplace.newton_working`, and these at the mode), and the conditional
log-likelihood log p(y | mu) that the Laplace criterion -2 log p(y | mu(u)) + |u|^2 + log |L|^2
adds (lme4's ``glmResp::Laplace``).

Conventions are R's, so that numbers match glmer: the clamps of ``binomial()$linkinv`` and
``$mu.eta`` (``make.link``), the unit deviances of ``binomial()$dev.resids`` and
``poisson()$dev.resids``, the log-likelihood of ``$aic`` (binomial: ``dbinom(round(a y), round(a), mu)``
per row), MASS's ``negative.binomial(theta)`` for NB2 with shape theta (variance mu + mu^2 / theta), and
``$mustart`` for the starting means.  Every function runs on NumPy arrays on the host and on traced
arrays in a compiled program (:func:`~hierpool.algebra.linalg.array_namespace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec.family import FamilySpec
from .jax_runtime import jax
from .linalg import array_namespace

EPS = float(np.finfo(float).eps)
#: R's logit thresholds (``family.c``): beyond +-30 the inverse link is clamped and d mu / d eta is eps.
LOGIT_THRESHOLD = 30.0
#: R's probit threshold, -qnorm(eps): the linear predictor is clamped to +-it.
PROBIT_THRESHOLD = 8.125890664701906


def _special(xp):
    # SciPy's special functions on the host, JAX's in a program (imported only when a family needs them)
    if xp is np:
        import scipy.special

        return scipy.special
    return jax.scipy.special


#: The shape from which log Gamma(theta + y) - log Gamma(theta) comes from Stirling's series (:func:`log_gamma_ratio`).
STIRLING_FROM = 1e3


def _stirling_remainder(x):
    """log Gamma(x) - ((x - 1/2) log x - x + log(2 pi) / 2), for x >= :data:`STIRLING_FROM` (error below 1e-24)."""
    inverse = 1.0 / x
    squared = inverse * inverse
    return inverse * (1.0 / 12.0 - squared * (1.0 / 360.0 - squared / 1260.0))


def log_gamma_ratio(shape, y):
    """log Gamma(shape + y) - log Gamma(shape) - y log(shape), without cancellation at a large shape.

    log Gamma of a shape near 1e25 (a negative binomial's Poisson limit) is ~1e27, and the difference of two of them
    kept no digit: a fit's log-likelihood came out 95 too high there, and its optimizer ran the shape to infinity
    for it.  From :data:`STIRLING_FROM` on, Stirling's series gives the same quantity as
    (shape + y - 1/2) log1p(y / shape) - y plus the series' remainders (R's ``dnbinom`` likewise avoids the
    difference, through its binomial-deviance form).  NumPy or traced."""
    xp = array_namespace(shape, y)
    gammaln = _special(xp).gammaln
    large = shape >= STIRLING_FROM
    small_shape = xp.where(large, 1.0, shape)
    # (capped where the value no longer moves: y / shape's derivative squares the shape, which overflows past 1e154)
    big_shape = xp.where(large, xp.minimum(shape, 1e150), STIRLING_FROM)
    direct = gammaln(small_shape + y) - gammaln(small_shape) - y * xp.log(small_shape)
    stirling = ((big_shape + y - 0.5) * xp.log1p(y / big_shape) - y
                + _stirling_remainder(big_shape + y) - _stirling_remainder(big_shape))
    return xp.where(large, stirling, direct)


def negative_binomial_mean_terms(y, log_mu, shape):
    """y log mu - (theta + y) log(1 + mu / theta): the terms of NB2's log p(y | mu) in mu, with -y log theta taken
    out of theta log theta - (theta + y) log(theta + mu) (it stays with :func:`log_gamma_ratio`), so that neither
    part loses digits at a large shape.  ``y log mu`` is 0 at y = 0 whatever mu.  NumPy or traced."""
    xp = array_namespace(y, log_mu, shape)
    return y * xp.where(y > 0, log_mu, 0.0) - (shape + y) * xp.logaddexp(0.0, log_mu - xp.log(shape))


def negative_binomial_log_density(y, log_mu, shape):
    """log p(y | mu) of NB2 (variance mu + mu^2 / shape) on log mu, without the log y! term:

        log Gamma(y + theta) - log Gamma(theta) + theta log theta + y log mu - (theta + y) log(theta + mu)
        = [log Gamma(y + theta) - log Gamma(theta) - y log theta] + y log mu - (theta + y) log(1 + mu / theta),

    the second form exact at any shape, the Poisson limit included."""
    return log_gamma_ratio(shape, y) + negative_binomial_mean_terms(y, log_mu, shape)


def _y_log_y(y, mu, xp):
    """y log(y / mu), 0 where y = 0 (R's ``y_log_y``), for y >= 0 and mu > 0.

    Without a select: at y = 0 the ratio is tiny / mu (tiny the smallest normal number of the arrays' type), whose
    log is finite, times 0; the ratio floored at tiny keeps the log finite at mu = inf too (an overflowed log link's
    mean: the Poisson deviance is then +inf).  Where y / mu >= tiny the value is R's to the bit.  A select on the
    rows' pattern of zeros costs more than the log (PIRLS takes the deviance of a batch's rows at every step and
    halving: benchmarks/RESULTS.md, twenty-third session)."""
    # float32's in such a program (float64's would round to 0); a float type for integer counts and means
    tiny = xp.finfo(xp.result_type(y, mu, 1.0)).tiny
    return y * xp.log(xp.maximum(xp.maximum(y, tiny) / mu, tiny))


@dataclass(frozen=True)
class Link:
    """A link function g by name: ``logit``, ``probit``, ``cloglog`` or ``log``."""

    name: str

    def __call__(self, mu):
        """eta = g(mu)."""
        xp = array_namespace(mu)
        if self.name == "logit":
            return xp.log(mu / (1.0 - mu))
        if self.name == "probit":
            return _special(xp).ndtri(mu)
        if self.name == "cloglog":
            return xp.log(-xp.log1p(-mu))
        return xp.log(mu)

    def inverse(self, eta):
        """mu = g^-1(eta), clamped as R's ``linkinv``."""
        xp = array_namespace(eta)
        if self.name == "logit":
            odds = xp.where(eta < -LOGIT_THRESHOLD, EPS, xp.where(eta > LOGIT_THRESHOLD, 1.0 / EPS, xp.exp(
                xp.clip(eta, -LOGIT_THRESHOLD, LOGIT_THRESHOLD))))
            return odds / (1.0 + odds)
        if self.name == "probit":
            return _special(xp).ndtr(xp.clip(eta, -PROBIT_THRESHOLD, PROBIT_THRESHOLD))
        if self.name == "cloglog":
            return xp.clip(-xp.expm1(-xp.exp(xp.minimum(eta, 700.0))), EPS, 1.0 - EPS)
        return xp.maximum(xp.exp(eta), EPS)

    def mu_eta(self, eta):
        """d mu / d eta, bounded below by eps as R's ``mu.eta``."""
        xp = array_namespace(eta)
        if self.name == "logit":
            inside = xp.abs(eta) <= LOGIT_THRESHOLD
            e = xp.exp(xp.clip(eta, -LOGIT_THRESHOLD, LOGIT_THRESHOLD))
            return xp.where(inside, e / (1.0 + e) ** 2, EPS)
        if self.name == "probit":
            return xp.maximum(xp.exp(-0.5 * eta**2) / np.sqrt(2.0 * np.pi), EPS)
        if self.name == "cloglog":
            eta = xp.minimum(eta, 700.0)
            return xp.maximum(xp.exp(eta) * xp.exp(-xp.exp(eta)), EPS)
        return xp.maximum(xp.exp(eta), EPS)


@dataclass(frozen=True)
class Family:
    """A response family with its link; ``shape`` is NB2's theta (None for the others).

    Rows are (y, a): y the response (a proportion for the binomial), a its prior weight
    (the binomial's trials; ones without weights).
    """

    name: str
    link: Link
    shape: float | None = None

    def variance(self, mu):
        """V(mu): mu (1 - mu), mu, or mu + mu^2 / theta."""
        if self.name == "binomial":
            return mu * (1.0 - mu)
        if self.name == "poisson":
            return mu
        return mu + mu**2 / self.shape

    def unit_deviances(self, y, mu, weights):
        """a_i d(y_i, mu_i): R's ``dev.resids``, whose sum is the deviance 2 (log p(y | y) - log p(y | mu))."""
        xp = array_namespace(y, mu, weights)
        if self.name == "binomial":
            return 2.0 * weights * (_y_log_y(y, mu, xp) + _y_log_y(1.0 - y, 1.0 - mu, xp))
        if self.name == "poisson":
            return 2.0 * weights * (_y_log_y(y, mu, xp) - (y - mu))
        theta = self.shape
        # log((y + theta) / (mu + theta)) as a difference of log1p's: at a large shape the ratio rounds to 1, and
        # one log1p of (y - mu) / (mu + theta) loses mu's digits where that is near -1 (mu >> y + theta)
        return 2.0 * weights * (y * xp.log(xp.maximum(y, 1.0) / mu)
                                - (y + theta) * (xp.log1p(y / theta) - xp.log1p(mu / theta)))

    def deviance_residuals(self, y, mu, weights):
        """sign(y - mu) sqrt(a d(y, mu)), whose squares sum to the deviance (R's ``residuals(fit)``, "deviance")."""
        return np.sign(y - mu) * np.sqrt(np.maximum(self.unit_deviances(y, mu, weights), 0.0))

    def pearson_residuals(self, y, mu, weights):
        """(y - mu) sqrt(a / V(mu)) (R's ``residuals(fit, type = "pearson")``; a the prior weights, trials)."""
        return (y - mu) * np.sqrt(weights / self.variance(mu))

    def log_likelihood(self, y, mu, weights):
        """log p(y_i | mu_i) per row, as R's ``aic`` counts it (-aic / 2 summed; zero-weight rows give 0)."""
        xp = array_namespace(y, mu, weights)
        gammaln = _special(xp).gammaln
        if self.name == "binomial":
            trials = xp.round(weights)
            successes = xp.round(weights * y)
            log_choose = gammaln(trials + 1.0) - gammaln(successes + 1.0) - gammaln(trials - successes + 1.0)
            failures = trials - successes
            # 0 log 0 = 0: a success probability clamped near 0 or 1 with no successes (failures) there
            terms = (xp.where(successes > 0, successes * xp.log(mu), 0.0)
                     + xp.where(failures > 0, failures * xp.log1p(-mu), 0.0))
            return xp.where(weights > 0, log_choose + terms, 0.0)
        if self.name == "poisson":
            return weights * (xp.where(y > 0, y * xp.log(mu), 0.0) - mu - gammaln(y + 1.0))
        theta = self.shape
        xp = array_namespace(y, mu, weights, theta)  # the shape may be traced (hp.fit_batch's negative binomial)
        gammaln = _special(xp).gammaln
        return weights * (negative_binomial_log_density(y, xp.log(mu), theta) - gammaln(y + 1.0))

    def working(self, y, eta, weights):
        """(mu, Fisher weights w, working residual (y - mu) / (d mu / d eta)) at the linear predictor eta (lme4's PIRLS
        weights; the Laplace log-determinant's at the mode)."""
        mu = self.link.inverse(eta)
        d = self.link.mu_eta(eta)
        return mu, weights * d**2 / self.variance(mu), (y - mu) / d

    def starting_mean(self, y, weights):
        """R's ``mustart``: where PIRLS starts before any coefficient is known."""
        if self.name == "binomial":
            return (weights * y + 0.5) / (weights + 1.0)
        if self.name == "poisson":
            return y + 0.1
        return y + (y == 0) / 6.0


def family(spec: FamilySpec, shape: float | None = None) -> Family:
    """The :class:`Family` of a :class:`~hierpool.spec.family.FamilySpec` (``shape``: NB2's theta)."""
    if (spec.name == "negative_binomial") != (shape is not None):
        raise ValueError("a negative binomial family needs its shape, and only it has one")
    return Family(spec.name, Link(spec.link), None if shape is None else float(shape))


# --- log-likelihoods as functions of the linear predictor (the Bayesian engine's target) ----------------------------
#
# The functions above follow R's clamps, so that deviances match glmer; their gradients vanish where a clamp
# binds.  NUTS needs the log-likelihood and its gradient everywhere, so these are written on eta with the
# usual stable forms (log-sigmoid, log Phi, logaddexp) and no clamps.  Pure functions of arrays (the family
# and link by name, NB2's shape an array that may be traced), on NumPy arrays on the host and on JAX arrays
# in a compiled program.

#: cloglog's linear predictor is clipped to this range (exp overflows beyond; mu is 0 or 1 to double precision).
CLOGLOG_ETA_RANGE = (-700.0, 100.0)


def draw_responses(name: str, mu, rng: np.random.Generator, trials=None, shape=None) -> np.ndarray:
    """New responses at means ``mu`` (NumPy, any shape; ``trials`` and ``shape`` broadcast against it): a binomial's
    successes out of whole ``trials`` as the proportion of them (the response as the family reads it), Poisson
    counts, or NB2 counts as a gamma mixture of Poissons, rate ~ Gamma(shape, scale mu / shape) (variance
    mu + mu^2 / shape).  Used by ``hp.simulate`` and the Bayesian engine's predictive draws."""
    mu = np.asarray(mu, dtype=float)
    if name == "binomial":
        count = np.asarray(trials, dtype=float)
        return rng.binomial(count.astype(np.int64), np.clip(mu, 0.0, 1.0)) / count
    if name == "poisson":
        return rng.poisson(mu).astype(float)
    if name == "negative_binomial":
        return rng.poisson(rng.gamma(shape, mu / shape)).astype(float)
    raise ValueError(f"no response draws for family {name!r}")


def log_mean_and_complement(link: str, eta):
    """(log mu, log(1 - mu)) of a binomial mean mu = g^-1(eta), without cancellation.

    logit: (-softplus(-eta), -softplus(eta)); probit: (log Phi(eta), log Phi(-eta));
    cloglog: (log(1 - exp(-exp(eta))), -exp(eta)).
    """
    xp = array_namespace(eta)
    if link == "logit":
        return -xp.logaddexp(0.0, -eta), -xp.logaddexp(0.0, eta)
    if link == "probit":
        log_ndtr = _special(xp).log_ndtr
        return log_ndtr(eta), log_ndtr(-eta)
    if link == "cloglog":
        rate = xp.exp(xp.clip(eta, *CLOGLOG_ETA_RANGE))
        return xp.log(-xp.expm1(-rate)), -rate
    raise ValueError(f"link {link!r} is not a binomial link")


def log_likelihood_eta(name: str, link: str, y, eta, weights, shape=None, constant: bool = True):
    """log p(y_i | eta_i) per row, the family's log-likelihood written on the linear predictor.

    * ``binomial`` (y a proportion, a_i its trials or prior weight):
      a_i [y_i log mu_i + (1 - y_i) log(1 - mu_i)] + log C(a_i, a_i y_i);
    * ``poisson`` (log link): a_i [y_i eta_i - exp(eta_i) - log y_i!];
    * ``negative_binomial`` (NB2, log link, shape theta):
      a_i [log Gamma(y + theta) - log Gamma(theta) - log y! + theta log theta + y eta - (theta + y) log(theta + e^eta)].

    ``constant=False`` leaves out the terms free of eta and theta (the binomial coefficient, log y!),
    as a sampler's target may.  With integer trials this is :meth:`Family.log_likelihood` without
    its clamps; the binomial coefficient of non-integer a_i is read through log Gamma (R's ``aic``
    rounds instead).  ``shape`` broadcasts against ``eta`` (one per posterior draw, say).
    """
    xp = array_namespace(y, eta, weights, shape)
    gammaln = _special(xp).gammaln
    if name == "binomial":
        successes = weights * y
        if link == "logit":  # the canonical form a (y eta - log(1 + e^eta)): one exp and one log per row
            value = successes * eta - weights * (xp.maximum(eta, 0.0) + xp.log1p(xp.exp(-xp.abs(eta))))
        else:
            log_mu, log_complement = log_mean_and_complement(link, eta)
            value = successes * log_mu + (weights - successes) * log_complement
        if constant:
            value = value + gammaln(weights + 1.0) - gammaln(successes + 1.0) - gammaln(weights - successes + 1.0)
        return value
    if link != "log":
        raise ValueError(f"link {link!r} is not available for family {name!r}")
    if name == "poisson":
        value = y * eta - xp.exp(eta)
        return weights * (value - gammaln(y + 1.0) if constant else value)
    if name != "negative_binomial":
        raise ValueError(f"unknown family {name!r}")
    value = negative_binomial_log_density(y, eta, shape)
    return weights * (value - gammaln(y + 1.0) if constant else value)
