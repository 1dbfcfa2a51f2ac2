"""Campaigns: one ``equicsp.predict_relax`` work chain per composition, submitted to the daemon a few at a time.

A campaign is a :class:`CampaignGroup` (entry point ``equicsp.campaign`` of ``aiida.groups``). The group holds

- its settings in the extra ``equicsp_campaign`` (:class:`CampaignSettings`: model UUID, protocol, overrides,
  pw.x code UUID, pseudopotential family, max concurrent), so any later call builds the same work chains;
- the compositions asked for so far, in order, in the extra ``equicsp_compositions``: the queue of the campaign,
  so a submitter stopped before it submitted everything picks up where it left off;
- the submitted work chains as members, each with its composition in the extra ``equicsp_composition``.

A composition written reduced (``ZnO``) is sampled at every cell size Z its model supports, one written with
Z > 1 (``Zn2O2``) as that cell only (:func:`equicsp_core.domain.sampling_cells`): two different requests, both
allowed in one campaign. The winners' rows carry their Z (``formula_units``, :mod:`aiida_equicsp.queries`).

A chemical system (``Li-Fe-P-O``) is one more way to name compositions: :func:`chemical_system_compositions`
gives its charge-balanced ones that the campaign's model can sample (:mod:`equicsp_core.chemical_system`), and
they join the queue as formulas would; the stable and near-stable candidates are then a query
(:func:`aiida_equicsp.queries.stable_candidates`).

Why a submitter, not a parent work chain
    :func:`submit_campaign` is one pass of a submitter (the pattern of aiida-submission-controller): it looks at
    the group, submits the compositions not yet present while fewer than ``max_concurrent`` of its work chains
    are active, and returns. ``aiida-equicsp campaign submit`` runs it once, or with ``--wait`` again every few
    seconds until everything is submitted; it is safe to stop and rerun at any time, the group is the state.
    A parent WorkChain launching one child per composition would be simpler to start, but its inputs are
    frozen at launch, so a campaign could never be extended with new compositions; it would tie hundreds of
    children to one process whose failure or kill ends the whole campaign; and its throttling would live in a
    checkpoint instead of in data anyone can query.

Why not aiida-submission-controller
    Its ``FromGroupSubmissionController`` is the community's throttled submitter and the pattern followed
    here. Tried against aiida-core 2.9.4 (version 0.3.0, a subclass building this module's work chains, one
    ``Str`` node per composition in a parent group keyed by the composition's extra, submission faked as in
    ``tests/aiida/test_campaign_units.py``), it works, but it would lose what a campaign promises: a process
    whose inputs the work chain refuses is logged and skipped (the pass returns nothing submitted, exit 0)
    instead of refused before anything is stored; a composition with any work chain in the group counts as
    done forever, so a failed one cannot be retried without removing it from the group; a work chain submitted
    just before the submitter crashed, before it joined the group, is submitted again; compositions go in
    the order of a Python set, not the order asked for; two formulas of one composition in the parent group
    end the pass with a bare ``AssertionError``; and the compositions must first be stored as nodes of a
    second group. It would also add ``pydantic`` and ``rich`` to the requirements of the AiiDA host. A
    campaign therefore keeps its own pass (:func:`submit_campaign`), with the controller's
    ``max_concurrent`` semantics (active = not terminated, per group). Not tried on the daemon.

Never twice
    A composition whose work chain finished ok, or is still active (created, waiting, running), is never
    submitted again. A failed, excepted or killed one is resubmitted only with ``retry_failed=True``; the old
    work chain stays in the group. Each pass reads the group afresh, and a work chain submitted just before a
    crash that kept it out of the group is adopted by the next pass (its label is the composition and its
    description names the campaign), so it is not submitted twice either. Run one submitter per campaign at a
    time: two at once could both see a free slot.

A daemon killed mid-step
    A work chain resumes from its last checkpoint, so the step that was running when its daemon worker died
    runs again. A calculation function that step called (ranking, screening, tabulating) ran inside the dead
    worker and has no checkpoint of its own: AiiDA leaves its node ``running`` forever, beside the twin the
    replayed step calls. Each pass closes such a node as ``killed`` once its twin (same caller, same link
    label, created later) exists (:func:`close_interrupted_functions`), so nothing of the campaign stays
    stuck; the twin's outputs are the ones the work chain uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ProcessState, submit

from aiida_equicsp.data.model import EquiCSPModelData

#: Process type of the campaign's work chains.
PROCESS_TYPE = "aiida.workflows:equicsp.predict_relax"
#: Group extras: the settings, the compositions asked for.
SETTINGS_EXTRA, COMPOSITIONS_EXTRA = "equicsp_campaign", "equicsp_compositions"
#: Work chain extra: its composition.
COMPOSITION_EXTRA = "equicsp_composition"
#: Default of ``max_concurrent``: active work chains of a campaign at once.
DEFAULT_MAX_CONCURRENT = 4


class CampaignGroup(orm.Group):
    """A group of ``equicsp.predict_relax`` work chains, one per composition, with the campaign's settings."""

    @property
    def settings(self) -> CampaignSettings | None:
        """The stored settings, ``None`` for a group that has none yet."""
        stored = self.base.extras.get(SETTINGS_EXTRA, None)
        return None if stored is None else CampaignSettings(**stored)

    @property
    def compositions(self) -> list[str]:
        """The compositions asked for so far, in the order they were asked for."""
        return list(self.base.extras.get(COMPOSITIONS_EXTRA, []))


