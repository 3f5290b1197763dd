"""The keeper's costs (agent/keepers.py): its start, its memory, and what it adds to the end of
every pause and network fault (the agent takes the fault back and waits for the keeper's
answer before it reverts). Prints a table; not a test.

    python bench/bench_keeper.py [--faults 200]

A real keeper process with the agent's own Keepers class; no fault is applied (the journal
directory is empty), so only the keeper's side is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

import psutil

from agent.keepers import Keepers


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


async def measure(faults: int) -> dict[str, Any]:
    tasks: set[asyncio.Task[Any]] = set()

    def spawn_task(coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    with tempfile.TemporaryDirectory(prefix="fl-bench-keeper-") as state:
        k = Keepers(state, 10.0, spawn_task, lambda _f, _w: None)
        t0 = time.perf_counter()
        assert k.guard("held", 30) is None
        start_ms = (time.perf_counter() - t0) * 1000
        assert k.pid is not None
        proc = psutil.Process(k.pid)
        await asyncio.sleep(1.0)  # its interpreter started and waiting
        rss_mib = proc.memory_info().rss / 2**20
        guard_us: list[float] = []
        release_ms: list[float] = []
        for i in range(faults):
            t = time.perf_counter()
            assert k.guard(f"f{i}", 30) is None
            guard_us.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            await k.release(f"f{i}")
            release_ms.append((time.perf_counter() - t) * 1000)
        rss_after_mib = proc.memory_info().rss / 2**20
        t = time.perf_counter()
        await k.release("held")  # the last one: the keeper is retired ("x")
        await asyncio.to_thread(proc.wait, 5)  # its exit, as the agent's reaping task sees it
        retire_ms = (time.perf_counter() - t) * 1000
        await asyncio.gather(*tasks, return_exceptions=True)  # the feeder's last tick, the reaping
    return {
        "start_ms": start_ms,
        "rss_mib": rss_mib,
        "rss_after_mib": rss_after_mib,
        "guard_us_p50": statistics.median(guard_us),
        "release_ms_p50": statistics.median(release_ms),
        "release_ms_p99": pct(release_ms, 99),
        "release_ms_max": max(release_ms),
        "retire_ms": retire_ms,
        "faults": faults,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=200, help="faults put under the keeper and taken back")
    args = parser.parse_args()
    r = asyncio.run(measure(args.faults))
    print(f"keeper: one process per agent, {r['faults']} faults guarded and taken back one after another\n")
    print(
        "| start (Popen) ms | idle RSS MiB | RSS after MiB | guard µs p50 | take back ms p50 / p99 / max | retire ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['start_ms']:.2f} | {r['rss_mib']:.1f} | {r['rss_after_mib']:.1f} | {r['guard_us_p50']:.0f} | "
        f"{r['release_ms_p50']:.3f} / {r['release_ms_p99']:.3f} / {r['release_ms_max']:.3f} | {r['retire_ms']:.1f} |"
    )
    print(
        "\n(take back: the agent's '-' and the keeper's answer, awaited before every pause or network"
        " fault's revert; retire: 'x' and the keeper's exit, collected)"
    )


if __name__ == "__main__":
    main()
