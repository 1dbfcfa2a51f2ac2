"""Every model is the one it claims to be: pinned shipped files, the model hash, finite weights that fit their
config, names that are never files, and ``torch.load(weights_only=True)`` everywhere."""

from __future__ import annotations

import ast
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from equicsp_core import checkpoint as checkpoint_module
from equicsp_core.checkpoint import (
    FORMAT,
    SHIPPED_DIR,
    CheckpointError,
    add_model_hash,
    file_sha256,
    load_model,
    model_sha256,
    read_checkpoint,
    resolve_checkpoint,
    shipped_checkpoints,
)
from equicsp_core.checkpoint_pins import SHIPPED_SHA256
from equicsp_core.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_checkpoint_matches_its_pin_and_card():
    """Each shipped .pt has a pin equal to its file's sha256, each pin a file, each card the same hash."""
    shipped = shipped_checkpoints()
    assert set(shipped) == set(SHIPPED_SHA256) == {"perov_5", "mp_20", "carbon_24", "perov_5-gen"}
    for name, path in shipped.items():
        sha256 = file_sha256(path)
        assert sha256 == SHIPPED_SHA256[name], f"{name}: update equicsp_core/checkpoint_pins.py"
        payload = read_checkpoint(name)
        card = (SHIPPED_DIR / f"{name}.md").read_text()
        assert f"file sha256: `{sha256}`" in card and f"model sha256 (configs and weights): " \
            f"`{payload['model_sha256']}`" in card


def test_a_shipped_file_that_is_not_the_pinned_one_is_refused(monkeypatch):
    monkeypatch.setitem(checkpoint_module.SHIPPED_SHA256, "perov_5", "0" * 64)
    with pytest.raises(CheckpointError, match=r"shipped checkpoint 'perov_5' .* has sha256 [0-9a-f]{64}, not the "
                                              r"pinned 0{64}: the file is damaged or was replaced"):
        load_model("perov_5")
    with pytest.raises(CheckpointError, match="not the pinned"):  # the same file by path
        read_checkpoint(SHIPPED_DIR / "perov_5.pt")


def storage_offset(path: Path) -> tuple[int, int]:
    """``(offset, size)`` in bytes of the largest tensor storage inside a ``torch.save`` zip file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


@pytest.mark.parametrize(("byte", "bit", "what"), [(3, 6, "exponent"), (0, 0, "lowest mantissa")])
def test_a_copy_with_one_flipped_bit_is_refused_by_path(tmp_path, byte, bit, what):
    """One bit of one float32 weight of a copy of perov_5, flipped in the file: refused as damaged."""
    copy = tmp_path / "perov_5_copy.pt"
    shutil.copyfile(SHIPPED_DIR / "perov_5.pt", copy)
    offset, size = storage_offset(copy)
    position = offset + (size // 8) * 4 + byte  # a float32 in the middle of the largest weight
    data = bytearray(copy.read_bytes())
    data[position] ^= 1 << bit
    copy.write_bytes(bytes(data))
    changed = torch.load(copy, weights_only=True)["state_dict"]
    original = read_checkpoint("perov_5")["state_dict"]
    assert sum(not torch.equal(changed[k], original[k]) for k in original) == 1, f"{what} bit did not land"
    with pytest.raises(CheckpointError, match=r"perov_5_copy.pt is damaged: its weights or configs do not match"):
        load_model(copy)
    assert main(["--quiet", "info", str(copy)]) == 2


def rewritten(source: Path, target: Path, change) -> Path:
    """A copy of ``source`` whose payload ``change`` edited, with a model hash that matches the edit."""
    payload = torch.load(source, weights_only=True)
    change(payload)
    payload["model_sha256"] = model_sha256(payload["denoiser"], payload["diffusion"], payload["state_dict"])
    torch.save(payload, target)
    return target


def test_non_finite_weights_are_refused(tiny_checkpoint, tmp_path):
    def poison(payload):
        name = next(iter(payload["state_dict"]))
        payload["state_dict"][name] = payload["state_dict"][name].clone().fill_(float("nan"))

    path = rewritten(tiny_checkpoint, tmp_path / "nan.pt", poison)
    with pytest.raises(CheckpointError, match=r"nan.pt has non-finite weights \(NaN or inf in "):
        read_checkpoint(path)


def test_weights_that_do_not_fit_their_config_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    def widen(payload):
        payload["denoiser"]["hidden_dim"] *= 2

    path = rewritten(tiny_checkpoint, tmp_path / "wide.pt", widen)
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    message = str(refused.value)
    assert "the weights do not fit the checkpoint's own model config: " in message and "more)" in message
    assert "\n" not in message
    assert main(["--quiet", "sample", "--checkpoint", str(path), "--formula", "SrTiO3",
                 "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_model_hash_is_refused_until_hashed(tiny_checkpoint, tmp_path):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    del payload["model_sha256"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(CheckpointError, match="carries no model_sha256.*add_model_hash"):
        read_checkpoint(old)
    assert add_model_hash(old) == read_checkpoint(tiny_checkpoint)["model_sha256"]
    upgraded = read_checkpoint(old)["state_dict"]
    assert all(torch.equal(upgraded[k], v) for k, v in payload["state_dict"].items())


def test_a_file_with_only_the_format_marker_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker.pt"
    torch.save({"format": FORMAT, "format_version": 1}, marker)
    assert main(["--quiet", "info", str(marker)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"equicsp info: error: {marker} holds no weights (no 'state_dict' of tensors)"]


def test_a_shipped_name_is_never_a_file(tiny_checkpoint, tmp_path, monkeypatch):
    """A file called perov_5 in the working directory does not replace the shipped model; paths look like paths."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(tiny_checkpoint, tmp_path / "perov_5")
    assert resolve_checkpoint("perov_5") == SHIPPED_DIR / "perov_5.pt"
    assert resolve_checkpoint("./perov_5") == Path("./perov_5")
    shutil.copyfile(tiny_checkpoint, tmp_path / "mine.pt")
    assert resolve_checkpoint("mine.pt") == Path("mine.pt")
    shutil.copyfile(tiny_checkpoint, tmp_path / "model")
    with pytest.raises(CheckpointError, match="'model' is not a shipped checkpoint .*must contain a '/' or end in"):
        resolve_checkpoint("model")
    with pytest.raises(CheckpointError, match="checkpoint file 'missing.pt' does not exist"):
        resolve_checkpoint("missing.pt")


