"""Node load for heartbeats, sampled with psutil without blocking the loop.

CPU percent is computed from our own cpu_times() deltas rather than
psutil.cpu_percent(), whose module-level state would be shared by every
runtime in one process (the benchmarks run a thousand).
"""

from __future__ import annotations

import logging
import os
import time

import psutil

from proto.messages import NodeLoad

log = logging.getLogger("faultline.agent")


class LoadSampler:
    def __init__(self, min_interval_s: float = 0.5) -> None:
        self._min_interval_s = min_interval_s
        self._last_times = psutil.cpu_times()
        self._last_at = 0.0
        self._cached: NodeLoad | None = None
        self._cpu_count = psutil.cpu_count() or 1
        self._failing = False

    def sample(self) -> NodeLoad | None:
        """The node's load now; the last good sample (or None) when /proc cannot be read this time
        (EMFILE, ENOMEM): a heartbeat goes out all the same."""
        now = time.monotonic()
        if self._cached is not None and now - self._last_at < self._min_interval_s:
            return self._cached
        try:
            return self._sample(now)
        except (OSError, psutil.Error) as exc:
            if not self._failing:
                log.warning("node load not readable (%s); heartbeats carry the last sample until it is", exc)
            self._failing = True
            return self._cached

    def _sample(self, now: float) -> NodeLoad:
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
        self._failing = False
        return self._cached
