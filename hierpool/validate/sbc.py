"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

Draw parameters from the prior, simulate a response on a fixed design, fit, and record the
rank of each true value among L posterior draws.  If the sampler computes the posterior
correctly, every rank is uniform on {0, ..., L}.  Two tests of uniformity per parameter:

* chi-square on a histogram of the ranks (``bins`` equal bins);
* a simultaneous band for the ECDF of the normalized ranks (Säilynoja, Bürkner & Vehtari 2022,
  "Graphical test for discrete uniformity and its applications in goodness-of-fit evaluation
  and multiple sample comparison", Stat. Comput. 32): the band's width is calibrated by
  simulating uniform ranks, so the test is a test of the whole ECDF.

Each test runs at level alpha / (2 x parameters) (Bonferroni), so the verdict ``passed``
wrongly fails a calibrated sampler with probability at most ``alpha``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from ..algebra.ar1 import carried, unwhiten
from ..bayesian import bayes, resolve_priors
from ..closedform.ar1 import draws_per_unit, in_search_unit
from ..errors import ArgumentError, DataError, integer_argument, seed_argument
from ..spec.arguments import MIN_DRAWS, probability_argument
from ..spec.design import build_design


@dataclass(frozen=True)
class SBCResult:
    """Ranks and uniformity tests.

    Attributes
    ----------
    ranks : pandas.DataFrame
        One column per tracked parameter, one row per replication; values in 0..L.
    n_draws : int
        L, the number of (thinned) posterior draws ranked against.
    tests : pandas.DataFrame
        Per parameter: chi2, chi2_p, ecdf_max_dev, ecdf_band (the simultaneous band's
        half-width), uniform (both tests pass at level alpha / (2 x parameters):
        Bonferroni, so that ``passed`` wrongly fails a calibrated sampler with
        probability at most ``alpha``).
    alpha : float
    samplers : dict or None
        How many replications each sampler ran (``BayesResult.method``), where the fitting call chooses
        (:func:`hierpool.validate.glmm_sbc`); None otherwise.
    redrawn : int
        Replications simulated again because their response was constant (:func:`hierpool.validate.glmm_sbc`).
    """

    ranks: pd.DataFrame
    n_draws: int
    tests: pd.DataFrame
    alpha: float
    samplers: dict | None = None
    redrawn: int = 0

    @property
    def passed(self) -> bool:
        """No parameter's ranks are non-uniform (family-wise level ``alpha``)."""
        return bool(self.tests.uniform.all())

    def plot(self):
        """Rank histograms with a 99% binomial band, and ECDF differences with the simultaneous band."""
        from ..plots import sbc_figure

        return sbc_figure(self)


def _simulate_parameters(priors, design, rng_key, correlation=None, series=None, relationship: dict | None = None,
                         unit: float = 1.0):
    """One draw of (beta, b per term, sigma) from the priors, and the response it implies.

    ``relationship``: term index -> the Cholesky factor L_A of its relationship matrix; that term's effects are
    L_A z scaled by the sd (b ~ N(0, sd^2 A)), over every level of A (the design's term has A's labels).

    With an AR(1) ``correlation`` (and its ``series``, their lags in ``unit``s of the time column), phi too, from
    the sampler's Uniform prior on its interval (per ``unit``, the median lag, as hp.bayes samples it), and the
    residuals are an AR(1) chain in each series: e_t = c_t e_(t-1) + sqrt(1 - c_t^2) sigma nu_t.  The truth
    reports phi per unit of the time column, as the posterior does.
    """
    import jax
    import numpyro.distributions as dist

    keys = iter(jax.random.split(rng_key, 6 + 2 * len(design.terms) + design.p))
    beta = np.array([float(prior.sample(next(keys))) for prior in priors.beta])
    truth = {f"beta[{name}]": value for name, value in zip(design.fixed_names, beta)}
    mu = design.offset + design.X @ beta  # the offset is part of the mean the fit models (formula offset() terms)
    for j, term in enumerate(design.terms):
        sd = np.asarray(priors.sd[j].sample(next(keys)))
        cor = np.eye(term.k) if term.k == 1 else np.asarray(dist.LKJCholesky(term.k, priors.cor[j]).sample(next(keys)))
        factor = sd[:, None] * cor
        z = np.asarray(jax.random.normal(next(keys), (term.n_levels, term.k)))
        if relationship and j in relationship:
            z = relationship[j] @ z
        b = z @ factor.T
        mu = mu + np.einsum("nk,nk->n", term.z, b[term.index])
        for i, coef in enumerate(term.coef_names):
            truth[f"sd[{term.group}:{coef}]"] = sd[i]
            truth[f"b[{term.group}:{coef}:{term.levels[0]}]"] = b[0, i]
        if term.k > 1:
            truth[f"cor[{term.group}]"] = (cor @ cor.T)[0, 1]
    sigma = float(priors.sigma.sample(next(keys)))
    truth["sigma"] = sigma
    noise = np.asarray(jax.random.normal(next(keys), (design.n,)))
    if correlation is not None:
        low, high = correlation.bounds
        psi = float(dist.Uniform(low, high).sample(next(keys)))  # per the median lag, as hp.bayes samples it
        phi, beyond = draws_per_unit(psi, unit, correlation, what="a prior draw of phi")
        if beyond:  # as hp.bayes refuses such a draw: by the time column's name
            raise DataError(beyond)
        truth["phi"] = float(phi)
        noise = unwhiten(noise, series.previous, carried(psi, series.previous, series.lag), series.order)
    return truth, mu + sigma * noise


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
    draws["sigma"] = post.sigma_draws.ravel()
    if post.phi_draws is not None:
        draws["phi"] = post.phi_draws.ravel()
    return draws


def ecdf_band(n_reps: int, n_draws: int, alpha: float, n_sim: int = 20000, seed: int = 0) -> float:
    """Half-width of the simultaneous (1 - alpha) band for the ECDF of normalized uniform ranks.

    Calibrated by simulation: the (1 - alpha) quantile of max_z |ECDF(z) - z| over uniform
    discrete ranks on {0..L}, evaluated at the rank grid.  ``n_reps``, ``n_draws`` (L) and ``n_sim`` are integers
    >= 1, ``alpha`` lies in (0, 1).
    """
    n_reps = integer_argument("n_reps", n_reps)
    n_draws = integer_argument("n_draws", n_draws)
    probability_argument("alpha", alpha)
    n_sim = integer_argument("n_sim", n_sim)
    rng = np.random.default_rng(seed_argument(seed))
    grid = np.arange(1, n_draws + 2) / (n_draws + 1)
    ranks = rng.integers(0, n_draws + 1, size=(n_sim, n_reps))
    cells = (ranks + (n_draws + 1) * np.arange(n_sim)[:, None]).ravel()
    counts = np.bincount(cells, minlength=n_sim * (n_draws + 1)).reshape(n_sim, n_draws + 1)
    ecdf = np.cumsum(counts, axis=1) / n_reps
    return float(np.quantile(np.max(np.abs(ecdf - grid), axis=1), 1 - alpha))


def check_sbc_sizes(n_reps: int, n_draws: int, chains: int, draws_per_chain: int, bins: int) -> None:
    """Refuse replications too few for the histogram's bins, or more ranked draws than the chains keep (and any of
    them that is not a positive integer: at least 2 bins, :data:`~hierpool.spec.arguments.MIN_DRAWS` draws per
    chain)."""
    n_reps = integer_argument("n_reps", n_reps)
    n_draws = integer_argument("n_draws", n_draws)
    chains = integer_argument("chains", chains)
    draws_per_chain = integer_argument("draws_per_chain", draws_per_chain, minimum=MIN_DRAWS)
    bins = integer_argument("bins", bins, minimum=2)
    if n_reps < bins:
        raise ArgumentError(f"n_reps ({n_reps}) must be at least bins ({bins})")
    if n_draws + 1 > chains * draws_per_chain:
        raise ArgumentError("n_draws must be below chains x draws_per_chain")


def sbc_arguments(n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed) -> None:
    """:func:`check_sbc_sizes`, with ``tune`` an integer >= 0, ``alpha`` in (0, 1) and ``seed`` a seed."""
    check_sbc_sizes(n_reps, n_draws, chains, draws_per_chain, bins)
    integer_argument("tune", tune, minimum=0)
    probability_argument("alpha", alpha)
    seed_argument(seed)


def _uniformity(ranks: pd.DataFrame, n_draws: int, bins: int, alpha: float) -> pd.DataFrame:
    # Bonferroni over the two tests of every parameter: a calibrated sampler fails the
    # whole check with probability at most alpha, however many parameters are tracked
    level = alpha / (2 * ranks.shape[1])
    n_reps = len(ranks)
    band = ecdf_band(n_reps, n_draws, level)
    grid = np.arange(1, n_draws + 2) / (n_draws + 1)
    rows = []
    for name in ranks.columns:
        values = ranks[name].to_numpy()
        counts = np.bincount((values * bins) // (n_draws + 1), minlength=bins)
        chi2, p = scipy.stats.chisquare(counts)
        ecdf = np.cumsum(np.bincount(values, minlength=n_draws + 1)) / n_reps
        deviation = float(np.max(np.abs(ecdf - grid)))
        rows.append({"parameter": name, "chi2": chi2, "chi2_p": p, "ecdf_max_dev": deviation, "ecdf_band": band,
                     "uniform": bool(p > level and deviation <= band)})
    return pd.DataFrame(rows).set_index("parameter")


def sbc(
    formula: str,
    data: pd.DataFrame,
    priors: dict | None = None,
    n_reps: int = 100,
    n_draws: int = 99,
    chains: int = 2,
    draws_per_chain: int = 500,
    tune: int = 500,
    bins: int = 10,
    alpha: float = 0.01,
    seed: int = 0,
    correlation=None,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
) -> SBCResult:
    """Simulation-based calibration of :func:`hierpool.bayes` on the design of ``data``.

    Parameters
    ----------
    formula : str
    data : pandas.DataFrame
        Supplies the design (covariates, groups); its response only scales the default
        priors, which are then frozen for every replication.
    priors : dict, optional
        Prior overrides (as :func:`hierpool.bayes`); they must be proper.
    n_reps : int
        Replications (the issue's quick mode: ~100; full mode: >= 1000).
    n_draws : int
        L: posterior draws kept per replication (thinned evenly from chains x draws_per_chain,
        which reduces autocorrelation so the ranks are not over-dispersed).
    bins, alpha
        Histogram bins of the chi-square test; level of both tests.
    correlation : AR1, optional
        AR(1) residuals within series (``hp.ar1``, ``hp.car1``): phi is drawn from the sampler's prior,
        the residuals simulated as an AR(1) chain, and phi's rank tested with the rest.
    relmat, relmat_inverse : dict, optional
        A known relationship matrix of one term (as :func:`hierpool.bayes`): its effects are simulated as
        sd L_A z over every level of A, and the collapsed animal-model sampler is calibrated.

    Returns
    -------
    SBCResult
    """
    sbc_arguments(n_reps, n_draws, chains, draws_per_chain, tune, bins, alpha, seed)
    import jax

    related, relationship = {}, None
    if relmat is not None or relmat_inverse is not None:
        from ..spec.relationship import model_relationship, with_relationship_levels

        rel = model_relationship(formula, relmat, relmat_inverse)
        related = dict(relmat=relmat, relmat_inverse=relmat_inverse)
        design = with_relationship_levels(build_design(formula, data, related=(rel.group,)), rel)
        relationship = {j: rel.cholesky_factor("hp.validate.sbc with relmat=")
                        for j, term in enumerate(design.terms) if term.group == rel.group}
    else:
        design = build_design(formula, data)
    frozen = resolve_priors(design, priors)
    if any(prior is None for prior in frozen.beta):
        raise ArgumentError("SBC simulates from the prior: flat priors on fixed effects are not allowed")
    response = design.spec.response
    if not isinstance(response, str) or response not in data.columns:  # as glmm_sbc: y = log(v) has no column
        raise ArgumentError(f"sbc writes the simulated response into a column: the formula's response must be a "
                            f"column of data, got {response!r}")
    frame = data.loc[design.rows].copy()
    series, unit = None, 1.0
    if correlation is not None:
        from ..spec.correlation import series_of

        series, unit = in_search_unit(series_of(correlation, data, design.rows), correlation.continuous)
    keys = jax.random.split(jax.random.PRNGKey(seed_argument(seed)), n_reps)
    ranks = []
    for rep in range(n_reps):
        truth, y = _simulate_parameters(frozen, design, keys[rep], correlation, series, relationship, unit)
        frame[response] = y
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short chains: diagnostics warnings are expected noise here
            post = bayes(formula, frame, priors=frozen, chains=chains, draws=draws_per_chain, tune=tune,
                         seed=seed + rep, correlation=correlation, **related)
        draws = _posterior_draws(post, design)
        keep = np.linspace(0, chains * draws_per_chain - 1, n_draws).astype(int)
        ranks.append({name: int(np.sum(draws[name][keep] < value)) for name, value in truth.items()})
    ranks = pd.DataFrame(ranks)
    return SBCResult(ranks=ranks, n_draws=n_draws, tests=_uniformity(ranks, n_draws, bins, alpha), alpha=alpha)
