"""``equicsp sample``: the ``--input`` file, results saved batch by batch, ``run.json``, exit statuses 2 and 3."""

import json

import pytest
import torch
import yaml

from equicsp_core import predict
from equicsp_core.cli import main
from equicsp_core.settings import SampleSettings

SETTINGS = {"formulas": ["SrTiO3", "CaTiO3"], "num_samples": 2, "steps": 5, "seed": 1, "batch_size": 3}


def run_cli(*args) -> int:
    return main(["--quiet", *map(str, args)])


def write_input(path, settings) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def sample_from_input(checkpoint, input_file, out) -> int:
    return run_cli("sample", "--checkpoint", checkpoint, "--input", input_file, "--out", out)


def test_input_file_gives_the_same_candidates_as_flags(tiny_checkpoint, tmp_path):
    """The same settings as flags or as an --input file give identical index.json files."""
    assert sample_from_input(tiny_checkpoint, write_input(tmp_path / "in.yaml", SETTINGS), tmp_path / "a") == 0
    assert run_cli("sample", "--checkpoint", tiny_checkpoint, "--formula", "SrTiO3", "--formula", "CaTiO3",
                   "--num-samples", 2, "--steps", 5, "--seed", 1, "--batch-size", 3, "--out", tmp_path / "b") == 0
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()


def test_run_json_records_a_complete_run(tiny_checkpoint, tmp_path):
    """run.json says the run is complete and records counts, steps, device, timing and versions."""
    out = tmp_path / "out"
    assert sample_from_input(tiny_checkpoint, write_input(tmp_path / "in.yaml", SETTINGS), out) == 0
    run = json.loads((out / "run.json").read_text())
    entries = json.loads((out / "index.json").read_text())["samples"]
    assert run["complete"] is True
    assert run["requested"] == run["written"] == len(entries) == 4
    assert run["valid"] == sum(entry["valid"] for entry in entries)
    assert (run["steps"], run["batch_size"], run["device"]) == (5, 3, "cpu")
    assert run["seconds"] >= 0
    assert run["versions"] == {"equicsp": "0.1.0", "torch": torch.__version__}


def test_settings_defaults_and_full_schedule():
    """Only formulas is required; ``steps: null`` (the model's T) is accepted."""
    settings = SampleSettings.from_mapping({"formulas": ["SrTiO3"], "steps": None})
    assert settings.formulas == ("SrTiO3",)
    assert (settings.num_samples, settings.steps, settings.seed, settings.device) == (20, None, 0, "auto")


BAD_INPUT_FILES = {
    "unknown key": ({**SETTINGS, "num_sample": 2}, "num_sample"),
    "formulas not a list": ({**SETTINGS, "formulas": "SrTiO3"}, "formulas"),
    "no formulas": ({"num_samples": 2}, "formulas"),
    "empty formulas": ({**SETTINGS, "formulas": []}, "formula"),
    "repeated formula": ({**SETTINGS, "formulas": ["SrTiO3", "SrTiO3"]}, "SrTiO3"),
    "unknown element": ({**SETTINGS, "formulas": ["Xx2O3"]}, "formula 'Xx2O3'"),
    "zero samples": ({**SETTINGS, "num_samples": 0}, "num_samples"),
    "text steps": ({**SETTINGS, "steps": "five"}, "steps"),
    "fractional seed": ({**SETTINGS, "seed": 1.5}, "seed"),
    "zero batch size": ({**SETTINGS, "batch_size": 0}, "batch_size"),
    "negative step_lr": ({**SETTINGS, "step_lr": -1.0}, "step_lr"),
    "step_lr as words": ({**SETTINGS, "step_lr": "small"}, "step_lr"),
    "unknown device": ({**SETTINGS, "device": "abacus"}, "abacus"),
    "not a mapping": (["SrTiO3"], "mapping"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT_FILES))
def test_bad_input_file_exits_2_naming_the_problem(tiny_checkpoint, tmp_path, capsys, name):
    """A bad --input file exits 2 with one error line naming the key or value, and writes nothing."""
    settings, named = BAD_INPUT_FILES[name]
    out = tmp_path / "out"
    capsys.readouterr()
    assert sample_from_input(tiny_checkpoint, write_input(tmp_path / "in.yaml", settings), out) == 2
    err = capsys.readouterr().err
    assert err.startswith("equicsp sample: error: --input") and named in err
    assert not out.exists()


def test_exponent_written_without_a_dot_is_read_as_a_number():
    """YAML 1.1 reads 5e-6 as text; the settings accept it as the number it spells."""
    settings = SampleSettings(formulas=("SrTiO3",), step_lr="5e-6", lattice_bound="1e3")
    assert settings.step_lr == 5e-6 and settings.lattice_bound == 1000.0


