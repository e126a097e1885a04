"""Backend identities from configs and files, without loading: hub ids pinned to commits."""

from __future__ import annotations

import pytest

from cpo_data.config import GeneratorConfig, ScorerConfig
from cpo_data.errors import UserError
from cpo_data.fingerprint import generator_weights, scorer_weights


def fake_hub_repo(cache, repo: str, commit: str, *files: str) -> None:
    """A repo in the Hugging Face cache layout: refs/main naming a snapshot with `files`."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for name in files:
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_ids_are_known_by_the_commit_their_files_come_from(hub_cache):
    fake_hub_repo(hub_cache, "org/base", "c0ffee", "config.json")
    fake_hub_repo(hub_cache, "org/lora", "beef01", "adapter_config.json")  # peft: no config
    fake_hub_repo(hub_cache, "Unbabel/kiwi", "abc123", "hparams.yaml",
                  "checkpoints/model.ckpt")  # COMET: no config.json either
    generator = GeneratorConfig(name="g", model="org/base", adapter="org/lora")
    assert generator_weights(generator) == "hub:org/base@c0ffee+hub:org/lora@beef01"
    assert scorer_weights(ScorerConfig(name="k", model="Unbabel/kiwi")) == \
        "hub:Unbabel/kiwi@abc123"


def test_a_repo_out_of_reach_falls_back_to_its_revision_name(hub_cache):
    # HF_HUB_OFFLINE (tests) and nothing cached: the model could not load either.
    assert scorer_weights(ScorerConfig(name="k", model="Unbabel/elsewhere")) == \
        "hub:Unbabel/elsewhere@main"


def test_a_missing_local_model_or_checkpoint_is_named():
    with pytest.raises(UserError, match=r"folder ./nowhere/model does not exist"):
        generator_weights(GeneratorConfig(name="g", model="./nowhere/model"))
    with pytest.raises(UserError, match=r"kiwi\.ckpt: a COMET checkpoint sits in"):
        scorer_weights(ScorerConfig(name="k", model="/data/kiwi.ckpt"))


def test_the_dtype_key_needs_no_gpu_in_this_process():
    """A flow host without GPUs builds the keys of shards that GPU workers run."""
    import torch

    from cpo_data.identity import resolved_dtype

    assert resolved_dtype("bfloat16", "cuda") == str(torch.bfloat16)
    assert resolved_dtype("auto", "cpu") == str(torch.float32)
    if not torch.cuda.is_available():
        assert resolved_dtype("auto", "cuda:1") == "auto@cuda:1"


def test_an_unreachable_hub_is_not_taken_for_a_missing_file(hub_cache):
    """Offline and uncached, `config.json` is unknown, not absent: guessing "no config" would
    key a Marian model as a causal one."""
    from cpo_data.fingerprint import HubUnreachable
    from cpo_data.identity import model_json

    with pytest.raises(HubUnreachable, match=r"cannot read config.json of 'Helsinki-NLP/x'"):
        model_json("Helsinki-NLP/x", None, "config.json")
    fake_hub_repo(hub_cache, "org/base", "c0ffee", "config.json")
    assert model_json("org/base", None, "config.json") == {}
