"""Start-up: capability probe, journal recovery and sweep (invariant 4).

Runs before the agent connects to NATS, so a node cut off from the control
plane still reverts what a previous run left behind. Events about recovered
faults are queued and published once connected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from agent.config import AgentSettings
from agent.faults.base import FaultContext, Injector, Plan
from agent.faults_table import merge
from agent.journal import Journal, JournalEntry
from proto.messages import FaultEvent, FaultState, JournalProblem, Measurements

log = logging.getLogger("faultline.agent")


def ids(entry: JournalEntry) -> tuple[str, str, str]:
    """(fault id, experiment id, kind) of a journal entry."""
    return entry.fault_id, entry.experiment_id, entry.spec.kind


class Recovery:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    journal: Journal
    injectors: dict[str, Injector]
    capabilities: list[str]
    capability_notes: dict[str, str]
    ended: OrderedDict[str, str]
    recovered: list[str]
    recovery_done: bool

    if TYPE_CHECKING:
        # Declared for the type checker only: at run time the mixin defines
        # none of these, so AgentRuntime's own methods are the only ones in the MRO.
        def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None: ...
        def publish_event(self, ev: FaultEvent) -> None: ...
        def record_end(
            self, fault_id: str, experiment_id: str, kind: str, state: FaultState, reason: str | None
        ) -> None: ...
        def make_context(
            self, fault_id: str, experiment_id: str, deadline: float, pods: Any, recovered: bool = False
        ) -> FaultContext: ...
        def keep_journal_issue(
            self,
            entry: str,
            problem: JournalProblem,
            why: str,
            fault_id: str | None = None,
            experiment_id: str | None = None,
            kind: str | None = None,
        ) -> None: ...

    async def recover(self) -> None:
        entries, kept = await self.journal.off_loop(self.journal.load)
        for k in kept:
            self.keep_journal_issue(k.name, k.problem, k.reason, k.fault_id, k.experiment_id, k.kind)
        for fid, (ended_state, _) in (await self.journal.off_loop(self.journal.load_ended)).items():
            self.remember(self.ended, fid, ended_state)
        journaled: dict[str, list[Plan]] = {}
        for entry in entries:
            inj = self.injectors.get(entry.spec.kind)
            if inj is None:
                why = f"this agent cannot revert {entry.spec.kind} faults; entry kept"
                self.keep_journal_issue(self.journal.entry_name(entry.fault_id), "unsupported-kind", why, *ids(entry))
                continue
            ctx = self.make_context(entry.fault_id, entry.experiment_id, entry.expires_at, entry.pods, recovered=True)
            m = Measurements(recovered_from_journal=True)
            state: FaultState = "reverted"
            reason = "recovered from journal after restart: reverted"
            try:
                if entry.plan is not None:
                    plan = inj.load_plan(entry.plan)
                    journaled.setdefault(entry.spec.kind, []).append(plan)
                    m = merge(m, await asyncio.wait_for(inj.revert(plan, ctx), self.settings.timing.revert_timeout_s))
                else:
                    reason = "recovered from journal after restart: never applied"
                await self.journal.off_loop(self.journal.finish, entry.fault_id, state, entry.expires_at, True)
            except Exception as exc:
                state, reason = "failed", f"recovery revert failed: {exc}"
                why = f"revert at start failed: {str(exc)[:200]}; entry kept, retried every minute, at a halt and at the next start"
                self.keep_journal_issue(self.journal.entry_name(entry.fault_id), "revert-failed", why, *ids(entry))
            self.remember(self.ended, entry.fault_id, state)
            self.record_end(entry.fault_id, entry.experiment_id, entry.spec.kind, state, reason)
            self.recovered.append(entry.fault_id)
            log.warning("journal recovery: %s %s (%s)", entry.fault_id, state, reason)
            self.publish_event(
                FaultEvent(
                    experiment_id=entry.experiment_id,
                    fault_id=entry.fault_id,
                    node=self.node,
                    kind=entry.spec.kind,
                    state=state,
                    reason=reason,
                    measurements=m,
                )
            )
        for kind, inj in self.injectors.items():
            try:
                lines = await asyncio.wait_for(
                    inj.sweep(journaled.get(kind, [])), self.settings.timing.revert_timeout_s
                )
            except Exception as exc:
                log.error("sweep of %s leftovers failed: %s", kind, exc)
                continue
            for line in lines:
                log.warning("sweep %s: %s", kind, line)
        if not entries:
            log.info("journal recovery: nothing to do")
        self.recovery_done = True

    async def probe(self) -> None:
        caps: list[str] = []
        for kind, inj in self.injectors.items():
            try:
                found = await asyncio.to_thread(inj.probe)
            except Exception as exc:
                log.error("capability probe of %s failed: %s", kind, exc)
                self.capability_notes[kind] = f"probe failed: {exc}"
                continue
            for cap in found:
                if cap.available:
                    caps.append(cap.name)
                elif cap.note:
                    self.capability_notes[cap.name] = cap.note
        self.capabilities = sorted(set(caps))

    # --- NATS ----------------------------------------------------------------
