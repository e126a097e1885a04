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

Stages that share a device take turns on it: before a model of one kind (generator, scorer)
loads, the kept objects of the other kind on the same device are released (`release`), so what
a process holds at its peak is one stage's models, not both stages' (ALMA-13B and two XXL
scorers together hold no 40 or 48 GB card). This is done here, at the load, because here it
reaches every process that holds models, the flow's own or each Dask worker, without the flow
having to address them. A build runs all its generation before any scoring
(`cpo_data.build.run_build`, `pipelines.build`), so each model still loads once per process
and phase.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cpo_data.config import GeneratorConfig, ScorerConfig
from cpo_data.fingerprint import generator_weights, scorer_weights
from cpo_data.identity import generator_identity, scorer_identity

KEEP = 4

in_use = threading.Lock()
"""Held while a shard generates or scores, around getting the objects and using them."""

Key = tuple[str, Any]
"""(kind, config): kind is "generator" or "scorer"."""

_kept: OrderedDict[Key, tuple[str | None, Any, str | None]] = OrderedDict()
"""Per key: the weights' fingerprint, the object, and the device its model sits on."""
_kept_lock = threading.RLock()  # reentrant: `_keep` releases while it holds it


def device_of(config: GeneratorConfig | ScorerConfig) -> str | None:
    """The device a config's model loads on, resolved as the backends resolve it, so that
    `auto`, `cuda` and `cuda:0` compare equal where they name one GPU; None for a scorer that
    holds no model (sacrebleu's)."""
    if isinstance(config, ScorerConfig) and config.kind != "comet":
        return None
    import torch

    from cpo_data.backends.torch_device import pick_device

    device = pick_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type if device.type == "cpu" else str(device)


def to_release(kind: str, device: str | None, kept: Mapping[Key, str | None]) -> list[Key]:
    """What must go before a `kind` model loads on `device`: the kept objects of the other
    kind on that device (`kept`: each key's device). Those of the same kind are one stage's
    models, used together; those on another device take none of this one's memory."""
    if device is None:
        return []
    return [key for key, on in kept.items() if key[0] != kind and on == device]


def release(keys: Iterable[Key]) -> None:
    """Drop these kept objects and their backends' weight caches, and hand the memory back.

    The backends' `_load` caches are cleared whole (an lru_cache drops no single entry): the
    models of objects still kept stay alive through those objects, and only a new config
    sharing weights with one of them would read its weights again. `gc.collect` comes before
    `empty_cache`: a model can sit in a reference cycle, and CUDA's cache returns only blocks
    whose tensors are gone."""
    keys = list(keys)
    with _kept_lock:
        for key in keys:
            _kept.pop(key, None)
    kinds = {kind for kind, _ in keys}
    if "generator" in kinds:
        from cpo_data.backends import hf_generate

        hf_generate._load.cache_clear()
    if "scorer" in kinds:
        from cpo_data.backends import comet_score

        comet_score._load.cache_clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _keep(kind: str, config: Any, weights: str | None, load: Callable[[Any], Any]) -> Any:
    with _kept_lock:
        kept = _kept.get((kind, config))
        if kept is not None and kept[0] != weights:
            # The backend's cache holds the old weights under the same path; and they go
            # before the new ones load, not after.
            release([(kind, config)])
            kept = None
        if kept is None:
            device = device_of(config)
            others = to_release(kind, device, {key: value[2] for key, value in _kept.items()})
            if others:
                release(others)
            kept = (weights, load(config), device)
        _kept[kind, config] = kept
        _kept.move_to_end((kind, config))
        while len(_kept) > KEEP:
            _kept.popitem(last=False)
        return kept[1]


def generator(config: GeneratorConfig):
    """This process's generator for one configured model, built on first use and again when
    its weights change."""
    from cpo_data.backends import hf_generate

    return _keep("generator", config, generator_weights(config), hf_generate.load_generator)


def scorer(config: ScorerConfig):
    """This process's scorer for one configured entry, built on first use and again when its
    weights change."""
    from cpo_data.backends import comet_score

    return _keep("scorer", config, scorer_weights(config), comet_score.load_scorer)


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
