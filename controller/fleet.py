"""The fleet as the controller sees it: the latest heartbeat of every agent.

One subscription to every agent's heartbeat subject. Each node keeps its
latest heartbeat and when it arrived (monotonic clock, so wall-clock jumps
do not fake silence). Undecodable messages are counted and ignored: a bad
publisher must not blind the controller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proto.codec import DecodeError, decode
from proto.messages import KEPT_ENTRIES_SINCE_MINOR, START_SINCE_MINOR, Heartbeat, JournalIssue, schema_minor
from proto.subjects import ALL_HEARTBEATS


@dataclass(frozen=True)
class NodeView:
    heartbeat: Heartbeat
    last_seen_monotonic: float
    received_at: float
    """Wall-clock time (Unix seconds) the heartbeat arrived, for reports."""

    @property
    def node(self) -> str:
        return self.heartbeat.node

    @property
    def awaits_start(self) -> bool:
        """The agent speaks 1.2 or newer: it can hold faults until the experiment's Start."""
        return schema_minor(self.heartbeat.schema_version) >= START_SINCE_MINOR

    @property
    def reports_journal_issues(self) -> bool:
        """The agent speaks 1.3 or newer: its heartbeats list the journal entries it keeps."""
        return schema_minor(self.heartbeat.schema_version) >= KEPT_ENTRIES_SINCE_MINOR

    def age_s(self, now_monotonic: float | None = None) -> float:
        return (now_monotonic if now_monotonic is not None else time.monotonic()) - self.last_seen_monotonic


def journal_issue_line(issue: JournalIssue) -> str:
    """One kept journal entry, for a person: what it was (as far as known) and why it is still there."""
    if issue.fault_id is None:
        return f"{issue.entry}: {issue.problem}: {issue.reason}"
    about = ", ".join(x for x in (issue.kind, issue.experiment_id and f"experiment {issue.experiment_id}") if x)
    where = f"{about}; {issue.entry}" if about else issue.entry
    return f"{issue.fault_id} ({where}): {issue.problem}: {issue.reason}"


def journal_issue_lines(hb: Heartbeat, indent: str = "  ") -> list[str]:
    """The agent's kept journal entries, one line each, and how many more it did not list."""
    lines = [indent + journal_issue_line(i) for i in hb.journal_issues]
    more = hb.journal_issues_total - len(hb.journal_issues)
    if more > 0:
        lines.append(f"{indent}... and {more} more (the agent's log lists every one)")
    return lines


JOURNAL_ISSUES_HELP = (
    "what such an entry guarded may still be in place: the agent retries failed reverts once a minute, and "
    "`faultline halt` (every agent) or restarting the agent retries them at once; check the rest on the node "
    "(a paused process, a qdisc, a stressor), and once it is handled remove the file from STATE_DIR/journal: "
    "the next halt or start stops listing it (docs/deploy.md)"
)


RESTART_SEQ_MAX = 5
"""A new instance whose first heartbeat seen has a higher seq did not just start."""
DUPLICATE_WINDOW_INTERVALS = 10
"""An instance seen again within this many heartbeat intervals of being replaced is a second agent."""
DUPLICATE_SETTLE_INTERVALS = 1.5
"""A node whose agent changed while heartbeats were gathered: how long to wait for the old one to
speak again (two agents under one name) before taking it for a restart."""


def duplicate_line(node: str, ids: set[str]) -> str:
    shown = ", ".join(sorted(i[:8] for i in ids))
    return (
        f"node {node}: {len(ids)} agents send heartbeats under this one name (instances {shown}); each would "
        "take the node's commands: give each agent its own --node (FAULTLINE_NODE)"
    )


class FleetTimeout(TimeoutError):
    pass


