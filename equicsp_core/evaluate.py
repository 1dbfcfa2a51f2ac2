"""The papers' CSP evaluation protocol (docs/method.md §8) on a split of the data protocol.

For each selected crystal: sample ``num_samples`` structures with its true composition, then score them
against the ground truth parsed from the file's ``cif`` column as is (no Niggli reduction). Splits are
those of :mod:`equicsp_core.splits`; rows the protocol trains on are refused, so a figure is never
measured on training data (mp_20: report on ``reserved``, tune on ``selection``; perov_5: ``test``, ``val``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

import torch

import equicsp_core
from equicsp_core.diffusion import CrystalDiffusion, symmetrised
from equicsp_core.files import json_number
from equicsp_core.metrics import match_rate
from equicsp_core.sampler import resolved_lattice_bound, sample
from equicsp_core.settings import DEFAULT_STEP_LR
from equicsp_core.splits import check_not_trained_on, load_cifs, load_rows, report_split, split_rows

logger = logging.getLogger(__name__)


def select_indices(total: int, limit: int | None = None, indices: list[int] | None = None) -> list[int]:
    """All positions, the first ``limit``, or explicit positions in the split (in range, each once)."""
    if limit is not None and indices is not None:
        raise ValueError("give either a limit or explicit indices, not both")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise ValueError(f"indices out of range 0..{total - 1}: {bad[:5]}")
        if not indices:
            raise ValueError("the index list is empty")
        repeated = sorted(i for i, count in Counter(indices).items() if count > 1)
        if repeated:
            raise ValueError(f"indices repeated (each crystal counts once): {repeated[:5]}")
        return list(indices)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return list(range(min(limit, total)))
    return list(range(total))


def evaluate(
    model: CrystalDiffusion,
    dataset: str,
    split: str | None = None,
    limit: int | None = None,
    indices: list[int] | None = None,
    num_samples: int = 1,
    steps: int | None = None,
    step_lr: float = DEFAULT_STEP_LR,
    seed: int = 0,
    batch_size: int = 512,
    processes: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    lattice_bound: float | None = None,
    precision: str = "fp32",
    symmetrise: bool = False,
    grid_power: float = 1.0,
) -> dict[str, Any]:
    """Match rate (%) and RMSE of ``model`` on a split (default: the one figures are reported on);
    returns a JSON-ready dict with settings, versions and each crystal's RMS (``per_crystal_rms``; None: no
    match). ``symmetrise`` samples with the denoiser averaged over the six lattice-vector orderings
    (:func:`equicsp_core.diffusion.symmetrised`)."""
    from importlib.metadata import version

    from pymatgen.core import Structure
    from tqdm import tqdm

    if num_samples < 1:
        raise ValueError(f"num_samples (k) must be >= 1, got {num_samples}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    split = split or report_split(dataset, data_dir)
    split_members = split_rows(dataset, split, data_dir)
    positions = select_indices(len(split_members), limit, indices)
    rows = [split_members[i] for i in positions]
    check_not_trained_on(dataset, rows, data_dir)
    references = [Structure.from_str(cif, fmt="cif") for cif in load_cifs(dataset, rows, data_dir)]
    selected = load_rows(dataset, rows, data_dir, progress=progress)

    if symmetrise:
        model = symmetrised(model)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device (equicsp_core.rng)
    started = time.perf_counter()
    predictions: list[list] = [[] for _ in rows]
    chunks = [(r, s) for r in range(num_samples) for s in range(0, len(selected), batch_size)]
    for number, (_, start) in enumerate(tqdm(chunks, desc=f"sampling {dataset}/{split}", disable=not progress,
                                             unit="batch"), start=1):
        chunk = selected[start:start + batch_size]
        chunk_started = time.perf_counter()
        result = sample(model, torch.cat([c.atomic_numbers for c in chunk]), torch.tensor([c.num_atoms for c in chunk]),
                        steps=steps, step_lr=step_lr, generator=generator, lattice_bound=lattice_bound, precision=precision,
                        grid_power=grid_power)
        for offset, crystal in enumerate(result.crystals()):
            predictions[start + offset].append(crystal.to_structure() if crystal is not None else None)
        if not progress:  # a batch job's log: a line per batch instead of the bar
            logger.info("batch %d/%d: %d crystals sampled in %.1f s", number, len(chunks), len(chunk),
                        time.perf_counter() - chunk_started)
    sampling_seconds = time.perf_counter() - started

    logger.info("matching %d crystals (k = %d) against their references", len(rows), num_samples)
    started = time.perf_counter()
    scores = match_rate(references, predictions, processes=processes or os.cpu_count() or 1)
    return {
        "dataset": dataset, "split": split, "crystals": len(rows), "num_samples": num_samples,
        "steps": steps or model.schedules.num_steps, "step_lr": step_lr, "seed": seed,
        "lattice_bound": json_number(resolved_lattice_bound(model.mode, lattice_bound)),
        "precision": precision, "symmetrised": symmetrise, "grid_power": grid_power,
        "match_rate": 100.0 * scores.match_rate, "rmse": scores.rmse, **{k: v for k, v in scores.to_dict().items()
                                                                         if k not in ("match_rate", "rmse")},
        "sampling_seconds": round(sampling_seconds, 1), "matching_seconds": round(time.perf_counter() - started, 1),
        # as installed: pymatgen's own __version__ string lags its releases (2026.10.16 inside 2026.10.24)
        "versions": {"equicsp": equicsp_core.__version__, "torch": str(torch.__version__),
                     **{package: version(package) for package in ("pymatgen", "smact")}},
        "rows": [list(row) for row in rows] if indices is not None else None,
        "per_crystal_rms": scores.per_crystal_rms,
    }


#: Report fields that must agree for reports to be merged (:func:`merge_reports`).
SETTINGS_KEYS = ("dataset", "split", "num_samples", "steps", "step_lr", "seed", "lattice_bound", "precision",
                 "symmetrised", "grid_power", "checkpoint", "versions")


def _setting(report: dict[str, Any], key: str) -> Any:
    """A report's value of a setting for :func:`merge_reports`; the checkpoint counts by its weights
    (``model_sha256``), so one file given by name in one part and by path in another is the same checkpoint, and the
    lattice bound by its value (``"inf"``, :func:`~equicsp_core.files.json_number`, is the ``Infinity`` of reports
    written before it)."""
    value = report.get(key)
    if key == "checkpoint" and isinstance(value, dict) and "model_sha256" in value:
        return value["model_sha256"]
    if key == "lattice_bound" and value is not None:
        return float(value)
    return value


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of :func:`evaluate` from reports of disjoint row sets run with the same settings (one long
    evaluation split over processes or machines with ``--indices``): counts and seconds summed, the match rate and
    RMSE recomputed from the crystals' RMS distances (the RMSE is their mean over the matched crystals, as in
    :func:`equicsp_core.metrics.match_rate`), rows and RMS distances in the order given.

    Each part draws its own noise from the seed, so the merged figures are one draw of the sampler, not those a
    single run over all the rows would give.

    Raises:
        ValueError: naming the field, when a report differs in a setting (:data:`SETTINGS_KEYS`; the checkpoint by
            its ``model_sha256`` where the reports record it, else by path, dataset and epochs), lacks its rows
            (it ran without ``--indices``), or shares rows with another.
    """
    if len(reports) < 2:
        raise ValueError("give at least two reports to merge")
    first = reports[0]
    for number, report in enumerate(reports[1:], start=2):
        for key in SETTINGS_KEYS:
            if _setting(report, key) != _setting(first, key):
                raise ValueError(f"report {number} differs in {key}: {report.get(key)!r}, report 1 {first.get(key)!r}")
    if any(report.get("rows") is None for report in reports):
        raise ValueError("a report holds no rows (it ran without --indices): disjointness cannot be checked")
    rows = [tuple(row) for report in reports for row in report["rows"]]
    if len(set(rows)) != len(rows):
        raise ValueError("the reports share rows: each crystal counts once")
    rms = [value for report in reports for value in report["per_crystal_rms"]]
    matched = [value for value in rms if value is not None]
    total = sum(report["total"] for report in reports)
    return {
        **{key: first.get(key) for key in SETTINGS_KEYS},
        "crystals": sum(report["crystals"] for report in reports),
        "match_rate": 100.0 * len(matched) / total, "rmse": sum(matched) / len(matched) if matched else None,
        "matched": len(matched), "total": total,
        "valid_predictions": sum(report["valid_predictions"] for report in reports),
        "sampling_seconds": round(sum(report["sampling_seconds"] for report in reports), 1),
        "matching_seconds": round(sum(report["matching_seconds"] for report in reports), 1),
        "parts": sum(report.get("parts", 1) for report in reports),
        "rows": [list(row) for row in rows],
        "per_crystal_rms": rms,
    }

