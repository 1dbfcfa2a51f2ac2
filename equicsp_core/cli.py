"""The ``equicsp`` command: train, sample, inspect checkpoints, rebuild the normalisation tables.

    equicsp train --preset perov_5-cpu --out runs/perov_5 [--set train.epochs=100] [--resume] [--max-minutes 60]
    equicsp train --dataset perov_5 --task generation --out runs/perov_5-gen     # ab initio: types diffused too
    equicsp sample --checkpoint runs/perov_5/best.pt --formula SrTiO3 --num-samples 4 --out out/
    equicsp sample --checkpoint runs/perov_5/best.pt --input sample.yaml --out out/
    equicsp generate --checkpoint runs/perov_5-gen/best.pt --num-samples 100 [--num-atoms 5 [--num-atoms 10]] --out gen/
    equicsp evaluate --checkpoint runs/perov_5/best.pt --dataset perov_5 --limit 200 --steps 100 --out eval.json
    equicsp evaluate-generation --generated gen/ --dataset perov_5 [--energy chgnet|none] --out gen.json
    equicsp relax --structures candidates.json [--input relax.yaml] --out relaxed/
    equicsp info runs/perov_5/best.pt
    equicsp tables --out tables.pt
    equicsp reference build [--data-dir DIR] [--out FILE]

Exit statuses: 0 done; 2 bad input: one line ``equicsp <command>: error: ...`` naming the problem, and no
output is left; 3 out of memory: the line ``equicsp <command>: error: out of memory``; 4 device not
available (``cuda`` on a machine without a visible GPU): the line ``equicsp <command>: error: device '...'
is not available: ...``, and no output is left; 130 interrupted (Ctrl-C): the line
``equicsp <command>: interrupted``, what finished is kept. Device names and their resolution:
:mod:`equicsp_core.hardware`.

``--checkpoint`` is a shipped checkpoint's name (``perov_5``, ``mp_20``) or a path, which must contain a ``/``
or end in ``.pt`` (``./model``, ``best.pt``): a name is never read from the working directory.

Messages: the engine logs through :mod:`logging` (logger ``equicsp_core``) to stderr, at INFO by default,
WARNING with ``-q/--quiet`` and DEBUG with ``-v/--verbose``. Progress bars are drawn only when stderr is a
terminal (never with ``--quiet``); elsewhere (a batch job's log) progress is a log line per batch.

``--status-file FILE`` also writes, as JSON, the exit status, which input was refused (a formula, the
checkpoint, the potential, the device: :class:`equicsp_core.runfolder.Failure`) and the error line, for
programs that run ``equicsp`` (the AiiDA parsers), so that they never read the message's words.

``equicsp sample`` samples a reduced formula (``ZnO``, ``SrTiO3``) at every cell size Z = 1..Zmax the model's
training domain holds (``--max-formula-units`` caps Zmax; 1: the written cell only), the candidates shared among
the Zs in proportion to how often each occurs in the model's training data (:mod:`equicsp_core.formula_unit_prior`;
the even spread for a model of another dataset); a formula written with Z > 1 (``Zn2O2``) is that cell only
(:mod:`equicsp_core.domain`). Each entry of
``index.json`` names its Z (``formula_units``) and its cell (``cell_formula``).

``equicsp sample`` takes its settings either from flags or from ``--input FILE``, a YAML mapping with the
keys of :class:`equicsp_core.settings.SampleSettings` (``formulas`` (a list), ``num_samples``,
``max_formula_units``, ``steps`` (null: the model's T), ``step_lr``, ``lattice_bound``, ``seed``, ``batch_size``, ``device``, ``threads``,
``allow_outside_domain``), never both; the flags are derived from the same model (``threads``: the global
``--threads``). It writes its output folder (which must be new or empty) batch by batch, as
:mod:`equicsp_core.runfolder` describes: after each batch, the batch's CIF files, then ``index.json``,
rewritten atomically, listing every finished candidate; after the last batch, ``run.json`` with
``"complete": true``. ``index.json`` names the checkpoint with its file's SHA-256 and the
requested counts (``formulas``, ``num_samples``, ``requested``), so a run stopped part-way (walltime, out of
memory, Ctrl-C) is visibly partial: its finished batches, fewer ``samples`` than ``requested`` and no
``run.json``. A run refused for bad input (an ``--out`` that cannot be written too) leaves no folder. Error messages about a bad
composition contain "formula", those about an unusable checkpoint contain "checkpoint".

``equicsp generate`` draws whole crystals, atom types included, from a generation model (trained with
``--task generation``; :mod:`equicsp_core.generate`): each crystal's atom count from the training distribution
in the model card, or ``--num-atoms``; its settings come from the flags or from ``--input FILE`` (the keys of
:class:`equicsp_core.settings.GenerateSettings`), never both. It writes the run folder of ``equicsp sample`` (``index.json`` entries
name the reduced formula each crystal came out with). A generation checkpoint given to ``equicsp sample``, or a
CSP checkpoint given to ``equicsp generate``, is refused in one line before anything is computed.

``equicsp relax`` relaxes the structures of ``--structures PATH`` (a JSON file of label → pymatgen structure
dict, a CIF file, an extended XYZ file, or the output folder of ``equicsp sample``:
:func:`equicsp_core.structure_files.read_structures`) with a machine-learned potential; ``--input FILE`` is a
YAML mapping of the keys of :class:`equicsp_core.settings.RelaxSettings` (``potential``, ``fmax``, ``steps``,
``relax_cell``, ``device``, ``threads``, ``phonons``).
It rewrites ``relax.json`` (label → status, energy per atom, structure, error) after each structure and
writes ``run.json`` at the end. A structure whose relaxation fails is reported with status ``failed`` and
the run goes on.

``equicsp evaluate-generation`` scores generated crystals (``--generated``: sample folders, whose failed samples
count as invalid, or structure files) against a benchmark split with the papers' ab initio generation metrics
(:mod:`equicsp_core.generation_metrics`) and prints, and with ``--out`` writes, its JSON report.

Test switch: with ``EQUICSP_TEST_FAIL_ONCE=<marker file>`` in the environment, ``equicsp sample`` and
``equicsp generate`` check their input and then, if the marker file does not exist, create it and fail exactly
as if they had run out of memory before sampling (exit 3); if the marker exists they run normally. Workflow
tests use it to exercise a failure and its recovery.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from equicsp_core import __version__, runfolder
from equicsp_core.config import preset_names
from equicsp_core.files import json_number, write_text_atomically
from equicsp_core.hardware import DeviceUnavailableError, resolve_device, set_threads
from equicsp_core.predict import Candidate
from equicsp_core.runtime import bound_onednn_caches, keep_freed_memory
from equicsp_core.generation_metrics import NUM_EVAL
from equicsp_core.settings import (
    DEVICE_CHOICES,
    POTENTIALS,
    FormulaError,
    GenerateSettings,
    PotentialError,
    RelaxSettings,
    SampleSettings,
    Settings,
)

Failure = runfolder.Failure
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C

logger = logging.getLogger(__name__)

#: Environment variable of the test switch (see the module docstring).
TEST_FAIL_ONCE_VARIABLE = "EQUICSP_TEST_FAIL_ONCE"

#: ``equicsp sample`` flag of each :class:`SampleSettings` key (``threads``: the global ``--threads``).
SAMPLE_FLAGS = {key: SampleSettings.flag(key) for key in SampleSettings.keys() if key != "threads"}
#: ``equicsp generate`` flag of each :class:`GenerateSettings` key (``threads``: the global ``--threads``).
GENERATE_FLAGS = {key: GenerateSettings.flag(key) for key in GenerateSettings.keys() if key != "threads"}


def add_settings_flags(parser: argparse.ArgumentParser, model: type[Settings], keys: list[str]) -> None:
    """One flag per knob of ``model`` in ``keys`` (:meth:`Settings.flag`), unset by default so that a file can
    supply it instead."""
    for key in keys:
        info, kind = model.model_fields[key], model.scalar_type(key)
        if model.repeatable(key):
            parser.add_argument(model.flag(key), dest=key, action="append", type=kind,
                                help=f"{info.description} (repeatable)")
        elif kind is bool:
            parser.add_argument(model.flag(key), dest=key, action="store_const", const=True, default=None,
                                help=info.description)
        else:
            parser.add_argument(model.flag(key), dest=key, type=kind, help=model.describe(key))


def _threads(value: int | None) -> None:
    if value is not None:
        if value < 1:
            raise ValueError(f"--threads must be >= 1, got {value}")
        torch.set_num_threads(value)


def _job_threads(args: argparse.Namespace, threads: int | None) -> int:
    """Set torch's threads for a sampling or relaxation job: its ``threads`` setting, else ``--threads``, else
    :func:`equicsp_core.hardware.default_threads`; returns the count."""
    return set_threads(threads if threads is not None else args.threads)


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: in a batch job's log a bar's every redraw would stay as text."""
    return not args.quiet and sys.stderr.isatty()


