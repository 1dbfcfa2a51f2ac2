"""Predictor–corrector sampling (docs/method.md §7), on the full or a sub-sampled time grid (§7.3): CSP
(:func:`sample` given the atom types) and ab initio generation (:func:`sample` without them: types
diffused too, §7.6).

Per step ``t_k → t_{k−1}`` (``t_0 = 0``): a Langevin corrector on the coordinates, then a reverse VE step
for the coordinates and a DDPM ancestral step for the lattice. On a sub-sampled grid every "t − 1" becomes
the previous grid point: the VE step uses ``σ_{t_k}² − σ_{t_{k−1}}²`` and the DDPM step the effective
``α = ᾱ_{t_k}/ᾱ_{t_{k−1}}``; the network still sees the integer ``t_k``. With ``steps = T`` this is
exactly the papers' 1000-step sampler (2000 network evaluations). In generation the one-hot types take the
lattice's DDPM step in the predictor (the corrector leaves them, as it leaves the lattice) and become
atomic numbers as ``argmax + 1`` at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from equicsp_core import rng
from equicsp_core.checkpoint import require_task
from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.diffusion import CrystalDiffusion
from equicsp_core.hardware import warn_if_bf16_slow
from equicsp_core.lattice import (
    LOG_LENGTH_BOUND,
    equicsp_to_lattice,
    lattice_from_parameters,
    lattice_to_equicsp,
    parameters_from_lattice,
)
from equicsp_core.network import DenoiserOutput
from equicsp_core.settings import DEFAULT_STEP_LR
from equicsp_core.torus import com_free_direction, wrap_unit

#: Bound on the predicted clean lattice x̂₀ per mode: EquiCSP's C (log-lengths and −cot angles; ±7 is
#: 1 mÅ–1 km and 8°–172°), DiffCSP's matrix entries in Å.
LATTICE_X0_BOUND = {"equicsp": 7.0, "diffcsp": 1000.0}

#: Below this sum the kept components of a predicted Â₀ count as empty (generation restricted to some elements).
SIMPLEX_EPS = 1e-6
#: Bound on the predicted clean one-hot types Â₀ (ours, as the lattice's): a one-hot entry is 0 or 1.
TYPES_X0_BOUND = 1.0


def resolved_lattice_bound(mode: str, lattice_bound: float | None) -> float:
    """The clamp the sampler applies to the predicted clean lattice: ``lattice_bound``, or the mode's
    (:data:`LATTICE_X0_BOUND`) when it is ``None``."""
    return LATTICE_X0_BOUND[mode] if lattice_bound is None else lattice_bound


def time_grid(num_steps: int, total_steps: int, power: float = 1.0) -> list[int]:
    """Descending integer times ``t_K > … > t_1 = 1`` (``t_K = T``; one step: ``[T]``), ``K = num_steps``.

    ``t_k = 1 + (T − 1) · ((k − 1)/(K − 1))^power`` rounded: ``power = 1`` spaces them evenly (the default),
    ``power > 1`` puts more of them at small t, where the structure takes its final shape. Where rounding
    would repeat a time, the grid climbs by one instead, so it always has ``K`` distinct times.
    """
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"steps must be in 1..{total_steps}, got {num_steps}")
    if not (math.isfinite(power) and power >= 1):
        raise ValueError(f"the time grid's power must be a finite number >= 1, got {power}")
    if num_steps == 1:
        return [total_steps]
    fraction = torch.linspace(0, 1, num_steps, dtype=torch.float64) ** power
    ascending = (1 + (total_steps - 1) * fraction).round().long().tolist()
    for k in range(1, num_steps):
        ascending[k] = max(ascending[k], ascending[k - 1] + 1)
    return ascending[::-1]


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
    atomic_numbers: torch.Tensor | None,
    num_atoms: torch.Tensor,
    steps: int | None = None,
    step_lr: float = DEFAULT_STEP_LR,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lattice_bound: float | None = None,
    precision: str = "fp32",
    grid_power: float = 1.0,
    start: CrystalBatch | None = None,
    start_step: int | None = None,
    elements: Sequence[int] | None = None,
) -> SampleResult:
    """Sample one structure per composition (CSP), or generate whole crystals (ab initio).

    Args:
        model: a trained :class:`CrystalDiffusion` (its parameters' device and dtype are used).
        atomic_numbers: ``(N,)`` the atoms of all crystals, crystal after crystal, for a CSP model; ``None`` for a
            generation model, which draws them (docs/method.md §7.6): the types start as ``N(0, I)`` vectors
            ``(N, num_elements)`` and end as ``argmax + 1``.
        num_atoms: ``(B,)`` atoms per crystal.
        steps: number of predictor–corrector steps (default: T, the papers' sampler).
        step_lr: Langevin step scale γ.
        generator: source of all randomness (same seed ⇒ same samples); a CPU generator gives the same noise on
            any device, so a GPU run differs from a CPU run of the same seed only by arithmetic
            (:mod:`equicsp_core.rng`).
        lattice_bound: clamp the lattice's predicted clean value x̂₀ to ±bound in the DDPM step (ours, see
            :func:`_ddpm_step`); ``None`` takes :data:`LATTICE_X0_BOUND` of the model's mode,
            ``math.inf`` gives the papers' unclamped update.
        precision: ``"fp32"``, or ``"bf16"`` to run the network under bf16 autocast (the sampler's own
            arithmetic stays in the model's dtype); worth it on CPUs with native bf16 and on GPUs.
        grid_power: spacing of a sub-sampled time grid (:func:`time_grid`; 1 = even, the papers').
        start: CSP only: crystals to re-noise and denoise again instead of starting from the prior (SDEdit,
            Meng et al. 2022): their coordinates and lattices are noised to ``start_step`` as in training
            (:func:`noised_start`) and the reverse process runs from there, ``steps`` steps on the grid
            ``start_step → 1``; their atoms must be ``atomic_numbers`` and ``num_atoms``.
        start_step: the time ``t₀`` in 1..T the ``start`` crystals are noised to (required with ``start``).
        elements: generation only: the atomic numbers the crystals may hold (a chemical system; ``None``, or every
            element of the model: any). Each step's predicted clean types Â₀ are projected onto the simplex of
            these elements' one-hot vectors (:func:`_ddpm_step`) before the DDPM step, and the final argmax runs
            over them only. A projection of the prediction, not a retrained conditional model: how well the
            unconditional model's structures suit a system is measured, not implied (BENCHMARKS.md).

    Returns:
        A :class:`SampleResult`; fractional coordinates in [0, 1).

    Raises:
        CheckpointError: atom types given to a generation model, or none to a CSP model.
        ValueError: ``elements`` with atom types, empty, or beyond the model's element count.
    """
    require_task(model, "csp" if atomic_numbers is not None else "generation")
    allowed = _allowed_types(model, elements, atomic_numbers is not None)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if step_lr < 0:
        raise ValueError(f"step_lr must be >= 0, got {step_lr}")
    num_atoms = num_atoms.to(device)
    if atomic_numbers is not None:
        atomic_numbers = atomic_numbers.to(device)  # once, not in each of the 2 × steps network calls
    if num_atoms.numel() == 0 or int(num_atoms.min()) < 1:
        raise ValueError("every crystal needs at least one atom")
    if atomic_numbers is not None and int(num_atoms.sum()) != atomic_numbers.shape[0]:
        raise ValueError(f"num_atoms sums to {int(num_atoms.sum())} but {atomic_numbers.shape[0]} atoms were given")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16":
        warn_if_bf16_slow(device, "precision")
    schedules = model.schedules
    _check_start(start, start_step, atomic_numbers, num_atoms, schedules.num_steps)
    lattice_bound = resolved_lattice_bound(model.mode, lattice_bound)
    first = schedules.num_steps if start is None else start_step
    grid = time_grid(first if steps is None else steps, first, grid_power) + [0]
    batch = torch.repeat_interleave(torch.arange(num_atoms.shape[0], device=device), num_atoms)
    graph = model.graph_for(num_atoms)
    randn = lambda shape: rng.randn(shape, generator, device, dtype)  # noqa: E731

    lattice_shape = (num_atoms.shape[0], 6) if model.mode == "equicsp" else (num_atoms.shape[0], 3, 3)
    if start is None:
        frac = rng.rand((int(num_atoms.sum()), 3), generator, device, dtype)
        lattice = randn(lattice_shape)
    else:
        frac, lattice = noised_start(model, start, first, generator)
    types = randn((frac.shape[0], model.denoiser_config.num_elements)) if atomic_numbers is None else None
    allowed = None if allowed is None else allowed.to(device)
    sigmas, alpha_bars = schedules.sigmas, schedules.alphas_cumprod
    sigma_begin = float(sigmas[1])

    def direction(
        coords: torch.Tensor, lattice: torch.Tensor, time: torch.Tensor, sigma: float
    ) -> tuple[torch.Tensor, DenoiserOutput]:
        atoms = atomic_numbers if types is None else types
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.denoise(atoms, coords, lattice, time, num_atoms, batch, graph)
        out = DenoiserOutput(*(None if x is None else x.to(dtype) for x in out))
        return _coord_direction(model, out, time, sigma, num_atoms, batch), out

    for t, t_prev in tqdm(list(zip(grid[:-1], grid[1:])), desc="sampling", disable=not progress, leave=False):
        sigma, sigma_prev = float(sigmas[t]), float(sigmas[t_prev])
        time = torch.full((num_atoms.shape[0],), t, device=device, dtype=torch.long)
        last = t_prev == 0
        noise = (lambda shape: torch.zeros(shape, device=device, dtype=dtype)) if last else randn

        step = step_lr * (sigma / sigma_begin) ** 2
        d, _ = direction(frac, lattice, time, sigma)
        frac_half = frac - step * d + (2 * step) ** 0.5 * noise(frac.shape)

        d, out = direction(frac_half, lattice, time, sigma)
        variance_step = sigma**2 - sigma_prev**2
        frac = frac_half - variance_step * d + (sigma_prev**2 * variance_step / sigma**2) ** 0.5 * noise(frac.shape)
        frac = torch.remainder(frac, 1.0)

        alpha_bar, alpha_bar_prev = float(alpha_bars[t]), float(alpha_bars[t_prev])
        lattice = _ddpm_step(lattice, out.lattice, alpha_bar, alpha_bar_prev, lattice_bound)
        lattice = lattice + _posterior_std(alpha_bar, alpha_bar_prev) * noise(lattice_shape)
        if types is not None:
            types = _ddpm_step(types, out.types, alpha_bar, alpha_bar_prev, TYPES_X0_BOUND, keep=allowed)
            types = types + _posterior_std(alpha_bar, alpha_bar_prev) * noise(types.shape)

    if model.mode == "equicsp":
        lengths, angles = equicsp_to_lattice(lattice)
        finite = torch.isfinite(lattice).all(-1) & (lattice[:, :3].abs() < LOG_LENGTH_BOUND).all(-1)
    else:
        lengths, angles = parameters_from_lattice(lattice)
        finite = torch.isfinite(lattice).flatten(1).all(-1)
    finite = finite & torch.isfinite(lengths).all(-1) & torch.isfinite(angles).all(-1)
    frac = wrap_unit(frac)
    if types is not None:
        atomic_numbers = (types if allowed is None else types.masked_fill(~allowed, -math.inf)).argmax(-1) + 1
    result = CrystalBatch(atomic_numbers, frac, lengths, angles, num_atoms, batch)
    return SampleResult(result, finite)


def noised_start(
    model: CrystalDiffusion, start: CrystalBatch, start_step: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process at ``t₀ = start_step`` from ``start``, as training draws it: ``F_t₀ = F₀ + σ_t₀ z`` (mod 1)
    ``(N, 3)`` and ``C_t₀ = sqrt(ᾱ_t₀) C₀ + sqrt(1 − ᾱ_t₀) ε`` (EquiCSP's ``C`` ``(B, 6)``, DiffCSP's matrix
    ``(B, 3, 3)``), on the model's device and dtype; the coordinate noise is drawn first, then the lattice's."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    sigma = float(model.schedules.sigmas[start_step])
    lengths, angles = start.lengths.to(device, torch.float64), start.angles.to(device, torch.float64)
    clean = lattice_to_equicsp(lengths, angles) if model.mode == "equicsp" else lattice_from_parameters(lengths, angles)
    frac = torch.remainder(start.frac_coords.to(device, dtype) + sigma * rng.randn(start.frac_coords.shape, generator,
                                                                                   device, dtype), 1.0)
    noise = rng.randn(clean.shape, generator, device, dtype)
    time = torch.full((clean.shape[0],), start_step, device=device, dtype=torch.long)
    return frac, model._noisy_lattice(clean.to(dtype), noise, time)


def _check_start(start: CrystalBatch | None, start_step: int | None, atomic_numbers: torch.Tensor | None,
                 num_atoms: torch.Tensor, total_steps: int) -> None:
    """Refuse a ``start_step`` without ``start`` crystals, and ``start`` crystals without a time in 1..T or with
    other atoms than those being sampled (CSP)."""
    if start is None:
        if start_step is not None:
            raise ValueError("start_step is the time the start crystals are noised to: give start crystals too")
        return
    if start_step is None or not 1 <= start_step <= total_steps:
        raise ValueError(f"start_step must be a time in 1..{total_steps} with start crystals, got {start_step}")
    if atomic_numbers is None:
        raise ValueError("start crystals are for structure prediction (CSP): a generation model draws the atoms")
    same = torch.equal(start.num_atoms.cpu(), num_atoms.cpu()) and torch.equal(
        start.atomic_numbers.cpu(), atomic_numbers.cpu())
    if not same:
        raise ValueError("the start crystals' atoms differ from atomic_numbers / num_atoms")


def _coord_direction(
    model: CrystalDiffusion,
    out: DenoiserOutput,
    time: torch.Tensor,
    sigma: float,
    num_atoms: torch.Tensor,
    batch: torch.Tensor,
) -> torch.Tensor:
    """``d ≈ −∇_F log q_t(F)`` from the network output (docs/method.md §7.2)."""
    if model.mode == "diffcsp":
        return out.coord * model.score_norm[time].to(out.coord).sqrt()[batch, None]
    _, kappa_norm, sample_norm = model.tables.lookup(num_atoms, torch.full_like(time, 0, dtype=torch.float64) + sigma)
    neg_score = out.score * kappa_norm.to(out.score).sqrt()[batch, None]
    eps_bar = torch.remainder((out.coord * sample_norm.to(out.coord).sqrt()[batch, None]).clamp(-0.5, 0.5), 1.0)
    return com_free_direction(neg_score, eps_bar, batch, num_atoms)


def _allowed_types(model: CrystalDiffusion, elements: Sequence[int] | None, csp: bool) -> torch.Tensor | None:
    """``(num_elements,)`` bool: the type components ``elements`` allow (component ``Z − 1``), ``None`` for any."""
    if elements is None:
        return None
    if csp:
        raise ValueError("elements restrict generation; a CSP model is given the atoms themselves")
    count = model.denoiser_config.num_elements
    if not elements or any(not 1 <= int(z) <= count for z in elements):
        raise ValueError(f"elements must be atomic numbers 1..{count} of the model, got {list(elements)}")
    allowed = torch.zeros(count, dtype=torch.bool)
    allowed[torch.tensor([int(z) - 1 for z in elements])] = True
    return None if bool(allowed.all()) else allowed


def _ddpm_step(
    lattice: torch.Tensor, noise_pred: torch.Tensor, alpha_bar: float, alpha_bar_prev: float, bound: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior mean of the DDPM step ``t → t_prev`` (any gap), through the predicted clean lattice (or the
    predicted clean one-hot types, generation).

    ``x̂₀ = (x_t − sqrt(1 − ᾱ_t) ε̂)/sqrt(ᾱ_t)``, clamped to ±bound, then
    ``μ = sqrt(ᾱ_prev) β/(1 − ᾱ_t) · x̂₀ + sqrt(α)(1 − ᾱ_prev)/(1 − ᾱ_t) · x_t`` with ``α = ᾱ_t/ᾱ_prev``,
    ``β = 1 − α``. Unclamped this equals the papers' ``(x_t − β/sqrt(1 − ᾱ_t) ε̂)/sqrt(α)``. The clamp is
    ours: near t = T, ᾱ_t is ~1e-10, so a jump of several steps multiplies the error of ε̂ by
    ``1/sqrt(α)`` (≈ 1000 for T → T − 10) and the lattice diverges; a bounded x̂₀ prevents that. ``keep``
    (bool, broadcast over the last axis; generation restricted to some elements): x̂₀ is projected onto the
    probability simplex of the kept components (negative entries and the others set to 0, the rest divided by
    their sum; uniform where nothing is left), so that it stays a mixture of one-hot vectors the network knows
    rather than a vector near 0.
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    clean = ((lattice - (1 - alpha_bar) ** 0.5 * noise_pred) / alpha_bar**0.5).clamp(-bound, bound)
    if keep is not None:
        clean = clean.clamp(min=0) * keep
        total = clean.sum(-1, keepdim=True)
        uniform = keep.to(clean.dtype) / keep.sum()
        clean = torch.where(total > SIMPLEX_EPS, clean / total.clamp(min=SIMPLEX_EPS), uniform)
    return (alpha_bar_prev**0.5 * beta * clean + alpha**0.5 * (1 - alpha_bar_prev) * lattice) / (1 - alpha_bar)


def _posterior_std(alpha_bar: float, alpha_bar_prev: float) -> float:
    """``σ̃ = sqrt(β (1 − ᾱ_prev)/(1 − ᾱ_t))`` of the step ``t → t_prev``."""
    beta = 1 - alpha_bar / alpha_bar_prev
    return (beta * (1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5
