"""The keeper (agent/keeper_main.py, agent/keepers.py): its leash protocol, with a recording
revert in place of the agent's; the process itself, started and retired by the agent's side."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import keeper_main
from agent.keeper_main import FIRED, FIRING, REVERTED, Keeper, watch
from agent.keepers import Keepers
from tests.conftest import async_wait_until


class Recording(Keeper):
    def __init__(self) -> None:
        super().__init__("/nonexistent", parent=1, timeout_s=1.0, news_fd=None)
        self.reverted: list[tuple[float, list[str], str]] = []

    def revert(self, fd: int, fault_ids: list[str], why: str) -> None:
        for fid in fault_ids:
            self.guarded.pop(fid, None)
        self.fired = True
        self.reverted.append((time.monotonic(), list(fault_ids), why))


@pytest.fixture
def leash() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def run_watch(keeper: Keeper, fd: int) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(watch(keeper, fd)), daemon=True)
    t.start()
    return t, code


def test_lines_guard_release_and_exit() -> None:
    k = Recording()
    k.take(b"+a 5\n+b 7.5\n+c")  # a line cut in two is read once whole
    assert k.guarded == {"a": 5.0, "b": 7.5}
    k.take(b" 9\n-a\n.\n+bad x\n")
    assert k.guarded == {"b": 7.5, "c": 9.0} and not k.told_x
    k.take(b"x\n")
    assert k.told_x


def test_a_fault_taken_back_is_answered_and_never_reverted_after(
    leash: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent thawed while the keeper was about to revert: its "-" is read before each revert,
    answered ("k"), and that fault left alone; the other one, still guarded, is reverted."""
    import agent.keeper_revert
    from proto.messages import Measurements

    reverted: list[str] = []

    def fake_revert(state_dir: str, fid: str, timeout_s: float, injectors: object = None) -> Measurements:
        reverted.append(fid)
        return Measurements(resumed_pids=[1])

    monkeypatch.setattr(agent.keeper_revert, "revert_entry", fake_revert)
    news_r, news_w = os.pipe()
    try:
        r, w = leash
        os.set_blocking(r, False)
        k = Keeper("/nonexistent", parent=1, timeout_s=1.0, news_fd=news_w)
        k.take(b"+a 5\n+b 5\n")
        os.write(w, b"-a\n")  # said after the keeper decided to act, before its first revert
        k.revert(r, ["a", "b"], "test")
        assert reverted == ["b"]
        os.set_blocking(news_r, False)
        words = os.read(news_r, 4096).decode().splitlines()
        assert words[0] == "k a" and words[1] == "f b" and words[2].startswith("r b {"), words
    finally:
        os.close(news_r)
        os.close(news_w)


