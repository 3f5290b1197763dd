"""The agent's graceful stop (SIGTERM, SIGINT, the end of run()): one path, bounded at every step.

Stop taking commands, revert everything, settle the journal, send the last
("leaving") heartbeat, drain and close the connection, cancel the tasks.
The sum of the steps' bounds stays within timing.stop_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from agent.config import AgentSettings
from agent.faults_table import FaultRecord
from proto import subjects
from proto.codec import encode
from proto.messages import AgentState, Heartbeat

log = logging.getLogger("faultline.agent")

JOURNAL_SETTLE_S = 2.0  # a stop waits this long at most for journal bookkeeping in flight


class Stopping:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    nc: Any
    connected: bool
    stopping: bool
    faults: dict[str, FaultRecord]
    _subs: list[Any]
    _tasks: set[asyncio.Task[Any]]

    if TYPE_CHECKING:
        # Declared for the type checker only (see CommandHandler).
        def end_all(self, reason: str, experiment_id: str | None = None) -> list[FaultRecord]: ...
        async def settle_journal(self, timeout_s: float) -> None: ...
        def heartbeat(self, state: AgentState = "ready") -> Heartbeat: ...
        async def publish(self, subject: str, payload: bytes) -> None: ...
        def stop_watchdog(self) -> None: ...

    def revert_budget_at_stop(self) -> float:
        """What timing.stop_timeout_s leaves for the reverts once every other step of a stop has
        had its own bound: unsubscribe 1 s, journal settle, last heartbeat, drain, close 1 s,
        tasks 2 s. The whole stop then stays within stop_timeout_s."""
        drain = self.settings.nats.drain_timeout_s
        others = 1.0 + JOURNAL_SETTLE_S + 2 * drain + 1.0 + 2.0
        return max(1.0, self.settings.timing.stop_timeout_s - others)

    async def shutdown(self) -> None:
        """One path: stop taking commands, revert everything, say goodbye, drain."""
        self.stopping = True
        for sub in self._subs[:1]:  # the command subscription: no new work
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.unsubscribe(), 1.0)
        hit = self.end_all("agent stopping (SIGTERM)")
        if hit:
            done = asyncio.gather(*(r.finished.wait() for r in hit))
            try:
                await asyncio.wait_for(done, self.revert_budget_at_stop())
            except TimeoutError:
                log.error("stop: %d fault(s) did not revert in time; the journal keeps them", len(self.faults))
        await self.settle_journal(JOURNAL_SETTLE_S)  # settled before the last heartbeat
        if self.nc is not None and self.connected:
            hb = encode(self.heartbeat("leaving"))
            with contextlib.suppress(Exception):
                await asyncio.shield(self.publish(subjects.agent_hb(self.node), hb))
                await asyncio.wait_for(self.nc.flush(), self.settings.nats.drain_timeout_s)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), self.settings.nats.drain_timeout_s)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 1.0)
        self.stop_watchdog()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        log.info("faultline-agent stopped node=%s", self.node)
