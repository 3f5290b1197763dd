"""Encoding and decoding with version rules.

- A message of our major version and a minor version newer than ours is read
  leniently: fields we do not know are ignored (they are optional by the
  versioning contract). Same or older minor: strict, unknown fields refused.
- Another major version is refused with a clear reason, never misread.
- Oversized, non-JSON and wrongly typed input becomes DecodeError with a
  short reason; nothing else escapes.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from proto.messages import MAX_MESSAGE_BYTES, SCHEMA_MAJOR, SCHEMA_MINOR, AnyMessage, Command

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """Input that is not a message we can act on; str() is the reason for the sender."""


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(by_alias=True, exclude_none=True).encode()


def _version_of(obj: dict[str, Any]) -> tuple[int, int]:
    raw = obj.get("schema_version")
    if not isinstance(raw, str):
        raise DecodeError("schema_version: missing or not a string")
    major_s, _, minor_s = raw.partition(".")
    if not (major_s.isdigit() and minor_s.isdigit()):
        raise DecodeError(f"schema_version: {raw!r} is not MAJOR.MINOR")
    major, minor = int(major_s), int(minor_s)
    if major != SCHEMA_MAJOR:
        raise DecodeError(f"schema_version: major version {major} is not supported (this side speaks {SCHEMA_MAJOR}.x)")
    return major, minor


def format_validation_error(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"]) or "(message)"
        parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def _load(data: bytes | str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"not JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _validate(adapter_or_model: Any, obj: dict[str, Any], lenient: bool) -> Any:
    extra: Literal["ignore"] | None = "ignore" if lenient else None
    try:
        if isinstance(adapter_or_model, TypeAdapter):
            return adapter_or_model.validate_python(obj, extra=extra)
        return adapter_or_model.model_validate(obj, extra=extra)
    except ValidationError as exc:
        raise DecodeError(format_validation_error(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: validators are ours
        raise DecodeError(f"invalid message: {str(exc)[:200]}") from None


def _fast(validate_json: Any, data: bytes | str) -> Any:
    """The common case in one pass (pydantic parses the JSON itself, about half the cost): a
    message of our major version that validates strictly. Anything else, including every
    failure, returns None and takes the careful path, which gives the reason."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        obj = validate_json(data)
    except (ValidationError, ValueError, TypeError, RecursionError):
        return None
    if "schema_version" not in getattr(obj, "model_fields_set", ()):
        return None  # a message must say its version: the careful path refuses it by name
    # strict validation passed, so a newer minor carried no field we do not know: the lenient
    # reading would give the same message
    if str(obj.schema_version).partition(".")[0] == str(SCHEMA_MAJOR):
        return obj
    return None


def _careful(adapter_or_model: Any, data: bytes | str) -> Any:
    """Size, JSON, version, then validation: each refusal with its own reason."""
    obj = _load(data)
    _, minor = _version_of(obj)
    return _validate(adapter_or_model, obj, lenient=minor > SCHEMA_MINOR)


def _read(adapter_or_model: Any, data: bytes | str) -> Any:
    """One pass when the message is plainly fine, else the careful path with its reasons."""
    if isinstance(adapter_or_model, TypeAdapter):
        fast = _fast(adapter_or_model.validate_json, data)
    else:
        fast = _fast(adapter_or_model.model_validate_json, data)
    return fast if fast is not None else _careful(adapter_or_model, data)


def decode(data: bytes | str, model: type[M]) -> M:
    return cast(M, _read(model, data))


@functools.cache
def _command_adapter() -> TypeAdapter[Any]:
    # built on first use: an idle agent never pays for the command schemas
    return TypeAdapter(Command)


@functools.cache
def _any_adapter() -> TypeAdapter[Any]:
    return TypeAdapter(AnyMessage)


def decode_command(data: bytes | str) -> Any:
    """An Inject or a Revert."""
    return _read(_command_adapter(), data)


def decode_any(data: bytes | str) -> Any:
    return _read(_any_adapter(), data)


def peek_id(data: bytes | str) -> str | None:
    """Best-effort id of a message we could not decode, to answer "rejected" to it."""
    try:
        obj = json.loads(data) if len(data) <= MAX_MESSAGE_BYTES else None
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("id"), str) and len(obj["id"]) <= 64:
        return str(obj["id"])
    return None
