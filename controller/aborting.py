"""`faultline abort EXPERIMENT_ID`: ask the experiment's controller to abort, or revert on the
agents directly when no controller answers; then confirm from heartbeats.

An acknowledgement says only that the revert was asked for (a frozen agent acknowledges
nothing, and one that answers reverts afterwards), so the abort is confirmed from the
agents' heartbeats sent after it. Text goes to stdout; with ``-o json`` the same lines go to
stderr and one AbortReport object to stdout.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from controller.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from controller.console import err as _err
from controller.console import out as _out
from controller.dispatch import ConnectError, close, revert_experiment
from controller.fleet import JOURNAL_ISSUES_HELP, Fleet, NodeView
from controller.fleet_commands import (
    EXPERIMENT_ID,
    _bad_url,
    _connect_failed,
    _fleet_target,
    _issuer,
    _refuse,
    _with_fleet,
    fitted_reason,
)
from controller.halting import HALT_WAIT_S, wait_bound_s
from proto.codec import DecodeError, decode, encode
from proto.messages import Ack, Revert
from proto.natsurl import NatsUrlError
from proto.subjects import exp_control

log = logging.getLogger(__name__)

ABORT_UNSEEN_NOTE = (
    "  (an agent that sends no heartbeat, frozen or cut off from NATS, is not seen: it reverts on its own when "
    "the experiment's lease lapses, once it runs again)"
)

NodeResult = Literal["holds-faults", "no-heartbeat-since", "never-seen", "revert-failed"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AbortNode(_Model):
    """An agent the abort could not confirm, and why."""

    node: str
    result: NodeResult
    faults: list[str]
    """The experiment's faults its last heartbeat listed (or its kept journal entries)."""
    detail: str


class AbortReport(_Model):
    experiment_id: str
    outcome: Literal["confirmed", "not-confirmed", "unknown-experiment"]
    via: Literal["controller", "agents"]
    """Its controller took the abort, or (none answered) the agents holding its faults were asked."""
    requested: dict[str, str]
    """Via the agents: each agent's answer to the revert ("accepted" or "no answer (why)")."""
    targets: list[str]
    """The agents that had to be heard from: those the controller named, and those seen holding its faults."""
    not_confirmed: list[AbortNode]
    wait_s: float
    waited_s: float
    exit_code: int


class _Abort:
    """One abort's bookkeeping: what it printed goes to ``say``; the report is built at the end."""

    def __init__(self, exp_id: str, output: str) -> None:
        self.exp_id = exp_id
        self.json = output == "json"
        self.say: Callable[[str], None] = _err if self.json else _out
        self.via: Literal["controller", "agents"] = "controller"
        self.requested: dict[str, str] = {}
        self.started = time.monotonic()

    def finish(
        self,
        outcome: Literal["confirmed", "not-confirmed", "unknown-experiment"],
        code: int,
        targets: list[str] | None = None,
        not_confirmed: list[AbortNode] | None = None,
        wait_s: float = 0.0,
    ) -> int:
        if self.json:
            report = AbortReport(
                experiment_id=self.exp_id,
                outcome=outcome,
                via=self.via,
                requested=self.requested,
                targets=sorted(targets or []),
                not_confirmed=not_confirmed or [],
                wait_s=wait_s,
                waited_s=round(time.monotonic() - self.started, 3),
                exit_code=code,
            )
            _out(report.model_dump_json(indent=2))
        return code


async def cmd_abort(args: argparse.Namespace) -> int:
    try:
        target = _fleet_target(args)
    except NatsUrlError as exc:
        return _bad_url(args, exc)
    exp_id = args.experiment_id
    if not EXPERIMENT_ID.match(exp_id):
        why = (
            f"faultline: {exp_id!r} is not an experiment id: 1-64 letters, digits, '_' or '-', "
            "as `faultline run` prints it (running <id>; abort it ...)"
        )
        return _refuse(args, "experiment-id", [why])
    reason = fitted_reason(args.reason, f" (by {_issuer()})")
    try:
        nc, fleet = await _with_fleet(target)
    except ConnectError as exc:
        return _connect_failed(args, target, exc)
    abort = _Abort(exp_id, args.output)
    try:
        cmd = Revert(experiment_id=exp_id, reason=reason, expires_at=time.time() + 30.0)
        sent_mono = time.monotonic()
        try:
            msg = await nc.request(exp_control(exp_id), encode(cmd), timeout=2.0)
            ack = decode(msg.data, Ack)
            if ack.accepted:
                abort.say(f"experiment {exp_id}: abort requested; its controller is reverting on every target")
                await fleet.gather()
                return await _confirm_aborted(abort, fleet, sent_mono, ack.targets or [])
            _err(f"experiment {exp_id}: the controller refused: {ack.reason}")
        except (DecodeError, TimeoutError, Exception) as exc:  # no responder, timeout: fall back to the agents
            log.debug("control request: %r", exc)
        # No controller answers (it died, or runs elsewhere): revert directly on every agent holding its faults.
        abort.via = "agents"
        views = await fleet.gather()
        holders = sorted(n for n, v in views.items() if _holds(v, exp_id))
        if not holders:
            _err(f"faultline: unknown experiment id {exp_id}: no controller runs it and no agent seen holds its faults")
            _err(ABORT_UNSEEN_NOTE)
            return abort.finish("unknown-experiment", EXIT_BAD_INPUT)
        sent_mono = time.monotonic()
        results = await revert_experiment(nc, holders, exp_id, reason)  # the agents say "requested: "
        failed = [n for n, (a, _why) in results.items() if a is None]
        for n, (a, problem) in sorted(results.items()):
            abort.requested[n] = "accepted" if a is not None else f"no answer ({problem})"
            abort.say(f"{n}: " + ("revert requested (accepted)" if a is not None else f"no answer ({problem})"))
        return await _confirm_aborted(abort, fleet, sent_mono, failed_code=EXIT_FAILED if failed else None)
    finally:
        await fleet.stop()
        await close(nc)


