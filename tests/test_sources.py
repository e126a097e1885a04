import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpo_data import schema
from cpo_data.config import SourcesConfig
from cpo_data.sources import SourceError, load_sources, source_id
from tests.conftest import write_jsonl

MAPPING = dict(src_lang_column="src_lang", tgt_lang_column="tgt_lang", src_column="src",
               ref_column="ref", systems={"a": "sys_a", "b": "sys_b"})
LABELLED = dict(MAPPING, label_column="delta", label_positive="a", label_negative="b")


def _config(path, **overrides):
    return SourcesConfig(path=str(path), **{**LABELLED, **overrides})


def _check_rows(loaded, rows):
    table = schema.validate(loaded.table, schema.SOURCES)
    assert table.num_rows == len(rows)
    got = table.to_pylist()
    for expected, row in zip(rows, got, strict=True):
        assert row["src"] == expected["src"]
        assert row["ref"] == expected["ref"]
        assert row["lang_pair"] == f"{expected['src_lang']}-{expected['tgt_lang']}"
        assert {s["system"]: s["text"] for s in row["systems"]} == {
            "a": expected["sys_a"], "b": expected["sys_b"]}
        assert row["source_id"] == source_id(expected["src_lang"], expected["tgt_lang"],
                                             expected["src"])
    return got


def test_jsonl_with_per_row_languages_and_labels(tmp_path, rows):
    loaded = load_sources(_config(write_jsonl(tmp_path / "s.jsonl", rows)))
    got = _check_rows(loaded, rows)
    assert (got[0]["human_preferred"], got[0]["human_dispreferred"]) == ("a", "b")
    assert (got[1]["human_preferred"], got[1]["human_dispreferred"]) == ("b", "a")
    assert got[1]["human_delta"] == -1.5
    assert got[2]["human_preferred"] is None  # delta 0: unlabelled, as in ALMA-R
    assert loaded.report.per_lang_pair == {"de-en": 2, "en-de": 1}
    assert got[0]["origin"].endswith("s.jsonl:1")


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_and_tsv(tmp_path, rows, delimiter):
    path = tmp_path / ("s.csv" if delimiter == "," else "s.tsv")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    got = _check_rows(load_sources(_config(path)), rows)
    assert got[1]["human_preferred"] == "b"  # the label was parsed from text


# JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps writes them so with
# ensure_ascii=False); str.splitlines() would break a line at each of them.
SEPARATORS = "eins\u2028zwei\u2029drei\u0085vier"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_jsonl_strings_keep_unicode_line_separators_and_rows_keep_their_numbers(
        tmp_path, rows, newline):
    rows[0]["src"] = rows[0]["ref"] = SEPARATORS
    rows[1]["sys_a"] = "Bitte\u2028das\u0085Fenster."  # inside: the ends are stripped
    path = tmp_path / "s.jsonl"
    path.write_bytes(newline.join(json.dumps(r, ensure_ascii=False) for r in rows)
                     .encode() + newline.encode())
    assert "\u2028".encode() in path.read_bytes()  # written raw, not as an escape
    got = _check_rows(load_sources(_config(path)), rows)  # the texts exactly
    assert [row["origin"].rsplit(":", 1)[1] for row in got] == ["1", "2", "3"]
    rows[2]["src_lang"] = "xx"
    path.write_bytes(newline.join(json.dumps(r, ensure_ascii=False) for r in rows)
                     .encode() + newline.encode())
    with pytest.raises(SourceError, match=r"s\.jsonl, row 3, field 'src_lang': unknown"):
        load_sources(_config(path))


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_a_csv_or_tsv_field_larger_than_csv_s_default_limit_reads(tmp_path, rows, delimiter):
    """csv refuses fields over 128 KiB unless told otherwise; a long document is no error."""
    rows[1]["src"] = " ".join(["Ein langer Satz."] * (200 * 1024 // 17))  # 200 KiB
    path = tmp_path / ("s.csv" if delimiter == "," else "s.tsv")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    got = _check_rows(load_sources(_config(path)), rows)
    assert len(got[1]["src"]) > 200 * 1000


def test_parquet(tmp_path, rows):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _check_rows(load_sources(_config(path)), rows)


def test_saved_hf_dataset_with_split(tmp_path, rows):
    import datasets

    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
    _check_rows(load_sources(_config(path, split="train")), rows)
    with pytest.raises(SourceError, match="choose a split"):
        load_sources(_config(path))


def test_languages_per_file_and_no_reference(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "Guten Morgen."}, {"text": "Danke."}])
    config = SourcesConfig(path=str(path), src_lang="DE", tgt_lang="en", src_column="text",
                           ref_column=None)
    table = load_sources(config).table
    assert table.column("lang_pair").to_pylist() == ["de-en", "de-en"]
    assert table.column("ref").to_pylist() == [None, None]


