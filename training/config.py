"""The `train` section of the build YAML: one frozen dataclass per part, checked on load.

The same YAML file that builds a dataset holds how to train on it, so `cpo-data build` and
`cpo-data train` read one file and the training run knows which dataset it belongs to: when
`train.dataset` is not given it is the dataset the `publish` section names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cpo_data.config import ALMA_PROMPT, ScorerConfig, SourcesConfig
from cpo_data.fields import (
    FILE,
    MODEL,
    ConfigError,
    _check_at_least,
    _check_choice,
    _check_device,
    _check_prompt,
    _fail,
)
from cpo_data.preflight import Need
from cpo_data.project import (
    ProjectFile,
    parse,
    published_dataset,
    read_project,
    with_prompt,
)
from training.chunked import DEFAULT_CHUNK_TOKENS
from training.losses import CPO_LOSS_TYPES

LOSSES = ("cpo", "orpo", "dpo")
FINETUNE = ("lora", "full")
SCHEDULERS = ("linear", "cosine", "inverse_sqrt", "constant")
PRECISIONS = ("auto", "bf16", "fp32", "fp64")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")

# Field metadata: the field does not change what a training step computes (where files go,
# when to save, what to evaluate), so resuming a run with another value is allowed.
RESUME_FREE = {"resume_free": True}


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter that training updates (peft)."""

    rank: int = 16
    """Adapter rank r (ALMA-R: 16)."""
    alpha: int = 32
    """Scaling numerator: updates are scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ()
    """Module names to adapt (q_proj, v_proj, ...), or [all-linear]; empty: peft's default for
    the architecture."""
    adapter: str | None = field(default=None, metadata=MODEL)
    """An existing adapter (hub id or folder) to continue training, as ALMA-R continues
    ALMA-13B-LoRA; its own rank and targets then apply."""

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "rank", "alpha")
        if not 0 <= self.dropout < 1:
            _fail("dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """What is measured besides the training loss. Only `held_out` changes the steps (it
    decides which triplets train); the rest may change on resume."""

    held_out: int = 0
    """Triplets kept out of training (seeded pick) for preference accuracy and loss; 0: none."""
    every_steps: int = field(default=0, metadata=RESUME_FREE)
    """Evaluate the held-out triplets every N optimizer steps as well as at the end; 0: end."""
    batch_size: int = field(default=8, metadata=RESUME_FREE)
    """Pairs per evaluation batch."""
    test_set: SourcesConfig | None = field(default=None, metadata=RESUME_FREE)
    """Sources with references: after training, the trained model translates them and BLEU and
    chrF (sacrebleu) are reported."""
    test_rows: int = field(default=200, metadata=RESUME_FREE)
    """Test-set rows used at most (the first ones)."""
    prompt_template: str = field(default=ALMA_PROMPT, metadata=RESUME_FREE)
    """Prompt for translating the test set; match the triplets' prompt."""
    max_new_tokens: int = field(default=256, metadata=RESUME_FREE)
    """Longest test translation, in tokens."""
    comet: ScorerConfig | None = field(default=None, metadata=RESUME_FREE)
    """Optional COMET scorer (as in the score stage) for the test translations."""
    compare_base: bool = field(default=False, metadata=RESUME_FREE)
    """Also translate the test set with the untrained model, to report the change."""

    def __post_init__(self) -> None:
        _check_at_least(self, 0, "held_out", "every_steps")
        _check_at_least(self, 1, "batch_size", "test_rows", "max_new_tokens")
        if self.comet is not None and self.test_set is None:
            _fail("comet", "scores test translations: give a test_set too")
        if self.compare_base and self.test_set is None:
            _fail("compare_base", "compares test translations: give a test_set too")
        _check_prompt("prompt_template", self.prompt_template)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and gradient clipping."""

    learning_rate: float = 1e-4
    """Peak learning rate (ALMA-R's script: 1e-4)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this; 0 turns clipping off."""

    def __post_init__(self) -> None:
        _check_positive(self, "learning_rate")
        _check_not_negative(self, "weight_decay", "max_grad_norm")


@dataclass(frozen=True)
class ScheduleSettings:
    """How many optimizer steps, and the learning rate over them."""

    epochs: int = 1
    """Passes over the training triplets (ALMA-R: 1)."""
    max_steps: int = 0
    """Optimizer steps; overrides epochs when above 0."""
    lr_scheduler: str = "inverse_sqrt"
    """linear, cosine, inverse_sqrt (ALMA-R) or constant, each after the warm-up."""
    warmup_ratio: float = 0.01
    """Share of the optimizer steps spent warming up linearly from 0."""

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "epochs")
        _check_at_least(self, 0, "max_steps")
        _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        if not 0 <= self.warmup_ratio < 1:
            _fail("warmup_ratio", "must be in [0, 1)")


