"""Wire messages: one frozen pydantic model each, JSON on the wire.

Every message carries ``schema_version`` ("MAJOR.MINOR"), a unique ``id`` and
``sent_at`` (Unix seconds). Commands also carry ``expires_at``: an agent
refuses a command that arrives after it. For an Inject it is also the fault's
absolute deadline, enforced by the agent's own timer.

Field names are snake_case with units on the wire (``lease_timeout_s``);
fault specs inside keep their file spelling (see ``proto.faults``).
"""

from __future__ import annotations

import random
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from proto.faults import FaultSpec

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 6  # 1.1: Heartbeat.ended; 1.2: Inject.await_start, Start; 1.3: Heartbeat.journal_issues,
# halts_done; 1.4: Preview, Ack.preview; 1.5: previews of network, cpu and memory faults; 1.6: Ack.targets
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

START_SINCE_MINOR = 2
"""Agents speaking 1.2 or newer hold an Inject with await_start until its Start."""

KEPT_ENTRIES_SINCE_MINOR = 3
"""Agents speaking 1.3 or newer list kept journal entries and finished halts in their heartbeats."""

PREVIEW_SINCE_MINOR = 4
"""Agents speaking 1.4 or newer answer a Preview (which processes a process fault would touch)."""

PREVIEW_ALL_KINDS_SINCE_MINOR = 5
"""Agents speaking 1.5 or newer also preview network, cpu and memory faults (PreviewResult.network,
.stress); older ones are not asked about those kinds."""


def schema_minor(version: str) -> int:
    """The MINOR of a "MAJOR.MINOR" schema_version (validated by Message's pattern)."""
    return int(version.partition(".")[2] or 0)


MAX_MESSAGE_BYTES = 256 * 1024
"""Messages larger than this are refused before parsing."""


def new_id() -> str:
    """32 random hex digits, unique per message (ids correlate and de-duplicate; they are no secret).

    From the random module, seeded from the OS at import and again in every forked child,
    not uuid4: that costs a getrandom() system call per message, a few microseconds each
    time a thousand agents report at once.
    """
    return f"{random.getrandbits(128):032x}"


def _not_dots(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("'.' and '..' are not fault ids (they name directories)")
    return value


class Message(BaseModel):
    # No inf or nan in a message's own numbers: an Inject expiring at Infinity would hold its fault
    # with no deadline (and its heartbeats would carry null), one at NaN would have no timer at all
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True, allow_inf_nan=False)

    schema_version: str = Field(SCHEMA_VERSION, pattern=r"^\d+\.\d+$")
    id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    sent_at: float = Field(default_factory=time.time)


FaultState = Literal[
    "accepted",  # acknowledged; not yet applied (an Inject with await_start waits here for its Start)
    "injecting",
    "active",
    "reverting",
    "reverted",  # reverted on request (controller, abort, halt, lease lapse)
    "expired",  # reverted because its deadline passed
    "failed",  # could not be applied, or revert reported an error
    "rejected",  # never applied: refused at validation
]
TERMINAL_STATES: frozenset[str] = frozenset({"reverted", "expired", "failed", "rejected"})


