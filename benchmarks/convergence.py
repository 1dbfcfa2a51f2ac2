"""EquiCSP vs DiffCSP convergence at the same budget and seed: validation match rate against epochs.

Both modes train the same preset with the same seed (data order, noise, time steps), in chunks; after each
chunk the checkpoint selected so far (``best.pt``, lowest validation loss) samples the first ``--val-crystals``
crystals of the val split with ``--steps`` predictor-corrector steps and is matched against them (the papers'
protocol, METHOD.md §8). The paper claims EquiCSP converges faster; this measures it.

    python benchmarks/convergence.py --out benchmarks/results/convergence_perov5.jsonl \\
        [--preset perov_5-cpu] [--epochs 3 6 9 12] [--set train.precision=bf16] [--threads 1]

Resumable: a mode's run folder under ``--runs`` continues where it stopped, and chunks already in ``--out``
are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("equicsp", "diffcsp")


def equicsp(*args: str, threads: int) -> None:
    """Run the ``equicsp`` program of this environment; stop on failure."""
    command = [str(Path(sys.executable).with_name("equicsp")), "--quiet", "--threads", str(threads), *args]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSONL file: one line per (mode, epochs)")
    parser.add_argument("--runs", default="runs/convergence", help="folder of the two training runs")
    parser.add_argument("--preset", default="perov_5-cpu")
    parser.add_argument("--dataset", default="perov_5", help="the preset's dataset, whose val split is matched")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 6, 9, 12], help="evaluate after these epochs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--val-crystals", type=int, default=200)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(line["mode"], line["epochs"]) for line in map(json.loads, out.read_text().splitlines())}
    for epochs in args.epochs:
        for mode in MODES:
            if (mode, epochs) in done:
                continue
            run = Path(args.runs) / mode
            started = time.perf_counter()
            # DiffCSP has no lattice permutation; EquiCSP keeps the preset's (the paper's regularised one).
            mode_settings = [f"denoiser.mode={mode}"] + (["diffusion.lattice_perm=none"] if mode == "diffcsp" else [])
            overrides = [f"--set={item}" for item in [*mode_settings, f"train.epochs={epochs}", *args.set]]
            equicsp("train", "--preset", args.preset, "--out", str(run), *overrides,
                    *(["--resume"] if (run / "resume.pt").exists() else []), threads=args.threads)
            train_seconds = time.perf_counter() - started
            report = run / f"val_match_{epochs}.json"
            equicsp("evaluate", "--checkpoint", str(run / "best.pt"), "--dataset", args.dataset,
                    "--split", "val", "--limit", str(args.val_crystals), "--steps", str(args.steps),
                    "--processes", str(args.threads), "--out", str(report), threads=args.threads)
            result = json.loads(report.read_text())
            line = {"mode": mode, "epochs": epochs, "preset": args.preset, "overrides": args.set,
                    "match_rate": result["match_rate"], "rmse": result["rmse"],
                    "val_crystals": args.val_crystals, "steps": args.steps,
                    "train_seconds_this_chunk": round(train_seconds, 1)}
            print(json.dumps(line), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
