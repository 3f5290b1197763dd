"""TLS on the control link: real nats-servers with TLS (certificates made here with openssl),
real agent and CLI processes. TLS, once asked for, is never dropped for plaintext."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from controller.dispatch import ConnectError, close, connect
from controller.natsserver import NatsServer
from proto import natstls
from proto.natstls import TlsFiles
from tests.conftest import REPO, AgentProcess, Victims, status, wait_until
from tests.integration.test_cli import cli_env, experiment_file, faultline, pause

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates"),
]


class Certs:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""

    def __init__(self, d: Path) -> None:
        self.d = d
        d.mkdir()
        self.ca, self.ca_key = self._ca("faultline-test-ca")
        self.other_ca, _ = self._ca("some-other-ca")
        self.server, self.server_key = self._leaf("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self.client, self.client_key = self._leaf("client", "clientAuth", "")

    def _run(self, *argv: str) -> None:
        r = subprocess.run(["openssl", *argv], capture_output=True, text=True, timeout=30, cwd=self.d, check=False)
        assert r.returncode == 0, f"openssl {argv[0]} failed: {r.stderr[-1000:]}"

    def _ca(self, name: str) -> tuple[Path, Path]:
        cert, key = self.d / f"{name}.pem", self.d / f"{name}-key.pem"
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return cert, key

    def _leaf(self, name: str, usage: str, san: str) -> tuple[Path, Path]:
        cert, key, csr, ext = (self.d / f"{name}{s}" for s in (".pem", "-key.pem", ".csr", ".ext"))
        ext.write_text(
            f"{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        )
        self._run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certs) -> Callable[..., NatsServer]:
    """Start a nats-server with TLS: ``verify`` asks clients for a certificate, ``optional``
    lets plaintext clients in too (allow_non_tls). Stopped by pid at the end."""
    started: list[NatsServer] = []

    def start(verify: bool = False, optional: bool = False) -> NatsServer:
        d = tmp_path / f"nats-tls-{len(started)}"
        d.mkdir()
        conf = d / "server.conf"
        lines = ["tls {", f'  cert_file: "{certs.server}"', f'  key_file: "{certs.server_key}"']
        if verify:
            lines += [f'  ca_file: "{certs.ca}"', "  verify: true"]
        lines.append("}")
        if optional:
            lines.append("allow_non_tls: true")
        conf.write_text("\n".join(lines) + "\n")
        server = NatsServer(workdir=str(d), monitor_port=-1, extra_args=["-c", str(conf)])
        started.append(server)
        server.start()
        return server

    yield start  # type: ignore[misc]
    for s in started:
        s.stop()


def port_of(server: NatsServer) -> int:
    assert server.url is not None
    return int(server.url.rpartition(":")[2])


def tls_connections(server: NatsServer) -> list[tuple[str, str]]:
    """(client name, TLS version or "") of every client connection, from the server's /connz."""
    ports = json.loads((server.workdir / f"nats-server_{server.pid}.ports").read_text())
    with urllib.request.urlopen(f"{ports['monitoring'][0]}/connz", timeout=5) as r:  # noqa: S310 - loopback
        connz = json.load(r)
    return [(c.get("name", ""), c.get("tls_version", "")) for c in connz.get("connections") or []]


@pytest.fixture
def tls_agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(url: str, node: str, extra: list[str], ready: bool = True) -> AgentProcess:
        state = tmp_path / f"state-{node}"
        state.mkdir()
        agent = AgentProcess(url, node, state, tmp_path / f"agent-{node}.log", extra)
        made.append(agent)
        agent.start()
        if ready:
            agent.wait_ready()
        return agent

    yield make
    for a in made:
        a.stop()


