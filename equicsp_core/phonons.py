"""Dynamical stability of a relaxed crystal: harmonic phonons from finite displacements (phonopy) with any ASE
calculator, and whether any mode is imaginary.

A structure at a minimum of the potential has only real phonon frequencies; an imaginary mode (phonopy reports
it as a negative frequency) means a saddle point, a distortion along that mode lowers the energy (cubic SrTiO3's
octahedral rotations at R, for instance). The supercell is the smallest diagonal one with every lattice vector
at least ``min_length`` long, the frequencies are sampled on phonopy's automatic mesh of length ``mesh_length``
(Γ included) in the primitive cell spglib finds (phonopy's ``primitive_matrix="auto"``), and modes below
``-tolerance`` THz count as imaginary (small negative acoustic frequencies near Γ are numerical noise).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator
    from pymatgen.core import Structure


def supercell_diagonal(structure: Structure, min_length: float) -> list[int]:
    """Repetitions ``[n_a, n_b, n_c]`` making each lattice vector at least ``min_length`` Å long."""
    return [max(1, math.ceil(min_length / length)) for length in structure.lattice.abc]


def dynamical_stability(
    structure: Structure,
    calculator: Calculator,
    min_length: float = 8.0,
    displacement: float = 0.01,
    mesh_length: float = 20.0,
    tolerance: float = 0.1,
) -> dict[str, object]:
    """Phonons of ``structure`` with ``calculator``: the lowest frequency and the number of imaginary modes.

    Returns:
        ``{"min_frequency_thz", "imaginary_modes" (count over the mesh's q-points and bands), "modes" (all of
        them), "stable" (no imaginary mode), "supercell" ([n_a, n_b, n_c]), "displacements" (force calls)}``.
    """
    from ase import Atoms
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit_cell = PhonopyAtoms(symbols=[site.specie.symbol for site in structure], cell=structure.lattice.matrix,
                             scaled_positions=structure.frac_coords)
    supercell = supercell_diagonal(structure, min_length)
    with warnings.catch_warnings():  # phonopy 4 warns that 'auto' is no longer v3's default; it is our choice
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted to 'auto'")
        phonon = Phonopy(unit_cell, supercell_matrix=np.diag(supercell), primitive_matrix="auto")
    phonon.generate_displacements(distance=displacement)
    forces = []
    for displaced in phonon.supercells_with_displacements:
        atoms = Atoms(displaced.symbols, cell=displaced.cell, scaled_positions=displaced.scaled_positions, pbc=True)
        atoms.calc = calculator
        forces.append(atoms.get_forces())
    phonon.forces = forces
    phonon.produce_force_constants()
    phonon.run_mesh(mesh_length)
    frequencies = np.asarray(phonon.mesh.frequencies)  # (q-points, 3 × atoms), THz; imaginary < 0
    imaginary = int((frequencies < -tolerance).sum())
    return {
        "min_frequency_thz": float(frequencies.min()),
        "imaginary_modes": imaginary,
        "modes": int(frequencies.size),
        "stable": imaginary == 0,
        "supercell": supercell,
        "displacements": len(forces),
    }
