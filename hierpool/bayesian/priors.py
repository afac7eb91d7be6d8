"""Priors of the Bayesian mixed model: weakly informative defaults scaled to the data, overridable by key.

Defaults, scaled to the data in the manner of rstanarm's autoscaled priors (Gabry &
Goodrich, "Prior distributions for rstanarm models"); s_y = sd(y), m_y = mean(y),
s_x = sd of the coefficient's column, x_j its mean, mu_j and s_j the mean and sd of its prior,
s_z = sd of a random-effect column (all sds with the n denominator; a zero sd counts as 1):

==================  =====================================================
``Intercept``        Normal(m_y - sum_j x_j mu_j, sqrt((2.5 s_y)^2 + sum_j x_j^2 s_j^2))
other fixed effect   Normal(0, 2.5 s_y / s_x)
random-effect sd     HalfNormal(2.5 s_y) for intercepts, HalfNormal(2.5 s_y / s_z) for slopes
``sigma``            Exponential(rate = 1 / s_y)
``cor``              LKJ(1) on each correlated term (uniform over correlation matrices)
==================  =====================================================

Where they are rstanarm's and where not (rstanarm's sds, R's ``sd``, have the n - 1
denominator throughout):

* ``sigma``: rstanarm's default ``prior_aux = exponential(1, autoscale = TRUE)``.
* other fixed effects: rstanarm's ``normal(0, 2.5, autoscale = TRUE)``, except that
  rstanarm divides by the range of a column with two distinct values (a dummy), here
  by its sd.
* ``Intercept``: rstanarm's Normal(m_y, 2.5 s_y) for a Gaussian model is on the
  intercept of the centred predictors, alpha; the model's own intercept (the value at
  x = 0) is alpha - sum_j x_j beta_j, and its default here is that sum's marginal,
  without its correlation with the other coefficients (each coefficient's prior is its
  own: :func:`intercept_prior`; a slope's prior that is flat or of infinite or unknown
  variance counts as its default there).  So a column centred far from 0 (a calendar
  year) no longer pulls the intercept to m_y, as rstanarm's and brms's priors do not;
  without the correlation the prior it implies on the centred intercept is wider than
  rstanarm's.  A user's ``Intercept`` prior is on the model's own intercept.
* random-effect sds and correlations: hierpool's own.  rstanarm puts its ``decov()``
  prior on each covariance matrix instead; ``cor`` = LKJ(1) is the correlation part
  of ``decov(regularization = 1)``.

Generalized linear mixed models (``family=``): the same table on the link scale with s_y = 1
and m_y = 0, which is rstanarm's rule for every family but the Gaussian (its ``normal(0, 2.5)``
on the intercept, ``normal(0, 2.5, autoscale = TRUE)`` on the other coefficients; on the logit
scale a coefficient of 2.5 / s_x moves a probability of 0.5 to 0.92 over one sd of its column):

==================  =====================================================
``Intercept``        Normal(-sum_j x_j mu_j, sqrt(2.5^2 + sum_j x_j^2 s_j^2))
other fixed effect   Normal(0, 2.5 / s_x)
random-effect sd     HalfNormal(2.5) for intercepts, HalfNormal(2.5 / s_z) for slopes
``shape``            Exponential(rate = 1), the negative binomial's shape theta (NB2:
                     variance mu + mu^2 / theta); rstanarm's ``prior_aux`` for
                     ``neg_binomial_2``, on its ``reciprocal_dispersion``
``cor``              LKJ(1)
==================  =====================================================

There is no ``sigma``.  As for the Gaussian, the intercept's prior is rstanarm's on the centred
predictors carried to the model's own intercept, and the sds' are hierpool's own
(rstanarm's ``decov()`` gives a scalar term's sd an Exponential(1) prior).

Prior weights and offsets (``weights=``, ``offset=``) do not enter the scales: as in
rstanarm (``stan_glm.fit`` takes ``sd(y)`` and ``mean(y)`` of the response itself,
whatever its ``weights`` and ``offset``), s_y and m_y are the unweighted sd and mean
of y, offset included.  With weights far from 1, sigma (the residual sd of a row of
weight 1) can lie far from s_y; set ``sigma``'s prior then.

Keys of ``priors=`` (later keys in this list win over earlier ones):
``b`` (all fixed effects except the intercept), a fixed-effect term name
(``"Intercept"``, ``"Days"``, ``"Sex[Male]"``), ``sd`` (every random-effect sd),
``sd_<group>`` (the sds of one grouping factor, ``<group>`` as in ``varcorr.grp``),
``sigma``, ``shape`` (a negative binomial's), ``cor`` (the LKJ concentration, a positive number).  Values are
NumPyro distributions with scalar batch shape, applied independently to every
coefficient they cover, or the string ``"flat"`` for an improper uniform prior
on a fixed effect.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy import stats

from ..errors import ArgumentError, real_argument
from ..spec.design import Design

FLAT = "flat"


@jax.tree_util.register_pytree_node_class
class SortedFields:
    """A NumPyro distribution as a pytree whose leaves are its fields in the order of their names.

    NumPyro flattens a distribution's fields in the order of a Python ``set`` of their names
    (``Distribution.gather_pytree_data_fields``), which string hashing orders differently in each process: a
    compiled sampler taking priors as arguments was lowered with its arguments in another order in each process, so
    that JAX's persistent compilation cache missed across processes (hp.bayes' chain program: three processes, two
    modules; the fifty-third and fifty-fifth sessions).  The distribution is rebuilt by NumPyro's own
    ``tree_unflatten`` from the fields put back in this process's order.
    """

    def __init__(self, distribution):
        self.distribution = distribution

    def tree_flatten(self):
        kind = type(self.distribution)
        names = kind.gather_pytree_data_fields()
        values, aux = self.distribution.tree_flatten()
        order = sorted(range(len(names)), key=names.__getitem__)
        # (a field may hold a distribution of its own: StudentT's chi-square)
        return tuple(_sorted_fields(values[i]) for i in order), (kind, tuple(names[i] for i in order), aux)

    @classmethod
    def tree_unflatten(cls, static, children):
        kind, names, aux = static
        by_name = dict(zip(names, children))
        fields = tuple(_distributions(by_name[name]) for name in kind.gather_pytree_data_fields())
        return cls(kind.tree_unflatten(aux, fields))


def _sorted_fields(value):
    if isinstance(value, dist.Distribution):
        return SortedFields(value)
    # (in tuples and lists: a mixture's components are a list)
    return type(value)(_sorted_fields(v) for v in value) if isinstance(value, (tuple, list)) else value


def _distributions(value):
    if isinstance(value, SortedFields):
        return value.distribution
    return type(value)(_distributions(v) for v in value) if isinstance(value, (tuple, list)) else value


def register_priors(cls):
    """Register a frozen dataclass of priors (NumPyro distributions, alone or in tuples, and numbers) as a pytree
    whose distributions flatten in a canonical order (:class:`SortedFields`), every field a child, its key path the
    field's name.  (A ``tree_map`` whose ``is_leaf`` stops at distributions meets :class:`SortedFields` instead.)"""
    names = tuple(field.name for field in dataclasses.fields(cls))

    def with_keys(priors):
        return tuple((jax.tree_util.GetAttrKey(name), _sorted_fields(getattr(priors, name))) for name in names), None

    def unflatten(_, children):
        return cls(**{name: _distributions(child) for name, child in zip(names, children)})

    jax.tree_util.register_pytree_with_keys(
        cls, with_keys, unflatten, lambda priors: (tuple(_sorted_fields(getattr(priors, name)) for name in names), None))
    return cls


