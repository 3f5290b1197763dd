"""netem delay distribution tables, and a netem qdisc that carries one.

netem's jitter is uniform unless the qdisc is given TCA_NETEM_DELAY_DIST: an
array of signed 16-bit samples of the inverse CDF, scaled so that
NETEM_DIST_SCALE (8192) is one standard deviation. For each packet the kernel
picks a random entry t and delays by ``delay + jitter * t / 8192``.

tc reads these tables from <libdir>/tc/<name>.dist, which iproute2 generates at
build time with netem/normal.c, pareto.c and paretonormal.c (public domain,
from NIST Net). We generate the same tables here instead of reading the files:
the agent must not depend on iproute2 being installed on the node (distroless
images do not ship it, and Debian moved the files from /usr/lib/tc to
/usr/lib/<triplet>/tc). tests/unit/test_netem_dist.py checks that the tables
are identical to the shipped files wherever those exist.

pyroute2's netem encoder maps TCA_NETEM_DELAY_DIST to 'none' (it cannot send
one), so a netem with a table is built here as our own tcmsg whose options
class carries the attribute as raw bytes, and sent with nlm_request_batch.
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path
from typing import Any, Literal

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

Distribution = Literal["normal", "pareto", "paretonormal"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("normal", "pareto", "paretonormal")
NETEM_DIST_SCALE = 8192
NETEM_DIST_MAX = 16384  # entries; the kernel refuses a longer table with EINVAL
_TABLESIZE = 16384  # resolution of the generators' inverse CDF; every 4th entry is emitted
_SHRT_MIN, _SHRT_MAX = -32768, 32767
_PARETO_SHAPE = 3.0
# Where distributions ship the iproute2 files (used by the tests, never by the agent).
DIST_DIRS = (Path("/usr/lib/tc"), Path("/usr/lib64/tc"), Path("/usr/lib/x86_64-linux-gnu/tc"),
             Path("/usr/lib/aarch64-linux-gnu/tc"), Path("/usr/share/tc"))  # fmt: skip


def _clamp16(value: int) -> int:
    return max(_SHRT_MIN, min(_SHRT_MAX, value))


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero), as paretonormal.c uses."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


@functools.cache
def _normal_inverse() -> tuple[float, ...]:
    """normal.c's table[]: for each CDF step i, the last x with rint(16384 * Phi(x)) == i.

    The float loop is reproduced step by step (x accumulates .00005, like the C
    double) so that rounding lands on exactly the same entries. Python's round()
    on floats rounds half to even, like rint() in the default rounding mode.
    """
    table = [0.0] * (_TABLESIZE + 1)
    x = -10.0
    sqrt2 = math.sqrt(2.0)
    while x < 10.05:
        table[round(_TABLESIZE * (0.5 + 0.5 * math.erf(x / sqrt2)))] = x
        x += 0.00005
    return tuple(table)


def _normal_value(i: int) -> int:
    # Not clamped: normal.c clamps its output, paretonormal.c mixes the raw value.
    return round(_normal_inverse()[i] * NETEM_DIST_SCALE)


def _pareto_value(i: int) -> int:
    """pareto.c / paretonormal.c: Pareto(a=3) inverse CDF at i/65536, shifted and scaled."""
    value = 1.0 / math.pow(i / 65536.0, 1.0 / _PARETO_SHAPE)
    value -= 1.5
    value *= (4.0 / 3.0) * NETEM_DIST_SCALE
    return round(min(value, 32767.0))


@functools.cache
def table(name: Distribution) -> tuple[int, ...]:
    """The 4096-entry table iproute2 ships as <name>.dist."""
    if name == "normal":
        return tuple(_clamp16(_normal_value(i)) for i in range(0, _TABLESIZE, 4))
    if name == "pareto":
        return tuple(_pareto_value(i) for i in range(65536, 0, -16))
    if name == "paretonormal":
        # .25 * normal + .75 * pareto, in C integer arithmetic.
        return tuple(
            _clamp16(_c_div(_normal_value(i) + 3 * _pareto_value(65536 - 4 * i), 4)) for i in range(0, _TABLESIZE, 4)
        )
    raise ValueError(f"unknown distribution {name!r}: expected one of {', '.join(DISTRIBUTIONS)}")


def read_dist_file(path: Path) -> tuple[int, ...]:
    """Parse an iproute2 .dist file: '#' comment lines, then whitespace-separated integers."""
    values: list[int] = []
    for line in path.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            values.extend(int(word) for word in line.split())
    return tuple(values)


def shipped_dist_file(name: str) -> Path | None:
    for directory in DIST_DIRS:
        candidate = directory / f"{name}.dist"
        if candidate.is_file():
            return candidate
    return None


def encode(values: tuple[int, ...]) -> bytes:
    """The attribute payload: host-endian __s16 array, as the kernel reads it."""
    if not 0 < len(values) <= NETEM_DIST_MAX:
        raise ValueError(f"a netem table has 1..{NETEM_DIST_MAX} entries, not {len(values)}")
    return struct.pack(f"={len(values)}h", *values)


class NetemOptions(sched_netem.options):  # type: ignore[misc]
    """pyroute2's netem options with TCA_NETEM_DELAY_DIST as raw bytes instead of 'none'."""

    # pyroute2 compiles a class's nla_map once and marks that in a class attribute
    # (nlmsg_base's name-mangled __compiled_nla) which a subclass inherits: once the
    # parent has been used, the subclass would silently encode with the parent's
    # map (our table dropped: an empty attribute, EINVAL). False: compile our own.
    _nlmsg_base__compiled_nla = False

    nla_map = tuple(
        ("TCA_NETEM_DELAY_DIST", "cdata") if name == "TCA_NETEM_DELAY_DIST" else (name, kind)
        for name, kind in sched_netem.options.nla_map
    )


class NetemQdiscMsg(tcmsg):  # type: ignore[misc]
    """A tcmsg whose TCA_OPTIONS always encode (and decode) as NetemOptions."""

    _nlmsg_base__compiled_nla = False  # see NetemOptions

    nla_map = tuple(
        ("TCA_OPTIONS", "netem_options") if name == "TCA_OPTIONS" else (name, kind) for name, kind in tcmsg.nla_map
    )
    netem_options = NetemOptions


def netem_msg(index: int, handle: int, parent: int, params: dict[str, Any], dist: Distribution) -> Any:
    """RTM_NEWQDISC body for netem with a delay table; params are pyroute2's tc() netem keywords."""
    options = sched_netem.get_parameters(params)
    if not options["jitter"]:
        # netem returns the mean delay when jitter is 0: the table would be silently ignored.
        raise ValueError("a delay distribution needs jitter")
    options["attrs"].append(["TCA_NETEM_DELAY_DIST", encode(table(dist))])
    msg = NetemQdiscMsg()
    msg["family"] = 0
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = parent
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", options]]
    return msg


def add_netem(ipr: Any, index: int, handle: int, parent: int, params: dict[str, Any], dist: Distribution) -> None:
    """Create the netem qdisc with its delay table. Raises NetlinkError like ipr.tc('add', ...)."""
    msg = netem_msg(index, handle, parent, params, dist)
    msg["header"]["type"] = RTM_NEWQDISC
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    # Not the sync nlm_request(): in pyroute2 0.9 it reads a status key the sync
    # socket lacks (KeyError). The batch call waits for the ACK and raises NetlinkError.
    ipr.nlm_request_batch([msg])
