"""Selection that knows metric noise: margins, scorer agreement and the pair modes, on
hand-worked pools (every expected pair below is worked out by hand from the scores)."""

from __future__ import annotations

import pytest

from cpo_data import noise
from cpo_data.config import (
    BuildConfig,
    ConfigError,
    EnsembleConfig,
    PublishConfig,
    ScoreConfig,
    ScorerConfig,
    SelectConfig,
    SourcesConfig,
)
from cpo_data.select import select_triplets
from tests.test_select import _drops, _pairs, _select, _tables

# Scores are multiples of 1/8, so every margin below is exact in binary and the order of
# equal margins is decided by the tie rule, not by rounding.
POOL = {"x": [("a", ["a"], {"q": 0.875}), ("b", ["b"], {"q": 0.625}),
              ("c", ["c"], {"q": 0.125}), ("d", ["d"], {"q": 0.375}),
              ("e", ["e"], {"q": 0.875})]}


def test_best_vs_worst_is_alma_r_one_pair():
    assert _pairs(_select(POOL)) == [("a", "c")]  # a before e: the table order breaks the tie


def test_best_vs_each_pairs_the_best_with_every_worse_candidate_worst_first():
    assert _pairs(_select(POOL, pairs="best_vs_each")) == [("a", "c"), ("a", "d"), ("a", "b")]
    # e ties with the best: no pair, and no drop (a tie is not noise).
    assert _drops(_select(POOL, pairs="best_vs_each")) == []


def test_all_above_margin_pairs_every_two_apart_widest_first():
    # Every ordered pair with a lower rejected score; margins .75, .5 and .25; equal margins
    # in table order of the chosen, then the rejected side.
    everything = [("a", "c"), ("e", "c"),                          # 0.75
                  ("a", "d"), ("b", "c"), ("e", "d"),              # 0.5
                  ("a", "b"), ("b", "d"), ("d", "c"), ("e", "b")]  # 0.25
    assert _pairs(_select(POOL, pairs="all_above_margin")) == everything
    above = _select(POOL, pairs="all_above_margin", min_margin=0.3)
    assert _pairs(above) == everything[:5]
    (detail,) = above.dropped.column("detail").to_pylist()
    assert _drops(above) == ["within_noise"] and detail.startswith("4 pairs, the widest a vs b")
    assert _pairs(_select(POOL, pairs="all_above_margin", pairs_per_source=3)) == everything[:3]
    ids = _select(POOL, pairs="all_above_margin").triplets.column("id").to_pylist()
    assert len(set(ids)) == len(everything)


def test_the_noise_threshold_is_the_default_margin_and_the_unit_of_confidence():
    pool = {"close": [("a", ["a"], {"kiwi": 0.80}), ("b", ["b"], {"kiwi": 0.79})],
            "clear": [("c", ["a"], {"kiwi": 0.80}), ("d", ["b"], {"kiwi": 0.75})]}
    noisy = dict(rank_by="kiwi", noise_thresholds={"kiwi": 0.0124})
    selection = _select(pool, **noisy)
    assert _pairs(selection) == [("c", "d")]
    assert _drops(selection) == ["within_noise"]
    assert "margin 0.01 < 0.0124" in selection.dropped.column("detail")[0].as_py()
    (triplet,) = selection.triplets.to_pylist()
    assert triplet["confidence"] == pytest.approx(0.05 / 0.0124, rel=1e-12)
    # An explicit min_margin replaces the threshold as the floor, not as the unit.
    both = _select(pool, min_margin=0.0, **noisy).triplets.to_pylist()
    assert [t["confidence"] for t in both] == pytest.approx([0.01 / 0.0124, 0.05 / 0.0124])
    # A score without a threshold: no floor beyond a strict order, and no confidence.
    plain = _select(pool, rank_by="kiwi").triplets.to_pylist()
    assert len(plain) == 2 and {t["confidence"] for t in plain} == {None}


