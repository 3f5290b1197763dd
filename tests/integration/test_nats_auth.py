"""faultline under the least-privilege NATS users of deploy/nats/authorization.conf: a real
nats-server loads that very file; a real agent (user agent) and the real CLI (user controller)
run, abort and halt an experiment; an agent's credentials cannot command an agent."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest

from controller.natsserver import NatsServer
from proto.codec import encode
from proto.faults import ProcessMatch, ProcessPauseSpec
from proto.messages import Inject
from proto.subjects import HALT, agent_cmd, exp_abort, exp_lease, exp_start
from tests.conftest import REPO, AgentProcess, Victims, async_wait_until, status, wait_until
from tests.integration.test_cli import Running, cli_env, experiment_file, faultline, pause

pytestmark = pytest.mark.integration

AUTH_CONF = REPO / "deploy" / "nats" / "authorization.conf"
AGENT_PW = "agent-pw-for-tests"
CONTROLLER_PW = "controller-pw-for-tests"


def server_log(port: int) -> list[str]:
    return (_SERVERS[port].workdir / "nats-server.log").read_text(errors="replace").splitlines()


_SERVERS: dict[int, NatsServer] = {}


@pytest.fixture
def auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A nats-server that includes deploy/nats/authorization.conf as shipped; yields its port."""
    d = tmp_path / "nats-auth"
    d.mkdir()
    shutil.copy(AUTH_CONF, d / "authorization.conf")
    (d / "server.conf").write_text("include ./authorization.conf\n")
    # the passwords come from the server's environment, as the file's comment tells operators
    monkeypatch.setenv("FAULTLINE_AGENT_PASSWORD", AGENT_PW)
    monkeypatch.setenv("FAULTLINE_CONTROLLER_PASSWORD", CONTROLLER_PW)
    server = NatsServer(workdir=str(d), extra_args=["-c", str(d / "server.conf")])
    server.start()
    try:
        assert server.url is not None
        port = int(server.url.rpartition(":")[2])
        _SERVERS[port] = server
        yield port
    finally:
        server.stop()
        _SERVERS.pop(port, None)


@pytest.fixture
def auth_agent(tmp_path: Path, auth_server: int) -> Iterator[AgentProcess]:
    state = tmp_path / "state-auth-a"
    state.mkdir()
    url = f"nats://agent:{AGENT_PW}@127.0.0.1:{auth_server}"
    agent = AgentProcess(url, "auth-a", state, tmp_path / "agent-auth-a.log", [])
    try:
        agent.start().wait_ready()
        yield agent
    finally:
        agent.stop()


def controller_url(port: int) -> str:
    return f"nats://controller:{CONTROLLER_PW}@127.0.0.1:{port}"


def test_run_abort_and_halt_under_least_privilege_users(
    auth_server: int, auth_agent: AgentProcess, victims: Victims, tmp_path: Path
) -> None:
    url = controller_url(auth_server)
    (victim,) = victims.start(1)
    listed = faultline("agents", "--nats", url, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [a["node"] for a in json.loads(listed.stdout)] == ["auth-a"]

    # a run to its end: Injects, Start broadcast, leases, events
    exp = experiment_file(tmp_path, [pause(victims)], duration="1s")
    r = faultline("run", str(exp), "--nats", url, "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outcome"] == "completed"
    assert status(victim) != psutil.STATUS_STOPPED

    # `faultline abort` asks the running controller on its .control subject
    long = experiment_file(tmp_path, [pause(victims)], duration="60s")
    run = Running(["run", str(long), "--nats", url, "-o", "json"], tmp_path, cli_env())
    try:
        exp_id = run.experiment_id()
        wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
        ab = faultline("abort", exp_id, "--nats", url)
        assert ab.returncode == 0 and "abort requested" in ab.stdout, ab.stdout + ab.stderr
        assert run.wait(20) == 1, run.stderr()
        assert json.loads(run.stdout())["outcome"] == "aborted"
        assert status(victim) != psutil.STATUS_STOPPED
    finally:
        run.kill()

    halt = faultline("halt", "--nats", url, "-o", "json")
    assert halt.returncode == 0, halt.stderr
    # the server logs every publish or subscription a user's permissions refuse
    refused = [line for line in server_log(auth_server) if "Violation" in line]
    assert not refused, "faultline needed a subject the shipped permissions refuse:\n" + "\n".join(refused)


async def test_an_agent_credential_cannot_command_an_agent(
    auth_server: int, auth_agent: AgentProcess, victims: Victims
) -> None:
    (victim,) = victims.start(1)
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc: Any = await nats.connect(
        f"nats://agent:{AGENT_PW}@127.0.0.1:{auth_server}", error_cb=on_error, allow_reconnect=False
    )
    try:
        inject = Inject(
            experiment_id="stolen",
            fault_id="stolen.0",
            spec=ProcessPauseSpec(match=ProcessMatch(pid=victim.pid)),
            expires_at=time.time() + 30,
            lease_timeout_s=30,
        )
        forged = encode(inject)
        # a command, a halt, and an experiment's abort, start and lease: all the controller's
        subjects = [agent_cmd("auth-a"), HALT, exp_abort("stolen"), exp_start("stolen"), exp_lease("stolen")]
        for subject in subjects:
            await nc.publish(subject, forged)
        await nc.flush(timeout=5)

        def refused() -> list[str]:
            return [
                s
                for s in subjects
                if any(f'Publish Violation - Subject "{s}"' in line for line in server_log(auth_server))
            ]

        await async_wait_until(
            lambda: len(refused()) == len(subjects),
            10,
            f"the server to refuse the agent user's publishes to {subjects} (refused so far: {refused()})",
        )
        # the server's -ERR reaches the client after it logged the violation: awaited, not assumed
        await async_wait_until(lambda: violations, 5, "the client to be told of the refused publishes")
    finally:
        await asyncio.wait_for(nc.close(), 5)
    assert "stolen" not in auth_agent.log(), "the agent saw a command published with an agent's credentials"
    assert status(victim) != psutil.STATUS_STOPPED
