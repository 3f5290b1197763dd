"""Resolve ``targets.pods: {namespace, labels}`` to pods on nodes, through the Kubernetes API.

The controller lists the Running pods that match and hands each node's agent
the pods on that node as ``proto.messages.PodRef`` (namespace, name, uid,
container ids without the runtime prefix).

Opt-in: by default a namespace must carry the label
``faultline.io/targetable=true``, or the experiment is refused with that reason
(``require_opt_in=False`` turns the check off, e.g. for a test cluster).

Plain HTTPS with the standard library (same reasoning as agent/k8s.py, which
we may not import: agent and controller share only proto/): two GETs do not
justify the official client's dependency tree. Credentials come from an
explicit API URL and token, else the in-cluster service account, else the
current context of a kubeconfig (token or client-certificate users; exec and
auth-provider plugins are not supported and say so).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from proto.messages import PodRef

from .kubeconfig import ApiCredentials, KubeconfigError, credentials_from_environment

TARGETABLE_LABEL = "faultline.io/targetable"
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""A pod list of a few thousand pods; past this the answer is refused."""


class KubernetesError(Exception):
    """The API could not be asked, refused, or the target cannot be used; str() is the reason."""


@dataclass(frozen=True)
class ResolvedPod:
    node: str
    """spec.nodeName: the raw node name (make it subject-safe with proto.subjects.safe_token)."""
    pod: PodRef


def strip_runtime_prefix(container_id: str) -> str:
    """'containerd://abc' -> 'abc' (also cri-o://, docker://); a bare id stays as is."""
    return container_id.split("://", 1)[1] if "://" in container_id else container_id


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _get_json(url: str, creds: ApiCredentials, timeout_s: float) -> Any:
    headers = {"Accept": "application/json"}
    if creds.token:
        headers["Authorization"] = f"Bearer {creds.token}"
    request = urllib.request.Request(url, headers=headers, method="GET")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=creds.ssl_context)
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise KubernetesError(f"GET {urllib.parse.urlsplit(url).path}: HTTP {exc.code} {_status_message(exc)}") from exc
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        raise KubernetesError(
            f"cannot reach the Kubernetes API at {creds.api_url}: {getattr(exc, 'reason', exc)}"
        ) from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise KubernetesError(f"answer from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise KubernetesError(f"answer from {url} is not JSON: {exc}") from exc


def _status_message(exc: urllib.error.HTTPError) -> str:
    try:
        status = json.loads(exc.read(64 * 1024))
        return str(status.get("message", "")) if isinstance(status, dict) else ""
    except (ValueError, OSError):
        return str(exc.reason or "")


async def _get(creds: ApiCredentials, path: str, query: dict[str, str], timeout_s: float) -> Any:
    url = creds.api_url.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        return await asyncio.wait_for(asyncio.to_thread(_get_json, url, creds, timeout_s), timeout_s + 1.0)
    except TimeoutError as exc:
        raise KubernetesError(f"no answer from the Kubernetes API within {timeout_s} s ({path})") from exc


def _pod_from_item(item: Any) -> ResolvedPod | None:
    """A Running, scheduled pod as ResolvedPod; anything else None."""
    if not isinstance(item, dict):
        return None
    meta, spec, status = item.get("metadata") or {}, item.get("spec") or {}, item.get("status") or {}
    node = spec.get("nodeName")
    if status.get("phase") != "Running" or not node or meta.get("deletionTimestamp"):
        # Terminating pods are left out: their containers are going away under the fault.
        return None
    container_ids = [
        strip_runtime_prefix(cs["containerID"])
        for cs in status.get("containerStatuses") or []
        if isinstance(cs, dict) and cs.get("containerID")
    ]
    return ResolvedPod(
        node=str(node),
        pod=PodRef(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            container_ids=container_ids,
        ),
    )


async def resolve_pods(
    namespace: str,
    labels: dict[str, str],
    *,
    require_opt_in: bool = True,
    timeout_s: float = 10.0,
    credentials: ApiCredentials | None = None,
    api_url: str | None = None,
    token: str | None = None,
) -> list[ResolvedPod]:
    """The Running pods in ``namespace`` matching every label in ``labels``, sorted by node then name.

    Credentials: ``credentials`` if given; else ``api_url`` (+ ``token``) with the
    system trust store; else the in-cluster service account, else KUBECONFIG /
    ~/.kube/config. Raises KubernetesError with the reason (namespace not opted
    in, forbidden, unreachable, malformed answer).
    """
    if not namespace:
        raise KubernetesError("targets.pods.namespace is empty")
    if credentials is None:
        if api_url is not None:
            credentials = ApiCredentials(api_url=api_url, token=token, ssl_context=ssl.create_default_context())
        else:
            try:
                credentials = credentials_from_environment(dict(os.environ))
            except KubeconfigError as exc:
                raise KubernetesError(str(exc)) from exc
    ns_path = f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
    if require_opt_in:
        ns_obj = await _get(credentials, ns_path, {}, timeout_s)
        ns_labels = (ns_obj.get("metadata") or {}).get("labels") or {} if isinstance(ns_obj, dict) else {}
        if ns_labels.get(TARGETABLE_LABEL) != "true":
            raise KubernetesError(
                f"namespace {namespace!r} has not opted in to pod targeting: "
                f"label it {TARGETABLE_LABEL}=true (kubectl label namespace {namespace} {TARGETABLE_LABEL}=true)"
            )
    query = {"labelSelector": label_selector(labels)} if labels else {}
    answer = await _get(credentials, ns_path + "/pods", query, timeout_s)
    items = answer.get("items") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise KubernetesError(f"pod list of namespace {namespace!r}: answer has no items list")
    pods = [pod for pod in map(_pod_from_item, items) if pod is not None and pod.pod.uid]
    return sorted(pods, key=lambda p: (p.node, p.pod.name))


def pods_by_node(pods: list[ResolvedPod]) -> dict[str, list[PodRef]]:
    """Group resolved pods per raw node name: what each node's Inject carries in ``pods``."""
    grouped: dict[str, list[PodRef]] = {}
    for resolved in pods:
        grouped.setdefault(resolved.node, []).append(resolved.pod)
    return grouped
