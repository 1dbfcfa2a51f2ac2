"""jobflow/atomate2 adapter of the EquiCSP engine: Makers for sample → screen → ML relax → rank (→ phonons, DFT).

The engine (``equicsp_core``) imports no workflow framework; this package is the jobflow route, as
``aiida_equicsp`` is the AiiDA one. Both call the same pipeline (:mod:`equicsp_core.pipeline`) with the same
settings (:mod:`equicsp_core.settings`), so they give the same ranking table. Needs the ``jobflow`` extra.
"""

from equicsp_jobflow.documents import CandidateDocument, RankingDocument, RelaxDocument, SampleDocument, ScreenDocument
from equicsp_jobflow.makers import EquiCSPRelaxMaker, EquiCSPSampleMaker, PredictRelaxMaker, ScreenCandidatesMaker

__all__ = ["CandidateDocument", "EquiCSPRelaxMaker", "EquiCSPSampleMaker", "PredictRelaxMaker", "RankingDocument",
           "RelaxDocument", "SampleDocument", "ScreenCandidatesMaker", "ScreenDocument"]
