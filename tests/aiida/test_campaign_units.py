"""Campaigns without a daemon: validation, settings conflicts, throttling, retries, the CLI.

Submission is replaced by :class:`FakeSubmit`, which stores a work chain node in the ``created`` state, as
``submit`` does before the daemon takes it; a test moves it on with :func:`finish`. The daemon itself is
exercised in ``tests/daemon``.
"""

from __future__ import annotations

import uuid

import pytest
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ProcessState
from click.testing import CliRunner

from aiida_equicsp import campaign as campaign_module
from aiida_equicsp import cli
from aiida_equicsp.campaign import (
    PROCESS_TYPE,
    CampaignGroup,
    CampaignSettings,
    campaign_status,
    create_or_load_campaign,
    load_campaign,
    submit_campaign,
    validate_compositions,
)
from aiida_equicsp.data.model import EquiCSPModelData


def created_work_chain(label: str, description: str) -> orm.WorkChainNode:
    """A stored predict-relax work chain node in the ``created`` state, as ``submit`` leaves it."""
    node = orm.WorkChainNode(label=label, description=description)
    node.set_process_type(PROCESS_TYPE)
    node.set_process_state(ProcessState.CREATED)
    return node.store()


class FakeSubmit:
    """Stands for ``aiida.engine.submit``: records the builders, returns :func:`created_work_chain` nodes."""

    def __init__(self):
        self.builders = []

    def __call__(self, builder):
        self.builders.append(builder)
        return created_work_chain(builder.metadata.label, builder.metadata.description)


def finish(node: orm.WorkChainNode, exit_status: int = 0, state: ProcessState = ProcessState.FINISHED) -> None:
    """Move a fake work chain to a terminal state (``exit_status`` only for ``finished``)."""
    node.set_process_state(state)
    if state == ProcessState.FINISHED:
        node.set_exit_status(exit_status)


@pytest.fixture
def fake_submit(monkeypatch) -> FakeSubmit:
    fake = FakeSubmit()
    monkeypatch.setattr(campaign_module, "submit", fake)
    return fake


@pytest.fixture
def label() -> str:
    """A campaign label no other test uses (the profile is shared by the session)."""
    return f"campaign-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(model) -> CampaignSettings:
    return CampaignSettings.from_nodes(model, overrides={"num_samples": 2}, max_concurrent=2)


def by_composition(group: CampaignGroup) -> dict[str, list[orm.WorkChainNode]]:
    nodes: dict[str, list[orm.WorkChainNode]] = {}
    for node in group.nodes:
        nodes.setdefault(node.base.extras.get("equicsp_composition"), []).append(node)
    return nodes


@pytest.mark.parametrize(("compositions", "message"), [
    ([], "no compositions given"),
    (["SrTiO3", "Xx2O3"], "'Xx2O3'"),
    (["SrTiO3", "Sr0.5TiO3"], "'Sr0.5TiO3'"),
    (["SrTiO3", "BaTiO3", "TiSrO3"], "composition 'TiSrO3' is given twice (same cell as 'SrTiO3')"),
    ("SrTiO3", "not the string"),
])
def test_bad_compositions_are_refused_before_anything_is_stored(compositions, message, settings, label,
                                                                equicsp_code, fake_submit):
    """Empty, malformed or duplicated formulas: a ValueError naming the entry; nothing submitted or queued."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_compositions(compositions)
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        submit_campaign(group, compositions, equicsp_code)
    assert fake_submit.builders == []
    assert group.compositions == [] and group.count() == 0


def test_settings_conflict_and_reload(settings, label, model, equicsp_code):
    """Same settings: the same group; other settings: a ValueError naming them; max_concurrent: updated."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    assert group.type_string == "equicsp.campaign"
    assert group.base.extras.get("equicsp_campaign")["model_uuid"] == model.uuid
    assert create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"]).pk == group.pk
    assert load_campaign(label).pk == group.pk

    other = CampaignSettings.from_nodes(model, protocol="precise", overrides={"num_samples": 2})
    with pytest.raises(ValueError, match=rf"campaign '{label}' already holds another campaign \(protocol: 'fast'"):
        create_or_load_campaign(label, other, equicsp_code, [])
    wider = CampaignSettings.from_nodes(model, overrides={"num_samples": 2}, max_concurrent=7)
    assert create_or_load_campaign(label, wider, equicsp_code, []).pk == group.pk
    assert load_campaign(label).settings.max_concurrent == 7


