"""Batches of the models whose single fit has no batched form: a relationship matrix (``relmat=``) and spatial
``car()`` terms, fitted dataset by dataset by the single fit itself (and animal models on a shared design by
their spectral specialisation).

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
* **One specialisation, where it pays.**  Animal-model datasets that share their rows (many traits of one herd:
  the same animals and covariates, only the response differs), with one relationship term and no weights, are
  fitted together by :mod:`hierpool.closedform.relmat_spectral` (:func:`spectral_fits`: one eigendecomposition of
  Z A Z' per shared design, then every dataset's criterion over theta at once); their criterion is the sparse
  equations' (tested equal), theta found by a grid and golden sections to 1e-10 in log theta: the profile's
  lowest point (where it has two local minima, the single fit's Brent search may stop at the other, higher one).
  Datasets the single fit would refuse or warn about are left to it (:func:`spectral_fits`).

The loop is serial: the fits are mostly Python around small sparse factorizations, and warnings are recorded by
``warnings.catch_warnings``, which is process-wide (threads would mix their datasets' warnings).  A dataset's
hierpool warnings go to its message; others (NumPy's, SciPy's) are not kept.  A dataset whose own fixed-effect
columns differ from the batch's (a factor level missing from it) is refused in its row
(:func:`check_fixed_effects`), as the batched paths refuse it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from ..closedform.glmm import check_quadrature
from ..closedform.results import term_rows
from ..errors import ArgumentError, ConvergenceWarning, DataError, HierpoolError, HierpoolWarning
from ..spec.design import build_design
from ..spec.formula import has_spatial_term
from ..spec.transforms import caller_names
from . import host_processes
from .plan import (
    EMPTY_DATASET,
    dataset_arguments,
    dataset_labels_of,
    host_chunk,
    label_codes,
    progress_bar,
    rows_by_code,
    stacked_design,
    thread_count,
    value_columns,
)
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
    covariances = fit.term_covariances()
    terms, theta = [], []
    for key in order:
        j = position[key]
        part = term_rows(ranef, key[0], key[1][0])
        theta.append(fit.theta[j])
        terms.append((part["grp"].to_numpy(), part["condval"].to_numpy()[:, None], part["condsd"].to_numpy()[:, None],
                      covariances[j]))
    return DatasetFit(theta=np.asarray(theta), objective=fit.objective, converged=fit.converged,
                      beta=fit.fixef, vcov=fit.vcov, sigma=fit.sigma, is_singular=fit.is_singular, terms=terms)


def by_coefficient(values: np.ndarray, k: int) -> np.ndarray:
    """A spatial fit's or posterior's per-effect rows of a ``(lhs | g)`` term, level-major (level 0's k
    coefficients, then level 1's), as (ell, k, ...)."""
    return values.reshape((-1, k) + values.shape[1:])


def spatial_row(fit, order: list[tuple]) -> DatasetFit:
    """A :class:`~hierpool.closedform.spatial.SpatialFit`'s numbers, its terms in ``order`` (:func:`term_keys`):
    each spatial term's areas' effects and conditional sds (covariance sd^2), each ``(lhs | g)`` term's levels'.
    ``theta`` is the fit's psi, block by block in ``order`` (log sd and a mixing parameter's logit,
    :func:`hierpool.closedform.spatial.mix_from_logit`, per spatial term, a covariance factor's entries per
    ``(lhs | g)`` term), then a Gaussian response's log sigma."""
    tables = fit.ranef
    laplace = fit.laplace
    if not isinstance(tables, dict):
        tables = {laplace.blocks[0].term.label: tables}
    n_spatial = len(fit.sdesign.areas)
    factors, cars = fit.covariance_factors(), fit.car_parameters()
    pieces, psi = {}, {}
    for t, block in enumerate(laplace.blocks):
        table = tables[block.term.label]
        effect, condsd = table["effect"].to_numpy(), table["condsd"].to_numpy()
        if t < n_spatial:
            key = (block.term.factor, (block.term.label,))
            pieces[key] = (table.index.to_numpy(), effect[:, None], condsd[:, None], np.array([[cars[t, 0] ** 2]]))
        else:
            term, factor = block.term, factors[t - n_spatial]
            key = (term.group, tuple(term.coef_names))
            pieces[key] = (np.asarray(term.levels), by_coefficient(effect, term.k), by_coefficient(condsd, term.k),
                           factor @ factor.T)
        psi[key] = laplace.block_psi(fit.psi, t)
    rest = np.asarray(fit.psi)[sum(block.n_params for block in laplace.blocks):]  # log sigma (Gaussian)
    return DatasetFit(theta=np.concatenate([psi[key] for key in order] + [rest]).astype(float),
                      objective=fit.objective, converged=fit.converged, beta=fit.fixef, vcov=fit.vcov,
                      sigma=float(fit.sigma), is_singular=fit.is_singular, terms=[pieces[key] for key in order],
                      hyperparameters=dict(fit.hyperparameters()))


def term_keys(sdesign=None, design=None) -> list[tuple]:
    """The batch's random terms as (group, coefficients): a spatial design's spatial terms as (area column,
    (label,)) then its ``(lhs | g)`` terms, or a design's terms."""
    areas = [] if sdesign is None else [(a.term.factor, (a.term.label,)) for a in sdesign.areas]
    design = sdesign.design if sdesign is not None else design
    return areas + [(t.group, tuple(t.coef_names)) for t in design.terms]


@dataclass(frozen=True)
class EachModel:
    """A model checked on the long frame, with what its datasets' fits share (:func:`each_model`).

    Attributes
    ----------
    frame : DataFrame
        The long frame, positions as its row labels (a copy's index: the user's frame is untouched).
    by : str
    arguments : dict
        ``weights`` and ``offset`` as given: column names, or arrays aligned with ``frame``'s rows.
    shared : dict
        The keyword argument every dataset's single fit gets: ``relmat_inverse={group: Relationship}`` or
        ``adjacency={area column: Graph}``, built once.
    keys : list of tuple
        The random terms, in the batch's order (:func:`term_keys`).
    fixed_names : tuple of str
    spatial : bool
        Spatial terms (else a relationship matrix).
    design : Design or None
        A relationship matrix's design of the long frame (:func:`spectral_fits` reads it), else None.
    codes, labels : ndarray, pandas.Index
        Each row's dataset code, and every dataset's label (:func:`~hierpool.batch.plan.dataset_labels_of`).
    refusals : tuple of str
        Per dataset, why it is not fitted ("" where it is): an empty frame, or a column of another kind than in
        the other datasets, or its kind the single fit cannot read (:func:`~hierpool.batch.plan.stacked_design`).
    """

    frame: pd.DataFrame
    by: str
    arguments: dict
    shared: dict
    keys: list
    fixed_names: tuple
    spatial: bool
    codes: np.ndarray
    labels: pd.Index
    design: object = None
    refusals: tuple = ()


def fits_each(formula, relmat, relmat_inverse, adjacency) -> bool:
    """Whether a batch is fitted dataset by dataset here: a relationship matrix, or spatial terms."""
    return (relmat is not None or relmat_inverse is not None or adjacency is not None
            or (isinstance(formula, str) and has_spatial_term(formula)))


def refuse_on_each(**given: tuple) -> None:
    """Refuse, by name, an argument (name=(value, default)) that the dataset-by-dataset fits do not take."""
    for name, (value, default) in given.items():
        if value is not default and value != default:
            raise ArgumentError(f"{name}={value!r} with a relationship matrix or spatial terms: each dataset is fitted "
                                f"by the single fit itself, which takes no such argument (or only {default!r})")


def check_fixed_effects(single, fixed_names) -> None:
    """Refuse a dataset whose own fixed-effect columns differ from the batch's: a factor level missing from it
    changes the meaning of the others (its intercept a different level's mean), not a number to put beside the
    other datasets' under the same name (the batched paths refuse such a dataset by X's rank, and fit alone one that
    lacks a level other than the baseline: ``fixed_names`` are then the batch's less that level's column)."""
    names = tuple(single.design.fixed_names)
    if names != tuple(fixed_names):
        raise DataError(f"this dataset's fixed effects are {list(names)}, not the batch's {list(fixed_names)} "
                        "(a factor level or a column's variation missing from it)")


def each_model(formula: str, data, by: str, caller: str, *, spec, weights, offset, se, relmat, relmat_inverse,
               adjacency) -> EachModel:
    """Check a relationship-matrix or spatial model on the long frame (once, for every dataset) and build what its
    datasets' fits share.  ``spec``: a GLMM's family (None: Gaussian).

    Raises
    ------
    ArgumentError, DataError, FormulaError
        What the single fit would raise on every dataset: a relationship matrix with spatial terms, known residual
        sds with spatial terms, and the single fit's own checks (``check_design``, ``spatial_design``).
    """
    from ..spec.relationship import model_relationship
    from ..spec.spatial import spatial_design  # SciPy's sparse algebra: loaded only for these models

    # (scale(x), a user's demean(x): each dataset's single fit builds its own design, with its own values)
    columns, terms = value_columns(formula, spec, weights, offset, se, by, caller)
    relationship = relmat is not None or relmat_inverse is not None
    if relationship:
        from ..closedform.relmat import check_design

        if adjacency is not None or has_spatial_term(formula):
            raise ArgumentError("relmat= with a spatial term (car(), adjacency=) is not supported: give one of them")
        rel = model_relationship(formula, relmat, relmat_inverse)

        def build(rows, arguments):
            design = build_design(formula, rows, se=se, family=spec, related=(rel.group,), datasets=by,
                                  **arguments)
            check_design(design, rel)  # refuses a family, known sds, vector terms: by name, once
            return design
    else:
        if se is not None:
            raise ArgumentError("se= is not supported with a spatial term (adjacency=) yet")

        def build(rows, arguments):
            return spatial_design(formula, rows, adjacency, family=spec, datasets=by, **arguments)
    # one dataset's data the single fit refuses (a negative count) is refused in its row, not the batch
    built, frame, weights, offset, set_aside = stacked_design(data, by, columns, build, weights, offset,
                                                               logical=terms)
    labels = dataset_labels_of(data, by)  # every dataset passed, one with no rows too
    arguments = {"weights": weights, "offset": offset}
    codes = label_codes(labels, frame[by], by)
    items = None if isinstance(data, pd.DataFrame) else data
    refusals = tuple(set_aside.get(label) or ("" if items is None or len(items[label]) else EMPTY_DATASET)
                     for label in labels)
    if relationship:
        return EachModel(frame=frame, by=by, arguments=arguments, shared={"relmat_inverse": {rel.group: rel}},
                         keys=term_keys(design=built), fixed_names=built.fixed_names, spatial=False, design=built,
                         codes=codes, labels=labels, refusals=refusals)
    graphs = {area.term.factor: area.graph for area in built.areas}
    return EachModel(frame=frame, by=by, arguments=arguments, shared={"adjacency": graphs},
                     keys=term_keys(sdesign=built), fixed_names=built.design.fixed_names, spatial=True,
                     codes=codes, labels=labels, refusals=refusals)


#: Datasets from which the spatial fits of :func:`run_each` run in worker processes too (a core each): a worker's
#: start (Python, NumPy, JAX and the closed form's modules) costs about as much as a few datasets' fits
#: (:func:`hierpool.batch.host_processes.whole_runs`).
EACH_PROCESS_MIN = 8


def run_each(model: EachModel, call, progress, caller: str, keep_warnings: bool = True, portable=None,
             formula: str = "") -> tuple[pd.Index, list, list[str]]:
    """``call(index, frame, arguments)`` on each dataset (its rows of the long frame, its weights/offset arguments),
    in order.  ``portable``: the same call, picklable (a module's function with its arguments bound), which from
    :data:`EACH_PROCESS_MIN` datasets runs in worker processes too (:mod:`hierpool.batch.host_processes`, a core
    each), unless ``formula`` reads names of the caller's (:func:`~hierpool.spec.transforms.caller_names`); each
    dataset's outcome is its own wherever it runs.

    Returns (dataset labels, per dataset what ``call`` returned or None where it raised, per dataset its message:
    its error, after its fit's warnings with ``keep_warnings``).
    """
    frame, labels = model.frame, model.labels
    rows = rows_by_code(model.codes, len(labels))
    refused = {index for index in range(len(labels)) if model.refusals and model.refusals[index]}

    def job(index: int) -> tuple:  # (the function, its arguments): the portable call's where it may run anywhere
        arguments = dataset_arguments(rows[index], **model.arguments)
        return each_outcome, (portable or call, index, frame.iloc[rows[index]], arguments, keep_warnings)

    fitted = [index for index in range(len(labels)) if index not in refused]
    outcomes = host_processes.whole_runs(fitted, job, threads=thread_count(None), minimum=EACH_PROCESS_MIN,
                                         preload=(each_outcome.__module__,),
                                         allowed=portable is not None and not caller_names(formula, frame.columns))
    out, messages = [], []
    with progress_bar(progress, len(labels), caller) as bar:
        for index in range(len(labels)):
            # no rows to fit: the reason, as the batched paths give it
            value, message = (None, model.refusals[index]) if index in refused else next(outcomes)
            out.append(value)
            messages.append(message)
            bar.update(1)
    return labels, out, messages


def each_outcome(call, index: int, frame: pd.DataFrame, arguments: dict, keep_warnings: bool) -> tuple:
    """(what ``call(index, frame, arguments)`` returned or None where it raised, its message: its hierpool warnings
    with ``keep_warnings``, then its error), one dataset's outcome in :func:`run_each`, here or in a worker."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HierpoolWarning)
        try:
            value, message = call(index, frame, arguments), ""
        except Exception as exc:  # noqa: BLE001 - kept in the dataset's row, never raised for the batch
            value, message = None, failure_words(exc)
    said = [str(w.message) for w in caught if keep_warnings and issubclass(w.category, HierpoolWarning)]
    return value, "; ".join(dict.fromkeys(said + ([message] if message else [])))


def failure_words(exc: Exception) -> str:
    """A dataset's failure as its row says it: a :class:`~hierpool.errors.HierpoolError`'s words alone, as the
    batched paths' refusals (:attr:`BatchPlan.refusals`) give them; any other error with its type's name, which says
    it was not a refusal."""
    return str(exc) if isinstance(exc, HierpoolError) else f"{type(exc).__name__}: {exc}"


def dataset_fit(fitter, row, fixed_names, formula: str, index: int, frame: pd.DataFrame,
                arguments: dict) -> DatasetFit:
    """One dataset's fit (``fitter``: ``hp.lmm`` or ``hp.glmm`` with the batch's graphs or relationship bound) as its
    row (``row``: :func:`spatial_row`, :func:`relmat_row`), its fixed effects checked against the batch's: a
    module-level function, so that a worker process can run it (:func:`run_each`'s ``portable``)."""
    single = fitter(formula, frame, **arguments)
    check_fixed_effects(single, fixed_names)
    return row(single)


def each_result(labels: pd.Index, fits: list, messages: list, *, fixed_names, terms: list[tuple], reml: bool,
                sigma_known: bool, spatial: bool) -> BatchResult:
    """The :class:`BatchResult` of :func:`run_each`'s rows (:class:`DatasetFit` or None).  ``terms``: per random
    term (group, coefficients), in the rows' order; a failed dataset's numbers are NaN and its levels empty.  A
    ``spatial`` batch's hyperparameters are matched by name (a table with no columns where every dataset
    failed)."""
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
    if spatial:  # by name: a (lhs | g) term's may come in another order in another dataset
        names = list(dict.fromkeys(name for f in done for name in f.hyperparameters))
        hyperparameters = pd.DataFrame([{} if f is None else f.hyperparameters for f in fits], index=labels,
                                       columns=names, dtype=float)
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


def spectral_fits(model: EachModel, formula: str, reml: bool) -> dict[int, tuple]:
    """The datasets of an animal-model batch that share their rows (the same animals and covariates, in the same
    order; only the responses differ: many traits of one herd), fitted together by
    :mod:`hierpool.closedform.relmat_spectral` (one eigendecomposition per shared design): dataset -> (its
    :class:`DatasetFit` or None, its warnings, its error or "": the single fit's, word for word).

    Only with one relationship term and no prior weights, for designs of at least two datasets, within
    :mod:`~hierpool.closedform.relmat_spectral`'s size limits; a shared design must be what ``hp.lmm`` builds on one
    of its datasets (its own ``build_design``, without a warning: the same columns, nothing aliased or dropped).
    A dataset with rows dropped for missing values, a constant response or one the fixed effects fit exactly, or a
    criterion that is not finite, a response that is not a plain column (:func:`_plain_response`), and any group
    whose algebra fails (a factorization, memory), are left to their single fits, which say why."""
    from ..closedform import relmat_spectral as spectral
    from ..closedform.relmat import relationship_positions

    design = model.design
    if len(design.terms) != 1 or design.weights is not None or design.sigma_known or not _plain_response(model):
        return {}
    term, rel = design.terms[0], next(iter(model.shared["relmat_inverse"].values()))
    animal = relationship_positions(term, rel, strict=False)[term.index]  # -1: not in A (that dataset's error)
    z, X = np.asarray(term.z[:, 0], dtype=float), np.asarray(design.X, dtype=float)
    y = np.asarray(design.y, dtype=float) - np.asarray(design.offset, dtype=float)
    frame_rows = np.bincount(model.codes, minlength=len(model.labels))  # each dataset's rows, before any dropped
    codes = model.codes[np.asarray(design.rows)]
    groups: dict[bytes, list] = {}
    for rows in rows_by_code(codes, len(model.labels)):
        if (rows.size and rows.size == frame_rows[codes[rows[0]]] and animal[rows].min() >= 0
                and np.ptp(design.y[rows]) > 0):  # hp.lmm's own refusal of a constant response
            key = animal[rows].tobytes() + z[rows].tobytes() + X[rows].tobytes()  # exact: the design itself
            groups.setdefault(key, []).append(rows)
    q, parts, out = len(rel.labels), None, {}
    for members in groups.values():
        rows = members[0]
        n, p = rows.size, X.shape[1]
        if (len(members) < 2 or not p < n <= spectral.SPECTRAL_MAX_ROWS
                or q * n > spectral.SPECTRAL_MAX_ENTRIES):
            continue
        try:
            if not _single_design_agrees(model, formula, rows, rel, X[rows]):
                continue
            parts = parts or spectral.relationship_parts(rel)  # A^-1's LU and diag A: once for the batch
            with np.errstate(all="ignore"):  # a degenerate dataset's infinities: it is left to its single fit
                out |= _shared_design_fits(spectral.spectral_design(animal[rows], z[rows], X[rows], parts),
                                           members, codes, y, X[rows], design, rel, reml)
        except (np.linalg.LinAlgError, MemoryError):  # this group's datasets are left to their single fits
            continue
    return out


def _plain_response(model: EachModel) -> bool:
    """Whether every dataset's response is the long frame's own: a plain column, no ``offset(...)`` term.  A
    transform of the response (or an offset term) may depend on the whole dataset (``y / max(y)``), so that one
    dataset's design, built on the long frame, would not be the design ``hp.lmm`` builds on that dataset."""
    design, name = model.design, model.design.spec.response
    if design.offset_terms or name not in model.frame.columns:
        return False
    column = model.frame[name].to_numpy()[np.asarray(design.rows)]
    return np.issubdtype(column.dtype, np.number) and np.array_equal(column.astype(float), design.y)


def _single_design_agrees(model: EachModel, formula: str, rows: np.ndarray, rel, X: np.ndarray) -> bool:
    """Whether ``hp.lmm``'s own design of the dataset at design ``rows`` is the shared one: built without a
    warning (nothing dropped), the batch's fixed-effect columns (nothing aliased at its tolerance), the same X."""
    positions = np.asarray(model.design.rows)[rows]
    arguments = dataset_arguments(positions, **model.arguments)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        own = build_design(formula, model.frame.iloc[positions], related=(rel.group,), **arguments)
    return (not caught and tuple(own.fixed_names) == tuple(model.fixed_names) and own.X.shape == X.shape
            and np.array_equal(np.asarray(own.X, dtype=float), X))


def _shared_design_fits(sd, members: list, codes: np.ndarray, y: np.ndarray, X: np.ndarray, design, rel,
                        reml: bool) -> dict[int, tuple]:
    """:func:`spectral_fits` of one shared design ``sd``: its datasets (``members``, their design rows) in chunks
    whose arrays stay within the host's budget (:func:`~hierpool.batch.plan.host_chunk`)."""
    from ..closedform import relmat_spectral as spectral
    from ..closedform.relmat import boundary_messages, flat_profile, pev_not_computed, singular_theta

    term, names = design.terms[0], list(design.fixed_names)
    n, q = sd.n, sd.effects.shape[0]
    responses = np.stack([y[r] for r in members])
    shift = np.linalg.lstsq(X, responses.T, rcond=None)[0].T  # centred on least squares: no digits lost
    rotated = (responses - shift @ X.T) @ sd.vectors
    size = host_chunk(8 * max(spectral.GRID_POINTS * n * 4, q * n))  # the grid's and the PEV's arrays
    said_always = [] if np.isfinite(sd.a_diagonal).all() else [pev_not_computed(q)]
    out = {}
    # a response the fixed effects fit (almost) exactly: its single fit fails on the singular equations
    fitted_exactly = np.linalg.norm(rotated, axis=1) <= 1e-10 * np.linalg.norm(responses, axis=1)
    for start in range(0, len(members), size):
        part = slice(start, start + size)
        # (the grid holds both bounds, so the single fit's at_bound rule never moves this minimum)
        log_theta, value, ends = spectral.minimize(rotated[part], sd, reml)
        solved = spectral.solution(log_theta, rotated[part], sd, reml)
        for j, rows in enumerate(members[part]):
            index = int(codes[rows[0]])
            if fitted_exactly[start + j] or not (np.isfinite(value[j]) and np.isfinite(ends[j]).all()):
                continue  # left to the single fit, which says why
            error = flat_profile(value[j], ends[j], term.group)
            if error:  # the single fit's error, word for word
                out[index] = (None, [], error)
                continue
            if not np.isfinite(solved["beta"][j]).all():
                continue  # left to the single fit
            theta, sigma = float(np.exp(log_theta[j])), float(solved["sigma"][j])
            fit = DatasetFit(
                theta=np.array([theta]), objective=float(value[j]), converged=True,
                beta=pd.Series(solved["beta"][j] + shift[start + j], index=names),
                vcov=pd.DataFrame(solved["vcov"][j], index=names, columns=names), sigma=sigma,
                is_singular=singular_theta(log_theta[j:j + 1]),
                terms=[(np.asarray(rel.labels), solved["b"][j][:, None], solved["condsd"][j][:, None],
                        np.array([[(theta * sigma) ** 2]]))])
            out[index] = (fit, boundary_messages(design.terms, log_theta[j:j + 1]) + said_always, "")
    return out


def fit_batch_each(formula: str, data, by: str, *, family, link, reml: bool | None, nAGQ: int, weights, offset,
                   se, relmat, relmat_inverse, adjacency, progress) -> BatchResult:
    """``hp.fit_batch`` of a model with a relationship matrix or spatial terms (module notes): the model checked
    on the long frame, its relationship or graphs built once (:func:`each_model`), then each dataset's ``hp.lmm`` /
    ``hp.glmm``."""
    from ..closedform import glmm, lmm
    from ..spec.family import family_spec

    spec = None if family is None else family_spec(family, link)
    model = each_model(formula, data, by, "fit_batch", spec=spec, weights=weights, offset=offset, se=se,
                       relmat=relmat, relmat_inverse=relmat_inverse, adjacency=adjacency)
    reml = (spec is None) if reml is None else bool(reml)
    if model.spatial:
        check_quadrature(nAGQ, spatial=True)
        fitter = (partial(lmm, reml=reml, **model.shared) if spec is None else
                  partial(glmm, family=family, link=link, nAGQ=nAGQ, reml=reml, **model.shared))
        row = partial(spatial_row, order=model.keys)
    else:
        fitter, row = partial(lmm, reml=reml, **model.shared), partial(relmat_row, order=model.keys)
    shared_rows = {} if model.spatial else spectral_fits(model, formula, reml)

    def fit(index: int, frame: pd.DataFrame, arguments: dict) -> DatasetFit:
        if index in shared_rows:  # fitted with the datasets that share its rows: its warnings and error as hp.lmm's
            done, said, error = shared_rows[index]
            for message in said:
                warnings.warn(message, ConvergenceWarning, stacklevel=2)
            if error:
                raise DataError(error)
            return done
        return dataset_fit(fitter, row, model.fixed_names, formula, index, frame, arguments)

    # a spatial dataset's fit in a worker process too (its graphs go with it); a relationship matrix's stays here
    portable = partial(dataset_fit, fitter, row, model.fixed_names, formula) if model.spatial else None
    labels, fits, messages = run_each(model, fit, progress, "fit_batch", portable=portable, formula=formula)
    return each_result(labels, fits, messages, fixed_names=model.fixed_names, terms=model.keys, reml=reml,
                       sigma_known=model.spatial and spec is not None, spatial=model.spatial)
