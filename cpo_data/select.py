"""Pick chosen/rejected pairs per source and write their prompt.

Per source, candidates are ranked by one score (`rank_by`): chosen = the best, rejected = the
worst, the middle ones left out (ALMA-R's rule, `pairs: best_vs_worst`); `best_vs_each` pairs
the best with every worse candidate, `all_above_margin` every two candidates. A pair is kept
when its margin reaches `min_margin` (by default the ranking score's noise threshold,
`cpo_data.noise`) and, with `agreement`, every score orders its sides the same way. Sources
with a human preference (ALMA-R's `Delta`) take it over the scores when `use_human_labels` is
on.

Ties: candidates with equal scores keep the order of the candidates table (the reference first,
then provided systems in the order the sources list them, then generated candidates in model
order), and the earliest wins both picks, as `argmax`/`argmin` do in ALMA-R's code. A pair is
only made with a strictly lower score: a source whose candidates all tie is dropped.

A candidate text that several systems produced names them all, joined by `+`
(`chosen_system: "ref+gpt4"`), and counts for each of them in the per-system tallies.

Both sides carry every scorer's score (`chosen_scores`, `rejected_scores`), each with the error
spans that scorer found in that text (XCOMET's); null for scorers that give none.

Drop reasons (the `dropped` table; one row per left-out source, pair or unranked candidate):
`no_human_label` (labels only, nothing scored), `identical_texts` (the two sides are the same
text), `no_candidate`, `single_candidate` (fewer than two candidates to pair, after exclusions
and reference rules), `score_missing` (a candidate without the ranking score: the scoring stage
dropped it), `tied_scores`, `within_noise` and `scorers_disagree` (one row per source that
lost pairs so, counting them), `all_vetoed` (every candidate that could be chosen was vetoed by
a guard, `cpo_data.guards`, whose vetoes are dropped rows of their own).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from cpo_data import schema
from cpo_data.config import REFERENCE_NAME, SelectConfig
from cpo_data.drops import Drops
from cpo_data.guards import CHOSEN_ONLY
from cpo_data.langs import language_name

NO_HUMAN_LABEL = "no_human_label"
IDENTICAL_TEXTS = "identical_texts"
NO_CANDIDATE = "no_candidate"
SINGLE_CANDIDATE = "single_candidate"
SCORE_MISSING = "score_missing"
TIED_SCORES = "tied_scores"
WITHIN_NOISE = "within_noise"
SCORERS_DISAGREE = "scorers_disagree"
ALL_VETOED = "all_vetoed"


def render_prompt(template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """Fill a prompt template; {Src}/{Tgt} are English language names as ALMA writes them."""
    return template.format(
        Src=language_name(src_lang), Tgt=language_name(tgt_lang), src=src,
        src_lang=src_lang, tgt_lang=tgt_lang,
    )


def triplet_id(source_id: str, chosen: str, rejected: str) -> str:
    """Stable id of one pair: the same source and texts always give the same id."""
    return hashlib.sha256(f"{source_id}\n{chosen}\n{rejected}".encode()).hexdigest()[:20]


@dataclass
class LabelAgreement:
    """How often the ranking score agrees with the human labels, where both exist."""

    labelled: int = 0
    """Sources with a human preference."""
    compared: int = 0
    """Of those, sources where both labelled texts have the ranking score."""
    agree: int = 0
    """The preferred text scored higher."""
    ties: int = 0
    """Both texts scored the same (or were the same text)."""


@dataclass
class SelectReport:
    """What selection did: counts for the summary and the flow's artifacts."""

    sources: int = 0
    triplets: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    """Triplets per `selected_by` (score, human_label)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped rows per reason."""
    chosen: dict[str, int] = field(default_factory=dict)
    """How often each system is on the chosen side (ALMA-R's Table 2)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """How often each system is on the rejected side."""
    agreement: LabelAgreement = field(default_factory=LabelAgreement)


@dataclass
class Selection:
    triplets: pa.Table
    dropped: pa.Table
    report: SelectReport


@dataclass
class _Candidate:
    index: int
    """Position in the candidates table: the tie-break."""
    text: str
    systems: list[str]
    scores: dict[str, float]


ScoreMap = dict[tuple[str, str], dict[str, float]]
"""(source_id, text) -> {scorer: score}"""


@dataclass
class _Spans:
    """Where the error spans of each (source_id, text) and scorer are, for scorers that give
    them (XCOMET). Ranking never reads them, so they stay Arrow until the triplets are built,
    and then only the texts that made a triplet are decoded."""

    column: pa.ChunkedArray | None = None
    """`error_spans` of the score rows that have spans."""
    rows: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    """(source_id, text) -> {scorer: row in `column`}."""


def _scores_by_candidate(scores: pa.Table | None) -> tuple[ScoreMap, _Spans]:
    found: ScoreMap = {}
    spans = _Spans()
    if scores is None:
        return found, spans
    scores = schema.validate(scores, schema.SCORES, what="scores")
    for sid, text, scorer, value in zip(*(scores.column(c).to_pylist() for c in
                                          ("source_id", "text", "scorer", "score")), strict=True):
        found.setdefault((sid, text), {})[scorer] = value
    error_spans = scores.column("error_spans")
    if error_spans.null_count < len(error_spans):  # without XCOMET, this test is all it costs
        with_spans = scores.filter(pc.is_valid(error_spans))
        spans.column = with_spans.column("error_spans")
        for row, (sid, text, scorer) in enumerate(zip(*(with_spans.column(c).to_pylist() for c in
                                                        ("source_id", "text", "scorer")),
                                                      strict=True)):
            spans.rows.setdefault((sid, text), {})[scorer] = row
    return found, spans


def _candidates_by_source(candidates: pa.Table | None, scores: ScoreMap
                          ) -> dict[str, list[_Candidate]]:
    found: dict[str, list[_Candidate]] = {}
    if candidates is None:
        return found
    candidates = schema.validate(candidates, schema.CANDIDATES, what="candidates")
    columns = (candidates.column(c).to_pylist() for c in ("source_id", "text", "systems"))
    for index, (sid, text, systems) in enumerate(zip(*columns, strict=True)):
        found.setdefault(sid, []).append(
            _Candidate(index, text, systems, scores.get((sid, text), {})))
    return found


class _Builder:
    """Collects triplets, drops and tallies for one selection run."""

    def __init__(self, config: SelectConfig, rank_by: str | None, spans: _Spans):
        self.config = config
        self.rank_by = rank_by
        self.spans = spans
        self.span_slots: list[tuple[dict, int]] = []
        """Score entries waiting for their spans, and the row in `spans.column` holding them."""
        self.triplets: list[dict] = []
        self.dropped = Drops()
        self.report = SelectReport()

    def score_list(self, source_id: str, candidate: _Candidate) -> list[dict]:
        """Every scorer's entry for one side; `error_spans` is null for scorers without spans,
        and filled by `fill_spans` for the others."""
        rows = self.spans.rows.get((source_id, candidate.text), {})
        entries = []
        for name in sorted(candidate.scores):
            entry = {"scorer": name, "score": candidate.scores[name], "error_spans": None}
            if name in rows:
                self.span_slots.append((entry, rows[name]))
            entries.append(entry)
        return entries

    def fill_spans(self) -> None:
        """Decode the spans the triplets need, in one `take`."""
        if not self.span_slots:
            return
        wanted = pa.array([row for _, row in self.span_slots], pa.int64())
        for (entry, _), spans in zip(self.span_slots, self.spans.column.take(wanted).to_pylist(),
                                     strict=True):
            entry["error_spans"] = spans
        self.span_slots = []

    def value(self, candidate: _Candidate, score: str) -> float:
        """The candidate's `score`, negated where lower is better: higher always ranks first."""
        raw = candidate.scores[score]
        return -raw if score in self.config.lower_is_better else raw

    def disagreeing_score(self, chosen: _Candidate, rejected: _Candidate) -> str | None:
        """With `agreement` on, the first score that does not put `chosen` strictly above
        `rejected`, said in words; None when they all do, or agreement is off."""
        config = self.config
        if not config.agreement:
            return None
        names = config.agreement_scores or sorted(set(chosen.scores) & set(rejected.scores))
        for name in names:
            if name not in chosen.scores or name not in rejected.scores:
                return f"no {name} score on both sides"
            if self.value(chosen, name) <= self.value(rejected, name):
                return (f"{name} says {chosen.scores[name]:.4g} vs "
                        f"{rejected.scores[name]:.4g}")
        return None

    def drop(self, source: dict, reason: str, detail: str | None) -> None:
        self.dropped.add(source["source_id"], source["lang_pair"], reason, detail)

    def pair(self, source: dict, chosen: _Candidate, rejected: _Candidate,
             selected_by: str) -> None:
        chosen_score = chosen.scores.get(self.rank_by) if self.rank_by else None
        rejected_score = rejected.scores.get(self.rank_by) if self.rank_by else None
        margin = None
        if chosen_score is not None and rejected_score is not None:
            margin = self.value(chosen, self.rank_by) - self.value(rejected, self.rank_by)
        noise = self.config.noise_thresholds.get(self.rank_by) if self.rank_by else None
        confidence = margin / noise if margin is not None and noise else None
        self.triplets.append({
            "id": triplet_id(source["source_id"], chosen.text, rejected.text),
            "source_id": source["source_id"],
            "lang_pair": source["lang_pair"],
            "src_lang": source["src_lang"],
            "tgt_lang": source["tgt_lang"],
            "src": source["src"],
            "prompt": render_prompt(self.config.prompt_template, source["src_lang"],
                                    source["tgt_lang"], source["src"]),
            "chosen": chosen.text,
            "rejected": rejected.text,
            "chosen_system": "+".join(chosen.systems),
            "rejected_system": "+".join(rejected.systems),
            "chosen_score": chosen_score,
            "rejected_score": rejected_score,
            "margin": margin,
            "confidence": confidence,
            "chosen_scores": self.score_list(source["source_id"], chosen),
            "rejected_scores": self.score_list(source["source_id"], rejected),
            "selected_by": selected_by,
        })
        report = self.report
        report.triplets += 1
        report.by_method[selected_by] = report.by_method.get(selected_by, 0) + 1
        for system in chosen.systems:
            report.chosen[system] = report.chosen.get(system, 0) + 1
        for system in rejected.systems:
            report.rejected[system] = report.rejected.get(system, 0) + 1


