"""`faultline run --preview` against a real fleet: a real agent answers which of the test's own
victims each process fault would hit, and nothing is applied."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import AgentProcess, Victims, status
from tests.integration.test_cli import experiment_file, faultline, pause

pytestmark = pytest.mark.integration


def test_preview_lists_what_each_fault_would_hit_and_applies_nothing(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    agent = agent_factory("node-a")
    procs = victims.start(2)
    kill = {"kind": "process-kill", "match": {"cmdline": f"{victims.token}$"}, "count": 1}
    path = experiment_file(tmp_path, [pause(victims), kill])
    r = faultline("run", str(path), "--nats", nats_url, "--preview", "-o", "json")
    assert r.returncode == 0, r.stderr
    previews = json.loads(r.stdout)["preview"]
    assert [p["kind"] for p in previews] == ["process-pause", "process-kill"]
    pids = sorted(p.pid for p in procs)
    paused, killed = (p["nodes"]["node-a"] for p in previews)
    assert sorted(m["pid"] for m in paused["matched"]) == pids and paused["would_hit"] == 2
    assert sorted(m["pid"] for m in killed["matched"]) == pids and killed["would_hit"] == 1
    assert "picked at random" in killed["note"]
    # read-only: every victim alive and running, the agent accepted nothing
    assert all(p.is_running() and status(p) != psutil.STATUS_STOPPED for p in procs)
    assert "accepted" not in agent.log(since_start=True)
    assert agent.journal() == []

    text = faultline("run", str(path), "--nats", nats_url, "--preview")
    assert text.returncode == 0, text.stderr
    assert "node-a: would hit 2 of 2 matching process(es)" in text.stdout, text.stdout
    assert "nothing was applied" in text.stdout


def test_preview_of_a_fault_that_would_hit_nothing_exits_1(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    agent_factory("node-a")
    path = experiment_file(tmp_path, [pause(victims, tag="-not-started")])
    r = faultline("run", str(path), "--nats", nats_url, "--preview")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "fault 0 on node-a: would hit no process; the run would fail there" in r.stderr
    assert "the fault would be refused now" in r.stdout


def test_preview_of_network_cpu_and_memory_faults_shows_where_they_would_go(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    """Schema 1.5: the interface and what stays untouched (the agent's own NATS server among it),
    the stressors and the memory room; nothing installed, started or journaled."""
    agent = agent_factory("node-a")
    faults = [
        {"kind": "network", "interface": "lo", "rate": "1mbit", "destinations": ["127.0.0.0/8"]},
        {"kind": "cpu", "load": "20%", "workers": 1},
        {"kind": "memory", "size": "4Mi"},
        {"kind": "memory", "percent": 95},  # more than available less the reserve
    ]
    path = experiment_file(tmp_path, faults)
    r = faultline("run", str(path), "--nats", nats_url, "--preview", "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr  # the last one would be refused
    net, cpu, mem, huge = (p["nodes"]["node-a"] for p in json.loads(r.stdout)["preview"])
    assert net["network"]["interface"] == "lo" and net["network"]["direction"] == "egress", net
    port = nats_url.rsplit(":", 1)[1]
    assert any(u.startswith(f"127.0.0.1:{port} (control plane") for u in net["network"]["unaffected"]), net
    assert cpu["stress"]["workers"] == 1 and cpu["stress"]["load_percent"] == 20.0, cpu
    assert mem["stress"]["size_bytes"] == 4 * 2**20 and mem["stress"]["available_bytes"] > 0, mem
    assert huge["refused"] is True and "exceeds available memory" in huge["error"], huge
    assert "fault 3 on node-a: would be refused: percent: " in r.stderr, r.stderr
    assert agent.journal() == [] and "accepted" not in agent.log(since_start=True)

    text = faultline("run", str(path), "--nats", nats_url, "--preview")
    assert "  node-a: would shape lo, egress, " in text.stdout, text.stdout
    assert f"    untouched: 127.0.0.1:{port} (control plane" in text.stdout
    assert "  node-a: would run 1 worker(s) at 20% of a core each in the node" in text.stdout
    assert "  node-a: would allocate 4Mi in the node; available " in text.stdout
    assert "  node-a: would be refused: percent: " in text.stdout and "exceeds available memory" in text.stdout
