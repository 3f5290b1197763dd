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


async def test_a_random_pick_says_so_and_a_full_match_does_not() -> None:
    from controller.engine import ExperimentRunner
    from controller.experiment import parse_experiment
    from controller.fleet import Fleet
    from proto.codec import encode

    fleet = Fleet(None)
    for n in ("a", "b", "c"):
        hb = Heartbeat(
            node=n, instance_id=n, version="1", interval_s=1.0, seq=1, started_at=1.0, capabilities=["process-pause"]
        )
        fleet.observe(encode(hb))
    for mode, noted in (("one", True), ("all", False)):
        exp = parse_experiment(
            {
                "apiVersion": "faultline/v1", "kind": "Experiment", "metadata": {"name": "x"},
                "spec": {"duration": "5s", "targets": {"mode": mode},
                         "faults": [{"kind": "process-pause", "match": {"pid": 5}}]},
            }
        )  # fmt: skip
        plan = await ExperimentRunner(None, fleet, exp).plan()
        picked = [n for n in plan.notes if "picked at random" in n]
        assert len(plan.targets) == (1 if noted else 3)
        assert picked == (
            ["1 of 3 matching node(s) picked at random (mode one); each run, a dry run included, picks again"]
            if noted
            else []
        ), plan.notes


class FakeNC:
    is_connected = True


async def test_a_controller_cut_off_from_nats_blames_itself_not_an_agent() -> None:
    import asyncio

    from controller.engine import ExperimentRunner
    from controller.experiment import parse_experiment
    from controller.fleet import Fleet
    from proto.codec import encode

    def beat(fleet: Fleet) -> None:
        fleet.observe(encode(Heartbeat(node="a", instance_id="a", version="1", interval_s=0.2, seq=9, started_at=1.0)))

    exp = parse_experiment(
        {
            "apiVersion": "faultline/v1", "kind": "Experiment", "metadata": {"name": "x"},
            "spec": {"duration": "30s", "abort": {"heartbeatTimeout": "1s"},
                     "faults": [{"kind": "process-pause", "match": {"pid": 5}}]},
        }
    )  # fmt: skip
    # cut off for 0.8 s, then back: the agent's heartbeats of that time are lost, not late
    fleet, nc = Fleet(None), FakeNC()
    beat(fleet)
    runner = ExperimentRunner(nc, fleet, exp)
    monitor = asyncio.create_task(runner._monitor_loop(["a"]))
    nc.is_connected = False
    await asyncio.sleep(0.8)
    nc.is_connected = True
    await asyncio.sleep(0.5)  # 1.3 s since its last heartbeat, 0.5 s since the link is back
    assert runner.abort_info is None, runner.abort_info
    beat(fleet)
    await asyncio.sleep(0.3)
    assert runner.abort_info is None
    # cut off again: more than heartbeatTimeout of outage (in one, or in all within five of it);
    # the report says whose link it was
    nc.is_connected = False
    await asyncio.wait_for(monitor, 3)
    assert runner.abort_info is not None and runner.abort_info.node is None
    reason = runner.abort_info.reason
    assert reason.startswith(("this controller lost its NATS connection", "this controller's NATS link")), reason


def test_a_memory_fault_larger_than_a_target_is_refused_before_anything_is_sent() -> None:
    from controller.tracking import memory_refusals
    from proto.faults import MemorySpec
    from proto.messages import NodeLoad

    def loaded(node: str, total: int) -> NodeView:
        load = NodeLoad(
            cpu_percent=1, cpu_count=2, memory_total_bytes=total, memory_available_bytes=total // 2,
            memory_percent=50, load1=0.1,
        )  # fmt: skip
        hb = Heartbeat(node=node, instance_id="i", version="1", interval_s=1, seq=1, started_at=1.0, load=load)
        return NodeView(hb, time.monotonic(), time.time())

    views = {"small": loaded("small", 8 * 2**30), "big": loaded("big", 256 * 2**30)}
    big = MemorySpec.model_validate({"kind": "memory", "size": "100Gi"})
    assert memory_refusals([big], views) == [
        "node small: spec.faults[0].size: 100Gi is more than the node's memory (8Gi); "
        "set allowOvercommit: true to force it"
    ]
    forced = MemorySpec.model_validate({"kind": "memory", "size": "100Gi", "allowOvercommit": True})
    share = MemorySpec.model_validate({"kind": "memory", "percent": 50})
    assert memory_refusals([forced, share], views) == []
