"""One prepared call on a GPU machine: continue the mp_20 training run on CUDA, then the GPU checks of sampling.

The device machine of this workplace (CONTRIBUTING.md, "A session with a GPU") is bare: it runs a copy of the
working tree under its own python3 (torch with CUDA, numpy, scipy, pandas, pyyaml, tqdm; no pymatgen, ase or
pydantic), reaches no network, and sends back only what is written under ``$OUT`` (at most 8 files of 16 MiB).
So everything it needs is prepared here first, and everything it produces is packed to fit:

``prepare`` (here, on the CPU, once)
    writes the carry folder (``gpu_carry/``, ignored by git): the dataset files the data protocol reads
    (``data/mp_20/{val,test}.csv.gz``, ``reserved_test_rows.txt``), the parsed caches of those splits
    (``cache/*.pt.xz``: with them the engine imports no pymatgen), the compositions the sampling checks use
    (``compositions.json``) and the wheels of pydantic and its dependencies for Python 3.12 (``wheels/``);
    then it prints how much of the working tree would travel.
``session`` (on the device, through ``scripts/gpu_session.sh``)
    runs each phase in its own process with its own time limit, so one failing phase costs only itself:
    ``check-resume`` (restore the committed ``resume.pt`` on the device, one step, save, restore on the CPU,
    one step), ``train`` (``equicsp train --resume --device cuda --max-minutes M`` on a copy of the run
    folder), packing the new training state into ``$OUT`` (a tar split into parts under 16 MiB), and
    ``bench`` (sampling throughput, peak memory, bf16, the same seed on CPU and GPU). Everything it
    learns goes into ``$OUT/gpu_session.json``, rewritten after each phase; its log is ``$OUT/session.log``.
``unpack`` and ``table`` (here, after the call)
    ``unpack`` joins the parts, checks every SHA-256 against the manifest and puts ``resume.pt``, ``best.pt`` and
    ``metrics.jsonl`` into the run folder, refusing one whose ``resume.pt`` is not the state the GPU run
    started from (a run that moved on meanwhile is not overwritten without ``--force``); ``table`` prints the
    measurements as markdown tables for BENCHMARKS.md.

The orchestration (``session``, ``unpack``, the packing) uses the standard library only; the phases import
the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Files that come back from the device: each under this size (the limit is 16 MiB).
PART_BYTES = 15 * 1024 * 1024
#: What a run folder contributes to the training tar, when present.
RUN_FILES = ("resume.pt", "best.pt", "metrics.jsonl", "config.yaml")
#: The packages the engine needs that the device machine lacks (KINDS.md), carried as wheels.
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
#: The most that may travel to the device in one call (tracked files, untracked unignored files, carry).
TRAVEL_LIMIT = 64 * 1024 * 1024
JSON_NAME, LOG_NAME, PART_PREFIX = "gpu_session.json", "session.log", "train.tar.part"
#: Seconds the training phase needs beyond its minutes: loading the data, the epoch that ends after them, its
#: validation. And the seconds kept for packing the training state.
TRAIN_OVERHEAD_SECONDS, PACK_SECONDS = 90, 30


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# prepare (here)

def prepare(args: argparse.Namespace) -> int:
    """Write the carry folder: dataset files, parsed caches (xz), compositions, wheels; report the travel size."""
    from equicsp_core.data import cache_path, load_split, resolve_data_dir
    from equicsp_core.splits import RESERVED_FILE, has_train_file, load_rows, split_rows

    carry = Path(args.carry)
    data_dir = resolve_data_dir(args.data_dir)
    (carry / "data").mkdir(parents=True, exist_ok=True)
    (carry / "cache").mkdir(exist_ok=True)
    for stale in (carry / "cache").glob("*.pt.xz"):
        stale.unlink()
    manifest: dict[str, Any] = {"datasets": {}, "compositions": {}}
    for dataset in args.datasets:
        files = ["train", "val"] if has_train_file(dataset, data_dir) else ["val", "test"]
        target = carry / "data" / dataset
        target.mkdir(exist_ok=True)
        extra = [] if has_train_file(dataset, data_dir) else [RESERVED_FILE]
        for name in [f"{file}.csv.gz" for file in files] + extra:
            shutil.copyfile(data_dir / dataset / name, target / name)
        for file in files:
            load_split(dataset, file, data_dir, progress=False)  # parses once here (pymatgen), then cached
            cache = cache_path(dataset, file, data_dir)
            packed = carry / "cache" / (cache.name + ".xz")
            packed.write_bytes(lzma.compress(cache.read_bytes(), preset=6))
            log(f"{dataset}/{file}: cache {cache.name} ({cache.stat().st_size / 2**20:.1f} MiB, "
                f"{packed.stat().st_size / 2**20:.1f} MiB packed)")
        manifest["datasets"][dataset] = files
    compositions: dict[str, Any] = {}
    for dataset in args.composition_datasets:
        split = "test" if has_train_file(dataset, data_dir) else "reserved"
        rows = split_rows(dataset, split, data_dir)[: args.compositions]
        crystals = load_rows(dataset, rows, data_dir, progress=False)
        compositions[dataset] = {"source": f"{dataset} {split} rows, the first {len(rows)}",
                                 "atomic_numbers": [c.atomic_numbers.tolist() for c in crystals]}
        log(f"compositions: {compositions[dataset]['source']}")
    write_json(carry / "compositions.json", compositions)
    if args.wheels:
        download_wheels(carry / "wheels")
    report_travel(carry, args.run)
    return 0


def download_wheels(folder: Path) -> None:
    """pydantic and its dependencies, at the versions installed here, as Python 3.12 x86-64 wheels."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    for wheel in folder.glob("*.whl"):
        wheel.unlink()  # one version of each, or pip refuses the install
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
               "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(folder), *pins]
    subprocess.run(command, check=True)
    log(f"wheels: {', '.join(sorted(w.name for w in folder.glob('*.whl')))}")


