"""A test set scored with the COMET model that selected the data is warned about, once."""

from __future__ import annotations

import logging

import pytest

from cpo_data import store
from cpo_data.config import ScorerConfig
from cpo_data.fingerprint import scorer_weights
from cpo_data.testing import build_tiny_comet, sample_triplets
from training.config import EvalConfig, SourcesConfig, TrainConfig
from training.run import load_dataset, selection_metric_warning

pytestmark = pytest.mark.slow  # ~9 s: three tiny COMET checkpoints built and fingerprinted


def _manifest(selector: ScorerConfig) -> dict:
    """A manifest's provenance as a build with a chrF scorer and `selector` leaves it."""
    return {"provenance": {
        "config": {"score": {"scorers": [{"name": "chrf", "kind": "chrf", "model": None},
                                         {"name": selector.name, "kind": "comet",
                                          "model": selector.model}]}},
        "scorers": [scorer_weights(selector)]}}


def _train(tmp_path, comet: ScorerConfig | None, dataset: str = "d") -> TrainConfig:
    test_set = SourcesConfig(path=str(tmp_path / "t.jsonl"), src_lang="de", tgt_lang="en")
    return TrainConfig(model="m", dataset=dataset, eval=EvalConfig(test_set=test_set,
                                                                    comet=comet))


def test_the_selecting_model_is_named_even_when_copied_elsewhere(tmp_path):
    kiwi = str(build_tiny_comet(tmp_path / "kiwi"))
    selector = ScorerConfig(name="kiwi", model=kiwi)
    manifest = _manifest(selector)
    warning = selection_metric_warning(_train(tmp_path, ScorerConfig(name="k", model=kiwi)),
                                       manifest)
    assert warning.startswith(f"train.eval.comet (k: {kiwi}) is the COMET model that selected "
                              "this version's pairs (score.scorers kiwi)")
    # The same weights in another folder: known by their fingerprint, not by the path.
    import shutil

    shutil.copytree(tmp_path / "kiwi", tmp_path / "copied")
    copied = ScorerConfig(name="k", model=str(tmp_path / "copied" / "checkpoints" / "model.ckpt"))
    assert selection_metric_warning(_train(tmp_path, copied), manifest) is not None
    other = str(build_tiny_comet(tmp_path / "other", seed=1))
    assert selection_metric_warning(_train(tmp_path, ScorerConfig(name="k", model=other)),
                                    manifest) is None
    assert selection_metric_warning(_train(tmp_path, None), manifest) is None


def test_reading_the_version_warns_once(tmp_path, caplog):
    kiwi = str(build_tiny_comet(tmp_path / "kiwi"))
    selector = ScorerConfig(name="kiwi", model=kiwi)
    store.publish_triplets(sample_triplets(2), str(tmp_path / "store"), "mt",
                           _manifest(selector)["provenance"])
    config = _train(tmp_path, ScorerConfig(name="k", model=kiwi),
                    store.dataset_uri(str(tmp_path / "store"), "mt"))
    with caplog.at_level(logging.WARNING, logger="cpo_data.training"):
        load_dataset(config)
    (record,) = caplog.records
    assert f"train.eval.comet (k: {kiwi}) is the COMET model" in record.getMessage()
