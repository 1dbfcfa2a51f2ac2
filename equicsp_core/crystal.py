"""Crystals as tensors, one at a time (:class:`Crystal`) or batched as one flat graph (:class:`CrystalBatch`).

A crystal is ``(A, F, L)`` (docs/method.md §1.1): atomic numbers ``A`` ``(n,)``, fractional coordinates ``F``
``(n, 3)`` in [0, 1) and the lattice, stored as lengths (Å) and angles (degrees) so the orientation is
always the canonical one of :func:`equicsp_core.lattice.lattice_from_parameters`.

A batch concatenates the atoms of ``B`` crystals (``N = Σ n``) and keeps ``num_atoms`` ``(B,)`` and the
crystal index of every atom ``batch`` ``(N,)``; no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from equicsp_core.lattice import lattice_from_parameters, parameters_from_lattice
from equicsp_core.settings import MAX_ATOMIC_NUMBER
from equicsp_core.torus import wrap_unit

if TYPE_CHECKING:
    import ase
    from pymatgen.core import Structure


#: Smallest volume per atom (Å³) accepted as a non-singular cell.
MIN_VOLUME = 1e-3


@dataclass(frozen=True)
class Crystal:
    """One crystal; float64 throughout so round trips are exact to float tolerance.

    Attributes:
        atomic_numbers: ``(n,)`` int64 in 1..100.
        frac_coords: ``(n, 3)`` float64 in [0, 1).
        lengths: ``(3,)`` float64, Å.
        angles: ``(3,)`` float64, degrees.
    """

    atomic_numbers: torch.Tensor
    frac_coords: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor

    def __post_init__(self) -> None:
        validate_crystal(self.atomic_numbers, self.frac_coords, self.lengths, self.angles)

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def lattice(self) -> torch.Tensor:
        """``(3, 3)`` canonical lattice matrix, rows are lattice vectors (Å)."""
        return lattice_from_parameters(self.lengths, self.angles)

    @classmethod
    def from_arrays(
        cls,
        atomic_numbers: np.ndarray | torch.Tensor | list[int],
        frac_coords: np.ndarray | torch.Tensor,
        lattice: np.ndarray | torch.Tensor,
    ) -> Crystal:
        """Build from a lattice matrix ``(3, 3)`` (rows = vectors); coordinates are wrapped into [0, 1)."""
        lattice_t = torch.as_tensor(np.asarray(lattice, dtype=np.float64))
        if lattice_t.shape != (3, 3):
            raise ValueError(f"lattice must be a 3x3 matrix, got shape {tuple(lattice_t.shape)}")
        if not torch.isfinite(lattice_t).all():
            raise ValueError("lattice contains NaN or infinite values")
        frac = torch.as_tensor(np.asarray(frac_coords, dtype=np.float64)).reshape(-1, 3)
        if not torch.isfinite(frac).all():
            raise ValueError("fractional coordinates contain NaN or infinite values")
        numbers = torch.as_tensor(np.asarray(atomic_numbers, dtype=np.int64)).reshape(-1)
        volume = abs(float(torch.linalg.det(lattice_t)))
        if volume < MIN_VOLUME * max(len(numbers), 1):
            raise ValueError(f"singular lattice: cell volume {volume:.3g} Å³ for {len(numbers)} atoms")
        lengths, angles = parameters_from_lattice(lattice_t)
        return cls(numbers, wrap_unit(frac), lengths, angles)

    @classmethod
    def from_structure(cls, structure: Structure, niggli: bool = False) -> Crystal:
        """From a pymatgen ``Structure`` (ordered, elements only); optionally Niggli-reduced first.

        The orientation is discarded: the crystal is rebuilt on the canonical lattice of its six
        parameters, keeping the fractional coordinates (docs/method.md §1.5, step 3).
        """
        if len(structure) == 0:
            raise ValueError("structure has no atoms")
        if not structure.is_ordered:
            raise ValueError("disordered structures (partial occupancies) are not supported")
        numbers = []
        for site in structure:
            element = getattr(site.specie, "element", site.specie)
            z = getattr(element, "Z", None)
            if z is None or not 1 <= z <= MAX_ATOMIC_NUMBER:
                raise ValueError(f"unknown or unsupported element {site.specie!s} (need Z in 1..100)")
            numbers.append(z)
        if niggli:
            structure = structure.get_reduced_structure()
        return cls.from_arrays(numbers, structure.frac_coords, structure.lattice.matrix)

    @classmethod
    def from_atoms(cls, atoms: ase.Atoms) -> Crystal:
        """From an ``ase.Atoms`` with a full 3D cell."""
        if len(atoms) == 0:
            raise ValueError("structure has no atoms")
        numbers = atoms.get_atomic_numbers()
        bad = [int(z) for z in numbers if not 1 <= z <= MAX_ATOMIC_NUMBER]
        if bad:
            raise ValueError(f"unsupported atomic numbers {bad} (need Z in 1..100)")
        return cls.from_arrays(numbers, atoms.get_scaled_positions(wrap=True), np.asarray(atoms.cell))

    def to_structure(self) -> Structure:
        """pymatgen ``Structure`` on the canonical lattice."""
        from pymatgen.core import Lattice, Structure

        lattice = Lattice.from_parameters(*self.lengths.tolist(), *self.angles.tolist())
        return Structure(lattice, self.atomic_numbers.tolist(), self.frac_coords.numpy())

    def to_atoms(self) -> ase.Atoms:
        """``ase.Atoms`` with periodic boundary conditions on the canonical lattice."""
        import ase

        return ase.Atoms(
            numbers=self.atomic_numbers.numpy(),
            scaled_positions=self.frac_coords.numpy(),
            cell=self.lattice.numpy(),
            pbc=True,
        )


def validate_crystal(
    atomic_numbers: torch.Tensor, frac_coords: torch.Tensor, lengths: torch.Tensor, angles: torch.Tensor
) -> None:
    """Raise ``ValueError`` naming the first problem found in a crystal's arrays."""
    n = atomic_numbers.shape[0]
    if n == 0:
        raise ValueError("structure has no atoms")
    if frac_coords.shape != (n, 3):
        raise ValueError(f"frac_coords must have shape ({n}, 3), got {tuple(frac_coords.shape)}")
    if atomic_numbers.dtype.is_floating_point:
        raise ValueError("atomic_numbers must be integers")
    bad = atomic_numbers[(atomic_numbers < 1) | (atomic_numbers > MAX_ATOMIC_NUMBER)]
    if bad.numel():
        raise ValueError(f"unknown atomic numbers {bad.tolist()} (need Z in 1..{MAX_ATOMIC_NUMBER})")
    if not torch.isfinite(frac_coords).all():
        raise ValueError("fractional coordinates contain NaN or infinite values")
    if (frac_coords < 0).any() or (frac_coords >= 1).any():
        raise ValueError("fractional coordinates must lie in [0, 1)")
    if lengths.shape != (3,) or angles.shape != (3,):
        raise ValueError("lengths and angles must each have shape (3,)")
    if not (torch.isfinite(lengths).all() and torch.isfinite(angles).all()):
        raise ValueError("lattice contains NaN or infinite values")
    if (lengths <= 0).any() or (angles <= 0).any() or (angles >= 180).any():
        raise ValueError(f"singular lattice: lengths {lengths.tolist()} Å, angles {angles.tolist()} deg")
    volume = float(torch.linalg.det(lattice_from_parameters(lengths, angles)))
    if not volume >= MIN_VOLUME * n:
        raise ValueError(f"singular lattice: cell volume {volume:.3g} Å³ for {n} atoms")


