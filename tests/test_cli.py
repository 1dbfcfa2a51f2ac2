"""The ``equicsp`` command, run in-process on the tiny data fixtures (EQUICSP_DATA_DIR set in conftest)."""

import importlib.metadata
import json

import pytest
import torch

from equicsp_core import sampler
from equicsp_core.checkpoint import epochs_in_all, read_checkpoint
from equicsp_core.cli import main
from equicsp_core.config import load_run_config, preset_names
from equicsp_core.data import DATASETS
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.sampler import LATTICE_X0_BOUND

TIMING_FIELDS = {"seconds", "crystals_per_s"}


def run_cli(*args) -> int:
    return main(["--quiet", *map(str, args)])


def train_tiny(out, *overrides, resume=False) -> int:
    sets = [item for override in overrides for item in ("--set", override)]
    return run_cli("train", "--preset", "tiny", "--out", out, *sets, *(["--resume"] if resume else []))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in records]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.pt of a 2-epoch tiny perov_5 run, shared by the sample/info tests."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train_tiny(run, "train.epochs=2", "train.val_every=1") == 0
    return run / "best.pt"


@pytest.fixture
def fixed_cell_sampler(monkeypatch):
    """Make every sample valid: keep the sampled coordinates, put them in a 4 Å cubic cell.

    A 2-epoch model's lattices diverge, so without this every candidate would be invalid and the
    CIF-writing path would go untested.
    """
    real_sample = sampler.sample

    def sample(*args, **kwargs):
        result = real_sample(*args, **kwargs)
        batch = result.batch
        batch.lengths = torch.full_like(batch.lengths, 4.0)
        batch.angles = torch.full_like(batch.angles, 90.0)
        return sampler.SampleResult(batch, torch.ones_like(result.finite))

    monkeypatch.setattr("equicsp_core.predict.sample", sample)


def sample_cli(checkpoint, out, seed=1) -> int:
    return run_cli("sample", "--checkpoint", checkpoint, "--formula", "SrTiO3", "--formula", "CaTiO3",
                   "--num-samples", 2, "--steps", 5, "--seed", seed, "--out", out)


def cif_texts(out) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(out.glob("*.cif"))}


# ------------------------------------------------------------------------------------------------
# train


def test_train_writes_run_folder(tmp_path):
    """A 2-epoch tiny run exits 0 and writes config, 2 metric lines, resume.pt and best.pt."""
    run = tmp_path / "run"
    assert train_tiny(run, "train.epochs=2", "train.val_every=1") == 0
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "resume.pt", "best.pt"}
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all("loss" in r and "val_loss" in r for r in records)
    card = read_checkpoint(run / "best.pt")["card"]
    assert card["dataset"] == "perov_5"
    assert card["protocol"].startswith("the papers' protocol: trained on train")
    assert set(card["data_sha256"]) == {"train", "val"}


