"""AiiDA work chains of aiida-equicsp, installed as ``aiida_equicsp.workchains``.

- ``aiida_equicsp.workchains.sample_base.EquiCSPSampleBaseWorkChain`` (entry point ``equicsp.sample.base``):
  runs ``EquiCSPSampleCalculation`` until every requested candidate exists, restarting after running out of
  memory or being stopped early;
- ``aiida_equicsp.workchains.predict_relax.EquiCSPPredictRelaxWorkChain`` (``equicsp.predict_relax``): sample,
  screen, relax with an ML potential, rank, relax the best with DFT (aiida-quantumespresso), tabulate.
"""

from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain
from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain

__all__ = ["EquiCSPPredictRelaxWorkChain", "EquiCSPSampleBaseWorkChain"]
