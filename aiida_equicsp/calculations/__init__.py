"""AiiDA calculation jobs of the EquiCSP plugin."""

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation

__all__ = ["EquiCSPSampleCalculation"]
