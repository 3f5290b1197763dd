"""Whether the kernel's OOM killer ended one memory stressor, told as precisely as the node allows.

A stressor that dies of SIGKILL we did not send was either OOM-killed or killed by someone
else, and the report says which. The node-wide OOM counter cannot tell them apart when an
unrelated OOM kill lands in the same window, so the sources are tried narrowest first:

1. the kernel log (/dev/kmsg, readable as root or with CAP_SYSLOG): the OOM killer logs
   "Killed process PID" for each process it kills, so the answer is about this very pid.
   Used only in the initial PID namespace, where the log's pids are ours (a DaemonSet
   agent has hostPID; a node service and the tests share it);
2. the OOM-kill counter of the cgroup the stressor was placed in (v2 memory.events.local,
   v1 memory.oom_control): a kill of another process of that cgroup can still be counted;
3. the node's counter (/proc/vmstat oom_kill, Linux >= 4.13).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
from collections.abc import Callable

from agent import cgroups

log = logging.getLogger(__name__)

KMSG = "/dev/kmsg"
INIT_PID_NS_INODE = 0xEFFFFFFC  # PROC_PID_INIT_INO: the initial PID namespace's fixed inode
MAX_KMSG_RECORDS = 100_000  # a read is bounded even under a storm of kernel messages
_KILLED = re.compile(rb"Killed process (\d+) ")


def vmstat_oom_kills() -> int | None:
    """Node-wide OOM kill count (Linux >= 4.13)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cgroup_oom_kills(target: cgroups.CgroupTarget) -> int | None:
    """The cgroup's own OOM kill count: v2 memory.events.local (not its descendants), else
    what cgroups.oom_kill_count reads (v2 memory.events, v1 memory.oom_control)."""
    d = target.dirs.get("memory")
    if d is not None and target.versions.get("memory") == "v2":
        with contextlib.suppress(OSError, ValueError):
            for line in (d / "memory.events.local").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return cgroups.oom_kill_count(target)


def in_initial_pid_namespace(ns_link: str = "/proc/self/ns/pid") -> bool:
    try:
        return os.stat(ns_link).st_ino == INIT_PID_NS_INODE
    except OSError:
        return False


class OomWatch:
    """Opened before a stressor starts; asked once the stressor has died of a SIGKILL."""

    LOG_LAG_S = 0.2
    """The kernel counts an OOM kill before its SIGKILL and logs it after: when the counter
    moved and the line is not there yet, the log is read again for up to this long."""

    def __init__(self, target: cgroups.CgroupTarget | None, kmsg: str | None = None) -> None:
        kmsg = kmsg or KMSG
        self._count: Callable[[], int | None] = vmstat_oom_kills
        counter = "the node's OOM kill counter"
        if target is not None and cgroup_oom_kills(target) is not None:
            self._count = functools.partial(cgroup_oom_kills, target)
            counter = f"the OOM kill counter of cgroup {target.path}"
        self._before = self._count()
        self._fd: int | None = None
        self.source = counter
        if in_initial_pid_namespace():
            try:
                fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("%s not readable (%s): OOM kills told from %s", kmsg, exc.strerror, counter)
            else:
                try:
                    os.lseek(fd, 0, os.SEEK_END)  # only what the kernel logs from now on
                except OSError:
                    os.close(fd)
                else:
                    self._fd, self.source = fd, "the kernel log"

    def _counter_moved(self) -> bool:
        """Taken for moved unless the counter proves otherwise (unreadable: a SIGKILL we did not
        send is most likely the OOM killer's)."""
        after = self._count()
        return not (self._before is not None and after is not None and after <= self._before)

    async def killed(self, pid: int) -> bool:
        """Whether the OOM killer killed ``pid`` since the watch opened."""
        if self._fd is None:
            return self._counter_moved()
        if self._logged_kill(pid):
            return True
        if not self._counter_moved():
            return False
        loop = asyncio.get_running_loop()
        until = loop.time() + self.LOG_LAG_S
        while loop.time() < until:  # another process's OOM kill, or this one's line still to come
            await asyncio.sleep(0.01)
            if self._logged_kill(pid):
                return True
        return False

    def _logged_kill(self, pid: int) -> bool:
        if self._fd is None:
            return False
        wanted = str(pid).encode()
        for _ in range(MAX_KMSG_RECORDS):
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return False  # read to the end: no such line yet
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records overwritten before we read them; the next one follows
                log.warning("reading the kernel log failed (%s): OOM kill not confirmed", exc.strerror)
                return False
            if not record:
                return False
            found = _KILLED.search(record.partition(b";")[2])
            if found and found.group(1) == wanted:
                return True
        log.warning("more than %d kernel log records to read: OOM kill not confirmed", MAX_KMSG_RECORDS)
        return False

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
