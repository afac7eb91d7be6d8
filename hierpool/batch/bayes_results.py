"""Results of ``hp.bayes_batch``: hp.bayes's summary tables for every dataset, long, with a dataset column."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..algebra.varcorr import coef_pairs, varcorr_table
from ..bayesian.results import ESS_MIN_PER_CHAIN, R_HAT_MAX, SUMMARY_COLUMNS, SamplingWarning, summarize_draws
from ..errors import ArgumentError
from .results import dataset_column, term_parameter_names

#: The further scalar parameters a batch may sample, each summarized per dataset (BayesBatchResult.scalars).
SCALARS = ("phi", "shape")


def summarize(block: np.ndarray, level: float) -> np.ndarray:
    """(datasets, chain, draw, m) draws -> (datasets, m, len(SUMMARY_COLUMNS)): hp.bayes's summaries, all at once."""
    n_sets, chains, draws, m = block.shape
    # every dataset's quantities side by side as columns of one (chain, draw, datasets x m) array
    columns = np.moveaxis(block, 0, 2).reshape(chains, draws, n_sets * m)
    values = summarize_draws(columns, level)
    return np.stack([values[name] for name in SUMMARY_COLUMNS], axis=-1).reshape(n_sets, m, len(SUMMARY_COLUMNS))


def summarize_blocks(out: dict, ks: tuple, level: float) -> dict:
    """Summaries of one chunk's draws: fixef (D, p, .), varcorr (D, sum_j (k_j + pairs) [+ 1], .), and per term
    ranef (D, k_j, ell_j, .).

    ``out``'s ``sd``, ``cor`` and ``b`` hold one entry per term (``cor`` None where k = 1); varcorr's rows are
    each term's sds then correlations, as hp.lmm's table, and last sigma's, where the draws have one (not with
    known residual sds).
    """
    columns = []
    for k, sd, cor in zip(ks, out["sd"], out["cor"]):
        columns += [sd[..., i] for i in range(k)]
        columns += [cor[..., i, j] for i, j in coef_pairs(k)]
    if "sigma" in out:
        columns.append(out["sigma"])
    ranef = []
    for b in out["b"]:  # (D, chain, draw, ell, k)
        n_sets, chains, draws, ell, k = b.shape
        by_coefficient = np.swapaxes(b, 3, 4).reshape(n_sets, chains, draws, k * ell)
        ranef.append(summarize(by_coefficient, level).reshape(n_sets, k, ell, len(SUMMARY_COLUMNS)))
    summary = {"fixef": summarize(out["beta"], level), "varcorr": summarize(np.stack(columns, axis=-1), level),
               "ranef": ranef}
    for name in SCALARS:  # an AR(1) correlation's phi, a negative binomial's shape
        if name in out:
            summary[name] = summarize(out[name][..., None], level)[:, 0]
    return summary


#: :attr:`BayesBatchResult.diagnostics`' columns (``method``: a GLMM batch's only), which a batch's ``by`` may not
#: name: ``to_frame`` puts them beside the labels' column.
DIAGNOSTICS_COLUMNS = ("divergences", "max_r_hat", "min_ess_bulk", "ok", "method", "message")


@dataclass(frozen=True)
class BayesBatchTerm:
    """One random-effect term's posterior summaries over a batch.

    Attributes
    ----------
    group : str
    coef_names : tuple of str
    levels : list of ndarray
        Each dataset's level labels of this term.
    ranef_summary : list of (k, ell_d, 7) ndarrays
        Each dataset's random-effect summaries (NaN where it was not sampled).
    """

    group: str
    coef_names: tuple
    levels: list
    ranef_summary: list


