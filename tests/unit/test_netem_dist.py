"""netem delay tables: identical to iproute2's, and carried in the netlink message."""

from __future__ import annotations

import statistics
import struct
import time
from typing import Any

import pytest
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

from agent.faults.base import AgentEnv, FaultContext, Rejected
from agent.faults.network import NetworkFault, build_tree
from agent.netlink import netem_dist, tc
from proto.faults import NetworkSpec

CHILD = tc.CHILD_HANDLE
PARENT = tc.FAULT_CLASS


@pytest.mark.parametrize("name", netem_dist.DISTRIBUTIONS)
def test_table_matches_shipped_iproute2_file(name: netem_dist.Distribution) -> None:
    path = netem_dist.shipped_dist_file(name)
    if path is None:
        pytest.skip(
            f"no iproute2 {name}.dist in {', '.join(map(str, netem_dist.DIST_DIRS))} (apt-get install iproute2)"
        )
    shipped = netem_dist.read_dist_file(path)
    ours = netem_dist.table(name)
    differ = [i for i, (a, b) in enumerate(zip(ours, shipped, strict=True)) if a != b]
    assert differ == [], f"{name}: {len(differ)} entries differ from {path}, first at {differ[0]}"


@pytest.mark.parametrize("name", netem_dist.DISTRIBUTIONS)
def test_table_shape(name: netem_dist.Distribution) -> None:
    values = netem_dist.table(name)
    assert len(values) == 4096
    assert all(-32768 <= v <= 32767 for v in values)
    assert list(values) == sorted(values), "an inverse CDF is non-decreasing"


def test_normal_table_has_unit_spread() -> None:
    # One standard deviation is NETEM_DIST_SCALE; the ends are clipped at about ±4 sigma.
    values = [v / netem_dist.NETEM_DIST_SCALE for v in netem_dist.table("normal")]
    assert abs(statistics.fmean(values)) < 0.01
    assert 0.95 < statistics.pstdev(values) < 1.05


def test_pareto_is_right_skewed() -> None:
    values = netem_dist.table("pareto")
    assert statistics.median(values) < statistics.fmean(values), "pareto's tail is on the long-delay side"


def test_unknown_distribution_refused() -> None:
    with pytest.raises(ValueError, match="unknown distribution"):
        netem_dist.table("weibull")


def test_encode_bounds() -> None:
    assert netem_dist.encode((1, -2)) == struct.pack("=2h", 1, -2)
    with pytest.raises(ValueError):
        netem_dist.encode(())
    with pytest.raises(ValueError):
        netem_dist.encode((0,) * (netem_dist.NETEM_DIST_MAX + 1))


def test_message_carries_the_table_and_decodes_back() -> None:
    # pyroute2's own netem classes used first (as the agent does): ours must still use our nla map.
    plain = tcmsg()
    plain["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", sched_netem.get_parameters({"delay": 1000})]]
    plain.encode()
    msg = netem_dist.netem_msg(7, CHILD, PARENT, {"delay": 50_000, "jitter": 10_000, "limit": 500}, "normal")
    msg.encode()
    back = netem_dist.NetemQdiscMsg(msg.data)
    back.decode()
    assert (back["index"], back["handle"], back["parent"]) == (7, CHILD, PARENT)
    assert back.get_attr("TCA_KIND") == "netem"
    opts = back.get_attr("TCA_OPTIONS")
    assert opts["limit"] == 500 and opts["jitter"] > 0 and opts["delay"] > opts["jitter"]
    raw = opts.get_attr("TCA_NETEM_DELAY_DIST")
    assert struct.unpack(f"={len(raw) // 2}h", raw) == netem_dist.table("normal")


def test_message_refuses_a_table_without_jitter() -> None:
    with pytest.raises(ValueError, match="needs jitter"):
        netem_dist.netem_msg(7, CHILD, PARENT, {"delay": 50_000}, "pareto")


class _RecordingIpr:
    """Stands in for IPRoute: records what install() sends."""

    def __init__(self) -> None:
        self.tc_calls: list[tuple[Any, ...]] = []
        self.raw: list[Any] = []

    def tc(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.tc_calls.append((*args, kwargs))
        return []

    def nlm_request_batch(self, msgs: list[Any]) -> list[Any]:
        self.raw.extend(msgs)
        return []


@pytest.mark.parametrize(
    ("distribution", "raw_messages"), [("normal", 1), ("pareto", 1), ("paretonormal", 1), ("uniform", 0), (None, 0)]
)
def test_install_sends_the_table_only_for_shaped_distributions(distribution: Any, raw_messages: int) -> None:
    spec = NetworkSpec.model_validate({"delay": "50ms", "jitter": "10ms", "distribution": distribution})
    ipr = _RecordingIpr()
    tc.install(ipr, 3, build_tree(spec, []))
    assert len(ipr.raw) == raw_messages
    netem_adds = [c for c in ipr.tc_calls if c[:2] == ("add", "netem")]
    assert len(netem_adds) == 1 - raw_messages
    if raw_messages:
        assert ipr.raw[0]["header"]["type"] == RTM_NEWQDISC
        opts = dict(ipr.raw[0]["attrs"])["TCA_OPTIONS"]
        assert dict(opts["attrs"])["TCA_NETEM_DELAY_DIST"] == netem_dist.encode(netem_dist.table(distribution))


def _ctx(env: AgentEnv) -> FaultContext:
    return FaultContext("f1", "exp", time.time() + 60, None, env, lambda *_: None)


@pytest.mark.parametrize("distribution", ["normal", "pareto", "paretonormal", "uniform"])
def test_check_rejects_distribution_without_jitter(distribution: str, tmp_path: Any) -> None:
    env = AgentEnv(node="n", state_dir=tmp_path, instance_id="i", protected_pids=dict)
    inj = NetworkFault(env)
    inj._caps = {}  # no probe: the distribution check must not depend on the kernel
    spec = NetworkSpec.model_validate({"delay": "50ms", "distribution": distribution})
    with pytest.raises(Rejected, match="needs jitter"):
        inj.check(spec, _ctx(env))
