"""Ab initio generation through AiiDA: the sample calculation runs ``equicsp generate`` for a generation model
(the model's task decides), the same parser, the same restart work chain, the provenance query
``generated_structures`` and ``aiida-equicsp generate``. The models are the session's tiny ones (1 epoch)."""

import json
import re
import sys

import pytest
import torch
import yaml
from aiida import orm
from aiida.engine import run_get_node
from click.testing import CliRunner
from pymatgen.core import Composition

from equicsp_core.cli import main

from aiida_equicsp import cli
from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.queries import checkpoint_of, generated_structures, predicted_structures
from aiida_equicsp.workchains.sample_base import (
    EquiCSPSampleBaseWorkChain,
    count_missing_samples,
    merge_candidate_lists,
)
from tests.aiida.test_sample_base_workchain import STOPPED_EARLY_EQUICSP, calculations_of, reports_of
from tests.test_cli_generate import fixed_cell_generator  # noqa: F401  (a fixture)

CALCULATION_EXIT_CODES = EquiCSPSampleCalculation.exit_codes


def generation_builder(code, model, num_samples=3, compositions=None, **parameters):
    """A calculation builder: ``num_samples`` crystals in 5 steps, ``parameters``, no compositions unless given."""
    builder = EquiCSPSampleCalculation.get_builder()
    builder.code, builder.model, builder.num_samples = code, model, orm.Int(num_samples)
    if compositions is not None:
        builder.compositions = orm.List(list(compositions))
    builder.parameters = orm.Dict({"steps": 5, **parameters})
    return builder


def workchain_builder(code, model, num_samples=4, **parameters):
    """The fast protocol for a generation model: ``num_samples`` crystals, 5 steps and ``parameters``."""
    return EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
        code, model, None, num_samples, overrides={"sample": {"parameters": {"steps": 5, **parameters}}})


def nodes_stored() -> int:
    return orm.QueryBuilder().append(orm.Node).count()


# ------------------------------------------------------------------------------------------------
# the model knows its task; the calculation runs the program of that task


def test_the_model_node_knows_its_task(model, generation_model):
    """``task`` from the checkpoint's denoiser config: ``csp`` for a CSP model, ``generation`` for the other."""
    assert (model.task, generation_model.task) == ("csp", "generation")
    assert generation_model.base.attributes.get("task") == "generation"
    assert (model.trained_atom_counts, generation_model.trained_atom_counts) == ([], [5])


def test_a_checkpoint_saved_before_tasks_existed_is_a_csp_model():
    """The shipped perov_5 checkpoint has no ``task`` in its denoiser config: its node (unstored here) is CSP."""
    from equicsp_core.checkpoint import read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint("perov_5")
    assert "task" not in read_checkpoint(path)["denoiser"]
    assert EquiCSPModelData(path).task == "csp"


def test_a_generation_model_runs_equicsp_generate(equicsp_code, generation_model, generate_calc_job):
    """No compositions: input.yaml holds the number of crystals and the parameters; the program is ``generate``."""
    inputs = {"code": equicsp_code, "model": generation_model, "num_samples": orm.Int(3),
              "parameters": orm.Dict({"steps": 5, "num_atoms": 5, "seed": 2})}
    folder, calcinfo = generate_calc_job(inputs)
    with folder.open("input.yaml") as handle:
        assert yaml.safe_load(handle) == {"num_samples": 3, "steps": 5, "num_atoms": 5, "seed": 2, "threads": 1}
    (codeinfo,) = calcinfo.codes_info
    assert codeinfo.cmdline_params == ["--quiet", "--status-file", "status.json", "generate", "--input",
                                       "input.yaml", "--checkpoint", "model.pt", "--out", "results"]
    assert calcinfo.local_copy_list == [(generation_model.uuid, generation_model.filename, "model.pt")]


# ------------------------------------------------------------------------------------------------
# refusals: before anything is stored, one line


