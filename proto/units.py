"""Human units parsed once, at the edge: "30s", "512Mi", "5%", "8mbit".

Each parser accepts the human string or an already-normalised number and
returns the number in the unit its name gives. Errors are ValueError with a
message that says what was expected; pydantic turns them into field errors.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, WithJsonSchema

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = r"(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)"
_DURATION_PART_RE = re.compile(_DURATION_PART)
_DURATION_RE = re.compile(rf"^\s*(?:{_DURATION_PART}\s*)+$")  # "30s", and Go's "1m30s" or "1h 30m"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# Bit-based units only. tc's "bps" family means BYTES per second, while in networking "Mbps" is
# megabits: "8Mbps" would silently be 64 mbit. Those spellings are refused with that explanation.
_RATE_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
}
_BYTE_RATE_UNITS = {
    "bps": ("", ""),
    "kbps": ("k", "kilo"),
    "mbps": ("m", "mega"),
    "gbps": ("g", "giga"),
    "tbps": ("t", "tera"),
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")


T = TypeVar("T")

MAX_DURATION_S = 366 * 86400.0
"""No duration, timeout or deadline in faultline needs more than a year."""
MAX_SIZE = 2**60  # bytes: an exbibyte, beyond any node
MAX_RATE = 10**15  # bit/s: a petabit


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bounded(what: str) -> Callable[[Callable[[Any], T]], Callable[[Any], T]]:
    """A parser whose arithmetic overflows (a number of 400 digits) says so as a ValueError."""

    def wrap(parse: Callable[[Any], T]) -> Callable[[Any], T]:
        @functools.wraps(parse)
        def parsed(value: Any) -> T:
            try:
                return parse(value)
            except OverflowError:
                raise ValueError(f"invalid {what} {_short(value)}: too large") from None

        return parsed

    return wrap


def _reject_bool(value: Any, what: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, got a boolean")


@_bounded("duration")
def parse_duration(value: Any) -> float:
    """Seconds from 30, 30.5, "30s", "500ms", "2m", "1h", "1m30s". Must be >= 0."""
    _reject_bool(value, "a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"invalid duration {value!r}: must be >= 0")
        if not _DURATION_RE.match(value):
            raise ValueError(
                f"invalid duration {value!r}: expected a number with a unit "
                "(us, ms, s, m, h), for example '30s', '500ms' or '1m30s'"
            )
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART_RE.findall(value))
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number of seconds or a string like '30s'")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {_short(value)}: must be a finite number >= 0")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"invalid duration {_short(value)}: at most 366 days")
    return seconds


@_bounded("size")
def parse_size(value: Any) -> int:
    """Bytes from 1024, "512Mi", "1G", "64KiB". Must be > 0."""
    _reject_bool(value, "a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"invalid size {value!r}: must be finite")
        size = int(value)
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"invalid size {value!r}: must be > 0")
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(
                f"invalid size {value!r}: expected bytes or a number with a unit "
                "(Ki, Mi, Gi, Ti, K, M, G, T), for example '512Mi'"
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"invalid size {value!r}: expected bytes or a string like '512Mi'")
    if size <= 0:
        raise ValueError(f"invalid size {_short(value)}: must be > 0")
    if size > MAX_SIZE:
        raise ValueError(f"invalid size {_short(value)}: too large (at most 1Ei)")
    return size


@_bounded("percentage")
def parse_percent(value: Any) -> float:
    """Percent from 50, 50.5, "50%", "50". Range 0..100."""
    _reject_bool(value, "a percentage")
    if isinstance(value, int | float):
        pct = float(value)
    elif isinstance(value, str):
        m = _PERCENT_RE.match(value)
        if not m:
            raise ValueError(f"invalid percentage {value!r}: expected a number like 5 or '5%'")
        pct = float(m.group(1))
    else:
        raise ValueError(f"invalid percentage {value!r}: expected a number like 5 or '5%'")
    if not 0 <= pct <= 100:
        raise ValueError(f"invalid percentage {_short(value)}: must be between 0 and 100")
    return pct


@_bounded("rate")
def parse_rate(value: Any) -> int:
    """Bits per second from 8000000, "8mbit", "1gbit" (tc's bit units; its byte units are refused)."""
    _reject_bool(value, "a rate")
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"invalid rate {value!r}: must be > 0")
        m = _RATE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m and unit in _BYTE_RATE_UNITS:
            n, (prefix, word) = m.group(1), _BYTE_RATE_UNITS[unit]
            if "B" in m.group(2):  # MBps: bytes, as everyone reads it
                raise ValueError(
                    f"invalid rate {value!r}: {m.group(2)} is {word}bytes per second; "
                    f"write it in bits: '{float(n) * 8:g}{prefix}bit'"
                )
            raise ValueError(
                f"invalid rate {value!r}: ambiguous: tc reads {m.group(2)} as {word}bytes per second "
                f"({n}{m.group(2)} = {float(n) * 8:g}{prefix}bit), networking as {word}bits; "
                f"write '{n}{prefix}bit' for {word}bits per second"
            )
        if not m or unit not in _RATE_UNITS:
            raise ValueError(
                f"invalid rate {value!r}: expected bits per second or a number with a "
                "unit (bit, kbit, mbit, gbit, tbit), for example '8mbit'"
            )
        rate = int(float(m.group(1)) * _RATE_UNITS[unit])
    else:
        raise ValueError(f"invalid rate {value!r}: expected bits per second or a string like '8mbit'")
    if rate <= 0:
        raise ValueError(f"invalid rate {_short(value)}: must be > 0")
    if rate > MAX_RATE:
        raise ValueError(f"invalid rate {_short(value)}: too large (at most 1000tbit)")
    return rate


def format_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.0f}ms"


def format_size(size: int) -> str:
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size >= factor:
            return f"{size / factor:.4g}{unit}"
    return f"{size}B"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION_RE.pattern}]},
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}]}),
]
Percent = Annotated[
    float,
    BeforeValidator(parse_percent),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": 100},
                {"type": "string", "pattern": _PERCENT_RE.pattern},
            ]
        }
    ),
]
Rate = Annotated[
    int,
    BeforeValidator(parse_rate),
    WithJsonSchema({"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}]}),
]
PositiveDuration = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(gt=0),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": _DURATION_RE.pattern}]},
    ),
]
