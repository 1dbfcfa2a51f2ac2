"""Structure prediction for given compositions: formulas in, pymatgen ``Structure`` objects out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from equicsp_core.crystal import MAX_ATOMIC_NUMBER
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.sampler import DEFAULT_STEP_LR, sample
from equicsp_core.vonmises_tables import MAX_TABLE_ATOMS

if TYPE_CHECKING:
    from pymatgen.core import Structure


@dataclass(frozen=True)
class Candidate:
    """One sampled structure (``None`` when the sample is not a valid crystal)."""

    formula: str
    sample_index: int
    structure: Structure | None


def parse_formula(formula: str, max_atoms: int = MAX_TABLE_ATOMS) -> list[int]:
    """Atomic numbers of the cell a formula describes (``"SrTiO3"`` → 5 atoms), with clear errors.

    The formula fixes the cell contents, so ``"Sr2Ti2O6"`` asks for a 10-atom cell.
    """
    from pymatgen.core import Composition

    try:
        composition = Composition(formula)
    except Exception as error:
        raise ValueError(f"cannot parse formula {formula!r}: {error}") from error
    numbers: list[int] = []
    for element, amount in composition.items():
        z = getattr(element, "Z", None)
        if z is None or not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise ValueError(f"formula {formula!r}: unsupported element {element}")
        if abs(amount - round(amount)) > 1e-8 or amount < 1:
            raise ValueError(f"formula {formula!r}: {element} count {amount} is not a positive integer")
        numbers += [z] * round(amount)
    if not numbers:
        raise ValueError(f"formula {formula!r} has no atoms")
    if len(numbers) > max_atoms:
        raise ValueError(f"formula {formula!r} has {len(numbers)} atoms; the model supports at most {max_atoms}")
    return numbers


def predict_structures(
    model: CrystalDiffusion,
    formulas: list[str],
    num_samples: int = 1,
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
    if not formulas:
        raise ValueError("no formula given")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_atoms = MAX_TABLE_ATOMS if model.mode == "equicsp" else 10**6
    jobs = [(formula, index, parse_formula(formula, max_atoms)) for formula in formulas for index in range(num_samples)]
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    candidates: list[Candidate] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        numbers = torch.tensor([z for _, _, zs in chunk for z in zs])
        counts = torch.tensor([len(zs) for _, _, zs in chunk])
        result = sample(model, numbers, counts, steps=steps, step_lr=step_lr, generator=generator, progress=progress,
                        lattice_bound=lattice_bound)
        for (formula, index, _), crystal in zip(chunk, result.crystals()):
            candidates.append(Candidate(formula, index, crystal.to_structure() if crystal is not None else None))
    return candidates
