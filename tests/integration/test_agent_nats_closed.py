"""An agent whose NATS client nats-py gave up on for good connects again (real nats-server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats

from agent.config import AgentSettings
from agent.runtime import AgentRuntime
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
