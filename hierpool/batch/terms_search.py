"""The host path of several-term linear batches (``hp.fit_batch`` of a linear mixed model with several terms): one
chunk's search and solve, on :func:`hierpool.batch.fit_terms`' stacked systems.

Its chunks run on threads, not in worker processes (:mod:`hierpool.batch.host_processes`): on this project's
2-core machine the processes fitted --lmm-slopes-nested, --lmm-crossed-slopes and --crossed no faster than the
threads (benchmarks/RESULTS.md, "Worker processes, and the class beyond the issue's models, seventeenth
session").
"""

from __future__ import annotations

import numpy as np

from ..algebra.batched_systems import shared_grid
from ..algebra.criterion import host_objective_and_gradient
from ..algebra.henderson import solve
from ..algebra.linalg import rank_reduced_theta
from .optimize import optimize_on_host


def solved_entries(solution) -> dict:
    """The batch's entries of a :class:`~hierpool.algebra.henderson.Solution` (one dataset's, or a chunk's)."""
    return {"beta": solution.beta, "vcov": solution.vcov_beta, "sigma": solution.sigma, "b": solution.b,
            "cond_var": solution.cond_var, "factors": solution.factors}


def search_on_host(systems, n, start: np.ndarray, reml: bool, max_iterations: int) -> dict:
    """:func:`hierpool.batch.fit_terms`' compiled search (``_optimize_rows``) on the host: Newton's method of every
    dataset of a chunk (:func:`hierpool.batch.optimize.newton_on_host`) on the blocked criterion and its
    written-out gradient, evaluated for the datasets still searching at once (``systems``:
    :func:`hierpool.algebra.batched_systems.shared_grid`'s), each trial with its shifts (evaluating the shifts
    only around accepted trials, as a GLMM's search does, was slower here: a second call a pass for a criterion
    that costs little a point), the damping interpolated after a rejected trial.

    The compiled search (accelerators, float32) has neither the interpolated damping nor the restart below: a
    dataset it does not converge on is refitted by ``hp.lmm``, as before.

    A search that did not converge, in a model with a term of several coefficients, is run again from its end's
    :func:`hierpool.algebra.linalg.rank_reduced_theta` (the boundary a near-singular term's search crawls towards,
    reached in one move), with up to ``max_iterations`` passes more, and the lower criterion of the two kept (or
    the restart's where it converged to the same): on 300 datasets of --lmm-slopes-nested, 15 of the 17 searches
    that ended unconverged then converged, each to hp.lmm's optimum or below it (benchmarks/RESULTS.md, "Worker
    processes, and the class beyond the issue's models, seventeenth session")."""
    ks = systems.layout.ks

    def value_and_grad(points, rows):
        # (A, Q) points of datasets ``rows``: each dataset's system broadcast over its points
        chunk = shared_grid(systems, rows, points=True)
        return host_objective_and_gradient(chunk, reml, n=n[rows][:, None])(points)

    def search(start, datasets):
        return optimize_on_host(lambda points, rows: value_and_grad(points, datasets[rows]), start, max_iterations,
                                ks, interpolated_damping=True)

    result = search(start, np.arange(len(start)))
    stalled = np.flatnonzero(~result["converged"] & np.isfinite(result["objective"])
                             & np.all(np.isfinite(result["theta"]), axis=1))
    if stalled.size and max(ks) > 1:
        again = search(rank_reduced_theta(result["theta"][stalled], ks), stalled)
        before = result["objective"][stalled]
        # the lower criterion, or the restart where it converged to the same one (to rounding)
        better = (again["objective"] < before) | (again["converged"]
                                                  & (again["objective"] <= before + 1e-12 * np.abs(before)))
        again["iterations"] = again["iterations"] + result["iterations"][stalled]  # up to twice max_iterations
        for name, values in again.items():
            result[name][stalled[better]] = values[better]
    return result


def fit_on_host(systems, n, start: np.ndarray, reml: bool, max_iterations: int) -> dict:
    """A host chunk's fits: :func:`search_on_host`, then :func:`hierpool.algebra.henderson.solve` at each optimum over
    the chunk's leading axis (what the compiled optimize and solve programs return)."""
    optimized = search_on_host(systems, n, start, reml, max_iterations)
    with np.errstate(all="ignore"):  # a dataset whose theta is NaN gets NaN, as in the compiled program
        return {**optimized, **solved_entries(solve(optimized["theta"], systems, reml=reml, n=n))}
