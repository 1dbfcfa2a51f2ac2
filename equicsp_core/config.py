"""Run configurations: presets (YAML in ``equicsp_core/presets``) plus command-line overrides.

A run config has four sections::

    dataset: perov_5
    denoiser: {...}    # DenoiserConfig fields
    diffusion: {...}   # DiffusionConfig fields
    train: {...}       # TrainConfig fields

Overrides are dotted ``section.field=value`` strings, values parsed as YAML (``train.epochs=10``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from equicsp_core.data import DATASETS
from equicsp_core.diffusion import DiffusionConfig
from equicsp_core.network import DenoiserConfig

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (docs/method.md §6.4; defaults are the papers' except where noted).

    Attributes:
        epochs: total epochs of the run.
        batch_size: crystals per step.
        lr, lr_factor, lr_patience, min_lr: Adam learning rate and its ReduceLROnPlateau schedule on the
            validation loss. The scheduler steps at every validation, so ``lr_patience`` counts validations
            (6 validations × ``val_every`` 5 = the papers' 30 epochs).
        grad_clip_value: gradient clipping **by value**.
        val_every: validate every this many epochs.
        seed: seeds data order, noise, time steps and permutations (one generator).
        ema_decay: decay of the exponential moving average of the weights that is validated and saved in
            ``best.pt`` (``None``: the raw weights, the papers' choice). Per step:
            ``ema ← decay · ema + (1 − decay) · weights``; 0.999 averages over about 1000 steps.
        max_train_crystals, max_val_crystals: cap the data (smoke runs); ``None`` = all.
        precision: ``fp32``, or ``bf16`` autocast (fast on CPUs with native bf16 and on GPUs).
    """

    epochs: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    lr_factor: float = 0.6
    lr_patience: int = 6
    min_lr: float = 1e-4
    grad_clip_value: float = 0.5
    val_every: int = 5
    seed: int = 42
    ema_decay: float | None = None
    max_train_crystals: int | None = None
    max_val_crystals: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "grad_clip_value"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"train.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"train.lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass(frozen=True)
class RunConfig:
    dataset: str
    denoiser: DenoiserConfig
    diffusion: DiffusionConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "denoiser": asdict(self.denoiser), "diffusion": asdict(self.diffusion),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        unknown = set(raw) - {"dataset", "denoiser", "diffusion", "train"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}")
        if raw.get("dataset") not in DATASETS:
            raise ValueError(f"unknown dataset {raw.get('dataset')!r}; choose one of {', '.join(DATASETS)}")
        sections = {}
        for name, kind in (("denoiser", DenoiserConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)):
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
            allowed = {f.name for f in fields(kind)}
            bad = set(values) - allowed
            if bad:
                raise ValueError(f"unknown {name} settings {sorted(bad)}; allowed: {', '.join(sorted(allowed))}")
            sections[name] = kind(**{key: _coerce(f"{name}.{key}", value, kind, key) for key, value in values.items()})
        return cls(dataset=raw["dataset"], **sections)


def _coerce(label: str, value: Any, kind: type, field_name: str) -> Any:
    """Check a config value against its field's type; YAML reads ``1e-3`` as a string, so floats are parsed."""
    hint = get_type_hints(kind)[field_name]
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise ValueError(f"{label} must be one of {', '.join(map(repr, get_args(hint)))}, got {value!r}")
        return value
    if bool in options:
        if isinstance(value, bool):
            return value
    elif int in options:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif float in options:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif str in options and isinstance(value, str):
        return value
    expected = " or ".join(getattr(option, "__name__", str(option)) for option in options)
    raise ValueError(f"{label} must be {expected}, got {value!r}")


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_run_config(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset (name or YAML path) with ``section.field=value`` overrides applied."""
    path = Path(preset)
    if not path.is_file():
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())} or give a YAML file")
    raw = copy.deepcopy(yaml.safe_load(path.read_text()) or {})
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not of the form key=value")
        parts = key.split(".")
        if len(parts) == 1:
            raw[parts[0]] = yaml.safe_load(value)
        elif len(parts) == 2:
            raw.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value)
        else:
            raise ValueError(f"override key {key!r} must be 'section.field' or 'dataset'")
    return RunConfig.from_dict(raw)
