"""netem through the network injector, on a kernel that has sch_netem.

The CI kernel lacks sch_netem, so tests/kernel/run-uml.sh runs this tier
inside User-Mode Linux; anywhere else these tests skip with the reason.
Each test uses its own pair of namespaces; the testbed's finaliser deletes them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.faults.base import AgentEnv, FaultContext
from agent.faults.network import NetworkFault
from agent.netlink import tc
from agent.netlink.netns import iproute
from agent.netlink.probe import probe
from agent.netlink.testbed import (
    Testbed,
    link_counters,
    snmp_counters,
    tc_leftovers,
    udp_blast,
    udp_probe,
    veth_testbed,
)
from proto.faults import NetworkSpec


def _netem_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    netem = next(c for c in probe() if c.name == "network.netem")
    return None if netem.available else f"{netem.note} (run tests/kernel/run-uml.sh)"


_MISSING = _netem_missing()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))]
_subnets = itertools.count(100)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    with veth_testbed(next(_subnets)) as testbed:
        yield testbed


def env_for(bed: Testbed, tmp_path: Path) -> AgentEnv:
    return AgentEnv(node="uml", state_dir=tmp_path, instance_id="k", protected_pids=dict)


def ctx(env: AgentEnv, fault_id: str) -> FaultContext:
    return FaultContext(fault_id, "exp", time.time() + 60, None, env, lambda *_: None)


async def rtt_median_s(bed: Testbed, addr: str, count: int = 20, timeout_s: float = 1.0) -> float:
    received, rtts = await asyncio.to_thread(udp_probe, bed, addr, count, timeout_s)
    assert received >= count - 1, f"only {received}/{count} echoes from {addr}"
    return statistics.median(rtts)


async def assert_clean(bed: Testbed) -> None:
    for ns, dev in ((bed.ns_a, bed.dev_a), (bed.ns_b, bed.dev_b)):
        left = await asyncio.to_thread(tc_leftovers, ns, dev)
        assert left == [], f"{dev} in {ns} still carries {left}"


async def test_delay_50ms_each_way_adds_100ms_round_trip(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    base = await rtt_median_s(bed, bed.addrs_b[0])
    specs = [
        (NetworkSpec(delay="50ms", netns=bed.ns_a, interface=bed.dev_a), ctx(env, "d-a")),
        (NetworkSpec(delay="50ms", netns=bed.ns_b, interface=bed.dev_b), ctx(env, "d-b")),
    ]
    plans = []
    try:
        for spec, c in specs:
            plan = await inj.plan(spec, c)
            plans.append((plan, c))
            await inj.apply(spec, plan, c)
        grown = await rtt_median_s(bed, bed.addrs_b[0]) - base
        assert abs(grown - 0.100) <= 0.010, f"round trip grew by {grown * 1e3:.1f} ms, expected 100 ± 10"
    finally:
        for plan, c in plans:
            await inj.revert(plan, c)
    await assert_clean(bed)


def netem_child(ns: str, dev: str) -> dict[str, int]:
    """The fa18: netem under our class, as the kernel dumps it (the delay table itself is never dumped)."""
    with iproute(ns) as ipr:
        index = tc.link_index(ipr, dev)
        assert index is not None, f"{dev} missing in {ns}"
        for q in tc.qdiscs(ipr, index):
            if q["handle"] == tc.CHILD_HANDLE and q.get_attr("TCA_KIND") == "netem":
                opts = q.get_attr("TCA_OPTIONS")
                return {"delay": int(opts["delay"]), "jitter": int(opts["jitter"])}
    raise AssertionError(f"no netem fa18: on {dev} in {ns}")


async def test_normal_distribution_spreads_like_a_normal(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    base = await rtt_median_s(bed, bed.addrs_b[0])
    spec = NetworkSpec(delay="50ms", jitter="10ms", distribution="normal", netns=bed.ns_a, interface=bed.dev_a)
    c = ctx(env, "dist")
    plan = await inj.plan(spec, c)
    n = 150
    try:
        await inj.apply(spec, plan, c)  # the kernel ACKed the netem with its TCA_NETEM_DELAY_DIST
        dumped = await asyncio.to_thread(netem_child, bed.ns_a, bed.dev_a)
        received, rtts = await asyncio.to_thread(udp_probe, bed, bed.addrs_b[0], n, 1.0)
    finally:
        await inj.revert(plan, c)
    assert dumped["jitter"] > 0 and dumped["delay"] > dumped["jitter"], f"netem dump {dumped}"
    assert received >= n - 2, f"only {received}/{n} echoes"
    added_ms = [(rtt - base) * 1e3 for rtt in rtts]
    median, stdev = statistics.median(added_ms), statistics.stdev(added_ms)
    outside = sum(abs(x - 50.0) > 10.0 for x in added_ms) / len(added_ms)
    detail = f"median {median:.1f} ms, stdev {stdev:.1f} ms, {outside:.0%} beyond ±10 ms"
    assert abs(median - 50.0) <= 5.0, detail
    # Normal, sigma 10 ms: stdev ~10 and ~32 % beyond one sigma. netem's built-in
    # uniform jitter would give stdev 5.8 and nothing beyond ±10 ms.
    assert 7.5 <= stdev <= 14.0, detail
    assert outside >= 0.15, detail
    await assert_clean(bed)


async def test_loss_30_percent_within_binomial_bound(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    spec = NetworkSpec(loss="30%", netns=bed.ns_a)
    c = ctx(env, "loss")
    plan = await inj.plan(spec, c)
    n, p = 400, 0.30
    try:
        await inj.apply(spec, plan, c)
        received = await asyncio.to_thread(udp_blast, bed, bed.addrs_b[0], n)
    finally:
        await inj.revert(plan, c)
    lost = n - received
    bound = 2.576 * math.sqrt(n * p * (1 - p))  # two-sided 99 %, normal approximation
    assert abs(lost - n * p) <= bound, f"lost {lost}/{n}, expected {n * p:.0f} ± {bound:.0f}"
    await assert_clean(bed)


async def test_duplicate_visible_in_counters(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    spec = NetworkSpec(duplicate="100%", netns=bed.ns_a, destinations=[f"{bed.addrs_b[0]}/32"])
    c = ctx(env, "dup")
    plan = await inj.plan(spec, c)
    n = 100
    try:
        await inj.apply(spec, plan, c)
        before = await asyncio.to_thread(link_counters, bed.ns_b, bed.dev_b)
        received = await asyncio.to_thread(udp_blast, bed, bed.addrs_b[0], n)
        after = await asyncio.to_thread(link_counters, bed.ns_b, bed.dev_b)
    finally:
        await inj.revert(plan, c)
    grew = after["rx_packets"] - before["rx_packets"]
    assert 2 * n <= grew <= 2 * n + 10, f"B's rx_packets grew by {grew} for {n} datagrams, expected ~{2 * n}"
    assert received == 2 * n, f"B's socket got {received} datagrams, expected {2 * n}"
    await assert_clean(bed)


async def test_corrupt_visible_in_counters(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    spec = NetworkSpec(corrupt="100%", netns=bed.ns_a, destinations=[f"{bed.addrs_b[0]}/32"])
    c = ctx(env, "corrupt")
    plan = await inj.plan(spec, c)
    n = 100
    try:
        await inj.apply(spec, plan, c)
        before = await asyncio.to_thread(snmp_counters, bed.ns_b)
        received = await asyncio.to_thread(udp_blast, bed, bed.addrs_b[0], n)
        after = await asyncio.to_thread(snmp_counters, bed.ns_b)
    finally:
        await inj.revert(plan, c)
    errors = sum(after[k] - before[k] for k in ("Udp.InCsumErrors", "Ip.InHdrErrors", "Ip.InAddrErrors"))
    # A flip in the source MAC (6 of ~106 bytes) is checked by nobody and delivered: ~6 % get
    # through, so 20 % is a bound that only a broken corrupt fails (binomial tail ~1e-5).
    assert received <= n // 5, f"{received}/{n} corrupted datagrams were delivered"
    # A flipped bit in the Ethernet header drops the frame before IP counts it (~13 % of a 106-byte frame).
    assert errors >= n // 2, f"checksum/header error counters grew by only {errors} for {n} corrupted datagrams"
    await assert_clean(bed)


async def test_scoped_and_exempt_traffic(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    scoped = NetworkSpec(delay="50ms", netns=bed.ns_a, destinations=[f"{bed.addrs_b[0]}/32"])
    c = ctx(env, "scoped")
    plan = await inj.plan(scoped, c)
    try:
        await inj.apply(scoped, plan, c)
        assert await rtt_median_s(bed, bed.addrs_b[0]) >= 0.045, "scoped destination not delayed"
        assert await rtt_median_s(bed, bed.addrs_b[1]) < 0.020, "unscoped destination delayed"
    finally:
        await inj.revert(plan, c)
    await assert_clean(bed)
    exempt = NetworkSpec(delay="50ms", netns=bed.ns_a, exempt=[f"{bed.addrs_b[2]}/32"])
    c = ctx(env, "exempt")
    plan = await inj.plan(exempt, c)
    try:
        await inj.apply(exempt, plan, c)
        assert await rtt_median_s(bed, bed.addrs_b[0]) >= 0.045, "non-exempt destination not delayed"
        assert await rtt_median_s(bed, bed.addrs_b[2]) < 0.020, "exempt destination delayed"
    finally:
        await inj.revert(plan, c)
    await assert_clean(bed)


async def test_ingress_delay_and_partition(bed: Testbed, tmp_path: Path) -> None:
    env = env_for(bed, tmp_path)
    inj = NetworkFault(env)
    base = await rtt_median_s(bed, bed.addrs_b[0])
    ingress = NetworkSpec(delay="50ms", netns=bed.ns_a, interface=bed.dev_a, direction="ingress")
    c = ctx(env, "ingress")
    plan = await inj.plan(ingress, c)
    try:
        await inj.apply(ingress, plan, c)
        grown = await rtt_median_s(bed, bed.addrs_b[0]) - base
        assert abs(grown - 0.050) <= 0.010, f"ingress delay grew the round trip by {grown * 1e3:.1f} ms"
    finally:
        await inj.revert(plan, c)
    await assert_clean(bed)
    partition = NetworkSpec(loss="100%", netns=bed.ns_a, destinations=[f"{bed.addrs_b[0]}/32"])
    c = ctx(env, "partition")
    plan = await inj.plan(partition, c)
    try:
        await inj.apply(partition, plan, c)
        received, _ = await asyncio.to_thread(udp_probe, bed, bed.addrs_b[0], 5, 0.2)
        assert received == 0, "partitioned destination still answered"
        await rtt_median_s(bed, bed.addrs_b[1], count=5)  # the rest of zone b stays reachable
    finally:
        await inj.revert(plan, c)
    await assert_clean(bed)
