"""The host path of several-term linear batches (``hp.fit_batch`` of a linear mixed model with several terms): one
chunk's search and solve, on :func:`hierpool.batch.fit_terms`' stacked systems.

Its chunks run on threads, not in worker processes (:mod:`hierpool.batch.host_processes`): on this project's
2-core machine the processes fitted --lmm-slopes-nested, --lmm-crossed-slopes and --crossed no faster than the
threads (benchmarks/RESULTS.md, "Worker processes, seventeenth session").
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
    :func:`hierpool.algebra.batched_systems.shared_grid`'s), each trial alone and its shifts only where it is
    accepted, the damping interpolated after a rejected trial.

    A search that did not converge, in a model with a term of several coefficients, is run again from its end's
    :func:`hierpool.algebra.linalg.rank_reduced_theta` (the boundary a near-singular term's search crawls towards,
    reached in one move), and the lower criterion of the two kept: on 300 datasets of --lmm-slopes-nested, 15 of
    the 17 searches that ended unconverged then converged, each to hp.lmm's optimum or below it
    (benchmarks/RESULTS.md, "The class beyond the issue's models, seventeenth session")."""
    ks = systems.layout.ks

    def value_and_grad(points, rows):
        # (A, Q) points of datasets ``rows``: each dataset's system broadcast over its points
        chunk = shared_grid(systems, rows, points=True)
        return host_objective_and_gradient(chunk, reml, n=n[rows][:, None])(points)

    def search(start, datasets):
        return optimize_on_host(lambda points, rows: value_and_grad(points, datasets[rows]), start, max_iterations,
                                ks, shifts_after_trials=True, interpolated_damping=True)

    result = search(start, np.arange(len(start)))
    stalled = np.flatnonzero(~result["converged"] & np.isfinite(result["objective"]))
    if stalled.size and max(ks) > 1:
        again = search(rank_reduced_theta(result["theta"][stalled], ks), stalled)
        better = again["objective"] < result["objective"][stalled]
        again["iterations"] = again["iterations"] + result["iterations"][stalled]
        for name, values in again.items():
            result[name][stalled[better]] = values[better]
    return result


def fit_on_host(systems, n, start: np.ndarray, reml: bool, max_iterations: int) -> dict:
    """A host chunk's fits: :func:`search_on_host`, then :func:`hierpool.algebra.henderson.solve` at each optimum over
    the chunk's leading axis (what the compiled optimize and solve programs return)."""
    optimized = search_on_host(systems, n, start, reml, max_iterations)
    with np.errstate(all="ignore"):  # a dataset whose theta is NaN gets NaN, as in the compiled program
        return {**optimized, **solved_entries(solve(optimized["theta"], systems, reml=reml, n=n))}