def report_travel(carry: Path, run_folder: str | Path) -> int:
    """Bytes that would travel to the device (git's tracked and unignored files, plus the carry folder)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        log("travel: not a git checkout, size not reported")
        return 0
    sizes = {name: (ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file()}
    carried = sum(p.stat().st_size for p in Path(carry).rglob("*") if p.is_file())
    total = sum(sizes.values()) + carried
    log(f"travel: {sum(sizes.values()) / 2**20:.1f} MiB of the working tree + {carried / 2**20:.1f} MiB carried = "
        f"{total / 2**20:.1f} MiB (limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if total > TRAVEL_LIMIT:
        run = Path(run_folder).resolve().relative_to(ROOT).as_posix() + "/"
        spare = [n for n in sizes if n.startswith("training/") and not n.startswith(run) and sizes[n] > 2**20]
        after = total - sum(sizes[n] for n in spare)
        log(f"travel: OVER THE LIMIT; other runs' training states are not needed by the call: leave them behind "
            f"with `git rm -q --cached {' '.join(spare)}` ({after / 2**20:.1f} MiB would travel) and track them "
            f"again after it with `git reset -q -- {' '.join(spare)}` (CONTRIBUTING.md)")
    return total


# ---------------------------------------------------------------------------------------------------------------
# session (on the device): the orchestrator

def session(args: argparse.Namespace) -> int:
    """Run the phases with their time limits; write ``gpu_session.json`` and the training parts into ``--out``."""
    started = time.monotonic()
    deadline = started + 60 * args.budget_minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="equicsp-gpu-"))
    carry = Path(args.carry)
    report: dict[str, Any] = {"arguments": vars(args), "environment": environment(), "phases": {}}
    write_json(out / JSON_NAME, report)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (carry / "data").is_dir():
        env["EQUICSP_DATA_DIR"] = str((carry / "data").resolve())
    env["EQUICSP_CACHE_DIR"] = str(unpack_caches(carry, work / "cache"))
    run = work / "run"
    run.mkdir()
    source = Path(args.run)
    for name in ("config.yaml", "resume.pt", "metrics.jsonl"):
        shutil.copyfile(source / name, run / name)
    start_sha = sha256(run / "resume.pt")
    sets = [item for value in args.set for item in ("--set", value)]

    def phase(name: str, command: list[str], limit: float, result: Path | None = None) -> None:
        limit = max(10.0, min(limit, deadline - time.monotonic()))
        log(f"phase {name}: {' '.join(command[1:])} (limit {limit:.0f} s)")
        record = run_limited(command, env, limit, watch=run / "metrics.jsonl" if name == "train" else None)
        if result is not None and result.is_file():
            record["result"] = json.loads(result.read_text())
        report["phases"][name] = record
        write_json(out / JSON_NAME, report)
        log(f"phase {name}: exit {record['exit_status']} after {record['seconds']:.0f} s")

    me = [sys.executable, str(Path(__file__).resolve())]
    phase("check_resume", me + ["check-resume", "--run", str(run), "--preset", args.preset, *sets, "--device",
                                args.device, "--result", str(work / "check.json")], 180, work / "check.json")
    bench_limit = args.bench_seconds + 60  # its own budget, loading the models, warming up
    room = deadline - time.monotonic() - bench_limit - PACK_SECONDS - TRAIN_OVERHEAD_SECONDS
    minutes = max(0.05, min(args.minutes, room / 60))
    epochs_before = count_lines(run / "metrics.jsonl")
    train_command = [sys.executable, "-m", "equicsp_core.cli", "train", "--preset", args.preset, *sets, "--out",
                     str(run), "--resume", "--device", args.device, "--max-minutes", f"{minutes:.3f}"]
    if args.max_epochs is not None:
        epoch = last_epoch(run / "metrics.jsonl")
        train_command += ["--set", f"train.epochs={epoch + args.max_epochs}"]
    phase("train", train_command, 60 * minutes + TRAIN_OVERHEAD_SECONDS)
    lines = (run / "metrics.jsonl").read_text().splitlines()[epochs_before:]
    report["phases"]["train"]["new_epochs"] = [json.loads(line) for line in lines]
    if lines:
        report["training"] = pack_run(run, out, start_sha, source)
    else:
        log("no new epoch: nothing of the training run is packed")
    write_json(out / JSON_NAME, report)
    phase("bench", me + ["bench", "--device", args.device, "--carry", str(carry), "--seconds", str(args.bench_seconds),
                         "--crystals", str(args.crystals), "--steps", args.steps, "--models", args.models,
                         "--compare-crystals", str(args.compare_crystals), "--compare-steps", str(args.compare_steps),
                         "--result", str(work / "bench.json")], bench_limit, work / "bench.json")
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / JSON_NAME, report)
    shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, record in report["phases"].items() if record["exit_status"] != 0]
    outcome = f"failed phases: {', '.join(failed)}" if failed else "all phases passed"
    log(f"session done in {report['seconds']:.0f} s; {outcome}")
    return 1 if failed else 0


def run_limited(command: list[str], env: dict[str, str], limit: float, watch: Path | None = None) -> dict[str, Any]:
    """Run ``command`` (output to this log), interrupt it (SIGINT, then SIGKILL) after ``limit`` seconds; with
    ``watch`` print the lines appended to that file while it runs (the epochs of a training run)."""
    started = time.monotonic()
    seen = count_lines(watch) if watch is not None else 0
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    timed_out = False
    while process.poll() is None:
        if time.monotonic() - started > limit and not timed_out:
            timed_out = True
            log(f"time limit of {limit:.0f} s reached: interrupting")
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        time.sleep(1)
        if watch is not None and watch.is_file():
            lines = watch.read_text().splitlines()
            for line in lines[seen:]:
                log(f"epoch: {line}")
            seen = len(lines)
    return {"exit_status": process.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - started, 1)}


def environment() -> dict[str, Any]:
    """The machine, for the report: python, nvidia-smi's GPU line (when there is one)."""
    facts: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        facts["nvidia_smi"] = f"not available ({error})"
    return facts


