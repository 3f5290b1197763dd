"""`faultline demo`: a whole experiment on this machine, touching only its own processes.

Local mode (embedded nats-server + local agent), two victim processes whose
command lines carry a random token so no other process on the machine can
match the selectors, and a tiny supervisor that restarts a victim when it
dies. The experiment pauses victim A for a few seconds and SIGKILLs victim B,
watching for its restart. Everything is torn down at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Callable

import psutil

from controller.engine import ExperimentRunner
from controller.experiment import Experiment, parse_experiment
from controller.local import LocalEnvironment
from controller.report import Report, exit_code, render_text, to_json
from proto.faults import signal_name

VICTIM_CODE = "import time\nwhile True:\n    time.sleep(0.2)\n"
RESTART_DELAY_S = 0.3
PAUSE_S = 3.0
EXPERIMENT_S = 5.0

Say = Callable[[str], None]


def victim_label(token: str, which: str) -> str:
    return f"faultline-demo-victim-{token}-{which}"


def demo_experiment(token: str) -> Experiment:
    return parse_experiment(
        {
            "apiVersion": "faultline/v1",
            "kind": "Experiment",
            "metadata": {"name": "demo"},
            "spec": {
                "duration": f"{EXPERIMENT_S:g}s",
                "faults": [
                    {
                        "kind": "process-pause",
                        "name": "pause-victim-a",
                        "match": {"cmdline": victim_label(token, "a") + "$"},
                        "duration": f"{PAUSE_S:g}s",
                    },
                    {
                        "kind": "process-kill",
                        "name": "kill-victim-b",
                        "match": {"cmdline": victim_label(token, "b") + "$"},
                        "signal": "SIGKILL",
                        "count": 1,
                        "watchRestart": True,
                    },
                ],
            },
        }
    )


class Supervisor:
    """Keeps the demo's victims running: restarts one that exits, until stop()."""

    def __init__(self, token: str, say: Say) -> None:
        self.token = token
        self.say = say
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, which: str) -> None:
        self.procs[which] = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-c", VICTIM_CODE, victim_label(self.token, which), stdin=asyncio.subprocess.DEVNULL
        )
        task = asyncio.create_task(self._watch(which), name=f"demo-supervisor-{which}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, which: str) -> None:
        proc = self.procs[which]
        code = await proc.wait()
        if self._stopping:
            return
        why = f"signal {signal_name(-code)}" if code < 0 else f"exit code {code}"
        await asyncio.sleep(RESTART_DELAY_S)  # a real supervisor's back-off; the agent measures it
        if self._stopping:
            return
        await self.start(which)
        self.restarts[which] = self.restarts.get(which, 0) + 1
        self.say(f"  supervisor: victim {which.upper()} died ({why}); restarted as pid {self.procs[which].pid}")

    def status(self, which: str) -> str:
        proc = self.procs.get(which)
        if proc is None or proc.returncode is not None:
            return "gone"
        try:
            return str(psutil.Process(proc.pid).status())
        except psutil.Error:
            return "gone"

    async def stop(self) -> None:
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # SIGKILL also ends a stopped process
        for proc in self.procs.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)


async def _status_lines(sup: Supervisor, say: Say, period_s: float = 1.0) -> None:
    while True:
        await asyncio.sleep(period_s)
        parts = [f"victim {w.upper()} pid {sup.procs[w].pid} {sup.status(w)}" for w in sorted(sup.procs)]
        say("  status: " + "; ".join(parts))


async def run_demo(say: Say, output: str = "text", on_runner: Callable[[ExperimentRunner], None] | None = None) -> int:
    started = time.monotonic()
    token = secrets.token_hex(4)
    say("faultline demo: starting an embedded nats-server and a local agent ...")
    async with LocalEnvironment(heartbeat_interval_s=0.5, say=say) as env:
        assert env.fleet is not None
        say(f"  nats-server at {env.url}; agent node {env.node} is ready ({time.monotonic() - started:.1f}s)")
        for line in env.recovery_lines():
            say(line)
        sup = Supervisor(token, say)
        report: Report | None = None
        local_json = LocalEnvironment.absent_json()
        status: asyncio.Task[None] | None = None
        try:
            await sup.start("a")
            await sup.start("b")
            say(
                f"  victims: A pid {sup.procs['a'].pid}, B pid {sup.procs['b'].pid} "
                f"(command lines end in {victim_label(token, 'a|b')})"
            )
            say(f"experiment: pause victim A for {PAUSE_S:g}s; SIGKILL victim B and watch it restart")
            runner = ExperimentRunner(
                env.nc, env.fleet, demo_experiment(token), nodes_override=[env.node], progress=say
            )
            if on_runner is not None:
                on_runner(runner)
            status = asyncio.create_task(_status_lines(sup, say), name="demo-status")
            report = await runner.run()
            local_json = env.recovery_json()  # the same keys as a local run's -o json
        finally:
            if status is not None:
                status.cancel()
                await asyncio.gather(status, return_exceptions=True)
            after = {w: sup.status(w) for w in sorted(sup.procs)}
            await sup.stop()
    say("  victims after the run: " + ", ".join(f"{w.upper()} {s}" for w, s in after.items()))
    say(
        f"torn down: agent (exit {env.agent_exit_code}), nats-server, victims ({time.monotonic() - started:.1f}s total)"
    )
    assert report is not None
    print(to_json(report, extra=local_json) if output == "json" else render_text(report), flush=True)
    return exit_code(report)
