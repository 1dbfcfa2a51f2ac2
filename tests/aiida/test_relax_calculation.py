"""``EquiCSPRelaxCalculation`` and ``EquiCSPRelaxParser``: a real run on localhost, refused inputs, recorded outputs.

The potential is EMT behind ``tests.test_relax:emt`` (milliseconds per structure). The job runs ``equicsp`` in
its own work directory, where the ``tests`` package is not importable (the editable install exposes only the
project's packages), so the job gets ``PYTHONPATH`` set to the repository root.
"""

import json
from pathlib import Path

import pytest
import yaml
from aiida import orm
from aiida.common.folders import Folder
from aiida.common.links import LinkType
from aiida.engine import run_get_node
from aiida.engine.utils import instantiate_process
from aiida.manage import get_manager
from aiida.plugins import CalculationFactory, ParserFactory
from pymatgen.core import Lattice, Structure

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation
from equicsp_core.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
EMT = "tests.test_relax:emt"
EMT_FAILING_FOR_AL = "tests.test_relax:emt_failing_for_al"
OPTIONS = {"environment_variables": {"PYTHONPATH": str(REPO_ROOT)}}


def fcc(element: str = "Cu", a: float = 3.7) -> Structure:
    """The conventional 4-atom fcc cell."""
    return Structure(Lattice.cubic(a), [element] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def structure_nodes(**structures: Structure) -> dict[str, orm.StructureData]:
    return {label: orm.StructureData(pymatgen=structure) for label, structure in structures.items()}


def relax_inputs(code, parameters=None, **structures):
    inputs = {"code": code, "structures": structure_nodes(**(structures or {"cu_big": fcc("Cu", 3.75),
                                                                            "cu_small": fcc("Cu", 3.5)})),
              "metadata": {"options": OPTIONS}}
    if parameters is not None:
        inputs["parameters"] = orm.Dict(parameters)
    return inputs


def relax_job_count() -> int:
    return orm.QueryBuilder().append(EquiCSPRelaxCalculation).count()


# ------------------------------------------------------------------------------------------------
# the entry point, the spec


def test_entry_points():
    assert CalculationFactory("equicsp.relax") is EquiCSPRelaxCalculation
    assert ParserFactory("equicsp.relax").__name__ == "EquiCSPRelaxParser"


def test_default_options_and_exit_codes():
    options = EquiCSPRelaxCalculation.spec().inputs["metadata"]["options"]
    assert options["parser_name"].default == "equicsp.relax"
    assert options["resources"].default == {"num_machines": 1, "num_mpiprocs_per_machine": 1}
    assert options["withmpi"].default is False
    codes = EquiCSPRelaxCalculation.exit_codes
    assert {name: codes[name].status for name in (
        "ERROR_MISSING_OUTPUT", "ERROR_UNREADABLE_OUTPUT", "ERROR_POTENTIAL", "ERROR_DEVICE_NOT_AVAILABLE",
        "ERROR_PARTIAL_RESULTS")} == {
        "ERROR_MISSING_OUTPUT": 300, "ERROR_UNREADABLE_OUTPUT": 301, "ERROR_POTENTIAL": 320,
        "ERROR_DEVICE_NOT_AVAILABLE": 330, "ERROR_PARTIAL_RESULTS": 350}


# ------------------------------------------------------------------------------------------------
# a real run


def test_relaxes_every_structure_for_real(equicsp_code):
    """Two strained Cu cells: exit 0, a relaxed structure and a result per label, provenance from the job."""
    inputs = relax_inputs(equicsp_code, {"potential": EMT, "fmax": 0.02, "steps": 200})
    outputs, node = run_get_node(EquiCSPRelaxCalculation, **inputs)
    assert node.exit_status == 0, (node.exit_message, _stderr(node))

    assert set(outputs["relaxed"]) == {"cu_big", "cu_small"}
    results = outputs["results"].get_dict()
    assert set(results) == {"cu_big", "cu_small"}
    for label, result in results.items():
        assert result["status"] == "converged", result
        assert result["error"] is None and result["steps"] > 0
        assert -1.0 < result["energy_per_atom"] < 0.5  # EMT's Cu: about -0.007 eV/atom at its minimum
        relaxed = outputs["relaxed"][label]
        assert relaxed.creator.pk == node.pk
        assert relaxed.get_pymatgen().lattice.a == pytest.approx(3.59, abs=0.02)  # both cells reach EMT's Cu
    assert results["cu_big"]["energy_per_atom"] == pytest.approx(results["cu_small"]["energy_per_atom"], abs=1e-3)

    # provenance: the input structure of each label goes in, its relaxed structure comes out
    incoming = {link.link_label: link.node for link in node.base.links.get_incoming().all()}
    assert incoming["structures__cu_big"].uuid == inputs["structures"]["cu_big"].uuid
    outgoing = {link.link_label for link in node.base.links.get_outgoing().all()}
    assert {"relaxed__cu_big", "relaxed__cu_small", "results", "retrieved"} <= outgoing


def test_a_failed_relaxation_is_reported_and_the_job_succeeds(equicsp_code):
    """The potential raises for the Al cell: results says failed with the error, no relaxed Al, exit 0."""
    inputs = relax_inputs(equicsp_code, {"potential": EMT_FAILING_FOR_AL, "steps": 30},
                          cu=fcc("Cu"), al=fcc("Al", 4.1))
    outputs, node = run_get_node(EquiCSPRelaxCalculation, **inputs)
    assert node.exit_status == 0, (node.exit_message, _stderr(node))
    assert set(outputs["relaxed"]) == {"cu"}
    results = outputs["results"].get_dict()
    assert results["al"]["status"] == "failed" and "aluminium" in results["al"]["error"]
    assert results["al"]["energy_per_atom"] is None


def test_unloadable_potential_is_error_potential(equicsp_code):
    """A potential module that does not exist, for real: 320, the program's message, no outputs."""
    inputs = relax_inputs(equicsp_code, {"potential": "no_such_module_xyz:make"})
    outputs, node = run_get_node(EquiCSPRelaxCalculation, **inputs)
    assert node.exit_status == 320
    assert "no_such_module_xyz" in node.exit_message
    assert "results" not in outputs and "relaxed" not in outputs


def _stderr(node) -> str:
    try:
        return node.outputs.retrieved.base.repository.get_object_content("equicsp.err")
    except Exception:  # noqa: BLE001  (for the assertion message only)
        return "<no stderr>"


# ------------------------------------------------------------------------------------------------
# refused inputs: before submission


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"potential": EMT, "fmx": 0.1}, r"unknown setting\(s\) fmx; known: "),
        ({"potential": EMT, "fmax": 0}, "fmax: Input should be greater than 0"),
        ({"steps": -1}, "steps: Input should be greater than or equal to 0"),
    ],
)
def test_bad_parameters_are_refused_at_launch(equicsp_code, parameters, message):
    """``run`` raises ValueError with the engine's reason; no job node is created."""
    before = relax_job_count()
    with pytest.raises(ValueError, match=message):
        run_get_node(EquiCSPRelaxCalculation, **relax_inputs(equicsp_code, parameters))
    assert relax_job_count() == before


