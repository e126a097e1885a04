import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpo_data import publishing, schema, store
from cpo_data.testing import sample_dropped, sample_triplets


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _publish(root, seed=0, name="mt", **kwargs):
    return store.publish_triplets(sample_triplets(3, seed=seed), str(root), name,
                                  {"seed": seed}, **kwargs)


def test_round_trip_keeps_every_value(tmp_path):
    table = sample_triplets(3)
    version = store.publish_triplets(table, str(tmp_path), "mt", {"config": {"a": 1}})
    frame = store.read_triplets(str(tmp_path / "mt"), version)
    assert isinstance(frame, pd.DataFrame)
    expected = table.to_pandas().sort_values("id").reset_index(drop=True)
    got = frame.sort_values("id").reset_index(drop=True)
    assert got.drop(columns=["chosen_scores", "rejected_scores"]).equals(
        expected.drop(columns=["chosen_scores", "rejected_scores"]))
    assert [list(x) for x in got["chosen_scores"]] == [list(x) for x in expected["chosen_scores"]]
    # The same version through the store root and a name.
    assert len(store.read_triplets(str(tmp_path), version, name="mt")) == 6


def test_manifest_has_counts_hashes_schema_and_provenance(tmp_path):
    dropped = sample_dropped(["s1", "s2"], reason="within_noise")
    version = _publish(tmp_path, dropped=dropped)
    folder = tmp_path / "mt" / version
    manifest = json.loads((folder / store.MANIFEST).read_text())
    assert manifest["version"] == version and manifest["name"] == "mt"
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert manifest["rows"] == 6
    assert manifest["rows_per_lang_pair"] == {"de-en": 3, "en-de": 3}
    assert manifest["dropped_per_reason"] == {"within_noise": 2}
    assert manifest["provenance"] == {"seed": 0}
    for entry in manifest["files"] + manifest["dropped_files"]:
        data = (folder / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    assert manifest["systems"] == [{"system": "system_a", "chosen": 6, "rejected": 0},
                                   {"system": "system_b", "chosen": 0, "rejected": 6}]
    assert manifest["license"] is None and manifest["conversational_files"] == []
    # The card and its front matter, written by the store for every version, listed first.
    card, front = manifest["attachments"]
    for entry, path in ((card, store.CARD_PATH), (front, store.REPO_YAML)):
        data = (folder / path).read_bytes()
        assert entry == {"path": path, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest()}
    assert (folder / store.CARD_PATH).read_text().startswith("---\n")
    # No README.md at the root: pyarrow would read it as Parquet (see the pandas test).
    assert sorted(p.name for p in folder.iterdir()) == [
        ".huggingface.yaml", ".manifest.json", "__attachments__", "__dropped__", "de-en", "en-de"]
    assert sorted(p.name for p in (folder / store.ATTACHMENTS_DIR).iterdir()) == ["README.md"]
    assert store.read_dropped(str(tmp_path / "mt"))["reason"].tolist() == ["within_noise"] * 2


def _as_legacy(folder: Path) -> None:
    """Make a published version look like one published before cards: `_manifest.json`
    with the keys it had then (no `attachments`, `systems`, ...), no card, no
    `.huggingface.yaml`."""
    manifest = json.loads((folder / store.MANIFEST).read_text())
    for key in ("attachments", "systems", "license", "conversational_files"):
        del manifest[key]
    (folder / store.MANIFEST).unlink()
    (folder / store.LEGACY_MANIFEST).write_text(json.dumps(manifest))
    (folder / store.REPO_YAML).unlink()
    shutil.rmtree(folder / store.ATTACHMENTS_DIR)


def test_a_version_published_with_the_old_manifest_name_still_lists_and_reads(tmp_path):
    """Versions published before the card have `_manifest.json` (and no card)."""
    old = _publish(tmp_path, seed=0)
    folder = tmp_path / "mt" / old
    _as_legacy(folder)
    new = _publish(tmp_path, seed=1)
    assert [m["version"] for m in store.list_versions(str(tmp_path / "mt"))] == [old, new]
    assert store.read_manifest(str(tmp_path / "mt"), old)["version"] == old
    frame = store.read_triplets(str(tmp_path / "mt"), old, verify=True)
    assert frame["src"].str.startswith("source 0-").all() and len(frame) == 6
    # A folder with neither name is not a version.
    (folder / store.LEGACY_MANIFEST).rename(folder / "manifest.json")
    assert [m["version"] for m in store.list_versions(str(tmp_path / "mt"))] == [new]


def test_versions_are_listed_in_order_and_latest_is_newest(tmp_path):
    versions = [_publish(tmp_path, seed=s) for s in range(3)]
    listed = [m["version"] for m in store.list_versions(str(tmp_path / "mt"))]
    assert listed == versions
    assert store.resolve_version(str(tmp_path / "mt")) == versions[-1]
    latest = store.read_triplets(str(tmp_path / "mt"))
    assert latest["src"].str.startswith("source 2-").all()
    first = store.read_triplets(str(tmp_path / "mt"), versions[0])
    assert first["src"].str.startswith("source 0-").all()
    with pytest.raises(store.StoreError, match="no version 'nope'"):
        store.read_triplets(str(tmp_path / "mt"), "nope")


def test_version_folder_opens_with_pandas_and_datasets(tmp_path):
    import datasets

    version = _publish(tmp_path, dropped=sample_dropped(["s1"]), conversational=True,
                       attachments=lambda *_: {"report.html": b"<html></html>"})
    folder = store.version_path(str(tmp_path / "mt"), version)
    # pyarrow reads every file not starting with "." or "_" as Parquet: the version holds none
    # but the triplet files (the card, the manifest, dropped and conversational rows are not).
    frame = pd.read_parquet(folder)
    assert list(frame.columns) == schema.TRIPLETS.names
    assert len(frame) == 6
    assert sorted(frame["id"]) == sorted(store.read_triplets(folder.rsplit("/", 1)[0])["id"])
    assert pd.read_parquet(f"{folder}/de-en")["lang_pair"].tolist() == ["de-en"] * 3
    for loaded in (datasets.load_dataset("parquet", data_files=f"{folder}/*/*.parquet"),
                   datasets.load_dataset(folder)):
        train = loaded["train"]
        assert train.num_rows == 6
        assert {"prompt", "chosen", "rejected", "lang_pair"} <= set(train.column_names)
        assert sorted(set(train["lang_pair"])) == ["de-en", "en-de"]


def test_publish_failing_mid_write_leaves_no_version_and_keeps_latest(tmp_path, monkeypatch):
    before = _publish(tmp_path, seed=0)
    calls = {"n": 0}
    real = publishing._PartFile.close

    def fail_on_second_file(part):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(part)

    monkeypatch.setattr(publishing._PartFile, "close", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        _publish(tmp_path, seed=1)
    assert [m["version"] for m in store.list_versions(str(tmp_path / "mt"))] == [before]
    assert store.resolve_version(str(tmp_path / "mt")) == before
    # The temporary folder is removed; the lock file stays (it holds no lock once closed).
    assert sorted(p.name for p in (tmp_path / "mt").iterdir()) == [store.locks.LOCK_FILE, before]


def test_publish_killed_mid_write_leaves_no_version_and_keeps_latest(tmp_path):
    before = _publish(tmp_path, seed=0)
    script = textwrap.dedent(f"""
        import os, signal
        from cpo_data import store
        from cpo_data.testing import sample_triplets
        from cpo_data import publishing
        real = publishing._PartFile.close
        calls = []
        def kill_on_second_file(part):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(part)
        publishing._PartFile.close = kill_on_second_file
        store.publish_triplets(sample_triplets(3, seed=1), {str(tmp_path)!r}, "mt", {{}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    leftovers = [p.name for p in (tmp_path / "mt").iterdir()
                 if p.name not in (before, store.locks.LOCK_FILE)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # half-written, hidden
    assert [m["version"] for m in store.list_versions(str(tmp_path / "mt"))] == [before]
    assert store.read_triplets(str(tmp_path / "mt"))["src"].str.startswith("source 0-").all()
    after = _publish(tmp_path, seed=2)  # the store still works
    assert store.resolve_version(str(tmp_path / "mt")) == after


def test_object_store_writes_manifest_last(tmp_path):
    """On a filesystem without rename (memory://, like s3://) the manifest commits the version."""
    import fsspec

    fs = fsspec.filesystem("memory")
    written = []
    real_pipe = fs.pipe_file

    def record(path, data, **kwargs):
        written.append(path)
        return real_pipe(path, data, **kwargs)

    fs.pipe_file = record
    try:
        version = store.publish_triplets(sample_triplets(2), "memory://bucket/store", "mt", {})
        assert written[-1].endswith(f"/mt/{version}/{store.MANIFEST}")
        for path in (store.CARD_PATH, store.REPO_YAML):
            assert any(p.endswith(f"/mt/{version}/{path}") for p in written[:-1])
        assert len(store.read_triplets("memory://bucket/store/mt", verify=True)) == 4
        # A version folder without its manifest: see test_store_safety.py.
    finally:
        del fs.pipe_file
        fs.rm("/bucket", recursive=True)


def test_store_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "store"
    path.write_text("not a folder")
    with pytest.raises(store.StoreError, match=rf"{path}: store path is a file"):
        _publish(path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mt").write_text("x")
    with pytest.raises(store.StoreError, match="ds/mt: store path is a file"):
        _publish(tmp_path / "ds")
    with pytest.raises(store.StoreError, match="store path is a file"):
        store.read_triplets(str(path))


def test_bad_tables_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(schema.SchemaError, match="triplets: missing column 'prompt'"):
        store.publish_triplets(sample_triplets(1).drop_columns(["prompt"]), str(tmp_path), "mt")
    with pytest.raises(store.StoreError, match="nothing to publish"):
        store.publish_triplets(sample_triplets(0), str(tmp_path), "mt")
    with pytest.raises(store.StoreError, match="not JSON-serializable"):
        store.publish_triplets(sample_triplets(1), str(tmp_path), "mt", {"x": object()})
    assert not (tmp_path / "mt").exists() or not os.listdir(tmp_path / "mt")


def test_reading_an_empty_or_missing_dataset_says_so(tmp_path):
    with pytest.raises(store.StoreError, match="no such dataset"):
        store.read_triplets(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(store.StoreError, match="no published version"):
        store.read_triplets(str(tmp_path / "empty"))


def test_verify_detects_a_changed_file(tmp_path):
    version = _publish(tmp_path)
    part = next(Path(tmp_path / "mt" / version / "de-en").iterdir())
    other = _parquet_bytes(sample_triplets(3, pairs=("de-en",), seed=9))
    part.write_bytes(other)
    assert len(store.read_triplets(str(tmp_path / "mt"), verify=False)) == 6  # opted out
    with pytest.raises(store.StoreError, match="sha256 mismatch|bytes, the manifest says"):
        store.read_triplets(str(tmp_path / "mt"))


SCORER_SCORE_V1 = pa.struct([("scorer", pa.string()), ("score", pa.float64())])
TRIPLETS_V2 = pa.schema([f for f in schema.TRIPLETS if f.name != "confidence"])
TRIPLETS_V1 = pa.schema([f.with_type(pa.list_(SCORER_SCORE_V1))
                         if f.name in ("chosen_scores", "rejected_scores") else f
                         for f in TRIPLETS_V2])


def _as_schema_1(folder: Path, version: int = 1) -> None:
    """Rewrite a published version as an older schema wrote it, and a manifest saying so
    (with the new files' hashes). Version 2: no `confidence`; version 1: no `confidence`, and
    score entries without `error_spans`."""
    manifest_path = folder / store.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        part = folder / entry["path"]
        rows = pq.read_table(part).to_pylist()
        if version == 1:
            for row in rows:
                for side in ("chosen_scores", "rejected_scores"):
                    row[side] = [{"scorer": e["scorer"], "score": e["score"]} for e in row[side]]
        old = TRIPLETS_V1 if version == 1 else TRIPLETS_V2
        data = _parquet_bytes(pa.Table.from_pylist(rows, schema=old))
        part.write_bytes(data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["schema_version"] = version
    manifest_path.write_text(json.dumps(manifest))


def test_a_schema_2_version_reads_with_null_confidence(tmp_path):
    table = sample_triplets(2)
    version = store.publish_triplets(table, str(tmp_path), "mt")
    _as_schema_1(tmp_path / "mt" / version, version=2)
    part = next((tmp_path / "mt" / version / "de-en").iterdir())
    assert "confidence" not in pq.read_schema(part).names
    got = store.read_triplets_table(str(tmp_path / "mt"), version, verify=True)
    assert got.schema == schema.TRIPLETS
    assert got.column("confidence").null_count == got.num_rows == table.num_rows
    assert sorted(got.column("id").to_pylist()) == sorted(table.column("id").to_pylist())


def test_a_schema_1_version_still_reads_with_null_spans(tmp_path):
    from training.config import TrainConfig
    from training.run import load_dataset

    table = sample_triplets(3)
    version = store.publish_triplets(table, str(tmp_path), "mt")
    _as_schema_1(tmp_path / "mt" / version)
    assert pq.read_schema(next((tmp_path / "mt" / version / "de-en").iterdir())).field(
        "chosen_scores").type == pa.list_(SCORER_SCORE_V1)
    got = store.read_triplets_table(str(tmp_path / "mt"), version, verify=True)
    assert got.schema == schema.TRIPLETS
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(got.to_pylist(), key=lambda r: r["id"]) == [by_id[i] for i in sorted(by_id)]
    assert all(e["error_spans"] is None for side in ("chosen_scores", "rejected_scores")
               for entries in got.column(side).to_pylist() for e in entries)
    # Training reads it as before (read_triplets, verified).
    manifest, rows = load_dataset(TrainConfig(model="unused", dataset=str(tmp_path / "mt")))
    assert manifest["schema_version"] == 1 and len(rows) == 6
    # A schema-1 version next to a newer one: each is read as its own manifest says.
    store.publish_triplets(sample_triplets(3, seed=1), str(tmp_path), "mt")
    assert len(store.read_triplets(str(tmp_path / "mt"), version)) == 6
    assert len(store.read_triplets(str(tmp_path / "mt"))) == 6


def test_public_api_is_importable_from_the_package(tmp_path):
    import cpo_data

    version = cpo_data.publish_triplets(sample_triplets(1), str(tmp_path), "mt", {"a": 1})
    frame = cpo_data.read_triplets(str(tmp_path / "mt"), version="latest")
    assert list(frame["chosen"]) == sorted(frame["chosen"]) and len(frame) == 2
    assert cpo_data.read_manifest(str(tmp_path / "mt"))["version"] == version


def test_the_manifest_counts_each_system_of_a_shared_text(tmp_path):
    """`ref+system_a` (a text both gave) counts once for each, as selection's tallies do."""
    rows = sample_triplets(2).to_pylist()
    rows[0]["chosen_system"] = "ref+system_a"
    version = store.publish_triplets(pa.Table.from_pylist(rows, schema=schema.TRIPLETS),
                                     str(tmp_path), "mt")
    assert store.read_manifest(str(tmp_path / "mt"), version)["systems"] == [
        {"system": "ref", "chosen": 1, "rejected": 0},
        {"system": "system_a", "chosen": 4, "rejected": 0},
        {"system": "system_b", "chosen": 0, "rejected": 4}]
