"""Control-plane latency with N simulated agents in one process. Prints a table; not a test.

    /work/venv/bin/python bench/bench_control_plane.py [--sizes 10,100,1000] [--rounds 20,20,10]

Each simulated agent is the real ``agent.runtime.AgentRuntime`` (run() as a
task: probe, journal recovery, its own NATS connection, subscriptions,
heartbeat and watchdog loops), with a no-op ``process-pause`` injector and its
journal on tmpfs (/dev/shm). One real nats-server (controller.natsserver).

Per round, with a fresh experiment id:
- dispatch->all-acked: the controller's own ``controller.dispatch.request_acks``
  for every node at once, as ExperimentRunner._dispatch_faults does (one
  Inject built and encoded inside the timed window); ends at the last Ack.
- abort->all-reverted: the engine's abort path: ``controller.dispatch.broadcast_revert``
  (one publish), per-node ``revert_experiment`` only for nodes not heard
  from; ends when a "reverted" FaultEvent from every node has arrived on the
  experiment's events subject (decoded, as the engine does).
Once every agent is up, ``agent.runtime.release_startup_memory()`` runs once
(as in every real agent process when it is ready), and the cyclic garbage
collector is switched off for the rounds (``--gc`` keeps it on): this one
process holds the heaps of N agents, so each collection walks N agents'
objects and collections come N times as often, a cost that grows with N^2 and
that no real agent (its own process, a small heap) pays. Reference counting
still frees everything; at N = 1000 the collector added about 20 % to dispatch
and a few per cent to abort in our runs.
Diagnostic rounds alternate with the measured ones: the same dispatch, but
each agent's plan (and so its journal write and apply) waits until the
controller has every Ack: the ack path alone, without the fault work that a
single process interleaves with it.
The floor, in the same run before the agents start: raw nats-py, one publisher
and N subscriber connections in this process, one publish, until every
subscriber got it (median). Two raw lower bounds are printed beside it, no
faultline code and no decoding in either: a request-reply fan-out (N
subjects, N replies: the same messages dispatch sends) and a broadcast with N
acks (one publish, every subscriber answers to one reply subject: the
cheapest any dispatch that collects an answer per node could be).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import uvloop

from agent.config import AgentSettings, IdentitySettings, NatsSettings, TimingSettings
from agent.faults.base import AgentEnv, Capability, FaultContext, Injector, Plan
from agent.nodeload import LoadSampler
from agent.runtime import AgentRuntime, release_startup_memory
from controller.dispatch import broadcast_revert, request_acks, revert_experiment
from controller.experiment import fault_id
from controller.natsserver import NatsServer
from proto.codec import DecodeError, decode, decode_command, encode
from proto.faults import ProcessMatch, ProcessPauseSpec
from proto.messages import Ack, FaultEvent, Inject, Measurements, Revert
from proto.subjects import exp_events

SHM = Path("/dev/shm")
START_BATCH = 100
BROADCAST_WAIT_S = 1.0  # as ExperimentRunner's broadcast_wait_s
SETTLE_S = 1.0  # pause between rounds (see bench_size)
WAIT_S = 60.0  # bound on any single wait in a round


APPLY_GATE: asyncio.Event | None = None


class NoopPlan(Plan):
    noop: bool = True


class NoopInjector(Injector):
    """Accepts every process-pause and touches nothing: measures the control plane alone."""

    kind = "process-pause"
    plan_model = NoopPlan

    def probe(self) -> list[Capability]:
        return [Capability(self.kind, True)]

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        if APPLY_GATE is not None:  # diagnostic rounds: the fault's work waits for every Ack
            await APPLY_GATE.wait()
        return NoopPlan()

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        return Measurements()

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        return Measurements()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if want < need:
        raise SystemExit(f"file-descriptor hard limit {hard} < {need} needed; run with a higher ulimit -Hn")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def quiet_connect(url: str) -> Any:
    async def quiet(exc: Exception) -> None:
        logging.getLogger("bench").debug("nats: %s", exc)

    return await nats.connect(url, connect_timeout=5, allow_reconnect=False, error_cb=quiet)


async def close_all(conns: list[Any]) -> None:
    async def one(nc: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5.0)

    await asyncio.gather(*(one(nc) for nc in conns))


# --- the floor ---------------------------------------------------------------


async def floor(url: str, n: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """(fan-out times, raw request-reply times, raw broadcast-and-ack times), seconds."""
    subs: list[Any] = []
    for i in range(0, n, START_BATCH):
        subs += await asyncio.gather(*(quiet_connect(url) for _ in range(i, min(n, i + START_BATCH))))
    pub = await quiet_connect(url)
    token = uuid.uuid4().hex[:8]
    got = 0
    done = asyncio.Event()
    acks = 0
    all_acked = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    async def echo(msg: Any) -> None:
        await msg.respond(b"ok")

    async def on_ack(msg: Any) -> None:
        nonlocal acks
        acks += 1
        if acks == n:
            all_acked.set()

    for i, nc in enumerate(subs):
        await nc.subscribe(f"bench.floor.{token}", cb=on_msg)
        await nc.subscribe(f"bench.rr.{token}.{i}", cb=echo)
        await nc.subscribe(f"bench.bc.{token}", cb=echo)
    await pub.subscribe(f"bench.acks.{token}", cb=on_ack)
    await asyncio.gather(pub.flush(timeout=10), *(nc.flush(timeout=10) for nc in subs))
    fan: list[float] = []
    rr: list[float] = []
    bc: list[float] = []
    payload = b"x" * 400  # about an Inject's size
    try:
        for _ in range(rounds + 1):  # first round warms up
            got = 0
            done.clear()
            t0 = time.perf_counter()
            await pub.publish(f"bench.floor.{token}", payload)
            await asyncio.wait_for(done.wait(), WAIT_S)
            fan.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(pub.request(f"bench.rr.{token}.{i}", payload, timeout=WAIT_S) for i in range(n)))
            rr.append(time.perf_counter() - t0)
            acks = 0
            all_acked.clear()
            t0 = time.perf_counter()
            await pub.publish(f"bench.bc.{token}", payload, reply=f"bench.acks.{token}")
            await asyncio.wait_for(all_acked.wait(), WAIT_S)
            bc.append(time.perf_counter() - t0)
    finally:
        await close_all([*subs, pub])
    return fan[1:], rr[1:], bc[1:]


# --- the agents --------------------------------------------------------------


def agent_settings(url: str, node: str, state_root: Path) -> AgentSettings:
    return AgentSettings(
        identity=IdentitySettings(node=node),
        nats=NatsSettings(urls=[url]),
        timing=TimingSettings(heartbeat_interval_s=1.0),
        state_dir=state_root / node,
    )


# One node, many simulated agents: they share one psutil sampler (a real agent has its own).
SHARED_LOAD = LoadSampler()


def make_runtime(url: str, node: str, state_root: Path) -> AgentRuntime:
    settings = agent_settings(url, node, state_root)
    env = AgentEnv(node=node, state_dir=settings.state_dir, instance_id="bench", protected_pids=dict)
    return AgentRuntime(settings, injectors={"process-pause": NoopInjector(env)}, load_sampler=SHARED_LOAD)


async def start_agents(
    ctl: Any, url: str, n: int, state_root: Path
) -> tuple[list[AgentRuntime], list[asyncio.Task[int]]]:
    """Start n runtimes in batches; each is proven subscribed by a harmless Revert answered."""
    runtimes: list[AgentRuntime] = []
    tasks: list[asyncio.Task[int]] = []
    for i in range(0, n, START_BATCH):
        batch = [make_runtime(url, f"bench-{j:04d}", state_root) for j in range(i, min(n, i + START_BATCH))]
        runtimes += batch
        tasks += [asyncio.create_task(rt.run(), name=f"agent:{rt.node}") for rt in batch]
        probe = Revert(experiment_id="bench-warmup", reason="bench readiness probe", expires_at=time.time() + 60)
        acks = await request_acks(ctl, {rt.node: encode(probe) for rt in batch}, timeout_s=10.0, attempts=30)
        missing = [(node, why) for node, (ack, why) in acks.items() if ack is None]
        if missing:
            raise RuntimeError(f"agents did not come up: {missing[:5]}")
    return runtimes, tasks


async def stop_agents(runtimes: list[AgentRuntime], tasks: list[asyncio.Task[int]]) -> None:
    for rt in runtimes:
        rt.request_stop()
    _, pending = await asyncio.wait(tasks, timeout=60.0)
    for t in pending:
        t.cancel()
    if pending:
        print(f"  warning: {len(pending)} agent(s) did not stop within 60s")


class Round:
    """Collects one experiment's events: which nodes reached which state, when the last one did."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.active: set[str] = set()
        self.reverted: set[str] = set()
        self.bad: list[str] = []
        self.all_active = asyncio.Event()
        self.all_reverted = asyncio.Event()
        self.reverted_at = 0.0

    async def on_event(self, msg: Any) -> None:
        try:
            ev = decode(msg.data, FaultEvent)
        except DecodeError as exc:
            self.bad.append(f"undecodable event: {exc}")
            return
        if ev.state == "active":
            self.active.add(ev.node)
            if len(self.active) == self.n:
                self.all_active.set()
        elif ev.state == "reverted":
            self.reverted.add(ev.node)
            if len(self.reverted) == self.n:
                self.reverted_at = time.perf_counter()
                self.all_reverted.set()
        elif ev.state in ("failed", "rejected", "expired"):
            self.bad.append(f"{ev.node}: {ev.state} {ev.reason}")


