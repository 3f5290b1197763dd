"""The agent's watchdog: the dead-man's switch (invariant 2) and the deadline check.

It reverts an experiment's faults when the experiment's lease is not renewed
for its lease timeout, everything when NATS has been gone for
nats_lost_timeout_s, and double-checks every fault's deadline (each fault
also has its own timer). A timer, not a task: it is armed while faults are
held, at the next moment something can be due, and an agent that holds
nothing has no timer at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from agent.config import AgentSettings
from agent.faults_table import FaultRecord

log = logging.getLogger("faultline.agent")

WATCHDOG_SLACK_S = 0.005


class Watchdog:
    # provided by AgentRuntime
    settings: AgentSettings
    faults: dict[str, FaultRecord]
    ended_experiments: OrderedDict[str, str]
    lease_seen: dict[str, float]
    nats_lost_since: float | None
    _watchdog_timer: asyncio.TimerHandle | None
    _watchdog_next: float
    _watchdog_closed: bool

    if TYPE_CHECKING:
        # Declared for the type checker only (see CommandHandler).
        def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None: ...
        def end_all(self, reason: str, experiment_id: str | None = None) -> list[FaultRecord]: ...

    def check_leases(self) -> None:
        now = time.monotonic()
        lost_for = now - self.nats_lost_since if self.nats_lost_since is not None else 0.0
        if lost_for > self.settings.timing.nats_lost_timeout_s and self.faults:
            self.end_all(f"NATS unreachable for {lost_for:.1f}s")
        for rec in list(self.faults.values()):
            if rec.ended.is_set():
                continue
            if time.time() >= rec.cmd.expires_at:
                rec.request_end("deadline reached", "expired")
                continue
            last = max(self.lease_seen.get(rec.experiment_id, 0.0), rec.accepted_mono)
            silent = now - last
            if silent > rec.cmd.lease_timeout_s:
                rec.request_end(f"lease lapsed: no lease for {silent:.1f}s (timeout {rec.cmd.lease_timeout_s:g}s)")
                self.remember(self.ended_experiments, rec.experiment_id, "lease lapsed")

    def next_check_in(self) -> float:
        """Seconds until a lease could lapse, NATS-lost could fire or a deadline passes,
        at most watchdog_interval_s: the watchdog wakes when something can be due, not
        on a fixed tick (a lease renewed meanwhile only moves the next wake later)."""
        timing = self.settings.timing
        now = time.monotonic()
        due = now + timing.watchdog_interval_s
        if self.faults:
            if self.nats_lost_since is not None:
                due = min(due, self.nats_lost_since + timing.nats_lost_timeout_s)
            for rec in self.faults.values():
                if not rec.ended.is_set():
                    last = max(self.lease_seen.get(rec.experiment_id, 0.0), rec.accepted_mono)
                    due = min(due, last + rec.cmd.lease_timeout_s, rec.deadline_mono)
        return max(0.0, due - now) + WATCHDOG_SLACK_S  # a lapse is "silent > timeout": look just after

    def poke_watchdog(self, due: float) -> None:
        """Something is due at monotonic time ``due`` (a fault's lease or deadline, NATS loss):
        make sure the watchdog looks then, or earlier."""
        if due < self._watchdog_next and not self._watchdog_closed:
            self._arm_watchdog(max(0.0, due - time.monotonic()) + WATCHDOG_SLACK_S)

    def _arm_watchdog(self, delay: float) -> None:
        # A timer, not a task: re-arming it when a fault is accepted costs a timer handle, not
        # a task wake-up, and an agent holding nothing has no timer at all.
        if self._watchdog_timer is not None:
            self._watchdog_timer.cancel()
        self._watchdog_next = time.monotonic() + delay
        self._watchdog_timer = asyncio.get_running_loop().call_later(delay, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        """Check leases, NATS loss and deadlines, then sleep until the next thing can be due
        (at most watchdog_interval_s) while faults are held; with none held, until poked."""
        self._watchdog_timer = None
        self._watchdog_next = math.inf
        delay = self.settings.timing.watchdog_interval_s
        try:
            self.check_leases()
            delay = self.next_check_in()
        except Exception:  # the watchdog must outlive any bug in one check
            log.exception("watchdog check failed; checking again in %gs", delay)
        if self.faults and not self._watchdog_closed:
            self._arm_watchdog(delay)

    def stop_watchdog(self) -> None:
        self._watchdog_closed = True
        if self._watchdog_timer is not None:
            self._watchdog_timer.cancel()
            self._watchdog_timer = None