def test_duplicates_collapse_with_a_count_and_merge_systems(tmp_path, rows):
    first = write_jsonl(tmp_path / "one.jsonl", rows)
    again = dict(rows[0], sys_b="", src="  " + rows[0]["src"] + " ")  # same source, padded
    second = write_jsonl(tmp_path / "two.jsonl", [again, dict(rows[0], sys_a="other")])
    loaded = load_sources([_config(first), _config(second, label_column=None)])
    assert loaded.table.num_rows == 3
    assert loaded.report.rows_read == 5
    assert loaded.report.duplicates_collapsed == 2
    assert loaded.report.empty_system_outputs == 1
    # The merge is counted, not dropped; the repeat's empty b is the first's b, so only the
    # other a is left out.
    assert loaded.dropped.column("reason").to_pylist() == ["conflicting_duplicate"]
    row = loaded.table.to_pylist()[0]
    assert row["duplicates"] == 3
    assert {s["system"]: s["text"] for s in row["systems"]}["a"] == rows[0]["sys_a"]


def test_source_id_is_stable_and_direction_aware():
    assert source_id("de", "en", "Hallo") == source_id("DE", "en", "Hallo")
    assert source_id("de", "en", "Hallo") != source_id("de", "fr", "Hallo")
    assert len(source_id("de", "en", "Hallo")) == 20


# ---- ALMA-R layout ------------------------------------------------------------------------------


def _alma_row(de, en, required="", delta=0.0):
    t = {"de": de, "en": en, "gpt4_de": de + " (gpt4)", "alma_de": de + " (alma)",
         "gpt4_en": en + " (gpt4)", "alma_en": en + " (alma)", "language_pair": "de-en",
         "required_directions": required, "Delta": delta}
    for i, system in enumerate(("ref", "gpt4", "alma")):
        for lang in ("de", "en"):
            t[f"{system}_{lang}_kiwi"] = 0.80 + i / 100
            t[f"{system}_{lang}_xcomet"] = 0.90 + i / 100
            t[f"{system}_{lang}_kiwi_xcomet"] = 0.85 + i / 100
    return {"translation": t}


ALMA_ROWS = [
    _alma_row("Das Haus ist alt.", "The house is old."),
    _alma_row("Wir essen heute Fisch.", "We are eating fish today.", "en-de", delta=1.0),
    _alma_row("Sie liest ein Buch.", "She is reading a book.", "en-de", delta=-2.0),
]


def _check_alma(loaded):
    table = loaded.table.to_pylist()
    # Row 1 gives both directions, rows 2 and 3 only en-de.
    assert [r["lang_pair"] for r in table] == ["de-en", "en-de", "en-de", "en-de"]
    assert table[0]["src"] == "Das Haus ist alt." and table[0]["ref"] == "The house is old."
    assert {s["system"] for s in table[0]["systems"]} == {"gpt4", "alma"}
    assert table[1]["src"] == "The house is old." and table[1]["ref"] == "Das Haus ist alt."
    assert (table[2]["human_preferred"], table[2]["human_dispreferred"]) == ("gpt4", "alma")
    assert (table[3]["human_preferred"], table[3]["human_dispreferred"]) == ("alma", "gpt4")
    scores = schema.validate(loaded.scores, schema.SCORES).to_pylist()
    # 4 directions x 3 texts (ref, gpt4, alma) x 3 scorers
    assert len(scores) == 36
    gpt4 = [s for s in scores if s["source_id"] == table[2]["source_id"]
            and s["text"] == "Wir essen heute Fisch. (gpt4)"]
    assert {s["scorer"]: s["score"] for s in gpt4} == pytest.approx(
        {"kiwi": 0.81, "xcomet": 0.91, "kiwi_xcomet": 0.86})


def test_alma_r_layout_from_parquet(tmp_path):
    path = tmp_path / "de-en.parquet"
    pq.write_table(pa.Table.from_pylist(ALMA_ROWS), path)
    _check_alma(load_sources(SourcesConfig(path=str(path), format="alma_r")))


def test_alma_r_layout_from_saved_hf_dataset_and_direction_filter(tmp_path):
    import datasets

    path = tmp_path / "alma"
    datasets.Dataset.from_list(ALMA_ROWS).save_to_disk(str(path))
    _check_alma(load_sources(SourcesConfig(path=str(path), format="alma_r")))
    only = load_sources(SourcesConfig(path=str(path), format="alma_r", directions=("de-en",)))
    assert only.table.column("lang_pair").to_pylist() == ["de-en"]


def test_alma_r_row_without_translation_struct(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"de": "x", "en": "y"}])
    with pytest.raises(SourceError, match=r"a\.jsonl, row 1, field 'translation'"):
        load_sources(SourcesConfig(path=str(path), format="alma_r"))


