"""Training losses of both modes and both tasks (docs/method.md §6, §7.6) and float32 symmetry tolerances."""

from __future__ import annotations

import pytest
import torch

from equicsp_core.crystal import Crystal, CrystalBatch
from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
from equicsp_core.network import DenoiserConfig

TINY = dict(hidden_dim=32, num_layers=2, num_freqs=8)


def random_batch(sizes=(1, 2, 5, 13), seed: int = 0, dtype=torch.float32) -> CrystalBatch:
    gen = torch.Generator().manual_seed(seed)
    crystals = []
    for n in sizes:
        lattice = torch.diag(3 + 3 * torch.rand(3, generator=gen, dtype=torch.float64)) + 0.5 * torch.rand(3, 3, generator=gen, dtype=torch.float64)
        crystals.append(Crystal.from_arrays(torch.randint(1, 90, (n,), generator=gen),
                                            torch.rand(n, 3, generator=gen, dtype=torch.float64), lattice))
    return CrystalBatch.collate(crystals, dtype=dtype)


@pytest.mark.parametrize(
    ("mode", "perm", "task", "terms"),
    [
        ("equicsp", "regularised", "csp", {"lattice", "coord", "score", "perm_lattice", "perm_coord"}),
        ("equicsp", "symmetrised", "csp", {"lattice", "coord", "score"}),
        ("equicsp", "none", "csp", {"lattice", "coord", "score"}),
        ("diffcsp", "none", "csp", {"lattice", "coord"}),
        ("equicsp", "regularised", "generation",
         {"lattice", "coord", "score", "perm_lattice", "perm_coord", "type", "perm_type"}),
        ("equicsp", "symmetrised", "generation", {"lattice", "coord", "score", "type"}),
        ("diffcsp", "none", "generation", {"lattice", "coord", "type"}),
    ],
)
def test_loss_terms_are_finite(mode, perm, task, terms):
    """Every mode and task returns its loss terms, all finite, with a differentiable total."""
    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig(mode=mode, task=task, **TINY), DiffusionConfig(lattice_perm=perm))
    out = model.loss(random_batch(), torch.Generator().manual_seed(0))
    assert set(out) == terms | {"loss"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_single_atom_batch_has_zero_coordinate_loss():
    """Single-atom crystals carry no coordinate target (ε̄ ≡ 0): the terms are 0, not NaN (docs/method.md §10.1)."""
    model = CrystalDiffusion(DenoiserConfig(**TINY))
    out = model.loss(random_batch(sizes=(1, 1)), torch.Generator().manual_seed(0))
    assert float(out["coord"]) == 0.0 and float(out["score"]) == 0.0
    assert torch.isfinite(out["loss"])


def test_diffcsp_refuses_lattice_permutation_treatment():
    """The DiffCSP baseline has no lattice-permutation option; asking for one is an error."""
    with pytest.raises(ValueError, match="lattice_perm"):
        CrystalDiffusion(DenoiserConfig(mode="diffcsp", **TINY), DiffusionConfig(lattice_perm="regularised"))


@pytest.mark.parametrize("task", ["csp", "generation"])
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_loss_falls_when_training_a_tiny_model(mode, task):
    """Fifty Adam steps on a fixed batch and fixed noise reduce the loss by a clear margin."""
    torch.manual_seed(0)
    perm = "regularised" if mode == "equicsp" else "none"
    model = CrystalDiffusion(DenoiserConfig(mode=mode, task=task, **TINY), DiffusionConfig(lattice_perm=perm))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = random_batch(sizes=(2, 5, 5, 8))
    losses = []
    for _ in range(50):
        loss = model.loss(batch, torch.Generator().manual_seed(1))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_float32_translation_and_integer_shift_tolerance():
    """In float32 the symmetries hold to 1e-4 absolute on O(1) outputs (docs/method.md §11 tolerances)."""
    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig())  # full size, float32
    batch = random_batch(sizes=(1, 5, 20))
    args = dict(atoms=batch.atomic_numbers, lattice=torch.randn(3, 6), t=torch.tensor([1, 500, 1000]),
                num_atoms=batch.num_atoms, batch=batch.batch)
    with torch.no_grad():
        out = model.net(frac_coords=batch.frac_coords, **args)
        shifted = torch.remainder(batch.frac_coords + torch.tensor([0.731, -0.402, 3.913]), 1.0)
        out_shifted = model.net(frac_coords=shifted, **args)
        out_integer = model.net(frac_coords=batch.frac_coords + torch.randint(-2, 3, batch.frac_coords.shape), **args)
    for a, b, c in zip(out, out_shifted, out_integer):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-4, rtol=0)


