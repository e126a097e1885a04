"""Generators and scorers built once per process and reused by every shard it runs.

A build's process (the flow's own, or each Dask worker) runs many shards in turn. Building the
generator or scorer again for each shard repeats everything that depends only on its config:
resolving a hub id (`snapshot_download`, a network round trip per shard), probing the
tokenizer, loading the weights. Objects are kept by their frozen config, which is hashable and
compares by value, so the config that arrives pickled with the next shard finds the same object.

A Dask worker of a running cluster outlives builds, and a model folder may be rewritten in
between (a retrained adapter under the same path). So each object is kept with the weights'
fingerprint (names, sizes, first and last MiB of each file: milliseconds next to a shard's
work), and a changed fingerprint builds it again from freshly read weights: a kept object never
serves, nor files cache entries under, weights that are gone. At most `KEEP` objects stay, the
least recently used going first, as the backends' weight caches do.

The objects carry per-call state (batch counters, the language tokens of the batch in hand,
`last_truncated`), so shards that share a process take turns through `in_use`: a worker started
with several threads still runs one shard's model work at a time, as its one GPU would anyway.
What a shard reports (generated, from cache, scored) is counted per call by the stages, not on
these objects, so it stays per shard.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cpo_data.config import GeneratorConfig, ScorerConfig
from cpo_data.fingerprint import generator_weights, scorer_weights
from cpo_data.identity import generator_identity, scorer_identity

KEEP = 4

in_use = threading.Lock()
"""Held while a shard generates or scores, around getting the objects and using them."""

_kept: OrderedDict[tuple[str, Any], tuple[str | None, Any]] = OrderedDict()
_kept_lock = threading.Lock()


def _keep(kind: str, config: Any, weights: str | None, load: Callable[[Any], Any],
          forget_weights: Callable[[], None]) -> Any:
    with _kept_lock:
        kept = _kept.get((kind, config))
        if kept is not None and kept[0] != weights:
            forget_weights()  # the backend's cache holds the old weights under the same path
            kept = None
        if kept is None:
            kept = (weights, load(config))
        _kept[kind, config] = kept
        _kept.move_to_end((kind, config))
        while len(_kept) > KEEP:
            _kept.popitem(last=False)
        return kept[1]


def generator(config: GeneratorConfig):
    """This process's generator for one configured model, built on first use and again when
    its weights change."""
    from cpo_data.backends import hf_generate

    return _keep("generator", config, generator_weights(config), hf_generate.load_generator,
                 hf_generate._load.cache_clear)


def scorer(config: ScorerConfig):
    """This process's scorer for one configured entry, built on first use and again when its
    weights change."""
    from cpo_data.backends import comet_score

    return _keep("scorer", config, scorer_weights(config), comet_score.load_scorer,
                 comet_score._load.cache_clear)


class LazyGenerator:
    """A `Generator` whose model loads on its first cache miss: its name and identity come
    from the config, so a shard whose candidates are all cached loads nothing."""

    def __init__(self, config: GeneratorConfig):
        self.config = config
        self.name = config.name
        self.identity = generator_identity(config)

    def generate(self, requests):  # noqa: ANN001, ANN201 - the Generator protocol's
        return generator(self.config).generate(requests)


class LazyScorer:
    """A `Scorer` whose model loads on its first cache miss, as `LazyGenerator`."""

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.name = config.name
        self.identity = scorer_identity(config)
        self.needs_reference = config.needs_reference
        self.higher_is_better = config.higher_is_better
        self.last_truncated = 0

    def score(self, items):  # noqa: ANN001, ANN201 - the Scorer protocol's
        loaded = scorer(self.config)
        results = loaded.score(items)
        self.last_truncated = loaded.last_truncated
        return results


def forget() -> None:
    """Drop the kept objects, so the models under them can be freed (`release_models`)."""
    with _kept_lock:
        _kept.clear()
