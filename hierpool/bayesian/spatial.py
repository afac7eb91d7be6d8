"""Bayesian disease mapping: NUTS on a model with spatial terms ``car(area, type=...)`` (issue 19).

    y_i ~ family(mu_i),   g(mu_i) = offset_i + x_i' beta + sum_t b_t[area_t(i)] + sum_j z_ij' u_j[g_j(i)],

with any ``(lhs | g)`` terms u_j as :func:`hierpool.bayes` samples them (:func:`hierpool.bayesian.model.group_effects`,
non-centered, their sds' and correlations' priors as :mod:`hierpool.bayesian.priors`), and each spatial term's area
effects b of its type (:mod:`hierpool.spec.spatial`, :class:`hierpool.algebra.icar.CarPrior`):

* ``icar``: b = sd phi, phi ~ ICAR: log p(phi) = -sum over neighbours (phi_i - phi_j)^2 / 2 under an exact
  sum-to-zero constraint per connected component (an island, with ``islands='independent'``, N(0, 1));
* ``bym2``: b = sd (sqrt(1 - rho) u + sqrt(rho / s) phi), u ~ N(0, I), phi as above, s each component's scaling
  factor (Riebler et al. 2016; per component, islands with the unstructured part alone: Freni-Sterrantino et
  al. 2018); brms's ``car(type = "bym2")``;
* ``proper``: b = sd w, w ~ N(0, (D - alpha W)^-1), its log determinant sum log(1 - alpha lambda_k) + const from
  the eigenvalues of D^-1/2 W D^-1/2 (brms's ``escar``; Jin, Carlin & Banerjee 2005).

phi is sampled in free coordinates z, phi = H z (:func:`hierpool.algebra.icar.sum_to_zero`: Helmert's
orthonormal contrasts per component, O(n)): the constraint is exact (brms imposes it softly, sum(phi) ~
N(0, 0.001 n)) and H is an isometry, so z's density is phi's.  On small maps (:data:`WHITEN_MAX_AREAS`) phi = M z
with M M' the constrained ICAR covariance (:func:`hierpool.algebra.icar.constrained_square_root`), z ~ N(0, I):
the same prior, isotropic.
The model is non-centered in every type (b = sd times a unit-scale field).  The quadratic form of the ICAR is the
Laplacian's, x' Q x, as the closed form's sparse precision has it (tests/test_spatial_model.py checks the two
agree, in both coordinates).

Priors (keys of ``priors=``): the fixed effects', ``sigma``'s, ``shape``'s and the ``(lhs | g)`` terms' as
:mod:`hierpool.bayesian.priors` (on the link scale for a GLMM); ``sd`` (or ``sd_<area column>``) HalfNormal(2.5) on
the link scale (2.5 sd(y) for a Gaussian response), ``rho`` Beta(1, 1) (BYM2), ``alpha`` Uniform(0, 1) (proper CAR):
brms's defaults for rho and alpha, the sd's as hierpool's other sds.  Where the model has more than one random term,
each spatial term's sites and keys end in ``_car_<area column>`` (``sd_car_county``, ``rho_car_county``;
:meth:`~hierpool.spec.spatial.SpatialDesign.suffix`), ``sd`` is every sd's prior, and ``sd_<group>`` a ``(lhs | g)``
term's (in ``car(area, type='icar') + (1 | area)``, ``sd_area`` is the unstructured term's, ``sd_car_area`` the
spatial one's); a one-term model's ``rho`` or ``sd_<area column>`` naming nothing there is refused by name.

References: Besag, York & Mollie (1991), Ann. Inst. Stat. Math. 43; Riebler, Sorbye, Simpson & Rue (2016), Stat.
Methods Med. Res. 25; Freni-Sterrantino, Ventrucci & Rue (2018), Spatial and Spatio-temporal Epidemiology 26;
Morris et al. (2019), Spatial and Spatio-temporal Epidemiology 31 (ICAR in Stan).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from functools import cached_property

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import scipy.sparse
from numpyro.distributions import constraints

from ..algebra.family import log_likelihood_eta
from ..algebra.icar import (
    CarPrior,
    SumToZeroLayout,
    car_prior,
    compose_bym2,
    constrained_square_root,
    sum_to_zero,
    sum_to_zero_layout,
)
from ..closedform.spatial import area_risk_table
from ..errors import ArgumentError, HierpoolWarning, real_argument, seed_argument
from ..spec.design import model_differences
from ..spec.newdata import model_rows, row_labels, unseen_levels
from ..spec.spatial import AreaTerm, SpatialDesign, areas_in_graph, group_effect_index, group_parameter_names
from .model import cov_factors_of, fixed_effects, group_effects, variance_parameters
from .nuts import sample_nuts
from .posterior import (
    gaussian_pointwise,
    group_posterior,
    linear_predictor_draws,
    slot_covariance_draws,
    slot_effect_draws,
    term_slots,
)
from .prediction import check_arguments, on_scale, summary_table, term_effect_draws
from .priors import (
    Priors,
    _check_distribution,
    _check_positive_support,
    group_keys,
    register_priors,
    resolve_priors,
)
from .results import SUMMARY_COLUMNS, posterior_diagnostics, summarize_draws

#: Maps up to this many areas sample the ICAR in whitened coordinates (a dense n x n product per gradient, where the
#: Laplacian's quadratic form is O(edges)): its prior is then isotropic, which the sampler's diagonal mass matrix
#: cannot make it otherwise (the long-wavelength modes of an elongated map have ~100x the variance of the shortest).
#: The measurements behind the bound are in benchmarks/RESULTS.md ("Disease mapping": 100-, 196- and 400-area maps,
#: whitened ahead at each); beyond it untried: the dense product grows as n^2 per gradient, the sparse form as n.
WHITEN_MAX_AREAS = 400
#: Pointwise log-likelihood values kept in idata at most (chains x draws x rows), as hp.bayes.
LOG_LIKELIHOOD_MAX_VALUES = 5e7

jax.tree_util.register_dataclass(SumToZeroLayout, data_fields=[f.name for f in fields(SumToZeroLayout)
                                                                if f.name != "n_islands"], meta_fields=["n_islands"])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AreaData:
    """One spatial term's arrays, as JAX arrays."""

    area: jax.Array  # (rows,) int32
    edge_i: jax.Array
    edge_j: jax.Array
    island: jax.Array  # 1.0 for an area without neighbours
    scaling: jax.Array  # BYM2's scaling factor of each area
    degree: jax.Array
    eigenvalues: jax.Array  # of D^-1/2 W D^-1/2 (proper CAR only; empty otherwise)
    whitening: jax.Array  # (n, n_free) M with phi = M z, z ~ N(0, I): the ICAR's exact square root (small maps)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SpatialData:
    """The design's arrays, each spatial term's and each ``(lhs | g)`` term's, as JAX arrays (a pytree, traced by
    the compiled sampler)."""

    y: jax.Array
    weights: jax.Array
    offset: jax.Array
    X: jax.Array
    areas: tuple  # AreaData per spatial term
    group_index: tuple  # per (lhs | g) term, (rows,) int32
    group_z: tuple  # per (lhs | g) term, (rows, k)


