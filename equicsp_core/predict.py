"""Structure prediction for given compositions: formulas in, pymatgen ``Structure`` objects out.

:func:`predict_batches` samples batch by batch so a caller can save each batch as it finishes, and
:func:`predict_structures` returns all candidates at once; :func:`predict_with_settings` samples with the
knobs of :class:`equicsp_core.settings.SampleSettings` (their one definition and check).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.domain import check_cells
from equicsp_core.sampler import sample, time_grid
from equicsp_core.settings import DEFAULT_STEP_LR, SampleSettings, parse_formula

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One sampled structure (``None`` when the sample is not a valid crystal)."""

    formula: str
    sample_index: int
    structure: Structure | None


def predict_batches(
    model: CrystalDiffusion,
    formulas: list[str] | tuple[str, ...],
    num_samples: int = SampleSettings.default("num_samples"),
    steps: int | None = None,
    step_lr: float = DEFAULT_STEP_LR,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    lattice_bound: float | None = None,
) -> Iterator[list[Candidate]]:
    """Sample ``num_samples`` structures per formula, one batch of at most ``batch_size`` crystals at a time.

    Every input is checked when this is called, before anything is sampled; each batch is sampled when
    the returned iterator reaches it. Candidates come formula by formula, sample by sample; the same seed
    and batch size give the same candidates (one random stream runs through the batches in order).
    """
    if not formulas:
        raise ValueError("no formula given")
    cells = {formula: parse_formula(formula) for formula in formulas}
    return _predict_cells(model, cells, num_samples, steps, step_lr, seed, batch_size, progress, lattice_bound)


def predict_with_settings(
    model: CrystalDiffusion, card: Mapping[str, Any], settings: SampleSettings, progress: bool = False
) -> Iterator[list[Candidate]]:
    """:func:`predict_batches` with the knobs of ``settings``, for a model and its card (from :func:`load_model`).

    The formulas are checked against the model's limits and its training domain
    (:func:`~equicsp_core.domain.check_cells`) before anything is sampled.
    """
    check_cells(settings.cells, model.mode, card.get("dataset"), settings.allow_outside_domain)
    return _predict_cells(model, settings.cells, settings.num_samples, settings.steps, settings.step_lr,
                          settings.seed, settings.batch_size, progress, settings.lattice_bound)


def _predict_cells(
    model: CrystalDiffusion,
    cells: Mapping[str, Sequence[int]],
    num_samples: int,
    steps: int | None,
    step_lr: float,
    seed: int,
    batch_size: int,
    progress: bool,
    lattice_bound: float | None,
) -> Iterator[list[Candidate]]:
    """:func:`predict_batches` on parsed formulas (``cells``: formula → atomic numbers)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total_steps = model.schedules.num_steps
    time_grid(total_steps if steps is None else steps, total_steps)
    check_cells(cells, model.mode, None, allow_outside_domain=True)  # the model's hard limit
    jobs = [(formula, index, list(cell)) for formula, cell in cells.items() for index in range(num_samples)]
    sampler = {"steps": steps, "step_lr": step_lr, "progress": progress, "lattice_bound": lattice_bound}
    return _sample_batches(model, jobs, seed, batch_size, sampler)


def _sample_batches(
    model: CrystalDiffusion, jobs: list[tuple[str, int, list[int]]], seed: int, batch_size: int,
    sampler: dict[str, Any],
) -> Iterator[list[Candidate]]:
    """The sampling loop of :func:`predict_batches`; ``jobs`` are ``(formula, sample index, atomic numbers)``,
    ``sampler`` the keyword arguments of :func:`~equicsp_core.sampler.sample`."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device (equicsp_core.rng)
    batches = math.ceil(len(jobs) / batch_size)
    for number, start in enumerate(range(0, len(jobs), batch_size), start=1):
        chunk = jobs[start:start + batch_size]
        numbers = torch.tensor([z for _, _, zs in chunk for z in zs])
        counts = torch.tensor([len(zs) for _, _, zs in chunk])
        started = time.perf_counter()
        result = sample(model, numbers, counts, generator=generator, **sampler)
        logger.info("batch %d/%d: %d crystals sampled in %.1f s", number, batches, len(chunk),
                    time.perf_counter() - started)
        yield [Candidate(formula, index, crystal.to_structure() if crystal is not None else None)
               for (formula, index, _), crystal in zip(chunk, result.crystals(), strict=True)]


def predict_structures(
    model: CrystalDiffusion,
    formulas: list[str],
    num_samples: int = SampleSettings.default("num_samples"),
    steps: int | None = None,
    step_lr: float = DEFAULT_STEP_LR,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    lattice_bound: float | None = None,
) -> list[Candidate]:
    """Sample ``num_samples`` structures per formula, in batches of ``batch_size`` crystals.

    Candidates come back formula by formula, sample by sample; the same seed gives the same result.
    """
    batches = predict_batches(model, formulas, num_samples, steps, step_lr, seed, batch_size, progress, lattice_bound)
    return [candidate for batch in batches for candidate in batch]