@pytest.mark.parametrize(("which", "compositions", "parameters", "message"), [
    ("generation", ["SrTiO3"], {}, r"is an ab initio generation model: it draws the compositions itself; leave out "
                                   r"compositions"),
    ("generation", None, {"max_formula_units": 2}, r"generation model: parameter\(s\) max_formula_units are for "
                                                   r"CSP sampling"),
    ("csp", None, {}, r"is a structure prediction \(CSP\) model: give the compositions to sample"),
    ("csp", ["SrTiO3"], {"num_atoms": 5}, r"\(CSP\) model: parameter\(s\) num_atoms are for ab initio generation"),
    ("generation", None, {"num_atoms": 6}, r"num_atoms: 6 atoms, more than the 5 of the largest crystal the model "
                                           r"was trained on"),
    ("generation", None, {"num_atoms": 53}, r"num_atoms: 53 atoms; the model supports at most 52"),
    ("generation", None, {"num_atoms": [3, 6]}, r"num_atoms: 6 atoms, more than the 5 of the largest crystal the "
                                                r"model was trained on"),
    ("generation", None, {"steps": 1001}, r"steps must be <= the model's T = 1000"),
    ("generation", None, {"elements": ["Sr", "C"]}, r"elements: C is not among the elements of the perov_5 crystals "
                                                    r"the model was trained on"),
    ("csp", ["SrTiO3"], {"elements": ["Sr"]}, r"\(CSP\) model: parameter\(s\) elements are for ab initio generation"),
])
def test_a_request_of_the_other_task_is_refused_before_anything_is_stored(
        equicsp_code, model, generation_model, which, compositions, parameters, message):
    """A generation model with formulas, a CSP model without them, a parameter of the other task, a size or step
    count the model cannot take: one line naming it, at ``run``, and no node stored."""
    chosen = generation_model if which == "generation" else model
    builder = generation_builder(equicsp_code, chosen, compositions=compositions, **parameters)
    before = nodes_stored()
    with pytest.raises(ValueError, match=message) as error:
        run_get_node(builder)
    assert "\n" not in str(error.value).strip().splitlines()[-1]
    assert nodes_stored() == before


def test_missing_num_samples_is_refused_before_anything_is_stored(equicsp_code, generation_model):
    builder = EquiCSPSampleCalculation.get_builder()
    builder.code, builder.model = equicsp_code, generation_model
    before = nodes_stored()
    with pytest.raises(ValueError, match="required value was not provided for 'num_samples'"):
        run_get_node(builder)
    assert nodes_stored() == before


# ------------------------------------------------------------------------------------------------
# the parser on the run folder of a real `equicsp generate`


@pytest.fixture
def generated_run_files(tiny_generation_checkpoint, tmp_path, fixed_cell_generator):
    """``factory(num_samples, stop_after=None)``: the retrieved files of a real ``equicsp generate`` run of the tiny
    model (4 Å cubic cells, so every crystal is valid), in batches of 2; ``stop_after`` batches keeps only those,
    without run.json, as a job stopped at its walltime leaves them."""

    def factory(num_samples: int, stop_after: int | None = None) -> dict[str, str]:
        out = tmp_path / "results"
        assert main(["--quiet", "generate", "--checkpoint", str(tiny_generation_checkpoint), "--num-samples",
                     str(num_samples), "--steps", "5", "--batch-size", "2", "--out", str(out)]) == 0
        files = {f"results/{path.name}": path.read_text() for path in out.iterdir()}
        files.update({"equicsp.err": "", "equicsp.out": ""})
        if stop_after is not None:
            del files["results/run.json"]
            index = json.loads(files["results/index.json"])
            for entry in index["samples"][2 * stop_after:]:
                del files[f"results/{entry['file']}"]
            index["samples"] = index["samples"][:2 * stop_after]
            files["results/index.json"] = json.dumps(index)
        return files

    return factory


def test_the_parser_reads_a_real_generation_run(parse_retrieved, generated_run_files):
    """3 generated crystals: exit 0, a structure per crystal labelled by the formula it came out with and its index
    among all, holding that formula; run_info the program's."""
    files = generated_run_files(3)
    outputs, node = parse_retrieved(files, compositions=None, num_samples=3)
    assert node.exit_status == 0, node.exit_message
    candidates = outputs["candidates"]["candidates"]
    assert [c["sample"] for c in candidates] == [0, 1, 2]
    index = json.loads(files["results/index.json"])["samples"]
    assert [c["formula"] for c in candidates] == [entry["formula"] for entry in index]
    assert set(outputs["structures"]) == {c["link_label"] for c in candidates}
    for candidate in candidates:
        assert re.fullmatch(r"\w+_00[0-2]", candidate["link_label"])
        structure = outputs["structures"][candidate["link_label"]].get_pymatgen()
        assert len(structure) == 5  # the training distribution of the perov_5 fixture: 5 atoms each
        assert structure.composition.reduced_composition == Composition(candidate["formula"]).reduced_composition
    assert outputs["run_info"]["requested"] == outputs["run_info"]["written"] == 3


