"""Posterior means against BLUPs, posterior sds against the joint sds of the mixed-model equations.

The posterior compared with the closed form is computed independently of it: the
plain non-centered NumPyro model (``hp.bayes(method="full")``),

    y ~ Normal(offset + X beta + sum_j Z_j b_j, sigma / sqrt(w)),   b_j = z_j F_j^T,  z_j ~ Normal(0, I),  F_j F_j^T = Sigma_j,

(w the prior weights, ones without them), sampled by NUTS.  It shares with the
closed-form engine only the design (y, X, the offset, the prior weights, the level
index and z columns of every term) and, in exact mode, the variance parameters (the fit's
relative covariance factors and sigma); it never forms the mixed-model equations' cross-
products and never factors or solves them.  (The exact
Henderson draw, ``hp.bayes(..., variance=fit)`` with the default method, draws from the
same factorization as the BLUPs: agreement there would only show that its noise averages
to zero.  It stays the fast way to get those draws; it is not the validation.)

Exact mode (Henderson 1975; Gelman et al. BDA3 section 14.2).  With the variance
parameters held at their REML values and a flat prior on beta, the posterior of
(beta, b) is Gaussian:

    mean = the solution of the mixed-model equations (BLUE of beta, BLUP of b),
    covariance = sigma^2 C^-1, C the mixed-model coefficient matrix.

So every posterior mean must equal its BLUP up to Monte-Carlo error, z = (mean - BLUP) / MCSE,
and every posterior sd must equal sqrt(diag(sigma^2 C^-1)) ("joint sd") up to the sd's own
Monte-Carlo error, sd_z = (sd - joint sd) / MCSE(sd) (:func:`sd_z_scores`: ArviZ's estimator, taken at the
joint sd).  lme4's ``condsd`` holds beta at its estimate and is smaller; the table shows both.

Full-Bayes mode puts priors on the variance parameters.  Posterior means then differ from the
BLUPs because the posterior averages the shrinkage over the uncertain variance ratio (less
shrinkage where small variance ratios are unlikely, more where large ones are), and posterior
sds exceed the joint sds because the variance uncertainty is propagated.  Both differences
vanish as the data grow (:func:`agreement_series`).

:func:`sampler_agreement` compares hierpool's default (collapsed) sampler with the same
independent full model under the same priors: both target one posterior, so fixed effects,
random effects and variance parameters must agree in mean and sd in Monte-Carlo units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from ..bayesian import bayes
from ..bayesian.convergence import mcse_sd_by_column
from ..bayesian.results import BayesResult
from ..bayesian.spatial import SpatialBayesResult
from ..closedform import lmm
from ..closedform.relmat import RelmatResult
from ..closedform.results import LMMResult
from ..closedform.spatial import SpatialFit
from ..errors import ArgumentError, integer_argument, real_argument, seed_argument
from ..spec.arguments import probability_argument, sampler_arguments
from ._arguments import callable_argument, instance_argument, sizes_argument

#: What :func:`compare` takes as ``fit``: a Gaussian closed-form fit (``hp.lmm``; AR(1) and relationship fits too).
LMM_FITS = (LMMResult, RelmatResult)


def bonferroni_threshold(n_tests: int, alpha: float) -> float:
    """Two-sided normal quantile for ``n_tests`` z-scores at family-wise level ``alpha``."""
    n_tests = integer_argument("n_tests", n_tests)
    probability_argument("alpha", alpha)
    return float(scipy.stats.norm.ppf(1 - alpha / (2 * n_tests)))


@dataclass(frozen=True)
class AgreementReport:
    """What :func:`blup_agreement` found.

    Attributes
    ----------
    mode : str
        ``"exact"`` or ``"full"``.
    table : pandas.DataFrame
        One row per fixed and random effect: effect (``fixef`` or ``ranef``), grpvar, term,
        grp, blup, condsd, joint_sd, post_mean, post_sd, mcse, mcse_sd, ess, r_hat, z,
        sd_ratio, sd_z.
    threshold : float
        Bonferroni-corrected |z| bound (exact mode).
    passed : bool
        Exact mode: every |z| and every |sd_z| below ``threshold``, every R-hat below
        ``r_hat_max`` (1.05 by default) and no divergent transition.  Full mode: None (differences are expected;
        read ``table`` and ``summary()``).
    fit, posterior
        The closed-form fit and the Bayesian fit compared.
    divergences : int
        Divergent transitions of the posterior's sampler.
    """

    mode: str
    table: pd.DataFrame
    threshold: float
    passed: bool | None
    fit: object
    posterior: object
    divergences: int = 0

    def summary(self) -> str:
        """A few lines on the agreement."""
        ranef = self.table[self.table.effect == "ranef"]
        not_finite = int((~np.isfinite(self.table.z) | ~np.isfinite(self.table.sd_z)).sum())
        lines = [
            f"BLUP agreement ({self.mode} mode): {len(self.table)} effects, "
            f"max |z| = {np.abs(self.table.z).max():.2f}, max |sd_z| = {np.abs(self.table.sd_z).max():.2f}, "
            f"max R-hat {np.nanmax(self.table.r_hat):.4f}, {self.divergences} divergent transitions"
            + (f", {not_finite} effects with a non-finite z" if not_finite else "")
            + (f", threshold {self.threshold:.2f}: {'PASSED' if self.passed else 'FAILED'}" if self.mode == "exact" else ""),
            f"posterior sd / joint sd: {self.table.sd_ratio.min():.3f} to {self.table.sd_ratio.max():.3f}",
        ]
        if self.mode == "full" and len(ranef):
            slope = np.polyfit(ranef.blup, ranef.post_mean, 1)[0]
            lines.append(
                f"posterior means vs BLUPs: slope {slope:.3f} ({'less' if slope > 1 else 'more'} shrinkage than the BLUPs), "
                f"mean |difference| = {np.mean(np.abs(ranef.post_mean - ranef.blup) / ranef.joint_sd):.3f} joint sds; "
                "posterior sds are wider by the variance-parameter uncertainty"
            )
        return "\n".join(lines)

    def plot(self):
        """Posterior mean vs BLUP (error bars: 2 posterior sds), and posterior sd vs joint and conditional sd."""
        from ..plots import agreement_figure

        return agreement_figure(self)


def sd_z_scores(table: pd.DataFrame) -> np.ndarray:
    """(post_sd - joint_sd) / MCSE(sd) per row of an agreement ``table``, the sd's Monte-Carlo error taken at the
    joint sd (the null): ArviZ's ``mcse_sd`` (column ``mcse_sd``) times joint_sd / post_sd.

    ArviZ's MCSE of a sd is proportional to the sd estimated from the same draws, so a sd that comes out low by
    chance shrank its own error and its z grew: over 2,200 agreement rows, 25 fell below -3 and none above +3,
    and Bonferroni-level checks failed in about 12% of runs against their nominal 1% (4.6% against 1% with
    independent normal draws; 1.0% with the error at the null).  The relative error is the same; only its scale is
    the hypothesis's."""
    with np.errstate(divide="ignore", invalid="ignore"):
        null_mcse = table.mcse_sd * table.joint_sd / table.post_sd
        return np.asarray((table.post_sd - table.joint_sd) / null_mcse, dtype=float)


