"""``EquiCSPSampleBaseWorkChain``: its recoveries run for real (``equicsp`` on localhost), the merge, the builder."""

import sys

import pytest
from aiida import orm
from aiida.engine import run_get_node
from aiida.plugins import WorkflowFactory

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation
from aiida_equicsp.workchains.sample_base import (
    EquiCSPSampleBaseWorkChain,
    count_missing_samples,
    merge_candidate_lists,
)

FORMULAS = ["SrTiO3", "CaTiO3"]
CALCULATION_EXIT_CODES = EquiCSPSampleCalculation.exit_codes

#: An ``equicsp`` that, on its first run (marker file absent), runs the wrapped program and then loses the
#: last ``{lost}`` candidates (their CIF files and index entries) and ``run.json``, as a job stopped in the
#: middle of its batches: ``{error}`` (if any) on stderr and in its status file, and exit status ``{status}``,
#: e.g. 143 for a job killed at its walltime (no status file), or equicsp's out-of-memory line and 3. Later runs
#: are the wrapped program's.
STOPPED_EARLY_EQUICSP = '''#!{python}
import json
import subprocess
import sys
from pathlib import Path

status = subprocess.call([{wrapped!r}, *sys.argv[1:]])
marker = Path({marker!r})
if status != 0 or marker.exists():
    sys.exit(status)
marker.touch()
results = Path("results")
index = json.loads((results / "index.json").read_text())
samples = index["samples"]
kept, lost = samples[:len(samples) - {lost}], samples[len(samples) - {lost}:]
for entry in lost:
    if entry["file"]:
        (results / entry["file"]).unlink()
(results / "index.json").write_text(json.dumps({{**index, "samples": kept}}))
(results / "run.json").unlink()
status_file = Path(sys.argv[sys.argv.index("--status-file") + 1])
if {error!r}:
    print({error!r}, file=sys.stderr)
    status_file.write_text(json.dumps({{"exit_status": {status}, "failure": "out_of_memory", "error": "out of memory"}}))
else:
    status_file.unlink()
sys.exit({status})
'''


def workchain_builder(code, model, formulas=FORMULAS, num_samples=2, **parameters):
    """The fast protocol with 5 steps and ``parameters``."""
    return EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
        code, model, formulas, num_samples, overrides={"sample": {"parameters": {"steps": 5, **parameters}}})


def calculations_of(workchain: orm.WorkChainNode) -> list[orm.CalcJobNode]:
    """The sample calculations the work chain ran, in order."""
    return sorted((node for node in workchain.called if isinstance(node, orm.CalcJobNode)), key=lambda node: node.pk)


def reports_of(workchain: orm.WorkChainNode) -> str:
    """Every report line of the work chain, one per line."""
    return "\n".join(log.message for log in orm.Log.collection.get_logs_for(workchain))


@pytest.fixture
def stopped_early_code(script_code, fixed_cell_equicsp_code, tmp_path):
    """``stopped_early_code(lost, out_of_memory=False)``: :data:`STOPPED_EARLY_EQUICSP` around the fixed-cell
    program (every candidate valid), stopped at the walltime or out of memory."""

    def factory(lost: int, out_of_memory: bool = False) -> orm.InstalledCode:
        error, status = ("equicsp sample: error: out of memory", 3) if out_of_memory else ("", 143)
        return script_code("equicsp-stopped-early", STOPPED_EARLY_EQUICSP.format(
            python=sys.executable, wrapped=fixed_cell_equicsp_code.filepath_executable.as_posix(),
            marker=str(tmp_path / "stopped-once"), lost=lost, error=error, status=status))

    return factory


def check_merged_outputs(outputs, formulas, num_samples) -> None:
    """Each requested (formula, sample) exactly once; a structure per valid candidate, its calculation's node."""
    candidates = outputs["candidates"]["candidates"]
    assert sorted((c["formula"], c["sample"]) for c in candidates) == sorted(
        (formula, index) for formula in formulas for index in range(num_samples))
    structures = outputs.get("structures", {})
    assert set(structures) == {c["link_label"] for c in candidates if c["valid"]}
    for candidate in candidates:
        if candidate["valid"]:
            calculation = orm.load_node(candidate["calculation_uuid"])
            assert calculation.pk == candidate["calculation_pk"]
            source = calculation.outputs.structures[candidate["calculation_link_label"]]
            assert structures[candidate["link_label"]].uuid == source.uuid
    info = outputs["run_info"]
    assert (info["complete"], info["requested"], info["written"]) == (True, len(candidates), len(candidates))


