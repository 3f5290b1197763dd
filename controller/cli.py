"""`faultline`: the controller's command line.

Progress goes to stderr, results (reports, tables, JSON) to stdout, so
`-o json` output can be piped. Exit codes: 0 completed, 1 aborted or failed,
2 bad input or could not start (nothing was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from controller import console
from controller.aborting import cmd_abort
from controller.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from controller.console import err as _err
from controller.console import out as _out
from controller.dispatch import ConnectError, close, connect, with_tls
from controller.engine import ExperimentRunner
from controller.experiment import Experiment, ExperimentError, json_schema_text, load_experiment
from controller.fleet import Fleet
from controller.fleet_commands import cmd_agents, cmd_experiments, cmd_halt
from controller.halting import HALT_WAIT_HELP
from controller.local import LocalEnvironment, LocalModeError, local_state_dir
from controller.preview import preview_faults, preview_lines, preview_shortfalls
from controller.report import exit_code, render_text, to_json
from controller.targeting import TargetingError
from controller.tracking import PreflightError
from proto import __version__, natstls
from proto.natsurl import DEFAULT_NATS_URL, NatsUrlError, configured, default_target, redacted

EPILOG = """\
getting started:
  faultline demo                          # a whole experiment on this machine, on its own processes
  faultline validate examples/pause-worker.yaml
  faultline run examples/pause-worker.yaml          # no NATS configured: embedded server + local agent
  faultline schema > experiment.schema.json          # for editors

against a fleet (agents started with `faultline-agent --nats URL --node NAME`):
  faultline agents --nats nats://10.0.0.5:4222
  faultline experiments --nats nats://10.0.0.5:4222                                # what chaos runs now
  faultline run examples/zone-outage.yaml --nats nats://10.0.0.5:4222 --preview    # what it would hit
  faultline run examples/zone-outage.yaml --nats nats://10.0.0.5:4222 -o json > report.json
  faultline abort zone-outage-3fa2c1 --nats nats://10.0.0.5:4222
  faultline halt --nats nats://10.0.0.5:4222 --reason "incident 42"

  faultline agents --nats tls://controller:$PW@nats.example:4222 --tls-ca ca.pem   # TLS, a NATS user

FAULTLINE_NATS_URL stands for --nats: nats://, tls:// or HOST:PORT (ws://, wss:// need aiohttp), or a
comma-separated list of them; FAULTLINE_NATS_TLS_CA/_CERT/_KEY for --tls-ca/--tls-cert/--tls-key. Exit codes of run: 0 completed, 1 aborted or failed, 2 bad
input (the file, the NATS URL, the targets, the fleet's capabilities, a heartbeatTimeout
under two heartbeat intervals of a target; nothing is sent). Ctrl-C during run aborts and
reverts.
"""

RUN_EPILOG = """examples:
  faultline run examples/pause-worker.yaml                  # no NATS configured: embedded server + local agent
  faultline run examples/zone-outage.yaml --local           # a fleet's file, tried on this machine alone
  faultline run exp.yaml --nats nats://10.0.0.5:4222 --preview     # which processes each fault would hit now
  faultline run exp.yaml --nats nats://10.0.0.5:4222 -o json > report.json
  kubectl get cm exp -o jsonpath='{.data.exp\\.yaml}' | faultline run - --nats nats://nats:4222

