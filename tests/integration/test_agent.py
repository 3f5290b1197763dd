"""The agent daemon against a real nats-server, with real victim processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from typing import Any

import psutil
import pytest

from controller import halting
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Halt, Inject, Lease, Revert
from tests.conftest import AgentProcess, async_wait_until, status

pytestmark = pytest.mark.integration


async def send(nc: Any, node: str, cmd: Any, timeout_s: float = 3.0) -> Ack:
    reply = await nc.request(subjects.agent_cmd(node), encode(cmd), timeout=timeout_s)
    return decode(reply.data, Ack)


def pause(token: str, exp: str = "exp1", fid: str = "exp1.0", duration_s: float = 30, lease_s: float = 30) -> Inject:
    return Inject(
        experiment_id=exp,
        fault_id=fid,
        spec={"kind": "process-pause", "match": {"cmdline": token}},
        expires_at=time.time() + duration_s,
        lease_timeout_s=lease_s,
    )


async def test_pause_then_revert_resumes_and_empties_journal(nc, agent_factory, victims, events):
    agent = agent_factory("node-a")
    procs = victims.start(2)
    ack = await send(nc, "node-a", pause(victims.token))
    assert ack.accepted, ack.reason
    await async_wait_until(lambda: events.events("exp1.0", "active"), 5, "an active event")
    assert all(status(p) == "stopped" for p in procs)
    active = events.events("exp1.0", "active")[0]
    assert sorted(active.measurements.hit_pids or []) == sorted(p.pid for p in procs)
    (keeper,) = agent.keepers()  # one per pause held: it resumes them should the agent freeze

    ack = await send(nc, "node-a", Revert(experiment_id="exp1", expires_at=time.time() + 10, reason="test"))
    assert ack.accepted
    (ended,) = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "a reverted event")
    assert all(status(p) != "stopped" for p in procs)
    assert agent.settled_journal() == []
    assert "keeper" not in (ended.measurements.note or ""), ended.measurements.note  # it only waited
    await async_wait_until(lambda: not keeper.is_running() and not agent.keepers(), 5, "the disarmed keeper gone")


async def test_deadline_expires_the_fault(nc, agent_factory, victims, events):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token, duration_s=1.5))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    t0 = time.monotonic()
    await async_wait_until(lambda: events.events("exp1.0", "expired"), 5, "an expired event")
    assert time.monotonic() - t0 < 2.5
    assert status(proc) != "stopped"


async def test_kill_with_watch_restart_reports_time_to_recover(nc, agent_factory, victims, events):
    agent_factory("node-a")
    victims.start(1, tag="-k")
    cmd = Inject(
        experiment_id="exp1",
        fault_id="exp1.0",
        spec={
            "kind": "process-kill",
            "match": {"cmdline": victims.token + "-k"},
            "signal": "SIGKILL",
            "watchRestart": True,
        },
        expires_at=time.time() + 10,
        lease_timeout_s=30,
    )
    assert (await send(nc, "node-a", cmd)).accepted
    active = await async_wait_until(lambda: events.events("exp1.0", "active"), 5, "an active event")
    killed = active[0].measurements.hit_pids
    assert killed and all(not psutil.pid_exists(pid) or status(psutil.Process(pid)) == "zombie" for pid in killed)
    victims.start(1, tag="-k")  # the "supervisor" brings it back
    restarted = await async_wait_until(
        lambda: [e for e in events.events("exp1.0") if e.measurements.restarted], 5, "a restart observed"
    )
    assert restarted[0].measurements.restart_after_s is not None
    assert (await send(nc, "node-a", Revert(experiment_id="exp1", expires_at=time.time() + 10))).accepted
    final = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "a reverted event")
    assert final[0].measurements.restarted is True


async def test_protected_processes_are_never_touched(nc, agent_factory, events):
    agent = agent_factory("node-a")
    by_pid = Inject(
        experiment_id="exp1", fault_id="exp1.0",
        spec={"kind": "process-kill", "match": {"pid": 1}},
        expires_at=time.time() + 10, lease_timeout_s=30,
    )  # fmt: skip
    ack = await send(nc, "node-a", by_pid)
    assert not ack.accepted and "protected" in (ack.reason or "")
    # the agent itself matches this selector: the fault is refused, naming why it was skipped
    by_cmd = Inject(
        experiment_id="exp1", fault_id="exp1.1",
        spec={"kind": "process-pause", "match": {"cmdline": f"--node node-a --state-dir {agent.state_dir}"}},
        expires_at=time.time() + 10, lease_timeout_s=30,
    )  # fmt: skip
    refused = await send(nc, "node-a", by_cmd)
    assert not refused.accepted and "faultline agent" in (refused.reason or ""), refused.reason
    assert agent.proc is not None and agent.proc.poll() is None


async def test_lease_lapse_reverts_on_its_own(nc, agent_factory, victims, events):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token, lease_s=1.5))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    t0 = time.monotonic()
    # no lease is ever published: the dead-man's switch must fire within lease + 1 s
    await async_wait_until(lambda: status(proc) != "stopped", 1.5 + 1.0 + 0.5, "victim resumed after lease lapse")
    assert time.monotonic() - t0 <= 2.5 + 0.5
    ev = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 3, "a reverted event")
    assert "lease lapsed" in (ev[0].reason or "")


async def test_lease_renewal_keeps_the_fault(nc, agent_factory, victims, events):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token, lease_s=1.0))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    end = time.monotonic() + 2.5
    seq = 0
    while time.monotonic() < end:
        seq += 1
        await nc.publish(subjects.exp_lease("exp1"), encode(Lease(experiment_id="exp1", seq=seq)))
        await asyncio.sleep(0.25)
    assert status(proc) == "stopped", "fault reverted although its lease was renewed"


async def test_crash_recovery_resumes_paused_victim(nc, agent_factory, victims, events, heartbeats):
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    agent.kill9(with_keepers=True)  # its keeper too: only the journal is left to resume the victim
    assert status(proc) == "stopped"
    assert agent.journal() == ["exp1.0.json"]
    agent.start().wait_ready()
    assert status(proc) != "stopped"
    assert agent.settled_journal() == []
    hb = await async_wait_until(
        lambda: [h for h in heartbeats.heartbeats("node-a") if "exp1.0" in h.recovered],
        5,
        "a heartbeat listing the recovery",
    )
    assert hb
    ev = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "a recovery event")
    assert ev[0].measurements.recovered_from_journal


async def test_a_killed_agents_keeper_resumes_its_paused_victim_at_once(nc, agent_factory, victims, events):
    """kill -9 of the agent alone (not of its container): its keeper sees the leash pipe close and
    resumes the victim from the journal entry at once, not at the agent's restart, which may be
    minutes away (a crash-looping pod). The restart reverts the same entry again and reports it."""
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: events.events("exp1.0", "active"), 5, "the pause active")
    (keeper,) = agent.keepers()
    agent.kill9()
    killed_at = time.monotonic()
    await async_wait_until(lambda: status(proc) not in ("stopped", "gone"), 3, "the keeper to resume the victim")
    took = time.monotonic() - killed_at
    keeper.wait(5)  # it exits once done (orphaned: waited for through psutil)
    assert agent.journal() == ["exp1.0.json"], "the keeper must leave the journal to the agent"
    agent.start().wait_ready()
    (ev,) = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "the restart's recovery event")
    assert ev.measurements.recovered_from_journal
    assert agent.settled_journal() == []
    assert took < 2.0, f"resumed {took:.2f}s after the agent died"


async def test_a_frozen_agents_pause_is_resumed_by_its_keeper_within_its_leash(nc, agent_factory, victims, events):
    """An agent frozen (SIGSTOP, a debugger, a stalled event loop) cannot revert, and its own lease
    watchdog is frozen with it: before, the victim stayed stopped until the agent thawed or the
    liveness probe restarted it (about a minute). Now its keeper resumes it once the agent has not
    fed its leash for the fault's leaseTimeout (5 s at least), and the thawed agent reports it."""
    from agent.keepers import LEASH_MIN_S

    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token, lease_s=2))).accepted
    await async_wait_until(lambda: events.events("exp1.0", "active"), 5, "the pause active")
    agent.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        await async_wait_until(
            lambda: status(proc) not in ("stopped", "gone"), LEASH_MIN_S + 3, "the keeper to resume the victim"
        )
        took = time.monotonic() - frozen_at
        assert took >= LEASH_MIN_S - 1.5, f"resumed {took:.1f}s after the freeze: before its leash (a false end)"
        print(f"resumed by the keeper {took:.2f} s after the agent froze (leash {LEASH_MIN_S:g} s)")  # the figure
    finally:
        agent.signal(signal.SIGCONT)
    (ended,) = await async_wait_until(
        lambda: [e for e in events.events("exp1.0") if e.state in ("reverted", "failed", "expired")], 10, "the end"
    )
    assert ended.state == "reverted", ended
    assert "reverted by its keeper" in (ended.measurements.note or ""), ended.measurements.note
    assert status(proc) not in ("stopped", "gone")
    assert agent.settled_journal() == []
    await async_wait_until(lambda: not agent.keepers(), 5, "no keeper left")


