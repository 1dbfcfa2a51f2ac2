"""jobflow Makers for structure prediction: sample → screen → ML relax → rank → stability → (phonons) → symmetrise →
DFT; for exploring a chemical system (:class:`ChemicalSystemMaker`: one such flow per composition); and for ab
initio generation (:class:`GenerateMaker`; :class:`GenerateRelaxMaker`: generate, then the same stages).

The same pipeline as the AiiDA work chain ``equicsp.predict_relax``, from the same functions: sampling through
:func:`equicsp_core.predict.predict_with_settings` (generation through
:func:`equicsp_core.generate.generate_with_settings`), screening, ranking and the table through
:mod:`equicsp_core.pipeline`, relaxation through :func:`equicsp_core.relax.relax_structures`. The Makers'
fields are the knobs of :mod:`equicsp_core.settings`, derived from its models (:func:`knob_fields`), so every
knob of a route is a field here, with the same default and the same checks (at construction).

:class:`PredictRelaxMaker` builds the flow. How many candidates survive screening, and which win, is known only
at run time, so the relax and rank steps are dynamic jobs that replace themselves by the jobs that follow. A
relaxation or DFT job that fails shows up in the table as ``ml_failed`` / ``dft_failed`` instead of stopping
the flow (``OnMissing.NONE``); the manager still reports the flow as not fully successful.

``relax_maker`` is an :class:`EquiCSPRelaxMaker` (all survivors in one job, the engine's relaxation) or any
Maker whose ``make(structure)`` job outputs a task document with ``structure`` and ``output.energy`` (eV), as
atomate2's force-field Makers do (one job per survivor). ``dft_maker`` is any such Maker (e.g. atomate2's VASP
or force-field Makers); it relaxes the winners after symmetrisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field, make_dataclass, replace
from typing import TYPE_CHECKING, Any

from jobflow import Flow, Job, Maker, OnMissing, Response, job
from pymatgen.core import Structure

from equicsp_core.pipeline import (
    STATUSES,
    UNITS,
    DFTOutcome,
    candidate_label,
    label_prefixes,
    levels,
    rank,
    screen,
    stability,
    table_rows,
)
from equicsp_core.settings import (
    DFTSettings,
    ExploreSettings,
    GenerateSettings,
    RankSettings,
    RelaxSettings,
    SampleSettings,
    ScreenSettings,
    Settings,
    StabilitySettings,
    formula_list,
)
from equicsp_jobflow.documents import (
    CandidateDocument,
    GenerateDocument,
    RankingDocument,
    RelaxDocument,
    SampleDocument,
    ScreenDocument,
    StableCandidatesDocument,
)

if TYPE_CHECKING:
    from pathlib import Path

    from equicsp_core.diffusion import CrystalDiffusion
    from equicsp_core.predict import Candidate


def knob_fields(model: type[Settings], exclude: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """Dataclass fields ``(name, type, default)`` of a settings model's knobs: a Maker's fields derived from it."""
    return [(key, info.annotation, field(default=info.default)) for key, info in model.model_fields.items()
            if key not in exclude]


def _settings(maker: Any, model: type[Settings], **values: Any) -> Settings:
    """The ``model`` settings of a Maker's fields (and ``values``); raises ``ValueError`` naming a bad knob."""
    return model(**{key: getattr(maker, key) for key in model.keys() if key not in values}, **values)


def _documents(samples: Iterable[Candidate], prefixes: dict[str, str]) -> tuple[list[CandidateDocument],
                                                                               list[dict[str, Any]]]:
    """The valid ``samples`` as documents labelled ``<prefix of its formula>_<index>``, and the invalid ones as
    ``{formula, sample, formula_units, cell_formula}``."""
    candidates, invalid = [], []
    for sample in samples:
        if sample.structure is None:
            invalid.append({"formula": sample.formula, "sample": sample.sample_index,
                            "formula_units": sample.formula_units, "cell_formula": sample.cell_formula})
        else:
            label = candidate_label(prefixes[sample.formula], sample.sample_index)
            candidates.append(CandidateDocument.of(label, sample.formula, sample.sample_index, sample.structure))
    return candidates, invalid


def _as_dict(result: Any) -> dict[str, Any]:
    """A relaxation result without its structure (that travels as a document)."""
    return {key: value for key, value in result.as_dict().items() if key != "structure"}


