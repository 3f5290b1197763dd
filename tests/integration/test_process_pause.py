"""Overlapping process-pause faults on a real agent, against a real victim."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
import pytest

from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Inject
from tests.conftest import Recorder, Victims, async_wait_until, status

pytestmark = pytest.mark.integration


async def send(nc: Any, cmd: Inject) -> Ack:
    reply = await nc.request(subjects.agent_cmd("node-a"), encode(cmd), timeout=3.0)
    return decode(reply.data, Ack)


def pause(regex: str, exp: str, duration_s: float) -> Inject:
    return Inject(
        experiment_id=exp,
        fault_id=f"{exp}.0",
        spec={"kind": "process-pause", "match": {"cmdline": regex}},
        expires_at=time.time() + duration_s,
        lease_timeout_s=30,
    )


async def test_a_second_pause_of_a_paused_process_fails_and_leaves_the_first_alone(
    nc: Any, agent_factory: Any, victims: Victims, events: Recorder
) -> None:
    agent_factory("node-a")
    (proc,) = victims.start(1, "-overlap")
    regex = f"{victims.token}-overlap$"

    first = pause(regex, "long", duration_s=4.0)
    assert (await send(nc, first)).accepted
    await async_wait_until(lambda: events.events("long.0", "active"), 5, "long.0 to become active")
    assert status(proc) == psutil.STATUS_STOPPED

    # a shorter pause of the same process from another experiment: its end would resume it
    ack = await send(nc, pause(regex, "short", duration_s=1.0))
    assert not ack.accepted, "short.0 was accepted on a process long.0 holds"  # refused before its Ack
    assert f"{proc.pid} (already paused by fault long.0)" in (ack.reason or ""), ack.reason

    # stopped for the whole of long.0: well past short.0's end, up to just before long.0's own
    # (the status is read before the clock, so a stall of this loop cannot make a late read count)
    while True:
        seen = status(proc)
        if time.time() >= first.expires_at - 0.5:
            break
        assert seen == psutil.STATUS_STOPPED, "the victim ran while long.0 held it paused"
        await asyncio.sleep(0.02)

    (expired,) = await async_wait_until(lambda: events.events("long.0", "expired"), 5, "long.0 to expire")
    assert expired.measurements.hit_pids == [proc.pid]
    assert expired.measurements.resumed_pids == [proc.pid]
    await async_wait_until(
        lambda: status(proc) not in (psutil.STATUS_STOPPED, "gone"), 3, "the victim resumed at long.0's end"
    )
