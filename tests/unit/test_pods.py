"""agent/pods.py on a fake /proc tree: the naming schemes, without root.

The real-cgroup, real-namespace version is tests/system/test_pods_kubelet_layout.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.pods import PodNotFound, locate_pod, pod_cgroup_path, pod_netns_path, pod_pids

UID = "8f2c1d3e-4b5a-6c7d-8e9f-0a1b2c3d4e5f"
UID_ = UID.replace("-", "_")
OTHER = "11111111-2222-3333-4444-555555555555"
CID = "a" * 64
CID2 = "b" * 64

SYSTEMD_V1 = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
CGROUPFS = f"/kubepods/besteffort/pod{UID}"


def v1_lines(path: str) -> str:
    return "".join(f"{n}:{c}:{path}\n" for n, c in [(4, "memory"), (3, "cpu,cpuacct"), (1, "name=systemd")]) + "0::/\n"


PROCS: dict[int, tuple[str, str]] = {
    # pid: (cgroup file, comm)
    100: (v1_lines(f"{SYSTEMD_V1}/cri-containerd-{CID}.scope"), "pause"),
    101: (v1_lines(f"{SYSTEMD_V1}/cri-containerd-{CID2}.scope"), "redis-server"),
    102: (v1_lines(f"{SYSTEMD_V1}/crio-conmon-{CID2}.scope"), "conmon"),
    200: (f"0::{CGROUPFS}/{CID}\n", "nginx"),
    # the agent in its own cgroup namespace sees a pod's path relative to its own cgroup
    300: (f"0::/../../kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n", "app"),
    400: (v1_lines(f"/kubepods.slice/kubepods-pod{OTHER.replace('-', '_')}.slice/docker-{CID}.scope"), "other"),
    401: (v1_lines(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}x.slice"), "near-miss"),
    1: ("0::/init.scope\n", "systemd"),
}


def fake_proc(root: Path, procs: dict[int, tuple[str, str]]) -> Path:
    for pid, (cgroup, comm) in procs.items():
        d = root / "proc" / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        (d / "comm").write_text(comm + "\n")
        (d / "ns" / "net").write_text(f"net:[{4026531000 + pid}]")  # a stand-in: its own inode
    (root / "proc" / "self").mkdir()
    return root / "proc"


def test_systemd_layout_v1(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {k: PROCS[k] for k in (100, 101, 102, 400, 401, 1)})
    assert pod_pids(UID, proc_root=proc) == {101}  # pause and conmon left out, near-miss not matched
    assert pod_pids(UID, include_pause=True, proc_root=proc) == {100, 101}
    assert pod_pids(UID, container_ids=[CID], include_pause=True, proc_root=proc) == {100}
    assert pod_pids(OTHER, proc_root=proc) == {400}
    cgroot = tmp_path / "cgroup"
    for controller in ("cpu", "memory"):
        (cgroot / controller / SYSTEMD_V1.lstrip("/")).mkdir(parents=True)
        (cgroot / controller / "cgroup.procs").write_text("")
    assert pod_cgroup_path(UID, proc_root=proc, cgroup_root=cgroot) == SYSTEMD_V1.lstrip("/")


def test_cgroupfs_layout_v2_and_uppercase_uid(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {k: PROCS[k] for k in (200, 400, 1)})
    assert pod_pids(UID.upper(), proc_root=proc) == {200}
    cgroot = tmp_path / "cgroup"
    (cgroot / CGROUPFS.lstrip("/")).mkdir(parents=True)
    (cgroot / "cgroup.controllers").write_text("cpu memory\n")
    assert pod_cgroup_path(UID, proc_root=proc, cgroup_root=cgroot) == CGROUPFS.lstrip("/")
    assert pod_netns_path(UID, proc_root=proc, netns_dir=tmp_path / "none") == str(proc / "200" / "ns" / "net")


def test_own_cgroup_namespace_falls_back_to_walking(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {300: PROCS[300]})
    assert pod_pids(UID, proc_root=proc) == {300}
    cgroot = tmp_path / "cgroup"
    pod_dir = cgroot / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{UID_}.slice"
    pod_dir.mkdir(parents=True)
    (cgroot / "cgroup.controllers").write_text("cpu memory\n")
    assert pod_cgroup_path(UID, proc_root=proc, cgroup_root=cgroot) == str(pod_dir.relative_to(cgroot))


def test_missing_pod(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {k: PROCS[k] for k in (400, 1)})
    cgroot = tmp_path / "cgroup"
    (cgroot).mkdir()
    (cgroot / "cgroup.controllers").write_text("")
    assert pod_pids(UID, proc_root=proc) == set()
    assert pod_cgroup_path(UID, proc_root=proc, cgroup_root=cgroot) is None
    assert pod_netns_path(UID, proc_root=proc) is None
    with pytest.raises(PodNotFound, match=f"pod {UID} is not on this node"):
        locate_pod(UID, proc_root=proc, cgroup_root=cgroot)


def test_rejects_non_uid() -> None:
    with pytest.raises(ValueError):
        pod_pids("../../etc", proc_root=Path("/nonexistent"))
