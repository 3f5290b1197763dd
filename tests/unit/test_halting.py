"""`faultline halt`'s confirmation, from heartbeats fed to a Fleet without NATS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controller.fleet import Fleet
from controller.halting import HaltReport, confirm, render_text, wait_bound_s
from proto.codec import encode
from proto.messages import ActiveFault, EndedFault, Heartbeat, JournalIssue

HALT_ID = "h1"


def beat(
    fleet: Fleet,
    node: str,
    *,
    faults: Any = (),
    ended: Any = (),
    interval_s: float = 0.5,
    done: bool = True,
    kept: Any = (),
    schema: str | None = None,
) -> None:
    """``done``: the heartbeat names the halt as finished (as the one an agent sends when it is)."""
    hb = Heartbeat(
        node=node,
        instance_id="i",
        version="1",
        interval_s=interval_s,
        seq=1,
        started_at=time.time(),
        faults=list(faults),
        ended=list(ended),
        halts_done=[HALT_ID] if done else [],
        journal_issues=list(kept),
        journal_issues_total=len(kept),
    )
    if schema is not None:
        hb = hb.model_copy(update={"schema_version": schema})
    assert fleet.observe(encode(hb)) is not None


def active(fid: str) -> ActiveFault:
    return ActiveFault(
        fault_id=fid, experiment_id="exp-1", kind="process-pause", state="reverting", since=0, expires_at=0
    )


def ended(fid: str, state: str = "reverted", reason: str = "halt: x (by me)") -> EndedFault:
    return EndedFault(
        fault_id=fid, experiment_id="exp-1", kind="process-pause", state=state, reason=reason, at=time.time()
    )


def report(fleet: Fleet, nodes: Any, wait_s: float) -> HaltReport:
    bad = [n for n in nodes if n.result != "clear"]
    return HaltReport(
        url="nats://h:4222", reason="x", issued_by="me", halt_id=HALT_ID, sent_at=time.time(),
        outcome="not-clear" if bad else "clear", agents_seen=len(nodes), wait_s=wait_s, waited_s=wait_s, nodes=nodes,
    )  # fmt: skip


async def test_every_result_kind_and_the_bound() -> None:
    fleet = Fleet(None)
    for n in ("clear", "holding", "failing", "silent"):
        beat(fleet, n, faults=[active(f"{n}.0")])  # before the halt
    await asyncio.sleep(0.01)
    sent_mono, sent_wall = time.monotonic(), time.time()
    await asyncio.sleep(0.01)
    beat(fleet, "clear", ended=[ended("clear.0")])
    beat(fleet, "holding", faults=[active("holding.0")])
    beat(fleet, "failing", ended=[ended("failing.0", "failed", "halt: x; revert failed: tc said no")])
    started = time.monotonic()
    nodes = await confirm(fleet, HALT_ID, sent_mono, sent_wall, wait_s=0.3)
    assert time.monotonic() - started < 0.3 + 2.0, "the wait is not bounded by wait_s"
    by = {n.node: n for n in nodes}
    assert {k: v.result for k, v in by.items()} == {
        "clear": "clear", "failing": "revert-failed", "holding": "holds-faults", "silent": "silent",
    }  # fmt: skip
    assert [e.fault_id for e in by["clear"].ended_since_halt] == ["clear.0"]
    assert by["silent"].heartbeat_after_halt_s is None and by["silent"].active_faults
    lines = render_text(report(fleet, nodes, 0.3))
    assert "clear: clear: 1 fault(s) ended since the halt: clear.0 (process-pause, reverted)" in lines[0]
    assert (
        lines[1] == "failing: NOT CLEAR: revert failed: failing.0 (process-pause): halt: x; revert failed: tc said no"
    )
    assert (
        lines[2]
        == "holding: NOT CLEAR: still holds 1 fault(s) 0.3s after the halt: holding.0 (process-pause, reverting)"
    )
    assert lines[3].startswith("silent: NOT CLEAR: silent: no heartbeat within 0.3s after the halt (last one ")
    assert lines[4] == (
        "halt NOT confirmed on 3 of 4 agent(s) seen: failing (revert-failed), holding (holds-faults), silent (silent)"
    )


async def test_returns_as_soon_as_every_agent_confirmed() -> None:
    fleet = Fleet(None)
    beat(fleet, "a", faults=[active("a.0")])
    sent_mono, sent_wall = time.monotonic(), time.time()

    async def later() -> None:
        await asyncio.sleep(0.1)
        beat(fleet, "a", ended=[ended("a.0")])

    feeder = asyncio.create_task(later(), name="feed-heartbeat")
    started = time.monotonic()
    (node,) = await confirm(fleet, HALT_ID, sent_mono, sent_wall, wait_s=5.0)
    await feeder
    assert node.result == "clear" and time.monotonic() - started < 4.0, "it waited for the bound, not the beat"
    lines = render_text(report(fleet, [node], 5.0))
    assert lines[-2] == "halt confirmed: all 1 agent(s) seen report no active fault"
    assert lines[-1].startswith("  (an agent that sends no heartbeat, frozen or cut off from NATS, is not seen")


async def test_an_end_before_the_halt_is_not_counted() -> None:
    fleet = Fleet(None)
    old = ended("a.0").model_copy(update={"at": time.time() - 60})
    sent_mono, sent_wall = time.monotonic(), time.time()
    await asyncio.sleep(0.01)
    beat(fleet, "a", ended=[old])
    (node,) = await confirm(fleet, HALT_ID, sent_mono, sent_wall, wait_s=1.0)
    assert node.result == "clear" and node.ended_since_halt == []


def test_wait_bound_follows_slow_heartbeats_within_limits() -> None:
    fleet = Fleet(None)
    assert wait_bound_s({}) == 5.0
    beat(fleet, "fast", interval_s=0.5)
    assert wait_bound_s(fleet.nodes()) == 5.0
    beat(fleet, "slow", interval_s=4.0)
    assert wait_bound_s(fleet.nodes()) == 10.0
    beat(fleet, "glacial", interval_s=60.0)
    assert wait_bound_s(fleet.nodes()) == 30.0


KEPT = JournalIssue(
    entry="k.0.json", problem="revert-failed", reason="revert failed again on halt: tc said no; entry kept",
    fault_id="k.0", experiment_id="exp-0", kind="network",
)  # fmt: skip


async def test_only_the_heartbeat_that_names_the_halt_confirms_it() -> None:
    """A regular heartbeat sent while the agent still retries a kept entry lists it: it must not
    decide the result. An agent older than 1.3 names no halt: any later heartbeat confirms."""
    fleet = Fleet(None)
    sent_mono, sent_wall = time.monotonic(), time.time()
    await asyncio.sleep(0.01)
    beat(fleet, "a", kept=[KEPT], done=False)  # mid-retry
    beat(fleet, "old", done=False, schema="1.2")

    async def later() -> None:
        await asyncio.sleep(0.2)
        beat(fleet, "a")  # the retry reverted it

    feeder = asyncio.create_task(later(), name="feed-heartbeat")
    by = {n.node: n for n in await confirm(fleet, HALT_ID, sent_mono, sent_wall, wait_s=5.0)}
    await feeder
    assert by["a"].result == "clear" and by["a"].journal_issues == [], by["a"]
    assert by["old"].result == "clear"


async def test_a_kept_entry_after_the_halt_is_not_clear_and_worse_results_win() -> None:
    fleet = Fleet(None)
    sent_mono, sent_wall = time.monotonic(), time.time()
    await asyncio.sleep(0.01)
    beat(fleet, "kept", kept=[KEPT])
    beat(fleet, "both", kept=[KEPT], ended=[ended("b.0", "failed", "halt: x; revert failed: no")])
    by = {n.node: n for n in await confirm(fleet, HALT_ID, sent_mono, sent_wall, wait_s=0.5)}
    assert by["kept"].result == "journal-kept" and by["kept"].journal_issues == [KEPT]
    assert by["both"].result == "revert-failed"
    lines = render_text(report(fleet, [by["kept"]], 0.5))
    assert lines[0] == (
        "kept: NOT CLEAR: 1 journal entry(ies) kept unreverted after the halt's retries:\n"
        "    k.0 (network, experiment exp-0; k.0.json): revert-failed: revert failed again on halt: tc said no; entry kept"
    )
    assert lines[1] == "halt NOT confirmed on 1 of 1 agent(s) seen: kept (journal-kept)"
    assert lines[2].startswith("  (journal-kept: what such an entry guarded may still be in place")


def test_a_reason_always_fits_the_wire() -> None:
    from controller.fleet_commands import MAX_REASON, fitted_reason
    from proto.messages import Halt

    long = fitted_reason("x" * 600, " (by me@host)")
    assert len(long) == MAX_REASON and long.endswith("… (by me@host)")
    odd = fitted_reason("line one\nline two \udcff")
    assert odd == "line one line two \ufffd"
    Halt(reason=fitted_reason("y" * 10_000), issued_by="me")  # validates


def test_a_restart_is_not_a_duplicate_but_an_instance_that_comes_back_is() -> None:
    def hb(iid: str, state: str = "ready") -> bytes:
        return encode(
            Heartbeat(node="n", instance_id=iid, version="1", interval_s=1.0, seq=1, started_at=1.0, state=state)
        )

    fleet = Fleet(None)
    for data in (hb("a"), hb("a"), hb("b"), hb("b")):  # a restart: a never comes back
        fleet.observe(data)
    assert fleet.duplicate("n") == set()
    fleet.observe(hb("b", "leaving"))  # a graceful restart, then the old id is never seen again either
    fleet.observe(hb("c"))
    assert fleet.duplicate("n") == set()
    fleet.observe(hb("c"))
    fleet.observe(hb("d"))
    fleet.observe(hb("c"))  # two agents under one name: c and d take turns
    assert fleet.duplicate("n") == {"c", "d"}
    fleet.observe(hb("d"))
    assert fleet.duplicate("n") == {"c", "d"}
    assert fleet.duplicate("other") == set()


def test_two_agents_running_side_by_side_are_caught_at_the_first_switch() -> None:
    """A restarted agent counts heartbeats from 1; one far along taking over from an instance
    heard a moment ago was running beside it (caught before a third heartbeat, at any interval)."""

    def hb(iid: str, seq: int, interval_s: float = 5.0) -> bytes:
        return encode(Heartbeat(node="n", instance_id=iid, version="1", interval_s=interval_s, seq=seq, started_at=1.0))

    fleet = Fleet(None)
    fleet.observe(hb("a", 40))
    fleet.observe(hb("b", 1))  # a restart: counts from 1
    assert fleet.duplicate("n") == set()
    fleet.observe(hb("c", 70))  # far along, right after b: it was running all along
    assert fleet.duplicate("n") == {"b", "c"}


async def test_gather_waits_a_little_to_tell_two_new_agents_under_one_name_from_a_restart() -> None:
    """Two agents started together under one name (both count from 1) were missed when the
    1.5-interval window saw each once: that looks like a restart. Seen switching in the window,
    gather waits for the old one to speak again, and a restart costs that wait only."""

    def hb(iid: str, seq: int) -> bytes:
        return encode(Heartbeat(node="n", instance_id=iid, version="1", interval_s=0.2, seq=seq, started_at=1.0))

    fleet = Fleet(None)

    async def first_only_then_b() -> None:
        fleet.observe(hb("a", 1))
        await asyncio.sleep(0.25)
        fleet.observe(hb("b", 1))  # a then b, each once in the window: a restart, or not
        await asyncio.sleep(0.2)  # the window (1.5 intervals = 0.3 s) ends here
        fleet.observe(hb("a", 2))  # a speaks again: two agents

    feeder = asyncio.create_task(first_only_then_b())
    await fleet.gather(min_wait_s=0.3, max_wait_s=2.0)
    assert fleet.duplicate("n") == {"a", "b"}, "gather returned before the old agent could speak again"
    await feeder

    restarted = Fleet(None)
    restarted.observe(hb("x", 7))

    async def restart() -> None:
        await asyncio.sleep(0.05)
        restarted.observe(hb("y", 1))  # x is gone for good

    feeder = asyncio.create_task(restart())
    t0 = time.monotonic()
    await restarted.gather(min_wait_s=0.3, max_wait_s=2.0)
    await feeder
    assert restarted.duplicate("n") == set() and time.monotonic() - t0 < 0.3 + 0.3 + 0.5
