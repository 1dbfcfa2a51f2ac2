"""Training loop: Adam, ReduceLROnPlateau, clipping by value, exact resume (METHOD.md §6.3).

A run lives in one folder::

    config.yaml     the run config (a resumed run must match it, except train.epochs)
    metrics.jsonl   one line per epoch: losses, learning rate, seconds; val loss when validated
    resume.pt       model + optimiser + scheduler + generator state + epoch, overwritten each epoch
    best.pt         weights-only checkpoint with model card, best validation loss so far

Every random draw (data order, t, noise, permutations) comes from seeded generators whose state is in
``resume.pt``, so a run stopped at an epoch boundary and resumed continues bit for bit.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

import equicsp_core
from equicsp_core.checkpoint import save_checkpoint
from equicsp_core.config import RunConfig
from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.data import data_fingerprint, load_split, split_path
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.files import atomic_path


def training_splits(
    dataset: str, seed: int, val_fraction: float, data_dir: str | None = None, progress: bool = True
) -> tuple[list[Crystal], list[Crystal], dict[str, Any]]:
    """(train, validation, provenance). Without a train split, the val split is divided (seeded):
    ``1 − val_fraction`` to train on and ``val_fraction`` for model selection ("trained on val")."""
    try:
        split_path(dataset, "train", data_dir)
        has_train = True
    except FileNotFoundError:
        has_train = False
    if has_train:
        train = load_split(dataset, "train", data_dir, progress=progress)
        val = load_split(dataset, "val", data_dir, progress=progress)
        provenance = {"protocol": "train split; selection on val",
                      "data_sha256": {s: data_fingerprint(dataset, s, data_dir) for s in ("train", "val")}}
        return train, val, provenance
    crystals = load_split(dataset, "val", data_dir, progress=progress)
    order = torch.randperm(len(crystals), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(val_fraction * len(crystals)))
    val = [crystals[i] for i in order[:held_out]]
    train = [crystals[i] for i in order[held_out:]]
    provenance = {
        "protocol": f"trained on val: {len(train)} val crystals for training, {len(val)} held out (seed {seed})",
        "data_sha256": {"val": data_fingerprint(dataset, "val", data_dir)},
    }
    return train, val, provenance


def _batches(crystals: list[Crystal], batch_size: int, order: list[int]) -> Iterator[CrystalBatch]:
    for start in range(0, len(order), batch_size):
        yield CrystalBatch.collate([crystals[i] for i in order[start:start + batch_size]])


def validation_loss(
    model: CrystalDiffusion, crystals: list[Crystal], batch_size: int, seed: int, device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean training loss on ``crystals`` with a fixed seed, so values are comparable across epochs."""
    generator = torch.Generator(device).manual_seed(seed)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), _autocast(device, precision):
        for batch in _batches(crystals, batch_size, list(range(len(crystals)))):
            loss = model.loss(batch.to(device), generator)["loss"]
            total += float(loss) * batch.num_crystals
            count += batch.num_crystals
    model.train()
    return total / max(count, 1)


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    max_minutes: float | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or continue training) a model; returns a summary of the run so far.

    Stops after ``config.train.epochs`` epochs in total, or at the first epoch boundary after
    ``max_minutes`` of this call, whichever comes first; either way ``resume.pt`` is current.
    """
    out_dir = Path(out_dir)
    resume_path, config_path = out_dir / "resume.pt", out_dir / "config.yaml"
    if resume_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not resume_path.exists():
        raise FileNotFoundError(f"nothing to resume: {resume_path} does not exist")
    if resume:
        saved = yaml.safe_load(config_path.read_text())
        current = config.to_dict()
        saved["train"]["epochs"] = current["train"]["epochs"]
        if saved != current:
            raise ValueError(f"the config differs from the run in {out_dir}; only train.epochs may change on resume")
    torch_device = torch.device(device)
    settings = config.train
    train_set, val_set, provenance = training_splits(config.dataset, settings.seed, settings.val_fraction, data_dir, progress)
    train_set = train_set[: settings.max_train_crystals]
    val_set = val_set[: settings.max_val_crystals]

    torch.manual_seed(settings.seed)  # parameter initialisation
    model = CrystalDiffusion(config.denoiser, config.diffusion).to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.lr_factor, patience=settings.lr_patience, min_lr=settings.min_lr
    )
    generator = torch.Generator(torch_device).manual_seed(settings.seed)
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": None, "train_seconds": 0.0}
    if resume:
        saved_state = torch.load(resume_path, map_location=torch_device, weights_only=True)
        model.net.load_state_dict(saved_state["model"])
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])
        generator.set_state(saved_state["generator"].cpu())
        state = saved_state["progress"]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    started = time.perf_counter()
    model.train()
    for epoch in range(state["epoch"], settings.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        sums: dict[str, float] = {}
        steps = skipped = 0
        bar = tqdm(list(_batches(train_set, settings.batch_size, order.tolist())), desc=f"epoch {epoch + 1}/{settings.epochs}",
                   disable=not progress, leave=False, unit="batch")
        for batch in bar:
            with _autocast(torch_device, settings.precision):
                terms = model.loss(batch.to(torch_device), generator)
            if not torch.isfinite(terms["loss"]):
                skipped += 1  # as the official code: a NaN loss skips the step
                continue
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), settings.grad_clip_value)
            optimizer.step()
            steps += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        seconds = time.perf_counter() - epoch_start
        state["train_seconds"] += seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}, "skipped_steps": skipped,
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
            "crystals_per_s": round(len(train_set) / seconds, 2),
        }
        if (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs:
            val_loss = validation_loss(model, val_set, settings.batch_size, settings.seed + 1, torch_device, settings.precision)
            scheduler.step(val_loss)
            record["val_loss"] = val_loss
            if val_loss < state["best_val_loss"]:
                state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
                save_checkpoint(model, out_dir / "best.pt", _card(config, provenance, state, torch_device))
        state["epoch"] = epoch + 1
        with open(out_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        _save_resume(resume_path, model, optimizer, scheduler, generator, state)
        if progress:
            tqdm.write(json.dumps(record))
        if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
            break
    return {"out_dir": str(out_dir), **state}


def _save_resume(
    path: Path,
    model: CrystalDiffusion,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    generator: torch.Generator,
    state: dict,
) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "progress": state}, tmp)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _card(config: RunConfig, provenance: dict, state: dict, device: torch.device) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        **provenance,
        "config": config.to_dict(),
        "epochs": state["best_epoch"],
        "val_loss": state["best_val_loss"],
        "train_seconds": round(state["train_seconds"], 1),
        "device": str(device) if device.type != "cpu" else f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)",
        "torch": str(torch.__version__),
        "equicsp": equicsp_core.__version__,
        "date": dt.date.today().isoformat(),
    }
