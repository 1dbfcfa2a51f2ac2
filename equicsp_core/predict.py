"""Structure prediction for given compositions: formulas in, pymatgen ``Structure`` objects out.

:class:`SampleSettings` holds everything a sampling run needs besides the model (the keys of
``equicsp sample --input FILE``, with their defaults); :func:`predict_batches` samples batch by batch so a
caller can save each batch as it finishes, and :func:`predict_structures` returns all candidates at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from equicsp_core.crystal import MAX_ATOMIC_NUMBER
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.hardware import check_device_name, check_threads
from equicsp_core.sampler import DEFAULT_STEP_LR, sample, time_grid
from equicsp_core.vonmises_tables import MAX_TABLE_ATOMS

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One sampled structure (``None`` when the sample is not a valid crystal)."""

    formula: str
    sample_index: int
    structure: Structure | None


def max_atoms_for_mode(mode: str) -> int | None:
    """Largest cell a model of this denoiser mode can sample (``None``: no limit).

    EquiCSP mode needs the von Mises normalisation tables, which cover cells of up to
    :data:`MAX_TABLE_ATOMS` atoms; DiffCSP mode has no such limit.
    """
    return MAX_TABLE_ATOMS if mode == "equicsp" else None


def parse_formula(formula: str, max_atoms: int | None = MAX_TABLE_ATOMS) -> list[int]:
    """Atomic numbers of the cell a formula describes (``"SrTiO3"`` → 5 atoms), with clear errors.

    The formula fixes the cell contents, so ``"Sr2Ti2O6"`` asks for a 10-atom cell. ``max_atoms=None``
    checks the formula without a size limit.
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
    if max_atoms is not None and len(numbers) > max_atoms:
        raise ValueError(f"formula {formula!r} has {len(numbers)} atoms; the model supports at most {max_atoms}")
    return numbers


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _as_number(name: str, value: Any, minimum: float) -> float:
    """``value`` as a float >= ``minimum``; numeric text is accepted because YAML 1.1 (PyYAML) reads
    exponent notation without a dot, such as ``5e-6``, as a string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got the text {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


@dataclass(frozen=True)
class SampleSettings:
    """A sampling run's settings besides the model: ``equicsp sample``'s flags or its ``--input`` file.

    Attributes:
        formulas: cell contents, e.g. ``("SrTiO3", "CaTiO3")``; each formula fixes the atom count, and
            a formula may appear only once (it names the output files).
        num_samples: candidates per formula.
        steps: predictor–corrector steps (``None``: the model's T, the papers' sampler).
        step_lr: Langevin step scale γ.
        lattice_bound: clamp of the predicted clean lattice (``None``: the mode's; ``inf``: the papers' update).
        seed: seed of all randomness (same seed ⇒ same candidates).
        batch_size: crystals sampled together; results are saved after each batch.
        device: ``auto`` (CUDA if present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
            (:mod:`equicsp_core.hardware`).
        threads: CPU threads of torch (``None``: ``$OMP_NUM_THREADS``, else every CPU the process may use).
    """

    formulas: tuple[str, ...]
    num_samples: int = 1
    steps: int | None = None
    step_lr: float = DEFAULT_STEP_LR
    lattice_bound: float | None = None
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.formulas, str) or not isinstance(self.formulas, (list, tuple)):
            raise ValueError(f"formulas must be a list of formula strings, got {self.formulas!r}")
        object.__setattr__(self, "formulas", tuple(self.formulas))
        if not self.formulas:
            raise ValueError("no formula given")
        for formula in self.formulas:
            if not isinstance(formula, str):
                raise ValueError(f"formulas must be strings, got {formula!r}")
            parse_formula(formula, max_atoms=None)
        repeated = sorted({formula for formula in self.formulas if self.formulas.count(formula) > 1})
        if repeated:
            raise ValueError(f"formula {repeated[0]!r} is given more than once (use num_samples for more candidates)")
        _check_int("num_samples", self.num_samples, minimum=1)
        if self.steps is not None:
            _check_int("steps", self.steps, minimum=1)
        object.__setattr__(self, "step_lr", _as_number("step_lr", self.step_lr, minimum=0))
        if self.lattice_bound is not None:
            object.__setattr__(self, "lattice_bound", _as_number("lattice_bound", self.lattice_bound, minimum=0))
        _check_int("seed", self.seed)
        _check_int("batch_size", self.batch_size, minimum=1)
        check_device_name(self.device)
        check_threads(self.threads)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The setting names, in declaration order (the keys an ``--input`` file may use)."""
        return tuple(field.name for field in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SampleSettings:
        """Settings from a mapping such as a parsed ``--input`` file; unknown or missing keys are named."""
        if not isinstance(values, Mapping):
            raise ValueError(f"sample settings must be a mapping of {', '.join(cls.keys())}; got {values!r}")
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown sample setting(s) {', '.join(map(str, unknown))}; "
                             f"allowed: {', '.join(cls.keys())}")
        if "formulas" not in values:
            raise ValueError("sample settings need 'formulas', the list of formulas to sample")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (``formulas`` as a list), ready for YAML or JSON."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values["formulas"] = list(self.formulas)
        return values


def predict_batches(
    model: CrystalDiffusion,
    formulas: list[str] | tuple[str, ...],
    num_samples: int = 1,
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
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total_steps = model.schedules.num_steps
    time_grid(total_steps if steps is None else steps, total_steps)
    max_atoms = max_atoms_for_mode(model.mode)
    jobs = [(formula, index, parse_formula(formula, max_atoms)) for formula in formulas for index in range(num_samples)]
    return _sample_batches(model, jobs, steps, step_lr, seed, batch_size, progress, lattice_bound)


def _sample_batches(
    model: CrystalDiffusion,
    jobs: list[tuple[str, int, list[int]]],
    steps: int | None,
    step_lr: float,
    seed: int,
    batch_size: int,
    progress: bool,
    lattice_bound: float | None,
) -> Iterator[list[Candidate]]:
    """The sampling loop of :func:`predict_batches`; ``jobs`` are ``(formula, sample index, atomic numbers)``."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    batches = math.ceil(len(jobs) / batch_size)
    for number, start in enumerate(range(0, len(jobs), batch_size), start=1):
        chunk = jobs[start:start + batch_size]
        numbers = torch.tensor([z for _, _, zs in chunk for z in zs])
        counts = torch.tensor([len(zs) for _, _, zs in chunk])
        started = time.perf_counter()
        result = sample(model, numbers, counts, steps=steps, step_lr=step_lr, generator=generator, progress=progress,
                        lattice_bound=lattice_bound)
        logger.info("batch %d/%d: %d crystals sampled in %.1f s", number, batches, len(chunk),
                    time.perf_counter() - started)
        yield [Candidate(formula, index, crystal.to_structure() if crystal is not None else None)
               for (formula, index, _), crystal in zip(chunk, result.crystals(), strict=True)]


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
    batches = predict_batches(model, formulas, num_samples, steps, step_lr, seed, batch_size, progress, lattice_bound)
    return [candidate for batch in batches for candidate in batch]
