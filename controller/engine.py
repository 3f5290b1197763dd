"""ExperimentRunner: one experiment from target resolution to report.

resolve targets -> check capabilities (refuse before sending anything) ->
lease publisher + monitor + abort responder -> dispatch every fault to every
target as an Inject that waits for its start (concurrently, bounded, retried)
-> when every target has accepted every fault, one Start for all (broadcast,
then per node for any not seen starting) -> wait for every fault's end ->
final Revert (always, idempotent) -> report. Any abort (heartbeat loss, an
agent leaving or restarting, a rejection, Ctrl-C, `faultline abort`) reverts
on every target.

Two phases make the start all-or-nothing: a target that refuses an Inject or
does not answer it aborts the run before any fault is applied anywhere, and the faults
start together (one broadcast) instead of one after another in dispatch
order; once the Start is out, a node whose start goes wrong aborts the run
like any other failure. Agents older than schema 1.2 cannot wait; their faults
start on acceptance, and the report says so. The start lives in controller/starting.py,
the end and the final revert in controller/ending.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

from controller.ending import Ending
from controller.experiment import Experiment, fault_id, new_experiment_id
from controller.fleet import Fleet, NodeView, duplicate_line
from controller.report import AbortInfo, Outcome, Report
from controller.starting import Starting
from controller.targeting import TargetingError, matching_nodes, select_nodes
from controller.tracking import (
    Plan,
    PreflightError,
    Track,
    capability_refusals,
    heartbeat_timeout_refusal,
    memory_refusals,
)
from proto.codec import DecodeError, decode, encode, peek_id
from proto.messages import TERMINAL_STATES, Ack, FaultEvent, Lease, PodRef, Revert
from proto.subjects import exp_control, exp_events, exp_lease, safe_token

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

LEASE_SLACK_S = 0.25
"""A gap in lease renewals this much short of the leaseTimeout (at most a tenth of it) can still
lapse a lease: delivery takes time too."""
LEASE_BLAME_WINDOW_S = 1.0
"""A renewal gap counts for a lapse reported within leaseTimeout plus this after the gap closed."""


def _left_clean(view: NodeView | None) -> bool:
    return view is not None and view.heartbeat.state == "leaving" and not view.heartbeat.faults


FLAP_FACTOR = 2.0
"""An agent unheard for this many heartbeatTimeouts of the time this controller could read it
(outside its own stalls and NATS outages, each with its grace) aborts the run, however often the
controller's link came and went meanwhile."""
FLAP_WINDOW_FACTOR = 5.0
FLAP_SHARE = 0.5
"""Over the last FLAP_WINDOW_FACTOR heartbeatTimeouts, this controller's own NATS outages, each
with the grace after it (when it cannot judge an agent either), covering more than FLAP_SHARE of
the time abort the run: it cannot watch its agents through such a link. A NATS restart and a
blip afterwards stay well under it; a link reset every second, nearly all blind, does not."""


def _blind_within(
    outages: list[tuple[float, float]], ongoing_since: float | None, now: float, window_s: float, grace_s: float
) -> tuple[float, int]:
    """Seconds of the last ``window_s`` inside an outage or the grace after it (the ongoing one
    included; overlaps counted once), and how many outages."""
    since = now - window_s
    spans = [(a, b + grace_s) for a, b in outages] + ([(ongoing_since, now)] if ongoing_since is not None else [])
    hit = sorted((max(a, since), min(b, now)) for a, b in spans if min(b, now) > since)
    total, reach = 0.0, since
    for a, b in hit:
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total, len(hit)


class BlindSpans:
    """Times this controller could not judge heartbeats because it did not run, each with the
    grace it needs afterwards to read what came meanwhile.

    An agent's silence counts only the time outside them: a stall never blames an agent, and
    stalls that come again and again only postpone, by their own length plus the grace, the
    detection of an agent that is really silent. (Restarting the clock at each return, as
    before, let stalls spaced closer than the heartbeatTimeout hide a silent agent for good.)
    """

    MAX_SPANS = 256

    def __init__(self) -> None:
        self._spans: list[tuple[float, float]] = []  # (start, end), sorted, not overlapping

    def add(self, start: float, end: float) -> None:
        merged: list[tuple[float, float]] = []
        for span in sorted([*self._spans, (start, end)]):  # coalesced, in whatever order they came
            if merged and span[0] <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], span[1]))
            else:
                merged.append(span)
        self._spans = merged[-self.MAX_SPANS :]  # forgetting the oldest only ever credits an agent less

    def judged_s(self, since: float, now: float) -> float:
        """Seconds between ``since`` and ``now`` outside every span."""
        blind = sum(max(0.0, min(end, now) - max(start, since)) for start, end in self._spans)
        return max(0.0, now - since - blind)


