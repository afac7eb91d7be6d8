"""lme4's VarCorr layout: the standard deviations and correlations of each random-effect term.

One home for the order in which every engine's tables list a term's correlations.
"""

from __future__ import annotations


def coef_pairs(k: int) -> list[tuple[int, int]]:
    """(i, j), i < j, in the order of R's lower.tri (column-major), as lme4's VarCorr data frame."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]