def test_train_on_dataset_without_train_split_uses_the_data_protocol(tmp_path):
    """mp_20 (no train file) trains on val less 10 % + the unreserved test rows; the card says so."""
    run = tmp_path / "run"
    assert train_tiny(run, "dataset=mp_20", "train.epochs=1") == 0
    card = read_checkpoint(run / "best.pt")["card"]
    assert card["dataset"] == "mp_20"
    assert card["protocol"].startswith("trained on val + the unreserved test rows (27 val + 8 test rows)")
    assert "selected on 3 held-out val rows" in card["protocol"]
    assert card["rows"] == {"train": 35, "selection": 3}
    assert set(card["data_sha256"]) == {"val", "test"}
    assert len(card["reserved_rows_sha256"]) == 64


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    """2 epochs + resume to 4 gives the same metrics and bit-identical weights as 4 epochs straight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_tiny(straight, "train.epochs=4", "train.val_every=1") == 0
    assert train_tiny(resumed, "train.epochs=2", "train.val_every=1") == 0
    assert train_tiny(resumed, "train.epochs=4", "train.val_every=1", resume=True) == 0

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert without_timing(a) == without_timing(b)
    state_a = torch.load(straight / "resume.pt", weights_only=True)
    state_b = torch.load(resumed / "resume.pt", weights_only=True)
    assert state_a["model"].keys() == state_b["model"].keys()
    for name in state_a["model"]:
        assert torch.equal(state_a["model"][name], state_b["model"][name]), name
    assert torch.equal(state_a["generator"], state_b["generator"])


def test_train_into_existing_run_without_resume_fails(tmp_path, capsys):
    """Training into a folder that holds a run, without --resume, exits 2 and leaves the run alone."""
    run = tmp_path / "run"
    assert train_tiny(run, "train.epochs=1") == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train_tiny(run, "train.epochs=2") == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_of_empty_folder_fails(tmp_path, capsys):
    """--resume on a folder without resume.pt exits 2 and says there is nothing to resume."""
    (tmp_path / "empty").mkdir()
    assert train_tiny(tmp_path / "empty", resume=True) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def test_resume_with_changed_config_fails(tmp_path, capsys):
    """Resuming with a setting other than train.epochs changed exits 2."""
    run = tmp_path / "run"
    assert train_tiny(run, "train.epochs=1") == 0
    capsys.readouterr()
    assert train_tiny(run, "train.epochs=2", "train.lr=0.002", resume=True) == 2
    assert "config differs" in capsys.readouterr().err
    assert len(read_metrics(run)) == 1


def test_resumed_run_with_weight_average_matches_uninterrupted_run(tmp_path):
    """With an EMA of the weights, 1 epoch + resume to 3 equals 3 epochs straight, average included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ema = "train.ema_decay=0.9"
    assert train_tiny(straight, "train.epochs=3", "train.val_every=1", ema) == 0
    assert train_tiny(resumed, "train.epochs=1", "train.val_every=1", ema) == 0
    assert train_tiny(resumed, "train.epochs=3", "train.val_every=1", ema, resume=True) == 0
    assert without_timing(read_metrics(straight)) == without_timing(read_metrics(resumed))
    state_a = torch.load(straight / "resume.pt", weights_only=True)
    state_b = torch.load(resumed / "resume.pt", weights_only=True)
    for key in state_a["ema"]:
        assert torch.equal(state_a["ema"][key], state_b["ema"][key]), key


def test_weight_average_is_what_is_validated_and_saved(tmp_path):
    """With an EMA, metrics carry the raw and the averaged validation loss, and best.pt holds the average.

    The fixture's 24 crystals are one step per epoch, averaged into the initial weights at decay 0.5.
    """
    run = tmp_path / "run"
    assert train_tiny(run, "train.epochs=2", "train.val_every=2", "train.ema_decay=0.5") == 0
    record = read_metrics(run)[-1]
    assert record["val_loss"] != record["val_loss_raw"]
    state = torch.load(run / "resume.pt", weights_only=True)
    best = read_checkpoint(run / "best.pt")["state_dict"]
    for key, value in best.items():
        assert torch.equal(value, state["ema"][f"module.{key}"]), key
    assert any(not torch.equal(value, state["model"][key]) for key, value in best.items())


def test_weight_average_starts_at_the_initial_weights():
    """The EMA's first update averages the new weights into the starting ones (decay 0.9: 0.9 · start + 0.1 · new),
    rather than copying the new ones, as ``AveragedModel`` does on its own: a run continued from trained weights
    keeps averaging from them, not from the weights after one step of fresh Adam moments."""
    from equicsp_core.config import load_run_config
    from equicsp_core.train import _averaged

    config = load_run_config("tiny", [])
    model = CrystalDiffusion(config.denoiser, config.diffusion)
    start = {key: value.clone() for key, value in model.net.state_dict().items()}
    ema = _averaged(model, 0.9)
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.add_(1.0)
    ema.update_parameters(model.net)
    for name, parameter in model.net.named_parameters():
        torch.testing.assert_close(ema.module.state_dict()[name], 0.9 * start[name] + 0.1 * parameter.detach())