def select_triplets(sources: pa.Table, candidates: pa.Table | None, scores: pa.Table | None,
                    config: SelectConfig,
                    vetoed: Mapping[tuple[str, str], str] | None = None) -> Selection:
    """Triplets for every source that yields a pair, and a dropped row for everything else.

    `config.rank_by` is the score that ranks candidates; None means nothing was scored, so
    only human labels make pairs. A build passes `BuildConfig.selection`, which has both it
    and the reference's name resolved. `vetoed` maps (source_id, text) to the guard that
    vetoed that candidate (`cpo_data.guards`): it is never chosen.
    """
    rank_by = config.rank_by
    reference_name = config.reference_name or REFERENCE_NAME
    sources = schema.validate(sources, schema.SOURCES, what="sources")
    score_map, span_map = _scores_by_candidate(scores)
    by_source = _candidates_by_source(candidates, score_map)
    builder = _Builder(config, rank_by, span_map)
    for source in sources.to_pylist():
        builder.report.sources += 1
        labelled = source["human_preferred"] is not None
        if labelled and rank_by is not None:
            _tally_agreement(builder.report.agreement, source, score_map, rank_by,
                             rank_by in config.lower_is_better)
        if labelled and config.use_human_labels:
            _pair_by_label(builder, source, score_map)
        elif rank_by is None:
            builder.drop(source, NO_HUMAN_LABEL, "nothing is scored, so only labelled sources "
                         "make pairs" if config.use_human_labels else "use_human_labels is off "
                         "and nothing is scored")
        else:
            _pair_by_score(builder, source, by_source.get(source["source_id"], []),
                           rank_by, reference_name, vetoed or {})
    builder.fill_spans()
    builder.report.dropped = builder.dropped.counts()
    return Selection(
        triplets=pa.Table.from_pylist(builder.triplets, schema=schema.TRIPLETS),
        dropped=builder.dropped.table(),
        report=builder.report,
    )