@register_priors
@dataclass(frozen=True)
class CarPriors:
    """A spatial term's priors: its sd, and its mixing parameter's (rho or alpha; None for ICAR)."""

    sd: object
    mix: object


def car_priors(sdesign: SpatialDesign, priors: dict | None) -> tuple[dict, tuple[CarPriors, ...]]:
    """(the other priors, each spatial term's): defaults of the module docstring, overridden by key (``sd`` and each
    term's site names; ``sd_<area column>`` too where the model's one random term is spatial)."""
    priors = dict(priors or {})
    design = sdesign.design
    if "cor" in priors and not design.terms:
        raise ArgumentError(f"prior 'cor' given, but {sdesign.areas[0].term.label} has no correlation (it is for "
                            "(x | g) terms)")
    s_y = 1.0 if design.family is not None else float(np.std(design.y)) or 1.0
    if not sdesign.single:  # the keys of a one-term model name nothing here, or another term: refused by name
        valid = [f"{name}{sdesign.suffix(a)}" for a in sdesign.areas for name in ("sd", a.term.mix_name) if name]
        groups = {key for term in design.terms for key in group_keys(term.group)}  # resolve_priors' sd_<g> keys
        stray = [key for key in priors if key in ("rho", "alpha")
                 or (key.startswith("sd_") and key[3:] in {a.term.factor for a in sdesign.areas} - groups)]
        if stray:
            raise ArgumentError(f"prior {stray[0]!r}: in a model with several random terms a spatial term's prior "
                                f"keys end in _car_<area column>: {valid}")
    used, out = set(), []
    for area_term in sdesign.areas:
        term, suffix = area_term.term, sdesign.suffix(area_term)
        sd = dist.HalfNormal(2.5 * s_y)
        for key in ("sd", f"sd{suffix}") + ((f"sd_{term.factor}",) if sdesign.single else ()):
            if key in priors:
                sd = _check_distribution(key, priors[key], allow_flat=False)
                _check_positive_support(key, sd)
                used.add(key)
        mix_key = term.mix_name
        mix = None if mix_key is None else (dist.Beta(1.0, 1.0) if term.type == "bym2" else dist.Uniform(0.0, 1.0))
        for name in ("rho", "alpha"):
            key = f"{name}{suffix}"
            if key in priors:
                if name != mix_key:
                    raise ArgumentError(f"prior {key!r} given, but {term.label} has " +
                                        (f"{mix_key + suffix!r}" if mix_key else "no mixing parameter"))
                mix = _check_distribution(key, priors[key], allow_flat=False)
                if mix.support is not constraints.unit_interval and not (
                        isinstance(mix, dist.Uniform) and float(mix.low) >= 0 and float(mix.high) <= 1):
                    raise ArgumentError(f"prior {key!r} must have its support in (0, 1), such as Beta(a, b)")
                used.add(key)
        out.append(CarPriors(sd=sd, mix=mix))
    if design.terms:
        used.discard("sd")  # 'sd' is every sd's prior: the (lhs | g) terms' too (resolve_priors)
    return {key: value for key, value in priors.items() if key not in used}, tuple(out)


