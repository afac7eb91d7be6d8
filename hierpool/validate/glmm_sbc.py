"""Simulation-based calibration of ``hp.bayes`` with a family (binomial, Poisson).

As :func:`hierpool.validate.sbc` (Talts et al. 2018), for a generalized linear mixed model: draw
(beta, Sigma_j, b_j) from the priors, simulate the response on the fixed design of ``data``,

    binomial:  a_i y_i ~ Binomial(a_i, g^-1(eta_i))     (a_i the trials: ``weights=``, 1 for 0/1 rows),
    poisson:   y_i ~ Poisson(exp(eta_i)),               eta = offset + X beta + sum_j Z_j b_j,

sample the posterior with ``hp.bayes(..., family=...)`` and record the rank of every true value
among L posterior draws.  Ranks are uniform on {0, ..., L} exactly when the sampler computes the
posterior of the model that simulated the data; the same two uniformity tests (chi-square,
simultaneous ECDF band) at the same Bonferroni level as the Gaussian SBC decide.

``fit_priors`` lets the posterior be sampled under other priors than those that simulated the
data: a deliberately wrong analysis that the ranks must expose (the test that the check can fail).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..bayesian import bayes, resolve_priors
from ..errors import ArgumentError, seed_argument
from ..spec.design import build_design
from ..spec.family import family_spec
from .sbc import SBCResult, _uniformity, sbc_arguments

#: Families whose response :func:`glmm_sbc` simulates.
FAMILIES = ("binomial", "poisson")


def _inverse_link(link: str, eta: np.ndarray) -> np.ndarray:
    from scipy import special, stats

    if link == "logit":
        return special.expit(eta)
    if link == "probit":
        return stats.norm.cdf(eta)
    if link == "cloglog":
        return -np.expm1(-np.exp(eta))
    if link == "log":
        return np.exp(eta)
    raise ArgumentError(f"glmm_sbc simulates the logit, probit, cloglog and log links, got {link!r}")


def simulate_glmm_parameters(priors, design, rng_key) -> tuple[dict[str, float], np.ndarray]:
    """One draw of (beta, Sigma_j, b_j) from the priors, and eta it implies: ``(truth, eta)``.

    ``truth`` names the tracked quantities as :func:`glmm_sbc`'s ranks do: ``beta[name]``,
    ``sd[group:coef]``, ``b[group:coef:first level]`` and ``cor[group]`` for a correlated term.
    """
    import jax
    import numpyro.distributions as dist

    keys = iter(jax.random.split(rng_key, 3 + 3 * len(design.terms) + design.p))
    beta = np.array([float(prior.sample(next(keys))) for prior in priors.beta])
    truth = {f"beta[{name}]": value for name, value in zip(design.fixed_names, beta)}
    eta = design.offset + design.X @ beta
    for j, term in enumerate(design.terms):
        sd = np.asarray(priors.sd[j].sample(next(keys)), dtype=float)
        cor = np.eye(term.k) if term.k == 1 else np.asarray(dist.LKJCholesky(term.k, priors.cor[j]).sample(next(keys)))
        b = np.asarray(jax.random.normal(next(keys), (term.n_levels, term.k))) @ (sd[:, None] * cor).T
        eta = eta + np.einsum("nk,nk->n", term.z, b[term.index])
        for i, coef in enumerate(term.coef_names):
            truth[f"sd[{term.group}:{coef}]"] = float(sd[i])
            truth[f"b[{term.group}:{coef}:{term.levels[0]}]"] = float(b[0, i])
        if term.k > 1:
            truth[f"cor[{term.group}]"] = float((cor @ cor.T)[0, 1])
    return truth, np.asarray(eta, dtype=float)


def _posterior_draws(post, design) -> dict[str, np.ndarray]:
    draws = {f"beta[{name}]": post.beta_draws[..., i].ravel() for i, name in enumerate(design.fixed_names)}
    for j, term in enumerate(design.terms):
        b = post.term_draws(j)
        cov = post.term_covariance_draws(j)
        for i, coef in enumerate(term.coef_names):
            draws[f"sd[{term.group}:{coef}]"] = np.sqrt(cov[..., i, i]).ravel()
            draws[f"b[{term.group}:{coef}:{term.levels[0]}]"] = b[..., 0, i].ravel()
        if term.k > 1:
            draws[f"cor[{term.group}]"] = (cov[..., 0, 1] / np.sqrt(cov[..., 0, 0] * cov[..., 1, 1])).ravel()
    return draws


#: A replication whose simulated response is constant is drawn again, at most this many times in a row.
MAX_REDRAWS = 20


def glmm_sbc(
    formula: str,
    data: pd.DataFrame,
    family: str = "binomial",
    link: str | None = None,
    priors: dict | None = None,
    fit_priors: dict | None = None,
    weights=None,
    offset=None,
    n_reps: int = 100,
    n_draws: int = 99,
    chains: int = 2,
    draws_per_chain: int = 500,
    tune: int = 500,
    bins: int = 10,
    alpha: float = 0.01,
    seed: int = 0,
    method: str = "auto",
) -> SBCResult:
    """Simulation-based calibration of :func:`hierpool.bayes` with a ``family`` on the design of ``data``.

    Parameters
    ----------
    formula : str
        Its response must be a bare column name (0/1 or proportions for the binomial, counts for the
        Poisson): the simulated response is written into it.  A ``cbind(...)`` response is refused
        (give proportions with the trials as ``weights=``).
    data : pandas.DataFrame
        Supplies the design (covariates, groups, trials, offset).
    family, link, weights, offset
        As :func:`hierpool.bayes`.
    priors : dict, optional
        Prior overrides (as :func:`hierpool.bayes`), frozen for every replication; they must be proper.
    fit_priors : dict, optional
        Priors of the analysis, when they should differ from those that simulate (a deliberately
        miscalibrated check); ``priors`` when None.
    n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed
        As :func:`hierpool.validate.sbc`.
    method : str
        ``hp.bayes``'s sampler: ``"auto"`` (independence Metropolis-Hastings for one scalar term where its
        proposal is good, NUTS otherwise: the result's ``samplers`` counts each), ``"independence"`` or ``"full"``.
        A replication whose simulated response is constant (which no fit accepts) is simulated again
        (the result's ``redrawn`` counts them): selection by the data alone leaves the
        ranks uniform.

    Returns
    -------
    SBCResult
    """
    spec = family_spec(family, link)
    if spec.name not in FAMILIES:
        raise ArgumentError(f"glmm_sbc simulates the families {FAMILIES}, got {spec.name!r}")
    sbc_arguments(n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed)
    import jax

    design = build_design(formula, data, weights=weights, offset=offset, family=spec)
    response = design.spec.response
    if not isinstance(response, str) or response not in data.columns:
        raise ArgumentError(f"glmm_sbc writes the simulated response into a column: the formula's response must be "
                            f"a column of data, got {response!r} (for cbind(), give proportions and weights=trials)")
    frozen = resolve_priors(design, priors)
    analysis = frozen if fit_priors is None else resolve_priors(design, fit_priors)
    if any(prior is None for prior in frozen.beta):
        raise ArgumentError("SBC simulates from the prior: flat priors on fixed effects are not allowed")
    trials = np.asarray(design.row_weights, dtype=float)
    if spec.name == "binomial" and not np.allclose(trials, np.round(trials)):
        raise ArgumentError("weights: the binomial's trials must be whole numbers to simulate from")
    frame = data.loc[design.rows].copy()
    rng = np.random.default_rng(seed_argument(seed))
    keys = jax.random.split(jax.random.PRNGKey(seed), n_reps)
    keep = np.linspace(0, chains * draws_per_chain - 1, n_draws).astype(int)
    ranks, samplers, redrawn = [], {}, 0
    for rep in range(n_reps):
        for attempt in range(MAX_REDRAWS + 1):
            # a constant response (all zeros, say) cannot be fitted (hp.bayes refuses it): draw the replication
            # anew.  Selecting replications by the data alone keeps the ranks uniform (each is uniform given y).
            key = keys[rep] if attempt == 0 else jax.random.fold_in(keys[rep], attempt)
            truth, eta = simulate_glmm_parameters(frozen, design, key)
            mean = _inverse_link(spec.link, eta)
            if spec.name == "binomial":
                y = rng.binomial(trials.astype(np.int64), np.clip(mean, 0.0, 1.0)) / trials
            else:
                y = rng.poisson(mean).astype(float)
            if np.ptp(y) > 0:
                break
            redrawn += 1
        else:
            raise ArgumentError(f"glmm_sbc: {MAX_REDRAWS + 1} simulated responses in a row were constant: the priors "
                                f"put most of their mass where this design has no variation to model")
        frame[response] = y
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short chains: diagnostics warnings are expected noise here
            post = bayes(formula, frame, family=spec.name, link=spec.link, priors=analysis, weights=weights,
                         offset=offset, chains=chains, draws=draws_per_chain, tune=tune, seed=seed + rep, method=method)
        samplers[post.method] = samplers.get(post.method, 0) + 1
        draws = _posterior_draws(post, design)
        ranks.append({name: int(np.sum(draws[name][keep] < value)) for name, value in truth.items()})
    ranks = pd.DataFrame(ranks)
    return SBCResult(ranks=ranks, n_draws=n_draws, tests=_uniformity(ranks, n_draws, bins, alpha), alpha=alpha,
                     samplers=samplers, redrawn=redrawn)
