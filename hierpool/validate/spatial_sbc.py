"""Simulation-based calibration of ``hp.bayes`` with a spatial term (``car(area, type=...)``, ``adjacency=``).

As :func:`hierpool.validate.glmm_sbc` (Talts et al. 2018): draw (beta, sd, rho or alpha) from the priors, the area
effects from the term's prior (the constrained ICAR by the eigen-decomposition of its precision on the constrained
subspace, a proper CAR by the Cholesky factor of its precision: dense, for the small graphs a calibration runs on),
simulate the counts on the fixed design of ``data``, sample the posterior and record the rank of each true value
among L posterior draws: uniform exactly when the sampler computes the posterior of the model that simulated.
``fit_priors`` samples under other priors (a deliberately wrong analysis the ranks must expose).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import pandas as pd

from ..algebra.icar import CarPrior, compose_bym2, constrained_square_root, sum_to_zero_layout
from ..bayesian import bayes, resolve_priors
from ..bayesian.spatial import car_priors
from ..errors import ArgumentError, seed_argument
from ..spec.family import family_spec
from ..spec.spatial import spatial_design
from .sbc import SBCResult, _uniformity, sbc_arguments

#: Families spatial_sbc simulates (their default priors do not depend on the response, so one frozen set serves
#: every replication).
FAMILIES = ("poisson", "binomial")
#: A replication whose simulated response is constant is drawn again, at most this many times in a row.
MAX_REDRAWS = 20
#: Areas of a graph up to which the field is drawn densely.
MAX_AREAS = 2_000


def _sample(distribution, rng) -> float:
    import jax

    return float(distribution.sample(jax.random.PRNGKey(int(rng.integers(2**31)))))


def _track_argument(track, n_areas: int) -> list[int]:
    """``track`` as a list of positions among ``n_areas`` areas, else an :class:`ArgumentError` naming it."""
    positions = list(track) if isinstance(track, (tuple, list, np.ndarray)) else None
    if positions is None or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                    and -n_areas <= k < n_areas for k in positions):
        raise ArgumentError(f"track must be a tuple of area positions (integers from {-n_areas} to {n_areas - 1}), "
                            f"got {track!r}")
    return [int(k) for k in positions]


def draw_field(prior: CarPrior, sd: float, mix: float, rng) -> np.ndarray:
    """One draw of the area effects b from the term's prior (module docstring)."""
    n = prior.n
    if prior.type == "proper":
        precision = prior.latent(1.0, mix)[0].toarray()
        return sd * np.linalg.solve(np.linalg.cholesky(precision).T, rng.normal(size=n))
    layout = sum_to_zero_layout(prior.graph)
    phi = constrained_square_root(prior, layout) @ rng.normal(size=layout.n_free)
    if prior.type == "icar":
        return sd * phi
    return compose_bym2(sd, mix, rng.normal(size=n), phi, prior.scaling)[0]


def spatial_sbc(formula: str, data: pd.DataFrame, adjacency, family: str = "poisson", priors: dict | None = None,
                fit_priors: dict | None = None, offset=None, weights=None, n_reps: int = 100, n_draws: int = 99,
                chains: int = 2, draws_per_chain: int = 500, tune: int = 500, bins: int = 10, alpha: float = 0.01,
                seed: int = 0, track: tuple[int, ...] = (0, -1)) -> SBCResult:
    """Simulation-based calibration of :func:`hierpool.bayes` with ``adjacency=`` (module docstring).

    Parameters
    ----------
    formula, data, adjacency, family, offset, weights
        As :func:`hierpool.bayes`; the response must be a column of data (the simulated counts are written into it).
    priors, fit_priors : dict, optional
        Priors that simulate, and (when given) other priors that analyse.
    n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed
        As :func:`hierpool.validate.sbc`.
    track : tuple of int
        Areas (positions in the graph's labels) whose effects are ranked, besides beta, sd and rho or alpha.

    Returns
    -------
    SBCResult
    """
    spec = family_spec(family)
    if spec.name not in FAMILIES:
        raise ArgumentError(f"spatial_sbc simulates the families {FAMILIES}, got {spec.name!r}")
    sbc_arguments(n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed)
    sdesign = spatial_design(formula, data, adjacency, family=spec, weights=weights, offset=offset)
    if not sdesign.single:
        raise ArgumentError(f"spatial_sbc simulates a model whose one random term is a car() term; {formula!r} has "
                            "more (not built)")
    if sdesign.n_areas > MAX_AREAS:
        raise ArgumentError(f"spatial_sbc draws the field densely: at most {MAX_AREAS} areas, got {sdesign.n_areas}")
    design, term = sdesign.design, sdesign.term
    response = design.spec.response
    if response not in data.columns:
        raise ArgumentError(f"the formula's response must be a column of data, got {response!r}")
    others, (car,) = car_priors(sdesign, priors)
    frozen = resolve_priors(design, others)
    if any(prior is None for prior in frozen.beta):
        raise ArgumentError("SBC simulates from the prior: flat priors on fixed effects are not allowed")
    prior = CarPrior(sdesign.graph, term.type)
    mix_name = term.mix_name
    rng = np.random.default_rng(seed_argument(seed))
    frame = data.loc[design.rows].copy()
    trials = np.asarray(design.row_weights, dtype=float)
    keep = np.linspace(0, chains * draws_per_chain - 1, n_draws).astype(int)
    areas = [int(np.arange(sdesign.n_areas)[k]) for k in _track_argument(track, sdesign.n_areas)]
    ranks, redrawn = [], 0
    for _ in range(n_reps):
        for _ in range(MAX_REDRAWS):  # a constant response (all zeros) is refused by every fit: draw again
            beta = np.array([_sample(p, rng) for p in frozen.beta])
            sd = _sample(car.sd, rng)
            mix = _sample(car.mix, rng) if car.mix is not None else 0.0
            b = draw_field(prior, sd, mix, rng)
            eta = design.offset + design.X @ beta + b[sdesign.area]
            if spec.name == "poisson":
                y = rng.poisson(np.exp(np.minimum(eta, 30.0)))
            else:
                y = rng.binomial(trials.astype(int), 1 / (1 + np.exp(-eta))) / trials
            if np.ptp(y) > 0:
                break
            redrawn += 1
        frame[response] = y
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ranks judge the sampler; a replication's diagnostics do not
            post = bayes(formula, frame, family=family, adjacency=adjacency, priors=fit_priors or priors,
                         chains=chains, draws=draws_per_chain, tune=tune, seed=int(rng.integers(2**31)),
                         progress=False, offset=offset, weights=weights)
        draws = {f"beta[{name}]": post.draws("beta")[..., i] for i, name in enumerate(design.fixed_names)}
        draws["sd"] = post.draws("sd")
        if mix_name:
            draws[mix_name] = post.draws(mix_name)
        for a in areas:
            draws[f"b[{sdesign.graph.labels[a]}]"] = post.draws("b")[..., a]
        truth = {**{f"beta[{name}]": beta[i] for i, name in enumerate(design.fixed_names)}, "sd": sd,
                 **({mix_name: mix} if mix_name else {}),
                 **{f"b[{sdesign.graph.labels[a]}]": b[a] for a in areas}}
        ranks.append({name: int(np.sum(values.ravel()[keep] < truth[name])) for name, values in draws.items()})
    table = pd.DataFrame(ranks)
    return SBCResult(ranks=table, n_draws=n_draws, tests=_uniformity(table, n_draws, bins, alpha), alpha=alpha,
                     redrawn=redrawn)