@register_priors
@dataclass(frozen=True)
class Priors:
    """The resolved priors of one model: a pytree, so a compiled sampler takes them as arguments.

    Attributes
    ----------
    beta : tuple
        One per fixed effect: a scalar NumPyro distribution, or None for a flat prior.
    sd : tuple of numpyro.distributions.Distribution
        One per random-effect term, batch shape (k_j,).
    cor : tuple of float
        LKJ concentration of each term (used where k_j > 1).
    sigma : numpyro.distributions.Distribution or None
        None when residual sds are known, and in a generalized linear mixed model.
    shape : numpyro.distributions.Distribution or None
        The negative binomial's shape; None for every other family.
    """

    beta: tuple
    sd: tuple
    cor: tuple
    sigma: object
    shape: object = None

    def beta_all_normal(self) -> bool:
        """Every fixed effect has a Normal prior (none flat): one vector-valued sample site."""
        return all(type(prior) is dist.Normal for prior in self.beta)

    def beta_gaussian(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(loc, scale) of the fixed-effect priors when each is Normal or flat (scale inf), else None.

        The collapsed sampler needs this: it integrates beta out analytically.
        """
        loc, scale = [], []
        for prior in self.beta:
            if prior is None:
                loc.append(0.0)
                scale.append(np.inf)
            elif type(prior) is dist.Normal:
                loc.append(float(prior.loc))
                scale.append(float(prior.scale))
            else:
                return None
        return np.asarray(loc), np.asarray(scale)


@dataclass(frozen=True)
class DataScales:
    """The data summaries the default priors are scaled by (sds with ddof 0; a zero sd counts as 1).

    y's mean and sd are of the response itself, unweighted and with any offset in it,
    as rstanarm's (see the module docstring).

    Attributes
    ----------
    y_mean, y_sd : float
    x_sd : ndarray, one per fixed-effect column
    z_sd : tuple of ndarray, per random-effect term one per coefficient column
    x_mean : ndarray, one per fixed-effect column (the default intercept prior's spread, :func:`resolve_priors`)
    """

    y_mean: float
    y_sd: float
    x_sd: np.ndarray
    z_sd: tuple
    x_mean: np.ndarray

    @classmethod
    def of(cls, design: Design) -> DataScales:
        """The scales of the whole design."""
        return cls.per_group(design, np.zeros(design.n, dtype=np.int64), 1)[0]

    @classmethod
    def per_group(cls, design: Design, group: np.ndarray, n_groups: int) -> list[DataScales]:
        """The scales of each group of rows (``hp.bayes_batch``: each dataset of a long design)."""
        columns = np.column_stack([design.y, design.X, *(t.z for t in design.terms)])
        count = np.maximum(np.bincount(group, minlength=n_groups), 1)[:, None]

        def sums(values):
            return np.stack([np.bincount(group, weights=c, minlength=n_groups) for c in values.T], axis=1)

        mean = sums(columns) / count
        sd = np.sqrt(sums((columns - mean[group]) ** 2) / count)
        sd = np.where(sd > 0, sd, 1.0)
        bounds = np.cumsum([1, design.p] + [t.k for t in design.terms])
        return [cls(y_mean=float(mean[g, 0]), y_sd=float(sd[g, 0]), x_sd=sd[g, bounds[0]:bounds[1]],
                    z_sd=tuple(sd[g, a:b] for a, b in zip(bounds[1:-1], bounds[2:])),
                    x_mean=mean[g, bounds[0]:bounds[1]]) for g in range(n_groups)]


def group_keys(group: str) -> tuple[str, ...]:
    """Names a ``sd_<group>`` key may use: the group as lme4 prints it and its identifier form."""
    return tuple(dict.fromkeys((group, identifier(group))))


def identifier(name: str) -> str:
    """A name made safe for ArviZ / NetCDF variable and dimension names (no ``|``, ``:``, spaces...)."""
    text = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in str(name))
    return text if text and not text[0].isdigit() else "_" + text


def _check_distribution(key: str, value, allow_flat: bool):
    if allow_flat and isinstance(value, str) and value == FLAT:
        return value
    if not isinstance(value, dist.Distribution):
        allowed = 'a numpyro distribution or "flat"' if allow_flat else "a numpyro distribution"
        raise ArgumentError(f"prior {key!r} must be {allowed}, got {value!r}")
    if value.batch_shape != () or value.event_shape != ():
        raise ArgumentError(
            f"prior {key!r} must be a scalar distribution (it applies to each coefficient it covers), "
            f"got batch shape {value.batch_shape} and event shape {value.event_shape}"
        )
    return value


def _check_positive_support(key: str, value) -> None:
    support = value.support
    lower = getattr(support, "lower_bound", None)  # greater_than(0), interval(0, 100) (a Uniform), ...
    if support.is_discrete or (support not in (constraints.positive, constraints.nonnegative) and not (
            lower is not None and np.all(np.asarray(lower) >= 0))):
        raise ArgumentError(f"prior {key!r} must have positive support (e.g. HalfNormal, HalfCauchy, Uniform(0, "
                            f"upper)), got {value!r}")


def check_resolved_priors(priors: Priors, design: Design, glmm: bool, shape: bool) -> Priors:
    """A resolved :class:`Priors` given as ``priors=``, checked against the model it is to sample: one fixed-effect
    prior per column of X, one sd prior per random-effect term of its width, a residual sd's prior where the model
    has one (not with known sds nor in a GLMM), a negative binomial's shape prior where it has one (``shape``).
    Unchecked, a wrong size raised JAX's or NumPy's errors inside the sampler, and a Gaussian model's priors were
    taken for a Poisson one's silently."""
    ks = tuple(t.k for t in design.terms)
    problems = []
    if len(priors.beta) != design.p:
        problems.append(f"{len(priors.beta)} fixed-effect priors for {design.p} columns ({', '.join(design.fixed_names)})")
    if len(priors.sd) != len(ks) or any(getattr(sd, "batch_shape", ()) not in ((), (k,))
                                        for sd, k in zip(priors.sd, ks)):
        problems.append(f"sd priors not one per random-effect term of its width ({', '.join(t.label for t in design.terms)})")
    wants_sigma = not glmm and not design.sigma_known
    if (priors.sigma is not None) != wants_sigma:
        problems.append("a residual sd's prior " + ("missing" if wants_sigma else "for a model without one"))
    if (priors.shape is not None) != shape:
        problems.append("a negative binomial's shape prior " + ("missing" if shape else "for another family"))
    if problems:
        raise ArgumentError(f"priors: this resolved Priors is not this model's: {'; '.join(problems)}; resolve it "
                            "from this model (hp.bayes's priors= as a dict)")
    return priors


def resolve_priors(design: Design, priors: dict | None, scales: DataScales | None = None) -> Priors:
    """Defaults scaled to ``design``'s data (or to ``scales``), with the user's ``priors`` applied by key.

    ``scales`` lets one design serve many datasets (``hp.bayes_batch``): each
    dataset's defaults are scaled to its own data, as ``hp.bayes`` on it would.

    Raises
    ------
    ArgumentError
        For a key that names nothing in the model, or a value of the wrong kind.
    """
    if priors is not None and not isinstance(priors, dict):
        raise ArgumentError(f"priors must be a dict of distributions by key (or None), got {type(priors).__name__}")
    priors = dict(priors or {})
    if not all(isinstance(key, str) for key in priors):
        raise ArgumentError(f"prior keys must be strings, got {list(priors)!r}")
    scales = DataScales.of(design) if scales is None else scales
    glmm = design.family is not None
    s_y, m_y = (1.0, 0.0) if glmm else (scales.y_sd, scales.y_mean)  # a GLMM's priors are on the link scale
    negative_binomial = glmm and design.family.name == "negative_binomial"
    fixed = list(design.fixed_names)
    groups = {key: term.group for term in design.terms for key in group_keys(term.group)}
    own = ("b", "sd", "sigma", "cor") if not glmm else ("b", "sd", "cor") + (("shape",) if negative_binomial else ())
    known = set(own) | set(fixed) | {f"sd_{key}" for key in groups}
    unknown = [key for key in priors if key not in known]
    if unknown:
        what = "" if not glmm else (
            f" (a {design.family.name} model has no residual sd" + ("" if negative_binomial else " and no shape") + ")")
        raise ArgumentError(
            f"unknown prior key(s) {unknown}: this model has fixed effects {fixed}, "
            f"sd_<group> keys {sorted(f'sd_{g}' for g in groups)}, and {', '.join(map(repr, own))}{what}"
        )
    if "sigma" in priors and design.sigma_known:
        raise ArgumentError("prior 'sigma' given, but residual sds are known (se=): there is no sigma")
    # a prior that covers nothing is refused, as brms refuses it (it read as applied, and was not)
    if "b" in priors and not any(name != "Intercept" for name in fixed):
        raise ArgumentError("prior 'b' is for the fixed effects other than the intercept, which this model has none of")
    if "cor" in priors and not any(term.k > 1 for term in design.terms):
        raise ArgumentError("prior 'cor' is the LKJ prior of a term's correlations, and no random-effect term of this "
                            "model has any (a correlated term has two or more coefficients: (1 + x | g))")
    if "sd" in priors and not design.terms:
        raise ArgumentError("prior 'sd' is for the random-effect terms' sds, and this model has none")

    beta = []
    for j, name in enumerate(fixed):
        if name == "Intercept":
            prior = None  # below, from the other coefficients' priors
        else:
            prior = dist.Normal(0.0, 2.5 * s_y / scales.x_sd[j])
            if "b" in priors:
                prior = _check_distribution("b", priors["b"], allow_flat=True)
        if name in priors:
            prior = _check_distribution(name, priors[name], allow_flat=True)
        beta.append(None if isinstance(prior, str) else prior)
    if "Intercept" in fixed and "Intercept" not in priors:
        j = fixed.index("Intercept")
        beta[j] = intercept_prior(m_y, 2.5 * s_y, [prior for i, prior in enumerate(beta) if i != j],
                                  np.delete(scales.x_mean, j), np.delete(2.5 * s_y / scales.x_sd, j))

    sd = []
    for term, z_sd in zip(design.terms, scales.z_sd):
        user = None
        if "sd" in priors:
            user = ("sd", priors["sd"])
        for key in group_keys(term.group):
            if f"sd_{key}" in priors:
                user = (f"sd_{key}", priors[f"sd_{key}"])
        if user is None:
            sd_scales = [
                2.5 * s_y if name == "Intercept" else 2.5 * s_y / z_sd[i]
                for i, name in enumerate(term.coef_names)
            ]
            sd.append(dist.HalfNormal(np.asarray(sd_scales)))
        else:
            key, value = user
            value = _check_distribution(key, value, allow_flat=False)
            _check_positive_support(key, value)
            sd.append(value.expand((term.k,)))

    concentration = priors.get("cor", 1.0)
    concentration = real_argument("prior 'cor' (the LKJ concentration)", concentration, above=0,
                                  rule="a positive number")
    cor = tuple(float(concentration) for _ in design.terms)

    sigma = shape = None
    if not design.sigma_known and not glmm:
        sigma = dist.Exponential(1.0 / s_y)
        if "sigma" in priors:
            sigma = _check_distribution("sigma", priors["sigma"], allow_flat=False)
            _check_positive_support("sigma", sigma)
    if negative_binomial:
        shape = dist.Exponential(1.0)
        if "shape" in priors:
            shape = _check_distribution("shape", priors["shape"], allow_flat=False)
            _check_positive_support("shape", shape)
    return Priors(beta=tuple(beta), sd=tuple(sd), cor=cor, sigma=sigma, shape=shape)


def intercept_prior(location: float, scale: float, slopes: list, x_mean, default_sds) -> dist.Normal:
    """The default prior of the model's own intercept: the intercept of the centred predictors, alpha ~
    Normal(``location``, ``scale``) (rstanarm's), carried to x = 0 through the other coefficients' priors
    (``slopes``; None for flat; ``x_mean`` their columns' means): beta_0 = alpha - sum_j xbar_j beta_j, of mean
    location - sum_j xbar_j E[beta_j] and variance scale^2 + sum_j xbar_j^2 var(beta_j), taken as a Normal without
    its correlation with the slopes (each coefficient's prior is its own, so the prior it implies on alpha is wider
    than rstanarm's).  A slope's prior that is flat, or whose mean or variance is not finite or not known (Cauchy,
    Student-t of 2 degrees of freedom or fewer, an improper uniform), counts as its default, Normal(0,
    ``default_sds[j]``): the intercept's prior stays proper (a flat intercept beside a Cauchy slope left a
    separated binomial's posterior improper).

    On the intercept itself a Normal(location, scale) is the value at x = 0, which for a covariate far from 0 (a
    calendar year) lies far outside the data: on sleepstudy with Days + 2000 it held the intercept near mean(y) and
    the slope at 0.04 (10.5 with Days as it is), without a divergent transition to tell.  brms and rstanarm put
    their intercept priors on the centred predictors, where the prior's meaning does not depend on the columns'
    locations."""
    variance = scale**2
    for slope, mean, default_sd in zip(slopes, x_mean, default_sds):
        slope_mean, slope_variance = _moments(slope)
        if not (np.isfinite(slope_mean) and np.isfinite(slope_variance)):
            slope_mean, slope_variance = 0.0, default_sd**2
        location -= mean * slope_mean
        variance += mean**2 * slope_variance
    return dist.Normal(location, float(np.sqrt(variance)))


def _moments(prior) -> tuple[float, float]:
    """(mean, variance) of a scalar prior; NaN where it is flat (None) or NumPyro does not know them."""
    if prior is None:
        return np.nan, np.nan
    try:
        return float(np.asarray(prior.mean)), float(np.asarray(prior.variance))
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        return np.nan, np.nan


def host_log_prob(distribution, x: np.ndarray) -> np.ndarray | None:
    """A scalar NumPyro distribution's log density at x (> 0 for the sd priors) by SciPy, for the kinds hierpool's
    priors use; None for other kinds, whose density the host samplers take from NumPyro itself.  The host samplers
    (:mod:`hierpool.bayesian.independence`, :mod:`hierpool.bayesian.psi_sampler`) evaluate priors here: NumPyro's
    log_prob on the host dispatches a small program per call (benchmarks/RESULTS.md)."""
    if type(distribution).__name__ == "ExpandedDistribution":  # an sd prior broadcast to the term's k_j = 1
        distribution = distribution.base_dist
    kind = type(distribution).__name__
    get = lambda name: np.asarray(getattr(distribution, name), dtype=float)  # noqa: E731
    if distribution.batch_shape not in ((), (1,)):
        return None
    if kind == "Normal":
        return stats.norm.logpdf(x, get("loc").reshape(()), get("scale").reshape(()))
    if kind == "HalfNormal":
        return stats.halfnorm.logpdf(x, scale=get("scale").reshape(()))
    if kind == "HalfCauchy":
        return stats.halfcauchy.logpdf(x, scale=get("scale").reshape(()))
    if kind == "Exponential":
        return stats.expon.logpdf(x, scale=1.0 / get("rate").reshape(()))
    if kind == "Gamma":
        return stats.gamma.logpdf(x, get("concentration").reshape(()), scale=1.0 / get("rate").reshape(()))
    if kind == "StudentT":
        return stats.t.logpdf(x, get("df").reshape(()), get("loc").reshape(()), get("scale").reshape(()))
    if kind == "LogNormal":
        return stats.lognorm.logpdf(x, get("scale").reshape(()), scale=np.exp(get("loc").reshape(())))
    if kind == "Beta":  # a mixing parameter's (BYM2's rho)
        return stats.beta.logpdf(x, get("concentration1").reshape(()), get("concentration0").reshape(()))
    if kind == "Uniform":  # a proper CAR's alpha
        low, high = get("low").reshape(()), get("high").reshape(())
        return stats.uniform.logpdf(x, low, high - low)
    return None
