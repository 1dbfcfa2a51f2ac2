"""The ``equicsp`` command: train, sample, inspect checkpoints, rebuild the normalisation tables.

    equicsp train --preset perov_5-cpu --out runs/perov_5 [--set train.epochs=100] [--resume] [--max-minutes 60]
    equicsp sample --checkpoint runs/perov_5/best.pt --formula SrTiO3 --num-samples 4 --out out/
    equicsp evaluate --checkpoint runs/perov_5/best.pt --dataset perov_5 --limit 200 --steps 100 --out eval.json
    equicsp info runs/perov_5/best.pt
    equicsp tables --out tables.pt

Errors in user input print one line naming the problem and exit with status 2; no partial output is left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from equicsp_core.config import preset_names
from equicsp_core.runtime import keep_freed_memory


def _threads(value: int | None) -> None:
    if value is not None:
        if value < 1:
            raise ValueError(f"--threads must be >= 1, got {value}")
        torch.set_num_threads(value)


def cmd_train(args: argparse.Namespace) -> int:
    from equicsp_core.config import load_run_config
    from equicsp_core.train import train

    overrides = list(args.set or [])
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    config = load_run_config(args.preset or args.dataset, overrides)
    summary = train(config, args.out, resume=args.resume, max_minutes=args.max_minutes, device=args.device,
                    data_dir=args.data_dir, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from equicsp_core.checkpoint import load_model
    from equicsp_core.predict import predict_structures

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    model, _ = load_model(args.checkpoint, args.device)
    step_lr = args.step_lr
    candidates = predict_structures(model, args.formula, args.num_samples, args.steps, step_lr, args.seed,
                                    args.batch_size, progress=not args.quiet, lattice_bound=args.lattice_bound)
    out = Path(args.out)
    # Write into a temporary folder first so a failure leaves nothing half-written behind.
    staging = Path(tempfile.mkdtemp(prefix=".equicsp-", dir=out.parent if out.parent.exists() else None))
    try:
        index = []
        for cand in candidates:
            entry = {"formula": cand.formula, "sample": cand.sample_index, "valid": cand.structure is not None, "file": None}
            if cand.structure is not None:
                name = f"{cand.formula}_{cand.sample_index:03d}.cif"
                cand.structure.to(filename=str(staging / name))
                entry["file"] = name
            index.append(entry)
        (staging / "index.json").write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "steps": args.steps, "seed": args.seed, "step_lr": step_lr,
             "samples": index}, indent=1))
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    valid = sum(entry["valid"] for entry in index)
    print(f"{valid}/{len(index)} valid structures written to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from equicsp_core.checkpoint import load_model
    from equicsp_core.evaluate import evaluate

    indices = None
    if args.indices:
        text = Path(args.indices).read_text()
        try:
            indices = [int(token) for token in text.replace(",", " ").split()]
        except ValueError as error:
            raise ValueError(f"{args.indices}: indices must be integers ({error})") from error
    model, card = load_model(args.checkpoint, args.device)
    report = evaluate(model, args.dataset, args.split, args.limit, indices, args.num_samples, args.steps, args.step_lr,
                      args.seed, args.batch_size, args.processes, args.data_dir, progress=not args.quiet,
                      lattice_bound=args.lattice_bound)
    report["checkpoint"] = {"path": str(args.checkpoint), "dataset": card.get("dataset"), "epochs": card.get("epochs")}
    text = json.dumps(report, indent=1)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    print(text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from equicsp_core.checkpoint import read_checkpoint

    payload = read_checkpoint(args.checkpoint)
    parameters = sum(v.numel() for v in payload["state_dict"].values())
    print(json.dumps({"denoiser": payload["denoiser"], "diffusion": payload["diffusion"], "parameters": parameters,
                      "card": payload["card"]}, indent=2, default=str))
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from equicsp_core.vonmises_tables import compute_tables

    compute_tables(samples=args.samples, seed=args.seed, progress=not args.quiet).save(args.out)
    print(f"tables written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equicsp", description="EquiCSP crystal structure prediction")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumable)")
    p.add_argument("--dataset", help="dataset (its paper preset unless --preset is given)")
    p.add_argument("--preset", help=f"preset name ({', '.join(preset_names())}) or YAML file")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config value")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--max-minutes", type=float, default=None, help="stop at the first epoch end after this long")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="folder of <dataset>/<split>.csv.gz (or $EQUICSP_DATA_DIR)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="predict structures for formulas")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or shipped name")
    p.add_argument("--formula", action="append", required=True, help="cell contents, e.g. SrTiO3 (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="predictor-corrector steps (default: the model's T)")
    p.add_argument("--step-lr", type=float, default=5e-6, help="Langevin step scale")
    p.add_argument("--lattice-bound", type=float, default=None,
                   help="clamp of the predicted clean lattice (default: the mode's; inf = the papers' update)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder (CIF files + index.json)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="match rate and RMSE on a benchmark split (the papers' protocol)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or shipped name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--limit", type=int, default=None, help="first N crystals of the split")
    group.add_argument("--indices", default=None, help="file of row indices (whitespace or comma separated)")
    p.add_argument("--num-samples", type=int, default=1, help="k samples per crystal (1 or 20 in the papers)")
    p.add_argument("--steps", type=int, default=None, help="predictor-corrector steps (default: the model's T)")
    p.add_argument("--step-lr", type=float, default=5e-6, help="Langevin step scale")
    p.add_argument("--lattice-bound", type=float, default=None,
                   help="clamp of the predicted clean lattice (default: the mode's; inf = the papers' update)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--processes", type=int, default=None, help="worker processes for matching (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="print a checkpoint's model card")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tables", help="recompute the von Mises normalisation tables")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tables)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        _threads(args.threads)
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"equicsp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