def test_agent_and_cli_run_an_experiment_over_tls(
    tls_server: Callable[..., NatsServer],
    certs: Certs,
    tls_agents: Callable[..., AgentProcess],
    victims: Victims,
    tmp_path: Path,
) -> None:
    server = tls_server()
    url = f"tls://127.0.0.1:{port_of(server)}"
    tls_agents(url, "tls-a", ["--tls-ca", str(certs.ca)])
    # the CLI takes the CA from the environment, as a shell profile or a CI job sets it
    env = cli_env(FAULTLINE_NATS_TLS_CA=str(certs.ca))
    listed = faultline("agents", "--nats", url, "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [a["node"] for a in json.loads(listed.stdout)] == ["tls-a"]
    (victim,) = victims.start(1)
    exp = experiment_file(tmp_path, [pause(victims)], duration="1s", targets={"nodes": ["tls-a"]})
    r = faultline("run", str(exp), "--nats", url, "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["outcome"] == "completed"
    assert report["faults"][0]["measurements"]["hit_pids"] == [victim.pid]
    assert status(victim) != psutil.STATUS_STOPPED
    agent_links = [v for name, v in tls_connections(server) if name.startswith("faultline-agent/")]
    assert agent_links and all(v.startswith("1.") for v in agent_links), f"agent link not TLS: {agent_links}"


def test_a_tls_url_never_talks_plaintext_to_a_server_without_tls(
    nats_server: NatsServer, tls_agents: Callable[..., AgentProcess]
) -> None:
    """A server (or something posing as one) that offers no TLS gets no CONNECT: no credentials,
    no subscription, no command. The CLI says why at once; the agent keeps retrying, never ready."""
    got = bytearray()
    closed = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def fake_server() -> None:
        """Every client: INFO without TLS (and asking for credentials), then whatever it sends,
        until it closes; then the next one (a retry), until the listener is closed."""
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(20)
                info = {"server_id": "X", "version": "2.10.0", "proto": 1, "max_payload": 1048576}
                info["auth_required"] = True
                conn.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        got.extend(chunk)
            closed.set()

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    try:
        port = listener.getsockname()[1]
        r = faultline("agents", "--nats", f"tls://faultline:s3cret@127.0.0.1:{port}", timeout_s=30)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "offers no TLS" in r.stderr and "plaintext" in r.stderr, r.stderr
        assert "s3cret" not in r.stderr
        assert closed.wait(5), "the client did not close the connection"
        assert b"CONNECT" not in got and b"s3cret" not in got, f"sent in plaintext: {bytes(got)!r}"
    finally:
        listener.close()
        t.join(25)

    # the agent: a real plaintext nats-server, a tls:// URL
    assert nats_server.url is not None
    agent = tls_agents(nats_server.url.replace("nats://", "tls://"), "plain-a", [], ready=False)
    wait_until(lambda: "offers no TLS" in agent.log(since_start=True), 15, "the agent to log that TLS is not offered")
    assert agent.proc is not None and agent.proc.poll() is None, "the agent must keep retrying, not exit"
    assert "faultline-agent ready" not in agent.log(since_start=True)


async def test_a_server_that_allows_both_is_upgraded_to_tls(
    tls_server: Callable[..., NatsServer], certs: Certs
) -> None:
    """allow_non_tls: nats-py alone would stay in plaintext on a tls:// URL; faultline upgrades."""
    server = tls_server(optional=True)
    nc = await connect(f"tls://127.0.0.1:{port_of(server)}", name="upgrade-check", tls=TlsFiles(ca=certs.ca))
    try:
        await nc.flush(timeout=5)
        links = dict(tls_connections(server))
        assert links.get("upgrade-check", "").startswith("1."), f"not upgraded to TLS: {links}"
    finally:
        await close(nc)


async def test_certificate_problems_are_named(tls_server: Callable[..., NatsServer], certs: Certs) -> None:
    server = tls_server(verify=True)
    url = f"tls://127.0.0.1:{port_of(server)}"
    with pytest.raises(ConnectError, match="certificate was not accepted .*--tls-ca"):
        await connect(url, tls=TlsFiles(ca=certs.other_ca))
    with pytest.raises(ConnectError, match="TLS handshake failed|certificate"):
        await connect(url, tls=TlsFiles(ca=certs.ca))  # the server wants a client certificate
    nc = await connect(url, tls=TlsFiles(ca=certs.ca, cert=certs.client, key=certs.client_key))
    await close(nc)


def test_mutual_tls_agent_and_cli(
    tls_server: Callable[..., NatsServer], certs: Certs, tls_agents: Callable[..., AgentProcess]
) -> None:
    server = tls_server(verify=True)
    url = f"tls://127.0.0.1:{port_of(server)}"
    client_flags = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client), "--tls-key", str(certs.client_key)]
    tls_agents(url, "mtls-a", client_flags)
    listed = faultline("agents", "--nats", url, "-o", "json", *client_flags)
    assert listed.returncode == 0, listed.stderr
    assert [a["node"] for a in json.loads(listed.stdout)] == ["mtls-a"]
    refused = faultline("agents", "--nats", url, "--tls-ca", str(certs.ca))
    assert refused.returncode == 2 and "TLS handshake failed" in refused.stderr, refused.stderr
    assert "TimeoutError" not in refused.stderr, "a refused certificate is final: no retries until the timeout"