async def test_a_second_agent_on_the_same_state_dir_waits_and_touches_nothing(
    nc, nats_url, agent_factory, victims, tmp_path
):
    """A DaemonSet rolled out with surge: the new agent starts while the old one still holds a
    fault. It must not "recover" the old agent's live journal; it waits until the old one stops."""
    first = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    second = AgentProcess(nats_url, "node-a", first.state_dir, tmp_path / "agent-second.log", [])
    second.start()
    try:
        await async_wait_until(
            lambda: "held by another faultline-agent" in second.log(), 10, "the second agent to wait for the lock"
        )
        assert second.proc is not None and second.proc.poll() is None
        assert status(proc) == "stopped", "the second agent touched the first one's fault"
        assert first.journal() == ["exp1.0.json"]
        # a waiting agent told to stop holds nothing: it leaves at once, touching nothing
        third = AgentProcess(nats_url, "node-a", first.state_dir, tmp_path / "agent-third.log", [])
        third.start()
        try:
            await async_wait_until(
                lambda: "held by another faultline-agent" in third.log(), 10, "the third agent to wait for the lock"
            )
            t0 = time.monotonic()
            assert await asyncio.to_thread(third.stop, 5.0) == 0
            assert time.monotonic() - t0 < 3, "a waiting agent took long to stop"
        finally:
            await asyncio.to_thread(third.stop)
        assert status(proc) == "stopped"
        assert await asyncio.to_thread(first.stop) == 0  # it reverts its own fault on the way out
        assert status(proc) != "stopped"
        await asyncio.to_thread(second.wait_ready, 15.0)
        assert "journal recovery: nothing to do" in second.log(), second.log()
    finally:
        await asyncio.to_thread(second.stop)


