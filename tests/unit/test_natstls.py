"""TLS settings for the control link (proto/natstls.py) and the agent's NATS error log: unit level.
The real handshakes, against real TLS nats-servers, are in tests/integration/test_nats_tls.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.config import AgentSettings
from agent.runtime import AgentRuntime
from proto.natstls import TlsFiles, TlsSettingsError, from_env


def test_tls_is_wanted_for_a_tls_url_or_any_file() -> None:
    assert not TlsFiles().wanted(["nats://h:4222"])
    assert TlsFiles().context(["nats://h:4222"]) is None
    assert TlsFiles().wanted(["nats://a:1", "tls://b:2"])
    assert TlsFiles(ca=Path("/x")).wanted(["nats://h:4222"])
    assert TlsFiles().context(["tls://h:4222"]) is not None  # the system's CAs


def test_bad_tls_settings_name_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsSettingsError, match=rf"--tls-ca {missing}: No such file"):
        TlsFiles(ca=missing).context(["tls://h:1"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsSettingsError, match="--tls-ca .*not a PEM CA certificate bundle"):
        TlsFiles(ca=garbage).context(["tls://h:1"])
    with pytest.raises(TlsSettingsError, match="--tls-cert needs --tls-key"):
        TlsFiles(cert=garbage).context(["tls://h:1"])
    with pytest.raises(TlsSettingsError, match="--tls-key needs --tls-cert"):
        TlsFiles(key=garbage).context(["tls://h:1"])
    with pytest.raises(TlsSettingsError, match="not a PEM certificate and its matching private key"):
        TlsFiles(cert=garbage, key=garbage).context(["tls://h:1"])


def test_tls_settings_with_a_plaintext_websocket_url_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TlsSettingsError, match="ws:// is plaintext"):
        TlsFiles(ca=tmp_path / "ca.pem").context(["ws://h:8080"])


def test_flags_win_over_the_environment_and_errors_name_the_variable(tmp_path: Path) -> None:
    env = {"FAULTLINE_NATS_TLS_CA": str(tmp_path / "env-ca.pem"), "FAULTLINE_NATS_TLS_CERT": "c.pem"}
    files = from_env(env, ca=tmp_path / "flag-ca.pem")
    assert files.ca == tmp_path / "flag-ca.pem" and files.ca_from == "--tls-ca"
    assert files.cert == Path("c.pem") and files.cert_from == "FAULTLINE_NATS_TLS_CERT"
    with pytest.raises(TlsSettingsError, match="FAULTLINE_NATS_TLS_CERT needs --tls-key"):
        files.context(["nats://h:1"])
    assert not from_env({}).given


def test_agent_settings_carry_tls_files_and_name_them(tmp_path: Path) -> None:
    s = AgentSettings(state_dir=tmp_path, nats={"urls": ["tls://h:4222"], "tls_ca": str(tmp_path / "none.pem")})
    with pytest.raises(TlsSettingsError, match=r"nats.tls_ca \(--tls-ca, FAULTLINE_NATS_TLS_CA\)"):
        s.nats.tls().context(s.nats.urls)


async def test_a_nats_error_that_keeps_coming_is_logged_once_then_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = AgentRuntime(AgentSettings(state_dir=tmp_path, identity={"node": "n"}))
    caplog.set_level(logging.WARNING, logger="faultline.agent")
    for _ in range(5):
        await rt._on_error(ConnectionRefusedError(111, "Connection refused"))
    await rt._on_error(OSError("something else"))
    lines = [r.getMessage() for r in caplog.records]
    at = "NATS (nats://127.0.0.1:4222)"
    assert lines == [f"{at}: [Errno 111] Connection refused", f"{at}: something else"], lines
    caplog.clear()
    await rt._on_error(OSError("something else"))  # again, within the minute: counted, not logged
    monkeypatch.setattr("agent.runtime.NATS_ERROR_REPEAT_S", 0.0)
    await rt._on_error(OSError("something else"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{at}: something else (and 1 more time(s) since the last report)"
    ]