@dataclass(frozen=True)
class CampaignSettings:
    """What every work chain of a campaign is built with (``get_builder_from_protocol`` of the work chain).

    ``max_concurrent`` is throttling, not science: a later call may change it. Every other field is the
    campaign's identity (:meth:`identity`): the results of two settings are not comparable, so a campaign
    never mixes them.
    """

    model_uuid: str
    protocol: str
    overrides: dict[str, Any] = field(default_factory=dict)
    pw_code_uuid: str | None = None
    pseudo_family: str | None = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT

    def __post_init__(self) -> None:
        """Refuse an unknown protocol, a ``max_concurrent`` below 1 and overrides that are not plain data.

        A campaign stored under a protocol's old name (``precise``) keeps it; its builds use the new one.
        """
        from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain as workchain

        protocols = workchain.get_available_protocols()
        if self.protocol not in protocols and self.protocol not in workchain.RENAMED_PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(protocols)}")
        if not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer of at least 1, got {self.max_concurrent!r}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a mapping, got {type(self.overrides).__name__}")
        try:
            json.dumps(dict(self.overrides))
        except TypeError as error:
            raise ValueError(f"overrides must be plain data (stored as a group extra): {error}") from error
        if self.pseudo_family is not None and self.pw_code_uuid is None:
            raise ValueError("a pseudopotential family is only used with a pw.x code (DFT)")

    @classmethod
    def from_nodes(
        cls,
        model: EquiCSPModelData,
        protocol: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        pw_code: orm.AbstractCode | None = None,
        pseudo_family: str | None = None,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    ) -> CampaignSettings:
        """Settings from the arguments of ``EquiCSPPredictRelaxWorkChain.get_builder_from_protocol``.

        ``protocol`` ``None`` is resolved to the default protocol and an old name to the new one, so the stored
        settings say which it was.
        """
        from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

        if not isinstance(model, EquiCSPModelData) or not model.is_stored:
            raise ValueError(f"model must be a stored EquiCSPModelData, got {model!r}")
        if pw_code is not None and not pw_code.is_stored:
            raise ValueError("pw_code must be a stored code")
        return cls(model_uuid=model.uuid, protocol=EquiCSPPredictRelaxWorkChain.resolve_protocol(protocol),
                   overrides=dict(overrides or {}), pw_code_uuid=None if pw_code is None else pw_code.uuid,
                   pseudo_family=pseudo_family, max_concurrent=max_concurrent)

    def identity(self) -> str:
        """The settings that make a campaign what it is (all but ``max_concurrent``), as canonical JSON."""
        settings = asdict(self)
        settings.pop("max_concurrent")
        return json.dumps(settings, sort_keys=True)


@dataclass(frozen=True)
class CompositionStatus:
    """Where one composition of a campaign stands: its current work chain (``None``: not submitted yet).

    The current work chain is the one that finished ok, else the newest; ``attempts`` counts them all.
    """

    composition: str
    pk: int | None
    state: str
    exit_status: int | None
    attempts: int


@dataclass
class SubmissionReport:
    """What one pass of :func:`submit_campaign` did, by composition."""

    submitted: dict[str, int] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def done_submitting(self) -> bool:
        """Whether every composition has been submitted (none waits for a free slot)."""
        return not self.waiting


def composition_key(formula: str) -> tuple[int, ...]:
    """The cell contents of a formula as sorted atomic numbers: ``TiSrO3`` and ``SrTiO3`` are one composition,
    ``SrTiO3`` (a Z search) and ``Sr2Ti2O6`` (one cell) two.

    Raises:
        ValueError: naming the formula, when ``equicsp_core.settings.parse_formula`` refuses it.
    """
    from equicsp_core.settings import parse_formula

    if not isinstance(formula, str) or not formula.strip():
        raise ValueError(f"composition {formula!r} is not a formula")
    return tuple(sorted(parse_formula(formula.strip())))