@dataclass(frozen=True)
class LengthSettings:
    """How long a training example may be, in tokens (the truncation rule: README)."""

    max_length: int = 512
    """Prompt + completion tokens at most (ALMA-R: 512)."""
    max_prompt_length: int = 256
    """Prompt tokens kept when an example is too long (ALMA-R: 256)."""

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "max_length", "max_prompt_length")
        if self.max_prompt_length >= self.max_length:
            _fail("max_prompt_length", f"must be below max_length ({self.max_length})")


@dataclass(frozen=True)
class CheckpointSettings:
    """When the run saves its state, and whether a rerun continues from it. None of these
    change what a step computes, so a resumed run may change them all."""

    every_steps: int = field(default=0, metadata=RESUME_FREE)
    """Checkpoint every N optimizer steps (and always at the end); 0: only at the end."""
    keep: int = field(default=2, metadata=RESUME_FREE)
    """Checkpoints kept (newest); older ones are deleted."""
    resume: bool = field(default=True, metadata=RESUME_FREE)
    """Continue from the newest checkpoint in the run folder when there is one."""

    def __post_init__(self) -> None:
        _check_at_least(self, 0, "every_steps")
        _check_at_least(self, 1, "keep")


@dataclass(frozen=True)
class TrainConfig:
    """One training run on a published triplet version.

    The loss parameters keep the top level and TRL's `CPOConfig` names (beta, cpo_alpha,
    loss_type, simpo_gamma, label_smoothing), so a TRL or ALMA-R setting maps key for key; the
    rest is grouped as the build's sections are. Fields marked RESUME_FREE (here and in the
    sub-sections) do not change what the steps compute: a resumed run may change them, and
    any other change refuses the resume.
    """

    # Keys of the flat layout before the sub-sections, and where each lives now.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        **{k: f"optimizer.{k}" for k in ("learning_rate", "weight_decay", "max_grad_norm")},
        **{k: f"schedule.{k}" for k in ("epochs", "max_steps", "lr_scheduler", "warmup_ratio")},
        **{k: f"lengths.{k}" for k in ("max_length", "max_prompt_length")},
        "save_steps": "checkpoints.every_steps", "save_total_limit": "checkpoints.keep",
        "resume": "checkpoints.resume",
    }

    model: str = field(metadata=MODEL)
    """Causal LM to train: hub id or local folder (ALMA-R: haoranxu/ALMA-13B-Pretrain)."""
    output_dir: str = field(default=".cpo-data/runs", metadata={**FILE, **RESUME_FREE})
    """Runs go to {output_dir}/{version}/: checkpoints, metrics.jsonl, final model, manifest."""
    dataset: str | None = field(default=None, metadata={**FILE, **RESUME_FREE})
    """Dataset URI ({store}/{name}); null: the dataset the YAML's publish section names."""
    version: str = field(default="latest", metadata=RESUME_FREE)
    """Dataset version to train on."""
    loss: str = "cpo"
    """cpo (no reference model), orpo, or dpo (reference = base model, adapter off)."""
    loss_type: str = "sigmoid"
    """cpo only: sigmoid, hinge, ipo or simpo."""
    beta: float = 0.1
    """Preference temperature beta (cpo, dpo)."""
    cpo_alpha: float = 1.0
    """cpo: weight of the NLL term on the chosen completion."""
    label_smoothing: float = 0.0
    """cpo sigmoid: probability that a pair's label is flipped (conservative loss)."""
    simpo_gamma: float = 0.5
    """cpo simpo: target reward margin."""
    orpo_lambda: float = 0.1
    """orpo: weight lambda of the odds-ratio term (TRL calls it beta)."""
    orpo_nll_on_prompt: bool = True
    """orpo: the NLL covers prompt and completion (as TRL), else the completion only."""
    finetune: str = "lora"
    """lora (only adapter weights train) or full (every weight trains)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter, for finetune: lora."""
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    """AdamW's learning rate and weight decay, and gradient clipping."""
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    """How many steps, and the learning rate over them."""
    lengths: LengthSettings = field(default_factory=LengthSettings)
    """Longest example and longest kept prompt, in tokens."""
    batch_size: int = 4
    """Pairs per forward pass (each pair is two sequences), in each process."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step: the step's batch is batch_size x this (x the
    number of processes, when torchrun or accelerate launch starts several)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    logps_chunk_tokens: int | None = field(default=DEFAULT_CHUNK_TOKENS, metadata=RESUME_FREE)
    """Positions per LM-head chunk: only the positions a loss term needs go through the head,
    this many at a time, so no [tokens, vocabulary] logits of the whole batch exist
    (training/chunked.py). null: full logits (the earlier path). Free on resume: it changes
    memory, not results."""
    prompt_once: bool = field(default=True, metadata=RESUME_FREE)
    """Run each pair as one packed sequence, prompt + chosen + rejected, so the shared prompt
    is computed once (training/packing.py); false: chosen and rejected as two sequences.
    Models whose attention takes no custom 4-D mask run two sequences (said once). Free on
    resume: the same results."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs that support it, else fp32), bf16, fp32, or fp64 (float64
    weights and arithmetic: for checking that two ways of computing a step agree; slow)."""
    device: str = field(default="auto", metadata=RESUME_FREE)
    """auto (cuda when available), cpu, cuda, cuda:N."""
    processes: int = field(default=1, metadata=RESUME_FREE)
    """Data-parallel processes (one per GPU) that the training flow and `cpo-data train` start
    through torchrun; 1 trains in the flow's own process. Under a launcher you start yourself
    (`torchrun ... -m training`), the launcher's count applies instead. Free on resume: the
    count that shapes a step is the world size, which the checkpoint records itself."""
    seed: int = 42
    """Seeds the adapter's initial weights, the data order and dropout."""
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    """When state is saved, how many checkpoints are kept, whether a rerun resumes."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out preference accuracy and test-set translation quality."""
    report_to: tuple[str, ...] = field(default=(), metadata=RESUME_FREE)
    """Dashboards that get every metrics.jsonl line as well, same names and steps: any of
    tensorboard ({run}/tensorboard/), wandb, mlflow, trackio (each a pip extra,
    `cpo-data[wandb]`); empty: metrics.jsonl only (training/reporting.py)."""

    def __post_init__(self) -> None:
        if not self.model:
            _fail("model", "name a hub id or a local folder")
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("loss_type", self.loss_type, CPO_LOSS_TYPES)
        _check_choice("finetune", self.finetune, FINETUNE)
        if self.loss != "cpo" and self.loss_type != "sigmoid":
            _fail("loss_type", f"{self.loss_type!r} is a cpo loss type; loss {self.loss} has "
                  "its own preference term (leave loss_type at sigmoid)")
        if self.loss == "dpo" and self.finetune != "lora":
            _fail("finetune", "dpo needs lora: its reference model is the base model with the "
                  "adapter switched off")
        _check_choice("precision", self.precision, PRECISIONS)
        _check_device("device", self.device)
        _check_positive(self, "beta", "orpo_lambda")
        _check_not_negative(self, "cpo_alpha", "simpo_gamma")
        if not 0 <= self.label_smoothing < 0.5:
            _fail("label_smoothing", "must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            _fail("label_smoothing", "applies to loss_type sigmoid only")
        _check_at_least(self, 1, "batch_size", "gradient_accumulation_steps", "processes")
        if self.logps_chunk_tokens is not None:
            _check_at_least(self, 1, "logps_chunk_tokens")
        if isinstance(self.report_to, str):
            _fail("report_to", f"expected a list, e.g. [{self.report_to}]")
        for i, name in enumerate(self.report_to):
            _check_choice(f"report_to[{i}]", name, REPORT_TO)
            if name in self.report_to[:i]:
                _fail(f"report_to[{i}]", f"{name!r} is named twice")


def _check_positive(config, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not (math.isfinite(value) and value > 0):
            _fail(key, f"must be a positive number, got {value}")


def _check_not_negative(config, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            _fail(key, f"must be a number >= 0, got {value}")


def resume_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting that shapes the steps, by dotted key (`optimizer.learning_rate`): the
    fields not marked RESUME_FREE, through the sub-sections."""
    settings: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("resume_free"):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            settings.update(resume_settings(value, f"{prefix}{f.name}."))
        else:
            settings[f"{prefix}{f.name}"] = value
    return settings


def train_needs(config: TrainConfig) -> list[Need]:
    """What a training run reads besides its dataset, for `cpo_data.preflight.check`."""
    needs = [Need("train.model", "model", config.model)]
    if config.finetune == "lora" and config.lora.adapter:
        needs.append(Need("train.lora.adapter", "adapter", config.lora.adapter))
    if config.eval.test_set is not None:
        needs.append(Need("train.eval.test_set.path", "file", config.eval.test_set.path))
    if config.eval.comet is not None and config.eval.comet.model:
        needs.append(Need("train.eval.comet.model", "comet", config.eval.comet.model))
    return needs


def train_section(project: ProjectFile) -> TrainConfig:
    """The project file's `train` section, paths resolved; `train.dataset` defaults to the
    dataset the file's `publish` section names, and `eval.prompt_template` to the project's
    prompt."""
    section = project.section("train")
    if section is None:
        raise ConfigError(f"{project.path}: train: the file has no train section")
    section = with_prompt(section, project.prompt_template, "eval", "prompt_template")
    config = parse(TrainConfig, section, project, "train")
    if config.dataset is None:
        dataset = published_dataset(project)
        if dataset is None:
            raise ConfigError(f"{project.path}: train.dataset: name the dataset URI, or give "
                              "the file a publish section")
        config = dataclasses.replace(config, dataset=dataset)
    return config


def load_train_config(path: str | Path) -> TrainConfig:
    """The `train` section of a project file; relative paths resolve against its folder."""
    return train_section(read_project(path))
