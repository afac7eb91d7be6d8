"""Complete, no and partial pooling side by side, for one grouping factor.

For a grouping factor g with coefficients c (the columns of its random-effect
terms), the group-level coefficient of group j is beta_c + b_jc, and with
group-level predictors (fixed-effect columns that are, on every group's rows, a
multiple u_jf of the coefficient's column: a covariate constant within groups for the
intercept, as county uranium in Gelman & Hill's radon model; its interaction with x
for the slope on x) beta_c + sum_f beta_f u_jf + b_jc: the population line's value
for the group, plus its deviation.  Four estimates of it are put next to each other:

* **complete pooling**: one regression of y on the fixed-effect columns,
  ignoring the groups; every group gets beta_c (+ sum_f beta_f u_jf).
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

With a GLMM (``family=``, :func:`hierpool.glmm`) every estimate is on the **link
scale** (log-odds for the logit, log rate for the log link):

* **complete pooling**: the GLM of y on the fixed-effect columns (R's ``glm``), with
  the offset and prior weights (binomial trials) of the GLMM;
* **no pooling**: the fixed-effects GLM with each group's own coefficients c and the
  other fixed-effect columns shared, by iteratively reweighted least squares.  For
  ``cbind(s, f) ~ 1 + (1 | g)`` (logit, no offset) a group's estimate is its own
  empirical logit log(S_j / (A_j - S_j)) (S_j successes in A_j trials; g(S_j / A_j)
  for another link); for a Poisson random intercept with an offset, the log rate
  log(Y_j / E_j), Y_j its events and E_j = sum a_i exp(offset_i) its exposure.  A group
  whose rows are *separated* by its own coefficients (no events, all successes, or
  zeros and events split by a slope) has no finite estimate.  When it has no events
  (or only successes) it gets the usual 0.5 correction: half a pseudo-event and, for
  the binomial, half a pseudo-non-event are added to its rows, in proportion to their
  trials (binomial) or baseline means a_i exp(offset_i + x_i beta) (log link), and its
  coefficients are fitted to those rows with the shared columns held at their
  estimate.  For a random intercept without shared columns this is the empirical
  logit log((S_j + 0.5) / (A_j - S_j + 0.5)) (Cox 1970; Haldane 1956; g((S_j + 0.5) /
  (A_j + 1)) for another link) or the log rate log((Y_j + 0.5) / E_j), applied only
  where the estimate would be infinite (other groups keep their maximum-likelihood
  estimate); a corrected group's slope is near 0 (exactly 0 without shared columns,
  for the log link or a binomial without offset: its pseudo-rows then have one rate).
  A separated group with events
  on both sides is NaN, with a :class:`~hierpool.errors.HierpoolWarning`.  The
  table's ``no_pooling_status`` says which: ``mle``, ``corrected``, ``separated``,
  ``unidentified``.  Separated groups are left out of the fixed-effects fit, as they
  contribute nothing to the shared coefficients in its limit.  A negative binomial's
  shape is held at the GLMM's estimate.
* **partial pooling**: beta-hat_c + b*_jc, the GLMM's conditional modes (``mode``),
  with ``mode_sd`` the sd of its prediction error from the penalized system at the
  mode, theta taken as known (the se of ``fit.predict(..., interval="confidence")``).
  The shrinkage matrix is the LMM's with sigma^2 = 1 and A_j = sum_i w_i z_i z_i^T
  summed with PIRLS's working weights w_i at the mode, so that b*_j = W_j raw_j with
  raw_j the group's least-squares deviation of the working response: the LMM's
  identity for the Gaussian problem that PIRLS solves at convergence.  Measured
  against the no-pooling estimate the shrinkage is approximate, as the working
  weights depend on the mode.

References
----------
Gelman, A. & Hill, J. (2007). *Data Analysis Using Regression and
Multilevel/Hierarchical Models*, ch. 12.  Robinson, G. K. (1991). That BLUP is a
good thing. *Statistical Science* 6, 15-51.  Cox, D. R. (1970). *The Analysis of
Binary Data*, sec. 3.2 (the empirical logistic transform).  Haldane, J. B. S.
(1956). The estimation and significance of the logarithm of a ratio of frequencies.
*Annals of Human Genetics* 20, 309-311.  Albert, A. & Anderson, J. A. (1984). On
the existence of maximum likelihood estimates in logistic regression models.
*Biometrika* 71, 1-10.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .algebra.conditioning import least_squares, term_transform
from .algebra.glm import IRLS_MAX_STEPS, glm_irls
from .algebra.linalg import theta_to_factors
from .algebra.separation import is_separated
from .closedform import glmm, lmm
from .closedform.glmm_results import GLMMResult
from .closedform.results import LMMResult
from .errors import (
    ArgumentError,
    ConvergenceWarning,
    DataError,
    HierpoolWarning,
    integer_argument,
    optional_boolean_argument,
)
from .spec.arguments import probability_argument
from .spec.design import aliased_columns, check_unique_index

_KINDS = ("all", "shrinkage", "caterpillar", "weight")
#: Pseudo-events (and, for the binomial, pseudo-non-events) the 0.5 correction adds to a group.
CORRECTION = 0.5


@dataclass(frozen=True)
class GroupTerms:
    """The random-effect terms of one grouping factor, read as one block of coefficients."""

    group: str
    indices: tuple[int, ...]  # positions in design.terms
    coef_names: tuple[str, ...]
    levels: np.ndarray
    index: np.ndarray  # level of each row
    z: np.ndarray  # (n, k) the terms' z columns side by side
    fixed_map: np.ndarray  # (levels, p, k): the fixed effects that make up each group's coefficients (coefficient_map)

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
    coef_names = tuple(c for j in indices for c in terms[j].coef_names)
    index, z = np.asarray(first.index), np.hstack([terms[j].z for j in indices])
    return GroupTerms(
        group=chosen,
        indices=indices,
        coef_names=coef_names,
        levels=np.asarray(first.levels),
        index=index,
        z=z,
        fixed_map=coefficient_map(fit.design.X, fit.design.fixed_names, coef_names, index, z, len(first.levels)),
    )


#: A fixed-effect column is a group-level predictor of a coefficient when, on every group's rows, it is a multiple
#: of the coefficient's column to this relative tolerance (of the column's largest entry).
GROUP_LEVEL_TOL = 1e-10


def coefficient_map(X: np.ndarray, fixed_names, coef_names, index: np.ndarray, z: np.ndarray, n_groups: int):
    """(levels, p, k): group j's coefficient c of the population line is sum_f beta_f A[j, f, c].

    A[j, f, c] is 1 for the fixed effect named as coefficient c (beta_c), and u_jf for a fixed-effect column f
    outside the coefficients that is, on every group's rows, u_jf times the coefficient's column z_c (to
    :data:`GROUP_LEVEL_TOL`): a group-level predictor, constant within groups for the intercept, its product with
    x for the slope on x.  No pooling absorbs such a column in the group's own coefficient (it is aliased with the
    group's columns there); the population line, complete pooling and the posterior add it here, so that every
    column of the table estimates the same quantity (before, the BLUP of a county with uranium u_j lacked
    gamma-hat u_j, which its own mean holds).  A column is given to the first coefficient it is a multiple of."""
    p, k = X.shape[1], z.shape[1]
    out = np.zeros((n_groups, p, k))
    names = list(fixed_names)
    for c, coef in enumerate(coef_names):
        if coef in names:
            out[:, names.index(coef), c] = 1.0
    squares = [np.bincount(index, weights=z[:, c] ** 2, minlength=n_groups) for c in range(k)]  # each group's z_c'z_c
    for f in range(p):
        column = X[:, f]
        scale = np.max(np.abs(column), initial=0.0)
        if names[f] in coef_names or scale == 0.0:
            continue
        for c in range(k):
            multiple = np.divide(np.bincount(index, weights=column * z[:, c], minlength=n_groups), squares[c],
                                 out=np.zeros(n_groups), where=squares[c] > 0)
            if np.max(np.abs(column - multiple[index] * z[:, c])) <= GROUP_LEVEL_TOL * scale:
                out[:, f, c] = multiple
                break
    return out


def _on_coefficients(fit: LMMResult, block: GroupTerms, beta: np.ndarray) -> np.ndarray:
    """beta (..., p) read on the groups' coefficients (..., levels, k) by :func:`coefficient_map`: beta_c plus the
    group-level predictors' sum_f beta_f u_jf (0 for a coefficient with no fixed effect)."""
    return np.einsum("...p,gpk->...gk", np.asarray(beta, dtype=float), block.fixed_map)


