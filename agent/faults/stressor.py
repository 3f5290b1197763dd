"""Stressor child processes shared by the cpu and memory faults: spawn, find, kill, measure.

Every stressor carries a marker ``faultline-stressor:<kind>:<agent tag>:<fault id>``
in its argv (``--marker=...``, readable by anyone in /proc) and in its
environment. The agent tag hashes env.node and env.state_dir, so two agents on
one machine (tests run several) never sweep each other's stressors.

Spawning must happen on a long-lived thread (the event loop's): PR_SET_PDEATHSIG
fires when the parent *thread* exits, so a stressor forked from a pool thread
could die with that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import psutil

from agent import cgroups
from agent.faults.base import AgentEnv, Capability, FaultContext, Injector, Plan, Rejected
from agent.faults.stress_marks import (
    MARKER_ARG,
    MARKER_ENV,
    StressorRef,
    agent_tag,
    find_marked,
    make_marker,
    stress_capabilities,
)
from agent.fdwait import readable
from agent.stressor_main import LEASH_EXIT

if TYPE_CHECKING:
    from agent.faults.oomwatch import OomWatch

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
START_TIMEOUT_S = 10.0


_children: dict[int, subprocess.Popen[bytes]] = {}
"""Every stressor this process spawned and has not reaped yet, so that whichever code
path kills one (revert with or without in-memory state, sweep) also reaps it."""
OWNED_SCAN_S = 2.0  # how long a stop whose stressors were all in memory waits to scan for others
# The leash: the agent writes a byte to each stressor's pipe every LEASH_TICK_S; a stressor that
# gets none for its leash (the fault's leaseTimeout, at least LEASH_MIN_S) ends itself. A frozen
# agent (SIGSTOP, a debugger, a stalled event loop) cannot revert, and PDEATHSIG covers only its
# death: without the leash its load would run on to the fault's deadline.
LEASH_TICK_S = 1.0
LEASH_MIN_S = 5.0


class StressorError(Exception):
    """A stressor could not be started or placed; str() is the reason."""


@dataclass
class Stressor:
    """A stressor this agent process started (in memory only; journal-free)."""

    popen: subprocess.Popen[bytes]
    ref: StressorRef
    proc: psutil.Process
    killed_by_us: bool = False
    leash: int | None = None  # the write end of its leash pipe

    @property
    def pid(self) -> int:
        return self.ref.pid

    def feed(self) -> None:
        if self.leash is not None:
            with contextlib.suppress(OSError):  # full (it is stopped) or gone: its own checks decide
                os.write(self.leash, b".")

    def release_leash(self) -> None:
        fd, self.leash = self.leash, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def spawn(
    marker: str, args: Sequence[str], *, until: float = 0.0, core: int | None = None, leash_s: float = 0.0
) -> Stressor:
    """Start one stressor; it stops itself (SIGSTOP) once set up. Call ``start`` to run it.
    ``leash_s`` > 0: it ends itself when the agent has not fed its leash for that long."""
    env = dict(os.environ)
    env[MARKER_ENV] = marker
    argv = [
        sys.executable,
        "-P",  # no working directory on sys.path: a ./agent or ./proto there must not shadow ours
        "-m",
        "agent.stressor_main",
        f"{MARKER_ARG}{marker}",
        f"--parent-pid={os.getpid()}",
        f"--until={until:.3f}",
    ]
    if core is not None:
        argv.append(f"--core={core}")
    read_end, leash = os.pipe() if leash_s > 0 else (None, None)
    if read_end is not None:
        argv += [f"--leash-fd={read_end}", f"--leash-s={leash_s:g}"]
        os.set_blocking(leash, False)  # type: ignore[arg-type]
    argv.extend(args)
    # Own process group: a signal to the agent's group (Ctrl-C, kill -TERM -pgid) leaves
    # stressors to the agent's revert, and killpg reaches a stressor's helpers if it ever has some.
    try:
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            process_group=0,
            close_fds=True,
            pass_fds=(read_end,) if read_end is not None else (),
        )
    except BaseException:
        if leash is not None:
            os.close(leash)
        raise
    finally:
        if read_end is not None:
            os.close(read_end)  # the stressor's end; ours is the write end
    _children[popen.pid] = popen
    try:
        proc = psutil.Process(popen.pid)
        ref = StressorRef(pid=popen.pid, create_time=proc.create_time())
    except psutil.Error as exc:
        popen.kill()
        popen.wait(STOP_TIMEOUT_S)
        _children.pop(popen.pid, None)
        if leash is not None:
            os.close(leash)
        raise StressorError(f"stressor exited at once (code {popen.poll()})") from exc
    return Stressor(popen=popen, ref=ref, proc=proc, leash=leash)


async def start(stressors: Sequence[Stressor], cgroup: cgroups.CgroupTarget | None) -> None:
    """Wait until each stressor has stopped itself, place it in ``cgroup``, then SIGCONT it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(stressors)
    while pending:
        for s in list(pending):
            code = s.popen.poll()
            if code is not None:
                raise StressorError(f"stressor pid {s.pid} exited during start-up with code {code}")
            if _state(s.pid) in ("T", "t"):
                pending.remove(s)
        if pending:
            if time.monotonic() > deadline:
                raise StressorError(f"stressors {[s.pid for s in pending]} did not reach their start point")
            await asyncio.sleep(0.005)
    if cgroup is not None:
        try:
            cgroups.move_pids(cgroup, [s.pid for s in stressors])
        except cgroups.CgroupError as exc:
            raise StressorError(str(exc)) from exc
    for s in stressors:
        os.kill(s.pid, signal.SIGCONT)


