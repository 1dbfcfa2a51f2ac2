"""Exploring a chemical system: its charge-balanced compositions, and which of its candidates are (near-)stable.

A chemical system is a set of elements joined by ``-`` (``Li-Fe-P-O``). Exploring it predicts each of its
compositions as any reduced formula is predicted (every cell size Z the model supports,
:func:`equicsp_core.domain.sampling_cells`; ML relax, merge, ML energy above the hull, novelty), then reports
the candidates on or near the ML hull of the system, the candidates of all its compositions competing with the
references and with each other (:func:`near_stable`).

Compositions
    :func:`charge_balanced_compositions`: the compositions with **every** element of the system present whose
    formula unit (the reduced formula) has at most ``max_atoms`` atoms, and that pass SMACT's test: one
    oxidation state per element, the charges summing to zero, and the cations less electronegative than the
    anions (Pauling). Written as pymatgen writes them (electronegativity order, ``LiFePO4``), sorted by atoms
    in the formula unit, then by formula.

Oxidation states
    SMACT's ICSD 2024 counts filtered to the common states (:data:`COMMONALITY`: at least 3 reports, and at
    least 10 % of the element's reports; :class:`smact.utils.oxidation.ICSD24OxStatesFilter`): Li +1, Fe +2
    and +3, P +5, O -2. Not every state ever reported (``smact_filter``'s default set ``icsd24``): that set
    holds O -1, P -3..+5 and Fe +1..+6, and Li-Fe-P-O then has 2,962 "charge-balanced" compositions of up to
    20 atoms (LiFe4PO among them), against 63 with the common states (LiFePO4 first). A composition that needs
    a rare state (a ferrate, Fe +6) is asked for as a formula instead.

Limits
    A composition qualifies when some cell of it fits both ``max_atoms`` and the model: that is its smallest
    cell, Z = 1, so its formula unit must fit both ``max_atoms`` and the model's largest cell of the Z search
    (:func:`equicsp_core.domain.max_cell_atoms`; :func:`compositions_to_explore`). The larger cells of each
    composition are the model's Z search, as for any reduced formula (``max_formula_units`` caps it).
    mp_20's cells hold at most 20 atoms, so olivine LiFePO4 (Z = 4, 28 atoms) is beyond it: the model can
    only propose cells of Z = 1 and 2.

Torch-free: the AiiDA daemon's host enumerates with it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from equicsp_core.settings import MAX_ATOMIC_NUMBER, SettingsError, formula_of

if TYPE_CHECKING:
    from equicsp_core.reference import ReferenceSet
    from equicsp_core.settings import ExploreSettings, StabilitySettings
    from equicsp_core.stability import EnergiesFunction

#: ``ICSD24OxStatesFilter.filter`` arguments of the oxidation states used: SMACT's default consensus (3
#: reports) and its "medium" commonality (at least 10 % of the element's reports).
COMMONALITY = {"consensus": 3, "commonality": "medium"}
#: A chemical system as written: element symbols joined by ``-``.
_SYSTEM = re.compile(r"[A-Z][a-z]?(-[A-Z][a-z]?)*")


class ChemicalSystemError(SettingsError):
    """A chemical system that cannot be explored: malformed, an unknown element, no composition within the limits."""


def parse_chemical_system(system: Any) -> tuple[str, ...]:
    """The elements of ``system`` (``"Li-Fe-P-O"`` → ``("Li", "Fe", "P", "O")``), in the order written.

    Raises:
        ChemicalSystemError: naming the system, when it is not symbols joined by ``-``, names an unknown element
            (or one beyond the model's element table) or names an element twice.
    """
    from pymatgen.core import Element

    if not isinstance(system, str) or not _SYSTEM.fullmatch(system.strip()):
        raise ChemicalSystemError(f"chemical system {system!r} is not element symbols joined by '-' (e.g. Li-Fe-P-O)")
    elements = tuple(system.strip().split("-"))
    unknown = [symbol for symbol in elements if not Element.is_valid_symbol(symbol)]
    if unknown:
        raise ChemicalSystemError(f"chemical system {system!r}: unknown element {unknown[0]}")
    beyond = [symbol for symbol in elements if Element(symbol).Z > MAX_ATOMIC_NUMBER]
    if beyond:
        raise ChemicalSystemError(f"chemical system {system!r}: unsupported element {beyond[0]} "
                                  f"(Z > {MAX_ATOMIC_NUMBER})")
    repeated = sorted({symbol for symbol in elements if elements.count(symbol) > 1})
    if repeated:
        raise ChemicalSystemError(f"chemical system {system!r} names {repeated[0]} twice")
    return elements


@lru_cache(maxsize=1)
def common_oxidation_states() -> dict[str, tuple[int, ...]]:
    """The common oxidation states of each element SMACT has data for (:data:`COMMONALITY`), e.g. ``Fe: (2, 3)``."""
    from smact.utils.oxidation import ICSD24OxStatesFilter

    table = ICSD24OxStatesFilter().filter(**COMMONALITY)
    return {element: tuple(sorted(int(state) for state in str(states).split()))
            for element, states in zip(table["element"], table["oxidation_state"], strict=True)}


def _balancing_states(elements: Sequence[str]) -> list[tuple[int, ...]]:
    """The combinations of common oxidation states (one per element, each element having some) that pass SMACT's
    Pauling test."""
    import smact
    from smact.screening import pauling_test

    states = common_oxidation_states()
    electronegativities = [smact.Element(symbol).pauling_eneg for symbol in elements]
    combinations = itertools.product(*(states[symbol] for symbol in elements))
    if any(value is None for value in electronegativities):  # no data: the test does not apply (as in CDVAE's)
        return list(combinations)
    return [combination for combination in combinations if pauling_test(combination, electronegativities)]


def _counts(count: int, max_atoms: int) -> Iterator[tuple[int, ...]]:
    """Every ``count`` positive integers summing to at most ``max_atoms``."""
    if count == 0:
        yield ()
        return
    for first in range(1, max_atoms - count + 2):
        for rest in _counts(count - 1, max_atoms - first):
            yield (first, *rest)


def formula(elements: Sequence[str], counts: Sequence[int]) -> str:
    """A composition written as pymatgen orders it (by electronegativity), counts of 1 left out: ``LiFePO4``."""
    from pymatgen.core import Element

    order = sorted(range(len(elements)), key=lambda index: (Element(elements[index]).X, Element(elements[index]).Z))
    return formula_of([Element(elements[index]).Z for index in order for _ in range(counts[index])])


def charge_balanced_compositions(system: str, max_atoms: int) -> list[str]:
    """The charge-balanced compositions of ``system`` with every element present and at most ``max_atoms`` atoms in
    the formula unit (see the module docstring), as reduced formulas, fewest atoms first, then by formula.

    Raises:
        ChemicalSystemError: for a malformed system or an unknown element (:func:`parse_chemical_system`), an
            element with no common oxidation state, or a system with no such composition.
    """
    elements = parse_chemical_system(system)
    if max_atoms < len(elements):
        raise ChemicalSystemError(f"chemical system {system!r} has {len(elements)} elements: no formula unit of at "
                                  f"most {max_atoms} atoms holds them all")
    missing = [symbol for symbol in elements if not common_oxidation_states().get(symbol)]
    if missing:
        raise ChemicalSystemError(f"chemical system {system!r}: {missing[0]} has no common oxidation state in SMACT's "
                                  "ICSD 2024 data, so no charge-balanced composition")
    states = _balancing_states(elements)
    found = [counts for counts in _counts(len(elements), max_atoms) if math.gcd(*counts) == 1
             and any(sum(c * s for c, s in zip(counts, combination, strict=True)) == 0 for combination in states)]
    if not found:
        raise ChemicalSystemError(f"chemical system {system!r} has no charge-balanced composition (SMACT, common "
                                  f"oxidation states) with every element and at most {max_atoms} atoms per formula "
                                  "unit")
    written = [(sum(counts), formula(elements, counts)) for counts in found]
    return [text for _, text in sorted(written)]


def compositions_to_explore(settings: ExploreSettings, mode: str, dataset: str | None) -> list[str]:
    """:func:`charge_balanced_compositions` of ``settings.chemical_system`` within ``settings.max_atoms`` and the
    model's largest cell (:func:`equicsp_core.domain.max_cell_atoms` of its denoiser ``mode`` and ``dataset``).

    Raises:
        ChemicalSystemError: as :func:`charge_balanced_compositions`, naming the limit that applied.
    """
    from equicsp_core.domain import max_cell_atoms

    model_limit = max_cell_atoms(mode, dataset)
    limit = model_limit if settings.max_atoms is None else min(settings.max_atoms, model_limit)
    return charge_balanced_compositions(settings.chemical_system, limit)


def near_stable(rows: Sequence[Mapping[str, Any]], ehull_max: float, system: str | None,
                reference: ReferenceSet, energies: EnergiesFunction, settings: StabilitySettings) -> list[dict[str, Any]]:
    """The stable and near-stable candidates of ranking tables (:func:`equicsp_core.pipeline.table_rows`, all at
    one ML level): copies of their rows with ``ml_e_above_system_hull`` added, at most ``ehull_max`` eV/atom,
    lowest first.

    A row's ``ml_e_above_hull`` places its candidate on the hull of the references alone, so two compositions
    can each lie below it although one decomposes into the other. Here the merged candidates (``ml_rank`` set)
    within ``system`` (its compositions and those of its subsystems; ``None``: any) join the hulls
    (:func:`equicsp_core.stability.hull` with ``compete``): ``ml_e_above_system_hull`` is a candidate's energy
    above the hull of the references *and* the other candidates (0 on it). It is never below
    ``ml_e_above_hull``, so only the rows with ``ml_e_above_hull <= ehull_max`` are placed, and a candidate
    without an ML E_hull (its row's ``reason`` says why) is not listed.

    Args:
        rows: the rows of the ranking tables.
        ehull_max: the threshold, eV/atom.
        system: a chemical system (``Li-Fe-P-O``) or ``None``.
        reference, energies, settings: the reference set, the energies of its entries at the rows' level
            (:data:`~equicsp_core.stability.EnergiesFunction`) and the choice of hull references, as the tables'
            own hulls were built (:func:`equicsp_core.pipeline.stability`).
    """
    from pymatgen.core import Composition

    from equicsp_core.stability import hull

    elements = None if system is None else set(parse_chemical_system(system))
    placed = [dict(row) for row in rows
              if row.get("ml_rank") is not None and row.get("ml_e_above_hull") is not None
              and row["ml_e_above_hull"] <= ehull_max
              and (elements is None or {str(e) for e in Composition(row["reduced_formula"]).elements} <= elements)]
    hulls = hull({str(index): (Composition(row["formula"]), row["ml_energy_per_atom"])
                  for index, row in enumerate(placed)}, reference, energies, settings.reference_cutoff,
                 settings.references_per_composition, compete=True)
    for index, row in enumerate(placed):
        row["ml_e_above_system_hull"] = hulls[str(index)].e_above_hull
    chosen = [row for row in placed
              if row["ml_e_above_system_hull"] is not None and row["ml_e_above_system_hull"] <= ehull_max]
    return sorted(chosen, key=lambda row: (row["ml_e_above_system_hull"], row["reduced_formula"], row["label"]))