@dataclass(frozen=True)
class BayesBatchResult:
    """Posterior summaries of one model fitted to many datasets (``hp.bayes_batch``).

    Attributes
    ----------
    datasets : pandas.Index
    fixed_names : tuple of str
    terms : tuple of BayesBatchTerm
        The random-effect terms, in the model's order: group, coefficients, each dataset's levels and
        random-effect summaries.
    fixef_summary : (B, p, 7) ndarray
    varcorr_summary : (B, sum_j (k_j + k_j(k_j-1)/2) + 1, 7) ndarray
        Each term's sds and correlations, then the residual sd (none with ``sigma_known``).
    divergences : (B,) ndarray of int
    messages : list of str
        Why a dataset was not sampled ("" when it was).
    chains, draws_per_chain : int
    level : float
    draws : dict or None
        With ``keep_draws=True``: per dataset label, the draws ``beta`` (chain, draw, p),
        ``b`` (chain, draw, ell, k), ``sd``, ``cor`` (k > 1) and ``sigma`` (not with ``sigma_known``);
        with several terms ``b``, ``sd`` and ``cor`` are lists, one entry per term (``cor`` None where k = 1); with
        an AR(1) correlation ``phi`` (chain, draw) too, with a negative binomial ``shape``.
    sigma_known : bool
        The residual sds are known (``se=``): sigma is 1, not sampled, and ``varcorr`` has no
        ``Residual`` rows, as ``hp.bayes``'s.
    scalars : dict
        Per-dataset summaries (B, 7) of the model's further scalar parameters, by name: an AR(1) correlation's
        ``phi`` (``correlation=``), a negative binomial's ``shape``, an animal model's ``heritability``
        (``relmat=``).
    hyperparameter_names : tuple of str or None
        A spatial batch's (``car()`` terms): the names of ``hp.bayes``'s ``hyperparameters()`` rows, whose
        summaries ``varcorr_summary`` then holds (:attr:`hyperparameters`); such a batch has no ``varcorr``,
        as its single posterior has none.  The spatial terms come first in ``terms``, their coefficient the
        term's label.
    methods : tuple of str or None
        A GLMM batch's sampler per dataset, as ``hp.bayes``'s ``method``: ``"independence"`` (its independence
        sampler, one scalar term) or ``"full"`` (NUTS on every parameter); "" where a dataset was not sampled.
        None for the other models (one sampler for every dataset).
    """

    datasets: pd.Index
    fixed_names: tuple
    terms: tuple
    fixef_summary: np.ndarray
    varcorr_summary: np.ndarray
    divergences: np.ndarray
    messages: list
    chains: int
    draws_per_chain: int
    level: float
    draws: dict | None = None
    sigma_known: bool = False
    scalars: dict = field(default_factory=dict)
    hyperparameter_names: tuple | None = None
    methods: tuple | None = None

    def _only_term(self, name: str) -> BayesBatchTerm:
        if len(self.terms) != 1:
            groups = ", ".join(t.group for t in self.terms)
            raise AttributeError(f"{name}: this model has {len(self.terms)} random-effect terms ({groups}); "
                                 f"read it from result.terms[j]")
        return self.terms[0]

    @property
    def group(self) -> str:
        """The grouping factor of a one-term model (several terms: ``terms[j].group``)."""
        return self._only_term("group").group

    @property
    def coef_names(self) -> tuple:
        """The coefficients of a one-term model's term (several terms: ``terms[j].coef_names``)."""
        return self._only_term("coef_names").coef_names

    @property
    def levels(self) -> list:
        """Each dataset's level labels of a one-term model (several terms: ``terms[j].levels``)."""
        return self._only_term("levels").levels

    @property
    def ranef_summary(self) -> list:
        """Each dataset's (k, ell, 7) random-effect summaries of a one-term model (several: ``terms[j]``)."""
        return self._only_term("ranef_summary").ranef_summary

    def _long(self, keys: pd.DataFrame, summaries: np.ndarray) -> pd.DataFrame:
        return pd.concat([keys.reset_index(drop=True), pd.DataFrame(summaries, columns=SUMMARY_COLUMNS)], axis=1)

    @property
    def fixef(self) -> pd.DataFrame:
        """Fixed effects: one row per dataset and term, hp.bayes's summary columns."""
        p = len(self.fixed_names)
        keys = pd.DataFrame({dataset_column(self.datasets): np.repeat(np.asarray(self.datasets), p),
                             "term": np.tile(np.asarray(self.fixed_names, dtype=object), len(self.datasets))})
        return self._long(keys, self.fixef_summary.reshape(-1, len(SUMMARY_COLUMNS)))

    @property
    def varcorr(self) -> pd.DataFrame:
        """sds, correlations and the residual sd per dataset (grp, var1, var2 as hp.bayes's varcorr).

        No ``Residual`` rows with known residual sds (``sigma_known``), as hp.bayes's.
        """
        if self.hyperparameter_names is not None:
            raise ArgumentError("a spatial batch (car() terms) has no varcorr table, as hp.bayes's spatial posterior "
                                "has none: its parameters are result.hyperparameters")
        # the rows of hp.lmm's table (varcorr_table) for one dataset; the values are the summaries
        sigma = None if self.sigma_known else np.nan
        template = varcorr_table([(t.group, t.coef_names, np.full((len(t.coef_names),) * 2, np.nan))
                                  for t in self.terms], sigma)
        template = template[["grp", "var1", "var2"]]
        values = self.varcorr_summary
        if "phi" in self.scalars:  # hp.bayes's row of an AR(1) correlation's phi
            template = pd.concat([template, pd.DataFrame({"grp": ["Residual"], "var1": ["phi"], "var2": [None]})],
                                 ignore_index=True)
            values = np.concatenate([values, self.scalars["phi"][:, None]], axis=1)
        keys = pd.concat([template] * len(self.datasets), ignore_index=True)
        keys.insert(0, dataset_column(self.datasets), np.repeat(np.asarray(self.datasets), len(template)))
        return self._long(keys, values.reshape(-1, len(SUMMARY_COLUMNS)))

    @property
    def ranef(self) -> pd.DataFrame:
        """Random effects per dataset, as hp.bayes's ranef (grpvar, term, grp), with a dataset column: each
        dataset's rows term by term, coefficient by coefficient."""
        keys, values, position = [], [], []
        for term in self.terms:  # vectorized per term; then each dataset's rows gathered, terms in order
            k = len(term.coef_names)
            counts = np.array([len(levels) for levels in term.levels])
            keys.append(pd.DataFrame({
                dataset_column(self.datasets): np.repeat(np.asarray(self.datasets), counts * k),
                "grpvar": term.group,
                "term": np.concatenate([np.repeat(np.asarray(term.coef_names, dtype=object), n) for n in counts]),
                "grp": np.concatenate([np.tile(np.asarray(levels, dtype=object), k) for levels in term.levels]),
            }))
            values.append(np.concatenate([summary.reshape(-1, len(SUMMARY_COLUMNS)) for summary in term.ranef_summary]))
            position.append(np.repeat(np.arange(len(self.datasets)), counts * k))
        order = np.argsort(np.concatenate(position), kind="stable")
        return self._long(pd.concat(keys, ignore_index=True).iloc[order], np.concatenate(values)[order])

    @property
    def hyperparameters(self) -> pd.DataFrame | None:
        """A spatial batch's parameters per dataset (``hp.bayes``'s ``hyperparameters()`` rows: sd, rho or alpha,
        the ``(lhs | g)`` terms' sds and correlations, sigma or shape) with the summary columns; None for other
        models."""
        if self.hyperparameter_names is None:
            return None
        names = self.hyperparameter_names
        keys = pd.DataFrame({dataset_column(self.datasets): np.repeat(np.asarray(self.datasets), len(names)),
                             "parameter": np.tile(np.asarray(names, dtype=object), len(self.datasets))})
        return self._long(keys, self.varcorr_summary.reshape(-1, len(SUMMARY_COLUMNS)))

    @property
    def heritability(self) -> pd.DataFrame | None:
        """An animal model's h^2 per dataset (``relmat=``; hp.bayes's summary columns); None for other models."""
        return self._scalar("heritability")

    @property
    def phi(self) -> pd.DataFrame | None:
        """An AR(1) correlation's phi per dataset (hp.bayes's summary columns); None without one."""
        return self._scalar("phi")

    @property
    def shape(self) -> pd.DataFrame | None:
        """A negative binomial's shape per dataset (hp.bayes's summary columns); None for other models."""
        return self._scalar("shape")

    def _scalar(self, name: str) -> pd.DataFrame | None:
        if name not in self.scalars:
            return None
        return pd.DataFrame(self.scalars[name], columns=SUMMARY_COLUMNS, index=self.datasets)

    @property
    def diagnostics(self) -> pd.DataFrame:
        """Per dataset: divergent transitions, the worst R-hat and bulk ESS over all its quantities, and ``ok``
        (and a GLMM batch's ``method``: :attr:`methods`)."""
        r_hat_at, ess_at = SUMMARY_COLUMNS.index("r_hat"), SUMMARY_COLUMNS.index("ess_bulk")
        worst_r_hat, least_ess = [], []
        for d, (fixef, varcorr) in enumerate(zip(self.fixef_summary, self.varcorr_summary)):
            ranef = [t.ranef_summary[d].reshape(-1, len(SUMMARY_COLUMNS)) for t in self.terms]
            scalars = [summary[d][None] for summary in self.scalars.values()]
            every = np.concatenate([fixef, varcorr, *ranef, *scalars])
            sampled = np.isfinite(every[:, ess_at]).any()
            r_hats = every[:, r_hat_at][np.isfinite(every[:, r_hat_at])]  # (none with one chain: hp.bayes skips it)
            worst_r_hat.append(r_hats.max() if sampled and r_hats.size else np.nan)
            least_ess.append(np.nanmin(every[:, ess_at]) if sampled else np.nan)
        frame = pd.DataFrame({"divergences": self.divergences, "max_r_hat": worst_r_hat, "min_ess_bulk": least_ess,
                              "message": self.messages}, index=self.datasets)
        if self.methods is not None:  # a GLMM batch's sampler per dataset (hp.bayes's method)
            frame.insert(3, "method", list(self.methods))
        ess_min = ESS_MIN_PER_CHAIN * self.chains
        # one chain has no R-hat (between-chain variance): judged on its divergences and ESS, as hp.bayes judges it
        r_hat_ok = (frame.max_r_hat < R_HAT_MAX) | (self.chains == 1)
        frame.insert(3, "ok", (frame.divergences == 0) & r_hat_ok & (frame.min_ess_bulk > ess_min))
        return frame

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per dataset, as :meth:`hierpool.batch.results.BatchResult.to_frame`'s: its label (a column
        named as ``by``), :attr:`diagnostics`' columns, then each parameter's posterior mean under its name and the
        ends of its ``level`` credible interval as ``<name>_lower`` and ``<name>_upper``.

        The parameters: the fixed effects, each term's sds and correlations (named by
        :func:`~hierpool.batch.results.term_parameter_names`, as the batch's and ``hp.bootstrap``'s), ``sigma`` (none
        with ``sigma_known``), then ``phi``, ``shape`` or ``heritability`` where sampled; a spatial batch's
        :attr:`hyperparameters` under their names instead of the terms'.  A simulation study's power is then the
        share of rows whose interval excludes a value: ``((t.x_lower > 0) | (t.x_upper < 0)).mean()``.

        Returns
        -------
        pandas.DataFrame
            One row per dataset (NaN parameters where a dataset was not sampled; its ``message`` says why).
        """
        names = list(self.fixed_names)
        if self.hyperparameter_names is not None:
            names += list(self.hyperparameter_names)
        else:
            for term in self.terms:
                sds, cors = term_parameter_names(term.group, term.coef_names)
                names += sds + cors
            if not self.sigma_known:
                names.append("sigma")
        blocks = [self.fixef_summary, self.varcorr_summary]
        for name, summary in self.scalars.items():
            names.append(name)
            blocks.append(summary[:, None, :])
        values = np.concatenate(blocks, axis=1)  # (datasets, parameters, summary columns)
        table = self.diagnostics
        first = [dataset_column(self.datasets), *table.columns]
        columns = [column for name in names for column in (name, f"{name}_lower", f"{name}_upper")]
        clash = sorted({column for column in columns if column in first or columns.count(column) > 1})
        if clash:
            raise ArgumentError(f"to_frame: the parameter column(s) {clash} would share a name with another column of "
                                "the table; rename the data's column")
        at = [SUMMARY_COLUMNS.index(column) for column in ("mean", "lower", "upper")]
        frame = pd.DataFrame({first[0]: self.datasets,
                              **{column: table[column].to_numpy() for column in table.columns}})
        parameters = pd.DataFrame(values[:, :, at].reshape(len(self.datasets), -1), columns=columns)
        return pd.concat([frame, parameters], axis=1)

    def warn_diagnostics(self) -> BayesBatchResult:
        """Warn (:class:`~hierpool.errors.SamplingWarning`), as ``hp.bayes`` warns of its own fit, where sampled
        datasets are not ``ok`` in :attr:`diagnostics`, counting them; the result itself."""
        table = self.diagnostics
        sampled = table["message"] == ""
        bad = sampled & ~table["ok"]
        if bad.any():
            warnings.warn(f"sampling diagnostics: {int(bad.sum())} of {int(sampled.sum())} sampled datasets are not "
                          "ok (divergent transitions, R-hat or bulk ESS: result.diagnostics)", SamplingWarning,
                          stacklevel=3)
        return self

    def __repr__(self) -> str:
        failed = sum(bool(m) for m in self.messages)
        return (f"BayesBatchResult: {len(self.datasets)} datasets x {self.chains} chains x {self.draws_per_chain} "
                f"draws; {failed} not sampled, {int((self.divergences > 0).sum())} with divergences")
