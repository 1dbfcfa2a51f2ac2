"""``EquiCSPSampleParser`` on recorded outputs: one test per outcome, each exit code with its message."""

import json

import pytest
from pymatgen.core import Composition, Lattice, Structure

from equicsp_core.pipeline import label_prefixes
from equicsp_core.cli import main

RUN_INFO = {"complete": True, "requested": 4, "written": 4, "valid": 2, "steps": 5, "batch_size": 256,
            "device": "cpu", "seconds": 0.1, "versions": {"equicsp": "0.1.0", "torch": "2.13.0+cpu"}}


def perovskite_cif(a_site: str, formula_units: int = 1) -> str:
    """A cubic ABO3 perovskite cell (5 atoms), or a 1×1×Z supercell of it, as CIF text."""
    structure = Structure(Lattice.cubic(3.9), [a_site, "Ti", "O", "O", "O"],
                          [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    return (structure * (1, 1, formula_units)).to(fmt="cif")


def results(entries, run_info=RUN_INFO, stderr="") -> dict[str, str]:
    """Retrieved files of a run: index.json listing ``entries`` (formula, sample, valid, Z), their CIFs, run.json."""
    samples, files = [], {"equicsp.err": stderr, "equicsp.out": ""}
    for formula, sample, valid, units in entries:
        name = f"{formula}_{sample:03d}.cif" if valid else None
        cell = "".join(f"{element}{'' if count * units == 1 else int(count * units)}"
                       for element, count in Composition(formula).as_dict().items())
        samples.append({"formula": formula, "sample": sample, "formula_units": units, "cell_formula": cell,
                        "valid": valid, "file": name})
        if valid:
            files[f"results/{name}"] = perovskite_cif(formula[:2], units)
    files["results/index.json"] = json.dumps({"checkpoint": "model.pt", "steps": 5, "seed": 0, "step_lr": 5e-6,
                                              "samples": samples})
    if run_info is not None:
        files["results/run.json"] = json.dumps(run_info)
    return files


ALL_ENTRIES = [("SrTiO3", 0, True, 1), ("SrTiO3", 1, False, 2), ("CaTiO3", 0, False, 1), ("CaTiO3", 1, True, 2)]


@pytest.fixture
def failed_run(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """The status file and stderr of a failing ``equicsp sample`` run (in-process), as the CalcJob retrieves them."""

    def factory(formula="SrTiO3", checkpoint=tiny_checkpoint, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        status = tmp_path / "status.json"
        flags = ["--checkpoint", str(checkpoint), "--formula", formula, "--steps", "2", "--out", str(tmp_path / "out")]
        assert main(["--quiet", "--status-file", str(status), "sample", *flags]) != 0
        return {"status.json": status.read_text(), "equicsp.err": capsys.readouterr().err}

    return factory


def test_complete_run(parse_retrieved):
    """Exit 0: a StructureData per valid candidate, labelled by requested formula and sample; candidates with
    their Z and cell; run_info."""
    outputs, calcfunction = parse_retrieved(results(ALL_ENTRIES))
    assert calcfunction.exit_status == 0
    assert set(outputs["structures"]) == {"SrTiO3_000", "CaTiO3_001"}
    assert outputs["structures"]["SrTiO3_000"].get_pymatgen().composition == Composition("SrTiO3")
    assert outputs["structures"]["CaTiO3_001"].get_pymatgen().composition == Composition("Ca2Ti2O6")
    assert outputs["candidates"]["candidates"] == [
        {"formula": "SrTiO3", "sample": 0, "formula_units": 1, "cell_formula": "SrTiO3", "valid": True,
         "link_label": "SrTiO3_000"},
        {"formula": "SrTiO3", "sample": 1, "formula_units": 2, "cell_formula": "Sr2Ti2O6", "valid": False,
         "link_label": None},
        {"formula": "CaTiO3", "sample": 0, "formula_units": 1, "cell_formula": "CaTiO3", "valid": False,
         "link_label": None},
        {"formula": "CaTiO3", "sample": 1, "formula_units": 2, "cell_formula": "Ca2Ti2O6", "valid": True,
         "link_label": "CaTiO3_001"},
    ]
    assert outputs["run_info"].get_dict() == RUN_INFO


def test_formulas_become_valid_distinct_link_labels():
    """Characters outside [A-Za-z0-9] collapse to one underscore; clashes and leading digits are resolved."""
    assert label_prefixes(["SrTiO3", "Sr(TiO3)", "Sr TiO3", "(Sr)TiO3", "2H2O"]) == {
        "SrTiO3": "SrTiO3", "Sr(TiO3)": "Sr_TiO3", "Sr TiO3": "Sr_TiO3_2", "(Sr)TiO3": "Sr_TiO3_3",
        "2H2O": "formula_2H2O"}


def test_no_output_at_all_is_missing_output(parse_retrieved):
    """300: nothing retrieved, no stated error."""
    _, calcfunction = parse_retrieved({})
    assert calcfunction.exit_status == 300
    assert "stderr empty" in calcfunction.exit_message


def test_crash_without_results_is_missing_output_quoting_stderr(parse_retrieved):
    """300: a crash with a traceback; the message quotes its last line."""
    stderr = "Traceback (most recent call last):\n  ...\nRuntimeError: something unforeseen\n"
    _, calcfunction = parse_retrieved({"equicsp.err": stderr})
    assert calcfunction.exit_status == 300
    assert "RuntimeError: something unforeseen" in calcfunction.exit_message


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"results/index.json": "{not json"}, "index.json"),
        ({"results/index.json": json.dumps({"steps": 5})}, "index.json"),
        ({**results(ALL_ENTRIES), "results/run.json": "{not json"}, "run.json"),
        ({**results(ALL_ENTRIES), "results/run.json": json.dumps({"valid": 2})}, "complete"),
        ({**results(ALL_ENTRIES), "results/SrTiO3_000.cif": "data_nothing\n"}, "SrTiO3_000.cif is not a readable CIF"),
        ({key: value for key, value in results(ALL_ENTRIES).items() if key != "results/CaTiO3_001.cif"},
         "CaTiO3_001.cif is listed in index.json but was not retrieved"),
    ],
    ids=["index not json", "index without samples", "run not json", "run not complete", "bad cif", "missing cif"],
)
@pytest.mark.filterwarnings("ignore::UserWarning:pymatgen")
def test_unreadable_output(parse_retrieved, files, named):
    """301: index.json, run.json or a listed CIF that cannot be read, named in the message; no run_info."""
    outputs, calcfunction = parse_retrieved(files)
    assert calcfunction.exit_status == 301
    assert named in calcfunction.exit_message
    assert "run_info" not in outputs


