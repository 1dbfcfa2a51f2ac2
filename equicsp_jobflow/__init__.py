"""jobflow/atomate2 adapter of the EquiCSP engine: Makers for sample → screen → ML relax → rank (→ phonons, DFT), for
a chemical system (one such flow per composition, then the stable candidates) and for ab initio generation
(generate, alone or followed by the same stages).

The engine (``equicsp_core``) imports no workflow framework; this package is the jobflow route, as
``aiida_equicsp`` is the AiiDA one. Both call the same pipeline (:mod:`equicsp_core.pipeline`) with the same
settings (:mod:`equicsp_core.settings`), so they give the same ranking table. Needs the ``jobflow`` extra.
"""

from equicsp_jobflow.documents import (
    CandidateDocument,
    GenerateDocument,
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
    GenerateMaker,
    GenerateRelaxMaker,
    PredictRelaxMaker,
    ScreenCandidatesMaker,
)

__all__ = ["CandidateDocument", "ChemicalSystemMaker", "EquiCSPRelaxMaker", "EquiCSPSampleMaker", "GenerateDocument",
           "GenerateMaker", "GenerateRelaxMaker", "PredictRelaxMaker", "RankingDocument", "RelaxDocument", "SampleDocument", "ScreenCandidatesMaker", "ScreenDocument",
           "StableCandidatesDocument"]