def test_agreement_keeps_a_pair_only_where_every_score_orders_it_the_same_way():
    pool = {"agree": [("a", ["a"], {"q": 0.9, "k": 0.7}), ("b", ["b"], {"q": 0.1, "k": 0.2})],
            "split": [("c", ["a"], {"q": 0.9, "k": 0.2}), ("d", ["b"], {"q": 0.1, "k": 0.7})],
            "tie": [("e", ["a"], {"q": 0.9, "k": 0.5}), ("f", ["b"], {"q": 0.1, "k": 0.5})]}
    selection = _select(pool, agreement=True)
    assert _pairs(selection) == [("a", "b")]
    assert _drops(selection) == ["scorers_disagree", "scorers_disagree"]  # a tie is no order
    assert "k says 0.2 vs 0.7" in selection.dropped.column("detail")[0].as_py()
    assert len(_pairs(_select(pool, agreement=False))) == 3
    assert len(_pairs(_select(pool, agreement=True, agreement_scores=("q",)))) == 3
    # Lower-is-better scores (TER) agree when the chosen side's is lower.
    assert _pairs(_select(pool, agreement=True, lower_is_better=("k",))) == [("c", "d")]
    # A named score one side lacks cannot agree.
    missing = _select({"x": [("a", ["a"], {"q": 0.9, "k": 0.7}), ("b", ["b"], {"q": 0.1})]},
                      agreement=True, agreement_scores=("q", "k"))
    assert _drops(missing) == ["scorers_disagree"]
    # With best_vs_each, each pair is judged on its own.
    each = {"x": [("a", ["a"], {"q": 0.9, "k": 0.5}), ("b", ["b"], {"q": 0.5, "k": 0.9}),
                  ("c", ["c"], {"q": 0.1, "k": 0.1})]}
    selected = _select(each, agreement=True, pairs="best_vs_each")
    assert _pairs(selected) == [("a", "c")] and _drops(selected) == ["scorers_disagree"]


def test_a_lower_is_better_rank_chooses_the_lowest_with_a_positive_margin():
    pool = {"x": [("a", ["a"], {"ter": 20.0}), ("b", ["b"], {"ter": 60.0}),
                  ("c", ["c"], {"ter": 40.0})]}
    (triplet,) = _select(pool, rank_by="ter", lower_is_better=("ter",)).triplets.to_pylist()
    assert (triplet["chosen"], triplet["rejected"], triplet["margin"]) == ("a", "b", 40.0)


def test_a_chosen_only_veto_leaves_the_candidate_rejectable():
    pool = {"x": [("a", ["a"], {"q": 0.1}), ("b", ["b"], {"q": 0.9}), ("c", ["c"], {"q": 0.5})]}
    sources, candidates, scores = _tables(pool)

    def pairs(guard):
        return _pairs(select_triplets(sources, candidates, scores,
                                      SelectConfig(rank_by="q", agreement=False),
                                      {("s0", "a"): guard, ("s0", "b"): guard}))

    assert pairs("critical_error") == [("c", "a")]  # neither a nor b chosen, a still rejected
    assert pairs("off_target") == []  # only c is left, alone


def _build(score: ScoreConfig, sources_format: str = "jsonl", **select) -> BuildConfig:
    source = SourcesConfig(path="x.jsonl", format=sources_format, src_lang="de", tgt_lang="en")
    return BuildConfig(sources=(source,), publish=PublishConfig(uri="s", name="d"), score=score,
                       select=SelectConfig(**select))


KIWI_XXL = ScorerConfig("kiwi", model="Unbabel/wmt23-cometkiwi-da-xxl")
COMET_22 = ScorerConfig("comet22", model="Unbabel/wmt22-comet-da", use_reference=True)
CHRF = ScorerConfig("chrf", kind="chrf")


