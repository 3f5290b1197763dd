"""Read this node's labels from the Kubernetes API (in-cluster service account).

At start, with ``--kubernetes-labels``, the agent fetches its own Node object
once and puts its labels (topology.kubernetes.io/zone, region, instance type,
...) into heartbeats, so experiments can target "a zone" or "a region".

Plain HTTPS with the standard library, not the ``kubernetes`` client: the agent
makes one GET at start; the official client would add ~10 dependencies and
tens of MB of RSS to a daemon on every node, and the lighter async clients
still pull a large tree. The surface we need is small and stable: the service
account token and CA at /var/run/secrets/kubernetes.io/serviceaccount/,
KUBERNETES_SERVICE_HOST/PORT, and ``GET /api/v1/nodes/<name>``.

The request runs in a worker thread (urllib) with a socket timeout, wrapped in
an asyncio timeout. Environment proxies are ignored: the API server is always
reached directly from inside the cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""A Node object is a few kB; anything past this is refused."""


class KubernetesError(Exception):
    """The API could not be asked or refused; str() is the reason."""


class NotInCluster(KubernetesError):
    """No in-cluster configuration: KUBERNETES_SERVICE_HOST or the service-account files are missing."""


def in_cluster_api_url(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    host = env.get("KUBERNETES_SERVICE_HOST")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise NotInCluster("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 service address
    return f"https://{host}:{port}"


def _read_token(token_file: Path) -> str:
    # Bound service-account tokens rotate (about hourly): read the file at each call.
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise NotInCluster(f"cannot read the service-account token {token_file}: {exc.strerror}") from exc
    if not token:
        raise NotInCluster(f"service-account token {token_file} is empty")
    return token


def _ssl_context(ca_file: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise NotInCluster(f"cannot load the cluster CA {ca_file}: {exc}") from exc


def _get_json(url: str, token: str, context: ssl.SSLContext, timeout_s: float) -> Any:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}, method="GET"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = _status_message(exc)
        raise KubernetesError(f"GET {urllib.parse.urlsplit(url).path}: HTTP {exc.code} {detail}".rstrip()) from exc
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KubernetesError(f"cannot reach the Kubernetes API at {url}: {reason}") from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise KubernetesError(f"answer from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise KubernetesError(f"answer from {url} is not JSON: {exc}") from exc


def _status_message(exc: urllib.error.HTTPError) -> str:
    """The API's own reason from a Status object (e.g. 'nodes "x" is forbidden: ...')."""
    try:
        status = json.loads(exc.read(64 * 1024))
        return str(status.get("message", "")) if isinstance(status, dict) else ""
    except (ValueError, OSError):
        return str(exc.reason or "")


async def fetch_node_labels(
    node_name: str,
    *,
    timeout_s: float = 5.0,
    api_url: str | None = None,
    token_file: Path = SERVICE_ACCOUNT_DIR / "token",
    ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt",
) -> dict[str, str]:
    """The labels of Node ``node_name`` (the raw spec.nodeName, not the subject-safe token).

    ``api_url`` defaults to the in-cluster address from KUBERNETES_SERVICE_HOST/PORT.
    Raises NotInCluster when there is no in-cluster configuration, KubernetesError
    for any other failure (unreachable, forbidden, not found, malformed answer).
    """
    if not node_name:
        raise KubernetesError("node name is empty")
    base = api_url or in_cluster_api_url()
    token = _read_token(token_file)
    context = _ssl_context(ca_file)
    url = f"{base.rstrip('/')}/api/v1/nodes/{urllib.parse.quote(node_name, safe='')}"
    try:
        node = await asyncio.wait_for(asyncio.to_thread(_get_json, url, token, context, timeout_s), timeout_s + 1.0)
    except TimeoutError as exc:
        raise KubernetesError(f"no answer from the Kubernetes API within {timeout_s} s") from exc
    labels = node.get("metadata", {}).get("labels", {}) if isinstance(node, dict) else None
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise KubernetesError(f"Node {node_name!r}: answer has no metadata.labels string map")
    return dict(labels)