# ------------------------------------------------------------------------------------------------
# recoveries, run for real


@pytest.mark.slow
def test_out_of_memory_is_recovered_with_half_the_batch(equicsp_code, model, tmp_path):
    """First run out of memory (the test switch): a second run with half the batch gives every candidate."""
    builder = workchain_builder(equicsp_code, model, batch_size=4)
    builder.sample.metadata.options.environment_variables = {"EQUICSP_TEST_FAIL_ONCE": str(tmp_path / "failed-once")}
    outputs, workchain = run_get_node(builder)

    assert workchain.is_finished_ok, workchain.exit_message
    first, second = calculations_of(workchain)
    assert first.exit_status == CALCULATION_EXIT_CODES.ERROR_OUT_OF_MEMORY.status
    assert second.is_finished_ok
    assert (first.inputs.parameters["batch_size"], second.inputs.parameters["batch_size"]) == (4, 2)
    assert second.inputs.compositions.get_list() == FORMULAS  # nothing had finished
    assert second.inputs.parameters["seed"] == 1  # the default seed 0, + 1 for the rerun
    check_merged_outputs(outputs, FORMULAS, 2)
    assert {c["calculation_uuid"] for c in outputs["candidates"]["candidates"]} == {second.uuid}
    assert outputs["run_info"]["calculations"] == 2
    assert "out of memory: batch_size 4 → 2" in reports_of(workchain)


@pytest.mark.slow
def test_stopped_run_is_completed_by_running_only_what_is_missing(stopped_early_code, model):
    """3 formulas x 2, stopped after 3 candidates (CaTiO3 1 short, BaTiO3 2): the rerun asks for those two only.

    Every candidate is valid (the fixed-cell program), so every merged entry has a structure to check.
    """
    formulas = ["SrTiO3", "CaTiO3", "BaTiO3"]
    code = stopped_early_code(lost=3)
    outputs, workchain = run_get_node(workchain_builder(code, model, formulas, 2, seed=7))

    assert workchain.is_finished_ok, workchain.exit_message
    first, second = calculations_of(workchain)
    assert first.exit_status == CALCULATION_EXIT_CODES.ERROR_PARTIAL_RESULTS.status
    assert [(c["formula"], c["sample"]) for c in first.outputs.candidates["candidates"]] == [
        ("SrTiO3", 0), ("SrTiO3", 1), ("CaTiO3", 0)]
    assert second.inputs.compositions.get_list() == ["CaTiO3", "BaTiO3"]
    assert second.inputs.num_samples.value == 2
    assert (first.inputs.parameters["seed"], second.inputs.parameters["seed"]) == (7, 8)

    check_merged_outputs(outputs, formulas, 2)
    candidates = outputs["candidates"]["candidates"]
    assert [(c["formula"], c["sample"], c["calculation_pk"], c["calculation_sample"]) for c in candidates] == [
        ("SrTiO3", 0, first.pk, 0), ("SrTiO3", 1, first.pk, 1),
        ("CaTiO3", 0, first.pk, 0), ("CaTiO3", 1, second.pk, 0),  # the rerun's CaTiO3_001 is surplus
        ("BaTiO3", 0, second.pk, 0), ("BaTiO3", 1, second.pk, 1)]
    assert set(outputs["structures"]) == {f"{formula}_{index:03d}" for formula in formulas for index in range(2)}
    assert "CaTiO3 × 1, BaTiO3 × 2" in reports_of(workchain)


