"""process-kill and process-pause.

Selection happens once, in plan(): the journaled plan lists every target pid
with its create time, so a revert after a crash (SIGCONT) reaches exactly the
processes that were paused and never a newcomer that reused a pid.

A process is held by at most one pause fault of an agent: the pause injector
(one instance per agent) records which processes each fault holds, from its
plan to its revert. Another pause fault that selects such a process skips it,
and a revert never resumes a process that another fault still holds. Without
this, the shorter of two overlapping pauses would resume the process under
the longer one, whose report would still claim it was paused throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
from pydantic import Field

from agent.faults.base import FaultContext, Injector, Plan, Rejected
from agent.protect import protection_reason
from proto.faults import ProcessKillSpec, ProcessMatch
from proto.messages import Measurements, PreviewedProcess, PreviewResult, SkippedProcess

log = logging.getLogger(__name__)

_ATTRS = ["pid", "name", "cmdline", "username", "create_time", "status"]
WATCH_INTERVAL_S = 0.1


class Target(Plan):
    pid: int
    create_time: float
    name: str


class ProcessPlan(Plan):
    kind: str
    targets: list[Target]
    matched_pids: list[int]
    skipped: list[SkippedProcess] = Field(default_factory=list)
    signal: int
    applied_at: float | None = None


def psutil_now() -> float:
    """Now, on psutil's create_time clock (boot time + uptime).

    psutil derives create_time from /proc/stat's whole-second btime, so it can
    be up to a second off time.time(); comparing against this clock instead
    makes "restarted N s after the kill" exact to the kernel's tick.
    """
    try:
        with open("/proc/uptime") as f:
            return psutil.boot_time() + float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()


CMDLINE_MATCH_TIMEOUT_S = 0.05
"""Longest one command line may take to match ``match.cmdline``. A pattern that backtracks
catastrophically is refused rather than run: stdlib ``re`` holds the interpreter lock while it
matches, so it would freeze the agent (heartbeats, lease watchdog, deadline timers)."""


def compile_cmdline(pattern: str) -> Any:
    """``match.cmdline`` compiled with the ``regex`` module (re-compatible; its matching can be
    bounded in time and releases the interpreter lock). Imported on first use: an agent that
    never matches a command line never loads it."""
    import regex

    return regex.compile(pattern)


def _cmdline_matches(compiled: Any, cmdline: str, pid: int) -> bool:
    try:
        return compiled.search(cmdline, timeout=CMDLINE_MATCH_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError:
        raise Rejected(
            f"match.cmdline: the regular expression took over {CMDLINE_MATCH_TIMEOUT_S * 1000:.0f} ms on the "
            f"command line of pid {pid} (nested repetition such as (a+)+ backtracks without end); simplify it"
        ) from None


def _matches(match: ProcessMatch, info: dict[str, Any], compiled: Any | None) -> bool:
    if match.pid is not None and info["pid"] != match.pid:
        return False
    if match.name is not None and info.get("name") != match.name:
        return False
    if match.user is not None and info.get("username") != match.user:
        return False
    if compiled is not None:
        cmdline = " ".join(info.get("cmdline") or [])
        if not _cmdline_matches(compiled, cmdline, info["pid"]):
            return False
    return True


def _allowed_pids(ctx: FaultContext) -> set[int] | None:
    """With pod targeting, only the pods' processes are candidates."""
    if not ctx.pods:
        return None
    from agent import pods as pods_mod  # imported lazily: only pod-level faults need it

    allowed: set[int] = set()
    for pod in ctx.pods:
        try:
            allowed |= pods_mod.pod_pids(pod.uid, container_ids=pod.container_ids or None)
        except pods_mod.PodNotFound as exc:
            raise Rejected(f"pod {pod.namespace}/{pod.name}: {exc}") from None
    return allowed


