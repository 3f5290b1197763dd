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

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

CHILD = textwrap.dedent(
    """
    import ctypes, errno, json, os, subprocess, sys
    from pathlib import Path
    from agent import cgroups
    root = Path(sys.argv[1])
    (root / "agent" / "cgroup.procs").write_text(str(os.getpid()))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(cgroups.CLONE_NEWCGROUP) != 0:
        sys.exit("unshare(CLONE_NEWCGROUP): " + os.strerror(ctypes.get_errno()))
    victim = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"victim": victim.pid, "own_ns": cgroups.shares_cgroupns()}
    try:
        (root / "target" / "cgroup.procs").write_text(str(victim.pid))
        out["plain"] = "moved"
    except OSError as exc:
        out["plain"] = errno.errorcode.get(exc.errno, str(exc.errno))
    target = cgroups.CgroupTarget(path="target", dirs={"cpu": root / "target"}, versions={"cpu": "v2"})
    try:
        cgroups.move_pids(target, [victim.pid])
        out["move_pids"] = "moved"
    except cgroups.CgroupError as exc:
        out["move_pids"] = str(exc)
    print(json.dumps(out), flush=True)
    """
)


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def nsdelegate_hierarchy() -> Iterator[Path]:
    """A cgroup v2 hierarchy mounted with nsdelegate, with empty cgroups ``agent`` and ``target``."""
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
    made: list[Path] = []
    mounted = _run(["mount", "-t", "cgroup2", "-o", "nsdelegate", "none", str(root)])
    try:
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount cgroup2 with nsdelegate: {mounted.stderr.strip()}")
        for name in ("agent", "target"):
            (root / name).mkdir()
            made.append(root / name)
        yield root
    finally:
        for d in made:  # empty them into the root, then remove them
            procs = d / "cgroup.procs"
            for pid in procs.read_text().split() if procs.exists() else []:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for d in made:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:  # a killed process still leaving
                    os.sched_yield()
        if mounted.returncode == 0:
            _run(["umount", str(root)])
        root.rmdir()


def test_move_out_of_a_private_cgroup_namespace_goes_through_pid1s(nsdelegate_hierarchy: Path) -> None:
    root = nsdelegate_hierarchy
    child = _run([sys.executable, "-c", CHILD, str(root)])
    assert child.returncode == 0, f"the stand-in agent failed: {child.stderr[-2000:]}"
    out = json.loads(child.stdout.strip().splitlines()[-1])
    victim = int(out["victim"])
    try:
        assert out["own_ns"] is False, "the stand-in agent did not get a cgroup namespace of its own"
        # the production condition: the kernel refuses the plain write from inside the namespace
        assert out["plain"] == "ENOENT", f"a plain move was not refused as on a v2 node: {out['plain']}"
        assert out["move_pids"] == "moved", f"move_pids failed: {out['move_pids']}"
        assert Path(f"/proc/{victim}/cgroup").read_text().strip() == "0::/target"
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
