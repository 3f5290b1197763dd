"""`faultline halt`: one broadcast Halt, then confirmation from the agents' heartbeats.

The Halt is a broadcast on ``proto.subjects.HALT`` that every agent acts on
without any controller state, and nothing answers it. What the CLI can
confirm it learns from heartbeats: it collects them as `faultline agents`
does to learn which agents there are, then waits, bounded, until each of
them has sent a heartbeat after the halt that lists no active fault.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import nats.errors
from pydantic import BaseModel, ConfigDict

from controller.fleet import JOURNAL_ISSUES_HELP, Fleet, NodeView, journal_issue_line
from proto.codec import encode
from proto.messages import KEPT_ENTRIES_SINCE_MINOR, ActiveFault, EndedFault, Halt, JournalIssue, schema_minor
from proto.subjects import HALT

HALT_WAIT_S = 5.0
"""How long after sending the halt every agent seen has to confirm it, unless its heartbeat is slow."""
HALT_WAIT_INTERVALS = 2.5
"""...then this many heartbeat intervals of the slowest agent seen (one missed beat is not silence)."""
HALT_WAIT_MAX_S = 30.0
"""...but never longer than this."""

HALT_WAIT_HELP = (
    "Broadcast a halt: every agent connected to the NATS server reverts every fault it holds, now, "
    "without any controller state. Then confirm it: heartbeats are collected for 1.5 s (up to 5 s when "
    "agents beat slowly) to learn which agents there are, and halt waits at most "
    f"{HALT_WAIT_S:g} s after sending ({HALT_WAIT_INTERVALS:g} heartbeat intervals of the slowest agent if "
    f"longer, never more than {HALT_WAIT_MAX_S:g} s) until each of them sends a heartbeat listing no active "
    "fault, and prints each node's result. Exit 0 when every agent seen is clear, or when no agent is seen; "
    "1 when one still holds faults, failed a revert, keeps a journal entry unreverted (the halt first retries "
    "failed reverts) or went silent (each is named); 2 when NATS cannot be reached. "
    "An agent that sends no heartbeat at all (frozen, cut off from NATS, not running) cannot be seen, so it "
    'is not in "every agent seen": it reverts on its own once its lease lapses or it has lost NATS for a '
    "while. Name the fleet you expect with --expect NODE,... or --expect-agents N (e.g. the DaemonSet's "
    "desiredNumberScheduled) and the halt is not clear (exit 1) while one of them is missing."
)

NodeResult = Literal["clear", "holds-faults", "revert-failed", "journal-kept", "silent", "never-seen"]
HaltOutcome = Literal["clear", "not-clear", "no-agents"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HaltNode(_Model):
    """One agent's answer to the halt, as its heartbeats tell it."""

    node: str
    result: NodeResult
    agent_state: str
    active_faults: list[ActiveFault]
    """In its last heartbeat: empty once clear."""
    ended_since_halt: list[EndedFault]
    """Faults its heartbeats report ended since the halt (reverted, or failed to revert)."""
    journal_issues: list[JournalIssue]
    """Journal entries it keeps without having reverted them, after the halt retried them."""
    journal_issues_total: int
    heartbeat_after_halt_s: float | None
    """When its last heartbeat arrived, seconds after the halt was sent; None: none arrived since."""
    last_seen_s: float | None
    """None: never seen (an --expect node that sent no heartbeat)."""


class HaltReport(_Model):
    url: str
    reason: str
    issued_by: str
    halt_id: str
    sent_at: float
    outcome: HaltOutcome
    agents_seen: int
    wait_s: float
    """The bound the confirmation had (0 when no agent was seen)."""
    waited_s: float
    """From sending the halt to the result."""
    nodes: list[HaltNode]
    expected_nodes: list[str] = []
    """--expect: nodes that must confirm; one never heard is a node with result "never-seen"."""
    expected_agents: int | None = None
    """--expect-agents: how many agents must confirm; fewer seen is not clear."""


def wait_bound_s(views: Mapping[str, NodeView]) -> float:
    slowest = max((v.heartbeat.interval_s for v in views.values()), default=0.0)
    return min(HALT_WAIT_MAX_S, max(HALT_WAIT_S, HALT_WAIT_INTERVALS * slowest))


def _confirmed(view: NodeView, sent_mono: float, halt_id: str) -> bool:
    """A heartbeat that arrived after the halt was sent and lists no active fault; from an agent
    on schema 1.3 or newer, the one it sends when the halt's reverts and retries are done (it
    names the halt): a regular heartbeat sent meanwhile may still list a kept entry being retried."""
    hb = view.heartbeat
    if view.last_seen_monotonic <= sent_mono or hb.faults:
        return False
    return schema_minor(hb.schema_version) < KEPT_ENTRIES_SINCE_MINOR or halt_id in hb.halts_done


