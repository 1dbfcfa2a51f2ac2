"""Noise schedules and the time embedding (docs/method.md §3).

Time steps are integers ``t ∈ {0, …, T}``; every table below has ``T + 1`` entries and index 0 is the
clean state (``ᾱ_0 = 1``, ``σ_0 = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedules:
    """DDPM lattice schedule and the variance-exploding coordinate schedule on one time grid.

    Attributes:
        betas: ``(T+1,)`` β_t, clipped to [1e-4, 0.9999]; β_0 = 0.
        alphas: ``(T+1,)`` α_t = 1 − β_t.
        alphas_cumprod: ``(T+1,)`` ᾱ_t = Π_{k≤t} α_k (from the clipped betas); ᾱ_0 = 1.
        sigmas: ``(T+1,)`` σ_t, geometric from σ_begin (t = 1) to σ_end (t = T); σ_0 = 0.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0]) - 1


def make_schedules(
    num_steps: int = 1000, sigma_begin: float = 0.005, sigma_end: float = 0.5, cosine_s: float = 0.008
) -> Schedules:
    """Cosine schedule (Nichol & Dhariwal) for the lattice and a geometric σ ladder for coordinates.

    ``ᾱ(k) = cos²(((k/T) + s)/(1 + s) · π/2) / cos²(s/(1 + s) · π/2)``,
    ``β_t = clip(1 − ᾱ(t)/ᾱ(t−1), 1e-4, 0.9999)``, then ``ᾱ_t = Π_{k≤t}(1 − β_k)``;
    ``σ_t = exp(linspace(log σ_begin, log σ_end, T))[t − 1]``. All float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_begin < sigma_end:
        raise ValueError(f"need 0 < sigma_begin < sigma_end, got {sigma_begin}, {sigma_end}")
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    f = torch.cos(((k / num_steps) + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], 1e-4, 0.9999)
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
    alphas = 1 - betas
    sigmas = torch.exp(torch.linspace(math.log(sigma_begin), math.log(sigma_end), num_steps, dtype=torch.float64))
    sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), sigmas])
    return Schedules(betas=betas, alphas=alphas, alphas_cumprod=torch.cumprod(alphas, 0), sigmas=sigmas)


def time_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer time steps.

    ``freq_k = exp(−k ln(10000)/(dim/2 − 1))``, ``k = 0 … dim/2 − 1``; ``emb = [sin(t·freq), cos(t·freq)]``.

    Args:
        t: ``(B,)`` integer (or float) time steps.

    Returns:
        ``(B, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
