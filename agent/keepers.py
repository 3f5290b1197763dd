"""The agent's side of its keeper (agent/keeper_main.py, which describes the protocol).

A fault whose effect the kernel holds (a pause's SIGSTOP, a network fault's
qdiscs) is put under the keeper once it is applied. The keeper is one process
for the whole agent, started with the first such fault and told "x" (exit)
when the last one ends. The agent feeds its leash every LEASH_TICK_S while it
guards anything. Before it ends such a fault itself it takes it back ("-") and
waits for the keeper's answer: after that the keeper never touches it, and if
the keeper reverted it first (this agent was frozen) the agent does not revert
it again.

Spawned from the event loop's thread, as stressors are (see agent/faults/stressor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.fdwait import readable
from agent.keeper_main import FAILED, FIRING, KEPT_BACK, MARK, REVERTED

log = logging.getLogger("faultline.agent")

LEASH_TICK_S = 1.0  # as the stressors' leash
LEASH_MIN_S = 5.0
RETIRE_WAIT_S = 2.0  # how long a keeper told "x" is given to exit before it is killed
ANSWER_EXTRA_S = 2.0  # beyond the keeper's own revert bound, for its answer to "-"
QUICK_DEATH_S = 5.0  # a keeper that dies this soon after its start...
QUICK_DEATHS_MAX = 3  # ...this many times in a row is not started again until a new fault comes


def leash_of(lease_timeout_s: float | None) -> float:
    return max(LEASH_MIN_S, lease_timeout_s or 0.0)


@dataclass
class Released:
    """What became of a fault the agent took back from the keeper."""

    by_keeper: bool = False  # the keeper reverted it first: the agent must not revert it again
    measurements: dict[str, Any] | None = None  # what the keeper's revert measured
    note: str | None = None  # a line for the fault's report, when there is something to say


class Keepers:
    """One agent's keeper: started on demand, told of each fault, fed, retired when idle."""

    def __init__(
        self,
        state_dir: str,
        revert_timeout_s: float,
        spawn_task: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
        on_fired: Callable[[str, str], None],
    ) -> None:
        self.state_dir, self.revert_timeout_s = state_dir, revert_timeout_s
        self._spawn_task, self._on_fired = spawn_task, on_fired
        self.guarded: dict[str, float] = {}  # fault id -> its leash, seconds
        self.news: dict[str, tuple[str, str]] = {}  # fault id -> the keeper's last (word, detail) on it
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._quick_deaths = 0
        self._leash: int | None = None  # write end
        self._news: int | None = None  # read end
        self._partial = b""
        self._feeder: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []  # woken by any news, whoever read it

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- what the lifecycle calls ---------------------------------------------------

    def guard(self, fault_id: str, lease_timeout_s: float | None) -> str | None:
        """Put an applied fault under the keeper; None, or why it could not be."""
        self.guarded[fault_id] = leash_of(lease_timeout_s)
        self._quick_deaths = 0  # a new fault: worth another try, whatever happened before
        if not self._alive():
            why = self._replace()  # tells it of every fault guarded, this one too
        elif not self._say(f"+{fault_id} {self.guarded[fault_id]:g}\n"):
            why = "its keeper could not be told of it"
        else:
            why = None
        if why is not None:
            self.guarded.pop(fault_id, None)
            return f"{why}: a frozen agent holds this fault until it thaws or is restarted"
        if self._feeder is None or self._feeder.done():
            self._feeder = self._spawn_task(self._feed(), "keeper-leash")
        return None

    async def release(self, fault_id: str, answer_within_s: float | None = None) -> Released:
        """Take the fault back: the agent ends it itself now. Returns once the keeper has answered
        for it (it will not touch it again, or it reverted it first, or tried); a keeper that does
        not answer within ``answer_within_s`` (default: its own revert bound and a little more)
        is killed, so it can never act on it late. Cancelled while it waits (a stop that ran out
        of time), the fault is the keeper's again: it reverts it when this agent is gone."""
        bound = answer_within_s if answer_within_s is not None else self.revert_timeout_s + ANSWER_EXTRA_S
        end = time.monotonic() + bound
        while fault_id in self.guarded:
            leash, told = self.guarded[fault_id], self._proc
            if not self._say(f"-{fault_id}\n"):
                if self._alive():
                    self._kill()  # it could not be told: it must not act on this fault later
                break
            try:
                answered = await self._answer(fault_id, max(0.0, end - time.monotonic()), told)
            except asyncio.CancelledError:
                self._listen()
                if self.news.get(fault_id, ("", ""))[0] not in (FIRING, REVERTED, FAILED):
                    self._say(f"+{fault_id} {leash:g}\n")  # the keeper's again, for when the agent is gone
                raise
            if answered == "replaced":
                continue  # told a keeper that is gone since; its replacement guards the fault: tell that one
            if answered == "timeout":
                log.warning("keeper (pid %s) did not answer for fault %s: killed", self.pid, fault_id)
                self._kill()
            break
        self.guarded.pop(fault_id, None)
        self._listen()
        word, detail = self.news.pop(fault_id, ("", ""))
        if not self.guarded:
            self._retire()
        elif not self._alive() and self._proc is None:
            self._spawn_task(self._restart(), "keeper-restart")
        if word == REVERTED:
            try:
                measured = json.loads(detail) if detail else {}
            except ValueError:
                measured = {}
            return Released(
                by_keeper=True,
                measurements=measured if isinstance(measured, dict) else {},
                note="reverted by its keeper while the agent was frozen (SIGSTOP, a debugger, a stalled event loop)",
            )
        if word in (FIRING, FAILED):
            why = f": {detail}" if detail else ""
            return Released(note=f"its keeper's revert, while the agent was frozen, failed{why}; reverted by the agent")
        return Released()

    def kill(self) -> None:
        """SIGKILL the keeper and forget what it guarded, reverting nothing: what a container
        runtime does to it when the agent dies. For tests of journal recovery in one process."""
        self.guarded.clear()
        if self._feeder is not None:
            self._feeder.cancel()
        self._kill()

    # -- the process ----------------------------------------------------------------

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._leash is not None

    def _replace(self) -> str | None:
        """A keeper for every fault guarded (the one there was, if any, is dropped: dead, or not
        listening); None, or why there is none."""
        self._drop()
        self._settle_orphans()
        if not self.guarded:
            return None
        if self._quick_deaths >= QUICK_DEATHS_MAX:
            return f"its keeper died within {QUICK_DEATH_S:g} s of its start {self._quick_deaths} times"
        try:
            self._start()
        except OSError as exc:
            return f"no keeper ({exc})"
        lines = "".join(f"+{fid} {leash:g}\n" for fid, leash in self.guarded.items())
        if not self._say(lines):
            return "its keeper could not be told of it"
        return None

    def _start(self) -> None:
        leash_r, leash_w = os.pipe()
        try:
            news_r, news_w = os.pipe()
        except OSError:
            os.close(leash_r)
            os.close(leash_w)
            raise
        argv = [
            sys.executable,
            "-P",  # no working directory on sys.path: a ./agent there must not shadow ours
            "-m",
            "agent.keeper_main",
            f"--mark={MARK}",
            f"--parent-pid={os.getpid()}",
            f"--leash-fd={leash_r}",
            f"--news-fd={news_w}",
            f"--state-dir={self.state_dir}",
            f"--revert-timeout={self.revert_timeout_s:g}",
        ]
        try:
            os.set_blocking(leash_w, False)
            os.set_blocking(news_r, False)
            # its own process group: a Ctrl-C or a signal to the agent's group is not for it
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                process_group=0,
                close_fds=True,
                pass_fds=(leash_r, news_w),
            )
        except BaseException:
            os.close(leash_w)
            os.close(news_r)
            raise
        finally:
            os.close(leash_r)  # the keeper's ends
            os.close(news_w)
        self._proc, self._leash, self._news, self._partial = proc, leash_w, news_r, b""
        self._started_at = time.monotonic()
        log.info("keeper started (pid %d): it reverts pause and network faults should this agent freeze", proc.pid)

    def _say(self, text: str) -> bool:
        if self._leash is None:
            return False
        try:
            os.write(self._leash, text.encode())
            return True
        except OSError as exc:  # full (the keeper is stopped too) or gone
            log.warning("keeper (pid %s) not told %r: %s", self.pid, text.strip()[:80], exc)
            return False

    def _listen(self) -> None:
        """Read the keeper's news; a fault it begins to revert is ended here too (on_fired)."""
        if self._news is None:
            return
        data = b""
        with contextlib.suppress(OSError):  # BlockingIOError: all read; other errors: it is gone
            while chunk := os.read(self._news, 4096):
                data += chunk
        *lines, self._partial = (self._partial + data).split(b"\n")
        if lines:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        for raw in lines:
            word, _, rest = raw.decode(errors="replace").partition(" ")
            fid, _, detail = rest.partition(" ")
            if not fid:
                continue
            if word == KEPT_BACK and self.news.get(fid, ("", ""))[0] in (FIRING, REVERTED, FAILED):
                continue  # its answer to "-" after it acted on the fault: what it did is the news
            self.news[fid] = (word, detail)
            if word == FIRING and fid in self.guarded:
                self._on_fired(fid, "its keeper is reverting it: this agent was frozen")

    async def _answer(self, fault_id: str, timeout_s: float, told: subprocess.Popen[bytes] | None) -> str:
        """Wait for the answer of the keeper ``told`` on the fault: "answered" (k, r or e), "gone"
        (it exited: it will act on nothing any more), "replaced" (another keeper took over, which
        was told of the fault again), or "timeout"."""
        end = time.monotonic() + timeout_s
        while True:
            self._listen()
            if self.news.get(fault_id, ("", ""))[0] in (KEPT_BACK, REVERTED, FAILED):
                return "answered"
            if self._proc is not told:
                return "replaced" if self._proc is not None and fault_id in self.guarded else "gone"
            if told is None or told.poll() is not None:
                self._listen()
                return "gone"
            left = end - time.monotonic()
            if left <= 0 or self._news is None:
                return "timeout"
            # woken by the pipe, or by news another reader took from it (the feeder's tick)
            heard: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(heard)
            try:
                await readable(self._news, min(left, 0.5), also=heard)  # and its exit, twice a second
            finally:
                if heard in self._waiters:
                    self._waiters.remove(heard)

    def _drop(self) -> None:
        """Forget the current keeper process (killing it if it still runs), closing our ends."""
        proc = self._proc
        if proc is not None and proc.poll() is not None and time.monotonic() - self._started_at < QUICK_DEATH_S:
            self._quick_deaths += 1
        self._kill()

    def _settle_orphans(self) -> None:
        """The keeper is gone: what it had begun to revert and not finished (an "f" without its
        "r" or "e") failed, and the agent reverts it; what it finished is done. Neither is told to
        a keeper that replaces it (which would answer for a fault the first one acted on)."""
        self._listen()
        for fid in list(self.guarded):
            word = self.news.get(fid, ("", ""))[0]
            if word == FIRING:
                self.news[fid] = (FAILED, "its keeper ended while it reverted it")
            if word in (FIRING, REVERTED, FAILED):
                del self.guarded[fid]

    def _kill(self) -> None:
        if self._news is not None:
            self._listen()  # its last words first
        proc, self._proc = self._proc, None
        for fd in (self._leash, self._news):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._leash = self._news = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)  # SIGKILLed (or gone already): only the reaping is left

    def _retire(self) -> None:
        """Nothing left to guard: "x", and the process is collected in the background."""
        proc, leash, news = self._proc, self._leash, self._news
        self._proc = self._leash = self._news = None
        if leash is not None:
            with contextlib.suppress(OSError):
                os.write(leash, b"x\n")
            with contextlib.suppress(OSError):
                os.close(leash)
        if proc is not None:
            self._spawn_task(_reap(proc, news), "keeper-reap")
        elif news is not None:
            os.close(news)

    async def _restart(self) -> None:
        if self.guarded and not self._alive():
            why = self._replace()
            if why is not None:
                log.error("no keeper for %d fault(s): %s", len(self.guarded), why)
                self.guarded.clear()

    async def _feed(self) -> None:
        """While anything is guarded: a feed every tick, its news read, a keeper that died
        replaced (and told again of every fault it guarded)."""
        while self.guarded:
            self._listen()
            if self._alive():
                self._say(".\n")
            else:
                code = self._proc.returncode if self._proc is not None else None
                log.warning(
                    "keeper (pid %s) ended (exit %s) while guarding %d fault(s): starting another",
                    self.pid,
                    code,
                    len(self.guarded),
                )
                await self._restart()
            await asyncio.sleep(LEASH_TICK_S)


async def _reap(proc: subprocess.Popen[bytes], news: int | None) -> None:
    """Collect a retired keeper: wait (bounded) for its exit, killing it if it has not gone by then."""
    try:
        if proc.poll() is None and not await _exited(proc.pid, RETIRE_WAIT_S):
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGKILL)
            await _exited(proc.pid, 1.0)
        proc.poll()  # reaped: no zombie left behind
    finally:
        if news is not None:
            with contextlib.suppress(OSError):
                os.close(news)


async def _exited(pid: int, timeout_s: float) -> bool:
    """Whether our (unreaped) child has exited within ``timeout_s``: its pidfd turns readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return await readable(pidfd, timeout_s)  # a pidfd turns readable when its process exits
    finally:
        os.close(pidfd)
