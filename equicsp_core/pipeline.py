"""The discovery pipeline after sampling, once, for every route: screen, rank, tabulate.

::

    sampled candidates ─ screen ─► plausible ─ ML relax ─► merge + rank ─► winners ─ (phonons) ─ symmetrise ─ DFT ─┐
                         │                                 │                                                       │
                         └───────────────────── table_rows: one row per sampled candidate ◄────────────────────────┘

The AiiDA work chain (``aiida_equicsp.workchains.predict_relax``) wraps these functions in calcfunctions, the
jobflow Makers (``equicsp_jobflow``) in jobs; both hand them pymatgen structures and plain dicts, so both
routes produce the same table from the same candidates. Relaxing and DFT are the routes' own (a CalcJob, a
job); :func:`equicsp_core.relax.relax_structures` and :func:`equicsp_core.screening.symmetrized` do the work.

Candidates are named by :func:`candidate_label` (``SrTiO3_000``: the requested formula's prefix and the sample
index) and compared and ranked within their reduced composition (``SrTiO3`` and ``Sr2Ti2O6``, cells of Z = 1
and 2, compete, ``SrTiO3`` and ``CaTiO3`` do not). Screening drops only implausible cells; every plausible
candidate is relaxed, and duplicates are merged after relaxation (two distortions of one parent may relax to
two minima, or to one). A candidate whose relaxation fails, at either level, stays in the table with its
status and does not stop the others.

Units: energies per atom in eV/atom, lengths in Å, volume changes as final/initial - 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from equicsp_core.screening import displacement, group_duplicates, implausibility, space_group
from equicsp_core.settings import RelaxSettings, ScreenSettings, StabilitySettings, formula_of, formula_units

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from equicsp_core.reference import ReferenceEntry, ReferenceSet
    from equicsp_core.stability import EnergiesFunction, RelaxFunction

#: Statuses of a candidate in the ranking table, in the order of the pipeline.
STATUSES = {
    "invalid_sample": "the sampler produced no valid crystal",
    "implausible": "dropped before relaxation (atoms too close, absurd volume)",
    "duplicate": "relaxed into the structure of a lower-energy candidate (StructureMatcher, after relaxation)",
    "ml_failed": "the ML relaxation failed",
    "ml_relaxed": "ML-relaxed (converged or stopped at the step cap: see ml_converged)",
    "dft_failed": "the DFT relaxation failed",
    "dft_relaxed": "DFT-relaxed (with relax_type none: a DFT single point at the ML geometry, said in dft_level)",
}

#: Columns of a ranking row, every row having all of them (``None`` where a level was not reached).
ROW_COLUMNS = ("label", "formula", "reduced_formula", "formula_units", "sample", "status", "reason", "members",
               "space_group_sampled",
               "ml_energy_per_atom", "ml_converged", "ml_rank", "space_group_ml", "ml_rms_displacement",
               "ml_volume_change", "ml_e_above_hull", "novelty", "ml_imaginary_modes", "ml_min_frequency_thz",
               "dft_energy_per_atom", "dft_level", "dft_e_above_hull", "space_group_dft", "dft_rms_displacement",
               "dft_volume_change", "notes")

#: Units of the table's quantities.
UNITS = {"energy_per_atom": "eV/atom", "e_above_hull": "eV/atom", "rms_displacement": "Å",
         "volume_change": "final/initial - 1"}

#: Why ML and DFT energies are never compared: said wherever both are shown (the example, the docs).
ENERGY_SCALES = ("ML and DFT energies per atom are on different scales: the potential's are fitted to Materials "
                 "Project energies (VASP, PAW), the DFT code's are total energies with its own pseudopotentials "
                 "(pw.x: hundreds of eV/atom). Compare energies only within one column, and DFT energies only at "
                 "one dft_level.")


# --- names ----------------------------------------------------------------------------------------------------


def label_prefixes(formulas: Sequence[str]) -> dict[str, str]:
    """A valid, distinct label prefix per formula: ``"SrTiO3"`` → ``"SrTiO3"``, ``"Sr(TiO3)"`` → ``"Sr_TiO3"``.

    Runs of characters other than letters and digits become one underscore (so no ``__``, AiiDA's namespace
    separator); a prefix that would start with a digit gets ``formula_`` before it; formulas that would share
    a prefix get ``_2``, ``_3``, ... after it.
    """
    prefixes: dict[str, str] = {}
    taken: set[str] = set()
    for formula in formulas:
        base = re.sub(r"[^A-Za-z0-9]+", "_", formula).strip("_")
        if not base or base[0].isdigit():
            base = f"formula_{base}".rstrip("_")
        prefix, copy = base, 1
        while prefix in taken:
            copy += 1
            prefix = f"{base}_{copy}"
        prefixes[formula] = prefix
        taken.add(prefix)
    return prefixes


def candidate_label(prefix: str, sample: int) -> str:
    """The label of a candidate: its formula's prefix and its sample index, ``SrTiO3_000``."""
    return f"{prefix}_{sample:03d}"


