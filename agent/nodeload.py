"""Node load for heartbeats, sampled with psutil without blocking the loop.

CPU percent is computed from our own cpu_times() deltas rather than
psutil.cpu_percent(), whose module-level state would be shared by every
runtime in one process (the benchmarks run a thousand).
"""

from __future__ import annotations

import os
import time

import psutil

from proto.messages import NodeLoad


class LoadSampler:
    def __init__(self, min_interval_s: float = 0.5) -> None:
        self._min_interval_s = min_interval_s
        self._last_times = psutil.cpu_times()
        self._last_at = 0.0
        self._cached: NodeLoad | None = None
        self._cpu_count = psutil.cpu_count() or 1

    def sample(self) -> NodeLoad:
        now = time.monotonic()
        if self._cached is not None and now - self._last_at < self._min_interval_s:
            return self._cached
        times = psutil.cpu_times()
        busy_now = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        last = self._last_times
        busy_then = sum(last) - last.idle - getattr(last, "iowait", 0.0)
        total = sum(times) - sum(last)
        cpu = max(0.0, min(100.0, 100.0 * (busy_now - busy_then) / total)) if total > 0 else 0.0
        self._last_times = times
        vm = psutil.virtual_memory()
        self._cached = NodeLoad(
            cpu_percent=round(cpu, 1),
            cpu_count=self._cpu_count,
            memory_total_bytes=vm.total,
            memory_available_bytes=vm.available,
            memory_percent=vm.percent,
            load1=round(os.getloadavg()[0], 2),
        )
        self._last_at = now
        return self._cached
