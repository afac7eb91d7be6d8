"""The exact sampler of a Gaussian spatial model: the effects integrated out, the variance parameters by independence
Metropolis-Hastings, (beta, effects) drawn exactly given each (``hp.bayes(..., adjacency=)`` with a Gaussian
response; ``method="full"`` samples every parameter by NUTS instead, :mod:`hierpool.bayesian.spatial`).

The model is :mod:`hierpool.bayesian.spatial`'s with a Gaussian response: y = X beta + Z x + e, e ~ N(0, sigma^2
W^-1), x the stacked latent blocks of the spatial and ``(1 | g)`` terms (:class:`hierpool.closedform.spatial
.SpatialLaplace`) with precision P(psi) under the constraints C' x = 0, beta ~ N(m, diag(s^2)) (a flat coefficient:
1 / s^2 = 0).  In psi = (each spatial term's log sd and logit mixing parameter, each ``(1 | g)`` term's log sd,
log sigma) the marginal posterior is

    log pi(psi | y) = log p(y | psi) + log p(psi) + log |d(sd, mix, sigma) / d psi|,

with log p(y | psi) exact: the closed form's restricted criterion with the prior of beta in the bordered matrix H
(:meth:`~hierpool.closedform.spatial.SpatialLaplace.evaluate`; for a Gaussian response the Laplace approximation is
the integral).  psi is sampled by :func:`hierpool.bayesian.psi_sampler.sample_exact`, one sparse LU per evaluation,
no gradient, nothing compiled.  Given psi, (beta, x) ~ N(mode, H^-1) on {C' x = 0}: with e ~ N(0, H), drawn as
[X Z]' W^(1/2) e_1 + (diag(1 / s) e_2, R' e_3) (R' R = P: each prior's precision root,
:meth:`~hierpool.algebra.icar.CarPrior.precision_root_draw`, no factorization), the solution v of the bordered system
[[H, C], [C', 0]] (v, lambda) = (e, 0) has covariance V (V' H V)^-1 V' (V a basis of the constraints' null space):
mode + v is an exact draw (Rue & Held 2005, sec. 2.3.3, conditioning by kriging).

``(lhs | g)`` terms with several coefficients (a covariance matrix in psi) are not taken here: ``hp.bayes`` samples
such models by NUTS.  Where the bordered matrix does not factor at a proposed psi (a mixing parameter's logit beyond
+-30, where 1 - rho rounds), the proposal is rejected: the truncation holds no posterior mass a double can show.

References: Tierney (1994), Ann. Statist. 22; Rue & Held (2005), Gaussian Markov random fields, sec. 2.3.3;
Riebler et al. (2016), Stat. Methods Med. Res. 25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from ..algebra.icar import compose_bym2
from ..closedform.spatial import SpatialLaplace
from ..errors import ArgumentError
from ..spec.spatial import SpatialDesign
from .priors import Priors
from .psi_sampler import sample_exact, scalar_log_density
from .spatial import CarPriors, spatial_result

#: Where a mixing parameter's logit goes past this, the proposal is rejected (1 - rho rounds to 0 near 37).
MAX_LOGIT = 30.0


def exact_sampler_refusal(sdesign: SpatialDesign, priors: Priors) -> str | None:
    """Why the exact sampler cannot take this model (None: it can)."""
    if sdesign.design.family is not None:
        return "the exact sampler is for a Gaussian response"
    if any(term.k > 1 for term in sdesign.design.terms):
        return "the exact sampler takes (1 | g) terms beside car() terms, not terms with several coefficients"
    if priors.beta_gaussian() is None:
        return "the exact sampler integrates the fixed effects out: their priors must be Normal or 'flat'"
    return None


@dataclass
class _State:
    """The posterior at one psi: its log density and what the exact draws there need."""

    psi: np.ndarray
    log_pi: float
    theta: np.ndarray  # the mode of (beta, x)
    weights: np.ndarray  # w_i / sigma^2
    factor: object  # of the bordered matrix at psi
    psi_values: list  # each block's natural parameters (sd, mix) or covariance factor


class SpatialPosterior:
    """log pi(psi | y) of the module docstring, and exact (beta, x) draws given psi (the posterior protocol of
    :mod:`hierpool.bayesian.psi_sampler`)."""

    def __init__(self, sdesign: SpatialDesign, priors: Priors, cars: tuple[CarPriors, ...]):
        refusal = exact_sampler_refusal(sdesign, priors)
        if refusal is not None:
            raise ArgumentError(refusal)
        loc, scale = priors.beta_gaussian()
        precision = np.where(np.isfinite(scale), 1.0 / np.asarray(scale, dtype=float) ** 2, 0.0)
        self.laplace = SpatialLaplace(sdesign, reml=True, beta_prior=(np.asarray(loc, dtype=float), precision))
        self.sdesign, self.priors, self.cars = sdesign, priors, cars
        self.n_fixed, self.n_effects = self.laplace.p, self.laplace.m
        self.dimension = len(self.laplace.names())
        self.label = "hp.bayes with adjacency="
        self.n_cars = len(sdesign.areas)

    def log_prior(self, psi) -> np.ndarray:
        """log p(psi) of each row of psi (..., dimension): the sds', mixing parameters' and sigma's priors with the
        Jacobians of sd = e^psi and mix = expit(psi)."""
        psi = np.asarray(psi, dtype=float)
        laplace, total = self.laplace, 0.0
        for t in range(len(laplace.blocks)):
            at = laplace.param_offsets[t]
            log_sd = psi[..., at]
            sd_prior = self.cars[t].sd if t < self.n_cars else self.priors.sd[t - self.n_cars]
            total = total + scalar_log_density(sd_prior, np.exp(log_sd)) + log_sd
            if t < self.n_cars and self.cars[t].mix is not None:
                logit = psi[..., at + 1]
                mix = expit(logit)
                with np.errstate(divide="ignore"):
                    total = total + scalar_log_density(self.cars[t].mix, mix) + np.log(mix) + np.log1p(-mix)
        return total + scalar_log_density(self.priors.sigma, np.exp(psi[..., -1])) + psi[..., -1]

    def evaluate(self, psi, log_prior: float | None = None) -> _State | None:
        """The state at psi, or None where the density is 0 or the bordered matrix does not factor."""
        psi = np.asarray(psi, dtype=float)
        log_prior = float(self.log_prior(psi)) if log_prior is None else log_prior
        laplace = self.laplace
        logits = [psi[laplace.param_offsets[t] + 1] for t in range(self.n_cars) if self.cars[t].mix is not None]
        if not np.isfinite(log_prior) or any(abs(v) > MAX_LOGIT for v in logits):
            return None
        try:
            value, mode, factor = laplace.evaluate(psi)
        except RuntimeError:  # SuperLU: exactly singular
            return None
        log_pi = -0.5 * value + log_prior
        if not np.isfinite(log_pi):
            return None
        values = [block.natural(laplace.block_psi(psi, t)) if t < self.n_cars else
                  block.factor(laplace.block_psi(psi, t)) for t, block in enumerate(laplace.blocks)]
        return _State(psi, float(log_pi), mode.theta.copy(), mode.weights, factor, values)

    def log_density(self, psi) -> float:
        state = self.evaluate(psi)
        return -np.inf if state is None else state.log_pi

    def draw_effects(self, state: _State, rng: np.random.Generator, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``count`` exact draws of (beta (count, p), x (count, m)) given the state's psi (module docstring)."""
        laplace = self.laplace
        p, m, n = laplace.p, laplace.m, laplace.X.shape[0]
        root_w = np.sqrt(state.weights)
        rhs = np.zeros((p + m + laplace.sizes.size, count))
        for c in range(count):
            e_rows = root_w * rng.standard_normal(n)
            rhs[:p, c] = laplace.X.T @ e_rows + np.sqrt(laplace.beta_precision) * rng.standard_normal(p)
            latent = laplace.rows.transpose_apply(e_rows)
            for t, block in enumerate(laplace.blocks):
                start = laplace.latent_offsets[t]
                normal = rng.standard_normal(block.prior.root_size())
                draw = (block.prior.precision_root_draw(*state.psi_values[t], normal) if t < self.n_cars
                        else block.prior.precision_root_draw(state.psi_values[t], normal))
                latent[start:start + block.n_latent] += draw
            rhs[p:p + m, c] = latent
        theta = state.theta[:, None] + state.factor.solve(rhs)[: p + m]
        return theta[:p].T, theta[p:].T


