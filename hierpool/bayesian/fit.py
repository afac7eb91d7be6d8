"""``hp.bayes``: the Bayesian linear or generalized linear mixed model from an lme4 formula, sampled with NumPyro."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace

import jax
import numpy as np
import pandas as pd

from ..algebra import one_term_marginal as one_term
from ..algebra.ar1 import draw_effects_whitened
from ..algebra.conditioning import SAMPLER_REASON, warn_far_fixed
from ..algebra.marginal import draw_batch_size, draw_effects, theta_from_components
from ..algebra.statistics import one_dataset_statistics
from ..algebra.system import build_system, on_device, system_pattern
from ..closedform.ar1 import AR1Result, checked_series, draws_per_unit, in_search_unit, series_ends
from ..closedform.glmm_results import GLMMResult
from ..closedform.results import LMMResult
from ..errors import ArgumentError, DataError, HierpoolWarning, optional_boolean_argument
from ..spec.arguments import sampler_arguments
from ..spec.design import Design, build_design, model_differences
from ..spec.family import optional_family_spec
from ..spec.formula import has_spatial_term
from ..spec.labels import column_labels
from . import glmm, independence
from .model import (
    HeldVariance,
    SeriesData,
    ar1_collapsed_model,
    collapsed_model,
    effect_draws,
    full_model,
    model_data,
    one_term_collapsed_model,
    variance_draws,
)
from .nuts import sample_nuts
from .posterior import ar1_pointwise_log_likelihood, build_inference_data, pointwise_log_likelihood
from .priors import Priors, check_resolved_priors, resolve_priors
from .results import BayesResult

METHODS = ("auto", "collapsed", "full", "independence")
#: The full model with held variance parameters adapts a dense mass matrix up to this many coefficients.
DENSE_MASS_MAX_DIMENSION = 1000
#: Pointwise log-likelihood is stored up to this many values (chains x draws x rows).
LOG_LIKELIHOOD_MAX_VALUES = 5e7
#: The collapsed sampler of a one-term model runs on its sufficient statistics
#: (:mod:`hierpool.algebra.one_term_marginal`); False sends it through the general blocked
#: factorization instead (the tests compare the two posteriors).
ONE_TERM_STATISTICS = True


def _held_variance(design: Design, variance: LMMResult) -> HeldVariance:
    if not isinstance(variance, LMMResult):
        raise ArgumentError(f"variance must be a fitted hp.lmm result (LMMResult), got {type(variance).__name__}")
    differing = model_differences(variance.design, design)  # sigma held with other weights is another noise
    if differing:
        raise ArgumentError(f"variance: the lmm fit differs from this model in its {', '.join(differing)}: hold an "
                            "hp.lmm fit of the same model and data")
    sigma = float(variance.sigma)
    return HeldVariance(cov_factors=tuple(sigma * np.asarray(t) for t in variance.solution.factors), sigma=sigma)


def _held_glmm_variance(design: Design, variance) -> HeldVariance:
    """The variance parameters (and a negative binomial's shape) of an ``hp.glmm`` fit of this model, to hold."""
    if not isinstance(variance, GLMMResult):
        raise ArgumentError(f"variance must be a fitted hp.glmm result (GLMMResult) for a model with a family, "
                            f"got {type(variance).__name__}")
    differing = model_differences(variance.design, design)
    if differing:
        raise ArgumentError(f"variance: the glmm fit differs from this model in its {', '.join(differing)}: hold an "
                            "hp.glmm fit of the same model, family and data")
    return glmm.held_variance(variance)


def _resolved(priors, design: Design, glmm: bool = False, shape: bool = False) -> Priors:
    """``priors=`` resolved against ``design``: a dict (or None) by :func:`resolve_priors`, a resolved
    :class:`Priors` checked to be this model's (:func:`check_resolved_priors`)."""
    if isinstance(priors, Priors):
        return check_resolved_priors(priors, design, glmm=glmm, shape=shape)
    return resolve_priors(design, priors)


def _choose_method(method: str, priors: Priors) -> str:
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if method == "independence":
        raise ArgumentError(
            "method='independence' samples a generalized linear mixed model (it needs a family=); a Gaussian "
            "model's default, method='collapsed', draws (beta, b) exactly"
        )
    gaussian = priors.beta_gaussian() is not None
    if method == "collapsed" and not gaussian:
        raise ArgumentError(
            "method='collapsed' integrates the fixed effects out and needs Normal or 'flat' priors on them; "
            "use method='full' for other priors"
        )
    return ("collapsed" if gaussian else "full") if method == "auto" else method


@dataclass(frozen=True)
class _ExactDraws:
    """Inside the compiled post-processing: exact (beta, b) draws for each variance draw of any model.

    :func:`hierpool.algebra.marginal.draw_effects` on the model's mixed-model
    system.  A frozen dataclass, not a closure: it keys the compiled-program cache by value.
    """

    ks: tuple[int, ...]
    sigma_known: bool
    batch_size: int

    def __call__(self, draws, key, data, loc, scale, priors):
        sds, cors, sigma = variance_draws(draws, self.ks, self.sigma_known)
        thetas = jax.vmap(theta_from_components)(sds, cors, sigma)
        beta, b = draw_effects(thetas, sigma, data, loc, scale, key, self.batch_size)
        return {"variance": draws, "beta": beta, "b": tuple(b)}


def _one_term_exact_draws(variance: dict, k: int, sigma_known: bool, stats, loc: np.ndarray, scale: np.ndarray,
                          seed: int) -> dict:
    """Exact (beta, b) draws for each variance draw of a one-term model, on the host in NumPy.

    The same algebra as the compiled programs (:func:`hierpool.algebra.one_term_marginal.draw_effects`
    on NumPy arrays): for sleepstudy's 4,000 draws far less than tracing and compiling
    a program for them took (benchmarks/RESULTS.md, "Bayesian engine, sixth session").
    With known residual sds sigma is 1 in every draw (the statistics carry the weights 1 / se^2).
    """
    (sd,), (cor,), sigma = variance_draws(variance, (k,), sigma_known)
    chains, draws = sigma.shape

    def flat(a):
        return None if a is None else np.asarray(a, dtype=float).reshape((chains * draws,) + a.shape[2:])

    sigmas = flat(sigma)
    thetas = theta_from_components([flat(sd)], [flat(cor)], sigmas)
    noise = np.random.default_rng([seed % 2**32, 1]).standard_normal((chains * draws, loc.shape[0] + stats.zty.size))
    beta, b = one_term.draw_effects(thetas, sigmas, stats, loc, scale, noise, one_term.draw_batch_size(stats))
    return {"variance": variance, "beta": beta.reshape(chains, draws, -1), "b": (b.reshape((chains, draws) + b.shape[1:]),)}


def _sample_collapsed(design, resolved, chains, draws, tune, seed, target_accept, progress):
    # NumPy arguments: an eager jnp.asarray would compile a conversion program of its own (timed in
    # benchmarks/RESULTS.md, "Measurements the code cites")
    loc, scale = (np.asarray(a, dtype=float) for a in resolved.beta_gaussian())
    ks = tuple(t.k for t in design.terms)
    if len(ks) == 1 and ONE_TERM_STATISTICS:
        # one term: the same target written on the sufficient statistics, which compiles to a third
        # less code than the general blocked factorization, and exact draws on the host.  The statistics
        # carry the prior weights (1 / se^2 with known residual sds, sigma then 1) and the offset, and are
        # of y - offset - X beta0 (the draws add beta0 back)
        stats = one_dataset_statistics(design)
        model, args, static = one_term_collapsed_model, (stats, loc, scale, resolved), (("k", ks[0]),)
        postprocess = None
    else:
        system = build_system(design)
        model, args, static = collapsed_model, (system, loc, scale, resolved), ()
        postprocess = _ExactDraws(ks, design.sigma_known, draw_batch_size(system.layout))
    out, stats = sample_nuts(
        model,
        args,
        static=static,
        chains=chains,
        tune=tune,
        draws=draws,
        seed=seed,
        target_accept=target_accept,
        dense_mass=True,  # a handful of a-posteriori correlated variance parameters (sds and sigma)
        postprocess=postprocess,
        progress=progress,
    )
    if postprocess is None:
        out = _one_term_exact_draws(out, ks[0], design.sigma_known, args[0], loc, scale, seed)
    sds, cors, _ = variance_draws(out["variance"], ks, True)
    sigma = None if design.sigma_known else out["variance"]["sigma"]
    return out["beta"], list(out["b"]), sds, cors, sigma, stats


# module level, so that repeated exact-mode fits of one shape reuse the compiled program
_draw_effects_jit = jax.jit(draw_effects, static_argnames="batch_size")


def _sample_exact(design, resolved, variance, chains, draws, seed, system=None):
    """Variance parameters held: (beta, b) is Gaussian, drawn exactly (no MCMC).

    ``system``: the mixed-model system to draw from, the design's when None (an AR(1) fit's whitened one).
    """
    system = build_system(design) if system is None else system
    # NumPy arguments of the one jitted program: eager jnp conversions would compile programs of their own
    loc, scale = (np.asarray(a, dtype=float) for a in resolved.beta_gaussian())
    count = chains * draws
    thetas = np.broadcast_to(np.asarray(variance.theta, dtype=float), (count, variance.theta.size))
    sigmas = np.full(count, float(variance.sigma))  # 1.0 with known residual sds
    beta, b = _draw_effects_jit(
        thetas, sigmas, system, loc, scale, jax.random.PRNGKey(seed), batch_size=draw_batch_size(system.layout)
    )
    shape = (chains, draws)
    return np.asarray(beta).reshape(shape + (design.p,)), [np.asarray(x).reshape(shape + x.shape[1:]) for x in b]


def _sample_full(design, resolved, held, chains, draws, tune, seed, target_accept, progress, series=None,
                 phi_bounds=None, data=None):
    """NUTS on the plain non-centered model: (beta, b, sds, cors, sigma, sampler statistics, phi).

    With ``series`` (:class:`~hierpool.bayesian.model.SeriesData`) the residuals are AR(1) (phi held in
    ``held``, or sampled on ``phi_bounds``); phi is None without.  ``data``: the model's arrays
    (:func:`~hierpool.bayesian.model.model_data` of the design when None).
    """
    ks = tuple(t.k for t in design.terms)
    ar1 = () if series is None else (series,)
    out, stats = sample_nuts(
        full_model,
        (model_data(design) if data is None else data, resolved, held, *ar1),
        static=(("ks", ks), ("n_levels", tuple(t.n_levels for t in design.terms)))
        + ((("phi_bounds", phi_bounds),) if ar1 else ()),
        chains=chains,
        tune=tune,
        draws=draws,
        seed=seed,
        target_accept=target_accept,
        # variance held: (beta, z) is Gaussian, and a dense mass matrix makes it isotropic for NUTS
        # (beta and the z's are a-posteriori correlated under a flat prior on beta); its adaptation
        # costs O(d^2) per draw, so only up to DENSE_MASS_MAX_DIMENSION coefficients
        dense_mass=held is not None and design.p + sum(t.n_levels * t.k for t in design.terms) <= DENSE_MASS_MAX_DIMENSION,
        progress=progress,
    )
    beta, b = effect_draws(out, design.p, len(ks), chains, draws)
    phi = None
    if ar1:
        phi = np.full((chains, draws), held.phi) if held is not None else np.asarray(out["phi"])
    if held is not None:
        return beta, b, None, None, None, stats, phi
    sds, cors, _ = variance_draws(out, ks, True)
    return beta, b, sds, cors, (None if design.sigma_known else out["sigma"]), stats, phi


def bayes(
    formula: str,
    data: pd.DataFrame,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    priors: dict | None = None,
    se: str | None = None,
    method: str = "auto",
    variance: LMMResult | None = None,
    level: float = 0.95,
    target_accept: float = 0.8,
    progress: bool | None = None,
    weights=None,
    offset=None,
    family: str | None = None,
    link: str | None = None,
    correlation=None,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
    adjacency=None,
) -> BayesResult:
    """Fit a Bayesian linear or generalized linear mixed model: full posteriors of every fixed and random effect.

    Parameters
    ----------
    formula : str
        lme4 syntax, as :func:`hierpool.lmm`.
    data : pandas.DataFrame
        Not modified; rows with missing values are dropped with a warning.
    chains, draws, tune : int
        Markov chains, kept draws per chain, warm-up (adaptation) iterations per chain.
    seed : int
    priors : dict or Priors, optional
        Overrides of the default priors by key (see :mod:`hierpool.bayesian.priors`):
        ``Intercept``, a fixed-effect name, ``b``, ``sd``, ``sd_<group>``, ``sigma``, ``cor``.
        A resolved :class:`~hierpool.bayesian.priors.Priors` is used as it is (simulation
        studies freeze the priors once, so they do not follow each simulated response).
    se : str, optional
        Column of known residual sds (meta-analysis).
    method : {"auto", "collapsed", "full", "independence"}
        ``collapsed``: NUTS on the variance parameters with beta and b integrated out,
        then exact conditional draws of (beta, b) (needs Normal or flat priors on beta,
        and a Gaussian response); ``full``: NUTS on everything, non-centered.  ``auto``
        picks collapsed when it applies.  With a ``family`` and one scalar random-effect
        term (binomial or Poisson), ``independence`` is independence Metropolis-Hastings
        whose proposal is the Laplace approximation, adapted once
        (:mod:`hierpool.bayesian.independence`): exact, no compilation of a sampler;
        ``auto`` uses it when its proposals' importance-sampling efficiency is at least
        0.3, NUTS otherwise (``full`` forces NUTS).
    variance : LMMResult or GLMMResult, optional
        Hold the variance parameters at this closed-form fit's values.  The
        posterior of (beta, b) is then Gaussian.  The default method draws it
        exactly from the closed form's own factorization (fast, but no check of
        the closed form); ``method="full"`` samples it by NUTS on the plain
        model, independently of the mixed-model equations: the posterior of
        :func:`hierpool.validate.blup_agreement`'s exact mode.  With a ``family``: an
        ``hp.glmm`` fit of the same model, its theta (and a negative binomial's shape) held
        while NUTS samples (beta, b).
    level : float
        Coverage of the equal-tailed intervals in the summary tables.
    target_accept : float
        NUTS target acceptance probability.
    progress : bool, optional
        Progress bar; default: on when standard error is a terminal.
    weights : str or array-like, optional
        Prior weights w_i (a column name or one value per row of ``data``), as
        :func:`hierpool.lmm` and lmer: row i has residual variance sigma^2 / w_i
        (not rstanarm's weights, which multiply the log-likelihood).  Cannot be
        combined with ``se``.
    offset : str or array-like, optional
        A known term of the linear predictor (a column name or one value per row),
        added to any ``offset(expr)`` terms of the formula: y = offset + X beta +
        Z b + e in both samplers, the exact draws, the pointwise log-likelihood
        and every prediction.  The default priors ignore weights and offset, as
        rstanarm's autoscaling does (see :mod:`hierpool.bayesian.priors`).  With a
        binomial ``family`` the weights are the trials of proportions (as glmer's).
    family : str, optional
        None (or ``"gaussian"``): the linear mixed model.  Otherwise a generalized linear
        mixed model, as :func:`hierpool.glmm` reads it: ``"binomial"`` (0/1, a two-level
        factor, proportions with ``weights=`` as trials, or ``cbind(successes, failures)``),
        ``"bernoulli"``, ``"poisson"`` or ``"negative_binomial"`` (NB2, its shape sampled
        with the prior ``shape``).
    link : str, optional
        The family's canonical link when None; the binomial also takes ``"probit"`` and
        ``"cloglog"``.
    correlation : AR1, optional
        AR(1) residuals within series (``hp.ar1``, ``hp.car1``), a Gaussian model only, as
        :func:`hierpool.lmm` takes it.  The collapsed sampler then samples phi with the variance
        parameters (Uniform on its interval; with ``hp.car1``, Uniform(0, 1) on the correlation at the
        series' median lag, phi^median_lag, so that the prior and the posterior do not depend on the
        time column's unit; phi is reported per unit of that column), each evaluation whitening the data at phi
        (:func:`hierpool.algebra.ar1.whitened_system`), and (beta, b) are drawn exactly given each
        (theta, sigma, phi); ``idata.posterior["phi"]``, :attr:`BayesResult.correlation`.  With
        ``variance=`` an ``hp.lmm`` AR(1) fit, its phi is held too.  The pointwise log-likelihood is
        each row's density given the one before it in its series (their sum is the joint one).
    relmat, relmat_inverse : dict, optional
        A known relationship matrix (or its inverse) for one scalar term (``(1 | g)`` or ``(0 + x | g)``), as
        :func:`hierpool.lmm` takes it (a Gaussian model; other scalar terms beside it).  The posterior of the sds
        and sigma, beta and b integrated out, is sampled by independence Metropolis-Hastings from its mode, and
        (beta, b) are drawn exactly given each draw (:mod:`hierpool.bayesian.relmat`; ``method="full"``: NUTS on
        the plain model with A's dense Cholesky factor): ``b_<g>`` has every level of A, with records or not
        (breeding values), and ``idata.posterior["heritability"]`` is the relationship term's variance over the
        sum of all variances (sds squared and sigma squared: h^2 for an intercept term and unweighted rows).
        ``variance=`` an ``hp.lmm`` fit with the same relationship holds its variances (exact draws).
    adjacency : optional
        The neighbourhood graph of a spatial term ``car(area, type='icar' | 'proper' | 'bym2')`` (disease mapping),
        (a dict of graphs keyed by area column for several ``car()`` terms, with any ``(lhs | g)`` terms beside
        them), as :func:`hierpool.lmm` takes it: NUTS on every parameter, the ICAR's sum-to-zero constraint exact
        (:mod:`hierpool.bayesian.spatial`; priors ``sd``, ``rho``, ``alpha`` there); a Gaussian response by its exact
        sampler (``method='auto'`` or ``'collapsed'``: the variance parameters by independence Metropolis-Hastings,
        the effects drawn exactly, :mod:`hierpool.bayesian.spatial_exact`; ``method='full'``: NUTS).  Returns a
        :class:`~hierpool.bayesian.spatial.SpatialBayesResult`: each area's effect, BYM2's spatial and unstructured
        parts, and for counts each area's relative risk with its exceedance probability.  ``variance=`` an
        ``hp.lmm`` / ``hp.glmm`` fit of the same spatial model holds its variance parameters (with flat
        fixed-effect priors and a Gaussian response, the posterior mean of the effects is then the fit's BLUP).

    Returns
    -------
    BayesResult

    Notes
    -----
    NUTS: Hoffman & Gelman (2014), as implemented by NumPyro (Phan et al. 2019).
    The collapsed sampler integrates the Gaussian effects out (the marginal
    likelihood of Bates et al. 2015 with the prior on beta as pseudo-data) and
    draws them given each variance draw (Rue 2001).  A generalized linear mixed
    model has no such closed form: NUTS samples every parameter, each level's random
    effect partially non-centered by the information its data carry (Papaspiliopoulos,
    Roberts & Skold 2007; :mod:`hierpool.bayesian.glmm`).
    """
    chains, draws, tune, seed = sampler_arguments(chains, draws, tune, seed, level, target_accept)
    progress = optional_boolean_argument("progress", progress)
    if adjacency is not None or has_spatial_term(formula):
        return _bayes_spatial(formula, data, adjacency, chains, draws, tune, seed, priors, level, target_accept,
                              progress, weights, offset, family, link,
                              {"se": se, "correlation": correlation, "relmat": relmat,
                               "relmat_inverse": relmat_inverse}, method, variance)
    spec = optional_family_spec(family, link)  # a Gaussian model's link= refused here, for every path below
    if relmat is not None or relmat_inverse is not None:
        return _bayes_relmat(formula, data, relmat, relmat_inverse, chains, draws, tune, seed, priors, se, method,
                             variance, level, weights, offset, family, correlation, target_accept,
                             sys.stderr.isatty() if progress is None else bool(progress))
    if spec is not None:
        if correlation is not None:  # (the GLMM sampler has no AR(1) residuals: the argument was dropped, silently)
            raise ArgumentError(f"correlation= (AR(1) residuals) is for a Gaussian model; hp.bayes does not sample a "
                                f"{spec.name} model with it")
        return _bayes_glmm(formula, data, spec, chains, draws, tune, seed, priors, se, method,
                           variance, level, target_accept, progress, weights, offset)
    design = build_design(formula, data, se=se, weights=weights, offset=offset)
    _warn_if_far_from_centred(design)
    resolved = _resolved(priors, design)
    method = _choose_method(method, resolved)
    if correlation is None and isinstance(variance, AR1Result):  # its theta and sigma are the AR(1) model's
        raise ArgumentError("variance: the lmm fit has AR(1) residuals (correlation=): give the same correlation= "
                            "here, or hold a fit without it")
    held = None if variance is None else _held_variance(design, variance)
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    if correlation is not None:
        return _bayes_ar1(design, data, correlation, resolved, method, variance, held, chains, draws, tune, seed,
                          level, target_accept, progress)

    sds = cors = sigma = stats = None
    if method == "full":
        beta, b, sds, cors, sigma, stats, _ = _sample_full(
            design, resolved, held, chains, draws, tune, seed, target_accept, progress
        )
    elif held is None:
        beta, b, sds, cors, sigma, stats = _sample_collapsed(
            design, resolved, chains, draws, tune, seed, target_accept, progress
        )
    else:
        method = "exact"
        beta, b = _sample_exact(design, resolved, variance, chains, draws, seed)

    if sigma is not None:
        sigma_rows = sigma
    elif held is not None and not design.sigma_known:
        sigma_rows = np.full((chains, draws), held.sigma)
    else:
        sigma_rows = None
    return _result(design, resolved, method, level, variance, held, beta, b, sds, cors, sigma, stats,
                   lambda: pointwise_log_likelihood(design, beta, b, sigma_rows))


def _warn_if_far_from_centred(design: Design, stacklevel: int = 3) -> None:
    """Warn, naming the column, where a fixed-effect column lies so far from zero that the Gaussian samplers'
    cross-products of X lose the posterior's digits (:func:`hierpool.algebra.conditioning.far_fixed_columns`;
    ``hp.lmm`` conditions such columns, the sampler cannot: its priors are on the user's coefficients)."""
    warn_far_fixed(design.X, design.fixed_names, SAMPLER_REASON, stacklevel=stacklevel)


def _result(design, resolved, method, level, variance, held, beta, b, sds, cors, sigma, stats, pointwise,
            extra: dict | None = None, series: tuple | None = None) -> BayesResult:
    """A linear mixed model's BayesResult from its draws: ``pointwise()`` the pointwise log-likelihood (stored
    up to :data:`LOG_LIKELIHOOD_MAX_VALUES` values, warned beyond), ``extra`` more posterior variables (an
    AR(1) model's phi), sampler diagnostics warned.  Draws that are not finite are refused: the exact draws'
    factorization failed in float64 (a fixed-effect column far from zero, ``variance=`` held on sleepstudy with
    Days + 1e7, gave NaN posteriors)."""
    if not (np.all(np.isfinite(beta)) and all(np.all(np.isfinite(np.asarray(x))) for x in b)):
        raise DataError("the draws of the fixed and random effects are not finite: the mixed-model equations are not "
                        "positive definite in float64 (a fixed-effect column far from zero or from unit scale makes "
                        "them so: centre or rescale it)")
    chains, draws = beta.shape[:2]
    log_lik = None
    if chains * draws * design.n <= LOG_LIKELIHOOD_MAX_VALUES:
        log_lik = pointwise()
    else:
        warnings.warn(
            f"the pointwise log-likelihood ({chains} x {draws} x {design.n} values) is not stored: "
            f"more than {LOG_LIKELIHOOD_MAX_VALUES:.0e}; idata has no log_likelihood group",
            HierpoolWarning,
            stacklevel=3,
        )
    idata = build_inference_data(design, beta, b, sds, cors, sigma, stats, log_lik)
    for name, values in (extra or {}).items():
        idata.posterior[name] = (("chain", "draw"), np.asarray(values))
    result = BayesResult(
        idata=idata,
        design=design,
        priors=resolved,
        method=method,
        level=level,
        held=held,
        held_varcorr=None if variance is None else variance.varcorr,
        series=series,
    )
    if stats is not None:
        result.diagnostics(warn=True)
    return result


def _bayes_spatial(formula, data, adjacency, chains, draws, tune, seed, priors, level, target_accept, progress,
                   weights, offset, family, link, unsupported: dict, method: str, variance):
    """``hp.bayes(..., adjacency=)``: a Gaussian spatial model by its exact sampler (:mod:`hierpool.bayesian
    .spatial_exact`, method 'auto' or 'collapsed'), any other (and ``method='full'``, and ``variance=``) by NUTS on
    every parameter (:mod:`hierpool.bayesian.spatial`)."""
    from ..spec.spatial import spatial_design
    from .spatial import bayes_spatial, car_priors

    for name, value in unsupported.items():
        if value is not None:
            raise ArgumentError(f"{name}= is not supported with a spatial term (adjacency=) yet")
    if method not in ("auto", "collapsed", "full"):
        raise ArgumentError(f"method={method!r}: a spatial model is sampled by NUTS on every parameter "
                            "(method='full'), or a Gaussian one exactly (method='collapsed'; 'auto' chooses)")
    spec = optional_family_spec(family, link)
    sdesign = spatial_design(formula, data, adjacency, family=spec, weights=weights, offset=offset)
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    if method != "full" and variance is None:
        from .spatial_exact import exact_sampler_refusal, sample_spatial_exact

        others, cars = car_priors(sdesign, priors)
        resolved = resolve_priors(sdesign.design, others)
        refusal = exact_sampler_refusal(sdesign, resolved)
        if refusal is None:
            return sample_spatial_exact(sdesign, resolved, cars, chains, draws, tune, seed, level)
        if method == "collapsed":
            raise ArgumentError(f"method='collapsed': {refusal} (method='full' samples it by NUTS)")
    elif method == "collapsed":
        raise ArgumentError("method='collapsed' with variance=: the variances are held, and NUTS samples the rest "
                            "(method='auto' or 'full')")
    return bayes_spatial(sdesign, priors, chains, draws, tune, seed, target_accept, progress, level, variance)


def _bayes_ar1(design, data, correlation, resolved, method, variance, held, chains, draws, tune, seed, level,
               target_accept, progress) -> BayesResult:
    """hp.bayes with AR(1) residuals: the collapsed sampler over (variance parameters, phi), or exact draws with
    an ``hp.lmm`` AR(1) fit's variance parameters and phi held."""
    series = checked_series(design, correlation, data)
    stats = sds = cors = None
    # the samplers run in the median lag's unit of time (the closed form's search's): phi there is the correlation
    # at that lag, whatever the user's unit, and its Uniform prior with it (draws_per_unit converts the draws)
    scaled, unit = in_search_unit(series, correlation.continuous)
    series_data = SeriesData(previous=jax.device_put(series.previous.astype(np.int32)),
                             lag=jax.device_put(scaled.lag.astype(float)),
                             y_less_offset=jax.device_put(np.asarray(design.y_less_offset, dtype=float)))
    if variance is not None and not (isinstance(variance, AR1Result) and variance.structure == correlation):
        raise ArgumentError("variance: hold an hp.lmm fit with the same correlation= (an AR1Result)")
    if method == "full":  # NUTS on the plain non-centered model, its likelihood on the residuals
        held = None if held is None else replace(held, phi=variance.phi)  # the result's: per the user's unit
        beta, b, sds, cors, sigma, stats, phi = _sample_full(
            design, resolved, None if held is None else replace(held, phi=variance.phi ** unit), chains, draws,
            tune, seed, target_accept, progress, series_data, correlation.bounds)
    elif variance is not None:
        method = "exact"
        beta, b = _sample_exact(design, resolved, variance, chains, draws, seed,
                                system=on_device(variance.system))  # the data whitened at the fit's phi
    else:
        ks = tuple(t.k for t in design.terms)
        loc, scale = (np.asarray(a, dtype=float) for a in resolved.beta_gaussian())
        pattern = jax.tree_util.tree_map(jax.device_put, system_pattern(design))
        out, stats = sample_nuts(
            ar1_collapsed_model, (pattern, series_data, loc, scale, resolved),
            static=(("phi_bounds", correlation.bounds),), chains=chains, tune=tune, draws=draws, seed=seed,
            target_accept=target_accept, dense_mass=True,
            postprocess=_ExactDrawsAR1(ks, draw_batch_size(pattern.layout)), progress=progress)
        beta, b = out["beta"], list(out["b"])
        sds, cors, _ = variance_draws(out["variance"], ks, True)
        sigma, phi = out["variance"]["sigma"], np.asarray(out["variance"]["phi"])
    if variance is not None:  # held: no sigma or phi draws, their values in every row
        sigma, phi = None, np.full((chains, draws), variance.phi)
    else:  # drawn per the median lag: per the user's unit, refused by name where a float cannot hold a draw
        phi, beyond = draws_per_unit(phi, unit, correlation, what="a posterior draw of phi")
        if beyond:
            raise DataError(beyond)
    sigma_rows = np.full((chains, draws), variance.sigma) if variance is not None else sigma
    return _result(design, resolved, method, level, variance, held, beta, b, sds, cors, sigma, stats,
                   lambda: ar1_pointwise_log_likelihood(design, beta, b, sigma_rows, phi, series.previous,
                                                        series.lag),
                   extra={"phi": phi},
                   series=(correlation, series_ends(correlation, data, design, series),
                           column_labels(data[correlation.group].loc[design.rows])))


@dataclass(frozen=True)
class _ExactDrawsAR1:
    """Inside the compiled post-processing: exact (beta, b) given each (theta, sigma, phi) draw of an AR(1) model
    (:func:`hierpool.algebra.ar1.draw_effects_whitened`).  A frozen dataclass: it keys the program cache by value."""

    ks: tuple[int, ...]
    batch_size: int

    def __call__(self, draws, key, pattern, series, loc, scale, priors):
        sds, cors, sigma = variance_draws(draws, self.ks, False)
        thetas = jax.vmap(theta_from_components)(sds, cors, sigma)
        beta, b = draw_effects_whitened(thetas, sigma, draws["phi"], pattern, series.previous, series.lag,
                                        series.y_less_offset, loc, scale, key, self.batch_size)
        return {"variance": draws, "beta": beta, "b": tuple(b)}


def bayes_independence(formula: str, data: pd.DataFrame, *, family, link, chains: int, draws: int, tune: int,
                       seed: int, priors, level: float, weights=None, offset=None) -> BayesResult | None:
    """``hp.bayes``'s posterior of a GLMM where its first try, the independence sampler, takes it; else None.

    ``hp.bayes(formula, data, family=family, seed=seed, ...)`` samples a binomial or Poisson model with one scalar
    random-effect term by independence Metropolis-Hastings from its Laplace fit
    (:mod:`hierpool.bayesian.independence`) where the proposal's importance-sampling efficiency is good, and by NUTS
    otherwise.  This is that first try alone: the same result where it is taken (the same draws for the same
    seed), None where ``hp.bayes`` would go on to NUTS (another model, a poor proposal).  ``hp.bayes_batch`` samples
    such datasets one by one here and the rest by its batched NUTS.  The arguments are ``hp.bayes``'s, checked by
    the caller.
    """
    spec = optional_family_spec(family, link)
    return _bayes_glmm(formula, data, spec, chains, draws, tune, seed, priors, None, "auto", None, level, 0.8, False,
                       weights, offset, nuts=False)


def _bayes_glmm(formula, data, spec, chains, draws, tune, seed, priors, se, method, variance, level, target_accept,
                progress, weights, offset, nuts: bool = True) -> BayesResult | None:
    """``hp.bayes`` with a family: independence Metropolis-Hastings from the Laplace approximation where it applies
    and its proposal is good (:mod:`hierpool.bayesian.independence`), else NUTS on every parameter
    (:mod:`hierpool.bayesian.glmm`); with ``nuts=False`` None instead of NUTS (:func:`bayes_independence`)."""
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {METHODS}, got {method!r}")
    if method == "collapsed":
        raise ArgumentError(
            f"method='collapsed' integrates the effects out in closed form, which needs a Gaussian response; "
            f"a {spec.name} model has no closed-form marginal likelihood: use method='full' (or 'auto')"
        )
    design = build_design(formula, data, se=se, weights=weights, offset=offset, family=spec)
    resolved = _resolved(priors, design, glmm=True, shape=spec.name == "negative_binomial")
    held = None if variance is None else _held_glmm_variance(design, variance)
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    drawn = None
    if method in ("auto", "independence"):
        if independence.applicable(design, held, resolved):
            drawn = independence.sample_independence(design, resolved, chains, draws, tune, seed,
                                                     force=method == "independence")
        elif method == "independence":
            raise ArgumentError(
                "method='independence' samples a binomial or Poisson model with one scalar random-effect term, "
                "its variance parameter free and Normal or flat priors on the fixed effects; this model has "
                + ", ".join(t.label for t in design.terms)
                + f", family {spec.name}" + (", variance held" if held is not None else "") + ": use method='full'"
            )
    if drawn is not None:
        beta, b, sds, cors, shape, stats, _ = drawn
        method = "independence"
    elif not nuts:
        return None
    else:
        beta, b, sds, cors, shape, stats = glmm.sample_glmm(
            design, resolved, held, chains, draws, tune, seed, target_accept, progress
        )
        method = "full"
    log_lik = None
    if chains * draws * design.n <= LOG_LIKELIHOOD_MAX_VALUES:
        log_lik = glmm.pointwise_log_likelihood(
            design, beta, b, shape if held is None or held.shape is None else np.full((chains, draws), held.shape)
        )
    else:
        warnings.warn(
            f"the pointwise log-likelihood ({chains} x {draws} x {design.n} values) is not stored: "
            f"more than {LOG_LIKELIHOOD_MAX_VALUES:.0e}; idata has no log_likelihood group",
            HierpoolWarning,
            stacklevel=3,
        )
    idata = build_inference_data(design, beta, b, sds, cors, None, stats, log_lik, shape=shape)
    result = BayesResult(
        idata=idata,
        design=design,
        priors=resolved,
        method=method,
        level=level,
        held=held,
        held_varcorr=None if variance is None else variance.varcorr,
    )
    result.diagnostics(warn=True)
    return result


def _bayes_relmat(formula, data, relmat, relmat_inverse, chains, draws, tune, seed, priors, se, method, variance,
                  level, weights, offset, family, correlation, target_accept, progress) -> BayesResult:
    """hp.bayes with a relationship matrix (:mod:`hierpool.bayesian.relmat`): the collapsed posterior of the sds and
    sigma by independence Metropolis-Hastings, or ``variance=``'s held, with exact (beta, b) draws."""
    from ..closedform.relmat import RelmatResult, check_design, relmat_equations
    from ..spec.relationship import model_relationship, with_relationship_levels
    from .psi_sampler import EFFECT_DRAWS_MAX_VALUES, sample_exact
    from .relmat import DRAW_CHUNK, AnimalPosterior

    if family is not None and not (isinstance(family, str) and family.strip().lower() == "gaussian"):
        raise ArgumentError("relmat= is not yet available with a family (a GLMM): a Gaussian response only")
    if correlation is not None:
        raise ArgumentError("relmat= with correlation= is not supported yet: give one of them")
    if method not in ("auto", "collapsed", "full"):
        raise ArgumentError(f"relmat= is sampled by the collapsed sampler (method='auto' or 'collapsed') or NUTS on "
                            f"the plain model (method='full'), got method={method!r}")
    rel = model_relationship(formula, relmat, relmat_inverse)
    design = build_design(formula, data, se=se, weights=weights, offset=offset, related=(rel.group,))
    _warn_if_far_from_centred(design, stacklevel=4)  # the animal model integrates beta out on X's columns too
    check_design(design, rel)
    resolved = _resolved(priors, design)  # (a Gaussian response: relmat= has no family yet)
    equations, labels, _ = relmat_equations(design, rel)
    terms = len(design.terms)
    expanded = with_relationship_levels(design, rel)
    related = next(j for j, term in enumerate(design.terms) if term.group == rel.group)
    stats = held = None
    if variance is not None and (not isinstance(variance, RelmatResult) or not _same_relmat_model(variance, design,
                                                                                                   rel)):
        raise ArgumentError("variance: hold an hp.lmm fit of this model with the same relationship matrix "
                            "(a RelmatResult)")
    if variance is not None:
        held = HeldVariance(cov_factors=tuple(np.array([[s]]) for s in variance.theta * variance.sigma),
                            sigma=float(variance.sigma))
    if method == "full":
        # NUTS on the plain model, b = sd L_A z with A's dense Cholesky factor: independent of the sparse equations
        factor = rel.cholesky_factor("method='full' with relmat= (use the default collapsed sampler beyond)")
        data_arrays = model_data(expanded, tuple(factor if j == related else None for j in range(terms)))
        beta, b, sds, cors, sigma, stats, _ = _sample_full(expanded, resolved, held, chains, draws, tune, seed,
                                                           target_accept, progress, data=data_arrays)
        if variance is not None:
            sds, sigma = None, None
            psi_draws = np.broadcast_to(np.log(np.append(variance.theta * variance.sigma, variance.sigma)),
                                        (chains, draws, terms + 1))
        else:
            psi_draws = np.log(np.concatenate([np.concatenate(sds, axis=-1), np.asarray(sigma)[..., None]], axis=-1))
        return _relmat_result(expanded, resolved, "full", level, variance, held, beta, b, sds, cors, sigma, stats,
                              psi_draws, related)
    posterior = AnimalPosterior(equations, resolved)
    if chains * draws * equations.q > EFFECT_DRAWS_MAX_VALUES:
        raise ArgumentError(
            f"hp.bayes with relmat= keeps every effect draw: {chains} chains x {draws} draws x {equations.q} levels "
            f"is more than {EFFECT_DRAWS_MAX_VALUES:.0e} numbers; ask for fewer draws (or use hp.lmm's closed form)")
    if variance is not None:
        psi = np.log(np.append(variance.theta * variance.sigma, variance.sigma))
        state = posterior.evaluate(psi, log_prior=0.0)  # held: the priors of the variances play no part
        if state is None:
            raise ArgumentError("variance: the mixed-model equations do not factor at the held variances (a variance "
                                "of 0?); hold a fit whose variances are positive")
        rng = np.random.default_rng([seed, 5])
        parts = [posterior.draw_effects(state, rng, min(DRAW_CHUNK, chains * draws - start))
                 for start in range(0, chains * draws, DRAW_CHUNK)]
        beta = np.concatenate([part[0] for part in parts]).reshape(chains, draws, -1)
        b_all = np.concatenate([part[1] for part in parts]).reshape(chains, draws, -1)
        psi_draws = np.broadcast_to(psi, (chains, draws, terms + 1))
        method = "exact"
    else:
        out = sample_exact(posterior, _relmat_start(design, rel), chains, draws, tune, seed)
        beta, b_all, psi_draws = out["beta"], out["b"], out["psi"]
        stats = {"diverging": np.zeros((chains, draws), dtype=bool), "acceptance_rate": out["acceptance"],
                 "n_steps": np.full((chains, draws), out["thin"], dtype=np.int64), "lp": out["lp"]}
        method = "collapsed"
    edges = np.cumsum([0] + [len(names) for names in labels])
    b = [b_all[..., start:stop, None] for start, stop in zip(edges[:-1], edges[1:])]
    sds = None if variance is not None else [np.exp(psi_draws[..., j:j + 1]) for j in range(terms)]
    sigma = None if variance is not None else np.exp(psi_draws[..., -1])
    return _relmat_result(expanded, resolved, method, level, variance, held, beta, b, sds,
                          None if sds is None else [None] * terms, sigma, stats, psi_draws, related)


def _relmat_result(expanded, resolved, method, level, variance, held, beta, b, sds, cors, sigma, stats, psi_draws,
                   related: int) -> BayesResult:
    """The animal model's BayesResult, h^2 = sigma_A^2 / (sum of the sds^2 + sigma^2) in ``heritability``."""
    variances = np.exp(2.0 * np.asarray(psi_draws))
    sigma_rows = np.exp(np.asarray(psi_draws)[..., -1])
    return _result(expanded, resolved, method, level, variance, held, beta, b, sds, cors, sigma, stats,
                   lambda: pointwise_log_likelihood(expanded, beta, b, sigma_rows),
                   extra={"heritability": variances[..., related] / variances.sum(axis=-1)})


def _relmat_start(design: Design, rel) -> np.ndarray:
    """Where the posterior's mode search starts: the REML fit's (log sds, log sigma), or, where REML has no
    interior optimum (a flat profile: the posterior is proper all the same), every sd at sd(y) / sqrt(terms + 1)."""
    from ..closedform.relmat import fit_relmat
    from ..errors import ConvergenceWarning, DataError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a boundary REML fit is only a start here
            fit = fit_relmat(design, rel)
        return np.log(np.append(fit.theta * fit.sigma, fit.sigma))
    except DataError:
        spread = float(np.std(design.y_less_offset)) or 1.0
        return np.full(len(design.terms) + 1, np.log(spread / np.sqrt(len(design.terms) + 1)))


def _same_relmat_model(fit, design: Design, rel) -> bool:
    relationship = fit.relationship
    return (relationship.group == rel.group and np.array_equal(relationship.labels, rel.labels)
            and relationship.inverse.shape == rel.inverse.shape
            and abs(relationship.inverse - rel.inverse).max() <= 1e-12 * max(abs(rel.inverse).max(), 1.0)
            and not model_differences(fit.design, design))