def whitens(prior: CarPrior) -> bool:
    """Whether the sampler takes the ICAR in whitened coordinates (:data:`WHITEN_MAX_AREAS`)."""
    return prior.type != "proper" and prior.n <= WHITEN_MAX_AREAS


def area_data(area_term: AreaTerm, prior: CarPrior, layout: SumToZeroLayout) -> AreaData:
    put, g = jax.device_put, area_term.graph
    eigenvalues = prior.proper_eigenvalues() if prior.type == "proper" else np.zeros(0)
    whitening = constrained_square_root(prior, layout) if whitens(prior) else np.zeros((0, 0))
    return AreaData(area=put(area_term.area.astype(np.int32)), edge_i=put(g.edges[:, 0].astype(np.int32)),
                    edge_j=put(g.edges[:, 1].astype(np.int32)), island=put((g.degree == 0).astype(float)),
                    scaling=put(prior.scaling), degree=put(g.degree.astype(float)), eigenvalues=put(eigenvalues),
                    whitening=put(whitening))


def spatial_data(sdesign: SpatialDesign, priors: list[CarPrior], layouts: list[SumToZeroLayout]) -> SpatialData:
    put, design = jax.device_put, sdesign.design
    return SpatialData(
        y=put(np.asarray(design.y, dtype=float)), weights=put(np.asarray(design.row_weights, dtype=float)),
        offset=put(np.asarray(design.offset, dtype=float)), X=put(np.asarray(design.X, dtype=float)),
        areas=tuple(area_data(a, prior, layout) for a, prior, layout in zip(sdesign.areas, priors, layouts)),
        group_index=tuple(put(np.asarray(t.index, dtype=np.int32)) for t in design.terms),
        group_z=tuple(put(np.asarray(t.z, dtype=float)) for t in design.terms))


def car_effect(data: AreaData, layout: SumToZeroLayout, car: CarPriors, held, *, type: str, n_areas: int,
               n_free: int, suffix: str):
    """One spatial term's area effects b (module docstring), its sites suffixed; ``held`` its (sd, mix) or None."""
    sd = numpyro.sample(f"sd{suffix}", car.sd) if held is None else held[0]
    if type == "proper":
        alpha = numpyro.sample(f"alpha{suffix}", car.mix) if held is None else held[1]
        w = numpyro.sample(f"w{suffix}", dist.ImproperUniform(constraints.real, (), (n_areas,)))
        quadratic = jnp.sum(data.degree * w**2) - 2.0 * alpha * jnp.sum(w[data.edge_i] * w[data.edge_j])
        numpyro.factor(f"car{suffix}", 0.5 * jnp.sum(jnp.log1p(-alpha * data.eigenvalues)) - 0.5 * quadratic)
        return sd * w
    if data.whitening.size:  # phi = M z is exactly ICAR-distributed: its prior is z's N(0, I)
        z = numpyro.sample(f"z{suffix}", dist.Normal(0.0, 1.0).expand((n_free,)).to_event(1))
        phi = data.whitening @ z
    else:
        z = numpyro.sample(f"z{suffix}", dist.ImproperUniform(constraints.real, (), (n_free,)))
        phi = sum_to_zero(z, layout)
        difference = phi[data.edge_i] - phi[data.edge_j]
        numpyro.factor(f"icar{suffix}", -0.5 * (jnp.sum(difference**2) + jnp.sum(data.island * phi**2)))
    if type == "icar":
        return sd * phi
    rho = numpyro.sample(f"rho{suffix}", car.mix) if held is None else held[1]
    u = numpyro.sample(f"u{suffix}", dist.Normal(0.0, 1.0).expand((n_areas,)).to_event(1))
    return compose_bym2(sd, rho, u, phi, data.scaling)[0]


