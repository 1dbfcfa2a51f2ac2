"""Stability and novelty of relaxed candidates against the reference set (:mod:`equicsp_core.reference`).

**Stability** is the energy above the convex hull at the ML level: the hull of a candidate's chemical system
is built (pymatgen's :class:`~pymatgen.analysis.phase_diagram.PhaseDiagram`) from reference entries relaxed
with the *same* potential and settings as the candidates, so that every energy on it comes from one model. The
references are relaxed on demand, only those of the candidate's system and its subsystems (elements
included), chosen by :meth:`~equicsp_core.reference.ReferenceSet.hull_references` (the data's
``e_above_hull`` cut-off and a number per composition), and their energies are cached
(:class:`EnergyCache`: a JSON file in the cache folder keyed by the relaxation level, the reference set's
SHA-256 and the entry id), so a campaign relaxes each reference once. A candidate below the hull gets a
negative value. A system with an element that has no elemental reference (or whose relaxation failed) has
no hull: the candidate gets a reason instead of a number, and the others go on.

**Novelty**: a relaxed candidate is matched (pymatgen's :class:`StructureMatcher`, default tolerances) with
the reference entries of its reduced formula, as stored (DFT-relaxed cells of the data), the lowest data
``e_above_hull`` first, and a match counts only where the two cells agree in shape
(:mod:`equicsp_core.cell_shape`): ``"matches mp-1234 (Pm-3m)"``, ``"new: mp-1234 (P4/mmm) strained by 10 %"``
(the matcher's strained relative of a known phase) or ``"new"``.

The reference energies are injected: relaxed on demand by a :data:`RelaxFunction`
(:func:`equicsp_core.relax.relax_structures` in production, a stub in tests) and cached (:func:`e_above_hull`,
the engine's and the jobflow route's way), or relaxed elsewhere and handed over as records
(:func:`known_energies`: the AiiDA work chain relaxes the entries :func:`hull_references` names in a CalcJob on
the compute host, and the daemon only builds the hull). Either way one function, :func:`hull`, builds it.
Units: eV/atom.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from equicsp_core.files import cache_dir, write_text_atomically
from equicsp_core.reference import ReferenceEntry, ReferenceSet

if TYPE_CHECKING:
    from pymatgen.core import Composition, Structure

logger = logging.getLogger(__name__)

#: Relax labelled structures, yielding ``(label, result)``; a result has ``status`` (``failed`` or not),
#: ``energy_per_atom`` (eV/atom) and ``error`` (:class:`equicsp_core.relax.RelaxResult`).
RelaxFunction = Callable[[Mapping[str, "Structure"]], Iterable[tuple[str, Any]]]
#: File name of the reference energies in the cache folder.
ENERGY_CACHE_FILE = "reference_energies.json"


def default_cache_path() -> Path:
    """``reference_energies.json`` in the cache folder (``$EQUICSP_CACHE_DIR``, else ``~/.cache/equicsp``)."""
    return cache_dir() / ENERGY_CACHE_FILE


class EnergyCache:
    """Relaxed energies of reference entries: ``{level: {reference sha256: {id: record}}}`` in a JSON file.

    A record is ``{"energy_per_atom": eV/atom or None, "status": ..., "error": ...}``. ``level`` names the
    potential and the relaxation settings (:func:`equicsp_core.pipeline.ml_level`). Every new record is
    written at once (atomically, the file re-read just before), so an interrupted campaign keeps what it
    relaxed; two processes writing at the same instant may lose one record, which is then only relaxed again.
    """

    def __init__(self, path: str | Path, level: str, reference_sha256: str) -> None:
        self.path, self.level, self.sha256 = Path(path), level, reference_sha256

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing or unreadable: start afresh (it is only a cache)
            return {}

    def records(self) -> dict[str, dict[str, Any]]:
        """The cached records of this level and reference set, by entry id."""
        return self._read().get(self.level, {}).get(self.sha256, {})

    def add(self, entry_id: str, record: dict[str, Any]) -> None:
        """Store one record."""
        content = self._read()
        content.setdefault(self.level, {}).setdefault(self.sha256, {})[entry_id] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.path, json.dumps(content, indent=1, sort_keys=True))


def reference_energies(entries: Iterable[ReferenceEntry], relax: RelaxFunction,
                       cache: EnergyCache) -> dict[str, float | None]:
    """The relaxed energy per atom (eV/atom; ``None``: the relaxation failed) of each entry, by id.

    Only the entries not in ``cache`` are relaxed (in one call of ``relax``, so a potential loads once).
    """
    entries = list(entries)
    known = cache.records()
    missing = {entry.id: entry.structure for entry in entries if entry.id not in known}
    if missing:
        logger.info("relaxing %d reference structure(s) at level %s", len(missing), cache.level)
        for entry_id, result in relax(missing):
            failed = result.status == "failed" or result.energy_per_atom is None
            known[entry_id] = {"energy_per_atom": None if failed else float(result.energy_per_atom),
                               "status": result.status, "error": result.error}
            cache.add(entry_id, known[entry_id])
    return {entry.id: known[entry.id]["energy_per_atom"] for entry in entries}


@dataclass(frozen=True)
class HullResult:
    """A candidate's energy above the hull (eV/atom; negative: below it) or why there is none."""

    e_above_hull: float | None
    reason: str | None = None


