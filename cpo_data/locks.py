"""One writer per dataset: a lock that a build holds from its first step to its publish.

Two builds of one dataset at once would both do all the work and both publish; with the lock
the second waits (`publish.lock_wait_s`) or stops at once with a message naming the holder.

- **Local disks**: `fcntl.flock` on `{dataset}/.lock`. The kernel releases it when its holder
  dies, however it dies, so a kill leaves no stale lock to clear by hand. The file also holds
  the holder's description (host, pid, since when, what), for the message a waiter prints.
- **Object stores** (no flock): a marker `{dataset}/.lock.json` with the holder and an expiry,
  created when absent or expired, read back to see who won, and renewed by a heartbeat thread
  while the holder lives. A killed holder's marker expires after `LEASE_S`. Without
  conditional writes two writers that start within the same moment can both believe they won
  the marker; the read-back narrows that window to the store's write latency.

A thread may take a dataset's lock again while it holds it (the build, then its publish);
another thread of the same process waits like any other writer (flock locks belong to an open
file, markers to a token, and each taking opens its own). A holder that runs the publish in
another thread (a Prefect task) hands it the `Held` that `dataset_lock` yields instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cpo_data.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
MARKER = ".lock.json"
LEASE_S = 600.0
"""How long an object-store marker stays valid without its heartbeat."""
HEARTBEAT_S = 60.0
POLL_S = 0.5


class LockBusy(UserError):
    """Another writer holds the dataset's lock."""


class LockLost(UserError):
    """The object-store marker of a held lock is no longer ours: its lease expired (the
    heartbeat could not renew it) and another writer took it, so ours must not publish."""


@dataclass(frozen=True)
class Held:
    """A dataset lock this process holds, as `dataset_lock` yields it: the proof a writer
    in another thread is handed (`VersionWriter(held=...)`) instead of taking the lock.
    `token` names this taking; on object stores it is the one in the marker."""

    key: str
    folder: str
    token: str


_mine = threading.local()
"""Per thread: key -> [Held, depth] of the locks this thread took (re-entry)."""
_live: dict[str, threading.Lock] = {}
"""Token -> guard of every lock held in this process now; the guard orders the heartbeat's
and `announce_writing`'s read-modify-writes of one marker, so neither undoes the other's."""
_live_lock = threading.Lock()


def key_of(fs: fsspec.AbstractFileSystem, folder: str) -> str:
    """What names one dataset's lock within a process."""
    return f"{type(fs).__name__}:{folder}"


def _thread_held() -> dict[str, list]:
    if not hasattr(_mine, "held"):
        _mine.held = {}
    return _mine.held


