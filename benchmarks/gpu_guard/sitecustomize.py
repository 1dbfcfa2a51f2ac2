"""Import guard for a dry run of the GPU session here: fail where the device machine would.

Python imports ``sitecustomize`` at start-up from the first folder of ``sys.path`` that has one, so putting
this folder on ``PYTHONPATH`` (``scripts/gpu_session.sh --guard``) guards every process of the session. An
import of a top-level module that belongs to an installed distribution which is neither in
``device_packages.txt`` (the device machine's image) nor among the wheels of ``$EQUICSP_GUARD_CARRY/wheels``
(or named in ``$EQUICSP_GUARD_ALLOW``, comma-separated) raises ``ModuleNotFoundError`` naming it, as it would there. The standard library and this repository's
packages pass, and so do the requirements of a listed distribution as installed here: the device's copy of it
is another version that brings what it needs (pandas 2 here needs pytz, the device's pandas does not list it).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import re
import sys
from pathlib import Path


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str]:
    listed = Path(__file__).with_name("device_packages.txt").read_text().splitlines()
    allowed = {_normal(line) for line in listed if line.strip() and not line.startswith("#")}
    allowed |= {_normal(name) for name in os.environ.get("EQUICSP_GUARD_ALLOW", "").split(",") if name}
    carry = os.environ.get("EQUICSP_GUARD_CARRY")
    if carry:
        allowed |= {_normal(wheel.name.split("-")[0]) for wheel in Path(carry, "wheels").glob("*.whl")}
    return allowed | {requirement for name in allowed for requirement in _requirements(name)}


def _requirements(distribution: str) -> set[str]:
    """The names of what ``distribution``, as installed here, requires without extras (none if not installed)."""
    try:
        requires = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {_normal(re.match(r"[A-Za-z0-9_.-]+", line).group()) for line in requires if "extra ==" not in line}


class DeviceGuard(importlib.abc.MetaPathFinder):
    """Refuses top-level modules of distributions the device machine lacks."""

    def __init__(self) -> None:
        allowed = _allowed()
        repository = Path(__file__).resolve().parents[2]  # its packages travel with the working tree
        self.blocked: dict[str, str] = {}
        for module, distributions in importlib.metadata.packages_distributions().items():
            if module in sys.stdlib_module_names or (repository / module).is_dir():
                continue
            if not any(_normal(d) in allowed for d in distributions):
                self.blocked[module] = distributions[0]

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        top = fullname.partition(".")[0]
        if top in self.blocked:
            raise ModuleNotFoundError(f"{top} (distribution {self.blocked[top]}) is not on the device machine "
                                      "(benchmarks/gpu_guard)", name=fullname)
        return None


sys.meta_path.insert(0, DeviceGuard())
