"""QueryBuilder recipes for EquiCSP results: what was sampled, which structure won, which model made it.

The provenance graph already holds every answer; these functions are the queries one would otherwise
rewrite each time:

- :func:`predicted_structures`: every structure sampled for a formula, over all sampling calculations;
- :func:`generated_structures`: every structure a generation model generated ab initio;
- :func:`lowest_energy_per_formula`: the winner of each composition of a campaign (DFT energy if it has one,
  else ML), with its structure node; :func:`winners_dataframe` and :func:`export_winners` tabulate and write them;
- :func:`checkpoint_of`: the model (checkpoint) a structure comes from, through any relaxation;
- :func:`stable_candidates`: the stable and near-stable candidates (ML energy above the hull at most a threshold)
  of a chemical system, of a campaign, or of both, with their novelty and structure nodes.

Formulas are compared by reduced formula (``Sr2Ti2O6`` is ``SrTiO3``), as the work chain ranks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiida import orm

from aiida_equicsp.campaign import COMPOSITION_EXTRA, PROCESS_TYPE, CampaignGroup, current_work_chains
from aiida_equicsp.data.model import EquiCSPModelData

#: Process type of the sampling calculation.
SAMPLE_PROCESS_TYPE = "aiida.calculations:equicsp.sample"
#: ``fmt`` of :func:`export_winners` -> file extension.
EXPORT_FORMATS = {"cif": "cif", "extxyz": "xyz"}


def reduced_formula(formula: str) -> str:
    """The reduced formula (``Sr2Ti2O6`` -> ``SrTiO3``) of a formula ``parse_formula`` accepts.

    Raises:
        ValueError: naming the formula, when it is malformed.
    """
    from pymatgen.core import Composition

    from equicsp_core.settings import parse_formula

    parse_formula(formula, max_atoms=None)
    return Composition(formula).reduced_formula


def _structure_reduced_formula(structure: orm.StructureData) -> str:
    from pymatgen.core import Composition

    return Composition(structure.get_composition()).reduced_formula


def predicted_structures(formula: str) -> list[orm.StructureData]:
    """Every structure sampled for ``formula`` (by reduced formula): the ``structures`` outputs of ``equicsp.sample``.

    The calculations' own outputs, not the work chains' (which return the same nodes again), oldest first.
    Candidates of other formulas sampled in the same calculation are left out.
    """
    target = reduced_formula(formula)
    calculations = orm.QueryBuilder()
    calculations.append(orm.CalcJobNode, filters={"process_type": SAMPLE_PROCESS_TYPE}, tag="calc", project="id")
    calculations.append(orm.List, with_outgoing="calc", edge_filters={"label": "compositions"},
                        project="attributes.list")
    pks = {pk for pk, formulas in calculations.all()
           if any(reduced_formula(entry) == target for entry in formulas or [])}
    if not pks:
        return []
    query = orm.QueryBuilder()
    query.append(orm.CalcJobNode, filters={"id": {"in": sorted(pks)}}, tag="calc")
    query.append(orm.StructureData, with_incoming="calc", edge_filters={"label": {"like": "structures__%"}},
                 project="*")
    query.order_by({orm.StructureData: {"id": "asc"}})
    return [node for node in query.all(flat=True) if _structure_reduced_formula(node) == target]


def generated_structures(model: EquiCSPModelData | None = None) -> list[orm.StructureData]:
    """Every structure generated ab initio by ``model`` (``None``: by any generation model), oldest first: the
    ``structures`` outputs of the ``equicsp.sample`` calculations whose ``model`` input it is.

    The calculations' own outputs, not the work chains' (which return the same nodes again); found through the
    provenance links model → calculation → structure.

    Raises:
        ValueError: for a model that is not a stored generation model (a CSP model's structures:
            :func:`predicted_structures`).
    """
    filters: dict[str, Any] = {"attributes.task": "generation"}
    if model is not None:
        if not isinstance(model, EquiCSPModelData) or not model.is_stored:
            raise ValueError(f"expected a stored EquiCSPModelData, got {model!r}")
        if model.task != "generation":
            raise ValueError(f"EquiCSPModelData<{model.pk}> is a structure prediction (CSP) model, not a generation "
                             "model; its structures: predicted_structures(formula)")
        filters = {"id": model.pk}
    query = orm.QueryBuilder()
    query.append(EquiCSPModelData, filters=filters, tag="model")
    query.append(orm.CalcJobNode, filters={"process_type": SAMPLE_PROCESS_TYPE}, with_incoming="model",
                 edge_filters={"label": "model"}, tag="calc")
    query.append(orm.StructureData, with_incoming="calc", edge_filters={"label": {"like": "structures__%"}},
                 project="*")
    query.order_by({orm.StructureData: {"id": "asc"}})
    return query.all(flat=True)


@dataclass(frozen=True)
class Winner:
    """The best candidate of one composition of a campaign.

    ``level`` is ``"dft"`` when it was DFT-relaxed, else ``"ml"``; ``energy_per_atom`` (eV/atom) is of that
    level; ``row`` is its row of the work chain's ``ranking`` table.
    """

    composition: str
    level: str
    energy_per_atom: float
    structure: orm.StructureData
    workchain: orm.WorkChainNode
    row: dict[str, Any]


def best_row(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """``(level, row)`` of the lowest DFT energy per atom if any row has one, else of the lowest ML one; or None.

    A DFT energy beats any ML energy: the two levels' energies are not comparable, and DFT is the better one.
    """
    dft = [row for row in rows if row.get("dft_energy_per_atom") is not None]
    if dft:
        return "dft", min(dft, key=lambda row: row["dft_energy_per_atom"])
    ml = [row for row in rows if row.get("ml_rank") is not None and row.get("ml_energy_per_atom") is not None]
    if ml:
        return "ml", min(ml, key=lambda row: row["ml_energy_per_atom"])
    return None


def lowest_energy_per_formula(group: CampaignGroup) -> dict[str, Winner]:
    """``{composition: Winner}`` over the campaign's work chains that output a ``ranking`` table.

    A composition with several work chains (a failed one and its retry) takes its finished-ok one, else the
    newest; compositions without a relaxed candidate are absent (``campaign_status`` says why).
    """
    query = orm.QueryBuilder()
    query.append(CampaignGroup, filters={"id": group.pk}, tag="group")
    query.append(orm.WorkChainNode, with_group="group", filters={"process_type": PROCESS_TYPE}, tag="workchain",
                 project=["*", f"extras.{COMPOSITION_EXTRA}"])
    query.append(orm.Dict, with_incoming="workchain", edge_filters={"label": "ranking"}, project="attributes.rows")
    query.order_by({orm.WorkChainNode: {"ctime": "asc"}})
    chosen: dict[str, tuple[orm.WorkChainNode, list]] = {}
    for node, composition, rows in query.all():
        if composition is None:
            continue
        previous = chosen.get(composition)
        if previous is None or node.is_finished_ok or not previous[0].is_finished_ok:
            chosen[composition] = (node, rows or [])
    winners = {}
    for composition in group.compositions + [formula for formula in chosen if formula not in group.compositions]:
        if composition not in chosen:
            continue
        node, rows = chosen[composition]
        best = best_row(rows)
        if best is None:
            continue
        level, row = best
        namespace = "dft_relaxed" if level == "dft" else "ml_relaxed"
        winners[composition] = Winner(composition, level, row[f"{level}_energy_per_atom"],
                                      node.outputs[namespace][row["label"]], node, row)
    return winners


def checkpoint_of(structure: orm.StructureData) -> EquiCSPModelData:
    """The model whose sampling produced ``structure``, through any ML or DFT relaxations after it.

    Follows the data provenance (create and input links) back from the structure to an ``equicsp.sample``
    calculation and takes that calculation's ``model`` input.

    Raises:
        ValueError: when no EquiCSP sampling is among the structure's ancestors, or several models are.
    """
    if not isinstance(structure, orm.StructureData) or not structure.is_stored:
        raise ValueError(f"expected a stored StructureData, got {structure!r}")
    query = orm.QueryBuilder()
    query.append(orm.StructureData, filters={"id": structure.pk}, tag="structure")
    query.append(orm.CalcJobNode, filters={"process_type": SAMPLE_PROCESS_TYPE}, with_descendants="structure",
                 tag="sampling")
    query.append(EquiCSPModelData, with_outgoing="sampling", edge_filters={"label": "model"}, project="*")
    query.distinct()
    models = query.all(flat=True)
    if not models:
        raise ValueError(f"StructureData<{structure.pk}> does not come from an EquiCSP sampling calculation")
    if len({model.pk for model in models}) > 1:
        raise ValueError(f"StructureData<{structure.pk}> comes from several models: "
                         f"{', '.join(str(model.pk) for model in models)}")
    return models[0]


def winners_dataframe(group: CampaignGroup):
    """The winners of a campaign as a pandas DataFrame, one row per composition (:func:`lowest_energy_per_formula`).

    ``energy_per_atom`` is at the row's ``level`` (``dft`` or ``ml``); ``dft_level`` says what a DFT energy is
    (functional, protocol, spin, quick look): compare energies only at one level. ``ml_e_above_hull`` and
    ``dft_e_above_hull`` (eV/atom, with ``dft.hull``) are the table's, each at its own level.
    """
    import pandas as pd

    columns = ["composition", "reduced_formula", "formula_units", "cell_formula", "level", "energy_per_atom",
               "ml_energy_per_atom", "dft_energy_per_atom", "dft_level", "ml_e_above_hull", "dft_e_above_hull",
               "space_group", "label", "structure_pk",
               "structure_uuid", "workchain_pk"]
    records = []
    for composition, winner in lowest_energy_per_formula(group).items():
        row = winner.row
        records.append({
            "composition": composition, "reduced_formula": row.get("reduced_formula"),
            "formula_units": row.get("formula_units"), "cell_formula": row.get("formula"), "level": winner.level,
            "energy_per_atom": winner.energy_per_atom, "ml_energy_per_atom": row.get("ml_energy_per_atom"),
            "dft_energy_per_atom": row.get("dft_energy_per_atom"), "dft_level": row.get("dft_level"),
            "ml_e_above_hull": row.get("ml_e_above_hull"), "dft_e_above_hull": row.get("dft_e_above_hull"),
            "space_group": row.get(f"space_group_{winner.level}"), "label": row["label"],
            "structure_pk": winner.structure.pk, "structure_uuid": winner.structure.uuid,
            "workchain_pk": winner.workchain.pk,
        })
    return pd.DataFrame.from_records(records, columns=columns)


def export_winners(group: CampaignGroup, folder: str | Path, fmt: str = "cif") -> list[Path]:
    """Write each winner's structure to ``folder/<composition>.<cif|xyz>``; returns the paths written.

    ``extxyz`` files carry the composition, Z (``formula_units``), level, energy per atom and node UUIDs in their
    comment line.

    Raises:
        ValueError: for an unknown format.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for composition, winner in lowest_energy_per_formula(group).items():
        path = folder / f"{re.sub(r'[^A-Za-z0-9]+', '_', composition)}.{EXPORT_FORMATS[fmt]}"
        if fmt == "cif":
            winner.structure.get_pymatgen().to(filename=str(path), fmt="cif")
        else:
            from ase.io import write

            atoms = winner.structure.get_ase()
            atoms.info.update(composition=composition, formula_units=winner.row.get("formula_units"),
                              level=winner.level, energy_per_atom=winner.energy_per_atom,
                              structure_uuid=winner.structure.uuid, workchain_uuid=winner.workchain.uuid)
            write(path, atoms, format="extxyz")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class StableCandidate:
    """A stable or near-stable candidate: its row of the work chain's ``ranking`` table with
    ``ml_e_above_system_hull`` added (eV/atom at the ML level, on the hull where the candidates compete;
    ``ml_e_above_hull`` against the references alone, ``novelty``, ``formula_units``, space groups, energies), its
    ML-relaxed structure and the work chain."""

    row: dict[str, Any]
    structure: orm.StructureData
    workchain: orm.WorkChainNode


