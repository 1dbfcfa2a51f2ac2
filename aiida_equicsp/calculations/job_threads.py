"""How many CPU threads an ``equicsp`` job computes on, from its parameters or its scheduler resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def job_threads(parameters: Mapping[str, Any], resources: Mapping[str, Any]) -> int:
    """The ``threads`` setting of a job: ``parameters['threads']`` when given, else the cores each process was
    given (the ``num_cores_per_mpiproc`` resource: Slurm's ``--cpus-per-task``), else 1.

    One thread when nothing says otherwise: the ``core.direct`` scheduler runs jobs side by side on one
    machine, and torch's default (every core, per job) would oversubscribe it.
    """
    threads = parameters.get("threads")
    if threads is None:
        threads = resources.get("num_cores_per_mpiproc") or 1
    return threads
