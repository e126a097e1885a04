"""Write one version of a triplet dataset part by part: `VersionWriter` (and
`store.publish_triplets` over it, for a whole table at once).

A build hands the writer each shard's triplets and dropped rows as selection makes them, so no
stage holds the whole dataset: the rows go straight to one Parquet writer per language pair (and
one for the dropped rows), in row groups of `ROW_GROUP_ROWS` whatever the shard size, so equal
data gives equal bytes however it was cut. The manifest's counts are kept as the parts arrive;
the sha256s are taken from the written files, read back in chunks.

Whole or not at all, as `cpo_data.store` describes: the writer holds the dataset's lock
(`locks.dataset_lock`, or the `held` one its caller hands over from another thread), writes
into a hidden temporary folder (object stores: the version folder itself, named in the lock
marker) and renames it into place after the manifest; any error or a kill leaves no version,
and the next writer sweeps what is left. Data whose files equal the newest version's publishes
nothing (`skip_unchanged`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from cpo_data import card, leftovers, locks, schema, store
from cpo_data.store import StoreError

ROW_GROUP_ROWS = 8192
"""Rows per Parquet row group: a language pair's rows wait here until they fill one, so memory
stays at this many rows per pair while the files' bytes do not depend on the shards."""

@dataclass(frozen=True)
class WrittenFiles:
    """Parquet files a writer wrote, for the attachments hook to read back: in batches
    (`batches`, what `report.render_report` takes, so a report costs memory per batch) or
    whole (`read`)."""

    fs: Any
    folder: str
    paths: tuple[str, ...]
    table_schema: pa.Schema

    def batches(self, columns: list[str] | None = None,
                batch_rows: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        for relative in self.paths:
            with self.fs.open(posixpath.join(self.folder, relative), "rb") as handle:
                for batch in pq.ParquetFile(handle).iter_batches(
                        batch_size=batch_rows, columns=columns, use_threads=False):
                    yield pa.Table.from_batches([batch])

    def read(self) -> pa.Table:
        tables = []
        for relative in self.paths:
            with self.fs.open(posixpath.join(self.folder, relative), "rb") as handle:
                tables.append(pq.read_table(handle, use_threads=False))  # see cache.py
        return pa.concat_tables(tables) if tables else schema.empty(self.table_schema)


Attachments = Callable[[dict, WrittenFiles, WrittenFiles], Mapping[str, bytes]]
"""(manifest as it will be written, less `attachments`; triplets; dropped) -> name -> bytes."""


def _check_attachments(found: Any, pairs: list[str]) -> dict[str, bytes]:
    if not isinstance(found, Mapping):
        raise StoreError(f"attachments: the hook returned {type(found).__name__}, expected a "
                         "mapping of file names to bytes")
    checked = {}
    for name, data in found.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name \
                or name.startswith((".", "_")):
            raise StoreError(f"attachments: {name!r} must be a plain file name (no '/', not "
                             "starting with '.' or '_')")
        if name.lower() in (store.CARD.lower(), store.MANIFEST, store.LEGACY_MANIFEST) \
                or name in pairs or name.lower().endswith(".parquet"):
            raise StoreError(f"attachments: {name!r} would collide with the version's own "
                             "files (card, manifest, Parquet data)")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StoreError(f"attachments: {name!r} is {type(data).__name__}, expected bytes")
        checked[name] = bytes(data)
    return checked


def _entry(fs: fsspec.AbstractFileSystem, folder: str, relative: str, data: bytes) -> dict:
    """Write one small file of a version; return its manifest entry."""
    path = posixpath.join(folder, relative)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
    return {"path": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_entry(fs: fsspec.AbstractFileSystem, folder: str, relative: str, rows: int) -> dict:
    """The manifest entry of a written file: its size and sha256, read back in chunks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(posixpath.join(folder, relative), "rb") as written:
        while chunk := written.read(1 << 23):
            digest.update(chunk)
            size += len(chunk)
    return {"path": relative, "rows": rows, "bytes": size, "sha256": digest.hexdigest()}


class _PartFile:
    """One Parquet file of the version, written in row groups of ROW_GROUP_ROWS."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, relative: str,
                 table_schema: pa.Schema):
        self.relative, self.rows = relative, 0
        path = posixpath.join(folder, relative)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._handle = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._handle, table_schema, compression="zstd")
        self._waiting: list[pa.Table] = []
        self._waiting_rows = 0

    def write(self, table: pa.Table) -> None:
        self._waiting.append(table)
        self._waiting_rows += table.num_rows
        self.rows += table.num_rows
        if self._waiting_rows >= ROW_GROUP_ROWS:
            pending = pa.concat_tables(self._waiting)
            full = pending.num_rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS
            self._writer.write_table(pending.slice(0, full), row_group_size=ROW_GROUP_ROWS)
            rest = pending.slice(full)
            self._waiting, self._waiting_rows = [rest], rest.num_rows

    def close(self) -> None:
        if self._waiting_rows:
            self._writer.write_table(pa.concat_tables(self._waiting),
                                     row_group_size=ROW_GROUP_ROWS)
        self._waiting = []
        self._writer.close()
        self._handle.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._handle.close()


