"""Per-target fault tracking during a run, and the preflight plan.

Mutable while the experiment runs (acks and events arrive concurrently); it is
turned into the frozen ``report.FaultOutcome`` at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controller.fleet import NodeView
from controller.report import FaultOutcome, StateChange
from proto.faults import required_capabilities
from proto.messages import TERMINAL_STATES, Measurements, PodRef
from proto.units import format_size

# States the controller itself records before the agent says anything.
PRE_ACK = frozenset({"not-dispatched", "dispatched"})
ENDED_BY_US = frozenset({"no-reply"})


@dataclass
class Track:
    node: str
    index: int
    fault_id: str
    kind: str
    name: str | None = None
    pods: list[PodRef] | None = None
    state: str = "not-dispatched"
    dispatched_at: float | None = None
    acked_at: float | None = None
    accepted: bool | None = None
    ack_reason: str | None = None
    active_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    expires_at: float | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    timeline: list[StateChange] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES or self.state in ENDED_BY_US

    @property
    def held_by_agent(self) -> bool:
        """The agent accepted it and has not reported its end: it needs a revert or an end event."""
        return self.accepted is True and not self.terminal

    def move(self, state: str, reason: str | None = None, at: float | None = None) -> bool:
        """Record a state change; a terminal state is final. Returns True when the state changed."""
        at = at if at is not None else time.time()
        if self.terminal and state != self.state:
            return False
        self.timeline.append(StateChange(state=state, at=at, reason=reason))
        changed = state != self.state
        self.state = state
        if state == "active" and self.active_at is None:
            self.active_at = at
        if self.terminal and self.ended_at is None:
            self.ended_at = at
            self.reason = reason or self.reason
        elif reason and state in ("failed", "rejected"):
            self.reason = reason
        return changed

    def merge(self, m: Measurements) -> None:
        self.measurements.update(m.model_dump(exclude_none=True))

    def outcome(self) -> FaultOutcome:
        return FaultOutcome(
            node=self.node,
            fault_id=self.fault_id,
            index=self.index,
            kind=self.kind,
            name=self.name,
            pods=[f"{p.namespace}/{p.name}" for p in self.pods] if self.pods else None,
            dispatched_at=self.dispatched_at,
            acked_at=self.acked_at,
            accepted=self.accepted,
            ack_reason=self.ack_reason,
            active_at=self.active_at,
            state=self.state,
            ended_at=self.ended_at,
            reason=self.reason,
            expires_at=self.expires_at,
            measurements=Measurements.model_validate(self.measurements),
            timeline=list(self.timeline),
        )


class PreflightError(ValueError):
    """The experiment cannot start against this fleet; nothing was sent. One reason per line."""


@dataclass(frozen=True)
class Plan:
    targets: list[str]
    pods: dict[str, list[PodRef]]
    notes: list[str]


def capability_refusals(specs: list[Any], views: dict[str, NodeView]) -> list[str]:
    """Per-node reasons why a target cannot take the experiment's faults (empty: all fine)."""
    reasons = []
    for node, view in sorted(views.items()):
        hb = view.heartbeat
        if hb.state != "ready":
            reasons.append(f"node {node}: agent is {hb.state}, not ready")
            continue
        have = set(hb.capabilities)
        for i, spec in enumerate(specs):
            missing = [c for c in required_capabilities(spec) if c not in have]
            if missing:
                why = "; ".join(hb.capability_notes.get(c, "not supported by this agent") for c in missing)
                reasons.append(f"node {node}: spec.faults[{i}] ({spec.kind}) needs {', '.join(missing)}: {why}")
    return reasons


def memory_refusals(specs: list[Any], views: dict[str, NodeView]) -> list[str]:
    """A memory fault asking for more than a target has at all (its heartbeat's total): refused
    before anything is sent, as the agent would refuse it at dispatch. What is available moves,
    so that is left to the agent's own check."""
    reasons = []
    for i, spec in enumerate(specs):
        size = getattr(spec, "size_bytes", None) if spec.kind == "memory" else None
        if size is None or getattr(spec, "allow_overcommit", False):
            continue
        for node, view in sorted(views.items()):
            load = view.heartbeat.load
            if load is not None and size > load.memory_total_bytes:
                reasons.append(
                    f"node {node}: spec.faults[{i}].size: {format_size(size)} is more than the node's memory "
                    f"({format_size(load.memory_total_bytes)}); set allowOvercommit: true to force it"
                )
    return reasons


HEARTBEATS_PER_TIMEOUT = 2
"""heartbeatTimeout must cover this many heartbeat intervals of every target: one missed beat must not abort."""


def heartbeat_timeout_refusal(timeout_s: float, views: dict[str, NodeView]) -> str | None:
    """Why spec.abort.heartbeatTimeout is too short for the targets' heartbeat intervals, or None."""
    if not views:
        return None
    need_s = round(HEARTBEATS_PER_TIMEOUT * max(v.heartbeat.interval_s for v in views.values()), 3)
    if timeout_s >= need_s:
        return None
    short = [
        f"{node} (every {view.heartbeat.interval_s:g}s)"
        for node, view in sorted(views.items())
        if HEARTBEATS_PER_TIMEOUT * view.heartbeat.interval_s > timeout_s
    ]
    return (
        f"spec.abort.heartbeatTimeout: {timeout_s:g}s is less than {HEARTBEATS_PER_TIMEOUT} heartbeat intervals "
        f"of agent{'s' if len(short) > 1 else ''} {', '.join(short)}: one late heartbeat would abort the run, blaming the agent; "
        f"use heartbeatTimeout: {need_s:g}s or more"
    )
