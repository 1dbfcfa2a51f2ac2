"""jobflow/atomate2 Makers for structure prediction: sample → screen → ML relax → rank (→ DFT).

The only module of ``equicsp_core`` that imports jobflow and atomate2 (the optional ``jobflow`` extra);
the engine itself stays free of them. Sampling goes through the same functions as ``equicsp sample``
(:func:`~equicsp_core.checkpoint.load_model`, :func:`~equicsp_core.predict.predict_structures`), and
screening through the pure functions of :mod:`equicsp_core.screening`, the ones the AiiDA work chains use.

:class:`PredictRelaxMaker` builds the flow. How many candidates survive screening is known only at run
time, so the relax step is a dynamic job: it replaces itself by one relax job per survivor plus a ranking
job. The ranking job accepts missing relax outputs (``OnMissing.NONE``), so a relaxation that fails shows up
as a ``"failed"`` row instead of stopping the flow; the manager still reports the flow as not fully
successful (``run_locally(..., ensure_success=True)`` raises after it has run everything).

Units: energies in eV, energies per atom in eV/atom, lengths in Å, volumes in Å³.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from jobflow import Flow, Maker, OnMissing, Response, job
from pydantic import BaseModel, Field
from pymatgen.core import Structure

from equicsp_core.checkpoint import load_model, resolve_checkpoint
from equicsp_core.predict import predict_structures
from equicsp_core.settings import SampleSettings, parse_formula
from equicsp_core.screening import (
    MAX_VOLUME_PER_ATOM,
    MIN_DISTANCE,
    UNRELAXED_MATCH_TOLERANCES,
    displacement,
    duplicate_of,
    implausibility,
    space_group,
)


class CandidateStructure(BaseModel):
    """One candidate; ``index`` is its sample index, kept through screening, relaxation and ranking."""

    index: int
    structure: Structure


class SampleDocument(BaseModel):
    """What a sampling job produced, and from which model and settings."""

    formula: str
    candidates: list[CandidateStructure] = Field(description="the valid samples (invalid ones are only counted)")
    num_requested: int
    num_invalid: int = Field(description="samples that were not a crystal (diverged lattice)")
    checkpoint: str = Field(description="checkpoint name or path, as given")
    checkpoint_sha256: str
    settings: dict[str, Any] = Field(description="SampleSettings.to_dict() of the run")


class ScreenDocument(BaseModel):
    """Candidates worth relaxing, and the others with the reason each was dropped."""

    survivors: list[CandidateStructure]
    dropped: list[dict[str, Any]] = Field(description="{'index': sample index, 'reason': sentence}")


class RankingDocument(BaseModel):
    """Relaxed candidates, lowest energy per atom first."""

    formula: str
    table: list[dict[str, Any]] = Field(
        description="one row per relaxed candidate: rank (None when failed), formula, candidate, "
        "energy_per_atom (eV/atom), space_group_before/after, rms/max_displacement (Å), volume_change "
        "(ratio - 1), status ('relaxed', 'not converged' (step limit reached) or 'failed'); failed rows last"
    )
    structures: list[Structure] = Field(description="relaxed structures in table order, failed ones left out")
    dft_candidates: list[int] = Field(default_factory=list, description="sample indices handed to dft_maker")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EquiCSPSampleMaker(Maker):
    """Sample ``num_samples`` candidate structures of one formula with an EquiCSP checkpoint.

    ``checkpoint`` is a shipped checkpoint name or a file path, resolved where the job runs (so a flow can
    be built on a machine that does not hold the weights). The settings are checked when the Maker is
    built; the formula when the job runs (and by :class:`PredictRelaxMaker` when it builds its flow).
    ``steps=None`` samples with the model's full T steps, as the papers do.
    """

    name: str = "equicsp sample"
    checkpoint: str = "mp_20"
    num_samples: int = 20
    steps: int | None = None
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.settings("H")  # refuse bad settings now, not on a worker later ("H": any valid formula)

    def settings(self, formula: str) -> SampleSettings:
        """The :class:`SampleSettings` of sampling ``formula`` (raises ``ValueError`` on bad input)."""
        return SampleSettings(formulas=(formula,), num_samples=self.num_samples, steps=self.steps, seed=self.seed,
                              batch_size=self.batch_size, device=self.device)

    @job(output_schema=SampleDocument)
    def make(self, formula: str) -> SampleDocument:
        """Sample the candidates of ``formula`` (the cell contents, e.g. ``"SrTiO3"`` is a 5-atom cell)."""
        settings = self.settings(formula)
        path = resolve_checkpoint(self.checkpoint)
        model, _ = load_model(path, settings.device)
        samples = predict_structures(model, list(settings.formulas), settings.num_samples, settings.steps,
                                     settings.step_lr, settings.seed, settings.batch_size,
                                     lattice_bound=settings.lattice_bound)
        valid = [CandidateStructure(index=s.sample_index, structure=s.structure) for s in samples
                 if s.structure is not None]
        return SampleDocument(formula=formula, candidates=valid, num_requested=settings.num_samples,
                              num_invalid=len(samples) - len(valid), checkpoint=str(self.checkpoint),
                              checkpoint_sha256=_sha256(path), settings=settings.to_dict())


@dataclass
class ScreenCandidatesMaker(Maker):
    """Drop implausible candidates (atoms closer than ``min_distance`` Å, volume per atom above
    ``max_volume_per_atom`` Å³, see :func:`~equicsp_core.screening.implausibility`), then duplicates of an
    earlier plausible one (pymatgen ``StructureMatcher``), so no relaxation is spent on them."""

    name: str = "equicsp screen"
    min_distance: float = MIN_DISTANCE
    max_volume_per_atom: float = MAX_VOLUME_PER_ATOM

    @job(output_schema=ScreenDocument)
    def make(self, candidates: list[CandidateStructure]) -> ScreenDocument:
        dropped, plausible = [], []
        for candidate in candidates:
            reason = implausibility(candidate.structure, self.min_distance, self.max_volume_per_atom)
            if reason is None:
                plausible.append(candidate)
            else:
                dropped.append({"index": candidate.index, "reason": reason})
        representative = duplicate_of([c.structure for c in plausible], **UNRELAXED_MATCH_TOLERANCES)
        survivors = []
        for position, (candidate, first) in enumerate(zip(plausible, representative, strict=True)):
            if first == position:
                survivors.append(candidate)
            else:
                dropped.append({"index": candidate.index, "reason": f"duplicate of candidate {plausible[first].index}"})
        return ScreenDocument(survivors=survivors, dropped=sorted(dropped, key=lambda d: d["index"]))


def _default_relax_maker() -> Maker:
    """CHGNet with the cell free, as the AiiDA work chain's "precise" protocol relaxes (fmax in eV/Å)."""
    from atomate2.forcefields.jobs import ForceFieldRelaxMaker

    return ForceFieldRelaxMaker(force_field_name="CHGNet", relax_cell=True, steps=1000, relax_kwargs={"fmax": 0.02})


