"""COMET's own numbers by default; half precision only when asked, said so, and only where COMET
itself can run it (issue 15, item 3).

`predict()` runs at float32, as a scorer does by default; `test_score.py` checks that the
default's scores are `predict()`'s bit for bit (CometKiwi, XCOMET). Here: bfloat16/float16 warn
once when the model loads; a checkpoint COMET cannot run in bfloat16 (COMET-22's average
pooling, a layer mix with layer_norm) is refused by its config key before anything loads, and
the rule that refuses it agrees with what COMET does.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from cpo_data.backends import comet_score
from cpo_data.backends.comet_score import load_scorer
from cpo_data.config import ConfigError, ScorerConfig, load_config
from cpo_data.config_score import bfloat16_problem, comet_hparams
from cpo_data.score import ScoreItem
from cpo_data.testing import _tiny_xlmr_encoder
from tests.conftest import REPO_ROOT

ITEMS = [ScoreItem("Der Zug fährt um acht Uhr ab.", "The train leaves at eight.", "The train "
                   "departs at eight."),
         ScoreItem("Es regnet.", "It rains heavily today, really.", "It is raining."),
         ScoreItem("Danke!", "Thanks!", "Thank you!"),
         ScoreItem("Bitte schließen Sie das Fenster.", "Close window.", "Please shut the window.")]
WARNING = "differ from COMET's own predict()"


def _build(path, encoder, kind: str, **settings) -> str:
    """A tiny COMET checkpoint of class `kind` over a shared encoder folder, saved as
    `cpo_data.testing.build_tiny_comet` saves its own (which builds no RegressionMetric)."""
    import pytorch_lightning
    import yaml
    from comet.models import RegressionMetric, UnifiedMetric, XCOMETMetric

    classes = {"regression_metric": RegressionMetric, "unified_metric": UnifiedMetric,
               "xcomet_metric": XCOMETMetric}
    common = dict(encoder_model="XLM-RoBERTa", pretrained_model=str(encoder),
                  load_pretrained_weights=False, local_files_only=True, hidden_sizes=[16])
    if kind != "regression_metric":
        common["word_layer"] = 1  # of the tiny encoder's 2
    if kind == "unified_metric":
        common["input_segments"] = ["mt", "src"]
    torch.manual_seed(0)
    model = classes[kind](**common, **settings)
    with torch.no_grad():  # spread the head so that scores differ between segments
        for parameter in model.estimator.parameters():
            parameter.mul_(8.0)
    hparams = {**dict(model.hparams), "class_identifier": kind}
    (path / "checkpoints").mkdir(parents=True)
    checkpoint = path / "checkpoints" / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pytorch_lightning.__version__}, checkpoint)
    (path / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return str(checkpoint)


# Each with what COMET 2.2.7 does with it in bfloat16 (checked below against COMET itself).
VARIANTS = {
    "comet22": ("regression_metric", {}),  # COMET-22's defaults: avg pooling, layer_norm
    "regression_cls": ("regression_metric", {"pool": "cls", "layer_norm": False}),
    "kiwi_layer_norm": ("unified_metric", {"layer_norm": True}),
    "kiwi": ("unified_metric", {"layer_norm": False}),
    "xcomet": ("xcomet_metric", {}),
}
REFUSED = {"comet22", "kiwi_layer_norm"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    encoder = _tiny_xlmr_encoder(root / "encoder")
    return {name: _build(root / name, encoder, kind, **settings)
            for name, (kind, settings) in VARIANTS.items()}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == comet_score.__name__ and WARNING in r.getMessage()]


# ---- half precision says so, once ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_warns_once_when_the_model_loads(checkpoints, caplog, dtype):
    caplog.set_level(logging.WARNING, logger=comet_score.__name__)
    config = ScorerConfig(name="xc", model=checkpoints["xcomet"], dtype=dtype, max_batch_size=1)
    first = load_scorer(config)
    results = first.score(ITEMS) + first.score(ITEMS)  # eight batches
    again = load_scorer(config)  # the same model, from the process's cache
    results += again.score(ITEMS)
    assert first.batches == 8 and again.batches == 4
    assert all(math.isfinite(r.score) for r in results)
    assert first.model.dtype == getattr(torch, dtype)
    [message] = _warnings(caplog)
    assert f"xc: {checkpoints['xcomet']} runs in {dtype}" in message
    assert "0.034" in message and "0.111" in message and "README" in message
    assert "\n" not in message


@pytest.mark.parametrize(("dtype", "device"), [("float32", "cpu"), ("auto", "cpu"),
                                               ("float64", "cpu")])
def test_full_precision_does_not_warn(checkpoints, caplog, dtype, device):
    caplog.set_level(logging.WARNING, logger=comet_score.__name__)
    scorer = load_scorer(ScorerConfig(name="k", model=checkpoints["kiwi"], dtype=dtype,
                                      device=device))
    assert all(math.isfinite(r.score) for r in scorer.score(ITEMS))
    assert scorer.model.dtype in (torch.float32, torch.float64)
    assert _warnings(caplog) == []


def test_a_scorer_runs_at_float32_unless_asked_on_any_device():
    from cpo_data.backends.torch_device import pick_dtype

    config = ScorerConfig(name="k", model="Unbabel/wmt23-cometkiwi-da-xxl")
    assert config.dtype == "float32"
    assert pick_dtype(config.dtype, torch.device("cuda")) == torch.float32  # not half on GPU


def test_the_recipe_runs_at_comet_s_own_precision():
    alma = load_config(REPO_ROOT / "configs" / "alma-r.yaml")
    assert [(s.name, s.dtype) for s in alma.score.scorers] == [("kiwi", "float32"),
                                                               ("xcomet", "float32")]


# ---- what COMET cannot run in bfloat16 is refused up front --------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_refusal_agrees_with_what_comet_does_in_bfloat16(checkpoints, name):
    import comet

    model = comet.load_from_checkpoint(checkpoints[name], local_files_only=True)
    model.eval().to(torch.bfloat16)
    samples = [{"src": i.src, "mt": i.mt, "ref": i.ref} for i in ITEMS]
    try:
        with torch.inference_mode():
            model.predict_step(model.prepare_for_inference(samples))
        failed = False
    except RuntimeError as error:
        assert "must have the same dtype" in str(error)
        failed = True
    assert failed == (name in REFUSED)
    assert (bfloat16_problem(comet_hparams(checkpoints[name])) is not None) == failed


def _project(tmp_path, scorers: str):
    (tmp_path / "data.jsonl").write_text('{"src": "Hallo.", "ref": "Hello."}\n')
    (tmp_path / "build.yaml").write_text(
        "sources:\n  - {path: data.jsonl, src_lang: de, tgt_lang: en}\n"
        "publish: {uri: store, name: mine}\nselect: {rank_by: c22}\nscore:\n  scorers:\n"
        + scorers)
    return tmp_path / "build.yaml"


def _problems(path) -> list[str]:
    from pipelines.project import load_project

    return load_project(path).preflight().problems


def test_comet22_in_bfloat16_is_refused_by_the_preflight_by_its_key(checkpoints, tmp_path,
                                                                   monkeypatch):
    import comet

    monkeypatch.setattr(comet, "load_from_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    path = _project(tmp_path, f"    - {{name: chrf, kind: chrf}}\n"
                              f"    - {{name: c22, model: {checkpoints['comet22']}, "
                              f"use_reference: true, dtype: bfloat16}}\n")
    (problem,) = _problems(path)
    assert re.fullmatch(r"score\.scorers\[1\]\.dtype: bfloat16 cannot run .*comet22.*average "
                        r"pooling.*float32 \(COMET's own predict\(\) precision\) or float16",
                        problem), problem
    # `cpo-data build` stops on it before Prefect starts.
    from pipelines import cli

    assert cli.main(["build", str(path)]) == 2
    # float16, which COMET's own estimator casts for, and float32 pass.
    for dtype in ("float16", "float32"):
        assert _problems(_project(tmp_path, f"    - {{name: c22, model: "
                                            f"{checkpoints['comet22']}, use_reference: true, "
                                            f"dtype: {dtype}}}\n")) == []


def test_a_cached_hub_id_is_refused_by_the_preflight(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cpo_data.preflight import comet_dtype_problems

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--Unbabel--wmt22-comet-da"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    hparams = checkpoints["comet22"].replace("checkpoints/model.ckpt", "hparams.yaml")
    (repo / "snapshots" / "c0ffee" / "hparams.yaml").write_text(open(hparams).read())
    cached = ScorerConfig(name="c22", model="Unbabel/wmt22-comet-da", dtype="bfloat16")
    (problem,) = comet_dtype_problems([("score.scorers[0]", cached)])
    assert problem.startswith("score.scorers[0].dtype: bfloat16 cannot run "
                              "Unbabel/wmt22-comet-da")
    # Not cached (and offline): nothing to read, so the load checks it (below).
    elsewhere = ScorerConfig(name="c22", model="Unbabel/elsewhere", dtype="bfloat16")
    assert comet_dtype_problems([("score.scorers[0]", elsewhere)]) == []


def test_auto_on_a_bf16_gpu_is_refused_at_load_before_the_model_loads(checkpoints,
                                                                      monkeypatch):
    import comet

    monkeypatch.setattr(comet, "load_from_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(comet_score, "pick_dtype", lambda name, device: torch.bfloat16)
    config = ScorerConfig(name="c22", model=checkpoints["comet22"], use_reference=True,
                          dtype="auto")  # passes at config load: auto is float32 on a CPU
    with pytest.raises(ConfigError, match=r"scorer 'c22': dtype: auto, which is bfloat16 on "
                                          r"cpu, cannot run .*average pooling"):
        load_scorer(config)


def test_comet22_at_float32_is_predict_s_and_at_float16_finite(checkpoints):
    """The reference-based path: float32 is `predict()`'s bit for bit (one item per batch, as
    in test_score.py); float16 runs, as COMET's own estimator casts its input back."""
    import comet

    model = comet.load_from_checkpoint(checkpoints["comet22"], local_files_only=True)
    theirs = model.predict([{"src": i.src, "mt": i.mt, "ref": i.ref} for i in ITEMS],
                           batch_size=1, gpus=0, progress_bar=False).scores
    ours = load_scorer(ScorerConfig(name="c22", model=checkpoints["comet22"],
                                    use_reference=True, max_batch_size=1)).score(ITEMS)
    assert [r.score for r in ours] == theirs
    assert len({round(s, 4) for s in theirs}) == len(ITEMS)
    half = load_scorer(ScorerConfig(name="c22", model=checkpoints["comet22"],
                                    use_reference=True, dtype="float16")).score(ITEMS)
    assert all(math.isfinite(r.score) for r in half)


