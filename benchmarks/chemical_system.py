"""Chemical-system benchmark: which known stable phases of a system the exploration finds, and how fast.

The system's compositions (:func:`equicsp_core.chemical_system.compositions_to_explore`: charge-balanced, every
element present, within ``--max-atoms`` and the model's largest cell) are each sampled ``--num-samples`` times
(spread over every Z the model supports), screened, ML-relaxed, merged and ranked by the engine's pipeline, and
their ML energy above the hull is computed against the reference set with the **system's own entries hidden** (every
entry holding all of its elements: the phases to find); its subsystems (binaries, elements) stay in the hull,
relaxed with the same potential and cached as in a campaign. With the system's phases hidden, every ternary
candidate whose formation energy is negative lies below a hull of binaries and elements, so the candidates join
the hull (:func:`equicsp_core.stability.hull` with ``compete``): a candidate's ``ml_e_above_hull`` is its energy
above the hull of the references *and every other candidate* (what an exploration of a new system can say), and
``ml_e_above_reference_hull`` its energy against the references alone (negative: below them). Scored against the
hidden entries:

- ``enumerated``: the entry's composition is among those explored (else this route cannot find it: a rare
  oxidation state, too many atoms per formula unit);
- ``matched_by``: the merged candidates that match it (StructureMatcher with the papers' tolerances,
  :func:`equicsp_core.metrics.rms_distance`), and their ML E_hull;
- ``found_stable``: one of them is at most ``--ehull-max`` above the hull.

"Known stable" entries are those with data ``e_above_hull`` 0 (on the data's own DFT hull). Also reported: the
predicted stable and near-stable candidates that match no hidden entry ("new"), and compositions per hour (the
whole run's wall time, reference relaxations included). One JSON file.

    python benchmarks/chemical_system.py --system Sr-Ti-O --checkpoint mp_20 --max-atoms 12 --num-samples 8 \\
        --out benchmarks/results/chemical_system_Sr-Ti-O.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

#: A data ``e_above_hull`` at most this (eV/atom) counts as on the data's hull: "known stable".
KNOWN_STABLE = 1e-6


def explore(system: str, model, card: dict, calculator, reference, options: argparse.Namespace,
            cache_path: str | Path) -> dict[str, Any]:
    """Explore ``system`` with ``model`` (and its ``card``), relax with ``calculator``; score against ``reference``."""
    from equicsp_core.chemical_system import compositions_to_explore, parse_chemical_system
    from equicsp_core.metrics import rms_distance
    from equicsp_core.pipeline import candidate_label, label_prefixes, ml_level, rank, screen
    from equicsp_core.predict import predict_with_settings
    from equicsp_core.reference import key_of
    from equicsp_core.relax import relax_structures
    from equicsp_core.settings import (
        ExploreSettings,
        RelaxSettings,
        SampleSettings,
        ScreenSettings,
        StabilitySettings,
    )
    from equicsp_core.stability import EnergyCache, e_above_hull

    started = time.perf_counter()
    settings = ExploreSettings(chemical_system=system, max_atoms=options.max_atoms, ehull_max=options.ehull_max)
    compositions = compositions_to_explore(settings, model.mode, card.get("dataset"))
    elements = frozenset(parse_chemical_system(settings.chemical_system))
    hidden = sorted((entry for entry in reference.in_system(elements) if entry.elements == elements),
                    key=lambda entry: entry.id)

    prefixes = label_prefixes(compositions)
    sampling = SampleSettings(formulas=compositions, num_samples=options.num_samples, steps=options.steps,
                              seed=options.seed)
    sampled = {candidate_label(prefixes[c.formula], c.sample_index): c
               for batch in predict_with_settings(model, card, sampling) for c in batch if c.structure is not None}
    decisions = screen({label: c.structure for label, c in sampled.items()}, ScreenSettings())
    plausible = {label: sampled[label].structure for label, decision in decisions.items() if decision["kept"]}
    relax_settings = RelaxSettings(fmax=options.fmax, steps=options.relax_steps, device="cpu")

    def relax(structures):
        return relax_structures(structures, relax_settings, lambda potential, device: calculator)

    results = dict(relax(plausible))
    relaxed = {label: result.structure for label, result in results.items() if result.structure is not None}
    ranking = rank({label: result.as_dict() for label, result in results.items()}, relaxed, top_k=1).ranking
    merged = sorted(label for label, entry in ranking.items() if entry["status"] == "ml_relaxed")
    stability = StabilitySettings()

    def system_hull(compete: bool) -> dict:
        return e_above_hull({label: (relaxed[label].composition, results[label].energy_per_atom) for label in merged}, reference,
                            relax, EnergyCache(cache_path, ml_level(relax_settings), reference.sha256),
                            stability.reference_cutoff, stability.references_per_composition,
                            exclude=[entry.id for entry in hidden], compete=compete)

    below_known, hulls = system_hull(compete=False), system_hull(compete=True)

    def matching(entry) -> list[str]:
        return [label for label in merged if key_of(relaxed[label]) == entry.composition_key
                and rms_distance(relaxed[label], entry.structure) is not None]

    explored = {key_of(formula) for formula in compositions}
    scored = []
    for entry in hidden:
        labels = matching(entry)
        e_hulls = [hulls[label].e_above_hull for label in labels if hulls[label].e_above_hull is not None]
        scored.append({"id": entry.id, "formula": entry.structure.composition.reduced_formula,
                       "data_e_above_hull": entry.e_above_hull,
                       "known_stable": entry.e_above_hull is not None and entry.e_above_hull <= KNOWN_STABLE,
                       "enumerated": entry.composition_key in explored, "matched_by": labels,
                       "best_ml_e_above_hull": min(e_hulls) if e_hulls else None,
                       "found_stable": any(value <= settings.ehull_max for value in e_hulls)})
    predicted = [{"label": label, "formula": relaxed[label].composition.reduced_formula,
                  "formula_units": sampled[label].formula_units, "ml_e_above_hull": hulls[label].e_above_hull,
                  "ml_e_above_reference_hull": below_known[label].e_above_hull,
                  "matches": [line["id"] for line in scored if label in line["matched_by"]] or "new"}
                 for label in merged
                 if hulls[label].e_above_hull is not None and hulls[label].e_above_hull <= settings.ehull_max]
    seconds = time.perf_counter() - started
    known = [line for line in scored if line["known_stable"]]
    return {
        "system": settings.chemical_system, "max_atoms": options.max_atoms, "ehull_max": settings.ehull_max,
        "num_samples": options.num_samples, "steps": options.steps, "relax_steps": options.relax_steps,
        "seed": options.seed, "ml_level": ml_level(relax_settings), "compositions": compositions,
        "sampled": len(sampled), "plausible": len(plausible), "relaxed": len(relaxed), "merged": len(merged),
        "no_hull": sorted({hulls[label].reason for label in merged if hulls[label].e_above_hull is None}),
        "hidden": scored, "known_stable": len(known),
        "known_stable_enumerated": sum(line["enumerated"] for line in known),
        "known_stable_matched": sum(bool(line["matched_by"]) for line in known),
        "known_stable_found_stable": sum(line["found_stable"] for line in known),
        "predicted_stable": sorted(predicted, key=lambda line: (line["ml_e_above_hull"], line["label"])),
        "predicted_stable_new": sum(line["matches"] == "new" for line in predicted),
        "seconds": round(seconds, 1), "compositions_per_hour": round(3600 * len(compositions) / seconds, 1),
    }


def main() -> None:
    from equicsp_core.settings import ExploreSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", required=True, help="e.g. Sr-Ti-O")
    parser.add_argument("--checkpoint", default="mp_20")
    parser.add_argument("--max-atoms", type=int, default=None, help="atoms per formula unit (default: the model's)")
    parser.add_argument("--ehull-max", type=float, default=ExploreSettings.default("ehull_max"), help="eV/atom")
    parser.add_argument("--num-samples", type=int, default=8,
                        help="candidates per composition, shared among Z by the training prior")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--relax-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from equicsp_core.checkpoint import load_model
    from equicsp_core.reference import load_reference
    from equicsp_core.relax import load_calculator
    from equicsp_core.stability import default_cache_path

    torch.set_num_threads(args.threads)
    model, card = load_model(args.checkpoint)
    result = explore(args.system, model, card, load_calculator("chgnet", "cpu"), load_reference(), args,
                     default_cache_path())
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, **result}, indent=1) + "\n")
    print(f"{result['system']}: {len(result['compositions'])} compositions, {result['known_stable']} known stable "
          f"phases hidden, {result['known_stable_enumerated']} enumerated, {result['known_stable_matched']} matched, "
          f"{result['known_stable_found_stable']} found stable; {len(result['predicted_stable'])} predicted stable "
          f"({result['predicted_stable_new']} new); {result['compositions_per_hour']} compositions per hour")


if __name__ == "__main__":
    main()
