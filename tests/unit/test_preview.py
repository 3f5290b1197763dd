"""Preview (schema 1.4, all fault kinds since 1.5): the agent answers which processes a fault would touch, touching,
recording and journaling nothing; the controller shows it, and says which agents are too old.
The agent side runs the real runtime and the real process injectors on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.config import AgentSettings
from agent.faults.process import masked_cmdline
from agent.runtime import AgentRuntime
from controller.fleet import Fleet
from controller.preview import preview_faults, preview_lines, preview_shortfalls
from controller.tracking import Plan
from proto.codec import decode, encode
from proto.faults import MemorySpec, ProcessKillSpec, ProcessMatch, ProcessPauseSpec
from proto.messages import SCHEMA_VERSION, Ack, Heartbeat, Inject, Preview
from tests.conftest import async_wait_until

DETACH = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[1]], "
    "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\n"
    "print(p.pid)"
)


@pytest.fixture
def sleepers() -> Iterator[tuple[str, list[psutil.Process]]]:
    """Three victims that are not this process's children: the agent runs in this process here,
    and it never touches its own children (they would be listed as skipped)."""
    token = f"faultline-preview-victim-{uuid.uuid4().hex[:8]}"
    procs: list[psutil.Process] = []
    try:
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", DETACH, token], capture_output=True, text=True, timeout=30)
            procs.append(psutil.Process(int(out.stdout)))
        yield token, procs
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)


async def preview(rt: AgentRuntime, spec: object) -> Ack:
    return decode(await rt.handle_command(encode(Preview(spec=spec, expires_at=time.time() + 30))), Ack)


async def test_the_agent_previews_without_touching_recording_or_journaling(
    tmp_path: Path, sleepers: tuple[str, list[psutil.Process]]
) -> None:
    token, procs = sleepers
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "p"}))
    await rt.probe()
    ack = await preview(rt, ProcessKillSpec(match=ProcessMatch(cmdline=f"{token}$"), count=2))
    assert ack.accepted and ack.preview is not None, ack
    p = ack.preview
    assert p.would_hit == 2 and p.matched_total == 3
    assert sorted(m.pid for m in p.matched) == sorted(x.pid for x in procs)
    assert all(token in m.cmdline for m in p.matched)
    assert p.note is not None and "2 of the 3 matches" in p.note
    ack = await preview(rt, ProcessPauseSpec(match=ProcessMatch(cmdline=f"{token}$")))
    assert ack.preview is not None and ack.preview.would_hit == 3  # pause: every match by default
    # nothing happened: all alive and running, nothing held, nothing journaled
    assert all(x.is_running() and x.status() != psutil.STATUS_STOPPED for x in procs)
    assert rt.faults == {} and rt.rejected_count == 0
    journal = tmp_path / "journal"
    assert not journal.exists() or not list(journal.iterdir())


@pytest.fixture
def own_child() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    token = f"faultline-preview-child-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token], stdin=subprocess.DEVNULL)
    try:
        yield token, child
    finally:
        child.kill()
        child.wait(timeout=10)


async def test_protected_processes_are_listed_as_skipped_and_a_protected_pid_is_refused(
    tmp_path: Path, own_child: tuple[str, subprocess.Popen[bytes]]
) -> None:
    token, child = own_child
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "p"}))
    await rt.probe()
    # the agent (this process) and its own child match; neither may be touched
    own = re.escape(" ".join(psutil.Process().cmdline()))
    ack = await preview(rt, ProcessKillSpec(match=ProcessMatch(cmdline=f"{token}$|^{own}$")))
    assert ack.preview is not None
    skipped = {s.pid: s.reason for s in ack.preview.skipped}
    assert skipped.get(os.getpid()) == "the faultline agent itself", skipped
    assert "a process of the faultline agent" in skipped.get(child.pid, ""), skipped
    assert child.pid not in [m.pid for m in ack.preview.matched]
    previews = [{"fault": 0, "kind": "process-kill", "name": None, "nodes": {"p": ack.preview.model_dump()}}]
    total = ack.preview.matched_total + ack.preview.skipped_total
    assert (
        f"  p: would hit 0 of {total} matching process(es); {ack.preview.skipped_total} skipped (protected, "
        in (preview_lines(previews)[1])
    )
    refused = await preview(rt, ProcessKillSpec(match=ProcessMatch(pid=os.getpid())))
    assert refused.accepted and refused.preview is not None and "protected" in (refused.preview.refused or "")


async def test_nothing_matching_is_a_note_and_a_shortfall(tmp_path: Path) -> None:
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "p"}))
    await rt.probe()
    ack = await preview(rt, ProcessPauseSpec(match=ProcessMatch(cmdline=f"no-such-{uuid.uuid4().hex}$")))
    assert ack.preview is not None and ack.preview.would_hit == 0
    assert "the fault would be refused now" in (ack.preview.note or "")
    previews = [{"fault": 0, "kind": "process-pause", "name": None, "nodes": {"p": ack.preview.model_dump()}}]
    assert preview_shortfalls(previews) == ["fault 0 on p: would hit no process; the run would fail there"]
    assert any("would hit 0 of 0" in line for line in preview_lines(previews))


def _agent_speaking(fleet: Fleet, node: str, minor: int) -> None:
    hb = Heartbeat(node=node, instance_id=node, version="0.9", interval_s=1, seq=1, started_at=1.0)
    fleet.observe(
        encode(hb).replace(f'"schema_version":"{SCHEMA_VERSION}"'.encode(), f'"schema_version":"1.{minor}"'.encode())
    )


async def test_agents_older_than_1_4_are_named_not_asked() -> None:
    fleet = Fleet(None)
    _agent_speaking(fleet, "old", 3)
    spec = ProcessPauseSpec(match=ProcessMatch(pid=12345))
    out = await preview_faults(None, fleet, [spec], Plan(targets=["old"], pods={}, notes=[]))
    err = out[0]["nodes"]["old"]["error"]
    assert "0.9" in err and "schema 1.3" in err and "cannot preview process-pause faults" in err
    assert preview_shortfalls(out) == [f"fault 0 on old: no preview ({err})"]


async def test_agents_older_than_1_5_are_not_asked_about_network_cpu_or_memory_faults() -> None:
    """A 1.4 agent answers process previews only: its PreviewResult has no network or stress."""
    fleet = Fleet(None)
    _agent_speaking(fleet, "n14", 4)
    spec = MemorySpec.model_validate({"kind": "memory", "size": "4Mi"})
    out = await preview_faults(None, fleet, [spec], Plan(targets=["n14"], pods={}, notes=[]))
    err = out[0]["nodes"]["n14"]["error"]
    assert "schema 1.4" in err and "cannot preview memory faults; upgrade it to schema 1.5" in err
    assert preview_shortfalls(out) == [], "a mixed fleet mid-rollout must not fail the preview"


async def test_a_preview_that_an_inject_would_refuse_is_an_answer_for_1_5_and_a_refusal_for_1_4(
    tmp_path: Path,
) -> None:
    """A busy or stopping agent does not answer a preview; a fault it would refuse (no such
    process, too much memory) is an answer: "would be refused". A 1.4 controller, which knows no
    PreviewResult.refused, gets the refusal as before."""
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "p"}))
    await rt.probe()
    protected = ProcessKillSpec(match=ProcessMatch(pid=os.getpid()))
    new = decode(await rt.handle_command(encode(Preview(spec=protected, expires_at=time.time() + 30))), Ack)
    assert new.accepted and new.preview is not None and "protected" in (new.preview.refused or "")
    old_cmd = encode(Preview(spec=protected, expires_at=time.time() + 30)).replace(
        f'"schema_version":"{SCHEMA_VERSION}"'.encode(), b'"schema_version":"1.4"'
    )
    old = decode(await rt.handle_command(old_cmd), Ack)
    assert not old.accepted and "protected" in (old.reason or "") and old.preview is None
    rt.stopping = True
    busy = decode(await rt.handle_command(encode(Preview(spec=protected, expires_at=time.time() + 30))), Ack)
    assert not busy.accepted and busy.reason == "agent is stopping"


def test_network_and_stress_previews_read_as_where_the_fault_would_go() -> None:
    net = {
        "network": {
            "interface": "eth0", "netns": None, "direction": "ingress", "device": "flifb0a1b2c3d",
            "replaces": ["ingress ffff:"], "unaffected": ["10.0.0.5:4222 (control plane nats:4222)"], "filters": 4,
        },
        "note": None,
    }  # fmt: skip
    mem = {"stress": {"cgroup": "/kubepods/pod1", "size_bytes": 2**30, "available_bytes": 8 * 2**30,
                      "reserve_bytes": 2**30, "promised_bytes": 0}}  # fmt: skip
    previews = [
        {"fault": 0, "kind": "network", "name": None, "nodes": {"n1": net}},
        {"fault": 1, "kind": "memory", "name": "m", "nodes": {"n1": mem, "n2": {"error": "no", "refused": True}}},
    ]
    assert preview_lines(previews) == [
        "fault 0 (network):",
        "  n1: would shape eth0, ingress (through flifb0a1b2c3d), 4 filter(s)",
        "    untouched: 10.0.0.5:4222 (control plane nats:4222)",
        "    force: true deletes ingress ffff: (not restored)",
        "fault 1 (memory, m):",
        "  n1: would allocate 1Gi in /kubepods/pod1; available 8Gi, reserve 1Gi",
        "  n2: would be refused: no",
    ]
    assert preview_shortfalls(previews) == ["fault 1 on n2: would be refused: no"]


def test_secrets_on_previewed_command_lines_are_masked() -> None:
    argv = ["java", "-Dpassword=hunter2", "--token", "abc", "--db", "postgres://u:pw@h/db", "API_KEY=zzz", "run"]
    shown = masked_cmdline(argv)
    assert shown == "java -Dpassword=*** --token *** --db postgres://***@h/db API_KEY=*** run"
    assert masked_cmdline(["worker", "--queue", "q1"]) == "worker --queue q1"


class Msg:
    def __init__(self, data: bytes, reply: str) -> None:
        self.data, self.reply, self.subject = data, reply, "faultline.v1.agent.p.cmd"


async def test_a_slow_preview_holds_up_no_other_command_and_runs_one_at_a_time(tmp_path: Path) -> None:
    """nats-py hands one subscription's messages to its callback one at a time: a preview (a scan of
    every process) answers from a task of its own, so an Inject behind it is answered first."""
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "p"}))
    await rt.probe()
    answered: list[tuple[str, Ack]] = []
    gate = asyncio.Event()

    async def publish(subject: str, payload: bytes) -> None:
        if subject.startswith("r."):  # answers; the Inject's fault events go elsewhere
            answered.append((subject, decode(payload, Ack)))

    async def slow_preview(spec: object, ctx: object) -> None:
        await gate.wait()
        return None

    rt.publish = publish  # type: ignore[method-assign]
    rt.injectors["process-pause"].preview = slow_preview  # type: ignore[method-assign]
    rt.injectors["process-pause"].prechecks = False  # type: ignore[misc]  # pid 424242 matches nothing
    spec = ProcessPauseSpec(match=ProcessMatch(pid=424242))
    await rt._on_cmd(Msg(encode(Preview(spec=spec, expires_at=time.time() + 30)), "r.preview"))
    await rt._on_cmd(Msg(encode(Preview(spec=spec, expires_at=time.time() + 30)), "r.preview2"))
    inject = Inject(experiment_id="e", fault_id="e.0", spec=spec, expires_at=time.time() + 30, lease_timeout_s=30)
    await rt._on_cmd(Msg(encode(inject), "r.inject"))
    await async_wait_until(lambda: len(answered) >= 2, 5, "the Inject and the second preview answered")
    assert [s for s, _ in answered][:2] == ["r.preview2", "r.inject"] or [s for s, _ in answered][:2] == [
        "r.inject",
        "r.preview2",
    ], answered
    second = dict(answered)["r.preview2"]
    assert not second.accepted and "another preview is running" in (second.reason or "")
    assert dict(answered)["r.inject"].accepted
    gate.set()
    await async_wait_until(lambda: len(answered) == 3, 5, "the first preview answered once released")
    assert answered[-1][0] == "r.preview" and answered[-1][1].accepted
    for rec in rt.faults.values():
        if rec.timer is not None:
            rec.timer.cancel()
    assert rt.rejected_count == 0
