"""Language identification for the `off_target` guard: lingua's models, inside its package.

lingua-language-detector was measured against py3langid, langid and langdetect on the demo
corpus and short segments (bench/README.md): the most accurate on short text of those that
install beside our numpy pin, with no dependencies and no download. A detector is built once
per process and language set (Dask workers are processes: once each).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

DEFAULT_LANGUAGES = ("en", "de", "fr", "es", "zh", "ru", "ja", "cs")
"""Compared besides the build's own languages: the source's and the target's, and the
languages a model most often drifts into (English first)."""


@functools.lru_cache(maxsize=1)
def supported() -> frozenset[str]:
    """The ISO 639-1 codes lingua knows."""
    from lingua import Language

    return frozenset(language.iso_code_639_1.name.lower() for language in Language.all())


@functools.lru_cache(maxsize=4)
def _detector(languages: frozenset[str]):  # noqa: ANN202 - lingua's LanguageDetector
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = [getattr(IsoCode639_1, code.upper()) for code in sorted(languages)]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def language_set(build_languages: Iterable[str], extra: Iterable[str] = ()) -> frozenset[str]:
    """The languages to tell apart: the build's, the defaults and `extra`, those lingua has."""
    wanted = {*build_languages, *DEFAULT_LANGUAGES, *extra}
    return frozenset(code for code in wanted if code in supported())


def _top(values) -> tuple[str | None, float]:  # noqa: ANN001 - lingua's confidence values
    if not values or values[0].value == 0.0:
        return None, 0.0
    return values[0].language.iso_code_639_1.name.lower(), values[0].value


def identify(text: str, languages: frozenset[str]) -> tuple[str | None, float]:
    """The most likely of `languages` for `text` and its confidence (0-1); (None, 0.0) for a
    text without letters (numbers, punctuation), which no language explains."""
    return _top(_detector(languages).compute_language_confidence_values(text))


def identify_many(texts: list[str], languages: frozenset[str]) -> list[tuple[str | None, float]]:
    """`identify` for each text, on every core (lingua's parallel batch)."""
    if not texts:
        return []
    batch = _detector(languages).compute_language_confidence_values_in_parallel(texts)
    return [_top(values) for values in batch]
