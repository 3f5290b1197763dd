"""Pre-flight refusals and the JSON shapes scripts rely on."""

from __future__ import annotations

import json
import time

from controller.fleet import NodeView
from controller.report import Report, to_json
from controller.tracking import heartbeat_timeout_refusal
from proto.messages import Heartbeat


def view(node: str, interval_s: float) -> NodeView:
    hb = Heartbeat(node=node, instance_id="i", version="1", interval_s=interval_s, seq=1, started_at=time.time())
    return NodeView(hb, time.monotonic(), time.time())


def test_heartbeat_timeout_must_cover_two_intervals_of_every_target() -> None:
    views = {"node-a": view("node-a", 1.0), "node-b": view("node-b", 0.5), "node-c": view("node-c", 2.0)}
    why = heartbeat_timeout_refusal(1.5, views)
    assert why == (
        "spec.abort.heartbeatTimeout: 1.5s is less than 2 heartbeat intervals of agents node-a (every 1s), "
        "node-c (every 2s): one late heartbeat would abort the run, blaming the agent; "
        "use heartbeatTimeout: 4s or more"
    )
    assert heartbeat_timeout_refusal(4.0, views) is None  # exactly two intervals is enough
    assert heartbeat_timeout_refusal(0.6, {"n": view("n", 0.3)}) is None  # no float rounding refusal
    assert "of agent n (every 0.3s)" in (heartbeat_timeout_refusal(0.59, {"n": view("n", 0.3)}) or "")
    assert heartbeat_timeout_refusal(0.1, {}) is None


def test_report_json_keeps_every_key_null_when_absent() -> None:
    r = Report(experiment_id="e-1", name="e", outcome="completed", started_at=1.0, ended_at=2.0, targets=[], faults=[])
    data = json.loads(to_json(r))
    assert data["abort"] is None
    assert set(data) == {*Report.model_fields, "duration_s"}