def sample_spatial_exact(sdesign: SpatialDesign, priors: Priors, cars: tuple[CarPriors, ...], chains: int,
                         draws: int, tune: int, seed: int, level: float):
    """The exact sampler (module docstring) as a :class:`~hierpool.bayesian.spatial.SpatialBayesResult`
    (``method="collapsed"``).

    Parameters
    ----------
    sdesign : SpatialDesign
        A Gaussian model with spatial terms and any ``(1 | g)`` terms.
    priors : Priors
        The resolved priors of beta (Normal or flat), the ``(1 | g)`` terms' sds and sigma.
    cars : tuple of CarPriors
        Each spatial term's priors (:func:`hierpool.bayesian.spatial.car_priors`).
    chains, draws, tune, seed, level
        As :func:`hierpool.bayes` (``tune`` bounds each chain's burn-in).

    Returns
    -------
    SpatialBayesResult

    References
    ----------
    Tierney (1994), Ann. Statist. 22; Rue & Held (2005), sec. 2.3.3.
    """
    posterior = SpatialPosterior(sdesign, priors, cars)
    laplace = posterior.laplace
    with np.errstate(all="ignore"):
        start = laplace.start()  # the best of a coarse grid; the sampler's mode search goes on from there
    out = sample_exact(posterior, start, chains, draws, tune, seed)
    psi, x = out["psi"], out["b"]
    sampled, effects, groups_b, sds = {}, [], [], []
    for t, block in enumerate(laplace.blocks):
        at = laplace.param_offsets[t]
        sd = np.exp(psi[..., at])
        latent = x[..., laplace.latent_offsets[t]:laplace.latent_offsets[t] + block.n_latent]
        if t >= posterior.n_cars:
            groups_b.append(latent[..., None])  # (chain, draw, ell, 1)
            sds.append(sd[..., None])
            continue
        suffix = sdesign.suffix(sdesign.areas[t])
        sampled[f"sd{suffix}"] = sd
        prior = block.prior
        if prior.has_mix:
            sampled[f"{block.mix_name}{suffix}"] = expit(psi[..., at + 1])
        if prior.type == "bym2":
            rho = sampled[f"rho{suffix}"]
            b = latent[..., : prior.n]
            spatial = compose_bym2(sd[..., None], rho[..., None], np.zeros_like(b), latent[..., prior.n:],
                                   prior.scaling)[1]
            effects.append({"b": b, "spatial": spatial, "unstructured": b - spatial})
        else:
            effects.append({"b": latent})
    sigma = np.exp(psi[..., -1])
    sampled["sigma"] = sigma
    stats = {"diverging": np.zeros(psi.shape[:2], dtype=bool), "acceptance_rate": out["acceptance"],
             "n_steps": np.full(psi.shape[:2], out["thin"], dtype=np.int64), "lp": out["lp"]}
    return spatial_result(sdesign, priors, cars, level, None, beta=out["beta"], effects=effects, groups_b=groups_b,
                          sds=sds if groups_b else None, cors=[None] * len(groups_b) if groups_b else None,
                          sampled=sampled, sigma=sigma, stats=stats, method="collapsed")