def select(match: ProcessMatch, ctx: FaultContext) -> tuple[list[psutil.Process], list[SkippedProcess]]:
    """Matching processes that may be touched, and those skipped with the reason."""
    compiled = compile_cmdline(match.cmdline) if match.cmdline else None
    protected = ctx.env.protected_pids()
    deny = [re.compile(p) for p in ctx.env.deny_patterns]
    allowed = _allowed_pids(ctx)
    candidates: list[psutil.Process] = []
    skipped: list[SkippedProcess] = []
    for proc in psutil.process_iter(_ATTRS):
        info = proc.info
        if allowed is not None and proc.pid not in allowed:
            continue
        if not _matches(match, info, compiled):
            continue
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        reason = protection_reason(proc, info, protected, deny)
        if reason is not None:
            skipped.append(SkippedProcess(pid=proc.pid, name=str(info.get("name") or ""), reason=reason))
            continue
        candidates.append(proc)
    return candidates, skipped


def describe(match: ProcessMatch) -> str:
    parts = [f"{k}={v!r}" for k, v in match.model_dump(exclude_none=True).items()]
    return "{" + ", ".join(parts) + "}"


def _how_many(matched: int, count: int | None, percent: float | None, default_all: bool) -> int:
    if count is not None:
        return min(count, matched)
    if percent is not None:
        return min(matched, math.ceil(matched * percent / 100))
    return matched if default_all else min(1, matched)


def _choose(procs: list[psutil.Process], count: int | None, percent: float | None, default_all: bool) -> list[Any]:
    n = _how_many(len(procs), count, percent, default_all)
    return sorted(random.sample(procs, n), key=lambda p: p.pid)


PREVIEW_LIST_MAX = 50


_SECRETISH = re.compile(r"pass|secret|token|key|cred|auth|pwd", re.IGNORECASE)
_USERINFO = re.compile(r"(://)[^/\s@]+@")


