"""``equicsp_core.screening`` on hand-made crystals: plausibility, duplicates (after relaxation), space groups, displacements."""

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from equicsp_core.screening import (
    MAX_VOLUME_PER_ATOM,
    displacement,
    group_duplicates,
    implausibility,
    min_distance,
    space_group,
    symmetrized,
)

PEROVSKITE_SITES = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]


def perovskite(a_site: str = "Sr", a: float = 3.905) -> Structure:
    """A cubic ABO3 perovskite (Pm-3m, 5 atoms); Ti-O is a/2 ≈ 1.95 Å."""
    return Structure(Lattice.cubic(a), [a_site, "Ti", "O", "O", "O"], PEROVSKITE_SITES)


def distorted_srtio3() -> Structure:
    """SrTiO3 at random positions in a triclinic cell: no symmetry."""
    rng = np.random.default_rng(7)
    lattice = Lattice.from_parameters(4.1, 4.7, 5.3, 81, 97, 104)
    return Structure(lattice, ["Sr", "Ti", "O", "O", "O"], rng.random((5, 3)))


# ------------------------------------------------------------------------------------------------
# implausibility and min_distance


def test_cubic_perovskite_is_plausible():
    structure = perovskite()
    assert implausibility(structure) is None
    assert min_distance(structure) == pytest.approx(3.905 / 2)


def test_atoms_too_close_are_implausible_with_the_distance():
    structure = Structure(Lattice.cubic(5.0), ["Cu", "Cu"], [[0, 0, 0], [0.06, 0, 0]])
    assert min_distance(structure) == pytest.approx(0.3)
    reason = implausibility(structure)
    assert reason is not None
    assert "0.30 Å apart" in reason and "0.5" in reason


def test_one_atom_close_to_its_own_image_is_implausible():
    """A single atom in a cell with a 0.4 Å lattice vector: its periodic image is 0.4 Å away."""
    structure = Structure(Lattice.orthorhombic(0.4, 5.0, 5.0), ["Cu"], [[0, 0, 0]])
    assert min_distance(structure) == pytest.approx(0.4)
    reason = implausibility(structure)
    assert reason is not None and "0.40 Å apart" in reason


