"""Exploring a chemical system with a campaign, without a daemon: the compositions submitted, the refusals, and
the stable candidates found by the query (``aiida_equicsp.queries.stable_candidates``) on stored stand-in nodes.

Submission is faked as in ``test_campaign_units.py``; the work chains of the query are stored nodes with the
outputs a finished ``equicsp.predict_relax`` has (``ranking``, ``ml_relaxed``), so no sampling or relaxation runs.
"""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ProcessState
from pymatgen.core import Composition, Lattice, Structure

from aiida_equicsp.campaign import (
    COMPOSITION_EXTRA,
    COMPOSITIONS_EXTRA,
    PROCESS_TYPE,
    CampaignGroup,
    CampaignSettings,
    chemical_system_compositions,
    load_campaign,
)
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.queries import stable_candidates
from equicsp_core.pipeline import ROW_COLUMNS
from tests.aiida.test_campaign_units import fake_submit, invoke, label  # noqa: F401  (fixtures, the CLI runner)


def test_compositions_follow_the_model_and_max_atoms(model):
    """The tiny model (perov_5: cells of at most 5 atoms) can sample only SrTiO3 of Sr-Ti-O; mp_20 (20 atoms)
    with --max-atoms 7 SrTiO3 and Sr2TiO4; refusals name the system."""
    tiny = CampaignSettings.from_nodes(model)
    assert chemical_system_compositions(tiny, "Sr-Ti-O") == ["SrTiO3"]
    assert chemical_system_compositions(tiny, "Sr-Ti-O", max_atoms=50) == ["SrTiO3"]  # the model's limit holds
    general = CampaignSettings.from_nodes(EquiCSPModelData.from_shipped("mp_20"))
    assert chemical_system_compositions(general, "Sr-Ti-O", max_atoms=7) == ["SrTiO3", "Sr2TiO4"]
    with pytest.raises(ValueError, match="no charge-balanced composition .* at most 5 atoms"):
        chemical_system_compositions(tiny, "Ca-Sr-Ti-O")
    with pytest.raises(ValueError, match="unknown element Xx"):
        chemical_system_compositions(general, "Li-Xx-O")


def test_cli_submits_one_work_chain_per_composition(equicsp_code, label, fake_submit):
    """``--chemical-system Sr-Ti-O --max-atoms 7`` with mp_20: both compositions queued, one submitted at a time."""
    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label, "--model", "mp_20",
                    "--chemical-system", "Sr-Ti-O", "--max-atoms", "7", "--max-concurrent", "1", "--num-samples", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "chemical system Sr-Ti-O: 2 charge-balanced compositions (SrTiO3, Sr2TiO4)"
    assert f"campaign {label}: 1 submitted now, 1 waiting for a free slot (max 1 active)" in result.output
    assert load_campaign(label).compositions == ["SrTiO3", "Sr2TiO4"]
    (builder,) = fake_submit.builders
    assert builder.sample.sample.compositions.get_list() == ["SrTiO3"]  # reduced: the Z search of the model
    assert builder.metadata.label == "SrTiO3"


@pytest.mark.parametrize(("arguments", "message"), [
    (("--chemical-system", "Li-Xx-O"), "unknown element Xx"),
    (("--chemical-system", "LiFePO4"), "is not element symbols joined by '-'"),
    (("--chemical-system", "Li-Li-O"), "names Li twice"),
    (("--chemical-system", "Ca-Sr-Ti-O"), "no charge-balanced composition"),  # the tiny model: 5 atoms at most
    (("--chemical-system", "Ne-O"), "Ne has no common oxidation state"),
    (("--chemical-system", "H-Li-O"), "outside the model's training domain"),  # LiOH: perov_5 has no H
    (("--chemical-system", "Sr-Ti-O", "--formula", "SrTiO3"), "give one of --formula, --formulas-file and"),
    (("--formula", "SrTiO3", "--max-atoms", "5"), "--max-atoms is a limit of --chemical-system"),
    (("--chemical-system", "Sr-Ti-O", "--max-atoms", "0"), "--max-atoms"),
])
def test_cli_refuses_bad_systems_before_anything_is_stored(arguments, message, equicsp_code, model, label,
                                                           fake_submit):
    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label, "--model", str(model.pk),
                    *arguments)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not orm.QueryBuilder().append(orm.Group, filters={"label": label}).count()
    assert fake_submit.builders == []


