"""``EquiCSPRelaxParser``: ``results/relax.json`` of ``equicsp relax`` into relaxed structures and a results Dict.

``relax.json`` is rewritten after each structure, so what finished before a walltime is kept
(``ERROR_PARTIAL_RESULTS``); ``run.json`` marks a complete run. Without ``relax.json`` the program's status
file says why (a potential that cannot be loaded: ``ERROR_POTENTIAL``; a device the computer lacks:
``ERROR_DEVICE_NOT_AVAILABLE``; see :func:`~aiida_equicsp.parsers.sample.program_failure`).
"""

from __future__ import annotations

import json
from typing import Any

from aiida import orm
from aiida.engine import ExitCode
from aiida.parsers import Parser

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation
from equicsp_core.runfolder import Failure

from aiida_equicsp.parsers.sample import program_failure, read_retrieved_text

#: Keys every structure's entry of ``relax.json`` has, passed on to ``results`` (with ``phonons``, when asked for).
RESULT_KEYS = ("status", "energy_per_atom", "steps", "seconds", "error")


class EquiCSPRelaxParser(Parser):
    """Parse the retrieved ``results/`` folder and ``equicsp.err`` of an :class:`EquiCSPRelaxCalculation`."""

    def parse(self, **kwargs: Any) -> ExitCode:
        """Output each relaxed structure and the per-structure results; the exit code of the run."""
        from pymatgen.core import Structure

        calc = EquiCSPRelaxCalculation
        text = self._read_text(calc.RESULTS_PATH)
        if text is None:
            failure, error = program_failure(self.retrieved, calc.STATUS_FILENAME, calc.STDERR_FILENAME)
            if failure is Failure.DEVICE_UNAVAILABLE:
                return self.exit_codes.ERROR_DEVICE_NOT_AVAILABLE.format(error=error)
            if failure is Failure.UNUSABLE_POTENTIAL:
                return self.exit_codes.ERROR_POTENTIAL.format(error=error)
            return self.exit_codes.ERROR_MISSING_OUTPUT.format(error=error)
        try:
            entries = json.loads(text)["results"]
            relaxed = {label: Structure.from_dict(entry["structure"])
                       for label, entry in entries.items() if entry["structure"] is not None}
            results = {label: {**{key: entry[key] for key in RESULT_KEYS}, "phonons": entry.get("phonons")}
                       for label, entry in entries.items()}
        except (ValueError, KeyError, TypeError) as error:
            return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(error=f"{calc.RESULTS_PATH}: {error}")
        for label, structure in relaxed.items():
            self.out(f"relaxed.{label}", orm.StructureData(pymatgen=structure))
        self.out("results", orm.Dict(results))

        if self._read_text(calc.RUN_INFO_PATH) is None:
            return self.exit_codes.ERROR_PARTIAL_RESULTS.format(done=len(results),
                                                                requested=len(self.node.inputs.structures))
        return ExitCode(0)

    def _read_text(self, path: str) -> str | None:
        return read_retrieved_text(self.retrieved, path)
