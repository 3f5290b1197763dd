"""The ``network`` fault kind: tc impairments under a root qdisc the agent owns.

See agent/netlink/tc.py for the tree and docs/faults-network.md for the user's
view. Safety rules this module enforces:

* the lifeline: the NATS server(s) the agent is connected to, the config's
  exempt CIDRs and the spec's exempt list always take the pass-through path;
* fail closed: a root (or ingress) qdisc we did not create is refused unless
  ``force: true``, which deletes it (it is named in the plan and the event,
  not restored);
* one network fault per interface: a second gets "conflict: fault F holds IF";
* revert works from the journaled plan alone, and sweep removes every fa17:
  root, our ingress redirect and every flifb* device at start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.faults.base import Capability, FaultContext, Injector, Plan, Rejected
from agent.netlink import tc
from agent.netlink.netns import NetnsError, iproute, netns_inode
from agent.netlink.probe import probe as probe_kernel
from proto.faults import NetworkSpec, PortMatch, required_capabilities
from proto.messages import Measurements, NetworkPreview, PreviewResult

NETLINK_TIMEOUT_S = 5.0
MAX_RULES = 512
Side = Literal["dst", "src"]


class NetworkPlan(Plan):
    """Everything revert needs, journaled before the first netlink call."""

    netns: str | None
    interface: str
    direction: Literal["egress", "ingress"]
    device: str  # where the htb root sits: the interface, or our ifb for ingress
    ifb: str | None = None
    create_ingress: bool = False
    replaced: list[str] = []  # foreign qdiscs deleted under force: true
    tree: tc.TcTree


def _netem_params(spec: NetworkSpec) -> tc.NetemParams:
    return tc.NetemParams(
        delay_us=round((spec.delay_s or 0.0) * 1e6),
        jitter_us=round((spec.jitter_s or 0.0) * 1e6),
        delay_corr=spec.correlation or 0.0,
        loss=spec.loss or 0.0,
        loss_corr=spec.loss_correlation or 0.0,
        duplicate=spec.duplicate or 0.0,
        corrupt=spec.corrupt or 0.0,
        reorder=spec.reorder or 0.0,
        gap=spec.gap or 0,
        limit_packets=spec.limit or 1000,
        # "uniform" is netem's built-in jitter: no table to load.
        distribution=None if spec.distribution in (None, "uniform") else spec.distribution,
    )


def _family(cidr: str) -> Literal[4, 6]:
    return 4 if ipaddress.ip_network(cidr, strict=False).version == 4 else 6


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def build_rules(spec: NetworkSpec, control_plane: list[tuple[str, int]], config_exempt: list[str]) -> list[tc.U32Rule]:
    """Pass-through rules (lifeline, exemptions) first, then the fault's scope."""
    # On ingress the remote peer is the packet's source.
    addr_side: Side = "dst" if spec.direction == "egress" else "src"
    rules: list[tc.U32Rule] = []
    if spec.exempt_control_plane:
        for host, port in control_plane:
            for addr in _resolve(host, port):
                cidr = str(ipaddress.ip_network(addr))
                rules.append(
                    tc.U32Rule(family=_family(cidr), cidr=cidr, addr_side=addr_side, protocol="tcp", port=port,
                               port_side=addr_side, target="pass", why=f"control plane {host}:{port}")
                )  # fmt: skip
    for cidr, why in [(c, "agent config exempt") for c in config_exempt] + [(c, "spec exempt") for c in spec.exempt]:
        cidr = str(ipaddress.ip_network(cidr, strict=False))
        rules.append(tc.U32Rule(family=_family(cidr), cidr=cidr, addr_side=addr_side, target="pass", why=why))
    if spec.destinations or spec.ports:
        dests: list[str | None] = list(spec.destinations) or [None]
        port_matches: list[PortMatch | None] = list(spec.ports) or [None]
        for dest, pm in itertools.product(dests, port_matches):
            families: list[Literal[4, 6]] = [_family(dest)] if dest else [4, 6]
            protocols: list[Literal["tcp", "udp"] | None] = [None]
            if pm is not None:
                protocols = [pm.protocol] if pm.protocol else ["tcp", "udp"]
            for family, proto in itertools.product(families, protocols):
                rules.append(
                    tc.U32Rule(
                        family=family, cidr=dest, addr_side=addr_side, protocol=proto,
                        port=pm.port if pm else None,
                        port_side="dst" if pm is None or pm.side == "destination" else "src",
                        target="fault", why="scope",
                    )
                )  # fmt: skip
    return rules