def _load_on_worker(checkpoint: str, settings: SampleSettings | GenerateSettings) -> tuple[Path, CrystalDiffusion, dict | None]:
    """``(path, model, card)`` of ``checkpoint`` (a shipped name or a path) where a job runs, on the settings'
    device, with the settings' thread count when they fix one (else the worker's own setting stands)."""
    from equicsp_core.checkpoint import load_model, resolve_checkpoint
    from equicsp_core.hardware import resolve_device, set_threads

    path = resolve_checkpoint(checkpoint)
    if settings.threads is not None:
        set_threads(settings.threads)
    model, card = load_model(path, resolve_device(settings.device))
    return path, model, card


# --- sample -----------------------------------------------------------------------------------------------------


class _SampleJob(Maker):
    """The job of :class:`EquiCSPSampleMaker` (its fields: ``name``, ``checkpoint`` and the sampling knobs)."""

    def __post_init__(self) -> None:
        self.settings(["H"])  # refuse bad settings now, not on a worker later ("H": any valid formula)

    def settings(self, formulas: list[str]) -> SampleSettings:
        """The :class:`SampleSettings` of sampling ``formulas`` (raises ``ValueError`` on bad input)."""
        return _settings(self, SampleSettings, formulas=formulas)

    @job(output_schema=SampleDocument, data=Structure)
    def make(self, formulas: list[str]) -> SampleDocument:
        """Sample the candidates of ``formulas`` (a reduced formula at every cell size Z the model supports,
        ``Sr2Ti2O6`` as that cell only: :func:`equicsp_core.domain.sampling_cells`)."""
        from equicsp_core.files import file_sha256
        from equicsp_core.predict import predict_with_settings

        settings = self.settings(formulas)
        path, model, card = _load_on_worker(self.checkpoint, settings)
        samples = [sample for batch in predict_with_settings(model, card, settings) for sample in batch]
        candidates, invalid = _documents(samples, label_prefixes(settings.formulas))
        return SampleDocument(formulas=list(settings.formulas), candidates=candidates, invalid=invalid,
                              num_requested=len(settings.formulas) * settings.num_samples,
                              checkpoint=str(self.checkpoint), checkpoint_sha256=file_sha256(path),
                              settings=settings.to_dict())


#: Sample candidate structures of formulas with an EquiCSP checkpoint. ``checkpoint`` is a shipped checkpoint's
#: name or a file path, resolved where the job runs; the other fields are :class:`SampleSettings`' knobs.
EquiCSPSampleMaker = make_dataclass(
    "EquiCSPSampleMaker",
    [("name", str, field(default="equicsp sample")), ("checkpoint", str, field(default="mp_20")),
     *knob_fields(SampleSettings, exclude=("formulas",))],
    bases=(_SampleJob,), namespace={"__module__": __name__, "__doc__": _SampleJob.__doc__})


# --- generate ---------------------------------------------------------------------------------------------------


class _GenerateJob(Maker):
    """The job of :class:`GenerateMaker` (its fields: ``name``, ``checkpoint`` and the generation knobs)."""

    def __post_init__(self) -> None:
        self.settings(1)  # refuse bad settings now (1: any valid number of crystals)

    def settings(self, num_samples: int) -> GenerateSettings:
        """The :class:`GenerateSettings` of generating ``num_samples`` crystals (raises ``ValueError`` on bad input)."""
        return _settings(self, GenerateSettings, num_samples=num_samples)

    def make(self, num_samples: int) -> Job:
        """The job generating ``num_samples`` crystals. The request is checked here, against the model, before any
        job exists: the checkpoint is read where the flow is built (as well as where the job runs) and given to
        :func:`equicsp_core.generate.generate_with_settings`, which checks everything when it is called (a CSP
        checkpoint, ``num_atoms`` beyond the model, ``steps`` beyond its T) and samples nothing until its batches
        are read. Raises ``ValueError`` (a :class:`~equicsp_core.checkpoint.CheckpointError` is one)."""
        from equicsp_core.checkpoint import load_model
        from equicsp_core.generate import generate_with_settings

        settings = self.settings(num_samples)
        generate_with_settings(*load_model(self.checkpoint), settings)  # the checks only: no batch is read
        return self.generate(num_samples)

    @job(output_schema=GenerateDocument, data=Structure)
    def generate(self, num_samples: int) -> GenerateDocument:
        """Generate ``num_samples`` crystals (:func:`equicsp_core.generate.generate_with_settings`), each labelled by
        the reduced formula it came out with and its index among all (``SrTiO3_004``)."""
        from equicsp_core.files import file_sha256
        from equicsp_core.generate import generate_with_settings

        settings = self.settings(num_samples)
        path, model, card = _load_on_worker(self.checkpoint, settings)
        samples = [sample for batch in generate_with_settings(model, card, settings) for sample in batch]
        candidates, invalid = _documents(samples, label_prefixes(list(dict.fromkeys(s.formula for s in samples))))
        return GenerateDocument(candidates=candidates, invalid=invalid, num_requested=settings.num_samples,
                                checkpoint=str(self.checkpoint), checkpoint_sha256=file_sha256(path),
                                card=card or {}, step_lr=settings.step_lr_for((card or {}).get("dataset")),
                                settings=settings.to_dict())