def test_symmetrised_twin_is_lattice_permutation_equivariant_where_the_regularised_model_is_not():
    """A random regularised model is far from equivariant; its symmetrised twin (same weights) is exact.

    float64, random crystals of mixed size (1 atom included); the tolerance 1e-10 is rounding.
    """
    from equicsp_core.diffusion import lattice_permutation_error, symmetrised

    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig(**TINY), DiffusionConfig(lattice_perm="regularised")).double()
    crystals = random_batch(sizes=(1, 3, 4, 7), seed=3, dtype=torch.float64)
    plain = lattice_permutation_error(model, crystals, torch.Generator().manual_seed(0))
    exact = lattice_permutation_error(symmetrised(model), crystals, torch.Generator().manual_seed(0))
    assert plain["lattice"] > 1e-3 and plain["coord"] > 1e-3
    assert exact["lattice"] < 1e-10 and exact["coord"] < 1e-10


def test_symmetrised_twin_shares_the_weights():
    from equicsp_core.diffusion import symmetrised

    model = CrystalDiffusion(DenoiserConfig(**TINY))
    twin = symmetrised(model)
    assert twin.net is model.net and twin.config.lattice_perm == "symmetrised"
    assert model.config.lattice_perm == "regularised"
    with pytest.raises(ValueError, match="only the EquiCSP denoiser"):
        symmetrised(CrystalDiffusion(DenoiserConfig(mode="diffcsp", **TINY), DiffusionConfig(lattice_perm="none")))


def test_generation_noises_one_hot_types_on_the_lattice_schedule():
    """The type noise the generation loss asks for is ε_A of A_t = sqrt(ᾱ_t) A₀ + sqrt(1 − ᾱ_t) ε_A, A₀ the
    one-hot types (N, 100), at each crystal's t, drawn after the CSP draws (so CSP streams are unchanged)."""
    model = CrystalDiffusion(DenoiserConfig(task="generation", **TINY)).double()
    crystals = random_batch(sizes=(2, 3), dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    t, _, _ = model._draw(crystals, (6,), generator)
    noisy, noise = model._network_atoms(crystals, t, generator)
    assert noisy.shape == noise.shape == (5, 100)
    alpha_bar = model.schedules.alphas_cumprod[t][crystals.batch, None]
    one_hot = (noisy - (1 - alpha_bar).sqrt() * noise) / alpha_bar.sqrt()
    expected = torch.nn.functional.one_hot(crystals.atomic_numbers - 1, 100).double()
    torch.testing.assert_close(one_hot, expected, atol=1e-6, rtol=0)
    csp = CrystalDiffusion(DenoiserConfig(**TINY))
    atoms, none = csp._network_atoms(crystals, t, generator)
    assert torch.equal(atoms, crystals.atomic_numbers) and none is None


def test_symmetrised_generation_twin_has_an_invariant_type_head():
    """lattice_permutation_error reports the type head for a generation model: far from invariant for a random
    regularised model, exact (rounding) for its symmetrised twin."""
    from equicsp_core.diffusion import lattice_permutation_error, symmetrised

    torch.manual_seed(0)
    model = CrystalDiffusion(DenoiserConfig(task="generation", **TINY)).double()
    crystals = random_batch(sizes=(1, 3, 4, 7), seed=3, dtype=torch.float64)
    plain = lattice_permutation_error(model, crystals, torch.Generator().manual_seed(0))
    exact = lattice_permutation_error(symmetrised(model), crystals, torch.Generator().manual_seed(0))
    assert set(plain) == {"lattice", "coord", "types"}
    assert plain["types"] > 1e-4
    assert exact["types"] < 1e-10 and exact["lattice"] < 1e-10 and exact["coord"] < 1e-10


def test_output_change_is_zero_for_the_same_weights_and_small_for_float16_ones():
    """output_change: 0 for a model against itself; a float16 rounding of every parameter moves the outputs of a
    random model by about the rounding (2^-11 a weight), not more than 1e-2; a generation model reports its types."""
    from equicsp_core.diffusion import output_change

    torch.manual_seed(0)
    for task in ("csp", "generation"):
        model = CrystalDiffusion(DenoiserConfig(task=task, **TINY))
        rounded = CrystalDiffusion(DenoiserConfig(task=task, **TINY))
        rounded.net.load_state_dict({name: tensor.half() for name, tensor in model.net.state_dict().items()})
        crystals = random_batch(sizes=(1, 3, 4, 7), seed=3)
        with torch.no_grad():
            same = output_change(model, model, crystals, torch.Generator().manual_seed(0))
            half = output_change(model, rounded, crystals, torch.Generator().manual_seed(0))
        assert set(same) == set(half) == ({"lattice", "coord"} | ({"types"} if task == "generation" else set()))
        assert all(value == 0.0 for value in same.values())
        assert all(0.0 < value < 1e-2 for value in half.values()), half
