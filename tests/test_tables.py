"""The von Mises normalisation tables κ, K, S (docs/method.md §4.3–4.4, §11 item 9).

The shipped table was built by ``compute_tables()`` with its defaults (generator seed ``0·1000 + n`` per row,
2·10⁵ samples per cell, 121 log-σ points on [1e-3, 1]); fresh Monte Carlo below uses other seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from equicsp_core.torus import TWO_PI
from equicsp_core.vonmises_tables import (
    MAX_TABLE_ATOMS,
    _bessel_ratio,
    inverse_bessel_ratio,
    shipped_tables,
    tables_for,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def tables():
    return shipped_tables()


def grid_index(tables, sigma: float) -> int:
    """Index of the grid point nearest to σ (the grid has 40 points per decade, so σ is within ±3%)."""
    return int(torch.argmin((tables.log_sigma - math.log(sigma)).abs()))


def lookup1(tables, n: int, sigma: float):
    """Scalar (κ, K, S) at one (n, σ) through ``lookup``."""
    kappa, kappa_norm, sample_norm = tables.lookup(torch.tensor([n]), torch.tensor([sigma], dtype=F64))
    return kappa.item(), kappa_norm.item(), sample_norm.item()


def fresh_com_free_samples(n: int, sigma: float, samples: int, seed: int) -> torch.Tensor:
    """CoM-free noise ε̄ = m(σz) for ⌈samples/n⌉ groups of n (one axis), as ``(groups, n)`` in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    eps = sigma * torch.randn(-(-samples // n), n, generator=gen, dtype=F64)
    theta = TWO_PI * eps
    mu = torch.atan2(torch.sin(theta).mean(1, keepdim=True), torch.cos(theta).mean(1, keepdim=True)) / TWO_PI
    return torch.remainder(eps - mu, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# layout


def test_shipped_table_layout(tables):
    """Rows 0..52 indexed by n, rows 0 and 1 zero, rows ≥ 2 positive; σ grid increasing from 1e-3 to 1, float64."""
    assert tables.max_atoms == MAX_TABLE_ATOMS == 52
    for table in (tables.kappa, tables.kappa_norm, tables.sample_norm):
        assert table.dtype == F64 and table.shape == (53, tables.log_sigma.numel())
        assert torch.equal(table[:2], torch.zeros_like(table[:2]))
        assert bool((table[2:] > 0).all())
    assert bool((tables.log_sigma[1:] > tables.log_sigma[:-1]).all())
    assert math.isclose(math.exp(tables.log_sigma[0]), 1e-3, rel_tol=1e-9)
    assert math.isclose(math.exp(tables.log_sigma[-1]), 1.0, rel_tol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# analytic limits and regression values (docs/method.md §4.4)


@pytest.mark.parametrize("n", [2, 5, 20, 52])
def test_small_sigma_limits(tables, n):
    """At σ = 0.005: S ≈ σ²(n−1)/n, κ ≈ n/((n−1)(2πσ)²), K ≈ (2π)²κ, each within 3%."""
    sigma = 0.005
    kappa, kappa_norm, sample_norm = lookup1(tables, n, sigma)
    assert sample_norm == pytest.approx(sigma**2 * (n - 1) / n, rel=0.03)
    kappa_limit = n / ((n - 1) * (TWO_PI * sigma) ** 2)
    assert kappa == pytest.approx(kappa_limit, rel=0.03)
    assert kappa_norm == pytest.approx(TWO_PI**2 * kappa_limit, rel=0.03)


def test_large_sigma_trends(tables):
    """At σ = 0.5: S < 1/12 and increasing with n, κ decreasing with n (n ∈ {2, 3, 5, 10, 20, 30, 52})."""
    sizes = [2, 3, 5, 10, 20, 30, 52]
    values = [lookup1(tables, n, 0.5) for n in sizes]
    kappas = [v[0] for v in values]
    norms = [v[2] for v in values]
    assert all(s < 1 / 12 for s in norms)
    assert all(a < b for a, b in zip(norms, norms[1:]))
    assert all(a > b for a, b in zip(kappas, kappas[1:]))


def test_large_sigma_regression_values(tables):
    """κ(2, 0.5) within 5% of 1.676 and S(2, 0.5) within 5% of 2.066e-2 (official tables, docs/method.md §4.4)."""
    kappa, _, sample_norm = lookup1(tables, 2, 0.5)
    assert kappa == pytest.approx(1.676, rel=0.05)
    assert sample_norm == pytest.approx(2.066e-2, rel=0.05)


@pytest.mark.parametrize("n, sigma", [(2, 0.005), (5, 0.05), (20, 0.2), (52, 0.5), (3, 0.9)])
def test_mean_cosine_equals_bessel_ratio_of_table_kappa(tables, n, sigma):
    """Fresh MC (seed 4242, 2·10⁵ samples) E[cos 2πε̄] = I₁(κ)/I₀(κ) at a grid σ, within 5 combined standard errors."""
    j = grid_index(tables, sigma)
    sigma_grid = math.exp(tables.log_sigma[j])
    eps_bar = fresh_com_free_samples(n, sigma_grid, 200_000, seed=4242 + n)
    group_cos = torch.cos(TWO_PI * eps_bar).mean(1)  # groups are independent; atoms inside a group are not
    mean_cos = group_cos.mean().item()
    stderr = group_cos.std().item() / math.sqrt(group_cos.numel())
    predicted = float(_bessel_ratio(np.array([tables.kappa[n, j].item()]))[0])
    # the table is itself an MC estimate with the same sample size: allow both errors
    assert abs(mean_cos - predicted) < 5 * math.sqrt(2) * stderr
    assert stderr > 0


@pytest.mark.parametrize("n, sigma", [(2, 0.01), (13, 0.1), (52, 0.5)])
def test_norms_match_fresh_monte_carlo(tables, n, sigma):
    """K = (2πκ)² E[sin² 2πε̄] and S = E[w(ε̄)²] agree with fresh MC (seed 777, 2·10⁵ samples) within 2%."""
    j = grid_index(tables, sigma)
    sigma_grid = math.exp(tables.log_sigma[j])
    eps_bar = fresh_com_free_samples(n, sigma_grid, 200_000, seed=777 + n)
    centred = eps_bar - (eps_bar > 0.5).to(F64)
    kappa = tables.kappa[n, j].item()
    kappa_norm_mc = (TWO_PI * kappa) ** 2 * (torch.sin(TWO_PI * eps_bar) ** 2).mean().item()
    sample_norm_mc = (centred**2).mean().item()
    assert tables.kappa_norm[n, j].item() == pytest.approx(kappa_norm_mc, rel=0.02)
    assert tables.sample_norm[n, j].item() == pytest.approx(sample_norm_mc, rel=0.02)


# ----------------------------------------------------------------------------------------------------------------
# Bessel ratio and its inverse


def test_inverse_bessel_ratio_round_trip():
    """A⁻¹(A(κ)) = κ for κ in logspace(1e-3, 1e5), relative 1e-6."""
    kappa = np.logspace(-3, 5, 161)
    recovered = inverse_bessel_ratio(_bessel_ratio(kappa))
    np.testing.assert_allclose(recovered, kappa, rtol=1e-6)


def test_bessel_ratio_known_values():
    """A(κ) = I₁/I₀: A(κ) ≈ κ/2 for κ → 0, A(1) = 0.446390..., A(κ) ≈ 1 − 1/(2κ) for large κ (1e-6)."""
    values = _bessel_ratio(np.array([1e-4, 1.0, 1e4]))
    np.testing.assert_allclose(values, [0.5e-4, 0.44639034, 1 - 1 / 2e4 - 1 / 8e8], rtol=1e-6)


def test_inverse_bessel_ratio_clamps_uninformative_mean_cosine():
    """A mean cosine ≤ A(1e-6) (uniform noise) gives the lower bound κ = 1e-6 (relative 1e-6)."""
    recovered = inverse_bessel_ratio(np.array([0.0, -0.1, 1e-9]))
    np.testing.assert_allclose(recovered, 1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# reproducibility of the shipped table


@pytest.mark.parametrize("n", [2, 5])
def test_shipped_rows_are_reproducible(tables, n):
    """tables_for(n, σ-slice, 2·10⁵, seed n) reproduces the shipped row n (common random numbers per σ) to
    1e-9 relative: the same draws, summed in a thread-count-dependent order; another seed differs by ~1e-3."""
    columns = torch.arange(0, tables.log_sigma.numel(), 12)  # 11 σ from 1e-3 to 1
    sigmas = torch.exp(tables.log_sigma)[columns]
    kappa, kappa_norm, sample_norm = tables_for(n, sigmas, 200_000, torch.Generator().manual_seed(0 * 1000 + n))
    for got, shipped in ((kappa, tables.kappa), (kappa_norm, tables.kappa_norm), (sample_norm, tables.sample_norm)):
        torch.testing.assert_close(got, shipped[n, columns], rtol=1e-9, atol=0)


def test_tables_for_depends_on_seed(tables):
    """A different seed changes the MC estimates (the reproducibility test is not vacuous)."""
    sigmas = torch.exp(tables.log_sigma[[40, 80]])
    kappa, _, _ = tables_for(5, sigmas, 20_000, torch.Generator().manual_seed(99))
    assert not torch.equal(kappa, tables.kappa[5, [40, 80]])


# ----------------------------------------------------------------------------------------------------------------
# lookup


@pytest.mark.parametrize("n", [2, 7, 52])
def test_lookup_at_grid_points_returns_table_values(tables, n):
    """At every grid σ, lookup returns the stored κ, K, S (relative 1e-9), including both ends of the grid."""
    sigma = torch.exp(tables.log_sigma)
    kappa, kappa_norm, sample_norm = tables.lookup(torch.full_like(sigma, n, dtype=torch.long), sigma)
    torch.testing.assert_close(kappa, tables.kappa[n], rtol=1e-9, atol=0)
    torch.testing.assert_close(kappa_norm, tables.kappa_norm[n], rtol=1e-9, atol=0)
    torch.testing.assert_close(sample_norm, tables.sample_norm[n], rtol=1e-9, atol=0)


@pytest.mark.parametrize("n", [2, 13, 52])
def test_lookup_between_grid_points_lies_between_neighbours(tables, n):
    """At the log-midpoint of each grid cell, each of κ, K, S lies between its two neighbouring grid values."""
    mid = torch.exp(0.5 * (tables.log_sigma[1:] + tables.log_sigma[:-1]))
    values = tables.lookup(torch.tensor(n), mid)
    for value, table in zip(values, (tables.kappa, tables.kappa_norm, tables.sample_norm)):
        row = table[n]
        low = torch.minimum(row[:-1], row[1:])
        high = torch.maximum(row[:-1], row[1:])
        assert bool((value >= low * (1 - 1e-12)).all()) and bool((value <= high * (1 + 1e-12)).all())
        # strictly inside where the neighbours differ: it is an interpolation, not a nearest-neighbour pick
        differ = (row[1:] - row[:-1]).abs() > 1e-6 * high
        assert bool((value[differ] > low[differ]).all()) and bool((value[differ] < high[differ]).all())


def test_lookup_interpolates_geometrically_in_log_sigma(tables):
    """At the log-midpoint, log κ is the mean of the neighbours' log κ (relative 1e-9)."""
    j = 50
    mid = math.exp(0.5 * (tables.log_sigma[j] + tables.log_sigma[j + 1]))
    kappa, _, _ = lookup1(tables, 5, mid)
    expected = math.sqrt(tables.kappa[5, j].item() * tables.kappa[5, j + 1].item())
    assert kappa == pytest.approx(expected, rel=1e-9)


def test_lookup_broadcasts_and_mixes_sizes(tables):
    """Scalar n against a σ vector and a n vector against a scalar σ broadcast; per-pair values match single lookups."""
    sigma = torch.tensor([0.005, 0.05, 0.5], dtype=F64)
    kappa, kappa_norm, sample_norm = tables.lookup(torch.tensor(5), sigma)
    assert kappa.shape == kappa_norm.shape == sample_norm.shape == (3,)
    assert kappa.dtype == F64
    for i, s in enumerate(sigma.tolist()):
        assert kappa[i].item() == pytest.approx(lookup1(tables, 5, s)[0], rel=1e-12)
    sizes = torch.tensor([1, 2, 20, 52])
    kappa, _, sample_norm = tables.lookup(sizes, torch.tensor(0.1, dtype=F64))
    assert kappa.shape == (4,)
    for i, n in enumerate(sizes.tolist()):
        assert kappa[i].item() == pytest.approx(lookup1(tables, n, 0.1)[0], rel=1e-12)
    # float32 σ input still gives float64 output
    kappa32, _, _ = tables.lookup(torch.tensor([5]), torch.tensor([0.05], dtype=torch.float32))
    assert kappa32.dtype == F64


def test_lookup_single_atom_gives_zeros(tables):
    """n = 1 crystals get κ = K = S = 0 at every σ, next to a nonzero n = 2 entry."""
    sigma = torch.tensor([0.001, 0.005, 0.3, 1.0, 0.02], dtype=F64)
    sizes = torch.tensor([1, 1, 1, 1, 2])
    for value in tables.lookup(sizes, sigma):
        assert torch.equal(value[:4], torch.zeros(4, dtype=F64))
        assert value[4].item() > 0


def test_lookup_rejects_too_many_atoms(tables):
    """n = 53 raises ValueError naming the 52-atom limit."""
    with pytest.raises(ValueError, match="52"):
        tables.lookup(torch.tensor([5, 53]), torch.tensor([0.1, 0.1], dtype=F64))


def test_lookup_rejects_empty_crystal(tables):
    """n = 0 raises ValueError."""
    with pytest.raises(ValueError):
        tables.lookup(torch.tensor([0, 5]), torch.tensor([0.1, 0.1], dtype=F64))


@pytest.mark.parametrize("sigma", [5e-4, 1.5])
def test_lookup_rejects_sigma_outside_grid(tables, sigma):
    """σ below 1e-3 or above 1 raises ValueError."""
    with pytest.raises(ValueError, match="range"):
        tables.lookup(torch.tensor([5]), torch.tensor([sigma], dtype=F64))
