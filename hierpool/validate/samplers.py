"""The default (collapsed) sampler against the independent full model: one posterior, two samplers.

``hp.bayes``'s collapsed sampler runs NUTS on the variance parameters with beta and b
integrated out by the closed-form factorization, then draws (beta, b) exactly given each
variance draw.  ``hp.bayes(method="full")`` runs NUTS on the plain non-centered model, with
no part of the mixed-model algebra.  Under the same priors both target the same posterior,
so every summary must agree up to the Monte-Carlo error of both:

    z_mean = (mean_collapsed - mean_full) / sqrt(MCSE_c^2 + MCSE_f^2),
    z_sd   = (sd_collapsed - sd_full) / sqrt(MCSE(sd)_c^2 + MCSE(sd)_f^2),

for every fixed effect, every random effect and every variance parameter (sds,
correlations, residual sd).  A wrong marginal likelihood, a wrong conditional draw, or a
fixed-effect prior applied wrongly by either sampler (the collapsed one turns it into
pseudo-observations) moves some of these far beyond the Bonferroni bound.  The two share
the variance parameters' prior code (``model.variance_parameters``), so a wrong variance
prior is not caught here: simulation-based calibration (:func:`hierpool.validate.sbc`) is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..bayesian import bayes
from ..bayesian.convergence import mcse_sd_by_column
from ..bayesian.results import BayesResult
from ..errors import ArgumentError, real_argument
from ..spec.arguments import probability_argument, sampler_arguments
from ._arguments import instance_argument
from .agreement import bonferroni_threshold


@dataclass(frozen=True)
class SamplerAgreement:
    """What :func:`sampler_agreement` found.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per quantity: table (``fixef``, ``ranef``, ``varcorr``), name, mean_collapsed,
        mean_full, sd_collapsed, sd_full, z_mean, z_sd, r_hat (the larger of the two).
    threshold : float
        Bonferroni-corrected |z| bound (two tests per quantity, family-wise level alpha).
    passed : bool
        Every |z_mean| and |z_sd| below ``threshold``, every R-hat below ``r_hat_max``, no
        divergent transition in the collapsed sampler and at most ``max_divergent_share`` of
        the full model's transitions divergent (the non-centered model has the odd one where
        a variance is weakly determined, as Pastes' batches).
    collapsed, full : BayesResult
    divergences : dict
        Divergent transitions of each sampler (``collapsed``, ``full``).
    """

    table: pd.DataFrame
    threshold: float
    passed: bool
    collapsed: object
    full: object
    divergences: dict

    def summary(self) -> str:
        """One line on the agreement."""
        return (
            f"collapsed vs full sampler: {len(self.table)} quantities, max |z_mean| = {np.abs(self.table.z_mean).max():.2f}, "
            f"max |z_sd| = {np.abs(self.table.z_sd).max():.2f}, threshold {self.threshold:.2f}, "
            f"max R-hat {self.table.r_hat.max():.4f}, divergences {self.divergences}: "
            f"{'PASSED' if self.passed else 'FAILED'}"
        )


def _quantities(post) -> list[tuple[str, list[str], np.ndarray]]:
    """(table, row names, (chain, draw, rows) draws) for the fixed effects, random effects and variance parameters."""
    ranef = post.ranef
    varcorr = post.varcorr
    varcorr_names = [":".join(str(part) for part in row if not pd.isna(part)) for row in zip(varcorr.grp, varcorr.var1, varcorr.var2)]
    return [
        ("fixef", list(post.fixef.index), post.beta_draws),
        ("ranef", [f"{g}:{t}:{l}" for g, t, l in zip(ranef.grpvar, ranef.term, ranef.grp)], post.ranef_draws()),
        ("varcorr", varcorr_names, post.varcorr_draws()),
    ]


def _bounds(r_hat_max, max_divergent_share) -> None:
    """Refuse an R-hat bound not above 1 and a share of divergent transitions outside [0, 1)."""
    real_argument("r_hat_max", r_hat_max, above=1.0)
    if real_argument("max_divergent_share", max_divergent_share, at_least=0.0) >= 1:
        raise ArgumentError(f"max_divergent_share must be a number >= 0 and below 1, got {max_divergent_share!r}")


def sampler_agreement(
    formula: str,
    data: pd.DataFrame,
    priors: dict | None = None,
    se: str | None = None,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    alpha: float = 0.01,
    target_accept: float = 0.95,
    r_hat_max: float = 1.05,
    max_divergent_share: float = 0.01,
    weights=None,
    offset=None,
) -> SamplerAgreement:
    """Compare ``hp.bayes``'s collapsed sampler with the independent full model, in Monte-Carlo units.

    Parameters
    ----------
    formula, data, priors, se, weights, offset
        As :func:`hierpool.bayes`; the priors must be Normal or flat on the fixed effects
        (the collapsed sampler's condition).
    chains, draws, tune, seed, target_accept
        Both samplers' settings (the full model runs at ``seed + 1``: independent chains).
        The default target acceptance is high because the non-centered full model
        diverges now and then at 0.8 where a variance is near zero (Pastes' batches).
    alpha : float
        Family-wise level: the bound is Bonferroni-corrected over two tests per quantity.
    r_hat_max : float
        R-hat bound.  The z tests already count autocorrelation (ESS-based MCSEs); R-hat
        guards against chains stuck in different places, which shows far above 1.05.  The
        usual 1.01 (Vehtari et al. 2021) is for final results of long runs: the sd of a
        variance component with few levels (6 workers) reaches 1.012 in 2 x 500 draws.
    max_divergent_share : float
        Share of the full model's transitions allowed to diverge.  Its means and sds must
        still agree in Monte-Carlo units: a divergence that biased them fails the z tests.

    Returns
    -------
    SamplerAgreement
    """
    probability_argument("alpha", alpha)
    sampler_arguments(chains, draws, tune, seed, None, target_accept, min_chains=2)
    _bounds(r_hat_max, max_divergent_share)
    settings = dict(
        priors=priors, se=se, weights=weights, offset=offset, chains=chains, draws=draws, tune=tune, target_accept=target_accept
    )
    collapsed = bayes(formula, data, method="collapsed", seed=seed, **settings)
    full = bayes(formula, data, method="full", seed=seed + 1, **settings)
    return compare_samplers(collapsed, full, alpha=alpha, r_hat_max=r_hat_max, max_divergent_share=max_divergent_share)


def compare_samplers(
    collapsed, full, alpha: float = 0.01, r_hat_max: float = 1.05, max_divergent_share: float = 0.01
) -> SamplerAgreement:
    """The agreement of two posteriors of one model (see :func:`sampler_agreement`), from their draws.

    Parameters
    ----------
    collapsed, full : BayesResult
        Posteriors of the same model, data and priors (any two samplers; the names say
        which one is allowed no divergent transition).
    alpha, r_hat_max, max_divergent_share
        As :func:`sampler_agreement`.
    """
    instance_argument("collapsed", collapsed, BayesResult, "a posterior of hp.bayes (BayesResult)")
    instance_argument("full", full, BayesResult, "a posterior of hp.bayes (BayesResult)")
    probability_argument("alpha", alpha)
    _bounds(r_hat_max, max_divergent_share)
    frames = []
    for (table, names, a), (_, _, b) in zip(_quantities(collapsed), _quantities(full)):
        summary_a, summary_b = getattr(collapsed, table), getattr(full, table)
        mean_a, mean_b = summary_a["mean"].to_numpy(), summary_b["mean"].to_numpy()
        sd_a, sd_b = summary_a["sd"].to_numpy(), summary_b["sd"].to_numpy()
        mcse_a, mcse_b = summary_a["mcse_mean"].to_numpy(), summary_b["mcse_mean"].to_numpy()
        mcse_sd_a, mcse_sd_b = mcse_sd_by_column(a), mcse_sd_by_column(b)
        frames.append(
            pd.DataFrame(
                {
                    "table": table,
                    "name": names,
                    "mean_collapsed": mean_a,
                    "mean_full": mean_b,
                    "sd_collapsed": sd_a,
                    "sd_full": sd_b,
                    "z_mean": (mean_a - mean_b) / np.hypot(mcse_a, mcse_b),
                    "z_sd": (sd_a - sd_b) / np.hypot(mcse_sd_a, mcse_sd_b),
                    "r_hat": np.maximum(summary_a["r_hat"].to_numpy(), summary_b["r_hat"].to_numpy()),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    threshold = bonferroni_threshold(2 * len(table), alpha)
    divergences = {"collapsed": collapsed.divergences, "full": full.divergences}
    passed = bool(
        np.all(np.abs(table.z_mean) < threshold)
        and np.all(np.abs(table.z_sd) < threshold)
        and np.all(table.r_hat < r_hat_max)
        and divergences["collapsed"] == 0
        and divergences["full"] <= max_divergent_share * full.beta_draws.shape[0] * full.beta_draws.shape[1]
    )
    return SamplerAgreement(table=table, threshold=threshold, passed=passed, collapsed=collapsed, full=full,
                            divergences=divergences)
