"""Sampler settings chosen on the selection rows, never on the rows figures are reported on.

For one checkpoint, each named setting (γ = ``--step-lr``, steps, lattice bound, ``--symmetrise``, precision)
samples the first ``--crystals`` rows of the dataset's selection split (mp_20: the held-out 10 % of val;
perov_5: val) and is scored with the papers' metrics, with the 95 % intervals of the match rate and the RMSE;
``--split test`` (or ``reserved``) confirms a chosen setting on the rows figures are reported on. The first line of ``--out`` is the checkpoint's
lattice-permutation equivariance error on the first (at most 64) selection rows at random noise levels
(:func:`equicsp_core.diffusion.lattice_permutation_error`). Resumable: names already in ``--out`` are skipped.

    python benchmarks/sampler_choices.py --checkpoint mp_20 --dataset mp_20 --crystals 200 \\
        --out benchmarks/results/sampler_choices_mp20.jsonl \\
        --setting "g5e-6: --steps 100 --step-lr 5e-6" --setting "g1e-5: --steps 100 --step-lr 1e-5" \\
        --setting "sym: --steps 100 --step-lr 5e-6 --symmetrise"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from equicsp_core.checkpoint import load_model
from equicsp_core.crystal import CrystalBatch
from equicsp_core.diffusion import lattice_permutation_error
from equicsp_core.splits import load_rows, split_rows


def equivariance_line(checkpoint: str, dataset: str, crystals: int) -> dict:
    model, card = load_model(checkpoint)
    rows = split_rows(dataset, "selection")[:crystals]
    batch = CrystalBatch.collate(load_rows(dataset, rows, progress=False))
    error = lattice_permutation_error(model, batch, torch.Generator().manual_seed(0))
    return {"name": "lattice_permutation_error", "checkpoint": checkpoint, "epochs": card.get("epochs"),
            "crystals": len(rows), "relative_change": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--crystals", type=int, default=200, help="first N rows of the split")
    parser.add_argument("--split", default="selection",
                        help="selection (to choose a setting) or the report split (to confirm the chosen one)")
    parser.add_argument("--setting", action="append", default=[], metavar="'NAME: FLAGS'",
                        help="a named setting and its `equicsp evaluate` flags (repeatable)")
    parser.add_argument("--out", required=True, help="JSONL: the equivariance line, then one line per setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    if "lattice_permutation_error" not in done:
        record(out, equivariance_line(args.checkpoint, args.dataset, min(args.crystals, 64)))
    for setting in args.setting:
        name, _, flags = setting.partition(":")
        if name.strip() in done:
            continue
        report = out.with_name(f"{out.stem}_{name.strip()}.json")
        command = [str(Path(sys.executable).with_name("equicsp")), "--quiet", "--threads", str(args.threads),
                   "evaluate", "--checkpoint", args.checkpoint, "--dataset", args.dataset, "--split", args.split,
                   "--limit", str(args.crystals), "--processes", str(args.threads), "--out", str(report),
                   *shlex.split(flags)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(report.read_text())
        report.unlink()
        record(out, {"name": name.strip(), "flags": flags.strip(), "command": shlex.join(["equicsp", *command[1:]]),
                     **{key: result[key] for key in (
            "split", "crystals", "num_samples", "steps", "step_lr", "lattice_bound", "precision", "symmetrised", "grid_power",
            "match_rate", "rmse", "valid_predictions", "sampling_seconds")}, **intervals(result["per_crystal_rms"])})


def intervals(per_crystal_rms: list[float | None]) -> dict:
    """Half-widths of the 95 % intervals (normal approximation) of the match rate (%) and of the RMSE (the mean
    RMS of the matched crystals)."""
    matched = [rms for rms in per_crystal_rms if rms is not None]
    rate = len(matched) / len(per_crystal_rms)
    spread = statistics.stdev(matched) if len(matched) > 1 else float("nan")
    return {"match_rate_ci95": 196 * (rate * (1 - rate) / len(per_crystal_rms)) ** 0.5,
            "rmse_ci95": 1.96 * spread / len(matched) ** 0.5 if matched else None}


def record(out: Path, line: dict) -> None:
    print(json.dumps(line), flush=True)
    with out.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
