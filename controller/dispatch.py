"""Commands to agents over NATS: connect, request with bounded retries, revert.

Commands are idempotent on the agent (by command id and by fault id), so a
request that timed out is simply sent again, the same message, a bounded
number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import nats.errors

from proto import natstls
from proto.codec import DecodeError, decode, encode
from proto.messages import Ack, Revert, Start
from proto.natsurl import NatsTarget, NatsUrlError, redacted, split_servers
from proto.subjects import agent_cmd, exp_abort, exp_start

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 2.0
DEFAULT_ATTEMPTS = 3


class ConnectError(RuntimeError):
    pass


def with_tls(target: NatsTarget, ca: Path | None, cert: Path | None, key: Path | None) -> NatsTarget:
    """The target with its TLS files (the flags, else FAULTLINE_NATS_TLS_*), checked now: a file
    that cannot be used is bad input (NatsUrlError naming the setting), before anything is sent."""
    tls = natstls.from_env(ca=ca, cert=cert, key=key)
    try:
        tls.context(target.servers)
    except natstls.TlsSettingsError as exc:
        raise NatsUrlError(str(exc)) from None
    return dataclasses.replace(target, tls=tls)


async def connect(
    url: str, *, name: str = "faultline", connect_timeout_s: float = 2.0, tls: natstls.TlsFiles | None = None
) -> Any:
    """A NATS connection that reconnects for a while and does not print errors by itself.

    ``url`` is one URL or a comma-separated list, as faultline-agent takes them. TLS is
    required when a URL is tls:// or ``tls`` gives any file: never plaintext then (proto/natstls.py)."""
    try:
        servers = split_servers(url)
    except ValueError as exc:
        raise ConnectError(f"cannot connect to NATS at {redacted(url)}: not a NATS server URL: {exc}") from None
    try:
        ctx = (tls or natstls.TlsFiles()).context(servers)
    except natstls.TlsSettingsError as exc:
        raise ConnectError(f"cannot connect to NATS at {redacted(url)}: {exc}") from None

    seen: list[Exception] = []  # the last error only: the callback lives as long as the connection
    fatal = asyncio.Event()

    async def quiet(exc: Exception) -> None:
        seen[:] = [exc]
        log.debug("nats: %s", exc)
        if len(servers) == 1 and _tls_final(exc):
            fatal.set()  # a certificate or a server without TLS does not change by retrying

    nc = natstls.client(require_tls=ctx is not None)
    options: dict[str, Any] = {"tls": ctx} if ctx is not None else {}
    attempt = asyncio.ensure_future(
        nc.connect(
            servers,
            name=name,
            connect_timeout=int(max(1, connect_timeout_s)),
            reconnect_time_wait=1,
            max_reconnect_attempts=30,
            allow_reconnect=True,
            error_cb=quiet,
            **options,
        )
    )
    gave_up = asyncio.ensure_future(fatal.wait())
    bound_s = connect_timeout_s * 2 + 1
    try:
        await asyncio.wait({attempt, gave_up}, timeout=bound_s, return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
            if fatal.is_set():
                raise ConnectError(f"cannot connect to NATS at {redacted(url)}: {redacted(_tls_why(seen[-1]))}")
            raise TimeoutError(f"no connection within {bound_s:g} s")
        attempt.result()
        return nc
    except ConnectError:
        raise
    except asyncio.CancelledError:
        # the caller gave up (Ctrl-C): leave no connect attempt running behind it
        attempt.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(nc.close(), 1.0)
        raise
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        why = str(exc) or type(exc).__name__
        if seen and str(seen[-1]) and str(seen[-1]) != why:
            why += f" (last error: {seen[-1]})"  # the real cause, e.g. connection refused
        raise ConnectError(f"cannot connect to NATS at {redacted(url)}: {redacted(why)}") from None
    finally:
        gave_up.cancel()


def _tls_final(exc: Exception) -> bool:
    """A TLS failure no retry will mend: no TLS offered, a certificate refused either way (a
    verify failure here, a TLS alert from the server). A connection cut mid-handshake is not."""
    if isinstance(exc, (natstls.TlsNotOffered, ssl.SSLCertVerificationError)):
        return True
    return isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason or "")


def _tls_why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the server's certificate was not accepted ({exc.verify_message}); "
            "--tls-ca (FAULTLINE_NATS_TLS_CA) names the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake failed: {exc.reason or exc} (a client certificate the server wants: --tls-cert/--tls-key)"
        )
    return str(exc)


