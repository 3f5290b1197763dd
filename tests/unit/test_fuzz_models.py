"""Property tests with strategies derived from the proto models themselves.

Each message is drawn field by field from the model's own field table (wire
names, nested models, fault specs by kind), each field either plausible for
its annotation or junk, some left out; so a field added to proto/ is fuzzed
without touching this file. Every draw goes through the agent's command
handler in-process: it must answer a decodable Ack, with a reason when it
refuses, and nothing may escape. The agent has no injectors here, so whatever
validates is refused as unsupported and nothing touches the machine.
"""

from __future__ import annotations

import asyncio
import json
import time
import types
import typing
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.config import AgentSettings
from agent.runtime import AgentRuntime
from proto import codec
from proto.codec import DecodeError, decode
from proto.faults import CpuSpec, MemorySpec, NetworkSpec, ProcessKillSpec, ProcessPauseSpec
from proto.messages import Ack, Halt, Heartbeat, Inject, Lease, Preview, Revert, Start

SPECS: list[type[BaseModel]] = [ProcessKillSpec, ProcessPauseSpec, CpuSpec, MemorySpec, NetworkSpec]
MESSAGES: list[type[BaseModel]] = [Inject, Revert, Start, Preview, Ack, Halt, Lease, Heartbeat]

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
ids = st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z")
versions = st.sampled_from(["1.0", "1.1", "1.2", "1.9", "0.9", "2.0", "1", "x.y", ""])
times = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3).map(lambda d: time.time() + d),
    st.floats(allow_nan=False, allow_infinity=True),
)


def _plain(annotation: Any, depth: int) -> st.SearchStrategy[Any]:
    """A plausible JSON value for a field annotation (or junk when unknown)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_plain(a, depth) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(list(args))
    if origin is list:
        return st.lists(_plain(args[0] if args else Any, depth + 1), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), _plain(args[1] if len(args) > 1 else Any, depth + 1), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_dicts(annotation, depth + 1) if depth < 3 else junk
    if origin is typing.Annotated or getattr(annotation, "__metadata__", None):
        return _plain(args[0], depth) if args else junk
    if annotation is float:
        return times
    if annotation is int:
        return st.integers(min_value=-5, max_value=1 << 20)
    if annotation is bool:
        return st.booleans()
    if annotation is str:
        return st.one_of(ids, st.text(max_size=30))
    if annotation is type(None):
        return st.none()
    # a discriminated union (FaultSpec) or anything else: one of the fault specs, or junk
    return st.one_of(st.sampled_from(SPECS).flatmap(lambda m: model_dicts(m, depth + 1)), junk)


def model_dicts(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like ``model`` on the wire: every field optional, each plausible or junk."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        value = st.one_of(_plain(field.annotation, depth), junk) if name != "schema_version" else versions
        if name in ("type", "kind"):
            required[key] = st.just(field.default)  # keep the discriminator, so validation goes deep
        else:
            optional[key] = value
    return st.fixed_dictionaries(required, optional=optional)


def runtime(tmp: Path) -> AgentRuntime:
    rt = AgentRuntime(AgentSettings(state_dir=tmp, identity={"node": "fuzz"}), injectors={})
    rt.capabilities = ["process-kill", "process-pause", "cpu", "memory", "network"]
    return rt


def handle(rt: AgentRuntime, data: bytes) -> Ack:
    ack = decode(asyncio.run(rt.handle_command(data)), Ack)
    assert ack.accepted or ack.reason, "a refusal without a reason"
    return ack


SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.sampled_from(MESSAGES).flatmap(model_dicts))
def test_messages_drawn_from_the_models(tmp_path: Path, obj: dict[str, Any]) -> None:
    handle(runtime(tmp_path), json.dumps(obj, default=str).encode())


@SETTINGS
@given(model_dicts(Inject), st.sampled_from(SPECS).flatmap(model_dicts))
def test_injects_with_specs_drawn_from_the_models(tmp_path: Path, obj: dict[str, Any], spec: dict[str, Any]) -> None:
    obj["spec"] = spec
    obj.setdefault("schema_version", "1.0")
    obj.setdefault("expires_at", time.time() + 5)
    ack = handle(runtime(tmp_path), json.dumps(obj, default=str).encode())
    assert not ack.accepted  # no injectors: nothing may be accepted, whatever validates


@SETTINGS
@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_raw_bytes(tmp_path: Path, data: bytes) -> None:
    handle(runtime(tmp_path), data)


def _agree(adapter_or_model: Any, validate_json: Any, data: bytes) -> None:
    try:
        careful = codec._careful(adapter_or_model, data)
    except DecodeError:
        careful = None
    fast = codec._fast(validate_json, data)
    if fast is not None:  # the one-pass path may decline; when it answers, it is the careful answer
        assert careful is not None, f"one pass accepted what the careful path refuses: {data[:300]!r}"
        generated = {"id", "sent_at"} - set(json.loads(data))  # defaults drawn afresh on each reading
        assert fast.model_dump(exclude=generated) == careful.model_dump(exclude=generated), (
            f"the two paths read {data[:300]!r} differently"
        )


@SETTINGS
@given(st.sampled_from(MESSAGES).flatmap(lambda m: st.tuples(st.just(m), model_dicts(m))))
def test_one_pass_decoding_agrees_with_the_careful_path(pair: tuple[type[BaseModel], dict[str, Any]]) -> None:
    model, obj = pair
    _agree(model, model.model_validate_json, json.dumps(obj, default=str).encode())


@SETTINGS
@given(model_dicts(Inject), st.sampled_from(SPECS).flatmap(model_dicts))
def test_one_pass_command_decoding_agrees_with_the_careful_path(obj: dict[str, Any], spec: dict[str, Any]) -> None:
    obj["spec"] = spec
    obj.setdefault("schema_version", "1.0")
    adapter = codec._command_adapter()
    _agree(adapter, adapter.validate_json, json.dumps(obj, default=str).encode())
