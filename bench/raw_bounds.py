"""Raw lower bounds for the control-plane benchmark: nats-py with none of faultline's work.

- ``Floor``: N raw subscriber connections and one publisher, kept open for a
  whole size: the floor (one publish until every subscriber got it), raw
  requests + replies shaped as ``controller.dispatch.request_acks`` sends them,
  and a broadcast with N acks.
- ``Transport``: the same requests through the running agents' own
  connections (the bound dispatch can reach in the benchmark's one process),
  alone and with the wire work the protocol requires; and the abort's
  broadcast + N events, the same two ways.

Imported by bench_control_plane.py (run as a script, so this folder is on sys.path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats

from agent.runtime import AgentRuntime
from controller.experiment import fault_id
from proto.codec import decode, decode_command, encode
from proto.faults import ProcessMatch, ProcessPauseSpec
from proto.messages import Ack, FaultEvent, Inject, Measurements, Revert

START_BATCH = 100
WAIT_S = 60.0  # bound on any single wait in a round


async def quiet_connect(url: str) -> Any:
    async def quiet(exc: Exception) -> None:
        logging.getLogger("bench").debug("nats: %s", exc)

    return await nats.connect(url, connect_timeout=5, allow_reconnect=False, error_cb=quiet)


async def close_all(conns: list[Any]) -> None:
    async def one(nc: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5.0)

    await asyncio.gather(*(one(nc) for nc in conns))


async def flush_twice(conns: list[Any]) -> None:
    """Subscriptions proven at the server: nats-py writes a flush's PING ahead of SUBs still in its
    buffer, so one PONG does not prove them (agent/runtime.py subscribe() has the story)."""
    for _ in range(2):
        await asyncio.gather(*(nc.flush(timeout=10) for nc in conns if nc is not None))


# --- the floor ---------------------------------------------------------------


class Floor:
    """N raw nats-py subscriber connections and one publisher, kept open for the whole size."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.subs: list[Any] = []
        self.pub: Any = None
        self.token = uuid.uuid4().hex[:8]
        self.got = 0
        self.done = asyncio.Event()
        self.acks = 0
        self.all_acked = asyncio.Event()
        self.replies = 0
        self.all_replied = asyncio.Event()
        self.inbox = ""

    async def open(self, url: str) -> None:
        for i in range(0, self.n, START_BATCH):
            self.subs += await asyncio.gather(*(quiet_connect(url) for _ in range(i, min(self.n, i + START_BATCH))))
        self.pub = await quiet_connect(url)

        async def on_msg(msg: Any) -> None:
            self.got += 1
            if self.got == self.n:
                self.done.set()

        async def echo(msg: Any) -> None:
            await msg.respond(b"ok")

        async def on_ack(msg: Any) -> None:
            self.acks += 1
            if self.acks == self.n:
                self.all_acked.set()

        for i, nc in enumerate(self.subs):
            await nc.subscribe(f"bench.floor.{self.token}", cb=on_msg)
            await nc.subscribe(f"bench.rr.{self.token}.{i}", cb=echo)
            await nc.subscribe(f"bench.bc.{self.token}", cb=echo)

        async def on_reply(msg: Any) -> None:
            self.replies += 1
            if self.replies == self.n:
                self.all_replied.set()

        await self.pub.subscribe(f"bench.acks.{self.token}", cb=on_ack)
        self.inbox = self.pub.new_inbox()
        await self.pub.subscribe(f"{self.inbox}.*", cb=on_reply)
        await flush_twice([self.pub, *self.subs])

    async def close(self) -> None:
        await close_all([*self.subs, self.pub] if self.pub is not None else self.subs)

    async def fan_out(self) -> float:
        """One publish until every subscriber got it (seconds)."""
        self.got = 0
        self.done.clear()
        t0 = time.perf_counter()
        await self.pub.publish(f"bench.floor.{self.token}", PAYLOAD)
        await asyncio.wait_for(self.done.wait(), WAIT_S)
        return time.perf_counter() - t0

    async def request_reply(self) -> float:
        """N requests shaped as request_acks sends them: back to back, one inbox subscription."""
        self.replies = 0
        self.all_replied.clear()
        t0 = time.perf_counter()
        for i in range(self.n):
            await self.pub.publish(f"bench.rr.{self.token}.{i}", PAYLOAD, reply=f"{self.inbox}.{i}")
        await asyncio.wait_for(self.all_replied.wait(), WAIT_S)
        return time.perf_counter() - t0

    async def broadcast_acks(self) -> float:
        self.acks = 0
        self.all_acked.clear()
        t0 = time.perf_counter()
        await self.pub.publish(f"bench.bc.{self.token}", PAYLOAD, reply=f"bench.acks.{self.token}")
        await asyncio.wait_for(self.all_acked.wait(), WAIT_S)
        return time.perf_counter() - t0

    async def baselines(self, rounds: int) -> tuple[list[float], list[float], list[float]]:
        """(fan-out, raw request-reply, raw broadcast-and-ack) times, seconds; one warm-up round.
        The fan-out is the ratio's denominator: three samples per round, it moves a lot."""
        fan: list[float] = []
        rr: list[float] = []
        bc: list[float] = []
        for _ in range(rounds + 1):
            fan += [await self.fan_out() for _ in range(3)]
            rr.append(await self.request_reply())
            bc.append(await self.broadcast_acks())
        return fan[3:], rr[1:], bc[1:]


