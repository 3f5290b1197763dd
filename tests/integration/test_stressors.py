"""cpu and memory injectors with real stressor processes, measured with psutil.

Injector-level: the Injector methods are called directly with a FaultContext
built here. Every test kills what it started in a finaliser.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent import cgroups
from agent.faults.base import AgentEnv, FaultContext, Injector
from agent.faults.cpu import CpuStress
from agent.faults.lazy import LazyCpu, LazyMemory
from agent.faults.memory import MemoryStress
from agent.faults.stress_marks import find_marked, make_marker
from agent.faults.stressor import OWNED_SCAN_S, kill_and_wait, spawn, start
from proto.faults import CpuSpec, MemorySpec
from proto.messages import Measurements

pytestmark = pytest.mark.integration

MiB = 1 << 20


Events = list[tuple[str, Measurements, str | None]]


def ctx_for(env: AgentEnv, events: Events | None = None, duration_s: float = 30.0) -> FaultContext:
    sink = events if events is not None else []
    return FaultContext(
        fault_id=f"f-{uuid.uuid4().hex[:8]}",
        experiment_id="e1",
        deadline=time.time() + duration_s,
        pods=None,
        env=env,
        emit=lambda state, m, reason: sink.append((state, m, reason)),
    )


def mine(env: AgentEnv, kind: str) -> dict[str, list[object]]:
    return find_marked(make_marker(kind, CpuStress(env).tag, ""))  # type: ignore[return-value]


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"within {timeout_s}s: {what} did not happen")
        await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_cpu_50_percent_one_worker(env: AgentEnv, cleanup: None) -> None:
    inj, ctx = CpuStress(env), ctx_for(env)
    spec = CpuSpec(load=50, workers=1, duration="6s")
    inj.check(spec, ctx)
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    assert applied.workers == 1 and applied.stressor_pids and len(applied.stressor_pids) == 1
    proc = psutil.Process(applied.stressor_pids[0])
    samples: list[float] = []
    await asyncio.sleep(1.0)  # skip the first second of the 6 s window
    prev_cpu, prev_t = sum(proc.cpu_times()[:2]), time.monotonic()
    for _ in range(4):
        await asyncio.sleep(1.0)
        cpu, t = sum(proc.cpu_times()[:2]), time.monotonic()
        samples.append(100 * (cpu - prev_cpu) / (t - prev_t))
        prev_cpu, prev_t = cpu, t
    await asyncio.sleep(1.0)
    reverted = await inj.revert(plan, ctx)
    mean = statistics.fmean(samples)
    assert 45 <= mean <= 55, f"per-second load {samples}"
    assert reverted.cpu_load_mean_percent is not None and 45 <= reverted.cpu_load_mean_percent <= 55
    assert gone(proc.pid) and mine(env, "cpu") == {}


async def test_memory_200mi_rss(env: AgentEnv, cleanup: None) -> None:
    events: Events = []
    inj, ctx = MemoryStress(env), ctx_for(env, events)
    spec = MemorySpec(size="200Mi")
    inj.check(spec, ctx)
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    assert applied.stressor_pids
    proc = psutil.Process(applied.stressor_pids[0])
    assert Path(f"/proc/{proc.pid}/oom_score_adj").read_text().strip() == "1000"  # noqa: ASYNC240 - procfs, instant
    await wait_for(lambda: proc.memory_info().rss >= 190 * MiB, 20, "stressor RSS reaching 190 MiB")
    for _ in range(5):
        rss = proc.memory_info().rss
        assert abs(rss - 200 * MiB) <= 0.05 * 200 * MiB, f"RSS {rss / MiB:.1f} MiB"
        await asyncio.sleep(0.1)
    await wait_for(lambda: any(m.rss_reached_s is not None for _, m, _ in events), 5, "an 'rss reached' event")
    reverted = await inj.revert(plan, ctx)
    assert reverted.rss_bytes is not None and abs(reverted.rss_bytes - 200 * MiB) <= 0.05 * 200 * MiB
    assert reverted.rss_reached_s is not None and reverted.oom_killed is False
    assert gone(proc.pid) and mine(env, "memory") == {}
    again = await inj.revert(plan, ctx)  # idempotent
    assert again.stressor_pids == []


async def test_revert_from_plan_alone_and_deadline_self_exit(env: AgentEnv, cleanup: None) -> None:
    inj, ctx = CpuStress(env), ctx_for(env, duration_s=0.5)
    spec = CpuSpec(load=10, workers=2)
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    pids = applied.stressor_pids or []
    assert len(pids) == 2
    # a fresh injector has no in-memory state, as after an agent restart: the plan's marker suffices
    fresh = CpuStress(env)
    await asyncio.sleep(0.2)
    ctx2 = ctx_for(env)
    ctx2.fault_id, ctx2.recovered = ctx.fault_id, True
    m = await fresh.revert(plan, ctx2)
    assert sorted(m.stressor_pids or []) == sorted(pids) and m.recovered_from_journal
    assert all(gone(p) for p in pids)
    # without any revert, stressors end by themselves shortly after the deadline
    plan2 = await inj.plan(spec, ctx)
    await inj.apply(spec, plan2, ctx)
    await wait_for(lambda: find_marked(plan2.marker) == {}, 6, "stressors exiting after their deadline")
    await inj.revert(plan2, ctx)
    await inj.revert(plan, ctx)  # the first injector still held in-memory state for plan: idempotent
    assert mine(env, "cpu") == {}


PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from agent.faults import stressor as st

    async def main():
        ss = [st.spawn(sys.argv[1], ["cpu", "--load=20"]) for _ in range(2)]
        await st.start(ss, None)
        print(" ".join(str(s.pid) for s in ss), flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.fixture
def parent_proc() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        if p.stdout is not None:
            p.stdout.close()


async def test_stressors_die_with_killed_agent_then_sweep_is_empty(
    env: AgentEnv, cleanup: None, parent_proc: list[subprocess.Popen[str]]
) -> None:
    inj = CpuStress(env)
    marker = inj.marker_for("orphan-test")
    # a plain Popen on purpose: this stands in for the agent, which the test then SIGKILLs
    parent = subprocess.Popen([sys.executable, "-c", PARENT, marker], stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    parent_proc.append(parent)
    assert parent.stdout is not None
    ready, _, _ = select.select([parent.stdout], [], [], 15)
    assert ready, "the parent did not report its stressors within 15 s"
    pids = [int(x) for x in parent.stdout.readline().split()]
    assert len(pids) == 2 and set(find_marked(marker)) == {marker}
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(5)
    await wait_for(lambda: all(gone(p) for p in pids), 1.0, "stressors dying with their parent (pdeathsig)")
    assert await inj.sweep([]) == []


async def test_sweep_kills_only_this_agents_unjournaled_stressors(tmp_path: Path, env: AgentEnv, cleanup: None) -> None:
    other_env = AgentEnv(node=env.node, state_dir=tmp_path / "other", instance_id="j", protected_pids=dict)
    ours, theirs = CpuStress(env), CpuStress(other_env)
    ctx = ctx_for(env)
    kept_plan = await ours.plan(CpuSpec(load=5, workers=1), ctx)
    stray = [spawn(ours.marker_for("stray"), ["cpu", "--load=5"])]
    kept = [spawn(kept_plan.marker, ["cpu", "--load=5"])]
    foreign = [spawn(theirs.marker_for("x"), ["cpu", "--load=5"])]
    try:
        await start(stray + kept + foreign, None)
        lines = await CpuStress(env).sweep([kept_plan])
        assert len(lines) == 1 and "stray" in lines[0]
        assert gone(stray[0].pid) and not gone(kept[0].pid) and not gone(foreign[0].pid)
    finally:
        await kill_and_wait([], stray + kept + foreign)


async def test_lazy_kind_sweeps_a_stray_at_start_and_loads_only_then(env: AgentEnv, cleanup: None) -> None:
    """What an agent runs at start for cpu and memory (agent.faults.lazy): with nothing of ours
    around, the sweep finds nothing and loads nothing; a stray of ours is killed by the real sweep."""
    idle = LazyMemory(env)
    assert await idle.sweep([]) == [] and not idle.loaded
    lazy = LazyCpu(env)
    stray = [spawn(make_marker("cpu", CpuStress(env).tag, "stray"), ["cpu", "--load=5"])]
    try:
        await start(stray, None)
        lines = await lazy.sweep([])
        assert len(lines) == 1 and "killed stray cpu stressor" in lines[0], lines
        assert lazy.loaded and gone(stray[0].pid)
    finally:
        await kill_and_wait([], stray)


async def test_lazy_kind_is_the_real_one_once_loaded(env: AgentEnv, cleanup: None) -> None:
    """check, plan, apply, revert and release all reach one real instance: the memory kind's share
    of free memory set aside by check() is given back by release()."""
    lazy = LazyMemory(env)
    assert lazy.probe() == MemoryStress(env).probe()  # the same answer, and still nothing loaded
    assert not lazy.loaded
    ctx = ctx_for(env, duration_s=30)
    spec = MemorySpec(size="16Mi")
    lazy.check(spec, ctx)
    real = lazy._real
    assert isinstance(real, MemoryStress) and real._promised == {ctx.fault_id: 16 * MiB}, "check() did not reach it"
    plan = await lazy.plan(spec, ctx)
    try:
        await lazy.apply(spec, plan, ctx)
        assert find_marked(plan.marker), "no stressor running after apply"  # type: ignore[attr-defined]
    finally:
        await lazy.revert(plan, ctx)
        lazy.release(ctx)
    assert not find_marked(plan.marker) and real._promised == {}  # type: ignore[attr-defined]
    assert lazy.load_plan(plan.model_dump(mode="json")) == plan


@pytest.mark.parametrize("kind", ["cpu", "memory"])
async def test_stressor_runs_in_the_named_cgroup(env: AgentEnv, cleanup: None, test_cgroup: str, kind: str) -> None:
    inj: Injector
    spec: CpuSpec | MemorySpec
    if kind == "cpu":
        inj, spec = CpuStress(env), CpuSpec(load=20, workers=1, cgroup=test_cgroup)
    else:
        inj, spec = MemoryStress(env), MemorySpec(size="16Mi", cgroup=test_cgroup)
    ctx = ctx_for(env)
    inj.check(spec, ctx)
    plan = await inj.plan(spec, ctx)
    try:
        applied = await inj.apply(spec, plan, ctx)
        assert applied.cgroup == test_cgroup and applied.stressor_pids
        target = cgroups.resolve(test_cgroup, kind)
        for controller in target.dirs:
            assert set(applied.stressor_pids) <= cgroups.pids_in(target, controller), controller
    finally:
        await inj.revert(plan, ctx)


async def test_a_revert_ends_the_load_while_every_worker_thread_is_busy(env: AgentEnv, cleanup: None) -> None:
    """The event loop's pool taken whole (threads stuck on a stalled disk, a hung lookup): the
    revert still kills the stressors it holds, which need no thread, and does not wait for
    the scan for others past its bound. Before, it waited for the scan and timed out with the
    load still on, and had by then forgotten its own stressors."""
    inj, ctx = CpuStress(env), ctx_for(env)
    spec = CpuSpec(load=10, workers=1, duration="30s")
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    assert applied.stressor_pids
    release = threading.Event()
    busy = [asyncio.ensure_future(asyncio.to_thread(release.wait, 20)) for _ in range(64)]  # more than the pool
    try:
        await asyncio.sleep(0)
        started = time.monotonic()
        reverted = await asyncio.wait_for(inj.revert(plan, ctx), OWNED_SCAN_S + 2)
        took = time.monotonic() - started
        assert all(gone(pid) for pid in applied.stressor_pids), "the load outlived its revert"
        assert reverted.stressor_pids == applied.stressor_pids
        assert took < OWNED_SCAN_S + 2, took
    finally:
        release.set()
        await asyncio.gather(*busy)


async def test_a_stressor_that_died_early_is_named_in_the_revert(env: AgentEnv, cleanup: None) -> None:
    """Killed by the OOM killer (cpu stressors have oom_score_adj 1000) or by someone else: the
    revert said only "reverted", with a lower mean and no word of why."""
    inj, ctx = CpuStress(env), ctx_for(env)
    spec = CpuSpec(load=10, workers=1, duration="30s")
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    (pid,) = applied.stressor_pids or []
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: gone(pid), 3, "the stressor to die")
    reverted = await inj.revert(plan, ctx)
    assert reverted.note is not None and reverted.note.startswith(
        "1 of 1 stressor(s) ended before the revert (exit -9"
    ), reverted.note


async def test_own_stressors_are_killed_even_when_start_times_no_longer_match(
    env: AgentEnv, cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psutil derives start times from the boot time, itself from the wall clock: after a clock
    step no start time matches. An unreaped child of the agent cannot have had its pid reused,
    so the revert kills it without that check (before, only the marker scan could)."""
    inj, ctx = CpuStress(env), ctx_for(env)
    spec = CpuSpec(load=10, workers=1, duration="30s")
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)
    monkeypatch.setattr("agent.faults.stressor._is_same", lambda ref: None)  # the clock stepped
    monkeypatch.setattr("agent.faults.stressor.find_marked", lambda marker: {})  # and no scan to fall back on
    await inj.revert(plan, ctx)
    assert all(gone(pid) for pid in applied.stressor_pids or []), "an owned stressor outlived its revert"


async def test_a_stop_out_of_file_descriptors_still_kills_its_own_stressors(
    env: AgentEnv, cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: with the descriptors used up (a 1000-worker fault holds a leash pipe each,
    and a stop opens a pidfd each), pidfd_open failed with EMFILE out of the loop, leaking the
    pidfds opened so far and killing nothing more. Our own unreaped children are now killed
    without one and waited for by polling."""
    inj, ctx = CpuStress(env), ctx_for(env)
    spec = CpuSpec(load=10, workers=2, duration="30s")
    plan = await inj.plan(spec, ctx)
    applied = await inj.apply(spec, plan, ctx)

    def no_descriptors(pid: int, *args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("agent.faults.stressor.os.pidfd_open", no_descriptors)
    monkeypatch.setattr("agent.faults.stressor.find_marked", lambda marker: {})
    await inj.revert(plan, ctx)
    assert all(gone(pid) for pid in applied.stressor_pids or []), "a stressor outlived its revert"