def cmd_train(args: argparse.Namespace) -> int:
    from equicsp_core.config import load_run_config
    from equicsp_core.train import train

    overrides = list(args.set or [])
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    if args.task:
        overrides.append(f"denoiser.task={args.task}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    config = load_run_config(args.preset or args.dataset, overrides)
    summary = train(config, args.out, resume=args.resume, max_minutes=args.max_minutes,
                    device=str(resolve_device(args.device)), data_dir=args.data_dir, progress=_show_progress(args),
                    init_from=args.init_from)
    print(json.dumps(summary))
    return 0


def _run_settings(args: argparse.Namespace, kind: type[SampleSettings | GenerateSettings],
                  flags: dict[str, str]) -> SampleSettings | GenerateSettings:
    """The run's settings (``kind``) from ``--input FILE`` or from the ``flags`` (which must not be mixed)."""
    given = {key: getattr(args, key) for key in flags if getattr(args, key) is not None}
    if args.input is None:
        return kind.from_mapping(given)
    if given:
        raise ValueError(f"--input cannot be combined with {', '.join(flags[key] for key in given)}")
    return kind.from_mapping(_read_yaml(args.input), where=f"--input {args.input}: ")


def _sample_settings(args: argparse.Namespace) -> SampleSettings:
    """``equicsp sample``'s settings (:func:`_run_settings`); without ``--input`` the formulas are required."""
    if args.input is None and args.formulas is None:
        raise ValueError("give the formulas to sample with --formula (repeatable) or an --input file")
    return _run_settings(args, SampleSettings, SAMPLE_FLAGS)


def _read_text(path: str, option: str) -> str:
    """The text of the file given to ``option``; a folder or an unreadable file becomes a one-line ValueError."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        reason = "it is a folder" if Path(path).is_dir() else getattr(error, "strerror", None) or str(error)
        raise ValueError(f"{option} {path} cannot be read: {reason}") from error


def _check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done; leaves nothing.

    Creates the missing folders and a probe file, then removes them again: the same calls the run makes later.
    """
    created = []
    try:
        for folder in [*reversed(out.parents), out]:
            if not folder.is_dir():
                folder.mkdir()
                created.append(folder)
        probe = out / ".equicsp-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written: {error.strerror or error}") from error
    finally:
        for folder in reversed(created):
            folder.rmdir()


