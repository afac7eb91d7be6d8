"""``GLMMResult.marginal``: population-average coefficients and means, beside the subject-specific ones.

The integration and the projection are :mod:`hierpool.algebra.marginal_mean`'s; this module checks the
arguments, reads the rows (the fitted data's or new ones), propagates the covariance of
(theta, beta) by the delta method and lays out the tables.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..algebra.linalg import theta_to_factors
from ..algebra.marginal_mean import (
    MAX_NODES,
    QUADRATURE_TOL,
    delta_covariance,
    marginal_link_jacobian,
    marginal_means,
    population_average,
)
from ..errors import ArgumentError, HierpoolWarning, integer_argument, seed_argument
from ..spec.arguments import probability_argument
from ..spec.newdata import model_rows
from .predict import normal_quantile

METHODS = ("auto", "quadrature", "qmc")
#: Sobol draws when ``method="qmc"`` and ``draws`` is not given.
DEFAULT_DRAWS = 4096


@dataclass(frozen=True)
class MarginalResult:
    """Population-average (marginal) quantities of a GLMM, from :meth:`GLMMResult.marginal`.

    Attributes
    ----------
    coef : pandas.DataFrame
        One row per fixed effect: ``subject_specific`` (the fit's beta), ``population_average``
        (beta_M), and beta_M's ``se``, ``lower``, ``upper`` (normal interval).
    vcov : pandas.DataFrame
        The delta method's covariance of beta_M.
    predictions : pandas.DataFrame
        One row per predicted row: ``fit`` (the population-average mean m), its ``se``, ``lower`` and
        ``upper`` (a normal interval for g(m), mapped through g^-1), ``link`` (g(m)), ``conditional``
        (g^-1(offset + x beta): the mean of a subject whose random effects are 0) and ``re_sd``
        (sqrt(v), the sd of the row's random part z'b).
    method : str
        How the means were integrated: ``"closed form"``, ``"gauss-hermite"`` or ``"quasi-monte carlo"``.
    nodes, draws : int or None
        Gauss-Hermite nodes used; Sobol draws used.
    error : float
        Gauss-Hermite: the largest relative change of a mean in the last doubling of the rule (with ``nodes``
        given, from that rule to the rule of twice as many, warned above :data:`QUADRATURE_TOL`; 0 for a
        closed form; NaN for quasi-Monte Carlo).
    uncertainty : str
        ``"theta and beta"`` (the inverse Hessian of the deviance in (theta, beta); nAGQ >= 1) or
        ``"beta"`` (theta taken as known; nAGQ = 0).
    level : float
    """

    coef: pd.DataFrame
    vcov: pd.DataFrame
    predictions: pd.DataFrame
    method: str
    nodes: int | None
    draws: int | None
    error: float
    uncertainty: str
    level: float


def _check(level, method, nodes, draws, seed) -> tuple[int | None, int]:
    probability_argument("level", level)
    if not isinstance(method, str) or method not in METHODS:
        raise ArgumentError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    seed_argument(seed)
    if nodes is not None:
        if method == "qmc":
            raise ArgumentError("nodes sets the Gauss-Hermite rule; method='qmc' takes draws=, not nodes=")
        integer_argument("nodes", nodes)
        if nodes > MAX_NODES:
            raise ArgumentError(f"nodes must be at most {MAX_NODES}, got {nodes!r}")
    if draws is not None:
        if method != "qmc":
            raise ArgumentError(f"draws is the number of quasi-Monte Carlo points, for method='qmc' only "
                                f"(method={method!r})")
        integer_argument("draws", draws, minimum=2)
        if draws & (draws - 1):
            raise ArgumentError(f"draws must be a power of two (a Sobol sequence's balance), got {draws!r}")
    return nodes, DEFAULT_DRAWS if draws is None else int(draws)


def marginal(result, covariance, newdata=None, level: float = 0.95, method: str = "auto", nodes: int | None = None,
             draws: int | None = None, seed: int = 0) -> MarginalResult:
    """Population-average coefficients and means of a fitted GLMM (see :meth:`GLMMResult.marginal`).

    ``covariance()`` gives the covariance of (theta, beta), in that order, and what it covers
    (``"theta and beta"`` or ``"beta"``); it is called after the arguments are checked.
    """
    nodes, draws = _check(level, method, nodes, draws, seed)
    covariance, uncertainty = covariance()
    design, link = result.design, result.family.link
    factors = theta_to_factors(np.asarray(result.theta, dtype=float), tuple(t.k for t in design.terms))
    beta = np.asarray(result.optimum.beta, dtype=float)

    warned = []  # one warning a call (the fitted rows' and newdata's rules would say it twice)

    def means(X, z_terms, offset):
        out = marginal_means(offset + X @ beta, z_terms, factors, link, method=method, nodes=nodes, draws=draws,
                             seed=seed)
        if warned or not out.error > QUADRATURE_TOL:
            return out
        warned.append(True)
        if nodes is None:  # the doubling stopped at the largest rule
            warnings.warn(f"Gauss-Hermite quadrature of the marginal means agrees only to {out.error:.1e} "
                          f"(relative) between {out.nodes // 2} and {out.nodes} nodes: the random effects' sd "
                          "is large for this link; compare with method='qmc'", HierpoolWarning, stacklevel=4)
        else:  # the user's rule, against the rule of twice its nodes
            other = 2 * nodes if 2 * nodes <= MAX_NODES else nodes // 2
            warnings.warn(f"Gauss-Hermite quadrature of the marginal means with nodes={nodes} differs by "
                          f"{out.error:.1e} (relative) from the rule of {other} nodes: "
                          "too few nodes for these random effects (nodes=None chooses the rule)", HierpoolWarning,
                          stacklevel=4)
        return out

    on_data = means(design.X, [t.z for t in design.terms], design.offset)
    beta_m, jacobian = population_average(on_data, design.X, design.offset, design.row_weights, link)
    vcov_m = delta_covariance(jacobian, covariance)
    se_m = np.sqrt(np.maximum(np.diag(vcov_m), 0.0))
    q = normal_quantile(level)
    names = list(design.fixed_names)
    coef = pd.DataFrame({"subject_specific": beta, "population_average": beta_m, "se": se_m,
                         "lower": beta_m - q * se_m, "upper": beta_m + q * se_m}, index=names)

    if newdata is None:
        X, offset, rows, index = design.X, design.offset, on_data, design.rows
    else:
        X, terms, offset = model_rows(design, newdata, levels_read=False)  # grouping columns not needed
        rows, index = means(X, [z for z, _ in terms], offset), newdata.index
    eta_m, row_jacobian = marginal_link_jacobian(rows, X, link)
    se_link = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", row_jacobian, covariance, row_jacobian), 0.0))
    predictions = pd.DataFrame({
        "fit": rows.mean, "se": se_link * link.mu_eta(eta_m),
        "lower": link.inverse(eta_m - q * se_link), "upper": link.inverse(eta_m + q * se_link),
        "link": eta_m, "conditional": link.inverse(offset + X @ beta), "re_sd": np.sqrt(rows.variance)}, index=index)
    return MarginalResult(coef=coef, vcov=pd.DataFrame(vcov_m, index=names, columns=names), predictions=predictions,
                          method=on_data.method, nodes=on_data.nodes, draws=on_data.draws, error=on_data.error,
                          uncertainty=uncertainty, level=level)