class ExperimentRunner(Starting, Ending):
    def __init__(
        self,
        nc: Any,
        fleet: Fleet,
        experiment: Experiment,
        *,
        experiment_id: str | None = None,
        nodes_override: list[str] | None = None,
        rng: random.Random | None = None,
        progress: Progress | None = None,
        dispatch_timeout_s: float = 2.0,
        dispatch_attempts: int = 3,
        end_grace_s: float = 5.0,
        revert_wait_s: float = 5.0,
        broadcast_wait_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.fleet = fleet
        self.experiment = experiment
        self.experiment_id = experiment_id or new_experiment_id(experiment.metadata.name)
        self.nodes_override = nodes_override
        self.rng = rng or random.Random()
        self.progress = progress or (lambda _line: None)
        self.dispatch_timeout_s = dispatch_timeout_s
        self.dispatch_attempts = dispatch_attempts
        self.end_grace_s = end_grace_s
        self.revert_wait_s = revert_wait_s
        self.broadcast_wait_s = broadcast_wait_s
        self.abort_info: AbortInfo | None = None
        self.started_at = time.time()
        self.tracks: dict[tuple[str, str], Track] = {}
        self.problems: list[str] = []
        self.run_notes: list[str] = []  # what the report should say that is no failure
        # lease renewals: when the last went out while connected, and the recent gaps long
        # enough to lapse a lease (see _lease_loop, _controller_lapsed_s)
        self._last_lease_at: float | None = None
        self._lease_gaps: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self.stray_events = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._baseline: dict[str, str] = {}
        self._awaits_start: set[str] = set()  # targets that hold their faults until the Start
        self.start_sent_at: float | None = None
        self.start_unsure: set[str] = set()  # a start refused, unanswered or lost there
        self._plan: Plan | None = None
        self._finishing = False
        self.gave_up: str | None = None  # a second Ctrl-C: report now, do not wait for the reverts
        self.revert_broadcast = False  # the revert broadcast has been sent (or failed to be)
        self._finish_task: asyncio.Future[None] | None = None

    # --- planning (also what --dry-run runs)

    async def plan(self) -> Plan:
        """Resolve targets and check capabilities. Raises TargetingError / PreflightError; sends nothing."""
        spec = self.experiment.spec
        notes: list[str] = []
        pods: dict[str, list[PodRef]] = {}
        if self.nodes_override is not None:
            if spec.targets.pods is not None:
                raise PreflightError("spec.targets.pods: pod targeting needs a Kubernetes fleet (give --nats)")
            missing = [n for n in self.nodes_override if self.fleet.get(n) is None]
            if missing:
                raise TargetingError(f"node {', '.join(missing)} is not in the fleet")
            targets = sorted(self.nodes_override)
        elif spec.targets.pods is not None:
            pods = await _resolve_pods(spec.targets.pods.namespace, spec.targets.pods.labels)
            fleet = {n: labels for n, labels in self.fleet.labels().items() if n in pods}
            if not fleet:
                raise TargetingError(
                    f"no matching agents: the pods matched run on {', '.join(sorted(pods)) or 'no node'}, "
                    "and no agent there sends heartbeats"
                )
            targets = select_nodes(fleet, spec.targets, self.rng)
            pods = {n: pods[n] for n in targets}
            notes.append(f"{sum(len(v) for v in pods.values())} pod(s) on {len(targets)} node(s)")
        else:
            targets = select_nodes(self.fleet.labels(), spec.targets, self.rng)
            matching = matching_nodes(self.fleet.labels(), spec.targets)
            if not spec.targets.nodes and not spec.targets.labels:
                notes.append(
                    f"spec.targets names no nodes and no labels: every agent of the fleet is a candidate "
                    f"({len(matching)} seen)"
                )
            if len(targets) < len(matching):
                notes.append(
                    f"{len(targets)} of {len(matching)} matching node(s) picked at random (mode "
                    f"{spec.targets.mode}); each run, a dry run included, picks again"
                )
        views = {n: v for n in targets if (v := self.fleet.get(n)) is not None}
        for n, v in views.items():
            if v.heartbeat.journal_issues_total:
                notes.append(
                    f"{n} keeps {v.heartbeat.journal_issues_total} journal entry(ies) it has not reverted; "
                    "what they guarded may still be in place (see `faultline agents`)"
                )
        refusals = capability_refusals(list(spec.faults), views) + memory_refusals(list(spec.faults), views)
        refusals += [duplicate_line(n, ids) for n in sorted(views) if (ids := self.fleet.duplicate(n))]
        too_short = heartbeat_timeout_refusal(spec.abort.heartbeat_timeout_s, views)
        if too_short is not None:
            refusals.append(too_short)
        if refusals:
            raise PreflightError("\n".join(refusals))
        self._plan = Plan(targets=targets, pods=pods, notes=notes)
        return self._plan

    # --- abort, from anywhere (signal handler, monitor, control responder)

    def abort(self, reason: str, node: str | None = None) -> None:
        if self.abort_info is None:
            self.abort_info = AbortInfo(reason=reason, at=time.time(), node=node)
            self.progress(f"{self._t()} ABORT: {reason}")
        self._wake.set()

    def give_up(self, why: str) -> None:
        """Stop waiting for the agents (a second Ctrl-C): the revert broadcast still goes out (or
        has), and the report is written now with what is known; the agents revert what is left
        when the lease lapses, since this run stops renewing it."""
        if self.gave_up is not None:
            return
        self.gave_up = why
        self.abort(why)
        # once the revert broadcast is out (before, _finish returns right after sending it)
        if self._finish_task is not None and not self._finish_task.done() and self.revert_broadcast:
            self._finish_task.cancel()

    @property
    def aborted(self) -> bool:
        return self.abort_info is not None

    def _t(self) -> str:
        return f"[+{time.time() - self.started_at:6.2f}s]"

    # --- the run

    async def run(self) -> Report:
        plan = self._plan or await self.plan()
        self.started_at = time.time()
        for n in plan.targets:
            view = self.fleet.get(n)
            if view is not None:
                self._baseline[n] = view.heartbeat.instance_id
                if view.awaits_start:
                    self._awaits_start.add(n)
        for n in plan.targets:
            for i, f in enumerate(self.experiment.spec.faults):
                fid = fault_id(self.experiment_id, i)
                self.tracks[(n, fid)] = Track(n, i, fid, f.kind, f.name, plan.pods.get(n))
        subs = [
            await self.nc.subscribe(exp_events(self.experiment_id), cb=self._on_event),
            await self.nc.subscribe(exp_control(self.experiment_id), cb=self._on_control),
        ]
        self.progress(f"{self._t()} experiment {self.experiment_id}: targets {', '.join(plan.targets)}")
        try:
            # The lease runs before the first Inject: the agent's lease clock starts at acceptance.
            self._spawn(self._lease_loop(), "lease")
            self._spawn(self._monitor_loop(plan.targets), "monitor")
            await self._dispatch_all(plan.targets)
            if not self.aborted:
                await self._wait_for_end()
        except asyncio.CancelledError:
            self.abort("cancelled")
            raise
        finally:
            try:
                # Unconditional: an aborted, failed or cancelled run still reverts (shielded from
                # cancellation). give_up() cancels it on purpose: the report is written at once.
                self._finish_task = asyncio.ensure_future(self._finish(plan.targets))
                try:
                    await asyncio.shield(self._finish_task)
                except asyncio.CancelledError:
                    if not (self.gave_up and self._finish_task.cancelled()):
                        raise
                if self.gave_up:
                    self._gave_up_problem()
            finally:
                # Also when a second Ctrl-C cancels the wait above: the lease must stop now, so
                # the agents' dead-man's switch fires on time instead of after the teardown.
                for t in list(self._tasks):
                    t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sub in subs:
                try:
                    await asyncio.wait_for(sub.unsubscribe(), 2.0)
                except Exception as exc:  # noqa: BLE001 - connection may be gone; nothing to undo
                    log.debug("unsubscribe: %s", exc)
        return self._report(plan)

    def _gave_up_problem(self) -> None:
        held = [f"{t.node} {t.fault_id}" for t in self.tracks.values() if t.held_by_agent or t.accepted is None]
        if held:
            self.problems.append(
                f"{self.gave_up}: stopped waiting with {len(held)} fault(s) not confirmed reverted: "
                f"{', '.join(held[:10])}{' ...' if len(held) > 10 else ''}; the revert was broadcast, and the agents "
                f"revert on their own within leaseTimeout ({self.experiment.spec.abort.lease_timeout_s:g}s) "
                "now that this run no longer renews the lease"
            )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.experiment_id}:{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s died: %r", t.get_name(), t.exception())
                self.abort(f"internal error in {t.get_name()}: {t.exception()!r}")

        task.add_done_callback(done)

    async def _on_event(self, msg: Any) -> None:
        try:
            ev = decode(msg.data, FaultEvent)
        except DecodeError as exc:
            self.stray_events += 1
            log.warning("undecodable event on %s: %s", msg.subject, exc)
            return
        track = self.tracks.get((ev.node, ev.fault_id))
        if track is None:
            self.stray_events += 1
            return
        track.merge(ev.measurements)
        changed = track.move(ev.state, ev.reason)
        self._after_move(track, ev.state, ev.reason, changed, changed or ev.measurements != type(ev.measurements)())

    def _after_move(self, track: Track, state: str, reason: str | None, changed: bool, show: bool) -> None:
        if show:
            detail = f" ({reason})" if reason else ""
            self.progress(f"{self._t()} {track.node} {track.fault_id} ({track.kind}): {state}{detail}")
        if state in ("failed", "rejected") and not self.aborted:
            self.abort(f"agent {track.node}: {track.fault_id} ({track.kind}) {state}: {reason}", node=track.node)
        elif state == "reverted" and changed and not self.aborted and not self._finishing:
            # Nobody here asked for it (halt, lease lapse, an agent stopping): the experiment is not what was planned.
            gap_s = self._controller_lapsed_s() if (reason or "").startswith("lease lapsed") else None
            if (reason or "").startswith("halt: "):
                # `faultline halt`: someone asked every agent to revert; no agent did anything wrong
                self.abort(f"halted: agent {track.node} reverted {track.fault_id} ({reason})")
            elif gap_s is not None:
                # this controller stopped renewing the lease, not the agent doing anything wrong
                self.abort(
                    f"this controller renewed no lease for {gap_s:.1f}s (leaseTimeout "
                    f"{self.experiment.spec.abort.lease_timeout_s:g}s; it did not run, or had no NATS link): "
                    f"agent {track.node} reverted {track.fault_id} on its own ({reason})"
                )
            else:
                self.abort(f"agent {track.node} reverted {track.fault_id} on its own: {reason}", node=track.node)
        self._wake.set()

    def _reconcile_from_heartbeats(self) -> None:
        """Ends the agents report in heartbeats (since 1.1) for faults whose event we missed.

        Events are at-most-once; an event sent while this controller was
        reconnecting is gone, but the agent repeats the outcome in every
        heartbeat for two minutes, so the report still tells the truth.
        """
        for node in {t.node for t in self.tracks.values() if not t.terminal}:
            view = self.fleet.get(node)
            if view is None:
                continue
            for ended in view.heartbeat.ended:
                if ended.experiment_id != self.experiment_id:
                    continue
                track = self.tracks.get((node, ended.fault_id))
                if track is None or track.terminal:
                    continue
                reason = f"{ended.reason or ended.state} (from the agent's heartbeat: its event was missed)"
                changed = track.move(ended.state, reason, at=ended.at)
                self._after_move(track, ended.state, reason, changed, changed)

    async def _on_control(self, msg: Any) -> None:
        """`faultline abort ID` from another process: a Revert sent to the controller."""
        try:
            cmd = decode(msg.data, Revert)
        except DecodeError as exc:
            reply = Ack(in_reply_to=peek_id(msg.data) or "unknown", node="controller", accepted=False, reason=str(exc))
        else:
            self.abort(cmd.reason)  # already says who and why ("aborted from the command line (by ...)")
            # the targets whose abort can be confirmed: not one that left (a last "leaving" heartbeat
            # listing no fault), which will never send another heartbeat
            targets = (
                sorted(n for n in self._plan.targets if not _left_clean(self.fleet.get(n)))
                if self._plan is not None
                else None
            )
            reply = Ack(
                in_reply_to=cmd.id, node="controller", accepted=True, reason="aborting and reverting", targets=targets
            )
        if msg.reply:
            await msg.respond(encode(reply))

    def _controller_lapsed_s(self) -> float | None:
        """The gap in this controller's lease renewals that lapsed an agent's lease just now, if
        there is one: a recent gap (or the one still open) of about the leaseTimeout. Only a gap
        that could have caused the lapse counts, never an older one."""
        lease_s = self.experiment.spec.abort.lease_timeout_s
        now = time.monotonic()
        gaps = [end - start for start, end in self._lease_gaps if now - end <= lease_s + LEASE_BLAME_WINDOW_S]
        if self._last_lease_at is not None:
            gaps.append(now - self._last_lease_at)  # read before the lease loop ran again
        longest = max(gaps, default=0.0)
        return longest if longest >= lease_s - min(LEASE_SLACK_S, 0.1 * lease_s) else None

    async def _lease_loop(self) -> None:
        lease_timeout_s = self.experiment.spec.abort.lease_timeout_s
        interval_s = min(1.0, lease_timeout_s / 3)
        seq = 0
        subject = exp_lease(self.experiment_id)
        while True:
            try:
                await self.nc.publish(subject, encode(Lease(experiment_id=self.experiment_id, seq=seq)))
            except Exception as exc:  # noqa: BLE001 - keep trying: the lease is what keeps faults alive
                log.warning("lease publish failed: %s", exc)
            else:
                # a lease given to a client that is reconnecting may never be sent: not a renewal
                if getattr(self.nc, "is_connected", True):
                    now = time.monotonic()
                    last, self._last_lease_at = self._last_lease_at, now
                    if last is not None and now - last >= lease_timeout_s - LEASE_SLACK_S:
                        self._lease_gaps.append((last, now))
            seq += 1
            # a little jitter, always under the interval, so leases never bunch up late
            await asyncio.sleep(interval_s * self.rng.uniform(0.85, 1.0))

    async def _monitor_loop(self, targets: list[str]) -> None:
        """Automatic abort: a targeted agent silent, leaving, or restarted."""
        hb_timeout_s = self.experiment.spec.abort.heartbeat_timeout_s
        period_s = min(0.1, hb_timeout_s / 10)
        nats_lost_since: float | None = None
        nats_back_at = -math.inf  # heartbeats sent while this controller was cut off were lost, not late
        blind = BlindSpans()
        # the same, with every outage of this controller's own link too (and the grace after it):
        # outside them it could read every heartbeat, so a link that comes and goes faster than the
        # heartbeatTimeout no longer hides a silent agent for good (judged on FLAP_FACTOR x the timeout)
        flaps = BlindSpans()
        outages: list[tuple[float, float]] = []  # this controller's NATS outages, (lost, back)
        stall_grace_s = min(1.0, hb_timeout_s / 2)  # to read the heartbeats that wait in the socket
        last_pass = time.monotonic()
        while not self.aborted:
            now = time.monotonic()
            if now - last_pass > max(1.0, hb_timeout_s / 2):
                # This controller did not run (SIGSTOP, a starved machine, a debugger): the
                # heartbeats that came meanwhile wait unread in its socket, so every agent looks
                # silent. That time, and a grace to read them, is not counted against any agent.
                stalled_s = now - last_pass
                blind.add(last_pass, now + stall_grace_s)
                flaps.add(last_pass, now + stall_grace_s)
                self.run_notes.append(
                    f"this controller did not run for {stalled_s:.1f}s (stopped or starved): no lease renewal "
                    "and no heartbeat read meanwhile; that time was not counted against any agent"
                )
                log.warning("controller stalled %.1fs; not counted against the agents", stalled_s)
            last_pass = now
            self._reconcile_from_heartbeats()
            if self.aborted:
                return
            now = time.monotonic()
            # the controller's own link first: without it every agent looks silent, and the report
            # must not blame an agent for it
            window_s = FLAP_WINDOW_FACTOR * hb_timeout_s
            blind_s, times = _blind_within(outages, nats_lost_since, now, window_s, stall_grace_s)
            if blind_s > FLAP_SHARE * window_s:
                self.abort(
                    f"this controller's NATS link is unstable: lost {times} times in the last {window_s:g}s, "
                    f"unable to read heartbeats for {blind_s:.1f}s of them (an outage and the {stall_grace_s:g}s "
                    "after it): it cannot watch its agents; they revert by lease lapse"
                )
                return
            if not getattr(self.nc, "is_connected", True):
                nats_lost_since = nats_lost_since or now
                if now - nats_lost_since > hb_timeout_s:
                    self.abort(
                        f"this controller lost its NATS connection {now - nats_lost_since:.1f}s ago "
                        f"(heartbeatTimeout {hb_timeout_s:g}s); the agents revert by lease lapse"
                    )
                    return
                await asyncio.sleep(period_s)
                continue
            if nats_lost_since is not None:
                # Lost, not late: judged from the reconnection, as every agent may have had to
                # reconnect too. A link that comes and goes faster than the heartbeatTimeout is
                # caught by the two checks on its outages: their share of the time (above) and
                # `flaps` (below).
                outages.append((nats_lost_since, now))
                del outages[: -BlindSpans.MAX_SPANS]
                flaps.add(nats_lost_since, now + stall_grace_s)
                nats_back_at, nats_lost_since = now, None
            for node in targets:
                view = self.fleet.get(node)
                if view is None:
                    self.abort(f"agent {node} disappeared from the fleet", node=node)
                    return
                hb = view.heartbeat
                age_s = min(blind.judged_s(view.last_seen_monotonic, now), now - nats_back_at)
                read_s = flaps.judged_s(view.last_seen_monotonic, now)
                if read_s > FLAP_FACTOR * hb_timeout_s and age_s <= hb_timeout_s:
                    last = time.strftime("%H:%M:%S", time.localtime(view.received_at))
                    self.abort(
                        f"agent {node} silent for {read_s:.1f}s of the time this controller could read it "
                        f"(its own NATS link came and went {len(outages)} times; {FLAP_FACTOR:g} x heartbeatTimeout "
                        f"{hb_timeout_s:g}s; last heartbeat at {last})",
                        node=node,
                    )
                    return
                if age_s > hb_timeout_s:
                    last = time.strftime("%H:%M:%S", time.localtime(view.received_at))
                    not_counted_s = view.age_s(now) - age_s
                    aside = (
                        f", not counting {not_counted_s:.1f}s this controller could not read it"
                        if not_counted_s >= 0.05
                        else ""
                    )
                    self.abort(
                        f"agent {node} silent for {age_s:.1f}s (heartbeatTimeout {hb_timeout_s:g}s; "
                        f"last heartbeat at {last}{aside})",
                        node=node,
                    )
                    return
                if hb.state == "leaving":
                    self.abort(f"agent {node} is leaving (stopping; it reverted its faults)", node=node)
                    return
                if self.fleet.duplicate(node):
                    self.abort(duplicate_line(node, self.fleet.duplicate(node)), node=node)
                    return
                base = self._baseline.get(node)
                if base is not None and hb.instance_id != base:
                    self.abort(f"agent {node} restarted (instance {base[:8]} -> {hb.instance_id[:8]})", node=node)
                    return
            await asyncio.sleep(period_s)

    def _report(self, plan: Plan) -> Report:
        tracks = sorted(self.tracks.values(), key=lambda t: (t.node, t.index))
        outcome: Outcome
        if self.aborted:
            outcome = "aborted"
        elif self.problems or any(t.state not in ("expired", "reverted") for t in tracks):
            outcome = "failed"
        else:
            outcome = "completed"
        notes = list(plan.notes)
        legacy = [n for n in plan.targets if n not in self._awaits_start]
        if legacy and len(self.experiment.spec.faults) > 0:
            notes.append(
                f"agent(s) on {', '.join(legacy)} speak schema 1.1 or older: their faults started on acceptance, "
                "not together with the others (upgrade them for an all-or-nothing start)"
            )
        if self.stray_events:
            notes.append(f"{self.stray_events} event(s) not about this experiment's targets were ignored")
        notes.extend(self.run_notes)
        return Report(
            experiment_id=self.experiment_id,
            name=self.experiment.metadata.name,
            outcome=outcome,
            started_at=self.started_at,
            ended_at=time.time(),
            targets=plan.targets,
            faults=[t.outcome() for t in tracks],
            abort=self.abort_info,
            notes=notes,
            problems=self.problems,
        )


async def _resolve_pods(namespace: str, labels: dict[str, str]) -> dict[str, list[PodRef]]:
    try:
        from controller import k8s  # lazy: Kubernetes support is optional
    except ImportError as exc:
        raise PreflightError(f"spec.targets.pods: Kubernetes pod targeting is not available here ({exc})") from None
    try:
        resolved = await k8s.resolve_pods(namespace, labels)
    except k8s.KubernetesError as exc:
        raise PreflightError(f"spec.targets.pods: {exc}") from None
    by_node: dict[str, list[PodRef]] = {}
    for rp in resolved:
        # agents name themselves with subject-safe tokens; Kubernetes node names may contain dots
        by_node.setdefault(safe_token(rp.node), []).append(rp.pod)
    if not by_node:
        sel = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(all)"
        raise TargetingError(f"no pods in namespace {namespace} match {sel}")
    return by_node


__all__ = ["ExperimentRunner", "PreflightError", "TargetingError", "TERMINAL_STATES"]
