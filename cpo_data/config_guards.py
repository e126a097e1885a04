"""The guards' config: which checks veto a candidate before QE ranks it, and their thresholds.

Quality estimation rewards some broken outputs (a copy of the source, a runaway repetition can
outscore a real translation), so each guard names a way a candidate can be wrong whatever its
score. Each is on by default with settings that leave ordinary translations alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cpo_data.fields import _check_at_least, _check_choice, _fail

SEVERITIES = ("minor", "major", "critical")
"""XCOMET's error-span severities, least severe first."""


@dataclass(frozen=True)
class CopyGuard:
    """`copy_of_source`: the candidate is (nearly) the source itself."""

    enabled: bool = True
    min_similarity: float = 0.9
    """Character similarity (difflib's ratio, 0-1) of the normalised texts at which a
    candidate counts as a copy; normalised: case-folded, punctuation and spacing removed."""
    min_chars: int = 20
    """Sources shorter than this (normalised) are not checked: names, numbers and short
    phrases are legitimately the same in both languages."""

    def __post_init__(self) -> None:
        if not 0 < self.min_similarity <= 1:
            _fail("min_similarity", "must be in (0, 1]")
        _check_at_least(self, 0, "min_chars")


@dataclass(frozen=True)
class OffTargetGuard:
    """`off_target`: language ID says the candidate is in another language than the target."""

    enabled: bool = True
    min_confidence: float = 0.5
    """The other language's confidence (0-1) at which the candidate is vetoed. Not higher:
    lingua spreads probability over related languages (German, Dutch), so at 0.9 it caught
    only 80% of copied sources."""
    min_letters: int = 15
    """Candidates with fewer letters are not checked (Chinese, Japanese, Korean targets: a
    third of this): below it language ID is unreliable (96% at 10-14 letters, 70% at 1-4)."""
    extra_languages: tuple[str, ...] = ()
    """Languages to tell apart besides the build's own and `cpo_data.langid.DEFAULT_LANGUAGES`
    (ISO 639-1 codes)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_confidence <= 1:
            _fail("min_confidence", "must be in (0, 1]")
        _check_at_least(self, 1, "min_letters")


@dataclass(frozen=True)
class LengthGuard:
    """`length_ratio`: the candidate's length (characters) over the source's is outside the
    direction's window."""

    enabled: bool = True
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per direction (`en-de: [0.8, 1.6]`), overriding the window learned from the data."""
    learn_from: int = 50
    """A direction with at least this many references learns its window from their ratios
    (their 0.5% and 99.5% quantiles, widened by `slack`); others use the built-in table."""
    slack: float = 1.5
    """How far beyond the references' range a candidate may go: the low quantile is divided
    by it, the high one multiplied."""
    min_chars: int = 10
    """Sources shorter than this are not checked: their ratios say little."""

    def __post_init__(self) -> None:
        for pair, window in self.windows.items():
            if len(window) != 2 or not 0 < window[0] < window[1]:
                _fail(f"windows.{pair}", f"expected [low, high] with 0 < low < high, got "
                      f"{list(window)}")
        _check_at_least(self, 1, "learn_from")
        _check_at_least(self, 0, "min_chars")
        if self.slack < 1:
            _fail("slack", "must be at least 1")


@dataclass(frozen=True)
class RepetitionGuard:
    """`repetition`: a word n-gram (characters for Chinese and Japanese) occurs far more often
    than in the source: a generation that loops."""

    enabled: bool = True
    n: int = 3
    """Length of the n-grams counted, in words."""
    max_repeats: int = 4
    """A candidate whose most frequent n-gram occurs more than this many times more than the
    same n-gram does in the source is vetoed."""

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "n", "max_repeats")


@dataclass(frozen=True)
class TruncatedGuard:
    """`truncated_generation`: the generator stopped at `max_new_tokens` without ending the
    translation (no end-of-sequence token): the text is cut, however fluent its start reads to
    QE. Provided outputs, and generations cached before the flag existed, are not checked."""

    enabled: bool = True


@dataclass(frozen=True)
class CriticalErrorGuard:
    """`critical_error`: a scorer with error spans (XCOMET) found a critical error in the
    candidate, which its sentence score can still rank first (one wrong number, one dropped
    negation in a fluent sentence). Only the chosen side is vetoed: as the rejected side the
    candidate shows exactly what not to write (`cpo_data.guards.CHOSEN_ONLY`)."""

    enabled: bool = True
    min_severity: str = "critical"
    """The least severe span that vetoes: minor, major or critical."""
    min_confidence: float = 0.0
    """A span vetoes only with at least this confidence (0-1); 0: every span of that
    severity."""
    scorers: tuple[str, ...] = ()
    """The scorers whose spans count (score names); empty: every scorer that gives spans."""

    def __post_init__(self) -> None:
        _check_choice("min_severity", self.min_severity, SEVERITIES)
        if not 0 <= self.min_confidence <= 1:
            _fail("min_confidence", "must be in [0, 1]")


@dataclass(frozen=True)
class GuardsConfig:
    """Checks that veto a candidate before ranking, whatever its score. A vetoed candidate is
    never chosen; `select.vetoed_may_be_rejected` lets it serve as the rejected side, which a
    `critical_error` veto always may."""

    copy_of_source: CopyGuard = field(default_factory=CopyGuard)
    off_target: OffTargetGuard = field(default_factory=OffTargetGuard)
    length_ratio: LengthGuard = field(default_factory=LengthGuard)
    repetition: RepetitionGuard = field(default_factory=RepetitionGuard)
    truncated_generation: TruncatedGuard = field(default_factory=TruncatedGuard)
    critical_error: CriticalErrorGuard = field(default_factory=CriticalErrorGuard)
