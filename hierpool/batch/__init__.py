"""Batch fitting: one model, many datasets, in compiled and vmapped calls (``hp.fit_batch``, ``hp.bayes_batch``,
and the parametric bootstrap on it, ``hp.bootstrap``).

Each public name is imported on first use (PEP 562): ``hp.fit_batch`` does not load the Bayesian stack
(NumPyro, ArviZ: seconds of imports), and a module of the package that needs neither JAX nor the others
(:mod:`hierpool.batch.glmm_search` and :mod:`hierpool.algebra.search.terms`, what a host worker process runs:
:mod:`hierpool.batch.host_processes`)
imports without them.
"""

#: Each public name and the module that defines it.
_HOMES = {"fit_batch": "fit", "BatchResult": "results", "bayes_batch": "bayes", "BayesBatchResult": "bayes_results",
          "bootstrap": "parametric_bootstrap", "BootstrapResult": "parametric_bootstrap"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOMES))


__all__ = ["BatchResult", "BayesBatchResult", "BootstrapResult", "bayes_batch", "bootstrap", "fit_batch"]
