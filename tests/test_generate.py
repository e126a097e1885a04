import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch

from cpo_data import schema
from cpo_data.backends.hf_generate import load_generator
from cpo_data.config import GenerateConfig, GeneratorConfig
from cpo_data.generate import Generated, GenerateError, Request, generate_candidates
from cpo_data.sources import source_id
from cpo_data.testing import (
    build_tiny_causal_lm,
    build_tiny_marian,
    build_tiny_nllb,
)

SENTENCES = [
    "Der Zug fährt um acht Uhr ab.",
    "Bitte schließen Sie das Fenster, bevor Sie gehen.",
    "Es regnet.",
    "Die neue Software speichert alle Änderungen automatisch und zuverlässig im Hintergrund.",
    "Wir sehen uns morgen früh am Bahnhof.",
    "Danke!",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "causal": str(build_tiny_causal_lm(root / "causal")),
        "chat": str(build_tiny_causal_lm(root / "chat", chat_template=True)),
        "marian": str(build_tiny_marian(root / "marian")),
        "nllb": str(build_tiny_nllb(root / "nllb")),
        "pruned": str(build_tiny_nllb(root / "pruned", language_codes=("deu_Latn", "eng_Latn"))),
        "m2m": str(build_tiny_nllb(root / "m2m", language_codes=("__de__", "__en__"))),
    }


def _requests(n=6, src_lang="de", tgt_lang="en"):
    texts = [SENTENCES[i % len(SENTENCES)] + " " * (i // len(SENTENCES)) + "x" * (i // 6)
             for i in range(n)]
    return [Request(source_id(src_lang, tgt_lang, t), src_lang, tgt_lang, t) for t in texts]


def _sources(texts, src_lang="de", tgt_lang="en", systems=None, ref="A reference."):
    rows = [{"source_id": source_id(src_lang, tgt_lang, t), "lang_pair": f"{src_lang}-{tgt_lang}",
             "src_lang": src_lang, "tgt_lang": tgt_lang, "src": t, "ref": ref,
             "systems": systems or [], "human_preferred": None, "human_dispreferred": None,
             "human_delta": None, "duplicates": 1, "origin": f"test:{i}"}
            for i, t in enumerate(texts)]
    return pa.Table.from_pylist(rows, schema=schema.SOURCES)


# ---- the HF backend -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "decoding", "expected"),
    [
        ("causal", {"strategy": "greedy"}, 1),
        ("causal", {"strategy": "beam", "num_beams": 4, "num_candidates": 3}, 3),
        ("causal", {"strategy": "sample", "num_candidates": 4}, 4),
        ("marian", {"strategy": "beam", "num_beams": 3, "num_candidates": 2}, 2),
        ("nllb", {"strategy": "sample", "num_candidates": 3}, 3),
    ],
)
def test_number_of_candidates_per_source(models, kind, decoding, expected):
    generator = load_generator(GeneratorConfig(name=kind, model=models[kind], max_new_tokens=6,
                                               **decoding))
    results = generator.generate(_requests())
    assert len(results) == len(SENTENCES)
    assert all(len(r.texts) == expected for r in results)


@pytest.mark.parametrize("kind", ["causal", "marian", "nllb"])
def test_batched_equals_one_at_a_time_and_keeps_order(models, kind):
    # float64: a batch pads where a single row does not, so the kernels sum in another order;
    # in float32 that noise (~1e-6, CPU-dependent) can flip a near-tied greedy pick.
    config = GeneratorConfig(name=kind, model=models[kind], max_new_tokens=10, token_budget=400,
                             dtype="float64")
    generator = load_generator(config)
    requests = _requests(12)
    batched = [r.texts for r in generator.generate(requests)]
    assert generator.batches > 1 and generator.batches < len(requests)
    single = [generator.generate([r])[0].texts for r in requests]
    assert batched == single
    backwards = [r.texts for r in generator.generate(list(reversed(requests)))]
    assert list(reversed(backwards)) == batched
    assert len({tuple(t) for t in batched}) > 1  # outputs differ by source: order is observable