# ---- bad input ----------------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_row(tmp_path, rows):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"s\.jsonl, row 2: malformed JSON") as info:
        load_sources(_config(path))
    assert (info.value.file, info.value.row) == (str(path), 2)


def test_file_that_is_not_utf8_names_the_row(tmp_path, rows):
    path = tmp_path / "s.jsonl"
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(data.replace("schließen", "schlie\udcdfen").encode("utf-8", "surrogateescape"))
    with pytest.raises(SourceError, match=r"s\.jsonl, row 2: not UTF-8"):
        load_sources(_config(path))


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"src": ""}, "src", "empty text"),
        ({"src": "   "}, "src", "empty text"),
        ({"src": None}, "src", r"missing \(null\)"),
        ({"src_lang": "xx"}, "src_lang", "unknown language code 'xx'"),
        ({"tgt_lang": "de"}, "tgt_lang", "source and target language are both 'de'"),
        ({"delta": "lots"}, "delta", "expected a number"),
        ({"sys_a": ""}, "delta", "labelled, but system 'a' has no output"),
    ],
)
def test_bad_field_names_file_row_and_field(tmp_path, rows, change, field, message):
    rows[1] = {**rows[1], **change}
    if change.get("tgt_lang") == "de":
        rows[1]["src_lang"] = "de"
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(SourceError, match=rf"s\.jsonl, row 2, field '{field}': {message}"):
        load_sources(_config(path))


def test_missing_source_key_in_one_row(tmp_path, rows):
    del rows[2]["src"]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(SourceError, match=r"row 3, field 'src': column not found"):
        load_sources(_config(path))


def test_mapped_column_not_there(tmp_path, rows):
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(SourceError, match=r"row 1, field 'gpt4_out': column not found"):
        load_sources(_config(path, systems={"a": "sys_a", "b": "sys_b", "g": "gpt4_out"}))
    with pytest.raises(SourceError, match=r"row 1, field 'reference': column not found; set"):
        load_sources(_config(path, ref_column="reference"))


def test_parquet_with_wrong_types(tmp_path, rows):
    path = tmp_path / "s.parquet"
    typed = [dict(r, src=i * 1000) for i, r in enumerate(rows, start=1)]
    pq.write_table(pa.Table.from_pylist(typed), path)
    expected = r"s\.parquet, row 1, field 'src': expected text, got int"
    with pytest.raises(SourceError, match=expected):
        load_sources(_config(path))


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("src_lang,tgt_lang,src,ref\nde,en,Hallo,Hello\nde,en,Tschüss\n")
    with pytest.raises(SourceError, match=r"s\.csv, row 2: has 3 fields, the header has 4"):
        load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                   tgt_lang_column="tgt_lang"))


@pytest.fixture
def small_csv_field_limit(monkeypatch):
    """The module's field limit at 1000 characters, so a runaway field reaches it in a small
    file; csv's process-wide limit is put back after."""
    from cpo_data import source_formats

    before = csv.field_size_limit()
    monkeypatch.setattr(source_formats, "FIELD_SIZE_LIMIT", 1000)
    yield
    csv.field_size_limit(before)


HEADER = "src_lang,tgt_lang,src,ref\n"
GOOD = "de,en,Hallo,Hello\n"


@pytest.mark.parametrize(("text", "error"), [
    # A quote opens the third field of data row 2 and never closes: without strict parsing the
    # rest of the file would become that field.
    (HEADER + GOOD + 'de,en,"Guten Tag,Good day\n' + GOOD * 3, "unexpected end of data"),
    # Text after a quoted field's closing quote.
    (HEADER + GOOD + 'de,en,"Guten" Tag,Good day\n' + GOOD * 3, "',' expected after '\"'"),
])
def test_unreadable_csv_names_file_row_and_lines(tmp_path, text, error):
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(SourceError) as info:
        load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                   tgt_lang_column="tgt_lang"))
    assert (info.value.file, info.value.row) == (str(path), 2)
    assert str(info.value).startswith(f"{path}, row 2: unreadable CSV: {error} (this row "
                                      "starts on line 3, the reader stopped on line ")


def test_a_stray_quote_that_runs_past_the_field_limit_names_file_and_row(
        tmp_path, small_csv_field_limit):
    path = tmp_path / "s.csv"
    path.write_text(HEADER + GOOD + GOOD + 'de,en,"Guten Tag,Good day\n' + GOOD * 100)
    with pytest.raises(SourceError, match=r"s\.csv, row 3: unreadable CSV: field larger than "
                       r"field limit \(1000\) \(this row starts on line 4, the reader stopped "
                       r"on line \d+\)"):
        load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                   tgt_lang_column="tgt_lang"))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load_sources(_config(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.xml"
    odd.write_text("<x/>")
    with pytest.raises(SourceError, match=r"data\.xml, field 'format': cannot tell"):
        load_sources(_config(odd))
