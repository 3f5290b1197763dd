"""Journal entries the agent keeps without reverting them are reported, not only logged.

In-process, with fake fault backends (no NATS, no kernel): the journal, the
agent's start-up recovery, a revert that keeps failing, the heartbeat, and the
controller's wording of it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentSettings
from agent.faults.base import AgentEnv
from agent.journal import Journal, JournalEntry
from agent.runtime import AgentRuntime
from controller.fleet import NodeView, journal_issue_line, journal_issue_lines
from controller.fleet_commands import _agent_row
from controller.local import recovery_lines
from proto.codec import decode, encode
from proto.faults import CpuSpec, ProcessPauseSpec
from proto.messages import MAX_JOURNAL_ISSUES, Ack, Halt, Heartbeat, JournalIssue
from tests.conftest import async_wait_until
from tests.unit.test_agent_safety import FlakyPlan, FlakyRevert, inject, runtime, stalling_journal


def entry(fid: str, spec: Any = None, planned: bool = True) -> JournalEntry:
    return JournalEntry(
        fault_id=fid,
        experiment_id="old-exp",
        spec=spec or ProcessPauseSpec.model_validate({"kind": "process-pause", "match": {"pid": 99999}}),
        expires_at=time.time() + 600,
        lease_timeout_s=5,
        plan=FlakyPlan().model_dump(mode="json") if planned else None,
    )


def test_a_corrupt_entry_is_set_aside_and_listed_at_every_load(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    (journal.dir / "torn.0.json").write_bytes(b'{"fault_id": "torn.0", "experi')
    entries, kept = journal.load()
    assert entries == []
    (k,) = kept
    assert (k.name, k.problem) == ("torn.0.corrupt", "unreadable")
    assert k.reason.startswith("not JSON: ") and k.reason.endswith("; set aside as torn.0.corrupt")
    assert "\n" not in k.reason
    assert (journal.dir / "torn.0.corrupt").exists() and not (journal.dir / "torn.0.json").exists()
    # the next start lists it again: it stays visible until someone removes it
    (again,) = journal.load()[1]
    assert (again.name, again.reason) == ("torn.0.corrupt", "not JSON; set aside at an earlier start")
    # a second corrupt entry of the same name does not overwrite the first
    (journal.dir / "torn.0.json").write_bytes(b"[1, 2]")
    _, kept = journal.load()
    assert sorted(k.name for k in kept) == ["torn.0.1.corrupt", "torn.0.corrupt"]
    assert (journal.dir / "torn.0.corrupt").read_bytes().startswith(b'{"fault_id"')


def test_a_newer_agents_entry_stays_in_place_for_an_agent_that_can_read_it(tmp_path: Path) -> None:
    """JSON this build cannot validate (a kind it does not know: written by a newer agent before
    a downgrade) is not corrupt: moved aside, no later agent would ever revert it."""
    journal = Journal(tmp_path)
    newer = entry("disk.0").model_dump(mode="json", by_alias=True)
    newer["spec"] = {"kind": "disk-fill", "path": "/var", "percent": 90}
    (journal.dir / "disk.0.json").write_text(json.dumps(newer))
    entries, (k,) = journal.load()
    assert entries == []
    assert (k.name, k.problem, k.fault_id, k.experiment_id, k.kind) == (
        "disk.0.json", "unrecognised", "disk.0", "old-exp", "disk-fill"
    )  # fmt: skip
    assert "this agent cannot read it (spec: " in k.reason and k.reason.endswith("kept in place for an agent that can")
    assert (journal.dir / "disk.0.json").exists(), "left where an agent that can read it finds it"
    with pytest.raises(ValueError, match="cannot read it"):
        journal.read("disk.0")


async def test_start_up_recovery_reports_every_entry_it_keeps(tmp_path: Path) -> None:
    """Unreadable, of a kind this agent cannot revert, and a revert that fails: each is kept on
    disk and listed in every heartbeat, with the fault it guarded where that is known."""
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=99))
    journal = Journal(tmp_path)
    (journal.dir / "torn.0.json").write_bytes(b"\x00\x00garbage")
    journal.write(entry("stuck.0"))
    journal.write(entry("cpu.0", CpuSpec.model_validate({"kind": "cpu", "load": "50%"})))
    journal.write(entry("never-applied.0", planned=False))
    await rt.recover()
    hb = rt.heartbeat()
    got = {i.entry: i for i in hb.journal_issues}
    assert set(got) == {"torn.0.corrupt", "stuck.0.json", "cpu.0.json"}, got
    assert got["torn.0.corrupt"].reason.startswith("not JSON: ")
    assert hb.journal_issues_total == 3
    assert got["torn.0.corrupt"].problem == "unreadable" and got["torn.0.corrupt"].fault_id is None
    stuck = got["stuck.0.json"]
    assert (stuck.problem, stuck.fault_id, stuck.experiment_id, stuck.kind) == (
        "revert-failed", "stuck.0", "old-exp", "process-pause"
    )  # fmt: skip
    assert "netlink busy" in stuck.reason and "retried every minute, at a halt and at the next start" in stuck.reason
    assert got["cpu.0.json"].problem == "unsupported-kind" and "cannot revert cpu faults" in got["cpu.0.json"].reason
    # kept on disk; the entry that was never applied is gone
    assert sorted(journal.fault_ids()) == ["cpu.0", "stuck.0"]
    assert inj.reverts == 1
    # the heartbeat carries them on the wire
    assert decode(encode(hb), Heartbeat).journal_issues == hb.journal_issues


async def test_a_heartbeat_lists_at_most_the_cap_and_counts_them_all(tmp_path: Path) -> None:
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    journal = Journal(tmp_path)
    for i in range(MAX_JOURNAL_ISSUES + 5):
        (journal.dir / f"torn.{i}.json").write_bytes(b"{")
    await rt.recover()
    hb = rt.heartbeat()
    assert len(hb.journal_issues) == MAX_JOURNAL_ISSUES and hb.journal_issues_total == MAX_JOURNAL_ISSUES + 5
    lines = journal_issue_lines(hb)
    assert lines[-1] == "  ... and 5 more (the agent's log lists every one)"


async def test_a_revert_that_keeps_failing_while_running_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.lifecycle.REVERT_BACKOFF_S", 0.01)
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=99))
    assert rt.heartbeat().journal_issues == []
    assert decode(await rt.handle_command(inject()), Ack).accepted
    rec = rt.faults["e.0"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    ((issue,),) = [rt.heartbeat().journal_issues]
    assert (issue.entry, issue.problem, issue.fault_id) == ("e.0.json", "revert-failed", "e.0")
    assert issue.reason.startswith("revert failed: ") and "netlink busy" in issue.reason
    assert rt.journal.fault_ids() == ["e.0"] and inj.reverts == 3


def hb_with(issues: list[JournalIssue], total: int | None = None) -> Heartbeat:
    return Heartbeat(
        node="n", instance_id="i", version="0", interval_s=1.0, seq=1, started_at=1.0,
        journal_issues=issues, journal_issues_total=len(issues) if total is None else total,
    )  # fmt: skip


ISSUES = [
    JournalIssue(entry="torn.0.corrupt", problem="unreadable", reason="unreadable, set aside at an earlier start"),
    JournalIssue(
        entry="e.0.json", problem="revert-failed", reason="revert failed: boom", fault_id="e.0",
        experiment_id="e", kind="process-pause",
    ),
]  # fmt: skip


def test_the_controller_words_each_kept_entry(tmp_path: Path) -> None:
    lines = journal_issue_lines(hb_with(ISSUES))
    assert lines == [
        "  torn.0.corrupt: unreadable: unreadable, set aside at an earlier start",
        "  e.0 (process-pause, experiment e; e.0.json): revert-failed: revert failed: boom",
    ]
    local = recovery_lines([], tmp_path, hb_with(ISSUES))
    assert local[0] == f"the local agent keeps 2 journal entry(ies) unreverted ({tmp_path / 'journal'}):"
    assert local[1:3] == lines
    assert "may still be in place" in local[3] and local[4].endswith("agent.log)")
    assert recovery_lines([], tmp_path, hb_with([])) == []
    row = _agent_row(NodeView(hb_with(ISSUES), time.monotonic(), time.time()), time.monotonic())
    assert [i["entry"] for i in row["journal_issues"]] == ["torn.0.corrupt", "e.0.json"]
    assert row["journal_issues_total"] == 2
    old = hb_with([]).model_copy(update={"schema_version": "1.2"})
    row = _agent_row(NodeView(old, time.monotonic(), time.time()), time.monotonic())
    assert row["journal_issues"] is None and row["journal_issues_total"] is None, "unknown, not none"
    bare = JournalIssue(entry="x.0.json", problem="revert-failed", reason="r", fault_id="x.0")
    assert journal_issue_line(bare) == "x.0 (x.0.json): revert-failed: r"


def test_heartbeats_across_versions_keep_reading() -> None:
    """A 1.2 agent's heartbeat (no such fields) reads as none; a newer agent's, with a problem this
    controller does not know or more than 20 entries, still reads: an unreadable heartbeat would
    make that agent look silent and abort every run that targets it."""
    old = hb_with([]).model_dump(mode="json", exclude={"journal_issues", "journal_issues_total", "halts_done"})
    old["schema_version"] = "1.2"
    hb = decode(json.dumps(old).encode(), Heartbeat)
    assert hb.journal_issues == [] and hb.journal_issues_total == 0 and hb.halts_done == []
    newer = hb_with(ISSUES * 15).model_dump(mode="json")
    newer["schema_version"] = "1.9"
    newer["journal_issues"][0]["problem"] = "quarantined"
    newer["journal_issues"][0]["since"] = 1.0  # a field this side does not know
    hb = decode(json.dumps(newer).encode(), Heartbeat)
    assert len(hb.journal_issues) == 30 and hb.journal_issues[0].problem == "quarantined"


async def test_a_halt_retries_a_failed_revert_and_forgets_what_an_operator_removed(tmp_path: Path) -> None:
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=2))
    journal = Journal(tmp_path)
    journal.write(entry("stuck.0"))
    (journal.dir / "torn.0.json").write_bytes(b"{")
    await rt.recover()
    assert {i.entry for i in rt.heartbeat().journal_issues} == {"stuck.0.json", "torn.0.corrupt"}
    # the first halt's retry fails again: still one issue for the entry, with the new reason
    await rt.retry_kept("halt")
    (stuck,) = [i for i in rt.heartbeat().journal_issues if i.fault_id == "stuck.0"]
    assert "revert failed again on halt" in stuck.reason and inj.reverts == 2
    assert rt.heartbeat().journal_issues_total == 2
    # the operator removes the corrupt entry; the next halt's retry succeeds
    (journal.dir / "torn.0.corrupt").unlink()
    await rt.retry_kept("halt")
    hb = rt.heartbeat()
    assert hb.journal_issues == [] and hb.journal_issues_total == 0 and inj.reverts == 3
    assert journal.fault_ids() == [], "a reverted entry is dropped"
    (ended,) = [e for e in hb.ended if e.fault_id == "stuck.0" and e.state == "reverted"]
    assert ended.reason == "kept journal entry reverted on halt"
    assert [e.fault_id for e in rt._pending_events if e.state == "reverted"] == ["stuck.0"], "an event reports it"


async def test_a_halt_leaves_entries_it_cannot_revert_listed(tmp_path: Path) -> None:
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    journal = Journal(tmp_path)
    journal.write(entry("cpu.0", CpuSpec.model_validate({"kind": "cpu", "load": "50%"})))
    await rt.recover()
    await rt.retry_kept("halt")
    (issue,) = rt.heartbeat().journal_issues
    assert issue.problem == "unsupported-kind" and journal.fault_ids() == ["cpu.0"] and inj.reverts == 0


async def test_two_halts_at_once_revert_a_kept_entry_once(tmp_path: Path) -> None:
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=1))
    Journal(tmp_path).write(entry("stuck.0"))
    await rt.recover()
    assert inj.reverts == 1 and rt.heartbeat().journal_issues_total == 1
    await asyncio.gather(rt.retry_kept("halt"), rt.retry_kept("halt"))
    assert inj.reverts == 2, "the second halt's retry found nothing left to retry"
    assert rt.heartbeat().journal_issues_total == 0
    assert [e.fault_id for e in rt._pending_events if e.state == "reverted"] == ["stuck.0"]


async def test_an_unrevertable_entry_removed_by_hand_is_forgotten_at_the_next_halt(tmp_path: Path) -> None:
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    journal = Journal(tmp_path)
    journal.write(entry("cpu.0", CpuSpec.model_validate({"kind": "cpu", "load": "50%"})))
    await rt.recover()
    assert rt.heartbeat().journal_issues_total == 1
    journal.remove("cpu.0")
    await rt.retry_kept("halt")
    assert rt.heartbeat().journal_issues_total == 0


async def test_an_inject_of_a_kept_fault_id_is_refused(tmp_path: Path) -> None:
    """It would overwrite the kept entry, and a halt's retry could then revert the new fault's plan."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=99))
    Journal(tmp_path).write(entry("e.0"))
    await rt.recover()
    rt.ended.clear()  # its tombstone refuses it too, until it is evicted (4096 ends later) or expires
    ack = decode(await rt.handle_command(inject("e.0")), Ack)
    assert not ack.accepted and ack.reason == "fault id e.0 has a journal entry this agent keeps unreverted"
    assert "e.0" not in rt.faults and rt.journal.fault_ids() == ["e.0"]


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data, self.subject = data, "faultline.v1.halt"