def test_bad_parameters_are_refused_by_the_builder():
    builder = EquiCSPRelaxCalculation.get_builder()
    with pytest.raises(ValueError, match="invalid relax parameters"):
        builder.parameters = orm.Dict({"fmax": 0})


def test_no_structures_is_refused_at_launch(equicsp_code):
    before = relax_job_count()
    inputs = relax_inputs(equicsp_code, {"potential": EMT})
    inputs["structures"] = {}
    with pytest.raises(ValueError, match="no structures to relax"):
        run_get_node(EquiCSPRelaxCalculation, **inputs)
    assert relax_job_count() == before


# ------------------------------------------------------------------------------------------------
# prepare_for_submission


def test_prepare_for_submission_writes_structures_and_settings(equicsp_code, tmp_path):
    inputs = relax_inputs(equicsp_code, {"potential": EMT, "steps": 7}, a=fcc("Cu"), b=fcc("Ni", 3.52))
    process = instantiate_process(get_manager().get_runner(), EquiCSPRelaxCalculation, **inputs)
    folder = Folder(str(tmp_path))
    calcinfo = process.prepare_for_submission(folder)

    with folder.open("relax.yaml") as handle:
        assert yaml.safe_load(handle) == {"potential": EMT, "steps": 7, "threads": 1}
    with folder.open("structures.json") as handle:
        written = json.load(handle)
    assert list(written) == ["a", "b"]
    assert Structure.from_dict(written["b"]).composition.reduced_formula == "Ni"
    (codeinfo,) = calcinfo.codes_info
    assert codeinfo.cmdline_params == ["--quiet", "--status-file", "status.json", "relax",
                                       "--structures", "structures.json", "--input", "relax.yaml", "--out", "results"]
    assert (codeinfo.stdout_name, codeinfo.stderr_name) == ("equicsp.out", "equicsp.err")
    assert calcinfo.retrieve_list == ["results", "equicsp.out", "equicsp.err", "status.json"]


