"""Responses the fixed effects fit to rounding: noise-free data, or a response that varies only at its rounding.

Such a response's residual from X's least-squares fit is rounding noise, and its criterion is made of that noise.
The batch's sums (a matrix product with the design, a bincount over a long frame's rows) round it otherwise than the
single fit's, so the batch's criterion differs from ``hp.lmm``'s, "converged" (y = 1 + 2x exactly, one term, 40
rows: -2,675 in the batch against ``hp.lmm``'s -2,656; or a fit where ``hp.lmm`` raises).  ``hp.fit_batch`` fits
each such dataset alone by the single fit, whose outcome, a fit or its refusal, is the dataset's row.

One rule (:func:`fits_to_rounding`) for both ways a batch comes: a shared design's responses
(:func:`near_exact_responses`, by blocks of responses) and a long frame's datasets
(:func:`near_exact_datasets`, from the residual its linear models compute anyway).  A large common location is not
such a response (1e13 + y: its residual is y's).
"""

from __future__ import annotations

import numpy as np

from ..algebra.statistics import SHARED_BLOCK_VALUES

#: The size of a response's weighted residual from X's least-squares fit, relative to the response's weighted spread
#: about its mean, up to which X fits it to rounding: above it the shared path's criterion agreed with hp.lmm's to
#: 4e-11 or better, below it drifted to 1e-8 (the forty-seventh session's second review).
NEAR_EXACT = 1e-8
#: The same, relative to the response's size: a response whose variation is at its rounding (1 and 1 + 1e-15).
AT_ROUNDING = 1e-14
#: The row's message (before the single fit's own words, where it refuses the response).
REASON = "X fits its response to rounding (noise-free, or varying at its rounding): fitted alone"


def fits_to_rounding(residual_squares: np.ndarray, spread_squares: np.ndarray, size_squares: np.ndarray) -> np.ndarray:
    """Whether X fits each response to rounding, from its weighted sums of squares: r'Wr of its residual from X's
    fit, (y - ybar)'W(y - ybar) of its spread about its (weighted) mean, y'Wy of its size (y less any offset).

    .. math:: r'Wr \\le \\epsilon_1^2 (y - \\bar y)'W(y - \\bar y) \\quad\\text{or}\\quad r'Wr \\le \\epsilon_2^2 y'Wy,

    :math:`\\epsilon_1` = :data:`NEAR_EXACT`, :math:`\\epsilon_2` = :data:`AT_ROUNDING`.  Sums beyond a float
    (weights of 1e300) say nothing: such a response is not flagged (its fit's own checks speak for it).
    """
    finite = np.isfinite(residual_squares) & np.isfinite(spread_squares) & np.isfinite(size_squares)
    return finite & ((residual_squares <= NEAR_EXACT ** 2 * spread_squares)
                     | (residual_squares <= AT_ROUNDING ** 2 * size_squares))


def near_exact_datasets(dataset: np.ndarray, target: np.ndarray, residual: np.ndarray, weights: np.ndarray | None,
                        n_datasets: int) -> np.ndarray:
    """(datasets,) bool: :func:`fits_to_rounding` of each dataset of a long frame.

    Parameters
    ----------
    dataset : (N,) int
        Each design row's dataset.
    target, residual : (N,)
        y less the offset, and its residual from each dataset's weighted least-squares fit on X
        (:func:`hierpool.algebra.statistics.location_shifts`).
    weights : (N,), optional
        Each row's precision weight (None: ones).
    """
    def per_dataset(values: np.ndarray | None) -> np.ndarray:
        return np.bincount(dataset, weights=values, minlength=n_datasets)

    def weighted(values: np.ndarray) -> np.ndarray:
        return values if weights is None else weights * values

    total = per_dataset(weights).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):  # (a dataset with no rows: refused before, not near)
        spread = target - (per_dataset(weighted(target)) / total)[dataset]
        return fits_to_rounding(per_dataset(weighted(residual * residual)), per_dataset(weighted(spread * spread)),
                                per_dataset(weighted(target * target))) & (total > 0)


def near_exact_responses(design, target: np.ndarray, refused: np.ndarray) -> tuple[tuple[int, str], ...]:
    """The responses of a shared design (columns of ``target``, the responses less the offset at the design's rows;
    ``refused`` ones left out) that X fits to rounding (:func:`fits_to_rounding`), as (dataset, why) pairs, by
    blocks of responses (their temporaries bounded as the shared design's statistics' are).  None with known
    residual sds, which leave no variance to estimate from the residual: its rounding moves no criterion."""
    if not design.X.shape[1] or design.sigma_known:
        return ()
    n, count = target.shape
    weights = design.row_weights
    root = None if design.weights is None else np.sqrt(weights)[:, None]  # (unweighted: no products with ones)
    # the residual by X's (weighted) QR, backward stable: the normal equations lose its digits where X's columns are
    # far from centred (x = 1e5 + Days: a noise-free response's residual 1e-6 of its spread, not flagged)
    basis = np.linalg.qr(design.X if root is None else root * design.X)[0]
    near = np.zeros(count, dtype=bool)
    width = max(1, SHARED_BLOCK_VALUES // max(n, 1))  # temporaries bounded, as shared_design_statistics' are

    def squares(values: np.ndarray) -> np.ndarray:  # each column's sum of squares
        return np.einsum("nd,nd->d", values, values)

    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, count, width):
            block = slice(start, start + width)
            kept = np.where(refused[block], 0.0, target[:, block]) if refused[block].any() else target[:, block]
            scaled = kept if root is None else root * kept
            size = squares(scaled)
            residual = basis @ (basis.T @ scaled)
            np.subtract(scaled, residual, out=residual)
            residual = squares(residual)
            spread = np.subtract(kept, weights @ kept / weights.sum(), out=np.empty(kept.shape))
            if root is not None:
                spread *= root
            near[block] = fits_to_rounding(residual, squares(spread), size)
    return tuple((int(d), REASON) for d in np.flatnonzero(near & ~refused))