def test_bad_settings_and_labels(model, label, settings, equicsp_code):
    """Unknown protocol, max_concurrent below 1, an unstored model; a plain group of the label is no campaign."""
    with pytest.raises(ValueError, match="unknown protocol 'turbo'"):
        CampaignSettings.from_nodes(model, protocol="turbo")
    with pytest.raises(ValueError, match="max_concurrent must be an integer of at least 1"):
        CampaignSettings.from_nodes(model, max_concurrent=0)
    with pytest.raises(ValueError, match="model must be a stored EquiCSPModelData"):
        CampaignSettings.from_nodes(orm.Int(3))
    plain = orm.Group(label=label).store()
    with pytest.raises(ValueError, match=f"no campaign '{label}'"):
        load_campaign(label)
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])  # beside the plain group, never in it
    assert isinstance(group, CampaignGroup) and group.pk != plain.pk
    assert load_campaign(label).pk == group.pk


def test_throttled_submission_never_submits_twice(settings, label, equicsp_code, model, fake_submit):
    """At most max_concurrent active; a rerun submits nothing new; a finished one frees a slot; nothing twice."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    report = submit_campaign(group, ["SrTiO3", "BaTiO3", "CaTiO3"], equicsp_code, model)
    assert list(report.submitted) == ["SrTiO3", "BaTiO3"] and report.waiting == ["CaTiO3"]
    assert group.compositions == ["SrTiO3", "BaTiO3", "CaTiO3"]

    assert submit_campaign(group, None, equicsp_code).submitted == {}  # both slots still taken
    nodes = by_composition(group)
    assert sorted(nodes) == ["BaTiO3", "SrTiO3"]
    node = nodes["SrTiO3"][0]
    assert node.label == "SrTiO3" and node.description == f"equicsp campaign {group.uuid}"
    builder = fake_submit.builders[0]
    assert builder.sample.sample.compositions.get_list() == ["SrTiO3"]
    assert builder.sample.sample.num_samples.value == 2

    finish(node)
    report = submit_campaign(group, ["BaTiO3", "TiSrO3"], equicsp_code)  # both already in the campaign
    assert list(report.submitted) == ["CaTiO3"] and report.finished == ["SrTiO3"] and report.active == ["BaTiO3"]
    assert group.compositions == ["SrTiO3", "BaTiO3", "CaTiO3"]
    for nodes in by_composition(group).values():
        finish(nodes[0])
    report = submit_campaign(group, None, equicsp_code)
    assert report.submitted == {} and report.done_submitting and len(report.finished) == 3
    assert len(fake_submit.builders) == 3 and group.count() == 3


def test_failed_ones_are_resubmitted_only_on_request(settings, label, equicsp_code, fake_submit):
    """A failed or excepted composition waits for retry_failed=True; its old work chain stays in the group."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    submit_campaign(group, ["SrTiO3", "CaTiO3"], equicsp_code)
    nodes = by_composition(group)
    finish(nodes["SrTiO3"][0], exit_status=403)
    finish(nodes["CaTiO3"][0], state=ProcessState.EXCEPTED)

    report = submit_campaign(group, None, equicsp_code)
    assert report.submitted == {} and report.failed == ["SrTiO3", "CaTiO3"]
    report = submit_campaign(group, None, equicsp_code, retry_failed=True)
    assert list(report.submitted) == ["SrTiO3", "CaTiO3"]
    statuses = {status.composition: status for status in campaign_status(group)}
    assert statuses["SrTiO3"].attempts == 2 and statuses["SrTiO3"].state == "created"
    assert statuses["SrTiO3"].pk == report.submitted["SrTiO3"]
    assert submit_campaign(group, None, equicsp_code, retry_failed=True).submitted == {}  # active now


