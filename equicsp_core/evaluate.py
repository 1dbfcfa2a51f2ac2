"""The papers' CSP evaluation protocol (METHOD.md §8) on a benchmark split.

For each selected test crystal: sample ``num_samples`` structures with its true composition, then score
them against the ground truth parsed from the split's ``cif`` column as is (no Niggli reduction).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

import equicsp_core
from equicsp_core.data import load_split, read_cifs, split_path
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.metrics import match_rate
from equicsp_core.sampler import LATTICE_X0_BOUND, sample
from equicsp_core.settings import DEFAULT_STEP_LR


def select_indices(total: int, limit: int | None = None, indices: list[int] | None = None) -> list[int]:
    """All rows, the first ``limit`` rows, or explicit row indices (checked against the split's size)."""
    if limit is not None and indices is not None:
        raise ValueError("give either a limit or explicit indices, not both")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise ValueError(f"indices out of range 0..{total - 1}: {bad[:5]}")
        if not indices:
            raise ValueError("the index list is empty")
        return list(indices)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return list(range(min(limit, total)))
    return list(range(total))


def evaluate(
    model: CrystalDiffusion,
    dataset: str,
    split: str = "test",
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
) -> dict[str, Any]:
    """Match rate (%) and RMSE of ``model`` on a split; returns a JSON-ready dict with settings and versions."""
    import pymatgen.core
    import smact
    from pymatgen.core import Structure
    from tqdm import tqdm

    if num_samples < 1:
        raise ValueError(f"num_samples (k) must be >= 1, got {num_samples}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    crystals = load_split(dataset, split, data_dir, progress=progress)
    rows = select_indices(len(crystals), limit, indices)
    cifs = read_cifs(split_path(dataset, split, data_dir))
    references = [Structure.from_str(cifs[i], fmt="cif") for i in rows]
    selected = [crystals[i] for i in rows]

    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    started = time.perf_counter()
    predictions: list[list] = [[] for _ in rows]
    chunks = [(r, s) for r in range(num_samples) for s in range(0, len(selected), batch_size)]
    for _, start in tqdm(chunks, desc=f"sampling {dataset}/{split}", disable=not progress, unit="batch"):
        chunk = selected[start:start + batch_size]
        result = sample(model, torch.cat([c.atomic_numbers for c in chunk]), torch.tensor([c.num_atoms for c in chunk]),
                        steps=steps, step_lr=step_lr, generator=generator, lattice_bound=lattice_bound, precision=precision)
        for offset, crystal in enumerate(result.crystals()):
            predictions[start + offset].append(crystal.to_structure() if crystal is not None else None)
    sampling_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scores = match_rate(references, predictions, processes=processes or os.cpu_count() or 1)
    return {
        "dataset": dataset, "split": split, "crystals": len(rows), "num_samples": num_samples,
        "steps": steps or model.schedules.num_steps, "step_lr": step_lr, "seed": seed,
        "lattice_bound": lattice_bound if lattice_bound is not None else LATTICE_X0_BOUND[model.mode],
        "precision": precision,
        "match_rate": 100.0 * scores.match_rate, "rmse": scores.rmse, **{k: v for k, v in scores.to_dict().items()
                                                                         if k not in ("match_rate", "rmse")},
        "sampling_seconds": round(sampling_seconds, 1), "matching_seconds": round(time.perf_counter() - started, 1),
        "versions": {"equicsp": equicsp_core.__version__, "torch": str(torch.__version__),
                     "pymatgen": pymatgen.core.__version__, "smact": smact.__version__},
        "rows": rows if indices is not None else None,
    }
