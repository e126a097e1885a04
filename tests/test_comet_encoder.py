"""COMET's encoder repo is fetched (config and tokenizer only) before COMET loads."""

from __future__ import annotations

import pytest
import yaml

from cpo_data.backends import comet_score
from cpo_data.score import ScoreError


def _checkpoint(tmp_path, encoder: str):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.ckpt").write_bytes(b"\0")
    (tmp_path / "hparams.yaml").write_text(yaml.safe_dump({"pretrained_model": encoder}))
    return tmp_path / "checkpoints" / "model.ckpt"


def test_the_encoder_repo_is_fetched_without_its_weights(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kwargs: calls.append((repo, kwargs)))
    comet_score.fetch_encoder(_checkpoint(tmp_path, "facebook/xlm-roberta-xxl"))
    ((repo, kwargs),) = calls
    assert repo == "facebook/xlm-roberta-xxl" and kwargs["local_files_only"] is False
    patterns = kwargs["allow_patterns"]
    assert "sentencepiece.bpe.model" in patterns and "*.json" in patterns
    assert not any(p.endswith((".bin", ".safetensors")) or p == "*" for p in patterns)


def test_offline_a_missing_encoder_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ScoreError, match=r"rebuilds its encoder from facebook/xlm-roberta-xxl, "
                                         r"which is not in the Hugging Face cache"):
        comet_score.fetch_encoder(_checkpoint(tmp_path, "facebook/xlm-roberta-xxl"))


def test_a_local_encoder_folder_needs_nothing(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub"))
    (tmp_path / "enc").mkdir()
    comet_score.fetch_encoder(_checkpoint(tmp_path, str(tmp_path / "enc")))


@pytest.mark.slow  # several seconds: COMET's import and a tiny checkpoint
def test_a_scorer_fetches_its_encoder_before_comet_loads(tmp_path, monkeypatch):
    import comet

    from cpo_data.backends.comet_score import load_scorer
    from cpo_data.config import ScorerConfig
    from cpo_data.testing import build_tiny_comet

    order = []
    monkeypatch.setattr(comet_score, "fetch_encoder", lambda checkpoint: order.append("fetch"))
    real_load = comet.load_from_checkpoint
    monkeypatch.setattr(comet, "load_from_checkpoint",
                        lambda *a, **k: order.append("load") or real_load(*a, **k))
    comet_score._load.cache_clear()
    load_scorer(ScorerConfig(name="k", model=str(build_tiny_comet(tmp_path / "kiwi"))))
    assert order == ["fetch", "load"]
