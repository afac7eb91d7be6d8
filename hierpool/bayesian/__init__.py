"""The Bayesian engine: NumPyro posteriors for every fixed and random effect, from an lme4 formula.

Named ``bayesian`` (not ``bayes``) so that the package does not shadow the function ``hp.bayes``.
"""

from .fit import bayes
from .priors import Priors, resolve_priors
from .results import BayesResult, SamplingWarning

__all__ = ["BayesResult", "Priors", "SamplingWarning", "bayes", "resolve_priors"]
