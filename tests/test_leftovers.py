"""What killed writers leave: owner-tagged temporaries swept once their owner is gone, and
cache segments cut short skipped and set aside."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

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


def test_an_owner_hidden_from_proc_is_judged_by_its_pid(monkeypatch):
    """A hidepid mount hides other users' /proc/<pid> (PermissionError, or ENOENT): such an
    owner is alive while its pid is, not gone because its start time cannot be read."""
    def hidden(pid):
        raise PermissionError(13, "Permission denied", f"/proc/{pid}/stat")

    monkeypatch.setattr(leftovers, "_read_start_time", hidden)
    host, _, start = leftovers.owner_tag().split("_")
    assert not leftovers.owner_gone(f"{host}_{os.getpid()}_{start}")  # this process
    assert leftovers.owner_gone(f"{host}_{_dead_pid()}_{start}")
    # Someone else's process: signalling it is refused, so it is running.
    real_kill = os.kill

    def refused(pid, sig):
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", refused)
    assert not leftovers.owner_gone(f"{host}_4242_{start}")


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it waits for whoever adopts it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux kernel setting")
def test_a_child_dying_with_parent_gets_the_signal_when_its_parent_is_killed():
    # The parent loads leftovers.py alone (not the cpo_data package, seconds of imports).
    parent_code = (
        "import importlib.util, subprocess, sys\n"
        "spec = importlib.util.spec_from_file_location('leftovers', sys.argv[1])\n"
        "leftovers = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(leftovers)\n"
        "child = subprocess.Popen(leftovers.dying_with_parent(['sleep', '120']))\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, leftovers.__file__],
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 20
        # Killed once `sleep` runs (the wrapper has exec'd), so the setting survived exec.
        while Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, "the wrapper did not exec within 20 s"
            time.sleep(0.02)
        parent.kill()  # SIGKILL: the parent runs no cleanup
        parent.wait()
        while _running(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
        if _running(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux kernel setting")
def test_a_child_whose_parent_died_before_it_was_tied_does_not_run(tmp_path):
    """Had the parent died before prctl, no signal would come: the wrapper sees that its
    parent is not the one expected (here: a pid that has ended) and exits without exec."""
    marker = tmp_path / "ran"
    command = leftovers._tied(["touch", str(marker)], signal.SIGTERM, parent=_dead_pid())
    done = subprocess.run(command)
    assert done.returncode == 128 + signal.SIGTERM
    assert not marker.exists()
    # The parent it expects: it runs.
    assert subprocess.run(leftovers.dying_with_parent(["touch", str(marker)])).returncode == 0
    assert marker.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="elsewhere Popen raises")
def test_a_command_that_cannot_be_run_exits_127(tmp_path):
    done = subprocess.run(leftovers.dying_with_parent([str(tmp_path / "missing")]),
                          capture_output=True, text=True)
    assert done.returncode == 127 and "missing: No such file or directory" in done.stderr
