"""A network fault through a real agent process: kill -9 mid-fault, restart, nothing left.

The agent runs in the root namespace and talks to NATS on loopback; the
fault is programmed inside a test namespace (``netns``), so the control
path never crosses the faulted link.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.netlink import tc
from agent.netlink.testbed import Testbed, veth_testbed
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Inject, Lease, Revert
from tests.conftest import async_wait_until
from tests.system.test_network import assert_clean, tc_state

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and tc"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip) for namespaces"),
]


@pytest.fixture
def bed() -> Iterator[Testbed]:
    with veth_testbed(60) as testbed:
        yield testbed


def rate_fault(bed: Testbed, fid: str = "net1.0", lease_s: float = 30) -> Inject:
    return Inject(
        experiment_id="net1",
        fault_id=fid,
        spec={"kind": "network", "rate": "8mbit", "interface": bed.dev_a, "netns": bed.ns_a},
        expires_at=time.time() + 60,
        lease_timeout_s=lease_s,
    )


async def send(nc: Any, cmd: Any) -> Ack:
    reply = await nc.request(subjects.agent_cmd("node-a"), encode(cmd), timeout=5)
    return decode(reply.data, Ack)


def ours(bed: Testbed) -> bool:
    root = tc_state(bed.ns_a, bed.dev_a)["root"]
    return root is not None and tc.root_owner(root) == "ours"  # type: ignore[arg-type]


async def test_kill9_then_restart_removes_the_qdisc(nc, agent_factory, events, bed: Testbed) -> None:
    agent = agent_factory("node-a")
    ack = await send(nc, rate_fault(bed))
    assert ack.accepted, ack.reason
    await async_wait_until(lambda: events.events("net1.0", "active"), 10, "the network fault to become active")
    assert await asyncio.to_thread(ours, bed), "no faultline qdisc after the fault became active"
    agent.kill9(with_keepers=True)  # its keeper too: only the journal is left to remove the qdisc
    assert await asyncio.to_thread(ours, bed), "the qdisc vanished with the agent: the test proves nothing"
    agent.start().wait_ready()
    await assert_clean(bed.ns_a, bed.dev_a)
    ev = await async_wait_until(lambda: events.events("net1.0", "reverted"), 5, "a recovery event")
    assert ev[0].measurements.recovered_from_journal
    assert agent.settled_journal() == []


async def test_revert_command_and_lease_lapse_leave_the_interface_clean(
    nc, agent_factory, events, bed: Testbed
) -> None:
    agent_factory("node-a")
    assert (await send(nc, rate_fault(bed))).accepted
    await async_wait_until(lambda: events.events("net1.0", "active"), 10, "an active event")
    await send(nc, Revert(experiment_id="net1", fault_ids=["net1.0"], expires_at=time.time() + 10))
    await async_wait_until(lambda: events.events("net1.0", "reverted"), 5, "a reverted event")
    await assert_clean(bed.ns_a, bed.dev_a)

    # dead-man's switch: no lease after the first -> reverted within lease timeout + 1 s
    cmd = Inject(
        experiment_id="net2",
        fault_id="net2.0",
        spec=rate_fault(bed).spec,
        expires_at=time.time() + 60,
        lease_timeout_s=1.5,
    )
    assert (await send(nc, cmd)).accepted
    await nc.publish(subjects.exp_lease("net2"), encode(Lease(experiment_id="net2")))
    await async_wait_until(lambda: events.events("net2.0", "active"), 10, "an active event")
    t0 = time.monotonic()
    await async_wait_until(lambda: events.events("net2.0", "reverted"), 1.5 + 1.0 + 1.0, "revert on lease lapse")
    assert time.monotonic() - t0 <= 2.5 + 0.5
    await assert_clean(bed.ns_a, bed.dev_a)


async def test_a_killed_agents_keeper_removes_the_qdisc_at_once(nc, agent_factory, events, bed: Testbed) -> None:
    """kill -9 of the agent alone: its keeper reverts the network fault from the journal entry at
    once, not at the agent's restart; the restart reverts the same entry again and reports it."""
    agent = agent_factory("node-a")
    assert (await send(nc, rate_fault(bed))).accepted
    await async_wait_until(lambda: events.events("net1.0", "active"), 10, "the network fault to become active")
    (keeper,) = agent.keepers()
    agent.kill9()
    await asyncio.to_thread(keeper.wait, 10)  # it exits once it has reverted what it guarded
    await assert_clean(bed.ns_a, bed.dev_a)
    assert agent.journal() == ["net1.0.json"], "the keeper must leave the journal to the agent"
    agent.start().wait_ready()
    ev = await async_wait_until(lambda: events.events("net1.0", "reverted"), 5, "the restart's recovery event")
    assert ev[0].measurements.recovered_from_journal
    assert agent.settled_journal() == []


async def test_a_frozen_agents_network_fault_is_removed_by_its_keeper_within_its_leash(
    nc, agent_factory, events, bed: Testbed
) -> None:
    """A frozen agent (SIGSTOP, a debugger, a stalled event loop) used to keep its qdiscs until it
    thawed or the liveness probe restarted it. Its keeper removes them once the agent has not fed
    its leash for the fault's leaseTimeout (5 s at least), and the thawed agent reports it."""
    from agent.keepers import LEASH_MIN_S

    agent = agent_factory("node-a")
    assert (await send(nc, rate_fault(bed, lease_s=2))).accepted
    await async_wait_until(lambda: events.events("net1.0", "active"), 10, "the network fault to become active")
    agent.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        while await asyncio.to_thread(ours, bed):  # netlink off the loop (pyroute2 runs a loop of its own)
            if time.monotonic() - frozen_at > LEASH_MIN_S + 4:
                raise AssertionError(f"the qdisc still there {LEASH_MIN_S + 4:g} s after the agent froze")
            await asyncio.sleep(0.05)
        took = time.monotonic() - frozen_at
        assert took >= LEASH_MIN_S - 1.5, f"removed {took:.1f}s after the freeze: before its leash (a false end)"
        print(f"removed by the keeper {took:.2f} s after the agent froze (leash {LEASH_MIN_S:g} s)")  # the figure
    finally:
        agent.signal(signal.SIGCONT)
    (ended,) = await async_wait_until(
        lambda: [e for e in events.events("net1.0") if e.state in ("reverted", "failed", "expired")], 10, "the end"
    )
    assert ended.state == "reverted", ended
    assert "reverted by its keeper" in (ended.measurements.note or ""), ended.measurements.note
    await assert_clean(bed.ns_a, bed.dev_a)
    assert agent.settled_journal() == []
    await async_wait_until(lambda: not agent.keepers(), 5, "no keeper left")
