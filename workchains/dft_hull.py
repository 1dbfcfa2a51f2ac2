"""The DFT hull: reference entries computed with the candidates' DFT settings, found again in the provenance.

With ``dft.hull`` the work chain places each DFT candidate on a hull of DFT energies
(:func:`equicsp_core.pipeline.dft_stability`): the reference entries of the candidate's chemical system and its
subsystems, the same phases as its ML hull (:func:`equicsp_core.pipeline.dft_stability_references`), each computed
by one ``PwRelaxWorkChain`` with the candidates' code, protocol, overrides, relax type and spin rule. A relaxation
starts from the entry's stored (DFT-relaxed) cell; a single point (``relax_type`` ``none``) is computed at the
entry's ML-relaxed geometry, the output of its ML reference relaxation, as the candidates' single points are at
theirs: the same level of geometry on both sides (LuIn's four references, BENCHMARKS.md: their single points at the
CHGNet geometry differ from those at the stored cells by -0.8 to +6.0 meV/atom, an offset the candidates' side would
not share). Each such run carries three extras,

- :data:`~aiida_equicsp.workchains.reference_energies.REFERENCE_SET_EXTRA`: the reference set's SHA-256,
- :data:`REFERENCE_ID_EXTRA`: the entry id,
- :data:`DFT_SETTINGS_EXTRA`: :func:`dft_settings_key` of the settings it ran with,

so "already computed" is a query (:func:`dft_reference_runs`) and a campaign computes each reference once per
settings. As for the ML references, a run that *finished* with an error is a known outcome and is not retried
with the same settings; a killed or excepted one is. The calcfunction :func:`assess_dft_stability` builds the
hulls from the runs' ``output_parameters``, so the provenance links every DFT E_hull to the runs it used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiida import orm
from aiida.engine import calcfunction

from equicsp_core.pipeline import DFTOutcome, dft_stability
from equicsp_core.reference import ReferenceSetError, load_reference
from equicsp_core.settings import DFTSettings, StabilitySettings

from aiida_equicsp.workchains.reference_energies import REFERENCE_SET_EXTRA, reference_id

#: Extra of a reference entry's DFT run: the entry id.
REFERENCE_ID_EXTRA = "equicsp_reference_id"
#: Extra of a reference entry's DFT run: :func:`dft_settings_key` of its settings.
DFT_SETTINGS_EXTRA = "equicsp_dft_settings"
#: Where a reference's relaxation starts (:func:`dft_settings_key`'s ``start``).
STORED_CELL = "the stored cell"


def dft_energy_per_atom(parameters: orm.Dict) -> float:
    """A finished pw.x run's energy per atom (eV/atom) from its ``output_parameters``."""
    return parameters["energy"] / parameters["number_of_atoms"]


def dft_settings_key(code: orm.AbstractCode, settings: DFTSettings, overrides: Mapping[str, Any],
                     pseudo_family: str, start: str) -> str:
    """What makes two DFT energies of a reference comparable, as one string: the code (its UUID), the
    pseudopotential family, the protocol, relax type and spin rule, the protocol overrides and the geometry the run
    starts from (``start``: :data:`STORED_CELL`, or the ML level of the reference relaxation whose structure a single
    point uses), as canonical JSON. The scheduler options and the symmetrisation tolerance are left out: they do not
    change a reference's energy (references are not symmetrised)."""
    return json.dumps({"code": code.uuid, "pseudo_family": pseudo_family, "protocol": settings.protocol,
                       "relax_type": settings.relax_type, "spin": settings.spin, "overrides": dict(overrides),
                       "start": start}, sort_keys=True)


