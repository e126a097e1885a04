import dataclasses
from pathlib import Path

import pytest

from cpo_data.config import (
    ALMA_PROMPT,
    BuildConfig,
    ConfigError,
    SelectConfig,
    SourcesConfig,
    load_config,
)
from tests.conftest import REPO_ROOT


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text(text)
    return path


GOOD = """
sources:
  - path: data.jsonl
    src_lang: de
    tgt_lang: en
publish:
  uri: store
  name: mine
"""


def test_good_config_loads_and_resolves_relative_paths(tmp_path):
    config = load_config(_write(tmp_path, GOOD))
    assert isinstance(config, BuildConfig)
    assert config.sources[0].path == str(tmp_path / "data.jsonl")
    assert config.publish.uri == str(tmp_path / "store")
    assert config.select.prompt_template == ALMA_PROMPT


def test_model_and_adapter_folders_resolve_but_hub_ids_stay(tmp_path):
    text = GOOD + ("generate:\n  models:\n    - {name: local, model: ./models/base, "
                   "adapter: ./adapters/lora}\n    - {name: hub, model: org/base, "
                   "adapter: org/lora}\n")
    local, hub = load_config(_write(tmp_path, text)).generate.models
    assert (local.model, local.adapter) == (str(tmp_path / "models" / "base"),
                                            str(tmp_path / "adapters" / "lora"))
    assert (hub.model, hub.adapter) == ("org/base", "org/lora")


def test_demo_config_loads():
    config = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert config.sources[0].label_positive == "system_a"
    assert Path(config.sources[0].path).is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("src_lang: de", "src_lang: de\n    src_colum: x"),
         r"sources\[0\]\.src_colum: unknown key"),
        (GOOD.replace("name: mine", "name: 3"), r"publish\.name: expected str, got int"),
        (GOOD.replace("  name: mine\n", ""), r"publish\.name: required key is missing"),
        (GOOD.replace("src_lang: de", "src_lang: xx"), r"sources\[0\]\.src_lang: unknown language"),
        (GOOD + "select:\n  prompt_template: 'no source here'\n",
         r"select\.prompt_template: must contain \{src\}"),
        (GOOD.replace("uri: store", "uri: [a]"), r"publish\.uri: expected str, got list"),
        ("sources: []\npublish: {uri: s, name: n}\n", r"sources: list at least one"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_label_must_name_mapped_systems():
    with pytest.raises(ConfigError, match="label_negative: 'b' is not one of the mapped"):
        SourcesConfig(path="x", src_lang="de", tgt_lang="en", systems={"a": "a"},
                      label_column="delta", label_positive="a", label_negative="b")


def test_languages_required_per_file_or_per_row():
    with pytest.raises(ConfigError, match="tgt_lang: set tgt_lang"):
        SourcesConfig(path="x", src_lang="de")
    assert SourcesConfig(path="x", src_lang_column="s", tgt_lang_column="t").src_lang is None


def test_prompt_template_with_unknown_placeholder_is_refused():
    with pytest.raises(ConfigError, match="prompt_template: cannot be filled"):
        SelectConfig(prompt_template="{src} {nope}")


def test_generate_section_maps_onto_dataclasses(tmp_path):
    text = GOOD + """
generate:
  include_reference: true
  cache_dir: cache
  models:
    - name: alma
      model: ./models/alma
      strategy: beam
      num_beams: 5
      num_candidates: 2
    - name: nllb
      model: facebook/nllb-200-distilled-600M
"""
    config = load_config(_write(tmp_path, text))
    alma, nllb = config.generate.models
    assert alma.model == str(tmp_path / "models" / "alma")
    assert nllb.model == "facebook/nllb-200-distilled-600M"  # a hub id stays as it is
    assert (alma.num_beams, alma.num_candidates) == (5, 2)
    assert config.generate.cache_dir == str(tmp_path / "cache")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("strategy: greedy\n      num_candidates: 3", "num_candidates: greedy decoding gives one"),
        ("strategy: beam\n      num_beams: 2\n      num_candidates: 3",
         r"num_candidates: cannot exceed num_beams \(2\)"),
        ("strategy: sample\n      top_p: 1.5", r"top_p: must be in \(0, 1\]"),
        ("dtype: float8", "dtype: 'float8' is not one of"),
        ("device: tpu", "device: 'tpu' is not auto"),
    ],
)
def test_bad_generator_settings_name_the_key(tmp_path, model, message):
    text = GOOD + f"generate:\n  models:\n    - name: m\n      model: x\n      {model}\n"
    with pytest.raises(ConfigError, match=rf"generate\.models\[0\]\.{message}"):
        load_config(_write(tmp_path, text))


def test_shipped_configs_state_their_recipes():
    from pipelines.demo import REPO_ROOT

    alma = load_config(REPO_ROOT / "configs" / "alma-r.yaml")
    assert alma.rank_by == "kiwi_xcomet" and alma.generate.include_reference
    assert alma.generate.provided_systems == ("gpt4",)
    assert [m.adapter for m in alma.generate.models] == ["haoranxu/ALMA-13B-Pretrain-LoRA"]
    assert [s.model for s in alma.score.scorers] == ["Unbabel/wmt23-cometkiwi-da-xxl",
                                                     "Unbabel/XCOMET-XXL"]
    assert not any(s.use_reference for s in alma.score.scorers)
    assert alma.select.pairs == "best_vs_worst" and alma.select.use_human_labels
    # The noise rules at their defaults: KIWI-XXL's and XCOMET-XXL's threshold, agreement on.
    assert alma.select == dataclasses.replace(alma.select, min_margin=None, agreement=True,
                                              agreement_scores=None, noise_thresholds={})
    assert alma.selection.margin_floor == 0.0124
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert demo.rank_by == "chrf" and not demo.generate.include_reference
    assert demo.generate.models == ()


def test_selection_gets_everything_it_needs_from_the_build(tmp_path):
    scored = GOOD + ("generate:\n  include_reference: true\n  reference_name: human\n"
                     "score:\n  scorers:\n    - {name: c, kind: chrf}\n")
    config = load_config(_write(tmp_path, scored))
    assert config.select.rank_by is None  # as written: the only scorer is meant
    assert (config.selection.rank_by, config.selection.reference_name) == ("c", "human")
    assert config.selection.min_margin == config.select.min_margin
    unscored = load_config(_write(tmp_path, GOOD))
    assert (unscored.selection.rank_by, unscored.selection.reference_name) == (None, "ref")
    # The reference's name lives in generate; a different one under select is refused.
    with pytest.raises(ConfigError, match=r"select\.reference_name: .*generate\.reference_name"):
        load_config(_write(tmp_path, scored + "select:\n  reference_name: ref\n"))
