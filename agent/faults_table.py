"""The agent's in-memory view of the faults it holds, and each one's lifecycle.

One FaultRecord per fault id. Its lifecycle runs in one owned task:
plan -> journal -> apply -> wait for an end (deadline, revert, lease lapse,
halt, stop) -> revert -> journal removal -> terminal event. Every end path
goes through the same revert, so a failed apply is still reverted
(invariant 5) and nothing depends on which path came first.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agent.faults.base import FaultContext, Injector, Plan
from agent.journal import JournalEntry
from proto.messages import TERMINAL_STATES, ActiveFault, FaultState, Measurements


@dataclass
class FaultRecord:
    entry: JournalEntry
    injector: Injector
    ctx: FaultContext
    deadline_mono: float
    state: FaultState = "accepted"
    since: float = field(default_factory=time.time)
    accepted_mono: float = field(default_factory=time.monotonic)
    plan: Plan | None = None
    end_reason: str | None = None
    end_state: FaultState = "reverted"
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    measurements: Measurements = field(default_factory=Measurements)
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def fault_id(self) -> str:
        return self.entry.fault_id

    @property
    def experiment_id(self) -> str:
        return self.entry.experiment_id

    @property
    def kind(self) -> str:
        return self.entry.spec.kind

    def request_end(self, reason: str, state: FaultState = "reverted") -> bool:
        """Ask the lifecycle to revert. The first reason wins; later calls are no-ops."""
        if self.ended.is_set():
            return False
        self.end_reason = reason
        self.end_state = state
        self.ended.set()
        if self.timer is not None:
            self.timer.cancel()
        return True

    def set_state(self, state: FaultState) -> None:
        self.state = state
        self.since = time.time()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def view(self) -> ActiveFault:
        return ActiveFault(
            fault_id=self.fault_id,
            experiment_id=self.experiment_id,
            kind=self.kind,
            state=self.state,
            since=self.since,
            expires_at=self.entry.expires_at,
        )


def merge(base: Measurements, update: Measurements) -> Measurements:
    """Fields set in ``update`` win; unset ones keep ``base``."""
    if not update.model_fields_set:
        return base  # an empty report (most reverts): nothing to copy
    changes: dict[str, Any] = update.model_dump(exclude_none=True)
    return base.model_copy(update=changes) if changes else base
