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

Torch-free: the AiiDA daemon checks a sampling request with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from equicsp_core.settings import FormulaError

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


def training_domain(dataset: str | None) -> TrainingDomain | None:
    """The domain of a benchmark dataset, ``None`` for a dataset this module does not know."""
    if dataset not in TRAINING_DOMAINS:
        return None
    return _domain(*TRAINING_DOMAINS[dataset])


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
