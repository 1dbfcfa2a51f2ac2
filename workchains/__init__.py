"""AiiDA work chains of aiida-equicsp, installed as ``aiida_equicsp.workchains``.

- ``aiida_equicsp.workchains.sample_base.EquiCSPSampleBaseWorkChain`` (entry point ``equicsp.sample.base``):
  runs ``EquiCSPSampleCalculation`` until every requested candidate exists, restarting after running out of
  memory or being stopped early.
"""

from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain

__all__ = ["EquiCSPSampleBaseWorkChain"]
