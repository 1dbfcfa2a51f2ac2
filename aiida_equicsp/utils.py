"""Ready-to-run builders for the EquiCSP calculations, with defaults from the protocol files."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import yaml
from aiida import orm
from aiida.engine import ProcessBuilder

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation
from aiida_equicsp.data.model import EquiCSPModelData


def load_protocols(name: str = "sample") -> dict[str, Any]:
    """The parsed protocol file ``aiida_equicsp/protocols/<name>.yaml``."""
    return yaml.safe_load(resources.files("aiida_equicsp").joinpath("protocols", f"{name}.yaml").read_text())


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, mapping by mapping (neither is modified)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def get_builder_from_protocol(
    code: orm.AbstractCode,
    model: EquiCSPModelData,
    compositions: Sequence[str] | orm.List,
    num_samples: int | orm.Int,
    protocol: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ProcessBuilder:
    """A builder of :class:`EquiCSPSampleCalculation` with the inputs of a protocol of ``protocols/sample.yaml``.

    Args:
        code: an installed ``equicsp`` program.
        model: the trained model.
        compositions: formulas to sample.
        num_samples: candidates per formula.
        protocol: ``"fast"`` or ``"precise"`` (default: the file's ``default_protocol``).
        overrides: inputs merged over the protocol's, e.g. ``{"parameters": {"seed": 3},
            "metadata": {"options": {"max_wallclock_seconds": 3600}}}``.

    Raises:
        ValueError: for an unknown protocol.
    """
    protocols = load_protocols("sample")
    protocol = protocol or protocols["default_protocol"]
    if protocol not in protocols["protocols"]:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(protocols['protocols'])}")
    inputs = {key: value for key, value in protocols["protocols"][protocol].items() if key != "description"}
    inputs = _merged(inputs, overrides or {})

    builder = EquiCSPSampleCalculation.get_builder()
    builder.code = code
    builder.model = model
    builder.compositions = compositions if isinstance(compositions, orm.List) else orm.List(list(compositions))
    builder.num_samples = num_samples if isinstance(num_samples, orm.Int) else orm.Int(num_samples)
    if "parameters" in inputs:
        builder.parameters = orm.Dict(inputs.pop("parameters"))
    builder._merge(inputs)
    return builder
