"""One agent per state directory (proto/statelock.py), and what local mode reads of a recovery."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from controller.local import LocalModeError, check_state_dir_free, recovered_faults, recovery_lines
from proto.messages import EndedFault, Heartbeat
from proto.statelock import StateDirBusy, StateLock


def test_a_second_lock_on_the_same_directory_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    try:
        assert first.try_acquire() and first.held
        assert not second.try_acquire() and not second.held
        assert second.holder() == f"pid {os.getpid()}"
        first.release()
        assert second.try_acquire()
    finally:
        first.release()
        second.release()


async def test_acquire_waits_for_the_holder_and_says_so_once(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    told: list[str] = []
    assert first.try_acquire()
    try:
        asyncio.get_running_loop().call_later(0.3, first.release)
        t0 = time.monotonic()
        await asyncio.wait_for(second.acquire(5.0, on_wait=told.append), 5.0)
        assert second.held and 0.25 <= time.monotonic() - t0 < 2.0
        assert told == [f"pid {os.getpid()}"]
    finally:
        first.release()
        second.release()


async def test_acquire_gives_up_after_its_wait_with_a_reason(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    assert first.try_acquire()
    try:
        with pytest.raises(StateDirBusy, match=r"held by another faultline-agent \(pid \d+\) after waiting 0.3s"):
            await asyncio.wait_for(second.acquire(0.3), 5.0)
        assert not second.held
    finally:
        first.release()


async def test_acquire_gives_up_at_once_when_told_to(tmp_path: Path) -> None:
    """An agent waiting for the lock that gets SIGTERM holds nothing: it leaves without waiting on."""
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    stop = asyncio.Event()
    assert first.try_acquire()
    try:
        asyncio.get_running_loop().call_later(0.2, stop.set)
        t0 = time.monotonic()
        assert await asyncio.wait_for(second.acquire(30.0, give_up=stop.is_set), 5.0) is False
        assert time.monotonic() - t0 < 2.0 and not second.held
    finally:
        first.release()
        second.release()


def test_local_mode_refuses_a_state_directory_in_use(tmp_path: Path) -> None:
    check_state_dir_free(tmp_path)  # free: nothing left held
    held = StateLock(tmp_path)
    assert held.try_acquire()
    try:
        with pytest.raises(LocalModeError, match="another local faultline run is using .*FAULTLINE_STATE_DIR"):
            check_state_dir_free(tmp_path)
    finally:
        held.release()
    check_state_dir_free(tmp_path)


def ended(fid: str, state: str = "reverted", reason: str = "requested: test") -> EndedFault:
    return EndedFault.model_validate(
        {"fault_id": fid, "experiment_id": "e", "kind": "process-pause", "state": state, "reason": reason, "at": 1.0}
    )


def heartbeat(ended_faults: list[EndedFault], recovered: list[str]) -> Heartbeat:
    return Heartbeat.model_validate(
        {"node": "n", "version": "0", "instance_id": "i", "started_at": 1.0, "state": "ready", "seq": 1, "interval_s": 1.0,
         "ended": [e.model_dump() for e in ended_faults], "recovered": recovered}
    )  # fmt: skip


def test_recovery_is_read_from_the_heartbeats_recovered_ids_not_from_reasons(tmp_path: Path) -> None:
    hb = heartbeat(
        [
            ended("old.0", reason="recovered from journal after restart: reverted"),
            ended("old.1", "failed", "recovery revert failed: boom"),
            ended("other.0", reason="recovered from journal: a reason that only looks like one"),
        ],
        recovered=["old.0", "old.1"],
    )
    got = recovered_faults(hb)
    assert [e.fault_id for e in got] == ["old.0", "old.1"]
    lines = recovery_lines(got, tmp_path)
    assert lines[0].startswith("the local agent found 2 fault(s) an earlier run left in its journal")
    assert "old.1 (process-pause, experiment e): failed: recovery revert failed: boom" in lines[2]
    assert any("retries it at its next start" in line for line in lines)
    assert recovery_lines(recovered_faults(heartbeat([ended("x.0")], [])), tmp_path) == []