class Fleet:
    """Subscribe with start(), read with nodes()/get(), stop with stop()."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._sub: Any = None
        self._nodes: dict[str, NodeView] = {}
        self._changed = asyncio.Event()
        self.garbage = 0
        """Messages on heartbeat subjects that did not decode."""
        self.last_garbage_reason: str | None = None
        self._replaced: dict[str, dict[str, float]] = {}  # node -> instance ids it had before, when replaced
        self._duplicates: dict[str, tuple[set[str], float]] = {}  # node -> instance ids seen at once, until
        self._switched: dict[str, float] = {}  # node -> when another instance took over (not after a "leaving")

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(ALL_HEARTBEATS, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await asyncio.wait_for(sub.unsubscribe(), 2.0)
            except Exception:  # noqa: BLE001 - a closed connection is already unsubscribed
                pass

    async def _on_msg(self, msg: Any) -> None:
        self.observe(msg.data)

    def observe(self, data: bytes) -> Heartbeat | None:
        """Record one heartbeat payload. Public so tests can feed the fleet without NATS."""
        try:
            hb = decode(data, Heartbeat)
        except DecodeError as exc:
            self.garbage += 1
            self.last_garbage_reason = str(exc)
            return None
        now = time.monotonic()
        before = self._nodes.get(hb.node)
        if before is not None and before.heartbeat.instance_id != hb.instance_id:
            self._note_replaced(hb.node, before.heartbeat, hb, now)
        self._nodes[hb.node] = NodeView(hb, now, time.time())
        # Wake everyone waiting for a change, then start a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return hb

    def _note_replaced(self, node: str, old: Heartbeat, new: Heartbeat, now: float) -> None:
        """A restart replaces an instance for good. An instance that comes back after it was replaced
        is a second agent heartbeating under the same node name (two hosts of one name, a copied
        --node): both would take that node's commands."""
        window_s = DUPLICATE_WINDOW_INTERVALS * max(old.interval_s, new.interval_s)
        replaced = self._replaced.setdefault(node, {})
        for iid, at in list(replaced.items()):
            if now - at > window_s:
                del replaced[iid]
        if old.state != "leaving":  # a stopping agent's last heartbeat: it is not coming back
            replaced[old.instance_id] = now
            self._switched[node] = now
        # A restarted agent counts its heartbeats from 1. One far along that takes over from an
        # instance heard a moment ago, and not leaving, was running beside it all along.
        prev = self._nodes.get(node)
        beside = (
            old.state != "leaving"
            and new.seq > RESTART_SEQ_MAX
            and prev is not None
            and now - prev.last_seen_monotonic < 2 * max(old.interval_s, new.interval_s)
        )
        if new.instance_id in replaced or beside:
            ids = self._duplicates.get(node, (set(), 0.0))[0] if self.duplicate(node) else set()
            self._duplicates[node] = (ids | {old.instance_id, new.instance_id}, now + window_s)

    def duplicate(self, node: str) -> set[str]:
        """The instance ids of the agents seen heartbeating at once under this node name, recently;
        empty when there is one agent (a restart is not a duplicate)."""
        found = self._duplicates.get(node)
        if found is None or time.monotonic() > found[1]:
            return set()
        return set(found[0])

    def nodes(self) -> dict[str, NodeView]:
        return dict(self._nodes)

    def get(self, node: str) -> NodeView | None:
        return self._nodes.get(node)

    def labels(self, *, only_ready: bool = False) -> dict[str, dict[str, str]]:
        """node -> labels, the input of targeting."""
        return {
            n: dict(v.heartbeat.labels)
            for n, v in self._nodes.items()
            if not only_ready or v.heartbeat.state == "ready"
        }

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until predicate() holds after some heartbeat; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return predicate()

    async def wait_for(self, nodes: list[str], timeout_s: float, *, ready: bool = True) -> dict[str, NodeView]:
        """Wait until every node has sent a heartbeat (in state "ready" unless ready=False)."""

        def have_all() -> bool:
            return all(
                (v := self._nodes.get(n)) is not None and (not ready or v.heartbeat.state == "ready") for n in nodes
            )

        if not await self.wait_until(have_all, timeout_s):
            missing = [n for n in nodes if n not in self._nodes]
            not_ready = [n for n in nodes if n in self._nodes and self._nodes[n].heartbeat.state != "ready"]
            parts = []
            if missing:
                parts.append("no heartbeat from " + ", ".join(missing))
            if not_ready:
                parts.append("not ready: " + ", ".join(not_ready))
            raise FleetTimeout(f"after {timeout_s:g}s: " + "; ".join(parts))
        return {n: self._nodes[n] for n in nodes}

    async def gather(self, min_wait_s: float = 1.5, max_wait_s: float = 5.0) -> dict[str, NodeView]:
        """Collect heartbeats for about 1.5 heartbeat intervals (learned from the first one)."""
        start = time.monotonic()
        # the first heartbeat may take an agent's whole interval: wait for it up to max_wait_s, or an
        # agent with a slow heartbeat is reported missing (an empty fleet costs max_wait_s)
        await self.wait_until(lambda: bool(self._nodes), max_wait_s)
        intervals = [v.heartbeat.interval_s for v in self._nodes.values()]
        window = min(max_wait_s, max([min_wait_s, *(1.5 * i for i in intervals)]))
        remaining = window - (time.monotonic() - start)
        if remaining > 0:
            await asyncio.sleep(remaining)  # a collection window, not synchronisation: we want all who speak
        # A node whose agent changed during the window is a restart, or two agents under one name
        # taking turns: the old one heartbeats again if it is alive. Wait for that, a little longer.
        switched = [n for n, at in self._switched.items() if at >= start and not self.duplicate(n)]
        if switched:
            extra = DUPLICATE_SETTLE_INTERVALS * max(self._nodes[n].heartbeat.interval_s for n in switched)
            await self.wait_until(lambda: all(self.duplicate(n) for n in switched), min(extra, max_wait_s))
        return self.nodes()
