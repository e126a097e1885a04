"""A content-addressed cache: key -> JSON value, in append-only Parquet segments.

Used by generation (key: source text under one generator identity) and scoring (key: src + mt
under one scorer identity), so that a refresh costs only what is new.

Why segments: every `put_many` writes one new file with a unique name and never touches another,
so any number of processes (or Dask workers on shared storage) can write at once without locks,
and a reader sees a segment whole or not at all (local: written under a temporary name, then
renamed; object stores: one object put). Reads are single-threaded: Arrow's CPU thread pool
can abort the interpreter at exit ("terminate called without an active exception",
apache/arrow#34314), seen here in about 1 of 40 short processes, and segments are small.

Readers index each segment's keys once (`_Index`): 12 bytes an entry (an 8-byte digest of the
key and the segment's number), not the keys and values themselves, so a cache of millions of
entries costs tens of MB in a process and a build's memory does not grow with everything it
ever scored. A lookup reads the segments that hold the keys it finds, values only for those
keys; a shard's entries were written together, so that is usually one segment. When two
writers stored the same key, the values are equal by construction (same content, same
identity), so the first one indexed wins. `open_cache` hands every caller in a process the
same object per folder, so a build of many shards indexes each segment once instead of once
per shard (which grew with the square of the shard count).

After a kill: a segment that does not parse (torn: cut short by a crash of a file system
that renamed before it flushed, a full disk, a partial copy) is skipped with one warning and
moved aside as `torn-<name>`, so that its entries are recomputed and stored again by the next
`put_many` and no later reader trips on it. Moved aside, not deleted: keeping it costs some
disk, while deleting a file that only this reader's pyarrow fails on (one a newer pyarrow
wrote) would lose it for every reader. Temporary files of writers that were killed between write
and rename are removed by the next writer (`leftovers.sweep`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cpo_data.leftovers import stamped, sweep

log = logging.getLogger(__name__)

_SEGMENT_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])
_TEMPORARY = ".tmp-seg-"  # + owner tag: see `leftovers.stamped`

Item = TypeVar("Item")
Value = TypeVar("Value")


def identity_key(identity: dict[str, Any]) -> str:
    """Short stable hash of a generator or scorer identity: the cache namespace."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def key_digest(key: str) -> int:
    """A 64-bit digest of a cache key. Two keys sharing one (about 1e-7 odds among 2M
    entries) can only make a lookup miss, which recomputes an equal value."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _digests(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter(map(key_digest, keys), dtype=np.uint64, count=len(keys))


class _Index:
    """Which segment holds each key: sorted digests and segment numbers, in a merged array
    and a few recent ones (merged when they grow many, so a lookup searches a handful)."""

    MERGE_AFTER = 16

    def __init__(self) -> None:
        self.digests = np.empty(0, dtype=np.uint64)
        self.segments = np.empty(0, dtype=np.int32)
        self.recent: list[tuple[np.ndarray, int]] = []

    def add(self, segment: int, keys: Sequence[str]) -> None:
        self.recent.append((np.unique(_digests(keys)), segment))
        if len(self.recent) >= self.MERGE_AFTER:
            digests = np.concatenate([self.digests, *(d for d, _ in self.recent)])
            segments = np.concatenate([self.segments, *(np.full(len(d), n, dtype=np.int32)
                                                        for d, n in self.recent)])
            # Stable: among equal digests the earlier segment stays first, and wins.
            order = np.argsort(digests, kind="stable")
            self.digests, self.segments, self.recent = digests[order], segments[order], []

    def find(self, keys: Sequence[str]) -> dict[int, list[str]]:
        """The keys found, grouped by the first segment indexed with their digest."""
        wanted = _digests(keys)
        where = np.full(len(keys), -1, dtype=np.int64)
        for digests, segment in ((self.digests, self.segments), *self.recent):
            unfound = where < 0
            if not unfound.any():
                break
            if not len(digests):
                continue
            at = np.minimum(np.searchsorted(digests, wanted), len(digests) - 1)
            hit = unfound & (digests[at] == wanted)
            where[hit] = segment[at[hit]] if isinstance(segment, np.ndarray) else segment
        found: dict[int, list[str]] = {}
        for index in np.flatnonzero(where >= 0):
            found.setdefault(int(where[index]), []).append(keys[index])
        return found

    def __len__(self) -> int:
        return len(np.unique(np.concatenate([self.digests, *(d for d, _ in self.recent)])))


class ContentCache:
    """Key -> JSON value for one namespace (one generator or scorer identity) under `uri`."""

    def __init__(self, uri: str, namespace: str, identity: dict[str, Any] | None = None):
        """`namespace` names the folder; with `identity`, the folder is `{namespace}-{hash}`
        and the identity is written beside the segments."""
        if identity is not None:
            namespace = f"{namespace}-{identity_key(identity)}"
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.folder = posixpath.join(root.rstrip("/"), namespace)
        self.fs.makedirs(self.folder, exist_ok=True)
        self._index = _Index()
        self._segments: list[str] = []
        """Indexed segments' paths; a segment's number is its place here."""
        self._loaded: set[str] = set()
        self._lock = threading.Lock()  # one object may serve several task threads
        self._swept = False
        self.hits = 0
        self.misses = 0
        self.writes = 0
        if identity is not None:
            # For people browsing the cache: what produced these entries.
            about = posixpath.join(self.folder, "_identity.json")
            if not self.fs.exists(about):
                self.fs.pipe_file(about, json.dumps(identity, indent=2, sort_keys=True).encode())

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """A segment's table, or None when it does not parse (then it is set aside)."""
        data = self.fs.cat_file(path)  # an I/O error is raised: the file may be fine
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)
        except pa.ArrowException as error:
            self._set_aside(path, error)
            return None

    def _add_segment(self, path: str, keys: Sequence[str]) -> None:
        self._loaded.add(path)
        self._index.add(len(self._segments), keys)
        self._segments.append(path)

    def _refresh(self) -> None:
        """Index segments written since the last look (by this or another process)."""
        for path in sorted(self.fs.ls(self.folder, detail=False)):
            name = posixpath.basename(path)
            if not name.startswith("seg-") or not name.endswith(".parquet") or path in self._loaded:
                continue
            table = self._read(path, ["key"])
            if table is not None:
                self._add_segment(path, table.column("key").to_pylist())

    def _set_aside(self, path: str, error: Exception) -> None:
        """A segment that does not parse: skipped from now on, and moved out of the way."""
        self._loaded.add(path)  # one warning per process even where it cannot be moved
        aside = posixpath.join(self.folder, f"torn-{posixpath.basename(path)}")
        try:
            self.fs.mv(path, aside)
        except FileNotFoundError:  # another reader moved it first
            return
        except OSError as move_error:
            log.warning("cache segment %s is unreadable (%s), skipped; it could not be moved "
                        "aside (%s)", path, error, move_error)
            return
        log.warning("cache segment %s is unreadable (%s): skipped and moved to %s; its "
                    "entries are computed again", path, error, aside)

    def _values(self, segment: int, keys: list[str]) -> dict[str, str]:
        """The stored JSON of those `keys` that segment `segment` holds."""
        table = self._read(self._segments[segment])
        if table is None:  # damaged since it was indexed: its entries are computed again
            return {}
        wanted = set(keys)
        return {key: value for key, value in zip(table.column("key").to_pylist(),
                                                 table.column("value").to_pylist(), strict=True)
                if key in wanted}

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of those `keys` that are present; counts hits and misses."""
        keys = list(keys)
        found: dict[str, Any] = {}
        with self._lock:
            self._refresh()
            for segment, held in self._index.find(keys).items():
                for key, value in self._values(segment, held).items():
                    found[key] = json.loads(value)
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, entries: dict[str, Any]) -> None:
        """Store entries as one new segment; visible to every reader once this returns."""
        if not entries:
            return
        values = [json.dumps(v, ensure_ascii=False) for v in entries.values()]
        table = pa.table({"key": list(entries), "value": values}, schema=_SEGMENT_SCHEMA)
        name = f"seg-{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex}.parquet"
        final = posixpath.join(self.folder, name)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        if isinstance(self.fs, LocalFileSystem):
            if not self._swept:  # once per object: killed writers' temporary files
                self._swept = True
                for path in sweep(self.fs, self.folder, _TEMPORARY):
                    log.info("removed %s, left by a writer that is gone", path)
            temporary = posixpath.join(self.folder, stamped(_TEMPORARY))
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, final)
        else:
            self.fs.pipe_file(final, data)
        with self._lock:
            self._add_segment(final, list(entries))
            self.writes += len(entries)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._index)


_open_caches: dict[tuple[str, str, str], ContentCache] = {}
_open_lock = threading.Lock()


def open_cache(uri: str, namespace: str, identity: dict[str, Any]) -> ContentCache:
    """This process's cache object for one folder, created on first use."""
    key = (uri, namespace, identity_key(identity))
    with _open_lock:
        if key not in _open_caches:
            _open_caches[key] = ContentCache(uri, namespace, identity)
        return _open_caches[key]


