"""Shared fixtures: a real nats-server, real agent processes, real victims.

Everything a fixture starts it stops in its finaliser, also when the test
fails. Waits are bounded and fail with a message that says what did not
happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest

from controller.natsserver import NatsServer
from proto import subjects
from proto.codec import DecodeError, decode
from proto.messages import FaultEvent, Heartbeat

REPO = Path(__file__).resolve().parent.parent


# --- bounded waits -------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        time.sleep(interval_s)


def remove_cgroup(d: Path, timeout_s: float) -> None:
    """rmdir a test's cgroup, retried while a just-killed member is still leaving it."""
    deadline = time.monotonic() + timeout_s
    while d.exists():
        try:
            d.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def async_wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        await asyncio.sleep(interval_s)


# --- asyncio hygiene (as kopf does): a test must not leave tasks running --------


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Set up first and torn down last for every async test (see the hook below)."""
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + 1.0
    while True:
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leaked or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    for t in leaked:
        t.cancel()
    assert not leaked, f"test left asyncio tasks running: {sorted(t.get_name() for t in leaked)}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("asyncio") is not None and isinstance(item, pytest.Function):
            if "no_leaked_tasks" not in item.fixturenames:
                item.fixturenames.insert(0, "no_leaked_tasks")


# --- NATS ------------------------------------------------------------------------


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(workdir=str(tmp_path / "nats"))
    (tmp_path / "nats").mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    assert nats_server.url is not None
    return nats_server.url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    client = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)


class Recorder:
    """Collects decoded messages from a subject (heartbeats, events)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.items: list[Any] = []
        self.garbage = 0

    async def cb(self, msg: Any) -> None:
        try:
            self.items.append(decode(msg.data, self.model))
        except DecodeError:
            self.garbage += 1

    def events(self, fault_id: str | None = None, state: str | None = None, node: str | None = None) -> list[Any]:
        return [
            e
            for e in self.items
            if (fault_id is None or e.fault_id == fault_id)
            and (state is None or e.state == state)
            and (node is None or e.node == node)
        ]

    def heartbeats(self, node: str) -> list[Heartbeat]:
        return [h for h in self.items if h.node == node]


@pytest.fixture
async def heartbeats(nc: Any) -> AsyncIterator[Recorder]:
    rec = Recorder(Heartbeat)
    sub = await nc.subscribe(subjects.ALL_HEARTBEATS, cb=rec.cb)
    yield rec
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


@pytest.fixture
async def events(nc: Any) -> AsyncIterator[Recorder]:
    rec = Recorder(FaultEvent)
    sub = await nc.subscribe("faultline.v1.exp.*.events", cb=rec.cb)
    yield rec
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


# --- agents ------------------------------------------------------------------------


class AgentProcess:
    def __init__(
        self, url: str, node: str, state_dir: Path, log_path: Path, extra: list[str], launcher: list[str] | None = None
    ) -> None:
        self.url, self.node, self.state_dir, self.log_path, self.extra = url, node, state_dir, log_path, extra
        self.launcher = launcher or [sys.executable, "-m", "agent.main"]  # argv before the agent's flags
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> AgentProcess:
        argv = [
            *self.launcher,
            "--nats", self.url, "--node", self.node, "--state-dir", str(self.state_dir),
            "--heartbeat-interval", "0.5", *self.extra,
        ]  # fmt: skip
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self, since_start: bool = False) -> str:
        try:
            text = self.log_path.read_bytes()
        except OSError:
            return ""
        return (text[self._log_offset :] if since_start else text[-4000:]).decode(errors="replace")

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.node} exited with {self.proc.returncode}:\n{self.log()}")
            return "faultline-agent ready" in self.log(since_start=True)

        wait_until(ready, timeout_s, f"agent {self.node} to log ready")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def keepers(self) -> list[psutil.Process]:
        """The agent's keeper processes (agent/keepers.py), one per pause or network fault held."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        out = []
        for c in children:
            with contextlib.suppress(psutil.Error):
                if "agent.keeper_main" in c.cmdline():
                    out.append(c)
        return out

    def kill9(self, with_keepers: bool = False) -> None:
        """SIGKILL the agent; ``with_keepers``: its keepers first, as a container runtime ends a
        dead agent's container, so only a restart's journal recovery reverts what it held."""
        if with_keepers:
            for k in self.keepers():
                with contextlib.suppress(psutil.Error):
                    k.kill()
                    k.wait(5)
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGCONT)  # a paused agent cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def journal(self) -> list[str]:
        d = self.state_dir / "journal"
        return sorted(p.name for p in d.glob("*.json")) if d.is_dir() else []

    def settled_journal(self, timeout_s: float = 2.0) -> list[str]:
        """The journal once it is empty, or as it stands after ``timeout_s``.

        The agent publishes "reverted" before it drops the journal entry (one
        worker-thread call later), so a check right after the event waits for it.
        """
        deadline = time.monotonic() + timeout_s
        while self.journal() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.journal()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)  # fixtures read rep_call to show logs of a failed test
    return rep


@pytest.fixture
def agent_factory(
    nats_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(
        node: str = "node-a",
        extra: list[str] | None = None,
        url: str | None = None,
        start: bool = True,
        launcher: list[str] | None = None,
    ) -> AgentProcess:
        state = tmp_path / f"state-{node}"
        state.mkdir(exist_ok=True)
        agent = AgentProcess(url or nats_url, node, state, tmp_path / f"agent-{node}.log", extra or [], launcher)
        started.append(agent)
        if start:
            agent.start().wait_ready()
        return agent

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for agent in started:
        alive = agent.proc is not None and agent.proc.poll() is None
        code = agent.stop()
        if failed:  # a failing test shows what each agent did (pytest prints teardown output)
            print(f"--- agent {agent.node}: {'was running' if alive else f'had exited ({code})'}; log tail:")
            print(agent.log())


# --- victims -----------------------------------------------------------------------


class Victims:
    """Victim processes started by the test, each with a token nothing else on the machine has."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.token = f"faultline-test-victim-{uuid.uuid4().hex[:10]}"

    def start(self, n: int = 1, tag: str = "") -> list[psutil.Process]:
        out = []
        for _ in range(n):
            p = subprocess.Popen(
                [sys.executable, "-c", "import time\nwhile True: time.sleep(0.2)", f"{self.token}{tag}"],
                stdin=subprocess.DEVNULL,
            )
            self.procs.append(p)
            out.append(psutil.Process(p.pid))
        return out

    def cleanup(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=5)


@pytest.fixture
def victims() -> Iterator[Victims]:
    v = Victims()
    try:
        yield v
    finally:
        v.cleanup()


def status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.NoSuchProcess:
        return "gone"
