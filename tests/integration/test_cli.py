"""`faultline` end to end: real CLI processes, a real nats-server, real agents and victims."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from controller.natsserver import WORKDIR_PREFIX, sweep_stale_workdirs
from tests.conftest import REPO, AgentProcess, Victims, status, wait_until

pytestmark = pytest.mark.integration
EXAMPLES = REPO / "examples"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_")}
    env.update(extra)
    return env


def faultline(
    *args: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=env or cli_env(),
        stdin=subprocess.DEVNULL,
    )


class Running:
    """A `faultline` process in the background; stderr to a file so progress can be read while it runs."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.err_path = tmp / f"cli-{time.monotonic_ns()}.err"
        self.out_path = self.err_path.with_suffix(".out")
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env or cli_env(),
            )

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"faultline did not exit within {timeout_s}s:\n{self.stderr()}") from None

    def experiment_id(self) -> str:
        def find() -> str | None:
            for line in self.stderr().splitlines():
                if line.startswith("running "):
                    return line.split()[1].rstrip(";")
            if self.proc.poll() is not None:
                raise AssertionError(f"faultline exited {self.proc.returncode}:\n{self.stderr()}")
            return None

        found: str = wait_until(find, 20, "faultline run to print its experiment id")
        return found

    def abort_hint(self) -> str:
        """The command after "abort it from elsewhere with: ", as printed."""

        def find() -> str | None:
            for line in self.stderr().splitlines():
                if "abort it from elsewhere with: " in line:
                    return line.split("abort it from elsewhere with: ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise AssertionError(f"faultline exited {self.proc.returncode}:\n{self.stderr()}")
            return None

        found: str = wait_until(find, 20, "faultline run to print how to abort it")
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    procs: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        r = Running(list(args), tmp_path, env)
        procs.append(r)
        return r

    yield start
    for r in procs:
        r.kill()


def experiment_file(tmp_path: Path, faults: list[dict[str, Any]], **spec: Any) -> Path:
    doc = {
        "apiVersion": "faultline/v1",
        "kind": "Experiment",
        "metadata": {"name": "cli-test"},
        "spec": {"duration": "3s", "faults": faults, **spec},
    }
    path = tmp_path / f"exp-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def pause(victims: Victims, tag: str = "") -> dict[str, Any]:
    return {"kind": "process-pause", "match": {"cmdline": f"{victims.token}{tag}$"}}


# --- no NATS needed ---------------------------------------------------------------


def test_help_teaches_with_examples() -> None:
    r = faultline("--help")
    assert r.returncode == 0
    assert "faultline demo" in r.stdout and "faultline run" in r.stdout and "Exit codes" in r.stdout


@pytest.mark.parametrize("command", ["run", "agents", "experiments", "abort", "halt", "validate", "schema", "demo"])
def test_every_command_s_help_says_what_it_does_and_shows_examples(command: str) -> None:
    r = faultline(command, "--help")
    assert r.returncode == 0, r.stderr
    usage, _, rest = r.stdout.partition("\n\n")
    assert rest.strip() and not rest.lstrip().startswith(("positional arguments", "options")), r.stdout
    assert "examples:" in r.stdout, r.stdout
    assert "%%" not in r.stdout, r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 120, r.stdout  # wrapped, examples aside
    assert "help message and exit" in r.stdout and "--reason" not in r.stdout or "logged by" in r.stdout


def test_validate_ok_and_invalid(tmp_path: Path) -> None:
    ok = faultline("validate", str(EXAMPLES / "pause-worker.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: faultline/v1\nkind: Experiment\nmetadata: {name: x}\nspec:\n  duration: 5s\n"
                   "  faults:\n    - kind: cpu\n      load: 0.5\n")  # fmt: skip
    r = faultline("validate", str(bad))
    assert r.returncode == 2
    assert "spec.faults[0].load: must be between 1 and 100" in r.stderr


def test_validate_reports_every_file_and_fails_if_one_is_invalid(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: faultline/v1\nkind: Experiment\nmetadata: {name: x}\nspec: {duration: 1s}\n")
    good = [str(p) for p in sorted(EXAMPLES.glob("*.yaml"))]
    r = faultline("validate", *good, str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    assert all(f"{g}: valid" in r.stdout for g in good), r.stdout
    assert f"{bad}: invalid experiment file" in r.stderr and "spec.faults" in r.stderr
    # -o json: every file, with each error's field path and reason (a new user's review: it had none)
    j = faultline("validate", *good, str(bad), "-o", "json")
    assert j.returncode == 2, j.stderr
    result = json.loads(j.stdout)
    assert result["valid"] is False and result["exit_code"] == 2
    by_path = {f["path"]: f for f in result["files"]}
    assert all(by_path[g]["valid"] and by_path[g]["errors"] == [] and by_path[g]["faults"] for g in good), result
    assert by_path[str(bad)]["valid"] is False and by_path[str(bad)]["errors"][0]["field"] == "spec.faults", result
    slashed = tmp_path / "slashed.yaml"  # a label key with '/' is still a field path (a review)
    slashed.write_text(
        "apiVersion: faultline/v1\nkind: Experiment\nmetadata: {name: x}\nspec:\n  duration: 5s\n"
        "  targets: {labels: {k8s.io/zone: [a]}}\n  faults: [{kind: process-pause, match: {pid: 2}}]\n"
    )
    (error,) = json.loads(faultline("validate", str(slashed), "-o", "json").stdout)["files"][0]["errors"]
    assert error["field"] == "spec.targets.labels.k8s.io/zone", error


def test_unreachable_nats_is_named_with_a_reason() -> None:
    r = faultline("agents", "--nats", "nats://127.0.0.1:1", timeout_s=30)
    assert r.returncode == 2
    assert re.search(r"cannot connect to NATS at nats://127\.0\.0\.1:1: \S", r.stderr), r.stderr
    assert "no --nats" not in r.stderr  # the URL was given: no hint about defaults
    r = faultline("agents", "--nats", "nats://ops:hunter2@127.0.0.1:1", timeout_s=30)
    assert r.returncode == 2 and "nats://***@127.0.0.1:1" in r.stderr and "hunter2" not in r.stderr, r.stderr
    # with -o json a script gets JSON to read, as from `run`
    for command, url, stage in (("agents", "nats://127.0.0.1:1", "connect"), ("halt", "http://x:1", "nats-url")):
        r = faultline(command, "--nats", url, "-o", "json", timeout_s=30)
        assert r.returncode == 2, r.stderr
        refusal = json.loads(r.stdout)
        assert (refusal["outcome"], refusal["stage"], refusal["sent"]) == ("refused", stage, False), refusal


@pytest.mark.parametrize("command", [["agents"], ["halt"], ["abort", "some-exp-123456"], ["run", "EXAMPLE"]])
def test_wrong_nats_scheme_is_refused_at_once_naming_the_flag(command: list[str]) -> None:
    argv = [str(EXAMPLES / "pause-worker.yaml") if a == "EXAMPLE" else a for a in command]
    r = faultline(*argv, "--nats", "http://127.0.0.1:4222", timeout_s=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "faultline: --nats http://127.0.0.1:4222: not a NATS server URL: scheme http:// is not one NATS speaks" in (
        r.stderr
    ), r.stderr
    # checked up front: no connection was tried (that would fail after a DNS lookup of "http")
    assert "Name or service not known" not in r.stderr and "cannot connect" not in r.stderr


def test_wrong_nats_url_from_the_environment_names_the_variable() -> None:
    r = faultline("agents", env=cli_env(FAULTLINE_NATS_URL="nats://127.0.0.1:notaport"), timeout_s=30)
    assert r.returncode == 2
    assert "faultline: FAULTLINE_NATS_URL=nats://127.0.0.1:notaport: not a NATS server URL: port 'notaport'" in (
        r.stderr
    ), r.stderr
    r = faultline("halt", "--nats", "", timeout_s=30)  # `--nats "$UNSET"` must not fall back to the default
    assert r.returncode == 2 and "--nats '': not a NATS server URL: no URL given" in r.stderr, r.stderr


def test_bare_host_port_and_a_list_are_accepted_as_nats_py_does(
    nats_url: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent_factory("node-a")
    bare = nats_url.removeprefix("nats://")  # 127.0.0.1:PORT
    r = faultline("agents", "--nats", bare, "-o", "json")
    assert r.returncode == 0, r.stderr
    assert [row["node"] for row in json.loads(r.stdout)] == ["node-a"]
    r = faultline("agents", "-o", "json", env=cli_env(FAULTLINE_NATS_URL=f"{nats_url}, {nats_url}"))
    assert r.returncode == 0, r.stderr
    assert [row["node"] for row in json.loads(r.stdout)] == ["node-a"]


def test_no_nats_configured_says_which_default_was_tried() -> None:
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", 4222)) == 0:
            pytest.skip("something listens on 127.0.0.1:4222 here; the default URL would reach it")
    r = faultline("halt", timeout_s=30)
    assert r.returncode == 2
    assert "no --nats and no FAULTLINE_NATS_URL, so nats://127.0.0.1:4222 was tried" in r.stderr, r.stderr


def test_schema_is_json() -> None:
    r = faultline("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert "spec" in schema["properties"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill stdout")
def test_a_stdout_that_cannot_take_the_result_is_said_once_not_a_traceback() -> None:
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "controller.cli", "schema"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=30, cwd=REPO, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "faultline: could not write the result to stdout (No space left on device)", r.stderr


def test_a_reader_that_stops_reading_gets_no_complaint_on_stderr() -> None:
    """`faultline schema | head -1`: the reader closed the pipe on purpose; before, every such
    pipe printed "could not write the result to stdout (Broken pipe)" under head's output."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # a reader already gone: the first write meets EPIPE
    try:
        r = subprocess.run(
            [sys.executable, "-m", "controller.cli", "schema"],
            stdout=w_fd, stderr=subprocess.PIPE, text=True, timeout=30, cwd=REPO, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(w_fd)
    assert r.stderr == "", r.stderr
    assert r.returncode == 1  # the result did not all reach its reader: a script still sees it


def test_an_experiment_can_come_from_standard_input() -> None:
    text = (REPO / "examples" / "pause-worker.yaml").read_text()
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", "validate", "-"],
        input=text, capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0 and "-: valid (experiment pause-worker" in r.stdout, r.stdout + r.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "controller.cli", "validate", "-"],
        input="kind: [", capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert bad.returncode == 2 and "not valid YAML" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_run_invalid_file_exits_2_and_sends_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: faultline/v1\nkind: Experiment\nmetadata: {name: x}\nspec: {duration: 1s}\n")
    # an unreachable URL: if the CLI tried to connect, it would say so; it must stop at the file
    r = faultline("run", str(bad), "--nats", "nats://127.0.0.1:1")
    assert r.returncode == 2
    assert "spec.faults" in r.stderr and "nothing sent" in r.stderr and "connect" not in r.stderr
    assert r.stdout == ""  # text output: the reason is on stderr only
    # -o json: a script gets an object on stdout as well, saying where the run stopped
    r = faultline("run", str(bad), "--nats", "nats://127.0.0.1:1", "-o", "json")
    refusal = json.loads(r.stdout)
    assert r.returncode == 2 and refusal["exit_code"] == 2 and refusal["sent"] is False
    assert (refusal["outcome"], refusal["stage"]) == ("refused", "experiment-file")
    assert "spec.faults" in refusal["error"]
    r = faultline("run", str(bad), "--nats", "nats://127.0.0.1:1", "-o", "json", "--dry-run")
    assert json.loads(r.stdout)["stage"] == "experiment-file"


# --- local mode -----------------------------------------------------------------------


def _descendants(pid: int) -> set[tuple[int, float]]:
    try:
        return {(c.pid, c.create_time()) for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(procs: set[tuple[int, float]]) -> list[str]:
    out = []
    for pid, created in procs:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:120]}")
    return out


def test_demo_exits_0_and_leaves_nothing_behind(tmp_path: Path, running: Callable[..., Running]) -> None:
    started = time.monotonic()
    demo = running("demo", "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state")))
    seen: set[tuple[int, float]] = set()
    while demo.proc.poll() is None and time.monotonic() - started < 40:
        seen |= _descendants(demo.proc.pid)
        time.sleep(0.1)
    code = demo.wait(5)
    elapsed = time.monotonic() - started
    assert code == 0, demo.stderr()
    report = json.loads(demo.stdout())
    assert report["outcome"] == "completed"
    by_kind = {f["kind"]: f for f in report["faults"]}
    assert by_kind["process-pause"]["measurements"]["resumed_pids"]
    assert by_kind["process-kill"]["measurements"]["hit_pids"]
    assert by_kind["process-kill"]["measurements"].get("restarted") is True, by_kind["process-kill"]
    assert "status:" in demo.stderr() and "supervisor: victim B died" in demo.stderr()
    assert len(seen) >= 4, f"expected nats-server, agent and two victims among {seen}"
    assert not _alive(seen), f"left behind: {_alive(seen)}"
    assert elapsed < 20, f"demo took {elapsed:.1f}s"
    assert not list((tmp_path / "state" / "journal").glob("*.json"))


def test_run_local_ignores_the_fleet_s_faultline_settings(tmp_path: Path) -> None:
    """A review: `run --local` is for a shell with FAULTLINE_NATS_URL set, which has the fleet's
    FAULTLINE_NATS_TLS_* too; the local agent inherited them, demanded TLS of the embedded
    plaintext server and never became ready (20 s, then exit 2)."""
    ca = tmp_path / "fleet-ca.pem"
    ca.write_text("not a certificate: the fleet's, not for the embedded server\n")
    env = cli_env(
        FAULTLINE_STATE_DIR=str(tmp_path / "state"),
        FAULTLINE_NATS_URL="tls://127.0.0.1:1",
        FAULTLINE_NATS_TLS_CA=str(ca),
        FAULTLINE_LABELS="zone=a",
    )
    r = faultline("run", str(EXAMPLES / "zone-outage.yaml"), "--local", "--dry-run", env=env, timeout_s=60)
    assert r.returncode == 0, r.stderr
    assert "would target" in r.stdout, r.stdout


def test_run_without_nats_refuses_a_fleet_file_and_runs_it_locally_with_local(tmp_path: Path, victims: Victims) -> None:
    """Found by a new user's review: a file for a fleet (nodes, labels), run without --nats on a
    bastion host, was quietly retargeted to that host. It is refused unless --local is given."""
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="1s", targets={"nodes": ["elsewhere"]})
    env = cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state"))
    refused = faultline("run", str(path), "-o", "json", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "spec.targets names nodes elsewhere: this file is for a fleet" in refused.stderr, refused.stderr
    assert "--local" in refused.stderr
    assert json.loads(refused.stdout)["stage"] == "local-mode"
    assert status(victim) != psutil.STATUS_STOPPED
    assert not (tmp_path / "state").exists(), "a refused run started the local environment"
    both = faultline("run", str(path), "--local", "--nats", "nats://127.0.0.1:1", env=env)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    r = faultline("run", str(path), "--local", "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert "replaced by the local node" in r.stderr
    report = json.loads(r.stdout)
    assert report["faults"][0]["measurements"]["hit_pids"] == [victim.pid]
    assert status(victim) != psutil.STATUS_STOPPED


def test_a_local_run_from_a_directory_with_packages_named_like_ours(tmp_path: Path, victims: Victims) -> None:
    """A user's project may well have ./proto or ./agent. The local agent and the processes it starts
    (its network probe, stressors) run with -P: the working directory is not on their sys.path."""
    cwd = tmp_path / "project"
    for pkg in ("proto", "agent", "controller"):
        (cwd / pkg).mkdir(parents=True)
        (cwd / pkg / "__init__.py").write_text(f"raise ImportError('the user\\'s own {pkg} package was imported')\n")
    (victim,) = victims.start(1)
    faults = [pause(victims), {"kind": "cpu", "load": "10%", "workers": 1}]
    path = experiment_file(tmp_path, faults, duration="1s")
    script = Path(sys.executable).parent / "faultline"
    r = subprocess.run(
        [str(script), "run", str(path), "-o", "json", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL,
        env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state")),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    by_kind = {f["kind"]: f for f in report["faults"]}
    assert by_kind["process-pause"]["measurements"]["hit_pids"] == [victim.pid]
    assert len(by_kind["cpu"]["measurements"]["stressor_pids"]) == 1, by_kind["cpu"]
    assert "user's own" not in r.stderr
    assert status(victim) != psutil.STATUS_STOPPED
    if os.geteuid() != 0:
        return  # the network probe below finds no tc capability without root either way
    net = experiment_file(tmp_path, [{"kind": "network", "rate": "8mbit", "interface": "lo"}], duration="1s")
    dry = subprocess.run(
        [str(script), "run", str(net), "--dry-run"],
        capture_output=True, text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL,
        env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state")),
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    log = (tmp_path / "state" / "agent.log").read_text()
    assert "start-up child failed" not in log, "the network probe's child imported the user's package"


def test_local_dry_run_reports_what_an_earlier_run_left_in_the_journal(tmp_path: Path, victims: Victims) -> None:
    """A crashed local run left a paused victim and its journal entry. The next local run's agent
    reverts it as it starts (as every agent start does), and the user is told, even in a dry run."""
    from agent.faults.process import ProcessPlan, Target
    from agent.journal import Journal, JournalEntry
    from proto.faults import ProcessPauseSpec

    (victim,) = victims.start(1)
    victim.suspend()  # what the crashed run's pause did
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 5, "the victim to be stopped")
    state = tmp_path / "state"
    spec = ProcessPauseSpec.model_validate({"kind": "process-pause", "match": {"cmdline": f"{victims.token}$"}})
    plan = ProcessPlan(
        kind="process-pause",
        targets=[Target(pid=victim.pid, create_time=victim.create_time(), name=victim.name())],
        matched_pids=[victim.pid],
        signal=int(signal.SIGSTOP),
        applied_at=time.time() - 5,
    )
    entry = JournalEntry(
        fault_id="crashed-run.0",
        experiment_id="crashed-run",
        spec=spec,
        expires_at=time.time() + 600,
        lease_timeout_s=5,
        plan=plan.model_dump(mode="json"),
    )
    Journal(state).write(entry)
    (state / "journal" / "torn.0.json").write_bytes(b'{"fault_id": "torn.0", "exp')  # a torn write
    path = experiment_file(tmp_path, [pause(victims)], duration="1s")
    r = faultline("run", str(path), "--dry-run", "--quiet", "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(state)))
    assert r.returncode == 0, r.stderr
    assert "1 fault(s) an earlier run left in its journal" in r.stderr, r.stderr
    assert "crashed-run.0 (process-pause, experiment crashed-run): reverted" in r.stderr, r.stderr
    assert "keeps 1 journal entry(ies) unreverted" in r.stderr, r.stderr
    assert "  torn.0.corrupt: unreadable: not JSON: " in r.stderr, r.stderr
    data = json.loads(r.stdout)
    (rec,) = data["local_recovery"]
    assert rec["fault_id"] == "crashed-run.0" and rec["state"] == "reverted", rec
    assert [(i["entry"], i["problem"]) for i in data["local_journal_issues"]] == [("torn.0.corrupt", "unreadable")]
    assert data["local_journal_issues_total"] == 1
    assert status(victim) != psutil.STATUS_STOPPED
    assert not list((state / "journal").glob("*.json"))
    # the next run (a real one) reverts nothing, and still names the entry it keeps
    again = faultline("run", str(path), "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(state)))
    assert again.returncode == 0, again.stderr
    assert "earlier run" not in again.stderr, again.stderr
    assert "torn.0.corrupt: unreadable: not JSON; set aside at an earlier start" in again.stderr, again.stderr
    report = json.loads(again.stdout)
    assert report["outcome"] == "completed" and report["local_recovery"] == [], report
    assert [i["entry"] for i in report["local_journal_issues"]] == ["torn.0.corrupt"], report
    assert any("keeps 1 journal entry(ies)" in n for n in report["notes"]), report["notes"]


def test_an_unusable_local_state_dir_is_refused_with_its_name(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = experiment_file(tmp_path, [{"kind": "process-pause", "match": {"pid": 999999}}])
    for output in ([], ["-o", "json"]):
        r = faultline("run", str(path), "--dry-run", *output, env=cli_env(FAULTLINE_STATE_DIR=str(blocker / "state")))
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"cannot use the local state directory {blocker / 'state'}: Not a directory" in r.stderr, r.stderr
        assert "FAULTLINE_STATE_DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["stage"] == "local-mode", r.stdout
    demo = faultline("demo", "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(blocker / "state")))
    assert demo.returncode == 1 and "Traceback" not in demo.stderr, demo.stdout + demo.stderr
    assert json.loads(demo.stdout) == {
        "outcome": "failed",
        "stage": "start",
        "error": f"cannot use the local state directory {blocker / 'state'}: Not a directory "
        "(FAULTLINE_STATE_DIR chooses another)",
        "sent": False,
        "exit_code": 1,
    }, demo.stdout


def test_a_second_local_run_on_the_same_state_dir_is_refused(
    tmp_path: Path, victims: Victims, running: Callable[..., Running]
) -> None:
    """Its agent would otherwise wait on the first one's state directory (one agent per journal)."""
    (victim,) = victims.start(1)
    state = tmp_path / "state"
    path = experiment_file(tmp_path, [pause(victims)], duration="60s")
    first = running("run", str(path), env=cli_env(FAULTLINE_STATE_DIR=str(state)))
    first.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the first run to pause the victim")
    t0 = time.monotonic()
    r = faultline("run", str(path), "--dry-run", env=cli_env(FAULTLINE_STATE_DIR=str(state)))
    assert r.returncode == 2, r.stderr
    assert "another local faultline run is using" in r.stderr and "FAULTLINE_STATE_DIR" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10, "refused at once, not after the agent's wait"
    assert status(victim) == psutil.STATUS_STOPPED, "the first run's fault must stand"


def test_local_run_prints_an_abort_command_that_works_as_printed(
    tmp_path: Path, victims: Victims, running: Callable[..., Running]
) -> None:
    (victim,) = victims.start(1)
    # the example as it is, on the test's own victim and with a shorter duration
    text = (EXAMPLES / "pause-worker.yaml").read_text()
    assert "duration: 10s" in text and "faultline-example-worker --queue q1$" in text
    text = text.replace("duration: 10s", "duration: 8s").replace(
        "faultline-example-worker --queue q1$", f"{victims.token}$"
    )
    path = tmp_path / "pause-worker.yaml"
    path.write_text(text)
    run = running("run", str(path), "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state")))
    hint = run.abort_hint()
    argv = shlex.split(hint)
    assert argv[:3] == ["faultline", "abort", run.experiment_id()], hint
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the local agent to pause the victim")
    # exactly as printed, from a shell with no NATS configured
    r = faultline(*argv[1:], timeout_s=30)
    assert r.returncode == 0, f"{hint!r} failed:\n{r.stdout}{r.stderr}"
    assert "--nats" in argv, hint  # the embedded server's port, not the default one
    assert run.wait(20) == 1, run.stderr()
    report = json.loads(run.stdout())
    assert report["outcome"] == "aborted" and "aborted from the command line" in report["abort"]["reason"]
    assert report["faults"][0]["state"] == "reverted"
    assert status(victim) != psutil.STATUS_STOPPED


# --- against a fleet (real nats-server and agents from tests/conftest.py) ----------------


def test_agents_lists_the_fleet(nats_url: str, agent_factory: Callable[..., AgentProcess]) -> None:
    agent_factory("node-a", extra=["--label", "zone=a"])
    r = faultline("agents", "--nats", nats_url, "-o", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["node"] == "node-a" and row["labels"] == {"zone": "a"} and row["state"] == "ready"
    assert set(row) == {
        "node", "version", "state", "labels", "capabilities", "capability_notes", "faults",
        "cpu_percent", "memory_percent", "last_seen_s", "instance_id", "journal_issues", "journal_issues_total",
        "duplicate_instances",
    }  # fmt: skip
    assert row["journal_issues"] == [] and row["journal_issues_total"] == 0 and row["duplicate_instances"] == []
    assert "process-pause" in row["capabilities"]
    text = faultline("agents", "--nats", nats_url)
    assert "node-a" in text.stdout and "zone=a" in text.stdout
    assert "attention" not in text.stdout
    # why a capability is missing is in the text too, not only in the JSON (this kernel: no sch_netem)
    for cap, note in row["capability_notes"].items():
        assert f"  node-a: {cap}: {note}" in text.stdout, text.stdout


def test_agents_and_run_name_journal_entries_an_agent_could_not_revert(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    """A journal entry the agent cannot read may have guarded a fault still in place: the agent
    keeps it, and every heartbeat says so until someone removes it; `agents` and `run` show it."""
    agent = agent_factory("node-a", start=False)
    journal = agent.state_dir / "journal"
    journal.mkdir(parents=True)
    (journal / "torn.0.json").write_bytes(b'{"fault_id": "torn.0", "spec": {"kind": "process-pa')
    agent.start().wait_ready()
    r = faultline("agents", "--nats", nats_url, "-o", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    (issue,) = row["journal_issues"]
    assert (issue["entry"], issue["problem"]) == ("torn.0.corrupt", "unreadable"), issue
    assert row["journal_issues_total"] == 1
    assert (journal / "torn.0.corrupt").exists(), "kept, never dropped"
    text = faultline("agents", "--nats", nats_url)
    assert "attention: 1 agent(s) keep journal entries they have not reverted:" in text.stdout, text.stdout
    assert "    torn.0.corrupt: unreadable: not JSON: " in text.stdout, text.stdout
    assert "may still be in place" in text.stdout
    victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="1s")
    dry = faultline("run", str(path), "--nats", nats_url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "note: node-a keeps 1 journal entry(ies) it has not reverted" in dry.stdout, dry.stdout
    # a halt cannot call such an agent clear ...
    halt = faultline("halt", "--nats", nats_url)
    assert halt.returncode == 1, halt.stdout + halt.stderr
    assert (
        "node-a: NOT CLEAR: 1 journal entry(ies) kept unreverted after the halt's retries:\n    torn.0.corrupt: "
        in halt.stdout
    )
    assert "torn.0.corrupt: unreadable" in halt.stdout and "journal-kept" in halt.stdout, halt.stdout
    # ... until the operator has dealt with it and removed the entry: the next halt forgets it
    (journal / "torn.0.corrupt").unlink()
    halt = faultline("halt", "--nats", nats_url, "-o", "json")
    assert halt.returncode == 0, halt.stdout + halt.stderr
    (node,) = json.loads(halt.stdout)["nodes"]
    assert node["result"] == "clear" and node["journal_issues"] == [], node
    r = faultline("agents", "--nats", nats_url, "-o", "json")
    assert json.loads(r.stdout)[0]["journal_issues_total"] == 0, r.stdout


def test_run_example_against_a_real_agent(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    agent = agent_factory("node-a", extra=["--label", "zone=a"])
    # the zone-outage example as it is, with its victim started as its comment says
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()", "faultline-example-service"], stdin=subprocess.DEVNULL
    )
    victims.procs.append(proc)
    victim = psutil.Process(proc.pid)
    text = (EXAMPLES / "zone-outage.yaml").read_text().replace("duration: 30s", "duration: 3s")
    path = tmp_path / "zone-outage.yaml"
    path.write_text(text)
    dry = faultline("run", str(path), "--nats", nats_url, "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["targets"] == ["node-a"]
    local_keys = {"local_recovery", "local_journal_issues", "local_journal_issues_total", "local_agent_restarts"}
    assert set(plan) == {
        "outcome", "name", "experiment", "exit_code", "targets", "faults", "pods", "notes", "preview", *local_keys
    }  # fmt: skip
    assert (plan["outcome"], plan["name"], plan["exit_code"]) == ("dry-run", "zone-outage", 0), plan
    assert all(plan[k] is None for k in local_keys)  # one shape for scripts: null against a fleet
    assert plan["preview"] is None  # asked for with --preview only: a dry run sends nothing
    # every field of the fault, null when the file leaves it out
    assert plan["faults"][0]["duration"] is None and plan["faults"][0]["match"]["pid"] is None
    assert status(victim) != psutil.STATUS_STOPPED and not agent.settled_journal()

    r = faultline("run", str(path), "--nats", nats_url, "-o", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # the same keys on success as on abort, null when absent
    assert report["abort"] is None and set(report) >= {"abort", "notes", "problems", "duration_s", *local_keys}
    (fault,) = report["faults"]
    assert fault["state"] == "expired" and fault["measurements"]["hit_pids"] == [victim.pid]
    assert fault["reason"] is None or isinstance(fault["reason"], str)
    assert "oom_killed" in fault["measurements"] and "pods" in fault and "ack_reason" in fault
    assert fault["dispatched_at"] <= fault["acked_at"] <= fault["active_at"] <= fault["ended_at"]
    assert status(victim) != psutil.STATUS_STOPPED
    assert agent.settled_journal() == []


def test_refused_before_dispatch(tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess]) -> None:
    agent_factory("node-a")
    unknown = experiment_file(tmp_path, [{"kind": "process-pause", "match": {"pid": 1}}], targets={"nodes": ["ghost"]})
    r = faultline("run", str(unknown), "--nats", nats_url)
    assert r.returncode == 2 and "ghost is not in the fleet" in r.stderr
    net = experiment_file(tmp_path, [{"kind": "network", "delay": "10ms", "destinations": ["192.0.2.0/24"]}])
    r = faultline("run", str(net), "--nats", nats_url, "--dry-run")
    if r.returncode == 0:
        pytest.skip("this machine's agent can inject netem delay; nothing to refuse")
    assert r.returncode == 2 and "node node-a: spec.faults[0] (network) needs" in r.stderr


async def test_heartbeat_timeout_under_two_intervals_is_refused_and_nothing_sent(
    tmp_path: Path, nc: Any, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    agent = agent_factory("node-a", extra=["--heartbeat-interval", "1"])
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="5s", abort={"heartbeatTimeout": "1500ms"})
    sent: list[str] = []

    async def record(msg: Any) -> None:
        if not msg.subject.endswith(".hb"):
            sent.append(msg.subject)

    sub = await nc.subscribe("faultline.>", cb=record)
    try:
        await nc.flush(timeout=5)
        for extra in (["--dry-run"], [], ["-o", "json"]):
            r = await asyncio.to_thread(faultline, "run", str(path), "--nats", nats_url, *extra)
            assert r.returncode == 2, r.stdout + r.stderr
            if "json" in extra:
                refusal = json.loads(r.stdout)
                assert (refusal["stage"], refusal["sent"]) == ("preflight", False), refusal
                assert "spec.abort.heartbeatTimeout" in refusal["error"]
            assert "cannot run cli-test (nothing sent)" in r.stderr
            assert (
                "spec.abort.heartbeatTimeout: 1.5s is less than 2 heartbeat intervals of agent node-a (every 1s): "
                "one late heartbeat would abort the run, blaming the agent; use heartbeatTimeout: 2s or more"
            ) in r.stderr, r.stderr
        await nc.flush(timeout=5)
    finally:
        await sub.unsubscribe()
    assert sent == [], f"published before the refusal: {sent}"
    assert status(victim) != psutil.STATUS_STOPPED and agent.journal() == []
    # twice the interval is enough
    ok = experiment_file(tmp_path, [pause(victims)], duration="5s", abort={"heartbeatTimeout": "2s"})
    r = await asyncio.to_thread(faultline, "run", str(ok), "--nats", nats_url, "--dry-run")
    assert r.returncode == 0, r.stderr


def test_a_target_that_refuses_leaves_every_target_untouched(
    tmp_path: Path, nats_url: str, agent_factory: Callable[..., AgentProcess], victims: Victims
) -> None:
    """node-b holds at most one fault, so it refuses the second of two: the run aborts before the
    start, and neither victim is paused at any moment, on node-a either (both agents see both)."""
    config = tmp_path / "node-b.json"
    config.write_text(json.dumps({"safety": {"max_faults": 1}}))
    a = agent_factory("node-a")
    b = agent_factory("node-b", extra=["--config", str(config)])
    (v1,) = victims.start(1, tag="-1")
    (v2,) = victims.start(1, tag="-2")
    path = experiment_file(tmp_path, [pause(victims, "-1"), pause(victims, "-2")], duration="30s")
    stopped: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # every 2 ms for the whole run: one stopped sample fails the test
        while not done.is_set():
            stopped.update(v.pid for v in (v1, v2) if status(v) == psutil.STATUS_STOPPED)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = faultline("run", str(path), "--nats", nats_url, "-o", "json")
    finally:
        done.set()
        watcher.join(5)
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["outcome"] == "aborted" and report["abort"]["node"] == "node-b", report["abort"]
    assert "maximum of 1 faults" in report["abort"]["reason"]
    assert stopped == set(), f"paused although a target refused: {sorted(stopped)}"
    by = {(f["node"], f["index"]): f for f in report["faults"]}
    assert by[("node-b", 1)]["state"] == "rejected"
    for key in [("node-a", 0), ("node-a", 1), ("node-b", 0)]:
        f = by[key]
        # accepted and ended before its start, or refused by the abort while it was being checked
        assert (f["state"] == "reverted" and "nothing was applied" in f["reason"]) or (
            f["state"] == "rejected" and "while it was being checked; not applied" in f["reason"]
        ), f
        assert f["active_at"] is None and f["measurements"]["hit_pids"] is None, f
    assert "starting" not in r.stderr, "the start went out although a target refused"
    assert a.settled_journal() == [] and b.settled_journal() == []


def test_heartbeat_loss_aborts_and_reverts(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    # one host, two agents: each its own victim (the other's is on its deny list), as on two nodes;
    # a pause skips a process already stopped, so a shared victim would be paused by one agent only
    a = agent_factory("node-a", extra=["--deny", f"{victims.token}-b$"])
    b = agent_factory("node-b", extra=["--deny", f"{victims.token}-a$"])
    (victim,) = victims.start(1, "-a")
    (victim_b,) = victims.start(1, "-b")
    path = experiment_file(tmp_path, [pause(victims, tag="-[ab]")], duration="30s", abort={"heartbeatTimeout": "1s"})
    run = running("run", str(path), "--nats", nats_url, "-o", "json")
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "node-a's victim to be paused")
    wait_until(lambda: status(victim_b) == psutil.STATUS_STOPPED, 15, "node-b's victim to be paused")
    wait_until(lambda: "active" in run.stderr().split("node-b", 1)[-1], 10, "node-b to report active")
    b.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        code = run.wait(20)
        assert code == 1, run.stderr()
        report = json.loads(run.stdout())
        assert report["outcome"] == "aborted"
        assert report["abort"]["node"] == "node-b" and "silent" in report["abort"]["reason"]
        detected = report["abort"]["at"] - (time.time() - (time.monotonic() - stopped_at))
        assert detected <= 1.0 + 0.5 + 0.5, f"abort came {detected:.2f}s after the agent stopped"
        node_a = [f for f in report["faults"] if f["node"] == "node-a"]
        assert node_a[0]["state"] == "reverted"
        assert status(victim) != psutil.STATUS_STOPPED  # node-a resumed its own
        assert a.settled_journal() == []
    finally:
        b.signal(signal.SIGCONT)


def test_sigint_aborts_and_reverts(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    agent = agent_factory("node-a")
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="30s")
    run = running("run", str(path), "--nats", nats_url, "-o", "json")
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(15) == 1
    report = json.loads(run.stdout())
    assert report["outcome"] == "aborted" and "SIGINT" in report["abort"]["reason"]
    assert report["faults"][0]["state"] == "reverted"
    assert status(victim) != psutil.STATUS_STOPPED
    assert agent.settled_journal() == []


def frozen_target_of_a_paused_run(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
    lease: str,
) -> tuple[AgentProcess, psutil.Process, Running, str]:
    """A run (-o json) whose one target paused its victim, then froze (SIGSTOP): no revert can be
    confirmed. The caller sends the agent SIGCONT in a finaliser."""
    agent = agent_factory("node-a")
    (victim,) = victims.start(1)
    path = experiment_file(
        tmp_path, [pause(victims)], duration="60s", abort={"heartbeatTimeout": "60s", "leaseTimeout": lease}
    )
    run = running("run", str(path), "--nats", nats_url, "-o", "json")
    exp_id = run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    agent.signal(signal.SIGSTOP)
    return agent, victim, run, exp_id


def test_a_second_sigint_stops_waiting_and_still_writes_the_report(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    """Before: the second Ctrl-C exited 130 with nothing on stdout, so a script reading -o json got
    nothing. Now the report comes at once (exit 1), naming the faults not confirmed reverted."""
    agent, victim, run, _ = frozen_target_of_a_paused_run(tmp_path, nats_url, agent_factory, victims, running, "3s")
    try:
        run.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "reverting on node-a" in run.stderr(), 10, "the first SIGINT's revert to begin")
        run.proc.send_signal(signal.SIGINT)
        assert run.wait(10) == 1, run.stderr()
    finally:
        agent.signal(signal.SIGCONT)
    report = json.loads(run.stdout())
    assert report["outcome"] == "aborted", report
    assert any("stopped waiting with 1 fault(s) not confirmed reverted" in p for p in report["problems"]), report
    # thawed, the agent reverts: the broadcast waits on its socket, and the lease (3 s) has lapsed
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 10, "the victim to resume")


def test_three_quick_sigints_never_lose_the_output_nor_claim_nothing_was_sent(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    """Found by a review: a third Ctrl-C printed "interrupted before the experiment started",
    sent: false, while a victim was still paused; and one just after the run ended killed the
    process by the default handler, before its report. Whichever signal lands where, stdout has
    JSON that tells the truth, and the exit is 1 (a report) or 130 (none), never a signal."""
    agent, victim, run, exp_id = frozen_target_of_a_paused_run(
        tmp_path, nats_url, agent_factory, victims, running, "3s"
    )
    try:
        run.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "reverting on node-a" in run.stderr(), 10, "the first SIGINT's revert to begin")
        for _ in range(2):
            time.sleep(0.05)
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGINT)
        code = run.wait(10)
    finally:
        agent.signal(signal.SIGCONT)
    out = json.loads(run.stdout())
    if out["outcome"] == "interrupted":
        assert code == 130 and out["sent"] is True and out["experiment_id"] == exp_id, out
        assert "leaseTimeout 3s" in out["error"], out
    else:
        assert code == 1 and out["outcome"] == "aborted", (code, out["outcome"], run.stderr())
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 10, "the victim to resume")


def test_abort_from_another_process(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    agent_factory("node-a")
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="30s")
    run = running("run", str(path), "--nats", nats_url, "-o", "json")
    exp_id = run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    r = faultline("abort", exp_id, "--nats", nats_url, "--reason", "enough", "-o", "json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)  # the lines go to stderr, the result to stdout
    assert (done["outcome"], done["via"], done["targets"], done["exit_code"]) == (
        "confirmed",
        "controller",
        ["node-a"],
        0,
    )
    assert done["not_confirmed"] == [] and done["experiment_id"] == exp_id, done
    assert "abort requested; its controller is reverting" in r.stderr
    assert run.wait(15) == 1
    report = json.loads(run.stdout())
    assert report["outcome"] == "aborted" and report["abort"]["reason"].startswith("enough (by "), report["abort"]
    assert status(victim) != psutil.STATUS_STOPPED


def test_abort_without_controller_reverts_on_agents(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    agent = agent_factory("node-a")
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="60s", abort={"leaseTimeout": "60s"})
    run = running("run", str(path), "--nats", nats_url)
    exp_id = run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    run.kill()  # the controller is gone; the lease would take 60 s to lapse
    r = faultline("abort", exp_id, "--nats", nats_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node-a: revert requested (accepted)" in r.stdout
    assert f"experiment {exp_id}: abort confirmed: no agent seen holds any of its faults" in r.stdout, r.stdout
    assert status(victim) != psutil.STATUS_STOPPED, "confirmed, but the victim is still paused"
    wait_until(lambda: "reverted: requested: " in agent.log(), 5, "the agent to log the revert")
    assert "reverted: requested: aborted from the command line (by " in agent.log(), agent.log()


def test_abort_is_not_confirmed_while_a_target_still_holds_the_fault(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    """Found by a review: with a target frozen, `faultline abort` said "abort requested" and
    exited 0 while that target's victim stayed paused. An acknowledgement is no revert: the
    abort now confirms from heartbeats and names what still holds."""
    agent, victim, run, exp_id = frozen_target_of_a_paused_run(
        tmp_path, nats_url, agent_factory, victims, running, "60s"
    )
    try:
        j = faultline("abort", exp_id, "--nats", nats_url, "-o", "json")
        assert j.returncode == 1, j.stdout + j.stderr
        # the text lines, on stderr under -o json
        assert "node-a: NOT CONFIRMED: a target that sent no heartbeat at all" in j.stderr, j.stderr
        assert "abort requested; its controller is reverting" in j.stderr
        held = json.loads(j.stdout)
        assert held["outcome"] == "not-confirmed" and held["exit_code"] == 1, held
        assert [(n["node"], n["result"]) for n in held["not_confirmed"]] == [("node-a", "never-seen")], held
    finally:
        agent.signal(signal.SIGCONT)
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 10, "the victim to resume once its agent runs")
    assert run.wait(15) == 1


def test_experiments_lists_what_holds_faults_and_its_abort_empties_it(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    """ "What chaos runs now?": the experiment with its node and fault states, also after its
    controller is gone (its faults wait for their lease); its id is what `abort` takes."""
    agent_factory("node-a")
    agent_factory("node-b")
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="60s", targets={"nodes": ["node-a"]},
                           abort={"leaseTimeout": "60s"})  # fmt: skip
    run = running("run", str(path), "--nats", nats_url)
    exp_id = run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    (alive,) = json.loads(faultline("experiments", "--nats", nats_url, "-o", "json").stdout)
    assert alive["controller"] == "renewing" and alive["lease_heard_s_ago"] is not None, alive
    run.kill()  # its controller is gone: the faults stay until their lease lapses (60 s)

    r = faultline("experiments", "--nats", nats_url, "-o", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["experiment_id"] == exp_id and row["nodes"] == ["node-a"], row
    assert row["states"] == {"active": 1} and row["kinds"] == ["process-pause"], row
    assert 0 < row["expires_in_s"] <= 60 and row["faults"][0]["node"] == "node-a", row
    # no lease heard while it listened: the controller is gone, which is what an SRE must know
    assert row["controller"] == "not heard" and row["lease_heard_s_ago"] is None and row["listened_s"] >= 1.4, row
    text = faultline("experiments", "--nats", nats_url)
    assert re.search(
        rf"^{re.escape(exp_id)}\s+none \([\d.]+s\)\s+node-a\s+1\s+active=1\s+process-pause\s+~\d+s$", text.stdout, re.M
    ), text.stdout
    assert "its controller is gone or cut off" in text.stdout
    assert "faultline abort EXPERIMENT" in text.stdout

    assert faultline("abort", exp_id, "--nats", nats_url).returncode == 0
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 5, "the victim to resume after the abort")

    def listed() -> list[Any]:
        return list(json.loads(faultline("experiments", "--nats", nats_url, "-o", "json").stdout))

    wait_until(lambda: listed() == [], 10, "the aborted experiment to leave the list")
    assert "no experiment holds faults on the 2 agent(s)" in faultline("experiments", "--nats", nats_url).stdout


def test_experiments_with_no_agent_says_so(nats_url: str) -> None:
    r = faultline("experiments", "--nats", nats_url)
    assert r.returncode == 0 and "no agents sent a heartbeat" in r.stdout, r.stdout + r.stderr
    assert json.loads(faultline("experiments", "--nats", nats_url, "-o", "json").stdout) == []


def test_abort_unknown_experiment(nats_url: str, agent_factory: Callable[..., AgentProcess]) -> None:
    agent_factory("node-a")
    r = faultline("abort", "no-such-exp-123456", "--nats", nats_url)
    assert r.returncode == 2 and "faultline: unknown experiment id" in r.stderr
    j = faultline("abort", "no-such-exp-123456", "--nats", nats_url, "-o", "json")
    assert j.returncode == 2 and json.loads(j.stdout)["outcome"] == "unknown-experiment", j.stdout
    bad = faultline("abort", "not an id", "--nats", nats_url, "-o", "json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["stage"] == "experiment-id", bad.stdout


def test_halt(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    agent_factory("node-a")
    agent_factory("node-b")  # holds nothing
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="30s", targets={"nodes": ["node-a"]})
    run = running("run", str(path), "--nats", nats_url, "-o", "json")
    exp_id = run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    r = faultline("halt", "--nats", nats_url, "--reason", "test halt", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 agent(s) seen: node-a, node-b; waiting up to 5s" in r.stderr, r.stderr
    result = json.loads(r.stdout)
    assert result["outcome"] == "clear" and result["agents_seen"] == 2 and result["reason"] == "test halt"
    a, b = result["nodes"]
    assert (a["node"], a["result"], a["active_faults"]) == ("node-a", "clear", [])
    (ended,) = a["ended_since_halt"]
    assert ended["experiment_id"] == exp_id and ended["state"] == "reverted" and "halt: test halt" in ended["reason"]
    assert (b["node"], b["result"], b["ended_since_halt"]) == ("node-b", "clear", [])
    # the heartbeat said so because it is so: the victim runs again
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 2, "the victim to resume after a confirmed halt")
    # the agent reverted on its own: the run ends with every fault reverted, not "completed"
    assert run.wait(40) == 1
    report = json.loads(run.stdout())
    assert report["faults"][0]["state"] == "reverted"
    assert report["outcome"] == "aborted" and "halt" in report["abort"]["reason"]
    text = faultline("halt", "--nats", nats_url)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "node-a: clear: held no fault" in text.stdout and "node-b: clear: held no fault" in text.stdout
    assert "halt confirmed: all 2 agent(s) seen report no active fault" in text.stdout


def test_halt_is_not_clear_while_an_expected_agent_is_frozen(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    """A frozen agent sends no heartbeat, so a halt cannot see it: before, "halt confirmed: all 1
    agent(s) seen" and exit 0 while its victim stayed stopped. Now that says what it cannot see,
    and naming the fleet (--expect, --expect-agents) makes the halt not clear, exit 1."""
    a = agent_factory("node-a", extra=["--deny", f"{victims.token}-b$"])
    agent_factory("node.b", extra=["--deny", f"{victims.token}-a$"])  # on NATS: node_b
    (victim,) = victims.start(1, "-a")
    path = experiment_file(
        tmp_path, [pause(victims, tag="-a")], duration="60s", targets={"nodes": ["node-a"]},
        abort={"leaseTimeout": "60s", "heartbeatTimeout": "60s"},
    )  # fmt: skip
    run = running("run", str(path), "--nats", nats_url)
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "node-a's victim to be paused")
    run.kill()  # the controller is gone; the lease would take 60 s
    a.signal(signal.SIGSTOP)
    try:
        plain = faultline("halt", "--nats", nats_url)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        assert "halt confirmed: all 1 agent(s) seen report no active fault" in plain.stdout
        assert "an agent that sends no heartbeat, frozen or cut off from NATS, is not seen" in plain.stdout

        # named as the operator knows them (kubectl get nodes): node.b is node_b on NATS
        named = faultline("halt", "--nats", nats_url, "--expect", "node-a,node.b", "-o", "json")
        assert named.returncode == 1, named.stdout + named.stderr
        result = json.loads(named.stdout)
        assert result["outcome"] == "not-clear" and result["expected_nodes"] == ["node-a", "node_b"]
        assert {n["node"]: n["result"] for n in result["nodes"]} == {"node-a": "never-seen", "node_b": "clear"}
        assert {n["node"]: n["last_seen_s"] is None for n in result["nodes"]} == {"node-a": True, "node_b": False}

        counted = faultline("halt", "--nats", nats_url, "--expect-agents", "2")
        assert counted.returncode == 1, counted.stdout + counted.stderr
        assert "only 1 agent(s) seen of the 2 expected (--expect-agents)" in counted.stdout
        assert status(victim) == psutil.STATUS_STOPPED  # what the halt could not confirm is so
    finally:
        a.signal(signal.SIGCONT)
    # thawed, the agent reads the halts waiting on its socket and reverts
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 10, "the victim to resume once its agent thawed")
    bad = faultline("halt", "--nats", nats_url, "--expect-agents", "0")
    assert bad.returncode == 2 and "--expect-agents: 0 is not 1 or more" in bad.stderr, bad.stderr


def test_halt_with_no_agent_says_so(nats_url: str) -> None:
    r = faultline("halt", "--nats", nats_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"halt sent on {nats_url}, but no agent sent a heartbeat within" in r.stdout
    assert "there is nothing to confirm" in r.stdout and "is not seen and not counted" in r.stdout
    r = faultline("halt", "--nats", nats_url, "-o", "json")
    assert r.returncode == 0
    result = json.loads(r.stdout)
    assert (result["outcome"], result["agents_seen"], result["nodes"]) == ("no-agents", 0, [])
    # an emergency command never fails on its reason: too long, several lines, bytes not UTF-8
    odd = "incident 42:\n" + "x" * 600 + os.fsdecode(b"\xff\xfe")
    r = faultline("halt", "--nats", nats_url, "--reason", odd)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("exp_id", ["", "x" * 65, "a.b", "exp id"])
def test_abort_refuses_what_cannot_be_an_experiment_id(exp_id: str) -> None:
    r = faultline("abort", exp_id, "--nats", "nats://127.0.0.1:1", timeout_s=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not an experiment id: 1-64 letters, digits" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_killed_controller_lease_lapses_and_victim_resumes(
    tmp_path: Path,
    nats_url: str,
    agent_factory: Callable[..., AgentProcess],
    victims: Victims,
    running: Callable[..., Running],
) -> None:
    agent = agent_factory("node-a")
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="60s", abort={"leaseTimeout": "2s"})
    run = running("run", str(path), "--nats", nats_url)
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    run.kill()  # kill -9: no revert from the controller; the dead-man's switch must do it
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 2 + 1, "the victim to resume after the lease lapsed")
    wait_until(lambda: agent.settled_journal() == [], 5, "the agent's journal to empty")


def test_killed_local_cli_leaves_nothing_paused_or_running(
    tmp_path: Path, victims: Victims, running: Callable[..., Running]
) -> None:
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="60s")
    tmp = tmp_path / "tmp"  # the embedded nats-server's work dir goes here (TMPDIR)
    tmp.mkdir()
    run = running("run", str(path), env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state"), TMPDIR=str(tmp)))
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    children = _descendants(run.proc.pid)
    run.kill()  # kill -9 the CLI: its agent gets SIGTERM (pdeathsig), reverts and exits; nats-server too
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 10, "the victim to resume after the CLI died")
    wait_until(lambda: not _alive(children), 15, f"local agent and nats-server to exit: {_alive(children)}")
    # what the killed run could not remove, the next local run sweeps (it calls this on start)
    left = list(tmp.glob(f"{WORKDIR_PREFIX}*"))
    assert len(left) == 1, left
    assert sweep_stale_workdirs(tmp) == left and not list(tmp.iterdir())


def test_a_local_agent_killed_mid_run_is_started_again_and_reverts_at_once(
    tmp_path: Path, victims: Victims, running: Callable[..., Running]
) -> None:
    """kill -9 of the local agent holding a pause: nothing else would send SIGCONT (its lease watchdog
    died with it). Local mode starts it again, as the kubelet would, and its journal recovery does."""
    (victim,) = victims.start(1)
    path = experiment_file(tmp_path, [pause(victims)], duration="60s")
    run = running("run", str(path), "-o", "json", env=cli_env(FAULTLINE_STATE_DIR=str(tmp_path / "state")))
    run.experiment_id()
    wait_until(lambda: status(victim) == psutil.STATUS_STOPPED, 15, "the victim to be paused")
    (agent,) = [p for p in psutil.Process(run.proc.pid).children() if "agent.main" in p.cmdline()]
    agent.kill()
    t0 = time.monotonic()
    wait_until(lambda: status(victim) != psutil.STATUS_STOPPED, 15, "the restarted agent to resume the victim")
    resumed_s = time.monotonic() - t0
    assert run.wait(40) == 1, run.stderr()
    err = run.stderr()
    assert "local agent exited unexpectedly (code -9); starting it again" in err, err
    assert "1 fault(s) the agent that died left in its journal" in err and ": reverted: recovered from journal" in err
    report = json.loads(run.stdout())
    assert report["outcome"] == "aborted", report
    assert resumed_s < 10, f"resumed {resumed_s:.1f}s after the kill"


def test_two_agents_under_one_node_name_are_named_and_refused(tmp_path: Path, nats_url: str, victims: Victims) -> None:
    """Both would take the node's commands (found by a new user: cloned hosts share a host name,
    the default node name). `agents` names them; a run refuses before sending anything."""
    agents = [AgentProcess(nats_url, "twin", tmp_path / f"state-{i}", tmp_path / f"twin-{i}.log", []) for i in (1, 2)]
    try:
        for a in agents:
            a.start().wait_ready()
        r = faultline("agents", "--nats", nats_url, "-o", "json")
        (row,) = json.loads(r.stdout)
        assert len(row["duplicate_instances"]) == 2, row
        text = faultline("agents", "--nats", nats_url)
        assert "attention: node twin: 2 agents send heartbeats under this one name" in text.stdout, text.stdout
        victims.start(1)
        path = experiment_file(tmp_path, [pause(victims)], duration="1s")
        dry = faultline("run", str(path), "--nats", nats_url)
        assert dry.returncode == 2, dry.stdout + dry.stderr
        assert "node twin: 2 agents send heartbeats under this one name" in dry.stderr, dry.stderr
        assert "nothing sent" in dry.stderr
    finally:
        for a in agents:
            a.stop()


@pytest.mark.parametrize("command", ["agents", "abort"])
@pytest.mark.parametrize("after_s", [0.05, 0.15, 0.3, 0.6])
def test_a_ctrl_c_while_the_cli_starts_exits_130_without_a_traceback(after_s: float, command: str) -> None:
    """A new user's review: a Ctrl-C while the CLI was still importing printed a traceback from
    whichever import it interrupted (once a pydantic SchemaError). Whenever it lands before a
    run's own handling, the exit is 130 and one line says so; under -o json, stdout has JSON
    (a review: `abort -o json` had none)."""
    script = Path(sys.executable).parent / "faultline"
    extra = ["some-exp-123456"] if command == "abort" else []
    proc = subprocess.Popen(
        # refused: it would retry for seconds
        [str(script), command, *extra, "--nats", "nats://127.0.0.1:1", "-o", "json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    try:
        time.sleep(after_s)  # the point is when the signal lands; nothing to await from outside
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted" in err or "while starting: exited, nothing sent" in err, err
    assert json.loads(out)["outcome"] == "interrupted", out


def test_faultline_alone_prints_its_commands() -> None:
    """A new user's review: `faultline` with no command gave only argparse's "required" error."""
    r = faultline()
    assert r.returncode == 2
    assert "COMMAND" in r.stderr and "demo" in r.stderr and "getting started:" in r.stderr, r.stderr
