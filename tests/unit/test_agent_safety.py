"""Safety details of the agent, in-process with fake fault backends (no NATS, no kernel)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.config import AgentSettings
from agent.faults import network
from agent.faults.base import AgentEnv, Capability, FaultContext, Injector, Plan, Rejected
from agent.faults.process import ProcessPause
from agent.protect import protection_reason
from agent.runtime import AgentRuntime
from proto.codec import decode, encode
from proto.messages import Ack, Halt, Heartbeat, Inject, Measurements, PodRef
from tests.conftest import Victims, async_wait_until, status, wait_until


class FlakyPlan(Plan):
    n: int = 0


class FlakyRevert(Injector):
    """Reverts fail ``failures`` times, then succeed."""

    kind = "process-pause"
    plan_model = FlakyPlan

    def __init__(self, env: Any, failures: int) -> None:
        super().__init__(env)
        self.failures = failures
        self.reverts = 0

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        return FlakyPlan()

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        return Measurements()

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        self.reverts += 1
        if self.reverts <= self.failures:
            raise OSError("netlink busy")
        return Measurements()


def runtime(tmp: Path, injector_factory: Any) -> tuple[AgentRuntime, Any]:
    settings = AgentSettings(state_dir=tmp, identity={"node": "safety"})
    env = AgentEnv(node="safety", state_dir=tmp, instance_id="t", protected_pids=dict)
    inj = injector_factory(env)
    rt = AgentRuntime(settings, injectors={"process-pause": inj})
    rt.capabilities = ["process-pause"]
    return rt, inj


def inject(fid: str = "e.0") -> bytes:
    return encode(
        Inject(
            experiment_id="e",
            fault_id=fid,
            spec={"kind": "process-pause", "match": {"pid": 99999}},
            expires_at=time.time() + 30,
            lease_timeout_s=30,
        )
    )


def pause_of(cmdline: str, fault_id: str) -> Inject:
    return Inject(
        experiment_id="e",
        fault_id=fault_id,
        spec={"kind": "process-pause", "match": {"cmdline": cmdline}},
        expires_at=time.time() + 30,
        lease_timeout_s=30,
    )


async def test_a_failed_revert_is_retried_until_it_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.lifecycle.REVERT_BACKOFF_S", 0.01)
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=2))
    assert decode(await rt.handle_command(inject()), Ack).accepted
    rec = rt.faults["e.0"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    assert inj.reverts == 3 and rec.state == "reverted"
    await async_wait_until(lambda: rt.journal.fault_ids() == [], 3, "the journal entry to be dropped")


async def test_a_revert_that_keeps_failing_keeps_its_journal_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.lifecycle.REVERT_BACKOFF_S", 0.01)
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=99))
    assert decode(await rt.handle_command(inject()), Ack).accepted
    rec = rt.faults["e.0"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    assert rec.state == "failed" and inj.reverts == 3
    assert rt.journal.fault_ids() == ["e.0"], "the next start must retry it"


class Releasing(FlakyRevert):
    """Records release() calls; its plan fails when ``plan_fails``."""

    def __init__(self, env: Any, plan_fails: bool) -> None:
        super().__init__(env, failures=0)
        self.plan_fails = plan_fails
        self.released: list[str] = []

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        if self.plan_fails:
            raise Rejected("no such process")
        return FlakyPlan()

    def release(self, ctx: FaultContext) -> None:
        self.released.append(ctx.fault_id)


@pytest.mark.parametrize("plan_fails", [False, True], ids=["reverted", "failed-before-its-plan"])
async def test_every_end_of_a_fault_releases_what_its_check_set_aside(tmp_path: Path, plan_fails: bool) -> None:
    rt, inj = runtime(tmp_path, lambda env: Releasing(env, plan_fails))
    assert decode(await rt.handle_command(inject()), Ack).accepted
    rec = rt.faults["e.0"]
    if not plan_fails:
        await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
        rec.request_end("test")
    await asyncio.wait_for(rec.finished.wait(), 5)
    assert inj.released == ["e.0"], f"release() calls: {inj.released}"
    assert rec.state == ("failed" if plan_fails else "reverted")
    await rt.flush_cleanup()


async def test_watchdog_wakes_when_a_short_lease_lapses_not_on_its_tick(tmp_path: Path) -> None:
    """The watchdog sleeps up to watchdog_interval_s (here 30 s) while faults are held, and not at
    all while none are; yet a fault accepted with a 0.3 s lease (and never leased) is reverted as
    soon as that lease lapses."""
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "safety"}, timing={"watchdog_interval_s": 30.0})
    env = AgentEnv(node="safety", state_dir=tmp_path, instance_id="t", protected_pids=dict)
    rt = AgentRuntime(settings, injectors={"process-pause": FlakyRevert(env, failures=0)})
    rt.capabilities = ["process-pause"]
    try:
        long = Inject(
            experiment_id="e",
            fault_id="e.long",
            spec={"kind": "process-pause", "match": {"pid": 99999}},
            expires_at=time.time() + 30,
            lease_timeout_s=60,
        )
        assert decode(await rt.handle_command(encode(long)), Ack).accepted
        await asyncio.sleep(0.05)  # the watchdog is now asleep for 30 s: nothing is due sooner
        cmd = Inject(
            experiment_id="e",
            fault_id="e.0",
            spec={"kind": "process-pause", "match": {"pid": 99999}},
            expires_at=time.time() + 30,
            lease_timeout_s=0.3,
        )
        t0 = time.monotonic()
        assert decode(await rt.handle_command(encode(cmd)), Ack).accepted
        rec = rt.faults["e.0"]
        await asyncio.wait_for(rec.finished.wait(), 3.0)
        took = time.monotonic() - t0
        assert rec.end_reason is not None and rec.end_reason.startswith("lease lapsed"), rec.end_reason
        assert took < 0.3 + 0.5, f"lease of 0.3 s lapsed, reverted after {took:.2f}s"
    finally:
        rt.end_all("test over")
        await asyncio.wait_for(asyncio.gather(*(r.finished.wait() for r in list(rt.faults.values()))), 5)
        rt.stop_watchdog()
        await rt.flush_cleanup()


async def test_idle_agent_has_no_watchdog_timer(tmp_path: Path) -> None:
    """Nothing held: no watchdog wake-ups at all (an idle agent runs for months on every node)."""
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "safety"})
    env = AgentEnv(node="safety", state_dir=tmp_path, instance_id="t", protected_pids=dict)
    rt = AgentRuntime(settings, injectors={"process-pause": FlakyRevert(env, failures=0)})
    rt.capabilities = ["process-pause"]
    assert rt._watchdog_timer is None
    cmd = Inject(
        experiment_id="e",
        fault_id="e.0",
        spec={"kind": "process-pause", "match": {"pid": 99999}},
        expires_at=time.time() + 30,
        lease_timeout_s=0.2,
    )
    assert decode(await rt.handle_command(encode(cmd)), Ack).accepted
    assert rt._watchdog_timer is not None, "a held fault arms the watchdog"
    await asyncio.wait_for(rt.faults["e.0"].finished.wait(), 3.0)
    await async_wait_until(lambda: rt._watchdog_timer is None, 3.0, "the watchdog to stop once nothing is held")
    await rt.flush_cleanup()


async def test_process_kill_refuses_stop_signals(tmp_path: Path) -> None:
    """What an older controller (or anyone on the bus) could still send: the agent decodes the spec
    with the same rule `faultline validate` applies, and answers why."""
    settings = AgentSettings(state_dir=tmp_path, identity={"node": "safety"})
    rt = AgentRuntime(settings)
    rt.capabilities = sorted(set(rt.capabilities) | {"process-kill"})
    ok = Inject(
        experiment_id="e", fault_id="e.0", spec={"kind": "process-kill", "match": {"pid": 99999}},
        expires_at=time.time() + 30, lease_timeout_s=30,
    )  # fmt: skip
    for sig, why in [(s, "use kind: process-pause") for s in ("SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU")] + [
        ("SIGCONT", "SIGCONT would resume")
    ]:
        raw = json.loads(encode(ok))
        raw["fault_id"], raw["spec"]["signal"] = f"e.{sig}", sig
        ack = decode(await rt.handle_command(json.dumps(raw).encode()), Ack)
        assert not ack.accepted and why in (ack.reason or ""), ack.reason
        assert f"e.{sig}" not in rt.faults


def test_every_faultline_stressor_is_protected() -> None:
    me = psutil.Process()
    info = {
        "name": "python3",
        "cmdline": ["python3", "-m", "agent.stressor_main", "--marker", "faultline-stressor:cpu:x:y"],
    }
    assert protection_reason(me, info, {}, []) == "a faultline stressor"


@pytest.mark.parametrize(
    "cmdline",
    [
        ["/venv/bin/python3", "/venv/bin/faultline", "run", "x.yaml"],
        ["/usr/local/bin/faultline", "abort", "e1"],
        ["python3", "-m", "controller.cli", "run", "x.yaml"],
        ["python3", "-u", "-X", "dev", "-m", "controller.cli", "agents"],
    ],
)
def test_a_faultline_controller_is_protected(cmdline: list[str]) -> None:
    info = {"name": "python3", "cmdline": cmdline}
    assert protection_reason(psutil.Process(), info, {}, []) == "a faultline controller"


@pytest.mark.parametrize(
    "cmdline",
    [
        ["python3", "-c", "pass", "faultline"],
        ["/srv/faultline-app/bin/worker"],
        ["python3", "worker.py", "controller.cli"],
    ],
)
def test_a_process_merely_named_like_faultline_is_not_taken_for_a_controller(cmdline: list[str]) -> None:
    info = {"name": "python3", "cmdline": cmdline}
    assert protection_reason(psutil.Process(), info, {}, []) is None


async def test_network_revert_waits_for_an_apply_that_timed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "NETLINK_TIMEOUT_S", 0.3)
    inj = network.NetworkFault(AgentEnv(node="n", state_dir=tmp_path, instance_id="t", protected_pids=dict))
    order: list[str] = []
    release = threading.Event()

    def slow_apply() -> None:
        release.wait(2)
        order.append("apply finished")

    def revert() -> None:
        order.append("revert")

    with pytest.raises(Rejected, match="did not answer"):
        await inj._netlink("apply", slow_apply)
    threading.Timer(0.1, release.set).start()  # the stuck apply ends while the revert waits
    await inj._netlink("revert", revert)
    assert order == ["apply finished", "revert"], "the revert ran before the timed-out apply finished"


async def test_a_stop_returns_only_once_the_journal_of_what_it_reverted_is_settled(tmp_path: Path) -> None:
    """The reverted fault's journal entry is dropped by a worker-thread call; the stop cancels its
    tasks at the end, and a cancelled call that has not finished must not be left behind."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    assert decode(await rt.handle_command(inject()), Ack).accepted
    rec = rt.faults["e.0"]
    await async_wait_until(lambda: rec.state == "active", 2, "the fault to become active")
    finished: list[str] = []
    real = rt.journal.finish_many

    def slow_finish_many(batch: Any) -> None:
        time.sleep(0.3)  # a busy disk
        real(batch)
        finished.extend(fid for fid, *_ in batch)

    rt.journal.finish_many = slow_finish_many  # type: ignore[method-assign]
    await asyncio.wait_for(rt.shutdown(), 10)
    assert finished == ["e.0"], "the stop returned before the journal bookkeeping of its revert was done"
    assert not list((tmp_path / "journal").glob("*.json"))


