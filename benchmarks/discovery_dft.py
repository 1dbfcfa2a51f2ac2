"""Discovery benchmark, level (c): does DFT put the known structure on top where the ML ranking found it?

For chosen lines of a ``benchmarks/discovery.py`` result (reserved mp_20 test rows; only the reduced composition is
given), this runs the product itself, ``EquiCSPPredictRelaxWorkChain`` through AiiDA: sample ``--num-samples``
candidates spread over Z, screen, relax with CHGNet, merge, rank, ML hull and novelty, then pw.x on the best
``--top-k`` of the ML ranking, with aiida-quantumespresso's ``balanced`` protocol (k-point spacing 0.15 1/Å, the
PseudoDojo family's normal cut-offs, spin chosen by ``equicsp_core.dft``) and ``--relax-type`` (default
``positions``: atoms relaxed in the ML-relaxed cell, the cheapest DFT relaxation that still orders the candidates
at one level). Scored against the known structure with the papers' StructureMatcher tolerances:

- ``ml_top1``: the ML ranking's winner is the known structure;
- ``in_dft``: the known structure is among the candidates that reached DFT;
- ``dft_top1``: the candidate with the lowest DFT energy per atom is the known structure.

One JSON line per composition in ``--out`` (rows already there are skipped). Run on an AiiDA profile with
``verdi run`` (the set-up's ``equicsp`` profile; the codes and pseudopotentials of ``examples/predict_and_relax.py``)::

    verdi run benchmarks/discovery_dft.py --rows 52 77 111 --out benchmarks/results/discovery_dft_mp20.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from aiida.engine import run_get_node

from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.pseudos import install_pseudodojo_family
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

HERE = Path(sys.argv[0]).resolve().parent  # verdi run sets __file__ to the bare file name
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
from discovery import reduced_formula_of  # noqa: E402
from predict_and_relax import installed_code  # noqa: E402


def known_structures(rows: list[int]) -> dict[int, str]:
    """The CIF of each mp_20 test row ``row``, refused unless it is a reserved row (never trained on)."""
    from equicsp_core.splits import Row, load_cifs, reserved_test_rows

    outside = sorted(set(rows) - set(reserved_test_rows("mp_20")))
    if outside:
        raise SystemExit(f"mp_20 test rows {outside} are not reserved rows: the model was trained on them")
    return dict(zip(rows, load_cifs("mp_20", [Row("test", row) for row in rows])))


def score(node, known) -> dict:
    """Which candidates of work chain ``node`` match ``known``, at the ML and the DFT level."""
    from equicsp_core.metrics import rms_distance

    rows = node.outputs.ranking.get_dict()["rows"]
    ml = {row["label"]: row for row in rows if row.get("ml_rank") is not None}
    relaxed = {label: node.outputs.ml_relaxed[label].get_pymatgen() for label in ml}
    matched = sorted(label for label, structure in relaxed.items() if rms_distance(structure, known) is not None)
    dft = {row["label"]: row["dft_energy_per_atom"] for row in rows if row.get("dft_energy_per_atom") is not None}
    ml_winner = min(ml, key=lambda label: ml[label]["ml_rank"]) if ml else None
    dft_winner = min(dft, key=dft.get) if dft else None
    return {"candidates": len(rows), "merged": len(ml), "matched": matched, "ml_winner": ml_winner,
            "ml_top1": ml_winner in matched, "dft_candidates": sorted(dft), "in_dft": bool(set(dft) & set(matched)),
            "dft_winner": dft_winner, "dft_top1": dft_winner in matched,
            "dft_levels": sorted({row["dft_level"] for row in rows if row.get("dft_level")}),
            "dft_energies": dft, "ml_energies": {label: ml[label]["ml_energy_per_atom"] for label in ml}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", required=True, help="mp_20 test rows (reserved ones), as in discovery.py's lines")
    parser.add_argument("--model", default="mp_20")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--relax-type", default="positions")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(sys.argv[1:])
    out = Path(args.out)
    done = {json.loads(line)["row"] for line in out.read_text().splitlines()} if out.exists() else set()

    equicsp_code = installed_code(None, "equicsp", shutil.which("equicsp")
                                  or str(Path(sys.executable).with_name("equicsp")), "equicsp.sample", "localhost")
    pw_code = installed_code(None, "pw", shutil.which("pw.x"), "quantumespresso.pw", "localhost")
    family = install_pseudodojo_family()
    model = EquiCSPModelData.from_shipped(args.model)
    for row, cif in known_structures([row for row in args.rows if row not in done]).items():
        formula, known = reduced_formula_of(cif)
        overrides = {"num_samples": args.num_samples, "top_k": args.top_k,
                     "relax": {"parameters": {"fmax": 0.05, "steps": 200}},
                     "sample": {"parameters": {"steps": args.steps, "seed": 0}},
                     "dft": {"relax_type": args.relax_type}}
        builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
            equicsp_code, model, [formula], protocol="balanced", pw_code=pw_code, pseudo_family=family.label,
            overrides=overrides)
        started = time.perf_counter()
        _, node = run_get_node(builder)
        line = {"row": row, "formula": formula, "known_atoms": len(known), "workchain": node.pk,
                "exit_status": node.exit_status, "seconds": round(time.perf_counter() - started, 1),
                "dft_protocol": "balanced", "relax_type": args.relax_type, "num_samples": args.num_samples,
                "steps": args.steps, "top_k": args.top_k}
        if node.is_finished_ok:
            line.update(score(node, known))
        with out.open("a") as stream:
            stream.write(json.dumps(line) + "\n")
        print(json.dumps({k: v for k, v in line.items() if k not in ("dft_energies", "ml_energies")}), flush=True)


if __name__ == "__main__":
    main()