def test_prepare_for_submission_without_parameters_writes_the_thread_count_only(equicsp_code, tmp_path):
    """The engine's defaults for everything but ``threads``: 1 when the job's resources name no cores."""
    inputs = relax_inputs(equicsp_code, None, a=fcc("Cu"))
    process = instantiate_process(get_manager().get_runner(), EquiCSPRelaxCalculation, **inputs)
    folder = Folder(str(tmp_path))
    process.prepare_for_submission(folder)
    with folder.open("relax.yaml") as handle:
        assert yaml.safe_load(handle) == {"threads": 1}


def test_threads_follow_the_cores_per_process_of_the_job(equicsp_code, tmp_path):
    inputs = relax_inputs(equicsp_code, {"potential": EMT}, a=fcc("Cu"))
    inputs["metadata"] = {"options": {"resources": {"num_machines": 1, "num_mpiprocs_per_machine": 1,
                                                    "num_cores_per_mpiproc": 6}}}
    process = instantiate_process(get_manager().get_runner(), EquiCSPRelaxCalculation, **inputs)
    folder = Folder(str(tmp_path))
    process.prepare_for_submission(folder)
    with folder.open("relax.yaml") as handle:
        assert yaml.safe_load(handle) == {"potential": EMT, "threads": 6}


# ------------------------------------------------------------------------------------------------
# the parser on recorded files


@pytest.fixture
def parse_relax_retrieved(aiida_localhost):
    """Parse ``{relative path: text}`` as the ``retrieved`` folder of a relax job of ``labels``.

    Returns ``(outputs, calcfunction node)``; the node's ``exit_status`` and ``exit_message`` are the verdict.
    """

    def factory(files: dict[str, str], labels=("cu_big", "cu_small")):
        node = orm.CalcJobNode(computer=aiida_localhost, process_type="aiida.calculations:equicsp.relax")
        node.set_option("resources", {"num_machines": 1, "num_mpiprocs_per_machine": 1})
        for label in labels:
            node.base.links.add_incoming(orm.StructureData(pymatgen=fcc()).store(), LinkType.INPUT_CALC,
                                         f"structures__{label}")
        node.store()
        retrieved = orm.FolderData()
        for path, text in files.items():
            retrieved.base.repository.put_object_from_bytes(text.encode(), path)
        retrieved.base.links.add_incoming(node, LinkType.CREATE, "retrieved")
        retrieved.store()
        return ParserFactory("equicsp.relax").parse_from_node(node, store_provenance=False)

    return factory


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, str]:
    """The files of a real ``equicsp relax`` run (in-process) of cu_big, cu_small and al (which fails)."""
    folder = tmp_path_factory.mktemp("recorded-relax")
    structures = {"cu_big": fcc("Cu", 3.75), "cu_small": fcc("Cu", 3.5), "al": fcc("Al", 4.1)}
    (folder / "structures.json").write_text(json.dumps({k: v.as_dict() for k, v in structures.items()}))
    (folder / "relax.yaml").write_text(yaml.safe_dump({"potential": EMT_FAILING_FOR_AL, "steps": 30}))
    assert main(["--quiet", "relax", "--structures", str(folder / "structures.json"), "--input",
                 str(folder / "relax.yaml"), "--out", str(folder / "results")]) == 0
    return {"results/relax.json": (folder / "results" / "relax.json").read_text(),
            "results/run.json": (folder / "results" / "run.json").read_text(),
            "equicsp.out": "", "equicsp.err": ""}


LABELS = ("cu_big", "cu_small", "al")


