"""Property tests: nothing a sender puts on the command subject escapes the handler.

Arbitrary bytes, arbitrary JSON, and well-formed messages with fuzzed fields
all come back as a decodable Ack; a rejection always carries a reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentSettings
from agent.runtime import AgentRuntime
from proto.codec import decode, encode
from proto.messages import Ack, Inject

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

FIELDS = [
    "schema_version",
    "id",
    "sent_at",
    "type",
    "experiment_id",
    "fault_id",
    "spec",
    "expires_at",
    "lease_timeout_s",
    "pods",
    "fault_ids",
    "reason",
    "await_start",
]


def runtime(tmp: Path) -> AgentRuntime:
    rt = AgentRuntime(AgentSettings(state_dir=tmp, identity={"node": "fuzz"}), injectors={})
    rt.capabilities = ["process-kill", "process-pause"]
    return rt


def handle(rt: AgentRuntime, data: bytes) -> Ack:
    async def go() -> bytes:
        return await rt.handle_command(data)

    ack = decode(asyncio.run(go()), Ack)
    if not ack.accepted:
        assert ack.reason
    return ack


SETTINGS = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    handle(runtime(tmp_path), data)


@SETTINGS
@given(json_values)
def test_arbitrary_json(tmp_path: Path, value: object) -> None:
    handle(runtime(tmp_path), json.dumps(value).encode())


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))
def test_message_shaped_json(tmp_path: Path, obj: dict[str, object]) -> None:
    obj.setdefault("schema_version", "1.0")
    obj.setdefault("type", "inject")
    handle(runtime(tmp_path), json.dumps(obj).encode())


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)))
def test_start_shaped_json(tmp_path: Path, obj: dict[str, object]) -> None:
    obj.setdefault("schema_version", "1.2")
    obj["type"] = "start"
    handle(runtime(tmp_path), json.dumps(obj).encode())


@SETTINGS
@given(
    spec=st.fixed_dictionaries(
        {"kind": st.sampled_from(["process-kill", "process-pause", "cpu", "memory", "network", "bogus"])},
        optional={
            "match": json_values,
            "load": json_values,
            "size": json_values,
            "delay": json_values,
            "signal": json_values,
        },
    )
)
def test_fuzzed_specs_in_a_valid_envelope(tmp_path: Path, spec: dict[str, object]) -> None:
    # injectors={} : whatever validates is refused as unsupported, never applied
    obj = json.loads(
        encode(
            Inject(
                experiment_id="e",
                fault_id="e.0",
                spec={"kind": "process-pause", "match": {"pid": 999999}},
                expires_at=time.time() + 5,
                lease_timeout_s=5,
            )
        )
    )
    obj["spec"] = spec
    ack = handle(runtime(tmp_path), json.dumps(obj).encode())
    assert not ack.accepted