def test_a_stopped_generation_run_keeps_its_batches(parse_retrieved, generated_run_files):
    """One batch of 2 of 4 crystals and no run.json: ERROR_PARTIAL_RESULTS counting the 4 requested in all."""
    outputs, node = parse_retrieved(generated_run_files(4, stop_after=1), compositions=None, num_samples=4)
    assert node.exit_status == CALCULATION_EXIT_CODES.ERROR_PARTIAL_RESULTS.status
    assert node.exit_message == "the sampler stopped before the end (walltime?): 2 of 4 candidates kept"
    assert len(outputs["candidates"]["candidates"]) == 2 and len(outputs["structures"]) == 2


# ------------------------------------------------------------------------------------------------
# what is missing, and the merge, for a generation request


def test_missing_crystals_of_a_generation_request_are_counted_in_all():
    produced = [{"formula": "SrTiO3"}, {"formula": "CaO"}, {"formula": "SrTiO3"}]
    assert count_missing_samples(None, 5, produced) == {None: 2}
    assert count_missing_samples(None, 3, produced) == {}


def test_merge_of_generated_crystals_renumbers_them_in_all_and_drops_the_surplus():
    """Two runs of generated crystals: indices 0, 1, ... over both, labels by the formula each came out with, the
    second run's surplus dropped."""
    def entry(formula, sample, valid=True):
        return {"formula": formula, "sample": sample, "formula_units": 1, "cell_formula": formula, "valid": valid,
                "link_label": f"{formula}_{sample:03d}" if valid else None}

    first = [entry("SrTiO3", 0), entry("CaO", 1, valid=False)]
    rerun = [entry("SrTiO3", 0), entry("BaO", 1), entry("SrTiO3", 2)]
    merged = merge_candidate_lists(None, 4, [(1, "uuid-1", first), (2, "uuid-2", rerun)])
    assert [(m["formula"], m["sample"], m["link_label"], m["calculation_pk"], m["calculation_link_label"])
            for m in merged] == [("SrTiO3", 0, "SrTiO3_000", 1, "SrTiO3_000"), ("CaO", 1, None, 1, None),
                                 ("SrTiO3", 2, "SrTiO3_002", 2, "SrTiO3_000"), ("BaO", 3, "BaO_003", 2, "BaO_001")]


# ------------------------------------------------------------------------------------------------
# for real: the calculation, its provenance, the restart work chain, the command


@pytest.mark.slow
def test_generation_calculation_runs_and_its_structures_are_found_by_their_model(
        fixed_cell_equicsp_code, generation_model, model):
    """The real program: 3 crystals, each a structure created by the calculation whose ``model`` input is the
    generation model; ``generated_structures`` finds exactly them (and not a CSP model's), ``checkpoint_of``
    goes back to the model, ``predicted_structures`` of a formula leaves them out."""
    before = set(node.uuid for node in generated_structures(generation_model))
    outputs, calc = run_get_node(generation_builder(fixed_cell_equicsp_code, generation_model, num_samples=3))
    assert calc.exit_status == 0, calc.exit_message
    assert calc.inputs.model.uuid == generation_model.uuid
    structures = outputs["structures"]
    assert len(structures) == 3 and outputs["run_info"]["complete"] is True
    found = {node.uuid for node in generated_structures(generation_model)} - before
    assert found == {node.uuid for node in structures.values()}
    assert found <= {node.uuid for node in generated_structures()}
    some = next(iter(structures.values()))
    assert checkpoint_of(some).uuid == generation_model.uuid
    formula = outputs["candidates"]["candidates"][0]["formula"]
    assert not {node.uuid for node in predicted_structures(formula)} & found
    with pytest.raises(ValueError, match=r"is a structure prediction \(CSP\) model, not a generation model"):
        generated_structures(model)


@pytest.mark.slow
def test_out_of_memory_generation_is_rerun_with_half_the_batch(equicsp_code, generation_model, tmp_path):
    """The test switch fails the first ``equicsp generate`` as out of memory: the rerun halves the batch (4 → 2),
    asks for the 4 crystals again, without compositions, and the work chain outputs 4."""
    builder = workchain_builder(equicsp_code, generation_model, batch_size=4)
    builder.sample.metadata.options.environment_variables = {"EQUICSP_TEST_FAIL_ONCE": str(tmp_path / "failed-once")}
    outputs, workchain = run_get_node(builder)

    assert workchain.is_finished_ok, workchain.exit_message
    first, second = calculations_of(workchain)
    assert first.exit_status == CALCULATION_EXIT_CODES.ERROR_OUT_OF_MEMORY.status
    assert second.inputs.parameters.get_dict() == {"steps": 5, "batch_size": 2, "seed": 1}
    assert second.inputs.num_samples.value == 4 and "compositions" not in second.inputs
    assert [c["sample"] for c in outputs["candidates"]["candidates"]] == [0, 1, 2, 3]
    assert (outputs["run_info"]["requested"], outputs["run_info"]["written"]) == (4, 4)
    assert "out of memory: batch_size 4 → 2" in reports_of(workchain)