def validate_compositions(compositions: Iterable[str]) -> list[str]:
    """The compositions, stripped, after refusing an empty list, a malformed formula or a duplicate.

    Raises:
        ValueError: naming the bad entry (and for a duplicate, the entry it repeats).
    """
    if isinstance(compositions, str):
        raise ValueError(f"compositions must be a list of formulas, not the string {compositions!r}")
    compositions = list(compositions)
    if not compositions:
        raise ValueError("no compositions given: name at least one formula")
    seen: dict[tuple[int, ...], str] = {}
    for formula in compositions:
        key = composition_key(formula)
        if key in seen:
            raise ValueError(f"composition {formula!r} is given twice (same cell as {seen[key]!r})")
        seen[key] = formula
    return [formula.strip() for formula in compositions]


def chemical_system_compositions(settings: CampaignSettings, chemical_system: str,
                                 max_atoms: int | None = None) -> list[str]:
    """The compositions of ``chemical_system`` that the campaign's model can sample, as reduced formulas: those of
    :func:`equicsp_core.chemical_system.compositions_to_explore` within ``max_atoms`` atoms per formula unit
    (``None``: the model's largest cell).

    Raises:
        ValueError: one line naming the problem (a malformed system, an unknown element, no charge-balanced
            composition within the limits); nothing is stored.
    """
    from equicsp_core.chemical_system import compositions_to_explore
    from equicsp_core.settings import ExploreSettings

    model = orm.load_node(settings.model_uuid)
    return compositions_to_explore(ExploreSettings(chemical_system=chemical_system, max_atoms=max_atoms),
                                   model.mode, model.dataset)


def load_campaign(label: str) -> CampaignGroup:
    """The campaign of that label.

    Raises:
        ValueError: when there is none (a plain group of that label is not a campaign).
    """
    group = orm.QueryBuilder().append(CampaignGroup, filters={"label": label}).first(flat=True)
    if group is None:
        raise ValueError(f"no campaign {label!r} (see verdi group list -T equicsp.campaign)")
    return group


def create_or_load_campaign(label: str, settings: CampaignSettings, code: orm.AbstractCode,
                            compositions: Sequence[str]) -> CampaignGroup:
    """The campaign ``label`` with these settings: created if new, loaded if it has the same settings.

    Everything is checked before anything is stored: the settings against a campaign of that label, and the
    work chain inputs the settings give for ``compositions`` (the campaign's queue when empty) with ``code``
    (:func:`check_work_chain_inputs`). So a refused call leaves no group and no settings behind, and a corrected
    retry starts afresh. A different ``max_concurrent`` is stored, not refused (see :class:`CampaignSettings`).

    Raises:
        ValueError: when the group holds a campaign with other settings (naming the settings that differ),
            when a new campaign gets no composition, or when the work chain refuses the inputs.
    """
    if not isinstance(settings, CampaignSettings):
        raise TypeError(f"settings must be CampaignSettings, got {type(settings).__name__}")
    group = orm.QueryBuilder().append(CampaignGroup, filters={"label": label}).first(flat=True)
    stored = None if group is None else group.settings
    if stored is not None and stored.identity() != settings.identity():
        old, new = json.loads(stored.identity()), json.loads(settings.identity())
        differences = ", ".join(f"{key}: {old[key]!r} (stored) != {new[key]!r}" for key in old if old[key] != new[key])
        raise ValueError(f"campaign {label!r} already holds another campaign ({differences}); "
                         "choose another label or the same settings")
    formulas = validate_compositions(compositions) if compositions else [] if group is None else group.compositions
    if group is None and not formulas:
        raise ValueError(f"campaign {label!r} is new: give at least one formula (its inputs are checked first)")
    check_work_chain_inputs(settings, code, formulas)
    if group is None:
        group = CampaignGroup(label=label).store()
    if stored != settings:
        group.base.extras.set(SETTINGS_EXTRA, asdict(settings))
    return group


