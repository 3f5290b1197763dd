"""Fixtures shared by the injector-level stressor tests (test_stressors.py, test_oom_attribution.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent import cgroups
from agent.faults.base import AgentEnv
from agent.faults.cpu import CpuStress
from agent.faults.stress_marks import MARKER_PREFIX, find_marked
from agent.faults.stressor import kill_and_wait
from tests.conftest import remove_cgroup


@pytest.fixture
def env(tmp_path: Path) -> AgentEnv:
    return AgentEnv(
        node=f"it-{uuid.uuid4().hex[:6]}", state_dir=tmp_path / "state", instance_id="i", protected_pids=dict
    )


@pytest.fixture
async def cleanup(env: AgentEnv) -> AsyncIterator[None]:
    """Kill any stressor of this test's agent, whatever happened."""
    yield
    for marker, refs in find_marked(f"{MARKER_PREFIX}:").items():
        if CpuStress(env).tag in marker:
            await kill_and_wait(refs)


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[], str]]:
    """Makes cgroups (one directory per controller hierarchy, relative name returned); removes
    them afterwards, whatever happened. Skips where that is not possible, saying why."""
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    layout = cgroups.detect_layout()
    made: list[Path] = []

    def make() -> str:
        name = f"faultline-test-{uuid.uuid4().hex[:8]}"
        for controller in cgroups.CONTROLLERS:
            found = layout.mount_for(controller)
            if found is None:
                pytest.skip("no cgroup filesystem mounted")
            d = found[1] / name
            if d.exists():
                continue
            try:
                d.mkdir()
            except OSError as exc:
                pytest.skip(f"cannot create a cgroup under {found[1]}: {exc}")
            made.append(d)
        return name

    yield make
    for d in reversed(made):
        remove_cgroup(d, 5)


@pytest.fixture
def test_cgroup(make_cgroup: Callable[[], str]) -> str:
    return make_cgroup()