# --- the query, on stored stand-ins of finished work chains -----------------------------------------------------

def _structure(formula: str) -> orm.StructureData:
    """A stand-in relaxed structure of ``formula``, its atoms 3 Å apart on a line (the query reads no positions)."""
    species = [str(element) for element, amount in Composition(formula).items() for _ in range(int(amount))]
    coords = [[index / len(species), 0.5, 0.5] for index in range(len(species))]
    return orm.StructureData(pymatgen=Structure(Lattice.cubic(3.0 * len(species)), species, coords))


def _row(label: str, reduced_formula: str, ml_rank: int | None, energy: float | None, e_hull: float | None,
         **values) -> dict:
    row = dict.fromkeys(ROW_COLUMNS)
    row.update(label=label, formula=reduced_formula, reduced_formula=reduced_formula, formula_units=1,
               ml_rank=ml_rank, ml_e_above_hull=e_hull, ml_energy_per_atom=energy, space_group_ml="P1",
               novelty="new" if ml_rank is not None else None,
               status="ml_relaxed" if ml_rank is not None else "duplicate")
    return {**row, **values}


#: The reference energies (eV/atom) of the stand-ins' hulls, by the reduced formula of the perovskite reference
#: set's entries (tests/conftest.py).
REFERENCE_ENERGIES = {"Sr": -1.6, "Ca": -2.0, "Ti": -7.8, "O2": -4.9, "SrTiO3": -8.0, "CaTiO3": -8.2}


def finished_work_chain(composition: str, rows: list[dict], reference=None, exit_status: int = 0
                        ) -> orm.WorkChainNode:
    """A stored, finished predict-relax work chain node with a ``ranking`` output, one ``ml_relaxed`` structure
    per row and, given the ``reference`` set, the ``assess_stability`` call whose inputs hold the energies of
    :data:`REFERENCE_ENERGIES` and default settings."""
    node = orm.WorkChainNode(label=composition)
    node.set_process_type(PROCESS_TYPE)
    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(exit_status)
    node.store()
    node.base.extras.set(COMPOSITION_EXTRA, composition)
    for row in rows:
        structure = _structure(row["reduced_formula"]).store()
        structure.base.links.add_incoming(node, LinkType.RETURN, f"ml_relaxed__{row['label']}")
    ranking = orm.Dict({"rows": rows}).store()
    ranking.base.links.add_incoming(node, LinkType.RETURN, "ranking")
    if reference is not None:
        energies = {entry.id: {"energy_per_atom": REFERENCE_ENERGIES[entry.structure.composition.reduced_formula],
                               "status": "converged", "error": None} for entry in reference.entries}
        assess = orm.CalcFunctionNode()
        assess.set_process_label("assess_stability")
        assess.base.links.add_incoming(node, LinkType.CALL_CALC, "assess_stability")
        for link, value in (("relax_parameters", {}), ("parameters", {}), ("reference_energies", energies)):
            assess.base.links.add_incoming(orm.Dict(value).store(), LinkType.INPUT_CALC, link)
        assess.store()
    return node


@pytest.fixture
def explored(label, perovskite_reference_set):
    """A campaign of SrTiO3 (a failed attempt, then a finished one), Sr2TiO4 and Ca2TiO4 (no hull), and a CaTiO3
    work chain outside it; the references' energies are :data:`REFERENCE_ENERGIES`."""
    reference = perovskite_reference_set
    group = CampaignGroup(label=label).store()
    group.base.extras.set(COMPOSITIONS_EXTRA, ["SrTiO3", "Sr2TiO4", "Ca2TiO4"])
    failed = finished_work_chain("SrTiO3", [_row("SrTiO3_009", "SrTiO3", 1, -8.5, -0.5)], reference, exit_status=403)
    sto = finished_work_chain("SrTiO3", [_row("SrTiO3_000", "SrTiO3", 1, -8.05, -0.05,
                                              novelty="matches mp-5229 (Pm-3m)"),
                                         _row("SrTiO3_001", "SrTiO3", None, -8.05, -0.05),
                                         _row("SrTiO3_002", "SrTiO3", 2, -7.8, 0.2)], reference)
    # the references' hull at Sr2TiO4 (SrTiO3 + Sr + O) is -46.5/7 eV/atom
    sr2tio4 = finished_work_chain("Sr2TiO4", [_row("Sr2TiO4_000", "Sr2TiO4", 1, -6.6, -6.6 + 46.5 / 7)], reference)
    ca2tio4 = finished_work_chain("Ca2TiO4", [_row("Ca2TiO4_000", "Ca2TiO4", 1, -6.0, None,
                                                   reason="no ML E_hull: no reference set")])
    group.add_nodes([failed, sto, sr2tio4, ca2tio4])
    cto = finished_work_chain("CaTiO3", [_row("CaTiO3_000", "CaTiO3", 1, -8.3, -0.1)], reference)
    return group, {"failed": failed, "sto": sto, "sr2tio4": sr2tio4, "ca2tio4": ca2tio4, "cto": cto}


