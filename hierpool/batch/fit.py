"""``hp.fit_batch``: one model fitted to many datasets as one jit-compiled, vmapped call.

How the work is laid out
------------------------
* The formula is parsed and the data checked **once**, on the long frame
  (:func:`hierpool.design.build_design`); each dataset's rows are then reduced
  to the sufficient statistics of :mod:`hierpool.batch.statistics`, so a
  dataset's row count never enters a shape.
* **Buckets by shape**: datasets are grouped by their number of levels, padded
  up to the next power of two (all datasets in one bucket when they have the
  same count), so padding never more than doubles the work of any dataset.
* **Chunks**: a bucket runs in chunks of at most ``chunk_size`` datasets, all of
  the same shape (the last one padded with copies), so each bucket compiles
  once.  Device memory is bounded by the chunk: about
  ``chunk_size * 40 * ell * k * (k + p + 1) * 8`` bytes of working set
  (the statistics and the optimizer's probes), whatever the number of datasets.
* **Devices**: a chunk's leading axis is sharded over a ``Mesh`` of all local
  devices (``jax.sharding.NamedSharding``), so the same call uses every GPU of
  a machine, or, after ``jax.distributed.initialize()``, of several hosts.  On a
  CPU with one device, chunks run in parallel threads (XLA releases the GIL),
  one per core.
* **Failures stay in their row**: a dataset that cannot be fitted (one level,
  aliased fixed effects, too few observations) is never sent to the optimizer;
  one whose optimizer did not converge is refitted alone by ``hp.lmm``
  (``polish=True``).  Each is explained in ``messages``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import numpy as np
import pandas as pd

from ..closedform import lmm
from ..compiler_options import compiler_options
from ..design import build_design
from ..errors import ArgumentError, DataError, HierpoolWarning
from .objective import solution
from .optimize import MAX_ITERATIONS, canonical_theta, minimize, start_theta
from .results import BatchResult
from .statistics import sufficient_statistics

SINGULAR_TOL = 1e-4  # lme4's isSingular tolerance on theta's diagonal


def _long_frame(data, by: str) -> pd.DataFrame:
    """The datasets as one long frame with a ``by`` column (a list or dict of frames is stacked)."""
    if isinstance(data, pd.DataFrame):
        if not isinstance(by, str) or by not in data.columns:
            raise DataError(f"by={by!r} is not a column of the data (columns: {list(data.columns)})")
        return data
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, (list, tuple)):
        items = list(enumerate(data))
    else:
        raise ArgumentError(f"data must be a DataFrame, or a list or dict of DataFrames, got {type(data).__name__}")
    if not items:
        raise DataError("data is an empty collection of datasets")
    for label, frame in items:
        if not isinstance(frame, pd.DataFrame):
            raise ArgumentError(f"dataset {label!r} is a {type(frame).__name__}, not a DataFrame")
        if by in frame.columns:
            raise ArgumentError(f"dataset {label!r} already has a column {by!r}; pass another by=")
    return pd.concat([frame.assign(**{by: label}) for label, frame in items], ignore_index=True)


@partial(jax.jit, static_argnames=("reml", "max_iterations"))
def _fit_chunk(stats, reml: bool, max_iterations: int):
    """Optimize and solve every dataset of a chunk (vmapped; pure)."""
    k = stats.ztz.shape[-1]

    def one(s):
        theta, value, newton_step, iterations, converged = minimize(
            s, start_theta(k, s.ztz.dtype), reml=reml, max_iterations=max_iterations)
        theta = canonical_theta(theta, k)
        return {"theta": theta, "objective": value, "newton_step": newton_step, "iterations": iterations,
                "converged": converged, **solution(theta, s, reml=reml)}

    return jax.vmap(one)(stats)


_COMPILED: dict = {}


def _compiled(stats, reml: bool, max_iterations: int, sharding):
    """The compiled chunk program for this shape (kept for the process: a refit does not retrace)."""
    key = (tuple((a.shape, a.dtype.name) for a in jax.tree_util.tree_leaves(stats)), reml, max_iterations, sharding)
    if key not in _COMPILED:
        placed = stats if sharding is None else jax.device_put(stats, sharding)
        platform = jax.devices()[0].platform if sharding is None else sharding.mesh.devices.flat[0].platform
        lowered = _fit_chunk.lower(placed, reml=reml, max_iterations=max_iterations)
        _COMPILED[key] = lowered.compile(compiler_options(platform))
    return _COMPILED[key]


def _mesh_sharding():
    devices = jax.devices()
    if len(devices) == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _diagonal_sd(covariances: np.ndarray) -> np.ndarray:
    """sqrt of the diagonals of a stack of covariance matrices (..., k, k) -> (..., k)."""
    return np.sqrt(np.maximum(np.diagonal(covariances, axis1=-2, axis2=-1), 0.0))


def _bucket_width(n_levels: np.ndarray) -> np.ndarray:
    """Padded level count per dataset: the common count, or the next power of two."""
    if n_levels.min() == n_levels.max():
        return n_levels.copy()
    return 2 ** np.ceil(np.log2(np.maximum(n_levels, 1))).astype(int)


def _dataset_problems(n_obs, n_levels, rank, p: int, k: int, group: str) -> list[str]:
    problems = []
    for n, ell, r in zip(n_obs, n_levels, rank):
        if ell < 2:
            problems.append(f"only {ell} level of {group!r}: its variance cannot be estimated")
        elif r < p:
            problems.append(f"the {p} fixed-effect columns have rank {r} in this dataset")
        elif n <= p:
            problems.append(f"{n} observations for {p} fixed effects")
        elif ell * k >= n:
            problems.append(f"{ell * k} random effects for {n} observations: not identifiable")
        else:
            problems.append("")
    return problems


def fit_batch(
    formula: str,
    data,
    by: str = "dataset",
    *,
    reml: bool = True,
    dtype: str = "float64",
    chunk_size: int = 4096,
    polish: bool = True,
    progress: bool | None = None,
    max_iterations: int = MAX_ITERATIONS,
) -> BatchResult:
    """Fit one linear mixed model to many datasets at once.

    Parameters
    ----------
    formula : str
        An lme4-style formula with one random-effect term, e.g.
        ``"Reaction ~ Days + (Days | Subject)"``.
    data : DataFrame, or list or dict of DataFrames
        A long frame with a ``by`` column, or the datasets themselves (their
        list position or dict key becomes the ``by`` label).
    by : str
        The column that names the dataset of each row.
    reml : bool
        REML (default) or maximum likelihood.
    dtype : {"float64", "float32"}
        float32 halves memory and is faster on GPUs; the criterion then agrees
        with float64 to about 1e-5 relative.
    chunk_size : int
        Most datasets per compiled call (bounds memory; see the module notes).
    polish : bool
        Refit, one by one with ``hp.lmm``, the datasets whose batched optimizer
        did not converge (rare: flat criteria near a zero variance).
    progress : bool, optional
        A progress bar over chunks (default: when stderr is a terminal).
    max_iterations : int
        Newton iterations per dataset.

    Returns
    -------
    BatchResult
        ``fixef``, ``fixef_se``, ``varcorr``, ``ranef``, ``objective``,
        ``converged``, ``is_singular``, ``messages``, ``to_frame()``.

    Notes
    -----
    Each dataset's criterion is the profiled REML/ML criterion of
    Bates et al. (2015), computed from its sufficient statistics; results equal
    those of ``hp.lmm`` on each dataset (criterion to ~1e-13 relative, theta to
    ~1e-6).  Models with several random-effect terms or known residual sds are
    not batched: fit those with ``hp.lmm`` in a loop.
    """
    if dtype not in ("float64", "float32"):
        raise ArgumentError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ArgumentError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    frame = _long_frame(data, by)
    design = build_design(formula, frame)
    if len(design.terms) != 1:
        terms = [f"({' + '.join(t.coef_names)} | {t.group})" for t in design.terms]
        raise ArgumentError(f"fit_batch fits models with one random-effect term; this formula has {len(terms)}: "
                            f"{', '.join(terms)}.  Fit it per dataset with hp.lmm.")
    term = design.terms[0]
    labels = frame.loc[design.rows, by]
    if labels.isna().any():
        raise DataError(f"column {by!r} has missing values: every row must name its dataset")
    dataset, dataset_labels = pd.factorize(labels, sort=False)
    n_datasets, p, k = len(dataset_labels), design.p, term.k

    # levels of each dataset, in hp.lmm's order (the global level order restricted to the dataset)
    cell, cell_of_row = np.unique(dataset.astype(np.int64) * term.n_levels + term.index, return_inverse=True)
    cell_dataset = cell // term.n_levels
    first_cell = np.searchsorted(cell_dataset, np.arange(n_datasets))
    level = cell_of_row - first_cell[dataset]
    n_levels = np.bincount(cell_dataset, minlength=n_datasets)
    levels = np.split(np.asarray(term.levels)[cell % term.n_levels], first_cell[1:])
    n_obs = np.bincount(dataset, minlength=n_datasets)

    width = _bucket_width(n_levels)
    sharding = _mesh_sharding()
    n_devices = 1 if sharding is None else len(jax.devices())
    workers = 1 if sharding is not None or jax.default_backend() != "cpu" else max(1, os.cpu_count() or 1)
    float_type = np.float64 if dtype == "float64" else np.float32

    # per-dataset results, NaN until a fit fills them (a dataset that cannot be fitted stays NaN)
    per_dataset = {name: np.full((n_datasets,) + shape, np.nan) for name, shape in
           (("theta", (k * (k + 1) // 2,)), ("objective", ()), ("beta", (p,)), ("vcov", (p, p)), ("sigma", ()),
            ("factor", (k, k)))}
    per_dataset["converged"] = np.zeros(n_datasets, dtype=bool)
    b = [np.full((ell, k), np.nan) for ell in n_levels]
    cond_sd = [np.full((ell, k), np.nan) for ell in n_levels]

    jobs, messages = [], [""] * n_datasets
    for bucket_width in np.unique(width):
        members = np.flatnonzero(width == bucket_width)
        rows = np.isin(dataset, members)
        local = np.searchsorted(members, dataset[rows])
        stats = sufficient_statistics(local, level[rows], design.X[rows], term.z[rows], design.y[rows],
                                      len(members), int(bucket_width))
        rank = np.linalg.matrix_rank(stats.xtx, hermitian=True)
        problems = _dataset_problems(n_obs[members], n_levels[members], np.atleast_1d(rank), p, k, term.group)
        valid = np.array([not problem for problem in problems])
        for index, problem in zip(members, problems):
            messages[index] = problem
        if not valid.any():
            continue
        usable = members[valid]
        stats = stats.take(np.flatnonzero(valid)).astype(float_type)
        size = min(chunk_size, math.ceil(len(usable) / workers))
        size = math.ceil(size / n_devices) * n_devices
        for start in range(0, len(usable), size):
            chosen = np.arange(start, min(start + size, len(usable)))
            padded = np.concatenate([chosen, np.full(size - len(chosen), chosen[0])])
            jobs.append((usable[chosen], stats.take(padded), len(chosen)))

    for _, chunk, _ in jobs:
        # compile each chunk shape once, before the threads start (they would each compile it)
        _compiled(chunk, reml, max_iterations, sharding)

    def run(job):
        _, chunk, count = job
        if sharding is not None:
            chunk = jax.device_put(chunk, sharding)
        result = _compiled(chunk, reml, max_iterations, sharding)(chunk)
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:count], result)

    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_datasets, desc="fit_batch", unit="datasets")
    to_polish = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for job, result in zip(jobs, pool.map(run, jobs)):
            members = job[0]
            if bar is not None:
                bar.update(len(members))
            for name, values in per_dataset.items():
                values[members] = result[name]
            for row, index in enumerate(members):
                ell = n_levels[index]
                b[index], cond_sd[index] = result["b"][row, :ell], _diagonal_sd(result["cond_var"][row, :ell])
                if not result["converged"][row]:
                    messages[index] = (f"batched optimizer stopped with Newton step "
                                       f"{float(result['newton_step'][row]):.1e}")
                    to_polish.append(index)
    if bar is not None:
        bar.close()

    if polish:
        for index in to_polish:
            rows = np.asarray(design.rows)[dataset == index]
            try:
                with warnings.catch_warnings():  # a singular refit is reported in is_singular
                    warnings.simplefilter("ignore", HierpoolWarning)
                    single = lmm(formula, frame.loc[rows], reml=reml)
            except Exception as exc:  # reported in the dataset's row, never raised for the batch
                messages[index] += f"; refit by hp.lmm failed: {exc}"
                continue
            refit = {"theta": single.theta, "objective": single.objective, "converged": single.converged,
                     "beta": single.fixef.to_numpy(), "vcov": single.vcov.to_numpy(), "sigma": single.sigma,
                     "factor": np.asarray(single.solution.factors[0])}
            for name, value in refit.items():
                per_dataset[name][index] = value
            b[index] = np.asarray(single.solution.b[0])
            cond_sd[index] = _diagonal_sd(np.asarray(single.solution.cond_var[0]))
            messages[index] += "; refitted by hp.lmm"

    factor, sigma = per_dataset["factor"], per_dataset["sigma"]
    diagonal = np.abs(factor[:, np.arange(k), np.arange(k)])
    singular = np.isfinite(per_dataset["objective"]) & np.any(diagonal < SINGULAR_TOL, axis=1)
    covariance = sigma[:, None, None] ** 2 * factor @ np.swapaxes(factor, 1, 2)
    index = pd.Index(dataset_labels, name=by)
    return BatchResult(
        datasets=index,
        fixed_names=design.fixed_names,
        coef_names=term.coef_names,
        group=term.group,
        theta=per_dataset["theta"],
        objective=pd.Series(per_dataset["objective"], index=index, name="objective"),
        converged=pd.Series(per_dataset["converged"], index=index, name="converged"),
        is_singular=pd.Series(singular, index=index, name="is_singular"),
        messages=pd.Series(messages, index=index, name="message"),
        beta=per_dataset["beta"],
        beta_se=_diagonal_sd(per_dataset["vcov"]),
        sigma=sigma,
        covariance=covariance,
        levels=levels,
        b=b,
        cond_sd=cond_sd,
        reml=reml,
    )