PAYLOAD = b"x" * 400  # about an Inject's size


class Transport:
    """The dispatch's and the abort's transport, through the agents' own connections while they run.

    Every agent's connection gets three more subscriptions. Same process, same resident
    agents, same connections as the measured rounds:
    - ``round_trip()``: the controller connection sends N requests shaped as ``request_acks``
      sends them (back to back, one inbox subscription, a reply subject per node); each
      agent answers a fixed reply without reading the request, and the controller counts
      replies unread. None of faultline's work: the lower bound dispatch can reach with
      nats-py in this harness. It leaves out request_acks' own per-call work (its inbox
      subscription, reply-subject parsing, de-duplication) as well as the agents'.
    - ``round_trip(inject)``, given an encoded Inject: each agent decodes and validates it
      and answers an encoded Ack; the controller decodes and validates every Ack. The wire
      work the protocol requires (every message a validated pydantic model), nothing else.
    - ``abort_trip(wire)``: one broadcast, every agent publishes one event (fixed, or from
      the decoded Revert an encoded FaultEvent, decoded at the controller).
    A "no responders" status reply is not an answer: it fails the round.
    """

    REPLY = b"x" * 220  # about an Ack's size
    EVENT = b"x" * 330  # about a "reverted" FaultEvent's size

    def __init__(self, ctl: Any, runtimes: list[AgentRuntime]) -> None:
        self.ctl = ctl
        self.runtimes = runtimes
        self.token = uuid.uuid4().hex[:8]
        self.got = 0
        self.wire = False
        self.failure: str | None = None
        self.done = asyncio.Event()
        self.inbox = ""

    async def open(self) -> None:
        async def echo(msg: Any) -> None:
            await msg.respond(self.REPLY)

        def wire_answer(node: str) -> Any:
            async def answer(msg: Any) -> None:
                cmd = decode_command(msg.data)
                ack = Ack(in_reply_to=cmd.id, node=node, accepted=True, fault_states={cmd.fault_id: "accepted"})
                await msg.respond(encode(ack))

            return answer

        def abort_answer(nc: Any, node: str) -> Any:
            async def answer(msg: Any) -> None:
                if not self.wire:
                    await nc.publish(f"bench.events.{self.token}", self.EVENT)
                    return
                cmd = decode(msg.data, Revert)
                ev = FaultEvent(
                    experiment_id=cmd.experiment_id,
                    fault_id=fault_id(cmd.experiment_id, 0),
                    node=node,
                    kind="process-pause",
                    state="reverted",
                    reason=f"requested: {cmd.reason}",
                    measurements=Measurements(apply_s=0.0001, revert_s=0.0001),
                )
                await nc.publish(f"bench.events.{self.token}", encode(ev))

            return answer

        async def on_reply(msg: Any) -> None:
            if msg.headers and msg.headers.get("Status") == "503":
                self.failure = f"no responders on {msg.subject}"
                self.done.set()
                return
            if self.wire:
                decode(msg.data, Ack)
            self.count()

        async def on_event(msg: Any) -> None:
            if self.wire:
                decode(msg.data, FaultEvent)
            self.count()

        for i, rt in enumerate(self.runtimes):
            assert rt.nc is not None
            await rt.nc.subscribe(f"bench.transport.{self.token}.{i}", cb=echo)
            await rt.nc.subscribe(f"bench.wire.{self.token}.{i}", cb=wire_answer(rt.node))
            await rt.nc.subscribe(f"bench.abort.{self.token}", cb=abort_answer(rt.nc, rt.node))
        self.inbox = self.ctl.new_inbox()
        await self.ctl.subscribe(f"{self.inbox}.*", cb=on_reply)
        await self.ctl.subscribe(f"bench.events.{self.token}", cb=on_event)
        await flush_twice([self.ctl, *(rt.nc for rt in self.runtimes)])

    def _begin(self, wire: bool) -> None:
        self.got = 0
        self.wire = wire
        self.failure = None
        self.done.clear()

    async def _wait(self, t0: float) -> float:
        await asyncio.wait_for(self.done.wait(), WAIT_S)
        if self.failure is not None:
            raise RuntimeError(self.failure)
        return time.perf_counter() - t0

    def count(self) -> None:
        self.got += 1
        if self.got == len(self.runtimes):
            self.done.set()

    async def abort_trip(self, wire: bool) -> float:
        """The abort's transport: one broadcast, every agent publishes one event, until all
        arrived. ``wire``: each agent decodes the Revert and sends an encoded FaultEvent, and
        the controller decodes every event; no fault is looked up or reverted."""
        self._begin(wire)
        cmd = Revert(experiment_id="w" + uuid.uuid4().hex[:16], reason="bench abort", expires_at=time.time() + 60)
        t0 = time.perf_counter()
        await self.ctl.publish(f"bench.abort.{self.token}", encode(cmd))
        return await self._wait(t0)

    async def round_trip(self, inject: bytes | None = None) -> float:
        """No ``inject``: the transport alone. An encoded Inject: with the wire work."""
        self._begin(inject is not None)
        prefix = f"bench.wire.{self.token}" if inject is not None else f"bench.transport.{self.token}"
        payload = inject if inject is not None else PAYLOAD
        t0 = time.perf_counter()
        for i in range(len(self.runtimes)):
            await self.ctl.publish(f"{prefix}.{i}", payload, reply=f"{self.inbox}.{i}")
        return await self._wait(t0)


