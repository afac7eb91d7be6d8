"""Validation: the Bayesian engine against the closed form, calibration and coverage studies.

* :func:`blup_agreement`: posterior means vs BLUPs, posterior sds vs conditional sds.
* :func:`sbc`: simulation-based calibration (Talts et al. 2018).
* :func:`coverage`: frequentist coverage of closed-form and Bayesian intervals.
"""

from .agreement import AgreementReport, agreement_series, blup_agreement, bonferroni_threshold
from .coverage import coverage, simulate_study
from .sbc import SBCResult, ecdf_band, sbc

__all__ = ["AgreementReport", "SBCResult", "agreement_series", "blup_agreement", "bonferroni_threshold", "coverage", "ecdf_band", "sbc", "simulate_study"]
