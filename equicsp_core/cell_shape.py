"""How different the cells of two matching structures are in shape: the figure that separates "the same phase"
from "a strained relative" where :class:`~pymatgen.analysis.structure_matcher.StructureMatcher` says both.

StructureMatcher scales both cells to one volume and accepts lattice lengths that differ by up to ``ltol``
(0.2 by default, 0.3 with the papers' tolerances) before it compares sites. A cubic CsCl cell therefore matches a
tetragonal one of c/a = 1.17 at RMS 0, although they are two phases (LuIn in BENCHMARKS.md, "A DFT hull beside
the ML hull": DFT puts the cubic cell 16.8 meV/atom above the tetragonal ground state). The match is measured
here by the deformation that carries one matched cell onto the other:

    L_b = L_a F          (rows of L are the lattice vectors, in bases the matcher put into correspondence)
    F ← F / |det F|^(1/3) (volume aside: ML potentials and functionals disagree on volume by a few %)
    shape strain = max_i |ln λ_i|,   λ_i the singular values of F (the principal stretches)

It is invariant to rotating either structure and to the choice of matched basis, symmetric in its two arguments
(ln λ changes sign only), and 0 for cells of one shape. The CsCl example gives stretches (1.054, 1.054, 0.900) and
a shape strain of 0.105. :data:`SAME_PHASE_SHAPE_STRAIN` is the limit below which a match counts as the same
phase, in novelty (:func:`equicsp_core.stability.novelty`) and in the merging of relaxed duplicates
(:func:`equicsp_core.screening.group_duplicates`); its value is measured on reference entries relaxed with CHGNet
from strained starts against their stored DFT cells (``benchmarks/cell_shape_strain.py``, BENCHMARKS.md "Same
phase or strained relative"). It flags only strains beyond CHGNet's own relaxation noise (a few %): finer
differences between phases are for DFT to decide.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pymatgen.core import Structure

#: A match whose cell shape strain exceeds this is a strained relative of the reference, not the same phase. Above
#: the 99th percentile (0.082) of 269 mp_20 reference entries (no reserved test row) relaxed with CHGNet from
#: strained starts against their own DFT cells, 2 of which lie beyond it (BENCHMARKS.md, "Same phase or strained
#: relative").
SAME_PHASE_SHAPE_STRAIN = 0.1


def cell_shape_strain(structure: Structure, reference: Structure, **tolerances: Any) -> float | None:
    """The shape strain (module docstring) between the cells of ``structure`` and ``reference`` as
    StructureMatcher maps them onto each other with ``tolerances`` (its keyword arguments: ``ltol``, ``stol``,
    ``angle_tol``; pymatgen's defaults when none), on their primitive cells; ``None`` when they do not match."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    first, second = structure.get_primitive_structure(), reference.get_primitive_structure()
    larger, smaller = (first, second) if len(first) >= len(second) else (second, first)
    matcher = StructureMatcher(primitive_cell=False, attempt_supercell=True, **tolerances)
    try:
        mapped = matcher.get_s2_like_s1(larger, smaller)
    except Exception:  # pymatgen can fail on degenerate cells: no match
        return None
    if mapped is None:
        return None
    deformation = np.linalg.solve(larger.lattice.matrix, mapped.lattice.matrix)
    stretches = np.linalg.svd(deformation / abs(np.linalg.det(deformation)) ** (1.0 / 3.0), compute_uv=False)
    return float(max(abs(math.log(stretch)) for stretch in stretches))


def beyond_same_phase(strain: float | None) -> bool:
    """Whether a match of this shape strain is a strained relative, not the same phase: above
    :data:`SAME_PHASE_SHAPE_STRAIN`. ``None`` (the matcher matched, but its mapping of the primitive cells gave no
    shape to measure) is not: the matcher's verdict stands."""
    return strain is not None and strain > SAME_PHASE_SHAPE_STRAIN
