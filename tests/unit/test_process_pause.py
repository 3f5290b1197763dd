"""Overlapping process-pause faults on one agent: a process is held by one fault at a time.

The injector is driven directly (no runtime, no NATS) against real victim
processes started by the test, each matched by a command line only it has.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from agent.faults.base import AgentEnv, FaultContext, Rejected
from agent.faults.process import ProcessPause, ProcessPlan, left_stopped_reason
from proto.faults import ProcessPauseSpec
from proto.messages import Measurements
from tests.conftest import Victims, async_wait_until, status


def make_injector(tmp_path: Path) -> ProcessPause:
    return ProcessPause(AgentEnv(node="n", state_dir=tmp_path, instance_id="t", protected_pids=dict))


def ctx(inj: ProcessPause, fault_id: str, recovered: bool = False) -> FaultContext:
    def emit(*_args: object) -> None:
        pass

    return FaultContext(
        fault_id=fault_id,
        experiment_id=fault_id.split(".")[0],
        deadline=time.time() + 30,
        pods=None,
        env=inj.env,
        emit=emit,
        recovered=recovered,
    )


def spec(regex: str) -> ProcessPauseSpec:
    return ProcessPauseSpec.model_validate({"match": {"cmdline": regex}})


async def pause(inj: ProcessPause, fault_id: str, regex: str) -> tuple[ProcessPlan, Measurements]:
    c = ctx(inj, fault_id)
    plan = await inj.plan(spec(regex), c)
    assert isinstance(plan, ProcessPlan)
    return plan, await inj.apply(spec(regex), plan, c)


async def wait_status(proc: psutil.Process, stopped: bool, what: str) -> None:
    await async_wait_until(lambda: (status(proc) == psutil.STATUS_STOPPED) == stopped, 3, what)


async def assert_stays_stopped(proc: psutil.Process, for_s: float, why: str) -> None:
    """Polled for ``for_s``: a SIGCONT sent before this call would show within it."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        assert status(proc) == psutil.STATUS_STOPPED, why
        await asyncio.sleep(0.02)


def reasons(plan_or_m: ProcessPlan | Measurements) -> dict[int, str]:
    return {s.pid: s.reason for s in plan_or_m.skipped or []}


async def test_a_process_held_by_one_pause_is_skipped_by_another_which_then_fails(
    tmp_path: Path, victims: Victims
) -> None:
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-one")
    regex = f"{victims.token}-one$"
    plan_a, _ = await pause(inj, "a.0", regex)
    await wait_status(proc, True, "the victim paused by a.0")

    with pytest.raises(Rejected) as refused:
        await inj.plan(spec(regex), ctx(inj, "b.0"))
    reason = str(refused.value)
    assert reason.startswith("no process matches"), reason
    assert f"{proc.pid} (already paused by fault a.0)" in reason, reason

    await assert_stays_stopped(proc, 0.2, "the victim resumed while a.0 holds it")
    m = await inj.revert(plan_a, ctx(inj, "a.0"))
    assert m.resumed_pids == [proc.pid]
    await wait_status(proc, False, "the victim resumed by a.0's revert")


async def test_a_second_pause_takes_only_the_process_that_is_free(tmp_path: Path, victims: Victims) -> None:
    inj = make_injector(tmp_path)
    held, free = victims.start(1, "-1")[0], victims.start(1, "-2")[0]
    plan_a, _ = await pause(inj, "a.0", f"{victims.token}-1$")
    await wait_status(held, True, "the first victim paused by a.0")

    plan_b, m_b = await pause(inj, "b.0", f"{victims.token}-[12]$")
    assert [t.pid for t in plan_b.targets] == [free.pid]
    assert plan_b.matched_pids == [free.pid]
    assert reasons(plan_b) == {held.pid: "already paused by fault a.0"}
    assert m_b.hit_pids == [free.pid]
    assert reasons(m_b) == {held.pid: "already paused by fault a.0"}, "the skip is not in b.0's report"
    await wait_status(free, True, "the second victim paused by b.0")

    m_a = await inj.revert(plan_a, ctx(inj, "a.0"))
    assert m_a.resumed_pids == [held.pid]
    await wait_status(held, False, "the first victim resumed by a.0's revert")
    await assert_stays_stopped(free, 0.2, "a.0's revert resumed b.0's victim")

    m_b = await inj.revert(plan_b, ctx(inj, "b.0"))
    assert m_b.resumed_pids == [free.pid]
    await wait_status(free, False, "the second victim resumed by b.0's revert")


