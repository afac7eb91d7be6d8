"""Validation: the Bayesian engine against the closed form, calibration and coverage studies.

* :func:`blup_agreement`: posterior means vs BLUPs, posterior sds vs joint sds, the posterior
  from the independent full NUTS model (:func:`compare` for a fit and posterior you have).
* :func:`sampler_agreement`: the default collapsed sampler against the independent full model.
* :func:`sbc`: simulation-based calibration (Talts et al. 2018).
* :func:`coverage`: frequentist coverage of closed-form and Bayesian intervals; :func:`ar1_coverage` under
  AR(1) residuals; :func:`relmat_coverage` of the animal model (h^2, breeding values).
* GLMMs: :func:`mode_agreement` (posterior mode = conditional modes, exact), :func:`mode_mean_gap`
  and :func:`mode_mean_gap_series` (posterior means vs conditional modes), :func:`glmm_sbc`,
  :func:`glmm_coverage`.
* Spatial terms (disease mapping): :func:`spatial_sbc`; :func:`blup_agreement` with ``adjacency=``
  (:func:`compare_spatial`).
"""

from .agreement import (
    AgreementReport,
    agreement_series,
    blup_agreement,
    bonferroni_threshold,
    compare,
    compare_spatial,
    flat_beta_priors,
)
from .ar1_coverage import ar1_coverage, simulate_ar1_study
from .coverage import coverage, simulate_study
from .glmm_agreement import ModeAgreement, ModeMeanGap, mode_agreement, mode_mean_gap, mode_mean_gap_series
from .glmm_coverage import glmm_coverage
from .glmm_sbc import glmm_sbc
from .relmat_coverage import relmat_coverage, simulate_pedigree
from .samplers import SamplerAgreement, compare_samplers, sampler_agreement
from .sbc import SBCResult, ecdf_band, sbc
from .spatial_sbc import spatial_sbc

__all__ = [
    "AgreementReport",
    "ModeAgreement",
    "ModeMeanGap",
    "SBCResult",
    "SamplerAgreement",
    "agreement_series",
    "ar1_coverage",
    "relmat_coverage",
    "simulate_pedigree",
    "blup_agreement",
    "bonferroni_threshold",
    "compare",
    "compare_samplers",
    "compare_spatial",
    "coverage",
    "flat_beta_priors",
    "glmm_coverage",
    "glmm_sbc",
    "mode_agreement",
    "mode_mean_gap",
    "mode_mean_gap_series",
    "ecdf_band",
    "sampler_agreement",
    "sbc",
    "simulate_ar1_study",
    "spatial_sbc",
    "simulate_study",
]