def _read_yaml(path: str) -> Any:
    """The parsed YAML of ``path``; a syntax error becomes a ValueError naming the file."""
    try:
        return yaml.safe_load(_read_text(path, "--input"))
    except yaml.YAMLError as error:
        # PyYAML's message spans lines; the error must stay one line (see the module docstring).
        raise ValueError(f"--input {path} is not valid YAML ({' '.join(str(error).split())})") from error


def _fail_once_if_requested() -> None:
    """The test switch: on the first run with ``$EQUICSP_TEST_FAIL_ONCE`` set, fail as if out of memory."""
    marker = os.environ.get(TEST_FAIL_ONCE_VARIABLE)
    if not marker:
        return
    try:
        Path(marker).open("x").close()
    except FileExistsError:
        return
    raise torch.OutOfMemoryError(f"simulated by {TEST_FAIL_ONCE_VARIABLE} (marker {marker} created)")


def _save_batch(out: Path, batch: list[Candidate], header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Write a finished batch's CIF files, then ``index.json`` listing it after ``entries`` (extended in place)."""
    out.mkdir(parents=True, exist_ok=True)
    for cand in batch:
        cif, unreadable = runfolder.readable_cif(cand.structure) if cand.structure is not None else (None, None)
        if unreadable:
            logger.warning("%s sample %d (%s): %s; counted invalid", cand.formula, cand.sample_index,
                           cand.cell_formula, unreadable)
        entry = {"formula": cand.formula, "sample": cand.sample_index, "formula_units": cand.formula_units,
                 "cell_formula": cand.cell_formula, "valid": cif is not None, "file": None}
        if cif is not None:
            entry["file"] = runfolder.sample_file_name(cand.formula, cand.sample_index)
            (out / entry["file"]).write_text(cif)
        entries.append(entry)
    runfolder.write_index(out, header, entries)


def _prepare_sampling(args: argparse.Namespace, settings: SampleSettings | GenerateSettings) -> tuple[Any, ...]:
    """Check ``--out`` (new or empty, writable), set the device and threads and load the checkpoint, before any
    work: ``(out, device, threads, model, card, checkpoint sha256)``."""
    from equicsp_core.checkpoint import CheckpointError, load_model, resolve_checkpoint
    from equicsp_core.files import file_sha256

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} already exists and is not empty")
    device = resolve_device(settings.device)
    threads = _job_threads(args, settings.threads)
    _check_writable(out)
    try:
        model, card = load_model(args.checkpoint, device)
        checkpoint_sha256 = file_sha256(resolve_checkpoint(args.checkpoint))
    except CheckpointError as error:
        raise CheckpointError(f"cannot use checkpoint {args.checkpoint}: {error}") from error
    logger.info("sampling on %s with %d CPU thread(s)", device, threads)
    return out, device, threads, model, card, checkpoint_sha256


