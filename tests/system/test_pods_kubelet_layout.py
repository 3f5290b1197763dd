"""agent/pods.py on a faithful imitation of a kubelet node: real cgroups, real processes, a real netns.

Builds, under a unique parent so nothing real is touched:
  pod A  systemd driver, containerd: .../kubepods.slice/kubepods-burstable.slice/
         kubepods-burstable-pod<uid_>.slice/cri-containerd-<64hex>.scope, with a pause
         process and an app process, in the cpu and memory v1 hierarchies and in the
         unified (v2) one, both in the pod's own network namespace (/run/netns/...)
  pod B  cgroupfs driver: .../kubepods/besteffort/pod<uid>/<64hex>, v2 only, node netns
  decoy  another pod's cgroup with a process of its own
and checks that each lookup finds exactly its pod's processes, cgroup and namespace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.pods import PodNotFound, locate_pod, netns_is_host, pod_cgroup_path, pod_netns_path, pod_pids

pytestmark = pytest.mark.system

CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> list[Path]:
    """Where to build: the v2 root on a pure-v2 node, else cpu, memory and unified if mounted."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / n for n in ("cpu", "memory", "unified") if (CGROUP_ROOT / n / "cgroup.procs").exists()]


def v2_mount() -> Path | None:
    for p in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (p / "cgroup.controllers").exists():
            return p
    return None


@dataclass
class Node:
    tmp: Path
    base: str
    netns: str
    cgroup_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cgroup(self, rel: str, mounts: list[Path]) -> None:
        for mount in mounts:
            path = mount / self.base / rel
            path.mkdir(parents=True, exist_ok=True)
            self.cgroup_dirs.append(path)

    def spawn(self, name: str, rel: str, mounts: list[Path], *, in_netns: bool) -> int:
        exe = self.tmp / name
        if not exe.exists():
            exe.symlink_to(shutil.which("sleep") or "/bin/sleep")  # comm is taken from the name run
        argv = [str(exe), "300"]
        if in_netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = subprocess.Popen(argv)
        self.procs.append(proc)
        for mount in mounts:
            (mount / self.base / rel / "cgroup.procs").write_text(str(proc.pid))
        deadline = time.monotonic() + 5
        while (Path(f"/proc/{proc.pid}/comm").read_text().strip() != name[:15]) and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded poll: exec through `ip netns exec` has no event to await
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == name[:15], f"{name} did not exec within 5 s"
        return proc.pid


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds cgroups and a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip for a network namespace")
    if not hierarchies():
        pytest.skip("no cgroup hierarchy with cpu, memory or unified under /sys/fs/cgroup")
    token = secrets.token_hex(4)
    n = Node(tmp=tmp_path, base=f"faultline-test-{token}", netns=f"faultline-pod-{token}")
    subprocess.run(["ip", "netns", "add", n.netns], check=True, timeout=10)
    try:
        yield n
    finally:
        for proc in n.procs:
            proc.kill()
        for proc in n.procs:
            proc.wait(timeout=10)
        # deepest first: a cgroup can only be removed once it has no children
        for path in sorted(set(n.cgroup_dirs), key=lambda p: len(p.parts), reverse=True):
            while path.name and path.exists() and n.base in path.parts:
                try:
                    path.rmdir()
                except OSError:
                    break
                path = path.parent
        subprocess.run(["ip", "netns", "del", n.netns], check=False, timeout=10)


def test_finds_exactly_the_pods_processes_cgroup_and_netns(node: Node) -> None:
    uid_a, uid_b, uid_c = (str(uuid.uuid4()) for _ in range(3))
    cid_pause, cid_app, cid_b = (secrets.token_hex(32) for _ in range(3))
    all_mounts = hierarchies()
    v2 = v2_mount()
    v2_only = [v2] if v2 is not None else all_mounts

    pod_a = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_a.replace('-', '_')}.slice"
    node.cgroup(f"{pod_a}/cri-containerd-{cid_pause}.scope", all_mounts)
    node.cgroup(f"{pod_a}/cri-containerd-{cid_app}.scope", all_mounts)
    pause = node.spawn("pause", f"{pod_a}/cri-containerd-{cid_pause}.scope", all_mounts, in_netns=True)
    app = node.spawn("redis-server", f"{pod_a}/cri-containerd-{cid_app}.scope", all_mounts, in_netns=True)

    pod_b = f"kubepods/besteffort/pod{uid_b}"
    node.cgroup(f"{pod_b}/{cid_b}", v2_only)
    b_proc = node.spawn("nginx", f"{pod_b}/{cid_b}", v2_only, in_netns=False)

    pod_c = f"kubepods/besteffort/pod{uid_c}"
    cid_c = secrets.token_hex(32)
    node.cgroup(f"{pod_c}/{cid_c}", v2_only)
    decoy = node.spawn("decoy", f"{pod_c}/{cid_c}", v2_only, in_netns=True)

    # processes: exactly the pod's; the pause process only when asked
    assert pod_pids(uid_a, proc_root=Path("/proc")) == {app}
    assert pod_pids(uid_a, include_pause=True, proc_root=Path("/proc")) == {pause, app}
    assert pod_pids(uid_a, container_ids=[cid_pause], include_pause=True, proc_root=Path("/proc")) == {pause}
    assert pod_pids(uid_b, proc_root=Path("/proc")) == {b_proc}
    assert pod_pids(uid_c, proc_root=Path("/proc")) == {decoy}

    # cgroups: the pod level, relative to the cgroup root (on v1: to each controller's mount)
    assert pod_cgroup_path(uid_a, proc_root=Path("/proc")) == f"{node.base}/{pod_a}"
    assert pod_cgroup_path(uid_b, proc_root=Path("/proc")) == f"{node.base}/{pod_b}"

    # network namespace: the runtime's persistent name for pod A; pod B shares the node's
    netns_a = pod_netns_path(uid_a, proc_root=Path("/proc"))
    assert netns_a == f"/run/netns/{node.netns}"
    assert not netns_is_host(netns_a)
    netns_b = pod_netns_path(uid_b, proc_root=Path("/proc"))
    assert netns_b is not None and netns_is_host(netns_b)

    location = locate_pod(uid_a, proc_root=Path("/proc"))
    assert (location.pids, location.cgroup_path, location.netns_path) == (
        frozenset({app}),
        f"{node.base}/{pod_a}",
        f"/run/netns/{node.netns}",
    )


def test_pod_gone_after_its_processes_exit_but_cgroup_remains(node: Node) -> None:
    uid = str(uuid.uuid4())
    pod = f"kubepods/pod{uid}"
    cid = secrets.token_hex(32)
    node.cgroup(f"{pod}/{cid}", hierarchies())
    pid = node.spawn("app", f"{pod}/{cid}", hierarchies(), in_netns=True)
    assert pod_pids(uid, proc_root=Path("/proc")) == {pid}
    proc = node.procs[-1]
    proc.kill()
    proc.wait(timeout=10)
    # a restarting pod: no processes, but the kubelet keeps the pod cgroup; found by walking
    assert pod_pids(uid, proc_root=Path("/proc")) == set()
    assert pod_cgroup_path(uid, proc_root=Path("/proc")) == f"{node.base}/{pod}"
    assert pod_netns_path(uid, proc_root=Path("/proc")) is None
    with pytest.raises(PodNotFound, match="not on this node"):
        locate_pod(str(uuid.uuid4()), proc_root=Path("/proc"))