def cached_compute(
    cache: ContentCache | None,
    items: Sequence[Item],
    key: Callable[[Item], str],
    compute: Callable[[list[Item]], list[Value]],
    to_json: Callable[[Value], Any],
    from_json: Callable[[Any], Value],
) -> tuple[list[Value], int]:
    """Values for `items` in order: from the cache where present, else from `compute` (called
    once, with the missing items only, each key once) and then stored, in one segment.
    Returns the values and how many were computed now. Without a cache everything is
    computed."""

    def compute_each(missing: list[Item], done: Callable[[int, Value], None]) -> None:
        values = compute(missing)
        if len(values) != len(missing):
            raise ValueError(f"{len(values)} results for {len(missing)} items")
        for index, value in enumerate(values):
            done(index, value)

    return cached_compute_each(cache, items, key, compute_each, to_json, from_json,
                               as_they_come=False)


SAVE_EVERY = 256
"""`cached_compute_each` stores its values in segments of this many, or"""
SAVE_AFTER_S = 10.0
"""after this many seconds since the last store, whichever comes first: a run killed mid-way
loses at most that much work, and a million requests make a few thousand segments."""


def cached_compute_each(
    cache: ContentCache | None,
    items: Sequence[Item],
    key: Callable[[Item], str],
    compute_each: Callable[[list[Item], Callable[[int, Value], None]], None],
    to_json: Callable[[Value], Any],
    from_json: Callable[[Any], Value],
    keep: Callable[[Value], bool] = lambda value: True,
    as_they_come: bool = True,
) -> tuple[list[Value], int]:
    """Values for `items` in order, from the cache where present, else from `compute_each`,
    which hands them over one at a time as they come (`compute_each(missing, done)` calls
    `done(index into missing, value)` once per missing item, each key once, in any order),
    such as requests to a paid API. Values are stored as they arrive (every `SAVE_EVERY`,
    or after `SAVE_AFTER_S`; with `as_they_come` off, in one segment at the end), and what
    arrived is stored when `compute_each` raises, so a rerun never pays for a value twice.
    Values `keep` refuses (a request that failed) are returned but not stored. Returns the
    values and how many were computed now."""
    keys = [key(item) for item in items]
    cached = cache.get_many(set(keys)) if cache is not None else {}
    missing: dict[str, Item] = {}
    for item, k in zip(items, keys, strict=True):
        if k not in cached:
            missing.setdefault(k, item)
    order = list(missing)
    fresh: dict[str, Value] = {}
    pending: dict[str, Any] = {}
    last_save = time.monotonic()

    def save() -> None:
        nonlocal last_save
        if cache is not None and pending:
            cache.put_many(dict(pending))
        pending.clear()
        last_save = time.monotonic()

    def done(index: int, value: Value) -> None:
        k = order[index]
        if k in fresh:
            raise ValueError(f"a second value for item {index}")
        fresh[k] = value
        if cache is not None and keep(value):
            pending[k] = to_json(value)
            if as_they_come and (len(pending) >= SAVE_EVERY
                                 or time.monotonic() - last_save >= SAVE_AFTER_S):
                save()

    try:
        if order:
            compute_each([missing[k] for k in order], done)
    finally:
        save()
    if len(fresh) != len(order):
        raise ValueError(f"{len(fresh)} results for {len(order)} items")
    return [fresh[k] if k in fresh else from_json(cached[k]) for k in keys], len(order)
