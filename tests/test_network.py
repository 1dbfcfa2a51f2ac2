"""Symmetries of the denoiser (docs/method.md §11, items 1–6) on random crystals, and agreement with the
literal reference implementation of docs/method.md §5; both tasks (CSP, and ab initio generation whose type
head must be per-atom equivariant and invariant to everything else, docs/method.md §7.6)."""

from __future__ import annotations

import pytest
import torch

from equicsp_core.diffusion import CrystalDiffusion, DiffusionConfig
from equicsp_core.lattice import (
    PERMUTATIONS,
    equicsp_to_lattice,
    lattice_from_parameters,
    lattice_to_equicsp,
    parameters_from_lattice,
    permute_axes,
)
from equicsp_core.network import CSPNet, DenoiserConfig, fully_connected_graph
from tests.reference_network import ReferenceCSPNet, fast_from_reference

SIZES = [1, 2, 5, 13, 20]
TOL = 1e-9  # float64, relative to O(1) outputs
TASKS = ["csp", "generation"]


def small_config(mode: str = "equicsp", **kwargs) -> DenoiserConfig:
    return DenoiserConfig(mode=mode, hidden_dim=32, num_layers=2, num_freqs=8, **kwargs)


def random_inputs(mode: str, sizes=SIZES, seed: int = 0, task: str = "csp"):
    """Random crystals of mixed sizes as network inputs, float64; for generation the atoms are noisy one-hot
    types ``(N, 100)`` (a random one-hot vector plus unit Gaussian noise)."""
    gen = torch.Generator().manual_seed(seed)
    num_atoms = torch.tensor(sizes)
    n, b = int(num_atoms.sum()), len(sizes)
    lengths = 3 + 5 * torch.rand(b, 3, generator=gen, dtype=torch.float64)
    angles = 60 + 60 * torch.rand(b, 3, generator=gen, dtype=torch.float64)
    lattice = lattice_to_equicsp(lengths, angles) if mode == "equicsp" else lattice_from_parameters(lengths, angles)
    atoms = torch.randint(1, 101, (n,), generator=gen)
    if task == "generation":
        atoms = torch.nn.functional.one_hot(atoms - 1, 100).double() + torch.randn(n, 100, generator=gen, dtype=torch.float64)
    return {
        "atoms": atoms,
        "frac_coords": torch.rand(n, 3, generator=gen, dtype=torch.float64),
        "lattice": lattice,
        "t": torch.randint(1, 1001, (b,), generator=gen),
        "num_atoms": num_atoms,
        "batch": torch.repeat_interleave(torch.arange(b), num_atoms),
    }


def make_net(mode: str, seed: int = 0, **kwargs) -> CSPNet:
    """A random float64 network of :func:`small_config` (``task=...`` among the keywords)."""
    torch.manual_seed(seed)
    return CSPNet(small_config(mode, **kwargs)).double()


