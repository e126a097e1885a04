"""Candidate guards: broken candidates that QE rates highest are never chosen."""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections import Counter

import pyarrow as pa
import pytest

from cpo_data import guards, schema
from cpo_data.config import GenerateConfig, GuardsConfig, ScoreConfig, SelectConfig, SourcesConfig
from cpo_data.config_guards import (
    CopyGuard,
    CriticalErrorGuard,
    LengthGuard,
    OffTargetGuard,
    RepetitionGuard,
    TruncatedGuard,
)
from cpo_data.fields import ConfigError
from cpo_data.generate import Generated, generate_candidates
from cpo_data.score import ScoreResult, score_candidates
from cpo_data.select import select_triplets
from cpo_data.sources import load_sources
from tests.conftest import REPO_ROOT, write_jsonl

BAD = ("copy", "wrong", "loop", "cut", "stopped")
OFF = GuardsConfig(copy_of_source=CopyGuard(enabled=False),
                   off_target=OffTargetGuard(enabled=False),
                   length_ratio=LengthGuard(enabled=False),
                   repetition=RepetitionGuard(enabled=False),
                   truncated_generation=TruncatedGuard(enabled=False),
                   critical_error=CriticalErrorGuard(enabled=False))
BROKEN_HIGHEST = (0.99, 0.985, 0.98, 0.97, 0.995)


class _FooledQE:
    """A QE stand-in that, as QE is known to, rates the broken outputs highest."""

    name, needs_reference, higher_is_better, last_truncated = "qe", False, True, 0
    identity = {"scorer": "fooled"}

    def __init__(self, texts_by_system, broken=BROKEN_HIGHEST):
        self.rank = {text: rank for system, rank in zip(BAD, broken, strict=True)
                     for text in texts_by_system[system]}

    def score(self, items):
        # Real outputs get distinct scores in (0.4, 0.6): no ties among them.
        return [ScoreResult(self.rank.get(i.mt, 0.4 + zlib.crc32(i.mt.encode()) / 2**32 / 5))
                for i in items]


class _CutGenerator:
    """A generator (the `Generator` protocol) that stopped at max_new_tokens every time: it
    gives the longer real output without its last word and says it did not end. That reads as a
    translation to every other guard: only the generator's flag tells."""

    name = "stopped"
    identity = {"model": "cut", "decoding": {"strategy": "greedy", "max_new_tokens": 24}}

    def __init__(self, outputs: dict[str, str]):
        self.outputs = outputs

    def generate(self, requests):
        return [Generated(texts=[self.outputs[r.src]], stopped_at_limit=[True])
                for r in requests]


def _cut(text: str) -> str:
    words = text.split()
    return " ".join(words[:-1])


def _pool(tmp_path, broken=BROKEN_HIGHEST):
    """The demo corpus with five broken systems beside its two real ones: the source copied,
    another source of the same direction (the wrong language, no copy), a real output that
    loops, a real output cut to its first quarter (provided), and a generation that stopped at
    max_new_tokens (generated, flagged by its generator)."""
    rows = [json.loads(line) for line in
            (REPO_ROOT / "data/demo/demo.jsonl").read_text().splitlines()]
    same_direction = {}
    for row in rows:
        same_direction.setdefault(row["src_lang"], []).append(row["src"])
    for row in rows:
        others = same_direction[row["src_lang"]]
        row["wrong"] = others[(others.index(row["src"]) + 1) % len(others)]
        row["copy"] = row["src"] + " "
        row["loop"] = row["system_a"] + " " + " ".join(["and then"] * 8)
        row["cut"] = row["system_a"][: max(1, len(row["system_a"]) // 4)]
    path = write_jsonl(tmp_path / "pool.jsonl", rows)
    systems = {s: s for s in ("system_a", "system_b", *BAD) if s != "stopped"}
    loaded = load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                        tgt_lang_column="tgt_lang", systems=systems))
    cut = {r["src"]: _cut(max(r["system_a"], r["system_b"], key=len)) for r in rows}
    candidates = generate_candidates(loaded.table, GenerateConfig(include_reference=True),
                                     [_CutGenerator(cut)])
    texts = {s: {r[s].strip() for r in rows} for s in BAD if s != "stopped"}
    texts["stopped"] = set(cut.values())
    scores = score_candidates(candidates.table, loaded.table, ScoreConfig(),
                              [_FooledQE(texts, broken)])
    return loaded.table, candidates.table, scores.table


