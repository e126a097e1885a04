"""The offline demo: the demo corpus in, a published version of triplets out, and a short
training run on it.

`configs/demo.yaml` takes the corpus's two provided systems as candidates, scores them with chrF
against the reference (so the reference is not a candidate), and compares that ranking with the
corpus's human labels in the summary. `cpo-data demo` runs it through the build flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cpo_data.config import BuildConfig, load_config
from cpo_data.store import dataset_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_MODEL_HIDDEN_SIZE = 64


def demo_config(store_uri: str | None = None) -> BuildConfig:
    """The demo's config, optionally publishing somewhere else (its work folder then sits
    beside that store, named `<store>-work`)."""
    config = load_config(DEMO_CONFIG)
    if store_uri is not None:
        publish = dataclasses.replace(config.publish, uri=store_uri)
        config = dataclasses.replace(config, publish=publish,
                                     work_dir=f"{store_uri.rstrip('/')}-work")
    return config


def ensure_demo_model(path: str | Path) -> Path:
    """The demo's tiny Llama (random weights, a tokenizer trained on the demo corpus), built
    into `path` when it is not there yet."""
    from cpo_data.testing import build_tiny_causal_lm

    path = Path(path)
    if not (path / "config.json").exists():
        build_tiny_causal_lm(path, seed=0, hidden_size=DEMO_MODEL_HIDDEN_SIZE)
    return path


def demo_train_config(store_uri: str | None = None):
    """The demo's `train` section (its model built if missing); with `store_uri` it trains on
    that store's demo dataset, with the model in `<store>-model` and runs in `<store>-runs`."""
    from training.config import load_train_config

    config = load_train_config(DEMO_CONFIG)
    if store_uri is not None:
        name = load_config(DEMO_CONFIG).publish.name
        root = store_uri.rstrip("/")
        config = dataclasses.replace(config, dataset=dataset_uri(store_uri, name),
                                     output_dir=f"{root}-runs", model=f"{root}-model")
    ensure_demo_model(config.model)
    return config