def masked_cmdline(argv: list[str]) -> str:
    """A command line for a preview, with what looks like a secret shown as ***: the value of a
    --password=..., --token ..., PASSWORD=... argument, and the user:password@ of a URL. A preview
    shows the controller's users processes on the node; credentials do not belong in its output."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        key, eq, _ = arg.partition("=")
        if eq and _SECRETISH.search(key):
            out.append(f"{key}=***")
            continue
        if arg.startswith("-") and _SECRETISH.search(arg):
            hide_next = True  # --password VALUE
        out.append(_USERINFO.sub(r"\1***@", arg))
    return " ".join(out)


def _previewed(proc: psutil.Process) -> PreviewedProcess:
    info = proc.info
    cmdline = masked_cmdline([str(a) for a in info.get("cmdline") or []])
    return PreviewedProcess(
        pid=proc.pid, name=str(info.get("name") or ""), user=info.get("username"), cmdline=cmdline[:200]
    )


def _same_start(a: float, b: float) -> bool:
    """Two create_times of one process: psutil rounds them to the clock tick."""
    return abs(a - b) <= 0.05


def _same_process(target: Target) -> psutil.Process | None:
    try:
        proc = psutil.Process(target.pid)
        # create_time guards against a pid reused by another process since the plan
        if not _same_start(proc.create_time(), target.create_time):
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _signal(target: Target, signum: int) -> bool:
    """Signal exactly the planned process: identity is checked through a pidfd, which
    cannot be recycled, so a pid reused between the check and the signal is never hit."""
    try:
        pidfd = os.pidfd_open(target.pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if _same_process(target) is None:
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def _not_signalled(target: Target, exc: Exception) -> SkippedProcess:
    """A target the signal could not reach (EPERM from an LSM or a non-root agent, a /proc read
    refused): skipped with the reason; the other targets go on."""
    if isinstance(exc, PermissionError | psutil.AccessDenied):
        why = "not permitted to signal it (the agent lacks CAP_KILL over it, or a security module refused)"
    else:
        why = f"could not be signalled: {exc}"
    return SkippedProcess(pid=target.pid, name=target.name, reason=why)


def _none_hit(what: str, skipped: list[SkippedProcess]) -> RuntimeError:
    why = "; ".join(f"{s.pid} ({s.reason})" for s in skipped[:10])
    return RuntimeError(f"no selected process was {what}" + (f": {why}" if why else ": every one was gone"))


def _nothing_to_touch(match: ProcessMatch, skipped: list[SkippedProcess]) -> Rejected:
    shown = ", ".join(f"{s.pid} ({s.reason})" for s in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    why = f"; skipped: {shown}{more}" if skipped else ""
    return Rejected(f"no process matches {describe(match)} that may be touched{why}")


class _ProcessInjector(Injector):
    plan_model = ProcessPlan
    default_all = False

    def check(self, spec: Any, ctx: FaultContext) -> None:
        # stop signals and SIGCONT on a process-kill are refused by the spec itself (proto.faults)
        if spec.match.pid is not None and spec.match.pid in (1, os.getpid()):
            raise Rejected(
                f"match.pid: {spec.match.pid} is protected ({'PID 1' if spec.match.pid == 1 else 'the agent'})"
            )

    prechecks = True

    async def precheck(self, spec: Any, ctx: FaultContext) -> None:
        """A selector that matches nothing now is refused in the Ack, not at the start."""
        procs, skipped = await asyncio.to_thread(select, spec.match, ctx)
        procs, taken = self._exclude(procs, ctx)
        if not procs:
            raise _nothing_to_touch(spec.match, skipped + taken)

    async def plan(self, spec: Any, ctx: FaultContext) -> ProcessPlan:
        procs, skipped = await asyncio.to_thread(select, spec.match, ctx)
        # From here to the return there is no await: what _exclude() sees and what
        # _claim() records cannot be changed by another fault's plan in between.
        procs, taken = self._exclude(procs, ctx)
        skipped = skipped + taken
        if not procs:
            raise _nothing_to_touch(spec.match, skipped)
        chosen = _choose(procs, spec.count, spec.percent, self.default_all)
        targets = []
        for p in chosen:
            with contextlib.suppress(psutil.Error):
                targets.append(Target(pid=p.pid, create_time=p.info["create_time"], name=p.info.get("name") or ""))
        plan = ProcessPlan(
            kind=self.kind,
            targets=targets,
            matched_pids=sorted(p.pid for p in procs),
            skipped=skipped,
            signal=self._signum(spec),
        )
        self._claim(plan, ctx)
        return plan

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult:
        """The selection plan() would make now, with nothing claimed, signalled or recorded."""
        self.check(spec, ctx)
        procs, skipped = await asyncio.to_thread(select, spec.match, ctx)
        procs, taken = self._exclude(procs, ctx)
        skipped = skipped + taken
        procs.sort(key=lambda p: p.pid)
        n = _how_many(len(procs), spec.count, spec.percent, self.default_all)
        note = None
        if not procs:
            note = f"no process matches {describe(spec.match)} that may be touched: the fault would be refused now"
        elif n < len(procs):
            note = f"{n} of the {len(procs)} matches would be hit, picked at random when the fault is applied"
        return PreviewResult(
            would_hit=n,
            matched=[_previewed(p) for p in procs[:PREVIEW_LIST_MAX]],
            matched_total=len(procs),
            skipped=skipped[:PREVIEW_LIST_MAX],
            skipped_total=len(skipped),
            note=note,
        )

    def _exclude(
        self, procs: list[psutil.Process], ctx: FaultContext
    ) -> tuple[list[psutil.Process], list[SkippedProcess]]:
        """Matching processes another fault of this kind has taken: skipped, with the reason."""
        return procs, []

    def _claim(self, plan: ProcessPlan, ctx: FaultContext) -> None:  # noqa: B027 - optional hook
        """Record the plan's targets as taken by ctx.fault_id, until its revert."""

    def _signum(self, spec: Any) -> int:
        raise NotImplementedError

    def _measure(self, plan: ProcessPlan, hit: list[int]) -> Measurements:
        return Measurements(matched_pids=plan.matched_pids, hit_pids=hit, skipped=plan.skipped or None)


