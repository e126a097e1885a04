"""The two guards that read what the models said: a generation cut at `max_new_tokens`
(`truncated_generation`, flagged by the HF backend) and XCOMET's critical error spans
(`critical_error`), each through the real loading paths of tiny local models."""

from __future__ import annotations

import ast
import json
import re
import shutil
from collections import Counter

import pyarrow as pa
import pytest
import torch

from cpo_data import build, guards, schema
from cpo_data.backends.hf_generate import Ending, _token_ids, load_generator
from cpo_data.cache import open_cache
from cpo_data.config import GenerateConfig, GeneratorConfig, GuardsConfig, SelectConfig
from cpo_data.config_guards import CriticalErrorGuard
from cpo_data.generate import Generated, generate_candidates, request_key
from cpo_data.select import select_triplets
from cpo_data.testing import build_tiny_causal_lm, build_tiny_nllb
from tests.test_generate import SENTENCES, _requests, _sources

LIMIT = 12
# float64: a near-tied greedy pick cannot flip with the CPU's summation order.
COMMON = {"max_new_tokens": LIMIT, "device": "cpu", "dtype": "float64"}


# ---- telling an ended generation from a cut one ------------------------------------------------


def test_an_end_token_ends_a_generation_unless_the_limit_forced_it():
    assert _token_ids(2, [2, 7], None) == {2, 7}
    ending = Ending(ends=frozenset({2}), limit=5, forced=False)
    assert ending.stopped_at_limit([5, 6, 7, 8, 9])
    assert not ending.stopped_at_limit([5, 6, 2, 0, 0])  # ended, then padded
    assert not ending.stopped_at_limit([5, 6, 7, 8, 2])  # ended in the last slot
    forced = Ending(ends=frozenset({2}), limit=5, forced=True)
    assert forced.stopped_at_limit([5, 6, 7, 8, 2])  # the last slot's end is the limit's
    assert not forced.stopped_at_limit([5, 6, 2, 0, 0])


def test_a_causal_model_s_first_line_ends_at_its_line_break():
    """`_clean` keeps a causal model's first line: one that ended before the limit is a whole
    translation, though the model ran on without an end token."""
    ending = Ending(ends=frozenset({2}), limit=5, forced=False)
    assert not ending.stopped_at_limit([5, 6, 7, 8, 9], "The train.\nGerman: Der")
    assert ending.stopped_at_limit([5, 6, 7, 8, 9], "The train leaves at")
    assert ending.stopped_at_limit([5, 6, 7, 8, 9], "\n The train leaves at")  # first line open


# ---- the HF backend on tiny models -------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-models")
    folders = {"causal": build_tiny_causal_lm(root / "causal"),
               "nllb": build_tiny_nllb(root / "nllb")}
    forced = shutil.copytree(folders["nllb"], root / "nllb_forced")
    config = json.loads((forced / "generation_config.json").read_text())
    config["forced_eos_token_id"] = config["eos_token_id"]  # as mBART and Marian checkpoints do
    (forced / "generation_config.json").write_text(json.dumps(config))
    folders["nllb_forced"] = forced
    return {name: str(path) for name, path in folders.items()}


def _new_tokens(generator, request) -> list[int]:
    """What the model generates for `request`, token by token (greedy, as configured)."""
    ids, _ = generator._prompt_ids(request)
    output = generator.model.generate(torch.tensor([ids]), **generator._generation_kwargs())
    return output[0, len(ids):].tolist()


