"""The small interface every fault kind implements.

Lifecycle, driven by the runtime (agent/runtime.py):

    check(spec, ctx)          fast, synchronous: reject what this node cannot do
    plan = await plan(spec, ctx)   decide concretely (which pids, which handle);
                                   the runtime journals the plan BEFORE apply
    await apply(spec, plan, ctx)   touch the system; returns what it measured
    await revert(plan, ctx)        unconditional and idempotent; must work from
                                   the journaled plan alone (after a crash, the
                                   in-memory state is gone)
    await sweep(journaled)         at agent start: remove anything marked as
                                   ours that no journal entry accounts for

An injector instance is created once per agent runtime and may keep in-memory
state keyed by fault id (monitor tasks, measurements) for the richer report
it returns from revert; revert must still succeed without it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from proto.messages import FaultState, Measurements, PodRef, PreviewResult


class Rejected(Exception):
    """The fault cannot be applied here; str() is the reason sent to the controller."""


class Plan(BaseModel):
    """Base for the journaled plan of one fault: everything revert needs."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


@dataclass(frozen=True)
class Capability:
    name: str
    available: bool
    note: str | None = None  # why it is missing, e.g. "kernel lacks sch_netem"


@dataclass
class AgentEnv:
    """Node-wide facts and settings an injector may need, owned by the runtime."""

    node: str
    state_dir: Path
    instance_id: str
    protected_pids: Callable[[], dict[int, str]]
    """pid -> why it is protected (PID 1, the agent, its ancestors, the NATS server, ...)."""
    deny_patterns: Sequence[str] = ()
    """Regexes over name and command line; matching processes are never touched."""
    control_plane: Callable[[], list[tuple[str, int]] | None] = lambda: []
    """(address, port) of every NATS server the agent may talk to: never cut. None: the agent is
    connected but no address is known now (a network fault is refused). May resolve names:
    call it from a worker thread."""
    exempt_cidrs: Sequence[str] = ()
    """Extra network exemptions from the agent's config (DNS, API server, SSH)."""
    memory_reserve_percent: float = 10.0
    """Memory faults may not push available memory below this share of total."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultContext:
    """One fault, as the runtime hands it to an injector."""

    fault_id: str
    experiment_id: str
    deadline: float  # absolute, Unix seconds
    pods: list[PodRef] | None
    env: AgentEnv
    emit: Callable[[FaultState, Measurements, str | None], None]
    """Publish a progress event (e.g. a restart observed) without ending the fault."""
    recovered: bool = False  # True when the runtime reverts from the journal after a restart
    lease_timeout_s: float | None = None  # the experiment's lease (an Inject's); None when reverting
    ending: Callable[[], bool] = lambda: False
    """Whether the fault's end has been asked for (a revert, a halt, its deadline): a wait in
    settle() stops early then, so it never holds up the revert."""


class Injector(abc.ABC):
    kind: ClassVar[str]
    plan_model: ClassVar[type[Plan]]

    def __init__(self, env: AgentEnv) -> None:
        self.env = env

    def probe(self) -> list[Capability]:
        """Called once at start, in a worker thread: which capabilities this node has.

        The first capability returned must be named after ``kind``.
        """
        return [Capability(self.kind, True)]

    def check(self, spec: Any, ctx: FaultContext) -> None:  # noqa: B027 - optional hook
        """Raise Rejected with a reason if this node cannot run spec. Must be fast."""

    prechecks: ClassVar[bool] = False
    """True when precheck() does something: the command handler awaits it only then."""

    async def precheck(self, spec: Any, ctx: FaultContext) -> None:  # noqa: B027 - optional hook
        """Before the Ack, read-only and bounded by the caller: raise Rejected when the fault
        would be refused at its plan as things stand now (a selector that matches nothing), so
        the two-phase start refuses it before any fault of the experiment is applied anywhere."""

    def release(self, ctx: FaultContext) -> None:  # noqa: B027 - optional hook
        """The fault's lifecycle is over, however it ended (reverted, failed before its plan,
        refused at its plan): drop what check() set aside for it. Must not raise."""

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult | None:
        """What spec would touch on this node now, without touching or recording anything
        (a Preview); None when this kind has nothing to show beyond its capability. Raises
        Rejected as check() and plan() would."""
        return None

    def applied(self, plan: Plan, ctx: FaultContext) -> Plan | None:
        """After a successful apply: the plan narrowed to what the apply did, when that is less
        than planned. The lifecycle journals it in place of the first, so a revert from the
        journal (after a crash) undoes only that. None (the default): the plan stands. Must not raise."""
        return None

    kept: ClassVar[bool] = False
    """True for a kind whose effect the kernel holds (a SIGSTOP, a qdisc): once applied, a keeper
    process (agent/keepers.py) reverts it from its journal entry should the agent freeze or die."""

    settles: ClassVar[bool] = False
    """True when settle() does something: the lifecycle calls it only then."""

    async def settle(self, plan: Plan, ctx: FaultContext) -> str | None:
        """After the apply, once the journal holds what it did: wait (bounded) until what the
        apply started has taken effect, returning a note for the "active" event when some of it
        has not. Returns at once when ctx.ending() turns true. Must not raise."""
        return None

    def load_plan(self, raw: dict[str, Any]) -> Plan:
        """A journaled plan back from its JSON form (at start, to revert it)."""
        return self.plan_model.model_validate(raw)

    @abc.abstractmethod
    async def plan(self, spec: Any, ctx: FaultContext) -> Plan: ...

    @abc.abstractmethod
    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements: ...

    @abc.abstractmethod
    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements: ...

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        """Remove leftovers marked as ours that ``journaled`` does not account for.

        Returns one line per thing removed (empty when there was nothing to do).
        """
        return []
