"""Sentence-level sacrebleu metrics against the reference: chrF, chrF++, BLEU, TER.

Only tokenizers that need no download are allowed (the config refuses flores101/200, which
fetch a sentencepiece model). BLEU uses effective order, as sentence BLEU should.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpo_data.config import ScorerConfig
from cpo_data.identity import scorer_identity
from cpo_data.score import ScoreError, ScoreItem, ScoreResult


class SacrebleuScorer:
    """A `Scorer` over one sacrebleu sentence metric."""

    def __init__(self, config: ScorerConfig):
        from sacrebleu.metrics import BLEU, CHRF, TER

        metrics = {
            "chrf": lambda: CHRF(),
            "chrf++": lambda: CHRF(word_order=2),
            "bleu": lambda: BLEU(effective_order=True, tokenize=config.bleu_tokenize),
            "ter": lambda: TER(),
        }
        if config.kind not in metrics:
            raise ScoreError(f"{config.name}: {config.kind!r} is not a sacrebleu metric")
        self.metric = metrics[config.kind]()
        self.name = config.name
        self.needs_reference = True
        self.higher_is_better = config.higher_is_better
        self.identity = scorer_identity(config)
        self.calls = 0
        self.last_truncated = 0  # sentence metrics read the whole text

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        self.calls += 1
        results = []
        for item in items:
            if item.ref is None:
                raise ScoreError(f"{self.name}: needs a reference")
            results.append(ScoreResult(self.metric.sentence_score(item.mt, [item.ref]).score))
        return results
