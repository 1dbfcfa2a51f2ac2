"""Cost of training per batch size: crystals/s, peak memory and the epoch they imply (issue 17).

    python benchmarks/training_cost.py --preset mpts_52-cpu --batch-sizes 16 32 64 128 --threads 1 \\
        --max-rss-gb 4 --out benchmarks/results/training_cost_mpts52.json

Each batch size runs in its own subprocess, so that its peak resident memory is its own, and does what
``equicsp train`` does up to its first optimiser steps: the allocator setting of the ``equicsp`` program
(:func:`equicsp_core.runtime.keep_freed_memory`; ``--default-allocator`` leaves glibc's alone) and its bound on
the oneDNN primitive caches (:func:`equicsp_core.runtime.bound_onednn_caches`; set
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 LRU_CACHE_CAPACITY=1024`` for the libraries' default), the preset's
model, Adam and weight average, the data protocol's training and selection sets
(:func:`equicsp_core.train.training_splits`, so the data's memory is in the figure), then
:meth:`equicsp_core.train.TrainingObjects.step` on the batches of epoch 1's order: one warm-up, ``--steps`` timed,
and last the epoch's largest batch (the most edges, Σ N_i² over its crystals N_i), so that the peak RSS is that of
the worst batch of the epoch. Reported per batch size: the mean seconds of a timed step, the crystals/s over the
timed steps, the largest batch's seconds, the RSS before the first step (data + model) and the peak,
``rss_by_step`` (with ``--rss-every K``: the resident memory, GB, after every K-th timed step, to tell a plateau
from growth), ``epoch_seconds`` = training crystals / crystals/s (one epoch's optimiser steps, validation
excluded), and
``epoch_seconds_by_edges``, the timed seconds scaled by the epoch's edges over the timed steps' edges (the
timed batches of a dataset with 1 to 52 atoms can hold more or fewer edges than the epoch's mean batch: the
cost of a step is part per atom, part per edge, so the epoch lies between the two estimates).

Batch sizes run in increasing order; one whose predicted peak (the last peak plus that run's growth over its
starting RSS, times the ratio of the two batches' largest edge counts) exceeds ``--max-rss-gb`` is not run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _current_rss_gb() -> float:
    """This process's resident memory now, GB (Linux: the second field of ``/proc/self/statm``, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e9


def _rss_gb() -> float:
    """This process's peak resident memory so far, GB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def edges(batch) -> int:
    """Directed edges of the fully connected graphs of a batch: Σ N_i² (self-pairs included)."""
    return int((batch.num_atoms ** 2).sum())


def largest_batch_edges(num_atoms: list[int], order: list[int], batch_size: int) -> int:
    """The largest Σ N_i² over the batches of one epoch's ``order``."""
    return max(sum(num_atoms[i] ** 2 for i in order[start:start + batch_size])
               for start in range(0, len(order), batch_size))