def wire_inject() -> bytes:
    """An encoded Inject as dispatch sends it, for Transport's wire round (nothing records it)."""
    exp = "w" + uuid.uuid4().hex[:16]
    spec = ProcessPauseSpec(match=ProcessMatch(name="bench-noop"))
    inject = Inject(
        experiment_id=exp,
        fault_id=fault_id(exp, 0),
        spec=spec,
        expires_at=time.time() + 120.0,
        lease_timeout_s=120.0,
        await_start=True,
    )
    return encode(inject)


def message_costs(reps: int = 20000) -> list[tuple[str, float]]:
    """Per-message CPU of the wire work every dispatch does per agent, microseconds (median of 5 runs)."""
    inject = encode(
        Inject(
            experiment_id="bcost",
            fault_id=fault_id("bcost", 0),
            spec=ProcessPauseSpec(match=ProcessMatch(name="bench-noop")),
            expires_at=time.time() + 120.0,
            lease_timeout_s=120.0,
        )
    )
    cmd = decode_command(inject)
    ack_bytes = encode(
        Ack(in_reply_to=cmd.id, node="bench-0000", accepted=True, fault_states={cmd.fault_id: "accepted"})
    )

    def build_ack() -> bytes:
        return encode(
            Ack(in_reply_to=cmd.id, node="bench-0000", accepted=True, fault_states={cmd.fault_id: "accepted"})
        )

    steps: list[tuple[str, Callable[[], object]]] = [
        ("agent: decode and validate the Inject", lambda: decode_command(inject)),
        ("agent: build and encode the Ack", build_ack),
        ("controller: decode and validate the Ack", lambda: decode(ack_bytes, Ack)),
    ]
    out = []
    for name, fn in steps:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps // 5):
                fn()
            runs.append((time.perf_counter() - t0) / (reps // 5))
        out.append((name, statistics.median(runs) * 1e6))
    return out
