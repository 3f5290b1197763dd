"""What the agent needs of its cpu and memory faults before their first one: the markers its
stressors carry, the scan that finds them, and the capability probe.

Kept apart from agent.faults.stressor so that an idle agent can probe and sweep
without loading the stressor code (agent.faults.lazy).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict

from agent import cgroups
from agent.faults.base import Capability

MARKER_ENV = "FAULTLINE_STRESSOR"
MARKER_PREFIX = "faultline-stressor"
MARKER_ARG = "--marker="


def agent_tag(node: str, state_dir: Path) -> str:
    """Per-agent part of the marker: readable node name plus a hash of node and state_dir."""
    digest = hashlib.sha256(f"{node}\0{Path(state_dir).resolve()}".encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', node)[:40]}-{digest}"


def make_marker(kind: str, tag: str, fault_id: str) -> str:
    return f"{MARKER_PREFIX}:{kind}:{tag}:{fault_id}"


class StressorRef(BaseModel):
    """One stressor process, identified beyond pid reuse by its start time."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    pid: int
    create_time: float


def marker_of(proc: psutil.Process) -> str | None:
    try:
        for arg in proc.cmdline():
            if arg.startswith(MARKER_ARG):
                return str(arg[len(MARKER_ARG) :])
    except (psutil.Error, OSError):
        return None
    return None


def find_marked(prefix: str) -> dict[str, list[StressorRef]]:
    """Live stressors whose marker starts with ``prefix``: marker -> refs."""
    found: dict[str, list[StressorRef]] = {}
    for proc in psutil.process_iter(["pid"]):
        marker = marker_of(proc)
        if marker is None or not marker.startswith(prefix):
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            ref = StressorRef(pid=proc.pid, create_time=proc.create_time())
        except psutil.Error:
            continue
        found.setdefault(marker, []).append(ref)
    return found


def stress_capabilities(kind: str) -> list[Capability]:
    """The probe of a stressor kind: it runs wherever the agent runs; cgroup placement needs a writable hierarchy."""
    ok, why = cgroups.writable()
    return [Capability(kind, True), Capability("cgroup", ok, why)]
