"""``EquiCSPSampleBaseWorkChain``: run ``EquiCSPSampleCalculation`` until every requested candidate exists.

The same for both tasks of the calculation (its model decides: structure prediction of ``compositions``, or ab
initio generation without them). A generation request is one pool of ``num_samples`` crystals, whatever
formulas they come out with: what is missing, what a rerun asks for and what the merge keeps are counted in
that pool instead of per formula.

Recoveries, one process handler per known failure (the pattern of aiida-quantumespresso's ``PwBaseWorkChain``):

- out of memory (exit status 310): halve the number of crystals sampled together and run again;
- stopped before the end, e.g. at the walltime (350), or out of memory after some batches: keep what finished
  and run again for what is missing only.

- the computer lacks the requested device (330, e.g. ``cuda`` on a CPU node): abort at once with 420, since a
  rerun on the same computer with the same inputs would fail the same way.

Any other failure is left to :class:`~aiida.engine.BaseRestartWorkChain` (by default: one rerun, then abort
with 402).

Rerunning only what is missing
    Before every rerun, :meth:`~EquiCSPSampleBaseWorkChain.prepare_process` counts per formula the candidates,
    valid or not, that the earlier calculations produced (their ``candidates`` outputs) and asks the next one
    only for the formulas still short, with ``num_samples`` the largest shortfall. ``num_samples`` is one
    number for all formulas, and ``equicsp sample`` works formula by formula, so a stopped run leaves at most
    one formula partly done: asking every short formula for the largest shortfall costs at most
    ``num_samples - 1`` extra crystals in the same job, where one calculation per distinct shortfall would
    queue one more job per shortfall. The merge keeps the first ``num_samples`` candidates of each formula,
    in the order of the calculations, and drops the surplus. Candidates are counted per requested formula,
    whatever their cell size Z: a rerun shares its candidates among the Zs afresh
    (:mod:`equicsp_core.formula_unit_prior`), so after a restart a formula's candidates per Z may differ a little
    from one uninterrupted run's (each run's share of a Z is within one of its quota).

Seeds
    Calculation ``i`` (1, 2, ...) runs with ``seed + i - 1`` (``seed`` from ``parameters``, else the engine's
    default), so a rerun does not repeat the draws of the run before it. The candidates of a restarted work
    chain are therefore not those of an uninterrupted run with the same seed (a new batch size changes the
    draws too): each is an equally good sample of the model, not the same one.

Outputs
    The union of the candidates of all calculations. ``structures``: each valid candidate's ``StructureData``,
    the node its calculation created, relabelled ``<formula>_<index>`` with the indices renumbered per formula
    in the order of the calculations; ``candidates`` and ``run_info``: made by the calcfunction
    :func:`merge_sample_results` from the calculations' outputs, so their provenance is recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import (
    BaseRestartWorkChain,
    ExitCode,
    ProcessBuilder,
    ProcessHandlerReport,
    calcfunction,
    process_handler,
    while_,
)
from aiida.engine.processes.builder import ProcessBuilderNamespace
from aiida.engine.processes.workchains.workchain import WorkChainSpec
from equicsp_core.pipeline import candidate_label, label_prefixes
from equicsp_core.settings import SampleSettings, formula_list

from aiida_quantumespresso.workflows.protocols.utils import recursive_merge

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation, crystals_requested
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.protocols import EquiCSPProtocolMixin
from aiida_equicsp.workchains.replay import call_function_once

#: Exit codes of the calculation that the handlers recover from.
CALCULATION_EXIT_CODES = EquiCSPSampleCalculation.exit_codes


def count_missing_samples(
    formulas: Sequence[str] | None, num_samples: int, produced: Iterable[Mapping[str, Any]]
) -> dict[str | None, int]:
    """``{formula: candidates it still lacks}`` for the formulas with fewer than ``num_samples``, in their order.

    ``produced`` are ``candidates`` entries (``{"formula": ..., ...}``) of earlier calculations, valid or not.
    ``formulas`` ``None`` is a generation request: ``{None: crystals still lacking}`` (or ``{}``), whatever
    formulas they came out with.
    """
    if formulas is None:
        missing = num_samples - sum(1 for _ in produced)
        return {None: missing} if missing > 0 else {}
    counts = Counter(candidate["formula"] for candidate in produced)
    return {formula: num_samples - counts[formula] for formula in formulas if counts[formula] < num_samples}


def merge_candidate_lists(
    formulas: Sequence[str] | None, num_samples: int, runs: Sequence[tuple[int, str, Sequence[Mapping[str, Any]]]]
) -> list[dict[str, Any]]:
    """The first ``num_samples`` candidates of each formula over ``runs``, renumbered per formula; for a
    generation request (``formulas`` ``None``) the first ``num_samples`` crystals, renumbered 0, 1, ... in all.

    Args:
        formulas: the requested formulas, the merged list following their order; ``None`` for generation.
        num_samples: candidates per formula (in all for generation); later candidates (a rerun's surplus) are
            dropped.
        runs: per calculation, in the order they ran, ``(pk, uuid, its candidates entries)``.

    Returns:
        Entries ``{formula, sample, formula_units, cell_formula, valid, link_label, calculation_pk,
        calculation_uuid, calculation_sample, calculation_link_label}``: ``sample`` counts 0, 1, ... per formula
        (in all for generation), ``formula_units`` and ``cell_formula`` are the Z and cell the calculation sampled
        it at, ``link_label`` is the structure's new label (``None`` for an invalid candidate), the
        ``calculation_*`` keys say where it came from.
    """
    generated = [candidate["formula"] for _, _, candidates in runs for candidate in candidates]
    prefixes = label_prefixes(list(dict.fromkeys(generated if formulas is None else formulas)))
    kept: dict[str | None, list[dict[str, Any]]] = {None: []} if formulas is None else {f: [] for f in formulas}
    for pk, uuid, candidates in runs:
        for candidate in candidates:
            entries = kept[None if formulas is None else candidate["formula"]]
            if len(entries) == num_samples:
                continue
            index = len(entries)
            entries.append({
                "formula": candidate["formula"],
                "sample": index,
                "formula_units": candidate["formula_units"],
                "cell_formula": candidate["cell_formula"],
                "valid": candidate["valid"],
                "link_label": candidate_label(prefixes[candidate["formula"]], index) if candidate["valid"]
                else None,
                "calculation_pk": pk,
                "calculation_uuid": uuid,
                "calculation_sample": candidate["sample"],
                "calculation_link_label": candidate["link_label"],
            })
    return [entry for entries in kept.values() for entry in entries]


@calcfunction
def merge_sample_results(
    num_samples: orm.Int, calculations: orm.Int, compositions: orm.List | None = None,
    run_info: orm.Dict | None = None, **candidates: orm.Dict,
) -> dict[str, orm.Dict]:
    """The work chain's ``candidates`` and ``run_info`` from the outputs of its calculations.

    Args:
        num_samples: the requested candidates per formula (crystals in all for generation).
        calculations: how many calculations the work chain ran.
        compositions: the requested formulas; none for a generation request.
        run_info: ``run_info`` of the last calculation that completed, if any.
        candidates: the calculations' ``candidates`` outputs, labelled ``iteration_<n>`` by the order they ran
            in; each node's creator is the calculation named in the merged entries.

    Returns:
        ``candidates``: :func:`merge_candidate_lists` of them; ``run_info``: the given one with the counts of
        the merged result (``requested``, ``written``, ``valid``, ``complete``) and ``calculations``.
    """
    ordered = sorted(candidates.items(), key=lambda item: int(item[0].rsplit("_", 1)[1]))
    runs = [(node.creator.pk, node.creator.uuid, node["candidates"]) for _, node in ordered]
    formulas = compositions.get_list() if compositions is not None else None
    merged = merge_candidate_lists(formulas, num_samples.value, runs)
    requested = crystals_requested(num_samples.value, formulas)
    info = {
        **(run_info.get_dict() if run_info is not None else {}),
        "complete": len(merged) == requested,
        "requested": requested,
        "written": len(merged),
        "valid": sum(entry["valid"] for entry in merged),
        "calculations": calculations.value,
    }
    return {"candidates": orm.Dict({"candidates": merged}), "run_info": orm.Dict(info)}


def set_sample_inputs(
    namespace: ProcessBuilderNamespace,
    code: orm.AbstractCode,
    model: EquiCSPModelData,
    compositions: Sequence[str] | orm.List | None,
    num_samples: int | orm.Int,
    inputs: Mapping[str, Any],
) -> None:
    """Fill a builder namespace of :class:`EquiCSPSampleCalculation` inputs: the request, then ``inputs``.

    ``compositions`` is ``None`` for a generation model. ``inputs`` are plain values as a protocol file holds
    them; ``parameters`` becomes a ``Dict``.
    """
    inputs = dict(inputs)
    namespace.code = code
    namespace.model = model
    if compositions is not None:
        namespace.compositions = (compositions if isinstance(compositions, orm.List)
                                  else orm.List(list(formula_list(compositions))))
    namespace.num_samples = num_samples if isinstance(num_samples, orm.Int) else orm.Int(num_samples)
    if "parameters" in inputs:
        namespace.parameters = orm.Dict(inputs.pop("parameters"))
    namespace._merge(inputs)


class EquiCSPSampleBaseWorkChain(EquiCSPProtocolMixin, BaseRestartWorkChain):
    """Sample candidate structures with :class:`EquiCSPSampleCalculation`, restarting after known failures.

    See the module docstring for what a rerun asks for, its seed, and how the outputs are merged.
    """

    _process_class = EquiCSPSampleCalculation
    _protocol_filename = "sample.yaml"

    @classmethod
    def define(cls, spec: WorkChainSpec) -> None:  # type: ignore[override]
        """The calculation's inputs in ``sample``, the restart loop, the merged outputs and the exit codes."""
        super().define(spec)
        spec.expose_inputs(EquiCSPSampleCalculation, namespace="sample")
        spec.outline(
            cls.setup,
            while_(cls.should_run_process)(
                cls.prepare_process,
                cls.run_process,
                cls.inspect_process,
            ),
            cls.results,
        )
        spec.output_namespace("structures", valid_type=orm.StructureData, dynamic=True, required=False,
                              help="every valid candidate of every calculation, labelled <formula>_<index>")
        spec.output("candidates", valid_type=orm.Dict,
                    help="'candidates': one {formula, sample, formula_units, cell_formula, valid, link_label, "
                         "calculation_pk, calculation_uuid, calculation_sample, calculation_link_label} per candidate")
        spec.output("run_info", valid_type=orm.Dict,
                    help="the last complete calculation's run_info, with the counts of the work chain and the "
                         "number of calculations")
        spec.exit_code(410, "ERROR_NO_CANDIDATES",
                       message="no calculation produced a single candidate in {iterations} iterations")
        spec.exit_code(420, "ERROR_DEVICE_NOT_AVAILABLE",
                       message="the computer lacks the requested device (not retried): {error}")

    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        model: EquiCSPModelData,
        compositions: Sequence[str] | orm.List | None,
        num_samples: int | orm.Int,
        protocol: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ProcessBuilder:
        """A builder with the inputs of a protocol of ``protocols/sample.yaml``.

        Args:
            code: an installed ``equicsp`` program.
            model: the trained model.
            compositions: formulas to sample (a list, never one string); ``None`` for a generation model.
            num_samples: candidates per formula (crystals to generate for a generation model).
            protocol: ``fast``, ``balanced`` (the default) or ``stringent`` (:meth:`get_available_protocols`);
                ``precise``, the old name of ``stringent``, is accepted with a ``FutureWarning``.
            overrides: merged over the protocol's inputs: ``sample`` holds the calculation's inputs, any other
                key is that input of the work chain, e.g. ``{"sample": {"parameters": {"seed": 3}},
                "max_iterations": 3}``.
            options: scheduler options of the calculations (``metadata.options``: ``resources``,
                ``max_wallclock_seconds``, ``queue_name``, ``account``, ``custom_scheduler_commands``, ...),
                merged over those of the protocol and ``overrides``.

        Raises:
            ValueError: for an unknown protocol or a refused input.
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        sample = inputs.pop("sample", {})
        if options:
            sample = recursive_merge(sample, {"metadata": {"options": dict(options)}})
        builder = cls.get_builder()
        set_sample_inputs(builder.sample, code, model, compositions, num_samples, sample)
        builder._merge({key: orm.to_aiida_type(value) if isinstance(value, (bool, int, float, str)) else value
                        for key, value in inputs.items()})
        return builder

    def setup(self) -> None:
        """The first calculation's inputs are the ``sample`` inputs; keep its parameters for the reruns."""
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(EquiCSPSampleCalculation, "sample"))
        self.ctx.parameters = self.ctx.inputs.parameters.get_dict() if "parameters" in self.ctx.inputs else {}

    def prepare_process(self) -> None:
        """Before a rerun: ask only for the candidates still missing, with the current parameters and a new seed."""
        calculations_run = len(self.ctx.get("children", []))  # not ctx.iteration: a pause may reset it
        if not calculations_run:
            return
        missing = self._missing_samples()
        if not missing:  # a rerun after an unhandled failure that lost nothing (``on_unhandled_failure``)
            return
        num_samples = max(missing.values())
        seed = self.ctx.parameters.get("seed", SampleSettings.default("seed")) + calculations_run
        if "compositions" in self.ctx.inputs:
            self.ctx.inputs.compositions = orm.List(list(missing))
        self.ctx.inputs.num_samples = orm.Int(num_samples)
        self.ctx.inputs.parameters = orm.Dict({**self.ctx.parameters, "seed": seed})
        shortfalls = ", ".join(f"{formula or 'generated crystals'} × {count}" for formula, count in missing.items())
        self.report(f"running the missing candidates only ({shortfalls}): num_samples {num_samples}, seed {seed}")

    def inspect_process(self) -> ExitCode | None:
        """As the base class; when the iterations run out, output the candidates finished so far, if any."""
        exit_code = super().inspect_process()
        if exit_code is not None and exit_code.status == self.exit_codes.ERROR_MAXIMUM_ITERATIONS_EXCEEDED.status:
            if not self._finished_candidates():
                return self.exit_codes.ERROR_NO_CANDIDATES.format(iterations=self.ctx.iteration)
            self.report("outputting the candidates that finished")
            self._attach_merged_outputs()
        return exit_code

    def results(self) -> None:
        """Output the union of the candidates of all calculations."""
        self.report(f"work chain completed after {self.ctx.iteration} iterations")
        self._attach_merged_outputs()

    @process_handler(priority=700, exit_codes=[CALCULATION_EXIT_CODES.ERROR_DEVICE_NOT_AVAILABLE])
    def handle_device_not_available(self, calculation: orm.CalcJobNode) -> ProcessHandlerReport:
        """The computer lacks the device asked for: abort without a rerun (it would fail the same way)."""
        self.report(f"{calculation.process_label}<{calculation.pk}>: {calculation.exit_message}; not retrying")
        return ProcessHandlerReport(do_break=True, exit_code=self.exit_codes.ERROR_DEVICE_NOT_AVAILABLE.format(
            error=calculation.exit_message))

    @process_handler(priority=600, exit_codes=[CALCULATION_EXIT_CODES.ERROR_OUT_OF_MEMORY])
    def handle_out_of_memory(self, calculation: orm.CalcJobNode) -> ProcessHandlerReport | None:
        """Out of memory: halve the crystals sampled together; the rerun asks only for what is missing.

        The batch that failed held ``min(batch_size, crystals requested)`` crystals, so that is what is halved
        (``batch_size`` 256 for 4 crystals becomes 2, not 128). With one crystal per batch there is nothing left
        to lower and the failure is left unhandled.
        """
        batch_size = self.ctx.parameters.get("batch_size", SampleSettings.default("batch_size"))
        crystals = crystals_requested(calculation.inputs.num_samples.value, self._requested_formulas(calculation))
        failed_batch = min(batch_size, crystals)
        if failed_batch == 1:
            self.report(f"{calculation.process_label}<{calculation.pk}> out of memory with one crystal per batch: "
                        "nothing left to lower")
            return None
        self.ctx.parameters["batch_size"] = failed_batch // 2
        self.report(f"{calculation.process_label}<{calculation.pk}> out of memory: "
                    f"batch_size {batch_size} → {failed_batch // 2}")
        return ProcessHandlerReport(do_break=True)

    @process_handler(priority=500, exit_codes=[CALCULATION_EXIT_CODES.ERROR_PARTIAL_RESULTS])
    def handle_partial_results(self, calculation: orm.CalcJobNode) -> ProcessHandlerReport:
        """Stopped before the end (walltime?): keep what finished; the rerun asks only for what is missing.

        A run stopped after writing its last candidate but before ``run.json`` misses nothing: the work chain
        then finishes with what it has.
        """
        missing = self._missing_samples()
        if not missing:
            self.report(f"{calculation.process_label}<{calculation.pk}> stopped after its last candidate: "
                        "nothing is missing")
            self.ctx.is_finished = True
        else:
            self.report(f"{calculation.process_label}<{calculation.pk}> stopped early: "
                        f"{sum(missing.values())} candidates missing, keeping the finished ones")
        return ProcessHandlerReport(do_break=True)

    def _finished_candidates(self) -> list[dict[str, Any]]:
        """The ``candidates`` entries of all calculations so far, in the order they ran."""
        return [candidate for node in self.ctx.children if "candidates" in node.outputs
                for candidate in node.outputs.candidates["candidates"]]

    @staticmethod
    def _requested_formulas(calculation: orm.CalcJobNode) -> list[str] | None:
        """The formulas a calculation asked for; ``None`` for generation."""
        return calculation.inputs.compositions.get_list() if "compositions" in calculation.inputs else None

    def _missing_samples(self) -> dict[str | None, int]:
        """``{formula: candidates still missing}`` over all calculations so far (:func:`count_missing_samples`;
        ``{None: crystals}`` for generation)."""
        requested = self.inputs.sample
        formulas = requested.compositions.get_list() if "compositions" in requested else None
        return count_missing_samples(formulas, requested.num_samples.value, self._finished_candidates())

    def _attach_merged_outputs(self) -> None:
        """Output the merged ``candidates`` and ``run_info`` and, relabelled, every valid candidate's structure."""
        calculations = self.ctx.children
        candidates = {f"iteration_{number:02d}": node.outputs.candidates
                      for number, node in enumerate(calculations, start=1) if "candidates" in node.outputs}
        complete = [node for node in calculations if "run_info" in node.outputs]
        run_info = {"run_info": complete[-1].outputs.run_info} if complete else {}
        compositions = {"compositions": self.inputs.sample.compositions} if "compositions" in self.inputs.sample else {}
        merged = call_function_once(
            self, merge_sample_results, "merge_results", num_samples=self.inputs.sample.num_samples,
            calculations=orm.Int(len(calculations)), **compositions, **run_info, **candidates)
        self.out_many(merged)

        by_uuid = {node.uuid: node for node in calculations}
        structures = {
            entry["link_label"]: by_uuid[entry["calculation_uuid"]].outputs.structures[entry["calculation_link_label"]]
            for entry in merged["candidates"]["candidates"] if entry["valid"]
        }
        if structures:
            self.out("structures", structures)