def measure(preset: str, batch_size: int, steps: int, threads: int, default_allocator: bool = False,
            rss_every: int = 0) -> dict:
    """In this process: the cost of ``steps`` training steps of ``preset`` at ``batch_size`` (see the module)."""
    import torch

    from equicsp_core.config import load_run_config
    from equicsp_core.crystal import CrystalBatch
    from equicsp_core.runtime import bound_onednn_caches, keep_freed_memory
    from equicsp_core.train import build_training, epoch_order, training_splits

    if not default_allocator:
        keep_freed_memory()
    caches = bound_onednn_caches()
    torch.set_num_threads(threads)
    config = load_run_config(preset, [f"train.batch_size={batch_size}"])
    settings = config.train
    run = build_training(config, "cpu")
    train_set, _, _ = training_splits(config.dataset, progress=False)
    order = epoch_order(len(train_set), settings.seed, 0)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) < steps + 2:
        raise ValueError(f"{len(train_set)} crystals make {len(batches)} batches of {batch_size}; need {steps + 2}")
    num_atoms = [crystal.num_atoms for crystal in train_set]
    largest = max(batches, key=lambda members: sum(num_atoms[i] ** 2 for i in members))
    start_rss = _rss_gb()

    def step(members: list[int]) -> tuple[float, int]:
        batch = CrystalBatch.collate([train_set[i] for i in members])
        started = time.perf_counter()
        run.step(batch, settings.precision, settings.grad_clip_value)
        return time.perf_counter() - started, edges(batch)

    step(batches[0])  # warm-up
    timed, rss_by_step = [], {}
    for number, members in enumerate(batches[1:steps + 1], 1):
        timed.append(step(members))
        if rss_every and number % rss_every == 0:
            rss_by_step[number] = round(_current_rss_gb(), 2)
    largest_seconds, largest_edges = step(largest)
    seconds = sum(s for s, _ in timed)
    crystals_per_s = steps * batch_size / seconds
    return {
        "preset": preset, "dataset": config.dataset, "batch_size": batch_size, "threads": threads,
        "allocator": "glibc default" if default_allocator else "keep_freed_memory",
        "onednn_cache_capacity": caches,
        "precision": settings.precision, "train_crystals": len(train_set),
        "mean_atoms_train": round(sum(num_atoms) / len(num_atoms), 2),
        "timed_steps": steps, "mean_edges_timed": round(sum(e for _, e in timed) / steps),
        "mean_edges_epoch": round(sum(n ** 2 for n in num_atoms) / len(batches)),
        "seconds_per_step": round(seconds / steps, 3), "crystals_per_s": round(crystals_per_s, 2),
        "largest_batch_edges": largest_edges, "largest_batch_seconds": round(largest_seconds, 3),
        "rss_before_steps_gb": round(start_rss, 2), "peak_rss_gb": round(_rss_gb(), 2), "rss_by_step": rss_by_step,
        "epoch_seconds": round(len(train_set) / crystals_per_s),
        "epoch_seconds_by_edges": round(seconds * sum(n ** 2 for n in num_atoms) / sum(e for _, e in timed)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rss-gb", type=float, default=4.0, help="skip a batch size predicted to exceed this")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (the equicsp program raises them)")
    parser.add_argument("--rss-every", type=int, default=0, metavar="K",
                        help="record the resident memory after every K-th timed step (0: only the peak)")
    parser.add_argument("--one", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1 or min(args.batch_sizes) < 1 or args.rss_every < 0:
        parser.error("--steps, --threads and every batch size must be >= 1, --rss-every >= 0")
    if args.one:
        print(json.dumps(measure(args.preset, args.one, args.steps, args.threads, args.default_allocator,
                                 args.rss_every)))
        return

    from equicsp_core.config import load_run_config
    from equicsp_core.train import epoch_order, training_splits

    config = load_run_config(args.preset)
    train_set, _, _ = training_splits(config.dataset, progress=False)  # builds the data caches once, here
    num_atoms = [crystal.num_atoms for crystal in train_set]
    order = epoch_order(len(train_set), config.train.seed, 0)
    rows, skipped = [], []
    for batch_size in sorted(args.batch_sizes):
        if rows:
            last = rows[-1]
            growth = largest_batch_edges(num_atoms, order, batch_size) / last["largest_batch_edges"]
            predicted = last["rss_before_steps_gb"] + (last["peak_rss_gb"] - last["rss_before_steps_gb"]) * growth
            if predicted > args.max_rss_gb:
                skipped.append({"batch_size": batch_size, "predicted_peak_rss_gb": round(predicted, 2)})
                print(json.dumps(skipped[-1]), flush=True)
                continue
        command = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--rss-every", str(args.rss_every), "--one", str(batch_size)] + (
                       ["--default-allocator"] if args.default_allocator else [])
        result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    report = {"rows": rows, "skipped": skipped, "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python benchmarks/training_cost.py",
                                                                       *sys.argv[1:]])}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
