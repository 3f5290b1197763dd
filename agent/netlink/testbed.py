"""A two-namespace veth testbed and bounded traffic probes.

Used by the system and kernel tests and by bench/bench_network.py, which all
need the same thing: two network namespaces joined by a veth pair (traffic
between two addresses of ONE namespace would go over loopback), and a TCP
transfer / UDP echo that measure what a fault does to the path. Kept here
rather than in tests/ so the three users share one implementation without
sys.path games; the agent itself never imports it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroute2 import netns as pr_netns

from agent.netlink.netns import entered, iproute, netns_path

MSS_BYTES = 1448  # MTU 1500 with TCP timestamps
WIRE_FACTOR = (MSS_BYTES + 66) / MSS_BYTES  # + ethernet 14, IPv4 20, TCP 32


@dataclass
class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addrs_b: list[str] = field(default_factory=list)


@contextlib.contextmanager
def veth_testbed(subnet: int, n_b_addrs: int = 3) -> Iterator[Testbed]:
    """Namespaces A and B, veth A<->B, A=10.200.<subnet>.1, B=.2, .3, ...; A's default route via B.

    Everything is deleted on exit, also when the body fails.
    """
    tag = uuid.uuid4().hex[:6]
    bed = Testbed(
        ns_a=f"flt-a-{tag}",
        ns_b=f"flt-b-{tag}",
        dev_a="flva",
        dev_b="flvb",
        addr_a=f"10.200.{subnet}.1",
        addrs_b=[f"10.200.{subnet}.{2 + i}" for i in range(n_b_addrs)],
    )
    created: list[str] = []
    try:
        for name in (bed.ns_a, bed.ns_b):
            pr_netns.create(name)
            created.append(name)
        with iproute(bed.ns_a) as ipr:
            ipr.link("add", ifname=bed.dev_a, kind="veth", peer=bed.dev_b)
            peer = ipr.link_lookup(ifname=bed.dev_b)[0]
            fd = os.open(str(netns_path(bed.ns_b)), os.O_RDONLY)
            try:
                ipr.link("set", index=peer, net_ns_fd=fd)
            finally:
                os.close(fd)
            index = ipr.link_lookup(ifname=bed.dev_a)[0]
            ipr.addr("add", index=index, address=bed.addr_a, prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.route("add", dst="default", gateway=bed.addrs_b[0])
        with iproute(bed.ns_b) as ipr:
            index = ipr.link_lookup(ifname=bed.dev_b)[0]
            for addr in bed.addrs_b:
                ipr.addr("add", index=index, address=addr, prefixlen=24)
            ipr.link("set", index=index, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield bed
    finally:
        for name in created:
            with contextlib.suppress(Exception):
                pr_netns.remove(name)


def socket_in(ns: str, family: int, kind: int) -> socket.socket:
    with entered(str(netns_path(ns))):
        return socket.socket(family, kind)


def tcp_goodput_bps(bed: Testbed, server_addr: str, duration_s: float, port: int = 5201) -> float:
    """Bits per second of payload received in B from a sender in A, for about duration_s."""
    server = socket_in(bed.ns_b, socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((server_addr, port))
    server.listen(1)
    server.settimeout(5.0)
    result: dict[str, float] = {}

    def receive() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conn.settimeout(duration_s + 10.0)
        total = 0
        first = last = 0.0
        with conn:
            while True:
                try:
                    chunk = conn.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                now = time.monotonic()
                if not total:
                    first = now
                total += len(chunk)
                last = now
        result["bytes"] = total
        result["elapsed"] = last - first

    receiver = threading.Thread(target=receive, name="tcp-receiver", daemon=True)
    receiver.start()
    client = socket_in(bed.ns_a, socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.settimeout(5.0)
        client.connect((server_addr, port))
        payload = b"x" * 65536
        stop = time.monotonic() + duration_s
        while time.monotonic() < stop:
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
    finally:
        client.close()
    receiver.join(duration_s + 15.0)
    server.close()
    if receiver.is_alive() or result.get("elapsed", 0.0) <= 0:
        raise AssertionError(f"TCP transfer to {server_addr}:{port} did not complete")
    return result["bytes"] * 8 / result["elapsed"]


def udp_probe(
    bed: Testbed, server_addr: str, count: int, timeout_s: float, port: int = 5301, payload_bytes: int = 64
) -> tuple[int, list[float]]:
    """Send count datagrams A->B, B echoes. Returns (replies received, round-trip times in s)."""
    echo = socket_in(bed.ns_b, socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((server_addr, port))
    echo.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            echo.sendto(data, peer)

    server = threading.Thread(target=serve, name="udp-echo", daemon=True)
    server.start()
    client = socket_in(bed.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    rtts: list[float] = []
    try:
        client.settimeout(timeout_s)
        for seq in range(count):
            sent = time.monotonic()
            client.sendto(seq.to_bytes(4, "big") + b"\0" * (payload_bytes - 4), (server_addr, port))
            while True:
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    break
                if int.from_bytes(data[:4], "big") == seq:
                    rtts.append(time.monotonic() - sent)
                    break
    finally:
        client.close()
        stop.set()
        server.join(2.0)
        echo.close()
    return len(rtts), rtts


def tc_leftovers(ns: str, dev: str) -> list[str]:
    """What of ours (or anything non-default) a device in ns still carries; empty when clean."""
    from agent.netlink import tc  # local: the testbed is usable without the tc module's models

    with iproute(ns) as ipr:
        index = tc.link_index(ipr, dev)
        if index is None:
            return [f"{dev} missing in {ns}"]
        left: list[str] = []
        root = tc.root_qdisc(ipr, index)
        if tc.root_owner(root) != "default":
            left.append(f"root qdisc {root}")
        if tc.ingress_qdisc(ipr, index) is not None:
            left.append("ingress qdisc")
        left += [
            f"ifb {link.get_attr('IFLA_IFNAME')}"
            for link in ipr.get_links()
            if str(link.get_attr("IFLA_IFNAME")).startswith(tc.IFB_PREFIX)
        ]
        return left


def link_counters(ns: str, dev: str) -> dict[str, int]:
    with iproute(ns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=dev)[0])[0]
        stats = link.get_attr("IFLA_STATS64")
        return {k: int(stats[k]) for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}


def snmp_counters(ns: str) -> dict[str, int]:
    """/proc/net/snmp of the namespace as {"Udp.InCsumErrors": n, ...}."""
    with entered(str(netns_path(ns))):
        with open("/proc/thread-self/net/snmp") as f:
            lines = f.read().splitlines()
    counters: dict[str, int] = {}
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        proto, names = header.split(":", 1)
        for name, value in zip(names.split(), values.split(":", 1)[1].split(), strict=False):
            counters[f"{proto}.{name}"] = int(value)
    return counters


def udp_blast(bed: Testbed, server_addr: str, count: int, port: int = 5401) -> int:
    """Send count datagrams A->B one way; returns how many B's socket received (bounded wait)."""
    sink = socket_in(bed.ns_b, socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((server_addr, port))
    sink.settimeout(0.3)
    sender = socket_in(bed.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for seq in range(count):
            sender.sendto(seq.to_bytes(4, "big") + b"\0" * 60, (server_addr, port))
            time.sleep(0.001)  # pacing, so queue limits play no part in what we measure
        received = 0
        while True:
            try:
                sink.recv(65536)
            except TimeoutError:
                return received
            received += 1
    finally:
        sender.close()
        sink.close()
