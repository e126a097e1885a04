import pytest

from cpo_data import schema
from cpo_data.config import ALMA_PROMPT, SelectConfig, SourcesConfig
from cpo_data.select import render_prompt, select_by_human_label
from cpo_data.sources import load_sources
from tests.conftest import write_jsonl

CONFIG = dict(src_lang_column="src_lang", tgt_lang_column="tgt_lang", ref_column="ref",
              systems={"a": "sys_a", "b": "sys_b"}, label_column="delta",
              label_positive="a", label_negative="b")


def test_alma_prompt_is_rendered_exactly():
    assert render_prompt(ALMA_PROMPT, "de", "en", "Guten Tag.") == (
        "Translate this from German to English:\nGerman: Guten Tag.\nEnglish:")


def test_human_labels_pick_chosen_and_rejected(tmp_path, rows):
    rows.append(dict(rows[0], src="Ein vierter Satz.", sys_b=rows[0]["sys_a"], delta=1.0))
    sources = load_sources(SourcesConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)),
                                         **CONFIG)).table
    triplets, dropped = select_by_human_label(sources, SelectConfig())
    triplets = schema.validate(triplets, schema.TRIPLETS).to_pylist()
    assert [(t["chosen"], t["rejected"]) for t in triplets] == [
        (rows[0]["sys_a"], rows[0]["sys_b"]),  # delta > 0: a preferred
        (rows[1]["sys_b"], rows[1]["sys_a"]),  # delta < 0: b preferred
    ]
    assert [t["chosen_system"] for t in triplets] == ["a", "b"]
    assert all(t["selected_by"] == "human_label" for t in triplets)
    assert triplets[1]["prompt"] == (
        "Translate this from English to German:\nEnglish: Please close the window.\nGerman:")
    reasons = schema.validate(dropped, schema.DROPPED).column("reason").to_pylist()
    assert reasons == ["no_human_label", "identical_texts"]


def test_human_labels_can_be_switched_off(tmp_path, rows):
    sources = load_sources(SourcesConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)),
                                         **CONFIG)).table
    triplets, dropped = select_by_human_label(sources, SelectConfig(use_human_labels=False))
    assert triplets.num_rows == 0
    assert set(dropped.column("reason").to_pylist()) == {"no_human_label"}


@pytest.mark.parametrize("template", ["{Src} -> {Tgt}: {src}", "[{src_lang}>{tgt_lang}] {src}"])
def test_custom_templates(template):
    assert "Hallo" in render_prompt(template, "de", "en", "Hallo")
