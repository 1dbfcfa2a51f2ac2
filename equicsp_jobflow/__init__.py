"""jobflow/atomate2 adapter of the EquiCSP engine: Makers for sample → screen → ML relax → rank (→ phonons, DFT), and
for a chemical system (one such flow per composition, then the stable candidates).

The engine (``equicsp_core``) imports no workflow framework; this package is the jobflow route, as
``aiida_equicsp`` is the AiiDA one. Both call the same pipeline (:mod:`equicsp_core.pipeline`) with the same
settings (:mod:`equicsp_core.settings`), so they give the same ranking table. Needs the ``jobflow`` extra.
"""

from equicsp_jobflow.documents import (
    CandidateDocument,
    RankingDocument,
    RelaxDocument,
    SampleDocument,
    ScreenDocument,
    StableCandidatesDocument,
)
from equicsp_jobflow.makers import (
    ChemicalSystemMaker,
    EquiCSPRelaxMaker,
    EquiCSPSampleMaker,
    PredictRelaxMaker,
    ScreenCandidatesMaker,
)

__all__ = ["CandidateDocument", "ChemicalSystemMaker", "EquiCSPRelaxMaker", "EquiCSPSampleMaker", "PredictRelaxMaker",
           "RankingDocument", "RelaxDocument", "SampleDocument", "ScreenCandidatesMaker", "ScreenDocument",
           "StableCandidatesDocument"]
