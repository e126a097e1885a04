"""The offline demo: the demo corpus in, a published version of triplets out.

`configs/demo.yaml` takes the corpus's two provided systems as candidates, scores them with chrF
against the reference (so the reference is not a candidate), and compares that ranking with the
corpus's human labels in the summary. `cpo-data demo` runs it through the build flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cpo_data.config import BuildConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def demo_config(store_uri: str | None = None) -> BuildConfig:
    """The demo's config, optionally publishing somewhere else (its work folder then sits
    beside that store, named `<store>-work`)."""
    config = load_config(DEMO_CONFIG)
    if store_uri is not None:
        publish = dataclasses.replace(config.publish, uri=store_uri)
        config = dataclasses.replace(config, publish=publish,
                                     work_dir=f"{store_uri.rstrip('/')}-work")
    return config
