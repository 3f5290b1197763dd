"""The controller's own NATS outage, through a TCP proxy it connects by, with scripted agents
on a direct connection (tests/integration/test_engine.py has the rest of the engine's tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from controller.engine import ExperimentRunner
from controller.fleet import Fleet
from tests.conftest import async_wait_until
from tests.integration.test_engine import ScriptedAgent, experiment

pytestmark = pytest.mark.integration


class CuttableProxy:
    """A loopback TCP relay to the nats-server that can drop every connection and stop listening
    (connections are refused, as from a server that is down), then listen again on its port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [w, uw]
        for coro in (self._pipe(r, uw), self._pipe(ur, w)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        cut, self._writers = self._writers, []
        for w in cut:
            w.transport.abort()
        await asyncio.gather(*(w.wait_closed() for w in cut), return_exceptions=True)

    async def close(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxied(nats_url: str) -> AsyncIterator[tuple[CuttableProxy, Any]]:
    proxy = CuttableProxy(int(nats_url.rsplit(":", 1)[1]))
    await proxy.listen()
    try:
        client = await nats.connect(
            f"nats://127.0.0.1:{proxy.port}", connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        try:
            yield proxy, client
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)
    finally:
        await proxy.close()


async def test_an_agent_silent_across_the_controller_s_nats_outage_is_caught_one_timeout_after_it(
    nc: Any, proxied: tuple[CuttableProxy, Any]
) -> None:
    """Heartbeats sent while the controller was cut off are lost, not late: agents are judged
    from its reconnection, and a silent one is caught one heartbeatTimeout after it. A review
    caught an intermediate change that gave it up to two."""
    proxy, controller_nc = proxied
    fleet = Fleet(controller_nc)
    await fleet.start()
    a = await ScriptedAgent(nc, "n1").start()
    b = await ScriptedAgent(nc, "n2").start()
    try:
        await fleet.wait_for(["n1", "n2"], 5)
        runner = ExperimentRunner(controller_nc, fleet, experiment("60s", hb_timeout="3s"), progress=lambda _l: None)
        run = asyncio.ensure_future(runner.run())
        await async_wait_until(lambda: b.held, 10, "n2's fault to be applied")
        b.silent = True
        await proxy.cut()
        await asyncio.sleep(1.5)  # the outage itself: its length is the scenario
        await proxy.listen()
        await async_wait_until(lambda: controller_nc.is_connected, 10, "the controller to reconnect")
        back_at = time.monotonic()
        report = await asyncio.wait_for(run, 30)
        caught_after_s = time.monotonic() - back_at
    finally:
        await a.stop()
        await b.stop()
        await fleet.stop()
    assert report.abort is not None and report.abort.node == "n2", report.abort
    assert "agent n2 silent for" in report.abort.reason, report.abort.reason
    # the safety bound: heartbeatTimeout after the reconnection, plus a monitor pass and the final revert's start
    assert caught_after_s < 3.0 + 1.0, f"n2 caught {caught_after_s:.1f}s after the reconnection"


async def _flap(proxy: CuttableProxy, client: Any, down_s: float, up_s: float, stop: asyncio.Event) -> int:
    """Cut the controller's link for ``down_s``, let it back for ``up_s`` (from its reconnection),
    until ``stop``; bounded by the test's own timeout. Returns how many times it was cut."""
    cuts = 0
    while not stop.is_set() and cuts < 40:
        await proxy.cut()
        cuts += 1
        await asyncio.sleep(down_s)
        await proxy.listen()
        await async_wait_until(lambda: client.is_connected, 10, "the controller to reconnect")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), up_s)
    return cuts


async def test_a_link_that_comes_and_goes_faster_than_the_timeout_no_longer_hides_a_silent_agent(
    nc: Any, proxied: tuple[CuttableProxy, Any]
) -> None:
    """Agents are judged from the controller's reconnection, so a link that came back every
    3.5 s with a heartbeatTimeout of 4 s hid a silent agent until the experiment's end. Now the
    time the controller could read heartbeats counts across the outages: the silent agent is
    caught (at twice the timeout of it), the healthy one never blamed. (Blind for well under
    half the time, the link itself is not judged unstable.)"""
    proxy, controller_nc = proxied
    fleet = Fleet(controller_nc)
    await fleet.start()
    a = await ScriptedAgent(nc, "n1").start()
    b = await ScriptedAgent(nc, "n2").start()
    stop = asyncio.Event()
    flapping: asyncio.Future[int] | None = None
    try:
        await fleet.wait_for(["n1", "n2"], 5)
        runner = ExperimentRunner(controller_nc, fleet, experiment("60s", hb_timeout="4s"), progress=lambda _l: None)
        run = asyncio.ensure_future(runner.run())
        await async_wait_until(lambda: b.held, 10, "n2's fault to be applied")
        b.silent = True
        silent_at = time.monotonic()
        flapping = asyncio.ensure_future(_flap(proxy, controller_nc, down_s=0.3, up_s=3.5, stop=stop))
        report = await asyncio.wait_for(run, 40)  # before: the run went on to its 60 s end
        caught_after_s = time.monotonic() - silent_at
    finally:
        stop.set()
        if flapping is not None:
            await asyncio.wait_for(flapping, 15)
        await a.stop()
        await b.stop()
        await fleet.stop()
    assert report.abort is not None and report.abort.node == "n2", report.abort
    assert "agent n2 silent for" in report.abort.reason and "came and went" in report.abort.reason, report.abort.reason
    assert caught_after_s < 30, f"caught {caught_after_s:.1f}s after it went silent"


async def test_a_link_lost_for_more_than_the_timeout_in_all_aborts_the_run(
    nc: Any, proxied: tuple[CuttableProxy, Any]
) -> None:
    """Outages each shorter than the heartbeatTimeout, with the grace after each covering more
    than half of the last five timeouts: the controller cannot watch its agents through such a
    link, and says so."""
    proxy, controller_nc = proxied
    fleet = Fleet(controller_nc)
    await fleet.start()
    a = await ScriptedAgent(nc, "n1").start()
    stop = asyncio.Event()
    flapping: asyncio.Future[int] | None = None
    try:
        await fleet.wait_for(["n1"], 5)
        runner = ExperimentRunner(controller_nc, fleet, experiment("60s", hb_timeout="2s"), progress=lambda _l: None)
        run = asyncio.ensure_future(runner.run())
        await async_wait_until(lambda: a.held, 10, "n1's fault to be applied")
        flapping = asyncio.ensure_future(_flap(proxy, controller_nc, down_s=1.2, up_s=0.8, stop=stop))
        report = await asyncio.wait_for(run, 30)
    finally:
        stop.set()
        if flapping is not None:
            await asyncio.wait_for(flapping, 15)
        await a.stop()
        await fleet.stop()
    assert report.abort is not None and report.abort.node is None, report.abort  # no agent to blame
    assert "NATS link is unstable" in report.abort.reason, report.abort.reason