def test_stop_signals_repeated_sigterm_keeps_stopping_a_second_sigint_exits() -> None:
    from agent.main import StopSignals

    stops: list[int] = []
    exits: list[int] = []
    on_signal = StopSignals(lambda: stops.append(1), exits.append)
    on_signal(signal.SIGTERM)
    on_signal(signal.SIGTERM)  # e.g. a parent-death signal from another thread of a dying parent
    assert stops == [1] and exits == []
    on_signal(signal.SIGINT)  # Ctrl-C while stopping
    assert exits == [130]
    first_int = StopSignals(lambda: stops.append(2), exits.append)
    first_int(signal.SIGINT)
    assert stops == [1, 2] and exits == [130]


def test_an_unusable_state_dir_is_refused_at_start_naming_the_setting(tmp_path: Path) -> None:
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [sys.executable, "-m", "agent.main", "--nats", "nats://127.0.0.1:1", "--node", "x"]
    out = subprocess.run([*argv, "--state-dir", str(blocker / "state")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "--state-dir" in out.stderr and "cannot create the journal directory (Not a directory)" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_nats_url_no_nats_server_speaks_is_refused_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "agent.main", "--nats", "http://127.0.0.1:4222", "--node", "x"]
    out = subprocess.run([*argv, "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "invalid settings: nats.urls: scheme http:// is not one NATS speaks" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--deny", "("], "safety.deny: '(' is not a regular expression: missing )"),
        (["--exempt", "10.0.0.0/99"], "safety.exempt: '10.0.0.0/99' is not a CIDR"),
        (["--http-addr", "nonsense"], "http_addr: 'nonsense' is not HOST:PORT"),
        (["--log-level", "LOUD"], "--log-level / FAULTLINE_LOG_LEVEL 'LOUD': one of DEBUG, INFO"),
        (["--heartbeat-interval", "0"], "timing.heartbeat_interval_s: Input should be greater than or equal to 0.05"),
        (["--heartbeat-interval", "90s"], "timing.heartbeat_interval_s: Input should be less than or equal to 60"),
        (["--nats", "nats://u:s3cret@"], "nats.urls: no host in nats://***@"),
        (["--node", ""], "identity.node: name '' has no usable characters"),
        (["--config", "BAD_YAML"], "not valid YAML (line 2)"),
    ],
)
def test_settings_that_would_fail_every_fault_later_are_refused_at_start(
    tmp_path: Path, flags: list[str], why: str
) -> None:
    """Before, a bad --deny or --exempt started a 'ready' agent on which every process or network
    fault then failed; --http-addr and --log-level gave tracebacks; 0 and '' meant the defaults."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    flags = [str(bad) if f == "BAD_YAML" else f for f in flags]
    argv = [sys.executable, "-P", "-m", "agent.main", "--nats", "nats://127.0.0.1:1", "--state-dir", str(tmp_path)]
    out = subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "faultline-agent: invalid settings: " in out.stderr and why in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


async def test_a_stop_during_a_nats_handshake_gives_up_and_closes_the_socket(tmp_path: Path) -> None:
    """A server that accepts and never speaks: the agent's connect is mid-handshake when the stop
    comes. connect() must return False promptly and close what it opened."""
    closed = asyncio.Event()
    accepted = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client closes its end
        closed.set()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = AgentSettings(
            state_dir=tmp_path, identity={"node": "safety"}, nats={"urls": [f"nats://127.0.0.1:{port}"]}
        )
        rt = AgentRuntime(settings, injectors={})
        connecting = asyncio.create_task(rt.connect())
        await asyncio.wait_for(accepted.wait(), 5)
        rt.request_stop()
        assert await asyncio.wait_for(connecting, 3) is False, "connect() did not give up on the stop"
        await asyncio.wait_for(closed.wait(), 3)  # the half-open connection was closed, not left to GC
        assert rt.nc is None
    finally:
        server.close()
        await server.wait_closed()


def test_a_stop_fits_in_stop_timeout_s_with_every_step_at_its_bound(tmp_path: Path) -> None:
    from agent import stopping as stopping_mod

    settings = AgentSettings(state_dir=tmp_path, identity={"node": "safety"})
    rt = AgentRuntime(settings, injectors={})
    drain = settings.nats.drain_timeout_s
    # the steps of shutdown(), each at its bound: unsubscribe, reverts, settle, heartbeat, drain, close, tasks
    worst = 1.0 + rt.revert_budget_at_stop() + stopping_mod.JOURNAL_SETTLE_S + drain + drain + 1.0 + 2.0
    assert worst <= settings.timing.stop_timeout_s, worst
    assert rt.revert_budget_at_stop() >= settings.timing.revert_timeout_s, "a single revert attempt must fit"


async def test_within_bounds_an_await_as_asyncio_timeout_does() -> None:
    from agent.lifecycle import within

    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert await within(value(), 1.0) == 7
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not done within 0.05s"):
        await within(asyncio.sleep(10), 0.05)
    assert time.monotonic() - t0 < 1.0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    async def outer() -> None:  # someone else's cancellation is never turned into a TimeoutError
        await within(asyncio.sleep(10), 5.0)

    task = asyncio.create_task(outer())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def pausing_runtime(tmp: Path) -> tuple[AgentRuntime, ProcessPause]:
    """The real process-pause in a runtime, against victims this test process started: its
    children, which the agent's own protections (its descendants) would skip."""
    rt, inj = runtime(tmp, ProcessPause)
    rt.env.protected_pids = dict
    return rt, inj


async def test_the_journal_keeps_only_what_a_pause_stopped_so_recovery_resumes_no_more(
    tmp_path: Path, victims: Victims
) -> None:
    """Someone else stops a planned target while the plan is journaled (its fsync lies between
    the selection and the SIGSTOPs): the apply skips it, and the journal is narrowed to what was
    stopped. An agent that then dies and restarts resumes its own victim and leaves the other's
    stop alone; before, recovery resumed every planned target."""
    mine, theirs = victims.start(1, "-mine")[0], victims.start(1, "-theirs")[0]
    rt, _ = pausing_runtime(tmp_path)
    first_write = rt.journal.write

    def write_then_someone_stops_theirs(entry: Any, replace_only: bool = False) -> bool:
        written = first_write(entry, replace_only)
        if entry.plan is not None and len(entry.plan["targets"]) == 2:
            os.kill(theirs.pid, signal.SIGSTOP)
            wait_until(lambda: status(theirs) == psutil.STATUS_STOPPED, 3, "the other victim stopped by someone else")
        return written

    rt.journal.write = write_then_someone_stops_theirs  # type: ignore[method-assign]
    try:
        pause = pause_of(f"{victims.token}-(mine|theirs)$", "e.0")
        assert decode(await rt.handle_command(encode(pause)), Ack).accepted
        rec = rt.faults["e.0"]
        await async_wait_until(lambda: rec.state == "active", 5, "the pause to become active")
        assert rec.measurements.hit_pids == [mine.pid]

        def journaled() -> list[int]:
            entry = rt.journal.read("e.0")
            assert entry is not None and entry.plan is not None
            return [t["pid"] for t in entry.plan["targets"]]

        await async_wait_until(lambda: journaled() == [mine.pid], 3, "the journal to be narrowed")

        # the agent dies here (nothing reverted), its keeper with it (as in its container); the
        # next one recovers from the journal
        for t in list(rt.faults.values()):
            if t.timer is not None:
                t.timer.cancel()
        assert rt.keepers is not None
        rt.keepers.kill()
        again, _ = pausing_runtime(tmp_path)
        await again.recover()
        await async_wait_until(lambda: status(mine) != psutil.STATUS_STOPPED, 3, "our victim resumed at start")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert status(theirs) == psutil.STATUS_STOPPED, "recovery resumed a process this agent never stopped"
            await asyncio.sleep(0.02)
        assert again.journal.fault_ids() == [] or again.journal.read("e.0") is None
    finally:
        for task in list(rt.faults.values()):
            if task.task is not None:
                task.task.cancel()
        os.kill(theirs.pid, signal.SIGCONT)
        os.kill(mine.pid, signal.SIGCONT)


async def test_a_pause_that_stopped_every_target_writes_its_journal_once(tmp_path: Path, victims: Victims) -> None:
    (proc,) = victims.start(1, "-all")
    rt, _ = pausing_runtime(tmp_path)
    writes: list[int] = []
    first_write = rt.journal.write

    def counted(entry: Any, replace_only: bool = False) -> bool:
        writes.append(len(entry.plan["targets"]) if entry.plan else 0)
        return first_write(entry, replace_only)

    rt.journal.write = counted  # type: ignore[method-assign]
    pause = pause_of(f"{victims.token}-all$", "e.1")
    assert decode(await rt.handle_command(encode(pause)), Ack).accepted
    rec = rt.faults["e.1"]
    try:
        await async_wait_until(lambda: rec.state == "active", 5, "the pause to become active")
        assert writes == [1], f"journal writes (targets in each): {writes}"
    finally:
        rec.request_end("test")
        await asyncio.wait_for(rec.finished.wait(), 5)
        await rt.flush_cleanup()
    assert status(proc) != psutil.STATUS_STOPPED


@pytest.mark.parametrize(
    ("expires_at", "why"),
    [
        ("Infinity", "expires_at: Input should be a finite number"),
        ("NaN", "expires_at: Input should be a finite number"),
        ("1e300", "days away: a fault lasts at most 366 days"),
    ],
)
async def test_an_inject_with_no_finite_deadline_is_refused_and_nothing_is_held(
    tmp_path: Path, expires_at: str, why: str
) -> None:
    """Before: Infinity was accepted (a fault with no deadline, and heartbeats the controller could
    not decode: "expires_at": null), and NaN left a record with no timer under uvloop."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    raw = json.loads(inject("far.0"))
    text = json.dumps(raw).replace(json.dumps(raw["expires_at"]), expires_at)
    ack = decode(await rt.handle_command(text.encode()), Ack)
    assert not ack.accepted and ack.reason is not None and why in ack.reason, ack.reason
    assert rt.faults == {}
    assert decode(encode(rt.heartbeat()), Heartbeat).faults == []


async def test_heartbeats_go_on_when_the_node_load_or_a_heartbeat_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, one exception in a heartbeat (a /proc read failing with EMFILE) ended the loop for
    good: the agent went on serving commands, silent, and every experiment on the node aborted."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    rt.settings = rt.settings.model_copy(
        update={"timing": rt.settings.timing.model_copy(update={"heartbeat_interval_s": 0.02})}
    )
    sent: list[bytes] = []

    async def publish(subject: str, payload: bytes) -> None:
        sent.append(payload)

    monkeypatch.setattr(rt, "publish", publish)

    def no_proc() -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("agent.nodeload.psutil.cpu_times", no_proc)
    real = rt.heartbeat
    calls = {"n": 0}

    def once_broken(state: Any = "ready") -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bad tick")
        return real(state)

    monkeypatch.setattr(rt, "heartbeat", once_broken)
    loop = asyncio.create_task(rt.heartbeat_loop())
    try:
        await async_wait_until(lambda: len(sent) >= 4, 3, "heartbeats after a failing load read and a failing tick")
    finally:
        loop.cancel()
    assert not loop.done() or loop.cancelled()
    assert decode(sent[-1], Heartbeat).load is None


async def test_an_inject_that_also_reads_as_a_preview_is_refused_not_run_beside_the_others(tmp_path: Path) -> None:
    """A Preview is answered from a task of its own (found by its bytes); an Inject with "type"
    given twice would otherwise have run beside the commands handled in turn."""
    rt, inj = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    raw = inject("dup.0").decode()
    crafted = raw.replace('{"', '{"type":"preview","', 1).encode()
    assert b'"type":"preview"' in crafted
    ack = decode(await rt.handle_command(crafted, preview_only=True), Ack)
    assert not ack.accepted and "also reads as a preview" in (ack.reason or ""), ack.reason
    assert rt.faults == {}


@pytest.mark.parametrize("fid", [".", ".."])
async def test_a_fault_id_that_names_a_directory_is_refused(tmp_path: Path, fid: str) -> None:
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    raw = json.loads(inject("x.0"))
    raw["fault_id"] = fid
    ack = decode(await rt.handle_command(json.dumps(raw).encode()), Ack)
    assert not ack.accepted and "inject.fault_id: '.' and '..' are not fault ids" in (ack.reason or ""), ack.reason


async def test_one_entry_that_cannot_be_finished_leaves_the_rest_of_its_batch_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a ValueError from one entry ended the cleanup task half way, and the other reverted
    faults kept their entries and got no tombstone (the next start reverted them again)."""
    monkeypatch.setattr("agent.lifecycle.TOMBSTONE_PRUNE_EVERY_S", 0.0)
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    for fid in ("a.1", "b.2"):
        assert decode(await rt.handle_command(inject(fid)), Ack).accepted
    recs = list(rt.faults.values())
    await async_wait_until(lambda: all(r.state == "active" for r in recs), 3, "both faults active")
    for r in recs:
        r.request_end("test")
    for r in recs:
        await asyncio.wait_for(r.finished.wait(), 5)
    rt._cleanup.insert(1, ("..", "failed", time.time() + 30, True))  # one entry that cannot be
    past = time.time() - 1
    (rt.journal.dir / "ended").mkdir(exist_ok=True)
    (rt.journal.dir / "ended" / "old.0").write_text(json.dumps({"state": "reverted", "expires_at": past}))
    await rt.flush_cleanup()
    assert rt.journal.fault_ids() == []
    assert sorted(p.name for p in (rt.journal.dir / "ended").iterdir()) == ["a.1", "b.2"], "expired tombstone pruned"


class _Writer:
    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None


class _Transport:
    def __init__(self, peer: Any) -> None:
        self._io_writer = _Writer(peer)


class _Nats:
    """What control_plane() reads of a nats-py client: the server it is on, its pool, its socket."""

    def __init__(self, connected: str | None, pool: list[str], peer: Any) -> None:
        from urllib.parse import urlparse

        self.connected_url = urlparse(connected) if connected else None
        self.servers = [urlparse(u) for u in pool]
        self._transport = _Transport(peer)


def test_the_control_plane_is_every_server_a_reconnect_may_pick(tmp_path: Path) -> None:
    """Before, only the server of the moment was exempt from network faults (and none while
    reconnecting): a failover to another server of the cluster could land behind the fault."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    assert rt.control_plane() == []  # not connected yet: no command can come in
    rt.nc = _Nats(
        "nats://127.0.0.1:4222",
        ["nats://127.0.0.1:4222", "nats://127.0.0.2:4223", "nats://[::1]:4224"],
        ("127.0.0.9", 4222),
    )
    assert rt.control_plane() == [("127.0.0.1", 4222), ("127.0.0.2", 4223), ("127.0.0.9", 4222), ("::1", 4224)]
    rt.nc = _Nats(None, ["nats://127.0.0.2:4223"], None)  # reconnecting: the pool is still known
    assert rt.control_plane() == [("127.0.0.2", 4223)]
    rt.nc = _Nats(None, ["nats://nats.faultline-test.invalid:4222"], None)
    assert rt.control_plane() is None, "connected, yet no address known: must not read as 'none to exempt'"


async def test_a_network_fault_is_refused_while_the_nats_address_is_unknown(tmp_path: Path) -> None:
    env = AgentEnv(node="n", state_dir=tmp_path, instance_id="t", protected_pids=dict, control_plane=lambda: None)
    inj = network.NetworkFault(env)
    inj.probe = lambda: [Capability(f"network{s}", True) for s in ("", ".tbf", ".htb", ".u32", ".netem")]  # type: ignore[method-assign]
    spec = network.NetworkSpec.model_validate({"kind": "network", "rate": "1mbit", "interface": "lo"})
    c = FaultContext(
        fault_id="n.0", experiment_id="n", deadline=time.time() + 30, pods=None, env=env, emit=lambda *a: None
    )
    with pytest.raises(Rejected, match="could cut the agent's control link; not applied"):
        await inj.plan(spec, c)


def test_print_config_shows_the_effective_settings_in_the_shape_config_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings file was documented only as "see agent/config.py" (a source path)."""
    import yaml

    from agent.main import build_parser, load_settings, print_config

    args = build_parser().parse_args(
        ["--nats", "nats://agent:s3cret@nats:4222", "--heartbeat-interval", "500ms", "--state-dir", str(tmp_path)]
    )
    print_config(load_settings(args, {"FAULTLINE_NODE": "node-7"}))
    text = capsys.readouterr().out
    assert "s3cret" not in text
    data = yaml.safe_load(text)
    assert data["timing"]["heartbeat_interval_s"] == 0.5 and data["identity"]["node"] == "node-7"
    assert data["nats"]["urls"] == ["nats://agent:***@nats:4222"]
    # what it prints is a settings file the agent reads back (with the password given again)
    data["nats"]["urls"] = ["nats://agent:s3cret@nats:4222"]
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
    again = load_settings(build_parser().parse_args(["--config", str(tmp_path / "agent.yaml")]), {})
    assert again.timing.heartbeat_interval_s == 0.5 and again.identity.node == "node-7"
    for good, seconds in (("2", 2.0), ("1.5", 1.5), ("250ms", 0.25)):
        assert build_parser().parse_args(["--heartbeat-interval", good]).heartbeat_interval == seconds


async def test_a_timed_out_network_apply_that_gets_the_lock_after_its_revert_installs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threading.Lock does not serve its waiters in order: an apply that timed out, still queued,
    could run after the revert that found nothing to remove (and after the lifecycle's release()),
    and leave the fault installed."""
    inj = network.NetworkFault(AgentEnv(node="n", state_dir=tmp_path, instance_id="t", protected_pids=dict))
    plan = network.NetworkPlan.model_construct(interface="lo", netns=None, direction="egress")
    c = FaultContext(
        fault_id="f.0", experiment_id="f", deadline=time.time() + 30, pods=None, env=inj.env, emit=lambda *a: None
    )
    monkeypatch.setattr(inj, "_revert_sync", lambda plan, fault_id: ([], None))
    inj._may_install.add("f.0")  # what apply() does before its (then timed-out) thread is queued
    await inj.revert(plan, c)  # the revert got the lock first
    inj.release(c)  # as the lifecycle does right after a revert
    with pytest.raises(Rejected, match="its revert began before the apply got its turn; nothing was installed"):
        inj._apply_sync(plan, "f.0")  # the queued apply, when its turn comes
    assert inj._may_install == set()


@pytest.mark.parametrize("forget_first", [False, True], ids=["thread-first", "forget-first"])
async def test_a_network_plan_given_up_by_its_caller_leaves_no_claim_on_the_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_first: bool
) -> None:
    """The lifecycle bounds a plan by revert_timeout_s; when that is shorter than the netlink
    timeout, the plan is cancelled while its thread goes on and claims the interface. Before, the
    claim stayed until a restart: every later fault on that interface was 'conflict: fault X'.
    The lock's waiters are not served in order, so _forget may also run before the plan thread."""
    inj = network.NetworkFault(AgentEnv(node="n", state_dir=tmp_path, instance_id="t", protected_pids=dict))
    inj.probe = lambda: [Capability(f"network{s}", True) for s in ("", ".tbf", ".htb", ".u32")]  # type: ignore[method-assign]
    go, done = threading.Event(), threading.Event()

    def claim(spec: Any, fault_id: str, control_plane: Any) -> Any:
        with inj._lock:
            inj._holders[(1, "eth9")] = fault_id  # what _plan_sync does once the kernel answered
        return None

    def serialized(func: Any, *args: Any) -> Any:
        go.wait(5)  # queued for the netlink lock
        try:
            if forget_first:
                return func(*args)
            with inj._ops:
                return func(*args)
        finally:
            done.set()

    monkeypatch.setattr(inj, "_plan_sync", claim)
    monkeypatch.setattr(inj, "_serialized", serialized)
    spec = network.NetworkSpec.model_validate({"kind": "network", "rate": "1mbit", "exemptControlPlane": False})
    c = FaultContext(
        fault_id="slow.0", experiment_id="s", deadline=time.time() + 30, pods=None, env=inj.env, emit=lambda *a: None
    )
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(inj.plan(spec, c), 0.2)  # the caller gives up first
    if forget_first:
        await asyncio.to_thread(inj._forget, "slow.0")  # served before the plan thread: nothing to drop yet
    go.set()
    assert await asyncio.to_thread(done.wait, 5), "the plan thread never finished"
    await async_wait_until(lambda: inj._holders == {}, 5, "the late claim to be dropped")


def test_a_failed_lookup_of_a_nats_server_is_not_remembered_as_no_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, one DNS hiccup cached [] for that server until the next reconnect: the server a
    failover would pick was then not exempt from network faults."""
    import socket as socket_mod

    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    rt.nc = _Nats("nats://127.0.0.1:4222", ["nats://nats-2.faultline-test:4222"], ("127.0.0.1", 4222))
    answers: list[Any] = [OSError("temporary failure in name resolution"), "10.9.0.2", OSError("down again")]
    real = socket_mod.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "nats-2.faultline-test":
            return real(host, port, *args, **kwargs)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [(2, 1, 6, "", (answer, port))]

    monkeypatch.setattr("agent.runtime.socket.getaddrinfo", getaddrinfo)
    assert rt.control_plane() == [("127.0.0.1", 4222)]  # the hiccup: nats-2 unknown this time
    assert rt.control_plane() == [("10.9.0.2", 4222), ("127.0.0.1", 4222)]  # asked again, not cached as none
    monkeypatch.setattr("agent.runtime.CONTROL_PLANE_TTL_S", 0.0)
    assert rt.control_plane() == [("10.9.0.2", 4222), ("127.0.0.1", 4222)]  # failing again: kept as it was


def test_a_tombstone_is_written_whole_and_a_pruning_pass_never_reads_one_half_written(tmp_path: Path) -> None:
    """Pruning runs while the agent runs now: a tombstone read half written (empty) would be taken
    for expired and deleted, and a replayed command could then re-inject an ended fault."""
    from agent.journal import Journal

    journal = Journal(tmp_path)
    journal.mark_ended("a.1", "reverted", time.time() + 60)
    ended = journal.dir / "ended"
    assert sorted(p.name for p in ended.iterdir()) == ["a.1"], "a temporary file was left"
    (ended / ".b.2.tmp").write_text("")  # one being written right now
    stale = ended / ".c.3.tmp"
    stale.write_text("{")  # left by a crash mid-write, long ago
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert journal.load_ended() == {"a.1": ("reverted", pytest.approx(time.time() + 60, abs=5))}
    assert sorted(p.name for p in ended.iterdir()) == [".b.2.tmp", "a.1"]


async def test_a_stalled_narrowing_write_neither_delays_the_revert_nor_brings_the_entry_back(
    tmp_path: Path, victims: Victims
) -> None:
    """The narrowed plan is written beside the lifecycle: a state directory whose fsync stalls
    must not keep a paused process stopped past its fault's end. A write that comes after the
    fault's end removed the entry writes nothing."""
    mine, theirs = victims.start(1, "-mine")[0], victims.start(1, "-theirs")[0]
    rt, _ = pausing_runtime(tmp_path)
    first_write = rt.journal.write
    stall = threading.Event()

    def write(entry: Any, replace_only: bool = False) -> bool:
        if replace_only:  # the narrowing write: the disk stalls
            stall.wait(10)
            return first_write(entry, replace_only)
        written = first_write(entry, replace_only)
        if entry.plan is not None and len(entry.plan["targets"]) == 2:
            os.kill(theirs.pid, signal.SIGSTOP)  # so that the apply does less than planned
            wait_until(lambda: status(theirs) == psutil.STATUS_STOPPED, 3, "the other victim stopped")
        return written

    rt.journal.write = write  # type: ignore[method-assign]
    pause = pause_of(f"{victims.token}-(mine|theirs)$", "e.2")
    try:
        assert decode(await rt.handle_command(encode(pause)), Ack).accepted
        rec = rt.faults["e.2"]
        await async_wait_until(lambda: rec.state == "active", 5, "the pause to become active")
        rec.request_end("test")
        await asyncio.wait_for(rec.finished.wait(), 5)  # not held up by the stalled write
        assert status(mine) != psutil.STATUS_STOPPED
        stall.set()  # the disk comes back: the entry's removal, queued behind the write, follows it
        await asyncio.wait_for(rt.flush_cleanup(), 5)
        await async_wait_until(lambda: not any(t.get_name() == "narrow:e.2" for t in rt._tasks), 5, "the write")
        assert rt.journal.fault_ids() == [], "a late narrowing write brought the entry back"
    finally:
        stall.set()
        os.kill(theirs.pid, signal.SIGCONT)
        os.kill(mine.pid, signal.SIGCONT)


def stalling_journal(rt: AgentRuntime) -> threading.Event:
    """Every journal write stalls inside the journal's lock, as an fsync on a stalled disk does,
    until the returned event is set (or 20 s pass)."""
    real = rt.journal.write
    back = threading.Event()

    def write(entry: Any, replace_only: bool = False) -> bool:
        with rt.journal._lock:
            back.wait(20)
        return real(entry, replace_only)

    rt.journal.write = write  # type: ignore[method-assign]
    return back


async def test_a_fault_whose_first_journal_write_stalls_ends_on_its_revert_and_applies_nothing(
    tmp_path: Path, victims: Victims
) -> None:
    """Before, a stalled first write held the fault in "injecting" for good: a revert, a halt or
    its deadline only marked it ended, its slot was never freed, and a stop never finished. Now
    the fault ends as soon as it is asked to, nothing applied, and the entry the write leaves
    when the disk comes back is removed after it."""
    (victim,) = victims.start(1, "-stalled")
    rt, _ = pausing_runtime(tmp_path)
    back = stalling_journal(rt)
    pause = pause_of(f"{victims.token}-stalled$", "e.3")
    try:
        assert decode(await rt.handle_command(encode(pause)), Ack).accepted
        rec = rt.faults["e.3"]
        await async_wait_until(lambda: rec.plan is not None, 5, "the pause to be planned")
        # the stall holds the journal's own thread, not the pool that process scans and netlink use
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 2) == "free"
        rec.request_end("revert requested")
        await asyncio.wait_for(rec.finished.wait(), 3)
        assert rec.state == "reverted" and rec.end_reason is not None
        assert rec.end_reason.endswith("before its journal write returned: nothing was applied"), rec.end_reason
        assert "e.3" not in rt.faults
        assert status(victim) != psutil.STATUS_STOPPED
        back.set()  # the disk comes back: the write lands, and the cleanup queued behind it removes it
        await asyncio.wait_for(rt.flush_cleanup(), 5)
        assert rt.journal.fault_ids() == []
    finally:
        back.set()
        os.kill(victim.pid, signal.SIGCONT)


async def test_a_stop_finishes_within_its_bound_while_the_journal_is_stalled(tmp_path: Path, victims: Victims) -> None:
    """A fault waiting on a stalled first write, its end's journal bookkeeping stuck behind it:
    the stop still ends in bounded time."""
    victims.start(1, "-stop")
    rt, _ = pausing_runtime(tmp_path)
    back = stalling_journal(rt)
    pause = pause_of(f"{victims.token}-stop$", "e.4")
    try:
        assert decode(await rt.handle_command(encode(pause)), Ack).accepted
        await async_wait_until(lambda: rt.faults["e.4"].plan is not None, 5, "the pause to be planned")
        started = time.monotonic()
        await asyncio.wait_for(rt.shutdown(), rt.settings.timing.stop_timeout_s)
        assert time.monotonic() - started < rt.settings.timing.stop_timeout_s
        assert rt.faults == {}
    finally:
        back.set()


async def test_a_pod_lookup_that_does_not_return_is_refused_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands are answered one at a time: a pod lookup that never returns (a wedged /proc or
    /sys read, a pool whose threads are all stuck) held up every Revert queued behind it."""
    monkeypatch.setattr("agent.commands.POD_LOOKUP_S", 0.2)
    wedged = threading.Event()
    monkeypatch.setattr("agent.commands.pod_scoped", lambda spec, pods: wedged.wait(10))
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))
    cpu = Inject(
        experiment_id="e",
        fault_id="e.5",
        spec={"kind": "cpu", "load": 10},
        pods=[PodRef(namespace="ns", name="web-0", uid="u-1")],
        expires_at=time.time() + 30,
        lease_timeout_s=30,
    )
    rt.injectors["cpu"] = rt.injectors["process-pause"]
    rt.capabilities = [*rt.capabilities, "cpu"]
    try:
        ack = decode(await asyncio.wait_for(rt.handle_command(encode(cpu)), 2), Ack)
        assert not ack.accepted and ack.reason == "locating the pod took longer than 0.2 s; not applied", ack
        assert "e.5" not in rt.faults
        # Left by the tenth session: each timed-out lookup left its thread stuck in the event
        # loop's shared pool. Now lookups have one thread, and while it is stuck the next
        # lookup is refused at once instead of taking another.
        threads_before = threading.active_count()
        again = cpu.model_copy(update={"fault_id": "e.6", "id": "again"})
        started = time.monotonic()
        ack = decode(await asyncio.wait_for(rt.handle_command(encode(again)), 2), Ack)
        assert not ack.accepted and ack.reason is not None, ack
        assert ack.reason.startswith("an earlier pod lookup has not returned for "), ack.reason
        assert time.monotonic() - started < 0.1
        assert threading.active_count() == threads_before
        assert [t.name for t in threading.enumerate()].count("pod-lookup_0") == 1
    finally:
        wedged.set()
        rt.pod_lookups.close()
    # once the stuck lookup returns, lookups work again
    monkeypatch.setattr("agent.commands.pod_scoped", lambda spec, pods: spec)
    await async_wait_until(lambda: rt.pod_lookups._started_at is None, 5, "the stuck lookup to return")
    assert await rt.pod_lookups.scoped(cpu.spec, cpu.pods) == cpu.spec
    rt.pod_lookups.close()


async def test_a_halt_sent_again_is_carried_out_once(tmp_path: Path) -> None:
    """`faultline halt` sends the same halt again until confirmed: a second delivery must not end
    what was injected since, nor retry kept entries again."""
    rt, _ = runtime(tmp_path, lambda env: FlakyRevert(env, failures=0))

    class Msg:
        data = encode(Halt(reason="test", issued_by="pytest"))

    await rt._on_halt(Msg())  # type: ignore[arg-type]
    await rt._on_halt(Msg())  # type: ignore[arg-type]
    assert rt.halt_seq == 1


def test_the_agent_raises_its_open_files_limit() -> None:
    """Each running stressor holds a leash pipe, and a stop opens a pidfd per stressor."""
    import resource

    from agent.main import FD_LIMIT_WANTED, raise_fd_limit

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
        raise_fd_limit()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
        assert soft == max(256, wanted)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def test_a_process_fault_that_matches_nothing_now_is_refused_in_its_ack(tmp_path: Path, victims: Victims) -> None:
    """A new user's review: a fault whose selector matched nothing was accepted, so the two-phase
    start went ahead and the experiment's other faults were applied (a victim paused) before
    this one failed at its plan and aborted the run. Now the Ack refuses it, with the plan's reason."""
    rt, _ = pausing_runtime(tmp_path)
    (victim,) = victims.start(1, "-present")
    nothing = decode(await rt.handle_command(encode(pause_of(f"{victims.token}-absent$", "e.7"))), Ack)
    assert not nothing.accepted
    assert nothing.reason == f"no process matches {{cmdline='{victims.token}-absent$'}} that may be touched", nothing
    assert "e.7" not in rt.faults
    present = pause_of(f"{victims.token}-present$", "e.8").model_copy(update={"await_start": True})
    assert decode(await rt.handle_command(encode(present)), Ack).accepted
    assert status(victim) != psutil.STATUS_STOPPED  # waiting for its start: nothing applied
    rt.faults["e.8"].request_end("test over")
    await async_wait_until(lambda: "e.8" not in rt.faults, 5, "the waiting fault to end")
