"""The CSP benchmark splits (perov_5, carbon_24, mp_20, mpts_52), preprocessed and cached.

Each split is a gzip CSV with a ``cif`` column. Preprocessing follows docs/method.md §1.5: parse the CIF,
Niggli-reduce, rebuild on the canonical lattice of the reduced cell. The parsed tensors are cached
(keyed by the file's SHA-256 and the preprocessing version), so only the first run pays for pymatgen.

Where the data lives: the ``data_dir`` argument, else ``$EQUICSP_DATA_DIR``, else ``../shared/data``
next to the repository.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from equicsp_core.crystal import Crystal
from equicsp_core.files import atomic_path, cache_dir, file_sha256

DATASETS: tuple[str, ...] = ("perov_5", "carbon_24", "mp_20", "mpts_52")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Bump when the preprocessing changes, so stale caches are ignored.
PREPROCESSING_VERSION = 1

_REPO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``<dataset>/<split>.csv.gz``: argument, ``$EQUICSP_DATA_DIR``, ``../shared/data``."""
    path = Path(data_dir or os.environ.get("EQUICSP_DATA_DIR") or _REPO_DATA)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist (set --data-dir or EQUICSP_DATA_DIR)")
    return path


def split_path(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of one split file, with errors that name what is wrong."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = resolve_data_dir(data_dir) / dataset / f"{split}.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}/{split} is not available: {path} does not exist")
    return path


_cache_dir = cache_dir


def read_column(path: Path, column: str) -> list:
    """One column of a split file, in file order (memoised per file version: the protocol reads ids often)."""
    stat = path.stat()
    return list(_read_column(str(path), column, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _read_column(path: str, column: str, _mtime_ns: int, _size: int) -> tuple:
    import pandas as pd

    try:
        return tuple(pd.read_csv(path, usecols=[column])[column].tolist())
    except ValueError as error:  # pandas: "Usecols do not match columns"
        raise ValueError(f"{path} has no {column!r} column") from error


def cache_path(dataset: str, split: str, data_dir: str | os.PathLike | None = None, niggli: bool = True) -> Path:
    """The cache file of one split's parsed crystals in ``$EQUICSP_CACHE_DIR`` (keyed by the split file's SHA-256
    and :data:`PREPROCESSING_VERSION`). With the file there, :func:`load_split` imports no pymatgen."""
    digest = file_sha256(split_path(dataset, split, data_dir))
    return _cache_dir() / f"{dataset}_{split}_{digest[:16]}_v{PREPROCESSING_VERSION}_niggli{int(niggli)}.pt"


def load_split(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    niggli: bool = True,
    progress: bool = True,
) -> list[Crystal]:
    """Preprocessed crystals of one split (docs/method.md §1.5), from the cache when it is fresh."""
    path = split_path(dataset, split, data_dir)
    cache = cache_path(dataset, split, data_dir, niggli)
    if cache.is_file():
        try:
            return _unpack(torch.load(cache, weights_only=True))
        except Exception:  # a corrupt cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    crystals = parse_cifs(read_column(path, "cif"), niggli=niggli, progress=progress, desc=f"{dataset}/{split}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        torch.save(_pack(crystals), tmp)
    return crystals


def parse_cifs(cifs: list[str], niggli: bool = True, progress: bool = False, desc: str = "") -> list[Crystal]:
    """Parse CIF texts into crystals; a CIF that fails names its row in the error."""
    import warnings

    from pymatgen.core import Structure
    from tqdm import tqdm

    crystals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row, cif in enumerate(tqdm(cifs, desc=desc, disable=not progress, unit="cif")):
            try:
                structure = Structure.from_str(cif, fmt="cif")
                crystals.append(Crystal.from_structure(structure, niggli=niggli))
            except Exception as error:
                raise ValueError(f"row {row}{' of ' + desc if desc else ''}: bad CIF ({error})") from error
    return crystals


def _pack(crystals: list[Crystal]) -> dict[str, torch.Tensor]:
    return {
        "atomic_numbers": torch.cat([c.atomic_numbers for c in crystals]),
        "frac_coords": torch.cat([c.frac_coords for c in crystals]),
        "lengths": torch.stack([c.lengths for c in crystals]),
        "angles": torch.stack([c.angles for c in crystals]),
        "num_atoms": torch.tensor([c.num_atoms for c in crystals]),
    }


def _unpack(packed: dict[str, torch.Tensor]) -> list[Crystal]:
    sizes = packed["num_atoms"].tolist()
    numbers = packed["atomic_numbers"].split(sizes)
    coords = packed["frac_coords"].split(sizes)
    return [
        Crystal(numbers[i], coords[i], packed["lengths"][i], packed["angles"][i]) for i in range(len(sizes))
    ]


def data_fingerprint(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a split file, recorded in model cards."""
    return file_sha256(split_path(dataset, split, data_dir))
