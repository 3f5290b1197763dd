"""A fleet on one machine: NATS, agents and a controller, each in its own network namespace.

Layout (every name carries a per-fleet tag, so parallel runs and leftovers are identifiable):

    <tag>-hub   bridge br0; one veth per member (h<i>), the other end is eth0 in the member
    <tag>-nats  nats-server on 10.231.0.1:4222 (fixed, so a restart keeps the address)
    <tag>-ctl   10.231.0.2: the controller subprocess and the test's own NATS client
    <tag>-n<i>  10.231.0.<10+i>: one agent, its victims

Agents share the machine's PID space, so each agent gets a --deny pattern for
every other node's victims: one selector (``victim_regex``) then pauses exactly
the victims of the nodes the experiment targets. The regex is spelled with a
character class so it never matches an argv that merely contains the pattern.

``python -m tests.system.fleet up 5`` starts one for a person to play with;
``python -m tests.system.fleet clean`` removes leftovers of killed runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil

from agent.netlink.netns import entered, netns_path
from controller.natsserver import NatsServer
from proto import subjects
from proto.codec import DecodeError, decode
from proto.messages import Ack, FaultEvent, Heartbeat
from tests.conftest import REPO, AgentProcess, wait_until

SUBNET = "10.231.0"
NATS_ADDR = f"{SUBNET}.1"
CTL_ADDR = f"{SUBNET}.2"
NATS_PORT = 4222
NATS_URL = f"nats://{NATS_ADDR}:{NATS_PORT}"
TAG_PREFIX = "fls"  # every namespace and process of ours: fls<hex>-...
ZONES = ("a", "b", "c")

VICTIM_CODE = "import os,time\np=os.getppid()\nwhile os.getppid()==p: time.sleep(0.2)"
"""A victim exits when the harness that started it dies, so a killed test run leaves no victims."""


def missing_prerequisite() -> str | None:
    """Why this machine cannot host a fleet, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) to build the namespaces and the bridge"
    try:
        from controller.natsserver import nats_server_binary

        nats_server_binary()
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
        return str(exc)
    return None


