"""Model checkpoints: weights plus the configs that rebuild the model and a model card.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "equicsp-checkpoint", "format_version": 1,
     "denoiser": DenoiserConfig fields, "diffusion": DiffusionConfig fields,
     "state_dict": the denoiser's parameters, "model_sha256": model_sha256(denoiser, diffusion, state_dict),
     "card": {...}}

The card records what a user needs to trust the weights: dataset and data hash, epochs, training time,
scores, versions.

Every model is the one it claims to be
    ``model_sha256`` is the SHA-256 of the two configs and every weight (:func:`model_sha256`), written by
    :func:`save_checkpoint` and checked by :func:`read_checkpoint`: a copy with one flipped bit in a weight or
    a config is refused, whatever its path. Weights that are not finite, or that do not fit the checkpoint's
    own config, are refused too. Checkpoints the package ships live in
    ``equicsp_core/checkpoints/<name>.pt`` and are found by name; each file's SHA-256 is pinned in
    :mod:`equicsp_core.checkpoint_pins` and checked on every load.

Names and paths
    ``--checkpoint perov_5`` is always the shipped model: a name is never looked up as a file, so a file
    called ``perov_5`` in the working directory cannot stand in for it. A path must look like one: contain a
    ``/`` or end in ``.pt`` (``./model``, ``runs/best.pt``, ``best.pt``). A :class:`~pathlib.Path` is a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from equicsp_core.checkpoint_pins import SHIPPED_SHA256
from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
from equicsp_core.files import atomic_path, file_sha256, json_number
from equicsp_core.network import DenoiserConfig

FORMAT = "equicsp-checkpoint"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


class CheckpointError(ValueError):
    """A file that is not a usable EquiCSP checkpoint."""


def shipped_checkpoints() -> dict[str, Path]:
    """Name → path of every checkpoint shipped with the package."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.pt"))}