def _lattice_bound(settings: SampleSettings | GenerateSettings, model: Any) -> float | str:
    """The sampler's lattice bound (the model mode's when the settings leave it unset), as JSON holds it."""
    from equicsp_core.sampler import resolved_lattice_bound

    return json_number(resolved_lattice_bound(model.mode, settings.lattice_bound))


def _write_candidates(out: Path, batches: Any, header: dict[str, Any], run: dict[str, Any]) -> None:
    """Save each batch of candidates as it comes (:func:`_save_batch`), then ``run.json`` (``run`` with the counts,
    the lattice bound and the time); ``header`` holds ``requested`` and ``lattice_bound``."""
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    for batch in batches:
        _save_batch(out, batch, header, entries)
    valid = sum(entry["valid"] for entry in entries)
    runfolder.write_run(out, {"checkpoint_sha256": header["checkpoint_sha256"], "requested": header["requested"],
                              "lattice_bound": header["lattice_bound"], "written": len(entries), "valid": valid, **run,
                              "seconds": round(time.perf_counter() - started, 3),
                              "versions": {"equicsp": __version__, "torch": torch.__version__}})
    print(f"{valid}/{len(entries)} valid structures written to {out}")


def cmd_sample(args: argparse.Namespace) -> int:
    from equicsp_core.predict import predict_with_settings

    settings = _sample_settings(args)
    out, device, threads, model, card, checkpoint_sha256 = _prepare_sampling(args, settings)
    batches = predict_with_settings(model, card, settings, progress=_show_progress(args))
    _fail_once_if_requested()

    header = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": checkpoint_sha256, "steps": settings.steps,
              "seed": settings.seed, "step_lr": settings.step_lr, "lattice_bound": _lattice_bound(settings, model),
              "formulas": list(settings.formulas),
              "num_samples": settings.num_samples, "max_formula_units": settings.max_formula_units,
              "requested": len(settings.formulas) * settings.num_samples}
    _write_candidates(out, batches, header, {
        "steps": model.schedules.num_steps if settings.steps is None else settings.steps,
        "batch_size": settings.batch_size, "device": str(device), "threads": threads})
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from equicsp_core.generate import generate_with_settings

    settings = _run_settings(args, GenerateSettings, GENERATE_FLAGS)
    out, device, threads, model, card, checkpoint_sha256 = _prepare_sampling(args, settings)
    batches = generate_with_settings(model, card, settings, progress=_show_progress(args))
    _fail_once_if_requested()

    step_lr = settings.step_lr_for(card.get("dataset"))
    header = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": checkpoint_sha256, "task": "generation",
              "steps": settings.steps, "seed": settings.seed, "step_lr": step_lr,
              "lattice_bound": _lattice_bound(settings, model), "num_atoms": settings.num_atoms,
              "elements": settings.elements, "num_samples": settings.num_samples, "requested": settings.num_samples}
    _write_candidates(out, batches, header, {
        "steps": model.schedules.num_steps if settings.steps is None else settings.steps,
        "batch_size": settings.batch_size, "device": str(device), "threads": threads})
    return 0


