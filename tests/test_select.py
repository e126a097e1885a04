import pyarrow as pa
import pytest

from cpo_data import schema
from cpo_data.config import ALMA_PROMPT, SelectConfig, SourcesConfig
from cpo_data.select import render_prompt, select_triplets, system_counts
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
    selection = select_triplets(sources, None, None, SelectConfig())
    triplets, dropped = selection.triplets, selection.dropped
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
    selection = select_triplets(sources, None, None, SelectConfig(use_human_labels=False))
    triplets, dropped = selection.triplets, selection.dropped
    assert triplets.num_rows == 0
    assert set(dropped.column("reason").to_pylist()) == {"no_human_label"}


@pytest.mark.parametrize("template", ["{Src} -> {Tgt}: {src}", "[{src_lang}>{tgt_lang}] {src}"])
def test_custom_templates(template):
    assert "Hallo" in render_prompt(template, "de", "en", "Hallo")


# ---- score-based selection on hand-made tables ---------------------------------------------


def _tables(spec):
    """sources, candidates and scores for {src: [(text, systems, {scorer: score}), ...]}.

    Sources are de-en; a source's provided outputs are its candidates' first systems."""
    sources, candidates, scores = [], [], []
    for n, (src, cands) in enumerate(spec.items()):
        sid = f"s{n}"
        sources.append({"source_id": sid, "lang_pair": "de-en", "src_lang": "de",
                        "tgt_lang": "en", "src": src, "ref": None,
                        "systems": [{"system": c[1][0], "text": c[0]} for c in cands],
                        "human_preferred": None, "human_dispreferred": None,
                        "human_delta": None, "duplicates": 1, "origin": f"t:{n}"})
        for text, systems, values in cands:
            candidates.append({"source_id": sid, "text": text, "systems": systems,
                               "generator": None, "decoding": None})
            scores += [{"source_id": sid, "text": text, "scorer": k, "score": v,
                        "error_spans": None} for k, v in values.items()]
    return (pa.Table.from_pylist(sources, schema=schema.SOURCES),
            pa.Table.from_pylist(candidates, schema=schema.CANDIDATES),
            pa.Table.from_pylist(scores, schema=schema.SCORES))


def _select(spec, rank_by="q", labels=None, **options):
    """Selection on hand-made tables; scorer agreement is off unless a test turns it on, since
    most tables here carry a second score only to show it does not rank."""
    options.setdefault("agreement", False)
    sources, candidates, scores = _tables(spec)
    if labels:
        rows = sources.to_pylist()
        for row, (good, bad) in zip(rows, labels, strict=False):
            row["human_preferred"], row["human_dispreferred"] = good, bad
        sources = pa.Table.from_pylist(rows, schema=schema.SOURCES)
    return select_triplets(sources, candidates, scores, SelectConfig(rank_by=rank_by, **options))


def _pairs(selection):
    return [(t["chosen"], t["rejected"]) for t in selection.triplets.to_pylist()]


def _drops(selection):
    return selection.dropped.column("reason").to_pylist()


def test_best_against_worst_leaves_the_middle_out():
    selection = _select({"Satz.": [("ref text", ["ref"], {"q": 0.5, "k": 1.0}),
                                   ("gpt4 text", ["gpt4"], {"q": 0.9, "k": 2.0}),
                                   ("alma text", ["alma"], {"q": 0.1, "k": 3.0})]})
    (triplet,) = selection.triplets.to_pylist()
    assert (triplet["chosen"], triplet["rejected"]) == ("gpt4 text", "alma text")
    assert (triplet["chosen_system"], triplet["rejected_system"]) == ("gpt4", "alma")
    assert triplet["chosen_score"] == 0.9 and triplet["rejected_score"] == 0.1
    assert triplet["margin"] == pytest.approx(0.8)
    assert triplet["chosen_scores"] == [{"scorer": "k", "score": 2.0, "error_spans": None},
                                        {"scorer": "q", "score": 0.9, "error_spans": None}]
    assert triplet["selected_by"] == "score"
    assert triplet["prompt"] == render_prompt(ALMA_PROMPT, "de", "en", "Satz.")
    assert selection.dropped.num_rows == 0
    # The other score ranks differently: alma best, ref worst.
    assert _pairs(_select({"Satz.": [("ref text", ["ref"], {"k": 1.0}),
                                     ("gpt4 text", ["gpt4"], {"k": 2.0}),
                                     ("alma text", ["alma"], {"k": 3.0})]}, rank_by="k")) == [
        ("alma text", "ref text")]


