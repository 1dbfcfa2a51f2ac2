"""Noise on the 3-torus of fractional coordinates (docs/method.md §3.2, §4.1, §4.2, §4.5).

Two noise models:

* DiffCSP: wrapped normal; the training target is its negative score ``g_wn`` (not a function of the
  network input, because it depends on the common translation of the noise).
* EquiCSP: the same noise with its periodic centre of mass removed, ``ε̄ = m(ε)``, so targets are
  translation invariant; the score of ``F_t`` is recovered with the chain rule (:func:`com_free_direction`).

All per-crystal quantities are per axis: shapes ``(B, 3)`` for crystals, ``(N, 3)`` for atoms.
"""

from __future__ import annotations

import math

import torch

from equicsp_core.segment import segment_sum

TWO_PI = 2.0 * math.pi

#: Lower bound on the resultant length R of the circular mean (docs/method.md §10.2).
MIN_RESULTANT = 1e-6


def wrap_unit(x: torch.Tensor) -> torch.Tensor:
    """``x mod 1`` in [0, 1): ``torch.remainder`` of a tiny negative float rounds to exactly 1, mapped to 0."""
    r = torch.remainder(x, 1.0)
    return torch.where(r >= 1.0, torch.zeros_like(r), r)


def wrap_centered(x: torch.Tensor) -> torch.Tensor:
    """``w(x mod 1)``: the representative of ``x`` modulo 1 in (−½, ½]."""
    r = torch.remainder(x, 1.0)
    return r - (r > 0.5).to(r.dtype)


def wrapped_normal_neg_score(x: torch.Tensor, sigma: torch.Tensor, images: int = 10) -> torch.Tensor:
    """Negative score of the wrapped normal, ``g_wn(x; σ) = −∂_x log Σ_k exp(−(x + k)²/(2σ²))``.

    ``g_wn = Σ_k ((x + k)/σ²) w_k`` with softmax weights ``w_k ∝ exp(−(x + k)²/(2σ²))``, ``|k| ≤ images``.

    Args:
        x: any shape.
        sigma: broadcastable to ``x``, > 0.
    """
    k = torch.arange(-images, images + 1, dtype=x.dtype, device=x.device)
    shifted = x.unsqueeze(-1) + k
    sigma = sigma.unsqueeze(-1)
    weights = torch.softmax(-(shifted**2) / (2 * sigma**2), dim=-1)
    return (shifted * weights).sum(-1) / sigma.squeeze(-1) ** 2


def wrapped_normal_score_second_moment(sigma: torch.Tensor, points: int = 4001) -> torch.Tensor:
    """``λ(σ) = E_{x∼N(0,σ²)}[g_wn(x; σ)²]``, by the trapezoidal rule on ``x = σu``, ``u ∈ [−10, 10]``.

    This is DiffCSP's normaliser of the coordinate target (docs/method.md §4.1), computed by quadrature
    instead of Monte Carlo. For ``σ → 0``, ``λ → 1/σ²``.

    Args:
        sigma: ``(S,)`` float64, > 0.

    Returns:
        ``(S,)``.
    """
    u = torch.linspace(-10.0, 10.0, points, dtype=torch.float64)
    density = torch.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)
    x = sigma[:, None].double() * u[None]
    g = wrapped_normal_neg_score(x, sigma[:, None].double().expand_as(x))
    return torch.trapezoid(density * g**2, u, dim=-1)


def circular_mean(
    eps: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic centre of mass per crystal and axis (docs/method.md §4.2, paper Eq. 15).

    ``u = mean sin(2πε)``, ``v = mean cos(2πε)``, ``μ = atan2(u, v)/(2π) mod 1``, ``R = sqrt(u² + v²)``.

    Args:
        eps: ``(N, 3)``.
        batch: ``(N,)`` crystal index per atom.
        num_atoms: ``(B,)``.

    Returns:
        ``(mu, resultant)``, each ``(B, 3)``.
    """
    theta = TWO_PI * eps
    n = num_atoms.to(eps.dtype)[:, None]
    u = segment_sum(torch.sin(theta), batch, n.shape[0]) / n
    v = segment_sum(torch.cos(theta), batch, n.shape[0]) / n
    mu = torch.remainder(torch.atan2(u, v) / TWO_PI, 1.0)
    return mu, torch.sqrt(u**2 + v**2)


def com_free(eps: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
    """The CoM-free noise ``m(ε)_i = (ε_i − μ) mod 1 ∈ [0, 1)``, per crystal and axis.

    Invariant to adding a constant (mod 1) to all ``ε_i`` of a crystal.
    """
    mu, _ = circular_mean(eps, batch, num_atoms)
    return torch.remainder(eps - mu[batch], 1.0)


def com_free_jacobian_weights(
    eps_bar: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor
) -> torch.Tensor:
    """``g_i = ∂μ/∂ε_i = cos(2π(ε_i − μ)) / (n R)`` (docs/method.md §4.5, paper Eq. 36).

    Shift-invariant, so it may be evaluated at the CoM-free noise. ``Σ_i g_i = 1`` per crystal and axis.
    ``R`` is clamped to :data:`MIN_RESULTANT` (uniformly spread noise).

    Returns:
        ``(N, 3)``.
    """
    mu, resultant = circular_mean(eps_bar, batch, num_atoms)
    n = num_atoms.to(eps_bar.dtype)[:, None]
    scale = 1.0 / (n * resultant.clamp_min(MIN_RESULTANT))
    return torch.cos(TWO_PI * (eps_bar - mu[batch])) * scale[batch]


def com_free_direction(
    neg_score: torch.Tensor, eps_bar: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor
) -> torch.Tensor:
    """Chain rule from the CoM-free noise's negative score to that of ``ε``: ``d_i = s_i − g_i Σ_j s_j``.

    Args:
        neg_score: ``(N, 3)`` ``s = −∂ log q / ∂ε̄``.
        eps_bar: ``(N, 3)`` CoM-free noise (or its prediction) at which ``g`` is evaluated.

    Returns:
        ``(N, 3)``, with ``Σ_i d_i = 0`` per crystal and axis (no net translation).
    """
    g = com_free_jacobian_weights(eps_bar, batch, num_atoms)
    total = segment_sum(neg_score, batch, num_atoms.shape[0])
    return neg_score - g * total[batch]
