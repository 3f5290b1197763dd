"""Network fault benchmark: netlink latency of inject/revert, and rate accuracy.

Run as root:  /work/venv/bin/python bench/bench_network.py [--iterations 200] [--transfer-s 4]

* inject→active: plan + apply of a scoped rate fault (u32 filters, lifeline
  exemption) in a namespace, until the fa17: root is installed;
  revert→clean: revert until the interface is back at its default qdisc.
* rate accuracy: a TCP transfer through a veth pair between two namespaces
  under a rate fault. "goodput" is payload received; "wire" adds the
  Ethernet/IP/TCP headers per 1448-byte segment, which is what tc shapes.
Targets: inject and revert each <= 20 ms; wire rate within ±5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from agent.faults.base import AgentEnv, FaultContext
from agent.faults.network import NetworkFault
from agent.netlink.testbed import WIRE_FACTOR, Testbed, tc_leftovers, tcp_goodput_bps, veth_testbed
from proto.faults import NetworkSpec


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def latency(bed: Testbed, iterations: int) -> tuple[list[float], list[float]]:
    env = AgentEnv(
        node="bench",
        state_dir=Path("/tmp"),
        instance_id="bench",
        protected_pids=dict,
        control_plane=lambda: [(bed.addrs_b[1], 4222)],
    )
    inj = NetworkFault(env)
    inj.probe()
    spec = NetworkSpec(rate="10mbit", netns=bed.ns_a, interface=bed.dev_a, destinations=[f"{bed.addrs_b[0]}/32"])
    inject_s: list[float] = []
    revert_s: list[float] = []
    for i in range(iterations):
        ctx = FaultContext(f"b{i}", "bench", time.time() + 60, None, env, lambda *_: None)
        started = time.perf_counter()
        inj.check(spec, ctx)
        plan = await inj.plan(spec, ctx)
        await inj.apply(spec, plan, ctx)
        inject_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        await inj.revert(plan, ctx)
        revert_s.append(time.perf_counter() - started)
    left = await asyncio.to_thread(tc_leftovers, bed.ns_a, bed.dev_a)
    assert not left, f"benchmark left {left}"
    return inject_s, revert_s


async def rate(bed: Testbed, rate_bps: int, transfer_s: float) -> tuple[float, float]:
    env = AgentEnv(node="bench", state_dir=Path("/tmp"), instance_id="bench", protected_pids=dict)
    inj = NetworkFault(env)
    spec = NetworkSpec(rate=rate_bps, netns=bed.ns_a, interface=bed.dev_a)
    ctx = FaultContext("rate", "bench", time.time() + 60, None, env, lambda *_: None)
    plan = await inj.plan(spec, ctx)
    try:
        await inj.apply(spec, plan, ctx)
        goodput = await asyncio.to_thread(tcp_goodput_bps, bed, bed.addrs_b[0], transfer_s)
    finally:
        await inj.revert(plan, ctx)
    return goodput, goodput * WIRE_FACTOR


async def main(bed: Testbed, iterations: int, transfer_s: float) -> None:
    inject_s, revert_s = await latency(bed, iterations)
    print(f"network fault benchmark (kernel {os.uname().release}, {os.cpu_count()} cores, veth between two netns)")
    print()
    print(f"| step ({iterations} iterations) | p50 ms | p99 ms | max ms | target |")
    print("|---|---|---|---|---|")
    for name, values in (("inject→active (check+plan+apply)", inject_s), ("revert→clean", revert_s)):
        row = f"| {name} | {statistics.median(values) * 1e3:.2f} | {pct(values, 0.99) * 1e3:.2f} |"
        print(f"{row} {max(values) * 1e3:.2f} | ≤ 20 ms |")
    print()
    print(f"| rate ({transfer_s:.0f} s TCP) | goodput Mbit/s | wire Mbit/s | wire error | target |")
    print("|---|---|---|---|---|")
    for mbit in (1, 10, 100):
        goodput, wire = await rate(bed, mbit * 1_000_000, transfer_s)
        err = (wire / (mbit * 1e6) - 1) * 100
        print(f"| {mbit} mbit | {goodput / 1e6:.3f} | {wire / 1e6:.3f} | {err:+.1f} % | ± 5 % |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--transfer-s", type=float, default=4.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_network: needs root (network namespaces, tc)")
    with veth_testbed(250) as testbed:
        asyncio.run(main(testbed, args.iterations, args.transfer_s))
