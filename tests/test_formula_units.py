"""Formula units: a reduced formula is sampled at every cell size Z the model supports, an explicit cell as
written (``equicsp_core.domain.sampling_cells``), the candidates shared among the Zs by the training prior
(``equicsp_core.predict.sampling_jobs``)."""

from collections import Counter

import pytest

from equicsp_core.domain import MAX_TABLE_ATOMS, max_cell_atoms, sampling_cells
from equicsp_core.formula_unit_prior import shipped_table
from equicsp_core.predict import sampling_jobs
from equicsp_core.settings import FormulaError, SampleSettings, SettingsError, formula_of, formula_units

ZN, O, SR, TI = 30, 8, 38, 22


def cells(formulas, dataset="mp_20", mode="equicsp", **settings):
    return sampling_cells(SampleSettings(formulas=formulas, **settings), mode, dataset)


def test_formula_units_is_the_gcd_of_the_counts():
    assert formula_units([ZN, O]) == 1
    assert formula_units([ZN, ZN, O, O]) == 2
    assert formula_units([SR, SR, TI, TI] + [O] * 6) == 2
    assert formula_units([SR, SR, TI] + [O] * 6) == 1  # Sr2TiO6: reduced as written
    assert formula_of([SR, SR, TI, TI] + [O] * 6) == "Sr2Ti2O6"
    assert formula_of([14]) == "Si"


def test_a_reduced_formula_gets_every_z_of_the_training_domain():
    """ZnO for mp_20 (cells of up to 20 atoms): Z = 1..10, each cell's atoms grouped by element."""
    found = cells(["ZnO"])["ZnO"]
    assert [len(cell) for cell in found] == [2 * z for z in range(1, 11)]
    assert found[1] == (ZN, ZN, O, O)
    assert [formula_units(cell) for cell in found] == list(range(1, 11))
    assert [len(cell) for cell in cells(["SrTiO3"])["SrTiO3"]] == [5, 10, 15, 20]


def test_an_explicit_cell_is_only_that_cell():
    assert cells(["Zn2O2"]) == {"Zn2O2": [(ZN, ZN, O, O)]}
    assert cells(["Zn2O2"], max_formula_units=1) == {"Zn2O2": [(ZN, ZN, O, O)]}


def test_max_formula_units_caps_the_search():
    assert [len(cell) for cell in cells(["ZnO"], max_formula_units=3)["ZnO"]] == [2, 4, 6]
    assert cells(["ZnO"], max_formula_units=1) == {"ZnO": [(ZN, O)]}
    # a cap beyond the domain changes nothing
    assert len(cells(["SrTiO3"], max_formula_units=50)["SrTiO3"]) == 4


def test_a_small_domain_keeps_only_the_cells_that_fit():
    """perov_5 holds 5-atom cells: SrTiO3 at Z = 1 only."""
    assert cells(["SrTiO3"], dataset="perov_5") == {"SrTiO3": [(SR, TI, O, O, O)]}


def test_candidates_are_shared_among_z_by_the_training_prior():
    """mp_20, k = 20, SrTiO3 (5 atoms per formula unit) over Z = 1..4: in proportion to the shipped counts + 1/2,
    each Z's share at most one from its quota; the explicit cell Zn2O2 gets all 20; indices count per formula."""
    found = cells(["SrTiO3", "Zn2O2"], max_formula_units=4)
    jobs = sampling_jobs(found, 20, "mp_20")
    by_formula = Counter((formula, formula_units(cell)) for formula, _, cell in jobs)
    weights = [shipped_table()["mp_20"][5].get(z, 0) + 0.5 for z in range(1, 5)]
    shares = [by_formula[("SrTiO3", z)] for z in range(1, 5)]
    assert sum(shares) == 20 and by_formula[("Zn2O2", 2)] == 20 and {f for f, _ in by_formula} == {"SrTiO3", "Zn2O2"}
    assert all(abs(share - 20 * weight / sum(weights)) < 1 for share, weight in zip(shares, weights))
    assert shares[0] > 5  # not the even spread: Z = 1 is the commonest 5-atom cell of mp_20
    assert [index for formula, index, _ in jobs if formula == "SrTiO3"] == list(range(20))


def test_a_model_without_a_prior_spreads_round_robin():
    """No table for the dataset: k = 20 over Z = 1..4 gives 5 per Z, sample i at Z = i mod 4 + 1; k = 3: Z = 1, 2, 3."""
    found = cells(["SrTiO3"], max_formula_units=4)
    for dataset in (None, "my_own_data"):
        assert [formula_units(cell) for _, _, cell in sampling_jobs(found, 20, dataset)] == [1, 2, 3, 4] * 5
        assert [formula_units(cell) for _, _, cell in sampling_jobs(found, 3, dataset)] == [1, 2, 3]


def test_a_composition_with_no_supported_z_is_refused_in_one_line():
    """25 atoms in the smallest cell, for mp_20 (20 at most): refused naming the formula and the limit."""
    with pytest.raises(FormulaError) as error:
        cells(["Li2Na3K5Rb7Cs8"])
    message = str(error.value)
    assert "'Li2Na3K5Rb7Cs8'" in message and "25 atoms, more than the 20 of mp_20" in message
    assert "allow_outside_domain" in message and "\n" not in message


def test_insisting_samples_the_written_cell_beyond_the_domain():
    """allow_outside_domain: the 25-atom composition at Z = 1 (as written), the Z search never beyond 20."""
    found = cells(["Li2Na3K5Rb7Cs8"], allow_outside_domain=True)["Li2Na3K5Rb7Cs8"]
    assert [len(cell) for cell in found] == [25]
    assert [len(cell) for cell in cells(["ZnO"], allow_outside_domain=True)["ZnO"]] == [2 * z for z in range(1, 11)]


def test_elements_outside_the_domain_are_refused_unless_allowed():
    with pytest.raises(FormulaError, match="element\\(s\\) Fm absent from mp_20"):
        cells(["FmO"])
    assert len(cells(["FmO"], allow_outside_domain=True)["FmO"]) == 10


def test_a_model_without_a_known_domain_searches_up_to_its_mode_limit():
    """No training domain: the EquiCSP mode's hard limit (52 atoms); a mode without one: the same 52."""
    assert max_cell_atoms("equicsp", None) == max_cell_atoms("diffcsp", "unknown") == MAX_TABLE_ATOMS == 52
    assert max_cell_atoms("equicsp", "mp_20") == 20 and max_cell_atoms("diffcsp", "carbon_24") == 24
    assert [len(cell) for cell in cells(["ZnO"], dataset=None)["ZnO"]] == [2 * z for z in range(1, 27)]
    with pytest.raises(FormulaError, match="'C53H' has 54 atoms in its smallest cell; the model supports cells of "
                                           "at most 52 atoms"):
        cells(["C53H"], dataset=None, mode="diffcsp")
    with pytest.raises(FormulaError, match="'C53H' has 54 atoms; the model supports at most 52"):
        cells(["C53H"], dataset=None)


def test_max_formula_units_must_be_positive():
    with pytest.raises(SettingsError, match="max_formula_units: Input should be greater than or equal to 1"):
        SampleSettings(formulas=["ZnO"], max_formula_units=0)
