"""The agent's health endpoints: a tiny HTTP/1.1 responder on asyncio streams.

``GET /healthz`` answers 200 "ok" whenever the event loop runs: it touches no
other state, so it is fast even while faults are being reverted (the kubelet's
liveness probe). ``GET /readyz`` answers 200 or 503 with the reason from the
runtime's ``is_ready`` callback (the readiness probe: connected to NATS and
journal recovery done). Anything else is 404; methods other than GET/HEAD 405.

No framework: two fixed paths do not justify a dependency in a daemon whose
idle RSS budget is 40 MB. Each connection serves one request and is closed;
the request head is read with a size bound and a timeout, so a slow or hostile
client can hold a connection for at most ``read_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 8192
"""Longer request heads are answered 431 and closed."""
READ_TIMEOUT_S = 2.0
"""A client must send its request head within this, seconds."""
WRITE_TIMEOUT_S = 2.0
"""The answer must be taken by the client within this, seconds."""

ReadyCheck = Callable[[], tuple[bool, str]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(status: int, body: str, *, head_only: bool = False) -> bytes:
    payload = (body + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + payload


def _route(method: str, target: str, is_ready: ReadyCheck) -> tuple[int, str]:
    path = target.split("?", 1)[0]
    if path not in ("/healthz", "/readyz"):
        return 404, "not found"
    if method not in ("GET", "HEAD"):
        return 405, "method not allowed"
    if path == "/healthz":
        return 200, "ok"
    try:
        ready, reason = is_ready()
    except Exception as exc:  # a broken check must read as "not ready", never crash the responder
        log.exception("readiness check failed")
        return 503, f"readiness check failed: {exc}"
    return (200, reason or "ready") if ready else (503, reason or "not ready")


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, is_ready: ReadyCheck) -> None:
    method = "GET"
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            status, body = 431, "request head too large"
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request
        except TimeoutError:
            status, body = 408, "request timeout"
        else:
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                status, body = 400, "bad request"
            else:
                method = parts[0]
                status, body = _route(method, parts[1], is_ready)
        writer.write(_response(status, body, head_only=method == "HEAD"))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
    except (ConnectionError, TimeoutError):
        pass  # the prober gave up; nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT_S)


async def start_health_server(host: str, port: int, is_ready: ReadyCheck) -> asyncio.Server:
    """Listen on host:port (port 0: any free port; read it from ``server.sockets``).

    The caller owns the server: ``server.close(); await server.wait_closed()`` at stop.
    """

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reader, writer, is_ready)

    return await asyncio.start_server(
        on_connect, host=host, port=port, limit=MAX_REQUEST_HEAD_BYTES, reuse_address=True
    )


def parse_http_addr(addr: str) -> tuple[str, int]:
    """Split "HOST:PORT", "[v6]:PORT" or "v6addr:PORT" (last colon) into (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"http address {addr!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port_text)
