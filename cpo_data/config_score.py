"""The score stage's configs: one per scorer, one per ensemble of their scores, and the stage's.

Split from `cpo_data.config` along the stage boundary, to keep that module a readable size:
nothing here depends on another stage's config (a scorer shares only the dtype choices with a
generator, and those live in `cpo_data.fields`). `cpo_data.config` re-exports every name, so
`from cpo_data.config import ScorerConfig` keeps working and stays the documented way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpo_data.fields import (
    DTYPES,
    FILE,
    MODEL,
    _check_at_least,
    _check_choice,
    _check_device,
    _fail,
)

SCORER_KINDS = ("comet", "chrf", "chrf++", "bleu", "ter")
# sacrebleu tokenizers that need nothing downloaded (flores101/200 fetch a sentencepiece model).
BLEU_TOKENIZERS = ("13a", "intl", "char", "zh", "none")


@dataclass(frozen=True)
class ScorerConfig:
    """One scorer: a COMET model (CometKiwi, XCOMET, COMET-22) or a sacrebleu metric."""

    name: str
    """Score column name (kiwi, xcomet, chrf)."""
    kind: str = "comet"
    """comet, or a sacrebleu sentence metric: chrf, chrf++, bleu, ter."""
    model: str | None = field(default=None, metadata=MODEL)
    """comet: hub id (Unbabel/wmt23-cometkiwi-da-xxl) or a local checkpoint (.ckpt or folder)."""
    use_reference: bool = False
    """comet: also pass the reference (COMET-22, XCOMET with references); QE models read src+mt."""
    token_budget: int = 16384
    """comet: tokens per batch (rows x longest src+mt)."""
    max_batch_size: int = 64
    """comet: rows per batch at most."""
    device: str = "auto"
    """comet: auto (cuda when available), cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """comet: float32, the default, is the precision COMET's own `predict()` runs at, so the
    numbers are COMET's; bfloat16/float16 (or auto: half on GPU) halve the memory but move the
    scores (a warning at load says so; README "Scoring"); float64 is for checking exactness."""
    bleu_tokenize: str = "13a"
    """bleu: a sacrebleu tokenizer that needs no download (13a, intl, char, zh, none)."""

    def __post_init__(self) -> None:
        if not self.name:
            _fail("name", "give the scorer a name")
        _check_choice("kind", self.kind, SCORER_KINDS)
        if self.kind == "comet" and not self.model:
            _fail("model", "a comet scorer needs a hub id or checkpoint path")
        if self.kind != "comet" and self.model:
            _fail("model", f"a {self.kind} scorer takes no model")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_device("device", self.device)
        _check_choice("bleu_tokenize", self.bleu_tokenize, BLEU_TOKENIZERS)
        _check_at_least(self, 1, "token_budget", "max_batch_size")

    @property
    def needs_reference(self) -> bool:
        return self.kind != "comet" or self.use_reference

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "ter"


def comet_hparams(model: str | None, download: bool = False) -> dict[str, Any] | None:
    """The `hparams.yaml` COMET reads for a model (a folder, its `checkpoints/model.ckpt`, or
    a hub id), or None where it is not at hand: a hub id is looked up in the Hugging Face
    cache only, unless `download` (then fetched, a few kB, when not cached)."""
    import yaml

    from cpo_data.errors import UserError
    from cpo_data.fingerprint import comet_folder, hub_file

    if not model:
        return None
    try:
        folder = Path(comet_folder(model)).expanduser()
        if folder.is_dir():
            path: Path | None = folder / "hparams.yaml"
        elif model.startswith((".", "/", "~")) or model.endswith(".ckpt"):
            return None  # a path that is not (yet) there: the load or the build names it
        elif download:
            path = hub_file(model, None, "hparams.yaml")
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "hparams.yaml")
            path = Path(cached) if isinstance(cached, str) else None
        if path is None or not path.is_file():
            return None
        hparams = yaml.safe_load(path.read_text())
    except (UserError, ValueError, OSError, yaml.YAMLError):
        return None  # not a valid id, unreachable, unreadable: the load says which
    return hparams if isinstance(hparams, dict) else None


# COMET 2.2.7's scoring classes by `class_identifier`: the setting naming the layer(s) its
# estimator reads (a "mix" of all layers, or one layer) and its default `layer_norm`. The first
# two (COMET-22, COMET-QE) pool a sentence embedding; CometKiwi and XCOMET take the CLS token.
_LAYERS = {"regression_metric": ("layer", True), "referenceless_regression_metric": ("layer", True),
           "unified_metric": ("sent_layer", True), "xcomet_metric": ("sent_layer", False)}
_POOLED = ("regression_metric", "referenceless_regression_metric")


def bfloat16_problem(hparams: dict[str, Any] | None) -> str | None:
    """Why COMET 2.2.7 cannot score with this checkpoint in bfloat16, or None.

    Two steps in COMET return float32 whatever the model's dtype, and the estimator's bf16
    weights then refuse that input ("mat1 and mat2 must have the same dtype"): average
    pooling (it divides by a float32 token count) and the layer mix with `layer_norm` (it
    normalises with a float32 mask). In float16 COMET's estimator casts its input back
    (comet/modules/feedforward.py), so float16 runs; bfloat16 has no such cast. Making it run
    would mean patching COMET, and the numbers would be nobody's, so it is refused instead."""
    kind = (hparams or {}).get("class_identifier")
    if kind not in _LAYERS:
        return None
    fix = ("returns float32 inside COMET ('mat1 and mat2 must have the same dtype'); use "
           "float32 (COMET's own predict() precision) or float16")
    if kind in _POOLED and hparams.get("pool", "avg") == "avg":
        return f"a COMET-22-style {kind} with average pooling, which {fix}"
    layer, layer_norm = _LAYERS[kind]
    if hparams.get(layer, "mix") == "mix" and hparams.get("layer_norm", layer_norm):
        return f"a {kind} whose layer mix has layer_norm, which {fix}"
    return None


@dataclass(frozen=True)
class EnsembleConfig:
    """A combined score: the weighted mean of member scores, on one direction."""

    name: str
    """Score column name (kiwi_xcomet, as ALMA-R calls the mean of KIWI and XCOMET)."""
    members: tuple[str, ...]
    """Scorer names to combine."""
    weights: tuple[float, ...] | None = None
    """One weight per member; null means equal weights (the mean)."""

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            _fail("members", "an ensemble combines at least two scorers")
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                _fail("weights", f"give {len(self.members)} weights, one per member")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                _fail("weights", "must be non-negative with a positive sum")


@dataclass(frozen=True)
class ScoreConfig:
    """How candidates are scored, and which combined scores are built from those scores."""

    scorers: tuple[ScorerConfig, ...] = ()
    """Scorers, each giving its own score column."""
    ensembles: tuple[EnsembleConfig, ...] = ()
    """Combined scores over scorers."""
    cache_dir: str | None = field(default=None, metadata=FILE)
    """Score cache (local path or fsspec URI); null turns caching off."""

    @property
    def names(self) -> list[str]:
        """Every score this stage produces: its scorers', then its ensembles'."""
        return [s.name for s in self.scorers] + [e.name for e in self.ensembles]

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            _fail("scorers", f"scorer and ensemble names must be distinct, got {names}")
        known = {s.name for s in self.scorers}
        for i, ensemble in enumerate(self.ensembles):
            unknown = [m for m in ensemble.members if m not in known]
            if unknown:
                _fail(f"ensembles[{i}].members", f"{unknown} are not scorers ({sorted(known)})")

