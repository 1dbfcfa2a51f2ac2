"""Labelled structures from a file or folder: what ``equicsp relax --structures PATH`` reads.

The format follows from the path:

- a folder: the output folder of ``equicsp sample`` (``index.json`` and CIF files); every valid candidate,
  labelled by its CIF file's name without ``.cif`` (``SrTiO3_000``);
- ``*.json``: a mapping of label → pymatgen structure dict (``Structure.as_dict()``);
- ``*.cif``: every structure of the file (``data_`` blocks), labelled by the file's stem, with ``_<i>``
  (``_000``, ``_001``, ...) when the file holds more than one;
- ``*.extxyz`` / ``*.xyz``: every frame of an extended XYZ file (ASE), labelled by its ``label`` info key
  when it has one, else like the CIF blocks.

Labels must be distinct; any unreadable input raises a ValueError naming the path. The samples of an
``equicsp sample`` folder that produced no structure, and the settings it was written with, are in its
:class:`StructureSet` (:func:`read_structure_set`).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymatgen.core import Structure

#: Suffixes of the extended XYZ format.
EXTXYZ_SUFFIXES = (".extxyz", ".xyz")


@dataclass(frozen=True)
class StructureSet:
    """What one path holds: its labelled structures (file order) and, for an ``equicsp sample`` or ``generate``
    folder, the cell formulas of the samples that produced no structure (``unwritten``) and the settings the folder
    was written with (``settings``: its ``index.json`` without the list of samples, i.e. checkpoint and its sha256,
    steps, seed, step_lr, ...; ``steps`` as run, from ``run.json``, where the setting was the model's T). A file
    has no unwritten samples and no settings (None)."""

    structures: dict[str, Structure]
    unwritten: list[str]
    settings: dict[str, Any] | None


def read_structure_set(path: str | Path) -> StructureSet:
    """The :class:`StructureSet` of ``path`` (see the module docstring for the formats; a folder's ``index.json`` is
    read once). A folder whose samples all failed is a set of unwritten samples, not an error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown format, an unreadable file or folder, no structure (and no unwritten sample), or a
            label given twice.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    suffix = path.suffix.lower()
    if not path.is_dir() and suffix not in FILE_READERS:
        raise ValueError(f"cannot tell the format of {path}: give a .json, .cif, .extxyz or .xyz file, "
                         "or the output folder of `equicsp sample`")
    try:
        if path.is_dir():
            labelled, unwritten, settings = _read_sample_folder(path)
        else:
            labelled, unwritten, settings = FILE_READERS[suffix](path), [], None
    except Exception as error:  # the parsers (json, pymatgen, ASE) raise many types
        raise ValueError(f"cannot read structures from {path}: {error}") from error
    structures: dict[str, Structure] = {}
    for label, structure in labelled:
        if label in structures:
            raise ValueError(f"{path}: the label {label!r} is given more than once")
        structures[label] = structure
    if not structures and not unwritten:
        raise ValueError(f"no structures in {path}")
    return StructureSet(structures, unwritten, settings)


def read_structures(path: str | Path) -> dict[str, Structure]:
    """The labelled structures of ``path`` (see the module docstring for the formats), in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown format, an unreadable file, no structure, or a label given twice.
    """
    structures = read_structure_set(path).structures
    if not structures:
        raise ValueError(f"no structures in {path}")
    return structures


def _numbered(stem: str, count: int) -> list[str]:
    """Labels of ``count`` structures of one file: its stem alone, or ``<stem>_000``, ``<stem>_001``, ..."""
    return [stem] if count == 1 else [f"{stem}_{index:03d}" for index in range(count)]


def _read_json(path: Path) -> list[tuple[str, Structure]]:
    from pymatgen.core import Structure

    mapping = json.loads(path.read_text())
    if not isinstance(mapping, dict):
        raise ValueError("the file must hold a JSON object of label -> pymatgen structure dict")
    return [(str(label), Structure.from_dict(value)) for label, value in mapping.items()]


def _read_cif(path: Path) -> list[tuple[str, Structure]]:
    from pymatgen.io.cif import CifParser

    structures = CifParser(path).parse_structures(primitive=False)
    return list(zip(_numbered(path.stem, len(structures)), structures, strict=True))


def _read_extxyz(path: Path) -> list[tuple[str, Structure]]:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read(path, index=":", format="extxyz")
    labels = _numbered(path.stem, len(frames))
    return [(str(atoms.info.get("label", label)), AseAtomsAdaptor.get_structure(atoms))
            for label, atoms in zip(labels, frames, strict=True)]


#: The reader of each file suffix: the labelled structures of a file.
FILE_READERS = {".json": _read_json, ".cif": _read_cif, **{suffix: _read_extxyz for suffix in EXTXYZ_SUFFIXES}}


def _read_sample_folder(path: Path) -> tuple[list[tuple[str, Structure]], list[str], dict[str, Any]]:
    """A sample folder's valid candidates (labelled), the cell formulas of its unwritten samples and its settings
    (see :class:`StructureSet`), from one reading of ``index.json``."""
    from pymatgen.core import Structure

    index_path = path / "index.json"
    if not index_path.is_file():
        raise ValueError("the folder has no index.json: it is not an output folder of `equicsp sample`")
    index = json.loads(index_path.read_text())
    settings = {key: value for key, value in index.items() if key != "samples"}
    run = path / "run.json"
    if run.is_file():
        settings["steps"] = json.loads(run.read_text())["steps"]
    unwritten = [entry["cell_formula"] for entry in index["samples"] if not entry["valid"]]
    labelled = [(Path(entry["file"]).stem, Structure.from_file(path / entry["file"])) for entry in index["samples"]
                if entry["valid"]]
    return labelled, unwritten, settings
