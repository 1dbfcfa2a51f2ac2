"""``EquiCSPSampleCalculation``: run ``equicsp sample`` or ``equicsp generate`` on any computer and keep its crystals.

The job writes ``input.yaml`` (the settings, the ``--input`` file of the program), copies the model's
checkpoint as ``model.pt`` and runs the ``equicsp`` program of the code (on ``threads`` CPU threads:
:func:`~aiida_equicsp.calculations.job_threads.job_threads`; on the ``device`` of ``parameters``, default
``auto``: the computer's GPU if it has one)::

    equicsp --quiet sample --input input.yaml --checkpoint model.pt --out results      # a CSP model
    equicsp --quiet generate --input input.yaml --checkpoint model.pt --out results    # a generation model

Structure prediction or ab initio generation: the model decides
    A model is trained for one task (:attr:`~aiida_equicsp.data.model.EquiCSPModelData.task`, from its
    checkpoint) and can do only that one, so the job takes no separate mode that could contradict it. A CSP
    model predicts structures of the given ``compositions`` (``num_samples`` per formula: ``equicsp sample``);
    a generation model draws whole crystals, atom types included, without ``compositions`` (``num_samples`` in
    all: ``equicsp generate``, ``parameters`` may fix ``num_atoms``). Both write the same run folder, read by
    the same parser into the same outputs, so the restart work chain and the queries serve both. A
    generation model given ``compositions``, or a CSP model given none, is refused before anything is stored.

It knows nothing of torch: the program does the work, and the parser turns ``results/`` (the run folder
of :mod:`equicsp_core.runfolder`) and ``status.json`` into nodes or an exit code. Inputs are checked before
submission by the engine's own checks (:class:`equicsp_core.settings.SampleSettings` and
:class:`~equicsp_core.settings.GenerateSettings`, :func:`equicsp_core.domain.sampling_cells`), so a request the
program would refuse is refused here, with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiida import orm
from aiida.common.datastructures import CalcInfo
from aiida.common.folders import Folder
from aiida.engine import CalcJobProcessSpec

from equicsp_core import runfolder
from equicsp_core.domain import check_generated_atoms, check_generated_elements, sampling_cells
from equicsp_core.settings import GenerateSettings, SampleSettings, SettingsError

from aiida_equicsp.calculations.base import EquiCSPCalcJob, validate_code
from aiida_equicsp.calculations.job_threads import job_threads
from aiida_equicsp.data.model import EquiCSPModelData

#: Keys of the ``parameters`` input for a CSP model: every sampling setting but those with an input of their own.
PARAMETER_KEYS = tuple(key for key in SampleSettings.keys() if key not in ("formulas", "num_samples"))
#: Keys of the ``parameters`` input for a generation model: every generation setting but ``num_samples``.
GENERATION_PARAMETER_KEYS = tuple(key for key in GenerateSettings.keys() if key != "num_samples")
#: The ``equicsp`` subcommand that uses a model of each task (:attr:`EquiCSPModelData.task`).
COMMAND_OF_TASK = {"csp": "sample", "generation": "generate"}


def validate_compositions(compositions: orm.List, _: Any) -> str | None:
    """A non-empty list of distinct formula strings, each of which the engine can parse."""
    try:
        SampleSettings(formulas=compositions.get_list())
    except SettingsError as error:
        return f"invalid compositions: {error}"
    return None


def validate_num_samples(num_samples: orm.Int, _: Any) -> str | None:
    """At least one crystal (per formula, for a CSP model)."""
    try:
        SampleSettings(formulas=["H"], num_samples=num_samples.value)
    except SettingsError as error:
        return str(error)
    return None


def validate_parameters(parameters: orm.Dict, _: Any) -> str | None:
    """Only keys of :data:`PARAMETER_KEYS` or :data:`GENERATION_PARAMETER_KEYS`, each valid (which task's keys,
    and their values together: :func:`validate_inputs`; whether the device exists is known only where the job
    runs)."""
    values = parameters.get_dict()
    allowed = list(dict.fromkeys(PARAMETER_KEYS + GENERATION_PARAMETER_KEYS))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        return f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
    try:
        SampleSettings(formulas=["H"], **{key: value for key, value in values.items() if key in PARAMETER_KEYS})
        GenerateSettings(num_samples=1, **{key: value for key, value in values.items()
                                           if key in GENERATION_PARAMETER_KEYS})
    except SettingsError as error:
        return str(error)
    return None


def sample_request(inputs: dict[str, Any]) -> dict[str, Any]:
    """The content of ``input.yaml``: the formulas (a CSP model's), the number of crystals and the parameters."""
    request = {"num_samples": inputs["num_samples"].value}
    if "compositions" in inputs:
        request = {"formulas": list(inputs["compositions"].get_list()), **request}
    if "parameters" in inputs:
        request.update(inputs["parameters"].get_dict())
    return request


def crystals_requested(num_samples: int, compositions: Sequence[str] | None) -> int:
    """How many crystals a request asks for: ``num_samples`` per formula, or in all without compositions (a
    generation model's)."""
    return num_samples * (1 if compositions is None else len(compositions))


def _task_problem(inputs: dict[str, Any], model: EquiCSPModelData) -> str | None:
    """Why the request does not fit the model's task (compositions, parameters of the other task), or ``None``."""
    what = f"the model EquiCSPModelData<{model.pk}> is"
    parameters = set(inputs["parameters"].get_dict()) if "parameters" in inputs else set()
    if model.task == "generation":
        if "compositions" in inputs:
            return (f"{what} an ab initio generation model: it draws the compositions itself; leave out "
                    "compositions (or sample them with a CSP model)")
        foreign = sorted(parameters - set(GENERATION_PARAMETER_KEYS))
        if foreign:
            return f"{what} an ab initio generation model: parameter(s) {', '.join(foreign)} are for CSP sampling"
        return None
    if "compositions" not in inputs:
        return (f"{what} a structure prediction (CSP) model: give the compositions to sample (ab initio "
                "generation needs a generation model)")
    foreign = sorted(parameters - set(PARAMETER_KEYS))
    if foreign:
        return (f"{what} a structure prediction (CSP) model: parameter(s) {', '.join(foreign)} are for ab initio "
                "generation")
    return None


def validate_inputs(inputs: dict[str, Any], _: Any) -> str | None:
    """The whole request, as the program will check it: the code, the model's task, size, domain and steps."""
    missing_code = validate_code(inputs, _)
    if missing_code is not None:
        return missing_code
    if any(name not in inputs for name in ("model", "num_samples")):
        return None
    model: EquiCSPModelData = inputs["model"]
    problem = _task_problem(inputs, model)
    if problem is not None:
        return problem
    try:
        if model.task == "generation":
            settings = GenerateSettings.from_mapping(sample_request(inputs))
            for count in settings.num_atoms or ():
                check_generated_atoms(count, model.mode, model.trained_atom_counts)
            check_generated_elements(settings.elements or (), model.dataset)
        else:
            settings = SampleSettings.from_mapping(sample_request(inputs))
            sampling_cells(settings, model.mode, model.dataset)
    except ValueError as error:  # SettingsError is one
        return str(error)
    if settings.steps is not None and settings.steps > model.num_steps:
        return f"steps must be <= the model's T = {model.num_steps}, got {settings.steps}"
    return None


class EquiCSPSampleCalculation(EquiCSPCalcJob):
    """Sample candidate crystal structures for formulas with a trained CSP model (``equicsp sample``), or generate
    crystals ab initio with a generation model (``equicsp generate``): the model's task decides (module docstring).
    """

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
        spec.input("compositions", valid_type=orm.List, required=False, validator=validate_compositions,
                   help="formulas to sample with a CSP model (required; a generation model takes none), e.g. "
                        "['SrTiO3', 'Ca2Ti2O6']: a reduced formula at every cell size Z the model supports "
                        "(parameters: max_formula_units), one written with Z > 1 as that cell only")
        spec.input("num_samples", valid_type=orm.Int, validator=validate_num_samples,
                   help="candidates per formula (a CSP model), crystals to generate (a generation model)")
        spec.input("parameters", valid_type=orm.Dict, required=False, validator=validate_parameters,
                   help=f"sampler settings (a CSP model: {', '.join(PARAMETER_KEYS)}; a generation model: "
                        f"{', '.join(GENERATION_PARAMETER_KEYS)}); unset ones take the engine's defaults")
        spec.inputs.validator = validate_inputs

        spec.output_namespace("structures", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="every valid candidate, labelled <formula>_<sample>, e.g. SrTiO3_000")
        spec.output("candidates", valid_type=orm.Dict,
                    help="'candidates': one {formula, sample, formula_units, cell_formula, valid, link_label} per "
                         "sampled candidate (formula: as requested, or the reduced formula a generated crystal "
                         "came out with; sample: its index per formula, or among all generated; formula_units: "
                         "Z of its cell)")
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
        """Write ``input.yaml``, copy the checkpoint in, and run ``equicsp sample`` (or ``generate``) into
        ``results/``."""
        request = sample_request(self.inputs)
        request["threads"] = job_threads(request, self.inputs.metadata.options.resources)
        self.write_yaml(folder, self.INPUT_FILENAME, request)
        model = self.inputs.model
        return self.calcinfo(["--input", self.INPUT_FILENAME, "--checkpoint", self.MODEL_FILENAME],
                             local_copy_list=[(model.uuid, model.filename, self.MODEL_FILENAME)],
                             command=COMMAND_OF_TASK[model.task])