async def test_sigterm_reverts_says_leaving_and_exits(nc, agent_factory, victims, events, heartbeats):
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    rc = await asyncio.to_thread(agent.proc.wait, 5)
    assert rc == 0 and time.monotonic() - t0 < 5
    assert status(proc) != "stopped"
    await async_wait_until(
        lambda: [h for h in heartbeats.heartbeats("node-a") if h.state == "leaving" and not h.faults],
        3,
        "a leaving heartbeat",
    )
    assert "stopping" in (events.events("exp1.0", "reverted")[0].reason or "")


async def test_sigterm_with_a_keeper_that_cannot_answer_still_reverts_within_the_stop(nc, agent_factory, victims):
    """The keeper is stopped (SIGSTOP, a frozen cgroup) when the agent is told to stop: before,
    the agent waited 12 s for its answer, more than the stop's whole revert budget, and exited
    with the victim still paused (a review found it). A stopping agent waits 1 s, kills the
    keeper and reverts itself."""
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    (keeper,) = agent.keepers()
    keeper.suspend()
    try:
        t0 = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None
        rc = await asyncio.to_thread(agent.proc.wait, 15)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(psutil.Error):
            keeper.resume()
    assert rc == 0 and took < 5, (rc, took)
    assert status(proc) not in ("stopped", "gone"), "the victim was left paused"
    assert agent.settled_journal() == []
    await asyncio.to_thread(lambda: psutil.wait_procs([keeper], timeout=5))
    assert not keeper.is_running() or keeper.status() == psutil.STATUS_ZOMBIE