def cell_formula(structure: Structure) -> str:
    """The cell's contents as written in a request: ``Sr2Ti2O6``, not pymatgen's ``Sr2 Ti2 O6``."""
    return formula_of(structure.atomic_numbers)


# --- the stages -----------------------------------------------------------------------------------------------


def screen(structures: Mapping[str, Structure], settings: ScreenSettings) -> dict[str, dict[str, Any]]:
    """Which sampled candidates go on to relaxation: ``{label: {"kept", "status", "reason"}}``.

    Only implausible candidates (:func:`~equicsp_core.screening.implausibility` at ``settings``: atoms too
    close, absurd volume) are dropped; every plausible one is relaxed, and duplicates are merged after
    relaxation (:func:`rank`).
    """
    decisions: dict[str, dict[str, Any]] = {}
    for label, structure in structures.items():
        reason = implausibility(structure, settings.min_distance, settings.max_volume_per_atom)
        decisions[label] = {"kept": reason is None, "status": "implausible" if reason else None, "reason": reason}
    return decisions


@dataclass(frozen=True)
class Ranking:
    """The ML ranking: per relaxed candidate ``{"ml_rank", "status", "reason", "members"}``; the winners chosen for
    DFT."""

    ranking: dict[str, dict[str, Any]]
    winners: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "dft": self.winners}


#: Within this ML energy per atom (eV/atom) of a composition's lowest relaxed structure, structures are ranked by
#: how many candidates relaxed into them, not by energy: the size of a universal potential's errors on polymorph
#: energies (tens of meV/atom), below which its order says little, while a structure that the model samples and
#: the relaxations reach from several starts is more often the known one. Chosen on the mp_20 selection rows of
#: the discovery benchmark (BENCHMARKS.md, "Which candidate first: ranking rules").
CONSENSUS_WINDOW = 0.025


def rank(results: Mapping[str, Mapping[str, Any]], relaxed: Mapping[str, Structure], top_k: int) -> Ranking:
    """Merge the ML-relaxed duplicates, rank the rest within each reduced composition, and choose the winners.

    ``results`` are the relaxation's results by label (``status``, ``energy_per_atom``, ``error``: those of
    :class:`~equicsp_core.relax.RelaxResult`), ``relaxed`` the relaxed structures by label. Relaxations often
    end in the same structure from different starts, and cells of different Z in one crystal: the relaxed
    structures of each reduced composition are grouped
    (:func:`~equicsp_core.screening.group_duplicates`), each group keeps its lowest-energy member as its
    representative, whose ``members`` lists the group's labels (itself first, then by energy), and the others
    become ``duplicate`` naming it.

    The order (``ml_rank``): the groups whose representative lies within :data:`CONSENSUS_WINDOW` of the
    composition's lowest energy per atom come first, most members first (ties: lower energy); the others follow
    by energy per atom. The winners are the best ``top_k`` representatives of each composition, in composition
    order.
    """
    ranking: dict[str, dict[str, Any]] = {}
    by_composition: dict[str, list[str]] = {}
    for label, result in results.items():
        if result["status"] == "failed" or label not in relaxed:
            ranking[label] = {"ml_rank": None, "status": "ml_failed", "reason": result.get("error"), "members": None}
        else:
            by_composition.setdefault(relaxed[label].composition.reduced_formula, []).append(label)
    winners: list[str] = []
    for labels in by_composition.values():
        energy = {label: results[label]["energy_per_atom"] for label in labels}
        labels.sort(key=lambda label: (energy[label], label))
        groups = [[labels[index] for index in group]
                  for group in group_duplicates([relaxed[label] for label in labels])]
        lowest = energy[labels[0]]
        groups.sort(key=lambda group: (0, -len(group), energy[group[0]]) if energy[group[0]] <= lowest + CONSENSUS_WINDOW
                    else (1, 0, energy[group[0]]))
        for position, (representative, *others) in enumerate(groups, start=1):
            ranking[representative] = {"ml_rank": position, "status": "ml_relaxed", "reason": None,
                                       "members": [representative, *others]}
            for label in others:
                ranking[label] = {"ml_rank": None, "status": "duplicate", "members": None,
                                  "reason": f"relaxed into the structure of {representative}"}
            if position <= top_k:
                winners.append(representative)
    return Ranking(ranking, winners)