def test_non_finite_learning_rate_is_refused(tmp_path, capsys):
    """train.lr=.inf is refused before anything is written, naming train.lr."""
    assert train_tiny(tmp_path / "run", "train.lr=.inf") == 2
    assert "train.lr must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_diverged_training_stops_and_keeps_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    """An epoch in which every loss is non-finite exits 2 with one line; the run folder keeps epoch 1."""
    run = tmp_path / "run"
    assert train_tiny(run, "train.epochs=1") == 0
    real_loss = CrystalDiffusion.loss

    def nan_loss(self, *args, **kwargs):
        terms = real_loss(self, *args, **kwargs)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(CrystalDiffusion, "loss", nan_loss)
    capsys.readouterr()
    assert train_tiny(run, "train.epochs=2", resume=True) == 2
    error = capsys.readouterr().err
    assert "training diverged in epoch 2" in error and "keeps epoch 1" in error
    assert torch.load(run / "resume.pt", weights_only=True)["progress"]["epoch"] == 1
    assert len(read_metrics(run)) == 1


def test_init_from_run_folder_loads_its_weights_and_optimiser(tmp_path):
    """A new run started from a run folder begins with that run's weights and Adam moments, at its own lr."""
    from equicsp_core.config import load_run_config
    from equicsp_core.train import initial_state

    source = tmp_path / "source"
    assert train_tiny(source, "train.epochs=1") == 0
    config = load_run_config("tiny", ["train.lr=0.0005"])
    model = CrystalDiffusion(config.denoiser, config.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    started = initial_state(source, model, optimizer)
    assert started == {"source": str(source), "epoch": 1, "epochs_in_all": 1, "optimizer": True}
    saved = torch.load(source / "resume.pt", weights_only=True)
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert optimizer.param_groups[0]["lr"] == 0.0005
    assert len(optimizer.state_dict()["state"]) == len(saved["optimizer"]["state"])


def test_init_from_records_the_start_in_the_card(tmp_path):
    source, run = tmp_path / "source", tmp_path / "run"
    assert train_tiny(source, "train.epochs=1") == 0
    assert run_cli("train", "--preset", "tiny", "--out", run, "--set", "train.epochs=1", "--init-from", source) == 0
    card = read_checkpoint(run / "best.pt")["card"]
    assert card["initialised_from"] == {"source": str(source), "epoch": 1, "epochs_in_all": 1, "optimizer": True}
    assert card["epochs_in_all"] == 2


def test_epochs_in_all_add_up_over_a_chain_of_continued_runs(tmp_path):
    """run folder (2 epochs) -> its checkpoint continued (1) -> that checkpoint continued (1): 4 epochs behind the
    weights, while each card's ``epochs`` counts its own run; a card written before the total (no
    ``epochs_in_all`` in its start) counts the start's own epochs."""
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    assert train_tiny(first, "train.epochs=2") == 0
    assert run_cli("train", "--preset", "tiny", "--out", second, "--set", "train.epochs=1", "--init-from", first) == 0
    assert run_cli("train", "--preset", "tiny", "--out", third, "--set", "train.epochs=1",
                   "--init-from", second / "best.pt") == 0
    card = read_checkpoint(third / "best.pt")["card"]
    assert (card["epochs"], card["initialised_from"]["epoch"], card["epochs_in_all"]) == (1, 1, 4)
    assert epochs_in_all({"epochs": 320, "initialised_from": {"source": "carbon_24", "epoch": 320}}) == 640
    assert epochs_in_all({"epochs": 7}) == 7


def test_init_from_a_differently_sized_model_is_refused(tmp_path, capsys):
    source = tmp_path / "source"
    assert train_tiny(source, "train.epochs=1") == 0
    capsys.readouterr()
    assert run_cli("train", "--preset", "tiny", "--out", tmp_path / "run", "--set", "denoiser.hidden_dim=16",
                   "--init-from", source) == 2
    assert "its denoiser" in capsys.readouterr().err


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_names_its_dataset(preset):
    """Each shipped preset is a valid run config, and one named after a dataset (``mpts_52-cpu``) trains on it."""
    config = load_run_config(preset)
    named = preset.split("-")[0]
    assert config.dataset == named or named not in DATASETS


def test_cpu_presets_share_the_shipped_cpu_network():
    """The CPU-sized presets of the protocol's datasets use the shipped mp_20 network, bf16 and the weight average."""
    reference = load_run_config("mp_20-cpu")
    for preset in ("carbon_24-cpu", "mpts_52-cpu"):
        config = load_run_config(preset)
        sizes = [(c.denoiser.hidden_dim, c.denoiser.num_layers, c.denoiser.num_freqs) for c in (config, reference)]
        assert sizes[0] == sizes[1]
        assert (config.train.precision, config.train.ema_decay) == (reference.train.precision, reference.train.ema_decay)
    assert load_run_config("mpts_52-cpu").denoiser.crystal_mean_heads  # the papers' cspnet_v3 heads for mpts_52


@pytest.mark.parametrize(
    "args, named",
    [
        (["--preset", "tiny", "--dataset", "perov_6"], "perov_6"),
        (["--preset", "tiny", "--set", "dataset=perov_6"], "perov_6"),
        (["--preset", "no_such_preset"], "no_such_preset"),
        (["--dataset", "no_such_dataset"], "no_such_dataset"),
        (["--preset", "tiny", "--set", "train.no_such_field=1"], "no_such_field"),
        (["--preset", "tiny", "--set", "no_such_section.epochs=1"], "no_such_section"),
        (["--preset", "tiny", "--set", "train.epochs.deep=1"], "train.epochs.deep"),
        (["--preset", "tiny", "--set", "train.epochs"], "train.epochs"),
        (["--preset", "tiny", "--set", "train.epochs=0"], "train.epochs"),
        (["--preset", "tiny", "--set", "dataset=carbon_24"], "carbon_24"),
        (["--preset", "tiny", "--max-minutes", "0"], "--max-minutes"),
    ],
)
def test_bad_train_input_exits_2_naming_the_problem(tmp_path, capsys, args, named):
    """A bad preset, dataset or override exits 2 with one error line naming it, and creates no run folder."""
    out = tmp_path / "run"
    assert run_cli("train", *args, "--out", out) == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# info


def test_info_prints_card_as_json(checkpoint, capsys):
    """`info CKPT` exits 0 and prints JSON with the model card and the parameter count."""
    capsys.readouterr()
    assert run_cli("info", checkpoint) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["card"]["dataset"] == "perov_5"
    assert info["card"]["epochs"] in (1, 2)
    assert info["parameters"] > 0
    assert info["denoiser"]["hidden_dim"] == 32


def test_info_without_checkpoint_lists_every_shipped_model(capsys):
    """`info` alone lists every shipped checkpoint with its dataset, data protocol and reported figures."""
    from equicsp_core.checkpoint import read_checkpoint, shipped_checkpoints

    capsys.readouterr()
    assert run_cli("info") == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(shipped_checkpoints()) and listed
    for name, entry in listed.items():
        payload = read_checkpoint(name)
        card = payload["card"]
        assert (entry["dataset"], entry["protocol"], entry["epochs"]) == (card["dataset"], card["protocol"], card["epochs"])
        assert entry["task"] == payload["denoiser"].get("task", "csp")
        figure_key, size_key = ("cov_recall", "generated") if entry["task"] == "generation" else ("match_rate", "crystals")
        assert [figure[figure_key] for figure in entry["figures"]] == [e[figure_key] for e in card["evaluations"]]
        assert entry["figures"] and all(figure["split"] and figure[size_key] for figure in entry["figures"])
        stored = {str(tensor.dtype).removeprefix("torch.") for tensor in read_checkpoint(name)["state_dict"].values()
                  if tensor.is_floating_point()}
        assert entry["stored_dtype"] in stored  # float16: the parameters; the buffers stay float32


def strict_json(text: str):
    """``text`` parsed as strict JSON: Python's ``Infinity``/``NaN`` constants are refused."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_info_lists_the_papers_unbounded_lattice_update_as_strict_json(capsys):
    """The shipped cards' papers'-protocol rows (lattice bound ``inf``) are listed as the text ``"inf"``."""
    capsys.readouterr()
    assert run_cli("info") == 0
    bounds = {figure["lattice_bound"] for entry in strict_json(capsys.readouterr().out) if entry["task"] == "csp"
              for figure in entry["figures"]}
    assert "inf" in bounds and all(bound == "inf" or float(bound) > 0 for bound in bounds)


def test_info_of_non_checkpoint_exits_2(tmp_path):
    """`info` on a file that is not a checkpoint exits 2."""
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert run_cli("info", bogus) == 2


# ------------------------------------------------------------------------------------------------
# sample


def test_sample_writes_index_with_one_entry_per_sample(checkpoint, tmp_path):
    """Two formulas x two samples give 4 index entries; valid ones have a CIF file, invalid ones none."""
    out = tmp_path / "out"
    assert sample_cli(checkpoint, out) == 0
    index = json.loads((out / "index.json").read_text())
    entries = index["samples"]
    assert [(e["formula"], e["sample"]) for e in entries] == [("SrTiO3", 0), ("SrTiO3", 1), ("CaTiO3", 0), ("CaTiO3", 1)]
    assert all(set(e) == {"formula", "sample", "formula_units", "cell_formula", "valid", "file"} for e in entries)
    # the test model's domain (perov_5) holds 5 atoms: SrTiO3 fits only at Z = 1
    assert {(e["formula_units"], e["cell_formula"]) for e in entries} == {(1, "SrTiO3"), (1, "CaTiO3")}
    assert index["steps"] == 5 and index["seed"] == 1
    run = strict_json((out / "run.json").read_text())
    assert index["lattice_bound"] == run["lattice_bound"] == LATTICE_X0_BOUND["equicsp"]  # the mode's, unset
    for entry in entries:
        assert (entry["file"] is not None) == entry["valid"]
        if entry["file"] is not None:
            assert (out / entry["file"]).is_file()
    listed = {e["file"] for e in entries if e["file"]}
    assert {p.name for p in out.iterdir()} == listed | {"index.json", "run.json"}


def test_sample_writes_parsable_cifs_for_valid_samples(checkpoint, tmp_path, fixed_cell_sampler):
    """Valid samples are written as CIF files that parse back to the requested composition."""
    from pymatgen.core import Composition, Structure

    out = tmp_path / "out"
    assert sample_cli(checkpoint, out) == 0
    entries = json.loads((out / "index.json").read_text())["samples"]
    assert all(e["valid"] for e in entries)
    assert len({e["file"] for e in entries}) == 4
    for entry in entries:
        structure = Structure.from_file(out / entry["file"])
        assert structure.composition == Composition(entry["formula"])
        assert structure.lattice.abc == pytest.approx((4.0, 4.0, 4.0))


def test_a_sample_whose_cif_pymatgen_cannot_read_back_is_written_as_invalid(checkpoint, tmp_path, monkeypatch,
                                                                          fixed_cell_sampler, caplog, recwarn):
    """A crystal with every atom on one point passes the engine's checks, but its CIF parses to no structure (the
    sites merge to occupancy 5): it is listed invalid with no file, and said so once, in one line (none of the
    parser's own warnings), so that every listed file reads."""
    import logging

    from pymatgen.core import Structure

    from equicsp_core import predict

    cell_sample = predict.sample  # the fixed-cell sampler

    def collapsed_first(*args, **kwargs):
        result = cell_sample(*args, **kwargs)
        first = (result.batch.batch == 0)[:, None]
        result.batch.frac_coords = torch.where(first, 0.5, result.batch.frac_coords)
        return result

    monkeypatch.setattr("equicsp_core.predict.sample", collapsed_first)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="equicsp_core.cli"):
        assert sample_cli(checkpoint, out) == 0
    entries = json.loads((out / "index.json").read_text())["samples"]
    assert [e["valid"] for e in entries] == [False, True, True, True] and entries[0]["file"] is None
    assert not (out / "SrTiO3_000.cif").exists()
    assert all(len(Structure.from_file(out / e["file"])) == 5 for e in entries[1:])
    assert "SrTiO3 sample 0 (SrTiO3): pymatgen cannot read its CIF back" in caplog.text
    assert not [w for w in recwarn if w.filename.endswith("cif.py")], [str(w.message) for w in recwarn]
    assert strict_json((out / "run.json").read_text())["valid"] == 3


