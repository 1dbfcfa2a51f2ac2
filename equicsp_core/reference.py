"""The reference set of known structures: the structures of the benchmark splits plus the elements.

Stability (energy above the convex hull) and novelty (:mod:`equicsp_core.stability`) compare candidates with
this set. It is **built**, never shipped: data never goes into git. ``equicsp reference build`` (or the first
use, when the data folder is found) reads every split file of the data folder
(:func:`equicsp_core.data.resolve_data_dir`: ``mp_20``, ``mpts_52``, ``perov_5``, ``carbon_24``; ``train``,
``val``, ``test`` where present) and writes one gzip JSON-lines file into the cache folder
(``$EQUICSP_CACHE_DIR``, else ``~/.cache/equicsp``):
``reference_set.jsonl.gz``. Each line is one entry::

    {"id": "mp-1234", "source": "mp_20", "lattice": [[3x3] Å], "species": ["Sr", ...],
     "frac_coords": [[x, y, z], ...], "e_above_hull": 0.0}

- ``id``: the data's ``material_id`` (``mp-1234``, ``C-148264-7891-51``); perov_5's integer ids become
  ``perov_5-<id>``; an element's ASE crystal is ``ase-<symbol>``;
- ``source``: the dataset (``ase`` for the added elements);
- ``lattice`` (rows are the lattice vectors, Å), ``species`` and ``frac_coords`` (one row per site) of the
  structure in the data's CIF, rounded to 8 decimals;
- ``e_above_hull``: the data's DFT energy above hull (eV/atom: mp_20 ``e_above_hull``, mpts_52
  ``energy_above_hull``), ``null`` where the data has none (perov_5, carbon_24, ase).

Deduplicated by ``id`` (mp_20 and mpts_52 share Materials Project ids; the first in the order above is kept),
sorted by ``id``. Elements: every element of the data without a ground state in it (no single-element entry at
``e_above_hull`` 0: the splits here hold only metastable Al, Sn, Cu, ...; none at all for Zn, Au, ...) gets
ASE's reference crystal (:func:`ase.build.bulk`, the room-temperature structure of
``ase.data.reference_states``), where ASE builds one (not for Cl, He, I, Mn, Pm, S, Se, Te, whose metastable
data entries must then do, nor for Pa, which is then a gap).

The file opens with a header line naming what it was built from: ``{"data_sha256": {"mp_20/val.csv": ...},
"format": 2, "versions": {"ase": ..., "pymatgen": ...}}``. The **data** is pinned, not the built bytes: the SHA-256
of each decompressed split file is in :data:`DATA_SHA256` (the values ``../shared/data/README.md`` lists), a
build from other data is refused before anything is parsed, and every load checks the header, so a candidate
is never compared with a set of unknown origin. The build is deterministic (same data, same pymatgen and ASE:
same bytes), but the bytes depend on the installed libraries (CIF parsing, ASE's crystals), so the set's own
SHA-256 (:attr:`ReferenceSet.sha256`, which keys the cached reference energies and is recorded in
the outputs) names the set built on this machine rather than being pinned.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from equicsp_core.files import atomic_path, cache_dir

if TYPE_CHECKING:
    from pymatgen.core import Structure

logger = logging.getLogger(__name__)

#: SHA-256 of each decompressed split file of the shared data folder that the reference set is built from.
DATA_SHA256 = {
    "mp_20/val.csv": "daeb7f21ab0ea292a81aad3b8d41fe62f68f9645c034b26a384340853f78359a",
    "mp_20/test.csv": "c8c606aa7d4c885c3acb28d6e320872fa32f572a23121c43361ebf3b213cae12",
    "mpts_52/val.csv": "b5d9f7a8ff72f3a1f24d6bb97e11ad201be40d10be7b27924234da06af04baba",
    "mpts_52/test.csv": "4d6e76c4726fb12fb2a7e5bb23594f9b82dbd9bf67b7bfd4866e9c74a8f49038",
    "perov_5/train.csv": "0d7f7e1973add8d7d57277f2933f9297a4ba1cb09098291a01c25f0f8454cf62",
    "perov_5/val.csv": "326f401219901270374b71e2faff63df3a29a99fd26f469993b9f476b693daf2",
    "perov_5/test.csv": "a85878c685037f0a578257f6d4fcdde00e968dbab73c5f1e90ecef65218513f6",
    "carbon_24/val.csv": "36c00689cd63073c954a58bc6ed6e2adb7aeed5a630c994970959a1babffd50e",
    "carbon_24/test.csv": "386b17c08816f434818d51e46687bf72ff3f92348f3ba24823e4758f1fe8a969",
}
#: The ``pin`` that means :data:`DATA_SHA256` (read when called, so a test may replace it).
PINNED = "pinned"
#: Version of the file layout (the header line); a file of another is refused with the rebuild hint.
FORMAT = 2
#: File name of the reference set in the cache folder.
REFERENCE_FILE = "reference_set.jsonl.gz"
#: Datasets read, in this order (the first of two entries with the same id is kept).
SOURCES = ("mp_20", "mpts_52", "perov_5", "carbon_24")
#: Split files read per dataset, where present.
SPLIT_FILES = ("train", "val", "test")
#: The data's energy-above-hull column per dataset (eV/atom).
E_ABOVE_HULL_COLUMNS = {"mp_20": "e_above_hull", "mpts_52": "energy_above_hull"}
#: Decimals kept of lattice vectors (Å) and fractional coordinates.
DECIMALS = 8
#: How to build the set, said by every message about a missing or refused one.
BUILD_HINT = "run `equicsp reference build` (it reads the data folder: --data-dir or $EQUICSP_DATA_DIR)"


class ReferenceSetError(ValueError):
    """The reference set is missing, cannot be built, or is not built from the pinned data: one line saying what to
    do."""


def composition_key(symbols: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """A reduced composition as sorted ``(element, count)`` pairs: Sr2Ti2O6 → ``(("O", 3), ("Sr", 1), ("Ti", 1))``.

    Pure Python (pymatgen's ``Composition`` costs 20 s over the whole set); equal for equal reduced formulas.
    """
    counts = Counter(symbols)
    divisor = math.gcd(*counts.values())
    return tuple(sorted((symbol, count // divisor) for symbol, count in counts.items()))


def key_of(formula_or_structure: str | Structure) -> tuple[tuple[str, int], ...]:
    """:func:`composition_key` of a formula (``"SrTiO3"``) or of an ordered structure's sites."""
    if isinstance(formula_or_structure, str):
        from pymatgen.core import Composition

        composition = Composition(formula_or_structure)
        return composition_key([element.symbol for element, count in composition.items() for _ in range(int(count))])
    return composition_key(site.specie.symbol for site in formula_or_structure)


@dataclass(frozen=True)
class ReferenceEntry:
    """One known structure: its id, dataset, cell and the data's energy above hull (eV/atom, ``None``: none)."""

    id: str
    source: str
    lattice: Sequence[Sequence[float]]
    species: tuple[str, ...]
    frac_coords: Sequence[Sequence[float]]
    e_above_hull: float | None

    @property
    def structure(self) -> Structure:
        """The entry as a pymatgen structure."""
        from pymatgen.core import Structure

        return Structure(self.lattice, self.species, self.frac_coords)

    @property
    def composition_key(self) -> tuple[tuple[str, int], ...]:
        """The reduced composition (:func:`composition_key`), by which entries and candidates are compared."""
        return composition_key(self.species)

    @property
    def elements(self) -> frozenset[str]:
        """The entry's elements."""
        return frozenset(self.species)

    def as_dict(self) -> dict[str, Any]:
        """The JSON line's mapping."""
        return {"id": self.id, "source": self.source, "lattice": [list(row) for row in self.lattice],
                "species": list(self.species), "frac_coords": [list(row) for row in self.frac_coords],
                "e_above_hull": self.e_above_hull}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReferenceEntry:
        return cls(values["id"], values["source"], values["lattice"], tuple(values["species"]), values["frac_coords"],
                   values["e_above_hull"])


def entry_of(entry_id: str, source: str, structure: Structure, e_above_hull: float | None) -> ReferenceEntry:
    """A reference entry of a structure, its numbers rounded to :data:`DECIMALS`."""
    def rounded(rows: Any) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(round(float(value), DECIMALS) + 0.0 for value in row) for row in rows)

    return ReferenceEntry(entry_id, source, rounded(structure.lattice.matrix),
                          tuple(site.specie.symbol for site in structure),
                          rounded(structure.frac_coords), None if e_above_hull is None else float(e_above_hull))


