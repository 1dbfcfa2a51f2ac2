"""Discovery benchmark: from a composition alone to the known structure, through the engine's pipeline.

For each of the first ``--rows`` reserved mp_20 test rows (never trained on, never used for selection), only the
reduced composition is given (``Sr4Ti4O12`` → ``SrTiO3``): the model samples ``--num-samples`` candidates spread
over every cell size Z it supports (:func:`equicsp_core.domain.sampling_cells`), the pipeline screens them
(implausible cells only), relaxes every plausible one with the ML potential, merges the relaxed duplicates and
ranks them by ML energy per atom (:func:`equicsp_core.pipeline.rank`). Scored against the known structure with
the papers' StructureMatcher tolerances (:func:`equicsp_core.metrics.rms_distance`):

- ``sampled``: the known structure is among the sampled candidates (before relaxation);
- ``relaxed``: among the ML-relaxed candidates (the discovery benchmark's "any match");
- ``top1``: it is the ML ranking's winner (lowest energy per atom).

One JSON line per composition in ``--out`` (resumable: rows already there are skipped), with its wall time;
``--summary`` prints the fractions. DFT on the winners (the issue's level (c)) is not run here: a pw.x
relaxation costs minutes to hours per structure on this CPU.

    python benchmarks/discovery.py --checkpoint mp_20 --rows 100 --num-samples 10 --steps 100 \\
        --out benchmarks/results/discovery_mp20.jsonl
    python benchmarks/discovery.py --out benchmarks/results/discovery_mp20.jsonl --summary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from equicsp_core.settings import RelaxSettings, SampleSettings, ScreenSettings, SettingsError


def reduced_formula_of(cif: str) -> tuple[str, object]:
    """The known structure of a data row and its reduced formula written as a request (``Sr1Ti1O3``; pymatgen's
    ``reduced_formula`` may group, ``InGa(AgTe2)2``, which is no request)."""
    from pymatgen.core import Structure

    structure = Structure.from_str(cif, fmt="cif")
    return structure.composition.reduced_composition.formula.replace(" ", ""), structure  # In1Ga1Ag2Te4


def run_row(index: int, cif: str, model, card, calculator, args: argparse.Namespace) -> dict:
    """Sample, screen, relax, rank and score one composition."""
    from equicsp_core.metrics import rms_distance
    from equicsp_core.pipeline import candidate_label, rank, screen
    from equicsp_core.predict import predict_with_settings
    from equicsp_core.relax import relax_structures

    started = time.perf_counter()
    formula, known = reduced_formula_of(cif)
    settings = SampleSettings(formulas=[formula], num_samples=args.num_samples, steps=args.steps, seed=args.seed)
    try:
        batches = list(predict_with_settings(model, card, settings))
    except SettingsError as error:  # no cell size Z of the composition fits the model: a row that says so
        return {"row": index, "formula": formula, "known_atoms": len(known), "refused": str(error),
                "sampled": False, "relaxed_match": False, "top1": False, "known_z": len(known) // formula_unit_atoms(
                    formula), "sampling_seconds": 0.0, "seconds": round(time.perf_counter() - started, 1)}
    sampled = {}
    for batch in batches:
        for candidate in batch:
            if candidate.structure is not None:
                sampled[candidate_label(formula, candidate.sample_index)] = candidate
    sampling_seconds = time.perf_counter() - started
    decisions = screen({label: c.structure for label, c in sampled.items()}, ScreenSettings())
    plausible = {label: sampled[label].structure for label, decision in decisions.items() if decision["kept"]}
    relax_settings = RelaxSettings(fmax=args.fmax, steps=args.relax_steps, device="cpu")
    results = dict(relax_structures(plausible, relax_settings, lambda potential, device: calculator))
    relaxed = {label: result.structure for label, result in results.items() if result.structure is not None}
    ranking = rank({label: result.as_dict() for label, result in results.items()}, relaxed, top_k=1)

    def matches(structures: dict) -> list[str]:
        return [label for label, structure in structures.items() if rms_distance(structure, known) is not None]

    matched_sampled, matched_relaxed = matches({k: c.structure for k, c in sampled.items()}), matches(relaxed)
    winner = ranking.winners[0] if ranking.winners else None
    return {
        "row": index, "formula": formula, "known_atoms": len(known), "known_z": len(known) // formula_unit_atoms(formula),
        "candidates": len(sampled), "plausible": len(plausible), "relaxed": len(relaxed),
        "z_sampled": sorted({c.formula_units for c in sampled.values()}),
        "sampled": bool(matched_sampled), "relaxed_match": bool(matched_relaxed),
        "top1": winner is not None and winner in matched_relaxed, "winner": winner,
        "winner_z": sampled[winner].formula_units if winner else None,
        "matched_z": sorted({sampled[label].formula_units for label in matched_relaxed}),
        "sampling_seconds": round(sampling_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
    }


def formula_unit_atoms(formula: str) -> int:
    """Atoms in one formula unit of a reduced formula."""
    from pymatgen.core import Composition

    return int(Composition(formula).num_atoms)


def summary(path: Path) -> dict:
    """Fractions over the composition lines of ``path``."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    count = len(lines)
    if not count:
        raise SystemExit(f"{path}: no rows yet")
    relaxed = sum(line["relaxed_match"] for line in lines)
    top1 = sum(line["top1"] for line in lines)
    return {
        "compositions": count,
        "sampled_match": round(100 * sum(line["sampled"] for line in lines) / count, 1),
        "relaxed_match": round(100 * relaxed / count, 1),
        "top1": round(100 * top1 / count, 1),
        "top1_over_any": round(100 * top1 / relaxed, 1) if relaxed else None,
        "known_z_above_1": sum(line["known_z"] > 1 for line in lines),
        "refused": sum("refused" in line for line in lines),
        "mean_seconds": round(sum(line["seconds"] for line in lines) / count, 1),
        "mean_sampling_seconds": round(sum(line["sampling_seconds"] for line in lines) / count, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="mp_20")
    parser.add_argument("--rows", type=int, default=100, help="first N reserved mp_20 test rows")
    parser.add_argument("--num-samples", type=int, default=10, help="candidates per composition, spread over Z")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--relax-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--summary", action="store_true", help="print the fractions of --out and stop")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summary:
        print(json.dumps(summary(out), indent=1))
        return

    import torch

    from equicsp_core.checkpoint import load_model
    from equicsp_core.relax import load_calculator
    from equicsp_core.splits import load_cifs, split_rows

    torch.set_num_threads(args.threads)
    done = {json.loads(line)["row"] for line in out.read_text().splitlines()} if out.exists() else set()
    rows = split_rows("mp_20", "reserved")[:args.rows]
    cifs = load_cifs("mp_20", rows)
    model, card = load_model(args.checkpoint)
    calculator = load_calculator("chgnet", "cpu")
    for row, cif in zip(rows, cifs):
        if row.index in done:
            continue
        line = {"checkpoint": args.checkpoint, "num_samples": args.num_samples, "steps": args.steps,
                **run_row(row.index, cif, model, card, calculator, args)}
        with out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(f"{line['formula']}: {line.get('refused') or ''} sampled {line['sampled']}, relaxed "
              f"{line['relaxed_match']}, top1 {line['top1']} ({line['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
