"""Closed-form disease mapping: the Laplace approximation on the sparse precision of spatial terms (INLA's idea,
without INLA), exact for a Gaussian response.

The model (:mod:`hierpool.spec.spatial`) is y_i ~ family(mu_i), g(mu_i) = x_i' beta + offset_i + (Z x)_i, with the
latent x the stacked blocks of its random terms (:mod:`hierpool.algebra.latent_blocks`): each spatial term's
(:class:`hierpool.algebra.icar.CarPrior`: ICAR, proper CAR, BYM2; its area effects b = x_t[:n]) and each
``(lhs | g)`` term's, Gaussian with the block-diagonal sparse precision P(psi) under constraints C' x = 0.  psi
holds each spatial term's log sd and the type's mixing parameter (proper CAR's alpha, BYM2's rho) on a logit scale
(:func:`mix_from_logit` in a fit: the lower bound is a mix of 0), each
``(lhs | g)`` term's covariance factor (the log of its diagonal), and, for a Gaussian response, log sigma.  With
f(beta, x) = -sum_i l_i(eta_i) + x' P x / 2 and (beta^, x^) its constrained minimum, found by Fisher scoring
(PIRLS, lme4's; one step for a Gaussian), H = [[X'WX, X'WZ], [Z'WX, Z'WZ + P]] at the mode (W the working weights),
the criteria (-2 log, lme4's convention) are

    ML:   -2 [sum l^ - x^' P x^ / 2 + log det_c P / 2 - log det_c H_xx / 2]
    REML: -2 [sum l^ - x^' P x^ / 2 + log det_c P / 2 - log det_c H / 2 + p log(2 pi) / 2]

with det_c the determinant on {C' x = 0} (:func:`hierpool.algebra.icar.log_constrained_determinant`): ML with
beta at the joint mode (exact profiling for a Gaussian; for a GLMM lme4's ``nAGQ = 0``), REML with beta integrated
out under a flat prior (for a GLMM glmmTMB's ``REML = TRUE``; a Normal prior on some coefficients, the Bayesian
exact sampler's, adds its precision to H's beta block and its density to the criterion:
:class:`SpatialLaplace`'s ``beta_prior``).  For a Gaussian response both are exact: the fitted values equal the
dense generalised least squares with V = sigma^2 W^-1 + sum_t Z_t Cov_t Z_t' (tested to 1e-8).  psi is found by
L-BFGS-B.  Every solve is one sparse LU of the bordered (KKT) matrix [[H, C], [C', 0]]; the conditional variances
of the effects are the diagonal of its inverse's x block, V (V' H_xx V)^-1 V' (conditional on beta^, as lme4's
``condVar``), and vcov(beta) is its inverse's beta block.  No dense area x area matrix is formed.

References: Rue, Martino & Chopin (2009), JRSS B 71 (the Laplace approximation of latent Gaussian models);
Rue & Held (2005), Gaussian Markov random fields, sec. 2.3.3 (linear constraints); Riebler et al. (2016), Stat.
Methods Med. Res. 25 (BYM2); Bates et al. (2015), J. Stat. Softw. 67(1) (PIRLS, the criteria's convention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse
import scipy.sparse.linalg
from scipy.special import expit

from ..algebra.checks import BOUNDARY_RISE
from ..algebra.family import family
from ..algebra.glm import starting_eta
from ..algebra.icar import car_prior, compose_bym2, factor_log_abs_det
from ..algebra.latent_blocks import GroupPrior, stack_constraints, stack_rows
from ..algebra.linalg import DIAGONAL_CHUNK, inverse_diagonal, solved_row_quadratic_forms
from ..errors import ArgumentError, ConvergenceWarning
from ..spec.arguments import probability_argument
from ..spec.newdata import model_rows, new_row_weights, row_labels
from ..spec.spatial import AreaTerm, SpatialDesign, areas_in_graph, group_effect_index, group_parameter_names
from .predict import check_interval, check_re, interval_table, normal_quantile, on_response_scale
from .results import Likelihood

#: Bounds of log sd and log sigma, and of the logit of the mixing parameter (:func:`mix_from_logit`).
LOG_SD_BOUNDS = (np.log(1e-5), np.log(1e3))
LOGIT_BOUNDS = (-12.0, 12.0)
#: PIRLS stops when no coordinate of (beta, x) moves by more than this (relative): the criterion's log det H moves
#: at first order with the mode's error, and L-BFGS-B's finite differences need it smooth to ~1e-10.
PIRLS_TOL = 1e-11
PIRLS_MAX_STEPS = 60
#: The spatial sds (on the link scale; times sd(y) for a Gaussian) whose best starts the search.
START_SDS = (0.05, 0.15, 0.4, 1.0)
#: L-BFGS-B's finite-difference step on psi: the criterion is smooth to about 1e-10 (absolute) where BYM2's rho
#: nears 1 (precision entries ~ 1 / (1 - rho)), so scipy's default step (1e-8) gives gradients of noise there.
FD_STEP = 1e-6
#: SuperLU's threshold for taking a pivot off the diagonal (0: never; 1: partial pivoting).
PIVOT_THRESHOLD = 1e-3
#: Families the Laplace fit takes (a negative binomial's shape would be one more parameter: not yet).
FAMILIES = ("gaussian", "poisson", "binomial")


@dataclass
class _Mode:
    theta: np.ndarray  # (beta, x)
    eta: np.ndarray
    weights: np.ndarray  # working weights at the mode
    loglik: float  # sum of l_i at the mode
    quadratic: float  # x' P x


class _OrderedFactor:
    """A SuperLU factor of B[order][:, order], solving B v = r in the original order."""

    def __init__(self, lu, order: np.ndarray):
        self.lu, self.order, self.shape = lu, order, lu.shape

    @property
    def U(self):
        return self.lu.U

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        out = np.empty_like(rhs, dtype=float)
        out[self.order] = self.lu.solve(np.ascontiguousarray(rhs[self.order]))
        return out


class _Bordered:
    """The bordered matrix [[H, C], [C', 0]] on a sparse pattern found once, refilled at each (W, P): H is
    [[X'WX, X'WZ], [Z'WX, Z'WZ + P]] (``with_beta``) or its x block Z'WZ + P, Z the rows' random part
    (:class:`hierpool.algebra.latent_blocks.RowStructure`: one slot per term coefficient a row has an effect in).
    Building a sparse matrix by scipy's block operations costs more than factoring it on a small map; here one
    ``bincount`` fills it.

    The elimination order is found once too (the ordering is most of a factorization's cost on a large map): x by
    minimum degree on its own pattern, then beta (dense rows: last, they add no fill), then the constraints (their
    zero diagonal last, where the Schur complement -C' H^-1 C has filled it).  SuperLU then factors in that order,
    preferring diagonal pivots (:data:`PIVOT_THRESHOLD`) and pivoting off the diagonal only where one vanishes (a
    component without data under ICAR)."""

    def __init__(self, laplace: SpatialLaplace, with_beta: bool):
        rows_z = laplace.rows
        p = laplace.p if with_beta else 0
        m, k = laplace.m, laplace.sizes.size
        self.p, self.size, self.rows_z = p, p + m + k, rows_z
        n_rows, slots = rows_z.columns.shape
        fixed = np.arange(p)
        pr, pc = laplace.entry_rows, laplace.entry_cols
        c = laplace.constraints_x.tocoo()
        # Z'WZ: slots a, b of every row, (a, b) row-major per row
        za = p + np.repeat(rows_z.columns, slots, axis=1).ravel()
        zb = p + np.tile(rows_z.columns, (1, slots)).ravel()
        # X'WZ: (fixed j, slot a of row i), ordered (i, j, a)
        xj = np.tile(np.repeat(fixed, slots), n_rows)
        xa = p + np.repeat(rows_z.columns, p, axis=0).ravel() if p else np.zeros(0, dtype=np.int64)
        parts = [
            (np.repeat(fixed, p), np.tile(fixed, p)),  # X'WX, row-major
            (xj, xa), (xa, xj),  # X'WZ and Z'WX, the same values
            (za, zb),  # Z'WZ
            (p + pr, p + pc),  # P
            (p + c.row, p + m + c.col), (p + m + c.col, p + c.row),  # C and C'
        ]
        # the elimination order (class docstring): x's (found once for both matrices), then beta, then the constraints
        self.order = np.r_[p + laplace.latent_order, fixed, p + m + np.arange(k)]
        rank = np.argsort(self.order)
        rows = rank[np.concatenate([r for r, _ in parts]).astype(np.int64)]
        cols = rank[np.concatenate([col for _, col in parts]).astype(np.int64)]
        pattern = scipy.sparse.csc_matrix((np.ones(rows.size), (rows, cols)), shape=(self.size, self.size))
        pattern.sum_duplicates()
        pattern.sort_indices()
        self.nnz = pattern.nnz
        # one matrix on the pattern, its values overwritten at each factorization: a new csc_matrix would check
        # its indices at every step of a sampler (benchmarks/RESULTS.md, "the exact sampler on a second model")
        self.matrix = pattern
        keys = np.repeat(np.arange(self.size), np.diff(pattern.indptr)) * self.size + pattern.indices
        self.positions = np.searchsorted(keys, cols * self.size + rows)
        self.ones = np.ones(2 * c.nnz)
        self.beta_precision = np.diag(laplace.beta_precision) if p else np.zeros((0, 0))
        self.zz = (rows_z.values[:, :, None] * rows_z.values[:, None, :]).reshape(n_rows, -1)  # v_ia v_ib

    def factor(self, X: np.ndarray, w: np.ndarray, precision_values: np.ndarray):
        """SuperLU factor of the bordered matrix at working weights w and the precision's values."""
        if self.p:
            Xw = X * w[:, None]
            cross = (Xw[:, :, None] * self.rows_z.values[:, None, :]).ravel()  # (i, j, a): x_ij w_i v_ia
            head = [(X.T @ Xw + self.beta_precision).ravel(), cross, cross]
        else:
            head = []
        values = np.concatenate(head + [(w[:, None] * self.zz).ravel(), precision_values, self.ones])
        self.matrix.data[:] = np.bincount(self.positions, weights=values, minlength=self.nnz)
        lu = scipy.sparse.linalg.splu(self.matrix, permc_spec="NATURAL", diag_pivot_thresh=PIVOT_THRESHOLD,
                                      options={"SymmetricMode": True})
        return _OrderedFactor(lu, self.order)


def mix_from_logit(value: float) -> float:
    """A mixing parameter (BYM2's rho, the proper CAR's alpha) from its coordinate in psi: the logistic function
    shifted and scaled so that the lower bound of :data:`LOGIT_BOUNDS` is a mix of exactly 0,

        mix = (expit(v) - expit(v_low)) / (1 - expit(v_low)),

    a logit within 6e-6 of the plain one.  At 0 both models are proper (BYM2's effects all unstructured, the proper
    CAR's precision diagonal), and the boundary optimum is reached there, as lme4's is at theta = 0: with the plain
    logit the search stopped at rho = 6e-6, 2e-5 to 4e-5 above it in -2 log L (the forty-third session's probe, 14 of
    16 BYM2 fits against the same model written ``car(type='icar') + (1 | area)``).  The upper end stays short of 1,
    where BYM2's precision (entries ~ 1 / (1 - rho)) and the proper CAR's are singular."""
    low = expit(LOGIT_BOUNDS[0])
    return float(max(expit(value) - low, 0.0) / (1.0 - low))


class _CarBlock:
    """A spatial term in psi: log sd and, for BYM2 and the proper CAR, its mixing parameter on a logit scale
    (:func:`mix_from_logit` in a fit's search)."""

    def __init__(self, area_term: AreaTerm, suffix: str, bounded_mix: bool):
        self.area_term, self.term = area_term, area_term.term
        self.bounded_mix = bounded_mix  # the search's coordinate (mix_from_logit), or the sampler's plain logit
        self.prior = car_prior(area_term.graph, self.term.type)
        self.n_latent, self.n_effects = self.prior.n_latent, self.prior.n
        self.n_params = 2 if self.prior.has_mix else 1
        self.entry_rows, self.entry_cols, _ = self.prior.precision_entries(1.0, 0.5)
        self.constraints = self.prior.latent_constraints
        self.mix_name, self.suffix = self.term.mix_name, suffix

    def natural(self, psi) -> tuple[float, float]:
        """(sd, mix) at the block's psi (mix 0 for ICAR)."""
        if not self.prior.has_mix:
            return float(np.exp(psi[0])), 0.0
        return float(np.exp(psi[0])), mix_from_logit(psi[1]) if self.bounded_mix else float(expit(psi[1]))

    def precision_values(self, psi) -> np.ndarray:
        return self.prior.precision_entries(*self.natural(psi))[2]

    def log_det(self, psi) -> float:
        return self.prior.log_det(*self.natural(psi))

    def names(self) -> list[str]:
        return [f"log_sd{self.suffix}"] + ([f"logit_{self.mix_name}{self.suffix}"] if self.prior.has_mix else [])

    def bounds(self, sd_bounds) -> list[tuple[float, float]]:
        return [sd_bounds] + ([LOGIT_BOUNDS] if self.prior.has_mix else [])

    def boundary_positions(self) -> list[int]:
        """The coordinates of the block's psi whose lower bound is a boundary of the model: the log sd (an sd of ~0)
        and the mixing parameter (a mix of 0)."""
        return [0, 1] if self.prior.has_mix else [0]

    def start(self, log_sd: float) -> list[float]:
        return [log_sd] + ([0.0] if self.prior.has_mix else [])

    def row_part(self) -> tuple[np.ndarray, np.ndarray]:
        area = self.area_term.area
        return area[:, None], np.ones((area.size, 1))

    def hyperparameters(self, psi) -> dict[str, float]:
        sd, mix = self.natural(psi)
        return {f"sd{self.suffix}": sd} | ({f"{self.mix_name}{self.suffix}": mix} if self.prior.has_mix else {})


class _GroupBlock:
    """A ``(lhs | g)`` term in psi: its covariance's lower Cholesky factor L, the diagonal by its log, row-wise."""

    def __init__(self, term):
        self.term = term
        self.prior = GroupPrior(term.n_levels, term.k)
        self.n_latent = self.n_effects = self.prior.n_latent
        k = term.k
        self.n_params = k * (k + 1) // 2
        self.lower = np.tril_indices(k)
        self.diagonal = self.lower[0] == self.lower[1]
        self.entry_rows, self.entry_cols = self.prior.rows, self.prior.cols
        self.constraints = self.prior.latent_constraints

    def factor(self, psi) -> np.ndarray:
        out = np.zeros((self.term.k, self.term.k))
        out[self.lower] = np.where(self.diagonal, np.exp(psi), psi)
        return out

    def precision_values(self, psi) -> np.ndarray:
        return self.prior.precision_entries(self.factor(psi))[2]

    def log_det(self, psi) -> float:
        return self.prior.log_det(self.factor(psi))

    def names(self) -> list[str]:
        coefs = self.term.coef_names
        return [f"log_sd_{self.term.group}_{coefs[i]}" if i == j else f"L_{self.term.group}_{coefs[i]}_{coefs[j]}"
                for i, j in zip(*self.lower)]

    def bounds(self, sd_bounds) -> list[tuple[float | None, float | None]]:
        return [sd_bounds if d else (None, None) for d in self.diagonal]

    def boundary_positions(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.diagonal)]

    def start(self, log_sd: float) -> list[float]:
        return [log_sd if d else 0.0 for d in self.diagonal]

    def row_part(self) -> tuple[np.ndarray, np.ndarray]:
        k = self.term.k
        return self.term.index[:, None].astype(np.int64) * k + np.arange(k)[None, :], np.asarray(self.term.z, float)

    def covariance(self, psi) -> np.ndarray:
        factor = self.factor(psi)
        return factor @ factor.T

    def hyperparameters(self, psi) -> dict[str, float]:
        cov = self.covariance(psi)
        sds = np.sqrt(np.diag(cov))
        sd_names, cor_names = group_parameter_names(self.term)
        out = {name: float(sd) for name, sd in zip(sd_names, sds)}
        return out | {name: float(cov[i, j] / (sds[i] * sds[j])) for (i, j), name in cor_names.items()}


class SpatialLaplace:
    """The criterion of the module docstring as a function of psi, with the mode carried from one psi to the next.

    psi holds each term's parameters in turn (:class:`_CarBlock`, :class:`_GroupBlock`: the spatial terms in the
    formula's order, then the ``(lhs | g)`` terms), then log sigma for a Gaussian response.  ``beta_prior`` (mean,
    precision), precision 0 where flat, is for REML only: beta ~ N(mean, diag(1 / precision)) integrated out, the
    criterion then -2 log p(y | psi) of the Bayesian exact sampler (:mod:`hierpool.bayesian.spatial_exact`).
    ``bounded_mix``: a mixing parameter's coordinate is :func:`mix_from_logit`'s, whose lower bound is a mix of 0 (the
    fit's search, within :data:`LOGIT_BOUNDS`); otherwise the plain logit, unbounded (the sampler's, whose prior's
    Jacobian is written for it)."""

    def __init__(self, sdesign: SpatialDesign, reml: bool, beta_prior: tuple[np.ndarray, np.ndarray] | None = None,
                 bounded_mix: bool = False):
        design = sdesign.design
        self.sdesign, self.reml = sdesign, reml
        self.gaussian = design.family is None
        if not self.gaussian and design.family.name not in FAMILIES:
            raise ArgumentError(f"the closed-form spatial fit takes families {FAMILIES[1:]} (and a Gaussian "
                                f"response); {design.family.name!r} is sampled by hp.bayes")
        self.family = None if self.gaussian else family(design.family)
        self.blocks = ([_CarBlock(a, sdesign.suffix(a), bounded_mix) for a in sdesign.areas]
                       + [_GroupBlock(t) for t in design.terms])
        sizes = [b.n_latent for b in self.blocks]
        self.latent_offsets = np.r_[0, np.cumsum(sizes)[:-1]].astype(int)
        self.param_offsets = np.r_[0, np.cumsum([b.n_params for b in self.blocks])].astype(int)
        self.X = np.asarray(design.X, dtype=float)
        self.y = np.asarray(design.y, dtype=float)
        self.offset = np.asarray(design.offset, dtype=float)
        self.prior_weights = np.asarray(design.row_weights, dtype=float)
        self.p, self.m = self.X.shape[1], int(np.sum(sizes))
        # beta ~ N(mean, diag(1 / precision)) a priori, precision 0 where flat (the Bayesian exact sampler's; a fit's
        # beta is flat: integrated out by REML, or maximized over)
        if beta_prior is not None and not reml:
            raise ArgumentError("a prior on beta is for the restricted criterion (beta integrated out): reml=True")
        mean, precision = (np.zeros(self.p), np.zeros(self.p)) if beta_prior is None else beta_prior
        self.beta_mean, self.beta_precision = np.asarray(mean, dtype=float), np.asarray(precision, dtype=float)
        self.rows = stack_rows([b.row_part() for b in self.blocks], list(self.latent_offsets), self.m)
        self.entry_rows = np.concatenate([b.entry_rows + o for b, o in zip(self.blocks, self.latent_offsets)])
        self.entry_cols = np.concatenate([b.entry_cols + o for b, o in zip(self.blocks, self.latent_offsets)])
        cx = stack_constraints([b.constraints for b in self.blocks])
        self.constraints_x = cx
        self.sizes = np.asarray(cx.sum(axis=0)).ravel()
        self.latent_order = self._latent_order()
        self.full = _Bordered(self, with_beta=True)
        self.latent_only = _Bordered(self, with_beta=False)
        self._theta = np.zeros(self.p + self.m)
        self._gaussian_factor = None  # a Gaussian mode's factor of the bordered matrix, which evaluate reuses
        self._started = False
        self.evaluations = 0

    def _latent_order(self) -> np.ndarray:
        """x's elimination order: minimum degree on the pattern of Z'WZ + P (values that make it diagonally dominant:
        only the pattern matters), the same in the bordered matrix with beta and without."""
        slots = self.rows.columns.shape[1]
        za = np.repeat(self.rows.columns, slots, axis=1).ravel()
        zb = np.tile(self.rows.columns, (1, slots)).ravel()
        m = self.m
        pattern = scipy.sparse.csc_matrix((np.r_[np.ones(self.entry_rows.size), np.ones(za.size), np.full(m, 1e6)],
                                           (np.r_[self.entry_rows, za, np.arange(m)],
                                            np.r_[self.entry_cols, zb, np.arange(m)])), shape=(m, m))
        return np.argsort(scipy.sparse.linalg.splu(pattern, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                                   options={"SymmetricMode": True}).perm_c)

    # -- parameters ------------------------------------------------------------------------------------------
    def block_psi(self, psi, t: int) -> np.ndarray:
        """Term t's part of psi."""
        return np.asarray(psi, dtype=float)[self.param_offsets[t]:self.param_offsets[t + 1]]

    def block_latent(self, x, t: int) -> np.ndarray:
        """Term t's part of the latent vector x."""
        start = self.latent_offsets[t]
        return x[start:start + self.blocks[t].n_latent]

    def names(self) -> list[str]:
        return [name for b in self.blocks for name in b.names()] + (["log_sigma"] if self.gaussian else [])

    def bounds(self) -> list[tuple[float, float]]:
        """Log sds (and the diagonal of a covariance factor, and log sigma) within :data:`LOG_SD_BOUNDS` of the
        response's scale (sd(y) for a Gaussian, 1 on a GLMM's link scale), mixing parameters' logits within
        :data:`LOGIT_BOUNDS`, a covariance factor's off-diagonal free."""
        scale = np.log(self._scale())
        sd = (LOG_SD_BOUNDS[0] + scale, LOG_SD_BOUNDS[1] + scale)
        return [bound for b in self.blocks for bound in b.bounds(sd)] + ([sd] if self.gaussian else [])

    def boundary_positions(self) -> list[int]:
        """The coordinates of psi whose lower bound is a boundary of the model: the terms' log sds (a spatial term's
        sd, a covariance factor's diagonal; not log sigma), at :data:`LOG_SD_BOUNDS`, and the mixing parameters, 0 at
        :data:`LOGIT_BOUNDS`' lower end."""
        return [int(self.param_offsets[t]) + i for t, b in enumerate(self.blocks) for i in b.boundary_positions()]

    def _scale(self) -> float:
        scale = float(np.std(self.y)) if self.gaussian else 1.0
        return scale if scale > 0 else 1.0

    def sigma(self, psi) -> float:
        """The residual sd (1 for a GLMM)."""
        return float(np.exp(psi[-1])) if self.gaussian else 1.0

    def start(self) -> np.ndarray:
        """psi's start: the best of a coarse grid of sds, one for every term (:data:`START_SDS`, times sd(y) for a
        Gaussian, whose sigma starts at half sd(y)), mixing parameters 1/2, correlations 0.  The criterion need not
        be convex in psi (a small sd can be a local minimum), and L-BFGS-B's first line search from a poor start
        can run to a bound."""
        scale = self._scale()
        rest = [np.log(0.5 * scale)] if self.gaussian else []
        grid = [np.array([v for b in self.blocks for v in b.start(np.log(sd * scale))] + rest) for sd in START_SDS]
        return min(grid, key=self.criterion)

    def precision_values(self, psi) -> np.ndarray:
        """The values of the latent vector's block-diagonal precision at psi (at ``entry_rows``, ``entry_cols``)."""
        return np.concatenate([b.precision_values(self.block_psi(psi, t)) for t, b in enumerate(self.blocks)])

    def log_det_prior(self, psi) -> float:
        """log det_c of the precision: the sum over the terms'."""
        return float(sum(b.log_det(self.block_psi(psi, t)) for t, b in enumerate(self.blocks)))

    # -- the mode ----------------------------------------------------------------------------------------------
    def _loglik_and_working(self, eta, sigma):
        """(sum l_i, working weights, working residuals) at eta."""
        if self.gaussian:
            a = self.prior_weights
            r = self.y - eta
            loglik = float(np.sum(-0.5 * np.log(2 * np.pi * sigma**2 / a) - a * r**2 / (2 * sigma**2)))
            return loglik, a / sigma**2, r
        mu, w, residual = self.family.working(self.y, eta, self.prior_weights)
        return float(np.sum(self.family.log_likelihood(self.y, mu, self.prior_weights))), w, residual

    def _eta(self, theta):
        return self.X @ theta[: self.p] + self.offset + self.rows.apply(theta[self.p:])

    def _penalty(self, x, values) -> float:
        return float(np.sum(values * x[self.entry_rows] * x[self.entry_cols]))

    def _beta_penalty(self, beta) -> float:
        """(beta - m)' diag(precision) (beta - m): the fixed effects' prior (0 when flat)."""
        return float(np.sum(self.beta_precision * (beta - self.beta_mean) ** 2))

    def mode(self, psi, beta=None) -> _Mode:
        """The constrained joint mode of (beta, x) at psi, or of x alone at a given beta (Fisher scoring with step
        halving, from the last mode)."""
        sigma = self.sigma(psi)
        values = self.precision_values(psi)
        self._gaussian_factor = None
        theta = self._theta.copy()
        if beta is not None:
            theta[: self.p] = beta
        if not self._started and not self.gaussian:  # glm-style start: the family's starting mean on the link scale
            eta0 = starting_eta(self.family, self.y, self.prior_weights) - self.offset
            theta[: self.p] = np.linalg.lstsq(self.X, eta0, rcond=None)[0] if self.p else theta[: self.p]
        objective, previous = None, theta
        zeros = np.zeros(self.sizes.size)
        for _ in range(PIRLS_MAX_STEPS):
            eta = self._eta(theta)
            loglik, w, residual = self._loglik_and_working(eta, sigma)
            current = -loglik + 0.5 * (self._penalty(theta[self.p:], values) + self._beta_penalty(theta[: self.p]))
            if objective is not None and current > objective + 1e-10 * (1 + abs(objective)):
                theta = 0.5 * (theta + previous)  # step halving
                continue
            if objective is not None and (
                    np.max(np.abs(theta - previous)) <= PIRLS_TOL * (1 + np.max(np.abs(theta)))
                    or objective - current <= 1e-15 * (1 + abs(current))):  # at the floating-point floor
                break
            objective, previous = current, theta
            working = w * (eta - self.offset + residual)
            if beta is None:
                factor = self.full.factor(self.X, w, values)
                self._gaussian_factor = factor if self.gaussian else None
                rhs = np.concatenate([self.X.T @ working + self.beta_precision * self.beta_mean,
                                      self.rows.transpose_apply(working), zeros])
                theta = factor.solve(rhs)[: self.p + self.m]
            else:  # x alone: the working response less X beta
                factor = self.latent_only.factor(self.X, w, values)
                rhs = np.concatenate([self.rows.transpose_apply(working - w * (self.X @ beta)), zeros])
                theta = np.concatenate([beta, factor.solve(rhs)[: self.m]])
            if self.gaussian:  # the quadratic is exact: one step is the mode
                break
        else:
            warnings.warn("PIRLS did not converge in the spatial Laplace fit", ConvergenceWarning, stacklevel=3)
        self._theta, self._started = theta, True
        eta = self._eta(theta)
        loglik, w, _ = self._loglik_and_working(eta, sigma)
        return _Mode(theta, eta, w, loglik, self._penalty(theta[self.p:], values))

    def criterion(self, psi, beta=None) -> float:
        """-2 log of the (restricted) marginal likelihood's Laplace approximation at psi (module docstring); with
        ``beta``, the ML criterion at that beta (the mode of x alone: glmer's second stage)."""
        return self.evaluate(psi, beta)[0]

    def evaluate(self, psi, beta=None):
        """(:meth:`criterion`, the mode, the factor of the bordered matrix whose determinant it holds)."""
        self.evaluations += 1
        mode = self.mode(psi, beta)
        if self._gaussian_factor is not None and self.reml and beta is None:
            factor = self._gaussian_factor  # the mode's own: a Gaussian's working weights do not move with it
        else:
            assembly = self.full if self.reml and beta is None else self.latent_only
            factor = assembly.factor(self.X, mode.weights, self.precision_values(psi))
        log_det_h = factor_log_abs_det(factor) - np.sum(np.log(self.sizes))
        value = -2.0 * mode.loglik + mode.quadratic - self.log_det_prior(psi) + log_det_h
        if self.reml and beta is None:  # beta integrated out: flat coefficients leave 2 pi's, normal ones their prior
            normal = self.beta_precision > 0
            value += (self._beta_penalty(mode.theta[: self.p]) - np.sum(np.log(self.beta_precision[normal]))
                      - np.sum(~normal) * np.log(2 * np.pi))
        return value, mode, factor


def fit_spatial(sdesign: SpatialDesign, reml: bool, stages: int = 2) -> SpatialFit:
    """Fit a spatial model by the Laplace approximation (module docstring); psi by L-BFGS-B.

    A GLMM's ML fit has glmer's two stages: psi with beta at the joint mode (``stages=1``, glmer's ``nAGQ = 0``),
    then (psi, beta) together with the mode of x alone at each beta (``stages=2``, glmer's Laplace,
    ``nAGQ = 1``).  A Gaussian response or REML needs one: beta's profile is then exact (Gaussian) or beta is
    integrated out (REML).

    Parameters
    ----------
    sdesign : SpatialDesign
        The model (:func:`hierpool.spec.spatial.spatial_design`).
    reml : bool
        Integrate beta out under a flat prior (REML for a Gaussian response) instead of maximizing over it.
    stages : int
        1 or 2: glmer's stages of a GLMM's ML fit (above); ignored otherwise.

    Returns
    -------
    SpatialFit
        With the optimum's criterion, fixed effects and their covariance, each area's conditional mode and sd.

    References
    ----------
    Rue, Martino & Chopin (2009), JRSS B 71; Bates, Maechler, Bolker & Walker (2015), J. Stat. Softw. 67(1), sec. 5.
    """
    laplace = SpatialLaplace(sdesign, reml, bounded_mix=True)

    def objective(psi):
        value = laplace.criterion(psi)
        return value if np.isfinite(value) else 1e300

    bounds = laplace.bounds()
    result = _minimize(objective, laplace.start(), bounds)
    psi, beta = result.x, None
    if stages == 2 and not reml and not laplace.gaussian:
        laplace.mode(psi)
        k = len(psi)

        def joint(values):
            value = laplace.criterion(values[:k], values[k:])
            return value if np.isfinite(value) else 1e300

        start = np.concatenate([psi, laplace._theta[: laplace.p]])
        # from stage 1's optimum, which is close: no restarts (each costs a gradient, p + 3 evaluations of a
        # criterion whose mode at each beta is a PIRLS of its own)
        result = _minimize(joint, start, bounds + [(None, None)] * laplace.p, restarts=0)
        psi, beta = result.x[:k], result.x[k:]
        psi = onto_lower_bounds(lambda values: joint(np.concatenate([values, beta])), psi, bounds,
                                laplace.boundary_positions(), result.fun)
    else:
        psi = onto_lower_bounds(objective, psi, bounds, laplace.boundary_positions(), result.fun)
    fit = SpatialFit(laplace=laplace, psi=psi, beta=beta, optimizer=result, stages=stages)
    at_bound = fit.at_bound
    if at_bound:  # named by the parameter, not its search coordinate (log_sd: sd, logit_rho: rho)
        named = [name.removeprefix("logit_").removeprefix("log_") for name in at_bound]
        warnings.warn(f"the spatial fit's {', '.join(named)} is at its bound: the maximum of the likelihood "
                      "is at an sd of zero, or a mixing parameter of 0 or 1 (a singular fit)",
                      ConvergenceWarning, stacklevel=3)
    return fit


#: An sd (or a mix) within this factor of its lower bound is tried at the bound (:func:`onto_lower_bounds`).
SNAP_RATIO = 1e3


def onto_lower_bounds(objective, psi: np.ndarray, bounds, positions, value: float) -> np.ndarray:
    """psi with each coordinate of ``positions`` within log :data:`SNAP_RATIO` of its lower bound (an sd, or a mix,
    within that factor of it) moved onto the bound, one at a time, where the criterion there is at most
    :data:`hierpool.algebra.checks.BOUNDARY_RISE` (relative) above ``value``, the criterion at ``psi``.

    The spatial fit's twin of :func:`hierpool.algebra.checks.onto_boundary`: on log sd the criterion's slope
    vanishes as sd -> 0 (a variance enters as sd^2), and L-BFGS-B stops short of the bound where the optimum is on it
    (an ICAR sd of 1.8e-4 beside an iid term, 7e-7 above the bound's criterion, where lme4's theta reaches 0; a BYM2
    rho of 8e-10 where 0 is 1e-7 lower).  The sd's bound, 1e-5 of the response's scale, is 0 to the criterion's
    precision; the mix's is 0 (:func:`mix_from_logit`)."""
    psi = np.array(psi, dtype=float)
    for i in positions:
        low = bounds[i][0]
        if not low < psi[i] <= low + np.log(SNAP_RATIO):
            continue
        trial = psi.copy()
        trial[i] = low
        there = objective(trial)
        if np.isfinite(there) and there <= value + BOUNDARY_RISE * max(1.0, abs(value)):
            psi, value = trial, there
    return psi


def _minimize(objective, start, bounds, restarts: int = 5):
    """L-BFGS-B on the criterion divided by its gradient's norm at the start, restarted from where it stopped while
    a restart still lowers the criterion (up to :data:`RESTARTS` times).

    L-BFGS-B's first step is the Cauchy point of a model with unit curvature, x - g: with a gradient of 100 (a
    criterion in the hundreds, steep in log sd) it lands on the bounds, where the criterion is ill-conditioned
    (weights of 1e10), and its line search gives up there; scaled, the first step has unit length.  And its line
    search gives up on a criterion that flattens towards a bound (BYM2's rho -> 1 when the effects are all spatial),
    where a fresh start's first step goes on."""
    base = objective(start)
    steps = np.eye(len(start)) * FD_STEP
    gradient = np.array([(objective(start + step) - base) / FD_STEP for step in steps])
    scale = max(float(np.linalg.norm(gradient)), 1.0)

    def scaled(x):
        return objective(x) / scale

    options = {"ftol": 1e-15, "gtol": 1e-9 / scale, "maxiter": 500, "eps": FD_STEP}
    result = scipy.optimize.minimize(scaled, start, method="L-BFGS-B", bounds=bounds, options=options)
    stuck = False
    for _ in range(restarts):
        again = scipy.optimize.minimize(scaled, result.x, method="L-BFGS-B", bounds=bounds, options=options)
        improved = again.fun < result.fun - 1e-12 * abs(result.fun)
        # a restart at the optimum takes no step, or one of an ulp, and its line search gives up ("ABNORMAL"): taken
        # where it was no higher, its failure replaced a converged result (fit_batch's spatial rows then read not
        # converged: 26 of 200 ICAR bootstrap replicates); it is taken where it lowers the criterion beyond
        # rounding, or, no higher, where it alone met its tolerance
        tie = not improved and again.fun <= result.fun + 1e-12 * abs(result.fun)
        if improved or (tie and again.success and not result.success):
            result = again
        if not improved:
            # a fresh search from the result that takes no step cannot lower the criterion there: its lowest, though
            # the first search's line search gave up on the last rounding-sized steps (10 of 200 ICAR replicates)
            stuck = again.nit == 0
            break
    result.fun = result.fun * scale
    # met its tolerance, or stuck at its lowest (SpatialFit.converged; fit_batch's rows): a search that gives up
    # elsewhere, or the joint stage's (no restart), is not converged
    result.converged = bool(result.success or stuck)
    return result


class SpatialFit(Likelihood):
    """A spatial model fitted by the Laplace approximation (:func:`fit_spatial`): ``hp.lmm`` / ``hp.glmm`` with
    ``car(...)`` terms (and any ``(lhs | g)`` terms) and ``adjacency=``.

    Attributes
    ----------
    sd, mix : float
        The spatial term's sd and mixing parameter (BYM2's rho, proper CAR's alpha; 0 for ICAR), in a model with one
        spatial term (:meth:`hyperparameters` has every term's).
    sigma : float
        The residual sd (1 for a GLMM).
    objective : float
        The criterion at the optimum (-2 log likelihood, restricted for REML).
    """

    def __init__(self, *, laplace: SpatialLaplace, psi, beta, optimizer, stages: int):
        self.laplace, self.psi, self.optimizer, self.stages = laplace, np.asarray(psi), optimizer, stages
        value, self._mode, _ = laplace.evaluate(psi, beta)
        self.objective = float(value)
        self.sdesign = laplace.sdesign
        self.design = self.sdesign.design
        self.reml = laplace.reml
        self.sigma = laplace.sigma(self.psi)
        self._precision_values = laplace.precision_values(self.psi)

    @property
    def at_bound(self) -> list[str]:
        """The parameters of psi within 0.01 of a bound (an sd of zero, a mixing parameter of 0 or 1): a singular
        fit, warned of by :func:`fit_spatial`."""
        return [name for name, value, (low, high) in zip(self.laplace.names(), self.psi, self.laplace.bounds())
                if low is not None and min(value - low, high - value) < 1e-2]

    @property
    def converged(self) -> bool:
        """Whether the search ended at an optimum: L-BFGS-B met its tolerance, or its line search gave up
        ("ABNORMAL") where a fresh search from the result takes no step (:func:`_minimize`).  ``fit_batch``'s and
        ``hp.bootstrap``'s ``converged`` of a spatial dataset."""
        return bool(self.optimizer.converged)

    @property
    def is_singular(self) -> bool:
        """Whether some parameter is at its bound (:attr:`at_bound`), as lme4's ``isSingular``."""
        return bool(self.at_bound)

    def _car_index(self, term: str | None) -> int:
        """The block of the spatial term ``term`` (its area column; None: the model's only one)."""
        return self.sdesign.areas.index(self.sdesign.area_term(term))

    @property
    def sd(self) -> float:
        return float(self.car_parameters()[self._car_index(None), 0])

    @property
    def mix(self) -> float:
        return float(self.car_parameters()[self._car_index(None), 1])

    def covariance_factors(self) -> list[np.ndarray]:
        """Each ``(lhs | g)`` term's covariance factor L (Sigma = L L'), in ``design.terms``' order."""
        laplace, first = self.laplace, len(self.sdesign.areas)
        return [laplace.blocks[t].factor(laplace.block_psi(self.psi, t)) for t in range(first, len(laplace.blocks))]

    def car_parameters(self) -> np.ndarray:
        """(sd, mix) of each spatial term, shape (terms, 2)."""
        laplace = self.laplace
        return np.array([laplace.blocks[t].natural(laplace.block_psi(self.psi, t))
                         for t in range(len(self.sdesign.areas))])

    @property
    def n_params(self) -> int:
        return self.design.p + len(self.psi)

    @property
    def nobs(self) -> int:
        return self.design.n

    @property
    def beta(self) -> np.ndarray:
        return self._mode.theta[: self.design.p]

    @property
    def latent(self) -> np.ndarray:
        return self._mode.theta[self.design.p:]

    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self.beta, index=list(self.design.fixed_names), name="estimate")

    @property
    def fitted(self) -> np.ndarray:
        """The means of the rows at the conditional modes: offset + X beta + Z x (Gaussian) or its inverse link (a
        count's mean, a binomial's proportion), lme4's ``fitted`` (a Poisson row's: its expected count times its
        smoothed risk)."""
        eta = np.asarray(self._mode.eta, dtype=float)
        return eta.copy() if self.laplace.gaussian else self.laplace.family.link.inverse(eta)

    @property
    def residuals(self) -> np.ndarray:
        """y - fitted (Gaussian); a GLMM's deviance residuals (lme4's ``residuals(fit)``), whose squares sum to the
        deviance at the modes; :attr:`pearson_residuals` for (y - mu) sqrt(a / V(mu))."""
        if self.laplace.gaussian:
            return self.design.y - self.fitted
        return self.laplace.family.deviance_residuals(self.design.y, self.fitted, self.design.row_weights)

    @property
    def pearson_residuals(self) -> np.ndarray:
        """(y - mu) sqrt(a / V(mu)) for a GLMM, (y - mu) sqrt(w) / sigma for a Gaussian model (lme4's
        ``residuals(fit, type = "pearson")``)."""
        y, mu, weights = self.design.y, self.fitted, self.design.row_weights
        if self.laplace.gaussian:
            return (y - mu) * np.sqrt(weights) / self.sigma
        return self.laplace.family.pearson_residuals(y, mu, weights)

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "link", re: bool = True,
                interval: str | None = None, level: float = 0.95):
        """Predictions offset + x beta + each spatial term's effect of the row's area + z b of its ``(lhs | g)``
        levels, on the link or the response scale (lme4's ``predict(fit, newdata, type, re.form)``).

        Every area of the graph has an effect, with rows or without (its mode, from its neighbours'); an area not in
        the graph is refused by name; a ``(lhs | g)`` level never seen takes b = 0.  ``re=False``: offset + x beta.
        ``interval="confidence"``: a normal interval on the link scale from v' H^-1 v, H^-1 the joint constrained
        covariance of (beta, x) at the mode given psi (the bordered factor :attr:`vcov` reads; v the row's x and its
        coefficients on x), plus z Sigma z' for a level never seen; with ``type="response"`` mapped through the
        inverse link (``se`` by the delta method).  A Gaussian model's ``"prediction"`` interval adds sigma^2 / w;
        a GLMM has none (a new count is not normal), nor has ``re=False`` (an intrinsic CAR's effect has no
        marginal variance).
        """
        if type not in ("link", "response"):
            raise ArgumentError(f"type must be 'link' or 'response', got {type!r}")
        check_re(re)
        gaussian = self.laplace.gaussian
        check_interval(interval, (None, "confidence", "prediction") if gaussian and re else (None, "confidence"),
                       f" for this {'Gaussian' if gaussian else 'GLMM'} spatial fit{'' if re else ' at re=False'}")
        probability_argument("level", level)
        X, terms, offset = model_rows(self.design, newdata, levels_read=re)
        columns, values, unknown = self._latent_rows(newdata, terms, len(X)) if re else ([], [], np.zeros(len(X)))
        x = np.asarray(self.latent, dtype=float)
        fit = offset + X @ np.asarray(self.beta, dtype=float)
        for column, value in zip(columns, values):
            fit = fit + np.sum(value * x[column], axis=1)
        out = fit if interval is None else self._interval(fit, X, columns, values, unknown, newdata, interval, level)
        if type == "link" or self.laplace.gaussian:
            return out
        return on_response_scale(out, self.laplace.family.link)

    def _latent_rows(self, newdata, terms, n: int):
        """Per block, each row's latent coordinates (n, k) and their coefficients (n, k): a spatial term's area
        effect (coefficient 1), a (lhs | g) term's level's k effects (z; 0 for a level never seen); and each row's
        variance z Sigma z' of the levels never seen."""
        laplace, first = self.laplace, len(self.sdesign.areas)
        columns, values, unknown = [], [], np.zeros(n)
        for t, block in enumerate(laplace.blocks):
            start = int(laplace.latent_offsets[t])
            if t < first:
                area_term = self.sdesign.areas[t]
                area = (area_term.area if newdata is None else
                        areas_in_graph(area_term.term, area_term.graph, newdata[area_term.term.factor],
                                       " of the prediction data (newdata)"))
                columns.append(start + area[:, None])
                values.append(np.ones((area.size, 1)))
                continue
            z, level = terms[t - first]
            known = level >= 0
            columns.append(start + np.maximum(level, 0)[:, None] * z.shape[1] + np.arange(z.shape[1])[None, :])
            values.append(np.where(known[:, None], z, 0.0))
            cov = block.covariance(laplace.block_psi(self.psi, t))
            unknown = unknown + np.where(known, 0.0, np.einsum("nk,kl,nl->n", z, cov, z))
        return columns, values, unknown

    def _interval(self, fit, X, columns, values, unknown, newdata, interval, level) -> pd.DataFrame:
        """(fit, se, lower, upper) on the link scale: v' H^-1 v by the bordered factor, in chunks of rows."""
        p, m = self.design.p, self.laplace.m
        factor = self._factor_full
        variance = np.asarray(unknown, dtype=float) + solved_row_quadratic_forms(
            factor.solve, factor.shape[0], len(fit), [p + column for column in columns], values, lead=X,
            measured=p + m)
        if interval == "prediction":
            weights = new_row_weights(self.design, newdata)
            variance = variance + self.sigma**2 / (1.0 if weights is None else weights)
        return interval_table(fit, variance, level, row_labels(self.design, newdata))

    def _factor(self, assembly):
        return assembly.factor(self.laplace.X, self._mode.weights, self._precision_values)

    @cached_property
    def _factor_full(self):
        return self._factor(self.laplace.full)

    @cached_property
    def vcov(self) -> pd.DataFrame:
        """(H^-1)_beta beta under the constraints: the fixed effects' covariance given psi."""
        p, total = self.design.p, self._factor_full.shape[0]
        rhs = np.zeros((total, p))
        rhs[np.arange(p), np.arange(p)] = 1.0
        cov = self._factor_full.solve(rhs)[:p]
        names = list(self.design.fixed_names)
        return pd.DataFrame(0.5 * (cov + cov.T), index=names, columns=names)

    @property
    def fixef_se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.vcov.index, name="se")

    @cached_property
    def _latent_variances(self) -> np.ndarray:
        """diag of the constrained (H_xx)^-1: each latent coordinate's conditional variance given beta^."""
        factor = self._factor(self.laplace.latent_only)
        return inverse_diagonal(factor.solve, factor.shape[0], 0, self.laplace.m)

    def _effects_slice(self, t: int) -> slice:
        """Where term t's effects (a spatial term's b, a (lhs | g) term's u) lie in the latent vector."""
        start = int(self.laplace.latent_offsets[t])
        return slice(start, start + self.laplace.blocks[t].n_effects)

    def _block_index(self, term: str | None) -> int:
        """The block of a term: a spatial term by its area column or label (None: the model's only one), a
        ``(lhs | g)`` term by its label."""
        labels = [b.term.label for b in self.laplace.blocks]
        first = len(self.sdesign.areas)
        return labels.index(term, first) if term in labels[first:] else self._car_index(term)

    def ranef_joint_sd(self, term: str | None = None) -> np.ndarray:
        """Each effect's sd with beta's uncertainty too: sqrt of the x block's diagonal of the constrained H^-1
        (for a Gaussian response with REML, the posterior sd of the effects given the variance parameters and a
        flat prior on beta; lme4's ``condsd``, :attr:`ranef`'s, holds beta at its estimate and is smaller).
        ``term``: a spatial term's area column or a term's label (None: the model's only spatial term), in
        :attr:`ranef`'s order."""
        where = self._effects_slice(self._block_index(term))
        factor = self._factor_full
        return np.sqrt(inverse_diagonal(factor.solve, factor.shape[0], self.design.p + where.start,
                                        where.stop - where.start))

    def _car_table(self, t: int) -> pd.DataFrame:
        """Spatial term t's table (:attr:`ranef`)."""
        block = self.laplace.blocks[t]
        prior, where = block.prior, self._effects_slice(t)
        b = self.latent[where]
        table = pd.DataFrame({"effect": b, "condsd": np.sqrt(self._latent_variances[where])},
                             index=pd.Index(block.area_term.graph.labels, name=block.term.factor))
        if prior.type == "bym2":
            sd, mix = block.natural(self.laplace.block_psi(self.psi, t))
            v = self.laplace.block_latent(self.latent, t)[prior.n:]
            # b = sd sqrt(1 - rho) u + its spatial part, and the mode of u is (b - spatial part) / (sd sqrt(1 - rho))
            spatial = compose_bym2(sd, mix, np.zeros(prior.n), v, prior.scaling)[1]
            table["spatial"] = spatial
            table["unstructured"] = b - spatial
        if self._log_link:
            table["relative_risk"] = np.exp(b)
        table["rows"] = block.area_term.area_rows()
        return table

    def _group_table(self, t: int) -> pd.DataFrame:
        """A (lhs | g) term's conditional modes and sds, by level (and coefficient, for k > 1)."""
        term, where = self.laplace.blocks[t].term, self._effects_slice(t)
        table = pd.DataFrame({"effect": self.latent[where], "condsd": np.sqrt(self._latent_variances[where])},
                             index=group_effect_index(term))
        table["rows"] = np.repeat(np.bincount(term.index, minlength=term.n_levels), term.k)
        return table

    @cached_property
    def ranef(self) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Each area's effect b (its conditional mode), conditional sd, and for BYM2 the spatial part
        sd sqrt(rho) S v and the unstructured rest; for a log link its relative risk exp(b), the area's risk
        against the covariates' expectation; ``rows`` the area's number of data rows.

        A model with several random terms gets a dict of such tables keyed by each term's label
        (``"car(county, type='icar')"``, ``"(1 | county)"``); a ``(lhs | g)`` term's has its levels' conditional
        modes and sds."""
        tables = {self.laplace.blocks[t].term.label: (self._car_table(t) if t < len(self.sdesign.areas)
                                                       else self._group_table(t))
                  for t in range(len(self.laplace.blocks))}
        return next(iter(tables.values())) if self.sdesign.single else tables

    @property
    def _log_link(self) -> bool:
        return self.design.family is not None and self.design.family.link == "log"

    def _log_risk_sd(self, t: int) -> np.ndarray:
        """Each area's sd of log RR_a = log sum_(i in a) w_i mu_i - log E_a given beta^, by the delta method:
        sqrt(g_a' H_xx^-1 g_a) under the constraints, g_a = Z' (w mu 1[area(i) = a]) / sum_(i in a) w_i mu_i, every
        term's effects counted (in BYM's car(a, type='icar') + (1 | a), phi_a + u_a with their covariance).  Where
        the spatial term is the model's one random term, g_a is the area's unit vector: its effect's conditional
        sd.  NaN for an area without rows."""
        area_term, laplace = self.sdesign.areas[t], self.laplace
        weighted_mu = self.design.row_weights * np.exp(self._mode.eta)
        totals = np.bincount(area_term.area, weights=weighted_mu, minlength=area_term.n_areas)
        factor = self._factor(laplace.latent_only)
        areas = np.flatnonzero(area_term.area_rows() > 0)
        out = np.full(area_term.n_areas, np.nan)
        for start in range(0, areas.size, DIAGONAL_CHUNK):
            chunk = areas[start:start + DIAGONAL_CHUNK]
            position = np.full(area_term.n_areas, -1)
            position[chunk] = np.arange(chunk.size)
            column = position[area_term.area]
            rows = np.flatnonzero(column >= 0)
            share = weighted_mu[rows] / totals[area_term.area[rows]]
            gradient = np.zeros((factor.shape[0], chunk.size))
            for slot in range(laplace.rows.columns.shape[1]):
                np.add.at(gradient, (laplace.rows.columns[rows, slot], column[rows]),
                          laplace.rows.values[rows, slot] * share)
            solved = factor.solve(gradient)
            out[chunk] = np.sqrt(np.einsum("ij,ij->j", gradient[: laplace.m], solved[: laplace.m]))
        return out

    def relative_risk(self, level: float = 0.95, term: str | None = None) -> pd.DataFrame:
        """Per area with data (log link): observed and expected counts (expected = exp(offset), summed over the
        area's rows), the raw SIR observed / expected, and the smoothed relative risk sum mu^ / expected with an
        interval exp(log RR +- z sd) from log RR's conditional sd (beta held at beta^; every term's effects counted,
        :meth:`_log_risk_sd`).  ``term``: the spatial term's area column, where the model has several."""
        if not self._log_link:
            raise ArgumentError("relative risks are for a count model with a log link (family='poisson')")
        probability_argument("level", level)
        t = self._car_index(term)
        return area_risk_table(self.sdesign.areas[t], self.design.y, np.exp(self.design.offset),
                               np.exp(self._mode.eta), self.design.row_weights, self._log_risk_sd(t), level)

    def hyperparameters(self) -> pd.Series:
        """Each term's sd (``sd`` and ``rho`` (BYM2) or ``alpha`` (proper CAR) where the model's one random term is
        spatial; else suffixed ``_car_<area column>``, and a ``(lhs | g)`` term's ``sd_<group>`` or
        ``sd_<group>_<coefficient>`` and ``cor_<group>_<a>_<b>``), and sigma (Gaussian)."""
        out = {}
        for t, block in enumerate(self.laplace.blocks):
            out |= block.hyperparameters(self.laplace.block_psi(self.psi, t))
        if self.laplace.gaussian:
            out["sigma"] = self.sigma
        return pd.Series(out)

    def summary(self) -> str:
        kind = "REML" if self.reml else "ML"
        engine = "Gaussian" if self.laplace.gaussian else f"{self.design.family.name}, Laplace"
        labels = ", ".join(b.term.label for b in self.laplace.blocks)
        areas = ", ".join(str(a.n_areas) for a in self.sdesign.areas)
        lines = [f"Spatial model ({labels}; {engine}, {kind}), {self.design.n} rows, {areas} areas",
                 f"formula: {self.design.spec.formula}", f"criterion: {self.objective:.4f}  logLik: {self.loglik:.4f}",
                 "", "Fixed effects:", pd.DataFrame({"estimate": self.fixef, "se": self.fixef_se}).to_string(),
                 "", "Random terms:", self.hyperparameters().to_string()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def area_risk_table(area_term: AreaTerm, observed: np.ndarray, expected: np.ndarray, fitted: np.ndarray,
                    weights: np.ndarray, log_sd: np.ndarray | None, level: float) -> pd.DataFrame:
    """Per area with rows: observed, expected, SIR and the smoothed risk sum fitted / sum expected, each row counted
    ``weights`` times (a Poisson row's prior weight multiplies its log-likelihood: a frequency), with an interval
    from each area's log-scale sd where given (one per area of the graph)."""
    n = area_term.n_areas
    sums = [np.bincount(area_term.area, weights=weights * v, minlength=n) for v in (observed, expected, fitted)]
    has = area_term.area_rows() > 0
    table = pd.DataFrame({"observed": sums[0], "expected": sums[1], "sir": sums[0] / np.where(has, sums[1], np.nan),
                          "relative_risk": sums[2] / np.where(has, sums[1], np.nan)},
                         index=pd.Index(area_term.graph.labels, name=area_term.term.factor))
    if log_sd is not None:
        z = normal_quantile(level)
        table["lower"] = table["relative_risk"] * np.exp(-z * log_sd)
        table["upper"] = table["relative_risk"] * np.exp(z * log_sd)
    return table.loc[has]
