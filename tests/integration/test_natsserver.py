"""controller.natsserver: the embedded nats-server local mode starts, and what a killed run leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from controller.natsserver import WORKDIR_PREFIX, NatsServer, sweep_stale_workdirs


def test_a_work_dir_of_a_dead_server_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    # a dead server: its pid names a process that has exited (started and reaped here)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    stale = tmp_path / f"{WORKDIR_PREFIX}stale"
    stale.mkdir()
    (stale / f"nats-server_{gone.pid}.ports").write_text('{"nats": ["nats://127.0.0.1:1"]}')
    (stale / "nats-server.log").write_text("")
    unrelated = tmp_path / f"{WORKDIR_PREFIX}no-ports-file"  # not ours to judge: kept
    unrelated.mkdir()
    live = NatsServer(workdir=str(tmp_path / f"{WORKDIR_PREFIX}live"))
    (tmp_path / f"{WORKDIR_PREFIX}live").mkdir()
    live.start()
    try:
        assert sweep_stale_workdirs(tmp_path) == [stale]
        assert not stale.exists() and unrelated.is_dir() and live.workdir.is_dir()
    finally:
        live.stop()
