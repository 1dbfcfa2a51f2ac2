"""Peak memory of sampling per batch size, for the GPU batch-size advice of docs/cluster.md (measured on a CPU).

    python benchmarks/sampling_memory.py --threads 1 --out benchmarks/results/sampling_memory.json

Each (model, formula, batch size) runs in its own subprocess, so that its peak resident memory is its own: the
model is loaded, then ``batch`` crystals of ``formula`` are sampled for 2 steps (a step's memory does not depend
on the number of steps). Reported: the peak RSS minus the RSS before sampling (the sampler's working memory:
activations and the fully connected graph of each crystal, ``N²`` edges for ``N`` atoms), and its growth per
crystal between the two largest batches. On a GPU the same tensors live in device memory (fp32 here), beside the
CUDA context (about 0.5 GB) and the weights; the advice in docs/cluster.md extrapolates from these figures.
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

#: (shipped model, formula of its largest cells here): perov_5 is 5-atom perovskites, mp_20 goes to 20 atoms.
CASES = (("perov_5", "SrTiO3"), ("mp_20", "Sr4Ti4O12"))
BATCHES = (16, 64, 256)


def measure(model_name: str, formula: str, batch: int, threads: int) -> dict:
    """In this process: the sampler's peak working memory (MiB) for ``batch`` crystals of ``formula``."""
    import torch

    from equicsp_core.checkpoint import load_model
    from equicsp_core.predict import predict_structures

    torch.set_num_threads(threads)
    model, _ = load_model(model_name, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    predict_structures(model, [formula], num_samples=batch, steps=2, batch_size=batch)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": model_name, "formula": formula, "batch": batch, "working_mib": round((peak - before) / 1024, 1),
            "seconds_2_steps": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "FORMULA", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_name, formula, batch = args.one
        print(json.dumps(measure(model_name, formula, int(batch), args.threads)))
        return
    rows = []
    for model_name, formula in CASES:
        for batch in BATCHES:
            run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", model_name,
                                  formula, str(batch)], capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    per_crystal = {}
    for model_name, formula in CASES:
        small, large = (next(r for r in rows if r["model"] == model_name and r["batch"] == b) for b in BATCHES[-2:])
        per_crystal[model_name] = round((large["working_mib"] - small["working_mib"]) / (BATCHES[-1] - BATCHES[-2]),
                                        3)
    report = {"rows": rows, "mib_per_crystal": per_crystal, "threads": args.threads, "device": "cpu",
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/sampling_memory.py --threads 1 "
                         "--out benchmarks/results/sampling_memory.json"}
    print(json.dumps(per_crystal))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
