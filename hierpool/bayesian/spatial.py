"""Bayesian disease mapping: NUTS on a model with a spatial term ``car(area, type=...)`` (issue 19).

    y_i ~ family(mu_i),   g(mu_i) = offset_i + x_i' beta + b[area(i)],

with the area effects b of the term's type (:mod:`hierpool.spec.spatial`, :class:`hierpool.algebra.icar.CarPrior`):

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

Priors (keys of ``priors=``): the fixed effects', ``sigma``'s and ``shape``'s as :mod:`hierpool.bayesian.priors`
(on the link scale for a GLMM); ``sd`` (or ``sd_<area column>``) HalfNormal(2.5) on the link scale (2.5 sd(y) for a
Gaussian response), ``rho`` Beta(1, 1) (BYM2), ``alpha`` Uniform(0, 1) (proper CAR): brms's defaults for rho and
alpha, the sd's as hierpool's other sds.

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
    compose_bym2,
    constrained_square_root,
    sum_to_zero,
    sum_to_zero_layout,
)
from ..closedform.spatial import area_risk_table
from ..errors import ArgumentError, HierpoolWarning
from ..spec.spatial import SpatialDesign
from .model import fixed_effects
from .nuts import sample_nuts
from .posterior import gaussian_pointwise
from .priors import Priors, _check_distribution, _check_positive_support, resolve_priors
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
class SpatialData:
    """The design's arrays and the graph's, as JAX arrays (a pytree, traced by the compiled sampler)."""

    y: jax.Array
    weights: jax.Array
    offset: jax.Array
    X: jax.Array
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
class CarPriors:
    """The spatial term's priors: its sd, and its mixing parameter's (rho or alpha; None for ICAR)."""

    sd: object
    mix: object


def car_priors(sdesign: SpatialDesign, priors: dict | None) -> tuple[dict, CarPriors]:
    """(the other priors, the spatial term's): defaults of the module docstring, overridden by key."""
    priors = dict(priors or {})
    design, term = sdesign.design, sdesign.term
    if "cor" in priors:
        raise ArgumentError(f"prior 'cor' given, but {term.label} has no correlation (it is for (x | g) terms)")
    s_y = 1.0 if design.family is not None else float(np.std(design.y)) or 1.0
    sd = dist.HalfNormal(2.5 * s_y)
    for key in ("sd", f"sd_{term.factor}"):
        if key in priors:
            sd = _check_distribution(key, priors.pop(key), allow_flat=False)
            _check_positive_support(key, sd)
    mix_key = {"bym2": "rho", "proper": "alpha"}.get(term.type)
    mix = None if mix_key is None else (dist.Beta(1.0, 1.0) if term.type == "bym2" else dist.Uniform(0.0, 1.0))
    for key in ("rho", "alpha"):
        if key in priors:
            if key != mix_key:
                raise ArgumentError(f"prior {key!r} given, but {term.label} has " +
                                    (f"{mix_key!r}" if mix_key else "no mixing parameter"))
            mix = _check_distribution(key, priors.pop(key), allow_flat=False)
            if mix.support is not constraints.unit_interval and not (
                    isinstance(mix, dist.Uniform) and float(mix.low) >= 0 and float(mix.high) <= 1):
                raise ArgumentError(f"prior {key!r} must have its support in (0, 1), such as Beta(a, b)")
    return priors, CarPriors(sd=sd, mix=mix)


def whitens(prior: CarPrior) -> bool:
    """Whether the sampler takes the ICAR in whitened coordinates (:data:`WHITEN_MAX_AREAS`)."""
    return prior.type != "proper" and prior.n <= WHITEN_MAX_AREAS


def spatial_data(sdesign: SpatialDesign, prior: CarPrior, layout: SumToZeroLayout) -> SpatialData:
    put = jax.device_put
    design, g = sdesign.design, sdesign.graph
    eigenvalues = prior.proper_eigenvalues() if prior.type == "proper" else np.zeros(0)
    whitening = constrained_square_root(prior, layout) if whitens(prior) else np.zeros((0, 0))
    return SpatialData(
        y=put(np.asarray(design.y, dtype=float)), weights=put(np.asarray(design.row_weights, dtype=float)),
        offset=put(np.asarray(design.offset, dtype=float)), X=put(np.asarray(design.X, dtype=float)),
        area=put(sdesign.area.astype(np.int32)), edge_i=put(g.edges[:, 0].astype(np.int32)),
        edge_j=put(g.edges[:, 1].astype(np.int32)), island=put((g.degree == 0).astype(float)),
        scaling=put(prior.scaling), degree=put(g.degree.astype(float)),
        eigenvalues=put(eigenvalues), whitening=put(whitening))


def spatial_model(data: SpatialData, layout: SumToZeroLayout, priors: Priors, car: CarPriors, held=None, *,
                  type: str, family: str, link: str, n_areas: int, n_free: int):
    """The NumPyro model of the module docstring; with ``held`` = (sd, mix, sigma) those are fixed (a closed-form
    fit's: the posterior of beta and b given the variance parameters, whose mean is the BLUP for a Gaussian)."""
    beta = fixed_effects(priors)
    sd = numpyro.sample("sd", car.sd) if held is None else held[0]
    if type == "proper":
        alpha = numpyro.sample("alpha", car.mix) if held is None else held[1]
        w = numpyro.sample("w", dist.ImproperUniform(constraints.real, (), (n_areas,)))
        quadratic = jnp.sum(data.degree * w**2) - 2.0 * alpha * jnp.sum(w[data.edge_i] * w[data.edge_j])
        numpyro.factor("car", 0.5 * jnp.sum(jnp.log1p(-alpha * data.eigenvalues)) - 0.5 * quadratic)
        b = sd * w
    else:
        if data.whitening.size:  # phi = M z is exactly ICAR-distributed: its prior is z's N(0, I)
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand((n_free,)).to_event(1))
            phi = data.whitening @ z
        else:
            z = numpyro.sample("z", dist.ImproperUniform(constraints.real, (), (n_free,)))
            phi = sum_to_zero(z, layout)
            difference = phi[data.edge_i] - phi[data.edge_j]
            numpyro.factor("icar", -0.5 * (jnp.sum(difference**2) + jnp.sum(data.island * phi**2)))
        if type == "icar":
            b = sd * phi
        else:
            rho = numpyro.sample("rho", car.mix) if held is None else held[1]
            u = numpyro.sample("u", dist.Normal(0.0, 1.0).expand((n_areas,)).to_event(1))
            b = compose_bym2(sd, rho, u, phi, data.scaling)[0]
    eta = data.offset + data.X @ beta + b[data.area]
    if family == "gaussian":
        sigma = numpyro.sample("sigma", priors.sigma) if held is None else held[2]
        numpyro.factor("y", jnp.sum(-0.5 * data.weights * ((data.y - eta) / sigma) ** 2
                                    - jnp.log(sigma) + 0.5 * jnp.log(data.weights)))
    else:
        shape = numpyro.sample("shape", priors.shape) if family == "negative_binomial" else None
        numpyro.factor("y", jnp.sum(log_likelihood_eta(family, link, data.y, eta, data.weights, shape,
                                                       constant=False)))


