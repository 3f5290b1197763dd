"""The ``memory`` fault: one child process that allocates, touches and holds memory.

The stressor writes one byte per 4 KiB page so the pages are really resident,
optionally ramping linearly, and sets oom_score_adj=1000 so under pressure the
kernel kills it before the workload or the agent. Revert reports the RSS
reached, how long it took, and whether the OOM killer ended the stressor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any, ClassVar, NamedTuple

import psutil

from agent import cgroups
from agent.faults.base import AgentEnv, FaultContext, Plan, Rejected
from agent.faults.oomwatch import OomWatch
from agent.faults.stressor import UNTIL_GRACE_S, Running, StressInjector, StressPlan, leash_note, rss_bytes
from agent.stressor_main import LEASH_EXIT
from proto.faults import MemorySpec
from proto.messages import Measurements, PreviewResult, StressPreview
from proto.units import format_size

log = logging.getLogger(__name__)

REACHED_FRACTION = 0.98
"""RSS counts as reached at this share of the requested size."""


class _Room(NamedTuple):
    available: int
    reserve: int
    others: int


class MemoryPlan(StressPlan):
    size_bytes: int
    ramp_s: float = 0.0


class MemoryStress(StressInjector):
    kind: ClassVar[str] = "memory"
    plan_model: ClassVar[type[Plan]] = MemoryPlan
    primary_controller: ClassVar[str] = "memory"

    def __init__(self, env: AgentEnv) -> None:
        super().__init__(env)
        self._promised: dict[str, int] = {}
        """fault id -> bytes its stressor may allocate, from its accepted check until release()."""

    def _outstanding(self, except_fault: str) -> int:
        """Bytes this agent's other memory faults may still allocate: not resident yet, so
        ``available`` does not show them. Two faults accepted together are checked against
        the memory both will take, not each against the same free memory."""
        total = 0
        for fid, size in self._promised.items():
            if fid == except_fault:
                continue
            running = self._running.get(self.marker_for(fid))
            resident = (rss_bytes(running.stressors[0].proc) or 0) if running and running.stressors else 0
            total += max(0, size - resident)
        return total

    def release(self, ctx: FaultContext) -> None:
        self._promised.pop(ctx.fault_id, None)

    def _size(self, spec: MemorySpec, target: cgroups.CgroupTarget | None) -> tuple[int, str]:
        """(requested bytes, the field that set it)."""
        if spec.size_bytes is not None and spec.percent is not None:
            raise Rejected("size: give exactly one of size or percent, not both")
        if spec.size_bytes is not None:
            if spec.size_bytes <= 0:
                raise Rejected(f"size: {spec.size_bytes} must be > 0")
            return spec.size_bytes, "size"
        if spec.percent is None or not 0 < spec.percent <= 100:
            raise Rejected("percent: give size, or percent between 0 (exclusive) and 100")
        base = psutil.virtual_memory().total
        if target is not None:
            base = cgroups.memory_limit_bytes(target) or base
        return max(4096, int(base * spec.percent / 100)), "percent"

    def check(self, spec: Any, ctx: FaultContext) -> None:
        size, _ = self._fits(spec, ctx)
        self._promised[ctx.fault_id] = size  # counted against the next memory fault until release()

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult:
        """What check() decides, with nothing set aside: the size, where, and the room for it."""
        size, room = self._fits(spec, ctx)
        assert isinstance(spec, MemorySpec)
        return PreviewResult(
            stress=StressPreview(
                cgroup=spec.cgroup or "the node",
                size_bytes=size,
                available_bytes=room.available,
                reserve_bytes=room.reserve,
                promised_bytes=room.others,
            ),
            note="allowOvercommit: true: not checked against available memory" if spec.allow_overcommit else None,
        )

    def _fits(self, spec: Any, ctx: FaultContext) -> tuple[int, _Room]:
        """(the size, the room for it); raises Rejected, with the reason, when it does not fit."""
        if not isinstance(spec, MemorySpec):
            raise Rejected(f"memory injector got a {type(spec).__name__}")
        target = self.resolve_cgroup(spec.cgroup)
        size, field_name = self._size(spec, target)
        if spec.ramp_s is not None and spec.ramp_s < 0:
            raise Rejected("ramp: must be >= 0")
        vm = psutil.virtual_memory()
        reserve = int(vm.total * self.env.memory_reserve_percent / 100)
        others = self._outstanding(ctx.fault_id)
        room = _Room(vm.available, reserve, others)
        if not spec.allow_overcommit:
            if size > vm.available - reserve - others:
                held = (
                    f", minus {format_size(others)} that this agent's other memory faults may still take"
                    if others
                    else ""
                )
                raise Rejected(
                    f"{field_name}: {format_size(size)} exceeds available memory {format_size(vm.available)} "
                    f"minus the agent's reserve {format_size(reserve)} ({self.env.memory_reserve_percent:g}% of total)"
                    f"{held}; set allowOvercommit: true to force it"
                )
        return size, room

    async def plan(self, spec: Any, ctx: FaultContext) -> MemoryPlan:
        self.check(spec, ctx)
        assert isinstance(spec, MemorySpec)
        size, _ = self._size(spec, self.resolve_cgroup(spec.cgroup))
        return MemoryPlan(
            marker=self.marker_for(ctx.fault_id),
            cgroup=spec.cgroup,
            until=ctx.deadline + UNTIL_GRACE_S,
            size_bytes=size,
            ramp_s=spec.ramp_s or 0.0,
        )

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, MemoryPlan)
        t0 = time.monotonic()
        # opened before the stressor starts: an OOM kill in its first milliseconds counts too
        watch = OomWatch(self.resolve_cgroup(plan.cgroup))
        args = [["memory", f"--size={plan.size_bytes}", f"--ramp={plan.ramp_s:g}"]]
        try:
            running = await self.launch(plan, args, [None], ctx)
        except BaseException:
            watch.close()
            raise
        running.oom_watch = watch
        self.watch(plan, running, self._monitor(plan, running, ctx))
        return Measurements(
            workers=1,
            stressor_pids=[s.pid for s in running.stressors],
            cgroup=running.cgroup.path if running.cgroup else None,
            apply_s=round(time.monotonic() - t0, 4),
        )

    async def _note_exit(self, running: Running) -> None:
        """Record whether a stressor that died on its own was OOM-killed (see agent/faults/oomwatch.py).
        The monitor and the revert both ask; the lock makes the second wait for the first's answer."""
        async with running.exit_lock:
            s = running.stressors[0]
            code = s.popen.poll()
            if code is None or s.killed_by_us or running.exit_code is not None:
                return
            watch = running.oom_watch
            if code == -signal.SIGKILL and watch is not None:
                # a SIGKILL we did not send: the OOM killer's, or someone else's
                running.oom_killed = await watch.killed(s.pid)
                log.info("memory stressor %s: SIGKILL; OOM kill: %s (from %s)", s.pid, running.oom_killed, watch.source)
            running.exit_code = code
            if watch is not None:
                watch.close()

    def _sample(self, plan: StressPlan, running: Running, ctx: FaultContext) -> None:
        assert isinstance(plan, MemoryPlan)
        rss = rss_bytes(running.stressors[0].proc) or 0
        running.peak_rss_bytes = max(running.peak_rss_bytes, rss)
        if running.reached_s is None and rss >= REACHED_FRACTION * plan.size_bytes:
            running.reached_s = round(time.monotonic() - running.started_at, 3)
            with contextlib.suppress(Exception):  # a failing emit must not stop the watch
                ctx.emit("active", Measurements(rss_bytes=rss, rss_reached_s=running.reached_s), None)

    async def _monitor(self, plan: MemoryPlan, running: Running, ctx: FaultContext) -> None:
        s = running.stressors[0]
        while s.popen.poll() is None:
            self._sample(plan, running, ctx)
            await asyncio.sleep(0.02 if running.reached_s is None else 0.5)
        await self._note_exit(running)
        if running.exit_code == LEASH_EXIT:
            log.warning("memory stressor %s of fault %s: %s", s.pid, ctx.fault_id, leash_note(running.leash_s))
            with contextlib.suppress(Exception):
                ctx.emit("active", Measurements(rss_bytes=running.peak_rss_bytes), leash_note(running.leash_s))
        if running.oom_killed:
            log.warning("memory stressor %s of fault %s was OOM-killed", s.pid, ctx.fault_id)
            with contextlib.suppress(Exception):
                ctx.emit(
                    "active",
                    Measurements(oom_killed=True, rss_bytes=running.peak_rss_bytes),
                    "memory stressor was killed by the kernel OOM killer",
                )

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, StressPlan)
        running = self._running.get(plan.marker)
        if running is not None:
            await self._note_exit(running)  # before our own SIGKILL muddles the exit status
            if running.exit_code is None:
                self._sample(plan, running, ctx)  # the monitor may not have looked for up to 0.5 s
        try:
            running, killed, took_s = await self.stop(plan)
        finally:  # also when the stop fails: a retry tells an OOM kill from the counter alone
            if running is not None and running.oom_watch is not None:
                running.oom_watch.close()
        if running is None:
            return Measurements(
                stressor_pids=killed,
                cgroup=plan.cgroup,
                revert_s=round(took_s, 4),
                recovered_from_journal=ctx.recovered or None,
                note=f"no in-memory state (agent restarted?): killed {len(killed)} stressor(s) found by marker",
            )
        note = None
        if running.oom_killed:
            note = "memory stressor was killed by the kernel OOM killer"
        elif running.exit_code == LEASH_EXIT:
            note = leash_note(running.leash_s)
        elif running.exit_code is not None:
            note = f"memory stressor exited before revert with code {running.exit_code}"
        return Measurements(
            workers=1,
            stressor_pids=[s.pid for s in running.stressors],
            rss_bytes=running.peak_rss_bytes or None,
            rss_reached_s=running.reached_s,
            oom_killed=running.oom_killed,
            cgroup=plan.cgroup,
            revert_s=round(took_s, 4),
            recovered_from_journal=ctx.recovered or None,
            note=note,
        )
