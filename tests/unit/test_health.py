"""agent/health.py over a real loopback socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from agent.health import MAX_REQUEST_HEAD_BYTES, parse_http_addr, start_health_server


class Readiness:
    def __init__(self) -> None:
        self.ready = False
        self.reason = "not connected to NATS"

    def __call__(self) -> tuple[bool, str]:
        return self.ready, self.reason


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Readiness]]:
    readiness = Readiness()
    server = await start_health_server("127.0.0.1", 0, readiness)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, readiness
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def request(port: int, raw: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # the server closes: read to EOF
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert b"Connection: close" in head
    return status, body.decode().strip()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_healthz_answers_ok_fast(served: tuple[int, Readiness]) -> None:
    port, _ = served
    started = time.monotonic()
    assert await request(port, get("/healthz")) == (200, "ok")
    # The bound is 100 ms; a safety bound, not a benchmark.
    assert time.monotonic() - started < 1.0


async def test_readyz_follows_the_check(served: tuple[int, Readiness]) -> None:
    port, readiness = served
    assert await request(port, get("/readyz")) == (503, "not connected to NATS")
    readiness.reason = "journal recovery not done"
    assert await request(port, get("/readyz")) == (503, "journal recovery not done")
    readiness.ready, readiness.reason = True, ""
    assert await request(port, get("/readyz")) == (200, "ready")
    readiness.ready = False
    readiness.reason = "not connected to NATS"
    assert await request(port, get("/readyz?verbose")) == (503, "not connected to NATS")


async def test_broken_check_reads_not_ready() -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("state unavailable")

    server = await start_health_server("127.0.0.1", 0, boom)
    try:
        port = server.sockets[0].getsockname()[1]
        status, body = await request(port, get("/readyz"))
        assert status == 503 and "state unavailable" in body
        assert await request(port, get("/healthz")) == (200, "ok")
    finally:
        server.close()
        await server.wait_closed()


async def test_unknown_paths_methods_and_garbage(served: tuple[int, Readiness]) -> None:
    port, _ = served
    assert (await request(port, get("/metrics")))[0] == 404
    assert (await request(port, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n"))[0] == 405
    assert (await request(port, b"hello there\r\n\r\n"))[0] == 400
    oversized = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_HEAD_BYTES * 2) + b"\r\n\r\n"
    assert (await request(port, oversized))[0] == 431


async def test_head_has_no_body(served: tuple[int, Readiness]) -> None:
    port, _ = served
    status, body = await request(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, "")


async def test_silent_client_is_dropped(served: tuple[int, Readiness], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.health.READ_TIMEOUT_S", 0.2)
    port, _ = served
    status, body = await request(port, b"GET /healthz")  # never finishes its head
    assert (status, body) == (408, "request timeout")
    # and the server still serves others
    assert await request(port, get("/healthz")) == (200, "ok")


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("10.0.0.5:9464", ("10.0.0.5", 9464)),
        ("[fd00::1]:9464", ("fd00::1", 9464)),
        ("fd00::1:9464", ("fd00::1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
    ],
)
def test_parse_http_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_http_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9464", "host:", "host:port", "host:70000"])
def test_parse_http_addr_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_http_addr(addr)