def _select(pool, config: GuardsConfig, **select):
    sources, candidates, scores = pool
    vetoes = guards.check_candidates(sources, candidates, config, "ref", scores)
    selection = select_triplets(sources, candidates, scores,
                                SelectConfig(rank_by="qe", use_human_labels=False, **select),
                                vetoes.by_candidate)
    return vetoes, selection


def test_with_the_guards_on_no_broken_candidate_is_chosen(tmp_path):
    pool = _pool(tmp_path)
    _, unguarded = _select(pool, OFF)
    chosen = Counter(t["chosen_system"] for t in unguarded.triplets.to_pylist())
    assert sum(chosen[s] for s in BAD) == 180  # fooled every time

    vetoes, guarded = _select(pool, GuardsConfig())
    triplets = guarded.triplets.to_pylist()
    assert len(triplets) == 180
    assert not {t["chosen_system"] for t in triplets} & set(BAD)
    assert not {t["rejected_system"] for t in triplets} & set(BAD)  # off by default
    # Every broken candidate is a dropped row naming its guard and its system.
    rows = vetoes.dropped.table().to_pylist()
    by_system = Counter((r["detail"].split(":")[0], r["reason"]) for r in rows)
    assert by_system[("copy", "copy_of_source")] == 180
    assert by_system[("wrong", "off_target")] == 180
    assert by_system[("cut", "length_ratio")] == 180
    assert by_system[("stopped", "truncated_generation")] == 180
    assert sum(n for (system, _), n in by_system.items() if system == "loop") == 180
    assert {system for system, _ in by_system} == set(BAD)  # no real output vetoed
    assert {r["detail"] for r in rows if r["reason"] == "truncated_generation"} == {
        "stopped: stopped at max_new_tokens (24) without EOS"}
    schema.validate(vetoes.dropped.table(), schema.DROPPED)


def test_only_the_generator_s_flag_catches_a_generation_cut_at_the_limit(tmp_path):
    """With every other guard on, the cut generations are still chosen: they read as ordinary
    translations, so `truncated_generation` is the one guard that stands between them and
    the chosen side. A provided output is never judged by it: it carries no flag."""
    pool = _pool(tmp_path)
    _, cut_chosen = _select(pool, GuardsConfig(truncated_generation=TruncatedGuard(enabled=False)))
    chosen = Counter(t["chosen_system"] for t in cut_chosen.triplets.to_pylist())
    assert chosen["stopped"] == 180
    candidates = pool[1].to_pylist()
    flags = Counter((tuple(c["systems"]), c["stopped_at_limit"]) for c in candidates)
    assert flags[(("stopped",), True)] == 180
    assert all(flag is None for (systems, flag) in flags if "stopped" not in systems)


def test_vetoed_candidates_may_serve_as_rejected_when_asked(tmp_path):
    pool = _pool(tmp_path, broken=(0.01, 0.015, 0.02, 0.03, 0.04))  # lowest: QE gets them right
    _, by_default = _select(pool, GuardsConfig())
    assert not {t["rejected_system"] for t in by_default.triplets.to_pylist()} & set(BAD)
    _, asked = _select(pool, GuardsConfig(), vetoed_may_be_rejected=True)
    triplets = asked.triplets.to_pylist()
    assert {t["rejected_system"] for t in triplets} == {"copy"}  # the lowest of all
    assert not {t["chosen_system"] for t in triplets} & set(BAD)


