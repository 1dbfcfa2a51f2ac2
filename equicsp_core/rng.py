"""Random draws of the engine: made on the generator's device, used on the computing device.

Every seeded generator of the engine (training, validation, sampling, evaluation) is a CPU
``torch.Generator``. A draw is made where its generator lives and then moved to the device that computes, so

- a seed means the same numbers on every device: the same seed sampled on a CPU and on a GPU differs only by
  the arithmetic of the two, not by the noise (BENCHMARKS.md measures that difference);
- a training run's ``resume.pt`` holds a CPU generator state, which a run continued on another device takes
  over as it is: the random stream of a run does not depend on where its epochs ran.

A draw without a generator is made on the computing device from torch's global generator. A GPU generator
(``torch.Generator("cuda")``) can still be passed where speed matters more than that property: its draws stay
on the GPU.
"""

from __future__ import annotations

import torch


def _origin(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape`` from ``generator``, on ``device``."""
    return torch.randn(shape, generator=generator, device=_origin(generator, device), dtype=dtype).to(device)


def rand(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in [0, 1) of ``shape`` from ``generator``, on ``device``."""
    return torch.rand(shape, generator=generator, device=_origin(generator, device), dtype=dtype).to(device)


def randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None,
            device: torch.device | str) -> torch.Tensor:
    """Integers in ``[low, high)`` (int64) of ``shape`` from ``generator``, on ``device``."""
    return torch.randint(low, high, shape, generator=generator, device=_origin(generator, device)).to(device)
