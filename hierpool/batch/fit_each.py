"""Batches of the models whose single fit has no batched form: a relationship matrix (``relmat=``) and spatial
``car()`` terms, fitted dataset by dataset by the single fit itself.

Their single fits run on the host's sparse algebra: :mod:`hierpool.closedform.relmat` (SuperLU on the mixed-model
equations, Brent's method or L-BFGS-B on theta) and :mod:`hierpool.closedform.spatial` (the sparse Laplace
approximation, L-BFGS-B on psi).  Neither is written over a leading dataset axis, so a batch of them is each
dataset's ``hp.lmm`` / ``hp.glmm`` fit, called as the user would call it: every row equals the single fit exactly,
by the same code (not a second implementation to keep equal).  What the batch adds:

* **Shared pieces built once.**  The relationship (A^-1 and log|A|: a dense inversion or a sparse factorization)
  and the neighbourhood graphs are built before the loop and handed to every dataset's fit
  (:mod:`hierpool.spec.relationship` and :mod:`hierpool.spec.spatial` take them as built).
* **The model checked once.**  The formula, the relationship or graphs and the arguments are checked on the long
  frame first, so a mistake common to all datasets is one error, not one failed row per dataset.
* **Rows that keep their failures.**  A dataset whose fit raises keeps the error in its row's message (its numbers
  NaN); its fit's warnings (a boundary fit, say) are kept in its message too.
* **Memory per dataset.**  Each fit's numbers are taken out (:func:`relmat_row`, :func:`spatial_row`) and the fit
  is dropped: one fit is held at a time.

The loop is serial: the fits are mostly Python around small sparse factorizations, and warnings are recorded by
``warnings.catch_warnings``, which is process-wide (threads would mix their datasets' warnings).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from ..errors import ArgumentError, HierpoolWarning
from ..spec.design import build_design
from ..spec.formula import has_spatial_term
from .plan import dataset_arguments, dataset_codes, long_frame, progress_bar, refuse_stateful, row_argument
from .results import BatchResult, BatchTerm


@dataclass(frozen=True)
class DatasetFit:
    """One dataset's numbers, taken out of its single fit.

    ``terms``: per random term in the batch's order, (levels, b (ell, k), cond_sd (ell, k), covariance (k, k)).
    ``hyperparameters``: a spatial fit's named parameters (``SpatialFit.hyperparameters``), else None.
    """

    theta: np.ndarray
    objective: float
    converged: bool
    beta: pd.Series  # by fixed-effect name: a dataset's fit may drop an aliased column
    vcov: pd.DataFrame
    sigma: float
    is_singular: bool
    terms: list
    hyperparameters: dict | None = None


def relmat_row(fit, order: list[tuple]) -> DatasetFit:
    """A :class:`~hierpool.closedform.relmat.RelmatResult`'s numbers; ``order``: the batch's terms as (group,
    coefficients), which the dataset's fit may list in another order (lme4's, by its own level counts).  The
    relationship term's effects cover every level of A (breeding values of animals without records too)."""
    ranef = fit.ranef
    position = {(t.group, tuple(t.coef_names)): j for j, t in enumerate(fit.design.terms)}
    terms, theta = [], []
    for key in order:
        j = position[key]
        part = ranef[ranef["grpvar"] == key[0]]
        theta.append(fit.theta[j])
        terms.append((part["grp"].to_numpy(), part["condval"].to_numpy()[:, None], part["condsd"].to_numpy()[:, None],
                      np.array([[(fit.theta[j] * fit.sigma) ** 2]])))
    return DatasetFit(theta=np.asarray(theta), objective=fit.objective, converged=fit.converged,
                      beta=fit.fixef, vcov=fit.vcov, sigma=fit.sigma,
                      is_singular=fit.is_singular, terms=terms)