@dataclass
class PredictRelaxMaker(Maker):
    """Flow for one formula: sample → screen → relax every survivor → rank by energy per atom → DFT on the
    best ``top_k`` (only when ``dft_maker`` is given).

    ``relax_maker`` and ``dft_maker`` are any Makers whose ``make(structure)`` job outputs a task document
    with ``structure`` and ``output.energy`` (eV), as atomate2's force-field and VASP makers do. The flow's
    output is the :class:`RankingDocument`; DFT jobs are added after the ranking job and store their own
    documents.
    """

    name: str = "equicsp predict-relax"
    sample_maker: EquiCSPSampleMaker = field(default_factory=EquiCSPSampleMaker)
    screen_maker: ScreenCandidatesMaker = field(default_factory=ScreenCandidatesMaker)
    relax_maker: Maker = field(default_factory=_default_relax_maker)
    top_k: int = 3
    dft_maker: Maker | None = None

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")

    def make(self, formula: str) -> Flow:
        parse_formula(formula)  # a bad formula fails here, before anything is submitted
        sample = self.sample_maker.make(formula)
        sample.name = f"{sample.name} {formula}"
        screen = self.screen_maker.make(sample.output.candidates)
        screen.name = f"{screen.name} {formula}"
        relax = relax_and_rank(formula, screen.output.survivors, self.relax_maker, self.top_k, self.dft_maker)
        relax.name = f"relax and rank {formula}"
        return Flow([sample, screen, relax], output=relax.output, name=f"{self.name} {formula}")


