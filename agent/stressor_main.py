"""Stressor child process: ``python -m agent.stressor_main --marker=M --parent-pid=P cpu|memory ...``.

Stdlib only and nothing from the agent package, so it starts fast and its own
RSS stays small (the memory stressor's RSS is what users measure).

Start-up order matters for safety:
1. PR_SET_PDEATHSIG(SIGKILL), then check the parent is still the one named:
   if the agent died between fork and here, exit instead of running orphaned.
2. oom_score_adj = 1000: under pressure the kernel kills a stressor first.
3. SIGSTOP ourselves; the agent moves us into the target cgroup and sends
   SIGCONT, so no work is done outside the cgroup.
4. Work until killed, until --until (the fault's absolute deadline, a
   safety net behind the agent's own timer), or until the agent stops keeping
   us alive (--leash-fd): a frozen agent (SIGSTOP, a debugger, a stalled event
   loop) cannot revert, and its death alone is what PDEATHSIG covers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import select
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
PAGE_BYTES = 4096
CPU_PERIOD_S = 0.1
LEASH_EXIT = 3  # the exit code of a stressor whose agent stopped keeping it alive


class Leash:
    """The agent writes a byte to our pipe every second or so. Nothing for ``limit_s`` (the
    agent is frozen), or the pipe closed (the agent is gone): we end ourselves, LEASH_EXIT."""

    def __init__(self, fd: int | None, limit_s: float) -> None:
        self.fd, self.limit_s = fd, limit_s
        self.last = time.monotonic()
        if fd is not None:
            os.set_blocking(fd, False)

    def check(self) -> None:
        if self.fd is None:
            return
        try:
            while True:
                data = os.read(self.fd, 4096)
                if not data:
                    sys.exit(LEASH_EXIT)  # every writer gone: the agent closed it, or died
                self.last = time.monotonic()
        except BlockingIOError:
            pass
        if time.monotonic() - self.last > self.limit_s:
            sys.exit(LEASH_EXIT)

    def sleep(self, seconds: float) -> None:
        """Sleep, woken by the agent's bytes to check the leash as they come."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.fd is None:
                time.sleep(left)
                return
            select.select([self.fd], [], [], min(left, self.limit_s))


NO_LEASH = Leash(None, 0.0)


def _prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _setup(parent_pid: int, title: str) -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        sys.exit(0)  # the agent is already gone; pdeathsig was set too late to fire
    try:
        _prctl(_PR_SET_NAME, title.encode()[:15])
    except OSError:
        pass
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000\n")
    except OSError:
        pass  # not fatal: the agent's reserve check still bounds what we take
    os.kill(os.getpid(), signal.SIGSTOP)


def _remaining(until: float) -> float:
    return until - time.time() if until > 0 else float("inf")


def run_cpu(load_percent: float, until: float, leash: Leash = NO_LEASH) -> None:
    """Busy for load% of every CPU_PERIOD_S, counted in CPU time actually received.

    Counting CPU time (not wall time) keeps the mean honest when the core is
    contended; the shortfall of one period is carried into the next, bounded
    so a long stall does not turn into a burst.
    """
    share = min(max(load_percent, 0.0), 100.0) / 100.0
    if share >= 1.0:
        while _remaining(until) > 0:
            leash.check()
            for _ in range(200_000):
                pass
        return
    busy_s = share * CPU_PERIOD_S
    carry_s = 0.0
    cpu_clock = time.process_time
    wall_clock = time.monotonic
    next_start = wall_clock()
    while _remaining(until) > 0:
        leash.check()
        period_end = next_start + CPU_PERIOD_S
        target_s = busy_s + carry_s
        c0 = cpu_clock()
        while cpu_clock() - c0 < target_s and wall_clock() < period_end:
            pass
        got_s = cpu_clock() - c0
        carry_s = max(-busy_s / 2, min(busy_s / 2, target_s - got_s))
        now = wall_clock()
        if period_end > now:
            leash.sleep(period_end - now)
            next_start = period_end
        else:
            next_start = now  # fell behind (stopped, or starved): restart the schedule


def _own_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory(size_bytes: int, ramp_s: float, until: float, leash: Leash = NO_LEASH) -> None:
    """Allocate, touch every page (one written byte per 4 KiB), hold.

    The interpreter's own RSS is subtracted so the process as a whole reaches
    the requested size, which is what psutil and the cgroup count.
    """
    baseline = _own_rss_bytes()
    alloc = size_bytes - baseline if size_bytes > 4 * baseline else size_bytes
    alloc = max(PAGE_BYTES, alloc - alloc % PAGE_BYTES)
    region = mmap.mmap(-1, alloc, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Transparent huge pages where the kernel allows them (THP "madvise" or "always"):
    # the kernel then frees 1 GiB at SIGKILL in ~3 ms instead of ~60 ms with 4 KiB
    # pages (measured here), which is most of the revert latency of a memory fault.
    with contextlib.suppress(OSError, AttributeError, ValueError):
        region.madvise(mmap.MADV_HUGEPAGE)
    populate = True
    view = memoryview(region)
    chunk = 16 << 20 if ramp_s <= 0 else max(PAGE_BYTES, (alloc // max(1, int(ramp_s * 20))) // PAGE_BYTES * PAGE_BYTES)
    start = time.monotonic()
    offset = 0
    while offset < alloc and _remaining(until) > 0:
        leash.check()
        end = min(alloc, offset + chunk)
        if populate:
            # One madvise faults the chunk in inside the kernel: 4-8x faster than a page
            # fault per page taken from Python (measured on a VM, 1 GiB: 0.4 s vs 2-3 s).
            try:
                region.madvise(_MADV_POPULATE_WRITE, offset, end - offset)
            except OSError:
                populate = False  # older kernel: the writes below fault the pages in
        part = view[offset:end:PAGE_BYTES]
        part[:] = b"\x01" * len(part)
        offset = end
        if ramp_s > 0:
            due = start + ramp_s * offset / alloc  # linear ramp: bytes touched proportional to time
            delay = due - time.monotonic()
            if delay > 0:
                leash.sleep(delay)
    while _remaining(until) > 0:
        leash.sleep(min(1.0, max(0.01, _remaining(until))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="faultline-stressor")
    parser.add_argument("--marker", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--until", type=float, default=0.0, help="absolute Unix deadline; 0: none")
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--leash-fd", type=int, default=None, help="pipe the agent keeps us alive through")
    parser.add_argument("--leash-s", type=float, default=0.0, help="end after this long without a byte on it")
    sub = parser.add_subparsers(dest="kind", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--load", type=float, required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--size", type=int, required=True)
    mem.add_argument("--ramp", type=float, default=0.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    _setup(args.parent_pid, f"fl-stress-{args.kind}")
    leash = Leash(args.leash_fd, args.leash_s) if args.leash_fd is not None and args.leash_s > 0 else NO_LEASH
    if args.kind == "cpu":
        run_cpu(args.load, args.until, leash)
    else:
        run_memory(args.size, args.ramp, args.until, leash)


if __name__ == "__main__":
    main()
