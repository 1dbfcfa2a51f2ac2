"""The prepared GPU session (scripts/gpu_session.sh, benchmarks/gpu_session.py) and what it relies on: random
draws on the CPU generator whatever the device, resume files that any device can continue."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equicsp_core import rng
from equicsp_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session  # noqa: E402


def test_draws_come_from_the_generator_device_and_land_on_the_computing_device():
    """A CPU generator gives the numbers a plain CPU draw gives, on the device asked for (``meta`` stands in
    for a GPU here), and advances exactly as that CPU draw does."""
    ours, plain = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    moved = rng.randn((5, 3), ours, "meta")
    assert moved.device.type == "meta" and moved.shape == (5, 3)
    torch.randn((5, 3), generator=plain)
    assert torch.equal(ours.get_state(), plain.get_state())
    assert torch.equal(rng.rand((4,), ours, "cpu"), torch.rand((4,), generator=plain))
    assert torch.equal(rng.randint(1, 9, (6,), ours, "cpu"), torch.randint(1, 9, (6,), generator=plain))


def test_resume_file_holds_cpu_tensors_and_refuses_a_foreign_generator_state(tmp_path):
    from equicsp_core.config import load_run_config
    from equicsp_core.train import build_training

    run = tmp_path / "run"
    assert main(["--quiet", "train", "--preset", "tiny", "--out", str(run), "--set", "train.epochs=1"]) == 0
    saved = torch.load(run / "resume.pt", map_location=None, weights_only=True)
    assert all(t.device.type == "cpu" for t in gpu_session._tensors(saved))
    assert saved["generator"].shape == torch.Generator().get_state().shape

    saved["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state has 16 bytes
    torch.save(saved, tmp_path / "foreign.pt")
    objects = build_training(load_run_config("tiny", []), "cpu")
    with pytest.raises(ValueError, match="16,\\)-byte generator"):
        objects.restore(tmp_path / "foreign.pt")


def test_guard_refuses_what_the_device_machine_lacks():
    """Under the guard pymatgen (not on the device) fails to import; torch, yaml and pandas import."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks" / "gpu_guard"))
    code = ("import torch, yaml, pandas\n"
            "try:\n    import pymatgen.core\nexcept ModuleNotFoundError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: pymatgen" in done.stdout and "not on the device machine" in done.stdout


@pytest.mark.slow
def test_cpu_session_runs_end_to_end_under_the_guard(tmp_path, fixture_data_dir):
    """The whole device call on the CPU with tiny settings, every process under the import guard (no pymatgen,
    ase, aiida, ...; pydantic as the carried wheels would bring it): all phases pass, the files come back, and
    ``unpack`` puts the continued run into its folder (and then refuses to overwrite it again)."""
    run, carry, out = tmp_path / "run", tmp_path / "carry", tmp_path / "out"
    assert main(["--quiet", "train", "--preset", "tiny", "--out", str(run), "--set", "dataset=mp_20",
                 "--set", "train.epochs=1"]) == 0
    assert gpu_session.main(["prepare", "--carry", str(carry), "--data-dir", str(fixture_data_dir), "--datasets",
                             "mp_20", "--composition-datasets", "mp_20", "perov_5", "--compositions", "6",
                             "--no-wheels"]) == 0
    assert sorted(p.name for p in (carry / "data" / "mp_20").iterdir()) == [
        "reserved_test_rows.txt", "test.csv.gz", "val.csv.gz"]
    assert len(list((carry / "cache").glob("mp_20_*.pt.xz"))) == 2

    env = dict(os.environ, OUT=str(out), EQUICSP_PYTHON=sys.executable, EQUICSP_CARRY=str(carry),
               EQUICSP_GUARD_ALLOW=",".join(gpu_session.WHEELS), OMP_NUM_THREADS="1")
    env.pop("EQUICSP_CACHE_DIR")  # the session must live on the carried caches alone
    done = subprocess.run(
        [str(ROOT / "scripts" / "gpu_session.sh"), "--guard", "--device", "cpu", "--run", str(run), "--preset", "tiny",
         "--set", "dataset=mp_20", "--minutes", "0.01", "--max-epochs", "1", "--budget-minutes", "5",
         "--bench-seconds", "60", "--crystals", "4", "--steps", "2,3", "--compare-crystals", "2",
         "--compare-steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"gpu_session.json", "session.log", "train.tar.part-00"}
    report = json.loads((out / "gpu_session.json").read_text())
    assert {name: record["exit_status"] for name, record in report["phases"].items()} == {
        "check_resume": 0, "train": 0, "bench": 0}
    assert report["phases"]["check_resume"]["result"]["passed"] is True
    assert [epoch["epoch"] for epoch in report["phases"]["train"]["new_epochs"]] == [2]
    throughput = report["phases"]["bench"]["result"]["throughput"]
    assert sorted((r["model"], r["steps"], r["precision"]) for r in throughput) == sorted(
        (m, s, p) for m in ("perov_5", "mp_20") for s in (2, 3) for p in ("fp32", "bf16"))
    compared = report["phases"]["bench"]["result"]["same_seed_cpu_vs_device"]
    assert [c["model"] for c in compared] == ["perov_5", "mp_20"]
    assert all(c["device_fp32"]["frac"]["max"] == 0 for c in compared)  # CPU against CPU: the same numbers
    assert "phase train: exit 0" in (out / "session.log").read_text()

    assert gpu_session.main(["unpack", str(out), "--into", str(run)]) == 0
    assert torch.load(run / "resume.pt", weights_only=True)["progress"]["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert gpu_session.main(["unpack", str(out), "--into", str(run)]) == 2  # the run is no longer the start state
