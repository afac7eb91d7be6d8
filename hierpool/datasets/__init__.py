"""Data sets: the embedded default study (simulated in code), the classic tables (shipped CSVs) and areal data."""

from .biomarker import biomarker
from .classic import cbpp, dyestuff, eight_schools, pastes, penicillin, radon, sleepstudy
from .nc_sids import AreaData, nc_sids
from .replicates import sleepstudy_replicates, sleepstudy_responses

__all__ = ["AreaData", "biomarker", "cbpp", "dyestuff", "eight_schools", "nc_sids", "pastes", "penicillin", "radon",
           "sleepstudy", "sleepstudy_replicates", "sleepstudy_responses"]
