import math

import pyarrow as pa
import pytest

from cpo_data import schema
from cpo_data.config import GenerateConfig, ScoreConfig, SelectConfig, SourcesConfig
from cpo_data.drops import Drops
from cpo_data.generate import Generated, generate_candidates
from cpo_data.score import ScoreResult, score_candidates
from cpo_data.select import select_triplets
from cpo_data.sources import load_sources, source_id
from tests.conftest import write_jsonl

MAPPING = dict(src_lang_column="src_lang", tgt_lang_column="tgt_lang", src_column="src",
               ref_column="ref", systems={"a": "sys_a", "b": "sys_b"})


def _row(src, sys_a, sys_b, ref="A reference.", **extra):
    return {"src_lang": "de", "tgt_lang": "en", "src": src, "ref": ref, "sys_a": sys_a,
            "sys_b": sys_b, **extra}


class _Blank:
    """A generator whose every output is empty: each one is a drop of the candidates stage."""

    name = "blank"
    identity = {"model": "blank", "decoding": {"strategy": "greedy"}}

    def generate(self, requests):
        return [Generated(texts=[""]) for _ in requests]


class _Length:
    """A scorer: the text's length, NaN for texts ending in '?' (a drop of the scores stage)."""

    name, needs_reference, higher_is_better, last_truncated = "len", False, True, 0
    identity = {"scorer": "len"}

    def score(self, items):
        return [ScoreResult(math.nan if i.mt.endswith("?") else float(len(i.mt)))
                for i in items]


# ---- the recorder ------------------------------------------------------------------------------


def test_recorder_gives_a_dropped_table_in_order_and_counts_per_reason():
    drops = Drops()
    assert drops.table().schema == schema.DROPPED and drops.table().num_rows == 0
    assert drops.counts() == {} and len(drops) == 0
    drops.add("s2", "en-de", "tied_scores", "2 candidates tie")
    drops.add("s1", "de-en", "empty_output", None)
    drops.add("s3", "de-en", "tied_scores", "3 candidates tie")
    table = drops.table()
    assert table.schema == schema.DROPPED
    assert schema.validate(table, schema.DROPPED).to_pylist() == [
        {"source_id": "s2", "lang_pair": "en-de", "reason": "tied_scores",
         "detail": "2 candidates tie"},
        {"source_id": "s1", "lang_pair": "de-en", "reason": "empty_output", "detail": None},
        {"source_id": "s3", "lang_pair": "de-en", "reason": "tied_scores",
         "detail": "3 candidates tie"},
    ]
    assert list(drops.counts().items()) == [("tied_scores", 2), ("empty_output", 1)]
    assert len(drops) == 3


# ---- ingestion ---------------------------------------------------------------------------------


def test_empty_provided_output_in_a_source_file_is_a_dropped_row_naming_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [_row("Eins.", "One.", "Uno."),
                                              _row("Zwei.", "Two.", ""),
                                              _row("Drei.", "   ", None)])
    loaded = load_sources(SourcesConfig(path=str(path), **MAPPING))
    assert loaded.table.num_rows == 3  # the sources stay; only their empty outputs are left out
    assert schema.validate(loaded.dropped, schema.DROPPED).to_pylist() == [
        {"source_id": source_id("de", "en", "Zwei."), "lang_pair": "de-en",
         "reason": "empty_system_output", "detail": f"{path}:2: b (sys_b) is empty"},
        {"source_id": source_id("de", "en", "Drei."), "lang_pair": "de-en",
         "reason": "empty_system_output", "detail": f"{path}:3: a (sys_a) is empty"},
        {"source_id": source_id("de", "en", "Drei."), "lang_pair": "de-en",
         "reason": "empty_system_output", "detail": f"{path}:3: b (sys_b) is empty"},
    ]
    # The report's count is read off the same rows.
    assert loaded.report.empty_system_outputs == 3


def test_alma_r_empty_output_is_a_dropped_row_naming_the_field(tmp_path):
    translation = {"language_pair": "de-en", "required_directions": "de-en", "de": "Hallo.",
                   "en": "Hello.", "gpt4_en": " ", "alma_en": "Hi.", "gpt4_de": "Hallo!",
                   "alma_de": "Servus."}
    path = write_jsonl(tmp_path / "alma.jsonl", [{"translation": translation}])
    loaded = load_sources(SourcesConfig(path=str(path), format="alma_r"))
    assert loaded.dropped.to_pylist() == [
        {"source_id": source_id("de", "en", "Hallo."), "lang_pair": "de-en",
         "reason": "empty_system_output",
         "detail": f"{path}:1: gpt4 (translation.gpt4_en) is empty"}]


def test_a_collapsed_duplicate_is_merged_and_counted_not_dropped(tmp_path):
    first = write_jsonl(tmp_path / "one.jsonl", [_row("Eins.", "One.", "")])
    # The repeat adds b, which the first lacked, and repeats a and the reference as they were.
    again = write_jsonl(tmp_path / "two.jsonl", [_row(" Eins. ", "One.", "Uno.")])
    loaded = load_sources([SourcesConfig(path=str(p), **MAPPING) for p in (first, again)])
    assert loaded.report.duplicates_collapsed == 1
    assert {s["system"]: s["text"] for s in loaded.table.to_pylist()[0]["systems"]} == {
        "a": "One.", "b": "Uno."}
    # The first file's empty b is filled by the repeat: a candidate after all, no drop.
    assert loaded.dropped.num_rows == 0
    assert loaded.report.empty_system_outputs == 1  # as read


