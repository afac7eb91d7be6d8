"""Responses the fixed effects fit to rounding: noise-free data, or a response that varies only at its rounding;
and fits whose residual variance nearly vanished.

Such a response's residual from X's least-squares fit is rounding noise, and its criterion is made of that noise.
The batch's sums (a matrix product with the design, a bincount over a long frame's rows) round it otherwise than the
single fit's, so the batch's criterion differs from ``hp.lmm``'s, "converged" (y = 1 + 2x exactly, one term, 40
rows: -2,675 in the batch against ``hp.lmm``'s -2,656; or a fit where ``hp.lmm`` raises).  ``hp.fit_batch`` fits
each such dataset alone by the single fit, whose outcome, a fit or its refusal, is the dataset's row.

One rule (:func:`hierpool.algebra.checks.fits_to_rounding`) for both ways a batch comes: a shared design's responses
(:func:`near_exact_responses`, by blocks of responses) and a long frame's datasets
(:func:`near_exact_datasets`, from the residual its linear models compute anyway).  A large common location is not
such a response (1e13 + y: its residual is y's).

A response the fixed and random effects together reproduce exactly has no optimum (the criterion falls without end
as theta grows), and where a search stops on it is rounding's: ``hp.lmm`` refuses it by the residual at its fit
(:func:`hierpool.closedform.vanishing_residual.refuse_if_reproduced`).  The batch's fit of such a dataset can come
back converged at sigma ~1e-8 (a gradient of ~1e-6 along theta ~1e8): its rows whose residual sd is within
:data:`VANISHING` of what X leaves of the response (:func:`vanishing_residuals`) are fitted alone too, and
hp.lmm's outcome is theirs.
"""

from __future__ import annotations

import numpy as np

from ..algebra.checks import fits_to_rounding
from ..algebra.statistics import SHARED_BLOCK_VALUES

#: The row's message (before the single fit's own words, where it refuses the response).
REASON = "X fits its response to rounding (noise-free, or varying at its rounding): fitted alone"
#: A batch fit's residual sd, relative to the rms residual of its response from X's fit, up to which the dataset is
#: fitted alone (:func:`vanishing_residuals`): a search on a response the model reproduces exactly stops at 1e-8 or
#: below (theta ~1e8, where the criterion's gradient is ~1e-6); a fit this near that limit costs one single fit.
VANISHING = 1e-5
#: The same relative to the size of the terms the residual is computed from (a generous bound: ``hp.lmm`` refuses
#: within a few units in the last place, :data:`hierpool.algebra.checks.FIT_ROUNDING`, and fits the rest).
VANISHING_ROUNDING = 1e-13
#: The row's message of such a dataset (before the single fit's words).
VANISHED_REASON = "the residual variance nearly vanished (noise-free data?): fitted alone"


def spread_squares(target: np.ndarray, weights: np.ndarray, dataset: np.ndarray, n_datasets: int) -> np.ndarray:
    """Each dataset's weighted spread of ``target`` (N,) about its weighted mean, (y - ybar)'W(y - ybar), from each
    row's dataset code (``dataset``; a dataset without rows 0) and precision weight."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        total = np.bincount(dataset, weights=weights, minlength=n_datasets)
        centred = target - (np.bincount(dataset, weights=weights * target, minlength=n_datasets) / total)[dataset]
        return np.bincount(dataset, weights=weights * centred * centred, minlength=n_datasets)


def vanishing_residuals(sigma: np.ndarray, n_obs: np.ndarray, left_squares: np.ndarray,
                        magnitude_squares: np.ndarray) -> np.ndarray:
    """(datasets,) bool: a batch fit's residual variance within :data:`VANISHING` of what X leaves of its response
    (``left_squares``: r_X'W r_X, the residual from X's least-squares fit), sigma^2 n <= VANISHING^2 r_X'W r_X, or
    within :data:`VANISHING_ROUNDING` of the terms its residual is computed from (``magnitude_squares``:
    :func:`hierpool.algebra.checks.fit_magnitudes`' weighted squares), where ``hp.lmm`` may find it their rounding.
    A spread about the mean would count what X explains (a slope on a timestamp sent ordinary fits alone: the
    fifty-ninth session's review).  NaN sigmas (no fit) are not flagged."""
    with np.errstate(invalid="ignore", over="ignore"):
        variance = sigma ** 2 * n_obs
        return np.isfinite(variance) & (
            (np.isfinite(left_squares) & (variance <= VANISHING ** 2 * left_squares))
            | (np.isfinite(magnitude_squares) & (variance <= VANISHING_ROUNDING ** 2 * magnitude_squares)))


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

    row_weights = np.ones(len(target)) if weights is None else weights
    total = per_dataset(weights).astype(float)
    with np.errstate(invalid="ignore", over="ignore"):  # (a dataset with no rows: refused before, not near)
        return fits_to_rounding(per_dataset(row_weights * residual * residual),
                                spread_squares(target, row_weights, dataset, n_datasets),
                                per_dataset(row_weights * target * target)) & (total > 0)


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