def _complete_pooling_beta(fit: LMMResult) -> np.ndarray:
    """Weighted least squares of y - offset on the fixed-effect columns alone, shape (p,)."""
    root_w = np.sqrt(fit.design.row_weights)
    return least_squares(fit.design.X * root_w[:, None], fit.design.y_less_offset * root_w)


def complete_pooling(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Least squares of y - offset on the fixed-effect columns alone, read on each group's coefficients (levels, k):
    one coefficient vector for all groups, but for group-level predictors (:func:`coefficient_map`)."""
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
    # columns by level, then the block's coefficients (its terms' side by side), each group's on z M: centred and
    # scaled (algebra.conditioning.term_transform), so that a slope on x + 3e6 is not judged aliased with its
    # group's intercept (its coefficients map back, b = M b~)
    m = term_transform(block.z)
    per_term = [fit.design.terms[j].dense_columns().reshape(design.n, ell, -1) for j in block.indices]
    per_group = np.concatenate(per_term, axis=2).reshape(design.n, ell, k) @ m
    per_group = per_group.reshape(design.n, ell * k)[:, np.repeat(identified, k)]
    other = design.X[:, shared]
    matrix = np.hstack([per_group, other])[rows]
    keep = np.ones(matrix.shape[1], dtype=bool)
    keep[aliased_columns(matrix)] = False  # group-level covariates, made redundant by the group columns
    root_w = np.sqrt(weights[rows])
    coef = least_squares(matrix[:, keep] * root_w[:, None], design.y_less_offset[rows] * root_w)
    estimates = np.full((ell, k), np.nan)
    estimates[identified] = coef[: per_group.shape[1]].reshape(-1, k) @ m.T
    fitted = np.full(design.n, np.nan)
    fitted[rows] = design.offset[rows] + matrix[:, keep] @ coef
    return estimates, fitted


def group_covariance(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Sigma of the group's coefficients: block-diagonal over its terms.

    Assembled in NumPy rather than by ``scipy.linalg.block_diag``: a small fit on the host needs no
    SciPy, whose import costs more than the fit ``hierpool fit`` prints (benchmarks/RESULTS.md, "First fits").
    """
    covariances = _term_covariances(fit)
    return _block_diagonal([np.atleast_2d(covariances[j]) for j in block.indices])


def _block_diagonal(blocks) -> np.ndarray:
    """The square ``blocks`` on one diagonal (a group's terms side by side)."""
    ends = np.cumsum([b.shape[0] for b in blocks])
    out = np.zeros((ends[-1], ends[-1]))
    for b, end in zip(blocks, ends):
        out[end - b.shape[0] : end, end - b.shape[0] : end] = b
    return out


def _term_covariances(fit) -> list[np.ndarray]:
    """Sigma_j of each random-effect term: the LMM's in data units, the GLMM's on the link scale (T_j T_j^T)."""
    if isinstance(fit, GLMMResult):
        return [np.asarray(f) @ np.asarray(f).T
                for f in theta_to_factors(np.asarray(fit.theta, dtype=float), tuple(t.k for t in fit.design.terms))]
    return fit.term_covariances()


def shrinkage_matrices(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """W_j = (Sigma A_j + sigma^2 I)^-1 Sigma A_j per group, shape (levels, k, k).

    Formed in the coordinates of the fit's algebra (:meth:`~hierpool.closedform.results.LMMResult.
    prediction_coordinates`): for a fit on conditioned columns, z~ = z M and Sigma~ = sigma^2 T~ T~^T, then
    W = M W~ M^-1 (the coefficients map as b = M b~).  On the user's columns a slope on Days + 1e5 gave A_j and
    Sigma entries that cancel (W's slope entry 11 off; garbage at 1e7)."""
    weights = fit.design.row_weights
    ell, k = len(block.levels), block.k
    _, term_maps, factors, _ = fit.prediction_coordinates()
    m = _block_diagonal([term_maps[j] for j in block.indices])
    covariance = _block_diagonal([fit.sigma**2 * factors[j] @ factors[j].T for j in block.indices])
    z = block.z @ m
    cross = np.einsum("n,ni,nj->nij", weights, z, z)
    moments = np.zeros((ell, k, k))
    np.add.at(moments, block.index, cross)
    scaled = covariance[None] @ moments
    tilde = np.linalg.solve(scaled + fit.sigma**2 * np.eye(k)[None], scaled)
    return m @ tilde @ np.linalg.inv(m)


def group_blups(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """b-hat of the group's terms side by side, shape (levels, k)."""
    return np.hstack([np.asarray(fit.solution.b[j]) for j in block.indices])


def group_coefficient_sd(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    """Sd of the prediction error of beta-hat_c + b-hat_jc, shape (levels, k).

    var(beta_c) + var(b_jc) + 2 cov(beta_c, b_jc), all from sigma^2 C^-1, the
    inverse mixed-model matrix (Henderson 1975); for a coefficient with no
    fixed-effect counterpart it is the joint sd of b_jc alone.
    """
    return _coefficient_sd(fit, block, fit.prediction_error_blocks(), fit.vcov.to_numpy())


def _coefficient_sd(fit, block: GroupTerms, blocks, vcov: np.ndarray) -> np.ndarray:
    """sqrt(var(a_j' beta) + var(b_jc) + 2 cov(a_j' beta, b_jc)) from per-term prediction-error blocks and
    cov(beta-hat), a_j the group's row of :func:`coefficient_map` (beta_c's unit vector without group-level
    predictors)."""
    columns = []
    c = 0
    for j in block.indices:
        cov_b, cov_b_beta = blocks[j]
        for i in range(len(fit.design.terms[j].coef_names)):
            a = block.fixed_map[:, :, c]  # (levels, p)
            total = (cov_b[:, i, i] + np.einsum("gp,pq,gq->g", a, vcov, a)
                     + 2 * np.einsum("gp,gp->g", cov_b_beta[:, i, :], a))
            columns.append(np.sqrt(np.maximum(total, 0.0)))
            c += 1
    return np.stack(columns, axis=1)


def _population(fit: LMMResult, block: GroupTerms) -> np.ndarray:
    return _on_coefficients(fit, block, fit.fixef.to_numpy())


def _posterior_coefficients(post, block: GroupTerms, fit: LMMResult) -> np.ndarray:
    """Draws of beta_c + b_jc, shape (chains * draws, levels, k)."""
    b = np.concatenate([post.term_draws(j) for j in block.indices], axis=-1)
    b = b.reshape((-1,) + b.shape[2:])
    beta = post.beta_draws.reshape(-1, post.beta_draws.shape[-1])
    return b + _on_coefficients(fit, block, beta)


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
        raise ArgumentError("truth must be a column name or a dict of coefficient -> column, "
                            f"got {type(truth).__name__}")
    for coef, column in truth.items():
        if coef not in block.coef_names:
            raise ArgumentError(f"truth names coefficient {coef!r}, which is not one of {list(block.coef_names)}")
        if column not in data.columns:
            raise DataError(f"truth column {column!r} is not in the data")
    return dict(truth)


def _group_truth(data: pd.DataFrame, fit: LMMResult, block: GroupTerms, column: str) -> np.ndarray:
    check_unique_index(data, "truth=")
    values = data.loc[fit.design.rows, column].to_numpy(float)
    per_group = pd.Series(values).groupby(block.index).agg(["min", "max"])
    if not np.allclose(per_group["min"], per_group["max"]):
        raise DataError(f"truth column {column!r} is not constant within each level of {block.group!r}")
    return per_group["min"].to_numpy()


# --- generalized linear mixed models: the link scale ------------------------------------------
def _fit_glm(X, y, weights, offset, family, what: str) -> np.ndarray:
    beta, converged = glm_irls(X, y, weights, offset, family)
    if not converged:
        warnings.warn(f"{what}: iteratively reweighted least squares did not converge in {IRLS_MAX_STEPS} steps",
                      ConvergenceWarning, stacklevel=3)
    return beta


def _complete_pooling_glm_beta(fit: GLMMResult) -> np.ndarray:
    """The GLM of y on the fixed-effect columns alone (offset and prior weights included), shape (p,)."""
    design = fit.design
    return _fit_glm(design.X, design.y, design.row_weights, design.offset, fit.family, "complete pooling")


@dataclass(frozen=True)
class NoPoolingGLM:
    """The no-pooling GLM of one grouping factor (see the module's docstring).

    Attributes
    ----------
    estimates : numpy.ndarray, shape (levels, k)
        Each group's own coefficients on the link scale; NaN where there are none.
    eta : numpy.ndarray, shape (n,)
        Its linear predictor on every row, offset included; NaN in groups without estimates.
    status : numpy.ndarray of str, shape (levels,)
        ``mle``, ``corrected`` (the 0.5 correction), ``separated`` or ``unidentified``.
    """

    estimates: np.ndarray
    eta: np.ndarray
    status: np.ndarray


def no_pooling_glm(fit: GLMMResult, block: GroupTerms) -> NoPoolingGLM:
    """Per-group GLM coefficients with the other fixed-effect columns shared (the fixed-effects GLM)."""
    design, family, ell, k = fit.design, fit.family, len(block.levels), block.k
    y, a = design.y, design.row_weights
    used = a > 0
    status = np.full(ell, "mle", dtype=object)
    events = np.bincount(block.index, weights=a * y, minlength=ell)
    trials = np.bincount(block.index, weights=a, minlength=ell)
    for g in range(ell):
        rows = (block.index == g) & used
        if not rows.any() or np.linalg.matrix_rank(block.z[rows]) < k:
            status[g] = "unidentified"
        elif is_separated(block.z[rows], y[rows], family.name):
            nothing = events[g] <= 0 or (family.name == "binomial" and events[g] >= trials[g])
            status[g] = "corrected" if nothing else "separated"
    included = status == "mle"
    in_fit = included[block.index]
    rows = in_fit & used
    shared = [i for i, name in enumerate(design.fixed_names) if name not in block.coef_names]
    per_term = [design.terms[j].dense_columns().reshape(design.n, ell, -1) for j in block.indices]
    per_group = np.concatenate(per_term, axis=2).reshape(design.n, ell * k)[:, np.repeat(included, k)]
    matrix = np.hstack([per_group, design.X[:, shared]])
    keep = np.ones(matrix.shape[1], dtype=bool)
    keep[aliased_columns(matrix[rows])] = False  # group-level covariates, made redundant by the group columns
    estimates = np.full((ell, k), np.nan)
    eta = np.full(design.n, np.nan)
    shared_beta = np.zeros(len(shared))
    if rows.any():
        coef = _fit_glm(matrix[rows][:, keep], y[rows], a[rows], design.offset[rows], family, "no pooling")
        full = np.zeros(matrix.shape[1])
        full[keep] = coef
        estimates[included] = full[: per_group.shape[1]].reshape(-1, k)
        shared_beta = full[per_group.shape[1]:]
        eta[in_fit] = design.offset[in_fit] + matrix[in_fit] @ full
    elif shared:
        shared_beta = np.full(len(shared), np.nan)  # no group identifies the shared columns
    baseline = design.offset + design.X[:, shared] @ shared_beta
    for g in np.flatnonzero(status == "corrected"):
        if not np.all(np.isfinite(shared_beta)):
            break
        rows = (block.index == g) & used
        estimates[g] = _corrected(block.z[rows], y[rows], a[rows], baseline[rows], family, trials[g])
        eta[block.index == g] = baseline[block.index == g] + block.z[block.index == g] @ estimates[g]
    separated = status == "separated"
    if separated.any():
        names = ", ".join(repr(str(v)) for v in block.levels[separated][:10])
        warnings.warn(f"no pooling: the rows of {block.group} {names}{' ...' if separated.sum() > 10 else ''} are "
                      f"separated by their own coefficients ({', '.join(block.coef_names)}) with events on both "
                      "sides: their maximum-likelihood estimates are infinite, and their no_pooling values NaN",
                      HierpoolWarning, stacklevel=4)
    return NoPoolingGLM(estimates=estimates, eta=eta, status=status.astype(str))


def _corrected(z, y, a, baseline, family, trials) -> np.ndarray:
    """A separated group's coefficients after the 0.5 correction, the shared part held at ``baseline``."""
    if family.name == "binomial":
        # half a success and half a failure, spread over the rows by their trials
        pseudo_a = a * (1.0 + 1.0 / trials)
        pseudo_y = (y + CORRECTION / trials) / (1.0 + 1.0 / trials)
    else:
        # half an event, spread over the rows by their baseline means a_i exp(baseline_i): sum a_i y_i grows by 0.5
        relative = np.exp(baseline - np.max(baseline))
        pseudo_a, pseudo_y = a, y + CORRECTION * relative / np.sum(a * relative)
    return _fit_glm(z, pseudo_y, pseudo_a, baseline, family, "no pooling (0.5 correction)")


def ranef_joint_sd(fit) -> np.ndarray:
    """Sd of each random effect's prediction error, beta-hat's uncertainty included, in ``fit.ranef``'s row order.

    An LMM's :meth:`~hierpool.closedform.results.LMMResult.ranef_joint_sd`; for a GLMM the same
    quantity on the link scale, sqrt(diag(Lambda C^-1 Lambda^T)) from the penalized system at the
    mode with theta taken as known.
    """
    if not isinstance(fit, GLMMResult):
        return fit.ranef_joint_sd()
    columns = []
    for cov_b, _ in fit.prediction_error_blocks():
        columns.extend(np.sqrt(np.maximum(cov_b[:, i, i], 0.0)) for i in range(cov_b.shape[-1]))
    return np.concatenate(columns)


def glmm_coefficient_sd(fit: GLMMResult, block: GroupTerms) -> np.ndarray:
    """Sd of the prediction error of beta-hat_c + b*_jc on the link scale, shape (levels, k).

    var(beta_c) + var(b_jc) + 2 cov(beta_c, b_jc) from the inverse of the penalized system at the
    mode, theta taken as known (Henderson 1975 applied to PIRLS's last Gaussian problem): the se that
    ``fit.predict(newdata, interval="confidence")`` gives the group at x = the coefficient's unit vector.
    """
    # cov(beta-hat) theta known: the fixed-effect block of the same inverse (lme4's vcov(fit, use.hessian = FALSE))
    return _coefficient_sd(fit, block, fit.prediction_error_blocks(), np.asarray(fit.solution_at_mode.vcov_beta))


def glmm_shrinkage_matrices(fit: GLMMResult, block: GroupTerms) -> np.ndarray:
    """W_j = (Sigma A_j + I)^-1 Sigma A_j per group, A_j summed with PIRLS's working weights at the mode."""
    ell, k = len(block.levels), block.k
    cross = np.einsum("n,ni,nj->nij", np.asarray(fit.optimum.mode.working_weights), block.z, block.z)
    moments = np.zeros((ell, k, k))
    np.add.at(moments, block.index, cross)
    scaled = group_covariance(fit, block)[None] @ moments
    return np.linalg.solve(scaled + np.eye(k)[None], scaled)


def group_modes(fit: GLMMResult, block: GroupTerms) -> np.ndarray:
    """b* (conditional modes) of the group's terms side by side, shape (levels, k)."""
    return np.hstack([np.asarray(fit.optimum.mode.b[j]) for j in block.indices])


@dataclass(frozen=True)
class PoolingComparison:
    """Complete, no and partial pooling (BLUP and posterior, or a GLMM's conditional modes) for one grouping factor.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per group and coefficient.  An LMM: grpvar, grp, term, n, no_pooling,
        complete_pooling, population (the fitted population line's value for the group: beta-hat_c, plus
        group-level predictors' terms), blup (population + b-hat_jc), blup_sd, post_mean, post_sd, post_lower,
        post_upper (absent without a posterior; the interval at ``level``), weight (diagonal of
        the shrinkage matrix), truth (when known).  A GLMM, on the link scale: grpvar,
        grp, term, n, trials (binomial), events, no_pooling, no_pooling_status,
        complete_pooling, population, mode (population + b*_jc), mode_sd, weight, truth.
    fit : LMMResult or GLMMResult
        The REML fit, or the GLMM's (Laplace or quadrature).
    posterior : BayesResult or None
    block : GroupTerms
    level : float
        Level of the intervals drawn by :meth:`plot`.
    """

    table: pd.DataFrame
    fit: LMMResult | GLMMResult
    posterior: object
    block: GroupTerms
    level: float
    glm_fits: tuple | None = None  # a GLMM's (NoPoolingGLM, complete-pooling coefficients), kept for fitted()

    @property
    def is_glmm(self) -> bool:
        return isinstance(self.fit, GLMMResult)

    @property
    def partial(self) -> str:
        """The table's partial-pooling column: ``blup`` (LMM) or ``mode`` (GLMM); its sd is ``<partial>_sd``."""
        return "mode" if self.is_glmm else "blup"

    @property
    def partial_label(self) -> str:
        return "conditional mode" if self.is_glmm else "BLUP"

    @property
    def scale(self) -> str | None:
        """The GLMM's link (every estimate is on its scale); None for an LMM."""
        return self.fit.family.link.name if self.is_glmm else None

    @property
    def population(self) -> pd.Series | pd.DataFrame:
        """The partial-pooling population coefficients beta-hat_c (0 for a coefficient with no fixed effect): a
        Series, one per coefficient; with group-level predictors (:func:`coefficient_map`) the population line's
        value for each group, a DataFrame (groups x coefficients), as the table's ``population`` column."""
        values = _population(self.fit, self.block)
        if np.allclose(values, values[:1], rtol=0.0, atol=0.0):
            return pd.Series(values[0], index=list(self.block.coef_names))
        return pd.DataFrame(values, index=pd.Index(self.block.levels, name=self.block.group),
                            columns=list(self.block.coef_names))

    def fitted(self, type: str = "response") -> pd.DataFrame:
        """Each method's fitted value of every row used in fitting, the offset included.

        Columns offset, complete_pooling (offset + X beta of the complete-pooling
        regression), no_pooling (offset + the no-pooling regression's fit; NaN in a
        group it cannot identify), blup (the REML fit's ``fitted``: offset + X beta-hat
        + Z b-hat over every term) and, with a posterior, post_mean (its posterior
        mean of offset + X beta + Z b); indexed by the data's row labels.

        A GLMM's columns are offset (always on the link scale), complete_pooling,
        no_pooling (the 0.5-corrected coefficients in corrected groups) and mode
        (``fit.predict(type=type)``: the conditional modes of every term), each the
        linear predictor (``type="link"``) or the mean g^-1(eta) (``type="response"``,
        lme4's ``fitted``).  An LMM's link is the identity: both types give the same.
        """
        if type not in ("response", "link"):
            raise ArgumentError(f"type must be 'response' or 'link', got {type!r}")
        design = self.fit.design
        if self.is_glmm:
            inverse = self.fit.family.link.inverse if type == "response" else (lambda eta: eta)
            none, complete = self.glm_fits
            return pd.DataFrame({
                "offset": design.offset,
                "complete_pooling": inverse(design.offset + design.X @ complete),
                "no_pooling": inverse(none.eta),
                "mode": self.fit.predict(type=type),
            }, index=design.rows)
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
        out of that method's cells; ``n_groups`` counts those used overall.  A GLMM's
        errors are on the link scale (the truth columns hold each group's true
        coefficient on that scale); n counts rows.
        """
        if "truth" not in self.table:
            raise ArgumentError("errors() needs the truth: pass truth= to hp.pooling or use data that carry it")
        sparse_max = integer_argument("sparse_max", sparse_max, minimum=0)
        methods = {"complete pooling": "complete_pooling", "no pooling": "no_pooling",
                   f"partial pooling ({self.partial_label})": self.partial}
        if "post_mean" in self.table:
            methods["partial pooling (posterior mean)"] = "post_mean"
        rows = []
        for term, part in self.table.groupby("term", sort=False):
            sparse = part["n"].to_numpy() <= sparse_max
            for method, column in methods.items():
                error = part[column].to_numpy() - part["truth"].to_numpy()
                cells = {}
                masks = (("all", np.ones_like(sparse)), (f"n <= {sparse_max}", sparse), (f"n > {sparse_max}", ~sparse))
                for label, mask in masks:
                    chosen = error[mask & np.isfinite(error)]
                    cells[label] = float(np.sqrt(np.mean(chosen**2))) if chosen.size else np.nan
                rows.append({"term": term, "method": method, **cells, "n_groups": int(np.isfinite(error).sum())})
        return pd.DataFrame(rows)

    def ridge(self, multipliers=None):
        """The penalized-regression view of this fit: see :func:`hierpool.ridge.ridge_view`."""
        from .ridge import ridge_view

        if self.is_glmm:
            raise ArgumentError("ridge() is the penalized least-squares view of a linear mixed model; "
                                "this comparison's fit is a GLMM")
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
        scale = f", on the {self.scale} scale" if self.is_glmm else ""
        return (f"PoolingComparison({self.block.group!r}: {len(self.block.levels)} groups, "
                f"coefficients {list(self.block.coef_names)}{scale})\n{self.table.head(10).to_string()}")


def _gaussian(family, link) -> bool:
    """Whether family= and link= ask for the linear mixed model (no family, or ``gaussian`` with the identity)."""
    if family is None or (isinstance(family, str) and family.strip().lower() == "gaussian"):
        if link not in (None, "identity"):
            raise ArgumentError(f"link={link!r} needs a GLMM family (family='binomial', 'poisson', ...); "
                                "the linear mixed model's link is the identity")
        return True
    return False


def _table(block: GroupTerms, columns: dict, per_group: dict, truth: dict) -> pd.DataFrame:
    """One row per group and coefficient: the per-group columns, then each (levels, k) column's coefficient."""
    frames = []
    for i, coef in enumerate(block.coef_names):
        frame = pd.DataFrame({"grpvar": block.group, "grp": block.levels, "term": coef, **per_group})
        for name, values in columns.items():
            frame[name] = np.asarray(values)[:, i] if np.ndim(values) == 2 else values
        if coef in truth:
            frame["truth"] = truth[coef]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def pooling(
    formula: str,
    data: pd.DataFrame,
    *,
    group: str | None = None,
    family: str | None = None,
    link: str | None = None,
    nAGQ: int = 1,
    bayes: bool | None = None,
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

    With ``family=`` the model is a GLMM (:func:`hierpool.glmm`) and the comparison is on the
    link scale: the GLM without groups, each group's own GLM (its empirical logit or log rate,
    0.5-corrected where infinite) and the GLMM's conditional modes (see the module's docstring).

    Parameters
    ----------
    formula : str
        An lme4-style formula, e.g. ``"biomarker ~ 1 + (1 | patient)"``,
        ``"biomarker ~ time + (time | patient)"`` or, with ``family="binomial"``,
        ``"cbind(incidence, size - incidence) ~ period + (1 | herd)"``.
    data : pandas.DataFrame
        Not modified.
    group : str, optional
        The grouping factor to compare (default: the one with most levels).
        Other random-effect terms stay in the partial-pooling fits.
    family, link : str, optional
        A GLMM's family and link, as :func:`hierpool.glmm` takes them; None (or
        ``"gaussian"``) for the linear mixed model.
    nAGQ : int
        A GLMM's quadrature nodes, as :func:`hierpool.glmm`.
    bayes : bool, optional
        Also fit ``hp.bayes`` and report posterior means and sds.  Default: True for a
        linear mixed model; a GLMM has no posterior here yet (``bayes=True`` is an error).
    truth : str or dict, optional
        Column(s) holding each group's true coefficient: a column name (for the
        first coefficient) or ``{coefficient: column}``; on the link scale for a GLMM.
        Default: the data's ``attrs["truth"]`` when present (``hp.datasets.biomarker``
        sets it).
    chains, draws, tune, seed, progress, priors, target_accept
        Passed to :func:`hierpool.bayes`.
    level : float
        Interval level of the plots.
    se : str, optional
        Column of known residual sds (meta-analysis), as in :func:`hierpool.lmm`
        (a linear mixed model only).
    weights, offset : str or array-like, optional
        Prior weights and offset (column names or one value per row), as in
        :func:`hierpool.lmm` and :func:`hierpool.glmm`: every method fits with them.

    Returns
    -------
    PoolingComparison
    """
    probability_argument("level", level)
    bayes = optional_boolean_argument("bayes", bayes)  # ("no" is truthy: it ran the sampler)
    if not _gaussian(family, link):
        if bayes:
            raise ArgumentError(f"bayes=True: hp.bayes does not fit family={family!r} yet; "
                                "the GLMM comparison has no posterior columns (leave bayes unset)")
        if se is not None:
            raise ArgumentError(f"se= gives known residual sds of a linear mixed model; family={family!r} has none")
        fit = glmm(formula, data, family=family, link=link, nAGQ=nAGQ, weights=weights, offset=offset)
        return _glmm_comparison(fit, data, group, truth, level)
    if nAGQ != 1:
        raise ArgumentError(f"nAGQ={nAGQ!r} is for a GLMM (give family=); a linear mixed model needs no quadrature")
    fit = lmm(formula, data, se=se, weights=weights, offset=offset)
    block = group_terms(fit, group)
    truth_columns = _truth_columns(data, truth, block)
    ell = len(block.levels)
    population = _population(fit, block)
    columns = {
        "no_pooling": no_pooling(fit, block),
        "complete_pooling": complete_pooling(fit, block),
        "population": population,
        "blup": population + group_blups(fit, block),
        "blup_sd": group_coefficient_sd(fit, block),
    }
    posterior = None
    if bayes is None or bayes:
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
    truth_values = {c: _group_truth(data, fit, block, column) for c, column in truth_columns.items()}
    table = _table(block, columns, {"n": np.bincount(block.index, minlength=ell)}, truth_values)
    return PoolingComparison(table=table, fit=fit, posterior=posterior, block=block, level=level)


def _glmm_comparison(fit: GLMMResult, data: pd.DataFrame, group, truth, level: float) -> PoolingComparison:
    block = group_terms(fit, group)
    truth_columns = _truth_columns(data, truth, block)
    design, ell = fit.design, len(block.levels)
    a = design.row_weights
    per_group = {"n": np.bincount(block.index, minlength=ell)}
    if fit.family.name == "binomial":
        per_group["trials"] = np.bincount(block.index, weights=a, minlength=ell)
    per_group["events"] = np.bincount(block.index, weights=a * design.y, minlength=ell)
    none, complete = no_pooling_glm(fit, block), _complete_pooling_glm_beta(fit)
    population = _population(fit, block)
    columns = {
        "no_pooling": none.estimates,
        "no_pooling_status": none.status,
        "complete_pooling": _on_coefficients(fit, block, complete),
        "population": population,
        "mode": population + group_modes(fit, block),
        "mode_sd": glmm_coefficient_sd(fit, block),
        "weight": np.diagonal(glmm_shrinkage_matrices(fit, block), axis1=1, axis2=2),
    }
    truth_values = {c: _group_truth(data, fit, block, column) for c, column in truth_columns.items()}
    table = _table(block, columns, per_group, truth_values)
    return PoolingComparison(table=table, fit=fit, posterior=None, block=block, level=level, glm_fits=(none, complete))
