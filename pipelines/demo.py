"""The offline demo: the demo corpus in, a published version of triplets out, and a short
training run on it.

`configs/demo.yaml` takes the corpus's two provided systems as candidates, scores them with chrF
against the reference (so the reference is not a candidate), and compares that ranking with the
corpus's human labels in the summary. `cpo-data demo` runs it through the build flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cpo_data.config import BuildConfig
from cpo_data.store import dataset_uri
from pipelines.project import load_project
from training.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_MODEL_HIDDEN_SIZE = 64


def demo_configs(store_uri: str | None = None) -> tuple[BuildConfig, TrainConfig]:
    """The demo's build and train configs, from one read of its file; optionally publishing
    somewhere else (its work folder then sits beside that store, named `<store>-work`, the
    model in `<store>-model` and runs in `<store>-runs`)."""
    project = load_project(DEMO_CONFIG)
    config, train = project.need_build(), project.need_train()
    if store_uri is not None:
        root = store_uri.rstrip("/")
        publish = dataclasses.replace(config.publish, uri=store_uri)
        config = dataclasses.replace(config, publish=publish, work_dir=f"{root}-work")
        train = dataclasses.replace(train, dataset=dataset_uri(store_uri, publish.name),
                                    output_dir=f"{root}-runs", model=f"{root}-model")
    return config, train


def demo_config(store_uri: str | None = None) -> BuildConfig:
    """The demo's build config (see `demo_configs`)."""
    return demo_configs(store_uri)[0]


def ensure_demo_model(path: str | Path) -> Path:
    """The demo's tiny Llama (random weights, a tokenizer trained on the demo corpus), built
    into `path` when it is not there yet."""
    from cpo_data.testing import build_tiny_causal_lm

    path = Path(path)
    if not (path / "config.json").exists():
        build_tiny_causal_lm(path, seed=0, hidden_size=DEMO_MODEL_HIDDEN_SIZE)
    return path
