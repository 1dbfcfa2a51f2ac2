"""Phonon stability check (phonopy + any ASE calculator) on pair-potential crystals whose answer is known:
Lennard-Jones fcc is stable, simple cubic is not (pair potentials give it no shear stiffness)."""

import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from pymatgen.core import Lattice, Structure

from equicsp_core.phonons import dynamical_stability, supercell_diagonal
from equicsp_core.relax import relax_structure
from equicsp_core.settings import RelaxSettings

#: Nearest-neighbour distance at the minimum of the Lennard-Jones pair energy, σ = 1.
R_MIN = 2 ** (1 / 6)


def lj() -> LennardJones:
    return LennardJones(sigma=1.0, epsilon=0.01, rc=3.0, smooth=True)


def fcc() -> Structure:
    return Structure(Lattice.cubic(R_MIN * np.sqrt(2)), ["Ar"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                                    [0, 0.5, 0.5]])


def simple_cubic() -> Structure:
    return Structure(Lattice.cubic(R_MIN), ["Ar"], [[0, 0, 0]])


def test_supercell_is_the_smallest_reaching_the_length():
    structure = Structure(Lattice.orthorhombic(3.0, 4.0, 9.0), ["Ar"], [[0, 0, 0]])
    assert supercell_diagonal(structure, 8.0) == [3, 2, 1]


def test_lennard_jones_fcc_is_stable(recwarn):
    """And without a warning: phonopy 4 warns whenever ``primitive_matrix="auto"`` finds a smaller primitive cell
    (here the conventional fcc cell's F-centred one), which is what the check asks for."""
    check = dynamical_stability(fcc(), lj(), min_length=4.0)
    assert not [str(w.message) for w in recwarn if "primitive_matrix" in str(w.message)]
    assert check["stable"] and check["imaginary_modes"] == 0
    assert check["min_frequency_thz"] > -0.1
    assert check["supercell"] == [3, 3, 3]


def test_lennard_jones_simple_cubic_has_imaginary_modes():
    check = dynamical_stability(simple_cubic(), lj(), min_length=4.0)
    assert not check["stable"]
    assert check["imaginary_modes"] > 0 and check["min_frequency_thz"] < -0.5


def test_relaxation_reports_phonons_when_asked():
    """``phonons: true`` adds the check to the relaxation's result; without it there is none."""
    for phonons in (True, False):
        result = relax_structure(fcc(), lj(), RelaxSettings(potential="unused:factory", steps=0, phonons=phonons))
        assert result.status in ("converged", "not_converged")
        assert (result.phonons is not None) == phonons
    assert result.as_dict()["phonons"] is None


def test_phonons_setting_must_be_a_boolean():
    with pytest.raises(ValueError, match="^phonons: Input should be a valid boolean"):
        RelaxSettings(phonons="yes")
