"""How far an ML relaxation moves a known phase's cell shape: the measurement behind
:data:`equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN`.

A relaxed candidate that is a known phase ends at the ML potential's minimum of that phase, not at the stored DFT
cell. ``--entries`` reference entries (the shipped reference set, drawn at random with ``--seed`` from the
``--source`` dataset, its reserved test rows left out, at most ``--max-atoms`` atoms) are relaxed with ``--potential`` as the pipeline relaxes
candidates (fmax 0.05 eV/Å, at most 200 steps) from their stored cells or, with ``--perturb``, from those cells
strained at random (a volume-keeping stretch of ``--perturb`` along random axes, sites moved by 0.1 Å), as a
candidate reaches the phase from a sample; and the cell shape strain
(:func:`equicsp_core.cell_shape.cell_shape_strain`) between the relaxed and the stored cell is recorded, with
pymatgen's default StructureMatcher tolerances (novelty's) and the papers' (the benchmarks'). Its upper percentiles
are the spread a same-phase match shows; a limit above them rarely calls a known phase "strained".

One JSON line per entry in ``--out`` (resumable); ``--summary`` prints the percentiles.

    python benchmarks/cell_shape_strain.py --entries 300 --out benchmarks/results/cell_shape_strain_chgnet_mp20.jsonl
    python benchmarks/cell_shape_strain.py --entries 300 --perturb 0.05 \\
        --out benchmarks/results/cell_shape_strain_chgnet_mp20_perturbed.jsonl
    python benchmarks/cell_shape_strain.py --out benchmarks/results/cell_shape_strain_chgnet_mp20.jsonl --summary
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

def measure(args: argparse.Namespace) -> None:
    from equicsp_core.cell_shape import cell_shape_strain
    from equicsp_core.metrics import PAPERS_MATCHER_TOLERANCES
    from equicsp_core.reference import load_reference
    from equicsp_core.relax import load_calculator, relax_structure
    from equicsp_core.settings import RelaxSettings

    reference = load_reference()
    reserved = reserved_ids(args.source)
    pool = sorted((e for e in reference.entries
                   if e.source == args.source and len(e.species) <= args.max_atoms and e.id not in reserved),
                  key=lambda entry: entry.id)
    chosen = random.Random(args.seed).sample(pool, min(args.entries, len(pool)))
    done = set()
    if args.out.exists():
        done = {json.loads(line)["id"] for line in args.out.read_text().splitlines() if line.strip()}
    calculator = load_calculator(args.potential, "cpu")
    settings = RelaxSettings(potential=args.potential, fmax=0.05, steps=200, device="cpu")
    for entry in chosen:
        if entry.id in done:
            continue
        started = time.perf_counter()
        stored = entry.structure
        start = perturbed(stored, args.perturb, random.Random(f"{args.seed}-{entry.id}")) if args.perturb else stored
        result = relax_structure(start, calculator, settings)
        line = {"id": entry.id, "source": entry.source, "atoms": len(stored), "perturb": args.perturb,
                "relaxation": result.status,
                "volume_change": None, "strain_default": None, "strain_papers": None}
        if result.structure is not None:
            line.update(volume_change=round(result.structure.volume / stored.volume - 1, 4),
                        strain_default=cell_shape_strain(result.structure, stored),
                        strain_papers=cell_shape_strain(result.structure, stored, **PAPERS_MATCHER_TOLERANCES))
        line["seconds"] = round(time.perf_counter() - started, 1)
        with args.out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


def reserved_ids(source: str) -> frozenset[str]:
    """The ``material_id`` of the reserved test rows of ``source`` (none for a dataset without them): a limit is
    chosen on the other entries only, never on what the benchmarks report on."""
    from equicsp_core.data import read_column, split_path
    from equicsp_core.splits import reserved_test_rows

    try:
        rows = reserved_test_rows(source)
    except FileNotFoundError:
        return frozenset()
    ids = read_column(split_path(source, "test"), "material_id")
    return frozenset(ids[row] for row in rows)


def perturbed(structure, stretch: float, rng: random.Random):
    """``structure`` deformed by diag(e^s, 1, e^-s) along random axes (volume kept) and its sites moved by 0.1 Å in
    random directions."""
    from pymatgen.core import Structure
    from scipy.spatial.transform import Rotation

    frame = Rotation.random(random_state=rng.randrange(2**32)).as_matrix()
    deformation = frame.T @ np.diag([np.exp(stretch), 1.0, np.exp(-stretch)]) @ frame
    moved = Structure(structure.lattice.matrix @ deformation, structure.species, structure.frac_coords)
    for index in range(len(moved)):
        direction = np.array([rng.gauss(0, 1) for _ in range(3)])
        moved.translate_sites([index], 0.1 * direction / np.linalg.norm(direction), frac_coords=False)
    return moved


def summary(path: Path, excluded: frozenset[str] = frozenset()) -> dict:
    """Percentiles of the shape strain over the relaxed entries, per tolerance set, and how many lie above
    :data:`~equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN`; the matcher's misses counted. Lines of the
    ``excluded`` ids (the reserved test rows, which files drawn before they were left out hold) are left out."""
    from equicsp_core.cell_shape import SAME_PHASE_SHAPE_STRAIN

    every = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [line for line in every if line.get("id") not in excluded]
    relaxed = [line for line in lines if line["relaxation"] is not None and line["volume_change"] is not None]
    result = {"entries": len(lines), "excluded": len(every) - len(lines), "relaxed": len(relaxed),
              "converged": sum(line["relaxation"] == "converged" for line in relaxed)}
    for name in ("strain_default", "strain_papers"):
        values = np.array([line[name] for line in relaxed if line[name] is not None])
        result[name] = {"matched": len(values), "unmatched": len(relaxed) - len(values),
                        **{f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 90, 95, 99)},
                        "max": round(float(values.max()), 4),
                        f"above_{SAME_PHASE_SHAPE_STRAIN}": int((values > SAME_PHASE_SHAPE_STRAIN).sum())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--entries", type=int, default=300)
    parser.add_argument("--source", default="mp_20", help="the data split the entries come from")
    parser.add_argument("--max-atoms", type=int, default=20)
    parser.add_argument("--potential", default="chgnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturb", type=float, default=0.0, help="start from the stored cell stretched by this "
                        "(ln of the stretch) along random axes, sites moved by 0.1 Å; default: the stored cell")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if args.summary:
        print(json.dumps(summary(args.out, reserved_ids(args.source)), indent=1))
    else:
        measure(args)


if __name__ == "__main__":
    main()