def spatial_model(data: SpatialData, layouts: tuple, priors: Priors, cars: tuple, held=None, *, types: tuple,
                  family: str, link: str, n_areas: tuple, n_free: tuple, suffixes: tuple, ks: tuple = (),
                  n_levels: tuple = ()):
    """The NumPyro model of the module docstring; with ``held`` = (each spatial term's (sd, mix) (terms, 2), each
    ``(lhs | g)`` term's covariance factor, sigma) those are fixed (a closed-form fit's: the posterior of beta and
    the effects given the variance parameters, whose mean is the BLUP for a Gaussian)."""
    eta = data.offset + data.X @ fixed_effects(priors)
    for t, (area, layout, car) in enumerate(zip(data.areas, layouts, cars)):
        b = car_effect(area, layout, car, None if held is None else held[0][t], type=types[t], n_areas=n_areas[t],
                       n_free=n_free[t], suffix=suffixes[t])
        eta = eta + b[area.area]
    if held is None:  # sigma (a Gaussian response) and the (lhs | g) terms' sds and correlations
        sigma, sds, cors = variance_parameters(priors, ks)
        cov_factors = cov_factors_of(sds, cors)
    else:
        sigma, cov_factors = held[2], held[1]
    eta = group_effects(eta, data.group_index, data.group_z, cov_factors, ks, n_levels)
    if family == "gaussian":
        numpyro.factor("y", jnp.sum(-0.5 * data.weights * ((data.y - eta) / sigma) ** 2
                                    - jnp.log(sigma) + 0.5 * jnp.log(data.weights)))
    else:
        shape = numpyro.sample("shape", priors.shape) if family == "negative_binomial" else None
        numpyro.factor("y", jnp.sum(log_likelihood_eta(family, link, data.y, eta, data.weights, shape,
                                                       constant=False)))


def area_effects(draws: dict, prior: CarPrior, layout: SumToZeroLayout, whitening: np.ndarray,
                 suffix: str = "") -> dict[str, np.ndarray]:
    """b (and BYM2's spatial and unstructured parts) per draw, on the host, from a spatial term's sampled sites
    (and the held sd and rho, where ``draws`` has them filled in)."""
    sd = np.asarray(draws[f"sd{suffix}"])[..., None]
    if prior.type == "proper":
        return {"b": sd * np.asarray(draws[f"w{suffix}"])}
    z = np.asarray(draws[f"z{suffix}"], dtype=float)
    phi = z @ whitening.T if whitening.size else sum_to_zero(z, layout)  # the sampler's coordinates (area_data)
    if prior.type == "icar":
        return {"b": sd * phi}
    b, spatial, unstructured = compose_bym2(sd, np.asarray(draws[f"rho{suffix}"])[..., None],
                                            np.asarray(draws[f"u{suffix}"]), phi, prior.scaling)
    return {"b": b, "spatial": spatial, "unstructured": unstructured}


def held_values(sdesign: SpatialDesign, fit) -> tuple:
    """(each spatial term's (sd, mix), each (lhs | g) term's covariance factor, sigma) of a closed-form spatial fit
    of the same model, for ``hp.bayes(..., variance=fit)``: the same terms, family and link, graphs, rows,
    response, weights and offset, or an error saying which differs."""
    other = getattr(fit, "sdesign", None)
    if other is None:
        raise ArgumentError(f"variance= must be an hp.lmm / hp.glmm fit with adjacency=, got {type(fit).__name__}")
    same_graphs = len(other.areas) == len(sdesign.areas) and all(
        np.array_equal(a.graph.labels, b.graph.labels) and np.array_equal(a.graph.edges, b.graph.edges)
        for a, b in zip(other.areas, sdesign.areas))
    checks = [
        ("spatial terms", [a.term for a in other.areas] == [a.term for a in sdesign.areas]),
        ("graph", same_graphs),
        ("areas", same_graphs and all(np.array_equal(a.area, b.area) for a, b in zip(other.areas, sdesign.areas))),
    ]
    differing = [name for name, same in checks if not same] + model_differences(other.design, sdesign.design)
    if differing:
        raise ArgumentError(f"variance: the closed-form fit differs from this model in its {', '.join(differing)}: "
                            "give an hp.lmm / hp.glmm fit of the same spatial model, family, data and graph")
    return (np.asarray(fit.car_parameters(), dtype=float), tuple(np.asarray(f) for f in fit.covariance_factors()),
            np.asarray(fit.sigma, dtype=float))