def _labelled_texts(source: dict) -> tuple[str, str]:
    outputs = {s["system"]: s["text"].strip() for s in source["systems"]}
    return outputs[source["human_preferred"]], outputs[source["human_dispreferred"]]


def _tally_agreement(agreement: LabelAgreement, source: dict, score_map: ScoreMap,
                     rank_by: str, lower_is_better: bool) -> None:
    agreement.labelled += 1
    preferred, dispreferred = _labelled_texts(source)
    sid = source["source_id"]
    good = score_map.get((sid, preferred), {}).get(rank_by)
    bad = score_map.get((sid, dispreferred), {}).get(rank_by)
    if good is None or bad is None:
        return
    agreement.compared += 1
    if lower_is_better:
        good, bad = -good, -bad
    if good > bad:
        agreement.agree += 1
    elif good == bad:
        agreement.ties += 1


def _pair_by_label(builder: _Builder, source: dict, score_map: ScoreMap) -> None:
    preferred, dispreferred = _labelled_texts(source)
    good_system, bad_system = source["human_preferred"], source["human_dispreferred"]
    if preferred == dispreferred:
        builder.drop(source, IDENTICAL_TEXTS, f"{good_system} and {bad_system} gave the same text")
        return
    sid = source["source_id"]
    # Index -1: a labelled pair is not ranked, so it needs no table position.
    good = _Candidate(-1, preferred, [good_system], score_map.get((sid, preferred), {}))
    bad = _Candidate(-1, dispreferred, [bad_system], score_map.get((sid, dispreferred), {}))
    builder.pair(source, good, bad, "human_label")


