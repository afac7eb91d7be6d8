"""Batch fitting: one model, many datasets, one compiled and vmapped call (``hp.fit_batch``)."""

from .fit import fit_batch
from .results import BatchResult

__all__ = ["BatchResult", "fit_batch"]
