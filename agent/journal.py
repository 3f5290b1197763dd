"""The on-disk journal: one file per fault, written before the agent acts.

Write is atomic and durable: a temporary file is written and fsynced, renamed
over the entry, and the directory is fsynced so the rename itself survives a
power cut. An entry is removed only after its revert finished. At start the
runtime reverts whatever the journal holds (invariant 4).

A corrupt entry (not JSON: a dying disk, a hand edit) is moved aside to
``*.corrupt``; an entry that is JSON but that this agent cannot read (written
by a newer agent, before a downgrade) stays where it is, for an agent that
can. Both are reported, never silently dropped and never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proto.codec import format_validation_error
from proto.faults import FaultSpec
from proto.messages import JournalProblem, PodRef

log = logging.getLogger(__name__)

T = TypeVar("T")


class JournalEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)  # built on first use, not by an idle agent

    fault_id: str
    experiment_id: str
    spec: FaultSpec
    expires_at: float
    lease_timeout_s: float
    pods: list[PodRef] | None = None
    plan: dict[str, Any] | None = Field(
        None, description="the injector's plan (validated by its plan_model); None until planned"
    )
    created_at: float = Field(default_factory=time.time)
    command_id: str | None = None


@dataclass(frozen=True)
class KeptFile:
    """A journal file that is no entry this agent can act on: kept, never dropped."""

    name: str
    problem: JournalProblem  # "unreadable" (not JSON; set aside) | "unrecognised" (JSON it cannot read; in place)
    reason: str
    fault_id: str | None = None
    experiment_id: str | None = None
    kind: str | None = None


def _text(obj: Any, *keys: str) -> str | None:
    """obj[keys[0]][keys[1]]... when that is text (shortened), else None."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj[:100] if isinstance(obj, str) else None


