"""`faultline agents`, `abort` and `halt`: the commands that talk to a running fleet, no experiment file."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import socket
import time
from typing import Any

from controller.console import EXIT_BAD_INPUT, EXIT_OK
from controller.console import err as _err
from controller.console import out as _out
from controller.dispatch import ConnectError, close, connect, with_tls
from controller.fleet import JOURNAL_ISSUES_HELP, Fleet, NodeView, duplicate_line, journal_issue_lines
from controller.halting import halt_and_confirm
from proto.codec import DecodeError, decode
from proto.messages import Lease
from proto.natsurl import DEFAULT_NATS_URL, NatsTarget, NatsUrlError, configured, default_target, redacted
from proto.subjects import ALL_LEASES, safe_token


async def _with_fleet(target: NatsTarget) -> tuple[Any, Fleet]:
    nc = await connect(target.url, tls=target.tls)
    fleet = Fleet(nc)
    await fleet.start()
    return nc, fleet


def _agent_row(view: NodeView, now: float) -> dict[str, Any]:
    hb = view.heartbeat
    return {
        "node": hb.node,
        "version": hb.version,
        "state": hb.state,
        "labels": hb.labels,
        "capabilities": hb.capabilities,
        "capability_notes": hb.capability_notes,
        "faults": [f.model_dump() for f in hb.faults],
        "cpu_percent": hb.load.cpu_percent if hb.load else None,
        "memory_percent": hb.load.memory_percent if hb.load else None,
        "last_seen_s": round(view.age_s(now), 2),
        "instance_id": hb.instance_id,
        # journal entries the agent keeps unreverted; null from agents older than schema 1.3 (unknown)
        "journal_issues": [i.model_dump() for i in hb.journal_issues] if view.reports_journal_issues else None,
        "journal_issues_total": hb.journal_issues_total if view.reports_journal_issues else None,
    }


def _print_table(table: list[list[str]]) -> None:
    """Rows of text cells, the first the header, in columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _fleet_target(args: argparse.Namespace) -> NatsTarget:
    """--nats, FAULTLINE_NATS_URL or the default, with its TLS files; raises NatsUrlError naming
    the setting that is wrong."""
    return with_tls(configured(args.nats) or default_target(), args.tls_ca, args.tls_cert, args.tls_key)


def _refuse(args: argparse.Namespace, stage: str, lines: list[str]) -> int:
    """Nothing was sent: the reason on stderr and, with -o json, an object on stdout (as `run`
    does), so a script always has JSON to read."""
    for line in lines:
        _err(line)
    if getattr(args, "output", None) == "json":
        refusal = {"outcome": "refused", "stage": stage, "error": "\n".join(lines), "sent": False, "exit_code": 2}
        _out(json.dumps(refusal, indent=2))
    return EXIT_BAD_INPUT


def _bad_url(args: argparse.Namespace, exc: NatsUrlError) -> int:
    return _refuse(args, "nats-url", [f"faultline: {exc}"])


def _connect_failed(args: argparse.Namespace, target: NatsTarget, exc: ConnectError) -> int:
    lines = [f"faultline: {exc}"]
    if target.source == "default":
        lines.append(
            f"  no --nats and no FAULTLINE_NATS_URL, so {DEFAULT_NATS_URL} was tried; "
            f"`faultline {args.command}` talks to a fleet's NATS server (see --help)"
        )
    return _refuse(args, "connect", lines)


class LeaseWatch:
    """The leases heard while a listing gathers heartbeats: a controller renews its experiment's
    lease every second at most (``min(1 s, leaseTimeout / 3)``), so one that is still running is
    heard within the gathering window (1.5 s at least); one that is gone is not."""

    def __init__(self) -> None:
        self.heard: dict[str, float] = {}  # experiment id -> monotonic time of its last lease
        self.since = time.monotonic()

    async def on_lease(self, msg: Any) -> None:
        try:
            lease = decode(msg.data, Lease)
        except DecodeError:
            return  # not a lease of ours: nothing said of any experiment
        self.heard[lease.experiment_id] = time.monotonic()

    def listened_s(self, now: float) -> float:
        return now - self.since


