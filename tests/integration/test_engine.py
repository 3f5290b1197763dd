"""ExperimentRunner against a real nats-server and scripted in-process agents.

The scripted agent speaks the wire protocol (heartbeats, Ack, FaultEvent) and
lets a test make it restart, leave, go silent or reject, which a real agent
cannot be told to do on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from controller.engine import ExperimentRunner
from controller.experiment import Experiment, parse_experiment
from controller.fleet import Fleet
from controller.tracking import PreflightError
from proto.codec import decode, decode_command, encode
from proto.messages import SCHEMA_VERSION, Ack, EndedFault, FaultEvent, Heartbeat, Inject, Lease, Revert, Start
from proto.subjects import ALL_ABORTS, ALL_LEASES, ALL_STARTS, agent_cmd, agent_hb, exp_control, exp_events
from tests.conftest import async_wait_until

pytestmark = pytest.mark.integration


class ScriptedAgent:
    def __init__(self, nc: Any, node: str, capabilities: list[str] | None = None, schema: str = SCHEMA_VERSION) -> None:
        self.nc, self.node = nc, node
        self.schema = schema  # "1.1": an agent from before the start phase (applies on acceptance)
        self.capabilities = capabilities or ["process-kill", "process-pause"]
        self.instance_id = uuid.uuid4().hex
        self.state = "ready"
        self.silent = False
        self.reject: str | None = None
        self.hear_broadcasts = True  # False: as if the abort and start broadcasts were lost for this agent
        self.forget_waiting = False  # True: as if it restarted between accepting and the start
        self.refuse_start: str | None = None  # a reason: per-node Starts are refused with it
        self.ack_schema = schema  # "1.1" while heartbeats say 1.2: as if downgraded mid-run
        self.drop_events = False  # simulate events lost in flight (core NATS is at-most-once)
        self.stuck_reverts = False  # True: Reverts are acknowledged and never carried out (a hung revert)
        self.ended: list[EndedFault] = []
        self.held: dict[str, Inject] = {}  # applied
        self.waiting: dict[str, Inject] = {}  # accepted with await_start, nothing applied yet
        self.applied: list[str] = []  # every fault id ever applied, in order
        self.starts: list[Start] = []  # per-node Start commands received
        self.reverts: list[Revert] = []
        self.leases: list[Lease] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._seq = 0

    async def start(self) -> ScriptedAgent:
        self._subs.append(await self.nc.subscribe(agent_cmd(self.node), cb=self._on_cmd))
        self._subs.append(await self.nc.subscribe(ALL_LEASES, cb=self._on_lease))
        self._subs.append(await self.nc.subscribe(ALL_ABORTS, cb=self._on_abort))
        self._subs.append(await self.nc.subscribe(ALL_STARTS, cb=self._on_start))
        self._spawn(self._heartbeats())
        await self._beat()
        return self

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._subs:
            with contextlib.suppress(Exception):
                await s.unsubscribe()

    async def _beat(self) -> None:
        self._seq += 1
        hb = Heartbeat(
            schema_version=self.schema,
            node=self.node,
            instance_id=self.instance_id,
            version="test",
            capabilities=self.capabilities,
            capability_notes={"cpu": "cpu: not in this scripted agent"},
            state=self.state,  # type: ignore[arg-type]
            interval_s=0.2,
            seq=self._seq,
            started_at=0.0,
            ended=self.ended,
        )
        await self.nc.publish(agent_hb(self.node), encode(hb))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if not self.silent:
                await self._beat()

    async def _event(self, inject: Inject | None, fid: str, exp_id: str, state: str, reason: str | None = None) -> None:
        ev = FaultEvent(
            experiment_id=exp_id,
            fault_id=fid,
            node=self.node,
            kind=inject.spec.kind if inject else "process-pause",
            state=state,  # type: ignore[arg-type]
            reason=reason,
        )
        if state in ("reverted", "expired", "failed"):
            self.ended.append(
                EndedFault(
                    fault_id=fid, experiment_id=exp_id, kind=ev.kind, state=ev.state, reason=reason, at=time.time()
                )
            )
        if not self.drop_events:
            await self.nc.publish(exp_events(exp_id), encode(ev))

    async def _on_abort(self, msg: Any) -> None:
        if self.hear_broadcasts:
            await self._revert(decode(msg.data, Revert))

    async def _on_start(self, msg: Any) -> None:
        if self.hear_broadcasts and self.schema == SCHEMA_VERSION:
            await self._start(decode(msg.data, Start))

    async def _start(self, cmd: Start) -> dict[str, Any]:
        if self.forget_waiting:
            self.waiting.clear()
        states: dict[str, Any] = {}
        for fid, inj in list(self.waiting.items()):
            if inj.experiment_id == cmd.experiment_id:
                del self.waiting[fid]
                await self._apply(inj)
        # as the real agent: the state of every fault of the experiment it holds or recently ended
        for fid, inj in self.held.items():
            if inj.experiment_id == cmd.experiment_id:
                states[fid] = "active"
        for e in self.ended:
            if e.experiment_id == cmd.experiment_id and e.fault_id in (cmd.fault_ids or []):
                states[e.fault_id] = e.state
        return states

    async def _apply(self, inj: Inject) -> None:
        self.held[inj.fault_id] = inj
        self.applied.append(inj.fault_id)
        await self._event(inj, inj.fault_id, inj.experiment_id, "active")
        self._spawn(self._expire(inj))

    async def _revert(self, cmd: Revert) -> None:
        self.reverts.append(cmd)
        if self.stuck_reverts:
            return
        for fid, inj in list(self.waiting.items()):
            if inj.experiment_id == cmd.experiment_id:
                del self.waiting[fid]
                await self._event(inj, fid, cmd.experiment_id, "reverted", f"requested: {cmd.reason}; before its start")
        for fid, inj in list(self.held.items()):
            if inj.experiment_id == cmd.experiment_id:
                del self.held[fid]
                await self._event(inj, fid, cmd.experiment_id, "reverted", f"requested: {cmd.reason}")

    async def _on_lease(self, msg: Any) -> None:
        self.leases.append(decode(msg.data, Lease))

    async def _on_cmd(self, msg: Any) -> None:
        cmd = decode_command(msg.data)
        if isinstance(cmd, Inject):
            if self.reject:
                await msg.respond(encode(Ack(in_reply_to=cmd.id, node=self.node, accepted=False, reason=self.reject)))
                return
            ack = Ack(
                schema_version=self.ack_schema,
                in_reply_to=cmd.id,
                node=self.node,
                accepted=True,
                fault_states={cmd.fault_id: "accepted"},
            )
            if cmd.await_start and self.ack_schema == SCHEMA_VERSION:
                self.waiting[cmd.fault_id] = cmd
                await msg.respond(encode(ack))
            else:  # an older agent ignores await_start: it applies on acceptance
                await msg.respond(encode(ack))
                await self._apply(cmd)
        elif isinstance(cmd, Start):
            self.starts.append(cmd)
            if self.refuse_start:
                await msg.respond(
                    encode(Ack(in_reply_to=cmd.id, node=self.node, accepted=False, reason=self.refuse_start))
                )
                return
            states = await self._start(cmd)
            await msg.respond(encode(Ack(in_reply_to=cmd.id, node=self.node, accepted=True, fault_states=states)))
        else:
            await msg.respond(encode(Ack(in_reply_to=cmd.id, node=self.node, accepted=True)))
            await self._revert(cmd)

    async def _expire(self, inject: Inject) -> None:
        await asyncio.sleep(max(0.0, inject.expires_at - time.time()))
        if self.held.pop(inject.fault_id, None) is not None:
            await self._event(inject, inject.fault_id, inject.experiment_id, "expired", "deadline reached")


def experiment(
    duration: str = "1s", kind: str = "process-pause", hb_timeout: str = "1s", faults: int = 1
) -> Experiment:
    fault: dict[str, Any] = {"kind": kind, "match": {"pid": 12345}} if kind != "cpu" else {"kind": "cpu", "load": 10}
    return parse_experiment(
        {
            "apiVersion": "faultline/v1",
            "kind": "Experiment",
            "metadata": {"name": "engine-test"},
            "spec": {
                "duration": duration,
                "faults": [fault] * faults,
                "abort": {"heartbeatTimeout": hb_timeout, "leaseTimeout": "3s"},
            },
        }
    )


@pytest.fixture
async def fleet(nc: Any) -> Any:
    f = Fleet(nc)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def agents(nc: Any) -> Any:
    made: list[ScriptedAgent] = []

    async def make(node: str, **kw: Any) -> ScriptedAgent:
        a = await ScriptedAgent(nc, node, **kw).start()
        made.append(a)
        return a

    yield make
    for a in made:
        await a.stop()


async def test_normal_run_completes_with_lease_and_final_revert(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    lines: list[str] = []
    runner = ExperimentRunner(nc, fleet, experiment("1s"), progress=lines.append)
    report = await asyncio.wait_for(runner.run(), 15)
    assert report.outcome == "completed", report
    assert report.targets == ["n1", "n2"]
    assert [f.state for f in report.faults] == ["expired", "expired"]
    assert a.leases and all(le.experiment_id == runner.experiment_id for le in a.leases)
    # the final, idempotent revert: a broadcast, so run() may return before n2's connection delivers it
    await async_wait_until(lambda: b.reverts, 3, "n2 to receive the final revert broadcast")
    assert [r.reason for r in b.reverts] == ["experiment ended"]
    assert any("active" in line for line in lines)


async def test_a_controller_that_did_not_run_for_a_while_blames_no_agent(nc: Any, fleet: Fleet, agents: Any) -> None:
    """Found by a review: a controller stopped (SIGSTOP, a starved machine) longer than the
    heartbeatTimeout found every agent's heartbeat old on its return (they wait unread in its
    socket) and aborted, naming an agent that was fine. Here the whole process stalls, agents
    included, for 1.6 s against a heartbeatTimeout of 1 s and a leaseTimeout of 3 s."""
    await agents("n1")
    await fleet.wait_for(["n1"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("3s"), progress=lambda _line: None)
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, time.sleep, 1.6)  # the event loop does not run: as the controller stopped
    report = await asyncio.wait_for(runner.run(), 15)
    assert report.outcome == "completed", report
    assert any(n.startswith("this controller did not run for 1.") for n in report.notes), report.notes


async def test_a_lease_lapse_long_after_a_stall_of_the_controller_is_the_agent_s(
    nc: Any, fleet: Fleet, agents: Any
) -> None:
    """Found by a review: a lapse was put down to this controller whenever it had once, at any
    time in the run, not run for a leaseTimeout. A lapse reported well after that stall (an
    agent cut off on its own side) now names the agent."""
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("30s"), progress=lambda _line: None)
    run = asyncio.ensure_future(runner.run())
    try:
        await async_wait_until(lambda: a.held, 10, "the fault to be applied")
        time.sleep(3.5)  # noqa: ASYNC251 - the controller does not run for longer than the leaseTimeout (3 s)
        await asyncio.sleep(4.5)  # past leaseTimeout + LEASE_BLAME_WINDOW_S: that stall cannot lapse a lease now
        (fid,) = a.held
        await a._event(
            a.held[fid], fid, runner.experiment_id, "reverted", "lease lapsed: no lease for 3.1s (timeout 3s)"
        )
        report = await asyncio.wait_for(run, 15)
    finally:
        if not run.done():
            runner.abort("the test ended")
            await asyncio.gather(run, return_exceptions=True)
    assert report.abort is not None, report
    assert report.abort.node == "n1", report.abort
    assert report.abort.reason.startswith("agent n1 reverted"), report.abort.reason


async def test_stalls_that_come_again_and_again_do_not_hide_a_silent_agent(nc: Any, fleet: Fleet, agents: Any) -> None:
    """Left by the tenth session: each stall of the controller restarted every agent's
    heartbeat clock, so stalls spaced closer than the heartbeatTimeout hid an agent that
    had really gone silent until the run's end. Now only the stalls (and a grace to read what
    came meanwhile) are not counted. Here the process stalls 1.2 s after every 0.8 s it runs,
    against a heartbeatTimeout of 1 s: the old clock never passed 0.8 s."""
    await agents("n1")
    b = await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("30s"), progress=lambda _line: None)
    run = asyncio.ensure_future(runner.run())
    await async_wait_until(lambda: b.held, 10, "n2's fault to be applied")
    b.silent = True
    silent_at = time.monotonic()

    async def stall_again_and_again() -> None:
        for _ in range(15):  # bounded: 30 s at most
            await asyncio.sleep(0.8)
            time.sleep(1.2)  # noqa: ASYNC251 - the event loop must not run: as the controller stopped

    stalls = asyncio.ensure_future(stall_again_and_again())
    try:
        report = await asyncio.wait_for(run, 40)
    finally:
        stalls.cancel()
        await asyncio.gather(stalls, return_exceptions=True)
    assert report.outcome == "aborted", report
    assert report.abort is not None
    assert report.abort.node == "n2", report.abort
    assert "agent n2 silent for" in report.abort.reason, report.abort.reason
    assert "could not read it" in report.abort.reason, report.abort.reason
    assert time.monotonic() - silent_at < 20, "the silent agent was caught only at the run's end"
    assert any(n.startswith("this controller did not run for 1.") for n in report.notes), report.notes


@pytest.mark.parametrize("wake_first", [False, True])
async def test_giving_up_on_the_final_revert_returns_the_report_at_once(
    nc: Any, fleet: Fleet, agents: Any, wake_first: bool
) -> None:
    """A second Ctrl-C during the final revert: the report comes at once. Found by a review:
    on Python 3.11 a wait_for whose wait completes as the cancel lands drops the cancel, and
    the revert went on waiting its full bound. ``wake_first``: an event wakes the waiter in the
    same turn as the give-up, the order that lost the cancel."""
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    a.stuck_reverts = True  # the final revert waits its whole bound for a reverted event
    runner = ExperimentRunner(nc, fleet, experiment("30s"), progress=lambda _line: None, revert_wait_s=30.0)
    run = asyncio.ensure_future(runner.run())
    await async_wait_until(lambda: a.held, 10, "the fault to be applied")
    runner.abort("interrupted")
    await async_wait_until(lambda: runner.revert_broadcast, 10, "the final revert to begin")
    await asyncio.sleep(1.5)  # past the broadcast's wait, into the per-node revert's
    given_up = time.monotonic()
    if wake_first:
        runner._wake.set()
    runner.give_up("interrupted again")
    report = await asyncio.wait_for(run, 5)
    assert time.monotonic() - given_up < 1.0
    assert any("stopped waiting" in p for p in report.problems), report.problems


async def test_lost_abort_broadcast_falls_back_to_per_node_revert(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    b.hear_broadcasts = False
    await fleet.wait_for(["n1", "n2"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("30s"), broadcast_wait_s=0.5)
    run = asyncio.create_task(runner.run())
    await async_wait_until(lambda: len(a.held) == 1 and len(b.held) == 1, 5, "both agents to hold the fault")
    runner.abort("test")
    report = await asyncio.wait_for(run, 15)
    assert a.held == {} and b.held == {}, "a fault was left behind"
    assert len(a.reverts) == 1, "n1 heard the broadcast and needed no per-node revert"
    assert len(b.reverts) == 1, "n2 missed the broadcast and got the per-node revert"
    assert {f.node: f.state for f in report.faults} == {"n1": "reverted", "n2": "reverted"}


async def test_missed_end_events_are_learned_from_heartbeats(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    a.drop_events = True  # every event is lost; only heartbeats get through
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("1s")).run(), 15)
    (f,) = report.faults
    assert f.state == "expired", report
    assert "from the agent's heartbeat" in (f.reason or ""), f.reason
    assert report.outcome == "completed", report


@pytest.mark.parametrize("change", ["restart", "leaving", "silent"])
async def test_automatic_abort(nc: Any, fleet: Fleet, agents: Any, change: str) -> None:
    a = await agents("n1")
    b = await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("30s", hb_timeout="0.6s"))
    run = asyncio.create_task(runner.run())
    await async_wait_until(lambda: len(a.held) == 1 and len(b.held) == 1, 5, "both agents to hold the fault")
    changed_at = time.time()
    if change == "restart":
        b.instance_id = uuid.uuid4().hex
    elif change == "leaving":
        b.state = "leaving"
    else:
        b.silent = True
    report = await asyncio.wait_for(run, 15)
    assert report.outcome == "aborted" and report.abort is not None
    assert report.abort.node == "n2"
    assert {"restart": "restarted", "leaving": "leaving", "silent": "silent"}[change] in report.abort.reason
    assert report.abort.at - changed_at < 0.6 + 0.2 + 0.3
    assert a.held == {} and a.reverts and a.reverts[0].reason.startswith("abort: agent n2")
    n1 = next(f for f in report.faults if f.node == "n1")
    assert n1.state == "reverted"


async def test_rejection_aborts_and_names_reason(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    a.reject = "no process matches the selector"
    await fleet.wait_for(["n1"], 5)
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("5s")).run(), 15)
    assert report.outcome == "aborted" and report.abort is not None
    assert "no process matches the selector" in report.abort.reason
    (f,) = report.faults
    assert f.state == "rejected" and f.accepted is False


async def test_no_reply_is_bounded(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    await a._subs[0].unsubscribe()  # heartbeats continue, commands go nowhere
    runner = ExperimentRunner(nc, fleet, experiment("5s"), dispatch_timeout_s=0.3, dispatch_attempts=2)
    started = time.monotonic()
    report = await asyncio.wait_for(runner.run(), 15)
    assert time.monotonic() - started < 6
    assert report.outcome == "aborted" and report.faults[0].state == "no-reply"


async def test_capabilities_refused_before_dispatch(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    with pytest.raises(PreflightError, match=r"node n1: spec.faults\[0\] \(cpu\) needs cpu: cpu: not in this"):
        await ExperimentRunner(nc, fleet, experiment("5s", kind="cpu")).plan()
    assert a.held == {} and a.reverts == []


async def test_control_subject_aborts(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    await fleet.wait_for(["n1"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("30s"))
    run = asyncio.create_task(runner.run())
    await async_wait_until(lambda: len(a.held) == 1, 5, "the agent to hold the fault")
    cmd = Revert(experiment_id=runner.experiment_id, reason="stop it", expires_at=time.time() + 10)
    reply = await nc.request(exp_control(runner.experiment_id), encode(cmd), timeout=2)
    assert decode(reply.data, Ack).accepted
    report = await asyncio.wait_for(run, 15)
    assert report.outcome == "aborted" and report.abort is not None and "stop it" in report.abort.reason
    assert a.held == {}


async def test_fleet_counts_garbage(nc: Any, fleet: Fleet) -> None:
    await nc.publish(agent_hb("junk"), b"not json")
    await nc.flush()
    await async_wait_until(lambda: fleet.garbage == 1, 5, "the garbage heartbeat to be counted")
    assert fleet.nodes() == {}


async def test_start_waits_for_every_target_and_a_refusal_applies_nothing(nc: Any, fleet: Fleet, agents: Any) -> None:
    """n1 accepts, n2 refuses: the run aborts before the start, so n1 never applied its fault."""
    a = await agents("n1")
    b = await agents("n2")
    b.reject = "no process matches the selector"
    await fleet.wait_for(["n1", "n2"], 5)
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("30s", faults=2)).run(), 15)
    assert report.outcome == "aborted" and report.abort is not None and report.abort.node == "n2"
    assert a.applied == [], f"n1 applied {a.applied} although n2 refused"
    assert a.waiting == {} and a.reverts, "n1's waiting faults were not reverted"
    n1 = {f.index: f for f in report.faults if f.node == "n1"}
    assert n1[0].state == "reverted" and "before its start" in (n1[0].reason or ""), n1[0]
    assert n1[1].state == "not-dispatched", "the second fault is not sent once the first was refused"


async def test_every_fault_waits_until_all_are_accepted_then_starts_together(
    nc: Any, fleet: Fleet, agents: Any
) -> None:
    a = await agents("n1")
    b = await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    lines: list[str] = []
    runner = ExperimentRunner(nc, fleet, experiment("1s", faults=2), progress=lines.append)
    report = await asyncio.wait_for(runner.run(), 15)
    assert report.outcome == "completed", report
    assert sorted(a.applied) == sorted(b.applied) == [f"{runner.experiment_id}.0", f"{runner.experiment_id}.1"]
    assert a.starts == [] and b.starts == [], "the broadcast reached both: no per-node start was needed"
    assert runner.start_sent_at is not None
    for f in report.faults:
        assert f.acked_at is not None and f.active_at is not None
        assert f.active_at >= max(g.acked_at or 0 for g in report.faults), "a fault started before all were accepted"
    assert any("all 2 target(s) accepted; starting" in line for line in lines), lines


async def test_lost_start_broadcast_falls_back_to_per_node_start(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    b.hear_broadcasts = False
    await fleet.wait_for(["n1", "n2"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("1s"), broadcast_wait_s=0.3)
    report = await asyncio.wait_for(runner.run(), 15)
    assert report.outcome == "completed", report
    assert a.starts == [], "n1 heard the broadcast"
    assert [s.experiment_id for s in b.starts] == [runner.experiment_id], "n2 needed its own start"
    assert b.applied == [f"{runner.experiment_id}.0"]


async def test_a_waiting_fault_lost_before_the_start_aborts(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    b.hear_broadcasts = False
    b.forget_waiting = True
    await fleet.wait_for(["n1", "n2"], 5)
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("30s"), broadcast_wait_s=0.3).run(), 15)
    assert report.outcome == "aborted" and report.abort is not None and report.abort.node == "n2"
    assert "lost" in report.abort.reason, report.abort.reason
    n2 = next(f for f in report.faults if f.node == "n2")
    assert n2.state == "failed" and "no longer holds it" in (n2.reason or "")
    assert a.held == {}, "n1's fault was left behind"


async def test_an_older_agent_starts_on_acceptance_and_the_report_says_so(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1", schema="1.1")
    b = await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    runner = ExperimentRunner(nc, fleet, experiment("1s"))
    report = await asyncio.wait_for(runner.run(), 15)
    assert report.outcome == "completed", report
    assert a.applied == b.applied == [f"{runner.experiment_id}.0"]
    assert any("n1 speak schema 1.1 or older" in note for note in report.notes), report.notes


async def test_a_refused_start_aborts_and_the_final_revert_names_the_node(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    b.hear_broadcasts = False
    b.refuse_start = "agent is stopping"
    await fleet.wait_for(["n1", "n2"], 5)
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("30s"), broadcast_wait_s=0.3).run(), 15)
    assert report.outcome == "aborted" and report.abort is not None and report.abort.node == "n2"
    assert "did not start its faults: agent is stopping" in report.abort.reason
    assert a.held == {} and b.waiting == {}, "a fault was left behind"
    assert b.reverts and b.reverts[-1].experiment_id == report.experiment_id, "n2 got no per-node revert"


async def test_an_agent_answering_in_an_older_schema_mid_run_aborts(nc: Any, fleet: Fleet, agents: Any) -> None:
    a = await agents("n1")
    b = await agents("n2")
    b.ack_schema = "1.1"  # its heartbeats said 1.2; its answer says it applies on acceptance
    await fleet.wait_for(["n1", "n2"], 5)
    report = await asyncio.wait_for(ExperimentRunner(nc, fleet, experiment("30s")).run(), 15)
    assert report.outcome == "aborted" and report.abort is not None and report.abort.node == "n2"
    assert "cannot wait for the start" in report.abort.reason
    assert a.applied == [], "n1 started although n2 could not take part in the start"
    assert b.held == {} and a.waiting == {}


async def test_a_file_without_nodes_or_labels_says_it_targets_the_whole_fleet(
    nc: Any, fleet: Fleet, agents: Any
) -> None:
    """A new user's review: leaving out targets means every agent, said nowhere before the run."""
    await agents("n1")
    await agents("n2")
    await fleet.wait_for(["n1", "n2"], 5)
    plan = await ExperimentRunner(nc, fleet, experiment("1s"), progress=lambda _line: None).plan()
    assert plan.targets == ["n1", "n2"]
    assert "spec.targets names no nodes and no labels: every agent of the fleet is a candidate (2 seen)" in plan.notes