#: The relaxed energy per atom (eV/atom; ``None``: unknown or failed) of reference entries, by id.
EnergiesFunction = Callable[[Sequence[ReferenceEntry]], Mapping[str, "float | None"]]


def known_energies(records: Mapping[str, Mapping[str, Any]]) -> EnergiesFunction:
    """The :data:`EnergiesFunction` of energies relaxed elsewhere: ``records`` is ``{id: {"energy_per_atom",
    "status", "error"}}`` (the :class:`EnergyCache` record); an entry without a record, or with no energy, is
    ``None`` (left out of the hull, as a failed relaxation)."""

    def energies(entries: Sequence[ReferenceEntry]) -> dict[str, float | None]:
        return {entry.id: _energy(records.get(entry.id)) for entry in entries}

    return energies


def _energy(record: Mapping[str, Any] | None) -> float | None:
    value = None if record is None else record.get("energy_per_atom")
    return None if value is None else float(value)


def hull_systems(compositions: Mapping[str, Composition], reference: ReferenceSet, cutoff: float,
                 per_composition: int, exclude: Iterable[str] = ()
                 ) -> list[tuple[frozenset[str], list[str], list[ReferenceEntry]]]:
    """The hulls to build for labelled candidate compositions: ``[(elements, labels, reference entries)]``, one per
    chemical system (sorted), with the entries that go into its hull
    (:meth:`~equicsp_core.reference.ReferenceSet.hull_references`, less the ``exclude`` ids)."""
    excluded = set(exclude)
    by_system: dict[frozenset[str], list[str]] = {}
    for label, composition in compositions.items():
        by_system.setdefault(_elements(composition), []).append(label)
    return [(system, labels, [entry for entry in reference.hull_references(system, cutoff, per_composition)
                              if entry.id not in excluded])
            for system, labels in sorted(by_system.items(), key=lambda item: sorted(item[0]))]


def hull_references(compositions: Mapping[str, Composition], reference: ReferenceSet, cutoff: float,
                    per_composition: int, exclude: Iterable[str] = ()) -> list[ReferenceEntry]:
    """Every reference entry the hulls of ``compositions`` need (:func:`hull_systems`), once each, sorted by id:
    what must be relaxed before :func:`hull` can run on energies relaxed elsewhere (:func:`known_energies`)."""
    needed = {entry.id: entry for _, _, entries in hull_systems(compositions, reference, cutoff, per_composition,
                                                                  exclude) for entry in entries}
    return [needed[key] for key in sorted(needed)]


def _elements(composition: Composition) -> frozenset[str]:
    return frozenset(element.symbol for element in composition)


def e_above_hull(candidates: Mapping[str, tuple[Composition, float]], reference: ReferenceSet, relax: RelaxFunction,
                 cache: EnergyCache, cutoff: float, per_composition: int,
                 exclude: Iterable[str] = (), compete: bool = False) -> dict[str, HullResult]:
    """:func:`hull` with the reference entries relaxed by ``relax`` where ``cache`` (at the candidates' level)
    does not hold them yet (:func:`reference_energies`)."""
    return hull(candidates, reference, lambda entries: reference_energies(entries, relax, cache), cutoff,
                per_composition, exclude, compete)


