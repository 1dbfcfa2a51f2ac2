"""The data protocol: which rows a model trains on, is selected on, and is reported on.

perov_5 has the papers' three files, used as the papers use them::

    train     = perov_5/train          selection = perov_5/val          report on perov_5/test

carbon_24, mp_20 and mpts_52 lack their train file here (``shared/data/README.md``). Each has
``<dataset>/reserved_test_rows.txt``, a fixed list of rows of its test file, and the protocol is::

    selection = a seeded 10 % of val (SELECTION_SEED, SELECTION_FRACTION)
    train     = val less the selection rows  +  the test rows that are not reserved
    reserved  = the reserved test rows: never trained on, selected on or tuned on; every figure is reported on them

For mp_20 that is 15,188 training rows (8,142 + 7,046), 905 selection rows and 2,000 reserved rows.
The selection draw is the one every earlier run of this project used (the first ``round(0.1 N)`` of
``torch.randperm(N)`` seeded 42), so a model trained "on val" before this protocol never saw the selection rows.

A split is a list of :class:`Row` — the file and the 0-based data row in it — so a run's provenance
names exactly the rows it used, and :func:`check_not_trained_on` can refuse to report on training rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from equicsp_core.crystal import Crystal
from equicsp_core.data import load_split, read_column, resolve_data_dir, split_path

SELECTION_SEED = 42
SELECTION_FRACTION = 0.1
RESERVED_FILE = "reserved_test_rows.txt"

#: Protocol split names; the file names ``val`` and ``test`` are accepted too (a whole file).
PROTOCOL_SPLITS: tuple[str, ...] = ("train", "selection", "reserved")
FILE_SPLITS: tuple[str, ...] = ("val", "test")


class Row(NamedTuple):
    """One crystal of the benchmark data: ``file`` is ``train``, ``val`` or ``test``; ``index`` its 0-based data row."""

    file: str
    index: int


def reserved_rows_path(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    return resolve_data_dir(data_dir) / dataset / RESERVED_FILE


def has_train_file(dataset: str, data_dir: str | os.PathLike | None = None) -> bool:
    try:
        split_path(dataset, "train", data_dir)
    except FileNotFoundError:
        return False
    return True


def reserved_test_rows(dataset: str, data_dir: str | os.PathLike | None = None) -> list[int]:
    """The reserved rows of ``<dataset>/test``, checked against the test file's ``material_id`` column.

    The file holds ``row<TAB>material_id`` lines after ``#`` comments; a row that is out of range, repeated,
    or whose id differs from the test file's is refused (it would mean another test file than the one listed).
    """
    path = reserved_rows_path(dataset, data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} has no reserved test rows ({path} does not exist)")
    ids = read_column(split_path(dataset, "test", data_dir), "material_id")
    rows: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            row, material_id = int(fields[0]), fields[1]
        except (ValueError, IndexError) as error:
            raise ValueError(f"{path}:{number}: expected 'row<TAB>material_id', got {line!r}") from error
        if not 0 <= row < len(ids) or str(ids[row]) != material_id:
            found = str(ids[row]) if 0 <= row < len(ids) else "no such row"
            raise ValueError(f"{path}:{number}: row {row} of {dataset}/test is not {material_id} ({found})")
        rows.append(row)
    if len(set(rows)) != len(rows):
        raise ValueError(f"{path} lists a row twice")
    return sorted(rows)


def selection_val_rows(num_val: int) -> list[int]:
    """The seeded ``SELECTION_FRACTION`` of ``num_val`` val rows held out for selection (sorted)."""
    order = torch.randperm(num_val, generator=torch.Generator().manual_seed(SELECTION_SEED)).tolist()
    return sorted(order[: max(1, round(SELECTION_FRACTION * num_val))])


def split_rows(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Row]:
    """The rows of a protocol split (``train``, ``selection``, ``reserved``) or of a whole file (``val``, ``test``)."""
    if split in FILE_SPLITS:
        return [Row(split, i) for i in range(_num_rows(dataset, split, data_dir))]
    if split not in PROTOCOL_SPLITS:
        choices = ", ".join(PROTOCOL_SPLITS + FILE_SPLITS)
        raise ValueError(f"unknown split {split!r}; choose one of {choices}")
    if has_train_file(dataset, data_dir):
        if split == "reserved":
            raise ValueError(f"{dataset} has no reserved rows: it has its own test file (use --split test)")
        file = "train" if split == "train" else "val"
        return [Row(file, i) for i in range(_num_rows(dataset, file, data_dir))]
    selection = selection_val_rows(_num_rows(dataset, "val", data_dir))
    if split == "selection":
        return [Row("val", i) for i in selection]
    reserved = reserved_test_rows(dataset, data_dir)
    if split == "reserved":
        return [Row("test", i) for i in reserved]
    held_out, kept_back = set(selection), set(reserved)
    return ([Row("val", i) for i in range(_num_rows(dataset, "val", data_dir)) if i not in held_out]
            + [Row("test", i) for i in range(_num_rows(dataset, "test", data_dir)) if i not in kept_back])


def report_split(dataset: str, data_dir: str | os.PathLike | None = None) -> str:
    """The split a dataset's figures are reported on: ``test`` with a train file, else ``reserved``."""
    return "test" if has_train_file(dataset, data_dir) else "reserved"


def check_not_trained_on(dataset: str, rows: list[Row], data_dir: str | os.PathLike | None = None) -> None:
    """Refuse rows that the protocol trains on (figures on them would be figures on training data)."""
    trained = set(split_rows(dataset, "train", data_dir)).intersection(rows)
    if trained:
        first = min(trained)
        raise ValueError(f"{len(trained)} of the {len(rows)} rows are training rows of {dataset} under the data "
                         f"protocol (e.g. {first.file} row {first.index}); report on --split "
                         f"{report_split(dataset, data_dir)}")


def load_rows(dataset: str, rows: list[Row], data_dir: str | os.PathLike | None = None,
              progress: bool = True) -> list[Crystal]:
    """The preprocessed crystals of ``rows``, in order (each file parsed once, from the cache when fresh)."""
    files = {file: load_split(dataset, file, data_dir, progress=progress) for file in {row.file for row in rows}}
    return [files[row.file][row.index] for row in rows]


def load_cifs(dataset: str, rows: list[Row], data_dir: str | os.PathLike | None = None) -> list[str]:
    """The ``cif`` text of ``rows``, in order (the ground truth of the papers' metrics: no Niggli reduction)."""
    files = {file: read_column(split_path(dataset, file, data_dir), "cif") for file in {row.file for row in rows}}
    return [files[row.file][row.index] for row in rows]


def _num_rows(dataset: str, file: str, data_dir: str | os.PathLike | None) -> int:
    return len(read_column(split_path(dataset, file, data_dir), "material_id"))
