"""process-kill and process-pause.

Selection happens once, in plan(): the journaled plan lists every target pid
with its create time, so a revert after a crash (SIGCONT) reaches exactly the
processes that were paused and never a newcomer that reused a pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import signal
import time
from typing import Any

import psutil
from pydantic import Field

from agent.faults.base import FaultContext, Injector, Plan, Rejected
from agent.protect import protection_reason
from proto.faults import ProcessKillSpec, ProcessMatch
from proto.messages import Measurements, SkippedProcess

_ATTRS = ["pid", "name", "cmdline", "username", "create_time", "status"]
WATCH_INTERVAL_S = 0.1
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


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


def _matches(match: ProcessMatch, info: dict[str, Any], regex: re.Pattern[str] | None) -> bool:
    if match.pid is not None and info["pid"] != match.pid:
        return False
    if match.name is not None and info.get("name") != match.name:
        return False
    if match.user is not None and info.get("username") != match.user:
        return False
    if regex is not None:
        cmdline = " ".join(info.get("cmdline") or [])
        if not regex.search(cmdline):
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
    regex = re.compile(match.cmdline) if match.cmdline else None
    protected = ctx.env.protected_pids()
    deny = [re.compile(p) for p in ctx.env.deny_patterns]
    allowed = _allowed_pids(ctx)
    candidates: list[psutil.Process] = []
    skipped: list[SkippedProcess] = []
    for proc in psutil.process_iter(_ATTRS):
        info = proc.info
        if allowed is not None and proc.pid not in allowed:
            continue
        if not _matches(match, info, regex):
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


def _choose(procs: list[psutil.Process], count: int | None, percent: float | None, default_all: bool) -> list[Any]:
    if count is not None:
        n = min(count, len(procs))
    elif percent is not None:
        n = min(len(procs), math.ceil(len(procs) * percent / 100))
    else:
        n = len(procs) if default_all else min(1, len(procs))
    return sorted(random.sample(procs, n), key=lambda p: p.pid)


def _same_process(target: Target) -> psutil.Process | None:
    try:
        proc = psutil.Process(target.pid)
        # create_time guards against a pid reused by another process since the plan
        if abs(proc.create_time() - target.create_time) > 0.05:
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


class _ProcessInjector(Injector):
    plan_model = ProcessPlan
    default_all = False

    def check(self, spec: Any, ctx: FaultContext) -> None:
        if isinstance(spec, ProcessKillSpec) and spec.signal in STOP_SIGNALS:
            name = signal.Signals(spec.signal).name
            raise Rejected(
                f"signal: {name} stops a process and process-kill never resumes it; use kind: process-pause "
                "(SIGSTOP for the duration, SIGCONT at revert)"
            )
        if spec.match.pid is not None and spec.match.pid in (1, os.getpid()):
            raise Rejected(
                f"match.pid: {spec.match.pid} is protected ({'PID 1' if spec.match.pid == 1 else 'the agent'})"
            )

    async def plan(self, spec: Any, ctx: FaultContext) -> ProcessPlan:
        procs, skipped = await asyncio.to_thread(select, spec.match, ctx)
        if not procs:
            why = f"; skipped: {', '.join(f'{s.pid} ({s.reason})' for s in skipped)}" if skipped else ""
            raise Rejected(f"no process matches {describe(spec.match)} that may be touched{why}")
        chosen = _choose(procs, spec.count, spec.percent, self.default_all)
        targets = []
        for p in chosen:
            with contextlib.suppress(psutil.Error):
                targets.append(Target(pid=p.pid, create_time=p.info["create_time"], name=p.info.get("name") or ""))
        return ProcessPlan(
            kind=self.kind,
            targets=targets,
            matched_pids=sorted(p.pid for p in procs),
            skipped=skipped,
            signal=self._signum(spec),
        )

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
        hit = [t.pid for t in plan.targets if _signal(t, plan.signal)]
        if not hit:
            raise RuntimeError("every selected process was gone before the signal")
        self._hit[ctx.fault_id] = hit
        if spec.watch_restart:
            task = asyncio.create_task(self._watch(spec, plan, ctx, killed_at), name=f"watch-restart:{ctx.fault_id}")
            self._watches[ctx.fault_id] = task
            fid = ctx.fault_id
            task.add_done_callback(lambda _t: self._watches.pop(fid, None))
        m = self._measure(plan, hit)
        return m.model_copy(update={"restarted": False} if spec.watch_restart else {})

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


class ProcessPause(_ProcessInjector):
    kind = "process-pause"
    default_all = True

    def _signum(self, spec: Any) -> int:
        return int(signal.SIGSTOP)

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan)
        hit = [t.pid for t in plan.targets if _signal(t, signal.SIGSTOP)]
        if not hit:
            raise RuntimeError("every selected process was gone before SIGSTOP")
        return self._measure(plan, hit)

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, ProcessPlan)
        # SIGCONT to every planned target, applied or not: harmless if it was never stopped
        resumed = [t.pid for t in plan.targets if _signal(t, signal.SIGCONT)]
        return self._measure(plan, [t.pid for t in plan.targets]).model_copy(update={"resumed_pids": resumed})
