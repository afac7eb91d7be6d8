"""The fitted Bayesian model: posterior summaries in lme4's table shapes, predictions, diagnostics."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import arviz as az
import numpy as np
import pandas as pd

from ..algebra.ar1 import carried
from ..algebra.varcorr import varcorr_table
from ..errors import ArgumentError, HierpoolWarning, seed_argument
from ..spec.design import Design
from ..spec.newdata import model_rows, row_labels, unseen_levels
from .convergence import diagnose, ess_tail
from .posterior import linear_predictor_draws, slot_covariance_draws, slot_effect_draws, term_slots
from .prediction import check_arguments, draw_moments, on_scale, summary_table, term_effect_draws
from .priors import Priors

SUMMARY_COLUMNS = ["mean", "sd", "lower", "upper", "mcse_mean", "ess_bulk", "r_hat"]
#: Sampling is flagged when R-hat exceeds this or ESS falls below this many draws per chain
#: (Vehtari et al. 2021); ``hp.bayes_batch`` applies the same thresholds per dataset.
R_HAT_MAX = 1.01
ESS_MIN_PER_CHAIN = 100


class SamplingWarning(HierpoolWarning):
    """MCMC diagnostics are bad: R-hat too high, ESS too low, or divergent transitions."""


def summarize_draws(draws: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """mean, sd, equal-tailed interval, MCSE of the mean, bulk ESS and rank-normalized R-hat.

    ``draws`` has shape (chain, draw, m); statistics per column (Vehtari et al. 2021,
    "Rank-normalization, folding, and localization: an improved R-hat"; ArviZ's
    estimators, vectorized in :mod:`hierpool.bayesian.convergence`).
    """
    return draw_moments(draws.reshape(-1, draws.shape[-1]), level) | diagnose(np.moveaxis(draws, -1, 0))


def posterior_diagnostics(idata, warn: bool = True) -> pd.DataFrame:
    """Worst R-hat and bulk/tail ESS per variable of a posterior, and divergent transitions.

    Warns (``SamplingWarning``) when R-hat > ``R_HAT_MAX``, bulk or tail ESS <
    ``ESS_MIN_PER_CHAIN`` per chain, or any transition diverged (Vehtari et al. 2021; Betancourt 2017).
    """
    posterior = idata.posterior
    names = [name for name in posterior.data_vars if posterior[name].size]  # no beta in y ~ 0 + (1 | g)
    blocks = [np.asarray(posterior[name].values, dtype=float) for name in names]
    columns = np.concatenate([b.reshape(b.shape[0], b.shape[1], -1) for b in blocks], axis=-1)
    owner = np.repeat(np.arange(len(names)), [int(np.prod(b.shape[2:])) for b in blocks])
    stacked = np.moveaxis(columns, -1, 0)
    # constant entries (a correlation matrix's diagonal) give NaN, skipped; a variable with no
    # finite value (one chain: no R-hat) stays NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diagnosed = diagnose(stacked)  # R-hat and bulk ESS share one rank normalization
        per_column = {"max_r_hat": (diagnosed["r_hat"], np.nanmax), "min_ess_bulk": (diagnosed["ess_bulk"], np.nanmin),
                      "min_ess_tail": (ess_tail(stacked), np.nanmin)}
        table = pd.DataFrame(
            {key: [float(reduce(values[owner == i])) for i in range(len(names))]
             for key, (values, reduce) in per_column.items()},
            index=pd.Index(names, name="variable"),
        )
    divergences = int(idata.sample_stats["diverging"].values.sum()) if "sample_stats" in idata else 0
    table.attrs["divergences"] = divergences
    if warn:
        chains = posterior.sizes["chain"]
        problems = []
        if chains > 1 and table["max_r_hat"].max() > R_HAT_MAX:
            problems.append(f"R-hat up to {table['max_r_hat'].max():.3f} (> {R_HAT_MAX})")
        if min(table["min_ess_bulk"].min(), table["min_ess_tail"].min()) < ESS_MIN_PER_CHAIN * chains:
            problems.append(
                f"ESS as low as {min(table['min_ess_bulk'].min(), table['min_ess_tail'].min()):.0f} "
                f"(< {ESS_MIN_PER_CHAIN * chains}: {ESS_MIN_PER_CHAIN} per chain)"
            )
        if divergences:
            problems.append(f"{divergences} divergent transitions")
        if problems:
            warnings.warn("sampling diagnostics: " + "; ".join(problems), SamplingWarning, stacklevel=3)
    return table


@dataclass(frozen=True, eq=False)
class BayesResult:
    """Posterior of a linear or generalized linear mixed model (``design.family`` None for the linear one).

    Attributes
    ----------
    idata : arviz.InferenceData
        posterior, sample_stats (NUTS runs), log_likelihood, observed_data.
    design : Design
    priors : Priors
    method : str
        ``"collapsed"``, ``"full"``, or ``"exact"`` (variance parameters held: independent draws).
    level : float
        Coverage of the ``lower``/``upper`` columns of the summary tables.
    """

    idata: az.InferenceData
    design: Design
    priors: Priors
    method: str
    level: float
    held: object | None = None  # HeldVariance when the variance parameters were held fixed
    held_varcorr: pd.DataFrame | None = None  # the closed-form fit's varcorr they came from
    series: tuple | None = None  # an AR(1) model's (structure, series_ends, each fitted row's series label):
    # predictions carry residuals forward

    # --- draws ---------------------------------------------------------------------------
    def _values(self, name: str) -> np.ndarray:
        return np.asarray(self.idata.posterior[name].values)

    def term_draws(self, j: int) -> np.ndarray:
        """Draws of term j's random effects, shape (chain, draw, ell_j, k_j)."""
        return slot_effect_draws(self._values, term_slots(self.design)[0][j])

    @property
    def divergences(self) -> int:
        """Divergent NUTS transitions over all chains (0 for exact draws, which have no sampler statistics)."""
        return int(self.idata.sample_stats["diverging"].values.sum()) if "sample_stats" in self.idata else 0

    def ranef_draws(self) -> np.ndarray:
        """Draws of every random effect, shape (chain, draw, rows), in :attr:`ranef`'s row order."""
        return np.concatenate(
            [self.term_draws(j)[..., i] for j, term in enumerate(self.design.terms) for i in range(term.k)], axis=-1
        )

    @property
    def beta_draws(self) -> np.ndarray:
        return self._values("beta")

    @property
    def sigma_draws(self) -> np.ndarray | None:
        """Residual sd per draw (chain, draw); None with known residual sds."""
        if "sigma" in self.idata.posterior:
            return self._values("sigma")
        if self.held is not None and not self.design.sigma_known and self.design.family is None:
            return np.full(self.beta_draws.shape[:2], float(self.held.sigma))
        return None

    @property
    def shape_draws(self) -> np.ndarray | None:
        """A negative binomial's shape per draw (chain, draw); None for every other model."""
        if "shape" in self.idata.posterior:
            return self._values("shape")
        if self.held is not None and self.held.shape is not None:
            return np.full(self.beta_draws.shape[:2], float(self.held.shape))
        return None

    @property
    def phi_draws(self) -> np.ndarray | None:
        """An AR(1) correlation's phi, shape (chain, draw); None without a correlation."""
        return self._values("phi") if "phi" in self.idata.posterior else None

    @cached_property
    def correlation(self) -> pd.DataFrame | None:
        """An AR(1) correlation's phi: mean, sd, lower, upper, mcse_mean, ess_bulk, r_hat (None without one)."""
        return None if self.phi_draws is None else self._scalar_summary("phi", self.phi_draws)

    @cached_property
    def heritability(self) -> pd.DataFrame | None:
        """An animal model's h^2 (``hp.bayes(..., relmat=)``): mean, sd, lower, upper, mcse_mean, ess_bulk, r_hat
        (None for other models)."""
        if "heritability" not in self.idata.posterior:
            return None
        return self._scalar_summary("heritability", self._values("heritability"))

    def _scalar_summary(self, name: str, draws: np.ndarray) -> pd.DataFrame:
        """One parameter's posterior summary (draws (chain, draw)) as a one-row table named ``name``."""
        return pd.DataFrame(summarize_draws(draws[..., None], self.level),
                            index=pd.Index([name], name="parameter"))[SUMMARY_COLUMNS]

    def term_covariance_draws(self, j: int) -> np.ndarray:
        """Sigma_j per draw, shape (chain, draw, k_j, k_j)."""
        return slot_covariance_draws(self._values, term_slots(self.design)[0][j], self.design.terms[j].k,
                                     self.beta_draws.shape[:2],
                                     None if self.held is None else self.held.cov_factors[j])

    # --- tables --------------------------------------------------------------------------
    @cached_property
    def fixef(self) -> pd.DataFrame:
        """Fixed effects: mean, sd, lower, upper, mcse_mean, ess_bulk, r_hat, indexed by term."""
        stats = summarize_draws(self.beta_draws, self.level)
        return pd.DataFrame(stats, index=pd.Index(list(self.design.fixed_names), name="term"))[SUMMARY_COLUMNS]

    @cached_property
    def ranef(self) -> pd.DataFrame:
        """Random effects as lme4's ``ranef`` rows (grpvar, term, grp) with posterior summaries."""
        keys = pd.concat(
            [pd.DataFrame({"grpvar": term.group, "term": coef, "grp": term.levels})
             for term in self.design.terms for coef in term.coef_names],
            ignore_index=True,
        )
        stats = summarize_draws(self.ranef_draws(), self.level)
        return pd.concat([keys, pd.DataFrame(stats)[SUMMARY_COLUMNS]], axis=1)

    @cached_property
    def varcorr(self) -> pd.DataFrame:
        """Random-effect sds, correlations and the residual sd with posterior summaries.

        Rows as lme4's ``as.data.frame(VarCorr(fit))`` (grp, var1, var2); the summary
        columns describe the sd (var2 empty) or the correlation (var2 set).  With held
        variance parameters: their values, sd 0.
        """
        if self.held is not None:
            frame = self.held_varcorr[["grp", "var1", "var2"]].copy()
            frame["mean"] = self.held_varcorr["sdcor"].to_numpy()
            for column in SUMMARY_COLUMNS[1:]:
                frame[column] = 0.0 if column == "sd" else np.nan
            return frame
        keys, draws = self._varcorr_keys_and_draws()
        stats = summarize_draws(draws, self.level)
        return pd.concat([keys, pd.DataFrame(stats)[SUMMARY_COLUMNS]], axis=1)

    def varcorr_draws(self) -> np.ndarray:
        """Draws of the ``varcorr`` rows (sds, correlations, residual sd), shape (chain, draw, rows).

        Columns in the order of :attr:`varcorr`'s rows; not available with held variance parameters.
        """
        if self.held is not None:
            raise ArgumentError("the variance parameters were held fixed: they have no draws")
        return self._varcorr_keys_and_draws()[1]

    def _varcorr_keys_and_draws(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The varcorr rows' keys (grp, var1, var2) and their sdcor draws, by the closed form's table builder.

        Each draw's sds and correlations go in as they were sampled (``form="sdcor"``).
        """
        terms = []
        for term, slot in zip(self.design.terms, term_slots(self.design)[0]):
            sd = self._values(f"sd_{slot.name}")[..., list(slot.coef_positions)]
            sdcor = self._values(slot.cor_name).copy() if slot.cor_name else np.zeros(sd.shape + (term.k,))
            for i in range(term.k):
                sdcor[..., i, i] = sd[..., i]
            terms.append((term.group, term.coef_names, sdcor))
        sigma = self._values("sigma") if "sigma" in self.idata.posterior else None
        table = varcorr_table(terms, sigma, form="sdcor")
        shape = self.beta_draws.shape[:2]
        rows = len(table) // int(np.prod(shape))
        keys, draws = table.iloc[:rows][["grp", "var1", "var2"]], table["sdcor"].to_numpy().reshape(shape + (rows,))
        if self.phi_draws is not None:  # an AR(1) correlation's phi: a last row, as the closed form's varcorr has it
            keys = pd.concat([keys, pd.DataFrame({"grp": ["Residual"], "var1": ["phi"], "var2": [None]})],
                             ignore_index=True)
            draws = np.concatenate([draws, self.phi_draws[..., None]], axis=-1)
        return keys, draws

    # --- predictions ---------------------------------------------------------------------
    def predict(
        self, newdata: pd.DataFrame | None = None, kind: str = "mean", level: float = 0.95, seed: int = 0,
        type: str | None = None, trials=None,
    ) -> pd.DataFrame:
        """Posterior (``kind="mean"``) or posterior predictive (``"predictive"``) summaries per row.

        For each draw: eta = offset + x beta + sum_j z_j b_j[level]; a level never seen in
        fitting gets b drawn from N(0, Sigma_j) of that draw (a new group from the
        population), once per draw for all of its rows (brms's ``sample_new_levels = "gaussian"``).
        A linear mixed model's ``"predictive"`` adds N(0, sigma^2) noise (with known residual
        sds, the ``se`` column of ``newdata``, or the fitted rows' se).  The pieces are
        :mod:`hierpool.bayesian.prediction`'s.

        With AR(1) residuals a new row of a fitted series, after its last fitted row, also carries that row's
        residual forward in each draw: + phi^lag (y_last - fitted_last), and its predictive noise has sd
        sigma sqrt(1 - phi^(2 lag)) (lags as the closed form's,
        :func:`hierpool.closedform.ar1.carried_lags`).

        A generalized linear mixed model's ``kind="mean"`` summarizes eta (``type="link"``)
        or the mean mu = g^-1(eta) (``type="response"``: a probability, or a count's
        expected value); ``kind="predictive"`` draws a new response from the family at
        each draw's mu (and shape): the binomial's as the proportion of successes out of
        the row's trials, as the model reads its response; it is on the response scale only.

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Rows to predict; the fitted rows when None.
        kind : {"mean", "predictive"}
        level : float
        seed : int
            Seeds the new levels' effects and the predictive draws.
        type : {"link", "response"}, optional
            The scale of a GLMM's predictions; None: ``"link"`` for ``kind="mean"``,
            ``"response"`` for ``"predictive"``.  A linear mixed model's link is the
            identity, so both are the same.
        trials : array-like, optional
            A binomial model's trials of each row of ``newdata``, for ``kind="predictive"``
            (default: the fitted rows' trials when ``newdata`` is None; one per row for a
            model fitted with one trial per row).

        Returns
        -------
        pandas.DataFrame
            mean, sd, lower, upper (equal-tailed, ``level``).
        """
        check_arguments(self.design, kind, type, trials, level)
        rng = np.random.default_rng(seed_argument(seed))
        X, terms, offset = model_rows(self.design, newdata)
        beta = self.beta_draws.reshape(-1, self.design.p)

        def flat(draws):  # (chain, draw, ...) -> (draws, ...)
            return draws.reshape((-1,) + draws.shape[2:])

        eta = offset + beta @ X.T + term_effect_draws(terms, unseen_levels(self.design, newdata, terms),
                                                      lambda j: flat(self.term_draws(j)),
                                                      lambda j: flat(self.term_covariance_draws(j)), rng)
        carry = None
        if self.series is not None and newdata is not None:
            carry = self._carried(newdata)
            eta = eta + carry[0]
        # given the carried residual, what is left of a row's AR(1) noise
        factor = None if carry is None else np.sqrt(1.0 - carry[1] ** 2)
        draws = on_scale(self.design, eta, kind, type, newdata, trials, rng, self.shape_draws, self.sigma_draws,
                         factor)
        return summary_table(draws, level, row_labels(self.design, newdata))

    def _carried(self, newdata: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(the carried residual phi^lag (y_last - fitted_last), c = phi^lag), each (draws, new rows); 0 where a
        row carries nothing."""
        from ..closedform.ar1 import carried_lags, warn_fitted_rows_carried

        structure, ends, fitted_series = self.series
        lag, last = carried_lags(structure, ends, newdata)
        warn_fitted_rows_carried(structure, self.design, fitted_series, newdata, last)
        phi = self.phi_draws.reshape(-1)
        c = np.asarray(carried(phi[:, None], last[None, :], np.asarray(lag, dtype=float)[None, :]))
        rows = np.maximum(last, 0)
        design = self.design
        draws = self.beta_draws.reshape(1, -1, design.p)  # one "chain" of every draw: linear_predictor_draws' axes
        effects = [b.reshape((1, -1) + b.shape[2:]) for b in (self.term_draws(j) for j in range(len(design.terms)))]
        fitted = linear_predictor_draws(design, draws, effects)[0][:, rows]
        return c * (design.y[rows][None, :] - fitted), c

    # --- diagnostics ---------------------------------------------------------------------
    def diagnostics(self, warn: bool = True) -> pd.DataFrame:
        """Worst R-hat and bulk/tail ESS per variable, and divergent transitions (:func:`posterior_diagnostics`)."""
        return posterior_diagnostics(self.idata, warn)

    def summary(self) -> str:
        """A printed summary: fixed effects, variance components, sampler diagnostics."""
        family = self.design.family
        model = "linear" if family is None else f"generalized linear ({family.name}, {family.link} link)"
        lines = [
            f"Bayesian {model} mixed model ({self.method} sampler): {self.design.spec.formula}",
            f"Data: {self.design.n} observations; "
            + ", ".join(f"{t.group}: {t.n_levels} levels" for t in self.design.terms),
            f"Draws: {self.idata.posterior.sizes['chain']} chains x {self.idata.posterior.sizes['draw']}; "
            f"intervals: {self.level:.0%} equal-tailed",
            "",
            "Fixed effects:",
            self.fixef.to_string(float_format=lambda v: f"{v:.4g}"),
            "",
            "Random-effect sds, correlations and residual sd:" if family is None
            else "Random-effect sds and correlations:",
            self.varcorr.fillna("").to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
        if "shape" in self.idata.posterior:
            table = self._scalar_summary("shape", self.shape_draws)
            lines += ["", "Negative binomial shape (variance mu + mu^2 / shape):",
                      table.to_string(float_format=lambda v: f"{v:.4g}")]
        if "sample_stats" in self.idata:
            lines += ["", f"Divergent transitions: {int(self.idata.sample_stats['diverging'].values.sum())}"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


__all__ = ["BayesResult", "SamplingWarning"]