def _is_same(ref: StressorRef) -> psutil.Process | None:
    try:
        proc = psutil.Process(ref.pid)
        if abs(proc.create_time() - ref.create_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


async def kill_and_wait(
    refs: Sequence[StressorRef], owned: Sequence[Stressor] = (), timeout_s: float = STOP_TIMEOUT_S
) -> list[int]:
    """SIGKILL each stressor and wait until it has exited (and is reaped, when it is our child).

    Identity is checked by start time through a pidfd, so a recycled pid is
    never signalled. Returns the pids that were still alive and got killed.
    Raises StressorError naming any pid that outlived ``timeout_s``.
    """
    popens = {s.pid: s for s in owned}
    all_refs = {r.pid: r for r in [*(s.ref for s in owned), *refs]}
    killed: list[int] = []
    waits: list[tuple[int, int]] = []
    polled: list[Stressor] = []  # our children killed without a pidfd (none could be opened: EMFILE)
    unopened: list[str] = []
    stuck: list[int] = []
    try:
        for pid, ref in all_refs.items():
            # Our own child, not reaped: its pid cannot have been reused, so no start-time check,
            # which a wall-clock step (psutil derives start times from the boot time, itself derived
            # from the wall clock) would fail, leaving the stressor to the marker scan.
            mine = popens.get(pid)
            unreaped = mine is not None and mine.popen.poll() is None
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError as exc:  # out of descriptors: an unreaped child of ours is killed all the same
                if mine is not None and unreaped:
                    mine.killed_by_us = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    polled.append(mine)
                else:
                    unopened.append(f"{pid} ({exc.strerror or exc})")
                continue
            if not unreaped and _is_same(ref) is None:
                os.close(pidfd)
                continue
            if mine is not None:
                mine.killed_by_us = True
                mine.release_leash()  # dead in a moment: its descriptor is not needed to stop it
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed.append(pid)
            waits.append((pid, pidfd))
        results = await asyncio.gather(*(readable(fd, timeout_s) for _, fd in waits))
        stuck = [pid for (pid, _), ok in zip(waits, results, strict=True) if not ok]
        stuck += await _wait_reaped(polled, timeout_s)
    finally:
        for _, fd in waits:
            os.close(fd)
    for pid in all_refs:
        child = _children.get(pid)
        if child is not None and pid not in stuck:
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
                child.wait(0.5)  # exited already (pidfd said so): this only reaps
            _children.pop(pid, None)
    for s in owned:
        if s.pid not in stuck:
            s.release_leash()
    if stuck:
        raise StressorError(f"stressors {stuck} still alive {timeout_s:.0f}s after SIGKILL")
    if unopened:
        raise StressorError(f"stressors not signalled, no pidfd could be opened: {', '.join(unopened[:10])}")
    return killed


async def _wait_reaped(children: Sequence[Stressor], timeout_s: float) -> list[int]:
    """Poll our killed children until they exit (no pidfd to wait on); the pids still alive."""
    deadline = time.monotonic() + timeout_s
    left = [c for c in children if c.popen.poll() is None]
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        left = [c for c in left if c.popen.poll() is None]
    return [c.pid for c in left]


# --- measurement -------------------------------------------------------------


@dataclass
class CpuSampler:
    """Per-second CPU load of a set of stressors, averaged per worker (percent of one core)."""

    procs: list[psutil.Process]
    interval_s: float = 1.0
    samples: list[float] = field(default_factory=list)

    def _cpu_s(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    async def run(self) -> None:
        prev_cpu, prev_wall = self._cpu_s(), time.monotonic()
        next_at = prev_wall + self.interval_s
        while any(_alive(p) for p in self.procs):  # ends by itself once every stressor is gone
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            cpu, wall = self._cpu_s(), time.monotonic()
            if wall > prev_wall:
                self.samples.append(100.0 * (cpu - prev_cpu) / (wall - prev_wall) / max(1, len(self.procs)))
            prev_cpu, prev_wall = cpu, wall
            next_at += self.interval_s

    def summary(self) -> tuple[float | None, float | None]:
        if not self.samples:
            return None, None
        mean = statistics.fmean(self.samples)
        stdev = statistics.pstdev(self.samples) if len(self.samples) > 1 else 0.0
        return round(mean, 2), round(stdev, 2)


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def rss_bytes(proc: psutil.Process) -> int | None:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return None


# --- shared injector plumbing --------------------------------------------------

UNTIL_GRACE_S = 2.0
"""A stressor exits on its own this long after the fault's deadline: a safety net
behind the agent's timer, late enough that the agent's revert normally measures first."""


class StressPlan(Plan):
    marker: str
    cgroup: str | None = None
    until: float = 0.0
    """Absolute Unix time at which the stressors stop by themselves."""


@dataclass
class Running:
    """In-memory state of one active stress fault (lost on an agent crash; revert copes)."""

    stressors: list[Stressor]
    started_at: float
    cgroup: cgroups.CgroupTarget | None
    monitor: asyncio.Task[None] | None = None
    sampler: CpuSampler | None = None
    leash_s: float = 0.0

    def leash_ended(self) -> bool:
        """A stressor ended itself because the agent stopped feeding its leash (it was frozen)."""
        return any(s.popen.poll() == LEASH_EXIT for s in self.stressors)

    # memory stressors
    peak_rss_bytes: int = 0
    reached_s: float | None = None
    oom_watch: OomWatch | None = None
    exit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exit_code: int | None = None
    oom_killed: bool = False


def leash_note(leash_s: float) -> str:
    return (
        f"stressor(s) ended themselves: the agent did not keep them alive for {leash_s:g} s "
        "(frozen: SIGSTOP, a debugger, a stalled event loop)"
    )


class StressInjector(Injector):
    """Common revert / sweep / probe for injectors whose effect is a set of marked child processes."""

    primary_controller: ClassVar[str]

    def __init__(self, env: AgentEnv) -> None:
        super().__init__(env)
        self.tag = agent_tag(env.node, env.state_dir)
        self._running: dict[str, Running] = {}
        self._leash_task: asyncio.Task[None] | None = None

    def probe(self) -> list[Capability]:
        return stress_capabilities(self.kind)

    def marker_for(self, fault_id: str) -> str:
        return make_marker(self.kind, self.tag, fault_id)

    def resolve_cgroup(self, path: str | None) -> cgroups.CgroupTarget | None:
        if path is None:
            return None
        try:
            return cgroups.resolve(path, self.primary_controller)
        except cgroups.CgroupError as exc:
            raise Rejected(f"cgroup: {exc}") from None

    async def launch(
        self, plan: StressPlan, args: Sequence[Sequence[str]], cores: Sequence[int | None], ctx: FaultContext
    ) -> Running:
        """Spawn one stressor per args entry, place them, start them. On failure nothing is left running."""
        target = self.resolve_cgroup(plan.cgroup)
        leash_s = max(LEASH_MIN_S, ctx.lease_timeout_s or 0.0)
        stressors: list[Stressor] = []
        try:
            for a, core in zip(args, cores, strict=True):
                stressors.append(spawn(plan.marker, a, until=plan.until, core=core, leash_s=leash_s))
            await start(stressors, target)
        except BaseException:
            await asyncio.shield(kill_and_wait([], stressors))
            raise
        running = Running(stressors=stressors, started_at=time.monotonic(), cgroup=target, leash_s=leash_s)
        self._running[plan.marker] = running
        if self._leash_task is None or self._leash_task.done():
            self._leash_task = asyncio.get_running_loop().create_task(self._feed_leashes(), name=f"{self.kind}-leash")
        return running

    async def _feed_leashes(self) -> None:
        """While stressors run: every LEASH_TICK_S, a byte to each (see LEASH_TICK_S)."""
        while self._running:
            for running in list(self._running.values()):
                for s in running.stressors:
                    s.feed()
            await asyncio.sleep(LEASH_TICK_S)

    async def stop(self, plan: StressPlan) -> tuple[Running | None, list[int], float]:
        """Kill every stressor of ``plan`` (ours in memory and any found by marker) and wait for them.

        Returns (in-memory state if any, pids killed, seconds taken).
        """
        t0 = time.monotonic()
        running = self._running.get(plan.marker)
        if running is not None and running.monitor is not None:
            monitor, running.monitor = running.monitor, None
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        owned = running.stressors if running else []
        # Ours in memory first: they need no worker thread, which a stalled disk or a hung
        # lookup may be holding all of, so the load ends on time whatever the scan does.
        killed = await kill_and_wait([], owned) if owned else []
        # a scan of every process: off the event loop (tens of ms on a busy node), for any
        # stressor not in memory (spawned by an agent that died). With ours killed it is a
        # double check, bounded: the fault's load has ended whether or not a thread is free.
        scan = asyncio.to_thread(find_marked, plan.marker)
        if owned:
            try:
                found = (await asyncio.wait_for(scan, OWNED_SCAN_S)).get(plan.marker, [])
            except TimeoutError:
                log.warning(
                    "fault stressors %s killed; the scan for others found no free worker thread within %s s",
                    killed,
                    OWNED_SCAN_S,
                )
                found = []
        else:
            found = (await scan).get(plan.marker, [])
        killed += [pid for pid in await kill_and_wait(found) if pid not in killed]
        self._running.pop(plan.marker, None)  # only once all are gone: a failed stop is retried with them
        return running, killed, time.monotonic() - t0

    def watch(self, plan: StressPlan, running: Running, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.kind}-monitor-{plan.marker}")
        task.add_done_callback(_log_crash)
        running.monitor = task

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        keep = {p.marker for p in journaled if isinstance(p, StressPlan)} | set(self._running)
        prefix = self.marker_for("")
        lines: list[str] = []
        for marker, refs in find_marked(prefix).items():
            if marker in keep:
                continue
            try:
                killed = await kill_and_wait(refs)
            except StressorError as exc:
                lines.append(f"stray {self.kind} stressor of fault {marker[len(prefix) :]}: {exc}")
                continue
            lines.append(
                f"killed stray {self.kind} stressor(s) {killed} of fault {marker[len(prefix) :]} (no journal entry)"
            )
        if lines:
            for line in lines:
                log.warning("sweep: %s", line)
        else:
            log.info("sweep: no stray %s stressors of this agent (tag %s)", self.kind, self.tag)
        return lines


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died: %r", task.get_name(), task.exception())
