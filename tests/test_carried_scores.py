"""Sources that carry their own scores (the ALMA-R layout) rank candidates with no scorer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sacrebleu
import yaml

from cpo_data import build, store
from cpo_data.config import ConfigError, load_config
from tests.test_build import no_model_loads  # noqa: F401  (a fixture)

# Three rows, one direction each; in rows 1 and 2 `kiwi` alone would reject another system
# than `kiwi_xcomet` does, so the test can tell which score ranked.
CARRIED = {  # system -> (kiwi, xcomet, kiwi_xcomet) per row
    0: {"ref": (0.70, 0.80, 0.75), "gpt4": (0.90, 0.70, 0.80), "alma": (0.60, 0.70, 0.65)},
    1: {"ref": (0.60, 0.60, 0.60), "gpt4": (0.50, 0.90, 0.70), "alma": (0.95, 0.75, 0.85)},
    2: {"ref": (0.99, 0.71, 0.85), "gpt4": (0.70, 0.80, 0.75), "alma": (0.80, 0.50, 0.65)},
}
TEXTS = [("Das Haus ist alt.", "The house is old."),
         ("Wir essen heute Fisch.", "We are eating fish today."),
         ("Sie liest ein Buch.", "She is reading a book.")]
DELTA = 1.0  # row 2 is labelled: gpt4 preferred


def _row(number: int) -> dict:
    de, en = TEXTS[number]
    t = {"de": de, "en": en, "gpt4_en": f"{en} (gpt4)", "alma_en": f"{en} (alma)",
         "language_pair": "de-en", "required_directions": "de-en",
         "Delta": DELTA if number == 2 else 0.0}
    for system, values in CARRIED[number].items():
        for scorer, value in zip(("kiwi", "xcomet", "kiwi_xcomet"), values, strict=True):
            t[f"{system}_en_{scorer}"] = value
    return {"translation": t}


def _text(number: int, system: str) -> str:
    en = TEXTS[number][1]
    return en if system == "ref" else f"{en} ({system})"


def _config(tmp_path, **sections):
    pq.write_table(pa.Table.from_pylist([_row(n) for n in range(3)]), tmp_path / "de-en.parquet")
    data = {"sources": [{"path": "de-en.parquet", "format": "alma_r"}],
            "generate": {"include_reference": True},
            "publish": {"uri": "store", "name": "alma-r"}, "work_dir": "work"}
    data.update(sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _triplets(config) -> list[dict]:
    build.run_build(config)
    frame = store.read_triplets(store.dataset_uri(config.publish.uri, config.publish.name))
    return frame.sort_values("src").to_dict("records")


@pytest.mark.usefixtures("no_model_loads")
def test_an_alma_r_file_reselects_by_its_own_kiwi_xcomet(tmp_path):
    # Agreement off: these rows are made so that kiwi and xcomet disagree, to tell them apart.
    config = _config(tmp_path, select={"rank_by": "kiwi_xcomet", "use_human_labels": False,
                                       "agreement": False})
    assert config.score.scorers == () and config.generate.models == ()
    got = {t["src"]: t for t in _triplets(config)}
    assert len(got) == 3
    for number, systems in CARRIED.items():
        ranked = sorted(systems, key=lambda s: systems[s][2])
        triplet = got[TEXTS[number][0]]
        assert (triplet["chosen"], triplet["rejected"]) == (_text(number, ranked[-1]),
                                                            _text(number, ranked[0]))
        assert triplet["chosen_score"] == pytest.approx(systems[ranked[-1]][2])
        assert triplet["margin"] == pytest.approx(systems[ranked[-1]][2] - systems[ranked[0]][2])
        # Every carried score travels with its side.
        assert {s["scorer"]: s["score"] for s in triplet["chosen_scores"]} == pytest.approx(
            dict(zip(("kiwi", "xcomet", "kiwi_xcomet"), systems[ranked[-1]], strict=True)))


@pytest.mark.usefixtures("no_model_loads")
def test_a_labelled_pair_carries_both_sides_scores(tmp_path):
    config = _config(tmp_path, select={"rank_by": "kiwi_xcomet"})
    labelled, = (t for t in _triplets(config) if t["selected_by"] == "human_label")
    assert (labelled["chosen"], labelled["rejected"]) == (_text(2, "gpt4"), _text(2, "alma"))
    assert (labelled["chosen_score"], labelled["rejected_score"]) == pytest.approx(
        (CARRIED[2]["gpt4"][2], CARRIED[2]["alma"][2]))


def test_a_scorer_of_the_same_name_replaces_the_carried_score(tmp_path):
    config = _config(tmp_path, score={"scorers": [{"name": "kiwi", "kind": "chrf"}]},
                     select={"rank_by": "kiwi", "use_human_labels": False,
                             "agreement": False})
    for triplet in _triplets(config):
        ref = next(en for de, en in TEXTS if de == triplet["src"])
        chrf = sacrebleu.sentence_chrf(triplet["chosen"], [ref]).score
        assert triplet["chosen_score"] == pytest.approx(chrf)


def test_ranking_by_a_carried_score_needs_a_source_that_carries_it(tmp_path):
    with pytest.raises(ConfigError, match=r"select\.rank_by: 'kiwi_xcomet' is not a scorer or "
                       r"ensemble, nor a score the sources carry"):
        load_config(_write_jsonl_config(tmp_path))


def _write_jsonl_config(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"src": "x", "ref": "y"}\n')
    path = tmp_path / "jsonl.yaml"
    path.write_text(yaml.safe_dump({
        "sources": [{"path": "s.jsonl", "src_lang": "de", "tgt_lang": "en"}],
        "publish": {"uri": "store", "name": "x"}, "select": {"rank_by": "kiwi_xcomet"}}))
    return path


def test_a_labelled_pair_is_scored_on_both_sides_when_one_system_is_not_provided(tmp_path):
    """The recipe's case: only GPT-4 is a provided candidate, the label compares it with ALMA."""
    config = _config(tmp_path, generate={"include_reference": True, "provided_systems": ["gpt4"]},
                     score={"scorers": [{"name": "chrf", "kind": "chrf"}]})
    labelled, = (t for t in _triplets(config) if t["selected_by"] == "human_label")
    ref = TEXTS[2][1]
    assert (labelled["chosen_score"], labelled["rejected_score"]) == pytest.approx(
        (sacrebleu.sentence_chrf(_text(2, "gpt4"), [ref]).score,
         sacrebleu.sentence_chrf(_text(2, "alma"), [ref]).score))


@pytest.mark.usefixtures("no_model_loads")
def test_by_default_carried_scores_must_agree_and_clear_their_noise(tmp_path):
    config = _config(tmp_path, select={"rank_by": "kiwi_xcomet", "use_human_labels": False})
    got = {t["src"]: t for t in _triplets(config)}
    # Row 0's best and worst tie on xcomet (0.70 each): no order, so no pair.
    assert set(got) == {TEXTS[1][0], TEXTS[2][0]}
    manifest = store.read_manifest(store.dataset_uri(config.publish.uri, config.publish.name))
    assert manifest["dropped_per_reason"] == {"scorers_disagree": 1}
    assert manifest["provenance"]["min_margin"] == 0.0124  # KIWI-XXL's and XCOMET's noise
    for triplet in got.values():
        assert triplet["confidence"] == pytest.approx(triplet["margin"] / 0.0124, rel=1e-12)
