"""The ``aiida-equicsp`` command, run with click's CliRunner in the test profile (already loaded, as the CLI allows)."""

import re
from importlib.metadata import entry_points

import pytest
from aiida import orm
from click.testing import CliRunner

from aiida_equicsp import cli
from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain


def invoke(*args: str):
    """``aiida-equicsp ARGS``: the click result (``exit_code``, ``output`` with stdout and stderr)."""
    return CliRunner().invoke(cli.main, list(args))


def sample_args(code: orm.AbstractCode, model_path, *extra: str) -> list[str]:
    """``sample`` of SrTiO3 and CaTiO3, 2 each, 5 steps, with ``code`` and the model file ``model_path``."""
    return ["sample", "--code", code.full_label, "--model", str(model_path), "--formula", "SrTiO3",
            "--formula", "CaTiO3", "--num-samples", "2", "--steps", "5", *extra]


@pytest.mark.slow
def test_sample_runs_the_work_chain_and_results_lists_its_candidates(fixed_cell_equicsp_code, tiny_checkpoint):
    """``sample`` finishes and prints the pk; ``results PK`` lists 4 valid candidates of 4 Å cubic cells."""
    result = invoke(*sample_args(fixed_cell_equicsp_code, tiny_checkpoint, "--seed", "3", "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    pk = int(re.search(r"EquiCSPSampleBaseWorkChain<(\d+)> finished: 4 valid of 4 candidates", result.output)[1])
    workchain = orm.load_node(pk)
    assert workchain.is_finished_ok
    assert workchain.inputs.sample.parameters.get_dict() == {"steps": 5, "seed": 3, "batch_size": 2}
    # run in this process, its reports are stored (verdi process report PK shows them)
    assert orm.Log.collection.get_logs_for(workchain), "no report stored for the work chain run by the command"

    result = invoke("results", str(pk))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split("  ")[0] == "formula" and "volume (Å³)" in lines[0]
    rows = [line.split() for line in lines[1:5]]
    structures = workchain.outputs.structures
    assert lines[0].split()[:5] == ["formula", "sample", "Z", "cell", "valid"]
    # formula, sample, Z and cell (the test model's 5-atom domain: Z = 1), valid
    assert [row[:5] for row in rows] == [["SrTiO3", "0", "1", "SrTiO3", "yes"], ["SrTiO3", "1", "1", "SrTiO3", "yes"],
                                         ["CaTiO3", "0", "1", "CaTiO3", "yes"], ["CaTiO3", "1", "1", "CaTiO3", "yes"]]
    assert [row[5] for row in rows] == [str(structures[label].pk) for label in
                                        ("SrTiO3_000", "SrTiO3_001", "CaTiO3_000", "CaTiO3_001")]
    assert [row[6:] for row in rows] == [["SrTiO3", "64.00"]] * 2 + [["CaTiO3", "64.00"]] * 2
    assert lines[5] == f"4 candidates, 4 valid (EquiCSPSampleBaseWorkChain<{pk}>)"

    calculation = next(node for node in workchain.called if isinstance(node, orm.CalcJobNode))
    result = invoke("results", str(calculation.pk))
    assert result.exit_code == 0, result.output
    assert "4 candidates, 4 valid (EquiCSPSampleCalculation" in result.output


def test_daemon_submits_and_prints_the_pk(equicsp_code, tiny_checkpoint, monkeypatch):
    """``--daemon`` submits the built work chain (submission replaced here: the test profile has no broker)."""
    submitted = []

    def fake_submit(builder):
        submitted.append(builder)
        return orm.WorkflowNode().store()

    monkeypatch.setattr(cli, "submit", fake_submit)
    result = invoke(*sample_args(equicsp_code, tiny_checkpoint, "--daemon", "--device", "cpu"))
    assert result.exit_code == 0, result.output
    (builder,) = submitted
    assert builder.process_class is EquiCSPSampleBaseWorkChain
    assert builder.sample.parameters.get_dict() == {"steps": 5, "device": "cpu"}
    assert re.fullmatch(r"submitted EquiCSPSampleBaseWorkChain<\d+>; when it is done: aiida-equicsp results \d+\n",
                        result.output)


def test_daemon_without_a_broker_is_a_clear_error(equicsp_code, tiny_checkpoint):
    result = invoke(*sample_args(equicsp_code, tiny_checkpoint, "--daemon"))
    assert result.exit_code == 1
    assert "cannot submit to the daemon" in result.output


def test_overrides_file_sets_scheduler_options_and_work_chain_inputs(equicsp_code, tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    """``--overrides FILE``: the YAML of the GPU example in docs/cluster.md reaches the builder; flags win over it."""
    overrides = tmp_path / "gpu.yaml"
    overrides.write_text("max_iterations: 3\nsample:\n  parameters: {device: cuda, steps: 50}\n  metadata:\n"
                         "    options:\n      custom_scheduler_commands: '#SBATCH --gres=gpu:1'\n"
                         "      max_wallclock_seconds: 3600\n")
    submitted = []
    monkeypatch.setattr(cli, "submit", lambda builder: submitted.append(builder) or orm.WorkflowNode().store())
    result = invoke(*sample_args(equicsp_code, tiny_checkpoint, "--overrides", str(overrides), "--daemon"))
    assert result.exit_code == 0, result.output
    (builder,) = submitted
    assert builder.sample.parameters.get_dict() == {"steps": 5, "device": "cuda"}
    assert builder.sample.metadata.options.custom_scheduler_commands == "#SBATCH --gres=gpu:1"
    assert builder.sample.metadata.options.max_wallclock_seconds == 3600
    assert builder.max_iterations.value == 3


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"--code": "no-such-code"}, "Invalid value for '-X' / '--code': no Code found with LABEL<no-such-code>"),
        ({"--model": "no_such_model"}, "Invalid value for '--model': .*is not a shipped checkpoint"),
        ({"--model": "NOT_A_CHECKPOINT"}, "Invalid value for '--model': .*not a readable checkpoint"),
        ({"--formula": "Xx2O3"}, "Invalid value for '--formula': .*formula 'Xx2O3'"),
        ({"--formula": "C60"}, "formula 'C60' has 60 atoms; the model supports at most"),
        ({"--protocol": "slow"},
         "Invalid value for '--protocol': 'slow' is not one of 'fast', 'balanced', 'stringent', 'precise'"),
    ],
)
def test_bad_sample_input_is_a_usage_error_naming_it(equicsp_code, tiny_checkpoint, tmp_path, replace, message):
    """Exit status 2 and the problem named; no work chain is created."""
    not_a_checkpoint = tmp_path / "model.pt"
    not_a_checkpoint.write_text("weights? no.")
    args = sample_args(equicsp_code, tiny_checkpoint, "--protocol", "fast")
    for option, value in replace.items():
        args[args.index(option) + 1] = str(not_a_checkpoint) if value == "NOT_A_CHECKPOINT" else value
    workchains_before = orm.QueryBuilder().append(EquiCSPSampleBaseWorkChain).count()

    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert orm.QueryBuilder().append(EquiCSPSampleBaseWorkChain).count() == workchains_before