def _pair_by_score(builder: _Builder, source: dict, candidates: list[_Candidate], rank_by: str,
                   reference_name: str, vetoed: Mapping[tuple[str, str], str]) -> None:
    config = builder.config
    excluded = set(config.exclude_systems)
    ranked: list[_Candidate] = []
    for candidate in candidates:
        systems = [s for s in candidate.systems if s not in excluded]
        if not systems:
            continue  # configured away, not lost: no drop row
        if rank_by not in candidate.scores:
            builder.drop(source, SCORE_MISSING, f"{'+'.join(systems)}: no {rank_by} score")
            continue
        ranked.append(_Candidate(candidate.index, candidate.text, systems, candidate.scores))
    if not ranked:
        builder.drop(source, NO_CANDIDATE, f"no candidate has a {rank_by} score"
                     if candidates else "no candidate")
        return
    if len(ranked) == 1:
        only = ranked[0]
        if len(only.systems) > 1:
            builder.drop(source, IDENTICAL_TEXTS,
                         f"{' and '.join(only.systems)} gave the same text")
        else:
            builder.drop(source, SINGLE_CANDIDATE, f"only {only.systems[0]} has a candidate")
        return

    def is_reference(candidate: _Candidate) -> bool:
        return reference_name in candidate.systems

    def veto(candidate: _Candidate) -> str | None:
        return vetoed.get((source["source_id"], candidate.text))

    def may_reject(candidate: _Candidate) -> bool:
        guard = veto(candidate)
        return ((config.reference_may_be_rejected or not is_reference(candidate))
                and (guard is None or guard in CHOSEN_ONLY or config.vetoed_may_be_rejected))

    value = builder.value
    best_first = sorted(ranked, key=lambda c: (-value(c, rank_by), c.index))
    choosable = [c for c in best_first
                 if (config.reference_may_be_chosen or not is_reference(c)) and veto(c) is None]
    if not choosable:
        guards = sorted({g for g in map(veto, ranked) if g is not None})
        if guards:
            builder.drop(source, ALL_VETOED, f"every candidate that could be chosen was "
                         f"vetoed ({', '.join(guards)})")
        else:
            builder.drop(source, SINGLE_CANDIDATE, "only the reference, which may not be "
                         "chosen")
        return
    rejectable = [c for c in reversed(best_first) if may_reject(c)]
    if config.pairs != "all_above_margin":
        choosable = choosable[:1]  # the best only
    candidates_pairs = sorted(
        ((chosen, rejected) for chosen in choosable for rejected in rejectable
         if value(rejected, rank_by) < value(chosen, rank_by)),
        key=lambda pair: (value(pair[1], rank_by) - value(pair[0], rank_by), pair[0].index,
                          pair[1].index))  # largest margin first, then table order
    if not candidates_pairs:
        _drop_unpairable(builder, source, choosable[0], rejectable, rank_by)
        return
    if config.pairs == "best_vs_worst":
        candidates_pairs = candidates_pairs[:1]
    floor = config.margin_floor
    kept, noisy, disagreeing = [], [], []
    for chosen, rejected in candidates_pairs:
        margin = value(chosen, rank_by) - value(rejected, rank_by)
        if margin < floor:
            noisy.append((chosen, rejected, margin))
        elif (against := builder.disagreeing_score(chosen, rejected)) is not None:
            disagreeing.append((chosen, rejected, against))
        else:
            kept.append((chosen, rejected))
    if noisy:
        chosen, rejected, margin = noisy[0]
        builder.drop(source, WITHIN_NOISE, f"{_count_pairs(noisy)}, the widest "
                     f"{_names(chosen)} vs {_names(rejected)}: {rank_by} margin {margin:.4g} < "
                     f"{floor:g}")
    if disagreeing:
        chosen, rejected, against = disagreeing[0]
        builder.drop(source, SCORERS_DISAGREE, f"{_count_pairs(disagreeing)}, the first "
                     f"{_names(chosen)} vs {_names(rejected)}: {against}")
    for chosen, rejected in kept[: config.pairs_per_source]:
        builder.pair(source, chosen, rejected, "score")


