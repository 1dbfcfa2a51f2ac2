"""What a model can be asked: its hard size limit and the domain of the data it was trained on.

Two different limits:

- **hard**: an EquiCSP-mode model needs the von Mises normalisation tables, which cover cells of up to
  :data:`MAX_TABLE_ATOMS` atoms (:func:`max_atoms_for_mode`); beyond them it cannot sample at all.
- **training domain**: a model trained on mp_20 saw cells of at most 20 atoms and 88 elements. Given
  ``Si40`` or ``Fm2O3`` it still samples, but what comes out is an extrapolation that the benchmark numbers
  say nothing about. Such a request is refused unless the user insists (the sampling setting
  ``allow_outside_domain``): a silent warning would be lost in an AiiDA job, and a refusal costs one flag.

:data:`TRAINING_DOMAINS` holds, per benchmark dataset, the largest cell and the elements found in the splits
held for this project (perov_5: train, val and test; the others: val and test, the splits the shipped models
were trained and tested on). A model of a dataset not listed here has no domain check.

Formula units
    A formula written reduced (``GaAs``, ``ZnO``, ``SrTiO3``: the gcd of its counts is 1) asks for a
    composition, not a cell: :func:`sampling_cells` gives it every cell size Z = 1..Zmax, Zmax the largest Z
    whose cell fits the training domain's largest cell (:func:`max_cell_atoms`; for a model with no known
    domain, the hard limit of its mode), capped by the sampling setting ``max_formula_units``. A formula
    written with gcd > 1 (``Zn2O2``) is an explicit cell: Z is its gcd, and it means exactly that cell.
    ``allow_outside_domain`` keeps its meaning, per cell: a formula whose smallest cell is beyond the
    domain is sampled at Z = 1 (as written) instead of refused; the Z search itself never leaves the domain.
    How the ``num_samples`` candidates are shared among these Zs is :mod:`equicsp_core.formula_unit_prior`'s
    (in proportion to the Zs of the training data; :func:`equicsp_core.predict.sampling_jobs`).

Torch-free: the AiiDA daemon checks a sampling request with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from equicsp_core.settings import FormulaError, SampleSettings, formula_units

#: Largest crystal the von Mises normalisation tables cover (the largest in the CSP benchmarks: mpts_52).
MAX_TABLE_ATOMS = 52


@dataclass(frozen=True)
class TrainingDomain:
    """Largest cell (atoms) and elements (atomic numbers) of a dataset."""

    max_atoms: int
    elements: frozenset[int]


def _domain(max_atoms: int, symbols: str) -> TrainingDomain:
    from pymatgen.core import Element

    return TrainingDomain(max_atoms, frozenset(Element(symbol).Z for symbol in symbols.split()))


_MP_ELEMENTS = ("H Li Be B C N O F Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr "
                "Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Sm Eu Gd Tb Dy Ho Er Tm Yb Lu "
                "Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Th Pa U Np Pu")

#: Per dataset: (largest cell, its elements), from the splits held for this project.
TRAINING_DOMAINS: Mapping[str, tuple[int, str]] = {
    "perov_5": (5, "Li Be B N O F Na Mg Al Si S K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Rb Sr Y Zr Nb Mo Ru Rh "
                   "Pd Ag Cd In Sn Sb Te Cs Ba La Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi"),
    "carbon_24": (24, "C"),
    "mp_20": (20, f"{_MP_ELEMENTS} He Pm Ac"),
    "mpts_52": (52, _MP_ELEMENTS),
}


def max_atoms_for_mode(mode: str) -> int | None:
    """Largest cell a model of this denoiser mode can sample (``None``: no limit)."""
    return MAX_TABLE_ATOMS if mode == "equicsp" else None


def check_generated_atoms(num_atoms: int, mode: str, trained_counts: Iterable[int]) -> None:
    """Refuse an atom count that a generation model of this denoiser ``mode`` cannot honour: beyond the mode's hard
    limit, or beyond the largest of the atom counts it was trained on (``trained_counts``; none: unchecked).

    Raises:
        ValueError: one line naming the count and the limit.
    """
    hard = max_atoms_for_mode(mode)
    if hard is not None and num_atoms > hard:
        raise ValueError(f"num_atoms: {num_atoms} atoms; the model supports at most {hard}")
    largest = max(trained_counts, default=None)
    if largest is not None and num_atoms > largest:
        raise ValueError(f"num_atoms: {num_atoms} atoms, more than the {largest} of the largest crystal the model "
                         "was trained on")


def check_generated_elements(elements: Sequence[str], dataset: str | None) -> list[int]:
    """The atomic numbers of the ``elements`` a generation model trained on ``dataset`` is asked to use; an element
    outside its training domain is refused (a dataset this module does not know: unchecked).

    Raises:
        ValueError: one line naming the first element the model never saw.
    """
    from pymatgen.core import Element

    numbers = [Element(symbol).Z for symbol in elements]
    domain = training_domain(dataset)
    unseen = [] if domain is None else [symbol for symbol, z in zip(elements, numbers) if z not in domain.elements]
    if unseen:
        raise ValueError(f"elements: {unseen[0]} is not among the elements of the {dataset} crystals the model was "
                         "trained on")
    return numbers


def training_domain(dataset: str | None) -> TrainingDomain | None:
    """The domain of a benchmark dataset, ``None`` for a dataset this module does not know."""
    if dataset not in TRAINING_DOMAINS:
        return None
    return _domain(*TRAINING_DOMAINS[dataset])


def max_cell_atoms(mode: str, dataset: str | None) -> int:
    """Largest cell (atoms) of the Z search of a reduced formula: the training domain's largest cell, else the
    mode's hard limit, else (a mode without one and no known domain) :data:`MAX_TABLE_ATOMS`, the largest cell
    of the CSP benchmarks."""
    domain, hard = training_domain(dataset), max_atoms_for_mode(mode)
    if domain is not None:
        return domain.max_atoms if hard is None else min(domain.max_atoms, hard)
    return MAX_TABLE_ATOMS if hard is None else hard


def sampling_cells(settings: SampleSettings, mode: str, dataset: str | None) -> dict[str, list[tuple[int, ...]]]:
    """The cells to sample for each formula of ``settings``, as atomic numbers, in order of Z.

    A reduced formula (Z = 1 as written) gets Z = 1..Zmax (see the module docstring), each cell's atoms
    grouped by element (``SrTiO3`` at Z = 2: Sr Sr Ti Ti O O O O O O); an explicit cell (Z > 1) only
    itself. Every cell is checked by :func:`check_cells` (hard limit, elements of the training domain).

    Raises:
        FormulaError: naming the formula, when the model supports none of its cells.
    """
    cells: dict[str, list[tuple[int, ...]]] = {}
    limit = max_cell_atoms(mode, dataset)
    for formula, written in settings.cells.items():
        # the written cell: the hard limit, the domain's elements, and its size unless allow_outside_domain
        check_cells({formula: written}, mode, dataset, settings.allow_outside_domain)
        if formula_units(written) > 1:
            cells[formula] = [written]
            continue
        largest = limit // len(written)
        if settings.max_formula_units is not None:
            largest = min(largest, settings.max_formula_units)
        if largest == 0:  # the smallest cell is beyond the search's limit: only an insisted-on domain cell goes
            if training_domain(dataset) is None:
                raise FormulaError(f"formula {formula!r} has {len(written)} atoms in its smallest cell; the model "
                                   f"supports cells of at most {limit} atoms")
            largest = 1
        cells[formula] = [tuple(z for z in dict.fromkeys(written) for _ in range(written.count(z) * units))
                          for units in range(1, largest + 1)]
    return cells


def check_cells(cells: Mapping[str, Iterable[int]], mode: str, dataset: str | None, allow_outside_domain: bool) -> None:
    """Refuse formulas (cells as atomic numbers) beyond the model's hard limit, or its training domain.

    Raises:
        FormulaError: naming the formula and the limit; the domain one says how to insist.
    """
    from pymatgen.core import Element

    max_atoms = max_atoms_for_mode(mode)
    domain = None if allow_outside_domain else training_domain(dataset)
    for formula, numbers in cells.items():
        numbers = list(numbers)
        if max_atoms is not None and len(numbers) > max_atoms:
            raise FormulaError(f"formula {formula!r} has {len(numbers)} atoms; the model supports at most "
                                f"{max_atoms}")
        if domain is None:
            continue
        unseen = sorted({Element.from_Z(z).symbol for z in numbers if z not in domain.elements})
        if len(numbers) > domain.max_atoms or unseen:
            beyond = (f"{len(numbers)} atoms, more than the {domain.max_atoms} of {dataset}" if not unseen else
                      f"element(s) {', '.join(unseen)} absent from {dataset}")
            raise FormulaError(f"formula {formula!r} is outside the model's training domain ({beyond}); set "
                                "allow_outside_domain to sample it anyway")