@pytest.mark.slow
def test_out_of_memory_after_some_batches_reruns_the_rest_with_half_the_batch(stopped_early_code, model):
    """Out of memory after SrTiO3's batch (batch_size 2): the rerun asks for CaTiO3 only, 1 crystal per batch."""
    code = stopped_early_code(lost=2, out_of_memory=True)
    outputs, workchain = run_get_node(workchain_builder(code, model, batch_size=2))

    assert workchain.is_finished_ok, workchain.exit_message
    first, second = calculations_of(workchain)
    assert first.exit_status == CALCULATION_EXIT_CODES.ERROR_OUT_OF_MEMORY.status
    assert [c["formula"] for c in first.outputs.candidates["candidates"]] == ["SrTiO3", "SrTiO3"]
    assert second.inputs.compositions.get_list() == ["CaTiO3"]
    assert second.inputs.num_samples.value == 2
    assert second.inputs.parameters.get_dict() == {"steps": 5, "batch_size": 1, "seed": 1}
    check_merged_outputs(outputs, FORMULAS, 2)
    assert [c["calculation_pk"] for c in outputs["candidates"]["candidates"]] == [first.pk] * 2 + [second.pk] * 2
    assert "out of memory: batch_size 2 → 1" in reports_of(workchain)


@pytest.mark.slow
def test_run_stopped_after_its_last_candidate_is_not_rerun(stopped_early_code, model):
    """Stopped after the last candidate, before run.json: nothing is missing, the work chain finishes with it."""
    code = stopped_early_code(lost=0)
    outputs, workchain = run_get_node(workchain_builder(code, model))

    assert workchain.is_finished_ok, workchain.exit_message
    (calculation,) = calculations_of(workchain)
    assert calculation.exit_status == CALCULATION_EXIT_CODES.ERROR_PARTIAL_RESULTS.status
    check_merged_outputs(outputs, FORMULAS, 2)
    assert outputs["run_info"].get_dict() == {"complete": True, "requested": 4, "written": 4, "valid": 4,
                                              "calculations": 1}
    assert "nothing is missing" in reports_of(workchain)


@pytest.mark.slow
def test_iterations_run_out_keeping_the_finished_candidates(stopped_early_code, model):
    """max_iterations 1 and a run stopped early: exit 401, the candidates that finished are still output."""
    code = stopped_early_code(lost=1)
    builder = workchain_builder(code, model)
    builder.max_iterations = orm.Int(1)
    outputs, workchain = run_get_node(builder)

    assert workchain.exit_status == EquiCSPSampleBaseWorkChain.exit_codes.ERROR_MAXIMUM_ITERATIONS_EXCEEDED.status
    assert [(c["formula"], c["sample"]) for c in outputs["candidates"]["candidates"]] == [
        ("SrTiO3", 0), ("SrTiO3", 1), ("CaTiO3", 0)]
    assert set(outputs["structures"]) == {"SrTiO3_000", "SrTiO3_001", "CaTiO3_000"}
    assert (outputs["run_info"]["complete"], outputs["run_info"]["written"]) == (False, 3)


@pytest.mark.slow
def test_no_candidate_when_the_iterations_run_out(equicsp_code, model, tmp_path):
    """max_iterations 1 and out of memory before any batch: ERROR_NO_CANDIDATES, no outputs.

    Without a batch_size the engine's default (256) applies; the failed batch held the 4 requested crystals.
    """
    builder = workchain_builder(equicsp_code, model)
    builder.sample.metadata.options.environment_variables = {"EQUICSP_TEST_FAIL_ONCE": str(tmp_path / "failed-once")}
    builder.max_iterations = orm.Int(1)
    outputs, workchain = run_get_node(builder)

    assert workchain.exit_status == EquiCSPSampleBaseWorkChain.exit_codes.ERROR_NO_CANDIDATES.status
    assert workchain.exit_message == "no calculation produced a single candidate in 1 iterations"
    assert outputs == {}
    assert "out of memory: batch_size 256 → 2" in reports_of(workchain)


def test_unknown_failure_passes_through_as_unhandled(unknown_failure_code, model):
    """A failure no handler knows (300, no results): the base class's ERROR_UNHANDLED_FAILURE, one calculation."""
    _, workchain = run_get_node(workchain_builder(unknown_failure_code, model))

    assert workchain.exit_status == EquiCSPSampleBaseWorkChain.exit_codes.ERROR_UNHANDLED_FAILURE.status
    (calculation,) = calculations_of(workchain)
    assert calculation.exit_status == CALCULATION_EXIT_CODES.ERROR_MISSING_OUTPUT.status
    assert "the GPU caught fire" in calculation.exit_message


