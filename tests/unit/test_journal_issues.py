"""Journal entries the agent keeps without reverting them are reported, not only logged.

In-process, with fake fault backends (no NATS, no kernel): the journal, the
agent's start-up recovery, a revert that keeps failing, the heartbeat, and the
controller's wording of it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.journal import Journal, JournalEntry
from controller.fleet import NodeView, journal_issue_lines
from controller.fleet_commands import _agent_row
from controller.local import recovery_lines
from proto.codec import decode, encode
from proto.faults import CpuSpec, ProcessPauseSpec
from proto.messages import MAX_JOURNAL_ISSUES, Ack, Heartbeat, JournalIssue
from tests.conftest import async_wait_until
from tests.unit.test_agent_safety import FlakyPlan, FlakyRevert, inject, runtime


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
    entries, unreadable = journal.load()
    assert entries == []
    ((name, why),) = unreadable
    assert name == "torn.0.corrupt" and "unreadable" in why and "set aside as torn.0.corrupt" in why
    assert (journal.dir / "torn.0.corrupt").exists() and not (journal.dir / "torn.0.json").exists()
    # the next start lists it again: it stays visible until someone removes it
    assert journal.load()[1] == [("torn.0.corrupt", "unreadable, set aside at an earlier start")]
    # a second corrupt entry of the same name does not overwrite the first
    (journal.dir / "torn.0.json").write_bytes(b"not json")
    _, unreadable = journal.load()
    assert sorted(n for n, _ in unreadable) == ["torn.0.1.corrupt", "torn.0.corrupt"]
    assert (journal.dir / "torn.0.corrupt").read_bytes().startswith(b'{"fault_id"')


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
    assert hb.journal_issues_total == 3
    assert got["torn.0.corrupt"].problem == "unreadable" and got["torn.0.corrupt"].fault_id is None
    stuck = got["stuck.0.json"]
    assert (stuck.problem, stuck.fault_id, stuck.experiment_id, stuck.kind) == (
        "revert-failed", "stuck.0", "old-exp", "process-pause"
    )  # fmt: skip
    assert "netlink busy" in stuck.reason and "retried at the next start" in stuck.reason
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
    assert local[0] == f"the local agent keeps 2 journal entr(ies) it could not revert ({tmp_path / 'journal'}):"
    assert local[1:3] == lines
    assert "may still be in place" in local[3] and local[4].endswith("agent.log)")
    assert recovery_lines([], tmp_path, hb_with([])) == []
    row = _agent_row(NodeView(hb_with(ISSUES), time.monotonic(), time.time()), time.monotonic())
    assert [i["entry"] for i in row["journal_issues"]] == ["torn.0.corrupt", "e.0.json"]
    assert row["journal_issues_total"] == 2


def test_an_older_agents_heartbeat_has_no_journal_issues() -> None:
    """A 1.2 agent's heartbeat reads with an empty list; a 1.3 heartbeat over the cap is refused."""
    old = hb_with([]).model_dump(exclude={"journal_issues", "journal_issues_total"})
    old["schema_version"] = "1.2"
    hb = decode(encode(Heartbeat.model_validate(old)), Heartbeat)
    assert hb.journal_issues == [] and hb.journal_issues_total == 0
    with pytest.raises(ValueError, match="journal_issues"):
        hb_with(ISSUES * MAX_JOURNAL_ISSUES)


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
