"""The agent's side of its keeper (agent/keeper_main.py).

A fault whose effect the kernel holds (a pause's SIGSTOP, a network fault's
qdiscs) is put under the keeper once it is applied. The keeper is one process
for the whole agent, started with the first such fault and told "x" (exit)
when the last one ends. The agent feeds its leash every LEASH_TICK_S while it
guards anything, and takes each fault back ("-") before it reverts it itself.
A fault not fed for its leash (its leaseTimeout, at least LEASH_MIN_S) is
reverted by the keeper from its journal entry: the agent is frozen. When the
agent dies, the keeper reverts everything it guards at once.

Spawned from the event loop's thread, as stressors are (see agent/faults/stressor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from agent.keeper_main import FAILED, FIRING, MARK, REVERTED

log = logging.getLogger("faultline.agent")

LEASH_TICK_S = 1.0  # as the stressors' leash
LEASH_MIN_S = 5.0
RETIRE_WAIT_S = 2.0  # how long a keeper told "x" is given to exit before it is killed


def leash_of(lease_timeout_s: float | None) -> float:
    return max(LEASH_MIN_S, lease_timeout_s or 0.0)


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
        self.news: dict[str, str] = {}  # fault id -> the keeper's last word on it (FIRING, REVERTED, FAILED)
        self._proc: subprocess.Popen[bytes] | None = None
        self._leash: int | None = None  # write end
        self._news: int | None = None  # read end
        self._partial = b""
        self._feeder: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- what the lifecycle calls ---------------------------------------------------

    def guard(self, fault_id: str, lease_timeout_s: float | None) -> str | None:
        """Put an applied fault under the keeper; None, or why it could not be."""
        leash = leash_of(lease_timeout_s)
        try:
            if self._proc is None or self._proc.poll() is not None or self._leash is None:
                self._start()
        except OSError as exc:
            return f"no keeper ({exc}): a frozen agent holds this fault until it thaws or is restarted"
        if not self._say(f"+{fault_id} {leash:g}\n"):
            return "its keeper could not be told of it: a frozen agent holds this fault until it thaws or is restarted"
        self.guarded[fault_id] = leash
        if self._feeder is None or self._feeder.done():
            self._feeder = self._spawn_task(self._feed(), "keeper-leash")
        return None

    def release(self, fault_id: str) -> str | None:
        """The agent reverts the fault itself now: the keeper guards it no more. Returns a line for
        its report when the keeper did more than wait (it reverted it first)."""
        self._listen()
        note = self.what_happened(fault_id)
        if self.guarded.pop(fault_id, None) is not None:
            self._say(f"-{fault_id}\n")
        self.news.pop(fault_id, None)
        if not self.guarded:
            self._retire()
        return note

    def what_happened(self, fault_id: str) -> str | None:
        word = self.news.get(fault_id)
        if word == FAILED:
            return "its keeper tried to revert it while the agent was frozen, and failed"
        if word in (FIRING, REVERTED):
            leash = self.guarded.get(fault_id)
            how_long = f" for {leash:g} s" if leash else ""
            return (
                f"reverted by its keeper first: the agent had not fed it{how_long} "
                "(frozen: SIGSTOP, a debugger, a stalled event loop)"
            )
        return None

    def kill(self) -> None:
        """SIGKILL the keeper and forget what it guarded, reverting nothing: what a container
        runtime does to it when the agent dies. For tests of journal recovery in one process."""
        proc, self._proc = self._proc, None
        self.guarded.clear()
        if self._feeder is not None:
            self._feeder.cancel()
        for fd in (self._leash, self._news):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._leash = self._news = None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait(5)

    # -- the process ----------------------------------------------------------------

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
        log.info("keeper started (pid %d): it reverts pause and network faults should this agent freeze", proc.pid)

    def _say(self, line: str) -> bool:
        if self._leash is None:
            return False
        try:
            os.write(self._leash, line.encode())
            return True
        except OSError as exc:  # full (the keeper is stopped too) or gone: the next tick sees which
            log.warning("keeper (pid %s) not told %r: %s", self.pid, line.strip(), exc)
            return False

    def _listen(self) -> None:
        """Read the keeper's news; a fault it began to revert is ended here too (on_fired)."""
        if self._news is None:
            return
        data = b""
        try:
            while chunk := os.read(self._news, 4096):
                data += chunk
            # every writer gone: it has exited (the next tick starts another if needed)
        except BlockingIOError:
            pass
        except OSError:
            pass
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            word, _, fid = raw.decode(errors="replace").partition(" ")
            if not fid:
                continue
            first = fid not in self.news
            self.news[fid] = word
            if word == FIRING and first and fid in self.guarded:
                self._on_fired(fid, self.what_happened(fid) or "reverted by its keeper")

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

    async def _feed(self) -> None:
        """While anything is guarded: a feed every tick, its news read, a keeper that died
        replaced (and told again of every fault it guarded)."""
        while self.guarded:
            self._say(".\n")
            self._listen()
            if self._proc is not None and self._proc.poll() is not None and self.guarded:
                log.warning(
                    "keeper (pid %d) ended (exit %s) while guarding %d fault(s): starting another",
                    self._proc.pid,
                    self._proc.returncode,
                    len(self.guarded),
                )
                self._listen()
                old = dict(self.guarded)
                self.guarded.clear()
                if self._news is not None:
                    os.close(self._news)
                if self._leash is not None:
                    os.close(self._leash)
                self._proc = self._leash = self._news = None
                for fid, leash in old.items():
                    if self.news.get(fid) is None and self.guard(fid, leash) is not None:
                        log.warning("fault %s: no keeper guards it now", fid)
            await asyncio.sleep(LEASH_TICK_S)


async def _reap(proc: subprocess.Popen[bytes], news: int | None) -> None:
    """Collect a retired keeper: wait (bounded) for its exit, killing it if it has not gone by then
    (one busy with a revert that the agent now does itself)."""
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
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(done, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
