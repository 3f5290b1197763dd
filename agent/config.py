"""Agent settings, grouped by concern. Each field: unit and default in its docstring.

Sources, later wins: defaults, a YAML/JSON config file (--config), FAULTLINE_*
environment variables, command-line flags. See agent/main.py. Durations (the
``*_s`` fields) take seconds or the forms --heartbeat-interval takes: "500ms", "30s", "1m30s".
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from proto.faults import check_each
from proto.natstls import TlsFiles
from proto.natsurl import redacted, split_servers
from proto.subjects import safe_token
from proto.units import parse_duration


def _seconds(value: Any) -> float:
    # a quoted number ("1.5") was taken before durations were: still seconds
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return parse_duration(value)


Seconds = Annotated[float, BeforeValidator(_seconds)]
"""Seconds, also written as the --heartbeat-interval flag takes them: 1.5, "1.5", "500ms", "30s", "1m30s"."""


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/faultline")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "faultline"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentitySettings(_Group):
    node: str = Field(default_factory=socket.gethostname)
    """Node name; made subject-safe. Default: the host name."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels for targeting (zone, region, ...). In a cluster, read from the Node object too."""

    @field_validator("node")
    @classmethod
    def _node_safe(cls, v: str) -> str:
        return safe_token(v)


class NatsSettings(_Group):
    urls: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    """NATS server URLs: nats://, tls:// or HOST:PORT (ws://, wss:// with aiohttp). Default nats://127.0.0.1:4222."""

    @field_validator("urls")
    @classmethod
    def _nats_urls(cls, urls: list[str]) -> list[str]:
        # http://... would fail for ever after a DNS lookup of "http": refuse it at start instead
        return split_servers(",".join(urls))

    connect_timeout_s: Seconds = 2.0
    """Per-attempt connect timeout, seconds. Default 2."""
    reconnect_wait_s: Seconds = 0.5
    """Pause between reconnect attempts, seconds. Default 0.5. The agent reconnects forever."""
    drain_timeout_s: Seconds = 2.0
    """Time allowed to drain at stop, seconds. Default 2."""
    tls_ca: Path | None = None
    """PEM CA bundle that signed the NATS server's certificate. Default: the system's CAs.
    Any TLS setting (or a tls:// URL) makes TLS required: the agent never falls back to plaintext."""
    tls_cert: Path | None = None
    """PEM client certificate, for servers that verify clients (mutual TLS); with tls_key."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""

    def tls(self) -> TlsFiles:
        return TlsFiles(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            ca_from="nats.tls_ca (--tls-ca, FAULTLINE_NATS_TLS_CA)",
            cert_from="nats.tls_cert (--tls-cert, FAULTLINE_NATS_TLS_CERT)",
            key_from="nats.tls_key (--tls-key, FAULTLINE_NATS_TLS_KEY)",
        )


class TimingSettings(_Group):
    heartbeat_interval_s: Seconds = Field(1.0, ge=0.05, le=60, allow_inf_nan=False)
    """Heartbeat period, seconds, 0.05 to 60. Default 1. A little jitter is added."""
    watchdog_interval_s: Seconds = Field(1.0, gt=0)
    """Longest time between two checks of leases, NATS loss and (as a second line) deadlines,
    seconds. Default 1. The watchdog also wakes exactly when a lease could lapse; each
    deadline has its own timer as well."""
    nats_lost_timeout_s: Seconds = Field(10.0, gt=0)
    """Revert everything when NATS has been unreachable this long, seconds. Default 10.
    Each fault's own lease timeout (usually shorter) applies as well."""
    revert_timeout_s: Seconds = Field(10.0, gt=0)
    """Time allowed to revert one fault, seconds. Default 10."""
    stop_timeout_s: Seconds = Field(20.0, gt=0)
    """Bound on graceful stop (revert all, last heartbeat, drain), seconds. Default 20."""


class SafetySettings(_Group):
    deny: list[str] = Field(default_factory=list)
    """Regexes over process name and command line: matches are never touched."""
    protect_pids: list[int] = Field(default_factory=list)
    """Extra pids never touched."""
    exempt: list[str] = Field(default_factory=list)
    """CIDRs that network faults never affect (DNS, API server, SSH). The NATS server always is."""

    @field_validator("deny")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        # a bad pattern would make every process fault fail later: refuse it at start, naming it
        def compiles(p: str) -> str:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a regular expression: {exc}") from None
            return p

        return check_each(patterns, compiles)

    @field_validator("exempt")
    @classmethod
    def _cidrs(cls, cidrs: list[str]) -> list[str]:
        def network(c: str) -> str:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as exc:
                raise ValueError(f"{c!r} is not a CIDR: {exc}") from None
            return c

        return check_each(cidrs, network)

    memory_reserve_percent: float = Field(10.0, ge=0, le=90)
    """Memory faults may not leave less than this share of node memory available. Default 10."""
    max_faults: int = Field(64, ge=1)
    """Most faults held at once; more are rejected. Default 64."""


class AgentSettings(_Group):
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    timing: TimingSettings = Field(default_factory=TimingSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    state_dir: Path = Field(default_factory=default_state_dir)
    """Journal and state. Default /var/lib/faultline as root, else ~/.local/state/faultline."""
    http_addr: str | None = None
    """HOST:PORT for /healthz and /readyz. Default: off."""

    @field_validator("http_addr")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, sep, port = v.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"{v!r} is not HOST:PORT (for example 0.0.0.0:9464)")
        return v

    kubernetes_labels: bool = False
    """Read the node's labels from the Kubernetes API at start (in-cluster service account)."""


class SettingsInvalid(ValueError):
    """Settings the agent cannot run with: one line per problem, naming where the value came from."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file's settings: JSON for *.json, else YAML; ValueError naming the file."""
    text = path.read_text()
    if path.suffix == ".json":
        import json

        try:
            raw = json.loads(text) or {}
        except ValueError as exc:
            raise ValueError(f"--config {path}: not valid JSON: {exc}") from None
    else:
        import yaml  # only for a YAML settings file: an agent without one never loads it

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            why = getattr(exc, "problem", None) or exc
            raise ValueError(f"--config {path}: not valid YAML{where}: {why}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    return raw


def settings_errors(exc: ValidationError, config: Path | None = None, overridden: Collection[str] = ()) -> list[str]:
    """One line per error: the setting's path (nats.urls; --nats and FAULTLINE_NATS_URL set it) and why,
    after "--config FILE: " when the value came from that file rather than a variable or flag."""
    lines = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        path = ".".join(loc)
        why = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            why = f"not a setting ({_known(loc[:-1])})"
        from_file = config is not None and not any(path == o or path.startswith(o + ".") for o in overridden)
        where = f"--config {config}: " if from_file else ""
        lines.append(redacted(f"{where}{path or '(settings)'}: {why}"))
    return lines


def _known(parent: list[str]) -> str:
    """The settings a group takes, for an unknown one: "identity takes: node, labels"."""
    model: Any = AgentSettings
    for key in parent:
        field = getattr(model, "model_fields", {}).get(key)
        model = field.annotation if field is not None else None
    names = list(getattr(model, "model_fields", {}))
    if not names:
        return "nothing can be set here"
    return f"{'.'.join(parent) or 'the top level'} takes: {', '.join(names)}"
