"""What ``equicsp`` writes besides its results: ``--version``, the log levels, no progress bar off a terminal."""

import subprocess
import sys
from pathlib import Path

import pytest

from equicsp_core import __version__
from equicsp_core.cli import main

EQUICSP = Path(sys.executable).parent / "equicsp"


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"equicsp {__version__}"


def sample_flags(checkpoint, out, steps=2):
    return ["sample", "--checkpoint", str(checkpoint), "--formula", "SrTiO3", "--steps", str(steps),
            "--num-samples", "1", "--device", "cpu", "--out", str(out)]


def test_info_is_logged_by_default_and_quiet_keeps_only_warnings(tiny_checkpoint, tmp_path, capsys):
    assert main(sample_flags(tiny_checkpoint, tmp_path / "loud")) == 0
    loud = capsys.readouterr().err
    assert "INFO equicsp_core.cli: sampling on cpu" in loud and "batch 1/1: 1 crystals sampled" in loud
    assert main(["-q", *sample_flags(tiny_checkpoint, tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err == ""


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["-v", "-q", "info", "perov_5"])
    assert stopped.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_a_long_sample_off_a_terminal_writes_a_few_log_lines_and_no_bar(tiny_checkpoint, tmp_path):
    """1000 steps with stderr a pipe (a batch job's log): no progress bar redraws, well under 2 kB of stderr.

    A tqdm bar would redraw (with carriage returns) about ten times a second for the whole run.
    """
    run = subprocess.run([EQUICSP, "--threads", "1", *sample_flags(tiny_checkpoint, tmp_path / "out", steps=1000)],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "sampling:" not in run.stderr
    assert len(run.stderr.encode()) < 2000, run.stderr
    assert "batch 1/1" in run.stderr


def test_evaluate_off_a_terminal_logs_each_sampling_batch_and_the_matching(tiny_checkpoint, tmp_path, capsys):
    """k = 2 on 3 fixture crystals is two sampling batches: each gets a log line in place of the bar, then matching."""
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--dataset", "perov_5", "--limit", "3",
                 "--num-samples", "2", "--steps", "2", "--processes", "1", "--out", str(tmp_path / "r.json")]) == 0
    log = capsys.readouterr().err
    assert "batch 1/2: 3 crystals sampled in" in log and "batch 2/2: 3 crystals sampled in" in log
    assert "matching 3 crystals (k = 2)" in log
