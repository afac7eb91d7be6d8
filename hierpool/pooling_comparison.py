"""Complete, no and partial pooling side by side, for one grouping factor.

For a grouping factor g with coefficients c (the columns of its random-effect
terms), the group-level coefficient of group j is beta_c + b_jc.  Four estimates
of it are put next to each other:

* **complete pooling**: one regression of y on the fixed-effect columns,
  ignoring the groups; every group gets beta_c.
* **no pooling**: the coefficients c estimated separately for every group (the
  fixed-effect columns outside c stay shared); NaN for a group whose own rows do
  not identify them (one reading and a random slope).
* **partial pooling, BLUP**: beta-hat_c + b-hat_jc from the REML fit, with the sd
  of its prediction error (which counts beta-hat's uncertainty too).
* **partial pooling, posterior**: mean and sd of beta_c + b_jc under ``hp.bayes``.

The BLUP is the no-pooling deviation pulled toward the population mean by the
shrinkage matrix W_j = (Sigma A_j + sigma^2 I)^-1 Sigma A_j, with
A_j = sum_i w_i z_i z_i^T over the group's rows: b-hat_j = W_j raw_j, where raw_j
is the group's least-squares deviation from the fitted population line.

Offsets and prior weights (``offset=``, ``weights=``, ``offset(expr)`` terms) are
lme4's in every method: complete and no pooling are weighted least squares of
y - offset (weights w_i, the prior weights or 1/se_i^2), the partial-pooling fits
get the same offset and weights, and the fitted values of every method
(:meth:`PoolingComparison.fitted`) add the offset back.  For a
random intercept W_j is the scalar w_j = n_j sigma_b^2 / (n_j sigma_b^2 + sigma^2)
(Gelman & Hill 2007, eq. 12.1); the table's ``weight`` is the diagonal of W_j.

References
----------
Gelman, A. & Hill, J. (2007). *Data Analysis Using Regression and
Multilevel/Hierarchical Models*, ch. 12.  Robinson, G. K. (1991). That BLUP is a
good thing. *Statistical Science* 6, 15-51.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .closedform import lmm
from .closedform.results import LMMResult
from .errors import ArgumentError, DataError
from .spec.arguments import probability_argument
from .spec.design import aliased_columns

_KINDS = ("all", "shrinkage", "caterpillar", "weight")


@dataclass(frozen=True)
class GroupTerms:
    """The random-effect terms of one grouping factor, read as one block of coefficients."""

    group: str
    indices: tuple[int, ...]  # positions in design.terms
    coef_names: tuple[str, ...]
    levels: np.ndarray
    index: np.ndarray  # level of each row
    z: np.ndarray  # (n, k) the terms' z columns side by side

    @property
    def k(self) -> int:
        return len(self.coef_names)


def group_terms(fit: LMMResult, group: str | None) -> GroupTerms:
    """Collect the terms of grouping factor ``group`` (default: the one with most levels)."""
    terms = fit.design.terms
    groups = list(dict.fromkeys(t.group for t in terms))
    chosen = groups[0] if group is None else group
    if chosen not in groups:
        raise ArgumentError(f"group={group!r} is not a grouping factor of this model (its factors: {groups})")
    indices = tuple(j for j, t in enumerate(terms) if t.group == chosen)
    first = terms[indices[0]]
    return GroupTerms(
        group=chosen,
        indices=indices,
        coef_names=tuple(c for j in indices for c in terms[j].coef_names),
        levels=np.asarray(first.levels),
        index=np.asarray(first.index),
        z=np.hstack([terms[j].z for j in indices]),
    )


def _on_coefficients(fit: LMMResult, block: GroupTerms, beta: np.ndarray) -> np.ndarray:
    """beta (..., p) read on the block's coefficients (..., k): 0 for a coefficient with no fixed effect."""
    names = list(fit.design.fixed_names)
    beta = np.asarray(beta)
    return np.stack([beta[..., names.index(c)] if c in names else np.zeros(beta.shape[:-1])
                     for c in block.coef_names], axis=-1)


def _complete_pooling_beta(fit: LMMResult) -> np.ndarray:
    """Weighted least squares of y - offset on the fixed-effect columns alone, shape (p,)."""
    root_w = np.sqrt(fit.design.row_weights)
    beta, *_ = np.linalg.lstsq(fit.design.X * root_w[:, None], fit.design.y_less_offset * root_w, rcond=None)
    return beta


