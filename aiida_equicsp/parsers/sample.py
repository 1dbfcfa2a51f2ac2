"""``EquiCSPSampleParser``: the files of ``equicsp sample`` or ``equicsp generate`` into nodes, or the exit code of
what went wrong.

Both programs write the same run folder (see the ``equicsp`` command's docstring); what the retrieved files mean:

- ``results/index.json`` lists every finished candidate; it is rewritten after each batch, so it is there
  as soon as one batch finished. Each valid candidate's CIF file becomes a ``StructureData`` in the
  ``structures`` namespace and every candidate an entry of the ``candidates`` Dict.
- ``results/run.json`` is written at the very end: with it the run is complete (``run_info``); without it
  the run stopped early and what was finished is kept (``ERROR_OUT_OF_MEMORY`` when the program said so,
  ``ERROR_PARTIAL_RESULTS`` otherwise, e.g. walltime).
- No ``index.json``: nothing finished; ``status.json`` (the program's ``--status-file``) says why (out of
  memory, a device the computer lacks, a formula, the checkpoint): its :class:`~equicsp_core.runfolder.Failure`
  maps to an exit code (:data:`EXIT_CODE_OF_FAILURE`), its one-line message fills the exit message; without it
  (the job was killed), ``ERROR_MISSING_OUTPUT`` with the last line of ``equicsp.err``.

Known failures return their exit code; the parser never raises for them.
"""

from __future__ import annotations

import json
from typing import Any

from aiida import orm
from aiida.engine import ExitCode
from aiida.parsers import Parser

from equicsp_core.pipeline import candidate_label, label_prefixes
from equicsp_core.runfolder import Failure, read_complete_run, read_status

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation, crystals_requested

#: The exit code of each failure of ``equicsp sample`` that has one of its own (others: ``ERROR_MISSING_OUTPUT``).
EXIT_CODE_OF_FAILURE = {
    Failure.OUT_OF_MEMORY: "ERROR_OUT_OF_MEMORY",
    Failure.DEVICE_UNAVAILABLE: "ERROR_DEVICE_NOT_AVAILABLE",
    Failure.INVALID_FORMULA: "ERROR_INVALID_COMPOSITION",
    Failure.UNUSABLE_CHECKPOINT: "ERROR_INCOMPATIBLE_CHECKPOINT",
}


class CandidateFileError(Exception):
    """A CIF file listed in ``index.json`` that was not retrieved or cannot be read."""


def read_retrieved_text(retrieved: orm.FolderData, path: str) -> str | None:
    """A retrieved file's text, or ``None`` when it was not retrieved."""
    try:
        return retrieved.base.repository.get_object_content(path, mode="r")
    except OSError:
        return None


def program_failure(retrieved: orm.FolderData, status_path: str, stderr_path: str) -> tuple[Failure | None, str]:
    """Why the program failed: ``(failure of its status file, message)``.

    Without a readable status file (the job was killed) the failure is ``None`` and the message is the last
    line of stderr.
    """
    text = read_retrieved_text(retrieved, status_path)
    if text is not None:
        try:
            failure, error = read_status(text)
        except ValueError:
            failure, error = None, None
        if failure is not None:
            return failure, error or failure.value
    lines = [line.strip() for line in (read_retrieved_text(retrieved, stderr_path) or "").splitlines() if line.strip()]
    return None, lines[-1] if lines else "none (stderr empty)"


class EquiCSPSampleParser(Parser):
    """Parse the retrieved ``results/`` folder and ``equicsp.err`` of an :class:`EquiCSPSampleCalculation`."""

    def parse(self, **kwargs: Any) -> ExitCode:
        """Store the candidates that finished and return the exit code of the run (0 when complete)."""
        calc = EquiCSPSampleCalculation
        failure, error = program_failure(self.retrieved, calc.STATUS_FILENAME, calc.STDERR_FILENAME)
        index_text = self._read_text(calc.INDEX_PATH)
        if index_text is None:
            exit_code = self.exit_codes[EXIT_CODE_OF_FAILURE.get(failure, "ERROR_MISSING_OUTPUT")]
            return exit_code.format(error=error)
        try:
            entries = json.loads(index_text)["samples"]
            candidates = self._store_candidates(entries)
        except (ValueError, KeyError, TypeError) as error:
            return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(error=f"{calc.INDEX_PATH}: {error}")
        except CandidateFileError as error:
            return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(error=str(error))
        self.out("candidates", orm.Dict({"candidates": candidates}))

        run_text = self._read_text(calc.RUN_INFO_PATH)
        if run_text is None:
            if failure is Failure.OUT_OF_MEMORY:
                return self.exit_codes.ERROR_OUT_OF_MEMORY
            inputs = self.node.inputs
            compositions = inputs.compositions.get_list() if "compositions" in inputs else None
            requested = crystals_requested(inputs.num_samples.value, compositions)
            return self.exit_codes.ERROR_PARTIAL_RESULTS.format(written=len(candidates), requested=requested)
        try:
            run_info = read_complete_run(run_text)
        except ValueError as error:
            return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(error=f"{calc.RUN_INFO_PATH}: {error}")
        self.out("run_info", orm.Dict(run_info))
        return ExitCode(0)

    def _read_text(self, path: str) -> str | None:
        return read_retrieved_text(self.retrieved, path)

    def _store_candidates(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Output a ``StructureData`` per valid entry of ``index.json``; return the ``candidates`` list.

        Every listed CIF file is read before anything is output, so an unreadable one outputs nothing.

        Raises:
            ValueError, KeyError, TypeError: for malformed entries.
            CandidateFileError: for a listed CIF file that was not retrieved or cannot be read.
        """
        from pymatgen.core import Structure

        prefixes = label_prefixes(list(dict.fromkeys(entry["formula"] for entry in entries)))
        candidates, structures = [], {}
        for entry in entries:
            link_label = None
            if entry["valid"]:
                link_label = candidate_label(prefixes[entry["formula"]], int(entry["sample"]))
                path = f"{EquiCSPSampleCalculation.RESULTS_FOLDER}/{entry['file']}"
                cif = self._read_text(path)
                if cif is None:
                    raise CandidateFileError(f"{path} is listed in index.json but was not retrieved")
                try:
                    structure = Structure.from_str(cif, fmt="cif")
                except Exception as error:  # pymatgen's CIF parser raises many types
                    raise CandidateFileError(f"{path} is not a readable CIF file ({error})") from error
                structures[link_label] = orm.StructureData(pymatgen=structure)
            candidates.append({"formula": entry["formula"], "sample": int(entry["sample"]),
                               "formula_units": int(entry["formula_units"]), "cell_formula": str(entry["cell_formula"]),
                               "valid": bool(entry["valid"]), "link_label": link_label})
        for link_label, structure in structures.items():
            self.out(f"structures.{link_label}", structure)
        return candidates