def unpack_caches(carry: Path, target: Path) -> Path:
    """Decompress ``carry/cache/*.pt.xz`` into ``target`` (the engine's ``$EQUICSP_CACHE_DIR``)."""
    target.mkdir(parents=True, exist_ok=True)
    for packed in sorted((carry / "cache").glob("*.pt.xz")):
        (target / packed.name[:-3]).write_bytes(lzma.decompress(packed.read_bytes()))
    return target


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def last_epoch(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


def pack_run(run: Path, out: Path, start_sha: str, source: Path) -> dict[str, Any]:
    """Tar the run folder's files and split the tar into ``train.tar.part-NN`` files in ``out``; the manifest."""
    tar_path = run.parent / "train.tar"
    members = [name for name in RUN_FILES if (run / name).is_file()]
    with tarfile.open(tar_path, "w") as tar:
        for name in members:
            tar.add(run / name, arcname=name)
    for old in out.glob(PART_PREFIX + "-*"):
        old.unlink()
    parts = []
    with open(tar_path, "rb") as handle:
        for number, block in enumerate(iter(lambda: handle.read(PART_BYTES), b"")):
            part = out / f"{PART_PREFIX}-{number:02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"source": str(source), "start_resume_sha256": start_sha, "tar_sha256": sha256(tar_path),
                "members": {name: sha256(run / name) for name in members}, "parts": parts,
                "epoch": last_epoch(run / "metrics.jsonl")}
    tar_path.unlink()
    log(f"packed {', '.join(members)} into {len(parts)} part(s); the run is at epoch {manifest['epoch']}")
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# check-resume (a phase): CPU-saved state onto the device and back

