"""Noise on the torus, EquiCSP CoM-free targets, DiffCSP wrapped-normal score, schedules
(docs/method.md §3, §4, §11 items 7–12).

Exactness checks run in float64 with tolerance 1e-9 unless stated; Monte-Carlo checks use fixed
``torch.Generator`` seeds and state their tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from equicsp_core.schedules import make_schedules, time_embedding
from equicsp_core.segment import segment_sum
from equicsp_core.torus import (
    TWO_PI,
    circular_mean,
    com_free,
    com_free_direction,
    com_free_jacobian_weights,
    wrap_centered,
    wrapped_normal_neg_score,
    wrapped_normal_score_second_moment,
)
from equicsp_core.vonmises_tables import shipped_tables

F64 = torch.float64
SIZES = (1, 2, 5, 13, 20)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_batch(seed: int, sizes=SIZES, repeats: int = 3):
    """A shuffled batch of crystals with the given sizes: ``(num_atoms (B,), batch (N,), generator)``."""
    gen = torch.Generator().manual_seed(seed)
    num_atoms = torch.tensor(list(sizes) * repeats, dtype=torch.long)
    num_atoms = num_atoms[torch.randperm(num_atoms.numel(), generator=gen)]
    batch = torch.repeat_interleave(torch.arange(num_atoms.numel()), num_atoms)
    return num_atoms, batch, gen


def random_noise(batch: torch.Tensor, num_atoms: torch.Tensor, gen: torch.Generator, dtype=F64):
    """Noise ε = σ_b z with one σ per crystal drawn log-uniformly in [0.005, 0.5]; returns ``(eps, sigma)``."""
    log_sigma = torch.empty(num_atoms.numel(), dtype=dtype).uniform_(math.log(0.005), math.log(0.5), generator=gen)
    sigma = torch.exp(log_sigma)
    z = torch.randn(batch.numel(), 3, generator=gen, dtype=dtype)
    return sigma[batch, None] * z, sigma


def crystal_shift(num_atoms: torch.Tensor, gen: torch.Generator, dtype=F64):
    """Per-crystal, per-axis constants c ∈ [−3, 3] (with integer parts): ``(B, 3)``."""
    return torch.empty(num_atoms.numel(), 3, dtype=dtype).uniform_(-3.0, 3.0, generator=gen)


def equicsp_targets(eps: torch.Tensor, sigma: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor):
    """docs/method.md §4.3 targets ``(target_F, target_s)`` from the CoM-free noise; zero for n = 1 atoms (§10.1)."""
    kappa, kappa_norm, sample_norm = shipped_tables().lookup(num_atoms, sigma)
    multi = (num_atoms > 1)[batch, None]
    safe_s = torch.where(sample_norm > 0, sample_norm, torch.ones_like(sample_norm))
    safe_k = torch.where(kappa_norm > 0, kappa_norm, torch.ones_like(kappa_norm))
    eps_bar = com_free(eps, batch, num_atoms)
    target_f = wrap_centered(eps_bar) / safe_s.sqrt()[batch, None]
    target_s = TWO_PI * kappa[batch, None] * torch.sin(TWO_PI * eps_bar) / safe_k.sqrt()[batch, None]
    zero = torch.zeros_like(target_f)
    return torch.where(multi, target_f, zero), torch.where(multi, target_s, zero)


def within_crystal_permutation(num_atoms: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A permutation of all atoms that only reorders atoms inside each crystal."""
    offsets = torch.cumsum(num_atoms, 0) - num_atoms
    return torch.cat([off + torch.randperm(int(n), generator=gen) for off, n in zip(offsets.tolist(), num_atoms)])


# ----------------------------------------------------------------------------------------------------------------
# wrap_centered