#: Generate crystals ab initio (atom types too) with an EquiCSP generation checkpoint (``equicsp train --task
#: generation``). ``checkpoint`` (required: no shipped model generates) is a checkpoint's name or a file path; the
#: other fields are
#: :class:`GenerateSettings`' knobs but ``num_samples``, which ``make`` takes.
GenerateMaker = make_dataclass(
    "GenerateMaker",
    [("name", str, field(default="equicsp generate")), ("checkpoint", str, field(kw_only=True)),
     *knob_fields(GenerateSettings, exclude=("num_samples",))],
    bases=(_GenerateJob,), namespace={"__module__": __name__, "__doc__": _GenerateJob.__doc__})


# --- screen -----------------------------------------------------------------------------------------------------


class _ScreenJob(Maker):
    """The job of :class:`ScreenCandidatesMaker` (its fields: ``name`` and :class:`ScreenSettings`' knobs)."""

    def __post_init__(self) -> None:
        _settings(self, ScreenSettings)

    @job(output_schema=ScreenDocument, data=Structure)
    def make(self, candidates: list[CandidateDocument]) -> ScreenDocument:
        """:func:`equicsp_core.pipeline.screen` of the sampled candidates."""
        decisions = screen({c.label: c.structure for c in candidates}, _settings(self, ScreenSettings))
        return ScreenDocument(survivors=[c for c in candidates if decisions[c.label]["kept"]], decisions=decisions)


#: Drop implausible candidates before relaxation (:func:`equicsp_core.pipeline.screen`).
ScreenCandidatesMaker = make_dataclass(
    "ScreenCandidatesMaker", [("name", str, field(default="equicsp screen")), *knob_fields(ScreenSettings)],
    bases=(_ScreenJob,), namespace={"__module__": __name__, "__doc__": _ScreenJob.__doc__})


# --- relax ------------------------------------------------------------------------------------------------------


class _RelaxJob(Maker):
    """The job of :class:`EquiCSPRelaxMaker` (its fields: ``name`` and :class:`RelaxSettings`' knobs)."""

    def __post_init__(self) -> None:
        _settings(self, RelaxSettings)

    @job(output_schema=RelaxDocument, data=Structure)
    def make(self, candidates: list[CandidateDocument]) -> RelaxDocument:
        """Relax every candidate with the potential, in one job (its weights are loaded once)."""
        from equicsp_core.relax import relax_structures

        by_label = {c.label: c for c in candidates}
        results, relaxed = {}, []
        settings = _settings(self, RelaxSettings)
        for label, result in relax_structures({c.label: c.structure for c in candidates}, settings):
            results[label] = _as_dict(result)
            if result.structure is not None:
                candidate = by_label[label]
                relaxed.append(CandidateDocument.of(label, candidate.formula, candidate.sample, result.structure))
        return RelaxDocument(results=results, relaxed=relaxed)


#: Relax candidates with a machine-learned potential (:func:`equicsp_core.relax.relax_structures`).
EquiCSPRelaxMaker = make_dataclass(
    "EquiCSPRelaxMaker", [("name", str, field(default="equicsp relax")), *knob_fields(RelaxSettings)],
    bases=(_RelaxJob,), namespace={"__module__": __name__, "__doc__": _RelaxJob.__doc__})


# --- the flow ---------------------------------------------------------------------------------------------------


