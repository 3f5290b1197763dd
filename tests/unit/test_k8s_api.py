"""agent/k8s.py and controller/k8s.py against a fake Kubernetes API over real HTTPS on loopback.

The certificate is made in the test: with the `cryptography` package when it
is installed, else with `openssl req`; the test skips when neither exists.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.k8s import KubernetesError as AgentKubernetesError
from agent.k8s import NotInCluster, fetch_node_labels, in_cluster_api_url
from controller.k8s import KubernetesError, pods_by_node, resolve_pods, strip_runtime_prefix
from controller.kubeconfig import ApiCredentials, KubeconfigError, from_kubeconfig

TOKEN = "test-token-abc"


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor openssl is available to make a test certificate")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
            + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@dataclass
class FakeApi:
    url: str
    ca_file: Path
    routes: dict[str, tuple[int, Any]] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApi]:
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    fake = FakeApi(url="", ca_file=cert)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
            request_line, *header_lines = head.strip().split("\r\n")
            target = request_line.split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
            fake.seen.append((target, headers))
            status, body = fake.routes.get(target, (404, {"kind": "Status", "message": f"{target} not found"}))
            if headers.get("authorization") != f"Bearer {TOKEN}":
                status, body = 401, {"kind": "Status", "message": "Unauthorized"}
            payload = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    fake.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield fake
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


# --- agent: node labels

NODE_LABELS = {
    "topology.kubernetes.io/zone": "eu-west-1a",
    "topology.kubernetes.io/region": "eu-west-1",
    "kubernetes.io/hostname": "ip-10-0-0-1.eu-west-1.compute.internal",
}


async def test_fetch_node_labels(api: FakeApi, token_file: Path) -> None:
    node = "ip-10-0-0-1.eu-west-1.compute.internal"
    api.routes[f"/api/v1/nodes/{node}"] = (200, {"kind": "Node", "metadata": {"name": node, "labels": NODE_LABELS}})
    labels = await fetch_node_labels(node, api_url=api.url, token_file=token_file, ca_file=api.ca_file)
    assert labels == NODE_LABELS
    target, headers = api.seen[-1]
    assert target == f"/api/v1/nodes/{node}"
    assert headers["authorization"] == f"Bearer {TOKEN}"


async def test_fetch_node_labels_reports_api_reason(api: FakeApi, token_file: Path) -> None:
    api.routes["/api/v1/nodes/n1"] = (403, {"kind": "Status", "message": 'nodes "n1" is forbidden'})
    with pytest.raises(AgentKubernetesError, match=r'HTTP 403 nodes "n1" is forbidden'):
        await fetch_node_labels("n1", api_url=api.url, token_file=token_file, ca_file=api.ca_file)
    with pytest.raises(AgentKubernetesError, match="HTTP 404"):
        await fetch_node_labels("missing", api_url=api.url, token_file=token_file, ca_file=api.ca_file)


async def test_fetch_node_labels_refuses_untrusted_certificate(api: FakeApi, token_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _ = make_cert(other)
    with pytest.raises(AgentKubernetesError, match="cannot reach"):
        await fetch_node_labels("n1", api_url=api.url, token_file=token_file, ca_file=other_ca)
    assert api.seen == []  # the token never left the client


async def test_fetch_node_labels_without_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(NotInCluster, match="KUBERNETES_SERVICE_HOST"):
        await fetch_node_labels("n1", token_file=tmp_path / "none", ca_file=tmp_path / "none")
    with pytest.raises(NotInCluster, match="token"):
        await fetch_node_labels("n1", api_url="https://127.0.0.1:1", token_file=tmp_path / "none")


def test_in_cluster_api_url() -> None:
    assert in_cluster_api_url({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) == "https://10.96.0.1:443"
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster_api_url(env) == "https://[fd00::1]:6443"


# --- controller: pods


def pod(name: str, node: str | None, phase: str, ids: list[str], **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}", **meta},
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": f"c{i}", "containerID": c} for i, c in enumerate(ids)],
        },
    }


POD_LIST = {
    "kind": "PodList",
    "items": [
        pod("redis-1", "node-b", "Running", ["containerd://aaa", "cri-o://bbb"]),
        pod("redis-0", "node-a", "Running", ["docker://ccc"]),
        pod("redis-2", "node-a", "Pending", []),
        pod("redis-3", None, "Pending", []),
        pod("redis-4", "node-a", "Running", ["containerd://ddd"], deletionTimestamp="2026-01-01T00:00:00Z"),
        pod("redis-5", "node-b", "Succeeded", ["containerd://eee"]),
    ],
}
PODS_PATH = "/api/v1/namespaces/shop/pods?labelSelector=app%3Dredis%2Ctier%3Dcache"


def credentials(api: FakeApi) -> ApiCredentials:
    return ApiCredentials(api_url=api.url, token=TOKEN, ssl_context=ssl.create_default_context(cafile=str(api.ca_file)))


async def test_resolve_pods_running_only(api: FakeApi) -> None:
    api.routes[PODS_PATH] = (200, POD_LIST)
    pods = await resolve_pods(
        "shop", {"tier": "cache", "app": "redis"}, require_opt_in=False, credentials=credentials(api)
    )
    assert [(p.node, p.pod.name, p.pod.uid, p.pod.container_ids) for p in pods] == [
        ("node-a", "redis-0", "uid-redis-0", ["ccc"]),
        ("node-b", "redis-1", "uid-redis-1", ["aaa", "bbb"]),
    ]
    assert {node: [p.name for p in refs] for node, refs in pods_by_node(pods).items()} == {
        "node-a": ["redis-0"],
        "node-b": ["redis-1"],
    }
    assert api.seen[-1][1]["authorization"] == f"Bearer {TOKEN}"


async def test_resolve_pods_opt_in(api: FakeApi) -> None:
    api.routes[PODS_PATH] = (200, POD_LIST)
    api.routes["/api/v1/namespaces/shop"] = (200, {"kind": "Namespace", "metadata": {"name": "shop", "labels": {}}})
    with pytest.raises(KubernetesError, match="faultline.io/targetable=true"):
        await resolve_pods("shop", {"app": "redis", "tier": "cache"}, credentials=credentials(api))
    assert all(not target.startswith(PODS_PATH) for target, _ in api.seen)  # refused before listing
    api.routes["/api/v1/namespaces/shop"] = (
        200,
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"faultline.io/targetable": "true"}}},
    )
    pods = await resolve_pods("shop", {"app": "redis", "tier": "cache"}, credentials=credentials(api))
    assert [p.pod.name for p in pods] == ["redis-0", "redis-1"]


async def test_resolve_pods_errors(api: FakeApi) -> None:
    with pytest.raises(KubernetesError, match="HTTP 404"):
        await resolve_pods("nowhere", {}, require_opt_in=False, credentials=credentials(api))
    api.routes["/api/v1/namespaces/shop/pods"] = (200, {"kind": "PodList"})
    with pytest.raises(KubernetesError, match="no items"):
        await resolve_pods("shop", {}, require_opt_in=False, credentials=credentials(api))


async def test_resolve_pods_through_kubeconfig(api: FakeApi, tmp_path: Path) -> None:
    api.routes[PODS_PATH] = (200, POD_LIST)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": api.url,
                            "certificate-authority-data": base64.b64encode(api.ca_file.read_bytes()).decode(),
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": TOKEN}}],
            }
        )
    )
    creds = from_kubeconfig(kubeconfig)
    pods = await resolve_pods("shop", {"app": "redis", "tier": "cache"}, require_opt_in=False, credentials=creds)
    assert len(pods) == 2


def test_kubeconfig_refuses_exec_plugins(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "eks",
                "contexts": [{"name": "eks", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": "https://example.invalid"}}],
                "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
            }
        )
    )
    with pytest.raises(KubeconfigError, match="exec/auth-provider"):
        from_kubeconfig(kubeconfig)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("containerd://abc", "abc"), ("cri-o://abc", "abc"), ("docker://abc", "abc"), ("abc", "abc")],
)
def test_strip_runtime_prefix(raw: str, expected: str) -> None:
    assert strip_runtime_prefix(raw) == expected
