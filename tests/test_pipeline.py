"""``equicsp_core.pipeline``: relax, then merge, on real pymatgen structures relaxed by ASE's EMT.

Three distortions of fcc Cu: a tetragonal conventional cell (c/a 1.4, I4/mmm), a rattled and strained cubic
one (P1), and a sheared one-atom primitive cell (Z = 1 where the others have Z = 4). StructureMatcher tells them
apart as sampled; EMT relaxes all three to fcc, after which they are one structure.
"""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from equicsp_core.pipeline import ROW_COLUMNS, rank, screen, table_rows
from equicsp_core.relax import relax_structures
from equicsp_core.screening import group_duplicates, space_group
from equicsp_core.settings import RelaxSettings, ScreenSettings
from tests.test_relax import EMT_POTENTIAL, emt, fcc, rattled

FCC_SITES = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]


@pytest.fixture(scope="module")
def sampled() -> dict[str, Structure]:
    primitive = Lattice([[0, 1.9, 1.9], [1.9, 0, 1.9], [1.9, 1.9, 0]]).matrix @ np.array(
        [[1, 0.2, 0], [0, 1, 0], [0, 0, 1]])  # a sheared fcc primitive cell
    return {
        "Cu_000": Structure(Lattice.tetragonal(3.3, 3.3 * 1.4), ["Cu"] * 4, FCC_SITES),
        "Cu_001": rattled(fcc("Cu", 3.75), 0.15, seed=1),
        "Cu_002": Structure(Lattice(primitive), ["Cu"], [[0, 0, 0]]),
        "Cu_003": Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0]] * 4),  # four atoms on one site
    }


@pytest.fixture(scope="module")
def relaxed(sampled):
    """EMT relaxations of the plausible candidates: ``(results by label, relaxed structures by label)``."""
    decisions = screen(sampled, ScreenSettings())
    plausible = {label: sampled[label] for label, decision in decisions.items() if decision["kept"]}
    settings = RelaxSettings(potential=EMT_POTENTIAL, fmax=0.01)
    results = dict(relax_structures(plausible, settings, lambda *_: emt()))
    return ({label: result.as_dict() for label, result in results.items()},
            {label: result.structure for label, result in results.items()})


def test_screening_drops_only_the_implausible_cell(sampled):
    decisions = screen(sampled, ScreenSettings())
    assert [label for label, decision in decisions.items() if decision["kept"]] == ["Cu_000", "Cu_001", "Cu_002"]
    assert decisions["Cu_003"]["status"] == "implausible" and "apart" in decisions["Cu_003"]["reason"]


def test_three_distortions_are_distinct_before_relaxation_and_one_after(sampled, relaxed):
    before = [sampled[label] for label in ("Cu_000", "Cu_001", "Cu_002")]
    assert group_duplicates(before) == [[0], [1], [2]]
    assert {str(space_group(structure)) for structure in before} == {"I4/mmm (139)", "P1 (1)", "Immm (71)"}
    results, structures = relaxed
    assert all(results[label]["status"] == "converged" for label in structures)
    assert {str(space_group(structure)) for structure in structures.values()} == {"Fm-3m (225)"}
    assert group_duplicates(list(structures.values())) == [[0, 1, 2]]


def test_rank_merges_after_relaxation_keeping_the_lowest_energy(relaxed):
    """One representative, the lowest in energy per atom; members listed, others duplicates naming it."""
    results, structures = relaxed
    by_energy = sorted(structures, key=lambda label: results[label]["energy_per_atom"])
    ranked = rank(results, structures, top_k=3)
    best = by_energy[0]
    assert ranked.winners == [best]
    assert ranked.ranking[best] == {"ml_rank": 1, "status": "ml_relaxed", "reason": None, "members": by_energy}
    for label in by_energy[1:]:
        assert ranked.ranking[label] == {"ml_rank": None, "status": "duplicate", "members": None,
                                         "reason": f"relaxed into the structure of {best}"}


def test_the_table_shows_z_and_members(sampled, relaxed):
    results, structures = relaxed
    decisions = screen(sampled, ScreenSettings())
    ranked = rank(results, structures, top_k=1)
    invalid = [{"formula": "Cu", "sample": 4, "formula_units": 2, "cell_formula": "Cu2"}]
    rows = table_rows(sampled, invalid, decisions, ranked.ranking, results, structures)
    assert all(list(row) == list(ROW_COLUMNS) for row in rows)
    by_label = {row["label"]: row for row in rows}
    assert {label: row["formula_units"] for label, row in by_label.items()} == {
        "Cu_000": 4, "Cu_001": 4, "Cu_002": 1, "Cu_003": 4, None: 2}
    assert by_label["Cu_002"]["formula"] == "Cu" and by_label["Cu_000"]["formula"] == "Cu4"
    assert by_label[None]["formula"] == "Cu2" and by_label[None]["status"] == "invalid_sample"
    assert rows[0]["members"] == ranked.ranking[rows[0]["label"]]["members"] and len(rows[0]["members"]) == 3
    assert [row["members"] for row in rows[1:]] == [None] * 4


def test_rank_puts_the_most_sampled_structure_first_within_the_consensus_window():
    """fcc, bcc and sc Cu as three structures: bcc lowest and sampled once, fcc 20 meV/atom above it and reached
    three times, sc 40 meV/atom above it (outside the 25 meV window) and reached four times: fcc is ranked first,
    bcc second, sc last although it has the most members; the table follows ``ml_rank``."""
    from equicsp_core.pipeline import CONSENSUS_WINDOW

    assert CONSENSUS_WINDOW == 0.025
    bcc = Structure(Lattice.cubic(2.87), ["Cu"] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]])
    simple = Structure(Lattice.cubic(2.4), ["Cu"], [[0, 0, 0]])
    structures = {"Cu_000": bcc, **{f"Cu_00{i}": fcc("Cu", 3.6) for i in (1, 2, 3)},
                  **{f"Cu_00{i}": simple for i in (4, 5, 6, 7)}}
    energies = {"Cu_000": -4.000, "Cu_001": -3.980, "Cu_002": -3.979, "Cu_003": -3.978,
                "Cu_004": -3.960, "Cu_005": -3.959, "Cu_006": -3.958, "Cu_007": -3.957}
    results = {label: {"status": "converged", "energy_per_atom": energy, "error": None}
               for label, energy in energies.items()}
    ranked = rank(results, structures, top_k=2)
    assert ranked.winners == ["Cu_001", "Cu_000"]
    assert {label: entry["ml_rank"] for label, entry in ranked.ranking.items() if entry["ml_rank"]} == {
        "Cu_001": 1, "Cu_000": 2, "Cu_004": 3}
    assert ranked.ranking["Cu_001"]["members"] == ["Cu_001", "Cu_002", "Cu_003"]
    decisions = screen(structures, ScreenSettings())
    rows = table_rows(structures, [], decisions, ranked.ranking, results, structures)
    assert [row["label"] for row in rows if row["ml_rank"]] == ["Cu_001", "Cu_000", "Cu_004"]