def test_a_build_fills_in_the_published_thresholds_an_ensemble_takes_the_largest():
    config = _build(ScoreConfig(scorers=(KIWI_XXL, COMET_22, CHRF), ensembles=(
        EnsembleConfig("both", ("kiwi", "comet22")), EnsembleConfig("with_chrf",
                                                                    ("comet22", "chrf")))),
        rank_by="both")
    selection = config.selection
    assert selection.noise_thresholds == {"kiwi": 0.0124, "comet22": 0.0056, "both": 0.0124,
                                          "with_chrf": 0.0056}
    assert selection.margin_floor == 0.0124
    # A threshold in the config wins over the published one; chrF gets one only from there.
    given = _build(ScoreConfig(scorers=(KIWI_XXL, CHRF)), rank_by="chrf",
                   noise_thresholds={"chrf": 2.0, "kiwi": 0.02}).selection
    assert given.noise_thresholds == {"kiwi": 0.02, "chrf": 2.0} and given.margin_floor == 2.0
    assert _build(ScoreConfig(scorers=(CHRF,))).selection.margin_floor == 0.0
    assert _build(ScoreConfig(scorers=(KIWI_XXL,)), min_margin=0.0).selection.margin_floor == 0
    # The ALMA-R layout's carried scores are KIWI-XXL, XCOMET-XXL and their mean.
    carried = _build(ScoreConfig(), "alma_r", rank_by="kiwi_xcomet").selection
    assert carried.noise_thresholds == noise.CARRIED and carried.margin_floor == 0.0124


def test_selection_settings_that_cannot_work_are_refused_with_their_key():
    with pytest.raises(ConfigError, match="pairs_per_source: .*best_vs_each"):
        SelectConfig(pairs_per_source=3)
    with pytest.raises(ConfigError, match="pairs: "):
        SelectConfig(pairs="best_vs_all")
    with pytest.raises(ConfigError, match="noise_thresholds.kiwi"):
        SelectConfig(noise_thresholds={"kiwi": -1.0})
    with pytest.raises(ConfigError, match=r"select.agreement_scores: \['xcomet'\]"):
        _build(ScoreConfig(scorers=(KIWI_XXL,)), agreement_scores=("xcomet",))


def test_the_noise_settings_read_from_yaml(tmp_path):
    from cpo_data.config import load_config

    (tmp_path / "b.yaml").write_text(
        "sources: [{path: s.jsonl, src_lang: de, tgt_lang: en}]\n"
        "publish: {uri: store, name: d}\n"
        "score: {scorers: [{name: chrf, kind: chrf}, {name: ter, kind: ter}]}\n"
        "select: {rank_by: chrf, pairs: all_above_margin, pairs_per_source: 4,\n"
        "         noise_thresholds: {chrf: 1.5}, agreement_scores: [chrf, ter]}\n")
    config = load_config(tmp_path / "b.yaml")
    selection = config.selection
    assert (selection.pairs, selection.pairs_per_source) == ("all_above_margin", 4)
    assert selection.agreement_scores == ("chrf", "ter") and selection.margin_floor == 1.5
    assert selection.lower_is_better == ("ter",)  # TER scorers, filled in by the build


def test_label_agreement_reads_a_lower_is_better_rank_the_right_way_round():
    pool = {"x": [("a", ["a"], {"ter": 20.0}), ("b", ["b"], {"ter": 60.0})],
            "y": [("c", ["a"], {"ter": 70.0}), ("d", ["b"], {"ter": 30.0})]}
    # Humans prefer a in x (lower TER: agrees) and c in y (higher TER: disagrees).
    selection = _select(pool, rank_by="ter", lower_is_better=("ter",),
                        labels=[("a", "b"), ("a", "b")])
    agreement = selection.report.agreement
    assert (agreement.compared, agreement.agree, agreement.ties) == (2, 1, 0)
    # Preferring the lower TER in both, they agree twice (read as higher-is-better: never).
    both = _select(pool, rank_by="ter", lower_is_better=("ter",),
                   labels=[("a", "b"), ("b", "a")]).report.agreement
    assert (both.compared, both.agree) == (2, 2)
