import logging
import math
import random

import pyarrow as pa
import pytest
import torch

from cpo_data import schema
from cpo_data.backends.comet_score import CometScorer, load_scorer
from cpo_data.config import EnsembleConfig, ScoreConfig, ScorerConfig
from cpo_data.score import ScoreError, ScoreItem, ScoreResult, score_candidates, wide
from cpo_data.sources import source_id
from cpo_data.testing import build_tiny_comet

SOURCES = ["Der Zug fährt um acht Uhr ab.", "Es regnet.", "Danke!",
           "Bitte schließen Sie das Fenster, bevor Sie das Haus verlassen, sonst wird es kalt."]
OUTPUTS = ["The train leaves at eight.", "It rains heavily today, really.", "Thanks!",
           "Please close the window.", "Close window."]
ITEMS = [ScoreItem(s, m) for s in SOURCES for m in OUTPUTS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("comet")
    return {kind: str(build_tiny_comet(root / kind, kind)) for kind in ("kiwi", "xcomet")}


# Where a test checks that our scoring path computes what COMET's `predict()` computes, with
# other batches (other padding, so other reduction orders in the kernels), both run in float64:
# a score is a few thousand roundings deep in these tiny encoders, each within float64's
# 1.1e-16, so n * u bounds the difference near 1e-12 on any CPU; a different input, weight or
# pooling moves a score by far more than 1e-6. At float32 the same comparison is made with the
# same shapes on both sides (one item per batch), where the kernels are the same: bit for bit.
EXACT = 1e-12


def _predict(checkpoint, items, batch_size=4, dtype=torch.float64):
    import comet

    model = comet.load_from_checkpoint(checkpoint, local_files_only=True).to(dtype)
    return model.predict([{"src": i.src, "mt": i.mt} for i in items], batch_size=batch_size,
                         gpus=0, progress_bar=False)


def assert_same_spans(ours, theirs):
    """The same error spans; confidences (probabilities) equal within float64 rounding."""
    assert len(ours) == len(theirs)
    for mine, their in zip(ours, theirs, strict=True):
        assert [{**span, "confidence": None} for span in mine] == \
            [{**span, "confidence": None} for span in their]
        assert [span["confidence"] for span in mine] == pytest.approx(
            [span["confidence"] for span in their], abs=EXACT)


def _scorer(checkpoint, name="k", dtype="float64", **settings):
    return load_scorer(ScorerConfig(name=name, model=checkpoint, dtype=dtype, **settings))


def _tables(pairs, refs=None):
    """sources and candidates tables for [(src, [mt, ...]), ...]."""
    sources, candidates = [], []
    for n, (src, mts) in enumerate(pairs):
        sid = source_id("de", "en", src)
        sources.append({"source_id": sid, "lang_pair": "de-en", "src_lang": "de",
                        "tgt_lang": "en", "src": src, "ref": (refs or {}).get(src),
                        "systems": [], "human_preferred": None, "human_dispreferred": None,
                        "human_delta": None, "duplicates": 1, "origin": f"t:{n}"})
        candidates += [{"source_id": sid, "text": mt, "systems": [f"s{k}"], "generator": None,
                        "decoding": None} for k, mt in enumerate(mts)]
    return (pa.Table.from_pylist(candidates, schema=schema.CANDIDATES),
            pa.Table.from_pylist(sources, schema=schema.SOURCES))


# ---- COMET equals COMET ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kiwi", "xcomet"])
@pytest.mark.parametrize(("budget", "seed"), [(64, 0), (300, 1), (100000, 2)])
def test_scores_equal_comet_predict_in_any_order_and_batch_size(checkpoints, kind, budget, seed):
    items = ITEMS[:]
    random.Random(seed).shuffle(items)
    ours = _scorer(checkpoints[kind], kind, token_budget=budget).score(items)
    theirs = _predict(checkpoints[kind], items, batch_size=3 + seed)
    assert [r.score for r in ours] == pytest.approx(theirs.scores, abs=EXACT)
    assert len({round(r.score, 4) for r in ours}) > 5  # the scores really differ by item
    if kind == "xcomet":
        assert_same_spans([r.error_spans for r in ours], theirs["metadata"]["error_spans"])
    else:
        assert all(r.error_spans is None for r in ours)


@pytest.mark.parametrize("kind", ["kiwi", "xcomet"])
def test_float32_scores_are_comet_predict_s_bit_for_bit(checkpoints, kind):
    """The default dtype: same shapes (one item per batch) give COMET's own float32 numbers."""
    ours = _scorer(checkpoints[kind], kind, dtype="float32", max_batch_size=1).score(ITEMS)
    theirs = _predict(checkpoints[kind], ITEMS, batch_size=1, dtype=torch.float32)
    assert [r.score for r in ours] == theirs.scores
    if kind == "xcomet":
        assert [r.error_spans for r in ours] == theirs["metadata"]["error_spans"]


def test_checkpoint_survives_save_and_load(checkpoints, tmp_path):
    import comet

    model = comet.load_from_checkpoint(checkpoints["kiwi"], local_files_only=True)
    saved = torch.load(checkpoints["kiwi"], weights_only=False)
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    assert missing == [] and unexpected == []  # strict=False loading restored every weight
    before = _predict(checkpoints["kiwi"], ITEMS).scores
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    torch.save({**saved, "state_dict": model.state_dict()}, copy / "checkpoints" / "model.ckpt")
    hparams = checkpoints["kiwi"].replace("checkpoints/model.ckpt", "hparams.yaml")
    (copy / "hparams.yaml").write_text(open(hparams).read())
    after = _predict(str(copy / "checkpoints" / "model.ckpt"), ITEMS).scores
    assert after == before


def test_a_model_folder_and_its_checkpoint_file_load_the_same(checkpoints):
    folder = checkpoints["kiwi"].replace("/checkpoints/model.ckpt", "")
    by_folder = load_scorer(ScorerConfig(name="k", model=folder))
    by_file = load_scorer(ScorerConfig(name="k", model=checkpoints["kiwi"]))
    assert by_folder.identity == by_file.identity
    assert by_folder.model is by_file.model  # loaded once per process


def test_out_of_memory_halves_the_batch_with_the_same_scores(checkpoints, monkeypatch):
    scorer = CometScorer(ScorerConfig(name="k", model=checkpoints["kiwi"], dtype="float64"))
    expected = [r.score for r in scorer.score(ITEMS)]
    real = scorer._score_batch

    def small_gpu(items):
        if len(items) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(items)

    monkeypatch.setattr(scorer, "_score_batch", small_gpu)
    assert [r.score for r in scorer.score(ITEMS)] == pytest.approx(expected, abs=EXACT)
    assert scorer.oom_splits > 0


def test_token_memo_gives_the_tensors_comet_builds(checkpoints):
    """Each distinct string is tokenized once per score() call; the encoder must still get the
    ids, padding and mask its own prepare_sample makes, truncated segments included."""
    from cpo_data.backends import comet_score

    encoder = load_scorer(ScorerConfig(name="k", model=checkpoints["kiwi"])).model.encoder
    texts = [SOURCES[0], OUTPUTS[1], SOURCES[0], " ".join(SOURCES * 20), "", OUTPUTS[1]]
    theirs = encoder.prepare_sample(texts)  # no memo active: COMET's own code
    with comet_score._active_memo() as memo:
        ours = encoder.prepare_sample(texts)
        assert len(memo) == 4  # repeats were looked up, not tokenized again
        longest = max(len(memo[t]) for t in texts[:2])
        assert encoder.prepare_sample(texts[:2])["input_ids"].shape == (2, longest)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert theirs["input_ids"].shape[1] == encoder.max_positions - 2


def test_long_segments_are_counted_as_truncated(checkpoints, caplog):
    scorer = _scorer(checkpoints["kiwi"])
    long = ScoreItem(" ".join(SOURCES * 20), "The train leaves.")
    with caplog.at_level(logging.WARNING):
        results = scorer.score([long, ITEMS[0]])
    assert scorer.last_truncated == 1 and "exceed the encoder's 128 tokens" in caplog.text
    assert results[0].score == pytest.approx(_predict(checkpoints["kiwi"], [long]).scores[0],
                                             abs=EXACT)


# ---- the scoring stage ---------------------------------------------------------------------------


def test_second_scoring_of_the_same_pool_never_touches_the_model(checkpoints, tmp_path):
    candidates, sources = _tables([(s, OUTPUTS) for s in SOURCES])
    config = ScoreConfig(cache_dir=str(tmp_path / "cache"))
    scorer = load_scorer(ScorerConfig(name="kiwi", model=checkpoints["kiwi"]))
    first = score_candidates(candidates, sources, config, [scorer])
    batches = scorer.batches
    second = score_candidates(candidates, sources, config, [scorer])
    assert scorer.batches == batches
    assert second.report.scored == {"kiwi": 0}
    assert second.report.from_cache == {"kiwi": len(ITEMS)}
    assert second.table.equals(first.table)


def test_duplicate_pairs_are_scored_once_and_joined_back(checkpoints):
    src = SOURCES[0]
    candidates, sources = _tables([(src, OUTPUTS)])
    twice = pa.concat_tables([candidates, candidates])  # e.g. two builds' candidates together
    scorer = _scorer(checkpoints["kiwi"], "kiwi")
    result = score_candidates(twice, sources, ScoreConfig(), [scorer])
    assert result.report.rows == {"kiwi": 10} and result.report.distinct == {"kiwi": 5}
    rows = result.table.to_pylist()
    assert len(rows) == 10 and rows[:5] == rows[5:]
    expected = _predict(checkpoints["kiwi"], [ScoreItem(src, m) for m in OUTPUTS]).scores
    assert [r["score"] for r in rows[:5]] == pytest.approx(expected, abs=EXACT)


def test_xcomet_error_spans_reach_the_scores_table(checkpoints):
    candidates, sources = _tables([(SOURCES[0], OUTPUTS[:2])])
    scorer = load_scorer(ScorerConfig(name="xcomet", model=checkpoints["xcomet"]))
    table = schema.validate(score_candidates(candidates, sources, ScoreConfig(),
                                             [scorer]).table, schema.SCORES)
    spans = table.column("error_spans").to_pylist()
    assert all(isinstance(s, list) for s in spans) and spans[0]
    assert set(spans[0][0]) == {"text", "start", "end", "severity", "confidence"}


class Fixed:
    """A scorer with hand-made numbers: {mt: score}."""

    def __init__(self, name, numbers, higher_is_better=True, needs_reference=False):
        self.name, self.numbers = name, numbers
        self.identity = {"fixed": name, "numbers": sorted(numbers.items())}
        self.higher_is_better, self.needs_reference = higher_is_better, needs_reference
        self.calls = 0
        self.last_truncated = 0

    def score(self, items):
        self.calls += 1
        return [ScoreResult(self.numbers[i.mt]) for i in items]


def test_ensembles_on_hand_made_numbers():
    candidates, sources = _tables([("Quelle.", ["a", "b"])], refs={"Quelle.": "r"})
    kiwi, xcomet = Fixed("kiwi", {"a": 0.8, "b": 0.6}), Fixed("xcomet", {"a": 0.9, "b": 0.4})
    ter = Fixed("ter", {"a": 30.0, "b": 70.0}, higher_is_better=False, needs_reference=True)
    chrf = Fixed("chrf", {"a": 50.0, "b": 40.0}, needs_reference=True)
    declared = (ScorerConfig("kiwi", model="k"), ScorerConfig("xcomet", model="x"),
                ScorerConfig("ter", kind="ter"), ScorerConfig("chrf", kind="chrf"))
    config = ScoreConfig(scorers=declared, ensembles=(
        EnsembleConfig("kiwi_xcomet", ("kiwi", "xcomet")),
        EnsembleConfig("weighted", ("kiwi", "xcomet"), weights=(1.0, 3.0)),
        EnsembleConfig("chrf_ter", ("chrf", "ter")),
    ))
    table = wide(score_candidates(candidates, sources, config, [kiwi, xcomet, ter, chrf]).table)
    got = {row["text"]: row for row in table.to_pylist()}
    assert got["a"]["kiwi_xcomet"] == pytest.approx(0.85)
    assert got["b"]["kiwi_xcomet"] == pytest.approx(0.5)
    assert got["a"]["weighted"] == pytest.approx((0.8 + 3 * 0.9) / 4)
    assert got["a"]["chrf_ter"] == pytest.approx((50 - 30) / 2)  # TER enters negated
    assert got["b"]["chrf_ter"] == pytest.approx((40 - 70) / 2)
    assert got["a"]["kiwi"] == 0.8 and got["a"]["ter"] == 30.0  # members keep their own column


def test_sacrebleu_scorers_equal_sacrebleu():
    import sacrebleu

    mt, ref = "The train leaves at eight o'clock.", "The train departs at eight o'clock."
    expected = {
        "chrf": sacrebleu.sentence_chrf(mt, [ref]).score,
        "chrf++": sacrebleu.sentence_chrf(mt, [ref], word_order=2).score,
        "bleu": sacrebleu.sentence_bleu(mt, [ref]).score,
        "ter": sacrebleu.sentence_ter(mt, [ref]).score,
    }
    for kind, value in expected.items():
        scorer = load_scorer(ScorerConfig(name=kind, kind=kind))
        assert scorer.score([ScoreItem("Quelle", mt, ref)])[0].score == pytest.approx(value)
    assert not load_scorer(ScorerConfig(name="t", kind="ter")).higher_is_better


# ---- bad input ----------------------------------------------------------------------------------


def test_truncation_counts_only_what_was_scored_now(tmp_path):
    candidates, sources = _tables([("Quelle.", ["a", "b"])])
    scorer = Fixed("kiwi", {"a": 0.5, "b": 0.4})
    scorer.last_truncated = 1  # as a COMET scorer reports after cutting one segment
    config = ScoreConfig(cache_dir=str(tmp_path))
    assert score_candidates(candidates, sources, config, [scorer]).report.truncated == {"kiwi": 1}
    # Served from the cache: nothing was cut in this run, whatever the scorer last reported.
    assert score_candidates(candidates, sources, config, [scorer]).report.truncated == {"kiwi": 0}


def test_empty_mt_is_dropped_not_scored():
    candidates, sources = _tables([("Quelle.", ["a", "   "])])
    scorer = Fixed("kiwi", {"a": 0.5})
    result = score_candidates(candidates, sources, ScoreConfig(), [scorer])
    assert result.table.column("text").to_pylist() == ["a"]
    assert result.dropped.column("reason").to_pylist() == ["empty_mt"]


def test_nan_and_infinite_scores_are_dropped_also_from_the_cache(tmp_path):
    candidates, sources = _tables([("Quelle.", ["a", "b", "c"])])
    scorer = Fixed("kiwi", {"a": 0.5, "b": math.nan, "c": math.inf})
    config = ScoreConfig(cache_dir=str(tmp_path))
    for _ in range(2):
        result = score_candidates(candidates, sources, config, [scorer])
        assert result.table.column("text").to_pylist() == ["a"]
        assert result.dropped.column("reason").to_pylist() == ["score_not_finite"] * 2
    assert scorer.calls == 1


def test_reference_based_scorer_without_references():
    candidates, sources = _tables([("Eins.", ["a"]), ("Zwei.", ["b"])])
    chrf = load_scorer(ScorerConfig(name="chrf", kind="chrf"))
    with pytest.raises(ScoreError, match="'chrf' needs references, and no source has one"):
        score_candidates(candidates, sources, ScoreConfig(), [chrf])
    candidates, sources = _tables([("Eins.", ["a"]), ("Zwei.", ["b"])], refs={"Eins.": "a"})
    result = score_candidates(candidates, sources, ScoreConfig(), [chrf])
    assert result.table.num_rows == 1
    assert result.dropped.column("reason").to_pylist() == ["missing_reference"]


def test_missing_checkpoint_and_offline_hub_id():
    with pytest.raises(ScoreError, match="COMET checkpoint './nope/model.ckpt' does not exist"):
        load_scorer(ScorerConfig(name="k", model="./nope/model.ckpt"))
    with pytest.raises(ScoreError, match="may be offline"):
        load_scorer(ScorerConfig(name="k", model="Unbabel/wmt22-cometkiwi-da"))


def test_gated_model_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(**kwargs):
        raise GatedRepoError("403 gated", response=None)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ScoreError, match="accept its licence.*HF_TOKEN"):
        load_scorer(ScorerConfig(name="k", model="Unbabel/wmt23-cometkiwi-da-xxl"))


def test_shards_sharing_a_cache_read_each_segment_once(tmp_path, monkeypatch):
    """One cache object per folder and process: the segments earlier shards wrote are not
    read again by every later shard (which grew with the square of the shard count)."""
    from cpo_data import cache

    reads = []
    read_table = cache.pq.read_table
    monkeypatch.setattr(cache.pq, "read_table",
                        lambda *a, **k: reads.append(1) or read_table(*a, **k))
    scorer = Fixed("kiwi", {f"t{i}": i / 10 for i in range(5)})
    config = ScoreConfig(cache_dir=str(tmp_path))
    for shard in range(5):  # each shard scores one new text, and writes one segment
        candidates, sources = _tables([(f"Quelle {shard}.", [f"t{shard}"])])
        assert score_candidates(candidates, sources, config, [scorer]).report.scored == {
            "kiwi": 1}
    assert len(list((tmp_path).glob("score-*/seg-*.parquet"))) == 5
    assert reads == []  # this process wrote every segment and so never reads one
    # Another process (a fresh object here) reads each segment once, on its first look.
    fresh = cache.ContentCache(str(tmp_path), "score", scorer.identity)
    assert len(fresh) == 5 and len(reads) == 5
    fresh.get_many(["x"])
    assert len(reads) == 5