def check_resume(args: argparse.Namespace) -> int:
    """Restore ``resume.pt`` on ``--device``, take one step, save, restore that on the CPU, take one step there.

    Checks that the weights arrive unchanged, that the saved file holds CPU tensors only, that the CPU
    generator's state goes round trip, and that the loss of the same batch with the same generator state is
    the same on both devices up to arithmetic (the draws are made on the CPU, :mod:`equicsp_core.rng`).
    """
    import torch

    from equicsp_core.config import load_run_config
    from equicsp_core.crystal import CrystalBatch
    from equicsp_core.hardware import resolve_device
    from equicsp_core.splits import load_rows, split_rows
    from equicsp_core.train import build_training

    config = load_run_config(args.preset, args.set)
    device = resolve_device(args.device)
    path = Path(args.run) / "resume.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    result: dict[str, Any] = {"device": str(device), "epoch": saved["progress"]["epoch"]}
    crystals = load_rows(config.dataset, split_rows(config.dataset, "selection")[: args.crystals], progress=False)
    batch = CrystalBatch.collate(crystals)

    on_device = build_training(config, device)
    on_device.restore(path)
    result["weights_equal_after_restore"] = all(
        torch.equal(value.cpu(), saved["model"][key]) for key, value in on_device.model.net.state_dict().items())
    generator_before = on_device.generator.get_state()
    terms = on_device.step(batch, config.train.precision, config.train.grad_clip_value)
    result["device_step_loss"] = None if terms is None else float(terms["loss"].detach())
    checked = Path(args.run).parent / "check-resume.pt"
    on_device.save(checked, saved["progress"])
    written = torch.load(checked, map_location=None, weights_only=True)
    result["saved_tensors_all_on_cpu"] = all(t.device.type == "cpu" for t in _tensors(written))

    on_cpu = build_training(config, "cpu")
    on_cpu.restore(checked)
    result["generator_round_trip"] = torch.equal(on_cpu.generator.get_state(), on_device.generator.get_state())
    result["weights_round_trip"] = all(torch.equal(value, on_device.model.net.state_dict()[key].cpu())
                                       for key, value in on_cpu.model.net.state_dict().items())
    terms = on_cpu.step(batch, config.train.precision, config.train.grad_clip_value)
    result["cpu_step_loss"] = None if terms is None else float(terms["loss"].detach())

    # the same batch, the same generator state, on both devices: the same draws, so only arithmetic differs
    losses = {}
    for name, objects in (("cpu", build_training(config, "cpu")), ("device", build_training(config, device))):
        objects.restore(path)
        objects.generator.set_state(generator_before)
        with torch.no_grad():
            losses[name] = float(objects.model.loss(batch.to(next(objects.model.parameters()).device),
                                                    objects.generator)["loss"])
    result["same_draws_loss_fp32"] = losses
    result["same_draws_relative_difference"] = abs(losses["cpu"] - losses["device"]) / abs(losses["cpu"])
    checked.unlink()
    result["passed"] = bool(result["weights_equal_after_restore"] and result["saved_tensors_all_on_cpu"]
                            and result["generator_round_trip"] and result["weights_round_trip"]
                            and result["device_step_loss"] is not None and result["cpu_step_loss"] is not None
                            and result["same_draws_relative_difference"] < 1e-3)
    write_json(Path(args.result), result)
    log(f"check-resume: {json.dumps(result)}")
    return 0 if result["passed"] else 1


def _tensors(value: Any):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


# ---------------------------------------------------------------------------------------------------------------
# bench (a phase): sampling on the device

