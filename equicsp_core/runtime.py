"""Process-level settings that make the engine fast on a CPU.

glibc returns every freed block above its mmap threshold to the operating system, so each large
temporary of a forward pass (edge tensors of several MB) is freshly mapped and page-faulted again; on a
2-core machine that cost 10–30 % of a sampling step (BENCHMARKS.md). :func:`keep_freed_memory` asks
glibc to serve large blocks from the heap and not to trim it, so temporaries are reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_LIMIT = 1 << 30


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