def test_device_not_available_is_not_retried(equicsp_code, model):
    """``cuda`` where no GPU is visible (``CUDA_VISIBLE_DEVICES=""`` hides any): the calculation's 330, then the
    work chain's 420 at once, after one calculation, though three iterations were allowed."""
    builder = workchain_builder(equicsp_code, model, device="cuda")
    builder.sample.metadata.options.environment_variables = {"CUDA_VISIBLE_DEVICES": ""}
    builder.max_iterations = orm.Int(3)
    outputs, workchain = run_get_node(builder)

    assert workchain.exit_status == EquiCSPSampleBaseWorkChain.exit_codes.ERROR_DEVICE_NOT_AVAILABLE.status == 420
    (calculation,) = calculations_of(workchain)
    assert calculation.exit_status == CALCULATION_EXIT_CODES.ERROR_DEVICE_NOT_AVAILABLE.status == 330
    assert "device 'cuda' is not available: 0 CUDA device(s) visible" in calculation.exit_message
    assert "device 'cuda' is not available" in workchain.exit_message
    assert outputs == {}


# ------------------------------------------------------------------------------------------------
# what is missing, and the merge


def test_missing_samples_are_counted_per_formula_valid_or_not():
    produced = [{"formula": "SrTiO3", "valid": True}, {"formula": "SrTiO3", "valid": False},
                {"formula": "CaTiO3", "valid": False}, {"formula": "SrTiO3", "valid": True}]
    assert count_missing_samples(["SrTiO3", "CaTiO3", "BaTiO3"], 3, produced) == {"CaTiO3": 2, "BaTiO3": 3}
    assert count_missing_samples(["SrTiO3"], 2, produced) == {}


def test_merge_renumbers_per_formula_and_drops_the_surplus():
    """Candidates in calculation order; a rerun's extra candidates of a formula already complete are dropped;
    each keeps the Z and cell its calculation sampled it at (not those of its new index: SrTiO3_001 is the
    rerun's sample 0, at Z = 1)."""
    def entry(formula, sample, valid, units):
        cell = {1: formula, 2: formula.replace("Sr", "Sr2").replace("Ca", "Ca2").replace("TiO3", "Ti2O6")}[units]
        return {"formula": formula, "sample": sample, "formula_units": units, "cell_formula": cell, "valid": valid,
                "link_label": f"{formula}_{sample:03d}" if valid else None}

    first = [entry("SrTiO3", 0, True, 1), entry("CaTiO3", 0, False, 1)]
    rerun = [entry("CaTiO3", 0, True, 1), entry("CaTiO3", 1, True, 2), entry("SrTiO3", 0, True, 1)]
    first[0]["formula_units"] = 2  # as if SrTiO3 had been asked for at Z = 2 only
    first[0]["cell_formula"] = "Sr2Ti2O6"
    merged = merge_candidate_lists(["SrTiO3", "CaTiO3"], 2, [(1, "uuid-1", first), (2, "uuid-2", rerun)])
    assert [(m["formula"], m["sample"], m["formula_units"], m["cell_formula"], m["link_label"], m["calculation_pk"],
             m["calculation_link_label"]) for m in merged] == [
        ("SrTiO3", 0, 2, "Sr2Ti2O6", "SrTiO3_000", 1, "SrTiO3_000"),
        ("SrTiO3", 1, 1, "SrTiO3", "SrTiO3_001", 2, "SrTiO3_000"),
        ("CaTiO3", 0, 1, "CaTiO3", None, 1, None),
        ("CaTiO3", 1, 1, "CaTiO3", "CaTiO3_001", 2, "CaTiO3_000")]


# ------------------------------------------------------------------------------------------------
# spec and builder


