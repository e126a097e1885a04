"""The `train` section of the build YAML: defaults, paths, and refused combinations."""

from __future__ import annotations

import pytest
import yaml

from cpo_data.config import ConfigError, load_config
from training.config import (
    CheckpointSettings,
    EvalConfig,
    LengthSettings,
    OptimizerSettings,
    ScheduleSettings,
    TrainConfig,
    load_train_config,
    resume_settings,
)

BUILD = {
    "sources": [{"path": "data/sources.jsonl", "src_lang": "de", "tgt_lang": "en",
                 "systems": {"a": "a", "b": "b"}}],
    "publish": {"uri": "store", "name": "mt"},
}


def write(folder, train, build=True):
    data = {**BUILD, "train": train} if build else {"train": train}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_section_defaults_to_the_published_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sources.jsonl").write_text('{"src": "x", "a": "y", "b": "z"}\n')
    path = write(tmp_path, {"model": "./models/tiny", "lora": {"adapter": "./adapters/a"}})
    config = load_train_config(path)
    assert config.dataset == str(tmp_path / "store" / "mt")
    assert config.model == str(tmp_path / "models" / "tiny")
    assert config.lora.adapter == str(tmp_path / "adapters" / "a")
    assert config.output_dir == str(tmp_path / ".cpo-data" / "runs")
    # the ALMA-R defaults
    assert (config.loss, config.beta, config.cpo_alpha, config.schedule.lr_scheduler) == (
        "cpo", 0.1, 1.0, "inverse_sqrt")
    assert (config.lengths.max_length, config.lengths.max_prompt_length,
            config.lora.rank) == (512, 256, 16)
    # the build reads the same file and leaves the train section to training
    assert load_config(path).publish.name == "mt"


def test_hub_ids_and_explicit_datasets_are_kept(tmp_path):
    path = write(tmp_path, {"model": "haoranxu/ALMA-13B-Pretrain", "dataset": "s3://b/mt"},
                 build=False)
    config = load_train_config(path)
    assert config.model == "haoranxu/ALMA-13B-Pretrain" and config.dataset == "s3://b/mt"


@pytest.mark.parametrize(("train", "message"), [
    ({"model": "m", "loss": "orpo", "loss_type": "hinge"},
     r"train\.loss_type: 'hinge' is a cpo loss type; loss orpo has its own preference term"),
    ({"model": "m", "loss": "dpo", "finetune": "full"},
     r"train\.finetune: dpo needs lora: its reference model is the base model with the "
     r"adapter switched off"),
    ({"model": "m", "loss_type": "ipo", "label_smoothing": 0.1},
     r"train\.label_smoothing: applies to loss_type sigmoid only"),
    ({"model": "m", "lengths": {"max_prompt_length": 512}},
     r"train\.lengths\.max_prompt_length: must be below max_length \(512\)"),
    ({"model": "m", "schedule": {"lr_scheduler": "exponential"}},
     r"train\.schedule\.lr_scheduler: 'exponential' is not one of linear, cosine, inverse_sqrt"),
    ({"model": "m", "lora": {"rank": 0}}, r"train\.lora\.rank: must be at least 1"),
    ({"model": "m", "eval": {"comet": {"name": "kiwi", "model": "x"}}},
     r"train\.eval\.comet: scores test translations: give a test_set too"),
    ({"model": "m", "optimizer": {"learning_rate": 0}},
     r"train\.optimizer\.learning_rate: must be a positive number"),
    ({"model": "m", "checkpoints": {"keep": 0}}, r"train\.checkpoints\.keep: must be at least 1"),
    # The flat keys of the layout before the sub-sections name where they live now.
    ({"model": "m", "learning_rate": 1e-4},
     r"train\.learning_rate: moved: write it as train\.optimizer\.learning_rate"),
    ({"model": "m", "save_steps": 50},
     r"train\.save_steps: moved: write it as train\.checkpoints\.every_steps"),
    ({"model": "m", "batch_sise": 4}, r"train\.batch_sise: unknown key"),
    ({"loss": "cpo"}, r"train\.model: required key is missing"),
])
def test_bad_train_settings_name_the_key(tmp_path, train, message):
    path = write(tmp_path, train)
    with pytest.raises(ConfigError, match=rf"config\.yaml: {message}"):
        load_train_config(path)


def test_a_file_without_train_section_or_dataset_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BUILD))
    with pytest.raises(ConfigError, match=r"config\.yaml: train: the file has no train section"):
        load_train_config(path)
    path = write(tmp_path, {"model": "m"}, build=False)
    with pytest.raises(ConfigError, match=r"train\.dataset: name the dataset URI"):
        load_train_config(path)


def test_the_alma_r_config_states_the_papers_training_recipe():
    from pipelines.demo import REPO_ROOT

    config = load_train_config(REPO_ROOT / "configs" / "alma-r.yaml")
    assert config.dataset.endswith("/.cpo-data/store/alma-r")
    schedule, lengths = config.schedule, config.lengths
    assert (config.loss, config.beta, schedule.epochs, schedule.warmup_ratio) == (
        "cpo", 0.1, 1, 0.01)
    assert (config.optimizer.learning_rate, schedule.lr_scheduler) == (1e-4, "inverse_sqrt")
    assert config.optimizer.weight_decay == 0.01  # ALMA's runs/cpo_ft.sh
    assert config.batch_size * config.gradient_accumulation_steps == 128
    assert (lengths.max_length, lengths.max_prompt_length) == (512, 256)
    assert config.lora.adapter == "haoranxu/ALMA-13B-Pretrain-LoRA"


def test_a_resume_compares_every_setting_that_shapes_the_steps():
    """Read from field metadata: only fields marked RESUME_FREE may change on a resume, and
    a change anywhere else (sub-sections too) is named by its dotted key."""
    from dataclasses import replace

    base = TrainConfig(model="m")
    settings = resume_settings(base)
    where_and_when = replace(
        base, output_dir="elsewhere", dataset="other/mt", version="v2", device="cpu",
        processes=2, checkpoints=CheckpointSettings(every_steps=5, keep=1, resume=False),
        eval=EvalConfig(every_steps=3, batch_size=1, test_rows=1, max_new_tokens=1))
    assert resume_settings(where_and_when) == settings
    shaping = [
        (replace(base, optimizer=OptimizerSettings(learning_rate=2e-4)),
         "optimizer.learning_rate"),
        (replace(base, optimizer=OptimizerSettings(weight_decay=0.01)), "optimizer.weight_decay"),
        (replace(base, schedule=ScheduleSettings(max_steps=9)), "schedule.max_steps"),
        (replace(base, schedule=ScheduleSettings(warmup_ratio=0.1)), "schedule.warmup_ratio"),
        (replace(base, lengths=LengthSettings(max_prompt_length=128)),
         "lengths.max_prompt_length"),
        (replace(base, eval=EvalConfig(held_out=5)), "eval.held_out"),  # which triplets train
        (replace(base, batch_size=2), "batch_size"),
        (replace(base, beta=0.5), "beta"),
        (replace(base, seed=1), "seed"),
    ]
    for changed, key in shaping:
        after = resume_settings(changed)
        assert after.keys() == settings.keys()
        assert {k for k in settings if after[k] != settings[k]} == {key}
