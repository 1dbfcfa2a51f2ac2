"""Ab initio generation: whole crystals, atom types included, from a generation model (docs/method.md §7.6).

A generation model (``DenoiserConfig.task == "generation"``) is given no composition: each crystal's atom
count is drawn from the distribution of the training crystals, which training records in the model card as
``num_atoms_counts`` (:func:`atom_count_distribution`), unless ``num_atoms`` gives it (one count, or several that
the crystals take in turn); the sampler
(:func:`equicsp_core.sampler.sample` without atom types) draws the types with the structure. The candidates come batch by batch,
as :class:`equicsp_core.predict.Candidate` objects, so ``equicsp generate`` writes the run folder of
``equicsp sample`` (:mod:`equicsp_core.runfolder`); a candidate's ``formula`` is the reduced formula it came
out with. ``elements`` restricts the crystals to a chemical system (the sampler's projection of the predicted
types, :func:`equicsp_core.sampler.sample`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from equicsp_core.checkpoint import CheckpointError, require_task
from equicsp_core.crystal import Crystal
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.domain import check_generated_atoms, check_generated_elements
from equicsp_core.predict import Candidate
from equicsp_core.sampler import sample, time_grid
from equicsp_core.settings import GenerateSettings, formula_of, formula_units

logger = logging.getLogger(__name__)

#: The model card's key of the training distribution of atom counts: ``{"5": 1200, ...}`` (count → crystals).
CARD_KEY = "num_atoms_counts"


def atom_count_distribution(crystals: Sequence[Crystal]) -> dict[str, int]:
    """How many of ``crystals`` have each atom count, keys as text (the card is JSON): ``{"5": 1200}``."""
    counts = Counter(crystal.num_atoms for crystal in crystals)
    return {str(n): counts[n] for n in sorted(counts)}


def atom_counts(card: Mapping[str, Any], settings: GenerateSettings, mode: str, generator: torch.Generator) -> torch.Tensor:
    """The atom count of each of the ``settings.num_samples`` crystals ``(B,)``: the counts of ``settings.num_atoms``
    in turn (crystal ``i`` has ``num_atoms[i % len(num_atoms)]``), or drawn with replacement from the card's training
    distribution (with ``generator``).

    Raises:
        ValueError: a count of ``num_atoms`` beyond the mode's hard limit or the largest training crystal.
        CheckpointError: no ``num_atoms`` and a card without the distribution.
    """
    distribution = {int(n): count for n, count in card.get(CARD_KEY, {}).items()}
    if settings.num_atoms is None:
        if not distribution:
            raise CheckpointError(f"the checkpoint's card records no training distribution of atom counts "
                                  f"('{CARD_KEY}'); give num_atoms")
        sizes = torch.tensor(sorted(distribution))
        weights = torch.tensor([distribution[n] for n in sorted(distribution)], dtype=torch.float64)
        return sizes[torch.multinomial(weights, settings.num_samples, replacement=True, generator=generator)]
    for count in settings.num_atoms:
        check_generated_atoms(count, mode, distribution)
    counts = torch.tensor(settings.num_atoms)
    return counts[torch.arange(settings.num_samples) % len(counts)]


def generate_with_settings(
    model: CrystalDiffusion, card: Mapping[str, Any], settings: GenerateSettings, progress: bool = False
) -> Iterator[list[Candidate]]:
    """Generate ``settings.num_samples`` crystals with a generation model and its card (from
    :func:`~equicsp_core.checkpoint.load_model`), in batches of ``settings.batch_size``.

    Everything is checked, and the atom counts drawn, when this is called; each batch is sampled when the
    returned iterator reaches it. One random stream (``settings.seed``) runs through the counts and the batches,
    so the same settings give the same crystals. ``step_lr`` defaults to the generation γ of the card's dataset.

    Raises:
        CheckpointError: a CSP model, or a card without the atom-count distribution (and no ``num_atoms``).
        ValueError: settings the model cannot honour (``steps``, ``num_atoms``, ``elements`` it never saw).
    """
    require_task(model, "generation")
    total_steps = model.schedules.num_steps
    time_grid(total_steps if settings.steps is None else settings.steps, total_steps)
    generator = torch.Generator().manual_seed(settings.seed)  # on the CPU: the same draws on any device
    counts = atom_counts(card, settings, model.mode, generator)
    elements = (None if settings.elements is None
                else check_generated_elements(settings.elements, card.get("dataset")))
    sampler = {"steps": settings.steps, "step_lr": settings.step_lr_for(card.get("dataset")), "progress": progress,
               "lattice_bound": settings.lattice_bound, "generator": generator, "elements": elements}
    return _generate_batches(model, counts, settings.batch_size, sampler)


def _generate_batches(
    model: CrystalDiffusion, counts: torch.Tensor, batch_size: int, sampler: dict[str, Any]
) -> Iterator[list[Candidate]]:
    """The loop of :func:`generate_with_settings`; ``sampler`` the keyword arguments of
    :func:`~equicsp_core.sampler.sample`."""
    batches = math.ceil(len(counts) / batch_size)
    for number, start in enumerate(range(0, len(counts), batch_size), start=1):
        started = time.perf_counter()
        result = sample(model, None, counts[start:start + batch_size], **sampler)
        logger.info("batch %d/%d: %d crystals generated in %.1f s", number, batches, result.batch.num_crystals,
                    time.perf_counter() - started)
        cells = result.batch.atomic_numbers.cpu().split(result.batch.num_atoms.tolist())
        candidates = []
        for index, (cell, crystal) in enumerate(zip(cells, result.crystals(), strict=True), start=start):
            numbers = cell.tolist()
            units = formula_units(numbers)
            reduced = [z for z in dict.fromkeys(numbers) for _ in range(numbers.count(z) // units)]
            candidates.append(Candidate(formula_of(reduced), index, units, formula_of(numbers),
                                        crystal.to_structure() if crystal is not None else None))
        yield candidates
