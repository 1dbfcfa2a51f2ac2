"""A campaign on a real daemon, stopped and restarted midway: nothing submitted twice, nothing lost.

SrTiO3, BaTiO3 and CaTiO3 with the shipped perov_5 model, ML relaxation only, tiny settings, at most two
work chains at once. The daemon is stopped while a work chain runs and the third composition still waits
for a slot, a submitter run meanwhile must submit nothing, then the daemon restarts and the submitter
finishes the job with ``--wait``.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow

FORMULAS = ["SrTiO3", "BaTiO3", "CaTiO3"]
#: 2 candidates of 20 sampling steps, 30 CHGNet steps.
TINY_OVERRIDES = "num_samples: 2\nsample: {parameters: {steps: 20}}\nrelax: {parameters: {steps: 30}}\n"

#: Every predict-relax work chain of the profile: composition, pk, state, exit status, in the campaign or not.
SNAPSHOT = """
import json

from aiida import orm

from aiida_equicsp.campaign import PROCESS_TYPE, load_campaign

members = {node.pk for node in load_campaign("perovskites").nodes}
query = orm.QueryBuilder().append(orm.WorkChainNode, filters={"process_type": PROCESS_TYPE})
print(json.dumps([{"composition": node.base.extras.get("equicsp_composition", None), "pk": node.pk,
                   "state": node.process_state.value if node.process_state else None,
                   "exit_status": node.exit_status, "terminated": node.is_terminated, "in_group": node.pk in members,
                   "children": len(node.called)} for node in query.all(flat=True)]))
"""


def snapshot(profile) -> list[dict]:
    return json.loads(profile.python(SNAPSHOT))


def wait_for(profile, condition, timeout: float, what: str) -> list[dict]:
    """Poll :data:`SNAPSHOT` every 2 s until ``condition(work chains)``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        chains = snapshot(profile)
        if condition(chains):
            return chains
        if time.monotonic() > deadline:
            report = profile.verdi("process", "list", "-a", check=False).stdout
            pytest.fail(f"timed out after {timeout} s waiting for {what}: {chains}\n{report}")
        time.sleep(2)


def test_campaign_survives_a_daemon_restart(daemon_profile, tmp_path):
    profile = daemon_profile
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text(TINY_OVERRIDES)
    submit = ["campaign", "submit", "perovskites", "--code", "equicsp@localhost"]

    profile.verdi("daemon", "start", "1")
    result = profile.aiida_equicsp(*submit, "--model", "perov_5", *sum((["--formula", f] for f in FORMULAS), []),
                                   "--max-concurrent", "2", "--overrides", str(overrides))
    assert "campaign perovskites: 2 submitted now, 1 waiting for a free slot (max 2 active)" in result.stdout

    # Stop the daemon once a work chain has started (called its sampling), before the work chains are done.
    wait_for(profile, lambda chains: any(chain["children"] for chain in chains), 300, "a work chain to start")
    profile.verdi("daemon", "stop")
    chains = snapshot(profile)
    assert len(chains) == 2 and any(not chain["terminated"] for chain in chains), chains

    # The submitter with the daemon down: the slots are still taken, nothing is submitted.
    result = profile.aiida_equicsp(*submit)
    assert "0 submitted now, 1 waiting" in result.stdout, result.stdout
    assert len(snapshot(profile)) == 2

    profile.verdi("daemon", "start", "1")
    result = profile.aiida_equicsp(*submit, "--wait", "--interval", "2", timeout=900)
    assert "submitted CaTiO3: EquiCSPPredictRelaxWorkChain<" in result.stdout, result.stdout
    chains = wait_for(profile, lambda chains: len(chains) == 3 and all(chain["terminated"] for chain in chains),
                      900, "the three work chains to finish")

    # One work chain per composition, finished ok, in the campaign; none outside it.
    assert sorted(chain["composition"] for chain in chains) == sorted(FORMULAS), chains
    for chain in chains:
        assert (chain["state"], chain["exit_status"], chain["in_group"]) == ("finished", 0, True), chain

    result = profile.aiida_equicsp(*submit)
    assert "0 submitted now, 0 waiting for a free slot (max 2 active), 0 active before, 3 finished" in result.stdout
    assert len(snapshot(profile)) == 3

    result = profile.aiida_equicsp("campaign", "status", "perovskites")
    assert result.stdout.splitlines()[-1] == "3 compositions, 3 finished ok (campaign perovskites)"
    result = profile.aiida_equicsp("campaign", "winners", "perovskites", "--export", str(tmp_path / "cif"))
    assert sorted(path.name for path in (tmp_path / "cif").iterdir()) == sorted(f"{f}.cif" for f in FORMULAS)
