"""The experiment file: its model, loading and error messages.

The file is the user-facing contract (apiVersion faultline/v1, kind
Experiment). Fault entries are exactly ``proto.faults.FaultSpec``, so a file
that validates here is what agents receive on the wire. Human units ("30s")
are parsed once, here, into fields whose names carry the unit.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from proto.faults import FAULT_KINDS, FaultSpec, SpecModel
from proto.subjects import safe_token
from proto.units import PositiveDuration

API_VERSION = "faultline/v1"
KIND = "Experiment"
TargetMode = Literal["one", "all", "fixed", "fixed-percent", "random-max-percent"]

# Inject.experiment_id is at most 64 characters; keep room for "-" + 6 hex.
MAX_NAME_LENGTH = 48


class ExperimentError(ValueError):
    """An experiment file that cannot be used; str() lists "field.path: reason" lines."""


class Metadata(SpecModel):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="experiment name; part of its id")
    labels: dict[str, str] = Field(default_factory=dict, description="free-form labels, shown in reports")
    description: str | None = Field(None, max_length=2000)


class PodTargets(SpecModel):
    """Pod-level targeting: the pods are resolved from the Kubernetes API; their nodes become the targets."""

    namespace: str = Field(min_length=1, max_length=253)
    labels: dict[str, str] = Field(default_factory=dict, description="label selector (all must match)")


class Targets(SpecModel):
    """Which agents (nodes) get the faults. Without nodes and labels: every agent in the fleet."""

    nodes: list[str] | None = Field(None, min_length=1, description="node names; each must be in the fleet")
    labels: dict[str, str] | None = Field(None, description="node labels that must all match, e.g. {zone: a}")
    mode: TargetMode = Field("all", description="how many of the matching nodes to pick")
    value: float | None = Field(
        None, gt=0, description="count for fixed; percent (0-100] for fixed-percent and random-max-percent"
    )
    pods: PodTargets | None = Field(None, description="target pods instead of whole nodes (Kubernetes)")

    @model_validator(mode="after")
    def _value_fits_mode(self) -> Targets:
        if self.mode in ("fixed", "fixed-percent", "random-max-percent") and self.value is None:
            raise ValueError(f"mode {self.mode} needs a value")
        if self.mode == "fixed" and self.value is not None and not float(self.value).is_integer():
            raise ValueError("mode fixed needs a whole number as value")
        if self.mode in ("fixed-percent", "random-max-percent") and self.value is not None and self.value > 100:
            raise ValueError(f"mode {self.mode} needs a value between 0 and 100 (percent)")
        if self.mode in ("one", "all") and self.value is not None:
            raise ValueError(f"mode {self.mode} takes no value")
        return self


MIN_LEASE_TIMEOUT_S = 1.0


class AbortSpec(SpecModel):
    heartbeat_timeout_s: PositiveDuration = Field(
        3.0, alias="heartbeatTimeout", description="a targeted agent silent this long aborts the experiment"
    )
    lease_timeout_s: PositiveDuration = Field(
        5.0,
        alias="leaseTimeout",
        description="agents revert on their own when the controller is silent this long (at least 1s)",
        le=3600,
    )

    @field_validator("lease_timeout_s")
    @classmethod
    def _lease_long_enough(cls, v: float) -> float:
        if v < MIN_LEASE_TIMEOUT_S:
            raise ValueError(
                f"must be at least {MIN_LEASE_TIMEOUT_S:g}s: the controller renews the lease every "
                "min(1s, leaseTimeout/3), and a shorter one lapses on an ordinary hiccup (a GC pause, a busy "
                "node), reverting every fault early"
            )
        return v


class ExperimentSpec(SpecModel):
    duration_s: PositiveDuration = Field(alias="duration", description="how long faults stay; a fault may set its own")
    targets: Targets = Field(default_factory=lambda: Targets())
    faults: list[FaultSpec] = Field(min_length=1, max_length=32)
    abort: AbortSpec = Field(default_factory=lambda: AbortSpec())


class Experiment(SpecModel):
    api_version: Literal["faultline/v1"] = Field(alias="apiVersion")
    kind: Literal["Experiment"]
    metadata: Metadata
    spec: ExperimentSpec

    def fault_duration_s(self, index: int) -> float:
        own = self.spec.faults[index].duration_s
        return own if own is not None else self.spec.duration_s

    def longest_fault_s(self) -> float:
        return max(self.fault_duration_s(i) for i in range(len(self.spec.faults)))


def new_experiment_id(name: str, token: str | None = None) -> str:
    """``<name>-<6 hex>``, one subject token (no '.', '*', '>', spaces)."""
    return f"{safe_token(name)}-{token or secrets.token_hex(3)}"


def fault_id(experiment_id: str, index: int) -> str:
    return f"{experiment_id}.{index}"


def _loc_path(loc: tuple[int | str, ...]) -> str:
    """('spec', 'faults', 0, 'cpu', 'load') -> 'spec.faults[0].load'."""
    out = ""
    prev: int | str | None = None
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and i >= 2 and loc[i - 2] == "faults" and part in FAULT_KINDS:
            pass  # pydantic's discriminator tag; the user wrote the kind, not a nested key
        elif part.startswith("function-") or part.startswith("tagged-union"):
            pass
        else:
            out += ("." if out else "") + part
        prev = part
    return out or "(file)"


def _reason(err: Any) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err["type"] == "extra_forbidden":
        return "unknown field (not part of the experiment file)"
    if err["type"] == "union_tag_invalid":
        return f"unknown fault kind; expected one of {', '.join(FAULT_KINDS)}"
    if err["type"] == "union_tag_not_found":
        return f"missing kind; expected one of {', '.join(FAULT_KINDS)}"
    if err["type"] == "missing":
        return "required field missing"
    if err["type"] == "too_short":
        n = (err.get("ctx") or {}).get("min_length", 1)
        return f"needs at least {n} item{'s' if n != 1 else ''}, got {len(err['input']) if hasattr(err.get('input'), '__len__') else 0}"
    if err["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return msg[0].lower() + msg[1:] if msg else msg
    return msg[0].lower() + msg[1:] if msg[:1].isupper() and msg[1:2].islower() else msg


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = _loc_path(tuple(err["loc"]))
        reason = _reason(err)
        # "spec.faults[0].load: load must be ..." reads better without the repeated name
        last = path.rsplit(".", 1)[-1]
        if reason.startswith(last + " ") and not last.endswith("]"):
            reason = reason[len(last) + 1 :]
        lines.append(f"{path}: {reason}")
    return lines


def parse_experiment(data: Any) -> Experiment:
    if not isinstance(data, dict):
        raise ExperimentError(f"(file): expected a mapping with apiVersion, kind, metadata, spec; got {_kind(data)}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        raise ExperimentError("\n".join(format_errors(exc))) from None
    unitless = _unitless_delays(data)
    if unitless:
        raise ExperimentError("\n".join(unitless))
    return exp


def _unitless_delays(data: dict[str, Any]) -> list[str]:
    """A network delay or jitter written as a bare number: everywhere else a bare number of seconds
    is natural (duration: 30), but `delay: 100` is a 100 s delay where milliseconds were meant."""
    spec = data.get("spec")
    faults = spec.get("faults") if isinstance(spec, dict) else None
    lines = []
    for i, f in enumerate(faults if isinstance(faults, list) else []):
        if not isinstance(f, dict) or f.get("kind") != "network":
            continue
        for key in ("delay", "jitter"):
            v = f.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and v != 0:
                lines.append(
                    f"spec.faults[{i}].{key}: give a unit, for example '{v:g}ms' or '{v:g}s' "
                    f"(a bare number is read as seconds: {v:g} s)"
                )
    return lines


def _kind(data: Any) -> str:
    return "an empty file" if data is None else type(data).__name__


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error. YAML says keys
    are unique; PyYAML keeps the last one silently, so a second ``faults:`` would quietly replace
    the first list, and a second ``duration:`` change how long faults stay."""

    def construct_unique_map(self, node: yaml.MappingNode) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<" merges may override: that is what they are for
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key: the usual constructor says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
        return (yield from self.construct_yaml_map(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_unique_map)


def load_experiment_text(text: str, source: str = "<string>") -> Experiment:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except ValueError as exc:  # PyYAML's int() of a number over 4300 digits
        raise ExperimentError(f"(file): not valid YAML: {str(exc)[:200]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ExperimentError(f"{where}: not valid YAML: {problem}") from None
    return parse_experiment(data)


def load_experiment(path: str | Path) -> Experiment:
    """From a file, or from standard input when ``path`` is "-" (a generated experiment, piped)."""
    if str(path) == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ExperimentError(f"(file): cannot read standard input: {exc}") from None
        return load_experiment_text(text, "<stdin>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"(file): cannot read {p}: {exc}") from None
    return load_experiment_text(text, str(p))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the experiment file, using the file's spelling (aliases)."""
    schema = Experiment.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    # proto types the field by its parsed form (int); the file also takes names like "SIGKILL"
    signal = schema.get("$defs", {}).get("ProcessKillSpec", {}).get("properties", {}).get("signal")
    if isinstance(signal, dict) and signal.get("type") == "integer":
        del signal["type"]
        signal["anyOf"] = [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[A-Za-z0-9+-]+$"}]
    schema["title"] = "faultline Experiment"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False)


def percent_count(percent: float, total: int) -> int:
    """Share of ``total`` rounded up, at least 1 when total > 0."""
    if total <= 0:
        return 0
    # tolerate float noise: 30% of 10 must be 3, not 4
    return max(1, min(total, math.ceil(round(percent * total / 100.0, 9))))