def _after_sampling_fields() -> list[tuple[str, Any, Any]]:
    """The fields of the flow Makers after sampling (fresh ones per Maker): the screen, relax and DFT Makers, the
    ranking and stability knobs and ``symprec``."""
    return [("screen_maker", Maker, field(default_factory=ScreenCandidatesMaker)),
            ("relax_maker", Maker, field(default_factory=EquiCSPRelaxMaker)),
            *knob_fields(RankSettings),
            *knob_fields(StabilitySettings),
            ("symprec", float, field(default=DFTSettings.default("symprec"))),
            ("dft_maker", Maker | None, field(default=None))]


class _PredictRelaxFlow(Maker):
    """The flow of :class:`PredictRelaxMaker`; its fields: the Makers of each stage, :class:`RankSettings`' knobs
    (``top_k``, ``phonons``), :class:`StabilitySettings`' knobs (``stability``, ``reference_cutoff``,
    ``references_per_composition``) and ``symprec`` (:class:`DFTSettings`, Å; 0: the winners go to DFT as
    relaxed)."""

    def __post_init__(self) -> None:
        _settings(self, RankSettings)
        _settings(self, StabilitySettings)
        DFTSettings(symprec=self.symprec)

    def make(self, formulas: list[str]) -> Flow:
        """The flow for ``formulas`` (a list: a bare string is refused); bad formulas are refused here."""
        sample = self.sample_maker.make(list(self.sample_maker.settings(list(formula_list(formulas))).formulas))
        return self.make_from_samples(sample.output, [sample])

    def make_from_samples(self, samples: Any, jobs: list | None = None) -> Flow:
        """The flow after sampling, from a :class:`SampleDocument` or a :class:`GenerateDocument` (or a reference to
        one)."""
        screen_job = self.screen_maker.make(samples.candidates)
        relax = relax_survivors(screen_job.output.survivors, self.relax_maker)
        table = rank_and_finish(samples, screen_job.output, relax.output, self)
        return Flow([*(jobs or []), screen_job, relax, table], output=table.output, name=self.name)


#: Flow from formulas to a ranking table: sample → screen → ML relax → rank → stability and novelty (``stability``)
#: → phonons (``phonons``) → symmetrise
#: → DFT on the best ``top_k`` of each composition (only with ``dft_maker``) → table.
PredictRelaxMaker = make_dataclass(
    "PredictRelaxMaker",
    [("name", str, field(default="equicsp predict-relax")),
     ("sample_maker", Maker, field(default_factory=EquiCSPSampleMaker)), *_after_sampling_fields()],
    bases=(_PredictRelaxFlow,), namespace={"__module__": __name__, "__doc__": _PredictRelaxFlow.__doc__})


class _GenerateRelaxFlow(_PredictRelaxFlow):
    """The flow of :class:`GenerateRelaxMaker`; its fields: ``generate_maker`` (a :class:`GenerateMaker`, required)
    and those of :class:`PredictRelaxMaker` after sampling, with the same defaults."""

    def make(self, num_samples: int) -> Flow:
        """The flow for ``num_samples`` generated crystals; a bad request is refused here
        (:meth:`GenerateMaker.make`)."""
        generate = self.generate_maker.make(num_samples)
        return self.make_from_samples(generate.output, [generate])


#: Flow from ab initio generation to a ranking table: generate → screen → ML relax → rank (within each reduced
#: composition generated) → stability and novelty → phonons → symmetrise → DFT on the best ``top_k`` of each
#: composition (only with ``dft_maker``) → table: :class:`PredictRelaxMaker`'s stages after sampling.
GenerateRelaxMaker = make_dataclass(
    "GenerateRelaxMaker",
    [("name", str, field(default="equicsp generate-relax")), ("generate_maker", Maker, field(kw_only=True)),
     *_after_sampling_fields()],
    bases=(_GenerateRelaxFlow,), namespace={"__module__": __name__, "__doc__": _GenerateRelaxFlow.__doc__})


def _task_result(document: Any) -> tuple[Structure | None, float | None, bool | None]:
    """``(structure, energy per atom, converged)`` of an atomate2-like task document (dict or object)."""
    def get(value: Any, key: str) -> Any:
        return value.get(key) if isinstance(value, dict) else getattr(value, key, None)

    structure, energy = get(document, "structure"), get(get(document, "output"), "energy")
    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    if structure is None or energy is None:
        return None, None, None
    return structure, energy / len(structure), get(document, "is_force_converged")