# --- build ----------------------------------------------------------------------------------------------------


def default_path() -> Path:
    """Where the reference set lives: ``reference_set.jsonl.gz`` in the cache folder."""
    return cache_dir() / REFERENCE_FILE


def data_folder(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder to build from (:func:`equicsp_core.data.resolve_data_dir`), or :class:`ReferenceSetError`."""
    from equicsp_core.data import resolve_data_dir

    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError as error:
        raise ReferenceSetError(f"no data folder to build the reference set from: {error}") from None


def split_files(folder: Path) -> list[Path]:
    """The split files of ``folder`` the set is built from, in :data:`SOURCES` then :data:`SPLIT_FILES` order.

    Raises :class:`ReferenceSetError` when there is none.
    """
    paths = [folder / source / f"{split}.csv.gz" for source in SOURCES for split in SPLIT_FILES]
    paths = [path for path in paths if path.is_file()]
    if not paths:
        raise ReferenceSetError(f"the data folder {folder} holds no split file (<dataset>/<split>.csv.gz)")
    return paths


def data_sha256(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """SHA-256 of each decompressed split file of the data folder, keyed ``"<dataset>/<split>.csv"``."""
    digests = {}
    for path in split_files(data_folder(data_dir)):
        with gzip.open(path, "rb") as handle:
            digests[f"{path.parent.name}/{path.stem}"] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def data_difference(digests: dict[str, str], pin: dict[str, str]) -> str | None:
    """The first difference of the split files' ``digests`` from ``pin``, in words, or ``None``."""
    for name in sorted(pin.keys() | digests.keys()):
        if name not in digests:
            return f"{name} is missing"
        if name not in pin:
            return f"{name} is not among the pinned files"
        if digests[name] != pin[name]:
            return f"{name} has SHA-256 {digests[name]}, not the pinned {pin[name]}"
    return None


def read_entries(data_dir: str | os.PathLike | None = None) -> list[ReferenceEntry]:
    """Every entry of the data folder's split files plus the missing elements, deduplicated, sorted by id.

    Raises :class:`ReferenceSetError` when the data folder has no split file at all.
    """
    import warnings

    import pandas as pd
    from pymatgen.core import Structure

    entries: dict[str, ReferenceEntry] = {}
    for path in split_files(data_folder(data_dir)):
        source = path.parent.name
        column = E_ABOVE_HULL_COLUMNS.get(source)
        table = pd.read_csv(path, usecols=["material_id", "cif", *([column] if column else [])])
        logger.info("reference set: reading %s/%s (%d structures)", source, path.name, len(table))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row in table.itertuples(index=False):
                material_id = str(row.material_id)
                entry_id = f"{source}-{material_id}" if source == "perov_5" else material_id
                if entry_id in entries:
                    continue
                structure = Structure.from_str(row.cif, fmt="cif")
                entries[entry_id] = entry_of(entry_id, source, structure, getattr(row, column) if column else None)
    entries.update({entry.id: entry for entry in element_entries(entries.values())})
    return [entries[key] for key in sorted(entries)]


def element_entries(entries: Iterable[ReferenceEntry]) -> list[ReferenceEntry]:
    """ASE's reference crystal of each element of ``entries`` without a ground state among them (no single-element
    entry with a data ``e_above_hull`` of 0), where ASE has one."""
    from ase.build import bulk
    from pymatgen.io.ase import AseAtomsAdaptor

    present: set[str] = set()
    grounded: set[str] = set()
    for entry in entries:
        present |= entry.elements
        if len(entry.elements) == 1 and entry.e_above_hull is not None and entry.e_above_hull <= 1e-6:
            grounded |= entry.elements
    added = []
    for symbol in sorted(present - grounded):
        try:
            atoms = bulk(symbol)
        except Exception:  # ASE has no crystal for it (a gas, an unknown structure): the element stays a gap
            logger.info("reference set: no elemental structure for %s", symbol)
            continue
        added.append(entry_of(f"ase-{symbol}", "ase", AseAtomsAdaptor.get_structure(atoms), None))
    return added


def header(digests: dict[str, str]) -> dict[str, Any]:
    """The first line of a set built from data with ``digests``: its origin, the layout and the libraries used."""
    from importlib.metadata import version

    return {"data_sha256": digests, "format": FORMAT,
            "versions": {package: version(package) for package in ("ase", "pymatgen")}}


def serialise(head: dict[str, Any], entries: Sequence[ReferenceEntry]) -> bytes:
    """The JSON lines of ``head`` then ``entries`` (keys sorted, no spaces): the bytes the set's SHA-256 is of."""
    return "".join(json.dumps(values, sort_keys=True, separators=(",", ":")) + "\n"
                   for values in [head, *(entry.as_dict() for entry in entries)]).encode()


def build_reference(data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
                    pin: dict[str, str] | str | None = PINNED) -> Path:
    """Build the reference set from the data folder into ``path`` (default :func:`default_path`).

    ``pin``: the expected SHA-256 of each decompressed split file (default :data:`DATA_SHA256`); other data is
    refused (:class:`ReferenceSetError`) before anything is parsed and nothing is written; ``None``: no check (a
    set of other data).
    """
    pin = DATA_SHA256 if pin == PINNED else pin
    digests = data_sha256(data_dir)
    difference = None if pin is None else data_difference(digests, pin)
    if difference:
        raise ReferenceSetError(f"the data folder {data_folder(data_dir)} is not the one the reference set is pinned "
                                f"to: {difference}")
    text = serialise(header(digests), read_entries(data_dir))
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write(text)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    logger.info("reference set: %s written (sha256 %s)", path, hashlib.sha256(text).hexdigest())
    return path


# --- load -----------------------------------------------------------------------------------------------------


class ReferenceSet:
    """The entries of a reference set, indexed by reduced formula; :attr:`sha256` names the set."""

    def __init__(self, entries: Sequence[ReferenceEntry], sha256: str) -> None:
        self.entries = list(entries)
        self.sha256 = sha256
        self.by_composition: dict[tuple[tuple[str, int], ...], list[ReferenceEntry]] = {}
        for entry in self.entries:
            self.by_composition.setdefault(entry.composition_key, []).append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def like(self, formula_or_structure: str | Structure) -> list[ReferenceEntry]:
        """The entries of the same reduced composition as a formula or a structure (``Sr2Ti2O6`` → SrTiO3's)."""
        return list(self.by_composition.get(key_of(formula_or_structure), []))

    def in_system(self, elements: Iterable[str]) -> list[ReferenceEntry]:
        """Every entry whose elements are among ``elements`` (the system and its subsystems, elements included)."""
        allowed = set(elements)
        return [entry for key, entries in self.by_composition.items()
                if all(symbol in allowed for symbol, _ in key) for entry in entries]

    def hull_references(self, elements: Iterable[str], cutoff: float, per_composition: int) -> list[ReferenceEntry]:
        """The entries of the system that go into its hull, at most ``per_composition`` per reduced formula.

        Per reduced formula: the entries whose data ``e_above_hull`` is at most ``cutoff`` (eV/atom), lowest
        first; a formula with no data ``e_above_hull`` at all (perov_5, carbon_24, ASE's elements) gives its
        entries in id order. Compounds whose every data value is above the cut-off are left out: the data
        places them above its own hull. An element always has a reference: its lowest entries even above the
        cut-off (the set lacks its ground state: Sn has only polymorphs 0.07 eV/atom above MP's hull), and ASE's
        crystal where the set has it.
        """
        chosen: dict[str, list[ReferenceEntry]] = {}
        for entry in self.in_system(elements):
            chosen.setdefault(entry.composition_key, []).append(entry)
        selected: list[ReferenceEntry] = []
        for entries in chosen.values():
            known = sorted((entry for entry in entries if entry.e_above_hull is not None),
                           key=lambda entry: (entry.e_above_hull, entry.id))
            unknown = sorted((entry for entry in entries if entry.e_above_hull is None), key=lambda entry: entry.id)
            if known:
                keep = [entry for entry in known if entry.e_above_hull <= cutoff]
            else:
                keep = [entry for entry in unknown if entry.source != "ase"]
            if len(entries[0].elements) == 1:
                keep = (keep or known)[:per_composition] + [entry for entry in unknown if entry.source == "ase"]
            else:
                keep = keep[:per_composition]
            selected += keep
        return sorted(selected, key=lambda entry: entry.id)


def load_reference(path: str | os.PathLike | None = None, pin: dict[str, str] | str | None = PINNED,
                   data_dir: str | os.PathLike | None = None) -> ReferenceSet:
    """The reference set at ``path`` (default :func:`default_path`), checked to be built from the ``pin``'s data.

    When the default file is missing, or of an older layout, and a data folder is found it is built first
    (minutes: every CIF is parsed). Raises :class:`ReferenceSetError` (one line saying how to build it) when it is
    missing and cannot be built, or when its header names other data than ``pin`` (default :data:`DATA_SHA256`;
    ``None``: any).
    """
    pin = DATA_SHA256 if pin == PINNED else pin
    target = Path(path) if path is not None else default_path()
    if not target.is_file() and path is not None:
        raise ReferenceSetError(f"no reference set at {target}: {BUILD_HINT}")
    if path is None and (not target.is_file() or layout(target) != FORMAT):
        try:
            logger.info("reference set: %s is %s; building it from the data folder", target,
                        "of an older layout" if target.is_file() else "missing")
            build_reference(data_dir, target, pin)
        except ReferenceSetError as error:
            raise ReferenceSetError(f"no reference set at {target} ({error}): {BUILD_HINT}") from None
    stat = target.stat()
    return _load(str(target), None if pin is None else json.dumps(pin, sort_keys=True), stat.st_mtime_ns,
                 stat.st_size)


def layout(path: Path) -> int | None:
    """The ``format`` of a set's header line; ``None`` for a file without one (the layout before the header)."""
    try:
        with gzip.open(path, "rb") as handle:
            head = json.loads(handle.readline() or b"null")
    except (OSError, EOFError, ValueError):
        return None
    return head.get("format") if isinstance(head, dict) and "data_sha256" in head else None


@functools.lru_cache(maxsize=4)
def _load(path: str, pin: str | None, _mtime_ns: int, _size: int) -> ReferenceSet:
    """The set at ``path`` (``pin``: the pinned digests as sorted JSON, hashable for the cache)."""
    try:
        with gzip.open(path, "rb") as handle:
            text = handle.read()
    except (OSError, EOFError) as error:
        raise ReferenceSetError(f"the reference set {path} cannot be read ({error}): {BUILD_HINT}") from None
    lines = text.splitlines()
    head = json.loads(lines[0]) if lines else {}
    if head.get("format") != FORMAT:
        raise ReferenceSetError(f"the reference set {path} has another layout than this version's (format "
                                f"{FORMAT}): delete it and {BUILD_HINT}")
    difference = None if pin is None else data_difference(head["data_sha256"], json.loads(pin))
    if difference:
        raise ReferenceSetError(f"the reference set {path} is built from other data than the pinned ({difference}): "
                                f"delete it and {BUILD_HINT}")
    entries = [ReferenceEntry.from_dict(values) for values in json.loads(b"[" + b",".join(lines[1:]) + b"]")]
    return ReferenceSet(entries, hashlib.sha256(text).hexdigest())
