"""``hp.fit_batch(..., family=)``: generalized linear mixed models (binomial, Poisson, negative binomial) over many
datasets, by the Laplace approximation: on the host, or vmapped in compiled programs.

Each dataset's criterion is ``hp.glmm``'s: the Laplace deviance -2 log L(theta, beta) with the conditional mode u*
found by PIRLS, and its exact gradient in (theta, beta).  Newton's method with a forward-difference Hessian of that
gradient minimizes it in (theta, beta) jointly, glmer's second stage, from the method-of-moments theta of each term
(:func:`moment_start_theta`) and beta the dataset's GLM fit without random effects.  At the optimum the conditional
variances come from the penalized system at the mode's weights (``hp.glmm``'s ``ranef``), and beta's covariance
from half the final Hessian, inverted (lme4's ``vcov`` with ``use.hessian``).

**On the host** (:func:`_on_host`: binomial and Poisson, float64, one CPU device) nothing is compiled: the
criterion and gradient of every point of a chunk's datasets are evaluated at once in NumPy
(:mod:`hierpool.algebra.laplace_batch`), and :func:`hierpool.algebra.search.newton.newton_on_host` runs the compiled
path's rules, each dataset leaving when its own search stops.  Three things the lockstep of a vmapped program
does not do: the Hessian's forward-difference shifts are evaluated only around accepted trials; PIRLS starts at a
shift from its trial's mode and at a trial from the mode at the dataset's current point (the program's from u = 0);
and the shifts are in theta alone, the
Hessian's beta block the profiled penalized deviance's curvature
(:func:`hierpool.algebra.laplace_batch.fixed_effects_curvature`), beta differenced only where a search stops
(``newton_on_host``'s ``trailing_curvature``), so that each fixed effect does not cost a gradient a pass; with
several terms whose points cost more (:data:`hierpool.batch.glmm_search.SECANT_MIN_WORK`), the curvature is a
secant update at most accepted points (``newton_on_host``'s ``secant``), each pass one point.  The
returned Hessian is the full forward-difference one either way.

**Compiled** (a negative binomial, an accelerator or a mesh; float64 always: ``fit_batch`` refuses a GLMM in
float32): the program of
:func:`hierpool.algebra.laplace_program.laplace_value_and_gradient` (PIRLS, the log-determinant and the exact
gradient) under :func:`hierpool.algebra.search.newton.newton`, vmapped.  Padding: a bucket's datasets share level counts
per term (padded as :mod:`hierpool.batch.fit_terms` pads them) and a row count (the next power of two); a padded
row has trials 0, which zeroes its deviance and its PIRLS weight, so it changes no number.  The working systems
are filled on the full coupling grid (``Layout.dense_only``).  A negative binomial's log shape is a further
parameter of Newton's method, last, as in ``hp.glmm``'s second stage: its derivative a central difference (PIRLS
run again at each side), the saturated constant computed in the program at each shape, the start the Poisson
GLM's moments (:func:`moment_shape`).  A chunk's fits that stop next to a zero variance are set onto it on the host
(:func:`compiled_onto_boundary`), as the host searches end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..algebra.checks import near_boundary, onto_boundary
from ..algebra.compiler_options import ProgramCache, compile_in_background, shape_signature
from ..algebra.family import Family
from ..algebra.glm import starting_eta, working_response
from ..algebra.henderson import solve
from ..algebra.host_blas import one_blas_thread
from ..algebra.laplace import saturated_rows
from ..algebra.laplace_batch import GroupedRows, conditional_modes, laplace_and_gradient, solution_at_mode
from ..algebra.laplace_program import ProgramData, laplace_value, laplace_value_and_gradient
from ..algebra.search.newton import DECREASE_TOL, canonical_theta, newton
from ..algebra.system import Layout, SystemPattern, fill_in_program, grouped_products
from ..closedform.glmm import eta_moved_far, separation_message
from ..closedform.glmm_optimize import SHAPE_DIFFERENCE
from . import host_processes
from .fit_terms import (
    empty_results,
    row_buckets,
    run_jobs,
    start_processes,
    take,
    term_problems,
    too_large,
)
from .glmm_search import DAMPING_GROWTH, FD_WIDTH, STEP_TOL, beta_covariance, fit_chunk_on_host
from .plan import (
    BatchPlan,
    chunks,
    fetch,
    host_chunk,
    host_chunk_length,
    host_fits,
    merge_terms,
    merged_widths,
    padded_widths,
    place,
    thread_count,
)

#: IRLS iterations of the starting GLM fits.
GLM_ITERATIONS = 25
#: Padded rows of the whole batch up to which its program compiles without LLVM's optimization (on a CPU).  A GLMM
#: runs PIRLS inside every probe of every Newton step, so its run outgrows the optimization sooner than a linear
#: model's statistics do (``QUICK_COMPILE_MAX_VALUES``): set between 500 cbpp-shaped datasets (28,000 rows), as fast
#: either way, and 1,000, faster optimized (benchmarks/RESULTS.md, "Batch fitting for every model, tenth session").
QUICK_COMPILE_MAX_ROWS = 40_000


def glmm_problems(plan: BatchPlan) -> list[str]:
    """Why each dataset of a GLMM batch cannot be fitted or sampled ("" when it can): hp.glmm's checks (levels, X's
    rank and rows; a GLMM's level count may reach its row count: no sigma), a binomial dataset with no successes
    or only successes (its intercept runs off to -+inf: separation), and what hp.glmm refuses in a dataset's data
    (no rows left, a response of one value: :attr:`~hierpool.batch.plan.BatchPlan.refusals`; a Poisson dataset of
    zeros otherwise kept the numbers where its search stopped, an intercept of -25)."""
    design = plan.design
    messages = term_problems(plan, sigma_known=True, refusals=False)
    if design.family.name == "binomial":
        successes = np.bincount(plan.dataset, weights=design.y * design.row_weights, minlength=plan.n_datasets)
        trials = np.bincount(plan.dataset, weights=design.row_weights, minlength=plan.n_datasets)
        for d in np.flatnonzero((successes == 0) | (successes == trials)):
            if not messages[d]:
                messages[d] = f"{'no' if successes[d] == 0 else 'only'} successes: the model is not estimable"
    return plan.with_refusals(messages)


def separation_notes(plan: BatchPlan, beta: np.ndarray) -> dict:
    """dataset -> hp.glmm's separation message (:func:`hierpool.closedform.glmm.separation_message`) for the fitted
    datasets whose X separates their outcomes, checked where a fixed effect moves the linear predictor far
    (:func:`~hierpool.closedform.glmm.eta_moved_far`: hp.glmm's suspects).  A
    level without successes gave a row of trt[c] = -29 (SE 2e5), converged, without a word; hp.glmm warned."""
    design = plan.design
    if not design.p:
        return {}
    moved = eta_moved_far(design.X, beta[plan.dataset])
    suspects = np.flatnonzero(np.bincount(plan.dataset, weights=moved, minlength=plan.n_datasets))
    notes = {}
    for d in suspects:
        rows = plan.dataset == d
        message = separation_message(design.X[rows], design.y[rows], design.row_weights[rows], design.fixed_names,
                                     design.family.name)
        if message:
            notes[int(d)] = message
    return notes


def glm_start(plan: BatchPlan, family: Family) -> tuple[np.ndarray, np.ndarray]:
    """((D, p) each dataset's GLM fit without random effects by IRLS, the linear predictor of every row), on the
    host: the batch's starting beta.  :mod:`hierpool.algebra.glm`'s step (its working response), solved from each
    dataset's grouped cross-products at once, without step halving.  A dataset leaves the iterations once its coefficients change by < 1e-10 (a
    separated one, whose coefficients run off, takes all :data:`GLM_ITERATIONS`, on its own rows once the others are
    done)."""
    design, n_datasets, dataset = plan.design, plan.n_datasets, plan.dataset
    X, y, trials, offset = design.X, design.y, design.row_weights, design.offset
    eta = starting_eta(family, y, trials)
    beta = np.zeros((n_datasets, design.p))
    active = np.ones(n_datasets, bool)
    rows = slice(None)  # every row (a view), until most are of datasets done
    for _ in range(GLM_ITERATIONS):
        fitting, x = dataset[rows], X[rows]
        weights, z = working_response(family, y[rows], eta[rows], trials[rows], offset[rows])
        xtwx = grouped_products(fitting, x, x, weights, n_datasets)
        xtwz = grouped_products(fitting, x, z[:, None], weights, n_datasets)
        ids = np.flatnonzero(active)
        new = _glm_step(xtwx[ids] + 1e-10 * np.eye(design.p), xtwz[ids], beta[ids])
        change = np.max(np.abs(new - beta[ids]), axis=1, initial=0.0)
        beta[ids] = new
        eta[rows] = offset[rows] + np.einsum("np,np->n", x, beta.take(fitting, axis=0))
        active[ids[change < 1e-10]] = False
        if not active.any():
            break
        remaining = np.flatnonzero(active[fitting])
        if len(remaining) < len(fitting) // 2:
            rows = np.arange(len(y))[rows][remaining]
    return beta, eta


def _glm_step(xtwx: np.ndarray, xtwz: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(D, p) IRLS's new beta per dataset, solved from its weighted cross-products; a dataset whose products are not
    finite, or exactly singular (an extreme response, a Poisson count of 1e20, overflows its weights), keeps its
    ``beta``: its fit is left to fail in its own row (np.linalg.solve's LinAlgError stopped the whole batch)."""
    usable = np.isfinite(xtwx).all(axis=(1, 2)) & np.isfinite(xtwz).all(axis=(1, 2))
    new = beta.copy()
    if usable.any():
        try:
            new[usable] = np.linalg.solve(xtwx[usable], xtwz[usable])[..., 0]
        except np.linalg.LinAlgError:  # only then one dataset at a time
            for d in np.flatnonzero(usable):
                try:
                    new[d] = np.linalg.solve(xtwx[d], xtwz[d])[:, 0]
                except np.linalg.LinAlgError:
                    pass
    return new


def moment_start_theta(plan: BatchPlan, family: Family, eta: np.ndarray, datasets) -> np.ndarray:
    """(D, n_theta) a GLMM's starting theta for datasets ``datasets``: the method of moments of every term
    (:meth:`hierpool.batch.plan.BatchPlan.term_moments`, the linear mixed models' several-term start) on the GLM
    fit's working residuals, weighted by its working weights, whose residual variance is 1 when the family's
    variance holds.

    From lme4's identity the first Newton steps of a crossed model overshoot and are rejected, and the search
    takes several times as long to the same optima (benchmarks/RESULTS.md, "The GLMM class on the host").
    """
    _, weights, residual = family.working(plan.design.y, eta, plan.design.row_weights)
    return plan.term_moments(weights, residual, datasets)


def moment_shape(plan: BatchPlan, eta: np.ndarray, link) -> np.ndarray:
    """(D,) a negative binomial's starting shape per dataset: the method of moments on its Poisson GLM fit at
    ``eta``, 1 / theta = sum w ((y - mu)^2 - mu) / sum w mu^2 (NB2's variance mu + mu^2 / theta), kept in
    [1e-2, 1e4]."""
    design = plan.design
    mu, weights = Family("poisson", link).link.inverse(eta), design.row_weights
    excess = np.bincount(plan.dataset, weights=weights * ((design.y - mu) ** 2 - mu), minlength=plan.n_datasets)
    scale = np.bincount(plan.dataset, weights=weights * mu**2, minlength=plan.n_datasets)
    with np.errstate(all="ignore"):
        inverse = np.where(scale > 0, excess / scale, 1.0)
    return 1.0 / np.clip(np.nan_to_num(inverse, nan=1.0), 1e-4, 1e2)


def saturated_deviances(plan: BatchPlan, family: Family) -> np.ndarray:
    """Each dataset's -2 log p(y | y) (:func:`hierpool.algebra.laplace.saturated_deviance`), summed per dataset."""
    design = plan.design
    rows = saturated_rows(family, design.y, design.row_weights)
    return np.bincount(plan.dataset, weights=rows, minlength=plan.n_datasets)


@dataclass(frozen=True)
class BucketRows:
    """A bucket's rows laid out (datasets, padded rows): where each of the long frame's rows goes.

    A dataset's rows need not be contiguous in the long frame: a stable sort by dataset keeps each
    dataset's own row order, and a row's position is its rank within its dataset.
    """

    rows: np.ndarray  # the long design's rows of the bucket, dataset by dataset
    local: np.ndarray  # each of those rows' dataset within the bucket
    position: np.ndarray  # its position within its dataset
    count: int
    width: int

    @classmethod
    def of(cls, plan: BatchPlan, members: np.ndarray, width: int) -> BucketRows:
        rows = np.flatnonzero(np.isin(plan.dataset, members))
        local = np.searchsorted(members, plan.dataset[rows])
        order = np.argsort(local, kind="stable")
        rows, local = rows[order], local[order]
        first = np.searchsorted(local, np.arange(len(members)))
        return cls(rows, local, np.arange(len(rows)) - first[local], len(members), width)

    def pad(self, values, fill=0.0) -> np.ndarray:
        """(count, width, ...) values of the design's rows (``values`` over all of them), ``fill`` where padded."""
        values = np.asarray(values)[self.rows]
        out = np.full((self.count, self.width) + values.shape[1:], fill, dtype=values.dtype)
        out[self.local, self.position] = values
        return out


def padded_terms(plan: BatchPlan, layout_rows: BucketRows) -> tuple:
    """Each term's padded (levels, values) of a bucket's rows (a padded row: level 0, values 0)."""
    return tuple((layout_rows.pad(level.astype(np.int32)), layout_rows.pad(term.z))
                 for (level, _, _), term in zip(plan.term_levels, plan.design.terms))


def bucket_pattern(plan: BatchPlan, layout_rows: BucketRows, widths, fixed: bool, sigma_known: bool):
    """(each term's padded (levels, values), the :class:`SystemPattern` of the bucket's working designs): the
    terms' rows, then X's when ``fixed`` (a linear mixed model's system; a GLMM's working system has none), each
    rest block's couplings on the full (term-0 level, level) grid (``Layout.dense_only``)."""
    design, count = plan.design, layout_rows.count
    term_rows = padded_terms(plan, layout_rows)
    levels, zs = [level for level, _ in term_rows], [z for _, z in term_rows]
    rest_rows = list(zip(levels[1:], zs[1:]))
    rest_widths = [int(w) for w in widths[1:]]
    if fixed and design.p:
        rest_rows.append((np.zeros_like(levels[0]), layout_rows.pad(design.X)))
        rest_widths.append(1)
    ell0 = int(widths[0])
    cells = []
    for (level, _), ell in list(zip(rest_rows, rest_widths)) + [((np.zeros_like(levels[0]), None), 1)]:
        grid0 = np.broadcast_to(np.repeat(np.arange(ell0, dtype=np.int32), ell), (count, ell0 * ell))
        grid = np.broadcast_to(np.tile(np.arange(ell, dtype=np.int32), ell0), (count, ell0 * ell))
        cells.append((levels[0] * ell + level, np.ascontiguousarray(grid0), np.ascontiguousarray(grid)))
    layout = Layout(n=layout_rows.width, p=design.p if fixed else 0, ks=tuple(term.k for term in design.terms),
                    n_levels=tuple(int(w) for w in widths), sigma_known=sigma_known, dense_only=True)
    pattern = SystemPattern(index0=levels[0], z0=zs[0], rest_rows=tuple(rest_rows), coupling_cells=tuple(cells),
                            pair_indices=(), layout=layout)
    return term_rows, pattern


def bucket_data(plan: BatchPlan, members: np.ndarray, widths, row_width: int) -> ProgramData:
    """The bucket's datasets as one :class:`ProgramData` with a leading dataset axis, rows and levels padded."""
    design = plan.design
    layout_rows = BucketRows.of(plan, members, row_width)
    term_rows, pattern = bucket_pattern(plan, layout_rows, widths, fixed=False, sigma_known=True)
    pad = layout_rows.pad
    return ProgramData(y=pad(design.y), trials=pad(design.row_weights), offset=pad(design.offset), X=pad(design.X),
                       term_rows=term_rows, pattern=pattern)


def saturated_in_program(data: ProgramData, family: Family):
    """-2 log p(y | y) of one dataset's rows, traced (a negative binomial's depends on its shape, a parameter):
    :func:`saturated_deviances`' rows, summed; padded rows (zero weight) add 0."""
    return jnp.sum(saturated_rows(family, data.y, data.trials))


def _laplace(params, saturated, data, family: Family, n_theta: int, negative_binomial: bool):
    """(Laplace -2 log L, its gradient, the mode) at ``params``: (theta, beta), and a negative binomial's log shape
    last (its saturated constant computed at that shape; the gradient then in (theta, beta) alone)."""
    if not negative_binomial:
        return laplace_value_and_gradient(params[:n_theta], params[n_theta:], saturated, data, family)
    shape, saturated = _at_log_shape(params[-1], data, family)
    return laplace_value_and_gradient(params[:n_theta], params[n_theta:-1], saturated, data, family, shape=shape)


def _at_log_shape(log_shape, data, family: Family):
    """A negative binomial's (shape, saturated constant) at its log shape."""
    shape = jnp.exp(log_shape)
    return shape, saturated_in_program(data, dataclasses.replace(family, shape=shape))


def _shape_derivative(params, data, family: Family, n_theta: int, u):
    """A negative binomial's derivative in its log shape (``params[-1]``): a central difference of the Laplace
    deviance alone, each side's PIRLS starting from the centre's mode ``u`` (as ``hp.glmm``'s)."""
    def side(log_shape):
        shape, saturated = _at_log_shape(log_shape, data, family)
        return laplace_value(params[:n_theta], params[n_theta:-1], saturated, data, family, u, shape)

    return (side(params[-1] + SHAPE_DIFFERENCE) - side(params[-1] - SHAPE_DIFFERENCE)) / (2 * SHAPE_DIFFERENCE)


#: What the optimizer keeps of the mode at its optimum: the BLUPs, the working weights of the conditional variances,
#: and whether PIRLS converged there.
MODE_KEPT = ("b", "working_weights", "converged")


def _optimize_rows(data, saturated, start, family: Family, max_iterations: int):
    ks = data.pattern.layout.ks
    n_theta = sum(k * (k + 1) // 2 for k in ks)
    negative_binomial = family.name == "negative_binomial"
    laplace = partial(_laplace, family=family, n_theta=n_theta, negative_binomial=negative_binomial)

    def one(d, sat, params0):
        # PIRLS starts every probe from u = 0: carrying the current mode to the probes as a warm start was slower,
        # the loops running in lockstep over datasets (benchmarks/RESULTS.md, "Batch fitting for every model"); a
        # negative binomial's shape sides start from their probe's mode (_shape_derivative)
        def value_and_grad(params):
            value, gradient, mode = laplace(params, sat, d)
            if negative_binomial:  # the log shape's derivative: a central difference, as hp.glmm's
                slope = _shape_derivative(params, d, family, n_theta, tuple(mode["u"]))
                gradient = jnp.concatenate([gradient, slope[None]])
                value = jnp.where(jnp.all(jnp.isfinite(gradient)), value, jnp.inf)  # a side overflowed: not a step
            return value, gradient, {name: mode[name] for name in MODE_KEPT}

        # the mode at the optimum is carried by Newton's loop (its aux), not computed again after it: a second copy
        # of the Laplace program would double the tracing and compiling
        # (NaN where no step ever improved on +inf: a dataset with no finite criterion has no mode)
        aux0 = {"b": tuple(jnp.full((ell, k), jnp.nan, params0.dtype) for ell, k in zip(d.pattern.layout.n_levels, ks)),
                "working_weights": jnp.full_like(d.y, jnp.nan), "converged": jnp.zeros((), bool)}
        params, value, newton_step, iterations, converged, curvature, mode = newton(
            None, params0, max_iterations, value_and_grad=value_and_grad, fd_width=FD_WIDTH, with_curvature=True,
            step_tol=STEP_TOL, damping_growth=DAMPING_GROWTH, aux0=aux0, decrease_tol=DECREASE_TOL,
            interpolated_damping=True)
        # the flipped columns of canonical theta leave Lambda Lambda^T, and so the mode's b and weights, unchanged
        params = params.at[:n_theta].set(canonical_theta(params[:n_theta], ks))
        theta = params[:n_theta]
        system = fill_in_program(d.pattern, mode["working_weights"], jnp.ones_like(d.y))
        solved = solve(theta, system)
        fixed = slice(n_theta, n_theta + d.X.shape[-1])
        out = {"theta": theta, "beta": params[fixed], "objective": value, "newton_step": newton_step,
               "iterations": iterations, "converged": converged & mode["converged"],
               "vcov": beta_covariance(curvature, value, n_theta, d.X.shape[-1]),
               "b": mode["b"], "cond_var": solved.cond_var, "factors": solved.factors}
        if negative_binomial:
            out["shape"] = jnp.exp(params[-1])
        return out

    return jax.vmap(one)(data, saturated, start)


_COMPILED = ProgramCache()


def _program(data, saturated, start, family: Family, max_iterations: int, sharding, quick: bool):
    def build():
        def spec(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        arguments = jax.tree_util.tree_map(spec, (data, saturated, start))
        platform = jax.devices()[0].platform if sharding is None else sharding.mesh.devices.flat[0].platform
        function = partial(_optimize_rows, family=family, max_iterations=max_iterations)
        if sharding is not None:
            function = jax.shard_map(function, mesh=sharding.mesh, in_specs=(sharding.spec,) * 3,
                                     out_specs=sharding.spec, check_vma=False)
        return compile_in_background(jax.jit(function).lower(*arguments), platform, quick)

    return _COMPILED.get((shape_signature((data, saturated, start)), family, max_iterations, sharding, quick), build)


def _on_host(float_type, sharding, family: Family) -> bool:
    """Whether a GLMM batch is fitted on the host (NumPy, nothing compiled): on one CPU device in float64
    (:func:`hierpool.batch.plan.host_fits`), binomial and Poisson.  Each Newton pass runs many small PIRLS
    solves, whose tracing and compiling cost more than the NumPy run, for a crossed or correlated-slope model at
    any batch size (benchmarks/RESULTS.md, "The GLMM class on the host").  A negative binomial, whose
    shape is a further parameter with its own central difference, stays compiled."""
    return host_fits(float_type, sharding) and family.name != "negative_binomial"


def grouped_rows(plan: BatchPlan, members: np.ndarray, widths, merged: bool = False) -> GroupedRows:
    """The rows of datasets ``members`` (increasing) as one :class:`GroupedRows`, levels padded to ``widths``;
    ``merged``: the terms, on one grouping factor, as one (:func:`hierpool.batch.plan.merge_terms`;
    :func:`hierpool.batch.glmm_search.fit_chunk_on_host`'s ``term_ks``)."""
    design = plan.design
    rows = np.flatnonzero(np.isin(plan.dataset, members))
    terms = tuple((level[rows].astype(np.int64), term.z[rows], int(width))
                  for (level, _, _), term, width in zip(plan.term_levels, design.terms, widths))
    if merged:
        terms = tuple(merge_terms(terms))
    return GroupedRows(np.searchsorted(members, plan.dataset[rows]), len(members), design.y[rows],
                       design.row_weights[rows], design.offset[rows], design.X[rows], terms)


#: Most datasets per host call by default, and the bytes a call's rows may take (:func:`host_bytes`): more than the
#: linear models' (``plan.HOST_CHUNK``), as a GLMM call runs many more NumPy operations per pass (PIRLS's steps,
#: the gradient's solves), whose Python overhead is then spread over more datasets (benchmarks/RESULTS.md, "The
#: GLMM class on the host").  One call per core runs at a time.
HOST_CHUNK = 512
HOST_CHUNK_BYTES = 128 * 2**20


def host_bytes(plan: BatchPlan) -> float:
    """A host call's bytes per dataset: the largest dataset's rows, copied for each of the m forward-difference
    shifts of (theta, beta) evaluated at once, each row holding about 20 + p + sum_j (k_j + 1) numbers (its data
    and PIRLS's and the gradient's temporaries)."""
    design = plan.design
    m = sum(t.k * (t.k + 1) // 2 for t in design.terms) + design.p
    return 8.0 * int(plan.n_obs.max()) * m * (20 + design.p + sum(t.k + 1 for t in design.terms))


def fit_glmm(plan: BatchPlan, family: Family, *, float_type, chunk_size: int | None, progress, max_iterations: int,
             sharding, workers: int, default_chunk: int) -> dict:
    """Fit every dataset of ``plan`` by the Laplace approximation: :func:`hierpool.batch.fit_terms.fit_terms`'s
    dict of per-dataset results (``objective`` the Laplace -2 log-likelihood, ``sigma`` 1).

    The program's log-likelihood is the deviance plus each dataset's saturated constant, which holds for
    binomial rows with whole numbers of successes: the design refuses others (:mod:`hierpool.spec.family`).
    A dataset whose mean overflows (a log link's offset of 800) fails in its own row: NumPy's RuntimeWarnings of
    its overflow, which named nothing, are not raised (``hp.glmm``'s PIRLS ignores them alike).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _fit_every_dataset(plan, family, float_type=float_type, chunk_size=chunk_size, progress=progress,
                                  max_iterations=max_iterations, sharding=sharding, workers=workers,
                                  default_chunk=default_chunk)


def _fit_every_dataset(plan: BatchPlan, family: Family, *, float_type, chunk_size: int | None, progress,
                       max_iterations: int, sharding, workers: int, default_chunk: int) -> dict:
    """:func:`fit_glmm`'s body."""
    design = plan.design
    family = dataclasses.replace(family, shape=None)  # a negative binomial's is a parameter, traced
    ks = tuple(t.k for t in design.terms)
    n_devices = 1 if sharding is None else len(jax.devices())
    messages = glmm_problems(plan)
    host = _on_host(float_type, sharding, family)
    # terms on one grouping factor (``(1 + x || g)``) are searched on the host as one block-diagonal term: the
    # several-term algebra would factor the second term's levels as a dense block (benchmarks/RESULTS.md, twentieth
    # session)
    term_ks = merged_widths(plan) if host else None
    alone = too_large(plan, messages, p=0, merged=term_ks is not None)  # the working system: no fixed effects
    out = empty_results(plan, messages, alone)
    negative_binomial = family.name == "negative_binomial"
    if negative_binomial:
        out["shape"] = np.full(plan.n_datasets, np.nan)  # filled by the chunks, or by hp.glmm's refits
    if not out["attempted"].any():
        out["is_singular"] = np.zeros(plan.n_datasets, bool)
        return out
    n_theta = sum(k * (k + 1) // 2 for k in ks)
    n_params = n_theta + design.p + negative_binomial
    # workers started now: their imports run while the starts below are computed
    processes = host and start_processes(plan, out["attempted"], PROCESS_MIN_ROWS, fit_chunk_on_host)
    buckets = {} if host else row_buckets(plan, np.flatnonzero(out["attempted"]))
    quick = sum(len(members) * key[-1] for key, members in buckets.items()) <= QUICK_COMPILE_MAX_ROWS
    prepared = []
    for key, members in buckets.items():
        data = bucket_data(plan, members, key[:-1], int(key[-1]))
        data = jax.tree_util.tree_map(
            lambda a: a.astype(float_type) if np.issubdtype(a.dtype, np.floating) else a, data)
        size = min(chunk_size or default_chunk, math.ceil(len(members) / workers))
        bucket_chunks = chunks(0, np.arange(len(members)), size, n_devices)
        # the program needs the shapes alone: it compiles (in the background) while the starts are computed
        rows = bucket_chunks[0].index.size
        program = _program(take(data, bucket_chunks[0].index), np.zeros(rows, float_type),
                           np.zeros((rows, n_params), float_type), family, max_iterations, sharding, quick)
        prepared.append((members, data, bucket_chunks, program))
    # a negative binomial starts from its Poisson GLM (glmer.nb's start), its shape from that fit's moments
    pilot = Family("poisson", family.link) if negative_binomial else family
    beta0, eta0 = glm_start(plan, pilot)
    theta0 = moment_start_theta(plan, pilot, eta0, np.flatnonzero(out["attempted"]))
    if negative_binomial:
        # the log shape last
        theta0 = np.concatenate([theta0, np.log(moment_shape(plan, eta0, family.link))[:, None]], axis=1)
        saturated = np.zeros(plan.n_datasets)  # computed in the program, at each shape
    else:
        saturated = saturated_deviances(plan, family)
    if host:
        return _fit_glmm_on_host(plan, family, out, theta0, beta0, saturated, n_theta, chunk_size=chunk_size,
                                 progress=progress, max_iterations=max_iterations, processes=processes)
    jobs = []
    for key, (members, data, bucket_chunks, program) in zip(buckets, prepared):
        start = np.concatenate([theta0[members, :n_theta], beta0[members], theta0[members, n_theta:]], axis=1)
        arguments = (data, saturated[members].astype(float_type), start.astype(float_type))
        for chunk in bucket_chunks:
            jobs.append((members[chunk.members], take(arguments, chunk.index), chunk.count, program, key[:-1]))

    def run(job):
        chunk_members, arguments, count, program, widths = job
        result = jax.tree_util.tree_map(lambda a: a[:count], fetch(program.result()(*place(arguments, sharding))))
        result["sigma"] = np.ones(count)  # the unit scale of a GLMM (hp.glmm's)
        return compiled_onto_boundary(plan, family, chunk_members, widths, result)

    return run_jobs(jobs, run, out, plan, workers=workers, progress=progress)


def compiled_onto_boundary(plan: BatchPlan, family: Family, members: np.ndarray, widths, result: dict) -> dict:
    """A compiled chunk's ``result`` (datasets ``members``, levels padded to ``widths``) with each diagonal of T_j
    below lme4's singular tolerance set to 0 where the Laplace deviance there (beta and a negative binomial's shape
    held) rises by no more than rounding (:func:`hierpool.algebra.checks.onto_boundary`, as the host searches and
    ``hp.glmm`` end), the mode, BLUPs and conditional variances recomputed there on the host in float64
    (:mod:`hierpool.algebra.laplace_batch`).  The program's Newton search runs on unbounded theta and stopped 5e-7
    short of a zero variance where ``hp.glmm`` ends at 0 (a negative binomial batch on a CPU; the forty-second
    session).  Only the fits concerned are evaluated; returns a new dict (``result`` is left as it is)."""
    ks = tuple(term.k for term in plan.design.terms)
    theta, objective = np.asarray(result["theta"], dtype=float), np.asarray(result["objective"], dtype=float)
    near = np.flatnonzero(near_boundary(theta, objective, ks))
    if not near.size:
        return result
    rows = grouped_rows(plan, members[near], widths)
    beta = np.asarray(result["beta"], dtype=float)[near]
    shape = np.asarray(result["shape"], dtype=float)[near] if "shape" in result else None
    # a negative binomial's fits one at a time: each at its own shape (PIRLS keeps one family for its rows)
    parts = (lambda which: [which]) if shape is None else (lambda which: [which[i : i + 1] for i in range(len(which))])

    def at(which):  # (the fits' rows, their family)
        sub, _ = rows.subset(which)
        return sub, family if shape is None else dataclasses.replace(family, shape=float(shape[which[0]]))

    def deviance_at(points, which):
        values = []
        for part in parts(np.arange(len(which))):
            sub, at_shape = at(which[part])
            saturated = np.bincount(sub.group, weights=saturated_rows(at_shape, sub.y, sub.trials),
                                    minlength=len(part))
            values.append(laplace_and_gradient(points[part], beta[which[part]], sub, at_shape, saturated)[0])
        return np.concatenate(values)

    snapped, moved = onto_boundary(theta[near], objective[near], deviance_at, ks)
    changed = np.flatnonzero(np.any(snapped != theta[near], axis=1))
    if not changed.size:
        return result
    result = dict(result)  # (the fetched arrays are read-only)
    for name in ("theta", "objective", "converged"):
        result[name] = np.array(result[name])
    for name in ("b", "cond_var", "factors"):
        result[name] = [np.array(x) for x in result[name]]
    for part in parts(changed):
        sub, at_shape = at(part)
        with np.errstate(all="ignore"):
            mode = conditional_modes(snapped[part], beta[part], sub, at_shape)
            solved = solution_at_mode(snapped[part], sub, mode)
        fits = near[part]
        result["theta"][fits], result["objective"][fits] = snapped[part], moved[part]
        result["converged"][fits] &= mode.converged
        for name, values in (("b", mode.b), ("cond_var", solved.cond_var), ("factors", solved.factors)):
            for t, value in enumerate(values):
                result[name][t][fits] = np.asarray(value)
    return result


#: Rows of a GLMM host batch from which its chunks run in worker processes too
#: (:mod:`hierpool.batch.host_processes`): on a first call a batch of fewer gains less than a worker's start costs
#: (benchmarks/RESULTS.md, "Worker processes, and the class beyond the issue's models, seventeenth session").
PROCESS_MIN_ROWS = 20_000


def _fit_glmm_on_host(plan: BatchPlan, family: Family, out: dict, theta0, beta0, saturated, n_theta: int, *,
                      chunk_size: int | None, progress, max_iterations: int, processes: bool) -> dict:
    """:func:`fit_glmm`'s datasets on the host (:func:`hierpool.batch.glmm_search.fit_chunk_on_host`), bucketed by
    padded level counts and cut into chunks (``chunk_size``, or :data:`HOST_CHUNK` bounded by
    :data:`HOST_CHUNK_BYTES`), a thread per core (NumPy: no compiled program to guard); with ``processes`` each
    thread beyond the first runs its chunks in a worker process (:func:`hierpool.batch.host_processes.call`)."""
    widths = padded_widths(plan)
    buckets = {}
    for d in np.flatnonzero(out["attempted"]):
        buckets.setdefault(tuple(widths[d]), []).append(d)
    workers = thread_count(None)
    default = host_chunk(host_bytes(plan), most=HOST_CHUNK, budget=HOST_CHUNK_BYTES)
    jobs = []
    for key, members in buckets.items():  # as fit_terms' host path: at most a chunk, and a call per thread at least
        members = np.asarray(members)
        size = host_chunk_length(len(members), chunk_size or default, workers)
        jobs += [(members[first : first + size], key) for first in range(0, len(members), size)]

    term_ks = merged_widths(plan)  # terms on one factor: searched as one (fit_glmm's note)

    def run(job):
        chunk, key = job
        start = np.concatenate([theta0[chunk, :n_theta], beta0[chunk]], axis=1)
        arguments = (grouped_rows(plan, chunk, key, term_ks is not None), saturated[chunk], start, family,
                     max_iterations, term_ks)
        result = host_processes.call(fit_chunk_on_host, *arguments) if processes else fit_chunk_on_host(*arguments)
        result["sigma"] = np.ones(len(chunk))
        return result

    with one_blas_thread():  # many small products and factors: OpenBLAS's threads would only spin between them
        return run_jobs(jobs, run, out, plan, workers=workers, progress=progress)
