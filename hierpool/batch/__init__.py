"""Batch fitting: one model, many datasets, in compiled and vmapped calls (``hp.fit_batch``, ``hp.bayes_batch``,
and the parametric bootstrap on it, ``hp.bootstrap``).

``bayes_batch`` and its result are imported on first use (PEP 562): ``hp.fit_batch`` does not
load the Bayesian stack (NumPyro, ArviZ: seconds of imports).
"""

from .bootstrap import BootstrapResult, bootstrap
from .fit import fit_batch
from .results import BatchResult

_BAYESIAN = {"bayes_batch": "bayes", "BayesBatchResult": "bayes_results"}


def __getattr__(name: str):
    if name not in _BAYESIAN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_BAYESIAN[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_BAYESIAN))


__all__ = ["BatchResult", "BayesBatchResult", "BootstrapResult", "bayes_batch", "bootstrap", "fit_batch"]