@job
def relax_and_rank(formula: str, survivors: list[CandidateStructure], relax_maker: Maker, top_k: int,
                   dft_maker: Maker | None) -> Response:
    """Replace this job by one ``relax_maker`` job per survivor and the ranking job that reads them."""
    relaxes = []
    for candidate in survivors:
        relax = relax_maker.make(candidate.structure)
        relax.name = f"{relax.name} {formula} #{candidate.index}"
        relaxes.append(relax)
    rank = rank_relaxed(formula, survivors, [r.output for r in relaxes], top_k, dft_maker)
    rank.name = f"rank {formula}"
    rank.config.on_missing_references = OnMissing.NONE  # a failed relax arrives as None, not as an error
    return Response(replace=Flow([*relaxes, rank], output=rank.output))


def _get(document: Any, key: str) -> Any:
    """``document.key`` of a task document, decoded (pydantic) or not (dict); ``None`` when absent."""
    if isinstance(document, dict):
        value = document.get(key)
        return Structure.from_dict(value) if key == "structure" and isinstance(value, dict) else value
    return getattr(document, key, None)


def _row(formula: str, candidate: CandidateStructure, document: Any) -> tuple[dict[str, Any], Structure | None]:
    """Ranking-table row of one candidate, and its relaxed structure (``None`` when the relax failed)."""
    row = {"rank": None, "formula": formula, "candidate": candidate.index, "energy_per_atom": None,
           "space_group_before": str(space_group(candidate.structure)), "space_group_after": None,
           "rms_displacement": None, "max_displacement": None, "volume_change": None, "status": "failed"}
    final, energy = _get(document, "structure"), _get(_get(document, "output"), "energy")
    if final is None or energy is None:
        return row, None
    converged = _get(document, "is_force_converged")
    row.update(energy_per_atom=energy / len(final), space_group_after=str(space_group(final)),
               status="not converged" if converged is False else "relaxed")
    try:
        row.update(displacement(candidate.structure, final))
    except ValueError:  # a relax maker that reorders atoms: no per-atom displacement
        pass
    return row, final


@job(output_schema=RankingDocument)
def rank_relaxed(formula: str, survivors: list[CandidateStructure], documents: list[Any], top_k: int,
                 dft_maker: Maker | None) -> Response:
    """Rank by energy per atom (failed relaxations last), then add ``dft_maker`` jobs for the best ``top_k``."""
    rows = [_row(formula, candidate, document) for candidate, document in zip(survivors, documents, strict=True)]
    rows.sort(key=lambda pair: (pair[1] is None, pair[0]["energy_per_atom"] if pair[1] is not None else 0.0))
    for rank, (row, final) in enumerate(rows, start=1):
        row["rank"] = rank if final is not None else None
    best = [(row, final) for row, final in rows if final is not None][:top_k] if dft_maker is not None else []
    output = RankingDocument(formula=formula, table=[row for row, _ in rows],
                             structures=[final for _, final in rows if final is not None],
                             dft_candidates=[row["candidate"] for row, _ in best])
    if not best:
        return Response(output=output)
    dft_jobs = []
    for row, final in best:
        dft = dft_maker.make(final)
        dft.name = f"{dft.name} {formula} #{row['candidate']}"
        dft_jobs.append(dft)
    return Response(output=output, addition=Flow(dft_jobs, name=f"dft {formula}"))