def test_status_and_orphans(settings, label, equicsp_code, fake_submit):
    """Status lists every composition asked for; a work chain a crash kept out of the group is adopted."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    report = submit_campaign(group, ["SrTiO3", "BaTiO3", "CaTiO3"], equicsp_code, max_concurrent=1)
    assert list(report.submitted) == ["SrTiO3"]
    finish(orm.load_node(report.submitted["SrTiO3"]), exit_status=0)
    statuses = campaign_status(group)
    assert [(s.composition, s.state, s.exit_status, s.attempts) for s in statuses] == [
        ("SrTiO3", "finished", 0, 1), ("BaTiO3", "not submitted", None, 0), ("CaTiO3", "not submitted", None, 0)]

    # Submitted for BaTiO3, then the submitter died before it could add it to the group.
    orphan = created_work_chain("BaTiO3", f"equicsp campaign {group.uuid}")
    report = submit_campaign(group, None, equicsp_code)
    assert list(report.submitted) == [] and report.active == ["BaTiO3"] and report.waiting == ["CaTiO3"]
    assert orphan.pk in {node.pk for node in group.nodes}
    assert orphan.base.extras.get("equicsp_composition") == "BaTiO3"


def test_other_model_or_bad_overrides_are_refused(settings, label, equicsp_code, model, fake_submit, tmp_path):
    """Another model than the campaign's, or overrides the work chain refuses: ValueError, nothing submitted."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    other = EquiCSPModelData.from_shipped("perov_5")
    with pytest.raises(ValueError, match="is not the model of campaign"):
        submit_campaign(group, ["SrTiO3"], equicsp_code, other)
    bad = CampaignSettings.from_nodes(model, overrides={"relax": {"parameters": {"fmax": -1.0}}})
    with pytest.raises(ValueError, match="the work chain refuses the inputs of 'SrTiO3'"):
        create_or_load_campaign(f"{label}-bad", bad, equicsp_code, ["SrTiO3"])
    assert fake_submit.builders == []
    with pytest.raises(ValueError, match=f"no campaign '{label}-bad'"):
        load_campaign(f"{label}-bad")  # refused before anything was stored


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_cli_submit_status_and_errors(equicsp_code, tiny_checkpoint, model, label, fake_submit, tmp_path):
    """``campaign submit`` with a formulas file, resumed without settings; status; clear errors (exit 2)."""
    formulas = tmp_path / "formulas.txt"
    formulas.write_text("# perovskites\nSrTiO3\n\nBaTiO3  # cubic\nCaTiO3\n")
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text("relax: {parameters: {steps: 30}}\n")
    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label, "--model", str(model.pk),
                    "--formulas-file", str(formulas), "--max-concurrent", "2", "--num-samples", "2",
                    "--overrides", str(overrides))
    assert result.exit_code == 0, result.output
    assert f"campaign {label}: 2 submitted now, 1 waiting for a free slot (max 2 active)" in result.output
    stored = load_campaign(label).settings
    assert stored.overrides == {"relax": {"parameters": {"steps": 30}}, "num_samples": 2}

    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label)  # resume: stored settings
    assert result.exit_code == 0, result.output
    assert "0 submitted now, 1 waiting" in result.output

    result = invoke("campaign", "status", label)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["composition", "pk", "state", "exit", "status", "attempts"]
    assert lines[3].split() == ["CaTiO3", "-", "not", "submitted", "-", "0"]
    assert lines[-1] == f"3 compositions, 0 finished ok (campaign {label})"

    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label, "--protocol", "precise")
    assert result.exit_code == 2 and "already holds another campaign (protocol: 'fast'" in result.output
    result = invoke("campaign", "submit", "new-" + label, "--code", equicsp_code.full_label, "--model",
                    str(tiny_checkpoint), "--formula", "SrTiO3", "--formula", "Sr2Ti2O6", "--formula", "SrTiO3")
    assert result.exit_code == 2 and "composition 'SrTiO3' is given twice" in result.output
    result = invoke("campaign", "submit", "mp20-" + label, "--code", equicsp_code.full_label, "--formula", "SrTiO3")
    assert result.exit_code == 0, result.output  # a new campaign without --model: the general-purpose model
    assert load_campaign("mp20-" + label).settings.model_uuid == EquiCSPModelData.from_shipped("mp_20").uuid
    result = invoke("campaign", "submit", label, "--code", equicsp_code.full_label, "--dft")
    assert result.exit_code == 2 and "--dft needs --pw-code" in result.output
    result = invoke("campaign", "status", "no-such-" + label)
    assert result.exit_code == 2 and f"no campaign 'no-such-{label}'" in result.output
    result = invoke("campaign", "winners", label)
    assert result.exit_code == 1 and "has no relaxed structure yet" in result.output
    assert len(fake_submit.builders) == 3  # 2 of the first campaign, 1 of the mp_20 one


