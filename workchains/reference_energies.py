"""The ML energies of reference entries, relaxed by ``EquiCSPRelaxCalculation``s and found in the provenance.

The ML hull (:mod:`equicsp_core.stability`) needs the reference entries of each candidate's chemical system
relaxed with the candidates' potential and settings. The work chain relaxes them as it relaxes the candidates:
in an :class:`~aiida_equicsp.calculations.relax.EquiCSPRelaxCalculation` on the relax code (the compute host,
where the potential and torch are installed), never in the daemon. Each such calculation carries two extras,

- :data:`REFERENCE_SET_EXTRA`: the reference set's SHA-256 (:attr:`equicsp_core.reference.ReferenceSet.sha256`),
- :data:`ML_LEVEL_EXTRA`: the level of its settings (:func:`equicsp_core.pipeline.ml_level`),

and names each structure by :func:`reference_link_label` of its entry id. "Already relaxed" is then a query:
:func:`reference_relaxations` finds the finished calculations of a set and level, :func:`known_records` the
record of each entry id in their ``results`` (newest calculation first; a relaxed energy before a failure), so a
second work chain, or a campaign of many, relaxes each reference once per level. A failed relaxation is a known
record too (as in the engine's :class:`~equicsp_core.stability.EnergyCache`): it is not retried at that level,
and the hull says the entry is missing.

The calcfunction :func:`collect_reference_energies` turns the ``results`` of those calculations into the
``{id: {"energy_per_atom", "status", "error"}}`` Dict that the stability calcfunction receives, so the
provenance links every hull to the relaxations it used. Nothing here imports the potential or torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiida import orm
from aiida.engine import calcfunction

from aiida_equicsp.calculations.relax import EquiCSPRelaxCalculation

#: Extra of a reference relaxation: the SHA-256 of its reference set.
REFERENCE_SET_EXTRA = "equicsp_reference_set"
#: Extra of a reference relaxation: the ML level of its settings (:func:`equicsp_core.pipeline.ml_level`).
ML_LEVEL_EXTRA = "equicsp_ml_level"
#: Prefix of a reference entry's link label.
LABEL_PREFIX = "ref"
_LABEL_BODY = re.compile(r"(?:[A-Za-z0-9]|_[0-9a-f]{2})+")


def reference_link_label(entry_id: str) -> str:
    """A valid AiiDA link label for a reference entry id, reversibly (:func:`reference_id`): ``mp-1234`` →
    ``refmp_2d1234``.

    ASCII letters and digits are kept; every other byte of the UTF-8 id becomes ``_`` and two hex digits, so
    the label has no double or trailing underscore (which AiiDA reads as a namespace or refuses).
    """
    if not entry_id:
        raise ValueError("a reference entry id cannot be empty")
    encoded = "".join(chr(byte) if chr(byte).isascii() and chr(byte).isalnum() else f"_{byte:02x}"
                      for byte in entry_id.encode())
    return LABEL_PREFIX + encoded


def reference_id(link_label: str) -> str:
    """The entry id of a :func:`reference_link_label`; ``ValueError`` for a label it did not make."""
    body = link_label[len(LABEL_PREFIX):] if link_label.startswith(LABEL_PREFIX) else ""
    if not _LABEL_BODY.fullmatch(body):
        raise ValueError(f"{link_label!r} is not a reference link label")
    tokens = re.findall(r"_[0-9a-f]{2}|[A-Za-z0-9]", body)
    try:
        return bytes(int(token[1:], 16) if token.startswith("_") else ord(token) for token in tokens).decode()
    except UnicodeDecodeError:
        raise ValueError(f"{link_label!r} is not a reference link label") from None


def reference_relaxations(reference_sha256: str, level: str, ids: Iterable[str]) -> list[orm.CalcJobNode]:
    """The finished :class:`EquiCSPRelaxCalculation`s of reference entries of this set and level whose ``results``
    (finished ok, or stopped with part of them) hold a record of any of ``ids``, newest first.

    The database does the selection (``has_key`` on the results' labels), so a campaign's hundreds of reference
    relaxations are not loaded to find the few of one chemical system.
    """
    labels = sorted({reference_link_label(entry_id) for entry_id in ids})
    if not labels:
        return []
    query = orm.QueryBuilder()
    query.append(EquiCSPRelaxCalculation, tag="calc", project="*",
                 filters={f"extras.{REFERENCE_SET_EXTRA}": reference_sha256, f"extras.{ML_LEVEL_EXTRA}": level,
                          "attributes.process_state": "finished"})
    query.append(orm.Dict, with_incoming="calc", edge_filters={"label": "results"},
                 filters={"or": [{"attributes": {"has_key": label}} for label in labels]})
    query.order_by({"calc": {"ctime": "desc"}})
    query.distinct()
    return [node for (node,) in query.all()]


def best_records(results: Iterable[Mapping[str, Mapping[str, Any]]],
                 ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The record ``{"energy_per_atom", "status", "error"}`` of each id found in ``results`` (``results`` of
    reference relaxations, by link label, in order of preference): the first with an energy, else the first
    failure. Ids in no ``results`` are absent."""
    wanted = set(ids)
    found: dict[str, dict[str, Any]] = {}
    for records in results:
        for label, record in records.items():
            try:
                entry_id = reference_id(label)
            except ValueError:
                continue
            if entry_id not in wanted or found.get(entry_id, {}).get("energy_per_atom") is not None:
                continue
            energy = record.get("energy_per_atom")
            relaxed = record.get("status") != "failed" and energy is not None
            if relaxed or entry_id not in found:
                found[entry_id] = {"energy_per_atom": float(energy) if relaxed else None,
                                   "status": record.get("status"), "error": record.get("error")}
    return found


def known_records(reference_sha256: str, level: str,
                  ids: Iterable[str]) -> tuple[dict[str, dict[str, Any]], list[orm.CalcJobNode]]:
    """The records of ``ids`` already relaxed at ``level`` (:func:`best_records` of the :func:`reference_relaxations`
    that hold any of them), and those calculations, newest first."""
    ids = set(ids)
    nodes = reference_relaxations(reference_sha256, level, ids)
    return best_records([node.outputs.results.get_dict() for node in nodes], ids), nodes


def missing_references(reference_sha256: str, level: str, ids: Iterable[str]) -> list[str]:
    """The ids of ``ids`` with no record at ``level`` in any finished reference relaxation, sorted."""
    ids = set(ids)
    records, _ = known_records(reference_sha256, level, ids)
    return sorted(ids - set(records))


@calcfunction
def collect_reference_energies(references: orm.List, **results: orm.Dict) -> orm.Dict:
    """``{id: {"energy_per_atom", "status", "error"}}`` of each reference entry id in ``references``, from the
    ``results`` of reference relaxations (link labels ``results_000``, ``results_001``, ...: newest first; the
    first relaxed energy of an id wins, else its first failure); an id in none of them gets the status
    ``missing`` (its relaxation did not finish) and no energy. eV/atom."""
    ordered = [results[key].get_dict() for key in sorted(results)]
    records = best_records(ordered, references.get_list())
    for entry_id in references.get_list():
        records.setdefault(entry_id, {"energy_per_atom": None, "status": "missing",
                                      "error": "no finished relaxation of this reference entry at this level"})
    return orm.Dict(records)


def collection_inputs(nodes: Sequence[orm.CalcJobNode]) -> dict[str, orm.Dict]:
    """The ``results`` of reference relaxations as inputs of :func:`collect_reference_energies`, in their order."""
    return {f"results_{index:03d}": node.outputs.results for index, node in enumerate(nodes)}
