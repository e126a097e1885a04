"""The score stage's configs: one per scorer, one per ensemble of their scores, and the stage's.

Split from `cpo_data.config` along the stage boundary, to keep that module a readable size:
nothing here depends on another stage's config (a scorer shares only the dtype choices with a
generator, and those live in `cpo_data.fields`). `cpo_data.config` re-exports every name, so
`from cpo_data.config import ScorerConfig` keeps working and stays the documented way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """comet: float32 gives COMET's own numbers; bfloat16/float16 (or auto: half on GPU) are
    faster and lighter but move scores slightly; float64 is for checking exactness (slow)."""
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

