"""Each fault's lifecycle in the agent: launch, plan, journal, apply, revert, report.

One owned task per fault, from its launch (at acceptance, or at its Start for
an Inject that waits) to its terminal event. Every end path (deadline,
revert, lease lapse, halt, stop) goes through the same revert, so a failed
apply is still reverted (invariant 5); the journal entry is written before
the apply (invariant 4) and dropped in batches after the revert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import AgentSettings
from agent.faults.base import AgentEnv, FaultContext, Injector, Plan
from agent.faults_table import FaultRecord, merge
from agent.journal import Journal
from proto.messages import EndedFault, FaultState, JournalProblem, Measurements

if TYPE_CHECKING:
    from agent.keepers import Keepers

log = logging.getLogger("faultline.agent")

MAX_REMEMBERED = 4096
REVERT_ATTEMPTS = 3
REVERT_BACKOFF_S = 1.0
JOURNAL_CLEANUP_DELAY_S = 0.5
MAX_ENDED_REASON = 500  # characters of an ended fault's reason in heartbeats (its event has it whole)
TOMBSTONE_PRUNE_EVERY_S = 3600.0  # expired tombstones are removed at most this often while running
INJECTING_EVENT_AFTER_S = 0.2  # an injection still going after this long says so ("injecting")
STOP_ANSWER_S = 1.0  # how long a stopping agent waits for its keeper's answer on a fault it takes back


T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float) -> T:
    """``await aw``, or TimeoutError after ``timeout_s``: asyncio.timeout's contract for one
    awaitable. On uvloop asyncio.timeout costs about 7 µs a call, this about 2 (one timer
    handle), and each fault awaits three bounded calls (plan, apply, revert): a fleet-wide
    start or abort pays them on every node at once. As asyncio.timeout, only a cancellation
    of our own becomes TimeoutError; anyone else's passes through."""
    task = asyncio.current_task()
    assert task is not None, "within() runs in a task"
    before = task.cancelling()
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        return await aw
    except asyncio.CancelledError:
        if fired and task.uncancel() <= before:
            raise TimeoutError(f"not done within {timeout_s:g}s") from None
        raise
    finally:
        handle.cancel()


