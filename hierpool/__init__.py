"""hierpool: hierarchical (mixed-effects) models — closed-form BLUPs in JAX and Bayesian posteriors.

``import hierpool`` is light: the engines (and formulae, NumPyro, ArviZ, matplotlib) are
imported when first used, e.g. on the first ``hp.lmm``.  JAX is imported only by compiled
paths (large models, ``hp.bayes``, batches): a small ``hp.lmm`` fit runs in NumPy without it.
Whenever JAX is imported after the algebra is loaded (by hierpool or by the user), its float64
mode (``jax_enable_x64``) is turned on: the closed form needs double precision
(:mod:`hierpool.algebra.jax_runtime`).  The package's layers are described in
:mod:`hierpool.algebra`.
"""

from typing import TYPE_CHECKING

from .errors import (
    ArgumentError,
    ConvergenceError,
    ConvergenceWarning,
    DataError,
    FormulaError,
    HierpoolError,
    HierpoolWarning,
)

# The engines are imported on first use (PEP 562): ``import hierpool`` stays light (no JAX,
# formulae, NumPyro, ArviZ or matplotlib), and a closed-form fit never pays for the Bayesian
# engine's imports.  Each public name maps to the module that defines it.
_LAZY = {
    "bayesian": None, "batch": None, "closedform": None, "datasets": None, "pedigree": None, "plots": None,
    "validate": None,
    "BatchResult": "batch", "BayesBatchResult": "batch", "bayes_batch": "batch", "fit_batch": "batch",
    "BootstrapResult": "batch", "bootstrap": "batch",
    "BayesResult": "bayesian", "SamplingWarning": "bayesian", "bayes": "bayesian",
    "Control": "closedform", "MixedModel": "closedform", "lmm": "closedform", "anova": "closedform",
    "GLMMResult": "closedform", "glmm": "closedform", "simulate": "closedform",
    "PoolingComparison": "pooling_comparison", "pooling": "pooling_comparison",
    "RidgeView": "ridge", "ridge_view": "ridge",
    "ar1": "spec.correlation", "car1": "spec.correlation",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hierpool' has no attribute {name!r}")
    import importlib

    home = _LAZY[name]
    module = importlib.import_module(f".{home or name}", __name__)
    value = module if home is None else getattr(module, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what static tools and IDEs see
    from . import batch, bayesian, closedform, datasets, pedigree, plots, validate
    from .batch import BatchResult, BayesBatchResult, BootstrapResult, bayes_batch, bootstrap, fit_batch
    from .bayesian import BayesResult, SamplingWarning, bayes
    from .closedform import Control, GLMMResult, MixedModel, anova, glmm, lmm, simulate
    from .pooling_comparison import PoolingComparison, pooling
    from .ridge import RidgeView, ridge_view
    from .spec.correlation import ar1, car1

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "BatchResult",
    "BayesBatchResult",
    "BayesResult",
    "BootstrapResult",
    "Control",
    "ConvergenceError",
    "ConvergenceWarning",
    "DataError",
    "FormulaError",
    "GLMMResult",
    "HierpoolError",
    "HierpoolWarning",
    "MixedModel",
    "SamplingWarning",
    "anova",
    "ar1",
    "bayes",
    "bayes_batch",
    "bootstrap",
    "batch",
    "car1",
    "bayesian",
    "closedform",
    "datasets",
    "fit_batch",
    "glmm",
    "lmm",
    "pedigree",
    "plots",
    "pooling",
    "PoolingComparison",
    "ridge_view",
    "RidgeView",
    "simulate",
    "validate",
]
