"""``hp.simulate(fit, n)``: responses drawn from a fitted mixed model, lme4's ``simulate.merMod``.

For a linear mixed model y* = o + X beta^ + Z b* + e*, e*_i ~ N(0, sigma^2 / w_i) (the prior weights honoured:
lme4 1.1-31's ``simulate`` of a weighted ``lmer`` fit draws every row with variance sigma^2, and its ``bootMer``
with it; independent, or with AR(1)
residuals, e* drawn along each series with the fit's phi, e*_t = c_t e*_(t-1) + sigma sqrt(1 - c_t^2) z_t,
c_t = phi^lag_t); for a GLMM y*_i ~ family(g^-1(o_i + x_i' beta^ + z_i' b*)), a binomial's count of successes
out of its trials (w_i) returned as the proportion, as the fit reads its response (a ``cbind(successes, failures)``
response too, where lme4's ``simulate`` gives the two columns of counts: times the trials,
``fit.design.row_weights``, they are the successes).  b* is drawn anew from
N(0, Sigma^) per term (``use_u=False``, lme4's default ``re.form = NA``: the unconditional distribution, what a
parametric bootstrap needs), or held at the fitted conditional modes (``use_u=True``, lme4's ``re.form = NULL``).
A spatial term's field is drawn from its prior under its sum-to-zero constraints (one sparse LU of the bordered
prior precision; :func:`_spatial_linear_predictor`); a relationship matrix's effects from N(0, sigma_A^2 A) over
every level of A (one sparse LU of A^-1; :func:`_relmat_linear_predictor`).

``newdata=`` and ``newparams=`` (lme4's arguments of those names, its ``allow.new.levels = TRUE``): the rows of
another design, read as the fit read its data, each grouping level of it drawn anew, and parameters of the
analyst's choosing (beta, theta, sigma, a negative binomial's shape) in the fitted ones' places: a power analysis
simulates the study it plans from a pilot's fit so (:func:`_simulate_new`; checked against lme4's
``simulate(fit, newdata =, newparams =)``: means and covariances within Monte-Carlo error).

References: Bates, Maechler, Bolker & Walker (2015), lme4's ``simulate.merMod``; Davison & Hinkley (1997),
Bootstrap methods and their application, ch. 2 (the parametric bootstrap).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..algebra.family import draw_responses
from ..algebra.linalg import theta_lower_bounds, theta_to_factors
from ..errors import ArgumentError, boolean_argument, integer_argument, real_argument, seed_argument
from ..spec.design import group_index
from ..spec.formula import response_only_names
from ..spec.newdata import model_rows, new_known_variances, new_row_weights, row_labels
from ..spec.response import binomial_counts, cbind_arguments
from .ar1 import AR1Result
from .glmm_results import GLMMResult
from .results import LMMResult

#: Families :func:`simulate` draws from.
FAMILIES = ("binomial", "poisson", "negative_binomial")


def _linear_predictor(fit, rng: np.random.Generator, n: int, use_u: bool) -> np.ndarray:
    """(rows, n): o + X beta^ + sum_j z_ij' b*_j[level] per row, b* new draws from N(0, Sigma_j), or the fitted
    conditional modes (``use_u``: the fit's own linear predictor)."""
    design = fit.design
    if use_u:
        eta = fit.fitted if isinstance(fit, LMMResult) else fit.optimum.mode.eta
        return np.repeat(np.asarray(eta, dtype=float)[:, None], n, axis=1)
    out = (design.offset + design.X @ np.asarray(fit.fixef, dtype=float))[:, None] + np.zeros((1, n))
    for term, cov in zip(design.terms, fit.term_covariances()):
        out += _term_draws(term.z, term.index, term.n_levels, np.asarray(cov, dtype=float), rng, n)
    return out


def _spatial_linear_predictor(fit, rng: np.random.Generator, n: int, use_u: bool) -> np.ndarray:
    """(rows, n): a spatial fit's o + X beta^ + its terms' effects, each spatial term's latent x drawn from its prior
    under the constraints: x = B^-1 (R'e, 0) with B the bordered prior precision [[P, C], [C', 0]] (one sparse LU)
    and R'R = P (:meth:`~hierpool.algebra.icar.CarPrior.precision_root_draw`), whose covariance is V (V'PV)^-1 V',
    the constrained prior's; a ``(lhs | g)`` term's effects from N(0, Sigma) (``use_u``: the fit's modes)."""
    from ..algebra.icar import bordered_factor  # SciPy's sparse LU: loaded for a spatial fit only

    design, laplace = fit.design, fit.laplace
    if use_u:
        return np.repeat(np.asarray(fit._mode.eta, dtype=float)[:, None], n, axis=1)
    out = (design.offset + design.X @ np.asarray(fit.beta, dtype=float))[:, None] + np.zeros((1, n))
    for t, area_term in enumerate(fit.sdesign.areas):
        block = laplace.blocks[t]
        sd, mix = block.natural(laplace.block_psi(fit.psi, t))
        prior = block.prior
        factor = bordered_factor(prior.latent(sd, mix)[0], prior.latent_constraints)
        roots = np.stack([prior.precision_root_draw(sd, mix, rng.standard_normal(prior.root_size()))
                          for _ in range(n)], axis=1)
        rhs = np.vstack([roots, np.zeros((prior.latent_constraints.shape[1], n))])
        out += factor.solve(rhs)[: prior.n][area_term.area]
    for term, cov in zip(design.terms, [laplace.blocks[t].covariance(laplace.block_psi(fit.psi, t))
                                        for t in range(len(fit.sdesign.areas), len(laplace.blocks))]):
        out += _term_draws(term.z, term.index, term.n_levels, cov, rng, n)
    return out


def _relmat_linear_predictor(fit, rng: np.random.Generator, n: int, use_u: bool) -> np.ndarray:
    """(rows, n): an animal model's o + X beta^ + sum_j z_ij b*_j[level], the relationship term's b* drawn from
    N(0, sigma_A^2 A) over every level of A (one sparse LU of A^-1, :func:`~hierpool.closedform.relmat.factor_spd`,
    whose draw is N(0, (A^-1)^-1)), the other terms' from N(0, sigma_j^2 I) (``use_u``: the fitted BLUPs)."""
    from .relmat import factor_spd, relationship_positions  # SciPy's sparse LU: for a relationship matrix only

    design, rel = fit.design, fit.relationship
    out = (design.offset + design.X @ np.asarray(fit.fixef, dtype=float))[:, None] + np.zeros((1, n))
    blups = fit.blups if use_u else None
    for j, (term, cov) in enumerate(zip(design.terms, fit.term_covariances())):
        related = term.group == rel.group
        # each level of the data among the term's effects: A's labels, or the term's own levels
        position = relationship_positions(term, rel) if related else np.arange(term.n_levels)
        size = len(rel.labels) if related else term.n_levels
        sd = float(np.sqrt(cov[0, 0]))
        if use_u:
            b = blups[j][:, None]  # the same for every simulation
        elif related:  # A^-1 is positive definite (Relationship checked it when it was built)
            b = sd * factor_spd(rel.inverse)[0].draw(rng.standard_normal((size, n)))
        else:
            b = sd * rng.standard_normal((size, n))
        out += np.asarray(term.z[:, :1], dtype=float) * b[position[term.index]]
    return out


def _term_draws(z: np.ndarray, codes: np.ndarray, n_levels: int, cov: np.ndarray, rng: np.random.Generator,
                n: int) -> np.ndarray:
    """(rows, n): z_i' b*[level_i] of one random-effect term, b* drawn anew from N(0, ``cov``) per level and
    simulation (each row's level ``codes``, below ``n_levels``).  Every simulation path's term draws."""
    b = rng.standard_normal((n, n_levels, cov.shape[0])) @ _root(cov).T  # (n, ell, k)
    return np.einsum("ik,nik->in", z, b[:, codes, :])


def _root(cov: np.ndarray) -> np.ndarray:
    """R with R R' = cov, for a positive semi-definite covariance (a singular fit's too: an sd of 0)."""
    values, vectors = np.linalg.eigh(cov)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def _ar1_residuals(fit: AR1Result, rng: np.random.Generator, n: int, sigma: float, scale: np.ndarray) -> np.ndarray:
    """(rows, n): AR(1) residuals along each series of the fit, sigma scale_i times a unit chain u (a series' first
    u N(0, 1), each next c_t times the one before plus N(0, 1 - c_t^2)), drawn in rounds (a row once its predecessor
    is): each residual's variance is sigma^2 scale_i^2."""
    from ..algebra.ar1 import carried

    previous, lag = np.asarray(fit.series.previous), np.asarray(fit.series.lag)
    c = np.asarray(carried(fit.phi, previous, lag), dtype=float)
    innovation = np.sqrt(1.0 - c**2)[:, None] * rng.standard_normal((len(c), n))
    unit = np.zeros((len(c), n))
    done = np.zeros(len(c), dtype=bool)
    while not done.all():
        rows = np.flatnonzero(~done & ((previous < 0) | done[np.maximum(previous, 0)]))
        before = np.where((previous[rows] >= 0)[:, None], unit[np.maximum(previous[rows], 0)], 0.0)
        unit[rows] = c[rows, None] * before + innovation[rows]
        done[rows] = True
    return sigma * scale[:, None] * unit


def simulate(fit, n: int = 1, seed: int | None = None, use_u: bool = False, newdata: pd.DataFrame | None = None,
             newparams: dict | None = None) -> pd.DataFrame:
    """Draw ``n`` responses from a fitted model (lme4's ``simulate(fit, nsim = n)``).

    Parameters
    ----------
    fit : LMMResult, GLMMResult, SpatialFit or RelmatResult
        ``hp.lmm`` (independent or AR(1) residuals, prior weights or known residual sds, offsets) or ``hp.glmm``
        (binomial, Poisson, negative binomial) fit, or either with spatial terms (``adjacency=``: each spatial
        term's field drawn from its prior under its constraints), or an ``hp.lmm`` fit with a relationship matrix
        (``relmat=``: the term's effects drawn from N(0, sigma_A^2 A) over every level of A).
    n : int
        Number of simulated responses.
    seed : int, optional
        Seed of NumPy's generator (None: fresh entropy).
    use_u : bool
        Keep the fitted conditional modes of the random effects (lme4's ``re.form = NULL``) instead of drawing
        new ones from their fitted distribution (``re.form = NA``, the default).
    newdata : DataFrame, optional
        Rows to simulate other than the fitted ones (lme4's ``newdata``): a design to plan, say, with more subjects
        or items than the pilot that was fitted.  Its columns are read as the fit read its data (the fitted
        levels' coding, a stateful transform's fitted parameters); its grouping factors' levels are its own, each
        drawn anew (``use_u=False``: lme4's ``allow.new.levels``), or the fitted levels' modes (``use_u=True``,
        where a level the fit did not see is refused).  Prior weights come from the fit's weights column, known
        residual sds from its ``se`` column, a binomial's trials from the response's columns (``cbind``), the
        weights column, or 1 (a 0/1 response).  An ``hp.lmm`` fit with independent residuals or an ``hp.glmm`` fit
        (no spatial terms, no relationship matrix).
    newparams : dict, optional
        Parameters to simulate at instead of the fitted ones (lme4's ``newparams``): ``"beta"`` (the fixed effects,
        in ``fit.fixef``'s order, or a mapping from their names: the named ones replaced), ``"theta"`` (lme4's
        relative covariance factors, ``fit.theta``'s order), ``"sigma"`` (a linear model's residual sd), ``"shape"``
        (a negative binomial's).  A power analysis sets the effect it asks about here.  Not with ``use_u=True``
        (the conditional modes are the fitted parameters').

    Returns
    -------
    pandas.DataFrame
        One column per simulation (``sim_1`` ... ``sim_n``), indexed by the fitted rows of the data (rows dropped
        for missing values are absent), on the response's scale as the fit read it (a binomial's proportion of its
        trials, a ``cbind`` response's too: times ``fit.design.row_weights``, the trials, they are lme4's counts of
        successes).

    References
    ----------
    Bates, Maechler, Bolker & Walker (2015), J. Stat. Softw. 67(1); lme4's ``simulate.merMod``.
    """
    n = integer_argument("n", n, minimum=1)
    seed, use_u = seed_argument(seed, optional=True), boolean_argument("use_u", use_u)
    # a SpatialFit by its parts, not by importing closedform.spatial (SciPy), which a small fit never loads
    spatial = hasattr(fit, "sdesign") and hasattr(fit, "laplace")
    relmat = hasattr(fit, "relationship") and hasattr(fit, "heritability")  # a RelmatResult: SciPy not loaded here
    if not (spatial or relmat or isinstance(fit, (LMMResult, GLMMResult))):
        raise ArgumentError(f"hp.simulate takes an hp.lmm or hp.glmm fit with random-effect terms (or spatial ones, "
                            f"or a relationship matrix), got {type(fit).__name__} (a model without random terms' "
                            "simulation is not built yet)")
    rng = np.random.default_rng(seed)
    if newdata is not None or newparams is not None:
        if spatial or relmat or isinstance(fit, AR1Result):
            raise ArgumentError("hp.simulate's newdata= and newparams= take an hp.lmm fit with independent "
                                "residuals or an hp.glmm fit (without spatial terms or a relationship matrix), not "
                                f"{type(fit).__name__}")
        return _simulate_new(fit, n, rng, use_u, newdata, newparams)
    design = fit.design
    linear_predictor = (_spatial_linear_predictor if spatial else _relmat_linear_predictor if relmat else
                        _linear_predictor)
    eta = linear_predictor(fit, rng, n, use_u)
    weights = np.asarray(design.row_weights, dtype=float)
    if design.family is None:  # a Gaussian response
        sigma = 1.0 if design.sigma_known else float(fit.sigma)
        if isinstance(fit, AR1Result):
            y = eta + _ar1_residuals(fit, rng, n, sigma, 1.0 / np.sqrt(weights))
        else:
            y = _responses(None, eta, weights, sigma, rng)
    else:
        y = _responses(fit.laplace.family if spatial else fit.family, eta, weights, 1.0, rng)
    return pd.DataFrame(y, index=design.rows, columns=[f"sim_{i + 1}" for i in range(n)])


def _responses(family, eta: np.ndarray, weights: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(rows, n) responses drawn about the linear predictors ``eta``: a Gaussian's (``family`` None) with variance
    sigma^2 / w_i, or the family's at g^-1(eta), a binomial's proportion of its trials (``weights``)."""
    if family is None:
        return eta + sigma / np.sqrt(weights)[:, None] * rng.standard_normal(eta.shape)
    if family.name not in FAMILIES:
        raise ArgumentError(f"hp.simulate draws the families {FAMILIES}, not {family.name!r}")
    mu = np.asarray(family.link.inverse(eta), dtype=float)
    if family.name == "binomial":
        trials = np.rint(weights).astype(np.int64)
        if not np.allclose(trials, weights):
            raise ArgumentError("hp.simulate draws a binomial's successes out of whole trials: the fit's prior "
                                "weights are not whole numbers")
        return draw_responses("binomial", mu, rng, trials=trials[:, None])
    if not np.allclose(weights, 1.0):
        raise ArgumentError(f"hp.simulate: a {family.name} fit with prior weights (a weighted log-likelihood) "
                            "has no distribution to draw from")
    return draw_responses(family.name, mu, rng, shape=None if family.shape is None else float(family.shape))


def _simulate_new(fit, n: int, rng: np.random.Generator, use_u: bool, newdata, newparams) -> pd.DataFrame:
    """:func:`simulate` at ``newdata``'s rows and/or ``newparams``' parameters (an hp.lmm fit with independent
    residuals or an hp.glmm fit)."""
    design = fit.design
    glmm_fit = isinstance(fit, GLMMResult)
    beta, theta, sigma, shape = _parameters(fit, newparams)
    if use_u and newparams:
        raise ArgumentError("hp.simulate: use_u=True keeps the fitted conditional modes, which belong to the fitted "
                            "parameters: give newparams= with use_u=False")
    X, terms, offset = model_rows(design, newdata, levels_read=True)
    eta = (offset + X @ beta)[:, None] + np.zeros((1, n))
    ks = tuple(t.k for t in design.terms)
    factors = theta_to_factors(theta, ks)
    modes = fit.optimum.mode.b if glmm_fit else fit.solution.b
    for j, (term, (z, level)) in enumerate(zip(design.terms, terms)):
        if use_u:
            if np.any(level < 0):
                raise ArgumentError(f"hp.simulate(use_u=True): newdata holds levels of {term.group!r} the fit did not "
                                    "see, which have no conditional mode (use_u=False draws every level anew)")
            eta += np.einsum("ik,ik->i", z, np.asarray(modes[j], dtype=float)[level])[:, None]
            continue
        codes = level if newdata is None else group_index(newdata, term.spec.factor)[0]
        factor = sigma * np.asarray(factors[j], dtype=float)
        eta += _term_draws(z, codes, int(codes.max()) + 1 if codes.size else 0, factor @ factor.T, rng, n)
    weights = _new_weights(design, newdata)
    if not glmm_fit:
        y = _responses(None, eta, weights, 1.0 if design.sigma_known else sigma, rng)
    else:
        y = _responses(fit.family if shape is None else replace(fit.family, shape=shape), eta, weights, 1.0, rng)
    return pd.DataFrame(y, index=row_labels(design, newdata), columns=[f"sim_{i + 1}" for i in range(n)])


def _parameters(fit, newparams) -> tuple[np.ndarray, np.ndarray, float, float | None]:
    """(beta, theta, sigma, a negative binomial's shape or None): the fit's, with ``newparams``' in their places."""
    glmm_fit = isinstance(fit, GLMMResult)
    beta = np.asarray(fit.fixef, dtype=float).copy()
    theta = np.asarray(fit.theta, dtype=float).copy()
    sigma = 1.0 if glmm_fit or fit.design.sigma_known else float(fit.sigma)
    shape = getattr(fit, "shape", None) if glmm_fit else None
    if newparams is None:
        return beta, theta, sigma, shape
    if not isinstance(newparams, dict):
        raise ArgumentError(f"newparams must be a dict (beta, theta, sigma, shape), got {type(newparams).__name__}")
    known = ("beta", "theta") + (("shape",) if shape is not None else ()) + (() if glmm_fit or fit.design.sigma_known
                                                                             else ("sigma",))
    unknown = [key for key in newparams if key not in known]
    if unknown:
        raise ArgumentError(f"newparams has {unknown}: this fit's parameters are {list(known)}")
    if "beta" in newparams:
        given = newparams["beta"]
        names = list(fit.fixef.index)
        if isinstance(given, (dict, pd.Series)):
            missing = [name for name in dict(given) if name not in names]
            if missing:
                raise ArgumentError(f"newparams['beta'] names {missing}, not fixed effects of the fit ({names})")
            for name, value in dict(given).items():
                beta[names.index(name)] = real_argument(f"newparams['beta'][{name!r}]", value)
        else:
            beta = _vector("newparams['beta']", given, len(beta))
    if "theta" in newparams:
        theta = _vector("newparams['theta']", newparams["theta"], len(theta))
        lower = theta_lower_bounds(tuple(t.k for t in fit.design.terms))
        if np.any(theta < lower):
            raise ArgumentError("newparams['theta']: the diagonal elements of each T_j (lme4's theta) must be >= 0")
    if "sigma" in newparams:
        sigma = real_argument("newparams['sigma']", newparams["sigma"], above=0.0)
    if "shape" in newparams:
        shape = real_argument("newparams['shape']", newparams["shape"], above=0.0)
    return beta, theta, sigma, shape


def _vector(name: str, values, length: int) -> np.ndarray:
    """``values`` as ``length`` finite floats, refused by name otherwise."""
    wanted = f"{length} finite number{'s' if length != 1 else ''}"
    try:
        out = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be {wanted}, got {values!r}") from None
    if out.size != length or not np.all(np.isfinite(out)):
        raise ArgumentError(f"{name} must be {wanted}, got {values!r}")
    return out


def _new_weights(design, newdata) -> np.ndarray:
    """Each row's weight for :func:`_responses`: prior weights (1 / se^2 with known residual sds), or a binomial's
    trials; the fitted rows' without ``newdata``."""
    if newdata is None:
        return np.asarray(design.row_weights, dtype=float)
    rows = len(newdata)
    if design.family is None:
        if design.sigma_known:
            return 1.0 / new_known_variances(design, newdata)
        weights = new_row_weights(design, newdata)
        return np.ones(rows) if weights is None else np.asarray(weights, dtype=float)
    if design.family.name != "binomial":
        weights = new_row_weights(design, newdata)
        return np.ones(rows) if weights is None else np.asarray(weights, dtype=float)
    counts = None
    if cbind_arguments(design.spec.response):  # the trials are the response's successes and failures
        read = {name for name in response_only_names(design.spec) if name in design.frame.columns}
        missing = sorted(name for name in read if name not in newdata.columns)
        if missing:
            raise ArgumentError(f"hp.simulate at newdata of a binomial fit needs each new row's trials, from the "
                                f"response {design.spec.response!r}: newdata lacks {missing} (their successes are not "
                                "read, only the trials they add up to)")
        counts = binomial_counts(newdata, design.spec.response)
        if not np.all(np.isfinite(counts[1])) or not np.allclose(counts[1], np.rint(counts[1])):
            raise ArgumentError(f"hp.simulate at newdata of a binomial fit: newdata's trials (from "
                                f"{design.spec.response!r}) must be whole numbers")
    trials = np.ones(rows) if counts is None else counts[1]
    if design.weights_column is not None:  # proportions with their trials as weights
        if design.weights_column not in newdata.columns:
            raise ArgumentError(f"hp.simulate at newdata of a binomial fit needs each new row's trials: a column "
                                f"{design.weights_column!r} of newdata")
        trials = trials * newdata[design.weights_column].to_numpy(dtype=float)
    elif design.weights is not None and counts is None and not np.allclose(design.row_weights, 1.0):
        raise ArgumentError("hp.simulate at newdata of a binomial fit needs each new row's trials: fit with "
                            "weights=<column name> (they were an array)")
    return trials