@job
def relax_survivors(survivors: list[CandidateDocument], relax_maker: Maker) -> Response:
    """Replace this job by the relaxation of the survivors: one :class:`EquiCSPRelaxMaker` job, or one job of
    another relax Maker per survivor and a job that collects their task documents."""
    if isinstance(relax_maker, _RelaxJob):
        relax = relax_maker.make(survivors)
        return Response(replace=Flow([relax], output=relax.output))
    relaxes = [relax_maker.make(candidate.structure) for candidate in survivors]
    for relax, candidate in zip(relaxes, survivors, strict=True):
        relax.name = f"{relax.name} {candidate.label}"
    collect = collect_relaxations(survivors, [relax.output for relax in relaxes])
    collect.config.on_missing_references = OnMissing.NONE  # a failed relax arrives as None, not as an error
    return Response(replace=Flow([*relaxes, collect], output=collect.output))


@job(output_schema=RelaxDocument, data=Structure)
def collect_relaxations(survivors: list[CandidateDocument], documents: list[Any]) -> RelaxDocument:
    """The task documents of per-structure relax jobs as one :class:`RelaxDocument` (``None``: a failed job)."""
    results, relaxed = {}, []
    for candidate, document in zip(survivors, documents, strict=True):
        structure, energy, converged = _task_result(document)
        if structure is None:
            results[candidate.label] = {"status": "failed", "energy_per_atom": None, "error": "the relax job failed"}
            continue
        results[candidate.label] = {"status": "not_converged" if converged is False else "converged",
                                    "energy_per_atom": energy, "error": None}
        relaxed.append(CandidateDocument.of(candidate.label, candidate.formula, candidate.sample, structure))
    return RelaxDocument(results=results, relaxed=relaxed)


@job
def rank_and_finish(samples: SampleDocument | GenerateDocument, screening: ScreenDocument, relaxation: RelaxDocument,
                    maker: Any) -> Response:
    """Rank (:func:`equicsp_core.pipeline.rank`); replace this job by the phonon check and DFT of the winners and
    the table job, or output the table now when there is nothing more to run."""
    relaxed = {c.label: c for c in relaxation.relaxed}
    ranked = rank(relaxation.results, {label: c.structure for label, c in relaxed.items()}, maker.top_k)
    winners = [relaxed[label] for label in ranked.winners]
    jobs, phonons, dft, dft_inputs = [], None, {}, {}
    assess = assess_stability(relaxation, ranked.as_dict(), _relax_settings(maker.relax_maker),
                              _settings(maker, StabilitySettings).to_dict())
    jobs.append(assess)
    if maker.phonons and winners:
        check = _phonon_maker(maker.relax_maker).make(winners)
        check.name = "equicsp phonons"
        jobs.append(check)
        phonons = check.output.results
    if maker.dft_maker is not None:
        for winner in winners:
            structure = winner.structure
            if maker.symprec > 0:
                symmetrize = symmetrize_structure(structure, maker.symprec)
                jobs.append(symmetrize)
                structure = symmetrize.output
            relax = maker.dft_maker.make(structure)
            relax.name = f"{relax.name} {winner.label}"
            jobs.append(relax)
            dft[winner.label] = relax.output
            dft_inputs[winner.label] = structure
    table = tabulate(samples, screening, relaxation, ranked.as_dict(), phonons, dft, assess.output,
                     _relax_settings(maker.relax_maker), dft_inputs if maker.symprec > 0 else None, maker.symprec,
                     dft_maker_level(maker.dft_maker) if maker.dft_maker is not None else None)
    table.config.on_missing_references = OnMissing.NONE  # a failed DFT job arrives as None: a dft_failed row
    return Response(replace=Flow([*jobs, table], output=table.output))


def _relax_settings(relax_maker: Maker) -> dict[str, Any] | None:
    """The :class:`RelaxSettings` of an :class:`EquiCSPRelaxMaker` as a dict; ``None`` for another relax Maker."""
    return _settings(relax_maker, RelaxSettings).to_dict() if isinstance(relax_maker, _RelaxJob) else None


