"""Protocols of the EquiCSP work chains, in the format of aiida-quantumespresso's protocol files.

Each ``<name>.yaml`` here has ``default_inputs`` (inputs every protocol shares), ``default_protocol`` and
``protocols`` (``fast``, ``balanced``, ``stringent``: a ``description`` and the inputs that differ), and is read
by aiida-quantumespresso's ``ProtocolMixin`` (``get_protocol_inputs``, ``get_available_protocols``,
``get_default_protocol``) through :class:`EquiCSPProtocolMixin`, which adds the names of earlier releases.
"""

from __future__ import annotations

import pathlib
import warnings
from importlib import resources
from typing import Any, ClassVar

from aiida_quantumespresso.workflows.protocols.utils import ProtocolMixin


class EquiCSPProtocolMixin(ProtocolMixin):
    """aiida-quantumespresso's ``ProtocolMixin`` for a protocol file of this folder, with renamed protocols
    accepted under their old names (with a ``FutureWarning``, the warning meant for users) and unknown names
    refused with the list of known ones."""

    #: The file of this folder, set by each work chain: ``"sample.yaml"``, ``"predict_relax.yaml"``.
    _protocol_filename: ClassVar[str]
    #: Names of earlier releases → today's.
    RENAMED_PROTOCOLS: ClassVar[dict[str, str]] = {"precise": "stringent"}

    @classmethod
    def get_protocol_filepath(cls) -> pathlib.Path:
        """The protocol file of the work chain."""
        return pathlib.Path(str(resources.files(__name__).joinpath(cls._protocol_filename)))

    @classmethod
    def resolve_protocol(cls, protocol: str | None) -> str:
        """The protocol's name today: the default for ``None``, the new name (with a warning) for an old one.

        Raises:
            ValueError: for a name that is neither a protocol nor an old name of one.
        """
        if protocol is None:
            return cls.get_default_protocol()
        if protocol in cls.RENAMED_PROTOCOLS:
            renamed = cls.RENAMED_PROTOCOLS[protocol]
            warnings.warn(f"protocol {protocol!r} is deprecated: it is now called {renamed!r}", FutureWarning,
                          stacklevel=3)
            return renamed
        available = cls.get_available_protocols()
        if protocol not in available:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(available)}")
        return protocol

    @classmethod
    def get_protocol_inputs(cls, protocol: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
        """The protocol's inputs (``default_inputs`` merged with the protocol's) with ``overrides`` merged over
        them; ``protocol`` as :meth:`resolve_protocol` takes it."""
        return super().get_protocol_inputs(cls.resolve_protocol(protocol), dict(overrides or {}))
