"""Predictor–corrector sampler (docs/method.md §7, §11 items 13–14, §7.3) and ab initio generation (§7.6)."""

from __future__ import annotations

import math

import pytest
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher

from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
from equicsp_core.lattice import (
    LOG_LENGTH_BOUND,
    lattice_from_parameters,
    lattice_to_equicsp,
    parameters_from_lattice,
)
from equicsp_core.network import DenoiserConfig, DenoiserOutput
from equicsp_core.checkpoint import CheckpointError
from equicsp_core.sampler import _coord_direction, noised_start, sample, time_grid
from equicsp_core.segment import segment_sum
from equicsp_core.torus import TWO_PI, com_free, wrap_centered, wrapped_normal_neg_score

TINY = DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4)


def perovskite() -> Crystal:
    """Cubic SrTiO3 (5 atoms), a = 3.905 Å."""
    frac = torch.tensor([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=torch.float64)
    return Crystal.from_arrays([38, 22, 8, 8, 8], frac, 3.905 * torch.eye(3, dtype=torch.float64))


def distorted_crystal() -> Crystal:
    """A triclinic 3-atom crystal, so that no symmetry hides a wrong lattice or wrong coordinates."""
    lattice = torch.tensor([[4.1, 0.0, 0.0], [0.7, 3.6, 0.0], [-0.4, 0.9, 5.2]], dtype=torch.float64)
    frac = torch.tensor([[0.11, 0.23, 0.37], [0.61, 0.48, 0.92], [0.35, 0.81, 0.55]], dtype=torch.float64)
    return Crystal.from_arrays([14, 8, 8], frac, lattice)


class Oracle(torch.nn.Module):
    """The exact denoiser for one known crystal: predictions computed from the clean F₀ and lattice (and, for a
    generation model, from its one-hot types A₀)."""

    def __init__(self, model: CrystalDiffusion, crystal: Crystal, copies: int) -> None:
        super().__init__()
        self.model = model
        self.frac0 = crystal.frac_coords.repeat(copies, 1)
        if model.mode == "equicsp":
            self.lattice0 = lattice_to_equicsp(crystal.lengths, crystal.angles).repeat(copies, 1)
        else:
            self.lattice0 = crystal.lattice.repeat(copies, 1, 1)
        self.types0 = torch.nn.functional.one_hot(crystal.atomic_numbers.repeat(copies) - 1, 100).double()
        self.dtype_anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # sample() reads dtype/device

    def forward(self, atoms, frac_coords, lattice, t, num_atoms, batch, graph=None) -> DenoiserOutput:
        schedules = self.model.schedules
        alpha_bar = schedules.alphas_cumprod[t].reshape(-1, *([1] * (lattice.dim() - 1)))
        lattice_noise = (lattice - alpha_bar.sqrt() * self.lattice0) / (1 - alpha_bar).sqrt()
        types = None
        if self.model.task == "generation":
            atom_alpha_bar = schedules.alphas_cumprod[t][batch, None]
            types = (atoms - atom_alpha_bar.sqrt() * self.types0) / (1 - atom_alpha_bar).sqrt()
        sigma = schedules.sigmas[t]
        eps = wrap_centered(frac_coords - self.frac0)
        if self.model.mode == "diffcsp":
            norm = self.model.score_norm[t].sqrt()[batch, None]
            return DenoiserOutput(lattice_noise, wrapped_normal_neg_score(eps, sigma[batch, None].expand_as(eps)) / norm,
                                  None, types)
        kappa, kappa_norm, sample_norm = self.model.tables.lookup(num_atoms, sigma)
        eps_bar = com_free(eps, batch, num_atoms)
        coord = wrap_centered(eps_bar) / sample_norm.sqrt()[batch, None]
        score = (TWO_PI * kappa)[batch, None] * torch.sin(TWO_PI * eps_bar) / kappa_norm.sqrt()[batch, None]
        return DenoiserOutput(lattice_noise, coord, score, types)


@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
@pytest.mark.parametrize("make_crystal", [perovskite, distorted_crystal])
def test_perfect_network_recovers_the_crystal(mode, make_crystal):
    """With the exact denoiser of one crystal, the 1000-step sampler returns that crystal (StructureMatcher),
    with F in [0, 1) and a finite lattice of positive volume."""
    crystal, copies = make_crystal(), 3
    model = CrystalDiffusion(DenoiserConfig(mode=mode, hidden_dim=8, num_layers=1, num_freqs=2),
                             DiffusionConfig(lattice_perm="none"))
    model.net = Oracle(model, crystal, copies)
    numbers = crystal.atomic_numbers.repeat(copies)
    result = sample(model, numbers, torch.full((copies,), crystal.num_atoms), generator=torch.Generator().manual_seed(0))
    frac = result.batch.frac_coords
    assert frac.min() >= 0 and frac.max() < 1
    matcher = StructureMatcher()
    for got in result.crystals():
        assert got is not None
        assert torch.linalg.det(got.lattice) > 0
        assert matcher.fit(got.to_structure(), crystal.to_structure())
        torch.testing.assert_close(got.lengths, crystal.lengths, rtol=1e-2, atol=0)


def test_same_seed_same_samples_and_different_seed_differs():
    """Sampling is a pure function of the seed."""
    torch.manual_seed(0)
    model = CrystalDiffusion(TINY).eval()
    numbers, counts = torch.tensor([38, 22, 8, 8, 8, 6, 6]), torch.tensor([5, 2])

    def run(seed):
        return sample(model, numbers, counts, steps=20, generator=torch.Generator().manual_seed(seed)).batch

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.frac_coords, c.frac_coords)
    assert a.frac_coords.min() >= 0 and a.frac_coords.max() < 1


