"""Segment reductions over a flat batch, with torch's own ops (no torch_scatter).

``index`` assigns each row of ``values`` to a segment (an atom's crystal, an edge's source atom).
"""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``out[s] = Σ_{r: index[r] = s} values[r]``.

    Args:
        values: ``(R, ...)``.
        index: ``(R,)`` int64 in ``[0, num_segments)``.

    Returns:
        ``(num_segments, ...)``.
    """
    out = values.new_zeros((num_segments, *values.shape[1:]))
    # scatter_add with an expanded index, not index_add: faster on CPU for wide rows (BENCHMARKS.md).
    expanded = index.reshape(-1, *([1] * (values.dim() - 1))).expand_as(values)
    return out.scatter_add(0, expanded, values)


def segment_mean(values: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``out[s] = segment_sum[s] / counts[s]``; ``counts`` ``(S,)`` must be the segment sizes (> 0)."""
    total = segment_sum(values, index, counts.shape[0])
    return total / counts.to(total.dtype).reshape(-1, *([1] * (values.dim() - 1)))
