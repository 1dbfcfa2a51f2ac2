"""``EquiCSPModelData``: a checkpoint file with its model card summary, checked, stored once per content."""

import hashlib
import io
import shutil

import pytest
import torch

from aiida_equicsp.data.model import EquiCSPModelData


def test_attributes_summarise_the_model_card(tiny_checkpoint, model):
    """Dataset, epochs, denoiser sizes, T and the file's SHA-256 are attributes."""
    attributes = model.base.attributes.all
    assert {key: attributes[key] for key in ("dataset", "epochs", "mode", "hidden_dim", "num_layers", "num_freqs",
                                             "num_steps")} == {
        "dataset": "perov_5", "epochs": 1, "mode": "equicsp", "hidden_dim": 32, "num_layers": 2, "num_freqs": 8,
        "num_steps": 1000}
    assert model.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert model.filename == "best.pt"
    assert model.is_stored


def test_get_or_create_finds_the_same_content_under_another_name(tiny_checkpoint, model, tmp_path):
    """A copy of a stored checkpoint gives the stored node; another checkpoint gives a new stored node."""
    copy = tmp_path / "renamed.pt"
    shutil.copy(tiny_checkpoint, copy)
    assert EquiCSPModelData.get_or_create(copy).uuid == model.uuid

    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["card"]["epochs"] = 7
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    node = EquiCSPModelData.get_or_create(other)
    assert node.is_stored and node.uuid != model.uuid
    assert node.base.attributes.get("epochs") == 7
    assert EquiCSPModelData.get_or_create(other).uuid == node.uuid


def test_from_shipped_finds_a_checkpoint_by_name(tiny_checkpoint, model, tmp_path, monkeypatch):
    """``from_shipped(name)`` resolves the package's checkpoints/<name>.pt; an unknown name is a ValueError."""
    shipped = tmp_path / "checkpoints"
    shipped.mkdir()
    shutil.copy(tiny_checkpoint, shipped / "tiny_perov_5.pt")
    monkeypatch.setattr("equicsp_core.checkpoint.SHIPPED_DIR", shipped)
    assert EquiCSPModelData.from_shipped("tiny_perov_5").uuid == model.uuid
    with pytest.raises(ValueError, match="no_such_model"):
        EquiCSPModelData.from_shipped("no_such_model")


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_non_checkpoint_file_is_refused_naming_it(tmp_path, content):
    """Random bytes or a torch file without the checkpoint marker: ValueError naming the file."""
    path = tmp_path / "weights.pt"
    if content is None:
        torch.save({"weights": torch.ones(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="weights.pt"):
        EquiCSPModelData(path)


def test_missing_file_and_file_objects_are_refused(tmp_path):
    """A path that does not exist is a ValueError; a stream is a TypeError (the model needs a file to check)."""
    with pytest.raises(ValueError, match="missing.pt"):
        EquiCSPModelData(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="path"):
        EquiCSPModelData(io.BytesIO(b"bytes"))
