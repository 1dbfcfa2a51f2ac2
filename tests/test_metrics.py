"""The papers' CSP metrics (docs/method.md §8) on hand-made structures."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from equicsp_core.metrics import compositional_validity, is_valid, match_rate, rms_distance, structural_validity


def rocksalt(a: float = 5.64) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cesium_chloride_type(a: float = 3.3) -> Structure:
    return Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def perturbed(structure: Structure, scale: float, seed: int = 0) -> Structure:
    rng = np.random.default_rng(seed)
    moved = structure.copy()
    for i in range(len(moved)):
        moved.translate_sites([i], rng.normal(0, scale, 3), frac_coords=False)
    return moved


def test_identical_structures_match_with_zero_rms():
    """A structure matches itself (and a translated copy) with RMS ≈ 0."""
    reference = rocksalt()
    shifted = reference.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.21, 0.1, 0.33])
    assert rms_distance(reference, reference) == pytest.approx(0, abs=1e-8)
    assert rms_distance(shifted, reference) == pytest.approx(0, abs=1e-8)


def test_perturbed_structure_matches_with_small_rms():
    """Small random displacements still match, with a positive RMS below the matcher's stol."""
    rms = rms_distance(perturbed(rocksalt(), 0.05), rocksalt())
    assert rms is not None and 0 < rms < 0.1


def test_different_structures_do_not_match():
    """Rock salt and the CsCl type of the same composition are different crystals."""
    assert rms_distance(cesium_chloride_type(), rocksalt()) is None


def test_structural_validity():
    """Atoms closer than 0.5 Å, or a lattice vector longer than 40 Å, make a structure invalid."""
    assert structural_validity(rocksalt())
    too_close = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    assert not structural_validity(too_close)
    too_long = Structure(Lattice.tetragonal(4.0, 41.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert not structural_validity(too_long)
    assert not structural_validity(None)


def test_compositional_validity():
    """SMACT: NaCl and SrTiO3 are charge balanced, NaCl2 is not; one element and all-metal alloys pass."""
    assert compositional_validity([11, 17])
    assert compositional_validity([38, 22, 8, 8, 8])
    assert not compositional_validity([11, 17, 17])
    assert compositional_validity([6, 6, 6])
    assert compositional_validity([26, 28])  # Fe-Ni alloy: all metals


def test_element_without_oxidation_states_makes_a_compound_invalid():
    """SMACT has no oxidation states for Ar, Ra, ...: nothing balances (an mp_20 test crystal has one)."""
    assert not compositional_validity([18, 9, 9])  # ArF2
    assert not compositional_validity([88, 8])  # RaO (Ra is a metal, O is not: the SMACT test applies)


def test_k1_match_rate_counts_invalid_and_unmatched_as_misses():
    """k = 1: matched / total, RMSE over matches only; an invalid prediction or reference is a miss."""
    references = [rocksalt(), rocksalt(), rocksalt(), rocksalt()]
    predictions = [[rocksalt()], [perturbed(rocksalt(), 0.05)], [cesium_chloride_type()], [None]]
    result = match_rate(references, predictions)
    assert result.matched == 2 and result.total == 4
    assert result.match_rate == pytest.approx(0.5)
    assert result.rmse == pytest.approx(np.mean([r for r in result.per_crystal_rms if r is not None]))
    invalid_reference = Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])
    assert match_rate([invalid_reference], [[invalid_reference]]).matched == 0


def test_k_samples_take_the_best_valid_match():
    """k > 1: a crystal counts as matched if any valid sample matches; the smallest RMS is kept and the
    reference's validity is not required."""
    samples = [cesium_chloride_type(), perturbed(rocksalt(), 0.08, seed=1), perturbed(rocksalt(), 0.02, seed=2)]
    result = match_rate([rocksalt()], [samples])
    best = min(r for r in (rms_distance(s, rocksalt()) for s in samples) if r is not None)
    assert result.matched == 1 and result.per_crystal_rms[0] == pytest.approx(best)


def test_match_rate_parallel_equals_serial():
    """Two worker processes give exactly the serial result."""
    references = [rocksalt()] * 6
    predictions = [[perturbed(rocksalt(), 0.03, seed=s)] for s in range(5)] + [[cesium_chloride_type()]]
    assert match_rate(references, predictions, processes=2) == match_rate(references, predictions, processes=1)


def test_match_rate_rejects_mismatched_inputs():
    """Different numbers of references and prediction lists, or none at all, are errors."""
    with pytest.raises(ValueError, match="references"):
        match_rate([rocksalt()], [])
    with pytest.raises(ValueError, match="nothing"):
        match_rate([], [])


def test_is_valid_combines_both_tests():
    """is_valid needs structural and compositional validity."""
    assert is_valid(rocksalt())
    assert not is_valid(Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]]))


def diamond() -> Structure:
    """Cubic diamond, the conventional cell: 8 carbon atoms."""
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(3.567), ["C"], [[0, 0, 0]])


def lonsdaleite() -> Structure:
    """Hexagonal diamond doubled along a: 8 carbon atoms, the same density and bonds as diamond, other stacking."""
    cell = Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(2.52, 4.12), ["C"], [[1 / 3, 2 / 3, 0.0625]])
    cell.make_supercell([2, 1, 1])
    return cell


def test_one_element_cells_carbon_24():
    """carbon_24 (one element, docs/method.md §8): any carbon cell is compositionally valid (SMACT is skipped: C has
    no neutral state), the papers' matcher tells two 8-atom polymorphs apart and matches a perturbed copy."""
    assert len(diamond()) == len(lonsdaleite()) == 8
    assert is_valid(diamond()) and is_valid(lonsdaleite())
    assert compositional_validity([6] * 24)
    assert rms_distance(lonsdaleite(), diamond()) is None
    assert rms_distance(perturbed(diamond(), 0.03), diamond()) < 0.05
    result = match_rate([diamond(), diamond(), lonsdaleite()], [[perturbed(diamond(), 0.03)], [lonsdaleite()],
                                                                [lonsdaleite()]])
    assert (result.matched, result.valid_predictions) == (2, 3)
