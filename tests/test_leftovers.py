"""What killed writers leave: owner-tagged temporaries swept once their owner is gone, and
cache segments cut short skipped and set aside."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import fsspec

from cpo_data import leftovers, staging
from cpo_data.cache import ContentCache, cached_compute


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_temporaries_whose_owner_is_gone_are_swept(tmp_path):
    fs = fsspec.filesystem("file")
    mine = tmp_path / leftovers.stamped(".tmp-")
    mine.write_text("being written")
    host, _, start = leftovers.owner_tag().split("_")
    dead = tmp_path / f".tmp-{host}_{_dead_pid()}_{start}_abc"
    dead.mkdir()
    (dead / "part.parquet").write_text("half")
    # This pid, but another start time: a dead owner whose pid was reused (by this process).
    reused = tmp_path / f".tmp-{host}_{os.getpid()}_{int(start) - 1}_abc"
    reused.write_text("x")
    other_host = tmp_path / f".tmp-elsewhere_{_dead_pid()}_{start}_abc"
    other_host.write_text("x")
    old_other = tmp_path / ".tmp-elsewhere_1_1_abc"
    old_other.write_text("x")
    week_ago = time.time() - leftovers.OTHER_HOST_MAX_AGE_S - 60
    os.utime(old_other, (week_ago, week_ago))
    unrelated = tmp_path / ".tmp-not-a-tag"
    unrelated.write_text("x")
    removed = leftovers.sweep(fs, str(tmp_path), ".tmp-")
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [dead.name, reused.name, old_other.name])
    assert mine.exists() and other_host.exists() and unrelated.exists()
    assert not dead.exists() and not reused.exists() and not old_other.exists()


def test_a_torn_cache_segment_is_skipped_set_aside_and_recomputed(tmp_path, caplog):
    cache = ContentCache(str(tmp_path), "ns")
    cache.put_many({"a": 1, "b": 2})
    (segment,) = [p for p in (tmp_path / "ns").iterdir() if p.name.startswith("seg-")]
    segment.write_bytes(segment.read_bytes()[:20])  # cut short
    fresh = ContentCache(str(tmp_path), "ns")  # a later build's process
    computed = []

    def compute(items):
        computed.extend(items)
        return [len(item) for item in items]

    with caplog.at_level(logging.WARNING, logger="cpo_data.cache"):
        values, count = cached_compute(fresh, ["a", "bb"], str, compute, int, int)
    assert values == [1, 2] and count == 2 and computed == ["a", "bb"]
    assert any(segment.name in r.getMessage() and "unreadable" in r.getMessage()
               for r in caplog.records)
    assert not segment.exists() and (tmp_path / "ns" / f"torn-{segment.name}").exists()
    # Rewritten: the next process finds both values without computing them.
    again = ContentCache(str(tmp_path), "ns")
    assert again.get_many(["a", "bb"]) == {"a": 1, "bb": 2}


def test_a_cache_writer_sweeps_a_killed_writers_temporary_segment(tmp_path):
    folder = tmp_path / "ns"
    folder.mkdir()
    host, _, start = leftovers.owner_tag().split("_")
    stale = folder / f".tmp-seg-{host}_{_dead_pid()}_{start}_x"
    stale.write_bytes(b"half a segment")
    live = folder / leftovers.stamped(".tmp-seg-")
    live.write_bytes(b"being written")
    ContentCache(str(tmp_path), "ns").put_many({"k": 1})
    assert not stale.exists() and live.exists()


def test_a_torn_staged_shard_is_done_again(tmp_path, caplog):
    from cpo_data import schema
    from cpo_data.testing import sample_dropped

    work = str(tmp_path)
    table = sample_dropped(["s1"], reason="x")
    staging.save(work, "generate-abc", table, schema.empty(schema.DROPPED), {"n": 1})
    assert staging.load(work, "generate-abc").report == {"n": 1}
    part = tmp_path / staging.STAGED_DIR / "generate-abc.parquet"
    part.write_bytes(part.read_bytes()[:-5])
    with caplog.at_level(logging.WARNING, logger="cpo_data.staging"):
        assert staging.load(work, "generate-abc") is None
    assert "cut short or changed" in caplog.text