class ProcessKill(_ProcessInjector):
    kind = "process-kill"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._restarts: dict[str, tuple[int, float]] = {}
        self._hit: dict[str, list[int]] = {}

    def _signum(self, spec: Any) -> int:
        assert isinstance(spec, ProcessKillSpec)
        return spec.signal

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan) and isinstance(spec, ProcessKillSpec)
        killed_at = psutil_now()
        hit: list[int] = []
        failed: list[SkippedProcess] = []
        for t in plan.targets:
            try:
                if _signal(t, plan.signal):
                    hit.append(t.pid)
            except (OSError, psutil.Error) as exc:
                failed.append(_not_signalled(t, exc))
        if not hit:
            raise _none_hit("signalled", failed)
        self._hit[ctx.fault_id] = hit
        if spec.watch_restart:
            task = asyncio.create_task(self._watch(spec, plan, ctx, killed_at), name=f"watch-restart:{ctx.fault_id}")
            self._watches[ctx.fault_id] = task
            fid = ctx.fault_id
            task.add_done_callback(lambda _t: self._watches.pop(fid, None))
        m = self._measure(plan, hit)
        update: dict[str, Any] = {"restarted": False} if spec.watch_restart else {}
        if failed:
            update["skipped"] = [*plan.skipped, *failed]
        return m.model_copy(update=update)

    async def _watch(self, spec: ProcessKillSpec, plan: ProcessPlan, ctx: FaultContext, killed_at: float) -> None:
        old = {t.pid for t in plan.targets} | set(plan.matched_pids)
        while time.time() < ctx.deadline:
            await asyncio.sleep(WATCH_INTERVAL_S)
            procs, _ = await asyncio.to_thread(select, spec.match, ctx)
            fresh = [p for p in procs if p.pid not in old and p.info["create_time"] >= killed_at - 0.01]
            if fresh:
                p = min(fresh, key=lambda x: x.info["create_time"])
                after = max(0.0, p.info["create_time"] - killed_at)
                self._restarts[ctx.fault_id] = (p.pid, after)
                ctx.emit(
                    "active",
                    Measurements(restarted=True, restart_pid=p.pid, restart_after_s=round(after, 3)),
                    f"a matching process came back after {after:.2f}s (pid {p.pid})",
                )
                return

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan)
        task = self._watches.pop(ctx.fault_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        hit = self._hit.pop(ctx.fault_id, [t.pid for t in plan.targets])
        m = self._measure(plan, hit)
        restart = self._restarts.pop(ctx.fault_id, None)
        if restart is not None:
            return m.model_copy(update={"restarted": True, "restart_pid": restart[0], "restart_after_s": restart[1]})
        if task is not None:
            return m.model_copy(update={"restarted": False})
        return m


STOPPED = frozenset({psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP})
GONE = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def _stopped_now(target: Target) -> bool:
    """The planned process (the same one: its start time is checked) is stopped right now."""
    proc = _same_process(target)
    if proc is None:
        return False
    try:
        return proc.status() in STOPPED
    except psutil.Error:
        return False


ALREADY_STOPPED = "already stopped, not by this agent: resuming it at the revert would undo that stop"
STOP_CONFIRM_S = 1.0
"""How long a pause waits for its SIGSTOPs to take effect before it reports active: a process
stops when it next runs, one in uninterruptible sleep (D) only when it leaves it."""


async def _not_stopped_after(targets: list[Target], timeout_s: float, ending: Callable[[], bool]) -> list[Target]:
    """The targets still running after up to ``timeout_s``; a process gone meanwhile (or a
    zombie: it will never run again) is done. Stops early, with nothing to say, once ``ending()``."""

    def running(t: Target) -> bool:
        proc = _same_process(t)
        try:
            return proc is not None and proc.status() not in STOPPED | GONE
        except psutil.Error:
            return False

    loop = asyncio.get_running_loop()
    until, delay = loop.time() + timeout_s, 0.0005
    waiting = [t for t in targets if running(t)]
    while waiting and loop.time() < until:
        await asyncio.sleep(delay)
        if ending():
            return []
        delay = min(2 * delay, 0.05)
        waiting = [t for t in waiting if running(t)]
    return waiting


UNRESUMED_KEEP = 256  # faults whose failed revert left processes stopped, remembered for the hint


def left_stopped_reason(fault_id: str) -> str:
    return (
        f"still stopped by fault {fault_id} of this agent, whose revert could not resume it: its journal"
        " entry is kept (see journal issues in `faultline agents`) and retried every minute, at"
        " `faultline halt` and at the next start"
    )


class ProcessPause(_ProcessInjector):
    kind = "process-pause"
    default_all = True
    kept = True  # a frozen agent's pause is resumed by its keeper (agent/keepers.py)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fault id -> the processes it holds stopped, from its plan to its revert
        self._held: dict[str, list[Target]] = {}
        # fault id -> the pids its apply did stop: its revert resumes those and no other
        self._stopped: dict[str, set[int]] = {}
        # fault id -> what its failed revert could not resume (its journal entry is kept and
        # retried): a later pause of such a process is told why it is stopped, not "not by this agent"
        self._unresumed: dict[str, list[Target]] = {}

    def holder(self, pid: int, create_time: float, fault_id: str | None = None) -> str | None:
        """The active pause fault, other than ``fault_id``, that holds this process stopped."""
        for fid, targets in self._held.items():
            if fid != fault_id and any(t.pid == pid and _same_start(t.create_time, create_time) for t in targets):
                return fid
        return None

    def left_stopped_by(self, pid: int, create_time: float) -> str | None:
        """The fault, of this agent, whose failed revert left this process stopped."""
        for fid, targets in self._unresumed.items():
            if any(t.pid == pid and _same_start(t.create_time, create_time) for t in targets):
                return fid
        return None

    def _exclude(
        self, procs: list[psutil.Process], ctx: FaultContext
    ) -> tuple[list[psutil.Process], list[SkippedProcess]]:
        free: list[psutil.Process] = []
        taken: list[SkippedProcess] = []
        for p in procs:
            fid = self.holder(p.pid, p.info["create_time"], ctx.fault_id)
            name = str(p.info.get("name") or "")
            left = None if fid is not None else self.left_stopped_by(p.pid, p.info["create_time"])
            if fid is not None:
                taken.append(SkippedProcess(pid=p.pid, name=name, reason=f"already paused by fault {fid}"))
            elif left is not None and p.info.get("status") in STOPPED:
                taken.append(SkippedProcess(pid=p.pid, name=name, reason=left_stopped_reason(left)))
            elif p.info.get("status") in STOPPED:
                # stopped by someone else (another agent's pause, job control, a debugger): our
                # SIGCONT at the revert would end their stop, early and without telling them
                taken.append(SkippedProcess(pid=p.pid, name=name, reason=ALREADY_STOPPED))
            else:
                free.append(p)
        return free, taken

    def _claim(self, plan: ProcessPlan, ctx: FaultContext) -> None:
        self._held[ctx.fault_id] = list(plan.targets)

    def release(self, ctx: FaultContext) -> None:
        # revert drops the hold; this covers a fault whose end never reached a revert
        self._held.pop(ctx.fault_id, None)
        self._stopped.pop(ctx.fault_id, None)

    def _signum(self, spec: Any) -> int:
        return int(signal.SIGSTOP)

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan)
        hit: list[int] = []
        late: list[SkippedProcess] = []
        # filled as each SIGSTOP lands: whatever stops the loop (an error it does not expect),
        # the revert resumes exactly what was stopped
        stopped = self._stopped[ctx.fault_id] = set()
        for t in plan.targets:
            try:
                # stopped by someone else since the selection (the journal's fsync lies between)
                if _stopped_now(t):
                    late.append(SkippedProcess(pid=t.pid, name=t.name, reason=ALREADY_STOPPED))
                elif _signal(t, signal.SIGSTOP):
                    stopped.add(t.pid)
                    hit.append(t.pid)
            except (OSError, psutil.Error) as exc:
                late.append(_not_signalled(t, exc))
        if late and ctx.fault_id in self._held:  # what it did not stop is not ours to hold
            self._held[ctx.fault_id] = [t for t in plan.targets if t.pid in stopped]
        if not hit:
            raise _none_hit("stopped", late)
        m = self._measure(plan, hit)
        return m.model_copy(update={"skipped": [*plan.skipped, *late]}) if late else m

    settles = True

    async def settle(self, plan: Plan, ctx: FaultContext) -> str | None:
        """ "active" says the processes are stopped: their SIGSTOP says only that they will be."""
        assert isinstance(plan, ProcessPlan)
        stopped = self._stopped.get(ctx.fault_id, set())
        lagging = await _not_stopped_after([t for t in plan.targets if t.pid in stopped], STOP_CONFIRM_S, ctx.ending)
        if not lagging:
            return None
        pids = ", ".join(str(t.pid) for t in lagging[:20]) + (" …" if len(lagging) > 20 else "")
        note = (
            f"{len(lagging)} process(es) not stopped {STOP_CONFIRM_S:g} s after their SIGSTOP ({pids}): "
            "in uninterruptible sleep (they stop when they leave it), or resumed by someone else"
        )
        log.warning("fault %s: %s", ctx.fault_id, note)
        return note

    def _remember_unresumed(self, fault_id: str, targets: list[Target]) -> None:
        self._unresumed.pop(fault_id, None)
        self._unresumed[fault_id] = targets
        while len(self._unresumed) > UNRESUMED_KEEP:  # a hint only: the oldest go first
            del self._unresumed[next(iter(self._unresumed))]

    def applied(self, plan: Plan, ctx: FaultContext) -> Plan | None:
        """Targets the apply did not stop (gone, or stopped by someone else meanwhile) leave the
        journaled plan, so a revert after a crash resumes exactly what this fault stopped. When
        it stopped every target (the usual case) the plan stands: no second journal write."""
        assert isinstance(plan, ProcessPlan)
        stopped = self._stopped.get(ctx.fault_id)
        if stopped is None or all(t.pid in stopped for t in plan.targets):
            return None
        return plan.model_copy(update={"targets": [t for t in plan.targets if t.pid in stopped]})

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan)
        self._held.pop(ctx.fault_id, None)
        # SIGCONT to what this fault's apply stopped and nothing else: a process stopped by
        # someone else is theirs to resume. Recovered from the journal (the agent died), the
        # journaled targets are what the apply stopped (applied() narrowed them), or, had the
        # agent died between its SIGSTOPs and that narrowing, what it planned to stop.
        # Never one another active pause fault holds: a second revert of this fault, or one
        # from the journal, must not end that fault's pause early.
        stopped = self._stopped.get(ctx.fault_id)  # dropped once resumed: a retried revert still knows
        if stopped is None and not ctx.recovered:
            stopped = set()  # ended before its apply (or a second revert): it stopped nothing
        resumed: list[int] = []
        kept: list[SkippedProcess] = []
        failed: list[str] = []
        unresumed: set[int] = set()
        for t in plan.targets:
            if stopped is not None and t.pid not in stopped:
                continue
            fid = self.holder(t.pid, t.create_time, ctx.fault_id)
            if fid is not None:
                log.warning("fault %s: pid %d not resumed: still paused by fault %s", ctx.fault_id, t.pid, fid)
                kept.append(SkippedProcess(pid=t.pid, name=t.name, reason=f"not resumed: still paused by fault {fid}"))
            else:
                try:
                    if _signal(t, signal.SIGCONT):
                        resumed.append(t.pid)
                except (OSError, psutil.Error) as exc:  # the others are resumed all the same
                    failed.append(f"{t.pid}: {_not_signalled(t, exc).reason}")
                    unresumed.add(t.pid)
        if failed:  # the revert fails, so the fault's journal entry is kept and retried
            self._remember_unresumed(ctx.fault_id, [t for t in plan.targets if t.pid in unresumed])
            raise RuntimeError(f"not resumed: {'; '.join(failed[:10])}")
        self._unresumed.pop(ctx.fault_id, None)
        self._stopped.pop(ctx.fault_id, None)
        m = self._measure(plan, sorted(stopped) if stopped is not None else [t.pid for t in plan.targets])
        update: dict[str, Any] = {"resumed_pids": resumed}
        if kept:
            update["skipped"] = [*plan.skipped, *kept]
        return m.model_copy(update=update)