def bayes_spatial(sdesign: SpatialDesign, priors: dict | None, chains: int, draws: int, tune: int, seed: int,
                  target_accept: float, progress: bool, level: float, variance=None) -> SpatialBayesResult:
    """NUTS draws of the spatial model (module docstring) as a :class:`SpatialBayesResult`.

    Parameters
    ----------
    sdesign : SpatialDesign
        The model (:func:`hierpool.spec.spatial.spatial_design`).
    priors : dict, optional
        Overrides by key (module docstring, and :mod:`hierpool.bayesian.priors` for the fixed effects, sigma, shape
        and any ``(lhs | g)`` terms).
    chains, draws, tune, seed, target_accept, progress, level
        As :func:`hierpool.bayes`.
    variance : SpatialFit, optional
        A closed-form fit of the same model, data and graphs: its variance parameters are held.

    Returns
    -------
    SpatialBayesResult

    References
    ----------
    Riebler, Sorbye, Simpson & Rue (2016), Stat. Methods Med. Res. 25; Morris et al. (2019), Spatial and
    Spatio-temporal Epidemiology 31; Hoffman & Gelman (2014), JMLR 15 (NUTS).
    """
    design = sdesign.design
    others, cars = car_priors(sdesign, priors)
    resolved = resolve_priors(design, others)
    car_list = [car_prior(a.graph, a.term.type) for a in sdesign.areas]
    layouts = tuple(sum_to_zero_layout(a.graph) for a in sdesign.areas)
    suffixes = tuple(sdesign.suffix(a) for a in sdesign.areas)
    family = "gaussian" if design.family is None else design.family.name
    link = "identity" if design.family is None else design.family.link
    held = None if variance is None else held_values(sdesign, variance)
    data = spatial_data(sdesign, car_list, list(layouts))
    ks, n_levels = tuple(t.k for t in design.terms), tuple(t.n_levels for t in design.terms)
    out, stats = sample_nuts(
        spatial_model, (data, layouts, resolved, cars, held),
        static=(("types", tuple(a.term.type for a in sdesign.areas)), ("family", family), ("link", link),
                ("n_areas", tuple(a.n_areas for a in sdesign.areas)), ("n_free", tuple(x.n_free for x in layouts)),
                ("suffixes", suffixes), ("ks", ks), ("n_levels", n_levels)),
        chains=chains, tune=tune, draws=draws, seed=seed, target_accept=target_accept, progress=progress)
    filled = dict(out)
    shape = (chains, draws)
    if held is not None:  # the held values as constant draws, so that what follows reads them as any draw
        for area_term, suffix, (sd, mix) in zip(sdesign.areas, suffixes, held[0]):
            filled[f"sd{suffix}"] = np.full(shape, sd)
            if area_term.term.mix_name:
                filled[f"{area_term.term.mix_name}{suffix}"] = np.full(shape, mix)
        if family == "gaussian":
            filled["sigma"] = np.full(shape, float(held[2]))
    if "beta" in out:
        beta = np.asarray(out["beta"])
    elif design.p:
        beta = np.stack([np.asarray(out[f"beta__{i}"]) for i in range(design.p)], axis=-1)
    else:
        beta = np.zeros((chains, draws, 0))
    groups_b = [np.asarray(out[f"b__{j}"]) for j in range(len(design.terms))]
    effects = [area_effects(filled, prior, layout, np.asarray(adata.whitening), suffix)
               for suffix, prior, layout, adata in zip(suffixes, car_list, layouts, data.areas)]
    hyper_names = {"sigma", "shape"} | {f"{h}{s}" for s in suffixes for h in ("sd", "rho", "alpha")}
    sampled = {name: np.asarray(out[name]) for name in out if name in hyper_names}  # (not those held)
    sds = cors = None
    if design.terms and held is None:
        sds = [np.asarray(out[f"sd__{j}"]) for j in range(len(ks))]
        cors = [np.asarray(out[f"cor__{j}"]) if k > 1 else None for j, k in enumerate(ks)]
    return spatial_result(sdesign, resolved, cars, level, held, beta=beta, effects=effects, groups_b=groups_b,
                          sds=sds, cors=cors, sampled=sampled, sigma=filled.get("sigma"), stats=stats)


