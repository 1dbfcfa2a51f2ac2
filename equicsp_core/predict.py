"""Structure prediction for given compositions: formulas in, pymatgen ``Structure`` objects out.

:func:`predict_batches` samples batch by batch so a caller can save each batch as it finishes, and
:func:`predict_structures` returns all candidates at once; :func:`predict_with_settings` samples with the
knobs of :class:`equicsp_core.settings.SampleSettings` (their one definition and check), a reduced formula at
every cell size Z the model supports (:func:`equicsp_core.domain.sampling_cells`), the candidates shared among
the Zs in proportion to how often each occurs in the model's training data (:func:`sampling_jobs`,
:mod:`equicsp_core.formula_unit_prior`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from equicsp_core.checkpoint import require_task
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.domain import check_cells, sampling_cells
from equicsp_core.formula_unit_prior import formula_unit_order
from equicsp_core.sampler import sample, time_grid
from equicsp_core.settings import DEFAULT_STEP_LR, SampleSettings, formula_of, formula_units, parse_formula

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One sampled structure (``None`` when the sample is not a valid crystal).

    ``formula`` is the formula as requested, ``sample_index`` the candidate's index within it, ``formula_units``
    the Z of its cell and ``cell_formula`` the cell's contents (``Sr2Ti2O6`` for ``SrTiO3`` at Z = 2).
    """

    formula: str
    sample_index: int
    formula_units: int
    cell_formula: str
    structure: Structure | None


def sampling_jobs(cells: Mapping[str, Sequence[Sequence[int]]], num_samples: int,
                  dataset: str | None = None) -> list[tuple[str, int, list[int]]]:
    """``(formula, sample index, atomic numbers)`` of every crystal to sample, formula by formula.

    ``cells`` holds each formula's cells in order of Z (one cell: an explicit cell, sampled ``num_samples``
    times). Over several cells, :func:`~equicsp_core.formula_unit_prior.formula_unit_order` shares the samples
    in proportion to the training prior of ``dataset`` (mp_20, 8 samples of a 4-atom formula over Z = 1..4:
    5, 2, 0, 1), sample by sample in the order that keeps every prefix near that share; a dataset without a table
    (``None``, a user's own model) gets the even spread, sample ``i`` at cell ``i mod len(cells)``
    (round-robin).
    """
    jobs = []
    for formula, options in cells.items():
        units = [formula_units(cell) for cell in options]
        order = formula_unit_order(dataset, len(options[0]) // units[0], units, num_samples)
        jobs.extend((formula, index, list(options[j])) for index, j in enumerate(order))
    return jobs


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

    Each formula is a cell, as written (``SrTiO3``: 5 atoms, ``Sr2Ti2O6``: 10; no Z search, which needs the
    model's domain: :func:`predict_with_settings`). Every input is checked when this is called, before
    anything is sampled; each batch is sampled when the returned iterator reaches it. Candidates come formula
    by formula, sample by sample; the same seed and batch size give the same candidates (one random stream
    runs through the batches in order).
    """
    require_task(model, "csp")
    if not formulas:
        raise ValueError("no formula given")
    cells = {formula: [parse_formula(formula)] for formula in formulas}
    return _predict_cells(model, cells, num_samples, steps, step_lr, seed, batch_size, progress, lattice_bound, None)


def predict_with_settings(
    model: CrystalDiffusion, card: Mapping[str, Any], settings: SampleSettings, progress: bool = False
) -> Iterator[list[Candidate]]:
    """:func:`predict_batches` with the knobs of ``settings``, for a model and its card (from :func:`load_model`).

    Each reduced formula is sampled at every cell size Z the model supports, the candidates shared among the Zs by
    the training prior of the card's ``dataset`` (:func:`~equicsp_core.domain.sampling_cells`,
    :func:`sampling_jobs`); the formulas are checked against the
    model's limits and its training domain before anything is sampled; a generation model is refused
    (:func:`~equicsp_core.checkpoint.require_task`).
    """
    require_task(model, "csp")
    dataset = card.get("dataset")
    cells = sampling_cells(settings, model.mode, dataset)
    return _predict_cells(model, cells, settings.num_samples, settings.steps, settings.step_lr,
                          settings.seed, settings.batch_size, progress, settings.lattice_bound, dataset)


def _predict_cells(
    model: CrystalDiffusion,
    cells: Mapping[str, Sequence[Sequence[int]]],
    num_samples: int,
    steps: int | None,
    step_lr: float,
    seed: int,
    batch_size: int,
    progress: bool,
    lattice_bound: float | None,
    dataset: str | None,
) -> Iterator[list[Candidate]]:
    """:func:`predict_batches` on parsed formulas (``cells``: formula → its cells as atomic numbers, by Z), shared
    among the Zs by the prior of ``dataset`` (:func:`sampling_jobs`)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total_steps = model.schedules.num_steps
    time_grid(total_steps if steps is None else steps, total_steps)
    # the model's hard limit, on each formula's largest cell
    check_cells({formula: max(options, key=len) for formula, options in cells.items()}, model.mode, None,
                allow_outside_domain=True)
    jobs = sampling_jobs(cells, num_samples, dataset)
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
        yield [Candidate(formula, index, formula_units(zs), formula_of(zs),
                         crystal.to_structure() if crystal is not None else None)
               for (formula, index, zs), crystal in zip(chunk, result.crystals(), strict=True)]


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

