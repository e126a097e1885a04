"""The store stays trustworthy: reads are verified by default, damage is a named error, one
writer per dataset, and a build whose triplets did not change publishes nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cpo_data import build, locks, store
from cpo_data.config import load_config
from cpo_data.testing import sample_dropped, sample_triplets
from tests.test_build import MODELS
from tests.test_build_flow import DEMO_ROWS, write_config


def _publish(root, seed=0, **kwargs):
    return store.publish_triplets(sample_triplets(3, seed=seed), str(root), "mt", {"seed": seed},
                                  dropped=sample_dropped(["x1", "x2"], reason="within_noise"),
                                  **kwargs)


def _data_files(folder: Path, manifest: dict) -> list[tuple[str, Path]]:
    return [(key, folder / entry["path"]) for key in ("files", "dropped_files")
            for entry in manifest[key]]


@pytest.mark.slow
def test_every_single_byte_flip_in_a_data_file_is_refused_by_default(tmp_path):
    """202 flips at seeded positions over the triplet and dropped files: before reads were
    verified by default, about a third came back as altered data with no error."""
    version = _publish(tmp_path)
    folder = tmp_path / "mt" / version
    manifest = store.read_manifest(str(tmp_path / "mt"), version)
    files = _data_files(folder, manifest)
    positions = [(key, path, offset) for key, path in files
                 for offset in range(path.stat().st_size)]
    sample = random.Random(18).sample(positions, 202)
    read = {"files": store.read_triplets, "dropped_files": store.read_dropped}
    for key, path, offset in sample:
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[offset] ^= 0x01  # the smallest change a byte can take
        path.write_bytes(bytes(flipped))
        try:
            relative = path.relative_to(tmp_path).as_posix()
            with pytest.raises(store.StoreError, match=rf"{relative}: sha256 mismatch"):
                read[key](str(tmp_path / "mt"), version)
            with pytest.raises(store.StoreError, match="sha256 mismatch"):
                store.read_source_ids(str(tmp_path / "mt"), version)
        finally:
            path.write_bytes(original)
    # Unaltered, the same reads pass: the checks above fail for the flips, not the reader.
    assert len(store.read_triplets(str(tmp_path / "mt"), version)) == 6
    assert len(store.read_dropped(str(tmp_path / "mt"), version)) == 2


def test_a_file_swapped_in_from_another_version_is_refused(tmp_path):
    old, new = _publish(tmp_path, seed=0), _publish(tmp_path, seed=1)
    part = "de-en/part-00000.parquet"
    (tmp_path / "mt" / new / part).write_bytes((tmp_path / "mt" / old / part).read_bytes())
    with pytest.raises(store.StoreError, match=rf"mt/{new}/{part}: (sha256 mismatch|\d+ bytes)"):
        store.read_triplets(str(tmp_path / "mt"))
    assert len(store.read_triplets(str(tmp_path / "mt"), old)) == 6  # the other is intact


def test_a_truncated_or_missing_file_is_a_named_error_with_or_without_verify(tmp_path):
    version = _publish(tmp_path)
    part = tmp_path / "mt" / version / "en-de" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    where = f"mt/{version}/en-de/part-00000.parquet"
    with pytest.raises(store.StoreError, match=rf"{where}: {len(data) // 2} bytes, the "
                                               rf"manifest says {len(data)}"):
        store.read_triplets(str(tmp_path / "mt"))
    with pytest.raises(store.StoreError, match=rf"{where}: not a readable Parquet file"):
        store.read_triplets(str(tmp_path / "mt"), verify=False)
    part.unlink()
    with pytest.raises(store.StoreError, match=rf"{where}: missing \(the manifest lists it\)"):
        store.read_triplets(str(tmp_path / "mt"), verify=False)


def test_a_deleted_manifest_is_an_error_not_a_fallback_to_the_previous_version(tmp_path):
    old, new = _publish(tmp_path, seed=0), _publish(tmp_path, seed=1)
    (tmp_path / "mt" / new / store.MANIFEST).unlink()
    for read in (store.read_triplets, store.read_manifest, store.resolve_version):
        with pytest.raises(store.StoreError, match=rf"mt/{new}/\.manifest\.json: missing in the "
                                                   rf"newest version folder.*newest complete: "
                                                   rf"{old}"):
            read(str(tmp_path / "mt"))
        with pytest.raises(store.StoreError, match=rf"mt/{new}/\.manifest\.json: missing, so"):
            read(str(tmp_path / "mt"), new)
    assert store.resolve_version(str(tmp_path / "mt"), old) == old  # named, it still reads
    assert [m["version"] for m in store.list_versions(str(tmp_path / "mt"))] == [old]


def test_an_object_store_version_being_written_is_invisible_and_a_dead_ones_is_removed():
    """memory:// has no rename, like s3://: a version's files land in place before its
    manifest. The writer's lock marker names it; once the marker expires (its writer died),
    the folder is still no version and no damage ('latest' stays the complete one), and the
    next writer removes it."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://safety/store"
    try:
        version = store.publish_triplets(sample_triplets(2), root, "mt", {})
        half = "20990101-000000-abcdef"
        fs.pipe_file(f"/safety/store/mt/{half}/de-en/part-00000.parquet", b"x")
        marker = {"host": "h", "pid": 1, "what": "a build", "since": "then", "token": "t",
                  "expires": time.time() + 60, "writing": half}
        fs.pipe_file(f"/safety/store/mt/{locks.MARKER}", json.dumps(marker).encode())
        assert store.resolve_version(f"{root}/mt") == version  # being written: not a version
        with pytest.raises(locks.LockBusy, match=r"a build \(pid 1 on h, since then\) is "
                                                 r"writing this dataset"):
            store.publish_triplets(sample_triplets(2, seed=1), root, "mt", {})
        marker["expires"] = time.time() - 1  # its writer died
        fs.pipe_file(f"/safety/store/mt/{locks.MARKER}", json.dumps(marker).encode())
        assert store.resolve_version(f"{root}/mt") == version  # a dead writer's: not damage
        newer = store.publish_triplets(sample_triplets(2, seed=1), root, "mt", {})
        assert not fs.exists(f"/safety/store/mt/{half}")  # the dead writer's half version
        assert store.resolve_version(f"{root}/mt") == newer
        assert not fs.exists(f"/safety/store/mt/{locks.MARKER}")  # released
    finally:
        fs.rm("/safety", recursive=True)


