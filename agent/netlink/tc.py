"""The tc tree a network fault installs, and how it is found and removed again.

Shape (egress; for ingress the same tree sits on an ifb device that the
interface's ingress qdisc redirects to)::

    dev root: htb fa17:  (default: fa17:0 = HTB's direct path, or fa17:1)
      ├─ u32 filters, prio 1-3  → fa17:0  pass-through: ARP, exempt, control plane
      ├─ u32 filters, prio 4-5  → fa17:1  scoped traffic (destinations × ports)
      └─ class fa17:1 (rate: the spec's, or unlimited)
           └─ qdisc fa18:  netem (any impairment) | tbf (a pure rate limit)

Pass-through is HTB's *direct* path: a filter verdict naming the qdisc itself
(fa17:0), and ``default 0`` for unclassified packets, send them out unshaped
(no class rate, so no ceiling even on 100G links). Everything the agent owns
is recognisable by the major handle 0xFA17 on a root qdisc, by filter
priority 0xFA17 on an ingress qdisc, and by the ``flifb`` prefix on ifb
devices; deleting the root qdisc takes its classes, child and filters with it.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.netlink import netem_dist

HANDLE_MAJOR = 0xFA17
ROOT_HANDLE = HANDLE_MAJOR << 16  # fa17:0 - also the "direct" (pass-through) verdict
FAULT_CLASS = ROOT_HANDLE | 1  # fa17:1
CHILD_HANDLE = 0xFA18 << 16  # fa18:0 - netem or tbf under the faulted class
INGRESS_HANDLE = 0xFFFF0000
INGRESS_FILTER_PRIO = HANDLE_MAJOR
IFB_PREFIX = "flifb"
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
UNLIMITED_BPS = 100 * 10**9  # "no rate" for the faulted class: 100 Gbit/s via HTB's 64-bit rate
HTB_QUANTUM_BYTES = 60_000  # explicit, so the kernel does not warn about r2q-derived quanta
IPPROTO = {"tcp": 6, "udp": 17}
GONE = (errno.ENOENT, errno.ENODEV, errno.ENXIO)

# Root qdiscs the kernel attaches by itself. The kernel gives them handle 0
# (tc can never create handle 0: it allocates 8001: and up), so handle 0 is
# the real test; the kind list only makes the refusal message friendlier.
DEFAULT_KINDS = frozenset({"noqueue", "noop", "pfifo_fast", "mq", "fq_codel", "fq", "pfifo", "sfq", "cake"})


class U32Rule(BaseModel):
    """One u32 filter: AND of an address prefix, an IP protocol and a port."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal[4, 6]
    cidr: str | None = None
    addr_side: Literal["dst", "src"] = "dst"
    protocol: Literal["tcp", "udp"] | None = None
    port: int | None = None
    port_side: Literal["dst", "src"] = "dst"
    target: Literal["pass", "fault"]
    why: str


class NetemParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    delay_us: int = 0
    jitter_us: int = 0
    delay_corr: float = 0.0
    loss: float = 0.0
    loss_corr: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    reorder: float = 0.0
    gap: int = 0
    limit_packets: int = 1000
    distribution: netem_dist.Distribution | None = None  # None: netem's built-in uniform jitter