def test_sample_spreads_a_reduced_formula_over_z_and_keeps_an_explicit_cell(checkpoint, tmp_path, fixed_cell_sampler):
    """Si (reduced) with --max-formula-units 3: samples 0..4 at Z = 1, 2, 3, 1, 2 (the even spread: the test model is
    of perov_5, whose prior holds no 1-atom formula unit), each CIF holding its cell;
    O2 (written with Z = 2) is that cell only. Z and the cell are in index.json."""
    from pymatgen.core import Composition, Structure

    out = tmp_path / "out"
    assert run_cli("sample", "--checkpoint", checkpoint, "--formula", "Si", "--formula", "O2", "--num-samples", 5,
                   "--max-formula-units", 3, "--steps", 2, "--out", out) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["max_formula_units"] == 3 and index["requested"] == 10
    entries = index["samples"]
    assert [(e["formula"], e["sample"], e["formula_units"], e["cell_formula"]) for e in entries] == [
        ("Si", 0, 1, "Si"), ("Si", 1, 2, "Si2"), ("Si", 2, 3, "Si3"), ("Si", 3, 1, "Si"), ("Si", 4, 2, "Si2"),
        *[("O2", sample, 2, "O2") for sample in range(5)]]
    for entry in entries:
        assert entry["file"] == f"{entry['formula']}_{entry['sample']:03d}.cif"
        assert Structure.from_file(out / entry["file"]).composition == Composition(entry["cell_formula"])


