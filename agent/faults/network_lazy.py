"""The network fault kind, loaded only when a network fault needs it.

pyroute2 and the netlink code add about 11 MB to an agent's resident memory.
An idle agent needs only two things from them: what the kernel can do, and a
sweep of leftovers at start. Both run in a short-lived child process
(`python -m agent.netlink.startup`); the real injector (agent.faults.network)
is imported on the first network fault, or at start when the journal holds
one to revert.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

from agent.faults.base import Capability, Plan
from agent.faults.lazy import LazyInjector

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0


class LazyNetworkFault(LazyInjector):
    kind = "network"
    real = "agent.faults.network:NetworkFault"
    kept = True  # as NetworkFault's

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self._caps: list[Capability] | None = None
        self._swept: list[str] = []

    def _on_load(self, real: Any) -> None:
        if self._caps is not None:
            real._caps = {c.name: c for c in self._caps}  # probed already: not again

    def probe(self) -> list[Capability]:
        argv = [sys.executable, "-P", "-m", "agent.netlink.startup"]  # -P: see stressor.spawn
        try:
            out = subprocess.run(argv, capture_output=True, timeout=STARTUP_TIMEOUT_S, check=True, text=True)
            data = json.loads(out.stdout)
            self._caps = [
                Capability(str(n), bool(a), str(note) if note else None) for n, a, note in data["capabilities"]
            ]
            self._swept = [str(line) for line in data["swept"]]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
            stderr = getattr(exc, "stderr", "") or ""
            log.warning("network start-up child failed (%s %s); probing in-process", exc, stderr[-300:])
            self._caps = self._load().probe()
        return list(self._caps)

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        swept, self._swept = self._swept, []
        if journaled or self.loaded:
            swept += await self._load().sweep(journaled)
        return swept
