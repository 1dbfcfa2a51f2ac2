"""File helpers every part of the project shares: the cache folder, a file's SHA-256, writing a file atomically, and
numbers as strict JSON holds them.

A reader of a file written by :func:`atomic_path` sees the old content or the new one, never half of it
(one ``rename`` on the same file system), so a run stopped at any moment leaves readable files.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: ``$EQUICSP_CACHE_DIR``, else ``~/.cache/equicsp`` (parsed data, the reference set)."""
    return Path(os.environ.get("EQUICSP_CACHE_DIR", Path.home() / ".cache" / "equicsp"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without error it replaces ``path``.

    ``with atomic_path(out) as tmp: torch.save(payload, tmp)``. On an error the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_number(value: float) -> float | str:
    """``value`` as strict JSON and AiiDA's database hold it: a finite number as is, an infinity or NaN as the text
    ``"inf"``, ``"-inf"`` or ``"nan"`` (Python writes them as ``Infinity``, which JSON lacks; ``float()`` reads the
    text back). The papers' unbounded lattice update is a ``lattice_bound`` of ``inf``."""
    return value if math.isfinite(value) else str(value)
