"""``EquiCSPSampleCalculation``: run ``equicsp sample`` on any computer and keep its candidates.

The job writes ``input.yaml`` (the sampling settings, the ``--input`` file of ``equicsp sample``), copies the
model's checkpoint as ``model.pt`` and runs the ``equicsp`` program of the code (on ``threads`` CPU threads:
:func:`~aiida_equicsp.calculations.job_threads.job_threads`; on the ``device`` of ``parameters``, default
``auto``: the computer's GPU if it has one)::

    equicsp --quiet sample --input input.yaml --checkpoint model.pt --out results

It knows nothing of torch: the program does the work, and the parser turns ``results/`` (the run folder
of :mod:`equicsp_core.runfolder`) and ``status.json`` into nodes or an exit code. Inputs are checked before
submission by the engine's own checks (:class:`equicsp_core.settings.SampleSettings`,
:func:`equicsp_core.domain.sampling_cells`), so a request the program would refuse is refused here, with the
same message.
"""

from __future__ import annotations

from typing import Any

from aiida import orm
from aiida.common.datastructures import CalcInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJobProcessSpec

from equicsp_core import runfolder
from equicsp_core.domain import sampling_cells
from equicsp_core.settings import SampleSettings, SettingsError

from aiida_equicsp.calculations.base import EquiCSPCalcJob, validate_code
from aiida_equicsp.calculations.job_threads import job_threads
from aiida_equicsp.data.model import EquiCSPModelData

#: Keys of the ``parameters`` input: every sampling setting but those with an input of their own.
PARAMETER_KEYS = tuple(key for key in SampleSettings.keys() if key not in ("formulas", "num_samples"))


def validate_compositions(compositions: orm.List, _: Any) -> str | None:
    """A non-empty list of distinct formula strings, each of which the engine can parse."""
    try:
        SampleSettings(formulas=compositions.get_list())
    except SettingsError as error:
        return f"invalid compositions: {error}"
    return None


def validate_num_samples(num_samples: orm.Int, _: Any) -> str | None:
    """At least one candidate per formula."""
    try:
        SampleSettings(formulas=["H"], num_samples=num_samples.value)
    except SettingsError as error:
        return str(error)
    return None


def validate_parameters(parameters: orm.Dict, _: Any) -> str | None:
    """Only the keys of :data:`PARAMETER_KEYS`, each valid (their values together: :func:`validate_inputs`;
    whether the device exists is known only where the job runs)."""
    values = parameters.get_dict()
    unknown = sorted(set(values) - set(PARAMETER_KEYS))
    if unknown:
        return f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMETER_KEYS)}"
    try:
        SampleSettings(formulas=["H"], **values)
    except SettingsError as error:
        return str(error)
    return None


def sample_request(inputs: dict[str, Any]) -> dict[str, Any]:
    """The content of ``input.yaml``: formulas, samples per formula and the given parameters."""
    request = {"formulas": list(inputs["compositions"].get_list()), "num_samples": inputs["num_samples"].value}
    if "parameters" in inputs:
        request.update(inputs["parameters"].get_dict())
    return request


def validate_inputs(inputs: dict[str, Any], _: Any) -> str | None:
    """The whole request, as ``equicsp sample`` will check it: the code, the model's size, domain and steps."""
    missing_code = validate_code(inputs, _)
    if missing_code is not None:
        return missing_code
    if any(name not in inputs for name in ("model", "compositions", "num_samples")):
        return None
    model: EquiCSPModelData = inputs["model"]
    try:
        settings = SampleSettings.from_mapping(sample_request(inputs))
        sampling_cells(settings, model.mode, model.dataset)
    except SettingsError as error:
        return str(error)
    if settings.steps is not None and settings.steps > model.num_steps:
        return f"steps must be <= the model's T = {model.num_steps}, got {settings.steps}"
    return None


class EquiCSPSampleCalculation(EquiCSPCalcJob):
    """Sample candidate crystal structures for formulas with a trained EquiCSP model (``equicsp sample``)."""

    COMMAND = "sample"
    PARSER_NAME = "equicsp.sample"
    PROGRAM = "the sampler"

    INPUT_FILENAME = "input.yaml"
    MODEL_FILENAME = "model.pt"
    INDEX_PATH = f"{EquiCSPCalcJob.RESULTS_FOLDER}/{runfolder.INDEX_FILENAME}"

    @classmethod
    def define(cls, spec: CalcJobProcessSpec) -> None:  # type: ignore[override]
        """Inputs with their validators, outputs, and the exit codes of the parser."""
        super().define(spec)
        spec.input("model", valid_type=EquiCSPModelData, help="the trained model (a checkpoint file)")
        spec.input("compositions", valid_type=orm.List, validator=validate_compositions,
                   help="formulas to sample, e.g. ['SrTiO3', 'Ca2Ti2O6']: a reduced formula at every cell size Z the "
                        "model supports (parameters: max_formula_units), one written with Z > 1 as that cell only")
        spec.input("num_samples", valid_type=orm.Int, validator=validate_num_samples,
                   help="candidates per formula")
        spec.input("parameters", valid_type=orm.Dict, required=False, validator=validate_parameters,
                   help=f"sampler settings ({', '.join(PARAMETER_KEYS)}); unset ones take the engine's defaults")
        spec.inputs.validator = validate_inputs

        spec.output_namespace("structures", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="every valid candidate, labelled <formula>_<sample>, e.g. SrTiO3_000")
        spec.output("candidates", valid_type=orm.Dict,
                    help="'candidates': one {formula, sample, formula_units, cell_formula, valid, link_label} per "
                         "sampled candidate (formula: as requested; formula_units: Z of its cell)")
        spec.output("run_info", valid_type=orm.Dict,
                    help="the sampler's run.json: counts, steps, device, seconds, versions")

        spec.exit_code(310, "ERROR_OUT_OF_MEMORY",
                       message="the sampler ran out of memory (finished batches are kept); lower `batch_size`")
        spec.exit_code(320, "ERROR_INVALID_COMPOSITION",
                       message="the sampler refused a composition: {error}")
        spec.exit_code(321, "ERROR_INCOMPATIBLE_CHECKPOINT",
                       message="the sampler cannot use the model's checkpoint: {error}")
        spec.exit_code(350, "ERROR_PARTIAL_RESULTS",
                       message="the sampler stopped before the end (walltime?): {written} of {requested} "
                               "candidates kept")

    def prepare_for_submission(self, folder: Folder) -> CalcInfo:
        """Write ``input.yaml``, copy the checkpoint in, and run ``equicsp sample`` into ``results/``."""
        request = sample_request(self.inputs)
        request["threads"] = job_threads(request, self.inputs.metadata.options.resources)
        self.write_yaml(folder, self.INPUT_FILENAME, request)
        model = self.inputs.model
        return self.calcinfo(["--input", self.INPUT_FILENAME, "--checkpoint", self.MODEL_FILENAME],
                             local_copy_list=[(model.uuid, model.filename, self.MODEL_FILENAME)])
