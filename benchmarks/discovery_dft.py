"""Discovery with DFT on the shortlist (issue 16, level (c)): does pw.x pick the known structure out of the ML best k?

For each of the first ``--rows`` reserved mp_20 test rows whose known cell holds at most ``--max-known-atoms`` atoms,
whose elements all have a pseudopotential in the installed PseudoDojo family and (unless ``--magnetic``) whose DFT
would not be spin-polarised (:func:`equicsp_core.dft.spin_moments`; cost filters: pw.x on this CPU), and whose known
cell holds at most ``--max-formula-units`` formula units (a row beyond it cannot be found, and is recorded skipped),
only the reduced composition is given to the real ``equicsp.predict_relax`` work chain: ``--num-samples``
candidates over every Z up to ``--max-formula-units`` (the ``balanced`` sampler, 200 steps), CHGNet relaxation
(``--fmax``, ``--relax-steps``), merging and the ML ranking, then pw.x (``PwRelaxWorkChain``, ``--dft-protocol``,
``--relax-type``: ``none`` by default, a single point on each ML-relaxed structure, which costs one SCF; a
relaxation type relaxes with one cell cycle, no meta-convergence) on the ``--top-k`` best groups. Scored
against the known structure with the papers' StructureMatcher tolerances (:func:`equicsp_core.metrics.rms_distance`):

- ``relaxed_match``: the known structure is among the ML-relaxed candidates (level (a));
- ``top1_ml``: the ML ranking's winner matches it (level (b));
- ``top1_dft``: the DFT structure of lowest DFT energy per atom among the shortlist matches it (level (c));
  ``shortlist_match``: some member of the shortlist matches (what DFT could pick at best).

With ``--dft-hull`` the work chain also computes the ML hull and the DFT hull (``dft.hull``: the known ground states
of each system, ``reference_cutoff`` 0 and one per composition, computed with the candidates' DFT settings), and each
shortlisted record holds ``ml_e_above_hull`` and ``dft_e_above_hull``, each line the reference runs' energies and
seconds (``dft_references``): where the known structure is itself a reference, a match should lie near 0.

One JSON line per composition in ``--out`` (resumable: a row already there is skipped, and a row whose work chain
finished in this profile, named by its extra ``discovery_dft``, is scored from it; ``--part i/n`` as in
``benchmarks/discovery.py``), with the
work chain's pk, its wall time and, per shortlisted candidate, its ML rank, Z, atoms, ML and DFT energies, the DFT
level, space groups, matches and the DFT run's seconds. ``--summary`` prints the fractions.

    verdi run benchmarks/discovery_dft.py --rows 100 --max-known-atoms 6 --max-formula-units 1 \
        --out benchmarks/results/discovery_dft.jsonl
    verdi run benchmarks/discovery_dft.py --out benchmarks/results/discovery_dft.jsonl --summary
    verdi run benchmarks/discovery_dft.py --row 111 --dft-hull --max-formula-units 1 --out hull.jsonl

Needs the codes ``equicsp@localhost`` and ``pw@localhost`` (``examples/predict_and_relax.py`` creates them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: The settings that define a run, alike in every line of one ``--out``.
RUN_SETTINGS = ("checkpoint", "num_samples", "max_formula_units", "fmax", "relax_steps", "top_k", "dft_protocol",
                "relax_type", "magnetic", "seed", "dft_hull")
#: Settings added later, with the value that the lines and work chains made before them had.
LATER_SETTINGS = {"dft_hull": False}


def run_settings(record: dict) -> dict:
    """The :data:`RUN_SETTINGS` of a line or a work chain's extra (a later setting it lacks: its old value)."""
    return {key: record.get(key, LATER_SETTINGS.get(key)) for key in RUN_SETTINGS}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="verdi run benchmarks/discovery_dft.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="mp_20", help="a shipped model name")
    parser.add_argument("--rows", type=int, default=100, help="first N reserved mp_20 test rows")
    parser.add_argument("--row", type=int, action="append", help="only this reserved row (by index; repeatable)")
    parser.add_argument("--max-known-atoms", type=int, default=4, help="skip rows whose known cell is larger")
    parser.add_argument("--magnetic", action="store_true", help="also run compositions whose DFT is spin-polarised")
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--max-formula-units", type=int, default=4)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--relax-steps", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=3, help="DFT-relax the best k groups of the ML ranking")
    parser.add_argument("--dft-protocol", default="fast", choices=("fast", "balanced", "stringent"))
    parser.add_argument("--relax-type", default="none", help="a RelaxType value; none: a single point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dft-hull", action="store_true", help="the ML and the DFT hull of each candidate too")
    parser.add_argument("--part", default="0/1", help="i/n: every n-th of the selected rows from the i-th")
    parser.add_argument("--out", required=True)
    parser.add_argument("--summary", action="store_true", help="print the fractions of --out and stop")
    return parser.parse_args(sys.argv[1:])