def ml_level(settings: RelaxSettings) -> str:
    """The ML level of a relaxation's energies, as the table states it: ``ML (chgnet, fmax 0.05 eV/Å, 500 steps)``.

    It also keys the cached reference energies (:class:`equicsp_core.stability.EnergyCache`): a hull mixes
    only energies of one level.
    """
    cell = "" if settings.relax_cell else ", fixed cell"
    return f"ML ({settings.potential}, fmax {settings.fmax:g} eV/Å, {settings.steps} steps{cell})"


#: The level of the ``dft_e_above_hull`` column (:func:`dft_stability`), where a DFT hull was computed.
DFT_HULL_LEVEL = ("DFT at the row's dft_level: the candidate and the reference entries of its system (those of its "
                  "ML hull) computed with the same DFT settings; references relaxed from their stored (DFT-relaxed) "
                  "cells, or single points at their ML-relaxed geometry")


def levels(settings: RelaxSettings | None, dft_hull: bool = False) -> dict[str, str]:
    """The level of each ML energy column of the table (:func:`ml_level`; none when the potential is not known: a
    relax Maker other than the engine's) and, with ``dft_hull``, of ``dft_e_above_hull`` (:data:`DFT_HULL_LEVEL`)."""
    named = {"dft_e_above_hull": DFT_HULL_LEVEL} if dft_hull else {}
    if settings is None:
        return named
    level = ml_level(settings)
    return {"ml_energy_per_atom": level,
            "ml_e_above_hull": f"{level}: the candidate and the reference entries of its system relaxed alike", **named}


def _hull_candidates(ml_results: Mapping[str, Mapping[str, Any]],
                     ml_relaxed: Mapping[str, Structure]) -> dict[str, tuple[Structure, float]]:
    """The relaxed candidates with an ML energy: ``label -> (structure, eV/atom)``."""
    return {label: (structure, ml_results[label]["energy_per_atom"]) for label, structure in ml_relaxed.items()
            if ml_results.get(label, {}).get("energy_per_atom") is not None}


def stability_references(
    ml_results: Mapping[str, Mapping[str, Any]],
    ml_relaxed: Mapping[str, Structure],
    settings: StabilitySettings,
    reference: ReferenceSet | None = None,
) -> list[ReferenceEntry]:
    """The reference entries :func:`stability` needs for these candidates (those of each chemical system's hull,
    :func:`equicsp_core.stability.hull_references`), sorted by id; ``[]`` when ``settings.stability`` is off, no
    candidate has an ML energy, or there is no reference set (:func:`stability` then says why in each row).

    A route that relaxes the references itself (the AiiDA work chain: a CalcJob on the compute host) relaxes
    these, at :func:`ml_level` of the candidates' settings, and hands :func:`stability` their energies.
    """
    from equicsp_core.reference import ReferenceSetError, load_reference
    from equicsp_core.stability import hull_references

    candidates = _hull_candidates(ml_results, ml_relaxed)
    if not settings.stability or not candidates:
        return []
    try:
        reference = reference if reference is not None else load_reference()
    except ReferenceSetError:
        return []
    return hull_references({label: structure.composition for label, (structure, _) in candidates.items()}, reference,
                           settings.reference_cutoff, settings.references_per_composition)


