"""Posterior draws in ArviZ's conventions: variables named after grouping factors and coefficients.

Variables of the posterior group:

* ``beta`` (dim ``fixef``): fixed effects, coords the term names (``Intercept``, ``Days``...);
* ``b_<group>`` (dims ``<group>``, ``<group>_coef``): random effects, coords the level labels and
  coefficient names; terms that share a grouping factor (``(x || g)``) share one variable;
* ``sd_<group>`` (dim ``<group>_coef``): random-effect standard deviations;
* ``cor_<group>`` (dims ``<group>_coef_row``, ``<group>_coef_col``): the correlation matrix of a
  correlated term (a second correlated term of the same factor gets ``cor_<group>_2``);
* ``sigma``: residual sd (absent with known residual sds, held variance parameters, and in a GLMM);
* ``shape``: a negative binomial GLMM's shape (NB2: variance mu + mu^2 / shape).

``<group>`` is the grouping factor as lme4 prints it, made an identifier (``cask:batch`` ->
``cask_batch``).  No name contains ``|``, brackets or spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import arviz as az
import numpy as np

from ..algebra.ar1 import carried
from ..spec.design import Design
from .priors import identifier


@dataclass(frozen=True)
class TermSlot:
    """Where random-effect term j lives in the posterior."""

    group: str  # as lme4 prints it
    name: str  # identifier used in variable and dim names
    coef_positions: tuple[int, ...]  # positions of the term's coefficients in the group's coef dim
    cor_name: str | None  # variable holding its correlation matrix (k > 1)


def term_slots(design: Design) -> tuple[list[TermSlot], dict[str, list[str]]]:
    """Each term's slot, and each group's coefficient labels (deduplicated)."""
    coefs: dict[str, list[str]] = {}
    cor_count: dict[str, int] = {}
    slots = []
    for term in design.terms:
        name = identifier(term.group)
        labels = coefs.setdefault(name, [])
        positions = []
        for coef in term.coef_names:
            label = coef
            while label in labels:  # (1 | g) + (1 | g): keep both, distinguishable
                label = label + "_"
            labels.append(label)
            positions.append(len(labels) - 1)
        cor_name = None
        if term.k > 1:
            cor_count[name] = cor_count.get(name, 0) + 1
            cor_name = f"cor_{name}" if cor_count[name] == 1 else f"cor_{name}_{cor_count[name]}"
        slots.append(TermSlot(term.group, name, tuple(positions), cor_name))
    return slots, coefs


def slot_effect_draws(values, slot: TermSlot) -> np.ndarray:
    """Draws of a term's random effects (chain, draw, ell, k) from its slot's ``b_<group>`` variable.  ``values``
    maps a posterior variable's name to its draws (chain, draw, ...)."""
    return np.asarray(values(f"b_{slot.name}"))[..., list(slot.coef_positions)]


def slot_covariance_draws(values, slot: TermSlot, k: int, lead: tuple[int, ...],
                          held_factor: np.ndarray | None = None) -> np.ndarray:
    """Sigma = diag(sd) R diag(sd) of a term per draw (*lead, k, k), from its slot's ``sd_<group>`` and correlation
    variables (``values``: as :func:`slot_effect_draws`'), or T T^T of a held covariance factor T (``held_factor``,
    the closed-form fit's) broadcast over the draws' axes ``lead``."""
    if held_factor is not None:
        factor = np.asarray(held_factor)
        return np.broadcast_to(factor @ factor.T, lead + (k, k))
    sd = np.asarray(values(f"sd_{slot.name}"))[..., list(slot.coef_positions)].reshape(lead + (k,))
    cor = (np.asarray(values(slot.cor_name)).reshape(lead + (k, k)) if slot.cor_name
           else np.broadcast_to(np.eye(k), lead + (k, k)))
    return sd[..., :, None] * cor * sd[..., None, :]


def correlation_from_factor(cor_factor: np.ndarray) -> np.ndarray:
    """R R^T for a batch of correlation Cholesky factors (..., k, k)."""
    return cor_factor @ np.swapaxes(cor_factor, -1, -2)


#: Names an InferenceData of hierpool may use beside the terms' (no level dimension takes them): its other variables,
#: ArviZ's chain and draw, the fixed effects' and the observations' dimensions (a factor named obs had its levels
#: overwritten by the rows' numbers, one named fixef or chain raised xarray's own error).
RESERVED_NAMES = frozenset({"beta", "sigma", "shape", "phi", "heritability", "chain", "draw", "fixef", "obs"})


def _unused(dim: str, variables: set) -> str:
    """``dim``, or ``dim`` with "_level" appended until it names no variable of ``variables``."""
    while dim in variables:
        dim += "_level"
    return dim