async def _gathered(
    args: argparse.Namespace, leases: LeaseWatch | None = None
) -> tuple[NatsTarget, Fleet, dict[str, NodeView]] | int:
    """The fleet's heartbeats, gathered for a listing (and, given ``leases``, the experiments'
    leases heard meanwhile); an exit code when NATS cannot be used."""
    try:
        target = _fleet_target(args)
    except NatsUrlError as exc:
        return _bad_url(args, exc)
    try:
        nc, fleet = await _with_fleet(target)
    except ConnectError as exc:
        return _connect_failed(args, target, exc)
    try:
        if leases is not None:
            await nc.subscribe(ALL_LEASES, cb=leases.on_lease)
            leases.since = time.monotonic()
        views = await fleet.gather()
    finally:
        await fleet.stop()
        await close(nc)
    return target, fleet, views


async def cmd_agents(args: argparse.Namespace) -> int:
    gathered = await _gathered(args)
    if isinstance(gathered, int):
        return gathered
    target, fleet, views = gathered
    url = target.url
    now = time.monotonic()
    rows = [_agent_row(v, now) for _, v in sorted(views.items())]
    for r in rows:
        # two or more agents heartbeating under this one name; empty when it is one agent
        r["duplicate_instances"] = sorted(fleet.duplicate(r["node"]))
    if args.output == "json":
        _out(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _out(f"no agents sent a heartbeat on {redacted(url)} within 5 s")
        return EXIT_OK
    table = [["NODE", "VERSION", "STATE", "LABELS", "FAULT KINDS", "FAULTS", "CPU", "MEM", "LAST SEEN"]]
    for r in rows:
        table.append(
            [
                r["node"],
                r["version"],
                r["state"],
                ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-",
                # the fault kinds; their parts (network.netem ...) are in -o json, and those missing below
                ",".join(c for c in r["capabilities"] if "." not in c) or "-",
                ",".join(f"{f['fault_id']}:{f['state']}" for f in r["faults"]) or "-",
                "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.0f}%",
                "-" if r["memory_percent"] is None else f"{r['memory_percent']:.0f}%",
                f"{r['last_seen_s']:.1f}s ago",
            ]
        )
    _print_table(table)
    lacking = [(r["node"], cap, note) for r in rows for cap, note in sorted(r["capability_notes"].items())]
    if lacking:
        _out("")
        _out("not available (faults that need these are refused before anything is sent):")
        for node, cap, note in lacking:
            _out(f"  {node}: {cap}: {note}")
    twice = [duplicate_line(n, ids) for n in sorted(views) if (ids := fleet.duplicate(n))]
    if twice:
        _out("")
        _out("attention: " + "; ".join(twice))
    holding = [v for _, v in sorted(views.items()) if v.heartbeat.journal_issues_total]
    if holding:
        _out("")
        _out(f"attention: {len(holding)} agent(s) keep journal entries they have not reverted:")
        for v in holding:
            _out(f"  {v.node}:")
            for line in journal_issue_lines(v.heartbeat, indent="    "):
                _out(line)
        _out(f"  ({JOURNAL_ISSUES_HELP})")
    return EXIT_OK


def experiment_rows(views: dict[str, NodeView], now: float, leases: LeaseWatch | None = None) -> list[dict[str, Any]]:
    """The experiments that hold faults on the fleet now, from the agents' heartbeats: one row
    each, with every fault it holds and where (also one whose controller is gone: ``leases``
    tells which controllers were heard renewing their lease meanwhile)."""
    grouped: dict[str, list[tuple[str, Any]]] = {}
    for node, view in sorted(views.items()):
        for f in view.heartbeat.faults:
            grouped.setdefault(f.experiment_id, []).append((node, f))
    rows = []
    for exp_id, held in sorted(grouped.items()):
        states: dict[str, int] = {}
        for _, f in held:
            states[f.state] = states.get(f.state, 0) + 1
        expires_at = max(f.expires_at for _, f in held)
        rows.append(
            {
                "experiment_id": exp_id,
                "nodes": sorted({n for n, _ in held}),
                "kinds": sorted({f.kind for _, f in held}),
                "states": dict(sorted(states.items())),
                # the agents' clocks against ours: approximate, as any wall-clock figure across nodes
                "expires_in_s": round(max(0.0, expires_at - now), 1),
                "faults": [
                    {"node": n, "fault_id": f.fault_id, "kind": f.kind, "state": f.state, "expires_at": f.expires_at}
                    for n, f in held
                ],
            }
        )
        if leases is not None:
            mono = time.monotonic()
            heard = leases.heard.get(exp_id)
            rows[-1]["controller"] = "renewing" if heard is not None else "not heard"
            rows[-1]["lease_heard_s_ago"] = round(mono - heard, 1) if heard is not None else None
            rows[-1]["listened_s"] = round(leases.listened_s(mono), 1)
    return rows


async def cmd_experiments(args: argparse.Namespace) -> int:
    leases = LeaseWatch()
    gathered = await _gathered(args, leases)
    if isinstance(gathered, int):
        return gathered
    target, _, views = gathered
    rows = experiment_rows(views, time.time(), leases)
    if args.output == "json":
        _out(json.dumps(rows, indent=2))
        return EXIT_OK
    if not views:
        _out(f"no agents sent a heartbeat on {redacted(target.url)} within 5 s: no experiment can be seen")
        return EXIT_OK
    if not rows:
        _out(f"no experiment holds faults on the {len(views)} agent(s) that sent a heartbeat")
        return EXIT_OK
    table = [["EXPERIMENT", "CONTROLLER", "NODES", "FAULTS", "STATES", "KINDS", "EXPIRES IN"]]
    for r in rows:
        nodes = r["nodes"]
        table.append(
            [
                r["experiment_id"],
                "renewing" if r["controller"] == "renewing" else f"none ({r['listened_s']:g}s)",
                ",".join(nodes) if len(nodes) <= 3 else f"{','.join(nodes[:3])},... ({len(nodes)})",
                str(len(r["faults"])),
                ",".join(f"{k}={v}" for k, v in r["states"].items()),
                ",".join(r["kinds"]),
                f"~{r['expires_in_s']:.0f}s",
            ]
        )
    _print_table(table)
    _out("")
    if any(r["controller"] != "renewing" for r in rows):
        _out(
            "CONTROLLER none: no lease heard while listening (the time in brackets): its controller is gone or "
            "cut off, and its agents revert on their own once the experiment's lease lapses (its leaseTimeout)"
        )
    _out("abort one: faultline abort EXPERIMENT [--nats URL]    revert everything everywhere: faultline halt")
    return EXIT_OK


def _issuer() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"[:200]
    except (OSError, KeyError):
        return "unknown"


MAX_REASON = 500  # Revert.reason and Halt.reason on the wire


def fitted_reason(text: str, suffix: str = "") -> str:
    """A command's reason as given, made to fit the wire: valid UTF-8 (a terminal may pass any
    bytes), one line, and cut to the field's limit with the suffix kept. An emergency command
    must never fail on its reason."""
    text = " ".join(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").split())
    room = MAX_REASON - len(suffix)
    if len(text) > room:
        text = text[: room - 1] + "…"
    return text + suffix


EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


async def cmd_halt(args: argparse.Namespace) -> int:
    try:
        target = _fleet_target(args)
    except NatsUrlError as exc:
        return _bad_url(args, exc)
    try:
        # as the agents name themselves on NATS (faultline-agent makes --node one subject token:
        # ip-10-0-1-23.ec2.internal heartbeats as ip-10-0-1-23_ec2_internal)
        expect = [safe_token(n) for item in args.expect for n in item.split(",") if n.strip()]
    except ValueError as exc:
        return _refuse(args, "expect", [f"faultline: --expect: {exc}"])
    try:
        nc = await connect(target.url, tls=target.tls)
    except ConnectError as exc:
        return _connect_failed(args, target, exc)
    try:
        return await halt_and_confirm(
            nc,
            redacted(target.url),
            fitted_reason(args.reason),
            _issuer(),
            args.output,
            _out,
            _err,
            expect_nodes=expect,
            expect_agents=args.expect_agents,
        )
    finally:
        await close(nc)