def _system_counts(chosen: Counter, rejected: Counter) -> list[dict]:
    return [{"system": s, "chosen": chosen.get(s, 0), "rejected": rejected.get(s, 0)}
            for s in sorted(chosen.keys() | rejected.keys())]


def _systems(column: pa.ChunkedArray) -> Counter:
    """Per system: how often a text it gave is on this side. A text several systems gave
    (`ref+gpt4`) counts for each of them, as `select.system_counts` does."""
    counts: Counter = Counter()
    for entry in pc.value_counts(column).to_pylist():
        for system in entry["values"].split("+"):
            counts[system] += entry["counts"]
    return counts


class VersionWriter:
    """A new version of dataset `name` in the store at `uri`, written part by part.

        with VersionWriter(uri, name, license=..., conversational=...) as writer:
            for shard in ...:
                writer.add(triplets, dropped)
            version = writer.finish(provenance, attachments=hook)

    The dataset's lock is held from `__enter__` (waiting up to `lock_wait_s`) to `__exit__`;
    leaving the block without `finish` (an error) removes what was written. `held`: the
    dataset's lock as a holder in another thread took it (`locks.dataset_lock` yields it;
    re-entry is per thread, so a Prefect task would otherwise wait on its own flow); then
    the writer takes no lock and it must be this dataset's (ValueError otherwise)."""

    def __init__(self, uri: str, name: str, *, license: str | None = None,
                 conversational: bool = False, lock_wait_s: float = 0.0,
                 held: locks.Held | None = None):
        self.uri, self.name, self.license = uri, name, license
        self.conversational, self.lock_wait_s = conversational, lock_wait_s
        self.held = held
        self.where = store.dataset_uri(uri, name)
        self._files: dict[str, _PartFile] = {}
        self._chat: dict[str, _PartFile] = {}
        self._dropped: _PartFile | None = None
        self._rows: Counter = Counter()
        self._reasons: Counter = Counter()
        self._chosen: Counter = Counter()
        self._rejected: Counter = Counter()
        self._stack = contextlib.ExitStack()
        self._finished = False

    def __enter__(self) -> VersionWriter:
        fs, root = store._filesystem(self.uri)
        store._require_folder(fs, root, self.uri)
        self.fs, self.dataset_dir = fs, posixpath.join(root, self.name)
        store._require_folder(fs, self.dataset_dir, self.where)
        if self.held is None:
            self._lock = self._stack.enter_context(locks.dataset_lock(
                fs, self.dataset_dir, self.where, wait_s=self.lock_wait_s, what="a publish"))
        else:
            locks.check_held(self.held, fs, self.dataset_dir)
            self._lock = self.held
        try:
            self._clear_abandoned()
            self.newest = self._newest_manifest()
            self.version = store._new_version_id()
            self.local = isinstance(fs, LocalFileSystem)
            # Object stores have no rename: write in place, the manifest (last) makes it visible.
            self.folder = posixpath.join(self.dataset_dir, leftovers.stamped(store.TEMPORARY)
                                         if self.local else self.version)
            locks.announce_writing(fs, self.dataset_dir, self.version, self._lock)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:  # noqa: ANN001 - the protocol's
        try:
            if not self._finished:
                for part in self._parts():
                    part.abort()
                self._remove_partial()
        finally:
            self._stack.close()

    def _parts(self) -> list[_PartFile]:
        return [*self._files.values(), *self._chat.values(),
                *([self._dropped] if self._dropped else [])]

    def _remove_partial(self) -> None:
        fs, folder = self.fs, getattr(self, "folder", None)
        if folder and fs.exists(folder) and (
                self.local or not fs.exists(posixpath.join(folder, store.MANIFEST))):
            fs.rm(folder, recursive=True)

    def _clear_abandoned(self) -> None:
        """Under the lock: remove what dead writers left (local temporary folders whose owner
        is gone; on object stores, the version folder an expired lock's holder was filling)."""
        fs = self.fs
        if isinstance(fs, LocalFileSystem):
            leftovers.sweep(fs, self.dataset_dir, store.TEMPORARY)
            return
        abandoned = locks.abandoned_version(fs, self.dataset_dir)
        if abandoned and store._VERSION_ID.match(abandoned):
            folder = posixpath.join(self.dataset_dir, abandoned)
            if fs.exists(folder) and store._manifest_path(fs, folder) is None:
                fs.rm(folder, recursive=True)

    def _newest_manifest(self) -> dict | None:
        if not self.fs.exists(self.dataset_dir):
            return None
        manifests, _ = store._scan(self.fs, self.dataset_dir, self.where)
        return manifests[-1] if manifests else None

    def add(self, triplets: pa.Table, dropped: pa.Table | None = None) -> None:
        """Write one part: triplets (the triplets schema) and the rows left out with them."""
        triplets = schema.validate(triplets, schema.TRIPLETS, what="triplets")
        for pair, rows in sorted(store._counts(triplets, "lang_pair").items()):
            if not store._LANG_PAIR.match(pair):
                raise StoreError(f"triplets: lang_pair {pair!r} is not of the form xx-yy")
            part = triplets.filter(pc.equal(triplets.column("lang_pair"), pair))
            if pair not in self._files:
                self._files[pair] = _PartFile(self.fs, self.folder, f"{pair}/part-00000.parquet",
                                              schema.TRIPLETS)
            self._files[pair].write(part)
            if self.conversational:
                if pair not in self._chat:
                    self._chat[pair] = _PartFile(
                        self.fs, self.folder,
                        f"{store.CONVERSATIONAL_DIR}/{pair}/part-00000.parquet",
                        card.CONVERSATIONAL)
                self._chat[pair].write(card.conversational(part))
            self._rows[pair] += rows
        if triplets.num_rows:
            self._chosen += _systems(triplets.column("chosen_system"))
            self._rejected += _systems(triplets.column("rejected_system"))
        if dropped is not None and dropped.num_rows:
            dropped = schema.validate(dropped, schema.DROPPED, what="dropped")
            if self._dropped is None:
                self._dropped = _PartFile(self.fs, self.folder,
                                          f"{store.DROPPED_DIR}/part-00000.parquet",
                                          schema.DROPPED)
            self._dropped.write(dropped)
            self._reasons.update(store._counts(dropped, "reason"))

    def finish(self, provenance: dict[str, Any] | None = None, *,
               attachments: Attachments | None = None, skip_unchanged: bool = True) -> str:
        """Close the files, then (unless the data equals the newest version's) write the
        card, the attachments and the manifest and make the version visible; its id (or the
        newest version's, when unchanged)."""
        try:
            provenance_json = json.loads(json.dumps(provenance or {}))
        except (TypeError, ValueError) as error:
            raise StoreError(f"provenance is not JSON-serializable: {error}") from None
        if not sum(self._rows.values()):
            raise StoreError(f"{self.where}: nothing to publish, the table has no rows")
        for part in self._parts():
            part.close()

        def entries(parts: Mapping[str, _PartFile]) -> list[dict]:
            return [_file_entry(self.fs, self.folder, parts[p].relative, parts[p].rows)
                    for p in sorted(parts)]

        written = {"files": entries(self._files),
                   "dropped_files": entries({"": self._dropped}) if self._dropped else [],
                   "conversational_files": entries(self._chat)}
        if skip_unchanged and self.newest is not None and _same_content(
                self.newest, written, self.license):
            self._finished = True
            self.fs.rm(self.folder, recursive=True)
            return self.newest["version"]
        manifest = {
            "format": store.FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "created_at": datetime.now(UTC).isoformat(),
            "rows": sum(self._rows.values()),
            "rows_per_lang_pair": dict(sorted(self._rows.items())),
            "dropped_rows": sum(self._reasons.values()),
            "dropped_per_reason": dict(sorted(self._reasons.items())),
            "systems": _system_counts(self._chosen, self._rejected),
            "license": self.license,
            "columns": schema.TRIPLETS.names,
            **written,
            "provenance": provenance_json,
        }
        extra = {}
        if attachments is not None:
            triplets = WrittenFiles(self.fs, self.folder, tuple(
                part.relative for part in self._files.values()), schema.TRIPLETS)
            dropped = WrittenFiles(self.fs, self.folder, (self._dropped.relative,)
                                   if self._dropped else (), schema.DROPPED)
            extra = _check_attachments(attachments(copy.deepcopy(manifest), triplets, dropped),
                                       list(self._rows))
        fs, folder = self.fs, self.folder
        listed = [_entry(fs, folder, f"{store.ATTACHMENTS_DIR}/{n}", data)
                  for n, data in extra.items()]
        # The card lists the attachments; the manifest lists the card, then them.
        text = card.render_card({**manifest, "attachments": listed})
        front = yaml.safe_dump(card.front_matter(manifest), sort_keys=False, allow_unicode=True)
        manifest["attachments"] = [_entry(fs, folder, store.CARD_PATH, text.encode()),
                                   _entry(fs, folder, store.REPO_YAML, front.encode()), *listed]
        # A lease lost while writing (the heartbeat failed past LEASE_S) means another writer
        # may be sweeping this folder as abandoned: the manifest would make a half version.
        locks.check_lease(fs, self.dataset_dir, self._lock)
        fs.pipe_file(posixpath.join(folder, store.MANIFEST),
                     json.dumps(manifest, indent=2, ensure_ascii=False).encode())
        if self.local:
            fs.mv(folder, posixpath.join(self.dataset_dir, self.version), recursive=True)
        self._finished = True
        return self.version