class TcTree(BaseModel):
    """Everything needed to build the tree; journaled inside the fault's plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_target: Literal["pass", "fault"]
    class_rate_bps: int | None = None  # None: unlimited (the child shapes, or nothing does)
    netem: NetemParams | None = None
    tbf_rate_bps: int | None = None
    tbf_limit_packets: int | None = None
    rules: list[U32Rule] = []


def ifb_name(interface: str) -> str:
    """Our ifb device for an interface: deterministic, so revert can recompute it."""
    return IFB_PREFIX + hashlib.sha1(interface.encode()).hexdigest()[:8]


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def default_route_interface(ipr: IPRoute) -> str | None:
    for family in (2, 10):
        for route in ipr.get_routes(family=family, table=254):
            if route.get("dst_len") == 0 and route.get_attr("RTA_OIF") is not None:
                links = ipr.get_links(route.get_attr("RTA_OIF"))
                if links:
                    return str(links[0].get_attr("IFLA_IFNAME"))
    return None


def qdiscs(ipr: IPRoute, index: int, dump: list[Any] | None = None) -> list[Any]:
    return [q for q in (ipr.tc("dump") if dump is None else dump) if q["index"] == index]


def root_qdisc(ipr: IPRoute, index: int, dump: list[Any] | None = None) -> tuple[str, int] | None:
    """(kind, handle) of the root qdisc, or None if the device has none."""
    for q in qdiscs(ipr, index, dump):
        if q["parent"] == TC_H_ROOT:
            return str(q.get_attr("TCA_KIND")), int(q["handle"])
    return None


def ingress_qdisc(ipr: IPRoute, index: int, dump: list[Any] | None = None) -> str | None:
    """Kind of the ingress/clsact qdisc, or None."""
    for q in qdiscs(ipr, index, dump):
        if q["parent"] == TC_H_INGRESS:
            return str(q.get_attr("TCA_KIND"))
    return None


def root_owner(kind_handle: tuple[str, int] | None) -> Literal["default", "ours", "foreign"]:
    if kind_handle is None or kind_handle[1] >> 16 == 0:
        return "default"
    return "ours" if kind_handle[1] >> 16 == HANDLE_MAJOR else "foreign"


def delete_ingress(ipr: IPRoute, index: int) -> None:
    """Delete the ingress or clsact qdisc (ours, or a foreign one under force: true)."""
    for q in qdiscs(ipr, index):
        if q["parent"] == TC_H_INGRESS:
            try:
                ipr.tc("del", index=index, handle=int(q["handle"]), parent=TC_H_INGRESS)
            except NetlinkError as exc:
                if exc.code not in GONE:
                    raise


def ingress_filter_prios(ipr: IPRoute, index: int) -> set[int]:
    return {int(f["info"]) >> 16 for f in ipr.get_filters(index=index, parent=INGRESS_HANDLE)}


MATCH_ALL = "0x0/0x0+0"  # pyroute2's key parser cannot take an all-zero mask written out in full


def _key(value: int, mask: int, offset: int) -> str:
    return f"0x{value & mask:08x}/0x{mask:08x}+{offset}" if mask else MATCH_ALL


def u32_keys(rule: U32Rule) -> list[str]:
    keys: list[str] = []
    if rule.cidr is not None:
        net = ipaddress.ip_network(rule.cidr, strict=False)
        if rule.family == 4:
            keys.append(_key(int(net.network_address), int(net.netmask), 16 if rule.addr_side == "dst" else 12))
        else:
            base = 24 if rule.addr_side == "dst" else 8
            addr, mask = int(net.network_address), int(net.netmask)
            for word in range(4):
                shift = 96 - 32 * word
                word_mask = (mask >> shift) & 0xFFFFFFFF
                if word_mask:
                    keys.append(_key((addr >> shift) & 0xFFFFFFFF, word_mask, base + 4 * word))
    if rule.protocol is not None:
        proto = IPPROTO[rule.protocol]
        # IPv4: protocol is byte 9; IPv6: next header is byte 6 (no extension headers).
        keys.append(_key(proto << 16, 0x00FF0000, 8) if rule.family == 4 else _key(proto << 8, 0x0000FF00, 4))
    if rule.port is not None:
        # Ports right after a 20-byte IPv4 header (no options) or the 40-byte IPv6 header.
        offset = 20 if rule.family == 4 else 40
        if rule.port_side == "src":
            keys.append(_key(rule.port << 16, 0xFFFF0000, offset))
        else:
            keys.append(_key(rule.port, 0x0000FFFF, offset))
    return keys or [MATCH_ALL]


def _prio(rule: U32Rule) -> int:
    # One protocol per priority (the kernel's rule); pass-through before fault.
    if rule.target == "pass":
        return 2 if rule.family == 4 else 3
    return 4 if rule.family == 4 else 5


def install(ipr: IPRoute, index: int, tree: TcTree) -> None:
    """Build the tree on a device whose root is the kernel default. Raises NetlinkError."""
    default_class = FAULT_CLASS if tree.default_target == "fault" else 0
    ipr.tc("add", "htb", index, ROOT_HANDLE, default=default_class)
    rate_bytes = (tree.class_rate_bps or UNLIMITED_BPS) // 8
    ipr.tc(
        "add-class", "htb", index, FAULT_CLASS, parent=ROOT_HANDLE,
        rate=rate_bytes, ceil=rate_bytes, quantum=HTB_QUANTUM_BYTES,
    )  # fmt: skip
    if tree.netem is not None:
        n = tree.netem
        params: dict[str, Any] = dict(
            delay=n.delay_us, jitter=n.jitter_us, delay_corr=n.delay_corr if n.jitter_us else 0,
            loss=n.loss, loss_corr=n.loss_corr if n.loss else 0, duplicate=n.duplicate,
            prob_corrupt=n.corrupt, prob_reorder=n.reorder, gap=n.gap if n.reorder else 0,
            limit=n.limit_packets,
        )  # fmt: skip
        if n.distribution is not None and n.jitter_us:
            # pyroute2's tc() cannot send a delay table: our own message carries it.
            netem_dist.add_netem(ipr, index, CHILD_HANDLE, FAULT_CLASS, params, n.distribution)
        else:
            ipr.tc("add", "netem", index, CHILD_HANDLE, parent=FAULT_CLASS, **params)
    elif tree.tbf_rate_bps is not None:
        rate_bytes = tree.tbf_rate_bps // 8
        # A burst of ~4 ms (at least two full frames) keeps the rate honest at
        # any speed; the queue holds 100 ms so TCP keeps the link busy.
        burst = max(rate_bytes // 250, 3028)
        if tree.tbf_limit_packets is not None:
            ipr.tc("add", "tbf", index, CHILD_HANDLE, parent=FAULT_CLASS, rate=rate_bytes, burst=burst,
                   limit=tree.tbf_limit_packets * 1514)  # fmt: skip
        else:
            ipr.tc("add", "tbf", index, CHILD_HANDLE, parent=FAULT_CLASS, rate=rate_bytes, burst=burst,
                   latency=100_000)  # fmt: skip
    if tree.default_target == "fault":
        # ARP must keep flowing or the lifeline dies when the neighbour entry expires.
        ipr.tc("add-filter", "u32", index, parent=ROOT_HANDLE, prio=1, protocol=ETH_P_ARP,
               target=ROOT_HANDLE, keys=[MATCH_ALL])  # fmt: skip
    for rule in tree.rules:
        ipr.tc(
            "add-filter", "u32", index, parent=ROOT_HANDLE, prio=_prio(rule),
            protocol=ETH_P_IP if rule.family == 4 else ETH_P_IPV6,
            target=ROOT_HANDLE if rule.target == "pass" else FAULT_CLASS, keys=u32_keys(rule),
        )  # fmt: skip


def remove_root(ipr: IPRoute, index: int) -> bool:
    """Delete our root qdisc if present (the kernel re-attaches its default). True if removed."""
    if root_owner(root_qdisc(ipr, index)) != "ours":
        return False
    try:
        ipr.tc("del", index=index, handle=ROOT_HANDLE, parent=TC_H_ROOT)
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise
    return True


def delete_root(ipr: IPRoute, index: int) -> None:
    """Delete whatever root qdisc there is (force: true replacing a foreign one)."""
    kh = root_qdisc(ipr, index)
    if kh is not None and root_owner(kh) != "default":
        ipr.tc("del", index=index, handle=kh[1], parent=TC_H_ROOT)


def add_ifb(ipr: IPRoute, name: str) -> int:
    # A direct queue of 1000 packets: ifb's default of 32 would drop pass-through bursts.
    ipr.link("add", ifname=name, kind="ifb", txqlen=1000)
    index = link_index(ipr, name)
    if index is None:
        raise NetlinkError(errno.ENODEV, f"ifb device {name} vanished after creation")
    ipr.link("set", index=index, state="up")
    return index


def add_ingress_redirect(ipr: IPRoute, index: int, ifb_index: int, create_qdisc: bool) -> None:
    if create_qdisc:
        ipr.tc("add", "ingress", index, INGRESS_HANDLE)
    ipr.tc(
        "add-filter", "u32", index, parent=INGRESS_HANDLE, prio=INGRESS_FILTER_PRIO, protocol=ETH_P_ALL,
        target=0x1, keys=[MATCH_ALL],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb_index},
    )  # fmt: skip


def remove_ingress(ipr: IPRoute, index: int) -> bool:
    """Remove our redirect; the ingress qdisc too when nothing else uses it. True if removed."""
    if ingress_qdisc(ipr, index) is None:
        return False
    prios = ingress_filter_prios(ipr, index)
    if INGRESS_FILTER_PRIO not in prios:
        return False
    try:
        if prios == {INGRESS_FILTER_PRIO}:
            delete_ingress(ipr, index)
        else:
            ipr.tc("del-filter", "u32", index, parent=INGRESS_HANDLE, prio=INGRESS_FILTER_PRIO, protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise
    return True


def redirect_targets(ipr: IPRoute, index: int) -> set[int]:
    """Devices (ifindex) our ingress redirect on this link sends its traffic to."""
    targets: set[int] = set()
    for f in ipr.get_filters(index=index, parent=INGRESS_HANDLE):
        if int(f["info"]) >> 16 != INGRESS_FILTER_PRIO:
            continue
        opts = f.get_attr("TCA_OPTIONS")
        acts = opts.get_attr("TCA_U32_ACT") if opts is not None else None
        for _, act in acts["attrs"] if acts is not None else []:
            options = act.get_attr("TCA_ACT_OPTIONS") if act.get_attr("TCA_ACT_KIND") == "mirred" else None
            parms = options.get_attr("TCA_MIRRED_PARMS") if options is not None else None
            if parms:
                targets.add(int(parms["ifindex"]))
    return targets


def unredirect(ipr: IPRoute, ifb: str) -> list[str]:
    """Remove our ingress redirects that send traffic to ``ifb`` from every link (one renamed
    since the fault, which the revert did not find by name): deleting the ifb under a redirect
    that still points to it would drop all that link's ingress. Names of the links cleared."""
    target = link_index(ipr, ifb)
    if target is None:
        return []
    cleared: list[str] = []
    for link in ipr.get_links():
        index = int(link["index"])
        if index != target and target in redirect_targets(ipr, index) and remove_ingress(ipr, index):
            cleared.append(str(link.get_attr("IFLA_IFNAME")))
    return cleared


