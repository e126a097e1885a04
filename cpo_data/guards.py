"""Candidate guards: vetoes that run after generation and before ranking, whatever the score.

Quality estimation is known to reward some broken outputs: a copy of the source can outscore a
real translation, a looping generation can keep a high score. A candidate that a guard vetoes is
never the chosen side (and the rejected side only with `select.vetoed_may_be_rejected`), and
each veto is a row of the dropped table: its reason is the guard's name, its detail says which
system's candidate and why. The reference is not checked: it is the data's own translation.

- `copy_of_source`: the normalised candidate is (nearly) the normalised source.
- `off_target`: language ID (`cpo_data.langid`) names another language than the target.
- `length_ratio`: candidate characters / source characters outside the direction's window,
  learned from the data's references where there are enough, else `default_window`.
- `repetition`: an n-gram occurs far more often than in the source.
"""

from __future__ import annotations

import difflib
import statistics
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from cpo_data import schema
from cpo_data.config_guards import GuardsConfig, LengthGuard
from cpo_data.drops import Drops

COPY_OF_SOURCE = "copy_of_source"
OFF_TARGET = "off_target"
LENGTH_RATIO = "length_ratio"
REPETITION = "repetition"

CJK = {"zh", "ja", "ko"}
"""Targets written without spaces between words, and much shorter in characters."""


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


def normalise(text: str) -> str:
    """Case-folded letters and digits only: punctuation and spacing do not make a copy new."""
    return "".join(c for c in text.casefold() if c.isalnum())


def is_copy(source: str, candidate: str, guard) -> bool:  # noqa: ANN001 - a CopyGuard
    src, mt = normalise(source), normalise(candidate)
    if len(src) < guard.min_chars:
        return False
    if src == mt:
        return True
    matcher = difflib.SequenceMatcher(None, src, mt, autojunk=False)
    # quick_ratio bounds ratio from above, so most real translations stop there.
    return matcher.quick_ratio() >= guard.min_similarity and (
        matcher.ratio() >= guard.min_similarity)


def default_window(src_lang: str, tgt_lang: str) -> tuple[float, float]:
    """Character-length windows (target / source) for directions without enough references:
    wide enough for any ordinary translation, narrow enough to catch a dropped or doubled
    sentence. A CJK target takes far fewer characters than a Latin or Cyrillic source."""
    if tgt_lang in CJK and src_lang not in CJK:
        return (0.1, 1.5)
    if src_lang in CJK and tgt_lang not in CJK:
        return (0.7, 10.0)
    return (0.3, 3.5)


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def length_windows(sources: list[dict], guard: LengthGuard) -> dict[str, tuple[float, float]]:
    """Per direction: the configured window, else one learned from the references' ratios, else
    the built-in table."""
    ratios: dict[str, list[float]] = {}
    for row in sources:
        if row["ref"] and len(row["src"]) >= guard.min_chars:
            ratios.setdefault(row["lang_pair"], []).append(len(row["ref"]) / len(row["src"]))
    windows = {}
    for row in sources:
        pair = row["lang_pair"]
        if pair in windows:
            continue
        if pair in guard.windows:
            windows[pair] = tuple(guard.windows[pair])
        elif len(ratios.get(pair, [])) >= guard.learn_from:
            found = ratios[pair]
            windows[pair] = (_quantile(found, 0.005) / guard.slack,
                             _quantile(found, 0.995) * guard.slack)
        else:
            windows[pair] = default_window(row["src_lang"], row["tgt_lang"])
    return windows


def _units(text: str, lang: str) -> list[str]:
    return list(text.replace(" ", "")) if lang in CJK else text.split()


def most_repeated(text: str, source: str, lang: str, n: int) -> tuple[str, int]:
    """The n-gram that occurs most often in `text` beyond its count in `source` (characters
    for CJK, where n doubles), and that excess."""
    size = 2 * n if lang in CJK else n
    units = _units(text, lang)
    grams = Counter(tuple(units[i:i + size]) for i in range(len(units) - size + 1))
    if not grams:
        return "", 0
    src_units = _units(source, lang)
    in_source = Counter(tuple(src_units[i:i + size]) for i in range(len(src_units) - size + 1))
    gram, excess = max(((g, c - in_source[g]) for g, c in grams.items()), key=lambda x: x[1])
    return ("" if lang in CJK else " ").join(gram), excess


def check_candidates(sources: pa.Table, candidates: pa.Table | None, config: GuardsConfig,
                     reference_name: str) -> Vetoes:
    """Run every enabled guard on every candidate that is not the reference."""
    vetoes = Vetoes()
    enabled = (config.copy_of_source, config.off_target, config.length_ratio, config.repetition)
    if candidates is None or not candidates.num_rows or not any(g.enabled for g in enabled):
        return vetoes
    rows = schema.validate(sources, schema.SOURCES, what="sources").to_pylist()
    by_id = {row["source_id"]: row for row in rows}
    checked = [(by_id[c["source_id"]], c) for c in
               schema.validate(candidates, schema.CANDIDATES, what="candidates").to_pylist()
               if reference_name not in c["systems"] and c["source_id"] in by_id]
    if config.length_ratio.enabled:
        vetoes.windows = length_windows(rows, config.length_ratio)
    if config.off_target.enabled:
        from cpo_data import langid

        vetoes.languages = langid.language_set(
            {lang for row in rows for lang in (row["src_lang"], row["tgt_lang"])},
            config.off_target.extra_languages)
        texts = list(dict.fromkeys(
            c["text"] for source, c in checked
            if _checkable(c["text"], source["tgt_lang"], config.off_target, vetoes.languages)))
        vetoes.identified = dict(zip(texts, langid.identify_many(texts, vetoes.languages),
                                     strict=True))
    for source, candidate in checked:
        found = _first_veto(source, candidate["text"], config, vetoes)
        if found is not None:
            guard, detail = found
            vetoes.by_candidate[(source["source_id"], candidate["text"])] = guard
            vetoes.dropped.add(source["source_id"], source["lang_pair"], guard,
                               f"{'+'.join(candidate['systems'])}: {detail}")
    return vetoes


def _checkable(text: str, target: str, guard, languages: frozenset[str]) -> bool:  # noqa: ANN001
    """Whether language ID can judge `text`: a target it knows, and enough letters (a third as
    many for Chinese, Japanese and Korean, whose characters carry more)."""
    letters = sum(c.isalpha() for c in text)
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


def _first_veto(source: dict, text: str, config: GuardsConfig,
                vetoes: Vetoes) -> tuple[str, str] | None:
    src = source["src"]
    if config.copy_of_source.enabled and is_copy(src, text, config.copy_of_source):
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
    if repetition.enabled:
        gram, excess = most_repeated(text, src, source["tgt_lang"], repetition.n)
        if excess > repetition.max_repeats:
            return REPETITION, f"{gram!r} repeated {excess} more times than in the source"
    return None