def check_work_chain_inputs(settings: CampaignSettings, code: orm.AbstractCode,
                            formulas: Sequence[str]) -> dict[str, Any]:
    """``{formula: builder}`` of the campaign's work chains, every input checked as at launch; nothing stored.

    Raises:
        ValueError: naming the formula, when a port or a validator of the work chain refuses its inputs.
    """
    from aiida_equicsp.workchains.predict_relax import EquiCSPPredictRelaxWorkChain

    if not isinstance(code, orm.AbstractCode):
        raise ValueError(f"code must be an AiiDA code, got {type(code).__name__}")
    model = orm.load_node(settings.model_uuid)
    pw_code = None if settings.pw_code_uuid is None else orm.load_node(settings.pw_code_uuid)
    spec = EquiCSPPredictRelaxWorkChain.spec().inputs
    builders = {}
    for formula in formulas:
        try:  # a port refuses a bad value on assignment, the validators at launch: both here, before submitting
            builder = EquiCSPPredictRelaxWorkChain.get_builder_from_protocol(
                code, model, [formula], settings.protocol, pw_code, settings.pseudo_family, settings.overrides)
            invalid = spec.validate(spec.pre_process(builder._inputs(prune=True)))
        except (ValueError, AttributeError) as error:  # AttributeError: an overrides key with no port
            raise ValueError(f"the work chain refuses the inputs of {formula!r}: {error}") from error
        if invalid is not None:
            raise ValueError(f"the work chain refuses the inputs of {formula!r}: {invalid.message}")
        builders[formula] = builder
    return builders


def _phase(node: orm.ProcessNode) -> str:
    """``"finished"`` (ok), ``"active"`` (not terminated) or ``"failed"`` (failed, excepted or killed)."""
    if node.is_finished_ok:
        return "finished"
    return "failed" if node.is_terminated else "active"


def _marker(group: orm.Group) -> str:
    """The description of the campaign's work chains: how a pass finds one that never made it into the group."""
    return f"equicsp campaign {group.uuid}"


def _adopt_orphans(group: CampaignGroup) -> None:
    """Add to the group the work chains submitted for it that a crash kept out (see the module docstring)."""
    members = {node.pk for node in group.nodes}
    query = orm.QueryBuilder().append(orm.WorkChainNode, filters={"description": _marker(group),
                                                                  "process_type": PROCESS_TYPE})
    for node in query.all(flat=True):
        if node.pk not in members:
            node.base.extras.set(COMPOSITION_EXTRA, node.label)
            group.add_nodes(node)


def close_interrupted_functions(group: CampaignGroup) -> list[int]:
    """Mark ``killed`` the process functions of the campaign that a dead daemon worker left running and whose
    caller has since run them again (see the module docstring); returns their pks."""
    members = {node.pk for node in group.nodes}
    query = orm.QueryBuilder().append((orm.CalcFunctionNode, orm.WorkFunctionNode), filters={
        "attributes.process_state": {"in": [state.value for state in ProcessState if not _is_terminal(state)]}})
    closed = []
    for node in query.all(flat=True):
        call = node.base.links.get_incoming(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK)).first()
        if call is None or _top_caller(call.node).pk not in members:
            continue
        twins = call.node.base.links.get_outgoing(link_type=(LinkType.CALL_CALC, LinkType.CALL_WORK),
                                                  link_label_filter=call.link_label).all()
        later = [twin.node for twin in twins if twin.node.ctime > node.ctime]
        if later:
            node.set_process_state(ProcessState.KILLED)
            node.set_process_status(f"its daemon worker died while it ran; its caller ran it again as {later[0].pk}")
            node.seal()
            closed.append(node.pk)
    return closed


def _is_terminal(state: ProcessState) -> bool:
    return state in (ProcessState.FINISHED, ProcessState.EXCEPTED, ProcessState.KILLED)


def _top_caller(node: orm.ProcessNode) -> orm.ProcessNode:
    while node.caller is not None:
        node = node.caller
    return node


def _work_chains(group: CampaignGroup) -> dict[tuple[int, ...], list[orm.WorkChainNode]]:
    """The group's work chains by composition key, oldest first."""
    query = orm.QueryBuilder()
    query.append(CampaignGroup, filters={"id": group.pk}, tag="group")
    query.append(orm.WorkChainNode, with_group="group", filters={"process_type": PROCESS_TYPE},
                 project=["*", f"extras.{COMPOSITION_EXTRA}"])
    query.order_by({orm.WorkChainNode: {"ctime": "asc"}})
    by_key: dict[tuple[int, ...], list[orm.WorkChainNode]] = {}
    for node, formula in query.all():
        if formula is not None:
            by_key.setdefault(composition_key(formula), []).append(node)
    return by_key


def _current(nodes: Sequence[orm.WorkChainNode]) -> orm.WorkChainNode:
    """The work chain that counts for a composition: the one that finished ok, else the newest."""
    return next((node for node in nodes if node.is_finished_ok), nodes[-1])