def assert_outputs_close(a, b, tol=TOL):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
            continue
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
@pytest.mark.parametrize("crystal_mean_heads", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_fast_network_equals_reference(mode, crystal_mean_heads, grad, task):
    """The restructured network (training and in-place sampling paths) computes exactly the maths of the
    literal per-edge implementation."""
    torch.manual_seed(1)
    reference = ReferenceCSPNet(small_config(mode, crystal_mean_heads=crystal_mean_heads, task=task)).double()
    fast = fast_from_reference(reference)
    inputs = random_inputs(mode, task=task)
    with torch.set_grad_enabled(grad):
        assert_outputs_close(reference(**inputs), fast(**inputs))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_output_shapes(mode, task):
    """Per-atom outputs (N, 3); lattice (B, 6) for EquiCSP, (B, 3, 3) for DiffCSP; the type noise (N, 100) in
    generation, none in CSP."""
    inputs = random_inputs(mode, task=task)
    out = make_net(mode, task=task)(**inputs)
    n, b = inputs["atoms"].shape[0], len(SIZES)
    assert out.coord.shape == (n, 3)
    assert out.lattice.shape == ((b, 6) if mode == "equicsp" else (b, 3, 3))
    assert (out.score is not None) == (mode == "equicsp")
    if mode == "equicsp":
        assert out.score.shape == (n, 3)
    assert (out.types is None) == (task == "csp")
    if task == "generation":
        assert out.types.shape == (n, 100)


def test_graph_counts():
    """Σ n(n−1)/2 unordered pairs and Σ n² directed edges, each atom the source of n edges."""
    num_atoms = torch.tensor(SIZES)
    graph = fully_connected_graph(num_atoms)
    assert graph.pair_src.numel() == sum(n * (n - 1) // 2 for n in SIZES)
    assert graph.src.numel() == sum(n * n for n in SIZES)
    assert torch.equal(torch.bincount(graph.src), torch.repeat_interleave(num_atoms, num_atoms))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_atom_and_crystal_permutation(mode, task):
    """Permuting atoms within crystals and the crystals' order permutes the outputs accordingly (the type
    head's rows too)."""
    net, inputs = make_net(mode, task=task), random_inputs(mode, task=task)
    out = net(**inputs)
    gen = torch.Generator().manual_seed(3)
    crystal_order = torch.randperm(len(SIZES), generator=gen)
    offsets = torch.cumsum(inputs["num_atoms"], 0) - inputs["num_atoms"]
    atom_order = torch.cat([offsets[c] + torch.randperm(SIZES[c], generator=gen) for c in crystal_order.tolist()])
    permuted = {
        "atoms": inputs["atoms"][atom_order],
        "frac_coords": inputs["frac_coords"][atom_order],
        "lattice": inputs["lattice"][crystal_order],
        "t": inputs["t"][crystal_order],
        "num_atoms": inputs["num_atoms"][crystal_order],
        "batch": torch.repeat_interleave(torch.arange(len(SIZES)), inputs["num_atoms"][crystal_order]),
    }
    out_p = net(**permuted)
    torch.testing.assert_close(out_p.coord, out.coord[atom_order], atol=TOL, rtol=TOL)
    torch.testing.assert_close(out_p.lattice, out.lattice[crystal_order], atol=TOL, rtol=TOL)
    if mode == "equicsp":
        torch.testing.assert_close(out_p.score, out.score[atom_order], atol=TOL, rtol=TOL)
    if task == "generation":
        torch.testing.assert_close(out_p.types, out.types[atom_order], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_periodic_translation_invariance(mode, task):
    """F → (F + t) mod 1 with per-crystal t (integer parts, wrap-around) leaves every output unchanged (the
    type head's included)."""
    net, inputs = make_net(mode, task=task), random_inputs(mode, task=task)
    out = net(**inputs)
    shift = torch.tensor([[0.3, -1.7, 2.45]], dtype=torch.float64) * torch.arange(1, len(SIZES) + 1)[:, None]
    moved = dict(inputs, frac_coords=torch.remainder(inputs["frac_coords"] + shift[inputs["batch"]], 1.0))
    assert_outputs_close(out, net(**moved))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_integer_shift_of_single_atoms(mode, task):
    """f_i → f_i + k with k ∈ Z³ per atom (unwrapped) leaves every output unchanged."""
    net, inputs = make_net(mode, task=task), random_inputs(mode, task=task)
    shifts = torch.randint(-3, 4, inputs["frac_coords"].shape, generator=torch.Generator().manual_seed(4))
    assert_outputs_close(net(**inputs), net(**dict(inputs, frac_coords=inputs["frac_coords"] + shifts)))


def random_orthogonal(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("task", TASKS)
def test_diffcsp_o3_equivariance(task):
    """DiffCSP: L → L R (R ∈ O(3), both determinants) gives ε̂_L → ε̂_L R and leaves ε̂_F (and the types'
    ε̂_A in generation) unchanged."""
    net, inputs = make_net("diffcsp", task=task), random_inputs("diffcsp", task=task)
    out = net(**inputs)
    for seed in (0, 1):
        rotation = random_orthogonal(seed)
        if seed == 1:
            rotation = rotation * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # flip the determinant
        rotated = net(**dict(inputs, lattice=inputs["lattice"] @ rotation))
        torch.testing.assert_close(rotated.lattice, out.lattice @ rotation, atol=TOL, rtol=TOL)
        torch.testing.assert_close(rotated.coord, out.coord, atol=TOL, rtol=TOL)
        if task == "generation":
            torch.testing.assert_close(rotated.types, out.types, atol=TOL, rtol=TOL)


def test_equicsp_generation_o3_invariance():
    """EquiCSP generation: the network fed the C of a rotated or reflected cell L R gives the same outputs, the
    type head's included, as for L (C is the network's one lattice input, and it is O(3)-invariant)."""
    net, inputs = make_net("equicsp", task="generation"), random_inputs("equicsp", task="generation")
    matrices = random_inputs("diffcsp")["lattice"]
    out = net(**dict(inputs, lattice=lattice_to_equicsp(*parameters_from_lattice(matrices))))
    for seed, flip in ((4, 1.0), (5, -1.0)):
        rotation = random_orthogonal(seed)
        rotation = rotation * torch.sign(torch.linalg.det(rotation)) * flip
        moved = lattice_to_equicsp(*parameters_from_lattice(matrices @ rotation))
        assert_outputs_close(net(**dict(inputs, lattice=moved)), out, tol=1e-8)


def test_equicsp_o3_invariance():
    """EquiCSP sees a lattice only as C = (log-lengths, −cot angles), the network's one lattice input: C of L R
    equals C of L for R ∈ O(3) of both determinants, while C keeps everything else of L (the lattice rebuilt
    from C has L's Gram matrix L Lᵀ) and a strain of L changes C. So rotated or reflected cells reach the
    network as the same input, and nothing but the orientation is lost on the way."""
    matrices = random_inputs("diffcsp")["lattice"]
    c_original = lattice_to_equicsp(*parameters_from_lattice(matrices))
    for seed, flip in ((2, 1.0), (3, -1.0)):
        rotation = random_orthogonal(seed)
        rotation = rotation * torch.sign(torch.linalg.det(rotation)) * flip  # det = flip (a sign of a 3x3 scales det)
        assert torch.isclose(torch.linalg.det(rotation), torch.tensor(flip, dtype=torch.float64))
        moved = matrices @ rotation
        assert not torch.allclose(moved, matrices)
        c_moved = lattice_to_equicsp(*parameters_from_lattice(moved))
        torch.testing.assert_close(c_moved, c_original, atol=1e-9, rtol=1e-9)
    rebuilt = lattice_from_parameters(*equicsp_to_lattice(c_original))
    torch.testing.assert_close(rebuilt @ rebuilt.transpose(-1, -2), matrices @ matrices.transpose(-1, -2),
                               atol=1e-9, rtol=1e-9)
    strain = torch.eye(3, dtype=torch.float64) + torch.tensor([[0.0, 0.02, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.01]],
                                                               dtype=torch.float64)
    c_strained = lattice_to_equicsp(*parameters_from_lattice(matrices @ strain))
    assert ((c_strained - c_original).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", ["equicsp", "diffcsp"])
def test_batch_independence(mode, task):
    """A crystal's outputs are the same alone as in a batch with others."""
    net, inputs = make_net(mode, task=task), random_inputs(mode, task=task)
    out = net(**inputs)
    offsets = torch.cumsum(inputs["num_atoms"], 0) - inputs["num_atoms"]
    for c, n in enumerate(SIZES):
        atoms = slice(int(offsets[c]), int(offsets[c]) + n)
        alone = net(
            atoms=inputs["atoms"][atoms], frac_coords=inputs["frac_coords"][atoms],
            lattice=inputs["lattice"][c:c + 1], t=inputs["t"][c:c + 1], num_atoms=inputs["num_atoms"][c:c + 1],
            batch=torch.zeros(n, dtype=torch.long),
        )
        torch.testing.assert_close(alone.coord, out.coord[atoms], atol=TOL, rtol=TOL)
        torch.testing.assert_close(alone.lattice, out.lattice[c:c + 1], atol=TOL, rtol=TOL)
        if task == "generation":
            torch.testing.assert_close(alone.types, out.types[atoms], atol=TOL, rtol=TOL)


def permuted_inputs(inputs, perm_index: int):
    """Relabel the lattice vectors of every crystal with PERMUTATIONS[perm_index] (C and F together)."""
    b = len(inputs["num_atoms"])
    crystal_perm = torch.full((b,), perm_index)
    atom_perm = torch.full((inputs["frac_coords"].shape[0],), perm_index)
    return dict(inputs, lattice=permute_axes(inputs["lattice"], crystal_perm),
                frac_coords=permute_axes(inputs["frac_coords"], atom_perm)), crystal_perm, atom_perm


def relative_discrepancy(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_lattice_permutation_relabels_the_same_crystal():
    """Permuting lengths and angles with the same P and F's columns with it leaves the Cartesian crystal
    (its Gram matrix up to relabelling and its interatomic distances) unchanged."""
    inputs = random_inputs("equicsp", sizes=[4])
    lengths, angles = inputs["lattice"][:, :3].exp(), torch.rad2deg(torch.arctan(inputs["lattice"][:, 3:]) + torch.pi / 2)
    lattice = lattice_from_parameters(lengths, angles)[0]
    cart = inputs["frac_coords"] @ lattice
    for p in range(1, 6):
        moved, _, atom_perm = permuted_inputs(inputs, p)
        lengths_p = moved["lattice"][:, :3].exp()
        angles_p = torch.rad2deg(torch.arctan(moved["lattice"][:, 3:]) + torch.pi / 2)
        cart_p = moved["frac_coords"] @ lattice_from_parameters(lengths_p, angles_p)[0]
        torch.testing.assert_close(torch.cdist(cart_p, cart_p), torch.cdist(cart, cart), atol=1e-9, rtol=1e-9)


def test_diffcsp_is_not_lattice_permutation_equivariant():
    """DiffCSP's network changes its prediction arbitrarily when the lattice vectors are relabelled."""
    net, inputs = make_net("diffcsp"), random_inputs("diffcsp")
    out = net(**inputs)
    for p in range(1, 6):
        matrix = torch.eye(3, dtype=torch.float64)[list(PERMUTATIONS[p])]
        perm_atoms = torch.full((inputs["frac_coords"].shape[0],), p)
        moved = dict(inputs, lattice=matrix @ inputs["lattice"], frac_coords=permute_axes(inputs["frac_coords"], perm_atoms))
        out_p = net(**moved)
        assert relative_discrepancy(out_p.coord, permute_axes(out.coord, perm_atoms)) > 1e-2


def symmetrised_model(seed: int = 0, task: str = "csp") -> CrystalDiffusion:
    torch.manual_seed(seed)
    return CrystalDiffusion(small_config("equicsp", task=task), DiffusionConfig(lattice_perm="symmetrised")).double()


def test_symmetrised_equicsp_is_exactly_lattice_permutation_equivariant():
    """ε̂^sym(PC, FPᵀ) = P ε̂^sym(C, F) for all five non-identity P (and the plain net is not)."""
    model, inputs = symmetrised_model(), random_inputs("equicsp")
    out = model.denoise(**inputs)
    raw = model.net(**inputs)
    for p in range(1, 6):
        moved, crystal_perm, atom_perm = permuted_inputs(inputs, p)
        out_p = model.denoise(**moved)
        torch.testing.assert_close(out_p.lattice, permute_axes(out.lattice, crystal_perm), atol=TOL, rtol=TOL)
        torch.testing.assert_close(out_p.coord, permute_axes(out.coord, atom_perm), atol=TOL, rtol=TOL)
        torch.testing.assert_close(out_p.score, permute_axes(out.score, atom_perm), atol=TOL, rtol=TOL)
        raw_p = model.net(**moved)
        assert relative_discrepancy(raw_p.coord, permute_axes(raw.coord, atom_perm)) > 1e-2


def test_symmetrised_generation_type_head_is_exactly_lattice_permutation_invariant():
    """ε̂_A^sym(PC, FPᵀ) = ε̂_A^sym(C, F) for all five non-identity P, with the lattice and coordinate outputs
    equivariant as in CSP (and the plain net's type head is not invariant)."""
    model, inputs = symmetrised_model(task="generation"), random_inputs("equicsp", task="generation")
    out, raw = model.denoise(**inputs), model.net(**inputs)
    for p in range(1, 6):
        moved, crystal_perm, atom_perm = permuted_inputs(inputs, p)
        out_p = model.denoise(**moved)
        torch.testing.assert_close(out_p.types, out.types, atol=TOL, rtol=TOL)
        torch.testing.assert_close(out_p.lattice, permute_axes(out.lattice, crystal_perm), atol=TOL, rtol=TOL)
        torch.testing.assert_close(out_p.coord, permute_axes(out.coord, atom_perm), atol=TOL, rtol=TOL)
        assert relative_discrepancy(model.net(**moved).types, raw.types) > 1e-3


@pytest.mark.parametrize("task", TASKS)
def test_symmetrised_keeps_the_other_symmetries(task):
    """Symmetrisation preserves periodic-translation invariance."""
    model, inputs = symmetrised_model(task=task), random_inputs("equicsp", task=task)
    shift = torch.tensor([0.37, -0.81, 1.26], dtype=torch.float64)
    assert_outputs_close(model.denoise(**inputs), model.denoise(**dict(inputs, frac_coords=inputs["frac_coords"] + shift)))


class _Symmetrised(torch.nn.Module):
    """An exactly equivariant stand-in for the network: the symmetrised prediction of a given model."""

    def __init__(self, model: CrystalDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.denoise(*args[:6], graph=None)


@pytest.mark.parametrize("task", TASKS)
def test_regulariser_vanishes_for_an_equivariant_network(task):
    """L_pC + L_pF (and the type head's invariance term in generation) is ~0 when the network is exactly
    equivariant, and clearly positive for the raw network."""
    from equicsp_core.crystal import Crystal, CrystalBatch

    gen = torch.Generator().manual_seed(5)
    crystals = [
        Crystal.from_arrays(torch.randint(1, 90, (n,), generator=gen), torch.rand(n, 3, generator=gen, dtype=torch.float64),
                            torch.diag(torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)) + 0.3 * torch.rand(3, 3, generator=gen, dtype=torch.float64))
        for n in SIZES
    ]
    batch = CrystalBatch.collate(crystals, dtype=torch.float64)
    torch.manual_seed(0)
    regularised = CrystalDiffusion(small_config("equicsp", task=task), DiffusionConfig(lattice_perm="regularised")).double()
    raw_terms = regularised.loss(batch, torch.Generator().manual_seed(0))
    assert raw_terms["perm_lattice"] + raw_terms["perm_coord"] > 1e-3
    assert ("perm_type" in raw_terms) == (task == "generation")
    if task == "generation":
        assert raw_terms["perm_type"] > 1e-6
    regularised.net = _Symmetrised(symmetrised_model(task=task))
    terms = regularised.loss(batch, torch.Generator().manual_seed(0))
    assert float(terms["perm_lattice"]) < 1e-20 and float(terms["perm_coord"]) < 1e-20
    assert float(terms.get("perm_type", 0.0)) < 1e-20
