"""The end of an experiment: wait for every fault's end, then revert everywhere.

The final revert is unconditional (an aborted, failed or cancelled run still
reverts): one broadcast reaches every agent at NATS fan-out speed, then a
per-node Revert with its Ack goes to any node whose faults have not all been
seen to end, and the wait for their "reverted" events is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from controller.dispatch import broadcast_revert, revert_experiment
from controller.phase import Phase
from controller.report import AbortInfo

log = logging.getLogger("controller.engine")


class Ending(Phase):
    # provided by ExperimentRunner (and see Phase)
    end_grace_s: float
    revert_wait_s: float
    abort_info: AbortInfo | None
    problems: list[str]
    _finishing: bool
    gave_up: str | None
    revert_broadcast: bool

    if TYPE_CHECKING:
        # Declared for the type checker only: ExperimentRunner defines it.
        def _reconcile_from_heartbeats(self) -> None: ...

    async def _wait_for_end(self) -> None:
        deadline = max((t.expires_at or 0.0) for t in self.tracks.values()) + self.end_grace_s
        while not self.aborted:
            self._reconcile_from_heartbeats()
            if all(t.terminal for t in self.tracks.values()):
                return
            remaining = deadline - time.time()
            if remaining <= 0:
                late = [f"{t.node} {t.fault_id}" for t in self.tracks.values() if not t.terminal]
                self.problems.append(
                    f"no end event within {self.end_grace_s:g}s after the deadline from: {', '.join(late)}"
                )
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass

    async def _finish(self, targets: list[str]) -> None:
        self._finishing = True
        reason = f"abort: {self.abort_info.reason}" if self.abort_info else "experiment ended"
        if self.aborted:
            self.progress(f"{self._t()} reverting on {', '.join(targets)}")
        # Fast path: one broadcast reaches every agent at NATS fan-out speed. Then, for any node
        # whose faults have not all been seen to end, the per-node request with its Ack.
        why = await broadcast_revert(self.nc, self.experiment_id, reason)
        self.revert_broadcast = True
        if why is not None:
            log.warning("%s; reverting node by node", why)
        if self.gave_up:  # a second Ctrl-C: the broadcast is out; the lease lapse does the rest
            return
        # give_up() also cancels this task, but on Python 3.11 a wait_for whose wait completes as
        # the cancel lands returns the result and drops the cancel: the flag is checked too
        end_fast = time.monotonic() + self.broadcast_wait_s
        while time.monotonic() < end_fast and not self.gave_up:
            self._reconcile_from_heartbeats()
            if not any(t.held_by_agent for t in self.tracks.values()):
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(0.1, max(0.0, end_fast - time.monotonic())))
            except TimeoutError:
                pass
        if self.gave_up:
            return
        stragglers = sorted({t.node for t in self.tracks.values() if not t.terminal} | set(self._unheard(targets)))
        results = await revert_experiment(self.nc, stragglers, self.experiment_id, reason) if stragglers else {}
        unreached = [n for n, (ack, _why) in results.items() if ack is None]
        for n in unreached:
            held = [t.fault_id for t in self.tracks.values() if t.node == n and t.held_by_agent]
            if held:
                self.problems.append(
                    f"agent {n} did not acknowledge the revert ({results[n][1]}); if it is alive, its faults "
                    f"{', '.join(held)} end by lease lapse within "
                    f"{self.experiment.spec.abort.lease_timeout_s:g}s or at their deadline; if it died, they "
                    "stay until it starts again (its start reverts what its journal holds)"
                )
        pending = [t for t in self.tracks.values() if t.held_by_agent and t.node not in unreached]
        end = time.monotonic() + self.revert_wait_s
        while pending and time.monotonic() < end and not self.gave_up:
            self._reconcile_from_heartbeats()
            pending = [t for t in pending if not t.terminal]
            if not pending:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(0.5, end - time.monotonic()))
            except TimeoutError:
                pass
            pending = [t for t in pending if not t.terminal]
        if pending and not self.gave_up:  # given up: _gave_up_problem says it
            self.problems.append(
                f"no reverted event within {self.revert_wait_s:g}s for: "
                + ", ".join(f"{t.node} {t.fault_id}" for t in pending)
            )

    def _unheard(self, targets: list[str]) -> list[str]:
        """Targets with a fault whose dispatch never got an answer, or whose start went wrong:
        they get the per-node revert too."""
        return [
            n
            for n in targets
            if n in self.start_unsure or any(t.node == n and t.accepted is None for t in self.tracks.values())
        ]
