"""Generation restricted to a chemical system (``GenerateSettings.elements``): what a generation model gives there.

For each ``--system`` (``Sr-Ti-O``), ``--num-samples`` crystals are generated with ``--checkpoint`` restricted to
the system's elements (:func:`equicsp_core.generate.generate_with_settings`, the sampler's projection of the
predicted types), with the papers' generation protocol by default (1000 steps, the unbounded lattice update, the
dataset's γ). Recorded per system: how many crystals hold every element of the system, each composition's count,
structural and compositional validity (:func:`equicsp_core.metrics.is_valid`, CDVAE's), and for the valid ones
novelty against the reference set (:func:`equicsp_core.stability.novelty`: "matches <id>" or "new"), so the line
says how many known phases of the system the model reproduces.

    python benchmarks/generation_system.py --checkpoint perov_5-gen --system Sr-Ti-O --system K-Mg-F \\
        --num-samples 100 --out benchmarks/results/generation_system_perov5.jsonl

One JSON line per system in ``--out`` (resumable: systems already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path


def run_system(system: str, model, card, args: argparse.Namespace, reference) -> dict:
    from pymatgen.core import Composition

    from equicsp_core.generate import generate_with_settings
    from equicsp_core.metrics import is_valid
    from equicsp_core.settings import GenerateSettings
    from equicsp_core.stability import novelty

    elements = tuple(system.split("-"))
    settings = GenerateSettings(num_samples=args.num_samples, elements=elements, steps=args.steps,
                                lattice_bound=math.inf, seed=args.seed, batch_size=args.num_samples)
    started = time.perf_counter()
    candidates = [c for batch in generate_with_settings(model, card, settings) for c in batch]
    seconds = time.perf_counter() - started
    structures = [c.structure for c in candidates if c.structure is not None]
    valid = [s for s in structures if is_valid(s)]
    whole = [s for s in valid if {str(e) for e in s.composition.elements} == set(elements)]
    verdicts = Counter(novelty(s, reference) for s in whole)
    return {
        "system": system, "checkpoint": args.checkpoint, "num_samples": args.num_samples, "steps": args.steps,
        "seed": args.seed, "generation_seconds": round(seconds, 1),
        "finite": len(structures), "valid": len(valid), "valid_whole_system": len(whole),
        "compositions": dict(Counter(Composition(c.formula).reduced_formula for c in candidates).most_common()),
        "novelty_of_valid_whole_system": dict(verdicts.most_common()),
        "known_phases_matched": sorted({v.split()[1] for v in verdicts if v.startswith("matches")}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="perov_5-gen")
    parser.add_argument("--system", action="append", required=True, help="elements joined by '-': Sr-Ti-O")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's T (the papers' protocol)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from equicsp_core.checkpoint import load_model
    from equicsp_core.reference import load_reference

    model, card = load_model(args.checkpoint)
    reference = load_reference()
    done = set()
    if args.out.exists():
        done = {json.loads(line)["system"] for line in args.out.read_text().splitlines() if line.strip()}
    for system in args.system:
        if system in done:
            continue
        line = run_system(system, model, card, args, reference)
        with args.out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
