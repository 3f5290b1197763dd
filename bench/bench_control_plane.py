"""Control-plane latency with N simulated agents in one process. Prints a table; not a test.

    python bench/bench_control_plane.py [--sizes 10,100,1000] [--rounds 20,20,10]

Each simulated agent is the real ``agent.runtime.AgentRuntime`` (run() as a
task: probe, journal recovery, its own NATS connection, subscriptions,
heartbeat loop and watchdog), with a no-op ``process-pause`` injector and its
journal on tmpfs (/dev/shm). One real nats-server (controller.natsserver).

Per round, with a fresh experiment id, the engine's own path
(ExperimentRunner._dispatch_faults and _start):
- dispatch->all-acked: ``controller.dispatch.request_acks`` for every node at
  once with one Inject that waits for its start (await_start, encoded once,
  inside the timed window); ends at the last Ack. Nothing is applied yet.
- start->all-active: ``controller.dispatch.broadcast_start`` (one publish),
  per-node ``start_experiment`` only for nodes not seen starting within 1 s;
  ends when an "active" FaultEvent from every node has arrived (decoded, as
  the engine does): every fault journaled and applied.
- abort->all-reverted: the engine's abort path: ``broadcast_revert`` (one
  publish), per-node ``revert_experiment`` only for nodes not heard from;
  ends when a "reverted" FaultEvent from every node has arrived.
Diagnostic rounds alternate with the measured ones: the same dispatch with an
Inject that starts on acceptance (what agents older than schema 1.2 do, and
what every dispatch did before the start phase): each agent's journal write
and apply then run in this one process between other agents' Acks.

Once every agent is up, ``agent.lean.release_startup_memory()`` runs once
(as in every real agent process when it is ready), and the cyclic garbage
collector is switched off for the rounds (``--gc`` keeps it on): this one
process holds the heaps of N agents, so each collection walks N agents'
objects and collections come N times as often, a cost that grows with N^2 and
that no real agent (its own process, a small heap) pays. Reference counting
still frees everything.

The floor, in the same run: raw nats-py, one publisher and N subscriber
connections in this process, one publish, until every subscriber got it
(median). It is measured before the agents start (the clean floor, the one the
ratio uses) and again in every round while the N agents are running (the
same fan-out, now sharing the process with the agents). Raw lower bounds are
printed beside it, no faultline code and no decoding in any: N requests and N
replies shaped as dispatch sends them (back to back, one inbox subscription), a
broadcast with N acks (one publish, every subscriber answers to one reply
subject), and, once per round, the same N requests through the running agents'
own connections (class Transport): the bound dispatch can reach in this process,
alone and with the wire work the protocol requires (decode the Inject, encode
the Ack, decode the Ack; no record, timer or check). The abort gets the same
two bounds: one broadcast, every agent publishes one event (fixed, or decoding
the Revert and encoding a FaultEvent), until every event arrived.
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

import uvloop
from raw_bounds import WAIT_S, Floor, Transport, close_all, message_costs, quiet_connect, wire_inject
from sim_agents import start_agents, stop_agents

from agent.lean import release_startup_memory
from agent.runtime import AgentRuntime
from controller.dispatch import (
    broadcast_revert,
    broadcast_start,
    request_acks,
    revert_experiment,
    start_experiment,
)
from controller.experiment import fault_id
from controller.natsserver import NatsServer
from proto.codec import DecodeError, decode, encode
from proto.faults import ProcessMatch, ProcessPauseSpec
from proto.messages import FaultEvent, Inject
from proto.subjects import exp_events

SHM = Path("/dev/shm")
BROADCAST_WAIT_S = 1.0  # as ExperimentRunner's broadcast_wait_s (for the start and the abort)
SETTLE_S = 1.0  # pause between rounds (see bench_size)


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


class Round:
    """Collects one experiment's events: which nodes reached which state, when the last one did."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.active: set[str] = set()
        self.reverted: set[str] = set()
        self.bad: list[str] = []
        self.all_active = asyncio.Event()
        self.all_reverted = asyncio.Event()
        self.active_at = 0.0
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
                self.active_at = time.perf_counter()
                self.all_active.set()
        elif ev.state == "reverted":
            self.reverted.add(ev.node)
            if len(self.reverted) == self.n:
                self.reverted_at = time.perf_counter()
                self.all_reverted.set()
        elif ev.state in ("failed", "rejected", "expired"):
            self.bad.append(f"{ev.node}: {ev.state} {ev.reason}")


