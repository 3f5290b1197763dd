"""faultline-agent: command line, settings sources, signals, event loop.

Sources, later wins: defaults < --config FILE < FAULTLINE_* environment < flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
from pydantic import ValidationError

from agent import lean  # noqa: F401  (first: nats-py and pydantic imported without importlib.metadata)
from agent.config import AgentSettings, SettingsInvalid, read_config_file, settings_errors
from agent.lean import release_startup_memory
from agent.runtime import AgentRuntime
from proto import __version__
from proto.natstls import TlsSettingsError

log = logging.getLogger("faultline.agent")

EPILOG = """\
examples:
  faultline-agent --nats nats://10.0.0.5:4222 --node worker-1 --label zone=a --label region=r1
  FAULTLINE_NATS_URL=nats://nats:4222 FAULTLINE_NODE=$NODE_NAME faultline-agent --http-addr 0.0.0.0:9464
  faultline-agent --nats tls://agent:$PASSWORD@nats.example:4222 --tls-ca /etc/faultline/ca.pem

FAULTLINE_LABELS holds KEY=VALUE pairs separated by commas or spaces:
  FAULTLINE_LABELS=zone=a,region=r1   or   FAULTLINE_LABELS='zone=a region=r1'
Label values cannot contain commas or spaces (as in Kubernetes); --label adds to them.

Durations in a --config file take seconds or a unit: 2, 0.5, 500ms, 30s, 1m30s.

