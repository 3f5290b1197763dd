"""Local mode: an embedded nats-server and a local agent on this machine.

Used when no NATS URL is configured (no --nats, no FAULTLINE_NATS_URL) and by
`faultline demo`. The nats-server and the agent are real child processes
that get SIGTERM if this process dies (PR_SET_PDEATHSIG), so a killed CLI
leaves nothing running and the agent reverts its faults on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from controller.dispatch import close, connect
from controller.fleet import JOURNAL_ISSUES_HELP, Fleet, FleetTimeout, journal_issue_lines
from controller.natsserver import NatsServer, NatsServerError
from proto.messages import EndedFault, Heartbeat
from proto.statelock import StateLock
from proto.subjects import safe_token

AGENT_READY_TIMEOUT_S = 20.0
MAX_AGENT_RESTARTS = 3
"""A local agent that keeps dying is not started again after this many restarts in one run."""
AGENT_STOP_TIMEOUT_S = 25.0  # above the agent's own worst-case stop (~22 s): never kill it mid-revert


class LocalModeError(RuntimeError):
    pass


def local_state_dir() -> Path:
    """Journal of the local agent: FAULTLINE_STATE_DIR, else /var/lib/faultline/local as root, else
    ~/.local/state/faultline/local. Fixed, not per run: a crashed run's journal is recovered next time."""
    explicit = os.environ.get("FAULTLINE_STATE_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/faultline/local")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "faultline" / "local"


def local_node_name() -> str:
    return safe_token(socket.gethostname() or "local")


def recovered_faults(hb: Heartbeat) -> list[EndedFault]:
    """The ends the agent's journal recovery reported at start: the faults its heartbeat lists
    as recovered, with their outcome (a recovered fault ended at once, so it is among the ended)."""
    ids = set(hb.recovered)
    return [e for e in hb.ended if e.fault_id in ids]


def recovery_lines(
    recovered: list[EndedFault], state_dir: Path, kept: Heartbeat | None = None, left_by: str = "an earlier run"
) -> list[str]:
    """What to tell the user about what an earlier local run left behind: the faults the agent
    reverted at its start, and (``kept``: its heartbeat) the journal entries it could not revert.
    Nothing left behind, no lines."""
    lines: list[str] = []
    if recovered:
        lines.append(f"the local agent found {len(recovered)} fault(s) {left_by} left in its journal ({state_dir}):")
        for e in recovered:
            lines.append(f"  {e.fault_id} ({e.kind}, experiment {e.experiment_id}): {e.state}: {e.reason}")
    if kept is not None and kept.journal_issues_total:
        lines.append(
            f"the local agent keeps {kept.journal_issues_total} journal entry(ies) unreverted "
            f"({state_dir / 'journal'}):"
        )
        lines += journal_issue_lines(kept)
        lines.append(f"  ({JOURNAL_ISSUES_HELP})")
    elif any(e.state == "failed" for e in recovered):
        lines.append("  a failed revert keeps its journal entry: the agent retries it at its next start")
    if lines:
        lines.append(f"  (the agent's log: {state_dir / 'agent.log'})")
    return lines


def check_state_dir_free(state_dir: Path) -> None:
    """Refuse a second local run on the same state directory while the first one's agent runs:
    its agent would wait for the lock instead of coming up (proto/statelock.py)."""
    lock = StateLock(state_dir)
    try:
        free = lock.try_acquire()
    except OSError as exc:
        raise LocalModeError(f"cannot use the local state directory {state_dir}: {exc}") from None
    lock.release()
    if not free:
        raise LocalModeError(
            f"another local faultline run is using {state_dir} (its agent, {lock.holder()}); "
            "wait for it to end, or give this run its own directory with FAULTLINE_STATE_DIR"
        )


