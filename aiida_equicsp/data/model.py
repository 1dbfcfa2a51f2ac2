"""An EquiCSP checkpoint as AiiDA data: the file, its model card summary, and a content hash to find it again.

Reading a checkpoint needs torch; it is imported only when a file is checked on construction, never when
a stored node is loaded or queried (the daemon and the parser do not need it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiida import orm

from equicsp_core.files import file_sha256

#: Model card entries kept as attributes (``num_atoms_counts``: a generation model's training distribution of atom
#: counts, ``equicsp_core.generate.CARD_KEY``; ``None`` for a CSP model).
CARD_ATTRIBUTES = ("dataset", "epochs", "num_atoms_counts")
#: Denoiser config entries kept as attributes.
DENOISER_ATTRIBUTES = ("mode", "hidden_dim", "num_layers", "num_freqs")
#: The task of a checkpoint whose denoiser config predates tasks (and of a node stored before ``task`` was kept).
DEFAULT_TASK = "csp"


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """The attributes of an :class:`EquiCSPModelData` for a checkpoint file.

    Raises:
        ValueError: naming the file, when it is not a readable EquiCSP checkpoint.
    """
    from equicsp_core.checkpoint import read_checkpoint

    payload = read_checkpoint(path)
    try:
        card, denoiser, diffusion = payload.get("card") or {}, payload["denoiser"], payload["diffusion"]
        summary = {name: denoiser[name] for name in DENOISER_ATTRIBUTES}
        summary["task"] = denoiser.get("task", DEFAULT_TASK)
        summary["num_steps"] = diffusion["num_steps"]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is an incomplete EquiCSP checkpoint (no {error} in its configs)") from error
    summary.update({name: card.get(name) for name in CARD_ATTRIBUTES})
    summary["sha256"] = file_sha256(path)
    summary["model_sha256"] = payload["model_sha256"]
    return summary


class EquiCSPModelData(orm.SinglefileData):
    """A trained EquiCSP model: one checkpoint file, checked on construction.

    Attributes, from the file: ``dataset``, ``epochs`` and ``num_atoms_counts`` (the model card), ``task`` (``"csp"`` or
    ``"generation"``), ``mode``, ``hidden_dim``, ``num_layers``, ``num_freqs`` (the denoiser), ``num_steps`` (T of the diffusion), ``sha256`` (the
    file's hash, by which :meth:`get_or_create` finds a stored copy) and ``model_sha256`` (the hash of the
    configs and weights the file carries, checked on construction).
    """

    def __init__(self, file: str | os.PathLike, filename: str | None = None, **kwargs: Any) -> None:
        """Hold the checkpoint at path ``file`` (stored as ``filename``, default its own name).

        Raises:
            ValueError: naming the file, when it is missing or not an EquiCSP checkpoint.
        """
        super().__init__(file, filename=filename, **kwargs)

    def set_file(self, file: str | os.PathLike, filename: str | None = None) -> None:  # type: ignore[override]
        """Replace the checkpoint by the file at path ``file``, after checking it and reading its card."""
        if not isinstance(file, (str, os.PathLike)):
            raise TypeError(f"{type(self).__name__} takes the path of a checkpoint file, got {type(file).__name__}")
        path = Path(file).resolve()
        if not path.is_file():
            raise ValueError(f"checkpoint file {file} does not exist")
        summary = checkpoint_summary(path)
        super().set_file(path, filename=filename)
        self.base.attributes.set_many(summary)

    @property
    def mode(self) -> str:
        """Denoiser mode, ``"equicsp"`` or ``"diffcsp"``."""
        return self.base.attributes.get("mode")

    @property
    def task(self) -> str:
        """``"csp"`` (structures of given compositions: ``equicsp sample``) or ``"generation"`` (ab initio, atom
        types drawn too: ``equicsp generate``), from the checkpoint's denoiser config."""
        return self.base.attributes.get("task", DEFAULT_TASK)

    @property
    def trained_atom_counts(self) -> list[int]:
        """The atom counts of the crystals a generation model was trained on (its card's ``num_atoms_counts``);
        empty for a CSP model or a card that does not say."""
        return sorted(int(count) for count in self.base.attributes.get("num_atoms_counts") or {})

    @property
    def dataset(self) -> str | None:
        """The dataset the model was trained on (its card's), ``None`` when the card does not say."""
        return self.base.attributes.get("dataset")

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps the model was trained with (the most a sampler can take)."""
        return self.base.attributes.get("num_steps")

    @property
    def sha256(self) -> str:
        """SHA-256 of the checkpoint file."""
        return self.base.attributes.get("sha256")

    @classmethod
    def get_or_create(cls, path: str | os.PathLike) -> EquiCSPModelData:
        """The stored model node with this file's content, or a new one, checked and stored.

        Nodes are matched by the SHA-256 of the file, so one checkpoint is stored once whatever its name.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} does not exist")
        query = orm.QueryBuilder().append(cls, filters={"attributes.sha256": file_sha256(path)})
        existing = query.first(flat=True)
        if existing is not None:
            return existing
        return cls(path).store()

    @classmethod
    def from_shipped(cls, name: str) -> EquiCSPModelData:
        """The stored node of a checkpoint shipped with ``equicsp_core`` (see ``equicsp info``), by name."""
        from equicsp_core.checkpoint import resolve_checkpoint

        return cls.get_or_create(resolve_checkpoint(name))