TLS: a tls:// URL or any --tls-* setting makes TLS required; the agent never
falls back to plaintext, also on reconnect (docs/deploy.md, "Securing the
control link").

The agent reverts every fault it holds on SIGTERM, when a fault's deadline
passes, when its experiment's lease lapses, and at start for whatever its
journal (--state-dir) still holds.
"""


LABELS_FORMAT = "KEY=VALUE pairs separated by commas or spaces (zone=a,region=r1 or 'zone=a region=r1')"


def _labels(values: list[str], source: str = "--label") -> dict[str, str]:
    """Labels from --label and FAULTLINE_LABELS: KEY=VALUE pairs separated by commas or whitespace.
    Whitespace separates too because a label value cannot hold it (Kubernetes' rule; the agent reads
    its Node's labels as well): "zone=a region=r1" read as one value, zone="a region=r1", would
    silently match no selector."""
    out: dict[str, str] = {}
    for item in values:
        for part in item.replace(",", " ").split():
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ValueError(f"{source} {item!r}: {part!r} is not KEY=VALUE; expected {LABELS_FORMAT}")
            out[key] = value
    return out


def terminal_columns() -> int:
    """What shutil.get_terminal_size() answers: $COLUMNS, else the terminal's width, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter asks shutil for the terminal width, and shutil imports zlib, bz2 and
    lzma with it: 0.4 MiB of an idle agent that never prints help. os answers the same question."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or terminal_columns() - 2)


def _interval(text: str) -> float:
    from proto.units import parse_duration

    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="faultline-agent",
        description="faultline node agent: injects and reverts faults on this node.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--nats",
        metavar="URL",
        help="NATS server URL(s), comma-separated [FAULTLINE_NATS_URL; default: nats://127.0.0.1:4222]",
    )
    p.add_argument("--node", help="node name [FAULTLINE_NODE; default: host name]")
    p.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle (PEM) of the NATS server's certificate; TLS is then required [FAULTLINE_NATS_TLS_CA]",
    )
    p.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="client certificate (PEM), mutual TLS [FAULTLINE_NATS_TLS_CERT]"
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM) [FAULTLINE_NATS_TLS_KEY]")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label, repeatable; one --label may hold several, separated by commas or spaces "
        "[FAULTLINE_LABELS='zone=a,region=r1']",
    )
    p.add_argument(
        "--state-dir", type=Path, help="journal directory [FAULTLINE_STATE_DIR; default /var/lib/faultline as root]"
    )
    p.add_argument(
        "--heartbeat-interval",
        type=_interval,
        metavar="DURATION",
        help="heartbeat period: 1, 1s, 500ms [default 1s]; a controller's heartbeatTimeout must cover two",
    )
    p.add_argument("--http-addr", metavar="HOST:PORT", help="serve /healthz and /readyz [FAULTLINE_HTTP_ADDR]")
    p.add_argument(
        "--kubernetes-labels",
        action="store_true",
        default=None,
        help="read node labels from the Kubernetes API [FAULTLINE_KUBERNETES_LABELS=1]",
    )
    p.add_argument(
        "--deny", action="append", default=[], metavar="REGEX", help="never touch processes matching this, repeatable"
    )
    p.add_argument(
        "--exempt", action="append", default=[], metavar="CIDR", help="never affect this network, repeatable"
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML or JSON settings file; flags and FAULTLINE_* variables override it. --print-config "
        "shows every setting, so its output is a starting point for one",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings this agent would run with (defaults, file, variables and flags; passwords "
        "masked, users kept) as YAML and exit",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("FAULTLINE_LOG_LEVEL", "INFO"),
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR [FAULTLINE_LOG_LEVEL; default INFO]",
    )
    p.add_argument("--version", action="version", version=f"faultline-agent {__version__}")
    return p


def load_settings(args: argparse.Namespace, environ: dict[str, str]) -> AgentSettings:
    """The settings from --config, FAULTLINE_* variables and flags (later wins); SettingsInvalid
    (or ValueError, OSError) when they cannot be used, naming the file, variable or flag."""
    config: Path | None = args.config
    raw: dict[str, Any] = read_config_file(config) if config else {}
    overridden: set[str] = set()  # paths set by a variable or flag: their errors are not the file's

    def put(path: str, value: Any) -> None:
        *parents, leaf = path.split(".")
        tree = raw
        for depth, key in enumerate(parents):
            tree = tree.setdefault(key, {})
            if not isinstance(tree, dict):  # only a file can put a non-mapping there
                raise SettingsInvalid([f"--config {config}: {'.'.join(parents[: depth + 1])}: expected a mapping"])
        tree[leaf] = value
        overridden.add(path)

    def before(path: str, kind: type[Any]) -> Any:
        """What the file (or a variable) set at path, to add to; empty if nothing."""
        tree: Any = raw
        for key in path.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is not None and not isinstance(tree, kind):
            what = "a list" if kind is list else "a mapping"
            raise SettingsInvalid([f"--config {config}: {path}: expected {what}"])
        return kind(tree or ())

    env_map: dict[str, tuple[str, Callable[[str], Any]]] = {
        "FAULTLINE_NATS_URL": ("nats.urls", lambda v: [u.strip() for u in v.split(",") if u.strip()]),
        "FAULTLINE_NODE": ("identity.node", str),
        "FAULTLINE_NATS_TLS_CA": ("nats.tls_ca", str),
        "FAULTLINE_NATS_TLS_CERT": ("nats.tls_cert", str),
        "FAULTLINE_NATS_TLS_KEY": ("nats.tls_key", str),
        "FAULTLINE_STATE_DIR": ("state_dir", str),
        "FAULTLINE_HTTP_ADDR": ("http_addr", str),
        "FAULTLINE_LABELS": ("identity.labels", lambda v: _labels([v], "FAULTLINE_LABELS")),
        "FAULTLINE_KUBERNETES_LABELS": ("kubernetes_labels", lambda v: v.lower() in ("1", "true", "yes")),
    }
    for var, (path, conv) in env_map.items():
        if environ.get(var):
            put(path, conv(environ[var]))
    if args.nats:
        put("nats.urls", [u.strip() for u in args.nats.split(",") if u.strip()])
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, flag) is not None:
            put(f"nats.{flag}", str(getattr(args, flag)))
    if args.node is not None:  # --node "" is an error, not the host name
        put("identity.node", args.node)
    if args.label:
        put("identity.labels", before("identity.labels", dict) | _labels(args.label))
    if args.state_dir:
        put("state_dir", str(args.state_dir))
    if args.heartbeat_interval is not None:  # 0 is an error, not the default
        put("timing.heartbeat_interval_s", args.heartbeat_interval)
    if args.http_addr is not None:
        put("http_addr", args.http_addr)
    if args.kubernetes_labels:
        put("kubernetes_labels", True)
    if args.deny:
        put("safety.deny", before("safety.deny", list) + args.deny)
    if args.exempt:
        put("safety.exempt", before("safety.exempt", list) + args.exempt)
    try:
        return AgentSettings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsInvalid(settings_errors(exc, config, overridden)) from None


class StopSignals:
    """What SIGTERM and SIGINT do. The first starts the stop (revert everything, bounded by
    timing.stop_timeout_s). A second SIGINT (Ctrl-C twice) exits at once; the journal keeps the
    faults for the next start. A repeated SIGTERM is not a request to hurry: a parent-death
    signal comes once per thread of a dying parent (faultline run's local agent), and cutting
    the revert short would leave faults in place."""

    def __init__(self, request_stop: Callable[[], None], exit_now: Callable[[int], Any] = os._exit) -> None:
        self.request_stop = request_stop
        self.exit_now = exit_now
        self.stopping = False

    def __call__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            log.info("%s: reverting all faults and stopping", name)
            self.request_stop()
        elif signum == signal.SIGINT:
            log.error("second SIGINT: exiting now; faults left to journal recovery")
            self.exit_now(130)
        else:
            log.info("%s again: already stopping", name)


