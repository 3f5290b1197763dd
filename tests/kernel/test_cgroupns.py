"""Placing a process in a cgroup outside the agent's cgroup namespace, under ``nsdelegate``.

This is a DaemonSet agent's situation on a cgroup v2 node: its runtime gives it
a private cgroup namespace rooted at its own container, systemd mounts the v2
hierarchy with ``nsdelegate``, and every pod's cgroup (and the node's root) is
outside the namespace, so the kernel refuses a plain move with ENOENT. The CI
host's v2 mount has no ``nsdelegate``; inside User-Mode Linux
(tests/kernel/run-uml.sh) the test mounts its own v2 hierarchy with it.

A child process stands in for the agent: it enters a cgroup ``agent``, unshares
its cgroup namespace there, starts a victim, and moves the victim into a
sibling cgroup ``target`` with ``agent.cgroups.move_pids``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import remove_cgroup

pytestmark = pytest.mark.kernel

CHILD = textwrap.dedent(
    """
    import ctypes, errno, json, os, subprocess, sys
    from pathlib import Path
    from agent import cgroups
    root, agent, target_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (root / agent / "cgroup.procs").write_text(str(os.getpid()))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(cgroups.CLONE_NEWCGROUP) != 0:
        sys.exit("unshare(CLONE_NEWCGROUP): " + os.strerror(ctypes.get_errno()))
    victim = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"victim": victim.pid, "own_ns": cgroups.shares_cgroupns()}
    try:
        (root / target_name / "cgroup.procs").write_text(str(victim.pid))
        out["plain"] = "moved"
    except OSError as exc:
        out["plain"] = errno.errorcode.get(exc.errno, str(exc.errno))
    target = cgroups.CgroupTarget(path=target_name, dirs={"cpu": root / target_name}, versions={"cpu": "v2"})
    try:
        cgroups.move_pids(target, [victim.pid])
        out["move_pids"] = "moved"
    except cgroups.CgroupError as exc:
        out["move_pids"] = str(exc)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test looks, then lets us go
    victim.kill()
    victim.wait()  # reaped here: the guest's init reaps no orphans, and a zombie pins its cgroup
    """
)


# The agent's real path: a cpu fault with `cgroup: target`, planned and applied by the cpu injector,
# whose stressor is born in the agent's cgroup and moved into the target across the namespace.
CPU_FAULT = textwrap.dedent(
    """
    import asyncio, ctypes, json, os, sys, time
    from pathlib import Path
    from agent import cgroups
    from agent.faults.base import AgentEnv, FaultContext
    from agent.faults.cpu import CpuStress
    from proto.faults import CpuSpec
    root, agent, target_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (root / agent / "cgroup.procs").write_text(str(os.getpid()))
    if ctypes.CDLL(None, use_errno=True).unshare(cgroups.CLONE_NEWCGROUP) != 0:
        sys.exit("unshare(CLONE_NEWCGROUP): " + os.strerror(ctypes.get_errno()))

    async def main():
        env = AgentEnv(node="uml", state_dir=Path(sys.argv[4]), instance_id="k", protected_pids=dict)
        inj = CpuStress(env)
        ctx = FaultContext("cg.0", "cg", time.time() + 30, None, env, lambda *_: None)
        spec = CpuSpec(load=5, workers=1, cgroup=target_name)
        inj.check(spec, ctx)
        plan = await inj.plan(spec, ctx)
        try:
            applied = await inj.apply(spec, plan, ctx)
            seen = {p: Path(f"/proc/{p}/cgroup").read_text().strip() for p in applied.stressor_pids or []}
            print(json.dumps({"pids": applied.stressor_pids, "seen_from_agent": seen}), flush=True)
            sys.stdin.readline()  # the test looks from outside, then lets us revert
        finally:
            await inj.revert(plan, ctx)

    asyncio.run(main())
    """
)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@dataclass
class Hierarchy:
    root: Path
    agent: str
    target: str


@pytest.fixture
def nsdelegate_hierarchy() -> Iterator[Hierarchy]:
    """A cgroup v2 hierarchy mounted with nsdelegate, with two empty cgroups of this test's own."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not Path("/proc/self/ns/cgroup").exists():
        pytest.skip("kernel without cgroup namespaces")
    mounts = Path("/proc/self/mounts").read_text()
    if any(line.split()[2] == "cgroup2" for line in mounts.splitlines()):
        pytest.skip(
            "a cgroup v2 hierarchy is mounted here already; remounting it with nsdelegate would change the host"
        )
    root = Path(tempfile.mkdtemp(prefix="faultline-cgns-"))
    tag = uuid.uuid4().hex[:8]
    h = Hierarchy(root, f"agent-{tag}", f"target-{tag}")
    made: list[Path] = []
    mounted = _run(["mount", "-t", "cgroup2", "-o", "nsdelegate", "none", str(root)])
    try:
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount cgroup2 with nsdelegate: {mounted.stderr.strip()}")
        for name in (h.agent, h.target):
            (root / name).mkdir()
            made.append(root / name)
        yield h
    finally:
        for d in made:  # whatever is still in them is the test's: kill it, then remove them
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for d in made:
            remove_cgroup(d, 10)
        if mounted.returncode == 0:
            _run(["umount", str(root)])
        root.rmdir()


def test_move_out_of_a_private_cgroup_namespace_goes_through_pid1s(nsdelegate_hierarchy: Hierarchy) -> None:
    h = nsdelegate_hierarchy
    with _stand_in_agent(CHILD, h) as (agent, out):
        assert out["own_ns"] is False, "the stand-in agent did not get a cgroup namespace of its own"
        # the production condition: the kernel refuses the plain write from inside the namespace
        assert out["plain"] == "ENOENT", f"a plain move was not refused as on a v2 node: {out['plain']}"
        assert out["move_pids"] == "moved", f"move_pids failed: {out['move_pids']}"
        assert Path(f"/proc/{out['victim']}/cgroup").read_text().strip() == f"0::/{h.target}"


def test_a_cpu_fault_places_its_stressor_in_a_cgroup_outside_the_agents_namespace(
    nsdelegate_hierarchy: Hierarchy, tmp_path: Path
) -> None:
    h = nsdelegate_hierarchy
    with _stand_in_agent(CPU_FAULT, h, str(tmp_path)) as (agent, out):
        assert out["pids"], "no stressor started"
        for pid in out["pids"]:
            # from the root namespace: in the target; from the agent's: outside its root
            assert Path(f"/proc/{pid}/cgroup").read_text().strip() == f"0::/{h.target}", pid
            assert out["seen_from_agent"][str(pid)] == f"0::/../{h.target}", out["seen_from_agent"]
    assert agent.returncode == 0, "the stand-in agent failed to revert"
    for pid in out["pids"]:
        assert not Path(f"/proc/{pid}").exists(), f"stressor {pid} outlived its revert"


@contextlib.contextmanager
def _stand_in_agent(script: str, h: Hierarchy, *extra: str) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    """Run the script as the stand-in agent; yield its JSON line; then let it finish (bounded)."""
    argv = [sys.executable, "-c", script, str(h.root), h.agent, h.target, *extra]
    agent = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdin is not None and agent.stderr is not None
        line = agent.stdout.readline()
        if not line:
            agent.wait(30)
            pytest.fail(f"the stand-in agent failed: {agent.stderr.read()[-2000:]}")
        yield agent, json.loads(line)
        agent.stdin.write("\n")
        agent.stdin.flush()
        agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        for stream in (agent.stdin, agent.stdout, agent.stderr):
            if stream is not None:
                stream.close()
