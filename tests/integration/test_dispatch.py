"""controller.dispatch.request_acks against a real nats-server: many nodes, one inbox, bounded retries."""

from __future__ import annotations

import time
from typing import Any

import pytest

from controller.dispatch import request_acks
from proto.codec import decode_command, encode
from proto.messages import Ack, Revert
from proto.subjects import agent_cmd

pytestmark = pytest.mark.integration


class Responder:
    """Answers commands on one node's subject; can drop the first few or answer twice."""

    def __init__(self, nc: Any, node: str, drop_first: int = 0, answer_twice: bool = False) -> None:
        self.nc, self.node, self.drop_first, self.answer_twice = nc, node, drop_first, answer_twice
        self.received = 0

    async def start(self) -> Responder:
        await self.nc.subscribe(agent_cmd(self.node), cb=self.on_cmd)
        await self.nc.flush()
        return self

    async def on_cmd(self, msg: Any) -> None:
        self.received += 1
        if self.received <= self.drop_first:
            return
        cmd = decode_command(msg.data)
        for _ in range(2 if self.answer_twice else 1):
            await msg.respond(encode(Ack(in_reply_to=cmd.id, node=self.node, accepted=True)))


def revert_payload() -> bytes:
    return encode(Revert(experiment_id="exp-d", reason="test", expires_at=time.time() + 60))


async def test_real_agents_and_a_missing_node(nc: Any, agent_factory: Any) -> None:
    agent_factory("node-a")
    agent_factory("node-b")
    payload = revert_payload()
    t0 = time.monotonic()
    results = await request_acks(
        nc, {"node-a": payload, "node-b": payload, "node-gone": payload}, timeout_s=2.0, attempts=3
    )
    took = time.monotonic() - t0
    assert results["node-a"][0] is not None and results["node-a"][0].node == "node-a"
    assert results["node-b"][0] is not None and results["node-b"][0].accepted
    ack, why = results["node-gone"]
    assert ack is None and why == f"no agent listening on {agent_cmd('node-gone')}"
    # "no responders" is answered by the server at once: retried after short pauses, never the full timeout
    assert took < 2.0, f"a node with no agent took {took:.2f}s (the request timeout is 2s)"


async def test_a_dropped_command_is_sent_again(nc: Any) -> None:
    flaky = await Responder(nc, "flaky", drop_first=1).start()
    steady = await Responder(nc, "steady").start()
    results = await request_acks(nc, {"flaky": revert_payload(), "steady": revert_payload()}, timeout_s=0.5)
    assert results["flaky"][0] is not None and results["steady"][0] is not None
    assert flaky.received == 2 and steady.received == 1  # only the silent node got the command again


async def test_no_reply_is_bounded_and_says_so(nc: Any) -> None:
    await Responder(nc, "mute", drop_first=99).start()
    t0 = time.monotonic()
    results = await request_acks(nc, {"mute": revert_payload()}, timeout_s=0.3, attempts=2)
    assert time.monotonic() - t0 < 0.3 * 2 + 1.0
    assert results["mute"] == (None, "no reply within 0.3s (2 attempt(s))")


async def test_duplicate_and_unreadable_answers(nc: Any) -> None:
    await Responder(nc, "twice", answer_twice=True).start()

    async def garbage(msg: Any) -> None:
        await msg.respond(b"not json")

    await nc.subscribe(agent_cmd("garbled"), cb=garbage)
    results = await request_acks(nc, {"twice": revert_payload(), "garbled": revert_payload()}, timeout_s=1.0)
    ack = results["twice"][0]
    assert isinstance(ack, Ack) and ack.node == "twice"
    ack, why = results["garbled"]
    assert ack is None and why is not None and why.startswith("unreadable reply from garbled: not JSON")


async def test_many_nodes_one_subscription(nc: Any) -> None:
    nodes = [f"n{i:03d}" for i in range(200)]
    for n in nodes:
        await Responder(nc, n).start()
    results = await request_acks(nc, dict.fromkeys(nodes, revert_payload()), timeout_s=5.0)
    assert sorted(n for n, (ack, _) in results.items() if ack is not None and ack.node == n) == nodes