def cmd_relax(args: argparse.Namespace) -> int:
    from equicsp_core.relax import load_calculator, relax_structures
    from equicsp_core.structure_files import read_structures

    values = _read_yaml(args.input) if args.input else {}  # its errors already name the file
    settings = RelaxSettings.from_mapping(values, where=f"--input {args.input}: ")
    structures = read_structures(args.structures)  # errors name the path
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} already exists and is not empty")
    _check_writable(out)
    threads = _job_threads(args, settings.threads)
    # A device this machine lacks or a bad potential: refused before any output.
    calculator = load_calculator(settings.potential, settings.device)
    logger.info("relaxing %d structure(s) with %s on %s with %d CPU thread(s)", len(structures), settings.potential,
                resolve_device(settings.device), threads)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results: dict[str, Any] = {}
    for label, result in relax_structures(structures, settings, lambda *_: calculator):
        results[label] = result.as_dict()
        runfolder.write_relax(out, settings.to_dict(), results)
    counts = {status: sum(r["status"] == status for r in results.values()) for status in ("converged",
                                                                                          "not_converged", "failed")}
    runfolder.write_run(out, {"counts": counts, "seconds": round(time.perf_counter() - started, 3),
                              "versions": {"equicsp": __version__, "torch": torch.__version__}})
    print(f"relaxed {len(results)} structures: {counts}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from equicsp_core.checkpoint import model_of, read_checkpoint, require_task, resolve_checkpoint
    from equicsp_core.evaluate import evaluate

    indices = None
    if args.indices:
        text = Path(args.indices).read_text()
        try:
            indices = [int(token) for token in text.replace(",", " ").split()]
        except ValueError as error:
            raise ValueError(f"{args.indices}: indices must be integers ({error})") from error
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ValueError(f"--out {out} cannot be written (a folder, or its folder does not exist)")
    payload = read_checkpoint(args.checkpoint)
    model = model_of(payload, resolve_checkpoint(args.checkpoint)).to(resolve_device(args.device)).eval()
    require_task(model, "csp")  # the match rate is a CSP metric
    report = evaluate(model, args.dataset, args.split, args.limit, indices, args.num_samples, args.steps, args.step_lr,
                      args.seed, args.batch_size, args.processes, args.data_dir, progress=_show_progress(args),
                      lattice_bound=args.lattice_bound, precision=args.precision, symmetrise=args.symmetrise,
                      grid_power=args.grid_power)
    card = payload.get("card", {})
    report["checkpoint"] = {"path": str(args.checkpoint), "dataset": card.get("dataset"), "epochs": card.get("epochs"),
                            "model_sha256": payload["model_sha256"]}
    text = json.dumps(report, indent=1)
    print(text, flush=True)  # first: a failing write below must not lose the evaluation
    if out is not None:
        write_text_atomically(out, text)
    return 0


def cmd_evaluate_generation(args: argparse.Namespace) -> int:
    from pymatgen.core import Composition

    from equicsp_core.generation_metrics import coverage_cutoffs, generation_metrics, reference_structures
    from equicsp_core.structure_files import read_structure_set

    coverage_cutoffs(args.dataset)
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ValueError(f"--out {out} cannot be written (a folder, or its folder does not exist)")
    generated: list = []
    sets = [read_structure_set(path) for path in args.generated]  # errors name the path
    for structure_set in sets:  # an unwritten sample counts, as a composition (it scores invalid)
        generated.extend(structure_set.structures.values())
        generated.extend(Composition(formula) for formula in structure_set.unwritten)
    if len(generated) < args.num_eval:
        raise ValueError(f"{len(generated)} generated crystals, fewer than --num-eval {args.num_eval}")
    split, reference = reference_structures(args.dataset, args.split, args.data_dir)
    report = generation_metrics(generated, reference, args.dataset, args.num_eval,
                                None if args.energy == "none" else args.energy, args.seed,
                                args.processes or os.cpu_count() or 1, str(resolve_device(args.device)))
    report = {"generated_from": [str(path) for path in args.generated],
              "generated_with": [structure_set.settings for structure_set in sets], "split": split, **report,
              "versions": _versions("matminer", "pymatgen", "smact")}
    text = json.dumps(report, indent=1)
    print(text, flush=True)  # first: a failing write below must not lose the evaluation
    if out is not None:
        write_text_atomically(out, text)
    return 0


def _versions(*packages: str) -> dict[str, str]:
    """This program's and the named packages' versions (as installed)."""
    from importlib.metadata import version

    return {"equicsp": __version__, **{package: version(package) for package in packages}}


def cmd_info(args: argparse.Namespace) -> int:
    from equicsp_core.checkpoint import file_sha256, read_checkpoint, resolve_checkpoint, shipped_summaries

    if args.checkpoint is None:
        print(json.dumps(shipped_summaries(), indent=2))
        return 0
    payload = read_checkpoint(args.checkpoint)
    parameters = sum(v.numel() for v in payload["state_dict"].values())
    print(json.dumps({"denoiser": payload["denoiser"], "diffusion": payload["diffusion"], "parameters": parameters,
                      "file_sha256": file_sha256(resolve_checkpoint(args.checkpoint)),
                      "model_sha256": payload["model_sha256"], "card": payload["card"]}, indent=2, default=str))
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from equicsp_core.vonmises_tables import compute_tables

    _check_writable(Path(args.out).parent)
    compute_tables(samples=args.samples, seed=args.seed, progress=_show_progress(args)).save(args.out)
    print(f"tables written to {args.out}")
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from equicsp_core.reference import build_reference, default_path, load_reference

    out = Path(args.out) if args.out else default_path()
    _check_writable(out.parent)
    path = build_reference(args.data_dir, out)
    print(f"reference set written to {path}: {len(load_reference(path))} entries, built from the pinned data")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equicsp", description="EquiCSP crystal structure prediction")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (sample, relax: default $OMP_NUM_THREADS, else every CPU the "
                             "process may use; a `threads` setting of --input wins)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    parser.add_argument("--status-file", default=None, metavar="FILE",
                        help="write {exit_status, failure, error} here when the command ends (equicsp_core.runfolder)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumable)")
    p.add_argument("--dataset", help="dataset (its paper preset unless --preset is given)")
    p.add_argument("--preset", help=f"preset name ({', '.join(preset_names())}) or YAML file")
    p.add_argument("--task", choices=("csp", "generation"), default=None,
                   help="csp: structures of given compositions (the preset's, csp by default); generation: ab initio, "
                        "atom types diffused too (sets denoiser.task)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config value")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT|RUN",
                   help="start a new run from these weights (a checkpoint, or a run folder: weights + optimiser)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop at the first epoch end after this long")
    p.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    p.add_argument("--data-dir", default=None, help="folder of <dataset>/<split>.csv.gz (or $EQUICSP_DATA_DIR)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="predict structures for formulas",
                       description="Settings come from the flags or from --input, never both.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or shipped name")
    p.add_argument("--input", default=None, metavar="FILE",
                   help=f"YAML mapping of the settings ({', '.join(SampleSettings.keys())})")
    add_settings_flags(p, SampleSettings, list(SAMPLE_FLAGS))
    p.add_argument("--out", required=True, help="new or empty output folder (CIF files, index.json, run.json)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("generate", help="generate crystals ab initio (atom types too) with a generation model")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or shipped name of a generation model")
    p.add_argument("--input", default=None, metavar="FILE",
                   help=f"YAML mapping of the settings ({', '.join(GenerateSettings.keys())})")
    add_settings_flags(p, GenerateSettings, list(GENERATE_FLAGS))
    p.add_argument("--out", required=True, help="new or empty output folder (CIF files, index.json, run.json)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("relax", help="relax structures with a machine-learned potential (CHGNet by default)")
    p.add_argument("--structures", required=True, metavar="PATH",
                   help="JSON file (label -> pymatgen structure dict), CIF file, extended XYZ file, or the output "
                        "folder of `equicsp sample`")
    p.add_argument("--input", default=None, metavar="FILE",
                   help=f"YAML mapping of the relax settings ({', '.join(RelaxSettings.keys())})")
    p.add_argument("--out", required=True, help="new or empty output folder (relax.json, run.json)")
    p.set_defaults(func=cmd_relax)

    p = sub.add_parser("evaluate", help="match rate and RMSE on a benchmark split (the papers' protocol)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or shipped name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default=None, help="train, selection, reserved, val or test (default: the split the "
                   "dataset's figures are reported on: reserved, or test for perov_5); training rows are refused")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--limit", type=int, default=None, help="first N crystals of the split")
    group.add_argument("--indices", default=None, help="file of row indices (whitespace or comma separated)")
    p.add_argument("--num-samples", type=int, default=1, help="k samples per crystal (1 or 20 in the papers)")
    p.add_argument("--steps", type=int, default=None, help="predictor-corrector steps (default: the model's T)")
    p.add_argument("--step-lr", type=float, default=5e-6, help="Langevin step scale")
    p.add_argument("--lattice-bound", type=float, default=None,
                   help="clamp of the predicted clean lattice (default: the mode's; inf = the papers' update)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="network arithmetic while sampling (fp32: the papers'; bf16 autocast: faster where supported)")
    p.add_argument("--grid-power", type=float, default=1.0, help="spacing of a sub-sampled time grid: 1 = even "
                   "(the papers'), > 1 = more steps at small t")
    p.add_argument("--symmetrise", action="store_true", help="average the denoiser over the six lattice-vector "
                   "orderings at every step (exact lattice-permutation equivariance, 6x the network cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--processes", type=int, default=None, help="worker processes for matching (default: all cores)")
    p.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-generation", help="validity, coverage and distribution distances of generated "
                       "crystals against a benchmark split (the papers' ab initio generation metrics)")
    p.add_argument("--generated", required=True, nargs="+", metavar="PATH",
                   help="the generated crystals: output folders of `equicsp generate` (or `sample`), .json, .cif or "
                   ".extxyz files")
    p.add_argument("--dataset", required=True, help="the reference dataset (perov_5, carbon_24, mp_20): its coverage "
                   "cut-offs")
    p.add_argument("--split", default=None, help="the reference split (default: the split the dataset's figures are "
                   "reported on: reserved, or test for perov_5); training rows are refused")
    p.add_argument("--num-eval", type=int, default=NUM_EVAL, help="valid crystals drawn for d_rho, d_elem and d_E "
                   f"(default {NUM_EVAL}, the papers')")
    p.add_argument("--energy", default="chgnet", choices=(*POTENTIALS, "none"), help="the potential whose "
                   "single-point energy per atom stands in for the papers' property model in d_E (none: no d_E)")
    p.add_argument("--seed", type=int, default=0, help="of the draw of --num-eval valid crystals")
    p.add_argument("--processes", type=int, default=None, help="worker processes for the fingerprints "
                   "(default: all cores)")
    p.add_argument("--device", default="cpu", help=f"device of the potential: {DEVICE_CHOICES} (default cpu)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=cmd_evaluate_generation)

    p = sub.add_parser("info", help="print a checkpoint's model card; without one, list the shipped models")
    p.add_argument("checkpoint", nargs="?", help="a shipped model's name or a checkpoint's path; without it: every "
                   "shipped model with its dataset, data protocol, training and figures")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tables", help="recompute the von Mises normalisation tables")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("reference", help="the reference set of stability and novelty (equicsp_core.reference)")
    actions = p.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="build it from the data folder into the cache folder; the data "
                                             "files' sha256 are checked against the pinned ones first")
    build.add_argument("--data-dir", default=None, help="folder of <dataset>/<split>.csv.gz (or $EQUICSP_DATA_DIR)")
    build.add_argument("--out", default=None, help="where to write it (default: the cache folder, "
                                                   "$EQUICSP_CACHE_DIR or ~/.cache/equicsp)")
    build.set_defaults(func=cmd_reference)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is at each record (so a replaced stderr is followed)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _):  # the base class sets it in __init__
        pass


def _configure_logging(args: argparse.Namespace) -> None:
    """The engine's log records to stderr, at the level of ``-q``/``-v`` (INFO by default)."""
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    engine = logging.getLogger("equicsp_core")
    engine.setLevel(level)
    if not any(isinstance(handler, _StderrHandler) for handler in engine.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        engine.addHandler(handler)


def failure_of(error: BaseException) -> Failure | None:
    """The :class:`~equicsp_core.runfolder.Failure` of a known error, ``None`` for an unexpected one."""
    from equicsp_core.checkpoint import CheckpointError

    for kind, failure in ((torch.OutOfMemoryError, Failure.OUT_OF_MEMORY),
                          (DeviceUnavailableError, Failure.DEVICE_UNAVAILABLE),
                          (FormulaError, Failure.INVALID_FORMULA),
                          (CheckpointError, Failure.UNUSABLE_CHECKPOINT),
                          (PotentialError, Failure.UNUSABLE_POTENTIAL),
                          ((ValueError, FileNotFoundError, FileExistsError), Failure.BAD_INPUT)):
        if isinstance(error, kind):
            return failure
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    keep_freed_memory()
    bound_onednn_caches()
    failure, message = Failure.FAILED, "unexpected error (see the traceback on stderr)"
    try:
        _threads(args.threads)
        exit_status = args.func(args)
        failure, message = None, None
        return exit_status
    except KeyboardInterrupt:
        failure, message = Failure.INTERRUPTED, "interrupted"
        print(f"equicsp {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        failure = failure_of(error)
        if failure is None:
            failure = Failure.FAILED
            raise
        message = "out of memory" if failure is Failure.OUT_OF_MEMORY else str(error)
        print(f"equicsp {args.command}: error: {message}", file=sys.stderr)
        return failure.exit_status
    finally:
        if args.status_file:
            runfolder.write_status(args.status_file, failure, message)


if __name__ == "__main__":
    sys.exit(main())