def _composition_phase(nodes: Sequence[orm.WorkChainNode]) -> str | None:
    """``None`` (never submitted), else the phase of the best attempt: finished beats active beats failed."""
    phases = {_phase(node) for node in nodes}
    return next((phase for phase in ("finished", "active", "failed") if phase in phases), None)


def submit_campaign(
    group: CampaignGroup,
    compositions: Sequence[str] | None,
    code: orm.AbstractCode,
    model: EquiCSPModelData | None = None,
    max_concurrent: int | None = None,
    retry_failed: bool = False,
) -> SubmissionReport:
    """One pass of the submitter: submit the campaign's compositions that need it, at most ``max_concurrent`` active.

    Args:
        group: the campaign (:func:`create_or_load_campaign`).
        compositions: formulas to add to the campaign's queue (those already in it are not added twice);
            ``None``: only the queue (resume).
        code: the ``equicsp`` code of the new work chains (a code is where they run, not what they compute:
            it is not part of the settings).
        model: the campaign's model, checked against its settings; ``None``: the settings' model.
        max_concurrent: stored as the campaign's new limit; ``None``: the stored one.
        retry_failed: resubmit the compositions whose work chains all failed, were excepted or killed.

    Returns:
        What was submitted, what still waits for a free slot, and the state of the others.

    Raises:
        ValueError: for an empty list, a malformed or duplicated formula, another model than the campaign's,
            or inputs the work chain refuses; raised before anything is stored or submitted.
    """
    settings = group.settings
    if settings is None:
        raise ValueError(f"group {group.label!r} has no campaign settings: create it with create_or_load_campaign")
    new = validate_compositions(compositions) if compositions is not None else []
    if model is not None and model.uuid != settings.model_uuid:
        raise ValueError(f"model {model.uuid} is not the model of campaign {group.label!r} ({settings.model_uuid})")
    if max_concurrent is not None and max_concurrent != settings.max_concurrent:
        settings = CampaignSettings(**{**asdict(settings), "max_concurrent": max_concurrent})  # checked here

    queue = group.compositions
    queued = {composition_key(formula) for formula in queue}
    queue += [formula for formula in new if composition_key(formula) not in queued]
    if not queue:
        raise ValueError(f"campaign {group.label!r} has no compositions yet: give at least one formula")

    _adopt_orphans(group)  # repairs of earlier passes and of killed daemons, the writes before the checks below
    close_interrupted_functions(group)
    attempts = _work_chains(group)
    report = SubmissionReport()
    to_submit = []
    for formula in queue:
        phase = _composition_phase(attempts.get(composition_key(formula), []))
        if phase is None or (phase == "failed" and retry_failed):
            to_submit.append(formula)
        else:
            getattr(report, phase).append(formula)

    builders = check_work_chain_inputs(settings, code, to_submit)
    for formula, builder in builders.items():
        builder.metadata.label = formula
        builder.metadata.description = _marker(group)

    if settings != group.settings:
        group.base.extras.set(SETTINGS_EXTRA, asdict(settings))
    if queue != group.compositions:
        group.base.extras.set(COMPOSITIONS_EXTRA, queue)
    active = sum(_phase(node) == "active" for nodes in attempts.values() for node in nodes)
    for formula, builder in builders.items():
        if active >= settings.max_concurrent:
            report.waiting.append(formula)
            continue
        node = submit(builder)
        node.base.extras.set(COMPOSITION_EXTRA, formula)
        group.add_nodes(node)
        report.submitted[formula] = node.pk
        active += 1
    return report


def campaign_status(group: CampaignGroup) -> list[CompositionStatus]:
    """Per composition of the campaign, in the order asked for: its current work chain's pk, state, exit status.

    ``state`` is the process state (``created``, ``waiting``, ``running``, ``finished``, ``excepted``,
    ``killed``), or ``not submitted``.
    """
    attempts = _work_chains(group)
    statuses = []
    for formula in group.compositions:
        nodes = attempts.get(composition_key(formula), [])
        if not nodes:
            statuses.append(CompositionStatus(formula, None, "not submitted", None, 0))
            continue
        node = _current(nodes)
        state = node.process_state.value if node.process_state is not None else "unknown"
        statuses.append(CompositionStatus(formula, node.pk, state, node.exit_status, len(nodes)))
    return statuses


def current_work_chains(group: CampaignGroup) -> dict[str, orm.WorkChainNode]:
    """``{composition: its current work chain}`` for the submitted compositions, in the order asked for."""
    attempts = _work_chains(group)
    return {formula: _current(attempts[composition_key(formula)]) for formula in group.compositions
            if composition_key(formula) in attempts}
