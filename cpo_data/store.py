"""Publish, list and read immutable versions of a triplet dataset.

Layout of one dataset (`{store}/{name}`):

    {version}/.manifest.json             written last: counts, schema version, sha256, provenance
    {version}/.huggingface.yaml          the card's front matter: `datasets` configs, features
    {version}/de-en/part-00000.parquet   one folder per language pair, `lang_pair` kept in rows
    {version}/__dropped__/part-00000.parquet   what selection left out, with reasons
    {version}/__conversational__/de-en/part-00000.parquet   with publish.conversational only
    {version}/__attachments__/README.md        the dataset card (front matter and prose)
    {version}/__attachments__/report.html      files the `attachments` hook returned
    _runs/{version}/{run id}.json        training runs that used the version (lineage)

Why these names: the card's configs name the triplet files one by one, so
`load_dataset(version_dir)` (config `default`, a language pair, or `conversational`) reads
exactly them; `datasets` finds them in `.huggingface.yaml`. `load_dataset("parquet",
data_dir=version_dir)` reads every file except hidden ones and folders starting with `__`, and
pyarrow (`pd.read_parquet(version_dir)`) skips names starting with `.` or `_`. So the manifest
and the configs are dot files and everything that is not a standard triplet file sits in a
`__` folder; the card becomes the root `README.md`, where the Hub wants it, on export and
push. Folders are not `lang_pair=de-en` (hive style): pyarrow then refuses the column that is
also in the files, and `datasets` would drop it. Versions published before the card
have `_manifest.json` and no `README.md`; they list and read as before (`LEGACY_MANIFEST`).

A version is visible only once its manifest exists. On a local disk the version is written under
a temporary name and renamed into place; on object stores (no rename) the manifest is the last
object written, so readers never see a half version either way. Only this module does dataset I/O.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpo_data import card, locks, schema
from cpo_data.errors import UserError
from cpo_data.sources import id_digest

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "_manifest.json"  # versions published before the dataset card; still read
CARD = "README.md"
"""The card's name where the Hub reads it: at the root of an exported or pushed version."""

DROPPED_DIR = "__dropped__"
CONVERSATIONAL_DIR = "__conversational__"
ATTACHMENTS_DIR = "__attachments__"
CARD_PATH = f"{ATTACHMENTS_DIR}/{CARD}"
"""Where a published version keeps its card: a `README.md` at the root would be read as
Parquet by `pd.read_parquet(version_dir)` (pyarrow skips only `.` and `_` names)."""
REPO_YAML = ".huggingface.yaml"
"""The card's front matter alone (configs, features, licence): `datasets` reads it beside or
instead of a README's, so `load_dataset(version_dir, "de-en")` works in the store too."""
READ_FORMATS = ("standard", "conversational")
RUNS_DIR = "_runs"
FORMAT = "cpo-data/triplets"
_LANG_PAIR = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")
_VERSION_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
TEMPORARY = ".tmp-"
"""Prefix of a local version being written; one whose writer is gone is swept by the next."""
CONTENT_KEYS = ("files", "dropped_files", "conversational_files")
"""The manifest entries that make a version's content: equal entries, equal data."""


class StoreError(UserError):
    """A store that cannot be written or read as asked; the message names the URI."""


def _filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or "/"


