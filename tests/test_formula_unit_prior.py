"""The prior over the cell size Z of a reduced formula and the allocation of its candidates over Z
(``equicsp_core.formula_unit_prior``), and the shipped table against a rebuild from the data."""

import json
from collections import Counter
from pathlib import Path

import pytest

from equicsp_core.domain import sampling_cells
from equicsp_core.formula_unit_prior import (
    PSEUDO_COUNT,
    TABLE_FILE,
    allocate,
    allocation_order,
    build_table,
    cell_of_formula_sum,
    count_formula_units,
    formula_unit_order,
    parse_table,
    shipped_table,
)
from equicsp_core.predict import sampling_jobs
from equicsp_core.settings import SampleSettings, formula_units
from equicsp_core.splits import split_rows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: mp_20's 4-atom formula units over Z = 1..5, as shipped (+ 1/2 each).
MP20_FOUR_ATOMS = [shipped_table()["mp_20"][4].get(z, 0) + PSEUDO_COUNT for z in range(1, 6)]


@pytest.mark.parametrize("weights", [[1.0], [3.0, 1.0], [2190.5, 736.5, 22.5, 320.5, 2.5], [0.5] * 7, [5.0, 0.5, 9.5]])
def test_allocation_sums_to_k_and_each_share_is_within_one_of_its_quota(weights):
    for k in range(0, 41):
        counts = allocate(k, weights)
        assert sum(counts) == k and min(counts) >= 0
        assert all(abs(count - k * weight / sum(weights)) < 1 for count, weight in zip(counts, weights))


def test_largest_remainder_and_ties_to_the_smaller_z():
    """8 over mp_20's 4-atom prior: quotas 5.35, 1.80, 0.06, 0.78, 0.01: floors 5, 1, 0, 0, 0 and the two left
    to the largest remainders (Z = 2, Z = 4); equal weights: the remainder to the first."""
    assert allocate(8, MP20_FOUR_ATOMS) == [5, 2, 0, 1, 0]
    assert allocate(1, [1.0, 1.0]) == [1, 0]
    assert allocate(5, [1.0, 1.0, 1.0]) == [2, 2, 1]
    assert allocate(4, [1.0, 2.0, 1.0]) == [1, 2, 1]


def test_the_allocation_is_deterministic():
    first = formula_unit_order("mp_20", 4, [1, 2, 3, 4, 5], 20)
    assert all(formula_unit_order("mp_20", 4, [1, 2, 3, 4, 5], 20) == first for _ in range(3))
    assert Counter(first) == {j: n for j, n in enumerate(allocate(20, MP20_FOUR_ATOMS)) if n}


def test_bad_allocation_input_is_refused_in_one_line():
    for k, weights in ((3, [1.0, 0.0]), (-1, [1.0]), (3, [])):
        with pytest.raises(ValueError, match="allocate: need num_samples >= 0 and positive weights"):
            allocate(k, weights)


def test_every_prefix_of_the_order_is_spread_near_the_allocation():
    """After m of k samples, each cell holds within one of m n_j / k."""
    counts = allocate(20, MP20_FOUR_ATOMS)
    order = allocation_order(counts)
    assert Counter(order) == {j: n for j, n in enumerate(counts) if n}
    for m in range(1, 21):
        taken = Counter(order[:m])
        assert all(abs(taken[j] - m * n / 20) < 1 for j, n in enumerate(counts))
    assert order[:3] == [0, 1, 0]


def test_without_a_table_the_spread_is_even_round_robin():
    """A dataset without a table, and a formula size the table never saw: sample i at cell i mod m."""
    for k in range(0, 30):
        assert formula_unit_order(None, 4, [1, 2, 3, 4], k) == [i % 4 for i in range(k)]
        assert formula_unit_order("my_own_data", 2, [1, 2, 3], k) == [i % 3 for i in range(k)]
    assert 999 not in shipped_table()["mp_20"]
    assert formula_unit_order("mp_20", 999, [1, 2, 3], 6) == [0, 1, 2, 0, 1, 2]


def test_the_prior_respects_max_formula_units_and_the_explicit_cell():
    """ZnO (2 atoms per formula unit) for mp_20 capped at Z = 2: only Z = 1, 2, shared by their two counts;
    Zn2O2 is that cell only, all k samples."""
    cells = sampling_cells(SampleSettings(formulas=["ZnO", "Zn2O2"], max_formula_units=2), "equicsp", "mp_20")
    jobs = sampling_jobs(cells, 10, "mp_20")
    by_z = Counter((formula, formula_units(cell)) for formula, _, cell in jobs)
    two_atoms = shipped_table()["mp_20"][2]
    assert by_z == {("ZnO", 1): allocate(10, [two_atoms[1] + 0.5, two_atoms[2] + 0.5])[0],
                    ("ZnO", 2): allocate(10, [two_atoms[1] + 0.5, two_atoms[2] + 0.5])[1], ("Zn2O2", 2): 10}
    assert by_z[("ZnO", 1)] > by_z[("ZnO", 2)] > 0


def test_the_formula_sum_gives_atoms_per_formula_unit_and_z():
    assert cell_of_formula_sum("data_x\n_chemical_formula_sum   'Zn2 O2'\n") == (2, 2)
    assert cell_of_formula_sum("_chemical_formula_sum   'Sr4 Ti4 O12'\n_cell_length_a 4") == (5, 4)
    assert cell_of_formula_sum("_chemical_formula_sum   C12\n") == (1, 12)
    assert cell_of_formula_sum("_chemical_formula_sum   'Sr2 Ti1 O6'\n") == (9, 1)
    with pytest.raises(ValueError, match="CIF without _chemical_formula_sum"):
        cell_of_formula_sum("data_x\n_cell_length_a 4\n")
    with pytest.raises(ValueError, match="'Fe0.5 O1' is not element symbols with integer counts"):
        cell_of_formula_sum("_chemical_formula_sum   'Fe0.5 O1'\n")


def test_the_counts_cover_the_training_rows_only(fixture_data_dir):
    """On the fixture data: one count per training row of the protocol (35 rows of mp_20, 24 of perov_5)."""
    for dataset in ("mp_20", "perov_5"):
        counts = count_formula_units(dataset, fixture_data_dir)
        total = sum(sum(by_z.values()) for by_z in counts.values())
        assert total == len(split_rows(dataset, "train", fixture_data_dir)) > 0


def test_the_shipped_table_is_read_with_integer_keys():
    table = shipped_table()
    assert set(table) == {"carbon_24", "mp_20", "mpts_52", "perov_5"}
    assert table["perov_5"] == {5: {1: 11_356}}
    assert parse_table(json.loads(TABLE_FILE.read_text())) == table


@pytest.mark.skipif(not (SHARED_DATA / "mp_20" / "reserved_test_rows.txt").is_file(),
                    reason="the shared benchmark data is not beside this checkout")
def test_the_shipped_table_equals_a_rebuild_from_the_data():
    """resources/formula_units.json is what scripts/make_formula_unit_prior.py writes from the data (the
    training rows of the protocol: mp_20 15,188 crystals, mpts_52 11,596, carbon_24 3,359, perov_5 11,356)."""
    rebuilt = build_table(SHARED_DATA)
    assert rebuilt == json.loads(TABLE_FILE.read_text())
    totals = {dataset: sum(sum(by_z.values()) for by_z in table.values())
              for dataset, table in parse_table(rebuilt).items()}
    assert totals == {"mp_20": 15_188, "mpts_52": 11_596, "carbon_24": 3_359, "perov_5": 11_356}
