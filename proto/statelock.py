"""One agent per state directory: an exclusive lock on STATE_DIR/agent.lock.

A contract between the agent, which holds the lock for its whole life, and
the controller's local mode, which checks it before starting a local agent;
hence here, beside the other shared contracts.

Two agents on one journal would each revert the other's live faults as
"left by a crash" at start, and then fight over the entries. That happens
when a DaemonSet rolls out with surge (the new pod starts before the old one
has stopped) or when two local `faultline run`s share the default state
directory. The agent takes an exclusive flock before its journal recovery
and holds it for the life of the process; the kernel drops it when the
process dies, kill -9 included, so a crash never leaves a stale lock.
A second agent waits for the first to finish stopping (bounded), then goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "agent.lock"
POLL_S = 0.1


class StateDirBusy(RuntimeError):
    """Another agent holds the state directory; str() says which and for how long we waited."""


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False if another process (or another StateLock in this
        one) holds it. The holder's pid is written into the file, for the message of the next."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the pid is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds it, as the holder wrote it ("pid 1234"), or "unknown"."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "unknown"
        return f"pid {text}" if text.isdigit() else "unknown"

    async def acquire(
        self,
        wait_s: float,
        on_wait: Callable[[str], None] | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> bool:
        """Take the lock, waiting up to ``wait_s`` for its holder to let go; StateDirBusy after.
        ``on_wait(holder)`` is called once, when the first attempt finds it held. Returns False,
        not holding it, as soon as ``give_up()`` is true while waiting (a stop asked for)."""
        deadline = time.monotonic() + wait_s
        told = False
        while not self.try_acquire():
            if give_up is not None and give_up():
                return False
            if not told and on_wait is not None:
                on_wait(self.holder())
                told = True
            if time.monotonic() >= deadline:
                raise StateDirBusy(
                    f"{self.path} is held by another faultline-agent ({self.holder()}) after waiting {wait_s:g}s: "
                    "one agent per state directory (give this one its own --state-dir)"
                )
            await asyncio.sleep(POLL_S)
        return True

    def release(self) -> None:
        """Let go (closing the descriptor drops the flock). The file stays: removing it would let
        a third agent lock a new file while a second still waits on the old one."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
