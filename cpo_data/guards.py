"""Candidate guards: vetoes that run after generation and before ranking, whatever the score.

Quality estimation is known to reward some broken outputs: a copy of the source can outscore a
real translation, a looping generation can keep a high score. A candidate that a guard vetoes is
never the chosen side (and the rejected side only with `select.vetoed_may_be_rejected`, or when
its guard is in `CHOSEN_ONLY`), and each veto is a row of the dropped table: its reason is the
guard's name, its detail says which system's candidate and why. The reference is not checked:
it is the data's own translation.

- `truncated_generation`: the generator stopped at `max_new_tokens` without ending (the
  candidates' `stopped_at_limit`); provided outputs are not checked.
- `copy_of_source`: the normalised candidate is (nearly) the normalised source.
- `off_target`: language ID (`cpo_data.langid`) names another language than the target.
- `length_ratio`: candidate characters / source characters outside the direction's window,
  learned from the data's references where there are enough, else `default_window`.
- `repetition`: an n-gram occurs far more often than in the source.
- `critical_error`: a scorer with error spans (XCOMET) found one of at least `min_severity`;
  it vetoes the chosen side only.
"""

from __future__ import annotations

import difflib
import json
import statistics
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from cpo_data import schema
from cpo_data.config_guards import SEVERITIES, CriticalErrorGuard, GuardsConfig, LengthGuard
from cpo_data.drops import Drops
from cpo_data.errors import UserError

COPY_OF_SOURCE = "copy_of_source"
OFF_TARGET = "off_target"
LENGTH_RATIO = "length_ratio"
REPETITION = "repetition"
TRUNCATED_GENERATION = "truncated_generation"
CRITICAL_ERROR = "critical_error"
NAMES = (COPY_OF_SOURCE, OFF_TARGET, LENGTH_RATIO, REPETITION, TRUNCATED_GENERATION,
         CRITICAL_ERROR)
"""Every guard, as its veto reason and its `guards:` key."""
CHOSEN_ONLY = frozenset({CRITICAL_ERROR})
"""Guards that veto only the chosen side: such a candidate may still be rejected."""

CJK = {"zh", "ja", "ko"}
"""Targets written without spaces between words, and much shorter in characters."""


class GuardError(UserError):
    """Guards configured in a way the build's tables cannot serve; the message names the key."""


@dataclass
class Vetoes:
    """What the guards vetoed: (source_id, text) -> guard name, and the dropped rows."""

    by_candidate: dict[tuple[str, str], str] = field(default_factory=dict)
    dropped: Drops = field(default_factory=Drops)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """The length window each direction was checked with."""
    languages: frozenset[str] = frozenset()
    """The languages `off_target` told apart."""
    identified: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    """Language ID of each candidate text `off_target` checks, found in one parallel batch."""
    checked: int = 0
    """Candidates the guards looked at (all but the reference's)."""


def normalise(text: str) -> str:
    """Case-folded letters and digits only: punctuation and spacing do not make a copy new."""
    return "".join(filter(str.isalnum, text.casefold()))


def is_copy(source: str, candidate: str, guard) -> bool:  # noqa: ANN001 - a CopyGuard
    return _is_copy(normalise(source), normalise(candidate), guard)


def _is_copy(src: str, mt: str, guard, src_chars: Counter | None = None  # noqa: ANN001
             ) -> bool:
    """`is_copy` of normalised texts; `src_chars`: Counter(src), kept by a caller that checks
    several candidates of the source. difflib's ratio is 2 * matching characters / both
    lengths, and two cheap upper bounds of it (difflib's real_quick_ratio: the shorter length
    matches at best; quick_ratio: the characters in common, in any order) stop nearly every
    real translation before a SequenceMatcher is built. Same formula, same floats as difflib's,
    so the same answers."""
    if len(src) < guard.min_chars:
        return False
    if src == mt:
        return True
    total = len(src) + len(mt)
    if 2.0 * min(len(src), len(mt)) / total < guard.min_similarity:
        return False
    common = (Counter(src) if src_chars is None else src_chars) & Counter(mt)
    if 2.0 * sum(common.values()) / total < guard.min_similarity:
        return False
    return difflib.SequenceMatcher(None, src, mt, autojunk=False).ratio() >= guard.min_similarity


