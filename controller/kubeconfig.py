"""Credentials for the Kubernetes API: in-cluster service account, or a kubeconfig's current context.

Only what a plain HTTPS client can use: a bearer token (inline or tokenFile),
or a client certificate and key (files or base64 data), a CA (file or data) or
insecure-skip-tls-verify. Exec and auth-provider users (cloud SSO plugins) are
refused with a message; use a service-account token for those clusters.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeconfigError(Exception):
    """No usable credentials; str() is the reason."""


@dataclass(frozen=True)
class ApiCredentials:
    api_url: str
    token: str | None
    ssl_context: ssl.SSLContext


def in_cluster(env: dict[str, str], sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiCredentials:
    host = env.get("KUBERNETES_SERVICE_HOST")
    if not host:
        raise KubeconfigError("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    try:
        token = (sa_dir / "token").read_text().strip()
        context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
    except (OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"in-cluster service account at {sa_dir} is unusable: {exc}") from exc
    return ApiCredentials(api_url=f"https://{host}:{port}", token=token, ssl_context=context)


def _named(entries: Any, name: str, what: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(what), dict):
            return dict(entry[what])
    raise KubeconfigError(f"kubeconfig has no {what} named {name!r}")


def _data_or_file(section: dict[str, Any], key: str, base_dir: Path) -> bytes | None:
    if section.get(f"{key}-data"):
        return base64.b64decode(section[f"{key}-data"])
    if section.get(key):
        return (base_dir / str(section[key])).read_bytes()
    return None


def from_kubeconfig(path: Path, context_name: str | None = None) -> ApiCredentials:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a mapping")
    name = context_name or config.get("current-context")
    if not name:
        raise KubeconfigError(f"kubeconfig {path} has no current-context")
    context = _named(config.get("contexts"), name, "context")
    cluster = _named(config.get("clusters"), str(context.get("cluster")), "cluster")
    user = _named(config.get("users"), str(context.get("user")), "user") if context.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeconfigError(
            f"kubeconfig user of context {name!r} uses an exec/auth-provider plugin, which faultline does not run; "
            "use a token or client certificate"
        )
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeconfigError(f"cluster of context {name!r} has no https server URL")
    base_dir = path.parent
    try:
        ca = _data_or_file(cluster, "certificate-authority", base_dir)
        ssl_context = ssl.create_default_context(cadata=ca.decode() if ca else None)
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        cert = _data_or_file(user, "client-certificate", base_dir)
        key = _data_or_file(user, "client-key", base_dir)
        if cert and key:
            # ssl wants files; they live only until the context has loaded them.
            with tempfile.TemporaryDirectory(prefix="faultline-kube-") as tmp:
                cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert_file.write_bytes(cert)
                key_file.touch(mode=0o600)
                key_file.write_bytes(key)
                ssl_context.load_cert_chain(str(cert_file), str(key_file))
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base_dir / str(user["tokenFile"])).read_text().strip()
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise KubeconfigError(f"kubeconfig context {name!r} is unusable: {exc}") from exc
    return ApiCredentials(api_url=server, token=str(token) if token else None, ssl_context=ssl_context)


def credentials_from_environment(env: dict[str, str]) -> ApiCredentials:
    """In-cluster when KUBERNETES_SERVICE_HOST is set, else the first KUBECONFIG file or ~/.kube/config."""
    if env.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(env)
    paths = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    path = Path(paths[0]) if paths else Path.home() / ".kube" / "config"
    if not path.exists():
        raise KubeconfigError(f"not in a cluster and no kubeconfig at {path}: cannot reach the Kubernetes API")
    return from_kubeconfig(path)