def test_refused_submit_stores_nothing(equicsp_code, model, label, fake_submit, tmp_path):
    """A submit refused for its overrides leaves no campaign: the corrected retry succeeds, a plain retry too,
    and neither reuses the refused settings."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_samples: 0\n")
    submit = ("campaign", "submit", label, "--code", equicsp_code.full_label, "--model", str(model.pk),
              "--formula", "SrTiO3")
    result = invoke(*submit, "--overrides", str(bad))
    assert result.exit_code == 2 and "the work chain refuses the inputs of 'SrTiO3'" in result.output, result.output
    assert not orm.QueryBuilder().append(orm.Group, filters={"label": label}).count()
    assert fake_submit.builders == []

    good = tmp_path / "good.yaml"
    good.write_text("num_samples: 3\n")
    result = invoke(*submit, "--overrides", str(good))
    assert result.exit_code == 0, result.output
    assert load_campaign(label).settings.overrides == {"num_samples": 3}
    assert fake_submit.builders[-1].sample.sample.num_samples.value == 3

    result = invoke("campaign", "submit", f"plain-{label}", "--code", equicsp_code.full_label,
                    "--model", str(model.pk), "--formula", "BaTiO3", "--overrides", str(bad))
    assert result.exit_code == 2, result.output
    result = invoke("campaign", "submit", f"plain-{label}", "--code", equicsp_code.full_label,
                    "--model", str(model.pk), "--formula", "BaTiO3")
    assert result.exit_code == 0, result.output
    assert "num_samples" not in load_campaign(f"plain-{label}").settings.overrides
    assert fake_submit.builders[-1].sample.sample.num_samples.value != 0


def function_call(caller: orm.WorkChainNode, label: str, state: ProcessState) -> orm.CalcFunctionNode:
    """A calculation function node called by ``caller`` under link ``label``, in ``state``."""
    node = orm.CalcFunctionNode()
    node.set_process_state(state)
    node.base.links.add_incoming(caller, link_type=LinkType.CALL_CALC, link_label=label)
    return node.store()


def test_a_function_left_running_by_a_killed_daemon_is_closed_once_rerun(settings, label, equicsp_code,
                                                                        fake_submit):
    """A process function that a dead worker left running: killed (sealed) once its caller ran it again;
    one still running without a twin, and one of another group, are left alone."""
    group = create_or_load_campaign(label, settings, equicsp_code, ["SrTiO3"])
    report = submit_campaign(group, ["SrTiO3", "BaTiO3"], equicsp_code)
    first, second = (orm.load_node(pk) for pk in report.submitted.values())
    interrupted = function_call(first, "rank", ProcessState.RUNNING)
    rerun = function_call(first, "rank", ProcessState.FINISHED)
    running = function_call(second, "rank", ProcessState.RUNNING)
    stranger = created_work_chain("CaTiO3", "not a campaign's")
    foreign = function_call(stranger, "rank", ProcessState.RUNNING)
    function_call(stranger, "rank", ProcessState.FINISHED)

    submit_campaign(group, None, equicsp_code)
    assert interrupted.process_state == ProcessState.KILLED and interrupted.is_sealed
    assert interrupted.process_status == f"its daemon worker died while it ran; its caller ran it again as {rerun.pk}"
    assert rerun.process_state == ProcessState.FINISHED
    assert running.process_state == foreign.process_state == ProcessState.RUNNING
