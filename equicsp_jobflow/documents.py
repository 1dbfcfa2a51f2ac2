"""Output documents of the jobflow route, queryable in a JobStore like atomate2's.

Every structure travels as a :class:`CandidateDocument`: emmet's ``StructureMetadata`` (``formula_pretty``,
``chemsys``, ``elements``, ``symmetry.symbol``/``number``, ``volume``, ``density``, ...) plus the candidate's
label and sample index, so ``store.query({"output.candidates.chemsys": "O-Sr-Ti"})`` finds a prediction by its
chemical system. The ``Structure`` objects themselves go to the JobStore's ``data`` store (the jobs are
declared with ``data=Structure``), as atomate2 does with its large fields.

Units: energies per atom in eV/atom, lengths in Å, volumes in Å³.
"""

from __future__ import annotations

from typing import Any

from emmet.core.structure import StructureMetadata
from pydantic import BaseModel, Field
from pymatgen.core import Structure


class CandidateDocument(StructureMetadata):
    """One crystal of the pipeline (sampled, ML-relaxed or DFT-relaxed), with its metadata for queries."""

    label: str = Field(description="the candidate's label, <formula>_<sample>, e.g. SrTiO3_000")
    formula: str = Field(description="the formula as requested, e.g. SrTiO3")
    sample: int = Field(description="the sample index within its formula")
    formula_units: int = Field(description="Z, the formula units of its cell (2 for Sr2Ti2O6)")
    cell_formula: str = Field(description="the cell's contents, e.g. Sr2Ti2O6")
    structure: Structure = Field(description="the crystal (kept in the 'data' store)")

    @classmethod
    def of(cls, label: str, formula: str, sample: int, structure: Structure) -> CandidateDocument:
        """The document of ``structure``, its metadata computed (emmet's symmetry at its default tolerance; Z and
        the cell formula from its atoms, which every stage keeps)."""
        from equicsp_core.settings import formula_of, formula_units

        return cls.from_structure(structure, label=label, formula=formula, sample=sample,
                                  formula_units=formula_units(structure.atomic_numbers),
                                  cell_formula=formula_of(structure.atomic_numbers), structure=structure)


class _CrystalsDocument(BaseModel):
    """What a sampling or generation job produced: the crystals, and the model that made them. The screen → relax →
    rank stages take either kind."""

    candidates: list[CandidateDocument] = Field(description="the valid crystals")
    invalid: list[dict[str, Any]] = Field(
        description="each crystal that was not valid: {formula, sample, formula_units, cell_formula}")
    num_requested: int
    checkpoint: str = Field(description="checkpoint name or path, as given")
    checkpoint_sha256: str


class SampleDocument(_CrystalsDocument):
    """What a sampling job produced, and from which model and settings."""

    formulas: list[str]
    settings: dict[str, Any] = Field(description="SampleSettings.to_dict() of the run")


class GenerateDocument(_CrystalsDocument):
    """What an ab initio generation job produced (atom types drawn too), and from which model and settings.

    A crystal's ``formula`` is the reduced formula it came out with, its ``sample`` its index among all the crystals
    generated (``SrTiO3_004``).
    """

    card: dict[str, Any] = Field(description="the model card: dataset, training and 'num_atoms_counts', the "
                                             "distribution the atom counts are drawn from without num_atoms")
    step_lr: float = Field(description="the Langevin step scale used: the setting, else the dataset's generation γ")
    settings: dict[str, Any] = Field(description="GenerateSettings.to_dict() of the run")


class ScreenDocument(BaseModel):
    """Candidates worth relaxing, and the decision on every candidate (:func:`equicsp_core.pipeline.screen`)."""

    survivors: list[CandidateDocument]
    decisions: dict[str, dict[str, Any]] = Field(description="label -> {kept, status, reason}")


class RelaxDocument(BaseModel):
    """An ML relaxation of several candidates (:func:`equicsp_core.relax.relax_structures`)."""

    results: dict[str, dict[str, Any]] = Field(
        description="label -> {status, energy_per_atom, steps, seconds, error, phonons}")
    relaxed: list[CandidateDocument] = Field(description="the relaxed structures (failed ones absent)")


class RankingDocument(BaseModel):
    """The ranking table of the pipeline: one row per sampled candidate, best first within each composition."""

    rows: list[dict[str, Any]] = Field(description="rows of equicsp_core.pipeline.ROW_COLUMNS")
    statuses: dict[str, str] = Field(description="what each status means")
    units: dict[str, str]
    levels: dict[str, str] = Field(default_factory=dict,
                                   description="the level of each ML energy column (potential and settings)")
    winners: list[str] = Field(description="labels of the best top_k of each composition (phonons, DFT)")
    ml_relaxed: list[CandidateDocument]
    dft_relaxed: list[CandidateDocument] = Field(default_factory=list)


class StableCandidatesDocument(BaseModel):
    """The stable and near-stable candidates of a chemical system: the merged candidates of its compositions'
    ranking tables whose ML energy above the system's hull, where they compete with the references and with each
    other, is at most ``ehull_max`` (:func:`equicsp_core.chemical_system.near_stable`)."""

    chemical_system: str
    compositions: list[str] = Field(description="the compositions predicted, one predict-relax flow each")
    ehull_max: float = Field(description="the threshold of the ML energy above the system's hull, eV/atom")
    candidates: list[dict[str, Any]] = Field(description="their ranking rows with ml_e_above_system_hull added, "
                                                         "lowest first")
    structures: list[CandidateDocument] = Field(description="their ML-relaxed structures, in the same order")
    missing: list[str] = Field(description="compositions whose flow gave no ranking table (it failed)")
