"""A build reads its sources in parts and never holds them whole: the parts equal the whole
table at any size, files are read as they are iterated, repeated sources cost one more read,
and what the build learns over every source (the guards' context, the ids it compares with the
previous version) is the same learned part by part."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cpo_data import guards, sources, store
from cpo_data.config import SourcesConfig
from cpo_data.config_guards import GuardsConfig, LengthGuard
from cpo_data.source_formats import SourceError, read_rows
from cpo_data.testing import sample_dropped, sample_triplets
from tests.conftest import write_jsonl

MAPPING = dict(src_lang_column="src_lang", tgt_lang_column="tgt_lang", src_column="src",
               ref_column="ref", systems={"a": "sys_a", "b": "sys_b"})


def _row(src, sys_a, sys_b, ref="A reference.", tgt="en"):
    return {"src_lang": "de", "tgt_lang": tgt, "src": src, "ref": ref, "sys_a": sys_a,
            "sys_b": sys_b}


# Repeats within and across files: one fills an empty output, one conflicts, one is exact.
FIRST = [_row("Eins.", "One.", ""), _row("Zwei.", "Two.", "Deux."),
         _row("Drei.", "Three.", "Trois."), _row("Eins.", "One.", "Uno."),
         _row("Vier.", "", "Quatre.", tgt="fr"), _row("Fünf.", "Five.", "Cinq.")]
SECOND = [_row("Sechs.", "Six.", "Sechs?"), _row("Zwei.", "Two!", "Deux."),
          _row("Sieben.", "Seven.", "Sept.", ref=""), _row("Drei.", "Three.", "Trois.")]


def _configs(tmp_path):
    return [SourcesConfig(path=str(write_jsonl(tmp_path / name, rows)), **MAPPING)
            for name, rows in (("one.jsonl", FIRST), ("two.jsonl", SECOND))]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100])
def test_parts_of_any_size_make_the_whole_table_in_order_of_first_occurrence(tmp_path, size):
    configs = _configs(tmp_path)
    whole = sources.load_sources(configs)
    scan = sources.scan_sources(configs)
    merged, conflicts = sources.merge_repeated(scan)
    parts = list(sources.read_parts(scan, merged, size))
    assert [p.table.num_rows for p in parts[:-1]] == [size] * (len(parts) - 1)
    assert pa.concat_tables([p.table for p in parts]).equals(whole.table)
    dropped = pa.concat_tables([conflicts, *(p.dropped for p in parts)])
    assert dropped.equals(whole.dropped)
    # Counted from the rows here, not from the code under test: first occurrences, in order.
    firsts = list(dict.fromkeys((r["tgt_lang"], r["src"]) for r in FIRST + SECOND))
    assert whole.table.column("src").to_pylist() == [src for _, src in firsts]
    assert scan.report.sources == len(firsts) and scan.report.rows_read == 10
    assert scan.report.duplicates_collapsed == 3
    eins = whole.table.to_pylist()[0]
    assert {s["system"]: s["text"] for s in eins["systems"]} == {"a": "One.", "b": "Uno."}
    assert eins["duplicates"] == 2
    # Eins's empty b was filled by its repeat; Vier's empty a was not.
    assert dropped.column("reason").to_pylist() == ["conflicting_duplicate",
                                                    "empty_system_output"]


def test_carried_scores_follow_their_sources_into_the_parts(tmp_path):
    from tests.test_sources import ALMA_ROWS

    # The first row again, its kiwi scores changed: the first occurrence's are kept.
    again = json.loads(json.dumps(ALMA_ROWS[0]))
    again["translation"].update({k: 0.1 for k in again["translation"] if k.endswith("_kiwi")})
    path = write_jsonl(tmp_path / "alma.jsonl", [*ALMA_ROWS, again])
    config = SourcesConfig(path=str(path), format="alma_r")
    whole = sources.load_sources(config)
    scan = sources.scan_sources(config)
    parts = list(sources.read_parts(scan, sources.merge_repeated(scan)[0], 1))
    assert len(whole.scores) == 36  # 4 directions x 3 texts x 3 scorers, the repeat merged
    kiwi = [s["score"] for s in whole.scores.to_pylist() if s["scorer"] == "kiwi"]
    assert 0.1 not in kiwi and len(kiwi) == 12
    for part in parts:  # each part carries exactly its own sources' scores
        ids = set(part.table.column("source_id").to_pylist())
        assert set(part.scores.column("source_id").to_pylist()) == ids
    assert pa.concat_tables([p.scores for p in parts]).equals(whole.scores)


def _bad_second_row(path, first_row):
    good = first_row.encode()
    path.write_bytes(good + b"caf\xe9\n")  # Latin-1 where UTF-8 belongs
    return len(good) + 3  # the offset of the bad byte


def test_a_jsonl_file_is_read_line_by_line(tmp_path):
    path = tmp_path / "s.jsonl"
    offset = _bad_second_row(path, json.dumps(_row("Eins.", "One.", "Uno.")) + "\n")
    rows = read_rows(SourcesConfig(path=str(path), **MAPPING))
    assert next(rows)[1]["src"] == "Eins."  # before the bad line is read
    with pytest.raises(SourceError, match=rf"s\.jsonl, row 2: not UTF-8 \(byte 0xe9 at offset "
                                          rf"{offset}\)"):
        next(rows)


def test_a_csv_file_is_read_record_by_record(tmp_path):
    path = tmp_path / "s.csv"
    # A long second record puts the bad byte chunks of decoding after the first record; a
    # quoted field with a line break spans two lines (so the bad line is the file's 5th).
    long = "x" * 100_000
    header = "src_lang,tgt_lang,src,ref,sys_a,sys_b\n"
    offset = _bad_second_row(path, header + 'de,en,"Eins\nzwei",A ref.,One.,Uno.\n'
                             f"de,en,Zwei.,{long},Two.,Deux.\n")
    rows = read_rows(SourcesConfig(path=str(path), **MAPPING))
    number, row = next(rows)  # before the bad byte is decoded
    assert (number, row["src"]) == (1, "Eins\nzwei")
    with pytest.raises(SourceError, match=rf"s\.csv, row 5: not UTF-8 \(byte 0xe9 at offset "
                                          rf"{offset}\)"):  # row: the file's line
        list(rows)


def test_repeated_sources_cost_one_more_read_of_the_files(tmp_path, monkeypatch):
    reads = []
    original = sources.read_rows

    def counted(config):
        reads.append(config.path)
        return original(config)

    monkeypatch.setattr(sources, "read_rows", counted)
    distinct = write_jsonl(tmp_path / "distinct.jsonl", FIRST[:3])
    sources.load_sources(SourcesConfig(path=str(distinct), **MAPPING))
    assert reads == [str(distinct)] * 2  # checked, then handed on
    reads.clear()
    sources.load_sources(_configs(tmp_path))
    assert len(reads) == 6  # and where some repeat, once more to merge those


def test_the_guards_context_learned_part_by_part_equals_the_whole(tmp_path):
    rows = [_row(f"Satz Nummer {i} ist hier.", "a", "b", ref="x" * (10 + i % 17),
                 tgt="en" if i % 3 else "fr") for i in range(60)]
    config = SourcesConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)), **MAPPING)
    table = sources.load_sources(config).table
    rules = GuardsConfig(length_ratio=LengthGuard(learn_from=10))
    builder = guards.ContextBuilder(rules)
    for start in range(0, table.num_rows, 7):
        builder.add(table.slice(start, 7))
    whole = guards.dataset_context(table, rules)
    assert builder.context() == whole
    # Learned from the references (not the built-in table) for both directions: the check
    # above compares windows that depend on every part's ratios.
    assert set(whole.windows) == {"de-en", "de-fr"}
    assert whole.windows["de-en"] != guards.default_window("de", "en")
    assert {"de", "en", "fr"} <= whole.languages


def test_source_digests_are_the_ids_digests_and_are_verified(tmp_path):
    version = store.publish_triplets(sample_triplets(5), str(tmp_path), "mt", {},
                                     dropped=sample_dropped(["x1", "x2"], reason="within_noise"))
    uri = str(tmp_path / "mt")
    ids = store.read_source_ids(uri, version)
    digests = store.read_source_digests(uri, version)
    assert digests.dtype == np.uint64 and list(digests) == sorted(map(sources.id_digest, ids))
    part = next((tmp_path / "mt" / version).glob("*/part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(store.StoreError, match=r"sha256 mismatch"):
        store.read_source_digests(uri, version)