def score(outputs: dict, known) -> dict:
    """Levels (a), (b) and (c) of one work chain's outputs against ``known``, and one record per shortlisted row."""
    from equicsp_core.metrics import rms_distance

    rows = [row for row in outputs["ranking"]["rows"] if row["label"] is not None] if "ranking" in outputs else []
    ml_relaxed = {label: node.get_pymatgen() for label, node in outputs.get("ml_relaxed", {}).items()}
    dft_relaxed = {label: node.get_pymatgen() for label, node in outputs.get("dft_relaxed", {}).items()}
    ml_rms = {label: rms_distance(structure, known) for label, structure in ml_relaxed.items()}
    winner_ml = next((row["label"] for row in rows if row["ml_rank"] == 1), None)
    shortlist = [row for row in rows if row["status"] in ("dft_relaxed", "dft_failed")]
    records = []
    for row in sorted(shortlist, key=lambda row: row["ml_rank"]):
        structure = dft_relaxed.get(row["label"])
        records.append({
            "label": row["label"], "ml_rank": row["ml_rank"], "formula_units": row["formula_units"],
            "atoms": len(ml_relaxed[row["label"]]), "ml_energy_per_atom": row["ml_energy_per_atom"],
            "dft_energy_per_atom": row["dft_energy_per_atom"], "dft_level": row["dft_level"],
            "space_group_ml": row["space_group_ml"], "space_group_dft": row["space_group_dft"],
            "ml_match_rms": ml_rms[row["label"]],
            "dft_match_rms": rms_distance(structure, known) if structure is not None else None,
            "status": row["status"], "reason": row["reason"],
            "ml_e_above_hull": row["ml_e_above_hull"], "dft_e_above_hull": row["dft_e_above_hull"],
        })
    finished = [record for record in records if record["dft_energy_per_atom"] is not None]
    winner_dft = min(finished, key=lambda record: record["dft_energy_per_atom"]) if finished else None
    return {
        "relaxed_match": any(rms is not None for rms in ml_rms.values()),
        "top1_ml": winner_ml is not None and ml_rms.get(winner_ml) is not None,
        "shortlist_match": any(record["ml_match_rms"] is not None or record["dft_match_rms"] is not None
                               for record in records),
        "top1_dft": winner_dft is not None and winner_dft["dft_match_rms"] is not None,
        "winner_ml": winner_ml, "winner_dft": winner_dft and winner_dft["label"],
        "dft_finished": len(finished), "shortlist": records,
    }


def dft_seconds(node) -> dict[str, float]:
    """Wall seconds of each PwRelaxWorkChain the work chain called, by the candidate label of its call link."""
    from aiida.common.links import LinkType

    return {link.link_label.removeprefix("dft_"): round((link.node.mtime - link.node.ctime).total_seconds(), 1)
            for link in node.base.links.get_outgoing(link_type=LinkType.CALL_WORK).all()
            if link.link_label.startswith("dft_")}


def dft_references(node, seconds: dict[str, float]) -> dict:
    """The DFT hull's reference energies (eV/atom) and statuses by entry id, with the seconds of those computed by
    this work chain (``None``: reused from an earlier one)."""
    from aiida_equicsp.workchains.reference_energies import reference_link_label

    links = node.base.links.get_outgoing(link_label_filter="dft_hull").all()
    if not links:
        return {}
    return {entry_id: {**record, "seconds": seconds.get(reference_link_label(entry_id))}
            for entry_id, record in links[0].node.outputs.result["references"].items()}


def stored_outputs(node) -> dict:
    """A finished work chain's outputs as ``run_get_node`` returns them (namespaces as dictionaries)."""
    from aiida.common.links import LinkType

    outputs: dict = {}
    for link in node.base.links.get_outgoing(link_type=LinkType.RETURN).all():
        namespace, _, label = link.link_label.partition("__")
        if label:
            outputs.setdefault(namespace, {})[label] = link.node
        else:
            outputs[namespace] = link.node
    return outputs


#: The extra naming a work chain run by this benchmark: its row and settings, so that a rerun scores it again.
BENCHMARK_EXTRA = "discovery_dft"


def finished_run(row: int, settings: dict):
    """The finished work chain of ``row`` under ``settings`` in this profile, or ``None``."""
    from aiida import orm

    from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

    query = orm.QueryBuilder().append(EquiCSPPredictRelaxWorkChain, filters={
        "extras": {"has_key": BENCHMARK_EXTRA}, "attributes.process_state": "finished"})
    return next((node for node in query.all(flat=True) if node.base.extras.get(BENCHMARK_EXTRA)["row"] == row
                 and run_settings(node.base.extras.get(BENCHMARK_EXTRA)) == settings), None)


