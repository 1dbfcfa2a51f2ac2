"""Device names and their resolution, thread counts, and the ``equicsp`` exit status for a missing device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equicsp_core import hardware
from equicsp_core.cli import main
from equicsp_core.hardware import (
    DeviceUnavailableError,
    available_cpus,
    check_threads,
    native_bf16,
    resolve_device,
    set_threads,
)
from equicsp_core.runfolder import Failure
from equicsp_core.settings import check_device_name

EQUICSP = Path(sys.executable).parent / "equicsp"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: torch sees ``n`` CUDA devices (0: none)."""

    def factory(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return factory


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_are_accepted(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["meta", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:0,1", "xpu", "", None, 0])
def test_other_device_names_are_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda, cuda:N or mps, got"):
        check_device_name(name)


def test_auto_is_the_cpu_without_cuda_and_the_first_visible_gpu_with_it(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda:0")


def test_cuda_n_is_the_nth_visible_device(gpus):
    gpus(2)
    assert (resolve_device("cuda"), resolve_device("cuda:1")) == (torch.device("cuda:0"), torch.device("cuda:1"))


def test_a_device_beyond_the_visible_ones_is_unavailable_and_names_the_mask(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(DeviceUnavailableError,
                       match=r"^device 'cuda:2' is not available: 2 CUDA device\(s\) visible "
                             r"\(CUDA_VISIBLE_DEVICES='4,5'\)"):
        resolve_device("cuda:2")


def test_cuda_without_a_gpu_is_unavailable(gpus):
    gpus(0)
    with pytest.raises(DeviceUnavailableError, match=r"^device 'cuda' is not available: 0 CUDA device"):
        resolve_device("cuda")


def test_mps_off_a_mac_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="^device 'mps' is not available"):
        resolve_device("mps")


def test_a_bad_name_is_bad_input_not_an_unavailable_device():
    with pytest.raises(ValueError, match="device must be one of") as caught:
        resolve_device("meta")
    assert not isinstance(caught.value, DeviceUnavailableError)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(threads):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        check_threads(threads)


def test_set_threads_defaults_to_omp_num_threads_else_the_cpus_of_the_affinity_mask(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads(None) == 3 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(None) == available_cpus() == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this platform (Linux only)")
    assert available_cpus() == len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------------------
# the `equicsp` command


def test_sample_on_a_missing_device_exits_4_with_one_line_and_no_output(tiny_checkpoint, tmp_path, capsys, gpus):
    gpus(0)
    out = tmp_path / "out"
    status = main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3",
                   "--device", "cuda:1", "--out", str(out)])
    assert status == Failure.DEVICE_UNAVAILABLE.exit_status == 4
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["equicsp sample: error: device 'cuda:1' is not available: 0 CUDA device(s) visible"]
    assert not out.exists()


def test_relax_on_a_missing_device_exits_4_before_any_output(tmp_path, capsys, gpus):
    from pymatgen.core import Lattice, Structure

    gpus(0)
    structures = tmp_path / "s.json"
    structures.write_text(json.dumps({"cu": Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]]).as_dict()}))
    settings = tmp_path / "relax.yaml"
    settings.write_text("potential: tests.test_relax:emt\ndevice: cuda\n")
    out = tmp_path / "out"
    status = main(["--quiet", "relax", "--structures", str(structures), "--input", str(settings), "--out", str(out)])
    assert status == 4
    assert capsys.readouterr().err.startswith("equicsp relax: error: device 'cuda' is not available")
    assert not out.exists()


def test_mps_off_a_mac_exits_4_with_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    status = main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3",
                   "--device", "mps", "--out", str(tmp_path / "out")])
    assert status == 4
    assert capsys.readouterr().err.strip().splitlines() == [
        "equicsp sample: error: device 'mps' is not available: this machine has no usable Apple GPU"]


@pytest.mark.parametrize("command", [["train", "--preset", "tiny"], ["evaluate", "--checkpoint", "perov_5",
                                                                     "--dataset", "perov_5", "--limit", "1"]])
