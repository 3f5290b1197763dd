"""The experiment report: one model, rendered as a human table or as JSON.

Both renderings carry the same data. Times are Unix seconds in the model and
JSON; the table shows them relative to the experiment's start.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.messages import TERMINAL_STATES, Measurements

Outcome = Literal["completed", "aborted", "failed"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StateChange(_Model):
    state: str
    at: float
    reason: str | None = None


class FaultOutcome(_Model):
    """One fault on one target node."""

    node: str
    fault_id: str
    index: int
    kind: str
    name: str | None = None
    pods: list[str] | None = None
    dispatched_at: float | None = None
    acked_at: float | None = None
    accepted: bool | None = None
    ack_reason: str | None = None
    active_at: float | None = None
    state: str = Field(description="last state known: not-dispatched, dispatched, no-reply, or an agent fault state")
    ended_at: float | None = None
    reason: str | None = None
    expires_at: float | None = None
    measurements: Measurements = Field(default_factory=Measurements)
    timeline: list[StateChange] = Field(default_factory=list)


class AbortInfo(_Model):
    reason: str
    at: float
    node: str | None = None


class Report(_Model):
    experiment_id: str
    name: str
    outcome: Outcome
    started_at: float
    ended_at: float
    targets: list[str]
    faults: list[FaultOutcome]
    abort: AbortInfo | None = None
    notes: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list, description="what went wrong besides an abort")

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


def exit_code(report: Report) -> int:
    """0 completed; 1 aborted or failed."""
    return 0 if report.outcome == "completed" else 1


def to_json(report: Report, extra: dict[str, Any] | None = None) -> str:
    """Every key of the model, null when absent: scripts can rely on the shape (abort is null on success).
    ``extra``: keys added at the top level; local mode adds ``local_recovery``, ``local_journal_issues``
    and ``local_journal_issues_total``, which a run against a fleet does not have."""
    data = report.model_dump(mode="json")
    data["duration_s"] = round(report.duration_s, 3)
    data.update(extra or {})
    return json.dumps(data, indent=2)


def _rel(t: float | None, start: float) -> str:
    return "-" if t is None else f"+{t - start:.2f}s"


def _measurement_text(m: Measurements) -> str:
    parts = []
    if m.hit_pids is not None:
        parts.append(f"hit pids {m.hit_pids}")
    if m.matched_pids is not None and m.matched_pids != m.hit_pids:
        parts.append(f"matched {len(m.matched_pids)}")
    if m.skipped:
        parts.append("skipped " + ", ".join(f"{s.pid} ({s.reason})" for s in m.skipped))
    if m.resumed_pids is not None:
        parts.append(f"resumed {m.resumed_pids}")
    if m.restarted is not None:
        if m.restarted:
            after = f" after {m.restart_after_s:.2f}s" if m.restart_after_s is not None else ""
            pid = f" as pid {m.restart_pid}" if m.restart_pid is not None else ""
            parts.append(f"restarted{pid}{after}")
        else:
            parts.append("no restart seen")
    if m.workers is not None:
        parts.append(f"{m.workers} worker{'s' if m.workers != 1 else ''}")
    if m.cpu_load_mean_percent is not None:
        parts.append(f"cpu {m.cpu_load_mean_percent:.1f}%")
    if m.rss_bytes is not None:
        parts.append(f"rss {m.rss_bytes / 2**20:.1f}Mi")
    if m.oom_killed:
        parts.append("oom-killed")
    if m.interface is not None:
        parts.append(f"on {m.interface}")
    if m.recovered_from_journal:
        parts.append("recovered from journal")
    if m.note:
        parts.append(m.note)
    return "; ".join(parts)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_text(report: Report) -> str:
    start = report.started_at
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    lines = [
        f"experiment {report.experiment_id} ({report.name}): {report.outcome.upper()}",
        f"started {stamp}, ran {report.duration_s:.2f}s, targets: {', '.join(report.targets) or 'none'}",
    ]
    if report.abort is not None:
        who = f" [agent {report.abort.node}]" if report.abort.node else ""
        lines.append(f"aborted at {_rel(report.abort.at, start)}{who}: {report.abort.reason}")
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append("")
    if report.faults:
        rows = [["NODE", "FAULT", "KIND", "DISPATCHED", "ACKED", "ACTIVE", "ENDED", "STATE"]]
        for f in report.faults:
            label = f.fault_id + (f" ({f.name})" if f.name else "")
            rows.append(
                [
                    f.node,
                    label,
                    f.kind,
                    _rel(f.dispatched_at, start),
                    _rel(f.acked_at, start) if f.accepted is not False else "rejected",
                    _rel(f.active_at, start),
                    _rel(f.ended_at, start),
                    f.state if f.state in TERMINAL_STATES else f"{f.state}?",
                ]
            )
        lines.extend(_table(rows))
        if any(f.state not in TERMINAL_STATES for f in report.faults):
            lines.append(
                "(STATE with ?: the last state heard; its end was not confirmed. The agents revert what is left "
                "when the experiment's lease lapses; `faultline experiments` shows what still holds)"
            )
        details = []
        for f in report.faults:
            reason = f.reason or f.ack_reason
            measured = _measurement_text(f.measurements)
            if reason or measured:
                text = "; ".join(x for x in (measured, f"reason: {reason}" if reason else "") if x)
                details.append(f"  {f.node} {f.fault_id}: {text}")
        if details:
            lines.append("")
            lines.extend(details)
    else:
        lines.append("no faults were dispatched")
    if report.problems:
        lines.append("")
        lines.extend(f"problem: {p}" for p in report.problems)
    return "\n".join(lines)