async def test_sigterm_repeated_during_the_stop_still_reverts_and_settles_the_journal(nc, agent_factory, victims):
    """A dying parent can send its parent-death signal once per thread: a second SIGTERM must not
    cut the revert short, and the stop leaves no journal entry behind. (Two signals sent back to
    back may merge in the kernel; tests/unit/test_agent_safety.py checks the policy itself.)"""
    agent = agent_factory("node-a")
    procs = [p for i in range(3) for p in victims.start(1, tag=f"-{i}")]
    for i in range(3):  # three faults in flight, each holding its own victim
        assert (await send(nc, "node-a", pause(f"{victims.token}-{i}$", fid=f"exp1.{i}"))).accepted
    await async_wait_until(lambda: all(status(p) == "stopped" for p in procs), 5, "victims paused")
    agent.signal(signal.SIGTERM)
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    rc = await asyncio.to_thread(agent.proc.wait, 5)
    assert rc == 0, f"agent exited with {rc} on a repeated SIGTERM:\n{agent.log()}"
    assert all(status(p) != "stopped" for p in procs)
    assert agent.journal() == [], "journal entries left by a clean stop"


STALLING_AGENT = """
import sys, threading
from agent import journal
from agent.main import main

real, never = journal.Journal.write, threading.Event()


def write(self, entry, replace_only=False):  # the fsync of a stalled disk: inside the lock, for good
    if entry.fault_id.startswith("stall"):
        with self._lock:
            print("journal write stalls", file=sys.stderr, flush=True)
            never.wait()
    return real(self, entry, replace_only)


journal.Journal.write = write
main(sys.argv[1:])
"""


async def test_sigterm_stops_an_agent_whose_journal_write_is_stalled(nc, agent_factory, victims, heartbeats, tmp_path):
    """A stalled state directory: the fault's first journal write never returns. Before, the
    fault stayed "injecting" for good, and on SIGTERM the agent sent "leaving" 12 s later and
    then never exited: the interpreter waited for the stuck worker thread, until the kubelet's
    SIGKILL. Now the fault ends with nothing applied, and the agent exits within the bound."""
    wrapper = tmp_path / "stalling_agent.py"
    wrapper.write_text(STALLING_AGENT)
    agent = agent_factory("node-s", launcher=[sys.executable, str(wrapper)])
    (proc,) = victims.start(1)
    assert (await send(nc, "node-s", pause(victims.token, fid="stall.0"))).accepted
    await async_wait_until(lambda: "journal write stalls" in agent.log(), 5, "the journal write to stall")
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    rc = await asyncio.to_thread(agent.proc.wait, 10)
    took = time.monotonic() - t0
    assert rc == 0 and took < 5, f"exit {rc} after {took:.1f}s:\n{agent.log()}"
    assert status(proc) != "stopped", "a fault whose journal write never returned was applied"
    leaving = [h for h in heartbeats.heartbeats("node-s") if h.state == "leaving"]
    assert leaving and not leaving[-1].faults, leaving


async def test_sigterm_stops_an_agent_that_cannot_reach_nats(agent_factory):
    agent = agent_factory("node-x", url="nats://127.0.0.1:1", start=False).start()
    await async_wait_until(lambda: "Connection refused" in agent.log(since_start=True), 15, "a failed connect logged")
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    rc = await asyncio.to_thread(agent.proc.wait, 5)
    assert rc == 0 and time.monotonic() - t0 < 5, f"exit {rc}:\n{agent.log()}"


async def test_halt_reverts_everything_and_blocks_reinjection(nc, agent_factory, victims, events):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    await nc.publish(subjects.HALT, encode(Halt(reason="test", issued_by="pytest")))
    await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "a reverted event after halt")
    assert status(proc) != "stopped"
    again = await send(nc, "node-a", pause(victims.token, fid="exp1.1"))
    assert not again.accepted and "halted" in (again.reason or "")


