"""``EquiCSPRelaxCalculation``: relax structures with a machine-learned potential (``equicsp relax``) on any computer.

The job writes ``structures.json`` (link label → pymatgen structure dict) and ``relax.yaml`` (the settings of
:class:`equicsp_core.settings.RelaxSettings`) and runs the ``equicsp`` program of the code::

    equicsp --quiet relax --structures structures.json --input relax.yaml --out results

One job relaxes a whole set of candidates, so the potential's weights are loaded once. The ``device``
parameter (default ``auto``) puts the potential on the computer's GPU if it has one. ``relax.yaml`` always
sets ``threads`` (:func:`~aiida_equicsp.calculations.job_threads.job_threads`: the parameter, else the
``num_cores_per_mpiproc`` resource, else 1, since several jobs at once on one machine would otherwise
oversubscribe its cores, 10-30x slower here). A candidate whose relaxation fails is reported in ``results``
with the status ``failed`` and does not fail the job.
"""

from __future__ import annotations

import json
from typing import Any

from aiida import orm
from aiida.common.datastructures import CalcInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJobProcessSpec

from equicsp_core import runfolder
from equicsp_core.settings import RelaxSettings, SettingsError

from aiida_equicsp.calculations.base import EquiCSPCalcJob, validate_code
from aiida_equicsp.calculations.job_threads import job_threads


def validate_parameters(parameters: orm.Dict, _: Any) -> str | None:
    """The engine's own check of the relax settings (:class:`equicsp_core.settings.RelaxSettings`)."""
    try:
        RelaxSettings.from_mapping(parameters.get_dict())
    except SettingsError as error:
        return f"invalid relax parameters: {error}"
    return None


def validate_structures(structures: dict[str, orm.StructureData], _: Any) -> str | None:
    """At least one structure to relax."""
    if not structures:
        return "no structures to relax"
    return None


class EquiCSPRelaxCalculation(EquiCSPCalcJob):
    """Relax structures with a machine-learned interatomic potential (CHGNet by default)."""

    COMMAND = "relax"
    PARSER_NAME = "equicsp.relax"
    PROGRAM = "the relaxation"

    STRUCTURES_FILENAME = "structures.json"
    INPUT_FILENAME = "relax.yaml"
    RESULTS_PATH = f"{EquiCSPCalcJob.RESULTS_FOLDER}/{runfolder.RELAX_FILENAME}"

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:  # type: ignore[override]
        """Inputs with their validators, outputs, and the exit codes of the parser."""
        super().define(spec)
        spec.input_namespace("structures", valid_type=orm.StructureData, dynamic=True,
                             validator=validate_structures, help="the structures to relax, by link label")
        spec.input("parameters", valid_type=orm.Dict, required=False, validator=validate_parameters,
                   help=f"relax settings ({', '.join(RelaxSettings.keys())}); unset ones take the engine's defaults")
        spec.inputs.validator = validate_code

        spec.output_namespace("relaxed", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="each relaxed structure under its input's link label (failed ones absent)")
        spec.output("results", valid_type=orm.Dict,
                    help="per link label: status (converged, not_converged, failed), energy_per_atom (eV/atom), "
                         "steps, seconds, error, phonons (min_frequency_thz, imaginary_modes, stable, ...)")

        spec.exit_code(320, "ERROR_POTENTIAL", message="the potential could not be used: {error}")
        spec.exit_code(350, "ERROR_PARTIAL_RESULTS",
                       message="the relaxation stopped before the end (walltime?): {done} of {requested} done")

    def prepare_for_submission(self, folder: Folder) -> CalcInfo:
        """Write the structures and settings, and run ``equicsp relax`` into ``results/``."""
        structures = {label: node.get_pymatgen().as_dict() for label, node in self.inputs.structures.items()}
        with folder.open(self.STRUCTURES_FILENAME, "w") as handle:
            json.dump(structures, handle)
        settings = self.inputs.parameters.get_dict() if "parameters" in self.inputs else {}
        settings["threads"] = job_threads(settings, self.inputs.metadata.options.resources)
        self.write_yaml(folder, self.INPUT_FILENAME, settings)
        return self.calcinfo(["--structures", self.STRUCTURES_FILENAME, "--input", self.INPUT_FILENAME])