def test_bad_tls_settings_are_exit_2_naming_the_setting(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "nope.pem"
    r = faultline("agents", "--nats", "tls://127.0.0.1:1", "--tls-ca", str(missing))
    assert r.returncode == 2 and f"--tls-ca {missing}" in r.stderr, r.stderr
    r = faultline("agents", "--nats", "tls://127.0.0.1:1", "--tls-cert", str(certs.client))
    assert r.returncode == 2 and "--tls-cert needs --tls-key" in r.stderr, r.stderr
    r = faultline("agents", "--nats", "nats://127.0.0.1:1", env=cli_env(FAULTLINE_NATS_TLS_CA=str(certs.client_key)))
    assert r.returncode == 2 and "FAULTLINE_NATS_TLS_CA" in r.stderr and "not a PEM CA" in r.stderr, r.stderr
    r = faultline("run", str(REPO / "examples" / "kill-sleepers.yaml"), "--tls-ca", str(certs.ca))
    assert r.returncode == 2 and "--nats" in r.stderr and "embedded" in r.stderr, r.stderr
    agent = subprocess.run(
        [sys.executable, "-P", "-m", "agent.main", "--nats", "tls://127.0.0.1:1", "--tls-ca", str(missing),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip
    assert agent.returncode == 2, agent.stderr
    assert "nats.tls_ca (--tls-ca, FAULTLINE_NATS_TLS_CA)" in agent.stderr and str(missing) in agent.stderr


def test_an_agent_never_reconnects_in_plaintext(
    tls_server: Callable[..., NatsServer], certs: Certs, tls_agents: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Connected over TLS; the server goes, and a server without TLS comes up on the same
    address (a misconfigured redeploy, or someone posing as it): the agent never reconnects to it."""
    server = tls_server()
    port = port_of(server)
    agent = tls_agents(f"tls://127.0.0.1:{port}", "recon-a", ["--tls-ca", str(certs.ca)])
    server.stop()
    (tmp_path / "plain").mkdir()
    plain = NatsServer(port=port, workdir=str(tmp_path / "plain"), monitor_port=-1)
    plain.start()
    try:
        wait_until(
            lambda: "offers no TLS" in agent.log(since_start=True),
            15,
            "the agent to refuse the plaintext server on reconnect",
        )
        assert not [name for name, _ in tls_connections(plain) if name.startswith("faultline-agent/")]
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        plain.stop()


def test_the_given_ca_is_the_only_one_trusted_and_rotated_files_are_read_again(certs: Certs, tmp_path: Path) -> None:
    ctx = TlsFiles(ca=certs.ca).context(["tls://127.0.0.1:4222"])
    assert ctx is not None and ctx.cert_store_stats()["x509_ca"] == 1
    ca = tmp_path / "ca.pem"
    shutil.copy(certs.ca, ca)
    files = TlsFiles(ca=ca)
    nc = natstls.client(True, files, ["tls://127.0.0.1:4222"])
    nc._reload_tls()
    assert "tls" not in nc.options, "unchanged files: nothing read again"
    shutil.copy(certs.other_ca, ca)
    os.utime(ca, (time.time() + 5, time.time() + 5))
    nc._reload_tls()
    assert nc.options["tls"] is not None and nc.options["tls"] is not ctx
    ca.write_text("half-written")
    os.utime(ca, (time.time() + 10, time.time() + 10))
    before = nc.options["tls"]
    nc._reload_tls()
    assert nc.options["tls"] is before, "a file that cannot be used keeps the context that worked"
