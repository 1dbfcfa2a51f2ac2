"""The denoiser: CSPNet (docs/method.md §5) in EquiCSP and DiffCSP flavours, restructured for speed.

The maths is that of the official network; only the evaluation order differs. Each layer's first edge
Linear acts on ``[h̃_i ; h̃_j ; lattice ; Fourier(Δf_ij)]`` and is split by linearity:

* ``W_src h̃_i + W_lat x_{b(i)} + b`` and ``W_dst h̃_j`` are computed once per **atom** and gathered to
  the edges (instead of once per edge);
* the Fourier block is computed once per unordered **pair** ``i < j``: with ``Δf_ji = −Δf_ij`` the sine
  features change sign and the cosine features do not, so ``W_cos cos + W_sin sin`` gives edge ``i→j`` and
  ``W_cos cos − W_sin sin`` gives ``j→i``; self-loops (``Δf = 0``) reduce to the constant ``W_cos 1``;
* the Fourier features themselves are computed once per forward and shared by all layers.

For an n-atom crystal this replaces n² rows of a ``(2H + 6 + 6K) → H`` product by n rows of ``H → 2H`` and
``n(n−1)/2`` rows of ``6K → H``, which is most of the network's FLOPs.

Inputs are a flat batch (see :class:`equicsp_core.crystal.CrystalBatch`); the graph is fully connected
within each crystal, self-loops included (``E = Σ n²`` directed edges).

Two tasks (docs/method.md §7.6): ``"csp"`` takes the atoms as atomic numbers through an embedding table;
``"generation"`` (ab initio) takes them as noisy one-hot vectors ``(N, 100)`` through ``Linear(100 → H)`` and
adds a type head ``Linear(H → 100)`` (with bias) that predicts their noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from equicsp_core.schedules import time_embedding
from equicsp_core.segment import segment_mean, segment_sum

Mode = Literal["equicsp", "diffcsp"]
Task = Literal["csp", "generation"]


@dataclass(frozen=True)
class DenoiserConfig:
    """Network sizes; defaults are the papers' (docs/method.md §5).

    Attributes:
        mode: ``"equicsp"`` (lattice input C (B, 6), heads ε̂_C, ε̂_F, ŝ) or ``"diffcsp"`` (Gram-matrix
            input, lattice output ε̂_L = φ·L, one coordinate head).
        hidden_dim: H.
        num_layers: message-passing layers.
        num_freqs: K_f, Fourier frequencies per axis (features: 6 K_f).
        time_dim: sinusoidal time-embedding size.
        num_elements: element-embedding rows (atomic numbers 1..num_elements).
        crystal_mean_heads: add each crystal's mean to the per-atom heads (EquiCSP ``cspnet_v3``, mpts_52).
        task: ``"csp"`` (atom types given: an embedding of the atomic numbers) or ``"generation"`` (ab initio:
            noisy one-hot types in through ``Linear(num_elements → H)``, their noise out through a type head).
    """

    mode: Mode = "equicsp"
    hidden_dim: int = 512
    num_layers: int = 6
    num_freqs: int = 128
    time_dim: int = 256
    num_elements: int = 100
    crystal_mean_heads: bool = False
    task: Task = "csp"

    def __post_init__(self) -> None:
        if self.mode not in ("equicsp", "diffcsp"):
            raise ValueError(f"unknown mode {self.mode!r}; choose 'equicsp' or 'diffcsp'")
        if self.task not in ("csp", "generation"):
            raise ValueError(f"unknown task {self.task!r}; choose 'csp' or 'generation'")
        for name in ("hidden_dim", "num_layers", "num_freqs", "time_dim", "num_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_dim % 2 or self.time_dim < 4:
            raise ValueError(f"time_dim must be even and >= 4, got {self.time_dim}")

    @property
    def lattice_dim(self) -> int:
        """Size of the per-crystal lattice feature: C (6) or the flattened Gram matrix (9)."""
        return 6 if self.mode == "equicsp" else 9

    def to_dict(self) -> dict:
        return asdict(self)


class DenoiserOutput(NamedTuple):
    """Network predictions.

    Attributes:
        lattice: ``(B, 6)`` ε̂_C (EquiCSP) or ``(B, 3, 3)`` ε̂_L (DiffCSP).
        coord: ``(N, 3)`` ε̂_F.
        score: ``(N, 3)`` ŝ (EquiCSP) or ``None`` (DiffCSP).
        types: ``(N, num_elements)`` ε̂_A, the noise of the one-hot types (generation task), else ``None``.
    """

    lattice: torch.Tensor
    coord: torch.Tensor
    score: torch.Tensor | None
    types: torch.Tensor | None = None


class FullyConnectedGraph(NamedTuple):
    """Directed edges of the per-crystal complete graph with self-loops, ordered
    ``[i→j for pairs i<j] + [j→i for the same pairs] + [i→i]``.

    Attributes:
        pair_src, pair_dst: ``(P,)`` atoms of each unordered pair, ``P = Σ n(n−1)/2``.
        src, dst: ``(E,)`` with ``E = 2P + N``.
        degree: ``(N,)`` edges per source atom (= n of its crystal).
    """

    pair_src: torch.Tensor
    pair_dst: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    degree: torch.Tensor


def fully_connected_graph(num_atoms: torch.Tensor) -> FullyConnectedGraph:
    """Build the graph of a flat batch from its atom counts ``(B,)``."""
    device = num_atoms.device
    offsets = torch.cumsum(num_atoms, 0) - num_atoms
    src_parts, dst_parts = [], []
    for n in torch.unique(num_atoms).tolist():
        if n < 2:
            continue
        upper = torch.triu_indices(n, n, offset=1, device=device)
        starts = offsets[num_atoms == n][:, None]
        src_parts.append((starts + upper[0]).reshape(-1))
        dst_parts.append((starts + upper[1]).reshape(-1))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    pair_src = torch.cat(src_parts) if src_parts else empty
    pair_dst = torch.cat(dst_parts) if dst_parts else empty
    atoms = torch.arange(int(num_atoms.sum()), device=device)
    degree = torch.repeat_interleave(num_atoms, num_atoms)
    return FullyConnectedGraph(
        pair_src=pair_src,
        pair_dst=pair_dst,
        src=torch.cat([pair_src, pair_dst, atoms]),
        dst=torch.cat([pair_dst, pair_src, atoms]),
        degree=degree,
    )


def fourier_features(frac_coords: torch.Tensor, graph: FullyConnectedGraph, num_freqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine and cosine features of the pair differences ``Δf = f_j − f_i`` (pairs ``i < j``).

    Arguments ``2πk·w(Δf_d)`` for axis ``d`` and ``k = 0 … K−1`` (axis-major, frequency-minor); ``w``
    reduces ``Δf`` to (−½, ½], which changes no feature (integer frequencies) but keeps the arguments small.

    Returns:
        ``(sin, cos)``, each ``(P, 3K)``.
    """
    diff = frac_coords[graph.pair_dst] - frac_coords[graph.pair_src]
    diff = diff - torch.round(diff)
    freqs = 2 * math.pi * torch.arange(num_freqs, device=diff.device, dtype=diff.dtype)
    args = (diff[:, :, None] * freqs).reshape(diff.shape[0], 3 * num_freqs)
    return torch.sin(args), torch.cos(args)


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for ``(R, H)`` values, as ``gather`` with an expanded index: its backward is
    ``scatter_add_``, several times faster on CPU than ``index_select``/``index_add_`` (BENCHMARKS.md)."""
    return torch.gather(values, 0, index[:, None].expand(-1, values.shape[1]))


class CSPLayer(nn.Module):
    """One pre-LayerNorm message-passing layer (docs/method.md §5.3), first edge Linear split by linearity."""

    def __init__(self, hidden_dim: int, lattice_dim: int, num_freqs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.edge_src = nn.Linear(hidden_dim, hidden_dim)  # carries the first edge Linear's bias
        self.edge_dst = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.edge_lattice = nn.Linear(lattice_dim, hidden_dim, bias=False)
        self.edge_sin = nn.Linear(3 * num_freqs, hidden_dim, bias=False)
        self.edge_cos = nn.Linear(3 * num_freqs, hidden_dim, bias=False)
        self.edge_out = nn.Linear(hidden_dim, hidden_dim)
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU()
        )
        self._reset_like_one_linear(hidden_dim, lattice_dim, num_freqs)

    def _reset_like_one_linear(self, hidden_dim: int, lattice_dim: int, num_freqs: int) -> None:
        """Initialise the split blocks as slices of one ``Linear(2H + lattice + 6K → H)`` would be."""
        bound = 1.0 / math.sqrt(2 * hidden_dim + lattice_dim + 6 * num_freqs)
        for block in (self.edge_src, self.edge_dst, self.edge_lattice, self.edge_sin, self.edge_cos):
            nn.init.uniform_(block.weight, -bound, bound)
        nn.init.uniform_(self.edge_src.bias, -bound, bound)

    def forward(
        self,
        h: torch.Tensor,
        lattice_feature: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        graph: FullyConnectedGraph,
        batch: torch.Tensor,
    ) -> torch.Tensor:
        """``h ← h + φ_n([h̃ ; mean_j φ_e([h̃_i ; h̃_j ; lattice ; Fourier(Δf_ij)])])``.

        Args:
            h: ``(N, H)``.
            lattice_feature: ``(B, 6 | 9)``.
            sin, cos: ``(P, 3K)`` pair Fourier features.
        """
        h_norm = self.norm(h)
        source = self.edge_src(h_norm) + self.edge_lattice(lattice_feature)[batch]
        target = self.edge_dst(h_norm)
        pair_sin = self.edge_sin(sin)
        pair_cos = self.edge_cos(cos)
        self_loop = self.edge_cos.weight.sum(1)
        if torch.is_grad_enabled():
            fourier = torch.cat([pair_cos + pair_sin, pair_cos - pair_sin, self_loop.expand(h.shape[0], -1)])
            pre = gather_rows(source, graph.src) + gather_rows(target, graph.dst) + fourier
            messages = F.silu(self.edge_out(F.silu(pre)))
        else:  # sampling: the same maths written in place, which saves temporaries and passes over E×H
            pairs = pair_sin.shape[0]
            pre = h.new_empty((graph.src.shape[0], h.shape[1]))
            torch.add(pair_cos, pair_sin, out=pre[:pairs])
            torch.sub(pair_cos, pair_sin, out=pre[pairs:2 * pairs])
            pre[2 * pairs:] = self_loop
            pre += gather_rows(source, graph.src)
            pre += gather_rows(target, graph.dst)
            messages = F.silu(self.edge_out(F.silu(pre, inplace=True)), inplace=True)
        aggregated = segment_sum(messages, graph.src, h.shape[0]) / graph.degree[:, None].to(h.dtype)
        return h + self.node_mlp(torch.cat([h_norm, aggregated], dim=-1))


class CSPNet(nn.Module):
    """The denoiser ε̂_θ(A, F_t, lattice_t, t) of docs/method.md §5.

    Symmetries built in (exact): atom permutation, periodic translation of ``F`` (only differences enter,
    through integer-frequency features), and O(3) (EquiCSP: invariant inputs; DiffCSP: Gram input and
    ``φ·L`` output). Lattice-vector permutation is NOT built in; see :mod:`equicsp_core.diffusion`.
    """

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenoiserConfig()
        hidden = config.hidden_dim
        if config.task == "csp":
            self.element_embedding = nn.Embedding(config.num_elements, hidden)
        else:
            self.type_embedding = nn.Linear(config.num_elements, hidden)
            self.type_head = nn.Linear(hidden, config.num_elements)
        self.node_in = nn.Linear(hidden + config.time_dim, hidden)
        self.layers = nn.ModuleList(
            CSPLayer(hidden, config.lattice_dim, config.num_freqs) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.coord_head = nn.Linear(hidden, 3, bias=False)
        if config.mode == "equicsp":
            self.score_head = nn.Linear(hidden, 3, bias=False)
            self.lattice_head = nn.Linear(hidden, 6, bias=False)
        else:
            self.lattice_head = nn.Linear(hidden, 9, bias=False)

    def forward(
        self,
        atoms: torch.Tensor,
        frac_coords: torch.Tensor,
        lattice: torch.Tensor,
        t: torch.Tensor,
        num_atoms: torch.Tensor,
        batch: torch.Tensor,
        graph: FullyConnectedGraph | None = None,
    ) -> DenoiserOutput:
        """Predict the noise of a noisy flat batch.

        Args:
            atoms: ``(N,)`` atomic numbers, int in 1..num_elements (CSP task), or ``(N, num_elements)`` noisy
                one-hot types A_t (generation task).
            frac_coords: ``(N, 3)`` noisy fractional coordinates (any real values; only used mod 1).
            lattice: ``(B, 6)`` C_t (EquiCSP) or ``(B, 3, 3)`` L_t (DiffCSP).
            t: ``(B,)`` integer time steps.
            num_atoms: ``(B,)``.
            batch: ``(N,)`` crystal index per atom.
            graph: reuse a graph built by :func:`fully_connected_graph` for the same ``num_atoms``.
        """
        config = self.config
        graph = graph if graph is not None else fully_connected_graph(num_atoms)
        if config.mode == "equicsp":
            lattice_feature = lattice
        else:
            lattice_feature = (lattice @ lattice.transpose(-1, -2)).reshape(-1, 9)
        temb = time_embedding(t, config.time_dim).to(frac_coords.dtype)
        atom_features = self.element_embedding(atoms - 1) if config.task == "csp" else self.type_embedding(atoms)
        h = self.node_in(torch.cat([atom_features, temb[batch]], dim=-1))
        sin, cos = fourier_features(frac_coords, graph, config.num_freqs)
        for layer in self.layers:
            h = layer(h, lattice_feature, sin, cos, graph, batch)
        h = self.final_norm(h)
        crystal_h = segment_mean(h, batch, num_atoms)
        atom_h = h + crystal_h[batch] if config.crystal_mean_heads else h
        coord = self.coord_head(atom_h)
        types = self.type_head(atom_h) if config.task == "generation" else None
        if config.mode == "equicsp":
            return DenoiserOutput(self.lattice_head(crystal_h), coord, self.score_head(atom_h), types)
        phi = self.lattice_head(crystal_h).reshape(-1, 3, 3)
        return DenoiserOutput(phi @ lattice, coord, None, types)
