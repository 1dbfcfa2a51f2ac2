"""The QueryBuilder recipes of ``aiida_equicsp.queries`` on a real, small campaign run here (no daemon).

The campaign's work chains run with ``aiida.engine.run_get_node`` in place of ``submit``: the submitter puts
them in the group as it would on the daemon, and they are finished when it returns.
"""

from __future__ import annotations

import uuid

import pytest
from aiida import orm
from aiida.engine import calcfunction, run_get_node
from pymatgen.core import Composition

from aiida_equicsp import campaign as campaign_module
from aiida_equicsp.campaign import CampaignSettings, campaign_status, create_or_load_campaign, submit_campaign
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.queries import (
    best_row,
    checkpoint_of,
    export_winners,
    lowest_energy_per_formula,
    predicted_structures,
    winners_dataframe,
)

pytestmark = pytest.mark.slow

#: Tiny ML-only settings: 2 candidates per formula, 20 sampling steps, 30 CHGNet steps.
TINY = {"num_samples": 2, "sample": {"parameters": {"steps": 20}},
        "relax": {"parameters": {"steps": 30}}}
COMPOSITIONS = ["SrTiO3", "CaTiO3"]


@pytest.fixture(scope="module")
def campaign(aiida_profile, tmp_path_factory):
    """A finished campaign of SrTiO3 and CaTiO3 with the shipped perov_5 model on a localhost of its own."""
    from tests.aiida.conftest import EQUICSP_EXECUTABLE

    computer = orm.Computer(label=f"queries-{uuid.uuid4().hex[:8]}", hostname="localhost",
                            transport_type="core.local", scheduler_type="core.direct",
                            workdir=str(tmp_path_factory.mktemp("queries-work"))).store()
    computer.set_minimum_job_poll_interval(0)
    computer.set_default_mpiprocs_per_machine(1)
    computer.configure()
    code = orm.InstalledCode(computer=computer, filepath_executable=str(EQUICSP_EXECUTABLE), label="equicsp",
                             default_calc_job_plugin="equicsp.sample").store()
    model = EquiCSPModelData.from_shipped("perov_5")
    group = create_or_load_campaign(f"queries-{uuid.uuid4().hex[:8]}",
                                    CampaignSettings.from_nodes(model, overrides=TINY, max_concurrent=5),
                                    code, COMPOSITIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(campaign_module, "submit", lambda builder: run_get_node(builder)[1])
        report = submit_campaign(group, COMPOSITIONS, code)
    assert list(report.submitted) == COMPOSITIONS
    for status in campaign_status(group):
        assert (status.state, status.exit_status) == ("finished", 0), status
    return group


def work_chain(group, composition: str) -> orm.WorkChainNode:
    return next(node for node in group.nodes if node.base.extras.get("equicsp_composition") == composition)


def test_lowest_energy_per_formula_is_the_best_ml_row(campaign):
    """Without DFT, each composition's winner is its lowest ML energy per atom, with its ML-relaxed structure."""
    winners = lowest_energy_per_formula(campaign)
    assert list(winners) == COMPOSITIONS
    for composition, winner in winners.items():
        node = work_chain(campaign, composition)
        ranked = [row for row in node.outputs.ranking["rows"] if row.get("ml_rank") is not None]
        assert winner.level == "ml" and winner.workchain.pk == node.pk
        assert winner.energy_per_atom == min(row["ml_energy_per_atom"] for row in ranked)
        assert winner.row["ml_rank"] == 1
        assert winner.structure.uuid == node.outputs.ml_relaxed[winner.row["label"]].uuid
        assert Composition(winner.structure.get_composition()).reduced_formula == composition


def test_best_row_prefers_dft():
    """A DFT energy beats a lower ML one (different levels are not comparable); no relaxed row: None."""
    rows = [{"label": "a", "ml_rank": 1, "ml_energy_per_atom": -9.0, "dft_energy_per_atom": None},
            {"label": "b", "ml_rank": 2, "ml_energy_per_atom": -8.0, "dft_energy_per_atom": -7.0},
            {"label": "c", "ml_rank": 3, "ml_energy_per_atom": -7.5, "dft_energy_per_atom": -7.2}]
    assert best_row(rows) == ("dft", rows[2])
    assert best_row(rows[:1]) == ("ml", rows[0])
    assert best_row([{"label": "d", "ml_rank": None, "status": "implausible"}]) is None


def test_predicted_structures_by_reduced_formula(campaign):
    """The sampled structures of SrTiO3 (asked as Sr2Ti2O6 too) include the campaign's, and no CaTiO3."""
    sampled = {node.uuid for node in work_chain(campaign, "SrTiO3").outputs.sampled.values()}
    other = {node.uuid for node in work_chain(campaign, "CaTiO3").outputs.sampled.values()}
    found = predicted_structures("SrTiO3")
    assert sampled <= {node.uuid for node in found}
    assert not other & {node.uuid for node in found}
    assert all(node.creator.process_type == "aiida.calculations:equicsp.sample" for node in found)
    assert all(Composition(node.get_composition()).reduced_formula == "SrTiO3" for node in found)
    assert [node.pk for node in predicted_structures("Sr2Ti2O6")] == [node.pk for node in found]
    with pytest.raises(ValueError, match="formula 'Qq3'"):
        predicted_structures("Qq3")


@calcfunction
def stand_in_dft_relax(structure: orm.StructureData) -> orm.StructureData:
    """Stands for pw.x: a new structure created from the input (the volume 3 % larger), as a relaxation does."""
    relaxed = structure.get_pymatgen()
    relaxed.scale_lattice(relaxed.volume * 1.03)
    return orm.StructureData(pymatgen=relaxed)


def test_checkpoint_of_walks_back_to_the_sampling_model(campaign):
    """Sampled, ML-relaxed and a further 'DFT' structure all come from perov_5; a hand-made one from none."""
    model = EquiCSPModelData.from_shipped("perov_5")
    winner = lowest_energy_per_formula(campaign)["SrTiO3"]
    sampled = work_chain(campaign, "SrTiO3").outputs.sampled[winner.row["label"]]
    for structure in (sampled, winner.structure, stand_in_dft_relax(winner.structure)):
        assert checkpoint_of(structure).uuid == model.uuid
    with pytest.raises(ValueError, match="does not come from an EquiCSP sampling calculation"):
        checkpoint_of(orm.StructureData(cell=[[4, 0, 0], [0, 4, 0], [0, 0, 4]]).store())
    with pytest.raises(ValueError, match="expected a stored StructureData"):
        checkpoint_of(orm.Int(1))


def test_winners_dataframe_and_export(campaign, tmp_path):
    """One DataFrame row per composition; CIF and extxyz files that read back as the winners' structures."""
    from ase.io import read

    frame = winners_dataframe(campaign)
    winners = lowest_energy_per_formula(campaign)
    assert list(frame["composition"]) == COMPOSITIONS
    assert list(frame["level"]) == ["ml", "ml"]
    # perov_5's domain holds 5 atoms: both winners at Z = 1, their cells as written
    assert list(frame["formula_units"]) == [1, 1] and list(frame["cell_formula"]) == COMPOSITIONS
    assert list(frame["structure_pk"]) == [winner.structure.pk for winner in winners.values()]
    assert list(frame["energy_per_atom"]) == [winner.energy_per_atom for winner in winners.values()]
    assert list(frame["ml_e_above_hull"]) == [winner.row["ml_e_above_hull"] for winner in winners.values()]
    assert frame["dft_e_above_hull"].isna().all()  # no DFT in this campaign

    paths = export_winners(campaign, tmp_path / "cif")
    assert [path.name for path in paths] == ["SrTiO3.cif", "CaTiO3.cif"]
    for path, winner in zip(paths, winners.values(), strict=True):
        atoms = read(path)
        assert atoms.get_chemical_formula() == winner.structure.get_ase().get_chemical_formula()
        assert abs(atoms.get_volume() - winner.structure.get_cell_volume()) < 1e-3
    paths = export_winners(campaign, tmp_path / "xyz", fmt="extxyz")
    atoms = read(paths[0], format="extxyz")
    assert atoms.info["composition"] == "SrTiO3" and atoms.info["level"] == "ml" and atoms.info["formula_units"] == 1
    assert atoms.info["energy_per_atom"] == pytest.approx(winners["SrTiO3"].energy_per_atom)
    with pytest.raises(ValueError, match="unknown format 'pdb'"):
        export_winners(campaign, tmp_path, fmt="pdb")


def test_cli_winners_and_export(campaign, tmp_path):
    """``campaign winners LABEL --export DIR --format extxyz``: a table of both winners and their files."""
    from click.testing import CliRunner

    from aiida_equicsp import cli

    result = CliRunner().invoke(cli.main, ["campaign", "winners", campaign.label, "--export", str(tmp_path),
                                           "--format", "extxyz"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["composition", "level", "energy"]
    winners = lowest_energy_per_formula(campaign)
    for line, (composition, winner) in zip(lines[1:3], winners.items(), strict=True):
        assert line.split()[:3] == [composition, "ml", f"{winner.energy_per_atom:.4f}"]
        assert str(winner.structure.pk) in line.split()
    assert lines[3] == f"wrote 2 extxyz files to {tmp_path}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["CaTiO3.xyz", "SrTiO3.xyz"]


def test_cli_structures_and_checkpoint_of(campaign):
    """``structures FORMULA`` lists what the recipe finds; ``checkpoint-of PK`` names the model; bad input: 2."""
    from click.testing import CliRunner

    from aiida_equicsp import cli

    runner = CliRunner()
    sampled = predicted_structures("SrTiO3")
    result = runner.invoke(cli.main, ["structures", "Sr2Ti2O6"])
    assert result.exit_code == 0, result.output
    listed = [int(line.split()[0]) for line in result.output.splitlines()[1:-1]]
    assert listed == [node.pk for node in sampled]
    assert result.output.splitlines()[-1] == f"{len(sampled)} structures sampled for Sr2Ti2O6"

    winner = lowest_energy_per_formula(campaign)["SrTiO3"].structure
    result = runner.invoke(cli.main, ["checkpoint-of", str(winner.pk)])
    assert result.exit_code == 0, result.output
    model = EquiCSPModelData.from_shipped("perov_5")
    assert result.output.strip() == f"EquiCSPModelData<{model.pk}> {model.filename} sha256 {model.sha256}"

    assert runner.invoke(cli.main, ["structures", "Xx2O3"]).exit_code == 2
    assert runner.invoke(cli.main, ["checkpoint-of", str(model.pk)]).exit_code == 2  # not a structure