def test_stable_candidates_of_a_campaign(explored):
    """Default 0.1 eV/atom: SrTiO3's best (-8.05, below the reference SrTiO3) on the hull, and Sr2TiO4, 0.043 above
    the references' hull but 0.079 above the one SrTiO3_000 lowers (SrTiO3 + Sr + O: -46.75/7); not the duplicate,
    not the rank-2 one at 0.25, not Ca2TiO4 (no hull), not the failed attempt's row, not CaTiO3 (outside)."""
    group, nodes = explored
    found = stable_candidates(group=group)
    assert [(c.row["label"], c.workchain.pk) for c in found] == [("SrTiO3_000", nodes["sto"].pk),
                                                                 ("Sr2TiO4_000", nodes["sr2tio4"].pk)]
    assert [c.row["ml_e_above_system_hull"] for c in found] == [pytest.approx(0.0), pytest.approx(-6.6 + 46.75 / 7)]
    assert found[0].row["novelty"] == "matches mp-5229 (Pm-3m)" and found[0].row["ml_e_above_hull"] == -0.05
    assert found[0].structure.uuid == nodes["sto"].outputs.ml_relaxed["SrTiO3_000"].uuid
    assert [c.row["label"] for c in stable_candidates("Sr-Ti-O", group, ehull_max=0.05)] == ["SrTiO3_000"]
    wider = stable_candidates("Sr-Ti-O", group, ehull_max=0.3)
    assert [c.row["label"] for c in wider] == ["SrTiO3_000", "Sr2TiO4_000", "SrTiO3_002"]
    assert [c.row["label"] for c in stable_candidates("Sr-O", group)] == []  # Ti is in both compositions


def test_stable_candidates_of_a_system_over_the_profile(explored):
    """Without a campaign: every predict-relax work chain, within the system and its subsystems only."""
    _, nodes = explored
    found = stable_candidates("Ca-Ti-O")
    (mine,) = [c for c in found if c.workchain.pk == nodes["cto"].pk]
    assert mine.row["label"] == "CaTiO3_000" and mine.row["ml_e_above_system_hull"] == pytest.approx(0.0)
    assert all(set(c.structure.get_symbols_set()) <= {"Ca", "Ti", "O"} for c in found)
    with pytest.raises(ValueError, match="unknown element Xx"):
        stable_candidates("Li-Xx")
    with pytest.raises(ValueError, match="ehull_max must be at least 0"):
        stable_candidates("Ca-Ti-O", ehull_max=-0.1)


def test_cli_stable(explored):
    """``campaign stable LABEL``: one line per candidate, its Z, both E_hull, novelty and nodes; a bad system: 2."""
    group, nodes = explored
    result = invoke("campaign", "stable", group.label)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["composition", "Z", "E_hull", "E_hull_known"]
    first = lines[1].split()
    assert first[:4] == ["SrTiO3", "1", "0.0000", "-0.0500"] and "mp-5229" in lines[1]
    assert str(nodes["sto"].pk) == first[-1]
    assert lines[2].split()[:4] == ["Sr2TiO4", "1", "0.0786", "0.0429"]
    assert lines[3].startswith(f"2 candidates with ML E_hull <= 0.1 eV/atom (campaign {group.label})")
    result = invoke("campaign", "stable", group.label, "--ehull-max", "0.3", "--chemical-system", "Sr-Ti-O")
    assert result.exit_code == 0 and [line.split()[0] for line in result.output.splitlines()[1:4]] == [
        "SrTiO3", "Sr2TiO4", "SrTiO3"]
    assert invoke("campaign", "stable", group.label, "--chemical-system", "Fe-Xx").exit_code == 2
