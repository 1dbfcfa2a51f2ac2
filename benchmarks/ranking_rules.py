"""Which candidate to put first: ranking rules replayed on the records of ``benchmarks/discovery.py``.

The discovery benchmark records, for every candidate of a composition, its ML energy per atom and space group after
relaxation, its merged group (``duplicate_of``) and whether it matches the known structure. A ranking rule picks one
representative (a group's lowest-energy member) per composition from these records alone, so rules can be compared
without sampling or relaxing again. Rules, each with an energy window W (meV/atom) above the lowest representative:

- ``energy``: the lowest ML energy per atom (the pipeline's rule until session 11; no window);
- ``symmetry``: within W, the highest space-group number (ties: lower energy). Known crystals are mostly
  symmetric, while a sample that relaxes into a distorted local minimum keeps little symmetry;
- ``population``: within W, the group with most members (ties: lower energy): a structure the model samples,
  and the relaxations reach, from several starts (the pipeline's rule since session 11, W = 25);
- ``not_p1``: within W, the lowest-energy representative with a space group other than P1, else the lowest;
- ``denoising``: within W, the lowest denoising loss under the CSP model, averaged over the t grid
  (``discovery.py --denoising-loss``: how typical of its training data the model finds the relaxed structure);
  ``denoising_small_t``: the same over t <= 50 only; ``population_denoising``: as ``population``, ties broken by
  the denoising loss instead of the energy (most groups hold one member). Scored only where every line records
  the loss;
- ``population_steps``: as ``population``, ties broken by the fewest relaxation steps of the representative (then
  the energy): a sample the potential finds already near a minimum, where the CSP model and the potential agree.

With ``discovery.py --symmetry-polish`` records, every rule is also scored with each relaxed candidate replaced by
its symmetrised and re-relaxed self where that is lower in ML energy (tolerances up to S Å; ``polish`` in the output):
a group's representative becomes its lowest member after the polish, the groups themselves are the recorded ones.

A rule must be chosen on the selection rows (``discovery.py --split selection``) and then applied once to the
reserved rows: choosing it on the reserved rows would report a tuned figure.

    python benchmarks/ranking_rules.py benchmarks/results/discovery_mp20_e175_selection.jsonl
    python benchmarks/ranking_rules.py --pair population population_denoising RECORDS...   # row by row, W = 25
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

WINDOWS_MEV = (10, 25, 50, 100)
#: The tolerances (Å) of ``discovery.py --symmetry-polish``.
POLISH_SYMPRECS = (0.1, 0.25, 0.5)


def groups(line: dict) -> list[dict]:
    """The representatives of a composition's merged groups, each with ``members`` (the group's size), from its
    ``candidate_details``."""
    details = line.get("candidate_details") or []
    representatives = [dict(c) for c in details if c["rank"] is not None and c["duplicate_of"] is None]
    for representative in representatives:
        representative["members"] = 1 + sum(c["duplicate_of"] == representative["label"] for c in details)
    return representatives


def space_group_number(candidate: dict) -> int:
    """The number of a recorded space group, ``"Pm-3m (221)"`` → 221."""
    return int(candidate["space_group"].rsplit("(", 1)[1].rstrip(")"))


#: The largest t (of T = 1000) of rule ``denoising_small_t``.
SMALL_T_MAX = 50


def mean_loss(candidate: dict, t_max: int | None) -> float:
    """A representative's denoising loss averaged over the recorded t (up to ``t_max``; None: all)."""
    losses = [value for t, value in candidate["denoising_loss"].items() if t_max is None or int(t) <= t_max]
    return sum(losses) / len(losses)


#: Each rule's sort key over the representatives within its window: the smallest is put first.
RULES: dict[str, Callable[[dict], tuple]] = {
    "energy": lambda c: (c["ml_energy_per_atom"],),
    "symmetry": lambda c: (-space_group_number(c), c["ml_energy_per_atom"]),
    "population": lambda c: (-c["members"], c["ml_energy_per_atom"]),
    "not_p1": lambda c: (space_group_number(c) == 1, c["ml_energy_per_atom"]),
    "denoising": lambda c: (mean_loss(c, None), c["ml_energy_per_atom"]),
    "denoising_small_t": lambda c: (mean_loss(c, SMALL_T_MAX), c["ml_energy_per_atom"]),
    "population_denoising": lambda c: (-c["members"], mean_loss(c, None)),
    "population_steps": lambda c: (-c["members"], c["relax_steps"], c["ml_energy_per_atom"]),
}


def pick(representatives: list[dict], rule: str, window_mev: float) -> dict:
    """The representative ``rule`` puts first (see the module docstring)."""
    lowest = min(c["ml_energy_per_atom"] for c in representatives)
    within = [c for c in representatives if c["ml_energy_per_atom"] <= lowest + window_mev / 1000]
    return min(within, key=RULES[rule])


