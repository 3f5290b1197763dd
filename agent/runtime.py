"""The agent runtime: one asyncio program per node, instantiable many times.

It owns the NATS connection, the journal, the fault records and every
background task (heartbeats, watchdog, one lifecycle task per fault). There
are no module globals: tests and benchmarks run many runtimes in one process.

Safety paths (see DESIGN.md): each fault has a deadline timer; a watchdog
reverts an experiment's faults when its lease lapses and everything when NATS
has been gone too long; halt reverts everything; stop reverts everything
before the last heartbeat; start reverts whatever the journal holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.commands import CommandHandler
from agent.config import AgentSettings
from agent.faults import load_injectors
from agent.faults.base import AgentEnv, FaultContext, Injector
from agent.faults_table import FaultRecord, merge
from agent.journal import Journal
from agent.nodeload import LoadSampler
from agent.protect import protected_pids
from agent.recovery import Recovery
from proto import __version__, subjects
from proto.codec import DecodeError, decode, encode
from proto.messages import (
    AgentState,
    EndedFault,
    FaultEvent,
    FaultState,
    Halt,
    Heartbeat,
    Lease,
    Measurements,
    Revert,
    Start,
    new_id,
)

log = logging.getLogger("faultline.agent")

MAX_REMEMBERED = 4096
ENDED_IN_HEARTBEATS_S = 120.0
REVERT_ATTEMPTS = 3
JOURNAL_CLEANUP_DELAY_S = 0.5
JOURNAL_SETTLE_S = 2.0  # a stop waits this long at most for journal bookkeeping in flight
REVERT_BACKOFF_S = 1.0
WATCHDOG_SLACK_S = 0.005
INJECTING_EVENT_AFTER_S = 0.2  # an injection still going after this long says so ("injecting")


def release_startup_memory() -> None:
    """Hand start-up garbage (imports, schema builds, the probe) back to the OS.

    An agent runs on every node for months; what its start-up left on the
    heap would otherwise count against the node for as long. What survives
    (modules, models, schemas, the connection) lives as long as the process,
    so it is frozen out of the cyclic collector's passes: a collection then
    walks only what the agent made since, and never pauses the loop long.
    """
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere a no-op


class AgentRuntime(CommandHandler, Recovery):
    def __init__(
        self,
        settings: AgentSettings,
        injectors: dict[str, Injector] | None = None,
        load_sampler: LoadSampler | None = None,
    ) -> None:
        """``injectors`` and ``load_sampler`` replace the defaults in tests and simulations
        (a thousand runtimes in one process share one sampler)."""
        self.settings = settings
        self.node = settings.identity.node
        self.labels = dict(settings.identity.labels)
        self.instance_id = new_id()
        self.started_at = time.time()
        self.journal = Journal(settings.state_dir)
        self.env = AgentEnv(
            node=self.node,
            state_dir=settings.state_dir,
            instance_id=self.instance_id,
            protected_pids=lambda: protected_pids(self.control_plane(), settings.safety.protect_pids),
            deny_patterns=tuple(settings.safety.deny),
            control_plane=self.control_plane,
            exempt_cidrs=tuple(settings.safety.exempt),
            memory_reserve_percent=settings.safety.memory_reserve_percent,
        )
        if injectors is None:
            self.injectors, self.unsupported = load_injectors(self.env)
        else:
            self.injectors, self.unsupported = injectors, {}
        self.capabilities: list[str] = []
        self.capability_notes: dict[str, str] = dict(self.unsupported)
        self.faults: dict[str, FaultRecord] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        self.ended_experiments: OrderedDict[str, str] = OrderedDict()
        self.lease_seen: dict[str, float] = {}
        self.recovered: list[str] = []
        self.recent_ended: deque[EndedFault] = deque(maxlen=200)
        self.rejected_count = 0
        self.halt_seq = 0  # bumped by every halt; an Inject that awaited across one is refused
        self.nc: NATS | None = None
        self.connected = False
        self.recovery_done = False
        self.nats_lost_since: float | None = time.monotonic()
        self.stop_event = asyncio.Event()
        self.ready_event = asyncio.Event()  # set once connected, recovered and subscribed
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_events: list[FaultEvent] = []
        self._cleanup: list[tuple[str, str, float, bool]] = []
        self._cleanup_timer: asyncio.TimerHandle | None = None
        self._cleanups: set[asyncio.Task[None]] = set()  # journal bookkeeping in flight
        self._watchdog_timer: asyncio.TimerHandle | None = None
        self._watchdog_next = math.inf  # monotonic time of the watchdog's next check; none armed
        self._watchdog_closed = False
        self._hb_seq = 0
        self._load = load_sampler or LoadSampler()
        self._cp_cache: dict[str, list[tuple[str, int]]] = {}
        self._subs: list[Any] = []

    # --- owned tasks -------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s died: %r", task.get_name(), task.exception(), exc_info=task.exception())

    # --- facts -------------------------------------------------------------

    def control_plane(self) -> list[tuple[str, int]]:
        """(ip, port) of the NATS server we are connected to: never cut, never killed."""
        nc = self.nc
        url = getattr(nc, "connected_url", None) if nc is not None else None
        if url is None:
            return []
        key = f"{url.hostname}:{url.port}"
        if key not in self._cp_cache:
            addrs: list[tuple[str, int]] = []
            with contextlib.suppress(OSError):
                for info in socket.getaddrinfo(url.hostname, url.port or 4222, type=socket.SOCK_STREAM):
                    addrs.append((str(info[4][0]), int(info[4][1])))
            self._cp_cache[key] = sorted(set(addrs))
        return self._cp_cache[key]

    def ready(self) -> tuple[bool, str]:
        if not self.recovery_done:
            return False, "journal recovery not done"
        if not self.connected:
            return False, "not connected to NATS"
        if self.stopping:
            return False, "stopping"
        return True, "ready"

    def request_stop(self) -> None:
        self.stop_event.set()

    # --- publishing --------------------------------------------------------

    async def publish(self, subject: str, payload: bytes) -> None:
        nc = self.nc
        if nc is None or not self.connected:
            return
        try:
            await nc.publish(subject, payload)
        except Exception as exc:  # a publish failure must never take a fault path down
            log.warning("publish to %s failed: %s", subject, exc)

    def _fault_event(self, rec: FaultRecord, state: FaultState, reason: str | None) -> FaultEvent:
        return FaultEvent(
            experiment_id=rec.experiment_id,
            fault_id=rec.fault_id,
            node=self.node,
            kind=rec.kind,
            state=state,
            reason=reason,
            measurements=rec.measurements,
        )

    def event(self, rec: FaultRecord, state: FaultState, reason: str | None = None) -> None:
        """From synchronous code (an injector's progress callback): published by a task."""
        self.publish_event(self._fault_event(rec, state, reason))

    async def send_event(self, rec: FaultRecord, state: FaultState, reason: str | None = None) -> None:
        """From the lifecycle: published in place, no task of its own (a fleet-wide abort ends
        a thousand faults at once, and each task costs more than the publish)."""
        ev = self._fault_event(rec, state, reason)
        if not self.connected:
            self._hold_event(ev)
            return
        await self.publish(subjects.exp_events(ev.experiment_id), encode(ev))

    def publish_event(self, ev: FaultEvent) -> None:
        if not self.connected:
            self._hold_event(ev)
            return
        self.spawn(self.publish(subjects.exp_events(ev.experiment_id), encode(ev)), name="publish-event")

    def _hold_event(self, ev: FaultEvent) -> None:
        """Kept while NATS is away and sent on reconnect, newest 1000."""
        self._pending_events.append(ev)
        del self._pending_events[:-1000]

    def heartbeat(self, state: AgentState = "ready") -> Heartbeat:
        self._hb_seq += 1
        ended_since = time.time() - ENDED_IN_HEARTBEATS_S
        return Heartbeat(
            node=self.node,
            instance_id=self.instance_id,
            version=__version__,
            labels=self.labels,
            capabilities=self.capabilities,
            capability_notes=self.capability_notes,
            state=state,
            interval_s=self.settings.timing.heartbeat_interval_s,
            seq=self._hb_seq,
            started_at=self.started_at,
            load=self._load.sample(),
            faults=[r.view() for r in self.faults.values()],
            recovered=self.recovered[-50:],
            ended=[e for e in self.recent_ended if e.at > ended_since],
        )

    # --- fault lifecycle ---------------------------------------------------

    def make_context(
        self, fault_id: str, experiment_id: str, deadline: float, pods: Any, recovered: bool = False
    ) -> FaultContext:
        def emit(state: FaultState, m: Measurements, reason: str | None) -> None:
            rec = self.faults.get(fault_id)
            if rec is not None:
                rec.measurements = merge(rec.measurements, m)
                self.event(rec, state, reason)

        return FaultContext(
            fault_id=fault_id,
            experiment_id=experiment_id,
            deadline=deadline,
            pods=pods,
            env=self.env,
            emit=emit,
            recovered=recovered,
        )

    def launch(self, rec: FaultRecord) -> None:
        """Start an accepted fault's lifecycle: at once, on its Start, or (ended while it
        waited for its Start) only to report the end, applying nothing. Idempotent."""
        rec.on_end = None
        if rec.task is not None:
            return
        if not rec.ended.is_set():
            rec.set_state("injecting")
            # the agent's own deadline timer (invariant 1); the watchdog double-checks
            rec.timer = asyncio.get_running_loop().call_at(
                rec.deadline_mono, rec.request_end, "deadline reached", "expired"
            )
        else:
            rec.end_reason = f"{rec.end_reason or 'ended'} before its start: nothing was applied"
        rec.task = self.spawn(self.lifecycle(rec), name=f"fault:{rec.fault_id}")

    async def lifecycle(self, rec: FaultRecord) -> None:
        inj, ctx, spec = rec.injector, rec.ctx, rec.cmd.spec
        timing = self.settings.timing
        failure: str | None = None
        try:
            if not rec.ended.is_set():
                rec.set_state("injecting")
                t0 = time.monotonic()
                # "injecting" is news only when the injection takes a while (a memory ramp, a slow
                # netlink call): one that is done sooner goes straight to "active", with apply_s.
                # At a thousand nodes that is a thousand fewer events for the controller to read.
                slow = asyncio.get_running_loop().call_later(INJECTING_EVENT_AFTER_S, self._still_injecting, rec)
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for costs a task per call
                    async with asyncio.timeout(timing.revert_timeout_s):
                        plan = await inj.plan(spec, ctx)
                    rec.plan = plan
                    try:
                        await asyncio.to_thread(self.journal.write, rec.journal_entry(plan))  # journal before act
                    except OSError as exc:
                        raise RuntimeError(f"journal write failed, not acting: {exc}") from exc
                    if not rec.ended.is_set():
                        async with asyncio.timeout(timing.revert_timeout_s):
                            m = await inj.apply(spec, plan, ctx)
                        rec.measurements = merge(rec.measurements, m).model_copy(
                            update={"apply_s": round(time.monotonic() - t0, 4)}
                        )
                        if not rec.ended.is_set():
                            rec.set_state("active")
                            await self.send_event(rec, "active")
                finally:
                    slow.cancel()
        except TimeoutError:
            failure = f"inject timed out after {timing.revert_timeout_s}s"
        except Exception as exc:
            failure = str(exc) or type(exc).__name__
            if not isinstance(exc, self._expected_failures()):
                log.exception("fault %s failed to inject", rec.fault_id)
        if failure is not None:
            log.warning("fault %s failed: %s", rec.fault_id, failure)
            rec.request_end(failure, "failed")
        await rec.ended.wait()
        await self._revert(rec)

    def _still_injecting(self, rec: FaultRecord) -> None:
        self.spawn(self._report_injecting(rec), name="injecting-event")

    async def _report_injecting(self, rec: FaultRecord) -> None:
        # checked and published in one step: an "active" sent meanwhile is never followed by this
        if rec.state == "injecting" and not rec.ended.is_set():
            await self.send_event(rec, "injecting")

    @staticmethod
    def _expected_failures() -> tuple[type[BaseException], ...]:
        from agent.faults.base import Rejected

        return (Rejected,)

    async def _revert(self, rec: FaultRecord) -> None:
        rec.set_state("reverting")
        error: str | None = None
        t0 = time.monotonic()
        if rec.plan is not None:
            error = await self._revert_with_retries(rec)
        rec.measurements = rec.measurements.model_copy(update={"revert_s": round(time.monotonic() - t0, 4)})
        state: FaultState = "failed" if error else rec.end_state
        reason = rec.end_reason or "reverted"
        if error:
            reason = f"{reason}; revert failed: {error}"
        try:
            rec.injector.release(rec.ctx)  # whatever check() set aside for it, also when it never got a plan
        except Exception:  # an injector's bookkeeping must not stop the end of a fault
            log.exception("release of %s failed", rec.fault_id)
        rec.set_state(state)
        self.faults.pop(rec.fault_id, None)
        if not self._holds(rec.experiment_id):
            self.lease_seen.pop(rec.experiment_id, None)  # an agent lives for months: no per-experiment residue
        self.remember(self.ended, rec.fault_id, state)
        self.record_end(rec.fault_id, rec.experiment_id, rec.kind, state, reason)
        # The event first: the system is already back. Dropping the journal entry is
        # bookkeeping, and a crash before it only repeats an idempotent revert at start.
        await self.send_event(rec, state, reason)
        log.info("fault %s %s: %s", rec.fault_id, state, reason)
        # a failed revert keeps its journal entry: the next start retries it
        self._queue_cleanup(rec.fault_id, state, rec.cmd.expires_at, not error)
        rec.finished.set()

    def _queue_cleanup(self, fault_id: str, state: str, expires_at: float, remove: bool) -> None:
        """Journal bookkeeping after a revert, batched and a moment later: when a halt or an
        abort ends many faults at once, their reports go out first and the files follow in
        one worker-thread call. Until then the entry stays: a crash in that moment only
        repeats an idempotent revert at start."""
        self._cleanup.append((fault_id, state, expires_at, remove))
        if self.stopping:
            self._start_cleanup()
        elif self._cleanup_timer is None:
            # a timer, not a sleeping task: an abort ending a fault pays for no task
            self._cleanup_timer = asyncio.get_running_loop().call_later(JOURNAL_CLEANUP_DELAY_S, self._start_cleanup)

    def _start_cleanup(self) -> None:
        self._cleanup_timer = None
        if self._cleanup:
            task = self.spawn(self.flush_cleanup(), name="journal-cleanup")
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def settle_journal(self, timeout_s: float) -> None:
        """Finish the journal bookkeeping queued or in flight. A stop waits for it: its tasks are
        cancelled afterwards, and a cancelled worker-thread call that has not started never runs
        (entries of reverted faults would be left for the next start to revert again)."""
        if self._cleanup_timer is not None:
            self._cleanup_timer.cancel()
            self._cleanup_timer = None
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=timeout_s)
        await self.flush_cleanup()

    async def flush_cleanup(self) -> None:
        batch, self._cleanup = self._cleanup, []
        if not batch:
            return
        try:
            await asyncio.to_thread(self.journal.finish_many, batch)
        except OSError as exc:
            log.error("journal bookkeeping failed (%s); the next start reverts those faults again", exc)

    async def _revert_with_retries(self, rec: FaultRecord) -> str | None:
        """Revert, retried with backoff: a transient failure (netlink busy, a stressor slow to die)
        must not leave the fault in place until the next start. One attempt while stopping,
        to stay inside the stop bound; the journal keeps what still failed."""
        assert rec.plan is not None
        attempts = 1 if self.stopping else REVERT_ATTEMPTS
        error: str | None = None
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.settings.timing.revert_timeout_s):
                    m = await rec.injector.revert(rec.plan, rec.ctx)
                rec.measurements = merge(rec.measurements, m)
                return None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                final = attempt == attempts
                log.error(
                    "fault %s: REVERT FAILED (attempt %d of %d): %s%s",
                    rec.fault_id,
                    attempt,
                    attempts,
                    error,
                    " (journal entry kept; retried at next start)" if final else "",
                )
                if not final:
                    await asyncio.sleep(REVERT_BACKOFF_S * 2 ** (attempt - 1))
        return error

    def record_end(self, fault_id: str, experiment_id: str, kind: str, state: FaultState, reason: str | None) -> None:
        self.recent_ended.append(
            EndedFault(
                fault_id=fault_id, experiment_id=experiment_id, kind=kind, state=state, reason=reason, at=time.time()
            )
        )

    def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_REMEMBERED:
            table.popitem(last=False)

    def end_all(self, reason: str, experiment_id: str | None = None) -> list[FaultRecord]:
        hit = []
        for rec in list(self.faults.values()):
            if experiment_id is None or rec.experiment_id == experiment_id:
                rec.request_end(reason)
                hit.append(rec)
        return hit

    # --- NATS ----------------------------------------------------------------

    async def connect(self) -> bool:
        """Connect, retrying until connected (True) or asked to stop (False).

        nats-py retries a first connect by itself, for ever (max_reconnect_attempts=-1), so a
        stop request is raced against it: an agent that cannot reach NATS still stops at once
        on SIGTERM (a rollout or ``systemctl stop`` while NATS is down)."""
        nats_cfg = self.settings.nats
        delay = nats_cfg.reconnect_wait_s
        while not self.stop_event.is_set():
            nc = NATS()
            options: dict[str, Any] = {  # nats-py annotates the timeouts as int; it takes float seconds
                "servers": nats_cfg.urls,
                "name": f"faultline-agent/{self.node}",
                "connect_timeout": nats_cfg.connect_timeout_s,
                "allow_reconnect": True,
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": nats_cfg.reconnect_wait_s,
                "ping_interval": 2,
                "max_outstanding_pings": 2,
                "disconnected_cb": self._on_disconnected,
                "reconnected_cb": self._on_reconnected,
                "error_cb": self._on_error,
            }
            attempt = asyncio.create_task(nc.connect(**options), name="nats-connect")
            stop = asyncio.create_task(self.stop_event.wait(), name="nats-connect-stop")
            try:
                await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if not attempt.done():
                # stopping: give up the connection in progress, and close what it opened (a socket
                # mid-handshake; or a client whose connect completed as it was cancelled)
                attempt.cancel()
                await asyncio.wait({attempt}, timeout=1.0)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 1.0)
                return False
            try:
                attempt.result()
            except Exception as exc:
                log.warning("cannot reach NATS at %s: %s; retrying", ",".join(nats_cfg.urls), exc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self.nc = nc
            self.connected = True
            self.nats_lost_since = None
            return True
        return False

    async def _on_disconnected(self) -> None:
        if self.connected and not self.stopping:
            log.warning("lost NATS connection")
        self.connected = False
        self.nats_lost_since = time.monotonic()
        self.poke_watchdog(self.nats_lost_since + self.settings.timing.nats_lost_timeout_s)

    async def _on_reconnected(self) -> None:
        self.connected = True
        self.nats_lost_since = None
        self._cp_cache.clear()
        log.info("reconnected to NATS at %s", getattr(self.nc, "connected_url", None))
        self._flush_pending()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc)

    def _flush_pending(self) -> None:
        pending, self._pending_events = self._pending_events, []
        for ev in pending:
            self.publish_event(ev)

    async def subscribe(self) -> None:
        assert self.nc is not None
        self._subs.append(await self.nc.subscribe(subjects.agent_cmd(self.node), cb=self._on_cmd))
        self._subs.append(await self.nc.subscribe(subjects.HALT, cb=self._on_halt))
        self._subs.append(await self.nc.subscribe(subjects.ALL_LEASES, cb=self._on_lease))
        self._subs.append(await self.nc.subscribe(subjects.ALL_ABORTS, cb=self._on_abort))
        self._subs.append(await self.nc.subscribe(subjects.ALL_STARTS, cb=self._on_start))
        # "ready" must mean the server routes commands to us. nats-py writes a flush's PING
        # straight to the socket, ahead of the SUBs still in its send buffer, so one PONG
        # does not prove the server has them (CI once got "no responders" right after
        # "ready"). The second PING leaves after the first PONG, by when the buffer is out.
        await self.nc.flush(timeout=5)
        await self.nc.flush(timeout=5)

    async def _on_cmd(self, msg: Msg) -> None:
        payload = await self.handle_command(msg.data)
        if msg.reply:
            await self.publish(msg.reply, payload)

    async def _on_halt(self, msg: Msg) -> None:
        try:
            halt = decode(msg.data, Halt)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed halt: %s", exc)
            return
        self.halt_seq += 1
        hit = self.end_all(f"halt: {halt.reason} (by {halt.issued_by})")
        for rec in hit:
            self.remember(self.ended_experiments, rec.experiment_id, "halted")
        log.warning("HALT from %s: %s; reverting %d fault(s)", halt.issued_by, halt.reason, len(hit))
        self.spawn(self._report_halted(hit), name="halt-heartbeat")

    async def _report_halted(self, hit: list[FaultRecord]) -> None:
        """A heartbeat as soon as the halt's reverts are done: `faultline halt` confirms from it,
        not a heartbeat interval later."""
        if hit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timing.revert_timeout_s):
                    await asyncio.gather(*(r.finished.wait() for r in hit))
        if not self.stopping:
            await self.publish(subjects.agent_hb(self.node), encode(self.heartbeat()))

    def _holds(self, experiment_id: str) -> bool:
        return any(r.experiment_id == experiment_id for r in self.faults.values())

    async def _on_abort(self, msg: Msg) -> None:
        """A broadcast Revert of one experiment (the controller's fast path; per-node Reverts follow)."""
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None:
            return
        if not self._holds(exp):
            # nothing held (yet): a late or retried Inject of this experiment must not apply it
            self.remember(self.ended_experiments, exp, "was aborted")
            return
        try:
            cmd = decode(msg.data, Revert)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed abort on %s: %s", msg.subject, exc)
            return
        if cmd.experiment_id == exp:
            self._revert_command(cmd)

    def _waits_for_start(self, experiment_id: str) -> bool:
        return any(r.experiment_id == experiment_id and r.waiting for r in self.faults.values())

    async def _on_start(self, msg: Msg) -> None:
        """A broadcast Start of one experiment (the controller's fast path; per-node Starts follow)."""
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None or not self._waits_for_start(exp):
            return  # not ours, or already started: skip the decode
        try:
            cmd = decode(msg.data, Start)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed start on %s: %s", msg.subject, exc)
            return
        if cmd.experiment_id == exp:
            ack = self._start_command(cmd)
            if not ack.accepted:
                log.warning("start of %s not carried out: %s", exp, ack.reason)

    async def _on_lease(self, msg: Msg) -> None:
        exp = subjects.experiment_from_subject(msg.subject)
        if exp is None or not self._holds(exp):
            return  # not ours: skip the decode
        try:
            lease = decode(msg.data, Lease)
        except DecodeError as exc:
            self.rejected_count += 1
            log.warning("ignored malformed lease on %s: %s", msg.subject, exc)
            return
        if lease.experiment_id == exp:
            self.lease_seen[exp] = time.monotonic()

    # --- loops ---------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        interval = self.settings.timing.heartbeat_interval_s
        # plain sleeps: shutdown() cancels this task, and a wait_for per tick costs a task each
        while True:
            if not self.stopping:  # the last word is shutdown()'s "leaving" heartbeat
                await self.publish(subjects.agent_hb(self.node), encode(self.heartbeat()))
            # a little jitter spreads a fleet's heartbeats over time
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

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
        if due < self._watchdog_next:
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
        try:
            self.check_leases()
        except Exception:  # the watchdog must outlive any bug in one check
            log.exception("watchdog check failed; checking again in %gs", self.settings.timing.watchdog_interval_s)
        if self.faults and not self._watchdog_closed:
            self._arm_watchdog(self.next_check_in())

    def stop_watchdog(self) -> None:
        self._watchdog_closed = True
        if self._watchdog_timer is not None:
            self._watchdog_timer.cancel()
            self._watchdog_timer = None

    # --- main ----------------------------------------------------------------

    async def run(self) -> int:
        await self.probe()
        await self.recover()
        if not await self.connect():
            return 0
        await self.subscribe()
        self._flush_pending()
        self.spawn(self.heartbeat_loop(), name="heartbeat")
        log.info("faultline-agent ready node=%s pid=%d instance=%s", self.node, os.getpid(), self.instance_id)
        self.ready_event.set()
        await self.stop_event.wait()
        await self.shutdown()
        return 0

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