class PodRef(BaseModel):
    """A pod on the target node, resolved by the controller from the Kubernetes API."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    namespace: str
    name: str
    uid: str
    container_ids: list[str] = Field(default_factory=list)


# --- controller -> agent commands (request-reply on faultline.v1.agent.<node>.cmd)


class Inject(Message):
    type: Literal["inject"] = "inject"
    experiment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    fault_id: Annotated[
        str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_not_dots)
    ]
    spec: FaultSpec
    expires_at: float = Field(description="absolute deadline of the fault (Unix seconds)")
    lease_timeout_s: float = Field(gt=0, le=3600, description="revert if the lease is not renewed this long")
    pods: list[PodRef] | None = Field(None, description="restrict the fault to these pods on the node")
    await_start: bool = Field(
        False,
        description=(
            "since 1.2: accept and hold the fault, applying nothing, until a Start for its experiment "
            "arrives; a held fault that gets no Start ends unapplied when its lease lapses or its deadline passes"
        ),
    )


class Start(Message):
    """Apply the faults an experiment's Injects left waiting (await_start), since 1.2.

    Sent once to every agent on faultline.v1.exp.<id>.start when every target has
    accepted, and per node (request-reply) to any agent not seen starting.
    """

    type: Literal["start"] = "start"
    experiment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    fault_ids: list[str] | None = Field(None, description="default: every waiting fault of the experiment")
    expires_at: float


class Revert(Message):
    type: Literal["revert"] = "revert"
    experiment_id: str = Field(min_length=1, max_length=64)
    fault_ids: list[str] | None = Field(None, description="default: every fault of the experiment")
    reason: str = Field("requested", max_length=500)
    expires_at: float


class SkippedProcess(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    pid: int
    name: str
    reason: str


class Preview(Message):
    """Which processes a fault would touch on this node now, since 1.4: read-only. The agent
    selects as for an Inject (selector, pods, protections, count or percent) and applies
    nothing, records nothing, journals nothing. Answered with an Ack carrying ``preview``."""

    type: Literal["preview"] = "preview"
    spec: FaultSpec
    pods: list[PodRef] | None = Field(None, description="restrict the selection to these pods on the node")
    expires_at: float


Command = Annotated[Inject | Revert | Start | Preview, Field(discriminator="type")]


class PreviewedProcess(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    pid: int
    name: str
    user: str | None = None
    cmdline: str = Field("", description="cut to 200 characters")


class NetworkPreview(BaseModel):
    """Where a network fault would go on one node, as of the Preview (since 1.5)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    interface: str
    netns: str | None = Field(None, description="the network namespace, when not the node's own")
    direction: Literal["egress", "ingress"]
    device: str = Field(description="where the qdiscs go: the interface, or its ifb device for ingress")
    replaces: list[str] = Field(
        default_factory=list, description="qdiscs faultline did not create that force: true deletes (not restored)"
    )
    unaffected: list[str] = Field(
        default_factory=list,
        description="what the fault never touches: every NATS server the agent may use (address:port), exempt CIDRs",
    )
    filters: int = Field(0, description="tc filters the fault installs")


class StressPreview(BaseModel):
    """What a cpu or memory fault would run on one node, as of the Preview (since 1.5)."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    cgroup: str = Field(description="where the stressors run: 'the node', or the cgroup (a pod's, or named)")
    workers: int | None = Field(None, description="cpu: how many workers")
    load_percent: float | None = Field(None, description="cpu: percent of one core per worker")
    size_bytes: int | None = Field(None, description="memory: what it would allocate")
    available_bytes: int | None = Field(None, description="memory: available on the node now")
    reserve_bytes: int | None = Field(None, description="memory: the agent's reserve, never allocated")
    promised_bytes: int | None = Field(None, description="memory: what this agent's other memory faults may still take")


class PreviewResult(BaseModel):
    """What a fault would touch on one node, as of the Preview."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    would_hit: int = Field(
        0, description="process faults: how many processes an Inject now would signal (count or percent applied)"
    )
    matched: list[PreviewedProcess] = Field(
        default_factory=list, description="the processes that match and may be touched, by pid, at most 50"
    )
    matched_total: int = 0
    skipped: list[SkippedProcess] = Field(
        default_factory=list, description="matches never touched, with the reason, at most 50"
    )
    skipped_total: int = 0
    note: str | None = Field(None, description="e.g. which of the matches are hit is picked at injection")
    refused: str | None = Field(
        None, description="since 1.5: why an Inject of this fault would be refused on this node now (nothing else set)"
    )
    network: NetworkPreview | None = Field(None, description="since 1.5: a network fault's interface and exemptions")
    stress: StressPreview | None = Field(None, description="since 1.5: a cpu or memory fault's stressors")


class Ack(Message):
    type: Literal["ack"] = "ack"
    in_reply_to: str
    node: str
    accepted: bool
    reason: str | None = None
    fault_states: dict[str, FaultState] = Field(
        default_factory=dict, description="state of each fault the command named, as the agent sees it"
    )
    preview: PreviewResult | None = Field(None, description="since 1.4: the answer to a Preview")
    targets: list[str] | None = Field(
        None,
        description="since 1.6: a controller's answer to `faultline abort`: the experiment's target nodes, "
        "which the abort then confirms one by one (a frozen one sends no heartbeat to be seen by)",
    )


# --- broadcasts


class Halt(Message):
    """Revert everything now, on every agent, without controller state."""

    type: Literal["halt"] = "halt"
    reason: str = Field("halt", max_length=500)
    issued_by: str = Field("unknown", max_length=200)