def test_sample_same_seed_is_reproducible(checkpoint, tmp_path):
    """Sampling twice with the same seed gives identical index.json files."""
    assert sample_cli(checkpoint, tmp_path / "a") == 0
    assert sample_cli(checkpoint, tmp_path / "b") == 0
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()


def test_sample_same_seed_gives_identical_cifs(checkpoint, tmp_path, fixed_cell_sampler):
    """Same seed: identical index and CIF texts; another seed: different CIF texts."""
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert sample_cli(checkpoint, tmp_path / name, seed=seed) == 0
    a, b, c = (cif_texts(tmp_path / name) for name in "abc")
    assert len(a) == 4
    assert a == b
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def _random_bytes_checkpoint(tmp_path, good):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    return path


def _unmarked_checkpoint(tmp_path, good):
    path = tmp_path / "unmarked.pt"
    payload = torch.load(good, weights_only=True)
    del payload["format"]
    torch.save(payload, path)
    return path


def _plain_dict_checkpoint(tmp_path, good):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(3)}, path)
    return path


BAD_SAMPLE_INPUTS = {
    "random bytes checkpoint": (_random_bytes_checkpoint, [], "not a readable checkpoint"),
    "checkpoint without marker": (_unmarked_checkpoint, [], "marker"),
    "plain dict checkpoint": (_plain_dict_checkpoint, [], "marker"),
    "unknown checkpoint name": (lambda tmp_path, good: "no_such_model", [], "no_such_model"),
    "unknown element": (None, ["--formula", "Xx2O3"], "Xx2O3"),
    "too many atoms": (None, ["--formula", "C60"], "C60"),
    "fractional formula": (None, ["--formula", "Fe0.5O"], "Fe0.5O"),
    "zero steps": (None, ["--steps", "0"], "steps"),
    "more steps than T": (None, ["--steps", "1001"], "steps"),
    "zero samples": (None, ["--num-samples", "0"], "num_samples"),
    "zero formula units": (None, ["--max-formula-units", "0"], "max_formula_units"),
    "a reduced formula no cell of which fits": (None, ["--formula", "SrTiO4"], "'SrTiO4' is outside the model's "
                                                "training domain (6 atoms, more than the 5 of perov_5)"),
}


