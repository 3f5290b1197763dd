"""Broadcasts every agent hears: halt, an experiment's abort, start and lease.

Each is obeyed from the agent's own state, without any controller: an agent
that holds nothing of an experiment skips its messages without decoding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.msg import Msg

from agent.config import AgentSettings
from agent.faults_table import FaultRecord
from proto import subjects
from proto.codec import DecodeError, decode, encode
from proto.messages import Ack, AgentState, FaultState, Halt, Heartbeat, Lease, Revert, Start

log = logging.getLogger("faultline.agent")
B = TypeVar("B", Revert, Start, Lease)


class Broadcasts:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    ended_experiments: OrderedDict[str, str]
    lease_seen: dict[str, float]
    rejected_count: int
    halt_seq: int
    halts_seen: deque[str]
    stopping: bool

    if TYPE_CHECKING:
        # Declared for the type checker only (see CommandHandler).
        def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...
        def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None: ...
        def end_all(self, reason: str, experiment_id: str | None = None) -> list[FaultRecord]: ...
        def _holds(self, experiment_id: str) -> bool: ...
        def _waits_for_start(self, experiment_id: str) -> bool: ...
        def revert_matching(self, cmd: Revert) -> dict[str, FaultState]: ...
        def _start_command(self, cmd: Start) -> Ack: ...
        def heartbeat(self, state: AgentState = "ready") -> Heartbeat: ...
        async def retry_kept(self, why: str) -> None: ...
        def halt_done(self, halt_id: str) -> None: ...
        async def publish(self, subject: str, payload: bytes) -> None: ...

    async def _on_halt(self, msg: Msg) -> None:
        try:
            halt = decode(msg.data, Halt)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed halt: %s", exc)
            return
        if halt.id in self.halts_seen:
            return  # `faultline halt` sends one again until it is confirmed: it is carried out once
        self.halts_seen.append(halt.id)
        self.halt_seq += 1
        hit = self.end_all(f"halt: {halt.reason} (by {halt.issued_by})")
        for rec in hit:
            self.remember(self.ended_experiments, rec.experiment_id, "halted")
        log.warning("HALT from %s: %s; reverting %d fault(s)", halt.issued_by, halt.reason, len(hit))
        retry = self.spawn(self.retry_kept("halt"), name="halt-retry-kept")
        self.spawn(self._report_halted(halt.id, hit, retry), name="halt-heartbeat")

    async def _report_halted(self, halt_id: str, hit: list[FaultRecord], retry: asyncio.Task[None]) -> None:
        """A heartbeat as soon as the halt's reverts, and its retries of kept journal entries, are
        done, naming the halt among ``halts_done``: `faultline halt` confirms from it (a regular
        heartbeat sent meanwhile does not count), not a heartbeat interval later."""
        bound_s = 2 * self.settings.timing.revert_timeout_s + 1.0  # a retry may first wait for a running one
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound_s):
                await asyncio.gather(*(r.finished.wait() for r in hit), asyncio.shield(retry), return_exceptions=True)
        self.halt_done(halt_id)
        if not self.stopping:
            await self.publish(subjects.agent_hb(self.node), encode(self.heartbeat()))

    def _read(self, msg: Msg, model: type[B], exp: str) -> B | None:
        """The broadcast's message, if it decodes and names the experiment of its subject."""
        try:
            cmd = decode(msg.data, model)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed %s on %s: %s", model.__name__.lower(), msg.subject, exc)
            return None
        return cmd if cmd.experiment_id == exp else None

    async def _on_abort(self, msg: Msg) -> None:
        """A broadcast Revert of one experiment (the controller's fast path; per-node Reverts follow)."""
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None:
            return
        if not self._holds(exp):
            # nothing held (yet): a late or retried Inject of this experiment must not apply it
            self.remember(self.ended_experiments, exp, "was aborted")
            return
        cmd = self._read(msg, Revert, exp)
        if cmd is not None:
            self.revert_matching(cmd)  # a broadcast has no one to answer

    async def _on_start(self, msg: Msg) -> None:
        """A broadcast Start of one experiment (the controller's fast path; per-node Starts follow)."""
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None or not self._waits_for_start(exp):
            return  # not ours, or already started: skip the decode
        cmd = self._read(msg, Start, exp)
        if cmd is not None:
            ack = self._start_command(cmd)
            if not ack.accepted:
                log.warning("start of %s not carried out: %s", exp, ack.reason)

    async def _on_lease(self, msg: Msg) -> None:
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None or not self._holds(exp):
            return  # not ours: skip the decode
        if self._read(msg, Lease, exp) is not None:
            self.lease_seen[exp] = time.monotonic()