def _same_content(manifest: dict, written: dict[str, list[dict]], license: str | None) -> bool:
    def content(entries: Mapping[str, Any]) -> list:
        return [[(e["path"], e["sha256"]) for e in entries.get(key) or []]
                for key in store.CONTENT_KEYS]

    return (manifest.get("schema_version") == schema.SCHEMA_VERSION
            and manifest.get("license") == license and content(manifest) == content(written))


def publish_triplets(table: pa.Table, uri: str, name: str,
                     provenance: dict[str, Any] | None = None, dropped: pa.Table | None = None,
                     *, license: str | None = None, conversational: bool = False,
                     attachments: Attachments | None = None, lock_wait_s: float = 0.0,
                     skip_unchanged: bool = True, held: locks.Held | None = None) -> str:
    """`store.publish_triplets`: one whole table through a `VersionWriter`."""
    triplets = schema.validate(table, schema.TRIPLETS, what="triplets")
    if dropped is not None:
        dropped = schema.validate(dropped, schema.DROPPED, what="dropped")
    if triplets.num_rows == 0:
        raise StoreError(f"{store.dataset_uri(uri, name)}: nothing to publish, the table has "
                         "no rows")
    for pair in store._counts(triplets, "lang_pair"):
        if not store._LANG_PAIR.match(pair):
            raise StoreError(f"triplets: lang_pair {pair!r} is not of the form xx-yy")
    try:
        json.dumps(provenance or {})
    except (TypeError, ValueError) as error:
        raise StoreError(f"provenance is not JSON-serializable: {error}") from None
    with VersionWriter(uri, name, license=license, conversational=conversational,
                       lock_wait_s=lock_wait_s, held=held) as writer:
        writer.add(triplets, dropped)
        return writer.finish(provenance, attachments=attachments,
                             skip_unchanged=skip_unchanged)
