"""What real crystals score on the ab initio generation metrics (BENCHMARKS.md, issue 18): a sanity row, not a model.

``--rows`` perov_5 val crystals drawn at random (seeded) stand in for generated ones, written to a JSON file and
scored by ``equicsp evaluate-generation`` against the whole perov_5 test split (``--num-eval`` valid ones drawn for
the distribution distances, d_E from CHGNet single-point energies per atom). The report, the drawn rows and the
wall time go to ``--out``.

``density-spread``: how much d_ρ of real crystals varies with the draw: d_ρ of ``--draws`` draws of ``--num-eval``
val crystals (of all 3,787; densities only, validity not checked) against the test split, mean and 5-95 % range.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/generation_metrics_real.py metrics \\
        --out benchmarks/results/generation_perov5_val_vs_test.json
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/generation_metrics_real.py density-spread \\
        --out benchmarks/results/generation_perov5_density_spread.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("metrics", "density-spread"))
    parser.add_argument("--rows", type=int, default=1050, help="val crystals drawn as the 'generated' set")
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--energy", default="chgnet")
    parser.add_argument("--seed", type=int, default=0, help="of the draw of val rows (the CLI's draw uses 0 too)")
    parser.add_argument("--draws", type=int, default=200, help="draws of density-spread")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.part == "density-spread":
        report = density_spread(args.draws, args.num_eval, args.seed)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return

    import numpy as np
    from pymatgen.core import Structure

    from equicsp_core.cli import main as equicsp
    from equicsp_core.splits import load_cifs, split_rows

    rows = split_rows("perov_5", "val")
    drawn = sorted(np.random.default_rng(args.seed).choice(len(rows), size=args.rows, replace=False).tolist())
    cifs = load_cifs("perov_5", [rows[i] for i in drawn])
    with tempfile.TemporaryDirectory() as folder:
        generated = Path(folder) / "perov_5_val.json"
        generated.write_text(json.dumps({f"val_{row}": Structure.from_str(cif, fmt="cif").as_dict()
                                         for row, cif in zip(drawn, cifs)}))
        report_file = Path(folder) / "metrics.json"
        started = time.perf_counter()
        status = equicsp(["--quiet", "--threads", "1", "evaluate-generation", "--generated", str(generated),
                          "--dataset", "perov_5", "--num-eval", str(args.num_eval), "--energy", args.energy,
                          "--processes", "1", "--out", str(report_file)])
        seconds = time.perf_counter() - started
        if status != 0:
            raise SystemExit(status)
        report = json.loads(report_file.read_text())
    report.update(protocol="real perov_5 val crystals as generated, not a model", val_rows=drawn,
                  wall_seconds=round(seconds, 1), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  machine=platform.processor() or platform.machine())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "val_rows"}, indent=1))


def density_spread(draws: int, size: int, seed: int) -> dict[str, float]:
    """d_ρ of ``draws`` random draws of ``size`` perov_5 val crystals against the whole test split."""
    import numpy as np
    from pymatgen.core import Structure

    from equicsp_core.generation_metrics import wasserstein
    from equicsp_core.splits import load_cifs, split_rows

    val, test = ([Structure.from_str(cif, fmt="cif").density for cif in load_cifs("perov_5", split_rows("perov_5", s))]
                 for s in ("val", "test"))
    rng = np.random.default_rng(seed)
    values = [wasserstein(rng.choice(val, size=size, replace=False), test) for _ in range(draws)]
    low, high = np.percentile(values, [5, 95])
    return {"draws": draws, "size": size, "mean": float(np.mean(values)), "p5": float(low), "p95": float(high),
            "all_val_vs_test": wasserstein(val, test)}


if __name__ == "__main__":
    main()
