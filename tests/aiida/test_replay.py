"""A step replayed after a killed daemon calls nothing twice (``aiida_equicsp.workchains.replay``).

The work chain is a stand-in holding a stored ``WorkChainNode``; earlier calls are stored nodes linked to it
as AiiDA links them, in the states a kill leaves behind. The daemon soak (``benchmarks/soak_campaign.py``)
exercises the same on real work chains killed with SIGKILL.
"""

from __future__ import annotations

from types import SimpleNamespace

from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ProcessState

from aiida_equicsp.workchains.replay import call_function_once, submit_once


def work_chain():
    """A stand-in work chain: its stored node, its reports, its submissions."""
    node = orm.WorkChainNode()
    node.set_process_state(ProcessState.RUNNING)
    node.store()
    chain = SimpleNamespace(node=node, reports=[], submitted=[])
    chain.report = chain.reports.append
    chain.submit = lambda process, **inputs: chain.submitted.append((process, inputs)) or "new node"
    return chain


def earlier(chain, label: str, state: ProcessState, outputs: dict[str, orm.Data] | None = None) -> orm.CalcFunctionNode:
    node = orm.CalcFunctionNode()
    node.set_process_state(state)
    if state == ProcessState.FINISHED:
        node.set_exit_status(0)
    node.base.links.add_incoming(chain.node, link_type=LinkType.CALL_CALC, link_label=label)
    node.store()
    for link_label, output in (outputs or {}).items():
        output.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label=link_label)
        output.store()
    return node


def never(**_inputs):
    raise AssertionError("called again")


def test_a_function_that_finished_before_the_replay_is_not_called_again():
    chain = work_chain()
    result = orm.Int(7)
    earlier(chain, "rank", ProcessState.FINISHED, {"result": result})
    assert call_function_once(chain, never, "rank", x=orm.Int(1)).uuid == result.uuid
    candidates, run_info = orm.Dict({"a": 1}), orm.Dict({"b": 2})
    earlier(chain, "merge_results", ProcessState.FINISHED, {"candidates": candidates, "run_info": run_info})
    merged = call_function_once(chain, never, "merge_results")
    assert {label: node.uuid for label, node in merged.items()} == {"candidates": candidates.uuid,
                                                                    "run_info": run_info.uuid}


def test_an_interrupted_or_missing_function_call_is_made():
    chain = work_chain()
    earlier(chain, "rank", ProcessState.KILLED)
    earlier(chain, "screen", ProcessState.RUNNING)  # left running by a dead worker: its outputs never came
    calls = []

    def function(**inputs):
        calls.append(inputs)
        return "fresh"

    assert call_function_once(chain, function, "rank", x=1) == "fresh"
    assert call_function_once(chain, function, "screen", x=2) == "fresh"
    assert call_function_once(chain, function, "tabulate", x=3) == "fresh"
    assert calls == [{"x": 1, "metadata": {"call_link_label": "rank"}},
                     {"x": 2, "metadata": {"call_link_label": "screen"}},
                     {"x": 3, "metadata": {"call_link_label": "tabulate"}}]


def test_a_sub_process_submitted_before_the_replay_is_awaited_not_resubmitted():
    chain = work_chain()
    running = earlier(chain, "ml_relax", ProcessState.WAITING)
    assert submit_once(chain, orm.CalcJobNode, "ml_relax", structures={}).uuid == running.uuid
    assert chain.submitted == [] and f"ml_relax: {running.process_label}<{running.pk}> was submitted" in chain.reports[0]

    assert submit_once(chain, orm.CalcJobNode, "phonons", x=1, metadata={"options": {"a": 1}}) == "new node"
    assert chain.submitted == [(orm.CalcJobNode, {"x": 1, "metadata": {"options": {"a": 1},
                                                                      "call_link_label": "phonons"}})]
    builder = SimpleNamespace(metadata=SimpleNamespace(call_link_label=None))
    chain.submit = lambda process: chain.submitted.append(process) or "new node"
    assert submit_once(chain, builder, "dft_SrTiO3_000") == "new node"
    assert builder.metadata.call_link_label == "dft_SrTiO3_000"