def relaxed_energies(relax_settings: RelaxSettings, reference: ReferenceSet, relax: RelaxFunction | None = None,
                     cache_path: str | None = None) -> EnergiesFunction:
    """The :data:`~equicsp_core.stability.EnergiesFunction` of the engine: reference entries relaxed here at
    :func:`ml_level` of ``relax_settings`` by ``relax`` (default :func:`equicsp_core.relax.relax_structures`) where
    the cache in ``cache_path`` (default: the cache folder's :data:`~equicsp_core.stability.ENERGY_CACHE_FILE`)
    does not hold them yet (:func:`equicsp_core.stability.reference_energies`)."""
    from equicsp_core.stability import EnergyCache, default_cache_path, reference_energies

    if relax is None:
        from equicsp_core.relax import relax_structures

        def relax_references(structures: Mapping[str, Structure]) -> Any:
            return relax_structures(structures, relax_settings)

        relax = relax_references
    cache = EnergyCache(cache_path or default_cache_path(), ml_level(relax_settings), reference.sha256)
    return lambda entries: reference_energies(entries, relax, cache)


def stability(
    ml_results: Mapping[str, Mapping[str, Any]],
    ml_relaxed: Mapping[str, Structure],
    ranking: Mapping[str, Mapping[str, Any]],
    relax_settings: RelaxSettings,
    settings: StabilitySettings,
    relax: RelaxFunction | None = None,
    reference: ReferenceSet | None = None,
    cache_path: str | None = None,
    reference_energies: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """ML energy above the hull and novelty per relaxed candidate: ``{label: {"ml_e_above_hull", "novelty",
    "reason"}}`` (:mod:`equicsp_core.stability`); ``{}`` when ``settings.stability`` is off.

    Every ML-relaxed candidate gets its energy above the hull (eV/atom, at :func:`ml_level` of
    ``relax_settings``); each representative (status ``ml_relaxed`` in ``ranking``, duplicates merged) is
    matched with the reference set. ``reason`` says why a value is missing (no reference set, an element with
    no elemental reference); the run goes on either way.

    The reference entries' energies come either from ``reference_energies`` (``{id: {"energy_per_atom",
    "status", "error"}}``, relaxed elsewhere at the same level: the AiiDA route's CalcJob; an entry without an
    energy is left out of the hull, as a failed relaxation) or, when it is ``None``, from relaxing the entries of
    :func:`stability_references` here, by ``relax`` and caching them in ``cache_path``
    (:func:`relaxed_energies`). ``reference``: the set to use instead of
    :func:`equicsp_core.reference.load_reference`'s (the cache folder's, built from the pinned data).
    """
    from equicsp_core.reference import ReferenceSetError, load_reference
    from equicsp_core.stability import hull, known_energies, novelty

    if not settings.stability:
        return {}
    candidates = _hull_candidates(ml_results, ml_relaxed)
    if not candidates:
        return {}
    try:
        reference = reference if reference is not None else load_reference()
    except ReferenceSetError as error:
        return {label: {"ml_e_above_hull": None, "novelty": None, "reason": f"no ML E_hull or novelty: {error}"}
                for label in candidates}
    cutoff, per_composition = settings.reference_cutoff, settings.references_per_composition
    compositions = {label: (structure.composition, energy) for label, (structure, energy) in candidates.items()}
    energies = (known_energies(reference_energies) if reference_energies is not None
                else relaxed_energies(relax_settings, reference, relax, cache_path))
    hulls = hull(compositions, reference, energies, cutoff, per_composition)
    return {label: {"ml_e_above_hull": hulls[label].e_above_hull, "reason": hulls[label].reason,
                    "novelty": novelty(structure, reference)
                    if ranking.get(label, {}).get("status") == "ml_relaxed" else None}
            for label, (structure, _) in candidates.items()}


@dataclass(frozen=True)
class DFTOutcome:
    """What the DFT relaxation of a winner gave: its structure and energy per atom, or why it failed.

    ``level`` says what the energy is (:func:`equicsp_core.dft.dft_level`: functional, code, protocol, spin,
    quick look); ``notes`` what a user should read about the run (handled events of the DFT code, final
    magnetisation, the symmetry it was held to), for the failed runs too.
    """

    structure: Structure | None = None
    energy_per_atom: float | None = None
    failure: str | None = None
    level: str | None = None
    notes: tuple[str, ...] = ()


def dft_stability_references(structures: Mapping[str, Structure], settings: StabilitySettings,
                             reference: ReferenceSet) -> list[ReferenceEntry]:
    """The reference entries a DFT hull of these candidates (their structures by label) needs, sorted by id: those
    of their ML hulls (:func:`equicsp_core.stability.hull_references` with ``settings``' choice), so the two
    hulls of a candidate are built from the same phases."""
    from equicsp_core.stability import hull_references

    return hull_references({label: structure.composition for label, structure in structures.items()}, reference,
                           settings.reference_cutoff, settings.references_per_composition)


def dft_stability(dft: Mapping[str, DFTOutcome], reference_energies: Mapping[str, Mapping[str, Any]],
                  settings: StabilitySettings, reference: ReferenceSet) -> dict[str, dict[str, Any]]:
    """The DFT energy above the hull of each DFT candidate with an energy: ``{label: {"dft_e_above_hull",
    "reason"}}`` (eV/atom; negative: below every known phase; ``reason`` where there is no value).

    ``reference_energies`` are the :func:`dft_stability_references`' DFT energies, ``{id: {"energy_per_atom",
    "status", "error"}}``, computed with the candidates' DFT settings (:data:`DFT_HULL_LEVEL`); an entry without an
    energy is left out of the hull, and a system left without an elemental reference gets a reason instead of a
    number (:func:`equicsp_core.stability.hull`).
    """
    from equicsp_core.stability import hull, known_energies

    candidates = {label: (outcome.structure.composition, outcome.energy_per_atom) for label, outcome in dft.items()
                  if outcome.structure is not None and outcome.energy_per_atom is not None}
    hulls = hull(candidates, reference, known_energies(reference_energies), settings.reference_cutoff,
                 settings.references_per_composition, level="DFT")
    return {label: {"dft_e_above_hull": result.e_above_hull, "reason": result.reason}
            for label, result in hulls.items()}


def table_rows(
    sampled: Mapping[str, Structure],
    invalid: Sequence[Mapping[str, Any]],
    screening: Mapping[str, Mapping[str, Any]],
    ranking: Mapping[str, Mapping[str, Any]],
    ml_results: Mapping[str, Mapping[str, Any]],
    ml_relaxed: Mapping[str, Structure],
    phonons: Mapping[str, Mapping[str, Any]] | None = None,
    dft: Mapping[str, DFTOutcome] | None = None,
    stability: Mapping[str, Mapping[str, Any]] | None = None,
    dft_hulls: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The ranking table: one row per sampled candidate, best first, every row with the :data:`ROW_COLUMNS`.

    Args:
        sampled: every valid sampled candidate by label.
        invalid: each sample that was not a crystal: ``{"formula", "sample", "formula_units", "cell_formula"}``
            (its requested formula, index, Z and cell: an entry of the sampler's index).
        screening: :func:`screen`'s decisions.
        ranking: :attr:`Ranking.ranking` (empty when nothing was relaxed).
        ml_results: the ML relaxation's results by label (``status``, ``energy_per_atom``, ``error``).
        ml_relaxed: the ML-relaxed structures by label.
        phonons: the phonon check's results by label (``{"phonons": {"imaginary_modes", "min_frequency_thz"}}``).
        dft: the DFT outcome of each winner sent to DFT.
        stability: :func:`stability`'s results (``ml_e_above_hull``, ``novelty`` and, where a value is missing,
            its ``reason``, which becomes the row's reason unless the row has one).
        dft_hulls: :func:`dft_stability`'s results (``dft_e_above_hull`` and, where it is missing, its ``reason``,
            which becomes the row's reason unless the row has one).

    ``dft_level`` is what ``dft_energy_per_atom`` is (set with it), ``notes`` the DFT run's notes joined by
    ``"; "`` (``None`` without any): energies of different levels never share a column, ML and DFT energies
    are on different scales (:data:`ENERGY_SCALES`).

    Rows are ordered by reduced composition, then DFT-relaxed rows by DFT energy, then ML-ranked rows by ``ml_rank``
    (:func:`rank`), then the others, each by label.
    """
    from pymatgen.core import Composition

    phonons, dft, stability, dft_hulls = phonons or {}, dft or {}, stability or {}, dft_hulls or {}
    rows = []
    for label in sorted(screening):
        initial = sampled[label]
        decision = screening[label]
        row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
        row.update(label=label, formula=cell_formula(initial), reduced_formula=initial.composition.reduced_formula,
                   formula_units=formula_units(initial.atomic_numbers), sample=int(label.rsplit("_", 1)[1]),
                   space_group_sampled=str(space_group(initial)), status=decision["status"],
                   reason=decision["reason"])
        if decision["kept"]:
            row.update(_ml_columns(initial, ml_relaxed.get(label), ranking.get(label),
                                   ml_results.get(label, {"status": "failed", "error": "not relaxed"})))
            checked = phonons.get(label, {}).get("phonons") or {}
            if "imaginary_modes" in checked:
                row.update(ml_imaginary_modes=checked["imaginary_modes"],
                           ml_min_frequency_thz=checked["min_frequency_thz"])
            if label in dft:
                row.update(_dft_columns(ml_relaxed[label], dft[label]))
            if label in stability:
                assessed = stability[label]
                row.update(ml_e_above_hull=assessed["ml_e_above_hull"], novelty=assessed["novelty"])
                if row["reason"] is None:
                    row["reason"] = assessed["reason"]
            if label in dft_hulls:
                row["dft_e_above_hull"] = dft_hulls[label]["dft_e_above_hull"]
                if row["reason"] is None:
                    row["reason"] = dft_hulls[label]["reason"]
        rows.append(row)
    for entry in invalid:
        rows.append({**dict.fromkeys(ROW_COLUMNS), "formula": entry["cell_formula"], "sample": entry["sample"],
                     "reduced_formula": Composition(entry["formula"]).reduced_formula,
                     "formula_units": entry["formula_units"], "status": "invalid_sample",
                     "reason": STATUSES["invalid_sample"]})

    def order(row: dict[str, Any]) -> tuple:
        level = 0 if row["dft_energy_per_atom"] is not None else 1 if row["ml_rank"] is not None else 2
        position = row["dft_energy_per_atom"] if level == 0 else row["ml_rank"] if level == 1 else 0
        return (row["reduced_formula"], level, position, row["label"] or "", row["sample"])

    return sorted(rows, key=order)


def _ml_columns(initial: Structure, relaxed: Structure | None, ranked: Mapping[str, Any] | None,
                result: Mapping[str, Any]) -> dict[str, Any]:
    """A relaxed candidate's status, rank and ML columns."""
    ranked = ranked or {"ml_rank": None, "status": "ml_failed", "reason": result.get("error"), "members": None}
    columns = {key: ranked[key] for key in ("status", "reason", "ml_rank", "members")}
    if relaxed is not None:
        moved = displacement(initial, relaxed)
        columns.update(ml_energy_per_atom=result["energy_per_atom"], ml_converged=result["status"] == "converged",
                       space_group_ml=str(space_group(relaxed)), ml_rms_displacement=moved["rms_displacement"],
                       ml_volume_change=moved["volume_change"])
    return columns


def _dft_columns(ml_relaxed: Structure, outcome: DFTOutcome) -> dict[str, Any]:
    """A winner's DFT status and columns."""
    notes = "; ".join(outcome.notes) or None
    if outcome.structure is None:
        return {"status": "dft_failed", "reason": outcome.failure, "notes": notes}
    moved = displacement(ml_relaxed, outcome.structure)
    return {"status": "dft_relaxed", "reason": None, "dft_energy_per_atom": outcome.energy_per_atom,
            "dft_level": outcome.level, "space_group_dft": str(space_group(outcome.structure)),
            "dft_rms_displacement": moved["rms_displacement"], "dft_volume_change": moved["volume_change"],
            "notes": notes}
