"""Processes the agent never touches (invariant 7), each with the reason.

PID 1, the agent itself, its ancestors and descendants (its own stressors),
other faultline agents on the machine, faultline controllers (a run paused by
its own fault would abort blaming an agent, and its leases and aborts would
stop), the NATS server the agent talks to, kernel threads, configured pids,
and anything matching the deny list.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence

import psutil

AGENT_MARKERS = ("faultline-agent", "agent.main")
STRESSOR_MARKER = "faultline-stressor:"
KEEPER_MARKER = "faultline-keeper"  # agent/keepers.py passes --mark=faultline-keeper
CONTROLLER_SCRIPT = "faultline"  # the console script (controller.cli:main)
CONTROLLER_MODULE = "controller.cli"


def is_controller(cmdline: Sequence[str]) -> bool:
    """``faultline ...`` (the script, or an interpreter running it) or ``python -m controller.cli``."""
    head = [os.path.basename(arg) for arg in cmdline[:2]]
    if CONTROLLER_SCRIPT in head:
        return True
    # python [interpreter options] -m controller.cli: -m ends the interpreter's options
    i = 1
    while i < len(cmdline) - 1:
        arg = cmdline[i]
        if arg == "-m":
            return cmdline[i + 1] == CONTROLLER_MODULE
        if not arg.startswith("-") or arg == "-c":
            return False  # a script or -c code: what follows are its arguments
        i += 2 if arg in ("-X", "-W") else 1  # the options that take a value
    return False


def is_kernel_thread(proc: psutil.Process) -> bool:
    # kthreadd is pid 2 and parents every kernel thread; they have no command line
    try:
        return proc.pid == 2 or proc.ppid() == 2
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _listening_pids(ports: Iterable[int]) -> set[int]:
    wanted = set(ports)
    if not wanted:
        return set()
    pids: set[int] = set()
    with contextlib.suppress(psutil.AccessDenied, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in wanted and conn.pid:
                pids.add(conn.pid)
    return pids


def protected_pids(
    control_plane: Sequence[tuple[str, int]] = (),
    extra_pids: Sequence[int] = (),
) -> dict[int, str]:
    """pid -> reason, for every process that must never be signalled."""
    me = os.getpid()
    out: dict[int, str] = {1: "PID 1 (init)"}
    out[me] = "the faultline agent itself"
    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process(me).parents():
            out.setdefault(parent.pid, "an ancestor of the faultline agent")
        for child in psutil.Process(me).children(recursive=True):
            out.setdefault(child.pid, "a process of the faultline agent (stressor)")
    for pid in _listening_pids(port for _, port in control_plane):
        out.setdefault(pid, "the NATS server the agent is connected to")
    for pid in extra_pids:
        out.setdefault(pid, "on the agent's protected pid list")
    return out


def protection_reason(
    proc: psutil.Process,
    info: dict[str, object],
    protected: dict[int, str],
    deny: Sequence[re.Pattern[str]],
) -> str | None:
    """Why ``proc`` must not be touched, or None. ``info`` is psutil's as_dict subset."""
    pid = proc.pid
    if pid in protected:
        return protected[pid]
    if is_kernel_thread(proc):
        return "a kernel thread"
    name = str(info.get("name") or "")
    raw_cmdline = info.get("cmdline")
    cmdline_list: list[object] = raw_cmdline if isinstance(raw_cmdline, list) else []
    cmdline = " ".join(str(x) for x in cmdline_list)
    if name == "nats-server" or os.path.basename(str(cmdline_list[0]) if cmdline_list else "") == "nats-server":
        return "a NATS server"
    if any(marker in cmdline for marker in AGENT_MARKERS):
        return "a faultline agent"
    if is_controller([str(x) for x in cmdline_list]):
        return "a faultline controller"
    if STRESSOR_MARKER in cmdline:
        # any agent's stressor (also one started after the protected-pid snapshot, or another agent's)
        return "a faultline stressor"
    if KEEPER_MARKER in cmdline:
        return "a faultline keeper"  # any agent's: paused or killed, it would guard nothing
    for pattern in deny:
        if pattern.search(name) or pattern.search(cmdline):
            return f"on the deny list ({pattern.pattern})"
    return None