def summary(lines: list[dict]) -> dict:
    """The fractions (%) of levels (a), (b), (c) over the compositions run, and the mean wall time."""
    run = [line for line in lines if "skipped" not in line]
    if not run:
        return {"compositions": 0, "skipped": len(lines)}

    def percent(key: str) -> float:
        return round(100 * sum(bool(line[key]) for line in run) / len(run), 1)

    return {"compositions": len(run), "skipped": len(lines) - len(run),
            **{key: percent(key) for key in ("relaxed_match", "shortlist_match", "top1_ml", "top1_dft")},
            "top1_only_dft": [line["formula"] for line in run if line["top1_dft"] and not line["top1_ml"]],
            "top1_only_ml": [line["formula"] for line in run if line["top1_ml"] and not line["top1_dft"]],
            "mean_seconds": round(sum(line["seconds"] for line in run) / len(run), 1)}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.summary:
        print(json.dumps(summary(lines), indent=1))
        return
    part, parts = (int(value) for value in args.part.split("/"))
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    if any(run_settings(line) != settings for line in lines):
        sys.exit(f"{out} holds rows of other settings: use another --out")

    from aiida import orm
    from aiida.engine import run_get_node
    from pymatgen.core import Structure

    from aiida_equicsp.data.model import EquiCSPModelData
    from aiida_equicsp.pseudos import install_pseudodojo_family, missing_pseudo_elements
    from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain
    from equicsp_core.dft import spin_moments
    from equicsp_core.splits import load_cifs, split_rows

    equicsp_code, pw_code = orm.load_code("equicsp@localhost"), orm.load_code("pw@localhost")
    model, family = EquiCSPModelData.from_shipped(args.checkpoint), install_pseudodojo_family()
    done = {line["row"] for line in lines}
    rows = split_rows("mp_20", "reserved")[:args.rows]
    knowns = [Structure.from_str(cif, fmt="cif") for cif in load_cifs("mp_20", rows)]
    selected = [(row, known) for row, known in zip(rows, knowns) if len(known) <= args.max_known_atoms
                and (not args.row or row.index in args.row)]
    for row, known in selected[part::parts]:
        if row.index in done:
            continue
        formula = known.composition.reduced_composition.formula.replace(" ", "")
        known_z = len(known) // round(known.composition.reduced_composition.num_atoms)
        line = {**settings, "row": row.index, "formula": formula, "known_atoms": len(known), "known_z": known_z}
        missing = missing_pseudo_elements(family, [str(element) for element in known.composition])
        if missing:
            line["skipped"] = f"no pseudopotential for {', '.join(missing)} in {family.label}"
        elif known_z > args.max_formula_units:
            line["skipped"] = f"known Z {known_z} > --max-formula-units {args.max_formula_units}: cannot be found"
        elif spin_moments(known.composition) and not args.magnetic:
            line["skipped"] = "spin-polarised DFT (a cost filter: --magnetic runs it)"
        else:
            overrides = {
                "num_samples": args.num_samples, "top_k": args.top_k,
                "stability": {"stability": args.dft_hull, "reference_cutoff": 0.0, "references_per_composition": 1},
                "sample": {"parameters": {"max_formula_units": args.max_formula_units, "seed": args.seed}},
                "relax": {"parameters": {"fmax": args.fmax, "steps": args.relax_steps}},
                "dft": {"protocol": args.dft_protocol, "relax_type": args.relax_type,
                        "overrides": {"meta_convergence": False}, "hull": args.dft_hull},
            }
            builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
                equicsp_code, model, [formula], "balanced", pw_code=pw_code, pseudo_family=family.label,
                overrides=overrides)
            node = finished_run(row.index, settings)
            if node is None:
                _, node = run_get_node(builder)
                node.base.extras.set(BENCHMARK_EXTRA, {"row": row.index, **settings})
            line.update(pk=node.pk, exit_status=node.exit_status,
                        seconds=round((node.mtime - node.ctime).total_seconds(), 1),
                        **score(stored_outputs(node), known))
            seconds = dft_seconds(node)
            for record in line["shortlist"]:
                record["dft_seconds"] = seconds.get(record["label"])
            if args.dft_hull:
                line["dft_references"] = dft_references(node, seconds)
        with out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        print(f"{formula}: {line.get('skipped') or ''} found {line.get('relaxed_match')}, top1 ML "
              f"{line.get('top1_ml')}, top1 DFT {line.get('top1_dft')} ({line.get('seconds')} s)", flush=True)


if __name__ == "__main__":
    main()
