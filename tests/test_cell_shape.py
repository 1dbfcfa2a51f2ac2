"""The cell shape strain of a match (equicsp_core.cell_shape): its value on a known deformation and its
invariances, as properties on random crystals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from equicsp_core.cell_shape import cell_shape_strain
from equicsp_core.metrics import PAPERS_MATCHER_TOLERANCES

SEEDS = range(5)


def random_crystal(seed: int) -> Structure:
    """A triclinic cell of 4 atoms of two species, its angles 75-105°, its sites at least 1.2 Å apart."""
    rng = np.random.default_rng(seed)
    while True:
        lattice = Lattice.from_parameters(*rng.uniform(3.5, 5.5, 3), *rng.uniform(75, 105, 3))
        structure = Structure(lattice, ["Na", "Na", "Cl", "Cl"], rng.random((4, 3)))
        if structure.distance_matrix[np.triu_indices(4, 1)].min() > 1.2:
            return structure


def rotation(seed: int) -> SymmOp:
    rng = np.random.default_rng(seed + 100)
    return SymmOp.from_axis_angle_and_translation(rng.normal(size=3), float(rng.uniform(0, 360)))


def tetragonal_cesium_chloride(c_over_a: float, volume_per_cell: float = 27.0) -> Structure:
    edge = (volume_per_cell / c_over_a) ** (1 / 3)
    return Structure(Lattice.tetragonal(edge, edge * c_over_a), ["Lu", "In"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.mark.parametrize("c_over_a", [1.05, 1.17])
def test_a_tetragonal_cell_against_the_cubic_one_is_strained_by_two_thirds_of_ln_c_over_a(c_over_a):
    """Volume kept, the stretches are (r^-1/3, r^-1/3, r^2/3): the strain is (2/3) ln r, in either order."""
    cubic, tetragonal = tetragonal_cesium_chloride(1.0), tetragonal_cesium_chloride(c_over_a)
    expected = 2 / 3 * math.log(c_over_a)
    assert cell_shape_strain(tetragonal, cubic) == pytest.approx(expected, abs=1e-9)
    assert cell_shape_strain(cubic, tetragonal) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_strain_ignores_rotation_volume_supercell_site_order_and_translation(seed):
    crystal = random_crystal(seed)
    other = crystal.copy()
    other.apply_operation(rotation(seed))
    other.scale_lattice(crystal.volume * 1.1)
    other.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 2]])
    other.translate_sites(range(len(other)), [0.13, 0.27, 0.41])
    other = Structure.from_sites(list(reversed(other.sites)))
    assert cell_shape_strain(other, crystal) == pytest.approx(0.0, abs=1e-6)
    assert cell_shape_strain(crystal, other, **PAPERS_MATCHER_TOLERANCES) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_crystal_stretched_along_random_axes_has_the_stretch_s_strain(seed):
    """A volume-keeping stretch diag(s, 1, 1/s) in a random frame, then a rotation: strain ln s."""
    crystal, stretch = random_crystal(seed), 1.03
    frame = rotation(seed + 7).rotation_matrix
    deformation = frame.T @ np.diag([stretch, 1.0, 1 / stretch]) @ frame
    strained = Structure(crystal.lattice.matrix @ deformation, crystal.species, crystal.frac_coords)
    strained.apply_operation(rotation(seed))
    assert cell_shape_strain(strained, crystal) == pytest.approx(math.log(stretch), abs=1e-6)


def test_structures_that_do_not_match_have_no_strain():
    crystal = random_crystal(0)
    other = crystal.copy()
    other.replace_species({"Cl": "Br"})
    assert cell_shape_strain(other, crystal) is None