@pytest.mark.parametrize("end", ["revert", "release"])
async def test_once_the_first_fault_ends_its_process_can_be_paused_again(
    tmp_path: Path, victims: Victims, end: str
) -> None:
    """Its hold goes at its revert, and at release() for an end that never got to one."""
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-again")
    regex = f"{victims.token}-again$"
    plan_a, _ = await pause(inj, "a.0", regex)
    await wait_status(proc, True, "the victim paused by a.0")
    if end == "revert":
        await inj.revert(plan_a, ctx(inj, "a.0"))
    else:
        inj.release(ctx(inj, "a.0"))
        os.kill(proc.pid, signal.SIGCONT)  # our own victim: resumed without a.0's revert
    await wait_status(proc, False, "the victim resumed")

    plan_b, m_b = await pause(inj, "b.0", regex)
    assert [t.pid for t in plan_b.targets] == [proc.pid] and m_b.hit_pids == [proc.pid]
    assert not plan_b.skipped, plan_b.skipped
    await wait_status(proc, True, "the victim paused again by b.0")
    await inj.revert(plan_b, ctx(inj, "b.0"))
    await wait_status(proc, False, "the victim resumed by b.0's revert")


async def test_a_repeated_revert_never_resumes_a_process_another_fault_holds(tmp_path: Path, victims: Victims) -> None:
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-twice")
    regex = f"{victims.token}-twice$"
    plan_a, _ = await pause(inj, "a.0", regex)
    await inj.revert(plan_a, ctx(inj, "a.0"))
    await wait_status(proc, False, "the victim resumed by a.0's revert")
    plan_b, _ = await pause(inj, "b.0", regex)
    await wait_status(proc, True, "the victim paused by b.0")

    again = await inj.revert(plan_a, ctx(inj, "a.0"))  # revert is idempotent: it may come twice
    assert again.resumed_pids == []  # a.0 stops nothing any more: nothing of it to resume
    # the same revert from the journal (what a.0 stopped is not known there): the hold is named
    recovered = await inj.revert(plan_a, ctx(inj, "a.0", recovered=True))
    assert recovered.resumed_pids == []
    assert reasons(recovered) == {proc.pid: "not resumed: still paused by fault b.0"}
    await assert_stays_stopped(proc, 0.2, "a.0's second revert resumed b.0's victim")

    m_b = await inj.revert(plan_b, ctx(inj, "b.0"))
    assert m_b.resumed_pids == [proc.pid]
    await wait_status(proc, False, "the victim resumed by b.0's revert")


async def test_journal_recovery_reverts_its_pause_and_spares_a_live_one(tmp_path: Path, victims: Victims) -> None:
    """A paused fault reverted from its journaled plan: by a fresh injector (the agent restarted)
    it resumes the process and holds nothing after; beside a live pause it leaves that one's be."""
    before = make_injector(tmp_path)  # the agent run that crashed with a.0 active
    (proc,) = victims.start(1, "-journal")
    regex = f"{victims.token}-journal$"
    plan_a, _ = await pause(before, "a.0", regex)
    await wait_status(proc, True, "the victim paused by a.0")
    journaled = plan_a.model_dump(mode="json")

    inj = make_injector(tmp_path)  # the next run: recovery reverts what the journal holds
    m = await inj.revert(inj.load_plan(journaled), ctx(inj, "a.0", recovered=True))
    assert m.resumed_pids == [proc.pid]
    await wait_status(proc, False, "the victim resumed by the recovered revert")

    plan_b, _ = await pause(inj, "b.0", regex)
    assert [t.pid for t in plan_b.targets] == [proc.pid], "recovery left a hold behind"
    await wait_status(proc, True, "the victim paused by b.0 after recovery")
    m = await inj.revert(inj.load_plan(journaled), ctx(inj, "a.0", recovered=True))
    assert m.resumed_pids == [] and reasons(m) == {proc.pid: "not resumed: still paused by fault b.0"}
    await assert_stays_stopped(proc, 0.2, "a journaled revert resumed b.0's victim")
    await inj.revert(plan_b, ctx(inj, "b.0"))
    await wait_status(proc, False, "the victim resumed by b.0's revert")


