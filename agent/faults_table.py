"""The agent's in-memory view of the faults it holds: one FaultRecord per fault id.

A record carries the Inject as accepted, the fault's state and measurements,
its deadline timer and the task that runs its lifecycle (agent/lifecycle.py:
plan -> journal -> apply -> wait for an end -> revert -> terminal event).
A fault accepted with ``await_start`` has no task until its Start: it is a
record and its deadline timer, nothing else. Ending it before then launches
the same lifecycle, which finds the end already asked for, applies nothing
and reports the end.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.faults.base import FaultContext, Injector, Plan
from agent.journal import JournalEntry
from proto.messages import TERMINAL_STATES, ActiveFault, FaultState, Inject, Measurements


@functools.cache
def no_measurements() -> Measurements:
    """One empty report shared by every record until it measures something (the model is
    frozen); built on first use, so an idle agent never builds the Measurements schema."""
    return Measurements()


@dataclass
class FaultRecord:
    cmd: Inject
    """The Inject as accepted (a pod-level fault's spec already narrowed to its pod)."""
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
    measurements: Measurements = field(default_factory=no_measurements)
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    kept: bool = False
    """Guarded by the agent's keeper (agent/keepers.py): applied, of a kind the kernel holds."""
    on_end: Callable[[FaultRecord], None] | None = None
    """Set while the fault waits for its Start (no task yet): called once when an end is asked for."""

    @property
    def waiting(self) -> bool:
        """Accepted with await_start and not started: nothing applied, no lifecycle task."""
        return self.task is None and not self.ended.is_set()

    @property
    def fault_id(self) -> str:
        return self.cmd.fault_id

    @property
    def experiment_id(self) -> str:
        return self.cmd.experiment_id

    @property
    def kind(self) -> str:
        return self.cmd.spec.kind

    def journal_entry(self, plan: Plan) -> JournalEntry:
        """What the journal keeps: built when the plan is known, just before the apply (an
        accepted fault that never starts is never journaled: nothing of it was applied)."""
        cmd = self.cmd
        return JournalEntry(
            fault_id=cmd.fault_id,
            experiment_id=cmd.experiment_id,
            spec=cmd.spec,
            expires_at=cmd.expires_at,
            lease_timeout_s=cmd.lease_timeout_s,
            pods=cmd.pods,
            plan=plan.model_dump(mode="json"),
            command_id=cmd.id,
        )

    def request_end(self, reason: str, state: FaultState = "reverted") -> bool:
        """Ask the lifecycle to revert. The first reason wins; later calls are no-ops."""
        if self.ended.is_set():
            return False
        self.end_reason = reason
        self.end_state = state
        self.ended.set()
        if self.timer is not None:
            self.timer.cancel()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)
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
            expires_at=self.cmd.expires_at,
        )


def merge(base: Measurements, update: Measurements) -> Measurements:
    """Fields set in ``update`` win; unset ones keep ``base``."""
    if not update.model_fields_set:
        return base  # an empty report (most reverts): nothing to copy
    changes: dict[str, Any] = update.model_dump(exclude_none=True)
    return base.model_copy(update=changes) if changes else base
