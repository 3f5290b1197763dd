"""faultline-agent as a new user meets it: what it says while NATS is away, config-file errors,
durations in the file, FAULTLINE_LABELS, and a second agent on a busy state directory."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import runtime as runtime_module
from agent.config import AgentSettings, SettingsInvalid
from agent.main import build_parser, load_settings
from agent.runtime import AgentRuntime
from proto.statelock import StateLock
from tests.conftest import async_wait_until


def _settings(tmp_path: Path, **nats: object) -> AgentSettings:
    return AgentSettings.model_validate({"state_dir": str(tmp_path), "identity": {"node": "n"}, "nats": nats})


def _load(tmp_path: Path, text: str, *flags: str, environ: dict[str, str] | None = None) -> AgentSettings:
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    return load_settings(build_parser().parse_args(["--config", str(config), *flags]), environ or {})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there now: every connect is refused


# --- 1. an agent that cannot reach NATS keeps saying so -------------------------------------


async def test_an_agent_that_cannot_reach_nats_says_so_periodically_with_how_long_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, one WARNING and then silence: a retrying agent looked like one that had given up."""
    monkeypatch.setattr(runtime_module, "NATS_UNREACHABLE_REPEAT_S", 0.4)
    url = f"nats://agent:s3cret@127.0.0.1:{_closed_port()}"
    rt = AgentRuntime(_settings(tmp_path, urls=[url], reconnect_wait_s=0.05))
    caplog.set_level(logging.WARNING, logger="faultline.agent")
    connecting = asyncio.create_task(rt.connect(), name="test-connect")
    try:
        await async_wait_until(
            lambda: sum("still cannot reach NATS" in r.getMessage() for r in caplog.records) >= 2, 10, "two reports"
        )
    finally:
        rt.stop_event.set()
        assert await asyncio.wait_for(connecting, 5) is False
    still = [r.getMessage() for r in caplog.records if "still cannot reach NATS" in r.getMessage()]
    assert still[0].startswith(f"still cannot reach NATS at nats://***@127.0.0.1:{url.rsplit(':', 1)[1]} after ")
    assert "(last error: [Errno 111] Connect" in still[0] and "retrying" in still[0], still
    # bounded: one per period, not one per attempt (an attempt every 0.05 s)
    assert len(still) <= 4, still
    assert not any("s3cret" in r.getMessage() for r in caplog.records)


async def test_the_periodic_report_is_quiet_while_connected_and_counts_from_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = AgentRuntime(_settings(tmp_path))
    caplog.set_level(logging.WARNING, logger="faultline.agent")
    rt.nats_lost_since = time.monotonic() - 25
    await rt._on_error(ConnectionRefusedError(111, "Connection refused"))
    await rt._on_error(ConnectionRefusedError(111, "Connection refused"))  # within the period: not again
    still = [r.getMessage() for r in caplog.records if "still cannot" in r.getMessage()]
    assert len(still) == 1 and " after 25s " in still[0], still
    caplog.clear()
    rt.connected, rt.nats_lost_since = True, None
    await rt._on_error(OSError("nats: permissions violation"))  # an error on a live connection
    assert not any("still cannot" in r.getMessage() for r in caplog.records)


# --- 2. config-file errors name the file ----------------------------------------------------


def test_a_config_file_error_names_the_file_and_the_setting_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("identity:\n  nodee: worker-1\n")
    argv = [sys.executable, "-P", "-m", "agent.main", "--config", str(config), "--state-dir", str(tmp_path)]
    out = subprocess.run([*argv, "--print-config"], capture_output=True, text=True, timeout=30, cwd=Path.cwd())
    assert out.returncode == 2, out.stderr
    assert (
        f"faultline-agent: invalid settings: --config {config}: identity.nodee: not a setting "
        "(identity takes: node, labels)"
    ) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_only_errors_in_values_from_the_file_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsInvalid) as caught:
        _load(tmp_path, "http_addr: nonsense\nsafety:\n  exempt: ['10.0.0.0/99']\n", "--node", "")
    lines = caught.value.lines
    assert any(line.startswith(f"--config {tmp_path / 'agent.yaml'}: http_addr: ") for line in lines), lines
    assert any(line.startswith(f"--config {tmp_path / 'agent.yaml'}: safety.exempt: ") for line in lines), lines
    assert any(line.startswith("identity.node: name ''") for line in lines), lines  # --node's, not the file's


