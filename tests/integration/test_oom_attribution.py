"""A memory stressor killed by SIGKILL: the OOM killer's, or someone else's (agent/faults/oomwatch.py).

Real stressors, real cgroups with real memory limits, real OOM kills by the kernel. Each
test runs with the kernel log (root, the initial PID namespace) and with it out of reach,
where the stressor's cgroup counter is used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import cgroups
from agent.faults.base import AgentEnv
from agent.faults.memory import MemoryStress
from agent.faults.oomwatch import OomWatch, in_initial_pid_namespace
from proto.faults import MemorySpec
from proto.messages import Measurements
from tests.conftest import wait_until
from tests.integration.test_stressors import Events, MiB, ctx_for, gone, wait_for

pytestmark = pytest.mark.integration

SOURCES = ["the kernel log", "the cgroup's counter"]


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    if request.param == "the kernel log":
        if not in_initial_pid_namespace():
            pytest.skip("the kernel log's pids are those of the initial PID namespace, and this test is not in it")
        if not os.access("/dev/kmsg", os.R_OK):
            pytest.skip("/dev/kmsg is not readable here (needs root or CAP_SYSLOG)")
    else:
        monkeypatch.setattr("agent.faults.oomwatch.KMSG", str(tmp_path / "no-kmsg"))
    return str(request.param)


def limited(name: str, limit_bytes: int) -> cgroups.CgroupTarget:
    target = cgroups.resolve(name, "memory")
    d = target.dirs["memory"]
    limit_file = d / ("memory.max" if target.versions["memory"] == "v2" else "memory.limit_in_bytes")
    if not limit_file.exists():
        pytest.skip(f"no memory limit file in {d}")
    limit_file.write_text(str(limit_bytes))
    return target


class MemoryFault:
    """One memory fault of the real injector, in ``target``, with its events kept."""

    def __init__(self, env: AgentEnv, target: cgroups.CgroupTarget, size: str) -> None:
        self.events: Events = []
        self.inj, self.ctx = MemoryStress(env), ctx_for(env, self.events)
        self.spec = MemorySpec(size=size, cgroup=target.path)
        self.plan: Any = None

    async def apply(self) -> int:
        """The stressor's pid."""
        self.plan = await self.inj.plan(self.spec, self.ctx)
        applied = await self.inj.apply(self.spec, self.plan, self.ctx)
        return (applied.stressor_pids or [0])[0]

    async def revert(self) -> Measurements:
        if self.plan is None:  # the plan itself failed: nothing to revert
            return Measurements()
        return await self.inj.revert(self.plan, self.ctx)


def watch_source(source: str, target: cgroups.CgroupTarget) -> str:
    return "the kernel log" if source == "the kernel log" else f"the OOM kill counter of cgroup {target.path}"


async def test_an_oom_kill_of_the_stressor_is_reported(
    env: AgentEnv, cleanup: None, make_cgroup: Callable[[], str], source: str
) -> None:
    target = limited(make_cgroup(), 64 * MiB)
    assert OomWatch(target).source == watch_source(source, target)
    fault = MemoryFault(env, target, "128Mi")
    try:
        pid = await fault.apply()
        await wait_for(lambda: any(m.oom_killed for _, m, _ in fault.events), 10, "an OOM-kill progress event")
    finally:
        m = await fault.revert()
    assert gone(pid)
    assert m.oom_killed is True and m.note and "OOM" in m.note


def oom_kill_elsewhere(name: str) -> None:
    """A process of another cgroup (limit 32 MiB) allocates 256 MiB: the kernel OOM-kills it."""
    target = limited(name, 32 * MiB)
    hog = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read(1); b = bytearray(256 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        cgroups.move_pids(target, [hog.pid])
        assert hog.stdin is not None
        hog.stdin.write(b"x")
        hog.stdin.flush()
        code = hog.wait(10)
        assert code == -signal.SIGKILL, f"the hog in {name} was not OOM-killed (exit {code})"
    finally:
        hog.kill()
        hog.wait(5)
        if hog.stdin is not None:
            hog.stdin.close()


async def test_a_stray_sigkill_during_an_unrelated_oom_kill_is_not_blamed_on_the_oom_killer(
    env: AgentEnv, cleanup: None, make_cgroup: Callable[[], str], source: str
) -> None:
    """Left by the tenth session: the node-wide OOM counter moved (another cgroup's OOM kill)
    while someone SIGKILLed the stressor, and the report said the OOM killer ended it."""
    target = limited(make_cgroup(), 512 * MiB)  # the stressor's own cgroup: room enough
    fault = MemoryFault(env, target, "16Mi")
    try:
        pid = await fault.apply()
        oom_kill_elsewhere(make_cgroup())
        os.kill(pid, signal.SIGKILL)  # someone else's SIGKILL
        wait_until(lambda: gone(pid), 5, "the stressor to die of its SIGKILL")
    finally:
        m = await fault.revert()
    assert m.oom_killed is False, m
    assert m.note == "memory stressor exited before revert with code -9", m.note
    assert not any(mm.oom_killed for _, mm, _ in fault.events), fault.events