def test_ties_go_to_the_earliest_candidate_and_full_ties_are_dropped():
    spec = {"x": [("r", ["ref"], {"q": 0.9}), ("g", ["gpt4"], {"q": 0.9}),
                  ("a", ["alma"], {"q": 0.2}), ("b", ["other"], {"q": 0.2})]}
    assert _pairs(_select(spec)) == [("r", "a")]  # ref before gpt4, alma before other
    spec["x"].reverse()
    assert _pairs(_select(spec)) == [("g", "b")]  # the table order decides, nothing else
    all_tied = _select({"x": [("r", ["ref"], {"q": 0.5}), ("g", ["gpt4"], {"q": 0.5})]})
    assert _pairs(all_tied) == [] and _drops(all_tied) == ["tied_scores"]


def test_min_margin_drops_close_calls():
    spec = {"close": [("a", ["a"], {"q": 0.50}), ("b", ["b"], {"q": 0.45})],
            "far": [("c", ["a"], {"q": 0.9}), ("d", ["b"], {"q": 0.2})]}
    assert len(_pairs(_select(spec))) == 2
    selection = _select(spec, min_margin=0.1)
    assert _pairs(selection) == [("c", "d")]
    assert _drops(selection) == ["within_noise"]
    assert "0.05 < 0.1" in selection.dropped.column("detail")[0].as_py()
    # A margin equal to the minimum is kept (0.75 - 0.25 is exact in binary).
    exact = {"x": [("a", ["a"], {"q": 0.75}), ("b", ["b"], {"q": 0.25})]}
    assert _pairs(_select(exact, min_margin=0.5)) == [("a", "b")]
    assert _drops(_select(exact, min_margin=0.5000001)) == ["within_noise"]


def test_reference_rules():
    spec = {"x": [("r", ["ref"], {"q": 0.9}), ("g", ["gpt4"], {"q": 0.5}),
                  ("a", ["alma"], {"q": 0.1})]}
    assert _pairs(_select(spec)) == [("r", "a")]
    assert _pairs(_select(spec, reference_may_be_chosen=False)) == [("g", "a")]
    low_ref = {"x": [("r", ["ref"], {"q": 0.0}), ("g", ["gpt4"], {"q": 0.5}),
                     ("a", ["alma"], {"q": 0.1})]}
    assert _pairs(_select(low_ref)) == [("g", "r")]
    assert _pairs(_select(low_ref, reference_may_be_rejected=False)) == [("g", "a")]
    only_ref_left = _select({"x": [("r", ["ref"], {"q": 0.0}), ("g", ["gpt4"], {"q": 0.5})]},
                            reference_may_be_rejected=False)
    assert _drops(only_ref_left) == ["single_candidate"]
    # A text the reference shares with a system counts as the reference.
    shared = {"x": [("r", ["ref", "gpt4"], {"q": 0.9}), ("a", ["alma"], {"q": 0.1}),
                    ("b", ["other"], {"q": 0.3})]}
    (triplet,) = _select(shared, reference_may_be_chosen=False).triplets.to_pylist()
    assert (triplet["chosen"], triplet["chosen_system"]) == ("b", "other")
    # The reference's own system name comes from the generate config.
    renamed = select_triplets(*_tables(spec), SelectConfig(
        reference_may_be_chosen=False, rank_by="q", reference_name="gpt4"))
    assert _pairs(renamed) == [("r", "a")]


def test_several_pairs_per_source_pair_the_best_with_each_worse():
    spec = {"x": [("a", ["a"], {"q": 0.9}), ("b", ["b"], {"q": 0.6}), ("c", ["c"], {"q": 0.1}),
                  ("d", ["d"], {"q": 0.3}), ("e", ["e"], {"q": 0.9})]}
    each = dict(pairs="best_vs_each")
    assert _pairs(_select(spec, **each)) == [("a", "c"), ("a", "d"), ("a", "b")]
    assert _pairs(_select(spec, **each, pairs_per_source=2)) == [("a", "c"), ("a", "d")]
    # e ties with the best and is never a rejected side.
    assert _pairs(_select(spec, **each, pairs_per_source=10)) == [("a", "c"), ("a", "d"),
                                                                  ("a", "b")]
    margin = _select(spec, **each, min_margin=0.5)
    assert _pairs(margin) == [("a", "c"), ("a", "d")] and _drops(margin) == ["within_noise"]
    assert margin.dropped.column("detail")[0].as_py().startswith("1 pair, the widest a vs b")
    ids = margin.triplets.column("id").to_pylist()
    assert len(set(ids)) == 2