class Times:
    """One round's figures, seconds."""

    def __init__(self, dispatch: float, start: float, end_to_end: float, abort: float) -> None:
        self.dispatch, self.start, self.end_to_end, self.abort = dispatch, start, end_to_end, abort


async def one_round(ctl: Any, nodes: list[str], lease_timeout_s: float, await_start: bool = True) -> Times:
    """One experiment through dispatch, start and abort. ``await_start=False``: the Inject starts on
    acceptance (agents before schema 1.2), and start is the time from the last Ack to all active."""
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
            await_start=await_start,
        )
        acks = await request_acks(ctl, dict.fromkeys(nodes, encode(inject)), timeout_s=10.0, attempts=1)
        t_acked = time.perf_counter()
        refused = [
            (n, why or (ack.reason if ack else None))
            for n, (ack, why) in acks.items()
            if ack is None or not ack.accepted
        ]
        if refused:
            raise RuntimeError(f"{len(refused)} inject(s) not accepted, e.g. {refused[0]}")
        if await_start:
            # as ExperimentRunner._start: one broadcast, then per-node Starts for nodes not seen starting
            why = await broadcast_start(ctl, exp)
            if why is not None:
                raise RuntimeError(why)
            try:
                await asyncio.wait_for(rnd.all_active.wait(), BROADCAST_WAIT_S)
            except TimeoutError:
                late = [n for n in nodes if n not in rnd.active]
                results = await start_experiment(ctl, late, exp, [fid], timeout_s=10.0)
                noack = [n for n, (ack, _) in results.items() if ack is None or not ack.accepted]
                if noack:
                    raise RuntimeError(f"start not acked by {noack[:5]}") from None
        try:
            await asyncio.wait_for(rnd.all_active.wait(), WAIT_S)
        except TimeoutError:
            raise RuntimeError(f"only {len(rnd.active)}/{len(nodes)} faults active after {WAIT_S}s") from None
        t_abort = time.perf_counter()
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
        if rnd.bad:
            raise RuntimeError(f"bad events {rnd.bad[:3]}")
        return Times(
            dispatch=t_acked - t0,
            start=rnd.active_at - t_acked,
            end_to_end=rnd.active_at - t0,
            abort=rnd.reverted_at - t_abort,
        )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def bench_size(url: str, n: int, rounds: int, tmp_root: Path | None, keep_gc: bool) -> dict[str, float]:
    base = Floor(n)
    await base.open(url)
    state_root = Path(tempfile.mkdtemp(prefix=f"faultline-bench-{n}-", dir=tmp_root))
    ctl: Any = None
    runtimes: list[AgentRuntime] = []
    tasks: list[asyncio.Task[int]] = []
    try:
        fan, rr, bc = await base.baselines(rounds)
        ctl = await quiet_connect(url)
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
        transport = Transport(ctl, runtimes)
        await transport.open()
        await one_round(ctl, nodes, lease_timeout_s=120.0)  # warm-up, not counted
        await transport.round_trip()
        await transport.round_trip(wire_inject())
        await transport.abort_trip(wire=True)
        measured: list[Times] = []
        legacy: list[Times] = []
        fan_busy: list[float] = []
        bound: list[float] = []
        wire: list[float] = []
        abort_bound: list[float] = []
        abort_wire: list[float] = []
        for _ in range(rounds):
            # rounds start settled: agents drop journal entries in a batch 0.5 s after a revert,
            # which would otherwise land inside the next round's dispatch window
            await asyncio.sleep(SETTLE_S)
            fan_busy.append(await base.fan_out())
            bound.append(await transport.round_trip())
            wire.append(await transport.round_trip(wire_inject()))
            abort_bound.append(await transport.abort_trip(wire=False))
            abort_wire.append(await transport.abort_trip(wire=True))
            measured.append(await one_round(ctl, nodes, lease_timeout_s=120.0))
            await asyncio.sleep(SETTLE_S)
            legacy.append(await one_round(ctl, nodes, lease_timeout_s=120.0, await_start=False))
    finally:
        gc.enable()
        await stop_agents(runtimes, tasks)
        await close_all([ctl] if ctl is not None else [])
        await base.close()
        shutil.rmtree(state_root, ignore_errors=True)
    return {
        "n": n,
        "rounds": rounds,
        "start_s": start_s,
        "d50": pct([t.dispatch for t in measured], 50),
        "d99": pct([t.dispatch for t in measured], 99),
        "s50": pct([t.start for t in measured], 50),
        "s99": pct([t.start for t in measured], 99),
        "e50": pct([t.end_to_end for t in measured], 50),
        "a50": pct([t.abort for t in measured], 50),
        "a99": pct([t.abort for t in measured], 99),
        "floor50": statistics.median(fan),
        "busy50": statistics.median(fan_busy),
        "t50": statistics.median(bound),
        "w50": statistics.median(wire),
        "ab50": statistics.median(abort_bound),
        "aw50": statistics.median(abort_wire),
        "rr50": statistics.median(rr),
        "bc50": statistics.median(bc),
        "l50": pct([t.dispatch for t in legacy], 50),
        "le50": pct([t.end_to_end for t in legacy], 50),
    }


