"""Model checkpoints: weights plus the configs that rebuild the model and a model card.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "equicsp-checkpoint", "format_version": 1,
     "denoiser": DenoiserConfig fields, "diffusion": DiffusionConfig fields,
     "state_dict": the denoiser's parameters, "card": {...}}

The card records what a user needs to trust the weights: dataset and data hash, epochs, training time,
scores, versions. Checkpoints the package ships live in ``equicsp_core/checkpoints/<name>.pt`` and are
found by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
from equicsp_core.files import atomic_path
from equicsp_core.network import DenoiserConfig

FORMAT = "equicsp-checkpoint"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


class CheckpointError(ValueError):
    """A file that is not a usable EquiCSP checkpoint."""


def shipped_checkpoints() -> dict[str, Path]:
    """Name → path of every checkpoint shipped with the package."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.pt"))}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A path as given, or the path of a shipped checkpoint of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_checkpoints()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(shipped) or "none"
    raise CheckpointError(f"checkpoint {str(name_or_path)!r} is neither a file nor a shipped checkpoint ({names})")


def build_payload(model: CrystalDiffusion, card: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "denoiser": model.denoiser_config.to_dict(),
        "diffusion": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "card": card,
    }


def save_checkpoint(model: CrystalDiffusion, path: str | os.PathLike, card: dict[str, Any]) -> None:
    """Write weights + configs + card atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(build_payload(model, card), tmp)


def read_checkpoint(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint dict (no code is unpickled)."""
    path = resolve_checkpoint(name_or_path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an EquiCSP checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload.get('format_version')}, expected {FORMAT_VERSION}")
    return payload


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CrystalDiffusion, dict[str, Any]]:
    """Rebuild the model of a checkpoint; returns ``(model in eval mode, card)``."""
    payload = read_checkpoint(name_or_path)
    try:
        model = CrystalDiffusion(DenoiserConfig(**payload["denoiser"]), DiffusionConfig(**payload["diffusion"]))
        model.net.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {name_or_path} does not match its own model config: {error}") from error
    return model.to(device).eval(), payload.get("card", {})
