"""An agent whose NATS client nats-py gave up on for good connects again (real nats-server)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import nats
import pytest

from agent.config import AgentSettings
from agent.runtime import AgentRuntime
from controller.natsserver import NatsServer
from proto.codec import decode, encode
from proto.messages import Ack, Revert
from proto.subjects import agent_cmd
from tests.conftest import async_wait_until


async def test_an_agent_whose_connection_nats_py_closed_for_good_connects_again(tmp_path: Path, nats_url: str) -> None:
    """nats-py closes a client for good on some server -ERRs ('Maximum Connections Exceeded',
    'Authorization Violation'), whatever max_reconnect_attempts says; the agent stayed cut off,
    unready, until someone restarted it."""
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "closed-1"}, nats={"urls": [nats_url]}))
    run = asyncio.create_task(rt.run())
    ctl = await nats.connect(nats_url)
    try:
        await asyncio.wait_for(rt.ready_event.wait(), 15)
        first = rt.nc
        assert first is not None
        await first._process_err("'Maximum Connections Exceeded'")  # what the server's -ERR does
        await async_wait_until(lambda: rt.nc is not first and rt.connected, 10, "the agent to connect afresh")
        assert first.is_closed
        probe = Revert(experiment_id="nobody", reason="are you there", expires_at=time.time() + 30)

        async def answered() -> Ack:
            msg = await ctl.request(agent_cmd("closed-1"), encode(probe), timeout=2)
            return decode(msg.data, Ack)

        ack = await asyncio.wait_for(answered(), 10)
        assert ack.node == "closed-1"
    finally:
        await ctl.close()
        rt.request_stop()
        assert await asyncio.wait_for(run, 30) == 0


async def test_a_server_that_closes_the_client_during_the_first_subscribe_leaves_one_retrying_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that refuses the agent's subscriptions (max_subscriptions below the agent's five)
    makes nats-py close the client for good, during the start's subscribe or just after it.
    Before, a close during it started a second connect loop beside the start's, and the start
    died with a FlushTimeoutError, without its shutdown. Now there is one loop at a time, and
    the agent keeps connecting again until it stops."""
    conf = tmp_path / "server.conf"
    conf.write_text("max_subscriptions: 3\n")
    (tmp_path / "nats").mkdir()
    server = NatsServer(workdir=str(tmp_path / "nats"), extra_args=["-c", str(conf)])
    url = server.start()
    rt = AgentRuntime(
        AgentSettings(
            state_dir=tmp_path / "state", identity={"node": "subs-1"}, nats={"urls": [url], "reconnect_wait_s": 0.2}
        )
    )
    loops = {"now": 0, "most": 0}
    one_loop = rt.connect_subscribed

    async def counted() -> bool:
        loops["now"] += 1
        loops["most"] = max(loops["most"], loops["now"])
        try:
            return await one_loop()
        finally:
            loops["now"] -= 1

    rt.connect_subscribed = counted  # type: ignore[method-assign]
    run = asyncio.create_task(rt.run())
    try:

        def connected_again_twice() -> bool:
            assert not run.done(), f"the agent's run ended: {run.exception() if not run.cancelled() else 'cancelled'}"
            assert loops["most"] <= 1, "a second connect loop ran beside the first"
            return caplog.text.count("connecting again") >= 2

        with caplog.at_level(logging.WARNING, logger="faultline.agent"):
            await async_wait_until(connected_again_twice, 30, "two closed connections, each connected again")
        assert loops["most"] == 1
    finally:
        rt.request_stop()
        try:
            assert await asyncio.wait_for(run, 15) == 0
        finally:
            server.stop()
