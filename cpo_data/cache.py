"""A content-addressed cache: key -> JSON value, in append-only Parquet segments.

Used by generation (key: source text under one generator identity) and scoring (key: src + mt
under one scorer identity), so that a refresh costs only what is new.

Why segments: every `put_many` writes one new file with a unique name and never touches another,
so any number of processes (or Dask workers on shared storage) can write at once without locks,
and a reader sees a segment whole or not at all (local: written under a temporary name, then
renamed; object stores: one object put). Reads are single-threaded: Arrow's CPU thread pool
can abort the interpreter at exit ("terminate called without an active exception",
apache/arrow#34314), seen here in about 1 of 40 short processes, and segments are small.
Readers load each segment once and keep an index in
memory; when two writers stored the same key, the values are equal by construction (same
content, same identity), so the first one read wins. `open_cache` hands every caller in a
process the same object per folder, so a build of many shards reads each segment once instead
of once per shard (which grew with the square of the shard count).

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
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import fsspec
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
        self._index: dict[str, str] = {}
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

    def _refresh(self) -> None:
        """Read segments written since the last look (by this or another process)."""
        for path in sorted(self.fs.ls(self.folder, detail=False)):
            name = posixpath.basename(path)
            if not name.startswith("seg-") or not name.endswith(".parquet") or path in self._loaded:
                continue
            data = self.fs.cat_file(path)  # an I/O error is raised: the file may be fine
            try:
                table = pq.read_table(pa.BufferReader(data), use_threads=False)
            except pa.ArrowException as error:
                self._set_aside(path, error)
                continue
            for key, value in zip(table.column("key").to_pylist(),
                                  table.column("value").to_pylist(), strict=True):
                self._index.setdefault(key, value)
            self._loaded.add(path)

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

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of those `keys` that are present; counts hits and misses."""
        keys = list(keys)
        with self._lock:
            self._refresh()
            found = {k: json.loads(self._index[k]) for k in keys if k in self._index}
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
            for key, value in zip(entries, values, strict=True):
                self._index.setdefault(key, value)
            self._loaded.add(final)
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
    once, with the missing items only) and then stored. Returns the values and how many were
    computed now. Without a cache everything is computed."""
    keys = [key(item) for item in items]  # once each: a key hashes the item's text
    cached = cache.get_many(set(keys)) if cache is not None else {}
    missing = [(k, item) for item, k in zip(items, keys, strict=True) if k not in cached]
    fresh: dict[str, Value] = {}
    if missing:
        values = compute([item for _, item in missing])
        if len(values) != len(missing):
            raise ValueError(f"{len(values)} results for {len(missing)} items")
        fresh = {k: value for (k, _), value in zip(missing, values, strict=True)}
        if cache is not None:
            cache.put_many({k: to_json(v) for k, v in fresh.items()})
    return [fresh[k] if k in fresh else from_json(cached[k]) for k in keys], len(missing)
