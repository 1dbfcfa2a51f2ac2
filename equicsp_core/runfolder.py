"""The run folders of ``equicsp sample`` and ``equicsp relax``, and the command's exit statuses: one contract.

The engine's commands write these files and the AiiDA parsers (or anyone) read them; both sides use this
module, so neither reads the other's English::

    equicsp sample --out DIR
        DIR/<formula>_<iii>.cif  one per valid candidate, written with its batch; valid means a crystal whose
                                 CIF pymatgen reads back (:func:`readable_cif`)
        DIR/index.json           {header..., "samples": [{formula, sample, formula_units, cell_formula, valid,
                                 file}]}: every finished candidate (its requested formula, index within it,
                                 cell size Z and cell contents), rewritten after each batch (the header
                                 holds the run's settings)
        DIR/run.json             {"complete": true, "requested", "written", "valid", ...}: written last
    equicsp relax --out DIR
        DIR/relax.json           {"settings": {...}, "results": {label: {status, structure, energy_per_atom,
                                 steps, seconds, error, phonons}}}: rewritten after each structure
        DIR/run.json             {"complete": true, "counts", ...}: written last
    equicsp --status-file FILE <command> ...
        FILE                     {"exit_status": n, "failure": a Failure or null, "error": the one-line
                                 message or null}: written as the command ends, whatever the outcome

Every file is replaced atomically (:func:`equicsp_core.files.write_text_atomically`): a run stopped at any
moment leaves the finished part readable, and no ``run.json``. A run refused for bad input leaves no ``DIR``. The process exit status says only the kind
(2 refused input, 3 out of memory); :class:`Failure` in the status file says which input.
"""

from __future__ import annotations

import json
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from equicsp_core.files import write_text_atomically

if TYPE_CHECKING:
    from pymatgen.core import Structure

INDEX_FILENAME = "index.json"
RUN_FILENAME = "run.json"
RELAX_FILENAME = "relax.json"


class Failure(str, Enum):
    """Why an ``equicsp`` command failed: each has one cause, and the process exit status of its kind."""

    #: input refused before any work: a setting, a file, a folder
    BAD_INPUT = "bad_input"
    #: a formula the model cannot sample (unparsable, beyond its size limit or training domain)
    INVALID_FORMULA = "invalid_formula"
    #: the checkpoint is not a usable EquiCSP checkpoint
    UNUSABLE_CHECKPOINT = "unusable_checkpoint"
    #: the interatomic potential cannot be loaded
    UNUSABLE_POTENTIAL = "unusable_potential"
    #: the device ran out of memory; what finished is kept
    OUT_OF_MEMORY = "out_of_memory"
    #: a valid device this machine lacks (``cuda`` without a visible GPU): not worth retrying here
    DEVICE_UNAVAILABLE = "device_unavailable"
    #: stopped by Ctrl-C (SIGINT); what finished is kept
    INTERRUPTED = "interrupted"
    #: an error no other failure names (an unexpected exception: see the traceback on stderr)
    FAILED = "failed"

    @property
    def exit_status(self) -> int:
        """The process exit status: 2 refused input of any kind, 3 out of memory, 4 device not available, 130
        interrupted, 1 anything else."""
        return {Failure.OUT_OF_MEMORY: 3, Failure.DEVICE_UNAVAILABLE: 4, Failure.INTERRUPTED: 130,
                Failure.FAILED: 1}.get(self, 2)


def sample_file_name(formula: str, sample: int) -> str:
    """The CIF file of a candidate: ``SrTiO3_000.cif``."""
    return f"{formula}_{sample:03d}.cif"


def readable_cif(structure: Structure) -> tuple[str | None, str | None]:
    """``(cif, None)``: the CIF text of ``structure``, which pymatgen reads back; or ``(None, why)`` where it cannot.

    A sampled crystal passes :func:`equicsp_core.crystal.validate_crystal` yet may still be no readable CIF: atoms
    closer than the parser's site tolerance merge into one site of occupancy > 1, and a cell thinner than its
    threshold is dropped; the parser then finds no structure. A listed file that cannot be read would fail every
    reader of the folder (the AiiDA parser, ``equicsp evaluate-generation``), so such a sample is written as
    invalid instead.
    """
    from pymatgen.core import Structure

    cif = structure.to(fmt="cif")
    try:
        with warnings.catch_warnings():  # the parser's own warnings repeat what ``why`` says
            warnings.simplefilter("ignore")
            Structure.from_str(cif, fmt="cif")
    except Exception as error:  # noqa: BLE001 - pymatgen's CIF parser raises many types
        return None, f"pymatgen cannot read its CIF back ({' '.join(str(error).split())})"
    return cif, None


def write_index(out: Path, header: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """``index.json``: the run's header (settings, checkpoint) and every finished candidate."""
    write_text_atomically(out / INDEX_FILENAME, json.dumps({**header, "samples": samples}, indent=1))


def write_run(out: Path, run: dict[str, Any]) -> None:
    """``run.json``, the mark of a complete run: ``run`` with ``"complete": true``."""
    write_text_atomically(out / RUN_FILENAME, json.dumps({"complete": True, **run}, indent=1))


def write_relax(out: Path, settings: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """``relax.json``: the settings and each finished structure's result."""
    write_text_atomically(out / RELAX_FILENAME, json.dumps({"settings": settings, "results": results}))


def write_status(path: str | os.PathLike, failure: Failure | None, error: str | None) -> None:
    """The ``--status-file``: exit status, failure (``None``: success) and the one-line error message."""
    status = {"exit_status": 0 if failure is None else failure.exit_status,
              "failure": None if failure is None else failure.value, "error": error}
    write_text_atomically(Path(path), json.dumps(status))


def read_status(text: str) -> tuple[Failure | None, str | None]:
    """``(failure, error)`` of a status file's text: ``(None, None)`` for a success; an unknown failure reads as
    :attr:`Failure.FAILED`.

    Raises:
        ValueError: when the text is not a status file.
    """
    status = json.loads(text)
    if not isinstance(status, dict) or "failure" not in status:
        raise ValueError(f"not a status file: {text[:80]!r}")
    failure = status["failure"]
    if failure is None:
        return None, None
    return Failure(failure) if failure in Failure._value2member_map_ else Failure.FAILED, status.get("error")


def read_complete_run(text: str) -> dict[str, Any]:
    """The content of ``run.json``.

    Raises:
        ValueError: when it is not JSON or lacks ``"complete": true``.
    """
    run = json.loads(text)
    if not isinstance(run, dict) or run.get("complete") is not True:
        raise ValueError("no '\"complete\": true' entry")
    return run