def test_what_a_duplicate_has_differently_is_a_dropped_row(tmp_path):
    labels = dict(label_column="delta", label_positive="a", label_negative="b")
    path = write_jsonl(tmp_path / "s.jsonl", [
        _row("Eins.", "One.", "Uno.", delta=1.0),
        _row("Eins.", "One!", "Uno.", ref="Another reference.", delta=-1.0),
        _row("Eins.", "One.", "Uno.", delta=1.0),  # the same again: nothing lost
    ])
    loaded = load_sources(SourcesConfig(path=str(path), **MAPPING, **labels))
    assert loaded.report.duplicates_collapsed == 2
    row = loaded.table.to_pylist()[0]
    assert (row["ref"], row["human_preferred"]) == ("A reference.", "a")  # the first is kept
    sid = source_id("de", "en", "Eins.")
    assert loaded.dropped.to_pylist() == [
        {"source_id": sid, "lang_pair": "de-en", "reason": "conflicting_duplicate",
         "detail": f"{path}:2: {what} differs from {path}:1, which is kept"}
        for what in ("a output", "reference", "human label")]


# ---- every stage records through the one recorder ---------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    """Every row any `Drops` records, in order: a stage that kept its own list of drops would
    hand on rows that never pass through here."""
    calls: list[dict] = []
    add = Drops.add

    def spy(self, source_id, lang_pair, reason, detail=None):
        calls.append({"source_id": source_id, "lang_pair": lang_pair, "reason": reason,
                      "detail": detail})
        add(self, source_id, lang_pair, reason, detail)

    monkeypatch.setattr(Drops, "add", spy)
    return calls


def test_every_stage_drops_through_the_recorder_in_one_shape(tmp_path, recorded):
    first = write_jsonl(tmp_path / "one.jsonl", [_row("Eins.", "One.", ""),
                                                 _row("Zwei.", "Two.", "Second?")])
    again = write_jsonl(tmp_path / "two.jsonl", [_row("Zwei.", "Deux.", "Second?")])
    loaded = load_sources([SourcesConfig(path=str(p), **MAPPING) for p in (first, again)])
    generated = generate_candidates(loaded.table, GenerateConfig(), [_Blank()])
    scored = score_candidates(generated.table, loaded.table, ScoreConfig(), [_Length()])
    selection = select_triplets(loaded.table, generated.table, scored.table,
                                SelectConfig(rank_by="len"))
    stages = {"sources": (loaded.dropped, {"empty_system_output": 1,
                                           "conflicting_duplicate": 1}),
              "generate": (generated.dropped, {"empty_output": 2}),
              "score": (scored.dropped, {"score_not_finite": 1}),
              "select": (selection.dropped, {"single_candidate": 2, "score_missing": 1})}
    rows = []
    for name, (table, expected) in stages.items():
        assert table.schema == schema.DROPPED, name
        got = table.to_pylist()
        counted = {}
        for row in got:
            assert isinstance(row["reason"], str) and isinstance(row["detail"], str), (name, row)
            counted[row["reason"]] = counted.get(row["reason"], 0) + 1
        assert counted == expected, name
        rows += got
    assert recorded == rows  # every stage's rows, and nothing else, went through Drops.add
    # The counts each stage reports are the counts of the rows it hands on.
    assert loaded.report.empty_system_outputs == 1
    assert generated.report.empty_outputs == 2
    assert scored.report.dropped == {"score_not_finite": 1}
    assert selection.report.dropped == {"single_candidate": 2, "score_missing": 1}
    # One table of drops for a build, as the build concatenates them.
    assert pa.concat_tables(t for t, _ in stages.values()).num_rows == len(rows)
    # Ingestion's details name the file and row they came from: conflicts as the repeats
    # are merged, empty outputs once every repeat had its chance to fill them.
    assert [d.split(": ")[0] for d in loaded.dropped.column("detail").to_pylist()] == [
        f"{again}:1", f"{first}:1"]


def test_a_repeat_fills_what_the_first_occurrence_lacked(tmp_path):
    """A first occurrence without an output, reference or label takes the repeat's: nothing
    is reported as lost, and nothing the table holds is reported as dropped."""
    labels = dict(MAPPING, label_column="delta", label_positive="a", label_negative="b")
    first = write_jsonl(tmp_path / "one.jsonl", [dict(_row("Eins.", "One.", ""), ref=None)])
    again = write_jsonl(tmp_path / "two.jsonl", [dict(_row("Eins.", "One.", "Uno."),
                                                      ref="One!", delta=1.0)])
    loaded = load_sources([SourcesConfig(path=str(first), **MAPPING),
                           SourcesConfig(path=str(again), **labels)])
    row = loaded.table.to_pylist()[0]
    assert row["ref"] == "One!" and row["human_preferred"] == "a"
    assert {s["system"] for s in row["systems"]} == {"a", "b"}
    assert loaded.dropped.num_rows == 0