def test_sample_rejects_bad_input():
    """Atom counts that do not add up, empty crystals and bad step settings raise ValueError."""
    model = CrystalDiffusion(TINY)
    with pytest.raises(ValueError, match="sums to"):
        sample(model, torch.tensor([8, 8]), torch.tensor([3]), steps=2)
    with pytest.raises(ValueError, match="at least one atom"):
        sample(model, torch.tensor([8]), torch.tensor([1, 0]), steps=2)
    with pytest.raises(ValueError, match="steps"):
        sample(model, torch.tensor([8]), torch.tensor([1]), steps=0)
    with pytest.raises(ValueError, match="step_lr"):
        sample(model, torch.tensor([8]), torch.tensor([1]), steps=2, step_lr=-1.0)
    with pytest.raises(ValueError, match="52"):
        sample(model, torch.full((53,), 6), torch.tensor([53]), steps=2)


def test_time_grid():
    """The full grid is T, T−1, …, 1; a sub-grid is strictly decreasing from T to 1."""
    assert time_grid(1000, 1000) == list(range(1000, 0, -1))
    grid = time_grid(50, 1000)
    assert len(grid) == 50 and grid[0] == 1000 and grid[-1] == 1
    assert all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError):
        time_grid(1001, 1000)


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 100, 200, 333, 999, 1000])
def test_even_time_grid_is_the_earlier_linspace_grid(steps):
    """power = 1 reproduces the grid every earlier figure was sampled on."""
    assert time_grid(steps, 1000) == torch.linspace(1000, 1, steps, dtype=torch.float64).round().long().tolist()


@pytest.mark.parametrize("power", [1.5, 2.0, 3.0])
def test_powered_time_grid_has_k_distinct_times_denser_at_small_t(power):
    """K distinct times from T down to 1; the gaps grow with t (more steps where the structure settles)."""
    grid = time_grid(100, 1000, power)
    assert len(grid) == 100 and grid[0] == 1000 and grid[-1] == 1
    gaps = [a - b for a, b in zip(grid, grid[1:])]
    assert all(gap >= 1 for gap in gaps)
    assert gaps[0] > 10 * gaps[-1]
    assert sum(t <= 100 for t in grid) > sum(t <= 100 for t in time_grid(100, 1000))
    with pytest.raises(ValueError, match="power must be a finite number >= 1"):
        time_grid(100, 1000, 0.5)


