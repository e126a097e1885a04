"""Generators and scorers built once per process and reused by every shard it runs.

A build's process (the flow's own, or each Dask worker) runs many shards in turn. Building the
generator or scorer again for each shard repeats everything that depends only on its config:
resolving a hub id (`snapshot_download`, a network round trip per shard), fingerprinting the
weights, probing the tokenizer. The weights themselves are memoised underneath by each
backend's `_load`. Objects are kept by their frozen config, which is hashable and compares by
value, so the config that arrives pickled with the next shard finds the same object.

The objects carry per-call state (batch counters, the language tokens of the batch in hand,
`last_truncated`), so shards that share a process take turns through `in_use`: a worker started
with several threads still runs one shard's model work at a time, as its one GPU would anyway.
What a shard reports (generated, from cache, scored) is counted per call by the stages, not on
these objects, so it stays per shard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cpo_data.config import GeneratorConfig, ScorerConfig

in_use = threading.Lock()
"""Held while a shard generates or scores, around getting the objects and using them."""

_kept: dict[tuple[str, Any], Any] = {}
_kept_lock = threading.Lock()


def _keep(kind: str, config: Any, load: Callable[[Any], Any]) -> Any:
    with _kept_lock:
        if (kind, config) not in _kept:
            _kept[kind, config] = load(config)
        return _kept[kind, config]


def generator(config: GeneratorConfig):
    """This process's generator for one configured model, built on first use."""
    from cpo_data.backends import hf_generate

    return _keep("generator", config, hf_generate.load_generator)


def scorer(config: ScorerConfig):
    """This process's scorer for one configured entry, built on first use."""
    from cpo_data.backends import comet_score

    return _keep("scorer", config, comet_score.load_scorer)


def forget() -> None:
    """Drop the kept objects, so the models under them can be freed (`release_models`)."""
    with _kept_lock:
        _kept.clear()
