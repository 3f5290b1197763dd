"""What the controller blames, and what it asks `faultline abort` to confirm, with real agents.

An ExperimentRunner runs in the test's own event loop, so the test can stall it
(a blocking call in the loop: the controller does not run) while real
`faultline-agent` processes, real victims and a real nats-server go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from controller.engine import ExperimentRunner
from controller.experiment import Experiment, parse_experiment
from controller.fleet import Fleet
from controller.report import render_text
from proto.codec import decode, encode
from proto.messages import Ack, Halt, Revert
from proto.subjects import HALT, exp_control
from tests.conftest import REPO, AgentProcess, Victims, async_wait_until, status

pytestmark = pytest.mark.integration


def experiment(
    nodes: list[str], match: dict[str, Any], *, duration: str, heartbeat_timeout: str, lease_timeout: str
) -> Experiment:
    return parse_experiment(
        {
            "apiVersion": "faultline/v1",
            "kind": "Experiment",
            "metadata": {"name": "blame-test"},
            "spec": {
                "duration": duration,
                "targets": {"nodes": nodes},
                "faults": [{"kind": "process-pause", "match": match}],
                "abort": {"heartbeatTimeout": heartbeat_timeout, "leaseTimeout": lease_timeout},
            },
        }
    )


def cli_env() -> dict[str, str]:
    """The environment without FAULTLINE_* settings: the command line alone says which server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")}


@pytest.fixture
async def fleet(nc: Any) -> AsyncIterator[Fleet]:
    f = Fleet(nc)
    await f.start()
    yield f
    await f.stop()


async def settled(run: asyncio.Future[Any], runner: ExperimentRunner) -> None:
    """Finaliser: a run still going when the test failed is aborted (it reverts) and awaited."""
    if not run.done():
        runner.abort("the test ended")
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(run), 20)
    if not run.done():
        run.cancel()
    await asyncio.gather(run, return_exceptions=True)


async def active_everywhere(runner: ExperimentRunner, nodes: list[str]) -> None:
    def active() -> bool:
        return all(runner.tracks.get((n, f"{runner.experiment_id}.0")) is not None for n in nodes) and all(
            t.state == "active" for t in runner.tracks.values()
        )

    await async_wait_until(active, 15, f"the controller to see the pause active on {', '.join(nodes)}")


LEASE_S = 2.0
STALL_S = LEASE_S + 1.5  # the agent lapses the lease within leaseTimeout after the last one it got


async def test_a_lease_lapse_caused_by_the_controller_s_own_stall_is_not_blamed_on_the_agent(
    nc: Any, fleet: Fleet, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    """The controller does not run for longer than the leaseTimeout; the real agent, fine all
    along, reverts on its own when the lease lapses. The run aborts, naming this controller,
    and blames no agent (abort.node is null; the report shows no "[agent ...]")."""
    agent = agent_factory("node-a")  # heartbeats every 0.5 s: heartbeatTimeout 1s is allowed
    (victim,) = victims.start(1)
    await fleet.wait_for(["node-a"], 10)
    exp = experiment(
        ["node-a"], {"pid": victim.pid}, duration="30s", heartbeat_timeout="1s", lease_timeout=f"{LEASE_S:g}s"
    )
    runner = ExperimentRunner(nc, fleet, exp, progress=lambda _line: None)
    run = asyncio.ensure_future(runner.run())
    try:
        await active_everywhere(runner, ["node-a"])
        # "active" once SIGSTOP is sent; the kernel stops the process a moment later
        await async_wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 5, "the victim to be paused")

        seen_at_stall_end: list[str] = []

        def stall() -> None:
            time.sleep(STALL_S)  # the fault under test: this event loop, the controller, does not run
            seen_at_stall_end.append(status(victim))

        asyncio.get_running_loop().call_soon(stall)
        report = await asyncio.wait_for(asyncio.shield(run), 20)
    finally:
        await settled(run, runner)

    assert len(seen_at_stall_end) == 1 and seen_at_stall_end[0] not in (psutil.STATUS_STOPPED, "gone"), (
        f"the agent did not resume the victim while the controller stalled: {seen_at_stall_end}"
    )
    assert report.outcome == "aborted", report
    assert report.abort is not None
    assert report.abort.node is None, f"the abort blames agent {report.abort.node}: {report.abort.reason}"
    reason = report.abort.reason
    assert reason.startswith("this controller renewed no lease for "), reason
    assert f"(leaseTimeout {LEASE_S:g}s; it did not run" in reason and "lease lapsed" in reason, reason
    stalled = re.match(r"this controller renewed no lease for (\d+\.\d)s", reason)
    assert stalled is not None and float(stalled.group(1)) >= LEASE_S - 0.25, reason
    assert "[agent " not in render_text(report), render_text(report)
    assert any(n.startswith("this controller did not run for ") for n in report.notes), report.notes
    (fault,) = report.faults
    assert fault.node == "node-a" and fault.state == "reverted", fault
    assert (fault.reason or "").startswith("lease lapsed"), fault.reason
    assert status(victim) not in (psutil.STATUS_STOPPED, "gone")
    assert agent.proc is not None and agent.proc.poll() is None, "the agent, blamed for nothing, still runs"
    assert agent.settled_journal() == []


