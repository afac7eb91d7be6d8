"""Validation: the Bayesian engine against the closed form, calibration and coverage studies.

* :func:`blup_agreement`: posterior means vs BLUPs, posterior sds vs joint sds, the posterior
  from the independent full NUTS model (:func:`compare` for a fit and posterior you have).
* :func:`sampler_agreement`: the default collapsed sampler against the independent full model.
* :func:`sbc`: simulation-based calibration (Talts et al. 2018).
* :func:`coverage`: frequentist coverage of closed-form and Bayesian intervals.
"""

from .agreement import (
    AgreementReport,
    agreement_series,
    blup_agreement,
    bonferroni_threshold,
    compare,
    flat_beta_priors,
)
from .coverage import coverage, simulate_study
from .samplers import SamplerAgreement, compare_samplers, sampler_agreement
from .sbc import SBCResult, ecdf_band, sbc

__all__ = [
    "AgreementReport",
    "SBCResult",
    "SamplerAgreement",
    "agreement_series",
    "blup_agreement",
    "bonferroni_threshold",
    "compare",
    "compare_samplers",
    "coverage",
    "flat_beta_priors",
    "ecdf_band",
    "sampler_agreement",
    "sbc",
    "simulate_study",
]