def spatial_row(fit, order: list[tuple]) -> DatasetFit:
    """A :class:`~hierpool.closedform.spatial.SpatialFit`'s numbers, its terms in ``order`` (:func:`term_keys`):
    each spatial term's areas' effects and conditional sds (covariance sd^2), each ``(lhs | g)`` term's levels'.
    ``theta`` is the fit's psi (log sds, logits of mixing parameters, covariance factors' entries)."""
    tables = fit.ranef
    blocks = fit.laplace.blocks
    if not isinstance(tables, dict):
        tables = {blocks[0].term.label: tables}
    n_spatial = len(fit.sdesign.areas)
    factors = fit.covariance_factors()
    pieces = {}
    for t, block in enumerate(blocks):
        table = tables[block.term.label]
        if t < n_spatial:
            sd = block.natural(fit.laplace.block_psi(fit.psi, t))[0]
            pieces[(block.term.factor, (block.term.label,))] = (
                table.index.to_numpy(), table["effect"].to_numpy()[:, None], table["condsd"].to_numpy()[:, None],
                np.array([[sd**2]]))
        else:
            term, factor = block.term, factors[t - n_spatial]
            shape = (term.n_levels, term.k)  # the table is level-major: level 0's coefficients, then level 1's
            pieces[(term.group, tuple(term.coef_names))] = (
                np.asarray(term.levels), table["effect"].to_numpy().reshape(shape),
                table["condsd"].to_numpy().reshape(shape), factor @ factor.T)
    return DatasetFit(theta=np.asarray(fit.psi, dtype=float), objective=fit.objective,
                      converged=bool(fit.optimizer.success), beta=fit.fixef, vcov=fit.vcov, sigma=float(fit.sigma),
                      is_singular=fit.is_singular, terms=[pieces[key] for key in order],
                      hyperparameters=dict(fit.hyperparameters()))


def term_keys(sdesign=None, design=None) -> list[tuple]:
    """The batch's random terms as (group, coefficients): a spatial design's spatial terms as (area column,
    (label,)) then its ``(lhs | g)`` terms, or a design's terms."""
    areas = [] if sdesign is None else [(a.term.factor, (a.term.label,)) for a in sdesign.areas]
    design = sdesign.design if sdesign is not None else design
    return areas + [(t.group, tuple(t.coef_names)) for t in design.terms]


def fit_each(formula: str, data, by: str, *, fitter, row, weights=None, offset=None, progress=None):
    """Fit each dataset with ``fitter(formula, frame, **arguments)`` and take its numbers out with ``row(fit)``.

    Returns (dataset labels, per dataset a :class:`DatasetFit` or None, per dataset its message).  The model was
    checked on the long frame by the caller (module notes).
    """
    frame = long_frame(data, by)
    frame = frame.set_axis(pd.RangeIndex(len(frame)), axis=0)  # positions as labels: the user's frame untouched
    codes, labels = dataset_codes(frame[by], by)
    order = np.argsort(codes, kind="stable")
    rows = np.split(order, np.searchsorted(codes[order], np.arange(1, len(labels))))
    fits, messages = [], []
    with progress_bar(progress, len(labels), "fit_batch") as bar:
        for dataset_rows in rows:
            arguments = dataset_arguments(dataset_rows, weights, offset)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HierpoolWarning)
                try:
                    fits.append(row(fitter(formula, frame.iloc[dataset_rows], **arguments)))
                    message = ""
                except Exception as exc:  # kept in the dataset's row, never raised for the batch
                    fits.append(None)
                    message = f"{type(exc).__name__}: {exc}"
            said = [str(w.message) for w in caught if issubclass(w.category, HierpoolWarning)]
            messages.append("; ".join(dict.fromkeys(said + ([message] if message else []))))
            bar.update(1)
    return labels, fits, messages


