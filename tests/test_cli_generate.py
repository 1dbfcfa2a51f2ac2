"""Ab initio generation through the ``equicsp`` command (docs/method.md §7.6): ``train --task generation``
records the training distribution of atom counts, resumes bit for bit, ``generate`` writes the run folder of
``sample``, and a checkpoint of the other task is refused in one line before anything is computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pymatgen.core import Composition

from equicsp_core import sampler
from equicsp_core.checkpoint import CheckpointError, load_model, read_checkpoint
from equicsp_core.cli import main
from equicsp_core.config import RunConfig, load_run_config
from equicsp_core.structure_files import read_structures
from equicsp_core.train import _check_resumable
from tests.test_cli import read_metrics, run_cli, train_tiny, without_timing
from tests.test_cli_refusals import error_line, never


@pytest.fixture(scope="module")
def generation_checkpoint(tmp_path_factory):
    """best.pt of a 2-epoch tiny perov_5 generation run."""
    run = tmp_path_factory.mktemp("generation") / "run"
    assert run_cli("train", "--preset", "tiny", "--task", "generation", "--out", run, "--set", "train.epochs=2",
                   "--set", "train.val_every=1") == 0
    return run / "best.pt"


@pytest.fixture
def fixed_cell_generator(monkeypatch):
    """Every generated crystal valid: the sampled types and coordinates in a 4 Å cubic cell (a 2-epoch model's
    lattices diverge, which would leave the CIF-writing path untested)."""
    real_sample = sampler.sample

    def sample(*args, **kwargs):
        result = real_sample(*args, **kwargs)
        result.batch.lengths = torch.full_like(result.batch.lengths, 4.0)
        result.batch.angles = torch.full_like(result.batch.angles, 90.0)
        return sampler.SampleResult(result.batch, torch.ones_like(result.finite))

    monkeypatch.setattr("equicsp_core.generate.sample", sample)


def test_train_task_generation_records_the_task_and_the_atom_counts(generation_checkpoint):
    """The run's config says task generation, its metrics carry the type terms, and the card the training
    distribution of atom counts (the perov_5 fixture: five atoms each)."""
    run = generation_checkpoint.parent
    assert yaml.safe_load((run / "config.yaml").read_text())["denoiser"]["task"] == "generation"
    assert all({"type", "perm_type"} <= set(record) for record in read_metrics(run))
    card = read_checkpoint(generation_checkpoint)["card"]
    counts = card["num_atoms_counts"]
    assert set(counts) == {"5"} and counts["5"] == card["rows"]["train"]
    model, _ = load_model(generation_checkpoint)
    assert model.task == "generation"


def test_resumed_generation_run_matches_uninterrupted_run(tmp_path):
    """1 epoch + resume to 3 gives the same metrics and bit-identical weights and generator as 3 straight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    task = ("denoiser.task=generation", "train.val_every=1")
    assert train_tiny(straight, "train.epochs=3", *task) == 0
    assert train_tiny(resumed, "train.epochs=1", *task) == 0
    assert train_tiny(resumed, "train.epochs=3", *task, resume=True) == 0
    assert without_timing(read_metrics(straight)) == without_timing(read_metrics(resumed))
    state_a = torch.load(straight / "resume.pt", weights_only=True)
    state_b = torch.load(resumed / "resume.pt", weights_only=True)
    assert "type_head.weight" in state_a["model"]
    for name in state_a["model"]:
        assert torch.equal(state_a["model"][name], state_b["model"][name]), name
    assert torch.equal(state_a["generator"], state_b["generator"])


