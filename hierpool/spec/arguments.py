"""Checks of the arguments the fitting functions share (``hp.bayes``, ``hp.bayes_batch``).

One home for each rule, so that every entry point refuses the same bad value with
the same :class:`~hierpool.errors.ArgumentError` message.  Data checks (columns,
values) are :mod:`hierpool.spec.design`'s.
"""

from __future__ import annotations

from ..errors import ArgumentError, integer_argument, real_argument, seed_argument


def probability_argument(name: str, value):
    """``value`` when it is a number with 0 < value < 1, else an :class:`ArgumentError` naming ``name`` (a coverage,
    an acceptance rate; a string or None would raise Python's own TypeError at the comparison)."""
    return real_argument(name, value, above=0, below=1, rule="between 0 and 1")


#: The fewest kept draws per chain: the diagnostics split each chain in two halves of at least 2 (draws of 1 to 3
#: passed the check and then crashed in the split, a ValueError or an IndexError).
MIN_DRAWS = 4


def sampler_arguments(chains, draws, tune, seed, level, target_accept, *, min_tune: int = 0,
                      min_chains: int = 1) -> tuple[int, int, int, int]:
    """(chains, draws, tune, seed) as ints, with ``level`` (unless None) and ``target_accept`` checked to lie in
    (0, 1), and at least :data:`MIN_DRAWS` draws.

    ``min_tune``: the fewest warm-up iterations the caller accepts (``hp.bayes_batch`` warms up).
    ``min_chains``: the fewest chains (2 for the validation checks, whose R-hat compares chains).
    """
    chains = integer_argument("chains", chains)
    if chains < min_chains:
        raise ArgumentError(f"chains must be at least {min_chains} (R-hat compares chains), got {chains!r}")
    draws = integer_argument("draws", draws, minimum=MIN_DRAWS)
    tune = integer_argument("tune", tune, minimum=min_tune)
    seed = seed_argument(seed)
    if level is not None:
        probability_argument("level", level)
    probability_argument("target_accept", target_accept)
    return chains, draws, tune, seed