def ip(*args: str, timeout_s: float = 10.0) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, timeout=timeout_s, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def default_labels(i: int) -> dict[str, str]:
    """Node i (1-based): zones a, a, b, b, c, c, ...; zones a and b in region r1, c in r2."""
    zone = ZONES[((i - 1) // 2) % len(ZONES)]
    return {"zone": zone, "region": "r2" if zone == "c" else "r1"}


# --- an event loop on a thread that lives in a namespace -------------------------


class NsLoop:
    """A thread in a network namespace running an asyncio loop: sockets it opens live there."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"nsloop-{ns}", daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"event loop thread in {ns} did not start")
        if self._failed is not None:
            raise RuntimeError(f"cannot run a loop in {ns}: {self._failed}")

    def _main(self) -> None:
        try:
            with entered(str(netns_path(self.ns))):
                asyncio.set_event_loop(self.loop)
                self._ready.set()
                self.loop.run_forever()
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for t in pending:
                    t.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        except BaseException as exc:  # noqa: BLE001 - reported to the starter
            self._failed = exc
            self._ready.set()
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Observer:
    """The test's own NATS client (in the controller's namespace): records heartbeats and events."""

    def __init__(self, nsloop: NsLoop) -> None:
        self.nsloop = nsloop
        self.nc: Any = None
        self.heartbeats: list[Heartbeat] = []
        self.events: list[FaultEvent] = []
        self.garbage = 0

    def connect(self, url: str) -> None:
        async def go() -> None:
            async def quiet(*_: Any) -> None:
                return None

            self.nc = await nats.connect(
                url, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                ping_interval=1, max_outstanding_pings=2, error_cb=quiet, disconnected_cb=quiet,
            )  # fmt: skip
            await self.nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_hb)
            await self.nc.subscribe("faultline.v1.exp.*.events", cb=self._on_event)
            await self.nc.flush(timeout=5)

        self.nsloop.run(go())

    async def _on_hb(self, msg: Any) -> None:
        try:
            self.heartbeats.append(decode(msg.data, Heartbeat))
        except DecodeError:
            self.garbage += 1

    async def _on_event(self, msg: Any) -> None:
        try:
            self.events.append(decode(msg.data, FaultEvent))
        except DecodeError:
            self.garbage += 1

    def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                self.nsloop.run(asyncio.wait_for(self.nc.close(), 5), timeout_s=10)

    def events_of(self, node: str | None = None, state: str | None = None) -> list[FaultEvent]:
        return [
            e for e in list(self.events) if (node is None or e.node == node) and (state is None or e.state == state)
        ]

    def heartbeats_of(self, node: str) -> list[Heartbeat]:
        return [h for h in list(self.heartbeats) if h.node == node]

    def request(self, node: str, payload: bytes, timeout_s: float = 3.0) -> Ack:
        async def go() -> bytes:
            msg = await self.nc.request(subjects.agent_cmd(node), payload, timeout=timeout_s)
            return bytes(msg.data)

        return decode(self.nsloop.run(go(), timeout_s + 5), Ack)

    def spawn(self, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future[Any]:
        """Start fn(nc) on the observer's loop and return at once (e.g. a heartbeat forger)."""
        return asyncio.run_coroutine_threadsafe(fn(self.nc), self.nsloop.loop)

    def call(self, fn: Callable[[Any], Coroutine[Any, Any, Any]], timeout_s: float = 60.0) -> Any:
        """Run fn(nc) on the observer's loop, for floods and crafted messages."""
        return self.nsloop.run(fn(self.nc), timeout_s)


# --- members ----------------------------------------------------------------------


@dataclass
class Node:
    name: str
    ns: str
    addr: str
    veth: str  # the hub-side end: down = cut off
    labels: dict[str, str]
    agent: AgentProcess
    victim_token: str
    victims: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def victim_procs(self) -> list[psutil.Process]:
        out = []
        for p in self.victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(p.pid))
        return out


def victim_status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.NoSuchProcess:
        return "gone"


