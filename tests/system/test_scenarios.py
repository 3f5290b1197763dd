"""The world's faults thrown at faultline itself: each scenario checks the machine for residue.

Every scenario runs a real fleet (tests/system/fleet.py): nats-server, agents
and the controller in their own network namespaces, real victim processes.
Times to revert are measured on the victims themselves (polled every 20 ms),
never taken from what the agents report.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from controller.report import Report
from tests.conftest import wait_until
from tests.system.fleet import Controller, FleetHarness, victim_status
from tests.system.report import Row
from tests.system.residue import residue

pytestmark = pytest.mark.system

HB_TIMEOUT_S = 2.0
LEASE_TIMEOUT_S = 3.0
POLL_S = 0.02


def experiment_yaml(
    fleet: FleetHarness,
    name: str,
    duration_s: float = 30.0,
    targets: str = "{mode: all}",
    hb_timeout_s: float = HB_TIMEOUT_S,
    lease_timeout_s: float = LEASE_TIMEOUT_S,
) -> str:
    return f"""\
apiVersion: faultline/v1
kind: Experiment
metadata: {{name: {name}}}
spec:
  duration: {duration_s}s
  targets: {targets}
  faults:
    - kind: process-pause
      match: {{cmdline: '{fleet.victim_regex}'}}
  abort: {{heartbeatTimeout: {hb_timeout_s}s, leaseTimeout: {lease_timeout_s}s}}
