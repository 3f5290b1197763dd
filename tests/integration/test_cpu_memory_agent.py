"""cpu and memory faults through a real agent process and a real nats-server, measured with psutil."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import psutil
import pytest

from agent.faults.stress_marks import MARKER_PREFIX, agent_tag, find_marked
from agent.faults.stressor import LEASH_MIN_S
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Inject, Revert
from tests.conftest import async_wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20


async def send(nc: Any, node: str, cmd: Any, timeout_s: float = 3.0) -> Ack:
    reply = await nc.request(subjects.agent_cmd(node), encode(cmd), timeout=timeout_s)
    return decode(reply.data, Ack)


def inject(spec: dict[str, Any], fid: str = "exp1.0", duration_s: float = 30) -> Inject:
    return Inject(
        experiment_id="exp1", fault_id=fid, spec=spec, expires_at=time.time() + duration_s, lease_timeout_s=60
    )


def stressors_of(agent: Any) -> dict[str, Any]:
    tag = agent_tag(agent.node, agent.state_dir)
    return {m: r for m, r in find_marked(f"{MARKER_PREFIX}:").items() if f":{tag}:" in m}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_cpu_50_percent_for_6s_then_expires(nc, agent_factory, events):
    agent = agent_factory("node-a")
    assert (await send(nc, "node-a", inject({"kind": "cpu", "load": 50, "workers": 1}, duration_s=6))).accepted
    (active,) = await async_wait_until(lambda: events.events("exp1.0", "active"), 10, "an active event")
    (pid,) = active.measurements.stressor_pids
    proc = psutil.Process(pid)
    await asyncio.sleep(1.0)
    samples = []
    prev_c, prev_t = sum(proc.cpu_times()[:2]), time.monotonic()
    for _ in range(4):  # the middle 4 s of the 6 s fault
        await asyncio.sleep(1.0)
        c, t = sum(proc.cpu_times()[:2]), time.monotonic()
        samples.append(100 * (c - prev_c) / (t - prev_t))
        prev_c, prev_t = c, t
    assert 45 <= sum(samples) / len(samples) <= 55, f"per-second load {samples}"
    (expired,) = await async_wait_until(lambda: events.events("exp1.0", "expired"), 5, "an expired event")
    assert expired.measurements.cpu_load_mean_percent is not None
    assert 45 <= expired.measurements.cpu_load_mean_percent <= 55
    assert gone(pid) and stressors_of(agent) == {}
    assert agent.settled_journal() == []


async def test_memory_200mi_then_revert(nc, agent_factory, events):
    agent = agent_factory("node-a")
    assert (await send(nc, "node-a", inject({"kind": "memory", "size": "200Mi"}))).accepted
    (active,) = await async_wait_until(lambda: events.events("exp1.0", "active")[:1], 10, "an active event")
    (pid,) = active.measurements.stressor_pids
    proc = psutil.Process(pid)
    await async_wait_until(lambda: proc.memory_info().rss >= 190 * MiB, 20, "stressor RSS reaching 190 MiB")
    rss = proc.memory_info().rss
    assert abs(rss - 200 * MiB) <= 0.05 * 200 * MiB, f"RSS {rss / MiB:.1f} MiB"
    assert (await send(nc, "node-a", Revert(experiment_id="exp1", expires_at=time.time() + 10))).accepted
    (reverted,) = await async_wait_until(lambda: events.events("exp1.0", "reverted"), 10, "a reverted event")
    assert reverted.measurements.rss_bytes is not None
    assert abs(reverted.measurements.rss_bytes - 200 * MiB) <= 0.05 * 200 * MiB
    assert reverted.measurements.oom_killed is False
    assert gone(pid) and stressors_of(agent) == {} and agent.settled_journal() == []


async def test_kill9_agent_takes_stressors_with_it_and_restart_sweeps_nothing(nc, agent_factory, events):
    agent = agent_factory("node-a")
    assert (await send(nc, "node-a", inject({"kind": "cpu", "load": 20, "workers": 2}))).accepted
    (active,) = await async_wait_until(lambda: events.events("exp1.0", "active"), 10, "an active event")
    pids = active.measurements.stressor_pids
    assert len(pids) == 2
    agent.kill9()
    await async_wait_until(lambda: all(gone(p) for p in pids), 1.0, "stressors dying with the agent (pdeathsig)")
    agent.start().wait_ready()
    await async_wait_until(lambda: events.events("exp1.0", "reverted"), 5, "the recovery revert event")
    assert agent.settled_journal() == [] and stressors_of(agent) == {}
    log = agent.log()
    assert "sweep: no stray cpu stressors" in log and "killed stray" not in log


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"kind": "cpu", "load": 101}, "load"),
        ({"kind": "cpu", "load": 0}, "load"),
        ({"kind": "cpu", "load": 50, "cores": [4096]}, "cores"),
        ({"kind": "cpu", "load": 50, "cgroup": "faultline-no-such-cgroup"}, "cgroup"),
        ({"kind": "memory", "size": "lots"}, "size"),
        ({"kind": "memory", "size": "-5Mi"}, "size"),
        ({"kind": "memory", "size": "1Mi", "percent": 5}, "size"),
        ({"kind": "memory", "size": "1Mi", "cgroup": "faultline-no-such-cgroup"}, "cgroup"),
    ],
)
async def test_bad_input_rejected_naming_the_field(nc, agent_factory, spec, field):
    agent = agent_factory("node-a")
    cmd = {
        "schema_version": "1.0",
        "id": uuid.uuid4().hex,
        "sent_at": time.time(),
        "type": "inject",
        "experiment_id": "exp1",
        "fault_id": "exp1.0",
        "spec": spec,
        "expires_at": time.time() + 30,
        "lease_timeout_s": 30,
    }
    reply = await nc.request(subjects.agent_cmd("node-a"), json.dumps(cmd).encode(), timeout=3)
    ack = decode(reply.data, Ack)
    assert not ack.accepted and ack.reason and field in ack.reason, ack.reason
    assert stressors_of(agent) == {} and agent.settled_journal() == []


async def test_two_memory_faults_that_fit_only_one_at_a_time(nc, agent_factory, events, tmp_path):
    """Each fits the room alone, not both: the second is refused although the first has not
    allocated yet; once the first is reverted, the same size is accepted again."""
    vm = psutil.virtual_memory()
    reserve_pct = min(90.0, max(0.0, 100 * (vm.available - 512 * MiB) / vm.total))
    room = vm.available - vm.total * reserve_pct / 100
    share = int(0.6 * room)
    if not 32 * MiB <= share <= 2048 * MiB:
        pytest.skip(f"cannot set a memory room of a testable size here (would be {room / MiB:.0f} MiB)")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"safety": {"memory_reserve_percent": reserve_pct}}))
    agent = agent_factory("node-a", extra=["--config", str(config)])
    first = await send(nc, "node-a", inject({"kind": "memory", "size": share, "ramp": "5s"}, fid="exp1.0"))
    assert first.accepted, first.reason
    second = await send(nc, "node-a", inject({"kind": "memory", "size": share}, fid="exp1.1"))
    assert not second.accepted and second.reason, "a second fault that does not fit beside the first was accepted"
    assert second.reason.startswith("size: ") and "other memory faults" in second.reason, second.reason
    await async_wait_until(lambda: events.events("exp1.0", "active")[:1], 10, "the first fault active")
    assert (
        await send(nc, "node-a", Revert(experiment_id="exp1", fault_ids=["exp1.0"], expires_at=time.time() + 10))
    ).accepted
    await async_wait_until(lambda: events.events("exp1.0", "reverted"), 10, "the first fault reverted")
    third = await send(nc, "node-a", inject({"kind": "memory", "size": share}, fid="exp1.2"))
    assert third.accepted, f"the room was not given back after the revert: {third.reason}"
    assert (await send(nc, "node-a", Revert(experiment_id="exp1", expires_at=time.time() + 10))).accepted
    await async_wait_until(lambda: events.events("exp1.2", "reverted"), 20, "the third fault reverted")
    await async_wait_until(lambda: stressors_of(agent) == {}, 5, "no stressor left")


@pytest.mark.parametrize("kind", ["cpu", "memory"])
async def test_a_frozen_agents_stressors_end_within_their_leash(nc, agent_factory, events, kind):
    """An agent frozen (SIGSTOP, a debugger, a stalled event loop) cannot revert, and PDEATHSIG
    covers only its death: before, its cpu or memory load ran on to the fault's deadline (366
    days at most). Now each stressor ends itself when the agent has not fed its leash for the
    fault's leaseTimeout (5 s at least), and the agent, once thawed, says so."""
    agent = agent_factory("node-f")
    spec = {"kind": "cpu", "load": 20, "workers": 1} if kind == "cpu" else {"kind": "memory", "size": "64Mi"}
    cmd = Inject(experiment_id="exp1", fault_id="exp1.0", spec=spec, expires_at=time.time() + 120, lease_timeout_s=2)
    assert (await send(nc, "node-f", cmd)).accepted
    (active,) = await async_wait_until(lambda: events.events("exp1.0", "active")[:1], 10, "an active event")
    (pid,) = active.measurements.stressor_pids
    agent.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        await async_wait_until(
            lambda: gone(pid), LEASH_MIN_S + 3, "the stressor to end itself while its agent is frozen"
        )
        took = time.monotonic() - frozen_at
        assert took >= LEASH_MIN_S - 1.5, f"ended {took:.1f}s after the freeze: before its leash (a false end)"
    finally:
        agent.signal(signal.SIGCONT)
    # thawed: its lease (2 s) has lapsed meanwhile, so it reverts and says what happened
    (ended,) = await async_wait_until(
        lambda: [e for e in events.events("exp1.0") if e.state in ("reverted", "failed", "expired")], 10, "the end"
    )
    assert "ended themselves: the agent did not keep them alive" in (ended.measurements.note or ""), ended
    assert stressors_of(agent) == {}
    assert agent.settled_journal() == []
