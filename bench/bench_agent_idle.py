"""Idle cost of one real faultline-agent at a 1 s heartbeat. Prints a table; not a test.

    /work/venv/bin/python bench/bench_agent_idle.py [--window 30] [--explain]

Starts a real nats-server (controller.natsserver) and a real agent process
(``python -m agent.main --nats URL --node bench --state-dir TMP
--heartbeat-interval 1``), waits for its "faultline-agent ready" line, then
samples it with psutil once a second for the window: RSS (MB, mean and max)
and CPU (% of one core: mean over the window from cpu_times, and the largest
one-second value). Heartbeats are counted on NATS to show the agent was alive
and beating throughout. SIGTERM at the end; the exit code is reported.

--explain: RSS of a fresh interpreter after importing each of the agent's
heavy dependencies alone, to show what dominates the agent's footprint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import nats
import psutil

from controller.natsserver import NatsServer
from proto.subjects import agent_hb

MB = 1e6
MIB = float(1 << 20)
READY_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parent.parent
EXPLAIN_MODULES = [
    "",  # the bare interpreter
    "asyncio",
    "asyncio, importlib.metadata",  # nats-py looks its own version up this way at import time
    "psutil",
    "uvloop",
    "yaml",
    "nats",
    "pydantic",
    "proto.messages",
    "pyroute2",
    "agent.runtime",
    "agent.faults.process",
    "agent.faults.cpu",
    "agent.faults.memory",
    "agent.faults.network",
    "agent.main",
]


def wait_ready(stream: IO[bytes], timeout_s: float) -> tuple[bool, list[str]]:
    """Read the agent's stderr until its ready line; a reader thread keeps it drained afterwards."""
    ready = threading.Event()
    lines: list[str] = []

    def reader() -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            del lines[:-200]
            if "faultline-agent ready" in line:
                ready.set()

    threading.Thread(target=reader, name="agent-stderr", daemon=True).start()
    return ready.wait(timeout_s), lines


async def count_heartbeats(url: str, node: str, stop: asyncio.Event) -> int:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    seen = 0

    async def on_hb(_msg: object) -> None:
        nonlocal seen
        seen += 1

    await nc.subscribe(agent_hb(node), cb=on_hb)
    await stop.wait()
    await asyncio.wait_for(nc.close(), 5.0)
    return seen


async def sample(proc: psutil.Process, window_s: float) -> tuple[list[float], list[float], float, float]:
    """(rss bytes per second, cpu % per second, mean cpu % over the window, USS bytes at the end)."""
    rss: list[float] = []
    cpu: list[float] = []
    t0 = time.monotonic()
    c0 = sum(proc.cpu_times()[:2])
    last_t, last_c = t0, c0
    for i in range(1, int(window_s) + 1):
        await asyncio.sleep(max(0.0, t0 + i - time.monotonic()))
        now = time.monotonic()
        times = proc.cpu_times()
        c = times.user + times.system
        rss.append(float(proc.memory_info().rss))
        cpu.append(100.0 * (c - last_c) / (now - last_t))
        last_t, last_c = now, c
    mean_cpu = 100.0 * (last_c - c0) / (last_t - t0)
    # USS (private pages) once, after the window: reading smaps costs the agent CPU, so not every second
    uss = float(proc.memory_full_info().uss)
    return rss, cpu, mean_cpu, uss


async def measure(url: str, node: str, pid: int, window_s: float) -> tuple[list[float], list[float], float, float, int]:
    stop = asyncio.Event()
    hb_task = asyncio.create_task(count_heartbeats(url, node, stop), name="heartbeats")
    await asyncio.sleep(1.0)  # let the first heartbeats and the subscription settle
    rss, cpu, mean_cpu, uss = await sample(psutil.Process(pid), window_s)
    stop.set()
    beats = await asyncio.wait_for(hb_task, 10.0)
    return rss, cpu, mean_cpu, uss, beats


def run(window_s: float) -> int:
    state = Path(tempfile.mkdtemp(prefix="faultline-idle-"))
    node = "bench"
    with NatsServer() as server:
        assert server.url is not None
        argv = [sys.executable, "-m", "agent.main", "--nats", server.url, "--node", node]
        argv += ["--state-dir", str(state), "--heartbeat-interval", "1"]
        t_start = time.monotonic()
        agent = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            assert agent.stderr is not None
            ok, lines = wait_ready(agent.stderr, READY_TIMEOUT_S)
            if not ok:
                print("agent did not log ready within", READY_TIMEOUT_S, "s:\n" + "\n".join(lines[-20:]))
                return 1
            ready_s = time.monotonic() - t_start
            rss, cpu, mean_cpu, uss, beats = asyncio.run(measure(server.url, node, agent.pid, window_s))
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            try:
                code = agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                code = agent.wait(timeout=5)
            shutil.rmtree(state, ignore_errors=True)
    print()
    print(
        f"real faultline-agent, heartbeat 1 s, idle {window_s:g} s, psutil every 1 s (Python {sys.version.split()[0]})"
    )
    print()
    print(
        "| RSS mean MiB (MB) | RSS max MiB | USS at end MiB | CPU mean (% core) | CPU max 1 s (% core) "
        "| heartbeats seen | ready after (s) | exit on SIGTERM |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {statistics.fmean(rss) / MIB:.1f} ({statistics.fmean(rss) / MB:.1f}) | {max(rss) / MIB:.1f} "
        f"| {uss / MIB:.1f} | {mean_cpu:.2f} | {max(cpu):.1f} | "
        f"{beats} in {window_s + 1:g} s | {ready_s:.2f} | {code} |"
    )
    print()
    print("targets: RSS <= 40 MB, CPU <= 0.5 % of a core (MiB = 2^20 bytes, MB = 10^6 bytes)")
    print(f"load average (1 min) at end {os.getloadavg()[0]:.2f}; cpus {os.cpu_count()}")
    return 0


def explain() -> None:
    """RSS after importing one module alone, in a fresh interpreter each."""
    print()
    print("| import (alone, fresh interpreter) | RSS (MiB) |")
    print("|---|---:|")
    for mod in EXPLAIN_MODULES:
        # VmRSS from /proc: ru_maxrss would carry this (parent) process's peak across execve
        rss_line = "print([ln for ln in open('/proc/self/status') if ln.startswith('VmRSS')][0].split()[1])"
        code = (f"import {mod}\n" if mod else "") + rss_line
        if "importlib.metadata" in mod:
            code = f"import {mod}\nimportlib.metadata.version('nats-py')\n" + rss_line
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        if out.returncode != 0:
            print(f"| {mod} | import failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        # VmRSS is in kB
        print(f"| {mod or '(bare python)'} | {int(out.stdout.strip()) * 1024 / MIB:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=30.0, help="seconds of idle sampling [30]")
    ap.add_argument("--explain", action="store_true", help="also print RSS per imported dependency")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO))
    code = run(args.window)
    if args.explain:
        with contextlib.suppress(subprocess.TimeoutExpired):
            explain()
    sys.exit(code)


if __name__ == "__main__":
    main()
