"""controller.natsserver: what a killed local run leaves, and what the next one sweeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from controller.natsserver import WORKDIR_PREFIX, NatsServer, sweep_stale_workdirs
from tests.conftest import wait_until

OWNER = textwrap.dedent(
    """
    import sys, tempfile, time
    tempfile.tempdir = sys.argv[1]
    from controller.natsserver import NatsServer
    server = NatsServer(pdeathsig=True)  # as local mode starts it
    server.start()
    print(server.workdir, server.pid, flush=True)
    time.sleep(120)
    """
)


def test_the_work_dir_of_a_killed_owner_is_swept_and_a_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        workdir, server_pid = owner.stdout.readline().split()
        os.kill(owner.pid, signal.SIGKILL)  # kill -9 of `faultline run`
        owner.wait(10)
        wait_until(lambda: not Path(f"/proc/{server_pid}").exists() or _zombie(server_pid), 10, "nats-server to exit")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    assert Path(workdir).is_dir(), "the killed run left nothing to sweep: the test proves nothing"
    unrelated = tmp_path / f"{WORKDIR_PREFIX}not-ours"  # no owner file: not ours to judge
    unrelated.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = NatsServer()  # this process owns it (and its constructor sweeps tmp_path too)
    try:
        assert not Path(workdir).exists(), "the killed run's work dir was not swept by the next server"
        assert sweep_stale_workdirs(tmp_path) == []
        assert unrelated.is_dir() and live.workdir.is_dir()
    finally:
        live.stop()


def _zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
