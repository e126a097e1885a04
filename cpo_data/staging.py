"""Finished shard stages under `work_dir/shards`: Parquet and JSON, never pickles.

Each stage of each shard (its sources as read, its generation, its scoring) is kept under its
content key (`build.sources_key`, `build.shard_key`): `{key}.parquet` (the stage's table),
`{key}.dropped.parquet` (what it dropped), for the sources `{key}.scores.parquet` (the scores
they carry), and `{key}.json`, written last, which holds the stage's report and the files'
sizes and sha256s. A stage counts as finished only when its JSON is there and both files match
it, so a kill mid-write, a torn file or an edit is recomputed, never trusted. A stage built
on another's table (scoring, on the candidates) records that table's sha256 as its `inputs`,
and is redone when the candidates it would be read with are not those. A rerun finds
the finished stages by key and loads no model for them; a build's flow or plain loop and
every Dask worker share the folder (it must be storage they all reach).

Why not Prefect's persisted task results: those are cloudpickles, and reading one runs
whatever code it names. These files hold data only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cpo_data import leftovers

log = logging.getLogger(__name__)

STAGED_DIR = "shards"
TEMPORARY = ".tmp-"


@dataclass
class Staged:
    table: pa.Table
    dropped: pa.Table
    report: dict[str, Any]
    scores: pa.Table | None = None
    """A third table, where the stage kept one (a sources part's carried scores)."""


def _file_name(key: str, part: str) -> str:
    return f"{key}.parquet" if part == "table" else f"{key}.{part}.parquet"


def staged_dir(work_dir: str) -> str:
    return f"{work_dir.rstrip('/')}/{STAGED_DIR}"


def _folder(work_dir: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(staged_dir(work_dir))
    return fs, path.rstrip("/")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _put(fs: fsspec.AbstractFileSystem, folder: str, name: str, data: bytes) -> None:
    """One file whole or not at all: a local file is written aside and renamed."""
    final = posixpath.join(folder, name)
    if isinstance(fs, LocalFileSystem):
        temporary = posixpath.join(folder, leftovers.stamped(TEMPORARY))
        fs.pipe_file(temporary, data)
        fs.mv(temporary, final)
    else:
        fs.pipe_file(final, data)


def save(work_dir: str, key: str, table: pa.Table, dropped: pa.Table,
         report: dict[str, Any], inputs: dict[str, str] | None = None,
         scores: pa.Table | None = None) -> None:
    """Keep one finished stage under `key`; its JSON is written last. `inputs`: the sha256s
    of the staged tables this stage was computed from (`table_sha256`)."""
    fs, folder = _folder(work_dir)
    fs.makedirs(folder, exist_ok=True)
    files = {}
    parts = {"table": table, "dropped": dropped}
    if scores is not None:
        parts["scores"] = scores
    for part, kept in parts.items():
        data = _parquet_bytes(kept)
        name = _file_name(key, part)
        _put(fs, folder, name, data)
        files[part] = {"path": name, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
    record = {"key": key, "files": files, "report": report, "inputs": inputs or {}}
    _put(fs, folder, f"{key}.json", json.dumps(record, sort_keys=True).encode())


def _record(fs: fsspec.AbstractFileSystem, folder: str, key: str) -> dict[str, Any] | None:
    record_path = posixpath.join(folder, f"{key}.json")
    try:
        record = json.loads(fs.cat_file(record_path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("%s: not valid JSON; the stage is done again", record_path)
        return None
    return record if isinstance(record, dict) else None


def table_sha256(work_dir: str, key: str) -> str | None:
    """The sha256 of the table a finished stage kept (from its record), else None."""
    fs, folder = _folder(work_dir)
    record = _record(fs, folder, key)
    return ((record or {}).get("files", {}).get("table") or {}).get("sha256")


def load(work_dir: str, key: str, inputs: dict[str, str] | None = None) -> Staged | None:
    """The finished stage under `key`, or None when there is none or it does not check out
    (then it is redone; a warning names the file): its files changed, or it was computed
    from other tables than `inputs` names."""
    fs, folder = _folder(work_dir)
    record_path = posixpath.join(folder, f"{key}.json")
    record = _record(fs, folder, key)
    if record is None:
        return None
    if inputs is not None and record.get("inputs") != inputs:
        log.warning("%s: computed from other candidates than the ones kept now (they were "
                    "made again); the stage is done again", record_path)
        return None
    tables = {}
    for part in ("table", "dropped", *(["scores"] if "scores" in record.get("files", {}) else [])):
        entry = record.get("files", {}).get(part) or {}
        path = posixpath.join(folder, str(entry.get("path")))
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            log.warning("%s: missing; the stage is done again", path)
            return None
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get(
                "sha256"):
            log.warning("%s: does not match %s (cut short or changed); the stage is done "
                        "again", path, record_path)
            return None
        tables[part] = pq.read_table(pa.BufferReader(data), use_threads=False)  # see cache.py
    return Staged(tables["table"], tables["dropped"], record.get("report") or {},
                  tables.get("scores"))


def sweep(work_dir: str) -> list[str]:
    """Remove temporary files that dead writers left in the staged folder."""
    fs, folder = _folder(work_dir)
    if not fs.exists(folder):
        return []
    return leftovers.sweep(fs, folder, TEMPORARY)
