"""Fault spec edges: real-time signals by name, bounds on counts and queue limits, and every bad
entry of a list named at once (experiment files and agent settings)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import AgentSettings
from proto.faults import LINUX_SIGNALS, SIGRTMAX, SIGRTMIN, NetworkSpec, ProcessKillSpec, signal_name, signal_number


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("SIGRTMIN+3", SIGRTMIN + 3),
        ("rtmin+3", SIGRTMIN + 3),
        ("SIGRTMAX-2", SIGRTMAX - 2),
        ("RTMIN", SIGRTMIN),
        (SIGRTMIN + 5, SIGRTMIN + 5),
        ("SIGTERM", 15),
        ("9", 9),
    ],
)
def test_signals_by_name_or_number_real_time_included(given: str | int, expected: int) -> None:
    assert signal_number(given) == expected
    assert ProcessKillSpec.model_validate({"match": {"name": "x"}, "signal": given}).signal == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host's own numbers are Linux's only on Linux")
def test_the_fixed_linux_table_agrees_with_this_linux_host() -> None:
    """The table, not the parsing host, names signals (a controller on macOS numbers SIGUSR1 30)."""
    assert {k: v for k, v in LINUX_SIGNALS.items() if int(getattr(signal, k, v)) != v} == {}
    assert (int(signal.SIGRTMIN), int(signal.SIGRTMAX)) == (SIGRTMIN, SIGRTMAX)
    for n in [*range(1, 32), *range(SIGRTMIN, SIGRTMAX + 1)]:
        assert signal_number(signal_name(n)) == n


def test_real_time_signals_have_names_and_bad_ones_are_refused() -> None:
    assert signal_name(SIGRTMIN + 3) == "SIGRTMIN+3"
    assert signal_name(9) == "SIGKILL"
    for bad in ("SIGRTMIN+99", "SIGRTMAX+1", "SIGFOO", 0, 32, 99):
        with pytest.raises(ValueError):
            signal_number(bad)


def test_count_and_queue_limit_are_bounded() -> None:
    with pytest.raises(ValidationError, match="4194304"):
        ProcessKillSpec.model_validate({"match": {"name": "x"}, "count": 1 << 23})
    with pytest.raises(ValidationError, match="4294967295"):
        NetworkSpec.model_validate({"delay": "10ms", "limit": 1 << 32})
    assert NetworkSpec.model_validate({"delay": "10ms", "limit": (1 << 32) - 1}).limit == (1 << 32) - 1


def test_every_bad_cidr_of_a_fault_is_named() -> None:
    with pytest.raises(ValidationError) as exc:
        NetworkSpec.model_validate({"delay": "10ms", "exempt": ["10.0.0.0/8", "nope", "300.1.1.1"]})
    text = str(exc.value)
    assert "'nope'" in text and "'300.1.1.1'" in text


def test_every_bad_deny_regex_and_exempt_cidr_of_the_agent_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as exc:
        AgentSettings(state_dir=tmp_path, safety={"deny": ["ok", "(", "["], "exempt": ["x", "10.0.0.0/8", "y"]})
    text = str(exc.value)
    for bad in ("'('", "'['", "'x'", "'y'"):
        assert bad in text, text