class Lease(Message):
    """Experiment keep-alive; agents holding faults of the experiment revert when it lapses."""

    type: Literal["lease"] = "lease"
    experiment_id: str
    seq: int = 0


class NodeLoad(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    cpu_percent: float
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    memory_percent: float
    load1: float


class ActiveFault(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    fault_id: str
    experiment_id: str
    kind: str
    state: FaultState
    since: float
    expires_at: float


class EndedFault(BaseModel):
    """A fault that ended recently, carried in heartbeats for a while.

    Events are at-most-once (core NATS): a controller that was reconnecting
    when the "reverted" event went out learns the outcome from here instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    fault_id: str
    experiment_id: str
    kind: str
    state: FaultState
    reason: str | None = None
    at: float


JournalProblem = Literal["unreadable", "unrecognised", "unsupported-kind", "revert-failed"]
"""What an agent of this version reports; a reader accepts any text (a newer agent may add kinds)."""


class JournalIssue(BaseModel):
    """A journal entry the agent keeps without having reverted it: what it guarded may still be in place.

    Found by the journal recovery at start, or when a revert keeps failing; listed in every
    heartbeat until a halt reverts it or finds its file removed, and found again at the next
    start while the file is there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    entry: str = Field(description="file name under STATE_DIR/journal")
    problem: str = Field(description="unreadable | unrecognised | unsupported-kind | revert-failed (JournalProblem)")
    reason: str
    fault_id: str | None = None
    experiment_id: str | None = None
    kind: str | None = None


MAX_JOURNAL_ISSUES = 20
"""An agent lists at most this many journal issues in a heartbeat (its log has every one)."""

HALTS_REMEMBERED = 8
"""A heartbeat names the ids of this many of the latest halts the agent has finished."""


AgentState = Literal["starting", "ready", "leaving"]


class Heartbeat(Message):
    type: Literal["heartbeat"] = "heartbeat"
    node: str
    instance_id: str = Field(description="changes at every agent start")
    version: str
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: list[str] = Field(default_factory=list)
    capability_notes: dict[str, str] = Field(
        default_factory=dict, description="why a capability is missing, e.g. network.netem: kernel lacks sch_netem"
    )
    state: AgentState = "ready"
    interval_s: float
    seq: int
    started_at: float
    load: NodeLoad | None = None
    faults: list[ActiveFault] = Field(default_factory=list)
    recovered: list[str] = Field(default_factory=list, description="fault ids reverted from the journal at start")
    ended: list[EndedFault] = Field(
        default_factory=list, description="faults that ended in the last two minutes (since 1.1)"
    )
    journal_issues: list[JournalIssue] = Field(
        default_factory=list,
        description="journal entries kept because they could not be reverted, the first 20 (since 1.3)",
    )
    journal_issues_total: int = Field(0, ge=0, description="all such entries, listed or not (since 1.3)")
    halts_done: list[str] = Field(
        default_factory=list,
        description="ids of the latest halts whose reverts and retries this agent has finished (since 1.3)",
    )


class Measurements(BaseModel):
    """What a fault did, as measured by the agent. Every field optional; each kind fills its own."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    # process faults
    matched_pids: list[int] | None = None
    hit_pids: list[int] | None = None
    skipped: list[SkippedProcess] | None = None
    resumed_pids: list[int] | None = None
    restarted: bool | None = None
    restart_pid: int | None = None
    restart_after_s: float | None = None
    # cpu
    workers: int | None = None
    stressor_pids: list[int] | None = None
    cpu_load_mean_percent: float | None = None
    cpu_load_stdev_percent: float | None = None
    # memory
    rss_bytes: int | None = None
    rss_reached_s: float | None = None
    oom_killed: bool | None = None
    # network
    interface: str | None = None
    netns: str | None = None
    qdisc_handle: str | None = None
    # any kind
    cgroup: str | None = None
    apply_s: float | None = None
    revert_s: float | None = None
    recovered_from_journal: bool | None = None
    note: str | None = None


class FaultEvent(Message):
    """Fault lifecycle on faultline.v1.exp.<id>.events."""

    type: Literal["fault-event"] = "fault-event"
    experiment_id: str
    fault_id: str
    node: str
    kind: str
    state: FaultState
    reason: str | None = None
    measurements: Measurements = Field(default_factory=Measurements)


AnyMessage = Annotated[
    Inject | Revert | Start | Preview | Ack | Halt | Lease | Heartbeat | FaultEvent,
    Field(discriminator="type"),
]
