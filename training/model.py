"""Loading what the loop trains: the tokenizer and the model (base + LoRA adapter, or all
weights), the autocast dtype, and the memory the run peaked at."""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.errors import TrainingError

log = logging.getLogger("cpo_data.training")


def load_tokenizer(config: TrainConfig) -> tuple[Any, str | None]:
    """The model's tokenizer, and a note when EOS had to stand in for a missing pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        raise TrainingError(f"train.model: cannot load a tokenizer from {config.model!r}: "
                            f"{error}") from None
    if tokenizer.eos_token_id is None:
        raise TrainingError(f"train.model: the tokenizer of {config.model!r} has no EOS token; "
                            "completions must end with one")
    note = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        # Safe: labels and attention masks come from sequence lengths, never from the pad id.
        note = (f"the tokenizer of {config.model} has no pad token: padding with EOS "
                f"({tokenizer.eos_token!r}, id {tokenizer.eos_token_id}); padded positions "
                "carry no loss")
        log.warning(note)
    return tokenizer, note


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def logps_dtype(config: TrainConfig) -> torch.dtype:
    """What `token_logps` returns: float32 (from bf16 or fp32 logits), float64 for fp64."""
    return torch.float64 if config.precision == "fp64" else torch.float32


def load_model(config: TrainConfig, device: torch.device, half: torch.dtype | None,
               resume_from: Path | None):
    """The model to train: base + LoRA adapter (new, continued or resumed), or all weights."""
    from transformers import AutoModelForCausalLM

    full_resume = resume_from is not None and config.finetune == "full"
    source = str(resume_from) if full_resume else config.model
    # A LoRA run never updates the base weights: hold them in half precision on GPU. Full
    # fine-tuning keeps float32 master weights and runs the forward pass under autocast.
    dtype = half if (half is not None and config.finetune == "lora") else torch.float32
    if config.precision == "fp64":
        dtype = torch.float64
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        raise TrainingError(f"train.model: cannot load {source!r}: {error}") from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.finetune == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        adapter = str(resume_from) if resume_from is not None else config.lora.adapter
        if adapter:
            try:
                model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
            except (OSError, ValueError) as error:
                raise TrainingError(f"train.lora.adapter: cannot load {adapter!r}: "
                                    f"{error}") from None
        else:
            targets = list(config.lora.target_modules) or None
            if targets == ["all-linear"]:
                targets = "all-linear"
            lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                              lora_dropout=config.lora.dropout, target_modules=targets,
                              task_type="CAUSAL_LM")
            try:
                model = get_peft_model(model, lora)
            except ValueError as error:
                raise TrainingError(f"train.lora.target_modules: {error}") from None
    if config.precision == "fp64":
        model = model.double()  # peft makes new adapters in float32 whatever the base holds
    return model.to(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the peak of torch's allocations. CPU: this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Not getrusage's ru_maxrss: a child process inherits its parent's, so a run started from
    # a large process would report the parent's peak.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
