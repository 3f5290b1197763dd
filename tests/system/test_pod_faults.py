"""Pod-level faults through a real agent, on a kubelet-shaped node imitation.

A pod built the way the kubelet builds it (systemd-driver cgroups with a
containerd scope, its own network namespace) holds a real process; a decoy
with the same name runs outside it. Each fault must touch only the pod:
its processes, its cgroup, its network namespace.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
import uuid
from typing import Any

import psutil
import pytest

from agent.netlink import tc
from agent.netlink.netns import iproute
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Inject, PodRef, Revert
from tests.conftest import async_wait_until, status
from tests.system.test_pods_kubelet_layout import Node, hierarchies, node  # noqa: F401 - the fixture

pytestmark = pytest.mark.system


def build_pod(node: Node) -> tuple[PodRef, int, str]:  # noqa: F811
    uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    pod = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    node.cgroup(f"{pod}/cri-containerd-{cid}.scope", hierarchies())
    app = node.spawn("flt-podapp", f"{pod}/cri-containerd-{cid}.scope", hierarchies(), in_netns=True)
    with iproute(f"/run/netns/{node.netns}") as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return PodRef(namespace="shop", name="redis-0", uid=uid, container_ids=[cid]), app, f"{node.base}/{pod}"


def inject(spec: dict[str, Any], pod: PodRef, fid: str) -> Inject:
    return Inject(
        experiment_id="pods", fault_id=fid, spec=spec, expires_at=time.time() + 60, lease_timeout_s=60, pods=[pod]
    )


async def send(nc: Any, cmd: Any) -> Ack:
    reply = await nc.request(subjects.agent_cmd("node-a"), encode(cmd), timeout=5)
    return decode(reply.data, Ack)


def decoy(node: Node) -> subprocess.Popen[bytes]:  # noqa: F811
    exe = node.tmp / "flt-podapp"  # same comm as the pod's process, outside the pod
    proc = subprocess.Popen([str(exe), "300"])
    node.procs.append(proc)
    return proc


async def test_process_fault_touches_only_the_pods_processes(node: Node, nc, agent_factory, events) -> None:  # noqa: F811
    agent_factory("node-a")
    pod, app, _ = await asyncio.to_thread(build_pod, node)
    outsider = decoy(node)
    ack = await send(nc, inject({"kind": "process-pause", "match": {"name": "flt-podapp"}}, pod, "pods.0"))
    assert ack.accepted, ack.reason
    active = await async_wait_until(lambda: events.events("pods.0", "active"), 10, "the pause to become active")
    assert active[0].measurements.hit_pids == [app]
    await async_wait_until(lambda: status(psutil.Process(app)) == "stopped", 5, "the pod's process to stop")
    assert status(psutil.Process(outsider.pid)) != "stopped", "a process outside the pod was paused"
    await send(nc, Revert(experiment_id="pods", expires_at=time.time() + 10))
    await async_wait_until(lambda: events.events("pods.0", "reverted"), 5, "the revert")
    assert status(psutil.Process(app)) != "stopped"


async def test_cpu_stressor_runs_in_the_pods_cgroup(node: Node, nc, agent_factory, events) -> None:  # noqa: F811
    agent_factory("node-a")
    pod, _, cgroup_rel = await asyncio.to_thread(build_pod, node)
    ack = await send(nc, inject({"kind": "cpu", "load": 20, "workers": 1}, pod, "pods.1"))
    assert ack.accepted, ack.reason
    active = await async_wait_until(lambda: events.events("pods.1", "active"), 10, "the cpu fault to become active")
    pids = active[0].measurements.stressor_pids or []
    assert pids and active[0].measurements.cgroup == cgroup_rel
    # the hierarchy that carries the cpu controller: v1 cpu, or the v2 root on a pure-v2 node
    cpu_mounts = [m for m in hierarchies() if m.name == "cpu"] or hierarchies()[:1]
    procs_files = [m / cgroup_rel / "cgroup.procs" for m in cpu_mounts]
    for procs_file in procs_files:
        members = {int(x) for x in procs_file.read_text().split()}
        assert set(pids) <= members, f"stressors {pids} not in {procs_file}"
    await send(nc, Revert(experiment_id="pods", expires_at=time.time() + 10))
    await async_wait_until(lambda: events.events("pods.1", "reverted"), 10, "the revert")
    assert not any(psutil.pid_exists(p) and status(psutil.Process(p)) != "zombie" for p in pids)


def roots(netns: str | None) -> list[tuple[str, Any]]:
    out = []
    with iproute(netns) as ipr:
        for link in ipr.get_links():
            idx = link["index"]
            out.append((str(link.get_attr("IFLA_IFNAME")), tc.root_owner(tc.root_qdisc(ipr, idx))))
    return out


async def test_network_fault_runs_in_the_pods_namespace(node: Node, nc, agent_factory, events) -> None:  # noqa: F811
    agent_factory("node-a")
    pod, _, _ = await asyncio.to_thread(build_pod, node)
    before_host = await asyncio.to_thread(roots, None)
    spec = {"kind": "network", "rate": "8mbit", "interface": "lo", "exemptControlPlane": False}
    ack = await send(nc, inject(spec, pod, "pods.2"))
    assert ack.accepted, ack.reason
    await async_wait_until(lambda: events.events("pods.2", "active"), 10, "the network fault to become active")
    pod_ns = f"/run/netns/{node.netns}"
    assert ("lo", "ours") in await asyncio.to_thread(roots, pod_ns)
    assert await asyncio.to_thread(roots, None) == before_host, "the node's own interfaces were touched"
    await send(nc, Revert(experiment_id="pods", expires_at=time.time() + 10))
    await async_wait_until(lambda: events.events("pods.2", "reverted"), 5, "the revert")
    assert ("lo", "ours") not in await asyncio.to_thread(roots, pod_ns)


async def test_pod_not_on_this_node_is_rejected_with_the_reason(node: Node, nc, agent_factory) -> None:  # noqa: F811
    agent_factory("node-a")
    ghost = PodRef(namespace="shop", name="ghost-0", uid=str(uuid.uuid4()))
    for i, spec in enumerate(
        [
            {"kind": "process-pause", "match": {"name": "x"}},
            {"kind": "cpu", "load": 10},
            {"kind": "network", "delay": "1ms"},
        ]
    ):
        ack = await send(nc, inject(spec, ghost, f"pods.{10 + i}"))
        if spec["kind"] == "network":
            assert not ack.accepted  # netem missing here, or the pod: either way a reason
        elif spec["kind"] == "cpu":
            assert not ack.accepted and "ghost-0" in (ack.reason or ""), ack.reason
        else:  # its selection, before the Ack, finds nothing of the pod here
            assert not ack.accepted and ack.reason, ack