def test_overrides_file_with_an_unknown_input_is_refused(equicsp_code, tiny_checkpoint, tmp_path):
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("temperature: 300\n")
    result = invoke(*sample_args(equicsp_code, tiny_checkpoint, "--overrides", str(overrides)))
    assert result.exit_code == 2
    assert "temperature" in result.output


def test_failed_run_exits_nonzero_naming_the_exit_status(unknown_failure_code, tiny_checkpoint):
    """A program that fails in a way no handler knows: exit status 1 and the work chain's exit status (402)."""
    result = invoke(*sample_args(unknown_failure_code, tiny_checkpoint))
    assert result.exit_code == 1
    assert re.search(r"EquiCSPSampleBaseWorkChain<\d+> failed with exit status 402", result.output), result.output


def test_results_of_a_node_that_is_not_a_sampling_run_is_refused(model):
    """A data node is no process (verdi's process type says so); another process is no sampling run."""
    result = invoke("results", str(model.pk))
    assert result.exit_code == 2
    assert f"Invalid value for 'PK': no ProcessNode found with ID<{model.pk}>" in result.output
    other = orm.WorkflowNode()
    other.set_process_label("SomeOtherWorkChain")
    other.store()
    result = invoke("results", str(other.pk))
    assert result.exit_code == 2
    assert f"node {other.pk} is a SomeOtherWorkChain" in result.output
    assert "not a sampling run (EquiCSPSampleBaseWorkChain or EquiCSPSampleCalculation)" in result.output


def test_results_of_a_missing_node_is_refused():
    result = invoke("results", "987654321")
    assert result.exit_code == 2
    assert "no ProcessNode found with ID<987654321>" in result.output


def test_console_script_is_declared():
    """``aiida-equicsp`` is the installed console script of :func:`aiida_equicsp.cli.main`."""
    (script,) = entry_points(group="console_scripts", name="aiida-equicsp")
    assert script.value == "aiida_equicsp.cli:main"


def test_unknown_profile_is_refused():
    result = invoke("--profile", "no-such-profile", "results", "1")
    assert result.exit_code == 2
    assert "Invalid value for '-p' / '--profile': profile `no-such-profile` does not exist" in result.output
