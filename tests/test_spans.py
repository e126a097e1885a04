"""XCOMET's error spans reach the published triplets, next to the score that found them.

A build on tiny local XCOMET checkpoints (score stage, selection, publishing) is read back and
each side's spans are compared with what COMET's own `predict()` finds in that text.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
import torch

from cpo_data import build, schema, store
from cpo_data.config import SelectConfig, load_config
from cpo_data.select import select_triplets
from cpo_data.testing import build_tiny_comet
from tests.test_build_flow import DEMO_ROWS, write_config

# Sources 0-2 keep their human label (the labelled path), 3-5 are ranked by score.
ROWS = [dict(r, delta=r["delta"] if i < 3 else 0) for i, r in enumerate(DEMO_ROWS[:6])]
XCOMETS = ("xcomet", "xcomet_b")  # two XCOMET models: their spans must not mix


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("xcomet")
    return {name: str(build_tiny_comet(root / name, "xcomet", seed=seed))
            for seed, name in enumerate(XCOMETS)}


@pytest.fixture(scope="module")
def published(tmp_path_factory, checkpoints):
    """The store folder and the triplets of one build with two XCOMET scorers and chrF."""
    folder = tmp_path_factory.mktemp("build")
    # One item per batch, as `predict(batch_size=1)` below: same shapes, same float32 numbers.
    scorers = [{"name": name, "model": checkpoints[name], "max_batch_size": 1}
               for name in XCOMETS] + [{"name": "chrf", "kind": "chrf"}]
    unused = {"causal": None, "kiwi": None}  # write_config's defaults, all overridden here
    path = write_config(folder, unused, ROWS, generate={"include_reference": True},
                        score={"scorers": scorers},
                        select={"rank_by": "xcomet", "use_human_labels": True})
    summary = build.run_build(load_config(path))
    dataset = store.dataset_uri(str(folder / "store"), "flowtest")
    triplets = store.read_triplets_table(dataset, summary.version, verify=True).to_pylist()
    return dataset, summary.version, triplets


def _predict_spans(checkpoint: str, pairs: list[tuple[str, str]]) -> list[list[dict]]:
    import comet

    model = comet.load_from_checkpoint(checkpoint, local_files_only=True).to(torch.float32)
    prediction = model.predict([{"src": src, "mt": mt} for src, mt in pairs], batch_size=1,
                               gpus=0, progress_bar=False)
    return prediction["metadata"]["error_spans"]


def _entries(triplet: dict, side: str) -> dict[str, dict]:
    return {e["scorer"]: e for e in triplet[f"{side}_scores"]}


def test_published_spans_are_comet_predict_s_for_each_side_and_scorer(published, checkpoints):
    _, _, triplets = published
    assert {t["selected_by"] for t in triplets} == {"human_label", "score"}
    sides = [(t, side) for t in triplets for side in ("chosen", "rejected")]
    pairs = [(t["src"], t[side]) for t, side in sides]
    got = {name: [_entries(t, side)[name]["error_spans"] for t, side in sides]
           for name in XCOMETS}
    for name in XCOMETS:
        assert got[name] == _predict_spans(checkpoints[name], pairs), name
        assert any(got[name])  # the tiny model does find spans
    assert got["xcomet"] != got["xcomet_b"]  # so a scorer given the other's spans would be seen
    for t, side in sides:
        entries = _entries(t, side)
        assert set(entries) == {"xcomet", "xcomet_b", "chrf"}
        assert entries["chrf"]["error_spans"] is None  # no spans: null, not an empty list


def _python(value):
    """pandas gives nested lists as numpy arrays; compare them as plain lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    return value


def test_a_version_with_spans_opens_in_pandas_and_datasets(published):
    import datasets

    dataset, version, triplets = published
    folder = store.version_path(dataset, version)
    by_id = {t["id"]: t for t in triplets}
    columns = ("chosen_scores", "rejected_scores")

    frame = pd.read_parquet(folder)
    assert len(frame) == len(triplets)
    for row in frame.to_dict("records"):
        assert {c: _python(row[c]) for c in columns} == {c: by_id[row["id"]][c] for c in columns}

    train = datasets.load_dataset("parquet", data_files=f"{folder}/*/*.parquet")["train"]
    assert train.num_rows == len(triplets)
    for row in train:
        assert {c: row[c] for c in columns} == {c: by_id[row["id"]][c] for c in columns}


def test_selection_keeps_an_empty_span_list_apart_from_none():
    """XCOMET finding no error ([]) is not the same as a scorer without spans (null)."""
    src = "Satz."
    sid = "s1"
    sources = pa.Table.from_pylist([{
        "source_id": sid, "lang_pair": "de-en", "src_lang": "de", "tgt_lang": "en", "src": src,
        "ref": None, "systems": [{"system": "a", "text": "good"}, {"system": "b", "text": "bad"}],
        "human_preferred": None, "human_dispreferred": None, "human_delta": None,
        "duplicates": 1, "origin": "t:0"}], schema=schema.SOURCES)
    candidates = pa.Table.from_pylist(
        [{"source_id": sid, "text": t, "systems": [s], "generator": None, "decoding": None}
         for s, t in (("a", "good"), ("b", "bad"))], schema=schema.CANDIDATES)
    span = {"text": "bad", "start": 0, "end": 3, "severity": "major", "confidence": 0.75}
    scores = pa.Table.from_pylist([
        {"source_id": sid, "text": "good", "scorer": "xcomet", "score": 0.9, "error_spans": []},
        {"source_id": sid, "text": "bad", "scorer": "xcomet", "score": 0.2,
         "error_spans": [span]},
        {"source_id": sid, "text": "good", "scorer": "kiwi", "score": 0.8, "error_spans": None},
        {"source_id": sid, "text": "bad", "scorer": "kiwi", "score": 0.1, "error_spans": None},
    ], schema=schema.SCORES)
    (triplet,) = select_triplets(sources, candidates, scores,
                                 SelectConfig(rank_by="xcomet")).triplets.to_pylist()
    assert triplet["chosen_scores"] == [{"scorer": "kiwi", "score": 0.8, "error_spans": None},
                                        {"scorer": "xcomet", "score": 0.9, "error_spans": []}]
    assert triplet["rejected_scores"] == [
        {"scorer": "kiwi", "score": 0.1, "error_spans": None},
        {"scorer": "xcomet", "score": 0.2, "error_spans": [span]}]
