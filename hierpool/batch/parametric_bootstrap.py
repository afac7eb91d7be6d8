"""``hp.bootstrap(fit, n)``: the parametric bootstrap of a fitted mixed model (lme4's ``bootMer``), its replicates
fitted by ``hp.fit_batch`` (in compiled, vmapped chunks; on a CPU a small one-term batch on the host).

Each replicate is a response drawn from the fitted model (``hp.simulate``, :mod:`hierpool.closedform.simulate`: new
random effects and residuals at the estimates) on the fit's own rows (its model frame, ``Design.frame``), the
replicates handed to ``hp.fit_batch`` as responses on that one design (``responses=``,
:mod:`hierpool.batch.shared_design`), refitted by the same criterion (REML or ML; a GLMM's Laplace -2 log L); the
replicates' spread around the estimate is the estimate's sampling distribution under the model. ``confint`` gives
lme4's ``confint(fit, method = "boot")`` intervals: percentile (``boot.type = "perc"``, the default), basic, or normal (bias-corrected, the replicates' sd).

``hp.fit_batch`` fits linear mixed models with any random-effect terms (one, crossed, nested; any width), with
weights, offsets or known residual sds, or with AR(1) residuals, and GLMMs (binomial, Poisson, negative binomial) by
the Laplace approximation (other nAGQ, a relationship matrix and spatial terms dataset by dataset,
:mod:`hierpool.batch.fit_each`): the bootstrap takes every such fit.  A GLMM's simulated response gets its own
column (a binomial's proportions, with its trials as weights), whatever form the fit's response had (``cbind``,
proportions, counts).

References: Davison & Hinkley (1997), Bootstrap methods and their application, ch. 2 and 5; Bates et al. (2015),
lme4's ``bootMer`` and ``confint.merMod``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..algebra.varcorr import coef_pairs
from ..closedform.ar1 import AR1Result
from ..closedform.glmm_results import GLMMResult
from ..closedform.predict import normal_quantile
from ..closedform.relmat import RelmatResult
from ..closedform.results import LMMResult
from ..closedform.simulate import simulate
from ..closedform.spatial import SpatialFit
from ..errors import (
    ArgumentError,
    DataError,
    HierpoolWarning,
    integer_argument,
    optional_boolean_argument,
    seed_argument,
)
from ..spec.arguments import probability_argument
from ..spec.correlation import AR1
from ..spec.design import OFFSET_COLUMN, WEIGHTS_COLUMN
from .fit import fit_batch
from .plan import EveryDatasetRefused, free_name
from .results import BatchResult, check_table_names, named_columns, term_parameter_names

#: The name of the replicates' labels (the responses' columns handed to ``hp.fit_batch``).
REPLICATE_COLUMN = "(replicate)"
#: The known residual sds' column (``se=``) of the design's rows handed to ``hp.fit_batch``.
SE_COLUMN = "(se)"
#: The simulated response (a GLMM's, or one the formula computes, as Reaction - 100), and a binomial's trials (its
#: weights), on those rows: the formula names the response, so it is an identifier.
RESPONSE_COLUMN, TRIALS_COLUMN = "bootstrap_response_", "(trials)"
METHODS = ("percentile", "basic", "normal")
#: boot.ci's and lme4's names of the same intervals (``boot.type = "perc"``, ``"norm"``).
METHOD_ALIASES = {"perc": "percentile", "norm": "normal"}
#: An AR(1) fit's series and times on the replicates' frame (the model frame may lack the correlation's columns).
SERIES_GROUP, SERIES_TIME = "(series)", "(series time)"


def _series_columns(series) -> tuple[np.ndarray, np.ndarray]:
    """(series code, time) of each fitted row from the fit's series: times rebuilt from the lags along each series
    (0 at its first row), which give every row the predecessor and lag it had."""
    time = np.zeros(len(series.previous))
    for row in series.order:  # predecessors first
        if series.previous[row] >= 0:
            time[row] = time[series.previous[row]] + series.lag[row]
    return series.group_codes, time



def parameter_estimates(fit) -> pd.Series:
    """The fit's parameters named as :meth:`BatchResult.to_frame` names them (:func:`term_parameter_names`): fixed
    effects, then per term ``sd_<group>_<coef>`` and ``cor_<group>_<a>_<b>``, then ``sigma`` (a linear mixed
    model's), ``shape`` (a negative binomial's) or ``phi`` (an AR(1) correlation's); a spatial fit's fixed effects
    and its ``hyperparameters()``."""
    pairs = list(zip(fit.design.fixed_names, np.asarray(fit.fixef, dtype=float)))
    if isinstance(fit, SpatialFit):  # its parameters as named by the fit and by a spatial batch's to_frame
        pairs += list(dict(fit.hyperparameters()).items())
        return pd.Series(named_columns(pairs, "hp.bootstrap"), name="estimate", dtype=float)
    for term, cov in zip(fit.design.terms, fit.term_covariances()):
        cov = np.asarray(cov, dtype=float)
        sds = np.sqrt(np.diag(cov))
        sd_names, cor_names = term_parameter_names(term.group, term.coef_names)
        pairs += list(zip(sd_names, sds))
        for name, (i, j) in zip(cor_names, coef_pairs(term.k)):
            pairs.append((name, cov[i, j] / (sds[i] * sds[j]) if sds[i] > 0 and sds[j] > 0 else np.nan))
    if isinstance(fit, GLMMResult):
        if fit.shape is not None:  # a negative binomial's
            pairs.append(("shape", float(fit.shape)))
    elif not fit.design.sigma_known:
        pairs.append(("sigma", float(fit.sigma)))
    if isinstance(fit, AR1Result):
        pairs.append(("phi", float(fit.phi)))
    # (with the fixed effects' standard errors' names, which the batch's table holds too)
    named_columns(pairs + [(f"se_{name}", None) for name in fit.design.fixed_names], "hp.bootstrap")
    return pd.Series(dict(pairs), name="estimate")


@dataclass(frozen=True, eq=False)
class BootstrapResult:
    """A parametric bootstrap (:func:`bootstrap`).

    Attributes
    ----------
    estimate : pandas.Series
        The fit's parameters (fixed effects, sds, correlations, then sigma, a negative binomial's shape or an AR(1)
        correlation's phi: :func:`parameter_estimates`).
    replicates : pandas.DataFrame
        One row per replicate, the same columns (NaN where a replicate's fit failed).
    batch : BatchResult
        The replicates' fits (``converged``, ``refit``, ``messages`` per replicate).
    level : float
    """

    estimate: pd.Series
    replicates: pd.DataFrame
    batch: BatchResult
    level: float = 0.95

    @property
    def failed(self) -> int:
        """The number of replicates whose fit failed (left out of the intervals; their rows of ``replicates`` are
        NaN, and ``batch.messages`` says why)."""
        return int(self.replicates.isna().all(axis=1).sum())

    def confint(self, level: float | None = None, method: str = "percentile") -> pd.DataFrame:
        """Bootstrap confidence intervals of every parameter: ``estimate``, ``lower``, ``upper``, the replicates'
        ``se`` (sd) and ``bias`` (mean less the estimate).

        ``percentile``: the replicates' alpha/2 and 1 - alpha/2 quantiles (lme4's ``boot.type = "perc"``; NumPy's
        linear interpolation between order statistics, where the boot package interpolates on the normal scale:
        they differ slightly at small n);
        ``basic``: 2 estimate - those quantiles, reversed; ``normal``: estimate - bias -+ z se.  lme4's names
        ``"perc"`` and ``"norm"`` are taken too.  The basic and normal intervals are reflections of the replicates
        about the estimate and are not held within a parameter's range, as the boot package's are not: an sd
        estimated near 0 can get a lower end below 0, where the percentile interval stays within the replicates.
        """
        level = self.level if level is None else float(probability_argument("level", level))
        method = METHOD_ALIASES.get(method, method) if isinstance(method, str) else method
        if method not in METHODS:
            raise ArgumentError(f"method must be one of {METHODS} (or lme4's 'perc', 'norm'), got {method!r}")
        values = self.replicates.to_numpy(dtype=float)
        tail = (1 - level) / 2
        low, high = np.nanquantile(values, tail, axis=0), np.nanquantile(values, 1 - tail, axis=0)
        estimate = self.estimate.to_numpy(dtype=float)
        se, bias = np.nanstd(values, axis=0, ddof=1), np.nanmean(values, axis=0) - estimate
        if method == "basic":
            low, high = 2 * estimate - high, 2 * estimate - low
        elif method == "normal":
            z = normal_quantile(level)
            low, high = estimate - bias - z * se, estimate - bias + z * se
        return pd.DataFrame({"estimate": estimate, "lower": low, "upper": high, "se": se, "bias": bias},
                            index=self.estimate.index)

    def __repr__(self) -> str:
        return (f"BootstrapResult: {len(self.replicates)} replicates ({self.failed} failed), level {self.level}\n"
                + self.confint().to_string(float_format=lambda v: f"{v:.4g}"))


def _most_often(messages) -> str:
    """The most frequent reason (the text before its first colon) among replicates' messages."""
    return pd.Series(messages).str.split(":").str[0].value_counts().index[0]


def bootstrap(fit, n: int = 1000, seed: int | None = None, level: float = 0.95, *, chunk_size: int | None = None,
              progress: bool | None = None) -> BootstrapResult:
    """Parametric bootstrap of a fitted mixed model (lme4's ``bootMer(fit, FUN, nsim = n)`` with
    ``use.u = FALSE``, the default ``type = "parametric"``), every replicate refitted by ``hp.fit_batch``.

    Parameters
    ----------
    fit : LMMResult, GLMMResult, SpatialFit or RelmatResult
        An ``hp.lmm`` fit (any random-effect terms; weights, offsets or known residual sds allowed; or AR(1)
        residuals, ``correlation=``, whose phi is then a parameter too; or a relationship matrix, ``relmat=``), or
        an ``hp.glmm`` fit (binomial, Poisson, negative binomial, whose shape is then a parameter too; refitted
        at its own nAGQ), or either with spatial terms (``adjacency=``: its parameters are its
        ``hyperparameters()``, refitted by the same REML or ML).
    n : int
        Replicates.
    seed : int, optional
        Seed of the simulations (``hp.simulate``, :mod:`hierpool.closedform.simulate`).
    level : float
        The intervals' level (:meth:`BootstrapResult.confint`).
    chunk_size, progress
        As :func:`hierpool.fit_batch`.

    Returns
    -------
    BootstrapResult
        ``estimate``, ``replicates``, ``confint(level, method)``, ``failed``, and the replicates' ``batch``.
        The parameters' names (``estimate``'s index, ``replicates``' columns) are ``BatchResult.to_frame``'s: the
        fixed effects as the fit names them (``Intercept``, ``period[2]``), then per random-effect term
        ``sd_<group>_<coefficient>`` and ``cor_<group>_<coefficient>_<coefficient>`` (lme4's
        ``sd_(Intercept)|Subject`` and ``cor_Days.(Intercept)|Subject``), then ``sigma`` (a linear mixed model's),
        ``shape`` (a negative binomial's, lme4's theta) or ``phi`` (an AR(1) correlation's).

    Notes
    -----
    A weighted linear mixed model's replicates have residual variance sigma^2 / w_i, the model fitted; lme4's
    ``simulate`` (and so ``bootMer``) draws them with sigma^2 whatever the weights, and holds a negative binomial's
    theta at its estimate where ``hp.bootstrap`` refits it.

    References
    ----------
    Davison & Hinkley (1997), Bootstrap methods and their application, ch. 2 and 5.
    """
    n = integer_argument("n", n, minimum=2)
    probability_argument("level", level)
    progress = optional_boolean_argument("progress", progress)
    seed = seed_argument(seed, optional=True)
    if not isinstance(fit, (LMMResult, GLMMResult, SpatialFit, RelmatResult)):
        raise ArgumentError("hp.bootstrap refits its replicates with hp.fit_batch, which takes hp.lmm fits (with "
                            "independent or AR(1) residuals, a relationship matrix or spatial terms) and hp.glmm "
                            f"fits: got {type(fit).__name__}")
    design = fit.design
    check_table_names(design.fixed_names, "hp.bootstrap")  # before any replicate is fitted
    frame, response = design.frame, design.spec.response
    spatial = isinstance(fit, SpatialFit)
    glmm_fit = design.family is not None  # hp.glmm's, with or without spatial terms
    formula = design.spec.formula
    if frame is None:
        raise ArgumentError("hp.bootstrap refits on the fit's model frame, which this fit does not keep")
    if glmm_fit or response not in frame.columns:
        # the response as the batch reads it whatever its form (cbind, proportions, counts, an expression such as
        # Reaction - 100): its own column (a name no column of the model frame has), the binomial's trials as weights
        response = free_name(RESPONSE_COLUMN, frame.columns)
        formula = f"{response} ~ {formula.split('~', 1)[1]}"
    estimate = parameter_estimates(fit)  # (its names checked before any replicate is fitted)
    # the columns made for the refits, under names no column of the model frame has (a covariate named '(trials)'
    # was overwritten, and one named '(replicate)' made every replicate one dataset)
    replicate_column, trials_column, se_column, series_group, series_time = (
        free_name(name, frame.columns) for name in (REPLICATE_COLUMN, TRIALS_COLUMN, SE_COLUMN, SERIES_GROUP,
                                                      SERIES_TIME))
    # the replicates are responses on the fit's own rows: fit_batch's responses= (one design, read once; a model it
    # has no shared path for is fitted on the long frame it builds from them)
    sims = pd.DataFrame(simulate(fit, n, seed=seed).to_numpy(), index=frame.index,
                        columns=pd.RangeIndex(n, name=replicate_column))
    design_rows = frame.copy()
    arguments = {}
    if glmm_fit:
        # the fit's quadrature (glmer's nAGQ: 0 its first stage alone)
        nAGQ = 0 if fit.stages == 1 else 1 if spatial else fit.nodes
        arguments.update(family=design.family.name, link=design.family.link, nAGQ=nAGQ)
        if design.family.name == "binomial":  # trials (times any prior weights): the design's row weights
            design_rows[trials_column] = design.row_weights
            arguments["weights"] = trials_column
        elif design.weights is not None:
            arguments["weights"] = design.weights_column or WEIGHTS_COLUMN
    elif design.sigma_known:
        design_rows[se_column] = 1.0 / np.sqrt(design.row_weights)
        arguments["se"] = se_column
    elif design.weights is not None:
        arguments["weights"] = design.weights_column or WEIGHTS_COLUMN
    if isinstance(fit, AR1Result):  # each replicate's series within it (fit_batch keys them by replicate)
        design_rows[series_group], design_rows[series_time] = _series_columns(fit.series)
        arguments["correlation"] = AR1(group=series_group, time=series_time, continuous=fit.structure.continuous)
    if design.offset_argument is not None:
        arguments["offset"] = design.offset_column or OFFSET_COLUMN
    if not glmm_fit or spatial:  # a spatial GLMM may be fitted by REML (glmmTMB's)
        arguments["reml"] = fit.reml
    if spatial:  # the fit's graphs, as built
        arguments["adjacency"] = {area.term.factor: area.graph for area in fit.sdesign.areas}
    if isinstance(fit, RelmatResult):
        arguments["relmat_inverse"] = {fit.relationship.group: fit.relationship}
    def in_users_words(text: str) -> str:  # the response column made for the refits named as the fit's response
        return text.replace(repr(response), repr(design.spec.response))

    with warnings.catch_warnings(record=True) as caught:  # (the caller's filters still apply)
        try:
            batch = fit_batch(formula, design_rows, responses=sims, chunk_size=chunk_size, progress=progress,
                              **arguments)
        except EveryDatasetRefused as error:  # (worded for datasets and the refits' response column)
            raise DataError(f"hp.bootstrap: every replicate was refused, the first as its single fit refuses it: "
                            f"{in_users_words(error.reason)}") from None

    if response != design.spec.response:
        batch = replace(batch, messages=batch.messages.map(in_users_words))
    for warning in caught:  # warned at the user's line, not fit_batch's caller inside this function
        message = warning.message
        if response != design.spec.response and repr(response) in str(message):
            message = in_users_words(str(message))
        warnings.warn(message, warning.category, stacklevel=2)
    table = batch.to_frame().set_index(replicate_column)
    missing = [name for name in estimate.index if name not in table.columns]
    if missing:  # one naming for both (parameter_estimates, BatchResult.to_frame): a mismatch is a bug, not a NaN
        raise RuntimeError(f"hp.bootstrap: the batch fits have no column(s) {missing}")
    replicates = table.loc[:, list(estimate.index)].copy()
    # a replicate whose fit failed (no criterion: refused, as a count simulated all zeros) is left out; one that did
    # not pass the convergence checks is kept, as bootMer keeps fits with convergence warnings (a singular
    # sleepstudy replicate's saddle 5e-6 below lme4's boundary fit was dropped as failed)
    failed_rows = ~np.isfinite(batch.objective.to_numpy(dtype=float))
    unchecked_rows = ~failed_rows & ~batch.converged.to_numpy()
    replicates.loc[failed_rows] = np.nan
    replicates.index.name = "replicate"
    if failed_rows.any():  # as bootMer warns "some bootstrap runs failed": the intervals are the rest's
        warnings.warn(f"hp.bootstrap: {int(failed_rows.sum())} of {n} replicates failed and are left out of the "
                      f"intervals (most often: {_most_often(batch.messages[failed_rows])!r}; result.batch.messages "
                      "has each); where they are the extreme replicates (a count simulated all zeros) the intervals "
                      "of the rest are too narrow on that side", HierpoolWarning, stacklevel=2)
    if unchecked_rows.any():
        warnings.warn(f"hp.bootstrap: {int(unchecked_rows.sum())} of {n} replicates did not pass the convergence "
                      f"checks (most often: {_most_often(batch.messages[unchecked_rows])!r}); they are kept in the "
                      "intervals, as bootMer keeps them (result.batch.converged says which)", HierpoolWarning,
                      stacklevel=2)
    return BootstrapResult(estimate=estimate, replicates=replicates, batch=batch, level=float(level))
