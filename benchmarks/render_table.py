"""Turn bench_network.py JSON lines into the markdown table of BENCHMARKS.md.

    python benchmarks/render_table.py results.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    results = [r for r in rows if "dataset" in r]
    reference = {(r["dataset"], r["config"], r["mode"], r["direction"], r["allocator"]): r["crystals_per_s"]
                 for r in results if r["impl"] == "reference" and r["precision"] == "fp32"}
    print("| data | model | mode | impl | precision | allocator | direction | crystals/s | × reference | GFLOP/s "
          "(own) | official-equivalent GFLOP/s | fraction of plain matmul | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        key = (r["dataset"], r["config"], r["mode"], r["direction"], r["allocator"])
        speedup = f"{r['crystals_per_s'] / reference[key]:.2f}" if key in reference else "–"
        print(f"| {r['dataset']} | {r['config']} | {r['mode']} | {r['impl']} | {r['precision']} | {r['allocator']} | "
              f"{r['direction']} | {r['crystals_per_s']} | {speedup} | {r['gflops']} | "
              f"{r['official_equivalent_gflops']} | {r['fraction_of_matmul']} | {r['peak_rss_gb']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