def area_effects(draws: dict, prior: CarPrior, layout: SumToZeroLayout, whitening: np.ndarray) -> dict[str, np.ndarray]:
    """b (and BYM2's spatial and unstructured parts) per draw, on the host, from the sampled sites (and the held
    sd and rho, where ``draws`` has them filled in)."""
    sd = np.asarray(draws["sd"])[..., None]
    if prior.type == "proper":
        return {"b": sd * np.asarray(draws["w"])}
    z = np.asarray(draws["z"], dtype=float)
    phi = z @ whitening.T if whitening.size else sum_to_zero(z, layout)  # the sampler's coordinates (spatial_data)
    if prior.type == "icar":
        return {"b": sd * phi}
    b, spatial, unstructured = compose_bym2(sd, np.asarray(draws["rho"])[..., None], np.asarray(draws["u"]), phi,
                                            prior.scaling)
    return {"b": b, "spatial": spatial, "unstructured": unstructured}


def held_values(sdesign: SpatialDesign, fit) -> np.ndarray:
    """(sd, mix, sigma) of a closed-form spatial fit of the same model, for ``hp.bayes(..., variance=fit)``: the same
    term, family and link, graph, rows, response, weights and offset, or an error saying which differs."""
    other = getattr(fit, "sdesign", None)
    if other is None:
        raise ArgumentError(f"variance= must be an hp.lmm / hp.glmm fit with adjacency=, got {type(fit).__name__}")
    mine, theirs = sdesign.design, other.design
    family = (None if mine.family is None else (mine.family.name, mine.family.link),
              None if theirs.family is None else (theirs.family.name, theirs.family.link))
    checks = [
        ("spatial term", other.term == sdesign.term and theirs.spec.formula == mine.spec.formula),
        ("family", family[0] == family[1]),
        ("graph", np.array_equal(other.graph.labels, sdesign.graph.labels)
         and np.array_equal(other.graph.edges, sdesign.graph.edges)),
        ("data", theirs.n == mine.n and np.array_equal(other.area, sdesign.area) and np.array_equal(theirs.y, mine.y)
         and np.array_equal(theirs.X, mine.X)),
        ("weights", np.array_equal(theirs.row_weights, mine.row_weights)),
        ("offset", np.array_equal(theirs.offset, mine.offset)),
    ]
    differing = [name for name, same in checks if not same]
    if differing:
        raise ArgumentError(f"variance: the closed-form fit differs from this model in its {', '.join(differing)}: "
                            "give an hp.lmm / hp.glmm fit of the same spatial model, family, data and graph")
    return np.array([fit.sd, fit.mix, fit.sigma])