def each_result(labels: pd.Index, fits: list, messages: list, *, fixed_names, terms: list[tuple], reml: bool,
                sigma_known: bool) -> BatchResult:
    """The :class:`BatchResult` of :func:`fit_each`'s rows.  ``terms``: per random term (group, coefficients),
    in the rows' order; a failed dataset's numbers are NaN and its levels empty."""
    n, p = len(labels), len(fixed_names)
    done = [f for f in fits if f is not None]
    m = done[0].theta.size if done else 0

    def stack(name, shape, fill=np.nan):
        return np.stack([np.full(shape, fill) if f is None else np.asarray(getattr(f, name), dtype=float)
                         for f in fits]) if n else np.zeros((0,) + shape)

    batch_terms = []
    for t, (group, coef_names) in enumerate(terms):
        k = len(coef_names)
        pieces = [(np.array([], dtype=object), np.zeros((0, k)), np.zeros((0, k)), np.full((k, k), np.nan))
                  if f is None else f.terms[t] for f in fits]
        batch_terms.append(BatchTerm(group=group, coef_names=tuple(coef_names),
                                     covariance=np.stack([piece[3] for piece in pieces]) if n else np.zeros((0, k, k)),
                                     levels=[piece[0] for piece in pieces], b=[piece[1] for piece in pieces],
                                     cond_sd=[piece[2] for piece in pieces]))
    hyperparameters = None
    if done and done[0].hyperparameters is not None:
        hyperparameters = pd.DataFrame([{} if f is None else f.hyperparameters for f in fits], index=labels,
                                       columns=list(done[0].hyperparameters))
    converged = np.array([f is not None and bool(f.converged) for f in fits], dtype=bool)
    singular = np.array([f is not None and bool(f.is_singular) for f in fits], dtype=bool)
    names = list(fixed_names)
    # by name: a column a dataset's fit dropped as aliased is NaN in its row
    beta = np.array([np.full(p, np.nan) if f is None else f.beta.reindex(names).to_numpy(dtype=float)
                     for f in fits]).reshape(n, p)
    vcov = np.array([np.full((p, p), np.nan) if f is None else f.vcov.reindex(index=names, columns=names)
                     .to_numpy(dtype=float) for f in fits]).reshape(n, p, p)
    return BatchResult(
        datasets=labels,
        fixed_names=tuple(fixed_names),
        terms=tuple(batch_terms),
        theta=stack("theta", (m,)),
        objective=pd.Series(stack("objective", ()), index=labels, name="objective"),
        converged=pd.Series(converged, index=labels, name="converged"),
        refit=pd.Series(np.zeros(n, dtype=bool), index=labels, name="refit"),
        is_singular=pd.Series(singular, index=labels, name="is_singular"),
        messages=pd.Series(messages, index=labels, name="message"),
        beta=beta,
        beta_se=np.sqrt(np.diagonal(vcov, axis1=1, axis2=2)),
        sigma=stack("sigma", ()),
        reml=reml,
        sigma_known=sigma_known,
        hyperparameters=hyperparameters,
    )


def fit_batch_each(formula: str, data, by: str, *, family, link, reml: bool | None, nAGQ: int, weights, offset,
                   se, relmat, relmat_inverse, adjacency, progress) -> BatchResult:
    """``hp.fit_batch`` of a model with a relationship matrix or spatial terms (module notes): the model checked
    on the long frame, its relationship or graphs built once, then each dataset's ``hp.lmm`` / ``hp.glmm``."""
    from ..closedform import glmm, lmm
    from ..spec.family import family_spec
    from ..spec.relationship import model_relationship
    from ..spec.spatial import spatial_design  # SciPy's sparse algebra: loaded only for these models

    frame = long_frame(data, by)
    refuse_stateful(formula, "fit_batch", "hp.glmm" if family else "hp.lmm")
    arguments = dict(weights=row_argument(weights, "weights", data, frame),
                     offset=row_argument(offset, "offset", data, frame))
    if relmat is not None or relmat_inverse is not None:
        from ..closedform.relmat import check_design

        if adjacency is not None or has_spatial_term(formula):
            raise ArgumentError("relmat= with a spatial term (car(), adjacency=) is not supported: give one of them")
        reml = True if reml is None else bool(reml)
        rel = model_relationship(formula, relmat, relmat_inverse)
        spec = None if family is None else family_spec(family, link)
        design = build_design(formula, frame, se=se, family=spec, related=(rel.group,), **arguments)
        check_design(design, rel)  # refuses a family, known sds, vector terms: by name, once
        keys = term_keys(design=design)
        fitter = partial(lmm, reml=reml, relmat_inverse={rel.group: rel})
        row = partial(relmat_row, order=keys)
        fixed_names, sigma_known = design.fixed_names, False
    else:
        if se is not None:
            raise ArgumentError("se= is not supported with a spatial term (adjacency=) yet")
        spec = None if family is None else family_spec(family, link)
        if nAGQ > 1:
            raise ArgumentError(f"nAGQ={nAGQ}: a spatial model is fitted by the Laplace approximation (nAGQ 0 or 1)")
        reml = (spec is None) if reml is None else bool(reml)
        sdesign = spatial_design(formula, frame, adjacency, family=spec, **arguments)
        keys = term_keys(sdesign=sdesign)
        graphs = {area.term.factor: area.graph for area in sdesign.areas}  # built once, for every dataset
        fitter = (partial(lmm, reml=reml, adjacency=graphs) if spec is None else
                  partial(glmm, family=family, link=link, nAGQ=nAGQ, reml=reml, adjacency=graphs))
        row = partial(spatial_row, order=keys)
        fixed_names, sigma_known = sdesign.design.fixed_names, spec is not None
    labels, fits, messages = fit_each(formula, frame, by, fitter=fitter, row=row, progress=progress, **arguments)
    return each_result(labels, fits, messages, fixed_names=fixed_names, terms=keys, reml=reml,
                       sigma_known=sigma_known)
