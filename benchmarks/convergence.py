"""Validation match rate against training epochs and CPU time, for several variants of one preset.

Every variant trains the preset with the same seed (data order, noise, time steps) plus its own settings, in
chunks; after each chunk the checkpoint selected so far (``best.pt``, lowest validation loss) samples the first
``--val-crystals`` crystals of the selection split (perov_5: val; mp_20: the held-out 10 % of val) with ``--steps`` predictor-corrector steps and is matched against
them (the papers' protocol, docs/method.md §8). Two uses:

* EquiCSP vs DiffCSP at the same budget (the default variants; the paper claims EquiCSP converges faster)::

    python benchmarks/convergence.py --out benchmarks/results/convergence_perov5.jsonl \\
        --epochs 3 6 9 12 --set train.precision=bf16 [--lattice-bound 7]

* model size and frequency count per CPU-hour (issue: train, sample, evaluate)::

    python benchmarks/convergence.py --out benchmarks/results/model_size_perov5.jsonl --runs runs/model_size \\
        --variant h128-f32 denoiser.hidden_dim=128 denoiser.num_freqs=32 --variant h256-f64 ...

Each line of ``--out`` holds the variant, its settings and parameter count, the epochs, the training seconds
so far (sum of the run's epoch times) and the match rate / RMSE / valid predictions. Resumable: a variant's
run folder under ``--runs`` continues where it stopped, and chunks already in ``--out`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# DiffCSP has no lattice permutation; EquiCSP keeps the preset's (the paper's regularised one).
MODE_VARIANTS = {
    "equicsp": ["denoiser.mode=equicsp"],
    "diffcsp": ["denoiser.mode=diffcsp", "diffusion.lattice_perm=none"],
}


def equicsp(*args: str, threads: int) -> str:
    """Run the ``equicsp`` program of this environment and return its standard output; stop on failure."""
    command = [str(Path(sys.executable).with_name("equicsp")), "--quiet", "--threads", str(threads), *args]
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def train_seconds(run: Path) -> float:
    """Training time of a run so far: the sum of its epoch times (validation and start-up excluded)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSONL file: one line per (variant, epochs)")
    parser.add_argument("--runs", default="runs/convergence", help="folder of the variants' training runs")
    parser.add_argument("--preset", default="perov_5-cpu")
    parser.add_argument("--dataset", default="perov_5", help="the preset's dataset, whose selection split is matched")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 6, 9, 12], help="evaluate after these epochs")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "SECTION.FIELD=VALUE"),
                        help="a named variant and its settings (repeatable; default: the equicsp and diffcsp modes)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="settings common to all variants")
    parser.add_argument("--val-crystals", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lattice-bound", help="sampler lattice bound for every variant (default: each mode's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = {name: settings for name, *settings in args.variant} if args.variant else MODE_VARIANTS

    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(line["variant"], line["epochs"]) for line in map(json.loads, out.read_text().splitlines())}
    bound = ["--lattice-bound", args.lattice_bound] if args.lattice_bound else []
    for epochs in args.epochs:
        for name, settings in variants.items():
            if (name, epochs) in done:
                continue
            run = Path(args.runs) / name
            overrides = [f"--set={item}" for item in [*settings, *args.set, f"train.epochs={epochs}"]]
            equicsp("train", "--preset", args.preset, "--out", str(run), *overrides,
                    *(["--resume"] if (run / "resume.pt").exists() else []), threads=args.threads)
            report = run / f"val_match_{epochs}.json"
            equicsp("evaluate", "--checkpoint", str(run / "best.pt"), "--dataset", args.dataset,
                    "--split", "selection", "--limit", str(args.val_crystals), "--steps", str(args.steps), *bound,
                    "--processes", str(args.threads), "--out", str(report), threads=args.threads)
            result = json.loads(report.read_text())
            parameters = json.loads(equicsp("info", str(run / "best.pt"), threads=args.threads))["parameters"]
            line = {"variant": name, "epochs": epochs, "preset": args.preset, "settings": [*settings, *args.set],
                    "parameters": parameters, "train_seconds": round(train_seconds(run), 1),
                    "match_rate": result["match_rate"], "rmse": result["rmse"],
                    "valid_predictions": result["valid_predictions"], "val_crystals": args.val_crystals,
                    "steps": args.steps, "lattice_bound": args.lattice_bound}
            print(json.dumps(line), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