async def serve(settings: AgentSettings, leave: Callable[[int], None] | None = None) -> int:
    runtime = AgentRuntime(settings)
    loop = asyncio.get_running_loop()
    on_signal = StopSignals(runtime.request_stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    extras = await _start_extras(runtime, settings)

    async def trim_when_ready() -> None:
        await runtime.ready_event.wait()
        release_startup_memory()  # once per agent process (not per runtime: simulations run many)

    trim = asyncio.create_task(trim_when_ready(), name="trim-startup-memory")
    code = 1
    try:
        code = await runtime.run()
    except Exception:  # logged, and the exit below still happens: never held by a stuck thread
        log.exception("faultline-agent stopped on an unexpected error")
    finally:
        trim.cancel()
        for closer in extras:
            closer.close()
    if leave is not None:
        leave(code)
    return code


async def _start_extras(runtime: AgentRuntime, settings: AgentSettings) -> list[Any]:
    """Optional parts: the health endpoint and Kubernetes node labels."""
    closers: list[Any] = []
    if settings.kubernetes_labels:
        try:
            from agent import k8s

            # the Node object's own name: identity.node was made subject-safe (dots replaced)
            raw_node = os.environ.get("FAULTLINE_NODE") or socket.gethostname()
            labels = await k8s.fetch_node_labels(raw_node)
            runtime.labels = {**labels, **runtime.labels}
            log.info("node labels from the Kubernetes API: %d", len(labels))
        except Exception as exc:
            log.error("could not read node labels from the Kubernetes API: %s", exc)
    if settings.http_addr:
        from agent import health

        host, port = health.parse_http_addr(settings.http_addr)
        server = await health.start_health_server(host, port, runtime.ready)
        closers.append(server)
    return closers


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")  # as logging takes them


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.log_level.upper() not in LOG_LEVELS:
        print(
            f"faultline-agent: invalid settings: --log-level / FAULTLINE_LOG_LEVEL {args.log_level!r}: "
            f"one of {', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        sys.exit(2)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = load_settings(args, dict(os.environ))
    except SettingsInvalid as exc:
        for line in exc.lines:
            print(f"faultline-agent: invalid settings: {line}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError) as exc:
        print(f"faultline-agent: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        settings.nats.tls().context(settings.nats.urls)  # checked now: a bad file is exit 2, not a retry loop
    except TlsSettingsError as exc:
        print(f"faultline-agent: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.print_config:
        print_config(settings)
        sys.exit(0)
    raise_fd_limit()
    why = state_dir_problem(settings.state_dir)
    if why is not None:
        print(f"faultline-agent: --state-dir / FAULTLINE_STATE_DIR {settings.state_dir}: {why}", file=sys.stderr)
        sys.exit(2)
    code = uvloop.run(serve(settings, leave=_leave))
    sys.exit(code)  # not reached: serve() leaves through _leave


def _leave(code: int) -> None:
    """Exit now, without waiting for worker threads. The agent has stopped: faults reverted (or
    kept in the journal), its last heartbeat sent, NATS drained. A thread still stuck in a
    stalled fsync or a hung lookup would otherwise hold the exit for good (the event loop's
    close and the interpreter's both join every worker thread), and a rollout's SIGTERM would
    end only at the kubelet's SIGKILL."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


FD_LIMIT_WANTED = 65536


def raise_fd_limit() -> None:
    """The soft limit on open descriptors up to the hard one (at most FD_LIMIT_WANTED): each
    running stressor holds a leash pipe, and a stop opens a pidfd per stressor at once, so a
    1000-worker cpu fault needs more than the common soft limit of 1024."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def password_masked(url: str) -> str:
    """A URL for --print-config: its password shown as ``***``, its user kept, since the output is a
    starting point for a settings file. A bare ``TOKEN@`` (nats-py's token auth) is all secret:
    ``***@``. proto.natsurl.redacted masks the user as well, for messages; its callers rely on that."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")  # to the last '@', as nats-py splits
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{f'{user}:***' if colon else '***'}@{host}{slash}{path}"


def print_config(settings: AgentSettings) -> None:
    """The effective settings as YAML, in the shape --config reads (passwords in URLs masked, users kept)."""
    import yaml

    data = settings.model_dump(mode="json")
    data["nats"]["urls"] = [password_masked(u) for u in data["nats"]["urls"]]
    print("# faultline-agent settings: --config reads this shape; flags and FAULTLINE_* variables override it")
    print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")


def state_dir_problem(state_dir: Path) -> str | None:
    """Why the journal cannot live under state_dir (created if missing), or None."""
    try:
        (state_dir / "journal").mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        return f"cannot create the journal directory ({exc.strerror or exc})"
    if not os.access(state_dir / "journal", os.W_OK | os.X_OK):
        return "the journal directory is not writable by this user"
    return None


if __name__ == "__main__":
    main()