def test_a_source_whose_choosable_candidates_are_all_vetoed_is_dropped():
    src = "Der Zug fährt heute von Gleis sieben ab."
    sources = pa.Table.from_pylist([{
        "source_id": "s", "lang_pair": "de-en", "src_lang": "de", "tgt_lang": "en", "src": src,
        "ref": None, "systems": [], "human_preferred": None, "human_dispreferred": None,
        "human_delta": None, "duplicates": 1, "origin": "t:1"}], schema=schema.SOURCES)
    texts = [src, "The train."[:3]]
    candidates = pa.Table.from_pylist([
        {"source_id": "s", "text": t, "systems": [n], "generator": None, "decoding": None}
        for t, n in zip(texts, ("copy", "cut"), strict=True)], schema=schema.CANDIDATES)
    scores = pa.Table.from_pylist([
        {"source_id": "s", "text": t, "scorer": "qe", "score": v, "error_spans": None}
        for t, v in zip(texts, (0.9, 0.8), strict=True)], schema=schema.SCORES)
    vetoes = guards.check_candidates(sources, candidates, GuardsConfig(), "ref")
    assert set(vetoes.by_candidate.values()) == {"copy_of_source", "length_ratio"}
    selection = select_triplets(sources, candidates, scores, SelectConfig(rank_by="qe"),
                                vetoes.by_candidate)
    (drop,) = selection.dropped.to_pylist()
    assert drop["reason"] == "all_vetoed"
    assert drop["detail"] == ("every candidate that could be chosen was vetoed "
                              "(copy_of_source, length_ratio)")


# ---- critical_error: XCOMET's spans veto the chosen side only ---------------------------------

SPAN_SEVERITY = {"system_a": ("major", 0.8), "system_b": ("critical", 0.9), "ref": None}
QE_FOOLED = {"system_b": 0.9, "system_a": 0.6, "ref": 0.3}
"""QE prefers system_b, whose outputs carry the demo's meaning errors (track eleven for
platform seven)."""
QE_RIGHT = {"system_a": 0.9, "ref": 0.6, "system_b": 0.3}


def _spans_pool(tmp_path, qe=QE_FOOLED):
    """The demo corpus's two systems and its reference, scored by a QE stand-in (`qe`: a score
    per system) and an XCOMET stand-in that agrees with it and finds spans on each output's
    last word: critical in system_b's, major in system_a's, none in the reference."""
    rows = [json.loads(line) for line in
            (REPO_ROOT / "data/demo/demo.jsonl").read_text().splitlines()]
    path = write_jsonl(tmp_path / "spans.jsonl", rows)
    loaded = load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                        tgt_lang_column="tgt_lang",
                                        systems={"system_a": "system_a",
                                                 "system_b": "system_b"}))
    candidates = generate_candidates(loaded.table, GenerateConfig(include_reference=True)).table
    scores = []
    for candidate in candidates.to_pylist():
        (system,) = candidate["systems"]
        text = candidate["text"]
        spans = []
        if SPAN_SEVERITY[system]:
            severity, confidence = SPAN_SEVERITY[system]
            last = text.split()[-1]
            spans = [{"text": last, "start": len(text) - len(last), "end": len(text),
                      "severity": severity, "confidence": confidence}]
        key = {"source_id": candidate["source_id"], "text": text}
        scores += [{**key, "scorer": "qe", "score": qe[system], "error_spans": None},
                   {**key, "scorer": "xcomet", "score": qe[system], "error_spans": spans}]
    return loaded.table, candidates, pa.Table.from_pylist(scores, schema=schema.SCORES)


def _critical(**settings) -> GuardsConfig:
    return GuardsConfig(critical_error=CriticalErrorGuard(**settings))


def test_a_critical_error_keeps_a_candidate_from_the_chosen_side(tmp_path):
    pool = _spans_pool(tmp_path)
    _, unguarded = _select(pool, _critical(enabled=False))
    assert Counter(t["chosen_system"] for t in unguarded.triplets.to_pylist()) == {
        "system_b": 180}  # QE prefers the outputs with the critical errors every time

    vetoes, guarded = _select(pool, GuardsConfig())
    triplets = guarded.triplets.to_pylist()
    assert len(triplets) == 180
    assert {(t["chosen_system"], t["rejected_system"]) for t in triplets} == {
        ("system_a", "ref")}  # a major error does not veto
    rows = vetoes.dropped.table().to_pylist()
    assert len(rows) == 180 and {r["reason"] for r in rows} == {"critical_error"}
    by_source = {c["source_id"]: c["text"] for c in pool[1].to_pylist()
                 if c["systems"] == ["system_b"]}
    assert sorted(r["detail"] for r in rows) == sorted(
        f"system_b: xcomet found a critical error in {by_source[r['source_id']].split()[-1]!r} "
        "(confidence 0.90)" for r in rows)
    assert set(vetoes.by_candidate.values()) <= guards.CHOSEN_ONLY


