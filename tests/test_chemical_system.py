"""The compositions of a chemical system (``equicsp_core.chemical_system``) and the rows reported stable."""

from __future__ import annotations

import math

import pytest
from pymatgen.core import Composition

from equicsp_core.chemical_system import (
    ChemicalSystemError,
    charge_balanced_compositions,
    common_oxidation_states,
    compositions_to_explore,
    near_stable,
    parse_chemical_system,
)
from equicsp_core.pipeline import ROW_COLUMNS
from equicsp_core.settings import ExploreSettings, SettingsError, StabilitySettings
from tests.test_stability import ENERGIES, hand_made_reference


def test_sr_ti_o_gives_the_hand_counted_compositions():
    """Sr +2, Ti +4, O -2: SrTiO3, the Ruddlesden-Popper Sr2TiO4 and Sr3Ti2O7, and the others of at most 12 atoms
    (2a + 3b atoms for Sr_a Ti_b O_(a+2b), gcd 1), fewest atoms first, then by formula."""
    assert charge_balanced_compositions("Sr-Ti-O", 12) == [
        "SrTiO3", "Sr2TiO4", "SrTi2O5", "Sr3TiO5", "Sr4TiO6", "SrTi3O7", "Sr3Ti2O7"]
    assert charge_balanced_compositions("Sr-Ti-O", 5) == ["SrTiO3"]


def test_li_fe_p_o_within_20_atoms():
    """Every composition holds all four elements, at most 20 atoms in its reduced formula unit, and balances with
    one common state per element (checked with pymatgen's own search); the known phosphates are there, the
    order does not depend on how the system is written."""
    found = charge_balanced_compositions("Li-Fe-P-O", 20)
    assert found[0] == "LiFePO4"
    assert {"LiFeP2O7", "Li2FeP2O7", "Li3Fe2P3O12"} <= set(found)  # Fe3+ pyrophosphate, Fe2+ one, NASICON
    assert len(found) == len(set(found))
    states = common_oxidation_states()
    for formula in found:
        composition = Composition(formula)
        assert {str(element) for element in composition} == {"Li", "Fe", "P", "O"}
        counts = [int(amount) for amount in composition.values()]
        assert sum(counts) <= 20 and math.gcd(*counts) == 1
        assert composition.oxi_state_guesses(oxi_states_override={e: states[e] for e in ("Li", "Fe", "P", "O")})
    sizes = [Composition(formula).num_atoms for formula in found]
    assert sizes == sorted(sizes)
    assert charge_balanced_compositions("O-P-Fe-Li", 20) == found


def test_common_oxidation_states_leave_out_rare_ones():
    """The common states (>= 10 % of an element's ICSD reports) keep Fe2+/Fe3+ and drop O-1 and P-3."""
    states = common_oxidation_states()
    assert states["Fe"] == (2, 3) and states["O"] == (-2,) and states["P"] == (5,) and states["Li"] == (1,)
    assert not states.get("Ne")


@pytest.mark.parametrize(("system", "message"), [
    ("Li-Xx-O", "unknown element Xx"),
    ("Li--O", "is not element symbols joined by '-'"),
    ("li-fe", "is not element symbols joined by '-'"),
    ("LiFePO4", "is not element symbols joined by '-'"),
    ("", "is not element symbols joined by '-'"),
    (["Li", "O"], "is not element symbols joined by '-'"),
    ("Li-Li-O", "names Li twice"),
    ("Og-O", "unsupported element Og"),
    ("Ne-O", "Ne has no common oxidation state"),
    ("Fe", "no charge-balanced composition"),
    ("Ca-Sr-Ti-O", "no charge-balanced composition (SMACT, common oxidation states) with every element and at "
                   "most 5 atoms"),
    ("Li-Fe-P-O-F-Cl", "has 6 elements: no formula unit of at most 5 atoms"),
])
def test_bad_systems_are_refused_in_one_line(system, message):
    with pytest.raises(ChemicalSystemError) as error:
        charge_balanced_compositions(system, 5)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_limits_are_the_users_and_the_models():
    """The smaller of max_atoms and the model's largest cell: perov_5 5 atoms, mp_20 20 atoms."""
    assert compositions_to_explore(ExploreSettings(chemical_system="Sr-Ti-O"), "equicsp", "perov_5") == ["SrTiO3"]
    mp_20 = compositions_to_explore(ExploreSettings(chemical_system="Sr-Ti-O"), "equicsp", "mp_20")
    assert mp_20 == charge_balanced_compositions("Sr-Ti-O", 20)
    assert compositions_to_explore(ExploreSettings(chemical_system="Sr-Ti-O", max_atoms=30), "equicsp",
                                   "mp_20") == mp_20
    assert compositions_to_explore(ExploreSettings(chemical_system="Sr-Ti-O", max_atoms=7), "equicsp",
                                   "mp_20") == ["SrTiO3", "Sr2TiO4"]


