"""The joint diffusion over lattices and fractional coordinates, and its training losses (docs/method.md §3, §4, §6).

:class:`CrystalDiffusion` wraps the denoiser with its schedules and normalisers. Two modes:

* ``equicsp``: lattice as C = (log l, −cot φ) under DDPM; coordinates noised with a wrapped normal whose
  targets are CoM-free (translation invariant) with von Mises normalisation; lattice-vector permutation
  handled by ``lattice_perm``:

  - ``"regularised"`` (the paper): a second, permuted branch and the losses L_pC + L_pF;
  - ``"symmetrised"`` (ours, docs/method.md §6.3): ε̂^sym(C, F) = (1/6) Σ_P P⁻¹ ε̂(PC, F Pᵀ), exact;
  - ``"none"``: neither (ablation).

* ``diffcsp``: the baseline; raw lattice matrix under DDPM, wrapped-normal score targets.

With the denoiser's ``task == "generation"`` (ab initio, docs/method.md §7.6) the atom types are diffused too:
the one-hot types A₀ ``(N, 100)`` under the lattice's DDPM schedule, ``A_t = sqrt(ᾱ_t) A₀ + sqrt(1 − ᾱ_t) ε_A``,
the type head predicting ε_A (loss weight ``type_weight``); the regularised treatment adds the invariance of
the type head to lattice-vector permutations (``type_perm_weight``), and the symmetrised one averages it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from equicsp_core import rng
from equicsp_core.crystal import CrystalBatch
from equicsp_core.lattice import (
    PERMUTATIONS,
    inverse_permutation_index,
    lattice_from_parameters,
    lattice_to_equicsp,
    permute_axes,
)
from equicsp_core.network import CSPNet, DenoiserConfig, DenoiserOutput, FullyConnectedGraph, fully_connected_graph
from equicsp_core.schedules import make_schedules
from equicsp_core.torus import TWO_PI, com_free, wrap_centered, wrapped_normal_neg_score, wrapped_normal_score_second_moment
from equicsp_core.vonmises_tables import VonMisesTables, shipped_tables

LatticePerm = Literal["regularised", "symmetrised", "none"]


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion settings (docs/method.md §3, §6; defaults are the papers').

    Attributes:
        num_steps: T.
        sigma_begin, sigma_end: ends of the geometric σ ladder for coordinates.
        lattice_perm: how lattice-vector permutation equivariance is obtained (EquiCSP mode only).
        coord_weight: weight of the coordinate loss (``cost_coord``).
        type_weight: weight of the type loss (``cost_type``; generation task only).
        type_perm_weight: weight of the type head's lattice-permutation invariance loss (``cost_replace_type``;
            generation task, regularised treatment only).
    """

    num_steps: int = 1000
    sigma_begin: float = 0.005
    sigma_end: float = 0.5
    lattice_perm: LatticePerm = "regularised"
    coord_weight: float = 1.0
    type_weight: float = 20.0
    type_perm_weight: float = 20.0

    def __post_init__(self) -> None:
        if self.lattice_perm not in ("regularised", "symmetrised", "none"):
            raise ValueError(f"unknown lattice_perm {self.lattice_perm!r}")
        for name in ("coord_weight", "type_weight", "type_perm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class CrystalDiffusion(nn.Module):
    """Denoiser plus everything needed to train it and sample from it.

    Only the denoiser's parameters are state; schedules and tables are rebuilt from the configs.
    """

    def __init__(
        self,
        denoiser: DenoiserConfig | None = None,
        diffusion: DiffusionConfig | None = None,
        tables: VonMisesTables | None = None,
    ) -> None:
        super().__init__()
        self.denoiser_config = denoiser or DenoiserConfig()
        self.config = diffusion or DiffusionConfig()
        if self.denoiser_config.mode == "diffcsp" and self.config.lattice_perm != "none":
            raise ValueError("the DiffCSP baseline has no lattice-permutation treatment: use lattice_perm='none'")
        self.net = CSPNet(self.denoiser_config)
        schedules = make_schedules(self.config.num_steps, self.config.sigma_begin, self.config.sigma_end)
        self.schedules = schedules
        if self.mode == "equicsp":
            self.tables = tables or shipped_tables()
            # Fail now, not mid-training, if the ladder leaves the tables' σ range.
            self.tables.lookup(torch.tensor([2]), schedules.sigmas[1:])
        else:
            second_moment = wrapped_normal_score_second_moment(schedules.sigmas[1:])
            self.register_buffer("score_norm", torch.cat([torch.ones(1, dtype=torch.float64), second_moment]), persistent=False)

    @property
    def mode(self) -> str:
        return self.denoiser_config.mode

    @property
    def task(self) -> str:
        """``"csp"`` (types given) or ``"generation"`` (types diffused too)."""
        return self.denoiser_config.task

    # ------------------------------------------------------------------------------------------------
    # The (optionally symmetrised) denoiser

    def graph_for(self, num_atoms: torch.Tensor) -> FullyConnectedGraph:
        """Graph of the batch the network actually sees (six copies when symmetrised)."""
        copies = len(PERMUTATIONS) if self.config.lattice_perm == "symmetrised" and self.mode == "equicsp" else 1
        return fully_connected_graph(num_atoms.repeat(copies))

    def denoise(
        self,
        atoms: torch.Tensor,
        frac_coords: torch.Tensor,
        lattice: torch.Tensor,
        t: torch.Tensor,
        num_atoms: torch.Tensor,
        batch: torch.Tensor,
        graph: FullyConnectedGraph | None = None,
    ) -> DenoiserOutput:
        """The network's prediction, symmetrised over S₃ when ``lattice_perm == "symmetrised"``.

        Shapes as :meth:`equicsp_core.network.CSPNet.forward`; ``graph`` from :meth:`graph_for`. The type output
        (generation) is invariant, so its six copies are averaged as they are.
        """
        if self.config.lattice_perm != "symmetrised" or self.mode != "equicsp":
            return self.net(atoms, frac_coords, lattice, t, num_atoms, batch, graph)
        copies, num_crystals, num = len(PERMUTATIONS), num_atoms.shape[0], atoms.shape[0]
        crystal_perm = torch.arange(copies, device=lattice.device).repeat_interleave(num_crystals)
        atom_perm = torch.arange(copies, device=lattice.device).repeat_interleave(num)
        out = self.net(
            _tile(atoms, copies),
            permute_axes(frac_coords.repeat(copies, 1), atom_perm),
            permute_axes(lattice.repeat(copies, 1), crystal_perm),
            t.repeat(copies),
            num_atoms.repeat(copies),
            (batch[None] + num_crystals * torch.arange(copies, device=batch.device)[:, None]).reshape(-1),
            graph,
        )
        unpermute = lambda x, perm: permute_axes(x, inverse_permutation_index(perm)).reshape(copies, -1, x.shape[-1]).mean(0)  # noqa: E731
        types = None if out.types is None else out.types.reshape(copies, num, -1).mean(0)
        return DenoiserOutput(unpermute(out.lattice, crystal_perm), unpermute(out.coord, atom_perm),
                              unpermute(out.score, atom_perm), types)

    # ------------------------------------------------------------------------------------------------
    # Training

    def loss(self, crystals: CrystalBatch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One stochastic evaluation of the training loss (docs/method.md §6.1, §6.2).

        All randomness (t, noise, permutations) comes from ``generator``, so a run is reproducible; a CPU
        generator draws the same numbers whatever device the batch is on (:mod:`equicsp_core.rng`).

        Returns:
            ``{"loss": total, ...}`` with the individual terms (detached) for logging.
        """
        if self.mode == "equicsp":
            return self._equicsp_loss(crystals, generator)
        return self._diffcsp_loss(crystals, generator)

    def _draw(
        self, crystals: CrystalBatch, lattice_dims: tuple[int, ...], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Time steps ``(B,)``, lattice noise ``(B, *lattice_dims)`` and coordinate noise ``z`` ``(N, 3)``."""
        device, dtype = crystals.frac_coords.device, crystals.frac_coords.dtype
        num_crystals = crystals.num_crystals
        t = rng.randint(1, self.config.num_steps + 1, (num_crystals,), generator, device)
        lattice_noise = rng.randn((num_crystals, *lattice_dims), generator, device, dtype)
        z = rng.randn(crystals.frac_coords.shape, generator, device, dtype)
        return t, lattice_noise, z

    def _noisy_lattice(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.schedules.alphas_cumprod.to(clean)[t].reshape(-1, *([1] * (clean.dim() - 1)))
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def _network_atoms(
        self, crystals: CrystalBatch, t: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the network gets for the atoms, and the type noise it must predict.

        CSP: the atomic numbers ``(N,)`` and ``None`` (nothing drawn). Generation: the noisy one-hot types
        ``A_t = sqrt(ᾱ_t) A₀ + sqrt(1 − ᾱ_t) ε_A`` ``(N, num_elements)`` at the crystal's t, and ε_A, drawn from
        ``generator`` after the draws of :meth:`_draw`.
        """
        if self.task == "csp":
            return crystals.atomic_numbers, None
        dtype = crystals.frac_coords.dtype
        one_hot = F.one_hot(crystals.atomic_numbers - 1, self.denoiser_config.num_elements).to(dtype)
        noise = rng.randn(one_hot.shape, generator, one_hot.device, dtype)
        return self._noisy_lattice(one_hot, noise, t[crystals.batch]), noise

    def _equicsp_loss(self, crystals: CrystalBatch, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        batch, num_atoms = crystals.batch, crystals.num_atoms
        t, lattice_noise, z = self._draw(crystals, (6,), generator)
        lattice_t = self._noisy_lattice(lattice_to_equicsp(crystals.lengths, crystals.angles), lattice_noise, t)
        sigma = self.schedules.sigmas.to(z)[t]
        eps = sigma[batch, None] * z
        frac_t = torch.remainder(crystals.frac_coords + eps, 1.0)
        atoms, type_noise = self._network_atoms(crystals, t, generator)

        terms: dict[str, torch.Tensor] = {}
        if self.config.lattice_perm == "regularised":
            perm = rng.randint(1, len(PERMUTATIONS), (crystals.num_crystals,), generator, t.device)
            both = self.net(
                _tile(atoms, 2),
                torch.cat([frac_t, permute_axes(frac_t, perm[batch])]),
                torch.cat([lattice_t, permute_axes(lattice_t, perm)]),
                t.repeat(2),
                num_atoms.repeat(2),
                torch.cat([batch, batch + crystals.num_crystals]),
            )
            split = lambda x: (None, None) if x is None else x.split(x.shape[0] // 2)  # noqa: E731
            (lattice_out, lattice_perm_out), (coord, coord_perm), (score, score_perm), (types, types_perm) = map(split, both)
            out = DenoiserOutput(lattice_out, coord, score, types)
            terms["perm_lattice"] = F.mse_loss(lattice_perm_out, permute_axes(lattice_out, perm))
            terms["perm_coord"] = F.mse_loss(coord_perm, permute_axes(coord, perm[batch])) + F.mse_loss(
                score_perm, permute_axes(score, perm[batch])
            )
            if types is not None:  # the types do not depend on the ordering of the lattice vectors
                terms["perm_type"] = self.config.type_perm_weight * F.mse_loss(types_perm, types)
        else:
            out = self.denoise(atoms, frac_t, lattice_t, t, num_atoms, batch, self.graph_for(num_atoms))

        kappa, kappa_norm, sample_norm = self.tables.lookup(num_atoms, sigma)
        eps_bar = com_free(eps, batch, num_atoms)
        multi = (num_atoms > 1)[batch]  # ε̄ ≡ 0 for one atom: no coordinate target (docs/method.md §10.1)
        safe = lambda x: torch.where(x > 0, x, torch.ones_like(x)).to(z)  # noqa: E731
        target_coord = wrap_centered(eps_bar) / safe(sample_norm).sqrt()[batch, None]
        target_score = (TWO_PI * kappa.to(z))[batch, None] * torch.sin(TWO_PI * eps_bar) / safe(kappa_norm).sqrt()[batch, None]
        terms["lattice"] = F.mse_loss(out.lattice, lattice_noise)
        terms["coord"] = self.config.coord_weight * _masked_mse(out.coord, target_coord, multi)
        terms["score"] = _masked_mse(out.score, target_score, multi)
        self._type_term(terms, out, type_noise)
        return self._total(terms)

    def _diffcsp_loss(self, crystals: CrystalBatch, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        batch = crystals.batch
        t, lattice_noise, z = self._draw(crystals, (3, 3), generator)
        lattice_t = self._noisy_lattice(lattice_from_parameters(crystals.lengths, crystals.angles), lattice_noise, t)
        sigma = self.schedules.sigmas.to(z)[t][batch, None]
        frac_t = torch.remainder(crystals.frac_coords + sigma * z, 1.0)
        atoms, type_noise = self._network_atoms(crystals, t, generator)
        out = self.net(atoms, frac_t, lattice_t, t, crystals.num_atoms, batch)
        target = wrapped_normal_neg_score(sigma * z, sigma.expand_as(z)) / self.score_norm.to(z)[t][batch, None].sqrt()
        terms = {
            "lattice": F.mse_loss(out.lattice, lattice_noise),
            "coord": self.config.coord_weight * F.mse_loss(out.coord, target),
        }
        self._type_term(terms, out, type_noise)
        return self._total(terms)

    def _type_term(self, terms: dict[str, torch.Tensor], out: DenoiserOutput, type_noise: torch.Tensor | None) -> None:
        """Add ``type = type_weight · MSE(ε̂_A, ε_A)`` to ``terms`` (generation task; nothing for CSP)."""
        if type_noise is not None:
            terms["type"] = self.config.type_weight * F.mse_loss(out.types, type_noise)

    @staticmethod
    def _total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        total = sum(terms.values())
        return {"loss": total, **{name: value.detach() for name, value in terms.items()}}


def symmetrised(model: CrystalDiffusion) -> CrystalDiffusion:
    """The same weights behind the exactly lattice-permutation-equivariant denoiser (docs/method.md §6.3).

    For a model trained with ``"regularised"`` (which only approximates the symmetry), sampling with the
    returned twin averages every denoiser call over the six orderings of the lattice vectors:
    ε̂^sym(C, F) = (1/6) Σ_P P⁻¹ ε̂(PC, F Pᵀ), at six times the network cost. The twin shares ``model.net``.
    """
    if model.mode != "equicsp":
        raise ValueError("only the EquiCSP denoiser can be symmetrised over lattice-vector orderings")
    twin = CrystalDiffusion(model.denoiser_config, replace(model.config, lattice_perm="symmetrised"), model.tables)
    twin.net = model.net
    return twin.train(model.training)


@torch.no_grad()
def lattice_permutation_error(model: CrystalDiffusion, crystals: CrystalBatch,
                              generator: torch.Generator | None = None) -> dict[str, float]:
    """How far the denoiser is from lattice-permutation equivariance on noised ``crystals``.

    At a random t per crystal, for each of the five non-identity orderings P the relative change
    ‖P⁻¹ ε̂(PC_t, F_t Pᵀ) − ε̂(C_t, F_t)‖ / ‖ε̂(C_t, F_t)‖, over the batch, of the lattice output and of the
    coordinate outputs (coord and score heads together); averaged over the orderings. For a generation model
    also ``"types"``: ‖ε̂_A(PC_t, F_t Pᵀ) − ε̂_A(C_t, F_t)‖ / ‖ε̂_A(C_t, F_t)‖ (the type head is invariant). An
    exactly equivariant denoiser gives 0 (up to rounding).
    """
    if model.mode != "equicsp":
        raise ValueError("the lattice-permutation error is defined for the EquiCSP denoiser")
    batch, num_atoms = crystals.batch, crystals.num_atoms
    atoms, frac_t, lattice_t, t, graph = _noised(model, crystals, generator)
    reference = model.denoise(atoms, frac_t, lattice_t, t, num_atoms, batch, graph)
    lattice_errors, coord_errors, type_errors = [], [], []
    for index in range(1, len(PERMUTATIONS)):
        perm = torch.full((crystals.num_crystals,), index, device=t.device)
        out = model.denoise(atoms, permute_axes(frac_t, perm[batch]), permute_axes(lattice_t, perm),
                            t, num_atoms, batch, graph)
        back = lambda x, p: permute_axes(x, inverse_permutation_index(p))  # noqa: E731
        lattice_errors.append((back(out.lattice, perm) - reference.lattice).norm() / reference.lattice.norm())
        moved = torch.cat([back(out.coord, perm[batch]), back(out.score, perm[batch])])
        still = torch.cat([reference.coord, reference.score])
        coord_errors.append((moved - still).norm() / still.norm())
        if reference.types is not None:
            type_errors.append((out.types - reference.types).norm() / reference.types.norm())
    errors = {"lattice": lattice_errors, "coord": coord_errors, "types": type_errors}
    return {name: float(torch.stack(values).mean()) for name, values in errors.items() if values}


def output_change(model: CrystalDiffusion, other: CrystalDiffusion, crystals: CrystalBatch,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """How far ``other``'s denoiser outputs lie from ``model``'s (the same network, e.g. with rounded weights) on
    noised ``crystals``: at a random t per crystal, ‖ε̂'(C_t, F_t) − ε̂(C_t, F_t)‖ / ‖ε̂(C_t, F_t)‖ over the batch, of
    the lattice output and of the coordinate outputs (coord and score heads together); also ``"types"`` for a
    generation model."""
    batch, num_atoms = crystals.batch, crystals.num_atoms
    atoms, frac_t, lattice_t, t, graph = _noised(model, crystals, generator)
    first = model.denoise(atoms, frac_t, lattice_t, t, num_atoms, batch, graph)
    second = other.denoise(atoms, frac_t, lattice_t, t, num_atoms, batch, graph)

    def change(new: torch.Tensor, old: torch.Tensor) -> float:
        return float((new - old).norm() / old.norm())

    changes = {"lattice": change(second.lattice, first.lattice),
               "coord": change(torch.cat([second.coord, second.score]), torch.cat([first.coord, first.score]))}
    if first.types is not None:
        changes["types"] = change(second.types, first.types)
    return changes


def _noised(model: CrystalDiffusion, crystals: CrystalBatch, generator: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, FullyConnectedGraph]:
    """The denoiser's inputs for ``crystals`` noised at a random t per crystal, as in training: ``(atoms, F_t
    (N, 3), C_t (B, 6), t (B,), graph)``."""
    t, lattice_noise, z = model._draw(crystals, (6,), generator)
    lattice_t = model._noisy_lattice(lattice_to_equicsp(crystals.lengths, crystals.angles), lattice_noise, t)
    frac_t = torch.remainder(crystals.frac_coords + model.schedules.sigmas.to(z)[t][crystals.batch, None] * z, 1.0)
    atoms, _ = model._network_atoms(crystals, t, generator)
    return atoms, frac_t, lattice_t, t, model.graph_for(crystals.num_atoms)


def _tile(atoms: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` copies of the atoms' rows one after the other: ``(copies·N,)`` or ``(copies·N, num_elements)``."""
    return atoms.repeat(copies, *([1] * (atoms.dim() - 1)))


def _masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the rows where ``mask`` holds; 0 (not NaN) when no row does."""
    squared = (prediction - target).square()[mask]
    return squared.sum() / max(squared.numel(), 1)
