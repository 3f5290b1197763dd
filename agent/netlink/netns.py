"""Run an IPRoute inside another network namespace.

A namespace is named the way the spec names it: a name under /run/netns, an
absolute path (``/proc/PID/ns/net``), or a bare pid. We enter it with
setns(2) on the *calling thread only* (network namespaces are per thread),
open the netlink socket there, and switch straight back: a netlink socket
stays bound to the namespace it was created in. pyroute2's own ``netns=``
forks a helper per socket (tens of ms) and creates missing named namespaces;
we want neither.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(Exception):
    """The namespace cannot be resolved or entered; str() is the reason."""


def netns_path(netns: str | None) -> str | None:
    """The filesystem path of a namespace given as a name, a path or a pid (None: ours)."""
    if netns is None:
        return None
    value = netns.strip()
    if value.isdigit():
        return f"/proc/{int(value)}/ns/net"
    if value.startswith("/"):
        return value
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise NetnsError(f"invalid netns {netns!r}: expected a name under {NETNS_RUN_DIR}, a path or a pid")
    return f"{NETNS_RUN_DIR}/{value}"


def netns_inode(netns: str | None) -> int:
    """Inode of the namespace: two spellings of one namespace give the same number."""
    path = netns_path(netns) or "/proc/thread-self/ns/net"
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise NetnsError(f"network namespace {netns!r} not found ({path}: {exc.strerror})") from None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Switch this thread into the namespace at path for the block, then back."""
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"network namespace {path} not found: {exc.strerror}") from None
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise NetnsError(f"cannot enter network namespace {path}: {exc.strerror}") from None
        try:
            yield
        finally:
            # If this fails the worker thread is stranded in the other namespace;
            # let it raise loudly rather than run later calls in the wrong place.
            _setns(saved)
    finally:
        os.close(saved)
        os.close(target)


def open_iproute(netns: str | None) -> IPRoute:
    """A new IPRoute (with the kernel's extended error text) bound to the namespace."""
    path = netns_path(netns)
    if path is None:
        return IPRoute(ext_ack=True)
    with entered(path):
        return IPRoute(ext_ack=True)


@contextmanager
def iproute(netns: str | None) -> Iterator[IPRoute]:
    ipr = open_iproute(netns)
    try:
        yield ipr
    finally:
        ipr.close()