def test_a_config_written_before_tasks_existed_still_resumes(tmp_path):
    """A saved config.yaml without the task and type-loss fields reads as a CSP run with their defaults."""
    config = load_run_config("tiny")
    saved = config.to_dict()
    del saved["denoiser"]["task"]
    del saved["diffusion"]["type_weight"], saved["diffusion"]["type_perm_weight"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resumable(config, tmp_path / "config.yaml")
    assert RunConfig.from_dict(saved).denoiser.task == "csp"
    assert load_model("perov_5")[0].task == "csp"  # a shipped checkpoint, saved before tasks existed


def test_generate_writes_the_requested_crystals_as_cifs(generation_checkpoint, tmp_path, fixed_cell_generator):
    """N crystals: index.json lists N valid entries, each CIF parses to the composition its entry names, and
    run.json marks the run complete; `equicsp relax` can read the folder."""
    out = tmp_path / "gen"
    assert run_cli("generate", "--checkpoint", generation_checkpoint, "--num-samples", 5, "--steps", 5,
                   "--batch-size", 2, "--out", out) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["task"] == "generation" and index["requested"] == 5 and index["step_lr"] == 1e-6  # perov_5's γ
    assert [entry["sample"] for entry in index["samples"]] == [0, 1, 2, 3, 4]
    assert all(entry["valid"] for entry in index["samples"])
    structures = read_structures(out)
    assert len(structures) == 5
    for entry in index["samples"]:
        structure = structures[entry["file"].removesuffix(".cif")]
        assert len(structure) == 5
        assert structure.composition == Composition(entry["cell_formula"])
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and run["written"] == run["valid"] == 5


def test_generate_is_reproducible_and_num_atoms_gives_the_sizes(generation_checkpoint, tmp_path):
    """The same seed gives the same index; --num-atoms 3 gives every crystal three atoms; --num-atoms 2
    --num-atoms 4 gives the crystals 2 and 4 atoms in turn."""
    def index(out, *extra):
        assert run_cli("generate", "--checkpoint", generation_checkpoint, "--num-samples", 3, "--steps", 4,
                       "--seed", 7, *extra, "--out", out) == 0
        return json.loads((out / "index.json").read_text())["samples"]

    assert index(tmp_path / "a") == index(tmp_path / "b")
    small = index(tmp_path / "c", "--num-atoms", 3)
    assert [Composition(entry["cell_formula"]).num_atoms for entry in small] == [3, 3, 3]
    mixed = index(tmp_path / "d", "--num-atoms", 2, "--num-atoms", 4)
    assert [Composition(entry["cell_formula"]).num_atoms for entry in mixed] == [2, 4, 2]


def test_generate_restricted_to_a_chemical_system_holds_only_its_elements(generation_checkpoint, tmp_path):
    """--element Sr --element Ti --element O: every crystal of 5 atoms is made of Sr, Ti and O only (the model,
    trained 2 epochs on perov_5's 56 elements, would otherwise draw any of them: the unrestricted run with the same
    seed holds others), and the setting is recorded in the index's header."""
    def elements(out, *extra):
        assert run_cli("generate", "--checkpoint", generation_checkpoint, "--num-samples", 8, "--steps", 4,
                       "--num-atoms", 5, "--seed", 3, *extra, "--out", out) == 0
        samples = json.loads((out / "index.json").read_text())["samples"]
        return {str(element) for entry in samples for element in Composition(entry["cell_formula"]).elements}

    assert elements(tmp_path / "system", "--element", "Sr", "--element", "Ti", "--element", "O") <= {"Sr", "Ti", "O"}
    assert not elements(tmp_path / "any") <= {"Sr", "Ti", "O"}
    assert json.loads((tmp_path / "system" / "index.json").read_text())["elements"] == ["Sr", "Ti", "O"]


def test_generate_input_file_gives_the_same_crystals_as_flags(generation_checkpoint, tmp_path):
    """``--input`` (the AiiDA job's way) with the flags' settings and ``threads`` gives the same index.json."""
    settings = {"num_samples": 3, "steps": 4, "seed": 5, "batch_size": 2, "threads": 1}
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(settings))
    assert run_cli("generate", "--checkpoint", generation_checkpoint, "--input", tmp_path / "in.yaml",
                   "--out", tmp_path / "a") == 0
    assert run_cli("generate", "--checkpoint", generation_checkpoint, "--num-samples", 3, "--steps", 4, "--seed", 5,
                   "--batch-size", 2, "--out", tmp_path / "b") == 0
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()
    assert json.loads((tmp_path / "a" / "run.json").read_text())["threads"] == 1


