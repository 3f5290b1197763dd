"""Command handling: validate, record, acknowledge; start and revert. Never raises.

handle_command(bytes) -> the encoded Ack is the whole contract, so the fuzz
tests drive it in-process with no NATS at all. Every refusal is an Ack with
accepted=False and a reason (plus a "rejected" event when the fault is
known); nothing already injected is touched by a bad command.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from agent.faults.base import Injector, Rejected
from agent.faults_table import FaultRecord
from proto.codec import DecodeError, decode_command, encode, peek_id
from proto.faults import required_capabilities
from proto.messages import (
    PREVIEW_ALL_KINDS_SINCE_MINOR,
    Ack,
    FaultEvent,
    FaultState,
    Inject,
    PodRef,
    Preview,
    PreviewResult,
    Revert,
    Start,
    schema_minor,
)
from proto.units import MAX_DURATION_S

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.faults.base import FaultContext

log = logging.getLogger("faultline.agent")

MAX_CLOCK_SKEW_S = 300.0
# Locating a pod (its cgroup, its network namespace) reads /proc and /sys on a thread of its own.
# Bounded: the command subscription answers one command at a time, and a Revert queued behind
# a lookup that does not return (a wedged filesystem) must not wait with it.
POD_LOOKUP_S = 5.0
PRECHECK_S = 1.0
"""How long an Inject's precheck (a process fault's selection) may hold its Ack; past it the
fault is accepted and its plan decides. Well under the controller's 2 s request timeout, so a
slow scan never costs a retry."""


class PodLookups:
    """Pod lookups, one at a time on a thread of their own (created on the first).

    A lookup that never returns (a wedged /proc or cgroup filesystem) holds that one thread
    only. While it is stuck, the next lookup is refused at once, saying so, instead of
    taking one more thread of the event loop's shared pool each time (the pool that the
    agent's other blocking work shares), or queueing behind it for its whole bound."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._started_at: float | None = None  # monotonic start of the lookup on the thread now
        self._timed_out: concurrent.futures.Future[Any] | None = None  # the last lookup given up on

    async def scoped(self, spec: Any, pods: list[PodRef]) -> Any:
        """The spec scoped to its pod (pod_scoped), or Rejected within POD_LOOKUP_S."""
        stuck = self._timed_out
        if stuck is not None and not stuck.done():
            started_at = self._started_at
            held = f" for {time.monotonic() - started_at:.0f} s" if started_at is not None else ""
            raise Rejected(
                f"an earlier pod lookup has not returned{held} (a wedged /proc or cgroup filesystem?); not applied"
            )
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-lookup")
        fut = self._executor.submit(self._timed, spec, pods)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), POD_LOOKUP_S)
        except TimeoutError:
            self._timed_out = fut  # running still (or queued behind one that is): the next is refused at once
            raise Rejected(f"locating the pod took longer than {POD_LOOKUP_S:g} s; not applied") from None

    def _timed(self, spec: Any, pods: list[PodRef]) -> Any:
        self._started_at = time.monotonic()  # on its thread: a queued lookup counts from its own start
        try:
            return pod_scoped(spec, pods)
        finally:
            self._started_at = None

    def close(self) -> None:
        """Without waiting: a stuck lookup's thread is left to the process's exit."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def pod_scoped(spec: Any, pods: list[PodRef]) -> Any:
    """The spec narrowed to one pod: stressors in its cgroup, tc in its network namespace.

    The rewritten spec is what gets journaled, so a revert after a pod restart
    still finds the namespace by the path kept there.
    """
    from agent import pods as pods_mod  # only pod-level faults need it

    if len(pods) != 1:
        names = ", ".join(f"{p.namespace}/{p.name}" for p in pods)
        raise Rejected(
            f"targets.pods: a {spec.kind} fault takes one pod per node, and {len(pods)} matched here ({names}); "
            "narrow targets.pods.labels"
        )
    pod = pods[0]
    try:
        loc = pods_mod.locate_pod(pod.uid)
    except pods_mod.PodNotFound as exc:
        raise Rejected(f"pod {pod.namespace}/{pod.name}: {exc}") from None
    if spec.kind in ("cpu", "memory"):
        if spec.cgroup is not None:
            raise Rejected("cgroup: give a cgroup or target pods, not both")
        if loc.cgroup_path is None:
            raise Rejected(f"pod {pod.namespace}/{pod.name}: its cgroup was not found on this node")
        return spec.model_copy(update={"cgroup": loc.cgroup_path})
    if spec.netns is not None:
        raise Rejected("netns: give a netns or target pods, not both")
    if loc.netns_path is None:
        raise Rejected(f"pod {pod.namespace}/{pod.name}: no running process to find its network namespace from")
    if pods_mod.netns_is_host(loc.netns_path):
        raise Rejected(
            f"pod {pod.namespace}/{pod.name} uses the host network: a network fault there would hit the whole node"
        )
    return spec.model_copy(update={"netns": loc.netns_path})


def accepted(in_reply_to: str, node: str, states: dict[str, FaultState]) -> Ack:
    return Ack(in_reply_to=in_reply_to, node=node, accepted=True, fault_states=states)


class CommandHandler:
    # provided by AgentRuntime
    settings: AgentSettings
    node: str
    injectors: dict[str, Injector]
    unsupported: dict[str, str]
    capabilities: list[str]
    capability_notes: dict[str, str]
    faults: dict[str, FaultRecord]
    ended: OrderedDict[str, str]
    ended_experiments: OrderedDict[str, str]
    rejected_count: int
    halt_seq: int
    stopping: bool
    previewing: bool
    pod_lookups: PodLookups

    if TYPE_CHECKING:
        # Declared for the type checker only: at run time the mixin defines
        # none of these, so AgentRuntime's own methods are the only ones in the MRO.
        def remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None: ...
        def publish_event(self, ev: FaultEvent) -> None: ...
        def poke_watchdog(self, due: float) -> None: ...
        def launch(self, rec: FaultRecord) -> None: ...
        def arm_deadline(self, rec: FaultRecord) -> None: ...
        def keeps_entry_of(self, fault_id: str) -> bool: ...
        def make_context(
            self,
            fault_id: str,
            experiment_id: str,
            deadline: float,
            pods: Any,
            recovered: bool = False,
            lease_timeout_s: float | None = None,
        ) -> FaultContext: ...

    async def _precheck(self, injector: Injector, cmd: Inject, ctx: FaultContext) -> Ack | None:
        """The injector's precheck before the Ack (a process fault's selection): the refusal to
        send, or None to accept. Advisory past PRECHECK_S or on an error: the plan decides."""
        fid, exp, halts_before = cmd.fault_id, cmd.experiment_id, self.halt_seq
        try:
            await asyncio.wait_for(injector.precheck(cmd.spec, ctx), PRECHECK_S)
        except Rejected as exc:
            return self._reject(cmd.id, str(exc), cmd)
        except TimeoutError:
            log.warning("precheck of %s took longer than %g s: accepted; its plan decides", fid, PRECHECK_S)
        except Exception:
            log.exception("precheck of %s failed: accepted; its plan decides", fid)
        # a halt, an abort or a stop may have come in meanwhile, or the same fault id again
        if self.halt_seq != halts_before or self.stopping or exp in self.ended_experiments:
            return self._reject(cmd.id, "halted or aborted while it was being checked; not applied", cmd)
        if fid in self.faults or fid in self.ended or self.keeps_entry_of(fid):
            return self._reject(cmd.id, f"fault {fid} was taken or ended while it was being checked")
        return None

    async def handle_command(self, data: bytes, preview_only: bool = False) -> bytes:
        """Decode and act on one command; returns the encoded Ack. Never raises. ``preview_only``:
        it came in looking like a Preview and is answered beside the other commands, not in turn."""
        try:
            return await self._handle(data, preview_only)
        except Exception as exc:  # the agent never crashes on input
            log.exception("internal error handling a command")
            return encode(self._reject(peek_id(data) or "", f"internal error: {exc}"))

    def _reject(self, in_reply_to: str, reason: str, cmd: Inject | None = None) -> Ack:
        self.rejected_count += 1
        log.warning("rejected command %s: %s", in_reply_to or "(no id)", reason)
        if cmd is not None:
            self.publish_event(
                FaultEvent(
                    experiment_id=cmd.experiment_id,
                    fault_id=cmd.fault_id,
                    node=self.node,
                    kind=cmd.spec.kind,
                    state="rejected",
                    reason=reason,
                )
            )
        return Ack(in_reply_to=in_reply_to, node=self.node, accepted=False, reason=reason)

    async def _handle(self, data: bytes, preview_only: bool = False) -> bytes:
        try:
            cmd = decode_command(data)
        except DecodeError as exc:
            return encode(self._reject(peek_id(data) or "", f"rejected: {exc}"))
        if preview_only and not isinstance(cmd, Preview):
            # "type" given twice: only a Preview may run beside the commands handled in turn
            return encode(
                self._reject(cmd.id, f"rejected: a {cmd.type} that also reads as a preview (type given twice?)")
            )
        # A command delivered twice is answered from the current state, never re-applied:
        # injects are idempotent by fault id (held -> its state; ended -> refused), and so are starts.
        if isinstance(cmd, Inject):
            ack = await self._inject(cmd)
        elif isinstance(cmd, Start):
            ack = self._start_command(cmd)
        elif isinstance(cmd, Preview):
            ack = await self._preview(cmd)
        else:
            ack = self._revert_command(cmd)
        return encode(ack)

    async def _preview(self, cmd: Preview) -> Ack:
        """What the spec would touch here now: the checks and the selection of an Inject, with
        nothing applied, recorded or journaled (`faultline run --preview`). One at a time: each
        scans every process. A refusal is an answer, not a rejected command (not counted)."""

        def refuse(reason: str) -> Ack:
            log.info("preview %s not answered: %s", cmd.id, reason)
            return Ack(in_reply_to=cmd.id, node=self.node, accepted=False, reason=reason)

        def would_refuse(reason: str) -> Ack:
            """What an Inject of the fault would get: an answer, for a controller that tells it apart
            (1.5); a refusal of the preview itself for an older one, as before."""
            if schema_minor(cmd.schema_version) < PREVIEW_ALL_KINDS_SINCE_MINOR:
                return refuse(reason)
            return Ack(in_reply_to=cmd.id, node=self.node, accepted=True, preview=PreviewResult(refused=reason))

        now = time.time()
        if cmd.expires_at <= now:
            return refuse(f"expired: expires_at passed {now - cmd.expires_at:.1f}s ago")
        if self.stopping:
            return refuse("agent is stopping")
        if self.previewing:
            return refuse("another preview is running on this agent; try again")
        kind = cmd.spec.kind
        injector = self.injectors.get(kind)
        if injector is None:
            return would_refuse(self.unsupported.get(kind, f"{kind} faults are not supported by this agent"))
        for cap in required_capabilities(cmd.spec):
            if cap not in self.capabilities:
                return would_refuse(self.capability_notes.get(cap, f"capability {cap} not available here"))
        ctx = self.make_context("preview", "preview", cmd.expires_at, cmd.pods)
        self.previewing = True
        try:
            spec = cmd.spec
            if cmd.pods and kind in ("cpu", "memory", "network"):  # as an Inject: in the pod's cgroup or netns
                spec = await self.pod_lookups.scoped(spec, cmd.pods)
            result = await injector.preview(spec, ctx)
        except Rejected as exc:
            return would_refuse(str(exc))
        except Exception as exc:
            log.exception("preview of a %s fault failed", kind)
            return refuse(f"preview failed: {exc}")
        finally:
            self.previewing = False
        if result is not None and len(self.faults) >= self.settings.safety.max_faults:
            full = f"the agent holds its maximum of {self.settings.safety.max_faults} faults: an Inject now would be refused"
            result = result.model_copy(update={"note": f"{result.note}; {full}" if result.note else full})
        return Ack(in_reply_to=cmd.id, node=self.node, accepted=True, preview=result)

    async def _inject(self, cmd: Inject) -> Ack:
        now = time.time()
        fid, exp = cmd.fault_id, cmd.experiment_id
        held = self.faults.get(fid)
        if held is not None:
            if held.experiment_id != exp:
                return self._reject(cmd.id, f"fault id {fid} is held by experiment {held.experiment_id}")
            return accepted(cmd.id, self.node, {fid: held.state})
        if fid in self.ended:
            return self._reject(cmd.id, f"fault {fid} already ended ({self.ended[fid]}); not re-injected")
        if self.keeps_entry_of(fid):
            return self._reject(cmd.id, f"fault id {fid} has a journal entry this agent keeps unreverted", cmd)
        if exp in self.ended_experiments:
            return self._reject(cmd.id, f"experiment {exp} {self.ended_experiments[exp]}; not re-injected", cmd)
        if self.stopping:
            return self._reject(cmd.id, "agent is stopping", cmd)
        if cmd.expires_at <= now:
            return self._reject(cmd.id, f"expired: expires_at passed {now - cmd.expires_at:.1f}s ago", cmd)
        if cmd.expires_at > now + MAX_DURATION_S + MAX_CLOCK_SKEW_S:
            days = (cmd.expires_at - now) / 86400
            return self._reject(
                cmd.id,
                f"expires_at is {days:.0f} days away: a fault lasts at most {MAX_DURATION_S / 86400:.0f} days",
                cmd,
            )
        if cmd.sent_at > now + MAX_CLOCK_SKEW_S:
            return self._reject(cmd.id, f"sent_at is {cmd.sent_at - now:.0f}s in the future: check clocks", cmd)
        if len(self.faults) >= self.settings.safety.max_faults:
            return self._reject(cmd.id, f"agent holds the maximum of {self.settings.safety.max_faults} faults", cmd)
        kind = cmd.spec.kind
        if cmd.pods and kind in ("cpu", "memory", "network"):
            halts_before = self.halt_seq
            try:
                cmd = cmd.model_copy(update={"spec": await self.pod_lookups.scoped(cmd.spec, cmd.pods)})
            except Rejected as exc:
                return self._reject(cmd.id, str(exc), cmd)
            # a halt, an abort or a stop may have come in while the pod was being located
            if self.halt_seq != halts_before or self.stopping or exp in self.ended_experiments:
                return self._reject(cmd.id, "halted or aborted while the pod was being located; not applied", cmd)
            # and the same fault id, delivered again meanwhile, may have been taken or ended
            if fid in self.faults or fid in self.ended or self.keeps_entry_of(fid):
                return self._reject(cmd.id, f"fault {fid} was taken or ended while its pod was being located")
        injector = self.injectors.get(kind)
        if injector is None:
            return self._reject(
                cmd.id, self.unsupported.get(kind, f"{kind} faults are not supported by this agent"), cmd
            )
        for cap in required_capabilities(cmd.spec):
            if cap not in self.capabilities:
                why = self.capability_notes.get(cap, f"capability {cap} not available on this node")
                return self._reject(cmd.id, why, cmd)
        ctx = self.make_context(fid, exp, cmd.expires_at, cmd.pods, lease_timeout_s=cmd.lease_timeout_s)
        try:
            injector.check(cmd.spec, ctx)
        except Rejected as exc:
            return self._reject(cmd.id, str(exc), cmd)
        except Exception as exc:
            log.exception("check of %s failed", fid)
            return self._reject(cmd.id, f"check failed: {exc}", cmd)
        if injector.prechecks and (refused := await self._precheck(injector, cmd, ctx)) is not None:
            if fid not in self.faults:  # else the same id, delivered again meanwhile, holds it: not ours to drop
                injector.release(ctx)  # what check() set aside
            return refused
        # The Ack says "accepted" at once, with no I/O on its path; the lifecycle journals the
        # plan before it touches anything (invariant 4). A crash in between leaves nothing applied.
        rec = FaultRecord(
            cmd=cmd,
            injector=injector,
            ctx=ctx,
            deadline_mono=time.monotonic() + (cmd.expires_at - now),
        )
        self.arm_deadline(rec)  # first: a record is never held without its deadline timer
        self.faults[fid] = rec
        if cmd.await_start:
            # nothing runs until its Start; an end asked for before then (revert, halt, lease
            # lapse, deadline, stop) launches the lifecycle, which applies nothing and reports it
            rec.on_end = self.launch
        else:
            self.launch(rec)
        # its lease clock starts now: a lease shorter than the watchdog's wait wakes it early
        self.poke_watchdog(min(rec.accepted_mono + cmd.lease_timeout_s, rec.deadline_mono))
        log.info(
            "accepted %s (%s) of %s, expires in %.1fs%s",
            fid,
            kind,
            exp,
            cmd.expires_at - now,
            ", waiting for its start" if cmd.await_start else "",
        )
        return accepted(cmd.id, self.node, {fid: "accepted"})

    def _start_command(self, cmd: Start) -> Ack:
        """Launch the experiment's faults that wait for their start; idempotent (a broadcast
        Start and a per-node one may both arrive). Answers each named fault's state."""
        if self.stopping:
            return self._reject(cmd.id, "agent is stopping")
        now = time.time()
        if cmd.expires_at <= now:
            return self._reject(cmd.id, f"expired: expires_at passed {now - cmd.expires_at:.1f}s ago")
        states: dict[str, FaultState] = {}
        wanted = set(cmd.fault_ids) if cmd.fault_ids is not None else None
        gone = self.ended_experiments.get(cmd.experiment_id)
        for rec in list(self.faults.values()):
            if rec.experiment_id != cmd.experiment_id or (wanted is not None and rec.fault_id not in wanted):
                continue
            if rec.waiting:
                # what the watchdog has not swept yet is ended here, never started
                if now >= rec.cmd.expires_at:
                    rec.request_end("deadline reached", "expired")
                elif gone is not None:
                    rec.request_end(f"experiment {cmd.experiment_id} {gone}")
                else:
                    self.launch(rec)
            states[rec.fault_id] = rec.state
        for fid in cmd.fault_ids or []:
            if fid not in states and fid in self.ended:
                states[fid] = self.ended[fid]  # type: ignore[assignment]
        return accepted(cmd.id, self.node, states)

    def _revert_command(self, cmd: Revert) -> Ack:
        return accepted(cmd.id, self.node, self.revert_matching(cmd))

    def revert_matching(self, cmd: Revert) -> dict[str, FaultState]:
        """End the faults the Revert names (every one of its experiment by default); their states."""
        states: dict[str, FaultState] = {}
        for rec in list(self.faults.values()):
            if rec.experiment_id != cmd.experiment_id:
                continue
            if cmd.fault_ids is not None and rec.fault_id not in cmd.fault_ids:
                continue
            rec.request_end(f"requested: {cmd.reason}")
            states[rec.fault_id] = rec.state
        for fid in cmd.fault_ids or []:
            if fid not in states and fid in self.ended:
                states[fid] = self.ended[fid]  # type: ignore[assignment]
        if cmd.fault_ids is None:
            # an experiment reverted as a whole never takes new faults from a late or replayed Inject
            self.remember(self.ended_experiments, cmd.experiment_id, "was reverted")
        return states