exit codes: 0 completed, 1 aborted or failed (the report says why), 2 bad input or refused before
anything was sent (with -o json, an object with "outcome": "refused" and the reason).
Ctrl-C once: abort and revert on every target, then the report; twice: the report at once, and
the agents revert what is left when the lease lapses (abort.leaseTimeout, default 5s); three
times: exit at once (130), no report.
"""


# --- validate / schema


_FIELD_ERROR = re.compile(r"^([A-Za-z_][\w.\[\]/-]*): (.+)$")  # label keys may hold '/' (k8s.io/zone)


def cmd_validate(args: argparse.Namespace) -> int:
    code = EXIT_OK
    files: list[dict[str, Any]] = []
    for path in args.files:
        try:
            exp = load_experiment(path)
        except ExperimentError as exc:
            _err(f"{path}: invalid experiment file:\n" + _indent(str(exc)))
            code = EXIT_BAD_INPUT
            errors = []
            for line in str(exc).splitlines():
                m = _FIELD_ERROR.match(line.strip())
                errors.append({"field": m.group(1), "reason": m.group(2)} if m else {"field": None, "reason": line})
            files.append({"path": path, "valid": False, "name": None, "faults": None, "errors": errors})
            continue
        kinds = [f.kind for f in exp.spec.faults]
        files.append({"path": path, "valid": True, "name": exp.metadata.name, "faults": kinds, "errors": []})
        if args.output != "json":
            _out(f"{path}: valid (experiment {exp.metadata.name}: {len(kinds)} fault(s): {', '.join(kinds)})")
    if args.output == "json":
        _out(json.dumps({"valid": code == EXIT_OK, "files": files, "exit_code": code}, indent=2))
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    _out(json_schema_text())
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --- run


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        if args.local and args.nats is not None:
            raise NatsUrlError("--local runs on this machine with an embedded server: give --local or --nats, not both")
        target = None if args.local else configured(args.nats)
        tls = natstls.from_env(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
        if target is not None:
            target = with_tls(target, args.tls_ca, args.tls_cert, args.tls_key)
        elif _tls_flags(args):
            raise NatsUrlError(
                "--tls-ca, --tls-cert and --tls-key are for a NATS server given with --nats or "
                "FAULTLINE_NATS_URL; without one, faultline runs locally with an embedded server on loopback"
            )
    except NatsUrlError as exc:
        return _refused(args, "nats-url", f"faultline: {exc} (nothing sent)")
    try:
        exp = load_experiment(args.file)
    except ExperimentError as exc:
        return _refused(
            args, "experiment-file", f"{args.file}: invalid experiment file (nothing sent):\n" + _indent(str(exc))
        )
    say = (lambda _line: None) if args.quiet else _err
    if target is None and not args.local and (fleet_only := _fleet_targets(exp)):
        return _refused(
            args,
            "local-mode",
            f"faultline: {args.file}: spec.targets names {fleet_only}: this file is for a fleet, but no NATS server "
            "is configured (--nats, FAULTLINE_NATS_URL), so it would run on this machine instead (nothing sent). "
            "Give --nats URL for the fleet, or --local to run it here against this machine's own agent",
        )
    if target is None:
        say(
            "--local: running on this machine with an embedded"
            if args.local
            else "no NATS configured (--nats, FAULTLINE_NATS_URL): running on this machine with an embedded"
        )
        say(f"nats-server and a local agent (its journal: {local_state_dir()}, FAULTLINE_STATE_DIR) ...")
        if tls.given:
            say("note: FAULTLINE_NATS_TLS_* not used: the embedded server listens on loopback only")
        try:
            async with LocalEnvironment(say=_err) as env:
                assert env.fleet is not None
                for line in env.recovery_lines():
                    _err(line)  # also under --quiet: it is about this machine, not progress
                if _fleet_targets(exp) or exp.spec.targets.mode != "all":
                    say(f"note: spec.targets replaced by the local node {env.node} (local mode)")
                return await _run_experiment(
                    args, exp, env.nc, env.fleet, [env.node], say, env.url, local=env.recovery_json
                )
        except LocalModeError as exc:
            return _refused(args, "local-mode", f"faultline: {exc}")
    try:
        nc = await connect(target.url, tls=target.tls)
    except ConnectError as exc:
        return _refused(args, "connect", f"faultline: {exc}")
    fleet = Fleet(nc)
    try:
        await fleet.start()
        await fleet.gather()
        return await _run_experiment(args, exp, nc, fleet, None, say, target.url, tls=_tls_flags(args))
    finally:
        await fleet.stop()
        await close(nc)


async def _run_experiment(
    args: argparse.Namespace,
    exp: Any,
    nc: Any,
    fleet: Fleet,
    override: list[str] | None,
    say: Any,
    url: str,
    local: Callable[[], dict[str, Any]] | None = None,
    tls: str = "",
) -> int:
    """``local``: in local mode, what the local agent found in its journal and how often it was
    started again (into the JSON), asked for when the JSON is written."""
    runner = ExperimentRunner(nc, fleet, exp, nodes_override=override, progress=say)
    try:
        plan = await runner.plan()
    except (TargetingError, PreflightError) as exc:
        return _refused(
            args, "preflight", f"faultline: cannot run {exp.metadata.name} (nothing sent):\n" + _indent(str(exc))
        )
    if args.dry_run or args.preview:
        previews = await preview_faults(nc, fleet, list(exp.spec.faults), plan) if args.preview else None
        short = preview_shortfalls(previews or [])
        data = {
            "outcome": "preview" if args.preview else "dry-run",
            "name": exp.metadata.name,
            "experiment": exp.metadata.name,  # as before "name" was added, for scripts that read it
            "exit_code": EXIT_FAILED if short else EXIT_OK,
            "targets": plan.targets,
            # every key, null when unset: scripts read a stable shape
            "faults": [f.model_dump(mode="json", by_alias=True) for f in exp.spec.faults],
            "pods": {n: [p.model_dump() for p in ps] for n, ps in plan.pods.items()},
            "notes": plan.notes,
            "preview": previews,
        }
        data.update(local() if local else LocalEnvironment.absent_json())
        if args.output == "json":
            _out(json.dumps(data, indent=2))
        else:
            _out(
                f"{'preview' if args.preview else 'dry run'}: {exp.metadata.name} would target {', '.join(plan.targets)}"
            )
            _out(
                "every target is ready and has the capabilities the faults need; "
                + ("each answered a read-only preview, nothing was applied" if args.preview else "nothing was sent")
            )
            for note in plan.notes:
                _out(f"note: {note}")
            for line in preview_lines(previews or []):
                _out(line)
        for line in short:
            _err(f"faultline: {line}")
        return EXIT_FAILED if short else EXIT_OK
    # also under --quiet: the id is what `faultline abort` needs
    _err(
        f"running {runner.experiment_id}; abort it from elsewhere with: {abort_command(runner.experiment_id, url)}{tls}"
    )
    for note in plan.notes:  # before anything is sent, not only in the report
        say(f"note: {note}")
    signals = _signals_abort(runner)
    try:
        # the handlers stay until the report is out: a Ctrl-C just after the run ends is counted,
        # not the default one that kills the process before it writes the report
        with signals:
            report = await runner.run()
            _out(
                to_json(report, extra=local() if local else LocalEnvironment.absent_json())
                if args.output == "json"
                else render_text(report)
            )
    except asyncio.CancelledError:
        if signals.count < 3:
            raise
        # the third signal: out now, without a report, but never as if nothing had been sent
        lease_s = exp.spec.abort.lease_timeout_s
        why = (
            f"interrupted three times: exited without a report; faults not confirmed reverted end when "
            f"their lease lapses (leaseTimeout {lease_s:g}s), see `faultline experiments`"
        )
        _err(f"faultline: {runner.experiment_id}: {why}")
        if args.output == "json":
            gone = {"outcome": "interrupted", "stage": "run", "experiment_id": runner.experiment_id, "error": why}
            sent = bool(runner.tracks)  # a track per fault dispatched
            _out(json.dumps({**gone, "sent": sent, "exit_code": EXIT_INTERRUPTED}, indent=2))
        return EXIT_INTERRUPTED
    return exit_code(report)


def _refused(args: argparse.Namespace, stage: str, text: str) -> int:
    """Bad input, or the run could not start; nothing was sent. The reason goes to stderr and,
    with -o json, an object to stdout too, so a script always has JSON to read."""
    _err(text)
    if args.output == "json":
        refusal = {"outcome": "refused", "stage": stage, "error": text, "sent": False, "exit_code": EXIT_BAD_INPUT}
        _out(json.dumps(refusal, indent=2))
    return EXIT_BAD_INPUT


def _tls_flags(args: argparse.Namespace) -> str:
    """The --tls-* flags given, for the printed abort command (FAULTLINE_NATS_TLS_* carry over by themselves)."""
    given = [(flag, getattr(args, flag.removeprefix("--").replace("-", "_"))) for flag in TLS_FLAGS]
    return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in given if value is not None)


TLS_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def abort_command(experiment_id: str, url: str) -> str:
    """The `faultline abort` line to print: with --nats unless the command alone finds this server."""
    command = f"faultline abort {experiment_id}"
    try:
        implied = configured(None) or default_target()  # what `faultline abort` without --nats would use
    except NatsUrlError:
        implied = default_target()
    if url != implied.url:
        # local mode's embedded server, or an explicit --nats: without it, abort would try another server.
        # Credentials are not printed (terminal scrollback, CI logs): the user fills them in.
        shown = redacted(url)
        return f"{command} --nats {shlex.quote(shown)}" + (" (with its credentials)" if shown != url else "")
    return command


class _signals_abort:
    """First SIGINT/SIGTERM aborts the experiment (which reverts); a second one stops waiting and
    writes the report; a third exits at once."""

    def __init__(self, runner: ExperimentRunner) -> None:
        self.runner = runner
        self.count = 0
        self.task = asyncio.current_task()
        self.after = _AfterTheRun()

    def _on(self, signum: int) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            _err(f"\n{name}: aborting and reverting on every target (again to stop waiting)")
            self.runner.abort(f"interrupted ({name})")
        elif self.count == 2:
            _err(f"{name} again: not waiting any longer; agents revert what is left when the lease lapses")
            self.runner.give_up(f"interrupted twice ({name})")
        elif self.task is not None:  # a third: out now (a report already on its way still comes)
            _err(f"{name} a third time: exiting now")
            self.task.cancel()

    def __enter__(self) -> _signals_abort:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            # the report is out (or the run is over): closing the connections and the local
            # environment follows. A signal then must not meet the default handler, which ends the
            # process by the signal, as if the run had been cut short.
            signal.signal(sig, self.after)


class _AfterTheRun:
    """Signals once the run is over: the first says what is going on, the next exits now (the
    local environment's agent and nats-server end with their parent)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            _err(f"{name}: the run is over; closing its connections (again to exit now)")
            return
        _err(f"{name} again: exiting now")
        for stream in (sys.stdout, sys.stderr):  # the report must not stay in a buffer
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_INTERRUPTED)