def spatial_result(sdesign: SpatialDesign, resolved: Priors, cars: tuple, level: float, held, *, beta: np.ndarray,
                   effects: list[dict], groups_b: list[np.ndarray], sds, cors, sampled: dict, sigma, stats: dict,
                   method: str = "nuts") -> SpatialBayesResult:
    """A :class:`SpatialBayesResult` from draws (chain, draw, ...): ``effects`` each spatial term's b (and BYM2's
    parts), ``groups_b`` each ``(lhs | g)`` term's effects (ell, k) with their ``sds`` and correlation factors
    ``cors`` (None when held), ``sampled`` the sampled hyperparameters by name, ``sigma`` the residual sd's draws
    (held or not; a Gaussian response), ``stats`` the sampler's statistics."""
    design = sdesign.design
    chains, draws = beta.shape[:2]
    family = "gaussian" if design.family is None else design.family.name
    link = "identity" if design.family is None else design.family.link
    suffixes = [sdesign.suffix(a) for a in sdesign.areas]
    eta = linear_predictor_draws(design, beta, groups_b)
    posterior, coords, dims = {"beta": beta}, {"fixef": list(design.fixed_names)}, {"beta": ["fixef"]}
    for area_term, suffix, term_effects in zip(sdesign.areas, suffixes, effects):
        eta = eta + term_effects["b"][..., area_term.area]
        coords[f"area{suffix}"] = [str(label) for label in area_term.graph.labels]
        for name, values in term_effects.items():
            posterior[f"{name}{suffix}"] = values
            dims[f"{name}{suffix}"] = [f"area{suffix}"]
    if design.terms:
        group_posterior(design, groups_b, sds, cors, posterior, coords, dims)
    posterior.update(sampled)
    if link == "log":  # each area's log relative risk: log(sum of mu over its rows / sum of expected)
        # a Poisson row's prior weight counts it that many times (its log-likelihood's multiplier)
        weighted_mu = (design.row_weights * np.exp(eta)).reshape(-1, design.n).T
        for area_term, suffix in zip(sdesign.areas, suffixes):
            observed_areas = area_term.area_rows() > 0
            indicator = scipy.sparse.csr_matrix((np.ones(design.n), (area_term.area, np.arange(design.n))),
                                                shape=(area_term.n_areas, design.n))
            fitted = (indicator @ weighted_mu).T.reshape(chains, draws, -1)
            expected = indicator @ (design.row_weights * np.exp(design.offset))
            posterior[f"log_relative_risk{suffix}"] = (np.log(fitted[..., observed_areas])
                                                       - np.log(expected[observed_areas]))
            coords[f"area_with_data{suffix}"] = [a for a, kept in zip(coords[f"area{suffix}"], observed_areas)
                                                 if kept]
            dims[f"log_relative_risk{suffix}"] = [f"area_with_data{suffix}"]
    groups = {"posterior": posterior,
              "sample_stats": {key: np.asarray(value) for key, value in stats.items()}}
    if chains * draws * design.n <= LOG_LIKELIHOOD_MAX_VALUES:
        if family == "gaussian":
            pointwise = gaussian_pointwise(design, eta, np.asarray(sigma))
        else:
            shape_draws = posterior.get("shape")
            pointwise = log_likelihood_eta(family, link, design.y, eta, design.row_weights,
                                           None if shape_draws is None else shape_draws[..., None])
        groups["log_likelihood"] = {"y": pointwise}
        dims["y"] = ["row"]
    else:
        warnings.warn(f"the pointwise log-likelihood ({chains} x {draws} x {design.n} values) is not stored: "
                      f"more than {LOG_LIKELIHOOD_MAX_VALUES:.0e}; idata has no log_likelihood group",
                      HierpoolWarning, stacklevel=4)
    idata = az.from_dict(**groups, coords=coords, dims=dims)
    result = SpatialBayesResult(idata=idata, sdesign=sdesign, priors=resolved, car_priors=cars, level=level,
                                held=held, method=method)
    result.diagnostics(warn=True)
    return result