def test_the_rule_reads_each_class_s_own_defaults():
    """An hparams.yaml without a setting means the class's default: UnifiedMetric (CometKiwi)
    mixes layers with layer_norm, XCOMETMetric without; `build_tiny_comet`'s kiwi keeps the
    former, so it cannot run in bfloat16 either (its xcomet can, as used above)."""
    assert "layer_norm" in bfloat16_problem({"class_identifier": "unified_metric"})
    assert bfloat16_problem({"class_identifier": "unified_metric", "sent_layer": 24}) is None
    assert bfloat16_problem({"class_identifier": "xcomet_metric"}) is None
    assert "average pooling" in bfloat16_problem({"class_identifier":
                                                  "referenceless_regression_metric"})
    assert bfloat16_problem({"class_identifier": "ranking_metric"}) is None
    # The settings the recipe's models and COMET-22 ship in their hparams.yaml.
    kiwi = {"class_identifier": "unified_metric", "sent_layer": "mix", "layer_norm": False,
            "pool": "avg", "layer": "mix"}
    xcomet = {**kiwi, "class_identifier": "xcomet_metric"}
    comet22 = {"class_identifier": "regression_metric", "layer": "mix", "pool": "avg",
               "layer_norm": True}
    assert bfloat16_problem(kiwi) is None and bfloat16_problem(xcomet) is None
    assert "COMET-22-style" in bfloat16_problem(comet22)
    assert bfloat16_problem(None) is None and bfloat16_problem({}) is None
