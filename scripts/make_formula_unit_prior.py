"""Write ``equicsp_core/resources/formula_units.json``, the prior over the cell size Z of a reduced formula.

A maintainer tool, run when the data protocol or the data changes; the package only reads the JSON it writes
(:mod:`equicsp_core.formula_unit_prior`), and ``tests/test_formula_unit_prior.py`` checks that the shipped file
equals a rebuild from the data beside the checkout.

    python scripts/make_formula_unit_prior.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json

from equicsp_core.formula_unit_prior import TABLE_FILE, build_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="the benchmark data (default: $EQUICSP_DATA_DIR, else ../shared/data)")
    args = parser.parse_args()
    TABLE_FILE.write_text(json.dumps(build_table(args.data_dir), indent=1) + "\n")
    print(f"written {TABLE_FILE}")


if __name__ == "__main__":
    main()