def test_out_of_memory_before_any_batch(parse_retrieved, failed_run, tmp_path):
    """310: the program's own out-of-memory status (here from the EQUICSP_TEST_FAIL_ONCE switch), no results."""
    outputs, calcfunction = parse_retrieved(failed_run(env={"EQUICSP_TEST_FAIL_ONCE": str(tmp_path / "marker")}))
    assert calcfunction.exit_status == 310
    assert "batch_size" in calcfunction.exit_message
    assert not outputs


def test_out_of_memory_after_some_batches_keeps_them(parse_retrieved):
    """310 with the finished batches output (no run.json, out of memory stated)."""
    files = results(ALL_ENTRIES[:2], run_info=None, stderr="equicsp sample: error: out of memory\n")
    files["status.json"] = json.dumps({"exit_status": 3, "failure": "out_of_memory", "error": "out of memory"})
    outputs, calcfunction = parse_retrieved(files)
    assert calcfunction.exit_status == 310
    assert set(outputs["structures"]) == {"SrTiO3_000"}
    assert len(outputs["candidates"]["candidates"]) == 2


def test_invalid_composition(parse_retrieved, failed_run):
    """320: the program refused a formula (a cell larger than the model supports)."""
    _, calcfunction = parse_retrieved(failed_run(formula="C60"))
    assert calcfunction.exit_status == 320
    assert "formula 'C60' has 60 atoms" in calcfunction.exit_message


def test_incompatible_checkpoint(parse_retrieved, failed_run, tmp_path):
    """321: the program could not use the checkpoint."""
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    _, calcfunction = parse_retrieved(failed_run(checkpoint=tmp_path / "model.pt"))
    assert calcfunction.exit_status == 321
    assert "model.pt" in calcfunction.exit_message


def test_the_message_words_do_not_decide_the_exit_code(parse_retrieved):
    """300 for a refused setting whose message mentions a formula and a checkpoint: the status file decides."""
    status = {"exit_status": 2, "failure": "bad_input", "error": "seed: the formula of the checkpoint is wrong"}
    _, calcfunction = parse_retrieved({"status.json": json.dumps(status)})
    assert calcfunction.exit_status == 300
    assert "seed: the formula of the checkpoint is wrong" in calcfunction.exit_message


def test_device_not_available(parse_retrieved, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """330: the program's real status for a device the computer lacks (here: no GPU visible)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    status = tmp_path / "status.json"
    assert main(["--quiet", "--status-file", str(status), "sample", "--checkpoint", str(tiny_checkpoint),
                 "--formula", "SrTiO3", "--device", "cuda", "--out", str(tmp_path / "out")]) == 4
    outputs, calcfunction = parse_retrieved({"status.json": status.read_text(), "equicsp.err": capsys.readouterr().err})
    assert calcfunction.exit_status == 330
    assert "device 'cuda' is not available" in calcfunction.exit_message
    assert not outputs


def test_stopped_run_keeps_partial_results(parse_retrieved):
    """350: finished batches but no run.json and no stated error (e.g. killed at the walltime)."""
    outputs, calcfunction = parse_retrieved(results(ALL_ENTRIES[:2], run_info=None))
    assert calcfunction.exit_status == 350
    assert "2 of 4 candidates kept" in calcfunction.exit_message
    assert set(outputs["structures"]) == {"SrTiO3_000"}
    assert [c["sample"] for c in outputs["candidates"]["candidates"]] == [0, 1]
    assert "run_info" not in outputs