async def close(nc: Any, timeout_s: float = 2.0) -> None:
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to save
        try:
            await asyncio.wait_for(nc.close(), timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.debug("nats close: %s", exc)


NO_RESPONDERS_RETRY_S = 0.3


async def request_acks(
    nc: Any,
    payloads: dict[str, bytes],
    *,
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, tuple[Ack | None, str | None]]:
    """Send each node its command and collect the Acks: ``payloads`` maps node -> encoded command.

    Every command is published back to back, each with its own reply subject
    under one inbox subscription, so a thousand nodes cost a thousand publishes
    and one subscription instead of a thousand request futures. A node that did
    not answer gets the same payload again (commands are idempotent), up to
    ``attempts`` times; a node with no agent listening is retried after a short
    pause, not the full timeout. Returns node -> (ack, None) or (None, why not).
    """
    nodes = list(payloads)
    results: dict[str, tuple[Ack | None, str | None]] = {}
    why: dict[str, str] = dict.fromkeys(nodes, "no attempt made")
    inbox = nc.new_inbox()
    pending: set[int] = set()  # indexes this attempt still waits for
    absent: set[int] = set()  # answered "no responders" in this attempt
    settled = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        try:
            i = int(msg.subject.rpartition(".")[2])
            node = nodes[i]
        except (ValueError, IndexError):
            return
        if node in results:
            return  # a duplicate answer from an earlier attempt: the first one stands
        if msg.headers and msg.headers.get("Status") == "503":
            if i in pending:
                why[node] = f"no agent listening on {agent_cmd(node)}"
                absent.add(i)
        else:
            try:
                results[node] = (decode(msg.data, Ack), None)
            except DecodeError as exc:
                results[node] = (None, f"unreadable reply from {node}: {exc}")
        pending.discard(i)
        if not pending:
            settled.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
    try:
        for attempt in range(1, attempts + 1):
            todo = [i for i, n in enumerate(nodes) if n not in results]
            if not todo:
                break
            if absent and attempt > 1:
                await asyncio.sleep(NO_RESPONDERS_RETRY_S)  # an agent restarting or reconnecting
            pending.clear()
            pending.update(todo)
            absent.clear()
            settled.clear()
            try:
                for i in todo:
                    await nc.publish(agent_cmd(nodes[i]), payloads[nodes[i]], reply=f"{inbox}.{i}")
                await asyncio.wait_for(settled.wait(), timeout_s)
            except TimeoutError:
                for i in pending:
                    why[nodes[i]] = f"no reply within {timeout_s:g}s ({attempt} attempt(s))"
            except nats.errors.Error as exc:
                for i in pending:
                    why[nodes[i]] = f"NATS error: {str(exc) or type(exc).__name__}"
                await asyncio.sleep(0.2)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return {n: results.get(n) or (None, why[n]) for n in nodes}


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
    payload = encode(Revert(experiment_id=experiment_id, reason=reason[:500], expires_at=time.time() + 60.0))
    return await request_acks(nc, dict.fromkeys(nodes, payload), timeout_s=timeout_s, attempts=attempts)


async def _broadcast(nc: Any, subject: str, payload: bytes, timeout_s: float) -> str | None:
    try:
        await nc.publish(subject, payload)
        await nc.flush(timeout=timeout_s)
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        return f"broadcast failed: {str(exc) or type(exc).__name__}"
    return None


async def broadcast_revert(nc: Any, experiment_id: str, reason: str, *, timeout_s: float = 2.0) -> str | None:
    """One publish that every agent holding faults of the experiment acts on. Returns why it failed, or None.

    It is the fast path only: core NATS may drop it for an agent that is
    reconnecting, so callers follow up with per-node requests (revert_experiment)
    for any node whose faults they have not seen end.
    """
    cmd = Revert(experiment_id=experiment_id, reason=reason[:500], expires_at=time.time() + 60.0)
    return await _broadcast(nc, exp_abort(experiment_id), encode(cmd), timeout_s)


async def broadcast_start(nc: Any, experiment_id: str, *, timeout_s: float = 2.0) -> str | None:
    """One publish that starts the experiment's waiting faults on every agent. Returns why it failed, or None.

    The fast path only, as broadcast_revert: callers follow up with per-node
    requests (start_experiment) for any node not seen starting.
    """
    cmd = Start(experiment_id=experiment_id, expires_at=time.time() + 60.0)
    return await _broadcast(nc, exp_start(experiment_id), encode(cmd), timeout_s)


async def start_experiment(
    nc: Any,
    nodes: list[str],
    experiment_id: str,
    fault_ids: list[str],
    *,
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, tuple[Ack | None, str | None]]:
    """Start the experiment's waiting faults on each node, all nodes at once, bounded. Each Ack
    names the state of every fault in ``fault_ids`` that the agent holds or recently ended."""
    payload = encode(Start(experiment_id=experiment_id, fault_ids=fault_ids, expires_at=time.time() + 60.0))
    return await request_acks(nc, dict.fromkeys(nodes, payload), timeout_s=timeout_s, attempts=attempts)