def _names(candidate: _Candidate) -> str:
    return "+".join(candidate.systems)


def _count_pairs(pairs: list) -> str:
    return "1 pair" if len(pairs) == 1 else f"{len(pairs)} pairs"


def _drop_unpairable(builder: _Builder, source: dict, best: _Candidate,
                     rejectable: list[_Candidate], rank_by: str) -> None:
    """Why no candidate that may be rejected ranks below one that may be chosen."""
    others = [c for c in rejectable if c is not best]
    if not others:
        builder.drop(source, SINGLE_CANDIDATE,
                     f"only {_names(best)} and candidates that may not be rejected "
                     "(the reference, or vetoed ones)")
    elif all(builder.value(c, rank_by) == builder.value(best, rank_by) for c in others):
        builder.drop(source, TIED_SCORES, f"{len(others) + 1} candidates tie at "
                     f"{rank_by} {best.scores[rank_by]:.4g}")
    else:
        builder.drop(source, TIED_SCORES, f"no candidate that may be rejected scores below "
                     f"{_names(best)} ({rank_by} {best.scores[rank_by]:.4g}); those above it "
                     "may not be chosen")


def system_counts(report: SelectReport) -> list[dict]:
    """Per system: how often chosen and rejected, as ALMA-R's Table 2 counts them."""
    systems = Counter(report.chosen) + Counter(report.rejected)
    return [{"system": s, "chosen": report.chosen.get(s, 0),
             "rejected": report.rejected.get(s, 0)} for s in sorted(systems)]