def test_a_candidate_with_a_critical_error_may_still_be_rejected(tmp_path):
    """As the rejected side it shows what not to write: `select.vetoed_may_be_rejected` (off)
    is for the other guards, whose vetoes mean the candidate is no translation at all."""
    _, selection = _select(_spans_pool(tmp_path, qe=QE_RIGHT), GuardsConfig())
    assert Counter((t["chosen_system"], t["rejected_system"])
                   for t in selection.triplets.to_pylist()) == {("system_a", "system_b"): 180}


def test_critical_error_severity_confidence_and_scorers(tmp_path):
    sources, candidates, scores = pool = _spans_pool(tmp_path)

    def vetoed(config: GuardsConfig) -> Counter:
        found = guards.check_candidates(sources, candidates, config, "ref", scores)
        return Counter(found.by_candidate.values())

    assert vetoed(GuardsConfig()) == {"critical_error": 180}
    assert vetoed(_critical(min_severity="major")) == {"critical_error": 360}
    assert vetoed(_critical(min_severity="major", min_confidence=0.85)) == {
        "critical_error": 180}  # system_a's major spans are at 0.8
    assert vetoed(_critical(min_confidence=0.95)) == {}
    assert vetoed(_critical(scorers=("xcomet",))) == {"critical_error": 180}
    assert vetoed(_critical(scorers=("qe",))) == {}  # the QE scorer gives no spans
    assert vetoed(GuardsConfig()) == vetoed(_critical(scorers=()))
    with pytest.raises(guards.GuardError,
                       match=r"guards\.critical_error\.scorers: \['xcomt'\] not among the "
                             r"scores \(they have \['qe', 'xcomet'\]\)"):
        vetoed(_critical(scorers=("xcomt",)))
    # Without scores the guard finds nothing, and the positional arguments are the old ones.
    assert guards.check_candidates(sources, candidates, GuardsConfig(), "ref").by_candidate == {}
    # Both systems vetoed as chosen: only the reference could be.
    _, selection = _select(pool, _critical(min_severity="major"))
    assert {t["chosen_system"] for t in selection.triplets.to_pylist()} <= {"ref"}


def test_critical_error_settings_are_checked_and_named():
    from cpo_data.project import from_dict

    config = from_dict(GuardsConfig, {"critical_error": {"min_severity": "major",
                                                         "scorers": ["xcomet"]}}, "guards")
    assert config.critical_error == CriticalErrorGuard(min_severity="major", scorers=("xcomet",))
    with pytest.raises(ConfigError, match=r"guards\.critical_error\.min_severity: 'fatal' is "
                                          r"not one of minor, major, critical"):
        from_dict(GuardsConfig, {"critical_error": {"min_severity": "fatal"}}, "guards")
    with pytest.raises(ConfigError, match=r"guards\.critical_error\.min_confidence: must be "
                                          r"in \[0, 1\]"):
        from_dict(GuardsConfig, {"critical_error": {"min_confidence": 1.5}}, "guards")


