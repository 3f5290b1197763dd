"""Fault specifications: a discriminated union on ``kind``.

The same models are the experiment file's ``faults`` entries and the ``spec``
of an Inject command on the wire, so a file that validates is exactly what an
agent receives. Python names carry units (``duration_s``); the file and the
wire use the human names (``duration``, ``watchRestart``) through aliases.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from proto.units import Duration, Percent, PositiveDuration, Rate, Size


class SpecModel(BaseModel):
    """Base for user-facing spec models: frozen, strict about unknown keys,
    camelCase in files and on the wire, snake_case in Python."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        str_strip_whitespace=True,
        defer_build=True,  # schemas are built on first use: an idle agent needs few of them
    )


_RT = re.compile(r"^SIGRT(MIN|MAX)(?:([+-])(\d{1,3}))?$")

LINUX_SIGNALS: dict[str, int] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6, "SIGIOT": 6,
    "SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12, "SIGPIPE": 13,
    "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17, "SIGCONT": 18, "SIGSTOP": 19,
    "SIGTSTP": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24, "SIGXFSZ": 25,
    "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPOLL": 29, "SIGPWR": 30, "SIGSYS": 31,
}  # fmt: skip
"""The agents' signal numbers (Linux on x86-64, arm64, riscv), fixed here rather than read from
the host that parses the file: on macOS, where a controller may run, SIGUSR1 is 30, not 10."""
_LINUX_NAMES = {n: name for name, n in reversed(LINUX_SIGNALS.items())}  # 6 -> SIGABRT, 29 -> SIGIO

SIGRTMIN, SIGRTMAX = 34, 64
"""Linux's real-time signals as glibc numbers them (the agent's image is glibc, and so is the
usual node); musl starts at 35."""

SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGCONT = 19, 20, 21, 22, 18


def _realtime(n: int) -> bool:
    """Python's Signals names only the two ends, but every one between is a signal, and
    services use them (systemd does)."""
    return SIGRTMIN <= n <= SIGRTMAX