def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """``(line, has weights_only=True)`` of every ``torch.load(...)`` call in a Python file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_is_weights_only():
    files = [path for folder in ("equicsp_core", "aiida_equicsp", "workchains", "scripts", "benchmarks", "tests",
                                 "examples") for path in (REPO / folder).rglob("*.py")]
    calls = {f"{path.relative_to(REPO)}:{line}": safe for path in files for line, safe in torch_load_calls(path)}
    assert len(calls) >= 5, calls  # the checker finds the calls it checks
    assert [where for where, safe in calls.items() if not safe] == []


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_half_checkpoint_rounds_the_parameters_only_and_measures_the_change(tiny_checkpoint, tmp_path):
    """scripts/half_checkpoint.py: every parameter float16 (the file loads into the float32 network as the
    rounded weights), the buffers untouched, the measured output change in the card and the card's line; a
    second rounding is refused."""
    import json
    import runpy
    import subprocess
    import sys

    out = tmp_path / "half.pt"
    command = [sys.executable, str(SCRIPTS / "half_checkpoint.py"), str(tiny_checkpoint), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    change = json.loads(done.stdout)["half_output_change"]
    assert 0 < change["lattice"] < 2e-3 and 0 < change["coord"] < 2e-3  # float16: 4.9e-4 a weight at most
    payload = read_checkpoint(out)
    original, _ = load_model(tiny_checkpoint)
    half, card = load_model(out)
    parameters = dict(original.net.named_parameters())
    for name, tensor in payload["state_dict"].items():
        expected = torch.float16 if name in parameters else original.net.state_dict()[name].dtype
        assert tensor.dtype == expected, name
    for name, value in half.net.state_dict().items():
        reference = original.net.state_dict()[name]
        assert value.dtype == reference.dtype
        assert torch.equal(value, reference.half().to(reference.dtype) if name in parameters else reference), name
    assert card["stored_dtype"] == "float16" and card["half_output_change"] == change
    assert change["split"] == "selection" and change["crystals"] > 0
    markdown = runpy.run_path(str(SCRIPTS / "ship_checkpoint.py"))["card_markdown"]("tiny", payload, "", "0" * 64)
    assert "- weights stored in float16 (`scripts/half_checkpoint.py`; loaded as float32)" in markdown
    again = subprocess.run([sys.executable, str(SCRIPTS / "half_checkpoint.py"), str(out), str(tmp_path / "x.pt")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already stores float16 weights" in again.stderr
    # a run continues from the float16 weights (--init-from), in float32
    assert main(["--quiet", "train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", "train.epochs=1",
                 "--init-from", str(out)]) == 0
    continued, _ = load_model(tmp_path / "run" / "best.pt")
    assert all(tensor.dtype == torch.float32 for tensor in continued.net.parameters())
    continued_markdown = runpy.run_path(str(SCRIPTS / "ship_checkpoint.py"))["card_markdown"](
        "tiny", read_checkpoint(tmp_path / "run" / "best.pt"), "", "0" * 64)
    assert f"- trained: {card['epochs'] + 1} epochs in all (1 in the last run)" in continued_markdown
    assert "- trained: 1 epochs in all" not in markdown and f"- trained: {card['epochs']} epochs (" in markdown
