"""Where the engine computes: the torch device of a setting such as ``"auto"`` and the CPU thread count.

Device names (the ``device`` setting of sampling and relaxation):

- ``auto`` (the default): the first visible CUDA device if there is one, else the CPU;
- ``cpu``;
- ``cuda`` (the current CUDA device, normally ``cuda:0``) or ``cuda:N``, the N-th *visible* CUDA device;
- ``mps`` (Apple GPUs).

Anything else (``meta``, ``xpu``, text that is no device) is refused by :func:`check_device_name` as bad
input. A valid name whose device this machine lacks (``cuda`` on a CPU node, ``cuda:3`` with two GPUs, ``mps``
off a Mac) raises :class:`DeviceUnavailableError` in :func:`resolve_device`: the input is fine, the machine is
not, and the ``equicsp`` command exits with its own status for it (4) so a workflow does not retry blindly.

``CUDA_VISIBLE_DEVICES`` is respected: CUDA numbers the devices it lists from 0, so ``cuda:N`` is the N-th of
them, and a device outside the list cannot be chosen (a scheduler's GPU binding, e.g. Slurm's ``--gres``,
therefore holds). Names are checked on the machine that submits (AiiDA validates inputs there, without a GPU)
by :func:`check_device_name`, and resolved on the machine that runs by :func:`resolve_device`.

bf16 autocast (the ``precision`` of training and sampling) is fast only where the hardware supports it: GPUs
from Ampere on, and x86 CPUs with AVX-512 (BW, VL, DQ: PyTorch's condition for oneDNN's bf16 kernels, native
with AVX-512 BF16 or AMX). Elsewhere PyTorch's reference kernels run it, slower than fp32 (an AVX2-only AMD
EPYC: a perov_5 training epoch over 180 s under bf16 against 47 s in fp32, BENCHMARKS.md);
:func:`warn_if_bf16_slow` says so once per process, naming the setting to change.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

# the names are checked where settings are (torch-free: on the AiiDA daemon too)
from equicsp_core.settings import check_device_name

logger = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """A valid device that this machine does not have (or that ``CUDA_VISIBLE_DEVICES`` hides)."""


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of a device name on this machine.

    ``auto`` gives ``cuda:0`` (the first device of ``CUDA_VISIBLE_DEVICES``) when CUDA is available, else the
    CPU; ``cuda`` is ``cuda:0`` likewise.

    Raises:
        ValueError: ``name`` is not a device name (:func:`check_device_name`).
        DeviceUnavailableError: this machine lacks the device, or ``CUDA_VISIBLE_DEVICES`` hides it.
    """
    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError("device 'mps' is not available: this machine has no usable Apple GPU")
        return torch.device("mps")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda:0" if visible else "cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= visible:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"{visible} CUDA device(s) visible" + (f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else "")
        raise DeviceUnavailableError(f"device {name!r} is not available: {seen}")
    return torch.device(f"cuda:{index}")


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which a scheduler (Slurm's cgroups) restricts to
    the job's allocation; the machine's count where the mask is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count when none is set: ``$OMP_NUM_THREADS`` when it holds a count >= 1 (torch's own
    convention), else :func:`available_cpus`."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) >= 1 else available_cpus()


def check_threads(threads: object) -> int | None:
    """``threads`` if it is ``None`` or an integer >= 1; a ValueError otherwise."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or null: $OMP_NUM_THREADS, else every CPU the job may "
                         f"use), got {threads!r}")
    return threads


def set_threads(threads: int | None) -> int:
    """Make torch compute on ``threads`` CPU threads (``None``: :func:`default_threads`); returns the count.

    Without ``OMP_NUM_THREADS`` torch's own default is every core of the machine, which oversubscribes a node
    shared by several jobs; the affinity mask is the job's share.
    """
    count = default_threads() if check_threads(threads) is None else threads
    torch.set_num_threads(count)
    return count


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device``: a CUDA GPU that supports bf16, a CPU on which PyTorch uses
    oneDNN's bf16 kernels (x86 with AVX-512 BW, VL and DQ); other devices are taken at their word."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


@functools.cache
def warn_if_bf16_slow(device: torch.device, knob: str) -> bool:
    """Log a warning (once per process and knob) when bf16 autocast on ``device`` is not fast
    (:func:`native_bf16`); returns whether it warned. ``knob`` is the setting that asked for bf16, named in the
    message with its remedy."""
    if native_bf16(device):
        return False
    logger.warning("%s is bf16, but bf16 autocast is not fast on %s (no oneDNN bf16 kernels): it runs "
                   "slower than fp32 (4x for training on an AVX2 CPU, BENCHMARKS.md); set it to fp32",
                   knob, device)
    return True
