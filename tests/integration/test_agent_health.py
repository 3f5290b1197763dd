"""/healthz and /readyz on a real agent, while its NATS server goes away and comes back."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controller.natsserver import NatsServer
from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_readyz_follows_the_nats_connection(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(dir=tmp_path))
    server = NatsServer(port=nats_port, workdir=str(workdir))
    server.start()
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - closed in finally
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "agent.main", "--nats", f"nats://127.0.0.1:{nats_port}", "--node", "health-a",
            "--state-dir", str(tmp_path / "state"), "--http-addr", f"127.0.0.1:{http_port}",
        ],
        stdout=log, stderr=log, cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, 15, "readyz 200 once connected and recovered")
        t0 = time.monotonic()
        status, _ = get(f"{base}/healthz")
        assert status == 200 and time.monotonic() - t0 < 0.1 * 10  # bound generous for a loaded CI machine

        server.kill()
        _, body = wait_until(
            lambda: (r := get(f"{base}/readyz"))[0] == 503 and r, 10, "readyz 503 after NATS went away"
        )
        assert "NATS" in body
        assert get(f"{base}/healthz")[0] == 200, "the event loop must stay alive without NATS"

        server = NatsServer(port=nats_port, workdir=str(workdir))
        server.start()
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, 15, "readyz 200 after NATS came back")
        assert agent.poll() is None
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        server.stop()