def test_unreadable_input_file_exits_2(tiny_checkpoint, tmp_path, capsys):
    """A missing or non-YAML --input file exits 2."""
    (tmp_path / "broken.yaml").write_text("formulas: [SrTiO3\n")
    for input_file in (tmp_path / "missing.yaml", tmp_path / "broken.yaml"):
        capsys.readouterr()
        assert sample_from_input(tiny_checkpoint, input_file, tmp_path / "out") == 2
        assert input_file.name in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_input_and_flags_are_mutually_exclusive(tiny_checkpoint, tmp_path, capsys):
    """--input with a settings flag exits 2 naming the flag; no flags and no --input asks for formulas."""
    input_file = write_input(tmp_path / "in.yaml", SETTINGS)
    capsys.readouterr()
    assert run_cli("sample", "--checkpoint", tiny_checkpoint, "--input", input_file, "--seed", 2,
                   "--out", tmp_path / "out") == 2
    assert "--seed" in capsys.readouterr().err
    assert run_cli("sample", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "out") == 2
    assert "--formula" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("formula", ["Xx2O3", "C60", "Fe0.5O"])
def test_bad_composition_exits_2_with_a_formula_message(tiny_checkpoint, tmp_path, capsys, formula):
    """Unknown elements, cells beyond the model's size and fractional counts: exit 2, "formula" in the message."""
    capsys.readouterr()
    assert run_cli("sample", "--checkpoint", tiny_checkpoint, "--formula", formula, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "formula" in err and formula in err
    assert not (tmp_path / "out").exists()


def test_incompatible_checkpoint_exits_2_with_a_checkpoint_message(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint of another format version exits 2 with "checkpoint" in the message."""
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format_version"] = 99
    future = tmp_path / "future.pt"
    torch.save(payload, future)
    capsys.readouterr()
    assert run_cli("sample", "--checkpoint", future, "--formula", "SrTiO3", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "format version 99" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_folder_is_refused(tiny_checkpoint, tmp_path, capsys):
    """An output folder with files in it exits 2 and is left alone (no mixing of two runs' results)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text("earlier run")
    capsys.readouterr()
    assert sample_from_input(tiny_checkpoint, write_input(tmp_path / "in.yaml", SETTINGS), out) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["index.json"]
    assert (out / "index.json").read_text() == "earlier run"


def test_out_of_memory_exits_3_and_keeps_finished_batches(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Out of memory in the third batch: exit 3, the stated error line, the first two batches saved, no run.json."""
    real_sample, calls = predict.sample, []

    def sample_until_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr("equicsp_core.predict.sample", sample_until_third_call)
    out = tmp_path / "out"
    capsys.readouterr()
    input_file = write_input(tmp_path / "in.yaml", {**SETTINGS, "batch_size": 1})
    assert sample_from_input(tiny_checkpoint, input_file, out) == 3
    assert capsys.readouterr().err.strip().splitlines() == ["equicsp sample: error: out of memory"]
    entries = json.loads((out / "index.json").read_text())["samples"]
    assert [(e["formula"], e["sample"]) for e in entries] == [("SrTiO3", 0), ("SrTiO3", 1)]
    assert all((out / e["file"]).is_file() for e in entries if e["valid"])
    assert not (out / "run.json").exists()
    assert not list(out.glob("*.tmp"))


def test_fail_once_switch_fails_like_out_of_memory_then_runs(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """EQUICSP_TEST_FAIL_ONCE: the first run creates the marker and exits 3 with no output, the next runs normally."""
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("EQUICSP_TEST_FAIL_ONCE", str(marker))
    input_file = write_input(tmp_path / "in.yaml", SETTINGS)
    capsys.readouterr()
    assert sample_from_input(tiny_checkpoint, input_file, tmp_path / "first") == 3
    assert capsys.readouterr().err.strip() == "equicsp sample: error: out of memory"
    assert marker.is_file()
    assert not (tmp_path / "first").exists()
    assert sample_from_input(tiny_checkpoint, input_file, tmp_path / "second") == 0
    assert json.loads((tmp_path / "second" / "run.json").read_text())["complete"] is True


def test_fail_once_switch_checks_the_input_first(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """With the switch set, bad input still exits 2 and leaves the marker uncreated."""
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("EQUICSP_TEST_FAIL_ONCE", str(marker))
    assert run_cli("sample", "--checkpoint", tiny_checkpoint, "--formula", "Xx2O3", "--out", tmp_path / "out") == 2
    assert not marker.exists()