@job
def assess_stability(relaxation: RelaxDocument, ranking: dict[str, Any], relax_settings: dict[str, Any] | None,
                     settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`equicsp_core.pipeline.stability` of the relaxed candidates: ``{label: {"ml_e_above_hull", "novelty",
    "reason"}}``. The reference entries are relaxed with the candidates' potential, which only an
    :class:`EquiCSPRelaxMaker` names (``relax_settings``); after another relax Maker each row says so."""
    stability_settings = StabilitySettings(**settings)
    if relax_settings is None:
        if not stability_settings.stability:
            return {}
        reason = "no ML E_hull or novelty: the reference set is relaxed with an EquiCSPRelaxMaker's potential only"
        return {c.label: {"ml_e_above_hull": None, "novelty": None, "reason": reason} for c in relaxation.relaxed}
    return stability(relaxation.results, {c.label: c.structure for c in relaxation.relaxed}, ranking["ranking"],
                     RelaxSettings(**relax_settings), stability_settings)


def _phonon_maker(relax_maker: Maker) -> Maker:
    """The relax Maker with no step and the phonon check, as the AiiDA route's phonon calculation."""
    base = relax_maker if isinstance(relax_maker, _RelaxJob) else EquiCSPRelaxMaker()
    return replace(base, name="equicsp phonons", steps=0, phonons=True)


@job
def symmetrize_structure(structure: Structure, symprec: float) -> Structure:
    """:func:`equicsp_core.screening.symmetrized`: exact symmetry, so that the DFT code uses it."""
    from equicsp_core.screening import symmetrized

    return symmetrized(structure, symprec)


def dft_maker_level(dft_maker: Maker) -> str:
    """The ``dft_level`` of a DFT Maker's energies: its name and class (``relax (atomate2 RelaxMaker)``).

    Unlike the AiiDA route, the flow does not choose the DFT settings: functional, k-points, cut-offs and spin
    are the Maker's (atomate2's VASP input sets, for instance, are spin-polarised with default moments).
    """
    kind = type(dft_maker)
    return f"{dft_maker.name} ({kind.__module__.split('.')[0]} {kind.__name__})"


@job(output_schema=RankingDocument, data=Structure)
def tabulate(samples: SampleDocument | GenerateDocument, screening: ScreenDocument, relaxation: RelaxDocument, ranking: dict[str, Any],
             phonons: dict[str, Any] | None, dft: dict[str, Any], stability: dict[str, Any] | None = None,
             relax_settings: dict[str, Any] | None = None, dft_inputs: dict[str, Structure] | None = None,
             symprec: float = 0.0, dft_level: str | None = None) -> RankingDocument:
    """The ranking table (:func:`equicsp_core.pipeline.table_rows`) and the relaxed structures.

    ``stability`` is :func:`assess_stability`'s output, ``relax_settings`` the ML relaxation's (they name the ML
    level); ``dft_inputs`` are the symmetrised structures sent to DFT (at ``symprec`` Å; ``None``: not
    symmetrised), ``dft_level`` what the DFT energies are (:func:`dft_maker_level`).
    """
    from equicsp_core.dft import symmetrisation_note

    sampled = {c.label: c for c in samples.candidates}
    dft_outcomes, dft_relaxed = {}, []
    for label, document in dft.items():
        notes = (symmetrisation_note(dft_inputs[label], symprec),) if dft_inputs and label in dft_inputs else ()
        structure, energy, _ = _task_result(document)
        if structure is None:
            dft_outcomes[label] = DFTOutcome(failure="the DFT job failed", notes=notes)
            continue
        dft_outcomes[label] = DFTOutcome(structure, energy, level=dft_level, notes=notes)
        dft_relaxed.append(CandidateDocument.of(label, sampled[label].formula, sampled[label].sample, structure))
    rows = table_rows(
        sampled={label: c.structure for label, c in sampled.items()}, invalid=samples.invalid,
        screening=screening.decisions, ranking=ranking["ranking"], ml_results=relaxation.results,
        ml_relaxed={c.label: c.structure for c in relaxation.relaxed}, phonons=phonons, dft=dft_outcomes,
        stability=stability)
    return RankingDocument(rows=rows, statuses=STATUSES, units=UNITS, winners=ranking["dft"],
                           levels=levels(RelaxSettings(**relax_settings) if relax_settings is not None else None),
                           ml_relaxed=relaxation.relaxed, dft_relaxed=dft_relaxed)



# --- a chemical system ------------------------------------------------------------------------------------------


class _ChemicalSystemFlow(Maker):
    """The flow of :class:`ChemicalSystemMaker`; its fields: ``predict_relax_maker`` (a :class:`PredictRelaxMaker`,
    whose sample Maker's checkpoint sets the model's largest cell) and :class:`ExploreSettings`' knobs
    (``max_atoms``, ``ehull_max``)."""

    def __post_init__(self) -> None:
        _settings(self, ExploreSettings, chemical_system="H-O")  # refuse bad knobs now ("H-O": any valid system)

    def make(self, chemical_system: str) -> Flow:
        """One predict-relax flow per composition of ``chemical_system`` that the model can sample
        (:func:`equicsp_core.chemical_system.compositions_to_explore`), then the stable ones; a bad system, one
        with no composition within the limits, or a generation checkpoint, is refused here (``ValueError``),
        before any job exists."""
        from equicsp_core.chemical_system import compositions_to_explore
        from equicsp_core.checkpoint import load_model, require_task

        settings = _settings(self, ExploreSettings, chemical_system=chemical_system)
        model, card = load_model(self.predict_relax_maker.sample_maker.checkpoint)
        require_task(model, "csp")
        compositions = compositions_to_explore(settings, model.mode, (card or {}).get("dataset"))
        flows = [self.predict_relax_maker.make([formula]) for formula in compositions]
        for flow, formula in zip(flows, compositions, strict=True):
            flow.name = f"{flow.name} {formula}"
        report = collect_stable([flow.output for flow in flows], compositions, settings.chemical_system,
                                settings.ehull_max, _relax_settings(self.predict_relax_maker.relax_maker),
                                _settings(self.predict_relax_maker, StabilitySettings).to_dict())
        report.config.on_missing_references = OnMissing.NONE  # a failed composition arrives as None: "missing"
        return Flow([*flows, report], output=report.output, name=f"{self.name} {settings.chemical_system}")


#: Flow exploring a chemical system: a :class:`PredictRelaxMaker` flow per charge-balanced composition (every
#: element present, at most ``max_atoms`` atoms per formula unit), then the candidates with ML E_hull <= ``ehull_max``.
ChemicalSystemMaker = make_dataclass(
    "ChemicalSystemMaker",
    [("name", str, field(default="equicsp chemical system")),
     ("predict_relax_maker", Maker, field(default_factory=PredictRelaxMaker)),
     *knob_fields(ExploreSettings, exclude=("chemical_system",))],
    bases=(_ChemicalSystemFlow,), namespace={"__module__": __name__, "__doc__": _ChemicalSystemFlow.__doc__})


@job(output_schema=StableCandidatesDocument, data=Structure)
def collect_stable(tables: list[RankingDocument | None], compositions: list[str], chemical_system: str,
                   ehull_max: float, relax_settings: dict[str, Any] | None,
                   stability_settings: dict[str, Any]) -> StableCandidatesDocument:
    """The stable and near-stable candidates of the compositions' ranking tables on the system's hull, where they
    compete with each other (:func:`equicsp_core.chemical_system.near_stable`), with their ML-relaxed structures;
    ``None``: a failed flow. The reference energies are those the tables' hulls used, at the ML level of
    ``relax_settings`` (the cache folder's, or relaxed again on a machine without them); after a relax Maker other
    than an :class:`EquiCSPRelaxMaker` the rows have no ML E_hull and none is reported."""
    from equicsp_core.chemical_system import near_stable
    from equicsp_core.pipeline import relaxed_energies
    from equicsp_core.reference import load_reference

    rows = [row for table in tables if table is not None for row in table.rows]
    relaxed = {document.label: document for table in tables if table is not None for document in table.ml_relaxed}
    chosen = []
    if relax_settings is not None and any(row.get("ml_e_above_hull") is not None for row in rows):
        reference = load_reference()
        chosen = near_stable(rows, ehull_max, chemical_system, reference,
                             relaxed_energies(RelaxSettings(**relax_settings), reference),
                             StabilitySettings(**stability_settings))
    return StableCandidatesDocument(
        chemical_system=chemical_system, compositions=compositions, ehull_max=ehull_max, candidates=chosen,
        structures=[relaxed[row["label"]] for row in chosen],
        missing=[formula for formula, table in zip(compositions, tables, strict=True) if table is None])
