"""``hp.fit_batch`` on random-effect columns centred and scaled per dataset where a dataset's are far from it.

A term ``(1 + year | g)`` with year around 2000 puts the intercept's variance two thousand units from the data:
the intercept and slope are then correlated at nearly -1, one diagonal element of the relative factor is ~1e-4,
and a search from the moment start stops on the ridge, reporting convergence (a batch row 5 units of -2 log L above
``hp.lmm``'s fit, which conditions).  The model does not depend on the columns' parametrization
(:mod:`hierpool.algebra.conditioning`), so each dataset that needs it
(:func:`~hierpool.algebra.conditioning.needs_conditioning`, ``hp.lmm``'s rule) is searched on its own columns
z M_d, M_d from its own rows (:func:`~hierpool.algebra.conditioning.term_transforms`), and its theta, relative
factors, BLUPs and conditional variances are mapped back: b = M b~, Var(b | y) = M Var(b~ | y) M^T.  beta, its
covariance, sigma, phi and the criterion are unchanged.  The other datasets keep their columns (M = I), and a
batch none of whose datasets needs it is not touched.

The fixed-effect columns are conditioned by the same rule, then orthogonalised as hp.lmm's
(:func:`~hierpool.algebra.conditioning.orthogonalised`, one stacked QR per row count): X A_d, beta = A beta~,
Cov(beta) = A Cov(beta~) A^T, and REML's criterion, whose log |X' V^-1 X| moves by 2 log |det A|, is mapped back
too.  A GLMM's search moves
beta with theta (``hp.glmm``'s own search is scaled by its start's Hessian instead,
:mod:`hierpool.closedform.glmm_scaling`); the linear paths profile beta out, but their sums of X'X lost digits
on a column far from centred (x = 200,000 + z: a search stopped short and the dataset was refitted alone, the
AR(1) path's refit 5e-8 off the criterion of the same model on z).  X's rank is still judged on the user's columns
(:attr:`~hierpool.batch.plan.BatchPlan.user_aliased`).

With known residual sds (``se=``) theta is an sd in the response's units, and every dataset whose sds' unit
(their geometric mean in whole decades, :func:`~hierpool.algebra.linalg.weights_unit` of the weights 1 / se^2) is
not 1 is searched on z s (M times s): its theta over s, so that the searches' tolerances and lme4's singular rule,
applied to the user's theta over s here, are relative to the sds, as ``hp.lmm``'s
(:func:`hierpool.closedform.optimize.known_sds_unit`).  The fit then scales with the response and its sds.

A linear model's prior weights set theta's unit the same way (theta is relative to sigma, in the weights' units:
weights times c leave the model as it is with theta / sqrt(c)), and its datasets are searched over it too; lme4's
singular rule stays on the user's theta there, as lme4's and ``hp.lmm``'s.  Searched in absolute theta, weights of
~1e9 (theta's unit 3.2e-5) left a several-term search on the criterion's far plateau, a REML criterion 145 above
``hp.lmm``'s fit reported converged, and a one-term search 7.6e-4 above, its steps' tolerance 3% of the unit (the
fifty-fifth session).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..algebra.checks import fitted_singular
from ..algebra.conditioning import (
    blocks_moments,
    effects_to_user,
    fixed_logdet,
    fixed_to_user,
    group_rows,
    needs_conditioning,
    orthogonalised,
    term_transforms,
    thetas_to_user,
    transformed_columns,
)
from ..algebra.linalg import theta_to_factors
from ..closedform.optimize import Control
from .plan import BatchPlan


@dataclasses.dataclass(frozen=True)
class BatchConditioning:
    """The plan on conditioned columns, each term's M per dataset (n_datasets, k, k), and which datasets have an M
    other than the identity; with known residual sds, each dataset's unit of them (M's factor)."""

    plan: BatchPlan
    transforms: tuple[np.ndarray, ...]
    conditioned: np.ndarray
    fixed: tuple[np.ndarray, ...] | None = None  # A's factors per dataset, each (n_datasets, p, p)
    reml: bool = False  # the criterion is REML's: log |X' V^-1 X| moves by 2 log |det A| with X A
    sd_units: np.ndarray | None = None  # known residual sds' unit per dataset (their M's factor), None without se=

    def to_user(self, out: dict) -> dict:
        """The results ``out`` of a fit of :attr:`plan` (:func:`hierpool.batch.fit_terms.run_jobs`'s dict) on the
        user's columns, in place: theta (and lme4's singularity rule on it), each term's relative factors, BLUPs
        and conditional variances of the conditioned datasets that were fitted."""
        rows = np.flatnonzero(self.conditioned & np.all(np.isfinite(out["theta"]), axis=1))
        if not rows.size:
            return out
        if self.fixed is not None:
            factors = [f[rows] for f in self.fixed]
            out["beta"][rows], out["vcov"][rows] = fixed_to_user(factors, out["beta"][rows], out["vcov"][rows])
            if self.reml:  # log |A' X' V^-1 X A| = log |X' V^-1 X| + 2 log |det A|
                out["objective"][rows] -= 2.0 * fixed_logdet(factors)
        ks = tuple(m.shape[-1] for m in self.transforms)
        transforms = [m[rows] for m in self.transforms]
        theta = thetas_to_user(out["theta"][rows], transforms)
        out["theta"][rows] = theta
        factors = theta_to_factors(theta, ks)
        for t, m in enumerate(transforms):
            effects, variances = out["b"][t], out["cond_var"][t]
            # the datasets of one level count mapped at once (every dataset of a shared design is conditioned)
            counts = np.array([np.shape(effects[d])[0] for d in rows])
            for count in np.unique(counts):
                group = np.flatnonzero(counts == count)
                members = rows[group]
                b, cond_var = effects_to_user(m[group], np.stack([effects[d] for d in members]),
                                              np.stack([variances[d] for d in members]))
                for i, d in enumerate(members):
                    effects[d], variances[d] = b[i], cond_var[i]
            for i, d in enumerate(rows):
                out["factors"][t][d] = factors[t][i]
        # lme4's rule on the user's theta; with known sds relative to their unit, as the search's (theta over it)
        tol = Control.singular_tol * (1.0 if self.sd_units is None else self.sd_units[rows][:, None])
        out["is_singular"][rows] = fitted_singular(out["objective"][rows], theta, ks, tol)
        return out


def condition_batch(plan: BatchPlan, reml: bool = False, linear: bool = True) -> BatchConditioning | None:
    """The batch on each dataset's random-effect and fixed-effect columns centred and scaled where that dataset's
    are far from it (the module notes); None where no dataset's are.  ``reml``: the criterion of the fit is REML's
    (its log-determinant of X' V^-1 X is mapped back too).  ``linear``: a linear model, whose prior weights give
    theta's unit (a GLMM's weights do not: it has no sigma)."""
    design, n = plan.design, plan.n_datasets
    blocks = [term.z for term in design.terms] + ([design.X] if design.p else [])
    if not blocks:
        return None
    # each distinct column's moments summed once, a column of ones' not at all (the intercept in z and X)
    moments = blocks_moments(blocks, plan.dataset, n)
    conditioned = np.logical_or.reduce([np.zeros(n, dtype=bool)] + [needs_conditioning(z, plan.dataset, n, m)
                                                                     for z, m in zip(blocks, moments)])
    # known residual sds: theta is an sd in the response's units, searched over their unit (M times it); prior weights
    # of a linear model: theta is relative to sigma, in the weights' units, searched over theirs (weights times c
    # leave the model as it is with theta / sqrt(c))
    weighted = design.weights is not None and (design.sigma_known or linear)
    units = plan.weights_units() if weighted else np.ones(n)
    scaled = units != 1.0
    if not (conditioned.any() or scaled.any()):
        return None
    block_transforms = [term_transforms(z, plan.dataset, n, m) for z, m in zip(blocks, moments)]
    transforms, terms = [], []
    for term, transform in zip(design.terms, block_transforms):
        transform[~conditioned] = np.eye(term.k)  # the others keep their columns (and their numbers)
        transform *= units[:, None, None]
        transforms.append(transform)
        z = transformed_columns(term.z, transform, plan.dataset)
        terms.append(dataclasses.replace(term, z=np.ascontiguousarray(z)))
    columns, fixed = {"terms": tuple(terms)}, None
    if design.p and conditioned.any():
        centring = block_transforms[-1]
        centring[~conditioned] = np.eye(design.p)
        columns["X"], r_inverse = _orthogonalised_per_dataset(
            transformed_columns(design.X, centring, plan.dataset), plan.dataset, conditioned)
        fixed = (centring, r_inverse)
    # X's aliased columns are the user's columns' (hp.glmm drops such a column, which conditioned is not aliased)
    fitted = dataclasses.replace(plan, design=dataclasses.replace(design, **columns), user_aliased=plan.fixed_aliased)
    return BatchConditioning(fitted, tuple(transforms), conditioned | scaled, fixed, reml=reml,
                             sd_units=units if design.sigma_known else None)


def _orthogonalised_per_dataset(X: np.ndarray, dataset: np.ndarray, conditioned: np.ndarray):
    """Each conditioned dataset's rows of X (centred and scaled already) orthogonalised as ``hp.lmm``'s
    (:func:`~hierpool.algebra.conditioning.orthogonalised`), the datasets of one row count in one stacked QR: (X, the
    second factor of A per dataset, identities where not conditioned).  An interaction with a shifted covariate stays
    nearly collinear with its factor's columns after the centring alone."""
    n_datasets, p = len(conditioned), X.shape[1]
    r_inverse = np.tile(np.eye(p), (n_datasets, 1, 1))
    targets = np.flatnonzero(conditioned)
    if targets.size:
        order, bounds = group_rows(dataset, n_datasets)
        counts = np.diff(bounds)
        for size in np.unique(counts[targets]):
            members = targets[counts[targets] == size]
            rows = order[bounds[members][:, None] + np.arange(size)[None, :]]  # (members, size)
            X[rows], r_inverse[members] = orthogonalised(X[rows])
    return np.ascontiguousarray(X), r_inverse