def _comparison_table(fit, post) -> pd.DataFrame:
    fixef = pd.DataFrame(
        {
            "effect": "fixef",
            "grpvar": "",
            "term": list(fit.fixef.index),
            "grp": "",
            "blup": fit.fixef.to_numpy(),
            "condsd": fit.fixef_se.to_numpy(),
            "joint_sd": fit.fixef_se.to_numpy(),
            "post_mean": post.fixef["mean"].to_numpy(),
            "post_sd": post.fixef["sd"].to_numpy(),
            "mcse": post.fixef["mcse_mean"].to_numpy(),
            "mcse_sd": mcse_sd_by_column(post.beta_draws),
            "ess": post.fixef["ess_bulk"].to_numpy(),
            "r_hat": post.fixef["r_hat"].to_numpy(),
        }
    )
    ranef = pd.DataFrame(
        {
            "effect": "ranef",
            "grpvar": fit.ranef.grpvar.to_numpy(),
            "term": fit.ranef.term.to_numpy(),
            "grp": fit.ranef.grp.astype(str).to_numpy(),
            "blup": fit.ranef.condval.to_numpy(),
            "condsd": fit.ranef.condsd.to_numpy(),
            "joint_sd": fit.ranef_joint_sd(),
            "post_mean": post.ranef["mean"].to_numpy(),
            "post_sd": post.ranef["sd"].to_numpy(),
            "mcse": post.ranef["mcse_mean"].to_numpy(),
            "mcse_sd": mcse_sd_by_column(post.ranef_draws()),
            "ess": post.ranef["ess_bulk"].to_numpy(),
            "r_hat": post.ranef["r_hat"].to_numpy(),
        }
    )
    table = pd.concat([fixef, ranef], ignore_index=True)
    # a zero variance component (singular fit) pins its effects at exactly 0 in both engines
    pinned = (table.joint_sd == 0) & (table.post_sd < 1e-12) & (table.blup.abs() < 1e-12) & (table.post_mean.abs() < 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        table["z"] = np.where(pinned, 0.0, (table.post_mean - table.blup) / table.mcse)
        table["sd_ratio"] = np.where(pinned, 1.0, table.post_sd / table.joint_sd)
        table["sd_z"] = np.where(pinned, 0.0, sd_z_scores(table))
    table.loc[pinned, "r_hat"] = 1.0  # constant draws have no R-hat
    return table


def compare(fit, posterior, alpha: float = 0.01, r_hat_max: float = 1.05) -> AgreementReport:
    """The agreement of a closed-form fit with a posterior of the same model and data.

    A posterior of other effects, another response or X, other prior weights (or
    known residual sds), or another offset is refused (``ArgumentError``).

    :func:`blup_agreement` fits both and calls this; call it directly to compare a fit
    with a posterior you already have (e.g. a refit after changing the closed-form engine).

    Parameters
    ----------
    fit : LMMResult
    posterior : BayesResult
        With the variance parameters held at ``fit``'s values (``variance=fit``): exact
        mode, judged; otherwise full mode, described.
    alpha : float
        Family-wise level of the exact-mode test; the |z| bound is Bonferroni-corrected
        for the number of effects (twice: means and sds).
    r_hat_max : float
        R-hat bound.  The z tests already count autocorrelation (their MCSEs come from
        the ESS); R-hat guards against chains stuck in different places, which shows far
        above 1.05.  The usual 1.01 is for the final results of long runs: short runs of
        a 58-dimensional Gaussian (Orthodont) reach it by chance.

    Returns
    -------
    AgreementReport
    """
    instance_argument("fit", fit, LMM_FITS, "a closed-form fit of hp.lmm (LMMResult)")
    instance_argument("posterior", posterior, BayesResult, "a posterior of hp.bayes (BayesResult)")
    probability_argument("alpha", alpha)
    real_argument("r_hat_max", r_hat_max, above=1.0)
    _check_same_model(fit, posterior)
    mode = "exact" if posterior.held is not None else "full"
    if mode == "exact":
        if any(prior is not None for prior in posterior.priors.beta):
            raise ArgumentError("posterior: exact mode compares with the BLUE of beta and needs flat priors on every fixed effect")
        if not np.isclose(float(posterior.held.sigma), float(fit.sigma) if not fit.design.sigma_known else 1.0, rtol=1e-10):
            raise ArgumentError("posterior: its variance parameters were held at another fit's values")
    table = _comparison_table(fit, posterior)
    threshold = bonferroni_threshold(2 * len(table), alpha)
    divergences = posterior.divergences
    passed = None
    if mode == "exact":
        passed = bool(
            np.all(np.abs(table.z) < threshold)
            and np.all(np.abs(table.sd_z) < threshold)
            and np.all(table.r_hat < r_hat_max)
            and divergences == 0
        )
    return AgreementReport(mode=mode, table=table, threshold=threshold, passed=passed, fit=fit, posterior=posterior,
                           divergences=divergences)


def _check_same_model(fit, posterior) -> None:
    same = list(fit.fixef.index) == list(posterior.fixef.index) and all(
        np.array_equal(fit.ranef[column].astype(str).to_numpy(), posterior.ranef[column].astype(str).to_numpy())
        for column in ("grpvar", "term", "grp")
    )
    if not same:
        raise ArgumentError("posterior: its fixed and random effects are not those of fit (another model or data set)")
    # same effects, other likelihood: an offset moves every BLUP, weights (or se=) every shrinkage
    ours, theirs = fit.design, posterior.design
    if ours.n != theirs.n or not (np.array_equal(ours.y, theirs.y) and np.array_equal(ours.X, theirs.X)):
        raise ArgumentError("posterior: its response or fixed-effect columns are not those of fit (another data set)")
    if ours.sigma_known != theirs.sigma_known or not np.array_equal(ours.row_weights, theirs.row_weights):
        raise ArgumentError(
            "posterior: its prior weights (or known residual sds) are not those of fit; "
            "pass the same weights= (or se=) to hp.lmm and hp.bayes"
        )
    if not np.array_equal(ours.offset, theirs.offset):
        raise ArgumentError(
            "posterior: its offset is not that of fit; pass the same offset= (and offset() terms) to hp.lmm and hp.bayes"
        )


def flat_beta_priors(fit) -> dict:
    """Flat priors on every fixed effect of ``fit`` (``hp.bayes``'s prior keys: ``b`` only where there are
    coefficients besides the intercept, as it refuses a prior that covers nothing)."""
    if not isinstance(getattr(fit, "fixef", None), pd.Series):
        raise ArgumentError(f"fit must be a closed-form fit of hp.lmm or hp.glmm (its fixef a pandas Series), "
                            f"got {type(fit).__name__}")
    names = list(fit.fixef.index)
    return ({"b": "flat"} if any(name != "Intercept" for name in names) else {}) | (
        {"Intercept": "flat"} if "Intercept" in names else {})


def blup_agreement(
    formula: str,
    data: pd.DataFrame,
    mode: str = "exact",
    se: str | None = None,
    priors: dict | None = None,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    alpha: float = 0.01,
    target_accept: float = 0.8,
    r_hat_max: float = 1.05,
    weights=None,
    offset=None,
    correlation=None,
    relmat: dict | None = None,
    relmat_inverse: dict | None = None,
    adjacency=None,
) -> AgreementReport:
    """Compare an independent posterior of every effect with the closed-form BLUPs.

    Parameters
    ----------
    formula, data, se, weights, offset, correlation
        As :func:`hierpool.lmm`; both engines get the same ones.  With an AR(1) ``correlation`` the
        closed form fits the whitened model (:mod:`hierpool.closedform.ar1`) and the posterior is NUTS
        on the plain model with the AR(1) likelihood written on its residuals (phi held in exact mode).
    relmat, relmat_inverse
        A known relationship matrix of one term, as :func:`hierpool.lmm`: the closed form solves the sparse
        mixed-model equations (:mod:`hierpool.closedform.relmat`), the posterior is NUTS on the plain model
        with b = sd L_A z (A's dense Cholesky factor), every level of A compared (breeding values).
    adjacency : optional
        The graph of a spatial term ``car(area, type=...)`` (:func:`hierpool.lmm`): exact mode only; the closed
        form is the sparse Laplace fit (exact for a Gaussian response), the posterior NUTS on the spatial model
        with every variance parameter held (:func:`compare_spatial`), every area of the graph (and every level of a
        ``(1 | g)`` term beside) compared.
    mode : {"exact", "full"}
        ``exact``: variance parameters held at their REML estimates and a flat prior
        on beta, so the posterior must reproduce the BLUPs and sigma^2 C^-1.
        ``full``: the variance parameters get priors (``priors``, defaults otherwise)
        and are sampled; the report describes the differences.  In both modes the
        posterior is NUTS on the plain non-centered model (``hp.bayes(method="full")``),
        independent of the mixed-model equations.
    chains, draws, tune, seed, target_accept
        Sampler settings (at least two chains: R-hat needs them).
    alpha, r_hat_max
        Family-wise level of the exact-mode test and its R-hat bound (see :func:`compare`).

    Returns
    -------
    AgreementReport
    """
    if mode not in ("exact", "full"):
        raise ArgumentError(f"mode must be 'exact' or 'full', got {mode!r}")
    probability_argument("alpha", alpha)
    real_argument("r_hat_max", r_hat_max, above=1.0)
    if mode == "exact" and priors:
        raise ArgumentError("priors apply to mode='full'; exact mode uses a flat prior on the fixed effects")
    sampler_arguments(chains, draws, tune, seed, None, target_accept, min_chains=2)
    if adjacency is not None:
        if mode != "exact" or se is not None or correlation is not None or relmat is not None or relmat_inverse:
            raise ArgumentError("a spatial term (adjacency=) is compared in exact mode, without se=, correlation= or "
                                "relmat=")
        fit = lmm(formula, data, weights=weights, offset=offset, adjacency=adjacency)
        post = bayes(formula, data, weights=weights, offset=offset, adjacency=adjacency, variance=fit,
                     priors=flat_beta_priors(fit), chains=chains, draws=draws, tune=tune, seed=seed,
                     target_accept=target_accept, progress=False)
        return compare_spatial(fit, post, alpha=alpha, r_hat_max=r_hat_max)
    related = {} if relmat is None and relmat_inverse is None else dict(relmat=relmat, relmat_inverse=relmat_inverse)
    fit = lmm(formula, data, se=se, weights=weights, offset=offset, correlation=correlation, **related)
    post = bayes(
        formula,
        data,
        se=se,
        weights=weights,
        offset=offset,
        correlation=correlation,
        **related,
        priors=flat_beta_priors(fit) if mode == "exact" else priors,
        variance=fit if mode == "exact" else None,
        method="full",
        chains=chains,
        draws=draws,
        tune=tune,
        seed=seed,
        target_accept=target_accept,
    )
    return compare(fit, post, alpha=alpha, r_hat_max=r_hat_max)


def _held_at(held, fit) -> bool:
    """Whether a spatial posterior's held variance parameters (:func:`hierpool.bayesian.spatial.held_values`) are
    ``fit``'s."""
    cars, factors, sigma = held
    return (np.allclose(cars, fit.car_parameters(), rtol=1e-12)
            and all(np.allclose(a, b, rtol=1e-12) for a, b in zip(factors, fit.covariance_factors()))
            and np.isclose(float(sigma), fit.sigma, rtol=1e-12))


def compare_spatial(fit, posterior, alpha: float = 0.01, r_hat_max: float = 1.05) -> AgreementReport:
    """:func:`compare` for a spatial model: a Gaussian :class:`~hierpool.closedform.spatial.SpatialFit` (REML) against
    a posterior of the same model with its variance parameters held (``hp.bayes(..., variance=fit)``) and flat priors
    on beta.  The posterior of (beta, b) is then Gaussian with mean (beta-hat, BLUP) and covariance H^-1 under the
    ICAR's constraints: every mean must be its BLUP and every sd its joint sd, in Monte-Carlo units; every term's
    effects where the model has several (spatial and ``(lhs | g)``)."""
    instance_argument("fit", fit, SpatialFit, "a spatial fit of hp.lmm(..., adjacency=) (SpatialFit)")
    instance_argument("posterior", posterior, SpatialBayesResult,
                      "a spatial posterior of hp.bayes(..., adjacency=) (SpatialBayesResult)")
    probability_argument("alpha", alpha)
    real_argument("r_hat_max", r_hat_max, above=1.0)
    if fit.design.family is not None or not fit.reml:
        raise ArgumentError("fit: exact agreement needs a Gaussian spatial fit by REML (hp.lmm(..., adjacency=))")
    if posterior.held is None or not _held_at(posterior.held, fit):
        raise ArgumentError("posterior: its variance parameters were not held at fit's (hp.bayes(variance=fit))")
    if any(prior is not None for prior in posterior.priors.beta):
        raise ArgumentError("posterior: exact mode compares with the BLUE of beta and needs flat priors on every "
                            "fixed effect")
    fixef, beta = posterior.fixef, posterior.draws("beta")
    fit_tables = {fit.sdesign.areas[0].term.label: fit.ranef} if fit.sdesign.single else fit.ranef
    post_tables = {fit.sdesign.areas[0].term.label: posterior.ranef} if fit.sdesign.single else posterior.ranef
    rows = {key: [] for key in ("grpvar", "term", "grp", "blup", "condsd", "joint_sd", "post_mean", "post_sd",
                                "mcse", "mcse_sd", "ess", "r_hat")}
    spatial = {a.term.label: a.term.factor for a in fit.sdesign.areas}
    for label, ranef in fit_tables.items():
        post_ranef, group = post_tables[label], spatial.get(label)
        if group is None:  # a (lhs | g) term: its levels (and coefficients)
            group = ranef.index.names[0]
            terms = ["(Intercept)"] * len(ranef) if ranef.index.nlevels == 1 else list(ranef.index.get_level_values(1))
        else:
            terms = ["(Intercept)"] * len(ranef)
        rows["grpvar"] += [group] * len(ranef)
        rows["term"] += terms
        rows["grp"] += [str(level) for level in ranef.index.get_level_values(0)]
        rows["blup"].append(ranef["effect"].to_numpy())
        rows["condsd"].append(ranef["condsd"].to_numpy())
        rows["joint_sd"].append(fit.ranef_joint_sd(label))
        rows["post_mean"].append(post_ranef["mean"].to_numpy())
        rows["post_sd"].append(post_ranef["sd"].to_numpy())
        rows["mcse"].append(post_ranef["mcse_mean"].to_numpy())
        rows["mcse_sd"].append(mcse_sd_by_column(posterior.effect_draws(label)))
        rows["ess"].append(post_ranef["ess_bulk"].to_numpy())
        rows["r_hat"].append(post_ranef["r_hat"].to_numpy())
    n_fixed = len(fixef)
    head = {"blup": fit.fixef.to_numpy(), "condsd": fit.fixef_se.to_numpy(), "joint_sd": fit.fixef_se.to_numpy(),
            "post_mean": fixef["mean"].to_numpy(), "post_sd": fixef["sd"].to_numpy(),
            "mcse": fixef["mcse_mean"].to_numpy(), "mcse_sd": mcse_sd_by_column(beta),
            "ess": fixef["ess_bulk"].to_numpy(), "r_hat": fixef["r_hat"].to_numpy()}
    table = pd.DataFrame({
        "effect": ["fixef"] * n_fixed + ["ranef"] * len(rows["grp"]),
        "grpvar": [""] * n_fixed + rows["grpvar"],
        "term": list(fixef.index) + rows["term"],
        "grp": [""] * n_fixed + rows["grp"],
        **{key: np.concatenate([head[key]] + rows[key]) for key in head},
    })
    table["z"] = (table.post_mean - table.blup) / table.mcse
    table["sd_ratio"] = table.post_sd / table.joint_sd
    table["sd_z"] = sd_z_scores(table)
    threshold = bonferroni_threshold(2 * len(table), alpha)
    divergences = posterior.divergences
    passed = bool(np.all(np.abs(table.z) < threshold) and np.all(np.abs(table.sd_z) < threshold)
                  and np.all(table.r_hat < r_hat_max) and divergences == 0)
    return AgreementReport(mode="exact", table=table, threshold=threshold, passed=passed, fit=fit,
                           posterior=posterior, divergences=divergences)


def agreement_series(simulate, sizes, seed: int = 0, **kwargs) -> pd.DataFrame:
    """Full-Bayes agreement as the data grow: how far posterior means are from BLUPs.

    Parameters
    ----------
    simulate : callable
        ``simulate(size, rng) -> (formula, data)``, a data set of the given size.
    sizes : sequence of int
    **kwargs
        Passed to :func:`blup_agreement` (mode is ``"full"``).

    Returns
    -------
    pandas.DataFrame
        Per size: mean |post_mean - BLUP| / joint_sd of the random effects, and the mean
        posterior sd / joint sd.  Both shrink toward 0 and 1 as the variance parameters
        become well determined.
    """
    callable_argument("simulate", simulate)
    sizes = sizes_argument("sizes", sizes)
    rng = np.random.default_rng(seed_argument(seed))
    rows = []
    for size in sizes:
        formula, data = simulate(size, rng)
        report = blup_agreement(formula, data, mode="full", seed=seed, **kwargs)
        ranef = report.table[report.table.effect == "ranef"]
        rows.append(
            {
                "size": size,
                "mean_abs_diff_in_sd": float(np.mean(np.abs(ranef.post_mean - ranef.blup) / ranef.joint_sd)),
                "mean_sd_ratio": float(np.mean(ranef.sd_ratio)),
            }
        )
    return pd.DataFrame(rows)
