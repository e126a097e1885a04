"""The dataset lock (`cpo_data.locks`): one writer per thread as per process, a handed-over
lock for a publish in another thread, a heartbeat that outlives a network blip, and readers
that are not fooled by a dead writer's half version on an object store."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import fsspec
import pytest

from cpo_data import locks, publishing, store
from cpo_data.testing import sample_triplets


@pytest.fixture
def memory_store():
    """A fresh folder on fsspec's memory filesystem: no rename and no flock, like s3://, so
    the lock is the marker there. Yields (fs, path, uri)."""
    fs = fsspec.filesystem("memory")
    path = f"/locks-{uuid.uuid4().hex[:8]}"
    fs.makedirs(f"{path}/mt", exist_ok=True)
    try:
        yield fs, path, f"memory://{path}"
    finally:
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory"])
def any_store(request, tmp_path):
    """A store URI on a local disk (flock) and on an object-store-like filesystem (marker)."""
    if request.param == "local":
        yield str(tmp_path)
    else:
        yield request.getfixturevalue("memory_store")[2]


def _in_thread(work):
    """Run `work` in a new thread; what it returned or raised."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the test to look at
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    return result


def _take(uri, **kwargs):
    with store.dataset_lock(uri, "mt", **kwargs):
        return "taken"


def _marker(fs, path) -> dict:
    return json.loads(fs.cat_file(f"{path}/mt/{locks.MARKER}"))


def _expired_marker(fs, path, **fields) -> None:
    marker = {"host": "h", "pid": 1, "what": "a build", "since": "then", "token": "dead",
              "expires": time.time() - 1, "writing": None, "abandoned": None, **fields}
    fs.pipe_file(f"{path}/mt/{locks.MARKER}", json.dumps(marker).encode())


# 1. Re-entry is per thread; another thread is handed the lock.


def test_another_thread_of_the_holding_process_waits_like_any_writer(any_store):
    with store.dataset_lock(any_store, "mt", what="the flow"):
        other = _in_thread(lambda: _take(any_store, wait_s=0))
        assert isinstance(other.get("error"), locks.LockBusy), other
        assert "the flow (pid" in str(other["error"])
        publish = _in_thread(lambda: store.publish_triplets(sample_triplets(2), any_store, "mt"))
        assert isinstance(publish.get("error"), locks.LockBusy), publish
    assert _in_thread(lambda: _take(any_store)) == {"value": "taken"}  # released
    assert store.list_versions(any_store, name="mt") == []


def test_the_holding_thread_may_take_the_lock_again(any_store):
    with store.dataset_lock(any_store, "mt") as outer:
        with store.dataset_lock(any_store, "mt", wait_s=0) as inner:
            assert inner is outer
            version = store.publish_triplets(sample_triplets(2), any_store, "mt")
        # Still held after the inner block: another thread is still refused.
        assert isinstance(_in_thread(lambda: _take(any_store))["error"], locks.LockBusy)
    assert store.resolve_version(f"{any_store}/mt") == version
    assert _in_thread(lambda: _take(any_store)) == {"value": "taken"}


def test_a_writer_handed_the_held_lock_publishes_from_another_thread(any_store):
    with store.dataset_lock(any_store, "mt", what="the flow") as held:
        assert isinstance(held, locks.Held)

        def publish():
            with publishing.VersionWriter(any_store, "mt", held=held) as writer:
                writer.add(sample_triplets(2))
                return writer.finish({"step": "task"})

        published = _in_thread(publish)
        assert "value" in published, published
        again = _in_thread(lambda: store.publish_triplets(sample_triplets(2, seed=1), any_store,
                                                          "mt", held=held))
        assert "value" in again, again
        # The lock is still the flow's: no other thread got in meanwhile.
        assert isinstance(_in_thread(lambda: _take(any_store))["error"], locks.LockBusy)
    versions = [m["version"] for m in store.list_versions(any_store, name="mt")]
    assert versions == [published["value"], again["value"]]


def test_a_handed_lock_must_be_this_datasets_and_still_held(any_store):
    with store.dataset_lock(any_store, "other") as other:
        with pytest.raises(ValueError, match="not .*mt"):
            store.publish_triplets(sample_triplets(2), any_store, "mt", held=other)
    with store.dataset_lock(any_store, "mt") as held:
        pass
    with pytest.raises(ValueError, match="no longer held"):
        store.publish_triplets(sample_triplets(2), any_store, "mt", held=held)
    assert store.list_versions(any_store, name="mt") == []


# 2. The heartbeat survives an error; a lost lease stops the writer.


