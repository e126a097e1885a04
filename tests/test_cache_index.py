"""The content cache indexes keys, not values: lookups across many segments find the first
value stored, a process holds about 12 bytes an entry, and digests that collide can only miss."""

from __future__ import annotations

import random
import tracemalloc

from cpo_data import cache as cache_module
from cpo_data.cache import ContentCache


def _segments(cache: ContentCache, count: int, per: int) -> dict[str, list[str]]:
    """`count` segments of `per` keys, each repeating some earlier keys with a new value;
    returns every key's values in the order written."""
    stored: dict[str, list[str]] = {}
    rng = random.Random(3)
    for number in range(count):
        keys = [f"key-{number}-{i}" for i in range(per)]
        keys += rng.sample(sorted(stored), min(3, len(stored)))  # stored again, later
        entries = {key: f"value of {key} from segment {number}" for key in keys}
        cache.put_many(entries)
        for key, value in entries.items():
            stored.setdefault(key, []).append(value)
    return stored


def test_lookups_across_many_segments_find_each_keys_first_value(tmp_path):
    # 40 segments: past the index's merge point twice, and some left unmerged.
    assert 40 > 2 * cache_module._Index.MERGE_AFTER
    writer = ContentCache(str(tmp_path), "ns")
    stored = _segments(writer, 40, 25)
    keys = sorted(stored) + ["never stored", "key-99-0"]
    # The writer indexed its segments as it wrote them: the first value written wins.
    assert writer.get_many(keys) == {key: values[0] for key, values in stored.items()}
    # Another process indexes the files in name order (the second they were written, then a
    # random id): it finds every key, with one of the values stored for it. Real writers
    # store equal values for a key (same content, same identity), so which one is moot.
    found = ContentCache(str(tmp_path), "ns").get_many(keys)
    assert set(found) == set(stored) and all(found[k] in stored[k] for k in found)
    assert len(writer) == len(stored)


def test_a_process_holds_the_index_not_the_values(tmp_path):
    entries, size = 20_000, 1000
    writer = ContentCache(str(tmp_path), "ns")
    for start in range(0, entries, 2000):  # ten segments, as ten shards would write
        writer.put_many({f"k{i}": "x" * size for i in range(start, start + 2000)})
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    reader = ContentCache(str(tmp_path), "ns")
    assert len(reader) == entries
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert reader.get_many(["k5", "k19999"]) == {"k5": "x" * size, "k19999": "x" * size}
    # 12 bytes an entry (digest and segment number), 240 KB here, and a few hundred bytes per
    # segment; the values would be 20 MB. 1 MB leaves room for numpy's and pyarrow's own
    # allocations while reading, none of which may scale with the values.
    assert held < 1_000_000, held


def test_colliding_digests_only_miss(tmp_path, monkeypatch):
    writer = ContentCache(str(tmp_path), "ns")
    stored = _segments(writer, 5, 10)
    monkeypatch.setattr(cache_module, "key_digest", lambda key: 7)  # every key collides
    reader = ContentCache(str(tmp_path), "ns")
    found = reader.get_many(sorted(stored))
    assert found and all(value in stored[key] for key, value in found.items())
    assert len(found) < len(stored)  # the others are misses, computed again