@dataclass
class CrystalBatch:
    """``B`` crystals as one flat graph.

    Attributes:
        atomic_numbers: ``(N,)`` int64.
        frac_coords: ``(N, 3)``.
        lengths: ``(B, 3)`` Å.
        angles: ``(B, 3)`` degrees.
        num_atoms: ``(B,)`` int64.
        batch: ``(N,)`` int64, crystal index of each atom.
    """

    atomic_numbers: torch.Tensor
    frac_coords: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor
    num_atoms: torch.Tensor
    batch: torch.Tensor

    @classmethod
    def collate(cls, crystals: list[Crystal], dtype: torch.dtype = torch.float32) -> CrystalBatch:
        if not crystals:
            raise ValueError("cannot batch an empty list of crystals")
        num_atoms = torch.tensor([c.num_atoms for c in crystals])
        return cls(
            atomic_numbers=torch.cat([c.atomic_numbers for c in crystals]),
            frac_coords=torch.cat([c.frac_coords for c in crystals]).to(dtype),
            lengths=torch.stack([c.lengths for c in crystals]).to(dtype),
            angles=torch.stack([c.angles for c in crystals]).to(dtype),
            num_atoms=num_atoms,
            batch=torch.repeat_interleave(torch.arange(len(crystals)), num_atoms),
        )

    @property
    def num_crystals(self) -> int:
        return int(self.num_atoms.shape[0])

    def to(self, device: torch.device | str) -> CrystalBatch:
        return CrystalBatch(**{k: v.to(device) for k, v in vars(self).items()})

    def crystals(self) -> list[Crystal]:
        """Split back into float64 :class:`Crystal` objects (validated)."""
        splits = self.num_atoms.tolist()
        numbers = self.atomic_numbers.cpu().split(splits)
        coords = self.frac_coords.detach().cpu().double().split(splits)
        lengths, angles = self.lengths.detach().cpu().double(), self.angles.detach().cpu().double()
        return [Crystal(numbers[i], coords[i], lengths[i], angles[i]) for i in range(len(splits))]
