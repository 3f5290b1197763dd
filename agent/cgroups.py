"""Cgroup layout: find where the cpu and memory controllers live, read limits, move pids.

Nodes come in three shapes: pure v2 (one unified mount, most production nodes),
pure v1 (one mount per controller) and hybrid (v1 controllers plus a v2 mount
with few or no controllers, as on the CI machine). Each controller is resolved
on its own: a v1 mount that carries it wins, else the v2 mount if it lists the
controller, else the v2 mount anyway (placement works, limits do not apply).

A user names a cgroup relative to the cgroup root ("kubepods/pod1/abc"); on v1
the same relative path is looked up under each controller's mount.

Moving a process is checked against the *writer's* cgroup namespace: where the
v2 hierarchy is mounted with ``nsdelegate`` (systemd's default), the kernel
refuses (ENOENT) a move from or to a cgroup outside the writer's namespace root.
A DaemonSet agent that is not privileged gets a private cgroup namespace from
its runtime on v2 nodes, rooted at its own container, so every pod's and the
node's cgroups are outside it. With the host's PID namespace (hostPID) and
CAP_SYS_ADMIN, the agent writes from a short-lived thread that has joined PID
1's cgroup namespace (namespaces belong to threads: the rest of the agent stays
where it is). Where the agent already shares PID 1's namespace (a node service,
the tests) it writes in place.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CONTROLLERS: tuple[str, ...] = ("cpu", "memory")
CLONE_NEWCGROUP = 0x02000000
ROOT_CGROUPNS = "/proc/1/ns/cgroup"  # PID 1's: the host's init under hostPID
_UNLIMITED_V1_BYTES = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX


class CgroupError(Exception):
    """A cgroup path that cannot be used; str() is the reason."""


@dataclass(frozen=True)
class CgroupLayout:
    v1: dict[str, Path] = field(default_factory=dict)
    """v1 controller name -> its mount point."""
    v2: Path | None = None
    """The unified (v2) mount point, if any."""
    v2_controllers: frozenset[str] = frozenset()

    @property
    def version(self) -> str | None:
        if self.v1:
            return "v1" if self.v2 is None else "hybrid"
        return "v2" if self.v2 is not None else None

    def mount_for(self, controller: str) -> tuple[str, Path] | None:
        """('v1'|'v2', mount point) holding ``controller``, or None when no cgroup fs is mounted."""
        if controller in self.v1:
            return "v1", self.v1[controller]
        if self.v2 is not None:
            return "v2", self.v2
        return None


def detect_layout(mounts_file: Path = Path("/proc/self/mounts")) -> CgroupLayout:
    v1: dict[str, Path] = {}
    v2: Path | None = None
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return CgroupLayout()
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mount_point, fstype, options = Path(parts[1].replace("\\040", " ")), parts[2], parts[3].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for controller in CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, mount_point)
    v2_controllers: frozenset[str] = frozenset()
    if v2 is not None:
        try:
            v2_controllers = frozenset((v2 / "cgroup.controllers").read_text().split())
        except OSError:
            pass
    return CgroupLayout(v1=v1, v2=v2, v2_controllers=v2_controllers)


def _clean_relative(path: str) -> PurePosixPath:
    rel = PurePosixPath(path.strip().lstrip("/") or ".")
    if any(part == ".." for part in rel.parts):
        raise CgroupError(f"cgroup path {path!r} must not contain '..'")
    return rel


@dataclass(frozen=True)
class CgroupTarget:
    """One user-named cgroup, resolved to a directory per controller hierarchy."""

    path: str
    dirs: dict[str, Path]
    """controller -> directory (on v2 every controller maps to the same directory)."""
    versions: dict[str, str]

    def procs_files(self) -> list[Path]:
        seen: list[Path] = []
        for d in self.dirs.values():
            f = d / "cgroup.procs"
            if f not in seen:
                seen.append(f)
        return seen


def resolve(path: str, primary: str, layout: CgroupLayout | None = None) -> CgroupTarget:
    """Resolve ``path`` for a stressor whose main controller is ``primary`` (cpu or memory).

    The primary controller's directory must exist; the other controller's is
    used when it exists too, so a cpu stressor in a container also counts
    against its memory limit. Raises CgroupError saying what is missing.
    """
    layout = layout or detect_layout()
    rel = _clean_relative(path)
    dirs: dict[str, Path] = {}
    versions: dict[str, str] = {}
    for controller in (primary, *(c for c in CONTROLLERS if c != primary)):
        found = layout.mount_for(controller)
        if found is None:
            raise CgroupError("no cgroup filesystem is mounted on this node")
        version, mount = found
        d = mount / rel
        if d.is_dir() and (d / "cgroup.procs").exists():
            dirs[controller] = d
            versions[controller] = version
        elif controller == primary:
            raise CgroupError(f"cgroup {path!r} does not exist ({d} not found)")
    return CgroupTarget(path=str(rel), dirs=dirs, versions=versions)


def cpu_quota_cores(target: CgroupTarget) -> float | None:
    """CPU quota in cores (1.5 = 150 ms per 100 ms), None when unlimited or unreadable."""
    d = target.dirs.get("cpu")
    if d is None:
        return None
    try:
        if target.versions["cpu"] == "v2":
            text = (d / "cpu.max").read_text().split()
            if not text or text[0] == "max":
                return None
            period = int(text[1]) if len(text) > 1 else 100_000
            return int(text[0]) / period if period > 0 else None
        quota_us = int((d / "cpu.cfs_quota_us").read_text())
        period_us = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, IndexError, KeyError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def cpu_quota_workers(target: CgroupTarget) -> int | None:
    """The cgroup's CPU quota rounded up to whole workers, None when unlimited."""
    cores = cpu_quota_cores(target)
    return None if cores is None else max(1, math.ceil(cores - 1e-9))