async def test_a_halt_names_itself_done_only_after_its_retries(tmp_path: Path) -> None:
    """The heartbeat a halt is confirmed from comes after the kept entries' retries."""
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=1))
    Journal(tmp_path).write(entry("stuck.0"))
    await rt.recover()
    gate = asyncio.Event()
    revert = inj.revert

    async def slow_revert(plan: Any, ctx: Any) -> Any:
        await gate.wait()
        return await revert(plan, ctx)

    inj.revert = slow_revert
    halt = Halt(reason="test", issued_by="me")
    await rt._on_halt(FakeMsg(encode(halt)))
    await asyncio.sleep(0.05)
    hb = rt.heartbeat()  # a regular heartbeat meanwhile: not done, entry still listed
    assert halt.id not in hb.halts_done and hb.journal_issues_total == 1
    gate.set()
    await async_wait_until(lambda: halt.id in rt.heartbeat().halts_done, 5, "the halt to be named done")
    assert rt.heartbeat().journal_issues_total == 0 and inj.reverts == 2


async def test_a_failed_revert_is_retried_every_minute_while_the_agent_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cause of a failed revert is often passing (netlink busy, a process the agent may
    signal again). Before, its entry waited for an operator's halt or the next start."""
    monkeypatch.setattr("agent.lifecycle.REVERT_BACKOFF_S", 0.01)
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=3))  # the lifecycle's three attempts fail
    assert decode(await rt.handle_command(inject("e.7")), Ack).accepted
    rec = rt.faults["e.7"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    assert rec.state == "failed" and "e.7.json" in rt.journal_issues
    rt.maybe_retry_kept()
    assert not any(t.get_name() == "kept-retry" for t in rt._tasks), "retried before its minute was up"
    rt._kept_retry_at = time.monotonic()  # a minute later
    rt.maybe_retry_kept()
    await async_wait_until(lambda: "e.7.json" not in rt.journal_issues, 5, "the periodic retry to revert the entry")
    assert inj.reverts == 4
    await async_wait_until(lambda: rt.journal.fault_ids() == [], 3, "the entry to be removed")
    assert rt.heartbeat().ended[-1].reason == "kept journal entry reverted on periodic retry"


async def test_a_retry_reverts_while_the_journal_is_stalled_and_does_not_hold_the_retry_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: a retry read its entry on the journal's thread, behind another fault's
    stalled first write, so it never reverted and held the retry lock for good (every later
    periodic retry skipped, every halt waited)."""
    monkeypatch.setattr("agent.lifecycle.REVERT_BACKOFF_S", 0.01)
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "safety"}, timing={"revert_timeout_s": 1.0})
    inj = FlakyRevert(AgentEnv(node="safety", state_dir=tmp_path, instance_id="t", protected_pids=dict), failures=3)
    rt = AgentRuntime(settings, injectors={"process-pause": inj})
    rt.capabilities = ["process-pause"]
    assert decode(await rt.handle_command(inject("e.8")), Ack).accepted
    rec = rt.faults["e.8"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    await rt.settle_journal(2)
    assert "e.8.json" in rt.journal_issues
    back = stalling_journal(rt)
    try:
        assert decode(await rt.handle_command(inject("e.9")), Ack).accepted  # its first write stalls
        await asyncio.sleep(0.1)
        await asyncio.wait_for(rt.retry_kept("halt"), 4)  # read 1 s at most, the revert, the finish 1 s at most
        assert inj.reverts == 4, "the kept entry was not reverted"
        assert "e.8.json" not in rt.journal_issues and not rt.retry_lock.locked()
    finally:
        back.set()
        if "e.9" in rt.faults:
            rt.faults["e.9"].request_end("test over")
        await rt.settle_journal(2)
