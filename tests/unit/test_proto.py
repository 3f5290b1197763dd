from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from proto import subjects
from proto.codec import DecodeError, decode, decode_command, encode
from proto.faults import MemorySpec, NetworkSpec, ProcessKillSpec, required_capabilities, signal_number
from proto.messages import Heartbeat, Inject
from proto.units import parse_duration, parse_percent, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("500ms", 0.5),
        ("2m", 120),
        ("1h", 3600),
        (5, 5.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("1m30s", 90),
        ("1h 30m", 5400),
        ("2m500ms", 120.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["30", "-1s", "abc", True, None, [], "1d", float("nan"), "1m30", "s30", "1m-30s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes_rates_percents() -> None:
    assert parse_size("512Mi") == 512 * 2**20
    assert parse_size("1G") == 10**9
    assert parse_size(4096) == 4096
    assert parse_rate("8mbit") == 8_000_000
    for ambiguous, bits in (("8Mbps", "64mbit"), ("1kbps", "8kbit"), ("10bps", "80bit")):
        with pytest.raises(ValueError, match=f"ambiguous: tc reads .*bytes per second .*= {bits}\\), networking as"):
            parse_rate(ambiguous)
    with pytest.raises(ValueError, match="'8MBps': MBps is megabytes per second; write it in bits: '64mbit'"):
        parse_rate("8MBps")
    for negative, parse in (("-5s", parse_duration), ("-512Mi", parse_size), ("-8mbit", parse_rate)):
        with pytest.raises(ValueError, match="must be "):
            parse(negative)  # type: ignore[operator]
    assert parse_percent("5%") == 5.0
    for bad in ("-1", "lots", 0, "12XB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_percent(101)


BIG = int("9" * 400)


@pytest.mark.parametrize(
    ("parse", "value", "why"),
    [
        (parse_duration, BIG, "too large"),
        (parse_duration, "9" * 400 + "s", "must be a finite number"),
        (parse_duration, "99999999999999999999h", "at most 366 days"),
        (parse_size, BIG, "too large"),
        (parse_size, "9" * 400 + "Mi", "too large"),
        (parse_rate, "9" * 400 + "mbit", "too large"),
        (parse_rate, BIG, "too large"),
        (parse_percent, BIG, "too large"),
    ],
)
def test_numbers_too_large_for_any_use_are_refused_not_crashed_on(parse: Any, value: object, why: str) -> None:
    """A 400-digit number overflowed a float conversion: a traceback from `validate`."""
    with pytest.raises(ValueError, match=why):
        parse(value)


def test_signal_names() -> None:
    assert signal_number("SIGKILL") == 9 == signal_number("kill") == signal_number(9) == signal_number("9")
    with pytest.raises(ValueError):
        signal_number("SIGNOPE")


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        MemorySpec.model_validate({"size": "1Gi", "percent": 5})
    assert "exactly one of size or percent" in str(exc.value)
    with pytest.raises(ValidationError, match="match"):
        ProcessKillSpec.model_validate({"match": {}})
    with pytest.raises(ValidationError, match="invalid regular expression"):
        ProcessKillSpec.model_validate({"match": {"cmdline": "("}})
    with pytest.raises(ValidationError, match="at least one of delay"):
        NetworkSpec.model_validate({"interface": "eth0"})


def test_required_capabilities() -> None:
    assert required_capabilities(NetworkSpec.model_validate({"delay": "10ms"}))[:2] == ["network", "network.netem"]
    assert "network.tbf" in required_capabilities(
        NetworkSpec.model_validate({"rate": "8mbit", "exemptControlPlane": False})
    )
    assert required_capabilities(ProcessKillSpec.model_validate({"match": {"pid": 5}})) == ["process-kill"]


def test_round_trip_and_version_rules() -> None:
    inj = Inject(
        experiment_id="e1", fault_id="e1.0", spec={"kind": "process-pause", "match": {"name": "x"}},
        expires_at=time.time() + 5, lease_timeout_s=5,
    )  # fmt: skip
    assert decode_command(encode(inj)) == inj
    newer = json.loads(encode(inj))
    newer["schema_version"] = "1.7"
    newer["future_optional"] = {"x": 1}
    newer["spec"]["futureKnob"] = True
    assert decode_command(json.dumps(newer)).fault_id == "e1.0"
    same = dict(newer, schema_version="1.0")
    with pytest.raises(DecodeError, match="future_optional"):
        decode_command(json.dumps(same))
    with pytest.raises(DecodeError, match="major version 2"):
        decode_command(json.dumps(dict(newer, schema_version="2.0")))
    with pytest.raises(DecodeError, match="exceeds"):
        decode(b" " * (300 * 1024), Heartbeat)


def test_subjects_are_safe() -> None:
    assert subjects.agent_cmd("node.a b*>") == "faultline.v1.agent.node_a_b__.cmd"
    assert subjects.experiment_from_subject(subjects.exp_lease("e-1")) == "e-1"
    with pytest.raises(ValueError):
        subjects.safe_token("")
