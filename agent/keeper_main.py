"""Keeper child process: ``python -m agent.keeper_main --parent-pid=P --leash-fd=N --news-fd=M
--state-dir=D [--revert-timeout=T]``.

A pause or a network fault is held by the kernel, not by a process of ours:
when the agent freezes (SIGSTOP, a debugger, a stalled event loop, a hung
filesystem call), nothing reverts it until the agent thaws or the liveness
probe restarts it. The keeper is one small process beside the agent, running
while the agent holds such faults. The agent tells it on the leash pipe, a
line each:

    + FAULT_ID LEASH_S   guard this fault (applied, and journaled)
    - FAULT_ID           the agent takes it back to end it itself (answered)
    .                    a feed, every second
    x                    nothing left to guard: exit

A fault not fed for its leash (its leaseTimeout, at least 5 s) is reverted from
its journal entry: the agent is frozen. When the pipe closes without "x", every
guarded fault is reverted at once: the agent died. The keeper tells the agent
on the news pipe, a line each:

    f FAULT_ID            it reverts the fault now
    r FAULT_ID JSON       reverted (JSON: what the revert measured)
    e FAULT_ID REASON     its revert failed
    k FAULT_ID            the answer to "-": it will not touch that fault again

So the agent ends a fault it put under the keeper only once the keeper has
answered for it (k, r or e; or the keeper is gone): a revert of the keeper's
can never land after the agent's own end of the fault, on whatever came next
(another fault's pause of the same process, another agent's tree on the same
interface). Before each revert it reads what the agent said meanwhile, and a
fault taken back is left alone.

The revert is the agent's own code, run as crash recovery runs it (the
journaled plan, nothing in memory). A thawed agent that hears "r" does not
revert again (the process may have been stopped by someone else since, the
interface taken by another agent); its successor, at start, reverts the
journal entry as always. The keeper never touches the journal.

Stdlib only while it waits (about 11 MiB): the agent's code is imported only
when there is something to revert. One keeper, however many faults: its memory
counts against the agent container's limit.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

DONE = 0  # told "x" (or nothing left to guard and the agent gone): exits
BAD_USAGE = 2
FIRED = 3  # it reverted at least one fault
FIRED_FAILED = 4  # a revert of its failed (that journal entry stays for the agent)

MARK = "faultline-keeper"
# news, keeper -> agent
FIRING = "f"
REVERTED = "r"
FAILED = "e"
KEPT_BACK = "k"


class Keeper:
    def __init__(self, state_dir: str, parent: int, timeout_s: float, news_fd: int | None) -> None:
        self.state_dir, self.parent, self.timeout_s, self.news_fd = state_dir, parent, timeout_s, news_fd
        self.guarded: dict[str, float] = {}  # fault id -> its leash, seconds
        self.last_fed = time.monotonic()
        self.fired = False
        self.failed = False
        self.told_x = False
        self.agent_gone = False
        self._partial = b""
        self._injectors: dict[str, Any] = {}

    # -- the leash ------------------------------------------------------------------

    def take(self, data: bytes) -> None:
        """Lines from the agent."""
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        self.last_fed = time.monotonic()  # any word from the agent is a feed
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line == "x":
                self.told_x = True
            elif line.startswith("+"):
                parts = line[1:].split()
                try:
                    self.guarded[parts[0]] = float(parts[1])
                except (IndexError, ValueError):
                    _say(f"ignored a line it cannot read: {line[:100]!r}")
            elif line.startswith("-"):
                fid = line[1:].strip()
                self.guarded.pop(fid, None)
                self._tell(KEPT_BACK, fid)

    def drain(self, fd: int) -> None:
        """Take whatever the agent has said (never blocks); notes an EOF as the agent gone."""
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if not data:
                self.agent_gone = True
                return
            self.take(data)

    def due_in(self) -> float | None:
        if not self.guarded:
            return None
        return self.last_fed + min(self.guarded.values()) - time.monotonic()

    def overdue(self) -> list[str]:
        silent = time.monotonic() - self.last_fed
        return [fid for fid, leash in self.guarded.items() if silent >= leash]

    # -- acting ---------------------------------------------------------------------

    def _tell(self, news: str, fault_id: str, detail: str = "") -> None:
        if self.news_fd is not None:
            line = f"{news} {fault_id} {detail}".rstrip() + "\n"
            try:
                os.write(self.news_fd, line.encode())
            except OSError:
                pass  # the agent is gone or not listening: nobody to tell

    def revert(self, fd: int, fault_ids: list[str], why: str) -> None:
        """Revert each fault still guarded, one at a time, hearing the agent out before each:
        a fault it has taken back meanwhile (it thawed) is its own again."""
        from agent.keeper_revert import revert_entry  # the agent's code: loaded only now

        for fid in fault_ids:
            if not self.agent_gone:
                self.drain(fd)
            if fid not in self.guarded:
                continue
            del self.guarded[fid]
            self._tell(FIRING, fid)
            self.fired = True
            try:
                done = revert_entry(self.state_dir, fid, self.timeout_s, self._injectors)
            except Exception as exc:  # noqa: BLE001 - said; the agent (or its successor) tries again
                self.failed = True
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                self._tell(FAILED, fid, reason)
                _say(f"fault {fid}: {why}; its revert failed: {reason}")
                continue
            self._tell(REVERTED, fid, done.model_dump_json(exclude_none=True))
            _say(f"fault {fid}: {why}; reverted from its journal entry ({done.note or done.resumed_pids})")

    def exit_code(self) -> int:
        return FIRED_FAILED if self.failed else FIRED if self.fired else DONE


def watch(keeper: Keeper, fd: int) -> int:
    """Until told "x", or the agent is gone and everything it left is reverted."""
    os.set_blocking(fd, False)
    while True:
        if keeper.told_x:
            return keeper.exit_code()
        if keeper.agent_gone:  # every writer gone without "x": the agent died
            keeper.revert(fd, list(keeper.guarded), f"the agent (pid {keeper.parent}) is gone")
            return keeper.exit_code()
        due = keeper.due_in()
        if due is not None and due <= 0:
            keeper.drain(fd)  # a word that came just now is a feed: look again
            again = keeper.due_in()
            if keeper.told_x or keeper.agent_gone or again is None or again > 0:
                continue
            late = keeper.overdue()
            keeper.revert(fd, late, f"the agent (pid {keeper.parent}) did not feed its leash: frozen or stalled")
            continue
        try:
            select.select([fd], [], [], due)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        keeper.drain(fd)


def _args(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or not eq:
            raise ValueError(f"unexpected argument {arg!r}")
        out[key[2:]] = value
    for need in ("parent-pid", "leash-fd", "state-dir"):
        if need not in out:
            raise ValueError(f"--{need} is required")
    return out


def _name_self(title: bytes) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, title[:15], 0, 0, 0)  # PR_SET_NAME: "fl-keeper" in ps and top
    except (OSError, AttributeError):
        pass


def _say(line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        sys.stderr.write(f"{stamp} WARNING faultline.keeper: {line}\n")
        sys.stderr.flush()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = _args(sys.argv[1:] if argv is None else argv)
        fd, parent = int(args["leash-fd"]), int(args["parent-pid"])
        timeout_s = float(args.get("revert-timeout", "10"))
        news_fd = int(args["news-fd"]) if "news-fd" in args else None
    except ValueError as exc:
        _say(f"bad arguments: {exc}")
        return BAD_USAGE
    # Only the agent ends a keeper's watch ("x"), or the keeper itself: a signal meant for the
    # agent's process group, or a `pkill faultline`, must not leave a frozen agent's faults unguarded.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _name_self(b"fl-keeper")
    return watch(Keeper(args["state-dir"], parent, timeout_s, news_fd), fd)


if __name__ == "__main__":
    sys.exit(main())
