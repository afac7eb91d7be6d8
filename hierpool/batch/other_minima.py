"""A compiled batch chunk's searches from other starts: where a dataset's prior weights are uneven, its criterion can
have an inner minimum and one on the boundary (:func:`hierpool.algebra.linalg.other_minimum_starts`), and each start
is searched by the chunk's own program, the lowest optimum kept by the host search's rule
(:func:`hierpool.algebra.search.terms.lowest_of_other_minima`).  The one-term (:mod:`hierpool.batch.fit`) and
several-term (:mod:`hierpool.batch.fit_terms`) compiled paths share it; their host paths search within the host
search itself."""

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
