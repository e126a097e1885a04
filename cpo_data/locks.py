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

A process may take a dataset's lock again while it holds it (the build, then its publish).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cpo_data.errors import UserError

LOCK_FILE = ".lock"
MARKER = ".lock.json"
LEASE_S = 600.0
"""How long an object-store marker stays valid without its heartbeat."""
HEARTBEAT_S = 60.0
POLL_S = 0.5


class LockBusy(UserError):
    """Another writer holds the dataset's lock."""


_held: dict[str, int] = {}
_held_lock = threading.Lock()


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
                 what: str) -> Iterator[None]:
    path = posixpath.join(folder, MARKER)
    token = os.urandom(8).hex()
    started = time.monotonic()
    while True:
        marker = _read_json(fs, path)
        if not _marker_valid(marker):
            # A dead holder's half-written version is named on, for the new holder to remove.
            mine = {**_describe(what), "token": token, "expires": time.time() + LEASE_S,
                    "writing": None, "abandoned": (marker or {}).get("writing")}
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
            current = _read_json(fs, path)
            if not current or current.get("token") != token:
                return  # taken over after an expiry: nothing of ours left to renew
            fs.pipe_file(path, json.dumps({**current, "expires": time.time() + LEASE_S})
                         .encode())

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


def announce_writing(fs: fsspec.AbstractFileSystem, folder: str, version: str) -> None:
    """Object stores: record in the held marker which version folder is being written, so
    readers skip it while it has no manifest and the next writer removes it if we die."""
    if isinstance(fs, LocalFileSystem):
        return
    path = posixpath.join(folder, MARKER)
    marker = _read_json(fs, path) or {}
    fs.pipe_file(path, json.dumps({**marker, "writing": version}).encode())


@contextlib.contextmanager
def dataset_lock(fs: fsspec.AbstractFileSystem, folder: str, where: str, *, wait_s: float = 0.0,
                 what: str = "a build") -> Iterator[None]:
    """Hold the lock of the dataset folder `folder` (named `where` in messages) for the
    block; wait up to `wait_s` seconds for a holder to finish, then raise LockBusy naming
    it. Re-entrant within a process."""
    key = f"{type(fs).__name__}:{folder}"
    with _held_lock:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    manager = (_local_lock(folder, where, wait_s, what) if isinstance(fs, LocalFileSystem)
               else _marker_lock(fs, folder, where, wait_s, what))
    with manager:
        with _held_lock:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_lock:
                _held.pop(key, None)