def test_explore_settings():
    settings = ExploreSettings(chemical_system=" Li-Fe-P-O ")
    assert settings.chemical_system == "Li-Fe-P-O" and settings.max_atoms is None and settings.ehull_max == 0.1
    assert parse_chemical_system("Li-Fe-P-O") == ("Li", "Fe", "P", "O")
    with pytest.raises(ChemicalSystemError, match="unknown element Xx"):
        ExploreSettings(chemical_system="Li-Xx-O")
    for values, knob in [({"max_atoms": 0}, "max_atoms"), ({"ehull_max": -0.1}, "ehull_max"),
                         ({"ehull_max": float("inf")}, "ehull_max")]:
        with pytest.raises(SettingsError, match=knob):
            ExploreSettings(chemical_system="Li-O", **values)


def _row(label: str, formula: str, ml_rank: int | None, energy: float | None, e_hull: float | None) -> dict:
    return {**dict.fromkeys(ROW_COLUMNS), "label": label, "formula": formula,
            "reduced_formula": Composition(formula).reduced_formula, "ml_rank": ml_rank, "ml_energy_per_atom": energy,
            "ml_e_above_hull": e_hull}


def _hand_made_energies(entries):
    return {entry.id: ENERGIES[entry.id] for entry in entries}


def test_near_stable_rows_compete_on_the_system_hull():
    """References Cu -1, Au -2, CuAu -2 eV/atom (tests/test_stability.py). A CuAu candidate at -2.1 moves the hull
    at x(Au) = 1/4 from -1.5 down to -1.55, so Cu3Au at -1.52, below the references' hull (-0.02), is 0.03 above
    the system's; the CuAu polymorph at -1.95 (0.05 above the references' CuAu) is 0.15 above the new CuAu."""
    rows = [_row("CuAu_001", "Cu2Au2", 2, -1.95, 0.05), _row("CuAu_000", "CuAu", 1, -2.1, -0.1),
            _row("CuAu_002", "CuAu", None, -2.1, -0.1),  # a duplicate
            _row("Cu3Au_000", "Cu3Au", 1, -1.52, -0.02), _row("Cu3Au_001", "Cu3Au", 2, -1.3, 0.2),
            _row("Au_000", "Au", 1, None, None)]  # no E_hull
    chosen = near_stable(rows, 0.1, "Cu-Au", hand_made_reference(), _hand_made_energies, StabilitySettings(
        reference_cutoff=0.0, references_per_composition=1))
    assert [row["label"] for row in chosen] == ["CuAu_000", "Cu3Au_000"]
    assert [row["ml_e_above_system_hull"] for row in chosen] == [pytest.approx(0.0), pytest.approx(0.03)]
    assert [row["ml_e_above_hull"] for row in chosen] == [-0.1, -0.02]  # the tables' own values are kept
    wide = near_stable(rows, 0.2, None, hand_made_reference(), _hand_made_energies, StabilitySettings(
        reference_cutoff=0.0, references_per_composition=1))
    assert [(row["label"], round(row["ml_e_above_system_hull"], 6)) for row in wide] == [
        ("CuAu_000", 0.0), ("Cu3Au_000", 0.03), ("CuAu_001", 0.15)]
    assert near_stable(rows, 0.1, "Zn-Cu", hand_made_reference(), _hand_made_energies, StabilitySettings()) == []
