"""Find a Kubernetes pod on this node from its UID: its processes, its cgroup, its network namespace.

The kubelet names every pod's cgroup after the pod UID, whatever the runtime:

  systemd driver   kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
                   cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
  cgroupfs driver  kubepods/burstable/pod<uid>/<id>        (guaranteed pods: kubepods/pod<uid>/...)

so a process belongs to the pod when a component of a line of /proc/<pid>/cgroup
is ``pod<uid>`` (dashes or underscores, optionally ``.slice``, optionally after a
``kubepods-<class>-`` prefix). That holds for cgroup v1 (one line per hierarchy)
and v2 (``0::/...``), and also when the agent sits in its own cgroup namespace,
where paths start with ``/..``: the pod's component is still in them.

Left out: cri-o's ``crio-conmon-<id>.scope`` monitors (they may live in the pod
slice but are runtime, not workload) and, unless asked, the pause (sandbox)
process, whose death would restart the whole pod.

Paths are overridable for tests. The proc root defaults to $FAULTLINE_PROC_ROOT
or /proc (the DaemonSet mounts the node's /proc read-only at /host/proc).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_NETNS_DIR = Path("/run/netns")
_WALK_MAX_DEPTH = 7
_WALK_MAX_DIRS = 50_000
_UID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Preference when the same pod path shows in several hierarchies: the ones stressors use.
_PREFERRED = ("cpu", "memory", "")


class PodNotFound(Exception):
    """The pod is not on this node (no process, no cgroup); str() is the reason."""


def default_proc_root() -> Path:
    return Path(os.environ.get("FAULTLINE_PROC_ROOT", "/proc"))


def _check_uid(pod_uid: str) -> str:
    if not _UID_RE.match(pod_uid):
        raise ValueError(f"pod uid {pod_uid!r} is not a Kubernetes UID")
    return pod_uid.lower()


def _is_pod_component(component: str, uid: str) -> bool:
    name = component.removesuffix(".slice").lower()
    for form in (uid, uid.replace("-", "_")):
        if name == f"pod{form}" or name.endswith(f"-pod{form}"):
            return True
    return False


def _container_of(component: str) -> str | None:
    """Container id from a container-level component ('cri-containerd-<id>.scope' -> '<id>')."""
    name = component.removesuffix(".scope")
    if name.startswith("crio-conmon-"):
        return None
    for prefix in ("cri-containerd-", "crio-", "docker-", "containerd-"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass(frozen=True)
class _Membership:
    controllers: str
    """'cpu,cpuacct', 'memory', ... for v1; '' for v2."""
    pod_path: str
    """Pod-level path from the line, as seen from the reader's cgroup namespace."""
    container: str | None
    """Container id below the pod level, or None (pod level itself, or conmon)."""
    conmon: bool


def _memberships(cgroup_text: str, uid: str) -> Iterator[_Membership]:
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        components = [c for c in parts[2].split("/") if c]
        for index, component in enumerate(components):
            if _is_pod_component(component, uid):
                rest = components[index + 1 :]
                yield _Membership(
                    controllers=parts[1],
                    pod_path="/".join(components[: index + 1]),
                    container=_container_of(rest[0]) if rest else None,
                    conmon=bool(rest) and rest[0].startswith("crio-conmon-"),
                )
                break


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # the process exited, or is not ours to read
        return None


def _pod_processes(uid: str, proc_root: Path) -> Iterator[tuple[int, list[_Membership]]]:
    try:
        entries = list(os.scandir(proc_root))
    except OSError as exc:
        raise PodNotFound(f"cannot list {proc_root}: {exc.strerror}") from exc
    for entry in entries:
        if not entry.name.isdigit():
            continue
        text = _read(proc_root / entry.name / "cgroup")
        if text is None:
            continue
        found = list(_memberships(text, uid))
        if found:
            yield int(entry.name), found


def _is_pause(pid: int, proc_root: Path) -> bool:
    comm = _read(proc_root / str(pid) / "comm")
    return comm is not None and comm.strip() == "pause"


def pod_pids(
    pod_uid: str,
    *,
    container_ids: Collection[str] | None = None,
    include_pause: bool = False,
    proc_root: Path | None = None,
) -> set[int]:
    """Pids of the pod's processes on this node (empty set: none found).

    ``container_ids`` (from PodRef.container_ids, runtime prefix stripped) narrows
    the answer to those containers. The pause process is left out unless asked.
    """
    uid = _check_uid(pod_uid)
    root = proc_root or default_proc_root()
    wanted = {c.lower() for c in container_ids} if container_ids else None
    pids: set[int] = set()
    for pid, memberships in _pod_processes(uid, root):
        if any(m.conmon for m in memberships):
            continue
        if wanted is not None and not any(
            m.container is not None and m.container.lower() in wanted for m in memberships
        ):
            continue
        if not include_pause and _is_pause(pid, root):
            continue
        pids.add(pid)
    return pids