async def test_abort_does_not_wait_for_a_target_that_left_cleanly(
    nc: Any, nats_url: str, fleet: Fleet, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    """node-a stops (SIGTERM: it reverts, sends its last "leaving" heartbeat, exits 0); the run
    aborts and goes into its final revert, which waits on node-b, frozen. While the controller
    still answers, `faultline abort` asks it which targets to confirm: node-b only, since node-a
    will never send another heartbeat. The abort is confirmed once node-b runs again."""
    # one host, two agents: each its own victim (the other's is on its deny list), as on two nodes
    a = agent_factory("node-a", extra=["--deny", f"{victims.token}-b$"])
    b = agent_factory("node-b", extra=["--deny", f"{victims.token}-a$"])
    (victim_a,) = victims.start(1, "-a")
    (victim_b,) = victims.start(1, "-b")
    await fleet.wait_for(["node-a", "node-b"], 10)
    exp = experiment(
        ["node-a", "node-b"],
        {"cmdline": f"{victims.token}-[ab]$"},
        duration="60s",
        heartbeat_timeout="30s",  # node-b frozen is not what aborts the run: node-a leaving is
        lease_timeout="60s",
    )
    # The final revert waits this long for node-b's "reverted" event (the CLI's 1 s, then ~3 s of
    # per-node requests, would leave `faultline abort` a race to win): the window stays open
    # until node-b is thawed.
    runner = ExperimentRunner(nc, fleet, exp, progress=lambda _line: None, broadcast_wait_s=60.0)
    run = asyncio.ensure_future(runner.run())
    abort_cli: asyncio.subprocess.Process | None = None
    try:
        await active_everywhere(runner, ["node-a", "node-b"])
        await async_wait_until(
            lambda: status(victim_a) == status(victim_b) == psutil.STATUS_STOPPED, 5, "both victims to be paused"
        )

        b.signal(signal.SIGSTOP)
        await async_wait_until(
            lambda: status(psutil.Process(b.pid)) == psutil.STATUS_STOPPED, 5, "node-b's agent to be frozen"
        )
        a.signal(signal.SIGTERM)
        await async_wait_until(lambda: a.proc is not None and a.proc.poll() is not None, 20, "node-a's agent to exit")
        assert a.proc is not None and a.proc.returncode == 0, a.log()

        def left_clean() -> bool:
            view = fleet.get("node-a")
            return view is not None and view.heartbeat.state == "leaving" and not view.heartbeat.faults

        await async_wait_until(left_clean, 5, "node-a's last heartbeat: leaving, holding nothing")
        await async_wait_until(lambda: runner.revert_broadcast, 5, "the run to abort and begin its final revert")
        assert runner.abort_info is not None and runner.abort_info.node == "node-a", runner.abort_info
        await async_wait_until(lambda: status(victim_a) != psutil.STATUS_STOPPED, 5, "node-a's victim to resume")
        assert status(victim_b) == psutil.STATUS_STOPPED and not run.done()

        abort_cli = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "controller.cli", "abort", runner.experiment_id, "--nats", nats_url],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=cli_env(),
        )
        assert abort_cli.stdout is not None
        first = (await asyncio.wait_for(abort_cli.stdout.readline(), 20)).decode()
        assert "abort requested; its controller is reverting" in first, first
        # the controller's answer, as the CLI got it: the targets to confirm, node-a left out
        cmd = Revert(experiment_id=runner.experiment_id, reason="which targets?", expires_at=time.time() + 10)
        ack = decode((await nc.request(exp_control(runner.experiment_id), encode(cmd), timeout=2)).data, Ack)
        assert ack.accepted and ack.targets == ["node-b"], ack

        b.signal(signal.SIGCONT)  # its revert goes through: the abort broadcast waits on its socket
        thawed = time.monotonic()
        out, err = await asyncio.wait_for(abort_cli.communicate(), 20)
        took_s = time.monotonic() - thawed
        text = first + out.decode()
        assert abort_cli.returncode == 0, text + err.decode()
        assert f"experiment {runner.experiment_id}: abort confirmed" in text, text
        assert "node-a" not in text, text
        # heartbeats are gathered for 1.5 s, then node-b's next one confirms; a target waited for
        # in vain would hold the abort for its whole bound (5 s) after that
        assert took_s < 1.5 + 5.0, f"faultline abort took {took_s:.1f}s after node-b ran again"

        report = await asyncio.wait_for(asyncio.shield(run), 20)
    finally:
        b.signal(signal.SIGCONT)
        if abort_cli is not None and abort_cli.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                abort_cli.kill()
            await asyncio.wait_for(abort_cli.communicate(), 10)
        await settled(run, runner)

    assert report.outcome == "aborted" and report.abort is not None and report.abort.node == "node-a", report.abort
    assert {f.node: f.state for f in report.faults} == {"node-a": "reverted", "node-b": "reverted"}, report.faults
    await async_wait_until(lambda: status(victim_b) != psutil.STATUS_STOPPED, 5, "node-b's victim to resume")
    assert b.settled_journal() == []


async def test_a_halt_aborts_the_run_and_blames_no_agent(
    nc: Any, fleet: Fleet, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    """A new user's review: `faultline halt` during a run aborted it with "[agent n1]" in the
    report, as if the agent had misbehaved. The abort says it was halted, and names no agent."""
    agent_factory("node-a")
    (victim,) = victims.start(1)
    await fleet.wait_for(["node-a"], 10)
    exp = experiment(["node-a"], {"pid": victim.pid}, duration="30s", heartbeat_timeout="3s", lease_timeout="5s")
    runner = ExperimentRunner(nc, fleet, exp, progress=lambda _line: None)
    run = asyncio.ensure_future(runner.run())
    try:
        await active_everywhere(runner, ["node-a"])
        await nc.publish(HALT, encode(Halt(reason="incident 42", issued_by="pytest")))
        report = await asyncio.wait_for(asyncio.shield(run), 20)
    finally:
        await settled(run, runner)
    assert report.outcome == "aborted" and report.abort is not None, report
    assert report.abort.node is None, report.abort
    assert report.abort.reason.startswith("halted: agent node-a reverted "), report.abort.reason
    assert "halt: incident 42 (by pytest)" in report.abort.reason, report.abort.reason
    await async_wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 5, "the victim to resume")
