"""Draw the pictures of the README and the docs from the project's recorded results.

    .venv/bin/python docs/figures/make_figures.py            # all three, into docs/figures/
    .venv/bin/python docs/figures/make_figures.py --only structure --out /tmp/figures

Sources (nothing is typed in by hand):

- ``match_rate_vs_steps.png``: the evaluation reports stored in the shipped ``perov_5`` checkpoint's model card
  (``equicsp evaluate`` on that checkpoint, 541 test crystals, one row per step count) and
  ``benchmarks/results/perov5_test_full_1000steps.json`` (the full test split, the papers' protocol).
- ``convergence.png``: ``benchmarks/results/model_size_perov5.jsonl`` (``benchmarks/convergence.py``).
- ``structure.png``: computed here: the shipped ``perov_5`` model samples the first 16 crystals of the perov_5
  test split (seed 0, 100 steps; seconds on one CPU thread; needs the data folder, see ``docs/data.md``); the
  first sample that matches with an RMS below 0.1 is drawn next to the known structure, aligned onto it by
  pymatgen's ``StructureMatcher`` (the title says how the rows before it fared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
OUT = Path(__file__).resolve().parent
DPI = 110

#: Atoms this close (fractional) to a cell face are drawn on both opposite faces.
FACE_TOLERANCE = 0.02

#: The EquiCSP paper's perov_5 match rate (%) and RMSE, k = 1 (docs/method.md §9).
PAPER_EQUICSP_PEROV5 = {"match_rate": 52.02, "rmse": 0.0707}

#: One colour per training variant of ``model_size_perov5.jsonl`` in every panel.
VARIANT_COLOURS = {"h256-f64": "C0", "h256-f64-noperm": "C1", "diffcsp-h256-f64": "C2", "h128-f32": "C4",
                   "h512-f128": "C3"}


def match_rate_vs_steps(out: Path = OUT) -> Path:
    """Match rate and RMSE of the shipped perov_5 model against the number of sampling steps."""
    from equicsp_core.checkpoint import read_checkpoint

    reports = read_checkpoint("perov_5")["card"]["evaluations"]
    sweep = sorted(
        (r for r in reports if r["crystals"] == 541 and r["num_samples"] == 1 and r["step_lr"] == 5e-6
         and r["lattice_bound"] == 7.0 and r["precision"] == "fp32"),
        key=lambda r: r["steps"],
    )
    full = json.loads((RESULTS / "perov5_test_full_1000steps.json").read_text())
    full_100 = next(r for r in reports if r["crystals"] == full["crystals"] and r["steps"] == 100
                    and r["num_samples"] == 1 and r["precision"] == "fp32")
    steps = [r["steps"] for r in sweep]

    fig, (ax_match, ax_rmse) = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for ax, key, label in ((ax_match, "match_rate", "match rate (%)"), (ax_rmse, "rmse", "RMSE (normalised)")):
        ax.plot(steps, [r[key] for r in sweep], "o-", color="C0", label="541 test crystals (lattice bound 7)")
        ax.plot([r["steps"] for r in (full_100, full)], [r[key] for r in (full_100, full)], "s", color="C3",
                label=f"all {full['crystals']:,} test crystals")
        ax.axhline(PAPER_EQUICSP_PEROV5[key], color="0.4", ls="--", lw=1, label="EquiCSP paper (1000 steps)")
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_match.set_ylim(40, 60)
    ax_rmse.set_ylim(0, None)
    ax_rmse.legend(fontsize=7, loc="upper right")
    fig.suptitle("perov_5, shipped model, k = 1: fewer steps keep the match rate, lose precision", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "match_rate_vs_steps.png")


def convergence(out: Path = OUT) -> Path:
    """Match rate and RMSE during training against CPU time: the two modes, and the model sizes."""
    rows = [json.loads(line) for line in (RESULTS / "model_size_perov5.jsonl").read_text().splitlines() if line]
    groups = {
        "EquiCSP vs DiffCSP (2.1 M parameters)": {
            "h256-f64": "EquiCSP (regularised)", "h256-f64-noperm": "EquiCSP, no permutation branch",
            "diffcsp-h256-f64": "DiffCSP",
        },
        "model size (EquiCSP)": {
            "h128-f32": "128 hidden, 32 freq. (0.56 M)", "h256-f64": "256 hidden, 64 freq. (2.1 M)",
            "h512-f128": "512 hidden, 128 freq. (8.3 M)",
        },
    }
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 5.8), sharex="col")
    for row, (title, variants) in enumerate(groups.items()):
        for variant, label in variants.items():
            colour = VARIANT_COLOURS[variant]
            points = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["epochs"])
            minutes = [r["train_seconds"] / 60 for r in points]
            axes[row, 0].plot(minutes, [r["match_rate"] for r in points], "o-", ms=3, color=colour, label=label)
            matched = [r for r in points if r["rmse"] is not None]
            axes[row, 1].plot([r["train_seconds"] / 60 for r in matched], [r["rmse"] for r in matched], "o-", ms=3,
                              color=colour, label=label)
        axes[row, 0].set_ylabel("match rate (%)")
        axes[row, 1].set_ylabel("RMSE")
        axes[row, 0].set_title(title, fontsize=9, loc="left")
        axes[row, 1].legend(fontsize=7)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training CPU minutes (1 thread)")
    fig.suptitle("perov_5 convergence: 200 val crystals, 100 steps, k = 1, one seed", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "convergence.png")


def structure(out: Path = OUT, rows: int = 16, steps: int = 100, seed: int = 0, close: float = 0.1) -> Path:
    """The shipped perov_5 model's sample of a test crystal, next to the known structure.

    The first ``rows`` test crystals are sampled in one batch (seed 0, ``steps`` steps); the first one in row
    order whose sample matches with an RMS below ``close`` is drawn, and the title says so and how the rows
    before it fared (about half of the test crystals match at k = 1, see the benchmarks).
    """
    import torch
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    from equicsp_core.checkpoint import load_model
    from equicsp_core.crystal import Crystal
    from equicsp_core.data import read_cifs, split_path
    from equicsp_core.sampler import sample

    torch.set_num_threads(1)
    known = [Structure.from_str(cif, fmt="cif") for cif in read_cifs(split_path("perov_5", "test"))[:rows]]
    targets = [Crystal.from_structure(structure, niggli=True) for structure in known]
    model, _ = load_model("perov_5")
    result = sample(model, torch.cat([c.atomic_numbers for c in targets]), torch.tensor([c.num_atoms for c in targets]),
                    steps=steps, generator=torch.Generator().manual_seed(seed))
    matcher = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)  # the papers' tolerances (docs/method.md §8.2)
    earlier = {"no match": 0, "a looser match": 0}
    for row, (reference, crystal) in enumerate(zip(known, result.crystals())):
        rms = matcher.get_rms_dist(crystal.to_structure(), reference) if crystal is not None else None
        if rms is not None and rms[0] < close:
            break
        earlier["no match" if rms is None else "a looser match"] += 1
    else:
        raise SystemExit(f"none of the first {rows} test rows matched with RMS < {close}")
    # get_s2_like_s1 needs primitive_cell=False; perov_5 cells are primitive (5 atoms) already
    aligned = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3, primitive_cell=False).get_s2_like_s1(
        reference, crystal.to_structure())

    fig = plt.figure(figsize=(7.6, 3.9))
    _draw(fig.add_subplot(1, 2, 1, projection="3d"), reference,
          f"known: {reference.composition.reduced_formula}, perov_5 test row {row}")
    _draw(fig.add_subplot(1, 2, 2, projection="3d"), aligned,
          f"predicted ({steps} steps, seed {seed}), aligned: RMS {rms[0]:.3f}")
    before = ", ".join(f"{count} {what}" for what, count in earlier.items() if count)
    fig.suptitle(f"The first perov_5 test row whose sample matches with RMS < {close}"
                 + (f" (rows before it: {before})" if before else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "structure.png")


def _draw(ax, structure, title: str) -> None:
    """Atoms of one cell (with their images on the cell's faces, edges and corners) and the cell's edges."""
    import itertools

    import numpy as np
    from ase.data import covalent_radii
    from ase.data.colors import jmol_colors
    from pymatgen.core import Element

    lattice = structure.lattice.matrix
    for corner in itertools.product((0, 1), repeat=3):
        for axis in range(3):
            if corner[axis] == 0:
                end = list(corner)
                end[axis] = 1
                segment = np.array([corner, end]) @ lattice
                ax.plot(*segment.T, color="0.5", lw=0.8)
    species = sorted({site.specie.Z for site in structure}, key=lambda z: -z)
    for z in species:
        points = []
        for site in structure:
            if site.specie.Z != z:
                continue
            frac = np.mod(site.frac_coords + FACE_TOLERANCE, 1.0) - FACE_TOLERANCE  # 0.999 is drawn at 0 and 1
            for shift in itertools.product((0, 1), repeat=3):
                image = frac + shift
                if (image <= 1.0 + FACE_TOLERANCE).all():
                    points.append(image @ lattice)
        points = np.array(points)
        ax.scatter(*points.T, s=260 * covalent_radii[z], color=jmol_colors[z], edgecolor="k", linewidth=0.4,
                   depthshade=False, label=Element.from_Z(z).symbol)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_box_aspect(np.ptp(np.vstack([np.zeros(3), lattice.sum(0), lattice]), axis=0))
    ax.set_axis_off()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


FIGURES = {"steps": match_rate_vs_steps, "convergence": convergence, "structure": structure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(FIGURES), nargs="*", help="draw only these figures")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files (default: docs/figures)")
    args = parser.parse_args()
    for name in args.only or FIGURES:
        path = FIGURES[name](args.out)
        print(f"{path}: {path.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
