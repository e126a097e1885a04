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
content, same identity), so the first one read wins.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

_SEGMENT_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])


class ContentCache:
    """Key -> JSON value for one namespace (one generator or scorer identity) under `uri`."""

    def __init__(self, uri: str, namespace: str, identity: dict[str, Any] | None = None):
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.folder = posixpath.join(root.rstrip("/"), namespace)
        self.fs.makedirs(self.folder, exist_ok=True)
        self._index: dict[str, str] = {}
        self._loaded: set[str] = set()
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
            table = pq.read_table(pa.BufferReader(self.fs.cat_file(path)), use_threads=False)
            for key, value in zip(table.column("key").to_pylist(),
                                  table.column("value").to_pylist(), strict=True):
                self._index.setdefault(key, value)
            self._loaded.add(path)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of those `keys` that are present; counts hits and misses."""
        keys = list(keys)
        self._refresh()
        found = {k: json.loads(self._index[k]) for k in keys if k in self._index}
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, entries: dict[str, Any]) -> None:
        """Store entries as one new segment; visible to every reader once this returns."""
        if not entries:
            return
        table = pa.table(
            {"key": list(entries), "value": [json.dumps(v, ensure_ascii=False)
                                              for v in entries.values()]},
            schema=_SEGMENT_SCHEMA,
        )
        name = f"seg-{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex}.parquet"
        final = posixpath.join(self.folder, name)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        if isinstance(self.fs, LocalFileSystem):
            temporary = posixpath.join(self.folder, f".tmp-{name}")
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, final)
        else:
            self.fs.pipe_file(final, data)
        for key, value in zip(table.column("key").to_pylist(),
                              table.column("value").to_pylist(), strict=True):
            self._index.setdefault(key, value)
        self._loaded.add(final)
        self.writes += len(entries)

    def __len__(self) -> int:
        self._refresh()
        return len(self._index)