def signal_number(value: str | int) -> int:
    """SIGKILL, KILL, 9 -> 9; SIGRTMIN+3 -> 37, as Linux numbers them. Raises ValueError naming
    the bad value."""
    if isinstance(value, bool):
        raise ValueError("signal must be a name like SIGTERM or a number")
    if isinstance(value, int):
        if value in _LINUX_NAMES or _realtime(value):
            return value
        raise ValueError(f"unknown signal number {value}: Linux signals are 1..31 and {SIGRTMIN}..{SIGRTMAX}")
    if not isinstance(value, str):
        raise ValueError("signal must be a name like SIGTERM or a number")
    name = value.strip().upper()
    if name.isdigit():
        return signal_number(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    rt = _RT.match(name)
    if rt is not None:
        base = SIGRTMIN if rt.group(1) == "MIN" else SIGRTMAX
        n = base + (int(rt.group(3)) if rt.group(2) == "+" else -int(rt.group(3) or 0))
        if not _realtime(n):
            raise ValueError(f"{value!r} is past the real-time signals (SIGRTMIN..SIGRTMAX, {SIGRTMIN}..{SIGRTMAX})")
        return n
    if name in LINUX_SIGNALS:
        return LINUX_SIGNALS[name]
    raise ValueError(f"unknown signal {value!r}: expected a name like SIGTERM, SIGRTMIN+3 or a number")


def signal_name(n: int) -> str:
    """The Linux name of a signal number, SIGRTMIN+n for real-time ones."""
    if n in _LINUX_NAMES:
        return _LINUX_NAMES[n]
    if n == SIGRTMAX:
        return "SIGRTMAX"
    return f"SIGRTMIN+{n - SIGRTMIN}" if n != SIGRTMIN and _realtime(n) else ("SIGRTMIN" if n == SIGRTMIN else str(n))


class ProcessMatch(SpecModel):
    """Which processes a process fault selects. Every given selector must match (AND)."""

    pid: int | None = Field(None, gt=0, le=4194304, description="exact process id (Linux pid_max is at most 2^22)")
    name: str | None = Field(None, min_length=1, description="exact process name (comm, as ps -o comm shows)")
    cmdline: str | None = Field(
        None, min_length=1, description="regular expression searched in the space-joined command line"
    )
    user: str | None = Field(None, min_length=1, description="owner user name")

    @field_validator("cmdline")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            import regex  # what the agent matches with (agent/faults/process.py); imported when used

            try:
                regex.compile(v)
            except regex.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _at_least_one(self) -> ProcessMatch:
        if self.pid is None and self.name is None and self.cmdline is None and self.user is None:
            raise ValueError("match needs at least one of pid, name, cmdline, user")
        return self


class _FaultBase(SpecModel):
    duration_s: PositiveDuration | None = Field(
        None, alias="duration", description="how long the fault stays; default: the experiment's duration"
    )
    name: str | None = Field(None, max_length=63, description="optional label shown in reports")


class _CountOrPercent(_FaultBase):
    count: int | None = Field(
        None, ge=1, le=1 << 22, description="how many matching processes to hit (at most 4194304, the kernel's pid_max)"
    )
    percent: Percent | None = Field(None, description="share of matching processes to hit (rounded up)")

    @model_validator(mode="after")
    def _not_both(self) -> _CountOrPercent:
        if self.count is not None and self.percent is not None:
            raise ValueError("give count or percent, not both")
        if self.percent is not None and self.percent <= 0:
            raise ValueError("percent must be > 0")
        return self


STOP_SIGNALS = frozenset({SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU})


class ProcessKillSpec(_CountOrPercent):
    """Send a signal to matching processes (default SIGKILL to one of them)."""

    kind: Literal["process-kill"] = "process-kill"
    match: ProcessMatch
    signal: int = Field(9, description="signal name (SIGKILL, TERM) or number; default SIGKILL")
    watch_restart: bool = Field(
        False, description="report whether and when a matching process appears again within the fault window"
    )

    @field_validator("signal", mode="before")
    @classmethod
    def _signal(cls, v: Any) -> int:
        return signal_number(v)

    @field_validator("signal")
    @classmethod
    def _not_stop_or_cont(cls, v: int) -> int:
        if v in STOP_SIGNALS:
            raise ValueError(
                f"{signal_name(v)} stops a process and process-kill never resumes it; use kind: "
                "process-pause (SIGSTOP for the duration, SIGCONT at revert)"
            )
        if v == SIGCONT:
            raise ValueError(
                "SIGCONT would resume processes a process-pause fault holds stopped, ending that fault early "
                "behind its back; a pause ends with its own revert (or `faultline abort`)"
            )
        return v


class ProcessPauseSpec(_CountOrPercent):
    """SIGSTOP matching processes (default: all matches) for the duration; SIGCONT at revert."""

    kind: Literal["process-pause"] = "process-pause"
    match: ProcessMatch


class CpuSpec(_FaultBase):
    """Busy workers, duty-cycled to ``load`` percent of one core each."""

    kind: Literal["cpu"] = "cpu"
    load_percent: Percent = Field(alias="load", description="percent of one core per worker, 1-100")
    workers: int | None = Field(None, ge=1, le=1024, description="default: every core the target may use")
    cores: list[int] | None = Field(None, min_length=1, description="CPU numbers to pin workers to")
    cgroup: str | None = Field(None, description="cgroup path (relative to the cgroup root) to run the stressor in")

    @field_validator("load_percent")
    @classmethod
    def _load_range(cls, v: float) -> float:
        if v < 1:
            raise ValueError("load must be between 1 and 100")
        return v

    @field_validator("cores")
    @classmethod
    def _cores_nonneg(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(c < 0 for c in v):
            raise ValueError("cores must be CPU numbers >= 0")
        return v


class MemorySpec(_FaultBase):
    """A child process that allocates, touches and holds memory."""

    kind: Literal["memory"] = "memory"
    size_bytes: Size | None = Field(None, alias="size", description="bytes or '512Mi'")
    percent: Percent | None = Field(None, description="of node memory, or of the cgroup's limit")
    ramp_s: Duration | None = Field(None, alias="ramp", description="time to reach the size; default at once")
    allow_overcommit: bool = Field(False, description="allow more than available memory minus the agent's reserve")
    cgroup: str | None = Field(None, description="cgroup path (relative to the cgroup root) to run the stressor in")

    @model_validator(mode="after")
    def _exactly_one(self) -> MemorySpec:
        if (self.size_bytes is None) == (self.percent is None):
            raise ValueError("give exactly one of size or percent")
        if self.percent is not None and self.percent <= 0:
            raise ValueError("percent must be > 0")
        return self


class PortMatch(SpecModel):
    port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] | None = Field(None, description="default: both")
    side: Literal["destination", "source"] = Field("destination", description="which port of the packet to match")


T = TypeVar("T")
R = TypeVar("R")


def check_each(values: list[T], check: Callable[[T], R]) -> list[R]:
    """``check`` applied to every value; a ValueError naming every bad one at once, not one per
    edit-and-rerun (experiment files and the agent's settings alike)."""
    out: list[R] = []
    bad: list[str] = []
    for v in values:
        try:
            out.append(check(v))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("; ".join(bad))
    return out


def _check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {value!r}: expected an address or network like 10.0.0.0/8") from None


class NetworkSpec(_FaultBase):
    """tc impairments on an interface, optionally scoped to destinations and ports."""

    kind: Literal["network"] = "network"
    interface: str | None = Field(None, min_length=1, max_length=15, description="default: the default route's")
    delay_s: Duration | None = Field(None, alias="delay")
    jitter_s: Duration | None = Field(None, alias="jitter")
    correlation: Percent | None = None
    distribution: Literal["normal", "pareto", "paretonormal", "uniform"] | None = None
    loss: Percent | None = None
    loss_correlation: Percent | None = None
    corrupt: Percent | None = None
    duplicate: Percent | None = None
    reorder: Percent | None = None
    gap: int | None = Field(None, ge=1)
    rate_bps: Rate | None = Field(None, alias="rate", description="bandwidth, e.g. '8mbit' (bits per second)")
    limit: int | None = Field(
        None, ge=1, le=(1 << 32) - 1, description="queue limit in packets (the kernel's field is 32 bits)"
    )
    destinations: list[str] = Field(default_factory=list, description="CIDRs; default: all traffic")
    ports: list[PortMatch] = Field(default_factory=list)
    direction: Literal["egress", "ingress"] = "egress"
    exempt: list[str] = Field(default_factory=list, description="CIDRs never affected")
    exempt_control_plane: bool = Field(True, description="keep the NATS server's address unaffected")
    force: bool = Field(False, description="replace a root qdisc the agent did not create")
    netns: str | None = Field(None, description="network namespace: name under /run/netns, a path, or a pid")

    @field_validator("destinations", "exempt")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        return check_each(v, _check_cidr)

    @model_validator(mode="after")
    def _some_impairment(self) -> NetworkSpec:
        impairments = (self.delay_s, self.loss, self.corrupt, self.duplicate, self.reorder, self.rate_bps)
        if all(x is None for x in impairments):
            raise ValueError("give at least one of delay, loss, corrupt, duplicate, reorder, rate")
        if self.jitter_s is not None and self.delay_s is None:
            raise ValueError("jitter needs delay")
        if self.reorder is not None and self.delay_s is None:
            raise ValueError("reorder needs delay (netem reorders by sending some packets without the delay)")
        return self

    def needs_netem(self) -> bool:
        return any(x is not None for x in (self.delay_s, self.loss, self.corrupt, self.duplicate, self.reorder))


FaultSpec = Annotated[
    ProcessKillSpec | ProcessPauseSpec | CpuSpec | MemorySpec | NetworkSpec,
    Field(discriminator="kind"),
]

FAULT_KINDS: tuple[str, ...] = ("process-kill", "process-pause", "cpu", "memory", "network")


def required_capabilities(spec: ProcessKillSpec | ProcessPauseSpec | CpuSpec | MemorySpec | NetworkSpec) -> list[str]:
    """Capabilities an agent must list in its heartbeat to accept this spec.

    The controller checks these before dispatch (also under --dry-run); the
    agent checks them again and rejects with the reason it noted at probe time.
    """
    caps: list[str] = [spec.kind]
    if isinstance(spec, NetworkSpec):
        if spec.needs_netem():
            caps.append("network.netem")
        elif spec.rate_bps is not None:
            caps.append("network.tbf")
        caps.append("network.htb")
        if spec.destinations or spec.ports or spec.exempt or spec.exempt_control_plane:
            caps.append("network.u32")
        if spec.direction == "ingress":
            caps.extend(["network.ifb", "network.mirred"])
        if spec.netns is not None:
            caps.append("network.netns")
    if isinstance(spec, CpuSpec | MemorySpec) and spec.cgroup is not None:
        caps.append("cgroup")
    return caps
