"""Data sets: the embedded default study, generated in code (no download)."""

from .biomarker import biomarker

__all__ = ["biomarker"]