def delete_link(ipr: IPRoute, name: str) -> bool:
    index = link_index(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise
    return True


def sweep_namespace(ipr: IPRoute, where: str) -> list[str]:
    """Remove every trace of ours in this namespace; one line per thing removed."""
    removed: list[str] = []
    for link in ipr.get_links():
        name = str(link.get_attr("IFLA_IFNAME"))
        index = int(link["index"])
        if remove_ingress(ipr, index):
            removed.append(f"{where}: removed ingress redirect on {name}")
        if not name.startswith(IFB_PREFIX) and remove_root(ipr, index):
            removed.append(f"{where}: removed qdisc fa17: on {name}")
    for link in ipr.get_links():
        name = str(link.get_attr("IFLA_IFNAME"))
        if name.startswith(IFB_PREFIX) and delete_link(ipr, name):
            removed.append(f"{where}: removed ifb device {name}")
    return removed


def holdings(ipr: IPRoute) -> dict[str, str]:
    """Interfaces carrying anything of ours: name -> what (for conflict messages)."""
    held: dict[str, str] = {}
    dump = list(ipr.tc("dump"))  # one dump for every device: plan latency is mostly netlink round trips
    names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
    for index, name in names.items():
        if root_owner(root_qdisc(ipr, index, dump)) == "ours":
            held[name] = "qdisc fa17:"
        if ingress_qdisc(ipr, index, dump) is not None and INGRESS_FILTER_PRIO in ingress_filter_prios(ipr, index):
            held[name] = "ingress redirect"
    return held