@pytest.mark.parametrize("name", list(BAD_SAMPLE_INPUTS))
def test_bad_sample_input_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys, name):
    """Bad checkpoints, formulas or settings exit 2, name the problem, and leave no output folder."""
    make_checkpoint, extra, named = BAD_SAMPLE_INPUTS[name]
    ckpt = make_checkpoint(tmp_path, checkpoint) if make_checkpoint else checkpoint
    out = tmp_path / "out"
    capsys.readouterr()
    code = run_cli("sample", "--checkpoint", ckpt, "--formula", "SrTiO3", "--num-samples", 1, "--steps", 2,
                   *extra, "--out", out)
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err
    assert not out.exists()
    assert not list(tmp_path.glob(".equicsp-*"))


# ------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_writes_a_report(checkpoint, tmp_path, capsys):
    """`evaluate` on 4 fixture crystals writes a JSON report with the protocol's fields."""
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--limit", 4, "--steps", 3,
                   "--processes", 1, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["crystals"] == 4 and report["total"] == 4 and report["num_samples"] == 1
    assert 0 <= report["match_rate"] <= 100 and report["steps"] == 3
    assert {"torch", "pymatgen", "smact"} <= set(report["versions"])
    assert report["versions"]["pymatgen"] == importlib.metadata.version("pymatgen")  # the installed release
    matched = [rms for rms in report["per_crystal_rms"] if rms is not None]
    assert len(report["per_crystal_rms"]) == 4 and len(matched) == report["matched"]
    assert report["rmse"] == (pytest.approx(sum(matched) / len(matched)) if matched else None)


