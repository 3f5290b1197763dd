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
- ``nats.js``: nats-py's core client imports its JetStream package (seven
  modules, about 0.85 MiB with what they import) and touches it only for a
  message with headers or a JetStream call, neither of which an agent makes.
  The stand-in imports the real package on its first attribute lookup and
  puts it in its place (in ``sys.modules`` and on the ``nats`` package) for
  good; until then it is the one stand-in that stays.

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
import importlib.machinery
import os
import re
import sys
import types
from typing import Any, cast

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


def _real_jetstream() -> types.ModuleType:
    """Put the real ``nats.js`` in the stand-in's place for good (in ``sys.modules`` and on the
    ``nats`` package) and return it."""
    if getattr(sys.modules.get("nats.js"), "__lean_stand_in__", False):
        del sys.modules["nats.js"]
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_JETSTREAM_FINDER)
    real = importlib.import_module("nats.js")
    sys.modules["nats"].js = real  # type: ignore[attr-defined]
    return real


class _Loaded:
    """A loader for a module that is already loaded: the import statement gets it as it is."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module

    def create_module(self, spec: Any) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _JetStreamSubmodules:
    """``import nats.js.api`` (or any submodule) while the stand-in is in place: the real package
    is imported first (it imports its submodules), and the statement gets the real module."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not name.startswith("nats.js.") or not getattr(sys.modules.get("nats.js"), "__lean_stand_in__", False):
            return None
        real = _real_jetstream()
        module = sys.modules.get(name)
        if module is not None:
            return importlib.machinery.ModuleSpec(name, cast(Any, _Loaded(module)))
        return importlib.machinery.PathFinder.find_spec(name, real.__path__)


_JETSTREAM_FINDER = _JetStreamSubmodules()


def _lazy_jetstream() -> types.ModuleType:
    """A stand-in for the ``nats.js`` package: its first attribute lookup, or the first import of
    one of its submodules (``_JetStreamSubmodules``), imports the real one in its place."""

    def load(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)  # the import system probes __path__ and friends
        return getattr(_real_jetstream(), attr)

    shim = types.ModuleType("nats.js", "stand-in, see agent.lean")
    shim.__path__ = []  # a package, so `import nats.js` accepts it
    setattr(shim, "__getattr__", load)  # noqa: B010
    shim.__lean_stand_in__ = True  # type: ignore[attr-defined]
    sys.meta_path.insert(0, _JETSTREAM_FINDER)
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
    jetstream = _lazy_jetstream() if "nats.js" not in sys.modules else sys.modules["nats.js"]
    sys.modules["nats.js"] = jetstream  # stays until JetStream is used: see _lazy_jetstream
    try:
        for name in SHIMMED:
            importlib.import_module(name)
        if getattr(jetstream, "__lean_stand_in__", False):
            sys.modules["nats"].js = jetstream  # type: ignore[attr-defined]  # `nats.js.api` finds it
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