def test_wrap_centered_edge_values():
    """w(x mod 1) maps 0.5 → 0.5, −0.5 → 0.5, 0.7 → −0.3, 0 → 0, 1 → 0, −0.2 → −0.2 (1e-12)."""
    x = torch.tensor([0.5, -0.5, 0.7, 0.0, 1.0, -0.2, 2.5, -1.7], dtype=F64)
    expected = torch.tensor([0.5, 0.5, -0.3, 0.0, 0.0, -0.2, 0.5, 0.3], dtype=F64)
    torch.testing.assert_close(wrap_centered(x), expected, rtol=0, atol=1e-12)


def test_wrap_centered_range_and_integer_difference():
    """w(x) lies in (−½, ½] and x − w(x) is an integer (1e-9) for random x in [−10, 10]."""
    gen = torch.Generator().manual_seed(11)
    x = torch.empty(10_000, dtype=F64).uniform_(-10, 10, generator=gen)
    w = wrap_centered(x)
    assert bool((w > -0.5).all()) and bool((w <= 0.5).all())
    diff = x - w
    assert torch.allclose(diff, diff.round(), atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# circular mean and CoM-free noise (docs/method.md §4.2, §11 item 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_com_free_invariant_to_per_crystal_shift(seed):
    """m(ε + c) = m(ε) mod 1 (|w(Δ)| < 1e-9) for per-crystal, per-axis constants c with integer parts."""
    num_atoms, batch, gen = make_batch(seed)
    eps, _ = random_noise(batch, num_atoms, gen)
    c = crystal_shift(num_atoms, gen)
    m0 = com_free(eps, batch, num_atoms)
    m1 = com_free(eps + c[batch], batch, num_atoms)
    assert wrap_centered(m1 - m0).abs().max().item() < 1e-9


def test_com_free_range_is_unit_interval():
    """m(ε) ∈ [0, 1) for large, wrapping noise."""
    num_atoms, batch, gen = make_batch(3)
    eps = torch.empty(batch.numel(), 3, dtype=F64).uniform_(-5, 5, generator=gen)
    m = com_free(eps, batch, num_atoms)
    assert bool((m >= 0).all()) and bool((m < 1).all())


@pytest.mark.parametrize("scale", [0.01, 0.3, 3.0])
def test_com_free_has_zero_sine_sum(scale):
    """Σ_i sin(2π m(ε)_i) = 0 per crystal and axis (1e-9), for small and fully wrapped noise."""
    num_atoms, batch, gen = make_batch(4)
    eps = scale * torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    m = com_free(eps, batch, num_atoms)
    sine_sum = segment_sum(torch.sin(TWO_PI * m), batch, num_atoms.numel())
    assert sine_sum.abs().max().item() < 1e-9


def test_circular_mean_matches_definition():
    """μ = atan2(mean sin, mean cos)/(2π) mod 1 and R = |mean e^{iθ}|, per crystal/axis, checked crystal by crystal."""
    num_atoms, batch, gen = make_batch(5)
    eps = torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    mu, resultant = circular_mean(eps, batch, num_atoms)
    for b in range(num_atoms.numel()):
        theta = TWO_PI * eps[batch == b]
        u, v = torch.sin(theta).mean(0), torch.cos(theta).mean(0)
        mu_ref = torch.remainder(torch.atan2(u, v) / TWO_PI, 1.0)
        assert wrap_centered(mu[b] - mu_ref).abs().max().item() < 1e-12
        torch.testing.assert_close(resultant[b], torch.sqrt(u**2 + v**2), rtol=1e-12, atol=1e-12)


def test_com_free_commutes_with_atom_permutation():
    """m(Πε) = Π m(ε) for permutations inside each crystal (|w(Δ)| < 1e-12)."""
    num_atoms, batch, gen = make_batch(6)
    eps, _ = random_noise(batch, num_atoms, gen)
    perm = within_crystal_permutation(num_atoms, gen)
    assert torch.equal(batch[perm], batch)
    m = com_free(eps, batch, num_atoms)
    m_perm = com_free(eps[perm], batch, num_atoms)
    assert wrap_centered(m_perm - m[perm]).abs().max().item() < 1e-12


def test_com_free_is_zero_for_single_atom_crystals():
    """For n = 1 the CoM-free noise is 0 mod 1 (|w(m)| < 1e-12)."""
    num_atoms, batch, gen = make_batch(7)
    eps = torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    m = com_free(eps, batch, num_atoms)
    single = (num_atoms == 1)[batch]
    assert single.any()
    assert wrap_centered(m[single]).abs().max().item() < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# shift invariance of EquiCSP targets vs DiffCSP's (docs/method.md §11 item 7)


@pytest.mark.parametrize("seed", [0, 1])
def test_equicsp_targets_invariant_to_noise_shift(seed):
    """target_F = w(ε̄)/√S and target_s = 2πκ sin(2πε̄)/√K are unchanged by a per-crystal shift of ε (1e-9 relative)."""
    num_atoms, batch, gen = make_batch(seed)
    eps, sigma = random_noise(batch, num_atoms, gen)
    c = crystal_shift(num_atoms, gen)
    f0, s0 = equicsp_targets(eps, sigma, batch, num_atoms)
    f1, s1 = equicsp_targets(eps + c[batch], sigma, batch, num_atoms)
    # target_F is centred: only values near ±½ could flip sign, which random noise of σ ≤ 0.5 avoids here.
    assert (f1 - f0).abs().max().item() < 1e-9 * f0.abs().max().item()
    assert (s1 - s0).abs().max().item() < 1e-9 * s0.abs().max().item()


def test_diffcsp_target_not_invariant_to_noise_shift():
    """The DiffCSP target g_wn(ε; σ) changes by > 1e-2 (relative norm) under the same per-crystal shift."""
    num_atoms, batch, gen = make_batch(0)
    eps, sigma = random_noise(batch, num_atoms, gen)
    c = crystal_shift(num_atoms, gen)
    sig = sigma[batch, None].expand_as(eps)
    g0 = wrapped_normal_neg_score(eps, sig)
    g1 = wrapped_normal_neg_score(eps + c[batch], sig)
    relative = (g1 - g0).norm() / g0.norm()
    assert relative.item() > 1e-2


def test_diffcsp_target_invariant_to_integer_shift_only():
    """Sanity for the previous test: g_wn is 1-periodic, so integer shifts leave it unchanged (1e-9 relative)."""
    num_atoms, batch, gen = make_batch(1)
    eps, sigma = random_noise(batch, num_atoms, gen)
    sig = sigma[batch, None].expand_as(eps)
    g0 = wrapped_normal_neg_score(eps, sig)
    g1 = wrapped_normal_neg_score(eps + 2.0, sig)
    assert ((g1 - g0).norm() / g0.norm()).item() < 1e-9


# ----------------------------------------------------------------------------------------------------------------
# unit second moments of the normalised targets (docs/method.md §11 item 8)


@pytest.mark.parametrize("n", [2, 5, 20, 52])
@pytest.mark.parametrize("sigma", [0.005, 0.05, 0.5])
def test_equicsp_targets_have_unit_second_moment(n, sigma):
    """mean(target_F²) ≈ 1 and mean(target_s²) ≈ 1 within 5% on ≥ 6·10⁴ fresh scalar samples (seed 987654)."""
    groups = -(-20_000 // n)
    num_atoms = torch.full((groups,), n, dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(groups), num_atoms)
    gen = torch.Generator().manual_seed(987_654 + n)
    eps = sigma * torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    sig = torch.full((groups,), sigma, dtype=F64)
    target_f, target_s = equicsp_targets(eps, sig, batch, num_atoms)
    assert target_f.numel() >= 60_000
    assert abs((target_f**2).mean().item() - 1) < 0.05
    assert abs((target_s**2).mean().item() - 1) < 0.05


# ----------------------------------------------------------------------------------------------------------------
# chain rule (docs/method.md §4.5, §11 item 10)


def chain_rule_setup(seed: int):
    num_atoms, batch, gen = make_batch(seed)
    eps, _ = random_noise(batch, num_atoms, gen)
    kappa = torch.empty(num_atoms.numel(), dtype=F64).uniform_(0.5, 50.0, generator=gen)
    return num_atoms, batch, eps, kappa, gen


def autograd_vs_chain_rule(eps, kappa_atom, batch, num_atoms):
    """(autograd ∇_ε E, d, s) for E(ε) = −Σ_j κ_j cos(2π m(ε)_j) with per-atom κ_j ``(N, 1)`` or ``(N, 3)``."""
    eps = eps.clone().requires_grad_(True)
    eps_bar = com_free(eps, batch, num_atoms)
    energy = -(kappa_atom * torch.cos(TWO_PI * eps_bar)).sum()
    (grad,) = torch.autograd.grad(energy, eps)
    eps_bar = eps_bar.detach()
    s = TWO_PI * kappa_atom * torch.sin(TWO_PI * eps_bar)
    return grad, com_free_direction(s, eps_bar, batch, num_atoms), s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_com_free_direction_equals_autograd_gradient(seed):
    """d = s − g Σs equals ∇_ε of E(ε) = −Σ_j κ_b cos(2π m(ε)_j), κ per crystal (1e-6 absolute, float64; n = 1 included)."""
    num_atoms, batch, eps, kappa, _ = chain_rule_setup(seed)
    grad, d, s = autograd_vs_chain_rule(eps, kappa[batch, None], batch, num_atoms)
    torch.testing.assert_close(d, grad, rtol=0, atol=1e-6)
    # with one κ per crystal, Σ_j s_j = 0 (Σ sin 2πε̄ = 0), so d = s: the von Mises score needs no correction
    torch.testing.assert_close(d, s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_com_free_direction_equals_autograd_gradient_nontrivial_correction(seed):
    """Same chain-rule check with per-atom, per-axis κ_j, where Σ s ≠ 0 and the −g Σ s term matters (1e-6 absolute)."""
    num_atoms, batch, eps, _, gen = chain_rule_setup(seed)
    kappa_atom = torch.empty(batch.numel(), 3, dtype=F64).uniform_(0.5, 50.0, generator=gen)
    grad, d, s = autograd_vs_chain_rule(eps, kappa_atom, batch, num_atoms)
    torch.testing.assert_close(d, grad, rtol=0, atol=1e-6)
    # not vacuous: the correction is large compared with the tolerance
    assert (d - s).abs().max().item() > 1e-2
    single = (num_atoms == 1)[batch]
    assert d[single].abs().max().item() < 1e-12


def test_com_free_direction_is_zero_for_single_atom_crystals():
    """For n = 1 crystals the chain-rule direction is 0 whatever the score (1e-12)."""
    num_atoms, batch, eps, _, _ = chain_rule_setup(3)
    eps_bar = com_free(eps, batch, num_atoms)
    s = torch.randn(eps.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    d = com_free_direction(s, eps_bar, batch, num_atoms)
    single = (num_atoms == 1)[batch]
    assert single.any()
    assert d[single].abs().max().item() < 1e-12


@pytest.mark.parametrize("scale", [0.01, 0.3])
def test_jacobian_weights_sum_to_one_and_direction_sums_to_zero(scale):
    """Σ_i g_i = 1 and Σ_i d_i = 0 per crystal and axis (1e-9), for an arbitrary score s."""
    num_atoms, batch, gen = make_batch(8)
    eps = scale * torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    eps_bar = com_free(eps, batch, num_atoms)
    g = com_free_jacobian_weights(eps_bar, batch, num_atoms)
    g_sum = segment_sum(g, batch, num_atoms.numel())
    torch.testing.assert_close(g_sum, torch.ones_like(g_sum), rtol=0, atol=1e-9)
    s = torch.randn(eps.shape, generator=gen, dtype=F64)
    d = com_free_direction(s, eps_bar, batch, num_atoms)
    d_sum = segment_sum(d, batch, num_atoms.numel())
    assert d_sum.abs().max().item() < 1e-9


def test_jacobian_weights_equal_autograd_of_circular_mean():
    """g_i = ∂μ/∂ε_i (autograd of the circular mean, 1e-9) and g is invariant to shifting ε (1e-9)."""
    num_atoms, batch, gen = make_batch(9, sizes=(2, 5, 13))
    eps = 0.1 * torch.randn(batch.numel(), 3, generator=gen, dtype=F64)
    eps_req = eps.clone().requires_grad_(True)
    mu, _ = circular_mean(eps_req, batch, num_atoms)
    # μ is mod 1; its derivative is that of atan2/(2π). Use a random linear functional per crystal/axis.
    weights = torch.randn(mu.shape, generator=gen, dtype=F64)
    (grad,) = torch.autograd.grad((weights * mu).sum(), eps_req)
    g = com_free_jacobian_weights(eps, batch, num_atoms)
    torch.testing.assert_close(g * weights[batch], grad, rtol=0, atol=1e-9)
    c = crystal_shift(num_atoms, gen)
    torch.testing.assert_close(com_free_jacobian_weights(eps + c[batch], batch, num_atoms), g, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# DiffCSP wrapped normal (docs/method.md §4.1, §11 item 11)


def wn_neg_log_density(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """−log Σ_{|k|≤10} exp(−(x + k)²/(2σ²)) (up to a constant), stable via logsumexp."""
    k = torch.arange(-10, 11, dtype=x.dtype)
    return -torch.logsumexp(-((x[..., None] + k) ** 2) / (2 * sigma[..., None] ** 2), dim=-1)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5, 1.0])
def test_wrapped_normal_neg_score_equals_autograd(sigma):
    """g_wn(x; σ) = −∂_x log p_wn(x; σ) by autograd (relative 1e-9 of 1/σ²), x ∈ [−1.5, 1.5]."""
    gen = torch.Generator().manual_seed(21)
    x = torch.empty(2000, dtype=F64).uniform_(-1.5, 1.5, generator=gen).requires_grad_(True)
    sig = torch.full_like(x, sigma)
    (grad,) = torch.autograd.grad(wn_neg_log_density(x, sig).sum(), x)
    g = wrapped_normal_neg_score(x.detach(), sig)
    torch.testing.assert_close(g, grad, rtol=1e-9, atol=1e-9 / sigma**2)


def test_wrapped_normal_neg_score_small_sigma_limit():
    """For σ = 1e-3 and |x| < 3σ, g_wn(x) = x/σ² (relative 1e-9)."""
    sigma = 1e-3
    x = torch.linspace(-3 * sigma, 3 * sigma, 101, dtype=F64)[1:-1]
    g = wrapped_normal_neg_score(x, torch.full_like(x, sigma))
    torch.testing.assert_close(g, x / sigma**2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5])
def test_wrapped_normal_second_moment_matches_monte_carlo(sigma):
    """λ(σ) (quadrature) equals E[g_wn(σz; σ)²] by Monte Carlo with 2·10⁵ samples (seed 31) within 2%."""
    gen = torch.Generator().manual_seed(31)
    x = sigma * torch.randn(200_000, generator=gen, dtype=F64)
    mc = (wrapped_normal_neg_score(x, torch.full_like(x, sigma)) ** 2).mean()
    lam = wrapped_normal_score_second_moment(torch.tensor([sigma], dtype=F64))
    assert lam.shape == (1,)
    assert abs(lam.item() / mc.item() - 1) < 0.02


def test_wrapped_normal_second_moment_small_sigma():
    """λ(0.005) = 1/σ² within 1%."""
    sigma = 0.005
    lam = wrapped_normal_score_second_moment(torch.tensor([sigma], dtype=F64))
    assert abs(lam.item() * sigma**2 - 1) < 0.01


# ----------------------------------------------------------------------------------------------------------------
# schedules and time embedding (docs/method.md §3.1, §3.3, §11 item 12)


def test_lattice_schedule_properties():
    """ᾱ_0 = 1, ᾱ strictly decreasing, ᾱ_T < 1e-4; β_0 = 0, β_{1..T} ∈ [1e-4, 0.9999]; α = 1 − β; T + 1 entries."""
    sched = make_schedules()
    assert sched.num_steps == 1000
    for table in (sched.betas, sched.alphas, sched.alphas_cumprod, sched.sigmas):
        assert table.shape == (1001,) and table.dtype == F64
    abar = sched.alphas_cumprod
    assert abar[0].item() == 1.0
    assert bool((abar[1:] < abar[:-1]).all())
    assert abar[-1].item() < 1e-4
    assert sched.betas[0].item() == 0.0
    assert bool((sched.betas[1:] >= 1e-4).all()) and bool((sched.betas[1:] <= 0.9999).all())
    torch.testing.assert_close(sched.alphas, 1 - sched.betas, rtol=0, atol=1e-15)
    torch.testing.assert_close(abar, torch.cumprod(sched.alphas, 0), rtol=1e-12, atol=0)


def test_lattice_schedule_matches_cosine_formula():
    """β_t = clip(1 − ᾱ(t)/ᾱ(t−1), 1e-4, 0.9999) with the cosine ᾱ(k), s = 0.008 (1e-12)."""
    sched = make_schedules(num_steps=1000)
    k = torch.arange(1001, dtype=F64)
    s = 0.008
    f = torch.cos((k / 1000 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    betas = torch.clamp(1 - f[1:] / f[:-1], 1e-4, 0.9999)
    torch.testing.assert_close(sched.betas[1:], betas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1000, 100])
def test_coordinate_sigma_ladder_is_geometric(num_steps):
    """σ_0 = 0, σ_1 = 0.005, σ_T = 0.5 (1e-12), σ_{t+1}/σ_t constant for t ≥ 1 (relative 1e-9)."""
    sigmas = make_schedules(num_steps=num_steps).sigmas
    assert sigmas[0].item() == 0.0
    assert abs(sigmas[1].item() - 0.005) < 1e-12
    assert abs(sigmas[-1].item() - 0.5) < 1e-12
    ratio = sigmas[2:] / sigmas[1:-1]
    expected = (0.5 / 0.005) ** (1 / (num_steps - 1))
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_steps=0), dict(num_steps=-5), dict(sigma_begin=0.5, sigma_end=0.5), dict(sigma_begin=0.6, sigma_end=0.5),
     dict(sigma_begin=0.0)],
)
def test_make_schedules_rejects_invalid_arguments(kwargs):
    """num_steps < 1, σ_begin ≥ σ_end and σ_begin ≤ 0 raise ValueError."""
    with pytest.raises(ValueError):
        make_schedules(**kwargs)


def test_time_embedding_formula():
    """time_embedding(t, 256) is (B, 256) = [sin(t f), cos(t f)], f_k = exp(−k ln(10⁴)/127) (2e-4 abs, float32 args)."""
    t = torch.tensor([0, 1, 2, 17, 500, 999, 1000])
    emb = time_embedding(t, 256)
    assert emb.shape == (7, 256)
    f = torch.exp(-torch.arange(128, dtype=F64) * math.log(10000.0) / 127)
    args = t.double()[:, None] * f
    ref = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=2e-4)
    # t = 0: sines are exactly 0, cosines exactly 1
    assert torch.equal(emb[0, :128], torch.zeros(128)) and torch.equal(emb[0, 128:], torch.ones(128))
    # lowest frequency is exactly 1e-4 (k = 127): emb[t, 127] = sin(t·1e-4)
    torch.testing.assert_close(emb[:, 127].double(), torch.sin(t.double() * 1e-4), rtol=0, atol=1e-6)