def test_evaluate_reports_of_two_parts_merge_into_one(checkpoint, tmp_path):
    """Rows 0-1 and 2-3 evaluated apart (--indices) merge into one report of 4 crystals: counts summed, rows and RMS
    distances concatenated, match rate and RMSE recomputed; overlapping rows or other settings are refused."""
    import runpy
    from pathlib import Path

    from equicsp_core.evaluate import merge_reports

    parts = []
    for name, rows in (("a", "0 1"), ("b", "2 3")):
        (tmp_path / f"{name}.txt").write_text(rows)
        assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--indices",
                       tmp_path / f"{name}.txt", "--steps", 3, "--processes", 1, "--out", tmp_path / f"{name}.json") == 0
        parts.append(json.loads((tmp_path / f"{name}.json").read_text()))
    merged = merge_reports(parts)
    rms = parts[0]["per_crystal_rms"] + parts[1]["per_crystal_rms"]
    matched = [value for value in rms if value is not None]
    assert (merged["crystals"], merged["total"], merged["parts"]) == (4, 4, 2)
    assert merged["per_crystal_rms"] == rms and merged["rows"] == parts[0]["rows"] + parts[1]["rows"]
    assert merged["matched"] == len(matched) and merged["match_rate"] == pytest.approx(100 * len(matched) / 4)
    assert merged["rmse"] == (pytest.approx(sum(matched) / len(matched)) if matched else None)
    assert merged["valid_predictions"] == parts[0]["valid_predictions"] + parts[1]["valid_predictions"]
    assert merged["steps"] == 3 and merged["checkpoint"] == parts[0]["checkpoint"]
    with pytest.raises(ValueError, match="share rows"):
        merge_reports([parts[0], parts[0]])
    with pytest.raises(ValueError, match="report 2 differs in steps"):
        merge_reports([parts[0], {**parts[1], "steps": 1000}])
    with pytest.raises(ValueError, match="ran without --indices"):
        merge_reports([parts[0], {**parts[1], "rows": None}])
    weights = parts[0]["checkpoint"]["model_sha256"]
    assert weights == read_checkpoint(checkpoint)["model_sha256"]
    copy = {**parts[1], "checkpoint": {**parts[1]["checkpoint"], "path": "/elsewhere/same_weights.pt"}}
    assert merge_reports([parts[0], copy])["crystals"] == 4  # the same weights by another path
    (tmp_path / "c.txt").write_text("4")
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--indices", tmp_path / "c.txt",
                   "--steps", 3, "--processes", 1, "--out", tmp_path / "c.json") == 0
    grown = merge_reports([merged, json.loads((tmp_path / "c.json").read_text())])  # a merged report grows by a part
    assert (grown["crystals"], grown["parts"]) == (5, 3) and grown["rows"][:4] == merged["rows"]
    with pytest.raises(ValueError, match="report 2 differs in checkpoint"):
        merge_reports([parts[0], {**parts[1], "checkpoint": {**parts[1]["checkpoint"], "model_sha256": "0" * 64}}])
    card = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "ship_checkpoint.py"))["protocol_of"]
    assert card(merged) == "project"  # a merged report is a card row like any other


