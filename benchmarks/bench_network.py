"""Throughput, FLOP rate and peak memory of the denoiser, ours vs the literal reference (official structure).

    python benchmarks/bench_network.py --threads 2                      # the full table
    python benchmarks/bench_network.py --threads 2 --datasets perov_5 --configs small --impls fast

Each configuration runs in its own subprocess so that its peak RSS is its own. Batches are 128 crystals
drawn (seed 0) from the test split. Timings are medians over ``--iters`` iterations after one warm-up.
FLOPs count the matrix products each implementation performs (backward = 2× forward for products whose
input needs a gradient, 1× for the Fourier-feature products whose input does not); "official-equivalent"
GFLOP/s divides the reference implementation's FLOPs by our time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from equicsp_core.train import cpu_model  # noqa: E402

CONFIGS = {
    "full": {"hidden_dim": 512, "num_layers": 6, "num_freqs": 128},
    "small": {"hidden_dim": 256, "num_layers": 4, "num_freqs": 128},
}


def batch_of(dataset: str, size: int, seed: int = 0):
    from equicsp_core.crystal import CrystalBatch
    from equicsp_core.data import load_split

    crystals = load_split(dataset, "test", progress=False)
    order = torch.randperm(len(crystals), generator=torch.Generator().manual_seed(seed))[:size]
    return CrystalBatch.collate([crystals[i] for i in order.tolist()])


def matmul_flops(config: dict, num_atoms: torch.Tensor, impl: str, backward: bool, lattice_dim: int = 6) -> float:
    """Multiply–add FLOPs (2 per MAC) of the matrix products of one call."""
    h, k6, layers, time_dim = config["hidden_dim"], 6 * config["num_freqs"], config["num_layers"], 256
    n, b = int(num_atoms.sum()), len(num_atoms)
    edges = int((num_atoms**2).sum())
    pairs = (edges - n) // 2
    grad = 3 if backward else 1
    fourier_grad = 2 if backward else 1
    total = grad * n * (h + time_dim) * h
    for _ in range(layers):
        total += grad * (edges * h * h + n * 3 * h * h)  # second edge Linear, node MLP
        if impl == "reference":
            total += grad * edges * (2 * h + lattice_dim + k6) * h
        else:
            total += grad * (2 * n * h * h + b * lattice_dim * h) + fourier_grad * pairs * k6 * h
    return 2.0 * total


def plain_matmul_gflops(dtype: torch.dtype = torch.float32) -> float:
    a, w = torch.randn(8192, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ w
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ w
        times.append(time.perf_counter() - start)
    return 2 * 8192 * 1024 * 1024 / statistics.median(times) / 1e9


def run_single(args: argparse.Namespace) -> dict:
    from equicsp_core.network import CSPNet, DenoiserConfig
    from equicsp_core.runtime import keep_freed_memory
    from tests.reference_network import ReferenceCSPNet

    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        keep_freed_memory()
    torch.manual_seed(0)
    config = CONFIGS[args.config]
    denoiser = DenoiserConfig(mode=args.mode, **config)
    net = ReferenceCSPNet(denoiser) if args.impl == "reference" else CSPNet(denoiser)
    crystals = batch_of(args.dataset, args.batch_size)
    from equicsp_core.lattice import lattice_from_parameters, lattice_to_equicsp

    lattice = (lattice_to_equicsp(crystals.lengths, crystals.angles) if args.mode == "equicsp"
               else lattice_from_parameters(crystals.lengths, crystals.angles))
    inputs = dict(atoms=crystals.atomic_numbers, frac_coords=crystals.frac_coords, lattice=lattice,
                  t=torch.randint(1, 1001, (crystals.num_crystals,)), num_atoms=crystals.num_atoms, batch=crystals.batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            if args.direction == "forward":
                with torch.no_grad():
                    net(**inputs)
                return
            out = net(**inputs)
            loss = out.coord.float().square().mean() + out.lattice.float().square().mean()
            if out.score is not None:
                loss = loss + out.score.float().square().mean()
        loss.backward()

    step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    backward = args.direction == "fwd+bwd"
    lattice_dim = 6 if args.mode == "equicsp" else 9
    flops = matmul_flops(config, crystals.num_atoms, args.impl, backward, lattice_dim)
    official = matmul_flops(config, crystals.num_atoms, "reference", backward, lattice_dim)
    return {
        "dataset": args.dataset, "config": args.config, "mode": args.mode, "impl": args.impl,
        "precision": args.precision, "direction": args.direction, "threads": args.threads,
        "allocator": "glibc default" if args.default_allocator else "keep_freed_memory",
        "atoms": int(crystals.num_atoms.sum()), "edges": int((crystals.num_atoms**2).sum()),
        "crystals_per_s": round(crystals.num_crystals / seconds, 2), "seconds": round(seconds, 4),
        "gflops": round(flops / seconds / 1e9, 1), "official_equivalent_gflops": round(official / seconds / 1e9, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--datasets", nargs="+", default=["perov_5", "mp_20"])
    parser.add_argument("--configs", nargs="+", default=["full", "small"], choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["equicsp"], choices=["equicsp", "diffcsp"])
    parser.add_argument("--impls", nargs="+", default=["reference", "fast"], choices=["reference", "fast"])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (the library's CLI raises them)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_single(args)))
        return

    torch.set_num_threads(args.threads)
    header = {"cpu": cpu_model(), "threads": args.threads, "torch": str(torch.__version__),
              "plain_matmul_gflops_fp32": round(plain_matmul_gflops(), 1),
              "plain_matmul_gflops_bf16": round(plain_matmul_gflops(torch.bfloat16), 1),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    lines = [header]
    for dataset in args.datasets:
        for config in args.configs:
            for mode in args.modes:
                for impl in args.impls:
                    for precision in args.precisions:
                        for direction in ("fwd+bwd", "forward"):
                            command = [sys.executable, __file__, "--single", "--dataset", dataset, "--config", config,
                                       "--mode", mode, "--impl", impl, "--precision", precision, "--direction", direction,
                                       "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                                       "--iters", str(args.iters)] + (["--default-allocator"] if args.default_allocator else [])
                            result = subprocess.run(command, capture_output=True, text=True, check=True)
                            line = json.loads(result.stdout.strip().splitlines()[-1])
                            line["fraction_of_matmul"] = round(line["gflops"] / header[f"plain_matmul_gflops_{precision}"], 2)
                            print(json.dumps(line), flush=True)
                            lines.append(line)
    if args.out:
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
