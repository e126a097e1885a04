"""How large a score difference must be before it means something: metric noise thresholds.

A QE or COMET score difference below the metric's noise is as likely to order two translations
against human judgement as with it, so a pair whose margin is smaller teaches a coin toss. The
thresholds here are published ones: the difference at which a metric agrees with humans 80% of
the time (ALMA-R paper, Table 15), on COMET's 0-1 scale (1.24 points = 0.0124). Only the models
they were measured for get one; other scores (chrF, BLEU, a local or fine-tuned checkpoint) get
none unless the config gives it (`select.noise_thresholds`).
"""

from __future__ import annotations

from cpo_data.config_score import ScoreConfig, ScorerConfig

KIWI_XXL_NOISE = 0.0124
XCOMET_NOISE = 0.0124
KIWI_22_NOISE = 0.0053
COMET_22_NOISE = 0.0056

PUBLISHED = {
    "unbabel/wmt23-cometkiwi-da-xxl": KIWI_XXL_NOISE,
    "unbabel/xcomet-xxl": XCOMET_NOISE,
    "unbabel/wmt22-cometkiwi-da": KIWI_22_NOISE,
    "unbabel/wmt22-comet-da": COMET_22_NOISE,
}
"""Hub id (lower case) -> noise threshold."""

CARRIED = {"kiwi": KIWI_XXL_NOISE, "xcomet": XCOMET_NOISE,
           "kiwi_xcomet": max(KIWI_XXL_NOISE, XCOMET_NOISE)}
"""The scores the ALMA-R layout carries: KIWI-XXL, XCOMET-XXL and their mean, 0-1 scale."""


def scorer_noise(scorer: ScorerConfig) -> float | None:
    """The published threshold of a COMET scorer's model, named by its hub id; None otherwise."""
    if scorer.kind != "comet" or not scorer.model:
        return None
    return PUBLISHED.get(scorer.model.lower())


def noise_thresholds(score: ScoreConfig, carried: tuple[str, ...] = ()) -> dict[str, float]:
    """Per score name, its published noise threshold, where there is one: each scorer's, each
    ensemble's (the largest of its members' that have one: a mean is no more certain than its
    noisiest part), and the carried ALMA-R scores' that no scorer of the build replaces."""
    found = {name: CARRIED[name] for name in carried if name in CARRIED}
    for name in score.names:
        found.pop(name, None)  # a computed score replaces the carried one of its name
    for scorer in score.scorers:
        threshold = scorer_noise(scorer)
        if threshold is not None:
            found[scorer.name] = threshold
    for ensemble in score.ensembles:
        members = [found[m] for m in ensemble.members if m in found]
        if members:
            found[ensemble.name] = max(members)
    return found