def test_a_candidate_another_guard_vetoes_is_named_by_that_guard():
    """`critical_error` leaves a candidate rejectable; a copy of the source with a critical
    span must stay vetoed on both sides, so the copy's guard names it."""
    src = "Der Zug fährt heute von Gleis sieben ab."
    sources = pa.Table.from_pylist([{
        "source_id": "s", "lang_pair": "de-en", "src_lang": "de", "tgt_lang": "en", "src": src,
        "ref": None, "systems": [], "human_preferred": None, "human_dispreferred": None,
        "human_delta": None, "duplicates": 1, "origin": "t:1"}], schema=schema.SOURCES)
    texts = {"copy": src, "mt": "The train leaves from platform eleven today."}
    candidates = pa.Table.from_pylist([
        {"source_id": "s", "text": t, "systems": [n], "generator": None, "decoding": None}
        for n, t in texts.items()], schema=schema.CANDIDATES)
    span = {"text": "Zug", "start": 4, "end": 7, "severity": "critical", "confidence": 0.7}
    scores = pa.Table.from_pylist([
        {"source_id": "s", "text": t, "scorer": "xcomet", "score": 0.9, "error_spans": [span]}
        for t in texts.values()], schema=schema.SCORES)
    vetoes = guards.check_candidates(sources, candidates, GuardsConfig(), "ref", scores)
    assert vetoes.by_candidate == {("s", src): "copy_of_source",
                                   ("s", texts["mt"]): "critical_error"}


# ---- each guard on hand-worked cases -----------------------------------------------------------


def test_a_copy_is_the_source_up_to_case_punctuation_and_spacing():
    guard = CopyGuard()
    source = "Der Zug fährt heute von Gleis sieben ab."
    assert guards.is_copy(source, "der zug fährt heute, von gleis sieben ab", guard)
    assert guards.is_copy(source, "Der Zug fahrt heute von Gleis sieben ab.", guard)  # 1 edit
    assert not guards.is_copy(source, "The train leaves from platform seven today.", guard)
    assert not guards.is_copy("Angela Merkel", "Angela Merkel", guard)  # under min_chars


def test_length_windows_come_from_the_config_the_references_or_the_table():
    rows = [{"lang_pair": "de-en", "src_lang": "de", "tgt_lang": "en", "src": "x" * 20,
             "ref": "y" * (16 + i % 9)} for i in range(60)]  # ratios 0.8 .. 1.2
    rows += [{"lang_pair": "en-zh", "src_lang": "en", "tgt_lang": "zh", "src": "x" * 20,
              "ref": "y" * 6}]
    windows = guards.length_windows(rows, LengthGuard())
    low, high = windows["de-en"]
    assert low == pytest.approx(0.8 / 1.5) and high == pytest.approx(1.2 * 1.5)
    assert windows["en-zh"] == guards.default_window("en", "zh") == (0.1, 1.5)  # one reference
    configured = guards.length_windows(rows, LengthGuard(windows={"de-en": (0.5, 2.0)}))
    assert configured["de-en"] == (0.5, 2.0)


def test_repetition_counts_beyond_the_source_in_words_or_characters():
    assert guards.most_repeated("a b c a b c a b c", "x", "en", 3) == ("a b c", 3)
    # Repeated as often in the source: a translation that keeps it is not looping.
    assert guards.most_repeated("a b c a b c a b c", "a b c a b c a b c", "en", 3)[1] == 0
    assert guards.most_repeated("好的好的好的好的好的好的好的", "ok", "zh", 1) == ("好的", 7)


def test_a_build_runs_the_guards_and_publishes_their_vetoes(tmp_path, capsys):
    """chrF ranks a copy of the source last, so without the veto it would be every rejected
    side; vetoed, it is neither side, and each veto is in the version's dropped rows."""
    import yaml

    from cpo_data import build, store
    from cpo_data.config import load_config

    rows = [json.loads(line) for line in
            (REPO_ROOT / "data/demo/demo.jsonl").read_text().splitlines()][:20]
    for row in rows:
        row["copy"] = row["src"]
    write_jsonl(tmp_path / "s.jsonl", rows)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({
        "sources": [{"path": "s.jsonl", "src_lang_column": "src_lang",
                     "tgt_lang_column": "tgt_lang",
                     "systems": {s: s for s in ("system_a", "system_b", "copy")}}],
        "score": {"scorers": [{"name": "chrf", "kind": "chrf"}]},
        "select": {"use_human_labels": False},
        "publish": {"uri": "store", "name": "g"}, "work_dir": "work"}))
    config = load_config(tmp_path / "b.yaml")
    summary = build.run_build(config)
    assert summary.dropped == {"copy_of_source": 20}
    dataset = store.dataset_uri(config.publish.uri, "g")
    triplets = store.read_triplets(dataset).to_dict("records")
    assert len(triplets) == 20
    assert {t["rejected_system"] for t in triplets} | {t["chosen_system"] for t in triplets} \
        <= {"system_a", "system_b"}
    dropped = store.read_dropped(dataset).to_dict("records")
    assert Counter(d["reason"] for d in dropped) == {"copy_of_source": 20}
    assert all(d["detail"].startswith("copy: ") for d in dropped)
    # The summary and `cpo-data inspect` count them, out of every candidate checked.
    assert (summary.vetoed, summary.guarded) == ({"copy_of_source": 20}, 60)
    from pipelines.printing import print_build_summary, print_inspect

    print_inspect(dataset, rows=0)
    out = capsys.readouterr().out
    assert "vetoed    20 of 60 candidates by the guards: copy_of_source 20" in out
    assert "margin    pairs kept at chrf margin >= 0" in out
    print_build_summary(dataclasses.asdict(summary), rows=0)
    assert "vetoed          20 of 60 candidates by the guards: copy_of_source 20" in (
        capsys.readouterr().out)