"""


def paused(procs: list[psutil.Process]) -> bool:
    return bool(procs) and all(victim_status(p) == psutil.STATUS_STOPPED for p in procs)


def wait_paused(procs: list[psutil.Process], timeout_s: float, what: str) -> None:
    wait_until(lambda: paused(procs), timeout_s, f"victims paused: {what}", POLL_S)


def wait_resumed(procs: list[psutil.Process], t0: float, timeout_s: float, what: str) -> float:
    """Seconds from t0 (monotonic) until none of procs is stopped, as seen on the machine."""
    wait_until(
        lambda: all(victim_status(p) != psutil.STATUS_STOPPED for p in procs),
        timeout_s,
        f"victims resumed: {what}",
        POLL_S,
    )
    return time.monotonic() - t0


def report_of(ctl: Controller) -> Report:
    out = ctl.output()
    try:
        data = json.loads(out)
        # the JSON carries derived fields (duration_s) besides the model's own
        return Report.model_validate({k: v for k, v in data.items() if k in Report.model_fields})
    except ValueError:
        raise AssertionError(f"controller printed no JSON report:\n{out[-2000:]}\n{ctl.stderr()}") from None


def start_and_wait_active(fleet: FleetHarness, yaml_text: str, nodes: list[str]) -> Controller:
    ctl = fleet.run_controller(yaml_text)
    procs = [p for n in nodes for p in fleet.nodes[n].victim_procs()]
    try:
        wait_paused(procs, 20, f"on {', '.join(nodes)}")
    except AssertionError:
        raise AssertionError(f"experiment never became active:\n{ctl.stderr()}") from None
    return ctl


def assert_clean(fleet: FleetHarness, row: Row) -> None:
    found = residue(fleet)
    row.residue += found
    assert not found, "residue on the machine:\n" + "\n".join(found)


# --- 1 ---------------------------------------------------------------------------


def test_controller_kill9(fleet_factory, row):
    """1. controller kill -9 mid-experiment"""
    row.bound = f"every agent reverts within leaseTimeout + 1 s = {LEASE_TIMEOUT_S + 1:g} s"
    fleet = fleet_factory(3)
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s1"), list(fleet.nodes))
    t0 = time.monotonic()
    ctl.kill9()
    took = wait_resumed(fleet.all_victims(), t0, LEASE_TIMEOUT_S + 1, "after the controller died")
    row.seconds(took)
    assert fleet.observer is not None
    evs = wait_until(
        lambda: (
            len({e.node for e in fleet.observer.events_of(state="reverted")}) == 3
            and fleet.observer.events_of(state="reverted")
        ),
        5,
        "a reverted event from every agent",
    )
    assert all("lease lapsed" in (e.reason or "") for e in evs), [e.reason for e in evs]
    row.notes.append("agents report: lease lapsed")
    assert_clean(fleet, row)


# --- 2 ---------------------------------------------------------------------------


def test_nats_kill9_and_back(fleet_factory, row):
    """2. NATS kill -9 mid-experiment, then back on the same address"""
    row.bound = f"revert within {LEASE_TIMEOUT_S + 1:g} s; reconnect without restart"
    fleet = fleet_factory(3)
    assert fleet.observer is not None
    before = {n: h.instance_id for n, h in fleet.wait_heartbeats(list(fleet.nodes), 5).items()}
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s2"), list(fleet.nodes))
    t0 = time.monotonic()
    fleet.kill9_nats()
    took = wait_resumed(fleet.all_victims(), t0, LEASE_TIMEOUT_S + 1, "after NATS died")
    row.seconds(took)
    fleet.start_nats()
    back = time.time()
    after = fleet.wait_heartbeats(list(fleet.nodes), 20, since=back)
    assert {n: h.instance_id for n, h in after.items()} == before, "an agent restarted instead of reconnecting"
    listed = {a["node"] for a in json.loads(fleet.faultline_agents())}
    assert listed == set(fleet.nodes)
    for name, node in fleet.nodes.items():
        # events published on reconnect reach whoever is subscribed by then (core NATS is at-most-once),
        # so the agent's own log is the evidence of why it reverted
        log = node.agent.log(since_start=True)
        assert "reverted: lease lapsed" in log or "reverted: NATS unreachable" in log, f"{name}:\n{log[-1500:]}"
    ctl.wait(30)
    rep = report_of(ctl)
    assert rep.outcome == "aborted" and rep.abort is not None, rep
    for f in rep.faults:
        # the report either heard the agent's end (and says why) or says it did not
        heard = f.state == "reverted" and "lease lapsed" in (f.reason or "")
        assert heard or any(f.node in p for p in rep.problems), (f, rep.problems)
    row.notes.append(f"controller: {rep.outcome} ({rep.abort.reason[:60]})")
    assert_clean(fleet, row)


# --- 3 ---------------------------------------------------------------------------


def test_one_agent_cut_off(fleet_factory, row):
    """3. one agent cut off (link down)"""
    row.bound = (
        f"rest reverted by the controller within heartbeatTimeout + 1 s = {HB_TIMEOUT_S + 1:g} s; "
        f"cut-off agent on its own within {LEASE_TIMEOUT_S + 1:g} s"
    )
    fleet = fleet_factory(3)
    assert fleet.observer is not None
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s3"), list(fleet.nodes))
    t0 = time.monotonic()
    fleet.cut("n1")
    rest = fleet.nodes["n2"].victim_procs() + fleet.nodes["n3"].victim_procs()
    took_rest = wait_resumed(rest, t0, HB_TIMEOUT_S + 1, "the rest, reverted by the controller's abort")
    took_cut = wait_resumed(fleet.nodes["n1"].victim_procs(), t0, LEASE_TIMEOUT_S + 1, "the cut-off agent")
    row.measured = f"rest {took_rest:.2f} s, cut-off {took_cut:.2f} s"
    ctl.wait(30)
    rep = report_of(ctl)
    assert rep.outcome == "aborted" and rep.abort is not None
    assert rep.abort.node == "n1" and "silent" in rep.abort.reason, rep.abort
    by_node = {f.node: f for f in rep.faults}
    assert by_node["n2"].state == "reverted" and by_node["n3"].state == "reverted"
    # the controller cannot know n1's end: it must not claim it, and must say why
    assert by_node["n1"].state not in ("reverted", "expired")
    assert any("n1" in p and "lease" in p for p in rep.problems), rep.problems
    fleet.heal("n1")
    ev = wait_until(
        lambda: fleet.observer.events_of(node="n1", state="reverted"), 20, "n1's reverted event after healing"
    )
    assert "lease lapsed" in (ev[0].reason or "")
    row.notes.append("n1 reported 'lease lapsed' after healing")
    assert_clean(fleet, row)


# --- 4 ---------------------------------------------------------------------------


def test_agent_kill9_journal_recovery(fleet_factory, row):
    """4. agent kill -9 holding faults, restart"""
    row.bound = "journal recovery reverts before the agent is ready"
    fleet = fleet_factory(2)
    assert fleet.observer is not None
    # a generous heartbeatTimeout: the controller sees the restart (not silence) and hears the recovery
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s4", hb_timeout_s=8), list(fleet.nodes))
    n1 = fleet.nodes["n1"]
    t0 = time.monotonic()
    fleet.kill9_agent("n1")
    assert paused(n1.victim_procs()), "victims resumed although nothing reverted them"
    assert len(n1.agent.journal()) == 1
    fleet.start_agent("n1")
    assert not paused(n1.victim_procs()), "the agent was ready with its victims still paused"
    took = wait_resumed(n1.victim_procs(), t0, 1, "recovered")
    row.measured = f"{took:.2f} s from kill -9 to reverted (restart included)"
    ctl.wait(30)
    rep = report_of(ctl)
    assert rep.outcome == "aborted" and rep.abort is not None and rep.abort.node == "n1"
    f1 = next(f for f in rep.faults if f.node == "n1")
    assert f1.state == "reverted" and "recovered from journal" in (f1.reason or ""), f1
    assert f1.measurements.recovered_from_journal
    hb = fleet.wait_heartbeats(["n1"], 5, since=time.time())["n1"]
    assert f1.fault_id in hb.recovered
    row.notes.append("report: recovered from journal")
    assert_clean(fleet, row)


# --- 5 ---------------------------------------------------------------------------


def test_rolling_restart(fleet_factory, row):
    """5. rolling SIGTERM restart of every agent during an experiment"""
    row.bound = "each agent reverts before it exits; new agents start clean"
    fleet = fleet_factory(3)
    obs = fleet.observer
    assert obs is not None
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s5"), list(fleet.nodes))
    worst = 0.0
    for name, node in fleet.nodes.items():
        t0 = time.monotonic()
        old = node.agent.pid
        assert fleet.sigterm_agent(name) == 0
        exited = time.monotonic() - t0
        assert not any(victim_status(p) == psutil.STATUS_STOPPED for p in node.victim_procs()), (
            f"{name} exited with paused victims"
        )
        assert node.agent.journal() == []
        worst = max(worst, exited)
        leaving = wait_until(
            lambda n=name: [h for h in obs.heartbeats_of(n) if h.state == "leaving"], 5, f"{name}'s leaving heartbeat"
        )
        assert leaving[-1].faults == []
        fleet.start_agent(name)
        assert node.agent.pid != old
        fresh = fleet.wait_heartbeats([name], 5, since=time.time())[name]
        assert fresh.faults == [] and fresh.recovered == [] and fresh.instance_id != leaving[-1].instance_id
    row.measured = f"<= {worst:.2f} s from SIGTERM to exit, reverted before"
    ctl.wait(30)
    rep = report_of(ctl)
    assert rep.outcome == "aborted" and rep.abort is not None
    # the first target that left ends the experiment, and the report says it was a stop (SIGTERM)
    assert rep.abort.node == "n1" and ("leaving" in rep.abort.reason or "SIGTERM" in rep.abort.reason), rep.abort
    f1 = next(f for f in rep.faults if f.node == "n1")
    assert f1.state == "reverted" and "SIGTERM" in (f1.reason or ""), f1
    assert all(f.state == "reverted" for f in rep.faults), [(f.node, f.state) for f in rep.faults]
    row.notes.append(f"controller: aborted ({rep.abort.reason[:50]})")
    assert_clean(fleet, row)
