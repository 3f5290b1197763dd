"""NATS server URLs, checked once at the edge, for the CLI and the agent alike; where the
CLI's come from (--nats, FAULTLINE_NATS_URL, the default).

nats-py takes nats://, tls://, ws:// and wss:// URLs (the last two only with
aiohttp installed, which faultline does not need), and a bare HOST or
HOST:PORT (it prefixes nats:// and defaults the port to 4222). Anything else,
http:// say, it quietly turns into a host name ("http") and fails after a DNS
lookup with "Name or service not known". Checking here makes that an
immediate error that names the flag or variable it came from.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proto.natstls import TlsFiles

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
ENV_VAR = "FAULTLINE_NATS_URL"
SCHEMES = ("nats", "tls", "ws", "wss")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class NatsUrlError(ValueError):
    """A NATS URL that cannot work; str() names where it came from and why."""


@dataclass(frozen=True)
class NatsTarget:
    url: str
    """As given (a comma-separated list is kept as one string, for messages)."""
    source: str
    """--nats, FAULTLINE_NATS_URL, or "default"."""
    servers: list[str]
    """The URLs nats-py gets, each with its scheme."""
    tls: TlsFiles = field(default_factory=TlsFiles)
    """The TLS files (--tls-*, FAULTLINE_NATS_TLS_*); TLS is required when any is given or a URL is tls://."""


_USERINFO = re.compile(r"(://|^|,\s*)([^/,\s]+)@")  # to the last '@', as nats-py splits


def redacted(text: str) -> str:
    """URLs for messages: credentials (``user:password@`` or a token) shown as ``***@``."""
    return _USERINFO.sub(lambda m: m.group(1) + "***@", text)


def split_servers(text: str) -> list[str]:
    """Check a URL or comma-separated list (as faultline-agent takes); raises ValueError with the reason."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError("no URL given")
    servers = []
    for part in parts:
        if not part:
            raise ValueError("an empty entry in the comma-separated list")
        servers.append(_check_one(part))
    websocket = [s.startswith(("ws://", "wss://")) for s in servers]
    if any(websocket) and not all(websocket):
        raise ValueError("ws:// and wss:// URLs cannot be mixed with nats:// or tls:// ones")
    return servers


def _check_one(url: str) -> str:
    m = _SCHEME.match(url)
    if m is None:
        if "/" in url:
            raise ValueError(f"{url!r} is neither a URL with a scheme nor HOST[:PORT]")
        url = f"nats://{url}"  # what nats-py does with a bare HOST[:PORT]
    elif m.group(1).lower() not in SCHEMES:
        raise ValueError(
            f"scheme {m.group(1)}:// is not one NATS speaks; use nats://, tls://, ws://, wss:// or HOST:PORT"
        )
    else:
        url = m.group(1).lower() + url[len(m.group(1)) :]  # nats-py matches the scheme case-sensitively
    if url.startswith(("ws://", "wss://")) and importlib.util.find_spec("aiohttp") is None:
        raise ValueError(
            "ws:// and wss:// need the aiohttp package, which faultline does not install; "
            "use nats:// or tls://, or pip install aiohttp"
        )
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname == "none":  # nats-py refuses the host "none" too
        raise ValueError(f"no host in {url}")
    if any(c.isspace() for c in parts.netloc):
        raise ValueError(f"{parts.hostname!r} has white space in it; several servers are comma-separated")
    try:
        parts.port  # noqa: B018 - urlsplit parses the port lazily; this raises on a bad one
    except ValueError:
        port = parts.netloc.rpartition(":")[2]
        raise ValueError(f"port {port!r} is not a number from 1 to 65535") from None
    if parts.port == 0:
        raise ValueError("port 0 is not a port a server listens on")
    return url


def configured(flag: str | None) -> NatsTarget | None:
    """--nats first, then FAULTLINE_NATS_URL; None when neither is set (local mode for `run`).

    An empty FAULTLINE_NATS_URL counts as unset; an empty --nats (`--nats "$UNSET"`) is an error, not
    a silent fall back to the default server or to local mode."""
    if flag is not None:
        text, source = flag, "--nats"
    elif os.environ.get(ENV_VAR):
        text, source = os.environ[ENV_VAR], ENV_VAR
    else:
        return None
    try:
        return NatsTarget(text, source, split_servers(text))
    except ValueError as exc:
        value = redacted(text) if text.strip() else repr(text)
        shown = f"--nats {value}" if source == "--nats" else f"{ENV_VAR}={value}"
        raise NatsUrlError(f"{shown}: not a NATS server URL: {redacted(str(exc))}") from None


def default_target() -> NatsTarget:
    return NatsTarget(DEFAULT_NATS_URL, "default", [DEFAULT_NATS_URL])
