"""Batch fitting: one model, many datasets, one compiled and vmapped call (``hp.fit_batch``, ``hp.bayes_batch``)."""

from .bayes import bayes_batch
from .bayes_results import BayesBatchResult
from .fit import fit_batch
from .results import BatchResult

__all__ = ["BatchResult", "BayesBatchResult", "bayes_batch", "fit_batch"]