def bench(args: argparse.Namespace) -> int:
    """Sampling throughput and peak memory per model, precision and step count; the same seed on CPU and device.

    Each measurement is the sampler itself (:func:`equicsp_core.sampler.sample`) on one batch of compositions
    of the model's dataset, timed between device synchronisations after a warm-up; what would not fit in the
    remaining ``--seconds`` (estimated from the 100-step time) is skipped or done on fewer crystals, and says so.
    """
    import torch

    from equicsp_core.checkpoint import load_model
    from equicsp_core.hardware import resolve_device

    started = time.monotonic()
    deadline = started + args.seconds
    device = resolve_device(args.device)
    compositions = json.loads((Path(args.carry) / "compositions.json").read_text())
    steps_list = [int(s) for s in args.steps.split(",")]
    result: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "throughput": [], "memory": [],
                              "same_seed_cpu_vs_device": [], "skipped": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    result["cpu_threads"] = torch.get_num_threads()
    out = Path(args.result)

    def save() -> None:
        result["seconds"] = round(time.monotonic() - started, 1)
        write_json(out, result)

    for name in args.models.split(","):
        model, card = load_model(name, device)
        zs = compositions[card.get("dataset", name)]["atomic_numbers"]
        numbers, counts = _batch_of(zs, args.crystals)
        for precision in ("fp32", "bf16"):
            _timed(model, *_batch_of(zs, 8), 2, precision, "cpu", device)  # warm-up
        base: dict[str, float] = {}
        for steps in steps_list:
            for precision in ("fp32", "bf16"):
                per_step = base.get(precision)
                crystals = args.crystals
                if per_step is not None:
                    room = deadline - time.monotonic() - 20
                    if per_step * steps > room:
                        crystals = int(args.crystals * room / (per_step * steps))
                        if crystals < 32:
                            result["skipped"].append(f"{name} {precision} {steps} steps: ~{per_step * steps:.0f} s "
                                                     f"for {args.crystals} crystals, {room:.0f} s left")
                            continue
                if time.monotonic() > deadline:
                    result["skipped"].append(f"{name} {precision} {steps} steps: out of time")
                    continue
                record = _timed(model, *_batch_of(zs, crystals), steps, precision, "cpu", device)
                base.setdefault(precision, record["seconds"] / steps * args.crystals / crystals)
                result["throughput"].append({"model": name, **record})
                log(f"bench: {name} {json.dumps(record)}")
                save()
        if device.type == "cuda" and time.monotonic() < deadline - 30:
            # the noise drawn on the GPU instead of the CPU (the engine's rule, equicsp_core.rng): its cost
            record = _timed(model, numbers, counts, steps_list[0], "bf16", "cuda", device)
            result["throughput"].append({"model": name, **record})
            log(f"bench: {name} {json.dumps(record)}")
        if device.type == "cuda":
            for precision in ("fp32", "bf16"):
                for crystals in (256, 4096):
                    if time.monotonic() > deadline - 20:
                        break
                    record = _timed(model, *_batch_of(zs, crystals), 2, precision, "cpu", device)
                    result["memory"].append({"model": name, **record})
        save()
    for name in args.models.split(","):
        if time.monotonic() > deadline - 10:
            result["skipped"].append(f"{name}: same-seed comparison, out of time")
            continue
        result["same_seed_cpu_vs_device"].append(_compare(name, compositions, args, device))
        log(f"bench: {json.dumps(result['same_seed_cpu_vs_device'][-1])}")
        save()
    save()
    return 0


def _batch_of(zs: list[list[int]], crystals: int):
    """``(atomic_numbers, num_atoms)`` of ``crystals`` compositions, cycling through ``zs``."""
    import torch

    chosen = [zs[i % len(zs)] for i in range(crystals)]
    return torch.tensor([z for c in chosen for z in c]), torch.tensor([len(c) for c in chosen])