def test_generate_input_file_is_checked_and_not_mixed_with_flags(generation_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("equicsp_core.generate._generate_batches", never)
    (tmp_path / "in.yaml").write_text(yaml.safe_dump({"num_samples": 2, "num_atom": 5}))
    out = tmp_path / "out"
    assert run_cli("generate", "--checkpoint", generation_checkpoint, "--input", tmp_path / "in.yaml", "--steps", 4,
                   "--out", out) == 2
    assert error_line(capsys) == "equicsp generate: error: --input cannot be combined with --steps"
    assert run_cli("generate", "--checkpoint", generation_checkpoint, "--input", tmp_path / "in.yaml",
                   "--out", out) == 2
    assert error_line(capsys) == (f"equicsp generate: error: --input {tmp_path / 'in.yaml'}: unknown setting(s) "
                                  "num_atom; known: num_samples, num_atoms, elements, steps, step_lr, lattice_bound, "
                                  "seed, batch_size, device, threads")
    assert not out.exists()


def test_sample_refuses_a_generation_checkpoint_before_sampling(generation_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("equicsp_core.predict._sample_batches", never)
    out, status = tmp_path / "out", tmp_path / "status.json"
    assert main(["--quiet", "--status-file", str(status), "sample", "--checkpoint", str(generation_checkpoint),
                 "--formula", "SrTiO3", "--out", str(out)]) == 2
    assert error_line(capsys) == ("equicsp sample: error: the checkpoint is an ab initio generation model: it draws "
                                  "the atom types itself; use it with `equicsp generate`")
    assert json.loads(status.read_text())["failure"] == "unusable_checkpoint"
    assert not out.exists()


def test_predict_with_settings_refuses_a_generation_model_when_called(generation_checkpoint, monkeypatch):
    from equicsp_core.predict import predict_with_settings
    from equicsp_core.settings import SampleSettings

    monkeypatch.setattr("equicsp_core.predict._sample_batches", never)
    model, card = load_model(generation_checkpoint)
    with pytest.raises(CheckpointError, match="generation model"):
        predict_with_settings(model, card, SampleSettings(formulas=["SrTiO3"]))


def test_generate_refuses_a_csp_checkpoint_before_generating(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("equicsp_core.generate._generate_batches", never)
    out = tmp_path / "out"
    assert run_cli("generate", "--checkpoint", tiny_checkpoint, "--num-samples", 2, "--out", out) == 2
    assert error_line(capsys) == ("equicsp generate: error: the checkpoint is a structure prediction (CSP) model: it "
                                  "needs the atom types; use it with `equicsp sample`")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--num-atoms", 6], "num_atoms: 6 atoms, more than the 5 of the largest crystal the model was trained on"),
    (["--num-atoms", 3, "--num-atoms", 6], "num_atoms: 6 atoms, more than the 5 of the largest crystal the model "
                                           "was trained on"),
    (["--num-atoms", 0], "num_atoms: Input should be greater than or equal to 1, got 0"),
    (["--steps", 1001], "steps must be in 1..1000, got 1001"),
    (["--element", "Xx"], "elements: unknown element 'Xx'"),
    (["--element", "O", "--element", "O"], "elements: element 'O' given twice"),
    (["--element", "C", "--element", "O"], "elements: C is not among the elements of the perov_5 crystals the model "
                                           "was trained on"),
    ([], "num_samples: Field required"),
])
def test_bad_generate_input_is_one_line_and_leaves_nothing(generation_checkpoint, tmp_path, capsys, monkeypatch,
                                                           args, message):
    monkeypatch.setattr("equicsp_core.generate._generate_batches", never)
    out = tmp_path / "out"
    samples = [] if not args else ["--num-samples", 2]
    assert run_cli("generate", "--checkpoint", generation_checkpoint, *samples, *args, "--out", out) == 2
    assert error_line(capsys) == f"equicsp generate: error: {message}"
    assert not out.exists()


def test_evaluate_refuses_a_generation_checkpoint_before_sampling(generation_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("equicsp_core.evaluate.evaluate", never)
    assert run_cli("evaluate", "--checkpoint", generation_checkpoint, "--dataset", "perov_5", "--limit", 2) == 2
    assert "ab initio generation model" in error_line(capsys)


def test_a_generation_card_shows_each_report_with_its_sampling_settings(generation_checkpoint, tmp_path,
                                                                      fixed_cell_generator):
    """The card of a generation model (scripts/ship_checkpoint.py) has the §9.3 table, one row per report with the
    steps, γ and seeds of the folders it scored; `equicsp info` lists the same figures."""
    import runpy

    from equicsp_core.checkpoint import _figure

    for seed in (0, 1):
        assert run_cli("generate", "--checkpoint", generation_checkpoint, "--num-samples", "3", "--steps", "4",
                       "--seed", seed, "--out", tmp_path / f"gen{seed}") == 0
    out = tmp_path / "metrics.json"
    assert main(["--quiet", "evaluate-generation", "--generated", str(tmp_path / "gen0"), str(tmp_path / "gen1"),
                 "--dataset", "perov_5", "--num-eval", "1", "--energy", "none", "--processes", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    payload = read_checkpoint(generation_checkpoint)
    payload["card"]["evaluations"] = [report]
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "ship_checkpoint.py"))
    markdown = script["card_markdown"]("tiny-gen", payload, "Here.", "0" * 64)
    assert "## Scores (ab initio generation, `equicsp evaluate-generation`)" in markdown
    assert "## Scores (CSP" not in markdown
    row = (f"| test | 6 | 4 | {report['generated_with'][0]['step_lr']} | 7.0 | 0, 1 | "
           f"{report['structural_validity']:.2f} / {report['compositional_validity']:.2f} | ")
    assert row in markdown and "Here." in markdown
    figure = _figure(report)
    assert (figure["generated"], figure["steps"], figure["cov_recall"]) == (6, [4], report["cov_recall"])