def test_a_group_the_file_gives_as_a_scalar_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Before: TypeError ('int' object does not support item assignment) once FAULTLINE_NODE was set;
    and 'deny: sshd' with a --deny flag became the list ['s', 's', 'h', 'd', ...]."""
    with pytest.raises(SettingsInvalid, match=r"agent.yaml: identity: expected a mapping"):
        _load(tmp_path, "identity: 5\n", environ={"FAULTLINE_NODE": "x"})
    with pytest.raises(SettingsInvalid, match=r"agent.yaml: safety.deny: expected a list"):
        _load(tmp_path, "safety:\n  deny: sshd\n", "--deny", "x")


# --- 3. durations in the file as the flag takes them ----------------------------------------


def test_duration_settings_in_the_file_take_units_and_plain_numbers(tmp_path: Path) -> None:
    text = (
        "timing:\n  heartbeat_interval_s: 1s\n  stop_timeout_s: 1m30s\n  revert_timeout_s: 7\n"
        "  nats_lost_timeout_s: '12.5'\n"
        "nats:\n  reconnect_wait_s: 250ms\n  connect_timeout_s: 3.5\n"
    )
    s = _load(tmp_path, text)
    assert (s.timing.heartbeat_interval_s, s.timing.stop_timeout_s, s.timing.revert_timeout_s) == (1.0, 90.0, 7.0)
    assert s.timing.nats_lost_timeout_s == 12.5
    assert (s.nats.reconnect_wait_s, s.nats.connect_timeout_s) == (0.25, 3.5)
    with pytest.raises(SettingsInvalid, match=r"agent.yaml: timing.heartbeat_interval_s: Input should be less than"):
        _load(tmp_path, "timing:\n  heartbeat_interval_s: 2m\n")
    with pytest.raises(SettingsInvalid, match=r"agent.yaml: timing.stop_timeout_s: invalid duration '1x'"):
        _load(tmp_path, "timing:\n  stop_timeout_s: 1x\n")


# --- 4. FAULTLINE_LABELS --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["zone=a,region=r1", "zone=a region=r1", "zone=a, region=r1", " zone=a\tregion=r1 "])
def test_labels_are_pairs_separated_by_commas_or_spaces(tmp_path: Path, value: str) -> None:
    """Before, 'zone=a region=r1' silently became zone='a region=r1', which no selector matches."""
    s = load_settings(build_parser().parse_args(["--state-dir", str(tmp_path)]), {"FAULTLINE_LABELS": value})
    assert s.identity.labels == {"zone": "a", "region": "r1"}


def test_a_label_value_with_a_space_is_refused_naming_the_variable(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--state-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"^FAULTLINE_LABELS 'zone=my zone': 'zone' is not KEY=VALUE; expected"):
        load_settings(args, {"FAULTLINE_LABELS": "zone=my zone"})


def test_help_documents_the_labels_format() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "FAULTLINE_LABELS holds KEY=VALUE pairs separated by commas or spaces" in text
    assert "FAULTLINE_LABELS=zone=a,region=r1" in text


# --- 6. a second agent on a busy state directory says how long it will wait -----------------


async def test_a_second_agent_says_how_long_it_waits_for_the_state_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = AgentSettings.model_validate(
        {"state_dir": str(tmp_path), "identity": {"node": "n"}, "timing": {"stop_timeout_s": 1.5}}
    )
    holder = StateLock(tmp_path)
    assert holder.try_acquire()
    rt = AgentRuntime(settings)
    caplog.set_level(logging.WARNING, logger="faultline.agent")
    running = asyncio.create_task(rt.run(), name="test-second-agent")
    try:
        await async_wait_until(lambda: "held by another" in caplog.text, 5, "the second agent to wait")
    finally:
        rt.stop_event.set()
        assert await asyncio.wait_for(running, 5) == 0
        holder.release()
    assert "waiting up to 6.5s (timing.stop_timeout_s + 5) for it to stop, then exiting 2" in caplog.text


# --- 5. --print-config masks the password, not the user -------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://agent:s3cret@nats:4222", "nats://agent:***@nats:4222"),
        ("tls://agent:p@ss@nats:4222", "tls://agent:***@nats:4222"),  # to the last '@', as nats-py splits
        ("nats://s3cret-token@nats:4222", "nats://***@nats:4222"),  # a bare token is all secret
        ("nats://nats:4222", "nats://nats:4222"),
    ],
)
def test_print_config_masks_only_the_password_of_a_nats_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, shown: str
) -> None:
    """Before, nats://agent:s3cret@ printed as nats://***@: the printed starting point lost the user."""
    import yaml

    from agent.main import print_config

    print_config(load_settings(build_parser().parse_args(["--nats", url, "--state-dir", str(tmp_path)]), {}))
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["nats"]["urls"] == [shown]
    assert "s3cret" not in text and "p@ss" not in text
