"""Faults that wait for their start (Inject.await_start, Start): in-process, fake backend, no NATS.

The engine dispatches every fault to every target this way, so an experiment
either starts everywhere or nowhere; what is asserted here is the agent's half:
nothing is applied, journaled or spawned before the Start, and every end path
(revert, lease lapse, deadline, halt, stop) reports a waiting fault's end.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentSettings
from agent.faults.base import AgentEnv, FaultContext, Injector, Plan
from agent.runtime import AgentRuntime
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, FaultEvent, Halt, Inject, Measurements, Revert, Start
from proto.subjects import exp_start
from tests.conftest import async_wait_until


class CountingPlan(Plan):
    pass


class Counting(Injector):
    """Counts what the runtime asked of it."""

    kind = "process-pause"
    plan_model = CountingPlan

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.planned: list[str] = []
        self.applied: list[str] = []
        self.reverted: list[str] = []

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        self.planned.append(ctx.fault_id)
        return CountingPlan()

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        self.applied.append(ctx.fault_id)
        return Measurements()

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        self.reverted.append(ctx.fault_id)
        return Measurements()


class Events(list[FaultEvent]):
    def states(self, fid: str) -> list[str]:
        return [e.state for e in self if e.fault_id == fid]


@pytest.fixture
def rt(tmp_path: Path) -> tuple[AgentRuntime, Counting, Events]:
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "n1"})
    env = AgentEnv(node="n1", state_dir=tmp_path, instance_id="t", protected_pids=dict)
    inj = Counting(env)
    runtime = AgentRuntime(settings, injectors={"process-pause": inj})
    runtime.capabilities = ["process-pause"]
    events = Events()

    async def capture(subject: str, payload: bytes) -> None:
        if not subject.endswith(".hb"):  # heartbeats (after a halt) are not events
            events.append(decode(payload, FaultEvent))

    runtime.connected = True  # events go to capture(), not to a NATS connection
    runtime.publish = capture  # type: ignore[method-assign]
    return runtime, inj, events


def inject(fid: str = "e.0", lease_s: float = 30.0, expires_in_s: float = 30.0, exp: str = "e") -> bytes:
    return encode(
        Inject(
            experiment_id=exp,
            fault_id=fid,
            spec={"kind": "process-pause", "match": {"pid": 99999}},
            expires_at=time.time() + expires_in_s,
            lease_timeout_s=lease_s,
            await_start=True,
        )
    )


def start(exp: str = "e", fault_ids: list[str] | None = None, expires_in_s: float = 60.0) -> bytes:
    return encode(Start(experiment_id=exp, fault_ids=fault_ids, expires_at=time.time() + expires_in_s))


async def ack(runtime: AgentRuntime, payload: bytes) -> Ack:
    return decode(await runtime.handle_command(payload), Ack)


async def settle(runtime: AgentRuntime) -> None:
    for rec in list(runtime.faults.values()):
        rec.request_end("test over")
    await asyncio.wait_for(asyncio.gather(*(r.finished.wait() for r in list(runtime.faults.values()))), 5)
    runtime.stop_watchdog()
    await runtime.flush_cleanup()


async def test_a_waiting_fault_touches_nothing_until_its_start(rt: Any) -> None:
    runtime, inj, events = rt
    try:
        a = await ack(runtime, inject())
        assert a.accepted and a.fault_states == {"e.0": "accepted"}
        rec = runtime.faults["e.0"]
        await asyncio.sleep(0.05)  # would be ample for a fault that starts on acceptance
        assert rec.waiting and rec.task is None and rec.state == "accepted"
        assert inj.planned == [] and inj.applied == [], "applied before its start"
        assert runtime.journal.fault_ids() == [], "journaled before its start"
        assert events == [], "an event before its start"
        assert [f.state for f in runtime.heartbeat().faults] == ["accepted"]

        s = await ack(runtime, start(fault_ids=["e.0"]))
        assert s.accepted and s.fault_states == {"e.0": "injecting"}
        await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active after its start")
        assert inj.applied == ["e.0"] and runtime.journal.fault_ids() == ["e.0"]
        assert events.states("e.0") == ["active"], "a quick injection goes straight to active"

        again = await ack(runtime, start())  # the broadcast and a per-node start may both arrive
        assert again.accepted and again.fault_states == {"e.0": "active"}
        assert inj.planned == ["e.0"], "started twice"
    finally:
        await settle(runtime)


async def test_the_broadcast_start_starts_only_its_experiment(rt: Any) -> None:
    runtime, inj, _ = rt
    try:
        assert (await ack(runtime, inject("e.0", exp="e"))).accepted
        assert (await ack(runtime, inject("other.0", exp="other"))).accepted

        class Msg:
            subject = exp_start("e")
            data = start("e")

        await runtime._on_start(Msg())  # type: ignore[arg-type]
        await async_wait_until(lambda: inj.applied == ["e.0"], 2, "e.0 to be applied")
        assert runtime.faults["other.0"].waiting, "a start of one experiment started another's fault"

        class Garbage:
            subject = exp_start("other")
            data = b'{"type": "start"'

        before = runtime.rejected_count
        await runtime._on_start(Garbage())  # type: ignore[arg-type]
        assert runtime.rejected_count == before + 1 and runtime.faults["other.0"].waiting
    finally:
        await settle(runtime)


@pytest.mark.parametrize("end", ["revert", "halt", "lease", "deadline", "stop"])
async def test_a_waiting_fault_that_ends_reports_it_and_applied_nothing(rt: Any, end: str) -> None:
    runtime, inj, events = rt
    lease_s, expires_in_s = (0.2, 30.0) if end == "lease" else (30.0, 0.3) if end == "deadline" else (30.0, 30.0)
    try:
        assert (await ack(runtime, inject(lease_s=lease_s, expires_in_s=expires_in_s))).accepted
        rec = runtime.faults["e.0"]
        if end == "revert":
            cmd = Revert(experiment_id="e", reason="operator", expires_at=time.time() + 10)
            assert (await ack(runtime, encode(cmd))).accepted
        elif end == "halt":

            class HaltMsg:
                subject = subjects.HALT
                data = encode(Halt(reason="test", issued_by="pytest"))

            await runtime._on_halt(HaltMsg())  # type: ignore[arg-type]
        elif end == "stop":
            runtime.stopping = True
            runtime.end_all("agent stopping (SIGTERM)")
        await asyncio.wait_for(rec.finished.wait(), 3)
        runtime.stopping = False  # (a stopping agent refuses every command; the checks below are about the fault)
        expected = {
            "lease": "lease lapsed",
            "deadline": "deadline reached",
            "revert": "requested: operator",
            "halt": "halt: test (by pytest)",
        }
        assert rec.end_reason is not None and rec.end_reason.startswith(expected.get(end, rec.end_reason[:4]))
        assert rec.end_reason.endswith("before its start: nothing was applied"), rec.end_reason
        # a fault whose deadline passed before its start never ran: failed, not expired
        assert rec.state == ("failed" if end == "deadline" else "reverted")
        assert inj.planned == [] and inj.applied == [] and inj.reverted == []
        assert events.states("e.0") == [rec.state], "one event: the end"
        assert "e.0" not in runtime.faults and runtime.ended["e.0"] == rec.state
        # a late start changes nothing, and the fault is never re-injected by a replayed Inject
        assert (await ack(runtime, start(fault_ids=["e.0"]))).fault_states == {"e.0": rec.state}
        assert not (await ack(runtime, inject())).accepted
        assert inj.applied == []
    finally:
        runtime.stopping = False
        await settle(runtime)


async def test_a_start_that_arrives_too_late_or_while_stopping_is_refused(rt: Any) -> None:
    runtime, inj, _ = rt
    try:
        assert (await ack(runtime, inject())).accepted
        late = await ack(runtime, start(expires_in_s=-1))
        assert not late.accepted and late.reason is not None and late.reason.startswith("expired")
        runtime.stopping = True
        stopping = await ack(runtime, start())
        assert not stopping.accepted and stopping.reason == "agent is stopping"
        assert inj.applied == [] and runtime.faults["e.0"].waiting
    finally:
        runtime.stopping = False
        await settle(runtime)


async def test_a_start_of_an_unknown_experiment_is_answered_with_no_states(rt: Any) -> None:
    runtime, _, _ = rt
    a = await ack(runtime, start("nobody", fault_ids=["nobody.0"]))
    assert a.accepted and a.fault_states == {}


async def test_an_injection_that_takes_a_while_says_injecting_first(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "n1"})
    env = AgentEnv(node="n1", state_dir=tmp_path, instance_id="t", protected_pids=dict)

    class Slow(Counting):
        async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
            await asyncio.sleep(0.5)  # longer than INJECTING_EVENT_AFTER_S
            return await super().plan(spec, ctx)

    runtime = AgentRuntime(settings, injectors={"process-pause": Slow(env)})
    runtime.capabilities = ["process-pause"]
    events = Events()

    async def capture(subject: str, payload: bytes) -> None:
        events.append(decode(payload, FaultEvent))

    runtime.connected = True
    runtime.publish = capture  # type: ignore[method-assign]
    try:
        assert (await ack(runtime, inject())).accepted
        assert (await ack(runtime, start())).accepted
        rec = runtime.faults["e.0"]
        await async_wait_until(lambda: rec.state == "active", 3, "the slow fault to become active")
        assert events.states("e.0") == ["injecting", "active"]
    finally:
        await settle(runtime)


async def test_a_revert_right_after_the_start_applies_nothing(rt: Any) -> None:
    runtime, inj, _ = rt
    try:
        assert (await ack(runtime, inject())).accepted
        assert (await ack(runtime, start())).accepted  # launched: its task has not run yet
        cmd = Revert(experiment_id="e", reason="changed my mind", expires_at=time.time() + 10)
        assert (await ack(runtime, encode(cmd))).accepted  # in the same tick
        rec = runtime.faults.get("e.0")
        if rec is not None:
            await asyncio.wait_for(rec.finished.wait(), 3)
        assert inj.planned == [] and inj.applied == [], "applied although reverted before it ran"
        assert runtime.ended["e.0"] == "reverted"
    finally:
        await settle(runtime)


async def test_a_start_after_the_deadline_or_after_the_experiment_ended_starts_nothing(rt: Any) -> None:
    runtime, inj, events = rt
    try:
        assert (await ack(runtime, inject("e.0", expires_in_s=0.2))).accepted
        assert (await ack(runtime, inject("e.1"))).accepted
        rec0 = runtime.faults["e.0"]
        assert rec0.timer is not None, "a waiting fault has its own deadline timer"
        rec0.timer.cancel()  # as if the loop were late: the start comes before the timer fires
        runtime.stop_watchdog()
        await asyncio.sleep(0.3)
        runtime.remember(runtime.ended_experiments, "e", "lease lapsed")  # a sibling's lease lapsed
        s = await ack(runtime, start())
        assert s.accepted
        await async_wait_until(lambda: not runtime.faults, 3, "both faults to end")
        assert inj.planned == [] and inj.applied == []
        assert runtime.ended["e.0"] == "failed" and runtime.ended["e.1"] == "reverted"
        reasons = {e.fault_id: e.reason or "" for e in events}
        assert reasons["e.0"].startswith("deadline reached; it ended before its start"), reasons
        assert reasons["e.1"].startswith("experiment e lease lapsed; it ended before its start"), reasons
    finally:
        await settle(runtime)


async def test_a_stop_ends_waiting_faults_and_leaves_no_watchdog(rt: Any) -> None:
    runtime, inj, events = rt
    assert (await ack(runtime, inject("e.0"))).accepted
    assert (await ack(runtime, inject("e.1", exp="other"))).accepted
    assert runtime._watchdog_timer is not None
    await asyncio.wait_for(runtime.shutdown(), 10)
    assert runtime.faults == {} and inj.applied == []
    assert sorted(e.fault_id for e in events if e.state == "reverted") == ["e.0", "e.1"]
    assert runtime._watchdog_timer is None
    runtime.poke_watchdog(0.0)  # a late poke (a disconnect callback) does not re-arm it
    assert runtime._watchdog_timer is None
