"""Ready-to-run builders for the EquiCSP processes, with defaults from the protocol files.

The protocol file ``protocols/sample.yaml`` is the one place of the sampling defaults: :func:`protocol_inputs`
reads a protocol and merges a user's overrides over it, and :func:`set_sample_inputs` fills the inputs of an
:class:`EquiCSPSampleCalculation` with them, in its own builder (:func:`get_builder_from_protocol`) or in the
``sample`` namespace of the restart work chain
(:meth:`aiida_equicsp.workchains.sample_base.EquiCSPSampleBaseWorkChain.get_builder_from_protocol`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import yaml
from aiida import orm
from aiida.engine import ProcessBuilder
from aiida.engine.processes.builder import ProcessBuilderNamespace
from equicsp_core.settings import formula_list

from aiida_equicsp.calculations.sample import EquiCSPSampleCalculation
from aiida_equicsp.data.model import EquiCSPModelData


def load_protocols(name: str = "sample") -> dict[str, Any]:
    """The parsed protocol file ``aiida_equicsp/protocols/<name>.yaml``."""
    return yaml.safe_load(resources.files("aiida_equicsp").joinpath("protocols", f"{name}.yaml").read_text())


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, mapping by mapping (neither is modified)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def protocol_inputs(
    protocol: str | None = None, overrides: Mapping[str, Any] | None = None, name: str = "sample"
) -> dict[str, Any]:
    """The inputs of a protocol of ``protocols/<name>.yaml`` with ``overrides`` merged over them.

    Args:
        protocol: ``"fast"`` or ``"precise"`` (default: the file's ``default_protocol``).
        overrides: inputs merged over the protocol's, e.g. ``{"parameters": {"seed": 3}}``.
        name: the protocol file, ``sample`` (the calculation's) or ``predict_relax`` (the work chain's).

    Raises:
        ValueError: for an unknown protocol.
    """
    protocols = load_protocols(name)
    protocol = protocol or protocols["default_protocol"]
    if protocol not in protocols["protocols"]:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(protocols['protocols'])}")
    inputs = {key: value for key, value in protocols["protocols"][protocol].items() if key != "description"}
    return deep_merge(inputs, overrides or {})


def set_sample_inputs(
    namespace: ProcessBuilderNamespace,
    code: orm.AbstractCode,
    model: EquiCSPModelData,
    compositions: Sequence[str] | orm.List,
    num_samples: int | orm.Int,
    inputs: Mapping[str, Any],
) -> None:
    """Fill a builder (namespace) of :class:`EquiCSPSampleCalculation` inputs: the request, then ``inputs``.

    ``inputs`` are plain values as :func:`protocol_inputs` returns them; ``parameters`` becomes a ``Dict``.
    """
    inputs = dict(inputs)
    namespace.code = code
    namespace.model = model
    namespace.compositions = compositions if isinstance(compositions, orm.List) else orm.List(list(formula_list(compositions)))
    namespace.num_samples = num_samples if isinstance(num_samples, orm.Int) else orm.Int(num_samples)
    if "parameters" in inputs:
        namespace.parameters = orm.Dict(inputs.pop("parameters"))
    namespace._merge(inputs)


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
    builder = EquiCSPSampleCalculation.get_builder()
    set_sample_inputs(builder, code, model, compositions, num_samples, protocol_inputs(protocol, overrides))
    return builder
