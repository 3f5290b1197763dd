"""Keep an idle agent small: import nats-py and pydantic without what they never use here.

Both libraries import modules an agent never calls into:

- package metadata: nats-py reads its own version (``version("nats-py")``,
  sent in its CONNECT), pydantic the entry points of its plugins, and
  ``importlib.metadata`` brings email, zipfile, csv, shutil, tempfile, bz2 and
  lzma with it;
- ``email.parser``: nats-py's JetStream modules (imported by its core client
  whether JetStream is used or not) import ``BytesParser`` for JetStream
  headers. The email package costs about 1 MiB, and an agent uses no JetStream.

So, once, before the agent's first import of either library, stand-in modules
answer what those imports look up:

- ``importlib.metadata.version(name)``: read from the installed
  ``{name}-{version}.dist-info`` directory's name (the wheel spec fixes that
  name), no file opened.
- ``importlib.metadata.entry_points``: the agent loads no pydantic plugins at
  all (``PYDANTIC_DISABLE_PLUGINS``): third-party code has no business hooking
  the validation of fault commands. pydantic then never calls it.
- ``email.parser.BytesParser``: a class whose construction imports the real
  module and returns a real parser, so JetStream would work as before.

Anything else, or a lookup a stand-in cannot answer, imports the real module
and asks it, so behaviour never changes, only the cost. The stand-ins leave
``sys.modules`` as soon as the imports are done: a later import anywhere gets
the real module. Where a real one is already loaded (a test process, the
controller) nothing is done.

Upstream changes (a static ``__version__`` in nats-py, its JetStream modules
imported on first use) would make this unnecessary.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import re
import sys
import types
from typing import Any

SHIMMED = ("nats.aio.client", "pydantic.plugin._loader")


def _real(name: str = "importlib.metadata") -> types.ModuleType:
    shim = sys.modules.get(name)
    if shim is not None and getattr(shim, "__lean_stand_in__", False):
        del sys.modules[name]  # needed after all: the real one takes its place for good
    return importlib.import_module(name)


def _dist_version(name: str) -> str | None:
    """The version in ``{name}-{version}.dist-info`` on sys.path, or None when not found that way."""
    want = re.sub(r"[-_.]+", "_", name).lower() + "-"
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                for d in it:
                    n = d.name
                    if n.endswith(".dist-info") and n.lower().startswith(want):
                        return n[len(want) : -len(".dist-info")]
        except OSError:
            continue
    return None


def _version(name: str) -> str:
    found = _dist_version(name)
    if found is not None:
        return found
    result: str = _real().version(name)  # not installed as a wheel: ask the real module
    return result


def _entry_points(**selection: Any) -> Any:
    return _real().entry_points(**selection)


class _BytesParser:
    """Stand-in for ``email.parser.BytesParser``: constructing one gives a real one."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _real("email.parser").BytesParser(*args, **kwargs)


def _fallback_to(name: str) -> Any:
    def fallback(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)  # the import system probes __path__ and friends: not a lookup
        return getattr(_real(name), attr)

    return fallback


def _stand_in(name: str, **attrs: Any) -> types.ModuleType:
    shim = types.ModuleType(name, "stand-in, see agent.lean")
    for key, value in attrs.items():
        setattr(shim, key, value)
    setattr(shim, "__getattr__", _fallback_to(name))  # noqa: B010  (a module-level __getattr__, PEP 562)
    shim.__lean_stand_in__ = True  # type: ignore[attr-defined]
    return shim


def import_lean() -> bool:
    """Import nats-py and pydantic's plugin loader behind the stand-ins. True if they were used."""
    if "importlib.metadata" in sys.modules or any(m in sys.modules for m in SHIMMED):
        return False  # too late to save anything, or nothing to save: leave everything as it is
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    shims = {"importlib.metadata": _stand_in("importlib.metadata", version=_version, entry_points=_entry_points)}
    if "email.parser" not in sys.modules:
        shims["email.parser"] = _stand_in("email.parser", BytesParser=_BytesParser)
    sys.modules.update(shims)
    try:
        for name in SHIMMED:
            importlib.import_module(name)
    finally:
        for name, shim in shims.items():
            if sys.modules.get(name) is shim:
                del sys.modules[name]
        if getattr(importlib, "metadata", None) is shims["importlib.metadata"]:
            delattr(importlib, "metadata")
    return True


def release_startup_memory() -> None:
    """Hand start-up garbage (imports, schema builds, the probe) back to the OS.

    An agent runs on every node for months; what its start-up left on the
    heap would otherwise count against the node for as long. What survives
    (modules, models, schemas, the connection) lives as long as the process,
    so it is frozen out of the cyclic collector's passes: a collection then
    walks only what the agent made since, and never pauses the loop long.
    """
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere a no-op


# Importing this module does it: agent.main imports it before anything that loads nats-py or builds a model.
USED = import_lean()
