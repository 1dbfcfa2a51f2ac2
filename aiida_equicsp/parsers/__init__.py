"""AiiDA parsers of the EquiCSP plugin."""

from aiida_equicsp.parsers.sample import EquiCSPSampleParser

__all__ = ["EquiCSPSampleParser"]
