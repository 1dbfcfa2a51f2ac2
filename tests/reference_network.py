"""A literal implementation of docs/method.md §5 (the official CSPNet's structure), used as the reference.

Every edge gets the concatenated input ``[h̃_i ; h̃_j ; lattice ; Fourier(f_j − f_i)]`` and one
``Linear(2H + lattice + 6K → H)``, as in the official ``cspnet_v2.CSPNet`` with torch_scatter replaced by
torch ops. It is slow on purpose: the fast network must agree with it to float tolerance (tests), and the
benchmark measures both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from equicsp_core.network import CSPNet, DenoiserConfig, DenoiserOutput
from equicsp_core.schedules import time_embedding


def dense_edges(num_atoms: torch.Tensor) -> torch.Tensor:
    """All ordered pairs (i, j) of atoms of the same crystal, self-loops included: ``(2, Σ n²)``."""
    offsets = torch.cumsum(num_atoms, 0) - num_atoms
    parts = []
    for offset, n in zip(offsets.tolist(), num_atoms.tolist()):
        idx = torch.arange(n) + offset
        parts.append(torch.cartesian_prod(idx, idx).T)
    return torch.cat(parts, dim=1)


class ReferenceLayer(nn.Module):
    def __init__(self, hidden: int, lattice_dim: int, num_freqs: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden + lattice_dim + 6 * num_freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())

    def forward(self, h, lattice_feature, fourier, edges, batch):
        h_norm = self.norm(h)
        src, dst = edges
        edge_in = torch.cat([h_norm[src], h_norm[dst], lattice_feature[batch[src]], fourier], dim=1)
        messages = self.edge_mlp(edge_in)
        total = torch.zeros_like(h).scatter_add_(0, src[:, None].expand(-1, h.shape[1]), messages)
        count = torch.zeros(h.shape[0], dtype=h.dtype).scatter_add_(0, src, torch.ones_like(src, dtype=h.dtype))
        return h + self.node_mlp(torch.cat([h_norm, total / count[:, None]], dim=1))


class ReferenceCSPNet(nn.Module):
    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        if config.task == "csp":
            self.element_embedding = nn.Embedding(config.num_elements, hidden)
        else:
            self.type_embedding = nn.Linear(config.num_elements, hidden)
            self.type_head = nn.Linear(hidden, config.num_elements)
        self.node_in = nn.Linear(hidden + config.time_dim, hidden)
        self.layers = nn.ModuleList(
            ReferenceLayer(hidden, config.lattice_dim, config.num_freqs) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.coord_head = nn.Linear(hidden, 3, bias=False)
        if config.mode == "equicsp":
            self.score_head = nn.Linear(hidden, 3, bias=False)
            self.lattice_head = nn.Linear(hidden, 6, bias=False)
        else:
            self.lattice_head = nn.Linear(hidden, 9, bias=False)

    def forward(self, atoms, frac_coords, lattice, t, num_atoms, batch) -> DenoiserOutput:
        config = self.config
        edges = dense_edges(num_atoms)
        if config.mode == "equicsp":
            lattice_feature = lattice
        else:
            lattice_feature = (lattice @ lattice.transpose(-1, -2)).reshape(-1, 9)
        temb = time_embedding(t, config.time_dim).to(frac_coords.dtype)
        atom_features = self.element_embedding(atoms - 1) if config.task == "csp" else self.type_embedding(atoms)
        h = self.node_in(torch.cat([atom_features, temb[batch]], dim=1))
        diff = torch.remainder(frac_coords[edges[1]] - frac_coords[edges[0]], 1.0)
        args = (2 * math.pi * diff[:, :, None] * torch.arange(config.num_freqs, dtype=diff.dtype)).reshape(len(diff), -1)
        fourier = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        for layer in self.layers:
            h = layer(h, lattice_feature, fourier, edges, batch)
        h = self.final_norm(h)
        count = torch.bincount(batch, minlength=len(num_atoms)).to(h.dtype)[:, None]
        crystal_h = torch.zeros(len(num_atoms), h.shape[1], dtype=h.dtype).index_add_(0, batch, h) / count
        atom_h = h + crystal_h[batch] if config.crystal_mean_heads else h
        coord = self.coord_head(atom_h)
        types = self.type_head(atom_h) if config.task == "generation" else None
        if config.mode == "equicsp":
            return DenoiserOutput(self.lattice_head(crystal_h), coord, self.score_head(atom_h), types)
        return DenoiserOutput(self.lattice_head(crystal_h).reshape(-1, 3, 3) @ lattice, coord, None, types)


def fast_from_reference(reference: ReferenceCSPNet) -> CSPNet:
    """A :class:`CSPNet` with the reference's weights, the first edge Linear sliced into its blocks."""
    config = reference.config
    hidden, lattice_dim, k3 = config.hidden_dim, config.lattice_dim, 3 * config.num_freqs
    fast = CSPNet(config).to(next(reference.parameters()).dtype)
    state = {}
    for name, value in reference.state_dict().items():
        if ".edge_mlp.0." in name:
            prefix = name.split("edge_mlp")[0]
            if name.endswith("bias"):
                state[prefix + "edge_src.bias"] = value
                continue
            cuts = [hidden, hidden, lattice_dim, k3, k3]
            blocks = value.split(cuts, dim=1)
            for block_name, block in zip(("edge_src", "edge_dst", "edge_lattice", "edge_sin", "edge_cos"), blocks):
                state[f"{prefix}{block_name}.weight"] = block
        elif ".edge_mlp.2." in name:
            state[name.replace("edge_mlp.2", "edge_out")] = value
        else:
            state[name] = value
    fast.load_state_dict(state)
    return fast