def group_posterior(design: Design, b: list[np.ndarray], sds: list[np.ndarray] | None,
                    cor_factors: list[np.ndarray | None] | None, posterior: dict, coords: dict, dims: dict) -> None:
    """Add the ``(lhs | g)`` terms' draws (chain, draw, ...) to an InferenceData's posterior, coords and dims:
    ``b_<group>`` (level, coefficient), ``sd_<group>`` (coefficient) and ``cor_<group>`` (k > 1), per
    :func:`term_slots`."""
    slots, coefs = term_slots(design)
    # a dimension named as a variable would make xarray take that variable for the dimension's coordinate: groups
    # a and b:a (``(1 | a/b)``) gave the dimension b_a beside term a's effects b_a, which were lost
    variables = set(posterior) | RESERVED_NAMES | {f"{kind}_{name}" for name in coefs for kind in ("b", "sd")} | {
        slot.cor_name for slot in slots if slot.cor_name is not None}
    for name, labels in coefs.items():
        j = next(j for j, s in enumerate(slots) if s.name == name)
        term, leading = design.terms[j], np.shape(b[j])[:-2]
        level_dim, coef_dim = (_unused(dim, variables) for dim in (name, f"{name}_coef"))
        posterior[f"b_{name}"] = np.zeros(leading + (term.n_levels, len(labels)))
        coords[level_dim] = [str(level) for level in term.levels]
        coords[coef_dim] = labels
        dims[f"b_{name}"] = [level_dim, coef_dim]
        if sds is not None:
            posterior[f"sd_{name}"] = np.zeros(leading + (len(labels),))
            dims[f"sd_{name}"] = [coef_dim]
    for j, slot in enumerate(slots):
        positions = list(slot.coef_positions)
        posterior[f"b_{slot.name}"][..., positions] = b[j]
        if sds is not None:
            posterior[f"sd_{slot.name}"][..., positions] = sds[j]
        if cor_factors is not None and slot.cor_name is not None:
            term = design.terms[j]
            posterior[slot.cor_name] = correlation_from_factor(cor_factors[j])
            coords[f"{slot.cor_name}_row"] = list(term.coef_names)
            coords[f"{slot.cor_name}_col"] = list(term.coef_names)
            dims[slot.cor_name] = [f"{slot.cor_name}_row", f"{slot.cor_name}_col"]


def build_inference_data(
    design: Design,
    beta: np.ndarray,
    b: list[np.ndarray],
    sds: list[np.ndarray] | None,
    cor_factors: list[np.ndarray | None] | None,
    sigma: np.ndarray | None,
    sample_stats: dict | None,
    log_likelihood: np.ndarray | None,
    shape: np.ndarray | None = None,
) -> az.InferenceData:
    """Assemble InferenceData from per-term draws shaped (chain, draw, ...)."""
    posterior = {"beta": beta}
    coords = {"fixef": list(design.fixed_names)}
    dims = {"beta": ["fixef"]}
    group_posterior(design, b, sds, cor_factors, posterior, coords, dims)
    if sigma is not None:
        posterior["sigma"] = sigma
    if shape is not None:
        posterior["shape"] = shape
    response = identifier(design.spec.response)
    groups = {"posterior": posterior, "observed_data": {response: design.y}, "coords": coords, "dims": dims}
    coords["obs"] = np.arange(design.n)
    dims[response] = ["obs"]
    if sample_stats is not None:
        groups["sample_stats"] = sample_stats
    if log_likelihood is not None:
        groups["log_likelihood"] = {response: log_likelihood}
    return az.from_dict(**groups)


def pointwise_log_likelihood(
    design: Design, beta: np.ndarray, b: list[np.ndarray], sigma: np.ndarray | None
) -> np.ndarray:
    """log p(y_i | beta, b, sigma) per draw and row, shape (chain, draw, n).

    y_i ~ Normal(o_i + x_i beta + sum_j z_ij b_j, sigma / sqrt(w_i)): the offset o_i is
    part of the mean and the prior weight w_i (or 1/se_i^2) divides the variance, so
    that LOO and WAIC compare models on the likelihood they were fitted with.
    """
    return gaussian_pointwise(design, linear_predictor_draws(design, beta, b), sigma)


def gaussian_pointwise(design: Design, mu: np.ndarray, sigma: np.ndarray | None) -> np.ndarray:
    """log N(y_i | mu_i, sigma^2 / w_i) per draw and row, mu shaped (chain, draw, n), sigma (chain, draw) or None
    (known residual sds: 1 / sqrt(w_i))."""
    scale = 1.0 / np.sqrt(design.row_weights)
    scale = scale if sigma is None else sigma[..., None] * scale
    return -0.5 * np.log(2 * np.pi) - np.log(scale) - 0.5 * ((design.y - mu) / scale) ** 2


def linear_predictor_draws(design: Design, beta: np.ndarray, b: list[np.ndarray]) -> np.ndarray:
    """o + X beta + sum_j z_j b_j[level] per draw and fitted row, shape (chain, draw, n): the linear model's mean,
    a GLMM's eta."""
    mu = design.offset + np.einsum("np,cdp->cdn", design.X, beta)
    for term, b_term in zip(design.terms, b):
        mu = mu + np.einsum("nk,cdnk->cdn", term.z, b_term[:, :, term.index, :])
    return mu


def ar1_pointwise_log_likelihood(design: Design, beta: np.ndarray, b: list[np.ndarray], sigma: np.ndarray,
                                 phi: np.ndarray, previous: np.ndarray, lag: np.ndarray) -> np.ndarray:
    """log p(y_t | y_(t-1), beta, b, sigma, phi) per draw and row of a model with AR(1) residuals, (chain, draw, n).

    Given the residual before it in its series, a row's residual is Normal(c_t r_(t-1), sigma^2 (1 - c_t^2)),
    c_t = phi^lag_t (0 for a series' first row): the factors of the joint density, so that the rows' values
    sum to log p(y | beta, b, sigma, phi) (the whitening's densities with its Jacobian).
    """
    residual = design.y - linear_predictor_draws(design, beta, b)
    c = carried(np.asarray(phi)[..., None], previous, lag)
    before = residual[..., np.maximum(previous, 0)]
    scale = np.asarray(sigma)[..., None] * np.sqrt(1.0 - c**2)
    return -0.5 * np.log(2 * np.pi) - np.log(scale) - 0.5 * ((residual - c * before) / scale) ** 2
