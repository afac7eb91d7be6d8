"""The closed-form (frequentist) engine: REML/ML, Henderson's equations, BLUPs, in JAX float64.

Stages, as in lme4: :class:`MixedModel` (lFormula + mkLmerDevfun) ->
:meth:`MixedModel.fit` (optimize) -> :class:`LMMResult` (mkMerMod).  The pure
functions :func:`objective` and :func:`solve` take a :class:`MixedModelSystem`
pytree and can be jit-compiled, differentiated and vmapped.
"""

from ..algebra.criterion import objective
from ..algebra.henderson import Solution, prediction_covariance, solve
from ..algebra.system import MixedModelSystem, build_system
from .anova import anova
from .glmm import glmm
from .glmm_results import GLMMResult
from .model import MixedModel, lmm
from .optimize import Control
from .results import LMMResult
from .simulate import simulate

__all__ = [
    "Control",
    "GLMMResult",
    "LMMResult",
    "MixedModel",
    "MixedModelSystem",
    "Solution",
    "anova",
    "build_system",
    "glmm",
    "lmm",
    "objective",
    "prediction_covariance",
    "simulate",
    "solve",
]