async def test_halt_is_reported_by_a_heartbeat_at_once(nc, agent_factory, victims, heartbeats):
    """faultline halt confirms from heartbeats: the agent sends one as soon as its reverts are done."""
    agent_factory("node-a", extra=["--heartbeat-interval", "30"])  # the next regular one is 30 s away
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    t_halt = time.time()
    await nc.publish(subjects.HALT, encode(Halt(reason="test", issued_by="pytest")))
    hb = await async_wait_until(
        lambda: [h for h in heartbeats.heartbeats("node-a") if h.sent_at > t_halt and not h.faults],
        3,
        "a heartbeat with no active fault right after the halt",
    )
    assert any(e.fault_id == "exp1.0" and e.state == "reverted" for e in hb[0].ended)
    assert status(proc) != "stopped"


class LosesFirstHalt:
    """The test's NATS client, except that the first halt published is lost, as one published
    while NATS restarts is: nats-py's flush then returns at once, with no error."""

    def __init__(self, nc: Any) -> None:
        self._nc, self.halts = nc, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def publish(self, subject: str, payload: bytes = b"", **kw: Any) -> None:
        if subject == subjects.HALT:
            self.halts += 1
            if self.halts == 1:
                return
        await self._nc.publish(subject, payload, **kw)


async def test_a_lost_halt_is_sent_again_until_confirmed_and_carried_out_once(nc, nats_url, agent_factory, victims):
    """Found by a review: `faultline halt` during a NATS restart said "halt sent", no agent got
    it, and nothing sent it again: paused victims stayed paused until their deadline."""
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    lossy = LosesFirstHalt(nc)
    lines: list[str] = []
    code = await halting.halt_and_confirm(lossy, nats_url, "test", "pytest", "text", lines.append, lines.append)
    assert code == 0, lines
    assert lossy.halts >= 2 and status(proc) != "stopped", lines
    # sent again until confirmed, carried out once: one "HALT from" line in the agent's log
    assert agent.log(since_start=True).count("HALT from pytest") == 1, agent.log()


async def test_bad_commands_are_rejected_and_faults_kept(nc, agent_factory, victims, events):
    agent = agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    for garbage in (b"", b"\xff\xfe", b"[1,2]", b'{"schema_version": "9.0", "type": "inject"}', b"{" * 10000):
        reply = await nc.request(subjects.agent_cmd("node-a"), garbage, timeout=3)
        ack = decode(reply.data, Ack)
        assert not ack.accepted and ack.reason
    expired = pause(victims.token, fid="exp1.9", duration_s=-1)
    ack = await send(nc, "node-a", expired)
    assert not ack.accepted and "expired" in (ack.reason or "")
    replay = await send(nc, "node-a", pause(victims.token))
    assert replay.accepted and replay.fault_states == {"exp1.0": "active"}
    assert status(proc) == "stopped" and agent.journal() == ["exp1.0.json"]


async def test_replay_after_revert_is_never_reinjected(nc, agent_factory, victims, events):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    cmd = pause(victims.token)
    assert (await send(nc, "node-a", cmd)).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    await send(nc, "node-a", Revert(experiment_id="exp1", fault_ids=["exp1.0"], expires_at=time.time() + 10))
    await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "a reverted event")
    replay = await send(nc, "node-a", cmd)
    assert not replay.accepted and "not re-injected" in (replay.reason or "")
    assert status(proc) != "stopped"


async def test_heartbeats_repeat_recent_ends(nc, agent_factory, victims, events, heartbeats):
    agent_factory("node-a")
    (proc,) = victims.start(1)
    assert (await send(nc, "node-a", pause(victims.token))).accepted
    await async_wait_until(lambda: status(proc) == "stopped", 5, "victim paused")
    await send(nc, "node-a", Revert(experiment_id="exp1", expires_at=time.time() + 10, reason="test"))
    hbs = await async_wait_until(
        lambda: [h for h in heartbeats.heartbeats("node-a") if any(e.fault_id == "exp1.0" for e in h.ended)],
        5,
        "a heartbeat that repeats the end of exp1.0",
    )
    (ended,) = [e for e in hbs[-1].ended if e.fault_id == "exp1.0"]
    assert ended.state == "reverted" and "requested: test" in (ended.reason or "")