def ms(s: float) -> str:
    return f"{s * 1000:.1f}"


def print_table(rows: list[dict[str, float]]) -> None:
    print()
    print(
        "dispatch: controller.dispatch.request_acks, Injects that wait for their start (as the engine); "
        "start: broadcast_start (per-node start_experiment for stragglers); "
        "abort: broadcast_revert (per-node revert_experiment for stragglers)"
    )
    print()
    print(
        "| N | rounds | dispatch→all-acked p50 / p99 (ms) | floor p50 (ms) | ratio "
        "| start→all-active p50 / p99 (ms) | abort→all-reverted p50 / p99 (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {int(r['n'])} | {int(r['rounds'])} | {ms(r['d50'])} / {ms(r['d99'])} | {ms(r['floor50'])} | "
            f"{r['d50'] / r['floor50']:.1f}× | {ms(r['s50'])} / {ms(r['s99'])} | {ms(r['a50'])} / {ms(r['a99'])} |"
        )
    print()
    print("diagnostics (p50, ms):")
    print()
    print(
        "| N | floor with the N agents running | raw broadcast + N acks | raw requests + N replies "
        "| the same through the agents' connections, while they run | + the wire work | dispatch ÷ transport "
        "| dispatch→all-active, end to end | faults started on acceptance (agents < 1.2): dispatch→all-acked "
        "/ →all-active | agents start (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = r["floor50"]
        print(
            f"| {int(r['n'])} | {ms(r['busy50'])} ({r['busy50'] / f:.1f}×) | {ms(r['bc50'])} ({r['bc50'] / f:.1f}×) "
            f"| {ms(r['rr50'])} ({r['rr50'] / f:.1f}×) | {ms(r['t50'])} ({r['t50'] / f:.1f}×) "
            f"| {ms(r['w50'])} ({r['w50'] / f:.1f}×) "
            f"| {r['d50'] / r['t50']:.2f} | {ms(r['e50'])} "
            f"| {ms(r['l50'])} ({r['l50'] / f:.1f}×) / {ms(r['le50'])} | {r['start_s']:.1f} |"
        )
    print(
        "\n(×: multiples of the clean floor. Raw: no faultline code, no decoding. Requests: shaped as "
        "request_acks sends them. Through the agents' connections: one more subscription on each running "
        "agent's own connection answers a fixed reply unread; the lower bound for dispatch in this process. "
        "+ the wire work: the same, but each agent decodes the Inject and answers an encoded Ack, and the "
        "controller decodes every Ack: what the protocol requires, with no record, timer or check.)"
    )
    print()
    print("abort's bounds, through the agents' connections while they run (p50, ms):")
    print()
    print(
        "| N | abort→all-reverted | one broadcast, every agent publishes a fixed event | + the wire work | abort ÷ bound |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {int(r['n'])} | {ms(r['a50'])} | {ms(r['ab50'])} | {ms(r['aw50'])} | {r['a50'] / r['ab50']:.2f} |")
    print(
        "\n(+ the wire work: each agent decodes the Revert and publishes an encoded FaultEvent, the controller "
        "decodes every event; no fault is looked up, reverted or reported by the runtime.)"
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
    raise_fd_limit(2 * max(sizes) + 300)  # before the nats-server starts: it inherits the limit
    tmp_root = SHM if SHM.is_dir() else None  # journals on tmpfs
    with NatsServer() as server, asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert server.url is not None
        runner.run(main_async(server.url, sizes, rounds, tmp_root, args.gc))


if __name__ == "__main__":
    main()