def test_each_fault_is_reverted_at_its_own_leash_once_the_agent_goes_silent(leash: tuple[int, int]) -> None:
    r, w = leash
    k = Recording()
    t0 = time.monotonic()
    os.write(w, b"+short 0.3\n+long 0.8\n")
    thread, code = run_watch(k, r)
    try:
        deadline = time.monotonic() + 5
        while len(k.reverted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [ids for _, ids, _ in k.reverted] == [["short"], ["long"]], k.reverted
        (at_short, _, why), (at_long, _, _) = k.reverted
        assert 0.25 <= at_short - t0 < 0.75, at_short - t0
        assert 0.75 <= at_long - t0 < 1.5, at_long - t0
        assert "did not feed its leash" in why
    finally:
        os.write(w, b"x\n")
        thread.join(5)
    assert code == [FIRED]


def test_feeding_holds_it_off_and_x_ends_it_with_nothing_done(leash: tuple[int, int]) -> None:
    r, w = leash
    k = Recording()
    os.write(w, b"+a 0.3\n")
    thread, code = run_watch(k, r)
    for _ in range(8):  # 0.8 s of feeds, each well inside the 0.3 s leash
        time.sleep(0.1)
        os.write(w, b".\n")
    os.write(w, b"x\n")
    thread.join(5)
    assert k.reverted == [] and code == [keeper_main.DONE]


def test_the_pipe_closing_without_x_reverts_everything_at_once(leash: tuple[int, int]) -> None:
    r, w = leash
    k = Recording()
    os.write(w, b"+a 30\n+b 60\n")
    thread, code = run_watch(k, r)
    time.sleep(0.1)
    os.close(w)  # the agent died: every writer gone
    thread.join(5)
    assert [sorted(ids) for _, ids, _ in k.reverted] == [["a", "b"]]
    assert "is gone" in k.reverted[0][2]
    assert code == [FIRED]


def test_bad_arguments_are_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert keeper_main.main(["--leash-fd=3"]) == keeper_main.BAD_USAGE
    assert "--parent-pid is required" in capsys.readouterr().err
    assert keeper_main.main(["stray"]) == keeper_main.BAD_USAGE


def test_a_fault_with_no_journal_entry_left_is_nothing_to_revert(tmp_path: Path) -> None:
    from agent.keeper_revert import revert_entry

    assert (revert_entry(str(tmp_path), "gone.0", 1.0).note or "").startswith("nothing journaled")


# --- the agent's side, with a real keeper process ------------------------------------


def spawner() -> tuple[set[asyncio.Task[Any]], Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]]:
    """Tasks as the runtime spawns them (the Keepers' feeder, reaping, restarts), kept to be
    awaited or cancelled by the test."""
    tasks: set[asyncio.Task[Any]] = set()

    def spawn_task(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    return tasks, spawn_task


async def test_the_agent_starts_retires_and_replaces_its_keeper(tmp_path: Path) -> None:
    fired: list[tuple[str, str]] = []
    tasks, spawn_task = spawner()
    k = Keepers(str(tmp_path), 1.0, spawn_task, lambda fid, what: fired.append((fid, what)))
    try:
        assert k.guard("a", 30) is None and k.guard("b", 2) is None
        first = psutil.Process(k.pid)  # one keeper for both
        assert k.guarded == {"a": 30.0, "b": 5.0}  # a leash is 5 s at least
        first.kill()  # someone kills it: the next tick starts another and tells it of both
        await async_wait_until(lambda: k.pid not in (None, first.pid), 5, "a new keeper after the first was killed")
        assert set(k.guarded) == {"a", "b"}
        second = psutil.Process(k.pid)
        # a keeper killed just before a new fault comes: the new one is told of all three
        second.kill()
        second.wait(5)
        assert k.guard("c", 2) is None and k.pid not in (None, first.pid, second.pid)
        third = psutil.Process(k.pid)
        assert set(k.guarded) == {"a", "b", "c"}
        released = await k.release("a")  # answered ("k") before it returns
        assert not released.by_keeper and released.note is None and k.pid == third.pid  # still guarding b, c
        assert not (await k.release("b")).by_keeper
        assert not (await k.release("c")).by_keeper and k.pid is None  # nothing left: retired
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert not third.is_running() or third.status() == psutil.STATUS_ZOMBIE
        assert fired == []
    finally:
        for task in list(tasks):
            task.cancel()
        if k.pid is not None:
            psutil.Process(k.pid).kill()


def test_news_words_are_single_letters() -> None:
    # the agent reads "<word> <fault id> [detail]" lines; a fault id never holds a space
    assert {FIRING, REVERTED, keeper_main.FAILED, keeper_main.KEPT_BACK} == {"f", "r", "e", "k"}


async def test_what_the_keeper_did_is_not_hidden_by_its_answer_to_the_take_back(tmp_path: Path) -> None:
    """The keeper reverted the fault (f, r), then answered the thawed agent's "-" (k): read in one
    go, the "k" used to overwrite the "r", and the agent reverted again what the keeper had
    reverted (found by a flaky run of the frozen network test: "nothing left to remove")."""
    fired: list[str] = []
    k = Keepers(str(tmp_path), 1.0, lambda coro, name: asyncio.ensure_future(coro), lambda f, w: fired.append(f))
    news_r, news_w = os.pipe()
    os.set_blocking(news_r, False)
    k._news = news_r  # as a keeper that has just exited leaves it: its words still in the pipe
    k.guarded["a"] = 5.0
    try:
        os.write(news_w, b'f a\nr a {"resumed_pids":[42]}\nk a\n')
        released = await k.release("a")
        assert released.by_keeper and released.measurements == {"resumed_pids": [42]}, released
        assert fired == []  # taken back already: nothing left for on_fired to end
    finally:
        os.close(news_w)


async def test_a_keeper_that_died_mid_revert_leaves_that_fault_to_the_agent(tmp_path: Path) -> None:
    """It said "f A" and died before its "r": the replacement is told of B only (told of A, its
    "k" was taken for the dead one's word and the take-back hung for 12 s, a review found), and
    A's take-back says the keeper's revert failed, so the agent reverts A itself."""
    import subprocess
    import sys

    tasks, spawn_task = spawner()
    k = Keepers(str(tmp_path), 1.0, spawn_task, lambda f, w: None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: ASYNC220 - a process that is gone at once
    await asyncio.to_thread(dead.wait, 10)
    news_r, news_w = os.pipe()
    os.set_blocking(news_r, False)
    os.write(news_w, b"f A\n")
    os.close(news_w)
    k._proc, k._news, k.guarded = dead, news_r, {"A": 5.0, "B": 5.0}
    try:
        await k._restart()
        assert set(k.guarded) == {"B"} and k.pid not in (None, dead.pid), (k.guarded, k.pid)
        released = await asyncio.wait_for(k.release("A"), 3)
        assert not released.by_keeper and "failed" in (released.note or ""), released
        released = await asyncio.wait_for(k.release("B"), 3)  # answered by the new keeper at once
        assert not released.by_keeper and released.note is None, released
        assert k.pid is None  # nothing left: retired
        await asyncio.wait_for(asyncio.gather(*tasks), 5)  # its reaping, the feeder's last tick
    finally:
        for task in list(tasks):
            task.cancel()
        k.kill()


async def test_a_take_back_told_to_a_keeper_killed_meanwhile_does_not_wait_out_its_bound(tmp_path: Path) -> None:
    """A's take-back kills a keeper that does not answer; B's "-" had gone to that same keeper.
    B's take-back must not wait its whole bound and then kill the healthy replacement (a review
    saw e1 end 5 s late and a second keeper killed)."""
    tasks, spawn_task = spawner()
    k = Keepers(str(tmp_path), 1.0, spawn_task, lambda f, w: None)
    try:
        assert k.guard("A", 30) is None and k.guard("B", 30) is None and k.guard("C", 30) is None
        stuck = psutil.Process(k.pid)
        stuck.suspend()  # it cannot answer
        take_a = asyncio.ensure_future(k.release("A", 0.5))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        take_b = asyncio.ensure_future(k.release("B", 10.0))
        assert not (await take_a).by_keeper
        assert not (await asyncio.wait_for(take_b, 5)).by_keeper
        assert time.monotonic() - t0 < 3, "B's take-back waited out its bound"
        await async_wait_until(lambda: k.pid not in (None, stuck.pid), 5, "a keeper for C")
        healthy = k.pid
        assert not (await asyncio.wait_for(k.release("C"), 3)).by_keeper
        assert healthy is not None and k.pid is None  # C answered by the replacement, then retired
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        for task in list(tasks):
            task.cancel()
        k.kill()
