"""Predictor–corrector sampling for CSP (METHOD.md §7), on the full or a sub-sampled time grid (§12.2).

Per step ``t_k → t_{k−1}`` (``t_0 = 0``): a Langevin corrector on the coordinates, then a reverse VE step
for the coordinates and a DDPM ancestral step for the lattice. On a sub-sampled grid every "t − 1" becomes
the previous grid point: the VE step uses ``σ_{t_k}² − σ_{t_{k−1}}²`` and the DDPM step the effective
``α = ᾱ_{t_k}/ᾱ_{t_{k−1}}``; the network still sees the integer ``t_k``. With ``steps = T`` this is
exactly the papers' 1000-step sampler (2000 network evaluations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.lattice import LOG_LENGTH_BOUND, equicsp_to_lattice, parameters_from_lattice
from equicsp_core.network import DenoiserOutput
from equicsp_core.torus import com_free_direction, wrap_unit

#: Default Langevin step scale γ (``step_lr``) of EquiCSP's evaluate script, every dataset.
DEFAULT_STEP_LR = 5e-6


def time_grid(num_steps: int, total_steps: int) -> list[int]:
    """Descending integer times ``t_K > … > t_1 ≥ 1`` (``t_K = T``), ``K = num_steps``, evenly spaced."""
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"steps must be in 1..{total_steps}, got {num_steps}")
    grid = torch.linspace(total_steps, 1, num_steps, dtype=torch.float64).round().long()
    return grid.tolist()


@dataclass
class SampleResult:
    """Sampled crystals as a flat batch, with a validity flag per crystal.

    ``finite`` is False where the lattice diverged (non-finite, or lengths at the clamp bound);
    :meth:`crystals` returns ``None`` for those and for lattices that fail :class:`Crystal` validation.
    """

    batch: CrystalBatch
    finite: torch.Tensor

    def crystals(self) -> list[Crystal | None]:
        out: list[Crystal | None] = []
        b = self.batch
        splits = b.num_atoms.tolist()
        numbers = b.atomic_numbers.cpu().split(splits)
        coords = b.frac_coords.detach().cpu().double().split(splits)
        for i in range(len(splits)):
            if not bool(self.finite[i]):
                out.append(None)
                continue
            try:
                out.append(Crystal(numbers[i], coords[i], b.lengths[i].double().cpu(), b.angles[i].double().cpu()))
            except ValueError:
                out.append(None)
        return out


@torch.inference_mode()
def sample(
    model: CrystalDiffusion,
    atomic_numbers: torch.Tensor,
    num_atoms: torch.Tensor,
    steps: int | None = None,
    step_lr: float = DEFAULT_STEP_LR,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleResult:
    """Sample one structure per composition.

    Args:
        model: a trained :class:`CrystalDiffusion` (its parameters' device and dtype are used).
        atomic_numbers: ``(N,)`` the atoms of all crystals, crystal after crystal.
        num_atoms: ``(B,)`` atoms per crystal.
        steps: number of predictor–corrector steps (default: T, the papers' sampler).
        step_lr: Langevin step scale γ.
        generator: source of all randomness (same seed ⇒ same samples).

    Returns:
        A :class:`SampleResult`; fractional coordinates in [0, 1).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if step_lr < 0:
        raise ValueError(f"step_lr must be >= 0, got {step_lr}")
    atomic_numbers, num_atoms = atomic_numbers.to(device), num_atoms.to(device)
    if num_atoms.numel() == 0 or int(num_atoms.min()) < 1:
        raise ValueError("every crystal needs at least one atom")
    if int(num_atoms.sum()) != atomic_numbers.shape[0]:
        raise ValueError(f"num_atoms sums to {int(num_atoms.sum())} but {atomic_numbers.shape[0]} atoms were given")
    schedules = model.schedules
    total = schedules.num_steps
    grid = time_grid(total if steps is None else steps, total) + [0]
    batch = torch.repeat_interleave(torch.arange(num_atoms.shape[0], device=device), num_atoms)
    graph = model.graph_for(num_atoms)
    randn = lambda shape: torch.randn(shape, generator=generator, device=device, dtype=dtype)  # noqa: E731

    frac = torch.rand((atomic_numbers.shape[0], 3), generator=generator, device=device, dtype=dtype)
    lattice_shape = (num_atoms.shape[0], 6) if model.mode == "equicsp" else (num_atoms.shape[0], 3, 3)
    lattice = randn(lattice_shape)
    sigmas, alpha_bars = schedules.sigmas, schedules.alphas_cumprod
    sigma_begin = float(sigmas[1])

    for t, t_prev in tqdm(list(zip(grid[:-1], grid[1:])), desc="sampling", disable=not progress, leave=False):
        sigma, sigma_prev = float(sigmas[t]), float(sigmas[t_prev])
        time = torch.full((num_atoms.shape[0],), t, device=device, dtype=torch.long)
        last = t_prev == 0
        noise = (lambda shape: torch.zeros(shape, device=device, dtype=dtype)) if last else randn

        def direction(coords: torch.Tensor) -> tuple[torch.Tensor, DenoiserOutput]:
            out = model.denoise(atomic_numbers, coords, lattice, time, num_atoms, batch, graph)
            return _coord_direction(model, out, time, sigma, num_atoms, batch), out

        step = step_lr * (sigma / sigma_begin) ** 2
        d, _ = direction(frac)
        frac_half = frac - step * d + (2 * step) ** 0.5 * noise(frac.shape)

        d, out = direction(frac_half)
        variance_step = sigma**2 - sigma_prev**2
        frac = frac_half - variance_step * d + (sigma_prev**2 * variance_step / sigma**2) ** 0.5 * noise(frac.shape)
        frac = torch.remainder(frac, 1.0)

        alpha_bar, alpha_bar_prev = float(alpha_bars[t]), float(alpha_bars[t_prev])
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha
        posterior_std = (beta * (1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5
        lattice = (lattice - beta / (1 - alpha_bar) ** 0.5 * out.lattice) / alpha**0.5 + posterior_std * noise(lattice_shape)

    if model.mode == "equicsp":
        lengths, angles = equicsp_to_lattice(lattice)
        finite = torch.isfinite(lattice).all(-1) & (lattice[:, :3].abs() < LOG_LENGTH_BOUND).all(-1)
    else:
        lengths, angles = parameters_from_lattice(lattice)
        finite = torch.isfinite(lattice).flatten(1).all(-1)
    finite = finite & torch.isfinite(lengths).all(-1) & torch.isfinite(angles).all(-1)
    frac = wrap_unit(frac)
    result = CrystalBatch(atomic_numbers, frac, lengths, angles, num_atoms, batch)
    return SampleResult(result, finite)


def _coord_direction(
    model: CrystalDiffusion,
    out: DenoiserOutput,
    time: torch.Tensor,
    sigma: float,
    num_atoms: torch.Tensor,
    batch: torch.Tensor,
) -> torch.Tensor:
    """``d ≈ −∇_F log q_t(F)`` from the network output (METHOD.md §7, COORD_DIRECTION)."""
    if model.mode == "diffcsp":
        return out.coord * model.score_norm[time].to(out.coord).sqrt()[batch, None]
    _, kappa_norm, sample_norm = model.tables.lookup(num_atoms, torch.full_like(time, 0, dtype=torch.float64) + sigma)
    neg_score = out.score * kappa_norm.to(out.score).sqrt()[batch, None]
    eps_bar = torch.remainder((out.coord * sample_norm.to(out.coord).sqrt()[batch, None]).clamp(-0.5, 0.5), 1.0)
    return com_free_direction(neg_score, eps_bar, batch, num_atoms)