@dataclass(frozen=True, eq=False)
class SpatialBayesResult:
    """The posterior of a spatial model (``hp.bayes(..., adjacency=)``).

    Attributes
    ----------
    idata : arviz.InferenceData
        posterior: ``beta``, ``sd``, ``rho`` (BYM2) or ``alpha`` (proper CAR), ``sigma`` (Gaussian) or ``shape``
        (negative binomial), ``b`` (each area's effect), BYM2's ``spatial`` and ``unstructured`` parts, and, for a
        log link, ``log_relative_risk`` of each area with data; with several random terms each spatial term's
        names end in ``_car_<area column>``, and a ``(lhs | g)`` term's are ``b_<group>``, ``sd_<group>`` and
        ``cor_<group>`` (as :func:`hierpool.bayes`'s); sample_stats; log_likelihood (per row).
    sdesign : SpatialDesign
    priors : Priors
    car_priors : tuple of CarPriors
        Each spatial term's.
    level : float
    held : tuple or None
        The variance parameters held at a closed-form fit's values (``variance=``; :func:`held_values`), or None.
    method : str
        ``"nuts"`` (NUTS on every parameter) or ``"collapsed"`` (a Gaussian response's exact sampler,
        :mod:`hierpool.bayesian.spatial_exact`).
    """

    idata: az.InferenceData
    sdesign: SpatialDesign
    priors: Priors
    car_priors: tuple
    level: float
    held: tuple | None = None
    method: str = "nuts"

    @property
    def design(self):
        return self.sdesign.design

    def draws(self, name: str) -> np.ndarray:
        """Posterior draws of a variable of idata.posterior, shape (chain, draw, ...)."""
        return np.asarray(self.idata.posterior[name].values, dtype=float)

    @property
    def divergences(self) -> int:
        return int(self.idata.sample_stats["diverging"].values.sum())

    def diagnostics(self, warn: bool = True) -> pd.DataFrame:
        """Worst R-hat and bulk/tail ESS per variable, and divergent transitions."""
        return posterior_diagnostics(self.idata, warn)

    @cached_property
    def fixef(self) -> pd.DataFrame:
        """Fixed effects: mean, sd, lower, upper, mcse_mean, ess_bulk, r_hat, indexed by term."""
        stats = summarize_draws(self.draws("beta"), self.level)
        return pd.DataFrame(stats, index=pd.Index(list(self.design.fixed_names), name="term"))[SUMMARY_COLUMNS]

    def _hyper_draws(self) -> dict[str, np.ndarray]:
        """Each sampled hyperparameter's draws (chain, draw), named as :meth:`SpatialFit.hyperparameters` names
        them."""
        posterior, out = self.idata.posterior, {}
        for area_term in self.sdesign.areas:
            suffix = self.sdesign.suffix(area_term)
            for name in ("sd", "rho", "alpha"):
                if f"{name}{suffix}" in posterior:
                    out[f"{name}{suffix}"] = self.draws(f"{name}{suffix}")
        slots, _ = term_slots(self.design)
        for term, slot in zip(self.design.terms, slots):
            if f"sd_{slot.name}" not in posterior:
                continue  # held
            sds = self.draws(f"sd_{slot.name}")[..., list(slot.coef_positions)]
            sd_names, cor_names = group_parameter_names(term)
            out |= {name: sds[..., i] for i, name in enumerate(sd_names)}
            if cor_names:
                cor = self.draws(slot.cor_name)
                out |= {name: cor[..., i, j] for (i, j), name in cor_names.items()}
        for name in ("sigma", "shape"):
            if name in posterior:
                out[name] = self.draws(name)
        return out

    def hyperparameters(self) -> pd.DataFrame:
        """Each term's sd, rho or alpha (spatial), sd and correlation (``(lhs | g)``), and sigma or shape where the
        model has them (sampled: none when all are held), named as the closed form's."""
        hyper = self._hyper_draws()
        if not hyper:
            return pd.DataFrame(columns=SUMMARY_COLUMNS, index=pd.Index([], name="parameter"))
        draws = np.stack(list(hyper.values()), axis=-1)
        return pd.DataFrame(summarize_draws(draws, self.level), index=pd.Index(list(hyper), name="parameter"))[
            SUMMARY_COLUMNS]

    def _car_table(self, area_term: AreaTerm) -> pd.DataFrame:
        suffix = self.sdesign.suffix(area_term)
        b = self.draws(f"b{suffix}")
        table = pd.DataFrame(summarize_draws(b, self.level),
                             index=pd.Index(self.idata.posterior[f"area{suffix}"].values, name=area_term.term.factor))
        table = table[SUMMARY_COLUMNS]
        for part in ("spatial", "unstructured"):
            if f"{part}{suffix}" in self.idata.posterior:
                table[f"{part}_mean"] = self.draws(f"{part}{suffix}").reshape(-1, b.shape[-1]).mean(axis=0)
        if self.design.family is not None and self.design.family.link == "log":
            flat = b.reshape(-1, b.shape[-1])
            table["relative_risk"] = np.exp(flat).mean(axis=0)
            table["exceedance"] = (flat > 0).mean(axis=0)
        table["rows"] = area_term.area_rows()
        return table

    def _group_table(self, j: int) -> pd.DataFrame:
        term = self.design.terms[j]
        table = pd.DataFrame(summarize_draws(self.effect_draws(term.label), self.level), index=group_effect_index(term))
        table = table[SUMMARY_COLUMNS]
        table["rows"] = np.repeat(np.bincount(term.index, minlength=term.n_levels), term.k)
        return table

    def effect_draws(self, term: str | None = None) -> np.ndarray:
        """Draws (chain, draw, effects) of a term's effects, in :attr:`ranef`'s order: a spatial term's b by its
        area column or label (None: the model's only one), a ``(lhs | g)`` term's by its label."""
        for j, group_term in enumerate(self.design.terms):
            if term == group_term.label:
                slot = term_slots(self.design)[0][j]
                b = self.draws(f"b_{slot.name}")[..., list(slot.coef_positions)]
                return b.reshape(b.shape[:2] + (-1,))
        return self.draws(f"b{self.sdesign.suffix(self.sdesign.area_term(term))}")

    @cached_property
    def ranef(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Each area's effect b: posterior mean, sd, interval, MCSE, ESS, R-hat; BYM2's spatial and unstructured
        parts' means; for a log link exp(b)'s mean (``relative_risk``, against the covariates' expectation) and
        P(exp(b) > 1); ``rows`` the area's number of data rows (0: predicted from its neighbours).

        A model with several random terms gets a dict of such tables keyed by each term's label; a ``(lhs | g)``
        term's has its levels' (and coefficients') effects."""
        tables = {a.term.label: self._car_table(a) for a in self.sdesign.areas}
        tables |= {term.label: self._group_table(j) for j, term in enumerate(self.design.terms)}
        return next(iter(tables.values())) if self.sdesign.single else tables

    def predict(self, newdata: pd.DataFrame | None = None, kind: str = "mean", level: float = 0.95, seed: int = 0,
                type: str | None = None, trials=None) -> pd.DataFrame:
        """Posterior (``kind="mean"``) or posterior predictive (``"predictive"``) summaries per row, as
        :meth:`hierpool.bayesian.results.BayesResult.predict` (brms's ``posterior_epred`` / ``posterior_predict``
        summarized): per draw, offset + x beta + each spatial term's effect of the row's area (any area of the
        graph, with rows or without; one outside refused by name) + z b of the ``(lhs | g)`` levels, a new level
        drawn once per draw for all its rows (:mod:`hierpool.bayesian.prediction`).

        Returns
        -------
        pandas.DataFrame
            mean, sd, lower, upper (equal-tailed, ``level``), indexed as ``newdata`` (the fitted rows' labels when
            None).
        """
        design = self.design
        check_arguments(design, kind, type, trials, level)
        rng = np.random.default_rng(seed_argument(seed))
        X, terms, offset = model_rows(design, newdata)
        eta = offset + self.draws("beta").reshape(-1, design.p) @ X.T
        for area_term in self.sdesign.areas:
            area = (area_term.area if newdata is None else
                    areas_in_graph(area_term.term, area_term.graph, newdata[area_term.term.factor],
                                   " of the prediction data (newdata)"))
            eta = eta + self.draws(f"b{self.sdesign.suffix(area_term)}").reshape(-1, area_term.n_areas)[:, area]
        slots = term_slots(design)[0]

        def effects(j):  # (draws, ell_j, k_j)
            b = slot_effect_draws(self.draws, slots[j])
            return b.reshape((-1,) + b.shape[2:])

        def covariance(j):  # Sigma_j per draw (draws, k_j, k_j)
            return slot_covariance_draws(self.draws, slots[j], design.terms[j].k, (eta.shape[0],),
                                         None if self.held is None else self.held[1][j])

        eta = eta + term_effect_draws(terms, unseen_levels(design, newdata, terms), effects, covariance, rng)
        posterior = self.idata.posterior
        sigma = (self.draws("sigma") if "sigma" in posterior  # (held: the closed-form fit's, variance=)
                 else None if self.held is None else np.full(eta.shape[0], float(self.held[2])))
        draws = on_scale(design, eta, kind, type, newdata, trials, rng,
                         self.draws("shape") if "shape" in posterior else None, sigma)
        return summary_table(draws, level, row_labels(design, newdata))

    def relative_risk(self, threshold: float = 1.0, term: str | None = None) -> pd.DataFrame:
        """Per area with data: observed and expected counts (expected = exp(offset)), the raw SIR, and the posterior
        of the smoothed relative risk RR = sum mu / sum expected: mean, equal-tailed interval, and the exceedance
        probability P(RR > threshold).  ``term``: the spatial term's area column, where the model has several."""
        area_term = self.sdesign.area_term(term)
        suffix = self.sdesign.suffix(area_term)
        if f"log_relative_risk{suffix}" not in self.idata.posterior:
            raise ArgumentError("relative risks are for a count model with a log link (family='poisson')")
        threshold = real_argument("threshold", threshold, above=0, rule="a positive relative risk")
        design = self.design
        log_rr = self.draws(f"log_relative_risk{suffix}")
        log_rr = log_rr.reshape(-1, log_rr.shape[-1])
        rr = np.exp(log_rr)
        expected = np.exp(design.offset)
        table = area_risk_table(area_term, design.y, expected, expected, design.row_weights, None, self.level)
        tail = (1 - self.level) / 2
        table["relative_risk"] = rr.mean(axis=0)
        table["lower"] = np.quantile(rr, tail, axis=0)
        table["upper"] = np.quantile(rr, 1 - tail, axis=0)
        table["exceedance"] = (log_rr > np.log(threshold)).mean(axis=0)
        return table

    def summary(self) -> str:
        design = self.design
        family = "Gaussian" if design.family is None else f"{design.family.name}, {design.family.link} link"
        posterior = self.idata.posterior
        labels = ", ".join([a.term.label for a in self.sdesign.areas] + [t.label for t in design.terms])
        areas = ", ".join(str(a.n_areas) for a in self.sdesign.areas)
        lines = [f"Bayesian spatial model ({labels}; {family}): {design.spec.formula}",
                 f"Data: {design.n} rows, {areas} areas; draws: {posterior.sizes['chain']} chains x "
                 f"{posterior.sizes['draw']}", "", "Fixed effects:",
                 self.fixef.to_string(float_format=lambda v: f"{v:.4g}"), "", "Random terms:",
                 self.hyperparameters().to_string(float_format=lambda v: f"{v:.4g}"), "",
                 f"Divergent transitions: {self.divergences}"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
