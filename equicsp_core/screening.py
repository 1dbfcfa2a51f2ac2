"""Screening of predicted crystals before and after relaxation: plausibility, duplicates, symmetry, displacement.

Pure functions on pymatgen ``Structure`` objects, shared by the AiiDA work chains (as calcfunctions, so the
choices are in the provenance) and the jobflow Makers.

- :func:`implausibility` says why a candidate is not worth relaxing (atoms too close, absurd volume), or
  ``None``; the thresholds default to the papers' structural validity (docs/method.md §8.1: every interatomic
  distance above 0.5 Å, volume above 0.1 Å³) plus an upper bound on the volume per atom that no solid at
  ambient pressure exceeds.
- :func:`group_duplicates` groups relaxed structures that are the same crystal (pymatgen's
  ``StructureMatcher.group_structures``, then split where cells differ in shape beyond
  :data:`~equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN`): duplicates are merged after relaxation only, since
  distinct distortions of one parent may relax to distinct minima.
- :func:`space_group` and :func:`displacement` describe what a relaxation did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# The papers' structural validity (docs/method.md §8.1): closest approach of two atoms (Å), smallest cell volume (Å³).
from equicsp_core.metrics import MIN_DISTANCE, MIN_VOLUME

if TYPE_CHECKING:
    from pymatgen.core import Structure

#: Largest allowed volume per atom, Å³. Solids at ambient pressure stay below ~120 Å³/atom (Cs ≈ 117);
#: beyond this a candidate is a gas of atoms, and relaxing it wastes a potential's time.
MAX_VOLUME_PER_ATOM = 150.0


def min_distance(structure: Structure) -> float:
    """Shortest distance between two atoms, periodic images included, in Å.

    For one atom per cell this is the shortest lattice vector (the atom's distance to its own image).
    """
    if len(structure) == 1:
        return float(min(np.linalg.norm(v) for v in _short_lattice_vectors(structure)))
    distances = structure.distance_matrix + np.diag(np.full(len(structure), np.inf))
    shortest = float(distances.min())
    # An atom's own periodic image can be closer than any other atom in a very thin cell.
    return min(shortest, float(min(np.linalg.norm(v) for v in _short_lattice_vectors(structure))))


def _short_lattice_vectors(structure: Structure) -> list[np.ndarray]:
    """The non-zero lattice vectors with integer coefficients in {-1, 0, 1} on the LLL-reduced basis."""
    basis = structure.lattice.get_lll_reduced_lattice().matrix
    coefficients = np.array(np.meshgrid(*[[-1, 0, 1]] * 3)).reshape(3, -1).T
    return [c @ basis for c in coefficients if np.any(c)]


def implausibility(
    structure: Structure,
    min_allowed_distance: float = MIN_DISTANCE,
    max_volume_per_atom: float = MAX_VOLUME_PER_ATOM,
) -> str | None:
    """Why ``structure`` is not a plausible crystal (a short sentence), or ``None`` when it is."""
    volume = structure.volume
    if not np.isfinite(volume) or volume < MIN_VOLUME:
        return f"cell volume {volume:.3g} Å³ below {MIN_VOLUME} Å³"
    if volume / len(structure) > max_volume_per_atom:
        return f"volume per atom {volume / len(structure):.1f} Å³ above {max_volume_per_atom} Å³"
    shortest = min_distance(structure)
    if shortest < min_allowed_distance:
        return f"atoms {shortest:.2f} Å apart, closer than {min_allowed_distance} Å"
    return None


def group_duplicates(structures: Sequence[Structure]) -> list[list[int]]:
    """The structures grouped by pymatgen's ``StructureMatcher.group_structures`` (its default tolerances), each
    group split where cells differ in shape (:func:`same_shape_groups`), as indices: each group in the order
    given, the groups in the order of their first member.

    The first structure of each group is the reference the others matched, so given in order of energy the
    first index of a group is its lowest-energy member. Cells of different sizes match when they reduce to
    the same primitive cell (``SrTiO3`` and its 2×1×1 supercell). Compositions are compared reduced, so
    structures of different compositions never group.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    positions: dict[int, list[int]] = {}
    for index, structure in enumerate(structures):
        positions.setdefault(id(structure), []).append(index)
    groups = [sorted(positions[id(structure)].pop(0) for structure in group)
              for group in StructureMatcher().group_structures(list(structures))]
    return sorted(part for group in groups for part in same_shape_groups(group, structures))


def same_shape_groups(group: Sequence[int], structures: Sequence[Structure]) -> list[list[int]]:
    """A group of matching structures (indices, in order) split into the same phase: each joins the first part
    whose first member's cell it matches within :data:`~equicsp_core.cell_shape.SAME_PHASE_SHAPE_STRAIN`, else
    starts a part. StructureMatcher's length tolerance puts a cubic cell and a tetragonal one of c/a 1.17 in one
    group; merged, the higher of the two would never reach DFT. Where the shape cannot be measured (the matcher
    maps the primitive cells differently), the matcher's verdict stands."""
    from equicsp_core.cell_shape import beyond_same_phase, cell_shape_strain

    parts: list[list[int]] = []
    for index in group:
        for part in parts:
            if not beyond_same_phase(cell_shape_strain(structures[index], structures[part[0]])):
                part.append(index)
                break
        else:
            parts.append([index])
    return parts


@dataclass(frozen=True)
class SpaceGroup:
    """International symbol and number of a structure's space group at a given tolerance."""

    symbol: str
    number: int

    def __str__(self) -> str:
        return f"{self.symbol} ({self.number})"


def space_group(structure: Structure, symprec: float = 0.1) -> SpaceGroup:
    """The space group that spglib finds at ``symprec`` (Å); P1 when it finds none."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
        return SpaceGroup(analyzer.get_space_group_symbol(), analyzer.get_space_group_number())
    except Exception:  # spglib gives up on some badly distorted cells
        return SpaceGroup("P1", 1)


def displacement(initial: Structure, final: Structure) -> dict[str, float]:
    """How far a relaxation moved a structure: ``{"rms_displacement": Å, "max_displacement": Å, "volume_change": ratio - 1}``.

    Atom ``i`` of ``initial`` is atom ``i`` of ``final`` (relaxations keep the order). Displacements are the
    fractional moves, less their circular mean (a rigid translation, e.g. the origin shift of
    :func:`symmetrized`, is no movement), wrapped into [-1/2, 1/2) and measured in the final lattice, so a move
    across the cell boundary counts as the short way round.
    """
    if len(initial) != len(final) or [s.specie for s in initial] != [s.specie for s in final]:
        raise ValueError("initial and final structures must have the same atoms in the same order")
    moves = final.frac_coords - initial.frac_coords
    # A rigid translation is no movement: remove the circular mean move (an origin shift of any size).
    moves -= np.angle(np.exp(2j * np.pi * moves).mean(axis=0)) / (2 * np.pi)
    moves -= np.round(moves)
    lengths = np.linalg.norm(moves @ final.lattice.matrix, axis=1)
    return {
        "rms_displacement": float(np.sqrt(np.mean(lengths**2))),
        "max_displacement": float(lengths.max()),
        "volume_change": float(final.volume / initial.volume - 1.0),
    }


def symmetrized(structure: Structure, symprec: float = 0.05) -> Structure:
    """``structure`` with its cell and positions made exactly symmetric at tolerance ``symprec`` (Å).

    An ML-relaxed crystal is symmetric only to ~0.01 Å, so DFT codes find no symmetry in it and use every
    k-point (112 instead of 10 for a 6×6×6 mesh of a cubic perovskite). ASE's ``refine_symmetry`` keeps the
    atoms, their order and the cell's orientation, so the result is comparable atom by atom with the input.
    """
    from ase.spacegroup.symmetrize import refine_symmetry
    from pymatgen.core import Lattice
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    atoms = AseAtomsAdaptor.get_atoms(structure)
    refine_symmetry(atoms, symprec=symprec, verbose=False)
    refined = AseAtomsAdaptor.get_structure(atoms)
    # Then to pymatgen's standard orientation: refine_symmetry keeps the input's orientation, and pw.x looks for
    # symmetry operations along Cartesian axes, finding none in a cubic cell turned by 0.3°.
    aligned = structure.__class__(Lattice.from_parameters(*refined.lattice.parameters), refined.species,
                                  refined.frac_coords)
    # And the origin to spglib's standard one: pw.x drops symmetry operations whose fractional translation does
    # not fit its FFT grid, which is all of them when the origin sits at an arbitrary point. spglib maps
    # x -> P x + p to the standard setting, so shifting by P⁻¹ p in the cell's own basis moves the origin there.
    dataset = SpacegroupAnalyzer(aligned, symprec=1e-3).get_symmetry_dataset()
    shift = np.linalg.solve(np.asarray(dataset.transformation_matrix), np.asarray(dataset.origin_shift))
    return structure.__class__(aligned.lattice, aligned.species, (aligned.frac_coords + shift) % 1.0)
