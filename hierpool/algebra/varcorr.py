"""lme4's VarCorr layout: the standard deviations and correlations of each random-effect term.

One home for the table every engine reports (``hp.lmm``'s ``varcorr`` and printed summary,
``hp.bayes``'s, ``hp.fit_batch``'s and ``hp.bayes_batch``'s): :func:`varcorr_table` builds it
from the term covariances and sigma, and :func:`coef_pairs` fixes the order of a term's
correlations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

VARCORR_COLUMNS = ["grp", "var1", "var2", "vcov", "sdcor"]


def coef_pairs(k: int) -> list[tuple[int, int]]:
    """(i, j), i < j, in the order of R's lower.tri (column-major), as lme4's VarCorr data frame."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def varcorr_table(
    terms: Sequence[tuple[str, Sequence[str], np.ndarray]],
    sigma=None,
    *,
    form: str = "cov",
    by: tuple[str, Sequence] | None = None,
    object_keys: bool = False,
    phi=None,
) -> pd.DataFrame:
    r"""lme4's ``as.data.frame(VarCorr(fit))``: the variance components of one fit, or of many stacked.

    For a random-effect term j with covariance :math:`\Sigma_j` (k x k) the rows are

    * per coefficient i: ``vcov`` :math:`= \Sigma_{ii}`, ``sdcor`` :math:`= s_i = \sqrt{\Sigma_{ii}}`;
    * per pair i < j, in R's ``lower.tri`` order (:func:`coef_pairs`): ``vcov`` :math:`= \Sigma_{ij}`,
      ``sdcor`` :math:`= \rho_{ij} = \Sigma_{ij} / (s_i s_j)`, NaN unless :math:`s_i > 0` and
      :math:`s_j > 0` (a zero-variance coefficient has no correlation);

    and last a ``Residual`` row, ``vcov`` :math:`= \sigma^2`, ``sdcor`` :math:`= \sigma`.

    Parameters
    ----------
    terms : sequence of (group, coef_names, matrix)
        Per random-effect term, in the model's order: the grouping factor's name (``grp``), the
        names of its k coefficients (``var1``, ``var2``) and its k x k matrix, of shape (k, k) for
        one fit or (..., k, k) for fits stacked along leading axes (datasets, posterior draws).
    sigma : float, array of the leading shape, or None
        Residual standard deviation; None (residual sds known, or no residual) drops the
        ``Residual`` row.
    form : {"cov", "sdcor"}
        What the matrices hold: ``"cov"`` the covariance :math:`\Sigma_j` (the sds and
        correlations are derived as above); ``"sdcor"`` lme4's sd/correlation form, the sds
        :math:`s_i` on the diagonal and the correlations :math:`\rho_{ij}` off it, as a sampler
        draws them (``sdcor`` holds them unchanged, ``vcov`` :math:`= s_i \rho_{ij} s_j`).
    by : (name, labels), optional
        With stacked fits: a first column ``name`` holding each fit's label (one label per fit,
        the leading axes flattened in C order).
    object_keys : bool
        ``var1`` and ``var2`` as object columns holding None where empty (the layout
        ``hp.fit_batch``'s table has always had) instead of pandas' inferred string columns.
    phi : float, array of the leading shape, or None
        An AR(1) residual correlation: a last row (``grp`` "Residual", ``var1`` "phi", ``vcov`` NaN,
        ``sdcor`` phi), as ``hp.lmm``'s AR(1) fit and ``hp.fit_batch``'s give it.

    Returns
    -------
    pandas.DataFrame
        Columns ``[name,] grp, var1, var2, vcov, sdcor``; ``var2`` is empty on variance rows and
        ``var1`` on the residual row.  Stacked fits come one after another, each with the full
        table, in the order of their flattened leading axes.

    Examples
    --------
    >>> varcorr_table([("g", ["(Intercept)", "x"], np.array([[4.0, 1.0], [1.0, 1.0]]))], sigma=3.0)
            grp         var1 var2  vcov  sdcor
    0         g  (Intercept)  NaN   4.0    2.0
    1         g            x  NaN   1.0    1.0
    2         g  (Intercept)    x   1.0    0.5
    3  Residual          NaN  NaN   9.0    3.0
    """
    if form not in ("cov", "sdcor"):
        raise ValueError(f"form must be 'cov' or 'sdcor', got {form!r}")
    keys, vcov, sdcor = [], [], []
    for group, names, matrix in terms:
        matrix = np.asarray(matrix, dtype=float)
        k = len(names)
        if matrix.shape[-2:] != (k, k):
            raise ValueError(f"term {group!r} has {k} coefficients but a matrix of shape {matrix.shape}")
        diagonal = np.diagonal(matrix, axis1=-2, axis2=-1)
        sd = np.sqrt(diagonal) if form == "cov" else diagonal
        for i, name in enumerate(names):
            keys.append((group, name, None))
            vcov.append(diagonal[..., i] if form == "cov" else sd[..., i] ** 2)
            sdcor.append(sd[..., i])
        for i, j in coef_pairs(k):
            keys.append((group, names[i], names[j]))
            if form == "cov":
                positive = (sd[..., i] > 0) & (sd[..., j] > 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    corr = np.where(positive, matrix[..., i, j] / (sd[..., i] * sd[..., j]), np.nan)
                vcov.append(matrix[..., i, j])
                sdcor.append(corr)
            else:
                vcov.append(sd[..., i] * matrix[..., i, j] * sd[..., j])
                sdcor.append(matrix[..., i, j])
    if sigma is not None:
        sigma = np.asarray(sigma, dtype=float)
        keys.append(("Residual", None, None))
        vcov.append(sigma**2)
        sdcor.append(sigma)
    if phi is not None:
        phi = np.asarray(phi, dtype=float)
        keys.append(("Residual", "phi", None))
        vcov.append(np.full(phi.shape, np.nan))
        sdcor.append(phi)
    rows = len(keys)
    vcov = np.stack(np.broadcast_arrays(*vcov), axis=-1).reshape(-1, rows) if rows else np.empty((1, 0))
    sdcor = np.stack(np.broadcast_arrays(*sdcor), axis=-1).reshape(-1, rows) if rows else np.empty((1, 0))
    n_fits = vcov.shape[0]
    if object_keys:
        template = pd.DataFrame({"grp": [key[0] for key in keys]})
        for position, column in ((1, "var1"), (2, "var2")):
            template[column] = pd.Series([key[position] for key in keys], dtype=object)
    else:
        template = pd.DataFrame(keys, columns=VARCORR_COLUMNS[:3])
    table = template.iloc[np.tile(np.arange(rows), n_fits)].reset_index(drop=True) if n_fits != 1 else template
    table = table.assign(vcov=vcov.reshape(-1), sdcor=sdcor.reshape(-1))
    if by is not None:
        name, labels = by
        labels = labels if isinstance(labels, pd.Index) else pd.Index(labels)
        if len(labels) != n_fits:
            raise ValueError(f"{len(labels)} labels for {n_fits} stacked fits")
        table.insert(0, name, labels.repeat(rows))
    return table