def default_window(src_lang: str, tgt_lang: str) -> tuple[float, float]:
    """Character-length windows (target / source) for directions without enough references:
    wide enough for any ordinary translation, narrow enough to catch a dropped or doubled
    sentence. A CJK target takes far fewer characters than a Latin or Cyrillic source."""
    if tgt_lang in CJK and src_lang not in CJK:
        return (0.1, 1.5)
    if src_lang in CJK and tgt_lang not in CJK:
        return (0.7, 10.0)
    return (0.3, 3.5)


def _quantile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def length_windows(sources: list[dict], guard: LengthGuard) -> dict[str, tuple[float, float]]:
    """Per direction: the configured window, else one learned from the references' ratios, else
    the built-in table."""
    ratios = _Ratios(guard)
    for row in sources:
        ratios.add(row)
    return ratios.windows()


class _Ratios:
    """The references' length ratios per direction, gathered source by source (8 bytes each)."""

    def __init__(self, guard: LengthGuard):
        self.guard = guard
        self.found: dict[str, array] = {}
        self.directions: dict[str, tuple[str, str]] = {}
        """Each direction's languages, in the order first seen."""

    def add(self, row: dict) -> None:
        pair = row["lang_pair"]
        self.directions.setdefault(pair, (row["src_lang"], row["tgt_lang"]))
        if row["ref"] and len(row["src"]) >= self.guard.min_chars:
            self.found.setdefault(pair, array("d")).append(len(row["ref"]) / len(row["src"]))

    def windows(self) -> dict[str, tuple[float, float]]:
        guard, windows = self.guard, {}
        for pair, (src_lang, tgt_lang) in self.directions.items():
            found = self.found.get(pair, ())
            if pair in guard.windows:
                windows[pair] = tuple(guard.windows[pair])
            elif len(found) >= guard.learn_from:
                windows[pair] = (_quantile(found, 0.005) / guard.slack,
                                 _quantile(found, 0.995) * guard.slack)
            else:
                windows[pair] = default_window(src_lang, tgt_lang)
        return windows


def _units(text: str, lang: str) -> list[str]:
    return list(text.replace(" ", "")) if lang in CJK else text.split()


def _ngrams(text: str, lang: str, n: int) -> Counter:
    """Counts of the n-grams of `text` (of characters for CJK, where n doubles), first seen
    first: zipping the shifted unit lists (stopping at the shortest) gives the same tuples as
    slicing, at C speed."""
    size = 2 * n if lang in CJK else n
    units = _units(text, lang)
    return Counter(zip(*(units[i:] for i in range(size)), strict=False))


def most_repeated(text: str, source: str, lang: str, n: int) -> tuple[str, int]:
    """The n-gram that occurs most often in `text` beyond its count in `source` (characters
    for CJK, where n doubles), and that excess."""
    grams = _ngrams(text, lang, n)
    if not grams:
        return "", 0
    in_source = _ngrams(source, lang, n)
    gram, excess = max(((g, c - in_source[g]) for g, c in grams.items()), key=lambda x: x[1])
    return ("" if lang in CJK else " ").join(gram), excess


def worst_spans(scores: pa.Table, guard: CriticalErrorGuard
                ) -> dict[tuple[str, str], tuple[str, dict]]:
    """Per candidate (source_id, text): the scorer and the most severe error span (then the most
    confident) of at least the guard's severity and confidence, among the scorers it reads.
    Severities other than XCOMET's three are not ranked, so they never veto."""
    table = schema.validate(scores, schema.SCORES, what="scores")
    if guard.scorers:
        present = set(table.column("scorer").to_pylist())
        unknown = sorted(set(guard.scorers) - present)
        if unknown and table.num_rows:
            raise GuardError(f"guards.critical_error.scorers: {unknown} not among the scores "
                             f"(they have {sorted(present)})")
        table = table.filter(pc.is_in(table["scorer"], pa.array(list(guard.scorers))))
    table = table.filter(pc.is_valid(table["error_spans"]))
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    least = rank[guard.min_severity]
    found: dict[tuple[str, str], tuple[str, dict]] = {}

    def weight(span: dict) -> tuple[int, float]:
        return rank.get(span["severity"], -1), span["confidence"] or 0.0

    for row in table.select(["source_id", "text", "scorer", "error_spans"]).to_pylist():
        key = (row["source_id"], row["text"])
        for span in row["error_spans"]:
            severity, confidence = weight(span)
            if severity < least or confidence < guard.min_confidence:
                continue
            if key not in found or (severity, confidence) > weight(found[key][1]):
                found[key] = (row["scorer"], span)
    return found