class Lifecycle:
    # provided by AgentRuntime
    settings: AgentSettings
    journal: Journal
    env: AgentEnv
    faults: dict[str, FaultRecord]
    ended: OrderedDict[str, str]
    lease_seen: dict[str, float]
    recent_ended: deque[EndedFault]
    _ended_raw: list[tuple[str, str, str, FaultState, str | None, float]]
    stopping: bool
    _cleanup: list[tuple[str, str, float, bool]]
    _cleanup_timer: asyncio.TimerHandle | None
    _tombstones_pruned_at: float
    _cleanups: set[asyncio.Task[None]]
    keepers: Keepers | None

    if TYPE_CHECKING:
        # Declared for the type checker only (see CommandHandler).
        def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...
        def event(self, rec: FaultRecord, state: FaultState, reason: str | None = None) -> None: ...
        async def send_event(self, rec: FaultRecord, state: FaultState, reason: str | None = None) -> None: ...
        def keep_journal_issue(
            self,
            entry: str,
            problem: JournalProblem,
            why: str,
            fault_id: str | None = None,
            experiment_id: str | None = None,
            kind: str | None = None,
        ) -> None: ...

    def make_context(
        self,
        fault_id: str,
        experiment_id: str,
        deadline: float,
        pods: Any,
        recovered: bool = False,
        lease_timeout_s: float | None = None,
    ) -> FaultContext:
        def emit(state: FaultState, m: Measurements, reason: str | None) -> None:
            rec = self.faults.get(fault_id)
            if rec is not None:
                rec.measurements = merge(rec.measurements, m)
                self.event(rec, state, reason)

        def ending() -> bool:
            rec = self.faults.get(fault_id)
            return rec is not None and rec.ended.is_set()

        return FaultContext(
            fault_id=fault_id,
            experiment_id=experiment_id,
            deadline=deadline,
            pods=pods,
            env=self.env,
            emit=emit,
            recovered=recovered,
            lease_timeout_s=lease_timeout_s,
            ending=ending,
        )

    def arm_deadline(self, rec: FaultRecord) -> None:
        """The fault's own deadline timer (invariant 1), from its acceptance on, waiting or not;
        the watchdog double-checks."""
        rec.timer = asyncio.get_running_loop().call_at(
            rec.deadline_mono, rec.request_end, "deadline reached", "expired"
        )

    def launch(self, rec: FaultRecord) -> None:
        """Start an accepted fault's lifecycle: at once, on its Start, or (ended while it
        waited for its Start) only to report the end, applying nothing. Idempotent."""
        rec.on_end = None
        if rec.task is not None:
            return
        if not rec.ended.is_set():
            rec.set_state("injecting")
        else:
            rec.end_reason = f"{rec.end_reason or 'ended'}; it ended before its start: nothing was applied"
            if rec.end_state == "expired":
                # it never ran: for the experiment that is a fault that failed, not one that expired
                rec.end_state = "failed"
        rec.task = self.spawn(self.lifecycle(rec), name=f"fault:{rec.fault_id}")

    async def lifecycle(self, rec: FaultRecord) -> None:
        inj, ctx, spec = rec.injector, rec.ctx, rec.cmd.spec
        timing = self.settings.timing
        failure: str | None = None
        try:
            if not rec.ended.is_set():  # launch() has set "injecting"
                t0 = time.monotonic()
                # "injecting" is news only when the injection takes a while (a memory ramp, a slow
                # netlink call): one that is done sooner goes straight to "active", with apply_s.
                # At a thousand nodes that is a thousand fewer events for the controller to read.
                slow = asyncio.get_running_loop().call_later(INJECTING_EVENT_AFTER_S, self._still_injecting, rec)
                try:
                    # within(), not wait_for: on Python 3.11 wait_for costs a task per call
                    plan = await within(inj.plan(spec, ctx), timing.revert_timeout_s)
                    rec.plan = plan
                    if await self._journal_before_act(rec, plan) and not rec.ended.is_set():
                        m = await within(inj.apply(spec, plan, ctx), timing.revert_timeout_s)
                        self._journal_narrowed(rec, inj, plan)
                        if inj.kept and not rec.ended.is_set():  # held by the kernel: a keeper beside it
                            m = self._arm_keeper(rec, m)
                        if inj.settles:  # "active" says it has taken effect (a SIGSTOP: once stopped)
                            note = await within(inj.settle(rec.plan or plan, ctx), timing.revert_timeout_s)
                            if note:
                                m = m.model_copy(update={"note": f"{m.note}; {note}" if m.note else note})
                        rec.measurements = merge(rec.measurements, m).model_copy(
                            update={"apply_s": round(time.monotonic() - t0, 4)}
                        )
                        if not rec.ended.is_set():
                            rec.set_state("active")
                            await self.send_event(rec, "active")
                finally:
                    slow.cancel()
        except TimeoutError:
            failure = f"inject timed out after {timing.revert_timeout_s}s"
        except Exception as exc:
            failure = str(exc) or type(exc).__name__
            if not isinstance(exc, self._expected_failures()):
                log.exception("fault %s failed to inject", rec.fault_id)
        if failure is not None:
            log.warning("fault %s failed: %s", rec.fault_id, failure)
            rec.request_end(failure, "failed")
        await rec.ended.wait()
        await self._revert(rec)

    async def _journal_before_act(self, rec: FaultRecord, plan: Plan) -> bool:
        """Journal the plan before acting (invariant 4). False when the fault ended first (a
        revert, a halt, its deadline, a stop) while the write had not returned, as on a stalled
        disk: nothing is applied and the fault ends at once instead of hanging in "injecting"
        with its stop waiting on the disk. The write, still queued on the journal's thread, is
        followed there by this fault's cleanup, which removes the entry whenever it lands."""
        written = self.journal.off_loop(self.journal.write, rec.journal_entry(plan))
        if not written.done():
            woken = asyncio.get_running_loop().create_future()

            def wake(*_: object) -> None:
                if not woken.done():
                    woken.set_result(None)

            written.add_done_callback(wake)
            rec.on_end = wake  # FaultRecord.request_end calls it
            try:
                if not rec.ended.is_set():
                    await woken
            finally:
                rec.on_end = None
                written.remove_done_callback(wake)
            if not written.done():
                log.warning(
                    "fault %s ended (%s) before its journal write returned (a stalled state directory?): "
                    "nothing applied",
                    rec.fault_id,
                    rec.end_reason,
                )
                written.cancel()  # runs nothing if still queued; a write in progress finishes
                rec.end_reason = (
                    f"{rec.end_reason or 'ended'}; it ended before its journal write returned: nothing was applied"
                )
                if rec.end_state == "expired":
                    rec.end_state = "failed"  # it never ran (as a fault ended before its start)
                return False
        try:
            written.result()
        except OSError as exc:
            raise RuntimeError(f"journal write failed, not acting: {exc}") from exc
        return True

    def _journal_narrowed(self, rec: FaultRecord, inj: Injector, plan: Plan) -> None:
        """The apply did less than planned (a pause that found a target stopped by someone else):
        the journal keeps only what it did, so a revert after a crash undoes that and no more.
        Written beside the lifecycle, not in its way: the fault is applied, and a stalled disk
        must not hold up its revert. A write that fails, or comes too late, leaves the first
        entry: a revert from it covers every planned target. One that comes after the fault's
        end has removed the entry writes nothing (Journal.write, replace_only)."""
        try:
            narrowed = inj.applied(plan, rec.ctx)
        except Exception:  # bookkeeping: the fault is applied, and the first entry covers it
            log.exception("fault %s: narrowing its plan failed", rec.fault_id)
            return
        if narrowed is None:
            return
        rec.plan = narrowed
        self.spawn(self._write_narrowed(rec.fault_id, rec.journal_entry(narrowed)), name=f"narrow:{rec.fault_id}")

    async def _write_narrowed(self, fault_id: str, entry: Any) -> None:
        try:
            await self.journal.off_loop(self.journal.write, entry, True)
        except OSError as exc:
            log.warning(
                "fault %s: journal not narrowed to what was applied (%s); a revert after a crash covers its whole plan",
                fault_id,
                exc,
            )

    def _still_injecting(self, rec: FaultRecord) -> None:
        self.spawn(self._report_injecting(rec), name="injecting-event")

    async def _report_injecting(self, rec: FaultRecord) -> None:
        # checked and published in one step: an "active" sent meanwhile is never followed by this
        if rec.state == "injecting" and not rec.ended.is_set():
            await self.send_event(rec, "injecting")

    @staticmethod
    def _expected_failures() -> tuple[type[BaseException], ...]:
        from agent.faults.base import Rejected

        return (Rejected,)

    def _arm_keeper(self, rec: FaultRecord, m: Measurements) -> Measurements:
        """Put the applied fault under the agent's keeper (agent/keepers.py), which reverts it from
        its journal entry should this agent freeze or die. Without it (it could not be started)
        the fault goes on, held as before by this agent alone, and its report says so."""
        if self.keepers is None:
            from agent.keepers import Keepers  # loaded with the first pause or network fault, not by an idle agent

            self.keepers = Keepers(
                str(self.settings.state_dir), self.settings.timing.revert_timeout_s, self.spawn, self._kept_fired
            )
        why = self.keepers.guard(rec.fault_id, rec.cmd.lease_timeout_s)
        if why is None:
            rec.kept = True
            return m
        log.warning("fault %s: %s", rec.fault_id, why)
        return m.model_copy(update={"note": f"{m.note}; {why}" if m.note else why})

    def _kept_fired(self, fault_id: str, what: str) -> None:
        """The keeper began to revert the fault (this agent was frozen): it ends here too. Its end
        waits for the keeper's word on it (Keepers.release), and reverts only if the keeper's failed."""
        rec = self.faults.get(fault_id)
        if rec is not None:
            rec.request_end(what)

    async def _revert(self, rec: FaultRecord) -> None:
        released = None
        if rec.kept and self.keepers is not None:
            rec.kept = False
            # taken back from the keeper, which answers for it first: it never acts on it after this
            # (while stopping, briefly: the stop's revert budget must still hold a revert of ours)
            released = await self.keepers.release(rec.fault_id, STOP_ANSWER_S if self.stopping else None)
        rec.set_state("reverting")
        error: str | None = None
        t0 = time.monotonic()
        if released is not None and released.by_keeper:
            # reverted by the keeper while this agent was frozen: not again (the process may have
            # been stopped by someone else since, the interface taken by another agent's fault)
            try:
                rec.measurements = merge(rec.measurements, Measurements.model_validate(released.measurements or {}))
            except ValueError:
                pass  # its figures are a report's detail: the revert itself is done
        elif rec.plan is not None:
            error = await self._revert_with_retries(rec)
        rec.measurements = rec.measurements.model_copy(update={"revert_s": round(time.monotonic() - t0, 4)})
        if released is not None and released.note:
            note, what = rec.measurements.note, released.note
            rec.measurements = rec.measurements.model_copy(update={"note": f"{note}; {what}" if note else what})
        state: FaultState = "failed" if error else rec.end_state
        reason = rec.end_reason or "reverted"
        if error:
            reason = f"{reason}; revert failed: {error}"
        try:
            rec.injector.release(rec.ctx)  # whatever check() set aside for it, also when it never got a plan
        except Exception:  # an injector's bookkeeping must not stop the end of a fault
            log.exception("release of %s failed", rec.fault_id)
        rec.set_state(state)
        if self.faults.get(rec.fault_id) is rec:  # never another record's (the table holds one per id)
            del self.faults[rec.fault_id]
        if not self._holds(rec.experiment_id):
            self.lease_seen.pop(rec.experiment_id, None)  # an agent lives for months: no per-experiment residue
        self.remember(self.ended, rec.fault_id, state)
        self.record_end(rec.fault_id, rec.experiment_id, rec.kind, state, reason)
        # The event first: the system is already back. Dropping the journal entry is
        # bookkeeping, and a crash before it only repeats an idempotent revert at start.
        await self.send_event(rec, state, reason)
        log.info("fault %s %s: %s", rec.fault_id, state, reason)
        # a failed revert keeps its journal entry, listed in every heartbeat and retried (KeptEntries)
        if error:
            self.keep_journal_issue(
                self.journal.entry_name(rec.fault_id),
                "revert-failed",
                f"revert failed: {error[:200]}; entry kept, retried every minute, at a halt and at the next start",
                rec.fault_id,
                rec.experiment_id,
                rec.kind,
            )
        self._queue_cleanup(rec.fault_id, state, rec.cmd.expires_at, not error)
        rec.finished.set()

    def _queue_cleanup(self, fault_id: str, state: str, expires_at: float, remove: bool) -> None:
        """Journal bookkeeping after a revert, batched and a moment later: when a halt or an
        abort ends many faults at once, their reports go out first and the files follow in
        one worker-thread call. Until then the entry stays: a crash in that moment only
        repeats an idempotent revert at start."""
        self._cleanup.append((fault_id, state, expires_at, remove))
        if self.stopping:
            self._start_cleanup()
        elif self._cleanup_timer is None:
            # a timer, not a sleeping task: an abort ending a fault pays for no task
            self._cleanup_timer = asyncio.get_running_loop().call_later(JOURNAL_CLEANUP_DELAY_S, self._start_cleanup)

    def _start_cleanup(self) -> None:
        self._cleanup_timer = None
        if self._cleanup:
            task = self.spawn(self.flush_cleanup(), name="journal-cleanup")
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def settle_journal(self, timeout_s: float) -> None:
        """Finish the journal bookkeeping queued or in flight. A stop waits for it: its tasks are
        cancelled afterwards, and a cancelled worker-thread call that has not started never runs
        (entries of reverted faults would be left for the next start to revert again)."""
        if self._cleanup_timer is not None:
            self._cleanup_timer.cancel()
            self._cleanup_timer = None
        self._start_cleanup()  # what is queued, in a task of its own like the rest
        if self._cleanups:
            # bounded: on a stalled disk a stop still finishes (its last heartbeat, its exit)
            _, late = await asyncio.wait(set(self._cleanups), timeout=timeout_s)
            if late:
                log.error(
                    "journal bookkeeping did not finish within %.1f s (a stalled state directory?); "
                    "entries it did not remove are reverted again at the next start (idempotent)",
                    timeout_s,
                )

    async def flush_cleanup(self) -> None:
        batch, self._cleanup = self._cleanup, []
        if not batch:
            return
        try:
            await self.journal.off_loop(self.journal.finish_many, batch)
        except Exception as exc:  # OSError, or anything else: the task must not die with the batch
            log.error("journal bookkeeping failed (%s); the next start reverts those faults again", exc)
        now = time.monotonic()
        if now >= self._tombstones_pruned_at + TOMBSTONE_PRUNE_EVERY_S:
            self._tombstones_pruned_at = now
            try:
                await self.journal.off_loop(self.journal.load_ended)  # drops the expired ones
            except Exception as exc:
                log.warning("expired tombstones not removed (%s); tried again later", exc)

    async def _revert_with_retries(self, rec: FaultRecord) -> str | None:
        """Revert, retried with backoff: a transient failure (netlink busy, a stressor slow to die)
        must not leave the fault in place until the next start. One attempt while stopping,
        to stay inside the stop bound; the journal keeps what still failed."""
        assert rec.plan is not None
        attempts = 1 if self.stopping else REVERT_ATTEMPTS
        error: str | None = None
        for attempt in range(1, attempts + 1):
            try:
                m = await within(rec.injector.revert(rec.plan, rec.ctx), self.settings.timing.revert_timeout_s)
                rec.measurements = merge(rec.measurements, m)
                return None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                final = attempt == attempts
                log.error(
                    "fault %s: REVERT FAILED (attempt %d of %d): %s%s",
                    rec.fault_id,
                    attempt,
                    attempts,
                    error,
                    " (journal entry kept; retried every minute, at a halt and at the next start)" if final else "",
                )
                if not final:
                    await asyncio.sleep(REVERT_BACKOFF_S * 2 ** (attempt - 1))
        return error

    def record_end(self, fault_id: str, experiment_id: str, kind: str, state: FaultState, reason: str | None) -> None:
        # kept raw; the next heartbeat builds the model (an abort ends a thousand faults at once,
        # and their reports go out first)
        # bounded: heartbeats carry up to 200 of these, and a heartbeat past NATS's max_payload is lost
        if reason is not None and len(reason) > MAX_ENDED_REASON:
            reason = reason[: MAX_ENDED_REASON - 1] + "…"
        self._ended_raw.append((fault_id, experiment_id, kind, state, reason, time.time()))

    def ended_faults(self, since: float) -> list[EndedFault]:
        """Faults that ended after ``since`` (Unix seconds), newest last, for heartbeats."""
        for fault_id, experiment_id, kind, state, reason, at in self._ended_raw:
            self.recent_ended.append(
                EndedFault(fault_id=fault_id, experiment_id=experiment_id, kind=kind, state=state, reason=reason, at=at)
            )
        self._ended_raw.clear()
        return [e for e in self.recent_ended if e.at > since]

    def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_REMEMBERED:
            table.popitem(last=False)

    def end_all(self, reason: str, experiment_id: str | None = None) -> list[FaultRecord]:
        hit = []
        for rec in list(self.faults.values()):
            if experiment_id is None or rec.experiment_id == experiment_id:
                rec.request_end(reason)
                hit.append(rec)
        return hit

    def _holds(self, experiment_id: str) -> bool:
        return any(r.experiment_id == experiment_id for r in self.faults.values())

    def _waits_for_start(self, experiment_id: str) -> bool:
        return any(r.experiment_id == experiment_id and r.waiting for r in self.faults.values())
