"""Training loop: Adam, ReduceLROnPlateau, clipping by value, exact resume (docs/method.md §6.4).

A run lives in one folder::

    config.yaml     the run config (a resumed run must match it, except train.epochs)
    metrics.jsonl   one line per epoch: losses, learning rate, seconds; val loss when validated
    resume.pt       model + optimiser + scheduler + generator state + epoch, overwritten each epoch
    best.pt         weights-only checkpoint with model card, best validation loss so far (a generation model's
                    card also holds the training distribution of atom counts, ``num_atoms_counts``)

Every random draw (data order, t, noise, permutations) comes from seeded CPU generators whose state is in
``resume.pt``, so a run stopped at an epoch boundary and resumed continues bit for bit on the same device, and
with the same random stream on another (``resume.pt`` holds CPU tensors only: a run saved on a CPU continues
on a GPU and back, :meth:`TrainingObjects.restore`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import equicsp_core
from equicsp_core import generate
from equicsp_core.checkpoint import epochs_in_all, read_checkpoint, save_checkpoint, total_epochs
from equicsp_core.config import RunConfig
from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.data import data_fingerprint
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.files import atomic_path, file_sha256
from equicsp_core.hardware import warn_if_bf16_slow
from equicsp_core.network import DenoiserConfig
from equicsp_core.splits import has_train_file, load_rows, reserved_rows_path, split_rows


def training_splits(
    dataset: str, data_dir: str | None = None, progress: bool = True
) -> tuple[list[Crystal], list[Crystal], dict[str, Any]]:
    """(train, selection, provenance) under the data protocol of :mod:`equicsp_core.splits`."""
    train_rows = split_rows(dataset, "train", data_dir)
    selection_rows = split_rows(dataset, "selection", data_dir)
    files = sorted({row.file for row in train_rows + selection_rows})
    if has_train_file(dataset, data_dir):
        protocol = "the papers' protocol: trained on train, selected on val, reported on test"
    else:
        num_test = sum(row.file == "test" for row in train_rows)
        protocol = (f"trained on val + the unreserved test rows ({len(train_rows) - num_test} val + {num_test} test "
                    f"rows), selected on {len(selection_rows)} held-out val rows; reported on the reserved test rows")
    provenance = {
        "protocol": protocol,
        "rows": {"train": len(train_rows), "selection": len(selection_rows)},
        "data_sha256": {file: data_fingerprint(dataset, file, data_dir) for file in files},
    }
    if not has_train_file(dataset, data_dir):
        provenance["reserved_rows_sha256"] = file_sha256(reserved_rows_path(dataset, data_dir))
    return (load_rows(dataset, train_rows, data_dir, progress), load_rows(dataset, selection_rows, data_dir, progress),
            provenance)


def epoch_order(num_crystals: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` (0-based) visits the training crystals: a permutation of
    ``range(num_crystals)`` seeded by ``seed · 100003 + epoch`` (so a resumed run repeats it)."""
    return torch.randperm(num_crystals, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _batches(crystals: list[Crystal], batch_size: int, order: list[int]) -> Iterator[CrystalBatch]:
    for start in range(0, len(order), batch_size):
        yield CrystalBatch.collate([crystals[i] for i in order[start:start + batch_size]])


def validation_loss(
    model: CrystalDiffusion, crystals: list[Crystal], batch_size: int, seed: int, device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean training loss on ``crystals`` with a fixed seed, so values are comparable across epochs."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any device (equicsp_core.rng)
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


class TrainingDiverged(ValueError):
    """An epoch whose loss or weights became non-finite; the run folder keeps the last good epoch."""


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    max_minutes: float | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or continue training) a model; returns a summary of the run so far.

    Stops after ``config.train.epochs`` epochs in total, or at the first epoch boundary after
    ``max_minutes`` of this call, whichever comes first; either way ``resume.pt`` is current. A new run
    may start from the weights of ``init_from`` (see :func:`initial_state`) instead of a random draw.
    An epoch that ends with non-finite weights or without one finite step raises :class:`TrainingDiverged`
    before anything of that epoch is written.
    """
    out_dir = Path(out_dir)
    resume_path, config_path = out_dir / "resume.pt", out_dir / "config.yaml"
    if resume_path.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not resume_path.exists():
        raise FileNotFoundError(f"nothing to resume: {resume_path} does not exist")
    if resume and init_from is not None:
        raise ValueError("--init-from starts a new run; a resumed run continues from its own state")
    if resume:
        _check_resumable(config, config_path)
    torch_device = torch.device(device)
    settings = config.train
    if settings.precision == "bf16":
        warn_if_bf16_slow(torch_device, "train.precision")

    run = build_training(config, torch_device, init_from)
    model, optimizer, scheduler, ema = run.model, run.optimizer, run.scheduler, run.ema
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": None, "train_seconds": 0.0}
    if run.initialised_from is not None:
        state["initialised_from"] = run.initialised_from
    train_set, val_set, provenance = training_splits(config.dataset, data_dir, progress)
    train_set = train_set[: settings.max_train_crystals]
    val_set = val_set[: settings.max_val_crystals]
    if config.denoiser.task == "generation":  # what `equicsp generate` draws atom counts from
        provenance[generate.CARD_KEY] = generate.atom_count_distribution(train_set)
    if resume:
        state = run.restore(resume_path)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    started = time.perf_counter()
    model.train()
    for epoch in range(state["epoch"], settings.epochs):
        epoch_start = time.perf_counter()
        order = epoch_order(len(train_set), settings.seed, epoch)
        sums: dict[str, float] = {}
        steps = skipped = 0
        bar = tqdm(list(_batches(train_set, settings.batch_size, order)), desc=f"epoch {epoch + 1}/{settings.epochs}",
                   disable=not progress, leave=False, unit="batch")
        for batch in bar:
            terms = run.step(batch, settings.precision, settings.grad_clip_value)
            if terms is None:
                skipped += 1  # as the official code: a NaN loss skips the step
                continue
            steps += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        if steps == 0 or not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} ({skipped} of {skipped + steps} steps had a non-finite loss"
                f"{'' if steps == 0 else ', the weights became non-finite'}); {out_dir} keeps epoch {epoch}: "
                f"lower train.lr or train.grad_clip_value")
        seconds = time.perf_counter() - epoch_start
        state["train_seconds"] += seconds
        record: dict[str, Any] = {
            "epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}, "skipped_steps": skipped,
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
            "crystals_per_s": round(len(train_set) / seconds, 2),
        }
        if (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs:
            val_loss = validation_loss(model, val_set, settings.batch_size, settings.seed + 1, torch_device, settings.precision)
            if ema is not None:
                record["val_loss_raw"] = val_loss
                with _weights_of(model, ema):
                    val_loss = validation_loss(model, val_set, settings.batch_size, settings.seed + 1, torch_device,
                                               settings.precision)
            scheduler.step(val_loss)
            record["val_loss"] = val_loss
            if val_loss < state["best_val_loss"]:
                state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
                with _weights_of(model, ema):
                    save_checkpoint(model, out_dir / "best.pt", _card(config, provenance, state, torch_device))
        state["epoch"] = epoch + 1
        with open(out_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        run.save(resume_path, state)
        if progress:
            tqdm.write(json.dumps(record))
        if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
            break
    return {"out_dir": str(out_dir), **state}


@dataclass
class TrainingObjects:
    """What a training run updates: the model (on its device), Adam, the plateau scheduler, the EMA of the
    weights (or None) and the run's CPU generator; ``initialised_from`` as :func:`initial_state` returns it."""

    model: CrystalDiffusion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    ema: AveragedModel | None
    generator: torch.Generator
    initialised_from: dict[str, Any] | None = None

    def step(self, batch: CrystalBatch, precision: str, grad_clip_value: float) -> dict[str, torch.Tensor] | None:
        """One optimiser step on ``batch`` (moved to the model's device); the loss terms, or None when the loss
        was not finite and the step was skipped."""
        device = next(self.model.parameters()).device
        with _autocast(device, precision):
            terms = self.model.loss(batch.to(device), self.generator)
        if not torch.isfinite(terms["loss"]):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_value_(self.model.parameters(), grad_clip_value)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model.net)
        return terms

    def save(self, path: Path, progress: dict[str, Any]) -> None:
        """Write ``resume.pt`` atomically: weights, optimiser, scheduler, EMA, generator state and ``progress``, as
        CPU tensors whatever the device (any machine can read and continue it)."""
        saved = {"model": self.model.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                 "progress": progress}
        if self.ema is not None:
            saved["ema"] = self.ema.state_dict()
        with atomic_path(path) as tmp:
            torch.save(_on_cpu(saved), tmp)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a ``resume.pt`` into these freshly built objects; returns its progress record.

        The file is read onto the CPU: the weights and the EMA are copied into the model and the average on
        their device, the optimiser moves its moments to the parameters' device (its step counts stay on the
        CPU, as a fresh Adam keeps them), and the generator is the run's CPU generator (:mod:`equicsp_core.rng`).
        So a run saved on a CPU continues on a GPU and back.

        Raises:
            ValueError: the generator state is not a CPU generator's (a file written by a GPU run before the
                generators moved to the CPU).
        """
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expected = self.generator.get_state()
        if saved["generator"].dtype != expected.dtype or saved["generator"].shape != expected.shape:
            raise ValueError(f"{path} holds the state of a {tuple(saved['generator'].shape)}-byte generator, not of "
                             f"the CPU generator a run draws from ({tuple(expected.shape)} bytes)")
        self.model.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.generator.set_state(saved["generator"])
        return saved["progress"]


def build_training(config: RunConfig, device: torch.device | str = "cpu",
                   init_from: str | Path | None = None) -> TrainingObjects:
    """The objects of a new run of ``config`` on ``device``: seeded initial weights (or those of ``init_from``,
    :func:`initial_state`), Adam, the scheduler, the EMA starting at the initial weights, the CPU generator.
    A resumed run builds them so and then loads its ``resume.pt`` (:meth:`TrainingObjects.restore`)."""
    settings = config.train
    torch.manual_seed(settings.seed)  # parameter initialisation
    model = CrystalDiffusion(config.denoiser, config.diffusion).to(torch.device(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.lr_factor, patience=settings.lr_patience, min_lr=settings.min_lr
    )
    generator = torch.Generator().manual_seed(settings.seed)  # on the CPU whatever the device (equicsp_core.rng)
    started = initial_state(init_from, model, optimizer) if init_from is not None else None
    ema = _averaged(model, settings.ema_decay)  # the average starts at the initial weights
    return TrainingObjects(model, optimizer, scheduler, ema, generator, started)


def _check_resumable(config: RunConfig, config_path: Path) -> None:
    """A resumed run must keep its config, except ``train.epochs``.

    The saved config is read through :class:`RunConfig`, so a field added since it was written compares
    as its default; ``train.val_fraction`` (always 0.1) moved into the data protocol and is dropped.
    """
    saved = yaml.safe_load(config_path.read_text())
    saved["train"].pop("val_fraction", None)
    saved["train"]["epochs"] = config.train.epochs
    if RunConfig.from_dict(saved) != config:
        raise ValueError(f"the config differs from the run in {config_path.parent}; only train.epochs may change on resume")


def initial_state(source: str | Path, model: CrystalDiffusion, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Start from trained weights: a checkpoint (name or path), or a run folder's ``resume.pt``.

    From a run folder the optimiser's moments come along too, so training continues without Adam's
    cold start; its learning rate is this run's. The denoiser must have the same shape. Returns what
    the model card records about the start: its ``source``, its own ``epoch`` count, the ``epochs_in_all``
    behind its weights (:func:`~equicsp_core.checkpoint.epochs_in_all`) and whether Adam's moments came along.
    """
    folder = Path(source)
    if folder.is_dir():
        path = folder / "resume.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--init-from {source}: {path} does not exist")
        saved = torch.load(path, map_location="cpu", weights_only=True)  # Adam's moments follow the parameters
        weights, progress = saved["model"], saved["progress"]
        epoch, optimizer_state = progress["epoch"], saved["optimizer"]
        total = total_epochs(epoch, progress.get("initialised_from"))
        saved_config = yaml.safe_load((folder / "config.yaml").read_text())["denoiser"]
    else:
        payload = read_checkpoint(source)
        weights, epoch, optimizer_state = payload["state_dict"], payload["card"]["epochs"], None
        total = epochs_in_all(payload["card"])
        saved_config = payload["denoiser"]
    if DenoiserConfig(**saved_config) != model.denoiser_config:
        raise ValueError(f"--init-from {source}: its denoiser {saved_config} differs from this run's "
                         f"{model.denoiser_config.to_dict()}")
    model.net.load_state_dict(weights)
    if optimizer_state is not None:
        lr = optimizer.param_groups[0]["lr"]
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = lr
    return {"source": str(source), "epoch": epoch, "epochs_in_all": total, "optimizer": optimizer_state is not None}


