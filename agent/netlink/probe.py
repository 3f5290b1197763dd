"""Which tc pieces this kernel has, tried for real in a throwaway network namespace.

A dedicated thread unshares a fresh network namespace (namespaces are per
thread), builds each piece on a veth pair there, and exits: the namespace
and everything in it disappear with the thread. Nothing on the node is touched.
"""

from __future__ import annotations

import ctypes
import os
import threading

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.faults.base import Capability
from agent.netlink import tc
from agent.netlink.netns import CLONE_NEWNET

NAMES = (
    "network",
    "network.netem",
    "network.tbf",
    "network.htb",
    "network.u32",
    "network.ifb",
    "network.mirred",
    "network.netns",
)
PROBE_TIMEOUT_S = 5.0
_libc = ctypes.CDLL(None, use_errno=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"{exc.args[1] if len(exc.args) > 1 else exc} (errno {exc.code})"
    return str(exc) or type(exc).__name__


def _probe_in_fresh_namespace() -> dict[str, tuple[bool, str | None]]:
    result: dict[str, tuple[bool, str | None]] = {}
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot create a network namespace: {os.strerror(err)}")
    with IPRoute(ext_ack=True) as ipr:
        ipr.link("add", ifname="flprobe0", kind="veth", peer="flprobe1")
        index = tc.link_index(ipr, "flprobe0")
        assert index is not None
        ipr.link("set", index=index, state="up")

        def attempt(name: str, module: str, action: object) -> bool:
            try:
                action() if callable(action) else None
            except Exception as exc:
                result[name] = (False, f"kernel lacks {module}: {_reason(exc)}")
                return False
            result[name] = (True, None)
            return True

        htb = attempt("network.htb", "sch_htb", lambda: ipr.tc("add", "htb", index, tc.ROOT_HANDLE, default=0))
        if htb:
            ipr.tc("add-class", "htb", index, tc.FAULT_CLASS, parent=tc.ROOT_HANDLE, rate=125_000, ceil=125_000)
            for name, kind, module, kwargs in (
                ("network.netem", "netem", "sch_netem", {"delay": 1000}),
                ("network.tbf", "tbf", "sch_tbf", {"rate": 125_000, "burst": 3028, "latency": 50_000}),
            ):

                def add_child(kind: str = kind, kwargs: dict[str, int] = kwargs) -> None:
                    ipr.tc("add", kind, index, tc.CHILD_HANDLE, parent=tc.FAULT_CLASS, **kwargs)
                    ipr.tc("del", index=index, handle=tc.CHILD_HANDLE, parent=tc.FAULT_CLASS)

                attempt(name, module, add_child)
            attempt(
                "network.u32", "cls_u32",
                lambda: ipr.tc("add-filter", "u32", index, parent=tc.ROOT_HANDLE, prio=2, protocol=tc.ETH_P_IP,
                               target=tc.FAULT_CLASS, keys=["0x0a000000/0xff000000+16"]),
            )  # fmt: skip
        else:
            for name, module in (
                ("network.netem", "sch_netem"),
                ("network.tbf", "sch_tbf"),
                ("network.u32", "cls_u32"),
            ):
                result[name] = (False, f"cannot test {module}: {result['network.htb'][1]}")
        ifb_index: int | None = None
        try:
            ifb_index = tc.add_ifb(ipr, "flprobeifb")
            result["network.ifb"] = (True, None)
        except Exception as exc:
            result["network.ifb"] = (False, f"kernel lacks ifb: {_reason(exc)}")
        if ifb_index is None:
            result["network.mirred"] = (False, "cannot test act_mirred without an ifb device")
        else:
            try:
                ipr.tc("add", "ingress", index, tc.INGRESS_HANDLE)
            except Exception as exc:
                result["network.mirred"] = (False, f"kernel lacks sch_ingress: {_reason(exc)}")
            else:
                attempt("network.mirred", "act_mirred", lambda: tc.add_ingress_redirect(ipr, index, ifb_index, False))
    return result


def probe() -> list[Capability]:
    """Capabilities named as proto.faults.required_capabilities names them, "network" first."""
    if os.geteuid() != 0:
        why = "needs root (CAP_NET_ADMIN) to program tc"
        return [Capability(name, False, why) for name in NAMES]
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = _probe_in_fresh_namespace()
        except BaseException as exc:  # reported below, in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="faultline-tc-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if thread.is_alive():
        why = f"tc capability probe did not finish within {PROBE_TIMEOUT_S} s"
        return [Capability(name, False, why) for name in NAMES]
    if "error" in box:
        why = f"tc capability probe failed: {_reason(box['error'])}"  # type: ignore[arg-type]
        return [Capability(name, False, why) for name in NAMES]
    found: dict[str, tuple[bool, str | None]] = box["result"]  # type: ignore[assignment]
    caps = [
        Capability("network", found.get("network.htb", (False, None))[0], found.get("network.htb", (False, None))[1])
    ]
    for name in NAMES[1:-1]:
        ok, note = found.get(name, (False, "not probed"))
        caps.append(Capability(name, ok, note))
    caps.append(Capability("network.netns", True, None))  # setns(2) works for root on every kernel we run
    return caps