@dataclass(frozen=True)
class Context:
    """What the guards learn from the whole dataset before checking any part of it: each
    direction's length window and the languages `off_target` tells apart. A build checks
    shard by shard with one context, so a shard's vetoes do not depend on the shard size."""

    windows: dict[str, tuple[float, float]]
    languages: frozenset[str]


class ContextBuilder:
    """`dataset_context` learned part by part, so a build need not hold its sources whole: the
    same context for a table as for its consecutive parts."""

    def __init__(self, config: GuardsConfig):
        self.config = config
        self.ratios = _Ratios(config.length_ratio)
        self.languages: set[str] = set()

    def add(self, sources: pa.Table) -> None:
        config = self.config
        if not (config.length_ratio.enabled or config.off_target.enabled):
            return
        columns = ["lang_pair", "src_lang", "tgt_lang", "src", "ref"]
        rows = schema.validate(sources, schema.SOURCES, what="sources").select(columns)
        if config.length_ratio.enabled:
            for row in rows.to_pylist():
                self.ratios.add(row)
        for name in ("src_lang", "tgt_lang"):
            self.languages.update(pc.unique(rows.column(name)).to_pylist())

    def context(self) -> Context:
        config = self.config
        if not (config.length_ratio.enabled or config.off_target.enabled):
            return Context({}, frozenset())
        windows = self.ratios.windows() if config.length_ratio.enabled else {}
        languages: frozenset[str] = frozenset()
        if config.off_target.enabled:
            from cpo_data import langid

            languages = langid.language_set(self.languages, config.off_target.extra_languages)
        return Context(windows, languages)


def dataset_context(sources: pa.Table, config: GuardsConfig) -> Context:
    """The guards' context for every source in `sources`."""
    builder = ContextBuilder(config)
    builder.add(sources)
    return builder.context()


def check_candidates(sources: pa.Table, candidates: pa.Table | None, config: GuardsConfig,
                     reference_name: str, scores: pa.Table | None = None,
                     context: Context | None = None) -> Vetoes:
    """Run every enabled guard on every candidate that is not the reference; `critical_error`
    reads the error spans in `scores` (without them it finds nothing). `context` (from
    `dataset_context` over the whole dataset, when `sources` is a part of it) defaults to
    that of `sources` itself."""
    vetoes = Vetoes()
    enabled = (config.copy_of_source, config.off_target, config.length_ratio, config.repetition,
               config.truncated_generation, config.critical_error)
    if candidates is None or not candidates.num_rows or not any(g.enabled for g in enabled):
        return vetoes
    # Rows as dicts cost more than some guards' checks: only the columns the guards read.
    rows = schema.validate(sources, schema.SOURCES, what="sources").select(
        ["source_id", "lang_pair", "src_lang", "tgt_lang", "src", "ref"]).to_pylist()
    by_id = {row["source_id"]: row for row in rows}
    checked = [(by_id[c["source_id"]], c) for c in
               schema.validate(candidates, schema.CANDIDATES, what="candidates").select(
                   ["source_id", "text", "systems", "decoding", "stopped_at_limit"]).to_pylist()
               if reference_name not in c["systems"] and c["source_id"] in by_id]
    if context is None:
        context = dataset_context(sources, config)
    vetoes.windows, vetoes.languages = context.windows, context.languages
    if config.off_target.enabled:
        from cpo_data import langid

        # A cut generation is vetoed as truncated_generation before off_target would look at
        # it, and such texts (often long loops) are the dearest to identify: not identified.
        truncated = config.truncated_generation.enabled
        texts = list(dict.fromkeys(
            c["text"] for source, c in checked
            if not (truncated and c["stopped_at_limit"])
            and _checkable(c["text"], source["tgt_lang"], config.off_target, vetoes.languages)))
        vetoes.identified = dict(zip(texts, langid.identify_many(texts, vetoes.languages),
                                     strict=True))
    spans = (worst_spans(scores, config.critical_error)
             if config.critical_error.enabled and scores is not None else {})
    vetoes.checked = len(checked)
    copy_work: dict[str, tuple[str, Counter]] = {}
    for source, candidate in checked:
        found = _first_veto(source, candidate, config, vetoes, spans, copy_work)
        if found is not None:
            guard, detail = found
            vetoes.by_candidate[(source["source_id"], candidate["text"])] = guard
            vetoes.dropped.add(source["source_id"], source["lang_pair"], guard,
                               f"{'+'.join(candidate['systems'])}: {detail}")
    return vetoes


