"""The ``cpu`` fault: duty-cycled busy child processes, one per worker, pinned when cores are given.

Each worker is a separate process (agent/stressor_main.py) busy for ``load`` %
of every 100 ms, so per-second load as psutil sees it is the requested one.
Revert reports the load achieved: mean and standard deviation of per-second
load per worker over the active window.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

from agent import cgroups
from agent.faults.base import FaultContext, Plan, Rejected
from agent.faults.stressor import UNTIL_GRACE_S, CpuSampler, StressInjector, StressPlan, leash_note
from proto.faults import CpuSpec
from proto.messages import Measurements, PreviewResult, StressPreview


class CpuPlan(StressPlan):
    load_percent: float
    workers: int
    cores: list[int] | None = None


def node_cores() -> set[int]:
    """The CPUs the agent (and so its stressors) may run on."""
    return set(os.sched_getaffinity(0))


class CpuStress(StressInjector):
    kind: ClassVar[str] = "cpu"
    plan_model: ClassVar[type[Plan]] = CpuPlan
    primary_controller: ClassVar[str] = "cpu"

    def check(self, spec: Any, ctx: FaultContext) -> None:
        if not isinstance(spec, CpuSpec):
            raise Rejected(f"cpu injector got a {type(spec).__name__}")
        if not 1 <= spec.load_percent <= 100:
            raise Rejected(f"load: {spec.load_percent:g} is outside 1-100 (percent of one core per worker)")
        if spec.workers is not None and spec.workers < 1:
            raise Rejected(f"workers: {spec.workers} must be at least 1")
        if spec.cores is not None:
            allowed = node_cores()
            outside = sorted(set(spec.cores) - allowed)
            if outside:
                raise Rejected(f"cores: {outside} not among this node's cores {sorted(allowed)}")
        self.resolve_cgroup(spec.cgroup)

    def default_workers(self, spec: CpuSpec) -> int:
        if spec.workers is not None:
            return spec.workers
        if spec.cores:
            return len(spec.cores)
        target = self.resolve_cgroup(spec.cgroup)
        if target is not None:
            quota = cgroups.cpu_quota_workers(target)
            if quota is not None:
                return quota
        return len(node_cores())

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult:
        """What plan() would run: how many workers, at what load, where."""
        self.check(spec, ctx)
        assert isinstance(spec, CpuSpec)
        workers = self.default_workers(spec)
        note = f"on cores {', '.join(map(str, spec.cores))}" if spec.cores else None
        return PreviewResult(
            stress=StressPreview(cgroup=spec.cgroup or "the node", workers=workers, load_percent=spec.load_percent),
            note=note,
        )

    async def plan(self, spec: Any, ctx: FaultContext) -> CpuPlan:
        self.check(spec, ctx)
        assert isinstance(spec, CpuSpec)
        return CpuPlan(
            marker=self.marker_for(ctx.fault_id),
            cgroup=spec.cgroup,
            until=ctx.deadline + UNTIL_GRACE_S,
            load_percent=spec.load_percent,
            workers=self.default_workers(spec),
            cores=spec.cores,
        )

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, CpuPlan)
        t0 = time.monotonic()
        args = [["cpu", f"--load={plan.load_percent:g}"]] * plan.workers
        cores = [plan.cores[i % len(plan.cores)] if plan.cores else None for i in range(plan.workers)]
        running = await self.launch(plan, args, cores, ctx)
        running.sampler = CpuSampler([s.proc for s in running.stressors])
        self.watch(plan, running, running.sampler.run())
        return Measurements(
            workers=plan.workers,
            stressor_pids=[s.pid for s in running.stressors],
            cgroup=running.cgroup.path if running.cgroup else None,
            apply_s=round(time.monotonic() - t0, 4),
        )

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, StressPlan)
        held = self._running.get(plan.marker)
        # before our SIGKILL sets their exit codes
        leashed = held is not None and held.leash_ended()
        early = (
            [c for s in held.stressors if not s.killed_by_us and (c := s.popen.poll()) not in (None, 0)]
            if held is not None
            else []
        )  # 0: reached its own deadline (a late revert); killed_by_us: an earlier stop of ours
        running, killed, took_s = await self.stop(plan)
        mean = stdev = None
        note = None
        if running is not None:
            if running.sampler is not None:
                mean, stdev = running.sampler.summary()
            if mean is None:
                note = "active less than a second: no per-second load measured"
            if leashed:
                note = leash_note(running.leash_s)
            elif early:
                note = (
                    f"{len(early)} of {len(running.stressors)} stressor(s) ended before the revert "
                    f"(exit {', '.join(str(c) for c in early)}; -9: SIGKILL, by the OOM killer or someone else): "
                    "the load was lower from then on"
                )
        else:
            note = f"no in-memory state (agent restarted?): killed {len(killed)} stressor(s) found by marker"
        return Measurements(
            workers=plan.workers if isinstance(plan, CpuPlan) else None,
            stressor_pids=[s.pid for s in running.stressors] if running else killed,
            cpu_load_mean_percent=mean,
            cpu_load_stdev_percent=stdev,
            cgroup=plan.cgroup,
            revert_s=round(took_s, 4),
            recovered_from_journal=ctx.recovered or None,
            note=note,
        )