async def one_round(ctl: Any, nodes: list[str], lease_timeout_s: float, hold: bool = False) -> tuple[float, float]:
    """(dispatch->all-acked, abort->all-reverted) in seconds. ``hold``: every agent's plan
    (and so its journal write and apply) waits until all Acks are in: the ack path alone."""
    global APPLY_GATE
    APPLY_GATE = asyncio.Event() if hold else None
    exp = "b" + uuid.uuid4().hex[:16]
    rnd = Round(len(nodes))
    sub = await ctl.subscribe(exp_events(exp), cb=rnd.on_event)
    await ctl.flush(timeout=5)
    spec = ProcessPauseSpec(match=ProcessMatch(name="bench-noop"))
    fid = fault_id(exp, 0)
    try:
        t0 = time.perf_counter()
        # as ExperimentRunner._dispatch_faults: a node-level fault is one command, encoded once
        inject = Inject(
            experiment_id=exp,
            fault_id=fid,
            spec=spec,
            expires_at=time.time() + 120.0,
            lease_timeout_s=lease_timeout_s,
        )
        acks = await request_acks(ctl, dict.fromkeys(nodes, encode(inject)), timeout_s=10.0, attempts=1)
        dispatch_s = time.perf_counter() - t0
        if APPLY_GATE is not None:
            APPLY_GATE.set()
        refused = [
            (n, why or (ack.reason if ack else None))
            for n, (ack, why) in acks.items()
            if ack is None or not ack.accepted
        ]
        if refused:
            raise RuntimeError(f"{len(refused)} inject(s) not accepted, e.g. {refused[0]}")
        try:
            await asyncio.wait_for(rnd.all_active.wait(), WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"only {len(rnd.active)}/{len(nodes)} faults active after {WAIT_S}s") from None
        t0 = time.perf_counter()
        # the engine's abort path: one broadcast, then per-node Reverts only for nodes not heard from
        why = await broadcast_revert(ctl, exp, "bench abort")
        if why is not None:
            raise RuntimeError(why)
        try:
            await asyncio.wait_for(rnd.all_reverted.wait(), BROADCAST_WAIT_S)
        except TimeoutError:
            stragglers = [n for n in nodes if n not in rnd.reverted]
            results = await revert_experiment(ctl, stragglers, exp, "bench abort", timeout_s=10.0)
            noack = [n for n, (ack, _) in results.items() if ack is None]
            if noack:
                raise RuntimeError(f"revert not acked by {noack[:5]}") from None
            try:
                await asyncio.wait_for(rnd.all_reverted.wait(), WAIT_S)
            except TimeoutError:
                raise RuntimeError(
                    f"only {len(rnd.reverted)}/{len(nodes)} reverted after {WAIT_S}s: {rnd.bad[:3]}"
                ) from None
        abort_s = rnd.reverted_at - t0
        if rnd.bad:
            raise RuntimeError(f"bad events {rnd.bad[:3]}")
        return dispatch_s, abort_s
    finally:
        if APPLY_GATE is not None:
            APPLY_GATE.set()  # never leave an agent waiting
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def bench_size(url: str, n: int, rounds: int, tmp_root: Path | None, keep_gc: bool) -> dict[str, float]:
    fan, rr, bc = await floor(url, n, rounds)
    state_root = Path(tempfile.mkdtemp(prefix=f"faultline-bench-{n}-", dir=tmp_root))
    ctl = await quiet_connect(url)
    runtimes: list[AgentRuntime] = []
    tasks: list[asyncio.Task[int]] = []
    try:
        t_start = time.perf_counter()
        runtimes, tasks = await start_agents(ctl, url, n, state_root)
        start_s = time.perf_counter() - t_start
        release_startup_memory()
        if not keep_gc:
            # One process holds the heaps of N agents, so every cyclic collection walks N
            # agents' objects and runs N times as often: an artefact a real agent (its own
            # process, a small heap) does not have. Reference counting still frees everything.
            gc.disable()
        nodes = [rt.node for rt in runtimes]
        await one_round(ctl, nodes, lease_timeout_s=120.0)  # warm-up, not counted
        dispatch: list[float] = []
        abort: list[float] = []
        held: list[float] = []
        for _ in range(rounds):
            # rounds start settled: agents drop journal entries in a batch 0.5 s after a revert,
            # which would otherwise land inside the next round's dispatch window
            await asyncio.sleep(SETTLE_S)
            d, a = await one_round(ctl, nodes, lease_timeout_s=120.0)
            dispatch.append(d)
            abort.append(a)
            await asyncio.sleep(SETTLE_S)
            held.append((await one_round(ctl, nodes, lease_timeout_s=120.0, hold=True))[0])
    finally:
        gc.enable()
        await stop_agents(runtimes, tasks)
        await close_all([ctl])
        shutil.rmtree(state_root, ignore_errors=True)
    return {
        "n": n,
        "rounds": rounds,
        "start_s": start_s,
        "d50": pct(dispatch, 50),
        "d99": pct(dispatch, 99),
        "floor50": statistics.median(fan),
        "rr50": statistics.median(rr),
        "bc50": statistics.median(bc),
        "h50": pct(held, 50),
        "a50": pct(abort, 50),
        "a99": pct(abort, 99),
    }