def _timed(model, numbers, counts, steps: int, precision: str, noise_on: str, device) -> dict[str, Any]:
    """One timed :func:`sample` call: seconds, crystals per second, peak device memory, valid fraction."""
    import torch

    from equicsp_core.sampler import sample

    generator = torch.Generator(noise_on).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    result = sample(model, numbers, counts, steps=steps, generator=generator, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    crystals = int(counts.numel())
    valid = sum(c is not None for c in result.crystals())
    record = {"crystals": crystals, "atoms": int(counts.sum()), "steps": steps, "precision": precision,
              "noise_on": noise_on, "seconds": round(seconds, 3), "crystals_per_s": round(crystals / seconds, 2),
              "valid_fraction": round(valid / crystals, 4)}
    if device.type == "cuda":
        record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return record


def _compare(name: str, compositions: dict, args: argparse.Namespace, device) -> dict[str, Any]:
    """The same seed (noise drawn on the CPU) sampled on the CPU in fp32 and on the device in fp32 and bf16:
    per-crystal differences of the results, and of one denoiser call on identical inputs."""
    import torch

    from equicsp_core.checkpoint import load_model

    cpu_model, card = load_model(name, "cpu")
    device_model, _ = load_model(name, device)
    zs = compositions[card.get("dataset", name)]["atomic_numbers"]
    numbers, counts = _batch_of(zs, args.compare_crystals)
    record: dict[str, Any] = {"model": name, "crystals": args.compare_crystals, "steps": args.compare_steps,
                              "seed": 0}
    reference = _timed_result(cpu_model, numbers, counts, args.compare_steps, "fp32", torch.device("cpu"))
    record["cpu_fp32_seconds"] = reference[1]
    for precision in ("fp32", "bf16"):
        other, seconds = _timed_result(device_model, numbers, counts, args.compare_steps, precision, device)
        record[f"device_{precision}"] = {"seconds": seconds, **_differences(reference[0], other)}
    record["one_call"] = _one_call_difference(cpu_model, device_model, numbers, counts, device)
    return record


def _timed_result(model, numbers, counts, steps, precision, device):
    import torch

    from equicsp_core.sampler import sample

    began = time.perf_counter()
    result = sample(model, numbers, counts, steps=steps, generator=torch.Generator().manual_seed(0),
                    precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, round(time.perf_counter() - began, 3)


def _differences(a, b) -> dict[str, Any]:
    """Per crystal: the largest fractional-coordinate difference (on the torus), the largest relative length
    difference and the largest angle difference (degrees); their median, 90th percentile and maximum."""
    import torch

    da = a.batch.frac_coords.double().cpu() - b.batch.frac_coords.double().cpu()
    da = (da - da.round()).abs().amax(-1)
    frac = torch.zeros(a.batch.num_crystals, dtype=torch.float64).scatter_reduce(0, a.batch.batch.cpu(), da, "amax")
    la, lb = a.batch.lengths.double().cpu(), b.batch.lengths.double().cpu()
    length = ((la - lb).abs() / la.abs()).amax(-1)
    angle = (a.batch.angles.double().cpu() - b.batch.angles.double().cpu()).abs().amax(-1)
    both = a.finite.cpu() & b.finite.cpu()

    def summary(values: torch.Tensor) -> dict[str, float]:
        values = values[both]
        if values.numel() == 0:
            return {}
        return {"median": float(values.median()), "p90": float(values.quantile(0.9)), "max": float(values.max())}

    close = (frac < 1e-3) & (length < 1e-3) & (angle < 0.1) & both
    return {"finite_both": int(both.sum()), "frac": summary(frac), "length_relative": summary(length),
            "angle_deg": summary(angle), "fraction_close": round(float(close.sum()) / max(int(both.sum()), 1), 4)}


def _one_call_difference(cpu_model, device_model, numbers, counts, device) -> dict[str, Any]:
    """Relative L2 difference of each denoiser output, CPU fp32 against the device in fp32 and bf16, on the
    same noised inputs at t = 10, 500 and 1000."""
    import torch

    generator = torch.Generator().manual_seed(1)
    frac = torch.rand((numbers.shape[0], 3), generator=generator)
    lattice = torch.randn((counts.shape[0], 6), generator=generator)
    batch = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    out: dict[str, Any] = {}
    for t in (10, 500, 1000):
        time_ = torch.full((counts.shape[0],), t)
        with torch.no_grad():
            ref = cpu_model.denoise(numbers, frac, lattice, time_, counts, batch, cpu_model.graph_for(counts))
            for precision in ("fp32", "bf16"):
                moved = [x.to(device) for x in (numbers, frac, lattice, time_, counts, batch)]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    got = device_model.denoise(*moved, device_model.graph_for(moved[4]))
                out[f"t{t}_{precision}"] = {
                    head: float((getattr(got, head).float().cpu() - getattr(ref, head)).norm()
                                / getattr(ref, head).norm())
                    for head in ("lattice", "coord", "score") if getattr(ref, head) is not None}
    return out


# ---------------------------------------------------------------------------------------------------------------
# unpack (here)

def unpack(args: argparse.Namespace) -> int:
    """Join the parts, check them against the manifest of ``gpu_session.json``, fill the run folder."""
    source = Path(args.files)
    report = json.loads((source / JSON_NAME).read_text())
    manifest = report.get("training")
    if not manifest:
        print(f"unpack: {source / JSON_NAME} has no training manifest: the call packed no training state",
              file=sys.stderr)
        return 2
    into = Path(args.into)
    current = into / "resume.pt"
    if current.is_file() and sha256(current) != manifest["start_resume_sha256"] and not args.force:
        print(f"unpack: {current} is not the state the GPU run started from (sha256 {manifest['start_resume_sha256']}"
              f"); the run moved on meanwhile: pass --force to replace it anyway", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "train.tar"
        with open(tar_path, "wb") as joined:
            for part in manifest["parts"]:
                block = (source / part["name"]).read_bytes()
                if hashlib.sha256(block).hexdigest() != part["sha256"]:
                    print(f"unpack: {part['name']} is damaged (sha256 differs from the manifest)", file=sys.stderr)
                    return 2
                joined.write(block)
        if sha256(tar_path) != manifest["tar_sha256"]:
            print("unpack: the joined tar differs from the manifest", file=sys.stderr)
            return 2
        with tarfile.open(tar_path) as tar:
            tar.extractall(Path(tmp) / "run", filter="data")
        for name, digest in manifest["members"].items():
            if sha256(Path(tmp) / "run" / name) != digest:
                print(f"unpack: {name} differs from the manifest", file=sys.stderr)
                return 2
        into.mkdir(parents=True, exist_ok=True)
        for name in manifest["members"]:
            if name != "config.yaml":
                shutil.copyfile(Path(tmp) / "run" / name, into / name)
    print(f"unpack: {', '.join(n for n in manifest['members'] if n != 'config.yaml')} -> {into} "
          f"(epoch {manifest['epoch']})")
    return 0


def table(args: argparse.Namespace) -> int:
    """Markdown tables of a ``gpu_session.json`` for BENCHMARKS.md: throughput, memory, CPU/GPU differences."""
    report = json.loads(Path(args.report).read_text())
    phases = report.get("phases", {})
    bench_result = phases.get("bench", {}).get("result", {})
    where = bench_result.get("gpu") or bench_result.get("device", "?")
    machine = report["environment"].get("nvidia_smi", "")
    print(f"Sampling on {where} (torch {bench_result.get('torch', '?')}; {machine}); noise drawn on the CPU unless "
          "stated\n")
    print("| model | steps | precision | noise on | crystals | seconds | crystals/s | peak memory (MiB) | valid |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in bench_result.get("throughput", []):
        print(f"| {r['model']} | {r['steps']} | {r['precision']} | {r['noise_on']} | {r['crystals']} | "
              f"{r['seconds']} | {r['crystals_per_s']} | {r.get('peak_memory_mib', '-')} | {r['valid_fraction']:.1%} |")
    if bench_result.get("memory"):
        print("\n| model | precision | crystals | atoms | peak memory (MiB) |\n|---|---|---:|---:|---:|")
        for r in bench_result["memory"]:
            print(f"| {r['model']} | {r['precision']} | {r['crystals']} | {r['atoms']} | {r['peak_memory_mib']} |")
    if bench_result.get("same_seed_cpu_vs_device"):
        print("\nThe same seed on the CPU (fp32) and on the device: per-crystal largest difference, median / max\n")
        print("| model | device precision | crystals | steps | frac. coords | lengths (relative) | angles (deg) | "
              "close* | CPU s | device s |")
        print("|---|---|---:|---:|---|---|---|---:|---:|---:|")
        for c in bench_result["same_seed_cpu_vs_device"]:
            for precision in ("fp32", "bf16"):
                d = c[f"device_{precision}"]
                def cell(key: str, d: dict = d) -> str:
                    return f"{d[key].get('median', float('nan')):.2g} / {d[key].get('max', float('nan')):.2g}"

                print(f"| {c['model']} | {precision} | {c['crystals']} | {c['steps']} | {cell('frac')} | "
                      f"{cell('length_relative')} | {cell('angle_deg')} | {d['fraction_close']:.0%} | "
                      f"{c['cpu_fp32_seconds']} | {d['seconds']} |")
        print("\n*close: every coordinate within 1e-3, every length within 1e-3 relative, every angle within 0.1 deg")
    train_phase = phases.get("train", {})
    epochs = train_phase.get("new_epochs", [])
    if epochs:
        seconds = sum(e["seconds"] for e in epochs)
        validated = [e for e in epochs if "val_loss" in e]
        print(f"\nTraining: epochs {epochs[0]['epoch']}-{epochs[-1]['epoch']} in {seconds:.0f} s "
              f"({seconds / len(epochs):.1f} s per epoch, {epochs[-1]['crystals_per_s']} crystals/s); "
              + (f"last selection loss {validated[-1]['val_loss']:.4f} (epoch {validated[-1]['epoch']})"
                 if validated else "no validation in these epochs"))
    return 0


# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write the carry folder (here, once)")
    p.add_argument("--carry", default=str(ROOT / "gpu_carry"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--datasets", nargs="+", default=["mp_20"], help="datasets whose training data travel")
    p.add_argument("--composition-datasets", nargs="+", default=["mp_20", "perov_5"],
                   help="datasets whose report rows give the sampling checks' compositions")
    p.add_argument("--compositions", type=int, default=1000, help="compositions per dataset")
    p.add_argument("--no-wheels", dest="wheels", action="store_false", help="do not download the wheels")
    p.add_argument("--run", default=str(ROOT / "training" / "mp_20-cpu"), help="the run folder the call continues")
    p.set_defaults(func=prepare)

    p = sub.add_parser("session", help="the device call (scripts/gpu_session.sh runs it)")
    p.add_argument("--out", required=True)
    p.add_argument("--carry", default=str(ROOT / "gpu_carry"))
    p.add_argument("--run", default=str(ROOT / "training" / "mp_20-cpu"), help="run folder to continue (copied)")
    p.add_argument("--preset", default="mp_20-cpu")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=8.0, help="training time at most (stops at the first epoch end "
                   "after it); less where --budget-minutes leaves less after the other phases")
    p.add_argument("--max-epochs", type=int, default=None, help="at most this many new epochs (0: restore only)")
    p.add_argument("--budget-minutes", type=float, default=9.5, help="the whole session; training shrinks to fit")
    p.add_argument("--bench-seconds", type=float, default=100.0, help="the sampling measurements' own budget")
    p.add_argument("--crystals", type=int, default=1000, help="crystals per throughput measurement")
    p.add_argument("--steps", default="100,1000", help="step counts of the throughput measurements")
    p.add_argument("--models", default="perov_5,mp_20")
    p.add_argument("--compare-crystals", type=int, default=64)
    p.add_argument("--compare-steps", type=int, default=100)
    p.set_defaults(func=session)

    p = sub.add_parser("check-resume", help="(a phase) the committed state onto the device and back")
    p.add_argument("--run", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--crystals", type=int, default=32)
    p.add_argument("--result", required=True)
    p.set_defaults(func=check_resume)

    p = sub.add_parser("bench", help="(a phase) sampling on the device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--carry", default=str(ROOT / "gpu_carry"))
    p.add_argument("--seconds", type=float, default=100.0)
    p.add_argument("--crystals", type=int, default=1000)
    p.add_argument("--steps", default="100,1000")
    p.add_argument("--models", default="perov_5,mp_20")
    p.add_argument("--compare-crystals", type=int, default=64)
    p.add_argument("--compare-steps", type=int, default=100)
    p.add_argument("--result", required=True)
    p.set_defaults(func=bench)

    p = sub.add_parser("unpack", help="put the returned training state into the run folder (here)")
    p.add_argument("files", help="the folder the call's files came back to (files_at)")
    p.add_argument("--into", default=str(ROOT / "training" / "mp_20-cpu"))
    p.add_argument("--force", action="store_true", help="replace a resume.pt that moved on since the call started")
    p.set_defaults(func=unpack)

    p = sub.add_parser("table", help="markdown tables of a gpu_session.json, for BENCHMARKS.md (here)")
    p.add_argument("report", help="the gpu_session.json that came back")
    p.set_defaults(func=table)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