async def cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import run_demo

    runner_box: list[ExperimentRunner] = []
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if runner_box and not runner_box[0].aborted:
            runner_box[0].abort(f"interrupted ({signal.Signals(signum).name})")
        elif task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await run_demo(_err, args.output, on_runner=runner_box.append)
    except LocalModeError as exc:
        _err(f"faultline demo: {exc}")
        if args.output == "json":  # a script always has JSON to read
            failed = {"outcome": "failed", "stage": "start", "error": str(exc), "sent": False}
            _out(json.dumps({**failed, "exit_code": EXIT_FAILED}, indent=2))
        return EXIT_FAILED
    finally:
        after = _AfterTheRun()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, after)  # as after a run: never the default handler while it closes


def _fleet_targets(exp: Experiment) -> str:
    """What of spec.targets only a fleet can mean (nodes, labels, pods), for the refusal of a
    local run; empty when the file fits this machine alone."""
    t = exp.spec.targets
    named = []
    if t.nodes:
        named.append(f"nodes {', '.join(t.nodes)}")
    if t.labels:
        named.append("labels " + ", ".join(f"{k}={v}" for k, v in t.labels.items()))
    if t.pods is not None:
        named.append(f"pods in namespace {t.pods.namespace}")
    return "; ".join(named)


# --- parser


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not 1 or more")
    return n


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs: plain lines are wrapped to the terminal's width; indented lines
    (examples, tables) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                joined = " ".join(paragraph)
                out.extend(
                    textwrap.wrap(
                        joined, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
                    )
                )
                paragraph.clear()

        for line in text.splitlines():
            if not line.strip() or line.startswith((" ", "\t")) or line.rstrip().endswith(":"):
                flush()
                out.append(indent + line)
            else:
                paragraph.append(line.strip())
        flush()
        return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="faultline",
        description="faultline: event-driven chaos experiments over NATS, with agents on every node.",
        epilog=EPILOG,
        formatter_class=_Help,
    )
    p.add_argument("--version", action="version", version=f"faultline {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def nats_opt(sp: argparse.ArgumentParser, local: bool) -> None:
        default = "embedded server and local agent" if local else DEFAULT_NATS_URL
        sp.add_argument(
            "--nats",
            metavar="URL",
            help="NATS server URL: nats://, tls:// or HOST:PORT (ws://, wss:// need aiohttp); several comma-separated "
            f"[FAULTLINE_NATS_URL; default: {default}]",
        )
        sp.add_argument(
            "--tls-ca",
            type=Path,
            metavar="FILE",
            help="CA bundle (PEM) that signed the NATS server's certificate; TLS is then required, never "
            "plaintext (a tls:// URL alone uses the system's CAs) [FAULTLINE_NATS_TLS_CA]",
        )
        sp.add_argument(
            "--tls-cert",
            type=Path,
            metavar="FILE",
            help="client certificate (PEM) for a server that verifies clients [FAULTLINE_NATS_TLS_CERT]",
        )
        sp.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM) [FAULTLINE_NATS_TLS_KEY]")

    def output_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", "--output", choices=["text", "json"], default="text", help="result format")

    raw = _Help
    d = sub.add_parser(
        "demo",
        help="run a short experiment on this machine, against its own processes",
        description="Start an embedded nats-server on loopback and a local agent, start a few victim processes "
        "of its own (nothing else on the machine is touched), run a short experiment against them (pause, then "
        "kill with watchRestart) with live progress, print the report and tear everything down. Exit 0 when "
        "it all went as expected.",
        epilog="examples:\n  faultline demo\n  faultline demo -o json | jq .outcome",
        formatter_class=raw,
    )
    output_opt(d)
    r = sub.add_parser(
        "run",
        help="run an experiment file to its end",
        description="Run an experiment file to its end: dispatch every fault to its targets, start them together, "
        "renew the lease, watch the targets' heartbeats (one silent for heartbeatTimeout aborts the run), "
        "revert, and report. Durations take us, ms, s, m, h (30s, 1m30s); sizes 512Mi, 1G; rates 8mbit; "
        "percentages 5%. `faultline schema` has every field.",
        epilog=RUN_EPILOG,
        formatter_class=raw,
    )
    r.add_argument("file", help="experiment file (YAML); - reads it from standard input")
    nats_opt(r, local=True)
    output_opt(r)
    checks = r.add_mutually_exclusive_group()
    checks.add_argument("--dry-run", action="store_true", help="resolve targets and check capabilities; send nothing")
    checks.add_argument(
        "--preview",
        action="store_true",
        help="a dry run that also asks each target what each fault would touch now (read-only: nothing is "
        "applied): the processes a process fault would hit and those it would skip; a network fault's interface, "
        "what it would replace and what stays untouched; a cpu or memory fault's stressors and the memory room. "
        "Exit 1 if a fault would hit nothing or would be refused on a target",
    )
    r.add_argument(
        "--local",
        action="store_true",
        help="run on this machine (embedded nats-server, local agent) even when FAULTLINE_NATS_URL is set or "
        "the file targets nodes, labels or pods: they are replaced by this machine. Without NATS configured, "
        "a file that targets nodes, labels or pods is refused unless --local is given",
    )
    r.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines on stderr (the experiment id line stays)"
    )
    a = sub.add_parser(
        "agents",
        help="list the agents that send heartbeats",
        description="Every agent that sends a heartbeat within about 1.5 heartbeat intervals: node, version, "
        "state, labels, capabilities (and why one is missing), active faults, CPU and memory, last seen; then "
        "node names two agents share and journal entries an agent keeps unreverted.",
        epilog="examples:\n  faultline agents --nats nats://10.0.0.5:4222\n"
        "  faultline agents -o json | jq -r '.[] | select(.faults != []) | .node'   # nodes holding faults",
        formatter_class=raw,
    )
    nats_opt(a, local=False)
    output_opt(a)
    ex = sub.add_parser(
        "experiments",
        help="list the experiments holding faults on the fleet now, from the agents' heartbeats",
        description="Every experiment that holds faults on an agent now, with its nodes, the faults' states and "
        "kinds, and about how long until they expire; and whether its controller is still there: "
        "CONTROLLER renewing (its lease was heard while listening) or none (gone or cut off: its faults stay "
        "until their lease lapses, then the agents revert them on their own). Read from heartbeats and "
        "leases for about 1.5 heartbeat intervals; sends nothing to the agents.",
        epilog="examples:\n  faultline experiments --nats nats://10.0.0.5:4222\n"
        "  faultline experiments -o json | jq -r '.[].experiment_id'\n"
        "  faultline experiments -o json | jq -r '.[] | select(.controller != \"renewing\") | .experiment_id'"
        "   # orphaned",
        formatter_class=raw,
    )
    nats_opt(ex, local=False)
    output_opt(ex)
    ab = sub.add_parser(
        "abort",
        help="abort a running experiment and revert its faults",
        description="Ask the experiment's controller to abort (it reverts on every target and writes its report); "
        "if no controller answers (it died, or runs elsewhere), revert directly on every agent that holds the "
        "experiment's faults. Then it confirms from the agents' heartbeats that none holds the experiment's faults "
        "any more. Exit 0 confirmed, 1 an agent did not answer or still holds faults (each is named), 2 unknown "
        "experiment.",
        epilog="examples:\n  faultline abort kill-workers-3fa2c1 --nats nats://10.0.0.5:4222 --reason 'latency SLO'\n"
        "  faultline experiments --nats nats://10.0.0.5:4222      # the ids of what runs now",
        formatter_class=raw,
    )
    ab.add_argument(
        "experiment_id",
        metavar="EXPERIMENT_ID",
        help="as printed by `faultline run` or listed by `faultline experiments`",
    )
    ab.add_argument(
        "--reason", default="aborted from the command line", help="logged by every agent and in the run's report"
    )
    nats_opt(ab, local=False)
    output_opt(ab)
    h = sub.add_parser(
        "halt",
        help="every agent reverts everything now; waits until each agent seen confirms it holds nothing",
        description=HALT_WAIT_HELP,
        epilog="examples:\n  faultline halt --nats nats://10.0.0.5:4222 --reason 'incident 42'\n"
        "  faultline halt --nats nats://10.0.0.5:4222 --expect-agents 40 -o json   # the DaemonSet's 40 nodes",
        formatter_class=raw,
    )
    h.add_argument("--reason", default="halt from the command line", help="logged by every agent and reported")
    h.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="NODE,...",
        help="nodes that must confirm the halt; one that sends no heartbeat makes it not clear (exit 1). "
        "Repeat or comma-separate",
    )
    h.add_argument(
        "--expect-agents",
        type=_positive_int,
        metavar="N",
        help="at least N agents must confirm (e.g. the DaemonSet's desiredNumberScheduled); fewer seen is not "
        "clear (exit 1)",
    )
    nats_opt(h, local=False)
    output_opt(h)
    v = sub.add_parser(
        "validate",
        help="check experiment files; exit 2 with field paths if one is invalid",
        description="Check experiment files offline (no NATS, nothing sent): every error names the file, the "
        "field path and the reason. Exit 0 when all are valid, 2 when one is not.",
        epilog="examples:\n  faultline validate examples/*.yaml\n  cat exp.yaml | faultline validate -",
        formatter_class=raw,
    )
    v.add_argument(
        "files", nargs="+", metavar="FILE", help="experiment file(s) (YAML), - for standard input; each is reported"
    )
    output_opt(v)
    sub.add_parser(
        "schema",
        help="print the JSON Schema of the experiment file",
        description="Print the JSON Schema of the experiment file, for editors and CI linting.",
        epilog="examples:\n  faultline schema > experiment.schema.json\n"
        "  # VS Code (YAML extension): # yaml-language-server: $schema=./experiment.schema.json",
        formatter_class=raw,
    )
    return p


