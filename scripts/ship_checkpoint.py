"""Ship a trained model with the package: weights + model card (with its evaluation reports).

    python scripts/ship_checkpoint.py training/perov_5-cpu/best.pt perov_5 --eval eval_full_100.json eval_500_1000.json \
        --subsets "541 crystals = test rows 0, 7, 14, … (--indices); 2 threads of the CPU above."

Writes ``equicsp_core/checkpoints/<name>.pt`` (weights only, loadable with ``weights_only=True``),
``equicsp_core/checkpoints/<name>.md`` (the card for humans, with the file's SHA-256) and the file's pin in
``equicsp_core/checkpoint_pins.py``. The evaluation JSONs are the reports of ``equicsp evaluate`` on this very
checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from equicsp_core import checkpoint_pins
from equicsp_core.checkpoint import SHIPPED_DIR, epochs_in_all, load_model, read_checkpoint
from equicsp_core.files import file_sha256
from equicsp_core.crystal import CrystalBatch
from equicsp_core.diffusion import lattice_permutation_error
from equicsp_core.splits import load_rows, split_rows


def write_pins(pins: dict[str, str]) -> None:
    """Rewrite ``equicsp_core/checkpoint_pins.py`` with ``pins`` (name → file SHA-256), its docstring kept."""
    module = Path(checkpoint_pins.__file__)
    lines = [f'    "{name}": "{pins[name]}",' for name in sorted(pins)]
    module.write_text(f'"""{checkpoint_pins.__doc__}"""\n\nSHIPPED_SHA256 = {{\n' + "\n".join(lines) + "\n}\n")


def trained_epochs(card: dict) -> str:
    """``"320 epochs"``, or for a run started from trained weights ``"640 epochs in all (320 in the last run)"``."""
    if "initialised_from" not in card:
        return f"{card['epochs']} epochs"
    return f"{epochs_in_all(card)} epochs in all ({card['epochs']} in the last run)"


def card_markdown(name: str, payload: dict, subsets: str, sha256: str) -> str:
    """The model card: training facts from the checkpoint, one table row per evaluation, ``subsets`` (which
    crystals the rows' subsets are, and the machine) after the table."""
    card = payload["card"]
    parameters = sum(v.numel() for v in payload["state_dict"].values())
    lines = [
        f"# Model card: `{name}`",
        "",
        f"- dataset: **{card['dataset']}** ({card['protocol']})",
        f"- model: {payload['denoiser']['mode']}, hidden {payload['denoiser']['hidden_dim']}, "
        f"{payload['denoiser']['num_layers']} layers, {payload['denoiser']['num_freqs']} frequencies, "
        f"{parameters:,} parameters; lattice permutation: {payload['diffusion']['lattice_perm']}",
        f"- trained: {trained_epochs(card)} (best validation loss {card['val_loss']:.4f}), "
        f"{card['train_seconds'] / 3600:.2f} h{' (the last run)' if 'initialised_from' in card else ''} on "
        f"{card['device']}, torch {card['torch']}, {card['date']}",
        f"- data sha256: {json.dumps(card['data_sha256'])}",
        f"- training settings: `{json.dumps(card['config']['train'])}`",
        f"- file sha256: `{sha256}` (pinned in `equicsp_core/checkpoint_pins.py`, checked on every load); "
        f"model sha256 (configs and weights): `{payload['model_sha256']}`",
    ]
    if "initialised_from" in card:
        start = card["initialised_from"]
        lines.append(f"- initialised from `{start['source']}` at epoch {start['epoch']}"
                     f"{' (weights and Adam moments)' if start['optimizer'] else ' (weights)'}")
    if "lattice_permutation_error" in card:
        error = card["lattice_permutation_error"]
        lines.append(f"- lattice-permutation equivariance error (relative change of the outputs when the lattice "
                     f"vectors are relabelled, {error['crystals']} {error['split']} rows, random t): lattice "
                     f"{100 * error['lattice']:.1f} %, coordinates {100 * error['coord']:.1f} %"
                     + (f", types {100 * error['types']:.1f} %" if "types" in error else "; 0 with `--symmetrise`"))
    if card.get("stored_dtype") == "float16":
        change = card["half_output_change"]
        lines.append(f"- weights stored in float16 (`scripts/half_checkpoint.py`; loaded as float32): the denoiser's "
                     f"outputs move by {100 * change['lattice']:.3f} % (lattice), {100 * change['coord']:.3f} % "
                     f"(coordinates){_types_change(change)} against the float32 weights ({change['crystals']} {change['split']} rows, random "
                     "t); the scores below are the float16 file's")
    scores = generation_scores if payload["denoiser"].get("task") == "generation" else csp_scores
    return "\n".join(lines + scores(name, card, subsets)) + "\n"


def _types_change(change: dict) -> str:
    """The float16 change of a generation model's type head, for the card's float16 line."""
    return f" and {100 * change['types']:.3f} % (types)" if "types" in change else ""


def csp_scores(name: str, card: dict, subsets: str) -> list[str]:
    """The card's CSP scores: one row per ``equicsp evaluate`` report."""
    lines = [
        "",
        "## Scores (CSP, `equicsp evaluate`)",
        "",
        "\"papers'\" rows use the papers' protocol exactly (1000 steps, unbounded lattice update, even grid); "
        "\"project\" rows use the settings shown (the project's sampler).",
        "",
        "| protocol | split | crystals | k | steps | step_lr | lattice bound | precision | match rate % | RMSE | sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in card.get("evaluations", []):
        rmse = f"{report['rmse']:.4f}" if report["rmse"] is not None else "–"
        lines.append(f"| {protocol_of(report)} | {report['split']} | {report['crystals']} | {report['num_samples']} | "
                     f"{report['steps']} | {report['step_lr']} | {report['lattice_bound']} | {report['precision']} | "
                     f"{report['match_rate']:.2f} | {rmse} | {report['sampling_seconds']} |")
    return lines + ["", "Reproduce: `equicsp evaluate --checkpoint " + name + " --dataset " + card["dataset"] + " ...` "
                    "with the settings of each row (seed 0). " + subsets]


def generation_scores(name: str, card: dict, subsets: str) -> list[str]:
    """The card's ab initio generation scores (docs/method.md §8.3): one row per ``equicsp evaluate-generation`` report,
    with the ``equicsp generate`` settings of the folders it scored."""
    lines = [
        "",
        "## Scores (ab initio generation, `equicsp evaluate-generation`)",
        "",
        "Validity over every generated crystal; COV-R / COV-P against the split named; d_ρ, d_E and d_elem on "
        "`num_eval` valid crystals drawn at random. d_E is the Wasserstein distance of the named potential's "
        "single-point energies per atom, not the papers' property model (–: not computed).",
        "",
        "| split | generated | steps | step_lr | lattice bound | seeds | validity struct / comp % | COV-R % | COV-P % | d_ρ "
        "| d_E | d_elem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in card.get("evaluations", []):
        runs = report["generated_with"]
        d_energy = f"{report['d_energy']:.4f} ({report['energy']})" if report["d_energy"] is not None else "–"
        lines.append(
            f"| {report['split']} | {report['generated']} | {_joined(runs, 'steps')} | {_joined(runs, 'step_lr')} | "
            f"{_joined(runs, 'lattice_bound')} | {_joined(runs, 'seed')} | {report['structural_validity']:.2f} / {report['compositional_validity']:.2f} | "
            f"{report['cov_recall']:.2f} | {report['cov_precision']:.2f} | {report['d_density']:.4f} | {d_energy} | "
            f"{report['d_num_elements']:.4f} |")
    return lines + ["", "Reproduce: `equicsp generate --checkpoint " + name + " --num-samples N --steps S --seed s "
                    "--out gen_s` per seed, then `equicsp evaluate-generation --generated gen_* --dataset "
                    + card["dataset"] + "`. " + subsets]


def _joined(runs: list[dict], key: str) -> str:
    """The distinct values of ``key`` over the generation folders a report scored, in order."""
    return ", ".join(str(value) for value in dict.fromkeys(run[key] for run in runs))


def protocol_of(report: dict) -> str:
    """``papers'`` for the papers' sampler exactly (1000 steps, unbounded lattice, even grid, not symmetrised)."""
    papers = (report["steps"] == 1000 and float(report["lattice_bound"]) == float("inf")
              and report.get("grid_power", 1.0) == 1.0 and not report.get("symmetrised", False))
    return "papers'" if papers else "project"


def equivariance_error(checkpoint: str, crystals: int = 64) -> dict:
    """The lattice-permutation error of the checkpoint on the first ``crystals`` selection rows of its dataset."""
    model, card = load_model(checkpoint)
    rows = split_rows(card["dataset"], "selection")[:crystals]
    batch = CrystalBatch.collate(load_rows(card["dataset"], rows, progress=False))
    return {"split": "selection", "crystals": len(rows),
            **lattice_permutation_error(model, batch, torch.Generator().manual_seed(0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("name")
    parser.add_argument("--eval", nargs="*", default=[], help="evaluate reports (JSON) of this checkpoint")
    parser.add_argument("--subsets", required=True,
                        help="which crystals the subsets are and where it ran, e.g. '541 crystals = test rows 0, 7, "
                             "14, … (`--indices`); 2 threads of the CPU above.'")
    args = parser.parse_args()
    payload = read_checkpoint(args.checkpoint)
    payload["card"]["evaluations"] = [json.loads(Path(path).read_text()) for path in args.eval]
    if payload["denoiser"].get("task") == "generation":
        for path, report in zip(args.eval, payload["card"]["evaluations"], strict=True):
            if None in report.get("generated_with", [None]):
                parser.error(f"{path}: scores crystals not read from `equicsp generate` folders (no settings to show)")
    if payload["denoiser"]["mode"] == "equicsp":
        payload["card"]["lattice_permutation_error"] = equivariance_error(args.checkpoint)
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    target = SHIPPED_DIR / f"{args.name}.pt"
    torch.save(payload, target)
    sha256 = file_sha256(target)
    write_pins({**checkpoint_pins.SHIPPED_SHA256, args.name: sha256})
    checkpoint_pins.SHIPPED_SHA256[args.name] = sha256
    read_checkpoint(target)  # must load back with weights_only=True, its pin and model hash checked
    (SHIPPED_DIR / f"{args.name}.md").write_text(card_markdown(args.name, payload, args.subsets, sha256))
    print(f"shipped {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {sha256})")


if __name__ == "__main__":
    main()