async def test_two_plans_at_once_take_the_process_once(tmp_path: Path, victims: Victims) -> None:
    """Each plan scans in a worker thread; the hold is checked and taken after, with no await between."""
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-race")
    regex = f"{victims.token}-race$"
    results = await asyncio.gather(
        inj.plan(spec(regex), ctx(inj, "a.0")), inj.plan(spec(regex), ctx(inj, "b.0")), return_exceptions=True
    )
    plans = [r for r in results if isinstance(r, ProcessPlan)]
    refusals = [str(r) for r in results if isinstance(r, Rejected)]
    assert len(plans) == 1 and len(refusals) == 1, results
    winner = "a.0" if results[0] is plans[0] else "b.0"
    assert f"{proc.pid} (already paused by fault {winner})" in refusals[0], refusals[0]
    await inj.revert(plans[0], ctx(inj, winner))


async def test_a_process_stopped_by_someone_else_is_never_paused_nor_resumed(tmp_path: Path, victims: Victims) -> None:
    """Two agents on one host (a local run beside the node's DaemonSet agent), or job control,
    or a debugger: a process already stopped is skipped, so no revert of ours ends their stop."""
    other_agent = make_injector(tmp_path / "other")
    ours = make_injector(tmp_path / "ours")
    (proc,) = victims.start(1, "-shared")
    regex = f"{victims.token}-shared$"
    plan_other, _ = await pause(other_agent, "x.0", regex)
    await wait_status(proc, True, "the victim paused by the other agent")

    with pytest.raises(Rejected) as refused:
        await ours.plan(spec(regex), ctx(ours, "y.0"))
    assert "already stopped, not by this agent" in str(refused.value), refused.value
    await assert_stays_stopped(proc, 0.2, "our refused plan resumed the other agent's pause")

    # someone's plain SIGSTOP (job control) is respected the same way, and shows in a preview
    await other_agent.revert(plan_other, ctx(other_agent, "x.0"))
    await wait_status(proc, False, "the victim resumed by the other agent's revert")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        await wait_status(proc, True, "the victim stopped by hand")
        preview = await ours.preview(spec(regex), ctx(ours, "y.1"))
        assert preview.would_hit == 0 and [s.pid for s in preview.skipped] == [proc.pid]
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def test_a_cmdline_regex_that_backtracks_without_end_is_refused_and_never_freezes_the_agent(
    tmp_path: Path, victims: Victims
) -> None:
    """stdlib re would hold the interpreter lock for as long as it backtracks (hours, for a long
    enough command line): heartbeats, the lease watchdog and every deadline timer with it."""
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-" + "a" * 40 + "!")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        t0 = time.monotonic()
        with pytest.raises(Rejected, match=r"match.cmdline: the regular expression took over 50 ms .* simplify it"):
            await inj.plan(spec("(a|aa)+$"), ctx(inj, "slow.0"))
        took = time.monotonic() - t0
    finally:
        ticker.cancel()
    assert ticks >= took / 0.01 / 4, f"the event loop starved: {ticks} ticks in {took:.2f}s"
    assert status(proc) != psutil.STATUS_STOPPED