def test_token_budget_plan_sorts_by_length_and_fits(models):
    config = GeneratorConfig(name="c", model=models["causal"], max_new_tokens=8,
                             token_budget=200, strategy="beam", num_beams=2)
    generator = load_generator(config)
    lengths = [5, 40, 12, 3, 40, 7, 25]
    batches = generator.plan_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for batch in batches:
        cost = len(batch) * (max(lengths[i] for i in batch) + 8) * 2
        assert cost <= 200 or len(batch) == 1


def test_sampling_is_reproducible_given_the_seed(models):
    def run(seed):
        config = GeneratorConfig(name="s", model=models["causal"], strategy="sample",
                                 num_candidates=3, max_new_tokens=8, seed=seed)
        return [r.texts for r in load_generator(config).generate(_requests())]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_out_of_memory_splits_the_batch_and_gives_the_same_outputs(models, monkeypatch):
    generator = load_generator(GeneratorConfig(name="c", model=models["causal"],
                                               max_new_tokens=6, dtype="float64"))  # as above
    expected = [r.texts for r in generator.generate(_requests())]
    real = generator._generate_batch

    def small_gpu(ids, extra):
        if len(ids) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ids, extra)

    monkeypatch.setattr(generator, "_generate_batch", small_gpu)
    assert [r.texts for r in generator.generate(_requests())] == expected
    assert generator.oom_splits >= 2


def test_nllb_language_tokens_and_forced_target(models):
    generator = load_generator(GeneratorConfig(name="n", model=models["nllb"],
                                               max_new_tokens=5))
    tokenizer = generator.tokenizer
    extra = generator._language_setup("de", "en")
    assert extra == {"forced_bos_token_id": tokenizer.convert_tokens_to_ids("eng_Latn")}
    ids, _ = generator._prompt_ids(_requests(1)[0])
    assert ids[0] == tokenizer.convert_tokens_to_ids("deu_Latn")
    assert ids.count(ids[0]) == 1  # the source token is there once
    assert generator.identity["language_tokens"] == "nllb"


def test_m2m_language_tokens(models):
    generator = load_generator(GeneratorConfig(name="m", model=models["m2m"],
                                               language_tokens="m2m", max_new_tokens=4))
    vocab = generator.tokenizer.get_vocab()
    assert generator._language_setup("en", "de") == {"forced_bos_token_id": vocab["__de__"]}
    ids, _ = generator._prompt_ids(Request("x", "en", "de", "Good morning."))
    assert ids[0] == vocab["__en__"] and ids[-1] == generator.tokenizer.eos_token_id
    assert len(generator.generate(_requests(3, src_lang="en", tgt_lang="de"))) == 3
    with pytest.raises(GenerateError, match=r"no language token for 'fr' \(__fr__\)"):
        generator.generate(_requests(1, src_lang="en", tgt_lang="fr"))


def test_language_without_a_token_is_refused(models):
    generator = load_generator(GeneratorConfig(name="p", model=models["pruned"],
                                               language_tokens="nllb", max_new_tokens=4))
    assert len(generator.generate(_requests(2))) == 2  # de -> en: both tokens exist
    with pytest.raises(GenerateError, match=r"no language token for 'is' \(isl_Latn\)"):
        generator.generate(_requests(1, src_lang="en", tgt_lang="is"))


def test_chat_template_wraps_the_prompt(models):
    generator = load_generator(GeneratorConfig(name="chat", model=models["chat"],
                                               use_chat_template=True, max_new_tokens=4))
    ids, _ = generator._prompt_ids(_requests(1)[0])
    text = generator.tokenizer.decode(ids)
    assert text.startswith("<s>user: Translate this from German to English:")
    assert text.endswith("assistant:")
    plain = load_generator(GeneratorConfig(name="plain", model=models["causal"],
                                           use_chat_template=True))
    with pytest.raises(GenerateError, match="has no chat template"):
        plain.generate(_requests(1))


def test_long_sources_are_truncated_and_counted(models, caplog):
    long = " ".join(["Ein sehr langer Satz über Züge und Fahrpläne."] * 40)
    config = GeneratorConfig(name="c", model=models["causal"], max_new_tokens=4,
                             max_source_tokens=20)
    generator = load_generator(config)
    ids, cut = generator._prompt_ids(Request("x", "de", "en", long))
    assert cut
    assert generator.tokenizer.decode(ids).endswith("\nEnglish:")  # the prompt's end survives
    with caplog.at_level("WARNING"):
        result = generate_candidates(_sources([long, "Kurz."]), GenerateConfig(), [generator])
    assert result.report.truncated == {"c": 1}
    assert "1 of 2 sources were longer than the model allows" in caplog.text