def _hold_lock_in_another_process(dataset: Path, release: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import pathlib, time
        from cpo_data import store
        with store.dataset_lock({str(dataset.parent)!r}, {dataset.name!r}, what="a test"):
            print("held", flush=True)
            while not pathlib.Path({str(release)!r}).exists():
                time.sleep(0.05)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _demo_recipe(tmp_path, **publish):
    return write_config(tmp_path, MODELS, DEMO_ROWS[:12], generate={},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False},
                        publish={"uri": "store", "name": "flowtest", **publish})


@pytest.mark.slow
def test_a_second_writer_stops_naming_the_holder_or_waits_for_it(tmp_path):
    holder = _hold_lock_in_another_process(tmp_path / "store" / "flowtest",
                                           tmp_path / "release")
    try:
        config = load_config(_demo_recipe(tmp_path))
        with pytest.raises(locks.LockBusy, match=rf"store/flowtest: a test \(pid {holder.pid} "
                                                 r"on .*since .*\) is writing this dataset"):
            build.run_build(config)
        assert not (tmp_path / "work").exists()  # it stopped before any work
        waiting = load_config(_demo_recipe(tmp_path, lock_wait_s=60))
        done = {}
        thread = threading.Thread(target=lambda: done.update(s=build.run_build(waiting)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and not (tmp_path / "work").exists()  # waiting, not working
        (tmp_path / "release").touch()
        thread.join(60)
        assert done["s"].version and not done["s"].unchanged
    finally:
        (tmp_path / "release").touch()
        holder.wait(10)


@pytest.mark.slow
def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = _hold_lock_in_another_process(tmp_path / "mt", tmp_path / "never")
    holder.kill()
    holder.wait()
    assert _publish(tmp_path)  # no stale lock to clear by hand


@pytest.mark.slow
def test_two_concurrent_builds_publish_one_version(tmp_path):
    """Two processes build the same config at once: one publishes, the other waits for the
    lock, reuses every finished shard and finds its triplets unchanged."""
    path = _demo_recipe(tmp_path, lock_wait_s=120)
    script = textwrap.dedent(f"""
        import json
        from cpo_data import build
        from cpo_data.config import load_config
        summary = build.run_build(load_config({str(path)!r}))
        print(json.dumps({{"version": summary.version, "unchanged": summary.unchanged,
                          "reused": summary.shards_reused}}))
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [json.loads(run.communicate(timeout=180)[0].strip().splitlines()[-1])
               for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    versions = store.list_versions(str(tmp_path / "store"), name="flowtest")
    assert len(versions) == 1
    assert {r["version"] for r in results} == {versions[0]["version"]}
    assert sorted(r["unchanged"] for r in results) == [False, True]
    second = next(r for r in results if r["unchanged"])
    assert second["reused"] == 2  # 12 sources in shards of 8: nothing done twice


def test_publishing_equal_triplets_again_publishes_nothing(tmp_path):
    first = _publish(tmp_path)
    assert _publish(tmp_path) == first
    assert len(store.list_versions(str(tmp_path / "mt"))) == 1
    assert sorted(p.name for p in (tmp_path / "mt").iterdir()) == [".lock", first]
    assert _publish(tmp_path, skip_unchanged=False) != first  # asked for, a copy is made
    changed = _publish(tmp_path, seed=1)
    assert len(store.list_versions(str(tmp_path / "mt"))) == 3
    assert _publish(tmp_path, seed=1, license="mit") != changed  # the licence is content too


def test_a_rerun_of_an_unchanged_build_says_so(tmp_path):
    config = load_config(_demo_recipe(tmp_path))
    first = build.run_build(config)
    again = build.run_build(config)
    assert not first.unchanged and again.unchanged
    assert again.version == again.previous_version == first.version
    assert again.shards_reused == again.shards == 2
    assert len(store.list_versions(str(tmp_path / "store"), name="flowtest")) == 1
