"""Results of a batch fit: one row per dataset, long tables with a ``dataset`` column."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..algebra.varcorr import coef_pairs, varcorr_table


@dataclass(frozen=True)
class BatchResult:
    """Per-dataset fits of one model (``hp.fit_batch``).

    Attributes
    ----------
    datasets : pandas.Index
        The dataset labels, in result order.
    fixed_names, coef_names : tuple of str
    group : str
        The grouping factor.
    theta : (B, m) ndarray
        lme4's theta per dataset (NaN where the fit failed).
    objective : pandas.Series
        REML criterion (or -2 log-likelihood) per dataset.
    converged : pandas.Series of bool
        Whether the dataset's optimizer converged: the batched one's, or, where
        ``refit`` is True, ``hp.lmm``'s.
    refit : pandas.Series of bool
        True where the batched optimizer did not converge and the row holds a
        refit by ``hp.lmm`` (``polish=True``) instead of the batched results.
        ``refit.any()`` says the batched optimizer failed somewhere even when
        ``converged.all()``.
    is_singular : pandas.Series of bool
    messages : pandas.Series of str
        Why a dataset failed or was refitted; empty when all went well.
    beta, beta_se : (B, p) ndarrays
    sigma : (B,) ndarray
        The residual sd per dataset (NaN where the fit failed).  With known residual
        sds (``sigma_known``) it is not estimated: 1 for every fitted dataset, as
        ``hp.lmm(..., se=)``'s ``sigma``.
    covariance : (B, k, k) ndarray
        The random-effect covariance Sigma per dataset.
    levels : list of ndarray
        Each dataset's level labels.
    b, cond_sd : list of (ell_d, k) ndarrays
        BLUPs and lme4's conditional sds per dataset.
    reml : bool
    sigma_known : bool
        The residual sds are known (``se=``): ``varcorr`` has no ``Residual`` rows and
        ``to_frame()`` no ``sigma`` column, as ``hp.lmm``'s ``varcorr`` has no ``Residual`` row.
    """

    datasets: pd.Index
    fixed_names: tuple[str, ...]
    coef_names: tuple[str, ...]
    group: str
    theta: np.ndarray
    objective: pd.Series
    converged: pd.Series
    refit: pd.Series
    is_singular: pd.Series
    messages: pd.Series
    beta: np.ndarray
    beta_se: np.ndarray
    sigma: np.ndarray
    covariance: np.ndarray
    levels: list
    b: list
    cond_sd: list
    reml: bool
    sigma_known: bool = False

    @property
    def fixef(self) -> pd.DataFrame:
        """Fixed effects, one row per dataset."""
        return pd.DataFrame(self.beta, index=self.datasets, columns=list(self.fixed_names))

    @property
    def fixef_se(self) -> pd.DataFrame:
        """Standard errors of the fixed effects, one row per dataset."""
        return pd.DataFrame(self.beta_se, index=self.datasets, columns=list(self.fixed_names))

    @property
    def varcorr(self) -> pd.DataFrame:
        """``as.data.frame(VarCorr(fit))`` of every dataset, with a ``dataset`` column.

        ``hp.lmm``'s table (:func:`~hierpool.algebra.varcorr.varcorr_table`) per dataset, one after
        another; ``var1`` and ``var2`` are object columns holding None where empty.  No ``Residual``
        rows with known residual sds (``sigma_known``).
        """
        sigma = None if self.sigma_known else self.sigma
        return varcorr_table([(self.group, self.coef_names, self.covariance)], sigma,
                             by=("dataset", self.datasets), object_keys=True)

    @property
    def ranef(self) -> pd.DataFrame:
        """BLUPs and conditional sds, as ``LMMResult.ranef``, with a ``dataset`` column."""
        k = len(self.coef_names)
        counts = np.array([len(levels) for levels in self.levels])
        datasets = np.repeat(np.asarray(self.datasets), counts * k)
        # per dataset: the levels of coefficient 0, then of coefficient 1, ... (hp.lmm's order)
        terms = np.concatenate([np.repeat(np.asarray(self.coef_names, dtype=object), n) for n in counts])
        groups = np.concatenate([np.tile(np.asarray(levels, dtype=object), k) for levels in self.levels])
        condval = np.concatenate([b.T.ravel() for b in self.b])
        condsd = np.concatenate([sd.T.ravel() for sd in self.cond_sd])
        return pd.DataFrame({"dataset": datasets, "grpvar": self.group, "term": terms, "grp": groups,
                             "condval": condval, "condsd": condsd})

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per dataset: status, criterion, fixed effects and their ses, sds, correlations, sigma.

        No ``sigma`` column with known residual sds (``sigma_known``): sigma is not a parameter then.
        """
        frame = pd.DataFrame({"dataset": self.datasets, "objective": self.objective.to_numpy(),
                              "converged": self.converged.to_numpy(), "refit": self.refit.to_numpy(),
                              "is_singular": self.is_singular.to_numpy(),
                              "message": self.messages.to_numpy()})
        for j, name in enumerate(self.fixed_names):
            frame[name] = self.beta[:, j]
            frame[f"se_{name}"] = self.beta_se[:, j]
        k = len(self.coef_names)
        sdcor = self.varcorr["sdcor"].to_numpy().reshape(len(self.datasets), -1)  # sds, correlations[, sigma]
        for i, name in enumerate(self.coef_names):
            frame[f"sd_{self.group}_{name}"] = sdcor[:, i]
        for n, (i, j) in enumerate(coef_pairs(k)):
            frame[f"cor_{self.group}_{self.coef_names[i]}_{self.coef_names[j]}"] = sdcor[:, k + n]
        if not self.sigma_known:
            frame["sigma"] = self.sigma
        return frame

    def __repr__(self) -> str:
        failed = int((~self.converged).sum())
        return (f"BatchResult: {len(self.datasets)} datasets, {'REML' if self.reml else 'ML'}; "
                f"{failed} not converged, {int(self.refit.sum())} refitted by hp.lmm, "
                f"{int(self.is_singular.sum())} singular")