def test_excluded_systems_are_not_paired():
    spec = {"x": [("a", ["a"], {"q": 0.9}), ("b", ["b"], {"q": 0.5}),
                  ("c", ["c", "a"], {"q": 0.1})]}
    assert _pairs(_select(spec, exclude_systems=("a",))) == [("b", "c")]
    (triplet,) = _select(spec, exclude_systems=("a",)).triplets.to_pylist()
    assert triplet["rejected_system"] == "c"  # the excluded name is not credited
    selection = _select(spec, exclude_systems=("a", "c"))
    assert _drops(selection) == ["single_candidate"]


def test_every_drop_reason_on_hand_made_tables():
    spec = {"one": [("a", ["a"], {"q": 0.5})],
            "merged": [("same", ["a", "b"], {"q": 0.5})],
            "unscored": [("a", ["a"], {}), ("b", ["b"], {"q": 0.4}), ("c", ["c"], {"q": 0.3})],
            "nothing": [("a", ["a"], {})]}
    sources, candidates, scores = _tables(spec)
    extra = schema.validate(sources.slice(0, 1), schema.SOURCES).to_pylist()[0]
    extra.update(source_id="lost", src="keine Kandidaten")  # no candidate at all
    sources = pa.concat_tables([sources, pa.Table.from_pylist([extra], schema=schema.SOURCES)])
    selection = select_triplets(sources, candidates, scores, SelectConfig(rank_by="q"))
    assert _pairs(selection) == [("b", "c")]
    by_source = dict(zip(selection.dropped.column("source_id").to_pylist(), _drops(selection),
                         strict=False))
    assert _drops(selection) == ["single_candidate", "identical_texts", "score_missing",
                                 "score_missing", "no_candidate", "no_candidate"]
    assert by_source["s0"] == "single_candidate" and by_source["s1"] == "identical_texts"
    assert selection.report.dropped == {"single_candidate": 1, "identical_texts": 1,
                                        "score_missing": 2, "no_candidate": 2}
    assert selection.report.sources == 5 and selection.report.triplets == 1


def test_human_labels_override_scores_and_agreement_is_counted():
    spec = {"x": [("a text", ["a"], {"q": 0.9}), ("b text", ["b"], {"q": 0.1})],
            "y": [("a2", ["a"], {"q": 0.2}), ("b2", ["b"], {"q": 0.8})],
            "z": [("a3", ["a"], {"q": 0.3}), ("b3", ["b"], {"q": 0.7})]}
    labels = [("b", "a"), ("b", "a")]  # x: humans disagree with q; y: agree; z unlabelled
    selection = _select(spec, labels=labels)
    assert _pairs(selection) == [("b text", "a text"), ("b2", "a2"), ("b3", "a3")]
    methods = selection.triplets.column("selected_by").to_pylist()
    assert methods == ["human_label", "human_label", "score"]
    first = selection.triplets.to_pylist()[0]
    assert first["chosen_score"] == 0.1 and first["margin"] == pytest.approx(-0.8)
    agreement = selection.report.agreement
    assert (agreement.labelled, agreement.compared, agreement.agree) == (2, 2, 1)
    scored_only = _select(spec, labels=labels, use_human_labels=False)
    assert _pairs(scored_only) == [("a text", "b text"), ("b2", "a2"), ("b3", "a3")]
    assert scored_only.report.agreement.agree == 1  # still measured


def test_system_counts_credit_every_system_of_a_shared_text():
    spec = {"x": [("r", ["ref", "gpt4"], {"q": 0.9}), ("a", ["alma"], {"q": 0.1})],
            "y": [("r2", ["ref"], {"q": 0.1}), ("a2", ["alma"], {"q": 0.8})]}
    selection = _select(spec)
    assert selection.triplets.column("chosen_system").to_pylist() == ["ref+gpt4", "alma"]
    assert system_counts(selection.report) == [
        {"system": "alma", "chosen": 1, "rejected": 1},
        {"system": "gpt4", "chosen": 1, "rejected": 0},
        {"system": "ref", "chosen": 1, "rejected": 1}]
