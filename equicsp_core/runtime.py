"""Process-level settings that make the engine fast on a CPU, and keep its memory bounded.

glibc returns every freed block above its mmap threshold to the operating system, so each large
temporary of a forward pass (edge tensors of several MB) is freshly mapped and page-faulted again; on a
2-core machine that cost 10–30 % of a sampling step (BENCHMARKS.md). :func:`keep_freed_memory` asks
glibc to serve large blocks from the heap and not to trim it, so temporaries are reused.

Under bf16 autocast a CPU matmul is a oneDNN primitive, built for its exact shapes and kept in two caches
of 1024 entries (oneDNN's own and PyTorch's ideep layer). Training changes the shapes every batch (the
rows of an edge matmul are the batch's E = Σ N_i²), so the caches fill with primitives of past batches,
each holding memory that grows with its rows, interleaved in the heap with the step's temporaries: the
process grew by GBs over hundreds of steps (BENCHMARKS.md, "Memory of a long training run").
:func:`bound_onednn_caches` keeps :data:`ONEDNN_CACHE_CAPACITY` primitives, enough for the distinct
shapes of one step (18 in a CSP training step), so within a step and across the steps of a sampling loop
every primitive is still reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_LIMIT = 1 << 30

#: Primitives kept by each oneDNN cache (the libraries' default: 1024).
ONEDNN_CACHE_CAPACITY = 32
#: The variables read by oneDNN and by PyTorch's ideep layer, once, at their first bf16/oneDNN operation.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (no-op off glibc). Returns whether the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT))


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Cap both oneDNN primitive caches at ``capacity`` entries, unless the environment already sets them.

    Takes effect only if called before the process's first oneDNN operation (the libraries read the
    variables once); the ``equicsp`` program calls it first thing. Returns the values now in force.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return {name: os.environ.setdefault(name, str(capacity)) for name in ONEDNN_CACHE_VARIABLES}