def _renamed(base: str, folder, token: int, as_token: int) -> str:
    """A copy of causal model `base` that emits `as_token` wherever `base` emits `token` (and
    the other way round): their output rows are swapped."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, folder)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[[token, as_token]] = weight[[as_token, token]]
    model.save_pretrained(folder)
    return str(folder)


def test_a_tiny_llama_cut_at_max_new_tokens_is_flagged_and_vetoed(models):
    generator = load_generator(GeneratorConfig(name="llama", model=models["causal"], **COMMON))
    newline = generator.tokenizer("\n", add_special_tokens=False)["input_ids"]
    eos = generator.tokenizer.eos_token_id
    for request in _requests(3):  # the premise: the random model neither ends nor breaks a line
        tokens = _new_tokens(generator, request)
        assert len(tokens) == LIMIT and eos not in tokens and not set(newline) & set(tokens)
    sources = _sources(SENTENCES[:3])
    candidates = generate_candidates(sources, GenerateConfig(), [generator]).table
    assert candidates.column("stopped_at_limit").to_pylist() == [True] * 3
    vetoes = guards.check_candidates(sources, candidates, GuardsConfig(), "ref")
    assert set(vetoes.by_candidate.values()) == {"truncated_generation"}
    assert vetoes.dropped.table().column("detail").to_pylist() == [
        f"llama: stopped at max_new_tokens ({LIMIT}) without EOS"] * 3


def test_a_tiny_llama_that_ends_is_not_flagged(models, tmp_path):
    """The same model with its end token and its line break each put where it emits its third
    token: one generation ends with EOS, the other with a finished first line."""
    base = load_generator(GeneratorConfig(name="base", model=models["causal"], **COMMON))
    request = _requests(1)[0]
    third = _new_tokens(base, request)[2]
    eos = base.tokenizer.eos_token_id
    (newline,) = base.tokenizer("\n", add_special_tokens=False)["input_ids"]
    for name, token in (("eos", eos), ("newline", newline)):
        folder = _renamed(models["causal"], tmp_path / name, third, token)
        generator = load_generator(GeneratorConfig(name=name, model=folder, **COMMON))
        tokens = _new_tokens(generator, request)
        assert tokens.index(token) == 2  # the premise: it ends there (EOS, or the first line)
        assert (eos in tokens) == (name == "eos")
        (result,) = generator.generate([request])
        assert result.stopped_at_limit == [False], name
        assert result.texts == [generator.tokenizer.decode(tokens[:2]).strip()]


def test_beams_that_ended_and_beams_that_ran_on_are_told_apart(models, tmp_path):
    """With beams, each returned sequence says for itself: the one that ended is not flagged,
    the one that ran to the limit is."""
    base = load_generator(GeneratorConfig(name="base", model=models["causal"], **COMMON))
    request = _requests(1)[0]
    third = _new_tokens(base, request)[2]
    folder = _renamed(models["causal"], tmp_path / "eos", third, base.tokenizer.eos_token_id)
    generator = load_generator(GeneratorConfig(name="beam", model=folder, strategy="beam",
                                               num_beams=3, num_candidates=2, **COMMON))
    (result,) = generator.generate([request])
    assert sorted(result.stopped_at_limit) == [False, True]


@pytest.mark.parametrize("model", ["nllb", "nllb_forced"])
def test_a_seq2seq_start_token_or_a_forced_end_is_not_an_ending(models, model):
    """NLLB's decoder starts from EOS, and a checkpoint with `forced_eos_token_id` ends every
    sequence at the limit with EOS: neither is the model ending its translation."""
    generator = load_generator(GeneratorConfig(name="n", model=models[model], **COMMON))
    eos = generator.tokenizer.eos_token_id
    assert generator._ending({}).ends == {eos}  # no eos_token_id passed: the model's own
    requests = _requests(3)
    extra = generator._language_setup("de", "en")
    ids, _ = generator._prompt_ids(requests[0])
    output = generator.model.generate(torch.tensor([ids]), **generator._generation_kwargs(),
                                      **extra)[0].tolist()
    assert output[0] == eos and len(output) == LIMIT + 1  # the premise: it ran to the limit
    assert (output[-1] == eos) == (model == "nllb_forced")
    assert [r.stopped_at_limit for r in generator.generate(requests)] == [[True]] * 3


# ---- the candidates table ----------------------------------------------------------------------


class _Said:
    """A generator that gives fixed texts per source, each with its own stop flag."""

    def __init__(self, name, outputs, identity=None):
        self.name, self.outputs = name, outputs
        self.identity = identity or {"model": name, "decoding": {"max_new_tokens": 8}}
        self.asked = 0

    def generate(self, requests):
        self.asked += len(requests)
        return [Generated(texts=[t for t, _ in self.outputs],
                          stopped_at_limit=[s for _, s in self.outputs]) for _ in requests]


def test_a_text_is_cut_only_if_every_generator_that_gave_it_stopped():
    sources = _sources(["Der Zug fährt."], systems=[{"system": "prod", "text": "Provided."}],
                       ref="A reference.")
    first = _Said("first", [("Cut.", True), ("Cut by both.", True), ("Provided.", True),
                            ("Finished by the other.", True), ("Unknown to the other.", True),
                            ("Finished.", False)])
    second = _Said("second", [("Cut by both.", True), ("Finished by the other.", False),
                              ("Unknown to the other.", None), ("Not said.", None)])
    table = generate_candidates(sources, GenerateConfig(include_reference=True),
                                [first, second]).table
    flags = {c["text"]: c["stopped_at_limit"] for c in table.to_pylist()}
    assert flags == {
        "A reference.": None, "Provided.": False,  # a provided output is a finished text
        "Cut.": True, "Cut by both.": True, "Finished by the other.": False,
        "Unknown to the other.": None, "Finished.": False, "Not said.": None}


def test_a_cache_entry_keeps_the_flag_and_one_from_before_it_still_reads(tmp_path):
    cache_dir = str(tmp_path / "cache")
    config = GenerateConfig(cache_dir=cache_dir)
    sources = _sources(SENTENCES[:2])
    generator = _Said("g", [("Cut.", True), ("Whole.", False)])
    first = generate_candidates(sources, config, [generator]).table
    again = generate_candidates(sources, config, [generator])
    assert generator.asked == 2 and again.report.from_cache == {"g": 2}
    assert again.table.column("stopped_at_limit").to_pylist() == [True, False] * 2
    assert again.table.equals(first)

    # An entry as the cache held them before the flag: texts and truncated only.
    old = _Said("old", [("Cut.", True)], identity={"model": "old"})
    cache = open_cache(cache_dir, "generate", old.identity)
    cache.put_many({request_key(r): {"texts": ["Written before."], "truncated": False}
                    for r in _requests(2)})
    served = generate_candidates(sources, config, [old])
    assert old.asked == 0 and served.report.from_cache == {"old": 2}
    assert served.table.column("stopped_at_limit").to_pylist() == [None, None]
    assert guards.check_candidates(sources, served.table, GuardsConfig(),
                                   "ref").by_candidate == {}  # not known: not vetoed


def test_a_shard_cached_before_a_candidates_column_is_not_served(monkeypatch):
    """Prefect's task cache keys on `shard_key`: a column added to the candidates (as
    stopped_at_limit was) must miss the shards cached without it."""
    shard = _sources(SENTENCES[:2])
    before = build.shard_key("generate", shard, [{}])
    assert build.shard_key("generate", shard, [{}]) == before
    grown = schema.CANDIDATES.append(pa.field("new_column", pa.bool_()))
    monkeypatch.setattr(schema, "CANDIDATES", grown)
    assert build.shard_key("generate", shard, [{}]) != before


# ---- critical_error with a tiny XCOMET checkpoint ----------------------------------------------


class _FooledByErrors:
    """A QE stand-in that rates highest the texts with a critical error span."""

    name, needs_reference, higher_is_better, last_truncated = "qe", False, True, 0
    identity = {"scorer": "fooled-by-errors"}

    def __init__(self, critical: set[str]):
        self.critical = critical

    def score(self, items):
        from cpo_data.score import ScoreResult

        return [ScoreResult(0.9 if i.mt in self.critical else 0.1 + len(i.mt) / 1000)
                for i in items]


def _has_critical(spans) -> bool:
    return any(span["severity"] == "critical" for span in spans or ())


@pytest.fixture(scope="module")
def xcomet_checkpoint(tmp_path_factory):
    from cpo_data.testing import build_tiny_comet

    return str(build_tiny_comet(tmp_path_factory.mktemp("xcomet"), "xcomet"))


@pytest.fixture(scope="module")
def xcomet(xcomet_checkpoint):
    from cpo_data.backends.comet_score import load_scorer
    from cpo_data.config_score import ScorerConfig

    return load_scorer(ScorerConfig(name="xcomet", model=xcomet_checkpoint, device="cpu"))


@pytest.mark.slow
def test_a_tiny_xcomet_s_critical_errors_are_never_chosen(xcomet, tmp_path):
    """The demo corpus's two systems and reference, XCOMET's spans from a tiny checkpoint
    through COMET's loading path, and a QE stand-in that rates the candidates XCOMET finds a
    critical error in highest: unguarded, those are every chosen side they can be; guarded,
    none is, and each is a `critical_error` row naming the span."""
    from cpo_data.config import ScoreConfig, SourcesConfig
    from cpo_data.score import score_candidates
    from cpo_data.sources import load_sources
    from tests.conftest import REPO_ROOT

    rows = [json.loads(line) for line in
            (REPO_ROOT / "data/demo/demo.jsonl").read_text().splitlines()][:60]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = load_sources(SourcesConfig(path=str(path), src_lang_column="src_lang",
                                         tgt_lang_column="tgt_lang",
                                         systems={"system_a": "system_a",
                                                  "system_b": "system_b"})).table
    candidates = generate_candidates(sources, GenerateConfig(include_reference=True)).table
    spans = score_candidates(candidates, sources, ScoreConfig(), [xcomet]).table
    critical = {(r["source_id"], r["text"]) for r in spans.to_pylist()
                if _has_critical(r["error_spans"])}
    systems = {(c["source_id"], c["text"]): c["systems"] for c in candidates.to_pylist()}
    flagged = {key for key in critical if "ref" not in systems[key]}  # the reference: unchecked
    assert len(flagged) > 60  # the premise: the tiny model finds critical errors
    # Ranked by the stand-in alone: XCOMET's own scores are another matter (agreement).
    fooled = score_candidates(candidates, sources, ScoreConfig(),
                              [_FooledByErrors({text for _, text in flagged})]).table
    config = SelectConfig(rank_by="qe", use_human_labels=False)

    def chosen_flagged(guards_config: GuardsConfig) -> tuple[int, int, guards.Vetoes]:
        vetoes = guards.check_candidates(sources, candidates, guards_config, "ref", spans)
        triplets = select_triplets(sources, candidates, fooled, config,
                                   vetoes.by_candidate).triplets.to_pylist()
        hit = sum((t["source_id"], t["chosen"]) in flagged for t in triplets)
        return hit, len(triplets), vetoes

    unguarded, pairs, _ = chosen_flagged(
        GuardsConfig(critical_error=CriticalErrorGuard(enabled=False)))
    choosable = len({sid for sid, _ in flagged})  # sources with a flagged candidate
    assert unguarded == choosable and pairs >= choosable

    guarded, _, vetoes = chosen_flagged(GuardsConfig())
    assert guarded == 0
    rows = vetoes.dropped.table().to_pylist()
    assert Counter(r["reason"] for r in rows)["critical_error"] == len(flagged)
    # Each detail names the system, the scorer and the candidate's most confident critical span.
    critical_spans = {(r["source_id"], r["text"]): [s for s in r["error_spans"]
                                                    if s["severity"] == "critical"]
                      for r in spans.to_pylist() if _has_critical(r["error_spans"])}
    for row in (r for r in rows if r["reason"] == "critical_error"):
        found = re.fullmatch(r"(.+?): xcomet found a critical error in (.+) "
                             r"\(confidence ([0-9.]+)\)", row["detail"])
        assert found, row["detail"]
        (key,) = [k for k in flagged if k[0] == row["source_id"]
                  and "+".join(systems[k]) == found[1]]
        best = max(critical_spans[key], key=lambda span: span["confidence"])
        assert ast.literal_eval(found[2]) == best["text"]
        assert float(found[3]) == pytest.approx(best["confidence"], abs=0.005)


@pytest.mark.slow
def test_a_build_vetoes_cut_generations_and_critical_errors(models, xcomet_checkpoint,
                                                            tmp_path):
    """The whole build: a tiny Llama's generations stop at max_new_tokens, the tiny XCOMET
    finds critical errors; neither is a chosen side of the published version, and each veto
    is one of its dropped rows."""
    from cpo_data import store
    from cpo_data.config import load_config
    from tests.test_build_flow import DEMO_ROWS, write_config

    unused = {"causal": None, "kiwi": None}  # write_config's defaults, all overridden here
    path = write_config(tmp_path, unused, DEMO_ROWS[:20],
                        generate={"include_reference": False, "models": [
                            {"name": "tiny", "model": models["causal"], "max_new_tokens": 6,
                             "device": "cpu"}]},
                        score={"scorers": [{"name": "xcomet", "model": xcomet_checkpoint,
                                            "device": "cpu"}]},
                        select={"use_human_labels": False, "rank_by": "xcomet"})
    config = load_config(path)
    summary = build.run_build(config)
    dataset = store.dataset_uri(config.publish.uri, config.publish.name)
    dropped = store.read_dropped(dataset).to_dict("records")
    by_tiny = Counter(d["reason"] for d in dropped if d["detail"].startswith("tiny: "))
    assert by_tiny["truncated_generation"] >= 15 and set(by_tiny) <= {"truncated_generation",
                                                                       "empty_output"}
    assert {d["detail"] for d in dropped if d["reason"] == "truncated_generation"} == {
        "tiny: stopped at max_new_tokens (6) without EOS"}
    assert summary.dropped.get("critical_error", 0) >= 5
    triplets = store.read_triplets_table(dataset).to_pylist()
    assert triplets  # some sources keep a pair
    for triplet in triplets:
        assert "tiny" not in (triplet["chosen_system"], triplet["rejected_system"])
        (entry,) = triplet["chosen_scores"]
        assert not _has_critical(entry["error_spans"]), triplet["chosen"]