def stable_candidates(chemical_system: str | None = None, group: CampaignGroup | None = None,
                      ehull_max: float | None = None) -> list[StableCandidate]:
    """The merged candidates of ``equicsp.predict_relax`` work chains whose ML energy above the hull, where they
    compete with the references and with each other, is at most ``ehull_max`` eV/atom (``None``:
    :class:`~equicsp_core.settings.ExploreSettings`' default), lowest first.

    Args:
        chemical_system: only compositions of this system and its subsystems (``Li-Fe-P-O``: LiFePO4, Li3PO4,
            Fe2O3, ...); ``None``: any.
        group: only the campaign's current work chains (one per composition: the finished-ok one, else the
            newest); ``None``: every predict-relax work chain of the profile.
        ehull_max: the threshold, eV/atom.

    The work chains, their ``ranking`` tables and the inputs of their ``assess_stability`` calcfunctions (the ML
    level, the hull settings and the reference energies each hull used) are found by the QueryBuilder; the work
    chains of one level and hull settings share one hull per chemical system, built from the union of their
    reference energies (:func:`equicsp_core.chemical_system.near_stable`; nothing is relaxed). The rows are
    chosen in Python, since a table's rows are a list inside one node's attributes, which a query cannot filter
    portably.

    Raises:
        ValueError: for a malformed chemical system or a negative threshold, naming it.
    """
    from equicsp_core.chemical_system import near_stable, parse_chemical_system
    from equicsp_core.pipeline import ml_level
    from equicsp_core.reference import load_reference
    from equicsp_core.settings import ExploreSettings, RelaxSettings, StabilitySettings
    from equicsp_core.stability import known_energies

    if ehull_max is None:
        ehull_max = ExploreSettings.default("ehull_max")
    elif ehull_max < 0:
        raise ValueError(f"ehull_max must be at least 0 eV/atom, got {ehull_max}")
    if chemical_system is not None:
        parse_chemical_system(chemical_system)
    filters: dict[str, Any] = {"process_type": PROCESS_TYPE}
    if group is not None:
        filters["id"] = {"in": [node.pk for node in current_work_chains(group).values()] or [-1]}
    query = orm.QueryBuilder()
    query.append(orm.WorkChainNode, filters=filters, tag="workchain", project="*")
    query.append(orm.Dict, with_incoming="workchain", edge_filters={"label": "ranking"}, project="attributes.rows")
    query.append(orm.CalcFunctionNode, with_incoming="workchain", tag="assess",
                 filters={"attributes.process_label": "assess_stability"})
    for label in ("relax_parameters", "parameters", "reference_energies"):
        query.append(orm.Dict, with_outgoing="assess", edge_filters={"label": label}, project="attributes")
    hulls: dict[tuple, tuple[StabilitySettings, dict[str, Any], list[dict[str, Any]]]] = {}
    nodes: dict[int, orm.WorkChainNode] = {}
    for node, rows, relax, parameters, energies in query.all():
        settings = StabilitySettings.from_mapping(parameters)
        key = (ml_level(RelaxSettings.from_mapping(relax)), settings.reference_cutoff,
               settings.references_per_composition)
        _, records, tagged = hulls.setdefault(key, (settings, {}, []))
        records.update(energies)
        tagged.extend(dict(row, workchain=node.pk) for row in rows or [])
        nodes[node.pk] = node
    found = []
    if any(row.get("ml_e_above_hull") is not None for _, _, tagged in hulls.values() for row in tagged):
        reference = load_reference()
        for settings, records, tagged in hulls.values():
            for row in near_stable(tagged, ehull_max, chemical_system, reference, known_energies(records), settings):
                node = nodes[row.pop("workchain")]
                found.append(StableCandidate(row, node.outputs.ml_relaxed[row["label"]], node))
    return sorted(found, key=lambda candidate: (candidate.row["ml_e_above_system_hull"],
                                                candidate.row["reduced_formula"], candidate.workchain.pk,
                                                candidate.row["label"]))
