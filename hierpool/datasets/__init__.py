"""Data sets: the embedded default study (simulated in code) and the classic tables (shipped CSVs)."""

from .biomarker import biomarker
from .classic import dyestuff, eight_schools, pastes, penicillin, radon, sleepstudy
from .replicates import sleepstudy_replicates

__all__ = ["biomarker", "dyestuff", "eight_schools", "pastes", "penicillin", "radon", "sleepstudy", "sleepstudy_replicates"]