@dataclass
class Controller:
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-3000:] if self.err_path.exists() else ""

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"controller did not finish within {timeout_s}s:\n{self.stderr()}") from None

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class FleetHarness:
    """Build with up(), take apart with down() (idempotent, also after a failure half-way)."""

    def __init__(
        self,
        workdir: Path,
        n_nodes: int,
        labels: Callable[[int], dict[str, str]] = default_labels,
        victims_per_node: int = 2,
        heartbeat_interval_s: float = 0.5,
    ) -> None:
        self.tag = f"{TAG_PREFIX}{uuid.uuid4().hex[:6]}"
        self.workdir = workdir / self.tag
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_nodes = n_nodes
        self.labels_of = labels
        self.victims_per_node = victims_per_node
        self.heartbeat_interval_s = heartbeat_interval_s
        self.hub, self.nats_ns, self.ctl_ns = f"{self.tag}-hub", f"{self.tag}-nats", f"{self.tag}-ctl"
        self.namespaces: list[str] = []
        self.nodes: dict[str, Node] = {}
        self.nats: NatsServer | None = None
        self.controllers: list[Controller] = []
        self.nsloop: NsLoop | None = None
        self.observer: Observer | None = None
        self._veths = 0

    # --- names and selectors

    @property
    def victim_regex(self) -> str:
        """Selects victims of the targeted nodes; the character class keeps it from matching itself."""
        return f"{self.tag}-victi[m]-"

    def deny_for(self, node: str) -> str:
        return f"{self.tag}-victi[m]-(?!{re.escape(node)}-x)"

    # --- build

    def up(self) -> FleetHarness:
        ip("netns", "add", self.hub)
        self.namespaces.append(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        self._member(self.nats_ns, NATS_ADDR)
        self._member(self.ctl_ns, CTL_ADDR)
        self.start_nats()
        self.nsloop = NsLoop(self.ctl_ns)
        self.observer = Observer(self.nsloop)
        self.observer.connect(NATS_URL)
        for i in range(1, self.n_nodes + 1):
            self.add_node(f"n{i}", self.labels_of(i), start=False)
        for node in self.nodes.values():
            self.start_agent(node.name, wait=False)
        for node in self.nodes.values():
            node.agent.wait_ready(30)
        self.wait_heartbeats(list(self.nodes), 10)
        return self

    def _member(self, ns: str, addr: str) -> str:
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._veths += 1
        veth = f"h{self._veths}"
        ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return veth

    def add_node(self, name: str, labels: dict[str, str], start: bool = True) -> Node:
        ns = f"{self.tag}-{name}"
        addr = f"{SUBNET}.{10 + len(self.nodes) + 1}"
        veth = self._member(ns, addr)
        state = self.workdir / f"state-{name}"
        state.mkdir(exist_ok=True)
        extra = ["--deny", self.deny_for(name)]
        for k, v in labels.items():
            extra += ["--label", f"{k}={v}"]
        agent = AgentProcess(NATS_URL, name, state, self.workdir / f"agent-{name}.log", extra)
        token = f"{self.tag}-victim-{name}-x"
        node = Node(name, ns, addr, veth, labels, agent, token)
        self.nodes[name] = node
        self.start_victims(node, self.victims_per_node)
        if start:
            self.start_agent(name)
        return node

    def _in(self, ns: str, fn: Callable[[], Any]) -> Any:
        """Run fn with this thread in ns: processes it starts are born there."""
        with entered(str(netns_path(ns))):
            return fn()

    def start_victims(self, node: Node, n: int) -> None:
        for _ in range(n):
            argv = [sys.executable, "-c", VICTIM_CODE, node.victim_token]
            node.victims.append(
                self._in(node.ns, lambda a=argv: subprocess.Popen(a, stdin=subprocess.DEVNULL, start_new_session=True))
            )

    # --- NATS

    def start_nats(self) -> None:
        if self.nats is None:
            wd = self.workdir / f"{self.tag}-nats"
            wd.mkdir(exist_ok=True)
            self.nats = NatsServer(host=NATS_ADDR, port=NATS_PORT, workdir=str(wd))
        self._in(self.nats_ns, self.nats.start)

    def kill9_nats(self) -> None:
        assert self.nats is not None
        self.nats.kill()

    # --- agents

    def start_agent(self, name: str, wait: bool = True) -> AgentProcess:
        agent = self.nodes[name].agent
        self._in(self.nodes[name].ns, agent.start)
        if wait:
            agent.wait_ready(30)
        return agent

    def kill9_agent(self, name: str) -> None:
        self.nodes[name].agent.kill9()

    def sigterm_agent(self, name: str, timeout_s: float = 15.0) -> int:
        agent = self.nodes[name].agent
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None
        return agent.proc.wait(timeout=timeout_s)

    def sigstop_agent(self, name: str) -> None:
        self.nodes[name].agent.signal(signal.SIGSTOP)

    def sigcont_agent(self, name: str) -> None:
        self.nodes[name].agent.signal(signal.SIGCONT)

    def cut(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.nodes[name].veth, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.nodes[name].veth, "up")

    def wait_heartbeats(self, names: list[str], timeout_s: float, since: float = 0.0) -> dict[str, Heartbeat]:
        assert self.observer is not None
        obs = self.observer

        def latest() -> dict[str, Heartbeat] | None:
            got = {}
            for n in names:
                hbs = [h for h in obs.heartbeats_of(n) if h.sent_at >= since and h.state == "ready"]
                if not hbs:
                    return None
                got[n] = hbs[-1]
            return got

        result: dict[str, Heartbeat] = wait_until(latest, timeout_s, f"ready heartbeats from {', '.join(names)}")
        return result

    # --- controller

    def run_controller(self, experiment_yaml: str, name: str = "exp") -> Controller:
        path = self.workdir / f"{self.tag}-{name}.yaml"
        path.write_text(experiment_yaml)
        out, err = self.workdir / f"{name}.out.json", self.workdir / f"{name}.err.log"
        argv = [sys.executable, "-m", "controller.cli", "run", str(path), "--nats", NATS_URL, "-o", "json"]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = self._in(
                self.ctl_ns,
                lambda: subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=REPO),
            )
        ctl = Controller(proc, out, err)
        self.controllers.append(ctl)
        return ctl

    def faultline_agents(self, timeout_s: float = 20.0) -> str:
        argv = [sys.executable, "-m", "controller.cli", "agents", "--nats", NATS_URL, "-o", "json"]
        res = self._in(
            self.ctl_ns, lambda: subprocess.run(argv, capture_output=True, timeout=timeout_s, cwd=REPO, check=False)
        )
        if res.returncode != 0:
            raise AssertionError(f"faultline agents exited {res.returncode}: {res.stderr.decode()[-2000:]}")
        return str(res.stdout.decode())

    # --- teardown

    def all_victims(self) -> list[psutil.Process]:
        return [p for node in self.nodes.values() for p in node.victim_procs()]

    def down(self) -> None:
        for ctl in self.controllers:
            with contextlib.suppress(Exception):
                ctl.kill9()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.agent.stop(timeout_s=10)
        if self.observer is not None:
            self.observer.close()
        if self.nsloop is not None:
            self.nsloop.close()
        for node in self.nodes.values():
            for p in node.victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        if self.nats is not None:
            with contextlib.suppress(Exception):
                self.nats.stop()
        for ns in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                ip("netns", "del", ns)
        self.namespaces.clear()


