"""A compiled batch chunk's rows searched again.

From other starts (:func:`compiled_other_minima`): where a dataset's prior weights are uneven, its criterion can
have an inner minimum and one on the boundary (:func:`hierpool.algebra.linalg.other_minimum_starts`), and each start
is searched by the chunk's own program, the lowest optimum kept by the host search's rule
(:func:`hierpool.algebra.search.terms.lowest_of_other_minima`).  Their host paths search within the host search
itself.

By the host search, where the compiled Newton's method stopped short (:func:`stopped_rows_searched_on_host`).

The one-term (:mod:`hierpool.batch.fit`) and several-term (:mod:`hierpool.batch.fit_terms`) compiled paths share
both."""

from __future__ import annotations

import numpy as np

from ..algebra.search.terms import lowest_of_other_minima
from .plan import fetch, place


def compiled_other_minima(optimized: dict, rows_of, optimize, uneven: np.ndarray, ks, float_type, sharding,
                          scales=None) -> dict:
    """``optimized`` (a compiled chunk's search: theta, objective, newton_step, iterations, converged per row), each
    row of ``uneven`` (a mask of the chunk's rows; a padded row is not) searched again from its optimum's other starts
    and the lowest converged optimum kept (host arrays returned).

    ``optimize(*rows_of(index), start)`` is the chunk's program, ``rows_of(index)`` the chunk's data (host arrays) for
    its rows ``index``: each start runs with its own dataset's data, in rounds of the chunk's rows (the program's
    shape; a round's last rows repeat its first, their results dropped), each search to the program's own pass limit.
    ``ks``: the search's term widths; ``scales``: the rows' probe units, as the host search's
    (:func:`hierpool.algebra.linalg.theta_scales`)."""
    found = {name: np.array(value) for name, value in fetch(optimized).items()}  # writable host copies
    rows = len(found["objective"])

    def search(starts, owners, passes):  # (passes: the program's own)
        rounds = []
        for begin in range(0, len(starts), rows):
            part = np.arange(begin, min(begin + rows, len(starts)))
            index = np.resize(part, rows)
            arguments = place(rows_of(owners[index]), sharding)
            again = fetch(optimize(*arguments, place(starts[index].astype(float_type), sharding)))
            rounds.append({name: np.asarray(value)[: len(part)] for name, value in again.items()})
        return {name: np.concatenate([r[name] for r in rounds]) for name in rounds[0]}

    return lowest_of_other_minima(found, search, tuple(ks), uneven, scales)


def stopped_rows_searched_on_host(found: dict, count: int, search) -> dict:
    """``found`` (a compiled chunk's search, or the one-term path's rows to finish gathered from every chunk,
    :func:`hierpool.batch.fit._finished_on_host`; host arrays: theta, objective, newton_step, converged per row, and
    iterations where they are), the rows among its first ``count`` (the others pad the chunk) whose compiled Newton's
    method stopped short searched again by ``search(rows)``: the host search on those rows' data from their start
    (:func:`hierpool.algebra.search.terms.search_on_host`: saddle-free steps, interpolated damping, restarts from
    the boundary's faces), taken where it converged no higher.  Else each such dataset is refitted alone by the
    single fit (``hp.fit_batch``'s polish): 12 of 100,000 sleepstudy-shaped datasets, each refit about 60 times the
    host search's time (benchmarks/RESULTS.md, forty-eighth session).  A compiled search that stopped lower, not
    converged, is left to the single fit, whose refit keeps the lower of the two."""
    stopped = np.flatnonzero(~np.asarray(found["converged"][:count], dtype=bool))
    if not stopped.size:
        return found
    with np.errstate(all="ignore"):  # (a dataset it cannot search either stays not converged: the single fit's)
        again = search(stopped)
    before = np.asarray(found["objective"], dtype=float)[stopped]
    taken = np.asarray(again["converged"], dtype=bool) & ~(again["objective"] > before + 1e-12 * np.abs(before))
    out = {name: np.array(value, copy=True) for name, value in found.items()}
    for name in out.keys() & again.keys():
        out[name][stopped[taken]] = np.asarray(again[name])[taken]
    return out
