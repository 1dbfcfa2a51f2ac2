"""``EquiCSPSampleCalculation`` run for real: the ``equicsp`` program on localhost through the direct scheduler."""

import pytest
from aiida import orm
from aiida.engine import run_get_node
from aiida.manage.caching import enable_caching
from pymatgen.core import Composition

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation

FORMULAS = ["SrTiO3", "CaTiO3"]
CALC_IDENTIFIER = "aiida.calculations:equicsp.sample"

pytestmark = pytest.mark.slow


def sample_builder(code, model, **parameters):
    """2 formulas x 2 samples, 5 steps and ``parameters``."""
    builder = EquiCSPSampleCalculation.get_builder()
    builder.code, builder.model = code, model
    builder.compositions, builder.num_samples = orm.List(FORMULAS), orm.Int(2)
    builder.parameters = orm.Dict({"steps": 5, **parameters})
    return builder


def structures_created_from(calc: orm.CalcJobNode, calc_input: orm.Node, input_label: str) -> set[str]:
    """UUIDs of the structures ``calc`` created, found through its input ``input_label`` being ``calc_input``."""
    query = orm.QueryBuilder()
    query.append(orm.Node, filters={"uuid": calc_input.uuid}, tag="input")
    query.append(EquiCSPSampleCalculation, with_incoming="input", edge_filters={"label": input_label},
                 filters={"uuid": calc.uuid}, tag="calc")
    query.append(orm.StructureData, with_incoming="calc", project="uuid")
    return set(query.all(flat=True))


def check_complete_run(outputs, calc, model) -> None:
    """Exit 0, 4 candidates, each valid one a StructureData of its formula, created from the model and formulas."""
    assert calc.exit_status == 0, calc.exit_message
    candidates = outputs["candidates"]["candidates"]
    assert [(c["formula"], c["sample"]) for c in candidates] == [(f, i) for f in FORMULAS for i in range(2)]
    structures = outputs.get("structures", {})
    assert {c["link_label"] for c in candidates if c["valid"]} == set(structures)
    for candidate in candidates:
        if candidate["valid"]:
            structure = structures[candidate["link_label"]]
            assert structure.get_pymatgen().composition == Composition(candidate["formula"])
    assert outputs["run_info"]["complete"] is True
    assert outputs["run_info"]["written"] == 4
    uuids = {node.uuid for node in structures.values()}
    assert structures_created_from(calc, model, "model") == uuids
    assert structures_created_from(calc, calc.inputs.compositions, "compositions") == uuids
    assert all(node.creator.uuid == calc.uuid for node in structures.values())


def test_sample_calculation_runs_equicsp(equicsp_code, model):
    """The real program: completes, 4 candidates, valid ones stored as structures with their provenance."""
    outputs, calc = run_get_node(sample_builder(equicsp_code, model))
    check_complete_run(outputs, calc, model)


def test_the_papers_unbounded_lattice_update_is_asked_as_the_text_inf(equicsp_code, model):
    """AiiDA stores no infinite float: ``lattice_bound: "inf"`` (text) asks for the papers' update; the run completes
    and its stored outputs hold no infinity."""
    outputs, calc = run_get_node(sample_builder(equicsp_code, model, lattice_bound="inf"))
    check_complete_run(outputs, calc, model)
    assert outputs["run_info"]["lattice_bound"] == "inf"


def test_every_valid_candidate_becomes_a_structure(fixed_cell_equicsp_code, model):
    """With every candidate valid (4 Å cubic cells): 4 structures of the right formulas, linked to the inputs."""
    outputs, calc = run_get_node(sample_builder(fixed_cell_equicsp_code, model))
    check_complete_run(outputs, calc, model)
    assert set(outputs["structures"]) == {"SrTiO3_000", "SrTiO3_001", "CaTiO3_000", "CaTiO3_001"}


def test_same_inputs_are_taken_from_the_cache(equicsp_code, model):
    """With caching on, a second run with the same inputs is a copy of the first (no job runs)."""
    with enable_caching(identifier=CALC_IDENTIFIER):
        _, first = run_get_node(sample_builder(equicsp_code, model, seed=11))
        _, second = run_get_node(sample_builder(equicsp_code, model, seed=11))
    assert first.exit_status == second.exit_status == 0
    assert second.base.caching.get_cache_source() == first.uuid


def test_test_switch_fails_the_first_run_as_out_of_memory(equicsp_code, model, tmp_path):
    """EQUICSP_TEST_FAIL_ONCE set through the job's environment: the first run exits 310, the next one 0."""
    builder = sample_builder(equicsp_code, model)
    builder.metadata.options.environment_variables = {"EQUICSP_TEST_FAIL_ONCE": str(tmp_path / "failed-once")}
    outputs, first = run_get_node(builder)
    assert first.exit_status == EquiCSPSampleCalculation.exit_codes.ERROR_OUT_OF_MEMORY.status
    assert "candidates" not in outputs
    assert (tmp_path / "failed-once").is_file()
    _, second = run_get_node(builder)
    assert second.exit_status == 0


def test_a_reduced_formula_is_sampled_over_z_and_the_outputs_say_which(fixed_cell_equicsp_code, model):
    """Si (reduced) with max_formula_units 2 and NaF explicit as Na2F2: Z and the cell of every candidate in
    ``candidates``, each structure holding its cell, labels by requested formula and sample."""
    builder = sample_builder(fixed_cell_equicsp_code, model, max_formula_units=2)
    builder.compositions, builder.num_samples = orm.List(["Si", "Na2F2"]), orm.Int(3)
    outputs, calc = run_get_node(builder)
    assert calc.exit_status == 0, calc.exit_message
    candidates = outputs["candidates"]["candidates"]
    assert [(c["link_label"], c["formula_units"], c["cell_formula"]) for c in candidates] == [
        ("Si_000", 1, "Si"), ("Si_001", 2, "Si2"), ("Si_002", 1, "Si"),
        ("Na2F2_000", 2, "Na2F2"), ("Na2F2_001", 2, "Na2F2"), ("Na2F2_002", 2, "Na2F2")]
    for candidate in candidates:
        structure = outputs["structures"][candidate["link_label"]].get_pymatgen()
        assert structure.composition == Composition(candidate["cell_formula"])


def test_a_composition_with_no_z_the_model_supports_is_refused_before_anything_is_stored(equicsp_code, model):
    """SrTiO4 (6 atoms at Z = 1) for the test model's 5-atom domain: refused at submission, naming it."""
    builder = sample_builder(equicsp_code, model)
    builder.compositions = orm.List(["SrTiO4"])
    nodes_before = orm.QueryBuilder().append(orm.ProcessNode).count()
    with pytest.raises(ValueError, match=r"'SrTiO4' is outside the model's training domain \(6 atoms, more than "
                                         r"the 5 of perov_5\)"):
        run_get_node(builder)
    assert orm.QueryBuilder().append(orm.ProcessNode).count() == nodes_before
