"""The report: the text table and JSON carry the same data."""

from __future__ import annotations

import json

from controller.report import AbortInfo, FaultOutcome, Report, StateChange, exit_code, render_text, to_json
from proto.messages import Measurements

T0 = 1_700_000_000.0


def report(**kw: object) -> Report:
    faults = [
        FaultOutcome(
            node="node-a",
            fault_id="exp-abc123.0",
            index=0,
            kind="process-kill",
            name="kill-one",
            dispatched_at=T0 + 0.01,
            acked_at=T0 + 0.02,
            accepted=True,
            active_at=T0 + 0.05,
            state="expired",
            ended_at=T0 + 10.0,
            reason="deadline reached",
            measurements=Measurements(hit_pids=[4242], restarted=True, restart_pid=4300, restart_after_s=0.31),
            timeline=[StateChange(state="active", at=T0 + 0.05)],
        ),
        FaultOutcome(
            node="node-b",
            fault_id="exp-abc123.0",
            index=0,
            kind="process-kill",
            dispatched_at=T0 + 0.01,
            acked_at=T0 + 0.03,
            accepted=False,
            ack_reason="no process matches",
            state="rejected",
            ended_at=T0 + 0.03,
        ),
    ]
    data: dict[str, object] = {
        "experiment_id": "exp-abc123",
        "name": "exp",
        "outcome": "completed",
        "started_at": T0,
        "ended_at": T0 + 10.5,
        "targets": ["node-a", "node-b"],
        "faults": faults,
    }
    data.update(kw)
    return Report.model_validate(data)


def test_exit_codes() -> None:
    assert exit_code(report()) == 0
    assert exit_code(report(outcome="aborted")) == 1
    assert exit_code(report(outcome="failed")) == 1


def test_text_has_a_row_per_target_and_fault_with_relative_times() -> None:
    text = render_text(report())
    assert "COMPLETED" in text
    rows = [line for line in text.splitlines() if line.startswith("node-")]
    assert len(rows) == 2
    assert "+0.01s" in rows[0] and "+10.00s" in rows[0] and "expired" in rows[0]
    assert "rejected" in rows[1]
    assert "restarted as pid 4300 after 0.31s" in text
    assert "hit pids [4242]" in text
    assert "no process matches" in text


def test_abort_reason_names_the_agent_and_time() -> None:
    r = report(outcome="aborted", abort=AbortInfo(reason="agent node-b silent for 3.1s", at=T0 + 4.0, node="node-b"))
    text = render_text(r)
    assert "ABORTED" in text
    assert "aborted at +4.00s [agent node-b]: agent node-b silent for 3.1s" in text
    data = json.loads(to_json(r))
    assert data["abort"] == {"reason": "agent node-b silent for 3.1s", "at": T0 + 4.0, "node": "node-b"}


def test_json_carries_the_same_data() -> None:
    r = report(problems=["something late"], notes=["a note"])
    data = json.loads(to_json(r))
    assert data["experiment_id"] == "exp-abc123" and data["outcome"] == "completed"
    assert data["duration_s"] == 10.5
    assert [f["node"] for f in data["faults"]] == ["node-a", "node-b"]
    first = data["faults"][0]
    for key in ("dispatched_at", "acked_at", "active_at", "ended_at", "state", "measurements", "timeline"):
        assert key in first
    assert first["measurements"]["restart_after_s"] == 0.31
    assert data["problems"] == ["something late"] and data["notes"] == ["a note"]
    assert Report.model_validate({k: v for k, v in data.items() if k != "duration_s"}) == r


def test_no_faults() -> None:
    assert "no faults were dispatched" in render_text(report(faults=[]))


def test_a_state_whose_end_was_not_confirmed_is_marked_and_explained() -> None:
    """A new user's review: after a second Ctrl-C the report said "active" for a fault whose
    victim had already resumed; the controller had stopped listening. The state is the last heard."""
    r = report(outcome="aborted", abort=AbortInfo(reason="interrupted twice (SIGINT)", at=T0 + 4.0))
    unconfirmed = r.faults[0].model_copy(update={"state": "active", "ended_at": None})
    text = render_text(r.model_copy(update={"faults": [unconfirmed, r.faults[1]]}))
    (row,) = [line for line in text.splitlines() if line.startswith("node-a")]
    assert row.endswith("active?"), row
    assert "STATE with ?: the last state heard; its end was not confirmed" in text
    assert "STATE with ?" not in render_text(report())
