"""Journal entries the agent keeps without having reverted them, and what a halt does about them.

An entry is never dropped unreverted (invariant 4). Three cases keep one: it
is unreadable (set aside as ``*.corrupt``), it is of a kind this agent cannot
revert, or its revert failed (three attempts while running, one at start).
Each is logged and listed in every heartbeat (``Heartbeat.journal_issues``), so
`faultline agents`, `run` and `halt` can say what may still be in place.

A halt is the operator's "make everything right, now": it retries every
failed revert (the cause may be fixed by now), and forgets every kept entry
whose file an operator has removed. The rest stay listed until the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from agent.config import AgentSettings
from agent.faults.base import FaultContext, Injector
from agent.journal import Journal
from proto.messages import MAX_JOURNAL_ISSUES, FaultEvent, FaultState, JournalIssue, JournalProblem

log = logging.getLogger("faultline.agent")

MAX_KEPT_IN_MEMORY = 1000
"""Kept entries remembered for retries; beyond it only counted (a heartbeat lists MAX_JOURNAL_ISSUES)."""


class KeptEntries:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    journal: Journal
    injectors: dict[str, Injector]
    ended: OrderedDict[str, str]
    faults: dict[str, Any]
    journal_issues: list[JournalIssue]
    journal_issues_uncounted: int  # kept beyond MAX_KEPT_IN_MEMORY

    if TYPE_CHECKING:
        # Declared for the type checker only (see CommandHandler).
        def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None: ...
        def publish_event(self, ev: FaultEvent) -> None: ...
        def record_end(
            self, fault_id: str, experiment_id: str, kind: str, state: FaultState, reason: str | None
        ) -> None: ...
        def make_context(
            self, fault_id: str, experiment_id: str, deadline: float, pods: Any, recovered: bool = False
        ) -> FaultContext: ...
        async def flush_cleanup(self) -> None: ...

    def keep_journal_issue(
        self,
        entry: str,
        problem: JournalProblem,
        why: str,
        fault_id: str | None = None,
        experiment_id: str | None = None,
        kind: str | None = None,
    ) -> None:
        """A journal entry kept, not reverted: logged, and listed in every heartbeat from now on."""
        log.error("journal entry %s kept: %s: %s; what it guarded may still be in place", entry, problem, why)
        issue = JournalIssue(
            entry=entry, problem=problem, reason=why, fault_id=fault_id, experiment_id=experiment_id, kind=kind
        )
        # one issue per entry: a later problem with the same entry replaces the earlier one
        self.journal_issues = [i for i in self.journal_issues if i.entry != entry]
        if len(self.journal_issues) < MAX_KEPT_IN_MEMORY:
            self.journal_issues.append(issue)
        else:
            self.journal_issues_uncounted += 1

    def journal_issues_for_heartbeat(self) -> tuple[list[JournalIssue], int]:
        """The first MAX_JOURNAL_ISSUES kept entries and how many there are in all."""
        return self.journal_issues[:MAX_JOURNAL_ISSUES], len(self.journal_issues) + self.journal_issues_uncounted

    async def retry_kept(self, why: str) -> None:
        """On a halt: forget kept entries an operator removed, and retry every failed revert. Each
        retry is bounded by revert_timeout_s; all run at once, so the halt's heartbeat is not late."""
        if not self.journal_issues:
            return
        await self.flush_cleanup()  # a failed revert's tombstone is written before a retry's
        gone = await asyncio.to_thread(
            lambda: {i.entry for i in self.journal_issues if not (self.journal.dir / i.entry).exists()}
        )
        for name in gone:
            log.warning("journal entry %s was removed by hand: no longer reported", name)
        self.journal_issues = [i for i in self.journal_issues if i.entry not in gone]
        retry = [i for i in self.journal_issues if i.problem == "revert-failed" and i.fault_id not in self.faults]
        await asyncio.gather(*(self._retry_one(i, why) for i in retry))

    async def _retry_one(self, issue: JournalIssue, why: str) -> None:
        assert issue.fault_id is not None  # a revert-failed issue always names its fault
        try:
            entry = await asyncio.to_thread(self.journal.read, issue.fault_id)
        except ValueError as exc:
            self.keep_journal_issue(issue.entry, "unreadable", f"unreadable at a retry: {exc}", issue.fault_id)
            return
        if entry is None:
            return  # removed between the check and now: retry_kept's next run forgets it
        inj = self.injectors.get(entry.spec.kind)
        if inj is None or entry.plan is None:
            return
        ctx = self.make_context(entry.fault_id, entry.experiment_id, entry.expires_at, entry.pods, recovered=True)
        try:
            m = await asyncio.wait_for(
                inj.revert(inj.load_plan(entry.plan), ctx), self.settings.timing.revert_timeout_s
            )
        except Exception as exc:
            self.keep_journal_issue(
                issue.entry,
                "revert-failed",
                f"revert failed again on {why}: {str(exc)[:200] or type(exc).__name__}; entry kept, "
                "retried at the next start or halt",
                entry.fault_id,
                entry.experiment_id,
                entry.spec.kind,
            )
            return
        await asyncio.to_thread(self.journal.finish, entry.fault_id, "reverted", entry.expires_at, True)
        self.journal_issues = [i for i in self.journal_issues if i.entry != issue.entry]
        reason = f"kept journal entry reverted on {why}"
        log.warning("fault %s: %s", entry.fault_id, reason)
        self.remember(self.ended, entry.fault_id, "reverted")
        self.record_end(entry.fault_id, entry.experiment_id, entry.spec.kind, "reverted", reason)
        self.publish_event(
            FaultEvent(
                experiment_id=entry.experiment_id,
                fault_id=entry.fault_id,
                node=self.node,
                kind=entry.spec.kind,
                state="reverted",
                reason=reason,
                measurements=m,
            )
        )
