"""Score candidates: each distinct (src, mt[, ref]) once per scorer, cached, joined back.

Drops, each with a reason in the dropped table: `empty_mt` (an empty or whitespace-only
translation is never sent to a model; COMET would score it as some number, which says nothing),
`missing_reference` (a reference-based scorer on a source without one), `score_not_finite` (NaN
or infinite). Ensembles combine member scores per candidate as a weighted mean; lower-is-better
members (TER) are negated first, so every combined score is higher-is-better.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from cpo_data import schema
from cpo_data.cache import cached_compute, open_cache
from cpo_data.config import EnsembleConfig, ScoreConfig
from cpo_data.drops import Drops
from cpo_data.errors import UserError

EMPTY_MT = "empty_mt"
MISSING_REFERENCE = "missing_reference"
SCORE_NOT_FINITE = "score_not_finite"

log = logging.getLogger(__name__)


class ScoreError(UserError):
    """Scoring that cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class ScoreItem:
    """One distinct thing to score."""

    src: str
    mt: str
    ref: str | None = None


@dataclass
class ScoreResult:
    score: float
    error_spans: list[dict] | None = None


class Scorer(Protocol):
    """What the scoring stage needs from a metric; COMET and sacrebleu implement it."""

    name: str
    identity: dict[str, Any]
    """What decides the numbers (checkpoint fingerprint, settings): the cache key."""
    needs_reference: bool
    higher_is_better: bool
    last_truncated: int
    """Items the last `score` call had to cut to the model's input length."""

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """One result per item, in order."""
        ...


@dataclass
class ScoreReport:
    """Per scorer: distinct pairs, how many the model scored now, how many came from the cache."""

    rows: dict[str, int] = field(default_factory=dict)
    distinct: dict[str, int] = field(default_factory=dict)
    scored: dict[str, int] = field(default_factory=dict)
    from_cache: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class Scores:
    table: pa.Table
    dropped: pa.Table
    report: ScoreReport


def item_key(item: ScoreItem) -> str:
    text = f"{item.src}\n\x00{item.mt}\n\x00{item.ref if item.ref is not None else ''}"
    return hashlib.sha256(text.encode()).hexdigest()


def _score_distinct(scorer: Scorer, items: list[ScoreItem], cache_dir: str | None,
                    report: ScoreReport) -> dict[ScoreItem, ScoreResult]:
    """Scores of distinct items: from the cache where present, from the scorer otherwise."""
    cache = open_cache(cache_dir, "score", scorer.identity) if cache_dir else None
    results, scored = cached_compute(
        cache, items, item_key, scorer.score,
        # NaN is not JSON: cache it as null, so a refresh drops it again without rescoring.
        to_json=lambda r: {"score": r.score if math.isfinite(r.score) else None,
                           "error_spans": r.error_spans},
        from_json=lambda v: ScoreResult(v["score"] if v["score"] is not None else math.nan,
                                        v["error_spans"]),
    )
    report.scored[scorer.name] = scored
    report.from_cache[scorer.name] = len(items) - scored
    report.truncated[scorer.name] = scorer.last_truncated if scored else 0
    return dict(zip(items, results, strict=True))


