"""Journal entries the agent keeps without having reverted them, and what a halt does about them.

An entry is never dropped unreverted (invariant 4). Three cases keep one: it
is unreadable (set aside as ``*.corrupt``), it is of a kind this agent cannot
revert, or its revert failed (three attempts while running, one at start).
Each is logged and listed in every heartbeat (``Heartbeat.journal_issues``), so
`faultline agents`, `run` and `halt` can say what may still be in place.

A failed revert is retried once a minute while the agent runs (the cause
is often passing: a busy netlink, a process the agent may signal again), so
what it guarded does not wait for an operator. A halt is the operator's
"make everything right, now": it retries every failed revert at once, and
forgets every kept entry whose file an operator has removed. The rest stay
listed; the next start finds again whatever is still on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from agent.config import AgentSettings
from agent.faults.base import FaultContext, Injector
from agent.journal import Journal
from proto.messages import HALTS_REMEMBERED, MAX_JOURNAL_ISSUES, FaultEvent, FaultState, JournalIssue, JournalProblem

log = logging.getLogger("faultline.agent")

KEPT_RETRY_EVERY_S = 60.0  # a failed revert's entry is retried this often while the agent runs


class KeptEntries:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    journal: Journal
    injectors: dict[str, Injector]
    ended: OrderedDict[str, str]
    faults: dict[str, Any]
    stopping: bool
    journal_issues: dict[str, JournalIssue]  # by entry (file name), oldest first
    halts_done: deque[str]  # ids of the latest halts whose reverts and retries are done
    retry_lock: asyncio.Lock
    _kept_retry_at: float  # monotonic time of the next periodic retry (see maybe_retry_kept)

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
        async def settle_journal(self, timeout_s: float) -> None: ...
        def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]: ...

    def keep_journal_issue(
        self,
        entry: str,
        problem: JournalProblem,
        why: str,
        fault_id: str | None = None,
        experiment_id: str | None = None,
        kind: str | None = None,
    ) -> None:
        """A journal entry kept, not reverted: logged, and listed in every heartbeat from now on.
        One issue per entry: a later problem with the same entry replaces the earlier one."""
        why = " ".join(why.split())[:400]  # one line, whatever the exception's text was
        log.error("journal entry %s kept: %s: %s; what it guarded may still be in place", entry, problem, why)
        self.journal_issues.pop(entry, None)
        self.journal_issues[entry] = JournalIssue(
            entry=entry, problem=problem, reason=why, fault_id=fault_id, experiment_id=experiment_id, kind=kind
        )
        if problem == "revert-failed":  # its attempts are just done: the next in a minute
            self._kept_retry_at = time.monotonic() + KEPT_RETRY_EVERY_S

    def maybe_retry_kept(self) -> None:
        """Every heartbeat tick: once a minute, retry the failed reverts (each bounded by
        revert_timeout_s; never beside another retry run, never while stopping)."""
        if not self.journal_issues or self.stopping or time.monotonic() < self._kept_retry_at:
            return
        if self.retry_lock.locked() or not any(i.problem == "revert-failed" for i in self.journal_issues.values()):
            return
        self._kept_retry_at = time.monotonic() + KEPT_RETRY_EVERY_S
        self.spawn(self.retry_kept("periodic retry"), name="kept-retry")

    def keeps_entry_of(self, fault_id: str) -> bool:
        """A kept journal entry of this fault id is on disk: a new fault of that id would overwrite it."""
        return bool(self.journal_issues) and f"{fault_id}.json" in self.journal_issues

    def journal_issues_for_heartbeat(self) -> tuple[list[JournalIssue], int]:
        """The first MAX_JOURNAL_ISSUES kept entries and how many there are in all."""
        if not self.journal_issues:
            return [], 0
        return list(self.journal_issues.values())[:MAX_JOURNAL_ISSUES], len(self.journal_issues)

    def halt_done(self, halt_id: str) -> None:
        self.halts_done.append(halt_id)
        while len(self.halts_done) > HALTS_REMEMBERED:
            self.halts_done.popleft()

    async def retry_kept(self, why: str) -> None:
        """On a halt: forget kept entries an operator removed, and retry every failed revert, all
        at once, each bounded by revert_timeout_s. One run at a time: a second halt waits for the
        first's retries and then has its own (the same entry is never reverted twice at once)."""
        async with self.retry_lock:
            if not self.journal_issues or self.stopping:
                return  # a stop reverts nothing it was not holding; the next start retries
            # the failed revert's bookkeeping first, so a retry's "reverted" lands after it
            await self.settle_journal(self.settings.timing.revert_timeout_s)
            names = list(self.journal_issues)
            gone = await asyncio.to_thread(self._gone, names)
            for name in gone:
                log.warning("journal entry %s was removed by hand: no longer reported", name)
                self.journal_issues.pop(name, None)
            retry = [
                i
                for i in self.journal_issues.values()
                if i.problem == "revert-failed" and i.fault_id is not None and i.fault_id not in self.faults
            ]
            await asyncio.gather(*(self._retry_one(i, why) for i in retry))

    def _gone(self, names: list[str]) -> set[str]:
        """Entries whose file is no longer in the journal directory (none if the directory is gone
        itself: an unmounted state directory says nothing about what was handled)."""
        if not self.journal.dir.is_dir():
            return set()
        return {n for n in names if not (self.journal.dir / n).exists()}

    async def _retry_one(self, issue: JournalIssue, why: str) -> None:
        fid = issue.fault_id
        assert fid is not None  # a revert-failed issue always names its fault
        bound = self.settings.timing.revert_timeout_s
        try:
            # a read takes no journal lock: not queued behind a stalled write on the journal's thread
            entry = await asyncio.wait_for(asyncio.to_thread(self.journal.read, fid), bound)
        except (ValueError, TimeoutError) as exc:
            problem = str(exc) or f"no answer within {bound} s (a stalled state directory?)"
            self.keep_journal_issue(
                issue.entry,
                "revert-failed",
                f"cannot read it at a retry: {problem}",
                fid,
                issue.experiment_id,
                issue.kind,
            )
            return
        inj = self.injectors.get(entry.spec.kind) if entry is not None else None
        if entry is None or inj is None or entry.plan is None or fid in self.faults:
            return  # gone since (the next halt forgets it), or now a live fault's entry: not ours to touch
        ctx = self.make_context(fid, entry.experiment_id, entry.expires_at, entry.pods, recovered=True)
        try:
            m = await asyncio.wait_for(
                inj.revert(inj.load_plan(entry.plan), ctx), self.settings.timing.revert_timeout_s
            )
        except Exception as exc:
            self.keep_journal_issue(
                issue.entry,
                "revert-failed",
                f"revert failed again on {why}: {str(exc) or type(exc).__name__}; entry kept, "
                "retried every minute, at a halt and at the next start",
                fid,
                entry.experiment_id,
                entry.spec.kind,
            )
            return
        if fid in self.faults:
            return  # cannot happen (an Inject of a kept id is refused); never drop a live fault's entry
        # Reverted. The entry's removal is bookkeeping: on a stalled disk it stays queued and
        # lands later (the next retry then finds the file gone), and this run goes on.
        finish = self.journal.off_loop(self.journal.finish, fid, "reverted", entry.expires_at, True)
        try:
            await asyncio.wait_for(asyncio.shield(finish), bound)
        except TimeoutError:
            log.warning("fault %s reverted on %s; its journal entry is removed once the disk answers", fid, why)
        self.journal_issues.pop(issue.entry, None)
        reason = f"kept journal entry reverted on {why}"
        log.warning("fault %s: %s", fid, reason)
        self.remember(self.ended, fid, "reverted")
        self.record_end(fid, entry.experiment_id, entry.spec.kind, "reverted", reason)
        self.publish_event(
            FaultEvent(
                experiment_id=entry.experiment_id,
                fault_id=fid,
                node=self.node,
                kind=entry.spec.kind,
                state="reverted",
                reason=reason,
                measurements=m,
            )
        )