def build_tree(spec: NetworkSpec, rules: list[tc.U32Rule]) -> tc.TcTree:
    scoped = bool(spec.destinations or spec.ports)
    if spec.needs_netem():
        # netem impairs; a rate on top is the htb class's ceiling (netem's own
        # rate model would also delay exempt-free traffic per packet size).
        return tc.TcTree(
            default_target="fault" if not scoped else "pass",
            class_rate_bps=spec.rate_bps,
            netem=_netem_params(spec),
            rules=rules,
        )
    return tc.TcTree(
        default_target="fault" if not scoped else "pass",
        tbf_rate_bps=spec.rate_bps,
        tbf_limit_packets=spec.limit,
        rules=rules,
    )


def _kernel_text(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError) and len(exc.args) > 1:
        return f"{exc.args[1]} (errno {exc.code})"
    return str(exc) or type(exc).__name__


class NetworkFault(Injector):
    kind: ClassVar[str] = "network"
    plan_model: ClassVar[type[Plan]] = NetworkPlan
    kept: ClassVar[bool] = True  # a frozen agent's qdiscs are removed by its keeper (agent/keepers.py)

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self._caps: dict[str, Capability] | None = None
        # (netns inode, interface) -> fault id. Rebuilt from journaled plans by sweep.
        self._holders: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()  # holders are touched from worker threads
        self._ops = threading.Lock()  # one netlink operation at a time (see _serialized)
        # faults whose apply may still install: set by apply() before its thread is queued, taken back
        # by revert() before its own. An apply that timed out and is still queued for the lock (its
        # waiters are not served in order) must not install after a revert that found nothing.
        self._may_install: set[str] = set()
        # Netlink work runs on a thread of its own, never the event loop's shared pool: threads
        # stuck there (a hung journal fsync, a DNS lookup that does not return) must not keep a
        # revert from its turn, nor a hung netlink call keep them from theirs. Queued calls wait
        # in order without holding a thread, and one that times out before its turn never runs.
        self._executor: ThreadPoolExecutor | None = None

    def _off_loop(self, func: Any, *args: Any) -> asyncio.Future[Any]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        return asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def probe(self) -> list[Capability]:
        caps = probe_kernel()
        self._caps = {c.name: c for c in caps}
        return caps

    def check(self, spec: Any, ctx: FaultContext) -> None:
        if not isinstance(spec, NetworkSpec):
            raise Rejected(f"network injector got a {type(spec).__name__}")
        if spec.distribution is not None and not spec.jitter_s:
            # netem draws from the table only to spread the delay by jitter; without it the table is ignored.
            raise Rejected(
                f"distribution {spec.distribution} needs jitter: the distribution shapes the delay's spread, "
                "e.g. delay: 50ms, jitter: 10ms"
            )
        caps = self._caps if self._caps is not None else {c.name: c for c in self.probe()}
        for name in required_capabilities(spec):
            cap = caps.get(name)
            if cap is None or not cap.available:
                raise Rejected(cap.note if cap is not None and cap.note else f"{name} is not available on this node")
        if spec.interface is not None:
            try:
                key = (netns_inode(spec.netns), spec.interface)
            except NetnsError as exc:
                raise Rejected(str(exc)) from None
            with self._lock:
                holder = self._holders.get(key)
            if holder is not None and holder != ctx.fault_id:
                raise Rejected(f"conflict: fault {holder} holds {spec.interface}")

    async def _netlink(self, what: str, func: Any, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(self._off_loop(self._serialized, func, *args), NETLINK_TIMEOUT_S)
        except TimeoutError:
            raise Rejected(f"{what}: netlink did not answer within {NETLINK_TIMEOUT_S} s") from None

    def _serialized(self, func: Any, *args: Any) -> Any:
        # A worker thread cannot be cancelled: an apply that timed out still finishes. One
        # lock over every netlink operation makes the revert that follows wait for it, so
        # it removes what that apply installed instead of finding nothing and leaving it.
        with self._ops:
            return func(*args)

    def release(self, ctx: FaultContext) -> None:
        # after a revert (its claim is gone already), or one its keeper did while the agent was
        # frozen: the interface is no longer this fault's
        self._may_install.discard(ctx.fault_id)
        self._drop_claims(ctx.fault_id)

    def _forget(self, fault_id: str) -> None:
        with self._ops:
            self._drop_claims(fault_id)

    def _drop_claims(self, fault_id: str) -> None:
        with self._lock:
            for key, holder in list(self._holders.items()):
                if holder == fault_id:
                    del self._holders[key]

    # -- plan -----------------------------------------------------------------

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        self.check(spec, ctx)
        control_plane = await self._control_plane() if spec.exempt_control_plane else []
        # A plan thread that timed out (or whose caller gave up: the lifecycle's own bound can be
        # the shorter) may still claim the interface for this fault, which will never be reverted
        # (it has no plan). Whichever runs last drops that claim: the thread itself, seeing the
        # caller gone, or _forget queued after it.
        gone = threading.Event()

        def plan_unless_gone() -> NetworkPlan:
            plan = self._plan_sync(spec, ctx.fault_id, control_plane)
            if gone.is_set():
                self._drop_claims(ctx.fault_id)
                raise Rejected("planned after its caller had given up; nothing claimed")
            return plan

        try:
            plan: NetworkPlan = await self._netlink("plan", plan_unless_gone)
        except (Rejected, asyncio.CancelledError):
            gone.set()
            self._off_loop(self._forget, ctx.fault_id)
            raise
        return plan

    async def _control_plane(self) -> list[tuple[str, int]]:
        """Every NATS server the agent may talk to, resolved in a worker thread (DNS; outside the
        netlink lock, so a slow name never holds up a revert). Unknown: the fault is refused."""
        try:
            known = await asyncio.wait_for(asyncio.to_thread(self.env.control_plane), NETLINK_TIMEOUT_S)
        except TimeoutError:
            known = None
        if known is None:
            raise Rejected(
                "the address of the agent's NATS server is not known now (its name does not resolve): "
                "the fault could cut the agent's control link; not applied"
            )
        return list(known)

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult:
        """The plan an Inject would make now (the interface, what it would replace, what stays
        untouched), with nothing claimed or installed. Refusals are the plan's own."""
        self.check(spec, ctx)
        control_plane = await self._control_plane() if spec.exempt_control_plane else []
        plan, rules = await self._netlink("preview", self._preview_sync, spec, control_plane)
        unaffected = []
        for r in rules:
            if r.target == "pass" and r.cidr is not None:
                addr = r.cidr.removesuffix("/32").removesuffix("/128")
                if r.port is None:
                    where = addr
                else:
                    where = f"[{addr}]:{r.port}" if ":" in addr else f"{addr}:{r.port}"
                unaffected.append(f"{where} ({r.why})")
        return PreviewResult(
            network=NetworkPreview(
                interface=plan.interface,
                netns=plan.netns,
                direction=plan.direction,
                device=plan.device,
                replaces=list(plan.replaced),
                unaffected=unaffected,
                filters=len(rules),
            ),
            note=None if spec.exempt_control_plane else "exemptControlPlane: false: the NATS link is not exempt",
        )

    def _preview_sync(
        self, spec: NetworkSpec, control_plane: list[tuple[str, int]]
    ) -> tuple[NetworkPlan, list[tc.U32Rule]]:
        _, plan = self._inspect(spec, control_plane)
        return plan, build_rules(spec, control_plane, list(self.env.exempt_cidrs))

    def _inspect(self, spec: NetworkSpec, control_plane: list[tuple[str, int]]) -> tuple[int, NetworkPlan]:
        """(the namespace's inode, the plan) from what the kernel shows now; claims nothing."""
        try:
            inode = netns_inode(spec.netns)
            with iproute(spec.netns) as ipr:
                return inode, self._plan_in(ipr, spec, control_plane)
        except NetnsError as exc:
            raise Rejected(str(exc)) from None
        except (NetlinkError, OSError) as exc:
            raise Rejected(f"cannot inspect the network: {_kernel_text(exc)}") from None

    def _plan_sync(self, spec: NetworkSpec, fault_id: str, control_plane: list[tuple[str, int]]) -> NetworkPlan:
        inode, plan = self._inspect(spec, control_plane)
        key = (inode, plan.interface)
        with self._lock:
            holder = self._holders.get(key)
            if holder is not None and holder != fault_id:
                raise Rejected(f"conflict: fault {holder} holds {plan.interface}")
            self._holders[key] = fault_id
        return plan

    def _plan_in(self, ipr: IPRoute, spec: NetworkSpec, control_plane: list[tuple[str, int]]) -> NetworkPlan:
        where = f" in netns {spec.netns}" if spec.netns else ""
        interface = spec.interface or tc.default_route_interface(ipr)
        if interface is None:
            raise Rejected(f"no interface given and no default route{where}")
        index = tc.link_index(ipr, interface)
        if index is None:
            raise Rejected(f"interface {interface} not found{where}")
        held = tc.holdings(ipr)
        if interface in held:
            with self._lock:
                holders = [f for (_, name), f in self._holders.items() if name == interface]
            if holders:
                raise Rejected(f"conflict: fault {holders[0]} holds {interface}")
            raise Rejected(
                f"conflict: {interface}{where} already carries faultline's {held[interface]} that no fault "
                "of this agent accounts for (another agent instance?)"
            )
        replaced: list[str] = []
        root = tc.root_qdisc(ipr, index)
        if spec.direction == "egress" and tc.root_owner(root) == "foreign":
            assert root is not None
            if not spec.force:
                raise Rejected(
                    f"{interface}{where} has a root qdisc faultline did not create ({root[0]} {root[1] >> 16:x}:); "
                    "refusing to replace it (set force: true to delete it for the fault; it is not restored)"
                )
            replaced.append(f"root {root[0]} {root[1] >> 16:x}:")
        ingress = tc.ingress_qdisc(ipr, index)
        if spec.direction == "ingress" and ingress is not None:
            if not spec.force:
                raise Rejected(
                    f"{interface}{where} already has an {ingress} qdisc faultline did not create; "
                    "refusing to replace it (set force: true to delete it for the fault; it is not restored)"
                )
            replaced.append(f"{ingress} ffff:")
        rules = build_rules(spec, control_plane, list(self.env.exempt_cidrs))
        if len(rules) > MAX_RULES:
            raise Rejected(f"the fault needs {len(rules)} tc filters; at most {MAX_RULES} (fewer destinations × ports)")
        ifb = tc.ifb_name(interface) if spec.direction == "ingress" else None
        return NetworkPlan(
            netns=spec.netns,
            interface=interface,
            direction=spec.direction,
            device=ifb or interface,
            ifb=ifb,
            create_ingress=spec.direction == "ingress",
            replaced=replaced,
            tree=build_tree(spec, rules),
        )

    # -- apply ----------------------------------------------------------------

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, NetworkPlan)
        started = time.monotonic()
        self._may_install.add(ctx.fault_id)
        await self._netlink("apply", self._apply_sync, plan, ctx.fault_id)
        note = f"replaced (force): {', '.join(plan.replaced)}" if plan.replaced else None
        return Measurements(
            interface=plan.interface,
            netns=plan.netns,
            qdisc_handle=f"{tc.HANDLE_MAJOR:x}:",
            apply_s=time.monotonic() - started,
            note=note,
        )

    def _apply_sync(self, plan: NetworkPlan, fault_id: str) -> None:
        if fault_id not in self._may_install:  # under the netlink lock: checked before anything is installed
            raise Rejected("its revert began before the apply got its turn; nothing was installed")
        with iproute(plan.netns) as ipr:
            try:
                index = tc.link_index(ipr, plan.interface)
                if index is None:
                    raise Rejected(f"interface {plan.interface} disappeared before the fault was applied")
                if plan.direction == "egress":
                    if plan.replaced:
                        tc.delete_root(ipr, index)
                    tc.install(ipr, index, plan.tree)
                else:
                    if plan.replaced:
                        tc.delete_ingress(ipr, index)
                    assert plan.ifb is not None
                    ifb_index = tc.add_ifb(ipr, plan.ifb)
                    tc.install(ipr, ifb_index, plan.tree)
                    tc.add_ingress_redirect(ipr, index, ifb_index, create_qdisc=True)
            except NetlinkError as exc:
                # Leave nothing half-built; the runtime's revert is then a no-op.
                self._remove(ipr, plan)
                raise Rejected(f"kernel refused the tc setup on {plan.interface}: {_kernel_text(exc)}") from None

    # -- revert ---------------------------------------------------------------

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        assert isinstance(plan, NetworkPlan)
        started = time.monotonic()
        self._may_install.discard(ctx.fault_id)  # before the revert is queued: see _may_install
        removed, other = await self._netlink("revert", self._revert_sync, plan, ctx.fault_id)
        self._drop_claims(ctx.fault_id)  # its own claim only: another fault's stands
        if other is not None:
            note = f"nothing removed: {plan.interface} is held by fault {other} now, whose tree that is"
        else:
            note = ("removed " + ", ".join(removed)) if removed else "nothing left to remove"
        return Measurements(
            interface=plan.interface,
            netns=plan.netns,
            qdisc_handle=f"{tc.HANDLE_MAJOR:x}:",
            revert_s=time.monotonic() - started,
            recovered_from_journal=ctx.recovered or None,
            note=note,
        )

    def _revert_sync(self, plan: NetworkPlan, fault_id: str) -> tuple[list[str], str | None]:
        """(what was removed, the other fault holding the interface). Every fault's tree carries the
        same handle, so what is on the interface is this fault's only while no other fault holds it:
        a retried revert (a kept journal entry, at a halt) must never remove a live fault's tree.
        Under the netlink lock, so no plan or apply runs between this check and the removal; and
        another fault could hold the interface only once the kernel showed nothing of ours on it."""
        try:
            key = (netns_inode(plan.netns), plan.interface)
            with self._lock:
                holder = self._holders.get(key)
            if holder is not None and holder != fault_id:
                return [], holder
            with iproute(plan.netns) as ipr:
                return self._remove(ipr, plan), None
        except NetnsError:
            return [], None  # the namespace is gone, and everything in it with it

    @staticmethod
    def _remove(ipr: IPRoute, plan: NetworkPlan) -> list[str]:
        removed: list[str] = []
        index = tc.link_index(ipr, plan.interface)
        if index is not None:
            if plan.direction == "ingress" and tc.remove_ingress(ipr, index):
                removed.append(f"ingress redirect on {plan.interface}")
            if plan.direction == "egress" and tc.remove_root(ipr, index):
                removed.append(f"qdisc fa17: on {plan.interface}")
        if plan.ifb is not None:
            if not removed:  # not found by its name (renamed?): the redirect goes before its ifb
                removed += [
                    f"ingress redirect on {name} (renamed from {plan.interface})"
                    for name in tc.unredirect(ipr, plan.ifb)
                ]
            if tc.delete_link(ipr, plan.ifb):
                removed.append(f"ifb {plan.ifb}")
        return removed

    # -- sweep ----------------------------------------------------------------

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        namespaces: list[str | None] = [None]
        for plan in journaled:
            if isinstance(plan, NetworkPlan) and plan.netns not in namespaces:
                namespaces.append(plan.netns)
        lines: list[str] = []
        for netns in namespaces:
            lines.extend(await self._netlink("sweep", self._sweep_sync, netns))
        with self._lock:
            self._holders.clear()
        return lines

    @staticmethod
    def _sweep_sync(netns: str | None) -> list[str]:
        where = f"netns {netns}" if netns else "root netns"
        try:
            with iproute(netns) as ipr:
                return tc.sweep_namespace(ipr, where)
        except NetnsError:
            return []
