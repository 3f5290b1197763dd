"""Commands to agents over NATS: connect, request with bounded retries, revert.

Commands are idempotent on the agent (by command id and by fault id), so a
request that timed out is simply sent again, the same message, a bounded
number of times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nats
import nats.errors

from proto.codec import DecodeError, decode, encode
from proto.messages import Ack, Inject, Revert
from proto.subjects import agent_cmd, exp_abort

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 2.0
DEFAULT_ATTEMPTS = 3


class ConnectError(RuntimeError):
    pass


async def connect(url: str, *, name: str = "faultline", connect_timeout_s: float = 2.0) -> Any:
    """A NATS connection that reconnects for a while and does not print errors by itself."""

    async def quiet(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    try:
        return await asyncio.wait_for(
            nats.connect(
                url,
                name=name,
                connect_timeout=int(max(1, connect_timeout_s)),
                reconnect_time_wait=1,
                max_reconnect_attempts=30,
                allow_reconnect=True,
                error_cb=quiet,
            ),
            connect_timeout_s * 2 + 1,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ConnectError(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from None


async def close(nc: Any, timeout_s: float = 2.0) -> None:
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to save
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.debug("nats close: %s", exc)


async def request_ack(
    nc: Any,
    node: str,
    command: Inject | Revert,
    *,
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
) -> tuple[Ack | None, str | None]:
    """Send the same command up to ``attempts`` times. Returns (ack, None) or (None, why not)."""
    subject = agent_cmd(node)
    payload = encode(command)
    why = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            msg = await nc.request(subject, payload, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            # No agent subscribed right now (restarting, reconnecting): wait a little, not the full timeout.
            why = f"no agent listening on {subject}"
            await asyncio.sleep(0.3)
            continue
        except (nats.errors.TimeoutError, TimeoutError):
            why = f"no reply within {timeout_s:g}s ({attempt} attempt(s))"
            continue
        except nats.errors.Error as exc:
            why = f"NATS error: {exc or type(exc).__name__}"
            await asyncio.sleep(0.2)
            continue
        try:
            return decode(msg.data, Ack), None
        except DecodeError as exc:
            return None, f"unreadable reply from {node}: {exc}"
    return None, why


async def revert_experiment(
    nc: Any,
    nodes: list[str],
    experiment_id: str,
    reason: str,
    *,
    timeout_s: float = 1.5,
    attempts: int = 2,
) -> dict[str, tuple[Ack | None, str | None]]:
    """Revert every fault of the experiment on each node, all nodes at once, bounded."""
    cmd = Revert(experiment_id=experiment_id, reason=reason[:500], expires_at=time.time() + 60.0)

    async def one(node: str) -> tuple[Ack | None, str | None]:
        return await request_ack(nc, node, cmd, timeout_s=timeout_s, attempts=attempts)

    results = await asyncio.gather(*(one(n) for n in nodes))
    return dict(zip(nodes, results, strict=True))


async def broadcast_revert(nc: Any, experiment_id: str, reason: str, *, timeout_s: float = 2.0) -> str | None:
    """One publish that every agent holding faults of the experiment acts on. Returns why it failed, or None.

    It is the fast path only: core NATS may drop it for an agent that is
    reconnecting, so callers follow up with per-node requests (revert_experiment)
    for any node whose faults they have not seen end.
    """
    cmd = Revert(experiment_id=experiment_id, reason=reason[:500], expires_at=time.time() + 60.0)
    try:
        await nc.publish(exp_abort(experiment_id), encode(cmd))
        await nc.flush(timeout=timeout_s)
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        return f"broadcast failed: {exc or type(exc).__name__}"
    return None