@pytest.mark.slow
def test_stopped_generation_is_completed_by_generating_only_the_rest(
        script_code, fixed_cell_equicsp_code, generation_model, tmp_path):
    """5 crystals, the first job stopped at the walltime after 2 (batches of 2, 3 lost): the rerun generates the
    3 missing ones only, with the next seed; the merge holds 5, numbered 0-4, a structure for each."""
    code = script_code("equicsp-stopped-early", STOPPED_EARLY_EQUICSP.format(
        python=sys.executable, wrapped=fixed_cell_equicsp_code.filepath_executable.as_posix(),
        marker=str(tmp_path / "stopped-once"), lost=3, error="", status=143))
    outputs, workchain = run_get_node(workchain_builder(code, generation_model, 5, batch_size=2, seed=7))

    assert workchain.is_finished_ok, workchain.exit_message
    first, second = calculations_of(workchain)
    assert first.exit_status == CALCULATION_EXIT_CODES.ERROR_PARTIAL_RESULTS.status
    assert len(first.outputs.candidates["candidates"]) == 2
    assert second.inputs.num_samples.value == 3 and "compositions" not in second.inputs
    assert second.inputs.parameters["seed"] == 8
    candidates = outputs["candidates"]["candidates"]
    assert [(c["sample"], c["calculation_pk"]) for c in candidates] == [
        (0, first.pk), (1, first.pk), (2, second.pk), (3, second.pk), (4, second.pk)]
    assert set(outputs["structures"]) == {c["link_label"] for c in candidates}
    assert "generated crystals × 3" in reports_of(workchain)


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


@pytest.mark.slow
def test_the_generate_command_runs_the_work_chain(fixed_cell_equicsp_code, tiny_generation_checkpoint):
    """``aiida-equicsp generate`` finishes and prints the pk; ``results PK`` lists the generated crystals. The
    repeatable ``--num-atoms`` goes into the parameters as a list."""
    result = invoke("generate", "--code", fixed_cell_equicsp_code.full_label, "--model",
                    str(tiny_generation_checkpoint), "--num-samples", "2", "--steps", "5", "--num-atoms", "5",
                    "--num-atoms", "4")
    assert result.exit_code == 0, result.output
    pk = int(re.search(r"EquiCSPSampleBaseWorkChain<(\d+)> finished: 2 valid of 2 candidates", result.output)[1])
    workchain = orm.load_node(pk)
    assert workchain.inputs.sample.parameters.get_dict() == {"steps": 5, "num_atoms": [5, 4]}
    assert "compositions" not in workchain.inputs.sample
    result = invoke("results", str(pk))
    assert result.exit_code == 0, result.output
    assert f"2 candidates, 2 valid (EquiCSPSampleBaseWorkChain<{pk}>)" in result.output


def unstored_copy(checkpoint, folder):
    """A checkpoint file with ``checkpoint``'s model and another card, so that no stored node has its content."""
    payload = torch.load(checkpoint, weights_only=True)
    payload["card"]["epochs"] = 99
    path = folder / "unstored.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(("command", "checkpoint", "message"), [
    ("generate", "tiny_checkpoint", "the checkpoint is a structure prediction (CSP) model; use it with "
                                    "`aiida-equicsp sample`"),
    ("sample", "tiny_generation_checkpoint", "the checkpoint is an ab initio generation model; use it with "
                                             "`aiida-equicsp generate`"),
])
def test_a_model_of_the_other_task_is_refused_by_the_command_before_anything_is_stored(
        equicsp_code, request, tmp_path, command, checkpoint, message):
    """A new checkpoint of the other task: exit 2, one line naming the command to use, not even the model stored."""
    path = unstored_copy(request.getfixturevalue(checkpoint), tmp_path)
    formula = ["--formula", "SrTiO3"] if command == "sample" else []
    before = nodes_stored()
    result = invoke(command, "--code", equicsp_code.full_label, "--model", str(path), "--num-samples", "2", *formula)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert nodes_stored() == before


def test_the_generate_command_needs_num_samples(equicsp_code, tiny_generation_checkpoint):
    result = invoke("generate", "--code", equicsp_code.full_label, "--model", str(tiny_generation_checkpoint))
    assert result.exit_code == 2
    assert "Missing option '--num-samples'" in result.output
