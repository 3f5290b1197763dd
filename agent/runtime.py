"""The agent runtime: one asyncio program per node, instantiable many times.

It owns the NATS connection, the journal, the fault records and every
background task (heartbeats, one lifecycle task per fault). There are no
module globals: tests and benchmarks run many runtimes in one process.
The parts live in mixins: commands (agent/commands.py), journal recovery
(recovery.py), each fault's lifecycle (lifecycle.py), the watchdog
(watchdog.py) and the broadcasts every agent hears (broadcasts.py).

Safety paths (see DESIGN.md): each fault has a deadline timer; a watchdog
reverts an experiment's faults when its lease lapses and everything when NATS
has been gone too long; halt reverts everything; stop reverts everything
before the last heartbeat; start reverts whatever the journal holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.broadcasts import Broadcasts
from agent.commands import CommandHandler, PodLookups
from agent.config import AgentSettings
from agent.faults import load_injectors
from agent.faults.base import AgentEnv, Injector
from agent.faults_table import FaultRecord
from agent.journal import Journal
from agent.kept import KeptEntries
from agent.lifecycle import Lifecycle
from agent.nodeload import LoadSampler
from agent.protect import protected_pids
from agent.recovery import Recovery
from agent.stopping import Stopping
from agent.watchdog import Watchdog
from proto import __version__, natstls, subjects
from proto.codec import encode
from proto.messages import (
    HALTS_REMEMBERED,
    AgentState,
    EndedFault,
    FaultEvent,
    FaultState,
    Heartbeat,
    JournalIssue,
    new_id,
)
from proto.natsurl import redacted
from proto.statelock import StateDirBusy, StateLock

if TYPE_CHECKING:
    from agent.keepers import Keepers

log = logging.getLogger("faultline.agent")

NATS_ERROR_REPEAT_S = 60.0  # a NATS error that keeps coming is logged again this often
NATS_UNREACHABLE_REPEAT_S = 20.0  # while NATS cannot be reached, the agent says so this often (not per attempt)

ENDED_IN_HEARTBEATS_S = 120.0
CONTROL_PLANE_TTL_S = 60.0  # NATS servers' resolved addresses are asked again this often (pods move)


def _peer_address(nc: Any) -> tuple[str, int] | None:
    """The address the NATS connection's socket is connected to, if nats-py shows it."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    try:
        peer = writer.get_extra_info("peername") if writer is not None else None
    except Exception:
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class AgentRuntime(CommandHandler, Recovery, KeptEntries, Lifecycle, Watchdog, Broadcasts, Stopping):
    def __init__(
        self,
        settings: AgentSettings,
        injectors: dict[str, Injector] | None = None,
        load_sampler: LoadSampler | None = None,
        journal_executor: Executor | None = None,
    ) -> None:
        """``injectors``, ``load_sampler`` and ``journal_executor`` replace the defaults in tests
        and simulations (a thousand runtimes in one process share one sampler and one pool)."""
        self.settings = settings
        self.node = settings.identity.node
        self.labels = dict(settings.identity.labels)
        self.instance_id = new_id()
        self.started_at = time.time()
        self.journal = Journal(settings.state_dir, journal_executor)
        self.pod_lookups = PodLookups()
        self.state_lock = StateLock(settings.state_dir)
        self.env = AgentEnv(
            node=self.node,
            state_dir=settings.state_dir,
            instance_id=self.instance_id,
            protected_pids=lambda: protected_pids(self.control_plane() or [], settings.safety.protect_pids),
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
        self.journal_issues: dict[str, JournalIssue] = {}  # journal entries kept, not reverted (KeptEntries)
        self.halts_done: deque[str] = deque()
        self.halts_seen: deque[str] = deque(maxlen=HALTS_REMEMBERED)  # carried out, or being carried out
        self.retry_lock = asyncio.Lock()
        self._kept_retry_at = 0.0  # KeptEntries.maybe_retry_kept
        self.recent_ended: deque[EndedFault] = deque(maxlen=200)
        self._ended_raw: list[tuple[str, str, str, FaultState, str | None, float]] = []
        self.rejected_count = 0
        self.halt_seq = 0  # bumped by every halt; an Inject that awaited across one is refused
        self.nc: NATS | None = None
        self._nats_errors: dict[str, tuple[float, int]] = {}  # NATS error text -> when last logged, repeats since
        self._unreachable_told = -math.inf  # when "still cannot reach NATS" was last logged (monotonic)
        self.connected = False
        self.recovery_done = False
        self.nats_lost_since: float | None = time.monotonic()
        self.stop_event = asyncio.Event()
        self.ready_event = asyncio.Event()  # set once connected, recovered and subscribed
        self.stopping = False
        self.previewing = False  # one Preview at a time (CommandHandler._preview)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_events: list[FaultEvent] = []
        self._cleanup: list[tuple[str, str, float, bool]] = []
        self._cleanup_timer: asyncio.TimerHandle | None = None
        self._tombstones_pruned_at = time.monotonic()  # recovery prunes them at start
        self._cleanups: set[asyncio.Task[None]] = set()  # journal bookkeeping in flight
        self.keepers: Keepers | None = None  # the keeper of pause and network faults, made on first use
        self._watchdog_timer: asyncio.TimerHandle | None = None
        self._watchdog_next = math.inf  # monotonic time of the watchdog's next check; none armed
        self._watchdog_closed = False
        self._hb_seq = 0
        self._load = load_sampler or LoadSampler()
        self._cp_cache: dict[str, tuple[float, list[tuple[str, int]]]] = {}
        self._subs: list[Any] = []
        self.subscribed = False  # the server routes our subjects to us (set once subscribe() proved it)
        # a connect-and-subscribe loop is running (at start, or after nats-py closed a client for
        # good): a close meanwhile is its to handle, never a second loop's (two would swap self.nc
        # under each other and could leave a duplicate client subscribed)
        self._connecting = False

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

    def control_plane(self) -> list[tuple[str, int]] | None:
        """(ip, port) of every NATS server this agent may talk to: never cut, never killed. That is
        the one it is connected to (the socket's peer, and its name resolved) and every other
        server of its pool (configured, or advertised by the cluster), which a reconnect may
        pick. None: connected, yet no address is known now (names that do not resolve); a
        network fault is then refused. Names are resolved (DNS: call it from a worker thread) and
        cached for CONTROL_PLANE_TTL_S or until the next reconnect; a lookup that fails is not
        cached, and keeps the addresses the name had before."""
        nc = self.nc
        if nc is None:
            return []  # not connected yet: no command can come in
        urls = []
        connected = getattr(nc, "connected_url", None)
        if connected is not None:
            urls.append(connected)
        with contextlib.suppress(Exception):
            urls += list(nc.servers)
        out: set[tuple[str, int]] = set()
        peer = _peer_address(nc)
        if peer is not None:
            out.add(peer)
        cache = self._cp_cache  # replaced, never cleared, on reconnect: safe from a worker thread
        for url in urls:
            if not url.hostname:
                continue
            key = f"{url.hostname}:{url.port or 4222}"
            cached = cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < CONTROL_PLANE_TTL_S:
                out.update(cached[1])
                continue
            found: set[tuple[str, int]] = set()
            with contextlib.suppress(OSError, UnicodeError):
                for info in socket.getaddrinfo(url.hostname, url.port or 4222, type=socket.SOCK_STREAM):
                    found.add((str(info[4][0]), int(info[4][1])))
            if found:  # a failed lookup is asked again next time, not remembered as "no address"
                cache[key] = (time.monotonic(), sorted(found))
            elif cached is not None:
                found.update(cached[1])  # DNS failing now: the addresses it gave last stay exempt
            out.update(found)
        return sorted(out) if out else None

    def ready(self) -> tuple[bool, str]:
        if not self.recovery_done:
            return False, "journal recovery not done"
        if not self.connected:
            return False, "not connected to NATS"
        if not self.subscribed:
            return False, "connected to NATS, not yet subscribed"
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
        kept, kept_total = self.journal_issues_for_heartbeat()
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
            journal_issues=kept,
            journal_issues_total=kept_total,
            halts_done=list(self.halts_done),
            ended=self.ended_faults(ended_since),
        )

    # --- NATS ----------------------------------------------------------------

    async def connect(self) -> bool:
        """Connect, retrying until connected (True) or asked to stop (False).

        nats-py retries a first connect by itself, for ever (max_reconnect_attempts=-1), so a
        stop request is raced against it: an agent that cannot reach NATS still stops at once
        on SIGTERM (a rollout or ``systemctl stop`` while NATS is down)."""
        nats_cfg = self.settings.nats
        delay = nats_cfg.reconnect_wait_s
        tls = nats_cfg.tls().context(nats_cfg.urls)  # checked at start (agent/main.py): None without TLS
        while not self.stop_event.is_set():
            if tls is not None:
                try:  # read again each attempt: the files may have been rotated while NATS was away
                    tls = nats_cfg.tls().context(nats_cfg.urls) or tls
                except natstls.TlsSettingsError as exc:
                    log.warning("TLS files cannot be used now (%s); keeping the ones loaded before", exc)
            nc = natstls.client(require_tls=tls is not None, tls_files=nats_cfg.tls(), servers=nats_cfg.urls)
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
                "closed_cb": functools.partial(self._on_closed, nc),
            }
            if tls is not None:
                options["tls"] = tls
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
                log.warning(
                    "cannot reach NATS at %s: %s; retrying", redacted(",".join(nats_cfg.urls)), redacted(str(exc))
                )
                self._still_unreachable(redacted(str(exc) or type(exc).__name__))
                delay = await self._close_and_wait(nc, delay)
                continue
            self.nc = nc
            self.connected = True
            self.nats_lost_since = None
            return True
        return False

    async def _close_and_wait(self, nc: Any, delay: float) -> float:
        """Close a client given up on, wait ``delay`` (or until asked to stop); the next delay."""
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), delay)
        return min(delay * 2, 5.0)

    async def _on_disconnected(self) -> None:
        if self.connected and not self.stopping:
            log.warning("lost NATS connection")
        self.connected = False
        self.nats_lost_since = time.monotonic()
        self.poke_watchdog(self.nats_lost_since + self.settings.timing.nats_lost_timeout_s)

    async def _on_closed(self, nc: Any) -> None:
        """nats-py gives up on a connection for good on some server errors (an -ERR such as
        'Authorization Violation' or 'Maximum Connections Exceeded'), whatever the reconnect
        settings: the agent would stay cut off, unready, until restarted. Connect afresh instead
        (its faults meanwhile: the NATS-lost watchdog reverts them, as for any loss)."""
        if nc is not self.nc or self.stopping or self.stop_event.is_set():
            return  # our own close (a stop, a failed attempt), or a client already replaced
        self.connected = False
        self.subscribed = False
        if self.nats_lost_since is None:
            self.nats_lost_since = time.monotonic()
            self.poke_watchdog(self.nats_lost_since + self.settings.timing.nats_lost_timeout_s)
        why = redacted(str(getattr(nc, "last_error", None) or "closed"))
        log.error("NATS closed the connection for good (%s); connecting again", why)
        if self._connecting:
            return  # the loop running now sees its subscribe fail, and connects afresh
        self.spawn(self._connect_again(), name="nats-connect-again")

    async def _connect_again(self) -> None:
        if await self.connect_subscribed():
            self._flush_pending()
            log.info("connected to NATS again")

    async def connect_subscribed(self) -> bool:
        """A fresh client, subscribed (True), or none because the agent stops (False): one whose
        subscriptions failed would look ready while commands, halts and leases went unheard.
        Retried until it works. One such loop at a time (see _connecting)."""
        assert not self._connecting, "a second connect-and-subscribe loop"
        self._connecting = True
        try:
            delay = self.settings.nats.reconnect_wait_s
            while not self.stop_event.is_set():
                self._subs.clear()
                self._cp_cache = {}
                if not await self.connect():
                    return False  # stopping
                try:
                    await self.subscribe()
                except Exception as exc:
                    log.warning("subscribing on the NATS connection failed (%s); connecting again", exc)
                    nc, self.nc = self.nc, None  # not ours any more: its close must not start another round
                    self.connected = False
                    delay = await self._close_and_wait(nc, delay)
                    continue
                self.subscribed = True
                return True
            return False
        finally:
            self._connecting = False

    async def _on_reconnected(self) -> None:
        self.connected = True
        self.nats_lost_since = None
        self._cp_cache = {}
        url = getattr(self.nc, "connected_url", None)
        log.info("reconnected to NATS at %s", f"{url.hostname}:{url.port}" if url is not None else "?")
        self._flush_pending()

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed attempt (every reconnect_wait_s, for as long as NATS is
        # away): the same error is logged once, then once a minute with how often it came
        # (keyed by the text: with several servers their errors alternate)
        text = redacted(str(exc) or type(exc).__name__)
        now = time.monotonic()
        since, repeats = self._nats_errors.get(text, (-math.inf, 0))
        if now - since >= NATS_ERROR_REPEAT_S:
            more = f" (and {repeats} more time(s) since the last report)" if repeats else ""
            where = ", ".join(redacted(u) for u in self.settings.nats.urls)
            log.warning("NATS (%s): %s%s", where, text, more)
            self._nats_errors[text] = (now, 0)
            if len(self._nats_errors) > 64:  # texts carry addresses: bounded all the same
                del self._nats_errors[next(iter(self._nats_errors))]
        else:
            self._nats_errors[text] = (since, repeats + 1)
        self._still_unreachable(text)

    def _still_unreachable(self, last_error: str) -> None:
        """While there is no NATS connection, say so every NATS_UNREACHABLE_REPEAT_S, with for how
        long and the last error: the error lines above come once per distinct text, so without this
        an agent retrying for minutes looks the same as one that gave up."""
        if self.connected or self.stopping or self.nats_lost_since is None:
            return
        now = time.monotonic()
        if now - max(self.nats_lost_since, self._unreachable_told) < NATS_UNREACHABLE_REPEAT_S:
            return
        self._unreachable_told = now
        log.warning(
            "still cannot reach NATS at %s after %.0fs (last error: %s); retrying every %gs or so",
            ", ".join(redacted(u) for u in self.settings.nats.urls),
            now - self.nats_lost_since,
            last_error,
            self.settings.nats.reconnect_wait_s,
        )

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
        # nats-py runs one subscription's callbacks one after the other; a preview scans every
        # process (a second or more on a busy node), so it answers from a task of its own and the
        # Injects, Starts and Reverts behind it are not held up. (Found by its shape: this is only
        # about waiting, handle_command decodes and checks it like any command.)
        if b'"type":"preview"' in msg.data:
            self.spawn(self._answer(msg, preview_only=True), name="preview")
        else:
            await self._answer(msg)

    async def _answer(self, msg: Msg, preview_only: bool = False) -> None:
        payload = await self.handle_command(msg.data, preview_only)
        if msg.reply:
            await self.publish(msg.reply, payload)

    # --- loops ---------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        interval = self.settings.timing.heartbeat_interval_s
        # plain sleeps: shutdown() cancels this task, and a wait_for per tick costs a task each
        while True:
            if not self.stopping:  # the last word is shutdown()'s "leaving" heartbeat
                try:
                    payload = encode(self.heartbeat())
                except Exception:  # one bad tick (a /proc read failing: EMFILE, ENOMEM) is not the end of them
                    log.exception("heartbeat not sent this time")
                else:
                    await self.publish(subjects.agent_hb(self.node), payload)
                if self.journal_issues:
                    self.maybe_retry_kept()
            # a little jitter spreads a fleet's heartbeats over time
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    # --- main ----------------------------------------------------------------

    async def run(self) -> int:
        """The agent's life; returns the exit code (2: another agent holds the state directory)."""
        try:
            # before the journal: an agent still stopping on this directory keeps its faults
            wait_s = self.settings.timing.stop_timeout_s + 5.0
            busy = functools.partial(self._lock_busy, wait_s=wait_s)
            if not await self.state_lock.acquire(wait_s, busy, give_up=self.stop_event.is_set):
                return 0  # stopped while waiting: nothing held, nothing to revert
        except StateDirBusy as exc:
            log.error("%s", exc)
            return 2
        try:
            await self.probe()
            await self.recover()
            if not await self.connect_subscribed():
                return 0  # stopped before it could subscribe: recovery left nothing held
            self._flush_pending()
            self.spawn(self.heartbeat_loop(), name="heartbeat")
            log.info("faultline-agent ready node=%s pid=%d instance=%s", self.node, os.getpid(), self.instance_id)
            self.ready_event.set()
            await self.stop_event.wait()
            await self.shutdown()
            return 0
        finally:
            self.state_lock.release()
            self.journal.close()
            self.pod_lookups.close()

    def _lock_busy(self, holder: str, wait_s: float) -> None:
        log.warning(
            "state directory %s is held by another faultline-agent (%s); waiting up to %gs "
            "(timing.stop_timeout_s + 5) for it to stop, then exiting 2",
            self.settings.state_dir,
            holder,
            wait_s,
        )