class Journal:
    def __init__(self, state_dir: Path, executor: Executor | None = None) -> None:
        """``executor``: a pool shared by many journals (a simulation of a thousand agents in one
        process, where a thousand threads would contend for the interpreter lock as a thousand
        nodes never do); the journal does not shut it down. Default: a thread of its own."""
        self.dir = Path(state_dir) / "journal"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # writes and removals one at a time (they run in worker threads): a late write of an
        # entry (replace_only) never brings back one its fault's end has removed
        self._lock = threading.RLock()
        # The journal's own thread: a stalled disk (an fsync that does not return) holds up
        # journal work only, never the event loop's shared pool, which reverts need (netlink
        # scans, process scans). One thread: the work is serialised by the lock anyway, and
        # queued calls wait in order without each holding a thread.
        self._executor: Executor | None = executor
        self._owns_executor = executor is None

    def off_loop(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a journal call on the journal's thread; calls run one after another, in order
        (with a shared pool, as in a simulation, only the journal's lock orders them)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
            self._owns_executor = True
        return asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def close(self) -> None:
        """Let the journal's thread go once its queue is done (never waits: it may be stalled)."""
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _path(self, fault_id: str) -> Path:
        # fault ids are validated to [A-Za-z0-9_.-]; refuse anything that could escape the directory
        if "/" in fault_id or fault_id in (".", "..") or not fault_id:
            raise ValueError(f"unsafe fault id {fault_id!r}")
        return self.dir / f"{fault_id}.json"

    def entry_name(self, fault_id: str) -> str:
        return self._path(fault_id).name

    def write(self, entry: JournalEntry, replace_only: bool = False) -> bool:
        """Write the entry (fsync'd). ``replace_only``: only in place of one that is still there;
        False when there was none (the fault has ended and its entry is gone), nothing written."""
        path = self._path(entry.fault_id)
        tmp = path.with_suffix(".json.tmp")
        data = entry.model_dump_json(by_alias=True).encode()
        with self._lock:
            if replace_only and not path.exists():
                return False
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._fsync_dir()
        return True

    def remove(self, fault_id: str) -> None:
        with self._lock, contextlib.suppress(FileNotFoundError):
            self._path(fault_id).unlink()
            self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> tuple[list[JournalEntry], list[KeptFile]]:
        """All entries, oldest first, and the files that are none this agent can act on.

        A file that is not JSON is moved aside to ``*.corrupt`` (never parsed again, never
        dropped); those set aside at an earlier start are listed again, every time, until an
        operator has dealt with what they guarded and removed them. A JSON object this agent
        cannot read stays in place: a newer agent's entry, reverted by the next one that can."""
        entries: list[JournalEntry] = []
        kept: list[KeptFile] = []
        for tmp in self.dir.glob("*.json.tmp"):
            # a write that never reached its rename: the act it guarded never happened
            with contextlib.suppress(OSError):
                tmp.unlink()
        for path in sorted(self.dir.glob("*.corrupt")):
            kept.append(KeptFile(path.name, "unreadable", "not JSON; set aside at an earlier start"))
        for path in sorted(self.dir.glob("*.json")):
            try:
                entry, problem = self._parse(path.read_bytes())
            except OSError as exc:
                kept.append(KeptFile(path.name, "unreadable", f"cannot read the file: {exc}"))
                continue
            if entry is not None:
                entries.append(entry)
            elif isinstance(problem, KeptFile):
                kept.append(dataclasses.replace(problem, name=path.name))
            else:
                kept.append(self._set_aside(path, problem or "not JSON"))
        entries.sort(key=lambda e: e.created_at)
        return entries, kept

    def _parse(self, data: bytes) -> tuple[JournalEntry | None, KeptFile | str | None]:
        """(entry, None); (None, KeptFile) for a JSON object this agent cannot read; (None, why)
        for what is not a JSON object at all."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return None, f"not JSON: {' '.join(str(exc).split())[:150]}"
        if not isinstance(obj, dict):
            return None, f"not a JSON object but {type(obj).__name__}"
        try:
            return JournalEntry.model_validate(obj), None
        except ValidationError as exc:
            why = f"this agent cannot read it ({format_validation_error(exc)}); kept in place for an agent that can"
            kind = _text(obj, "spec", "kind")
            return None, KeptFile("", "unrecognised", why, _text(obj, "fault_id"), _text(obj, "experiment_id"), kind)

    def _set_aside(self, path: Path, why: str) -> KeptFile:
        aside = self._aside(path)
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.error("could not move %s aside: %s", path.name, exc)
            return KeptFile(path.name, "unreadable", f"{why}; could not be set aside: {exc}")
        return KeptFile(aside.name, "unreadable", f"{why}; set aside as {aside.name}")

    def _aside(self, path: Path) -> Path:
        """Where a corrupt entry goes: ``NAME.corrupt``, never over an earlier one."""
        aside = path.with_suffix(".corrupt")
        n = 1
        while aside.exists():
            aside = path.with_suffix(f".{n}.corrupt")
            n += 1
        return aside

    # Tombstones: a fault that ended is never re-injected by a replayed command,
    # also across a restart, until its own deadline has passed.
    def mark_ended(self, fault_id: str, state: str, expires_at: float) -> None:
        ended = self.dir / "ended"
        ended.mkdir(exist_ok=True)
        # whole or not at all (a temporary name, then a rename): a pruning pass reading it half
        # written would take it for expired and delete it
        self._path(fault_id)  # the same ids as entries: nothing that names a directory
        tmp = ended / f".{fault_id}.tmp"
        try:
            tmp.write_text(json.dumps({"state": state, "expires_at": expires_at}))
            os.replace(tmp, ended / fault_id)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def finish(self, fault_id: str, state: str, expires_at: float, remove: bool) -> None:
        """Tombstone first, then drop the entry: a crash in between only repeats an idempotent revert."""
        self.mark_ended(fault_id, state, expires_at)
        if remove:
            self.remove(fault_id)

    def finish_many(self, done: list[tuple[str, str, float, bool]]) -> None:
        """finish() for a batch (fault id, state, expires_at, remove), with one directory fsync."""
        with self._lock:
            self._finish_many(done)

    def _finish_many(self, done: list[tuple[str, str, float, bool]]) -> None:
        removed = False
        problems: list[str] = []
        for fault_id, state, expires_at, remove in done:
            # one entry's problem is that entry's: the rest of the batch is finished all the same
            try:
                self.mark_ended(fault_id, state, expires_at)
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        self._path(fault_id).unlink()
                        removed = True
            except (OSError, ValueError) as exc:
                problems.append(f"{fault_id}: {exc}")
        if removed:
            self._fsync_dir()
        if problems:
            raise OSError(f"{len(problems)} of {len(done)} not finished: {'; '.join(problems[:5])}")

    def load_ended(self) -> dict[str, tuple[str, float]]:
        """The tombstones still in force; those past their deadline are removed (at start, and
        from time to time while the agent runs: one file per fault, for months)."""
        out: dict[str, tuple[str, float]] = {}
        now = time.time()
        ended = self.dir / "ended"
        if not ended.is_dir():
            return out
        for path in ended.iterdir():
            if path.name.startswith("."):  # one being written (or left by a crash mid-write)
                if path.name.endswith(".tmp") and path.stat().st_mtime < now - 3600:
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            try:
                obj = json.loads(path.read_text())
                state, expires_at = str(obj["state"]), float(obj["expires_at"])
            except (OSError, ValueError, KeyError, TypeError):
                state, expires_at = "unknown", 0.0
            if expires_at < now:
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                out[path.name] = (state, expires_at)
        return out

    def read(self, fault_id: str) -> JournalEntry | None:
        """One entry; None when there is none. Raises ValueError, with the reason, when it cannot
        be read (the file is left as it is)."""
        try:
            data = self._path(fault_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"cannot read the file: {exc}") from None
        entry, problem = self._parse(data)
        if entry is None:
            raise ValueError(problem.reason if isinstance(problem, KeptFile) else problem)
        return entry

    def fault_ids(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json"))