def message_costs(reps: int = 20000) -> list[tuple[str, float]]:
    """Per-message CPU of the wire work every dispatch does per agent, microseconds (median of 5 runs)."""
    inject = encode(
        Inject(
            experiment_id="bcost",
            fault_id=fault_id("bcost", 0),
            spec=ProcessPauseSpec(match=ProcessMatch(name="bench-noop")),
            expires_at=time.time() + 120.0,
            lease_timeout_s=120.0,
        )
    )
    cmd = decode_command(inject)
    ack_bytes = encode(
        Ack(in_reply_to=cmd.id, node="bench-0000", accepted=True, fault_states={cmd.fault_id: "accepted"})
    )

    def build_ack() -> bytes:
        return encode(
            Ack(in_reply_to=cmd.id, node="bench-0000", accepted=True, fault_states={cmd.fault_id: "accepted"})
        )

    steps = [
        ("agent: decode and validate the Inject", lambda: decode_command(inject)),
        ("agent: build and encode the Ack", build_ack),
        ("controller: decode and validate the Ack", lambda: decode(ack_bytes, Ack)),
    ]
    out = []
    for name, fn in steps:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps // 5):
                fn()
            runs.append((time.perf_counter() - t0) / (reps // 5))
        out.append((name, statistics.median(runs) * 1e6))
    return out


def ms(s: float) -> str:
    return f"{s * 1000:.1f}"


def print_table(rows: list[dict[str, float]]) -> None:
    print()
    print(
        "dispatch: controller.dispatch.request_acks (one batch, one inbox), as the engine; "
        "abort: controller.dispatch.broadcast_revert (per-node revert_experiment for stragglers, as the engine)"
    )
    print()
    print(
        "| N | rounds | dispatch→all-acked p50 / p99 (ms) | floor p50 (ms) | ratio | abort→all-reverted p50 / p99 (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {int(r['n'])} | {int(r['rounds'])} | {ms(r['d50'])} / {ms(r['d99'])} | {ms(r['floor50'])} | "
            f"{r['d50'] / r['floor50']:.1f}× | {ms(r['a50'])} / {ms(r['a99'])} |"
        )
    print()
    print("diagnostics:")
    print()
    print(
        "| N | raw broadcast + N acks, p50 (ms) | raw request-reply fan-out p50 (ms) | dispatch / raw req-reply "
        "| dispatch with the apply held until all acked, p50 (ms) | agents start (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {int(r['n'])} | {ms(r['bc50'])} ({r['bc50'] / r['floor50']:.1f}× floor) "
            f"| {ms(r['rr50'])} ({r['rr50'] / r['floor50']:.1f}× floor) | {r['d50'] / r['rr50']:.1f}× "
            f"| {ms(r['h50'])} ({r['h50'] / r['floor50']:.1f}× floor) | {r['start_s']:.1f} |"
        )


async def main_async(url: str, sizes: list[int], rounds: list[int], tmp_root: Path | None, keep_gc: bool) -> None:
    rows = []
    load0 = os.getloadavg()[0]
    for n, r in zip(sizes, rounds, strict=True):
        t0 = time.perf_counter()
        rows.append(await bench_size(url, n, r, tmp_root, keep_gc))
        print(f"  N={n}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    print_table(rows)
    costs = message_costs()
    print()
    print("| wire work per agent, CPU (µs) | |")
    print("|---|---:|")
    for name, us in costs:
        print(f"| {name} | {us:.1f} |")
    print(f"| sum | {sum(us for _, us in costs):.1f} |")
    # one process on a 2-core machine: anything else running skews every figure
    print(f"\ncyclic GC during the rounds: {'on (--gc)' if keep_gc else 'off (see --help)'}")
    print(f"load average (1 min) at start {load0:.2f}, at end {os.getloadavg()[0]:.2f}; cpus {os.cpu_count()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="comma-separated N values")
    ap.add_argument("--rounds", default="20,20,10", help="comma-separated rounds per N")
    ap.add_argument("--gc", action="store_true", help="keep the cyclic GC on during the rounds (see the module doc)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rounds = [int(x) for x in args.rounds.split(",")]
    if len(rounds) != len(sizes):
        raise SystemExit("--rounds needs one value per --sizes value")
    logging.basicConfig(level=logging.ERROR)
    raise_fd_limit(2 * max(sizes) + 200)  # before the nats-server starts: it inherits the limit
    tmp_root = SHM if SHM.is_dir() else None  # journals on tmpfs
    with NatsServer() as server, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert server.url is not None
        runner.run(main_async(server.url, sizes, rounds, tmp_root, args.gc))


if __name__ == "__main__":
    main()