def bayes_spatial(sdesign: SpatialDesign, priors: dict | None, chains: int, draws: int, tune: int, seed: int,
                  target_accept: float, progress: bool, level: float, variance=None) -> SpatialBayesResult:
    """NUTS draws of the spatial model (module docstring) as a :class:`SpatialBayesResult`.

    Parameters
    ----------
    sdesign : SpatialDesign
        The model (:func:`hierpool.spec.spatial.spatial_design`).
    priors : dict, optional
        Overrides by key (module docstring, and :mod:`hierpool.bayesian.priors` for the fixed effects, sigma, shape).
    chains, draws, tune, seed, target_accept, progress, level
        As :func:`hierpool.bayes`.
    variance : SpatialFit, optional
        A closed-form fit of the same model, data and graph: its sd, mixing parameter and sigma are held.

    Returns
    -------
    SpatialBayesResult

    References
    ----------
    Riebler, Sorbye, Simpson & Rue (2016), Stat. Methods Med. Res. 25; Morris et al. (2019), Spatial and
    Spatio-temporal Epidemiology 31; Hoffman & Gelman (2014), JMLR 15 (NUTS).
    """
    design, term = sdesign.design, sdesign.term
    others, car = car_priors(sdesign, priors)
    resolved = resolve_priors(design, others)
    prior = CarPrior(sdesign.graph, term.type)
    layout = sum_to_zero_layout(sdesign.graph)
    family = "gaussian" if design.family is None else design.family.name
    link = "identity" if design.family is None else design.family.link
    held = None if variance is None else held_values(sdesign, variance)
    data = spatial_data(sdesign, prior, layout)
    out, stats = sample_nuts(
        spatial_model, (data, layout, resolved, car, held),
        static=(("type", term.type), ("family", family), ("link", link), ("n_areas", sdesign.n_areas),
                ("n_free", layout.n_free)),
        chains=chains, tune=tune, draws=draws, seed=seed, target_accept=target_accept, progress=progress)
    filled = dict(out)
    if held is not None:  # the held values as constant draws, so that what follows reads them as any draw
        shape = np.shape(out["w" if "w" in out else "z"])[:2]
        for name, value in zip(("sd", {"bym2": "rho", "proper": "alpha"}.get(term.type), "sigma"), held):
            if name is not None and (name != "sigma" or family == "gaussian"):
                filled[name] = np.full(shape, value)
    effects = area_effects(filled, prior, layout, np.asarray(data.whitening))
    if "beta" in out:
        beta = np.asarray(out["beta"])
    elif design.p:
        beta = np.stack([np.asarray(out[f"beta__{i}"]) for i in range(design.p)], axis=-1)
    else:
        beta = np.zeros((chains, draws, 0))
    eta = design.offset + np.einsum("cdp,np->cdn", beta, design.X) + effects["b"][..., sdesign.area]
    posterior = {"beta": beta}
    for name in ("sd", "rho", "alpha", "sigma", "shape"):  # the sampled ones (not those held)
        if name in out:
            posterior[name] = np.asarray(out[name])
    areas = [str(label) for label in sdesign.graph.labels]
    coords = {"fixef": list(design.fixed_names), "area": areas}
    dims = {"beta": ["fixef"]}
    for name, values in effects.items():
        posterior[name] = values
        dims[name] = ["area"]
    if link == "log":  # each area's log relative risk: log(sum of mu over its rows / sum of expected)
        observed_areas = sdesign.area_rows() > 0
        indicator = scipy.sparse.csr_matrix((np.ones(design.n), (sdesign.area, np.arange(design.n))),
                                            shape=(sdesign.n_areas, design.n))
        # a Poisson row's prior weight counts it that many times (its log-likelihood's multiplier)
        weights = design.row_weights
        fitted = (indicator @ (weights * np.exp(eta)).reshape(-1, design.n).T).T.reshape(chains, draws, -1)
        expected = indicator @ (weights * np.exp(design.offset))
        log_rr = np.log(fitted[..., observed_areas]) - np.log(expected[observed_areas])
        posterior["log_relative_risk"] = log_rr
        coords["area_with_data"] = [a for a, kept in zip(areas, observed_areas) if kept]
        dims["log_relative_risk"] = ["area_with_data"]
    groups = {"posterior": posterior,
              "sample_stats": {key: np.asarray(value) for key, value in stats.items()}}
    if chains * draws * design.n <= LOG_LIKELIHOOD_MAX_VALUES:
        if family == "gaussian":
            pointwise = gaussian_pointwise(design, eta, np.asarray(filled["sigma"]))
        else:
            shape = posterior.get("shape")
            pointwise = log_likelihood_eta(family, link, design.y, eta, design.row_weights,
                                           None if shape is None else shape[..., None])
        groups["log_likelihood"] = {"y": pointwise}
        dims["y"] = ["row"]
    else:
        warnings.warn(f"the pointwise log-likelihood ({chains} x {draws} x {design.n} values) is not stored: "
                      f"more than {LOG_LIKELIHOOD_MAX_VALUES:.0e}; idata has no log_likelihood group",
                      HierpoolWarning, stacklevel=3)
    idata = az.from_dict(**groups, coords=coords, dims=dims)
    result = SpatialBayesResult(idata=idata, sdesign=sdesign, priors=resolved, car_priors=car, level=level,
                                held=held)
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
        log link, ``log_relative_risk`` of each area with data; sample_stats; log_likelihood (per row).
    sdesign : SpatialDesign
    priors : Priors
    car_priors : CarPriors
    level : float
    held : numpy.ndarray or None
        (sd, mix, sigma) held at a closed-form fit's values (``variance=``), or None.
    """

    idata: az.InferenceData
    sdesign: SpatialDesign
    priors: Priors
    car_priors: CarPriors
    level: float
    held: np.ndarray | None = None

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

    def hyperparameters(self) -> pd.DataFrame:
        """sd, rho or alpha, and sigma or shape where the model has them (sampled: none when all are held)."""
        names = [n for n in ("sd", "rho", "alpha", "sigma", "shape") if n in self.idata.posterior]
        if not names:
            return pd.DataFrame(columns=SUMMARY_COLUMNS, index=pd.Index([], name="parameter"))
        draws = np.stack([self.draws(n) for n in names], axis=-1)
        return pd.DataFrame(summarize_draws(draws, self.level), index=pd.Index(names, name="parameter"))[
            SUMMARY_COLUMNS]

    @cached_property
    def ranef(self) -> pd.DataFrame:
        """Each area's effect b: posterior mean, sd, interval, MCSE, ESS, R-hat; BYM2's spatial and unstructured
        parts' means; for a log link exp(b)'s mean (``relative_risk``, against the covariates' expectation) and
        P(exp(b) > 1); ``rows`` the area's number of data rows (0: predicted from its neighbours)."""
        b = self.draws("b")
        table = pd.DataFrame(summarize_draws(b, self.level),
                             index=pd.Index(self.idata.posterior["area"].values, name=self.sdesign.term.factor))
        table = table[SUMMARY_COLUMNS]
        for part in ("spatial", "unstructured"):
            if part in self.idata.posterior:
                table[f"{part}_mean"] = self.draws(part).reshape(-1, b.shape[-1]).mean(axis=0)
        if self.design.family is not None and self.design.family.link == "log":
            flat = b.reshape(-1, b.shape[-1])
            table["relative_risk"] = np.exp(flat).mean(axis=0)
            table["exceedance"] = (flat > 0).mean(axis=0)
        table["rows"] = self.sdesign.area_rows()
        return table

    def relative_risk(self, threshold: float = 1.0) -> pd.DataFrame:
        """Per area with data: observed and expected counts (expected = exp(offset)), the raw SIR, and the posterior
        of the smoothed relative risk RR = sum mu / sum expected: mean, equal-tailed interval, and the exceedance
        probability P(RR > threshold)."""
        if "log_relative_risk" not in self.idata.posterior:
            raise ArgumentError("relative risks are for a count model with a log link (family='poisson')")
        if not threshold > 0:
            raise ArgumentError(f"threshold must be a positive relative risk, got {threshold!r}")
        design = self.design
        log_rr = self.draws("log_relative_risk").reshape(-1, self.idata.posterior.sizes["area_with_data"])
        rr = np.exp(log_rr)
        expected = np.exp(design.offset)
        table = area_risk_table(self.sdesign, design.y, expected, expected, design.row_weights, None, self.level)
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
        lines = [f"Bayesian spatial model ({self.sdesign.term.label}; {family}): {design.spec.formula}",
                 f"Data: {design.n} rows, {self.sdesign.n_areas} areas; draws: {posterior.sizes['chain']} chains x "
                 f"{posterior.sizes['draw']}", "", "Fixed effects:",
                 self.fixef.to_string(float_format=lambda v: f"{v:.4g}"), "", "Spatial term:",
                 self.hyperparameters().to_string(float_format=lambda v: f"{v:.4g}"), "",
                 f"Divergent transitions: {self.divergences}"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()