def _pdeathsig_term() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so the agent reverts and exits."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def local_agent_env() -> dict[str, str]:
    """The local agent's environment: this one without FAULTLINE_* settings. They are the
    fleet's (`run --local` is for a shell where FAULTLINE_NATS_URL is set), and the local agent
    gets all it needs as flags: a fleet's FAULTLINE_NATS_TLS_* made it demand TLS from the
    embedded plaintext server and never become ready."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")}


class LocalEnvironment:
    """``async with LocalEnvironment() as env``: env.url, env.nc, env.fleet, env.node."""

    def __init__(
        self,
        *,
        node: str | None = None,
        heartbeat_interval_s: float = 1.0,
        state_dir: Path | None = None,
        labels: dict[str, str] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        """``say``: where to tell the user that the local agent died and was restarted."""
        self.node = node or local_node_name()
        self.say = say or (lambda _line: None)
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.agent_restarts = 0
        self.heartbeat_interval_s = heartbeat_interval_s
        self.state_dir = state_dir or local_state_dir()
        self.labels = labels or {}
        self.server = NatsServer(pdeathsig=True)
        self.url = ""
        self.nc: Any = None
        self.fleet: Fleet | None = None
        self.agent: asyncio.subprocess.Process | None = None
        self.agent_exit_code: int | None = None
        self.recovered: list[EndedFault] = []
        """Faults an earlier run left in the local journal, which the agent reverted as it started."""
        self.ready_heartbeat: Heartbeat | None = None
        """The agent's first heartbeat once ready: its journal issues, among others."""

    @property
    def agent_log(self) -> Path:
        return self.state_dir / "agent.log"

    def recovery_lines(self, left_by: str = "an earlier run") -> list[str]:
        return recovery_lines(self.recovered, self.state_dir, self.ready_heartbeat, left_by)

    @staticmethod
    def absent_json() -> dict[str, Any]:
        """The same keys, null, for a run against a fleet: -o json keeps one shape."""
        return dict.fromkeys(
            ("local_recovery", "local_journal_issues", "local_journal_issues_total", "local_agent_restarts")
        )

    def recovery_json(self) -> dict[str, Any]:
        """The same for -o json, as the agent reported once ready: ``local_recovery`` (faults
        reverted at its start), ``local_journal_issues`` and ``_total`` (entries it keeps unreverted)."""
        hb = self.ready_heartbeat
        return {
            "local_recovery": [e.model_dump(mode="json") for e in self.recovered],
            "local_journal_issues": [i.model_dump() for i in hb.journal_issues] if hb else [],
            "local_journal_issues_total": hb.journal_issues_total if hb else 0,
            "local_agent_restarts": self.agent_restarts,
        }

    def agent_log_tail(self, size: int = 1500) -> str:
        try:
            return self.agent_log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    async def __aenter__(self) -> LocalEnvironment:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalModeError(
                f"cannot use the local state directory {self.state_dir}: {exc.strerror or exc} "
                "(FAULTLINE_STATE_DIR chooses another)"
            ) from None
        check_state_dir_free(self.state_dir)  # before anything starts
        try:
            self.url = await asyncio.to_thread(self.server.start)
        except NatsServerError as exc:
            raise LocalModeError(f"cannot start the embedded nats-server: {exc}") from None
        self.nc = await connect(self.url, name="faultline-local")
        self.fleet = Fleet(self.nc)
        await self.fleet.start()
        await self._spawn_agent()
        await self._wait_ready()
        self._supervisor = asyncio.create_task(self._supervise(), name="local-agent-supervisor")

    async def _spawn_agent(self) -> None:
        argv = [
            sys.executable,
            "-P",  # no working directory on sys.path: the user's ./proto or ./agent must not shadow ours
            "-m",
            "agent.main",
            "--nats",
            self.url,
            "--node",
            self.node,
            "--state-dir",
            str(self.state_dir),
            "--heartbeat-interval",
            str(self.heartbeat_interval_s),
        ]
        for k, v in sorted(self.labels.items()):
            argv += ["--label", f"{k}={v}"]
        log = await asyncio.to_thread(open, self.agent_log, "ab")
        with log:
            # Own session: Ctrl-C in the terminal reaches the CLI, which reverts and then stops the agent.
            self.agent = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_pdeathsig_term,
                start_new_session=True,
                env=local_agent_env(),
            )

    async def _supervise(self) -> None:
        """Start the local agent again when it exits on its own (a crash, kill -9, the OOM killer),
        as the kubelet restarts a DaemonSet's agent: its start reverts what its journal holds, so
        nothing it had paused stays paused until some later run. The experiment sees the agent
        restart and aborts."""
        while True:
            assert self.agent is not None
            code = await self.agent.wait()
            if self._stopping:
                return
            if self.agent_restarts >= MAX_AGENT_RESTARTS:
                self.say(
                    f"local agent exited (code {code}) after {self.agent_restarts} restart(s); not restarting it "
                    f"again. What it held stays until the next local run; its log: {self.agent_log}"
                )
                return
            self.agent_restarts += 1
            self.say(
                f"local agent exited unexpectedly (code {code}); starting it again: "
                "its start reverts what its journal holds"
            )
            before = self.ready_heartbeat.instance_id if self.ready_heartbeat is not None else None
            try:
                await self._spawn_agent()
                await self._wait_ready(replacing=before)
            except LocalModeError as exc:
                self.say(f"local agent did not come back: {exc}")
                continue  # its wait() returns at once: counted, bounded
            except Exception as exc:  # noqa: BLE001 - say why supervision ends, never end it silently
                self.say(f"local agent could not be started again ({exc}); what it held stays until the next local run")
                return
            for line in self.recovery_lines(left_by="the agent that died"):
                self.say(line)

    async def _wait_ready(self, replacing: str | None = None) -> None:
        """Until the agent reports ready; ``replacing``: the instance id of the agent it restarts,
        whose last heartbeat does not count."""
        assert self.fleet is not None and self.agent is not None
        fleet, node = self.fleet, self.node

        async def new_ready() -> None:
            def fresh() -> bool:
                v = fleet.get(node)
                return v is not None and v.heartbeat.state == "ready" and v.heartbeat.instance_id != replacing

            if not await fleet.wait_until(fresh, AGENT_READY_TIMEOUT_S):
                raise FleetTimeout(f"after {AGENT_READY_TIMEOUT_S:g}s: no heartbeat from its new instance")

        waiting = new_ready() if replacing is not None else fleet.wait_for([node], AGENT_READY_TIMEOUT_S)
        ready = asyncio.ensure_future(waiting)
        exited = asyncio.ensure_future(self.agent.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # a stop during a restart: leave no waiter behind
            ready.cancel()
            raise
        finally:
            exited.cancel()
        if ready.done():
            try:
                ready.result()
                view = self.fleet.get(self.node)
                if view is not None:
                    self.ready_heartbeat = view.heartbeat
                    self.recovered = recovered_faults(view.heartbeat)
                return
            except FleetTimeout as exc:
                raise LocalModeError(f"local agent did not become ready: {exc}\n{self.agent_log_tail()}") from None
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        raise LocalModeError(
            f"local agent exited with code {self.agent.returncode} before it was ready "
            f"(log: {self.agent_log}):\n{self.agent_log_tail()}"
        )

    async def stop(self) -> None:
        """SIGTERM the agent (it reverts everything), wait, then stop NATS. Bounded at every step."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self.agent is not None and self.agent.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent_exit_code = await asyncio.wait_for(self.agent.wait(), AGENT_STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.agent.kill()
                self.agent_exit_code = await asyncio.wait_for(self.agent.wait(), 5.0)
        elif self.agent is not None:
            self.agent_exit_code = self.agent.returncode
        if self.fleet is not None:
            await self.fleet.stop()
        if self.nc is not None:
            await close(self.nc)
            self.nc = None
        await asyncio.to_thread(self.server.stop)