def node_result(view: NodeView, sent_mono: float, sent_wall: float, now_mono: float) -> HaltNode:
    hb = view.heartbeat
    after_s = view.last_seen_monotonic - sent_mono
    ended: list[EndedFault] = []
    if after_s > 0:
        # The agent stamps its ends with its own clock: move the halt's time onto it. The
        # offset includes the transit time, so the estimate errs early, never missing an end.
        halt_on_agent_clock = sent_wall + (hb.sent_at - view.received_at)
        ended = [e for e in hb.ended if e.at >= halt_on_agent_clock]
    result: NodeResult
    if after_s <= 0:
        result = "silent"
    elif hb.faults:
        result = "holds-faults"
    elif any(e.state == "failed" for e in ended):
        result = "revert-failed"
    elif hb.journal_issues_total:
        result = "journal-kept"
    else:
        result = "clear"
    return HaltNode(
        node=hb.node,
        result=result,
        agent_state=hb.state,
        active_faults=list(hb.faults),
        ended_since_halt=ended,
        journal_issues=list(hb.journal_issues),
        journal_issues_total=hb.journal_issues_total,
        heartbeat_after_halt_s=round(after_s, 3) if after_s > 0 else None,
        last_seen_s=round(view.age_s(now_mono), 3),
    )


HALT_RESEND_S = 1.0
"""While an agent seen has not confirmed, the same halt is published again after this, then after
twice as long each time: a halt published while NATS restarts is lost without an error, since
nats-py's flush returns at once while it reconnects. Agents since 1.6 carry out one halt id once;
an older one carries out each copy, hence the growing gaps."""


async def confirm(
    fleet: Fleet,
    halt_id: str,
    sent_mono: float,
    sent_wall: float,
    wait_s: float,
    resend: Callable[[], Awaitable[None]] | None = None,
) -> list[HaltNode]:
    """Wait until every agent seen confirmed the halt, at most until ``wait_s`` after it was sent;
    ``resend`` it meanwhile (see HALT_RESEND_S)."""
    end = sent_mono + wait_s
    gap_s = HALT_RESEND_S
    while True:
        remaining_s = max(0.0, end - time.monotonic())
        done = await fleet.wait_until(
            lambda: all(_confirmed(v, sent_mono, halt_id) for v in fleet.nodes().values()),
            min(remaining_s, gap_s) if resend is not None else remaining_s,
        )
        if done or time.monotonic() >= end or resend is None:
            break
        await resend()
        gap_s *= 2
    now = time.monotonic()
    return [node_result(v, sent_mono, sent_wall, now) for _, v in sorted(fleet.nodes().items())]


def _faults_text(faults: list[ActiveFault] | list[EndedFault]) -> str:
    return ", ".join(f"{f.fault_id} ({f.kind}, {f.state})" for f in faults)


def render_node(n: HaltNode, wait_s: float) -> str:
    if n.result == "clear":
        detail = f"{len(n.ended_since_halt)} fault(s) ended since the halt: {_faults_text(n.ended_since_halt)}"
        held = detail if n.ended_since_halt else "held no fault"
        return f"{n.node}: clear: {held} (heartbeat {n.heartbeat_after_halt_s:.1f}s after the halt)"
    if n.result == "holds-faults":
        return (
            f"{n.node}: NOT CLEAR: still holds {len(n.active_faults)} fault(s) {wait_s:g}s after the halt: "
            + _faults_text(n.active_faults)
        )
    if n.result == "revert-failed":
        failed = [e for e in n.ended_since_halt if e.state == "failed"]
        return f"{n.node}: NOT CLEAR: revert failed: " + "; ".join(
            f"{e.fault_id} ({e.kind}): {e.reason or 'no reason given'}" for e in failed
        )
    if n.result == "journal-kept":
        more = n.journal_issues_total - len(n.journal_issues)
        lines = [
            f"{n.node}: NOT CLEAR: {n.journal_issues_total} journal entry(ies) kept unreverted after the halt's retries:"
        ]
        lines += [f"    {journal_issue_line(i)}" for i in n.journal_issues]
        if more > 0:
            lines.append(f"    ... and {more} more (the agent's log lists every one)")
        return "\n".join(lines)
    if n.result == "never-seen":
        return (
            f"{n.node}: NOT CLEAR: expected, but sent no heartbeat at all (frozen, cut off from NATS, or not "
            "running); it may still hold faults until its lease lapses"
        )
    return (
        f"{n.node}: NOT CLEAR: silent: no heartbeat within {wait_s:g}s after the halt "
        f"(last one {n.last_seen_s:.1f}s ago); it may still hold faults"
    )


UNSEEN_NOTE = (
    "  (an agent that sends no heartbeat, frozen or cut off from NATS, is not seen and not counted: cut off, it "
    "reverts on its own when its lease lapses; frozen, only once it runs again (its cpu and memory stressors end "
    "by themselves); --expect NODE,... or --expect-agents N makes a missing one not clear)"
)


