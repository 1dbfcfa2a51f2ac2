"""Lattice parametrisations (docs/method.md §1.1–1.4).

Conventions: a lattice matrix ``L`` has the lattice vectors a, b, c as **rows** (Å); Cartesian positions
are ``X = F @ L``. Lengths ``l = (|a|, |b|, |c|)`` in Å; angles ``(alpha, beta, gamma)`` in **degrees**
with alpha = ∠(b, c), beta = ∠(a, c), gamma = ∠(a, b) (angle k lies opposite vector k).

EquiCSP diffuses the 6-vector ``C = (log l1, log l2, log l3, -cot(alpha), -cot(beta), -cot(gamma))``;
permuting the lattice vectors permutes both 3-blocks of ``C`` with the same permutation.

All functions are batched over leading dimensions and differentiable.
"""

from __future__ import annotations

import itertools
import math

import torch

# The 6 permutations of three lattice vectors; index 0 is the identity. ``PERMUTATIONS[p][k]`` is the old
# index of the vector that becomes new vector k.
PERMUTATIONS: tuple[tuple[int, int, int], ...] = tuple(itertools.permutations(range(3)))

#: log-lengths are clamped to this range before ``exp`` so a diverged sample gives a finite (then
#: invalid) lattice instead of inf (docs/method.md §10.3): exp(±7) ≈ 1e-3 .. 1.1e3 Å.
LOG_LENGTH_BOUND = 7.0


def lattice_from_parameters(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Canonical lattice matrix from lengths (Å) and angles (degrees), pymatgen's convention.

    ``cos γ* = (cos α cos β − cos γ)/(sin α sin β)`` (clamped to [−1, 1]);
    ``a = (l1 sin β, 0, l1 cos β)``, ``b = (−l2 sin α cos γ*, l2 sin α sin γ*, l2 cos α)``,
    ``c = (0, 0, l3)``.

    Args:
        lengths: ``(..., 3)``.
        angles: ``(..., 3)`` in degrees.

    Returns:
        ``(..., 3, 3)`` with the lattice vectors as rows.
    """
    alpha, beta, gamma = torch.deg2rad(angles).unbind(-1)
    cos_a, cos_b, cos_g = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    sin_a, sin_b = torch.sin(alpha), torch.sin(beta)
    cos_gamma_star = ((cos_a * cos_b - cos_g) / (sin_a * sin_b)).clamp(-1.0, 1.0)
    sin_gamma_star = torch.sqrt(1.0 - cos_gamma_star**2)
    l1, l2, l3 = lengths.unbind(-1)
    zero = torch.zeros_like(l1)
    a = torch.stack([l1 * sin_b, zero, l1 * cos_b], dim=-1)
    b = torch.stack([-l2 * sin_a * cos_gamma_star, l2 * sin_a * sin_gamma_star, l2 * cos_a], dim=-1)
    c = torch.stack([zero, zero, l3], dim=-1)
    return torch.stack([a, b, c], dim=-2)


def parameters_from_lattice(lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths (Å) and angles (degrees) of a lattice matrix: ``l_k = ‖row k‖``,
    ``φ_k = arccos(⟨row j, row m⟩ / (l_j l_m))`` with ``{j, m}`` the other two rows.

    Args:
        lattice: ``(..., 3, 3)``, rows are lattice vectors.

    Returns:
        ``(lengths, angles)``, each ``(..., 3)``.
    """
    lengths = torch.linalg.vector_norm(lattice, dim=-1)
    angles = []
    for j, m in ((1, 2), (0, 2), (0, 1)):
        cosine = (lattice[..., j, :] * lattice[..., m, :]).sum(-1) / (lengths[..., j] * lengths[..., m])
        angles.append(torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0))))
    return lengths, torch.stack(angles, dim=-1)


def lattice_to_equicsp(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """EquiCSP's lattice coordinates ``C = (log l, tan(φ − π/2)) = (log l, −cot φ)``.

    Args:
        lengths: ``(..., 3)`` in Å.
        angles: ``(..., 3)`` in degrees.

    Returns:
        ``(..., 6)``.
    """
    return torch.cat([torch.log(lengths), torch.tan(torch.deg2rad(angles) - math.pi / 2)], dim=-1)


def equicsp_to_lattice(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`lattice_to_equicsp`: ``l = exp(C[:3])``, ``φ = arctan(C[3:]) + π/2`` (degrees).

    The log-lengths are clamped to ±``LOG_LENGTH_BOUND`` so that the result is always finite.

    Args:
        coords: ``(..., 6)``.

    Returns:
        ``(lengths, angles)``, each ``(..., 3)``; angles in degrees, in (0, 180).
    """
    lengths = torch.exp(coords[..., :3].clamp(-LOG_LENGTH_BOUND, LOG_LENGTH_BOUND))
    angles = torch.rad2deg(torch.arctan(coords[..., 3:]) + math.pi / 2)
    return lengths, angles


def permutation_matrix(perm: tuple[int, int, int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 3×3 matrix ``P`` with ``(P v)_k = v_{perm[k]}`` (so ``L → P L`` relabels the lattice vectors)."""
    matrix = torch.zeros(3, 3, dtype=dtype)
    matrix[torch.arange(3), torch.tensor(perm)] = 1.0
    return matrix


def permute_axes(values: torch.Tensor, perm_index: torch.Tensor) -> torch.Tensor:
    """Relabel lattice axes: ``out[..., k] = values[..., PERMUTATIONS[p][k]]`` row by row.

    Acts on anything indexed by lattice vector: fractional coordinates ``(N, 3)``, lengths or angles
    ``(B, 3)``, or both blocks of EquiCSP's ``C`` when ``values`` is ``(B, 6)``.

    Args:
        values: ``(R, 3)`` or ``(R, 6)``.
        perm_index: ``(R,)`` integer index into :data:`PERMUTATIONS` per row.

    Returns:
        Same shape as ``values``.
    """
    table = torch.tensor(PERMUTATIONS, device=values.device)[perm_index]  # (R, 3)
    if values.shape[-1] == 6:
        table = torch.cat([table, table + 3], dim=-1)
    return torch.gather(values, -1, table)


def inverse_permutation_index(perm_index: torch.Tensor) -> torch.Tensor:
    """Index into :data:`PERMUTATIONS` of the inverse of each permutation in ``perm_index``."""
    inverse = []
    for perm in PERMUTATIONS:
        inv = [0, 0, 0]
        for new, old in enumerate(perm):
            inv[old] = new
        inverse.append(PERMUTATIONS.index(tuple(inv)))
    return torch.tensor(inverse, device=perm_index.device)[perm_index]