def test_thin_cell_of_several_atoms_counts_self_images():
    """Two atoms far apart in a cell whose c is 0.4 Å: the images along c are the closest pair."""
    structure = Structure(Lattice.orthorhombic(5.0, 5.0, 0.4), ["Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0]])
    assert min_distance(structure) == pytest.approx(0.4)
    assert "0.40 Å apart" in implausibility(structure)


def test_huge_volume_per_atom_is_implausible():
    structure = Structure(Lattice.cubic(10.0), ["Cu"], [[0, 0, 0]])  # 1000 Å³ per atom
    reason = implausibility(structure)
    assert reason is not None and "volume per atom 1000.0" in reason and str(MAX_VOLUME_PER_ATOM) in reason
    assert implausibility(structure, max_volume_per_atom=2000.0) is None


def test_thresholds_are_parameters():
    structure = perovskite()
    assert "closer than 2.5" in implausibility(structure, min_allowed_distance=2.5)


# ------------------------------------------------------------------------------------------------
# group_duplicates


def test_duplicates_group_with_their_first_member():
    """A, a different crystal B, A slightly perturbed, a 2x1x1 supercell of A (another Z): two groups."""
    a = perovskite()
    perturbed = a.copy()
    perturbed.perturb(0.05, min_distance=0.01)
    supercell = a * (2, 1, 1)
    b = perovskite("Ca", 3.84)
    assert group_duplicates([a, b, perturbed, supercell]) == [[0, 2, 3], [1]]


def test_different_arrangement_of_the_same_composition_is_distinct():
    """Sr and Ti swapped puts O on the edges of the Sr cube instead of its faces: another structure."""
    a = perovskite()
    swapped = Structure(Lattice.cubic(3.905), ["Ti", "Sr", "O", "O", "O"], PEROVSKITE_SITES)
    assert group_duplicates([swapped, a, a.copy()]) == [[0], [1, 2]]


def test_a_strained_relative_is_not_merged_with_the_phase_the_matcher_takes_it_for():
    """Cubic CsCl, tetragonal c/a 1.17 and 1.02 cells (one volume): StructureMatcher puts all three in one group;
    the 1.17 cell (shape strain 0.105 from the cubic one) is split off, the 1.02 (0.013) stays."""
    def cesium_chloride(c_over_a: float) -> Structure:
        edge = (27.0 / c_over_a) ** (1 / 3)
        return Structure(Lattice.tetragonal(edge, edge * c_over_a), ["Lu", "In"], [[0, 0, 0], [0.5, 0.5, 0.5]])

    cells = [cesium_chloride(1.0), cesium_chloride(1.17), cesium_chloride(1.02)]
    assert len(StructureMatcher().group_structures(cells)) == 1
    assert group_duplicates(cells) == [[0, 2], [1]]


def test_the_same_object_twice_is_one_group_of_two():
    a = perovskite()
    assert group_duplicates([a, a]) == [[0, 1]]


def test_group_duplicates_of_no_structure():
    assert group_duplicates([]) == []


# ------------------------------------------------------------------------------------------------
# space_group


def test_space_group_of_cubic_perovskite_is_pm3m():
    group = space_group(perovskite())
    assert (group.symbol, group.number) == ("Pm-3m", 221)
    assert str(group) == "Pm-3m (221)"


def test_space_group_of_a_random_distorted_cell_is_p1():
    group = space_group(distorted_srtio3())
    assert (group.symbol, group.number) == ("P1", 1)


# ------------------------------------------------------------------------------------------------
# displacement


def test_identical_structures_have_no_displacement():
    structure = perovskite()
    assert displacement(structure, structure.copy()) == {
        "rms_displacement": 0.0, "max_displacement": 0.0, "volume_change": 0.0}


def test_move_across_the_cell_boundary_counts_the_short_way():
    """Fractional 0.99 -> 0.01 in a 5 Å cell is a 0.1 Å move, not 4.9 Å (half of it per atom once the pair's
    common translation, 0.05 Å, is removed)."""
    lattice = Lattice.cubic(5.0)
    initial = Structure(lattice, ["Cu", "Cu"], [[0.99, 0.5, 0.5], [0.25, 0.25, 0.25]])
    final = Structure(lattice, ["Cu", "Cu"], [[0.01, 0.5, 0.5], [0.25, 0.25, 0.25]])
    moved = displacement(initial, final)
    assert moved["max_displacement"] == pytest.approx(0.05)
    assert moved["rms_displacement"] == pytest.approx(0.05)
    assert moved["volume_change"] == pytest.approx(0.0)
    # and the other way round
    assert displacement(final, initial)["max_displacement"] == pytest.approx(0.05)


def test_a_rigid_translation_is_no_displacement():
    """Every atom shifted by the same vector (an origin shift, across the boundary for some): nothing moved."""
    initial = perovskite()
    final = Structure(initial.lattice, initial.species, (initial.frac_coords + [0.35, 0.54, 0.9]) % 1.0)
    assert displacement(initial, final)["max_displacement"] == pytest.approx(0.0, abs=1e-9)


def test_volume_change_of_a_one_percent_isotropic_strain():
    initial = perovskite()
    final = initial.copy()
    final.apply_strain(0.01)  # every length × 1.01, fractional coordinates kept
    moved = displacement(initial, final)
    assert moved["volume_change"] == pytest.approx(1.01**3 - 1)
    assert moved["max_displacement"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "final",
    [
        Structure(Lattice.cubic(3.905), ["Ca", "Ti", "O", "O", "O"], PEROVSKITE_SITES),  # other species
        Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O"], PEROVSKITE_SITES[:4]),  # fewer atoms
        Structure(Lattice.cubic(3.905), ["Ti", "Sr", "O", "O", "O"], PEROVSKITE_SITES),  # other order
    ],
)
def test_mismatched_atoms_are_refused(final):
    with pytest.raises(ValueError, match="same atoms in the same order"):
        displacement(perovskite(), final)


# ------------------------------------------------------------------------------------------------
# symmetrized


def ml_relaxed_like_perovskite() -> Structure:
    """Cubic SrTiO3 as an ML relaxation leaves it: turned by ~0.3°, origin at a random point, 0.005 Å noise."""
    rng = np.random.default_rng(3)
    angle = np.radians(0.3)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    lattice = Lattice(np.eye(3) * 3.905 @ rotation.T + rng.normal(0, 0.005, (3, 3)))
    frac = (np.array(PEROVSKITE_SITES) + [0.31, 0.77, 0.12] + rng.normal(0, 0.001, (5, 3))) % 1.0
    return Structure(lattice, ["Sr", "Ti", "O", "O", "O"], frac)


def test_symmetrized_is_exactly_symmetric_axis_aligned_and_at_the_standard_origin():
    """What pw.x needs to find the symmetry: exact, Cartesian-aligned, operations without odd translations."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    start = ml_relaxed_like_perovskite()
    assert space_group(start, symprec=1e-3).number != 221
    result = symmetrized(start, symprec=0.05)
    assert [str(s.specie) for s in result] == ["Sr", "Ti", "O", "O", "O"]
    assert space_group(result, symprec=1e-5) == space_group(perovskite(), symprec=1e-5)
    assert np.abs(result.lattice.matrix - np.diag(np.diag(result.lattice.matrix))).max() < 1e-8
    operations = SpacegroupAnalyzer(result, symprec=1e-5).get_symmetry_operations()
    assert len(operations) == 48
    assert all(np.allclose(op.translation_vector, 0, atol=1e-8) for op in operations)
    # The same atoms, barely moved (the origin shift is a rigid translation, which displacement ignores).
    assert displacement(start, result)["max_displacement"] < 0.05


def test_symmetrized_keeps_a_structure_with_no_symmetry_as_it_is():
    start = distorted_srtio3()
    result = symmetrized(start, symprec=0.01)
    assert space_group(result, symprec=1e-3).number == 1
    assert displacement(start, result)["max_displacement"] < 1e-6
    assert result.volume == pytest.approx(start.volume)