def _too_few(report: HaltReport) -> bool:
    seen = sum(1 for n in report.nodes if n.result != "never-seen")
    return report.expected_agents is not None and seen < report.expected_agents


def render_text(report: HaltReport) -> list[str]:
    if report.outcome == "no-agents":
        return [
            f"halt sent on {report.url}, but no agent sent a heartbeat within {report.waited_s:.1f}s: "
            "there is nothing to confirm",
            UNSEEN_NOTE,
        ]
    lines = [render_node(n, report.wait_s) for n in report.nodes]
    bad = [n for n in report.nodes if n.result != "clear"]
    seen = sum(1 for n in report.nodes if n.result != "never-seen")
    if _too_few(report):
        lines.append(
            f"only {seen} agent(s) seen of the {report.expected_agents} expected (--expect-agents): "
            "the others sent no heartbeat and may still hold faults"
        )
    if not bad and not _too_few(report):
        lines.append(f"halt confirmed: all {report.agents_seen} agent(s) seen report no active fault")
        if not report.expected_nodes and report.expected_agents is None:
            lines.append(UNSEEN_NOTE)
    else:
        named = ", ".join(f"{n.node} ({n.result})" for n in bad)
        if bad:
            which = "seen or expected" if report.expected_nodes else "seen"
            lines.append(f"halt NOT confirmed on {len(bad)} of {len(report.nodes)} agent(s) {which}: {named}")
        else:
            lines.append("halt NOT confirmed: fewer agents seen than expected")
        if any(n.result == "journal-kept" for n in bad):
            lines.append(f"  (journal-kept: {JOURNAL_ISSUES_HELP})")
    return lines


def never_seen(node: str) -> HaltNode:
    return HaltNode(
        node=node,
        result="never-seen",
        agent_state="unknown",
        active_faults=[],
        ended_since_halt=[],
        journal_issues=[],
        journal_issues_total=0,
        heartbeat_after_halt_s=None,
        last_seen_s=None,
    )


async def halt_and_confirm(
    nc: Any,
    url: str,
    reason: str,
    issued_by: str,
    output: str,
    out: Callable[[str], None],
    err: Callable[[str], None],
    expect_nodes: list[str] | None = None,
    expect_agents: int | None = None,
) -> int:
    """Send the halt, confirm it; print the result. Returns the exit code (0 clear or no agents, 1 not:
    also when an expected node sent no heartbeat, or fewer agents than expected were seen)."""
    expected = sorted(set(expect_nodes or []))
    fleet = Fleet(nc)
    await fleet.start()  # before the halt: the heartbeats around it tell who is there
    try:
        halt = Halt(reason=reason, issued_by=issued_by)
        sent_mono = time.monotonic()
        try:
            await nc.publish(HALT, encode(halt))
            await nc.flush(timeout=2)  # returns at once while nats-py reconnects: confirm() resends
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            err(f"faultline: the halt may not have reached NATS at {url}: {str(exc) or type(exc).__name__}")
            return 1
        err(f"halt sent on {url}: every agent reverts everything now; learning from heartbeats who is there ...")
        views = await fleet.gather()
        wait_s = wait_bound_s(views) if views else 0.0
        if views:
            err(
                f"{len(views)} agent(s) seen: {', '.join(sorted(views))}; waiting up to {wait_s:g}s after the "
                "halt for each to report no active fault"
            )
        payload = encode(halt)

        async def resend() -> None:
            if getattr(nc, "is_connected", True):
                with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                    await nc.publish(HALT, payload)

        nodes = await confirm(fleet, halt.id, sent_mono, halt.sent_at, wait_s, resend) if views else []
        agents_seen = len(nodes)
        heard = {n.node for n in nodes}
        nodes = sorted([*nodes, *(never_seen(n) for n in expected if n not in heard)], key=lambda n: n.node)
        short = expect_agents is not None and agents_seen < expect_agents
        outcome: HaltOutcome = (
            "no-agents"
            if not nodes and not short
            else "clear"
            if all(n.result == "clear" for n in nodes) and not short
            else "not-clear"
        )
        report = HaltReport(
            url=url,
            reason=reason,
            issued_by=issued_by,
            halt_id=halt.id,
            sent_at=halt.sent_at,
            outcome=outcome,
            agents_seen=agents_seen,
            wait_s=wait_s,
            waited_s=round(time.monotonic() - sent_mono, 3),
            nodes=nodes,
            expected_nodes=expected,
            expected_agents=expect_agents,
        )
    finally:
        await fleet.stop()
    if output == "json":
        out(report.model_dump_json(indent=2))
    else:
        for line in render_text(report):
            out(line)
    return 1 if outcome == "not-clear" else 0