def round_trip_error(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Per crystal, the largest change of lengths (relative) or angles (degrees) through a lattice matrix."""
    lengths, angles = lengths.double(), angles.double()
    rebuilt_lengths, rebuilt_angles = parameters_from_lattice(lattice_from_parameters(lengths, angles))
    return torch.maximum(((rebuilt_lengths - lengths) / lengths).abs().amax(-1), (rebuilt_angles - angles).abs().amax(-1))


def test_canonical_lattice_of_sample_matches_its_parameters():
    """Returned lengths/angles rebuild a lattice whose own parameters are the same (no silent clamping):
    parameters that form no lattice (an impossible angle triple, which building the matrix would clamp) or
    that hit the log-length clamp come back as ``None``, never as a crystal of other parameters."""
    torch.manual_seed(0)
    untrained = CrystalDiffusion(TINY).eval()
    garbage = sample(untrained, torch.tensor([8, 8] * 3), torch.tensor([2] * 3), steps=1000,
                     generator=torch.Generator().manual_seed(3))
    impossible = round_trip_error(garbage.batch.lengths, garbage.batch.angles) > 1e-3
    assert impossible.any()
    assert all(crystal is None for crystal, bad in zip(garbage.crystals(), impossible) if bad)

    diverged = sample(untrained, torch.tensor([38, 22, 8, 8, 8] * 4), torch.full((4,), 5), steps=10,
                      generator=torch.Generator().manual_seed(0), lattice_bound=math.inf)
    clamped = (diverged.batch.lengths.double().log().abs() >= LOG_LENGTH_BOUND - 1e-6).any(-1)
    assert clamped.any() and not diverged.finite[clamped].any()
    assert all(crystal is None for crystal, hit in zip(diverged.crystals(), clamped) if hit)

    crystal, copies = distorted_crystal(), 2
    exact = CrystalDiffusion(DenoiserConfig(hidden_dim=8, num_layers=1, num_freqs=2), DiffusionConfig(lattice_perm="none"))
    exact.net = Oracle(exact, crystal, copies)
    result = sample(exact, crystal.atomic_numbers.repeat(copies), torch.full((copies,), crystal.num_atoms),
                    steps=100, generator=torch.Generator().manual_seed(0))
    assert (round_trip_error(result.batch.lengths, result.batch.angles) < 1e-6).all()
    for got, lengths, angles in zip(result.crystals(), result.batch.lengths, result.batch.angles):
        assert got is not None
        torch.testing.assert_close(got.lengths, lengths.double(), rtol=0, atol=0)
        torch.testing.assert_close(got.angles, angles.double(), rtol=0, atol=0)


def test_coordinate_direction_is_the_chain_rule_through_the_centre_of_mass():
    """``_coord_direction`` is ``−∇_ε log q(m(ε))``: the network's score on the CoM-free noise ``m(ε)``,
    carried back to ``ε`` through ``m``'s Jacobian (autograd here), for a score whose sum is not zero.

    The exact denoiser's score sums to zero per crystal, so with it the plain score and the chain rule agree;
    this score does not, so a sampler that used the plain score fails here."""
    model = CrystalDiffusion(DenoiserConfig(hidden_dim=8, num_layers=1, num_freqs=2))
    gen = torch.Generator().manual_seed(0)
    num_atoms = torch.tensor([3, 5])
    batch = torch.repeat_interleave(torch.arange(2), num_atoms)
    t, sigma = 400, float(model.schedules.sigmas[400])
    time = torch.full((2,), t)
    eps = (0.2 * torch.randn(8, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    eps_bar = com_free(eps, batch, num_atoms)
    _, kappa_norm, sample_norm = model.tables.lookup(num_atoms, torch.full((2,), sigma, dtype=torch.float64))
    neg_score = torch.randn(8, 3, generator=gen, dtype=torch.float64) + 0.5  # sums to ~4 per crystal and axis
    assert (segment_sum(neg_score, batch, 2).abs() > 0.5).all()
    out = DenoiserOutput(None, wrap_centered(eps_bar.detach()) / sample_norm.sqrt()[batch, None],
                         neg_score / kappa_norm.sqrt()[batch, None])

    direction = _coord_direction(model, out, time, sigma, num_atoms, batch)

    (chain_rule,) = torch.autograd.grad((neg_score * eps_bar).sum(), eps)
    torch.testing.assert_close(direction, chain_rule, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(segment_sum(direction, batch, 2), torch.zeros(2, 3, dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_ddpm_step_unclamped_is_the_papers_update():
    """Without a bound, the x̂₀ form equals (x_t − β/sqrt(1 − ᾱ_t) ε̂)/sqrt(α) for any gap t → t_prev."""
    from equicsp_core.sampler import _ddpm_step

    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    schedules = CrystalDiffusion(TINY).schedules
    for t, t_prev in [(1000, 999), (1000, 990), (500, 400), (2, 1), (1, 0)]:
        alpha_bar, alpha_bar_prev = float(schedules.alphas_cumprod[t]), float(schedules.alphas_cumprod[t_prev])
        alpha = alpha_bar / alpha_bar_prev
        papers = (x - (1 - alpha) / (1 - alpha_bar) ** 0.5 * eps) / alpha**0.5
        torch.testing.assert_close(_ddpm_step(x, eps, alpha_bar, alpha_bar_prev, math.inf), papers, rtol=1e-9, atol=1e-9)


def test_a_restricted_ddpm_step_uses_the_prediction_projected_onto_the_kept_elements_simplex():
    """keep = components 0 and 2 of 4: a predicted x̂₀ (0.2, 0.9, 0.6, −0.3) steps as if it were (0.25, 0, 0.75, 0);
    one with nothing kept left ((−0.1, 0.9, −0.2, 0.4)) as if it were uniform on the kept (0.5, 0, 0.5, 0)."""
    from equicsp_core.sampler import _ddpm_step

    schedules = CrystalDiffusion(TINY).schedules
    alpha_bar, alpha_bar_prev = float(schedules.alphas_cumprod[500]), float(schedules.alphas_cumprod[450])
    keep = torch.tensor([True, False, True, False])
    x = torch.tensor([[0.3, -0.7, 1.1, 0.2], [0.5, 0.1, -0.4, 0.9]], dtype=torch.float64)

    def noise_of(clean):  # the ε̂ whose x̂₀ is ``clean``
        return (x - alpha_bar**0.5 * clean) / (1 - alpha_bar) ** 0.5

    predicted = torch.tensor([[0.2, 0.9, 0.6, -0.3], [-0.1, 0.9, -0.2, 0.4]], dtype=torch.float64)
    projected = torch.tensor([[0.25, 0, 0.75, 0], [0.5, 0, 0.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(_ddpm_step(x, noise_of(predicted), alpha_bar, alpha_bar_prev, 1.0, keep=keep),
                               _ddpm_step(x, noise_of(projected), alpha_bar, alpha_bar_prev, 1.0), rtol=1e-9, atol=1e-9)


def test_bounded_ddpm_step_keeps_few_step_sampling_finite():
    """With a poor noise prediction, a 10-step sampler diverges unbounded but stays finite with the bound."""
    torch.manual_seed(0)
    model = CrystalDiffusion(TINY).eval()
    numbers, counts = torch.tensor([38, 22, 8, 8, 8] * 4), torch.full((4,), 5)
    bounded = sample(model, numbers, counts, steps=10, generator=torch.Generator().manual_seed(0))
    unbounded = sample(model, numbers, counts, steps=10, generator=torch.Generator().manual_seed(0), lattice_bound=math.inf)
    assert torch.isfinite(bounded.batch.lengths).all() and bounded.batch.lengths.max() <= 1100
    assert not unbounded.finite.all()


def test_bf16_sampling_path_returns_the_crystal_and_refuses_unknown_precision():
    """The bf16 path (autocast around the network, outputs cast back) still recovers the crystal with the
    exact denoiser; an unknown precision is refused. (bf16 accuracy on a trained model: BENCHMARKS.md.)"""
    crystal, copies = perovskite(), 2
    model = CrystalDiffusion(DenoiserConfig(hidden_dim=8, num_layers=1, num_freqs=2), DiffusionConfig(lattice_perm="none"))
    model.net = Oracle(model, crystal, copies)
    numbers, counts = crystal.atomic_numbers.repeat(copies), torch.full((copies,), crystal.num_atoms)
    result = sample(model, numbers, counts, steps=50, generator=torch.Generator().manual_seed(0), precision="bf16")
    matcher = StructureMatcher()
    assert all(got is not None and matcher.fit(got.to_structure(), crystal.to_structure()) for got in result.crystals())
    with pytest.raises(ValueError, match="precision"):
        sample(model, numbers, counts, steps=2, precision="fp16")


@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_perfect_network_generates_the_crystal_with_its_types(mode):
    """Ab initio: with the exact denoiser of one crystal (types included), the 1000-step generator returns that
    crystal, atom types as argmax + 1 of the diffused one-hot vectors, from nothing but its atom count."""
    crystal, copies = distorted_crystal(), 2
    model = CrystalDiffusion(DenoiserConfig(mode=mode, hidden_dim=8, num_layers=1, num_freqs=2, task="generation"),
                             DiffusionConfig(lattice_perm="none"))
    model.net = Oracle(model, crystal, copies)
    result = sample(model, None, torch.full((copies,), crystal.num_atoms), generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.batch.atomic_numbers, crystal.atomic_numbers.repeat(copies))
    matcher = StructureMatcher()
    for got in result.crystals():
        assert got is not None and matcher.fit(got.to_structure(), crystal.to_structure())


def test_generate_is_a_pure_function_of_the_seed_and_gives_types_in_range():
    """A random generation model: the same seed gives the same crystals (types included), another seed other
    ones; types are atomic numbers 1..100 and coordinates lie in [0, 1)."""
    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4, task="generation")).eval()
    counts = torch.tensor([5, 2, 3])

    def run(seed):
        return sample(model, None, counts, steps=20, generator=torch.Generator().manual_seed(seed)).batch

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.atomic_numbers, b.atomic_numbers) and torch.equal(a.frac_coords, b.frac_coords)
    assert not torch.equal(a.atomic_numbers, c.atomic_numbers)
    assert a.atomic_numbers.shape == (10,) and a.atomic_numbers.min() >= 1 and a.atomic_numbers.max() <= 100
    assert a.frac_coords.min() >= 0 and a.frac_coords.max() < 1


def test_generation_restricted_to_elements_draws_only_them_and_every_element_is_no_restriction():
    """A random generation model: with elements O, Ti, Sr every atom is one of them (unrestricted, the same seed
    draws others); allowing all 100 elements changes nothing, bit for bit."""
    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4, task="generation")).eval()
    counts = torch.tensor([5, 5, 4])

    def run(elements):
        return sample(model, None, counts, steps=20, generator=torch.Generator().manual_seed(1),
                      elements=elements).batch

    restricted, free, every = run([8, 22, 38]), run(None), run(range(1, 101))
    assert set(restricted.atomic_numbers.tolist()) <= {8, 22, 38}
    assert not set(free.atomic_numbers.tolist()) <= {8, 22, 38}
    assert torch.equal(every.atomic_numbers, free.atomic_numbers) and torch.equal(every.frac_coords, free.frac_coords)
    assert torch.equal(every.lengths, free.lengths)


def test_elements_are_refused_for_csp_and_outside_the_model_s_types():
    csp = CrystalDiffusion(TINY)
    generation = CrystalDiffusion(DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4, task="generation"))
    with pytest.raises(ValueError, match="elements restrict generation"):
        sample(csp, torch.tensor([8]), torch.tensor([1]), steps=2, elements=[8])
    for elements in ([], [0], [101]):
        with pytest.raises(ValueError, match=r"elements must be atomic numbers 1\.\.100 of the model"):
            sample(generation, None, torch.tensor([1]), steps=2, elements=elements)


def test_each_sampler_refuses_a_model_of_the_other_task():
    """CSP sampling of a generation model, and generation with a CSP model: one line naming the right command."""
    csp = CrystalDiffusion(TINY)
    generation = CrystalDiffusion(DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4, task="generation"))
    with pytest.raises(CheckpointError, match="ab initio generation model.*`equicsp generate`"):
        sample(generation, torch.tensor([8]), torch.tensor([1]), steps=2)
    with pytest.raises(CheckpointError, match=r"structure prediction \(CSP\) model.*`equicsp sample`"):
        sample(csp, None, torch.tensor([1]), steps=2)


@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_noised_start_is_the_forward_process_at_the_start_step(mode):
    """Re-noising a crystal to t₀ = 300 draws F₀ + σ_t₀ z (mod 1) and sqrt(ᾱ) C₀ + sqrt(1 − ᾱ) ε: over 4,000
    copies the wrapped displacement has mean 0 and std σ_t₀, the lattice mean sqrt(ᾱ) C₀ and std sqrt(1 − ᾱ)
    (tolerances 5 % of σ_t₀ and of sqrt(1 − ᾱ), 0.05 on the mean lattice; the standard errors are ~1 %)."""
    crystal, copies, t0 = distorted_crystal(), 4000, 300
    model = CrystalDiffusion(DenoiserConfig(mode=mode, hidden_dim=8, num_layers=1, num_freqs=2),
                             DiffusionConfig(lattice_perm="none")).double()
    start = CrystalBatch.collate([crystal] * copies, dtype=torch.float64)
    frac, lattice = noised_start(model, start, t0, torch.Generator().manual_seed(0))
    sigma, alpha_bar = float(model.schedules.sigmas[t0]), float(model.schedules.alphas_cumprod[t0])
    shift = wrap_centered(frac - start.frac_coords)
    assert frac.min() >= 0 and frac.max() < 1
    assert abs(float(shift.mean())) < 0.05 * sigma and float(shift.std()) == pytest.approx(sigma, rel=0.05)
    clean = (lattice_to_equicsp(crystal.lengths, crystal.angles) if mode == "equicsp" else crystal.lattice).double()
    torch.testing.assert_close(lattice.mean(0), alpha_bar**0.5 * clean, atol=0.05, rtol=0)
    assert float(lattice.std(0).mean()) == pytest.approx((1 - alpha_bar) ** 0.5, rel=0.05)


@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_resampling_from_a_distorted_copy_with_the_exact_denoiser_returns_the_crystal(mode):
    """SDEdit: with the exact denoiser of a crystal, 30 steps from t₀ = 400 starting at a distorted copy of it
    (coordinates moved by 0.03, lengths stretched by 4 %) return the crystal (StructureMatcher, lengths within 1 %)."""
    crystal, copies = distorted_crystal(), 2
    model = CrystalDiffusion(DenoiserConfig(mode=mode, hidden_dim=8, num_layers=1, num_freqs=2),
                             DiffusionConfig(lattice_perm="none"))
    model.net = Oracle(model, crystal, copies)
    distorted = Crystal(crystal.atomic_numbers, torch.remainder(crystal.frac_coords + 0.03, 1.0),
                        crystal.lengths * 1.04, crystal.angles)
    start = CrystalBatch.collate([distorted] * copies, dtype=torch.float64)
    result = sample(model, start.atomic_numbers, start.num_atoms, steps=30, start=start, start_step=400,
                    generator=torch.Generator().manual_seed(0))
    matcher = StructureMatcher()
    for got in result.crystals():
        assert got is not None and matcher.fit(got.to_structure(), crystal.to_structure())
        torch.testing.assert_close(got.lengths, crystal.lengths, rtol=1e-2, atol=0)


def test_resampling_refuses_inconsistent_start_settings():
    """A start step without start crystals, one outside 1..T, more steps than the start step, start crystals of
    other atoms and start crystals given to generation: each a ValueError naming the problem."""
    csp = CrystalDiffusion(TINY)
    start = CrystalBatch.collate([perovskite()])
    numbers, counts = start.atomic_numbers, start.num_atoms
    with pytest.raises(ValueError, match="give start crystals"):
        sample(csp, numbers, counts, steps=2, start_step=10)
    for bad in (None, 0, 1001):
        with pytest.raises(ValueError, match="start_step must be a time in 1..1000"):
            sample(csp, numbers, counts, steps=2, start=start, start_step=bad)
    with pytest.raises(ValueError, match="steps must be in 1..10"):
        sample(csp, numbers, counts, steps=20, start=start, start_step=10)
    with pytest.raises(ValueError, match="atoms differ"):
        sample(csp, torch.tensor([38, 22, 8, 8, 9]), counts, steps=2, start=start, start_step=10)
    generation = CrystalDiffusion(DenoiserConfig(hidden_dim=16, num_layers=1, num_freqs=4, task="generation"))
    with pytest.raises(ValueError, match="generation model draws the atoms"):
        sample(generation, None, counts, steps=2, start=start, start_step=10)