def polished(line: dict, symprec: float) -> dict:
    """``line`` with each relaxed candidate's energy, space group and match those of its lowest-energy version:
    as relaxed, or symmetrised at a tolerance up to ``symprec`` Å and relaxed again (``discovery.py
    --symmetry-polish``); each group's representative then carries its lowest member's. ``relaxed_match``: any
    candidate matches after the polish."""
    details = [dict(c) for c in line.get("candidate_details") or []]
    for candidate in details:
        versions = [(value["energy_per_atom"], value) for key, value in (candidate.get("polished") or {}).items()
                    if float(key) <= symprec and value and value.get("energy_per_atom") is not None]
        if versions and candidate["ml_energy_per_atom"] is not None:
            energy, best = min(versions, key=lambda version: version[0])
            if energy < candidate["ml_energy_per_atom"]:
                candidate.update(ml_energy_per_atom=energy, space_group=best["space_group"], match=best["match"])
    by_label = {c["label"]: c for c in details}
    for candidate in details:
        if candidate["rank"] is not None and candidate["duplicate_of"] is None:
            members = [c for c in details if candidate["label"] in (c["label"], c["duplicate_of"])]
            lowest = min(members, key=lambda c: c["ml_energy_per_atom"])
            by_label[candidate["label"]] = {**candidate, **{key: lowest[key] for key in
                                                            ("ml_energy_per_atom", "space_group", "match")}}
    details = [by_label[c["label"]] if c["duplicate_of"] is None else c for c in details]
    return {**line, "candidate_details": details,
            "relaxed_match": line["relaxed_match"] or any(c["match"] for c in details)}


def score(lines: list[dict], rule: str, window_mev: float, polish: float | None = None) -> dict:
    """Top-1 under ``rule`` over all compositions (one with no relaxed candidate is a miss): the count, % of all,
    % of those found; with ``polish``, on the records as :func:`polished` at that tolerance leaves them."""
    if polish is not None:
        lines = [polished(line, polish) for line in lines]
    found = sum(line["relaxed_match"] for line in lines)
    top1 = sum(pick(representatives, rule, window_mev)["match"]
               for representatives in map(groups, lines) if representatives)
    return {"rule": rule, "window_meV": window_mev if rule != "energy" else None, "polish": polish,
            "compositions": len(lines), "found": found, "top1": top1,
            "top1_percent": round(100 * top1 / len(lines), 1) if lines else None,
            "top1_over_found_percent": round(100 * top1 / found, 1) if found else None}


def paired(lines: list[dict], first: str, second: str, window_mev: float) -> dict:
    """Two rules on the same compositions: those only ``first`` ranks first (``lost`` by changing to ``second``),
    those only ``second`` does (``gained``), and the two-sided exact sign test of the split."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("discovery", Path(__file__).with_name("discovery.py"))
    discovery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(discovery)
    picks = {rule: [bool(representatives) and pick(representatives, rule, window_mev)["match"]
                    for representatives in map(groups, lines)] for rule in (first, second)}
    outcomes = list(zip(lines, picks[first], picks[second], strict=True))
    gained = [line["formula"] for line, by_first, by_second in outcomes if by_second and not by_first]
    lost = [line["formula"] for line, by_first, by_second in outcomes if by_first and not by_second]
    return {"first": first, "second": second, "window_meV": window_mev, "compositions": len(lines),
            "top1": [sum(picks[first]), sum(picks[second])], "gained": gained, "lost": lost,
            "sign_test_p": discovery.sign_test_p(len(gained), len(lost))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path, help="discovery.py output files (JSON lines)")
    parser.add_argument("--pair", nargs=2, metavar=("FIRST", "SECOND"), help="compare two rules row by row instead")
    parser.add_argument("--window", type=float, default=25, help="with --pair: the energy window, meV/atom")
    args = parser.parse_args()
    unknown = [rule for rule in args.pair or () if rule not in RULES]
    if unknown:
        parser.error(f"--pair: unknown rule {unknown[0]!r}; the rules: {', '.join(RULES)}")
    lines = [json.loads(text) for path in args.records for text in path.read_text().splitlines() if text.strip()]
    if args.pair:
        print(json.dumps(paired(lines, *args.pair, args.window)))
        return
    rows = [score(lines, "energy", 0)]
    rules = ["symmetry", "population", "not_p1"]
    if all("relax_steps" in c for representatives in map(groups, lines) for c in representatives):
        rules += ["population_steps"]
    if all(c.get("denoising_loss") for representatives in map(groups, lines) for c in representatives):
        rules += ["denoising", "denoising_small_t", "population_denoising"]
    rows += [score(lines, rule, window) for rule in rules for window in WINDOWS_MEV]
    if all("polished" in c for line in lines for c in line.get("candidate_details") or [] if c["rank"] is not None):
        for symprec in POLISH_SYMPRECS:
            rows += [score(lines, "energy", 0, symprec)]
            rows += [score(lines, rule, window, symprec) for rule in rules for window in WINDOWS_MEV]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
