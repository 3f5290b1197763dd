"""The residue check: what the machine itself still carries, not what the agents say.

``residue(fleet)`` while the fleet is up: no faultline qdisc (handle fa17:) or
ingress redirect on any interface of the host or of our namespaces, no
stressor of our agents, no stopped victim, every agent's journal empty.
``leftovers(tag)`` after teardown: no namespace and no process of ours.
Each returns one line per finding; empty means clean.
"""

from __future__ import annotations

import re

import psutil

from agent.faults.stress_marks import MARKER_PREFIX, agent_tag
from agent.netlink import tc
from agent.netlink.netns import iproute
from tests.system.fleet import FleetHarness, list_netns, victim_status


def qdisc_residue(namespaces: list[str | None]) -> list[str]:
    found = []
    for ns in namespaces:
        where = ns or "host"
        try:
            with iproute(ns) as ipr:
                for dev, what in sorted(tc.holdings(ipr).items()):
                    found.append(f"{where}: {dev} carries {what}")
                for link in ipr.get_links():
                    name = str(link.get_attr("IFLA_IFNAME"))
                    if name.startswith(tc.IFB_PREFIX):
                        found.append(f"{where}: ifb device {name} left")
        except Exception as exc:  # noqa: BLE001 - a namespace we cannot read is itself a finding
            found.append(f"{where}: cannot inspect: {exc}")
    return found


def stressor_residue(tags: list[str]) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if MARKER_PREFIX in cmd and any(t in cmd for t in tags):
            found.append(f"stressor pid {proc.pid} still running: {cmd[:120]}")
    return found


def residue(fleet: FleetHarness) -> list[str]:
    found = qdisc_residue([None, *fleet.namespaces])
    found += stressor_residue([agent_tag(n.name, n.agent.state_dir) for n in fleet.nodes.values()])
    for node in fleet.nodes.values():
        for p in node.victim_procs():
            if victim_status(p) == psutil.STATUS_STOPPED:
                found.append(f"{node.name}: victim pid {p.pid} is still paused")
        journal = node.agent.settled_journal()
        if journal:
            found.append(f"{node.name}: journal not empty: {', '.join(journal)}")
    return found


def leftovers(tag: str) -> list[str]:
    found = [f"namespace {ns} left" for ns in list_netns() if ns.startswith(f"{tag}-")]
    pattern = re.compile(rf"\b{re.escape(tag)}-")
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if pattern.search(cmd) and proc.info.get("status") != psutil.STATUS_ZOMBIE:
            found.append(f"process {proc.pid} left: {cmd[:120]}")
    return found