def memory_limit_bytes(target: CgroupTarget) -> int | None:
    """The cgroup's memory limit, None when unlimited or unreadable."""
    d = target.dirs.get("memory")
    if d is None:
        return None
    try:
        if target.versions["memory"] == "v2":
            text = (d / "memory.max").read_text().strip()
            return None if text == "max" else int(text)
        limit = int((d / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return None if limit >= _UNLIMITED_V1_BYTES else limit


def oom_kill_count(target: CgroupTarget) -> int | None:
    """How many OOM kills the cgroup has seen (v2 memory.events, v1 memory.oom_control)."""
    d = target.dirs.get("memory")
    if d is None:
        return None
    name = "memory.events" if target.versions.get("memory") == "v2" else "memory.oom_control"
    try:
        for line in (d / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def move_pids(target: CgroupTarget, pids: Sequence[int], root_ns: str = ROOT_CGROUPNS) -> None:
    """Write each pid into every procs file of the target; when the kernel refuses and our cgroup
    namespace is not PID 1's, again from PID 1's (see the module doc). Raises CgroupError with
    the kernel's reason."""

    def write_all() -> None:
        for pid in pids:
            for procs in target.procs_files():
                try:
                    with open(procs, "w") as f:
                        f.write(f"{pid}\n")
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    if exc.errno == errno.ENOENT and procs.exists():
                        why += " (the cgroup is outside the agent's cgroup namespace: the kernel refuses the move)"
                    raise CgroupError(f"cannot move pid {pid} into {procs}: {why}") from exc

    try:
        write_all()
    except CgroupError as refused:
        if shares_cgroupns(root_ns):
            raise
        try:
            in_cgroupns(root_ns, write_all)  # a move already made is made again: harmless
        except CgroupError as exc:
            raise CgroupError(f"{refused}; from the cgroup namespace of PID 1: {exc}") from exc


def shares_cgroupns(ns_path: str = ROOT_CGROUPNS) -> bool:
    """Whether this process is in the cgroup namespace at ns_path. True when that cannot be
    read (no such process, no permission): then we write from where we are and the kernel
    says whether it allows it."""
    try:
        return os.readlink("/proc/thread-self/ns/cgroup") == os.readlink(ns_path)
    except OSError:
        return True


def in_cgroupns(ns_path: str, fn: Callable[[], None]) -> None:
    """Run fn on a short-lived thread that has first joined the cgroup namespace at ns_path."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            try:
                fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise CgroupError(f"cannot open the cgroup namespace {ns_path}: {exc.strerror}") from None
            try:
                if _libc().setns(fd, CLONE_NEWCGROUP) != 0:
                    err = ctypes.get_errno()
                    raise CgroupError(
                        f"cannot join the cgroup namespace {ns_path} to move processes: {os.strerror(err)}"
                        " (needs CAP_SYS_ADMIN and the host's PID namespace)"
                    )
            finally:
                os.close(fd)
            fn()  # the thread ends next, and its namespace with it
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    t = threading.Thread(target=body, name="cgroupns-move", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def pids_in(target: CgroupTarget, controller: str) -> set[int]:
    d = target.dirs.get(controller)
    if d is None:
        return set()
    try:
        return {int(x) for x in (d / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return set()


def writable(layout: CgroupLayout | None = None) -> tuple[bool, str | None]:
    """Whether stressors can be placed in cgroups here; (False, why) when not."""
    layout = layout or detect_layout()
    if layout.version is None:
        return False, "no cgroup filesystem is mounted"
    roots = [layout.v1[c] for c in CONTROLLERS if c in layout.v1] or ([layout.v2] if layout.v2 else [])
    for root in roots:
        if not os.access(root / "cgroup.procs", os.W_OK):
            return False, f"{root} is not writable by the agent"
    return True, None