ASYNC_COMMANDS = {
    "run": cmd_run,
    "agents": cmd_agents,
    "experiments": cmd_experiments,
    "abort": cmd_abort,
    "halt": cmd_halt,
    "demo": cmd_demo,
}
SYNC_COMMANDS = {"validate": cmd_validate, "schema": cmd_schema}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)  # the commands, rather than "the following arguments are required"
        sys.exit(EXIT_BAD_INPUT)
    args = parser.parse_args(argv)
    # from here on, a Ctrl-C before a run's own handling is KeyboardInterrupt, answered below
    # (with JSON under -o json); controller.entry's quiet exit covered the loading until now
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        if args.command in SYNC_COMMANDS:
            code = SYNC_COMMANDS[args.command](args)
        else:
            code = uvloop.run(ASYNC_COMMANDS[args.command](args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # before an experiment started (a run's own Ctrl-C handling takes over then): nothing sent
        code = EXIT_INTERRUPTED
        _err(f"faultline {args.command}: interrupted")
        if getattr(args, "output", None) == "json":  # a script always has JSON to read
            if args.command in ("run", "demo"):
                gone = {
                    "outcome": "interrupted",
                    "stage": "start",
                    "error": "interrupted before the experiment started",
                }
                _out(json.dumps({**gone, "sent": False, "exit_code": code}, indent=2))
            else:
                # abort and halt may have sent their command already: not known here
                sent = None if args.command in ("abort", "halt") else False
                gone = {"outcome": "interrupted", "stage": args.command, "error": "interrupted"}
                _out(json.dumps({**gone, "sent": sent, "exit_code": code}, indent=2))
    # The result is decided and written. The interpreter's finalization puts Python-set handlers
    # back to the default, so a Ctrl-C in it ended the process by the signal (exit -2, seen in
    # 1 of 10 runs of a test); an ignored signal stays ignored there.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if console.output_lost and code == EXIT_OK:
        code = EXIT_FAILED  # the result did not reach its reader
    sys.exit(code)


if __name__ == "__main__":
    main()