def _holds(view: NodeView, exp_id: str) -> bool:
    """The agent's latest heartbeat lists a fault of the experiment, or a journal entry of it
    kept unreverted."""
    hb = view.heartbeat
    return any(f.experiment_id == exp_id for f in hb.faults) or any(
        i.experiment_id == exp_id for i in hb.journal_issues
    )


async def _confirm_aborted(
    abort: _Abort, fleet: Fleet, sent_mono: float, targets: list[str] | None = None, failed_code: int | None = None
) -> int:
    """An abort is done when no agent's heartbeat, sent after it, lists the experiment's faults.
    ``targets``: the nodes the experiment's controller named; each must be heard from. Waits as
    `faultline halt` does. ``failed_code``: the exit code when confirmed but an agent did not
    answer the revert."""
    exp_id = abort.exp_id
    views = fleet.nodes()
    wait_s = wait_bound_s(views) if views else HALT_WAIT_S
    # who must answer: what held its faults when the abort began, and every target its controller named
    held = {n for n, v in views.items() if _holds(v, exp_id)} | set(targets or [])

    def left() -> list[str]:
        nodes = fleet.nodes()
        return sorted(
            {n for n, v in nodes.items() if _holds(v, exp_id)}
            | {n for n in held if n not in nodes or nodes[n].last_seen_monotonic <= sent_mono}
        )

    _err(f"confirming from heartbeats (up to {wait_s:g}s) that no agent holds its faults ...")
    # counted from now, not from the abort: the request and the gather before took part of it
    await fleet.wait_until(lambda: not left(), wait_s)
    remaining = left()
    if not remaining:
        abort.say(f"experiment {exp_id}: abort confirmed: no agent seen holds any of its faults")
        abort.say(ABORT_UNSEEN_NOTE)
        code = failed_code if failed_code is not None else EXIT_OK
        return abort.finish("confirmed", code, sorted(held), [], wait_s)
    nodes = [_not_confirmed(n, fleet.nodes().get(n), exp_id, sent_mono, wait_s) for n in remaining]
    for node in nodes:
        abort.say(f"{node.node}: NOT CONFIRMED: {node.detail}")
    return abort.finish("not-confirmed", EXIT_FAILED, sorted(held | set(remaining)), nodes, wait_s)


def _not_confirmed(n: str, view: NodeView | None, exp_id: str, sent_mono: float, wait_s: float) -> AbortNode:
    if view is None:
        return AbortNode(
            node=n,
            result="never-seen",
            faults=[],
            detail="a target that sent no heartbeat at all (frozen, cut off from NATS, or not running): its faults "
            "end when the experiment's lease lapses, once the agent runs again",
        )
    hb = view.heartbeat
    faults = [f.fault_id for f in hb.faults if f.experiment_id == exp_id]
    if view.last_seen_monotonic <= sent_mono:
        ago = time.monotonic() - view.last_seen_monotonic
        return AbortNode(
            node=n,
            result="no-heartbeat-since",
            faults=faults,
            detail=f"no heartbeat since the abort (last one {ago:.1f}s ago; frozen or cut off?); it last listed "
            f"{', '.join(faults) or 'none of its faults'}: they end when the experiment's lease lapses, once the "
            "agent runs again",
        )
    if faults:
        return AbortNode(
            node=n,
            result="holds-faults",
            faults=faults,
            detail=f"still holds {', '.join(faults)} {wait_s:g}s after the abort",
        )
    kept = [i.entry for i in hb.journal_issues if i.experiment_id == exp_id]
    return AbortNode(
        node=n,
        result="revert-failed",
        faults=kept,
        detail=f"revert failed, journal entry kept: {', '.join(kept)} ({JOURNAL_ISSUES_HELP})",
    )
