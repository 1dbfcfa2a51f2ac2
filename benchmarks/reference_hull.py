"""Cost of the ML hull's references, and the ML E_hull of known stable structures (BENCHMARKS.md, issue 16).

Two parts, both with the pinned reference set (``equicsp reference build``) and CHGNet at the engine's default
relaxation settings (:class:`equicsp_core.settings.RelaxSettings`: fmax 0.05 eV/Å, 500 FIRE steps, cell
relaxed), on the CPU:

- ``cost``: for each chemical system of ``--systems`` (default Zn-O, Sr-Ti-O, Li-Fe-P-O), how many reference
  entries go into its hull at the default :class:`~equicsp_core.settings.StabilitySettings` and how long their
  relaxation takes (seconds per reference, measured on the references not yet in the energy cache);
- ``sanity``: the first ``--rows`` reserved mp_20 test rows (``reserved_test_rows.txt``, file order) whose
  Materials Project ``e_above_hull`` is 0 and which have at most ``--max-elements`` elements: each known
  structure is ML-relaxed and its energy above the ML hull computed against the reference set. The row is in
  the set, so the value is >= 0 by construction and 0 exactly when the ML hull agrees that the known structure
  is stable; a positive value is how far the ML potential places it above other references. Also given:
  the value **without its own entry** (its ML decomposition energy against the other references: negative
  when the ML potential finds it stable against them, as the DFT data does).

The reference energies are cached (:class:`equicsp_core.stability.EnergyCache`, in ``$EQUICSP_CACHE_DIR``), so
a second run relaxes only what is new.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/reference_hull.py cost \\
        --out benchmarks/results/reference_cost.json
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/reference_hull.py sanity --rows 12 --max-elements 2 \\
        --out benchmarks/results/reference_sanity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("cost", "sanity"))
    parser.add_argument("--systems", nargs="+", default=["Zn-O", "Sr-Ti-O", "Li-Fe-P-O"])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--max-elements", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from equicsp_core.data import resolve_data_dir
    from equicsp_core.pipeline import ml_level
    from equicsp_core.reference import load_reference
    from equicsp_core.relax import load_calculator, relax_structure, relax_structures
    from equicsp_core.settings import RelaxSettings, StabilitySettings
    from equicsp_core.stability import EnergyCache, default_cache_path, e_above_hull, novelty, reference_energies

    reference = load_reference()
    relax_settings, settings = RelaxSettings(device="cpu"), StabilitySettings()
    cache = EnergyCache(default_cache_path(), ml_level(relax_settings), reference.sha256)
    timings: dict[str, float] = {}

    def relax(structures):
        for label, result in relax_structures(structures, relax_settings):
            timings[label] = result.seconds
            yield label, result

    report: dict = {"command": f"benchmarks/reference_hull.py {args.part}", "machine": platform.processor()
                    or platform.machine(), "python": platform.python_version(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "level": cache.level,
                    "reference_sha256": reference.sha256, "settings": settings.to_dict()}
    if args.part == "cost":
        systems = []
        for system in args.systems:
            chosen = reference.hull_references(system.split("-"), settings.reference_cutoff,
                                               settings.references_per_composition)
            before = dict(timings)
            started = time.perf_counter()
            energies = reference_energies(chosen, relax, cache)
            new = {key: value for key, value in timings.items() if key not in before}
            systems.append({"system": system, "entries_in_system": len(reference.in_system(system.split("-"))),
                            "hull_references": [entry.id for entry in chosen], "relaxed_now": len(new),
                            "seconds_now": round(time.perf_counter() - started, 1),
                            "seconds_per_reference": {key: round(value, 1) for key, value in new.items()},
                            "failed": [key for key, value in energies.items() if value is None]})
            print(json.dumps(systems[-1]))
        report["systems"] = systems
    else:
        rows_file = resolve_data_dir() / "mp_20" / "reserved_test_rows.txt"
        reserved = [int(line.split()[0]) for line in rows_file.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
        table = pd.read_csv(resolve_data_dir() / "mp_20" / "test.csv.gz")
        calculator = load_calculator(relax_settings.potential, relax_settings.device)
        results = []
        for row in reserved:
            record = table.iloc[row]
            if record["e_above_hull"] != 0 or len(json.loads(record["elements"].replace("'", '"'))) > args.max_elements:
                continue
            (known,) = [entry for entry in reference.entries if entry.id == record["material_id"]]
            started = time.perf_counter()
            relaxed = relax_structure(known.structure, calculator, relax_settings)
            candidate = {"known": (relaxed.structure.composition, relaxed.energy_per_atom)}
            hull = e_above_hull(candidate, reference, relax, cache, settings.reference_cutoff,
                                settings.references_per_composition)["known"]
            without = e_above_hull(candidate, reference, relax, cache, settings.reference_cutoff,
                                   settings.references_per_composition, exclude=[known.id])["known"]
            results.append({"row": row, "material_id": known.id, "formula": record["pretty_formula"],
                            "ml_e_above_hull": hull.e_above_hull, "reason": hull.reason,
                            "ml_e_above_hull_without_itself": without.e_above_hull,
                            "novelty": novelty(relaxed.structure, reference),
                            "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]))
            if len(results) == args.rows:
                break
        values = [result["ml_e_above_hull"] for result in results if result["ml_e_above_hull"] is not None]
        report["rows"] = results
        others = [result["ml_e_above_hull_without_itself"] for result in results
                  if result["ml_e_above_hull_without_itself"] is not None]
        report["summary"] = {"n": len(values), "mean_abs": sum(map(abs, values)) / len(values),
                             "max_abs": max(map(abs, values)), "within_0.025": sum(abs(v) <= 0.025 for v in values),
                             "within_0.05": sum(abs(v) <= 0.05 for v in values),
                             "without_itself_below_0": sum(v < 0 for v in others), "without_itself_n": len(others)}
        print(json.dumps(report["summary"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