def clean_leftovers(prefix: str = TAG_PREFIX) -> list[str]:
    """Remove namespaces and kill processes of any fleet (e.g. of a run killed with -9)."""
    removed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if re.search(rf"\b{prefix}[0-9a-f]{{6}}-", cmd) and proc.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                removed.append(f"process {proc.pid}: {cmd[:80]}")
    for ns in list_netns():
        if re.match(rf"^{prefix}[0-9a-f]{{6}}-", ns):
            with contextlib.suppress(Exception):
                ip("netns", "del", ns)
                removed.append(f"namespace {ns}")
    return removed


def _dev_main(argv: list[str]) -> int:
    usage = "usage: python -m tests.system.fleet up N | clean"
    if not argv or argv[0] not in ("up", "clean"):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "clean":
        for line in clean_leftovers():
            print(f"removed {line}")
        return 0
    why = missing_prerequisite()
    if why:
        print(f"cannot start a fleet: {why}", file=sys.stderr)
        return 2
    n = int(argv[1]) if len(argv) > 1 else 3
    fleet = FleetHarness(Path(tempfile.mkdtemp(prefix="faultline-fleet-")), n)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fleet.up()
        print(f"fleet {fleet.tag}: NATS {NATS_URL} in namespace {fleet.nats_ns}")
        for node in fleet.nodes.values():
            labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
            print(f"  {node.name}  {node.addr:<13} ns {node.ns:<16} {labels}  log {node.agent.log_path}")
        print(f"victims select with  cmdline: '{fleet.victim_regex}'")
        print("reach it from the controller namespace:")
        print(f"  ip netns exec {fleet.ctl_ns} {sys.executable} -m controller.cli agents --nats {NATS_URL}")
        print(f"  ip netns exec {fleet.ctl_ns} {sys.executable} -m controller.cli run FILE --nats {NATS_URL}")
        print("Ctrl-C tears everything down.", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        fleet.down()
        shutil.rmtree(fleet.workdir.parent, ignore_errors=True)
        print("fleet removed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # run from the repository root so `agent`, `controller` and `tests` import
    os.chdir(REPO)
    sys.exit(_dev_main(sys.argv[1:]))