def complete_pooling(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Least squares of y - offset on the fixed-effect columns alone: one coefficient vector for all groups."""
    return _on_coefficients(fit, block, _complete_pooling_beta(fit))


def no_pooling(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Per-group least-squares coefficients, shape (levels, k); NaN where a group's rows cannot identify them.

    The fixed-effect columns that are not among the group's coefficients are shared
    across groups (a fixed-effects model with group-specific c); those that the
    group columns make redundant (group-level covariates) are dropped.  Weighted
    least squares of y - offset, as the mixed model.
    """
    return _no_pooling_fit(fit, block)[0]


def _no_pooling_fit(fit: LMMResult, block: GroupTerms) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`no_pooling`'s coefficients, its fitted values per row: offset included, NaN in unidentified groups)."""
    design, ell, k = fit.design, len(block.levels), block.k
    weights = fit.design.row_weights
    identified = np.array(
        [np.linalg.matrix_rank(block.z[block.index == g]) == k for g in range(ell)], dtype=bool
    )
    rows = identified[block.index]
    shared = [i for i, name in enumerate(design.fixed_names) if name not in block.coef_names]
    # columns by level, then the block's coefficients (its terms' side by side)
    per_term = [fit.design.terms[j].dense_columns().reshape(design.n, ell, -1) for j in block.indices]
    per_group = np.concatenate(per_term, axis=2).reshape(design.n, ell * k)[:, np.repeat(identified, k)]
    other = design.X[:, shared]
    matrix = np.hstack([per_group, other])[rows]
    keep = np.ones(matrix.shape[1], dtype=bool)
    keep[aliased_columns(matrix)] = False  # group-level covariates, made redundant by the group columns
    root_w = np.sqrt(weights[rows])
    coef, *_ = np.linalg.lstsq(matrix[:, keep] * root_w[:, None], design.y_less_offset[rows] * root_w, rcond=None)
    estimates = np.full((ell, k), np.nan)
    estimates[identified] = coef[: per_group.shape[1]].reshape(-1, k)
    fitted = np.full(design.n, np.nan)
    fitted[rows] = design.offset[rows] + matrix[:, keep] @ coef
    return estimates, fitted


def group_covariance(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Sigma of the group's coefficients: block-diagonal over its terms.

    Assembled in NumPy rather than by ``scipy.linalg.block_diag``: a small fit on the host needs no
    SciPy, whose import costs more than the fit ``hierpool fit`` prints (benchmarks/RESULTS.md, "First fits").
    """
    covariances = fit.term_covariances()
    blocks = [np.atleast_2d(covariances[j]) for j in block.indices]
    ends = np.cumsum([b.shape[0] for b in blocks])
    sigma = np.zeros((ends[-1], ends[-1]))
    for b, end in zip(blocks, ends):
        sigma[end - b.shape[0] : end, end - b.shape[0] : end] = b
    return sigma


def shrinkage_matrices(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """W_j = (Sigma A_j + sigma^2 I)^-1 Sigma A_j per group, shape (levels, k, k)."""
    weights = fit.design.row_weights
    ell, k = len(block.levels), block.k
    cross = np.einsum("n,ni,nj->nij", weights, block.z, block.z)
    moments = np.zeros((ell, k, k))
    np.add.at(moments, block.index, cross)
    scaled = group_covariance(fit, block)[None] @ moments
    return np.linalg.solve(scaled + fit.sigma**2 * np.eye(k)[None], scaled)


def group_blups(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """b-hat of the group's terms side by side, shape (levels, k)."""
    return np.hstack([np.asarray(fit.solution.b[j]) for j in block.indices])


def group_coefficient_sd(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Sd of the prediction error of beta-hat_c + b-hat_jc, shape (levels, k).

    var(beta_c) + var(b_jc) + 2 cov(beta_c, b_jc), all from sigma^2 C^-1, the
    inverse mixed-model matrix (Henderson 1975); for a coefficient with no
    fixed-effect counterpart it is the joint sd of b_jc alone.
    """
    positions = {c: i for i, c in enumerate(fit.design.fixed_names)}
    vcov = fit.vcov.to_numpy()
    columns = []
    blocks = fit.prediction_error_blocks()
    for j in block.indices:
        cov_b, cov_b_beta = blocks[j]
        for i, coef in enumerate(fit.design.terms[j].coef_names):
            total = cov_b[:, i, i]
            if coef in positions:
                pos = positions[coef]
                total = total + vcov[pos, pos] + 2 * cov_b_beta[:, i, pos]
            columns.append(np.sqrt(np.maximum(total, 0.0)))
    return np.stack(columns, axis=1)


def _population(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    return _on_coefficients(fit, block, fit.fixef.to_numpy())


def _posterior_coefficients(post, block: GroupTerms, fit: LMMResult) -> np.ndarray:
    """Draws of beta_c + b_jc, shape (chains * draws, levels, k)."""
    b = np.concatenate([post.term_draws(j) for j in block.indices], axis=-1)
    b = b.reshape((-1,) + b.shape[2:])
    beta = post.beta_draws.reshape(-1, post.beta_draws.shape[-1])
    return b + _on_coefficients(fit, block, beta)[:, None, :]


def _truth_columns(data: pd.DataFrame, truth, block: GroupTerms) -> dict[str, str]:
    if truth is None:
        truth = data.attrs.get("truth")
        if truth is None:
            return {}
        # a hint carried by the data: use the columns that are still there
        truth = {c: col for c, col in truth.items() if c in block.coef_names and col in data.columns}
    if isinstance(truth, str):
        truth = {block.coef_names[0]: truth}
    if not isinstance(truth, dict):
        raise ArgumentError(f"truth must be a column name or a dict of coefficient -> column, got {type(truth).__name__}")
    for coef, column in truth.items():
        if coef not in block.coef_names:
            raise ArgumentError(f"truth names coefficient {coef!r}, which is not one of {list(block.coef_names)}")
        if column not in data.columns:
            raise DataError(f"truth column {column!r} is not in the data")
    return dict(truth)


def _group_truth(data: pd.DataFrame, fit: LMMResult, block: GroupTerms, column: str) -> np.ndarray:
    values = data.loc[fit.design.rows, column].to_numpy(float)
    per_group = pd.Series(values).groupby(block.index).agg(["min", "max"])
    if not np.allclose(per_group["min"], per_group["max"]):
        raise DataError(f"truth column {column!r} is not constant within each level of {block.group!r}")
    return per_group["min"].to_numpy()


@dataclass(frozen=True)
class PoolingComparison:
    """Complete, no and partial pooling (BLUP and posterior) for one grouping factor.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per group and coefficient: grpvar, grp, term, n, no_pooling,
        complete_pooling, blup, blup_sd, post_mean, post_sd, post_lower,
        post_upper (absent without a posterior; the interval at ``level``), weight (diagonal of the shrinkage matrix), truth (when known).
    fit : LMMResult
        The REML fit.
    posterior : BayesResult or None
    block : GroupTerms
    level : float
        Level of the intervals drawn by :meth:`plot`.
    """

    table: pd.DataFrame
    fit: LMMResult
    posterior: object
    block: GroupTerms
    level: float

    @property
    def population(self) -> pd.Series:
        """The partial-pooling population coefficients beta-hat_c (0 for a coefficient with no fixed effect)."""
        return pd.Series(_population(self.fit, self.block), index=list(self.block.coef_names))

    def fitted(self) -> pd.DataFrame:
        """Each method's fitted value of every row used in fitting, the offset included.

        Columns offset, complete_pooling (offset + X beta of the complete-pooling
        regression), no_pooling (offset + the no-pooling regression's fit; NaN in a
        group it cannot identify), blup (the REML fit's ``fitted``: offset + X beta-hat
        + Z b-hat over every term) and, with a posterior, post_mean (its posterior
        mean of offset + X beta + Z b); indexed by the data's row labels.
        """
        design = self.fit.design
        columns = {
            "offset": design.offset,
            "complete_pooling": design.offset + design.X @ _complete_pooling_beta(self.fit),
            "no_pooling": _no_pooling_fit(self.fit, self.block)[1],
            "blup": self.fit.fitted,
        }
        if self.posterior is not None:
            columns["post_mean"] = self.posterior.predict()["mean"].to_numpy()
        return pd.DataFrame(columns, index=design.rows)

    def errors(self, sparse_max: int = 2) -> pd.DataFrame:
        """Root-mean-square error of each method against the truth: all groups, n <= sparse_max, the rest.

        Groups where a method has no estimate (no pooling with too few rows) are left
        out of that method's cells; ``n_groups`` counts those used overall.
        """
        if "truth" not in self.table:
            raise ArgumentError("errors() needs the truth: pass truth= to hp.pooling or use data that carry it")
        methods = {"complete pooling": "complete_pooling", "no pooling": "no_pooling", "partial pooling (BLUP)": "blup"}
        if "post_mean" in self.table:
            methods["partial pooling (posterior mean)"] = "post_mean"
        rows = []
        for term, part in self.table.groupby("term", sort=False):
            sparse = part["n"].to_numpy() <= sparse_max
            for method, column in methods.items():
                error = part[column].to_numpy() - part["truth"].to_numpy()
                cells = {}
                for label, mask in (("all", np.ones_like(sparse)), (f"n <= {sparse_max}", sparse), (f"n > {sparse_max}", ~sparse)):
                    chosen = error[mask & np.isfinite(error)]
                    cells[label] = float(np.sqrt(np.mean(chosen**2))) if chosen.size else np.nan
                rows.append({"term": term, "method": method, **cells, "n_groups": int(np.isfinite(error).sum())})
        return pd.DataFrame(rows)

    def ridge(self, multipliers=None):
        """The penalized-regression view of this fit: see :func:`hierpool.ridge.ridge_view`."""
        from .ridge import ridge_view

        return ridge_view(self.fit, multipliers=multipliers)

    def plot(self, kind: str = "all", term: str | None = None):
        """Shrinkage, caterpillar and weight-vs-n plots (``kind="all"``), or one of them.

        Parameters
        ----------
        kind : {"all", "shrinkage", "caterpillar", "weight"}
        term : str, optional
            The coefficient to draw (default: the first, usually ``Intercept``).

        Returns
        -------
        matplotlib.figure.Figure
        """
        from . import plots

        if kind not in _KINDS:
            raise ArgumentError(f"kind must be one of {_KINDS}, got {kind!r}")
        term = self.block.coef_names[0] if term is None else term
        if term not in self.block.coef_names:
            raise ArgumentError(f"term {term!r} is not one of {list(self.block.coef_names)}")
        return plots.pooling_figure(self, kind, term)

    def __repr__(self) -> str:
        return (f"PoolingComparison({self.block.group!r}: {len(self.block.levels)} groups, "
                f"coefficients {list(self.block.coef_names)})\n{self.table.head(10).to_string()}")


def pooling(
    formula: str,
    data: pd.DataFrame,
    *,
    group: str | None = None,
    bayes: bool = True,
    truth=None,
    chains: int = 4,
    draws: int = 1000,
    tune: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    progress: bool | None = None,
    se: str | None = None,
    priors=None,
    target_accept: float = 0.8,
    weights=None,
    offset=None,
) -> PoolingComparison:
    """Put complete pooling, no pooling, the BLUP and the posterior side by side.

    Parameters
    ----------
    formula : str
        An lme4-style formula, e.g. ``"biomarker ~ 1 + (1 | patient)"`` or
        ``"biomarker ~ time + (time | patient)"``.
    data : pandas.DataFrame
    group : str, optional
        The grouping factor to compare (default: the one with most levels).
        Other random-effect terms stay in the partial-pooling fits.
    bayes : bool
        Also fit ``hp.bayes`` and report posterior means and sds (default True).
    truth : str or dict, optional
        Column(s) holding each group's true coefficient: a column name (for the
        first coefficient) or ``{coefficient: column}``.  Default: the data's
        ``attrs["truth"]`` when present (``hp.datasets.biomarker`` sets it).
    chains, draws, tune, seed, progress, priors, target_accept
        Passed to :func:`hierpool.bayes`.
    level : float
        Interval level of the plots.
    se : str, optional
        Column of known residual sds (meta-analysis), as in :func:`hierpool.lmm`.
    weights, offset : str or array-like, optional
        Prior weights and offset (column names or one value per row), as in
        :func:`hierpool.lmm`: every method fits y - offset with these weights.

    Returns
    -------
    PoolingComparison
    """
    probability_argument("level", level)
    fit = lmm(formula, data, se=se, weights=weights, offset=offset)
    block = group_terms(fit, group)
    truth_columns = _truth_columns(data, truth, block)
    ell, k = len(block.levels), block.k
    counts = np.bincount(block.index, minlength=ell)
    columns = {
        "no_pooling": no_pooling(fit, block),
        "complete_pooling": np.broadcast_to(complete_pooling(fit, block), (ell, k)),
        "blup": _population(fit, block)[None, :] + group_blups(fit, block),
        "blup_sd": group_coefficient_sd(fit, block),
    }
    posterior = None
    if bayes:
        from .bayesian import bayes as fit_bayes

        posterior = fit_bayes(formula, data, chains=chains, draws=draws, tune=tune, seed=seed, se=se, progress=progress,
                              priors=priors, target_accept=target_accept, weights=weights, offset=offset)
        coefficient_draws = _posterior_coefficients(posterior, block, fit)
        columns["post_mean"] = coefficient_draws.mean(axis=0)
        columns["post_sd"] = coefficient_draws.std(axis=0, ddof=1)
        columns["post_lower"], columns["post_upper"] = np.quantile(
            coefficient_draws, [(1 - level) / 2, (1 + level) / 2], axis=0
        )
    columns["weight"] = np.diagonal(shrinkage_matrices(fit, block), axis1=1, axis2=2)
    frames = []
    for i, coef in enumerate(block.coef_names):
        frame = pd.DataFrame({"grpvar": block.group, "grp": block.levels, "term": coef, "n": counts})
        for name, values in columns.items():
            frame[name] = np.asarray(values)[:, i]
        if coef in truth_columns:
            frame["truth"] = _group_truth(data, fit, block, truth_columns[coef])
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    return PoolingComparison(table=table, fit=fit, posterior=posterior, block=block, level=level)