async def test_a_revert_resumes_only_what_its_apply_stopped(tmp_path: Path, victims: Victims) -> None:
    """Stopped by someone else between the selection and the SIGSTOP (the journal's fsync lies
    between): skipped by the apply, and left stopped by the revert. A fault that ended before
    its apply resumes nothing."""
    inj = make_injector(tmp_path)
    mine, theirs = victims.start(1, "-mine")[0], victims.start(1, "-theirs")[0]
    regex = f"{victims.token}-(mine|theirs)$"
    c = ctx(inj, "r.0")
    plan = await inj.plan(spec(regex), c)
    assert sorted(t.pid for t in plan.targets) == sorted([mine.pid, theirs.pid])
    os.kill(theirs.pid, signal.SIGSTOP)  # someone else, after our selection
    try:
        await wait_status(theirs, True, "the second victim stopped by someone else")
        m = await inj.apply(spec(regex), plan, c)
        assert m.hit_pids == [mine.pid]
        assert reasons(m) == {
            theirs.pid: "already stopped, not by this agent: resuming it at the revert would undo that stop"
        }
        back = await inj.revert(plan, c)
        assert back.resumed_pids == [mine.pid] and back.hit_pids == [mine.pid]
        await wait_status(mine, False, "our victim resumed")
        await assert_stays_stopped(theirs, 0.2, "our revert ended someone else's stop")

        c2 = ctx(inj, "r.1")
        os.kill(theirs.pid, signal.SIGCONT)
        await wait_status(theirs, False, "the second victim resumed by its owner")
        plan2 = await inj.plan(spec(regex), c2)
        os.kill(theirs.pid, signal.SIGSTOP)  # a fault that ends before its apply stopped nothing
        await wait_status(theirs, True, "the second victim stopped again by someone else")
        unapplied = await inj.revert(plan2, c2)
        assert unapplied.resumed_pids == []
        await assert_stays_stopped(theirs, 0.2, "an unapplied fault's revert resumed a process")
    finally:
        os.kill(theirs.pid, signal.SIGCONT)


