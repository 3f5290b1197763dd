"""Keep an idle agent small: import nats-py and pydantic without ``importlib.metadata``.

Both libraries read package metadata while they are imported: nats-py its own
version (``version("nats-py")``, sent in its CONNECT), pydantic the entry
points of its plugins. ``importlib.metadata`` brings email, zipfile, csv,
shutil, tempfile, bz2 and lzma with it: about 3 MiB of an idle agent's 40
(``bench/bench_agent_idle.py --explain``), for two strings an agent never
needs again.

So, once, before the agent's first import of either library, a stand-in
module answers those two lookups:

- ``version(name)``: read from the installed ``{name}-{version}.dist-info``
  directory's name (the wheel spec fixes that name), no file opened.
- ``entry_points``: the agent loads no pydantic plugins at all
  (``PYDANTIC_DISABLE_PLUGINS``): third-party code has no business hooking the
  validation of fault commands. pydantic then never calls it.

Anything else, or a lookup the stand-in cannot answer, imports the real
module and asks it, so behaviour never changes, only the cost. The stand-in
leaves ``sys.modules`` as soon as both imports are done: a later
``import importlib.metadata`` anywhere gets the real one. Where the real one
is already loaded (a test process, the controller) nothing is done.

An upstream change (a static ``__version__`` in nats-py) would make this
unnecessary.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from typing import Any

SHIMMED = ("nats.aio.client", "pydantic.plugin._loader")


def _real() -> types.ModuleType:
    shim = sys.modules.get("importlib.metadata")
    if shim is not None and getattr(shim, "__lean_stand_in__", False):
        del sys.modules["importlib.metadata"]  # needed after all: the real one takes its place for good
    return importlib.import_module("importlib.metadata")


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


def _fallback(attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)  # the import system probes __path__ and friends: not a lookup
    return getattr(_real(), attr)


def import_without_metadata() -> bool:
    """Import nats-py and pydantic's plugin loader behind the stand-in. True if it was used."""
    if "importlib.metadata" in sys.modules or any(m in sys.modules for m in SHIMMED):
        return False  # too late to save anything, or nothing to save: leave everything as it is
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    shim = types.ModuleType("importlib.metadata", "stand-in, see agent.lean")
    shim.version = _version  # type: ignore[attr-defined]
    shim.entry_points = _entry_points  # type: ignore[attr-defined]
    setattr(shim, "__getattr__", _fallback)  # noqa: B010  (a module-level __getattr__, PEP 562)
    shim.__lean_stand_in__ = True  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = shim
    try:
        for name in SHIMMED:
            importlib.import_module(name)
    finally:
        if sys.modules.get("importlib.metadata") is shim:
            del sys.modules["importlib.metadata"]
        if getattr(importlib, "metadata", None) is shim:
            delattr(importlib, "metadata")
    return True


# Importing this module does it: agent.main imports it before anything that loads nats-py or builds a model.
USED = import_without_metadata()