def _hierarchy_roots(cgroup_root: Path) -> list[Path]:
    """Mount points to search: the root itself when it is a v2 mount, else each v1/v2 mount below it."""
    if (cgroup_root / "cgroup.controllers").exists():
        return [cgroup_root]
    try:
        subdirs = sorted(p for p in cgroup_root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    return [p for p in subdirs if (p / "cgroup.procs").exists()]


def _walk_for_pod(uid: str, cgroup_root: Path) -> str | None:
    """Breadth-first search of each hierarchy, bounded in depth and size, for the pod's directory."""
    for mount in _hierarchy_roots(cgroup_root):
        frontier, seen = [mount], 0
        for _depth in range(_WALK_MAX_DEPTH):
            next_frontier: list[Path] = []
            for directory in frontier:
                try:
                    children = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
                for child in children:
                    seen += 1
                    if _is_pod_component(child.name, uid):
                        return str(Path(child.path).relative_to(mount))
                    next_frontier.append(Path(child.path))
                if seen > _WALK_MAX_DIRS:
                    break
            frontier = next_frontier
            if not frontier or seen > _WALK_MAX_DIRS:
                break
    return None


def _exists_under(rel: str, cgroup_root: Path) -> bool:
    return any((mount / rel).is_dir() for mount in _hierarchy_roots(cgroup_root))


def pod_cgroup_path(
    pod_uid: str, *, proc_root: Path | None = None, cgroup_root: Path = DEFAULT_CGROUP_ROOT
) -> str | None:
    """The pod-level cgroup path relative to the cgroup root (on v1: to each controller's mount).

    E.g. 'kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12ab_...slice'. Taken
    from a process's /proc/<pid>/cgroup when the path exists under ``cgroup_root``, else found
    by walking the cgroup mounts (a pod without live processes, or an agent in its own cgroup
    namespace). None when the pod has no cgroup on this node.
    """
    uid = _check_uid(pod_uid)
    root = proc_root or default_proc_root()
    candidates: dict[str, str] = {}
    for _pid, memberships in _pod_processes(uid, root):
        for m in memberships:
            if ".." not in m.pod_path.split("/"):
                for controller in m.controllers.split(",") if m.controllers else [""]:
                    candidates.setdefault(controller.removeprefix("name="), m.pod_path)
        if all(c in candidates for c in _PREFERRED):
            break
    ordered = [candidates[c] for c in _PREFERRED if c in candidates] + sorted(set(candidates.values()))
    for rel in ordered:
        if _exists_under(rel, cgroup_root):
            return rel
    return _walk_for_pod(uid, cgroup_root)


def _ns_key(path: Path) -> int | None:
    """The namespace's inode: unique across the one nsfs, for /proc links and /run/netns mounts alike."""
    try:
        return os.stat(path).st_ino
    except OSError:
        pass
    # stat() follows the link and needs ptrace access to the process (PID 1 without
    # CAP_SYS_PTRACE, say); readlink() shows the same inode as "net:[4026531833]".
    try:
        target = os.readlink(path)
    except OSError:
        return None
    inner = target.partition("[")[2].rstrip("]")
    return int(inner) if inner.isdigit() else None


def pod_netns_path(pod_uid: str, *, proc_root: Path | None = None, netns_dir: Path = DEFAULT_NETNS_DIR) -> str | None:
    """A path to the pod's network namespace, or None when no process of the pod is found.

    Prefers the runtime's persistent bind mount in /run/netns (e.g. cni-<uuid>), which
    outlives container restarts and so can be journaled for the revert; else
    /proc/<pid>/ns/net of a non-pause process of the pod (any process when only the
    pause one is left).
    """
    uid = _check_uid(pod_uid)
    root = proc_root or default_proc_root()
    pids = sorted(pod_pids(uid, proc_root=root)) or sorted(pod_pids(uid, include_pause=True, proc_root=root))
    for pid in pids:
        link = root / str(pid) / "ns" / "net"
        key = _ns_key(link)
        if key is None:
            continue  # exited meanwhile: try the next one
        try:
            named = sorted(netns_dir.iterdir())
        except OSError:
            named = []
        for candidate in named:
            if _ns_key(candidate) == key:
                return str(candidate)
        return str(link)
    return None


def netns_is_host(netns_path: str, *, node_netns: Path = Path("/proc/self/ns/net")) -> bool:
    """True for a hostNetwork pod: its namespace is the node's, and faults there hit the node.

    The node's namespace is the agent's own (the DaemonSet runs with hostNetwork), not
    PID 1's: reading PID 1's needs ptrace access that a sandbox may not grant.
    """
    key = _ns_key(Path(netns_path))
    return key is not None and key == _ns_key(node_netns)


@dataclass(frozen=True)
class PodLocation:
    uid: str
    pids: frozenset[int]
    cgroup_path: str | None
    netns_path: str | None


def locate_pod(
    pod_uid: str,
    *,
    proc_root: Path | None = None,
    cgroup_root: Path = DEFAULT_CGROUP_ROOT,
    netns_dir: Path = DEFAULT_NETNS_DIR,
) -> PodLocation:
    """Everything the injectors need about a pod; PodNotFound when it has neither processes nor cgroup here."""
    uid = _check_uid(pod_uid)
    root = proc_root or default_proc_root()
    pids = pod_pids(uid, proc_root=root)
    cgroup = pod_cgroup_path(uid, proc_root=root, cgroup_root=cgroup_root)
    if not pids and cgroup is None:
        raise PodNotFound(
            f"pod {pod_uid} is not on this node: no process under {root} and no cgroup under {cgroup_root} names it"
        )
    netns = pod_netns_path(uid, proc_root=root, netns_dir=netns_dir)
    return PodLocation(uid=uid, pids=frozenset(pids), cgroup_path=cgroup, netns_path=netns)