def test_an_unbounded_evaluation_reports_inf_as_text_and_merges_with_an_older_infinity(checkpoint, tmp_path):
    """``--lattice-bound inf`` (the papers' update) is reported as ``"inf"`` (strict JSON), and such a report merges
    with a part written before, whose bound Python wrote as ``Infinity``; another bound is still refused."""
    from equicsp_core.evaluate import merge_reports

    parts = []
    for name, rows in (("a", "0"), ("b", "1")):
        (tmp_path / f"{name}.txt").write_text(rows)
        assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--indices",
                       tmp_path / f"{name}.txt", "--steps", 3, "--lattice-bound", "inf", "--processes", 1,
                       "--out", tmp_path / f"{name}.json") == 0
        parts.append(strict_json((tmp_path / f"{name}.json").read_text()))
    assert parts[0]["lattice_bound"] == "inf"
    older = json.loads(json.dumps({**parts[1], "lattice_bound": float("inf")}))  # written as Infinity, read back
    assert merge_reports([parts[0], older])["crystals"] == 2
    with pytest.raises(ValueError, match="report 2 differs in lattice_bound"):
        merge_reports([parts[0], {**parts[1], "lattice_bound": 7.0}])


def test_evaluate_refuses_training_rows(checkpoint, capsys):
    """mp_20's test file holds training rows under the data protocol: refused, naming the split to use."""
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "mp_20", "--split", "test",
                   "--steps", 2, "--processes", 1) == 2
    assert "training rows of mp_20 under the data protocol" in capsys.readouterr().err


def test_evaluate_defaults_to_the_reserved_rows(checkpoint, tmp_path):
    """Without --split, mp_20 is evaluated on its reserved rows (2 in the fixture)."""
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "mp_20", "--steps", 2, "--processes", 1,
                   "--out", out) == 0
    report = json.loads(out.read_text())
    assert (report["split"], report["crystals"]) == ("reserved", 2)


def test_evaluate_symmetrised_reports_it(checkpoint, tmp_path):
    """--symmetrise samples with the six-ordering average and says so in the report."""
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--limit", 2, "--steps", 2,
                   "--symmetrise", "--processes", 1, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["symmetrised"] is True and report["crystals"] == 2


def test_evaluate_refuses_repeated_indices(checkpoint, tmp_path, capsys):
    indices = tmp_path / "rows.txt"
    indices.write_text("0 0 0")
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--indices", indices,
                   "--steps", 2, "--processes", 1) == 2
    assert "indices repeated (each crystal counts once): [0]" in capsys.readouterr().err


def test_evaluate_refuses_an_unwritable_report_before_sampling(checkpoint, tmp_path, capsys):
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--limit", 1, "--steps", 2,
                   "--out", tmp_path / "missing" / "eval.json") == 2
    assert "cannot be written" in capsys.readouterr().err


def test_evaluate_with_explicit_indices(checkpoint, tmp_path):
    """An index file selects rows; the report lists them."""
    indices = tmp_path / "rows.txt"
    indices.write_text("3, 1\n7")
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", "--checkpoint", checkpoint, "--dataset", "perov_5", "--indices", indices,
                   "--steps", 2, "--processes", 1, "--out", out) == 0
    assert json.loads(out.read_text())["rows"] == [["test", 3], ["test", 1], ["test", 7]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dataset", "nope"), "unknown dataset"),
        (("--dataset", "perov_5", "--num-samples", 0), "num_samples"),
        (("--dataset", "perov_5", "--steps", 0), "steps"),
        (("--dataset", "perov_5", "--limit", 0), "limit"),
    ],
)
def test_evaluate_bad_input(checkpoint, tmp_path, capsys, args, message):
    """Bad evaluation settings exit 2 with a message naming the problem and write no report."""
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", "--checkpoint", checkpoint, *args, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
