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
"""

from __future__ import annotations

import os

import torch

# the names are checked where settings are (torch-free: on the AiiDA daemon too)
from equicsp_core.settings import check_device_name



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