def test_off_target_needs_letters_and_confidence_in_another_language():
    from cpo_data import langid

    guard = OffTargetGuard()
    languages = langid.language_set({"de", "en"})
    assert {"de", "en", "fr", "zh"} <= languages
    german = "Der Zug nach Hamburg fährt heute von Gleis sieben ab."
    found = guards.off_target(german, "en", guard, languages)
    assert found is not None and found[0] == "de" and found[1] >= guard.min_confidence
    assert guards.off_target(german, "de", guard, languages) is None  # the target itself
    assert guards.off_target("Gleis sieben.", "en", guard, languages) is None  # 12 letters
    assert guards.off_target("1234567890 1234567890 1234567890", "en", guard,
                             languages) is None  # digits: no language to name
    assert guards.off_target(german, "xx", guard, languages) is None  # a target it lacks


def test_the_reference_is_not_checked():
    """The data's own translation is not vetoed, even where it looks like a copy (names,
    titles): only systems' outputs are judged."""
    src = "Berliner Philharmoniker, Sinfonie Nr. 9"
    sources = pa.Table.from_pylist([{
        "source_id": "s", "lang_pair": "de-en", "src_lang": "de", "tgt_lang": "en", "src": src,
        "ref": src, "systems": [], "human_preferred": None, "human_dispreferred": None,
        "human_delta": None, "duplicates": 1, "origin": "t:1"}], schema=schema.SOURCES)
    candidates = pa.Table.from_pylist([
        {"source_id": "s", "text": src, "systems": systems, "generator": None, "decoding": None}
        for systems in (["ref"],)], schema=schema.CANDIDATES)
    assert guards.check_candidates(sources, candidates, GuardsConfig(), "ref").by_candidate == {}
    renamed = guards.check_candidates(sources, candidates, GuardsConfig(), "human")
    assert renamed.by_candidate == {("s", src): "copy_of_source"}  # not the reference now


def test_the_shipped_configs_and_the_readme_spell_out_every_guard_at_its_defaults():
    """configs/*.yaml and the README list each guard with every setting: a guard or setting
    added later, or a default changed, shows up here until they say so too."""
    import re

    import yaml

    from cpo_data.config import load_config

    readme = (REPO_ROOT / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(guards:\n.*?)```", readme, flags=re.S)
    written = {"README.md": yaml.safe_load(block)["guards"]}
    for name in ("demo.yaml", "alma-r.yaml"):
        path = REPO_ROOT / "configs" / name
        written[name] = yaml.safe_load(path.read_text())["guards"]
        assert load_config(path).guards == GuardsConfig()
    defaults = GuardsConfig()
    for name, found in written.items():
        assert set(found) == {f.name for f in dataclasses.fields(defaults)}, name
        for guard, settings in found.items():
            default = getattr(defaults, guard)
            assert set(settings) == {f.name for f in dataclasses.fields(default)}, (name, guard)
            assert {k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(default).items()} == settings, (name, guard)
