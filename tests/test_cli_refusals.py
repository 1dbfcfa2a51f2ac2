"""The ``equicsp`` command refuses before it works, in one line, and loses nothing finished.

An ``--out`` that cannot be written is refused before sampling or relaxing; a folder given as a file, a
potential that is not a calculator factory, ``tables --samples 0``: one line, exit 2. Ctrl-C stops a run with
one line and exit 130, its finished batches kept and ``index.json`` saying how many were requested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from equicsp_core.files import file_sha256
from equicsp_core.cli import EXIT_INTERRUPTED, main


def run(*args) -> int:
    return main(["--quiet", *map(str, args)])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def never(*_args, **_kwargs):
    raise AssertionError("work started before the refusal")


def test_sample_refuses_an_unwritable_out_before_sampling(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("equicsp_core.predict.predict_with_settings", never)
    monkeypatch.setattr("equicsp_core.checkpoint.load_model", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    assert run("sample", "--checkpoint", tiny_checkpoint, "--formula", "SrTiO3", "--out", out) == 2
    assert error_line(capsys).startswith(f"equicsp sample: error: --out {out} cannot be written: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_relax_refuses_an_unwritable_out_before_relaxing(tmp_path, capsys, monkeypatch):
    from pymatgen.core import Lattice, Structure

    monkeypatch.setattr("equicsp_core.relax.load_calculator", never)
    structures = tmp_path / "s.json"
    structures.write_text(json.dumps({"cu": Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]]).as_dict()}))
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "deeper" / "out"
    assert run("relax", "--structures", structures, "--out", out) == 2
    assert error_line(capsys).startswith(f"equicsp relax: error: --out {out} cannot be written: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "s.json"]


def test_a_folder_given_as_a_file_is_one_line(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert run("sample", "--checkpoint", tiny_checkpoint, "--input", folder, "--out", tmp_path / "out") == 2
    assert error_line(capsys) == f"equicsp sample: error: --input {folder} cannot be read: it is a folder"
    # a folder is what `equicsp sample` writes, so `relax` reads one, but only a folder that holds its index.json
    assert run("relax", "--structures", folder, "--out", tmp_path / "out") == 2
    assert error_line(capsys) == (f"equicsp relax: error: cannot read structures from {folder}: the folder has no "
                                  "index.json: it is not an output folder of `equicsp sample`")
    settings = tmp_path / "relax.yaml"
    settings.mkdir()
    structures = tmp_path / "s.json"
    structures.write_text("{}")
    assert run("relax", "--structures", structures, "--input", settings, "--out", tmp_path / "out") == 2
    assert error_line(capsys) == f"equicsp relax: error: --input {settings} cannot be read: it is a folder"
    assert not (tmp_path / "out").exists()


def test_a_potential_that_is_not_a_calculator_factory_is_one_line(tmp_path, capsys):
    from pymatgen.core import Lattice, Structure

    structures = tmp_path / "s.json"
    structures.write_text(json.dumps({"cu": Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]]).as_dict()}))
    for potential, returned in (("math:sqrt", None), ("builtins:dict", "a dict")):
        settings = tmp_path / "relax.yaml"
        settings.write_text(f"potential: '{potential}'\n")
        assert run("relax", "--structures", structures, "--input", settings, "--out", tmp_path / "out") == 2
        line = error_line(capsys)
        assert line.startswith(f"equicsp relax: error: potential '{potential}' is not a calculator factory: "), line
        if returned:
            assert line.endswith("it returned a dict, not an ASE calculator")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("samples", [0, -5])
def test_tables_refuses_no_samples(tmp_path, capsys, samples):
    out = tmp_path / "tables.pt"
    assert run("tables", "--samples", samples, "--out", out) == 2
    assert error_line(capsys) == f"equicsp tables: error: samples must be an integer >= 1, got {samples}"
    assert not out.exists()


def test_ctrl_c_is_one_line_and_keeps_the_finished_batches(tiny_checkpoint, tmp_path):
    """SIGINT during a 100-batch run: exit 130, one line and no traceback, the finished CIFs and an index.json
    whose ``requested`` says the run is partial; no run.json. (The untrained model may also sample a cell too thin
    for a CIF: its one warning line is allowed.)"""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "equicsp_core.cli", "--quiet", "--threads", "1", "sample", "--checkpoint",
               str(tiny_checkpoint), "--formula", "SrTiO3", "--num-samples", "100", "--batch-size", "1",
               "--steps", "50", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "index.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no batch finished in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert [line for line in err.strip().splitlines() if not line.endswith("counted invalid")] == [
        "equicsp sample: interrupted"]
    index = json.loads((out / "index.json").read_text())
    assert index["requested"] == 100 and index["formulas"] == ["SrTiO3"] and index["num_samples"] == 100
    assert 1 <= len(index["samples"]) < 100
    assert index["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert not (out / "run.json").exists()


def test_a_complete_run_records_the_checkpoint_hash(tmp_path):
    out = tmp_path / "out"
    assert run("sample", "--checkpoint", "perov_5", "--formula", "SrTiO3", "--num-samples", 1, "--steps", 2,
               "--out", out) == 0
    index, run_info = (json.loads((out / name).read_text()) for name in ("index.json", "run.json"))
    assert index["checkpoint"] == "perov_5" and index["requested"] == run_info["requested"] == 1
    from equicsp_core.checkpoint_pins import SHIPPED_SHA256

    assert index["checkpoint_sha256"] == run_info["checkpoint_sha256"] == SHIPPED_SHA256["perov_5"]
