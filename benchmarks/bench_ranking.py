"""Ranking quality of the predict-relax work chain: does its top-ranked structure match the known one?

For compounds whose experimental structure is known and small enough for the shipped model (cubic perovskites
for ``perov_5``), run ``equicsp.predict_relax`` for real (sample, CHGNet, pw.x on the best candidate) and
compare the top-ranked DFT-relaxed structure, the top ML-relaxed one and every sampled candidate with the
known structure (pymatgen ``StructureMatcher()``, default tolerances, volume scaled: a DFT lattice constant
1-2 % off still matches). The known structures are built here from their space group and Wyckoff positions.

    verdi run benchmarks/bench_ranking.py --out benchmarks/results/ranking.json [--num-samples 6] [--no-dft]

Needs the set-up of ``examples/predict_and_relax.py`` (it creates the codes and the pseudopotential family).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from aiida import orm
from aiida.engine import run_get_node
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.pseudos import install_pseudodojo_family
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

#: Cubic perovskites ABX3 (Pm-3m) at room temperature, with their experimental lattice constants (Å).
CUBIC_PEROVSKITES = {
    "SrTiO3": 3.905,
    "KTaO3": 3.989,
    "BaZrO3": 4.193,
    "BaSnO3": 4.116,
    "SrVO3": 3.842,
    "KMgF3": 3.989,
}


def cubic_perovskite(formula: str, a: float) -> Structure:
    """ABX3 in Pm-3m: A at 1a (0,0,0), B at 1b (½,½,½), X at 3c (½,½,0)."""
    from pymatgen.core import Composition

    elements = [str(element) for element in Composition(formula)]
    a_site, b_site, x_site = elements
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(a), [a_site, b_site, x_site],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def main() -> None:
    parser = argparse.ArgumentParser(prog="verdi run benchmarks/bench_ranking.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="perov_5")
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--stringency", default="low")
    parser.add_argument("--kpoints-distance", type=float, default=0.8)
    parser.add_argument("--dft", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--formulas", nargs="*", default=list(CUBIC_PEROVSKITES))
    args = parser.parse_args(sys.argv[1:])

    equicsp_code, model = orm.load_code("equicsp@localhost"), EquiCSPModelData.from_shipped(args.model)
    pw_code = orm.load_code("pw@localhost") if args.dft else None
    family = install_pseudodojo_family() if args.dft else None
    matcher = StructureMatcher()
    results = []
    for formula in args.formulas:
        known = cubic_perovskite(formula, CUBIC_PEROVSKITES[formula])
        overrides = {"num_samples": args.num_samples, "top_k": 1}
        if args.dft:
            elements = tuple(str(element) for element in known.composition)
            ecutwfc, ecutrho = family.get_recommended_cutoffs(elements=elements, stringency=args.stringency,
                                                              unit="Ry")
            overrides["dft"] = {"overrides": {"meta_convergence": False, "base_relax": {
                "kpoints_distance": args.kpoints_distance, "pw": {"parameters": {"SYSTEM": {"ecutwfc": ecutwfc, "ecutrho": ecutrho}}}}}}
        builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
            equicsp_code, model, [formula], "fast", pw_code=pw_code, pseudo_family=family and family.label,
            overrides=overrides)
        started = time.perf_counter()
        outputs, node = run_get_node(builder)
        seconds = time.perf_counter() - started
        result = {"formula": formula, "pk": node.pk, "exit_status": node.exit_status, "seconds": round(seconds, 1),
                  **compare(outputs, known, matcher)}
        print(json.dumps(result), flush=True)
        results.append(result)
        write_report(args, results)


def compare(outputs: dict, known: Structure, matcher: StructureMatcher) -> dict:
    """Whether the top DFT-relaxed, the top ML-relaxed and any sampled structure match ``known``."""
    rows = outputs["ranking"]["rows"] if "ranking" in outputs else []

    def matches(namespace: str, label: str | None) -> bool | None:
        if label is None or label not in outputs.get(namespace, {}):
            return None
        return bool(matcher.fit(outputs[namespace][label].get_pymatgen(), known))

    top_ml = next((row for row in rows if row["ml_rank"] == 1), None)
    top_dft = next((row for row in rows if row["status"] == "dft_relaxed"), None)
    return {
        "top_dft_matches": matches("dft_relaxed", top_dft and top_dft["label"]),
        "top_ml_matches": matches("ml_relaxed", top_ml and top_ml["label"]),
        "any_sampled_matches": any(bool(matcher.fit(s.get_pymatgen(), known))
                                   for s in outputs.get("sampled", {}).values()),
        "top_space_group": top_dft["space_group_dft"] if top_dft else top_ml and top_ml["space_group_ml"],
    }


def cpu_model() -> str:
    """``lscpu``'s model name and the number of cores, e.g. ``AMD EPYC, 2 cores``."""
    names = [line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True,
             check=False).stdout.splitlines() if line.startswith("Model name")]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def write_report(args: argparse.Namespace, results: list[dict]) -> None:
    """The JSON report so far (rewritten after each compound, so a stopped run keeps what finished)."""
    level = "top_dft_matches" if args.dft else "top_ml_matches"
    report = {
        "command": "verdi run benchmarks/bench_ranking.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(), "machine": cpu_model(),
        "model": args.model, "num_samples": args.num_samples, "dft": args.dft, "stringency": args.stringency,
        "kpoints_distance": args.kpoints_distance,
        "hit_rate": sum(bool(r[level]) for r in results) / len(results), "level": level, "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"top-ranked structure matches the known one: {sum(bool(r[level]) for r in results)}/{len(results)}",
          flush=True)


if __name__ == "__main__":
    main()
