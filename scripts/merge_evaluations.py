"""Merge ``equicsp evaluate`` reports of disjoint rows run with the same settings into one report.

    equicsp --threads 1 evaluate --checkpoint C --dataset mp_20 --split reserved --indices first.txt --out a.json &
    equicsp --threads 1 evaluate --checkpoint C --dataset mp_20 --split reserved --indices second.txt --out b.json
    python scripts/merge_evaluations.py a.json b.json --out merged.json

(:func:`equicsp_core.evaluate.merge_reports`: the settings must agree and the rows be disjoint.) The merged report
has ``parts`` set; it goes into a model card like any other (``scripts/ship_checkpoint.py --eval``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from equicsp_core.evaluate import merge_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        merged = merge_reports([json.loads(Path(path).read_text()) for path in args.reports])
    except ValueError as error:
        parser.error(str(error))
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print(f"{args.out}: {merged['crystals']} crystals, match rate {merged['match_rate']:.2f} %, RMSE {merged['rmse']}")


if __name__ == "__main__":
    main()