def _require_folder(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> None:
    if fs.exists(path) and not fs.isdir(path):
        raise StoreError(f"{uri}: store path is a file, not a folder")


def dataset_uri(uri: str, name: str) -> str:
    """URI of dataset `name` in the store at `uri`."""
    return f"{uri.rstrip('/')}/{name}"


def _new_version_id() -> str:
    # Sortable by time, unique across concurrent publishers.
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    counts = pc.value_counts(table.column(column)).to_pylist() if table.num_rows else []
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


def publish_triplets(
    table: pa.Table,
    uri: str,
    name: str,
    provenance: dict[str, Any] | None = None,
    dropped: pa.Table | None = None,
    *,
    license: str | None = None,
    conversational: bool = False,
    attachments: Callable[[dict, pa.Table, pa.Table], Mapping[str, bytes]] | None = None,
    lock_wait_s: float = 0.0,
    skip_unchanged: bool = True,
    held: locks.Held | None = None,
) -> str:
    """Publish `table` (the triplets schema) as a new immutable version of dataset `name`.

    `provenance` (config, model and scorer identities, source fingerprint) goes into the
    manifest as given and must be JSON-serializable. `license` (a Hub licence id, from
    `publish.license`) goes into the manifest and the card; `conversational` also writes the
    rows in TRL's conversational format (the card's `conversational` config). `attachments` is
    called with (the manifest as it will be written, less its `attachments` entry; the
    triplets; the dropped rows) and returns plain file names -> bytes, written to
    `__attachments__/` before the manifest and listed in it with the card (`README.md`, which
    the store writes itself). Returns the new version id.

    One writer at a time per dataset (`locks.dataset_lock`, waiting up to `lock_wait_s`);
    `held` is that lock as `dataset_lock` yielded it in another thread of this process, handed
    over so the publish does not wait on its own holder (it must be this dataset's).
    With `skip_unchanged`, a table whose files equal the newest version's (triplets, dropped,
    conversational, byte for byte) and licence publishes nothing: the newest version's id is
    returned, so a rerun after a kill that came after the publish adds no second copy.
    Written by `cpo_data.publishing.VersionWriter`, which a build feeds shard by shard.
    """
    from cpo_data import publishing  # it builds on this module's reading side

    return publishing.publish_triplets(
        table, uri, name, provenance, dropped, license=license, conversational=conversational,
        attachments=attachments, lock_wait_s=lock_wait_s, skip_unchanged=skip_unchanged,
        held=held)


def dataset_lock(uri: str, name: str, *, wait_s: float = 0.0, what: str = "a build"):
    """The one-writer lock of dataset `name` in the store at `uri` (`cpo_data.locks`), as a
    context manager yielding its `locks.Held`; `publish_triplets` takes it too (re-entrant
    within a thread; a publish in another thread is handed the `Held`: `held=`)."""
    fs, root = _filesystem(uri)
    _require_folder(fs, root, uri)
    folder = posixpath.join(root, name)
    _require_folder(fs, folder, dataset_uri(uri, name))
    return locks.dataset_lock(fs, folder, dataset_uri(uri, name), wait_s=wait_s, what=what)


def _dataset_dir(uri: str, name: str | None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    uri = dataset_uri(uri, name) if name else uri
    fs, path = _filesystem(uri)
    if not fs.exists(path):
        raise StoreError(f"{uri}: no such dataset")
    _require_folder(fs, path, uri)
    return fs, path, uri


def _load_manifest(fs: fsspec.AbstractFileSystem, path: str, where: str) -> dict:
    try:
        manifest = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as error:
        raise StoreError(f"{where}: manifest is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: not a cpo-data triplet manifest")
    if manifest.get("schema_version", 0) > schema.SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {manifest['schema_version']} is newer than this "
            f"cpo-data reads ({schema.SCHEMA_VERSION}); upgrade cpo-data"
        )
    return manifest


def _manifest_path(fs: fsspec.AbstractFileSystem, folder: str) -> str | None:
    """The manifest of a version folder: `.manifest.json`, else `_manifest.json` (a version
    published before the card); None while it has neither (not a version, or not yet)."""
    for candidate in (MANIFEST, LEGACY_MANIFEST):
        if fs.exists(posixpath.join(folder, candidate)):
            return posixpath.join(folder, candidate)
    return None


def _scan(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> tuple[list[dict], list[str]]:
    """Manifests of the complete versions, oldest first, and the version folders that have
    no manifest: on a local disk a version appears with its manifest (it is renamed into
    place), so such a folder lost it; on an object store it is damaged too unless the lock
    marker names it as filled in place (`locks.unfinished_versions`: a live writer's, or a
    dead one's that the next writer removes), which is then left out, so 'latest' stays the
    newest complete version."""
    manifests, missing = [], []
    unfinished = locks.unfinished_versions(fs, path)
    for entry in fs.ls(path, detail=False):
        folder = posixpath.basename(entry.rstrip("/"))
        if folder.startswith((".", "_")):
            continue
        manifest_path = _manifest_path(fs, posixpath.join(path, folder))
        if manifest_path is not None:
            manifests.append(_load_manifest(fs, manifest_path, f"{uri}/{folder}"))
        elif _VERSION_ID.match(folder) and folder not in unfinished:
            missing.append(folder)
    return sorted(manifests, key=lambda m: (m["created_at"], m["version"])), sorted(missing)


def list_versions(uri: str, *, name: str | None = None) -> list[dict]:
    """Manifests of every complete version, oldest first. `uri` is the dataset, or the store
    when `name` is given. Unfinished writes are not versions (hidden while written locally;
    on object stores, named in the writer's lock); see `resolve_version` for a version
    folder that lost its manifest."""
    fs, path, uri = _dataset_dir(uri, name)
    return _scan(fs, path, uri)[0]


def resolve_version(uri: str, version: str = "latest", *, name: str | None = None) -> str:
    """The version id `version` names: itself, or the newest complete one for 'latest'.

    A version folder without its manifest (deleted, or a copy cut short) is an error when it
    is the one asked for, or when it is newer than every complete version and 'latest' is
    asked for: falling back to an older version would serve data nobody asked for."""
    fs, path, where = _dataset_dir(uri, name)
    versions, missing = _scan(fs, path, where)
    if version in missing:
        raise StoreError(f"{where}/{version}/{MANIFEST}: missing, so the version cannot be "
                         "read or checked (deleted or damaged); restore it or publish again")
    # Ids sort by their second: one from the newest complete version's second may be newer.
    if version == "latest" and missing and (not versions
                                            or missing[-1][:15] >= versions[-1]["version"][:15]):
        raise StoreError(
            f"{where}/{missing[-1]}/{MANIFEST}: missing in the newest version folder (deleted "
            "or damaged), so 'latest' is not known; restore it, remove the folder, or name a "
            "version" + (f" (newest complete: {versions[-1]['version']})" if versions else ""))
    if not versions:
        raise StoreError(f"{where}: no published version")
    if version == "latest":
        return versions[-1]["version"]
    if version not in {m["version"] for m in versions}:
        known = ", ".join(m["version"] for m in versions[-5:])
        raise StoreError(f"{where}: no version {version!r} (newest: {known})")
    return version


def read_manifest(uri: str, version: str = "latest", *, name: str | None = None) -> dict:
    """The manifest of one version."""
    version = resolve_version(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    found = _manifest_path(fs, posixpath.join(path, version))
    if found is None:  # removed since it was listed
        raise StoreError(f"{uri}/{version}: the version has no manifest")
    return _load_manifest(fs, found, f"{uri}/{version}")


def version_path(uri: str, version: str = "latest", *, name: str | None = None) -> str:
    """URI of a version's folder, for `datasets.load_dataset` (the card's configs) or
    `pd.read_parquet` of one language pair's folder."""
    version = resolve_version(uri, version, name=name)
    return f"{(dataset_uri(uri, name) if name else uri).rstrip('/')}/{version}"


def upgrade_v1_triplets(table: pa.Table) -> pa.Table:
    """A triplets table as schema version 1 wrote it, in the current schema's shape.

    Version 1's `chosen_scores` / `rejected_scores` entries were `{scorer, score}`; version 2
    added `error_spans`. Old entries get it as null: those versions kept no spans. Built by hand
    rather than by `cast`, which fills missing struct fields only in recent pyarrow.
    """
    for name in ("chosen_scores", "rejected_scores"):
        column = table.column(name)
        old = column.type
        if not (pa.types.is_list(old) and pa.types.is_struct(old.value_type)
                and [f.name for f in old.value_type] == ["scorer", "score"]):
            continue  # not version 1's shape: `schema.validate` names what is wrong
        chunks = []
        for chunk in column.chunks:
            values = chunk.values  # all of the child array: `offsets` index into it
            entries = pa.StructArray.from_arrays(
                [values.field("scorer"), values.field("score"),
                 pa.nulls(len(values), pa.list_(schema.ERROR_SPAN))],
                fields=list(schema.SCORER_SCORE), mask=values.is_null() if values.null_count
                else None)
            chunks.append(pa.ListArray.from_arrays(
                chunk.offsets, entries, mask=chunk.is_null() if chunk.null_count else None))
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.chunked_array(chunks, pa.list_(schema.SCORER_SCORE)))
    return table


def upgrade_old_triplets(table: pa.Table, version: int) -> pa.Table:
    """A triplets table of an older schema version in the current shape: version 1's score
    entries gain `error_spans`, versions before 3 gain `confidence`, all null (they had none)."""
    if version < 2:
        table = upgrade_v1_triplets(table)
    if version < 3 and "confidence" not in table.column_names:
        table = table.add_column(table.schema.get_field_index("margin") + 1, "confidence",
                                 pa.nulls(table.num_rows, pa.float64()))
    return table


def _file_bytes(fs: fsspec.AbstractFileSystem, path: str, entry: dict, where: str,
                verify: bool) -> bytes:
    """One listed file's bytes; with `verify`, its size and sha256 as the manifest says."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(f"{where}: missing (the manifest lists it)") from None
    if verify:
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise StoreError(f"{where}: {len(data)} bytes, the manifest says {entry['bytes']} "
                             "(cut short or replaced since publishing)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{where}: sha256 mismatch (changed since publishing)")
    return data


def _parquet(data: bytes, where: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns,
                             use_threads=False)  # see cache.py
    except (pa.ArrowException, OSError) as error:
        raise StoreError(f"{where}: not a readable Parquet file ({error})") from None


def _read_files(uri: str, version: str, name: str | None, key: str, table_schema: pa.Schema,
                verify: bool) -> pa.Table:
    manifest = read_manifest(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    tables = []
    for entry in manifest[key]:
        where = f"{uri}/{manifest['version']}/{entry['path']}"
        data = _file_bytes(fs, posixpath.join(path, manifest["version"], entry["path"]), entry,
                           where, verify)
        table = _parquet(data, where)
        if key == "files":
            table = upgrade_old_triplets(table, manifest.get("schema_version", 1))
        # Each file on its own, so that the error names the file that does not fit.
        tables.append(schema.validate(table, table_schema, what=where))
    if not tables:
        return schema.empty(table_schema)
    return pa.concat_tables(tables)


def read_triplets_table(uri: str, version: str = "latest", *, name: str | None = None,
                        verify: bool = True, format: str = "standard") -> pa.Table:
    """The triplets of one version as an Arrow table (see `read_triplets`)."""
    if format not in READ_FORMATS:
        raise StoreError(f"format {format!r}: expected one of {', '.join(READ_FORMATS)}")
    table = _read_files(uri, version, name, "files", schema.TRIPLETS, verify)
    return card.conversational(table) if format == "conversational" else table


def read_triplets(uri: str, version: str = "latest", *, name: str | None = None,
                  verify: bool = True, format: str = "standard") -> pd.DataFrame:
    """The triplets of one version as a pandas DataFrame.

    `uri` is the dataset (`{store}/{name}`), or the store when `name` is given. `version` is a
    version id or 'latest'. Each file's size and sha256 are checked against the manifest (the
    bytes are read anyway): a file changed, cut short, swapped or missing is a StoreError that
    names it; `verify=False` skips the check.
    `format="conversational"` gives TRL's conversational preference format: `prompt` as
    `[{"role": "user", "content": ...}]`, `chosen` and `rejected` as one assistant message
    each, the other columns as they are (any version, whether or not it was published with
    `publish.conversational`).
    """
    return read_triplets_table(uri, version, name=name, verify=verify,
                               format=format).to_pandas()


def read_source_ids(uri: str, version: str = "latest", *, name: str | None = None,
                    verify: bool = True) -> set[str]:
    """The source ids a version holds, as a triplet or a dropped row. Only that column is
    decoded: a refresh's summary needs no texts."""
    manifest = read_manifest(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    ids: set[str] = set()
    for entry in manifest["files"] + manifest["dropped_files"]:
        where = f"{uri}/{manifest['version']}/{entry['path']}"
        data = _file_bytes(fs, posixpath.join(path, manifest["version"], entry["path"]), entry,
                           where, verify)
        ids.update(_parquet(data, where, ["source_id"]).column("source_id").to_pylist())
    return ids


def _check_by_chunks(fs: fsspec.AbstractFileSystem, path: str, entry: dict,
                     where: str) -> None:
    """`_file_bytes`'s checks, reading the file in chunks instead of holding it whole."""
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as file:
            while chunk := file.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise StoreError(f"{where}: missing (the manifest lists it)") from None
    if "bytes" in entry and size != entry["bytes"]:
        raise StoreError(f"{where}: {size} bytes, the manifest says {entry['bytes']} "
                         "(cut short or replaced since publishing)")
    if digest.hexdigest() != entry["sha256"]:
        raise StoreError(f"{where}: sha256 mismatch (changed since publishing)")


def checked_files(uri: str, version: str, key: str, *, name: str | None = None,
                  verify: bool = True) -> tuple[fsspec.AbstractFileSystem, str, tuple[str, ...]]:
    """The files a version lists under `key` ("files", "dropped_files"), each checked
    against the manifest in chunks (none read whole): the filesystem, the version folder and
    the files' paths in it, for a reader that goes through them in batches."""
    manifest = read_manifest(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    folder = posixpath.join(path, manifest["version"])
    paths = []
    for entry in manifest[key]:
        if verify:
            _check_by_chunks(fs, posixpath.join(folder, entry["path"]), entry,
                             f"{uri}/{manifest['version']}/{entry['path']}")
        paths.append(entry["path"])
    return fs, folder, tuple(paths)


def read_source_digests(uri: str, version: str = "latest", *, name: str | None = None,
                        verify: bool = True) -> np.ndarray:
    """`read_source_ids` as sorted distinct 64-bit digests (`sources.id_digest`), read in
    batches: 8 bytes a source, where a set of ids costs about 100, and no file held whole."""
    manifest = read_manifest(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    found = []
    for entry in manifest["files"] + manifest["dropped_files"]:
        where = f"{uri}/{manifest['version']}/{entry['path']}"
        file_path = posixpath.join(path, manifest["version"], entry["path"])
        if verify:
            _check_by_chunks(fs, file_path, entry, where)
        try:
            with fs.open(file_path, "rb") as file:
                for batch in pq.ParquetFile(file).iter_batches(
                        batch_size=65536, columns=["source_id"], use_threads=False):
                    ids = batch.column(0).to_pylist()
                    found.append(np.fromiter(map(id_digest, ids), np.uint64, len(ids)))
        except FileNotFoundError:
            raise StoreError(f"{where}: missing (the manifest lists it)") from None
        except (pa.ArrowException, OSError) as error:
            raise StoreError(f"{where}: not a readable Parquet file ({error})") from None
    return np.unique(np.concatenate(found)) if found else np.empty(0, np.uint64)


def read_dropped(uri: str, version: str = "latest", *, name: str | None = None,
                 verify: bool = True) -> pd.DataFrame:
    """What the build left out of one version (ingestion, generation, scoring, selection),
    with a reason and a detail per row; checked as `read_triplets` checks."""
    return _read_files(uri, version, name, "dropped_files", schema.DROPPED, verify).to_pandas()


def export_version(uri: str, dest: str, version: str = "latest", *, name: str | None = None,
                   verify: bool = True) -> dict:
    """Copy one version's files into the local folder `dest` (from any fsspec store); return
    its manifest. Every file the manifest lists is copied (triplets, conversational, dropped,
    card, attachments), its sha256 checked when `verify`, and the manifest is written as
    `.manifest.json`. A version published before cards gets a `README.md` rendered from its
    manifest, so the copy loads in every `load_dataset` form."""
    manifest = read_manifest(uri, version, name=name)
    fs, path, where = _dataset_dir(uri, name)
    source = posixpath.join(path, manifest["version"])
    entries = [e for key in ("files", "conversational_files", "dropped_files", "attachments")
               for e in manifest.get(key) or []]
    for entry in entries:
        target = os.path.join(dest, *entry["path"].split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        digest = hashlib.sha256()
        with fs.open(posixpath.join(source, entry["path"]), "rb") as src, \
                open(target, "wb") as out:
            while chunk := src.read(1 << 23):
                digest.update(chunk)
                out.write(chunk)
        if verify and digest.hexdigest() != entry["sha256"]:
            raise StoreError(f"{where}/{manifest['version']}/{entry['path']}: sha256 mismatch")
    kept = os.path.join(dest, *CARD_PATH.split("/"))
    if os.path.isfile(kept):  # the Hub reads the card at the root
        shutil.copyfile(kept, os.path.join(dest, CARD))
    elif not any(e["path"] == CARD for e in entries):
        with open(os.path.join(dest, CARD), "w", encoding="utf-8") as out:
            out.write(card.render_card(manifest))
    with open(os.path.join(dest, MANIFEST), "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2, ensure_ascii=False)
    return manifest


def register_run(uri: str, version: str, run: dict[str, Any]) -> str:
    """Record beside a version that a training run used it; `run` needs `run_dir`.

    The version's own folder stays untouched (versions are immutable): runs go to
    `_runs/{version}/`, one small JSON file per run folder, rewritten when the run is."""
    fs, path, uri = _dataset_dir(uri, None)
    version = resolve_version(uri, version)
    run_id = hashlib.sha256(run["run_dir"].encode()).hexdigest()[:16]
    target = posixpath.join(path, RUNS_DIR, version, f"{run_id}.json")
    fs.makedirs(posixpath.dirname(target), exist_ok=True)
    fs.pipe_file(target, json.dumps(run, indent=2).encode())
    return target


def list_runs(uri: str, version: str = "latest", *, name: str | None = None) -> list[dict]:
    """The training runs recorded for one version, oldest first."""
    version = resolve_version(uri, version, name=name)
    fs, path, uri = _dataset_dir(uri, name)
    folder = posixpath.join(path, RUNS_DIR, version)
    if not fs.exists(folder):
        return []
    runs = []
    for entry in fs.ls(folder, detail=False):
        try:
            runs.append(json.loads(fs.cat_file(entry)))
        except ValueError:  # a record cut short by a crash; the run folder still has it
            continue
    return sorted(runs, key=lambda r: r.get("created_at", ""))