async def test_a_target_the_agent_may_not_signal_is_skipped_and_the_others_are_paused_and_resumed(
    tmp_path: Path, victims: Victims, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EPERM on one target (a non-root agent, a security module) must not stop the loop half way:
    before, the apply raised with the first target stopped and unrecorded, and the revert then
    resumed nothing, so that process stayed stopped for good."""
    inj = make_injector(tmp_path)
    first, denied = victims.start(1, "-ok")[0], victims.start(1, "-denied")[0]
    regex = f"{victims.token}-(ok|denied)$"
    real = signal.pidfd_send_signal
    refuse = {"pid": denied.pid}

    def guarded(pidfd: int, signum: int, *args: object) -> None:
        if _pid_of(pidfd) == refuse["pid"]:
            raise PermissionError(1, "Operation not permitted")
        real(pidfd, signum, *args)

    monkeypatch.setattr("agent.faults.process.signal.pidfd_send_signal", guarded)
    c = ctx(inj, "eperm.0")
    plan = await inj.plan(spec(regex), c)
    # the denied one sorts either side of the other: the loop goes on past it either way
    m = await inj.apply(spec(regex), plan, c)
    assert m.hit_pids == [first.pid], m
    assert reasons(m)[denied.pid].startswith("not permitted to signal it"), reasons(m)
    await wait_status(first, True, "the permitted victim paused")
    narrowed = inj.applied(plan, c)
    assert narrowed is not None and [t.pid for t in narrowed.targets] == [first.pid]

    # a revert that cannot resume one target still resumes the others, and fails (its entry is kept)
    refuse["pid"] = first.pid
    with pytest.raises(RuntimeError, match=f"not resumed: {first.pid}: not permitted"):
        await inj.revert(plan, c)
    # a new pause of the process left stopped is told which of this agent's faults holds it
    again = ctx(inj, "eperm.1")
    with pytest.raises(Rejected) as refused:
        await inj.plan(spec(f"{victims.token}-ok$"), again)
    assert f"{first.pid} ({left_stopped_reason('eperm.0')})" in str(refused.value), refused.value
    refuse["pid"] = -1
    back = await inj.revert(plan, c)  # the retry
    assert back.resumed_pids == [first.pid]
    await wait_status(first, False, "the victim resumed by the retried revert")
    assert inj.left_stopped_by(first.pid, first.create_time()) is None


def _pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


async def test_the_apply_settles_only_once_its_processes_are_stopped(tmp_path: Path, victims: Victims) -> None:
    """Found by a review: "active" went out as soon as the SIGSTOPs were sent, and a victim
    could still be running when the controller read it. Read at once after the apply and its
    settle, with nothing awaited in between, every victim is stopped."""
    inj = make_injector(tmp_path)
    procs = victims.start(5, "-confirm")
    c = ctx(inj, "c.0")
    plan = await inj.plan(spec(f"{victims.token}-confirm$"), c)
    await inj.apply(spec(f"{victims.token}-confirm$"), plan, c)
    try:
        assert await inj.settle(plan, c) is None
        assert [status(p) for p in procs] == [psutil.STATUS_STOPPED] * 5
    finally:
        await inj.revert(plan, c)


@pytest.fixture
def resumed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SIGSTOP is followed at once by a SIGCONT from "someone else": the target never stops."""
    import agent.faults.process as process

    monkeypatch.setattr(process, "STOP_CONFIRM_S", 0.3)
    real_signal = process._signal

    def stop_then_resume(target: process.Target, signum: int) -> bool:
        sent = real_signal(target, signum)
        if signum == signal.SIGSTOP:
            os.kill(target.pid, signal.SIGCONT)
        return sent

    monkeypatch.setattr(process, "_signal", stop_then_resume)


async def test_a_process_resumed_right_after_its_sigstop_is_named_by_the_settle(
    tmp_path: Path, victims: Victims, resumed_at_once: None
) -> None:
    """A SIGSTOP that has not taken effect within STOP_CONFIRM_S (a process in uninterruptible
    sleep, or one that someone resumed at once) is said in the "active" event's note."""
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-resumed")
    c = ctx(inj, "r.0")
    plan = await inj.plan(spec(f"{victims.token}-resumed$"), c)
    m = await inj.apply(spec(f"{victims.token}-resumed$"), plan, c)
    try:
        started = time.monotonic()
        note = await inj.settle(plan, c)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert note is not None and note.startswith(f"1 process(es) not stopped 0.3 s after their SIGSTOP ({proc.pid})")
        assert m.hit_pids == [proc.pid]
    finally:
        await inj.revert(plan, c)


async def test_the_settle_stops_waiting_when_the_fault_ends(
    tmp_path: Path, victims: Victims, resumed_at_once: None
) -> None:
    """From a review: a revert or halt that came during the wait for the stops waited with it."""
    inj = make_injector(tmp_path)
    victims.start(1, "-ending")
    ended = False
    c = dataclasses.replace(ctx(inj, "e.0"), ending=lambda: ended)
    plan = await inj.plan(spec(f"{victims.token}-ending$"), c)
    await inj.apply(spec(f"{victims.token}-ending$"), plan, c)
    try:

        def end() -> None:
            nonlocal ended
            ended = True

        asyncio.get_running_loop().call_later(0.05, end)
        started = time.monotonic()
        assert await inj.settle(plan, c) is None
        assert time.monotonic() - started < 0.2
    finally:
        await inj.revert(plan, c)


async def test_a_target_that_died_before_its_sigstop_does_not_hold_the_settle(tmp_path: Path, victims: Victims) -> None:
    """From a review: a zombie counted as "not stopped yet", so the settle waited its whole bound
    and blamed uninterruptible sleep."""
    inj = make_injector(tmp_path)
    (proc,) = victims.start(1, "-zombie")
    c = ctx(inj, "z.0")
    plan = await inj.plan(spec(f"{victims.token}-zombie$"), c)
    proc.kill()  # the test's own child, not reaped: a zombie from here on (the fixture reaps it)
    await async_wait_until(lambda: status(proc) == psutil.STATUS_ZOMBIE, 5, "the victim to be a zombie")
    await inj.apply(spec(f"{victims.token}-zombie$"), plan, c)
    started = time.monotonic()
    assert await inj.settle(plan, c) is None
    assert time.monotonic() - started < 0.5
    await inj.revert(plan, c)