def _checkable(text: str, target: str, guard, languages: frozenset[str]) -> bool:  # noqa: ANN001
    """Whether language ID can judge `text`: a target it knows, and enough letters (a third as
    many for Chinese, Japanese and Korean, whose characters carry more)."""
    letters = sum(map(str.isalpha, text))
    return target in languages and letters >= (
        -(-guard.min_letters // 3) if target in CJK else guard.min_letters)


def off_target(text: str, target: str, guard, languages: frozenset[str],  # noqa: ANN001
               identified: dict[str, tuple[str | None, float]] | None = None
               ) -> tuple[str, float] | None:
    """(language, confidence) when language ID names another language than `target` with at
    least the guard's confidence; None otherwise, or when the text is too short to tell, or
    the target is a language the detector does not know. `identified` holds results found
    beforehand (`langid.identify_many`)."""
    from cpo_data import langid

    if not _checkable(text, target, guard, languages):
        return None
    found = (identified or {}).get(text)
    language, confidence = found if found is not None else langid.identify(text, languages)
    if language is None or language == target or confidence < guard.min_confidence:
        return None
    return language, confidence


def _stopped_detail(candidate: dict) -> str:
    limit = json.loads(candidate["decoding"] or "{}").get("max_new_tokens")
    return f"stopped at max_new_tokens{f' ({limit})' if limit else ''} without EOS"


def _first_veto(source: dict, candidate: dict, config: GuardsConfig, vetoes: Vetoes,
                spans: dict[tuple[str, str], tuple[str, dict]],
                copy_work: dict[str, tuple[str, Counter]]) -> tuple[str, str] | None:
    """The first guard that vetoes the candidate, and why. A cut generation is named as such
    before the checks it often trips as well (length, repetition); `critical_error` comes last
    because it alone leaves the candidate rejectable: a candidate another guard vetoes too is
    not. `copy_work` keeps each source's normalised text and its characters' counts for the
    source's next candidates."""
    src, text = source["src"], candidate["text"]
    if config.truncated_generation.enabled and candidate["stopped_at_limit"]:
        return TRUNCATED_GENERATION, _stopped_detail(candidate)
    if config.copy_of_source.enabled:
        if src not in copy_work:
            normalised = normalise(src)
            copy_work[src] = normalised, Counter(normalised)
        normalised, chars = copy_work[src]
        if _is_copy(normalised, normalise(text), config.copy_of_source, chars):
            return COPY_OF_SOURCE, "the candidate is the source, (nearly) unchanged"
    if config.off_target.enabled:
        found = off_target(text, source["tgt_lang"], config.off_target, vetoes.languages,
                           vetoes.identified)
        if found is not None:
            return OFF_TARGET, (f"language ID says {found[0]} ({found[1]:.2f}), not "
                                f"{source['tgt_lang']}")
    length = config.length_ratio
    if length.enabled and len(src) >= length.min_chars:
        low, high = vetoes.windows[source["lang_pair"]]
        ratio = len(text) / len(src)
        if not low <= ratio <= high:
            return LENGTH_RATIO, (f"{len(text)} characters for a source of {len(src)}: ratio "
                                  f"{ratio:.2f} outside [{low:.2f}, {high:.2f}]")
    repetition = config.repetition
    # An n-gram exceeds its count in the source by at most its count in the candidate: a
    # candidate with no n-gram that frequent cannot be vetoed, and its source is not counted.
    if repetition.enabled and max(_ngrams(text, source["tgt_lang"], repetition.n).values(),
                                  default=0) > repetition.max_repeats:
        gram, excess = most_repeated(text, src, source["tgt_lang"], repetition.n)
        if excess > repetition.max_repeats:
            return REPETITION, f"{gram!r} repeated {excess} more times than in the source"
    found = spans.get((source["source_id"], text))
    if found is not None:
        scorer, span = found
        return CRITICAL_ERROR, (f"{scorer} found a {span['severity']} error in "
                                f"{span['text']!r} (confidence {span['confidence'] or 0:.2f})")
    return None
