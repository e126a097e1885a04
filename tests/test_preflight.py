"""Preflight: every problem of a run named at once, in seconds, before any work starts."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import yaml

from cpo_data import preflight
from cpo_data.preflight import Need, check
from cpo_data.testing import build_tiny_causal_lm
from pipelines import cli
from tests.test_identity import fake_hub_repo, hub_cache  # noqa: F401  (a fixture)

MISSING_SOURCES = [f"data/{pair}.parquet" for pair in ("cs-en", "de-en", "is-en", "ru-en",
                                                        "zh-en")]


def _comet_folder(folder, encoder: str):
    """A COMET model folder as COMET saves it, whose encoder is a hub repo."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "model.ckpt").write_bytes(b"\0")
    (folder / "hparams.yaml").write_text(yaml.safe_dump({"pretrained_model": encoder}))
    return folder


def _sharded(folder):
    """A Llama-style sharded checkpoint of which one shard never arrived."""
    build_tiny_causal_lm(folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _project(tmp_path, hub_cache):  # noqa: F811
    # A cached repo whose weights' download broke: the snapshot links to a missing blob.
    fake_hub_repo(hub_cache, "org/broken", "c0ffee", "config.json", "tokenizer.json")
    snapshot = hub_cache / "models--org--broken" / "snapshots" / "c0ffee"
    (snapshot / "model.safetensors").symlink_to(snapshot / "../../blobs/absent")
    project = {
        "sources": [{"path": p, "format": "alma_r"} for p in MISSING_SOURCES],
        "generate": {"models": [
            {"name": "alma", "model": str(_sharded(tmp_path / "alma")),
             "adapter": "./adapters/alma-lroa"},  # a typo
            {"name": "other", "model": "org/broken"}]},
        "score": {"scorers": [
            {"name": "kiwi", "model": "Unbabel/wmt23-cometkiwi-da-xxl"},  # not downloaded
            {"name": "local", "model": str(_comet_folder(tmp_path / "kiwi",
                                                         "facebook/xlm-roberta-xxl")
                                           / "checkpoints" / "model.ckpt")}]},
        "select": {"rank_by": "kiwi"},
        "publish": {"uri": "store", "name": "alma-r"},
        "train": {"model": "org/never-downloaded"},
    }
    path = tmp_path / "alma-r.yaml"
    path.write_text(yaml.safe_dump(project))
    return path


def test_every_problem_is_named_in_one_run_in_seconds_before_prefect(tmp_path, hub_cache,  # noqa: F811
                                                                     capsys, monkeypatch):
    from pipelines import build as build_flow

    path = _project(tmp_path, hub_cache)
    started = time.perf_counter()
    assert cli.main(["check", str(path)]) == 2
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    expected = [
        *(rf"sources\[{i}\]\.path: .*{p} does not exist" for i, p in enumerate(MISSING_SOURCES)),
        r"generate\.models\[0\]\.model: model\.safetensors\.index\.json lists 2 shards, 1 "
        r"missing \(model-00002-of-00002\.safetensors\)",
        r"generate\.models\[0\]\.adapter: .*adapters/alma-lroa does not exist",
        r"generate\.models\[1\]\.model: missing model\.safetensors or .* in the cached snapshot "
        r"c0ffee",
        r"score\.scorers\[0\]\.model: Unbabel/wmt23-cometkiwi-da-xxl is not in the Hugging Face "
        r"cache, and HF_HUB_OFFLINE is set",
        r"train\.model: org/never-downloaded is not in the Hugging Face cache",
        # Encoders come from their COMET model's hparams.yaml, so they are resolved after it.
        r"score\.scorers\[1\]\.model \(its encoder\): facebook/xlm-roberta-xxl is not in the "
        r"Hugging Face cache",
    ]
    assert err == f"error: {path}: {len(expected)} problem(s) before any work started " \
        "(listed above)\n"
    lines = out.split(f"{len(expected)} problem(s):\n")[1].splitlines()
    for pattern, line in zip(expected, lines, strict=True):
        assert re.search(pattern, line), (pattern, line)
    assert elapsed < 5, elapsed  # the bound for a user-facing check, not a benchmark
    # `cpo-data build` stops with the same list before the flow (and Prefect) starts.
    monkeypatch.setattr(build_flow, "build_triplets", lambda *_: pytest.fail("flow started"))
    assert cli.main(["build", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    build_only = [p for p in expected if not p.startswith(r"train\.")]  # what a build reads
    assert err[0].endswith(f"{len(build_only)} problem(s) before any work started:")
    for pattern, line in zip(build_only, err[1:], strict=True):
        assert re.search(pattern, line), (pattern, line)


def test_a_warm_cache_passes_offline_and_names_each_commit(tmp_path, hub_cache):  # noqa: F811
    fake_hub_repo(hub_cache, "org/base", "c0ffee", "config.json", "model.safetensors",
                  "tokenizer.model")
    fake_hub_repo(hub_cache, "org/lora", "beef01", "adapter_config.json",
                  "adapter_model.safetensors")
    fake_hub_repo(hub_cache, "Unbabel/kiwi", "abc123", "hparams.yaml",
                  "checkpoints/model.ckpt")
    (hub_cache / "models--Unbabel--kiwi/snapshots/abc123/hparams.yaml").write_text(
        "pretrained_model: facebook/xlm-roberta-xl\n")
    fake_hub_repo(hub_cache, "facebook/xlm-roberta-xl", "e0c0de", "config.json",
                  "sentencepiece.bpe.model")
    report = check([Need("generate.models[0].model", "model", "org/base"),
                    Need("generate.models[0].adapter", "adapter", "org/lora"),
                    Need("train.model", "model", "org/base"),
                    Need("score.scorers[0].model", "comet", "Unbabel/kiwi")])
    assert report.problems == []
    commits = {f.name: (f.where, f.commit, f.keys) for f in report.found}
    assert commits == {
        "org/base": ("cache", "c0ffee", ["generate.models[0].model", "train.model"]),  # once
        "org/lora": ("cache", "beef01", ["generate.models[0].adapter"]),
        "Unbabel/kiwi": ("cache", "abc123", ["score.scorers[0].model"]),
        "facebook/xlm-roberta-xl": ("cache", "e0c0de", ["score.scorers[0].model (its encoder)"]),
    }


def _info(sha, files, gated=False, licence=None):
    return SimpleNamespace(sha=sha, gated=gated, tags=[], card_data=SimpleNamespace(
        license=licence), siblings=[SimpleNamespace(rfilename=f, size=s) for f, s in files])


def test_the_hub_names_gated_repos_their_licence_and_typos(monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    repos = {
        "Unbabel/XCOMET-XXL": _info("9a9a", [("hparams.yaml", 1_000),
                                             ("checkpoints/model.ckpt", 14_000_000_000)],
                                    gated="manual", licence="cc-by-nc-sa-4.0"),
        "haoranxu/ALMA-13B-Pretrain-LoRA": _info("7b7b", [("adapter_config.json", 600)]),
    }

    def model_info(self, repo, revision=None, files_metadata=False):
        assert files_metadata  # sizes come from the file metadata
        if repo not in repos:
            raise RepositoryNotFoundError(f"404 {repo}")
        return repos[repo]

    def auth_check(repo):
        raise GatedRepoError(f"403 {repo}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr("huggingface_hub.auth_check", auth_check)
    report = check([Need("score.scorers[1].model", "comet", "Unbabel/XCOMET-XXL"),
                    Need("train.lora.adapter", "adapter", "haoranxu/ALMA-13B-Pretrain-LoRA"),
                    Need("generate.models[0].adapter", "adapter", "haoranxu/ALMA-13B-LoRA")])
    assert report.problems == [
        "score.scorers[1].model: Unbabel/XCOMET-XXL is gated (licence cc-by-nc-sa-4.0): accept "
        "its terms at https://huggingface.co/Unbabel/XCOMET-XXL and set HF_TOKEN",
        "train.lora.adapter: missing adapter_model.safetensors or adapter_model.bin in the repo",
        "generate.models[0].adapter: haoranxu/ALMA-13B-LoRA: no such model on the hub (a "
        "private one needs HF_TOKEN)",
    ]
    xcomet = report.found[0]
    assert (xcomet.where, xcomet.commit, xcomet.gated, xcomet.size) == (
        "hub", "9a9a", "manual", 14_000_001_000)


def test_a_complete_local_model_and_source_pass(tmp_path):
    model = build_tiny_causal_lm(tmp_path / "m")
    (tmp_path / "s.jsonl").write_text("{}\n")
    report = check([Need("train.model", "model", str(model)),
                    Need("sources[0].path", "file", str(tmp_path / "s.jsonl"))])
    assert report.ok and [f.where for f in report.found] == ["folder", "file"]
    assert preflight.LAYOUTS["model"].marker == "config.json"


def test_download_fetches_what_the_hub_resolved_then_the_cache_alone_serves(hub_cache,  # noqa: F811
                                                                            monkeypatch):
    """COMET's encoder too, but only its config and tokenizer (its weights are COMET's)."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from cpo_data.preflight import download

    hub = {  # repo -> (commit, files)
        "Unbabel/kiwi": ("abc123", ["hparams.yaml", "checkpoints/model.ckpt"]),
        "facebook/xlm-roberta-xl": ("e0c0de", ["config.json", "sentencepiece.bpe.model",
                                               "pytorch_model.bin"]),
        "org/base": ("c0ffee", ["config.json", "model.safetensors", "tokenizer.json"]),
    }
    fetched = {}

    def model_info(self, repo, revision=None, files_metadata=False):
        commit, files = hub[repo]
        return _info(commit, [(f, 10) for f in files])

    def snapshot_download(repo, revision=None, allow_patterns=None):
        import fnmatch

        commit, files = hub[repo]
        assert revision == commit  # the commit the check found, not a moving branch
        kept = [f for f in files if allow_patterns is None
                or any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
        fetched[repo] = kept
        folder = hub_cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        for name in kept:
            (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / commit / name).write_text("{}")
        if repo == "Unbabel/kiwi":
            (hub_cache / f"models--Unbabel--kiwi/snapshots/{commit}/hparams.yaml").write_text(
                "pretrained_model: facebook/xlm-roberta-xl\n")

    def hub_file(model, revision, filename):  # the small hparams.yaml, as hf_hub_download
        snapshot_download(model, hub[model][0], [filename])
        return hub_cache / f"models--{model.replace('/', '--')}/snapshots/{hub[model][0]}" / \
            filename

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("cpo_data.fingerprint.hub_file", hub_file)
    needs = [Need("score.scorers[0].model", "comet", "Unbabel/kiwi"),
             Need("train.model", "model", "org/base")]
    report = download(needs)
    assert report.problems == []
    assert [(f.name, f.where, f.commit) for f in report.found] == [
        ("Unbabel/kiwi", "cache", "abc123"), ("org/base", "cache", "c0ffee"),
        ("facebook/xlm-roberta-xl", "cache", "e0c0de")]
    assert fetched["facebook/xlm-roberta-xl"] == ["config.json", "sentencepiece.bpe.model"]
    assert fetched["org/base"] == hub["org/base"][1]