def test_entry_point_and_spec():
    """Loadable by its entry point; calculation inputs in ``sample``; the handlers and exit codes it declares."""
    assert WorkflowFactory("equicsp.sample.base") is EquiCSPSampleBaseWorkChain
    spec = EquiCSPSampleBaseWorkChain.spec()
    assert {"code", "model", "compositions", "num_samples", "parameters"} <= set(spec.inputs["sample"])
    assert spec.inputs["max_iterations"].default().value == 5
    assert EquiCSPSampleBaseWorkChain.exit_codes.ERROR_NO_CANDIDATES.status == 410
    handlers = {handler.__name__: handler.priority for handler in EquiCSPSampleBaseWorkChain.get_process_handlers()}
    assert handlers == {"handle_device_not_available": 700, "handle_out_of_memory": 600,
                        "handle_partial_results": 500}


@pytest.mark.parametrize(("protocol", "steps"), [(None, 200), ("fast", 100), ("balanced", 200), ("stringent", 1000)])
def test_builder_from_protocol(equicsp_code, model, protocol, steps):
    """The protocols set the sampler's steps; ``balanced`` is the default; the work chain's own defaults too."""
    builder = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(equicsp_code, model, FORMULAS, 3, protocol)
    assert builder.sample.parameters.get_dict() == {"steps": steps}
    assert builder.max_iterations.value == 5
    assert builder.sample.compositions.get_list() == FORMULAS
    assert builder.sample.num_samples.value == 3
    assert builder.sample.code.uuid == equicsp_code.uuid


def test_builder_overrides_go_to_the_calculation_and_the_work_chain(equicsp_code, model):
    builder = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
        equicsp_code, model, FORMULAS, 2, "stringent",
        overrides={"sample": {"parameters": {"device": "cuda"}, "metadata": {"options": {
            "custom_scheduler_commands": "#SBATCH --gres=gpu:1"}}}, "max_iterations": 3, "clean_workdir": True})
    assert builder.sample.parameters.get_dict() == {"steps": 1000, "device": "cuda"}
    assert builder.sample.metadata.options.custom_scheduler_commands == "#SBATCH --gres=gpu:1"
    assert (builder.max_iterations.value, builder.clean_workdir.value) == (3, True)
    with pytest.raises(ValueError, match="unknown protocol 'slow'; choose one of fast, balanced, stringent"):
        EquiCSPSampleBaseWorkChain.get_builder_from_protocol(equicsp_code, model, FORMULAS, 2, "slow")


def test_protocols_are_listed_like_aiida_quantumespresso_s():
    protocols = EquiCSPSampleBaseWorkChain.get_available_protocols()
    assert list(protocols) == ["fast", "balanced", "stringent"]
    assert all(entry["description"] for entry in protocols.values())
    assert EquiCSPSampleBaseWorkChain.get_default_protocol() == "balanced"


def test_the_old_name_precise_is_stringent_with_a_warning(equicsp_code, model):
    with pytest.warns(FutureWarning, match="protocol 'precise' is deprecated: it is now called 'stringent'"):
        builder = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(equicsp_code, model, FORMULAS, 2, "precise")
    assert builder.sample.parameters.get_dict() == {"steps": 1000}


def test_options_are_the_scheduler_options_of_the_calculations(equicsp_code, model):
    """``options=`` as in aiida-quantumespresso: merged over the protocol's and the overrides' options."""
    builder = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
        equicsp_code, model, FORMULAS, 2, "fast",
        overrides={"sample": {"metadata": {"options": {"max_wallclock_seconds": 600, "queue_name": "cpu"}}}},
        options={"queue_name": "gpu", "account": "proj42",
                 "resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1, "num_cores_per_mpiproc": 8}})
    options = builder.sample.metadata.options
    assert (options.queue_name, options.account, options.max_wallclock_seconds) == ("gpu", "proj42", 600)
    assert options.resources["num_cores_per_mpiproc"] == 8


def test_a_bare_string_is_not_a_list_of_formulas(equicsp_code, model):
    with pytest.raises(ValueError, match=r"a list of formulas is required, got the string 'SrTiO3' \(write \['SrTiO3'\]\)"):
        EquiCSPSampleBaseWorkChain.get_builder_from_protocol(equicsp_code, model, "SrTiO3", 2)