def test_parser_complete_run(parse_relax_retrieved, recorded):
    outputs, calcfunction = parse_relax_retrieved(recorded, LABELS)
    assert calcfunction.exit_status == 0, calcfunction.exit_message
    assert set(outputs["relaxed"]) == {"cu_big", "cu_small"}
    results = outputs["results"].get_dict()
    assert set(results) == set(LABELS)
    assert results["al"] == {"status": "failed", "energy_per_atom": None, "steps": 0,
                             "seconds": results["al"]["seconds"],
                             "error": "RuntimeError: this potential refuses aluminium", "phonons": None}
    assert set(results["cu_big"]) == {"status", "energy_per_atom", "steps", "seconds", "error", "phonons"}
    assert outputs["relaxed"]["cu_small"].get_pymatgen().composition.reduced_formula == "Cu"


def test_parser_potential_error(parse_relax_retrieved):
    status = {"exit_status": 2, "failure": "unusable_potential",
              "error": "potential 'x' cannot be loaded: No module named 'x'"}
    outputs, calcfunction = parse_relax_retrieved({"status.json": json.dumps(status), "equicsp.out": ""})
    assert calcfunction.exit_status == 320
    assert "potential 'x' cannot be loaded: No module named 'x'" in calcfunction.exit_message
    assert not outputs


def test_parser_real_potential_error_line(parse_relax_retrieved, tmp_path, capsys):
    """The status the program really writes for an unknown potential name gives 320 too."""
    (tmp_path / "s.json").write_text(json.dumps({"cu": fcc().as_dict()}))
    (tmp_path / "relax.yaml").write_text(yaml.safe_dump({"potential": "nope"}))
    capsys.readouterr()
    assert main(["--quiet", "--status-file", str(tmp_path / "status.json"), "relax", "--structures",
                 str(tmp_path / "s.json"), "--input", str(tmp_path / "relax.yaml"), "--out", str(tmp_path / "out")]) == 2
    _, calcfunction = parse_relax_retrieved({"status.json": (tmp_path / "status.json").read_text(),
                                             "equicsp.err": capsys.readouterr().err})
    assert calcfunction.exit_status == 320
    assert "unknown potential 'nope'" in calcfunction.exit_message


def test_parser_device_not_available(parse_relax_retrieved):
    status = {"exit_status": 4, "failure": "device_unavailable",
              "error": "device 'cuda:1' is not available: 1 CUDA device(s) visible"}
    outputs, calcfunction = parse_relax_retrieved({"status.json": json.dumps(status), "equicsp.out": ""})
    assert calcfunction.exit_status == 330
    assert "device 'cuda:1' is not available: 1 CUDA device(s) visible" in calcfunction.exit_message
    assert not outputs


def test_parser_nothing_retrieved_is_missing_output(parse_relax_retrieved):
    outputs, calcfunction = parse_relax_retrieved({})
    assert calcfunction.exit_status == 300
    assert "stderr empty" in calcfunction.exit_message
    assert not outputs


def test_parser_crash_quotes_the_last_stderr_line(parse_relax_retrieved):
    stderr = "Traceback (most recent call last):\n  File ...\nRuntimeError: CUDA error: no kernel image\n"
    _, calcfunction = parse_relax_retrieved({"equicsp.err": stderr})
    assert calcfunction.exit_status == 300
    assert "RuntimeError: CUDA error: no kernel image" in calcfunction.exit_message


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"settings": {}}), json.dumps({"results": {"a": {"status": "converged"}}}),
     json.dumps({"results": {"a": {"status": "converged", "structure": {"not": "a structure"}, "energy_per_atom": 1,
                                   "steps": 1, "seconds": 0.1, "error": None}}})],
    ids=["not json", "no results", "entry without structure", "unreadable structure"],
)
def test_parser_malformed_relax_json_is_unreadable(parse_relax_retrieved, text):
    outputs, calcfunction = parse_relax_retrieved({"results/relax.json": text, "results/run.json": "{}"})
    assert calcfunction.exit_status == 301
    assert "results/relax.json" in calcfunction.exit_message
    assert not outputs


def test_parser_partial_results_keep_the_finished_ones(parse_relax_retrieved, recorded):
    """relax.json of two of three structures and no run.json (killed at the walltime): 350 with those two."""
    relax = json.loads(recorded["results/relax.json"])
    relax["results"] = {label: relax["results"][label] for label in ("cu_big", "al")}
    outputs, calcfunction = parse_relax_retrieved({"results/relax.json": json.dumps(relax)}, LABELS)
    assert calcfunction.exit_status == 350
    assert "2 of 3 done" in calcfunction.exit_message
    assert set(outputs["relaxed"]) == {"cu_big"}
    assert set(outputs["results"].get_dict()) == {"cu_big", "al"}