def _averaged(model: CrystalDiffusion, decay: float | None) -> AveragedModel | None:
    """The exponential moving average of the denoiser's weights (buffers averaged too), starting at its current
    weights, or None.

    ``AveragedModel`` counts no average yet (``n_averaged == 0``) and so would *copy* the weights of its first update
    instead of averaging them in: a run started from trained weights (``--init-from``) would then average from the
    weights after one step of fresh Adam moments (every parameter moved by about the learning rate), and its average
    would lag behind the trained weights for thousands of steps. Counting the starting weights as one average makes
    the first update ``decay · start + (1 − decay) · new``."""
    if decay is None:
        return None
    averaged = AveragedModel(model.net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    averaged.n_averaged.fill_(1)
    return averaged


@contextlib.contextmanager
def _weights_of(model: CrystalDiffusion, ema: AveragedModel | None) -> Iterator[None]:
    """Within the block ``model`` holds the averaged weights (nothing changes without an average)."""
    if ema is None:
        yield
        return
    own = {k: v.clone() for k, v in model.net.state_dict().items()}
    model.net.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.net.load_state_dict(own)


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor inside dicts, lists and tuples moved to the CPU (CPU tensors are not copied)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _device_description(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``cpu (<model>, N threads)``: where a model was trained, for its card."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return str(device)


def _card(config: RunConfig, provenance: dict, state: dict, device: torch.device) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        **provenance,
        "config": config.to_dict(),
        "epochs": state["best_epoch"],
        "epochs_in_all": total_epochs(state["best_epoch"], state.get("initialised_from")),
        "val_loss": state["best_val_loss"],
        "train_seconds": round(state["train_seconds"], 1),
        **({"initialised_from": state["initialised_from"]} if "initialised_from" in state else {}),
        "device": _device_description(device),
        "torch": str(torch.__version__),
        "equicsp": equicsp_core.__version__,
        "date": dt.date.today().isoformat(),
    }