def looks_like_path(name_or_path: str | os.PathLike) -> bool:
    """Whether a checkpoint argument is a path (a ``Path``, or text with a ``/`` or ending in ``.pt``), not a name."""
    if isinstance(name_or_path, os.PathLike):
        return True
    text = str(name_or_path)
    return "/" in text or os.sep in text or text.endswith(".pt")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The file of a checkpoint argument: a path as given (it must exist), else the shipped checkpoint of that name.

    Raises:
        CheckpointError: for a path that is not a file, or a name that is not shipped.
    """
    if looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(name_or_path)!r} does not exist")
        return path
    shipped = shipped_checkpoints()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(shipped) or "none"
    raise CheckpointError(f"checkpoint {str(name_or_path)!r} is not a shipped checkpoint ({names}); "
                          "a file path must contain a '/' or end in '.pt'")


def model_sha256(denoiser: Mapping[str, Any], diffusion: Mapping[str, Any],
                 state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of what defines a model: both configs (canonical JSON), then every weight by sorted name
    (its name, dtype, shape and raw bytes, so a flipped bit anywhere changes it)."""
    digest = hashlib.sha256(json.dumps({"denoiser": dict(denoiser), "diffusion": dict(diffusion)},
                                       sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_payload(model: CrystalDiffusion, card: dict[str, Any]) -> dict[str, Any]:
    denoiser, diffusion = model.denoiser_config.to_dict(), model.config.to_dict()
    state_dict = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "denoiser": denoiser,
        "diffusion": diffusion,
        "state_dict": state_dict,
        "model_sha256": model_sha256(denoiser, diffusion, state_dict),
        "card": card,
    }


def write_payload(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temporary file, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_checkpoint(model: CrystalDiffusion, path: str | os.PathLike, card: dict[str, Any]) -> None:
    """Write weights + configs + their hash + card atomically (a crash never leaves a half-written file)."""
    write_payload(build_payload(model, card), Path(path))


def add_model_hash(path: str | os.PathLike) -> str:
    """Add ``model_sha256`` to a checkpoint written before it existed, keeping every weight bit for bit.

    For upgrading a checkpoint one trusts (the shipped ones were upgraded so); a file that already has a hash
    is checked instead. Returns the hash.
    """
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "model_sha256" not in payload:
        payload["model_sha256"] = model_sha256(payload["denoiser"], payload["diffusion"], payload["state_dict"])
        write_payload(payload, path)
    return read_checkpoint(path)["model_sha256"]


def _check_pin(name: str, path: Path) -> None:
    """Refuse a shipped checkpoint whose file is not the one the package pins."""
    pinned = SHIPPED_SHA256.get(name)
    if pinned is None:
        raise CheckpointError(f"shipped checkpoint {name!r} has no pinned sha256 in equicsp_core/checkpoint_pins.py")
    actual = file_sha256(path)
    if actual != pinned:
        raise CheckpointError(f"shipped checkpoint {name!r} ({path}) has sha256 {actual}, not the pinned {pinned}: "
                              "the file is damaged or was replaced; reinstall aiida-equicsp")


def _check_weights(path: Path, payload: dict[str, Any]) -> None:
    """Refuse a checkpoint without a valid ``model_sha256``, or with weights that are not finite tensors."""
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no weights (no 'state_dict' of tensors)")
    if not isinstance(payload.get("denoiser"), dict) or not isinstance(payload.get("diffusion"), dict):
        raise CheckpointError(f"{path} has no model config ('denoiser' and 'diffusion')")
    stated = payload.get("model_sha256")
    if stated is None:
        raise CheckpointError(f"{path} carries no model_sha256, so its weights cannot be checked; if you trust "
                              "the file, add it with equicsp_core.checkpoint.add_model_hash")
    if model_sha256(payload["denoiser"], payload["diffusion"], state_dict) != stated:
        raise CheckpointError(f"{path} is damaged: its weights or configs do not match its model_sha256")
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path} has non-finite weights (NaN or inf in {name})")


def read_checkpoint(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint dict (no code is unpickled): the pin of a shipped one, the model hash and
    finite weights of every one. A path inside the shipped folder is checked against its pin too.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    path = resolve_checkpoint(name_or_path)
    if path.resolve().parent == SHIPPED_DIR.resolve():
        _check_pin(path.stem, path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = " ".join(f"{type(error).__name__}: {error}".split())
        raise CheckpointError(f"{path} is not a readable checkpoint ({message[:300]})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an EquiCSP checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload.get('format_version')}, expected {FORMAT_VERSION}")
    _check_weights(path, payload)
    return payload


def total_epochs(epochs: int, start: Mapping[str, Any] | None) -> int:
    """The epochs behind a run's weights: its own ``epochs`` plus, for a run started from other weights (``start``,
    the card's ``initialised_from``), the epochs in all of those (cards written before this total was recorded give
    the start's own epoch count, which was its total for every such card shipped)."""
    if start is None:
        return epochs
    return epochs + start.get("epochs_in_all", start["epoch"])


def epochs_in_all(card: Mapping[str, Any]) -> int:
    """:func:`total_epochs` of a model card."""
    return total_epochs(card["epochs"], card.get("initialised_from"))


#: The settings and figures of a card's evaluation that ``equicsp info`` lists (the rest stays in the card): of a CSP
#: model (``equicsp evaluate``) and of a generation model (``equicsp evaluate-generation``, docs/method.md §8.3).
FIGURE_KEYS = ("split", "crystals", "num_samples", "steps", "step_lr", "lattice_bound", "precision", "match_rate",
               "rmse")
GENERATION_FIGURE_KEYS = ("split", "generated", "structural_validity", "compositional_validity", "cov_recall",
                          "cov_precision", "d_density", "d_energy", "energy", "d_num_elements")


def shipped_summaries() -> list[dict[str, Any]]:
    """One record per shipped checkpoint: its name, dataset, ``task`` (``csp`` or ``generation``), size (and
    ``stored_dtype``: ``float16`` for weights stored compactly by ``scripts/half_checkpoint.py``, loaded as float32),
    data protocol, training (``epochs``: the last run's, ``epochs_in_all``: with those of the weights it started from)
    and figures.

    ``figures`` holds each evaluation of the card restricted to :data:`FIGURE_KEYS` (CSP: the papers' match rate in
    % and RMSE, on the split and rows named there) or :data:`GENERATION_FIGURE_KEYS` (generation: validity, coverage
    and distribution distances); ``rows`` is ``None`` on a card written before the protocol recorded its row counts.
    """
    summaries = []
    for name in shipped_checkpoints():
        payload = read_checkpoint(name)
        card = payload["card"]
        summaries.append({
            "name": name, "dataset": card["dataset"], "task": payload["denoiser"].get("task", "csp"),
            "parameters": sum(v.numel() for v in payload["state_dict"].values()),
            "stored_dtype": card.get("stored_dtype", "float32"),
            "protocol": card["protocol"], "rows": card.get("rows"), "epochs": card["epochs"],
            "epochs_in_all": epochs_in_all(card),
            "selection_loss": card["val_loss"], "train_seconds": card["train_seconds"], "date": card["date"],
            "figures": [_figure(evaluation) for evaluation in card.get("evaluations", [])],
        })
    return summaries


def _figure(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation of a card restricted to :data:`FIGURE_KEYS` (:data:`GENERATION_FIGURE_KEYS` and the sampling
    steps of the scored folders for a generation model), its lattice bound as strict JSON holds it (cards store the
    papers' unbounded update as the float ``inf``)."""
    if "generated_with" in evaluation:
        steps = sorted({run["steps"] for run in evaluation["generated_with"]})
        return {**{key: evaluation.get(key) for key in GENERATION_FIGURE_KEYS}, "steps": steps}
    figure = {key: evaluation.get(key) for key in FIGURE_KEYS}
    if figure["lattice_bound"] is not None:
        figure["lattice_bound"] = json_number(float(figure["lattice_bound"]))
    return figure


def _fit_problem(model: CrystalDiffusion, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """One line on how ``state_dict`` does not fit ``model``'s network, ``None`` when it fits."""
    expected = model.net.state_dict()
    problems = [f"missing {name}" for name in expected if name not in state_dict]
    problems += [f"unexpected {name}" for name in state_dict if name not in expected]
    problems += [f"{name} is {list(state_dict[name].shape)}, the config makes {list(tensor.shape)}"
                 for name, tensor in expected.items() if name in state_dict and state_dict[name].shape != tensor.shape]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


#: What each task's models do, and the command that uses them.
_TASK_USES = {"csp": ("a structure prediction (CSP) model: it needs the atom types", "equicsp sample"),
              "generation": ("an ab initio generation model: it draws the atom types itself", "equicsp generate")}


def require_task(model: CrystalDiffusion, task: str) -> None:
    """Refuse a model of the other task: CSP sampling needs a ``"csp"`` model, generation a ``"generation"`` one.

    Raises:
        CheckpointError: one line saying what the model is and which command uses it.
    """
    if model.task != task:
        what, command = _TASK_USES[model.task]
        raise CheckpointError(f"the checkpoint is {what}; use it with `{command}`")


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CrystalDiffusion, dict[str, Any]]:
    """Rebuild the model of a checkpoint; returns ``(model in eval mode, card)``.

    Raises:
        CheckpointError: as :func:`read_checkpoint`, and when the weights do not fit the checkpoint's own config.
    """
    payload = read_checkpoint(name_or_path)
    return model_of(payload, resolve_checkpoint(name_or_path)).to(device).eval(), payload.get("card", {})


def model_of(payload: dict[str, Any], path: Path) -> CrystalDiffusion:
    """The model of a checkpoint's verified ``payload`` (:func:`read_checkpoint`; ``path`` names it in errors),
    on the CPU in training mode.

    Raises:
        CheckpointError: an unusable model config, or weights that do not fit it.
    """
    try:
        model = CrystalDiffusion(DenoiserConfig(**payload["denoiser"]), DiffusionConfig(**payload["diffusion"]))
    except (TypeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path} has an unusable model config: {' '.join(str(error).split())}") from error
    problem = _fit_problem(model, payload["state_dict"])
    if problem is not None:
        raise CheckpointError(f"{path}: the weights do not fit the checkpoint's own model config: {problem}")
    model.net.load_state_dict(payload["state_dict"])
    return model
