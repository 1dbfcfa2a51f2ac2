"""A step replayed after its daemon worker was killed calls nothing twice.

A work chain resumes from its last checkpoint, which AiiDA saves between steps. A step whose daemon worker
died while it ran, or after it called something but before the checkpoint, therefore runs again from its
start, and would call its calculation functions and submit its sub-processes a second time (seen in
``benchmarks/soak_campaign.py``: a ``rank`` called twice after a ``SIGKILL``). Every call of the work chains
has its own link label; these helpers look for an earlier call of that label by the same work chain first:

- :func:`call_function_once`: a process function that finished ok earlier gives its outputs again; one that
  was interrupted (left ``running`` by the dead worker, or killed) is called anew;
- :func:`submit_once`: a sub-process submitted earlier, whatever its state, is the one to wait for.

A work chain that has never been interrupted finds no earlier call and behaves as if these helpers were not
there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import WorkChain

CALLS = (LinkType.CALL_CALC, LinkType.CALL_WORK)


def earlier_call(work_chain: WorkChain, link_label: str) -> orm.ProcessNode | None:
    """The newest process ``work_chain`` called under ``link_label`` that was not killed, ``None`` if none."""
    links = work_chain.node.base.links.get_outgoing(link_type=CALLS, link_label_filter=link_label).all()
    nodes = sorted((link.node for link in links if not link.node.is_killed), key=lambda node: node.ctime)
    return nodes[-1] if nodes else None


def call_function_once(work_chain: WorkChain, function: Callable[..., Any], link_label: str, **inputs: Any) -> Any:
    """``function(**inputs)`` called by ``work_chain`` under ``link_label``, or the outputs of such a call that
    finished ok before (a single ``result`` output as the node, several as a dict, as the function returns)."""
    earlier = earlier_call(work_chain, link_label)
    if earlier is not None and earlier.is_finished_ok:
        links = earlier.base.links.get_outgoing(link_type=(LinkType.CREATE, LinkType.RETURN)).all()
        outputs = {link.link_label: link.node for link in links}
        return outputs["result"] if list(outputs) == ["result"] else outputs
    return function(**inputs, metadata={"call_link_label": link_label})


def submit_once(work_chain: WorkChain, process: Any, link_label: str, **inputs: Any) -> orm.ProcessNode:
    """The node of ``process`` (a class with ``inputs``, or a builder) submitted by ``work_chain`` under
    ``link_label``, or of such a submission made before the step was replayed."""
    earlier = earlier_call(work_chain, link_label)
    if earlier is not None:
        work_chain.report(f"{link_label}: {earlier.process_label}<{earlier.pk}> was submitted before this step "
                          "was replayed; waiting for it instead of submitting again")
        return earlier
    if isinstance(process, type):
        metadata = {**inputs.pop("metadata", {}), "call_link_label": link_label}
        return work_chain.submit(process, **inputs, metadata=metadata)
    process.metadata.call_link_label = link_label
    return work_chain.submit(process)
