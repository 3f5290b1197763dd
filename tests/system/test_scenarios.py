"""The world's faults thrown at faultline itself: each scenario checks the machine for residue.

Every scenario runs a real fleet (tests/system/fleet.py): nats-server, agents
and the controller in their own network namespaces, real victim processes.
Times to revert are measured on the victims themselves (polled every 20 ms),
never taken from what the agents report.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import psutil
import pytest

from controller.fleet import Fleet
from controller.report import Report
from proto import subjects
from proto.codec import decode, encode
from proto.messages import Ack, Inject, Lease, Revert
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
    extra_faults: str = "",
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
{extra_faults}  abort: {{heartbeatTimeout: {hb_timeout_s}s, leaseTimeout: {lease_timeout_s}s}}
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


# Pause, network, cpu and memory at once. A rate this low would starve the heartbeats (~1.6 KB/s per agent) if the
# lifeline were not exempt; with it exempt the experiment must run undisturbed.
STARVING_RATE_CPU_MEMORY = """\
    - kind: network
      interface: eth0
      rate: 2kbit
    - kind: cpu
      load: 10
      workers: 1
    - kind: memory
      size: 32Mi
"""


def test_controller_kill9(fleet_factory, row):
    """1. controller kill -9 mid-experiment (pause + network rate limit + cpu + memory on every node)"""
    row.bound = f"every agent reverts everything within leaseTimeout + 1 s = {LEASE_TIMEOUT_S + 1:g} s"
    fleet = fleet_factory(3)
    yaml_text = experiment_yaml(fleet, "s1", extra_faults=STARVING_RATE_CPU_MEMORY)
    ctl = start_and_wait_active(fleet, yaml_text, list(fleet.nodes))
    assert fleet.observer is not None
    wait_until(
        lambda: len({(e.node, e.fault_id) for e in fleet.observer.events_of(state="active")}) == 12,
        20,
        "pause, network, cpu and memory active on all three nodes",
    )
    # the lifeline: with 2 kbit/s on every node's only link, heartbeats still flow (NATS is exempt),
    # so the controller does not abort over an observation window longer than heartbeatTimeout
    window_end = time.monotonic() + HB_TIMEOUT_S + 1.0
    while time.monotonic() < window_end:
        assert ctl.proc.poll() is None, f"the controller ended while faults were active:\n{ctl.stderr()[-2000:]}"
        time.sleep(POLL_S)
    assert fleet.observer.events_of(state="reverted") == [], "a fault ended early: the lifeline was cut?"
    t0 = time.monotonic()
    ctl.kill9()
    took = wait_resumed(fleet.all_victims(), t0, LEASE_TIMEOUT_S + 1, "after the controller died")
    wait_until(
        lambda: not residue(fleet), LEASE_TIMEOUT_S + 1 - (time.monotonic() - t0) + 0.5, "qdiscs and stressors gone"
    )
    row.seconds(max(took, time.monotonic() - t0))
    evs = wait_until(
        lambda: (
            len({(e.node, e.fault_id) for e in fleet.observer.events_of(state="reverted")}) == 12
            and fleet.observer.events_of(state="reverted")
        ),
        5,
        "a reverted event for every fault on every agent",
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
        # an event sent while NATS was down is gone, but the agent repeats the end in its
        # heartbeats (schema 1.1), so the report must know why every fault ended
        assert f.state == "reverted" and "lease lapsed" in (f.reason or ""), (f, rep.problems)
    row.notes.append(f"controller: {rep.outcome}: {rep.abort.reason}")
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
        assert node.agent.settled_journal() == []
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
    row.notes.append(f"controller: aborted: {rep.abort.reason}")
    assert_clean(fleet, row)


# --- 6 ---------------------------------------------------------------------------


def pause_inject(fleet: FleetHarness, exp: str, fid: str, lease_s: float = 30.0, duration_s: float = 30.0) -> Inject:
    return Inject(
        experiment_id=exp,
        fault_id=fid,
        spec={"kind": "process-pause", "match": {"cmdline": fleet.victim_regex}},
        expires_at=time.time() + duration_s,
        lease_timeout_s=lease_s,
    )


def with_version(msg: Any, version: str, **extra: Any) -> bytes:
    obj = json.loads(encode(msg))
    obj["schema_version"] = version
    obj.update(extra)
    return json.dumps(obj).encode()


def test_version_skew(fleet_factory, row):
    """6. version skew: newer minor with an extra field, older, unknown major"""
    row.bound = "1.9 (+ unknown field) and 1.0 understood both ways; 2.x refused with a reason"
    fleet = fleet_factory(1)
    obs = fleet.observer
    assert obs is not None
    victims = fleet.nodes["n1"].victim_procs()

    # a newer controller (1.9, fields we do not know, also inside the spec) -> this agent
    newer = json.loads(with_version(pause_inject(fleet, "skewnew", "skewnew.0", lease_s=2.0), "1.9", priority=7))
    newer["spec"]["rampDown"] = "1s"
    ack = obs.request("n1", json.dumps(newer).encode())
    assert ack.accepted, ack.reason
    wait_paused(victims, 5, "by a 1.9 command")

    async def leases(nc: Any) -> None:  # 1.9 leases with an extra field keep the fault alive
        for seq in range(12):
            lease = Lease(experiment_id="skewnew", seq=seq)
            await nc.publish(subjects.exp_lease("skewnew"), with_version(lease, "1.9", region_hint="r1"))
            await asyncio.sleep(0.25)

    obs.call(leases)
    assert paused(victims), "a 1.9 lease was not understood: the fault lapsed"
    revert = Revert(experiment_id="skewnew", reason="skew", expires_at=time.time() + 10)
    t0 = time.monotonic()
    assert obs.request("n1", with_version(revert, "1.9", batch=1)).accepted
    row.seconds(wait_resumed(victims, t0, 3, "by a 1.9 revert"))

    # an older controller (1.0, exactly our fields)
    assert obs.request("n1", encode(pause_inject(fleet, "skewold", "skewold.0"))).accepted
    wait_paused(victims, 5, "by a 1.0 command")
    assert obs.request("n1", encode(Revert(experiment_id="skewold", expires_at=time.time() + 10))).accepted
    wait_resumed(victims, time.monotonic(), 3, "by a 1.0 revert")

    # an unknown major version is refused, never misread
    v2 = with_version(pause_inject(fleet, "skewv2", "skewv2.0"), "2.0")
    ack = obs.request("n1", v2)
    assert not ack.accepted and "major version 2 is not supported" in (ack.reason or ""), ack
    assert ack.in_reply_to == json.loads(v2)["id"]
    assert not any(victim_status(p) == psutil.STATUS_STOPPED for p in victims)

    # heartbeats the other way: a newer agent (1.9 + a field) is listed, a 2.x one is not
    real = fleet.wait_heartbeats(["n1"], 5)["n1"]

    def forged(node: str, version: str) -> bytes:
        hb = real.model_copy(update={"node": node, "instance_id": f"forged-{node}", "sent_at": time.time()})
        return with_version(hb, version, gpu_count=4)

    async def forge(nc: Any) -> None:
        for _ in range(40):
            await nc.publish(subjects.agent_hb("skew-new"), forged("skew-new", "1.9"))
            await nc.publish(subjects.agent_hb("skew-v2"), forged("skew-v2", "2.0"))
            await asyncio.sleep(0.2)

    forger = obs.spawn(forge)
    listed = {a["node"]: a for a in json.loads(fleet.faultline_agents())}
    forger.result(15)
    assert "n1" in listed and "skew-new" in listed, sorted(listed)
    assert "skew-v2" not in listed
    view = Fleet(nc=None)
    assert view.observe(forged("skew-v2", "2.0")) is None
    assert "major version 2 is not supported" in (view.last_garbage_reason or "")
    row.notes.append(f"2.0 refused: {ack.reason}")
    assert fleet.nodes["n1"].agent.proc is not None and fleet.nodes["n1"].agent.proc.poll() is None
    assert_clean(fleet, row)


# --- 7 ---------------------------------------------------------------------------


def test_zone_outage(fleet_factory, row):
    """7. zone outage: labels {zone: a}, mode all"""
    row.bound = "exactly the zone-a nodes get the fault; reverted within 1 s of its deadline"
    fleet = fleet_factory(6)
    obs = fleet.observer
    assert obs is not None
    zone_a = sorted(n for n, node in fleet.nodes.items() if node.labels["zone"] == "a")
    others = sorted(set(fleet.nodes) - set(zone_a))
    assert zone_a == ["n1", "n2"]
    yaml_text = experiment_yaml(fleet, "s7", duration_s=4, targets="{labels: {zone: a}, mode: all}")
    ctl = start_and_wait_active(fleet, yaml_text, zone_a)
    in_a = [p for n in zone_a for p in fleet.nodes[n].victim_procs()]
    outside = [p for n in others for p in fleet.nodes[n].victim_procs()]
    touched: set[int] = set()

    def resumed_watching_others() -> bool:
        touched.update(p.pid for p in outside if victim_status(p) == psutil.STATUS_STOPPED)
        return all(victim_status(p) != psutil.STATUS_STOPPED for p in in_a)

    wait_until(resumed_watching_others, 10, "zone-a victims resumed at the deadline", POLL_S)
    resumed_at = time.time()
    assert not touched, f"victims outside zone a were paused: {sorted(touched)}"
    ctl.wait(30)
    rep = report_of(ctl)
    assert rep.outcome == "completed" and rep.targets == zone_a, (rep.outcome, rep.targets, rep.problems)
    assert all(f.state == "expired" for f in rep.faults), [(f.node, f.state) for f in rep.faults]
    late = resumed_at - max(f.expires_at or 0.0 for f in rep.faults)
    row.measured = f"{late:.2f} s after the deadline"
    assert late <= 1.0
    assert {e.node for e in obs.events if e.experiment_id == rep.experiment_id} == set(zone_a)
    assert_clean(fleet, row)


# --- 8 ---------------------------------------------------------------------------

FLOOD_COUNT = 10_000
RSS_BOUND_BYTES = 64 * 1024 * 1024


def garbage(rng: random.Random, i: int) -> bytes:
    kind = i % 5
    if i % 100 == 99:
        return b"{" + b"x" * (300 * 1024)  # oversized: refused before parsing
    if kind == 0:
        return rng.randbytes(rng.randint(0, 512))
    if kind == 1:
        return rng.choice([b"{", b"[1,2", b'{"schema_version": "1.0",', b"null", b"\xff\xfe{}", b"{" * 5000])
    if kind == 2:  # valid JSON of the wrong type
        return rng.choice([b"[]", b"42", b'"inject"', b'{"type": "inject"}', b'{"schema_version": 1.0}'])
    if kind == 3:  # a real message of another type: a lease on a command subject, an ack on a heartbeat one
        return encode(Lease(experiment_id="flood", seq=i))
    return encode(Ack(in_reply_to="x", node="ghost", accepted=True))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_garbage_flood(fleet_factory, row):
    """8. garbage flood: 10,000 malformed messages during an experiment"""
    row.bound = f"no crash, experiment completes, RSS growth < {RSS_BOUND_BYTES >> 20} MiB per process"
    fleet = fleet_factory(3)
    obs = fleet.observer
    assert obs is not None
    ctl = start_and_wait_active(fleet, experiment_yaml(fleet, "s8", duration_s=10), list(fleet.nodes))
    pids = {f"agent {n}": node.agent.pid for n, node in fleet.nodes.items()} | {"controller": ctl.proc.pid}
    before = {k: rss(pid) for k, pid in pids.items()}
    targets = [subjects.agent_cmd(n) for n in fleet.nodes] + [subjects.agent_hb(n) for n in fleet.nodes]
    targets.append(subjects.agent_hb("ghost"))

    async def flood(nc: Any) -> float:
        rng = random.Random(8)
        t0 = time.monotonic()
        for i in range(FLOOD_COUNT):
            await nc.publish(targets[i % len(targets)], garbage(rng, i))
            if i % 200 == 199:
                await nc.flush(timeout=10)
        await nc.flush(timeout=10)
        return time.monotonic() - t0

    flood_s = obs.call(flood, timeout_s=120)
    code = ctl.wait(40)
    rep = report_of(ctl)
    after = {k: rss(pid) for k, pid in pids.items() if k != "controller" or ctl.proc.poll() is None}
    assert all(node.agent.proc is not None and node.agent.proc.poll() is None for node in fleet.nodes.values())
    assert code == 0 and rep.outcome == "completed", (rep.outcome, rep.abort, rep.problems)
    fleet.wait_heartbeats(list(fleet.nodes), 5, since=time.time())
    rejected = {n: node.agent.log(since_start=True).count("rejected command") for n, node in fleet.nodes.items()}
    # every command-subject message must have reached an agent and been refused (none dropped unseen)
    per_agent = FLOOD_COUNT // len(targets)
    assert all(c >= per_agent for c in rejected.values()), rejected
    row.notes.append(f"refusals logged per agent {min(rejected.values())}-{max(rejected.values())}")
    growth = {k: after[k] - before[k] for k in after}
    worst = max(growth, key=lambda k: growth[k])
    row.measured = f"flood {flood_s:.1f} s; worst RSS growth {growth[worst] / 2**20:+.1f} MiB ({worst})"
    row.notes.append(f"controller RSS before {before['controller'] / 2**20:.0f} MiB")
    assert all(g < RSS_BOUND_BYTES for g in growth.values()), growth
    assert_clean(fleet, row)


# --- 9 ---------------------------------------------------------------------------


def test_replays_and_duplicates(fleet_factory, row):
    """9. replays and duplicates: same command twice, replay after revert"""
    row.bound = "applied once, never re-injected"
    fleet = fleet_factory(1)
    obs = fleet.observer
    assert obs is not None
    victims = fleet.nodes["n1"].victim_procs()
    cmd = encode(pause_inject(fleet, "dup", "dup.0"))
    first = obs.request("n1", cmd)
    assert first.accepted and first.fault_states == {"dup.0": "accepted"}
    second = obs.request("n1", cmd)
    assert second.accepted and second.in_reply_to == first.in_reply_to

    async def burst(nc: Any) -> list[bytes]:
        replies = await asyncio.gather(*(nc.request(subjects.agent_cmd("n1"), cmd, timeout=3) for _ in range(5)))
        return [r.data for r in replies]

    acks = [decode(data, Ack) for data in obs.call(burst)]
    assert all(a.accepted for a in acks)
    wait_paused(victims, 5, "by the first delivery")
    active = wait_until(lambda: obs.events_of("n1", "active"), 5, "the active event")
    assert sorted(active[0].measurements.hit_pids or []) == sorted(p.pid for p in victims)
    assert len(obs.events_of("n1", "active")) == 1, "a duplicate was applied again"
    assert fleet.nodes["n1"].agent.journal() == ["dup.0.json"]
    t0 = time.monotonic()
    assert obs.request("n1", encode(Revert(experiment_id="dup", expires_at=time.time() + 10))).accepted
    row.seconds(wait_resumed(victims, t0, 3, "after the revert"))
    wait_until(lambda: obs.events_of("n1", "reverted"), 5, "the reverted event")
    replay = obs.request("n1", cmd)
    assert not replay.accepted and "not re-injected" in (replay.reason or ""), replay
    fresh_id = encode(pause_inject(fleet, "dup", "dup.0"))  # same fault, new command id
    again = obs.request("n1", fresh_id)
    assert not again.accepted and "not re-injected" in (again.reason or ""), again
    assert not any(victim_status(p) == psutil.STATUS_STOPPED for p in victims)
    assert len(obs.events_of("n1", "active")) == 1
    row.notes.append("8 deliveries, 1 injection")
    assert_clean(fleet, row)


# --- 10 --------------------------------------------------------------------------


def test_expired_command(fleet_factory, row):
    """10. expiry: a command whose expires_at passed before it arrived"""
    row.bound = "refused as expired; nothing applied"
    fleet = fleet_factory(1)
    obs = fleet.observer
    assert obs is not None
    victims = fleet.nodes["n1"].victim_procs()
    stale = Inject(
        experiment_id="late",
        fault_id="late.0",
        spec={"kind": "process-pause", "match": {"cmdline": fleet.victim_regex}},
        sent_at=time.time() - 10,
        expires_at=time.time() - 5,
        lease_timeout_s=30,
    )
    ack = obs.request("n1", encode(stale))
    assert not ack.accepted and "expired" in (ack.reason or ""), ack
    ev = wait_until(lambda: obs.events_of("n1", "rejected"), 5, "a rejected event")
    assert ev[0].fault_id == "late.0" and "expired" in (ev[0].reason or "")
    assert not any(victim_status(p) == psutil.STATUS_STOPPED for p in victims)
    assert fleet.nodes["n1"].agent.settled_journal() == []
    row.notes.append(f"refused: {ack.reason}")
    assert_clean(fleet, row)