@pytest.mark.slow  # 2 s of heartbeats
def test_the_heartbeat_keeps_renewing_after_a_failed_beat(memory_store, monkeypatch, caplog):
    fs, path, uri = memory_store
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(locks, "LEASE_S", 1.0)
    real_pipe = fs.pipe_file
    failures = []

    def flaky_pipe(target, *args, **kwargs):
        if threading.current_thread().name == "cpo-data-lock-heartbeat" and not failures:
            failures.append(target)
            raise ConnectionError("a network blip")
        return real_pipe(target, *args, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", flaky_pipe)
    with caplog.at_level(logging.WARNING, logger="cpo_data.locks"):
        with store.dataset_lock(uri, "mt") as held:
            time.sleep(2.0)  # twice the lease: only renewals keep it
            assert failures  # the blip happened
            marker = _marker(fs, path)
            assert marker["token"] == held.token and marker["expires"] > time.time()
            assert isinstance(_in_thread(lambda: _take(uri))["error"], locks.LockBusy)
    assert "could not renew the lock (ConnectionError: a network blip)" in caplog.text


def test_the_heartbeat_leaves_a_marker_taken_over_alone(memory_store, monkeypatch):
    fs, path, uri = memory_store
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    with store.dataset_lock(uri, "mt"):
        _expired_marker(fs, path, token="theirs", expires=time.time() + 60)
        theirs = _marker(fs, path)
        time.sleep(0.3)
        assert _marker(fs, path) == theirs  # not renewed, not rewritten
    assert _marker(fs, path) == theirs  # and not removed on release


def test_announcing_a_version_under_a_lost_lease_raises(memory_store):
    fs, path, uri = memory_store
    with store.dataset_lock(uri, "mt") as held:
        _expired_marker(fs, path, token="theirs", expires=time.time() + 60)
        theirs = _marker(fs, path)
        with pytest.raises(locks.LockLost, match="lock was lost"):
            locks.announce_writing(fs, f"{path}/mt", "20990101-000000-abcdef", held)
        assert _marker(fs, path) == theirs
        with pytest.raises(locks.LockLost, match="lock was lost"):
            store.publish_triplets(sample_triplets(2), uri, "mt", held=held)
    assert fs.ls(f"{path}/mt", detail=False) == [f"{path}/mt/{locks.MARKER}"]  # nothing written


def test_a_lease_lost_while_writing_publishes_nothing(memory_store):
    fs, path, uri = memory_store
    with pytest.raises(locks.LockLost, match="lock was lost"):
        with publishing.VersionWriter(uri, "mt") as writer:
            writer.add(sample_triplets(2))
            _expired_marker(fs, path, token="theirs", expires=time.time() + 60)
            writer.finish({})
    assert store.list_versions(f"{uri}/mt") == []
    assert not fs.exists(f"{path}/mt/{writer.version}")


# 3. A dead writer's half version on an object store is no version and no damage.


def test_an_expired_markers_half_version_is_skipped_not_damage(memory_store):
    fs, path, uri = memory_store
    version = store.publish_triplets(sample_triplets(2), uri, "mt")
    half = "20990101-000000-abcdef"
    fs.pipe_file(f"{path}/mt/{half}/de-en/part-00000.parquet", b"x")
    for fields in ({"writing": half}, {"abandoned": half}):
        _expired_marker(fs, path, **fields)
        assert store.resolve_version(f"{uri}/mt") == version
        assert store.read_manifest(f"{uri}/mt")["version"] == version  # build's "previous"
        assert [m["version"] for m in store.list_versions(f"{uri}/mt")] == [version]
    fs.rm_file(f"{path}/mt/{locks.MARKER}")  # named by no marker: damage, as on a disk
    with pytest.raises(store.StoreError, match=f"{half}/.manifest.json: missing in the newest"):
        store.resolve_version(f"{uri}/mt")


def test_a_half_version_is_passed_on_until_a_writer_removes_it(memory_store):
    """A build died after writing a version in place; the next build took the lock and died
    before its publish. The third still removes the first's half version."""
    fs, path, uri = memory_store
    half = "20990101-000000-abcdef"
    fs.pipe_file(f"{path}/mt/{half}/de-en/part-00000.parquet", b"x")
    _expired_marker(fs, path, writing=None, abandoned=half)  # the second build's, expired
    with store.dataset_lock(uri, "mt") as held:
        assert _marker(fs, path)["abandoned"] == half
        version = store.publish_triplets(sample_triplets(2), uri, "mt", held=held)
    assert not fs.exists(f"{path}/mt/{half}")
    assert store.resolve_version(f"{uri}/mt") == version
