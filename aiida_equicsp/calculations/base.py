"""``EquiCSPCalcJob``: what every job running the ``equicsp`` program shares.

A job writes its input files, runs one subcommand of the code's ``equicsp`` program into ``results/`` (a run
folder of :mod:`equicsp_core.runfolder`) and retrieves it with the program's status file and output streams::

    equicsp --quiet --status-file status.json <COMMAND> <arguments> --out results

The subclasses add their inputs, outputs and the exit codes only they have; the exit codes here are the
ones whose cause is the same for every subcommand (the parser of each maps :mod:`equicsp_core.runfolder`'s
failure statuses onto them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import yaml
from aiida.common.datastructures import CalcInfo, CodeInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJob, CalcJobProcessSpec

from equicsp_core import runfolder


def validate_code(inputs: dict[str, Any], _: Any) -> str | None:
    """A code to run: the ``equicsp`` program."""
    if "code" not in inputs:
        return "code is required: an installed equicsp program (verdi code create core.code.installed)"
    return None


class EquiCSPCalcJob(CalcJob):
    """A job of the ``equicsp`` program: one ``COMMAND`` run into :attr:`RESULTS_FOLDER`."""

    #: The ``equicsp`` subcommand the job runs, and the parser of its results.
    COMMAND: ClassVar[str]
    PARSER_NAME: ClassVar[str]
    #: Who writes the results, in exit messages: "the sampler", "the relaxation".
    PROGRAM: ClassVar[str]

    RESULTS_FOLDER = "results"
    RUN_INFO_PATH = f"{RESULTS_FOLDER}/{runfolder.RUN_FILENAME}"
    STDOUT_FILENAME = "equicsp.out"
    STDERR_FILENAME = "equicsp.err"
    STATUS_FILENAME = "status.json"

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:  # type: ignore[override]
        """The defaults of a serial job, the parser, and the exit codes every subcommand shares."""
        super().define(spec)
        options = spec.inputs["metadata"]["options"]
        options["parser_name"].default = cls.PARSER_NAME
        options["resources"].default = {"num_machines": 1, "num_mpiprocs_per_machine": 1}
        options["withmpi"].default = False

        spec.exit_code(300, "ERROR_MISSING_OUTPUT", message=f"{cls.PROGRAM} wrote no results; its last error: {{error}}")
        spec.exit_code(301, "ERROR_UNREADABLE_OUTPUT", message=f"{cls.PROGRAM}'s output could not be read: {{error}}")
        spec.exit_code(330, "ERROR_DEVICE_NOT_AVAILABLE", message="the computer lacks the requested device: {error}")

    @staticmethod
    def write_yaml(folder: Folder, filename: str, values: dict[str, Any]) -> None:
        """Write an input file of settings (``--input`` of the subcommand)."""
        with folder.open(filename, "w") as handle:
            yaml.safe_dump(values, handle, sort_keys=False)

    def calcinfo(self, arguments: Sequence[str], local_copy_list: Sequence[tuple[str, str, str]] = (),
                 command: str | None = None) -> CalcInfo:
        """The run of ``equicsp ... COMMAND <arguments> --out results`` and what is retrieved after it;
        ``command`` replaces :attr:`COMMAND` (the sample job runs ``generate`` for a generation model)."""
        codeinfo = CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = ["--quiet", "--status-file", self.STATUS_FILENAME, command or self.COMMAND,
                                   *arguments,
                                   "--out", self.RESULTS_FOLDER]
        codeinfo.stdout_name = self.STDOUT_FILENAME
        codeinfo.stderr_name = self.STDERR_FILENAME

        calcinfo = CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = list(local_copy_list)
        calcinfo.retrieve_list = [self.RESULTS_FOLDER, self.STDOUT_FILENAME, self.STDERR_FILENAME,
                                  self.STATUS_FILENAME]
        return calcinfo
