"""hierpool: hierarchical (mixed-effects) models — closed-form BLUPs in JAX and Bayesian posteriors.

Importing hierpool enables JAX's float64 mode (``jax_enable_x64``): the
closed-form engine needs double precision.
"""

from . import bayesian, batch, closedform, datasets, validate
from .batch import BatchResult, BayesBatchResult, bayes_batch, fit_batch
from .bayesian import BayesResult, SamplingWarning, bayes
from .closedform import Control, MixedModel, lmm
from .errors import (
    ArgumentError,
    ConvergenceError,
    ConvergenceWarning,
    DataError,
    FormulaError,
    HierpoolError,
    HierpoolWarning,
)
from .pooling import PoolingComparison, pooling
from .ridge import RidgeView, ridge_view

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "BatchResult",
    "BayesBatchResult",
    "BayesResult",
    "Control",
    "ConvergenceError",
    "ConvergenceWarning",
    "DataError",
    "FormulaError",
    "HierpoolError",
    "HierpoolWarning",
    "MixedModel",
    "SamplingWarning",
    "bayes",
    "bayes_batch",
    "batch",
    "bayesian",
    "closedform",
    "datasets",
    "fit_batch",
    "lmm",
    "pooling",
    "PoolingComparison",
    "ridge_view",
    "RidgeView",
    "validate",
]