def hull(candidates: Mapping[str, tuple[Composition, float]], reference: ReferenceSet, energies: EnergiesFunction,
         cutoff: float, per_composition: int, exclude: Iterable[str] = (), compete: bool = False, level: str = "ML"
         ) -> dict[str, HullResult]:
    """The energy above the hull of each candidate, at the level of its energies: ``{label: HullResult}``.

    By default each candidate is placed on the hull of the references alone (negative: below it, lower than every
    known phase). With ``compete`` the candidates join the hulls too, as the phases an exploration of a chemical
    system would report: the hull of a system holds its references and every candidate of the system or of a
    subsystem (SrO and TiO2 in Sr-Ti-O's), so each candidate's value is its energy above the hull of the references
    *and* the other candidates (0 on it, never negative), and two compositions that are each below the known hull
    do not both read as stable when one decomposes into the other.

    Args:
        candidates: ``label -> (composition of the relaxed cell, energy per atom in eV/atom)``, all at one level.
        reference: the reference set.
        energies: the reference entries' energies per atom at the candidates' level, called once per chemical
            system (relaxed on demand: :func:`e_above_hull`; relaxed elsewhere: :func:`known_energies`).
        cutoff, per_composition: the choice of hull references
            (:meth:`~equicsp_core.reference.ReferenceSet.hull_references`).
        exclude: ids of reference entries left out of every hull (a benchmark's own known structure).
        compete: the candidates join the hulls of their systems and of the systems above them.
        level: what the energies are, as a reason names the missing value: ``ML`` (``"no ML E_hull: ..."``) or
            ``DFT``.
    """
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    results: dict[str, HullResult] = {}
    compositions = {label: composition for label, (composition, _) in candidates.items()}
    entries = {label: PDEntry(composition, energy * composition.num_atoms, name=label)
               for label, (composition, energy) in candidates.items()}
    for system, labels, chosen in hull_systems(compositions, reference, cutoff, per_composition, exclude):
        known = energies(chosen)
        usable = [entry for entry in chosen if known.get(entry.id) is not None]
        covered = {next(iter(entry.elements)) for entry in usable if len(entry.elements) == 1}
        gaps = sorted(system - covered)
        if gaps:
            reason = (f"no {level} E_hull: no elemental reference for {', '.join(gaps)} "
                      "(none in the reference set, or its calculation failed)")
            results.update({label: HullResult(None, reason) for label in labels})
            continue
        competing = [entries[label] for label, composition in compositions.items()
                     if _elements(composition) <= system] if compete else []
        diagram = PhaseDiagram([PDEntry(_composition(entry), known[entry.id] * len(entry.species), name=entry.id)
                                for entry in usable] + competing)
        for label in labels:
            _, above = diagram.get_decomp_and_e_above_hull(entries[label], allow_negative=True)
            results[label] = HullResult(float(above))
    return results


def _composition(entry: ReferenceEntry) -> Any:
    from pymatgen.core import Composition

    counts: dict[str, int] = {}
    for symbol in entry.species:
        counts[symbol] = counts.get(symbol, 0) + 1
    return Composition(counts)


def novelty(structure: Structure, reference: ReferenceSet) -> str:
    """``"matches <id> (<space group>)"`` for the first reference entry of the same reduced formula (lowest data
    ``e_above_hull`` first, then id) that :class:`StructureMatcher` (default tolerances) matches with a cell shape
    strain within :data:`~equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN`; where an entry matches only with a larger
    strain, ``"new: <id> (<space group>) strained by <n> %"`` (a strained relative, e.g. a cubic cell of a tetragonal
    phase, which the matcher's length tolerance accepts); else ``"new"``."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from equicsp_core.cell_shape import beyond_same_phase, cell_shape_strain
    from equicsp_core.screening import space_group

    entries = sorted(reference.like(structure),
                     key=lambda entry: (entry.e_above_hull is None, entry.e_above_hull or 0.0, entry.id))
    matcher = StructureMatcher()
    strained = None
    for entry in entries:
        known = entry.structure
        if not matcher.fit(structure, known):
            continue
        strain = cell_shape_strain(structure, known)
        if not beyond_same_phase(strain):
            return f"matches {entry.id} ({space_group(known).symbol})"
        strained = strained or f"new: {entry.id} ({space_group(known).symbol}) strained by {100 * strain:.0f} %"
    return strained or "new"