def dft_reference_runs(reference_sha256: str, settings_key: str, ids: Iterable[str]) -> dict[str, orm.WorkChainNode]:
    """The run of each of ``ids`` already computed with these settings: the newest that finished ok, else the newest
    that finished with an error; ids with neither are absent."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    query = orm.QueryBuilder()
    query.append(orm.WorkChainNode, project="*", filters={
        f"extras.{REFERENCE_SET_EXTRA}": reference_sha256, f"extras.{DFT_SETTINGS_EXTRA}": settings_key,
        f"extras.{REFERENCE_ID_EXTRA}": {"in": ids}, "attributes.process_state": "finished"})
    query.order_by({orm.WorkChainNode: {"ctime": "desc"}})
    runs: dict[str, orm.WorkChainNode] = {}
    for (node,) in query.all():
        entry_id = node.base.extras.get(REFERENCE_ID_EXTRA)
        if entry_id not in runs or (node.is_finished_ok and not runs[entry_id].is_finished_ok):
            runs[entry_id] = node
    return runs


def dft_hull_inputs(candidates: Mapping[str, tuple[orm.StructureData, orm.Dict]],
                    references: Mapping[str, orm.WorkChainNode],
                    not_run: Mapping[str, str] | None = None) -> dict[str, orm.Data]:
    """The nodes :func:`assess_dft_stability` takes: each candidate's structure and ``output_parameters`` (by its
    label), each reference run's ``output_parameters`` or, when it failed, its exit message, and why each entry of
    ``not_run`` was not computed (by the entry's link label,
    :func:`~aiida_equicsp.workchains.reference_energies.reference_link_label`)."""
    nodes: dict[str, orm.Data] = {}
    for label, (structure, parameters) in candidates.items():
        nodes[f"candidate_{label}"] = structure
        nodes[f"dft_parameters_{label}"] = parameters
    for link_label, node in references.items():
        if node.is_finished_ok and "output_parameters" in node.outputs:
            nodes[f"reference_{link_label}"] = node.outputs.output_parameters
        else:
            nodes[f"failed_{link_label}"] = orm.Str(
                f"{node.process_label}<{node.pk}> exit status {node.exit_status}: {node.exit_message}")
    for link_label, reason in (not_run or {}).items():
        nodes[f"failed_{link_label}"] = orm.Str(reason)
    return nodes


@calcfunction
def assess_dft_stability(parameters: orm.Dict, **nodes: orm.Data) -> orm.Dict:
    """:func:`equicsp_core.pipeline.dft_stability`: ``{"hulls": {label: {"dft_e_above_hull", "reason"}},
    "references": {id: {"energy_per_atom", "status", "error"}}}`` (eV/atom).

    ``parameters`` are the :class:`~equicsp_core.settings.StabilitySettings` (which references); ``nodes`` are
    :func:`dft_hull_inputs`' (``candidate_L`` and ``dft_parameters_L``, ``reference_R`` or
    ``failed_R``). The energy of a run is :func:`dft_energy_per_atom`.
    """
    references: dict[str, dict[str, Any]] = {}
    for key, node in nodes.items():
        if key.startswith("failed_"):
            references[reference_id(key[len("failed_"):])] = {
                "energy_per_atom": None, "status": "failed", "error": node.value}
        elif key.startswith("reference_"):
            references[reference_id(key[len("reference_"):])] = {
                "energy_per_atom": dft_energy_per_atom(node), "status": "finished", "error": None}
    candidates = {label: DFTOutcome(nodes[f"candidate_{label}"].get_pymatgen(), dft_energy_per_atom(node))
                  for label, node in ((key[len("dft_parameters_"):], node) for key, node in nodes.items()
                                      if key.startswith("dft_parameters_"))}
    try:
        reference = load_reference()
    except ReferenceSetError as error:
        return orm.Dict({"hulls": {label: {"dft_e_above_hull": None, "reason": f"no DFT E_hull: {error}"}
                                   for label in candidates}, "references": references})
    settings = StabilitySettings.from_mapping(parameters.get_dict())
    return orm.Dict({"hulls": dft_stability(candidates, references, settings, reference), "references": references})