def check_held(held: Held, fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Raise ValueError unless `held` is the lock of dataset `folder` on `fs` and still held
    in this process: a writer handed it writes without taking the lock itself."""
    if held.key != key_of(fs, folder):
        raise ValueError(f"the lock handed over is {held.key!r}'s, not "
                         f"{key_of(fs, folder)!r}'s: a writer needs its own dataset's lock")
    with _live_lock:
        live = held.token in _live
    if not live:
        raise ValueError(f"the lock of {held.folder!r} handed over is no longer held (its "
                         "`with dataset_lock(...)` block has ended)")


def _describe(what: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return (f"{holder.get('what', 'a writer')} (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('since')})")


def _busy(where: str, holder: dict[str, Any] | None, waited: float) -> LockBusy:
    waited_text = f" after waiting {waited:g} s" if waited else ""
    return LockBusy(f"{where}: {_holder_text(holder)} is writing this dataset{waited_text}; "
                    "one writer at a time. Wait for it to finish (or set publish.lock_wait_s "
                    "to wait), or stop it")


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def _local_lock(folder: str, where: str, wait_s: float, what: str) -> Iterator[None]:
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    started = time.monotonic()
    with open(path, "a+", encoding="utf-8") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= wait_s:
                    handle.seek(0)
                    try:
                        holder = json.loads(handle.read() or "null")
                    except ValueError:
                        holder = None
                    raise _busy(where, holder, round(waited, 1)) from None
                time.sleep(POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_describe(what)))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _marker_valid(marker: dict[str, Any] | None) -> bool:
    return bool(marker) and float(marker.get("expires", 0)) > time.time()


@contextlib.contextmanager
def _marker_lock(fs: fsspec.AbstractFileSystem, folder: str, where: str, wait_s: float,
                 what: str, token: str, guard: threading.Lock) -> Iterator[None]:
    path = posixpath.join(folder, MARKER)
    started = time.monotonic()
    while True:
        marker = _read_json(fs, path)
        if not _marker_valid(marker):
            # A dead holder's half-written version is named on, for the new holder to remove;
            # one that died before writing passes on what its own predecessor left.
            old = marker or {}
            mine = {**_describe(what), "token": token, "expires": time.time() + LEASE_S,
                    "writing": None, "abandoned": old.get("writing") or old.get("abandoned")}
            fs.pipe_file(path, json.dumps(mine).encode())
            marker = _read_json(fs, path)
            if marker and marker.get("token") == token:
                break
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise _busy(where, marker, round(waited, 1))
        time.sleep(POLL_S)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with guard:
                    current = _read_json(fs, path)
                    if not current or current.get("token") != token:
                        log.warning("%s: the lock was taken over after its lease expired; "
                                    "no longer renewing it", where)
                        return
                    fs.pipe_file(path, json.dumps({**current,
                                                   "expires": time.time() + LEASE_S}).encode())
            except Exception as error:  # noqa: BLE001 - a network blip must not end the lease
                # Stopping here would let the lease expire under a live holder; the next beat
                # tries again, well within LEASE_S.
                log.warning("%s: could not renew the lock (%s: %s); trying again in %g s",
                            where, type(error).__name__, error, HEARTBEAT_S)

    heartbeat = threading.Thread(target=renew, name="cpo-data-lock-heartbeat", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        current = _read_json(fs, path)
        if current and current.get("token") == token:
            fs.rm_file(path)


def writing_now(fs: fsspec.AbstractFileSystem, folder: str) -> str | None:
    """On an object store: the version folder a live writer is filling in place (its files
    are there before its manifest), else None. Local writers fill a hidden temporary folder."""
    if isinstance(fs, LocalFileSystem):
        return None
    marker = _read_json(fs, posixpath.join(folder, MARKER))
    return marker.get("writing") if _marker_valid(marker) else None


def abandoned_version(fs: fsspec.AbstractFileSystem, folder: str) -> str | None:
    """On an object store, for the holder of the lock: the version folder that the previous
    holder was filling when its marker expired (it died mid-publish), else None."""
    if isinstance(fs, LocalFileSystem):
        return None
    return (_read_json(fs, posixpath.join(folder, MARKER)) or {}).get("abandoned")


def unfinished_versions(fs: fsspec.AbstractFileSystem, folder: str) -> set[str]:
    """On an object store: the version folders the marker names as filled in place, live or
    not: a live writer's, an expired one's (`writing`, its writer died) and the one the
    holder is to remove (`abandoned`). None of them is a version while it has no manifest,
    nor damage: the next writer removes a dead one's. Empty on local disks."""
    if isinstance(fs, LocalFileSystem):
        return set()
    marker = _read_json(fs, posixpath.join(folder, MARKER)) or {}
    return {name for name in (marker.get("writing"), marker.get("abandoned"))
            if isinstance(name, str) and name}


def _guard(held: Held) -> threading.Lock:
    with _live_lock:
        guard = _live.get(held.token)
    if guard is None:
        raise LockLost(f"{held.folder}: the dataset's lock is no longer held (its "
                       "`with dataset_lock(...)` block has ended); not writing the version")
    return guard


def _lost(folder: str) -> LockLost:
    return LockLost(f"{folder}: the dataset's lock was lost (its lease expired, and the "
                    "marker is another writer's or gone); not writing the version")


def check_lease(fs: fsspec.AbstractFileSystem, folder: str, held: Held) -> None:
    """Raise LockLost unless `held` is still held here and, on an object store, the marker
    still carries its token: a writer checks this before it makes a version visible."""
    guard = _guard(held)
    if isinstance(fs, LocalFileSystem):
        return  # the kernel keeps a flock while its holder lives
    with guard:
        marker = _read_json(fs, posixpath.join(folder, MARKER))
    if not marker or marker.get("token") != held.token:
        raise _lost(folder)


def announce_writing(fs: fsspec.AbstractFileSystem, folder: str, version: str,
                     held: Held) -> None:
    """Object stores: record in the held marker which version folder is being written, so
    readers skip it while it has no manifest and the next writer removes it if we die.
    LockLost when the marker is no longer `held`'s: then nothing may be written."""
    guard = _guard(held)
    if isinstance(fs, LocalFileSystem):
        return
    path = posixpath.join(folder, MARKER)
    with guard:  # the heartbeat rewrites the marker too
        marker = _read_json(fs, path)
        if not marker or marker.get("token") != held.token:
            raise _lost(folder)
        fs.pipe_file(path, json.dumps({**marker, "writing": version}).encode())


@contextlib.contextmanager
def dataset_lock(fs: fsspec.AbstractFileSystem, folder: str, where: str, *, wait_s: float = 0.0,
                 what: str = "a build") -> Iterator[Held]:
    """Hold the lock of the dataset folder `folder` (named `where` in messages) for the
    block, which gets the `Held`; wait up to `wait_s` seconds for a holder to finish, then
    raise LockBusy naming it. Re-entrant within a thread (the same `Held` again); another
    thread waits as any writer does, unless it is handed the `Held`."""
    key = key_of(fs, folder)
    mine = _thread_held()
    if key in mine:
        # Taken again by its holder: taking it anew would wait on ourselves (flock) or on
        # our own live marker.
        mine[key][1] += 1
        try:
            yield mine[key][0]
        finally:
            mine[key][1] -= 1
        return
    token, guard = os.urandom(8).hex(), threading.Lock()
    manager = (_local_lock(folder, where, wait_s, what) if isinstance(fs, LocalFileSystem)
               else _marker_lock(fs, folder, where, wait_s, what, token, guard))
    with manager:
        held = Held(key, folder, token)
        with _live_lock:
            _live[token] = guard
        mine[key] = [held, 1]
        try:
            yield held
        finally:
            del mine[key]
            with _live_lock:
                _live.pop(token, None)
