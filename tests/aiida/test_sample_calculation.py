"""``EquiCSPSampleCalculation``: input validation before submission, the files it writes, its thread count."""

import pytest
import yaml
from aiida import orm
from aiida.engine import run

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation

FORMULAS = ["SrTiO3", "CaTiO3"]


def builder_for(code, model, compositions=FORMULAS, num_samples=2, **parameters):
    """A builder with every input set one by one, as a user would."""
    builder = EquiCSPSampleCalculation.get_builder()
    builder.code = code
    builder.model = model
    builder.compositions = orm.List(list(compositions))
    builder.num_samples = orm.Int(num_samples)
    if parameters:
        builder.parameters = orm.Dict(parameters)
    return builder


# ------------------------------------------------------------------------------------------------
# validation: refused when set on the builder (port validators) or when run (the whole request)


@pytest.mark.parametrize(
    ("compositions", "message"),
    [
        ([], "no formula given"),
        (["SrTiO3", "Xx2O3"], "formula 'Xx2O3'"),
        (["Fe0.5O"], "Fe0.5O"),
        (["SrTiO3", "SrTiO3"], "more than once"),
        ([3], "valid string"),
    ],
)
def test_bad_compositions_are_refused_by_the_builder(compositions, message):
    """Empty lists, unknown elements, fractional counts, repeats and non-strings: ValueError with the reason."""
    builder = EquiCSPSampleCalculation.get_builder()
    with pytest.raises(ValueError, match=message):
        builder.compositions = orm.List(compositions)


@pytest.mark.parametrize("num_samples", [0, -3])
def test_num_samples_below_one_is_refused_by_the_builder(num_samples):
    builder = EquiCSPSampleCalculation.get_builder()
    with pytest.raises(ValueError, match="num_samples: Input should be greater than or equal to 1"):
        builder.num_samples = orm.Int(num_samples)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"stepz": 5}, "unknown parameter.*stepz"),
        ({"formulas": ["SrTiO3"]}, "unknown parameter.*formulas"),
        ({"device": "gpu"}, "device must be one of auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ({"device": "meta"}, "device must be one of auto, cpu, cuda, cuda:N or mps, got 'meta'"),
    ],
)
def test_bad_parameter_keys_are_refused_by_the_builder(parameters, message):
    builder = EquiCSPSampleCalculation.get_builder()
    with pytest.raises(ValueError, match=message):
        builder.parameters = orm.Dict(parameters)


@pytest.mark.parametrize(
    ("compositions", "parameters", "message"),
    [
        (FORMULAS, {"steps": "five"}, "steps: Input should be a valid integer"),
        (FORMULAS, {"steps": 0}, "steps: Input should be greater than or equal to 1"),
        (FORMULAS, {"steps": 1001}, "steps must be <= the model's T = 1000"),
        (FORMULAS, {"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
        (FORMULAS, {"step_lr": -1.0}, "step_lr: Input should be greater than 0"),
        (FORMULAS, {"seed": 0.5}, "seed: Input should be a valid integer"),
        (["C60"], {}, "formula 'C60' has 60 atoms; the model supports at most"),
    ],
)
def test_bad_requests_are_refused_before_submission(equicsp_code, model, compositions, parameters, message):
    """Values checked against the engine's rules and the model's limits (by the builder's port validators or at
    ``run``): a ValueError, no job is created."""
    jobs_before = orm.QueryBuilder().append(EquiCSPSampleCalculation).count()
    with pytest.raises(ValueError, match=message):
        run(builder_for(equicsp_code, model, compositions, **parameters))
    assert orm.QueryBuilder().append(EquiCSPSampleCalculation).count() == jobs_before


# ------------------------------------------------------------------------------------------------
# prepare_for_submission


def test_prepare_for_submission_writes_the_input_file_and_runs_equicsp(equicsp_code, model, generate_calc_job):
    """input.yaml holds the request, model.pt is copied in, results/ and the program's streams come back."""
    inputs = {"code": equicsp_code, "model": model, "compositions": orm.List(FORMULAS), "num_samples": orm.Int(2),
              "parameters": orm.Dict({"steps": 5, "seed": 1})}
    folder, calcinfo = generate_calc_job(inputs)
    with folder.open("input.yaml") as handle:
        assert yaml.safe_load(handle) == {"formulas": FORMULAS, "num_samples": 2, "steps": 5, "seed": 1,
                                          "threads": 1}
    (codeinfo,) = calcinfo.codes_info
    assert codeinfo.cmdline_params == ["--quiet", "--status-file", "status.json", "sample", "--input", "input.yaml",
                                       "--checkpoint", "model.pt", "--out", "results"]
    assert (codeinfo.stdout_name, codeinfo.stderr_name) == ("equicsp.out", "equicsp.err")
    assert calcinfo.local_copy_list == [(model.uuid, model.filename, "model.pt")]
    assert calcinfo.retrieve_list == ["results", "equicsp.out", "equicsp.err", "status.json"]


def test_default_options():
    """Parser, one process on one machine, no MPI: set by the spec."""
    options = EquiCSPSampleCalculation.spec().inputs["metadata"]["options"]
    assert options["parser_name"].default == "equicsp.sample"
    assert options["resources"].default == {"num_machines": 1, "num_mpiprocs_per_machine": 1}
    assert options["withmpi"].default is False


def test_exit_codes_are_stable():
    """The exit codes a restart work chain will handle keep their numbers."""
    codes = EquiCSPSampleCalculation.exit_codes
    assert {name: codes[name].status for name in (
        "ERROR_MISSING_OUTPUT", "ERROR_UNREADABLE_OUTPUT", "ERROR_OUT_OF_MEMORY", "ERROR_INVALID_COMPOSITION",
        "ERROR_INCOMPATIBLE_CHECKPOINT", "ERROR_DEVICE_NOT_AVAILABLE", "ERROR_PARTIAL_RESULTS")} == {
        "ERROR_MISSING_OUTPUT": 300, "ERROR_UNREADABLE_OUTPUT": 301, "ERROR_OUT_OF_MEMORY": 310,
        "ERROR_INVALID_COMPOSITION": 320, "ERROR_INCOMPATIBLE_CHECKPOINT": 321, "ERROR_DEVICE_NOT_AVAILABLE": 330,
        "ERROR_PARTIAL_RESULTS": 350}


@pytest.mark.parametrize(("parameters", "resources", "threads"), [
    ({}, {"num_machines": 1, "num_mpiprocs_per_machine": 1}, 1),
    ({}, {"num_machines": 1, "num_mpiprocs_per_machine": 1, "num_cores_per_mpiproc": 8}, 8),
    ({"threads": 4}, {"num_machines": 1, "num_mpiprocs_per_machine": 1, "num_cores_per_mpiproc": 8}, 4),
])
def test_threads_come_from_the_parameters_else_the_cores_of_the_job_else_one(
        equicsp_code, model, generate_calc_job, parameters, resources, threads):
    inputs = {"code": equicsp_code, "model": model, "compositions": orm.List(FORMULAS), "num_samples": orm.Int(1),
              "parameters": orm.Dict({"steps": 5, **parameters}), "metadata": {"options": {"resources": resources}}}
    folder, _ = generate_calc_job(inputs)
    with folder.open("input.yaml") as handle:
        assert yaml.safe_load(handle)["threads"] == threads
