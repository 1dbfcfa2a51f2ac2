"""How many of a composition's k candidates land at the known cell size Z: round-robin vs the training prior.

For each reserved test row of a dataset (never trained on: the prior's table counts training rows only), the
reduced composition's cells Z = 1..⌊largest cell / atoms per formula unit⌋ (:func:`equicsp_core.domain.max_cell_atoms`)
get k candidates either round-robin (the even spread, :func:`formula_unit_order` without a table) or by the shipped
prior (:mod:`equicsp_core.formula_unit_prior`); the known Z is the row's CIF's. Per k:

- ``covered``: % of the rows with at least one candidate at the known Z;
- ``at_known_z``: mean candidates at the known Z;
- ``p_match_model``: mean of ``1 - (1 - q)^n`` (n candidates at the known Z), the chance of at least one match if
  each candidate at the right Z matched independently with probability ``q`` (``--per-sample-rate``; 0.217 is the
  shipped mp_20 model's k = 1 match rate given the known cell, 1,000 reserved rows at 100 steps): a model of the
  gain, not a measurement of it.

No sampling: the allocation only, seconds of CPU.

    python benchmarks/formula_unit_prior.py --dataset mp_20 --k 4 8 20
"""

from __future__ import annotations

import argparse
import json

from equicsp_core.domain import max_cell_atoms
from equicsp_core.formula_unit_prior import cell_of_formula_sum, formula_unit_order
from equicsp_core.splits import load_cifs, split_rows


def known_cells(dataset: str) -> list[tuple[int, int]]:
    """``(atoms per formula unit, Z)`` of each reserved row (the test file for a dataset with a train file)."""
    split = "test" if dataset == "perov_5" else "reserved"
    return [cell_of_formula_sum(cif) for cif in load_cifs(dataset, split_rows(dataset, split))]


def allocation_figures(dataset: str, ks: list[int], rate: float) -> dict:
    """The figures of the module docstring per k, for ``round_robin`` and ``prior``."""
    cells = known_cells(dataset)
    limit = max_cell_atoms("equicsp", dataset)
    figures: dict = {"dataset": dataset, "rows": len(cells), "largest_cell": limit, "per_sample_rate": rate}
    for k in ks:
        for name, table in (("round_robin", None), ("prior", dataset)):
            hits = []
            for atoms, known in cells:
                zs = list(range(1, limit // atoms + 1))
                hits.append(sum(zs[j] == known for j in formula_unit_order(table, atoms, zs, k)))
            figures[f"k{k}_{name}"] = {
                "covered": round(100 * sum(h > 0 for h in hits) / len(hits), 1),
                "at_known_z": round(sum(hits) / len(hits), 2),
                "p_match_model": round(sum(1 - (1 - rate) ** h for h in hits) / len(hits), 3),
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mp_20", choices=("mp_20", "mpts_52", "carbon_24", "perov_5"))
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 20])
    parser.add_argument("--per-sample-rate", type=float, default=0.217)
    args = parser.parse_args()
    if min(args.k) < 1 or not 0 < args.per_sample_rate <= 1:
        raise SystemExit("--k must be >= 1 and --per-sample-rate in (0, 1]")
    print(json.dumps(allocation_figures(args.dataset, args.k, args.per_sample_rate), indent=1))


if __name__ == "__main__":
    main()