def test_causal_output_is_cut_at_the_first_newline(models):
    generator = load_generator(GeneratorConfig(name="c", model=models["causal"]))
    assert generator._clean(" The train leaves.\nGerman: Der Zug") == "The train leaves."
    assert generator._clean("\n") == ""


def test_lora_adapter_changes_outputs(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["causal"])
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj",
                                           "v_proj", "down_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    plain = load_generator(GeneratorConfig(name="b", model=models["causal"], max_new_tokens=8))
    adapted = load_generator(GeneratorConfig(name="a", model=models["causal"],
                                             adapter=str(tmp_path / "adapter"), max_new_tokens=8))
    assert adapted.identity["adapter_weights"].startswith("folder:")
    assert ([r.texts for r in adapted.generate(_requests())]
            != [r.texts for r in plain.generate(_requests())])


def test_missing_model_path_and_unreachable_hub_id():
    with pytest.raises(GenerateError, match="model path './no/such/model' does not exist"):
        load_generator(GeneratorConfig(name="x", model="./no/such/model"))
    with pytest.raises(GenerateError, match="may be offline"):
        load_generator(GeneratorConfig(name="x", model="cpo-data-tests/not-a-model"))


def test_device_and_dtype_are_chosen_for_the_hardware():
    from cpo_data.backends.torch_device import DeviceError, pick_device, pick_dtype

    cuda = torch.cuda.is_available()
    assert pick_device("auto").type == ("cuda" if cuda else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if cuda:
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert pick_dtype("auto", torch.device("cuda")) == expected
    else:
        with pytest.raises(DeviceError, match="torch sees no CUDA device"):
            pick_device("cuda")


def test_dtype_override_is_used_and_part_of_the_identity(models):
    generator = load_generator(GeneratorConfig(name="c", model=models["causal"],
                                               dtype="bfloat16", max_new_tokens=3))
    assert generator.model.dtype == torch.bfloat16
    assert generator.identity["dtype"] == "torch.bfloat16"
    assert len(generator.generate(_requests(2))) == 2


def test_empty_source_is_refused(models):
    generator = load_generator(GeneratorConfig(name="c", model=models["causal"]))
    with pytest.raises(GenerateError, match="empty source text"):
        generator.generate([Request("x", "de", "en", "  ")])


# ---- the candidates stage -----------------------------------------------------------------------


class FakeGenerator:
    """A deterministic generator that counts what it was asked to translate."""

    def __init__(self, name="fake", outputs=None, identity=None):
        self.name = name
        self.identity = identity or {"model": "fake", "decoding": {"strategy": "greedy"}}
        self.outputs = outputs or (lambda r: [f"{r.src} [{self.name}]"])
        self.asked: list[str] = []

    def generate(self, requests):
        self.asked += [r.src for r in requests]
        return [Generated(texts=self.outputs(r)) for r in requests]


def test_provided_systems_reference_and_identical_texts_collapse():
    systems = [{"system": "gpt4", "text": "The train leaves."},
               {"system": "prod", "text": "The train leaves."},
               {"system": "bad", "text": "  "}]
    sources = _sources(["Der Zug fährt."], systems=systems, ref="The train leaves.")
    generator = FakeGenerator(outputs=lambda r: ["The train leaves.", "Train go.", ""])
    result = generate_candidates(sources, GenerateConfig(include_reference=True), [generator])
    table = schema.validate(result.table, schema.CANDIDATES).to_pylist()
    assert [(c["text"], c["systems"]) for c in table] == [
        ("The train leaves.", ["ref", "gpt4", "prod", "fake"]),
        ("Train go.", ["fake"]),
    ]
    assert table[0]["generator"] is None and table[1]["generator"] is not None
    assert json.loads(table[1]["decoding"]) == {"strategy": "greedy"}
    dropped = result.dropped.to_pylist()
    assert [(d["reason"], d["detail"]) for d in dropped] == [
        ("empty_output", "bad candidate 0"), ("empty_output", "fake candidate 2")]
    assert result.report.provided == {"ref": 1, "gpt4": 1, "prod": 1}
    assert result.report.merged_duplicates == 3


def test_provided_systems_can_be_chosen_and_typos_are_caught():
    systems = [{"system": "gpt4", "text": "A"}, {"system": "prod", "text": "B"}]
    sources = _sources(["Eins."], systems=systems)
    result = generate_candidates(sources, GenerateConfig(provided_systems=("gpt4",)))
    assert result.table.column("text").to_pylist() == ["A"]
    with pytest.raises(GenerateError, match=r"provided_systems: \['gtp4'\] not in the sources"):
        generate_candidates(sources, GenerateConfig(provided_systems=("gtp4",)))


def test_both_sides_of_a_labelled_row_are_candidates():
    """ALMA-R's recipe keeps only GPT-4 of the provided systems, yet a labelled row compares
    GPT-4 with ALMA: the ALMA side becomes a candidate there (to be scored), and only there."""
    systems = [{"system": "gpt4", "text": "A"}, {"system": "alma", "text": "B"}]
    sources = _sources(["Eins.", "Zwei."], systems=systems)
    rows = sources.to_pylist()
    rows[1].update(human_preferred="alma", human_dispreferred="gpt4", human_delta=-1.0)
    sources = pa.Table.from_pylist(rows, schema=schema.SOURCES)
    result = generate_candidates(sources, GenerateConfig(provided_systems=("gpt4",)))
    by_source = {}
    for candidate in result.table.to_pylist():
        by_source.setdefault(candidate["source_id"], []).append(candidate["systems"])
    assert by_source == {rows[0]["source_id"]: [["gpt4"]],
                         rows[1]["source_id"]: [["gpt4"], ["alma"]]}
    assert result.report.provided == {"gpt4": 2, "alma": 1}


def test_second_run_is_served_from_the_cache(tmp_path, models):
    sources = _sources(SENTENCES)
    config = GenerateConfig(cache_dir=str(tmp_path / "cache"))
    generator = load_generator(GeneratorConfig(name="c", model=models["causal"],
                                               max_new_tokens=6))
    first = generate_candidates(sources, config, [generator])
    batches = generator.batches
    second = generate_candidates(sources, config, [generator])
    assert first.report.generated == {"c": len(SENTENCES)}
    assert second.report.generated == {"c": 0}
    assert second.report.from_cache == {"c": len(SENTENCES)}
    assert generator.batches == batches  # the model did not run again
    assert second.table.equals(first.table)


def test_adding_sources_generates_only_the_new_ones(tmp_path):
    config = GenerateConfig(cache_dir=str(tmp_path / "cache"))
    generator = FakeGenerator()
    generate_candidates(_sources(SENTENCES[:4]), config, [generator])
    generator.asked.clear()
    grown = generate_candidates(_sources(SENTENCES), config, [generator])
    assert generator.asked == SENTENCES[4:]
    assert grown.report.generated == {"fake": 2} and grown.report.from_cache == {"fake": 4}
    assert grown.table.num_rows == len(SENTENCES)
    # Another identity (other decoding) does not reuse those entries.
    other = FakeGenerator(identity={"model": "fake", "decoding": {"strategy": "beam"}})
    generate_candidates(_sources(SENTENCES[:2]), config, [other])
    assert other.asked == SENTENCES[:2]


def test_cache_survives_processes_and_concurrent_writers(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from cpo_data.cache import ContentCache
        cache = ContentCache(sys.argv[1], "ns")
        start = int(sys.argv[2])
        for batch in range(20):
            cache.put_many({f"k{start + batch * 10 + i}": [start, batch, i] for i in range(10)})
            assert len(cache.get_many([f"k{start + batch * 10}"])) == 1
        # As the CLI does (pipelines.cli.console): skip the teardown where pyarrow 21 can abort.
        os._exit(0)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(s)])
                 for s in (0, 150)]  # keys 0-199 and 150-349: 50 written by both
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    from cpo_data.cache import ContentCache

    cache = ContentCache(str(tmp_path), "ns")
    assert len(cache) == 350
    found = cache.get_many([f"k{i}" for i in range(360)])
    assert len(found) == 350 and cache.hits == 350 and cache.misses == 10
    assert found["k5"] == [0, 0, 5]
    assert not [p for p in (tmp_path / "ns").iterdir() if p.name.startswith(".tmp-")]