def _columns_as_rows(table: pa.Table, names: list[str]) -> list[dict]:
    columns = [table.column(name).to_pylist() for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def score_candidates(candidates: pa.Table, sources: pa.Table, config: ScoreConfig,
                     scorers: Sequence[Scorer]) -> Scores:
    """The scores table (one row per candidate and scorer, ensembles included)."""
    # Only the columns used here are turned into Python objects: converting whole rows
    # (lists of systems, decoding settings) cost more than a cached refresh itself.
    candidates = _columns_as_rows(
        schema.validate(candidates, schema.CANDIDATES, what="candidates"), ["source_id", "text"])
    by_id = {r["source_id"]: r for r in _columns_as_rows(
        schema.validate(sources, schema.SOURCES, what="sources"),
        ["source_id", "lang_pair", "src", "ref"])}
    missing_sources = {c["source_id"] for c in candidates} - set(by_id)
    if missing_sources:
        raise ScoreError(f"candidates name {len(missing_sources)} sources not in the sources "
                         f"table (first: {sorted(missing_sources)[0]})")
    report = ScoreReport()
    rows: list[dict] = []
    dropped = Drops()

    def drop(candidate: dict, reason: str, detail: str) -> None:
        sid = candidate["source_id"]
        dropped.add(sid, by_id[sid]["lang_pair"], reason, detail)

    for scorer in scorers:
        if scorer.needs_reference and candidates and not any(
                by_id[c["source_id"]]["ref"] for c in candidates):
            raise ScoreError(f"scorer {scorer.name!r} needs references, and no source has one "
                             "(map ref_column in sources, or use a reference-free scorer)")
        wanted: dict[int, ScoreItem] = {}
        for i, candidate in enumerate(candidates):
            source = by_id[candidate["source_id"]]
            if not candidate["text"].strip():
                drop(candidate, EMPTY_MT, f"{scorer.name}: empty translation")
            elif scorer.needs_reference and not source["ref"]:
                drop(candidate, MISSING_REFERENCE, f"{scorer.name}: source has no reference")
            else:
                ref = source["ref"] if scorer.needs_reference else None
                wanted[i] = ScoreItem(source["src"], candidate["text"], ref)
        distinct = list(dict.fromkeys(wanted.values()))
        report.rows[scorer.name] = len(wanted)
        report.distinct[scorer.name] = len(distinct)
        results = (_score_distinct(scorer, distinct, config.cache_dir, report) if distinct
                   else {})
        for i, item in wanted.items():
            result = results[item]
            candidate = candidates[i]
            if not math.isfinite(result.score):
                drop(candidate, SCORE_NOT_FINITE, f"{scorer.name}: {result.score}")
                continue
            rows.append({"source_id": candidate["source_id"], "text": candidate["text"],
                         "scorer": scorer.name, "score": float(result.score),
                         "error_spans": result.error_spans})

    directions = {s.name: s.higher_is_better for s in scorers}
    for ensemble in config.ensembles:
        rows += combine(rows, ensemble, directions)
    table = pa.Table.from_pylist(rows, schema=schema.SCORES)
    report.dropped = dropped.counts()
    return Scores(table=table, dropped=dropped.table(), report=report)


def combine(rows: list[dict], ensemble: EnsembleConfig,
            higher_is_better: dict[str, bool]) -> list[dict]:
    """Ensemble rows: the weighted mean of member scores for candidates that have all of them."""
    weights = ensemble.weights or (1.0,) * len(ensemble.members)
    members = dict(zip(ensemble.members, weights, strict=True))
    per_candidate: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row["scorer"] in members:
            per_candidate.setdefault((row["source_id"], row["text"]), {})[row["scorer"]] = (
                row["score"] if higher_is_better.get(row["scorer"], True) else -row["score"])
    combined = []
    incomplete = 0
    for (source_id, text), scores in per_candidate.items():
        if len(scores) < len(members):
            incomplete += 1
            continue
        value = sum(members[m] * scores[m] for m in members) / sum(members.values())
        combined.append({"source_id": source_id, "text": text, "scorer": ensemble.name,
                         "score": value, "error_spans": None})
    if incomplete:
        log.warning("%s: %d candidates lack a member score and get no combined score",
                    ensemble.name, incomplete)
    return combined


def wide(scores: pa.Table) -> pa.Table:
    """One row per candidate, one column per scorer: how ALMA-R's `kiwi`, `xcomet` and
    `kiwi_xcomet` columns look side by side."""
    frame = scores.select(["source_id", "text", "scorer", "score"]).to_pandas()
    pivot = frame.pivot_table(index=["source_id", "text"], columns="scorer", values="score",
                              aggfunc="first")
    pivot.columns.name = None
    return pa.Table.from_pandas(pivot.reset_index(), preserve_index=False)