def test_train_and_evaluate_refuse_a_bad_device_name_in_one_line(tmp_path, capsys, command):
    status = main(["--quiet", *command, "--device", "meta", "--out", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err.strip() == (f"equicsp {command[0]}: error: device must be one of auto, cpu, "
                                               "cuda, cuda:N or mps, got 'meta'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["meta", "mps:0"])
def test_sample_with_a_bad_device_name_exits_2(tiny_checkpoint, tmp_path, capsys, device):
    status = main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3",
                   "--device", device, "--out", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err.strip() == (f"equicsp sample: error: device must be one of auto, cpu, cuda, "
                                               f"cuda:N or mps, got {device!r}")


def test_hidden_gpus_are_never_chosen(tiny_checkpoint, tmp_path):
    """``CUDA_VISIBLE_DEVICES=""`` hides every GPU: ``cuda`` is unavailable (exit 4), ``auto`` runs on the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    common = ["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3", "--steps", "2"]
    refused = subprocess.run([EQUICSP, *common, "--device", "cuda", "--out", str(tmp_path / "cuda")],
                             env=env, capture_output=True, text=True)
    assert refused.returncode == 4, refused.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in refused.stderr
    done = subprocess.run([EQUICSP, *common, "--out", str(tmp_path / "auto")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["device"] == "cpu"


def test_threads_setting_reaches_torch_and_run_json(tiny_checkpoint, tmp_path):
    settings = tmp_path / "input.yaml"
    settings.write_text("formulas: [SrTiO3]\nsteps: 2\nthreads: 1\ndevice: cpu\n")
    before = torch.get_num_threads()
    try:
        assert main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--input", str(settings),
                     "--out", str(tmp_path / "out")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["device"], run["threads"]) == ("cpu", 1)


@NEEDS_CUDA
def test_sampling_runs_on_cuda(tiny_checkpoint, tmp_path):
    assert main(["--quiet", "sample", "--checkpoint", str(tiny_checkpoint), "--formula", "SrTiO3", "--steps", "5",
                 "--device", "cuda", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["device"] == "cuda:0"


@NEEDS_CUDA
def test_auto_picks_cuda_when_present():
    assert resolve_device("auto") == torch.device("cuda:0")



def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or os.uname().machine != "x86_64",
                    reason="reads the x86 CPU flags of Linux's /proc/cpuinfo")
def test_native_bf16_on_this_cpu_follows_its_avx512_flags():
    """PyTorch uses oneDNN's bf16 kernels on x86 exactly when AVX-512 BW, VL and DQ are there."""
    assert native_bf16(torch.device("cpu")) == ({"avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags())


def test_bf16_on_a_device_without_fast_bf16_is_warned_once_naming_the_setting(monkeypatch, caplog):
    """The warning names the setting and its remedy, and comes once per process however many batches ask."""
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    hardware.warn_if_bf16_slow.cache_clear()
    with caplog.at_level("WARNING", logger="equicsp_core.hardware"):
        assert hardware.warn_if_bf16_slow(torch.device("cpu"), "train.precision")
        hardware.warn_if_bf16_slow(torch.device("cpu"), "train.precision")
    hardware.warn_if_bf16_slow.cache_clear()
    assert len(caplog.records) == 1
    assert "train.precision is bf16" in caplog.text and "set it to fp32" in caplog.text


def test_bf16_on_a_device_with_fast_bf16_is_not_warned(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    hardware.warn_if_bf16_slow.cache_clear()
    with caplog.at_level("WARNING", logger="equicsp_core.hardware"):
        assert not hardware.warn_if_bf16_slow(torch.device("cpu"), "precision")
    hardware.warn_if_bf16_slow.cache_clear()
    assert not caplog.records


def test_sampling_under_bf16_on_a_slow_device_warns_through_the_sampler(monkeypatch, caplog):
    """The sampler asks before its first network call (the CLI's --precision bf16 reaches it)."""
    from equicsp_core.diffusion import CrystalDiffusion
    from equicsp_core.network import DenoiserConfig
    from equicsp_core.sampler import sample

    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    hardware.warn_if_bf16_slow.cache_clear()
    model = CrystalDiffusion(DenoiserConfig(hidden_dim=8, num_layers=1, num_freqs=2)).eval()
    with caplog.at_level("WARNING", logger="equicsp_core.hardware"):
        sample(model, torch.tensor([8, 8]), torch.tensor([2]), steps=2, precision="bf16")
    hardware.warn_if_bf16_slow.cache_clear()
    assert "precision is bf16" in caplog.text
