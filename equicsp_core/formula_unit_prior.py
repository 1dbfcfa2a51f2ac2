"""How a reduced formula's ``k`` candidates are shared among its cell sizes Z: in proportion to how often each Z
occurs in the model's training data.

Prior
    For a formula of ``n`` atoms per formula unit (``ZnO``: 2, ``SrTiO3``: 5), the shipped table
    ``resources/formula_units.json`` counts ``c_Z``, the training crystals of ``n`` atoms per formula unit whose
    cell holds Z formula units (Z: the gcd of the cell's element counts, as
    :func:`equicsp_core.settings.formula_units`), per benchmark dataset, over the data protocol's training rows
    only (:mod:`equicsp_core.splits`: perov_5's train file; for carbon_24, mp_20 and mpts_52, val less the
    selection rows plus the unreserved test rows). :func:`count_formula_units` rebuilds it from the data
    (``python scripts/make_formula_unit_prior.py``). In mp_20, the 3,270 training crystals of 4 atoms per formula
    unit have Z = 1..5 2,190, 736, 22, 320 and 2 times: 8 candidates of such a formula go 5, 2, 0, 1, 0 to
    Z = 1..5, where round-robin gave 2, 2, 2, 1, 1.

Allocation (:func:`allocate`)
    The ``k`` candidates go to the allowed cells ``Z_1 < ... < Z_m`` (those of
    :func:`equicsp_core.domain.sampling_cells`: within the domain, capped by ``max_formula_units``) in
    proportion to ``w_j = c_{Z_j} + 1/2`` (the ``1/2`` gives an unseen Z a share): each gets ``⌊k w_j / Σw⌋``,
    and the ``k - Σ⌊·⌋`` left over go one each to the largest remainders, ties to the smaller Z. A model of a
    dataset without a table (a user's own model) gets equal weights: the even spread.

Order (:func:`allocation_order`)
    Sample ``i`` (0, 1, ...) takes the cell furthest behind its share after ``i + 1`` samples, the largest
    ``(i + 1) n_j / k - a_j`` among the cells with ``a_j < n_j`` (``n_j`` its allocation, ``a_j`` the samples it
    has so far; ties to the smaller Z), so every prefix of the samples (a run stopped part-way) is spread
    nearly as the whole is, and an even spread is exactly round-robin (sample ``i`` at cell ``i mod m``).

Torch-free, like :mod:`equicsp_core.domain`; only the rebuild imports the data protocol (and torch), when called.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The shipped table: ``{"source": ..., "datasets": {dataset: {atoms per formula unit: {Z: count}}}}`` (JSON keys
#: are strings).
TABLE_FILE = Path(__file__).parent / "resources" / "formula_units.json"

#: The datasets the table covers.
DATASETS: tuple[str, ...] = ("carbon_24", "mp_20", "mpts_52", "perov_5")

#: Added to every allowed Z's count.
PSEUDO_COUNT = 0.5

SOURCE = ("counts of Z (cell formula units) per atoms per formula unit, from each CIF's _chemical_formula_sum, over "
          "the training rows of equicsp_core.splits (perov_5: train; carbon_24, mp_20, mpts_52: val less the "
          "selection rows plus the unreserved test rows)")

_FORMULA_SUM = re.compile(r"^_chemical_formula_sum\s+(.+?)\s*$", re.MULTILINE)
_ELEMENT_COUNT = re.compile(r"([A-Z][a-z]?)(\d*)")


@lru_cache(maxsize=1)
def shipped_table() -> dict[str, dict[int, dict[int, int]]]:
    """The shipped counts: ``{dataset: {atoms per formula unit: {Z: count}}}``."""
    return parse_table(json.loads(TABLE_FILE.read_text()))


def parse_table(document: dict[str, Any]) -> dict[str, dict[int, dict[int, int]]]:
    """The counts of a table document (the JSON's string keys as integers)."""
    return {dataset: {int(atoms): {int(z): count for z, count in by_z.items()} for atoms, by_z in table.items()}
            for dataset, table in document["datasets"].items()}


def z_weights(dataset: str | None, atoms_per_unit: int, zs: Sequence[int]) -> list[float] | None:
    """``c_Z + 1/2`` for each Z of ``zs`` for a formula of ``atoms_per_unit`` atoms per formula unit, from the
    shipped table of ``dataset``; ``None`` for a dataset without a table."""
    table = shipped_table().get(dataset) if dataset is not None else None
    if table is None:
        return None
    counts = table.get(atoms_per_unit, {})
    return [counts.get(z, 0) + PSEUDO_COUNT for z in zs]


def allocate(num_samples: int, weights: Sequence[float]) -> list[int]:
    """``num_samples`` split in proportion to ``weights`` (all > 0) by largest remainder, ties to the earlier.

    Returns:
        ``n_j`` per weight, summing to ``num_samples``.
    """
    if num_samples < 0 or not weights or min(weights) <= 0:
        raise ValueError(f"allocate: need num_samples >= 0 and positive weights, got {num_samples}, {list(weights)}")
    total = math.fsum(weights)
    quotas = [num_samples * weight / total for weight in weights]
    counts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in by_remainder[:num_samples - sum(counts)]:
        counts[j] += 1
    return counts


def allocation_order(counts: Sequence[int]) -> list[int]:
    """The cell index of each sample, ``sum(counts)`` of them, cell ``j`` ``counts[j]`` times (see the module
    docstring: each sample goes to the cell furthest behind its share)."""
    total = sum(counts)
    taken = [0] * len(counts)
    order = []
    for step in range(1, total + 1):
        j = max((j for j in range(len(counts)) if taken[j] < counts[j]),
                key=lambda j: (step * counts[j] - total * taken[j], -j))
        taken[j] += 1
        order.append(j)
    return order


def formula_unit_order(dataset: str | None, atoms_per_unit: int, zs: Sequence[int], num_samples: int) -> list[int]:
    """The index into ``zs`` of each of ``num_samples`` samples of one formula: the prior of ``dataset``'s table
    (:func:`allocate` on :func:`z_weights`), the even spread without one, in :func:`allocation_order`."""
    weights = z_weights(dataset, atoms_per_unit, zs) or [1.0] * len(zs)
    return allocation_order(allocate(num_samples, weights))


# --- the rebuild ----------------------------------------------------------------------------------------------


def cell_of_formula_sum(cif: str) -> tuple[int, int]:
    """``(atoms per formula unit, Z)`` of a CIF's cell, from its ``_chemical_formula_sum`` (``'Zn2 O2'``: (2, 2)).

    Raises:
        ValueError: the CIF has no formula sum, or one that is not element symbols with integer counts.
    """
    found = _FORMULA_SUM.search(cif)
    if found is None:
        raise ValueError("CIF without _chemical_formula_sum")
    text = found.group(1).strip("'\"")
    tokens = _ELEMENT_COUNT.findall(text)
    if not tokens or "".join(symbol + count for symbol, count in tokens) != text.replace(" ", ""):
        raise ValueError(f"_chemical_formula_sum {text!r} is not element symbols with integer counts")
    counts = Counter()
    for symbol, count in tokens:
        counts[symbol] += int(count or 1)
    units = math.gcd(*counts.values())
    return sum(counts.values()) // units, units


def count_formula_units(dataset: str, data_dir: str | os.PathLike | None = None) -> dict[int, dict[int, int]]:
    """``{atoms per formula unit: {Z: count}}`` over the protocol's training rows of ``dataset``."""
    from equicsp_core.splits import load_cifs, split_rows

    counts: dict[int, Counter] = {}
    for cif in load_cifs(dataset, split_rows(dataset, "train", data_dir), data_dir):
        atoms, units = cell_of_formula_sum(cif)
        counts.setdefault(atoms, Counter())[units] += 1
    return {atoms: dict(sorted(counts[atoms].items())) for atoms in sorted(counts)}


def build_table(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The document of ``resources/formula_units.json``, rebuilt from the data of every dataset of
    :data:`DATASETS`."""
    return {"source": SOURCE,
            "datasets": {dataset: {str(atoms): {str(z): count for z, count in by_z.items()}
                                   for atoms, by_z in count_formula_units(dataset, data_dir).items()}
                         for dataset in DATASETS}}
