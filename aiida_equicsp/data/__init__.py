"""AiiDA data types of the EquiCSP plugin."""

from aiida_equicsp.data.model import EquiCSPModelData

__all__ = ["EquiCSPModelData"]
